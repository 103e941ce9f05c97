//! The consumer agent's liveness responder (pre-flight): answers
//! `keywave.agent.v1.<region>.<consumer>.ping` (a plain core NATS
//! subscription, no JetStream) with an [`AgentStatus`]: consumer id, region,
//! the agent's version, the credentials it watches and how their last health
//! checks went. The coordinator asks before each wave. The answer never
//! holds a secret, nor a fingerprint; the request's body is ignored.

use futures::StreamExt;
use keywave_common::wire::{AgentCredential, AgentStatus, SCHEMA_VERSION};
use keywave_common::{codec, ids, now_ms, subjects};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// This build's version, as the answers carry it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Error)]
pub enum PingError {
    #[error("cannot answer pings: {0}")]
    Subject(#[from] ids::IdError),
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
}

/// The last health check of each watched credential, shared by the agent
/// (which records them) and the responder (which reports them).
#[derive(Debug, Clone, Default)]
pub struct HealthBoard(Arc<Mutex<BTreeMap<String, Option<bool>>>>);

impl HealthBoard {
    /// A board for `credentials`, none checked yet.
    pub fn new<'a>(credentials: impl IntoIterator<Item = &'a str>) -> Self {
        HealthBoard(Arc::new(Mutex::new(
            credentials
                .into_iter()
                .map(|c| (c.to_string(), None))
                .collect(),
        )))
    }

    /// Records the outcome of `credential`'s last health check.
    pub fn set(&self, credential: &str, healthy: bool) {
        self.0
            .lock()
            .expect("health board lock")
            .insert(credential.to_string(), Some(healthy));
    }

    /// What an answer reports.
    pub fn status(&self, consumer: &str, region: &str) -> AgentStatus {
        let credentials: Vec<AgentCredential> = self
            .0
            .lock()
            .expect("health board lock")
            .iter()
            .map(|(id, healthy)| AgentCredential {
                id: id.clone(),
                healthy: *healthy,
            })
            .collect();
        AgentStatus {
            v: SCHEMA_VERSION,
            consumer_id: consumer.to_string(),
            region: region.to_string(),
            version: VERSION.to_string(),
            healthy: credentials.iter().all(|c| c.healthy != Some(false)),
            credentials,
            at_ms: now_ms(),
        }
    }
}

/// Subscribes to the consumer's ping subject and answers in the background
/// until `shutdown`. The server knows the subscription when this returns.
pub async fn spawn(
    client: async_nats::Client,
    consumer: String,
    region: String,
    board: &HealthBoard,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, PingError> {
    let board = board.clone();
    let subject = subjects::agent_ping(&region, &consumer)?;
    let fail = |e: String| PingError::Subscribe {
        subject: subject.clone(),
        detail: e,
    };
    let sub = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| fail(e.to_string()))?;
    client.flush().await.map_err(|e| fail(e.to_string()))?;
    info!(subject = %subject, "Answering liveness pings");
    Ok(tokio::spawn(async move {
        let mut sub = std::pin::pin!(sub.take_until(shutdown.cancelled_owned()));
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply else {
                debug!("Ping without a reply subject ignored");
                continue;
            };
            let status = board.status(&consumer, &region);
            let body = match codec::encode(codec::Format::Json, &status) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Cannot encode the ping answer");
                    continue;
                }
            };
            let headers = codec::headers(
                codec::Format::Json,
                &format!("ping:{region}:{consumer}:{}", status.at_ms),
            );
            if let Err(e) = client.publish_with_headers(reply, headers, body).await {
                warn!(error = %e, "Could not answer a ping");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_board_reports_each_credential_and_the_worst_health() {
        let b = HealthBoard::new(["db", "cache"]);
        let s = b.status("orders-api", "eu");
        assert_eq!(s.credentials.len(), 2);
        assert!(s.healthy, "nothing checked yet is not unhealthy");
        assert!(s.credentials.iter().all(|c| c.healthy.is_none()));
        b.set("db", true);
        b.set("cache", false);
        let s = b.status("orders-api", "eu");
        assert!(!s.healthy);
        assert_eq!(s.version, VERSION);
        b.set("cache", true);
        assert!(b.status("orders-api", "eu").healthy);
    }

    #[tokio::test]
    async fn answers_pings_on_its_own_subject() {
        let server = keywave_harness::NatsServer::start();
        let client = server.client().await;
        let board = HealthBoard::new(["db-orders"]);
        board.set("db-orders", true);
        let stop = CancellationToken::new();
        let task = spawn(
            client.clone(),
            "orders-api".into(),
            "eu".into(),
            &board,
            stop.clone(),
        )
        .await
        .unwrap();
        let subject = subjects::agent_ping("eu", "orders-api").unwrap();
        let m = client.request(subject, "".into()).await.unwrap();
        let s: AgentStatus = codec::decode(m.headers.as_ref(), &m.payload).unwrap();
        assert_eq!(
            (s.consumer_id.as_str(), s.region.as_str()),
            ("orders-api", "eu")
        );
        assert_eq!(s.credentials[0].id, "db-orders");
        assert!(s.healthy);
        // Another consumer's subject finds nobody.
        let other = subjects::agent_ping("eu", "billing").unwrap();
        assert!(client.request(other, "".into()).await.is_err());
        stop.cancel();
        task.await.unwrap();
        assert!(spawn(
            client,
            "a.b".into(),
            "eu".into(),
            &HealthBoard::default(),
            CancellationToken::new()
        )
        .await
        .is_err());
    }
}
