//! The operator CLI end to end: the real `keywave` binary against a real
//! nats-server, an in-process coordinator and sim workers in two regions.
//! plan, start with an approval gate, watch (`--once`, NDJSON, ending at the
//! gate and at the end), pause, a refused rollback, resume, approve, report
//! in JSON, Markdown and HTML (a hostile credential id in a forged result is
//! escaped), an operator rollback of a paused continuity campaign, a refused
//! containment rollback, abort; exit codes and `--json` throughout.

use crate::support::{self, credentials, secret};
use keywave_common::client::ApiClient;
use keywave_common::codec::{self, Format};
use keywave_common::crypto::RegionKey;
use keywave_common::wire::{CampaignState, RotationResult, TargetKind};
use keywave_tests::{unique, wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// The JSON document on the last stdout line.
    fn json(&self) -> serde_json::Value {
        let last = self.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}; stderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs `keywave --nats <url> <args>`.
async fn keywave(bin: &Path, url: &str, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--nats").arg(url).args(args);
    cmd.env("USER", "cli-test").env_remove("NO_COLOR");
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("keywave returns within 60 s")
        .expect("keywave runs");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `n` sim credentials over `eu` and `us`, one worker per region.
async fn fleet(client: &async_nats::Client, n: usize) -> Vec<support::RunningWorker> {
    let creds = credentials(
        &unique("cli"),
        n,
        &["eu", "us"],
        "sim-main",
        TargetKind::Sim,
    );
    support::put_inventory(client, &creds).await;
    let mut workers = Vec::new();
    for region in ["eu", "us"] {
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 32);
        let w = support::start_worker(
            client,
            region,
            &RegionKey::generate(),
            Arc::new(targets),
            Faults::none(),
        )
        .await;
        for c in creds.iter().filter(|c| c.region == region) {
            let s = secret();
            sim.seed(&c.principal, &s);
            w.store.enroll(&c.id, s).await.unwrap();
        }
        workers.push(w);
    }
    workers
}

async fn wait_state(api: &ApiClient, cid: &str, state: CampaignState) {
    wait_for(Duration::from_secs(60), || async {
        api.status(cid).await.ok().filter(|s| s.state == state)
    })
    .await
    .unwrap_or_else(|_| panic!("campaign {cid} never reached {state}"));
}

/// Publishes a result no worker sent (a forged one, with a hostile id).
async fn forge_result(client: &async_nats::Client, cid: &str, credential_id: &str) {
    let r: RotationResult = serde_json::from_value(serde_json::json!({
        "v": 1, "task_id": format!("{cid}:w99:0"), "campaign_id": cid, "wave": 99,
        "index": 0, "action": "rotate", "credential_id": credential_id, "region": "eu",
        "outcome": "failed", "step": "received", "error_class": "injected",
        "error": "<img src=x onerror=alert(2)>", "worker_id": "mallory", "finished_at_ms": 1
    }))
    .unwrap();
    let js = keywave_common::topology::context(client.clone());
    let id = unique("forged");
    js.publish_with_headers(
        keywave_common::subjects::result("eu", cid),
        codec::headers(Format::Json, &id),
        codec::encode(Format::Json, &r).unwrap(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_plan_start_watch_pause_resume_approve_report() {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-cli", "keywave");
    let server = NatsServer::start();
    let client = server.client().await;
    let url = server.url();
    let workers = fleet(&client, 8).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let sel = "region=eu,us";

    // plan: a dry run, 8 credentials in waves of 1, 4 and 3.
    let o = keywave(
        &bin,
        &url,
        &[
            "--json",
            "campaign",
            "plan",
            "--selector",
            sel,
            "--waves",
            "1,50%",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let plan = o.json();
    assert_eq!(plan["total"], 8);
    assert_eq!(plan["wave_sizes"], serde_json::json!([1, 4, 3]));

    // start with a gate before wave 1.
    let o = keywave(
        &bin,
        &url,
        &[
            "--json",
            "campaign",
            "start",
            "--selector",
            sel,
            "--waves",
            "1,50%",
            "--approve-before-wave",
            "1",
            "--name",
            "cli test",
            "--reason",
            "INC-42 <b>bold</b>",
            "--by",
            "alice",
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let cid = o.json()["campaign_id"].as_str().unwrap().to_string();

    // watch --once: one NDJSON frame, exit 0, whatever the state.
    let o = keywave(&bin, &url, &["--json", "campaign", "watch", &cid, "--once"]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.lines().count(), 1, "{}", o.stdout);
    let f = o.json();
    assert_eq!(f["campaign_id"], cid.as_str());
    assert_eq!(f["total"], 8);
    assert_eq!(f["waves"].as_array().unwrap().len(), 3);
    assert_eq!(f["last"], true);

    // watch (no --once) follows until the gate, then says what to do.
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "watch", &cid, "--interval", "200ms"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let f = o.json();
    assert_eq!(f["state"], "awaiting_approval", "{f}");
    assert_eq!(f["last"], true);
    assert_eq!(f["waves"][0]["phase"], "finished");
    assert_eq!(f["waves"][1]["phase"], "awaiting_approval");
    assert!(
        f["next"].as_str().unwrap().contains("campaign approve"),
        "{f}"
    );
    let regions = f["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2, "{f}");
    let planned: u64 = regions.iter().map(|r| r["total"].as_u64().unwrap()).sum();
    assert_eq!(planned, 8);
    let done: u64 = regions.iter().map(|r| r["done"].as_u64().unwrap()).sum();
    assert_eq!(done, 1, "the canary");
    assert!(
        f["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "approval_required"),
        "{f}"
    );
    // Plain output: no escape sequences when stdout is not a terminal.
    let o = keywave(&bin, &url, &["campaign", "watch", &cid, "--once"]).await;
    assert_eq!(o.code, 0);
    assert!(!o.stdout.contains('\x1b'), "{:?}", o.stdout);
    assert!(o.stdout.contains("REGION"), "{}", o.stdout);
    assert!(o.stdout.contains("needs approval"), "{}", o.stdout);

    // pause; a rollback of a wave that has not run is refused.
    let o = keywave(&bin, &url, &["--json", "campaign", "pause", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["state"], "paused");
    let o = keywave(&bin, &url, &["--json", "campaign", "rollback", &cid]).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    let err = o.json();
    assert_eq!(err["ok"], false);
    assert!(
        err["error"].as_str().unwrap().starts_with("conflict:"),
        "{err}"
    );
    assert_eq!(o.stderr.lines().count(), 1, "one-line reason: {}", o.stderr);

    // resume: back at the gate (resume never approves).
    let o = keywave(&bin, &url, &["--json", "campaign", "resume", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    wait_state(&api, &cid, CampaignState::AwaitingApproval).await;

    // approve: waves 1 and 2 run; watch ends with the campaign, exit 0.
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "approve", &cid, "--by", "alice"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "watch", &cid, "--interval", "200ms"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let f = o.json();
    assert_eq!(f["state"], "completed", "{f}");
    assert_eq!(f["succeeded"], 8);
    let regions = f["regions"].as_array().unwrap();
    let ok: u64 = regions
        .iter()
        .map(|r| r["succeeded"].as_u64().unwrap())
        .sum();
    assert_eq!(ok, 8, "{f}");
    // Every line of a long watch is its own JSON object.
    for line in o.stdout.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("NDJSON");
    }

    // A forged result with a hostile credential id lands in the stream.
    forge_result(&client, &cid, "<script>alert(1)</script>").await;

    // report: JSON on stdout, every credential, summary and controls.
    let o = keywave(
        &bin,
        &url,
        &["campaign", "report", &cid, "--format", "json"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r = o.json();
    assert_eq!(r["status"]["state"], "completed");
    assert_eq!(r["wave_sizes"], serde_json::json!([1, 4, 3]));
    let creds = r["credentials"].as_array().unwrap();
    assert_eq!(creds.iter().filter(|c| c["counted"] == true).count(), 8);
    assert!(creds
        .iter()
        .filter(|c| c["counted"] == true)
        .all(|c| c["new_secret_verified"] == true && c["consumers"] == "not tracked"));
    assert_eq!(r["summary"]["rotations_succeeded"], 8);
    assert_eq!(r["summary"]["unplanned"], 1, "the forged result");
    assert_eq!(r["controls"].as_array().unwrap().len(), 3);
    assert!(r["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["kind"] == "approved" && d["text"].as_str().unwrap().contains("alice")));
    let audit = &r["audit"];
    if !audit.is_null() {
        assert_eq!(audit["hash"].as_str().unwrap().len(), 64, "{audit}");
    }
    assert!(!o.stdout.contains("secret\":\""), "no secret field");

    // Markdown: the wave table, the controls, escaped input.
    let o = keywave(&bin, &url, &["campaign", "report", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let md = &o.stdout;
    assert!(
        md.starts_with(&format!("# keywave campaign report: {cid}")),
        "{md}"
    );
    assert!(md.contains("## Waves"), "{md}");
    assert!(md.contains(" by alice (as stated by the client;"), "{md}");
    assert!(
        md.contains(
            "| wave | size | succeeded | failed | rollback | approval | decision | reason |"
        ),
        "{md}"
    );
    assert!(md.contains("approved by alice"), "{md}");
    assert!(md.contains("## Controls: evidence supporting"), "{md}");
    assert!(md.contains("PR.AA"), "{md}");
    assert!(!md.contains("<script>"), "{md}");
    assert!(!md.contains("<b>bold"), "{md}");

    // HTML to a file, with --json: the result line names the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    let p = path.to_str().unwrap();
    let o = keywave(
        &bin,
        &url,
        &[
            "--json", "campaign", "report", &cid, "--format", "html", "--output", p,
        ],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let w = o.json();
    assert_eq!(w["ok"], true);
    assert_eq!(w["output"], p);
    let html = std::fs::read_to_string(&path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "hostile id escaped"
    );
    assert!(!html.contains("<script"), "no live script");
    assert!(!html.contains("<img"), "no live markup from errors");
    assert!(html.contains("INC-42 &lt;b&gt;bold&lt;/b&gt;"));

    // Errors: one line, non-zero, JSON with --json.
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "report", &cid, "--format", "pdf"],
    )
    .await;
    assert_eq!(o.code, 2);
    assert_eq!(o.json()["ok"], false);
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "report", "c-000000000000"],
    )
    .await;
    assert_eq!(o.code, 1);
    assert!(o.json()["error"].as_str().unwrap().contains("not found"));
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "watch", "c-000000000000"],
    )
    .await;
    assert_eq!(o.code, 1);
    assert_eq!(o.json()["ok"], false);

    coordinator.stop().await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rollback_of_a_paused_campaign_and_containment_refusal() {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-cli", "keywave");
    let server = NatsServer::start();
    let client = server.client().await;
    let url = server.url();
    let workers = fleet(&client, 6).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let start = |strategy: &'static str| {
        let (bin, url) = (bin.clone(), url.clone());
        async move {
            let o = keywave(
                &bin,
                &url,
                &[
                    "--json",
                    "campaign",
                    "start",
                    "--selector",
                    "region=eu,us",
                    "--waves",
                    "2,50%",
                    "--bake",
                    "10m",
                    "--strategy",
                    strategy,
                ],
            )
            .await;
            assert_eq!(o.code, 0, "{}", o.stderr);
            o.json()["campaign_id"].as_str().unwrap().to_string()
        }
    };

    // Continuity: wave 0 done, baking; pause, then roll wave 0 back.
    let cid = start("continuity").await;
    wait_state(&api, &cid, CampaignState::Baking).await;
    let o = keywave(&bin, &url, &["--json", "campaign", "rollback", &cid]).await;
    assert_eq!(o.code, 1, "baking is not paused: {}", o.stdout);
    let o = keywave(&bin, &url, &["--json", "campaign", "pause", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "rollback", &cid, "--wave", "1"],
    )
    .await;
    assert_eq!(o.code, 1, "only the current wave: {}", o.stdout);
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "rollback", &cid, "--wave", "0"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let st = o.json();
    assert!(
        st["state"] == "rolling_back" || st["state"] == "rolled_back",
        "{st}"
    );
    let o = keywave(
        &bin,
        &url,
        &["--json", "campaign", "watch", &cid, "--interval", "200ms"],
    )
    .await;
    assert_eq!(o.code, 3, "rolled back is not completed: {}", o.stdout);
    let f = o.json();
    assert_eq!(f["state"], "rolled_back", "{f}");
    let s = api.status(&cid).await.unwrap();
    assert_eq!(s.waves[0].rolled_back, 2, "{s:#?}");
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("requested by operator"),
        "{s:#?}"
    );
    let o = keywave(
        &bin,
        &url,
        &["campaign", "report", &cid, "--format", "markdown"],
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("wave 0 rollback started (2 tasks)"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("2 restored"), "{}", o.stdout);

    // Containment: never rolled back, a conflict; then aborted.
    let cid = start("containment").await;
    wait_state(&api, &cid, CampaignState::Baking).await;
    let o = keywave(&bin, &url, &["--json", "campaign", "pause", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    let o = keywave(&bin, &url, &["--json", "campaign", "rollback", &cid]).await;
    assert_eq!(o.code, 1, "{}", o.stdout);
    let msg = o.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with("conflict:") && msg.contains("containment"),
        "{msg}"
    );
    let o = keywave(&bin, &url, &["--json", "campaign", "abort", &cid]).await;
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.json()["state"], "aborted");
    let o = keywave(&bin, &url, &["--json", "campaign", "watch", &cid, "--once"]).await;
    assert_eq!(o.code, 3, "aborted: {}", o.stdout);
    assert_eq!(o.json()["state"], "aborted");

    coordinator.stop().await;
    for w in workers {
        w.stop().await;
    }
}

/// `keywave ... | head`: a reader that closes stdout early stops the
/// command quietly (exit 141, like a Unix tool stopped by SIGPIPE), with no
/// panic message; and log lines written to a file carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_stops_quietly_and_redirected_logs_are_plain() {
    use std::process::{Command, Stdio};
    support::init_tracing();
    let bin = support::workspace_binary("keywave-cli", "keywave");
    let server = NatsServer::start();
    let client = server.client().await;
    let _workers = fleet(&client, 8).await;

    // The reader is gone before the first line is written.
    let mut child = Command::new(&bin)
        .args(["--nats", &server.url(), "campaign", "plan"])
        .args(["--selector", "region=eu,us", "--waves", "1,50%"])
        .env_remove("NO_COLOR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keywave runs");
    drop(child.stdout.take());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .expect("keywave exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // Logs redirected to a file (stderr is not a terminal): no ANSI escapes.
    let logs = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(&bin)
        .args(["--nats", "nats://127.0.0.1:1", "campaign", "list"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(logs.reopen().unwrap())
        .status()
        .expect("keywave runs");
    assert!(!status.success());
    let text = std::fs::read_to_string(logs.path()).unwrap();
    assert!(!text.is_empty(), "the failed connection logs something");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text:?}"
    );
}
