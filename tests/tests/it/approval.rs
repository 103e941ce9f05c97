//! Approval gates and operator requests, end to end: waves started with
//! `--approve-before-wave` wait (`awaiting_approval`) until `keywave
//! campaign approve`, driven through the real `keywave` binary (exit codes
//! and `--json`); approvals survive a killed coordinator (they are events,
//! replayed by the next one); approving what needs no approval, or a
//! finished campaign, is a `conflict`. Pause, resume and abort act within a
//! second and survive coordinator restarts.

use crate::lease::Node;
use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::wire::{CampaignState, EventKind, OnFailure, Strategy, TargetKind};
use keywave_coordinator::engine::fault::Faults as CoordinatorFaults;
use keywave_tests::{unique, wait_for, NatsServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `keywave --nats <url> --json <args>` (with `USER` set to `user`);
/// returns the exit code and the JSON document on its last stdout line.
async fn keywave(
    bin: &Path,
    url: &str,
    user: Option<&str>,
    args: &[&str],
) -> (i32, serde_json::Value) {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--nats").arg(url).arg("--json").args(args);
    cmd.env_remove("USER");
    if let Some(u) = user {
        cmd.env("USER", u);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("keywave returns within 60 s")
        .expect("keywave runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "keywave {args:?}: stdout is not JSON ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// `n` sim credentials in region `eu`, seeded and enrolled in one worker.
async fn sim_fleet(
    client: &async_nats::Client,
    n: usize,
) -> (Arc<SimTarget>, support::RunningWorker) {
    let creds = credentials(&unique("gate"), n, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(client, &creds).await;
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 32);
    let worker = support::start_worker(
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
        worker.store.enroll(&c.id, s).await.unwrap();
    }
    (sim, worker)
}

async fn wait_state(
    api: &ApiClient,
    cid: &str,
    what: &str,
    f: impl Fn(&keywave_common::api::CampaignStatus) -> bool,
) -> keywave_common::api::CampaignStatus {
    wait_for(Duration::from_secs(60), || async {
        api.status(cid).await.ok().filter(|s| f(s))
    })
    .await
    .unwrap_or_else(|_| panic!("campaign {cid} never reached: {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_approval_gates_survive_a_killed_coordinator() {
    support::init_tracing();
    let bin = support::workspace_binary("keywave-cli", "keywave");
    let server = NatsServer::start();
    let client = server.client().await;
    let url = server.url();
    let (_sim, worker) = sim_fleet(&client, 6).await;
    let api = ApiClient::new(client.clone());
    let a = Node::start(&client, "coord-a", CoordinatorFaults::none()).await;
    assert!(a.active_at_start);

    // Waves of 1, 3 and 2; the canary and wave 1 need an approval.
    let (code, out) = keywave(
        &bin,
        &url,
        None,
        &[
            "campaign",
            "start",
            "--selector",
            "region=eu",
            "--waves",
            "1,50%",
            "--approve-before-wave",
            "0",
            "--approve-before-wave",
            "1",
            "--task-timeout",
            "30s",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let cid = out["campaign_id"].as_str().unwrap().to_string();
    wait_state(&api, &cid, "awaiting approval of wave 0", |s| {
        s.state == CampaignState::AwaitingApproval
    })
    .await;
    let (code, st) = keywave(&bin, &url, None, &["campaign", "status", &cid]).await;
    assert_eq!(code, 0);
    assert_eq!(st["state"], "awaiting_approval");
    assert_eq!(st["current_wave"], 0);
    assert_eq!(st["waves"][0]["approval_required"], true);
    assert_eq!(st["waves"][0]["published"], false);

    // A wave without a gate: a conflict, exit 1, nothing recorded.
    let (code, err) = keywave(
        &bin,
        &url,
        Some("mallory"),
        &["campaign", "approve", &cid, "--wave", "2"],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert_eq!(err["ok"], false);
    let msg = err["error"].as_str().unwrap();
    assert!(
        msg.starts_with("conflict:") && msg.contains("does not need an approval"),
        "{msg}"
    );

    // Wave 1 approved ahead of time, then the coordinator is killed (no
    // snapshot saved, lease not released): the next one replays it.
    let (code, st) = keywave(
        &bin,
        &url,
        None,
        &["campaign", "approve", &cid, "--wave", "1", "--by", "bob"],
    )
    .await;
    assert_eq!(code, 0, "{st}");
    assert_eq!(st["state"], "awaiting_approval", "wave 0 still waits");
    a.kill().await;
    let b = Node::start(&client, "coord-b", CoordinatorFaults::none()).await;
    let s = wait_state(&api, &cid, "still awaiting after the fail-over", |s| {
        s.state == CampaignState::AwaitingApproval
    })
    .await;
    assert_eq!(s.current_wave, 0);
    assert!(s.waves.iter().all(|w| w.started_at_ms.is_none()));

    // `approve` without --by records $USER; the canary starts at once, and
    // wave 1, approved before the fail-over, needs nobody.
    let (code, st) = keywave(&bin, &url, Some("alice"), &["campaign", "approve", &cid]).await;
    assert_eq!(code, 0, "{st}");
    assert_ne!(st["state"], "awaiting_approval", "{st}");
    assert_eq!(st["waves"][0]["approved_by"], "alice");
    let s = api
        .wait_terminal(&cid, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    assert_eq!(s.succeeded(), 6);
    assert_eq!(s.waves[0].approved_by.as_deref(), Some("alice"));
    assert_eq!(s.waves[1].approved_by.as_deref(), Some("bob"));

    // The audit trail: who approved what, and the wave started within a
    // second of its approval.
    let events = support::events(&client, &cid).await;
    let at = |f: &dyn Fn(&EventKind) -> bool| {
        events
            .iter()
            .find(|e| f(&e.kind))
            .map(|e| e.at_ms)
            .unwrap_or_else(|| panic!("event missing in {events:#?}"))
    };
    let approved0 = at(&|k| matches!(k, EventKind::Approved { wave: 0, by } if by == "alice"));
    let started0 = at(&|k| matches!(k, EventKind::WaveStarted { wave: 0, .. }));
    assert!(
        started0 >= approved0 && started0 - approved0 < 1_000,
        "wave 0 started {} ms after its approval",
        started0 as i64 - approved0 as i64
    );
    at(&|k| matches!(k, EventKind::Approved { wave: 1, by } if by == "bob"));
    let required: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::ApprovalRequired { wave, .. } => Some(wave),
            _ => None,
        })
        .collect();
    assert_eq!(required, vec![0], "wave 1 never had to wait");

    // A finished campaign: nothing left to approve.
    let (code, err) = keywave(&bin, &url, Some("alice"), &["campaign", "approve", &cid]).await;
    assert_eq!(code, 1);
    assert!(
        err["error"].as_str().unwrap().starts_with("conflict:"),
        "{err}"
    );
    b.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort_act_within_a_second_and_survive_restarts() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let (_sim, worker) = sim_fleet(&client, 4).await;
    let api = ApiClient::new(client.clone());
    let a = Node::start(&client, "coord-a", CoordinatorFaults::none()).await;
    let mut sp = spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "1",
        0.0,
        OnFailure::Pause,
    );
    sp.bake_ms = 600_000;
    let cid = api.start(sp).await.unwrap();
    wait_state(&api, &cid, "baking after wave 0", |s| {
        s.state == CampaignState::Baking
    })
    .await;

    let t = Instant::now();
    let s = api.pause(&cid).await.unwrap();
    assert_eq!(s.state, CampaignState::Paused);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "pause: {:?}",
        t.elapsed()
    );
    // SIGTERM, then a new coordinator: still paused, nothing issued.
    a.stop().await;
    let b = Node::start(&client, "coord-b", CoordinatorFaults::none()).await;
    let s = wait_state(&api, &cid, "paused after the restart", |_| true).await;
    assert_eq!(s.state, CampaignState::Paused, "{s:#?}");
    assert_eq!(s.current_wave, 0);

    let t = Instant::now();
    let s = api.resume(&cid).await.unwrap();
    assert_ne!(s.state, CampaignState::Paused);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "resume: {:?}",
        t.elapsed()
    );
    wait_state(&api, &cid, "wave 1 done, baking", |s| {
        s.current_wave == 1 && s.state == CampaignState::Baking
    })
    .await;
    // Killed (no snapshot saved): the next coordinator takes over, and an
    // abort sent to it acts at once.
    b.kill().await;
    let c = Node::start(&client, "coord-c", CoordinatorFaults::none()).await;
    wait_for(Duration::from_secs(30), || async {
        api.ping().await.ok().filter(|p| {
            p.coordinator_id == "coord-c"
                && p.role.as_deref() == Some(keywave_common::api::ROLE_ACTIVE)
        })
    })
    .await
    .expect("coord-c takes over");
    let t = Instant::now();
    let s = api.abort(&cid).await.unwrap();
    assert_eq!(s.state, CampaignState::Aborted, "{s:#?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "abort: {:?}",
        t.elapsed()
    );
    c.stop().await;
    let d = Node::start(&client, "coord-d", CoordinatorFaults::none()).await;
    let s = wait_state(&api, &cid, "aborted after the restart", |_| true).await;
    assert_eq!(s.state, CampaignState::Aborted);
    assert_eq!(s.succeeded(), 2, "waves 2 and 3 never issued");
    let started = support::events(&client, &cid)
        .await
        .iter()
        .filter(|e| matches!(e.kind, EventKind::WaveStarted { .. }))
        .count();
    assert_eq!(started, 2, "waves 2 and 3 never started");
    d.stop().await;
    worker.stop().await;
}
