//! Helpers for the crate's tests against the local NATS server: unique
//! regions and buckets, cleaned up afterwards.

use crate::store::SecretStore;
use async_nats::jetstream::{self, kv};
use keywave_common::crypto::RegionKey;
use keywave_common::topology;
use std::future::Future;
use std::time::Duration;

pub const NATS_URL: &str = "nats://127.0.0.1:4222";

pub async fn connect() -> async_nats::Client {
    async_nats::connect(NATS_URL)
        .await
        .expect("these tests need nats-server with JetStream on 127.0.0.1:4222")
}

/// A region name no other test uses.
pub fn unique_region() -> String {
    keywave_common::ids::random_id("t")
}

/// A secret-store bucket of a unique region, deleted by [`TestBucket::cleanup`].
pub struct TestBucket {
    pub js: jetstream::Context,
    pub kv: kv::Store,
    pub store: SecretStore,
    pub region: String,
}

impl TestBucket {
    pub async fn new() -> Self {
        let js = topology::context(connect().await);
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
            js,
            kv,
            store,
            region,
        }
    }

    pub async fn cleanup(self) {
        let _ = self
            .js
            .delete_key_value(topology::kv_secrets(&self.region))
            .await;
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
