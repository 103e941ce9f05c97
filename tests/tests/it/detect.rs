//! Leak detections in, containment out: real HTTP requests against the
//! webhook server (GitHub, GitGuardian, generic signed JSON), detections on
//! NATS for real Redis ACL users, 1,000 overlapping detections coalesced into
//! one campaign, a coordinator restarted between receiving a detection
//! and starting its campaign, credentials tagged `approval=required`
//! contained only once approved, and the polling fallback (a real local
//! HTTP server listing open alerts, some of which also came by webhook).

use crate::support::{self, credentials, secret};
use async_nats::jetstream::consumer::pull;
use keywave_cli::containment as report;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::detect::{
    self as wire_detect, CredentialRef, DetectKey, Detection, RotatedNotice, Severity, Timestamp,
    STREAM_DETECTIONS,
};
use keywave_common::publish::{self, AckWindow};
use keywave_common::topology;
use keywave_common::wire::{CampaignState, Credential, Strategy, TargetKind, SCHEMA_VERSION};
use keywave_coordinator::detect::poll::{PollFormat, PollSource};
use keywave_coordinator::detect::store::{self, DetectionRecord, Outcome};
use keywave_coordinator::detect::webhook::{sign, WebhookConfig, WebhookServer};
use keywave_coordinator::detect::{DetectOptions, Detector, IntakeConfig};
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const GITHUB_SECRET: &str = "gh-webhook-secret-for-tests";
const GITGUARDIAN_SECRET: &str = "gg-signature-token-for-tests";
const GENERIC_SECRET: &str = "siem-shared-secret-for-tests";

/// A detection intake running in the background.
struct RunningDetector {
    cancel: CancellationToken,
    handle: JoinHandle<Result<(), keywave_coordinator::detect::DetectError>>,
    webhook: Option<SocketAddr>,
}

impl RunningDetector {
    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("detector stops within 30 s")
            .expect("detector task")
            .expect("detector run");
    }
}

fn intake(window: Duration) -> IntakeConfig {
    IntakeConfig {
        window,
        // Redelivery of a detection held by a dead coordinator, shortened.
        ack_wait: Duration::from_secs(2),
        task_timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

fn webhook_config() -> WebhookConfig {
    let mut cfg = WebhookConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.github_secret = Some(Secret::new(GITHUB_SECRET.into()));
    cfg.gitguardian_secret = Some(Secret::new(GITGUARDIAN_SECRET.into()));
    cfg.generic_secret = Some(Secret::new(GENERIC_SECRET.into()));
    cfg.max_body_bytes = 64 * 1024;
    cfg.max_skew = Duration::from_secs(300);
    cfg
}

async fn start_detector(
    client: &async_nats::Client,
    intake: IntakeConfig,
    key: Option<DetectKey>,
    webhook: Option<WebhookConfig>,
) -> RunningDetector {
    start_detector_with(client, intake, key, webhook, Vec::new()).await
}

/// [`start_detector`] that also polls `polls`.
async fn start_detector_with(
    client: &async_nats::Client,
    intake: IntakeConfig,
    key: Option<DetectKey>,
    webhook: Option<WebhookConfig>,
    polls: Vec<PollSource>,
) -> RunningDetector {
    let opts = DetectOptions {
        topology: support::topology(),
        intake,
        detect_key: key,
        webhook,
        polls,
    };
    let detector = Detector::start(client.clone(), opts)
        .await
        .expect("detector starts");
    let webhook = detector.webhook_addr();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(detector.run(cancel.clone()));
    RunningDetector {
        cancel,
        handle,
        webhook,
    }
}

/// One real HTTP/1.1 request; returns the status and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    declared_len: Option<usize>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // JSON unless the caller sets a Content-Type of its own.
    let content_type = match headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        true => "",
        false => "Content-Type: application/json\r\n",
    };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: keywave.test\r\nUser-Agent: GitHub-Hookshot/test\r\n{content_type}Content-Length: {}\r\nConnection: close\r\n",
        declared_len.unwrap_or(body.len())
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn now_secs() -> String {
    (keywave_common::now_ms() / 1000).to_string()
}

/// Detections stored on `KEYWAVE_DETECTIONS` so far.
async fn stored_detections(client: &async_nats::Client) -> Vec<Detection> {
    support::read_stream(client, STREAM_DETECTIONS, "keywave.detect.>")
        .await
        .iter()
        .map(|m| {
            Detection::decode(m.headers.as_ref(), &m.payload).expect("stored detection decodes")
        })
        .collect()
}

/// Detection records of one outcome so far.
async fn records(client: &async_nats::Client, outcome: Outcome) -> Vec<DetectionRecord> {
    support::read_stream(
        client,
        topology::STREAM_EVENTS,
        &keywave_common::subjects::event(store::EVENT_SCOPE, outcome.as_str()),
    )
    .await
    .iter()
    .map(|m| serde_json::from_slice(&m.payload).expect("record decodes"))
    .collect()
}

async fn containment_campaigns(api: &ApiClient) -> Vec<String> {
    // `campaign.list` scans the campaigns bucket; a scan that times out
    // under load is retried rather than failing the test on it.
    let list = keywave_tests::wait_for(Duration::from_secs(60), || async {
        api.list()
            .await
            .map_err(|e| eprintln!("campaign list failed, retrying: {e}"))
            .ok()
    })
    .await
    .expect("campaign list answers");
    list.into_iter()
        .filter(|c| c.strategy == Strategy::Containment)
        .map(|c| c.campaign_id)
        .collect()
}

/// Waits for exactly one containment campaign and for it to end.
async fn the_containment_campaign(api: &ApiClient) -> String {
    let cid = keywave_tests::wait_for(Duration::from_secs(30), || async {
        containment_campaigns(api).await.into_iter().next()
    })
    .await
    .expect("a containment campaign starts");
    let status = api
        .wait_terminal(&cid, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    cid
}

/// The intake consumer's state, once it exists.
async fn intake_info(
    js: &async_nats::jetstream::Context,
) -> Option<async_nats::jetstream::consumer::Info> {
    let stream = js.get_stream(STREAM_DETECTIONS).await.ok()?;
    let mut c = stream
        .get_consumer::<pull::Config>("detect-intake")
        .await
        .ok()?;
    c.info().await.ok().cloned()
}

/// Waits until the intake has settled every detection on the stream.
async fn intake_drained(client: &async_nats::Client) {
    let js = topology::context(client.clone());
    keywave_tests::wait_until(Duration::from_secs(30), || {
        let js = js.clone();
        async move {
            intake_info(&js)
                .await
                .is_some_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
        }
    })
    .await
    .expect("the intake settles every detection");
}

fn detection(source_id: String, credential: CredentialRef) -> Detection {
    Detection {
        v: SCHEMA_VERSION,
        source: "siem".into(),
        source_id,
        detected_at: Timestamp::now(),
        credential,
        severity: Severity::Critical,
        evidence_url: Some("https://siem.example.com/alerts/1".into()),
        labels: BTreeMap::new(),
    }
}

/// Sim credentials seeded at a fresh sim target and enrolled in a fresh
/// worker of region `eu`.
async fn sim_fleet(
    client: &async_nats::Client,
    prefix: &str,
    n: usize,
) -> (
    Vec<Credential>,
    Arc<SimTarget>,
    support::RunningWorker,
    HashMap<String, Secret>,
) {
    let creds = credentials(prefix, n, &["eu"], "sim-main", TargetKind::Sim);
    support::put_inventory(client, &creds).await;
    let sim = SimTarget::new(SimOptions::default());
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 64);
    let worker = support::start_worker(
        client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    let mut initial = HashMap::new();
    for c in &creds {
        let s = secret();
        sim.seed(&c.principal, &s);
        worker.store.enroll(&c.id, s.clone()).await.unwrap();
        initial.insert(c.id.clone(), s);
    }
    (creds, sim, worker, initial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_authenticate_translate_and_count() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &support::topology())
        .await
        .unwrap();
    keywave_common::topology::detection_streams(&js, &support::topology())
        .await
        .unwrap();
    let hook = WebhookServer::bind(webhook_config(), js.clone())
        .await
        .unwrap();
    let addr = hook.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let serving = tokio::spawn(hook.serve(cancel.clone()));

    let github_body = r#"{"action":"created","alert":{"number":7,"created_at":"2026-03-17T15:42:05Z","html_url":"https://github.com/acme/payments/security/secret-scanning/7","secret_type":"redis_connection_string","secret_type_display_name":"Redis connection string","validity":"unknown","publicly_leaked":true,"multi_repo":false},"repository":{"id":1,"name":"payments","full_name":"acme/payments","private":true},"sender":{"login":"github","type":"Bot"}}"#;
    let gh = |sig: String| {
        vec![
            ("X-GitHub-Event", "secret_scanning_alert".to_string()),
            (
                "X-GitHub-Delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
            ),
            ("X-Hub-Signature-256", sig),
        ]
    };
    // Good signature: accepted, then de-duplicated when GitHub redelivers.
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github(GITHUB_SECRET, github_body.as_bytes())),
        github_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    assert!(
        body.contains("\"detection\":\"github:acme/payments#7\""),
        "{body}"
    );
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github(GITHUB_SECRET, github_body.as_bytes())),
        github_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 202);
    assert!(body.contains("duplicate"), "{body}");
    // Wrong secret, tampered body, no signature.
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github("not-the-secret", github_body.as_bytes())),
        github_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("bad_signature"), "{body}");
    let tampered = github_body.replace("\"number\":7", "\"number\":8");
    let (st, _) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github(GITHUB_SECRET, github_body.as_bytes())),
        tampered.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 401);
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &[("X-GitHub-Event", "secret_scanning_alert".into())],
        github_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 401);
    assert!(body.contains("missing x-hub-signature-256"), "{body}");
    // Signed but malformed JSON; signed but oversized (declared length).
    let bad = b"{\"action\":\"created\",\"alert\":";
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github(GITHUB_SECRET, bad)),
        bad,
        None,
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("malformed JSON"), "{body}");
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &gh(sign::github(GITHUB_SECRET, b"{}")),
        b"",
        Some(10 * 1024 * 1024),
    )
    .await;
    assert_eq!(st, 413, "{body}");
    // A ping and a resolved alert are authentic but create nothing.
    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "ping".into()),
            ("X-Hub-Signature-256", sign::github(GITHUB_SECRET, ping)),
        ],
        ping,
        None,
    )
    .await;
    assert_eq!((st, body.contains("ignored")), (202, true), "{body}");

    // GitGuardian: HMAC keyed with timestamp + token over the body.
    let gg_body = r#"{"source":"GitGuardian","timestamp":"2026-03-17T15:42:06.788914Z","action":"incident_triggered","message":"A new incident has been detected.","target_user":"GitGuardian","incident":{"id":424242,"date":"2026-03-17T15:42:06.140481Z","detector":{"name":"redis_credentials","display_name":"Redis Credentials"},"secret_hash":"Ri9FjVgdOlPnBmujoxP4XPJcbe82","status":"TRIGGERED","severity":"critical","validity":"cannot_check","occurrences":[{"id":1,"source":{"full_name":"acme/payments"},"filepath":"config/redis.env"}],"gitguardian_url":"https://dashboard.gitguardian.com/workspace/1/incidents/424242"}}"#;
    let ts = now_secs();
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/gitguardian",
        &[
            (
                "Gitguardian-Signature",
                sign::gitguardian(GITGUARDIAN_SECRET, &ts, gg_body.as_bytes()),
            ),
            ("Timestamp", ts.clone()),
        ],
        gg_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    // Correctly signed but an hour old: a replay.
    let old = (keywave_common::now_ms() / 1000 - 3600).to_string();
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/gitguardian",
        &[
            (
                "Gitguardian-Signature",
                sign::gitguardian(GITGUARDIAN_SECRET, &old, gg_body.as_bytes()),
            ),
            ("Timestamp", old),
        ],
        gg_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("\"outcome\":\"stale\""), "{body}");
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/gitguardian",
        &[
            (
                "Gitguardian-Signature",
                sign::gitguardian("wrong", &ts, gg_body.as_bytes()),
            ),
            ("Timestamp", ts.clone()),
        ],
        gg_body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 401, "{body}");
    assert!(body.contains("bad_signature"), "{body}");

    // The generic signed JSON: a detection naming an unknown credential is
    // authentic and accepted; matching is the intake's job.
    let generic = serde_json::to_vec(&detection(
        "8812".into(),
        CredentialRef::by_id("no-such-credential"),
    ))
    .unwrap();
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/detection",
        &[
            (
                "X-Keywave-Signature",
                sign::generic(GENERIC_SECRET, &ts, &generic),
            ),
            ("X-Keywave-Timestamp", ts.clone()),
        ],
        &generic,
        None,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    // The same authentic body declared as text/plain (what a browser page
    // can send cross-origin without a preflight) is refused.
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let (st, body) = http(
            addr,
            "POST",
            "/webhooks/detection",
            &[
                ("Content-Type", content_type.to_string()),
                (
                    "X-Keywave-Signature",
                    sign::generic(GENERIC_SECRET, &ts, &generic),
                ),
                ("X-Keywave-Timestamp", ts.clone()),
            ],
            &generic,
            None,
        )
        .await;
        assert_eq!(st, 415, "{content_type}: {body}");
        assert!(body.contains("unsupported_media_type"), "{body}");
    }
    let invalid = br#"{"source":"siem","source_id":"1","detected_at":"2026-03-17T15:42:05Z","credential":{"secret":"hunter2"}}"#;
    let (st, body) = http(
        addr,
        "POST",
        "/webhooks/detection",
        &[
            (
                "X-Keywave-Signature",
                sign::generic(GENERIC_SECRET, &ts, invalid),
            ),
            ("X-Keywave-Timestamp", ts.clone()),
        ],
        invalid,
        None,
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert!(
        !body.contains("hunter2"),
        "a refused value is not echoed: {body}"
    );

    // Exactly the three accepted requests were published.
    let stored = stored_detections(&client).await;
    let ids: Vec<String> = stored.iter().map(Detection::msg_id).collect();
    assert_eq!(
        ids,
        vec!["github:acme/payments#7", "gitguardian:424242", "siem:8812"]
    );
    assert_eq!(stored[0].severity, Severity::Critical);
    assert_eq!(stored[1].labels["filepath"], "config/redis.env");

    // Every request was counted.
    let (st, metrics) = http(addr, "GET", "/metrics", &[], b"", None).await;
    assert_eq!(st, 200);
    for line in [
        r#"keywave_webhook_requests_total{source="github",outcome="accepted"} 1"#,
        r#"keywave_webhook_requests_total{source="github",outcome="duplicate"} 1"#,
        r#"keywave_webhook_requests_total{source="github",outcome="bad_signature"} 2"#,
        r#"keywave_webhook_requests_total{source="github",outcome="unsigned"} 1"#,
        r#"keywave_webhook_requests_total{source="github",outcome="malformed"} 1"#,
        r#"keywave_webhook_requests_total{source="github",outcome="oversized"} 1"#,
        r#"keywave_webhook_requests_total{source="github",outcome="ignored"} 1"#,
        r#"keywave_webhook_requests_total{source="gitguardian",outcome="accepted"} 1"#,
        r#"keywave_webhook_requests_total{source="gitguardian",outcome="stale"} 1"#,
        r#"keywave_webhook_requests_total{source="gitguardian",outcome="bad_signature"} 1"#,
        r#"keywave_webhook_requests_total{source="detection",outcome="accepted"} 1"#,
        r#"keywave_webhook_requests_total{source="detection",outcome="malformed"} 1"#,
        r#"keywave_webhook_requests_total{source="detection",outcome="unsupported_media_type"} 2"#,
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    assert!(!metrics.contains(GITHUB_SECRET) && !metrics.contains(GITGUARDIAN_SECRET));
    cancel.cancel();
    serving.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_alerts_are_matched_contained_or_recorded() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let (creds, sim, worker, initial) = sim_fleet(&client, "hook", 3).await;
    let coordinator = support::start_coordinator(&client).await;
    let key = DetectKey::generate();
    let detector = start_detector(
        &client,
        intake(Duration::from_millis(300)),
        Some(key.clone()),
        Some(webhook_config()),
    )
    .await;
    let addr = detector.webhook.expect("webhook on");

    // The worker's announcement of today's secret (keyed fingerprint only).
    let leaked = &creds[1];
    RotatedNotice::new(&key, &leaked.id, "eu", &initial[&leaked.id], None)
        .publish(&js)
        .await
        .unwrap();
    let kv = store::bucket(&js, &support::topology()).await.unwrap();
    let fp_key = store::fp_key(&key.fingerprint_secret(&initial[&leaked.id]));
    keywave_tests::wait_until(Duration::from_secs(10), || {
        let kv = kv.clone();
        let k = fp_key.clone();
        async move { matches!(kv.get(&k).await, Ok(Some(_))) }
    })
    .await
    .expect("fingerprint indexed");

    // A GitHub alert in the REST form, carrying the leaked value.
    let body = format!(
        r#"{{"action":"created","alert":{{"number":31,"created_at":"2026-03-17T15:42:05Z","html_url":"https://github.com/acme/app/security/secret-scanning/31","secret_type":"redis_password","secret":{}}},"repository":{{"full_name":"acme/app"}}}}"#,
        serde_json::to_string(initial[&leaked.id].expose()).unwrap()
    );
    let (st, resp) = http(
        addr,
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "secret_scanning_alert".into()),
            (
                "X-Hub-Signature-256",
                sign::github(GITHUB_SECRET, body.as_bytes()),
            ),
        ],
        body.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 202, "{resp}");
    assert!(resp.contains("\"identified\":true"), "{resp}");
    // The value never reached the bus: only its digest.
    let stored = stored_detections(&client).await;
    assert!(stored[0]
        .credential
        .fingerprint
        .as_deref()
        .unwrap()
        .starts_with("sha256:"));

    let api = ApiClient::new(client.clone());
    let cid = the_containment_campaign(&api).await;
    let status = api.status(&cid).await.unwrap();
    assert_eq!(status.spec.selector.ids, vec![leaked.id.clone()]);
    assert!(
        !sim.accepts(&leaked.principal, &initial[&leaked.id]),
        "old secret refused"
    );
    assert_eq!(sim.set_count(&creds[0].principal), 0, "others untouched");

    // An unknown credential (generic) and an unidentifiable GitGuardian
    // incident are recorded, not dropped, and start nothing.
    let ts = now_secs();
    let unknown = serde_json::to_vec(&detection(
        "77".into(),
        CredentialRef::by_login("ghost", "sim-main"),
    ))
    .unwrap();
    let (st, _) = http(
        addr,
        "POST",
        "/webhooks/detection",
        &[
            (
                "X-Keywave-Signature",
                sign::generic(GENERIC_SECRET, &ts, &unknown),
            ),
            ("X-Keywave-Timestamp", ts.clone()),
        ],
        &unknown,
        None,
    )
    .await;
    assert_eq!(st, 202);
    let gg = br#"{"action":"incident_triggered","incident":{"id":99,"date":"2026-03-17T15:42:06Z","severity":"high","detector":{"name":"generic_password"},"gitguardian_url":"https://dashboard.gitguardian.com/workspace/1/incidents/99"}}"#;
    let (st, _) = http(
        addr,
        "POST",
        "/webhooks/gitguardian",
        &[
            (
                "Gitguardian-Signature",
                sign::gitguardian(GITGUARDIAN_SECRET, &ts, gg),
            ),
            ("Timestamp", ts.clone()),
        ],
        gg,
        None,
    )
    .await;
    assert_eq!(st, 202);
    intake_drained(&client).await;
    let unmatched = records(&client, Outcome::Unmatched).await;
    assert_eq!(unmatched.len(), 1, "{unmatched:#?}");
    assert!(
        unmatched[0].reason.contains("ghost"),
        "{}",
        unmatched[0].reason
    );
    let unidentified = records(&client, Outcome::Unidentified).await;
    assert_eq!(unidentified.len(), 1);
    assert_eq!(
        unidentified[0].detection.as_ref().unwrap().msg_id(),
        "gitguardian:99"
    );
    assert_eq!(containment_campaigns(&api).await.len(), 1);

    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

const REDIS_USERS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_on_nats_contain_50_redis_acl_users() {
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let creds = credentials(
        &keywave_tests::unique("leak"),
        REDIS_USERS,
        &["eu"],
        "redis-main",
        TargetKind::Redis,
    );
    let mut initial: HashMap<String, Secret> = HashMap::new();
    for c in &creds {
        let pw = secret();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&c.principal)
            .arg("on")
            .arg(format!(">{}", pw.expose()))
            .arg("+ping")
            .query_async(&mut con)
            .await
            .unwrap();
        initial.insert(c.id.clone(), pw);
    }
    support::put_inventory(&client, &creds).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 16);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &creds {
        worker
            .store
            .enroll(&c.id, initial[&c.id].clone())
            .await
            .unwrap();
    }
    let coordinator = support::start_coordinator(&client).await;
    let detector = start_detector(&client, intake(Duration::from_secs(2)), None, None).await;

    // A SIEM publishes one detection per leaked login, as JSON on NATS.
    let js = topology::context(client.clone());
    let published = Instant::now();
    for (i, c) in creds.iter().enumerate() {
        let d = detection(
            format!("INC-{i}"),
            CredentialRef::by_login(&c.principal, "redis-main"),
        );
        assert!(!wire_detect::publish(&js, &d).await.unwrap());
    }
    let api = ApiClient::new(client.clone());
    let cid = the_containment_campaign(&api).await;
    let contained_in = published.elapsed();
    let status = api.status(&cid).await.unwrap();
    assert_eq!(status.total, REDIS_USERS as u64);
    assert_eq!(status.succeeded(), REDIS_USERS as u64);

    for c in &creds {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        let current = rec.current.expect("current");
        assert!(
            auth(&redis, &c.principal, &current.secret).await,
            "{}: new secret works",
            c.id
        );
        assert!(
            !auth(&redis, &c.principal, &initial[&c.id]).await,
            "{}: old secret refused",
            c.id
        );
    }

    let kv = store::bucket(&js, &support::topology()).await.unwrap();
    let r = report::build(&js, &api, &kv, &cid).await.unwrap();
    assert!(r.exposed.is_empty(), "{}", r.render());
    assert_eq!(r.contained, REDIS_USERS as u64);
    assert!(r
        .timelines
        .iter()
        .all(|t| t.time_to_contain_ms.is_some() && t.published_at_ms.is_some()));
    println!(
        "{} (all 50 contained {contained_in:?} after the first publish)",
        r.render().trim_end()
    );

    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
    for c in &creds {
        let _: i64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&c.principal)
            .query_async(&mut con)
            .await
            .unwrap();
    }
}

/// A real login: `AUTH user password` on a fresh connection.
async fn auth(redis: &RedisServer, user: &str, password: &Secret) -> bool {
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    match redis::cmd("AUTH")
        .arg(user)
        .arg(password.expose())
        .query_async::<()>(&mut con)
        .await
    {
        Ok(()) => true,
        Err(e) if e.code() == Some("WRONGPASS") => false,
        Err(e) => panic!("AUTH {user}: unexpected error {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_overlapping_detections_make_one_campaign() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let (creds, sim, worker, initial) = sim_fleet(&client, "burst", 100).await;
    let coordinator = support::start_coordinator(&client).await;
    let detector = start_detector(&client, intake(Duration::from_secs(2)), None, None).await;

    // 1,000 detections, ten per credential, by id or by login, from two
    // sources, all within one second.
    let js = topology::context(client.clone());
    let mut window = AckWindow::new(1_000);
    let started = Instant::now();
    for i in 0..1_000usize {
        let c = &creds[i % creds.len()];
        let credential = if i % 2 == 0 {
            CredentialRef::by_id(&c.id)
        } else {
            CredentialRef::by_login(&c.principal, "sim-main")
        };
        let mut d = detection(format!("burst-{i}"), credential);
        if i % 3 == 0 {
            d.source = "soar".into();
        }
        let ack = publish::send(
            &js,
            d.subject(),
            keywave_common::codec::Format::Json,
            &d.msg_id(),
            &d,
            None,
        )
        .await
        .unwrap();
        window.push(ack).await.unwrap();
    }
    window.drain().await.unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "1,000 detections took {took:?} to publish"
    );

    let api = ApiClient::new(client.clone());
    let cid = the_containment_campaign(&api).await;
    intake_drained(&client).await;
    assert_eq!(
        containment_campaigns(&api).await,
        vec![cid.clone()],
        "one campaign"
    );
    let status = api.status(&cid).await.unwrap();
    assert_eq!((status.total, status.succeeded()), (100, 100));
    for c in &creds {
        assert_eq!(sim.set_count(&c.principal), 1, "{} rotated once", c.id);
        assert!(!sim.accepts(&c.principal, &initial[&c.id]));
    }
    let kv = store::bucket(&js, &support::topology()).await.unwrap();
    let claim: store::Claim = serde_json::from_slice(
        &kv.get(store::claim_key(&creds[0].id))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (claim.campaign_id.as_str(), claim.detections),
        (cid.as_str(), 10)
    );

    // Late copies of the same leak (detected before the containment began)
    // are recorded as already contained, and rotate nothing again.
    for (i, c) in creds.iter().take(5).enumerate() {
        let mut d = detection(format!("late-{i}"), CredentialRef::by_id(&c.id));
        d.detected_at = Timestamp(claim.claimed_at_ms - 1_000);
        wire_detect::publish(&js, &d).await.unwrap();
    }
    intake_drained(&client).await;
    assert_eq!(records(&client, Outcome::AlreadyContained).await.len(), 5);
    assert_eq!(containment_campaigns(&api).await.len(), 1);
    assert_eq!(sim.set_count(&creds[0].principal), 1);

    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_restarted_before_the_campaign_still_contains() {
    support::init_tracing();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let (creds, sim, worker, initial) = sim_fleet(&client, "restart", 2).await;
    let api = ApiClient::new(client.clone());

    // 1. The detection is received (held for a long window, unacked) and
    //    the coordinator dies before the window closes.
    let coordinator = support::start_coordinator(&client).await;
    let first = start_detector(&client, intake(Duration::from_secs(600)), None, None).await;
    let a = &creds[0];
    wire_detect::publish(
        &js,
        &detection("crash-1".into(), CredentialRef::by_id(&a.id)),
    )
    .await
    .unwrap();
    keywave_tests::wait_until(Duration::from_secs(10), || {
        let js = js.clone();
        async move {
            intake_info(&js)
                .await
                .is_some_and(|i| i.num_ack_pending == 1)
        }
    })
    .await
    .expect("the detection is received");
    first.handle.abort();
    let _ = first.handle.await;
    coordinator.stop().await;

    let coordinator = support::start_coordinator(&client).await;
    assert!(
        containment_campaigns(&api).await.is_empty(),
        "nothing started before the crash"
    );
    let second = start_detector(&client, intake(Duration::from_millis(200)), None, None).await;
    let cid = the_containment_campaign(&api).await;
    assert_eq!(
        api.status(&cid).await.unwrap().spec.selector.ids,
        vec![a.id.clone()]
    );
    assert!(!sim.accepts(&a.principal, &initial[&a.id]));
    second.stop().await;

    // 2. The process dies after recording its decision (claims and intent)
    //    but before starting the campaign: the next intake starts it, and
    //    the redelivered detection does not start a second one.
    let b = &creds[1];
    let crashing = start_detector(
        &client,
        IntakeConfig {
            crash_after_intent: true,
            ..intake(Duration::from_millis(200))
        },
        None,
        None,
    )
    .await;
    wire_detect::publish(
        &js,
        &detection("crash-2".into(), CredentialRef::by_id(&b.id)),
    )
    .await
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), crashing.handle)
        .await
        .expect("the injected crash happens")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            keywave_coordinator::detect::DetectError::Intake(
                keywave_coordinator::detect::intake::IntakeError::InjectedCrash(_)
            )
        ),
        "{err}"
    );
    assert_eq!(
        containment_campaigns(&api).await.len(),
        1,
        "the second campaign was not started yet"
    );
    let third = start_detector(&client, intake(Duration::from_millis(200)), None, None).await;
    let cid_b = keywave_tests::wait_for(Duration::from_secs(30), || async {
        containment_campaigns(&api)
            .await
            .into_iter()
            .find(|c| *c != cid)
    })
    .await
    .expect("the pending containment campaign is started");
    let status = api
        .wait_terminal(&cid_b, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed);
    intake_drained(&client).await;
    assert_eq!(containment_campaigns(&api).await.len(), 2);
    assert_eq!(sim.set_count(&b.principal), 1, "rotated once");
    assert!(!sim.accepts(&b.principal, &initial[&b.id]));

    third.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

/// The campaign that claimed `credential`, once the engine knows it (claims
/// are written just before the campaign is started).
async fn claimed_by(
    api: &ApiClient,
    kv: &async_nats::jetstream::kv::Store,
    credential: &str,
    timeout: Duration,
) -> String {
    keywave_tests::wait_for(timeout, || {
        let kv = kv.clone();
        let key = store::claim_key(credential);
        async move {
            let e = kv.get(key).await.ok()??;
            let cid = serde_json::from_slice::<store::Claim>(&e).ok()?.campaign_id;
            api.status(&cid).await.ok().map(|_| cid)
        }
    })
    .await
    .expect("the credential is claimed by a started campaign")
}

/// Measures time to contain on real Redis ACL users: 100 single leaks one
/// after the other, then 10,000 leaked at once. Minutes long, so ignored by
/// default: `cargo test -p keywave-tests --test it measure_time_to_contain -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_time_to_contain() {
    support::init_tracing();
    let singles: usize = std::env::var("KEYWAVE_TTC_SINGLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let burst: usize = std::env::var("KEYWAVE_TTC_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let creds = credentials(
        &keywave_tests::unique("ttc"),
        singles + burst,
        &["eu"],
        "redis-main",
        TargetKind::Redis,
    );
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 64);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &creds {
        let pw = secret();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&c.principal)
            .arg("on")
            .arg(format!(">{}", pw.expose()))
            .arg("+ping")
            .query_async(&mut con)
            .await
            .unwrap();
        worker.store.enroll(&c.id, pw).await.unwrap();
    }
    support::put_inventory(&client, &creds).await;
    let coordinator = support::start_coordinator(&client).await;
    let detector = start_detector(
        &client,
        IntakeConfig {
            ack_wait: Duration::from_secs(30),
            ..intake(Duration::from_secs(2))
        },
        None,
        None,
    )
    .await;
    let js = topology::context(client.clone());
    let kv = store::bucket(&js, &support::topology()).await.unwrap();
    let api = ApiClient::new(client.clone());

    let mut ttc = Vec::new();
    for (i, c) in creds.iter().take(singles).enumerate() {
        wire_detect::publish(
            &js,
            &detection(format!("single-{i}"), CredentialRef::by_id(&c.id)),
        )
        .await
        .unwrap();
        let cid = claimed_by(&api, &kv, &c.id, Duration::from_secs(30)).await;
        let st = api
            .wait_terminal(&cid, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(st.state, CampaignState::Completed);
        let r = report::build(&js, &api, &kv, &cid).await.unwrap();
        assert!(r.exposed.is_empty());
        ttc.push(r.timelines[0].time_to_contain_ms.unwrap());
    }
    let d = report::Distribution::of(ttc);
    println!("single leaked Redis credential, {} runs, window 2s: p50 {} ms, p95 {} ms, p99 {} ms, max {} ms", d.count, d.p50_ms, d.p95_ms, d.p99_ms, d.max_ms);

    if burst > 0 {
        let mut window = AckWindow::new(2_000);
        let t0 = Instant::now();
        for (i, c) in creds.iter().skip(singles).enumerate() {
            let d = detection(format!("burst-{i}"), CredentialRef::by_id(&c.id));
            let ack = publish::send(
                &js,
                d.subject(),
                keywave_common::codec::Format::Json,
                &d.msg_id(),
                &d,
                None,
            )
            .await
            .unwrap();
            window.push(ack).await.unwrap();
        }
        window.drain().await.unwrap();
        let last = &creds[singles + burst - 1];
        let cid = claimed_by(&api, &kv, &last.id, Duration::from_secs(120)).await;
        let st = api
            .wait_terminal(&cid, Duration::from_secs(1800))
            .await
            .unwrap();
        let all = t0.elapsed();
        let r = report::build(&js, &api, &kv, &cid).await.unwrap();
        println!(
            "{burst} leaked Redis credentials at once: campaign {} {} in {all:?}",
            cid, st.state
        );
        println!(
            "{}",
            r.render().lines().take(4).collect::<Vec<_>>().join("\n")
        );
    }
    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

/// `n` real Redis ACL users (principal = id) in region `eu` on endpoint
/// `redis-main`, tagged by `tags(i)` on top of the fleet's tags, stored in
/// the inventory and enrolled in one worker; returns them with their
/// initial passwords.
async fn redis_fleet(
    redis: &RedisServer,
    client: &async_nats::Client,
    prefix: &str,
    n: usize,
    tags: impl Fn(usize) -> Vec<String>,
) -> (
    Vec<Credential>,
    support::RunningWorker,
    HashMap<String, Secret>,
) {
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut creds = credentials(
        &keywave_tests::unique(prefix),
        n,
        &["eu"],
        "redis-main",
        TargetKind::Redis,
    );
    for (i, c) in creds.iter_mut().enumerate() {
        c.tags.extend(tags(i));
    }
    let mut initial = HashMap::new();
    for c in &creds {
        let pw = secret();
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&c.principal)
            .arg("on")
            .arg(format!(">{}", pw.expose()))
            .arg("+ping")
            .query_async(&mut con)
            .await
            .unwrap();
        initial.insert(c.id.clone(), pw);
    }
    support::put_inventory(client, &creds).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 16);
    let worker = support::start_worker(
        client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &creds {
        worker
            .store
            .enroll(&c.id, initial[&c.id].clone())
            .await
            .unwrap();
    }
    (creds, worker, initial)
}

/// Every containment campaign with its credentials, once `n` exist.
async fn containments(api: &ApiClient, n: usize) -> Vec<keywave_common::api::CampaignStatus> {
    let ids = keywave_tests::wait_for(Duration::from_secs(30), || async {
        let c = containment_campaigns(api).await;
        (c.len() >= n).then_some(c)
    })
    .await
    .unwrap_or_else(|_| panic!("{n} containment campaigns start"));
    let mut out = Vec::new();
    for id in ids {
        out.push(api.status(&id).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_credentials_wait_for_an_approval_the_others_are_contained_at_once() {
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    // Two of four Redis users need an approval before containment.
    let (creds, worker, initial) = redis_fleet(&redis, &client, "gated", 4, |i| {
        if i < 2 {
            vec!["approval=required".into()]
        } else {
            vec![]
        }
    })
    .await;
    let coordinator = support::start_coordinator(&client).await;
    let detector = start_detector(&client, intake(Duration::from_secs(1)), None, None).await;
    let js = topology::context(client.clone());
    for (i, c) in creds.iter().enumerate() {
        let d = detection(
            format!("GATE-{i}"),
            CredentialRef::by_login(&c.principal, "redis-main"),
        );
        wire_detect::publish(&js, &d).await.unwrap();
    }
    let api = ApiClient::new(client.clone());
    let all = containments(&api, 2).await;
    assert_eq!(all.len(), 2, "one campaign for each policy: {all:#?}");
    let (gated, open): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|s| s.spec.approve_before_waves == vec![0]);
    let (gated, open) = (&gated[0], &open[0]);
    let ids = |range: std::ops::Range<usize>| {
        let mut v: Vec<String> = creds[range].iter().map(|c| c.id.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(gated.spec.selector.ids, ids(0..2));
    assert_eq!(open.spec.selector.ids, ids(2..4));

    // The untagged ones are contained without anybody.
    let s = api
        .wait_terminal(&open.campaign_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    for c in &creds[2..] {
        assert!(!auth(&redis, &c.principal, &initial[&c.id]).await);
    }
    // The tagged ones wait, exposed secrets untouched, visibly.
    let s = api
        .wait_terminal(&gated.campaign_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(s.state, CampaignState::AwaitingApproval, "{s:#?}");
    for c in &creds[..2] {
        assert!(auth(&redis, &c.principal, &initial[&c.id]).await);
    }
    let contained = records(&client, Outcome::Contained).await;
    assert!(
        contained
            .iter()
            .any(|r| r.reason.contains("waits for an approval")
                && r.reason.contains("approval=required")),
        "{contained:#?}"
    );
    // Another detection of a waiting credential joins the waiting campaign.
    wire_detect::publish(
        &js,
        &detection(
            "GATE-again".into(),
            CredentialRef::by_login(&creds[0].principal, "redis-main"),
        ),
    )
    .await
    .unwrap();
    keywave_tests::wait_until(Duration::from_secs(30), || async {
        records(&client, Outcome::Coalesced)
            .await
            .iter()
            .any(|r| r.campaign_id.as_deref() == Some(gated.campaign_id.as_str()))
    })
    .await
    .expect("the repeat is coalesced into the waiting campaign");
    assert_eq!(containment_campaigns(&api).await.len(), 2);

    // A security engineer approves: contained.
    let s = api
        .approve(&gated.campaign_id, None, "sec-eng")
        .await
        .unwrap();
    assert_eq!(s.waves[0].approved_by.as_deref(), Some("sec-eng"));
    let s = api
        .wait_terminal(&gated.campaign_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    for c in &creds {
        assert!(
            !auth(&redis, &c.principal, &initial[&c.id]).await,
            "{}: old secret refused",
            c.id
        );
        let current = worker.store.get(&c.id).await.unwrap().unwrap().current;
        assert!(auth(&redis, &c.principal, &current.unwrap().secret).await);
    }
    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}

const POLL_TOKEN: &str = "poll-bearer-token-for-tests";

/// A scanner's "open alerts" API: empty until armed, bearer token required.
#[derive(Clone)]
struct AlertsApi {
    armed: Arc<std::sync::atomic::AtomicBool>,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    siem: Arc<String>,
    github: Arc<String>,
}

async fn serve_alerts(api: AlertsApi) -> SocketAddr {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::atomic::Ordering;
    fn answer(api: &AlertsApi, h: &HeaderMap, body: &str) -> (StatusCode, String) {
        let auth = h.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {POLL_TOKEN}")) {
            return (StatusCode::UNAUTHORIZED, "{}".into());
        }
        if !api.armed.load(Ordering::SeqCst) {
            return (StatusCode::OK, "[]".into());
        }
        api.hits.fetch_add(1, Ordering::SeqCst);
        (StatusCode::OK, body.to_string())
    }
    let app = axum::Router::new()
        .route(
            "/siem/open-alerts",
            axum::routing::get(
                |axum::extract::State(a): axum::extract::State<AlertsApi>, h: HeaderMap| async move {
                    let body = a.siem.clone();
                    answer(&a, &h, &body)
                },
            ),
        )
        .route(
            "/repos/acme/app/secret-scanning/alerts",
            axum::routing::get(
                |axum::extract::State(a): axum::extract::State<AlertsApi>, h: HeaderMap| async move {
                    let body = a.github.clone();
                    answer(&a, &h, &body)
                },
            ),
        )
        .route(
            "/big",
            axum::routing::get(|| async { format!("[{}]", " ".repeat(8192)) }),
        )
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polled_alerts_are_contained_once_even_when_a_webhook_brought_them_too() {
    use std::sync::atomic::Ordering;
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let js = topology::context(client.clone());
    let (creds, worker, initial) = redis_fleet(&redis, &client, "poll", 3, |_| vec![]).await;
    let key = DetectKey::generate();
    // A: a GitHub alert carrying the value (webhook and REST list);
    // B: a SIEM alert (generic webhook and polled); C: polled only.
    let (a, b, c) = (&creds[0], &creds[1], &creds[2]);

    let det_b = detection(
        "INC-B".into(),
        CredentialRef::by_login(&b.principal, "redis-main"),
    );
    let det_c = detection(
        "INC-C".into(),
        CredentialRef::by_login(&c.principal, "redis-main"),
    );
    let a_secret = serde_json::to_string(initial[&a.id].expose()).unwrap();
    let alerts = AlertsApi {
        armed: Default::default(),
        hits: Default::default(),
        siem: Arc::new(serde_json::to_string(&vec![&det_b, &det_c]).unwrap()),
        github: Arc::new(format!(
            r#"[{{"number":31,"state":"open","created_at":"2026-03-17T15:42:05Z","url":"https://api.github.com/repos/acme/app/secret-scanning/alerts/31","html_url":"https://github.com/acme/app/security/secret-scanning/31","secret_type":"redis_password","secret":{a_secret}}},
                {{"number":32,"state":"resolved","resolution":"revoked","url":"https://api.github.com/repos/acme/app/secret-scanning/alerts/32"}}]"#
        )),
    };
    let http_addr = serve_alerts(alerts.clone()).await;
    let src = |name: &str, path: &str, format: PollFormat, token: bool| {
        let mut s = PollSource::new(name, format!("http://{http_addr}{path}"), format);
        s.interval = Duration::from_secs(1);
        s.timeout = Duration::from_secs(5);
        s.token = token.then(|| Secret::new(POLL_TOKEN.into()));
        s
    };
    let mut big = src("too-big", "/big", PollFormat::Detections, false);
    big.max_body_bytes = 1024;
    let polls = vec![
        src("siem", "/siem/open-alerts", PollFormat::Detections, true),
        src(
            "github-acme-app",
            "/repos/acme/app/secret-scanning/alerts?state=open",
            PollFormat::GithubAlerts,
            true,
        ),
        // Refused (no token) and oversized answers: logged, nothing published.
        src(
            "no-token",
            "/siem/open-alerts",
            PollFormat::Detections,
            false,
        ),
        big,
    ];
    let coordinator = support::start_coordinator(&client).await;
    let detector = start_detector_with(
        &client,
        intake(Duration::from_millis(500)),
        Some(key.clone()),
        Some(webhook_config()),
        polls,
    )
    .await;
    let addr = detector.webhook.expect("webhook on");
    // The worker's announcement of A's secret (keyed fingerprint only).
    RotatedNotice::new(&key, &a.id, "eu", &initial[&a.id], None)
        .publish(&js)
        .await
        .unwrap();
    let kv = store::bucket(&js, &support::topology()).await.unwrap();
    let fp_key = store::fp_key(&key.fingerprint_secret(&initial[&a.id]));
    keywave_tests::wait_until(Duration::from_secs(10), || {
        let kv = kv.clone();
        let k = fp_key.clone();
        async move { matches!(kv.get(&k).await, Ok(Some(_))) }
    })
    .await
    .expect("fingerprint indexed");

    // First by webhook: A (GitHub, REST form) and B (generic signed JSON).
    let gh = format!(
        r#"{{"action":"created","alert":{{"number":31,"created_at":"2026-03-17T15:42:05Z","html_url":"https://github.com/acme/app/security/secret-scanning/31","secret_type":"redis_password","secret":{a_secret}}},"repository":{{"full_name":"acme/app"}}}}"#
    );
    let (st, resp) = http(
        addr,
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "secret_scanning_alert".into()),
            (
                "X-Hub-Signature-256",
                sign::github(GITHUB_SECRET, gh.as_bytes()),
            ),
        ],
        gh.as_bytes(),
        None,
    )
    .await;
    assert_eq!(st, 202, "{resp}");
    let body_b = serde_json::to_vec(&det_b).unwrap();
    let ts = now_secs();
    let (st, resp) = http(
        addr,
        "POST",
        "/webhooks/detection",
        &[
            (
                "X-Keywave-Signature",
                sign::generic(GENERIC_SECRET, &ts, &body_b),
            ),
            ("X-Keywave-Timestamp", ts.clone()),
        ],
        &body_b,
        None,
    )
    .await;
    assert_eq!(st, 202, "{resp}");

    // Then the scanners' APIs list them (and C) on every poll.
    alerts.armed.store(true, Ordering::SeqCst);
    let api = ApiClient::new(client.clone());
    let want: std::collections::BTreeSet<String> = creds.iter().map(|c| c.id.clone()).collect();
    keywave_tests::wait_until(Duration::from_secs(60), || async {
        let mut done = std::collections::BTreeSet::new();
        for id in containment_campaigns(&api).await {
            if let Ok(s) = api.status(&id).await {
                if s.state == CampaignState::Completed {
                    done.extend(s.spec.selector.ids);
                }
            }
        }
        done == want
    })
    .await
    .expect("all three contained");
    // A few more polls of the same open alerts change nothing.
    let hits = alerts.hits.load(Ordering::SeqCst);
    keywave_tests::wait_until(Duration::from_secs(20), || async {
        alerts.hits.load(Ordering::SeqCst) >= hits + 4
    })
    .await
    .expect("polling goes on");
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut stored: Vec<String> = stored_detections(&client)
        .await
        .iter()
        .map(|d| d.msg_id())
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        vec!["github:acme/app#31", "siem:INC-B", "siem:INC-C"],
        "one detection per alert, whichever way it came"
    );
    let mut contained: Vec<String> = Vec::new();
    for id in containment_campaigns(&api).await {
        contained.extend(api.status(&id).await.unwrap().spec.selector.ids);
    }
    contained.sort();
    assert_eq!(
        contained,
        want.iter().cloned().collect::<Vec<_>>(),
        "exactly one containment per credential"
    );
    for c in &creds {
        assert!(
            !auth(&redis, &c.principal, &initial[&c.id]).await,
            "{}: old secret refused",
            c.id
        );
    }
    detector.stop().await;
    coordinator.stop().await;
    worker.stop().await;
}
