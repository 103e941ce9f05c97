//! A whole campaign against the simulated target: planning into waves,
//! publishing per region, workers rotating, the coordinator counting results
//! and moving from wave to wave on acknowledgements.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_coordinator::client::ApiClient;
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
