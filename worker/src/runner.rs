//! The JetStream consume loop. Pulls the region's tasks from the shared
//! durable consumer `workers-<region>`, runs at most `concurrency` of them at
//! once through the [`Protocol`], publishes each result (awaiting its ack) and
//! only then acks the task. Undecodable or foreign tasks are terminated and
//! dead-lettered so the queue behind them keeps moving. Shutdown stops the
//! pulling, lets the tasks in hand finish and ack, and returns the counts.

use crate::fault::{Faults, Point};
use crate::keyed_lock::KeyedLocks;
use crate::notice::Notifier;
use crate::protocol::{Flow, Protocol};
use crate::store::SecretStore;
use crate::targets::Targets;
use async_nats::jetstream::{
    self,
    consumer::{pull, Consumer},
    message::AckKind,
};
use base64::Engine;
use futures::StreamExt;
use keywave_common::codec::{self, Format};
use keywave_common::crypto::RegionKey;
use keywave_common::detect::DetectKey;
use keywave_common::ids;
use keywave_common::publish::{self, PublishError};
use keywave_common::sign::Verifier;
use keywave_common::topology::{self, TopologyError};
use keywave_common::wire::{
    CampaignEvent, DeadLetter, ErrorClass, EventKind, Outcome, RotationResult, RotationTask, Step,
    SCHEMA_VERSION,
};
use keywave_common::{now_ms, subjects};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// Most tasks requested from the server in one pull.
const MAX_PULL_BATCH: usize = 256;
/// How long one pull request waits on the server before it is renewed. Short,
/// so that a pull the server leaves unserved (seen under load on nats-server
/// 2.9: tasks sat in the queue until the client's default 30 s expiry) holds
/// tasks back for seconds at most, and a connection that went silent is
/// noticed (the client gives up on a pull 5 s after its expiry); one request
/// per few seconds per idle worker costs nothing.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Longest interval between in-progress acks of a running task.
const PROGRESS_AT_LEAST: Duration = Duration::from_secs(1);
/// Bytes of an undecodable payload kept (base64) in its dead letter.
const MAX_DEAD_LETTER_PAYLOAD: usize = 4096;
/// Redelivery delay after the result (or dead letter) could not be published.
const REQUEUE_DELAY: Duration = Duration::from_secs(2);
/// First wait before publishing a finished task's result again; doubles up
/// to [`RESULT_RETRY_MAX`].
const RESULT_RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts to publish a finished task's result.
const RESULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Wait before re-creating the message stream after it failed.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum WorkerError {
    /// The options cannot work (names the field).
    #[error("invalid worker option {field}: {message}")]
    InvalidOptions {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The region whose tasks this worker takes.
    pub region: String,
    /// Shown in results and logs.
    pub worker_id: String,
    /// Tasks in flight per worker.
    pub concurrency: usize,
    /// Streams and consumer settings (created idempotently at start).
    pub topology: topology::Config,
    /// Fault injection (none by default).
    pub faults: Faults,
    /// The detection key: when set, every secret made CURRENT is announced
    /// on `keywave.rotated.<region>.<credential>` by its keyed fingerprint.
    /// None by default: nothing is announced.
    pub detect_key: Option<DetectKey>,
    /// The coordinator public keys task signatures are checked against
    /// (see `keywave_common::sign`). With keys, unsigned, wrongly signed,
    /// altered or expired tasks are refused; with none, tasks are not
    /// checked (and a warning is logged at start).
    pub task_keys: Verifier,
    /// Refuse to start without `task_keys` (the binary sets it unless
    /// configured with `insecure_unsigned_tasks`).
    pub require_signed_tasks: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            region: "local".into(),
            worker_id: ids::random_id("worker"),
            concurrency: 64,
            topology: topology::Config::default(),
            faults: Faults::default(),
            detect_key: None,
            task_keys: Verifier::default(),
            require_signed_tasks: false,
        }
    }
}

impl WorkerOptions {
    fn validate(&self) -> Result<(), WorkerError> {
        ids::validate("region", &self.region).map_err(|e| WorkerError::InvalidOptions {
            field: "region",
            message: e.to_string(),
        })?;
        if self.worker_id.trim().is_empty() {
            return Err(WorkerError::InvalidOptions {
                field: "worker_id",
                message: "must not be empty".into(),
            });
        }
        if self.concurrency == 0 {
            return Err(WorkerError::InvalidOptions {
                field: "concurrency",
                message: "must be at least 1".into(),
            });
        }
        if self.require_signed_tasks && self.task_keys.is_empty() {
            return Err(WorkerError::InvalidOptions {
                field: "coordinator_public_keys",
                message:
                    "is empty: tasks must be signed. Add the coordinator's public key (printed by \
                          `keywave-coordinator keygen`) to coordinator_public_keys or \
                          KEYWAVE_COORDINATOR_PUBLIC_KEYS; for development only, \
                          insecure_unsigned_tasks = true (or KEYWAVE_INSECURE_UNSIGNED_TASKS=1) \
                          serves unsigned tasks"
                        .into(),
            });
        }
        Ok(())
    }
}

/// What a worker did, returned by [`Worker::run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Rotations that succeeded (result published, task acked).
    pub succeeded: u64,
    /// Tasks that failed (a `Failed` result was published, task acked).
    pub failed: u64,
    /// Messages terminated and dead-lettered (undecodable, foreign, invalid).
    pub terminated: u64,
    /// Rollbacks done.
    pub rolled_back: u64,
    /// Rollbacks refused (containment).
    pub rollback_refused: u64,
    /// Tasks handed back for redelivery (publish failed, shutdown mid-retry).
    pub requeued: u64,
    /// Whether the run ended with an injected crash.
    pub crashed: bool,
}

#[derive(Default)]
struct Counters {
    succeeded: AtomicU64,
    failed: AtomicU64,
    terminated: AtomicU64,
    rolled_back: AtomicU64,
    rollback_refused: AtomicU64,
    requeued: AtomicU64,
    crashed: AtomicBool,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        WorkerStats {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            terminated: self.terminated.load(Ordering::Relaxed),
            rolled_back: self.rolled_back.load(Ordering::Relaxed),
            rollback_refused: self.rollback_refused.load(Ordering::Relaxed),
            requeued: self.requeued.load(Ordering::Relaxed),
            crashed: self.crashed.load(Ordering::Relaxed),
        }
    }
}

/// How the handling of one message ended. [`settle`] maps it to the one
/// acknowledgement the server gets.
#[derive(Debug, Clone, PartialEq)]
enum Handled {
    /// The task ended (any outcome) and its result is durably published.
    Completed(Outcome),
    /// The message can never be processed; it was dead-lettered.
    Poison,
    /// It could not be finished now; hand it back after `delay`.
    Requeue { delay: Option<Duration> },
    /// An injected crash: behave as a killed process.
    Crashed(Point),
}

/// The one place where a handling outcome becomes an acknowledgement.
async fn settle(msg: &jetstream::Message, handled: &Handled) {
    let r = match handled {
        // Ack: the work-queue stream deletes the task; it is never delivered again.
        Handled::Completed(_) => msg.ack().await,
        // Term: the server stops redelivering and drops the task from the work
        // queue; the dead letter we published keeps the evidence.
        Handled::Poison => msg.ack_with(AckKind::Term).await,
        // Nak: redelivered after the delay (to any worker of the region),
        // counting toward the consumer's max_deliver; it resumes where it stopped.
        Handled::Requeue { delay } => msg.ack_with(AckKind::Nak(*delay)).await,
        // Nothing: like a killed process, the server redelivers the task once
        // the ack wait (the consumer's backoff) runs out.
        Handled::Crashed(_) => Ok(()),
    };
    if let Err(e) = r {
        // A lost ack only means a redelivery, which the protocol absorbs.
        warn!(error = %e, "Could not acknowledge a task; it will be redelivered");
    }
}

/// Shared by every in-flight task of a worker.
struct Ctx {
    js: jetstream::Context,
    protocol: Protocol,
    region: String,
    /// Interval of `AckKind::Progress` while a task runs.
    progress_every: Duration,
    shutdown: CancellationToken,
    /// Cancelled by an injected `StopWithoutAck` crash.
    crash: CancellationToken,
    faults: Faults,
    worker_id: String,
    counters: Counters,
    /// Checks task signatures (no keys: nothing checked).
    verifier: Verifier,
    metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Deliveries of one credential run one after the other.
    credentials: KeyedLocks,
}

/// A region worker. Build with [`Worker::start`], then [`Worker::run`].
pub struct Worker {
    client: async_nats::Client,
    js: jetstream::Context,
    consumer: Consumer<pull::Config>,
    store: SecretStore,
    protocol: Protocol,
    opts: WorkerOptions,
    metrics: Arc<crate::metrics::WorkerMetrics>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("region", &self.opts.region)
            .field("worker_id", &self.opts.worker_id)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Binds to the region's consumer and secret store, creating the
    /// topology (core streams, the region's consumer and secret store) only
    /// when they are missing, so a least-privilege worker that may only look
    /// them up starts too (see [`topology::bind_or_ensure_region`]); then
    /// opens the store.
    pub async fn start(
        client: async_nats::Client,
        opts: WorkerOptions,
        key: RegionKey,
        targets: Arc<Targets>,
    ) -> Result<Worker, WorkerError> {
        opts.validate()?;
        let js = topology::context(client.clone());
        let (consumer, kv) =
            topology::bind_or_ensure_region(&js, &opts.region, &opts.topology).await?;
        let store = SecretStore::from_kv(kv, &opts.region, key);
        let metrics = crate::metrics::WorkerMetrics::new(&opts.region);
        metrics.bound(client.clone());
        let mut protocol =
            Protocol::new(store.clone(), targets, opts.worker_id.clone(), opts.faults);
        if let Some(key) = &opts.detect_key {
            protocol = protocol.with_notifier(Notifier::new(js.clone(), key.clone(), &opts.region));
        }
        protocol = protocol.with_consumers(crate::consumers::ConsumerVerifier::new(
            js.clone(),
            &opts.region,
        ));
        info!(
            region = %opts.region,
            worker = %opts.worker_id,
            concurrency = opts.concurrency,
            rotation_notices = opts.detect_key.is_some(),
            "Worker started"
        );
        if opts.task_keys.is_empty() {
            warn!(
                region = %opts.region,
                "INSECURE: no coordinator public key, unsigned tasks allowed (insecure_unsigned_tasks): \
                 this worker runs UNSIGNED tasks; anyone who can publish on keywave.task.{}.> can make \
                 it rotate credentials. Set coordinator_public_keys outside development",
                opts.region
            );
        } else {
            info!(keys = ?opts.task_keys.key_ids(), "Task signatures are verified");
        }
        Ok(Worker {
            client,
            js,
            consumer,
            store,
            protocol,
            opts,
            metrics,
        })
    }

    /// This worker's counters (serve them with [`crate::metrics::serve`]).
    pub fn metrics(&self) -> Arc<crate::metrics::WorkerMetrics> {
        self.metrics.clone()
    }

    /// The region's secret store (clone it to keep it past [`Worker::run`]).
    pub fn store(&self) -> &SecretStore {
        &self.store
    }

    /// Consumes tasks until `shutdown` is cancelled (or an injected crash),
    /// then drains the tasks in hand and returns the counts.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerStats, WorkerError> {
        // The shortest wait the server may apply to a delivery: the ack
        // wait, or the smallest step of a backoff schedule.
        let info = &self.consumer.cached_info().config;
        let ack_wait = info
            .backoff
            .iter()
            .copied()
            .filter(|d| !d.is_zero())
            .fold(info.ack_wait, Duration::min);
        let ctx = Arc::new(Ctx {
            js: self.js.clone(),
            protocol: self.protocol.clone(),
            region: self.opts.region.clone(),
            // Well inside the ack wait, so a long step never looks abandoned;
            // and at least every second, so a consumer whose ack wait the
            // coordinator shortens while this worker runs (an upgrade from
            // 30 s to the 5 s default) does not redeliver its tasks.
            progress_every: (ack_wait / 3).clamp(Duration::from_millis(100), PROGRESS_AT_LEAST),
            shutdown: shutdown.clone(),
            crash: CancellationToken::new(),
            faults: self.opts.faults,
            worker_id: self.opts.worker_id.clone(),
            counters: Counters::default(),
            verifier: self.opts.task_keys.clone(),
            metrics: self.metrics.clone(),
            credentials: KeyedLocks::new(),
        });
        let slots = Arc::new(Semaphore::new(self.opts.concurrency));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut consumer = self.consumer;
        // The region has a live worker as long as this runs (see
        // crate::presence); dropped without a goodbye if this is aborted.
        let announcer = crate::presence::Announcer::with_default_interval(
            self.client.clone(),
            &self.opts.region,
            &self.opts.worker_id,
            self.opts.concurrency,
            self.metrics.clone(),
        );

        // Each pull asks for exactly as many tasks as there are free slots,
        // and the next pull waits for a slot: a task delivered to this
        // worker starts at once, never waits in the client's buffer behind
        // busy slots (where the short ack wait would run out and the server
        // would hand it to another worker while this one still holds it).
        'pull: loop {
            reap(&mut tasks);
            let mut permits = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'pull,
                _ = ctx.crash.cancelled() => break 'pull,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => vec![p],
                    Err(_) => break 'pull,
                },
            };
            while permits.len() < MAX_PULL_BATCH {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let opened = tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                _ = ctx.crash.cancelled() => break 'pull,
                r = consumer
                    .batch()
                    .max_messages(permits.len())
                    .expires(PULL_EXPIRES)
                    .messages() => r,
            };
            let mut batch = match opened {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Cannot pull tasks; retrying");
                    drop(permits);
                    if !rebind(&self.js, &self.opts, &mut consumer, &shutdown, &ctx.crash).await {
                        break 'pull;
                    }
                    continue 'pull;
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {
                        hand_back(&mut batch).await;
                        break 'pull;
                    }
                    _ = ctx.crash.cancelled() => break 'pull,
                    m = batch.next() => m,
                };
                match next {
                    Some(Ok(msg)) => {
                        // The pull asked for no more messages than permits.
                        let Some(permit) = permits.pop() else {
                            warn!("More tasks delivered than pulled; handing one back");
                            let _ = msg.ack_with(AckKind::Nak(None)).await;
                            continue;
                        };
                        let ctx = ctx.clone();
                        tasks.spawn(async move {
                            let _in_flight = ctx.metrics.in_flight();
                            let handled = handle(&ctx, &msg).await;
                            settle(&msg, &handled).await;
                            ctx.count(&handled);
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        // The pull ended with an error status (the consumer
                        // deleted, too many waiting pulls, ...): the free
                        // slots pull again after a pause.
                        warn!(error = %e, "Error while pulling tasks");
                        drop(permits);
                        if !rebind(&self.js, &self.opts, &mut consumer, &shutdown, &ctx.crash).await
                        {
                            break 'pull;
                        }
                        continue 'pull;
                    }
                    // The pull is complete or expired: its unused slots pull
                    // again.
                    None => continue 'pull,
                }
            }
        }
        // Leaving the loop dropped the pull: no more tasks come. One that
        // arrived for an interrupted pull is redelivered by the server after
        // the ack wait.

        if ctx.crash.is_cancelled() {
            // As a killed process: whatever is in flight is abandoned un-acked.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            ctx.counters.crashed.store(true, Ordering::Relaxed);
            drop(announcer);
            warn!(worker = %self.opts.worker_id, "Worker stopped by an injected crash");
            return Ok(ctx.counters.snapshot());
        }
        info!(
            in_flight = tasks.len(),
            "Shutting down: finishing the tasks in hand"
        );
        while let Some(r) = tasks.join_next().await {
            log_join(r);
        }
        announcer.leave().await;
        let stats = ctx.counters.snapshot();
        info!(?stats, "Worker stopped");
        Ok(stats)
    }
}

/// On shutdown: naks (without delay) the tasks of the pull under way that
/// already arrived but were never started, so that another worker of the
/// region gets them now instead of after the ack wait.
async fn hand_back(batch: &mut pull::Batch) {
    use futures::FutureExt;
    let mut handed = 0u64;
    while let Some(Some(Ok(msg))) = batch.next().now_or_never() {
        if msg.ack_with(AckKind::Nak(None)).await.is_ok() {
            handed += 1;
        }
    }
    if handed > 0 {
        info!(handed, "Handed back tasks pulled but not started");
    }
}

/// After a failed pull: waits a moment, then looks the region's consumer up
/// again (it may have been deleted: created anew where this worker may).
/// False when shutdown or a crash came first.
async fn rebind(
    js: &jetstream::Context,
    opts: &WorkerOptions,
    consumer: &mut Consumer<pull::Config>,
    shutdown: &CancellationToken,
    crash: &CancellationToken,
) -> bool {
    if !pause(shutdown, crash, RESUBSCRIBE_DELAY).await {
        return false;
    }
    match topology::bind_or_ensure_region(js, &opts.region, &opts.topology).await {
        Ok((c, _)) => *consumer = c,
        Err(e) => warn!(error = %e, "Cannot ensure the region's consumer"),
    }
    true
}

/// Sleeps `d` unless shutdown or a crash comes first; false if it did.
async fn pause(shutdown: &CancellationToken, crash: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = crash.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

fn reap(tasks: &mut JoinSet<()>) {
    while let Some(r) = tasks.try_join_next() {
        log_join(r);
    }
}

fn log_join(r: Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        if e.is_panic() {
            // The task stays un-acked and is redelivered.
            error!(error = %e, "A task handler panicked");
        }
    }
}

impl Ctx {
    fn count(&self, h: &Handled) {
        let c = &self.counters;
        let field = match h {
            Handled::Completed(Outcome::Succeeded) => &c.succeeded,
            Handled::Completed(Outcome::Failed) => &c.failed,
            Handled::Completed(Outcome::RolledBack) => &c.rolled_back,
            Handled::Completed(Outcome::RollbackRefused) => &c.rollback_refused,
            Handled::Poison => {
                self.metrics.dead_lettered();
                &c.terminated
            }
            Handled::Requeue { .. } => {
                self.metrics.requeued();
                &c.requeued
            }
            Handled::Crashed(_) => return,
        };
        field.fetch_add(1, Ordering::Relaxed);
    }

    async fn publish_result(
        &self,
        result: &RotationResult,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        if self.faults.drop_result() {
            warn!(task = %result.task_id, "Fault injection: dropping the result publish");
            return Err(PublishError::Ack("dropped by fault injection".into()));
        }
        self.send_result(result, traceparent).await
    }

    /// Publishes a finished task's result, trying again (0.5 s, doubling to
    /// 5 s) for as long as it takes, while the caller keeps the task in
    /// progress: when the results stream cannot be reached (the region cut
    /// off from the home cluster), the task stays with this worker instead
    /// of going back to the queue, where every redelivery would count
    /// towards its max deliveries and a long outage would give it up
    /// although its rotation is done. Gives up only when the worker shuts
    /// down (the task is then redelivered and its result published from
    /// the record).
    async fn publish_result_until_done(
        &self,
        result: &RotationResult,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        if self.faults.drop_result() {
            warn!(task = %result.task_id, "Fault injection: dropping the result publish");
            return Err(PublishError::Ack("dropped by fault injection".into()));
        }
        let mut wait = RESULT_RETRY_FIRST;
        let mut attempts = 1u32;
        loop {
            match self.send_result(result, traceparent).await {
                Ok(()) => {
                    if attempts > 1 {
                        info!(task = %result.task_id, attempts, "Result published after the results stream could not be reached");
                    }
                    return Ok(());
                }
                Err(e) if self.shutdown.is_cancelled() => return Err(e),
                Err(e) => {
                    warn!(task = %result.task_id, attempts, error = %e, retry_in = ?wait, "Could not publish the result; keeping the task and trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    wait = (wait * 2).min(RESULT_RETRY_MAX);
                    attempts += 1;
                }
            }
        }
    }

    async fn send_result(
        &self,
        result: &RotationResult,
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        // Durable write #3 of a rotation. The message id makes a republished
        // result (after a redelivery) a duplicate the server drops.
        let msg_id = format!("{}:result", result.task_id);
        publish::send(
            &self.js,
            subjects::result(&result.region, &result.campaign_id),
            Format::MsgPack,
            &msg_id,
            result,
            traceparent,
        )
        .await?
        .await
        .map_err(|e| PublishError::Ack(e.to_string()))?;
        Ok(())
    }

    /// Records a refused message on the dead-letter stream (and as a campaign
    /// event when its subject names a campaign).
    async fn dead_letter(
        &self,
        msg: &jetstream::Message,
        refusal: Refusal,
    ) -> Result<(), PublishError> {
        let subject = msg.subject.as_str();
        let seq = msg.info().map(|i| i.stream_sequence).ok();
        let id = match seq {
            Some(s) => format!("deadletter:{}:{s}", self.region),
            None => ids::random_id("deadletter"),
        };
        let campaign = subjects::parse_task(subject)
            .map(|(_, c)| c.to_string())
            .filter(|c| ids::validate("campaign id", c).is_ok());
        let reason = format!("{}: {}", refusal.reason, refusal.detail);
        warn!(subject, reason = %reason, "Dead-lettering a task");
        let kept = &msg.payload[..msg.payload.len().min(MAX_DEAD_LETTER_PAYLOAD)];
        let dl = DeadLetter {
            v: SCHEMA_VERSION,
            region: self.region.clone(),
            subject: subject.to_string(),
            reason: reason.clone(),
            task_id: refusal.task_id.clone(),
            campaign_id: refusal.campaign_id.clone().or_else(|| campaign.clone()),
            payload_len: msg.payload.len(),
            payload_b64: base64::engine::general_purpose::STANDARD.encode(kept),
            at_ms: now_ms(),
        };
        publish::send_and_confirm(
            &self.js,
            subjects::dead_letter(&self.region),
            Format::Json,
            &id,
            &dl,
        )
        .await?;
        if let Some(campaign) = campaign {
            let ev = CampaignEvent {
                v: SCHEMA_VERSION,
                campaign_id: campaign.clone(),
                at_ms: dl.at_ms,
                kind: EventKind::DeadLetter {
                    region: self.region.clone(),
                    task_id: refusal.task_id,
                    reason,
                },
            };
            publish::send_and_confirm(
                &self.js,
                subjects::event(&campaign, "dead_letter"),
                Format::Json,
                &format!("{id}:event"),
                &ev,
            )
            .await?;
        }
        Ok(())
    }
}

/// Why a message is refused without being run.
struct Refusal {
    /// Machine-friendly reason (`malformed`, `unknown_version`, `wrong_region`, ...).
    reason: &'static str,
    detail: String,
    task_id: Option<String>,
    campaign_id: Option<String>,
    /// The task, when it decoded.
    task: Option<Box<RotationTask>>,
}

impl Refusal {
    /// The `Failed` result that counts a refused task in its wave at once,
    /// so the wave does not wait for its deadline. Only for a task that
    /// decoded and was published under its own campaign: anything else may
    /// not be what it claims to be, and its wave counts it at the deadline.
    fn failed_result(
        &self,
        region: &str,
        subject: &str,
        worker_id: &str,
    ) -> Option<RotationResult> {
        let t = self.task.as_deref()?;
        let (_, campaign) = subjects::parse_task(subject)?;
        if campaign != t.campaign_id
            || ids::validate("campaign id", campaign).is_err()
            || !valid_task_id(&t.task_id)
        {
            return None;
        }
        Some(RotationResult {
            v: SCHEMA_VERSION,
            task_id: t.task_id.clone(),
            campaign_id: t.campaign_id.clone(),
            wave: t.wave,
            index: t.index,
            action: t.action,
            credential_id: t.credential_id.clone(),
            region: region.to_string(),
            outcome: Outcome::Failed,
            step: Step::Received,
            error_class: Some(ErrorClass::Malformed),
            error: Some(format!("task refused and dead-lettered: {}", self.reason)),
            timings: Vec::new(),
            new_fingerprint: None,
            old_fingerprint: None,
            old_rejected: None,
            worker_id: worker_id.to_string(),
            finished_at_ms: now_ms(),
            consumers: Vec::new(),
        })
    }
}

/// Decodes a task and checks that this worker may run it.
fn accept(
    region: &str,
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    verifier: &Verifier,
) -> Result<RotationTask, Refusal> {
    let task: RotationTask = codec::decode(headers, payload).map_err(|e| Refusal {
        reason: e.reason(),
        detail: e.to_string(),
        task_id: None,
        campaign_id: None,
        task: None,
    })?;
    // The signature first: a task moved to another subject or altered is
    // refused as such, before anything it claims is looked at.
    if let Err(e) = verifier.verify(subject, headers, &task, payload, now_ms()) {
        return Err(Refusal {
            reason: e.reason(),
            detail: e.to_string(),
            task_id: Some(task.task_id.clone()).filter(|t| valid_task_id(t)),
            campaign_id: Some(task.campaign_id.clone())
                .filter(|c| ids::validate("campaign id", c).is_ok()),
            // Only an authentic task (expired, not forged) is counted in its
            // wave at once; a forgery must not be able to fail a real task.
            task: e.is_authentic().then(|| Box::new(task.clone())),
        });
    }
    let refuse = |reason: &'static str, detail: String| Refusal {
        reason,
        detail,
        task_id: Some(task.task_id.clone()).filter(|t| valid_task_id(t)),
        campaign_id: Some(task.campaign_id.clone())
            .filter(|c| ids::validate("campaign id", c).is_ok()),
        task: Some(Box::new(task.clone())),
    };
    if !valid_task_id(&task.task_id) {
        return Err(refuse(
            "invalid_id",
            "task_id must be 1-512 visible ASCII characters".into(),
        ));
    }
    for (what, v) in [
        ("region", &task.region),
        ("campaign id", &task.campaign_id),
        ("credential id", &task.credential_id),
        ("endpoint", &task.endpoint),
    ] {
        ids::validate(what, v).map_err(|e| refuse("invalid_id", e.to_string()))?;
    }
    ids::validate_principal(&task.principal)
        .map_err(|e| refuse("invalid_principal", e.to_string()))?;
    if task.region != region {
        return Err(refuse(
            "wrong_region",
            format!(
                "task for region {} reached a worker of region {region}",
                task.region
            ),
        ));
    }
    if let Some((_, campaign)) = subjects::parse_task(subject) {
        if campaign != task.campaign_id {
            return Err(refuse(
                "subject_mismatch",
                format!(
                    "task of campaign {} published under campaign {campaign}",
                    task.campaign_id
                ),
            ));
        }
    }
    Ok(task)
}

fn valid_task_id(t: &str) -> bool {
    !t.is_empty() && t.len() <= 512 && t.bytes().all(|b| b.is_ascii_graphic())
}

/// Sends `AckKind::Progress` every `every` while `fut` runs, so that a long
/// step (slow target, retry backoff) is not redelivered to another worker.
async fn with_progress<F: Future>(msg: &jetstream::Message, every: Duration, fut: F) -> F::Output {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    debug!(error = %e, "Could not send progress");
                }
            }
        }
    }
}

/// Handles one message from decode to the moment it may be acknowledged.
async fn handle(ctx: &Ctx, msg: &jetstream::Message) -> Handled {
    let task = match accept(
        &ctx.region,
        msg.subject.as_str(),
        msg.headers.as_ref(),
        &msg.payload,
        &ctx.verifier,
    ) {
        Ok(t) => t,
        Err(refusal) => {
            let failed = refusal.failed_result(&ctx.region, msg.subject.as_str(), &ctx.worker_id);
            let recorded = match ctx.dead_letter(msg, refusal).await {
                Ok(()) => match failed {
                    Some(r) => ctx.publish_result(&r, None).await,
                    None => Ok(()),
                },
                Err(e) => Err(e),
            };
            return match recorded {
                Ok(()) => Handled::Poison,
                // Never drop a message without its record: try again later.
                Err(e) => {
                    warn!(error = %e, "Could not publish a dead letter");
                    Handled::Requeue {
                        delay: Some(REQUEUE_DELAY),
                    }
                }
            };
        }
    };
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(0);
    let span = info_span!(
        "task",
        task = %task.task_id,
        credential = %task.credential_id,
        campaign = %task.campaign_id,
        wave = task.wave,
        action = ?task.action,
        delivered
    );
    // A child of the coordinator's wave span (W3C trace context in the headers).
    keywave_common::telemetry::set_parent(&span, msg.headers.as_ref());
    async {
        let traceparent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(codec::TRACEPARENT))
            .map(|v| v.as_str().to_string());
        let work = async {
            // A redelivery that overtook a still-running delivery of the same
            // credential waits for it, then resumes from the record.
            let _turn = ctx.credentials.lock(&task.credential_id).await;
            match ctx.protocol.execute(&task, &ctx.shutdown).await {
                Flow::Finished(result) => {
                    let published = ctx
                        .publish_result_until_done(&result, traceparent.as_deref())
                        .await;
                    if published.is_ok() {
                        ctx.metrics.result(&result);
                    }
                    match published {
                        Ok(()) => match ctx.faults.after_publish() {
                            Ok(()) => Handled::Completed(result.outcome),
                            Err(c) => {
                                ctx.crash.cancel();
                                Handled::Crashed(c.point)
                            }
                        },
                        Err(e) => {
                            warn!(error = %e, "Could not publish the result; requeueing");
                            Handled::Requeue {
                                delay: Some(REQUEUE_DELAY),
                            }
                        }
                    }
                }
                Flow::Crashed(point) => {
                    ctx.crash.cancel();
                    Handled::Crashed(point)
                }
                Flow::Interrupted => Handled::Requeue { delay: None },
                Flow::Retry { delay } => Handled::Requeue { delay: Some(delay) },
            }
        };
        with_progress(msg, ctx.progress_every, work).await
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::CrashMode;
    use crate::targets::sim::{SimOptions, SimTarget};
    use crate::testutil::{eventually, nats, unique_region};
    use keywave_common::crypto::{generate, SecretPolicy};
    use keywave_common::wire::{Strategy, TargetKind, TaskAction};
    use keywave_harness::NatsServer;
    use std::collections::HashMap;
    use std::sync::Mutex;

    fn test_topology() -> topology::Config {
        topology::Config {
            task_backoff: vec![Duration::from_millis(700), Duration::from_secs(1)],
            task_max_deliver: 5,
            ..Default::default()
        }
    }

    struct Env {
        /// The private server (killed on drop).
        _server: NatsServer,
        client: async_nats::Client,
        js: jetstream::Context,
        region: String,
        campaign: String,
        sim: Arc<SimTarget>,
        targets: Arc<Targets>,
        key: RegionKey,
    }

    impl Env {
        async fn new() -> Self {
            let (server, client) = nats().await;
            let sim = SimTarget::new(SimOptions::default());
            let mut targets = Targets::new();
            targets.insert("sim", sim.clone(), 16);
            Env {
                _server: server,
                js: topology::context(client.clone()),
                client,
                region: unique_region(),
                campaign: ids::random_id("camp"),
                sim,
                targets: Arc::new(targets),
                key: RegionKey::generate(),
            }
        }

        async fn worker(&self, faults: Faults) -> Worker {
            Worker::start(
                self.client.clone(),
                WorkerOptions {
                    region: self.region.clone(),
                    worker_id: ids::random_id("w"),
                    concurrency: 4,
                    topology: test_topology(),
                    faults,
                    ..Default::default()
                },
                self.key.clone(),
                self.targets.clone(),
            )
            .await
            .unwrap()
        }

        fn task(&self, cred: &str) -> RotationTask {
            RotationTask {
                v: SCHEMA_VERSION,
                task_id: RotationTask::make_id(&self.campaign, 0, TaskAction::Rotate, cred),
                campaign_id: self.campaign.clone(),
                wave: 0,
                index: 0,
                action: TaskAction::Rotate,
                strategy: Strategy::Continuity,
                credential_id: cred.into(),
                region: self.region.clone(),
                endpoint: "sim".into(),
                kind: TargetKind::Sim,
                principal: format!("p-{cred}"),
                issued_at_ms: now_ms(),
                deadline_ms: now_ms() + 60_000,
                run_timeout_ms: 0,
                consumers: Vec::new(),
            }
        }

        async fn publish_raw(&self, headers: async_nats::HeaderMap, payload: Vec<u8>) {
            self.js
                .publish_with_headers(
                    subjects::task(&self.region, &self.campaign),
                    headers,
                    payload.into(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
        }

        async fn publish_task(&self, t: &RotationTask) {
            publish::send_and_confirm(
                &self.js,
                subjects::task(&self.region, &self.campaign),
                Format::MsgPack,
                &t.task_id,
                t,
            )
            .await
            .unwrap();
        }
    }

    /// Collects messages of a core subscription in the background.
    fn collect(mut sub: async_nats::Subscriber) -> Arc<Mutex<Vec<async_nats::Message>>> {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                o.lock().unwrap().push(m);
            }
        });
        out
    }

    #[tokio::test]
    async fn poison_tasks_are_dead_lettered_and_good_tasks_still_complete() {
        let env = Env::new().await;
        let worker = env.worker(Faults::none()).await;
        let store = worker.store().clone();
        let results = collect(
            env.client
                .subscribe(format!("keywave.result.{}.>", env.region))
                .await
                .unwrap(),
        );
        let dead = collect(
            env.client
                .subscribe(subjects::dead_letter(&env.region))
                .await
                .unwrap(),
        );
        let events = collect(
            env.client
                .subscribe(subjects::event(&env.campaign, "dead_letter"))
                .await
                .unwrap(),
        );
        env.client.flush().await.unwrap();

        // Poison first: garbage, then a task from a future schema version.
        env.publish_raw(
            codec::headers(Format::MsgPack, &ids::random_id("bad")),
            b"\xc1\xff not msgpack".to_vec(),
        )
        .await;
        let mut future_task = env.task("future");
        future_task.v = 99;
        env.publish_raw(
            {
                let mut h = async_nats::HeaderMap::new();
                h.insert(codec::CONTENT_TYPE, codec::MSGPACK);
                // Unique: the stream de-duplicates message ids across runs.
                h.insert(codec::MSG_ID, ids::random_id("bad").as_str());
                h
            },
            codec::encode(Format::MsgPack, &future_task)
                .unwrap()
                .to_vec(),
        )
        .await;
        // Then good tasks.
        let mut olds = HashMap::new();
        for i in 0..3 {
            let cred = format!("good-{i}");
            let old = generate(&SecretPolicy::default());
            env.sim.seed(&format!("p-{cred}"), &old);
            store.enroll(&cred, old.clone()).await.unwrap();
            olds.insert(cred.clone(), old);
            env.publish_task(&env.task(&cred)).await;
        }

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(worker.run(shutdown.clone()));
        eventually(
            Duration::from_secs(20),
            "3 results and 2 dead letters",
            || {
                let (r, d) = (results.lock().unwrap().len(), dead.lock().unwrap().len());
                async move { r >= 3 && d >= 2 }
            },
        )
        .await;
        eventually(Duration::from_secs(5), "2 dead-letter events", || {
            let n = events.lock().unwrap().len();
            async move { n >= 2 }
        })
        .await;
        shutdown.cancel();
        let stats = running.await.unwrap().unwrap();
        assert_eq!(stats.terminated, 2, "{stats:?}");
        assert_eq!(stats.succeeded, 3, "{stats:?}");
        assert!(!stats.crashed);

        let mut reasons: Vec<String> = dead
            .lock()
            .unwrap()
            .iter()
            .map(|m| {
                let dl: DeadLetter = codec::decode_plain(m.headers.as_ref(), &m.payload).unwrap();
                assert_eq!(dl.region, env.region);
                dl.reason.split(':').next().unwrap().to_string()
            })
            .collect();
        reasons.sort();
        assert_eq!(reasons, vec!["malformed", "unknown_version"]);

        for m in results.lock().unwrap().iter() {
            let r: RotationResult = codec::decode(m.headers.as_ref(), &m.payload).unwrap();
            assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
            let old = &olds[&r.credential_id];
            let principal = format!("p-{}", r.credential_id);
            assert!(!env.sim.accepts(&principal, old));
            assert_eq!(env.sim.set_count(&principal), 1);
        }

        // Nothing left in the queue: poison was terminated, good tasks acked.
        let mut consumer: Consumer<pull::Config> = env
            .js
            .get_stream(topology::tasks_stream(&env.region))
            .await
            .unwrap()
            .get_consumer(&topology::worker_consumer(&env.region))
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!(info.num_pending, 0);
        assert_eq!(info.num_ack_pending, 0);
    }

    #[tokio::test]
    async fn crash_after_set_is_resumed_by_another_worker() {
        let env = Env::new().await;
        let crashing = env
            .worker(Faults::crash_after(Step::Set, CrashMode::StopWithoutAck))
            .await;
        let store = crashing.store().clone();
        let results = collect(
            env.client
                .subscribe(format!("keywave.result.{}.>", env.region))
                .await
                .unwrap(),
        );
        env.client.flush().await.unwrap();
        let old = generate(&SecretPolicy::default());
        env.sim.seed("p-c1", &old);
        store.enroll("c1", old.clone()).await.unwrap();
        env.publish_task(&env.task("c1")).await;

        // The first worker stops on its own, leaving the task un-acked.
        let stats = tokio::time::timeout(
            Duration::from_secs(20),
            crashing.run(CancellationToken::new()),
        )
        .await
        .expect("a crashed worker returns")
        .unwrap();
        assert!(stats.crashed);
        assert_eq!(env.sim.set_count("p-c1"), 1);
        assert!(results.lock().unwrap().is_empty());

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(env.worker(Faults::none()).await.run(shutdown.clone()));
        eventually(Duration::from_secs(20), "the resumed result", || {
            let n = results.lock().unwrap().len();
            async move { n >= 1 }
        })
        .await;
        shutdown.cancel();
        let stats = running.await.unwrap().unwrap();
        assert_eq!(stats.succeeded, 1);
        let m = results.lock().unwrap()[0].clone();
        let r: RotationResult = codec::decode(m.headers.as_ref(), &m.payload).unwrap();
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(env.sim.set_count("p-c1"), 1, "rotated exactly once");
        assert!(!env.sim.accepts("p-c1", &old));
    }

    #[tokio::test]
    async fn a_worker_with_a_detect_key_announces_the_promoted_secret() {
        let env = Env::new().await;
        let key = keywave_common::detect::DetectKey::generate();
        let worker = Worker::start(
            env.client.clone(),
            WorkerOptions {
                region: env.region.clone(),
                concurrency: 2,
                topology: test_topology(),
                detect_key: Some(key.clone()),
                ..Default::default()
            },
            env.key.clone(),
            env.targets.clone(),
        )
        .await
        .unwrap();
        let store = worker.store().clone();
        let old = generate(&SecretPolicy::default());
        env.sim.seed("p-d1", &old);
        store.enroll("d1", old.clone()).await.unwrap();
        env.publish_task(&env.task("d1")).await;

        let shutdown = CancellationToken::new();
        let running = tokio::spawn(worker.run(shutdown.clone()));
        let rotated = env
            .js
            .get_stream(keywave_common::detect::STREAM_ROTATED)
            .await
            .unwrap();
        let subject = subjects::rotated(&env.region, "d1");
        eventually(Duration::from_secs(20), "the rotation notice", || {
            let (rotated, subject) = (rotated.clone(), subject.clone());
            async move {
                rotated
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .is_ok()
            }
        })
        .await;
        shutdown.cancel();
        assert_eq!(running.await.unwrap().unwrap().succeeded, 1);
        let m = rotated
            .get_last_raw_message_by_subject(&subject)
            .await
            .unwrap();
        let n: keywave_common::detect::RotatedNotice = serde_json::from_slice(&m.payload).unwrap();
        let new = store.get("d1").await.unwrap().unwrap().current.unwrap();
        assert_eq!(n.detect_fp, key.fingerprint_secret(&new.secret));
        assert_eq!(n.previous_detect_fp, Some(key.fingerprint_secret(&old)));
    }

    #[test]
    fn foreign_and_invalid_tasks_are_refused() {
        let env_task = |f: &dyn Fn(&mut RotationTask)| {
            let mut t = RotationTask {
                v: SCHEMA_VERSION,
                task_id: "camp:w0:cred".into(),
                campaign_id: "camp".into(),
                wave: 0,
                index: 0,
                action: TaskAction::Rotate,
                strategy: Strategy::Continuity,
                credential_id: "cred".into(),
                region: "eu".into(),
                endpoint: "sim".into(),
                kind: TargetKind::Sim,
                principal: "app".into(),
                issued_at_ms: 0,
                deadline_ms: 0,
                run_timeout_ms: 0,
                consumers: Vec::new(),
            };
            f(&mut t);
            codec::encode(Format::Json, &t).unwrap()
        };
        let subject = subjects::task("eu", "camp");
        let check = |payload: &[u8]| {
            accept("eu", &subject, None, payload, &Verifier::default()).map_err(|r| r.reason)
        };
        assert!(check(&env_task(&|_| {})).is_ok());
        assert_eq!(
            check(&env_task(&|t| t.region = "us".into())).unwrap_err(),
            "wrong_region"
        );
        assert_eq!(
            check(&env_task(&|t| t.credential_id = "a.b".into())).unwrap_err(),
            "invalid_id"
        );
        assert_eq!(
            check(&env_task(&|t| t.endpoint = "*".into())).unwrap_err(),
            "invalid_id"
        );
        assert_eq!(
            check(&env_task(&|t| t.task_id = "a b".into())).unwrap_err(),
            "invalid_id"
        );
        assert_eq!(
            check(&env_task(&|t| t.principal = "".into())).unwrap_err(),
            "invalid_principal"
        );
        assert_eq!(
            check(&env_task(&|t| t.campaign_id = "other".into())).unwrap_err(),
            "subject_mismatch"
        );
        assert_eq!(
            check(&env_task(&|t| t.v = 2)).unwrap_err(),
            "unknown_version"
        );
        assert_eq!(check(b"{not json").unwrap_err(), "malformed");
        assert_eq!(
            check(&vec![b' '; codec::MAX_MESSAGE_BYTES + 1]).unwrap_err(),
            "oversized"
        );
        let mut h = async_nats::HeaderMap::new();
        h.insert(codec::CONTENT_TYPE, "text/plain");
        assert_eq!(
            accept(
                "eu",
                &subject,
                Some(&h),
                &env_task(&|_| {}),
                &Verifier::default()
            )
            .map_err(|r| r.reason)
            .unwrap_err(),
            "unsupported_content_type"
        );
    }
}
