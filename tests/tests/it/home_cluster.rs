//! The home cluster of the multi-region supercluster (`deploy/multi-region/`:
//! home1..3 holding the campaign state at R3, one server per region eu, us,
//! ap) at production failure-handling defaults. Losing the home server the
//! coordinator is connected to, which also leads the campaigns bucket,
//! mid-campaign: the campaign completes without ever pausing, every
//! credential rotated once. Two `keywave-coordinator` processes on different
//! home servers: the active one SIGKILLed mid-wave, the standby takes the
//! lease (take-over time printed) and completes the campaign.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::api::{CampaignStatus, ROLE_ACTIVE};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::sign::{SigningKey, Verifier};
use keywave_common::topology::{self, Placement};
use keywave_common::wire::{
    CampaignEvent, CampaignState, Credential, Decision, EventKind, OnFailure, Strategy, TargetKind,
};
use keywave_coordinator::lease::{self, LeaseRecord};
use keywave_tests::{unique, wait_for, NatsSupercluster};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use keywave_worker::WorkerOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// The placement of `supercluster.rs` (home state at R3 on the home
/// cluster, each secret store on its region's server) with production
/// redelivery (5 s ack wait and backoff), as users run it.
fn placed_topology() -> topology::Config {
    topology::Config {
        replicas: 3,
        region_replicas: Some(1),
        home_placement: Some(Placement::parse("cluster=home").unwrap()),
        region_placement: topology::parse_region_placements(
            "eu=region:eu,us=region:us,ap=region:ap",
        )
        .unwrap(),
        ..Default::default()
    }
}

/// The same placement as `keywave-coordinator` flags.
const PLACEMENT_FLAGS: [&str; 10] = [
    "--replicas",
    "3",
    "--region-replicas",
    "1",
    "--regions",
    "eu,us,ap",
    "--home-placement",
    "cluster=home",
    "--placement",
    "eu=region:eu,us=region:us,ap=region:ap",
];

/// Simulated credentials over the three regions, each region's worker
/// connected to its own region's server, today's secrets enrolled.
struct Fleet {
    creds: Vec<Credential>,
    sim: Arc<SimTarget>,
    workers: Vec<(&'static str, support::RunningWorker)>,
}

impl Fleet {
    /// `per_region` credentials in each region; every target operation
    /// takes `latency`. With `task_key`, workers refuse unsigned tasks.
    async fn start(
        sc: &NatsSupercluster,
        home: &async_nats::Client,
        per_region: usize,
        latency: Duration,
        task_key: Option<&SigningKey>,
    ) -> Fleet {
        let cfg = placed_topology();
        let creds = credentials(
            &unique("hc"),
            per_region * REGIONS.len(),
            &REGIONS,
            "sim-main",
            TargetKind::Sim,
        );
        support::put_inventory_on(home, cfg.clone(), &creds).await;
        let sim = SimTarget::new(SimOptions {
            latency,
            fail_rate: 0.0,
        });
        let mut workers = Vec::new();
        for r in REGIONS {
            let client = keywave_common::nats::connect(&sc.urls(r).join(","), "keywave-worker")
                .await
                .unwrap_or_else(|e| panic!("connect to {r}: {e}"));
            let mut targets = Targets::new();
            targets.insert("sim-main", sim.clone(), 64);
            let opts = WorkerOptions {
                region: r.to_string(),
                worker_id: unique(&format!("worker-{r}")),
                concurrency: 32,
                topology: cfg.clone(),
                task_keys: task_key.map_or_else(Verifier::default, |k| {
                    Verifier::new(vec![k.public().clone()])
                }),
                require_signed_tasks: task_key.is_some(),
                ..Default::default()
            };
            let w = support::start_worker_with(
                &client,
                opts,
                &RegionKey::generate(),
                Arc::new(targets),
            )
            .await;
            workers.push((r, w));
        }
        for c in &creds {
            let s = secret();
            sim.seed(&c.principal, &s);
            let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
            w.store.enroll(&c.id, s).await.unwrap();
        }
        Fleet {
            creds,
            sim,
            workers,
        }
    }

    /// Every credential set exactly once at the target; the secret its
    /// region's store holds as current works, the previous one is refused.
    async fn assert_rotated_once(&self) {
        for c in &self.creds {
            assert_eq!(self.sim.set_count(&c.principal), 1, "{}", c.id);
            let (_, w) = self.workers.iter().find(|(r, _)| *r == c.region).unwrap();
            let rec = w.store.get(&c.id).await.unwrap().expect("record");
            assert!(
                self.sim
                    .accepts(&c.principal, &rec.current.expect("current").secret),
                "{}: the current secret is refused",
                c.id
            );
            assert!(
                !self
                    .sim
                    .accepts(&c.principal, &rec.previous.expect("previous").secret),
                "{}: the previous secret still works",
                c.id
            );
        }
    }

    async fn stop(self) {
        for (_, w) in self.workers {
            w.stop().await;
        }
    }
}

/// A client of the home servers but `except` (the test's own view stays up
/// while that one is killed).
async fn home_client_avoiding(sc: &NatsSupercluster, except: &str) -> async_nats::Client {
    let urls: Vec<String> = sc
        .server_names("home")
        .iter()
        .filter(|n| *n != except)
        .map(|n| sc.url_of(n))
        .collect();
    keywave_common::nats::connect(&urls.join(","), "keywave-tests")
        .await
        .unwrap_or_else(|e| panic!("connect to {urls:?}: {e}"))
}

/// The server leading `stream`'s replicas.
async fn leader_of(js: &async_nats::jetstream::Context, stream: &str) -> String {
    let mut s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    let info = s
        .info()
        .await
        .unwrap_or_else(|e| panic!("info of {stream}: {e}"));
    info.cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_else(|| panic!("{stream} has no leader: {info:#?}"))
}

/// Moves the leadership of `stream` to `server` (one of its replicas) by
/// asking the current leader to step down until the election lands there.
async fn lead_on(client: &async_nats::Client, stream: &str, server: &str) {
    let js = topology::context(client.clone());
    for _ in 0..20 {
        let leader = leader_of(&js, stream).await;
        if leader == server {
            return;
        }
        let _ = client
            .request(
                format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                "".into(),
            )
            .await;
        let _ = wait_for(Duration::from_secs(10), || async {
            let mut s = js.get_stream(stream).await.ok()?;
            let info = s.info().await.ok()?;
            let now = info.cluster.as_ref()?.leader.clone()?;
            (now != leader).then_some(())
        })
        .await;
    }
    panic!("{stream}'s leadership did not move to {server}");
}

/// Events of the campaign that pause it.
fn pauses(events: &[CampaignEvent]) -> Vec<&EventKind> {
    events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| {
            matches!(
                k,
                EventKind::StateChanged {
                    state: CampaignState::Paused,
                    ..
                } | EventKind::Decision {
                    decision: Decision::Pause,
                    ..
                }
            )
        })
        .collect()
}

/// Asks for the campaign's status every 100 ms until `stop`; keeps every
/// state seen but running, baking or completed, with its reason.
fn watch_states(
    api: ApiClient,
    id: String,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<String>>>) {
    let odd = Arc::new(Mutex::new(Vec::new()));
    let seen = odd.clone();
    let h = tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            if let Ok(s) = api.status(&id).await {
                if !matches!(
                    s.state,
                    CampaignState::Running | CampaignState::Baking | CampaignState::Completed
                ) {
                    seen.lock()
                        .unwrap()
                        .push(format!("{} ({:?})", s.state, s.reason));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (h, odd)
}

fn summary(status: &CampaignStatus) -> String {
    format!(
        "{} in wave {} of {}: {} succeeded, {} failed of {}",
        status.state,
        status.current_wave,
        status.waves.len(),
        status.succeeded(),
        status.failed(),
        status.total
    )
}

// SIGKILL of a home server moves the leaders it held (the meta leader, the
// campaigns bucket, results, leases, ...) to the two survivors, which keep a
// quorum; the coordinator's connection drops and reconnects to a survivor.
// For a few seconds JetStream requests fail or time out: results wait in the
// workers (naked with delay, redelivered at the default 5 s), the
// coordinator retries its snapshot writes and keeps its lease. Nothing of
// that is a region going dark: the campaign must not pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_coordinators_home_server_mid_campaign_never_pauses_it() {
    support::init_tracing();
    let mut sc = NatsSupercluster::start();
    let setup = sc.client("home").await;
    let js = topology::context(setup.clone());
    let fleet = Fleet::start(&sc, &setup, 100, Duration::from_millis(20), None).await;
    let total = fleet.creds.len() as u64;

    // The victim: the leader of the coordinators' lease bucket, made the
    // leader of the campaigns bucket too, and the coordinator connects to
    // it first (all three home URLs, in that order).
    let campaigns = format!("KV_{}", topology::KV_CAMPAIGNS);
    let leases = format!("KV_{}", topology::KV_LEASES);
    topology::leases(&js, &placed_topology())
        .await
        .expect("lease bucket");
    let victim = leader_of(&js, &leases).await;
    lead_on(&setup, &campaigns, &victim).await;
    let mut urls = vec![sc.url_of(&victim)];
    urls.extend(
        sc.server_names("home")
            .iter()
            .filter(|n| **n != victim)
            .map(|n| sc.url_of(n)),
    );
    let coordinator_client = keywave_common::nats::connect_with(
        &urls.join(","),
        keywave_common::nats::options("keywave-coordinator").retain_servers_order(),
    )
    .await
    .expect("coordinator connects");
    assert_eq!(
        coordinator_client.server_info().server_name,
        victim,
        "the coordinator is connected to the campaigns bucket's leader"
    );
    let operator = home_client_avoiding(&sc, &victim).await;
    let coordinator = support::start_coordinator_answering(
        &coordinator_client,
        keywave_coordinator::CoordinatorOptions {
            topology: placed_topology(),
            coordinator_id: unique("home-coordinator"),
            ..Default::default()
        },
        &operator,
        Duration::from_secs(30),
    )
    .await;
    let api = ApiClient::new(operator.clone()).with_timeout(Duration::from_secs(5));

    // Ten waves of 30 with a short bake: mid-campaign for several seconds.
    let mut sp = spec(
        in_regions(&REGIONS),
        Strategy::Continuity,
        "10%",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 300;
    let id = api.start(sp).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (watcher, odd_states) = watch_states(api.clone(), id.clone(), stop.clone());
    wait_for(Duration::from_secs(60), || async {
        api.status(&id)
            .await
            .ok()
            .filter(|s| s.current_wave >= 2 && !s.state.is_terminal())
    })
    .await
    .expect("the campaign reaches wave 2");

    let mut leaders = Vec::new();
    for stream in [&campaigns, &leases, topology::STREAM_EVENTS] {
        leaders.push(format!("{stream} {}", leader_of(&js, stream).await));
    }
    let meta = sc.meta_leader();
    let before = api.status(&id).await.unwrap();
    println!(
        "killing {victim}, the coordinator's server; leaders: {}, JetStream meta {meta:?}; campaign {}",
        leaders.join(", "),
        summary(&before)
    );
    let killed = Instant::now();
    sc.kill_server(&victim);
    drop(setup);

    let status = api
        .wait_terminal(&id, Duration::from_secs(100))
        .await
        .unwrap_or_else(|e| panic!("campaign ends: {e}\n{}", sc.log_tails()));
    println!(
        "campaign {} {:?} after the kill",
        summary(&status),
        killed.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    watcher.await.unwrap();

    // The lost server comes back with its store and answers again. (The
    // events are read after that: the ordered consumer that reads them may
    // not be creatable while a home server is missing.)
    sc.restart_server(&victim);
    let back = keywave_common::nats::connect(&sc.url_of(&victim), "keywave-tests")
        .await
        .expect("the restarted server takes clients");
    let s = ApiClient::new(back)
        .with_timeout(Duration::from_secs(5))
        .status(&id)
        .await
        .expect("status through the restarted server");
    assert_eq!(s.state, CampaignState::Completed);

    let events = support::events(&operator, &id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.name()).collect();
    println!("events: {kinds:?}");
    assert!(
        pauses(&events).is_empty(),
        "the campaign paused: {:#?}",
        pauses(&events)
    );
    assert!(
        odd_states.lock().unwrap().is_empty(),
        "status showed {:?}",
        odd_states.lock().unwrap()
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), total, "{status:#?}");
    assert_eq!(status.failed(), 0, "{status:#?}");
    let without_results: Vec<_> = status.waves.iter().filter(|w| w.no_result > 0).collect();
    assert!(without_results.is_empty(), "{without_results:#?}");
    fleet.assert_rotated_once().await;

    coordinator.stop().await;
    fleet.stop().await;
}

/// Slack on top of the documented take-over bound (lease ttl plus a poll)
/// for a loaded test machine, as `failover.rs` allows.
const TOLERANCE: Duration = Duration::from_secs(2);

/// A `keywave-coordinator` process with the supercluster's placement; its
/// log is in `log`. Killed on drop.
struct CoordinatorProcess {
    child: tokio::process::Child,
    log: PathBuf,
}

impl CoordinatorProcess {
    fn spawn(bin: &Path, url: &str, id: &str, key: &Path, dir: &Path) -> CoordinatorProcess {
        let log = dir.join(format!("{id}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(["--nats", url, "--id", id])
            .args(PLACEMENT_FLAGS)
            .arg("--signing-key-file")
            .arg(key)
            .env("RUST_LOG", "info")
            // Default lease timings, whatever the environment says.
            .env_remove("KEYWAVE_LEASE_TTL")
            .env_remove("KEYWAVE_LEASE_RENEW")
            .env_remove("KEYWAVE_LEASE_POLL")
            .env_remove("KEYWAVE_NATS_URL")
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

/// The lease's record while somebody holds it.
async fn holder(kv: &async_nats::jetstream::kv::Store) -> Option<LeaseRecord> {
    match lease::look(kv).await.ok()? {
        lease::Seen::Held { record, .. } => Some(record),
        lease::Seen::Free { .. } => None,
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

// Take-over time as `failover.rs` measures it: from the SIGKILL to the
// standby holding the lease (it is then active and drives the campaign).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_on_another_home_server_takes_over_mid_wave_and_completes() {
    support::init_tracing();
    let coord_bin = tokio::task::spawn_blocking(|| {
        support::workspace_binary("keywave-coordinator", "keywave-coordinator")
    })
    .await
    .unwrap();
    let sc = NatsSupercluster::start();
    let home = sc.client("home").await;
    let dir = tempfile::Builder::new()
        .prefix("keywave-home-ha-")
        .tempdir()
        .unwrap();
    // One task-signing key for both coordinators, as a deployment's; the
    // workers trust only it.
    let key = SigningKey::generate();
    let key_file = dir.path().join("coordinator.key");
    key.to_file(&key_file).unwrap();
    // Slow targets: a wave of 12 takes a few seconds, so the kill lands
    // inside one.
    let fleet = Fleet::start(&sc, &home, 40, Duration::from_millis(300), Some(&key)).await;
    let total = fleet.creds.len() as u64;
    let js = topology::context(home.clone());
    let kv = topology::leases(&js, &placed_topology()).await.unwrap();
    let api = ApiClient::new(home.clone()).with_timeout(Duration::from_secs(5));

    let servers = sc.server_names("home");
    let (server_a, server_b) = (&servers[0], &servers[1]);
    let mut a = CoordinatorProcess::spawn(
        &coord_bin,
        &sc.url_of(server_a),
        "ha-a",
        &key_file,
        dir.path(),
    );
    assert_eq!(active(&api, Duration::from_secs(60)).await, "ha-a");
    let b = CoordinatorProcess::spawn(
        &coord_bin,
        &sc.url_of(server_b),
        "ha-b",
        &key_file,
        dir.path(),
    );
    wait_for(Duration::from_secs(60), || async {
        api.ping().await.ok().filter(|p| p.coordinator_id == "ha-b")
    })
    .await
    .expect("the standby answers pings");

    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "10%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    // Mid-wave: wave 2 or later published and not finished.
    let at_kill = wait_for(Duration::from_secs(60), || async {
        let s = api.status(&id).await.ok()?;
        assert!(!s.state.is_terminal(), "finished too early: {s:#?}");
        let w = s.waves.get(s.current_wave as usize)?;
        (s.current_wave >= 2 && w.published && w.finished_at_ms.is_none()).then_some(s)
    })
    .await
    .expect("the campaign is inside wave 2 or later");
    let before = holder(&kv).await.expect("A holds the lease");
    assert_eq!(before.holder, "ha-a");

    let killed = Instant::now();
    a.kill().await;
    lease_taken(&kv, Duration::from_secs(30)).await;
    let took_over = killed.elapsed();
    let done_at_kill = at_kill.succeeded() + at_kill.failed();
    let progressed = wait_for(Duration::from_secs(60), || async {
        let s = api.status(&id).await.ok()?;
        (s.succeeded() + s.failed() > done_at_kill || s.state.is_terminal()).then_some(())
    })
    .await;
    let first_progress = killed.elapsed();
    println!(
        "take-over after SIGKILL of ha-a (on {server_a}) by ha-b (on {server_b}): {took_over:?} \
         (lease held by ha-b); first progress seen {first_progress:?} after the kill \
         (campaign {} at the kill)",
        summary(&at_kill)
    );
    progressed.expect("the campaign moves on after the take-over");
    assert_eq!(active(&api, Duration::from_secs(10)).await, "ha-b");

    let status = api
        .wait_terminal(&id, Duration::from_secs(100))
        .await
        .unwrap_or_else(|e| panic!("campaign ends: {e}\nB's log:\n{}", b.log_text()));
    println!(
        "campaign {} {:?} after the kill",
        summary(&status),
        killed.elapsed()
    );
    let events = support::events(&home, &id).await;
    assert!(
        pauses(&events).is_empty(),
        "the campaign paused: {:#?}\nB's log:\n{}",
        pauses(&events),
        b.log_text()
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), total, "{status:#?}");
    fleet.assert_rotated_once().await;
    let bound = lease::Config::default().ttl + lease::Config::default().poll_every + TOLERANCE;
    assert!(
        took_over <= bound,
        "take-over took {took_over:?}, more than {bound:?}"
    );

    b.stop().await;
    fleet.stop().await;
}

/// Polls the lease every 20 ms until ha-b holds it.
async fn lease_taken(kv: &async_nats::jetstream::kv::Store, within: Duration) {
    let t0 = Instant::now();
    loop {
        if holder(kv).await.is_some_and(|r| r.holder == "ha-b") {
            return;
        }
        assert!(
            t0.elapsed() < within,
            "ha-b holds no lease within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
