//! Bodies of the operator API, served by the coordinator with NATS
//! request/reply on `keywave.api.v1.<verb>` (JSON). Every reply is an
//! [`ApiReply`]: `ok` with `data`, or an error with a class and a message.

use crate::wire::{CampaignSpec, CampaignState, Decision, FailureCounts, Strategy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Verbs of the API (the subject suffix after `keywave.api.v1.`).
pub mod verbs {
    pub const CAMPAIGN_START: &str = "campaign.start";
    pub const CAMPAIGN_STATUS: &str = "campaign.status";
    pub const CAMPAIGN_LIST: &str = "campaign.list";
    pub const CAMPAIGN_PAUSE: &str = "campaign.pause";
    pub const CAMPAIGN_RESUME: &str = "campaign.resume";
    pub const CAMPAIGN_ABORT: &str = "campaign.abort";
    pub const CAMPAIGN_APPROVE: &str = "campaign.approve";
    pub const CAMPAIGN_ROLLBACK: &str = "campaign.rollback";
    pub const PING: &str = "ping";

    /// Verbs that only read (answered by every coordinator, the standbys
    /// too, from the campaign snapshots in JetStream).
    pub const READ: &[&str] = &[CAMPAIGN_STATUS, CAMPAIGN_LIST, PING];
    /// Verbs that change a campaign (handled by the active coordinator, the
    /// lease holder, only; a standby forwards them to it).
    pub const CONTROL: &[&str] = &[
        CAMPAIGN_START,
        CAMPAIGN_PAUSE,
        CAMPAIGN_RESUME,
        CAMPAIGN_ABORT,
        CAMPAIGN_APPROVE,
        CAMPAIGN_ROLLBACK,
    ];

    /// Whether `verb` only reads.
    pub fn is_read(verb: &str) -> bool {
        READ.contains(&verb)
    }

    /// Whether `verb` changes a campaign.
    pub fn is_control(verb: &str) -> bool {
        CONTROL.contains(&verb)
    }
}

/// Error class of a control request that found no active coordinator: the
/// lease is free or its holder does not answer (it died and a standby takes
/// over within the lease ttl). Nothing was done; the request may be sent
/// again ([`crate::client::ApiClient`] does, for a bounded time).
pub const CLASS_TAKEOVER: &str = "takeover";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiReply<T> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

impl<T> ApiReply<T> {
    pub fn ok(data: T) -> Self {
        ApiReply {
            ok: true,
            data: Some(data),
            error: None,
        }
    }
    pub fn err(class: &str, message: impl Into<String>) -> Self {
        ApiReply {
            ok: false,
            data: None,
            error: Some(ApiError {
                class: class.to_string(),
                message: message.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// `bad_request`, `not_found`, `conflict`, `internal`, or
    /// [`CLASS_TAKEOVER`] (control verbs while no coordinator is active).
    pub class: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    pub spec: CampaignSpec,
    /// Optional caller-chosen id (idempotent start); generated when absent.
    #[serde(default)]
    pub campaign_id: Option<String>,
    /// Leave out the selected credentials that other unfinished campaigns
    /// hold, instead of refusing the start.
    #[serde(default)]
    pub skip_locked: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignRef {
    pub campaign_id: String,
}

/// Longest `by` of an approval, in bytes.
pub const MAX_APPROVER_LEN: usize = 128;

/// `campaign.approve`: lets a wave that waits for approval start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApproveRequest {
    pub campaign_id: String,
    /// The wave to approve; by default the one the campaign waits at (or
    /// else its next gated wave).
    #[serde(default)]
    pub wave: Option<u32>,
    /// Who approves (recorded in the `approved` event).
    pub by: String,
}

/// One wave as the coordinator sees it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WaveStatus {
    pub wave: u32,
    pub size: u64,
    pub published: bool,
    pub succeeded: u64,
    pub failed: u64,
    pub no_result: u64,
    #[serde(default)]
    pub failures: FailureCounts,
    #[serde(default)]
    pub decision: Option<Decision>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub rollback_tasks: u64,
    #[serde(default)]
    pub rolled_back: u64,
    #[serde(default)]
    pub rollback_refused: u64,
    #[serde(default)]
    pub rollback_failed: u64,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// The wave waits for a human approval before it starts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval_required: bool,
    /// Who approved it, when it needed an approval and got one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_at_ms: Option<u64>,
    /// The wave's tasks per region (planned at start; empty in snapshots
    /// from before it existed): which regions the wave needs live workers in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, u64>,
}

/// A campaign's snapshot (also what the coordinator keeps in the
/// `keywave-campaigns` KV bucket).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CampaignStatus {
    pub campaign_id: String,
    pub spec: CampaignSpec,
    pub state: CampaignState,
    pub total: u64,
    /// Index of the wave in progress (or the last one when finished).
    pub current_wave: u32,
    pub waves: Vec<WaveStatus>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// Why the campaign is in its state (last decision's reason).
    #[serde(default)]
    pub reason: Option<String>,
    /// Per-region tallies (absent in snapshots written before they existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionStatus>,
    /// While paused because these regions had no live worker (the reason
    /// names them): the wave's deadline stands still until a resume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paused_regions: Vec<String>,
}

/// One region's share of a campaign: how many of its credentials the plan
/// holds and how many rotation results came back. Rebuilt from the results
/// stream like the wave counters; credentials without a result by their
/// deadline are counted in the waves' `no_result`, not here.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegionStatus {
    pub total: u64,
    #[serde(default)]
    pub succeeded: u64,
    #[serde(default)]
    pub failed: u64,
    /// Live view, as the coordinator driving the campaign last saw it (not
    /// rebuilt on replay): workers of the region heard from recently.
    /// `None` when not known (no campaign driver yet, or an old coordinator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_workers: Option<u32>,
    /// How long the region has had no live worker, when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_for_ms: Option<u64>,
    /// Tasks in the region's queue (`workers-<region>`) that no worker has
    /// pulled yet (`num_pending`; every campaign of the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// Tasks a worker of the region pulled and has not answered yet
    /// (`num_ack_pending`; every campaign of the region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u64>,
}

/// `campaign.rollback`: an operator asks to roll back a paused continuity
/// campaign's current wave (every credential of it whose rotation succeeded
/// gets its previous secret back). Containment is never rolled back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub campaign_id: String,
    /// The wave to roll back; must be the campaign's current wave (the
    /// default).
    #[serde(default)]
    pub wave: Option<u32>,
}

impl CampaignStatus {
    pub fn succeeded(&self) -> u64 {
        self.waves.iter().map(|w| w.succeeded).sum()
    }
    pub fn failed(&self) -> u64 {
        self.waves.iter().map(|w| w.failed + w.no_result).sum()
    }
    pub fn rolled_back(&self) -> u64 {
        self.waves.iter().map(|w| w.rolled_back).sum()
    }
}

/// A line of `campaign list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignSummary {
    pub campaign_id: String,
    pub name: String,
    pub strategy: Strategy,
    pub state: CampaignState,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub created_at_ms: u64,
}

/// Reply data of `ping`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pong {
    pub coordinator_id: String,
    pub version: String,
    /// `active` (the lease holder) or `standby` (absent from coordinators
    /// older than the role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// [`Pong::role`] of the lease holder.
pub const ROLE_ACTIVE: &str = "active";
/// [`Pong::role`] of a coordinator standing by.
pub const ROLE_STANDBY: &str = "standby";
