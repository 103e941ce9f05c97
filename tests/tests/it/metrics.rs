//! `/metrics`, `/healthz` and `/readyz` of the coordinator and the workers,
//! over real HTTP on 127.0.0.1 ports: scraped during and after a sim
//! campaign with injected failures, parsed as Prometheus text, and checked
//! against the campaign's final counts.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_coordinator::metrics::CoordinatorMetrics;
use keywave_coordinator::CoordinatorOptions;
use keywave_devkit::fleet::WorkerTask;
use keywave_tests::NatsServer;
use keywave_worker::metrics::WorkerMetrics;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use keywave_worker::{Worker, WorkerOptions};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const REGIONS: [&str; 2] = ["eu", "us"];
const N: usize = 200;

/// One GET over a fresh connection: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut raw))
        .await
        .expect("answer within 10 s")
        .unwrap();
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (status, body.to_string())
}

/// A sample: metric name and labels.
type Key = (String, BTreeMap<String, String>);

/// Parses the Prometheus text format (what keywave writes: no timestamps).
/// Checks that every sample belongs to a family declared with `# TYPE`.
fn parse(text: &str) -> Vec<(Key, f64)> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                let mut rest = body;
                while !rest.is_empty() {
                    let (k, r) = rest.split_once("=\"").expect("label=\"value\"");
                    let mut v = String::new();
                    let mut chars = r.char_indices();
                    let end = loop {
                        match chars.next().expect("closing quote") {
                            (_, '\\') => match chars.next().expect("escape").1 {
                                'n' => v.push('\n'),
                                c => v.push(c),
                            },
                            (i, '"') => break i,
                            (_, c) => v.push(c),
                        }
                    };
                    labels.insert(k.to_string(), v);
                    rest = r[end + 1..].trim_start_matches(',');
                }
                (name.to_string(), labels)
            }
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&name);
        assert!(types.contains_key(family), "no # TYPE for {name}");
        out.push(((name, labels), value));
    }
    out
}

/// Sum of the samples of `name` whose labels include every `(k, v)` of `with`.
fn sum(samples: &[(Key, f64)], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

fn has(samples: &[(Key, f64)], name: &str) -> bool {
    samples.iter().any(|((n, _), _)| n == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_until_nats_and_the_consumer_are_there() {
    // A coordinator whose NATS server is not reachable (yet).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("nats://127.0.0.1:{port}"))
        .await
        .unwrap();
    let m = CoordinatorMetrics::new();
    m.attach(client, support::topology());
    let stop = CancellationToken::new();
    let addr = keywave_coordinator::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        m.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 503);
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(sum(&parse(&body), "keywave_coordinator_ready", &[]), 0.0);

    // A worker whose consumer is not bound.
    let w = WorkerMetrics::new("eu");
    let waddr = keywave_worker::metrics::serve("127.0.0.1:0".parse().unwrap(), w, stop.clone())
        .await
        .unwrap();
    assert_eq!(get(waddr, "/healthz").await.0, 200);
    assert_eq!(get(waddr, "/readyz").await.0, 503);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_the_campaign_counts() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = credentials("metered", N, &REGIONS, "sim-main", TargetKind::Sim);
    support::put_inventory(&client, &creds).await;
    let stop = CancellationToken::new();

    // One worker per region, each failing about 10% of its sets, each
    // serving its metrics.
    let mut workers = Vec::new();
    let mut worker_addrs = Vec::new();
    let mut sims = BTreeMap::new();
    for region in REGIONS {
        let sim = SimTarget::new(SimOptions {
            latency: Duration::from_millis(2),
            fail_rate: 0.1,
        });
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 16);
        let worker = Worker::start(
            client.clone(),
            WorkerOptions {
                region: region.to_string(),
                worker_id: keywave_tests::unique(&format!("worker-{region}")),
                concurrency: 16,
                topology: support::topology(),
                ..Default::default()
            },
            keywave_common::crypto::RegionKey::generate(),
            Arc::new(targets),
        )
        .await
        .expect("worker starts");
        let addr = keywave_worker::metrics::serve(
            "127.0.0.1:0".parse().unwrap(),
            worker.metrics(),
            stop.clone(),
        )
        .await
        .unwrap();
        worker_addrs.push(addr);
        for c in creds.iter().filter(|c| c.region == region) {
            let s = secret();
            sim.seed(&c.principal, &s);
            worker.store().enroll(&c.id, s).await.unwrap();
        }
        sims.insert(region, sim);
        workers.push(support::RunningWorker::from(WorkerTask::spawn(worker)));
    }

    let metrics = CoordinatorMetrics::new();
    let coordinator = support::start_coordinator_with(
        &client,
        CoordinatorOptions {
            topology: support::topology(),
            coordinator_id: keywave_tests::unique("coordinator"),
            metrics: metrics.clone(),
            ..Default::default()
        },
    )
    .await;
    let addr = keywave_coordinator::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        stop.clone(),
    )
    .await
    .unwrap();
    assert_eq!(get(addr, "/readyz").await.0, 200, "connected and active");

    let api = ApiClient::new(client.clone());
    let cid = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "10,100%",
            1.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();

    // During the campaign: valid text, the consumers of both regions shown.
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let during = parse(&body);
    for region in REGIONS {
        assert!(
            during
                .iter()
                .any(|((n, l), _)| n == "keywave_coordinator_consumer_pending"
                    && l.get("region").map(String::as_str) == Some(region)),
            "consumer_pending of {region} missing:\n{body}"
        );
    }
    assert!(has(&during, "keywave_coordinator_campaigns"));

    let status = api
        .wait_terminal(&cid, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded() + status.failed(), N as u64);
    assert!(status.failed() > 0, "10% of sets fail on purpose");

    // After: the coordinator's result counters are the campaign's counts.
    let after = parse(&get(addr, "/metrics").await.1);
    let results = "keywave_coordinator_results_total";
    assert_eq!(
        sum(
            &after,
            results,
            &[("action", "rotate"), ("outcome", "succeeded")]
        ) as u64,
        status.succeeded()
    );
    assert_eq!(
        sum(
            &after,
            results,
            &[("action", "rotate"), ("outcome", "failed")]
        ) as u64,
        status.failed()
    );
    assert_eq!(
        sum(
            &after,
            results,
            &[("outcome", "failed"), ("error_class", "injected")]
        ) as u64,
        status.failed(),
        "failures are classed"
    );
    // Campaign states are re-read at most every 2 s.
    keywave_tests::wait_until(Duration::from_secs(10), || {
        let cid = cid.clone();
        async move {
            let m = parse(&get(addr, "/metrics").await.1);
            sum(
                &m,
                "keywave_coordinator_campaigns",
                &[("state", "completed")],
            ) == 1.0
                && !m.iter().any(|((n, l), _)| {
                    n == "keywave_coordinator_campaign_wave"
                        && l.get("campaign").map(String::as_str) == Some(cid.as_str())
                })
        }
    })
    .await
    .expect("the campaign shows as completed, with no current wave");
    assert_eq!(sum(&after, "keywave_coordinator_active", &[]), 1.0);

    // Region liveness: each region's live worker, never silent, its queue
    // read (empty now: queued and in flight are 0).
    keywave_tests::wait_until(Duration::from_secs(10), || async move {
        let m = parse(&get(addr, "/metrics").await.1);
        REGIONS.iter().all(|r| {
            let at = [("region", *r)];
            sum(&m, "keywave_coordinator_region_workers", &at) == 1.0
                && sum(&m, "keywave_coordinator_region_silent_seconds", &at) == 0.0
                && m.iter().any(|((n, l), _)| {
                    n == "keywave_coordinator_region_tasks_queued"
                        && l.get("region").map(String::as_str) == Some(*r)
                })
                && sum(&m, "keywave_coordinator_region_tasks_in_flight", &at) == 0.0
        })
    })
    .await
    .expect("every region shows one live worker and its queue");

    // The workers' counters add up to the same counts.
    let (mut ok, mut failed, mut set_count) = (0.0, 0.0, 0.0);
    for w in &worker_addrs {
        assert_eq!(get(*w, "/healthz").await.0, 200);
        assert_eq!(get(*w, "/readyz").await.0, 200);
        let m = parse(&get(*w, "/metrics").await.1);
        ok += sum(
            &m,
            "keywave_worker_tasks_total",
            &[("outcome", "succeeded")],
        );
        failed += sum(&m, "keywave_worker_tasks_total", &[("outcome", "failed")]);
        set_count += sum(
            &m,
            "keywave_worker_step_duration_seconds_count",
            &[("step", "set")],
        );
        assert_eq!(sum(&m, "keywave_worker_tasks_in_flight", &[]), 0.0);
        assert_eq!(sum(&m, "keywave_worker_ready", &[]), 1.0);
        assert!(has(&m, "keywave_worker_step_duration_seconds_bucket"));
    }
    assert_eq!(ok as u64, status.succeeded());
    assert_eq!(failed as u64, status.failed());
    assert!(
        set_count as u64 >= status.succeeded(),
        "a timed set per success"
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);

    coordinator.stop().await;
    stop.cancel();
    for w in workers {
        w.stop().await;
    }
}
