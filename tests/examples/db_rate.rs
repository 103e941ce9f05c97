//! Rotations per second against real databases: starts a private PostgreSQL,
//! MariaDB and nats-server, creates `--roles` logins on each, then for every
//! `--concurrency` level runs one containment campaign per target through a
//! real coordinator and worker (each rotation = set the new secret, a real
//! login with it, a real login with the old one that must be refused) and
//! prints one JSON line per run.
//!
//! ```text
//! cargo run --release -p keywave-tests --example db_rate -- \
//!     --roles 1000 --concurrency 8,16,32 [--pool 8] [--targets postgres,mysql] [--tls]
//!
//! `--tls`: the servers take TLS connections only, and the worker connects
//! with `tls = "require"` (the harness's test CA, certificate verified).
//! ```
//!
//! `concurrency` is the endpoint's `max_concurrency` (operations at once,
//! so login checks at once); `pool` its `admin_connections`, capped at the
//! concurrency. The worker takes up to 64 tasks at once.

use keywave_common::client::ApiClient;
use keywave_common::crypto::{generate, RegionKey, Secret, SecretPolicy};
use keywave_common::topology;
use keywave_common::wire::{
    CampaignSpec, CampaignState, Credential, OnFailure, Selector, Strategy, TargetKind,
    SCHEMA_VERSION,
};
use keywave_coordinator::CoordinatorOptions;
use keywave_devkit::fleet::{CoordinatorTask, WorkerTask};
use keywave_tests::mariadb::ADMIN_USER;
use keywave_tests::{MariaDbServer, NatsServer, PostgresServer};
use keywave_worker::targets::db::{Admin, Logins, Tls, TlsRequire};
use keywave_worker::targets::mysql::{MysqlOptions, MysqlTarget};
use keywave_worker::targets::postgres::{PostgresOptions, PostgresTarget};
use keywave_worker::targets::Targets;
use keywave_worker::WorkerOptions;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    roles: usize,
    concurrency: Vec<usize>,
    pool: usize,
    targets: Vec<TargetKind>,
    /// Servers that take TLS only, and `tls = "require"` with their CA.
    tls: bool,
}

fn args() -> Args {
    let mut a = Args {
        roles: 1000,
        concurrency: vec![8, 16, 32],
        pool: 8,
        targets: vec![TargetKind::Postgres, TargetKind::Mysql],
        tls: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--tls" {
            a.tls = true;
            continue;
        }
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--roles" => a.roles = value.parse().expect("--roles N"),
            "--pool" => a.pool = value.parse().expect("--pool N"),
            "--concurrency" => {
                a.concurrency = value
                    .split(',')
                    .map(|c| c.trim().parse().expect("--concurrency N[,N...]"))
                    .collect()
            }
            "--targets" => {
                a.targets = value
                    .split(',')
                    .map(|t| match t.trim() {
                        "postgres" => TargetKind::Postgres,
                        "mysql" | "mariadb" => TargetKind::Mysql,
                        other => panic!("unknown target {other:?} (postgres, mysql)"),
                    })
                    .collect()
            }
            other => {
                panic!("unknown flag {other} (--roles, --concurrency, --pool, --targets, --tls)")
            }
        }
    }
    a
}

fn credential(i: usize, kind: TargetKind) -> Credential {
    let (prefix, endpoint) = match kind {
        TargetKind::Postgres => ("kwrate_pg", "pg"),
        _ => ("kwrate_my", "my"),
    };
    let id = format!("{prefix}_{i:05}");
    Credential {
        v: SCHEMA_VERSION,
        principal: id.clone(),
        id,
        region: "eu".into(),
        endpoint: endpoint.into(),
        kind,
        tags: vec![],
        owner: None,
        consumers: vec![],
    }
}

fn admin(port: u16, user: &str, password: &str, connections: usize, ca: Option<&Path>) -> Admin {
    Admin {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        password: Some(Secret::new(password.into())),
        // The test CA's server certificates name localhost.
        tls: match ca {
            None => Tls::Disable,
            Some(ca) => Tls::Require(TlsRequire::new(Some(ca), Some("localhost")).expect("CA")),
        },
        connections,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = args();
    let policy = SecretPolicy::default();
    let (pg, maria) = if args.tls {
        tokio::join!(
            tokio::task::spawn_blocking(PostgresServer::start_tls),
            tokio::task::spawn_blocking(MariaDbServer::start_tls)
        )
    } else {
        tokio::join!(
            tokio::task::spawn_blocking(PostgresServer::start),
            tokio::task::spawn_blocking(MariaDbServer::start)
        )
    };
    let (pg, maria) = (pg.unwrap(), Arc::new(maria.unwrap()));
    let nats = NatsServer::start();
    let client = nats.client().await;

    // The logins, created in one statement batch per server.
    let mut creds = Vec::new();
    let mut initial = Vec::new();
    let (mut pg_sql, mut my_sql) = (String::new(), Vec::new());
    for kind in &args.targets {
        for i in 0..args.roles {
            let c = credential(i, *kind);
            let s = generate(&policy);
            match kind {
                TargetKind::Postgres => pg_sql.push_str(&format!(
                    "CREATE ROLE \"{}\" LOGIN PASSWORD '{}';\n",
                    c.principal,
                    s.expose()
                )),
                _ => my_sql.push(format!(
                    "CREATE USER '{}'@'%' IDENTIFIED BY '{}';",
                    c.principal,
                    s.expose()
                )),
            }
            initial.push((c.id.clone(), s));
            creds.push(c);
        }
    }
    let pg = Arc::new(pg);
    if !pg_sql.is_empty() {
        // With the server's own client, which speaks TLS to a TLS-only server.
        let p = pg.clone();
        tokio::task::spawn_blocking(move || p.psql(&pg_sql).expect("create roles"))
            .await
            .unwrap();
    }
    if !my_sql.is_empty() {
        let m = maria.clone();
        tokio::task::spawn_blocking(move || m.sql(&my_sql.join("\n")).expect("create users"))
            .await
            .unwrap();
    }

    let cfg = topology::Config::default();
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &cfg).await.expect("topology");
    let kv = topology::inventory(&js, &cfg).await.expect("inventory");
    keywave_coordinator::inventory::put_all(&kv, &creds)
        .await
        .expect("inventory import");
    let coordinator = CoordinatorTask::start(
        &client,
        CoordinatorOptions {
            coordinator_id: "db-rate".into(),
            ..Default::default()
        },
    )
    .await
    .expect("coordinator");
    let api = ApiClient::new(client.clone()).with_timeout(Duration::from_secs(5));
    keywave_tests::wait_until(Duration::from_secs(15), || {
        let api = api.clone();
        async move { api.ping().await.is_ok() }
    })
    .await
    .expect("coordinator answers");

    let key = RegionKey::generate();
    let mut enrolled = false;
    for &concurrency in &args.concurrency {
        let pool = args.pool.min(concurrency).max(1);
        let mut targets = Targets::new();
        let pg_target = PostgresTarget::connect(PostgresOptions {
            admin: admin(pg.port(), "postgres", pg.password(), pool, pg.ca_file()),
            dbname: "postgres".into(),
            logins: Logins::default(),
            policy,
        })
        .await
        .expect("postgres target");
        targets.insert("pg", pg_target, concurrency);
        let my_target = MysqlTarget::connect(MysqlOptions {
            admin: admin(
                maria.port(),
                ADMIN_USER,
                maria.password(),
                pool,
                maria.ca_file(),
            ),
            account_host: "%".into(),
            logins: Logins::default(),
            policy,
        })
        .await
        .expect("mysql target");
        targets.insert("my", my_target, concurrency);
        let worker = WorkerTask::start(
            &client,
            WorkerOptions {
                region: "eu".into(),
                worker_id: format!("db-rate-{concurrency}"),
                concurrency: 64.max(concurrency),
                ..Default::default()
            },
            &key,
            Arc::new(targets),
        )
        .await
        .expect("worker");
        if !enrolled {
            for (id, s) in &initial {
                worker.store().enroll(id, s.clone()).await.expect("enroll");
            }
            enrolled = true;
        }

        for kind in &args.targets {
            let spec = CampaignSpec {
                v: SCHEMA_VERSION,
                name: "db_rate".into(),
                reason: Some("benchmark".into()),
                selector: Selector {
                    kinds: vec![*kind],
                    ..Default::default()
                },
                strategy: Strategy::Containment,
                waves: keywave_common::wire::parse_wave_plan("100%").unwrap(),
                failure_budget: 0.0,
                bake_ms: 0,
                on_failure: OnFailure::Pause,
                task_timeout_ms: 600_000,
                approve_before_waves: Vec::new(),
                preflight: None,
                preflight_max_unreachable: 0.0,
                requested_by: None,
            };
            let started = Instant::now();
            let id = api.start(spec).await.expect("campaign starts");
            let status = api
                .wait_terminal(&id, Duration::from_secs(3600))
                .await
                .expect("campaign ends");
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
            println!(
                "{}",
                serde_json::json!({
                    "target": match kind { TargetKind::Postgres => "postgres", _ => "mariadb" },
                    "roles": args.roles,
                    "concurrency": concurrency,
                    "admin_connections": pool,
                    "tls": args.tls,
                    "succeeded": status.succeeded(),
                    "failed": status.failed(),
                    "seconds": (secs * 100.0).round() / 100.0,
                    "rotations_per_second": (status.succeeded() as f64 / secs).round(),
                    "build": if cfg!(debug_assertions) { "debug" } else { "release" },
                })
            );
        }
        // However long the drain takes.
        let _ = worker.stop(Duration::MAX).await;
    }
    let _ = coordinator.stop(Duration::MAX).await;
}
