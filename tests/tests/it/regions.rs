//! Regions are watched: a campaign over a region that no worker serves
//! pauses with a reason naming the region (its tasks wait in the queue and
//! never count as `no_result`), and completes once a worker is started there
//! and the campaign resumed; a region whose only worker stops mid-campaign
//! pauses the same way. Default liveness settings (heartbeats every 2 s, a
//! pause after 10 s of silence).

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::api::CampaignStatus;
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::NatsServer;
use keywave_worker::fault::Faults;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The requirement: paused within 15 s of the tasks being published (or of
/// the last worker going silent).
const PAUSE_WITHIN: Duration = Duration::from_secs(15);

struct Region {
    sim: Arc<SimTarget>,
    key: RegionKey,
}

impl Region {
    fn new() -> Region {
        Region {
            sim: SimTarget::new(SimOptions::default()),
            key: RegionKey::generate(),
        }
    }

    fn targets(&self) -> Arc<Targets> {
        let mut t = Targets::new();
        t.insert("sim-main", self.sim.clone(), 16);
        Arc::new(t)
    }

    async fn worker(&self, client: &async_nats::Client, name: &str) -> support::RunningWorker {
        support::start_worker(client, name, &self.key, self.targets(), Faults::none()).await
    }

    /// The region's secret store without a worker (the coordinator's
    /// topology for the region: consumer and bucket).
    async fn store(&self, client: &async_nats::Client, name: &str) -> SecretStore {
        let js = topology::context(client.clone());
        topology::ensure_core(&js, &support::topology())
            .await
            .unwrap();
        let (_, kv) = topology::ensure_region(&js, name, &support::topology())
            .await
            .unwrap();
        SecretStore::from_kv(kv, name, self.key.clone())
    }
}

/// Seeds today's secret of each credential at its target and in its store.
async fn enroll(creds: &[Credential], regions: &HashMap<&str, (&Region, SecretStore)>) {
    for c in creds {
        let (region, store) = &regions[c.region.as_str()];
        let s = secret();
        region.sim.seed(&c.principal, &s);
        store.enroll(&c.id, s).await.unwrap();
    }
}

/// Polls the status until `ok`, at most `within`; returns it and the time taken.
async fn wait_status(
    api: &ApiClient,
    id: &str,
    within: Duration,
    ok: impl Fn(&CampaignStatus) -> bool,
) -> (CampaignStatus, Duration) {
    let t0 = Instant::now();
    loop {
        let s = api.status(id).await.unwrap();
        if ok(&s) {
            return (s, t0.elapsed());
        }
        assert!(
            t0.elapsed() < within,
            "not reached within {within:?}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resumes; a campaign that already finished (its last wave's results came
/// while it was paused) is fine too.
async fn resume(api: &ApiClient, id: &str) {
    match api.resume(id).await {
        Ok(_) => {}
        Err(ClientError::Conflict(_)) => {}
        Err(e) => panic!("resume: {e}"),
    }
}

fn assert_clean(s: &CampaignStatus) {
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(s.succeeded(), s.total, "{s:#?}");
    assert_eq!(s.failed(), 0, "{s:#?}");
    assert!(s.waves.iter().all(|w| w.no_result == 0), "{s:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_workers_pauses_naming_it_and_completes_once_served() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("rg", 6, &["eu", "ap"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let (eu, ap) = (Region::new(), Region::new());
    let eu_worker = eu.worker(&client, "eu").await;
    let ap_store = ap.store(&client, "ap").await;
    let stores = HashMap::from([
        ("eu", (&eu, eu_worker.store.clone())),
        ("ap", (&ap, ap_store)),
    ]);
    enroll(&creds, &stores).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    // A short task timeout: had the paused wave's clock kept running, its
    // ap tasks would be `no_result` long before the worker comes.
    let mut s = spec(
        in_regions(&["eu", "ap"]),
        Strategy::Continuity,
        "100%",
        0.0,
        OnFailure::Rollback,
    );
    s.task_timeout_ms = 5_000;
    let started = Instant::now();
    let id = api.start(s).await.unwrap();
    let (paused, took) = wait_status(&api, &id, Duration::from_secs(60), |s| {
        s.state == CampaignState::Paused
    })
    .await;
    println!("region ap without workers: paused {took:?} after the start");
    let reason = paused.reason.clone().unwrap_or_default();
    println!("pause reason: {reason}");
    assert!(
        took <= PAUSE_WITHIN,
        "paused after {took:?}, over {PAUSE_WITHIN:?}"
    );
    assert!(
        reason.contains("region ap: no live workers for"),
        "{reason}"
    );
    assert!(reason.contains("3 tasks queued"), "{reason}");
    assert_eq!(paused.paused_regions, vec!["ap".to_string()]);
    assert_eq!(paused.regions["ap"].live_workers, Some(0));
    assert!(
        paused.regions["eu"].live_workers.unwrap_or(0) >= 1,
        "{paused:#?}"
    );

    // The eu part is done; the ap tasks wait in ap's queue, not pulled by
    // anybody (queued, not in flight), and twice the task timeout later
    // nothing counts as failed.
    let (s, _) = wait_status(&api, &id, Duration::from_secs(20), |s| {
        s.regions["eu"].succeeded == 3 && s.regions["ap"].queued == Some(3)
    })
    .await;
    assert_eq!(s.regions["ap"].in_flight, Some(0), "{s:#?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let s = api.status(&id).await.unwrap();
    assert_eq!(s.state, CampaignState::Paused, "{s:#?}");
    assert_eq!(s.waves[0].no_result, 0, "{s:#?}");
    assert_eq!(s.waves[0].failed, 0, "{s:#?}");
    assert!(s.waves[0].decision.is_none(), "{s:#?}");
    let events = support::events(&client, &id).await;
    assert!(
        events.iter().any(|e| matches!(&e.kind,
            keywave_common::wire::EventKind::StateChanged { state: CampaignState::Paused, reason }
                if reason.contains("region ap"))),
        "the pause is an event naming the region: {events:#?}"
    );

    // A worker for ap, then resume: the queued tasks run and the campaign
    // completes without a failure.
    let ap_worker = ap.worker(&client, "ap").await;
    wait_status(&api, &id, Duration::from_secs(20), |s| {
        s.regions["ap"].live_workers.unwrap_or(0) >= 1 || s.state.is_terminal()
    })
    .await;
    resume(&api, &id).await;
    let done = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_clean(&done);
    println!("completed {:?} after the start", started.elapsed());
    coordinator.stop().await;
    ap_worker.stop().await;
    eu_worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_only_worker_stops_mid_campaign_pauses_naming_it() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("rs", 8, &["eu", "us"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let (eu, us) = (Region::new(), Region::new());
    let eu_worker = eu.worker(&client, "eu").await;
    let us_worker = us.worker(&client, "us").await;
    let stores = HashMap::from([
        ("eu", (&eu, eu_worker.store.clone())),
        ("us", (&us, us_worker.store.clone())),
    ]);
    enroll(&creds, &stores).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    // Canary of 1, then the rest after a bake; us's only worker stops
    // during the bake.
    let mut s = spec(
        in_regions(&["eu", "us"]),
        Strategy::Continuity,
        "1,100%",
        0.0,
        OnFailure::Rollback,
    );
    s.bake_ms = 3_000;
    s.task_timeout_ms = 5_000;
    let id = api.start(s).await.unwrap();
    wait_status(&api, &id, Duration::from_secs(30), |s| {
        s.state == CampaignState::Baking
    })
    .await;
    us_worker.stop().await;
    let stopped = Instant::now();
    let (paused, took) = wait_status(&api, &id, Duration::from_secs(60), |s| {
        s.state == CampaignState::Paused
    })
    .await;
    let reason = paused.reason.clone().unwrap_or_default();
    println!("us worker stopped: paused {took:?} later; reason: {reason}");
    assert!(
        took <= PAUSE_WITHIN,
        "paused after {took:?}, over {PAUSE_WITHIN:?}"
    );
    assert!(
        reason.contains("region us: no live workers for"),
        "{reason}"
    );
    assert_eq!(paused.paused_regions, vec!["us".to_string()]);
    assert!(paused.waves.iter().all(|w| w.no_result == 0), "{paused:#?}");

    // Back, resumed: done, nothing failed.
    let us_worker = us.worker(&client, "us").await;
    wait_status(&api, &id, Duration::from_secs(20), |s| {
        s.regions["us"].live_workers.unwrap_or(0) >= 1 || s.state.is_terminal()
    })
    .await;
    resume(&api, &id).await;
    let done = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_clean(&done);
    println!("completed {:?} after the worker stopped", stopped.elapsed());
    coordinator.stop().await;
    us_worker.stop().await;
    eu_worker.stop().await;
}
