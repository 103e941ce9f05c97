//! Database targets at scale, on private PostgreSQL and MariaDB servers:
//! - 500 PostgreSQL roles and 200 MariaDB users rotated in continuity
//!   (alternating users), then in containment; after each campaign every
//!   CURRENT secret of the store logs in and every older one is refused with
//!   an authentication error;
//! - PostgreSQL stopped mid-campaign: the wave's tasks fail with
//!   `target_unreachable` after bounded retries, the budget pauses the
//!   campaign; with the server back, a new campaign over the same selector
//!   leaves every credential consistent;
//! - a 2,000-role campaign while a sampler reads `pg_stat_activity` every
//!   20 ms: the admin pool never exceeds `admin_connections`, login checks
//!   never exceed the endpoint's `max_concurrency`.
//!
//! Logins are proven with the client libraries (tokio-postgres,
//! mysql_async), not with the code under test, a bounded number at a time.

use crate::support::{self, credentials, in_regions, spec};
use futures::StreamExt;
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::mariadb::ADMIN_USER;
use keywave_tests::{MariaDbServer, NatsServer, PostgresServer};
use keywave_worker::fault::Faults;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::db::{Admin, Continuity, Logins, Tls};
use keywave_worker::targets::mysql::{MysqlOptions, MysqlTarget};
use keywave_worker::targets::postgres::{PostgresOptions, PostgresTarget};
use keywave_worker::targets::Targets;
use mysql_async::prelude::Queryable;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PG: &str = "pg-scale";
const MARIA: &str = "mariadb-scale";
/// Verification logins in flight at once.
const VERIFY_CONCURRENCY: usize = 16;
const CLONE: &str = "_clone";

/// What a real login with the client library said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Login {
    Accepted,
    /// Refused with an authentication error (PostgreSQL SQLSTATE class 28,
    /// MariaDB 1045 / 4151).
    AuthRefused,
    /// Anything else: a failure of the test, never a refusal.
    Error(String),
}

async fn pg_login(port: u16, role: &str, secret: &Secret) -> Login {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(port)
        .user(role)
        .password(secret.expose())
        .dbname("postgres")
        .application_name("keywave-test-verify")
        .connect_timeout(Duration::from_secs(10));
    match c.connect(tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            let io = tokio::spawn(conn);
            let r = client.simple_query("SELECT 1").await;
            drop(client);
            let _ = io.await;
            match r {
                Ok(_) => Login::Accepted,
                Err(e) => Login::Error(e.to_string()),
            }
        }
        Err(e) => match e.code() {
            Some(code) if code.code().starts_with("28") => Login::AuthRefused,
            _ => Login::Error(e.to_string()),
        },
    }
}

async fn maria_login(port: u16, user: &str, secret: &Secret) -> Login {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .prefer_socket(false)
        .user(Some(user))
        .pass(Some(secret.expose()));
    match mysql_async::Conn::new(opts).await {
        Ok(mut c) => {
            let r = c.query_drop("SELECT 1").await;
            let _ = c.disconnect().await;
            match r {
                Ok(()) => Login::Accepted,
                Err(e) => Login::Error(e.to_string()),
            }
        }
        Err(mysql_async::Error::Server(s)) if s.code == 1045 || s.code == 4151 => {
            Login::AuthRefused
        }
        Err(e) => Login::Error(e.to_string()),
    }
}

/// Blocking harness calls off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A superuser connection for setup and sampling.
async fn pg_admin(pg: &PostgresServer) -> tokio_postgres::Client {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(pg.port())
        .user("postgres")
        .password(pg.password())
        .dbname("postgres")
        .application_name("keywave-test-admin");
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    client
}

/// Credentials of one server: `n` of them, principals `<prefix>_<i>`, with
/// their initial secrets, created on the server (with a NOLOGIN / locked
/// clone each when `alternating`).
struct Fleet {
    creds: Vec<Credential>,
    initial: HashMap<String, Secret>,
}

fn make_creds(prefix: &str, n: usize, endpoint: &str, kind: TargetKind) -> Fleet {
    let mut creds = credentials(prefix, n, &["eu"], endpoint, kind);
    for c in creds.iter_mut() {
        c.principal = c.principal.replace('-', "_");
    }
    let initial = creds
        .iter()
        .map(|c| (c.id.clone(), support::secret()))
        .collect();
    Fleet { creds, initial }
}

async fn create_pg_roles(pg: &PostgresServer, l: &Fleet, alternating: bool) {
    let admin = pg_admin(pg).await;
    for chunk in l.creds.chunks(500) {
        let mut sql = String::new();
        for c in chunk {
            sql.push_str(&format!(
                "CREATE ROLE {} LOGIN PASSWORD '{}';\n",
                pg_ident(&c.principal),
                l.initial[&c.id].expose()
            ));
            if alternating {
                sql.push_str(&format!(
                    "CREATE ROLE {} NOLOGIN;\n",
                    pg_ident(&format!("{}{CLONE}", c.principal))
                ));
            }
        }
        admin.batch_execute(&sql).await.expect("create roles");
    }
}

async fn drop_pg_roles(pg: &PostgresServer, l: &Fleet, alternating: bool) {
    let admin = pg_admin(pg).await;
    let mut sql = String::new();
    for c in &l.creds {
        sql.push_str(&format!(
            "DROP ROLE IF EXISTS {};\n",
            pg_ident(&c.principal)
        ));
        if alternating {
            sql.push_str(&format!(
                "DROP ROLE IF EXISTS {};\n",
                pg_ident(&format!("{}{CLONE}", c.principal))
            ));
        }
    }
    admin.batch_execute(&sql).await.expect("drop roles");
    let left: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> 'postgres'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "every test role dropped");
}

fn maria_lit(s: &str) -> String {
    assert!(!s.contains('\\'));
    format!("'{}'", s.replace('\'', "''"))
}

async fn create_maria_users(db: &Arc<MariaDbServer>, l: &Fleet, alternating: bool) {
    let mut sql = Vec::new();
    for c in &l.creds {
        sql.push(format!(
            "CREATE USER {}@'%' IDENTIFIED BY '{}';",
            maria_lit(&c.principal),
            l.initial[&c.id].expose()
        ));
        if alternating {
            sql.push(format!(
                "CREATE USER {}@'%' IDENTIFIED BY '{}' ACCOUNT LOCK;",
                maria_lit(&format!("{}{CLONE}", c.principal)),
                support::secret().expose()
            ));
        }
    }
    let db = db.clone();
    blocking(move || db.sql(&sql.join("\n")).expect("create users")).await;
}

async fn drop_maria_users(db: &Arc<MariaDbServer>, l: &Fleet, alternating: bool) {
    let mut sql = Vec::new();
    for c in &l.creds {
        sql.push(format!(
            "DROP USER IF EXISTS {}@'%';",
            maria_lit(&c.principal)
        ));
        if alternating {
            sql.push(format!(
                "DROP USER IF EXISTS {}@'%';",
                maria_lit(&format!("{}{CLONE}", c.principal))
            ));
        }
    }
    let db = db.clone();
    blocking(move || {
        db.sql(&sql.join("\n")).expect("drop users");
        assert_eq!(
            db.sql("SELECT count(*) FROM mysql.global_priv WHERE User NOT IN ('root', 'mariadb.sys', 'keywave')")
                .unwrap(),
            "0",
            "every test user dropped"
        );
    })
    .await;
}

fn admin(port: u16, user: &str, password: &str, connections: usize) -> Admin {
    Admin {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        password: Some(Secret::new(password.into())),
        tls: Tls::Disable,
        connections,
    }
}

fn logins(continuity: Continuity) -> Logins {
    Logins {
        continuity,
        clone_suffix: CLONE.into(),
        ..Logins::default()
    }
}

fn pg_target(pg: &PostgresServer, continuity: Continuity, pool: usize) -> Arc<PostgresTarget> {
    PostgresTarget::new(PostgresOptions {
        admin: admin(pg.port(), "postgres", pg.password(), pool),
        dbname: "postgres".into(),
        logins: logins(continuity),
        policy: SecretPolicy::default(),
    })
    .unwrap()
}

async fn maria_target(db: &MariaDbServer, continuity: Continuity, pool: usize) -> Arc<MysqlTarget> {
    MysqlTarget::connect(MysqlOptions {
        admin: admin(db.port(), ADMIN_USER, db.password(), pool),
        account_host: "%".into(),
        logins: logins(continuity),
        policy: SecretPolicy::default(),
    })
    .await
    .unwrap()
}

/// Enrolls every credential's initial secret in the worker's store.
async fn enroll(store: &SecretStore, l: &Fleet) {
    futures::stream::iter(l.creds.iter())
        .for_each_concurrent(32, |c| async move {
            store.enroll(&c.id, l.initial[&c.id].clone()).await.unwrap();
        })
        .await;
}

/// Runs a campaign over region `eu` to its end (or pause) and returns its status.
async fn run_campaign(
    api: &ApiClient,
    strategy: Strategy,
    waves: &str,
    budget: f64,
    timeout: Duration,
) -> keywave_common::api::CampaignStatus {
    let mut s = spec(
        in_regions(&["eu"]),
        strategy,
        waves,
        budget,
        OnFailure::Pause,
    );
    s.task_timeout_ms = 120_000;
    let id = api.start(s).await.unwrap();
    api.wait_terminal(&id, timeout).await.unwrap()
}

/// One credential to prove: where it logs in and which secrets must work
/// or be refused.
struct Proof {
    id: String,
    kind: TargetKind,
    /// The login(s) of the credential (the pair for alternating users).
    logins: Vec<String>,
    current: Secret,
    /// Every older secret of the credential.
    old: Vec<Secret>,
}

/// Reads CURRENT (and PREVIOUS) of every credential from the store;
/// `older` adds secrets known to be older still (the initial ones).
async fn proofs(
    store: &SecretStore,
    creds: &[Credential],
    alternating: bool,
    older: &HashMap<String, Secret>,
) -> Vec<Proof> {
    let mut out = Vec::new();
    for c in creds {
        let rec = store.get(&c.id).await.unwrap().expect("record");
        assert!(rec.pending.is_none(), "{}: nothing half-rotated", c.id);
        let current = rec.current.expect("current").secret;
        let mut old = Vec::new();
        if let Some(p) = rec.previous {
            old.push(p.secret);
        }
        if let Some(o) = older.get(&c.id) {
            if !old.contains(o) {
                old.push(o.clone());
            }
        }
        assert!(!old.contains(&current), "{}: rotated", c.id);
        let mut logins = vec![c.principal.clone()];
        if alternating {
            logins.push(format!("{}{CLONE}", c.principal));
        }
        out.push(Proof {
            id: c.id.clone(),
            kind: c.kind,
            logins,
            current,
            old,
        });
    }
    out
}

/// Proves every credential with real logins, `VERIFY_CONCURRENCY` at a
/// time: CURRENT opens exactly one of its logins; every old secret is
/// refused with an authentication error by every login.
async fn verify(proofs: Vec<Proof>, pg_port: u16, maria_port: u16) {
    let started = Instant::now();
    let n = proofs.len();
    let checked = AtomicUsize::new(0);
    futures::stream::iter(proofs)
        .for_each_concurrent(VERIFY_CONCURRENCY, |p| {
            let checked = &checked;
            async move {
                let login = |login: String, secret: Secret| async move {
                    match p.kind {
                        TargetKind::Postgres => pg_login(pg_port, &login, &secret).await,
                        _ => maria_login(maria_port, &login, &secret).await,
                    }
                };
                let mut opened = 0;
                for l in &p.logins {
                    match login(l.clone(), p.current.clone()).await {
                        Login::Accepted => opened += 1,
                        Login::AuthRefused => {}
                        Login::Error(e) => panic!("{}: login as {l:?}: {e}", p.id),
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                assert_eq!(opened, 1, "{}: CURRENT opens exactly one login", p.id);
                for old in &p.old {
                    for l in &p.logins {
                        assert_eq!(
                            login(l.clone(), old.clone()).await,
                            Login::AuthRefused,
                            "{}: an old secret must be refused by {l:?} with an authentication error",
                            p.id
                        );
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
    eprintln!(
        "verified {n} credentials with {} real logins in {:?}",
        checked.load(Ordering::Relaxed),
        started.elapsed()
    );
}

/// 500 PostgreSQL roles and 200 MariaDB users, each with a clone: a
/// continuity campaign (alternating users), then a containment campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_700_logins_continuity_then_containment() {
    support::init_tracing();
    let (pg, maria) = tokio::join!(
        blocking(PostgresServer::start),
        blocking(MariaDbServer::start)
    );
    let maria = Arc::new(maria);
    let nats = NatsServer::start();
    let client = nats.client().await;
    let pgl = make_creds("kwsp", 500, PG, TargetKind::Postgres);
    let myl = make_creds("kwsm", 200, MARIA, TargetKind::Mysql);
    let t0 = Instant::now();
    tokio::join!(
        create_pg_roles(&pg, &pgl, true),
        create_maria_users(&maria, &myl, true)
    );
    eprintln!("created 1,400 logins in {:?}", t0.elapsed());
    let all: Vec<Credential> = pgl.creds.iter().chain(&myl.creds).cloned().collect();
    support::put_inventory(&client, &all).await;

    let mut targets = Targets::new();
    targets.insert(PG, pg_target(&pg, Continuity::Alternating, 4), 16);
    targets.insert(
        MARIA,
        maria_target(&maria, Continuity::Alternating, 4).await,
        16,
    );
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    enroll(&worker.store, &pgl).await;
    enroll(&worker.store, &myl).await;
    let initial: HashMap<String, Secret> = pgl
        .initial
        .iter()
        .chain(&myl.initial)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    for strategy in [Strategy::Continuity, Strategy::Containment] {
        let t = Instant::now();
        let status = run_campaign(&api, strategy, "10,50%", 0.0, Duration::from_secs(300)).await;
        assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
        assert_eq!(status.succeeded(), 700);
        assert_eq!(status.failed(), 0);
        eprintln!(
            "{strategy:?}: 700 rotations in {:?} ({:.0}/s)",
            t.elapsed(),
            700.0 / t.elapsed().as_secs_f64()
        );
        let p = proofs(&worker.store, &all, true, &initial).await;
        verify(p, pg.port(), maria.port()).await;
    }
    // Between rotations exactly one login of each pair can log in.
    let a = pg_admin(&pg).await;
    let active: i64 = a
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolcanlogin AND rolname LIKE 'kwsp%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 500);

    coordinator.stop().await;
    worker.stop().await;
    drop_pg_roles(&pg, &pgl, true).await;
    drop_maria_users(&maria, &myl, true).await;
}

/// PostgreSQL stopped while a containment campaign runs: the wave's tasks
/// fail as `target_unreachable` after bounded retries and the budget pauses
/// the campaign; with the server back on the same port, a new campaign over
/// the same selector leaves every credential consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_postgres_stopped_mid_campaign_then_rerun_is_consistent() {
    support::init_tracing();
    const N: usize = 150;
    let mut pg = blocking(PostgresServer::start).await;
    let nats = NatsServer::start();
    let client = nats.client().await;
    let pgl = make_creds("kwss", N, PG, TargetKind::Postgres);
    create_pg_roles(&pg, &pgl, false).await;
    support::put_inventory(&client, &pgl.creds).await;

    // 20 rotations a second: the second wave (50) is under way for seconds
    // when the server goes down.
    let mut targets = Targets::new();
    targets.insert_limited(PG, pg_target(&pg, Continuity::Auto, 4), 8, Some(20.0));
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    enroll(&worker.store, &pgl).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Containment,
        "20,50",
        0.2,
        OnFailure::Pause,
    );
    s.task_timeout_ms = 120_000;
    let id = api.start(s).await.unwrap();
    keywave_tests::wait_until(Duration::from_secs(60), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            api.status(&id)
                .await
                .map(|s| s.current_wave >= 1 && s.succeeded() >= 25)
                .unwrap_or(false)
        }
    })
    .await
    .expect("the second wave is under way");
    pg = blocking(move || {
        pg.stop_fast();
        pg
    })
    .await;
    let stopped = Instant::now();
    let status = api
        .wait_terminal(&id, Duration::from_secs(90))
        .await
        .unwrap();
    let waited = stopped.elapsed();
    assert_eq!(status.state, CampaignState::Paused, "{status:#?}");
    let wave = &status.waves[status.current_wave as usize];
    assert!(wave.failed > 0, "{wave:#?}");
    assert_eq!(
        wave.failures.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["target_unreachable"],
        "every failure is classified unreachable: {wave:#?}"
    );
    // Bounded retries: the wave is decided long before the task deadline.
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    eprintln!(
        "paused {waited:?} after the stop: {} succeeded, {} unreachable",
        status.succeeded(),
        wave.failed
    );

    // The server comes back; the paused campaign is aborted and a new one
    // over the same selector rotates everything.
    pg = blocking(move || {
        pg.restart();
        pg
    })
    .await;
    api.abort(&id).await.unwrap();
    let status = run_campaign(
        &api,
        Strategy::Containment,
        "50,100%",
        0.0,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), N as u64);
    let p = proofs(&worker.store, &pgl.creds, false, &pgl.initial).await;
    verify(p, pg.port(), 0).await;

    coordinator.stop().await;
    worker.stop().await;
    drop_pg_roles(&pg, &pgl, false).await;
}

/// The same for MariaDB, killed outright (SIGKILL) while a containment
/// campaign runs: the wave's tasks fail as `target_unreachable` after
/// bounded retries, the budget pauses the campaign; with `mariadbd` back on
/// the same port and data, a new campaign leaves every user consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_mariadb_killed_mid_campaign_then_rerun_is_consistent() {
    support::init_tracing();
    const N: usize = 150;
    let maria = Arc::new(blocking(MariaDbServer::start).await);
    let nats = NatsServer::start();
    let client = nats.client().await;
    let myl = make_creds("kwms", N, MARIA, TargetKind::Mysql);
    create_maria_users(&maria, &myl, false).await;
    support::put_inventory(&client, &myl.creds).await;

    let mut targets = Targets::new();
    targets.insert_limited(
        MARIA,
        maria_target(&maria, Continuity::Auto, 4).await,
        8,
        Some(20.0),
    );
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    enroll(&worker.store, &myl).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        in_regions(&["eu"]),
        Strategy::Containment,
        "20,50",
        0.2,
        OnFailure::Pause,
    );
    s.task_timeout_ms = 120_000;
    let id = api.start(s).await.unwrap();
    keywave_tests::wait_until(Duration::from_secs(60), || {
        let (api, id) = (api.clone(), id.clone());
        async move {
            api.status(&id)
                .await
                .map(|s| s.current_wave >= 1 && s.succeeded() >= 25)
                .unwrap_or(false)
        }
    })
    .await
    .expect("the second wave is under way");
    let mut server = Arc::try_unwrap(maria).unwrap_or_else(|_| panic!("one owner"));
    server = blocking(move || {
        server.stop_fast();
        server
    })
    .await;
    let stopped = Instant::now();
    let status = api
        .wait_terminal(&id, Duration::from_secs(90))
        .await
        .unwrap();
    let waited = stopped.elapsed();
    assert_eq!(status.state, CampaignState::Paused, "{status:#?}");
    let wave = &status.waves[status.current_wave as usize];
    assert!(wave.failed > 0, "{wave:#?}");
    assert_eq!(
        wave.failures.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["target_unreachable"],
        "every failure is classified unreachable: {wave:#?}"
    );
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    eprintln!(
        "paused {waited:?} after the kill: {} succeeded, {} unreachable",
        status.succeeded(),
        wave.failed
    );

    // Back on the same port; the paused campaign is aborted and a new one
    // over the same selector rotates everything (the worker's pool
    // reconnects by itself).
    server = blocking(move || {
        server.restart();
        server
    })
    .await;
    let maria = Arc::new(server);
    api.abort(&id).await.unwrap();
    let status = run_campaign(
        &api,
        Strategy::Containment,
        "50,100%",
        0.0,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), N as u64);
    let p = proofs(&worker.store, &myl.creds, false, &myl.initial).await;
    verify(p, 0, maria.port()).await;

    coordinator.stop().await;
    worker.stop().await;
    drop_maria_users(&maria, &myl, false).await;
}

/// Peaks seen by the `pg_stat_activity` sampler.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    samples: usize,
    admin: i64,
    checks: i64,
    keywave: i64,
    backends: i64,
}

/// The admin pool never exceeds `admin_connections` and the login checks
/// never exceed `max_concurrency`, read from the server's own
/// `pg_stat_activity` every 20 ms during a 2,000-role campaign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_postgres_pool_never_exceeds_its_limit() {
    support::init_tracing();
    const N: usize = 2000;
    const POOL: usize = 4;
    const CONCURRENCY: usize = 8;
    let pg = blocking(PostgresServer::start).await;
    let nats = NatsServer::start();
    let client = nats.client().await;
    let pgl = make_creds("kwsc", N, PG, TargetKind::Postgres);
    let t0 = Instant::now();
    create_pg_roles(&pg, &pgl, false).await;
    eprintln!("created {N} roles in {:?}", t0.elapsed());
    support::put_inventory(&client, &pgl.creds).await;

    let mut targets = Targets::new();
    targets.insert(PG, pg_target(&pg, Continuity::Auto, POOL), CONCURRENCY);
    let worker = support::start_worker(
        &client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    enroll(&worker.store, &pgl).await;
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let a = pg_admin(&pg).await;
        tokio::spawn(async move {
            let mut peaks = Peaks::default();
            while !stop.load(Ordering::SeqCst) {
                let row = a
                    .query_one(
                        "SELECT count(*) FILTER (WHERE usename = 'postgres' AND application_name = 'keywave-admin'), \
                                count(*) FILTER (WHERE application_name = 'keywave-check'), \
                                count(*) FILTER (WHERE application_name LIKE 'keywave-%' AND application_name <> 'keywave-test-admin'), \
                                count(*) FILTER (WHERE backend_type = 'client backend') \
                         FROM pg_stat_activity",
                        &[],
                    )
                    .await
                    .unwrap();
                peaks.samples += 1;
                peaks.admin = peaks.admin.max(row.get(0));
                peaks.checks = peaks.checks.max(row.get(1));
                peaks.keywave = peaks.keywave.max(row.get(2));
                peaks.backends = peaks.backends.max(row.get(3));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peaks
        })
    };
    let t = Instant::now();
    let status = run_campaign(
        &api,
        Strategy::Containment,
        "100,50%",
        0.0,
        Duration::from_secs(300),
    )
    .await;
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let peaks = sampler.await.unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), N as u64);
    eprintln!(
        "{N} rotations in {took:?} ({:.0}/s); pool {POOL}, max_concurrency {CONCURRENCY}: {peaks:?}",
        N as f64 / took.as_secs_f64()
    );
    assert!(peaks.samples > 50, "{peaks:?}");
    assert!(peaks.admin >= 1, "the sampler saw the pool: {peaks:?}");
    assert!(
        peaks.admin <= POOL as i64,
        "admin pool over its limit: {peaks:?}"
    );
    assert!(
        peaks.checks <= CONCURRENCY as i64,
        "login checks over max_concurrency: {peaks:?}"
    );
    // The documented bound of one worker: admin_connections + max_concurrency.
    assert!(
        peaks.keywave <= (POOL + CONCURRENCY) as i64,
        "keywave connections over the bound: {peaks:?}"
    );
    // Every backend: keywave's, the sampler and the verification below.
    assert!(
        peaks.backends <= (POOL + CONCURRENCY + 1) as i64,
        "{peaks:?}"
    );

    // A sample of the roles, proven with real logins.
    let sample: Vec<Credential> = pgl.creds.iter().step_by(40).cloned().collect();
    let p = proofs(&worker.store, &sample, false, &pgl.initial).await;
    verify(p, pg.port(), 0).await;

    coordinator.stop().await;
    worker.stop().await;
    drop_pg_roles(&pg, &pgl, false).await;
}
