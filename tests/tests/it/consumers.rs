//! Consumers and dependencies against a real `nats-server` and
//! real Redis ACL users: two real `keywave-worker agent` processes write each
//! new secret to a file (atomically, mode 0600), reload, check their health
//! with `redis-cli` logging in with the file's secret, and attest; a
//! continuity rotation revokes the old secret only after both attested. A
//! stopped agent, or an HTTP consumer answering 500, keeps the old secret
//! and fails the task `consumer_not_verified`, and the wave's rollback makes
//! the old secret CURRENT again; `none` is reported unverified.

use crate::support::{self, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::codec;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::topology;
use keywave_common::wire::{
    Attestation, CampaignState, ConsumerRef, ConsumerStatus, Credential, ErrorClass, OnFailure,
    Outcome, RotationResult, Selector, Strategy, TargetKind, TaskAction, VerifyKind,
    SCHEMA_VERSION,
};
use keywave_tests::process::Daemon;
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::Targets;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

async fn create_user(redis: &RedisServer, user: &str, pw: &Secret) {
    let mut con = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(user)
        .arg("on")
        .arg(format!(">{}", pw.expose()))
        .arg("+ping")
        .query_async(&mut con)
        .await
        .unwrap();
}

fn credential(id: &str, consumers: Vec<ConsumerRef>) -> Credential {
    Credential {
        v: SCHEMA_VERSION,
        id: id.into(),
        region: "eu".into(),
        endpoint: "redis-main".into(),
        kind: TargetKind::Redis,
        principal: id.into(),
        tags: vec!["issue=6".into()],
        owner: None,
        consumers,
    }
}

fn consumer(
    id: &str,
    verify: VerifyKind,
    url: Option<String>,
    timeout_ms: Option<u64>,
) -> ConsumerRef {
    ConsumerRef {
        id: id.into(),
        kind: Some("app".into()),
        verify: Some(verify),
        url,
        timeout_ms,
    }
}

/// A real agent process for `consumer`, writing `credential` to
/// `<dir>/<consumer>/secret`; its health check logs in to Redis with the
/// file's content.
struct AgentProc {
    daemon: Daemon,
    file: PathBuf,
    marker: PathBuf,
}

fn start_agent(
    bin: &Path,
    nats: &NatsServer,
    redis: &RedisServer,
    key: &RegionKey,
    dir: &Path,
    consumer: &str,
    credential: &str,
) -> AgentProc {
    let home = dir.join(consumer);
    std::fs::create_dir_all(&home).unwrap();
    let file = home.join("secret");
    let marker = home.join("reloaded");
    let config = home.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"consumer = "{consumer}"
region = "eu"
nats_url = "{nats}"
reload_command = "touch '{marker}'"
reload_timeout_secs = 5
health_command = "redis-cli -p {port} --no-auth-warning --user {credential} --pass \"$(cat '{file}')\" PING | grep -q PONG"
health_timeout_secs = 5
health_retry_secs = 1

[[credential]]
id = "{credential}"
path = "{file}"
"#,
            nats = nats.url(),
            marker = marker.display(),
            port = redis.port(),
            file = file.display(),
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .env("KEYWAVE_REGION_KEY", key.to_hex())
        .env("RUST_LOG", "info");
    let daemon = Daemon::spawn(format!("agent {consumer}"), cmd, &home.join("agent.log"));
    AgentProc {
        daemon,
        file,
        marker,
    }
}

/// Every attestation of `credential` in `KEYWAVE_ATTEST`.
async fn attestations(client: &async_nats::Client, credential: &str) -> Vec<Attestation> {
    support::read_stream(
        client,
        topology::STREAM_ATTEST,
        &keywave_common::subjects::attest("eu", credential),
    )
    .await
    .iter()
    .map(|m| codec::decode(m.headers.as_ref(), &m.payload).expect("attestation decodes"))
    .collect()
}

async fn results(client: &async_nats::Client, cid: &str) -> Vec<RotationResult> {
    support::read_stream(
        client,
        topology::STREAM_RESULTS,
        &keywave_common::subjects::result("eu", cid),
    )
    .await
    .iter()
    .map(|m| codec::decode(m.headers.as_ref(), &m.payload).expect("result decodes"))
    .collect()
}

/// A local HTTP service answering `status` on `/healthz`.
async fn http_service(status: u16) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let code = axum::http::StatusCode::from_u16(status).unwrap();
    let app =
        axum::Router::new().route("/healthz", axum::routing::get(move || async move { code }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/healthz")
}

fn assert_written(file: &Path, expected: &Secret) {
    let content = std::fs::read_to_string(file).unwrap();
    assert!(
        content == expected.expose(),
        "{} holds the wrong secret",
        file.display()
    );
    let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    // Atomic write: nothing but the file, its config, log and marker.
    let dir = file.parent().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".tmp") && !name.starts_with('.'),
            "temporary file {name} left in {}",
            dir.display()
        );
    }
}

/// Both agents write the new secret and attest it, the HTTP consumer answers
/// 200, `none` is unverified, and the old secret is refused only after both
/// attestations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_move_over_before_the_old_secret_is_revoked() {
    support::init_tracing();
    let bin = tokio::task::spawn_blocking(|| {
        support::workspace_binary("keywave-worker", "keywave-worker")
    })
    .await
    .unwrap();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let key = RegionKey::generate();
    let ok_url = http_service(200).await;

    let cred = credential(
        "kw-cons-orders",
        vec![
            consumer("orders-a", VerifyKind::Attest, None, None),
            "orders-b".into(),
            consumer("orders-web", VerifyKind::Http, Some(ok_url), None),
            consumer("orders-batch", VerifyKind::None, None, None),
        ],
    );
    let initial = secret();
    create_user(&redis, &cred.principal, &initial).await;
    support::put_inventory(&client, std::slice::from_ref(&cred)).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 4);
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    worker
        .store
        .enroll(&cred.id, initial.clone())
        .await
        .unwrap();
    let initial_fp = worker.store.fingerprint(&initial);

    let mut agents = vec![
        start_agent(
            &bin,
            &server,
            &redis,
            &key,
            dir.path(),
            "orders-a",
            &cred.id,
        ),
        start_agent(
            &bin,
            &server,
            &redis,
            &key,
            dir.path(),
            "orders-b",
            &cred.id,
        ),
    ];
    // Both write today's secret and attest it, healthy.
    let c = client.clone();
    let id = cred.id.clone();
    let fp = initial_fp.clone();
    keywave_tests::wait_until(Duration::from_secs(60), || {
        let (c, id, fp) = (c.clone(), id.clone(), fp.clone());
        async move {
            let a = attestations(&c, &id).await;
            ["orders-a", "orders-b"].iter().all(|who| {
                a.iter()
                    .any(|a| a.consumer_id == *who && a.fingerprint == fp && a.healthy)
            })
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "agents attest the enrolled secret: {}",
            agents[0].daemon.log_tail()
        )
    });
    for a in &agents {
        assert_written(&a.file, &initial);
        assert!(a.marker.exists(), "reload command ran");
    }

    // Watch the old secret while the campaign runs: when is it refused?
    let watch_stop = tokio_util::sync::CancellationToken::new();
    let refused_at = {
        let stop = watch_stop.clone();
        let url = redis.url();
        let user = cred.principal.clone();
        let old = initial.clone();
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            while !stop.is_cancelled() {
                let mut con = client.get_multiplexed_async_connection().await.unwrap();
                let r = redis::cmd("AUTH")
                    .arg(&user)
                    .arg(old.expose())
                    .query_async::<()>(&mut con)
                    .await;
                if r.is_err() {
                    return Some(keywave_common::now_ms());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        })
    };

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let cid = api
        .start(spec(
            Selector {
                ids: vec![cred.id.clone()],
                ..Default::default()
            },
            Strategy::Continuity,
            "1",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    watch_stop.cancel();
    let refused_at = refused_at.await.unwrap().expect("old secret refused");

    let rec = worker.store.get(&cred.id).await.unwrap().unwrap();
    let new = rec.current.unwrap();
    assert!(auth(&redis, &cred.principal, &new.secret).await);
    assert!(
        !auth(&redis, &cred.principal, &initial).await,
        "old secret refused"
    );
    let attested = attestations(&client, &cred.id).await;
    for a in &agents {
        assert_written(&a.file, &new.secret);
    }
    for who in ["orders-a", "orders-b"] {
        let a = attested
            .iter()
            .find(|a| a.consumer_id == who && a.fingerprint == new.fingerprint && a.healthy)
            .unwrap_or_else(|| panic!("{who} attested the new secret: {attested:#?}"));
        assert!(
            a.at_ms <= refused_at,
            "{who} attested at {} after the old secret was refused at {refused_at}",
            a.at_ms
        );
    }
    // No attestation carries anything but fingerprints.
    for a in &attested {
        assert!(!a.fingerprint.contains(new.secret.expose()));
    }
    let rs = results(&client, &cid).await;
    let r = rs.iter().find(|r| r.credential_id == cred.id).unwrap();
    assert_eq!(r.outcome, Outcome::Succeeded);
    let status_of = |id: &str| r.consumers.iter().find(|c| c.id == id).unwrap().status;
    assert_eq!(status_of("orders-a"), ConsumerStatus::Verified);
    assert_eq!(status_of("orders-b"), ConsumerStatus::Verified);
    assert_eq!(status_of("orders-web"), ConsumerStatus::Verified);
    assert_eq!(status_of("orders-batch"), ConsumerStatus::Unverified);

    coordinator.stop().await;
    worker.stop().await;
    for a in &mut agents {
        a.daemon.kill();
    }
}

/// A consumer whose agent is stopped, and an HTTP consumer answering 500:
/// the old secret is not revoked, the task fails consumer_not_verified
/// naming the consumer, and the wave rolls back: the previous secret is
/// CURRENT again at the target and in the store, so the stopped agent's file
/// still holds a secret that works and the live agent follows it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unverified_consumers_keep_the_old_secret_and_the_wave_rolls_back() {
    support::init_tracing();
    let bin = tokio::task::spawn_blocking(|| {
        support::workspace_binary("keywave-worker", "keywave-worker")
    })
    .await
    .unwrap();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let key = RegionKey::generate();
    let bad_url = http_service(500).await;

    let stopped = credential(
        "kw-cons-stopped",
        vec![
            consumer("live-agent", VerifyKind::Attest, None, None),
            consumer("dead-agent", VerifyKind::Attest, None, Some(3_000)),
        ],
    );
    let http = credential(
        "kw-cons-http",
        vec![consumer(
            "broken-web",
            VerifyKind::Http,
            Some(bad_url),
            Some(3_000),
        )],
    );
    let creds = vec![stopped.clone(), http.clone()];
    let mut initial = std::collections::HashMap::new();
    for c in &creds {
        let pw = secret();
        create_user(&redis, &c.principal, &pw).await;
        initial.insert(c.id.clone(), pw);
    }
    support::put_inventory(&client, &creds).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 4);
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    for c in &creds {
        worker
            .store
            .enroll(&c.id, initial[&c.id].clone())
            .await
            .unwrap();
    }
    // The live agent runs; the dead one ran once, then was stopped.
    let mut live = start_agent(
        &bin,
        &server,
        &redis,
        &key,
        dir.path(),
        "live-agent",
        &stopped.id,
    );
    let mut dead = start_agent(
        &bin,
        &server,
        &redis,
        &key,
        dir.path(),
        "dead-agent",
        &stopped.id,
    );
    let c = client.clone();
    let id = stopped.id.clone();
    keywave_tests::wait_until(Duration::from_secs(60), || {
        let (c, id) = (c.clone(), id.clone());
        async move {
            let a = attestations(&c, &id).await;
            ["live-agent", "dead-agent"]
                .iter()
                .all(|who| a.iter().any(|a| a.consumer_id == *who && a.healthy))
        }
    })
    .await
    .unwrap_or_else(|_| panic!("agents attest: {}", dead.daemon.log_tail()));
    dead.daemon.kill();

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut s = spec(
        Selector {
            tags: vec!["issue=6".into()],
            ..Default::default()
        },
        Strategy::Continuity,
        "2",
        0.0,
        OnFailure::Rollback,
    );
    s.task_timeout_ms = 20_000;
    let cid = api.start(s).await.unwrap();
    let status = api
        .wait_terminal(&cid, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::RolledBack, "{status:#?}");
    assert_eq!(status.failed(), 2, "{status:#?}");
    assert_eq!(status.waves[0].rolled_back, 2, "{status:#?}");

    let rs = results(&client, &cid).await;
    for c in &creds {
        let mine = |action: TaskAction| {
            rs.iter()
                .find(|r| r.credential_id == c.id && r.action == action)
                .unwrap_or_else(|| panic!("{action:?} result of {}", c.id))
        };
        let r = mine(TaskAction::Rotate);
        assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
        assert_eq!(
            r.error_class,
            Some(ErrorClass::ConsumerNotVerified),
            "{r:#?}"
        );
        // It failed after its promote: the new secret was CURRENT, so the
        // wave's rollback covers it.
        assert!(r.new_fingerprint.is_some(), "{r:#?}");
        assert_eq!(mine(TaskAction::Rollback).outcome, Outcome::RolledBack);

        // Rolled back: the previous secret is CURRENT again and logs in; the
        // rolled-back one is refused.
        let rec = worker.store.get(&c.id).await.unwrap().unwrap();
        let current = rec.current.unwrap();
        let rolled_back = rec.previous.unwrap();
        assert!(
            current.secret == initial[&c.id],
            "{}: previous restored",
            c.id
        );
        assert!(auth(&redis, &c.principal, &initial[&c.id]).await);
        assert!(!auth(&redis, &c.principal, &rolled_back.secret).await);
        let err = r.error.as_deref().unwrap();
        assert!(
            !err.contains(rolled_back.secret.expose()) && !err.contains(initial[&c.id].expose())
        );
    }
    let r = rs
        .iter()
        .find(|r| r.credential_id == stopped.id && r.action == TaskAction::Rotate)
        .unwrap();
    assert!(r.error.as_deref().unwrap().contains("dead-agent"), "{r:#?}");
    let status_of = |id: &str| r.consumers.iter().find(|c| c.id == id).unwrap().status;
    assert_eq!(status_of("live-agent"), ConsumerStatus::Verified);
    assert_eq!(status_of("dead-agent"), ConsumerStatus::Failed);
    let live_at = r.consumers.iter().find(|c| c.id == "live-agent").unwrap();
    assert!(live_at.verified_at_ms.is_some() && live_at.after_ms.is_some());
    let r = rs
        .iter()
        .find(|r| r.credential_id == http.id && r.action == TaskAction::Rotate)
        .unwrap();
    assert!(r.error.as_deref().unwrap().contains("broken-web"), "{r:#?}");
    assert!(r.error.as_deref().unwrap().contains("HTTP 500"), "{r:#?}");

    // The stopped agent's file still holds the secret it had, which is
    // CURRENT again and works; the live agent moved over and back.
    let restored = initial[&stopped.id].clone();
    assert_written(&dead.file, &restored);
    assert!(auth(&redis, &stopped.principal, &restored).await);
    let f = live.file.clone();
    let expected = restored.clone();
    keywave_tests::wait_until(Duration::from_secs(10), || {
        let ok = std::fs::read_to_string(&f).is_ok_and(|s| s == expected.expose());
        async move { ok }
    })
    .await
    .expect("live agent follows the rollback");
    assert_written(&live.file, &restored);

    coordinator.stop().await;
    worker.stop().await;
    live.daemon.kill();
}

/// Benchmark (ignored; run with `cargo test -p keywave-tests --test it --
/// --ignored --nocapture ten_consumers`): one Redis ACL credential used by
/// 10 consumers, each with its own real agent process (file write, reload
/// command, `redis-cli` health check, attestation). Rotated by `ROUNDS`
/// continuity campaigns in a row; prints, per rotation, the time from the
/// promote to "all 10 consumers verified" (the slowest consumer's
/// `after_ms` in the result), then the median and maximum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints numbers, run explicitly"]
async fn ten_consumers_promote_to_all_verified() {
    const CONSUMERS: usize = 10;
    const ROUNDS: usize = 20;
    support::init_tracing();
    let bin = tokio::task::spawn_blocking(|| {
        support::workspace_binary("keywave-worker", "keywave-worker")
    })
    .await
    .unwrap();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let dir = tempfile::tempdir().unwrap();
    let key = RegionKey::generate();
    let names: Vec<String> = (0..CONSUMERS).map(|i| format!("svc-{i}")).collect();
    let cred = credential(
        "kw-cons-ten",
        names
            .iter()
            .map(|n| consumer(n, VerifyKind::Attest, None, Some(30_000)))
            .collect(),
    );
    let initial = secret();
    create_user(&redis, &cred.principal, &initial).await;
    support::put_inventory(&client, std::slice::from_ref(&cred)).await;
    let target = RedisTarget::connect(RedisOptions { url: redis.url() })
        .await
        .unwrap();
    let mut targets = Targets::new();
    targets.insert("redis-main", target, 4);
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    worker
        .store
        .enroll(&cred.id, initial.clone())
        .await
        .unwrap();
    let fp = worker.store.fingerprint(&initial);
    let mut agents: Vec<AgentProc> = names
        .iter()
        .map(|n| start_agent(&bin, &server, &redis, &key, dir.path(), n, &cred.id))
        .collect();
    let c = client.clone();
    let id = cred.id.clone();
    let who = names.clone();
    keywave_tests::wait_until(Duration::from_secs(60), || {
        let (c, id, fp, who) = (c.clone(), id.clone(), fp.clone(), who.clone());
        async move {
            let a = attestations(&c, &id).await;
            who.iter().all(|w| {
                a.iter()
                    .any(|a| &a.consumer_id == w && a.fingerprint == fp && a.healthy)
            })
        }
    })
    .await
    .expect("agents attest the enrolled secret");

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let mut all_verified = Vec::new();
    for round in 0..ROUNDS {
        let s = spec(
            Selector {
                tags: vec!["issue=6".into()],
                ..Default::default()
            },
            Strategy::Continuity,
            "1",
            0.0,
            OnFailure::Pause,
        );
        let cid = api.start(s).await.unwrap();
        let status = api
            .wait_terminal(&cid, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
        let rs = results(&client, &cid).await;
        let r = &rs[0];
        assert_eq!(r.consumers.len(), CONSUMERS);
        assert!(r
            .consumers
            .iter()
            .all(|c| c.status == ConsumerStatus::Verified));
        let slowest = r.consumers.iter().filter_map(|c| c.after_ms).max().unwrap();
        println!("rotation {round}: promote -> all {CONSUMERS} consumers verified in {slowest} ms");
        all_verified.push(slowest);
    }
    all_verified.sort_unstable();
    println!(
        "promote -> all {CONSUMERS} consumers verified over {ROUNDS} rotations: p50 {} ms, max {} ms",
        all_verified[ROUNDS / 2],
        all_verified[ROUNDS - 1]
    );
    coordinator.stop().await;
    worker.stop().await;
    for a in &mut agents {
        a.daemon.kill();
    }
}
