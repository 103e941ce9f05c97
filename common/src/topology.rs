//! The JetStream topology as code. Every process calls [`ensure_core`] (and
//! workers [`ensure_region`]) at start-up; creation is idempotent, so any
//! number of coordinators and workers can start in any order.
//!
//! | what | name | retention |
//! |---|---|---|
//! | tasks | `KEYWAVE_TASKS_<region>` on `keywave.task.<region>.>`, one per region | work queue: a task is removed when acked |
//! | results | `KEYWAVE_RESULTS` on `keywave.result.>` | limits (audit, replayed by a restarted coordinator) |
//! | events | `KEYWAVE_EVENTS` on `keywave.event.>` | limits (the audit trail of decisions) |
//! | dead letters | `KEYWAVE_DEADLETTER` on `keywave.deadletter.>` | limits |
//! | audit | `KEYWAVE_AUDIT` on `keywave.audit.>` | limits; one hash chain per campaign (see [`crate::audit`]) |
//! | detections | `KEYWAVE_DETECTIONS` on `keywave.detect.>` | limits (see [`crate::detect`]) |
//! | rotation notices | `KEYWAVE_ROTATED` on `keywave.rotated.>` | limits, latest per credential |
//! | inventory | KV `keywave-inventory` | latest value per credential |
//! | campaigns | KV `keywave-campaigns` | campaign snapshots and plans |
//! | secrets | KV `keywave-secrets-<region>` | encrypted, per region |
//! | advisories | `KEYWAVE_ADVISORIES` on the server's max-deliveries advisories | limits (the poison handler's queue) |
//! | lease | KV `keywave-leases` | which coordinator is active (compare-and-set, expiry in the value) |
//!
//! Each region has a task stream of its own ([`tasks_stream`]) with one
//! durable pull consumer, `workers-<region>`, shared by every worker of that
//! region. The stream is created by [`ensure_region`] (the coordinator with
//! `--regions`, or before it first publishes to a region, and a worker whose
//! region has none yet).
//!
//! # Placement
//!
//! In a NATS supercluster ([`Config::home_placement`],
//! [`Config::region_placement`]; see docs/multi-region.md) each region's
//! task stream and secret store are created on that region's servers only,
//! and everything else (the streams and buckets above, including the result
//! stream) on the home servers. Without a placement the server places a
//! stream where it likes, as on a single server or one cluster.

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, FromConsumer},
    kv,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
    Context,
};
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

/// The one task stream for every region of releases before per-region task
/// streams; [`ensure_region`] retires it once it is empty.
pub const LEGACY_STREAM_TASKS: &str = "KEYWAVE_TASKS";
/// Prefix of the per-region task streams (see [`tasks_stream`]).
pub const TASKS_STREAM_PREFIX: &str = "KEYWAVE_TASKS_";
pub const STREAM_RESULTS: &str = "KEYWAVE_RESULTS";
pub const STREAM_EVENTS: &str = "KEYWAVE_EVENTS";
pub const STREAM_DEADLETTER: &str = "KEYWAVE_DEADLETTER";
/// The hash-chained audit trail (see [`crate::audit`]).
pub const STREAM_AUDIT: &str = "KEYWAVE_AUDIT";
pub const KV_INVENTORY: &str = "keywave-inventory";
/// Consumer records: one JSON record per consumer id.
pub const KV_CONSUMERS: &str = "keywave-consumers";
/// Consumer agents' attestations, `keywave.attest.<region>.<credential>`.
pub const STREAM_ATTEST: &str = "KEYWAVE_ATTEST";
/// Attestations kept per credential subject.
pub const ATTEST_PER_SUBJECT: i64 = 256;
pub const KV_CAMPAIGNS: &str = "keywave-campaigns";
pub const STREAM_ADVISORIES: &str = "KEYWAVE_ADVISORIES";
pub const KV_LEASES: &str = "keywave-leases";

/// The advisories the server publishes when a message of a consumer reached
/// its max deliveries: `...MAX_DELIVERIES.<stream>.<consumer>`. A task of a
/// region's consumer gives `...MAX_DELIVERIES.KEYWAVE_TASKS_<region>.workers-<region>`;
/// the poison handler ignores every other stream's.
pub const ADVISORY_MAX_DELIVERIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.*.*";

/// Name of a region's task stream, `KEYWAVE_TASKS_<region>`, which holds
/// the subjects `keywave.task.<region>.>`.
pub fn tasks_stream(region: &str) -> String {
    format!("{TASKS_STREAM_PREFIX}{region}")
}

/// The region of a task stream named by [`tasks_stream`].
pub fn tasks_stream_region(stream: &str) -> Option<&str> {
    stream
        .strip_prefix(TASKS_STREAM_PREFIX)
        .filter(|r| crate::ids::validate("region", r).is_ok())
}

/// The regions that have a task stream on the server (one
/// `$JS.API.STREAM.NAMES` request per page of stream names).
pub async fn task_stream_regions(js: &Context) -> Result<Vec<String>, TopologyError> {
    use futures::TryStreamExt;
    let names: Vec<String> = js
        .stream_names()
        .try_collect()
        .await
        .map_err(|e| terr("listing the task streams", e))?;
    let mut regions: Vec<String> = names
        .iter()
        .filter_map(|n| tasks_stream_region(n).map(str::to_string))
        .collect();
    regions.sort();
    Ok(regions)
}

/// Name of a region's secret store bucket.
pub fn kv_secrets(region: &str) -> String {
    format!("keywave-secrets-{region}")
}

/// Name of a region's shared durable task consumer.
pub fn worker_consumer(region: &str) -> String {
    format!("workers-{region}")
}

#[derive(Debug, Error)]
#[error("JetStream topology: {what}: {detail}")]
pub struct TopologyError {
    pub what: String,
    pub detail: String,
}

/// Why reading a stream through a consumer failed; `stream` names the
/// stream.
#[derive(Debug, Error)]
pub enum StreamReadError {
    #[error("opening stream {stream}: {source}")]
    Open {
        stream: &'static str,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("creating a consumer on {stream}: {source}")]
    Consumer {
        stream: &'static str,
        #[source]
        source: jetstream::stream::ConsumerError,
    },
    #[error("reading {stream}: {source}")]
    Messages {
        stream: &'static str,
        #[source]
        source: jetstream::consumer::StreamError,
    },
    #[error("reading {stream}: {source}")]
    Next {
        stream: &'static str,
        #[source]
        source: pull::OrderedError,
    },
    #[error("reading {stream}: a message without stream metadata: {source}")]
    Info {
        stream: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("{stream} stopped delivering (nothing for {idle:?})")]
    Stalled {
        stream: &'static str,
        idle: Duration,
    },
}

/// Reads every message of `stream` whose subject matches `filter`, from the
/// first, with an ordered consumer, handing each to `f`; returns once none is
/// pending. Fails when the stream stops delivering for `idle`.
pub async fn read_all(
    js: &jetstream::Context,
    stream: &'static str,
    filter: String,
    idle: Duration,
    mut f: impl FnMut(&jetstream::Message),
) -> Result<(), StreamReadError> {
    use futures::StreamExt;
    let handle = js
        .get_stream(stream)
        .await
        .map_err(|source| StreamReadError::Open { stream, source })?;
    let consumer = handle
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|source| StreamReadError::Consumer { stream, source })?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|source| StreamReadError::Messages { stream, source })?;
    loop {
        let next = tokio::time::timeout(idle, messages.next())
            .await
            .map_err(|_| StreamReadError::Stalled { stream, idle })?;
        let Some(m) = next else { return Ok(()) };
        let m = m.map_err(|source| StreamReadError::Next { stream, source })?;
        let pending = m
            .info()
            .map_err(|source| StreamReadError::Info { stream, source })?
            .pending;
        f(&m);
        if pending == 0 {
            return Ok(());
        }
    }
}

fn terr(what: impl Into<String>, e: impl std::fmt::Display) -> TopologyError {
    TopologyError {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// Redelivery delays of an un-acked task by default: a task whose worker
/// died comes back to another worker of the region after 5 s, and after 5 s
/// again if that one died too; a task that keeps being lost backs off to
/// 30 s. A short ack wait is safe because a worker sends an in-progress ack
/// every third of it while a task runs (or waits its turn), so a slow step
/// is never mistaken for a dead worker.
pub const DEFAULT_TASK_BACKOFF_SECS: [u64; 5] = [5, 5, 10, 20, 30];
/// Deliveries of a task before the server gives up on it by default: it
/// survives nine lost deliveries in a row (worker crashes), about three
/// minutes of redeliveries, before it is dead-lettered.
pub const DEFAULT_TASK_MAX_DELIVER: i64 = 10;
/// Lost deliveries in a row that a wave's deadline waits out (see
/// [`Config::redelivery_allowance`]).
pub const REDELIVERY_ALLOWANCE_DELIVERIES: usize = 3;

/// Settings of the streams and consumers. Defaults suit production; tests
/// shorten the redelivery delays.
#[derive(Debug, Clone)]
pub struct Config {
    /// Stream and bucket replicas (3 on a cluster).
    pub replicas: usize,
    /// Redelivery delays of an un-acked task, one per delivery (the last
    /// repeats); the first is the ack wait. `max_deliver` must be greater
    /// than the number of entries. Default [`DEFAULT_TASK_BACKOFF_SECS`].
    pub task_backoff: Vec<Duration>,
    /// Deliveries of a task before it is given up (and dead-lettered).
    /// Default [`DEFAULT_TASK_MAX_DELIVER`].
    pub task_max_deliver: i64,
    /// Tasks handed out but not yet acked, per region (bounds in-flight work).
    pub max_ack_pending: i64,
    /// JetStream de-duplication window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How long results, events and dead letters are kept.
    pub audit_max_age: Duration,
    /// Use in-memory storage (tests and benchmarks only).
    pub memory: bool,
    /// Where the home state goes (every stream and bucket but the regions'
    /// secret stores): e.g. the home cluster. `None`: wherever the server
    /// places it.
    pub home_placement: Option<Placement>,
    /// Where each region's secret store goes, by region: e.g. the servers
    /// tagged `region:eu`. A region not listed is placed by the server.
    pub region_placement: BTreeMap<String, Placement>,
    /// Replicas of each region's secret store; `None`: [`Config::replicas`].
    /// A region placed on fewer servers than the home cluster needs fewer.
    pub region_replicas: Option<usize>,
}

/// Where JetStream puts a stream or bucket: on the servers of one cluster
/// (gateway name), on the servers that carry every one of the tags
/// (`server_tags` in the server's configuration), or both.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub cluster: Option<String>,
    pub tags: Vec<String>,
}

/// Why a placement specification does not parse.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PlacementError(pub String);

impl Placement {
    /// Parses `cluster=<name>` and tags joined by `+`, e.g. `region:eu`,
    /// `cluster=home`, `cluster=eu+region:eu+disk:ssd`.
    pub fn parse(spec: &str) -> Result<Placement, PlacementError> {
        let mut p = Placement::default();
        for item in spec.split('+').map(str::trim) {
            if item.is_empty() {
                return Err(PlacementError(format!(
                    "empty item in placement {spec:?} (use cluster=<name> and tags joined by +, e.g. cluster=eu+region:eu)"
                )));
            }
            let bad = |what: &str| {
                PlacementError(format!(
                    "{what} {item:?} in placement {spec:?}: only letters, digits, and - _ : . are allowed"
                ))
            };
            let allowed = |v: &str| {
                !v.is_empty()
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ':' | '.'))
            };
            if let Some(name) = item.strip_prefix("cluster=") {
                if !allowed(name) || name.contains(':') {
                    return Err(bad("cluster"));
                }
                if p.cluster.replace(name.to_string()).is_some() {
                    return Err(PlacementError(format!(
                        "placement {spec:?} names more than one cluster"
                    )));
                }
            } else if item.contains('=') {
                return Err(PlacementError(format!(
                    "unknown key in {item:?} of placement {spec:?} (only cluster=<name>; anything else is a server tag such as region:eu)"
                )));
            } else if !allowed(item) {
                return Err(bad("tag"));
            } else if !p.tags.iter().any(|t| t == item) {
                p.tags.push(item.to_string());
            }
        }
        Ok(p)
    }

    /// The JetStream placement of a stream.
    pub fn to_nats(&self) -> stream::Placement {
        stream::Placement {
            cluster: self.cluster.clone(),
            tags: self.tags.clone(),
        }
    }
}

impl std::fmt::Display for Placement {
    /// `cluster=home+region:eu`, as [`Placement::parse`] reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut items: Vec<String> = self
            .cluster
            .iter()
            .map(|c| format!("cluster={c}"))
            .collect();
        items.extend(self.tags.iter().cloned());
        f.write_str(&items.join("+"))
    }
}

/// Parses a per-region placement list, `eu=region:eu,us=region:us` (each
/// region's placement as [`Placement::parse`] reads it).
pub fn parse_region_placements(list: &str) -> Result<BTreeMap<String, Placement>, PlacementError> {
    let mut out = BTreeMap::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((region, spec)) = entry.split_once('=') else {
            return Err(PlacementError(format!(
                "{entry:?} is not <region>=<placement> (e.g. eu=region:eu)"
            )));
        };
        let region = region.trim();
        crate::ids::validate("region", region).map_err(|e| PlacementError(e.to_string()))?;
        let p = Placement::parse(spec)?;
        if out.insert(region.to_string(), p).is_some() {
            return Err(PlacementError(format!("region {region} is placed twice")));
        }
    }
    Ok(out)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            replicas: 1,
            task_backoff: DEFAULT_TASK_BACKOFF_SECS
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            task_max_deliver: DEFAULT_TASK_MAX_DELIVER,
            max_ack_pending: 20_000,
            duplicate_window: Duration::from_secs(600),
            audit_max_age: Duration::from_secs(400 * 24 * 3600),
            memory: false,
            home_placement: None,
            region_placement: BTreeMap::new(),
            region_replicas: None,
        }
    }
}

impl Config {
    fn storage(&self) -> StorageType {
        if self.memory {
            StorageType::Memory
        } else {
            StorageType::File
        }
    }

    /// The JetStream placement of the home state.
    fn home(&self) -> Option<stream::Placement> {
        self.home_placement.as_ref().map(Placement::to_nats)
    }

    /// The JetStream placement of `region`'s secret store.
    fn region(&self, region: &str) -> Option<stream::Placement> {
        self.region_placement.get(region).map(Placement::to_nats)
    }

    /// Replicas of a region's secret store.
    fn region_replicas(&self) -> usize {
        self.region_replicas.unwrap_or(self.replicas)
    }

    /// Time before an un-acked task is redelivered the first time.
    pub fn ack_wait(&self) -> Duration {
        self.task_backoff
            .first()
            .copied()
            .unwrap_or(Duration::from_secs(DEFAULT_TASK_BACKOFF_SECS[0]))
    }

    /// How long a task waits for its redelivery in total when its first
    /// [`REDELIVERY_ALLOWANCE_DELIVERIES`] deliveries were lost (each worker
    /// died while running it): the sum of that many redelivery delays, the
    /// last entry repeating. A wave's deadline adds it, so that a crash is
    /// not counted as a task without result while the task can still finish.
    pub fn redelivery_allowance(&self) -> Duration {
        let last = self.task_backoff.last().copied().unwrap_or(self.ack_wait());
        (0..REDELIVERY_ALLOWANCE_DELIVERIES)
            .map(|i| self.task_backoff.get(i).copied().unwrap_or(last))
            .sum()
    }

    /// Whether `c`, a region's task consumer as the server has it, redelivers
    /// as this config says (ack wait, backoff and max deliveries).
    fn redelivers_as(&self, c: &jetstream::consumer::Config) -> bool {
        c.ack_wait == self.ack_wait()
            && c.backoff == self.task_backoff
            && c.max_deliver == self.task_max_deliver
    }
}

/// Where a stream or bucket belongs, for error messages: `the home state`
/// or `region eu`.
fn scope_of(region: Option<&str>) -> String {
    match region {
        Some(r) => format!("region {r}"),
        None => "the home state".to_string(),
    }
}

/// The error of a stream or bucket that could not be created: with a
/// placement, it names the region (or home) and the placement, which is
/// the usual cause (no server with those tags or in that cluster, or too
/// few of them for the replicas: the server answers "insufficient
/// resources" or "no suitable peers").
fn create_error(
    what: String,
    placement: Option<&stream::Placement>,
    replicas: usize,
    region: Option<&str>,
    e: impl std::fmt::Display,
) -> TopologyError {
    match placement {
        None => terr(what, e),
        Some(p) => {
            let shown = Placement {
                cluster: p.cluster.clone(),
                tags: p.tags.clone(),
            };
            terr(
                what,
                format!(
                    "{e} (placement of {}: {shown}, {replicas} replica(s); the supercluster needs at least {replicas} JetStream server(s) {} with room for it)",
                    scope_of(region),
                    match (&p.cluster, p.tags.is_empty()) {
                        (Some(c), true) => format!("in cluster {c}"),
                        (Some(c), false) => format!("in cluster {c} tagged {}", p.tags.join(", ")),
                        (None, _) => format!("tagged {}", p.tags.join(", ")),
                    }
                ),
            )
        }
    }
}

/// Warns when an existing stream was created with another placement: the
/// server keeps it where it is (moving a stream is an operator's decision,
/// `nats stream edit --cluster`).
fn check_placement(name: &str, want: Option<&stream::Placement>, has: Option<&stream::Placement>) {
    let empty =
        |p: Option<&stream::Placement>| p.is_none_or(|p| p.cluster.is_none() && p.tags.is_empty());
    if empty(want) && empty(has) {
        return;
    }
    if want != has {
        tracing::warn!(
            stream = name,
            wanted = ?want,
            existing = ?has,
            "Stream exists with another placement; it stays where it is"
        );
    }
}

async fn stream(
    js: &Context,
    cfg: stream::Config,
    region: Option<&str>,
) -> Result<stream::Stream, TopologyError> {
    let name = cfg.name.clone();
    let placement = cfg.placement.clone();
    let replicas = cfg.num_replicas;
    let s = js.get_or_create_stream(cfg).await.map_err(|e| {
        create_error(
            format!("stream {name}"),
            placement.as_ref(),
            replicas,
            region,
            e,
        )
    })?;
    check_placement(
        &name,
        placement.as_ref(),
        s.cached_info().config.placement.as_ref(),
    );
    Ok(s)
}

async fn bucket(
    js: &Context,
    cfg: kv::Config,
    region: Option<&str>,
) -> Result<kv::Store, TopologyError> {
    let name = cfg.bucket.clone();
    if let Ok(kv) = js.get_key_value(&name).await {
        return Ok(kv);
    }
    // The bucket's stream is created directly rather than with
    // `Context::create_key_value`, which first reads the account info and
    // fails on nats-server 2.9 (its reply lacks fields async-nats requires).
    // Creating it again with the same config is a no-op, so racing processes
    // all succeed.
    let created = js.get_or_create_stream(kv_stream_config(&cfg)).await;
    let placement = cfg.placement.as_ref();
    let replicas = cfg.num_replicas.max(1);
    js.get_key_value(&name).await.map_err(|e| match created {
        Err(c) => create_error(format!("bucket {name}"), placement, replicas, region, c),
        Ok(_) => terr(format!("bucket {name}"), e),
    })
}

/// The stream behind KV bucket `cfg.bucket`, laid out as the KV API lays it
/// out (`KV_<bucket>` on `$KV.<bucket>.>`, history as messages per subject).
pub fn kv_stream_config(cfg: &kv::Config) -> stream::Config {
    stream::Config {
        name: format!("KV_{}", cfg.bucket),
        description: Some(cfg.description.clone()),
        subjects: vec![format!("$KV.{}.>", cfg.bucket)],
        max_messages_per_subject: cfg.history.max(1),
        max_bytes: cfg.max_bytes,
        max_age: cfg.max_age,
        max_message_size: cfg.max_value_size,
        storage: cfg.storage,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        num_replicas: cfg.num_replicas.max(1),
        placement: cfg.placement.clone(),
        discard: DiscardPolicy::New,
        ..Default::default()
    }
}

/// Streams and buckets every keywave process relies on (each region's task
/// stream and secret store come with [`ensure_region`]).
pub async fn ensure_core(js: &Context, cfg: &Config) -> Result<(), TopologyError> {
    for (name, subj, desc) in [
        (
            STREAM_RESULTS,
            "keywave.result.>",
            "keywave rotation results",
        ),
        (
            STREAM_EVENTS,
            "keywave.event.>",
            "keywave campaign events (audit trail)",
        ),
        (
            STREAM_DEADLETTER,
            "keywave.deadletter.>",
            "keywave dead-lettered messages",
        ),
        (
            STREAM_AUDIT,
            "keywave.audit.>",
            "keywave audit trail: hash chains of events and result digests, one per campaign",
        ),
    ] {
        stream(
            js,
            stream::Config {
                name: name.into(),
                description: Some(desc.into()),
                subjects: vec![subj.into()],
                retention: RetentionPolicy::Limits,
                storage: cfg.storage(),
                num_replicas: cfg.replicas,
                placement: cfg.home(),
                duplicate_window: cfg.duplicate_window,
                max_age: cfg.audit_max_age,
                ..Default::default()
            },
            None,
        )
        .await?;
    }
    // Captured in a stream so that no advisory is lost while no
    // coordinator listens (core NATS advisories are fire-and-forget).
    let advisories = stream::Config {
        name: STREAM_ADVISORIES.into(),
        description: Some("max-deliveries advisories of keywave tasks (poison)".into()),
        subjects: vec![ADVISORY_MAX_DELIVERIES.into()],
        retention: RetentionPolicy::Limits,
        storage: cfg.storage(),
        num_replicas: cfg.replicas,
        placement: cfg.home(),
        max_age: cfg.audit_max_age,
        ..Default::default()
    };
    let existing = stream(js, advisories.clone(), None).await?;
    if existing.cached_info().config.subjects != advisories.subjects {
        // Created by a release with one task stream for every region, whose
        // advisories subject names that stream only: widen it to every
        // region's task stream, keeping what the stream holds.
        let updated = stream::Config {
            subjects: advisories.subjects.clone(),
            ..existing.cached_info().config.clone()
        };
        js.update_stream(updated)
            .await
            .map_err(|e| terr(format!("updating stream {STREAM_ADVISORIES}'s subjects"), e))?;
        tracing::info!(
            stream = STREAM_ADVISORIES,
            subject = ADVISORY_MAX_DELIVERIES,
            "Advisory stream now captures the max-deliveries advisories of every region's task stream"
        );
    }
    inventory(js, cfg).await?;
    campaigns(js, cfg).await?;
    consumers(js, cfg).await?;
    // Attestations are a stream so that a worker that restarts mid-wait
    // still finds the ones sent before (bounded per credential).
    stream(
        js,
        stream::Config {
            name: STREAM_ATTEST.into(),
            description: Some("keywave consumer attestations (fingerprints only)".into()),
            subjects: vec!["keywave.attest.>".into()],
            retention: RetentionPolicy::Limits,
            storage: cfg.storage(),
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            duplicate_window: cfg.duplicate_window,
            max_messages_per_subject: ATTEST_PER_SUBJECT,
            max_age: cfg.audit_max_age,
            max_message_size: 4096,
            ..Default::default()
        },
        None,
    )
    .await?;
    // Leak detections and rotation notices (see `crate::detect`).
    detection_streams(js, cfg).await?;
    Ok(())
}

/// Creates the detection and rotation-notice streams (idempotent).
pub async fn detection_streams(js: &Context, cfg: &Config) -> Result<(), TopologyError> {
    use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
    let storage = if cfg.memory {
        StorageType::Memory
    } else {
        StorageType::File
    };
    for (name, subject, desc, per_subject) in [
        (
            crate::detect::STREAM_DETECTIONS,
            "keywave.detect.>",
            "keywave leak detections (webhooks, SIEM, CLI)",
            0,
        ),
        (
            crate::detect::STREAM_ROTATED,
            "keywave.rotated.>",
            "keywave rotation notices: keyed detection fingerprints, latest per credential",
            1,
        ),
    ] {
        let config = stream::Config {
            name: name.into(),
            description: Some(desc.into()),
            subjects: vec![subject.into()],
            retention: RetentionPolicy::Limits,
            storage,
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            duplicate_window: cfg.duplicate_window,
            max_age: cfg.audit_max_age,
            max_messages_per_subject: per_subject,
            max_message_size: (crate::detect::MAX_DETECTION_BYTES * 2) as i32,
            ..Default::default()
        };
        crate::topology::stream(js, config, None).await?;
    }
    Ok(())
}

/// The coordinator lease bucket (one key per lease; no per-message TTL, which
/// nats-server 2.9 lacks: expiry is a timestamp in the value).
pub async fn leases(js: &Context, cfg: &Config) -> Result<kv::Store, TopologyError> {
    bucket(
        js,
        kv::Config {
            bucket: KV_LEASES.into(),
            description: "keywave coordinator leases".into(),
            history: 1,
            storage: cfg.storage(),
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            ..Default::default()
        },
        None,
    )
    .await
}

/// The inventory bucket.
pub async fn inventory(js: &Context, cfg: &Config) -> Result<kv::Store, TopologyError> {
    bucket(
        js,
        kv::Config {
            bucket: KV_INVENTORY.into(),
            description: "keywave credential inventory".into(),
            history: 1,
            storage: cfg.storage(),
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            ..Default::default()
        },
        None,
    )
    .await
}

/// The consumer records bucket.
pub async fn consumers(js: &Context, cfg: &Config) -> Result<kv::Store, TopologyError> {
    bucket(
        js,
        kv::Config {
            bucket: KV_CONSUMERS.into(),
            description: "keywave consumer records (who uses which credential)".into(),
            history: 1,
            storage: cfg.storage(),
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            ..Default::default()
        },
        None,
    )
    .await
}

/// The campaign snapshot bucket.
pub async fn campaigns(js: &Context, cfg: &Config) -> Result<kv::Store, TopologyError> {
    bucket(
        js,
        kv::Config {
            bucket: KV_CAMPAIGNS.into(),
            description: "keywave campaign snapshots and plans".into(),
            history: 1,
            storage: cfg.storage(),
            num_replicas: cfg.replicas,
            placement: cfg.home(),
            ..Default::default()
        },
        None,
    )
    .await
}

/// A region's task stream, its consumer and its secret store bucket,
/// placed on the region's servers when [`Config::region_placement`] names
/// them.
pub async fn ensure_region(
    js: &Context,
    region: &str,
    cfg: &Config,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, kv::Store), TopologyError> {
    let consumer = ensure_region_tasks(js, region, cfg).await?;
    let secrets = bucket(
        js,
        kv::Config {
            bucket: kv_secrets(region),
            description: format!("keywave secret store of region {region} (encrypted)"),
            history: 5,
            storage: cfg.storage(),
            num_replicas: cfg.region_replicas(),
            placement: cfg.region(region),
            ..Default::default()
        },
        Some(region),
    )
    .await?;
    Ok((consumer, secrets))
}

/// The stream config of `region`'s task stream.
fn tasks_stream_config(region: &str, cfg: &Config) -> stream::Config {
    stream::Config {
        name: tasks_stream(region),
        description: Some(format!(
            "keywave rotation tasks of region {region} (work queue)"
        )),
        subjects: vec![crate::subjects::task_region_filter(region)],
        retention: RetentionPolicy::WorkQueue,
        storage: cfg.storage(),
        num_replicas: cfg.region_replicas(),
        placement: cfg.region(region),
        duplicate_window: cfg.duplicate_window,
        max_message_size: crate::codec::MAX_MESSAGE_BYTES as i32 * 2,
        discard: DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Removes the one task stream of earlier releases when it holds no task,
/// so that the per-region streams can take its subjects. Fails, naming what
/// to do, while it still holds tasks: they belong to an earlier release's
/// workers, and deleting them would lose rotations.
async fn retire_legacy_tasks(js: &Context) -> Result<(), TopologyError> {
    let mut legacy = match js.get_stream(LEGACY_STREAM_TASKS).await {
        Ok(s) => s,
        Err(_) => return Ok(()),
    };
    let info = legacy
        .info()
        .await
        .map_err(|e| terr(format!("stream {LEGACY_STREAM_TASKS}"), e))?;
    if info.state.messages > 0 {
        return Err(terr(
            format!("stream {LEGACY_STREAM_TASKS}"),
            format!(
                "the task stream of an earlier release still holds {} task(s); let that release's workers finish them (or purge the stream), then start again: each region now has a task stream of its own",
                info.state.messages
            ),
        ));
    }
    match js.delete_stream(LEGACY_STREAM_TASKS).await {
        Ok(_) => {
            tracing::info!(
                stream = LEGACY_STREAM_TASKS,
                "Removed the empty task stream of an earlier release; each region has a task stream of its own"
            );
            Ok(())
        }
        // Another process removed it first.
        Err(_) if js.get_stream(LEGACY_STREAM_TASKS).await.is_err() => Ok(()),
        Err(e) => Err(terr(format!("removing stream {LEGACY_STREAM_TASKS}"), e)),
    }
}

/// A region's task stream and its workers' consumer (see [`ensure_region`]).
pub async fn ensure_region_tasks(
    js: &Context,
    region: &str,
    cfg: &Config,
) -> Result<jetstream::consumer::Consumer<pull::Config>, TopologyError> {
    crate::ids::validate("region", region).map_err(|e| terr("region", e))?;
    let config = tasks_stream_config(region, cfg);
    let tasks = match js.get_stream(&config.name).await {
        Ok(s) => {
            check_placement(
                &config.name,
                config.placement.as_ref(),
                s.cached_info().config.placement.as_ref(),
            );
            s
        }
        Err(_) => {
            retire_legacy_tasks(js).await?;
            stream(js, config, Some(region)).await?
        }
    };
    let name = worker_consumer(region);
    let mut consumer = tasks
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("keywave workers of region {region}")),
                filter_subject: crate::subjects::task_region_filter(region),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: cfg.ack_wait(),
                max_deliver: cfg.task_max_deliver,
                backoff: cfg.task_backoff.clone(),
                max_ack_pending: cfg.max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| terr(format!("consumer {name}"), e))?;
    let existing = consumer.cached_info().config.clone();
    if !cfg.redelivers_as(&existing) {
        // A consumer created with other redelivery settings (e.g. by an
        // older release, whose ack wait was 30 s) takes this config's: the
        // server (2.9 and later) updates ack wait, backoff and max
        // deliveries of a durable pull consumer in place, keeping its
        // pending tasks. Everything else stays as the server has it.
        let updated = pull::Config {
            ack_wait: cfg.ack_wait(),
            max_deliver: cfg.task_max_deliver,
            backoff: cfg.task_backoff.clone(),
            ..pull::Config::try_from_consumer_config(existing.clone())
                .map_err(|e| terr(format!("consumer {name}"), e))?
        };
        consumer = tasks
            .create_consumer(updated)
            .await
            .map_err(|e| terr(format!("updating consumer {name}'s redelivery settings"), e))?;
        tracing::info!(
            region,
            consumer = %name,
            old_ack_wait = ?existing.ack_wait,
            old_backoff = ?existing.backoff,
            old_max_deliver = existing.max_deliver,
            ack_wait = ?cfg.ack_wait(),
            backoff = ?cfg.task_backoff,
            max_deliver = cfg.task_max_deliver,
            "Updated the region's task consumer to this redelivery schedule"
        );
    }
    Ok(consumer)
}

/// Why a region's consumer or secret store could not be bound.
#[derive(Debug)]
enum BindError {
    /// The stream, consumer or bucket does not exist (yet).
    Missing(String),
    /// Anything else: no answer (a request the NATS user may not send
    /// times out), a server error.
    Failed(TopologyError),
}

fn not_found(e: &async_nats::jetstream::Error) -> bool {
    use async_nats::jetstream::ErrorCode;
    matches!(
        e.error_code(),
        ErrorCode::STREAM_NOT_FOUND | ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// The hint added to a lookup that got no answer: with least-privilege
/// NATS users a denied request is dropped by the server and times out.
fn permission_hint(subject: &str) -> String {
    format!(
        " (no answer: if the server uses per-user permissions, e.g. deploy/nats-secure.conf, this NATS user must be allowed to publish to {subject} and to subscribe to its inbox prefix)"
    )
}

/// Looks up a region's existing task consumer and secret store without
/// creating anything, with exactly the requests a least-privilege worker
/// may send: `$JS.API.CONSUMER.INFO.KEYWAVE_TASKS_<region>.workers-<region>` and
/// `$JS.API.STREAM.INFO.KV_keywave-secrets-<region>`.
async fn bind_region_inner(
    js: &Context,
    region: &str,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, kv::Store), BindError> {
    use async_nats::jetstream::{
        context::{GetStreamErrorKind, KeyValueErrorKind},
        stream::ConsumerErrorKind,
    };
    let name = worker_consumer(region);
    let tasks = tasks_stream(region);
    let consumer = match js
        .get_consumer_from_stream::<pull::Config, _, _>(&name, &tasks)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            return Err(match e.kind() {
                ConsumerErrorKind::JetStream(j) if not_found(&j) => {
                    BindError::Missing(format!("consumer {tasks}/{name}"))
                }
                ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => {
                    BindError::Failed(terr(
                        format!("consumer {name}"),
                        format!(
                            "{e}{}",
                            permission_hint(&format!("$JS.API.CONSUMER.INFO.{tasks}.{name}"))
                        ),
                    ))
                }
                _ => BindError::Failed(terr(format!("consumer {name}"), e)),
            })
        }
    };
    let bucket = kv_secrets(region);
    let stream = format!("KV_{bucket}");
    match js.get_stream(&stream).await {
        Ok(_) => {}
        Err(e) => {
            return Err(match e.kind() {
                GetStreamErrorKind::JetStream(j) if not_found(&j) => {
                    BindError::Missing(format!("bucket {bucket}"))
                }
                GetStreamErrorKind::Request => BindError::Failed(terr(
                    format!("bucket {bucket}"),
                    format!(
                        "{e}{}",
                        permission_hint(&format!("$JS.API.STREAM.INFO.{stream}"))
                    ),
                )),
                _ => BindError::Failed(terr(format!("bucket {bucket}"), e)),
            })
        }
    }
    let store = js.get_key_value(&bucket).await.map_err(|e| {
        BindError::Failed(match e.kind() {
            KeyValueErrorKind::GetBucket => terr(
                format!("bucket {bucket}"),
                format!(
                    "{e}{}",
                    permission_hint(&format!("$JS.API.STREAM.INFO.{stream}"))
                ),
            ),
            _ => terr(format!("bucket {bucket}"), e),
        })
    })?;
    Ok((consumer, store))
}

/// A region's task consumer and secret store, looked up without creating
/// anything (see [`bind_or_ensure_region`]). Fails when either is missing.
pub async fn bind_region(
    js: &Context,
    region: &str,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, kv::Store), TopologyError> {
    crate::ids::validate("region", region).map_err(|e| terr("region", e))?;
    bind_region_inner(js, region).await.map_err(|e| match e {
        BindError::Missing(what) => terr(
            what,
            "does not exist: create the topology first (start the coordinator with --regions, which creates each region's consumer and secret store)",
        ),
        BindError::Failed(e) => e,
    })
}

/// How a worker gets its region's consumer and secret store: bind to the
/// existing ones first (a least-privilege worker may only look them up), and
/// only when one is missing create the whole topology ([`ensure_core`] and
/// [`ensure_region`]), as a single-user development setup needs. A lookup
/// that fails for any other reason (no answer because the user lacks
/// permission, a server error) is returned as is, with a hint.
pub async fn bind_or_ensure_region(
    js: &Context,
    region: &str,
    cfg: &Config,
) -> Result<(jetstream::consumer::Consumer<pull::Config>, kv::Store), TopologyError> {
    crate::ids::validate("region", region).map_err(|e| terr("region", e))?;
    match bind_region_inner(js, region).await {
        Ok(bound) => Ok(bound),
        Err(BindError::Missing(what)) => {
            tracing::info!(region, missing = %what, "Region topology incomplete; creating it");
            let created = match ensure_core(js, cfg).await {
                Ok(()) => ensure_region(js, region, cfg).await,
                Err(e) => Err(e),
            };
            created.map_err(|e| TopologyError {
                what: what.clone(),
                detail: format!(
                    "does not exist, and creating it failed ({e}); with least-privilege NATS users only the coordinator creates the topology: start keywave-coordinator --regions {region} first"
                ),
            })
        }
        Err(BindError::Failed(e)) => Err(e),
    }
}

/// A JetStream context whose publishes block (rather than fail) once 5,000
/// publish acks are outstanding, so memory stays bounded under load.
pub fn context(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(5_000)
        .backpressure_on_inflight(true)
        .build(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parses_tags_and_cluster() {
        assert_eq!(
            Placement::parse("cluster=eu+region:eu+disk:ssd").unwrap(),
            Placement {
                cluster: Some("eu".into()),
                tags: vec!["region:eu".into(), "disk:ssd".into()],
            }
        );
        assert_eq!(
            Placement::parse("cluster=home").unwrap().to_string(),
            "cluster=home"
        );
        for bad in [
            "",
            "region:eu+",
            "cluster=a+cluster=b",
            "zone=x",
            "cluster=",
            "a b",
        ] {
            assert!(Placement::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn region_placements_parse_per_region() {
        let m = parse_region_placements("eu=region:eu, us=cluster=us+region:us").unwrap();
        assert_eq!(m["eu"].tags, vec!["region:eu".to_string()]);
        assert_eq!(m["us"].cluster.as_deref(), Some("us"));
        assert!(parse_region_placements("").unwrap().is_empty());
        assert!(parse_region_placements("eu").is_err());
        assert!(parse_region_placements("eu=region:eu,eu=region:us").is_err());
        assert!(parse_region_placements("e u=region:eu").is_err());
    }

    #[test]
    fn placements_go_to_home_and_regions() {
        let cfg = Config {
            replicas: 3,
            region_replicas: Some(1),
            home_placement: Some(Placement::parse("cluster=home").unwrap()),
            region_placement: parse_region_placements("eu=region:eu").unwrap(),
            ..Default::default()
        };
        assert_eq!(cfg.home().unwrap().cluster.as_deref(), Some("home"));
        assert_eq!(
            cfg.region("eu").unwrap().tags,
            vec!["region:eu".to_string()]
        );
        assert!(cfg.region("us").is_none());
        assert_eq!(cfg.region_replicas(), 1);
        assert_eq!(Config::default().region_replicas(), 1);
        assert!(Config::default().home().is_none());
    }

    #[test]
    fn each_region_has_a_task_stream_of_its_own() {
        assert_eq!(tasks_stream("eu"), "KEYWAVE_TASKS_eu");
        assert_eq!(tasks_stream_region("KEYWAVE_TASKS_eu"), Some("eu"));
        assert_eq!(tasks_stream_region(LEGACY_STREAM_TASKS), None);
        assert_eq!(tasks_stream_region("KEYWAVE_TASKS_"), None);
        assert_eq!(tasks_stream_region("KEYWAVE_RESULTS"), None);
        let cfg = Config {
            replicas: 3,
            region_replicas: Some(1),
            region_placement: parse_region_placements("eu=region:eu").unwrap(),
            ..Default::default()
        };
        let eu = tasks_stream_config("eu", &cfg);
        assert_eq!(eu.subjects, vec!["keywave.task.eu.>".to_string()]);
        assert_eq!(eu.num_replicas, 1);
        assert_eq!(eu.placement.unwrap().tags, vec!["region:eu".to_string()]);
        assert!(tasks_stream_config("us", &cfg).placement.is_none());
    }
}
