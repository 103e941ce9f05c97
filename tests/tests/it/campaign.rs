//! A whole campaign against the simulated target: planning into waves,
//! publishing per region, workers rotating, the coordinator counting results
//! and moving from wave to wave on acknowledgements.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_tests::NatsServer;
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_campaign_of_1000_across_3_regions_rotates_every_credential() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;

    let creds = credentials("sim", 1000, &REGIONS, "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;

    // One simulated system and one worker per region; every credential starts
    // with a secret that works today and is enrolled in its region's store.
    let mut sims = HashMap::new();
    let mut workers = HashMap::new();
    for region in REGIONS {
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 64);
        let key = keywave_common::crypto::RegionKey::generate();
        let w =
            support::start_worker(&client, region, &key, Arc::new(targets), Faults::none()).await;
        sims.insert(region, sim);
        workers.insert(region, w);
    }
    let mut initial = HashMap::new();
    for c in &creds {
        let s = secret();
        sims[c.region.as_str()].seed(&c.principal, &s);
        workers[c.region.as_str()]
            .store
            .enroll(&c.id, s.clone())
            .await
            .unwrap();
        initial.insert(c.id.clone(), s);
    }

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "1,10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();

    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.total, 1000);
    assert_eq!(
        status.waves.iter().map(|w| w.size).collect::<Vec<_>>(),
        vec![1, 100, 500, 399],
        "waves follow the plan 1,10%,50% (the last entry repeats)"
    );
    assert_eq!(status.succeeded(), 1000);
    assert_eq!(status.failed(), 0);

    // The proof: in every region, the store's CURRENT secret authenticates at
    // the target, the PREVIOUS one (today's secret) is rejected, nothing is
    // left PENDING, and each credential was set exactly once.
    for c in &creds {
        let sim = &sims[c.region.as_str()];
        let rec = workers[c.region.as_str()]
            .store
            .get(&c.id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} has no record", c.id));
        let current = rec.current.as_ref().expect("current");
        let previous = rec.previous.as_ref().expect("previous");
        assert!(rec.pending.is_none(), "{} left a pending secret", c.id);
        assert!(sim.accepts(&c.principal, &current.secret), "{}", c.id);
        assert!(!sim.accepts(&c.principal, &previous.secret), "{}", c.id);
        assert!(
            previous.secret == initial[&c.id],
            "{}: PREVIOUS is the enrolled secret",
            c.id
        );
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }

    coordinator.stop().await;
    for (_, w) in workers {
        let stats = w.stop().await;
        assert_eq!(stats.failed, 0);
    }
}

/// A wave that drains slower than its task timeout is not cut short: each
/// task's timeout counts from the moment a worker receives it, and the
/// wave's deadline moves with its results. Twelve credentials on a slow
/// target (100 ms per operation) served by one worker that runs one task at
/// a time take several times the 2 s task timeout to drain, and every one of
/// them rotates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_slower_than_its_task_timeout_still_completes() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("slow", 12, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;

    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(100),
        ..SimOptions::default()
    });
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 64);
    let key = keywave_common::crypto::RegionKey::generate();
    let opts = keywave_worker::WorkerOptions {
        region: "eu".into(),
        worker_id: keywave_tests::unique("worker-eu"),
        concurrency: 1,
        topology: support::topology(),
        ..Default::default()
    };
    let worker = support::start_worker_with(&client, opts, &key, Arc::new(targets)).await;
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s).await.unwrap();
    }

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "100%",
        0.0,
        OnFailure::Pause,
    );
    s.task_timeout_ms = 2_000;
    let started = std::time::Instant::now();
    let id = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 12);
    assert!(
        took > Duration::from_secs(2),
        "the wave must have outlasted one task timeout for this test to mean anything ({took:?})"
    );
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }
    coordinator.stop().await;
    worker.stop().await;
}

/// Waves after an idle pause (a bake) start at once: the workers' pull
/// survives the quiet period and each wave's tasks are picked up within
/// moments of being published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_after_a_bake_are_picked_up_at_once() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("bake", 3, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 64);
    let key = keywave_common::crypto::RegionKey::generate();
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s).await.unwrap();
    }
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1",
        0.0,
        OnFailure::Pause,
    );
    s.bake_ms = 3_000;
    let id = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    for w in &status.waves {
        let took = w.finished_at_ms.unwrap() - w.started_at_ms.unwrap();
        assert!(took < 2_000, "wave {} took {took} ms: {status:#?}", w.wave);
    }
    coordinator.stop().await;
    worker.stop().await;
}
