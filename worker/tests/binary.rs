//! The `keywave-worker` binary against a private `nats-server` per test
//! (from the `keywave-harness` crate) and the local Redis (127.0.0.1:6379):
//! enroll a real ACL user, kill the process for real (`abort()`) between Set
//! and Promote, and let a second process finish the rotation exactly once,
//! announcing each CURRENT secret when given a detection key; SIGTERM drains
//! and exits 0; a bad config exits 2.

use async_nats::jetstream;
use futures::StreamExt;
use keywave_common::codec::{self, Format};
use keywave_common::crypto::{generate, RegionKey, Secret, SecretPolicy};
use keywave_common::detect::{self, DetectKey, RotatedNotice};
use keywave_common::wire::{
    Outcome, RotationResult, RotationTask, Strategy, TargetKind, TaskAction, SCHEMA_VERSION,
};
use keywave_common::{ids, now_ms, publish, subjects, topology};
use keywave_harness::NatsServer;
use keywave_worker::store::SecretStore;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_keywave-worker");
const REDIS: &str = "redis://127.0.0.1:6379";

struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(ids::random_id("keywave-worker-test"));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The worker binary on `config`, connecting to `nats` (one URL or several,
/// comma-separated).
fn worker(config: &Path, key: &RegionKey, nats: &str, log: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config")
        .arg(config)
        .env("KEYWAVE_REGION_KEY", key.to_hex())
        .env("KEYWAVE_NATS_URL", nats)
        .env("RUST_LOG", "info")
        // These tests publish their own (unsigned) tasks.
        .env("KEYWAVE_INSECURE_UNSIGNED_TASKS", "1")
        .env_remove("KEYWAVE_COORDINATOR_PUBLIC_KEYS")
        .env_remove("KEYWAVE_FAULT_CRASH_AFTER")
        .env_remove("KEYWAVE_DETECT_KEY")
        .env_remove("KEYWAVE_DETECT_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c
}

/// Waits for the child to exit, killing it after `timeout`.
async fn wait_exit(child: &mut Child, timeout: Duration, log: &Path) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "worker did not exit within {timeout:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn auth(user: &str, secret: &Secret) -> bool {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("AUTH")
        .arg(user)
        .arg(secret.expose())
        .query_async::<()>(&mut c)
        .await
        .is_ok()
}

async fn admin(args: &[&str]) -> redis::Value {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.unwrap()
}

#[tokio::test]
async fn killed_mid_rotation_then_resumed_by_a_new_process() {
    let nats = NatsServer::start();
    let url = nats.url();
    let scratch = Scratch::new();
    let region = ids::random_id("tbin");
    let campaign = ids::random_id("camp");
    let user = ids::random_id("kwtest-bin");
    let key = RegionKey::generate();
    let detect_key = DetectKey::generate();
    let config = scratch.path("worker.toml");
    std::fs::write(
        &config,
        format!(
            r#"
region = "{region}"
worker_id = "bin-test"
concurrency = 4
shutdown_grace_secs = 10
[jetstream]
task_backoff_secs = [1, 1]
task_max_deliver = 5
[[endpoint]]
name = "redis-local"
kind = "redis"
url = "{REDIS}"
"#
        ),
    )
    .unwrap();

    // Today's secret, set by hand before keywave manages the user.
    let today = generate(&SecretPolicy::default());
    admin(&[
        "ACL",
        "SETUSER",
        &user,
        "on",
        &format!(">{}", today.expose()),
    ])
    .await;

    // Enroll through the binary; a wrong secret is refused first.
    let log = scratch.path("enroll.log");
    let status = worker(&config, &key, &url, &log)
        .args(["enroll", "--credential", "c1", "--endpoint", "redis-local"])
        .args(["--principal", &user])
        .env("KEYWAVE_ENROLL_SECRET", "not-the-secret")
        .status()
        .unwrap();
    assert!(!status.success());
    let status = worker(&config, &key, &url, &log)
        .args(["enroll", "--credential", "c1", "--endpoint", "redis-local"])
        .args(["--principal", &user])
        .env("KEYWAVE_ENROLL_SECRET", today.expose())
        .env("KEYWAVE_DETECT_KEY", detect_key.to_hex())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!std::fs::read_to_string(&log)
        .unwrap()
        .contains(today.expose()));

    // Subscribe to results, then publish one continuity task.
    let client = nats.client().await;
    let js = topology::context(client.clone());
    // Enrolment announced today's secret.
    let notice = last_notice(&js, &region, "c1").await;
    assert_eq!(notice.detect_fp, detect_key.fingerprint_secret(&today));
    assert_eq!(notice.previous_detect_fp, None);
    let mut results = client
        .subscribe(subjects::result(&region, &campaign))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let task = RotationTask {
        v: SCHEMA_VERSION,
        task_id: RotationTask::make_id(&campaign, 0, TaskAction::Rotate, "c1"),
        campaign_id: campaign.clone(),
        wave: 0,
        index: 0,
        action: TaskAction::Rotate,
        strategy: Strategy::Continuity,
        credential_id: "c1".into(),
        region: region.clone(),
        endpoint: "redis-local".into(),
        kind: TargetKind::Redis,
        principal: user.clone(),
        issued_at_ms: now_ms(),
        deadline_ms: now_ms() + 120_000,
        run_timeout_ms: 0,
        consumers: Vec::new(),
    };
    publish::send_and_confirm(
        &js,
        subjects::task(&region, &campaign),
        Format::MsgPack,
        &task.task_id,
        &task,
    )
    .await
    .unwrap();

    // First process: aborts right after Set, for real.
    let log1 = scratch.path("run1.log");
    let mut first = worker(&config, &key, &url, &log1)
        .env("KEYWAVE_FAULT_CRASH_AFTER", "set")
        .spawn()
        .unwrap();
    let status = wait_exit(&mut first, Duration::from_secs(30), &log1).await;
    assert!(!status.success(), "the fault aborts the process");
    // Continuity: the old and the staged secret are both valid now.
    assert!(auth(&user, &today).await);
    let store = SecretStore::open(&js, &region, key.clone()).await.unwrap();
    let staged = store
        .get("c1")
        .await
        .unwrap()
        .unwrap()
        .pending
        .expect("staged before the crash");
    assert!(auth(&user, &staged.secret).await);

    // Second process: resumes, finishes, and drains on SIGTERM.
    let log2 = scratch.path("run2.log");
    let mut second = worker(&config, &key, &url, &log2)
        .env("KEYWAVE_DETECT_KEY", detect_key.to_hex())
        .arg("run")
        .spawn()
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), results.next())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no result; log:\n{}",
                std::fs::read_to_string(&log2).unwrap_or_default()
            )
        })
        .unwrap();
    let r: RotationResult = codec::decode(msg.headers.as_ref(), &msg.payload).unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:?}");
    assert_eq!(r.old_rejected, Some(true));
    assert_eq!(r.worker_id, "bin-test");

    let status = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_exit(&mut second, Duration::from_secs(20), &log2).await;
    assert!(status.success(), "SIGTERM drains and exits 0");

    // Exactly one rotation: the staged secret is CURRENT, the only password.
    let rec = store.get("c1").await.unwrap().unwrap();
    let current = rec.current.unwrap();
    assert_eq!(current.secret, staged.secret);
    assert_eq!(
        r.new_fingerprint.as_deref(),
        Some(current.fingerprint.as_str())
    );
    assert!(auth(&user, &current.secret).await);
    assert!(!auth(&user, &today).await);
    // The resumed process announced the promoted secret.
    let notice = last_notice(&js, &region, "c1").await;
    assert_eq!(
        notice.detect_fp,
        detect_key.fingerprint_secret(&current.secret)
    );
    assert_eq!(
        notice.previous_detect_fp,
        Some(detect_key.fingerprint_secret(&today))
    );
    let redis::Value::Array(info) = admin(&["ACL", "GETUSER", &user]).await else {
        panic!("unexpected ACL GETUSER reply");
    };
    let pos = info
        .iter()
        .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"passwords"))
        .unwrap();
    assert!(matches!(&info[pos + 1], redis::Value::Array(p) if p.len() == 1));
    for log in [&log1, &log2] {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(!text.contains(current.secret.expose()));
        assert!(!text.contains(today.expose()));
    }

    admin(&["ACL", "DELUSER", &user]).await;
}

/// The rotation notice last published for `cred`.
async fn last_notice(js: &jetstream::Context, region: &str, cred: &str) -> RotatedNotice {
    let m = js
        .get_stream(detect::STREAM_ROTATED)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subjects::rotated(region, cred))
        .await
        .expect("a rotation notice");
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test]
async fn bad_configuration_is_a_usage_error_naming_the_field() {
    let scratch = Scratch::new();
    let config = scratch.path("bad.toml");
    std::fs::write(&config, "region = \"eu\"\nconcurrency = 0\n").unwrap();
    let log = scratch.path("bad.log");
    // Refused before any connection is attempted.
    let status = worker(&config, &RegionKey::generate(), "nats://127.0.0.1:1", &log)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("concurrency"));

    // Without a coordinator public key the worker serves no task: refused
    // before connecting, naming the key and the opt-out.
    let fine = scratch.path("unsigned.toml");
    std::fs::write(&fine, "region = \"eu\"\n").unwrap();
    let log = scratch.path("unsigned.log");
    let status = worker(&fine, &RegionKey::generate(), "nats://127.0.0.1:1", &log)
        .env_remove("KEYWAVE_INSECURE_UNSIGNED_TASKS")
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("coordinator_public_keys"), "{text}");
    assert!(text.contains("insecure_unsigned_tasks"), "{text}");

    let out = Command::new(BIN).arg("keygen").output().unwrap();
    assert!(out.status.success());
    let hex = String::from_utf8(out.stdout).unwrap();
    assert!(RegionKey::parse(hex.trim()).is_ok());
}

/// A sim-only worker configuration for `region`.
fn sim_config(scratch: &Scratch, region: &str, grace_secs: u64) -> PathBuf {
    let config = scratch.path("sim.toml");
    std::fs::write(
        &config,
        format!(
            r#"
region = "{region}"
worker_id = "drain-test"
concurrency = 4
shutdown_grace_secs = {grace_secs}
[jetstream]
task_backoff_secs = [1, 1]
task_max_deliver = 5
[[endpoint]]
name = "sim"
kind = "sim"
"#
        ),
    )
    .unwrap();
    config
}

fn sim_task(region: &str, campaign: &str) -> RotationTask {
    RotationTask {
        v: SCHEMA_VERSION,
        task_id: RotationTask::make_id(campaign, 0, TaskAction::Rotate, "slow"),
        campaign_id: campaign.to_string(),
        wave: 0,
        index: 0,
        action: TaskAction::Rotate,
        strategy: Strategy::Continuity,
        credential_id: "slow".into(),
        region: region.to_string(),
        endpoint: "sim".into(),
        kind: TargetKind::Sim,
        principal: "app".into(),
        issued_at_ms: now_ms(),
        deadline_ms: now_ms() + 120_000,
        run_timeout_ms: 0,
        consumers: Vec::new(),
    }
}

async fn consumer_counts(js: &jetstream::Context, region: &str) -> (u64, usize) {
    let mut c = js
        .get_stream(topology::tasks_stream(region))
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>(&topology::worker_consumer(region))
        .await
        .unwrap();
    let i = c.info().await.unwrap();
    (i.num_pending, i.num_ack_pending)
}

/// Starts a worker whose Set step takes `delay_ms`, hands it one task and
/// sends SIGTERM once the task is staged (in hand, mid-rotation).
///
/// The worker is given a server list whose first entry has nothing listening,
/// so it also proves that comma-separated URLs are accepted and tried in turn.
async fn sigterm_mid_task(
    grace_secs: u64,
    delay_ms: u64,
) -> (
    ExitStatus,
    String,
    jetstream::Context,
    String,
    String,
    NatsServer,
) {
    let nats = NatsServer::start();
    let urls = format!("nats://127.0.0.1:1, {}", nats.url());
    let scratch = Scratch::new();
    let region = ids::random_id("tdrain");
    let campaign = ids::random_id("camp");
    let key = RegionKey::generate();
    let config = sim_config(&scratch, &region, grace_secs);
    let js = topology::context(nats.client().await);
    let log = scratch.path("drain.log");
    let mut child = worker(&config, &key, &urls, &log)
        .env("KEYWAVE_FAULT_DELAY", format!("set:{delay_ms}"))
        .spawn()
        .unwrap();
    // The worker creates the topology; then the task goes in.
    let deadline = Instant::now() + Duration::from_secs(20);
    let store = loop {
        if let Ok(s) = SecretStore::open(&js, &region, key.clone()).await {
            break s;
        }
        assert!(Instant::now() < deadline, "worker never created its store");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let task = sim_task(&region, &campaign);
    publish::send_and_confirm(
        &js,
        subjects::task(&region, &campaign),
        Format::MsgPack,
        &task.task_id,
        &task,
    )
    .await
    .unwrap();
    // Staged: the task is in hand and sleeping before Set.
    loop {
        if let Ok(Some(r)) = store.get("slow").await {
            if r.pending.is_some() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "task never staged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = wait_exit(&mut child, Duration::from_secs(30), &log).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (status, text, js, region, campaign, nats)
}

#[tokio::test]
async fn sigterm_finishes_and_acks_the_task_in_hand_then_exits_0() {
    let (status, log, js, region, campaign, _nats) = sigterm_mid_task(20, 1_500).await;
    assert!(status.success(), "exit 0 after the drain; log:\n{log}");
    // The result is out and the task acked: nothing pending or in flight.
    let results = js.get_stream(topology::STREAM_RESULTS).await.unwrap();
    let mut info = results
        .info_with_subjects(subjects::result(&region, &campaign))
        .await
        .unwrap();
    let n: usize = futures::StreamExt::collect::<Vec<_>>(&mut info)
        .await
        .into_iter()
        .map(|r| r.unwrap().1)
        .sum();
    assert_eq!(n, 1, "one result published; log:\n{log}");
    assert_eq!(
        consumer_counts(&js, &region).await,
        (0, 0),
        "acked; log:\n{log}"
    );
    assert!(!log.contains("Grace period ran out"), "{log}");
}

#[tokio::test]
async fn sigterm_past_the_grace_period_leaves_the_task_for_redelivery() {
    let (status, log, js, region, campaign, _nats) = sigterm_mid_task(1, 10_000).await;
    assert!(status.success(), "exit 0; log:\n{log}");
    assert!(log.contains("Grace period ran out"), "{log}");
    // Not acked: still on the work queue, for the server to redeliver.
    let tasks = js
        .get_stream(topology::tasks_stream(&region))
        .await
        .unwrap();
    let mut info = tasks
        .info_with_subjects(subjects::task(&region, &campaign))
        .await
        .unwrap();
    let n: usize = futures::StreamExt::collect::<Vec<_>>(&mut info)
        .await
        .into_iter()
        .map(|r| r.unwrap().1)
        .sum();
    assert_eq!(n, 1, "{log}");
}
