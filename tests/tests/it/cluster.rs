//! keywave on a 3-node JetStream cluster with every stream and bucket
//! replicated three times: losing one node mid-campaign loses nothing.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_tests::{wait_for, NatsCluster};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::Duration;

const TOTAL: usize = 200;

// Losing a node moves stream, bucket and consumer leaders: for a few seconds
// result publishes and secret-store writes fail with "no stream found". The
// workers hand such tasks back for a later try (nak with delay) instead of
// failing them, and the coordinator reads results through a replicated
// durable consumer, which survives the node loss (a new ordered consumer may
// not be creatable for a while).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_on_a_cluster_survives_losing_a_node() {
    support::init_tracing();
    let mut cluster = NatsCluster::start(3);
    let client = cluster.client().await;
    let cfg = topology::Config {
        replicas: 3,
        ..support::topology()
    };
    let creds = credentials("cl", TOTAL, &["eu", "us"], "sim-main", TargetKind::Sim);
    support::put_inventory_on(&client, cfg.clone(), &creds).await;

    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(10),
        fail_rate: 0.0,
    });
    let mut workers = Vec::new();
    for region in ["eu", "us"] {
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 64);
        let w = support::start_worker_on(
            &client,
            cfg.clone(),
            region,
            &RegionKey::generate(),
            Arc::new(targets),
            Faults::none(),
        )
        .await;
        workers.push((region, w));
    }
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
        w.store.enroll(&c.id, s).await.unwrap();
    }
    let coordinator = support::start_coordinator_on(&client, cfg.clone()).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(2));
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
    wait_for(Duration::from_secs(60), || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let s = api.status(&id).await.ok()?;
            assert!(!s.state.is_terminal(), "finished too early: {s:#?}");
            (s.current_wave >= 2).then_some(())
        }
    })
    .await
    .expect("campaign reaches wave 2");

    // Kill a node the client is not connected to: replicas and leaders move,
    // the two survivors keep a quorum.
    let connected = client.server_info().port;
    let victim = (0..cluster.len())
        .find(|i| !cluster.url(*i).ends_with(&format!(":{connected}")))
        .unwrap();
    cluster.kill_node(victim);

    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), TOTAL as u64, "{status:#?}");
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
        let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
        let rec = w.store.get(&c.id).await.unwrap().expect("record");
        assert!(sim.accepts(&c.principal, &rec.current.unwrap().secret));
        assert!(!sim.accepts(&c.principal, &rec.previous.unwrap().secret));
    }
    coordinator.stop().await;
    for (_, w) in workers {
        w.stop().await;
    }
}
