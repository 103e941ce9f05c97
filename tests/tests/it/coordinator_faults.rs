//! The coordinator killed at three points of a campaign that ends in a
//! rollback (in the middle of publishing a wave, between two waves, while the
//! rollback runs): a second coordinator takes over once the lease expired,
//! and the campaign ends exactly as an undisturbed run does: same state, same
//! counts, same secrets, each credential set as often.

use crate::lease::Node;
use crate::support::{self, credentials, secret, spec};
use async_trait::async_trait;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::wire::{
    CampaignState, Decision, EventKind, OnFailure, Selector, Strategy, TargetKind,
};
use keywave_coordinator::engine::fault::{CrashMode, CrashPoint, Faults as CoordinatorFaults};
use keywave_tests::NatsServer;
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::{AuthCheck, Target, TargetError, Targets};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Refuses every new secret for chosen principals.
struct RefuseFor {
    sim: Arc<SimTarget>,
    refused: HashSet<String>,
}

impl RefuseFor {
    fn gate(&self, principal: &str) -> Result<(), TargetError> {
        if self.refused.contains(principal) {
            Err(TargetError::Rejected("permission denied (test)".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Target for RefuseFor {
    fn kind(&self) -> TargetKind {
        TargetKind::Sim
    }
    fn policy(&self) -> SecretPolicy {
        self.sim.policy()
    }
    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.gate(principal)?;
        self.sim.add(principal, new).await
    }
    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.gate(principal)?;
        self.sim.replace(principal, new).await
    }
    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        self.sim.remove(principal, old).await
    }
    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.sim.check(principal, secret).await
    }
}

/// size, published, succeeded, failed, no_result, decision, rollback tasks,
/// rolled back, rollback refused, rollback failed.
type WaveCounts = (
    u64,
    bool,
    u64,
    u64,
    u64,
    Option<Decision>,
    u64,
    u64,
    u64,
    u64,
);

/// What must be the same after any run: the campaign's state and counters
/// (timestamps aside) and, per credential, whether its CURRENT is today's
/// secret, how many secrets the target accepts and how often it was set.
#[derive(Debug, PartialEq)]
struct Outcome {
    state: CampaignState,
    waves: Vec<WaveCounts>,
    credentials: Vec<(String, bool, bool, usize, u64)>,
}

async fn campaign(crash: Option<CrashPoint>) -> Outcome {
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("ck", 30, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    // Wave 1 (plan positions 10..19) has three credentials the target
    // refuses: 3 of 10 > 10%, so wave 1 is rolled back.
    let refused: HashSet<String> = [11, 14, 17]
        .iter()
        .map(|i| creds[*i].principal.clone())
        .collect();
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(20),
        fail_rate: 0.0,
    });
    let mut targets = Targets::new();
    targets.insert(
        "sim-main",
        Arc::new(RefuseFor {
            sim: sim.clone(),
            refused,
        }),
        2,
    );
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    let mut today = Vec::new();
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s.clone()).await.unwrap();
        today.push(s);
    }
    let faults = match crash {
        Some(p) => CoordinatorFaults::crash_at(p, CrashMode::Kill),
        None => CoordinatorFaults::none(),
    };
    let first = Node::start(&client, "first", faults).await;
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_millis(500));
    let id = api
        .start(spec(
            Selector::default(),
            Strategy::Continuity,
            "10",
            0.1,
            OnFailure::Rollback,
        ))
        .await
        .unwrap();
    let (first, second) = match crash {
        None => (Some(first), None),
        Some(p) => {
            // The first coordinator dies at the fault point, holding the lease.
            first.join().await;
            let s = api.status(&id).await;
            assert!(s.is_err(), "{p:?}: nobody answers while the lease runs out");
            (
                None,
                Some(Node::start(&client, "second", CoordinatorFaults::none()).await),
            )
        }
    };
    let status = api
        .wait_terminal(&id, Duration::from_secs(90))
        .await
        .unwrap();
    let events = support::events(&client, &id).await;
    for wave in 0..3u32 {
        let started = events
            .iter()
            .filter(|e| matches!(e.kind, EventKind::WaveStarted { wave: w, .. } if w == wave))
            .count();
        assert!(
            started <= 1,
            "{crash:?}: wave {wave} started {started} times"
        );
    }
    let mut out = Outcome {
        state: status.state,
        waves: status
            .waves
            .iter()
            .map(|w| {
                (
                    w.size,
                    w.published,
                    w.succeeded,
                    w.failed,
                    w.no_result,
                    w.decision,
                    w.rollback_tasks,
                    w.rolled_back,
                    w.rollback_refused,
                    w.rollback_failed,
                )
            })
            .collect(),
        credentials: Vec::new(),
    };
    for (c, t) in creds.iter().zip(&today) {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        let current = rec.current.expect("current");
        assert!(
            sim.accepts(&c.principal, &current.secret),
            "{crash:?}: {}",
            c.id
        );
        out.credentials.push((
            c.id.clone(),
            current.secret == *t,
            rec.pending.is_none(),
            sim.valid_count(&c.principal),
            sim.set_count(&c.principal),
        ));
    }
    for node in [first, second].into_iter().flatten() {
        node.stop().await;
    }
    worker.stop().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_publish_between_waves_or_mid_rollback_ends_as_an_undisturbed_run()
{
    support::init_tracing();
    // Each run has its own server (and so its own lease); they run side by side.
    let (undisturbed, mid_publish, between, rollback) = tokio::join!(
        campaign(None),
        campaign(Some(CrashPoint::MidPublish { wave: 1, after: 4 })),
        campaign(Some(CrashPoint::BetweenWaves { wave: 1 })),
        campaign(Some(CrashPoint::Rollback { wave: 1 })),
    );
    assert_eq!(
        undisturbed.state,
        CampaignState::RolledBack,
        "{undisturbed:#?}"
    );
    let w1 = &undisturbed.waves[1];
    assert_eq!((w1.2, w1.3, w1.7), (7, 3, 7), "{undisturbed:#?}");
    assert!(!undisturbed.waves[2].1, "wave 2 never published");
    // Wave 0 rotated, wave 1 rotated then rolled back (set twice) or refused.
    assert!(undisturbed.credentials[..10]
        .iter()
        .all(|c| !c.1 && c.4 == 1));
    assert!(undisturbed.credentials[10..20]
        .iter()
        .all(|c| c.1 && c.3 == 1));
    for (name, run) in [
        ("mid publish", mid_publish),
        ("between waves", between),
        ("mid rollback", rollback),
    ] {
        assert_eq!(run, undisturbed, "killed {name}");
    }
}
