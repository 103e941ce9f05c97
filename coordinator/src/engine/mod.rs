//! The campaign engine. [`Coordinator::start`] creates the JetStream topology;
//! [`Coordinator::run`] resumes every unfinished campaign found in the
//! `keywave-campaigns` bucket and serves the operator API until shutdown.
//! Each campaign has one owner task (see `driver`), the only writer of its
//! state: results, operator requests, approvals, timers and lease changes
//! reach it as messages ([`machine::Msg`]) over a bounded channel; what to do
//! is decided by the pure [`machine::Machine::step`] and carried out by the
//! owner (publish a wave, events, snapshot). API handlers send messages and
//! await a reply; readers see the snapshots the owner publishes.
//!
//! Keys of `keywave-campaigns`: `campaign.<cid>` (the [`CampaignStatus`]
//! snapshot), `plan.<cid>` and `plan.<cid>.<n>` (the plan, see [`plan`]) and
//! `control.<cid>` (the last operator request: pause, resume or abort; every
//! coordinator watches these keys, so a request reaches the coordinator that
//! drives the campaign whichever coordinator answered it).
//!
//! Waves are numbered from 0 (wave 0 is the canary).
//!
//! Only the holder of the coordinator lease (see [`crate::lease`]) acts: it
//! handles the control verbs of the API, drives the campaigns and handles
//! poison tasks, for one *term*. Every coordinator, standbys included,
//! answers the read verbs (see [`api`]) for the life of its process, so the
//! API never goes dark while one runs. A standby polls the lease and starts a
//! term when it gets it. A term
//! ends on shutdown (snapshots saved, lease released: the handover), when the
//! lease is lost (nothing saved: somebody else drives now), or when the
//! coordinator is killed (in tests, [`Coordinator::kill_switch`]).
//! Snapshots are written with compare-and-set on their revision, so even a
//! stale holder that missed the loss of its lease cannot overwrite them.

pub mod api;
pub mod book;
pub mod decide;
mod driver;
pub mod events;
pub mod fault;
pub mod locks;
pub mod machine;
pub mod plan;
mod poison;
pub mod preflight;
pub(crate) mod task_streams;

use crate::inventory;
use crate::lease::{self, Lease};
use async_nats::jetstream::{self, kv, Context};
use futures::StreamExt;
use keywave_common::{
    api::{ApproveRequest, CampaignStatus, CampaignSummary, StartRequest, WaveStatus},
    ids, now_ms, planner,
    topology::{self, TopologyError},
    wire::{CampaignState, EventKind},
};
use plan::{PlanEntry, PlanManifest};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

/// Most waves a campaign may have (bounds the snapshot's size).
pub const MAX_WAVES: usize = 1_000;
/// How long after a wave's deadline (publish time + task timeout) results are
/// still waited for, to absorb clock skew and the last in-flight publishes.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(2);
/// How long a published task may wait in its region's queue before a worker
/// starts it (at least the task timeout). Past it a worker refuses the task;
/// in practice the coordinator withdraws a decided wave's unstarted tasks
/// long before.
pub const START_WINDOW: Duration = Duration::from_secs(10 * 60);

/// A task's start deadline after its publication, for a campaign whose task
/// timeout is `task_timeout_ms`.
pub fn start_window_ms(task_timeout_ms: u64) -> u64 {
    task_timeout_ms.max(START_WINDOW.as_millis() as u64)
}
/// Un-awaited task publish acks per campaign.
pub const TASK_ACK_WINDOW: usize = 2_048;
/// How long shutdown waits for drivers to save their snapshots.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a pause, resume or abort request waits for the driver to act
/// before replying with the status as it is.
pub const CONTROL_WAIT: Duration = Duration::from_secs(3);
/// API requests handled concurrently.
pub const API_CONCURRENCY: usize = 32;
/// First and longest wait before loading the campaigns again at the start of
/// a term, when JetStream could not serve them (see [`Engine::term`]).
const LOAD_RETRY_FIRST: Duration = Duration::from_millis(250);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(2);

/// Settings of a coordinator.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// JetStream topology (replicas, storage) to ensure at start.
    pub topology: topology::Config,
    /// Name of this coordinator in logs and control records.
    pub coordinator_id: String,
    /// How often a campaign's progress snapshot is saved while results flow
    /// (state changes are saved at once). Default 1s.
    pub progress_interval: Duration,
    /// Lease timings: how fast a standby takes over from a dead coordinator.
    pub lease: lease::Config,
    /// Fault injection (none by default).
    pub faults: fault::Faults,
    /// Signs every task and rollback task (Ed25519, see
    /// `keywave_common::sign`); None publishes them unsigned.
    pub signer: Option<keywave_common::sign::TaskSigner>,
    /// Counters and lease state shown on `/metrics` (see [`crate::metrics`]).
    pub metrics: Arc<crate::metrics::CoordinatorMetrics>,
    /// How long each consumer agent has to answer the pre-flight ping before
    /// a wave (see [`preflight`]). Default 2s.
    pub preflight_timeout: Duration,
    /// Region liveness: how long a region a wave needs may have no live
    /// worker before the campaign pauses (see [`crate::regions`]).
    pub region_liveness: crate::regions::Config,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        CoordinatorOptions {
            topology: topology::Config::default(),
            coordinator_id: ids::random_id("coordinator"),
            progress_interval: Duration::from_secs(1),
            lease: lease::Config::default(),
            faults: fault::Faults::none(),
            signer: None,
            metrics: crate::metrics::CoordinatorMetrics::new(),
            preflight_timeout: preflight::DEFAULT_TIMEOUT,
            region_liveness: crate::regions::Config::default(),
        }
    }
}

/// Why a coordinator could not start or keep running.
#[derive(Debug, Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator option {field}: {message}")]
    Options {
        field: &'static str,
        message: String,
    },
    #[error("invalid coordinator option {field}: {source}", field = source.field())]
    Lease {
        #[from]
        source: lease::ConfigError,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("subscribing to the operator API: {0}")]
    Subscribe(String),
    #[error("loading campaigns from the keywave-campaigns bucket: {0}")]
    Load(String),
    #[error("the NATS connection closed")]
    Disconnected,
    /// Another live process runs with this coordinator id (it took the lease
    /// as this id): this one stops for good instead of fencing it in turn.
    #[error(transparent)]
    DuplicateId(lease::LeaseError),
}

/// Why an API request was refused; the class goes on the wire.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    /// A control request while no coordinator is active (a take-over).
    #[error("{0}")]
    Takeover(String),
}

impl RequestError {
    /// The `ApiError::class` of this error.
    pub fn class(&self) -> &'static str {
        match self {
            RequestError::BadRequest(_) => "bad_request",
            RequestError::NotFound(_) => "not_found",
            RequestError::Conflict(_) => "conflict",
            RequestError::Internal(_) => "internal",
            RequestError::Takeover(_) => keywave_common::api::CLASS_TAKEOVER,
        }
    }
}

fn internal(e: impl std::fmt::Display) -> RequestError {
    RequestError::Internal(e.to_string())
}

/// An operator request, stored under `control.<cid>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Pause,
    Resume,
    Abort,
    /// Roll back the current wave of a paused continuity campaign
    /// (`campaign.rollback`, see [`Engine::rollback`]).
    Rollback,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ControlRecord {
    action: ControlAction,
    at_ms: u64,
    by: String,
}

/// Two selected credentials naming the same login (principal at one
/// endpoint of one region) would both be rotated and both "proven", leaving
/// the login with two valid secrets: such a selection is refused, naming both
/// (records imported separately can collide; one import refuses it itself).
fn refuse_shared_logins(entries: &[PlanEntry]) -> Result<(), RequestError> {
    let mut seen: HashMap<(&str, &str, &str), &str> = HashMap::with_capacity(entries.len());
    for e in entries {
        let login = (e.region.as_str(), e.endpoint.as_str(), e.principal.as_str());
        if let Some(first) = seen.insert(login, e.id.as_str()) {
            return Err(RequestError::BadRequest(format!(
                "credentials {first} and {} name the same login (principal {:?} at endpoint {} in region {}); keep one inventory record per login",
                e.id, e.principal, e.endpoint, e.region
            )));
        }
    }
    Ok(())
}

pub(crate) fn snapshot_key(cid: &str) -> String {
    format!("campaign.{cid}")
}

fn control_key(cid: &str) -> String {
    format!("control.{cid}")
}

/// Messages queued for one campaign's owner at most (results wait in
/// JetStream beyond that).
pub const OWNER_CHANNEL: usize = 1_024;

/// How the rest of the coordinator reaches a campaign it drives: messages to
/// the campaign's owner task (see `driver`), and the status snapshots the
/// owner publishes. Nothing here mutates the campaign.
pub(crate) struct Handle {
    pub cid: String,
    tx: mpsc::Sender<machine::Msg>,
    snapshot: watch::Receiver<Arc<CampaignStatus>>,
    /// Cancelled when the campaign's owner ends (or the coordinator stops).
    pub stop: CancellationToken,
}

impl Handle {
    /// The status as the owner last published it.
    pub fn status(&self) -> CampaignStatus {
        (**self.snapshot.borrow()).clone()
    }

    /// Queues a message for the owner (waits while the queue is full).
    pub async fn send(&self, msg: machine::Msg) -> Result<(), machine::Msg> {
        self.tx.send(msg).await.map_err(|e| e.0)
    }

    /// Sends the message `make` builds around a reply and waits for the
    /// owner's answer until `until`; past it (or when the owner is gone),
    /// the status as last published.
    pub async fn request(
        &self,
        make: impl FnOnce(machine::Reply) -> machine::Msg,
        until: tokio::time::Instant,
    ) -> CampaignStatus {
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::timeout_at(until, self.send(make(machine::Reply(Some(tx))))).await;
        if let Ok(Ok(())) = sent {
            if let Ok(Ok(status)) = tokio::time::timeout_at(until, rx).await {
                return status;
            }
        }
        self.status()
    }
}

/// What every term of a coordinator shares.
#[derive(Clone)]
struct Shared {
    client: async_nats::Client,
    js: Context,
    opts: CoordinatorOptions,
    inventory: kv::Store,
    campaigns: kv::Store,
    results: jetstream::stream::Stream,
    tasks: Arc<task_streams::TaskStreams>,
    advisories: jetstream::stream::Stream,
    leases: kv::Store,
    /// This process's id and instance nonce in the lease.
    claimant: Arc<lease::Claimant>,
    /// Which regions have live workers (followed for the whole process, so
    /// a standby that takes over knows at once).
    regions: crate::regions::Tracker,
}

/// One term of an active coordinator, shared by the API server, the drivers,
/// the control watcher and the poison handler.
pub(crate) struct Engine {
    pub client: async_nats::Client,
    pub js: Context,
    pub opts: CoordinatorOptions,
    pub inventory: kv::Store,
    pub campaigns: kv::Store,
    pub results: jetstream::stream::Stream,
    /// Each region's task stream.
    pub tasks: Arc<task_streams::TaskStreams>,
    pub advisories: jetstream::stream::Stream,
    /// Which regions have live workers (see [`crate::regions`]).
    pub regions: crate::regions::Tracker,
    registry: Mutex<HashMap<String, Arc<Handle>>>,
    /// The credentials held by this term's unfinished campaigns.
    pub locks: locks::Locks,
    pub tracker: TaskTracker,
    /// Stops the drivers (they save their snapshots unless `halted`).
    pub stop: CancellationToken,
    pub lease: Arc<Lease>,
    /// Cancelled once this coordinator may not act any more (lease lost, a
    /// snapshot written by somebody else, killed): drivers stop without
    /// publishing or saving anything.
    pub halted: CancellationToken,
    /// Cancelled by an injected crash: the coordinator stops as if killed.
    pub crashed: CancellationToken,
    /// Random per term: names the term's consumers.
    pub term: String,
}

/// Why a term ended.
enum TermEnd {
    Shutdown,
    Killed,
    Lost,
    Failed(CoordinatorError),
}

/// A keywave coordinator. See the module documentation.
pub struct Coordinator {
    shared: Shared,
    /// The lease taken in [`Coordinator::start`] when it was free.
    first: Option<Lease>,
    /// The API subscription, taken in [`Coordinator::start`] (active or not),
    /// so that requests sent once `start` returned wait for
    /// [`Coordinator::run`] instead of finding no responder.
    api: async_nats::Subscriber,
    kill: CancellationToken,
}

impl Coordinator {
    /// Connects the coordinator to JetStream, creating streams and buckets
    /// that do not exist yet, and takes the lease if it is free.
    pub async fn start(
        client: async_nats::Client,
        opts: CoordinatorOptions,
    ) -> Result<Coordinator, CoordinatorError> {
        if opts.coordinator_id.trim().is_empty() {
            return Err(CoordinatorError::Options {
                field: "coordinator_id",
                message: "must not be empty".into(),
            });
        }
        if opts.progress_interval.is_zero() {
            return Err(CoordinatorError::Options {
                field: "progress_interval",
                message: "must be positive".into(),
            });
        }
        opts.lease.validate()?;
        let js = topology::context(client.clone());
        opts.metrics.attach(client.clone(), opts.topology.clone());
        topology::ensure_core(&js, &opts.topology).await?;
        let inventory = topology::inventory(&js, &opts.topology).await?;
        let campaigns = topology::campaigns(&js, &opts.topology).await?;
        let leases = topology::leases(&js, &opts.topology).await?;
        let stream = |name: &'static str| {
            let js = js.clone();
            async move {
                js.get_stream(name).await.map_err(|e| TopologyError {
                    what: format!("stream {name}"),
                    detail: e.to_string(),
                })
            }
        };
        let results = stream(topology::STREAM_RESULTS).await?;
        let tasks = Arc::new(task_streams::TaskStreams::new(
            js.clone(),
            opts.topology.clone(),
        ));
        let advisories = stream(topology::STREAM_ADVISORIES).await?;
        let claimant = Arc::new(lease::Claimant::new(
            opts.coordinator_id.clone(),
            ids::random_id("instance"),
        ));
        if opts.region_liveness.pause_after.is_zero() {
            return Err(CoordinatorError::Options {
                field: "region_liveness.pause_after",
                message: "must be positive".into(),
            });
        }
        let regions = crate::regions::Tracker::start(
            client.clone(),
            opts.region_liveness,
            &[],
            opts.metrics.clone(),
        );
        let shared = Shared {
            regions,
            client: client.clone(),
            js,
            claimant,
            opts,
            inventory,
            campaigns,
            results,
            tasks,
            advisories,
            leases,
        };
        let api = api::subscribe(&client).await?;
        let first =
            match Lease::try_acquire(&shared.leases, shared.opts.lease, &shared.claimant).await {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => {
                    shared.opts.metrics.set_role(crate::metrics::Role::Standby);
                    None
                }
                Err(e @ lease::LeaseError::Duplicate { .. }) => {
                    return Err(CoordinatorError::DuplicateId(e))
                }
                Err(e) => {
                    warn!(error = %e, "Cannot read the coordinator lease yet; run() keeps trying");
                    None
                }
            };
        if first.is_some() {
            shared.opts.metrics.set_role(crate::metrics::Role::Active);
        }
        Ok(Coordinator {
            shared,
            first,
            api,
            kill: CancellationToken::new(),
        })
    }

    /// This coordinator's id.
    pub fn id(&self) -> &str {
        &self.shared.opts.coordinator_id
    }

    /// Whether [`Coordinator::start`] got the lease (it is active from the
    /// start rather than standing by).
    pub fn is_active(&self) -> bool {
        self.first.is_some()
    }

    /// A token that, when cancelled, stops this coordinator as a killed
    /// process would: nothing more is published or saved and the lease is
    /// not released (another coordinator takes over once it expires). For
    /// tests of crashes and fail-over.
    pub fn kill_switch(&self) -> CancellationToken {
        self.kill.clone()
    }

    /// Serves the read verbs of the API at once (see [`api`]); waits for the
    /// lease, then resumes every unfinished campaign and serves the control
    /// verbs too until `shutdown` is cancelled (drivers then save their
    /// snapshots, waiting at most [`SHUTDOWN_GRACE`], and the lease is
    /// released so a standby takes over at once). Losing the lease ends the
    /// term and this coordinator stands by again; losing it to another live
    /// process with the same coordinator id ends it for good
    /// ([`CoordinatorError::DuplicateId`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), CoordinatorError> {
        let Coordinator {
            shared,
            mut first,
            api,
            kill,
        } = self;
        let id = shared.opts.coordinator_id.clone();
        info!(coordinator = %id, instance = %shared.claimant.instance, "Coordinator starting");
        let server = api::Server::new(
            shared.client.clone(),
            shared.campaigns.clone(),
            shared.leases.clone(),
            id.clone(),
            shared.claimant.instance.clone(),
        );
        // The API serves for the life of this call: dropped (as by SIGKILL)
        // when it returns, drained first on a clean stop.
        let serving = tokio::spawn(api::serve(server.clone(), api));
        let api_gone = CancellationToken::new();
        let _abort = AbortOnDrop(serving.abort_handle());
        let _watch = {
            let gone = api_gone.clone();
            let ended = server.ended();
            AbortOnDrop(
                tokio::spawn(async move {
                    ended.cancelled().await;
                    gone.cancel();
                })
                .abort_handle(),
            )
        };
        loop {
            let lease = match first.take() {
                Some(x) => x,
                None => {
                    shared.opts.metrics.set_role(crate::metrics::Role::Standby);
                    let acquiring =
                        Lease::acquire(&shared.leases, shared.opts.lease, &shared.claimant, &kill);
                    let lease = tokio::select! {
                        l = acquiring => l,
                        _ = shutdown.cancelled() => Ok(None),
                        _ = api_gone.cancelled() => {
                            return Err(CoordinatorError::Disconnected);
                        }
                    };
                    match lease {
                        Ok(Some(lease)) => lease,
                        Ok(None) => {
                            server.shut(CONTROL_WAIT).await;
                            info!(coordinator = %id, "Coordinator stopped while standing by");
                            return Ok(());
                        }
                        Err(e) => {
                            error!(coordinator = %id, error = %e, "Another process runs with this coordinator id: stopping");
                            return Err(CoordinatorError::DuplicateId(e));
                        }
                    }
                }
            };
            shared.opts.metrics.set_role(crate::metrics::Role::Active);
            let engine = Arc::new(Engine::new(&shared, Arc::new(lease)));
            match engine
                .clone()
                .term(&server, &shutdown, &kill, &api_gone)
                .await
            {
                TermEnd::Shutdown => {
                    engine.lease.release().await;
                    info!(coordinator = %id, "Coordinator stopped");
                    return Ok(());
                }
                TermEnd::Killed => {
                    warn!(coordinator = %id, "Coordinator killed");
                    return Ok(());
                }
                TermEnd::Lost => match engine.lease.lost_reason() {
                    Some(e @ lease::LeaseError::Duplicate { .. }) => {
                        server.shut(CONTROL_WAIT).await;
                        error!(coordinator = %id, error = %e, "Another process runs with this coordinator id: stopping for good");
                        return Err(CoordinatorError::DuplicateId(e));
                    }
                    _ => warn!(coordinator = %id, "Lease lost: standing by"),
                },
                TermEnd::Failed(e) => {
                    engine.lease.release().await;
                    return Err(e);
                }
            }
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    fn new(shared: &Shared, lease: Arc<Lease>) -> Engine {
        Engine {
            client: shared.client.clone(),
            js: shared.js.clone(),
            opts: shared.opts.clone(),
            inventory: shared.inventory.clone(),
            campaigns: shared.campaigns.clone(),
            results: shared.results.clone(),
            tasks: shared.tasks.clone(),
            advisories: shared.advisories.clone(),
            regions: shared.regions.clone(),
            registry: Mutex::new(HashMap::new()),
            locks: locks::Locks::default(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            lease,
            halted: CancellationToken::new(),
            crashed: CancellationToken::new(),
            term: format!("{:08x}", rand::random::<u32>()),
        }
    }

    /// One term as the active coordinator.
    async fn term(
        self: Arc<Self>,
        server: &api::Server,
        shutdown: &CancellationToken,
        kill: &CancellationToken,
        api_gone: &CancellationToken,
    ) -> TermEnd {
        info!(coordinator = %self.opts.coordinator_id, lease_revision = self.lease.revision(), "Active: driving campaigns");
        let keep = {
            let (lease, stop) = (self.lease.clone(), self.stop.clone());
            tokio::spawn(async move { lease.keep(&stop).await })
        };
        let api_stop = CancellationToken::new();
        let started = async {
            // The campaigns are loaded through new consumers on the
            // keywave-campaigns bucket. Right after the failure that made
            // this coordinator active (a home server lost with the old
            // leader's connection, say) JetStream may not create them for a
            // few seconds: that is retried while the lease holds, never the
            // end of the process. Nothing is driven before the load succeeds
            // (both scans come before the first campaign is resumed).
            let mut delay = LOAD_RETRY_FIRST;
            let watcher = loop {
                let loaded = async {
                    let watcher = control_watch(self.clone()).await?;
                    self.resume_all().await?;
                    Ok(watcher)
                }
                .await;
                match loaded {
                    Ok(watcher) => break watcher,
                    Err(e @ CoordinatorError::Load(_)) => {
                        warn!(coordinator = %self.opts.coordinator_id, error = %e, retry_in = ?delay, "Cannot load the campaigns yet; retrying");
                    }
                    Err(e) => return Err(e),
                }
                let interrupted = tokio::select! {
                    _ = tokio::time::sleep(delay) => None,
                    _ = shutdown.cancelled() => Some(TermEnd::Shutdown),
                    _ = kill.cancelled() => Some(TermEnd::Killed),
                    _ = self.crashed.cancelled() => Some(TermEnd::Killed),
                    _ = self.lease.lost().cancelled() => Some(TermEnd::Lost),
                    _ = self.halted.cancelled() => Some(TermEnd::Lost),
                };
                if let Some(end) = interrupted {
                    return Ok(Err(end));
                }
                delay = (delay * 2).min(LOAD_RETRY_MAX);
            };
            self.tracker.spawn(watcher);
            self.tracker.spawn(poison::run(self.clone()));
            // The audit trail: events and result digests, hash-chained (crate::audit).
            self.tracker.spawn(crate::audit::follow(
                self.js.clone(),
                self.opts.coordinator_id.clone(),
                self.opts.signer.as_ref().map(|s| s.shared_key()),
                self.stop.clone(),
                self.halted.clone(),
            ));
            // Control verbs reach this term from now on: on the active
            // coordinator's subject (forwarded by standbys) and on the API
            // subject itself.
            let active = api::subscribe_active(&self.client).await?;
            server.set_active(Some(self.clone()));
            info!(coordinator = %self.opts.coordinator_id, "Serving the control verbs of the API");
            Ok::<_, CoordinatorError>(Ok(active))
        }
        .await;
        // `Ok(Some(end))`: the term ended while the campaigns were loading.
        let (started, active) = match started {
            Ok(Ok(active)) => (Ok(None), Some(active)),
            Ok(Err(end)) => (Ok(Some(end)), None),
            Err(e) => (Err(e), None),
        };
        // Boxed so that it can be dropped (the subscription with it) before
        // the drivers are waited for.
        let mut serving = Box::pin(async {
            match active {
                Some(sub) => api::serve_active(self.clone(), sub, api_stop.clone()).await,
                None => Ok(()),
            }
        });
        let end = match started {
            Err(e) => TermEnd::Failed(e),
            Ok(Some(end)) => end,
            Ok(None) => tokio::select! {
                r = &mut serving => match r {
                    Ok(()) => TermEnd::Shutdown,
                    Err(e) => TermEnd::Failed(e),
                },
                _ = api_gone.cancelled() => TermEnd::Failed(CoordinatorError::Disconnected),
                _ = shutdown.cancelled() => TermEnd::Shutdown,
                _ = kill.cancelled() => TermEnd::Killed,
                _ = self.crashed.cancelled() => TermEnd::Killed,
                _ = self.lease.lost().cancelled() => TermEnd::Lost,
                _ = self.halted.cancelled() => TermEnd::Lost,
            },
        };
        // An injected crash also halts the term: whichever the select saw
        // first, it ends as killed.
        let end = match end {
            TermEnd::Lost if self.crashed.is_cancelled() => TermEnd::Killed,
            end => end,
        };
        match end {
            TermEnd::Shutdown | TermEnd::Failed(_) => {
                // The process stops: the requests in hand are answered
                // before the drivers stop; other coordinators answer the
                // next ones.
                api_stop.cancel();
                let _ = tokio::join!(
                    tokio::time::timeout(CONTROL_WAIT, &mut serving),
                    server.shut(CONTROL_WAIT)
                );
                server.set_active(None);
            }
            // As a dead or fenced process: act no more, save nothing.
            TermEnd::Killed | TermEnd::Lost => {
                server.set_active(None);
                self.halted.cancel();
            }
        }
        drop(serving);
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                grace = ?SHUTDOWN_GRACE,
                "Shutdown grace period ran out before every campaign saved its snapshot; the next coordinator replays their results"
            );
        }
        keep.abort();
        end
    }

    /// The fence, before anything is published or decided: fails once this
    /// coordinator may not act any more.
    pub(crate) async fn fence(&self) -> Result<(), lease::LeaseError> {
        if self.halted.is_cancelled() {
            return Err(lease::LeaseError::Expired);
        }
        match self.lease.check().await {
            Ok(()) => Ok(()),
            Err(e @ lease::LeaseError::Unavailable(_)) => Err(e),
            Err(e) => {
                self.halted.cancel();
                Err(e)
            }
        }
    }
}

/// Subscribes to `control.*` and returns the task forwarding requests to the
/// drivers of this coordinator (subscribed before campaigns are resumed, so
/// no request falls between the two).
async fn control_watch(
    engine: Arc<Engine>,
) -> Result<impl std::future::Future<Output = ()>, CoordinatorError> {
    // Without a watch yet (JetStream may refuse new consumers for a while
    // after losing a server) the loop below keeps trying: requests for the
    // campaigns this coordinator drives reach their drivers directly (see
    // `Engine::control`), and those recorded before come with the resume.
    let first = match engine.campaigns.watch("control.*").await {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "Cannot watch campaign control requests yet; retrying in the background");
            None
        }
    };
    Ok(async move {
        let mut watch = first;
        loop {
            let mut w = match watch.take() {
                Some(w) => w,
                None => match engine.campaigns.watch("control.*").await {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(error = %e, "Cannot watch campaign control requests; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            _ = engine.stop.cancelled() => return,
                        }
                    }
                },
            };
            loop {
                let entry = tokio::select! {
                    e = w.next() => e,
                    _ = engine.stop.cancelled() => return,
                };
                match entry {
                    None => break,
                    Some(Err(e)) => {
                        warn!(error = %e, "Control watch failed; re-subscribing");
                        break;
                    }
                    Some(Ok(entry)) => {
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        let Some(cid) = entry.key.strip_prefix("control.") else {
                            continue;
                        };
                        let Ok(rec) = serde_json::from_slice::<ControlRecord>(&entry.value) else {
                            warn!(key = %entry.key, "Ignoring malformed control record");
                            continue;
                        };
                        if let Some(h) = engine.handle(cid) {
                            info!(campaign = %cid, action = ?rec.action, by = %rec.by, "Operator request");
                            let msg = machine::Msg::Control {
                                action: rec.action,
                                revision: entry.revision,
                                reply: machine::Reply::none(),
                            };
                            // Not awaited here: one busy campaign must not
                            // hold up the requests of the others (the
                            // revision puts late deliveries in order).
                            engine.tracker.spawn(async move {
                                let _ = h.send(msg).await;
                            });
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = engine.stop.cancelled() => return,
            }
        }
    })
}

impl Engine {
    pub(crate) fn handle(&self, cid: &str) -> Option<Arc<Handle>> {
        self.registry
            .lock()
            .expect("registry lock")
            .get(cid)
            .cloned()
    }

    /// A campaign ended: it drives nothing and holds no credential any more.
    pub(crate) fn forget(&self, cid: &str) {
        self.registry.lock().expect("registry lock").remove(cid);
        self.locks.release_campaign(cid);
    }

    /// Registers a campaign and spawns its owner. `pending` is an operator
    /// request (with its control record's revision) that arrived while no
    /// coordinator was driving it.
    fn spawn_driver(
        self: &Arc<Self>,
        status: CampaignStatus,
        revision: u64,
        manifest: PlanManifest,
        pending: Option<(ControlAction, u64)>,
    ) {
        let cid = status.campaign_id.clone();
        let (tx, rx) = mpsc::channel(OWNER_CHANNEL);
        self.regions.want(status.regions.keys().map(String::as_str));
        let machine = machine::Machine::new(status)
            .with_pause_after(self.regions.config().pause_after)
            .with_redelivery_allowance(self.opts.topology.redelivery_allowance());
        // Counters of unfinished waves start from zero: the results replay
        // rebuilds them.
        let (published, snapshot) = watch::channel(Arc::new(machine.status().clone()));
        let handle = Arc::new(Handle {
            cid: cid.clone(),
            tx,
            snapshot,
            stop: self.stop.child_token(),
        });
        if let Some((action, revision)) = pending {
            // The channel is new and empty: this cannot fail.
            let _ = handle.tx.try_send(machine::Msg::Control {
                action,
                revision,
                reply: machine::Reply::none(),
            });
        }
        {
            let mut reg = self.registry.lock().expect("registry lock");
            if reg.contains_key(&cid) {
                return;
            }
            reg.insert(cid, handle.clone());
        }
        let owner = driver::Owner {
            engine: self.clone(),
            h: handle.clone(),
            manifest,
            snapshot_rev: revision,
            published,
        };
        // A root span per campaign (per process driving it): its waves are
        // children, and the workers' task spans theirs.
        let span = tracing::info_span!(parent: None, "campaign", campaign = %handle.cid);
        self.tracker.spawn(tracing::Instrument::instrument(
            driver::run(owner, machine, rx),
            span,
        ));
    }

    /// Loads every snapshot and drives the campaigns that are not finished.
    async fn resume_all(self: &Arc<Self>) -> Result<(), CoordinatorError> {
        let mut snapshots = Vec::new();
        crate::kvscan::for_each_latest_small(&self.campaigns, "campaign.*", |e| {
            match serde_json::from_slice::<CampaignStatus>(&e.value) {
                Ok(s) => snapshots.push((s, e.revision)),
                Err(err) => {
                    warn!(key = %e.key, error = %err, "Skipping unreadable campaign snapshot")
                }
            }
        })
        .await
        .map_err(|e| CoordinatorError::Load(e.to_string()))?;
        let mut controls = HashMap::new();
        crate::kvscan::for_each_latest_small(&self.campaigns, "control.*", |e| {
            if let Ok(rec) = serde_json::from_slice::<ControlRecord>(&e.value) {
                let cid = e.key.trim_start_matches("control.").to_string();
                controls.insert(cid, (rec, e.revision));
            }
        })
        .await
        .map_err(|e| CoordinatorError::Load(e.to_string()))?;
        for (status, revision) in snapshots {
            if status.state.is_terminal() {
                continue;
            }
            let cid = status.campaign_id.clone();
            let manifest = match plan::read_manifest(&self.campaigns, &cid).await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    warn!(campaign = %cid, "Campaign has no plan; it cannot be resumed");
                    continue;
                }
                Err(e) => {
                    warn!(campaign = %cid, error = %e, "Cannot read the campaign plan; not resuming it");
                    continue;
                }
            };
            // Its credentials stay held, whoever drives it now.
            if let Err(e) = plan::for_each_chunk(&self.campaigns, &manifest, |chunk| {
                self.locks
                    .hold_all(&cid, chunk.iter().map(|e| e.id.as_str()))
            })
            .await
            {
                warn!(campaign = %cid, error = %e, "Cannot read the campaign plan; not resuming it");
                continue;
            }
            // A request stored after the last snapshot was never applied.
            let pending = controls
                .get(&cid)
                .filter(|(_, rev)| *rev > revision)
                .map(|(rec, rev)| (rec.action, *rev));
            info!(campaign = %cid, state = %status.state, wave = status.current_wave, "Resuming campaign");
            self.spawn_driver(status, revision, manifest, pending);
        }
        Ok(())
    }

    async fn load_status(&self, cid: &str) -> Result<Option<CampaignStatus>, RequestError> {
        read_status(&self.campaigns, cid).await
    }

    /// `campaign.start`: validate, select, plan, persist, announce, drive.
    pub(crate) async fn start_campaign(
        self: &Arc<Self>,
        req: StartRequest,
    ) -> Result<String, RequestError> {
        let mut spec = req.spec;
        spec.validate()
            .map_err(|e| RequestError::BadRequest(e.to_string()))?;
        let cid = match req.campaign_id {
            Some(id) => {
                ids::validate("campaign_id", &id)
                    .map_err(|e| RequestError::BadRequest(e.to_string()))?;
                id
            }
            None => ids::random_id("c"),
        };
        if let Some(existing) = self.load_status(&cid).await? {
            return if same_spec(&existing.spec, &spec) {
                Ok(cid)
            } else {
                Err(RequestError::Conflict(format!(
                    "campaign {cid} already exists with another spec"
                )))
            };
        }
        // Only the plan entries are kept while scanning (not whole inventory
        // records): the selection of a million credentials stays in the
        // low hundreds of megabytes at its peak.
        // Consumer records: few next to the credentials.
        let consumer_index = crate::inventory::deps::ConsumerIndex::load(&self.js)
            .await
            .map_err(internal)?;
        let entries: Vec<PlanEntry> = inventory::select(
            &self.inventory,
            &spec.selector,
            |c| PlanEntry::with_consumers(&c, &consumer_index),
            |e| e.id.as_str(),
        )
        .await
        .map_err(internal)?;
        if entries.is_empty() {
            return Err(RequestError::BadRequest(
                "the selector matches no credential in the inventory (import some with `keywave inventory import`, or check the selector)".into(),
            ));
        }
        refuse_shared_logins(&entries)?;
        let (entries, held, notes) = self
            .hold_credentials(&cid, &spec, req.skip_locked, entries)
            .await?;
        // Pre-flight by default when some consumer has an agent to ask; the
        // choice is recorded in the spec (a campaign stored without it, from
        // before pre-flight existed, runs without).
        if spec.preflight.is_none() {
            spec.preflight = Some(entries.iter().any(|e| {
                e.consumers
                    .iter()
                    .any(|c| c.verify == keywave_common::wire::VerifyKind::Attest)
            }));
        }
        let total = entries.len() as u64;
        let sizes = planner::wave_sizes(total, &spec.waves);
        if sizes.len() > MAX_WAVES {
            return Err(RequestError::BadRequest(format!(
                "waves: the plan splits {total} credentials into {} waves, at most {MAX_WAVES} are allowed; use larger or percentage wave sizes",
                sizes.len()
            )));
        }
        if let Some(&w) = spec
            .approve_before_waves
            .iter()
            .find(|&&w| w as usize >= sizes.len())
        {
            return Err(RequestError::BadRequest(format!(
                "approve_before_waves: wave {w} does not exist; the plan has {} waves (numbered from 0)",
                sizes.len()
            )));
        }
        let manifest = plan::write(&self.campaigns, &cid, &entries)
            .await
            .map_err(internal)?;
        let mut regions: std::collections::BTreeMap<String, keywave_common::api::RegionStatus> =
            std::collections::BTreeMap::new();
        for e in &entries {
            match regions.get_mut(e.region.as_str()) {
                Some(r) => r.total += 1,
                None => {
                    regions.insert(
                        e.region.clone(),
                        keywave_common::api::RegionStatus {
                            total: 1,
                            ..Default::default()
                        },
                    );
                }
            }
        }
        // Each wave's tasks per region: which regions a wave needs workers in.
        let mut wave_regions: Vec<std::collections::BTreeMap<String, u64>> =
            Vec::with_capacity(sizes.len());
        let mut at = 0usize;
        for &size in &sizes {
            let mut m: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
            for e in &entries[at..at + size as usize] {
                match m.get_mut(e.region.as_str()) {
                    Some(n) => *n += 1,
                    None => {
                        m.insert(e.region.clone(), 1);
                    }
                }
            }
            at += size as usize;
            wave_regions.push(m);
        }
        drop(entries);
        let mut notes = notes;
        notes.extend(silent_region_notes(
            &self.regions.view(),
            &regions,
            self.regions.config().pause_after,
            now_ms(),
        ));
        self.regions.want(regions.keys().map(String::as_str));
        let mut reason = format!(
            "campaign started: {total} credentials in {} waves",
            sizes.len()
        );
        for n in &notes {
            reason.push_str("; ");
            reason.push_str(n);
        }
        let status = CampaignStatus {
            campaign_id: cid.clone(),
            spec: spec.clone(),
            state: CampaignState::Running,
            total,
            current_wave: 0,
            waves: sizes
                .iter()
                .enumerate()
                .zip(wave_regions)
                .map(|((i, &size), regions)| WaveStatus {
                    wave: i as u32,
                    size,
                    approval_required: spec.approve_before_waves.contains(&(i as u32)),
                    regions,
                    ..Default::default()
                })
                .collect(),
            created_at_ms: now_ms(),
            finished_at_ms: None,
            reason: Some(reason.clone()),
            regions,
            paused_regions: Vec::new(),
        };
        events::publish(
            &self.js,
            &cid,
            EventKind::Created {
                spec: spec.clone(),
                total,
                wave_sizes: sizes.clone(),
            },
        )
        .await
        .map_err(internal)?;
        let body = serde_json::to_vec(&status).map_err(internal)?;
        let revision = match self.campaigns.create(snapshot_key(&cid), body.into()).await {
            Ok(r) => r,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // A concurrent start with the same id won the race.
                return match self.load_status(&cid).await? {
                    Some(s) if same_spec(&s.spec, &spec) => Ok(cid),
                    _ => Err(RequestError::Conflict(format!(
                        "campaign {cid} already exists with another spec"
                    ))),
                };
            }
            Err(e) => return Err(internal(e)),
        };
        if let Err(e) = events::publish(
            &self.js,
            &cid,
            EventKind::StateChanged {
                state: CampaignState::Running,
                reason,
            },
        )
        .await
        {
            warn!(campaign = %cid, error = %e, "Could not publish the campaign's first state event");
        }
        info!(campaign = %cid, total, waves = sizes.len(), strategy = %spec.strategy, "Campaign started");
        held.keep();
        self.spawn_driver(status, revision, manifest, None);
        Ok(cid)
    }

    /// Takes the locks of a starting campaign's credentials (see [`locks`]):
    /// a containment first takes over credentials from continuity campaigns
    /// that wait for a human (paused or awaiting approval) by aborting them;
    /// with `skip_locked` the credentials other campaigns hold are left out;
    /// otherwise any such credential refuses the start, naming the
    /// conflicts. Returns the entries to plan, the locks taken (given back
    /// if the start fails) and what to say in the start reason.
    async fn hold_credentials<'a>(
        &'a self,
        cid: &str,
        spec: &keywave_common::wire::CampaignSpec,
        skip_locked: bool,
        mut entries: Vec<PlanEntry>,
    ) -> Result<(Vec<PlanEntry>, locks::Taken<'a>, Vec<String>), RequestError> {
        let mut notes = Vec::new();
        let found = self
            .locks
            .conflicts(cid, entries.iter().map(|e| e.id.as_str()));
        if found.count > 0 && spec.strategy == keywave_common::wire::Strategy::Containment {
            let mut aborted = Vec::new();
            for holder in &found.campaigns {
                if self.take_over(holder, cid).await? {
                    aborted.push(holder.as_str());
                }
            }
            if !aborted.is_empty() {
                notes.push(format!(
                    "took its credentials over from continuity campaign(s) {} (aborted while waiting for an operator)",
                    aborted.join(", ")
                ));
            }
        }
        if skip_locked {
            let before = entries.len();
            entries.retain(|e| !self.locks.held_by_other(cid, &e.id));
            let skipped = before - entries.len();
            if entries.is_empty() {
                return Err(RequestError::Conflict(format!(
                    "all {before} selected credentials are in other unfinished campaigns"
                )));
            }
            if skipped > 0 {
                notes.push(format!(
                    "{skipped} selected credential(s) skipped: other unfinished campaigns hold them"
                ));
            }
        }
        let taken = self
            .locks
            .try_hold(cid, entries.iter().map(|e| e.id.as_str()))
            .map_err(|c| {
                RequestError::Conflict(format!(
                    "{c}. One campaign per credential at a time: wait for them to end, abort them, or start with --skip-locked"
                ))
            })?;
        Ok((entries, locks::Taken::new(&self.locks, cid, taken), notes))
    }

    /// Aborts `holder` so that containment campaign `by` can take its
    /// credentials, if it is a continuity campaign waiting for an operator.
    async fn take_over(&self, holder: &str, by: &str) -> Result<bool, RequestError> {
        let s = match self.status(holder).await {
            Ok(s) => s,
            // Still starting (it holds its credentials before its first
            // snapshot): not waiting for anyone.
            Err(RequestError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let waiting = matches!(
            s.state,
            CampaignState::Paused | CampaignState::AwaitingApproval
        );
        if !waiting || s.spec.strategy != keywave_common::wire::Strategy::Continuity {
            return Ok(false);
        }
        warn!(campaign = %holder, containment = %by, "Aborting a waiting continuity campaign: a containment takes over its credentials");
        let after = self.control(holder, ControlAction::Abort).await?;
        if !after.state.is_terminal() {
            return Err(RequestError::Conflict(format!(
                "campaign {holder} holds selected credentials and did not abort in time; try again"
            )));
        }
        self.locks.release_campaign(holder);
        Ok(true)
    }

    /// `campaign.status`: from memory when driven here, else from the snapshot.
    pub(crate) async fn status(&self, cid: &str) -> Result<CampaignStatus, RequestError> {
        ids::validate("campaign_id", cid).map_err(|e| RequestError::BadRequest(e.to_string()))?;
        if let Some(h) = self.handle(cid) {
            return Ok(h.status());
        }
        self.load_status(cid)
            .await?
            .ok_or_else(|| RequestError::NotFound(format!("no campaign {cid}")))
    }

    /// `campaign.list`: every campaign, oldest first.
    pub(crate) async fn list(&self) -> Result<Vec<CampaignSummary>, RequestError> {
        read_list(&self.campaigns, |cid| self.handle(cid).map(|h| h.status())).await
    }

    /// `campaign.pause|resume|abort`: records the request under
    /// `control.<cid>` (every coordinator watches it) and, when this
    /// coordinator drives the campaign, waits briefly until the driver acted.
    pub(crate) async fn control(
        &self,
        cid: &str,
        action: ControlAction,
    ) -> Result<CampaignStatus, RequestError> {
        let current = self.status(cid).await?;
        let state = current.state;
        let done = |s: CampaignState| match action {
            ControlAction::Pause => s == CampaignState::Paused || s.is_terminal(),
            ControlAction::Resume => s != CampaignState::Paused,
            ControlAction::Abort => s.is_terminal(),
            ControlAction::Rollback => s == CampaignState::RollingBack || s.is_terminal(),
        };
        if action == ControlAction::Abort && state == CampaignState::Aborted {
            return Ok(current);
        }
        if state.is_terminal() {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} is {state}; it cannot be changed any more"
            )));
        }
        if action == ControlAction::Pause && state == CampaignState::RollingBack {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} is rolling back; a rollback is not paused (abort it to stop issuing rollback tasks)"
            )));
        }
        if done(state) {
            return Ok(current);
        }
        let rec = ControlRecord {
            action,
            at_ms: now_ms(),
            by: self.opts.coordinator_id.clone(),
        };
        let body = serde_json::to_vec(&rec).map_err(internal)?;
        let revision = self
            .campaigns
            .put(control_key(cid), body.into())
            .await
            .map_err(internal)?;
        let until = tokio::time::Instant::now() + CONTROL_WAIT;
        let Some(h) = self.handle(cid) else {
            // Driven by another coordinator: it acts on the control record
            // and saves its snapshot at once; wait for that briefly.
            let mut latest = current;
            while !done(latest.state) && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(s) = self.load_status(cid).await? {
                    latest = s;
                }
            }
            return Ok(latest);
        };
        let make = |reply| machine::Msg::Control {
            action,
            revision,
            reply,
        };
        Ok(h.request(make, until).await)
    }
}

impl Engine {
    /// `campaign.rollback`: an operator rolls back the current wave of a
    /// paused continuity campaign whose wave has finished (decided); every
    /// credential of that wave whose rotation succeeded gets a rollback
    /// task, and the campaign ends `rolled_back`, as after an automatic
    /// rollback. Containment campaigns, running or finished campaigns, a
    /// wave still in progress and any wave but the current one are
    /// conflicts: the engine keeps the bits of one wave to roll back.
    pub(crate) async fn rollback(
        &self,
        req: keywave_common::api::RollbackRequest,
    ) -> Result<CampaignStatus, RequestError> {
        let cid = req.campaign_id.as_str();
        let status = self.status(cid).await?;
        let state = status.state;
        if status.spec.strategy == keywave_common::wire::Strategy::Containment {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} is a containment campaign: containment is never rolled back to the exposed secrets"
            )));
        }
        if matches!(
            state,
            CampaignState::RollingBack | CampaignState::RolledBack
        ) {
            return Ok(status);
        }
        if state != CampaignState::Paused {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} is {state}; only a paused campaign can be rolled back (pause it first with `keywave campaign pause {cid}`; a finished campaign cannot be rolled back)"
            )));
        }
        let w = status.current_wave;
        if let Some(asked) = req.wave {
            if asked != w {
                return Err(RequestError::Conflict(format!(
                    "campaign {cid} can only roll back its current wave {w}, not wave {asked}"
                )));
            }
        }
        let decided = status
            .waves
            .get(w as usize)
            .is_some_and(|ws| ws.decision.is_some());
        if !decided {
            return Err(RequestError::Conflict(format!(
                "wave {w} of campaign {cid} has not finished (paused before or during it); resume it and pause again once it finished, or abort"
            )));
        }
        self.control(cid, ControlAction::Rollback).await
    }
}

impl Engine {
    /// `campaign.approve`: publishes an `approved` event for a gated wave
    /// (the event is the record: a restarted coordinator replays it) and,
    /// when the campaign waits at that wave, waits briefly until it started.
    pub(crate) async fn approve(
        &self,
        req: ApproveRequest,
    ) -> Result<CampaignStatus, RequestError> {
        let cid = req.campaign_id.as_str();
        let by = req.by.trim().to_string();
        if by.is_empty()
            || by.len() > keywave_common::api::MAX_APPROVER_LEN
            || by.chars().any(char::is_control)
        {
            return Err(RequestError::BadRequest(format!(
                "by: the approver must be 1 to {} characters without control characters",
                keywave_common::api::MAX_APPROVER_LEN
            )));
        }
        let status = self.status(cid).await?;
        let state = status.state;
        if state.is_terminal() {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} is {state}; there is nothing left to approve"
            )));
        }
        let gates = &status.spec.approve_before_waves;
        if gates.is_empty() {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} has no wave that needs an approval (it was started without --approve-before-wave)"
            )));
        }
        let not_started = |w: u32| {
            status
                .waves
                .get(w as usize)
                .is_some_and(|ws| ws.started_at_ms.is_none() && !ws.published)
        };
        let wave = match req.wave {
            Some(w) => w,
            None if state == CampaignState::AwaitingApproval => status.current_wave,
            None => gates
                .iter()
                .copied()
                .find(|&g| {
                    g >= status.current_wave
                        && not_started(g)
                        && status.waves[g as usize].approved_at_ms.is_none()
                })
                .ok_or_else(|| {
                    RequestError::Conflict(format!(
                        "no wave of campaign {cid} waits for an approval"
                    ))
                })?,
        };
        let list = gates
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        if wave as usize >= status.waves.len() {
            return Err(RequestError::Conflict(format!(
                "campaign {cid} has no wave {wave} (it has {} waves, numbered from 0; gated: {list})",
                status.waves.len()
            )));
        }
        if !gates.contains(&wave) {
            return Err(RequestError::Conflict(format!(
                "wave {wave} of campaign {cid} does not need an approval (gated waves: {list})"
            )));
        }
        let ws = &status.waves[wave as usize];
        if ws.approved_at_ms.is_some() {
            return Ok(status);
        }
        if !not_started(wave) {
            return Err(RequestError::Conflict(format!(
                "wave {wave} of campaign {cid} has already started"
            )));
        }
        events::publish(
            &self.js,
            cid,
            EventKind::Approved {
                wave,
                by: by.clone(),
            },
        )
        .await
        .map_err(internal)?;
        info!(campaign = %cid, wave, by = %by, "Wave approved");
        let waiting_here = state == CampaignState::AwaitingApproval && wave == status.current_wave;
        let until = tokio::time::Instant::now() + CONTROL_WAIT;
        match self.handle(cid) {
            Some(h) => {
                let approval = Approval {
                    wave,
                    by,
                    at_ms: now_ms(),
                };
                let make = |reply| machine::Msg::Approve { approval, reply };
                Ok(h.request(make, until).await)
            }
            None => {
                let mut latest = status;
                while waiting_here
                    && latest.state == CampaignState::AwaitingApproval
                    && tokio::time::Instant::now() < until
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(s) = self.load_status(cid).await? {
                        latest = s;
                    }
                }
                Ok(latest)
            }
        }
    }
}

/// A campaign's snapshot from the `keywave-campaigns` bucket (what a standby
/// answers `campaign.status` with).
pub(crate) async fn read_status(
    campaigns: &kv::Store,
    cid: &str,
) -> Result<Option<CampaignStatus>, RequestError> {
    let Some(body) = campaigns.get(snapshot_key(cid)).await.map_err(internal)? else {
        return Ok(None);
    };
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| internal(format!("campaign {cid} snapshot is unreadable: {e}")))
}

/// `campaign.list` from the snapshots, oldest first; `live` gives the status
/// of a campaign driven by this process (fresher than its snapshot).
pub(crate) async fn read_list(
    campaigns: &kv::Store,
    live: impl Fn(&str) -> Option<CampaignStatus>,
) -> Result<Vec<CampaignSummary>, RequestError> {
    let mut all: Vec<CampaignStatus> = Vec::new();
    crate::kvscan::for_each_latest(campaigns, "campaign.*", |e| {
        if let Ok(s) = serde_json::from_slice::<CampaignStatus>(&e.value) {
            all.push(s);
        }
    })
    .await
    .map_err(internal)?;
    for s in &mut all {
        if let Some(l) = live(&s.campaign_id) {
            *s = l;
        }
    }
    all.sort_by(|a, b| (a.created_at_ms, &a.campaign_id).cmp(&(b.created_at_ms, &b.campaign_id)));
    Ok(all
        .into_iter()
        .map(|s| CampaignSummary {
            succeeded: s.succeeded(),
            failed: s.failed(),
            campaign_id: s.campaign_id,
            name: s.spec.name,
            strategy: s.spec.strategy,
            state: s.state,
            total: s.total,
            created_at_ms: s.created_at_ms,
        })
        .collect())
}

/// The start reason's warning for each of the campaign's regions without a
/// live worker right now: the campaign pauses before its waves are
/// published there (once the region has been silent for `pause_after`).
fn silent_region_notes(
    view: &crate::regions::RegionView,
    regions: &std::collections::BTreeMap<String, keywave_common::api::RegionStatus>,
    pause_after: Duration,
    now_ms: u64,
) -> Vec<String> {
    regions
        .iter()
        .filter_map(|(name, r)| {
            let since = view.silent_since(name)?;
            let quiet = now_ms.saturating_sub(since) / 1_000;
            Some(format!(
                "WARNING region {name} has no live workers (none heard from for {quiet} s; {} credentials there): the campaign pauses before publishing a wave into it once it has been silent for {} s",
                r.total,
                pause_after.as_secs()
            ))
        })
        .collect()
}

/// Whether a start request's spec is the one `existing` was started with:
/// the coordinator fills in an unset `preflight` when it starts a campaign.
fn same_spec(
    existing: &keywave_common::wire::CampaignSpec,
    requested: &keywave_common::wire::CampaignSpec,
) -> bool {
    let mut r = requested.clone();
    if r.preflight.is_none() {
        r.preflight = existing.preflight;
    }
    *existing == r
}

/// An approval read back from the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub wave: u32,
    pub by: String,
    pub at_ms: u64,
}

/// Every `approved` event of campaign `cid` (`keywave.event.<cid>.approved`
/// on `KEYWAVE_EVENTS`), oldest first: how a driver, also a restarted one,
/// learns the approvals.
pub(crate) async fn read_approvals(
    js: &Context,
    cid: &str,
) -> Result<Vec<Approval>, topology::StreamReadError> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use topology::StreamReadError;
    const STREAM: &str = topology::STREAM_EVENTS;
    const IDLE: Duration = Duration::from_secs(5);
    let stream = js
        .get_stream(STREAM)
        .await
        .map_err(|source| StreamReadError::Open {
            stream: STREAM,
            source,
        })?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: keywave_common::subjects::event(cid, "approved"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|source| StreamReadError::Consumer {
            stream: STREAM,
            source,
        })?;
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|source| StreamReadError::Messages {
            stream: STREAM,
            source,
        })?;
    loop {
        let m = match tokio::time::timeout(IDLE, messages.next()).await {
            Err(_) => {
                return Err(StreamReadError::Stalled {
                    stream: STREAM,
                    idle: IDLE,
                })
            }
            Ok(None) => break,
            Ok(Some(m)) => m.map_err(|source| StreamReadError::Next {
                stream: STREAM,
                source,
            })?,
        };
        let pending = m.info().map(|i| i.pending).unwrap_or(0);
        if let Some(a) = approval_of(&m.payload, m.headers.as_ref()) {
            out.push(a);
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The approval carried by an event message, if it is one.
pub(crate) fn approval_of(
    payload: &[u8],
    headers: Option<&async_nats::HeaderMap>,
) -> Option<Approval> {
    let ev: keywave_common::wire::CampaignEvent =
        keywave_common::codec::decode(headers, payload).ok()?;
    match ev.kind {
        EventKind::Approved { wave, by } => Some(Approval {
            wave,
            by,
            at_ms: ev.at_ms,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

/// Tests that run a coordinator take this lock: coordinators in one process
/// share the API queue group and would answer each other's requests (and
/// end up driving each other's campaigns).
#[cfg(test)]
pub(crate) static COORDINATOR_TEST_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
