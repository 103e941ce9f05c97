//! The executor of the rotation and rollback protocols: a task goes in, a
//! [`RotationResult`] (fingerprints only) comes out, and in between it
//! performs, against the target and the secret store, the steps that the pure
//! [`machine::next`] decides. A redelivered task resumes where it stopped,
//! reuses the secret it staged, and never rotates a credential twice.

pub mod machine;
#[cfg(test)]
mod offline;

use crate::consumers::ConsumerVerifier;
use crate::fault::{Crash, Faults, Point};
use crate::notice::Notifier;
use crate::store::{Loaded, RecordStore, StoreError, Version};
use crate::targets::{AuthCheck, Endpoint, TargetError, Targets};
use backon::{BackoffBuilder, ExponentialBuilder};
use keywave_common::crypto::{generate, Secret};
use keywave_common::now_ms;
use keywave_common::wire::{ConsumerOutcome, ConsumerStatus, VerifyKind};
use keywave_common::wire::{
    ErrorClass, Outcome, RotationResult, RotationTask, Step, StepTiming, TargetKind, TaskAction,
    SCHEMA_VERSION,
};
use machine::{Next, Progress, Refusal, Slot, Staging, TargetOp};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a task restarts from the top after losing a CAS race before it
/// gives up with [`ErrorClass::Store`].
const MAX_CONFLICTS: usize = 5;

/// Steps one execution may take before it is declared a bug (a rotation
/// takes about 25).
const MAX_STEPS: usize = 200;

/// Longest error text put in a result.
const MAX_ERROR_TEXT: usize = 300;

/// Redelivery delay of a task handed back because the secret store was
/// unavailable (long enough for a JetStream leader election).
pub const STORE_REQUEUE_DELAY: Duration = Duration::from_secs(2);

/// Retries of a transient failure (target unavailable, store unavailable)
/// inside one task: exponential backoff with jitter, bounded by `attempts` and
/// by the task's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in total, the first included.
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// What became of a task.
#[derive(Debug, Clone, PartialEq)]
pub enum Flow {
    /// The task ended, in any outcome: publish this result, then ack the task.
    Finished(Box<RotationResult>),
    /// A crash was injected at this point: leave the task un-acked.
    Crashed(Point),
    /// Shutdown interrupted a retry wait: give the task back for redelivery
    /// (it resumes where it stopped).
    Interrupted,
    /// The secret store stayed unavailable through the in-task retries (a
    /// NATS leader election, a partition) while the deadline still allows a
    /// later try: give the task back after `delay`. Nothing is lost: every
    /// step done so far is recorded or can be read back.
    Retry { delay: Duration },
}

/// Why a task failed (or must stop) before it finished.
#[derive(Debug, Error)]
enum Fail {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Store(StoreError),
    #[error("deadline passed before the step after {0}")]
    Deadline(Step),
    #[error("the new secret did not authenticate after being set")]
    NewSecretRejected,
    #[error("the old secret still authenticates after revocation")]
    OldSecretStillAccepted,
    #[error("no previous secret to roll back to")]
    NoPrevious,
    #[error("the target accepts a random wrong secret for this login (e.g. Redis `nopass`, a `trust` rule in pg_hba.conf, an account without a password): nothing can be proven, nothing was set")]
    AcceptsAnySecret,
    #[error("endpoint {0:?} is not configured on this worker")]
    UnknownEndpoint(String),
    #[error("endpoint is of kind {endpoint}, the task says {task}")]
    KindMismatch {
        endpoint: TargetKind,
        task: TargetKind,
    },
    #[error("inconsistent record: {0}")]
    Internal(&'static str),
    /// Lost a CAS race: restart from the top with a fresh read.
    #[error("record changed concurrently")]
    Conflict,
    #[error("injected crash {0}")]
    Crashed(Point),
    #[error("interrupted by shutdown")]
    Interrupted,
    /// Consumers that did not move over in time (ids and reasons, no
    /// secret); the old secret was not revoked.
    #[error("consumer(s) not verified, old secret kept: {0}")]
    ConsumerNotVerified(String),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Fail::Conflict,
            e => Fail::Store(e),
        }
    }
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NewSecretRejected => Fail::NewSecretRejected,
            Refusal::OldSecretStillAccepted => Fail::OldSecretStillAccepted,
            Refusal::NoPrevious => Fail::NoPrevious,
            Refusal::AcceptsAnySecret => Fail::AcceptsAnySecret,
            Refusal::PromotedNotCurrent => Fail::Internal("promoted task is not CURRENT"),
            Refusal::OutOfOrder => Fail::Internal("step out of order"),
        }
    }
}

impl From<Crash> for Fail {
    fn from(c: Crash) -> Self {
        Fail::Crashed(c.point)
    }
}

impl Fail {
    fn is_transient(&self) -> bool {
        match self {
            Fail::Target(e) => e.is_transient(),
            Fail::Store(e) => e.is_transient(),
            _ => false,
        }
    }

    fn class(&self) -> ErrorClass {
        match self {
            Fail::Target(e) => e.class(),
            Fail::Store(_) | Fail::Conflict => ErrorClass::Store,
            Fail::Deadline(_) => ErrorClass::DeadlineExceeded,
            Fail::NewSecretRejected => ErrorClass::NewSecretRejected,
            Fail::OldSecretStillAccepted => ErrorClass::OldSecretStillAccepted,
            Fail::NoPrevious => ErrorClass::NoPrevious,
            Fail::AcceptsAnySecret => ErrorClass::TargetAcceptsAnySecret,
            Fail::UnknownEndpoint(_) => ErrorClass::UnknownEndpoint,
            Fail::KindMismatch { .. } => ErrorClass::KindMismatch,
            Fail::ConsumerNotVerified(_) => ErrorClass::ConsumerNotVerified,
            Fail::Internal(_) | Fail::Crashed(_) | Fail::Interrupted => ErrorClass::Internal,
        }
    }
}

/// The progress of one execution of a task: what goes into its result.
struct Run<'a> {
    task: &'a RotationTask,
    step: Step,
    timings: Vec<StepTiming>,
    /// Fingerprint of the secret this task makes CURRENT.
    new_fp: Option<String>,
    /// Whether `new_fp` is CURRENT in the store (promoted or restored).
    new_is_current: bool,
    old_fp: Option<String>,
    old_rejected: Option<bool>,
    /// What the target answered to a random wrong secret in this delivery;
    /// kept when a store conflict restarts the machine (it is about the
    /// target, not the record).
    canary: Option<AuthCheck>,
    /// Per-consumer verification outcomes.
    consumers: Vec<ConsumerOutcome>,
    /// No step starts after this instant (ms since the epoch; 0: none): the
    /// task's run timeout counted from its receipt, or, for a task without
    /// one, its `deadline_ms`.
    deadline: u64,
    /// The tracing span of the step under way (from `enter` to `done`): a
    /// child of the task span, disabled unless traces are exported.
    step_span: std::sync::Mutex<Option<tracing::Span>>,
}

impl<'a> Run<'a> {
    fn new(task: &'a RotationTask) -> Self {
        let deadline = if task.run_timeout_ms > 0 {
            now_ms().saturating_add(task.run_timeout_ms)
        } else {
            task.deadline_ms
        };
        Run {
            deadline,
            task,
            step: Step::Received,
            timings: Vec::new(),
            new_fp: None,
            new_is_current: false,
            canary: None,
            old_fp: None,
            old_rejected: None,
            consumers: Vec::new(),
            step_span: std::sync::Mutex::new(None),
        }
    }

    /// Fails with `DeadlineExceeded` when the run's deadline has passed, or
    /// when a task with a run timeout arrives after its start deadline
    /// (checked before every step; a deadline of 0 means none).
    fn before_step(&self) -> Result<(), Fail> {
        let now = now_ms();
        let start_by = self.task.deadline_ms;
        let too_late_to_start = self.task.run_timeout_ms > 0
            && self.step == Step::Received
            && start_by != 0
            && now > start_by;
        if too_late_to_start || (self.deadline != 0 && now > self.deadline) {
            return Err(Fail::Deadline(self.step));
        }
        Ok(())
    }
}

/// Runs tasks against a worker's targets and store.
///
/// Durable writes per rotated credential are kept at the minimum the
/// guarantees need, four: the task (published by the coordinator), PENDING
/// (stage: the new secret is stored before it is set at the target), the
/// promote CAS, and the result publish done by the runner. The protocol makes
/// two of them and no more: set, test, revoke and verify are read back from
/// the target itself on redelivery (a staged secret that authenticates has
/// been set), so they need no record of their own. A rollback writes once
/// (the swap). With a detection key, each secret made CURRENT is also
/// announced (see [`crate::notice`]); that publish is advisory and never
/// fails a task.
#[derive(Clone)]
pub struct Protocol {
    store: Arc<dyn RecordStore>,
    targets: Arc<Targets>,
    worker_id: String,
    faults: Faults,
    retry: RetryPolicy,
    /// Announces secrets made CURRENT when a detection key is configured.
    notifier: Option<Notifier>,
    /// Verifies a credential's consumers after promote.
    consumers: Option<ConsumerVerifier>,
}

impl std::fmt::Debug for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protocol")
            .field("worker_id", &self.worker_id)
            .field("faults", &self.faults)
            .field("retry", &self.retry)
            .field("notifier", &self.notifier)
            .finish_non_exhaustive()
    }
}

impl Protocol {
    pub fn new(
        store: impl RecordStore + 'static,
        targets: Arc<Targets>,
        worker_id: impl Into<String>,
        faults: Faults,
    ) -> Self {
        Protocol {
            store: Arc::new(store),
            targets,
            worker_id: worker_id.into(),
            faults,
            retry: RetryPolicy::default(),
            notifier: None,
            consumers: None,
        }
    }

    /// Verifies the consumers a task names with `verifier` (without one,
    /// every `attest` / `http` consumer fails verification).
    pub fn with_consumers(mut self, verifier: ConsumerVerifier) -> Self {
        self.consumers = Some(verifier);
        self
    }

    /// Announces every secret this protocol makes CURRENT with `notifier`.
    pub fn with_notifier(mut self, notifier: Notifier) -> Self {
        self.notifier = Some(notifier);
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn store(&self) -> &dyn RecordStore {
        self.store.as_ref()
    }

    /// Runs `task` to its end (or to an injected crash). Never panics; the
    /// result never carries a secret.
    pub async fn execute(&self, task: &RotationTask, shutdown: &CancellationToken) -> Flow {
        let mut run = Run::new(task);
        match self.dispatch(&mut run, shutdown).await {
            Ok(outcome) => {
                // One line per task is a cost at scale (about 7% of a worker's
                // CPU per credential at `info`): successes log at `debug`,
                // everything an operator must look at stays at `info`.
                if outcome == Outcome::Succeeded {
                    debug!(
                        task = %task.task_id,
                        credential = %task.credential_id,
                        step = %run.step,
                        "Task finished"
                    );
                } else {
                    info!(
                        task = %task.task_id,
                        credential = %task.credential_id,
                        step = %run.step,
                        outcome = ?outcome,
                        "Task finished"
                    );
                }
                Flow::Finished(Box::new(self.result(&run, outcome, None)))
            }
            Err(Fail::Crashed(point)) => Flow::Crashed(point),
            Err(Fail::Store(e)) if e.is_transient() && self.may_retry_later(task) => {
                warn!(
                    task = %task.task_id,
                    credential = %task.credential_id,
                    step = %run.step,
                    error = %e,
                    retry_in_ms = STORE_REQUEUE_DELAY.as_millis() as u64,
                    "Secret store unavailable; handing the task back for a later try"
                );
                Flow::Retry {
                    delay: STORE_REQUEUE_DELAY,
                }
            }
            Err(Fail::Interrupted) => {
                info!(task = %task.task_id, step = %run.step, "Task interrupted by shutdown");
                Flow::Interrupted
            }
            Err(fail) => {
                warn!(
                    task = %task.task_id,
                    credential = %task.credential_id,
                    step = %run.step,
                    class = %fail.class(),
                    error = %fail,
                    "Task failed"
                );
                Flow::Finished(Box::new(self.result(&run, Outcome::Failed, Some(&fail))))
            }
        }
    }

    async fn dispatch(
        &self,
        run: &mut Run<'_>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, Fail> {
        let task = run.task;
        let ep = self
            .targets
            .get(&task.endpoint)
            .ok_or_else(|| Fail::UnknownEndpoint(task.endpoint.clone()))?;
        if ep.kind() != task.kind {
            return Err(Fail::KindMismatch {
                endpoint: ep.kind(),
                task: task.kind,
            });
        }
        let mut conflicts = 0;
        loop {
            match self.drive(run, &ep, shutdown).await {
                // Another delivery of this task (or another task on this
                // credential) wrote first. Every step is idempotent, so start
                // over from a fresh read.
                Err(Fail::Conflict) if conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                    debug!(task = %task.task_id, conflicts, "Store conflict, re-reading");
                    run.step = Step::Received;
                }
                other => return other,
            }
        }
    }

    /// Whether a task handed back now would still be inside its deadline
    /// when it comes back.
    fn may_retry_later(&self, task: &RotationTask) -> bool {
        let d = task.deadline_ms;
        d == 0 || now_ms() + (STORE_REQUEUE_DELAY.as_millis() as u64) < d
    }

    /// Before `step` starts: the deadline check, then the fault-injection
    /// point (a delay or a crash). An injected delay stands for a slow
    /// operation, so shutdown does not cut it short (a drain waits for it).
    async fn enter(&self, run: &Run<'_>, step: Step) -> Result<(), Fail> {
        run.before_step()?;
        self.faults.before(step).await?;
        let span = tracing::debug_span!("step", step = step.as_str());
        if !span.is_disabled() {
            *run.step_span.lock().unwrap_or_else(|e| e.into_inner()) = Some(span);
        }
        Ok(())
    }

    /// Marks `step` complete: timing, log, then the fault-injection point.
    fn done(&self, run: &mut Run<'_>, step: Step, started: Instant) -> Result<(), Fail> {
        // Closes the step's span (if traced).
        drop(run.step_span.get_mut().map(Option::take));
        run.step = step;
        run.timings.push(StepTiming {
            step,
            micros: started.elapsed().as_micros() as u64,
        });
        debug!(task = %run.task.task_id, credential = %run.task.credential_id, step = %step, "Step done");
        self.faults.after(step)?;
        Ok(())
    }

    /// Runs `op`, retrying transient failures with exponential backoff and
    /// jitter, within `retry.attempts` and the task's deadline. A backoff wait
    /// ends early on shutdown ([`Fail::Interrupted`]).
    async fn retrying<T, Fut>(
        &self,
        run: &Run<'_>,
        shutdown: &CancellationToken,
        what: &'static str,
        mut op: impl FnMut() -> Fut,
    ) -> Result<T, Fail>
    where
        Fut: Future<Output = Result<T, Fail>>,
    {
        let mut delays = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.attempts.saturating_sub(1))
            .build();
        loop {
            match op().await {
                Err(fail) if fail.is_transient() => {
                    let Some(delay) = delays.next() else {
                        return Err(fail);
                    };
                    let d = run.deadline;
                    if d != 0 && now_ms().saturating_add(delay.as_millis() as u64) > d {
                        return Err(fail);
                    }
                    warn!(
                        task = %run.task.task_id,
                        op = what,
                        error = %fail,
                        retry_in_ms = delay.as_millis() as u64,
                        "Transient failure, retrying"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(Fail::Interrupted),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                r => return r,
            }
        }
    }

    async fn load(&self, run: &Run<'_>, shutdown: &CancellationToken) -> Result<Loaded, Fail> {
        let cred = &run.task.credential_id;
        self.retrying(run, shutdown, "load", move || async move {
            self.store.load(cred).await.map_err(Fail::from)
        })
        .await
    }

    async fn save(
        &self,
        run: &Run<'_>,
        shutdown: &CancellationToken,
        loaded: &Loaded,
    ) -> Result<u64, Fail> {
        let cred = &run.task.credential_id;
        self.retrying(run, shutdown, "save", move || async move {
            self.store
                .save(cred, &loaded.record, loaded.revision)
                .await
                .map_err(Fail::from)
        })
        .await
    }

    async fn check(
        &self,
        run: &Run<'_>,
        shutdown: &CancellationToken,
        ep: &Endpoint,
        secret: &Secret,
    ) -> Result<AuthCheck, Fail> {
        let p = &run.task.principal;
        self.retrying(run, shutdown, "check", move || async move {
            ep.check(p, secret).await.map_err(Fail::from)
        })
        .await
    }

    /// Which login `secret` opens (see [`crate::targets::Target::placement`]),
    /// retried like a check; `None` when it opens none.
    async fn placement(
        &self,
        run: &Run<'_>,
        shutdown: &CancellationToken,
        ep: &Endpoint,
        secret: &Secret,
    ) -> Result<Option<String>, Fail> {
        let p = &run.task.principal;
        self.retrying(run, shutdown, "check", move || async move {
            ep.placement(p, secret).await.map_err(Fail::from)
        })
        .await
    }

    async fn target_op(
        &self,
        run: &Run<'_>,
        shutdown: &CancellationToken,
        ep: &Endpoint,
        op: TargetOp,
        secret: &Secret,
    ) -> Result<(), Fail> {
        let p = &run.task.principal;
        self.retrying(run, shutdown, op_name(op), move || async move {
            match op {
                TargetOp::Add => ep.add(p, secret).await,
                TargetOp::Replace => ep.replace(p, secret).await,
                TargetOp::Remove => ep.remove(p, secret).await,
            }
            .map_err(Fail::from)
        })
        .await
    }

    /// Performs the steps [`machine::next`] decides, one at a time, from a
    /// fresh read of the record, until the task finishes or fails.
    async fn drive(
        &self,
        run: &mut Run<'_>,
        ep: &Endpoint,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, Fail> {
        let task = run.task;
        let view = machine::Task {
            task_id: &task.task_id,
            action: task.action,
            strategy: task.strategy,
        };
        let mut loaded = Loaded::default();
        let mut p = Progress {
            canary: run.canary,
            ..Progress::default()
        };
        let mut t0 = Instant::now();
        // A rotation takes about 25 steps; a machine that loops is a bug, and
        // must not spin a worker forever.
        for _ in 0..MAX_STEPS {
            let next = machine::next(&view, &loaded.record, &p);
            match next {
                Next::Load => {
                    loaded = self.load(run, shutdown).await?;
                    p.read = true;
                }
                Next::Enter(step) => {
                    // What the result reports as old and new is known before
                    // the first step starts, so a deadline failure has it too.
                    let rec = &loaded.record;
                    match (task.action, step) {
                        (TaskAction::Rotate, Step::Staged) => {
                            run.old_fp = rec.current.as_ref().map(|c| c.fingerprint.clone());
                        }
                        (TaskAction::Rollback, Step::Set) => {
                            run.new_fp = rec.previous.as_ref().map(|v| v.fingerprint.clone());
                            run.old_fp = rec.current.as_ref().map(|v| v.fingerprint.clone());
                        }
                        _ => {}
                    }
                    self.enter(run, step).await?;
                    t0 = Instant::now();
                    p.enter(step);
                }
                Next::Complete(step) => {
                    self.done(run, step, t0)?;
                    p.complete(step);
                }
                Next::Stage(how) => {
                    if how == Staging::Generate {
                        let v = self.store.version(
                            generate(&ep.policy()),
                            Some(task.task_id.clone()),
                            Some(task.strategy),
                        );
                        loaded.record.pending = Some(v);
                        loaded.revision = self.save(run, shutdown, &loaded).await?;
                    } else {
                        debug!(task = %task.task_id, "Reusing the secret staged by an earlier delivery");
                    }
                    run.new_fp = Some(slot(&loaded, Slot::Pending)?.fingerprint.clone());
                    p.step_staged = true;
                }
                Next::Probe(s) => {
                    let v = slot(&loaded, s)?;
                    p.login = self.placement(run, shutdown, ep, &v.secret).await?;
                    p.step_probed = true;
                    if p.login.is_some()
                        && task.action == TaskAction::Rotate
                        && p.open == Some(Step::Set)
                    {
                        info!(task = %task.task_id, credential = %task.credential_id, "Staged secret already authenticates; set happened before, skipping");
                    }
                }
                Next::ReadBack(s) => {
                    let r = self
                        .check(run, shutdown, ep, &slot(&loaded, s)?.secret)
                        .await?;
                    match s {
                        Slot::Previous => p.step_previous = Some(r),
                        Slot::Current | Slot::Pending => p.step_current = Some(r),
                    }
                    if p.step_previous == Some(AuthCheck::Accepted)
                        && p.step_current == Some(AuthCheck::Rejected)
                    {
                        info!(task = %task.task_id, credential = %task.credential_id, "Previous secret already restored at the target; skipping the set");
                    }
                }
                Next::ProveRejected(s) => {
                    let r = self
                        .check(run, shutdown, ep, &slot(&loaded, s)?.secret)
                        .await?;
                    run.old_rejected = Some(r == AuthCheck::Rejected);
                    p.step_proof = Some(r);
                }
                Next::Canary => {
                    let wrong = generate(&ep.policy());
                    let r = self.check(run, shutdown, ep, &wrong).await?;
                    if r == AuthCheck::Accepted {
                        warn!(task = %task.task_id, credential = %task.credential_id, "The target accepts a random wrong secret for this login; refusing to rotate or prove anything");
                    }
                    p.canary = Some(r);
                    run.canary = Some(r);
                }
                Next::Target(op, s) => {
                    let v = slot(&loaded, s)?;
                    self.target_op(run, shutdown, ep, op, &v.secret).await?;
                    p.step_changed = true;
                }
                Next::Promote => {
                    let fps = (run.new_fp.clone(), run.old_fp.clone());
                    machine::promote(&mut loaded.record, &view, p.login.clone(), fps, now_ms())
                        .ok_or(Fail::Internal("nothing staged to promote"))?;
                    loaded.revision = self.save(run, shutdown, &loaded).await?;
                    run.new_is_current = true;
                }
                Next::Restore => {
                    let fps = (run.new_fp.clone(), run.old_fp.clone());
                    machine::restore(&mut loaded.record, &view, p.login.clone(), fps, now_ms())
                        .ok_or(Fail::Internal("nothing to restore"))?;
                    loaded.revision = self.save(run, shutdown, &loaded).await?;
                    run.new_is_current = true;
                }
                Next::Announce => {
                    if let Some(cur) = &loaded.record.current {
                        self.announce(task, cur, loaded.record.previous.as_ref())
                            .await;
                    }
                    p.announced = true;
                }
                Next::VerifyConsumers { required } => {
                    let fp = slot(&loaded, Slot::Current)?.fingerprint.clone();
                    self.verify_consumers(run, &fp, shutdown, required).await?;
                    p.consumers_verified = true;
                }
                Next::Resume => {
                    self.reported(run, &loaded)?;
                    run.step = Step::Promoted;
                    p.done = Step::Promoted;
                    info!(task = %task.task_id, credential = %task.credential_id, "Resuming after promote");
                }
                Next::Report(outcome) => {
                    run.step = self.reported(run, &loaded)?;
                    if task.action == TaskAction::Rotate {
                        info!(task = %task.task_id, credential = %task.credential_id, "Task was applied earlier and superseded; reporting it again");
                    }
                    return Ok(outcome);
                }
                Next::Finish(outcome) => return Ok(outcome),
                Next::Fail(refusal) => return Err(refusal.into()),
            }
        }
        Err(Fail::Internal("the protocol did not converge"))
    }

    /// Fills the result from the record of this task's earlier application;
    /// returns the step that application recorded.
    fn reported(&self, run: &mut Run<'_>, loaded: &Loaded) -> Result<Step, Fail> {
        let applied = loaded
            .record
            .applied(&run.task.task_id)
            .ok_or(Fail::Internal("task not applied"))?;
        run.new_fp = applied.new_fingerprint.clone();
        run.new_is_current = true;
        run.old_fp = applied.old_fingerprint.clone();
        Ok(applied.step)
    }

    /// Waits until the task's consumers use `new` (see [`crate::consumers`]),
    /// records the outcomes in the run, and with `required` fails with
    /// [`ErrorClass::ConsumerNotVerified`] naming those that did not.
    async fn verify_consumers(
        &self,
        run: &mut Run<'_>,
        new_fingerprint: &str,
        shutdown: &CancellationToken,
        required: bool,
    ) -> Result<(), Fail> {
        let checks = &run.task.consumers;
        if checks.is_empty() {
            return Ok(());
        }
        let outcomes = match &self.consumers {
            Some(v) => v
                .verify(
                    &run.task.credential_id,
                    new_fingerprint,
                    checks,
                    run.deadline,
                    shutdown,
                )
                .await
                .map_err(|_| Fail::Interrupted)?,
            None => checks
                .iter()
                .map(|c| {
                    let checked = c.verify != VerifyKind::None;
                    ConsumerOutcome {
                        id: c.id.clone(),
                        verify: c.verify,
                        status: if checked {
                            ConsumerStatus::Failed
                        } else {
                            ConsumerStatus::Unverified
                        },
                        detail: checked.then(|| "this worker cannot verify consumers".into()),
                        verified_at_ms: None,
                        after_ms: None,
                    }
                })
                .collect(),
        };
        let failed: Vec<String> = outcomes
            .iter()
            .filter(|o| o.status == ConsumerStatus::Failed)
            .map(|o| format!("{} ({})", o.id, o.detail.as_deref().unwrap_or("failed")))
            .collect();
        run.consumers = outcomes;
        if !failed.is_empty() {
            if required {
                return Err(Fail::ConsumerNotVerified(failed.join(", ")));
            }
            warn!(
                task = %run.task.task_id,
                credential = %run.task.credential_id,
                consumers = %failed.join(", "),
                "Consumers not verified after a containment rotation"
            );
        }
        Ok(())
    }

    /// Announces `current` as the credential's CURRENT secret, when a
    /// detection key is configured. Advisory: never fails the task.
    async fn announce(&self, task: &RotationTask, current: &Version, previous: Option<&Version>) {
        if let Some(n) = &self.notifier {
            n.announce(
                &task.credential_id,
                &current.secret,
                previous.map(|p| &p.secret),
            )
            .await;
        }
    }

    fn result(&self, run: &Run<'_>, outcome: Outcome, fail: Option<&Fail>) -> RotationResult {
        let t = run.task;
        let (error_class, error) = match (fail, outcome) {
            (Some(f), _) => (Some(f.class()), Some(short(f.to_string()))),
            (None, Outcome::RollbackRefused) => (
                Some(ErrorClass::RollbackRefused),
                Some("containment rotations are never rolled back to the exposed secret".into()),
            ),
            (None, _) => (None, None),
        };
        RotationResult {
            v: SCHEMA_VERSION,
            task_id: t.task_id.clone(),
            campaign_id: t.campaign_id.clone(),
            wave: t.wave,
            index: t.index,
            action: t.action,
            credential_id: t.credential_id.clone(),
            region: t.region.clone(),
            outcome,
            step: run.step,
            error_class,
            error,
            timings: run.timings.clone(),
            new_fingerprint: if run.new_is_current {
                run.new_fp.clone()
            } else {
                None
            },
            old_fingerprint: run.old_fp.clone(),
            old_rejected: run.old_rejected,
            consumers: result_consumers(run),
            worker_id: self.worker_id.clone(),
            finished_at_ms: now_ms(),
        }
    }
}

/// The consumers of a result: the outcomes of the verification when it ran,
/// else every consumer of the task `unverified` (not reached).
fn result_consumers(run: &Run<'_>) -> Vec<ConsumerOutcome> {
    if !run.consumers.is_empty() || run.task.action != TaskAction::Rotate {
        return run.consumers.clone();
    }
    run.task
        .consumers
        .iter()
        .map(|c| ConsumerOutcome {
            id: c.id.clone(),
            verify: c.verify,
            status: ConsumerStatus::Unverified,
            detail: None,
            verified_at_ms: None,
            after_ms: None,
        })
        .collect()
}

fn op_name(op: TargetOp) -> &'static str {
    match op {
        TargetOp::Add => "add",
        TargetOp::Replace => "replace",
        TargetOp::Remove => "remove",
    }
}

/// The version in `slot` of the record; the machine only names filled slots.
fn slot(loaded: &Loaded, slot: Slot) -> Result<&Version, Fail> {
    let r = &loaded.record;
    match slot {
        Slot::Pending => r.pending.as_ref(),
        Slot::Current => r.current.as_ref(),
        Slot::Previous => r.previous.as_ref(),
    }
    .ok_or(Fail::Internal(
        "a step needs a secret the record does not hold",
    ))
}

fn short(mut s: String) -> String {
    if s.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::CrashMode;
    use crate::notice::Notifier;
    use crate::store::SecretStore;
    use crate::targets::sim::{SimOptions, SimTarget};
    use crate::targets::Target;
    use crate::testutil::TestBucket;
    use async_trait::async_trait;
    use keywave_common::crypto::RegionKey;
    use keywave_common::crypto::SecretPolicy;
    use keywave_common::detect::{self, DetectKey, RotatedNotice};
    use keywave_common::wire::Strategy;
    use keywave_common::{subjects, topology};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fixture {
        bucket: TestBucket,
        sim: Arc<SimTarget>,
        targets: Arc<Targets>,
        shutdown: CancellationToken,
    }

    impl Fixture {
        async fn new() -> Self {
            let sim = SimTarget::new(SimOptions::default());
            let mut t = Targets::new();
            t.insert("sim", sim.clone(), 8);
            Fixture {
                bucket: TestBucket::new().await,
                sim,
                targets: Arc::new(t),
                shutdown: CancellationToken::new(),
            }
        }

        fn protocol(&self, faults: Faults) -> Protocol {
            Protocol::new(
                self.bucket.store.clone(),
                self.targets.clone(),
                "w-test",
                faults,
            )
            .with_retry(RetryPolicy {
                attempts: 4,
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
            })
        }

        fn task(&self, action: TaskAction, strategy: Strategy, cred: &str) -> RotationTask {
            RotationTask {
                v: SCHEMA_VERSION,
                task_id: RotationTask::make_id("camp", 0, action, cred),
                campaign_id: "camp".into(),
                wave: 0,
                index: 0,
                action,
                strategy,
                credential_id: cred.into(),
                region: self.bucket.region.clone(),
                endpoint: "sim".into(),
                kind: TargetKind::Sim,
                principal: format!("user-{cred}"),
                issued_at_ms: now_ms(),
                deadline_ms: now_ms() + 60_000,
                run_timeout_ms: 0,
                consumers: Vec::new(),
            }
        }

        /// Seeds today's secret at the sim and enrolls it.
        async fn enrolled(&self, cred: &str) -> Secret {
            let s = generate(&SecretPolicy::default());
            self.sim.seed(&format!("user-{cred}"), &s);
            self.bucket.store.enroll(cred, s.clone()).await.unwrap();
            s
        }

        async fn run(&self, p: &Protocol, task: &RotationTask) -> Flow {
            p.execute(task, &self.shutdown).await
        }
    }

    fn finished(f: Flow) -> RotationResult {
        match f {
            Flow::Finished(r) => *r,
            other => panic!("expected a finished task, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn continuity_rotation_runs_every_step() {
        let fx = Fixture::new().await;
        let old = fx.enrolled("c1").await;
        let task = fx.task(TaskAction::Rotate, Strategy::Continuity, "c1");
        let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.step, Step::Verified);
        assert_eq!(r.error_class, None);
        assert_eq!(r.old_rejected, Some(true));
        assert_eq!(
            r.timings.iter().map(|t| t.step).collect::<Vec<_>>(),
            vec![
                Step::Staged,
                Step::Set,
                Step::Tested,
                Step::Promoted,
                Step::Revoked,
                Step::Verified
            ]
        );
        let rec = fx.bucket.store.get("c1").await.unwrap().unwrap();
        let cur = rec.current.clone().unwrap();
        assert_eq!(rec.previous.as_ref().unwrap().secret, old);
        assert!(rec.pending.is_none());
        assert_eq!(rec.last_task.as_deref(), Some(task.task_id.as_str()));
        assert_eq!(r.new_fingerprint.as_deref(), Some(cur.fingerprint.as_str()));
        assert_eq!(r.old_fingerprint, Some(fx.bucket.store.fingerprint(&old)));
        let principal = "user-c1";
        assert!(fx.sim.accepts(principal, &cur.secret));
        assert!(!fx.sim.accepts(principal, &old));
        assert_eq!(fx.sim.set_count(principal), 1);

        // A redelivery of the finished task changes nothing and reports the same.
        let again = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(again.outcome, Outcome::Succeeded);
        assert_eq!(again.new_fingerprint, r.new_fingerprint);
        assert_eq!(fx.sim.set_count(principal), 1);
        let rec2 = fx.bucket.store.get("c1").await.unwrap().unwrap();
        assert_eq!(rec2.current, rec.current);
    }

    #[tokio::test]
    async fn containment_rotation_invalidates_old_at_set() {
        let fx = Fixture::new().await;
        let old = fx.enrolled("c2").await;
        let task = fx.task(TaskAction::Rotate, Strategy::Containment, "c2");
        let p = fx.protocol(Faults::crash_after(Step::Set, CrashMode::StopWithoutAck));
        assert_eq!(
            fx.run(&p, &task).await,
            Flow::Crashed(Point::After(Step::Set))
        );
        // Right after Set the old secret is already dead.
        assert!(!fx.sim.accepts("user-c2", &old));
        assert_eq!(fx.sim.valid_count("user-c2"), 1);

        let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.old_rejected, Some(true));
        assert_eq!(fx.sim.set_count("user-c2"), 1);
        let rec = fx.bucket.store.get("c2").await.unwrap().unwrap();
        assert_eq!(
            rec.current.as_ref().unwrap().strategy,
            Some(Strategy::Containment)
        );
    }

    #[tokio::test]
    async fn crash_between_set_and_promote_reuses_the_staged_secret() {
        let fx = Fixture::new().await;
        let old = fx.enrolled("c3").await;
        let task = fx.task(TaskAction::Rotate, Strategy::Continuity, "c3");
        let crashing = fx.protocol(Faults::crash_after(Step::Set, CrashMode::StopWithoutAck));
        assert_eq!(
            fx.run(&crashing, &task).await,
            Flow::Crashed(Point::After(Step::Set))
        );
        let staged = fx
            .bucket
            .store
            .get("c3")
            .await
            .unwrap()
            .unwrap()
            .pending
            .expect("staged secret recorded as PENDING");
        assert_eq!(staged.task_id.as_deref(), Some(task.task_id.as_str()));
        // Continuity: both valid while the task is stopped.
        assert!(fx.sim.accepts("user-c3", &old));
        assert!(fx.sim.accepts("user-c3", &staged.secret));
        assert_eq!(fx.sim.set_count("user-c3"), 1);

        let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(fx.sim.set_count("user-c3"), 1, "rotated exactly once");
        let rec = fx.bucket.store.get("c3").await.unwrap().unwrap();
        assert_eq!(rec.current.unwrap().secret, staged.secret);
        assert!(!fx.sim.accepts("user-c3", &old));
    }

    #[tokio::test]
    async fn crash_after_promote_resumes_with_revoke_and_verify() {
        let fx = Fixture::new().await;
        let old = fx.enrolled("c4").await;
        let task = fx.task(TaskAction::Rotate, Strategy::Continuity, "c4");
        let crashing = fx.protocol(Faults::crash_after(
            Step::Promoted,
            CrashMode::StopWithoutAck,
        ));
        assert_eq!(
            fx.run(&crashing, &task).await,
            Flow::Crashed(Point::After(Step::Promoted))
        );
        assert!(fx.sim.accepts("user-c4", &old), "not yet revoked");

        let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.step, Step::Verified);
        assert_eq!(r.old_rejected, Some(true));
        assert!(!fx.sim.accepts("user-c4", &old));
        assert_eq!(fx.sim.set_count("user-c4"), 1);
    }

    #[tokio::test]
    async fn unenrolled_continuity_revokes_everything_else() {
        let fx = Fixture::new().await;
        let unknown = generate(&SecretPolicy::default());
        fx.sim.seed("user-c5", &unknown);
        let task = fx.task(TaskAction::Rotate, Strategy::Continuity, "c5");
        let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert_eq!(r.old_rejected, None);
        assert_eq!(r.old_fingerprint, None);
        assert!(!fx.sim.accepts("user-c5", &unknown));
        assert_eq!(fx.sim.valid_count("user-c5"), 1);
    }

    #[tokio::test]
    async fn rollback_restores_previous_and_is_idempotent() {
        let fx = Fixture::new().await;
        let old = fx.enrolled("c6").await;
        let p = fx.protocol(Faults::none());
        let rot = fx.task(TaskAction::Rotate, Strategy::Continuity, "c6");
        let rotated = finished(fx.run(&p, &rot).await);
        assert_eq!(rotated.outcome, Outcome::Succeeded);
        let new = fx
            .bucket
            .store
            .get("c6")
            .await
            .unwrap()
            .unwrap()
            .current
            .unwrap();

        let rb = fx.task(TaskAction::Rollback, Strategy::Continuity, "c6");
        let r = finished(fx.run(&p, &rb).await);
        assert_eq!(r.outcome, Outcome::RolledBack, "{r:?}");
        assert_eq!(r.step, Step::Restored);
        assert_eq!(r.old_rejected, Some(true));
        assert_eq!(r.new_fingerprint, rotated.old_fingerprint);
        assert!(fx.sim.accepts("user-c6", &old));
        assert!(!fx.sim.accepts("user-c6", &new.secret));
        let rec = fx.bucket.store.get("c6").await.unwrap().unwrap();
        assert_eq!(rec.current.as_ref().unwrap().secret, old);
        assert_eq!(rec.previous.as_ref().unwrap().secret, new.secret);
        let sets = fx.sim.set_count("user-c6");

        // Redelivered rollback: nothing happens at the target.
        let again = finished(fx.run(&p, &rb).await);
        assert_eq!(again.outcome, Outcome::RolledBack);
        assert_eq!(fx.sim.set_count("user-c6"), sets);

        // A late redelivery of the rotation must not undo the rollback.
        let late = finished(fx.run(&p, &rot).await);
        assert_eq!(late.outcome, Outcome::Succeeded);
        assert!(fx.sim.accepts("user-c6", &old));
        assert_eq!(fx.sim.set_count("user-c6"), sets);
    }

    #[tokio::test]
    async fn containment_rollback_is_refused_and_no_previous_fails() {
        let fx = Fixture::new().await;
        fx.enrolled("c7").await;
        let p = fx.protocol(Faults::none());
        let rot = fx.task(TaskAction::Rotate, Strategy::Containment, "c7");
        assert_eq!(finished(fx.run(&p, &rot).await).outcome, Outcome::Succeeded);
        let cur = fx.bucket.store.get("c7").await.unwrap().unwrap().current;

        // Even a rollback task that claims continuity is refused: CURRENT came
        // from a containment rotation.
        for strategy in [Strategy::Containment, Strategy::Continuity] {
            let r = finished(
                fx.run(&p, &fx.task(TaskAction::Rollback, strategy, "c7"))
                    .await,
            );
            assert_eq!(r.outcome, Outcome::RollbackRefused);
            assert_eq!(r.error_class, Some(ErrorClass::RollbackRefused));
        }
        assert_eq!(
            fx.bucket.store.get("c7").await.unwrap().unwrap().current,
            cur
        );

        fx.enrolled("c8").await;
        let r = finished(
            fx.run(
                &p,
                &fx.task(TaskAction::Rollback, Strategy::Continuity, "c8"),
            )
            .await,
        );
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.error_class, Some(ErrorClass::NoPrevious));
    }

    #[tokio::test]
    async fn unknown_endpoint_kind_mismatch_and_deadline() {
        let fx = Fixture::new().await;
        let p = fx.protocol(Faults::none());
        let mut t = fx.task(TaskAction::Rotate, Strategy::Continuity, "c9");
        t.endpoint = "nope".into();
        let r = finished(fx.run(&p, &t).await);
        assert_eq!(r.error_class, Some(ErrorClass::UnknownEndpoint));
        assert_eq!(r.step, Step::Received);

        let mut t = fx.task(TaskAction::Rotate, Strategy::Continuity, "c9");
        t.kind = TargetKind::Redis;
        let r = finished(fx.run(&p, &t).await);
        assert_eq!(r.error_class, Some(ErrorClass::KindMismatch));

        let mut t = fx.task(TaskAction::Rotate, Strategy::Continuity, "c9");
        t.deadline_ms = now_ms() - 1;
        let r = finished(fx.run(&p, &t).await);
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.error_class, Some(ErrorClass::DeadlineExceeded));
        assert_eq!(fx.sim.set_count("user-c9"), 0);
        assert!(fx.bucket.store.get("c9").await.unwrap().is_none());
    }

    /// A task with a run timeout counts it from its receipt: one that waited
    /// in the queue longer than its timeout still rotates, while one that
    /// arrives after its start deadline is refused untouched.
    #[tokio::test]
    async fn run_timeout_counts_from_receipt_and_start_deadline_refuses() {
        let fx = Fixture::new().await;
        let p = fx.protocol(Faults::none());
        fx.enrolled("q1").await;
        let mut t = fx.task(TaskAction::Rotate, Strategy::Continuity, "q1");
        t.issued_at_ms = now_ms() - 120_000;
        t.deadline_ms = now_ms() + 60_000;
        t.run_timeout_ms = 30_000;
        let r = finished(fx.run(&p, &t).await);
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");

        fx.enrolled("q2").await;
        let mut t = fx.task(TaskAction::Rotate, Strategy::Continuity, "q2");
        t.deadline_ms = now_ms() - 1;
        t.run_timeout_ms = 30_000;
        let r = finished(fx.run(&p, &t).await);
        assert_eq!(r.error_class, Some(ErrorClass::DeadlineExceeded));
        assert_eq!(r.step, Step::Received);
        assert_eq!(fx.sim.set_count("user-q2"), 0);
    }

    /// Every fault point of both protocols, each on its own credential: the
    /// first delivery crashes there, a fresh worker (no faults) runs the
    /// redelivery, and the credential ends consistent, set once by the task.
    #[tokio::test]
    async fn a_crash_before_or_after_any_step_is_recovered_consistently() {
        let fx = Fixture::new().await;
        let rotation_steps = [
            Step::Staged,
            Step::Set,
            Step::Tested,
            Step::Promoted,
            Step::Revoked,
            Step::Verified,
        ];
        let mut n = 0;
        for strategy in [Strategy::Continuity, Strategy::Containment] {
            for step in rotation_steps {
                for point in [Point::Before(step), Point::After(step)] {
                    n += 1;
                    let cred = format!("rot{n}");
                    let principal = format!("user-{cred}");
                    let old = fx.enrolled(&cred).await;
                    let task = fx.task(TaskAction::Rotate, strategy, &cred);
                    let crashing = fx.protocol(Faults::crash_at(point, CrashMode::StopWithoutAck));
                    assert_eq!(fx.run(&crashing, &task).await, Flow::Crashed(point));
                    let r = finished(fx.run(&fx.protocol(Faults::none()), &task).await);
                    let at = format!("{strategy} crash {point}");
                    assert_eq!(r.outcome, Outcome::Succeeded, "{at}: {r:?}");
                    assert_eq!(r.old_rejected, Some(true), "{at}");
                    let rec = fx.bucket.store.get(&cred).await.unwrap().unwrap();
                    let cur = rec.current.expect("current");
                    assert!(rec.pending.is_none(), "{at}");
                    assert_eq!(rec.previous.expect("previous").secret, old, "{at}");
                    assert_eq!(r.new_fingerprint.as_deref(), Some(cur.fingerprint.as_str()));
                    assert!(fx.sim.accepts(&principal, &cur.secret), "{at}");
                    assert!(!fx.sim.accepts(&principal, &old), "{at}");
                    assert_eq!(fx.sim.valid_count(&principal), 1, "{at}");
                    assert_eq!(fx.sim.set_count(&principal), 1, "{at}: set once");
                }
            }
        }
        for step in [Step::Set, Step::Tested, Step::Restored] {
            for point in [Point::Before(step), Point::After(step)] {
                n += 1;
                let cred = format!("rb{n}");
                let principal = format!("user-{cred}");
                let old = fx.enrolled(&cred).await;
                let p = fx.protocol(Faults::none());
                let rot = fx.task(TaskAction::Rotate, Strategy::Continuity, &cred);
                assert_eq!(finished(fx.run(&p, &rot).await).outcome, Outcome::Succeeded);
                let rotated = fx
                    .bucket
                    .store
                    .get(&cred)
                    .await
                    .unwrap()
                    .unwrap()
                    .current
                    .unwrap();
                let rb = fx.task(TaskAction::Rollback, Strategy::Continuity, &cred);
                let crashing = fx.protocol(Faults::crash_at(point, CrashMode::StopWithoutAck));
                assert_eq!(fx.run(&crashing, &rb).await, Flow::Crashed(point));
                let r = finished(fx.run(&p, &rb).await);
                let at = format!("rollback crash {point}");
                assert_eq!(r.outcome, Outcome::RolledBack, "{at}: {r:?}");
                let rec = fx.bucket.store.get(&cred).await.unwrap().unwrap();
                assert_eq!(rec.current.unwrap().secret, old, "{at}");
                assert_eq!(rec.previous.unwrap().secret, rotated.secret, "{at}");
                assert!(fx.sim.accepts(&principal, &old), "{at}");
                assert!(!fx.sim.accepts(&principal, &rotated.secret), "{at}");
                assert_eq!(
                    fx.sim.set_count(&principal),
                    2,
                    "{at}: one rotation, one restore"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_unavailable_store_hands_the_task_back_within_the_deadline() {
        let fx = Fixture::new().await;
        // A handle whose requests time out quickly, on a bucket whose stream
        // is then deleted: every store operation fails as it does while a
        // cluster elects a new stream leader.
        let quick = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(200))
            .build(fx.bucket.server.client().await);
        let bucket = topology::kv_secrets(&fx.bucket.region);
        let kv = quick.get_key_value(&bucket).await.unwrap();
        let store = SecretStore::from_kv(kv, &fx.bucket.region, RegionKey::generate());
        fx.bucket
            .js
            .delete_stream(format!("KV_{bucket}"))
            .await
            .unwrap();
        let task = fx.task(TaskAction::Rotate, Strategy::Continuity, "gone");
        let p = Protocol::new(store, fx.targets.clone(), "w-test", Faults::none()).with_retry(
            RetryPolicy {
                attempts: 2,
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
            },
        );
        assert_eq!(
            fx.run(&p, &task).await,
            Flow::Retry {
                delay: STORE_REQUEUE_DELAY
            }
        );
        // Past the deadline it is a failure the wave counts.
        let mut late = task.clone();
        late.deadline_ms = now_ms() + 500;
        let r = finished(fx.run(&p, &late).await);
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.error_class, Some(ErrorClass::Store));
        assert_eq!(fx.sim.set_count("user-gone"), 0);
    }

    /// The rotation notice last published for `cred`, if any.
    async fn last_notice(fx: &Fixture, cred: &str) -> Option<RotatedNotice> {
        let stream = fx.bucket.js.get_stream(detect::STREAM_ROTATED).await.ok()?;
        let m = stream
            .get_last_raw_message_by_subject(&subjects::rotated(&fx.bucket.region, cred))
            .await
            .ok()?;
        Some(serde_json::from_slice(&m.payload).expect("a rotation notice"))
    }

    #[tokio::test]
    async fn with_a_detect_key_promote_and_restore_announce_keyed_fingerprints() {
        let fx = Fixture::new().await;
        topology::detection_streams(&fx.bucket.js, &topology::Config::default())
            .await
            .unwrap();
        let key = DetectKey::generate();
        let notifier = Notifier::new(fx.bucket.js.clone(), key.clone(), &fx.bucket.region);
        let p = fx.protocol(Faults::none()).with_notifier(notifier);
        let old = fx.enrolled("n1").await;

        let rot = fx.task(TaskAction::Rotate, Strategy::Continuity, "n1");
        assert_eq!(finished(fx.run(&p, &rot).await).outcome, Outcome::Succeeded);
        let rec = fx.bucket.store.get("n1").await.unwrap().unwrap();
        let new = rec.current.unwrap().secret;
        let n = last_notice(&fx, "n1")
            .await
            .expect("a notice after promote");
        assert_eq!(n.detect_fp, key.fingerprint_secret(&new));
        assert_eq!(n.previous_detect_fp, Some(key.fingerprint_secret(&old)));
        assert_eq!(
            (n.credential_id.as_str(), n.region.as_str()),
            ("n1", fx.bucket.region.as_str())
        );

        // A rollback announces the restored secret as CURRENT.
        let rb = fx.task(TaskAction::Rollback, Strategy::Continuity, "n1");
        assert_eq!(finished(fx.run(&p, &rb).await).outcome, Outcome::RolledBack);
        let n = last_notice(&fx, "n1").await.unwrap();
        assert_eq!(n.detect_fp, key.fingerprint_secret(&old));
        assert_eq!(n.previous_detect_fp, Some(key.fingerprint_secret(&new)));

        // Fingerprints only: no secret on the wire.
        let stream = fx
            .bucket
            .js
            .get_stream(detect::STREAM_ROTATED)
            .await
            .unwrap();
        let raw = stream
            .get_last_raw_message_by_subject(&subjects::rotated(&fx.bucket.region, "n1"))
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&raw.payload);
        assert!(!text.contains(old.expose()) && !text.contains(new.expose()));
    }

    #[tokio::test]
    async fn without_a_detect_key_nothing_is_announced() {
        let fx = Fixture::new().await;
        topology::detection_streams(&fx.bucket.js, &topology::Config::default())
            .await
            .unwrap();
        fx.enrolled("n2").await;
        let p = fx.protocol(Faults::none());
        let rot = fx.task(TaskAction::Rotate, Strategy::Continuity, "n2");
        assert_eq!(finished(fx.run(&p, &rot).await).outcome, Outcome::Succeeded);
        let mut stream = fx
            .bucket
            .js
            .get_stream(detect::STREAM_ROTATED)
            .await
            .unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 0);
    }

    #[tokio::test]
    async fn a_notice_that_cannot_be_published_does_not_fail_the_rotation() {
        // No rotation-notice stream: every publish is refused.
        let fx = Fixture::new().await;
        let key = DetectKey::generate();
        let notifier = Notifier::new(fx.bucket.js.clone(), key, &fx.bucket.region);
        let p = fx.protocol(Faults::none()).with_notifier(notifier);
        let old = fx.enrolled("n3").await;
        let rot = fx.task(TaskAction::Rotate, Strategy::Continuity, "n3");
        let r = finished(fx.run(&p, &rot).await);
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.step, Step::Verified);
        assert!(!fx.sim.accepts("user-n3", &old));
    }

    /// A target that is unavailable for the first `failures` operations.
    struct Flaky {
        inner: Arc<SimTarget>,
        failures: AtomicUsize,
    }

    impl Flaky {
        fn trip(&self) -> Result<(), TargetError> {
            let left = self.failures.load(Ordering::SeqCst);
            if left > 0 {
                self.failures.store(left - 1, Ordering::SeqCst);
                return Err(TargetError::Unavailable("connection refused".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Target for Flaky {
        fn kind(&self) -> TargetKind {
            TargetKind::Sim
        }
        fn policy(&self) -> SecretPolicy {
            SecretPolicy::default()
        }
        async fn add(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
            self.trip()?;
            self.inner.add(p, s).await
        }
        async fn replace(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
            self.trip()?;
            self.inner.replace(p, s).await
        }
        async fn remove(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
            self.trip()?;
            self.inner.remove(p, s).await
        }
        async fn check(&self, p: &str, s: &Secret) -> Result<AuthCheck, TargetError> {
            self.trip()?;
            self.inner.check(p, s).await
        }
    }

    #[tokio::test]
    async fn transient_failures_are_retried_then_reported() {
        let bucket = TestBucket::new().await;
        let sim = SimTarget::new(SimOptions::default());
        let flaky = Arc::new(Flaky {
            inner: sim.clone(),
            failures: AtomicUsize::new(2),
        });
        let mut targets = Targets::new();
        targets.insert("sim", flaky.clone(), 4);
        let p = Protocol::new(bucket.store.clone(), Arc::new(targets), "w", Faults::none())
            .with_retry(RetryPolicy {
                attempts: 3,
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(5),
            });
        let fx_task = |cred: &str| RotationTask {
            v: SCHEMA_VERSION,
            task_id: format!("t-{cred}"),
            campaign_id: "camp".into(),
            wave: 0,
            index: 0,
            action: TaskAction::Rotate,
            strategy: Strategy::Continuity,
            credential_id: cred.into(),
            region: bucket.region.clone(),
            endpoint: "sim".into(),
            kind: TargetKind::Sim,
            principal: "app".into(),
            issued_at_ms: 0,
            deadline_ms: 0,
            run_timeout_ms: 0,
            consumers: Vec::new(),
        };
        let shutdown = CancellationToken::new();
        let r = finished(p.execute(&fx_task("a"), &shutdown).await);
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");

        // More failures than attempts: a TargetUnavailable result.
        flaky.failures.store(100, Ordering::SeqCst);
        let r = finished(p.execute(&fx_task("b"), &shutdown).await);
        assert_eq!(r.outcome, Outcome::Failed);
        assert_eq!(r.error_class, Some(ErrorClass::TargetUnavailable));
        // It failed asking the target to refuse a wrong secret, before
        // anything was staged.
        assert_eq!(r.step, Step::Received);

        // Shutdown during a backoff wait hands the task back.
        let slow = p.clone().with_retry(RetryPolicy {
            attempts: 10,
            min_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(30),
        });
        shutdown.cancel();
        assert_eq!(
            slow.execute(&fx_task("c"), &shutdown).await,
            Flow::Interrupted
        );
    }
}
