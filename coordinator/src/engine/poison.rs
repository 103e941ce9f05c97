//! Poison tasks: a task that reached its consumer's max deliveries stays in
//! the work queue, never delivered again, and its wave would wait for its
//! deadline. The server announces it with a max-deliveries advisory, which
//! `KEYWAVE_ADVISORIES` keeps until a coordinator handles it here: the task is
//! read back by its stream sequence, copied to `KEYWAVE_DEADLETTER` with its
//! reason, counted as failed in its wave through a `Failed` result (so the wave
//! decides at once), recorded as a campaign event, and removed from the queue.
//!
//! Every step is idempotent (message ids derived from the region and stream
//! sequence or the task id), so an advisory handled twice changes nothing.
//! Tasks a worker terminates as undecodable are dead-lettered (and, when they
//! decode, counted) by the worker itself.

use super::{events, Engine};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    message::AckKind,
    stream::LastRawMessageErrorKind,
};
use base64::Engine as _;
use futures::StreamExt;
use keywave_common::{
    codec::{self, Format},
    ids, now_ms, publish, subjects, topology,
    wire::{
        DeadLetter, ErrorClass, EventKind, Outcome, RotationResult, RotationTask, Step,
        SCHEMA_VERSION,
    },
};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// The durable consumer every coordinator shares on `KEYWAVE_ADVISORIES`.
pub const CONSUMER: &str = "coordinator-poison";
/// Bytes of a poison task kept (base64) in its dead letter.
const MAX_PAYLOAD: usize = 4096;
/// The worker id written in the results this handler publishes.
pub const WORKER_ID: &str = "keywave-coordinator";
const RETRY: Duration = Duration::from_secs(2);

/// `io.nats.jetstream.advisory.v1.max_deliver`, the fields used here.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
}

/// Handles advisories until the term ends.
pub(super) async fn run(engine: Arc<Engine>) {
    loop {
        let created = tokio::select! {
            c = engine.advisories.get_or_create_consumer(CONSUMER, pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some("keywave coordinators: poison tasks".into()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            }) => c,
            _ = engine.stop.cancelled() => return,
        };
        let messages = match created {
            Ok(c) => c
                .messages()
                .await
                .map_err(|source| topology::StreamReadError::Messages {
                    stream: topology::STREAM_ADVISORIES,
                    source,
                }),
            Err(source) => Err(topology::StreamReadError::Consumer {
                stream: topology::STREAM_ADVISORIES,
                source,
            }),
        };
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "Cannot read max-deliveries advisories; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = engine.stop.cancelled() => return,
                }
            }
        };
        loop {
            let next = tokio::select! {
                m = messages.next() => m,
                _ = engine.stop.cancelled() => return,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    debug!(error = %e, "Advisory consumer error");
                    continue;
                }
                None => break,
            };
            if engine.halted.is_cancelled() {
                return;
            }
            let r = match handle(&engine, &msg).await {
                Ok(()) => msg.ack().await,
                Err(e) => {
                    warn!(error = %e, "Could not handle a poison task; retrying");
                    msg.ack_with(AckKind::Nak(Some(RETRY))).await
                }
            };
            if let Err(e) = r {
                debug!(error = %e, "Could not acknowledge an advisory");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY) => {}
            _ = engine.stop.cancelled() => return,
        }
    }
}

/// Why an advisory could not be handled yet (it is delivered again).
#[derive(Debug, thiserror::Error)]
enum PoisonError {
    #[error("opening stream {stream}: {source}")]
    OpenTasks {
        stream: String,
        #[source]
        source: jetstream::context::GetStreamError,
    },
    #[error("reading task {seq}: {source}")]
    ReadTask {
        seq: u64,
        #[source]
        source: jetstream::stream::RawMessageError,
    },
    #[error("dead-lettering task {seq}: {source}")]
    DeadLetter {
        seq: u64,
        #[source]
        source: publish::PublishError,
    },
    #[error("recording the dead letter in campaign {campaign}: {source}")]
    Event {
        campaign: String,
        #[source]
        source: publish::PublishError,
    },
    #[error("counting task {task} as failed: {source}")]
    Result {
        task: String,
        #[source]
        source: publish::PublishError,
    },
}

async fn handle(engine: &Engine, msg: &jetstream::Message) -> Result<(), PoisonError> {
    let adv: MaxDeliveries = match serde_json::from_slice(&msg.payload) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "Ignoring an unreadable advisory");
            return Ok(());
        }
    };
    let Some(region) = adv.consumer.strip_prefix("workers-") else {
        return Ok(());
    };
    if topology::tasks_stream_region(&adv.stream) != Some(region) {
        return Ok(());
    }
    let seq = adv.stream_seq;
    let tasks = engine
        .tasks
        .get(region)
        .await
        .map_err(|source| PoisonError::OpenTasks {
            stream: adv.stream.clone(),
            source,
        })?;
    let raw = match tasks.get_raw_message(seq).await {
        Ok(m) => m,
        // Acked after all, or handled before: nothing left to do.
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(()),
        Err(source) => return Err(PoisonError::ReadTask { seq, source }),
    };
    let task: Option<RotationTask> = codec::decode(Some(&raw.headers), &raw.payload).ok();
    let reason = format!(
        "max_deliveries: delivered {} times without being acknowledged",
        adv.deliveries
    );
    let task_id = task.as_ref().map(|t| t.task_id.clone());
    let campaign = task
        .as_ref()
        .map(|t| t.campaign_id.clone())
        .or_else(|| subjects::parse_task(raw.subject.as_str()).map(|(_, c)| c.to_string()))
        .filter(|c| ids::validate("campaign id", c).is_ok());
    warn!(region, seq, task = ?task_id, reason = %reason, "Dead-lettering a poison task");
    let kept = &raw.payload[..raw.payload.len().min(MAX_PAYLOAD)];
    let dl = DeadLetter {
        v: SCHEMA_VERSION,
        region: region.to_string(),
        subject: raw.subject.to_string(),
        reason: reason.clone(),
        task_id: task_id.clone(),
        campaign_id: campaign.clone(),
        payload_len: raw.payload.len(),
        payload_b64: base64::engine::general_purpose::STANDARD.encode(kept),
        at_ms: now_ms(),
    };
    // The worker's dead letters use the same id: one record per message.
    let id = format!("deadletter:{region}:{seq}");
    publish::send_and_confirm(
        &engine.js,
        subjects::dead_letter(region),
        Format::Json,
        &id,
        &dl,
    )
    .await
    .map_err(|source| PoisonError::DeadLetter { seq, source })?;
    if let Some(cid) = &campaign {
        events::publish(
            &engine.js,
            cid,
            EventKind::DeadLetter {
                region: region.to_string(),
                task_id: task_id.clone(),
                reason: reason.clone(),
            },
        )
        .await
        .map_err(|source| PoisonError::Event {
            campaign: cid.clone(),
            source,
        })?;
    }
    if let (Some(t), Some(cid)) = (&task, &campaign) {
        let result = RotationResult {
            v: SCHEMA_VERSION,
            task_id: t.task_id.clone(),
            campaign_id: cid.clone(),
            wave: t.wave,
            index: t.index,
            action: t.action,
            credential_id: t.credential_id.clone(),
            region: region.to_string(),
            outcome: Outcome::Failed,
            step: Step::Received,
            error_class: Some(ErrorClass::NoResult),
            error: Some(format!("{reason}; dead-lettered")),
            timings: Vec::new(),
            new_fingerprint: None,
            old_fingerprint: None,
            old_rejected: None,
            worker_id: WORKER_ID.into(),
            finished_at_ms: now_ms(),
            consumers: Vec::new(),
        };
        // The id a worker's result for this task has: whichever is first counts.
        publish::send_and_confirm(
            &engine.js,
            subjects::result(region, cid),
            Format::MsgPack,
            &format!("{}:result", t.task_id),
            &result,
        )
        .await
        .map_err(|source| PoisonError::Result {
            task: t.task_id.clone(),
            source,
        })?;
    }
    match tasks.delete_message(seq).await {
        Ok(_) => {}
        Err(e) => debug!(seq, error = %e, "Poison task already gone from the queue"),
    }
    info!(region, seq, task = ?task_id, "Poison task dead-lettered and counted as failed");
    Ok(())
}
