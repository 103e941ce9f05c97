//! Faults injected for real into the worker, against real Redis ACL users:
//! a crash right before and right after every step of the rotation protocol
//! (both strategies) and after the result publish, each recovered by a fresh
//! worker; a task that crashes every worker it reaches, dead-lettered at its
//! max deliveries and counted at once; Redis frozen mid-wave.

use crate::support::{self, credentials, in_regions, secret, spec};
use async_trait::async_trait;
use keywave_common::client::ApiClient;
use keywave_common::codec;
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::wire::{
    CampaignState, Credential, DeadLetter, EventKind, OnFailure, Outcome, RotationResult,
    RotationTask, Step, Strategy, TargetKind, TaskAction, SCHEMA_VERSION,
};
use keywave_common::{now_ms, publish, subjects, topology};
use keywave_tests::process::{free_port, require, Daemon};
use keywave_tests::{unique, wait_for, wait_until, NatsServer, RedisServer};
use keywave_worker::fault::{CrashMode, Faults, Point};
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::{AuthCheck, Target, TargetError, Targets};
use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A target that counts, per principal, the secrets successfully set
/// (add or replace): the target-side changes a test compares with "once".
pub struct Counting {
    pub inner: Arc<dyn Target>,
    pub sets: Mutex<HashMap<String, u64>>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Target>) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            sets: Mutex::new(HashMap::new()),
        })
    }

    pub fn sets(&self, principal: &str) -> u64 {
        self.sets
            .lock()
            .unwrap()
            .get(principal)
            .copied()
            .unwrap_or(0)
    }

    fn count(&self, principal: &str) {
        *self
            .sets
            .lock()
            .unwrap()
            .entry(principal.to_string())
            .or_default() += 1;
    }
}

#[async_trait]
impl Target for Counting {
    fn kind(&self) -> TargetKind {
        self.inner.kind()
    }
    fn policy(&self) -> SecretPolicy {
        self.inner.policy()
    }
    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.inner.add(principal, new).await?;
        self.count(principal);
        Ok(())
    }
    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.inner.replace(principal, new).await?;
        self.count(principal);
        Ok(())
    }
    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        self.inner.remove(principal, old).await
    }
    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.inner.check(principal, secret).await
    }
}

/// A real login: `AUTH user password` on a fresh connection.
pub async fn auth(url: &str, user: &str, password: &Secret) -> bool {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    match redis::cmd("AUTH")
        .arg(user)
        .arg(password.expose())
        .query_async::<()>(&mut con)
        .await
    {
        Ok(()) => true,
        Err(e) if e.code() == Some("WRONGPASS") => false,
        Err(e) => panic!("AUTH {user}: unexpected error {e}"),
    }
}

/// Creates (or resets) ACL user `user` with the one password `password`.
pub async fn create_user(url: &str, user: &str, password: &Secret) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{}", password.expose()))
        .arg("+ping")
        .query_async(&mut con)
        .await
        .unwrap();
}

fn rotate_task(
    region: &str,
    cid: &str,
    strategy: Strategy,
    cred: &str,
    user: &str,
) -> RotationTask {
    RotationTask {
        v: SCHEMA_VERSION,
        task_id: RotationTask::make_id(cid, 0, TaskAction::Rotate, cred),
        campaign_id: cid.to_string(),
        wave: 0,
        index: 0,
        action: TaskAction::Rotate,
        strategy,
        credential_id: cred.to_string(),
        region: region.to_string(),
        endpoint: "redis-main".into(),
        kind: TargetKind::Redis,
        principal: user.to_string(),
        issued_at_ms: now_ms(),
        deadline_ms: now_ms() + 120_000,
        run_timeout_ms: 0,
        consumers: Vec::new(),
    }
}

/// One fault point on its own region and credential: the first worker
/// crashes there, a fresh one (same region key, no faults) takes the
/// redelivery; the credential must end consistent, set once by the task.
async fn crash_then_recover(
    client: async_nats::Client,
    redis_url: String,
    counting: Arc<Counting>,
    strategy: Strategy,
    point: Point,
) {
    let at = format!("{strategy} crash {point}");
    let region = unique("flt");
    let cid = unique("fc");
    let cred = "c1";
    let user = unique("kwflt");
    let key = RegionKey::generate();
    let mut targets = Targets::new();
    targets.insert("redis-main", counting.clone(), 4);
    let targets = Arc::new(targets);
    let today = secret();
    create_user(&redis_url, &user, &today).await;

    let crashing = support::start_worker(
        &client,
        &region,
        &key,
        targets.clone(),
        Faults::crash_at(point, CrashMode::StopWithoutAck),
    )
    .await;
    crashing.store.enroll(cred, today.clone()).await.unwrap();
    let store = crashing.store.clone();
    let js = topology::context(client.clone());
    let task = rotate_task(&region, &cid, strategy, cred, &user);
    publish::send_and_confirm(
        &js,
        subjects::task(&region, &cid),
        codec::Format::MsgPack,
        &task.task_id,
        &task,
    )
    .await
    .unwrap();
    let stats = crashing
        .join(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{at}: the worker crashes: {e}"));
    assert!(stats.crashed, "{at}: {stats:?}");

    let fresh = support::start_worker(&client, &region, &key, targets, Faults::none()).await;
    let results = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        let js = js.clone();
        let (region, cid) = (region.clone(), cid.clone());
        async move {
            let msgs = support::read_stream(
                &client,
                topology::STREAM_RESULTS,
                &subjects::result(&region, &cid),
            )
            .await;
            // The redelivered task was run and acked: nothing left in the queue.
            let mut consumer = js
                .get_stream(topology::tasks_stream(&region))
                .await
                .ok()?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                    &topology::worker_consumer(&region),
                )
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (!msgs.is_empty() && info.num_pending == 0 && info.num_ack_pending == 0).then(|| {
                msgs.iter()
                    .map(|m| {
                        codec::decode::<RotationResult>(m.headers.as_ref(), &m.payload).unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{at}: the redelivered task finishes"));
    let stats = fresh.stop().await;
    assert_eq!(results.len(), 1, "{at}: one result, duplicates dropped");
    let r = &results[0];
    assert_eq!(r.outcome, Outcome::Succeeded, "{at}: {r:?}");
    assert_eq!(r.old_rejected, Some(true), "{at}");
    if point != Point::AfterPublish {
        assert_eq!(stats.succeeded, 1, "{at}: the fresh worker finished it");
    }

    let rec = store.get(cred).await.unwrap().expect("record");
    assert!(rec.pending.is_none(), "{at}: nothing staged is left");
    let current = rec.current.expect("current");
    let previous = rec.previous.expect("previous");
    assert!(previous.secret == today, "{at}");
    assert_eq!(
        r.new_fingerprint.as_deref(),
        Some(current.fingerprint.as_str()),
        "{at}"
    );
    assert!(
        auth(&redis_url, &user, &current.secret).await,
        "{at}: CURRENT authenticates"
    );
    assert!(
        !auth(&redis_url, &user, &today).await,
        "{at}: PREVIOUS is refused"
    );
    assert_eq!(counting.sets(&user), 1, "{at}: set exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_or_after_every_step_is_recovered_by_a_fresh_worker() {
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let counting = Counting::new(target);
    let steps = [
        Step::Staged,
        Step::Set,
        Step::Tested,
        Step::Promoted,
        Step::Revoked,
        Step::Verified,
    ];
    let mut cases = Vec::new();
    for strategy in [Strategy::Continuity, Strategy::Containment] {
        for step in steps {
            for point in [Point::Before(step), Point::After(step)] {
                cases.push((strategy, point));
            }
        }
        cases.push((strategy, Point::AfterPublish));
    }
    assert_eq!(cases.len(), 26);
    // Every case has its own region, so they run side by side.
    futures::future::join_all(cases.into_iter().map(|(strategy, point)| {
        crash_then_recover(
            client.clone(),
            redis.url(),
            counting.clone(),
            strategy,
            point,
        )
    }))
    .await;
}

/// A target that panics (as a bug in a driver would) whenever it is asked to
/// set a secret for one principal: every worker that takes that task dies
/// with it, so the task is redelivered until its max deliveries.
struct PanicsFor {
    sim: Arc<SimTarget>,
    principal: String,
}

#[async_trait]
impl Target for PanicsFor {
    fn kind(&self) -> TargetKind {
        TargetKind::Sim
    }
    fn policy(&self) -> SecretPolicy {
        self.sim.policy()
    }
    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        assert!(principal != self.principal, "injected driver bug");
        self.sim.add(principal, new).await
    }
    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        assert!(principal != self.principal, "injected driver bug");
        self.sim.replace(principal, new).await
    }
    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        self.sim.remove(principal, old).await
    }
    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.sim.check(principal, secret).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_task_is_dead_lettered_at_max_deliveries_and_its_wave_decides_at_once() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let creds = credentials("psn", 4, &["eu"], "sim-main", TargetKind::Sim);
    let poisoned = creds[2].clone();
    support::put_inventory(&client, &creds).await;
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert(
        "sim-main",
        Arc::new(PanicsFor {
            sim: sim.clone(),
            principal: poisoned.principal.clone(),
        }),
        4,
    );
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s).await.unwrap();
    }
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    // A task timeout far longer than the test may take: only the poison
    // handling can end this wave in time.
    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "100%",
        0.5,
        OnFailure::Pause,
    );
    sp.task_timeout_ms = 600_000;
    let started = std::time::Instant::now();
    let id = api.start(sp).await.unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "decided long before the task deadline"
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    let w = &status.waves[0];
    assert_eq!((w.succeeded, w.failed, w.no_result), (3, 1, 0), "{w:#?}");
    assert_eq!(w.failures.get("no_result"), Some(&1), "{w:#?}");

    // Its dead letter, with the reason and the task.
    let dead: Vec<DeadLetter> = support::read_stream(
        &client,
        topology::STREAM_DEADLETTER,
        &subjects::dead_letter("eu"),
    )
    .await
    .iter()
    .map(|m| codec::decode_plain(m.headers.as_ref(), &m.payload).unwrap())
    .collect();
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(dead[0].reason.starts_with("max_deliveries"), "{dead:#?}");
    assert_eq!(
        dead[0].task_id.as_deref(),
        Some(RotationTask::make_id(&id, 0, TaskAction::Rotate, &poisoned.id).as_str())
    );
    assert_eq!(dead[0].campaign_id.as_deref(), Some(id.as_str()));
    let events = support::events(&client, &id).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.kind, EventKind::DeadLetter { reason, .. } if reason.starts_with("max_deliveries"))),
        "{events:#?}"
    );
    // Removed from the work queue.
    let tasks = js.get_stream(topology::tasks_stream("eu")).await.unwrap();
    wait_until(Duration::from_secs(10), || {
        let mut tasks = tasks.clone();
        async move {
            tasks
                .info()
                .await
                .map(|i| i.state.messages == 0)
                .unwrap_or(false)
        }
    })
    .await
    .expect("the poison task is gone from the eu task stream");
    // The poisoned credential was never touched, the others rotated.
    assert_eq!(sim.set_count(&poisoned.principal), 0);
    for c in creds.iter().filter(|c| c.id != poisoned.id) {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }
    coordinator.stop().await;
    worker.stop().await;
}

/// A `redis-server` of this test's own, so that it can be frozen (SIGSTOP)
/// and thawed (SIGCONT): a hung server, as in an outage, that keeps its ACL
/// users (nothing persists them across a restart).
struct FreezableRedis {
    port: u16,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl FreezableRedis {
    fn start() -> FreezableRedis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(require("redis-server"));
        cmd.arg("--port")
            .arg(port.to_string())
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path());
        let mut daemon = Daemon::spawn("redis-server (freezable)", cmd, &dir.path().join("log"));
        daemon
            .wait_ready(Duration::from_secs(20), || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
            .unwrap();
        FreezableRedis {
            port,
            daemon,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, sig: &str) {
        let pid = self.daemon.pid().unwrap().to_string();
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_mid_wave_tasks_retry_and_nothing_is_half_rotated() {
    support::init_tracing();
    let redis = FreezableRedis::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds: Vec<Credential> = credentials("frz", 60, &["eu"], "redis-main", TargetKind::Redis)
        .into_iter()
        .map(|mut c| {
            c.principal = format!("kwfrz-{}", c.id);
            c
        })
        .collect();
    support::put_inventory(&client, &creds).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let counting = Counting::new(target);
    let mut targets = Targets::new();
    targets.insert("redis-main", counting.clone(), 8);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    let mut today = HashMap::new();
    for c in &creds {
        let s = secret();
        create_user(&redis.url(), &c.principal, &s).await;
        worker.store.enroll(&c.id, s.clone()).await.unwrap();
        today.insert(c.id.clone(), s);
    }
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu"]),
            Strategy::Continuity,
            "10,25",
            0.5,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    // Freeze Redis as soon as the second wave is under way, for 4 seconds:
    // every operation hangs, times out and is retried with backoff.
    wait_until(Duration::from_secs(60), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            api.status(&id)
                .await
                .map(|s| s.current_wave >= 1)
                .unwrap_or(false)
        }
    })
    .await
    .expect("the second wave starts");
    redis.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    redis.signal("-CONT");

    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 60, "{status:#?}");
    for c in &creds {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        assert!(rec.pending.is_none(), "{}: nothing half-rotated", c.id);
        let current = rec.current.expect("current");
        assert!(
            auth(&redis.url(), &c.principal, &current.secret).await,
            "{}",
            c.id
        );
        assert!(
            !auth(&redis.url(), &c.principal, &today[&c.id]).await,
            "{}",
            c.id
        );
        assert_eq!(counting.sets(&c.principal), 1, "{}", c.id);
    }
    coordinator.stop().await;
    worker.stop().await;
}
