//! A worker that dies mid-rotation: the task was never acked, so JetStream
//! redelivers it to another worker, which resumes from the store and the
//! target, reuses the staged secret, and sets it exactly once.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::wire::{CampaignState, OnFailure, Step, Strategy, TargetKind};
use keywave_tests::NatsServer;
use keywave_worker::fault::{CrashMode, Faults};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stopped_between_set_and_promote_is_resumed_and_rotates_once() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("crash", 1, &["eu"], "sim-main", TargetKind::Sim);
    let cred = &creds[0];
    support::put_inventory(&client, &creds).await;

    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 4);
    let targets = Arc::new(targets);
    let key = RegionKey::generate();

    // Worker A stops right after setting the new secret at the target, before
    // promoting it, and never acks the task: a process killed at that moment.
    let a = support::start_worker(
        &client,
        "eu",
        &key,
        targets.clone(),
        Faults {
            crash_after: Some(Step::Set),
            mode: CrashMode::StopWithoutAck,
            ..Default::default()
        },
    )
    .await;
    let today = secret();
    sim.seed(&cred.principal, &today);
    a.store.enroll(&cred.id, today.clone()).await.unwrap();

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu"]),
            Strategy::Continuity,
            "100%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();

    let store = a.store.clone();
    let stats = a
        .join(Duration::from_secs(30))
        .await
        .expect("worker A stops at the injected crash");
    assert!(stats.crashed);
    assert_eq!(stats.succeeded, 0);

    // In between: the new secret is staged and already valid at the target
    // (continuity keeps today's valid too); nothing is promoted yet.
    let mid = store.get(&cred.id).await.unwrap().expect("record");
    let staged = mid.pending.clone().expect("staged secret");
    assert!(mid.current.as_ref().unwrap().secret == today);
    assert!(sim.accepts(&cred.principal, &staged.secret));
    assert!(sim.accepts(&cred.principal, &today));
    assert_eq!(sim.set_count(&cred.principal), 1);

    // Worker B, a fresh process with the same region key, gets the task again
    // once its ack wait (1 s in tests) has passed.
    let b = support::start_worker(&client, "eu", &key, targets.clone(), Faults::none()).await;
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!((status.succeeded(), status.failed()), (1, 0));

    let rec = b.store.get(&cred.id).await.unwrap().expect("record");
    let current = rec.current.expect("current");
    assert!(rec.pending.is_none());
    assert!(
        current.secret == staged.secret,
        "the resumed task promotes the secret it staged before the crash"
    );
    assert!(rec.previous.expect("previous").secret == today);
    assert!(sim.accepts(&cred.principal, &current.secret));
    assert!(!sim.accepts(&cred.principal, &today));
    assert_eq!(sim.set_count(&cred.principal), 1, "rotated exactly once");

    coordinator.stop().await;
    let stats = b.stop().await;
    assert_eq!(stats.succeeded, 1);
}
