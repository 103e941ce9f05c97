//! One campaign's driver and aggregator. The driver walks the campaign's
//! state machine (publish a wave, wait for its results or deadline, decide,
//! bake, next wave; or roll back, pause, complete), deriving each step from the
//! snapshot alone, so it resumes after a restart or an error exactly where the
//! snapshot says. The aggregator replays and follows the campaign's results
//! with one ordered consumer and feeds them into the [`Book`].

use super::{
    book::{Applied, Book},
    decide::decide,
    events,
    fault::{Crash, CrashPoint},
    plan::{PlanError, PlanReader},
    preflight::{self, AgentKey},
    snapshot_key, start_window_ms, ControlAction, Engine, Handle, DEADLINE_GRACE, TASK_ACK_WINDOW,
};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::kv;
use futures::StreamExt;
use keywave_common::{
    codec, now_ms,
    publish::{AckWindow, PublishError},
    subjects,
    wire::{
        CampaignSpec, CampaignState, Decision, EventKind, RotationResult, RotationTask, Strategy,
        TaskAction, VerifyKind, SCHEMA_VERSION,
    },
};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::{Interval, MissedTickBehavior};
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
    /// Reading or following approvals failed: retried.
    #[error("approvals: {0}")]
    Approvals(String),
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
/// Longest wait before a failed driver step is tried again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// What woke a waiting driver.
enum Wake {
    Progress,
    Timer,
    Control,
    Tick,
    Stop,
}

/// Runs a campaign until it is finished or the coordinator stops; retries
/// (with backoff) after errors such as a NATS outage.
pub(super) async fn run(engine: Arc<Engine>, h: Arc<Handle>) {
    let aggregator = engine.tracker.spawn(aggregate(engine.clone(), h.clone()));
    let spec = h.status().spec;
    let mut tick = tokio::time::interval(engine.opts.progress_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut d = Driver {
        plan: PlanReader::new(engine.campaigns.clone(), h.manifest.clone()),
        control: h.take_control_rx(),
        engine,
        h,
        spec,
        publish_done_ms: None,
        tick,
        agents: None,
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        match d.drive().await {
            Ok(()) | Err(DriveError::Shutdown) => break,
            Err(DriveError::Fenced(why)) => {
                warn!(campaign = %d.h.cid, reason = %why, "Campaign driver fenced: another coordinator drives it now");
                d.engine.halted.cancel();
                break;
            }
            Err(DriveError::Crashed(c)) => {
                warn!(campaign = %d.h.cid, error = %c, "Campaign driver crashed (fault injection)");
                d.engine.halted.cancel();
                d.engine.crashed.cancel();
                break;
            }
            Err(e) => {
                warn!(campaign = %d.h.cid, error = %e, retry_in = ?backoff, "Campaign driver failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = d.h.stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_RETRY_DELAY);
            }
        }
    }
    d.h.stop.cancel();
    let _ = aggregator.await;
    // A fenced or killed coordinator saves nothing.
    if !d.engine.halted.is_cancelled() {
        if let Err(e) = d.save().await {
            warn!(campaign = %d.h.cid, error = %e, "Could not save the final campaign snapshot");
        }
    }
    if d.state().is_terminal() {
        d.engine.forget(&d.h.cid);
    }
}

struct Driver {
    engine: Arc<Engine>,
    h: Arc<Handle>,
    spec: CampaignSpec,
    plan: PlanReader,
    control: watch::Receiver<Option<ControlAction>>,
    /// When the current wave's last task was published (this process only).
    publish_done_ms: Option<u64>,
    tick: Interval,
    /// The agents a wave's pre-flight asks, read from the plan once per wave.
    agents: Option<(u32, Arc<BTreeSet<AgentKey>>)>,
}

impl Driver {
    fn cid(&self) -> &str {
        &self.h.cid
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.h.book.lock().expect("book lock")
    }

    fn state(&self) -> CampaignState {
        self.book().status.state
    }

    /// Saves the snapshot: a compare-and-set on the revision this driver
    /// last read or wrote, so a coordinator that lost its lease can never
    /// overwrite what the new one saved.
    async fn save(&self) -> Result<(), DriveError> {
        if self.engine.halted.is_cancelled() {
            return Err(DriveError::Fenced("the coordinator is halted".into()));
        }
        let body = {
            let b = self.book();
            self.h.dirty.store(false, Ordering::Relaxed);
            serde_json::to_vec(&b.status).map_err(|e| DriveError::Save(e.to_string()))?
        };
        let expected = self.h.snapshot_rev.load(Ordering::SeqCst);
        match self
            .engine
            .campaigns
            .update(snapshot_key(self.cid()), body.into(), expected)
            .await
        {
            Ok(rev) => {
                self.h.snapshot_rev.store(rev, Ordering::SeqCst);
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
                self.h.dirty.store(true, Ordering::Relaxed);
                Err(DriveError::Save(e.to_string()))
            }
        }
    }

    /// The lease fence: before publishing a wave, deciding or changing state.
    async fn fence(&self) -> Result<(), DriveError> {
        self.engine.fence().await.map_err(DriveError::from)
    }

    async fn save_if_dirty(&self) -> Result<(), DriveError> {
        if self.h.dirty.load(Ordering::Relaxed) {
            self.save().await?;
        }
        Ok(())
    }

    async fn event(&self, kind: EventKind) -> Result<(), DriveError> {
        if self.engine.halted.is_cancelled() {
            return Err(DriveError::Fenced("the coordinator is halted".into()));
        }
        events::publish(&self.engine.js, self.cid(), kind).await?;
        Ok(())
    }

    /// Moves to `state` with `reason`: event first (so a failed publish
    /// changes nothing), then memory and snapshot.
    async fn transition(&self, state: CampaignState, reason: String) -> Result<(), DriveError> {
        self.fence().await?;
        if self.state() != state {
            self.event(EventKind::StateChanged {
                state,
                reason: reason.clone(),
            })
            .await?;
            info!(campaign = %self.cid(), state = %state, reason = %reason, "Campaign state changed");
        }
        {
            let mut b = self.book();
            b.status.state = state;
            b.status.reason = Some(reason);
            if state.is_terminal() {
                b.status.finished_at_ms = Some(now_ms());
            }
        }
        self.h.state.send_replace(state);
        self.save().await
    }

    /// Acts on an operator request.
    async fn on_control(&mut self, action: Option<ControlAction>) -> Result<(), DriveError> {
        let state = self.state();
        match action {
            Some(ControlAction::Abort) if !state.is_terminal() => {
                self.transition(CampaignState::Aborted, "aborted by operator".into())
                    .await
            }
            Some(ControlAction::Pause)
                if matches!(
                    state,
                    CampaignState::Running
                        | CampaignState::Baking
                        | CampaignState::AwaitingApproval
                ) =>
            {
                self.transition(CampaignState::Paused, "paused by operator".into())
                    .await
            }
            Some(ControlAction::Resume) if state == CampaignState::Paused => {
                self.transition(CampaignState::Running, "resumed by operator".into())
                    .await
            }
            // Checked by `Engine::rollback`; checked again here because the
            // request may be replayed after a restart.
            Some(ControlAction::Rollback)
                if state == CampaignState::Paused
                    && self.spec.strategy == Strategy::Continuity
                    && {
                        let b = self.book();
                        let w = b.status.current_wave as usize;
                        b.status
                            .waves
                            .get(w)
                            .is_some_and(|ws| ws.decision.is_some())
                    } =>
            {
                let w = self.book().status.current_wave;
                self.transition(
                    CampaignState::RollingBack,
                    format!("wave {w} rollback requested by operator"),
                )
                .await
            }
            other => {
                debug!(campaign = %self.cid(), action = ?other, state = %state, "Operator request needs no action");
                Ok(())
            }
        }
    }

    /// Acts on a request that arrived since the last look, if any.
    async fn poll_control(&mut self) -> Result<(), DriveError> {
        if self.control.has_changed().unwrap_or(false) {
            let action = *self.control.borrow_and_update();
            self.on_control(action).await?;
        }
        Ok(())
    }

    /// Waits for progress, the timer, an operator request, the save tick or
    /// shutdown, and handles the last three.
    async fn wait(&mut self, timer: Duration) -> Result<Wake, DriveError> {
        let wake = tokio::select! {
            _ = self.h.progress.notified() => Wake::Progress,
            _ = tokio::time::sleep(timer) => Wake::Timer,
            r = self.control.changed() => if r.is_ok() { Wake::Control } else { Wake::Timer },
            _ = self.tick.tick() => Wake::Tick,
            _ = self.h.stop.cancelled() => Wake::Stop,
        };
        match wake {
            Wake::Control => {
                let action = *self.control.borrow_and_update();
                self.on_control(action).await?;
            }
            Wake::Tick => self.save_if_dirty().await?,
            Wake::Stop => return Err(DriveError::Shutdown),
            Wake::Progress | Wake::Timer => {}
        }
        Ok(wake)
    }

    async fn wait_caught_up(&self) -> Result<(), DriveError> {
        let mut rx = self.h.caught_up.subscribe();
        tokio::select! {
            _ = rx.wait_for(|v| *v) => Ok(()),
            _ = self.h.stop.cancelled() => Err(DriveError::Shutdown),
        }
    }

    async fn wait_while_paused(&mut self) -> Result<(), DriveError> {
        while self.state() == CampaignState::Paused {
            self.wait(Duration::from_secs(3600)).await?;
        }
        Ok(())
    }

    /// The state machine, one step per iteration, each derived from the
    /// snapshot.
    async fn drive(&mut self) -> Result<(), DriveError> {
        self.wait_caught_up().await?;
        loop {
            self.poll_control().await?;
            let (state, w, decision) = {
                let b = self.book();
                let w = b.status.current_wave;
                (
                    b.status.state,
                    w,
                    b.status.waves.get(w as usize).and_then(|ws| ws.decision),
                )
            };
            if state.is_terminal() {
                return Ok(());
            }
            match (state, decision) {
                (CampaignState::RollingBack, _) => {
                    let span = tracing::info_span!("wave", wave = w, action = "rollback");
                    tracing::Instrument::instrument(self.rollback(w), span).await?
                }
                (_, None) => {
                    if self.gate(w).await? && self.preflight(w).await? {
                        // Tasks carry this span's trace context (keywave_common::telemetry::inject).
                        let span = tracing::info_span!("wave", wave = w, action = "rotate");
                        tracing::Instrument::instrument(self.run_wave(w), span).await?
                    }
                }
                (CampaignState::Paused, Some(_)) => self.wait_while_paused().await?,
                (CampaignState::Baking, Some(Decision::NextWave)) => {
                    if self.bake(w).await? {
                        self.advance(w).await?;
                    }
                }
                (_, Some(Decision::Complete)) => {
                    let reason = self.book().status.waves[w as usize]
                        .reason
                        .clone()
                        .unwrap_or_default();
                    self.transition(CampaignState::Completed, reason).await?
                }
                // Next wave, or an operator resumed after a failed wave.
                (_, Some(_)) => self.advance(w).await?,
            }
        }
    }

    /// The approval gate before wave `w` (see `CampaignSpec::approve_before_waves`):
    /// returns `true` when the wave may start (no gate, approved, or
    /// already started), `false` when an operator request moved the
    /// campaign elsewhere (paused, aborted) while it waited. Approvals are
    /// `approved` events: they are replayed from the stream (so a restarted
    /// coordinator finds them) and followed live while waiting.
    async fn gate(&mut self, w: u32) -> Result<bool, DriveError> {
        let (gated, approved, started, size) = {
            let b = self.book();
            let ws = &b.status.waves[w as usize];
            (
                self.spec.approve_before_waves.contains(&w),
                ws.approved_at_ms.is_some(),
                ws.started_at_ms.is_some() || ws.published,
                ws.size,
            )
        };
        if !gated || started {
            return Ok(true);
        }
        if approved {
            return self.approved(w, None).await.map(|()| true);
        }
        let subject = subjects::event(self.cid(), "approved");
        // Subscribed before the replay: no approval falls in between.
        let mut live = self
            .engine
            .client
            .subscribe(subject)
            .await
            .map_err(|e| DriveError::Approvals(e.to_string()))?;
        let mut rescan = true;
        let mut announced = false;
        loop {
            if rescan {
                rescan = false;
                if self.book().status.waves[w as usize]
                    .approved_at_ms
                    .is_some()
                {
                    return self.approved(w, None).await.map(|()| true);
                }
                let found = super::read_approvals(&self.engine.js, self.cid())
                    .await
                    .map_err(DriveError::Approvals)?;
                if let Some(a) = found.into_iter().find(|a| a.wave == w) {
                    return self.approved(w, Some(a)).await.map(|()| true);
                }
            }
            match self.state() {
                s if s.is_terminal() => return Ok(false),
                CampaignState::Paused => {
                    self.wait_while_paused().await?;
                    return Ok(false);
                }
                CampaignState::AwaitingApproval if announced => {}
                _ => {
                    self.fence().await?;
                    self.event(EventKind::ApprovalRequired { wave: w, size })
                        .await?;
                    let cid = self.cid().to_string();
                    self.transition(
                        CampaignState::AwaitingApproval,
                        format!("wave {w} ({size} credentials) waits for an approval: keywave campaign approve {cid}"),
                    )
                    .await?;
                    info!(campaign = %cid, wave = w, size, "Waiting for an approval");
                    announced = true;
                }
            }
            enum GateWake {
                Live(Option<async_nats::Message>),
                Poke,
                Control,
                Tick,
                Stop,
            }
            let wake = tokio::select! {
                m = live.next() => GateWake::Live(m),
                _ = self.h.approval.notified() => GateWake::Poke,
                // A safety net: the live subscription may miss an approval across a reconnect.
                _ = tokio::time::sleep(Duration::from_secs(10)) => GateWake::Poke,
                r = self.control.changed() => if r.is_ok() { GateWake::Control } else { GateWake::Poke },
                _ = self.tick.tick() => GateWake::Tick,
                _ = self.h.stop.cancelled() => GateWake::Stop,
            };
            match wake {
                GateWake::Live(Some(m)) => {
                    match super::approval_of(&m.payload, m.headers.as_ref()) {
                        Some(a) if a.wave == w => {
                            return self.approved(w, Some(a)).await.map(|()| true)
                        }
                        _ => {}
                    }
                }
                GateWake::Live(None) => {
                    return Err(DriveError::Approvals("the subscription ended".into()))
                }
                GateWake::Poke => rescan = true,
                GateWake::Control => {
                    let action = *self.control.borrow_and_update();
                    self.on_control(action).await?;
                    if self.state() != CampaignState::AwaitingApproval {
                        return Ok(false);
                    }
                }
                GateWake::Tick => self.save_if_dirty().await?,
                GateWake::Stop => return Err(DriveError::Shutdown),
            }
        }
    }

    /// The pre-flight before wave `w` (see [`preflight`]): asks the agents of
    /// the wave's `attest` consumers whether they are alive. Returns `true`
    /// when the wave may start (pre-flight off, nothing to ask, enough
    /// agents answered, a containment campaign, or the wave already
    /// started), `false` when the campaign paused (too many agents
    /// unreachable, or an operator request) or ended. Nothing but the
    /// snapshot's state is kept: a campaign paused here and resumed, also by
    /// a restarted coordinator, comes back and asks again.
    async fn preflight(&mut self, w: u32) -> Result<bool, DriveError> {
        let started = {
            let b = self.book();
            let ws = &b.status.waves[w as usize];
            ws.started_at_ms.is_some() || ws.published
        };
        if started || self.spec.preflight != Some(true) {
            return Ok(true);
        }
        let agents = self.wave_agents(w).await?;
        if agents.is_empty() {
            return Ok(true);
        }
        match self.state() {
            s if s.is_terminal() => return Ok(false),
            CampaignState::Paused => {
                self.wait_while_paused().await?;
                return Ok(false);
            }
            _ => {}
        }
        let timeout = self.engine.opts.preflight_timeout;
        debug!(campaign = %self.cid(), wave = w, agents = agents.len(), "Pre-flight: asking the consumer agents");
        let answers = tokio::select! {
            a = preflight::ping_all(&self.engine.client, &agents, timeout) => a,
            _ = self.h.stop.cancelled() => return Err(DriveError::Shutdown),
        };
        let mut findings = preflight::Findings::from_answers(&answers);
        let mut not_watching = 0u64;
        self.scan_attest(w, |cred, key| {
            if let Some(preflight::Answer::Alive { credentials, .. }) = answers.get(key) {
                if !credentials.contains(cred) {
                    not_watching += 1;
                    findings.add_not_watching(key, cred);
                }
            }
        })
        .await?;
        let verdict = preflight::judge(w, &findings, self.spec.preflight_max_unreachable);
        let containment = self.spec.strategy == Strategy::Containment;
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
        self.fence().await?;
        self.event(EventKind::Preflight {
            wave: w,
            asked: findings.asked,
            unreachable: findings.unreachable,
            passed: verdict.passed,
            reason: reason.clone(),
            unreachable_agents: findings.unreachable_agents,
            unhealthy_agents: findings.unhealthy_agents.clone(),
            not_watching: findings.not_watching,
        })
        .await?;
        if !findings.unhealthy_agents.is_empty() || not_watching > 0 {
            let unhealthy: Vec<String> = findings
                .unhealthy_agents
                .iter()
                .map(ToString::to_string)
                .collect();
            warn!(
                campaign = %self.cid(), wave = w, unhealthy = %unhealthy.join(", "), not_watching,
                "Pre-flight: some consumer agents answered unhealthy or do not watch a credential of the wave"
            );
        }
        if verdict.passed || containment {
            info!(campaign = %self.cid(), wave = w, asked = findings.asked, unreachable = findings.unreachable, reason = %reason, "Pre-flight passed");
            // An operator request that came while the agents were asked.
            self.poll_control().await?;
            return Ok(matches!(self.state(), CampaignState::Running));
        }
        warn!(campaign = %self.cid(), wave = w, asked = findings.asked, unreachable = findings.unreachable, reason = %reason, "Pre-flight failed: the wave does not start");
        self.poll_control().await?;
        if !self.state().is_terminal() {
            self.transition(CampaignState::Paused, reason).await?;
        }
        Ok(false)
    }

    /// The (region, consumer) pairs of wave `w`'s `attest` consumers.
    async fn wave_agents(&mut self, w: u32) -> Result<Arc<BTreeSet<AgentKey>>, DriveError> {
        if let Some((cached, agents)) = &self.agents {
            if *cached == w {
                return Ok(agents.clone());
            }
        }
        let mut agents = BTreeSet::new();
        self.scan_attest(w, |_, key| {
            if !agents.contains(key) {
                agents.insert(key.clone());
            }
        })
        .await?;
        let agents = Arc::new(agents);
        self.agents = Some((w, agents.clone()));
        Ok(agents)
    }

    /// Calls `f(credential, (region, consumer))` for every `attest`
    /// consumer of every credential of wave `w`, one plan chunk at a time.
    async fn scan_attest(
        &mut self,
        w: u32,
        mut f: impl FnMut(&str, &AgentKey),
    ) -> Result<(), DriveError> {
        let (offset, size) = self.wave_range(w);
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

    /// Records the approval of wave `w` in the books (unless there already)
    /// and lets the campaign run.
    async fn approved(&mut self, w: u32, found: Option<super::Approval>) -> Result<(), DriveError> {
        let by = {
            let mut b = self.book();
            let ws = &mut b.status.waves[w as usize];
            if ws.approved_at_ms.is_none() {
                if let Some(a) = found {
                    ws.approved_by = Some(a.by);
                    ws.approved_at_ms = Some(a.at_ms);
                }
            }
            ws.approved_by.clone().unwrap_or_default()
        };
        if self.state() == CampaignState::AwaitingApproval {
            self.transition(CampaignState::Running, format!("wave {w} approved by {by}"))
                .await
        } else {
            self.save_if_dirty().await
        }
    }

    /// Plan position of wave `w`'s first credential, and the wave's size.
    fn wave_range(&self, w: u32) -> (u64, u64) {
        let b = self.book();
        let offset = b.status.waves[..w as usize].iter().map(|x| x.size).sum();
        (offset, b.status.waves[w as usize].size)
    }

    async fn advance(&mut self, w: u32) -> Result<(), DriveError> {
        let next = w + 1;
        if next as usize >= self.book().status.waves.len() {
            return self
                .transition(
                    CampaignState::Completed,
                    format!("resumed after the last wave ({w}); nothing left to rotate"),
                )
                .await;
        }
        self.book().status.current_wave = next;
        self.publish_done_ms = None;
        if self.state() != CampaignState::Running {
            self.transition(CampaignState::Running, format!("wave {next} starting"))
                .await
        } else {
            self.save().await
        }
    }

    /// Sleeps out the bake time (measured from the wave's end). Returns
    /// `false` when an operator request interrupted it.
    async fn bake(&mut self, w: u32) -> Result<bool, DriveError> {
        let finished = self.book().status.waves[w as usize]
            .finished_at_ms
            .unwrap_or_else(now_ms);
        let remaining = (finished + self.spec.bake_ms).saturating_sub(now_ms());
        let until = tokio::time::Instant::now() + Duration::from_millis(remaining);
        info!(campaign = %self.cid(), wave = w, bake_ms = remaining, "Baking");
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return Ok(true);
            }
            self.wait(until - now).await?;
            if self.state() != CampaignState::Baking {
                return Ok(false);
            }
        }
    }

    async fn run_wave(&mut self, w: u32) -> Result<(), DriveError> {
        let (published, started_at, size) = {
            let b = self.book();
            let ws = &b.status.waves[w as usize];
            (ws.published, ws.started_at_ms, ws.size)
        };
        let started_at = if published {
            started_at.unwrap_or_else(now_ms)
        } else {
            self.fence().await?;
            let started_at = match started_at {
                Some(t) => t,
                None => {
                    self.engine
                        .opts
                        .faults
                        .hit(CrashPoint::BetweenWaves { wave: w })?;
                    self.event(EventKind::WaveStarted { wave: w, size }).await?;
                    let t = now_ms();
                    self.book().status.waves[w as usize].started_at_ms = Some(t);
                    self.save().await?;
                    info!(campaign = %self.cid(), wave = w, size, "Wave started");
                    t
                }
            };
            if !self.publish_tasks(w, TaskAction::Rotate, None).await? {
                return Ok(());
            }
            self.book().status.waves[w as usize].published = true;
            self.publish_done_ms = Some(now_ms());
            self.save().await?;
            started_at
        };
        // The wave's deadline moves with its progress: it is the task
        // timeout after the later of the end of publishing and the last
        // result, so a large wave that drains steadily is never cut short,
        // while a stalled one ends one task timeout after it stalled. It
        // never passes the point after which no result can come: the last
        // moment a task may start (its `deadline_ms`) plus its run timeout.
        let base = self.publish_done_ms.unwrap_or(started_at);
        let timeout = self.spec.task_timeout_ms;
        let grace = DEADLINE_GRACE.as_millis() as u64;
        let cap = base + start_window_ms(timeout) + timeout + grace;
        let mut last_progress = base;
        let mut seen = self.seen_in_wave(w);
        let complete = loop {
            if self.state().is_terminal() {
                return Ok(());
            }
            let complete = self.book().wave_complete(w);
            let caught_up = *self.h.caught_up.borrow();
            let now = now_ms();
            let s = self.seen_in_wave(w);
            if s != seen {
                seen = s;
                last_progress = last_progress.max(now);
            }
            let deadline = (last_progress + timeout + grace).min(cap);
            if complete || (caught_up && now >= deadline) {
                break complete;
            }
            let timer = Duration::from_millis(deadline.saturating_sub(now).max(20));
            self.wait(timer).await?;
        };
        if !complete {
            self.withdraw_tasks(w).await;
        }
        self.finish_wave(w).await
    }

    /// Results received so far for wave `w`.
    fn seen_in_wave(&self, w: u32) -> u64 {
        self.book().tally(w).map_or(0, |t| t.seen.count())
    }

    /// Removes the campaign's tasks that no worker has finished from the work
    /// queue once their wave is decided without them, so that none of them
    /// starts after the decision (they count as `no_result`). A task a worker
    /// is running when this happens finishes and reports late; its ack finds
    /// nothing to remove. Best effort: if the purge fails, the tasks' own
    /// start deadline still refuses them later.
    async fn withdraw_tasks(&self, w: u32) {
        let filter = format!("keywave.task.*.{}", self.cid());
        let purged = async {
            let stream = self
                .engine
                .js
                .get_stream(keywave_common::topology::STREAM_TASKS)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .purge()
                .filter(filter)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match purged {
            Ok(r) => {
                info!(campaign = %self.cid(), wave = w, withdrawn = r.purged, "Wave decided without every result; its unstarted tasks were withdrawn")
            }
            Err(e) => {
                warn!(campaign = %self.cid(), wave = w, error = %e, "Could not withdraw the wave's unstarted tasks; their start deadline refuses them")
            }
        }
    }

    /// Publishes the tasks of wave `w` (all of them for a rotation, the
    /// `only` indexes for a rollback), one plan chunk at a time, acks awaited
    /// through a bounded window. Between chunks it acts on operator requests:
    /// a pause holds rotation publishing until resumed (rollbacks go on), an
    /// abort stops it. Returns `false` when aborted.
    async fn publish_tasks(
        &mut self,
        w: u32,
        action: TaskAction,
        only: Option<&super::book::BitSet>,
    ) -> Result<bool, DriveError> {
        let (offset, size) = self.wave_range(w);
        let end = offset + size;
        let mut window = AckWindow::new(TASK_ACK_WINDOW);
        let mut pos = offset;
        let cid = self.h.cid.clone();
        let js = self.engine.js.clone();
        let faults = self.engine.opts.faults;
        let mut sent = 0u64;
        while pos < end {
            self.poll_control().await?;
            match self.state() {
                s if s.is_terminal() => {
                    window.drain().await?;
                    return Ok(false);
                }
                CampaignState::Paused if action == TaskAction::Rotate => {
                    window.drain().await?;
                    info!(campaign = %cid, wave = w, published = pos - offset, "Publishing held while paused");
                    self.wait_while_paused().await?;
                    continue;
                }
                _ => {}
            }
            if self.h.stop.is_cancelled() {
                return Err(DriveError::Shutdown);
            }
            self.fence().await?;
            let (chunk, range) = self.plan.slice_at(pos, end).await?;
            for e in &chunk[range] {
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
                    strategy: self.spec.strategy,
                    credential_id: e.id.clone(),
                    region: e.region.clone(),
                    endpoint: e.endpoint.clone(),
                    kind: e.kind,
                    principal: e.principal.clone(),
                    issued_at_ms: issued,
                    deadline_ms: issued + start_window_ms(self.spec.task_timeout_ms),
                    run_timeout_ms: self.spec.task_timeout_ms,
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

    /// Closes wave `w`, publishes its result and decision, and moves on.
    async fn finish_wave(&mut self, w: u32) -> Result<(), DriveError> {
        self.fence().await?;
        let (ws, is_last) = {
            let mut b = self.book();
            b.finalize_wave(w, now_ms());
            let is_last = w as usize + 1 == b.status.waves.len();
            (b.status.waves[w as usize].clone(), is_last)
        };
        self.h.dirty.store(true, Ordering::Relaxed);
        self.event(EventKind::WaveFinished {
            wave: w,
            size: ws.size,
            succeeded: ws.succeeded,
            failed: ws.failed,
            no_result: ws.no_result,
            failures: ws.failures.clone(),
        })
        .await?;
        let verdict = decide(&ws, &self.spec, is_last);
        self.event(EventKind::Decision {
            wave: w,
            decision: verdict.decision,
            reason: verdict.reason.clone(),
        })
        .await?;
        info!(
            campaign = %self.cid(), wave = w, size = ws.size, succeeded = ws.succeeded,
            failed = ws.failed, no_result = ws.no_result, decision = ?verdict.decision,
            reason = %verdict.reason, "Wave finished"
        );
        {
            let mut b = self.book();
            let wsm = &mut b.status.waves[w as usize];
            wsm.decision = Some(verdict.decision);
            wsm.reason = Some(verdict.reason.clone());
        }
        let reason = verdict.reason;
        match verdict.decision {
            Decision::Complete => self.transition(CampaignState::Completed, reason).await,
            Decision::NextWave => match self.state() {
                // An operator paused during the wave: hold before the next one.
                CampaignState::Paused => self.save().await,
                _ if self.spec.bake_ms > 0 => self.transition(CampaignState::Baking, reason).await,
                _ => {
                    self.book().status.reason = Some(reason);
                    self.save().await
                }
            },
            Decision::Pause => self.transition(CampaignState::Paused, reason).await,
            Decision::Rollback if self.spec.strategy == Strategy::Containment => {
                let why = "containment never restores an exposed secret".to_string();
                self.event(EventKind::RollbackRefused {
                    wave: w,
                    credentials: ws.succeeded,
                    reason: why.clone(),
                })
                .await?;
                self.transition(
                    CampaignState::Paused,
                    format!("{reason}; rollback refused: {why}"),
                )
                .await
            }
            Decision::Rollback => self.transition(CampaignState::RollingBack, reason).await,
        }
    }

    /// Rolls back wave `w`: a rollback task for each credential whose
    /// rotation succeeded, then waits for their results or the deadline.
    async fn rollback(&mut self, w: u32) -> Result<(), DriveError> {
        let (tasks, targets) = {
            let mut b = self.book();
            let tasks = b.begin_rollback(w);
            let targets = b.tally(w).map(|t| t.rotated.clone());
            (tasks, targets)
        };
        let Some(targets) = targets else {
            return Ok(());
        };
        self.fence().await?;
        self.event(EventKind::RollbackStarted { wave: w, tasks })
            .await?;
        self.save().await?;
        info!(campaign = %self.cid(), wave = w, tasks, "Rollback started");
        if !self
            .publish_tasks(w, TaskAction::Rollback, Some(&targets))
            .await?
        {
            return Ok(());
        }
        self.engine
            .opts
            .faults
            .hit(CrashPoint::Rollback { wave: w })?;
        let deadline = now_ms() + self.spec.task_timeout_ms + DEADLINE_GRACE.as_millis() as u64;
        loop {
            if self.state().is_terminal() {
                return Ok(());
            }
            let complete = self.book().rollback_complete(w);
            let now = now_ms();
            if complete || now >= deadline {
                break;
            }
            self.wait(Duration::from_millis((deadline - now).max(20)))
                .await?;
        }
        let (restored, refused, failed, trip) = {
            let mut b = self.book();
            let missing = tasks.saturating_sub(b.rollback_seen(w));
            // Why the rollback runs: the campaign's reason when it entered
            // `rolling_back` (the tripped wave's verdict, or the operator's
            // request), kept in the snapshot across restarts.
            let why = b.status.reason.clone();
            let ws = &mut b.status.waves[w as usize];
            ws.rollback_failed += missing;
            (
                ws.rolled_back,
                ws.rollback_refused,
                ws.rollback_failed,
                why.or_else(|| ws.reason.clone()).unwrap_or_default(),
            )
        };
        self.event(EventKind::RollbackFinished {
            wave: w,
            restored,
            refused,
            failed,
        })
        .await?;
        self.transition(
            CampaignState::RolledBack,
            format!("{trip}; wave {w} rolled back: {restored} restored, {refused} refused, {failed} failed"),
        )
        .await
    }
}

/// Replays and follows the campaign's results into its book: one durable
/// pull consumer per campaign and term on `KEYWAVE_RESULTS`, filtered to the
/// campaign, from the first message. Durable rather than ordered: it lives
/// in the stream's replicas, so losing a cluster node moves it to another
/// node instead of requiring a new consumer (which a cluster that just lost a
/// node may not manage to create for a while). Results are acked once
/// applied; a redelivered one is a duplicate the book ignores.
async fn aggregate(engine: Arc<Engine>, h: Arc<Handle>) {
    let filter = subjects::result_campaign_filter(&h.cid);
    let name = format!("results-{}-{}", h.cid, engine.term);
    loop {
        let created = tokio::select! {
            c = engine.results.get_or_create_consumer(&name, pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("keywave coordinator results of {}", h.cid)),
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
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
        if consumer.cached_info().num_pending == 0 && consumer.cached_info().num_ack_pending == 0 {
            h.caught_up.send_replace(true);
            h.progress.notify_one();
        }
        let mut messages = match consumer.messages().await {
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
                Ok(Some(Err(e))) => {
                    warn!(campaign = %h.cid, error = %e, "Results consumer failed; pulling again");
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            let Ok(info) = msg.info() else { continue };
            let (pending, seq) = (info.pending, info.stream_sequence);
            let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            match codec::decode::<RotationResult>(msg.headers.as_ref(), &msg.payload) {
                Ok(r) if r.campaign_id == h.cid => {
                    let (applied, completes) = {
                        let mut b = h.book.lock().expect("book lock");
                        let applied = b.apply(&r, published_ms);
                        (applied, applied == Applied::Counted && b.completes(&r))
                    };
                    if applied == Applied::Counted {
                        engine.opts.metrics.result(&r);
                        h.dirty.store(true, Ordering::Relaxed);
                    }
                    if completes {
                        h.progress.notify_one();
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
            if pending == 0 && !*h.caught_up.borrow() {
                h.caught_up.send_replace(true);
                h.progress.notify_one();
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
