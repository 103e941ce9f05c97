//! Campaigns against real Redis ACL users on a private `redis-server`, in
//! both strategies, proven with real `AUTH` from a fresh connection, as an
//! application would log in.

use crate::support::{self, credentials, in_regions, secret, spec};
use keywave_common::client::ApiClient;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::wire::{CampaignState, Credential, OnFailure, Strategy, TargetKind};
use keywave_tests::{NatsServer, RedisServer};
use keywave_worker::fault::Faults;
use keywave_worker::targets::redis::{RedisOptions, RedisTarget};
use keywave_worker::targets::Targets;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const USERS: usize = 200;

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

/// Number of passwords Redis holds for `user` (`ACL GETUSER ... passwords`).
async fn password_count(con: &mut redis::aio::MultiplexedConnection, user: &str) -> usize {
    let fields: Vec<redis::Value> = redis::cmd("ACL")
        .arg("GETUSER")
        .arg(user)
        .query_async(con)
        .await
        .unwrap();
    let i = fields
        .iter()
        .position(|v| matches!(v, redis::Value::BulkString(b) if b == b"passwords"))
        .expect("ACL GETUSER lists passwords");
    match &fields[i + 1] {
        redis::Value::Array(a) => a.len(),
        other => panic!("unexpected passwords field {other:?}"),
    }
}

async fn rotate_redis_users(strategy: Strategy) {
    support::init_tracing();
    let redis = RedisServer::start();
    let server = NatsServer::start();
    let client = server.client().await;
    let mut con = admin(&redis).await;

    // The users exist before keywave knows them, with today's password.
    let creds: Vec<Credential> = credentials(
        &format!("kw-{strategy}"),
        USERS,
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
    let key = RegionKey::generate();
    let worker =
        support::start_worker(&client, "eu", &key, Arc::new(targets), Faults::none()).await;
    for c in &creds {
        worker
            .store
            .enroll(&c.id, initial[&c.id].clone())
            .await
            .unwrap();
    }

    let coordinator = support::start_coordinator(&client).await;
    let api = ApiClient::new(client.clone());
    let id = api
        .start(spec(
            in_regions(&["eu"]),
            strategy,
            "1,10%,50%",
            0.0,
            OnFailure::Pause,
        ))
        .await
        .unwrap();
    let status = api
        .wait_terminal(&id, Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(status.state, CampaignState::Completed, "{status:#?}");
    assert_eq!(status.succeeded(), USERS as u64);
    assert_eq!(status.failed(), 0);

    for c in &creds {
        let rec = worker.store.get(&c.id).await.unwrap().expect("record");
        let current = rec.current.expect("current");
        let previous = rec.previous.expect("previous");
        assert!(rec.pending.is_none(), "{}", c.id);
        assert!(previous.secret == initial[&c.id], "{}", c.id);
        assert!(
            auth(&redis, &c.principal, &current.secret).await,
            "{}: new secret works",
            c.id
        );
        assert!(
            !auth(&redis, &c.principal, &previous.secret).await,
            "{}: old secret rejected",
            c.id
        );
        assert_eq!(password_count(&mut con, &c.principal).await, 1, "{}", c.id);
    }

    coordinator.stop().await;
    worker.stop().await;

    // Leave the server as we found it.
    for c in &creds {
        let _: i64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&c.principal)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let users: Vec<String> = redis::cmd("ACL")
        .arg("USERS")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(users, vec!["default".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuity_campaign_rotates_redis_acl_users() {
    rotate_redis_users(Strategy::Continuity).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containment_campaign_rotates_redis_acl_users() {
    rotate_redis_users(Strategy::Containment).await;
}
