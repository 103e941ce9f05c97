//! Results are counted as they arrive, whatever the campaign did while they
//! were on their way: a wave approved, paused and resumed within a second,
//! with its results published while the campaign is paused, after an
//! approval wait long enough that the coordinator's results reader sat idle.
//! Real `keywave-worker` processes on real Redis ACL users. Each wave must be
//! counted within seconds of its last result (a lost pull request used to
//! leave results in `KEYWAVE_RESULTS` for the reader's 30 s ack wait).

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{
    CampaignState, Credential, EventKind, OnFailure, RotationResult, Strategy, TargetKind,
};
use keywave_tests::process::Daemon;
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::store::SecretStore;
use std::time::{Duration, Instant};

const TOTAL: usize = 600;
/// A wave is counted at most this long after its last result was stored
/// (a lost delivery comes again after the results consumer's 5 s ack wait).
const COUNT_BOUND: Duration = Duration::from_secs(12);

/// The running pieces of a scenario; dropping it stops them.
struct Fleet {
    client: async_nats::Client,
    _workers: Vec<Daemon>,
    _scratch: tempfile::TempDir,
    _server: NatsServer,
    _redis: RedisServer,
}

/// `total` Redis ACL users in region `eu`, enrolled, in the inventory, and
/// two `keywave-worker` processes serving them.
async fn fleet(total: usize) -> Fleet {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let scratch = tempfile::Builder::new()
        .prefix("keywave-late-")
        .tempdir()
        .unwrap();

    // The fleet: Redis ACL users with today's password, enrolled in eu.
    let creds: Vec<Credential> =
        credentials("late", total, &["eu"], "redis-main", TargetKind::Redis)
            .into_iter()
            .map(|mut c| {
                c.principal = format!("kwl-{}", c.id);
                c
            })
            .collect();
    let key = RegionKey::generate();
    let js = topology::context(client.clone());
    let (_, kv) = topology::ensure_region(&js, "eu", &support::topology())
        .await
        .unwrap();
    let store = SecretStore::from_kv(kv, "eu", key.clone());
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    for chunk in creds.chunks(200) {
        let mut pipe = redis::pipe();
        for c in chunk {
            let s = secret();
            pipe.cmd("ACL")
                .arg("SETUSER")
                .arg(&c.principal)
                .arg("on")
                .arg(format!(">{}", s.expose()))
                .arg("+ping")
                .ignore();
            store.enroll(&c.id, s).await.unwrap();
        }
        let _: () = pipe.query_async(&mut admin).await.unwrap();
    }
    support::put_inventory(&client, &creds).await;

    // Two worker processes.
    let config = scratch.path().join("eu.toml");
    std::fs::write(
        &config,
        format!(
            r#"
region = "eu"
concurrency = 4
shutdown_grace_secs = 5
[[endpoint]]
name = "redis-main"
kind = "redis"
url = "{}"
max_concurrency = 8
"#,
            redis.url()
        ),
    )
    .unwrap();
    let mut workers = Vec::new();
    for n in 0..2 {
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .env("KEYWAVE_NATS_URL", server.url())
            .env("KEYWAVE_REGION_KEY", key.to_hex())
            .env("NO_COLOR", "1")
            // The in-process coordinator of this test publishes unsigned
            // tasks (tests/it/signing.rs covers signatures).
            .env(keywave_worker::config::ENV_INSECURE_UNSIGNED_TASKS, "1")
            // Each rotation takes a little longer, so that a wave's results
            // are still coming in while the campaign is paused.
            .env("KEYWAVE_FAULT_DELAY", "set:50")
            .env_remove("KEYWAVE_FAULT_CRASH_AFTER");
        workers.push(Daemon::spawn(
            format!("late-worker-{n}"),
            cmd,
            &scratch.path().join(format!("worker-{n}.log")),
        ));
    }

    Fleet {
        client,
        _workers: workers,
        _scratch: scratch,
        _server: server,
        _redis: redis,
    }
}

/// Checks that every wave of `cid` finished within [`COUNT_BOUND`] of its
/// last stored result, with nothing failed; returns the events.
async fn counted_promptly(
    client: &async_nats::Client,
    cid: &str,
    waves: usize,
) -> Vec<keywave_common::wire::CampaignEvent> {
    // For every wave: when its last result was stored, and when the
    // coordinator finished it.
    let results = support::read_stream(
        client,
        topology::STREAM_RESULTS,
        &keywave_common::subjects::result_campaign_filter(cid),
    )
    .await;
    let mut last_result_ms = std::collections::BTreeMap::<u32, u64>::new();
    for m in &results {
        let r: RotationResult =
            keywave_common::codec::decode(m.headers.as_ref(), &m.payload).expect("a result");
        let published = m.info().expect("jetstream message").published;
        let published_ms = (published.unix_timestamp_nanos() / 1_000_000) as u64;
        let e = last_result_ms.entry(r.wave).or_default();
        *e = (*e).max(published_ms);
    }
    let events = support::events(client, cid).await;
    let mut finished_ms = std::collections::BTreeMap::<u32, u64>::new();
    for e in &events {
        if let EventKind::WaveFinished {
            wave,
            failed,
            no_result,
            ..
        } = &e.kind
        {
            assert_eq!((*failed, *no_result), (0, 0), "wave {wave} failed nothing");
            finished_ms.insert(*wave, e.at_ms);
        }
    }
    assert_eq!(
        finished_ms.len(),
        waves,
        "every wave finished: {finished_ms:?}"
    );
    for (wave, fin) in &finished_ms {
        let last = last_result_ms[wave];
        let lag = Duration::from_millis(fin.saturating_sub(last));
        println!("wave {wave}: finished {lag:?} after its last result was stored");
        assert!(
            lag < COUNT_BOUND,
            "wave {wave} was counted {lag:?} after its last result"
        );
    }
    events
}

/// Prints the campaign's events relative to its creation.
fn timeline(events: &[keywave_common::wire::CampaignEvent]) {
    let t0 = events.first().map_or(0, |e| e.at_ms);
    for e in events {
        let kind = format!("{:?}", e.kind);
        let kind: String = kind.chars().take(140).collect();
        println!("  +{:>6} ms  {kind}", e.at_ms - t0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_published_while_paused_are_counted_at_once() {
    let f = fleet(TOTAL).await;
    let client = f.client.clone();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1,50%",
        0.0,
        OnFailure::Pause,
    );
    s.approve_before_waves = vec![1, 2];
    s.task_timeout_ms = 60_000;
    let cid = api.start(s).await.unwrap();

    let mut approvals = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        assert!(Instant::now() < deadline, "campaign {cid} did not finish");
        let st = api.status(&cid).await.unwrap();
        if st.state.is_terminal() {
            assert_eq!(st.state, CampaignState::Completed, "{st:?}");
            break;
        }
        if st.state == CampaignState::AwaitingApproval {
            // Sit at the gate long enough for the results reader to go
            // idle, then approve, pause and resume within a second.
            tokio::time::sleep(Duration::from_secs(7)).await;
            api.approve(&cid, None, "late-test").await.unwrap();
            tokio::time::sleep(Duration::from_millis(150)).await;
            api.pause(&cid).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            api.resume(&cid).await.unwrap();
            approvals += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(approvals, 2, "both gates were met");

    let events = counted_promptly(&client, &cid, 3).await;
    timeline(&events);
    coordinator.stop().await;
    drop(f);
}

/// The tutorial's flow: a gate before wave 1, a bake (10 s here, 30 s in the
/// tutorial), and the operator approving, pausing and resuming within a
/// second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorials_approve_pause_resume_counts_every_wave_at_once() {
    let f = fleet(24).await;
    let client = f.client.clone();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1,10%,50%",
        0.05,
        OnFailure::Rollback,
    );
    s.approve_before_waves = vec![1];
    s.bake_ms = 10_000;
    s.task_timeout_ms = 60_000;
    let cid = api.start(s).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(200);
    let mut approved = false;
    loop {
        assert!(Instant::now() < deadline, "campaign {cid} did not finish");
        let st = api.status(&cid).await.unwrap();
        if st.state.is_terminal() {
            assert_eq!(st.state, CampaignState::Completed, "{st:?}");
            break;
        }
        if st.state == CampaignState::AwaitingApproval && !approved {
            api.approve(&cid, None, "alice").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            api.pause(&cid).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            api.resume(&cid).await.unwrap();
            approved = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(approved);
    let events = counted_promptly(&client, &cid, 4).await;
    timeline(&events);
    coordinator.stop().await;
    drop(f);
}

/// A delivery of results lost on its way into the coordinator (taken here by
/// a pull on the coordinator's own results consumer that never acks, as a
/// dropped pull stream or a client that missed heartbeats would lose it)
/// delays the wave by the consumer's ack wait, seconds, not half a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_delivery_of_results_delays_its_wave_by_seconds() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::{StreamExt, TryStreamExt};
    let f = fleet(TOTAL).await;
    let client = f.client.clone();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1,100%",
        0.0,
        OnFailure::Pause,
    );
    s.approve_before_waves = vec![1];
    s.task_timeout_ms = 60_000;
    let cid = api.start(s).await.unwrap();
    wait_state(&api, &cid, CampaignState::AwaitingApproval).await;

    // The coordinator's results consumer of this campaign.
    let js = topology::context(client.clone());
    let results = js.get_stream(topology::STREAM_RESULTS).await.unwrap();
    let names: Vec<String> = results.consumer_names().try_collect().await.unwrap();
    let prefix = format!("results-{cid}-");
    let name = names
        .iter()
        .find(|n| n.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no results consumer {prefix}* in {names:?}"))
        .clone();
    let consumer: PullConsumer = results.get_consumer(&name).await.unwrap();

    api.approve(&cid, None, "late-test").await.unwrap();
    // Take deliveries meant for the coordinator while wave 1's results come
    // in, and never ack them.
    let mut lost = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    while lost.is_empty() && Instant::now() < until {
        let mut batch = consumer
            .fetch()
            .max_messages(20)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(m)) = batch.next().await {
            lost.push(m);
        }
    }
    assert!(!lost.is_empty(), "no delivery was taken");
    let taken_at = Instant::now();
    println!(
        "results consumer {name}: ack wait {:?}",
        consumer.cached_info().config.ack_wait
    );
    let st = wait_state(&api, &cid, CampaignState::Completed).await;
    println!(
        "{} results lost in delivery; campaign completed {:?} later",
        lost.len(),
        taken_at.elapsed()
    );
    assert_eq!(st.state, CampaignState::Completed);
    let events = counted_promptly(&client, &cid, 2).await;
    timeline(&events);
    drop(lost);
    coordinator.stop().await;
    drop(f);
}

async fn wait_state(
    api: &ApiClient,
    cid: &str,
    state: CampaignState,
) -> keywave_common::api::CampaignStatus {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let st = api.status(cid).await.unwrap();
        if st.state == state || st.state.is_terminal() {
            return st;
        }
        assert!(
            Instant::now() < until,
            "{cid} never reached {state}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
