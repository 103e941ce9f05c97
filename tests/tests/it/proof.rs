//! Never a false proof: logins that let any secret in (a Redis user with
//! `nopass`, a PostgreSQL role behind a `trust` rule), the endpoint's own
//! admin login, two campaigns over the same credentials, and two inventory
//! records for one login. Each case runs against real servers, and what
//! keywave recorded is checked against what the server really does.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::api::StartRequest;
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::wire::{
    CampaignSpec, CampaignState, Credential, EventKind, OnFailure, Selector, Strategy, TargetKind,
};
use keywave_tests::mariadb::ADMIN_USER;
use keywave_tests::{MariaDbServer, NatsServer, PostgresServer, RedisServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::db::{Admin, Continuity, Logins, Tls};
use keywave_worker::targets::mysql::{MysqlOptions, MysqlTarget};
use keywave_worker::targets::postgres::{PostgresOptions, PostgresTarget};
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::sim::{SimOptions, SimTarget};
use keywave_worker::targets::Targets;
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// One containment wave over everything in `eu`, failures allowed (each
/// credential's result is what the test looks at).
fn contain_all() -> CampaignSpec {
    spec(
        in_regions(&["eu"]),
        Strategy::Containment,
        "100%",
        1.0,
        OnFailure::Pause,
    )
}

fn one(id: &str, endpoint: &str, kind: TargetKind, principal: &str) -> Credential {
    let mut c = credentials(id, 1, &["eu"], endpoint, kind).remove(0);
    c.id = id.to_string();
    c.principal = principal.to_string();
    c
}

async fn redis_auth(redis: &RedisServer, user: &str, password: &str) -> bool {
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    match redis::cmd("AUTH")
        .arg(user)
        .arg(password)
        .query_async::<()>(&mut con)
        .await
    {
        Ok(()) => true,
        Err(e) if e.code() == Some("WRONGPASS") => false,
        Err(e) => panic!("AUTH {user}: unexpected error {e}"),
    }
}

/// A Redis user with `nopass` and the endpoint's admin user (`default`,
/// what the admin connection logs in as) are refused with their own class;
/// nothing is staged or recorded for them and neither is changed at Redis,
/// while an ordinary user next to them is rotated and proven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_nopass_and_admin_users_are_never_rotated_or_proven() {
    support::init_tracing();
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let client = nats.client().await;
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let old = secret();
    for args in [
        vec!["SETUSER", "kw-open", "on", "nopass", "~*", "+@all"],
        vec![
            "SETUSER",
            "kw-closed",
            "on",
            &format!(">{}", old.expose()),
            "~*",
            "+@all",
        ],
    ] {
        let _: () = redis::cmd("ACL")
            .arg(&args)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    assert!(
        redis_auth(&redis, "kw-open", "any-wrong-secret").await,
        "fixture: nopass lets anything in"
    );
    let creds = [
        one("open", "redis-main", TargetKind::Redis, "kw-open"),
        one("admin", "redis-main", TargetKind::Redis, "default"),
        one("closed", "redis-main", TargetKind::Redis, "kw-closed"),
    ];
    support::put_inventory(&client, &creds).await;
    let mut targets = Targets::new();
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    targets.insert("redis-main", target, 4);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    worker.store.enroll("closed", old.clone()).await.unwrap();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    let id = api.start(contain_all()).await.unwrap();
    let status = api.wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!((status.succeeded(), status.failed()), (1, 2), "{status:#?}");
    let failures = &status.waves[0].failures;
    assert_eq!(
        failures.get("target_accepts_any_secret"),
        Some(&1),
        "{failures:?}"
    );
    assert_eq!(failures.get("target_rejected"), Some(&1), "{failures:?}");

    // Nothing recorded for the two that cannot be proven.
    for cred in ["open", "admin"] {
        assert!(
            worker.store.get(cred).await.unwrap().is_none(),
            "{cred}: nothing staged, set or proven"
        );
    }
    // Redis was not touched for them: kw-open is still open (the operator
    // must close it), the admin connection still works.
    assert!(redis_auth(&redis, "kw-open", "still-anything").await);
    let _: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    // The ordinary user was rotated and proven for real.
    let rec = worker.store.get("closed").await.unwrap().unwrap();
    let current = rec.current.unwrap().secret;
    assert!(redis_auth(&redis, "kw-closed", current.expose()).await);
    assert!(!redis_auth(&redis, "kw-closed", old.expose()).await);

    coordinator.stop().await;
    worker.stop().await;
}

fn admin(port: u16, user: &str, password: &str) -> Admin {
    Admin {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        password: Some(Secret::new(password.into())),
        tls: Tls::Disable,
        connections: 2,
    }
}

fn containment_logins() -> Logins {
    Logins {
        continuity: Continuity::Auto,
        ..Logins::default()
    }
}

/// A PostgreSQL role that a `trust` line in `pg_hba.conf` lets in with any
/// password fails with `target_accepts_any_secret` and keeps its password;
/// the endpoint's admin login is refused as a credential; an ordinary role
/// on the same server is rotated and proven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_trust_rule_and_admin_login_are_never_rotated_or_proven() {
    support::init_tracing();
    let pg = PostgresServer::start();
    let old = secret();
    pg.psql(&format!(
        "CREATE ROLE kw_trusted LOGIN PASSWORD '{0}'; CREATE ROLE kw_checked LOGIN PASSWORD '{0}'",
        old.expose()
    ))
    .unwrap();
    // The first matching line wins: kw_trusted gets in with anything.
    let hba = pg.dir().join("data").join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all kw_trusted 127.0.0.1/32 trust\n{rest}"),
    )
    .unwrap();
    pg.psql("SELECT pg_reload_conf()").unwrap();
    assert!(
        pg.psql_as("kw_trusted", "any-wrong-secret", "SELECT 1")
            .is_ok(),
        "fixture: the trust rule lets anything in"
    );
    let verifier = || {
        pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'kw_trusted'")
            .unwrap()
    };
    let before = verifier();

    let nats = NatsServer::start();
    let client = nats.client().await;
    let creds = [
        one("trusted", "pg-main", TargetKind::Postgres, "kw_trusted"),
        one("superuser", "pg-main", TargetKind::Postgres, "postgres"),
        one("checked", "pg-main", TargetKind::Postgres, "kw_checked"),
    ];
    support::put_inventory(&client, &creds).await;
    let mut targets = Targets::new();
    let target = PostgresTarget::new(PostgresOptions {
        admin: admin(pg.port(), "postgres", pg.password()),
        dbname: "postgres".into(),
        logins: containment_logins(),
        policy: SecretPolicy::default(),
    })
    .unwrap();
    targets.insert("pg-main", target, 4);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    worker.store.enroll("checked", old.clone()).await.unwrap();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    let id = api.start(contain_all()).await.unwrap();
    let status = api.wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!((status.succeeded(), status.failed()), (1, 2), "{status:#?}");
    let failures = &status.waves[0].failures;
    assert_eq!(
        failures.get("target_accepts_any_secret"),
        Some(&1),
        "{failures:?}"
    );
    assert_eq!(failures.get("target_rejected"), Some(&1), "{failures:?}");
    for cred in ["trusted", "superuser"] {
        assert!(worker.store.get(cred).await.unwrap().is_none(), "{cred}");
    }
    assert_eq!(
        verifier(),
        before,
        "the trusted role's password is untouched"
    );
    assert!(pg.psql("SELECT 1").is_ok(), "the admin login still works");
    let current = worker
        .store
        .get("checked")
        .await
        .unwrap()
        .unwrap()
        .current
        .unwrap()
        .secret;
    assert!(pg
        .psql_as("kw_checked", current.expose(), "SELECT 1")
        .is_ok());
    assert!(pg.psql_as("kw_checked", old.expose(), "SELECT 1").is_err());

    coordinator.stop().await;
    worker.stop().await;
}

/// A MariaDB account with an empty password refuses a wrong password, so
/// it can be proven: containment gives it a password, after which the empty
/// password is refused and the new one works. The endpoint's admin login is
/// refused as a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_empty_password_account_is_closed_and_admin_login_refused() {
    support::init_tracing();
    let db = MariaDbServer::start();
    db.sql("CREATE USER 'kw_empty'@'%'").unwrap();
    assert!(
        db.sql_as("kw_empty", "", "SELECT 1").is_ok(),
        "fixture: the empty password opens the account"
    );
    let nats = NatsServer::start();
    let client = nats.client().await;
    let creds = [
        one("empty", "maria-main", TargetKind::Mysql, "kw_empty"),
        one("root", "maria-main", TargetKind::Mysql, ADMIN_USER),
    ];
    support::put_inventory(&client, &creds).await;
    let mut targets = Targets::new();
    let target = MysqlTarget::connect(MysqlOptions {
        admin: admin(db.port(), ADMIN_USER, db.password()),
        account_host: "%".into(),
        logins: containment_logins(),
        policy: SecretPolicy::default(),
    })
    .await
    .unwrap();
    targets.insert("maria-main", target, 4);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    let id = api.start(contain_all()).await.unwrap();
    let status = api.wait_terminal(&id, WAIT).await.unwrap();
    assert_eq!((status.succeeded(), status.failed()), (1, 1), "{status:#?}");
    assert_eq!(
        status.waves[0].failures.get("target_rejected"),
        Some(&1),
        "{status:#?}"
    );
    assert!(worker.store.get("root").await.unwrap().is_none());
    let current = worker
        .store
        .get("empty")
        .await
        .unwrap()
        .unwrap()
        .current
        .unwrap()
        .secret;
    assert!(db.sql_as("kw_empty", current.expose(), "SELECT 1").is_ok());
    assert!(
        db.sql_as("kw_empty", "", "SELECT 1").is_err(),
        "the empty password no longer opens the account"
    );
    assert!(db.sql("SELECT 1").is_ok(), "the admin login still works");

    coordinator.stop().await;
    worker.stop().await;
}

/// Slow simulated credentials, so that a campaign is still running when the
/// next one starts.
async fn slow_fleet(
    client: &async_nats::Client,
    creds: &[Credential],
) -> (support::RunningWorker, Arc<SimTarget>) {
    support::put_inventory(client, creds).await;
    let sim = SimTarget::new(SimOptions {
        latency: Duration::from_millis(50),
        ..SimOptions::default()
    });
    let mut targets = Targets::new();
    targets.insert("sim-main", sim.clone(), 2);
    let worker = support::start_worker(
        client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    (worker, sim)
}

fn ids(creds: &[Credential]) -> Selector {
    Selector {
        ids: creds.iter().map(|c| c.id.clone()).collect(),
        ..Selector::default()
    }
}

/// Two campaigns started at once over the same 40 credentials: exactly one
/// is accepted, the other is refused naming the conflicts. A third that
/// overlaps starts with `skip_locked` without the held credentials; once
/// the first ends, its credentials are free again. Every credential is
/// rotated exactly once per accepted campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_campaign_per_credential_at_a_time() {
    support::init_tracing();
    let nats = NatsServer::start();
    let client = nats.client().await;
    let creds = credentials("lock", 60, &["eu"], "sim-main", TargetKind::Sim);
    let (first40, last20) = creds.split_at(40);
    let (worker, sim) = slow_fleet(&client, &creds).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let over = |sel: Selector| spec(sel, Strategy::Containment, "100%", 0.0, OnFailure::Pause);

    let (a, b) = tokio::join!(api.start(over(ids(first40))), api.start(over(ids(first40))));
    let (winner, refused) = match (a, b) {
        (Ok(id), Err(e)) | (Err(e), Ok(id)) => (id, e),
        other => panic!("exactly one of two overlapping starts must be accepted: {other:?}"),
    };
    match &refused {
        ClientError::Conflict(m) => {
            assert!(m.contains("40 selected credential(s)"), "{m}");
            assert!(m.contains(&winner), "names the holder: {m}");
            assert!(m.contains("lock-00"), "names credentials: {m}");
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    // All 60 selected while the first 40 are held: refused, or the last 20
    // only with skip_locked.
    let everything = ids(&creds);
    let err = api.start(over(everything.clone())).await.unwrap_err();
    assert!(matches!(err, ClientError::Conflict(_)), "{err:?}");
    let skipping = api
        .start_request(StartRequest {
            spec: over(everything.clone()),
            campaign_id: None,
            skip_locked: true,
        })
        .await
        .unwrap();
    let s = api.status(&skipping).await.unwrap();
    assert_eq!(s.total, 20, "{s:#?}");
    assert!(
        s.reason
            .as_deref()
            .unwrap_or("")
            .contains("40 selected credential(s) skipped"),
        "{s:#?}"
    );

    for id in [&winner, &skipping] {
        let s = api.wait_terminal(id, WAIT).await.unwrap();
        assert_eq!(s.state, CampaignState::Completed, "{s:#?}");
    }
    for c in first40 {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }
    for c in last20 {
        assert_eq!(sim.set_count(&c.principal), 1, "{}", c.id);
    }
    // Ended: the credentials are free again.
    let again = api.start(over(everything)).await.unwrap();
    let s = api.wait_terminal(&again, WAIT).await.unwrap();
    assert_eq!((s.state, s.succeeded()), (CampaignState::Completed, 60));

    coordinator.stop().await;
    worker.stop().await;
}

/// Locks survive a coordinator restart (they come from the plans of the
/// unfinished campaigns); a containment takes over the credentials of a
/// continuity campaign that waits for an approval, which is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_survive_a_restart_and_containment_takes_over_a_waiting_continuity() {
    support::init_tracing();
    let nats = NatsServer::start();
    let client = nats.client().await;
    let creds = credentials("hold", 20, &["eu"], "sim-main", TargetKind::Sim);
    let (worker, _sim) = slow_fleet(&client, &creds).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut gated = spec(
        ids(&creds),
        Strategy::Continuity,
        "5,100%",
        0.0,
        OnFailure::Pause,
    );
    gated.approve_before_waves = vec![1];
    let waiting = api.start(gated).await.unwrap();
    let s = keywave_tests::wait_for(WAIT, || async {
        api.status(&waiting)
            .await
            .ok()
            .filter(|s| s.state == CampaignState::AwaitingApproval)
    })
    .await
    .expect("the continuity campaign waits for approval of wave 1");
    assert_eq!(s.current_wave, 1, "{s:#?}");

    // After a restart the credentials are still held.
    coordinator.stop().await;
    let coordinator = support::start_coordinator(&client).await;
    let continuity = spec(
        ids(&creds[..3]),
        Strategy::Continuity,
        "100%",
        0.0,
        OnFailure::Pause,
    );
    match api.start(continuity).await {
        Err(ClientError::Conflict(m)) => assert!(m.contains(&waiting), "{m}"),
        other => panic!("expected a conflict after the restart, got {other:?}"),
    }

    // A containment takes them over: the waiting campaign is aborted.
    let contain = spec(
        ids(&creds[..3]),
        Strategy::Containment,
        "100%",
        0.0,
        OnFailure::Pause,
    );
    let c = api.start(contain).await.unwrap();
    let s = api.wait_terminal(&c, WAIT).await.unwrap();
    assert_eq!(
        (s.state, s.succeeded()),
        (CampaignState::Completed, 3),
        "{s:#?}"
    );
    // The first status of the containment names what it took over.
    let mut events = support::events(&client, &c).await;
    events.retain(|e| matches!(e.kind, EventKind::StateChanged { .. }));
    assert!(
        events.iter().any(|e| matches!(&e.kind, EventKind::StateChanged { reason, .. } if reason.contains(&waiting))),
        "{events:#?}"
    );
    assert_eq!(
        api.status(&waiting).await.unwrap().state,
        CampaignState::Aborted
    );

    coordinator.stop().await;
    worker.stop().await;
}

/// Two inventory records for one login (written separately, so no import
/// saw both): a campaign selecting both is refused naming both ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_records_for_one_login_are_refused_at_start() {
    support::init_tracing();
    let nats = NatsServer::start();
    let client = nats.client().await;
    let a = one("twin-a", "sim-main", TargetKind::Sim, "shared_user");
    let b = one("twin-b", "sim-main", TargetKind::Sim, "shared_user");
    let (worker, sim) = slow_fleet(&client, &[a]).await;
    support::put_inventory(&client, &[b]).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    match api.start(contain_all()).await {
        Err(ClientError::BadRequest(m)) => {
            assert!(m.contains("twin-a") && m.contains("twin-b"), "{m}");
            assert!(m.contains("same login"), "{m}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(sim.set_count("shared_user"), 0, "nothing was rotated");
    coordinator.stop().await;
    worker.stop().await;
}

/// `keywave-worker enroll` applies the inventory's principal rules and
/// refuses a login that lets a wrong secret in (nothing is stored); an
/// ordinary user with its real password enrols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_refuses_open_logins_and_principals_an_import_would_refuse() {
    let bin = support::workspace_binary("keywave-worker", "keywave-worker");
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pw = secret();
    for args in [
        vec!["SETUSER", "kw-open", "on", "nopass", "+ping"],
        vec![
            "SETUSER",
            "kw-closed",
            "on",
            &format!(">{}", pw.expose()),
            "+ping",
        ],
    ] {
        let _: () = redis::cmd("ACL")
            .arg(&args)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"eu\"\n[[endpoint]]\nname = \"redis-main\"\nkind = \"redis\"\nurl = \"{}\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let key = RegionKey::generate().to_hex();
    let enroll = |credential: &str, principal: &str, secret: &str| {
        let out = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .args([
                "enroll",
                "--credential",
                credential,
                "--endpoint",
                "redis-main",
            ])
            .args(["--principal", principal])
            .env("KEYWAVE_REGION_KEY", &key)
            .env("KEYWAVE_NATS_URL", nats.url())
            .env("KEYWAVE_ENROLL_SECRET", secret)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains(secret) || secret.is_empty(),
            "the secret is never echoed"
        );
        (out.status.success(), text)
    };
    let (ok, out) = enroll("open", "kw-open", "whatever-i-claim");
    assert!(!ok, "{out}");
    assert!(out.contains("target_accepts_any_secret"), "{out}");
    for bad in ["kw\tclosed", "kw-\u{202E}desolc"] {
        let (ok, out) = enroll("bad", bad, pw.expose());
        assert!(!ok, "{bad:?}: {out}");
        assert!(out.contains("--principal"), "{out}");
    }
    let (ok, out) = enroll("closed", "kw-closed", pw.expose());
    assert!(ok, "{out}");

    // Only the ordinary user was stored.
    let client = nats.client().await;
    let js = keywave_common::topology::context(client);
    let kv = js.get_key_value("keywave-secrets-eu").await.unwrap();
    let mut keys: Vec<String> = futures::TryStreamExt::try_collect(kv.keys().await.unwrap())
        .await
        .unwrap();
    keys.sort();
    assert_eq!(keys, ["closed"]);
}
