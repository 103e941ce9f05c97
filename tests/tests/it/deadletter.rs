//! Poison on the task queue: malformed, oversized and unknown-version task
//! messages are terminated and recorded on `KEYWAVE_DEADLETTER` (and as
//! campaign events), and the worker goes on with the tasks queued behind them.

use crate::support::{self, credentials, secret};
use bytes::Bytes;
use keywave_common::codec::{self, CodecError, Format};
use keywave_common::crypto::RegionKey;
use keywave_common::wire::{
    DeadLetter, EventKind, Outcome, RotationResult, RotationTask, Strategy, TargetKind, TaskAction,
    SCHEMA_VERSION,
};
use keywave_common::{now_ms, publish, subjects, topology};
use keywave_tests::{unique, wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

fn task(cid: &str, index: u32, c: &keywave_common::wire::Credential) -> RotationTask {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_tasks_are_dead_lettered_and_the_queue_keeps_moving() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    // Nothing here relies on redelivery: a generous ack wait keeps a CPU-starved
    // run (2 cores, other tests alongside) from redelivering the good tasks
    // until they run out of deliveries.
    let cfg = topology::Config {
        task_backoff: vec![Duration::from_secs(20)],
        ..support::topology()
    };
    topology::ensure_core(&js, &cfg).await.unwrap();
    let (_, kv) = topology::ensure_region(&js, "eu", &cfg).await.unwrap();
    let key = RegionKey::generate();
    let store = SecretStore::from_kv(kv, "eu", key.clone());

    let sim = SimTarget::new(SimOptions::default());
    let creds = credentials("dl", 3, &["eu"], "sim-main", TargetKind::Sim);
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        store.enroll(&c.id, s).await.unwrap();
    }

    // The queue, before any worker runs: three poisoned messages, then three
    // good tasks.
    let cid = unique("dlc");
    let subject = subjects::task("eu", &cid);
    let publish_raw = |name: &'static str, headers: async_nats::HeaderMap, body: Bytes| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, headers, body)
                .await
                .unwrap_or_else(|e| panic!("publish {name}: {e}"))
                .await
                .unwrap_or_else(|e| panic!("ack {name}: {e}"));
        }
    };
    publish_raw(
        "malformed",
        codec::headers(Format::Json, "poison-malformed"),
        Bytes::from_static(b"{\"v\":1,\"task_id\": this is not JSON"),
    )
    .await;
    let oversized = vec![b' '; codec::MAX_MESSAGE_BYTES + 6 * 1024];
    publish_raw(
        "oversized",
        codec::headers(Format::Json, "poison-oversized"),
        Bytes::from(oversized.clone()),
    )
    .await;
    let mut future = task(&cid, 99, &creds[0]);
    future.v = SCHEMA_VERSION + 98;
    future.task_id = "poison-unknown-version".into();
    publish_raw(
        "unknown version",
        codec::headers(Format::Json, "poison-unknown-version"),
        codec::encode(Format::Json, &future).unwrap(),
    )
    .await;
    for (i, c) in creds.iter().enumerate() {
        let t = task(&cid, i as u32, c);
        publish::send_and_confirm(&js, subject.clone(), Format::MsgPack, &t.task_id, &t)
            .await
            .unwrap();
    }

    // One task at a time, so the good tasks really are behind the poison.
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 4);
    let worker = {
        let opts = keywave_worker::WorkerOptions {
            region: "eu".into(),
            worker_id: unique("worker-eu"),
            concurrency: 1,
            topology: cfg.clone(),
            faults: Faults::none(),
            ..Default::default()
        };
        support::start_worker_with(&client, opts, &key, Arc::new(targets)).await
    };

    let results: Vec<RotationResult> = wait_for(Duration::from_secs(30), || {
        let client = client.clone();
        let filter = subjects::result_campaign_filter(&cid);
        async move {
            let msgs = support::read_stream(&client, topology::STREAM_RESULTS, &filter).await;
            (msgs.len() >= 3).then(|| {
                msgs.iter()
                    .map(|m| codec::decode(m.headers.as_ref(), &m.payload).unwrap())
                    .collect()
            })
        }
    })
    .await
    .expect("the three good tasks are done");
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|r| r.outcome == Outcome::Succeeded),
        "{results:#?}"
    );
    for c in &creds {
        let rec = store.get(&c.id).await.unwrap().unwrap();
        assert!(sim.accepts(&c.principal, &rec.current.unwrap().secret));
        assert!(!sim.accepts(&c.principal, &rec.previous.unwrap().secret));
    }

    // Each poisoned message has its dead letter, with a typed reason.
    let dead: Vec<DeadLetter> = support::read_stream(
        &client,
        topology::STREAM_DEADLETTER,
        &subjects::dead_letter("eu"),
    )
    .await
    .iter()
    .map(|m| codec::decode_plain(m.headers.as_ref(), &m.payload).unwrap())
    .collect();
    let reasons: BTreeSet<&str> = dead
        .iter()
        .map(|d| d.reason.split(':').next().unwrap())
        .collect();
    let expected: BTreeSet<&str> = [
        CodecError::Malformed {
            format: "json",
            detail: String::new(),
        }
        .reason(),
        CodecError::Oversized { len: 0, max: 0 }.reason(),
        CodecError::UnknownVersion { found: 0 }.reason(),
    ]
    .into_iter()
    .collect();
    assert_eq!(reasons, expected, "{dead:#?}");
    assert!(dead.iter().all(|d| d.subject == subject));
    assert!(dead.iter().any(|d| d.payload_len == oversized.len()));

    // ... and the campaign's audit trail says so too.
    let events = support::events(&client, &cid).await;
    let dead_events = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::DeadLetter { .. }))
        .count();
    assert_eq!(dead_events, 3, "{events:#?}");

    // Terminated, not redelivered: nothing is left pending on the queue.
    let mut consumer = js
        .get_stream(topology::tasks_stream("eu"))
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&topology::worker_consumer(
            "eu",
        ))
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (0, 0),
        "{info:#?}"
    );

    let stats = worker.stop().await;
    assert_eq!((stats.succeeded, stats.terminated), (3, 3), "{stats:?}");
}
