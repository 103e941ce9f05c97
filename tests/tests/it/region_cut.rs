//! A region cut off mid-wave. Each region (eu, us, ap) is a Linux network
//! namespace holding its NATS server, its Redis and its `keywave-worker`
//! process; the home cluster and the coordinator are in the root namespace,
//! joined to the regions by gateways over a bridge (the harness's
//! `RegionNet` and `NetSupercluster`). While eu's tasks of the third wave
//! run, eu's link goes down for 20 s. With the default failure handling
//! (region pause after 10 s of silence, roll back on failure, default
//! redelivery) the coordinator pauses naming eu instead of counting eu's
//! unknown outcomes as failures, and the other regions' tasks of that wave
//! complete and are counted; once the link is back and the campaign
//! resumed, it completes, every credential is consistent (a real `AUTH`,
//! and `keywave reconcile`) and none got more than one new password. The
//! times from cut to pause and from heal to completion are printed.

use crate::chaos::{redis_admin, serve_setuser_proxy, Sets};
use crate::support::{self, credentials, in_regions, secret, spec};
use futures::StreamExt;
use keywave_cli::reconcile::{self, ReconcileOptions};
use keywave_common::admin::ReconcileStatus;
use keywave_common::api::CampaignStatus;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::presence::Presence;
use keywave_common::subjects;
use keywave_common::topology::{self, Placement};
use keywave_common::wire::{CampaignState, Credential, EventKind, OnFailure, Strategy, TargetKind};
use keywave_tests::process::Daemon;
use keywave_tests::{NetSupercluster, Netns, RedisServer, RegionNet};
use keywave_worker::store::SecretStore;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
/// Redis ACL users per region.
const PER_REGION: usize = 200;
const TOTAL: usize = PER_REGION * REGIONS.len();
/// The region cut off, and for how long: well inside the default
/// redelivery schedule (5, 5, 10, 20, 30 s; 10 deliveries).
const CUT: &str = "eu";
const CUT_FOR: Duration = Duration::from_secs(20);
/// The wave cut into: the third of the default plan `1,10%,50%` (sizes 1,
/// 60, 300, 239), once this many of eu's tasks in it have a result.
const CUT_WAVE: u32 = 2;
const CUT_AFTER: u64 = 10;
/// Bounds for correctness, not performance: the default pause comes 10 s
/// after the region's last heartbeat.
const PAUSE_WITHIN: Duration = Duration::from_secs(30);
const COMPLETE_WITHIN: Duration = Duration::from_secs(150);
const EP: &str = "redis-main";

/// The placement of `deploy/multi-region/` (each region's store in its
/// region, the home state on the home cluster at R3) with the default
/// redelivery.
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

/// A proxy listening on 127.0.0.1 inside a region's namespace in front of
/// the region's Redis, recording every password an `ACL SETUSER` sets (see
/// `chaos`). Its connections to Redis are made inside the namespace too, so
/// the region's worker keeps its target while the region is cut off, as in
/// a real region. Returns the URL for the region's worker.
async fn proxy_in(ns: Netns, redis_port: u16, sets: Sets) -> String {
    let listener = ns
        .run(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .and_then(|r| r)
        .expect("a listener in the region's namespace");
    let port = listener.local_addr().unwrap().port();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    serve_setuser_proxy(
        listener,
        move || {
            let ns = ns.clone();
            async move {
                let s = tokio::task::spawn_blocking(move || {
                    ns.run(move || std::net::TcpStream::connect(("127.0.0.1", redis_port)))
                        .and_then(|r| r)
                })
                .await
                .expect("connect task")?;
                s.set_nonblocking(true)?;
                tokio::net::TcpStream::from_std(s)
            }
        },
        sets,
    );
    format!("redis://127.0.0.1:{port}")
}

/// Credentials of `region` planned in waves `0..=wave`.
fn planned_through(s: &CampaignStatus, region: &str, wave: u32) -> u64 {
    s.waves
        .iter()
        .take(wave as usize + 1)
        .map(|w| w.regions.get(region).copied().unwrap_or(0))
        .sum()
}

/// Nothing was ever counted as failed, missing or rolled back.
fn assert_nothing_failed(s: &CampaignStatus) {
    assert!(
        !matches!(
            s.state,
            CampaignState::RollingBack | CampaignState::RolledBack | CampaignState::Aborted
        ),
        "{s:#?}"
    );
    for w in &s.waves {
        assert_eq!(w.failed, 0, "wave {}: {s:#?}", w.wave);
        assert_eq!(w.no_result, 0, "wave {}: {s:#?}", w.wave);
        assert_eq!(w.rollback_tasks, 0, "wave {}: {s:#?}", w.wave);
        assert_eq!(w.rolled_back, 0, "wave {}: {s:#?}", w.wave);
    }
}

/// Polls the status every 50 ms until `ok`, checking on every poll that
/// nothing failed; returns it, or panics after `within`.
async fn until(
    api: &ApiClient,
    id: &str,
    within: Duration,
    what: &str,
    ok: impl Fn(&CampaignStatus) -> bool,
) -> CampaignStatus {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = api.status(id).await {
            assert_nothing_failed(&s);
            if ok(&s) {
                return s;
            }
            assert!(
                t0.elapsed() < within,
                "{what}: not reached within {within:?}: {s:#?}"
            );
        } else {
            assert!(t0.elapsed() < within, "{what}: no status within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_cut_mid_wave_pauses_naming_it_and_completes_after_the_link_heals() {
    support::init_tracing();
    let began = Instant::now();
    // Declared first, dropped last: every process is gone before the
    // namespaces are deleted (drop kills any left inside them anyway).
    let net = RegionNet::create(&REGIONS);
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let mut phases = vec![("namespaces, keywave-worker built", began.elapsed())];
    let sc = NetSupercluster::start(&net);
    let home = sc.client("home").await;
    let cfg = placed_topology();
    phases.push(("supercluster", began.elapsed()));

    // Each region's Redis, in its namespace, with its ACL users.
    let redis: HashMap<&str, RedisServer> = REGIONS
        .iter()
        .map(|r| (*r, RedisServer::start_in(&net, r)))
        .collect();
    let creds: Vec<Credential> = credentials("cut", TOTAL, &REGIONS, EP, TargetKind::Redis)
        .into_iter()
        .map(|mut c| {
            c.principal = format!("kwcut-{}", c.id);
            c
        })
        .collect();
    let mut today: HashMap<String, Secret> = HashMap::new();
    for r in REGIONS {
        let mut admin = redis_admin(&redis[r].url()).await;
        let mut pipe = redis::pipe();
        for c in creds.iter().filter(|c| c.region == r) {
            let s = secret();
            pipe.cmd("ACL")
                .arg("SETUSER")
                .arg(&c.principal)
                .arg("on")
                .arg(format!(">{}", s.expose()))
                .arg("+ping")
                .ignore();
            today.insert(c.id.clone(), s);
        }
        let _: () = pipe.query_async(&mut admin).await.unwrap();
    }
    support::put_inventory_on(&home, cfg.clone(), &creds).await;
    phases.push(("Redis servers, users and inventory", began.elapsed()));

    // Each region's key and secret store (placed in the region), enrolled
    // with today's passwords.
    let js = topology::context(home.clone());
    let mut keys = HashMap::new();
    let mut stores = HashMap::new();
    for r in REGIONS {
        let key = RegionKey::generate();
        let (_, kv) = topology::ensure_region(&js, r, &cfg)
            .await
            .unwrap_or_else(|e| panic!("region {r}: {e}\n{}", sc.log_tails()));
        stores.insert(r, SecretStore::from_kv(kv, r, key.clone()));
        keys.insert(r, key);
    }
    futures::future::join_all(creds.chunks(50).map(|chunk| {
        let (stores, today) = (&stores, &today);
        async move {
            for c in chunk {
                stores[c.region.as_str()]
                    .enroll(&c.id, today[&c.id].clone())
                    .await
                    .unwrap();
            }
        }
    }))
    .await;
    phases.push(("secret stores enrolled", began.elapsed()));

    // One worker process per region, inside its namespace, connected only
    // to its region's server, reaching Redis through the recording proxy.
    // Default redelivery and liveness; a set step of 150 ms paces a wave
    // so that the cut falls inside it.
    let sets: Sets = Default::default();
    let mut workers = Vec::new();
    for r in REGIONS {
        let url = proxy_in(net.netns(r), redis[r].port(), sets.clone()).await;
        let config = net.dir().join(format!("worker-{r}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
region = "{r}"
concurrency = 4
shutdown_grace_secs = 5
[jetstream]
replicas = 3
placement = "region:{r}"
home_placement = "cluster=home"
region_replicas = 1
[[endpoint]]
name = "{EP}"
kind = "redis"
url = "{url}"
max_concurrency = 8
"#
            ),
        )
        .unwrap();
        let mut cmd = net.command(r, &bin);
        cmd.arg("--config")
            .arg(&config)
            .env("KEYWAVE_REGION_KEY", keys[r].to_hex())
            .env("KEYWAVE_NATS_URL", &sc.urls(r)[0])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            // The in-process coordinator of this test publishes unsigned
            // tasks (tests/it/signing.rs covers signatures).
            .env(keywave_worker::config::ENV_INSECURE_UNSIGNED_TASKS, "1")
            .env(keywave_worker::fault::ENV_DELAY, "set:150")
            .env_remove("KEYWAVE_FAULT_CRASH_AFTER");
        let log = net.dir().join(format!("worker-{r}.log"));
        workers.push(Daemon::spawn(format!("keywave-worker {r}"), cmd, &log));
    }
    // Every region's heartbeats reach the home cluster.
    let mut beats = home.subscribe(subjects::WORKER_PRESENCE_ALL).await.unwrap();
    let mut heard = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while heard.len() < REGIONS.len() {
            let m = beats.next().await.expect("heartbeats");
            if let Ok(p) = Presence::decode(m.subject.as_str(), &m.payload) {
                heard.insert(p.region);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("heartbeats heard only from {heard:?}"));
    drop(beats);
    phases.push(("workers heard", began.elapsed()));

    let coordinator = support::start_coordinator_on(&home, cfg.clone()).await;
    let api = ApiClient::new(home.clone()).with_timeout(Duration::from_secs(5));
    // `keywave campaign start`'s defaults: waves 1,10%,50%, budget 0.05,
    // roll back on failure, 60 s task timeout, pre-flight as configured.
    let mut sp = spec(
        in_regions(&REGIONS),
        Strategy::Continuity,
        "1,10%,50%",
        0.05,
        OnFailure::Rollback,
    );
    sp.task_timeout_ms = 60_000;
    sp.preflight = None;
    let setup = began.elapsed();
    phases.push(("coordinator ready", setup));
    println!("set-up phases (elapsed since the test began): {phases:?}");
    let started = Instant::now();
    let id = api.start(sp).await.unwrap();

    // Cut eu off while its tasks of the third wave run.
    let before = until(&api, &id, Duration::from_secs(60), "the cut wave", |s| {
        s.current_wave == CUT_WAVE
            && s.regions[CUT].succeeded >= planned_through(s, CUT, CUT_WAVE - 1) + CUT_AFTER
    })
    .await;
    net.cut(CUT);
    let cut_at = Instant::now();
    let eu_through = planned_through(&before, CUT, CUT_WAVE);
    println!(
        "cut {CUT} {:?} after the start: wave {CUT_WAVE}, {CUT} results {} of {eu_through}",
        started.elapsed(),
        before.regions[CUT].succeeded,
    );
    assert!(
        before.regions[CUT].succeeded < eu_through,
        "the cut came after eu's part of the wave: {before:#?}"
    );

    // Paused, naming eu, nothing counted as failed.
    let paused = until(&api, &id, PAUSE_WITHIN, "the pause", |s| {
        s.state == CampaignState::Paused
    })
    .await;
    let cut_to_pause = cut_at.elapsed();
    let reason = paused.reason.clone().unwrap_or_default();
    println!("paused {cut_to_pause:?} after the cut: {reason}");
    assert!(reason.contains("region eu: no live workers"), "{reason}");
    assert_eq!(paused.paused_regions, vec![CUT.to_string()], "{paused:#?}");
    assert_eq!(paused.current_wave, CUT_WAVE, "{paused:#?}");
    // Some of eu's rotations were done at its Redis when the link went
    // down, their results unable to reach the home cluster: outcomes the
    // coordinator cannot know, neither counted as failed nor rolled back.
    let eu_principals: HashSet<&str> = creds
        .iter()
        .filter(|c| c.region == CUT)
        .map(|c| c.principal.as_str())
        .collect();
    let rotated_unknown = (sets
        .lock()
        .unwrap()
        .keys()
        .filter(|p| eu_principals.contains(p.as_str()))
        .count() as u64)
        .saturating_sub(paused.regions[CUT].succeeded);
    println!("{CUT} rotations done at Redis but unknown to the coordinator at the pause: {rotated_unknown}");
    assert!(
        rotated_unknown > 0,
        "nothing was in flight in {CUT} at the cut"
    );

    // The other regions' tasks of the wave complete and are counted while
    // the campaign waits for eu.
    let others = until(&api, &id, Duration::from_secs(30), "us and ap", |s| {
        REGIONS
            .iter()
            .filter(|r| **r != CUT)
            .all(|r| s.regions[*r].succeeded == planned_through(s, r, CUT_WAVE))
    })
    .await;
    assert_eq!(others.state, CampaignState::Paused, "{others:#?}");
    assert!(others.regions[CUT].succeeded < eu_through, "{others:#?}");

    // The outage lasts its full length; nothing is decided meanwhile.
    while cut_at.elapsed() < CUT_FOR {
        let s = api.status(&id).await.unwrap();
        assert_nothing_failed(&s);
        assert_eq!(s.state, CampaignState::Paused, "{s:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    net.heal(CUT);
    let healed_at = Instant::now();
    let healed_ms = keywave_common::now_ms();

    // eu's workers are heard again; then the operator resumes.
    until(&api, &id, Duration::from_secs(60), "eu live again", |s| {
        s.regions[CUT].live_workers.unwrap_or(0) >= 1
    })
    .await;
    let heal_to_live = healed_at.elapsed();
    api.resume(&id).await.expect("resume");
    let done = until(&api, &id, COMPLETE_WITHIN, "completion", |s| {
        s.state.is_terminal()
    })
    .await;
    let heal_to_done = healed_at.elapsed();
    let campaign_time = started.elapsed();
    // When each wave after the cut finished, counted from the heal.
    let after_heal: Vec<(u32, Duration)> = done
        .waves
        .iter()
        .filter(|w| w.wave >= CUT_WAVE)
        .filter_map(|w| {
            let f = w.finished_at_ms?;
            Some((w.wave, Duration::from_millis(f.saturating_sub(healed_ms))))
        })
        .collect();
    assert_eq!(done.state, CampaignState::Completed, "{done:#?}");
    assert_eq!(done.succeeded(), TOTAL as u64, "{done:#?}");
    assert_eq!(done.failed(), 0, "{done:#?}");
    let events = support::events(&home, &id).await;
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            EventKind::StateChanged { state: CampaignState::Paused, reason }
                if reason.contains("region eu"))),
        "the pause is an event naming the region: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, EventKind::RollbackStarted { .. })),
        "nothing was rolled back: {events:#?}"
    );

    // Every credential consistent, checked with a real AUTH; one new
    // password each.
    let checks_began = Instant::now();
    let sets = sets.lock().unwrap().clone();
    let checks = futures::future::join_all(creds.chunks(TOTAL / 12).map(|chunk| {
        let (stores, today, sets, redis) = (&stores, &today, &sets, &redis);
        async move {
            let mut out = Vec::new();
            for c in chunk {
                let rec = stores[c.region.as_str()]
                    .get(&c.id)
                    .await
                    .unwrap()
                    .expect("record");
                let current = rec.current.clone().expect("current");
                let url = redis[c.region.as_str()].url();
                let new_ok = crate::faults::auth(&url, &c.principal, &current.secret).await;
                let old_refused = !crate::faults::auth(&url, &c.principal, &today[&c.id]).await;
                let set = sets.get(&c.principal).map_or(0, HashSet::len);
                out.push((
                    c.id.clone(),
                    new_ok,
                    old_refused,
                    set,
                    rec.pending.is_some(),
                ));
            }
            out
        }
    }))
    .await;
    let checked: usize = checks.iter().map(Vec::len).sum();
    let inconsistent: Vec<_> = checks
        .into_iter()
        .flatten()
        .filter(|(_, new_ok, old_refused, set, pending)| {
            !(*new_ok && *old_refused && *set == 1 && !*pending)
        })
        .collect();
    assert_eq!(checked, TOTAL);
    assert!(
        inconsistent.is_empty(),
        "(id, new works, old refused, passwords set, pending left): {inconsistent:#?}"
    );

    // `keywave reconcile`: the regions' workers compare store and target.
    let report = reconcile::reconcile(&home, &creds, &ReconcileOptions::default()).await;
    assert_eq!(report.total, TOTAL, "{:?}", report.summary);
    assert_eq!(
        report.count(ReconcileStatus::Consistent),
        TOTAL,
        "{:?}",
        report.summary
    );

    println!(
        "region cut figures: {} regions x {PER_REGION} Redis ACL users, {CUT} cut for {CUT_FOR:?} \
         in wave {CUT_WAVE}; cut -> pause {cut_to_pause:?}; heal -> {CUT} live again \
         {heal_to_live:?}; heal -> campaign completed {heal_to_done:?} (resumed when live; \
         waves finished after the heal (wave, time): {after_heal:?}); \
         set-up {setup:?}, campaign {campaign_time:?}, checks and reconcile {:?}, whole test {:?}; \
         credentials checked {checked}, reconcile {:?}",
        REGIONS.len(),
        checks_began.elapsed(),
        began.elapsed(),
        report.summary,
    );
    coordinator.stop().await;
    drop(workers);
}
