//! The detection-fingerprint index: a durable consumer on `KEYWAVE_ROTATED`
//! turns each [`RotatedNotice`] into `fp.<hex>` entries of the
//! `keywave-detections` bucket: the new secret's fingerprint as `current`,
//! the replaced one's as retired. A notice is acked once both are written.

use super::store::{self, FpEntry};
use async_nats::jetstream::{
    consumer::{pull, AckPolicy, DeliverPolicy},
    kv, AckKind, Context,
};
use futures::StreamExt;
use keywave_common::{
    codec,
    detect::{Fingerprint, RotatedNotice, STREAM_ROTATED},
    ids,
};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Durable consumer name of the indexer.
pub const CONSUMER: &str = "detect-index";

/// Why a notice was not indexed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The notice is wrong; retrying cannot help.
    #[error("invalid rotation notice: {0}")]
    Invalid(String),
    /// The bucket failed; retrying may help.
    #[error("writing the fingerprint index: {0}")]
    Store(String),
}

/// Writes the entries of one notice.
pub async fn apply(kv: &kv::Store, n: &RotatedNotice) -> Result<(), IndexError> {
    ids::validate("credential id", &n.credential_id)
        .map_err(|e| IndexError::Invalid(e.to_string()))?;
    let put = |fp: &str, current: bool| {
        let entry = FpEntry {
            credential_id: n.credential_id.clone(),
            region: n.region.clone(),
            current,
            at_ms: n.at_ms,
        };
        let key = store::fp_key(fp);
        let valid = matches!(Fingerprint::parse(fp), Ok(Fingerprint::Keyed(_)));
        let fp = fp.to_string();
        async move {
            if !valid {
                return Err(IndexError::Invalid(format!(
                    "{fp:?} is not a dfp1: fingerprint"
                )));
            }
            kv.put(
                key,
                serde_json::to_vec(&entry)
                    .expect("entries serialize")
                    .into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| IndexError::Store(e.to_string()))
        }
    };
    if let Some(prev) = &n.previous_detect_fp {
        put(prev, false).await?;
    }
    put(&n.detect_fp, true).await
}

/// Indexes notices until `shutdown`.
pub async fn run(js: Context, kv: kv::Store, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match consume(&js, &kv, shutdown.clone()).await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "Fingerprint indexer failed; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Why the indexer's consumer stopped (it is started again).
#[derive(Debug, thiserror::Error)]
enum ConsumeError {
    #[error("opening stream {STREAM_ROTATED}: {0}")]
    Stream(#[source] async_nats::jetstream::context::GetStreamError),
    #[error("creating consumer {CONSUMER}: {0}")]
    Consumer(#[source] async_nats::jetstream::stream::ConsumerError),
    #[error("reading {STREAM_ROTATED}: {0}")]
    Messages(#[source] async_nats::jetstream::consumer::StreamError),
    #[error("message stream ended")]
    Ended,
}

async fn consume(
    js: &Context,
    kv: &kv::Store,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError> {
    let consumer = js
        .get_stream(STREAM_ROTATED)
        .await
        .map_err(ConsumeError::Stream)?
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some("keywave coordinators: detection fingerprint index".into()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(ConsumeError::Consumer)?;
    let mut messages = consumer.messages().await.map_err(ConsumeError::Messages)?;
    info!("Fingerprint indexer running");
    loop {
        let next = tokio::select! {
            n = messages.next() => n,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let msg = match next {
            None => return Err(ConsumeError::Ended),
            Some(Err(e)) => {
                warn!(error = %e, "Rotation notice consumer error");
                continue;
            }
            Some(Ok(m)) => m,
        };
        // Ack decision: applied → ack; undecodable or invalid → term (never
        // redelivered, nothing to index); KV failure → nak, retried in 1 s.
        let kind = match codec::decode::<RotatedNotice>(msg.headers.as_ref(), &msg.payload) {
            Err(e) => {
                warn!(subject = %msg.subject, reason = e.reason(), "Ignoring a malformed rotation notice");
                AckKind::Term
            }
            Ok(n) => match apply(kv, &n).await {
                Ok(()) => AckKind::Ack,
                Err(e @ IndexError::Invalid(_)) => {
                    warn!(subject = %msg.subject, error = %e, "Ignoring an invalid rotation notice");
                    AckKind::Term
                }
                Err(e) => {
                    warn!(error = %e, "Could not index a rotation notice; retrying");
                    AckKind::Nak(Some(Duration::from_secs(1)))
                }
            },
        };
        if let Err(e) = msg.ack_with(kind).await {
            warn!(error = %e, "Could not settle a rotation notice");
        }
    }
}
