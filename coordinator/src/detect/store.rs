//! The detection intake's durable state: the KV bucket `keywave-detections`
//! and the detection records on `keywave.event.detections.<outcome>`.
//!
//! | key | value | written when |
//! |---|---|---|
//! | `claim.<credential>` | [`Claim`]: which containment campaign owns the credential, and when its leak was first seen | before the campaign is started |
//! | `intent.<campaign>` | [`Intent`]: the containment campaign's spec, `pending` until the engine accepted it | after the claims, before the start |
//! | `fp.<hex>` | [`FpEntry`]: a keyed detection fingerprint and its credential | from rotation notices |
//!
//! Claims are written first, then the intent, then the campaign is started,
//! then the intent is marked started, and only then are the detections
//! acked: a crash at any point either leaves unacked detections (redelivered,
//! and a claim without an intent is ignored) or a pending intent (started by
//! the next intake at start-up).

use async_nats::jetstream::{kv, Context};
use keywave_common::{
    codec::Format,
    detect::Detection,
    now_ms, publish, subjects,
    topology::{self, TopologyError},
    wire::{CampaignSpec, SCHEMA_VERSION},
};
use serde::{Deserialize, Serialize};

/// The intake's bucket.
pub const KV_DETECTIONS: &str = "keywave-detections";
/// The pseudo campaign under which detection records are published:
/// `keywave.event.detections.<outcome>`.
pub const EVENT_SCOPE: &str = "detections";

/// Opens (or creates) the bucket.
pub async fn bucket(js: &Context, cfg: &topology::Config) -> Result<kv::Store, TopologyError> {
    if let Ok(kv) = js.get_key_value(KV_DETECTIONS).await {
        return Ok(kv);
    }
    let config = kv::Config {
        bucket: KV_DETECTIONS.into(),
        description: "keywave detection intake: claims, containment intents, fingerprint index"
            .into(),
        history: 1,
        storage: if cfg.memory {
            async_nats::jetstream::stream::StorageType::Memory
        } else {
            async_nats::jetstream::stream::StorageType::File
        },
        num_replicas: cfg.replicas,
        // Home state, like the other coordinator buckets.
        placement: cfg
            .home_placement
            .as_ref()
            .map(topology::Placement::to_nats),
        ..Default::default()
    };
    // As in `topology`: the stream is created directly (nats-server 2.9).
    let created = js
        .get_or_create_stream(topology::kv_stream_config(&config))
        .await;
    js.get_key_value(KV_DETECTIONS)
        .await
        .map_err(|e| TopologyError {
            what: format!("bucket {KV_DETECTIONS}"),
            detail: match created {
                Err(c) => c.to_string(),
                Ok(_) => e.to_string(),
            },
        })
}

pub fn claim_key(credential: &str) -> String {
    format!("claim.{credential}")
}

pub fn intent_key(cid: &str) -> String {
    format!("intent.{cid}")
}

/// `fp.<hex>` for a `dfp1:<hex>` fingerprint.
pub fn fp_key(dfp: &str) -> String {
    format!("fp.{}", dfp.trim_start_matches("dfp1:"))
}

/// A credential owned by a containment campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub credential_id: String,
    pub campaign_id: String,
    /// When the intake first received a detection of this leak.
    pub received_at_ms: u64,
    /// When the source says it detected the leak (earliest in the window).
    pub detected_at_ms: u64,
    /// The first detection: `<source>:<source_id>`.
    pub first_detection: String,
    /// Detections of this credential coalesced into the claim.
    pub detections: u32,
    pub claimed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentState {
    /// Claims written; the campaign may not exist yet.
    Pending,
    /// The engine accepted the campaign.
    Started,
}

/// A containment campaign the intake decided to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub campaign_id: String,
    pub state: IntentState,
    pub spec: CampaignSpec,
    pub credentials: u64,
    pub detections: u64,
    pub created_at_ms: u64,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
}

/// A keyed detection fingerprint of a credential's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpEntry {
    pub credential_id: String,
    pub region: String,
    /// False once the secret was replaced (a leak of it is already contained).
    pub current: bool,
    pub at_ms: u64,
}

/// What became of a detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A containment campaign was started for it.
    Contained,
    /// Its credential is already being contained by a running campaign.
    Coalesced,
    /// A containment that started after the leak was detected already replaced the secret.
    AlreadyContained,
    /// It names a credential the inventory does not have.
    Unmatched,
    /// The source could not say which credential leaked.
    Unidentified,
    /// The message was malformed, oversized or invalid.
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Contained => "contained",
            Outcome::Coalesced => "coalesced",
            Outcome::AlreadyContained => "already_contained",
            Outcome::Unmatched => "unmatched",
            Outcome::Unidentified => "unidentified",
            Outcome::Rejected => "rejected",
        }
    }
}

/// A record of a detection that did not start a campaign (or, for
/// `contained`, one record per campaign), on
/// `keywave.event.detections.<outcome>` in `KEYWAVE_EVENTS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionRecord {
    pub v: u16,
    pub at_ms: u64,
    pub outcome: Outcome,
    pub reason: String,
    /// The detection, when it decoded (never a secret: fingerprints are digests).
    #[serde(default)]
    pub detection: Option<Detection>,
    #[serde(default)]
    pub credential_id: Option<String>,
    #[serde(default)]
    pub campaign_id: Option<String>,
    /// Stream sequence of the detection message on `KEYWAVE_DETECTIONS`.
    pub stream_seq: u64,
}

/// Publishes a detection record (de-duplicated on sequence and outcome, so a
/// redelivered detection is recorded once).
pub async fn record(
    js: &Context,
    outcome: Outcome,
    stream_seq: u64,
    reason: impl Into<String>,
    detection: Option<Detection>,
    credential_id: Option<String>,
    campaign_id: Option<String>,
) -> Result<(), publish::PublishError> {
    let rec = DetectionRecord {
        v: SCHEMA_VERSION,
        at_ms: now_ms(),
        outcome,
        reason: reason.into(),
        detection,
        credential_id,
        campaign_id,
        stream_seq,
    };
    publish::send_and_confirm(
        js,
        subjects::event(EVENT_SCOPE, outcome.as_str()),
        Format::Json,
        &format!("detection:{stream_seq}:{}", outcome.as_str()),
        &rec,
    )
    .await
}

/// Reads a JSON value; `None` when absent, deleted or unreadable.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, kv::EntryError> {
    match kv.entry(key).await? {
        Some(e) if e.operation == kv::Operation::Put => Ok(serde_json::from_slice(&e.value)
            .ok()
            .map(|v| (v, e.revision))),
        _ => Ok(None),
    }
}
