//! `keywave reconcile` against real Redis ACL users: after a clean campaign
//! every credential is consistent; a worker crashed between set and promote
//! leaves a PENDING that is first left alone (its task may still run), then
//! reported `would_repair`, repaired (promoted, old secret revoked and
//! refused at Redis), and consistent afterwards; a password changed at Redis
//! behind keywave's back is `needs_attention` and the real `keywave` binary
//! exits non-zero. The workers' admin service answers as in production
//! (request/reply on `keywave.admin.v1.<region>.reconcile`, queue group).

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_cli::reconcile::{self, ReconcileOptions, ReconcileReport};
use keywave_common::admin::ReconcileStatus;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::wire::{CampaignState, Credential, OnFailure, Step, Strategy, TargetKind};
use keywave_tests::{unique, wait_until, NatsServer, RedisServer};
use keywave_worker::admin::{AdminOptions, AdminService};
use keywave_worker::fault::{CrashMode, Faults};
use keywave_worker::store::SecretStore;
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::Targets;
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const EP: &str = "redis-main";

/// Runs `keywave --nats <url> <args>` off the async workers: (exit code, stdout, stderr).
pub async fn run_keywave(nats: &str, args: &[&str]) -> (i32, String, String) {
    let bin = support::workspace_binary("keywave-cli", "keywave");
    let nats = nats.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(bin)
            .arg("--nats")
            .arg(nats)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("keywave runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// Starts a region's admin service (as every `keywave-worker` does).
pub async fn start_admin(
    client: &async_nats::Client,
    region: &str,
    store: SecretStore,
    targets: Arc<Targets>,
) -> CancellationToken {
    let cancel = CancellationToken::new();
    AdminService::new(
        client.clone(),
        AdminOptions {
            region: region.to_string(),
            worker_id: unique("admin"),
            concurrency: 8,
        },
        store,
        targets,
        None,
    )
    .spawn(cancel.clone())
    .await
    .expect("admin service subscribes");
    cancel
}

async fn admin(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A real login: `AUTH user password` on a fresh connection.
async fn auth(redis: &RedisServer, user: &str, password: &Secret) -> bool {
    let mut con = admin(redis).await;
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

/// Redis users with today's passwords, in the inventory.
struct Fleet {
    redis: RedisServer,
    server: NatsServer,
    client: async_nats::Client,
    creds: Vec<Credential>,
    initial: HashMap<String, Secret>,
    targets: Arc<Targets>,
    key: RegionKey,
}

async fn fleet(prefix: &str, n: usize) -> Fleet {
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let mut con = admin(&redis).await;
    let creds = credentials(prefix, n, &["eu"], EP, TargetKind::Redis);
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
    support::put_inventory(&client, &creds).await;
    let mut targets = Targets::new();
    targets.insert(
        EP,
        RedisTarget::connect(RedisOptions { url: redis.url() })
            .await
            .unwrap(),
        8,
    );
    Fleet {
        redis,
        server,
        client,
        creds,
        initial,
        targets: Arc::new(targets),
        key: RegionKey::generate(),
    }
}

impl Fleet {
    async fn enroll_all(&self, store: &SecretStore) {
        for c in &self.creds {
            store
                .enroll(&c.id, self.initial[&c.id].clone())
                .await
                .unwrap();
        }
    }

    async fn reconcile(&self, repair: bool, stale_after: Duration) -> ReconcileReport {
        let report = reconcile::reconcile(
            &self.client,
            &self.creds,
            &ReconcileOptions {
                repair,
                stale_after,
                ..Default::default()
            },
        )
        .await;
        // Fingerprints only: no secret, old or new, anywhere in the report.
        let text = serde_json::to_string(&report).unwrap();
        for s in self.initial.values() {
            assert!(
                !text.contains(s.expose()),
                "a secret leaked into the report"
            );
        }
        report
    }
}

#[tokio::test]
async fn after_a_campaign_every_credential_is_consistent() {
    let f = fleet(&unique("rc-ok"), 6).await;
    let worker =
        support::start_worker(&f.client, "eu", &f.key, f.targets.clone(), Faults::none()).await;
    f.enroll_all(&worker.store).await;
    let admin_svc = start_admin(&f.client, "eu", worker.store.clone(), f.targets.clone()).await;
    let coordinator = support::start_coordinator(&f.client).await;
    let api = ApiClient::new(f.client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu"]),
            Strategy::Continuity,
            "1,100%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed);

    for repair in [false, true] {
        let report = f
            .reconcile(
                repair,
                Duration::from_millis(keywave_common::admin::DEFAULT_STALE_AFTER_MS),
            )
            .await;
        assert_eq!(report.total, 6);
        assert_eq!(
            report.count(ReconcileStatus::Consistent),
            6,
            "{}",
            report.render(true)
        );
        assert_eq!(report.exit_code(), 0);
        for c in &report.credentials {
            // CURRENT logs in, PREVIOUS (the enrolled secret) is refused.
            let seen: Vec<_> = c.checks.iter().map(|k| (k.stage, k.observed)).collect();
            use keywave_common::admin::{Observed, Stage};
            assert_eq!(
                seen,
                vec![
                    (Stage::Current, Observed::Accepted),
                    (Stage::Previous, Observed::Rejected)
                ]
            );
            assert!(c.actions.is_empty());
        }
    }
    coordinator.stop().await;
    admin_svc.cancel();
    worker.stop().await;
    drop(f.server);
}

#[tokio::test]
async fn a_rotation_crashed_between_set_and_promote_is_repaired() {
    let f = fleet(&unique("rc-crash"), 1).await;
    let c = f.creds[0].clone();
    let crashing = support::start_worker(
        &f.client,
        "eu",
        &f.key,
        f.targets.clone(),
        Faults::crash_after(Step::Set, CrashMode::StopWithoutAck),
    )
    .await;
    f.enroll_all(&crashing.store).await;
    let store = crashing.store.clone();
    let coordinator = support::start_coordinator(&f.client).await;
    let api = ApiClient::new(f.client.clone());
    api.start(spec(
        in_regions(&["eu"]),
        Strategy::Continuity,
        "100%",
        0.0,
        OnFailure::Pause,
    ))
    .await
    .unwrap();
    // The worker dies right after the set: the new secret is at Redis and
    // staged as PENDING, never promoted.
    let stats = crashing
        .join(Duration::from_secs(60))
        .await
        .expect("the worker crashes");
    assert!(stats.crashed);
    let pending = store
        .get(&c.id)
        .await
        .unwrap()
        .unwrap()
        .pending
        .expect("a PENDING is left behind");
    let old = f.initial[&c.id].clone();
    assert!(auth(&f.redis, &c.principal, &old).await);
    assert!(auth(&f.redis, &c.principal, &pending.secret).await);

    // Only the admin service runs now (no consumer: the task stays where the
    // crash left it).
    let admin_svc = start_admin(&f.client, "eu", store.clone(), f.targets.clone()).await;

    // Its task may still run (30 s task timeout + margin): left alone.
    let report = f.reconcile(true, Duration::from_secs(900)).await;
    assert_eq!(
        report.count(ReconcileStatus::InFlight),
        1,
        "{}",
        report.render(true)
    );
    assert_eq!(report.exit_code(), 0);
    assert!(store.get(&c.id).await.unwrap().unwrap().pending.is_some());

    // Older than --stale-after: abandoned. A dry run says what it would do.
    wait_until(Duration::from_secs(10), || {
        let store = store.clone();
        let id = c.id.clone();
        async move {
            let p = store.get(&id).await.unwrap().unwrap().pending.unwrap();
            keywave_common::now_ms() > p.since_ms + 1_500
        }
    })
    .await
    .unwrap();
    let stale = Duration::from_secs(1);
    let report = f.reconcile(false, stale).await;
    assert_eq!(
        report.count(ReconcileStatus::WouldRepair),
        1,
        "{}",
        report.render(true)
    );
    assert_eq!(report.exit_code(), reconcile::EXIT_WOULD_REPAIR);
    let r = &report.credentials[0];
    assert!(
        r.actions.iter().any(|a| a.contains("promote PENDING")),
        "{r:?}"
    );
    // The same through the real CLI: exit code 5, fingerprints only.
    let selector = format!("id={}", c.id);
    let (code, stdout, stderr) = run_keywave(
        &f.server.url(),
        &["reconcile", "--selector", &selector, "--stale-after", "1s"],
    )
    .await;
    println!("$ keywave reconcile --selector {selector} --stale-after 1s\n{stdout}");
    assert_eq!(
        code,
        i32::from(reconcile::EXIT_WOULD_REPAIR),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("would_repair     {}", c.id)),
        "{stdout}"
    );
    for s in [&old, &pending.secret] {
        assert!(!stdout.contains(s.expose()) && !stderr.contains(s.expose()));
    }
    assert!(
        auth(&f.redis, &c.principal, &old).await,
        "a dry run changes nothing"
    );
    assert!(store.get(&c.id).await.unwrap().unwrap().pending.is_some());

    // --repair finishes the rotation: promoted, old revoked and refused.
    let report = f.reconcile(true, stale).await;
    println!(
        "$ keywave reconcile --selector {selector} --stale-after 1s --repair\n{}",
        report.render(false)
    );
    assert_eq!(
        report.count(ReconcileStatus::Repaired),
        1,
        "{}",
        report.render(true)
    );
    assert_eq!(report.exit_code(), 0);
    let rec = store.get(&c.id).await.unwrap().unwrap();
    assert!(rec.pending.is_none());
    assert_eq!(rec.current.as_ref().unwrap().secret, pending.secret);
    assert_eq!(rec.previous.as_ref().unwrap().secret, old);
    assert!(
        !auth(&f.redis, &c.principal, &old).await,
        "old secret refused"
    );
    assert!(auth(&f.redis, &c.principal, &pending.secret).await);

    // And now it is consistent.
    let report = f.reconcile(false, stale).await;
    assert_eq!(
        report.count(ReconcileStatus::Consistent),
        1,
        "{}",
        report.render(true)
    );
    assert_eq!(report.exit_code(), 0);

    coordinator.stop().await;
    admin_svc.cancel();
}

#[tokio::test]
async fn a_password_changed_out_of_band_needs_attention_and_fails_the_cli() {
    let f = fleet(&unique("rc-drift"), 3).await;
    let worker =
        support::start_worker(&f.client, "eu", &f.key, f.targets.clone(), Faults::none()).await;
    f.enroll_all(&worker.store).await;
    let admin_svc = start_admin(&f.client, "eu", worker.store.clone(), f.targets.clone()).await;

    // Someone resets one user's password at Redis, bypassing keywave.
    let drifted = &f.creds[1];
    let by_hand = secret();
    let mut con = admin(&f.redis).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&drifted.principal)
        .arg("resetpass")
        .arg(format!(">{}", by_hand.expose()))
        .query_async(&mut con)
        .await
        .unwrap();

    let ids: Vec<&str> = f.creds.iter().map(|c| c.id.as_str()).collect();
    let selector = format!("id={}", ids.join(","));
    let (code, stdout, stderr) = run_keywave(
        &f.server.url(),
        &["reconcile", "--selector", &selector, "--repair"],
    )
    .await;
    println!("$ keywave reconcile --selector {selector} --repair\n{stdout}");
    assert_eq!(
        code,
        i32::from(reconcile::EXIT_NEEDS_ATTENTION),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("needs_attention  {}", drifted.id)),
        "{stdout}"
    );
    assert!(stdout.contains("is refused at the target"), "{stdout}");
    assert!(
        stdout.contains("3 credentials (repair): 2 consistent · 0 repaired"),
        "{stdout}"
    );
    for s in f.initial.values().chain([&by_hand]) {
        assert!(!stdout.contains(s.expose()) && !stderr.contains(s.expose()));
    }
    // Reported, not guessed at: the hand-set password still works.
    assert!(auth(&f.redis, &drifted.principal, &by_hand).await);

    let (code, stdout, _) = run_keywave(
        &f.server.url(),
        &["--json", "reconcile", "--selector", &selector],
    )
    .await;
    assert_eq!(code, i32::from(reconcile::EXIT_NEEDS_ATTENTION));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["summary"]["needs_attention"], 1);
    assert_eq!(v["summary"]["consistent"], 2);

    admin_svc.cancel();
    worker.stop().await;
}
