//! Publishing to JetStream with de-duplication and bounded ack windows.
//! Every message gets `Nats-Msg-Id`, `Content-Type` and the schema version;
//! acks are awaited in windows of at most [`AckWindow::capacity`], so a
//! producer never holds an unbounded number of un-confirmed messages and never
//! pays a round trip per message.

use crate::codec::{self, CodecError, Format};
use async_nats::header::HeaderName;
use async_nats::jetstream::{context::PublishAckFuture, Context};
use async_nats::Subject;
use futures::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use std::future::IntoFuture;
use thiserror::Error;

const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(codec::TRACEPARENT);

#[derive(Debug, Error)]
pub enum PublishError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("publish to {subject} failed: {detail}")]
    Send { subject: String, detail: String },
    #[error("publish not acknowledged by JetStream: {0}")]
    Ack(String),
}

/// Encodes and publishes one message; returns the ack future unawaited.
pub async fn send<T: Serialize>(
    js: &Context,
    subject: String,
    format: Format,
    msg_id: &str,
    msg: &T,
    traceparent: Option<&str>,
) -> Result<PublishAckFuture, PublishError> {
    let payload = codec::encode(format, msg)?;
    let mut headers = codec::headers(format, msg_id);
    // The current span's trace context when traced; else the one handed in
    // (a worker without tracing passes the task's on to its result).
    crate::telemetry::inject(&mut headers);
    if let Some(tp) = traceparent.filter(|_| headers.get(TRACEPARENT_NAME).is_none()) {
        headers.insert(TRACEPARENT_NAME, tp);
    }
    // A `Subject` shares its bytes: keeping it for the error costs no copy.
    let subject = Subject::from(subject);
    js.publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|e| PublishError::Send {
            subject: subject.to_string(),
            detail: e.to_string(),
        })
}

/// Publishes one message and waits for its ack.
pub async fn send_and_confirm<T: Serialize>(
    js: &Context,
    subject: String,
    format: Format,
    msg_id: &str,
    msg: &T,
) -> Result<(), PublishError> {
    send(js, subject, format, msg_id, msg, None)
        .await?
        .await
        .map_err(|e| PublishError::Ack(e.to_string()))?;
    Ok(())
}

/// A bounded window of un-awaited publish acks, awaited in order.
pub struct AckWindow {
    pending: FuturesOrdered<<PublishAckFuture as IntoFuture>::IntoFuture>,
    capacity: usize,
    confirmed: u64,
    duplicates: u64,
}

impl AckWindow {
    pub fn new(capacity: usize) -> Self {
        AckWindow {
            pending: FuturesOrdered::new(),
            capacity: capacity.max(1),
            confirmed: 0,
            duplicates: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds an ack to wait for; when the window is full, waits for the oldest first.
    pub async fn push(&mut self, ack: PublishAckFuture) -> Result<(), PublishError> {
        while self.pending.len() >= self.capacity {
            self.next().await?;
        }
        self.pending.push_back(ack.into_future());
        Ok(())
    }

    async fn next(&mut self) -> Result<(), PublishError> {
        if let Some(r) = self.pending.next().await {
            let ack = r.map_err(|e| PublishError::Ack(e.to_string()))?;
            self.confirmed += 1;
            if ack.duplicate {
                self.duplicates += 1;
            }
        }
        Ok(())
    }

    /// Waits for every pending ack.
    pub async fn drain(&mut self) -> Result<(), PublishError> {
        while !self.pending.is_empty() {
            self.next().await?;
        }
        Ok(())
    }

    /// Acks received so far, and how many of them were de-duplicated by the server.
    pub fn counts(&self) -> (u64, u64) {
        (self.confirmed, self.duplicates)
    }
}
