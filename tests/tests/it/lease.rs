//! Coordinator high availability: two coordinators, one lease. The active one
//! is killed (no handover) and the standby finishes the campaign within a
//! bounded time; the killed one, restarted, stands by and does not act; a
//! graceful stop hands the lease over at once; a leader whose lease was taken
//! while it was away is fenced: it publishes and saves nothing more.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, EventKind, OnFailure, Strategy, TargetKind};
use keywave_coordinator::engine::fault::Faults as CoordinatorFaults;
use keywave_coordinator::lease::{self, LeaseRecord, LEASE_KEY};
use keywave_coordinator::{Coordinator, CoordinatorOptions};
use keywave_devkit::fleet::CoordinatorTask;
use keywave_tests::{unique, wait_for, wait_until, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Short lease timings, so that a fail-over takes seconds (yet long enough
/// that a busy test machine does not make a healthy holder miss renewals).
pub fn quick_lease() -> lease::Config {
    lease::Config {
        ttl: Duration::from_secs(3),
        renew_every: Duration::from_millis(500),
        poll_every: Duration::from_millis(100),
    }
}

/// A coordinator of the in-process fleet with its kill switch (SIGKILL).
pub struct Node {
    pub active_at_start: bool,
    pub kill: CancellationToken,
    task: CoordinatorTask,
}

impl Node {
    pub async fn start(client: &async_nats::Client, id: &str, faults: CoordinatorFaults) -> Node {
        let coordinator = Coordinator::start(
            client.clone(),
            CoordinatorOptions {
                topology: support::topology(),
                coordinator_id: id.to_string(),
                progress_interval: Duration::from_millis(200),
                lease: quick_lease(),
                faults,
                signer: None,
                ..Default::default()
            },
        )
        .await
        .expect("coordinator starts");
        Node {
            active_at_start: coordinator.is_active(),
            kill: coordinator.kill_switch(),
            task: CoordinatorTask::spawn(coordinator),
        }
    }

    /// As SIGKILL: no snapshot saved, lease not released.
    pub async fn kill(self) {
        self.kill.cancel();
        self.join().await;
    }

    /// As SIGTERM: snapshots saved, lease handed over.
    pub async fn stop(self) {
        self.task
            .stop(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("coordinator returns: {e}"));
    }

    /// Waits for `run` to return (after a kill or an injected crash).
    pub async fn join(self) {
        self.task
            .join(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("coordinator returns: {e}"));
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The id of the active coordinator, once one answers a ping as active
/// (standbys answer pings too).
async fn active(api: &ApiClient, within: Duration) -> String {
    wait_for(within, || async {
        api.ping()
            .await
            .ok()
            .filter(|p| p.role.as_deref() == Some(keywave_common::api::ROLE_ACTIVE))
            .map(|p| p.coordinator_id)
    })
    .await
    .expect("a coordinator answers as active")
}

struct Fleet {
    sim: Arc<SimTarget>,
    workers: Vec<support::RunningWorker>,
    creds: Vec<keywave_common::wire::Credential>,
}

async fn fleet(client: &async_nats::Client, prefix: &str, n: usize) -> Fleet {
    let creds = credentials(prefix, n, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(client, &creds).await;
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(5),
        fail_rate: 0.0,
    });
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 32);
    let w = support::start_worker(
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
        w.store.enroll(&c.id, s).await.unwrap();
    }
    Fleet {
        sim,
        workers: vec![w],
        creds,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_from_a_killed_coordinator_and_the_old_one_stands_by() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let fl = fleet(&client, "ha", 150).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_millis(500));

    let a = Node::start(&client, "coord-a", CoordinatorFaults::none()).await;
    assert!(a.active_at_start);
    let b = Node::start(&client, "coord-b", CoordinatorFaults::none()).await;
    assert!(!b.active_at_start, "one lease, one active coordinator");
    assert_eq!(active(&api, Duration::from_secs(10)).await, "coord-a");

    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "10%",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 300;
    let id = api.start(sp).await.unwrap();
    wait_until(Duration::from_secs(60), || {
        let (api, id) = (api.clone(), id.clone());
        async move { api.status(&id).await.is_ok_and(|s| s.current_wave >= 2) }
    })
    .await
    .expect("the campaign reaches wave 2");

    // A dies without a word: B must wait for the lease to expire, then go on.
    let killed = Instant::now();
    a.kill().await;
    assert_eq!(active(&api, Duration::from_secs(10)).await, "coord-b");
    let took = killed.elapsed();
    let bound = quick_lease().ttl + quick_lease().poll_every + Duration::from_secs(2);
    assert!(took <= bound, "take-over after {took:?}, bound {bound:?}");

    // A restarted: B holds the lease, so A stands by and does not act.
    let a2 = Node::start(&client, "coord-a", CoordinatorFaults::none()).await;
    assert!(!a2.active_at_start);

    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 150, "{status:#?}");
    for w in &status.waves {
        assert_eq!(w.succeeded, w.size, "wave {} counted once", w.wave);
    }
    for c in &fl.creds {
        assert_eq!(fl.sim.set_count(&c.principal), 1, "{}", c.id);
    }
    let events = support::events(&client, &id).await;
    for wave in 0..status.waves.len() as u32 {
        let started = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::WaveStarted { wave: w, .. } if w == wave))
            .count();
        assert_eq!(started, 1, "wave {wave} started {started} times");
    }
    assert_eq!(active(&api, Duration::from_secs(5)).await, "coord-b");

    // SIGTERM on B hands the lease over: A takes it at its next look, long
    // before the lease would have expired.
    let stopped = Instant::now();
    b.stop().await;
    assert_eq!(active(&api, Duration::from_secs(10)).await, "coord-a");
    assert!(
        stopped.elapsed() < quick_lease().ttl,
        "handover took {:?}",
        stopped.elapsed()
    );
    a2.stop().await;
    for w in fl.workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_was_taken_is_fenced_and_publishes_nothing() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let fl = fleet(&client, "fence", 20).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_millis(500));
    let a = Node::start(&client, &unique("coord"), CoordinatorFaults::none()).await;
    assert!(a.active_at_start);

    // Two waves with a long bake in between: the lease changes hands while
    // the leader bakes.
    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "10",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 3_000;
    let id = api.start(sp).await.unwrap();
    wait_until(Duration::from_secs(30), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            api.status(&id)
                .await
                .is_ok_and(|s| s.state == CampaignState::Baking)
        }
    })
    .await
    .expect("wave 0 done, baking");

    // Somebody else holds the lease now (as if A had been paused past its
    // expiry and another coordinator took over).
    let js = topology::context(client.clone());
    let leases = topology::leases(&js, &support::topology()).await.unwrap();
    let usurper = LeaseRecord {
        holder: "usurper".into(),
        instance: "elsewhere".into(),
        acquired_at_ms: keywave_common::now_ms(),
        renewed_at_ms: keywave_common::now_ms(),
        expires_at_ms: keywave_common::now_ms() + 600_000,
    };
    let campaigns = topology::campaigns(&js, &support::topology())
        .await
        .unwrap();
    leases
        .put(LEASE_KEY, serde_json::to_vec(&usurper).unwrap().into())
        .await
        .unwrap();
    let snapshot_rev = |campaigns: async_nats::jetstream::kv::Store, id: String| async move {
        campaigns
            .entry(format!("campaign.{id}"))
            .await
            .unwrap()
            .unwrap()
            .revision
    };
    // A notices (renewal or fence) and stops acting: it stands by, still
    // answering reads, and control requests get a take-over answer.
    wait_until(Duration::from_secs(10), || {
        let api = api.clone();
        async move {
            api.ping()
                .await
                .is_ok_and(|p| p.role.as_deref() == Some(keywave_common::api::ROLE_STANDBY))
        }
    })
    .await
    .expect("the fenced coordinator stands by");
    let no_wait = api.clone().with_takeover_wait(Duration::ZERO);
    assert!(
        matches!(
            no_wait.pause(&id).await,
            Err(keywave_common::client::ClientError::Takeover(_))
        ),
        "a control request while nobody serves is answered `takeover`"
    );
    assert!(api.status(&id).await.is_ok(), "a standby answers status");
    let rev = snapshot_rev(campaigns.clone(), id.clone()).await;
    // Well past the end of the bake: wave 1 was never started, nothing saved.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let events = support::events(&client, &id).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.kind, EventKind::WaveStarted { wave: 1, .. })),
        "a fenced coordinator published wave 1: {events:#?}"
    );
    assert_eq!(snapshot_rev(campaigns.clone(), id.clone()).await, rev);
    assert!(!a.is_finished(), "it stands by, waiting for the lease");

    // The lease becomes free again: A takes it back legitimately and
    // finishes from the snapshot.
    leases.delete(LEASE_KEY).await.unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 20);
    for c in &fl.creds {
        assert_eq!(fl.sim.set_count(&c.principal), 1, "{}", c.id);
    }
    a.stop().await;
    for w in fl.workers {
        w.stop().await;
    }
}
