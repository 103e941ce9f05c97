//! Coordinator fail-over with real processes and default lease timings: two
//! `keywave-coordinator` binaries, one worker, a campaign with a bake. The
//! active coordinator is SIGKILLed mid-campaign while the real `keywave`
//! CLI asks for the campaign's status every 200 ms: every answer succeeds
//! (the standby answers reads), the standby holds the lease within 5 s, a
//! pause sent during the take-over waits for it and is applied, and the
//! campaign completes with every credential rotated once. A coordinator
//! restarted with the same `--id` after SIGKILL takes its lease back at once,
//! and a second live process with that id makes the first stop for good.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::api::ROLE_ACTIVE;
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_coordinator::lease::{self, LeaseRecord};
use keywave_tests::{unique, wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Slack on top of the 5 s take-over target for a loaded test machine.
const TOLERANCE: Duration = Duration::from_secs(2);

/// A `keywave-coordinator` process; its log is in `log`. Killed on drop.
struct CoordinatorProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl CoordinatorProcess {
    fn spawn(bin: &Path, url: &str, id: &str, dir: &Path, n: usize) -> CoordinatorProcess {
        let log = dir.join(format!("{id}-{n}.log"));
        let out = std::fs::File::create(&log).unwrap();
        // Tasks are signed (the daemon refuses to start without a key);
        // every coordinator of the test shares one key, as a deployment's do.
        let key = dir.join("coordinator.key");
        if !key.exists() {
            keywave_common::sign::SigningKey::generate()
                .to_file(&key)
                .unwrap();
        }
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(["--nats", url, "--id", id])
            .arg("--signing-key-file")
            .arg(&key)
            .env("RUST_LOG", "info")
            .env_remove("KEYWAVE_LEASE_TTL")
            .env_remove("KEYWAVE_LEASE_RENEW")
            .env_remove("KEYWAVE_LEASE_POLL")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true);
        CoordinatorProcess {
            child: cmd.spawn().expect("keywave-coordinator runs"),
            log,
        }
    }

    /// SIGKILL, and reap it.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and wait for it to exit.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            self.kill().await;
            panic!("coordinator did not stop on SIGTERM:\n{}", self.log_text());
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The lease record and its revision, when somebody holds it.
async fn lease_now(kv: &async_nats::jetstream::kv::Store) -> Option<(LeaseRecord, u64)> {
    match lease::look(kv).await.ok()? {
        lease::Seen::Held { record, revision } => Some((record, revision)),
        lease::Seen::Free { .. } => None,
    }
}

/// Polls the lease every 20 ms until `pred` holds of its record.
async fn lease_until(
    kv: &async_nats::jetstream::kv::Store,
    within: Duration,
    pred: impl Fn(&LeaseRecord) -> bool,
) -> LeaseRecord {
    let t0 = Instant::now();
    loop {
        if let Some((r, _)) = lease_now(kv).await {
            if pred(&r) {
                return r;
            }
        }
        assert!(
            t0.elapsed() < within,
            "lease not as expected within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The id of the coordinator answering a ping as active.
async fn active(api: &ApiClient, within: Duration) -> String {
    wait_for(within, || async {
        api.ping()
            .await
            .ok()
            .filter(|p| p.role.as_deref() == Some(ROLE_ACTIVE))
            .map(|p| p.coordinator_id)
    })
    .await
    .expect("a coordinator answers as active")
}

struct Fleet {
    sim: Arc<SimTarget>,
    worker: support::RunningWorker,
    creds: Vec<keywave_common::wire::Credential>,
}

async fn fleet(client: &async_nats::Client, prefix: &str, n: usize) -> Fleet {
    let creds = credentials(prefix, n, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(client, &creds).await;
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(10),
        fail_rate: 0.0,
    });
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 16);
    let worker = support::start_worker(
        client,
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
    Fleet { sim, worker, creds }
}

/// What the status poller saw.
#[derive(Default)]
struct Polls {
    ok: usize,
    failed: Vec<String>,
    /// Longest time between two successful answers.
    longest_gap: Duration,
}

/// Runs `keywave --json campaign status <id>` every 200 ms until `stop`.
async fn poll_status(cli: PathBuf, url: String, id: String, stop: Arc<AtomicBool>) -> Polls {
    let mut polls = Polls::default();
    let mut last_ok = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let out = tokio::time::timeout(
            Duration::from_secs(40),
            tokio::process::Command::new(&cli)
                .args(["--nats", &url, "--json", "campaign", "status", &id])
                .env_remove("KEYWAVE_NATS_URL")
                .output(),
        )
        .await;
        match out {
            Ok(Ok(o)) if o.status.success() => {
                polls.ok += 1;
                polls.longest_gap = polls.longest_gap.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            Ok(Ok(o)) => polls.failed.push(format!(
                "exit {:?} after {:?}: {}",
                o.status.code(),
                started.elapsed(),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(Err(e)) => polls.failed.push(format!("cannot run keywave: {e}")),
            Err(_) => polls
                .failed
                .push("keywave did not return within 40 s".into()),
        }
        tokio::time::sleep(Duration::from_millis(200).saturating_sub(started.elapsed())).await;
    }
    polls
}

fn binaries() -> (PathBuf, PathBuf) {
    (
        support::workspace_binary("keywave-coordinator", "keywave-coordinator"),
        support::workspace_binary("keywave-cli", "keywave"),
    )
}

async fn leases(client: &async_nats::Client) -> async_nats::jetstream::kv::Store {
    let js = topology::context(client.clone());
    topology::leases(&js, &support::topology()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_active_coordinator_never_darkens_status_and_the_standby_takes_over_within_5s()
{
    support::init_tracing();
    let (coord_bin, cli_bin) = tokio::task::spawn_blocking(binaries).await.unwrap();
    let server = NatsServer::start();
    let client = server.client().await;
    let url = server.url();
    let dir = tempfile::Builder::new()
        .prefix("keywave-failover-")
        .tempdir()
        .unwrap();
    let fl = fleet(&client, &unique("fo"), 100).await;
    let kv = leases(&client).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(5));

    let mut a = CoordinatorProcess::spawn(&coord_bin, &url, "fo-a", dir.path(), 0);
    assert_eq!(active(&api, Duration::from_secs(60)).await, "fo-a");
    let b = CoordinatorProcess::spawn(&coord_bin, &url, "fo-b", dir.path(), 0);
    // B answers too (as a standby) once it runs.
    wait_for(Duration::from_secs(60), || async {
        api.ping().await.ok().filter(|p| p.coordinator_id == "fo-b")
    })
    .await
    .expect("the standby answers pings");

    // Ten waves of 10 with a 1 s bake after each: mid-campaign for seconds.
    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "10%",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 1_000;
    let id = api.start(sp).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_status(
        cli_bin.clone(),
        url.clone(),
        id.clone(),
        stop.clone(),
    ));
    wait_for(Duration::from_secs(60), || async {
        api.status(&id)
            .await
            .ok()
            .filter(|s| s.current_wave >= 2 && !s.state.is_terminal())
    })
    .await
    .expect("the campaign reaches wave 2");

    // SIGKILL: no handover, the lease must expire.
    let before = lease_now(&kv).await.expect("A holds the lease").0;
    assert_eq!(before.holder, "fo-a");
    let killed = Instant::now();
    a.kill().await;
    // An operator pauses the campaign during the take-over: the CLI waits
    // for the new active coordinator, saying so, and the pause is applied.
    let pause = tokio::spawn(
        tokio::process::Command::new(&cli_bin)
            .args(["--nats", &url, "--json", "campaign", "pause", &id])
            .env_remove("KEYWAVE_NATS_URL")
            .output(),
    );
    lease_until(&kv, Duration::from_secs(30), |r| r.holder == "fo-b").await;
    let took_over = killed.elapsed();
    println!("take-over after SIGKILL: {took_over:?} (lease held by fo-b)");
    assert_eq!(active(&api, Duration::from_secs(10)).await, "fo-b");
    let paused = tokio::time::timeout(Duration::from_secs(40), pause)
        .await
        .expect("pause returns")
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&paused.stderr);
    println!(
        "`keywave campaign pause` during the take-over: {}",
        stderr.trim()
    );
    assert!(paused.status.success(), "{stderr}");
    assert!(stderr.contains("waiting up to 15s"), "{stderr}");
    let s = api.status(&id).await.unwrap();
    assert_eq!(s.state, CampaignState::Paused, "{s:#?}");
    api.resume(&id).await.unwrap();

    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    // A few more polls against the finished campaign.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::SeqCst);
    let polls = poller.await.unwrap();
    println!(
        "status polls through the fail-over: {} answered, {} failed, longest gap between answers {:?}",
        polls.ok,
        polls.failed.len(),
        polls.longest_gap
    );
    assert!(
        polls.failed.is_empty(),
        "`keywave campaign status` failed during the fail-over: {:#?}\nA's log:\n{}\nB's log:\n{}",
        polls.failed,
        a.log_text(),
        b.log_text()
    );
    assert!(polls.ok >= 10, "{} polls", polls.ok);
    assert!(
        took_over <= Duration::from_secs(5) + TOLERANCE,
        "take-over took {took_over:?}"
    );

    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 100, "{status:#?}");
    for c in &fl.creds {
        assert_eq!(fl.sim.set_count(&c.principal), 1, "{}", c.id);
    }
    b.stop().await;
    fl.worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restarted_with_the_same_id_takes_its_lease_back_at_once() {
    support::init_tracing();
    let (coord_bin, _) = tokio::task::spawn_blocking(binaries).await.unwrap();
    let server = NatsServer::start();
    let client = server.client().await;
    let url = server.url();
    let dir = tempfile::Builder::new()
        .prefix("keywave-failover-")
        .tempdir()
        .unwrap();
    let fl = fleet(&client, &unique("same"), 40).await;
    let kv = leases(&client).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(5));

    let mut first = CoordinatorProcess::spawn(&coord_bin, &url, "same-a", dir.path(), 0);
    assert_eq!(active(&api, Duration::from_secs(60)).await, "same-a");
    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "25%",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 1_000;
    let id = api.start(sp).await.unwrap();
    wait_for(Duration::from_secs(60), || async {
        api.status(&id)
            .await
            .ok()
            .filter(|s| s.current_wave >= 1 && !s.state.is_terminal())
    })
    .await
    .expect("the campaign reaches wave 1");

    // SIGKILL, and the same id again at once: its lease is taken back long
    // before it would have expired.
    let old = lease_now(&kv).await.expect("held").0;
    first.kill().await;
    let restarted = Instant::now();
    let second = CoordinatorProcess::spawn(&coord_bin, &url, "same-a", dir.path(), 1);
    let new = lease_until(&kv, Duration::from_secs(30), |r| {
        r.holder == "same-a" && r.instance != old.instance
    })
    .await;
    let took = restarted.elapsed();
    println!(
        "lease taken back {took:?} after the restart; the old lease still had {} ms to run",
        old.expires_at_ms.saturating_sub(new.acquired_at_ms)
    );
    assert!(
        new.acquired_at_ms < old.expires_at_ms,
        "waited for the old lease to expire: {old:?} -> {new:?}"
    );
    assert!(
        took < lease::Config::default().ttl,
        "took {took:?}, the ttl is {:?}",
        lease::Config::default().ttl
    );
    assert!(
        second.log_text().contains("taking it back at once"),
        "{}",
        second.log_text()
    );

    // By mistake, a second live process with the same id: it takes the lease
    // (at its first look it cannot tell a live holder from a dead one), and
    // the one it replaced is fenced and stops for good with a clear error.
    // (Should the holder renew in between, the newcomer is the one that
    // stops: either way exactly one of them goes, with that error.)
    let mut second = second;
    let mut third = CoordinatorProcess::spawn(&coord_bin, &url, "same-a", dir.path(), 2);
    let t0 = Instant::now();
    let (exit, gone, mut survivor) = loop {
        if let Some(e) = second.child.try_wait().unwrap() {
            break (e, second, third);
        }
        if let Some(e) = third.child.try_wait().unwrap() {
            break (e, third, second);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no process with the duplicate id stopped:\n{}\n{}",
            second.log_text(),
            third.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("duplicate id: {} stopped with {exit}", gone.log.display());
    assert!(!exit.success(), "{}", gone.log_text());
    assert!(
        gone.log_text()
            .contains("another process runs with coordinator id same-a"),
        "{}",
        gone.log_text()
    );
    // The survivor stays and finishes the campaign; nobody fights back.
    let holder = lease_now(&kv).await.expect("held").0;
    let t_end = Instant::now();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    println!(
        "campaign finished {:?} after the duplicate stopped",
        t_end.elapsed()
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 40);
    for c in &fl.creds {
        assert_eq!(fl.sim.set_count(&c.principal), 1, "{}", c.id);
    }
    let after = lease_now(&kv).await.expect("held").0;
    assert_eq!(
        after.instance, holder.instance,
        "the lease changed hands again"
    );
    assert!(
        survivor.child.try_wait().unwrap().is_none(),
        "{}",
        survivor.log_text()
    );
    survivor.kill().await;
    fl.worker.stop().await;
}
