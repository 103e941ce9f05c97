//! Wave decisions on failure: a canary wave over its failure budget is rolled
//! back (continuity) and every rolled-back credential logs in with its
//! previous secret again; a containment campaign refuses to restore exposed
//! secrets and pauses, saying why.

use crate::support::{self, credentials, secret, spec};
use async_trait::async_trait;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::wire::{
    CampaignState, Credential, EventKind, OnFailure, Selector, Strategy, TargetKind,
};
use keywave_tests::NatsServer;
use keywave_worker::fault::Faults;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::{AuthCheck, Target, TargetError, Targets};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// A simulated system that refuses to set any secret for chosen principals,
/// as a database would for a role the admin user may not alter.
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

struct Fixture {
    _server: NatsServer,
    client: async_nats::Client,
    sim: Arc<SimTarget>,
    store: SecretStore,
    creds: Vec<Credential>,
    initial: HashMap<String, Secret>,
    refused: HashSet<String>,
    worker: support::RunningWorker,
    coordinator: support::RunningCoordinator,
}

/// 30 credentials in region `eu`; the plan sorts them by id, so a canary of
/// 10 is `<prefix>-0000..0009`, and three of those refuse every new secret.
async fn fixture(prefix: &str) -> Fixture {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials(prefix, 30, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let refused: HashSet<String> = [1, 4, 7]
        .iter()
        .map(|i| creds[*i].principal.clone())
        .collect();
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert(
        "sim-main",
        Arc::new(RefuseFor {
            sim: sim.clone(),
            refused: refused.clone(),
        }),
        16,
    );
    let key = RegionKey::generate();
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    let mut initial = HashMap::new();
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s.clone()).await.unwrap();
        initial.insert(c.id.clone(), s);
    }
    let coordinator = support::start_coordinator(&client).await;
    Fixture {
        store: worker.store.clone(),
        _server: server,
        client,
        sim,
        creds,
        initial,
        refused,
        worker,
        coordinator,
    }
}

fn everything() -> Selector {
    Selector::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_over_budget_is_rolled_back_to_previous_secrets() {
    let fx = fixture("rb").await;
    let api = ApiClient::new(fx.client.clone());
    let id = api
        .start(spec(
            everything(),
            Strategy::Continuity,
            "10",
            0.1,
            OnFailure::Rollback,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();

    // 3 of 10 failed: 0.3 > 0.1, so the canary is rolled back and the
    // campaign stops there.
    assert_eq!(status.state, CampaignState::RolledBack, "{status:#?}");
    let canary = &status.waves[0];
    assert_eq!((canary.succeeded, canary.failed), (7, 3), "{canary:#?}");
    assert_eq!(canary.rolled_back, 7);
    assert_eq!(canary.rollback_failed, 0);
    assert!(status.waves[1..].iter().all(|w| !w.published));

    for (i, c) in fx.creds.iter().enumerate() {
        let rec = fx.store.get(&c.id).await.unwrap().expect("record");
        let current = rec.current.expect("current");
        let today = &fx.initial[&c.id];
        // Whatever happened, today's secret is CURRENT again and works.
        assert!(
            current.secret == *today,
            "{}: CURRENT is the previous secret",
            c.id
        );
        assert!(fx.sim.accepts(&c.principal, today), "{}", c.id);
        if i < 10 && !fx.refused.contains(&c.principal) {
            // Rotated, then rolled back: the short-lived secret is dead.
            let rotated = rec
                .previous
                .expect("the rolled-back secret is kept as PREVIOUS");
            assert!(!fx.sim.accepts(&c.principal, &rotated.secret), "{}", c.id);
            assert_eq!(fx.sim.valid_count(&c.principal), 1, "{}", c.id);
        } else {
            // Refused by the target, or never reached: never set.
            assert_eq!(fx.sim.set_count(&c.principal), 0, "{}", c.id);
        }
    }

    let events = support::events(&fx.client, &id).await;
    assert!(
        events.iter().any(|e| matches!(
            e.kind,
            EventKind::RollbackFinished {
                wave: 0,
                restored: 7,
                refused: 0,
                failed: 0
            }
        )),
        "{events:#?}"
    );
    fx.coordinator.stop().await;
    fx.worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containment_refuses_rollback_and_pauses() {
    let fx = fixture("ct").await;
    let api = ApiClient::new(fx.client.clone());
    let id = api
        .start(spec(
            everything(),
            Strategy::Containment,
            "10",
            0.1,
            OnFailure::Rollback,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();

    assert_eq!(status.state, CampaignState::Paused, "{status:#?}");
    assert!(status.reason.is_some(), "a paused campaign says why");
    let canary = &status.waves[0];
    assert_eq!((canary.succeeded, canary.failed), (7, 3), "{canary:#?}");
    assert_eq!(canary.rolled_back, 0);

    let events = support::events(&fx.client, &id).await;
    assert!(
        events.iter().any(|e| matches!(
            e.kind,
            EventKind::RollbackRefused {
                wave: 0,
                credentials: 7,
                ..
            }
        )),
        "{events:#?}"
    );

    // The exposed secrets stay dead: the 7 rotated credentials keep their new
    // secret, and the old one is rejected.
    for c in &fx.creds[..10] {
        let today = &fx.initial[&c.id];
        if fx.refused.contains(&c.principal) {
            assert!(fx.sim.accepts(&c.principal, today), "{}", c.id);
            continue;
        }
        let rec = fx.store.get(&c.id).await.unwrap().expect("record");
        let current = rec.current.expect("current");
        assert!(fx.sim.accepts(&c.principal, &current.secret), "{}", c.id);
        assert!(
            !fx.sim.accepts(&c.principal, today),
            "{}: exposed secret restored",
            c.id
        );
    }
    fx.coordinator.stop().await;
    fx.worker.stop().await;
}
