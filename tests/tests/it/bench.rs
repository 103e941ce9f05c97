//! The smoke run of `keywave bench`: a small campaign end to end and the
//! bare broker baseline, against a private server. It checks that the run
//! completes and that the line `--json` prints last is one JSON object with
//! the documented keys; timings are never asserted.

use keywave_common::wire::CampaignState;
use keywave_devkit::bench::{self, BenchOptions, BENCH_JSON_KEYS};
use keywave_tests::NatsServer;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_smoke_run_completes_and_prints_the_documented_json() {
    let server = NatsServer::start();
    let report = tokio::time::timeout(
        Duration::from_secs(120),
        bench::run(BenchOptions {
            nats_url: Some(server.url()),
            credentials: 2_000,
            json: true,
            ..Default::default()
        }),
    )
    .await
    .expect("the smoke bench finishes")
    .expect("the smoke bench succeeds");

    assert_eq!(report.state, CampaignState::Completed, "{report:#?}");
    assert_eq!(report.succeeded, 2_000);
    assert_eq!(report.failed, 0);
    assert_eq!(report.results_read, 2_000);

    // What `keywave bench --json` prints as its last stdout line.
    let line = report.json_line();
    assert!(!line.contains('\n'), "one line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
    for key in BENCH_JSON_KEYS {
        assert!(v.get(key).is_some(), "{key} missing from {line}");
    }
    assert_eq!(v["credentials"], 2_000);
    assert_eq!(v["regions"], 3);
    assert_eq!(v["state"], "completed");
    assert!(v["credentials_per_s"].as_f64().is_some_and(|x| x > 0.0));
    assert!(v["ratio_to_baseline"].as_f64().is_some_and(|x| x > 0.0));
    for step in [
        "staged", "set", "tested", "promoted", "revoked", "verified", "total",
    ] {
        let p = &v["step_latency_ms"][step];
        for q in ["p50", "p90", "p99"] {
            assert!(p[q].is_number(), "step_latency_ms.{step}.{q} in {line}");
        }
    }
}
