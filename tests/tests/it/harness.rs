//! The harness itself: a restarted server keeps its JetStream data, a
//! cluster forms and keeps serving with one node down, Redis answers.

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use keywave_tests::{unique, wait_for, wait_until, NatsCluster, NatsServer, RedisServer};
use std::time::Duration;

#[tokio::test]
async fn restart_keeps_jetstream_data_on_the_same_port() {
    let mut server = NatsServer::start();
    let port = server.port();
    let name = unique("HARNESS");
    let subject = format!("harness.{name}");
    {
        let js = jetstream::new(server.client().await);
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        js.publish(subject.clone(), "survives".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    server.restart();
    assert_eq!(server.port(), port, "restart keeps the port");
    assert!(server.is_running());

    let js = jetstream::new(server.client().await);
    let stream = js.get_stream(&name).await.unwrap();
    let msg = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .unwrap();
    assert_eq!(&msg.payload[..], b"survives");
}

#[tokio::test]
async fn a_client_reconnects_across_a_restart() {
    let mut server = NatsServer::start();
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    let name = unique("HARNESS");
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        ..Default::default()
    })
    .await
    .unwrap();

    server.kill();
    assert!(!server.is_running());
    server.restart();

    // The same client carries on once it has reconnected.
    wait_until(Duration::from_secs(15), || {
        let js = js.clone();
        let subject = format!("{name}.after");
        async move {
            match js.publish(subject, "x".into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await
    .expect("publish after restart");
}

#[tokio::test]
async fn cluster_forms_and_survives_one_node_kill() {
    let mut cluster = NatsCluster::start(3);
    assert_eq!(cluster.urls().len(), 3);
    let js = jetstream::new(cluster.client().await);
    let name = unique("HARNESS");
    let subject = format!("{name}.data");

    // Creating an R3 stream needs every peer; right after start the cluster
    // may still be settling, so retry briefly.
    wait_until(Duration::from_secs(20), || {
        let js = js.clone();
        let cfg = stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            num_replicas: 3,
            ..Default::default()
        };
        async move { js.get_or_create_stream(cfg).await.is_ok() }
    })
    .await
    .expect("R3 stream created");
    js.publish(subject.clone(), "before".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Kill a node: the remaining two keep a quorum, so writes still succeed.
    cluster.kill_node(0);
    let js = jetstream::new(
        async_nats::connect(vec![cluster.url(1), cluster.url(2)])
            .await
            .unwrap(),
    );
    wait_until(Duration::from_secs(30), || {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            match js.publish(subject, "during".into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await
    .expect("publish with one node down");

    // The node comes back and catches up with the stream.
    cluster.restart_node(0);
    let js0 = jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let n = wait_for(Duration::from_secs(30), || {
        let js0 = js0.clone();
        let name = name.clone();
        async move {
            let mut s = js0.get_stream(&name).await.ok()?;
            let info = s.info().await.ok()?;
            (info.state.messages >= 2).then_some(info.state.messages)
        }
    })
    .await
    .expect("stream readable through the restarted node");
    assert!(n >= 2);

    // A restarted node may report the stream before its replica (or the
    // consumer's) has caught up, so an early fetch can come back empty: read
    // the first message through a durable consumer, retrying until it arrives.
    let durable = unique("reader");
    let first = wait_for(Duration::from_secs(30), || {
        let js0 = js0.clone();
        let name = name.clone();
        let durable = durable.clone();
        async move {
            let stream = js0.get_stream(&name).await.ok()?;
            let consumer = stream
                .get_or_create_consumer(
                    &durable,
                    async_nats::jetstream::consumer::pull::Config {
                        durable_name: Some(durable.clone()),
                        ..Default::default()
                    },
                )
                .await
                .ok()?;
            let mut msgs = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .ok()?;
            let msg = msgs.next().await?.ok()?;
            Some(msg.payload.to_vec())
        }
    })
    .await
    .expect("first message readable through the restarted node");
    assert_eq!(&first[..], b"before");
}

#[tokio::test]
async fn redis_server_answers_and_is_private() {
    let redis = RedisServer::start();
    assert_ne!(redis.port(), 6379, "never the shared instance");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
#[should_panic(expected = "was not found on PATH")]
fn require_says_how_to_install_a_missing_binary() {
    keywave_tests::require("redis-server-that-does-not-exist");
}

#[test]
fn postgres_server_authenticates_with_scram() {
    let pg = keywave_tests::PostgresServer::start();
    assert_ne!(pg.port(), 5432, "never the shared instance");
    assert_eq!(
        pg.psql("SHOW password_encryption").unwrap(),
        "scram-sha-256"
    );
    let role = unique("kw").replace('-', "_");
    pg.psql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'first-secret'"))
        .unwrap();
    assert_eq!(pg.psql_as(&role, "first-secret", "SELECT 1").unwrap(), "1");
    let err = pg.psql_as(&role, "wrong", "SELECT 1").unwrap_err();
    assert!(err.contains("password authentication failed"), "{err}");
}

#[test]
fn mariadb_server_authenticates_over_tcp() {
    let db = keywave_tests::MariaDbServer::start();
    assert_ne!(db.port(), 3306, "never the shared instance");
    let user = unique("kw");
    db.sql(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 'first-secret'"
    ))
    .unwrap();
    assert_eq!(db.sql_as(&user, "first-secret", "SELECT 1").unwrap(), "1");
    let err = db.sql_as(&user, "wrong", "SELECT 1").unwrap_err();
    assert!(err.contains("Access denied"), "{err}");
}
