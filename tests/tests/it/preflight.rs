//! Pre-flight checks: before a wave, the coordinator pings the
//! agent of every `attest` consumer of the wave's credentials
//! (`keywave.agent.v1.<region>.<consumer>.ping`), real `keywave-worker agent`
//! processes answering. Live agents: the wave runs (with every component as
//! its own least-privilege NATS user, no permission refused). A killed agent:
//! the campaign pauses before the wave, naming it, nothing is issued or
//! rotated; the agent restarted and the campaign resumed, the pre-flight
//! passes and the campaign completes. A threshold of 0.5 lets a wave with 1
//! of 3 agents down start. Credentials live on the simulated target.

use crate::support::{self, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::codec;
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_common::wire::{
    AgentStatus, CampaignEvent, CampaignState, ConsumerRef, Credential, EventKind, OnFailure,
    RotationResult, Selector, Strategy, TargetKind, SCHEMA_VERSION,
};
use keywave_tests::process::Daemon;
use keywave_tests::{NatsServer, SecureNats};
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The `keywave-worker` binary (built first if needed).
async fn agent_binary() -> PathBuf {
    tokio::task::spawn_blocking(|| support::workspace_binary("keywave-worker", "keywave-worker"))
        .await
        .unwrap()
}

fn credential(id: &str, consumers: &[&str]) -> Credential {
    Credential {
        v: SCHEMA_VERSION,
        id: id.into(),
        region: "eu".into(),
        endpoint: "sim-main".into(),
        kind: TargetKind::Sim,
        principal: id.into(),
        tags: vec!["preflight".into()],
        owner: None,
        consumers: consumers.iter().map(|c| ConsumerRef::id(*c)).collect(),
    }
}

/// How an agent connects: a plain server, or a user of `nats-secure.conf`.
enum Auth<'a> {
    Open,
    User(&'a SecureNats, &'a str),
}

/// Starts a real agent process for `consumer` in region `eu`, writing each
/// of `credentials` under `<dir>/<consumer>/`; no reload or health command.
fn start_agent(
    bin: &Path,
    url: &str,
    auth: Auth<'_>,
    key: &RegionKey,
    dir: &Path,
    consumer: &str,
    credentials: &[&str],
) -> Daemon {
    let home = dir.join(consumer);
    std::fs::create_dir_all(&home).unwrap();
    let mut config = format!("consumer = \"{consumer}\"\nregion = \"eu\"\nnats_url = \"{url}\"\n");
    if let Auth::User(server, user) = auth {
        let c = server.connect_config(user);
        config.push_str(&format!(
            "[nats]\nuser = \"{user}\"\npassword_file = \"{}\"\ninbox_prefix = \"{}\"\n",
            c.password_file.unwrap().display(),
            c.inbox_prefix.unwrap()
        ));
    }
    for c in credentials {
        config.push_str(&format!(
            "[[credential]]\nid = \"{c}\"\npath = \"{}\"\n",
            home.join(c).display()
        ));
    }
    let path = home.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("agent")
        .arg("--config")
        .arg(&path)
        .env("KEYWAVE_REGION_KEY", key.to_hex())
        .env("RUST_LOG", "info");
    Daemon::spawn(format!("agent {consumer}"), cmd, &home.join("agent.log"))
}

/// Pings `consumer`'s agent of region `eu` as the coordinator does.
async fn ping(client: &async_nats::Client, consumer: &str) -> Option<AgentStatus> {
    let subject = keywave_common::subjects::agent_ping("eu", consumer).unwrap();
    let request = async_nats::Request::new().timeout(Some(Duration::from_secs(1)));
    let m = client.send_request(subject, request).await.ok()?;
    codec::decode(m.headers.as_ref(), &m.payload).ok()
}

/// Waits until every one of `consumers` answers its ping.
async fn wait_alive(client: &async_nats::Client, consumers: &[&str], agents: &[Daemon]) {
    let c = client.clone();
    let all: Vec<String> = consumers.iter().map(|c| c.to_string()).collect();
    keywave_tests::wait_until(Duration::from_secs(20), || {
        let (c, all) = (c.clone(), all.clone());
        async move {
            for who in &all {
                if ping(&c, who).await.is_none() {
                    return false;
                }
            }
            true
        }
    })
    .await
    .unwrap_or_else(|_| {
        let logs: Vec<String> = agents.iter().map(Daemon::log_tail).collect();
        panic!(
            "agents {consumers:?} answer pings; logs:\n{}",
            logs.join("\n")
        )
    });
}

/// A sim target with `creds` seeded, a worker of `eu` with them enrolled.
async fn sim_worker(
    client: &async_nats::Client,
    key: &RegionKey,
    creds: &[Credential],
) -> (Arc<SimTarget>, support::RunningWorker) {
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 16);
    let worker = support::start_worker(client, "eu", key, Arc::new(targets), Faults::none()).await;
    for c in creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s).await.unwrap();
    }
    (sim, worker)
}

/// The `preflight` events of a campaign: (wave, asked, unreachable, passed, reason).
fn preflights(events: &[CampaignEvent]) -> Vec<(u32, u64, u64, bool, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Preflight {
                wave,
                asked,
                unreachable,
                passed,
                reason,
                ..
            } => Some((*wave, *asked, *unreachable, *passed, reason.clone())),
            _ => None,
        })
        .collect()
}

async fn results(client: &async_nats::Client, cid: &str) -> Vec<RotationResult> {
    support::read_stream(
        client,
        topology::STREAM_RESULTS,
        &keywave_common::subjects::result_campaign_filter(cid),
    )
    .await
    .iter()
    .map(|m| codec::decode(m.headers.as_ref(), &m.payload).expect("result decodes"))
    .collect()
}

fn by_tag() -> Selector {
    Selector {
        tags: vec!["preflight".into()],
        ..Default::default()
    }
}

/// Two consumers with live agents: the pre-flight asks both, passes, and the
/// wave runs to completion; every component runs as its own user of the
/// real `deploy/nats-secure.conf` and nothing is refused. An agent's user
/// cannot listen to another region's pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_agents_let_the_wave_run_under_least_privilege() {
    support::init_tracing();
    let bin = agent_binary().await;
    let server = SecureNats::start();
    let coord = server.client("coordinator").await;
    let operator = server.client("operator").await;
    let worker_client = server.client("worker-eu").await;
    crate::permissions::create_topology(&coord, &["eu"]).await;
    let creds = vec![credential("pfa-orders", &["pfa-api", "pfa-batch"])];
    let inventory = topology::context(operator.clone())
        .get_key_value(topology::KV_INVENTORY)
        .await
        .unwrap();
    keywave_coordinator::inventory::put_all(&inventory, &creds)
        .await
        .unwrap();
    let key = RegionKey::generate();
    let (sim, worker) = sim_worker(&worker_client, &key, &creds).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agents: Vec<Daemon> = ["pfa-api", "pfa-batch"]
        .iter()
        .map(|c| {
            start_agent(
                &bin,
                &server.url(),
                Auth::User(&server, "agent-eu"),
                &key,
                dir.path(),
                c,
                &["pfa-orders"],
            )
        })
        .collect();
    let coordinator = crate::permissions::start_coordinator(&coord, &operator).await;
    // What the coordinator's pre-flight will see.
    wait_alive(&coord, &["pfa-api", "pfa-batch"], &agents).await;
    let status = ping(&coord, "pfa-api").await.unwrap();
    assert_eq!(status.region, "eu");
    assert_eq!(status.credentials[0].id, "pfa-orders");

    let api = ApiClient::new(operator.clone());
    let mut s = spec(by_tag(), Strategy::Continuity, "1", 0.0, OnFailure::Pause);
    s.preflight = None; // the default: on, the plan has attest consumers
    let cid = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(25))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.spec.preflight, Some(true));
    assert_eq!(sim.set_count("pfa-orders"), 1);
    let events = support::events(&operator, &cid).await;
    let pre = preflights(&events);
    assert_eq!(pre.len(), 1, "{pre:?}");
    assert_eq!((pre[0].0, pre[0].1, pre[0].2, pre[0].3), (0, 2, 0, true));
    assert_eq!(pre[0].4, "pre-flight: 2 of 2 consumer agents answered");
    let at = |name: &str| events.iter().position(|e| e.kind.name() == name).unwrap();
    assert!(at("preflight") < at("wave_started"));

    // Least privilege: nothing refused on the way; an agent's user hears
    // only its own region's pings.
    let log = server.log();
    assert!(
        !log.contains("Permissions Violation"),
        "the server refused something:\n{}",
        log.lines()
            .filter(|l| l.contains("Permissions Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let eu_agent = crate::permissions::Watched::connect(&server, "agent-eu").await;
    let _s = eu_agent
        .client
        .subscribe("keywave.agent.v1.us.*.ping")
        .await
        .unwrap();
    eu_agent
        .expect_violation("subscription", "keywave.agent.v1.us.*.ping")
        .await;

    coordinator.stop().await;
    worker.stop().await;
    for a in &mut agents {
        a.kill();
    }
}

/// A killed agent: the campaign pauses before the wave with a reason naming
/// the consumer; no task is issued (no result, the target untouched, the
/// secret unchanged). The agent started again and the campaign resumed: the
/// pre-flight runs again, passes, and the campaign completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_agent_pauses_the_campaign_before_the_wave() {
    support::init_tracing();
    let bin = agent_binary().await;
    let server = NatsServer::start();
    let client = server.client().await;
    let creds = vec![credential("pfb-orders", &["pfb-api", "pfb-batch"])];
    support::put_inventory(&client, &creds).await;
    let key = RegionKey::generate();
    let (sim, worker) = sim_worker(&client, &key, &creds).await;
    let before = worker.store.get("pfb-orders").await.unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |consumer: &str| {
        start_agent(
            &bin,
            &server.url(),
            Auth::Open,
            &key,
            dir.path(),
            consumer,
            &["pfb-orders"],
        )
    };
    let mut api_agent = start("pfb-api");
    let mut batch_agent = start("pfb-batch");
    wait_alive(&client, &["pfb-api", "pfb-batch"], &[]).await;
    batch_agent.kill();

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(by_tag(), Strategy::Continuity, "1", 0.0, OnFailure::Pause);
    s.preflight = None;
    let cid = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(15))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Paused, "{status:#?}");
    let reason = status.reason.clone().unwrap();
    assert_eq!(
        reason,
        "pre-flight: 1 of 2 consumer agents unreachable (pfb-batch in eu) > allowed 0.0%; wave 0 not started"
    );
    assert!(!status.waves[0].published && status.waves[0].started_at_ms.is_none());
    // Nothing was issued: no result, the target and the store untouched.
    let events = support::events(&client, &cid).await;
    assert!(
        !events.iter().any(|e| e.kind.name() == "wave_started"),
        "{events:#?}"
    );
    assert!(results(&client, &cid).await.is_empty());
    assert_eq!(sim.set_count("pfb-orders"), 0);
    let now = worker.store.get("pfb-orders").await.unwrap().unwrap();
    assert_eq!(
        now.current.as_ref().unwrap().fingerprint,
        before.current.as_ref().unwrap().fingerprint
    );
    let pre = preflights(&events);
    assert_eq!(pre.len(), 1);
    assert_eq!((pre[0].1, pre[0].2, pre[0].3), (2, 1, false));
    match &events
        .iter()
        .find(|e| e.kind.name() == "preflight")
        .unwrap()
        .kind
    {
        EventKind::Preflight {
            unreachable_agents, ..
        } => {
            assert_eq!(unreachable_agents.len(), 1);
            assert_eq!(unreachable_agents[0].consumer, "pfb-batch");
            assert_eq!(
                unreachable_agents[0].detail.as_deref(),
                Some("no agent listening")
            );
        }
        _ => unreachable!(),
    }

    // The agent comes back; the operator resumes.
    batch_agent = start("pfb-batch");
    wait_alive(&client, &["pfb-api", "pfb-batch"], &[]).await;
    api.resume(&cid).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(25))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(sim.set_count("pfb-orders"), 1);
    let rec = worker.store.get("pfb-orders").await.unwrap().unwrap();
    assert!(sim.accepts("pfb-orders", &rec.current.unwrap().secret));
    let pre = preflights(&support::events(&client, &cid).await);
    assert_eq!(
        pre.iter().map(|p| (p.0, p.2, p.3)).collect::<Vec<_>>(),
        vec![(0, 1, false), (0, 0, true)]
    );

    coordinator.stop().await;
    worker.stop().await;
    api_agent.kill();
    batch_agent.kill();
}

/// With `preflight_max_unreachable` 0.5, one agent of three down lets the
/// wave start; that consumer's rotation then fails `consumer_not_verified`
/// (within the failure budget) and the others rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_lets_the_wave_start_with_some_agents_down() {
    support::init_tracing();
    let bin = agent_binary().await;
    let server = NatsServer::start();
    let client = server.client().await;
    let mut creds: Vec<Credential> = (0..3)
        .map(|i| credential(&format!("pfc-cred-{i}"), &[&format!("pfc-app-{i}")]))
        .collect();
    // The consumer without an agent is not waited for long.
    creds[2].consumers[0].timeout_ms = Some(2_000);
    support::put_inventory(&client, &creds).await;
    let key = RegionKey::generate();
    let (sim, worker) = sim_worker(&client, &key, &creds).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agents: Vec<Daemon> = (0..2)
        .map(|i| {
            start_agent(
                &bin,
                &server.url(),
                Auth::Open,
                &key,
                dir.path(),
                &format!("pfc-app-{i}"),
                &[&format!("pfc-cred-{i}")],
            )
        })
        .collect();
    wait_alive(&client, &["pfc-app-0", "pfc-app-1"], &agents).await;

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(by_tag(), Strategy::Continuity, "3", 0.5, OnFailure::Pause);
    s.preflight = None;
    s.preflight_max_unreachable = 0.5;
    let cid = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(25))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!((status.succeeded(), status.failed()), (2, 1), "{status:#?}");
    let events = support::events(&client, &cid).await;
    let pre = preflights(&events);
    assert_eq!(pre.len(), 1, "{pre:?}");
    assert_eq!((pre[0].1, pre[0].2, pre[0].3), (3, 1, true));
    assert_eq!(
        pre[0].4,
        "pre-flight: 1 of 3 consumer agents unreachable (pfc-app-2 in eu) <= allowed 50.0%"
    );
    assert!(events.iter().any(|e| e.kind.name() == "wave_started"));
    let rs = results(&client, &cid).await;
    let failed: Vec<_> = rs
        .iter()
        .filter(|r| r.error_class.is_some())
        .map(|r| r.credential_id.as_str())
        .collect();
    assert_eq!(failed, ["pfc-cred-2"], "{rs:#?}");
    for i in 0..2 {
        assert_eq!(sim.set_count(&format!("pfc-cred-{i}")), 1);
    }

    coordinator.stop().await;
    worker.stop().await;
    for a in &mut agents {
        a.kill();
    }
}
