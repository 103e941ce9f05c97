//! Helpers for the crate's tests: a private `nats-server` per test (started
//! by the `keywave-harness` crate on a random port, killed with its store
//! when the guard drops), unique regions, and a secret-store bucket on it.

use crate::store::SecretStore;
use async_nats::jetstream::{self, kv};
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use keywave_harness::NatsServer;
use std::future::Future;
use std::time::Duration;

/// Starts a private JetStream server and connects to it. Keep the server
/// alive as long as the client is used: dropping it kills the process.
pub async fn nats() -> (NatsServer, async_nats::Client) {
    let server = NatsServer::start();
    let client = server.client().await;
    (server, client)
}

/// A region name no other test uses.
pub fn unique_region() -> String {
    keywave_common::ids::random_id("t")
}

/// A secret-store bucket of a unique region on a private server.
pub struct TestBucket {
    /// The server the bucket lives on (killed, store and all, on drop).
    pub server: NatsServer,
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub store: SecretStore,
    pub region: String,
}

impl TestBucket {
    pub async fn new() -> Self {
        let (server, client) = nats().await;
        let js = topology::context(client.clone());
        let region = unique_region();
        // `create_key_value` does not work against nats-server 2.9.
        let bucket = topology::kv_secrets(&region);
        js.create_stream(topology::kv_stream_config(&kv::Config {
            bucket: bucket.clone(),
            history: 5,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        }))
        .await
        .unwrap();
        let kv = js.get_key_value(&bucket).await.unwrap();
        let store = SecretStore::from_kv(kv.clone(), &region, RegionKey::generate());
        TestBucket {
            server,
            js,
            kv,
            store,
            region,
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
