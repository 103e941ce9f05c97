//! Least privilege on NATS: the real `deploy/nats-secure.conf`, one user per
//! role. A whole campaign runs with every component connected as its own
//! user (and no permission violation anywhere); each identity is refused,
//! by the server, what its role does not need; TLS works and a plaintext
//! client of a TLS-only server is refused.

use crate::support::{self, credentials, in_regions, secret, spec};
use async_nats::jetstream;
use bytes::Bytes;
use keywave_common::client::ApiClient;
use keywave_common::crypto::RegionKey;
use keywave_common::detect::DetectKey;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, OnFailure, Strategy, TargetKind};
use keywave_coordinator::detect::{DetectOptions, Detector};
use keywave_coordinator::CoordinatorOptions;
use keywave_tests::SecureNats;
use keywave_worker::fault::Faults;
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use keywave_worker::WorkerOptions;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const REGIONS: [&str; 2] = ["eu", "us"];

/// A client connected as one user, with every error the server reported on
/// its connection.
#[derive(Clone)]
pub struct Watched {
    pub user: String,
    pub client: async_nats::Client,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    pub async fn connect(server: &SecureNats, user: &str) -> Watched {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        let options = server.probe_options(user).event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().unwrap().push(e.to_string());
                }
            }
        });
        let client = server.client_with(user, options).await;
        Watched {
            user: user.to_string(),
            client,
            errors,
        }
    }

    /// Server errors so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Permission violations so far.
    pub fn violations(&self) -> Vec<String> {
        self.errors()
            .into_iter()
            .filter(|e| e.to_ascii_lowercase().contains("permissions violation"))
            .collect()
    }

    /// Waits until the server reported a permissions violation for `kind`
    /// (`publish` or `subscription`) on exactly `subject`.
    pub async fn expect_violation(&self, kind: &str, subject: &str) {
        let needle = format!("permissions violation for {kind} to \"{subject}\"").to_lowercase();
        let found = keywave_tests::wait_until(Duration::from_secs(5), || {
            let errors = self.errors();
            let needle = needle.clone();
            async move { errors.iter().any(|e| e.to_lowercase().contains(&needle)) }
        })
        .await;
        assert!(
            found.is_ok(),
            "{}: expected the server to refuse {kind} to {subject:?}; server errors: {:?}",
            self.user,
            self.errors()
        );
    }

    /// A JetStream context with a short request timeout (a refused request
    /// is dropped by the server and never answered).
    pub fn js(&self) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client.clone())
    }
}

/// What `keywave-coordinator --regions eu,us` does at start-up: the core
/// topology and each region's task consumer and secret store, as the
/// coordinator user.
pub async fn create_topology(coordinator: &async_nats::Client, regions: &[&str]) {
    create_topology_with(coordinator, regions, &support::topology()).await
}

/// [`create_topology`] with `cfg` (e.g. a supercluster's placement).
pub async fn create_topology_with(
    coordinator: &async_nats::Client,
    regions: &[&str],
    cfg: &topology::Config,
) {
    let js = topology::context(coordinator.clone());
    let cfg = cfg.clone();
    topology::ensure_core(&js, &cfg)
        .await
        .expect("coordinator creates the core topology");
    for r in regions {
        topology::ensure_region(&js, r, &cfg)
            .await
            .expect("coordinator creates the region's consumer and secret store");
    }
}

/// Starts a worker of `region` on `client` (its region's user), announcing
/// rotations with `detect_key`.
async fn start_worker(
    client: &async_nats::Client,
    region: &str,
    targets: Arc<Targets>,
    detect_key: &DetectKey,
) -> support::RunningWorker {
    let opts = WorkerOptions {
        region: region.to_string(),
        worker_id: keywave_tests::unique(&format!("worker-{region}")),
        concurrency: 32,
        topology: support::topology(),
        faults: Faults::none(),
        detect_key: Some(detect_key.clone()),
        ..Default::default()
    };
    support::start_worker_with(client, opts, &RegionKey::generate(), targets).await
}

/// Starts an in-process coordinator on `client` (the coordinator user) and
/// waits until it answers `operator`'s ping.
pub async fn start_coordinator(
    client: &async_nats::Client,
    operator: &async_nats::Client,
) -> support::RunningCoordinator {
    let opts = CoordinatorOptions {
        topology: support::topology(),
        coordinator_id: keywave_tests::unique("coordinator"),
        ..Default::default()
    };
    support::start_coordinator_answering(client, opts, operator, Duration::from_secs(20)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_runs_with_every_component_as_its_own_least_privilege_user() {
    support::init_tracing();
    let server = SecureNats::start();
    let coord = Watched::connect(&server, "coordinator").await;
    let operator = Watched::connect(&server, "operator").await;

    // A worker started before the topology exists says what is missing.
    let early = Watched::connect(&server, "worker-eu").await;
    let js = early.js();
    let err = topology::bind_region(&js, "eu").await.unwrap_err();
    assert!(err.to_string().contains("KEYWAVE_TASKS"), "{err}");

    create_topology(&coord.client, &REGIONS).await;

    // The operator imports the inventory into the existing bucket.
    let creds = credentials("lp", 50, &REGIONS, "sim-main", TargetKind::Sim);
    let kv = operator
        .js()
        .get_key_value(topology::KV_INVENTORY)
        .await
        .expect("operator opens the inventory");
    keywave_coordinator::inventory::put_all(&kv, &creds)
        .await
        .expect("operator imports the inventory");

    // Workers announce rotations (keyed fingerprints) for the detector.
    let detect_key = DetectKey::generate();
    let mut sims = HashMap::new();
    let mut workers = HashMap::new();
    let mut worker_clients = Vec::new();
    for region in REGIONS {
        let w = Watched::connect(&server, &format!("worker-{region}")).await;
        let sim = SimTarget::new(SimOptions::default());
        let mut targets = Targets::new();
        targets.insert("sim-main", sim.clone(), 64);
        let running = start_worker(&w.client, region, Arc::new(targets), &detect_key).await;
        sims.insert(region, sim);
        workers.insert(region, running);
        worker_clients.push(w);
    }
    for c in &creds {
        let s = secret();
        sims[c.region.as_str()].seed(&c.principal, &s);
        workers[c.region.as_str()]
            .store
            .enroll(&c.id, s)
            .await
            .expect("worker enrolls into its own region's store");
    }

    let coordinator = start_coordinator(&coord.client, &operator.client).await;
    // The daemon's detection intake runs as the coordinator user too.
    let detector = Detector::start(
        coord.client.clone(),
        DetectOptions {
            topology: support::topology(),
            detect_key: Some(detect_key.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("detector starts with the coordinator's user");
    let stop_detector = CancellationToken::new();
    let detector = tokio::spawn(detector.run(stop_detector.clone()));
    let api = ApiClient::new(operator.client.clone());
    let id = api
        .start(spec(
            in_regions(&REGIONS),
            Strategy::Continuity,
            "1,10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .expect("operator starts a campaign through the API");
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .expect("campaign ends");
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), 50);
    for c in &creds {
        let rec = workers[c.region.as_str()]
            .store
            .get(&c.id)
            .await
            .unwrap()
            .expect("record");
        let current = rec.current.as_ref().expect("current");
        assert!(
            sims[c.region.as_str()].accepts(&c.principal, &current.secret),
            "{}",
            c.id
        );
        assert_eq!(sims[c.region.as_str()].set_count(&c.principal), 1);
    }

    // The rotation notices reached their stream (workers may publish them).
    assert_eq!(
        stored(
            &coord,
            keywave_common::detect::STREAM_ROTATED,
            "keywave.rotated.>"
        )
        .await,
        50
    );
    // The detection source's detections are stored.
    let siem = Watched::connect(&server, "detect-siem").await;
    assert!(js_publish_acked(&siem, "keywave.detect.siem", b"{\"probe\":true}").await);

    coordinator.stop().await;
    stop_detector.cancel();
    detector
        .await
        .expect("detector task")
        .expect("detector run");
    for (_, w) in workers {
        assert_eq!(w.stop().await.failed, 0);
    }
    // Not one refused request on the way: the configuration grants each
    // role everything it needs.
    for w in [&coord, &operator, &siem]
        .into_iter()
        .chain(worker_clients.iter())
    {
        assert!(
            w.violations().is_empty(),
            "{} was refused something it needs: {:?}",
            w.user,
            w.violations()
        );
    }
    let log = server.log();
    assert!(
        !log.contains("Permissions Violation"),
        "the server refused something during the campaign:\n{}",
        log.lines()
            .filter(|l| l.contains("Permissions Violation"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Publishes `payload` on `subject` through JetStream and says whether the
/// stream acknowledged it (a refused publish is never acknowledged).
async fn js_publish_acked(w: &Watched, subject: &str, payload: &'static [u8]) -> bool {
    match w
        .js()
        .publish(subject.to_string(), Bytes::from_static(payload))
        .await
    {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    }
}

/// Stored messages on `subject` of `stream`, read as the coordinator.
async fn stored(coord: &Watched, stream: &str, subject: &str) -> usize {
    support::read_stream(&coord.client, stream, subject)
        .await
        .len()
}

/// Whether a task is stored on exactly `subject` (the coordinator may
/// read single tasks, as its poison handler does).
async fn task_stored(coord: &Watched, subject: &str) -> bool {
    let region = keywave_common::subjects::parse_task(subject)
        .expect("a task subject")
        .0;
    coord
        .js()
        .get_stream(topology::tasks_stream(region))
        .await
        .expect("tasks stream")
        .get_last_raw_message_by_subject(subject)
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_is_refused_what_its_role_does_not_need() {
    support::init_tracing();
    let server = SecureNats::start();
    let coord = Watched::connect(&server, "coordinator").await;
    create_topology(&coord.client, &REGIONS).await;

    // Something worth stealing: a secret in the us store, a task for us.
    let worker_us = Watched::connect(&server, "worker-us").await;
    let (_, us_kv) = topology::bind_region(&worker_us.js(), "us")
        .await
        .expect("worker-us binds its own region");
    let us_store = keywave_worker::store::SecretStore::from_kv(us_kv, "us", RegionKey::generate());
    us_store
        .enroll("us-cred", secret())
        .await
        .expect("worker-us writes its own store");
    assert!(js_publish_acked(&coord, "keywave.task.us.c-perm", b"{}").await);

    // ---- a worker of region eu
    let eu = Watched::connect(&server, "worker-eu").await;
    topology::bind_region(&eu.js(), "eu")
        .await
        .expect("worker-eu binds its own region");
    // It cannot subscribe to us tasks: not on the bus...
    let mut sub = eu.client.subscribe("keywave.task.us.>").await.unwrap();
    eu.expect_violation("subscription", "keywave.task.us.>")
        .await;
    assert!(js_publish_acked(&coord, "keywave.task.us.c-perm2", b"{}").await);
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            futures::StreamExt::next(&mut sub)
        )
        .await
        .map_or(true, |m| m.is_none()),
        "worker-eu received a us task"
    );
    // ...nor from the us consumer.
    assert!(eu
        .js()
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            "workers-us",
            topology::tasks_stream("us")
        )
        .await
        .is_err());
    eu.expect_violation(
        "publish",
        "$JS.API.CONSUMER.INFO.KEYWAVE_TASKS_us.workers-us",
    )
    .await;
    let pull = eu
        .client
        .request(
            "$JS.API.CONSUMER.MSG.NEXT.KEYWAVE_TASKS_us.workers-us",
            Bytes::from_static(br#"{"batch":1,"expires":500000000}"#),
        )
        .await;
    assert!(pull.is_err(), "worker-eu pulled from workers-us");
    eu.expect_violation(
        "publish",
        "$JS.API.CONSUMER.MSG.NEXT.KEYWAVE_TASKS_us.workers-us",
    )
    .await;
    // It cannot read us secrets: no bucket lookup, no direct get, no
    // message get, no subscription on the bucket's subjects.
    assert!(eu.js().get_key_value("keywave-secrets-us").await.is_err());
    eu.expect_violation("publish", "$JS.API.STREAM.INFO.KV_keywave-secrets-us")
        .await;
    let direct = "$JS.API.DIRECT.GET.KV_keywave-secrets-us.$KV.keywave-secrets-us.us-cred";
    assert!(eu.client.request(direct, Bytes::new()).await.is_err());
    eu.expect_violation("publish", direct).await;
    let msg_get = "$JS.API.STREAM.MSG.GET.KV_keywave-secrets-us";
    assert!(eu
        .client
        .request(
            msg_get,
            Bytes::from_static(br#"{"last_by_subj":"$KV.keywave-secrets-us.us-cred"}"#)
        )
        .await
        .is_err());
    eu.expect_violation("publish", msg_get).await;
    let _kv_sub = eu
        .client
        .subscribe("$KV.keywave-secrets-us.>")
        .await
        .unwrap();
    eu.expect_violation("subscription", "$KV.keywave-secrets-us.>")
        .await;
    // It cannot publish results for us, nor campaign events (decisions).
    assert!(!js_publish_acked(&eu, "keywave.result.us.c-perm", b"{}").await);
    eu.expect_violation("publish", "keywave.result.us.c-perm")
        .await;
    assert!(!js_publish_acked(&eu, "keywave.event.c-perm.wave_completed", b"{}").await);
    eu.expect_violation("publish", "keywave.event.c-perm.wave_completed")
        .await;
    assert_eq!(
        stored(&coord, topology::STREAM_RESULTS, "keywave.result.us.>").await,
        0
    );
    assert_eq!(
        stored(&coord, topology::STREAM_EVENTS, "keywave.event.c-perm.>").await,
        0
    );
    // It announces itself for its own region only (presence heartbeats),
    // and cannot listen to the other regions' workers.
    eu.client
        .publish("keywave.worker.us", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    eu.expect_violation("publish", "keywave.worker.us").await;
    let _w = eu.client.subscribe("keywave.worker.*").await.unwrap();
    eu.expect_violation("subscription", "keywave.worker.*")
        .await;
    // Nor create or delete topology.
    let create = "$JS.API.STREAM.CREATE.STEAL";
    assert!(eu
        .client
        .request(
            create,
            Bytes::from_static(br#"{"name":"STEAL","subjects":["steal.>"]}"#)
        )
        .await
        .is_err());
    eu.expect_violation("publish", create).await;

    // ---- a consumer agent
    let agent = Watched::connect(&server, "agent-eu").await;
    assert!(!js_publish_acked(&agent, "keywave.task.eu.c-agent", b"{}").await);
    agent
        .expect_violation("publish", "keywave.task.eu.c-agent")
        .await;
    assert!(task_stored(&coord, "keywave.task.us.c-perm").await);
    assert!(
        !task_stored(&coord, "keywave.task.eu.c-agent").await,
        "the agent's task was stored"
    );
    let _a = agent
        .client
        .subscribe("keywave.rotated.us.>")
        .await
        .unwrap();
    agent
        .expect_violation("subscription", "keywave.rotated.us.>")
        .await;
    // What it is for works: watch (never write) its region's secret store,
    // attest.
    let agent_js = keywave_common::topology::context(agent.client.clone());
    let secrets = agent_js
        .get_key_value(keywave_common::topology::kv_secrets("eu"))
        .await
        .expect("the agent looks up its region's secret store");
    let _watch = secrets
        .watch_with_history("some-cred")
        .await
        .expect("the agent watches its region's secret store");
    agent
        .client
        .publish("$KV.keywave-secrets-eu.some-cred", Bytes::from_static(b"x"))
        .await
        .unwrap();
    agent
        .expect_violation("publish", "$KV.keywave-secrets-eu.some-cred")
        .await;
    agent
        .client
        .publish("keywave.attest.eu.some-cred", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    agent.client.flush().await.unwrap();

    // ---- a detection source
    let siem = Watched::connect(&server, "detect-siem").await;
    assert!(
        js_publish_acked(&siem, "keywave.detect.siem", b"{\"probe\":true}").await,
        "the detection source publishes its detections"
    );
    assert!(!js_publish_acked(&siem, "keywave.detect.github", b"{}").await);
    siem.expect_violation("publish", "keywave.detect.github")
        .await;
    let _s = siem.client.subscribe("keywave.task.>").await.unwrap();
    siem.expect_violation("subscription", "keywave.task.>")
        .await;
    assert!(siem
        .js()
        .get_key_value(topology::KV_INVENTORY)
        .await
        .is_err());
    siem.expect_violation("publish", "$JS.API.STREAM.INFO.KV_keywave-inventory")
        .await;
    let direct_inv = "$JS.API.DIRECT.GET.KV_keywave-secrets-eu.$KV.keywave-secrets-eu.x";
    assert!(siem.client.request(direct_inv, Bytes::new()).await.is_err());
    siem.expect_violation("publish", direct_inv).await;

    // ---- the coordinator and the operator: no secret store either
    let secrets_get = "$JS.API.DIRECT.GET.KV_keywave-secrets-us.$KV.keywave-secrets-us.us-cred";
    assert!(coord
        .client
        .request(secrets_get, Bytes::new())
        .await
        .is_err());
    coord.expect_violation("publish", secrets_get).await;
    let operator = Watched::connect(&server, "operator").await;
    assert!(operator
        .client
        .request(secrets_get, Bytes::new())
        .await
        .is_err());
    operator.expect_violation("publish", secrets_get).await;
    assert!(!js_publish_acked(&operator, "keywave.task.eu.c-op", b"{}").await);
    operator
        .expect_violation("publish", "keywave.task.eu.c-op")
        .await;
    // Reply subjects are private: nobody subscribes to another's inbox.
    let _i = operator
        .client
        .subscribe("_INBOX_coordinator.>")
        .await
        .unwrap();
    operator
        .expect_violation("subscription", "_INBOX_coordinator.>")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_and_works_with_the_ca() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let server = SecureNats::start_tls();
    // keywave's connection code with the CA: connected, JetStream answers.
    let op = Watched::connect(&server, "operator").await;
    op.client.flush().await.expect("TLS connection works");
    let info = op.client.server_info();
    assert!(info.tls_required, "{info:?}");

    // A plaintext client is refused: the server asks for TLS and drops a
    // client that goes on in the clear.
    let tcp = tokio::net::TcpStream::connect((
        "127.0.0.1",
        server
            .url()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap(),
    ))
    .await
    .unwrap();
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("INFO "), "{line}");
    assert!(line.contains("\"tls_required\":true"), "{line}");
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"user\":\"operator\",\"pass\":\"{}\"}}\r\nPING\r\n",
        server.password("operator")
    );
    let _ = w.write_all(connect.as_bytes()).await;
    let mut rest = String::new();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            rest.clear();
            match r.read_line(&mut rest).await {
                Ok(0) | Err(_) => return None,
                Ok(_) if rest.starts_with("PONG") => return Some(()),
                Ok(_) => continue,
            }
        }
    })
    .await
    .expect("the server answers or hangs up within 5 s");
    assert!(got.is_none(), "a plaintext client got a PONG");

    // keywave's client without the CA cannot verify the server: refused.
    let mut no_ca = server.connect_config("operator");
    no_ca.ca_file = None;
    let refused = keywave_common::nats::connect_as(
        &server.url(),
        server.options("operator").max_reconnects(Some(1)),
        &no_ca,
    )
    .await;
    assert!(refused.is_err(), "connected without trusting the CA");
}
