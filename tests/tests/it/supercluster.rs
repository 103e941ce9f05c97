//! keywave on the multi-region supercluster of `deploy/multi-region/` (a
//! home cluster of 3 servers, one server per region eu, us, ap, joined by
//! gateways): with placement, each region's secret store lives only on its
//! region's servers and the home state on the home cluster at R3; a
//! placement no server satisfies is refused with an error naming the region
//! and the tags; a campaign over the three regions, each region's worker
//! connected to its own region's server, completes.

use crate::support::{self, credentials, in_regions, secret, spec};
use async_nats::jetstream::stream::Info;
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::topology::{self, Placement};
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_tests::NatsSupercluster;
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::Duration;

const REGIONS: [&str; 3] = ["eu", "us", "ap"];
const TOTAL: usize = 60;

fn placed_topology() -> topology::Config {
    topology::Config {
        replicas: 3,
        region_replicas: Some(1),
        home_placement: Some(Placement::parse("cluster=home").unwrap()),
        region_placement: topology::parse_region_placements(
            "eu=region:eu,us=region:us,ap=region:ap",
        )
        .unwrap(),
        ..support::topology()
    }
}

async fn info(js: &async_nats::jetstream::Context, stream: &str) -> Info {
    js.get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("info of {stream}: {e}"))
        .clone()
}

/// The servers holding `info`'s stream: its leader and its replicas.
fn servers_of(info: &Info) -> Vec<String> {
    let c = info.cluster.as_ref().expect("cluster info");
    let mut servers: Vec<String> = c.leader.iter().cloned().collect();
    servers.extend(c.replicas.iter().map(|r| r.name.clone()));
    servers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_keeps_secrets_in_their_region_and_state_at_home() {
    support::init_tracing();
    let sc = NatsSupercluster::start();
    let home = sc.client("home").await;
    let js = topology::context(home.clone());
    let cfg = placed_topology();

    // What `keywave-coordinator --regions eu,us,ap` creates at start-up;
    // twice, as a second coordinator would: creation is idempotent.
    for _ in 0..2 {
        topology::ensure_core(&js, &cfg)
            .await
            .expect("core topology");
        topology::leases(&js, &cfg).await.expect("lease bucket");
        for r in REGIONS {
            topology::ensure_region(&js, r, &cfg)
                .await
                .unwrap_or_else(|e| panic!("region {r}: {e}\n{}", sc.log_tails()));
        }
    }

    for r in REGIONS {
        let i = info(&js, &format!("KV_{}", topology::kv_secrets(r))).await;
        let c = i.cluster.as_ref().expect("cluster info");
        println!(
            "secret store of {r}: cluster {:?}, servers {:?}",
            c.name,
            servers_of(&i)
        );
        assert_eq!(c.name.as_deref(), Some(r), "{i:#?}");
        assert_eq!(servers_of(&i), sc.server_names(r), "{i:#?}");
        assert_eq!(i.config.num_replicas, 1);
    }
    let home_servers = sc.server_names("home");
    for stream in [
        topology::STREAM_TASKS.to_string(),
        topology::STREAM_RESULTS.into(),
        topology::STREAM_EVENTS.into(),
        topology::STREAM_AUDIT.into(),
        topology::STREAM_DEADLETTER.into(),
        topology::STREAM_ADVISORIES.into(),
        topology::STREAM_ATTEST.into(),
        format!("KV_{}", topology::KV_INVENTORY),
        format!("KV_{}", topology::KV_CAMPAIGNS),
        format!("KV_{}", topology::KV_LEASES),
    ] {
        let i = info(&js, &stream).await;
        let c = i.cluster.as_ref().expect("cluster info");
        let mut servers = servers_of(&i);
        servers.sort();
        println!("{stream}: cluster {:?}, servers {servers:?}", c.name);
        assert_eq!(c.name.as_deref(), Some("home"), "{stream}: {i:#?}");
        assert_eq!(i.config.num_replicas, 3, "{stream}");
        assert_eq!(servers, home_servers, "{stream} at R3 on the home cluster");
    }

    // A region whose placement no server satisfies: a clear error naming
    // the region and the tag, and nothing created.
    let mut bad = cfg.clone();
    bad.region_placement
        .insert("mars".into(), Placement::parse("region:mars").unwrap());
    let e = topology::ensure_region(&js, "mars", &bad)
        .await
        .expect_err("no server is tagged region:mars");
    println!("unsatisfiable placement: {e}");
    assert!(e.detail.contains("region mars"), "{e}");
    assert!(e.detail.contains("region:mars"), "{e}");
    assert!(js.get_stream("KV_keywave-secrets-mars").await.is_err());

    // A campaign over the three regions: each region's worker connected to
    // its own region's server, the coordinator to the home cluster.
    let creds = credentials("sc", TOTAL, &REGIONS, "sim-main", TargetKind::Sim);
    support::put_inventory_on(&home, cfg.clone(), &creds).await;
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(5),
        fail_rate: 0.0,
    });
    let mut workers = Vec::new();
    for r in REGIONS {
        let client = sc.client(r).await;
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 16);
        let w = support::start_worker_on(
            &client,
            cfg.clone(),
            r,
            &RegionKey::generate(),
            Arc::new(targets),
            Faults::none(),
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
    let coordinator = support::start_coordinator_on(&home, cfg.clone()).await;
    let api = ApiClient::new(home.clone()).with_timeout(Duration::from_secs(5));
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    println!(
        "campaign of {TOTAL} credentials over {REGIONS:?}: {:?} in {:?}",
        status.state,
        started.elapsed()
    );
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), TOTAL as u64, "{status:#?}");
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
        let (_, w) = workers.iter().find(|(r, _)| *r == c.region).unwrap();
        let rec = w.store.get(&c.id).await.unwrap().expect("record");
        assert!(sim.accepts(&c.principal, &rec.current.unwrap().secret));
    }
    // Each region's records are in its own store only.
    for (r, w) in &workers {
        for c in creds.iter().filter(|c| c.region != *r).take(3) {
            assert!(
                w.store.get(&c.id).await.unwrap().is_none(),
                "{} in {r}",
                c.id
            );
        }
    }
    coordinator.stop().await;
    for (_, w) in workers {
        w.stop().await;
    }
}
