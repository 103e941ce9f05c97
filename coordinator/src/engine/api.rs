//! The operator API: NATS request/reply on `keywave.api.v1.<verb>` (verbs in
//! [`keywave_common::api::verbs`]), served by every coordinator in the queue
//! group [`QUEUE_GROUP`]. Requests and replies are JSON; every reply is an
//! [`ApiReply`]. A malformed request gets a `bad_request` reply, an unknown
//! campaign `not_found`; nothing a client sends can stop the server.
//!
//! | verb | request | reply data |
//! |---|---|---|
//! | `campaign.start` | [`StartRequest`] | [`CampaignRef`] |
//! | `campaign.status` | [`CampaignRef`] | [`CampaignStatus`](keywave_common::api::CampaignStatus) |
//! | `campaign.list` | (empty) | list of [`CampaignSummary`](keywave_common::api::CampaignSummary) |
//! | `campaign.pause`, `.resume`, `.abort` | [`CampaignRef`] | `CampaignStatus` after the change |
//! | `campaign.approve` | [`ApproveRequest`] | `CampaignStatus` after the approval |
//! | `campaign.rollback` | [`RollbackRequest`](keywave_common::api::RollbackRequest) | `CampaignStatus` after the request (`rolling_back`) |
//! | `ping` | (empty) | [`Pong`] |

use crate::engine::{ControlAction, CoordinatorError, Engine, RequestError, API_CONCURRENCY};
use bytes::Bytes;
use futures::StreamExt;
use keywave_common::{
    api::{verbs, ApiReply, ApproveRequest, CampaignRef, StartRequest},
    codec, subjects,
};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The queue group every coordinator's API subscription joins.
pub const QUEUE_GROUP: &str = "keywave-coordinator";

pub use keywave_common::api::Pong;

/// Joins the API queue group; the server knows the subscription on return.
pub(crate) async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    let sub = client
        .queue_subscribe(subjects::api(">"), QUEUE_GROUP.to_string())
        .await
        .map_err(|e| CoordinatorError::Subscribe(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| CoordinatorError::Subscribe(e.to_string()))?;
    Ok(sub)
}

/// Serves the API on `sub` until `shutdown` is cancelled.
pub(crate) async fn serve(
    engine: Arc<Engine>,
    sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let ended = sub
        .take_until(shutdown.cancelled())
        .for_each_concurrent(API_CONCURRENCY, |msg| {
            let engine = engine.clone();
            async move {
                let Some(reply_to) = msg.reply.clone() else {
                    debug!(subject = %msg.subject, "API message without reply subject ignored");
                    return;
                };
                let verb = msg
                    .subject
                    .as_str()
                    .strip_prefix("keywave.api.v1.")
                    .unwrap_or("")
                    .to_string();
                let body = handle(&engine, &verb, msg.headers.as_ref(), &msg.payload).await;
                if let Err(e) = engine.client.publish(reply_to, body).await {
                    warn!(verb = %verb, error = %e, "Could not send an API reply");
                }
            }
        });
    ended.await;
    if shutdown.is_cancelled() {
        Ok(())
    } else {
        Err(CoordinatorError::Disconnected)
    }
}

fn reply<T: Serialize>(r: Result<T, RequestError>) -> Bytes {
    let reply = match r {
        Ok(data) => ApiReply::ok(data),
        Err(e) => ApiReply::err(e.class(), e.to_string()),
    };
    serde_json::to_vec(&reply)
        .unwrap_or_else(|e| {
            serde_json::to_vec(&ApiReply::<()>::err("internal", e.to_string())).unwrap_or_default()
        })
        .into()
}

/// Largest accepted request body. Larger than the codec's limit for tasks
/// and results: a start request may carry a long list of credential ids.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

fn parse<T: DeserializeOwned>(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<T, RequestError> {
    let bad = |detail: String| RequestError::BadRequest(format!("malformed request: {detail}"));
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(bad(format!(
            "{} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes",
            payload.len()
        )));
    }
    let format = codec::format_of(headers).map_err(|e| bad(e.to_string()))?;
    codec::from_bytes(format, payload).map_err(|e| bad(e.to_string()))
}

/// Handles one request; always returns a reply body.
pub(crate) async fn handle(
    engine: &Arc<Engine>,
    verb: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Bytes {
    let control = |action| async move {
        let r: CampaignRef = parse(headers, payload)?;
        engine.control(&r.campaign_id, action).await
    };
    match verb {
        verbs::CAMPAIGN_START => reply(
            async {
                let req: StartRequest = parse(headers, payload)?;
                let campaign_id = engine.start_campaign(req).await?;
                Ok(CampaignRef { campaign_id })
            }
            .await,
        ),
        verbs::CAMPAIGN_STATUS => reply(
            async {
                let r: CampaignRef = parse(headers, payload)?;
                engine.status(&r.campaign_id).await
            }
            .await,
        ),
        verbs::CAMPAIGN_LIST => reply(engine.list().await),
        verbs::CAMPAIGN_PAUSE => reply(control(ControlAction::Pause).await),
        verbs::CAMPAIGN_RESUME => reply(control(ControlAction::Resume).await),
        verbs::CAMPAIGN_ABORT => reply(control(ControlAction::Abort).await),
        verbs::CAMPAIGN_APPROVE => reply(
            async {
                let r: ApproveRequest = parse(headers, payload)?;
                engine.approve(r).await
            }
            .await,
        ),
        verbs::CAMPAIGN_ROLLBACK => reply(
            async {
                let r: keywave_common::api::RollbackRequest = parse(headers, payload)?;
                engine.rollback(r).await
            }
            .await,
        ),
        verbs::PING => reply(Ok(Pong {
            coordinator_id: engine.opts.coordinator_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })),
        other => reply::<()>(Err(RequestError::BadRequest(format!(
            "unknown API verb {:?}",
            other.chars().take(64).collect::<String>()
        )))),
    }
}
