//! Executor tests on the in-memory store and the simulated target, with
//! injected crashes: every redelivery path without a nats-server.

use super::*;
use crate::fault::CrashMode;
use crate::store::memory::MemoryStore;
use crate::targets::sim::{SimOptions, SimTarget};
use crate::targets::Target;
use async_trait::async_trait;
use keywave_common::crypto::{RegionKey, SecretPolicy};
use keywave_common::wire::{ConsumerCheck, Strategy};
use std::sync::Mutex;

/// Wraps the simulation to remember every secret made valid by add or
/// replace, so a test can tell "set twice" from "set two secrets".
struct Recording {
    sim: Arc<SimTarget>,
    set: Mutex<Vec<Secret>>,
}

impl Recording {
    /// How many different secrets were ever set.
    fn distinct_sets(&self) -> usize {
        let mut distinct: Vec<Secret> = Vec::new();
        for s in self.set.lock().unwrap().iter() {
            if !distinct.contains(s) {
                distinct.push(s.clone());
            }
        }
        distinct.len()
    }
}

#[async_trait]
impl Target for Recording {
    fn kind(&self) -> TargetKind {
        TargetKind::Sim
    }
    fn policy(&self) -> SecretPolicy {
        SecretPolicy::default()
    }
    async fn add(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
        self.set.lock().unwrap().push(s.clone());
        self.sim.add(p, s).await
    }
    async fn replace(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
        self.set.lock().unwrap().push(s.clone());
        self.sim.replace(p, s).await
    }
    async fn remove(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
        self.sim.remove(p, s).await
    }
    async fn check(&self, p: &str, s: &Secret) -> Result<AuthCheck, TargetError> {
        self.sim.check(p, s).await
    }
}

struct Fx {
    store: MemoryStore,
    sim: Arc<SimTarget>,
    target: Arc<Recording>,
    targets: Arc<Targets>,
    shutdown: CancellationToken,
}

impl Fx {
    fn new() -> Self {
        Self::with(SimOptions::default())
    }

    fn with(opts: SimOptions) -> Self {
        let sim = SimTarget::new(opts);
        let target = Arc::new(Recording {
            sim: sim.clone(),
            set: Mutex::new(Vec::new()),
        });
        let mut t = Targets::new();
        t.insert("sim", target.clone(), 8);
        Fx {
            store: MemoryStore::new("mem", RegionKey::generate()),
            sim,
            target,
            targets: Arc::new(t),
            shutdown: CancellationToken::new(),
        }
    }

    fn protocol(&self, faults: Faults) -> Protocol {
        Protocol::new(self.store.clone(), self.targets.clone(), "w-mem", faults).with_retry(
            RetryPolicy {
                attempts: 3,
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
            },
        )
    }

    fn task(&self, action: TaskAction, strategy: Strategy) -> RotationTask {
        RotationTask {
            v: SCHEMA_VERSION,
            task_id: RotationTask::make_id("camp", 0, action, "c1"),
            campaign_id: "camp".into(),
            wave: 0,
            index: 0,
            action,
            strategy,
            credential_id: "c1".into(),
            region: "mem".into(),
            endpoint: "sim".into(),
            kind: TargetKind::Sim,
            principal: "app".into(),
            issued_at_ms: now_ms(),
            deadline_ms: now_ms() + 600_000,
            run_timeout_ms: 0,
            consumers: Vec::new(),
        }
    }

    async fn enrolled(&self) -> Secret {
        let s = generate(&SecretPolicy::default());
        self.sim.seed("app", &s);
        self.store.enroll("c1", s.clone()).await.unwrap();
        s
    }

    async fn record(&self) -> crate::store::Record {
        self.store.get("c1").await.unwrap().expect("a record")
    }

    async fn run(&self, faults: Faults, task: &RotationTask) -> Flow {
        self.protocol(faults).execute(task, &self.shutdown).await
    }

    async fn finish(&self, task: &RotationTask) -> RotationResult {
        match self.run(Faults::none(), task).await {
            Flow::Finished(r) => *r,
            other => panic!("expected a finished task, got {other:?}"),
        }
    }

    /// Crashes a first delivery of `task` at `point`, as a killed worker.
    async fn crash(&self, task: &RotationTask, point: Point) {
        let faults = Faults::crash_at(point, CrashMode::StopWithoutAck);
        assert_eq!(self.run(faults, task).await, Flow::Crashed(point));
    }

    /// The rotation ended with one new secret, set once, the old one gone.
    async fn rotated_once(&self, r: &RotationResult, old: &Secret) -> Secret {
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
        assert_eq!(r.step, Step::Verified);
        assert_eq!(r.old_rejected, Some(true));
        let rec = self.record().await;
        let cur = rec.current.clone().expect("current");
        assert!(rec.pending.is_none());
        assert_eq!(rec.previous.expect("previous").secret, *old);
        assert_eq!(rec.history.len(), 1, "one promote");
        assert_eq!(r.new_fingerprint.as_deref(), Some(cur.fingerprint.as_str()));
        assert!(self.sim.accepts("app", &cur.secret));
        assert!(!self.sim.accepts("app", old));
        assert_eq!(self.sim.valid_count("app"), 1);
        assert_eq!(self.target.distinct_sets(), 1, "one secret ever set");
        cur.secret
    }
}

#[tokio::test]
async fn a_crash_after_set_resumes_with_the_staged_secret() {
    let fx = Fx::new();
    let old = fx.enrolled().await;
    let task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    fx.crash(&task, Point::After(Step::Set)).await;
    let staged = fx.record().await.pending.expect("staged as PENDING");
    let r = fx.finish(&task).await;
    let new = fx.rotated_once(&r, &old).await;
    assert_eq!(new, staged.secret);
    assert_eq!(
        fx.sim.set_count("app"),
        1,
        "the set was read back, not redone"
    );
}

#[tokio::test]
async fn a_crash_after_promote_resumes_with_revoke_and_verify() {
    let fx = Fx::new();
    let old = fx.enrolled().await;
    let task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    fx.crash(&task, Point::After(Step::Promoted)).await;
    assert!(fx.sim.accepts("app", &old), "not revoked yet");
    let promoted = fx.store.revision();
    let r = fx.finish(&task).await;
    fx.rotated_once(&r, &old).await;
    assert_eq!(fx.store.revision(), promoted, "no write after promote");
    assert_eq!(fx.sim.set_count("app"), 1);
}

#[tokio::test]
async fn a_crash_after_revoke_verifies_again_and_reports_the_same() {
    for strategy in [Strategy::Continuity, Strategy::Containment] {
        let fx = Fx::new();
        let old = fx.enrolled().await;
        let task = fx.task(TaskAction::Rotate, strategy);
        fx.crash(&task, Point::After(Step::Revoked)).await;
        assert!(!fx.sim.accepts("app", &old), "{strategy}");
        let r = fx.finish(&task).await;
        fx.rotated_once(&r, &old).await;
        assert_eq!(r.old_fingerprint, Some(fx.store.fingerprint(&old)));
    }
}

#[tokio::test]
async fn a_crash_at_every_point_is_recovered_with_one_rotation() {
    let steps = [
        Step::Staged,
        Step::Set,
        Step::Tested,
        Step::Promoted,
        Step::Revoked,
        Step::Verified,
    ];
    for strategy in [Strategy::Continuity, Strategy::Containment] {
        for step in steps {
            for point in [Point::Before(step), Point::After(step)] {
                let fx = Fx::new();
                let old = fx.enrolled().await;
                let task = fx.task(TaskAction::Rotate, strategy);
                fx.crash(&task, point).await;
                let r = fx.finish(&task).await;
                fx.rotated_once(&r, &old).await;
                assert_eq!(fx.sim.set_count("app"), 1, "{strategy} {point}");
            }
        }
    }
}

#[tokio::test]
async fn a_finished_task_delivered_again_changes_nothing() {
    let fx = Fx::new();
    let old = fx.enrolled().await;
    let task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    let first = fx.finish(&task).await;
    fx.rotated_once(&first, &old).await;
    let rev = fx.store.revision();
    let again = fx.finish(&task).await;
    fx.rotated_once(&again, &old).await;
    assert_eq!(fx.store.revision(), rev, "no store write");
    assert_eq!(fx.sim.set_count("app"), 1);
    assert_eq!(
        (
            again.new_fingerprint,
            again.old_fingerprint,
            again.old_rejected
        ),
        (
            first.new_fingerprint,
            first.old_fingerprint,
            first.old_rejected
        )
    );
}

/// Two workers get the same task at once (a redelivery racing the first
/// delivery): the CAS lets exactly one promote, the other resumes after it.
#[tokio::test(start_paused = true)]
async fn two_deliveries_racing_rotate_once_and_agree() {
    for strategy in [Strategy::Continuity, Strategy::Containment] {
        let fx = Fx::with(SimOptions {
            latency: Duration::from_millis(10),
            ..SimOptions::default()
        });
        let old = fx.enrolled().await;
        let task = fx.task(TaskAction::Rotate, strategy);
        let (a, b) = tokio::join!(fx.finish(&task), fx.finish(&task));
        fx.rotated_once(&a, &old).await;
        fx.rotated_once(&b, &old).await;
        assert_eq!(a.new_fingerprint, b.new_fingerprint, "{strategy}");
        assert_eq!(a.old_fingerprint, b.old_fingerprint);
        // Both deliveries set the staged secret before either promoted (so
        // they did race), and it was the same secret both times.
        assert_eq!(fx.sim.set_count("app"), 2);
    }
}

#[tokio::test]
async fn a_rollback_resumes_after_a_crash_at_any_point() {
    for step in [Step::Set, Step::Tested, Step::Restored] {
        for point in [Point::Before(step), Point::After(step)] {
            let fx = Fx::new();
            let old = fx.enrolled().await;
            let rot = fx.task(TaskAction::Rotate, Strategy::Continuity);
            let new = fx.rotated_once(&fx.finish(&rot).await, &old).await;
            let rb = fx.task(TaskAction::Rollback, Strategy::Continuity);
            fx.crash(&rb, point).await;
            let r = fx.finish(&rb).await;
            assert_eq!(r.outcome, Outcome::RolledBack, "{point}: {r:?}");
            assert_eq!(r.step, Step::Restored);
            assert_eq!(r.new_fingerprint, Some(fx.store.fingerprint(&old)));
            let rec = fx.record().await;
            assert_eq!(rec.current.unwrap().secret, old, "{point}");
            assert_eq!(rec.previous.unwrap().secret, new, "{point}");
            assert!(fx.sim.accepts("app", &old) && !fx.sim.accepts("app", &new));
            assert_eq!(
                fx.sim.set_count("app"),
                2,
                "{point}: one rotation, one restore"
            );

            // Delivered again once finished: nothing more at the target.
            assert_eq!(fx.finish(&rb).await.outcome, Outcome::RolledBack);
            assert_eq!(fx.sim.set_count("app"), 2);
        }
    }
}

#[tokio::test]
async fn lost_cas_races_restart_from_a_fresh_read_up_to_a_bound() {
    let fx = Fx::new();
    let old = fx.enrolled().await;
    let task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    fx.store.lose_next_saves(MAX_CONFLICTS);
    let r = fx.finish(&task).await;
    fx.rotated_once(&r, &old).await;

    let fx = Fx::new();
    fx.enrolled().await;
    fx.store.lose_next_saves(MAX_CONFLICTS + 1);
    let r = fx.finish(&task).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.error_class, Some(ErrorClass::Store));
    assert_eq!(fx.sim.set_count("app"), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_store_hands_the_task_back() {
    let fx = Fx::new();
    fx.enrolled().await;
    fx.store.set_unavailable(true);
    let task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    assert_eq!(
        fx.run(Faults::none(), &task).await,
        Flow::Retry {
            delay: STORE_REQUEUE_DELAY
        }
    );
    fx.store.set_unavailable(false);
    assert_eq!(fx.finish(&task).await.outcome, Outcome::Succeeded);
}

#[tokio::test]
async fn an_unverified_consumer_keeps_the_old_secret_under_continuity() {
    let fx = Fx::new();
    let old = fx.enrolled().await;
    let mut task = fx.task(TaskAction::Rotate, Strategy::Continuity);
    task.consumers = vec![ConsumerCheck {
        id: "api".into(),
        verify: VerifyKind::Attest,
        url: None,
        timeout_ms: None,
    }];
    let r = fx.finish(&task).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.error_class, Some(ErrorClass::ConsumerNotVerified));
    assert_eq!(r.step, Step::Promoted);
    assert!(fx.sim.accepts("app", &old), "not revoked");
    assert_eq!(r.consumers[0].status, ConsumerStatus::Failed);

    // Containment revokes first and only reports the consumer.
    let fx = Fx::new();
    let old = fx.enrolled().await;
    task.strategy = Strategy::Containment;
    let r = fx.finish(&task).await;
    fx.rotated_once(&r, &old).await;
    assert_eq!(r.consumers[0].status, ConsumerStatus::Failed);
}
