//! The coordinator dies mid-campaign: a new one picks the campaign up from
//! JetStream (snapshot, plan, replayed results) in the same wave, and every
//! credential is rotated and counted exactly once.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::wire::{CampaignState, EventKind, OnFailure, Strategy, TargetKind};
use keywave_tests::{wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::Duration;

const TOTAL: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinator_finishes_the_campaign_counting_each_credential_once() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("cr", TOTAL, &["eu", "us"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;

    // A little latency per operation so that the campaign is still running
    // when the coordinator goes away.
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(10),
        fail_rate: 0.0,
    });
    let mut workers = Vec::new();
    for region in ["eu", "us"] {
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 64);
        let key = RegionKey::generate();
        workers.push((
            region,
            support::start_worker(&client, region, &key, Arc::new(targets), Faults::none()).await,
        ));
    }
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
        w.store.enroll(&c.id, s).await.unwrap();
    }

    let first = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu", "us"]),
            Strategy::Continuity,
            "10%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();

    // Wait until the campaign is a few waves in, then stop the coordinator
    // (as SIGTERM would) while tasks are in flight.
    let at = wait_for(Duration::from_secs(60), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let s = api.status(&id).await.ok()?;
            assert!(
                !s.state.is_terminal(),
                "finished before the restart: {s:#?}"
            );
            (s.current_wave >= 2).then_some(s.current_wave)
        }
    })
    .await
    .expect("campaign reaches wave 2");
    first.stop().await;

    let second = support::start_coordinator(&client).await;
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert!(status.current_wave >= at);
    assert_eq!(status.waves.len(), 10);
    assert_eq!(status.total, TOTAL as u64);
    assert_eq!(status.succeeded(), TOTAL as u64, "{status:#?}");
    assert_eq!(status.failed(), 0);
    for w in &status.waves {
        assert_eq!(w.succeeded, w.size, "wave {} counted once: {w:#?}", w.wave);
    }

    // Rotated exactly once each, and consistent in the stores.
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
        let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
        let rec = w.store.get(&c.id).await.unwrap().expect("record");
        assert!(rec.pending.is_none(), "{}", c.id);
        assert!(sim.accepts(&c.principal, &rec.current.unwrap().secret));
        assert!(!sim.accepts(&c.principal, &rec.previous.unwrap().secret));
    }

    // The audit trail shows each wave started once, restart or not.
    let events = support::events(&client, &id).await;
    for wave in 0..10u32 {
        let started = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::WaveStarted { wave: w, .. } if w == wave))
            .count();
        assert_eq!(started, 1, "wave {wave} started {started} times");
    }

    second.stop().await;
    for (_, w) in workers {
        assert_eq!(w.stop().await.failed, 0);
    }
}
