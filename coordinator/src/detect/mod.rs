//! Leak detections in, containment out. Detections (webhooks, SIEM/SOAR,
//! `keywave detect`) arrive on `keywave.detect.<source>` (stream
//! `KEYWAVE_DETECTIONS`); the intake matches them against the inventory,
//! coalesces a window of them into one containment campaign started through
//! the operator API, and records every detection that starts nothing.
//!
//! # Layout
//! - `intake`: the durable consumer, the coalescing window, claims and campaign start.
//! - `matcher`: id, `principal@endpoint` and keyed-fingerprint matching.
//! - `index`: rotation notices (`keywave.rotated.*`) into the fingerprint index.
//! - `store`: the `keywave-detections` bucket (claims, intents, fingerprints) and detection records.
//! - `webhook`, `adapters`: the optional HTTP intake (GitHub, GitGuardian, generic signed JSON).
//! - `poll`: the optional polling fallback (GET a source's open alerts on an interval).
//! - `report`: time to contain per credential, p50/p95/p99/max, credentials still exposed.
//! - `cli`: the `keywave detect` command and the daemon's detection flags.
//!
//! [`Detector::start`] prepares streams, bucket and webhook listener;
//! [`Detector::run`] runs until the shutdown token is cancelled. It needs a
//! coordinator answering the operator API (normally the one in the same
//! process) to start campaigns.

pub mod adapters;
pub mod args;
pub mod index;
pub mod intake;
pub mod matcher;
pub mod poll;
pub mod store;
pub mod webhook;

pub use intake::IntakeConfig;
pub use webhook::WebhookConfig;

use keywave_common::client::ApiClient;
use keywave_common::{
    detect::DetectKey,
    topology::{self, TopologyError},
};
use std::net::SocketAddr;
use thiserror::Error;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

/// Everything the detection intake needs to know.
#[derive(Debug, Clone, Default)]
pub struct DetectOptions {
    /// Replicas and storage of the streams and bucket it creates.
    pub topology: topology::Config,
    pub intake: IntakeConfig,
    /// Key of the detection fingerprints; without it `sha256:` fingerprints
    /// cannot be matched (they are recorded as unmatched).
    pub detect_key: Option<DetectKey>,
    /// The HTTP webhook intake; off when `None`.
    pub webhook: Option<WebhookConfig>,
    /// Sources polled for open alerts (the polling fallback); none by default.
    pub polls: Vec<poll::PollSource>,
}

#[derive(Debug, Error)]
pub enum DetectError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("webhook listener on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
    #[error("polled source {name}: {source}")]
    Poll {
        name: String,
        #[source]
        source: poll::PollSetupError,
    },
}

/// A prepared detection intake.
pub struct Detector {
    intake: intake::Intake,
    js: async_nats::jetstream::Context,
    webhook: Option<webhook::WebhookServer>,
    pollers: Vec<poll::Poller>,
}

impl Detector {
    /// Creates `KEYWAVE_DETECTIONS`, `KEYWAVE_ROTATED` and the
    /// `keywave-detections` bucket if needed and binds the webhook listener.
    pub async fn start(
        client: async_nats::Client,
        opts: DetectOptions,
    ) -> Result<Self, DetectError> {
        let js = topology::context(client.clone());
        topology::ensure_core(&js, &opts.topology).await?;
        keywave_common::topology::detection_streams(&js, &opts.topology).await?;
        let kv = store::bucket(&js, &opts.topology).await?;
        let inventory = topology::inventory(&js, &opts.topology).await?;
        let webhook = match opts.webhook {
            None => None,
            Some(cfg) => {
                let addr = cfg.listen;
                Some(
                    webhook::WebhookServer::bind(cfg, js.clone())
                        .await
                        .map_err(|source| DetectError::Listen { addr, source })?,
                )
            }
        };
        let mut pollers = Vec::with_capacity(opts.polls.len());
        for src in opts.polls {
            let name = src.name.clone();
            pollers.push(
                poll::Poller::new(src, js.clone())
                    .map_err(|source| DetectError::Poll { name, source })?,
            );
        }
        if opts.detect_key.is_none() {
            warn!("No detection key configured: detections by sha256 fingerprint will be recorded as unmatched");
        }
        Ok(Detector {
            intake: intake::Intake {
                js: js.clone(),
                api: ApiClient::new(client),
                kv,
                inventory,
                key: opts.detect_key,
                cfg: opts.intake,
                index: matcher::InventoryIndex::default(),
            },
            js,
            webhook,
            pollers,
        })
    }

    /// The webhook server's address, when it is on.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook.as_ref().and_then(|w| w.local_addr().ok())
    }

    /// Runs the intake, the fingerprint indexer and the webhook server until
    /// `shutdown`. Returns an error only for an injected crash.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DetectError> {
        let tracker = TaskTracker::new();
        let inner = shutdown.child_token();
        tracker.spawn(index::run(
            self.js.clone(),
            self.intake.kv.clone(),
            inner.clone(),
        ));
        if let Some(w) = self.webhook {
            let t = inner.clone();
            tracker.spawn(async move {
                if let Err(e) = w.serve(t).await {
                    warn!(error = %e, "Webhook server stopped");
                }
            });
        }
        for p in self.pollers {
            tracker.spawn(p.run(inner.clone()));
        }
        tracker.close();
        let r = self.intake.run(inner.clone()).await;
        inner.cancel();
        tracker.wait().await;
        info!("Detection intake stopped");
        r.map_err(DetectError::from)
    }
}

/// Prepares and runs the detection intake until `shutdown`.
pub async fn run(
    client: async_nats::Client,
    opts: DetectOptions,
    shutdown: CancellationToken,
) -> Result<(), DetectError> {
    Detector::start(client, opts).await?.run(shutdown).await
}
