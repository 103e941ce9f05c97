//! Campaigns against real PostgreSQL login roles and MariaDB accounts on
//! private servers: containment on single logins (hostile names included),
//! continuity with alternating users while a consumer keeps logging in with
//! whatever CURRENT holds. Every result is proven with the servers' own
//! clients (`psql`, `mariadb`): the new secret logs in, the old one is
//! refused with an authentication error, nothing else on the server changed.

use crate::support::{self, credentials, in_regions, secret, spec};
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
use keywave_worker::targets::{AuthCheck, Target, Targets};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Ordinary credentials per server and campaign.
const N: usize = 20;
const PG: &str = "pg-main";
const MARIA: &str = "mariadb-main";

/// PostgreSQL principals that must rotate without touching anything else.
const PG_HOSTILE: &[&str] = &["x\"; DROP ROLE postgres; --", "o'brien"];
/// MariaDB principals that must rotate without touching anything else.
const MARIA_HOSTILE: &[&str] = &["o'brien", "x'; DROP DATABASE canary; --"];

/// An identifier for `psql`, quoted by the test itself.
fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal for the `mariadb` client (no backslashes in our names).
fn my_lit(s: &str) -> String {
    assert!(!s.contains('\\'));
    format!("'{}'", s.replace('\'', "''"))
}

/// Runs blocking client calls off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// A real login with the server's own client: `Ok(())`, or `Err` when the
/// server refused the credentials (anything else panics).
fn pg_login(pg: &PostgresServer, role: &str, secret: &Secret) -> Result<(), ()> {
    match pg.psql_as(role, secret.expose(), "SELECT 1") {
        Ok(out) => {
            assert_eq!(out, "1");
            Ok(())
        }
        Err(e) if e.contains("password authentication failed") => Err(()),
        Err(e) if e.contains("is not permitted to log in") => Err(()),
        Err(e) => panic!("psql as {role:?}: unexpected error {e}"),
    }
}

fn maria_login(db: &MariaDbServer, user: &str, secret: &Secret) -> Result<(), ()> {
    match db.sql_as(user, secret.expose(), "SELECT 1") {
        Ok(out) => {
            assert_eq!(out, "1");
            Ok(())
        }
        Err(e) if e.contains("Access denied") => Err(()),
        Err(e) => panic!("mariadb as {user:?}: unexpected error {e}"),
    }
}

/// Everything a rotation must leave alone: roles / accounts and the canaries.
fn pg_snapshot(pg: &PostgresServer) -> String {
    pg.psql("SELECT string_agg(rolname || ':' || rolsuper, ',' ORDER BY rolname) FROM pg_roles; SELECT v FROM canary")
        .unwrap()
}

fn maria_snapshot(db: &MariaDbServer) -> String {
    db.sql("SELECT User, Host FROM mysql.global_priv ORDER BY User, Host; SELECT v FROM canary.t")
        .unwrap()
}

struct Fleet {
    pg: Arc<PostgresServer>,
    maria: Arc<MariaDbServer>,
    creds: Vec<Credential>,
    initial: HashMap<String, Secret>,
}

impl Fleet {
    /// Starts both servers and creates `N` logins on each (plus the hostile
    /// ones when `hostile`), with a clone per login for alternating users.
    async fn new(prefix: &str, alternating: bool, hostile: bool) -> Fleet {
        let (pg, maria) = tokio::join!(
            blocking(PostgresServer::start),
            blocking(MariaDbServer::start)
        );
        let (pg, maria) = (Arc::new(pg), Arc::new(maria));
        let mut creds = credentials(
            &format!("{prefix}-pg"),
            N,
            &["eu"],
            PG,
            TargetKind::Postgres,
        );
        creds.extend(credentials(
            &format!("{prefix}-my"),
            N,
            &["eu"],
            MARIA,
            TargetKind::Mysql,
        ));
        for c in creds.iter_mut() {
            c.principal = c.principal.replace('-', "_");
        }
        if hostile {
            for (i, p) in PG_HOSTILE.iter().enumerate() {
                let mut c = creds[0].clone();
                c.id = format!("{prefix}-pg-hostile-{i}");
                c.principal = p.to_string();
                creds.push(c);
            }
            for (i, p) in MARIA_HOSTILE.iter().enumerate() {
                let mut c = creds[N].clone();
                c.id = format!("{prefix}-my-hostile-{i}");
                c.principal = p.to_string();
                creds.push(c);
            }
        }

        let mut initial = HashMap::new();
        let (mut pg_sql, mut my_sql) = (
            vec!["CREATE TABLE canary (v text); INSERT INTO canary VALUES ('alive');".to_string()],
            vec![
                "CREATE DATABASE canary; CREATE TABLE canary.t (v TEXT); INSERT INTO canary.t VALUES ('alive');"
                    .to_string(),
            ],
        );
        for c in &creds {
            let pw = secret();
            let clone = format!("{}_clone", c.principal);
            match c.kind {
                TargetKind::Postgres => {
                    pg_sql.push(format!(
                        "CREATE ROLE {} LOGIN PASSWORD '{}';",
                        pg_ident(&c.principal),
                        pw.expose()
                    ));
                    if alternating {
                        pg_sql.push(format!("CREATE ROLE {} NOLOGIN;", pg_ident(&clone)));
                    }
                }
                _ => {
                    my_sql.push(format!(
                        "CREATE USER {}@'%' IDENTIFIED BY '{}';",
                        my_lit(&c.principal),
                        pw.expose()
                    ));
                    if alternating {
                        my_sql.push(format!(
                            "CREATE USER {}@'%' IDENTIFIED BY '{}' ACCOUNT LOCK;",
                            my_lit(&clone),
                            secret().expose()
                        ));
                    }
                }
            }
            initial.insert(c.id.clone(), pw);
        }
        let (p, m) = (pg.clone(), maria.clone());
        blocking(move || {
            p.psql(&pg_sql.join("\n")).unwrap();
            m.sql(&my_sql.join("\n")).unwrap();
        })
        .await;
        Fleet {
            pg,
            maria,
            creds,
            initial,
        }
    }

    async fn targets(&self, continuity: Continuity) -> (Arc<PostgresTarget>, Arc<MysqlTarget>) {
        let logins = Logins {
            continuity,
            ..Logins::default()
        };
        let admin = |port: u16, user: &str, password: &str| Admin {
            host: "127.0.0.1".into(),
            port,
            user: user.into(),
            password: Some(Secret::new(password.into())),
            tls: Tls::Disable,
            connections: 4,
        };
        let pg = PostgresTarget::connect(PostgresOptions {
            admin: admin(self.pg.port(), "postgres", self.pg.password()),
            dbname: "postgres".into(),
            logins: logins.clone(),
            policy: SecretPolicy::default(),
        })
        .await
        .unwrap();
        let my = MysqlTarget::connect(MysqlOptions {
            admin: admin(self.maria.port(), ADMIN_USER, self.maria.password()),
            account_host: "%".into(),
            logins,
            policy: SecretPolicy::default(),
        })
        .await
        .unwrap();
        (pg, my)
    }

    /// Logs in as `login` with the server's own client.
    fn login(&self, kind: TargetKind, login: &str, secret: &Secret) -> Result<(), ()> {
        match kind {
            TargetKind::Postgres => pg_login(&self.pg, login, secret),
            _ => maria_login(&self.maria, login, secret),
        }
    }

    /// Drops every login the fleet created; afterwards only the servers'
    /// own accounts remain.
    async fn drop_logins(&self, alternating: bool) {
        let (mut pg_sql, mut my_sql) = (Vec::new(), Vec::new());
        for c in &self.creds {
            let mut names = vec![c.principal.clone()];
            if alternating {
                names.push(format!("{}_clone", c.principal));
            }
            for n in names {
                match c.kind {
                    TargetKind::Postgres => pg_sql.push(format!("DROP ROLE {};", pg_ident(&n))),
                    _ => my_sql.push(format!("DROP USER {}@'%';", my_lit(&n))),
                }
            }
        }
        let (p, m) = (self.pg.clone(), self.maria.clone());
        blocking(move || {
            p.psql(&pg_sql.join("\n")).unwrap();
            m.sql(&my_sql.join("\n")).unwrap();
            assert_eq!(
                p.psql("SELECT count(*) FROM pg_roles WHERE rolname !~ '^pg_' AND rolname <> 'postgres'")
                    .unwrap(),
                "0"
            );
            assert_eq!(
                m.sql("SELECT count(*) FROM mysql.global_priv WHERE User NOT IN ('root', 'mariadb.sys', 'keywave')")
                    .unwrap(),
                "0"
            );
        })
        .await;
    }
}

/// Runs one campaign over region `eu` and waits for it to complete.
async fn campaign(client: &async_nats::Client, strategy: Strategy, total: usize) {
    let coordinator = support::start_coordinator(client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu"]),
            strategy,
            "1,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), total as u64);
    assert_eq!(status.failed(), 0);
    coordinator.stop().await;
}

async fn start_worker(
    client: &async_nats::Client,
    fleet: &Fleet,
    continuity: Continuity,
) -> support::RunningWorker {
    let (pg, my) = fleet.targets(continuity).await;
    let mut targets = Targets::new();
    targets.insert(PG, pg, 8);
    targets.insert(MARIA, my, 8);
    let worker = support::start_worker(
        client,
        "eu",
        &RegionKey::generate(),
        Arc::new(targets),
        Faults::none(),
    )
    .await;
    for c in &fleet.creds {
        worker
            .store
            .enroll(&c.id, fleet.initial[&c.id].clone())
            .await
            .unwrap();
    }
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containment_campaign_rotates_postgres_roles_and_mariadb_users() {
    support::init_tracing();
    let fleet = Fleet::new("kwc", false, true).await;
    let server = NatsServer::start();
    let client = server.client().await;
    support::put_inventory(&client, &fleet.creds).await;
    let (p, m) = (fleet.pg.clone(), fleet.maria.clone());
    let before = blocking(move || (pg_snapshot(&p), maria_snapshot(&m))).await;

    let worker = start_worker(&client, &fleet, Continuity::Auto).await;
    campaign(&client, Strategy::Containment, fleet.creds.len()).await;

    // Every new secret logs in, every old one is refused: with psql and the
    // mariadb client, not with the code under test.
    let mut proofs = Vec::new();
    for c in &fleet.creds {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        assert!(rec.pending.is_none(), "{}", c.id);
        let previous = rec.previous.expect("previous").secret;
        assert!(previous == fleet.initial[&c.id], "{}", c.id);
        let current = rec.current.expect("current");
        // The store records the login the new secret opens: the principal.
        assert_eq!(current.login.as_deref(), Some(c.principal.as_str()));
        proofs.push((c.clone(), current.secret, previous));
    }
    let f = Arc::new(fleet);
    let f2 = f.clone();
    blocking(move || {
        for (c, current, previous) in proofs {
            assert_eq!(f2.login(c.kind, &c.principal, &current), Ok(()), "{}", c.id);
            assert_eq!(
                f2.login(c.kind, &c.principal, &previous),
                Err(()),
                "{}",
                c.id
            );
        }
        // Nothing else changed: same roles and accounts, canaries alive.
        assert_eq!((pg_snapshot(&f2.pg), maria_snapshot(&f2.maria)), before);
    })
    .await;
    worker.stop().await;
    f.drop_logins(false).await;
}

/// Which login of `principal`'s pair `secret` opens, with the server's client.
fn pair_login(fleet: &Fleet, c: &Credential, secret: &Secret) -> Option<String> {
    let clone = format!("{}_clone", c.principal);
    [c.principal.clone(), clone]
        .into_iter()
        .find(|l| fleet.login(c.kind, l, secret).is_ok())
}

/// A consumer of `c` that keeps logging in with whatever CURRENT holds (on
/// either login of the pair, as a consumer of alternating users does) until
/// `stop`. Returns (logins, failures); a failed login counts only if CURRENT
/// did not change meanwhile (then the consumer simply retries).
async fn consumer(
    store: SecretStore,
    target: Arc<PostgresTarget>,
    c: Credential,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    while !stop.load(Ordering::SeqCst) {
        let current = store.get(&c.id).await.unwrap().unwrap().current.unwrap();
        let opened = target
            .active_login(&c.principal, &current.secret)
            .await
            .unwrap_or_else(|e| panic!("consumer of {}: login failed: {e}", c.id));
        if opened.is_some() {
            ok += 1;
        } else {
            let now = store.get(&c.id).await.unwrap().unwrap().current.unwrap();
            if now.fingerprint == current.fingerprint {
                failed += 1;
            }
        }
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuity_campaign_alternates_postgres_roles_and_mariadb_users() {
    support::init_tracing();
    let fleet = Fleet::new("kwa", true, false).await;
    let server = NatsServer::start();
    let client = server.client().await;
    support::put_inventory(&client, &fleet.creds).await;

    let worker = start_worker(&client, &fleet, Continuity::Alternating).await;
    // Consumers of the first PostgreSQL credentials keep logging in during
    // the whole campaign, through their own target (own connections).
    let (watch_target, _) = fleet.targets(Continuity::Alternating).await;
    let stop = Arc::new(AtomicBool::new(false));
    let consumers: Vec<_> = fleet.creds[..3]
        .iter()
        .map(|c| {
            tokio::spawn(consumer(
                worker.store.clone(),
                watch_target.clone(),
                c.clone(),
                stop.clone(),
            ))
        })
        .collect();
    campaign(&client, Strategy::Continuity, fleet.creds.len()).await;
    stop.store(true, Ordering::SeqCst);
    for h in consumers {
        let (ok, failed) = h.await.unwrap();
        assert!(ok > 0);
        assert_eq!(failed, 0, "a consumer following CURRENT was refused");
    }

    let mut proofs = Vec::new();
    for c in &fleet.creds {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        assert!(rec.pending.is_none(), "{}", c.id);
        let previous = rec.previous.expect("previous").secret;
        assert!(previous == fleet.initial[&c.id], "{}", c.id);
        let current = rec.current.expect("current");
        // The store records which login of the pair the new secret opens,
        // for consumers (the agent's `{{login}}`).
        assert_eq!(
            current.login,
            Some(format!("{}_clone", c.principal)),
            "{}",
            c.id
        );
        proofs.push((c.clone(), current.secret, previous));
    }
    let f = Arc::new(fleet);
    let f2 = f.clone();
    blocking(move || {
        for (c, current, previous) in proofs {
            // The new secret moved to the clone (the login that was
            // inactive); the old one opens neither login.
            let clone = format!("{}_clone", c.principal);
            assert_eq!(pair_login(&f2, &c, &current), Some(clone), "{}", c.id);
            assert_eq!(pair_login(&f2, &c, &previous), None, "{}", c.id);
        }
        // Between rotations exactly one login of each pair can log in.
        assert_eq!(
            f2.pg
                .psql("SELECT count(*) FROM pg_roles WHERE rolcanlogin AND rolname LIKE 'kwa%'")
                .unwrap(),
            N.to_string()
        );
        assert_eq!(
            f2.maria
                .sql("SELECT count(*) FROM mysql.global_priv WHERE User LIKE 'kwa%' AND IFNULL(JSON_VALUE(Priv, '$.account_locked'), 'false') NOT IN ('1', 'true')")
                .unwrap(),
            N.to_string()
        );
    })
    .await;

    // The target's own view agrees.
    for c in f.creds.iter().take(2) {
        let current = worker
            .store
            .get(&c.id)
            .await
            .unwrap()
            .unwrap()
            .current
            .unwrap();
        assert_eq!(
            watch_target
                .check(&c.principal, &current.secret)
                .await
                .unwrap(),
            AuthCheck::Accepted
        );
    }
    worker.stop().await;
    f.drop_logins(true).await;
}
