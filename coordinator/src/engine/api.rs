//! The operator API: NATS request/reply on `keywave.api.v1.<verb>` (verbs in
//! [`keywave_common::api::verbs`]), served by every running coordinator in
//! the queue group [`QUEUE_GROUP`], standbys included. Requests and replies
//! are JSON; every reply is an [`ApiReply`]. A malformed request gets a
//! `bad_request` reply, an unknown campaign `not_found`; nothing a client
//! sends can stop the server.
//!
//! Who answers what:
//! - **Read verbs** (`campaign.status`, `campaign.list`, `ping`): whichever
//!   coordinator the queue group picks. The active one answers from the
//!   campaigns it drives (live); a standby from the snapshots in the
//!   `keywave-campaigns` bucket, which the active coordinator saves at every
//!   state change and every progress interval (1 s by default) while
//!   results flow: a standby's counters are at most that old.
//! - **Control verbs** (start, pause, resume, abort, approve, rollback): the
//!   active coordinator handles them. A standby that receives one forwards
//!   it, headers and body unchanged, to [`subjects::api_active`], which only
//!   the lease holder subscribes to, and relays the reply. When no
//!   coordinator holds the lease, or its holder does not answer (no
//!   responders, or its lease ends while the standby waits: it died), the
//!   standby answers with error class `takeover`
//!   ([`keywave_common::api::CLASS_TAKEOVER`]): nothing was done, and the
//!   client may send the request again. A process that holds the lease but
//!   is still resuming its campaigns keeps the request until it serves.
//!
//! | verb | request | reply data |
//! |---|---|---|
//! | `campaign.start` | [`StartRequest`] | [`CampaignRef`] |
//! | `campaign.status` | [`CampaignRef`] | [`CampaignStatus`](keywave_common::api::CampaignStatus) |
//! | `campaign.list` | (empty) | list of [`CampaignSummary`](keywave_common::api::CampaignSummary) |
//! | `campaign.pause`, `.resume`, `.abort` | [`CampaignRef`] | `CampaignStatus` after the change |
//! | `campaign.approve` | [`ApproveRequest`] | `CampaignStatus` after the approval |
//! | `campaign.rollback` | [`RollbackRequest`](keywave_common::api::RollbackRequest) | `CampaignStatus` after the request (`rolling_back`) |
//! | `ping` | (empty) | [`Pong`] (with the coordinator's role) |

use crate::engine::{
    read_list, read_status, ControlAction, CoordinatorError, Engine, RequestError, API_CONCURRENCY,
};
use crate::lease::{self, Seen};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use keywave_common::{
    api::{verbs, ApiReply, ApproveRequest, CampaignRef, StartRequest, ROLE_ACTIVE, ROLE_STANDBY},
    client, codec, ids, now_ms, subjects,
};
use serde::{de::DeserializeOwned, Serialize};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The queue group every coordinator's API subscriptions join.
pub const QUEUE_GROUP: &str = "keywave-coordinator";

pub use keywave_common::api::Pong;

/// What a coordinator process answers the API with, whether it is active or
/// not: the JetStream state for the read verbs, and the current term's
/// engine while it is the active coordinator.
pub(crate) struct Server {
    client: async_nats::Client,
    campaigns: kv::Store,
    leases: kv::Store,
    coordinator_id: String,
    /// This process's instance nonce in the lease.
    instance: String,
    /// The engine of the term in progress, once it serves (campaigns
    /// resumed); None while standing by.
    active: RwLock<Option<Arc<Engine>>>,
    /// Stops serving (the process stops).
    stop: CancellationToken,
    /// Cancelled once serving ended and the requests in hand were answered.
    done: CancellationToken,
}

impl Server {
    pub fn new(
        client: async_nats::Client,
        campaigns: kv::Store,
        leases: kv::Store,
        coordinator_id: String,
        instance: String,
    ) -> Arc<Server> {
        Arc::new(Server {
            client,
            campaigns,
            leases,
            coordinator_id,
            instance,
            active: RwLock::new(None),
            stop: CancellationToken::new(),
            done: CancellationToken::new(),
        })
    }

    /// Hands requests to `engine` (a term starts serving) or, with None,
    /// answers them as a standby again.
    pub fn set_active(&self, engine: Option<Arc<Engine>>) {
        *self.active.write().expect("api lock") = engine;
    }

    fn active(&self) -> Option<Arc<Engine>> {
        self.active.read().expect("api lock").clone()
    }

    /// Cancelled once serving ended (stopped, or the connection closed).
    pub fn ended(&self) -> CancellationToken {
        self.done.clone()
    }

    /// Stops serving and waits (at most `grace`) for the requests in hand.
    pub async fn shut(&self, grace: Duration) {
        self.stop.cancel();
        let _ = tokio::time::timeout(grace, self.done.cancelled()).await;
    }
}

async fn queue_subscribe(
    client: &async_nats::Client,
    subject: String,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    let sub = client
        .queue_subscribe(subject, QUEUE_GROUP.to_string())
        .await
        .map_err(|e| CoordinatorError::Subscribe(e.to_string()))?;
    client
        .flush()
        .await
        .map_err(|e| CoordinatorError::Subscribe(e.to_string()))?;
    Ok(sub)
}

/// Joins the API queue group (every coordinator, for the life of the
/// process); the server knows the subscription on return.
pub(crate) async fn subscribe(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    queue_subscribe(client, subjects::api(">")).await
}

/// Subscribes to the active coordinator's subject (the lease holder, for
/// one term).
pub(crate) async fn subscribe_active(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, CoordinatorError> {
    queue_subscribe(client, subjects::api_active(">")).await
}

/// The verb of a request on `subject` under `prefix` (its subject without it).
fn verb_of(subject: &str, prefix: &str) -> String {
    subject
        .strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('.'))
        .unwrap_or("")
        .to_string()
}

/// Serves `keywave.api.v1.>` on `sub` (see the module documentation) until
/// [`Server::shut`]; an error when the subscription ends by itself (the
/// connection closed).
pub(crate) async fn serve(
    server: Arc<Server>,
    sub: async_nats::Subscriber,
) -> Result<(), CoordinatorError> {
    let prefix = subjects::api("");
    let prefix = prefix.trim_end_matches('.').to_string();
    sub.take_until(server.stop.clone().cancelled_owned())
        .for_each_concurrent(API_CONCURRENCY, |msg| {
            let server = server.clone();
            let prefix = prefix.clone();
            async move {
                let Some(reply_to) = msg.reply.clone() else {
                    debug!(subject = %msg.subject, "API message without reply subject ignored");
                    return;
                };
                let verb = verb_of(msg.subject.as_str(), &prefix);
                let body = match server.active() {
                    Some(engine) => {
                        handle(&engine, &verb, msg.headers.as_ref(), &msg.payload).await
                    }
                    None if verbs::is_control(&verb) => {
                        server
                            .forward(&verb, msg.headers.as_ref(), msg.payload.clone())
                            .await
                    }
                    None => {
                        server
                            .standby(&verb, msg.headers.as_ref(), &msg.payload)
                            .await
                    }
                };
                if let Err(e) = server.client.publish(reply_to, body).await {
                    warn!(verb = %verb, error = %e, "Could not send an API reply");
                }
            }
        })
        .await;
    server.done.cancel();
    if server.stop.is_cancelled() {
        Ok(())
    } else {
        Err(CoordinatorError::Disconnected)
    }
}

/// Serves the active coordinator's subject on `sub` with `engine` until
/// `shutdown` is cancelled.
pub(crate) async fn serve_active(
    engine: Arc<Engine>,
    sub: async_nats::Subscriber,
    shutdown: CancellationToken,
) -> Result<(), CoordinatorError> {
    let prefix = subjects::api_active("");
    let prefix = prefix.trim_end_matches('.').to_string();
    sub.take_until(shutdown.cancelled())
        .for_each_concurrent(API_CONCURRENCY, |msg| {
            let engine = engine.clone();
            let prefix = prefix.clone();
            async move {
                let Some(reply_to) = msg.reply.clone() else {
                    debug!(subject = %msg.subject, "API message without reply subject ignored");
                    return;
                };
                let verb = verb_of(msg.subject.as_str(), &prefix);
                let body = handle(&engine, &verb, msg.headers.as_ref(), &msg.payload).await;
                if let Err(e) = engine.client.publish(reply_to, body).await {
                    warn!(verb = %verb, error = %e, "Could not send an API reply");
                }
            }
        })
        .await;
    if shutdown.is_cancelled() {
        Ok(())
    } else {
        Err(CoordinatorError::Disconnected)
    }
}

impl Server {
    /// A read verb (or an unknown one) answered by a standby, from the
    /// campaign snapshots.
    async fn standby(
        &self,
        verb: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Bytes {
        match verb {
            verbs::CAMPAIGN_STATUS => reply(
                async {
                    let r: CampaignRef = parse(headers, payload)?;
                    ids::validate("campaign_id", &r.campaign_id)
                        .map_err(|e| RequestError::BadRequest(e.to_string()))?;
                    read_status(&self.campaigns, &r.campaign_id)
                        .await?
                        .ok_or_else(|| {
                            RequestError::NotFound(format!("no campaign {}", r.campaign_id))
                        })
                }
                .await,
            ),
            verbs::CAMPAIGN_LIST => reply(read_list(&self.campaigns, |_| None).await),
            verbs::PING => reply(Ok(Pong {
                coordinator_id: self.coordinator_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                role: Some(ROLE_STANDBY.to_string()),
            })),
            other => unknown_verb(other),
        }
    }

    /// A control verb received while this process does not serve them: by
    /// the lease, handled here once this process's own term serves (it holds
    /// the lease and is resuming its campaigns), handed to the active
    /// coordinator whose reply is relayed as it is, or answered `takeover`
    /// when nobody holds the lease or its holder does not answer.
    async fn forward(
        &self,
        verb: &str,
        headers: Option<&async_nats::HeaderMap>,
        payload: Bytes,
    ) -> Bytes {
        let holder = match lease::look(&self.leases).await {
            Ok(Seen::Held { record, .. }) => record,
            Ok(Seen::Free { .. }) => {
                return takeover("no coordinator holds the lease: a standby is taking over".into())
            }
            Err(e) => return takeover(format!("the lease cannot be read now ({e})")),
        };
        if holder.instance == self.instance {
            // Our own term is starting: it serves once its campaigns are
            // resumed.
            let until = tokio::time::Instant::now() + OWN_TERM_WAIT;
            while tokio::time::Instant::now() < until {
                if let Some(engine) = self.active() {
                    return handle(&engine, verb, headers, &payload).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return takeover(format!(
                "coordinator {} holds the lease and is still resuming its campaigns",
                holder.holder
            ));
        }
        let timeout = if verb == verbs::CAMPAIGN_START {
            client::START_TIMEOUT
        } else {
            client::DEFAULT_TIMEOUT
        };
        let mut request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        if let Some(h) = headers {
            request = request.headers(h.clone());
        }
        let sent = self
            .client
            .send_request(subjects::api_active(verb), request);
        // Whoever else listens on the subject (a tap on `>`) hides a dead
        // holder from "no responders": the lease changing hands tells it.
        let handed_over = async {
            loop {
                tokio::time::sleep(LEASE_WATCH).await;
                match lease::look(&self.leases).await {
                    Ok(Seen::Held { record, .. }) if record.instance == holder.instance => {}
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
        };
        let answer = tokio::select! {
            r = sent => r,
            _ = handed_over => {
                return takeover(format!(
                    "coordinator {} did not answer and its lease ended: a standby is taking over",
                    holder.holder
                ))
            }
        };
        match answer {
            Ok(m) => m.payload,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                let why = self.takeover_reason().await;
                debug!(verb, reason = %why, "Control request while no coordinator is active");
                takeover(why)
            }
            Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                reply::<()>(Err(RequestError::Internal(format!(
                    "the active coordinator did not answer within {timeout:?}; the request may or may not have been carried out (check the campaign's status)"
                ))))
            }
            Err(e) => reply::<()>(Err(RequestError::Internal(format!(
                "forwarding to the active coordinator: {e}"
            )))),
        }
    }

    /// Why no coordinator answers control requests, as the lease tells.
    async fn takeover_reason(&self) -> String {
        match lease::look(&self.leases).await {
            Ok(Seen::Held { record, .. }) => format!(
                "coordinator {} holds the lease but does not answer (it died or is still resuming its campaigns); a standby takes over when the lease expires in {} ms",
                record.holder,
                record.expires_at_ms.saturating_sub(now_ms())
            ),
            Ok(Seen::Free { .. }) => {
                "no coordinator holds the lease: a standby is taking over".to_string()
            }
            Err(e) => format!("a standby is taking over ({e})"),
        }
    }
}

fn takeover(why: String) -> Bytes {
    reply::<()>(Err(RequestError::Takeover(why)))
}

/// How long a control request waits for this process's own starting term.
const OWN_TERM_WAIT: Duration = Duration::from_secs(10);
/// How often a forwarded request's wait looks at the lease.
const LEASE_WATCH: Duration = Duration::from_millis(250);

fn unknown_verb(verb: &str) -> Bytes {
    reply::<()>(Err(RequestError::BadRequest(format!(
        "unknown API verb {:?}",
        verb.chars().take(64).collect::<String>()
    ))))
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
            role: Some(ROLE_ACTIVE.to_string()),
        })),
        other => unknown_verb(other),
    }
}
