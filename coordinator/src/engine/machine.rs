//! A campaign's state machine, without I/O: [`Machine::step`] takes the book,
//! one [`Msg`] (a result, an operator request, an approval, a job's outcome,
//! a timer, a lease change) and the time, changes the book and returns the
//! [`Effect`]s to carry out (events, snapshot saves, task publishing, timers,
//! replies) as data. The campaign's owner task (`driver`) is the only caller;
//! it executes the effects in order. Every step is derived from the snapshot
//! plus a little in-memory progress, so a restarted coordinator resumes where
//! the snapshot says.

use super::{
    book::{Applied, BitSet, Book},
    decide::decide,
    fault::CrashPoint,
    preflight, start_window_ms, Approval, ControlAction, DEADLINE_GRACE,
};
use crate::regions::RegionView;
use keywave_common::{
    api::CampaignStatus,
    wire::{CampaignState, Decision, EventKind, RotationResult, Strategy, TaskAction},
};
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// While a wave waits for an approval, the approvals stream is read again
/// this often (a safety net: the live subscription may miss one across a
/// reconnect).
pub const APPROVAL_RESCAN_MS: u64 = 10_000;
/// First and longest wait before a failed job (publishing, pre-flight,
/// reading approvals) is started again.
pub const RETRY_FIRST_MS: u64 = 1_000;
pub const RETRY_MAX_MS: u64 = 5_000;

/// Where a caller waits for the status after its message was acted on.
#[derive(Debug, Default)]
pub struct Reply(pub Option<oneshot::Sender<CampaignStatus>>);

impl Reply {
    /// No reply wanted.
    pub fn none() -> Reply {
        Reply(None)
    }
}

/// What the pre-flight job found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreflightReport {
    /// The wave has no consumer with an agent to ask.
    NothingToAsk,
    Asked {
        findings: preflight::Findings,
        /// Agents that answered without watching a credential of the wave.
        not_watching: u64,
    },
}

/// Everything that reaches a campaign's owner, over one bounded channel.
#[derive(Debug)]
pub enum Msg {
    /// A rotation or rollback result, with the time the results stream
    /// stored it.
    Result {
        result: Box<RotationResult>,
        published_ms: u64,
    },
    /// The results replay reached the end of the stream.
    CaughtUp,
    /// An operator request. `revision` is the KV revision of its control
    /// record: a request older than one already acted on is ignored (the
    /// record reaches the owner twice, from the API and from the watch).
    Control {
        action: ControlAction,
        revision: u64,
        reply: Reply,
    },
    /// An approval (from the API, the live subscription or the replay).
    Approve { approval: Approval, reply: Reply },
    /// The approvals stream was read for wave `wave`.
    Approvals { wave: u32, found: Vec<Approval> },
    /// The pre-flight job of wave `wave` ended.
    Preflight { wave: u32, report: PreflightReport },
    /// The publishing job ended: `completed` is false when it stopped
    /// because the campaign ended.
    Published {
        wave: u32,
        action: TaskAction,
        completed: bool,
    },
    /// A job failed (NATS unavailable, ...): started again after a backoff.
    JobFailed { error: String },
    /// The progress tick: save the snapshot if results changed it.
    Tick,
    /// The time asked for by [`Outcome::wake_at_ms`] came.
    Timer,
    /// Status request: replies with the current status.
    Status { reply: Reply },
    /// Which regions have live workers (see [`crate::regions`]), every
    /// second: a region the current wave needs that has had none for the
    /// machine's `pause_after` pauses the campaign, naming it.
    Regions(Arc<RegionView>),
    /// The coordinator stops (`fenced`: it lost its lease or was killed, and
    /// must not save anything).
    Stop { fenced: bool },
}

/// What the owner does, in order, after a step.
#[derive(Debug)]
pub enum Effect {
    /// Check the coordinator lease before acting (stop if lost).
    Fence,
    /// Publish a campaign event.
    Event(Box<EventKind>),
    /// Save the snapshot (compare-and-set).
    Save,
    /// Count a result in the metrics.
    Counted(Box<RotationResult>),
    /// A fault-injection point.
    Fault(CrashPoint),
    /// Start the job publishing wave `wave`'s rotation tasks.
    PublishWave { wave: u32 },
    /// Start the job publishing rollback tasks for the `targets` indexes.
    PublishRollback { wave: u32, targets: BitSet },
    /// Start the job asking the consumer agents of wave `wave`.
    Preflight { wave: u32 },
    /// Start the job reading the approvals stream.
    ReadApprovals { wave: u32 },
    /// Withdraw wave `wave`'s unstarted tasks from the work queue.
    Withdraw { wave: u32 },
    /// Remove wave `wave`'s tasks from the work queue because they can no
    /// longer start (their start window passed while the campaign was
    /// paused for a silent region); they are issued again on resume.
    Expire { wave: u32 },
    /// Start the job issuing the `targets` indexes of wave `wave` again
    /// (with a fresh start window), after [`Effect::Expire`].
    Reissue { wave: u32, targets: BitSet },
    /// Reply with the status as it is once the effects before ran.
    Reply(Reply),
    /// The owner ends (campaign finished, or the coordinator stops).
    Exit,
}

impl Effect {
    fn event(kind: EventKind) -> Effect {
        Effect::Event(Box::new(kind))
    }
}

/// The result of one step.
#[derive(Debug, Default)]
pub struct Outcome {
    pub effects: Vec<Effect>,
    /// When to send [`Msg::Timer`] (wall clock, ms), if anything waits for
    /// time.
    pub wake_at_ms: Option<u64>,
}

/// The job in flight, whose outcome the machine waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Publish { wave: u32, action: TaskAction },
    Preflight { wave: u32 },
}

/// Reading the approvals stream for a gated wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ApprovalsRead {
    Reading {
        wave: u32,
    },
    /// Read; read again at `next_ms` while still waiting.
    Read {
        wave: u32,
        next_ms: u64,
    },
}

/// Progress of the wave waiting for its results.
#[derive(Debug, Clone, Copy)]
struct WaveWatch {
    wave: u32,
    /// When publishing ended in this process, else when the wave started.
    base_ms: u64,
    seen: u64,
    last_progress_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RollbackPhase {
    Publishing,
    Waiting { deadline_ms: u64 },
}

/// How a publishing job proceeds, given the campaign's state (looked at
/// between two chunks of tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    Go,
    /// Paused: rotation tasks wait for a resume (rollbacks go on).
    Hold,
    /// Finished: stop publishing.
    Stop,
}

/// See [`PublishMode`].
pub fn publish_mode(state: CampaignState, action: TaskAction) -> PublishMode {
    match state {
        s if s.is_terminal() => PublishMode::Stop,
        CampaignState::Paused if action == TaskAction::Rotate => PublishMode::Hold,
        _ => PublishMode::Go,
    }
}

/// One campaign's state: the book plus what this owner learnt since it
/// started (results replayed, jobs in flight, deadlines).
#[derive(Debug)]
pub struct Machine {
    book: Book,
    caught_up: bool,
    /// Counters changed since the last save.
    dirty: bool,
    /// Revision of the last operator request acted on.
    control_rev: u64,
    job: Option<Job>,
    watch: Option<WaveWatch>,
    rollback: Option<(u32, RollbackPhase)>,
    approvals: Option<ApprovalsRead>,
    retry_at_ms: Option<u64>,
    retry_delay_ms: u64,
    stopped: bool,
    wake: Option<u64>,
    /// The latest region view (none yet: every region counts as live).
    regions: Option<Arc<RegionView>>,
    /// How long a needed region may have no live worker before the
    /// campaign pauses.
    pause_after_ms: u64,
    /// The wave whose tasks expired while paused for a region: issued again
    /// when resumed.
    reissue: Option<u32>,
    /// Added to a wave's and a rollback's deadline: how long a task whose
    /// worker died waits for its redelivery (see
    /// `keywave_common::topology::Config::redelivery_allowance`).
    redelivery_ms: u64,
}

impl Machine {
    /// A machine for a campaign loaded from its snapshot (or just created).
    pub fn new(status: CampaignStatus) -> Machine {
        Machine {
            book: Book::new(status),
            caught_up: false,
            dirty: false,
            control_rev: 0,
            job: None,
            watch: None,
            rollback: None,
            approvals: None,
            retry_at_ms: None,
            retry_delay_ms: RETRY_FIRST_MS,
            stopped: false,
            wake: None,
            regions: None,
            pause_after_ms: crate::regions::DEFAULT_PAUSE_AFTER.as_millis() as u64,
            reissue: None,
            redelivery_ms: 0,
        }
    }

    /// Sets how long a region the campaign needs may have no live worker
    /// before the campaign pauses.
    pub fn with_pause_after(mut self, pause_after: std::time::Duration) -> Machine {
        self.pause_after_ms = pause_after.as_millis() as u64;
        self
    }

    /// Waits `allowance` longer for results before a task counts as without
    /// result: the time the region's consumer takes to redeliver a task
    /// whose worker died, so a crash never becomes a counted failure while
    /// the task can still finish.
    pub fn with_redelivery_allowance(mut self, allowance: std::time::Duration) -> Machine {
        self.redelivery_ms = allowance.as_millis() as u64;
        self
    }

    pub fn status(&self) -> &CampaignStatus {
        &self.book.status
    }

    pub fn book(&self) -> &Book {
        &self.book
    }

    pub fn state(&self) -> CampaignState {
        self.book.status.state
    }

    /// Whether the counters changed since the last [`Effect::Save`].
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Marks the snapshot as not saved (a save failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    fn spec_strategy(&self) -> Strategy {
        self.book.status.spec.strategy
    }

    /// Applies `msg` at `now_ms` and decides what follows.
    pub fn step(&mut self, msg: Msg, now_ms: u64) -> Outcome {
        let mut fx = Vec::new();
        let mut reply = None;
        match msg {
            Msg::Result {
                result,
                published_ms,
            } => {
                if self.book.apply(&result, published_ms) == Applied::Counted {
                    self.dirty = true;
                    fx.push(Effect::Counted(result));
                }
            }
            Msg::CaughtUp => self.caught_up = true,
            Msg::Control {
                action,
                revision,
                reply: r,
            } => {
                reply = Some(r);
                if revision == 0 || revision > self.control_rev {
                    self.control_rev = self.control_rev.max(revision);
                    self.on_control(action, now_ms, &mut fx);
                } else {
                    debug!(campaign = %self.book.status.campaign_id, ?action, revision, "Operator request already acted on");
                }
            }
            Msg::Approve { approval, reply: r } => {
                reply = Some(r);
                self.record_approval(approval);
            }
            Msg::Approvals { wave, found } => {
                self.approvals = Some(ApprovalsRead::Read {
                    wave,
                    next_ms: now_ms + APPROVAL_RESCAN_MS,
                });
                for a in found {
                    self.record_approval(a);
                }
            }
            Msg::Preflight { wave, report } => {
                if self.job == Some(Job::Preflight { wave }) {
                    self.job = None;
                    self.on_preflight(wave, report, now_ms, &mut fx);
                }
            }
            Msg::Published {
                wave,
                action,
                completed,
            } => {
                if self.job == Some(Job::Publish { wave, action }) {
                    self.job = None;
                    self.retry_delay_ms = RETRY_FIRST_MS;
                    if completed {
                        self.on_published(wave, action, now_ms, &mut fx);
                    }
                }
            }
            Msg::JobFailed { error } => {
                warn!(campaign = %self.book.status.campaign_id, job = ?self.job, %error, retry_in_ms = self.retry_delay_ms, "Campaign job failed; retrying");
                self.job = None;
                if matches!(self.approvals, Some(ApprovalsRead::Reading { .. })) {
                    self.approvals = None;
                }
                self.retry_at_ms = Some(now_ms + self.retry_delay_ms);
                self.retry_delay_ms = (self.retry_delay_ms * 2).min(RETRY_MAX_MS);
            }
            Msg::Tick => {
                if self.dirty {
                    self.save(&mut fx);
                }
            }
            Msg::Timer => {}
            Msg::Status { reply: r } => reply = Some(r),
            Msg::Regions(view) => self.on_regions(view, now_ms),
            Msg::Stop { fenced } => {
                self.stopped = true;
                if !fenced {
                    self.save(&mut fx);
                }
                fx.push(Effect::Exit);
                return Outcome {
                    effects: fx,
                    wake_at_ms: None,
                };
            }
        }
        self.wake = None;
        self.drive(now_ms, &mut fx);
        if let Some(r) = reply.filter(|r| r.0.is_some()) {
            // Before an exit: the caller gets the final status.
            let at = fx
                .iter()
                .position(|e| matches!(e, Effect::Exit))
                .unwrap_or(fx.len());
            fx.insert(at, Effect::Reply(r));
        }
        Outcome {
            effects: fx,
            wake_at_ms: self.wake,
        }
    }

    fn wake_at(&mut self, at: u64) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }

    fn save(&mut self, fx: &mut Vec<Effect>) {
        self.dirty = false;
        fx.push(Effect::Save);
    }

    /// Moves to `state` with `reason`: an event (when the state changes),
    /// the status and the snapshot.
    fn transition(
        &mut self,
        state: CampaignState,
        reason: String,
        now_ms: u64,
        fx: &mut Vec<Effect>,
    ) {
        fx.push(Effect::Fence);
        let s = &mut self.book.status;
        if s.state != state {
            info!(campaign = %s.campaign_id, state = %state, reason = %reason, "Campaign state changed");
            fx.push(Effect::event(EventKind::StateChanged {
                state,
                reason: reason.clone(),
            }));
        }
        s.state = state;
        s.reason = Some(reason);
        if state != CampaignState::Paused {
            s.paused_regions.clear();
        }
        if state.is_terminal() {
            s.finished_at_ms = Some(now_ms);
        }
        self.save(fx);
    }

    fn on_control(&mut self, action: ControlAction, now_ms: u64, fx: &mut Vec<Effect>) {
        let state = self.state();
        info!(campaign = %self.book.status.campaign_id, ?action, "Operator request");
        match action {
            ControlAction::Abort if !state.is_terminal() => {
                self.transition(
                    CampaignState::Aborted,
                    "aborted by operator".into(),
                    now_ms,
                    fx,
                );
            }
            ControlAction::Pause
                if matches!(
                    state,
                    CampaignState::Running
                        | CampaignState::Baking
                        | CampaignState::AwaitingApproval
                ) =>
            {
                self.transition(
                    CampaignState::Paused,
                    "paused by operator".into(),
                    now_ms,
                    fx,
                );
            }
            ControlAction::Resume if state == CampaignState::Paused => {
                // A resumed gate reads the approvals again.
                self.approvals = None;
                self.transition(
                    CampaignState::Running,
                    "resumed by operator".into(),
                    now_ms,
                    fx,
                );
            }
            // Checked by the API; checked again here because the request
            // may be replayed after a restart.
            ControlAction::Rollback
                if state == CampaignState::Paused
                    && self.spec_strategy() == Strategy::Continuity
                    && self.current_decision().is_some() =>
            {
                let w = self.book.status.current_wave;
                self.transition(
                    CampaignState::RollingBack,
                    format!("wave {w} rollback requested by operator"),
                    now_ms,
                    fx,
                );
            }
            other => {
                debug!(campaign = %self.book.status.campaign_id, action = ?other, state = %state, "Operator request needs no action");
            }
        }
    }

    fn current_decision(&self) -> Option<Decision> {
        let s = &self.book.status;
        s.waves
            .get(s.current_wave as usize)
            .and_then(|ws| ws.decision)
    }

    /// Records an approval in the books (the first one of a wave counts).
    fn record_approval(&mut self, a: Approval) {
        if let Some(ws) = self.book.status.waves.get_mut(a.wave as usize) {
            if ws.approved_at_ms.is_none() {
                ws.approved_by = Some(a.by);
                ws.approved_at_ms = Some(a.at_ms);
                self.dirty = true;
            }
        }
    }

    /// Derives the next steps from the snapshot, until something is
    /// awaited (a job, results, time, an operator).
    fn drive(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.stopped || !self.caught_up {
            return;
        }
        // Each pass changes the state or returns; the bound is a safety net.
        for _ in 0..64 {
            let (state, w) = (self.state(), self.book.status.current_wave);
            if state.is_terminal() {
                fx.push(Effect::Exit);
                self.stopped = true;
                return;
            }
            self.check_regions(now_ms, fx);
            if self.job.is_some() {
                return;
            }
            if let Some(at) = self.retry_at_ms {
                if now_ms < at {
                    self.wake_at(at);
                    return;
                }
                self.retry_at_ms = None;
            }
            let before = (state, w, fx.len());
            match (state, self.current_decision()) {
                (CampaignState::RollingBack, _) => self.rollback_step(w, now_ms, fx),
                (_, None) => self.wave_step(w, now_ms, fx),
                (CampaignState::Paused, Some(_)) => return,
                (CampaignState::Baking, Some(Decision::NextWave)) => {
                    let ws = &self.book.status.waves[w as usize];
                    let until = ws.finished_at_ms.unwrap_or(now_ms) + self.book.status.spec.bake_ms;
                    if now_ms < until {
                        self.wake_at(until);
                        return;
                    }
                    self.advance(w, now_ms, fx);
                }
                (_, Some(Decision::Complete)) => {
                    let reason = self.book.status.waves[w as usize]
                        .reason
                        .clone()
                        .unwrap_or_default();
                    self.transition(CampaignState::Completed, reason, now_ms, fx);
                }
                // Next wave, or an operator resumed after a failed wave.
                (_, Some(_)) => self.advance(w, now_ms, fx),
            }
            if self.job.is_none()
                && before == (self.state(), self.book.status.current_wave, fx.len())
            {
                return;
            }
        }
    }

    /// Wave `w` has no decision yet: the approval gate, the pre-flight, the
    /// start, publishing, then waiting for results or the deadline.
    fn wave_step(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        let state = self.state();
        let spec = &self.book.status.spec;
        let gated = spec.approve_before_waves.contains(&w);
        let wants_preflight = spec.preflight == Some(true);
        let ws = &self.book.status.waves[w as usize];
        let (size, started, published, approved) = (
            ws.size,
            ws.started_at_ms.is_some() || ws.published,
            ws.published,
            ws.approved_at_ms.is_some(),
        );
        if !started {
            if gated && !approved {
                self.gate(w, size, now_ms, fx);
                return;
            }
            if state == CampaignState::AwaitingApproval {
                let by = self.book.status.waves[w as usize]
                    .approved_by
                    .clone()
                    .unwrap_or_default();
                self.transition(
                    CampaignState::Running,
                    format!("wave {w} approved by {by}"),
                    now_ms,
                    fx,
                );
                return;
            }
            if state != CampaignState::Running {
                return;
            }
            if wants_preflight {
                self.job = Some(Job::Preflight { wave: w });
                fx.push(Effect::Preflight { wave: w });
                return;
            }
            self.start_wave(w, now_ms, fx);
            return;
        }
        if !published {
            fx.push(Effect::Fence);
            self.job = Some(Job::Publish {
                wave: w,
                action: TaskAction::Rotate,
            });
            fx.push(Effect::PublishWave { wave: w });
            return;
        }
        if self.reissue == Some(w) && state == CampaignState::Running {
            self.reissue_step(w, fx);
            return;
        }
        self.await_results(w, now_ms, fx);
    }

    /// An unapproved gated wave: read the approvals stream once, then
    /// announce the wait and wait.
    fn gate(&mut self, w: u32, size: u64, now_ms: u64, fx: &mut Vec<Effect>) {
        match self.approvals {
            Some(ApprovalsRead::Reading { wave }) if wave == w => return,
            Some(ApprovalsRead::Read { wave, next_ms }) if wave == w => {
                if self.state() == CampaignState::AwaitingApproval {
                    if now_ms >= next_ms {
                        self.approvals = Some(ApprovalsRead::Reading { wave: w });
                        fx.push(Effect::ReadApprovals { wave: w });
                        return;
                    }
                    self.wake_at(next_ms);
                }
            }
            _ => {
                self.approvals = Some(ApprovalsRead::Reading { wave: w });
                fx.push(Effect::ReadApprovals { wave: w });
                return;
            }
        }
        match self.state() {
            CampaignState::Running | CampaignState::Baking => {
                fx.push(Effect::Fence);
                fx.push(Effect::event(EventKind::ApprovalRequired { wave: w, size }));
                let cid = self.book.status.campaign_id.clone();
                info!(campaign = %cid, wave = w, size, "Waiting for an approval");
                self.transition(
                    CampaignState::AwaitingApproval,
                    format!("wave {w} ({size} credentials) waits for an approval: keywave campaign approve {cid}"),
                    now_ms,
                    fx,
                );
            }
            // Paused, or already waiting.
            _ => {}
        }
    }

    fn on_preflight(&mut self, w: u32, report: PreflightReport, now_ms: u64, fx: &mut Vec<Effect>) {
        let cid = self.book.status.campaign_id.clone();
        let (findings, not_watching) = match report {
            PreflightReport::NothingToAsk => {
                if self.state() == CampaignState::Running && self.current_wave_is(w) {
                    self.start_wave(w, now_ms, fx);
                }
                return;
            }
            PreflightReport::Asked {
                findings,
                not_watching,
            } => (findings, not_watching),
        };
        let spec = &self.book.status.spec;
        let verdict = preflight::judge(w, &findings, spec.preflight_max_unreachable);
        let containment = spec.strategy == Strategy::Containment;
        let reason = if !verdict.passed && containment {
            format!(
                "{}; containment does not wait for consumers: the wave starts",
                verdict
                    .reason
                    .replace(&format!("; wave {w} not started"), "")
            )
        } else {
            verdict.reason.clone()
        };
        fx.push(Effect::Fence);
        fx.push(Effect::event(EventKind::Preflight {
            wave: w,
            asked: findings.asked,
            unreachable: findings.unreachable,
            passed: verdict.passed,
            reason: reason.clone(),
            unreachable_agents: findings.unreachable_agents,
            unhealthy_agents: findings.unhealthy_agents.clone(),
            not_watching: findings.not_watching,
        }));
        if !findings.unhealthy_agents.is_empty() || not_watching > 0 {
            let unhealthy: Vec<String> = findings
                .unhealthy_agents
                .iter()
                .map(ToString::to_string)
                .collect();
            warn!(
                campaign = %cid, wave = w, unhealthy = %unhealthy.join(", "), not_watching,
                "Pre-flight: some consumer agents answered unhealthy or do not watch a credential of the wave"
            );
        }
        if verdict.passed || containment {
            info!(campaign = %cid, wave = w, asked = findings.asked, unreachable = findings.unreachable, reason = %reason, "Pre-flight passed");
            // An operator request may have come while the agents were asked.
            if self.state() == CampaignState::Running && self.current_wave_is(w) {
                self.start_wave(w, now_ms, fx);
            }
            return;
        }
        warn!(campaign = %cid, wave = w, asked = findings.asked, unreachable = findings.unreachable, reason = %reason, "Pre-flight failed: the wave does not start");
        if !self.state().is_terminal() {
            self.transition(CampaignState::Paused, reason, now_ms, fx);
        }
    }

    fn current_wave_is(&self, w: u32) -> bool {
        self.book.status.current_wave == w && self.current_decision().is_none()
    }

    /// Announces wave `w` and starts publishing it.
    fn start_wave(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        let ws = &mut self.book.status.waves[w as usize];
        if ws.started_at_ms.is_some() || ws.published {
            return;
        }
        let size = ws.size;
        fx.push(Effect::Fence);
        fx.push(Effect::Fault(CrashPoint::BetweenWaves { wave: w }));
        fx.push(Effect::event(EventKind::WaveStarted { wave: w, size }));
        ws.started_at_ms = Some(now_ms);
        self.save(fx);
        info!(campaign = %self.book.status.campaign_id, wave = w, size, "Wave started");
        self.job = Some(Job::Publish {
            wave: w,
            action: TaskAction::Rotate,
        });
        fx.push(Effect::PublishWave { wave: w });
    }

    fn on_published(&mut self, w: u32, action: TaskAction, now_ms: u64, fx: &mut Vec<Effect>) {
        match action {
            TaskAction::Rotate => {
                let Some(ws) = self.book.status.waves.get_mut(w as usize) else {
                    return;
                };
                ws.published = true;
                let started = ws.started_at_ms.unwrap_or(now_ms);
                self.watch = Some(WaveWatch {
                    wave: w,
                    base_ms: now_ms.max(started),
                    seen: self.book.tally(w).map_or(0, |t| t.seen.count()),
                    last_progress_ms: now_ms,
                });
                self.save(fx);
            }
            TaskAction::Rollback => {
                if matches!(self.rollback, Some((rw, RollbackPhase::Publishing)) if rw == w) {
                    fx.push(Effect::Fault(CrashPoint::Rollback { wave: w }));
                    let timeout = self.book.status.spec.task_timeout_ms;
                    let deadline_ms =
                        now_ms + timeout + DEADLINE_GRACE.as_millis() as u64 + self.redelivery_ms;
                    self.rollback = Some((w, RollbackPhase::Waiting { deadline_ms }));
                }
            }
        }
    }

    /// The wave's deadline moves with its progress: it is the task timeout
    /// after the later of the end of publishing and the last result, so a
    /// large wave that drains steadily is never cut short, while a stalled
    /// one ends one task timeout after it stalled; plus the redelivery
    /// allowance, so a task whose worker died is waited for until its
    /// redelivery had a full task timeout. It never passes the point after
    /// which no result can come: the last moment a task may start (its
    /// `deadline_ms`) plus its run timeout.
    fn await_results(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        let seen = self.book.tally(w).map_or(0, |t| t.seen.count());
        let mut watch = match self.watch {
            Some(x) if x.wave == w => x,
            // Published in an earlier life: the deadline counts from the
            // wave's start.
            _ => {
                let base = self.book.status.waves[w as usize]
                    .started_at_ms
                    .unwrap_or(now_ms);
                WaveWatch {
                    wave: w,
                    base_ms: base,
                    seen,
                    last_progress_ms: base,
                }
            }
        };
        if seen != watch.seen {
            watch.seen = seen;
            watch.last_progress_ms = watch.last_progress_ms.max(now_ms);
        }
        // While a region the wave needs has no live worker (or the campaign
        // is paused for one), time does not count toward the deadline: the
        // region's tasks wait in its queue, they have not failed.
        let held = self.region_holds(w, now_ms);
        if held {
            watch.last_progress_ms = watch.last_progress_ms.max(now_ms);
        }
        self.watch = Some(watch);
        if held && !self.book.wave_complete(w) {
            self.expire_if_stale(w, watch.base_ms, now_ms, fx);
            // Region views come every second; this is a safety net.
            self.wake_at(now_ms + self.pause_after_ms);
            return;
        }
        let timeout = self.book.status.spec.task_timeout_ms;
        let grace = DEADLINE_GRACE.as_millis() as u64;
        let cap = watch.base_ms + start_window_ms(timeout) + timeout + grace;
        let stall = watch.last_progress_ms + timeout + grace + self.redelivery_ms;
        let deadline = stall.min(cap);
        let complete = self.book.wave_complete(w);
        if !complete && now_ms < deadline {
            self.wake_at(deadline);
            return;
        }
        if !complete {
            fx.push(Effect::Withdraw { wave: w });
        }
        self.finish_wave(w, now_ms, fx);
    }

    /// Closes wave `w`, publishes its result and decision, and moves on.
    fn finish_wave(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        fx.push(Effect::Fence);
        self.watch = None;
        self.book.finalize_wave(w, now_ms);
        let is_last = w as usize + 1 == self.book.status.waves.len();
        let ws = self.book.status.waves[w as usize].clone();
        fx.push(Effect::event(EventKind::WaveFinished {
            wave: w,
            size: ws.size,
            succeeded: ws.succeeded,
            failed: ws.failed,
            no_result: ws.no_result,
            failures: ws.failures.clone(),
        }));
        let spec = &self.book.status.spec;
        let verdict = decide(&ws, spec, is_last);
        let (strategy, bake_ms) = (spec.strategy, spec.bake_ms);
        fx.push(Effect::event(EventKind::Decision {
            wave: w,
            decision: verdict.decision,
            reason: verdict.reason.clone(),
        }));
        info!(
            campaign = %self.book.status.campaign_id, wave = w, size = ws.size, succeeded = ws.succeeded,
            failed = ws.failed, no_result = ws.no_result, decision = ?verdict.decision,
            reason = %verdict.reason, "Wave finished"
        );
        {
            let wsm = &mut self.book.status.waves[w as usize];
            wsm.decision = Some(verdict.decision);
            wsm.reason = Some(verdict.reason.clone());
        }
        let reason = verdict.reason;
        match verdict.decision {
            Decision::Complete => self.transition(CampaignState::Completed, reason, now_ms, fx),
            Decision::NextWave => match self.state() {
                // An operator paused during the wave: hold before the next one.
                CampaignState::Paused => self.save(fx),
                _ if bake_ms > 0 => self.transition(CampaignState::Baking, reason, now_ms, fx),
                _ => {
                    self.book.status.reason = Some(reason);
                    self.save(fx);
                }
            },
            Decision::Pause => self.transition(CampaignState::Paused, reason, now_ms, fx),
            Decision::Rollback if strategy == Strategy::Containment => {
                let why = "containment never restores an exposed secret".to_string();
                fx.push(Effect::event(EventKind::RollbackRefused {
                    wave: w,
                    credentials: ws.succeeded,
                    reason: why.clone(),
                }));
                self.transition(
                    CampaignState::Paused,
                    format!("{reason}; rollback refused: {why}"),
                    now_ms,
                    fx,
                );
            }
            Decision::Rollback => self.transition(CampaignState::RollingBack, reason, now_ms, fx),
        }
    }

    fn advance(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        let next = w + 1;
        if next as usize >= self.book.status.waves.len() {
            self.transition(
                CampaignState::Completed,
                format!("resumed after the last wave ({w}); nothing left to rotate"),
                now_ms,
                fx,
            );
            return;
        }
        self.book.status.current_wave = next;
        self.watch = None;
        if self.state() != CampaignState::Running {
            self.transition(
                CampaignState::Running,
                format!("wave {next} starting"),
                now_ms,
                fx,
            );
        } else {
            self.save(fx);
        }
    }

    /// Rolls back wave `w`: a rollback task for each credential whose new
    /// secret became current, then the results or the deadline.
    fn rollback_step(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        match self.rollback {
            Some((rw, RollbackPhase::Waiting { deadline_ms })) if rw == w => {
                if !self.book.rollback_complete(w) && now_ms < deadline_ms {
                    self.wake_at(deadline_ms);
                    return;
                }
                self.finish_rollback(w, now_ms, fx);
            }
            _ => {
                let tasks = self.book.begin_rollback(w);
                let Some(targets) = self.book.tally(w).map(|t| t.rotated.clone()) else {
                    return;
                };
                fx.push(Effect::Fence);
                fx.push(Effect::event(EventKind::RollbackStarted { wave: w, tasks }));
                self.save(fx);
                info!(campaign = %self.book.status.campaign_id, wave = w, tasks, "Rollback started");
                self.rollback = Some((w, RollbackPhase::Publishing));
                self.job = Some(Job::Publish {
                    wave: w,
                    action: TaskAction::Rollback,
                });
                fx.push(Effect::PublishRollback { wave: w, targets });
            }
        }
    }

    fn finish_rollback(&mut self, w: u32, now_ms: u64, fx: &mut Vec<Effect>) {
        let tasks = self.book.status.waves[w as usize].rollback_tasks;
        let missing = tasks.saturating_sub(self.book.rollback_seen(w));
        // Why the rollback runs: the campaign's reason when it entered
        // `rolling_back` (the tripped wave's verdict, or the operator's
        // request), kept in the snapshot across restarts.
        let why = self.book.status.reason.clone();
        let ws = &mut self.book.status.waves[w as usize];
        ws.rollback_failed += missing;
        let (restored, refused, failed) = (ws.rolled_back, ws.rollback_refused, ws.rollback_failed);
        let trip = why.or_else(|| ws.reason.clone()).unwrap_or_default();
        self.rollback = None;
        fx.push(Effect::event(EventKind::RollbackFinished {
            wave: w,
            restored,
            refused,
            failed,
        }));
        self.transition(
            CampaignState::RolledBack,
            format!("{trip}; wave {w} rolled back: {restored} restored, {refused} refused, {failed} failed"),
            now_ms,
            fx,
        );
    }
}

/// How long after the tasks' start window a region-paused wave's tasks are
/// removed and later issued again (keeps clear of the tasks stream's
/// duplicate window, by default as long as the start window).
pub const REISSUE_MARGIN_MS: u64 = 60_000;

/// Regions: a region the current wave needs that has had no live worker
/// for `pause_after_ms` pauses the campaign with a reason naming it (before
/// the wave is published into it, or while its tasks wait), and the wave's
/// deadline stands still while such a region is silent; see
/// [`crate::regions`].
impl Machine {
    fn on_regions(&mut self, view: Arc<RegionView>, now_ms: u64) {
        // The live figures shown in the status (not saved on their own: they
        // go along with the next snapshot save).
        for (name, r) in self.book.status.regions.iter_mut() {
            let live = view.region(name);
            r.live_workers = Some(live.workers);
            r.silent_for_ms = live.silent_since_ms.map(|s| now_ms.saturating_sub(s));
            r.queued = live.queued;
            r.in_flight = live.in_flight;
        }
        self.regions = Some(view);
    }

    /// The regions wave `w` still needs, with its tasks there that have no
    /// result yet. A snapshot that does not plan the wave's regions falls
    /// back to the campaign's regions with credentials left.
    fn needed_regions(&self, w: u32) -> Vec<(String, u64)> {
        let s = &self.book.status;
        let planned = s
            .waves
            .get(w as usize)
            .is_some_and(|ws| !ws.regions.is_empty());
        if planned {
            return self
                .book
                .wave_regions_left(w)
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect();
        }
        s.regions
            .iter()
            .map(|(r, rs)| (r.clone(), rs.total.saturating_sub(rs.succeeded + rs.failed)))
            .filter(|(_, left)| *left > 0)
            .collect()
    }

    /// Whether a region wave `w` needs is silent now, or the campaign is
    /// paused for one.
    fn region_holds(&self, w: u32, now_ms: u64) -> bool {
        let s = &self.book.status;
        if s.state == CampaignState::Paused && !s.paused_regions.is_empty() {
            return true;
        }
        let Some(view) = &self.regions else {
            return false;
        };
        s.state == CampaignState::Running
            && self
                .needed_regions(w)
                .iter()
                .any(|(r, _)| view.silent_since(r).is_some_and(|t| t <= now_ms))
    }

    /// Paused for a silent region past the start window of the wave's tasks
    /// (published by `base_ms`): no worker would start them any more (a
    /// worker that came back would refuse them as too late, a failure), so
    /// they are removed from the queue, to be issued again on resume. After
    /// a restart `base_ms` is the wave's start, earlier than its end of
    /// publishing: the tasks are removed a little early, which only means
    /// they are issued again.
    fn expire_if_stale(&mut self, w: u32, base_ms: u64, now_ms: u64, fx: &mut Vec<Effect>) {
        let s = &self.book.status;
        let paused_for_region = s.state == CampaignState::Paused && !s.paused_regions.is_empty();
        // A margin past the window: the same tasks published again must
        // not fall in the stream's duplicate window of the first ones.
        let stale_at = base_ms + start_window_ms(s.spec.task_timeout_ms) + REISSUE_MARGIN_MS;
        if paused_for_region && now_ms >= stale_at && self.reissue != Some(w) {
            info!(campaign = %s.campaign_id, wave = w, "Paused past the tasks' start window: removing them from the queue, to issue them again on resume");
            self.reissue = Some(w);
            fx.push(Effect::Fence);
            fx.push(Effect::Expire { wave: w });
        }
    }

    /// Resumed after [`Machine::expire_if_stale`]: the wave's tasks without a
    /// result are issued again.
    fn reissue_step(&mut self, w: u32, fx: &mut Vec<Effect>) {
        self.reissue = None;
        let Some(t) = self.book.tally(w) else {
            return;
        };
        let mut targets = BitSet::new(t.seen.len());
        for i in 0..t.seen.len() {
            if !t.seen.contains(i) {
                targets.insert(i);
            }
        }
        info!(campaign = %self.book.status.campaign_id, wave = w, tasks = targets.count(), "Issuing the wave's unanswered tasks again");
        fx.push(Effect::Fence);
        self.job = Some(Job::Publish {
            wave: w,
            action: TaskAction::Rotate,
        });
        fx.push(Effect::Reissue { wave: w, targets });
    }

    /// Pauses a running campaign whose current wave needs a region that
    /// has had no live worker for `pause_after_ms`.
    fn check_regions(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        if self.state() != CampaignState::Running || self.current_decision().is_some() {
            return;
        }
        let Some(view) = self.regions.clone() else {
            return;
        };
        let w = self.book.status.current_wave;
        let Some(ws) = self.book.status.waves.get(w as usize) else {
            return;
        };
        let started = ws.started_at_ms.is_some() || ws.published;
        let mut silent = Vec::new();
        for (region, left) in self.needed_regions(w) {
            let Some(since) = view.silent_since(&region) else {
                continue;
            };
            let quiet = now_ms.saturating_sub(since);
            if quiet >= self.pause_after_ms {
                silent.push((region, quiet, left));
            } else {
                self.wake_at(since + self.pause_after_ms);
            }
        }
        if silent.is_empty() {
            return;
        }
        let tasks = |n: u64| {
            if n == 1 {
                "1 task".to_string()
            } else {
                format!("{n} tasks")
            }
        };
        let mut parts: Vec<String> = silent
            .iter()
            .map(|(r, quiet, left)| {
                let secs = quiet / 1_000;
                if started {
                    format!("region {r}: no live workers for {secs} s; {} queued", tasks(*left))
                } else {
                    format!(
                        "region {r}: no live workers for {secs} s; wave {w} not started ({} for it)",
                        tasks(*left)
                    )
                }
            })
            .collect();
        let cid = &self.book.status.campaign_id;
        parts.push(format!(
            "resume with `keywave campaign resume {cid}` once its workers are back"
        ));
        let names: Vec<String> = silent.iter().map(|(r, _, _)| r.clone()).collect();
        warn!(campaign = %cid, wave = w, regions = %names.join(","), "Pausing: a region the wave needs has no live worker");
        let reason = parts.join("; ");
        self.book.status.paused_regions = names;
        self.transition(CampaignState::Paused, reason, now_ms, fx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::{
        api::WaveStatus,
        wire::{
            CampaignSpec, ErrorClass, OnFailure, Outcome as Out, Step, WaveSize, SCHEMA_VERSION,
        },
    };

    const BAKE: u64 = 30_000;
    const TIMEOUT: u64 = 1_000;

    fn status(sizes: &[u64], gates: &[u32]) -> CampaignStatus {
        CampaignStatus {
            campaign_id: "c-1".into(),
            spec: CampaignSpec {
                v: SCHEMA_VERSION,
                name: "t".into(),
                reason: None,
                selector: Default::default(),
                strategy: Strategy::Continuity,
                waves: vec![WaveSize::Count(1)],
                failure_budget: 0.5,
                bake_ms: BAKE,
                on_failure: OnFailure::Rollback,
                task_timeout_ms: TIMEOUT,
                approve_before_waves: gates.to_vec(),
                preflight: None,
                preflight_max_unreachable: 0.0,
                requested_by: None,
            },
            state: CampaignState::Running,
            total: sizes.iter().sum(),
            current_wave: 0,
            waves: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| WaveStatus {
                    wave: i as u32,
                    size,
                    approval_required: gates.contains(&(i as u32)),
                    ..Default::default()
                })
                .collect(),
            created_at_ms: 0,
            finished_at_ms: None,
            reason: None,
            regions: [("eu".to_string(), Default::default())].into(),
            paused_regions: Vec::new(),
        }
    }

    fn result(wave: u32, index: u32, action: TaskAction, outcome: Out) -> Msg {
        let r = RotationResult {
            v: SCHEMA_VERSION,
            task_id: format!("c-1:w{wave}:{index}"),
            campaign_id: "c-1".into(),
            wave,
            index,
            action,
            credential_id: format!("cred-{index}"),
            region: "eu".into(),
            outcome,
            step: Step::Verified,
            error_class: (outcome == Out::Failed).then_some(ErrorClass::Injected),
            error: None,
            timings: vec![],
            new_fingerprint: None,
            old_fingerprint: None,
            old_rejected: None,
            worker_id: "w".into(),
            finished_at_ms: 0,
            consumers: Vec::new(),
        };
        Msg::Result {
            result: Box::new(r),
            published_ms: 0,
        }
    }

    fn ok(wave: u32, index: u32) -> Msg {
        result(wave, index, TaskAction::Rotate, Out::Succeeded)
    }

    fn failed(wave: u32, index: u32) -> Msg {
        result(wave, index, TaskAction::Rotate, Out::Failed)
    }

    fn published(wave: u32, action: TaskAction) -> Msg {
        Msg::Published {
            wave,
            action,
            completed: true,
        }
    }

    fn control(action: ControlAction, revision: u64) -> Msg {
        Msg::Control {
            action,
            revision,
            reply: Reply::none(),
        }
    }

    /// The effects as short names, for comparison.
    fn names(out: &Outcome) -> Vec<String> {
        out.effects
            .iter()
            .map(|e| match e {
                Effect::Fence => "fence".to_string(),
                Effect::Event(k) => match &**k {
                    EventKind::StateChanged { state, .. } => format!("state:{state}"),
                    EventKind::Decision { decision, .. } => format!("decision:{decision:?}"),
                    k => k.name().to_string(),
                },
                Effect::Save => "save".into(),
                Effect::Counted(_) => "counted".into(),
                Effect::Fault(_) => "fault".into(),
                Effect::PublishWave { wave } => format!("publish:{wave}"),
                Effect::PublishRollback { wave, targets } => {
                    format!("rollback:{wave}:{:?}", targets.iter().collect::<Vec<_>>())
                }
                Effect::Preflight { wave } => format!("preflight:{wave}"),
                Effect::ReadApprovals { wave } => format!("read_approvals:{wave}"),
                Effect::Withdraw { wave } => format!("withdraw:{wave}"),
                Effect::Expire { wave } => format!("expire:{wave}"),
                Effect::Reissue { wave, targets } => {
                    format!("reissue:{wave}:{:?}", targets.iter().collect::<Vec<_>>())
                }
                Effect::Reply(_) => "reply".into(),
                Effect::Exit => "exit".into(),
            })
            .collect()
    }

    const START: [&str; 5] = ["fence", "fault", "wave_started", "save", "publish"];

    fn starts(wave: u32) -> Vec<String> {
        let mut v: Vec<String> = START.iter().map(|s| s.to_string()).collect();
        v[4] = format!("publish:{wave}");
        v
    }

    /// Four waves (1, 2, 2, 3): wave 1 behind an approval gate, bake times
    /// between waves, a pause and resume, a task with no result by its
    /// deadline, and a last wave over its budget that is rolled back.
    #[test]
    fn a_whole_campaign_through_the_pure_machine() {
        let mut m = Machine::new(status(&[1, 2, 2, 3], &[1]));
        // Nothing happens before the results replay caught up.
        assert!(m.step(Msg::Tick, 0).effects.is_empty());
        assert_eq!(names(&m.step(Msg::CaughtUp, 0)), starts(0));
        assert_eq!(m.status().waves[0].started_at_ms, Some(0));
        assert_eq!(
            names(&m.step(published(0, TaskAction::Rotate), 10)),
            ["save"]
        );
        assert!(m.status().waves[0].published);

        // Wave 0: its only result completes it; bake.
        let out = m.step(ok(0, 0), 20);
        assert_eq!(
            names(&out),
            [
                "counted",
                "fence",
                "wave_finished",
                "decision:NextWave",
                "fence",
                "state:baking",
                "save"
            ]
        );
        assert_eq!(out.wake_at_ms, Some(20 + BAKE));
        assert_eq!(m.state(), CampaignState::Baking);

        // Paused while baking, resumed: the next wave comes at once, and
        // it needs an approval (the approvals stream is read first).
        let out = m.step(control(ControlAction::Pause, 1), 100);
        assert_eq!(names(&out), ["fence", "state:paused", "save"]);
        assert_eq!(out.wake_at_ms, None);
        assert!(m.step(Msg::Timer, 20 + BAKE).effects.is_empty(), "paused");
        let out = m.step(control(ControlAction::Resume, 2), 200);
        assert_eq!(
            names(&out),
            ["fence", "state:running", "save", "save", "read_approvals:1"]
        );
        assert_eq!(m.status().current_wave, 1);
        let out = m.step(
            Msg::Approvals {
                wave: 1,
                found: vec![],
            },
            300,
        );
        assert_eq!(
            names(&out),
            [
                "fence",
                "approval_required",
                "fence",
                "state:awaiting_approval",
                "save"
            ]
        );
        assert_eq!(out.wake_at_ms, Some(300 + APPROVAL_RESCAN_MS));
        // The pause record delivered again (the watch after the API): ignored.
        assert!(names(&m.step(control(ControlAction::Pause, 1), 350)).is_empty());
        assert_eq!(m.state(), CampaignState::AwaitingApproval);

        // Approved: the wave starts, and the caller gets its reply last.
        let (tx, mut rx) = oneshot::channel();
        let approval = Approval {
            wave: 1,
            by: "alice".into(),
            at_ms: 400,
        };
        let out = m.step(
            Msg::Approve {
                approval,
                reply: Reply(Some(tx)),
            },
            400,
        );
        let mut want = vec!["fence".to_string(), "state:running".into(), "save".into()];
        want.extend(starts(1));
        want.push("reply".into());
        assert_eq!(names(&out), want);
        assert!(rx.try_recv().is_err(), "the shell replies, not the machine");
        assert_eq!(m.status().waves[1].approved_by.as_deref(), Some("alice"));
        m.step(published(1, TaskAction::Rotate), 500);
        m.step(ok(1, 0), 600);
        m.step(ok(1, 0), 601); // a redelivered result counts once
        let out = m.step(ok(1, 1), 610);
        assert!(names(&out).contains(&"state:baking".to_string()));
        assert_eq!(out.wake_at_ms, Some(610 + BAKE));

        // The bake ends on its timer; wave 2 starts.
        let out = m.step(Msg::Timer, 10_000);
        assert!(out.effects.is_empty());
        assert_eq!(out.wake_at_ms, Some(610 + BAKE));
        let out = m.step(Msg::Timer, 610 + BAKE);
        let mut want = vec!["fence".to_string(), "state:running".into(), "save".into()];
        want.extend(starts(2));
        assert_eq!(names(&out), want);

        // Wave 2: one result, the other task never answers. The deadline
        // is a task timeout (plus grace) after the last progress.
        let t = 610 + BAKE;
        m.step(published(2, TaskAction::Rotate), t + 100);
        let out = m.step(ok(2, 0), t + 200);
        let deadline = t + 200 + TIMEOUT + DEADLINE_GRACE.as_millis() as u64;
        assert_eq!(out.wake_at_ms, Some(deadline));
        assert!(m.step(Msg::Timer, deadline - 1).effects.is_empty());
        let out = m.step(Msg::Timer, deadline);
        assert_eq!(
            names(&out),
            [
                "withdraw:2",
                "fence",
                "wave_finished",
                "decision:NextWave",
                "fence",
                "state:baking",
                "save"
            ]
        );
        let w2 = &m.status().waves[2];
        assert_eq!((w2.succeeded, w2.failed, w2.no_result), (1, 0, 1));
        assert_eq!(w2.failures.get("no_result"), Some(&1));
        // A result that comes after the wave was decided changes nothing.
        let mut late = ok(2, 1);
        if let Msg::Result { published_ms, .. } = &mut late {
            *published_ms = deadline + 1;
        }
        assert!(m.step(late, deadline + 5).effects.is_empty());
        assert_eq!(m.status().waves[2].no_result, 1);

        // Wave 3: two of three fail, over the budget of 50%: roll back the
        // one credential that was rotated.
        let t = deadline + BAKE;
        assert_eq!(names(&m.step(Msg::Timer, t))[3..], starts(3)[..]);
        m.step(published(3, TaskAction::Rotate), t + 1);
        m.step(failed(3, 0), t + 2);
        m.step(ok(3, 1), t + 3);
        let out = m.step(failed(3, 2), t + 4);
        assert_eq!(
            names(&out),
            [
                "counted",
                "fence",
                "wave_finished",
                "decision:Rollback",
                "fence",
                "state:rolling_back",
                "save",
                "fence",
                "rollback_started",
                "save",
                "rollback:3:[1]"
            ]
        );
        assert_eq!(m.status().waves[3].rollback_tasks, 1);
        let out = m.step(published(3, TaskAction::Rollback), t + 5);
        assert_eq!(names(&out), ["fault"]);
        assert_eq!(
            out.wake_at_ms,
            Some(t + 5 + TIMEOUT + DEADLINE_GRACE.as_millis() as u64)
        );
        let out = m.step(result(3, 1, TaskAction::Rollback, Out::RolledBack), t + 6);
        assert_eq!(
            names(&out),
            [
                "counted",
                "rollback_finished",
                "fence",
                "state:rolled_back",
                "save",
                "exit"
            ]
        );
        let s = m.status();
        assert_eq!(s.state, CampaignState::RolledBack);
        assert_eq!(s.finished_at_ms, Some(t + 6));
        assert_eq!(s.waves[3].rolled_back, 1);
        assert!(
            s.reason.as_deref().unwrap().ends_with(
                "top class: injected; wave 3 rolled back: 1 restored, 0 refused, 0 failed"
            ),
            "{:?}",
            s.reason
        );
    }

    #[test]
    fn rollback_tasks_without_result_by_the_deadline_count_as_failed() {
        let mut m = Machine::new(status(&[2], &[]));
        m.step(Msg::CaughtUp, 0);
        m.step(published(0, TaskAction::Rotate), 1);
        m.step(ok(0, 0), 2);
        m.step(ok(0, 1), 3);
        // Completed: no bake after the last wave.
        assert_eq!(m.state(), CampaignState::Completed);

        let mut m = Machine::new(status(&[2, 2], &[]));
        m.step(Msg::CaughtUp, 0);
        m.step(published(0, TaskAction::Rotate), 1);
        m.step(ok(0, 0), 2);
        m.step(failed(0, 1), 3);
        // 50% is within the budget; pause before the next wave, then an
        // operator rolls the wave back.
        m.step(control(ControlAction::Pause, 1), 4);
        assert_eq!(m.state(), CampaignState::Paused);
        let out = m.step(control(ControlAction::Rollback, 2), 5);
        assert_eq!(m.state(), CampaignState::RollingBack);
        assert!(names(&out).contains(&"rollback:0:[0]".to_string()));
        let out = m.step(published(0, TaskAction::Rollback), 10);
        let deadline = out.wake_at_ms.unwrap();
        assert!(m.step(Msg::Timer, deadline - 1).effects.is_empty());
        let out = m.step(Msg::Timer, deadline);
        assert_eq!(names(&out)[0], "rollback_finished");
        let w = &m.status().waves[0];
        assert_eq!((w.rolled_back, w.rollback_failed), (0, 1));
        assert_eq!(m.state(), CampaignState::RolledBack);
    }

    #[test]
    fn abort_stops_publishing_and_failed_jobs_are_retried() {
        let mut m = Machine::new(status(&[2, 2], &[]));
        m.step(Msg::CaughtUp, 0);
        let out = m.step(
            Msg::JobFailed {
                error: "no responders".into(),
            },
            100,
        );
        assert!(out.effects.is_empty());
        assert_eq!(out.wake_at_ms, Some(100 + RETRY_FIRST_MS));
        // Retried: the wave already started, so only publishing again.
        let out = m.step(Msg::Timer, 100 + RETRY_FIRST_MS);
        assert_eq!(names(&out), ["fence", "publish:0"]);
        assert_eq!(
            publish_mode(CampaignState::Paused, TaskAction::Rotate),
            PublishMode::Hold
        );
        assert_eq!(
            publish_mode(CampaignState::Paused, TaskAction::Rollback),
            PublishMode::Go
        );
        let out = m.step(control(ControlAction::Abort, 1), 2_000);
        assert_eq!(names(&out), ["fence", "state:aborted", "save", "exit"]);
        assert_eq!(
            publish_mode(m.state(), TaskAction::Rotate),
            PublishMode::Stop
        );
    }

    #[test]
    fn a_containment_wave_over_budget_pauses_instead_of_rolling_back() {
        let mut st = status(&[2, 2], &[]);
        st.spec.strategy = Strategy::Containment;
        let mut m = Machine::new(st);
        m.step(Msg::CaughtUp, 0);
        m.step(published(0, TaskAction::Rotate), 1);
        m.step(failed(0, 0), 2);
        let out = m.step(failed(0, 1), 3);
        assert!(names(&out).contains(&"rollback_refused".to_string()));
        assert_eq!(m.state(), CampaignState::Paused);
        // Resumed: the campaign goes on with the next wave.
        m.step(control(ControlAction::Resume, 1), 4);
        assert_eq!(m.status().current_wave, 1);
        assert_eq!(m.state(), CampaignState::Running);
    }

    #[test]
    fn a_gate_rereads_approvals_while_waiting_but_not_while_paused() {
        let mut m = Machine::new(status(&[1, 1], &[0]));
        assert_eq!(names(&m.step(Msg::CaughtUp, 0)), ["read_approvals:0"]);
        let found = |wave| Msg::Approvals {
            wave,
            found: vec![],
        };
        let out = m.step(found(0), 10);
        assert_eq!(m.state(), CampaignState::AwaitingApproval);
        assert_eq!(out.wake_at_ms, Some(10 + APPROVAL_RESCAN_MS));
        let out = m.step(Msg::Timer, 10 + APPROVAL_RESCAN_MS);
        assert_eq!(names(&out), ["read_approvals:0"]);
        m.step(found(0), 20_000);
        m.step(control(ControlAction::Pause, 1), 20_001);
        let out = m.step(Msg::Timer, 60_000);
        assert!(
            out.effects.is_empty() && out.wake_at_ms.is_none(),
            "{out:?}"
        );
        // Resumed: read again, then wait again (the event is deduplicated).
        assert_eq!(
            names(&m.step(control(ControlAction::Resume, 2), 60_001)),
            ["fence", "state:running", "save", "read_approvals:0"]
        );
        // An approval found in the stream (a restarted coordinator) starts the wave.
        let approval = Approval {
            wave: 0,
            by: "bob".into(),
            at_ms: 5,
        };
        let out = m.step(
            Msg::Approvals {
                wave: 0,
                found: vec![approval],
            },
            60_002,
        );
        assert_eq!(names(&out), starts(0));
        assert_eq!(m.status().waves[0].approved_at_ms, Some(5));
    }

    /// One wave of two tasks: index 0 in eu, index 1 in ap.
    fn two_regions() -> Machine {
        let mut st = status(&[2], &[]);
        st.waves[0].regions = [("eu".to_string(), 1), ("ap".to_string(), 1)].into();
        st.regions = [
            ("eu".to_string(), Default::default()),
            ("ap".to_string(), Default::default()),
        ]
        .into();
        for r in st.regions.values_mut() {
            r.total = 1;
        }
        Machine::new(st)
    }

    /// A view where `silent` regions have had no live worker since the
    /// given time and every other region named has one.
    fn view(at_ms: u64, live: &[&str], silent: &[(&str, u64)]) -> Msg {
        use crate::regions::{RegionLive, RegionView};
        let mut regions = std::collections::BTreeMap::new();
        for r in live {
            regions.insert(
                r.to_string(),
                RegionLive {
                    workers: 1,
                    ..Default::default()
                },
            );
        }
        for (r, since) in silent {
            regions.insert(
                r.to_string(),
                RegionLive {
                    silent_since_ms: Some(*since),
                    queued: Some(1),
                    in_flight: Some(0),
                    ..Default::default()
                },
            );
        }
        Msg::Regions(Arc::new(RegionView {
            at_ms,
            listening_since_ms: 0,
            regions,
        }))
    }

    fn in_region(msg: Msg, region: &str) -> Msg {
        match msg {
            Msg::Result {
                mut result,
                published_ms,
            } => {
                result.region = region.into();
                Msg::Result {
                    result,
                    published_ms,
                }
            }
            m => m,
        }
    }

    const PAUSE: u64 = 10_000;

    #[test]
    fn a_silent_region_pauses_the_wave_and_its_deadline_stands_still() {
        let mut m = two_regions();
        m.step(view(0, &["eu"], &[("ap", 0)]), 0);
        // Silent for less than the pause threshold: the wave starts.
        let out = m.step(Msg::CaughtUp, 0);
        assert_eq!(names(&out), starts(0));
        m.step(published(0, TaskAction::Rotate), 10);
        let out = m.step(in_region(ok(0, 0), "eu"), 20);
        assert!(!names(&out).contains(&"state:paused".to_string()));
        // Far past the task timeout, but ap is silent: no deadline yet, and
        // the campaign pauses once ap has been silent for the threshold.
        let out = m.step(view(PAUSE - 1, &["eu"], &[("ap", 0)]), PAUSE - 1);
        assert!(out.effects.is_empty(), "{:?}", names(&out));
        let out = m.step(view(PAUSE, &["eu"], &[("ap", 0)]), PAUSE);
        assert_eq!(names(&out), ["fence", "state:paused", "save"]);
        let reason = m.status().reason.clone().unwrap();
        assert!(
            reason.starts_with("region ap: no live workers for 10 s; 1 task queued"),
            "{reason}"
        );
        assert_eq!(m.status().paused_regions, vec!["ap".to_string()]);
        assert_eq!(m.status().regions["ap"].live_workers, Some(0));
        assert_eq!(m.status().regions["ap"].silent_for_ms, Some(PAUSE));
        assert_eq!(m.status().regions["eu"].live_workers, Some(1));
        // Paused for an hour: the wave is not decided, nothing is no_result.
        let later = PAUSE + 3_600_000;
        assert!(m.step(Msg::Timer, PAUSE + 60_000).effects.is_empty());
        // Past the tasks' start window, they leave the queue (a worker
        // would refuse them as too late), once.
        let out = m.step(Msg::Timer, later);
        assert_eq!(names(&out), ["fence", "expire:0"]);
        assert!(m.step(Msg::Timer, later).effects.is_empty());
        assert!(m.status().waves[0].decision.is_none());
        assert_eq!(m.status().waves[0].no_result, 0);
        // ap is back, the operator resumes: the unanswered task is issued
        // again, and a whole task timeout runs from then.
        m.step(view(later, &["eu", "ap"], &[]), later);
        let out = m.step(control(ControlAction::Resume, 1), later + 1);
        assert_eq!(
            names(&out),
            ["fence", "state:running", "save", "fence", "reissue:0:[1]"]
        );
        assert!(m.status().paused_regions.is_empty());
        let out = m.step(published(0, TaskAction::Rotate), later + 5);
        let deadline = later + 5 + TIMEOUT + DEADLINE_GRACE.as_millis() as u64;
        assert_eq!(out.wake_at_ms, Some(deadline));
        let out = m.step(in_region(ok(0, 1), "ap"), later + 6);
        assert!(names(&out).contains(&"state:completed".to_string()));
        let w = &m.status().waves[0];
        assert_eq!((w.succeeded, w.failed, w.no_result), (2, 0, 0));
    }

    #[test]
    fn a_region_silent_for_long_pauses_before_the_wave_is_published() {
        let mut m = two_regions();
        let now = 60_000;
        m.step(view(now, &["eu"], &[("ap", 0)]), now);
        let out = m.step(Msg::CaughtUp, now);
        assert_eq!(names(&out), ["fence", "state:paused", "save"]);
        let reason = m.status().reason.clone().unwrap();
        assert!(
            reason.starts_with(
                "region ap: no live workers for 60 s; wave 0 not started (1 task for it)"
            ),
            "{reason}"
        );
        assert!(m.status().waves[0].started_at_ms.is_none());
        // Resumed while ap is still silent: paused again at once.
        let out = m.step(control(ControlAction::Resume, 1), now + 1);
        assert_eq!(
            names(&out),
            [
                "fence",
                "state:running",
                "save",
                "fence",
                "state:paused",
                "save"
            ]
        );
        // Resumed with ap back: the wave starts.
        m.step(view(now + 2, &["eu", "ap"], &[]), now + 2);
        let out = m.step(control(ControlAction::Resume, 2), now + 3);
        let mut want = vec!["fence".to_string(), "state:running".into(), "save".into()];
        want.extend(starts(0));
        assert_eq!(names(&out), want);
        // An operator pause does not stop the deadline (unchanged).
        assert!(m.status().paused_regions.is_empty());
    }

    #[test]
    fn stop_saves_unless_fenced() {
        let mut m = Machine::new(status(&[1], &[]));
        assert_eq!(
            names(&m.step(Msg::Stop { fenced: false }, 0)),
            ["save", "exit"]
        );
        let mut m = Machine::new(status(&[1], &[]));
        assert_eq!(names(&m.step(Msg::Stop { fenced: true }, 0)), ["exit"]);
    }

    /// A worker died holding task 1 of a wave: the wave's deadline waits out
    /// the redelivery allowance, the redelivered task's result completes the
    /// wave, and nothing counts as without result.
    #[test]
    fn a_crashed_task_is_waited_for_until_its_redelivery_could_finish() {
        const REDELIVERY: u64 = 20_000;
        let grace = DEADLINE_GRACE.as_millis() as u64;
        let mut m = Machine::new(status(&[3, 1], &[]))
            .with_redelivery_allowance(std::time::Duration::from_millis(REDELIVERY));
        m.step(Msg::CaughtUp, 0);
        m.step(published(0, TaskAction::Rotate), 10);
        m.step(ok(0, 0), 20);
        let out = m.step(ok(0, 2), 30);
        // The deadline counts from the last result.
        let deadline = 30 + TIMEOUT + grace + REDELIVERY;
        assert_eq!(out.wake_at_ms, Some(deadline));
        // Past the task timeout (where it ended without the allowance) the
        // wave still waits.
        let out = m.step(Msg::Timer, 30 + TIMEOUT + grace);
        assert!(out.effects.is_empty(), "{:?}", names(&out));
        assert_eq!(out.wake_at_ms, Some(deadline));
        // The redelivered task's result comes late, within the allowance.
        let out = m.step(ok(0, 1), deadline - 1);
        assert!(names(&out).contains(&"wave_finished".to_string()));
        assert!(!names(&out).iter().any(|n| n.starts_with("withdraw")));
        let w = &m.status().waves[0];
        assert_eq!((w.succeeded, w.failed, w.no_result), (3, 0, 0));
        assert_eq!(m.state(), CampaignState::Baking);
    }

    /// Without any result at all the wave still ends: at the allowance-
    /// extended deadline, with the missing task counted as without result;
    /// a rollback's wait is extended the same way.
    #[test]
    fn the_redelivery_allowance_delays_but_never_removes_a_deadline() {
        const REDELIVERY: u64 = 7_000;
        let grace = DEADLINE_GRACE.as_millis() as u64;
        let allowance = std::time::Duration::from_millis(REDELIVERY);
        let mut m = Machine::new(status(&[2, 2], &[])).with_redelivery_allowance(allowance);
        m.step(Msg::CaughtUp, 0);
        let out = m.step(published(0, TaskAction::Rotate), 10);
        let deadline = 10 + TIMEOUT + grace + REDELIVERY;
        assert_eq!(out.wake_at_ms, Some(deadline));
        m.step(ok(0, 0), 5);
        assert!(m.step(Msg::Timer, deadline - 1).effects.is_empty());
        let out = m.step(Msg::Timer, deadline);
        assert!(names(&out).contains(&"withdraw:0".to_string()));
        let w = &m.status().waves[0];
        assert_eq!((w.succeeded, w.no_result), (1, 1));

        // An operator rolls the wave back: the rollback waits as long.
        m.step(control(ControlAction::Pause, 1), deadline + 1);
        m.step(control(ControlAction::Rollback, 2), deadline + 2);
        assert_eq!(m.state(), CampaignState::RollingBack);
        let t = deadline + 10;
        let out = m.step(published(0, TaskAction::Rollback), t);
        assert_eq!(out.wake_at_ms, Some(t + TIMEOUT + grace + REDELIVERY));
    }
}
