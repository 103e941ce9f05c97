//! The detection intake loop: a durable pull consumer on
//! `KEYWAVE_DETECTIONS` whose detections are held for a coalescing window,
//! matched against the inventory, and turned into at most one containment
//! campaign per window (split only past [`IntakeConfig::max_campaign_credentials`]).
//!
//! A detection is acked only once it is durably accounted for: its
//! credential claimed by a campaign the engine accepted (or by a pending
//! intent that the next start-up starts), or a record published on
//! `keywave.event.detections.<outcome>`. Until then the server redelivers
//! it (after the ack wait), so a coordinator that dies mid-window loses
//! nothing. On a clean shutdown held detections are nak'ed, for another
//! coordinator to take them at once.

use super::matcher::{self, InventoryIndex, Resolved};
use super::store::{self, Claim, Intent, IntentState, Outcome};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv, AckKind, Context,
};
use futures::StreamExt;
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::{
    api::CampaignStatus,
    detect::{DecodeError, DetectKey, Detection, STREAM_DETECTIONS},
    ids, now_ms,
    wire::{CampaignSpec, CampaignState, OnFailure, Selector, Strategy, WaveSize, SCHEMA_VERSION},
};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Settings of the intake. Defaults suit production.
#[derive(Debug, Clone)]
pub struct IntakeConfig {
    /// Detections arriving within this window of the first one are
    /// coalesced into one containment campaign. Default 2 s.
    pub window: Duration,
    /// Wave plan of containment campaigns. Default `1,100%`: one canary, then everything.
    pub waves: Vec<WaveSize>,
    /// Failure budget per wave. Default 0: any failure pauses the campaign for an operator.
    pub failure_budget: f64,
    /// How long one containment task may take. Default 60 s.
    pub task_timeout: Duration,
    /// Durable consumer name (shared by every coordinator). Default `detect-intake`.
    pub consumer: String,
    /// Redelivery delay of a detection that was not acked (coordinator died). Default 30 s.
    pub ack_wait: Duration,
    /// Most detections held in one window; a full window is processed at once. Default 50,000.
    pub max_window_detections: usize,
    /// Most credentials in one campaign (bounds the start request). Default 10,000.
    pub max_campaign_credentials: usize,
    /// Age after which the in-memory inventory index is re-read. Default 30 s.
    pub index_max_age: Duration,
    /// Fault injection for crash tests: return right after writing a
    /// campaign's intent, before starting it (as if the process died there).
    pub crash_after_intent: bool,
    /// Inventory tag of credentials that are not contained without a human:
    /// they go into a containment campaign of their own whose first wave
    /// waits for `keywave campaign approve` (the untagged ones of the same
    /// window are contained at once). Empty: no credential needs approval.
    /// Default [`DEFAULT_APPROVAL_TAG`].
    pub approval_tag: String,
}

/// The default [`IntakeConfig::approval_tag`].
pub const DEFAULT_APPROVAL_TAG: &str = "approval=required";

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            window: Duration::from_secs(2),
            waves: vec![WaveSize::Count(1), WaveSize::Percent(100.0)],
            failure_budget: 0.0,
            task_timeout: Duration::from_secs(60),
            consumer: "detect-intake".into(),
            ack_wait: Duration::from_secs(30),
            max_window_detections: 50_000,
            max_campaign_credentials: 10_000,
            index_max_age: Duration::from_secs(30),
            crash_after_intent: false,
            approval_tag: DEFAULT_APPROVAL_TAG.into(),
        }
    }
}

/// Why the intake stopped or a window could not be processed.
#[derive(Debug, Error)]
pub enum IntakeError {
    #[error("detection consumer: {0}")]
    Consumer(String),
    #[error("reading the inventory: {0}")]
    Inventory(String),
    #[error("keywave-detections bucket: {0}")]
    Store(String),
    #[error("recording a detection: {0}")]
    Record(String),
    #[error("starting containment campaign {campaign}: {source}")]
    Start {
        campaign: String,
        #[source]
        source: ClientError,
    },
    #[error("injected crash after writing the intent of {0}")]
    InjectedCrash(String),
}

fn store_err(e: impl std::fmt::Display) -> IntakeError {
    IntakeError::Store(e.to_string())
}

/// A detection held in the current window.
struct Held {
    msg: jetstream::Message,
    seq: u64,
    received_at_ms: u64,
    detection: Detection,
}

/// What the window decided for one credential.
struct Group {
    detections: Vec<usize>,
    received_at_ms: u64,
    detected_at_ms: u64,
}

pub(crate) struct Intake {
    pub js: Context,
    pub api: ApiClient,
    pub kv: kv::Store,
    pub inventory: kv::Store,
    pub key: Option<DetectKey>,
    pub cfg: IntakeConfig,
    pub index: InventoryIndex,
}

/// How a held message is settled; the one place acks are decided.
enum Settle {
    /// Accounted for: the server forgets it.
    Ack,
    /// Not processed (shutdown or a failed window): redelivered after `delay`.
    Retry(Duration),
    /// Undecodable: never redelivered (a record was published).
    Term,
}

async fn settle(msg: &jetstream::Message, how: Settle) {
    let kind = match how {
        Settle::Ack => AckKind::Ack,
        Settle::Retry(d) => AckKind::Nak(Some(d)),
        Settle::Term => AckKind::Term,
    };
    if let Err(e) = msg.ack_with(kind).await {
        // The server redelivers after the ack wait; claims make that harmless.
        warn!(error = %e, "Could not settle a detection message");
    }
}

impl Intake {
    async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, IntakeError> {
        let stream = self
            .js
            .get_stream(STREAM_DETECTIONS)
            .await
            .map_err(|e| IntakeError::Consumer(e.to_string()))?;
        stream
            .get_or_create_consumer(
                &self.cfg.consumer,
                pull::Config {
                    durable_name: Some(self.cfg.consumer.clone()),
                    description: Some("keywave coordinators: detection intake".into()),
                    filter_subject: "keywave.detect.>".into(),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: self.cfg.ack_wait,
                    // Never give a detection up: an undeliverable one is
                    // terminated explicitly, with a record.
                    max_deliver: -1,
                    max_ack_pending: (self.cfg.max_window_detections as i64 * 2).max(1_000),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| IntakeError::Consumer(e.to_string()))
    }

    /// Runs until `shutdown`. Consumer failures are retried with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), IntakeError> {
        if let Err(e) = self.recover().await {
            warn!(error = %e, "Could not start pending containment campaigns yet; retrying later");
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.consume(shutdown.clone()).await {
                Ok(()) => return Ok(()),
                Err(e @ IntakeError::InjectedCrash(_)) => return Err(e),
                Err(e) => {
                    warn!(error = %e, "Detection intake failed; restarting it");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn consume(&mut self, shutdown: CancellationToken) -> Result<(), IntakeError> {
        let consumer = self.consumer().await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1_000)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| IntakeError::Consumer(e.to_string()))?;
        info!(consumer = %self.cfg.consumer, window = ?self.cfg.window, "Detection intake running");
        let mut held: Vec<Held> = Vec::new();
        let mut deadline: Option<Instant> = None;
        let mut recover_tick = tokio::time::interval(Duration::from_secs(10));
        recover_tick.tick().await;
        let mut progress_tick = tokio::time::interval(self.progress_every());
        progress_tick.tick().await;
        loop {
            // The select only picks what happened; all awaiting is done
            // outside of it.
            let event = tokio::select! {
                _ = shutdown.cancelled() => Event::Shutdown,
                _ = sleep_until(deadline), if deadline.is_some() => Event::WindowClosed,
                _ = recover_tick.tick(), if held.is_empty() => Event::Recover,
                _ = progress_tick.tick(), if !held.is_empty() => Event::Progress,
                next = messages.next() => Event::Message(next),
            };
            let flush_now = match event {
                Event::Shutdown => {
                    for h in &held {
                        settle(&h.msg, Settle::Retry(Duration::ZERO)).await;
                    }
                    return Ok(());
                }
                Event::WindowClosed => true,
                Event::Progress => {
                    keep_alive(&held).await;
                    false
                }
                Event::Recover => {
                    if let Err(e) = self.recover().await {
                        warn!(error = %e, "Could not start pending containment campaigns; retrying");
                    }
                    false
                }
                Event::Message(next) => {
                    let msg = match next {
                        None => return Err(IntakeError::Consumer("message stream ended".into())),
                        Some(Err(e)) => {
                            warn!(error = %e, "Detection consumer error");
                            continue;
                        }
                        Some(Ok(m)) => m,
                    };
                    self.accept(msg, &mut held).await?;
                    if deadline.is_none() && !held.is_empty() {
                        deadline = Some(Instant::now() + self.cfg.window);
                    }
                    held.len() >= self.cfg.max_window_detections
                }
            };
            if flush_now && !held.is_empty() {
                deadline = None;
                let window = std::mem::take(&mut held);
                let every = self.progress_every();
                let outcome = {
                    // A long window (thousands of claims) must not outlive
                    // the ack wait, or the server would redeliver it meanwhile.
                    let flush = std::pin::pin!(self.flush(&window));
                    let alive = std::pin::pin!(keep_alive_every(&window, every));
                    match futures::future::select(flush, alive).await {
                        futures::future::Either::Left((r, _)) => r,
                        futures::future::Either::Right(_) => unreachable!("keep-alive never ends"),
                    }
                };
                match outcome {
                    Ok(()) => {
                        for h in &window {
                            settle(&h.msg, Settle::Ack).await;
                        }
                    }
                    Err(e @ IntakeError::InjectedCrash(_)) => return Err(e),
                    Err(e) => {
                        warn!(error = %e, detections = window.len(), "Could not process a detection window; it will be redelivered");
                        for h in &window {
                            settle(&h.msg, Settle::Retry(Duration::from_secs(1))).await;
                        }
                    }
                }
            } else if flush_now {
                deadline = None;
            }
        }
    }

    fn progress_every(&self) -> Duration {
        (self.cfg.ack_wait / 3).max(Duration::from_millis(100))
    }

    /// Decodes one message: valid ones are held, others recorded and settled.
    async fn accept(
        &self,
        msg: jetstream::Message,
        held: &mut Vec<Held>,
    ) -> Result<(), IntakeError> {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        match Detection::decode(msg.headers.as_ref(), &msg.payload) {
            Err(e) => {
                warn!(seq, subject = %msg.subject, reason = e.reason(), "Rejecting a malformed detection");
                store::record(
                    &self.js,
                    Outcome::Rejected,
                    seq,
                    reject_reason(&e),
                    None,
                    None,
                    None,
                )
                .await
                .map_err(|e| IntakeError::Record(e.to_string()))?;
                settle(&msg, Settle::Term).await;
            }
            Ok(d) if d.credential.is_empty() => {
                info!(seq, detection = %d.msg_id(), "Detection names no credential; recorded as unidentified");
                store::record(
                    &self.js,
                    Outcome::Unidentified,
                    seq,
                    "the source did not say which credential leaked; triage it by its labels and evidence",
                    Some(d),
                    None,
                    None,
                )
                .await
                .map_err(|e| IntakeError::Record(e.to_string()))?;
                settle(&msg, Settle::Ack).await;
            }
            Ok(_) if held.iter().any(|h| h.seq == seq) => {
                // A redelivery of a message already held (its ack wait ran
                // out): keep the newest delivery, whose ack counts.
                if let Some(h) = held.iter_mut().find(|h| h.seq == seq) {
                    h.msg = msg;
                }
            }
            Ok(d) => {
                debug!(seq, detection = %d.msg_id(), "Detection held for the window");
                held.push(Held {
                    msg,
                    seq,
                    received_at_ms: now_ms(),
                    detection: d,
                });
            }
        }
        Ok(())
    }

    async fn refresh_index(&mut self) -> Result<(), IntakeError> {
        self.index = InventoryIndex::load(&self.inventory, &self.cfg.approval_tag)
            .await
            .map_err(|e| IntakeError::Inventory(e.to_string()))?;
        Ok(())
    }

    async fn resolve(&self, d: &Detection) -> Result<Resolved, IntakeError> {
        if let Some(r) = self.index.resolve_local(&d.credential) {
            return Ok(r);
        }
        let fp = d.credential.fingerprint.as_deref().unwrap_or_default();
        matcher::resolve_fingerprint(&self.kv, self.key.as_ref(), fp)
            .await
            .map_err(store_err)
    }

    /// Processes one window. On `Ok`, every held detection is accounted for.
    async fn flush(&mut self, window: &[Held]) -> Result<(), IntakeError> {
        let started = Instant::now();
        if self.index.stale(self.cfg.index_max_age) {
            self.refresh_index().await?;
        }
        let mut resolved = Vec::with_capacity(window.len());
        let mut refreshed = false;
        for h in window {
            let mut r = self.resolve(&h.detection).await?;
            if matches!(r, Resolved::Unmatched(_)) && !refreshed {
                // The inventory may have changed since the index was read.
                self.refresh_index().await?;
                refreshed = true;
                r = self.resolve(&h.detection).await?;
            }
            resolved.push(r);
        }
        let mut groups: BTreeMap<String, Group> = BTreeMap::new();
        for (i, (h, r)) in window.iter().zip(&resolved).enumerate() {
            match r {
                Resolved::Credential(id) => {
                    let g = groups.entry(id.clone()).or_insert(Group {
                        detections: Vec::new(),
                        received_at_ms: h.received_at_ms,
                        detected_at_ms: h.detection.detected_at.ms(),
                    });
                    g.detections.push(i);
                    g.received_at_ms = g.received_at_ms.min(h.received_at_ms);
                    g.detected_at_ms = g.detected_at_ms.min(h.detection.detected_at.ms());
                }
                Resolved::Retired(id) => {
                    self.record(
                        h,
                        Outcome::AlreadyContained,
                        "the leaked secret was already replaced by a rotation",
                        Some(id),
                        None,
                    )
                    .await?;
                }
                Resolved::Unmatched(reason) => {
                    info!(seq = h.seq, detection = %h.detection.msg_id(), credential = %h.detection.credential.describe(), "Unmatched detection");
                    self.record(h, Outcome::Unmatched, reason, None, None)
                        .await?;
                }
                Resolved::Unidentified => {
                    self.record(
                        h,
                        Outcome::Unidentified,
                        "the source did not say which credential leaked",
                        None,
                        None,
                    )
                    .await?;
                }
            }
        }
        // Credentials already under containment are not rotated twice.
        let mut statuses: HashMap<String, Option<CampaignStatus>> = HashMap::new();
        let mut intents: HashMap<String, Option<Intent>> = HashMap::new();
        let mut fresh: Vec<(String, Group, Option<u64>)> = Vec::new();
        for (id, g) in groups {
            let existing = store::get_json::<Claim>(&self.kv, &store::claim_key(&id))
                .await
                .map_err(store_err)?;
            let verdict = match &existing {
                None => Verdict::Fresh,
                Some((claim, _)) => {
                    self.judge(claim, g.detected_at_ms, &mut intents, &mut statuses)
                        .await?
                }
            };
            match verdict {
                Verdict::Fresh => fresh.push((id, g, existing.map(|(_, rev)| rev))),
                Verdict::Active(cid) => {
                    for &i in &g.detections {
                        self.record(
                            &window[i],
                            Outcome::Coalesced,
                            format!("credential {id} is already being contained by campaign {cid}"),
                            Some(&id),
                            Some(&cid),
                        )
                        .await?;
                    }
                }
                Verdict::Done(cid) => {
                    for &i in &g.detections {
                        self.record(&window[i], Outcome::AlreadyContained, format!("campaign {cid}, started after this leak was detected, already rotated credential {id}"), Some(&id), Some(&cid)).await?;
                    }
                }
            }
        }
        let detections: u64 = fresh
            .iter()
            .map(|(_, g, _)| g.detections.len() as u64)
            .sum();
        // Credentials tagged as needing an approval get a campaign of their
        // own that waits for it; the others are contained at once.
        if fresh
            .iter()
            .any(|(id, _, _)| self.index.needs_approval(id).is_none())
        {
            self.refresh_index().await?;
        }
        let (gated, open): (Vec<_>, Vec<_>) = fresh
            .into_iter()
            .partition(|(id, _, _)| self.index.needs_approval(id) == Some(true));
        for chunk in chunk(open, self.cfg.max_campaign_credentials) {
            self.contain(window, chunk, false).await?;
        }
        for chunk in chunk(gated, self.cfg.max_campaign_credentials) {
            self.contain(window, chunk, true).await?;
        }
        debug!(detections = window.len(), contained = detections, elapsed = ?started.elapsed(), "Detection window processed");
        Ok(())
    }

    /// Decides whether an existing claim still protects the credential.
    async fn judge(
        &self,
        claim: &Claim,
        detected_at_ms: u64,
        intents: &mut HashMap<String, Option<Intent>>,
        statuses: &mut HashMap<String, Option<CampaignStatus>>,
    ) -> Result<Verdict, IntakeError> {
        let cid = claim.campaign_id.clone();
        if !intents.contains_key(&cid) {
            let i = store::get_json::<Intent>(&self.kv, &store::intent_key(&cid))
                .await
                .map_err(store_err)?
                .map(|(i, _)| i);
            intents.insert(cid.clone(), i);
        }
        let Some(intent) = intents[&cid].clone() else {
            // Claimed, but the process died before writing the intent: void.
            return Ok(Verdict::Fresh);
        };
        if intent.state == IntentState::Pending {
            return Ok(Verdict::Active(cid));
        }
        if !statuses.contains_key(&cid) {
            let s = match self.api.status(&cid).await {
                Ok(s) => Some(s),
                Err(ClientError::NotFound(_)) => None,
                Err(e) => {
                    return Err(IntakeError::Start {
                        campaign: cid,
                        source: e,
                    })
                }
            };
            statuses.insert(cid.clone(), s);
        }
        Ok(match &statuses[&cid] {
            None => Verdict::Fresh,
            Some(s) if !s.state.is_terminal() => Verdict::Active(cid),
            Some(s)
                if s.state == CampaignState::Completed
                    && detected_at_ms <= intent.created_at_ms =>
            {
                Verdict::Done(cid)
            }
            // Completed before this leak, aborted or rolled back: contain again.
            Some(_) => Verdict::Fresh,
        })
    }

    async fn record(
        &self,
        h: &Held,
        outcome: Outcome,
        reason: impl Into<String>,
        credential: Option<&str>,
        campaign: Option<&str>,
    ) -> Result<(), IntakeError> {
        store::record(
            &self.js,
            outcome,
            h.seq,
            reason,
            Some(h.detection.clone()),
            credential.map(String::from),
            campaign.map(String::from),
        )
        .await
        .map_err(|e| IntakeError::Record(e.to_string()))
    }

    /// Claims, records the intent, starts the campaign, marks it started.
    /// A `gated` campaign's first wave waits for an approval.
    async fn contain(
        &self,
        window: &[Held],
        chunk: Vec<(String, Group, Option<u64>)>,
        gated: bool,
    ) -> Result<(), IntakeError> {
        let cid = ids::random_id("contain");
        let now = now_ms();
        let mut ids_claimed = Vec::with_capacity(chunk.len());
        let mut lost = Vec::new();
        // Owned items: a closure over borrowed ones would make the future
        // not `Send` (a known limitation of higher-ranked closures).
        let todo: Vec<(Claim, Option<u64>)> = chunk
            .iter()
            .map(|(id, g, rev)| {
                let first = &window[g.detections[0]];
                let claim = Claim {
                    credential_id: id.clone(),
                    campaign_id: cid.clone(),
                    received_at_ms: g.received_at_ms,
                    detected_at_ms: g.detected_at_ms,
                    first_detection: first.detection.msg_id(),
                    detections: g.detections.len() as u32,
                    claimed_at_ms: now,
                };
                (claim, *rev)
            })
            .collect();
        let kv = self.kv.clone();
        let claims = futures::stream::iter(todo.into_iter().map(move |(claim, rev)| {
            let kv = kv.clone();
            async move {
                let body = serde_json::to_vec(&claim).expect("claims serialize");
                let key = store::claim_key(&claim.credential_id);
                let r = match rev {
                    None => kv.create(&key, body.into()).await.map(|_| ()).map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
                    Some(rev) => kv
                        .update(&key, body.into(), rev)
                        .await
                        .map(|_| ())
                        .map_err(|e| {
                            (
                                e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                e.to_string(),
                            )
                        }),
                };
                (claim.credential_id, r)
            }
        }))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
        for (id, r) in claims {
            match r {
                Ok(()) => ids_claimed.push(id),
                // Another coordinator claimed it in between: it contains it.
                Err((true, _)) => lost.push(id),
                Err((false, e)) => return Err(IntakeError::Store(e)),
            }
        }
        for id in &lost {
            if let Some((_, g, _)) = chunk.iter().find(|(c, _, _)| c == id) {
                for &i in &g.detections {
                    self.record(
                        &window[i],
                        Outcome::Coalesced,
                        format!("credential {id} was claimed concurrently by another coordinator"),
                        Some(id),
                        None,
                    )
                    .await?;
                }
            }
        }
        if ids_claimed.is_empty() {
            return Ok(());
        }
        ids_claimed.sort();
        let detections: u64 = chunk
            .iter()
            .filter(|(id, _, _)| ids_claimed.binary_search(id).is_ok())
            .map(|(_, g, _)| g.detections.len() as u64)
            .sum();
        let spec = self.spec(&ids_claimed, window, &chunk, gated);
        let mut intent = Intent {
            campaign_id: cid.clone(),
            state: IntentState::Pending,
            spec,
            credentials: ids_claimed.len() as u64,
            detections,
            created_at_ms: now,
            started_at_ms: None,
        };
        self.kv
            .put(
                store::intent_key(&cid),
                serde_json::to_vec(&intent)
                    .expect("intents serialize")
                    .into(),
            )
            .await
            .map_err(store_err)?;
        if self.cfg.crash_after_intent {
            return Err(IntakeError::InjectedCrash(cid));
        }
        self.start(&mut intent).await?;
        let first = &window[chunk[0].1.detections[0]];
        store::record(
            &self.js,
            Outcome::Contained,
            first.seq,
            if gated {
                format!(
                    "containment campaign {cid} created for {} credential(s) tagged {} from {detections} detection(s); it waits for an approval: keywave campaign approve {cid}",
                    ids_claimed.len(),
                    self.cfg.approval_tag
                )
            } else {
                format!(
                    "containment campaign {cid} started for {} credential(s) from {detections} detection(s)",
                    ids_claimed.len()
                )
            },
            Some(first.detection.clone()),
            None,
            Some(cid.clone()),
        )
        .await
        .map_err(|e| IntakeError::Record(e.to_string()))?;
        Ok(())
    }

    fn spec(
        &self,
        ids: &[String],
        window: &[Held],
        chunk: &[(String, Group, Option<u64>)],
        gated: bool,
    ) -> CampaignSpec {
        let mut sources: Vec<String> = Vec::new();
        for (_, g, _) in chunk {
            for &i in &g.detections {
                let id = window[i].detection.msg_id();
                if !sources.contains(&id) {
                    sources.push(id);
                }
                if sources.len() >= 5 {
                    break;
                }
            }
            if sources.len() >= 5 {
                break;
            }
        }
        let more = chunk
            .iter()
            .map(|(_, g, _)| g.detections.len())
            .sum::<usize>()
            .saturating_sub(sources.len());
        let mut reason = format!("leak detections: {}", sources.join(", "));
        if more > 0 {
            reason.push_str(&format!(" (+{more} more)"));
        }
        CampaignSpec {
            v: SCHEMA_VERSION,
            name: if gated {
                format!(
                    "containment (needs approval): {} leaked credential(s)",
                    ids.len()
                )
            } else {
                format!("containment: {} leaked credential(s)", ids.len())
            },
            reason: Some(reason),
            selector: Selector {
                ids: ids.to_vec(),
                ..Default::default()
            },
            strategy: Strategy::Containment,
            waves: self.cfg.waves.clone(),
            failure_budget: self.cfg.failure_budget,
            bake_ms: 0,
            on_failure: OnFailure::Pause,
            task_timeout_ms: self.cfg.task_timeout.as_millis() as u64,
            approve_before_waves: if gated { vec![0] } else { Vec::new() },
            preflight: None,
            preflight_max_unreachable: 0.0,
            requested_by: Some("detection intake".into()),
        }
    }

    /// Starts an intent's campaign (idempotent on its id) and marks it started.
    async fn start(&self, intent: &mut Intent) -> Result<(), IntakeError> {
        let cid = intent.campaign_id.clone();
        match self
            .api
            .start_with_id(intent.spec.clone(), Some(cid.clone()))
            .await
        {
            Ok(_) => {}
            Err(ClientError::BadRequest(reason)) => {
                // Permanent (e.g. every credential left the inventory): the
                // intent is dropped, which voids its claims.
                warn!(campaign = %cid, %reason, "Containment campaign refused by the engine; dropping it");
                self.kv
                    .delete(store::intent_key(&cid))
                    .await
                    .map_err(store_err)?;
                return Ok(());
            }
            Err(e) => {
                return Err(IntakeError::Start {
                    campaign: cid,
                    source: e,
                })
            }
        }
        intent.state = IntentState::Started;
        intent.started_at_ms = Some(now_ms());
        self.kv
            .put(
                store::intent_key(&cid),
                serde_json::to_vec(&intent)
                    .expect("intents serialize")
                    .into(),
            )
            .await
            .map_err(store_err)?;
        info!(campaign = %cid, credentials = intent.credentials, detections = intent.detections, "Containment campaign started");
        Ok(())
    }

    /// Starts every intent still pending (its process died before the start).
    pub async fn recover(&self) -> Result<u64, IntakeError> {
        let mut pending = Vec::new();
        crate::kvscan::for_each_latest(&self.kv, "intent.*", |e| {
            if let Ok(i) = serde_json::from_slice::<Intent>(&e.value) {
                if i.state == IntentState::Pending {
                    pending.push(i);
                }
            }
        })
        .await
        .map_err(store_err)?;
        let n = pending.len() as u64;
        for mut intent in pending {
            info!(campaign = %intent.campaign_id, "Starting a pending containment campaign");
            self.start(&mut intent).await?;
        }
        Ok(n)
    }
}

enum Event<M> {
    Shutdown,
    WindowClosed,
    Recover,
    Progress,
    Message(Option<M>),
}

enum Verdict {
    /// Not protected: claim it.
    Fresh,
    /// A running (or pending, or paused) campaign owns it.
    Active(String),
    /// A completed campaign that started after the leak replaced the secret.
    Done(String),
}

fn reject_reason(e: &DecodeError) -> String {
    format!("{}: {e}", e.reason())
}

/// Tells the server the held messages are still being worked on.
async fn keep_alive(held: &[Held]) {
    for h in held {
        if let Err(e) = h.msg.ack_with(AckKind::Progress).await {
            debug!(error = %e, "Could not extend a detection's ack wait");
        }
    }
}

async fn keep_alive_every(held: &[Held], every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        keep_alive(held).await;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Splits `items` into chunks of at most `max` (at least one per chunk).
fn chunk<T>(items: Vec<T>, max: usize) -> Vec<Vec<T>> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for it in items {
        cur.push(it);
        if cur.len() == max {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_bounded() {
        assert_eq!(
            chunk((0..5).collect(), 2),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        assert_eq!(chunk(Vec::<u8>::new(), 2), Vec::<Vec<u8>>::new());
        assert_eq!(chunk(vec![1], 0), vec![vec![1]]);
    }

    #[test]
    fn default_plan_is_canary_then_everything() {
        let c = IntakeConfig::default();
        assert_eq!(c.waves, vec![WaveSize::Count(1), WaveSize::Percent(100.0)]);
        assert_eq!(c.window, Duration::from_secs(2));
    }
}
