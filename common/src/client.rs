//! [`ApiClient`]: the typed client of the operator API (`keywave.api.v1.<verb>`, served by the coordinator),
//! used by the `keywave` CLI, `keywave dev` and the integration tests. API
//! errors come back as typed [`ClientError`] variants.
//!
//! Every running coordinator answers the read verbs (status, list, ping);
//! control verbs reach the active one. While no coordinator is active (a
//! standby takes over within the lease ttl, 4 s by default) a control
//! request is answered `takeover` or finds no responder at all: the client
//! then waits and sends it again, for at most [`TAKEOVER_WAIT`] (nothing was
//! done with it in either case). A read that gets no reply within its first
//! attempt (it reached a coordinator that died with it) is sent again within
//! the request timeout.

use crate::{
    api::{
        verbs, ApproveRequest, CampaignRef, CampaignStatus, CampaignSummary, Pong, StartRequest,
    },
    subjects,
    wire::{CampaignSpec, CampaignState},
};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use thiserror::Error;

/// Default time a request may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// `campaign.start` reads the inventory and writes the plan: allow longer.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
/// Status polling period of [`ApiClient::wait_terminal`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a control request is sent again while no coordinator is active
/// (the lease ttl and a poll, with room to spare).
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(15);
/// Timeout of a read's first attempt; each next attempt waits twice as long,
/// within the request timeout.
pub const READ_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two attempts of a control request during a take-over.
const TAKEOVER_RETRY: Duration = Duration::from_millis(250);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("no keywave coordinator is listening on {subject} (is keywave-coordinator running?)")]
    NoCoordinator { subject: String },
    #[error("{subject}: no reply within {timeout:?}")]
    Timeout { subject: String, timeout: Duration },
    #[error("{subject}: request failed: {detail}")]
    Request { subject: String, detail: String },
    #[error("{subject}: malformed reply: {detail}")]
    MalformedReply { subject: String, detail: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("coordinator error: {0}")]
    Internal(String),
    /// No coordinator is active right now (a take-over is under way);
    /// nothing was done. Returned once [`TAKEOVER_WAIT`] ran out.
    #[error("no active coordinator: {0}")]
    Takeover(String),
    #[error("{class}: {message}")]
    Other { class: String, message: String },
    #[error("campaign {campaign_id} is still {state} after {timeout:?}")]
    WaitTimeout {
        campaign_id: String,
        state: CampaignState,
        timeout: Duration,
    },
}

/// [`crate::api::ApiReply`] as read by the client (without `ApiReply`'s `Default`
/// bound on the data type).
#[derive(serde::Deserialize)]
struct WireReply<T> {
    ok: bool,
    data: Option<T>,
    error: Option<crate::api::ApiError>,
}

/// Told when a control request waits for a take-over (see
/// [`ApiClient::on_wait`]).
pub type WaitNotice = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// A client of the coordinators' API.
#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    timeout: Duration,
    takeover_wait: Duration,
    on_wait: Option<WaitNotice>,
}

impl ApiClient {
    pub fn new(client: async_nats::Client) -> Self {
        ApiClient {
            client,
            timeout: DEFAULT_TIMEOUT,
            takeover_wait: TAKEOVER_WAIT,
            on_wait: None,
        }
    }

    /// Sets the timeout of every request but `campaign.start`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets how long control requests are sent again while no coordinator
    /// is active (default [`TAKEOVER_WAIT`]; zero: not at all).
    pub fn with_takeover_wait(mut self, wait: Duration) -> Self {
        self.takeover_wait = wait;
        self
    }

    /// Calls `notice` with a line to show when a control request starts
    /// waiting for a take-over (the CLI prints it on stderr).
    pub fn on_wait(mut self, notice: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_wait = Some(std::sync::Arc::new(notice));
        self
    }

    /// A read verb: any coordinator answers. An attempt without a reply
    /// (the coordinator died with the request) is sent again, with twice the
    /// timeout, until the request timeout is spent.
    async fn read<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: &str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let until = tokio::time::Instant::now() + self.timeout;
        let mut attempt = READ_ATTEMPT_TIMEOUT;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let this = attempt.min(left);
            match self.call(verb, body, this).await {
                Err(ClientError::Timeout { .. }) if this < left => attempt *= 2,
                Err(ClientError::Timeout { subject, .. }) => {
                    return Err(ClientError::Timeout {
                        subject,
                        timeout: self.timeout,
                    })
                }
                r => return r,
            }
        }
    }

    /// A control verb: the active coordinator handles it. While none is
    /// (`takeover` answers, or no responder at all), waits and sends it
    /// again for at most the take-over wait; nothing was done with the
    /// request in either case, so sending it again is safe.
    async fn control<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let started = tokio::time::Instant::now();
        let mut told = false;
        loop {
            match self.call(verb, body, timeout).await {
                Err(e @ (ClientError::Takeover(_) | ClientError::NoCoordinator { .. }))
                    if started.elapsed() + TAKEOVER_RETRY < self.takeover_wait =>
                {
                    if !told {
                        told = true;
                        if let Some(notice) = &self.on_wait {
                            notice(&format!(
                                "{e}; waiting up to {}s for an active coordinator",
                                self.takeover_wait.as_secs()
                            ));
                        }
                    }
                    tokio::time::sleep(TAKEOVER_RETRY).await;
                }
                r => {
                    if told && r.is_ok() {
                        if let Some(notice) = &self.on_wait {
                            notice(&format!(
                                "an active coordinator answered after {:.1}s",
                                started.elapsed().as_secs_f64()
                            ));
                        }
                    }
                    return r;
                }
            }
        }
    }

    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        verb: &str,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let subject = subjects::api(verb);
        let payload: Bytes = serde_json::to_vec(body)
            .map_err(|e| ClientError::Request {
                subject: subject.clone(),
                detail: e.to_string(),
            })?
            .into();
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        let msg = self
            .client
            .send_request(subject.clone(), request)
            .await
            .map_err(|e| match e.kind() {
                async_nats::RequestErrorKind::NoResponders => ClientError::NoCoordinator {
                    subject: subject.clone(),
                },
                async_nats::RequestErrorKind::TimedOut => ClientError::Timeout {
                    subject: subject.clone(),
                    timeout,
                },
                _ => ClientError::Request {
                    subject: subject.clone(),
                    detail: e.to_string(),
                },
            })?;
        let reply: WireReply<Resp> =
            serde_json::from_slice(&msg.payload).map_err(|e| ClientError::MalformedReply {
                subject: subject.clone(),
                detail: e.to_string(),
            })?;
        if reply.ok {
            return reply.data.ok_or_else(|| ClientError::MalformedReply {
                subject,
                detail: "ok reply without data".into(),
            });
        }
        let err = reply.error.unwrap_or(crate::api::ApiError {
            class: "internal".into(),
            message: "error reply without details".into(),
        });
        Err(match err.class.as_str() {
            "bad_request" => ClientError::BadRequest(err.message),
            "not_found" => ClientError::NotFound(err.message),
            "conflict" => ClientError::Conflict(err.message),
            "internal" => ClientError::Internal(err.message),
            crate::api::CLASS_TAKEOVER => ClientError::Takeover(err.message),
            _ => ClientError::Other {
                class: err.class,
                message: err.message,
            },
        })
    }

    /// Starts a campaign; returns its id.
    pub async fn start(&self, spec: CampaignSpec) -> Result<String, ClientError> {
        self.start_with_id(spec, None).await
    }

    /// Starts a campaign under a chosen id; starting the same spec under the
    /// same id again returns the id (idempotent), another spec is a conflict.
    pub async fn start_with_id(
        &self,
        spec: CampaignSpec,
        campaign_id: Option<String>,
    ) -> Result<String, ClientError> {
        self.start_request(StartRequest {
            spec,
            campaign_id,
            skip_locked: false,
        })
        .await
    }

    /// Starts a campaign from a whole request (see [`StartRequest`]). A
    /// request without an id gets one here, before it is sent: a start
    /// sent again during a coordinator take-over (the first one may have
    /// been carried out by a coordinator that died before answering) then
    /// names the same campaign and returns it, instead of starting a second.
    pub async fn start_request(&self, mut req: StartRequest) -> Result<String, ClientError> {
        if req.campaign_id.is_none() {
            req.campaign_id = Some(crate::ids::random_id("c"));
        }
        let r: CampaignRef = self
            .control(verbs::CAMPAIGN_START, &req, START_TIMEOUT.max(self.timeout))
            .await?;
        Ok(r.campaign_id)
    }

    fn cref(id: &str) -> CampaignRef {
        CampaignRef {
            campaign_id: id.to_string(),
        }
    }

    pub async fn status(&self, id: &str) -> Result<CampaignStatus, ClientError> {
        self.read(verbs::CAMPAIGN_STATUS, &Self::cref(id)).await
    }

    pub async fn list(&self) -> Result<Vec<CampaignSummary>, ClientError> {
        self.read(verbs::CAMPAIGN_LIST, &serde_json::json!({}))
            .await
    }

    /// Pauses a campaign (no new tasks; in-flight ones finish and are
    /// counted). Returns the status after the change.
    pub async fn pause(&self, id: &str) -> Result<CampaignStatus, ClientError> {
        self.control(verbs::CAMPAIGN_PAUSE, &Self::cref(id), self.timeout)
            .await
    }

    /// Resumes a paused campaign, including one paused by a failed wave
    /// (it continues with the next wave).
    pub async fn resume(&self, id: &str) -> Result<CampaignStatus, ClientError> {
        self.control(verbs::CAMPAIGN_RESUME, &Self::cref(id), self.timeout)
            .await
    }

    /// Aborts a campaign: no more tasks are issued; it ends `aborted`.
    pub async fn abort(&self, id: &str) -> Result<CampaignStatus, ClientError> {
        self.control(verbs::CAMPAIGN_ABORT, &Self::cref(id), self.timeout)
            .await
    }

    /// Approves wave `wave` (by default the one the campaign waits at) of a
    /// campaign started with approval gates, as `by`. Returns the status
    /// after the approval (the wave has started when it was waiting).
    pub async fn approve(
        &self,
        id: &str,
        wave: Option<u32>,
        by: &str,
    ) -> Result<CampaignStatus, ClientError> {
        self.control(
            verbs::CAMPAIGN_APPROVE,
            &ApproveRequest {
                campaign_id: id.to_string(),
                wave,
                by: by.to_string(),
            },
            self.timeout,
        )
        .await
    }

    /// Rolls back the current wave of a paused continuity campaign (`wave`,
    /// when given, must be that wave). Returns the status after the request
    /// (`rolling_back`); containment is refused with a conflict.
    pub async fn rollback(
        &self,
        id: &str,
        wave: Option<u32>,
    ) -> Result<CampaignStatus, ClientError> {
        self.control(
            verbs::CAMPAIGN_ROLLBACK,
            &crate::api::RollbackRequest {
                campaign_id: id.to_string(),
                wave,
            },
            self.timeout,
        )
        .await
    }

    /// Asks a coordinator who it is.
    pub async fn ping(&self) -> Result<Pong, ClientError> {
        self.read(verbs::PING, &serde_json::json!({})).await
    }

    /// Polls the status every [`POLL_INTERVAL`] until the campaign is
    /// terminal, paused or waiting for an approval. Transient failures (no coordinator, timeouts)
    /// are retried until `timeout`.
    pub async fn wait_terminal(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<CampaignStatus, ClientError> {
        let until = tokio::time::Instant::now() + timeout;
        let mut last_state = CampaignState::Running;
        loop {
            match self.status(id).await {
                Ok(s)
                    if s.state.is_terminal()
                        || matches!(
                            s.state,
                            CampaignState::Paused | CampaignState::AwaitingApproval
                        ) =>
                {
                    return Ok(s)
                }
                Ok(s) => last_state = s.state,
                Err(
                    e @ (ClientError::NoCoordinator { .. }
                    | ClientError::Timeout { .. }
                    | ClientError::Request { .. }),
                ) => {
                    if tokio::time::Instant::now() >= until {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= until {
                return Err(ClientError::WaitTimeout {
                    campaign_id: id.to_string(),
                    state: last_state,
                    timeout,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}
