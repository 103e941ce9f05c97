//! Consumers of real PostgreSQL roles: 100 login roles rotated
//! with alternating users (`app` / `app_clone`) in a continuity campaign,
//! each consumed by an application that reads its login and password from
//! a file kept by a real `keywave-worker agent` process. The agents render
//! `{{login}}` and `{{secret}}`, check their health with `psql` logging in
//! with the file's content, and attest; the worker revokes the old login only
//! after the attestation.
//!
//! An application stand-in keeps reconnecting with whatever the file holds
//! during the whole campaign. It must never be refused while the file still
//! holds what it used (a refusal after the file moved on is a retry, as an
//! application reloading its secret file does), and every read of a file must
//! be whole: a login of the pair, a newline, a full secret, a newline.
//! Afterwards the old passwords are refused by the server itself.

use crate::support::{self, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret, SecretPolicy};
use keywave_common::topology;
use keywave_common::wire::{
    Attestation, CampaignState, ConsumerRef, ConsumerStatus, Credential, OnFailure, RotationResult,
    Selector, Strategy, TargetKind, TaskAction, VerifyKind, SCHEMA_VERSION,
};
use keywave_common::{codec, subjects};
use keywave_tests::process::{require, Daemon};
use keywave_tests::{NatsServer, PostgresServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::db::{Admin, Continuity, Logins, Tls};
use keywave_worker::targets::postgres::{PostgresOptions, PostgresTarget};
use keywave_worker::targets::Targets;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Roles rotated, consumed half by each of the two applications.
const N: usize = 100;
/// Concurrent connection loops of the application stand-in.
const APP_LOOPS: usize = 4;
const PG: &str = "pg-main";
const APPS: [&str; 2] = ["orders-app", "billing-app"];

fn role(i: usize) -> String {
    format!("kwcp_app_{i}")
}

fn clone_of(role: &str) -> String {
    format!("{role}_clone")
}

fn credential(i: usize) -> Credential {
    Credential {
        v: SCHEMA_VERSION,
        id: format!("kwcp-{i}"),
        region: "eu".into(),
        endpoint: PG.into(),
        kind: TargetKind::Postgres,
        principal: role(i),
        tags: vec!["issue=6-pg".into()],
        owner: None,
        consumers: vec![ConsumerRef {
            id: APPS[i % 2].into(),
            kind: Some("app".into()),
            verify: Some(VerifyKind::Attest),
            url: None,
            timeout_ms: Some(60_000),
        }],
    }
}

/// The file an application reads for credential `i`.
fn secret_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(APPS[i % 2]).join(format!("kwcp-{i}.conn"))
}

/// A real agent process for `app`, writing `<login>\n<secret>\n` for each of
/// its credentials; its health check logs in with `psql` as the file says.
fn start_agent(
    bin: &Path,
    nats: &NatsServer,
    pg: &PostgresServer,
    key: &RegionKey,
    dir: &Path,
    app: &str,
) -> Daemon {
    let home = dir.join(app);
    std::fs::create_dir_all(&home).unwrap();
    let psql = require("psql");
    let mut config = format!(
        r#"consumer = "{app}"
region = "eu"
nats_url = "{nats}"
health_command = "PGPASSWORD=\"$(sed -n 2p \"$KEYWAVE_SECRET_FILE\")\" PGCONNECT_TIMEOUT=5 {psql} -X -w -h 127.0.0.1 -p {port} -U \"$KEYWAVE_LOGIN\" -d postgres -tAc 'SELECT 1' | grep -qx 1"
health_timeout_secs = 10
health_retry_secs = 1
"#,
        nats = nats.url(),
        psql = psql.display(),
        port = pg.port(),
    );
    for i in (0..N).filter(|i| APPS[i % 2] == app) {
        config.push_str(&format!(
            "\n[[credential]]\nid = \"kwcp-{i}\"\npath = \"{}\"\nprincipal = \"{}\"\ntemplate = \"{{{{login}}}}\\n{{{{secret}}}}\\n\"\n",
            secret_file(dir, i).display(),
            role(i),
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
    Daemon::spawn(format!("agent {app}"), cmd, &home.join("agent.log"))
}

/// What the application stand-in saw.
#[derive(Debug, Default)]
struct AppStats {
    /// Logins that worked.
    ok: u64,
    /// Refused while the file still held what was used: a real outage.
    refused: u64,
    /// Refused after the file had moved on: the application retries.
    retried: u64,
    /// Reads that were not a whole `<login>\n<secret>\n`.
    torn: u64,
}

/// Parses a secret file: `(login, secret)` when whole.
fn parse(content: &str, i: usize) -> Option<(String, Secret)> {
    let body = content.strip_suffix('\n')?;
    let (login, secret) = body.split_once('\n')?;
    let policy = SecretPolicy::default();
    let whole = (login == role(i) || login == clone_of(&role(i)))
        && secret.len() == policy.length
        && secret.chars().all(|c| c.is_ascii_alphanumeric());
    whole.then(|| (login.to_string(), Secret::new(secret.to_string())))
}

/// One connection loop of the application: connect as the file says, run a
/// query, disconnect; over the credentials `i % APP_LOOPS == lane`.
async fn app_loop(dir: PathBuf, port: u16, lane: usize, stop: Arc<AtomicBool>) -> AppStats {
    let mut stats = AppStats::default();
    let mine: Vec<usize> = (0..N).filter(|i| i % APP_LOOPS == lane).collect();
    while !stop.load(Ordering::SeqCst) {
        for &i in &mine {
            let path = secret_file(&dir, i);
            let content = std::fs::read_to_string(&path).expect("secret file exists");
            let Some((login, secret)) = parse(&content, i) else {
                stats.torn += 1;
                continue;
            };
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(port)
                .user(&login)
                .password(secret.expose())
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(5));
            match cfg.connect(tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    let io = tokio::spawn(conn);
                    let row = client.query_one("SELECT 1", &[]).await.expect("query");
                    assert_eq!(row.get::<_, i32>(0), 1);
                    drop(client);
                    let _ = io.await;
                    stats.ok += 1;
                }
                Err(e) => {
                    let code = e.code().cloned();
                    let auth = code == Some(tokio_postgres::error::SqlState::INVALID_PASSWORD)
                        || code == Some(
                            tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        );
                    assert!(auth, "app login as {login}: unexpected error {e}");
                    let now = std::fs::read_to_string(&path).unwrap_or_default();
                    if now == content {
                        stats.refused += 1;
                    } else {
                        stats.retried += 1;
                    }
                }
            }
        }
    }
    stats
}

/// A real login as `login` with the server's own client: refused or not.
fn pg_login(pg: &PostgresServer, login: &str, secret: &Secret) -> bool {
    match pg.psql_as(login, secret.expose(), "SELECT 1") {
        Ok(out) => {
            assert_eq!(out, "1");
            true
        }
        Err(e)
            if e.contains("password authentication failed")
                || e.contains("is not permitted to log in") =>
        {
            false
        }
        Err(e) => panic!("psql as {login:?}: unexpected error {e}"),
    }
}

async fn healthy_attestations(client: &async_nats::Client) -> HashSet<(String, String)> {
    support::read_stream(
        client,
        topology::STREAM_ATTEST,
        &subjects::attest("eu", "*"),
    )
    .await
    .iter()
    .map(|m| codec::decode::<Attestation>(m.headers.as_ref(), &m.payload).unwrap())
    .filter(|a| a.healthy)
    .map(|a| (a.credential_id, a.fingerprint))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_keep_working_through_a_continuity_campaign_of_100_postgres_roles() {
    support::init_tracing();
    let bin = tokio::task::spawn_blocking(|| {
        support::workspace_binary("keywave-worker", "keywave-worker")
    })
    .await
    .unwrap();
    let pg = Arc::new(
        tokio::task::spawn_blocking(PostgresServer::start)
            .await
            .unwrap(),
    );
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let key = RegionKey::generate();

    // 100 login roles, each with a NOLOGIN clone to alternate with.
    let creds: Vec<Credential> = (0..N).map(credential).collect();
    let initial: HashMap<String, Secret> = creds.iter().map(|c| (c.id.clone(), secret())).collect();
    let sql: String = creds
        .iter()
        .map(|c| {
            format!(
                "CREATE ROLE {} LOGIN PASSWORD '{}'; CREATE ROLE {} NOLOGIN;\n",
                c.principal,
                initial[&c.id].expose(),
                clone_of(&c.principal)
            )
        })
        .collect();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || p.psql(&sql).unwrap())
        .await
        .unwrap();
    support::put_inventory(&client, &creds).await;

    let target = PostgresTarget::connect(PostgresOptions {
        admin: Admin {
            host: "127.0.0.1".into(),
            port: pg.port(),
            user: "postgres".into(),
            password: Some(Secret::new(pg.password().into())),
            tls: Tls::Disable,
            connections: 4,
        },
        dbname: "postgres".into(),
        logins: Logins {
            continuity: Continuity::Alternating,
            ..Logins::default()
        },
        policy: SecretPolicy::default(),
    })
    .await
    .unwrap();
    let mut targets = Targets::new();
    targets.insert(PG, target, 8);
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    for c in &creds {
        worker
            .store
            .enroll(&c.id, initial[&c.id].clone())
            .await
            .unwrap();
    }

    // The agents write every file and attest the enrolled secrets.
    let mut agents: Vec<Daemon> = APPS
        .iter()
        .map(|app| start_agent(&bin, &server, &pg, &key, dir.path(), app))
        .collect();
    let fp: HashMap<String, String> = creds
        .iter()
        .map(|c| (c.id.clone(), worker.store.fingerprint(&initial[&c.id])))
        .collect();
    let c2 = client.clone();
    let want: HashSet<(String, String)> = fp.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    keywave_tests::wait_until(Duration::from_secs(120), || {
        let (c2, want) = (c2.clone(), want.clone());
        async move { want.is_subset(&healthy_attestations(&c2).await) }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "agents attest the enrolled secrets:\n{}\n{}",
            agents[0].log_tail(),
            agents[1].log_tail()
        )
    });

    // The application keeps connecting during the whole campaign.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..APP_LOOPS)
        .map(|lane| {
            tokio::spawn(app_loop(
                dir.path().to_path_buf(),
                pg.port(),
                lane,
                stop.clone(),
            ))
        })
        .collect();

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        Selector {
            tags: vec!["issue=6-pg".into()],
            ..Default::default()
        },
        Strategy::Continuity,
        "10,50%",
        0.0,
        OnFailure::Pause,
    );
    s.task_timeout_ms = 90_000;
    let cid = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(300))
        .await
        .unwrap();
    // A little more traffic on the final files.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut app = AppStats::default();
    for l in loops {
        let s = l.await.unwrap();
        app.ok += s.ok;
        app.refused += s.refused;
        app.retried += s.retried;
        app.torn += s.torn;
    }
    assert_eq!(
        status.state,
        CampaignState::Completed,
        "{status:#?}\n{}\n{}",
        agents[0].log_tail(),
        agents[1].log_tail()
    );
    assert_eq!(status.succeeded(), N as u64);
    eprintln!("application stand-in: {app:?}");
    assert_eq!(app.refused, 0, "the application was refused: {app:?}");
    assert_eq!(app.torn, 0, "a read saw a partial file: {app:?}");
    assert!(app.ok >= N as u64, "{app:?}");

    // Each consumer verified its credential's new secret; how long after the
    // promote, for the record.
    let results: Vec<RotationResult> = support::read_stream(
        &client,
        topology::STREAM_RESULTS,
        &subjects::result("eu", &cid),
    )
    .await
    .iter()
    .map(|m| codec::decode(m.headers.as_ref(), &m.payload).unwrap())
    .filter(|r: &RotationResult| r.action == TaskAction::Rotate)
    .collect();
    assert_eq!(results.len(), N);
    let mut after: Vec<u64> = Vec::new();
    for r in &results {
        assert_eq!(r.consumers.len(), 1, "{r:#?}");
        let c = &r.consumers[0];
        assert_eq!(c.status, ConsumerStatus::Verified, "{r:#?}");
        after.push(c.after_ms.expect("verified after"));
    }
    after.sort_unstable();
    eprintln!(
        "promote -> consumer verified: p50 {} ms, max {} ms",
        after[after.len() / 2],
        after[after.len() - 1]
    );

    // The store, the files and the server agree: the new secret is on the
    // clone, written for the application; the old password opens neither
    // login.
    let mut proofs = Vec::new();
    for (i, c) in creds.iter().enumerate() {
        let rec = worker.store.get(&c.id).await.unwrap().unwrap();
        let current = rec.current.unwrap();
        let clone = clone_of(&c.principal);
        assert_eq!(current.login.as_deref(), Some(clone.as_str()), "{}", c.id);
        let file = secret_file(dir.path(), i);
        let content = std::fs::read_to_string(&file).unwrap();
        let (login, written) = parse(&content, i).expect("whole file");
        assert!(login == clone && written == current.secret, "{}", c.id);
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
        proofs.push((
            c.principal.clone(),
            clone,
            current.secret,
            initial[&c.id].clone(),
        ));
    }
    let p = pg.clone();
    tokio::task::spawn_blocking(move || {
        for (primary, clone, current, old) in proofs {
            assert!(pg_login(&p, &clone, &current), "{clone}: new secret");
            assert!(
                !pg_login(&p, &primary, &old),
                "{primary}: old secret refused"
            );
            assert!(!pg_login(&p, &clone, &old), "{clone}: old secret refused");
        }
    })
    .await
    .unwrap();
    // Nothing temporary left next to the files.
    for app in APPS {
        for e in std::fs::read_dir(dir.path().join(app)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".conn") || name == "agent.toml" || name == "agent.log",
                "unexpected file {name}"
            );
        }
    }

    coordinator.stop().await;
    worker.stop().await;
    for a in &mut agents {
        a.kill();
    }
    let drop_sql: String = creds
        .iter()
        .map(|c| {
            format!(
                "DROP ROLE {}; DROP ROLE {};\n",
                c.principal,
                clone_of(&c.principal)
            )
        })
        .collect();
    let p = pg.clone();
    tokio::task::spawn_blocking(move || {
        p.psql(&drop_sql).unwrap();
        assert_eq!(
            p.psql("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'kwcp%'")
                .unwrap(),
            "0"
        );
    })
    .await
    .unwrap();
}
