//! Time to contain, per credential of a containment campaign: from the
//! detection's arrival (its claim), through the task's publication (its
//! wave's start), to the old secret proven rejected (the worker's result,
//! `old_rejected`, `finished_at_ms`). Credentials without that proof are
//! named as still exposed.

use async_nats::jetstream::{kv, Context};
use futures::StreamExt;
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::{
    api::CampaignStatus,
    codec, subjects,
    topology::{self, StreamReadError, STREAM_RESULTS},
    wire::{CampaignState, Outcome, RotationResult, TaskAction},
};
use keywave_coordinator::detect::store::{self, Claim, Intent};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;
use thiserror::Error;

/// Why the containment report could not be built.
#[derive(Debug, Error)]
pub enum ContainmentError {
    #[error(transparent)]
    Status(#[from] ClientError),
    #[error("reading the detection intent of {campaign}: {source}")]
    Intent {
        campaign: String,
        #[source]
        source: kv::EntryError,
    },
    #[error("reading the detection claim of {credential}: {source}")]
    Claim {
        credential: String,
        #[source]
        source: kv::EntryError,
    },
    #[error(transparent)]
    Results(#[from] StreamReadError),
}

/// Longest wait for the next result before the read gives up.
const RESULTS_IDLE: Duration = Duration::from_secs(10);

/// One credential's timeline (milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialTimeline {
    pub credential_id: String,
    /// When the source says it found the leak.
    pub detected_at_ms: Option<u64>,
    /// When keywave received the first detection.
    pub received_at_ms: Option<u64>,
    /// When its rotation task was published (its wave started).
    pub published_at_ms: Option<u64>,
    /// When the worker proved the old secret rejected.
    pub contained_at_ms: Option<u64>,
    /// `contained_at - received_at`.
    pub time_to_contain_ms: Option<u64>,
    /// `contained`, `rotated_unverified` (no old secret was known to test),
    /// `failed: <class>`, or `pending`.
    pub status: String,
}

/// p50, p95, p99 and max of a sample, nearest rank.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Distribution {
    pub count: u64,
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl Distribution {
    pub fn of(mut xs: Vec<u64>) -> Self {
        if xs.is_empty() {
            return Distribution::default();
        }
        xs.sort_unstable();
        let rank = |p: f64| xs[((p * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Distribution {
            count: xs.len() as u64,
            p50_ms: rank(0.50),
            p95_ms: rank(0.95),
            p99_ms: rank(0.99),
            max_ms: *xs.last().expect("not empty"),
        }
    }
}

/// `keywave detect report <campaign>`.
#[derive(Debug, Clone, Serialize)]
pub struct ContainmentReport {
    pub campaign_id: String,
    pub state: CampaignState,
    pub credentials: u64,
    pub contained: u64,
    /// Received → old secret proven rejected.
    pub time_to_contain: Distribution,
    /// Received → task published.
    pub time_to_publish: Distribution,
    /// Credentials whose old secret is not proven rejected.
    pub exposed: Vec<String>,
    pub timelines: Vec<CredentialTimeline>,
}

/// Builds the report from the campaign status, the intake's claims and the
/// campaign's results.
pub async fn build(
    js: &Context,
    api: &ApiClient,
    detections: &kv::Store,
    campaign_id: &str,
) -> Result<ContainmentReport, ContainmentError> {
    let status: CampaignStatus = api.status(campaign_id).await?;
    let intent = store::get_json::<Intent>(detections, &store::intent_key(campaign_id))
        .await
        .map_err(|source| ContainmentError::Intent {
            campaign: campaign_id.to_string(),
            source,
        })?
        .map(|(i, _)| i);
    let ids = status.spec.selector.ids.clone();
    let mut claims: HashMap<String, Claim> = HashMap::new();
    let fetched = futures::stream::iter(ids.iter().cloned().map(|id| {
        let kv = detections.clone();
        async move {
            (
                store::get_json::<Claim>(&kv, &store::claim_key(&id)).await,
                id,
            )
        }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await;
    for (r, id) in fetched {
        let claim = r.map_err(|source| ContainmentError::Claim {
            credential: id.clone(),
            source,
        })?;
        if let Some((c, _)) = claim {
            if c.campaign_id == campaign_id {
                claims.insert(id, c);
            }
        }
    }
    let results = results(js, campaign_id).await?;
    let mut timelines = Vec::with_capacity(ids.len());
    for id in &ids {
        let claim = claims.get(id);
        let received = claim
            .map(|c| c.received_at_ms)
            .or(intent.as_ref().map(|i| i.created_at_ms));
        let result = results.get(id);
        let published = result
            .and_then(|r| status.waves.get(r.wave as usize))
            .and_then(|w| w.started_at_ms);
        let (contained_at, st) = match result {
            None => (None, "pending".to_string()),
            Some(r) if r.outcome == Outcome::Succeeded && r.old_rejected == Some(true) => {
                (Some(r.finished_at_ms), "contained".to_string())
            }
            Some(r) if r.outcome == Outcome::Succeeded => (None, "rotated_unverified".to_string()),
            Some(r) => (
                None,
                format!(
                    "failed: {}",
                    r.error_class.map(|c| c.as_str()).unwrap_or("unknown")
                ),
            ),
        };
        timelines.push(CredentialTimeline {
            credential_id: id.clone(),
            detected_at_ms: claim.map(|c| c.detected_at_ms),
            received_at_ms: received,
            published_at_ms: published,
            contained_at_ms: contained_at,
            time_to_contain_ms: contained_at.zip(received).map(|(c, r)| c.saturating_sub(r)),
            status: st,
        });
    }
    let ttc = Distribution::of(
        timelines
            .iter()
            .filter_map(|t| t.time_to_contain_ms)
            .collect(),
    );
    let ttp = Distribution::of(
        timelines
            .iter()
            .filter_map(|t| {
                t.published_at_ms
                    .zip(t.received_at_ms)
                    .map(|(p, r)| p.saturating_sub(r))
            })
            .collect(),
    );
    let exposed: Vec<String> = timelines
        .iter()
        .filter(|t| t.contained_at_ms.is_none())
        .map(|t| t.credential_id.clone())
        .collect();
    Ok(ContainmentReport {
        campaign_id: campaign_id.to_string(),
        state: status.state,
        credentials: ids.len() as u64,
        contained: ttc.count,
        time_to_contain: ttc,
        time_to_publish: ttp,
        exposed,
        timelines,
    })
}

/// The last rotate result per credential of the campaign.
async fn results(
    js: &Context,
    cid: &str,
) -> Result<HashMap<String, RotationResult>, StreamReadError> {
    let mut out = HashMap::new();
    topology::read_all(
        js,
        STREAM_RESULTS,
        subjects::result_campaign_filter(cid),
        RESULTS_IDLE,
        |m| {
            if let Ok(r) = codec::decode::<RotationResult>(m.headers.as_ref(), &m.payload) {
                if r.action == TaskAction::Rotate {
                    out.insert(r.credential_id.clone(), r);
                }
            }
        },
    )
    .await?;
    Ok(out)
}

impl ContainmentReport {
    /// The report for people.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let ms = |v: u64| format!("{:.3}s", v as f64 / 1000.0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "containment campaign {}: {} · {}/{} credentials contained (old secret proven rejected)",
            self.campaign_id, self.state, self.contained, self.credentials
        );
        let d = &self.time_to_contain;
        if d.count > 0 {
            let _ = writeln!(
                out,
                "  time to contain (detection received → old secret rejected): p50 {} · p95 {} · p99 {} · max {}",
                ms(d.p50_ms),
                ms(d.p95_ms),
                ms(d.p99_ms),
                ms(d.max_ms)
            );
        }
        let p = &self.time_to_publish;
        if p.count > 0 {
            let _ = writeln!(
                out,
                "  time to publish (detection received → task published):   p50 {} · p95 {} · max {}",
                ms(p.p50_ms),
                ms(p.p95_ms),
                ms(p.max_ms)
            );
        }
        if self.exposed.is_empty() {
            let _ = writeln!(out, "  no credential is still exposed");
        } else {
            let _ = writeln!(out, "  STILL EXPOSED ({}):", self.exposed.len());
            for t in self
                .timelines
                .iter()
                .filter(|t| t.contained_at_ms.is_none())
            {
                let _ = writeln!(out, "    {} ({})", t.credential_id, t.status);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let d = Distribution::of((1..=100).collect());
        assert_eq!((d.p50_ms, d.p95_ms, d.p99_ms, d.max_ms), (50, 95, 99, 100));
        let one = Distribution::of(vec![7]);
        assert_eq!((one.p50_ms, one.max_ms, one.count), (7, 7, 1));
        assert_eq!(Distribution::of(vec![]).count, 0);
    }
}
