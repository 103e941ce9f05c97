//! Reads the latest value of every key of a KV bucket matching a filter, in
//! one pass: an ordered pull consumer with `DeliverPolicy::LastPerSubject`
//! streams the values (no request per key), and the consumer's initial
//! `num_pending` tells when everything was seen, so an empty bucket or filter
//! returns at once instead of waiting for a message that never comes.

use async_nats::jetstream::{
    consumer::{pull, DeliverPolicy, ReplayPolicy},
    kv,
};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("scanning KV bucket {bucket}: {detail}")]
pub struct ScanError {
    pub bucket: String,
    pub detail: String,
}

/// The header JetStream KV uses to mark deletes and purges.
const KV_OPERATION: &str = "KV-Operation";

/// Longest wait for the next value of a scan once values stopped coming.
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// One live key: its name, value and revision (stream sequence).
pub struct Latest {
    pub key: String,
    pub value: Bytes,
    pub revision: u64,
}

/// Calls `f` for the latest value of every key matching `key_filter`
/// (`>` for all keys, `campaign.*`, ...), once per key; deleted and purged
/// keys are skipped. Returns how many live keys were visited.
///
/// A key written again while the scan runs is delivered a second time (the
/// consumer goes on past the values it counted); that second delivery is
/// skipped, so callers never see a key twice. Keys are remembered as 128-bit
/// keyed hashes: a few dozen bytes per key.
pub async fn for_each_latest(
    kv: &kv::Store,
    key_filter: &str,
    f: impl FnMut(Latest),
) -> Result<u64, ScanError> {
    let consumer = scan_consumer(kv, key_filter).await?;
    scan(kv, consumer, f).await
}

/// [`for_each_latest`] for the few keys a coordinator must read when it
/// becomes active (campaign snapshots, control records), right after the
/// failure that made it active, which may have taken a server of the
/// cluster with it. JetStream may then refuse new consumers on the bucket
/// for a while (nats-server 2.9 can assign one to the lost server until it
/// declares it gone, a minute or more): the keys are then listed from the
/// stream's subjects and read one by one from the stream leader. Only for
/// small key sets: every matching key is listed in memory first.
pub async fn for_each_latest_small(
    kv: &kv::Store,
    key_filter: &str,
    mut f: impl FnMut(Latest),
) -> Result<u64, ScanError> {
    match scan_consumer(kv, key_filter).await {
        Ok(consumer) => scan(kv, consumer, f).await,
        Err(e) => {
            tracing::warn!(bucket = %kv.name, error = %e, "KV scan has no consumer; reading key by key");
            by_key(kv, key_filter, &mut f)
                .await
                .map_err(|detail| ScanError {
                    bucket: kv.name.clone(),
                    detail: format!("{}; reading key by key: {detail}", e.detail),
                })
        }
    }
}

/// Every key matching `key_filter` from the stream's subject list, then
/// each key's latest entry.
async fn by_key(
    kv: &kv::Store,
    key_filter: &str,
    f: &mut impl FnMut(Latest),
) -> Result<u64, String> {
    let mut subjects = kv
        .stream
        .info_with_subjects(format!("{}{}", kv.prefix, key_filter))
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| e.to_string())?;
        if let Some(key) = subject.strip_prefix(kv.prefix.as_str()) {
            keys.push(key.to_string());
        }
    }
    let mut live = 0;
    for key in keys {
        match kv.entry(key.as_str()).await.map_err(|e| e.to_string())? {
            Some(e) if e.operation == kv::Operation::Put => {
                live += 1;
                f(Latest {
                    key,
                    value: e.value,
                    revision: e.revision,
                });
            }
            _ => {}
        }
    }
    Ok(live)
}

/// The ordered consumer of a scan: the latest value of each matching key.
async fn scan_consumer(
    kv: &kv::Store,
    key_filter: &str,
) -> Result<async_nats::jetstream::consumer::Consumer<pull::OrderedConfig>, ScanError> {
    kv.stream
        .create_consumer(pull::OrderedConfig {
            description: Some("keywave kv scan".into()),
            filter_subject: format!("{}{}", kv.prefix, key_filter),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| ScanError {
            bucket: kv.name.clone(),
            detail: e.to_string(),
        })
}

/// Reads `consumer` to the end; see [`for_each_latest`].
async fn scan(
    kv: &kv::Store,
    consumer: async_nats::jetstream::consumer::Consumer<pull::OrderedConfig>,
    mut f: impl FnMut(Latest),
) -> Result<u64, ScanError> {
    let err = |detail: String| ScanError {
        bucket: kv.name.clone(),
        detail,
    };
    if consumer.cached_info().num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
    let mut live = 0;
    let hashers = [RandomState::new(), RandomState::new()];
    let mut seen: HashSet<u128> = HashSet::new();
    loop {
        // A key rewritten or deleted after the consumer counted it may never
        // arrive (nats-server 2.9 can leave `pending` above zero when a
        // counted message is replaced under a last-per-subject consumer).
        // Values come back-to-back from a healthy server, so a quiet
        // connection means the scan has seen everything there is.
        let Ok(next) = tokio::time::timeout(IDLE_TIMEOUT, messages.next()).await else {
            tracing::debug!(bucket = %kv.name, live, "KV scan ended on an idle consumer");
            break;
        };
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| err(e.to_string()))?;
        let (pending, revision) = {
            let info = msg.info().map_err(|e| err(e.to_string()))?;
            (info.pending, info.stream_sequence)
        };
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(KV_OPERATION))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if !deleted {
            let key = msg.subject.as_str().strip_prefix(kv.prefix.as_str());
            let first = key.is_some_and(|k| {
                let h =
                    (u128::from(hashers[0].hash_one(k)) << 64) | u128::from(hashers[1].hash_one(k));
                seen.insert(h)
            });
            if let Some(key) = key.filter(|_| first) {
                live += 1;
                f(Latest {
                    key: key.to_string(),
                    value: msg.payload.clone(),
                    revision,
                });
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// What a scan saw: key to (value, revision).
    type Seen = BTreeMap<String, (Bytes, u64)>;

    fn collect(seen: &mut Seen) -> impl FnMut(Latest) + '_ {
        |l| {
            assert!(
                seen.insert(l.key, (l.value, l.revision)).is_none(),
                "a key seen twice"
            );
        }
    }

    // The key-by-key read a new term falls back to sees what the consumer
    // scan sees: the latest value and revision of every live key matching
    // the filter, deleted and purged keys left out.
    #[tokio::test]
    async fn reading_key_by_key_sees_what_the_scan_sees() {
        let server = keywave_harness::NatsServer::start();
        let js = keywave_common::topology::context(server.client().await);
        let kv = keywave_common::topology::campaigns(&js, &Default::default())
            .await
            .unwrap();
        for i in 0..5 {
            kv.put(format!("campaign.c{i}"), format!("v{i}").into())
                .await
                .unwrap();
        }
        kv.put("campaign.c1", "v1-again".into()).await.unwrap();
        kv.delete("campaign.c2").await.unwrap();
        kv.purge("campaign.c3").await.unwrap();
        kv.put("control.c0", "pause".into()).await.unwrap();

        let (mut scanned, mut by_keys) = (Seen::new(), Seen::new());
        let n = for_each_latest(&kv, "campaign.*", collect(&mut scanned))
            .await
            .unwrap();
        let m = by_key(&kv, "campaign.*", &mut collect(&mut by_keys))
            .await
            .unwrap();
        assert_eq!((n, m), (3, 3));
        assert_eq!(scanned, by_keys);
        assert_eq!(by_keys["campaign.c1"].0, Bytes::from("v1-again"));
        assert!(!by_keys.contains_key("campaign.c2"));
        assert!(!by_keys.contains_key("control.c0"));
    }
}
