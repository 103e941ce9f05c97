//! Signed tasks: workers configured with coordinator public keys
//! refuse tasks that are unsigned, signed by another key, altered after
//! signing, moved to another region's subject or expired. Each is terminated,
//! dead-lettered with its reason class, and the credential is untouched at
//! the target and in the store. A second configured key is accepted, and a
//! whole campaign signed by the coordinator completes.

use crate::support::{self, credentials, in_regions, secret, spec};
use bytes::Bytes;
use keywave_common::client::ApiClient;
use keywave_common::codec::{self, Format};
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::sign::{SigningKey, TaskSigner, Verifier};
use keywave_common::wire::{
    CampaignState, Credential, DeadLetter, OnFailure, Outcome, RotationResult, RotationTask,
    Strategy, TargetKind, TaskAction, SCHEMA_VERSION,
};
use keywave_common::{now_ms, subjects, topology};
use keywave_coordinator::CoordinatorOptions;
use keywave_tests::{unique, wait_for, NatsServer};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use keywave_worker::WorkerOptions;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

fn task(cid: &str, index: u32, c: &Credential) -> RotationTask {
    RotationTask {
        v: SCHEMA_VERSION,
        task_id: RotationTask::make_id(cid, 0, TaskAction::Rotate, &c.id),
        campaign_id: cid.to_string(),
        wave: 0,
        index,
        action: TaskAction::Rotate,
        strategy: Strategy::Continuity,
        credential_id: c.id.clone(),
        region: c.region.clone(),
        endpoint: c.endpoint.clone(),
        kind: c.kind,
        principal: c.principal.clone(),
        issued_at_ms: now_ms(),
        deadline_ms: now_ms() + 60_000,
        run_timeout_ms: 0,
        consumers: Vec::new(),
    }
}

/// Headers and body of `t` signed by `signer` for `subject` (expiry: the
/// signer's default unless given).
fn signed(
    signer: &TaskSigner,
    subject: &str,
    t: &RotationTask,
    expires_ms: Option<u64>,
) -> (async_nats::HeaderMap, Bytes) {
    let body = codec::encode(Format::MsgPack, t).unwrap();
    let mut h = codec::headers(Format::MsgPack, &t.task_id);
    let exp = expires_ms.unwrap_or_else(|| signer.expiry_of(t));
    signer.sign_into(&mut h, subject, t, exp, &body);
    (h, body)
}

fn worker_opts(region: &str, keys: &Verifier) -> WorkerOptions {
    WorkerOptions {
        region: region.into(),
        worker_id: unique(&format!("signed-{region}")),
        concurrency: 8,
        topology: support::topology(),
        task_keys: keys.clone(),
        require_signed_tasks: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_moved_unsigned_and_expired_tasks_are_refused_and_change_nothing() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());

    // The coordinator's key is being rotated: workers trust both.
    let (old, new) = (SigningKey::generate(), SigningKey::generate());
    let keys = Verifier::new(vec![old.public().clone(), new.public().clone()]);
    let by_old = TaskSigner::new(old, Duration::from_secs(300));
    let by_new = TaskSigner::new(new, Duration::from_secs(300));
    let stranger = TaskSigner::new(SigningKey::generate(), Duration::from_secs(300));

    let mut sims = HashMap::new();
    let mut workers = HashMap::new();
    for region in ["eu", "us"] {
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 8);
        let w = support::start_worker_with(
            &client,
            worker_opts(region, &keys),
            &RegionKey::generate(),
            Arc::new(targets),
        )
        .await;
        sims.insert(region, sim);
        workers.insert(region, w);
    }
    let creds = credentials("sig", 7, &["eu"], "sim-main", TargetKind::Sim);
    let mut initial: HashMap<String, Secret> = HashMap::new();
    for c in &creds {
        let s = secret();
        sims["eu"].seed(&c.principal, &s);
        workers["eu"].store.enroll(&c.id, s.clone()).await.unwrap();
        initial.insert(c.id.clone(), s);
    }

    let cid = unique("sigc");
    let eu = subjects::task("eu", &cid);
    let us = subjects::task("us", &cid);
    let tasks: Vec<RotationTask> = creds
        .iter()
        .enumerate()
        .map(|(i, c)| task(&cid, i as u32, c))
        .collect();
    let publish = |subject: String, h: async_nats::HeaderMap, body: Bytes| {
        let js = js.clone();
        async move {
            js.publish_with_headers(subject, h, body)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // 0: signed by a key the workers do not know.
    let (h, b) = signed(&stranger, &eu, &tasks[0], None);
    publish(eu.clone(), h, b).await;
    // 1: not signed at all.
    let body = codec::encode(Format::MsgPack, &tasks[1]).unwrap();
    publish(
        eu.clone(),
        codec::headers(Format::MsgPack, &tasks[1].task_id),
        body,
    )
    .await;
    // 2: validly signed, then the body altered (another principal).
    let (h, _) = signed(&by_old, &eu, &tasks[2], None);
    let mut altered = tasks[2].clone();
    altered.principal = "somebody-else".into();
    publish(
        eu.clone(),
        h,
        codec::encode(Format::MsgPack, &altered).unwrap(),
    )
    .await;
    // 3: validly signed for eu, moved to us's subject.
    let (h, b) = signed(&by_old, &eu, &tasks[3], None);
    publish(us.clone(), h, b).await;
    // 4: validly signed, but expired (a replay after its expiry).
    let (h, b) = signed(&by_old, &eu, &tasks[4], Some(now_ms() - 1_000));
    publish(eu.clone(), h, b).await;
    // 5 and 6: good tasks, by the new key and by the old one.
    let (h, b) = signed(&by_new, &eu, &tasks[5], None);
    publish(eu.clone(), h, b).await;
    let (h, b) = signed(&by_old, &eu, &tasks[6], None);
    publish(eu.clone(), h, b).await;

    // Five dead letters (four in eu, the moved one in us) and three results
    // (the two good tasks, and the expired one counted as failed: it is
    // authentic, only late; forgeries get no result).
    let dead: BTreeMap<String, DeadLetter> = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let msgs =
                support::read_stream(&client, topology::STREAM_DEADLETTER, "keywave.deadletter.>")
                    .await;
            (msgs.len() >= 5).then(|| {
                msgs.iter()
                    .map(|m| {
                        let d: DeadLetter =
                            codec::decode_plain(m.headers.as_ref(), &m.payload).unwrap();
                        (d.task_id.clone().unwrap_or_default(), d)
                    })
                    .collect()
            })
        }
    })
    .await
    .expect("five dead letters");
    let results: BTreeMap<String, RotationResult> = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        let filter = subjects::result_campaign_filter(&cid);
        async move {
            let msgs = support::read_stream(&client, topology::STREAM_RESULTS, &filter).await;
            (msgs.len() >= 3).then(|| {
                msgs.iter()
                    .map(|m| {
                        let r: RotationResult =
                            codec::decode(m.headers.as_ref(), &m.payload).unwrap();
                        (r.task_id.clone(), r)
                    })
                    .collect()
            })
        }
    })
    .await
    .expect("three results");

    let reason = |i: usize| {
        let d = dead
            .get(&tasks[i].task_id)
            .unwrap_or_else(|| panic!("no dead letter for task {i}: {dead:#?}"));
        d.reason.split(':').next().unwrap().to_string()
    };
    assert_eq!(reason(0), "unknown_signing_key");
    assert_eq!(reason(1), "unsigned");
    assert_eq!(reason(2), "bad_signature");
    assert_eq!(reason(3), "bad_signature");
    assert_eq!(dead[&tasks[3].task_id].region, "us");
    assert_eq!(dead[&tasks[3].task_id].subject, us);
    assert_eq!(reason(4), "expired");
    assert_eq!(dead.len(), 5, "{dead:#?}");

    assert_eq!(results.len(), 3, "{results:#?}");
    assert_eq!(results[&tasks[4].task_id].outcome, Outcome::Failed);
    assert_eq!(results[&tasks[5].task_id].outcome, Outcome::Succeeded);
    assert_eq!(results[&tasks[6].task_id].outcome, Outcome::Succeeded);

    // Refused: untouched at the target and in the store.
    for c in &creds[..5] {
        let sim = &sims["eu"];
        assert_eq!(sim.set_count(&c.principal), 0, "{}", c.id);
        assert!(sim.accepts(&c.principal, &initial[&c.id]), "{}", c.id);
        let rec = workers["eu"].store.get(&c.id).await.unwrap().unwrap();
        assert!(rec.current.unwrap().secret == initial[&c.id], "{}", c.id);
        assert!(rec.pending.is_none() && rec.previous.is_none(), "{}", c.id);
        assert!(rec.last_task.is_none(), "{}", c.id);
    }
    assert_eq!(sims["us"].set_count(&creds[3].principal), 0);
    // Accepted (either key): rotated once.
    for c in &creds[5..] {
        let rec = workers["eu"].store.get(&c.id).await.unwrap().unwrap();
        assert!(rec.previous.unwrap().secret == initial[&c.id], "{}", c.id);
        assert!(sims["eu"].accepts(&c.principal, &rec.current.unwrap().secret));
        assert!(!sims["eu"].accepts(&c.principal, &initial[&c.id]));
        assert_eq!(sims["eu"].set_count(&c.principal), 1, "{}", c.id);
    }

    // Terminated, not redelivered.
    for region in ["eu", "us"] {
        let mut consumer = js
            .get_stream(topology::tasks_stream(region))
            .await
            .unwrap()
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                &topology::worker_consumer(region),
            )
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{region}");
    }
    let eu_stats = workers.remove("eu").unwrap().stop().await;
    let us_stats = workers.remove("us").unwrap().stop().await;
    assert_eq!((eu_stats.terminated, us_stats.terminated), (4, 1));
    assert_eq!(eu_stats.succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_signed_with_the_second_key_completes_and_unsigned_workers_refuse_to_start() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;

    // Policy: a worker that must verify but has no key does not start.
    let refused = keywave_worker::Worker::start(
        client.clone(),
        worker_opts("eu", &Verifier::default()),
        RegionKey::generate(),
        Arc::new(Targets::new()),
    )
    .await;
    assert!(
        matches!(
            refused,
            Err(keywave_worker::WorkerError::InvalidOptions {
                field: "coordinator_public_keys",
                ..
            })
        ),
        "{refused:?}"
    );

    let (old, new) = (SigningKey::generate(), SigningKey::generate());
    let keys = Verifier::new(vec![old.public().clone(), new.public().clone()]);
    let creds = credentials("sigcamp", 40, &["eu", "us"], "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let mut sims = HashMap::new();
    let mut workers = HashMap::new();
    for region in ["eu", "us"] {
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 16);
        let w = support::start_worker_with(
            &client,
            worker_opts(region, &keys),
            &RegionKey::generate(),
            Arc::new(targets),
        )
        .await;
        sims.insert(region, sim);
        workers.insert(region, w);
    }
    for c in &creds {
        let s = secret();
        sims[c.region.as_str()].seed(&c.principal, &s);
        workers[c.region.as_str()]
            .store
            .enroll(&c.id, s)
            .await
            .unwrap();
    }
    let coordinator = support::start_coordinator_with(
        &client,
        CoordinatorOptions {
            topology: support::topology(),
            coordinator_id: unique("coordinator"),
            signer: Some(TaskSigner::new(new, Duration::from_secs(300))),
            ..Default::default()
        },
    )
    .await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu", "us"]),
            Strategy::Continuity,
            "1,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 40);
    for c in &creds {
        assert_eq!(
            sims[c.region.as_str()].set_count(&c.principal),
            1,
            "{}",
            c.id
        );
    }
    coordinator.stop().await;
    for (_, w) in workers {
        let stats = w.stop().await;
        assert_eq!((stats.terminated, stats.failed), (0, 0), "{stats:?}");
    }
}
