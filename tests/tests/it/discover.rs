//! `keywave inventory discover` against private PostgreSQL and MariaDB
//! servers: the region's admin service lists the login roles / accounts, the
//! proposal leaves out superusers, replication and bypass-RLS roles, accounts
//! with SUPER / GRANT OPTION / ALL ON *.*, system accounts and the endpoint's
//! admin login (unless `--include-privileged`), and always the clone of an
//! alternating pair; `--match` filters; `--import` adds the records (existing
//! ids skipped) and a campaign then rotates them.

use crate::reconcile::{run_keywave, start_admin};
use crate::support::{self, secret, spec};
use keywave_cli::discover::{self, DiscoverArgs, Discovery};
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, SecretPolicy};
use keywave_common::wire::{CampaignState, OnFailure, Selector, Strategy, TargetKind};
use keywave_tests::mariadb::ADMIN_USER;
use keywave_tests::{MariaDbServer, NatsServer, PostgresServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::db::{Admin, Logins, Tls};
use keywave_worker::targets::mysql::{MysqlOptions, MysqlTarget};
use keywave_worker::targets::postgres::{PostgresOptions, PostgresTarget};
use keywave_worker::targets::{AuthCheck, Target, Targets};
use std::sync::Arc;
use std::time::Duration;

const PG: &str = "pg-main";
const MARIA: &str = "mariadb-main";

fn admin(port: u16, user: &str, password: &str) -> Admin {
    Admin {
        host: "127.0.0.1".into(),
        port,
        user: user.into(),
        password: Some(keywave_common::crypto::Secret::new(password.into())),
        tls: Tls::Disable,
        connections: 2,
    }
}

fn args(endpoint: &str, pattern: Option<&str>, include_privileged: bool) -> DiscoverArgs {
    DiscoverArgs {
        endpoint: endpoint.into(),
        region: "eu".into(),
        pattern: pattern.map(String::from),
        include_privileged,
        import: false,
        tags: vec!["env=test".into()],
        owner: Some("keywave-tests".into()),
        timeout: "60s".into(),
    }
}

fn principals(d: &Discovery) -> Vec<&str> {
    let mut v: Vec<&str> = d.proposed.iter().map(|c| c.principal.as_str()).collect();
    v.sort();
    v
}

fn excluded(d: &Discovery, principal: &str) -> Vec<String> {
    d.excluded
        .iter()
        .find(|e| e.principal == principal)
        .unwrap_or_else(|| panic!("{principal} is not among the excluded: {:?}", d.excluded))
        .reasons
        .clone()
}

#[tokio::test]
async fn discover_import_and_rotate_postgres_and_mariadb() {
    support::init_tracing();
    let (pg, maria) = tokio::join!(
        tokio::task::spawn_blocking(PostgresServer::start),
        tokio::task::spawn_blocking(MariaDbServer::start)
    );
    let (pg, maria) = (pg.unwrap(), maria.unwrap());
    let server = NatsServer::start();
    let client = server.client().await;

    // PostgreSQL: ordinary logins, an alternating pair (its clone is the
    // active login right now), privileged ones, a group role without LOGIN.
    let pw = secret();
    let p = pw.expose();
    pg.psql(&format!(
        "CREATE ROLE app_orders LOGIN PASSWORD '{p}';
         CREATE ROLE app_billing NOLOGIN;
         CREATE ROLE app_billing_clone LOGIN PASSWORD '{p}';
         CREATE ROLE report_ro LOGIN PASSWORD '{p}';
         CREATE ROLE app_root SUPERUSER LOGIN PASSWORD '{p}';
         CREATE ROLE app_repl REPLICATION LOGIN PASSWORD '{p}';
         CREATE ROLE app_norls BYPASSRLS LOGIN PASSWORD '{p}';
         CREATE ROLE app_group NOLOGIN;"
    ))
    .unwrap();
    // MariaDB: ordinary accounts and privileged ones.
    maria
        .sql(&format!(
            "CREATE USER 'app_a'@'%' IDENTIFIED BY '{p}';
             CREATE USER 'app_b'@'%' IDENTIFIED BY '{p}';
             CREATE USER 'app_b'@'10.0.0.%' IDENTIFIED BY '{p}';
             CREATE USER 'app_all'@'%' IDENTIFIED BY '{p}';
             GRANT ALL PRIVILEGES ON *.* TO 'app_all'@'%';
             CREATE USER 'app_super'@'%' IDENTIFIED BY '{p}';
             GRANT SUPER ON *.* TO 'app_super'@'%';
             CREATE USER 'app_granter'@'%' IDENTIFIED BY '{p}';
             GRANT SELECT ON mysql.* TO 'app_granter'@'%' WITH GRANT OPTION;
             GRANT USAGE ON *.* TO 'app_granter'@'%' WITH GRANT OPTION;
             CREATE USER 'batch'@'%' IDENTIFIED BY '{p}';"
        ))
        .unwrap();

    let logins = Logins {
        alternating: [("app_billing".to_string(), "app_billing_clone".to_string())].into(),
        ..Logins::default()
    };
    let pg_target = PostgresTarget::connect(PostgresOptions {
        admin: admin(pg.port(), "postgres", pg.password()),
        dbname: "postgres".into(),
        logins,
        policy: SecretPolicy::default(),
    })
    .await
    .unwrap();
    let my_target = MysqlTarget::connect(MysqlOptions {
        admin: admin(maria.port(), ADMIN_USER, maria.password()),
        account_host: "%".into(),
        logins: Logins::default(),
        policy: SecretPolicy::default(),
    })
    .await
    .unwrap();
    let mut targets = Targets::new();
    targets.insert(PG, pg_target.clone(), 4);
    targets.insert(MARIA, my_target.clone(), 4);
    let targets = Arc::new(targets);
    let key = RegionKey::generate();
    let worker = support::start_worker(&client, "eu", &key, targets.clone(), Faults::none()).await;
    let admin_svc = start_admin(&client, "eu", worker.store.clone(), targets.clone()).await;

    // PostgreSQL: privileged and admin left out, the clone folded into its primary.
    let d = discover::discover(&client, &args(PG, None, false))
        .await
        .unwrap();
    assert_eq!(d.kind, "postgres");
    assert_eq!(principals(&d), ["app_billing", "app_orders", "report_ro"]);
    assert!(excluded(&d, "postgres").contains(&"superuser".to_string()));
    assert!(excluded(&d, "postgres").contains(&"the endpoint's admin login".to_string()));
    assert_eq!(excluded(&d, "app_root"), ["superuser"]);
    assert_eq!(excluded(&d, "app_repl"), ["replication"]);
    assert_eq!(excluded(&d, "app_norls"), ["bypassrls"]);
    assert!(d.excluded.iter().all(|e| e.principal != "app_group"));
    // The active login of the pair is its clone: the primary is proposed.
    assert_eq!(
        excluded(&d, "app_billing_clone"),
        ["alternating clone of \"app_billing\""]
    );
    let c = d
        .proposed
        .iter()
        .find(|c| c.principal == "app_orders")
        .unwrap();
    assert_eq!(c.id, "pg-main-app_orders");
    assert_eq!(c.region, "eu");
    assert_eq!(c.kind, TargetKind::Postgres);
    assert_eq!(c.tags, ["discovered", "env=test"]);

    // --match, and --include-privileged (never the clone).
    let d = discover::discover(&client, &args(PG, Some("app_*"), false))
        .await
        .unwrap();
    assert_eq!(principals(&d), ["app_billing", "app_orders"]);
    let d = discover::discover(&client, &args(PG, Some("app_*"), true))
        .await
        .unwrap();
    assert_eq!(
        principals(&d),
        [
            "app_billing",
            "app_norls",
            "app_orders",
            "app_repl",
            "app_root"
        ]
    );

    // MariaDB.
    let d = discover::discover(&client, &args(MARIA, None, false))
        .await
        .unwrap();
    assert_eq!(d.kind, "mysql");
    assert_eq!(
        principals(&d),
        ["app_a", "app_b", "app_b@10.0.0.%", "batch"]
    );
    assert!(excluded(&d, "app_all").contains(&"ALL PRIVILEGES ON *.*".to_string()));
    assert!(excluded(&d, "app_super").contains(&"SUPER".to_string()));
    assert!(excluded(&d, "app_granter").contains(&"GRANT OPTION".to_string()));
    let admin_reasons: Vec<String> = d
        .excluded
        .iter()
        .filter(|e| e.principal.split('@').next() == Some(ADMIN_USER))
        .flat_map(|e| e.reasons.clone())
        .collect();
    assert!(
        admin_reasons.contains(&"the endpoint's admin login".to_string()),
        "{:?}",
        d.excluded
    );
    let d = discover::discover(&client, &args(MARIA, Some("app_?"), false))
        .await
        .unwrap();
    assert_eq!(principals(&d), ["app_a", "app_b"]);

    // The real CLI prints importable JSON Lines.
    let (code, stdout, stderr) = run_keywave(
        &server.url(),
        &[
            "inventory",
            "discover",
            "--endpoint",
            PG,
            "--region",
            "eu",
            "--match",
            "app_*",
        ],
    )
    .await;
    println!("$ keywave inventory discover --endpoint {PG} --region eu --match 'app_*'\n{stdout}{stderr}");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stderr.contains("excluded app_root"), "{stderr}");
    assert!(!stdout.contains(p) && !stderr.contains(p));

    // --import: records added, existing ids skipped on a second run.
    let (code, stdout, stderr) = run_keywave(
        &server.url(),
        &[
            "inventory",
            "discover",
            "--endpoint",
            PG,
            "--region",
            "eu",
            "--match",
            "app_*",
            "--import",
            "--tag",
            "env=test",
        ],
    )
    .await;
    println!("$ keywave inventory discover --endpoint {PG} --region eu --match 'app_*' --import --tag env=test\n{stdout}{stderr}");
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("imported 2 records"), "{stderr}");
    let mut a = args(PG, Some("app_*"), false);
    a.import = true;
    let mut a2 = args(MARIA, Some("app_?"), false);
    a2.import = true;
    let mut d2 = discover::discover(&client, &a2).await.unwrap();
    assert_eq!(discover::import(&client, &mut d2).await.unwrap(), 2);
    let mut again = discover::discover(&client, &a).await.unwrap();
    assert_eq!(again.existing.len(), 2);
    assert_eq!(discover::import(&client, &mut again).await.unwrap(), 0);

    // Today's secrets are enrolled (what `keywave-worker enroll` does), so
    // that the campaign can prove each one refused afterwards.
    for cid in [
        "pg-main-app_orders",
        "pg-main-app_billing",
        "mariadb-main-app_a",
        "mariadb-main-app_b",
    ] {
        worker.store.enroll(cid, pw.clone()).await.unwrap();
    }
    // A campaign rotates what was imported (containment: works for a
    // single-password login and for the alternating pair alike).
    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            Selector {
                tags: vec!["discovered".into()],
                ..Default::default()
            },
            Strategy::Containment,
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
    assert_eq!(status.state, CampaignState::Completed, "{status:?}");
    let (_, stdout, _) = run_keywave(&server.url(), &["campaign", "status", &id]).await;
    println!("$ keywave campaign status {id}\n{stdout}");
    assert_eq!(status.succeeded(), 4);
    // The evidence: the report names every imported credential with its
    // outcome and whether the old secret was refused.
    let (code, report, stderr) = run_keywave(
        &server.url(),
        &["campaign", "report", &id, "--format", "markdown"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    println!("$ keywave campaign report {id} --format markdown\n{report}");
    assert!(
        report.contains(&format!("# keywave campaign report: {id}")),
        "{report}"
    );
    for cid in [
        "pg-main-app_orders",
        "pg-main-app_billing",
        "mariadb-main-app_a",
        "mariadb-main-app_b",
    ] {
        assert!(report.contains(cid), "{cid} in the report:\n{report}");
    }
    assert!(
        report
            .contains("- Old secret rejected by the target: 4 (not checked: 0, still accepted: 0)"),
        "{report}"
    );
    assert!(!report.contains(pw.expose()), "no secret in the report");
    for (cid, target, principal) in [
        (
            "pg-main-app_orders",
            pg_target.clone() as Arc<dyn Target>,
            "app_orders",
        ),
        ("pg-main-app_billing", pg_target.clone(), "app_billing"),
        ("mariadb-main-app_a", my_target.clone(), "app_a"),
        ("mariadb-main-app_b", my_target.clone(), "app_b"),
    ] {
        let rec = worker.store.get(cid).await.unwrap().unwrap();
        let cur = rec.current.unwrap().secret;
        assert_eq!(
            target.check(principal, &cur).await.unwrap(),
            AuthCheck::Accepted,
            "{cid}"
        );
        assert_eq!(
            target.check(principal, &pw).await.unwrap(),
            AuthCheck::Rejected,
            "{cid}: the old password is refused"
        );
    }
    coordinator.stop().await;
    admin_svc.cancel();
    worker.stop().await;
}
