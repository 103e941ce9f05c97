//! Chaos at the default settings: the production redelivery schedule
//! (`topology::Config::default()`, nothing shortened), a 60 s task timeout
//! (the README's `--task-timeout 60s`), three `keywave-worker` processes of
//! one region on real Redis ACL users. The same 1,000-credential campaign
//! (waves `1,10%,25%,50%,100%`, 10 s bake) runs twice: undisturbed, then
//! with a worker process SIGKILLed and started again every 2 s for 60 s.
//! Both complete with no failure and no task without result, every
//! credential is consistent and was set once, and no wave of the disturbed
//! run takes more than 10 s longer than the same wave undisturbed. Both sets
//! of wave durations are printed.

use crate::chaos::{redelivered_finishes, redis_admin, setuser_proxy, Sets, Slot};
use crate::support::{self, credentials, secret, spec};
use keywave_common::api::CampaignStatus;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::topology;
use keywave_common::wire::{CampaignState, Credential, OnFailure, Selector, Strategy, TargetKind};
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::store::SecretStore;
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOTAL: usize = 1_000;
const REGION: &str = "eu";
const WORKERS: usize = 3;
const WAVES: &str = "1,10%,25%,50%,100%";
const BAKE: Duration = Duration::from_secs(10);
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
const KILL_EVERY: Duration = Duration::from_secs(2);
const KILLING_FOR: Duration = Duration::from_secs(60);
/// How much longer a wave may take when workers are killed during it.
const SLACK: Duration = Duration::from_secs(10);
/// Each campaign must be over by then.
const CAMPAIGN_BOUND: Duration = Duration::from_secs(100);

/// `TOTAL` Redis ACL users tagged `run=<run>`, with today's passwords, in
/// the inventory and enrolled in the region's store.
async fn fleet(
    run: &str,
    redis_url: &str,
    client: &async_nats::Client,
    store: &SecretStore,
) -> (Vec<Credential>, HashMap<String, Secret>) {
    let creds: Vec<Credential> =
        credentials(run, TOTAL, &[REGION], "redis-main", TargetKind::Redis)
            .into_iter()
            .map(|mut c| {
                c.principal = format!("kwd-{}", c.id);
                c.tags = vec![format!("run={run}")];
                c
            })
            .collect();
    let mut today = HashMap::new();
    let mut admin = redis_admin(redis_url).await;
    for chunk in creds.chunks(500) {
        let mut pipe = redis::pipe();
        for c in chunk {
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
    support::put_inventory_on(client, topology::Config::default(), &creds).await;
    futures::future::join_all(creds.chunks(25).map(|chunk| {
        let today = &today;
        async move {
            for c in chunk {
                store.enroll(&c.id, today[&c.id].clone()).await.unwrap();
            }
        }
    }))
    .await;
    (creds, today)
}

/// Starts the campaign over `run`'s credentials; while it runs, every
/// `KILL_EVERY` for `killing_for` a random worker process is SIGKILLed and
/// started again. Returns the final status and the number of kills.
async fn campaign(
    api: &ApiClient,
    run: &str,
    slots: &mut [Slot],
    bin: &Path,
    nats: &str,
    killing_for: Duration,
) -> (CampaignStatus, usize) {
    let mut sp = spec(
        Selector {
            tags: vec![format!("run={run}")],
            ..Default::default()
        },
        Strategy::Continuity,
        WAVES,
        0.0,
        OnFailure::Rollback,
    );
    sp.name = format!("chaos at default settings: {run}");
    sp.bake_ms = BAKE.as_millis() as u64;
    sp.task_timeout_ms = TASK_TIMEOUT.as_millis() as u64;
    let started = Instant::now();
    let id = api.start(sp).await.unwrap();
    let mut kills = 0usize;
    let mut next_kill = started + KILL_EVERY;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(s) = api.status(&id).await {
            if s.state.is_terminal() || s.state == CampaignState::Paused {
                return (s, kills);
            }
        }
        assert!(
            started.elapsed() < CAMPAIGN_BOUND,
            "campaign {run} not done after {CAMPAIGN_BOUND:?}"
        );
        if started.elapsed() < killing_for && Instant::now() >= next_kill {
            next_kill += KILL_EVERY;
            let victim = rand::thread_rng().gen_range(0..slots.len());
            let slot = &mut slots[victim];
            if let Some(mut d) = slot.daemon.take() {
                d.kill();
            }
            kills += 1;
            slot.spawn(bin, nats);
        }
    }
}

/// Each wave's duration (start to decision), in seconds.
fn wave_secs(s: &CampaignStatus) -> Vec<f64> {
    s.waves
        .iter()
        .map(|w| match (w.started_at_ms, w.finished_at_ms) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64 / 1000.0,
            _ => f64::NAN,
        })
        .collect()
}

/// (id, new secret works, old refused, new passwords set, staged left) of
/// every credential that is not consistent.
async fn inconsistent(
    creds: &[Credential],
    today: &HashMap<String, Secret>,
    store: &SecretStore,
    sets: &HashMap<String, HashSet<String>>,
    url: &str,
) -> Vec<(String, bool, bool, usize, bool)> {
    let checks = futures::future::join_all(creds.chunks(TOTAL / 8).map(|chunk| async move {
        let mut out = Vec::new();
        for c in chunk {
            let rec = store.get(&c.id).await.unwrap().expect("record");
            let current = rec.current.clone().expect("current");
            let new_ok = crate::faults::auth(url, &c.principal, &current.secret).await;
            let old_refused = !crate::faults::auth(url, &c.principal, &today[&c.id]).await;
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
    }))
    .await;
    checks
        .into_iter()
        .flatten()
        .filter(|(_, new_ok, old_refused, set, pending)| {
            !(*new_ok && *old_refused && *set == 1 && !*pending)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_default_redelivery_1000_redis_users_worker_killed_every_2s_costs_under_10s_a_wave() {
    support::init_tracing();
    let test_started = Instant::now();
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let scratch = tempfile::Builder::new()
        .prefix("keywave-chaos-default-")
        .tempdir()
        .unwrap();

    // The production topology, as `keywave-coordinator --regions eu`
    // creates it: nothing about redelivery is shortened.
    let cfg = topology::Config::default();
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &cfg).await.unwrap();
    let (consumer, kv) = topology::ensure_region(&js, REGION, &cfg).await.unwrap();
    let timing = consumer.cached_info().config.clone();
    assert_eq!(timing.backoff, topology::Config::default().task_backoff);
    assert_eq!(timing.max_deliver, topology::DEFAULT_TASK_MAX_DELIVER);
    let key = RegionKey::generate();
    let store = SecretStore::from_kv(kv, REGION, key.clone());

    let redis_url = redis.url();
    let ((calm_creds, calm_today), (storm_creds, storm_today)) = tokio::join!(
        fleet("calm", &redis_url, &client, &store),
        fleet("storm", &redis_url, &client, &store)
    );

    // Workers reach Redis through a proxy that records every ACL SETUSER.
    let sets: Sets = Arc::default();
    let proxied = setuser_proxy(redis.port(), sets.clone()).await;
    let logs = scratch.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let config = scratch.path().join("worker.toml");
    // No [jetstream] section: the default redelivery schedule.
    std::fs::write(
        &config,
        format!(
            r#"
region = "{REGION}"
concurrency = 2
shutdown_grace_secs = 5
[[endpoint]]
name = "redis-main"
kind = "redis"
url = "{proxied}"
max_concurrency = 32
"#
        ),
    )
    .unwrap();
    let mut slots: Vec<Slot> = (0..WORKERS)
        .map(|n| Slot {
            region: REGION,
            n,
            config: config.clone(),
            key: key.to_hex(),
            logs: logs.clone(),
            restarts: 0,
            daemon: None,
        })
        .collect();
    for slot in &mut slots {
        slot.spawn(&bin, &server.url());
    }

    let setup = test_started.elapsed();
    // The coordinator knows the same default topology (its wave deadlines
    // include the default redelivery allowance).
    let coordinator = support::start_coordinator_on(&client, topology::Config::default()).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(2));

    let (calm, _) = campaign(
        &api,
        "calm",
        &mut slots,
        &bin,
        &server.url(),
        Duration::ZERO,
    )
    .await;
    let redelivered_calm = redelivered_finishes(&logs);
    let (storm, kills) =
        campaign(&api, "storm", &mut slots, &bin, &server.url(), KILLING_FOR).await;
    let redelivered = redelivered_finishes(&logs) - redelivered_calm;
    for slot in &mut slots {
        if let Some(mut d) = slot.daemon.take() {
            d.kill();
        }
    }

    let campaigns = test_started.elapsed() - setup;
    let sets = sets.lock().unwrap().clone();
    let calm_bad = inconsistent(&calm_creds, &calm_today, &store, &sets, &redis.url()).await;
    let storm_bad = inconsistent(&storm_creds, &storm_today, &store, &sets, &redis.url()).await;
    let (calm_secs, storm_secs) = (wave_secs(&calm), wave_secs(&storm));
    let sizes: Vec<u64> = storm.waves.iter().map(|w| w.size).collect();
    let total = |s: &CampaignStatus| {
        s.finished_at_ms
            .unwrap_or(0)
            .saturating_sub(s.created_at_ms) as f64
            / 1000.0
    };
    println!(
        "chaos_default figures: credentials {TOTAL}, worker processes {WORKERS}, ack wait {:?}, \
         backoff {:?}, max deliver {}, task timeout {TASK_TIMEOUT:?}, waves {WAVES} (sizes {sizes:?}), \
         bake {BAKE:?}\n  undisturbed wave durations (s): {calm_secs:?}, campaign {:.1} s\n  \
         with kills wave durations (s):  {storm_secs:?}, campaign {:.1} s\n  kills {kills}, tasks \
         finished after a redelivery {redelivered} (undisturbed run: {redelivered_calm}), \
         inconsistencies {} / {}, test time {:?} (set-up {setup:?}, campaigns {campaigns:?})",
        timing.ack_wait,
        timing.backoff,
        timing.max_deliver,
        total(&calm),
        total(&storm),
        calm_bad.len(),
        storm_bad.len(),
        test_started.elapsed(),
    );
    for (run, s) in [("undisturbed", &calm), ("with kills", &storm)] {
        assert_eq!(s.state, CampaignState::Completed, "{run}: {s:#?}");
        assert_eq!(s.succeeded(), TOTAL as u64, "{run}: {s:#?}");
        assert!(
            s.waves.iter().all(|w| w.failed == 0 && w.no_result == 0),
            "{run}: {s:#?}"
        );
    }
    assert!(
        calm_bad.is_empty() && storm_bad.is_empty(),
        "(id, new works, old refused, passwords set, pending left): {calm_bad:#?} {storm_bad:#?}"
    );
    for (w, (calm_s, storm_s)) in calm_secs.iter().zip(&storm_secs).enumerate() {
        assert!(
            *storm_s <= calm_s + SLACK.as_secs_f64(),
            "wave {w} took {storm_s} s with kills, {calm_s} s undisturbed"
        );
    }
    assert!(kills >= 20, "the chaos actually happened ({kills} kills)");
    coordinator.stop().await;
}

/// A region consumer created with the 30 s schedule of older releases takes
/// the default one when the topology is ensured (what `keywave-coordinator
/// --regions` does at start), keeping its pending task; binding to it (what
/// a least-privilege worker does) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_region_consumer_takes_the_default_redelivery_schedule() {
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let old = topology::Config {
        task_backoff: [30, 60, 120, 300]
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        task_max_deliver: 5,
        ..Default::default()
    };
    topology::ensure_core(&js, &old).await.unwrap();
    let (c, _) = topology::ensure_region(&js, "eu", &old).await.unwrap();
    assert_eq!(c.cached_info().config.ack_wait, Duration::from_secs(30));
    js.publish("keywave.task.eu.c-old", "pending".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // A worker binds: the consumer stays as it is.
    let (c, _) = topology::bind_region(&js, "eu").await.unwrap();
    assert_eq!(c.cached_info().config.ack_wait, Duration::from_secs(30));

    let new = topology::Config::default();
    let (mut c, _) = topology::ensure_region(&js, "eu", &new).await.unwrap();
    let info = c.info().await.unwrap().clone();
    assert_eq!(info.config.ack_wait, new.ack_wait());
    assert_eq!(info.config.backoff, new.task_backoff);
    assert_eq!(info.config.max_deliver, new.task_max_deliver);
    assert_eq!(info.num_pending, 1, "the pending task is kept: {info:#?}");
    // Ensuring it again is a no-op.
    let (c, _) = topology::ensure_region(&js, "eu", &new).await.unwrap();
    assert_eq!(c.cached_info().config.backoff, new.task_backoff);
}
