//! A campaign's owner task: the only writer of the campaign's [`Machine`]
//! (its book). Results (from the aggregator), operator requests and
//! approvals (from the API and the control watch), job outcomes, timers and
//! lease changes arrive as [`Msg`]s on one bounded channel; each goes through
//! the pure [`Machine::step`], and this shell carries out the returned
//! [`Effect`]s: events, compare-and-set snapshot saves, the jobs that publish
//! tasks, ask consumer agents or read approvals (they report back as
//! messages), and replies. Readers get the status from a `watch` of
//! immutable snapshots the owner publishes.

use super::{
    events,
    fault::{Crash, CrashPoint},
    machine::{publish_mode, Effect, Machine, Msg, PreflightReport, PublishMode},
    plan::{PlanError, PlanManifest, PlanReader},
    preflight::{self, AgentKey},
    snapshot_key, start_window_ms, Engine, Handle, TASK_ACK_WINDOW,
};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::kv;
use futures::StreamExt;
use keywave_common::{
    api::CampaignStatus,
    codec, now_ms,
    publish::{AckWindow, PublishError},
    subjects,
    wire::{CampaignSpec, RotationResult, RotationTask, TaskAction, VerifyKind, SCHEMA_VERSION},
};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
enum DriveError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("saving the campaign snapshot: {0}")]
    Save(String),
    #[error("coordinator shutting down")]
    Shutdown,
    /// This coordinator lost its lease (or somebody else wrote the
    /// snapshot): stop at once, publish and save nothing.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The lease cannot be checked right now: retried.
    #[error("cannot check the coordinator lease: {0}")]
    Lease(String),
    #[error(transparent)]
    Crashed(#[from] Crash),
    /// Reading approvals failed: retried.
    #[error("approvals: {0}")]
    Approvals(#[source] keywave_common::topology::StreamReadError),
    /// A region's task stream could not be created: retried.
    #[error(transparent)]
    Topology(#[from] keywave_common::topology::TopologyError),
}

impl From<crate::lease::LeaseError> for DriveError {
    fn from(e: crate::lease::LeaseError) -> Self {
        match e {
            crate::lease::LeaseError::Unavailable(d) => DriveError::Lease(d),
            other => DriveError::Fenced(other.to_string()),
        }
    }
}

/// A results consumer that delivered nothing for this long is replaced
/// (from the message after the last one applied, so nothing is counted
/// twice). Ordered consumers can stall without an error when the stream's
/// leader moves (a cluster node lost); well under any task timeout, so a
/// stalled consumer never turns a wave's results into `no_result`.
const RESULTS_IDLE: Duration = Duration::from_secs(5);
/// How long a result handed to this coordinator may go unacknowledged before
/// the server delivers it again. A delivery can be lost on its way into the
/// owner (a pull stream dropped with messages in its buffer, a client that
/// missed heartbeats): the wave then waits this long for the result, so it is
/// short. Results are acked as soon as the owner has them, and at most one
/// pull batch is in hand at a time, so a short wait causes no redeliveries;
/// a redelivered result is a duplicate the book ignores.
const RESULTS_ACK_WAIT: Duration = Duration::from_secs(5);
/// Expiry of one pull request for results, and its idle heartbeat: a request
/// the server leaves unserved is renewed within seconds.
const RESULTS_PULL_EXPIRES: Duration = Duration::from_secs(5);
const RESULTS_PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// Results requested in one pull.
const RESULTS_PULL_BATCH: usize = 256;
/// Longest wait before a failed effect (event, save, lease check) is tried
/// again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Most messages handled before the status snapshot is published again.
const SNAPSHOT_BATCH: usize = 256;

/// Whether the owner goes on after a batch of effects.
enum Flow {
    Continue,
    Exit,
}

/// What the owner task needs besides the machine.
pub(super) struct Owner {
    pub engine: Arc<Engine>,
    pub h: Arc<Handle>,
    pub manifest: PlanManifest,
    /// KV revision of the last snapshot written or read: the next save is a
    /// compare-and-set on it.
    pub snapshot_rev: u64,
    pub published: watch::Sender<Arc<CampaignStatus>>,
}

/// Runs a campaign until it is finished or the coordinator stops.
pub(super) async fn run(mut owner: Owner, mut machine: Machine, rx: mpsc::Receiver<Msg>) {
    let engine = owner.engine.clone();
    let h = owner.h.clone();
    let aggregator = engine.tracker.spawn(aggregate(engine.clone(), h.clone()));
    // Only a campaign with approval gates listens for approvals (a
    // least-privilege coordinator of the others needs no such subscription).
    if !machine.status().spec.approve_before_waves.is_empty() {
        engine
            .tracker
            .spawn(follow_approvals(engine.clone(), h.clone()));
    }
    engine
        .tracker
        .spawn(forward_stop(engine.clone(), h.clone()));
    engine
        .tracker
        .spawn(forward_regions(engine.clone(), h.clone()));
    owner.serve(&mut machine, rx).await;
    owner.publish_snapshot(&machine);
    h.stop.cancel();
    let _ = aggregator.await;
    if machine.state().is_terminal() {
        engine.forget(&h.cid);
    }
}

/// Lease changes and shutdown reach the owner as a message.
async fn forward_stop(engine: Arc<Engine>, h: Arc<Handle>) {
    let fenced = tokio::select! {
        _ = engine.halted.cancelled() => true,
        _ = h.stop.cancelled() => engine.halted.is_cancelled(),
    };
    let _ = h.send(Msg::Stop { fenced }).await;
}

/// Every region view (see [`crate::regions`]) reaches the owner as a
/// message: liveness decides pauses, the queue figures go in the status.
async fn forward_regions(engine: Arc<Engine>, h: Arc<Handle>) {
    let mut views = engine.regions.subscribe();
    loop {
        let view = views.borrow_and_update().clone();
        if h.send(Msg::Regions(view)).await.is_err() {
            return;
        }
        tokio::select! {
            r = views.changed() => if r.is_err() { return },
            _ = h.stop.cancelled() => return,
        }
    }
}

impl Owner {
    fn cid(&self) -> &str {
        &self.h.cid
    }

    async fn serve(&mut self, m: &mut Machine, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(self.engine.opts.progress_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut wake: Option<u64> = None;
        loop {
            let sleep = wake.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(at.saturating_sub(now_ms()))
            });
            let first = tokio::select! {
                msg = rx.recv() => msg.unwrap_or(Msg::Stop { fenced: self.engine.halted.is_cancelled() }),
                _ = tokio::time::sleep(sleep) => Msg::Timer,
                _ = tick.tick() => Msg::Tick,
            };
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(msg) = next.take() {
                let out = m.step(msg, now_ms());
                wake = out.wake_at_ms;
                if let Flow::Exit = self.execute(m, out.effects).await {
                    return;
                }
                handled += 1;
                if handled < SNAPSHOT_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            self.publish_snapshot(m);
        }
    }

    fn publish_snapshot(&self, m: &Machine) {
        self.published.send_replace(Arc::new(m.status().clone()));
    }

    /// Carries out the effects of one step, in order. A failed event, save
    /// or lease check is retried (with backoff) until it succeeds or the
    /// coordinator stops; a fenced or crashed coordinator stops at once.
    async fn execute(&mut self, m: &mut Machine, effects: Vec<Effect>) -> Flow {
        for effect in effects {
            let r = match effect {
                Effect::Fence => self.retry(m, Step::Fence).await,
                Effect::Event(kind) => self.retry(m, Step::Event(kind)).await,
                Effect::Save => self.retry(m, Step::Save).await,
                Effect::Counted(r) => {
                    self.engine.opts.metrics.result(&r);
                    Ok(())
                }
                Effect::Fault(point) => {
                    self.engine.opts.faults.hit(point).map_err(DriveError::from)
                }
                Effect::PublishWave { wave } => {
                    self.spawn_publish(m, wave, TaskAction::Rotate, None);
                    Ok(())
                }
                Effect::PublishRollback { wave, targets } => {
                    self.spawn_publish(m, wave, TaskAction::Rollback, Some(targets));
                    Ok(())
                }
                Effect::Preflight { wave } => {
                    self.spawn_preflight(m, wave);
                    Ok(())
                }
                Effect::ReadApprovals { wave } => {
                    self.spawn_read_approvals(wave);
                    Ok(())
                }
                Effect::Withdraw { wave } => {
                    withdraw_tasks(&self.engine, self.cid(), wave, Withdrawal::Decided).await;
                    Ok(())
                }
                Effect::Expire { wave } => {
                    withdraw_tasks(&self.engine, self.cid(), wave, Withdrawal::Expired).await;
                    Ok(())
                }
                Effect::Reissue { wave, targets } => {
                    self.spawn_publish(m, wave, TaskAction::Rotate, Some(targets));
                    Ok(())
                }
                Effect::Reply(reply) => {
                    if let Some(tx) = reply.0 {
                        let _ = tx.send(m.status().clone());
                    }
                    Ok(())
                }
                Effect::Exit => return Flow::Exit,
            };
            match r {
                Ok(()) => {}
                Err(DriveError::Shutdown) => return Flow::Exit,
                Err(DriveError::Crashed(c)) => {
                    warn!(campaign = %self.cid(), error = %c, "Campaign owner crashed (fault injection)");
                    self.engine.crashed.cancel();
                    self.engine.halted.cancel();
                    return Flow::Exit;
                }
                Err(e) => {
                    warn!(campaign = %self.cid(), error = %e, "Campaign owner fenced: another coordinator drives it now");
                    self.engine.halted.cancel();
                    return Flow::Exit;
                }
            }
        }
        Flow::Continue
    }

    /// Runs `step` until it succeeds; only fencing, a crash or shutdown end
    /// it early.
    async fn retry(&mut self, m: &mut Machine, step: Step) -> Result<(), DriveError> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let r = match &step {
                Step::Fence => self.engine.fence().await.map_err(DriveError::from),
                Step::Event(kind) => self.event((**kind).clone()).await,
                Step::Save => self.save(m).await,
            };
            match r {
                Ok(()) => return Ok(()),
                Err(
                    e @ (DriveError::Fenced(_) | DriveError::Crashed(_) | DriveError::Shutdown),
                ) => return Err(e),
                Err(e) => {
                    warn!(campaign = %self.cid(), error = %e, retry_in = ?backoff, "Campaign step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.h.stop.cancelled() => return Err(DriveError::Shutdown),
                    }
                    backoff = (backoff * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
    }

    async fn event(&self, kind: keywave_common::wire::EventKind) -> Result<(), DriveError> {
        if self.engine.halted.is_cancelled() {
            return Err(DriveError::Fenced("the coordinator is halted".into()));
        }
        events::publish(&self.engine.js, self.cid(), kind).await?;
        Ok(())
    }

    /// Saves the snapshot: a compare-and-set on the revision this owner
    /// last read or wrote, so a coordinator that lost its lease can never
    /// overwrite what the new one saved.
    async fn save(&mut self, m: &mut Machine) -> Result<(), DriveError> {
        if self.engine.halted.is_cancelled() {
            return Err(DriveError::Fenced("the coordinator is halted".into()));
        }
        let body = serde_json::to_vec(m.status()).map_err(|e| DriveError::Save(e.to_string()))?;
        match self
            .engine
            .campaigns
            .update(snapshot_key(self.cid()), body.into(), self.snapshot_rev)
            .await
        {
            Ok(rev) => {
                self.snapshot_rev = rev;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.engine.halted.cancel();
                Err(DriveError::Fenced(format!(
                    "the snapshot of {} was written by somebody else",
                    self.cid()
                )))
            }
            Err(e) => {
                m.mark_dirty();
                Err(DriveError::Save(e.to_string()))
            }
        }
    }

    fn job(&self) -> Job {
        Job {
            engine: self.engine.clone(),
            h: self.h.clone(),
            plan: PlanReader::new(self.engine.campaigns.clone(), self.manifest.clone()),
        }
    }

    fn spawn_publish(
        &self,
        m: &Machine,
        w: u32,
        action: TaskAction,
        only: Option<super::book::BitSet>,
    ) {
        let mut job = self.job();
        let spec = m.status().spec.clone();
        let range = wave_range(m.status(), w);
        let state = self.published.subscribe();
        let name = match action {
            TaskAction::Rotate => "rotate",
            TaskAction::Rollback => "rollback",
        };
        // Tasks carry this span's trace context (keywave_common::telemetry::inject).
        let span = tracing::info_span!("wave", wave = w, action = name);
        let fut = async move {
            let r = job
                .publish_tasks(&spec, range, w, action, only.as_ref(), state)
                .await;
            job.report(r.map(|completed| Msg::Published {
                wave: w,
                action,
                completed,
            }))
            .await;
        };
        self.engine
            .tracker
            .spawn(tracing::Instrument::instrument(fut, span));
    }

    fn spawn_preflight(&self, m: &Machine, w: u32) {
        let mut job = self.job();
        let range = wave_range(m.status(), w);
        let fut = async move {
            let r = job.preflight(range).await;
            job.report(r.map(|report| Msg::Preflight { wave: w, report }))
                .await;
        };
        self.engine.tracker.spawn(tracing::Instrument::instrument(
            fut,
            tracing::Span::current(),
        ));
    }

    fn spawn_read_approvals(&self, w: u32) {
        let job = self.job();
        let fut = async move {
            let r = super::read_approvals(&job.engine.js, &job.h.cid)
                .await
                .map_err(DriveError::Approvals);
            job.report(r.map(|found| Msg::Approvals { wave: w, found }))
                .await;
        };
        self.engine.tracker.spawn(fut);
    }
}

/// An effect that is retried until it succeeds.
enum Step {
    Fence,
    Event(Box<keywave_common::wire::EventKind>),
    Save,
}

/// Plan position of wave `w`'s first credential, and the wave's size.
fn wave_range(s: &CampaignStatus, w: u32) -> (u64, u64) {
    let offset = s.waves[..w as usize].iter().map(|x| x.size).sum();
    (offset, s.waves[w as usize].size)
}

/// A job started by the owner: publishing tasks, a pre-flight or reading
/// approvals. It reports its outcome to the owner as a message.
struct Job {
    engine: Arc<Engine>,
    h: Arc<Handle>,
    plan: PlanReader,
}

impl Job {
    fn cid(&self) -> &str {
        &self.h.cid
    }

    /// Sends the outcome to the owner; a fenced or crashed coordinator stops.
    async fn report(&self, r: Result<Msg, DriveError>) {
        let msg = match r {
            Ok(msg) => msg,
            Err(DriveError::Shutdown) => return,
            Err(DriveError::Fenced(why)) => {
                warn!(campaign = %self.cid(), reason = %why, "Campaign job fenced: another coordinator drives it now");
                self.engine.halted.cancel();
                return;
            }
            Err(DriveError::Crashed(c)) => {
                warn!(campaign = %self.cid(), error = %c, "Campaign job crashed (fault injection)");
                self.engine.crashed.cancel();
                self.engine.halted.cancel();
                return;
            }
            Err(e) => Msg::JobFailed {
                error: e.to_string(),
            },
        };
        let _ = self.h.send(msg).await;
    }

    async fn fence(&self) -> Result<(), DriveError> {
        self.engine.fence().await.map_err(DriveError::from)
    }

    /// Publishes the tasks of wave `w` (all of them for a rotation, the
    /// `only` indexes for a rollback), one plan chunk at a time, acks awaited
    /// through a bounded window. Between chunks it looks at the campaign's
    /// state: a pause holds rotation publishing until resumed (rollbacks go
    /// on), the end of the campaign stops it. Returns `false` when stopped.
    async fn publish_tasks(
        &mut self,
        spec: &CampaignSpec,
        (offset, size): (u64, u64),
        w: u32,
        action: TaskAction,
        only: Option<&super::book::BitSet>,
        mut state: watch::Receiver<Arc<CampaignStatus>>,
    ) -> Result<bool, DriveError> {
        let end = offset + size;
        let mut window = AckWindow::new(TASK_ACK_WINDOW);
        let mut pos = offset;
        let cid = self.h.cid.clone();
        let js = self.engine.js.clone();
        let faults = self.engine.opts.faults;
        let mut sent = 0u64;
        let mut held = false;
        // Regions whose task stream this job has made sure of.
        let mut ready = BTreeSet::new();
        while pos < end {
            let current = state.borrow_and_update().state;
            match publish_mode(current, action) {
                PublishMode::Stop => {
                    window.drain().await?;
                    return Ok(false);
                }
                PublishMode::Hold => {
                    window.drain().await?;
                    if !held {
                        held = true;
                        info!(campaign = %cid, wave = w, published = pos - offset, "Publishing held while paused");
                    }
                    tokio::select! {
                        r = state.changed() => if r.is_err() { return Err(DriveError::Shutdown) },
                        _ = self.h.stop.cancelled() => return Err(DriveError::Shutdown),
                    }
                    continue;
                }
                PublishMode::Go => held = false,
            }
            if self.h.stop.is_cancelled() {
                return Err(DriveError::Shutdown);
            }
            self.fence().await?;
            let (chunk, range) = self.plan.slice_at(pos, end).await?;
            for e in &chunk[range] {
                if !ready.contains(&e.region) {
                    self.engine.tasks.ensure(&e.region).await?;
                    ready.insert(e.region.clone());
                }
                let index = pos - offset;
                pos += 1;
                if only.is_some_and(|set| !set.contains(index)) {
                    continue;
                }
                let issued = now_ms();
                let task = RotationTask {
                    v: SCHEMA_VERSION,
                    task_id: RotationTask::make_id(&cid, w, action, &e.id),
                    campaign_id: cid.clone(),
                    wave: w,
                    index: index as u32,
                    action,
                    strategy: spec.strategy,
                    credential_id: e.id.clone(),
                    region: e.region.clone(),
                    endpoint: e.endpoint.clone(),
                    kind: e.kind,
                    principal: e.principal.clone(),
                    issued_at_ms: issued,
                    deadline_ms: issued + start_window_ms(spec.task_timeout_ms),
                    run_timeout_ms: spec.task_timeout_ms,
                    consumers: e.consumers.clone(),
                };
                // Signed (Ed25519, bound to subject, ids, expiry and body)
                // when the coordinator has a signing key.
                let ack = keywave_common::sign::send_task(
                    &js,
                    self.engine.opts.signer.as_ref(),
                    subjects::task(&e.region, &cid),
                    &task,
                )
                .await?;
                window.push(ack).await?;
                sent += 1;
                if action == TaskAction::Rotate {
                    if let Err(c) = faults.hit(CrashPoint::MidPublish {
                        wave: w,
                        after: sent,
                    }) {
                        window.drain().await?;
                        return Err(c.into());
                    }
                }
            }
        }
        window.drain().await?;
        let (confirmed, duplicates) = window.counts();
        debug!(campaign = %cid, wave = w, ?action, confirmed, duplicates, "Tasks published");
        Ok(true)
    }

    /// The pre-flight before a wave (see [`preflight`]): asks the agents of
    /// the wave's `attest` consumers whether they are alive, and which of
    /// the wave's credentials they watch. The verdict is the machine's.
    async fn preflight(&mut self, range: (u64, u64)) -> Result<PreflightReport, DriveError> {
        let agents = self.wave_agents(range).await?;
        if agents.is_empty() {
            return Ok(PreflightReport::NothingToAsk);
        }
        let timeout = self.engine.opts.preflight_timeout;
        debug!(campaign = %self.cid(), agents = agents.len(), "Pre-flight: asking the consumer agents");
        let answers = tokio::select! {
            a = preflight::ping_all(&self.engine.client, &agents, timeout) => a,
            _ = self.h.stop.cancelled() => return Err(DriveError::Shutdown),
        };
        let mut findings = preflight::Findings::from_answers(&answers);
        let mut not_watching = 0u64;
        self.scan_attest(range, |cred, key| {
            if let Some(preflight::Answer::Alive { credentials, .. }) = answers.get(key) {
                if !credentials.contains(cred) {
                    not_watching += 1;
                    findings.add_not_watching(key, cred);
                }
            }
        })
        .await?;
        Ok(PreflightReport::Asked {
            findings,
            not_watching,
        })
    }

    /// The (region, consumer) pairs of a wave's `attest` consumers.
    async fn wave_agents(&mut self, range: (u64, u64)) -> Result<BTreeSet<AgentKey>, DriveError> {
        let mut agents = BTreeSet::new();
        self.scan_attest(range, |_, key| {
            if !agents.contains(key) {
                agents.insert(key.clone());
            }
        })
        .await?;
        Ok(agents)
    }

    /// Calls `f(credential, (region, consumer))` for every `attest`
    /// consumer of every credential of a wave, one plan chunk at a time.
    async fn scan_attest(
        &mut self,
        (offset, size): (u64, u64),
        mut f: impl FnMut(&str, &AgentKey),
    ) -> Result<(), DriveError> {
        let end = offset + size;
        let mut pos = offset;
        let mut key: AgentKey = Default::default();
        while pos < end {
            let (chunk, range) = self.plan.slice_at(pos, end).await?;
            pos += range.len() as u64;
            for e in &chunk[range] {
                for c in e
                    .consumers
                    .iter()
                    .filter(|c| c.verify == VerifyKind::Attest)
                {
                    key.0.clone_from(&e.region);
                    key.1.clone_from(&c.id);
                    f(&e.id, &key);
                }
            }
        }
        Ok(())
    }
}

/// Why a wave's unstarted tasks could not be withdrawn.
#[derive(Debug, Error)]
enum WithdrawError {
    #[error(transparent)]
    List(#[from] keywave_common::topology::TopologyError),
    #[error("opening stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::GetStreamError,
    },
    #[error("purging the tasks from {stream}: {source}")]
    Purge {
        stream: String,
        #[source]
        source: async_nats::jetstream::stream::PurgeError,
    },
}

/// Why a wave's queued tasks are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Withdrawal {
    /// The wave was decided without them.
    Decided,
    /// Their start window passed while paused for a silent region.
    Expired,
}

/// Removes the campaign's tasks that no worker has finished from the work
/// queue once their wave is decided without them, so that none of them
/// starts after the decision (they count as `no_result`). A task a worker
/// is running when this happens finishes and reports late; its ack finds
/// nothing to remove. Best effort: if the purge fails, the tasks' own
/// start deadline still refuses them later.
async fn withdraw_tasks(engine: &Engine, cid: &str, w: u32, why: Withdrawal) {
    let purged = purge_campaign_tasks(engine, cid).await;
    match purged {
        Ok(n) if why == Withdrawal::Expired => {
            info!(campaign = %cid, wave = w, withdrawn = n, "Tasks past their start window while paused for a silent region were withdrawn; they are issued again on resume")
        }
        Ok(n) => {
            info!(campaign = %cid, wave = w, withdrawn = n, "Wave decided without every result; its unstarted tasks were withdrawn")
        }
        Err(e) => {
            warn!(campaign = %cid, wave = w, error = %e, "Could not withdraw the wave's unstarted tasks; their start deadline refuses them")
        }
    }
}

/// Purges campaign `cid`'s queued tasks from every region's task stream;
/// returns how many were removed. Every stream is tried; the first error
/// is returned after.
async fn purge_campaign_tasks(engine: &Engine, cid: &str) -> Result<u64, WithdrawError> {
    let mut purged = 0;
    let mut first_error = None;
    for region in engine.tasks.regions().await? {
        let stream = keywave_common::topology::tasks_stream(&region);
        let done = match engine.tasks.get(&region).await {
            Ok(s) => s
                .purge()
                .filter(subjects::task(&region, cid))
                .await
                .map(|r| r.purged)
                .map_err(|source| WithdrawError::Purge {
                    stream: stream.clone(),
                    source,
                }),
            Err(source) => Err(WithdrawError::Stream { stream, source }),
        };
        match done {
            Ok(n) => purged += n,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(purged), Err)
}

/// Follows the campaign's `approved` events live and hands them to the
/// owner (the replay is a job the owner starts at a gate).
async fn follow_approvals(engine: Arc<Engine>, h: Arc<Handle>) {
    let subject = subjects::event(&h.cid, "approved");
    loop {
        let sub = tokio::select! {
            s = engine.client.subscribe(subject.clone()) => s,
            _ = h.stop.cancelled() => return,
        };
        match sub {
            Ok(mut live) => loop {
                let m = tokio::select! {
                    m = live.next() => m,
                    _ = h.stop.cancelled() => return,
                };
                let Some(m) = m else { break };
                if let Some(approval) = super::approval_of(&m.payload, m.headers.as_ref()) {
                    let msg = Msg::Approve {
                        approval,
                        reply: super::machine::Reply::none(),
                    };
                    if h.send(msg).await.is_err() {
                        return;
                    }
                }
            },
            Err(e) => {
                warn!(campaign = %h.cid, error = %e, "Cannot follow approvals; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = h.stop.cancelled() => return,
        }
    }
}

/// Whether a results stream error ends the stream for good (it must be
/// pulled afresh).
fn results_stream_ended(e: &pull::MessagesError) -> bool {
    matches!(
        e.kind(),
        pull::MessagesErrorKind::ConsumerDeleted
            | pull::MessagesErrorKind::NoResponders
            | pull::MessagesErrorKind::PushBasedConsumer
    )
}

/// Replays and follows the campaign's results into its owner: one durable
/// pull consumer per campaign and term on `KEYWAVE_RESULTS`, filtered to the
/// campaign, from the first message. Durable rather than ordered: it lives
/// in the stream's replicas, so losing a cluster node moves it to another
/// node instead of requiring a new consumer (which a cluster that just lost a
/// node may not manage to create for a while). Results are acked once
/// handed to the owner; a redelivered one is a duplicate the book ignores.
async fn aggregate(engine: Arc<Engine>, h: Arc<Handle>) {
    let filter = subjects::result_campaign_filter(&h.cid);
    let name = format!("results-{}-{}", h.cid, engine.term);
    let mut caught_up = false;
    loop {
        let created = tokio::select! {
            c = engine.results.get_or_create_consumer(&name, pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("keywave coordinator results of {}", h.cid)),
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: RESULTS_ACK_WAIT,
                max_ack_pending: 50_000,
                replay_policy: ReplayPolicy::Instant,
                // Left behind by a coordinator that died: removed by the server.
                inactive_threshold: Duration::from_secs(600),
                ..Default::default()
            }) => c,
            _ = h.stop.cancelled() => break,
        };
        let consumer = match created {
            Ok(c) => c,
            Err(e) => {
                warn!(campaign = %h.cid, error = %e, "Cannot create the results consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = h.stop.cancelled() => break,
                }
            }
        };
        if !caught_up
            && consumer.cached_info().num_pending == 0
            && consumer.cached_info().num_ack_pending == 0
        {
            caught_up = true;
            if h.send(Msg::CaughtUp).await.is_err() {
                break;
            }
        }
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(RESULTS_PULL_BATCH)
            .expires(RESULTS_PULL_EXPIRES)
            .heartbeat(RESULTS_PULL_HEARTBEAT)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                warn!(campaign = %h.cid, error = %e, "Cannot read results; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = h.stop.cancelled() => break,
                }
            }
        };
        loop {
            let next = tokio::select! {
                m = tokio::time::timeout(RESULTS_IDLE, messages.next()) => m,
                _ = h.stop.cancelled() => break,
            };
            let msg = match next {
                // Quiet for a while: pull afresh anyway, in case the stream
                // stalled without reporting an error.
                Err(_) => break,
                Ok(None) => break,
                // Only an error that ends the stream drops it: the stream
                // recovers from the others (a missed heartbeat, a status
                // from the server) by pulling again, and dropping it would
                // lose the deliveries in its buffer until the ack wait.
                Ok(Some(Err(e))) if results_stream_ended(&e) => {
                    warn!(campaign = %h.cid, error = %e, "Results consumer failed; pulling again");
                    break;
                }
                Ok(Some(Err(e))) => {
                    debug!(campaign = %h.cid, error = %e, "Results stream reported an error; reading on");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let Ok(info) = msg.info() else { continue };
            let (pending, seq) = (info.pending, info.stream_sequence);
            let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            match codec::decode::<RotationResult>(msg.headers.as_ref(), &msg.payload) {
                Ok(r) if r.campaign_id == h.cid => {
                    let msg = Msg::Result {
                        result: Box::new(r),
                        published_ms,
                    };
                    if h.send(msg).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    debug!(campaign = %h.cid, seq, error = %e, "Ignoring undecodable result");
                }
            }
            if let Err(e) = msg.ack().await {
                debug!(campaign = %h.cid, seq, error = %e, "Could not ack a result; it comes again");
            }
            if pending == 0 && !caught_up {
                caught_up = true;
                if h.send(Msg::CaughtUp).await.is_err() {
                    break;
                }
            }
        }
        if h.stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = h.stop.cancelled() => break,
        }
    }
    // A coordinator that is killed or fenced leaves it to the server's
    // inactivity threshold, as a dead process would.
    if !engine.halted.is_cancelled() {
        if let Err(e) = engine.results.delete_consumer(&name).await {
            debug!(campaign = %h.cid, error = %e, "Could not delete the results consumer");
        }
    }
}
