//! The workers' admin service: request/reply on
//! `keywave.admin.v1.<region>.<verb>` (see [`crate::subjects::admin`]),
//! answered by one worker of the region (queue group [`QUEUE_GROUP`]), since
//! only a region's workers hold its key and reach its targets. Bodies are
//! JSON; every reply is an [`ApiReply`](crate::api::ApiReply). Nothing here
//! ever carries a secret: secrets are named by their keyed fingerprints.
//!
//! | verb | request | reply data |
//! |---|---|---|
//! | `reconcile` | [`ReconcileRequest`] (at most [`MAX_BATCH`] credentials) | [`ReconcileReply`] |
//! | `discover` | [`DiscoverRequest`] | [`DiscoverReply`] |

use crate::wire::TargetKind;
use serde::{Deserialize, Serialize};

/// Verbs of the admin service (the subject suffix after `keywave.admin.v1.<region>.`).
pub mod verbs {
    pub const RECONCILE: &str = "reconcile";
    pub const DISCOVER: &str = "discover";
}

/// The queue group every worker's admin subscription joins: one worker of
/// the region answers each request.
pub const QUEUE_GROUP: &str = "keywave-worker-admin";

/// Most credentials in one `reconcile` request; the CLI sends chunks.
pub const MAX_BATCH: usize = 200;

/// Most logins one `discover` reply lists (proposed and excluded together).
pub const MAX_DISCOVERED: usize = 10_000;

/// Default of `stale_after_ms`: a staged secret (or an unfinished revoke)
/// older than this is treated as abandoned whatever its campaign says.
pub const DEFAULT_STALE_AFTER_MS: u64 = 15 * 60 * 1000;

/// Added to a campaign's task timeout when deciding whether one of its tasks
/// may still act: past its deadline a task starts no new step, but the step
/// in hand may still finish (two target operations of at most 15 s each and
/// a store write).
pub const IN_FLIGHT_MARGIN_MS: u64 = 35_000;

/// Error classes of admin replies (besides those of [`crate::api`]).
pub mod errors {
    pub const BAD_REQUEST: &str = "bad_request";
    /// The endpoint is not in the answering worker's configuration.
    pub const UNKNOWN_ENDPOINT: &str = "unknown_endpoint";
    /// The endpoint's target cannot do this (e.g. discovery on `sim`).
    pub const UNSUPPORTED: &str = "unsupported";
    /// The target could not be reached.
    pub const TARGET_UNAVAILABLE: &str = "target_unavailable";
    /// The target refused (permissions, ...).
    pub const TARGET_REJECTED: &str = "target_rejected";
    pub const INTERNAL: &str = "internal";
}

/// One credential to reconcile, as the inventory names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileItem {
    pub id: String,
    pub endpoint: String,
    pub kind: TargetKind,
    pub principal: String,
}

/// `reconcile`: compare the region's store with what the targets accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileRequest {
    /// Repair what can be repaired safely; otherwise only say what would be done.
    #[serde(default)]
    pub repair: bool,
    /// See [`DEFAULT_STALE_AFTER_MS`].
    #[serde(default = "default_stale_after")]
    pub stale_after_ms: u64,
    pub credentials: Vec<ReconcileItem>,
}

fn default_stale_after() -> u64 {
    DEFAULT_STALE_AFTER_MS
}

/// The verdict on one credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileStatus {
    /// The store and the target agree: CURRENT logs in, PREVIOUS does not,
    /// nothing is staged.
    Consistent,
    /// Something was out of line and has been repaired (`--repair`).
    Repaired,
    /// Something is out of line and `--repair` would repair it.
    WouldRepair,
    /// A task on this credential may still be running: left alone.
    InFlight,
    /// Out of line in a way keywave does not repair on its own.
    NeedsAttention,
    /// The target (or the region's workers) could not be reached.
    Unreachable,
}

impl ReconcileStatus {
    pub const ALL: [ReconcileStatus; 6] = [
        ReconcileStatus::Consistent,
        ReconcileStatus::Repaired,
        ReconcileStatus::WouldRepair,
        ReconcileStatus::InFlight,
        ReconcileStatus::NeedsAttention,
        ReconcileStatus::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileStatus::Consistent => "consistent",
            ReconcileStatus::Repaired => "repaired",
            ReconcileStatus::WouldRepair => "would_repair",
            ReconcileStatus::InFlight => "in_flight",
            ReconcileStatus::NeedsAttention => "needs_attention",
            ReconcileStatus::Unreachable => "unreachable",
        }
    }
}

impl std::fmt::Display for ReconcileStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which stored version a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Current,
    Previous,
    Pending,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Current => "CURRENT",
            Stage::Previous => "PREVIOUS",
            Stage::Pending => "PENDING",
        }
    }
}

/// What a login attempt with a stored secret gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    Accepted,
    Rejected,
    /// The attempt failed (see the report's findings).
    Error,
    /// Not attempted (a task is in flight, or nothing to compare).
    NotChecked,
}

impl Observed {
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Accepted => "accepted",
            Observed::Rejected => "rejected",
            Observed::Error => "error",
            Observed::NotChecked => "not checked",
        }
    }
}

/// One stored secret tried at the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretCheck {
    pub stage: Stage,
    /// Keyed fingerprint of the secret (never the secret).
    pub fingerprint: String,
    pub observed: Observed,
    /// Milliseconds since the version entered its stage.
    #[serde(default)]
    pub age_ms: u64,
    /// The task that staged it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

/// The report on one credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialReport {
    pub id: String,
    pub region: String,
    pub endpoint: String,
    pub principal: String,
    pub status: ReconcileStatus,
    /// What was tried at the target.
    #[serde(default)]
    pub checks: Vec<SecretCheck>,
    /// What is out of line, in words (never a secret).
    #[serde(default)]
    pub findings: Vec<String>,
    /// What was done (`repaired`) or would be done (`would_repair`).
    #[serde(default)]
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReply {
    pub region: String,
    pub worker_id: String,
    pub reports: Vec<CredentialReport>,
}

/// `discover`: the logins an endpoint has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverRequest {
    pub endpoint: String,
    /// Glob on the login name (`*`, `?`), e.g. `app_*`; all when absent.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Propose privileged logins too (superusers, replication, the admin login).
    #[serde(default)]
    pub include_privileged: bool,
}

/// A login found at the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundLogin {
    /// The principal as the inventory names it (MariaDB: `user` for the
    /// endpoint's account host, else `user@host`).
    pub principal: String,
    /// Why it is privileged (empty: it is not).
    #[serde(default)]
    pub privileged: Vec<String>,
    /// Why it is never proposed whatever the flags (e.g. the clone login of
    /// an alternating pair: its primary is the principal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub never: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoverReply {
    pub region: String,
    pub worker_id: String,
    pub endpoint: String,
    pub kind: TargetKind,
    /// Logins matching the pattern that may become inventory records.
    pub proposed: Vec<FoundLogin>,
    /// Logins matching the pattern that are left out, with their reasons.
    pub excluded: Vec<FoundLogin>,
    /// More logins matched than [`MAX_DISCOVERED`].
    #[serde(default)]
    pub truncated: bool,
}

/// Whether `name` matches the glob `pattern`: `*` matches any run of
/// characters (also none), `?` exactly one; everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and the name position it is matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == n[ni])) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last `*` swallow one more character.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("app_*", "app_orders"));
        assert!(glob_match("app_*", "app_"));
        assert!(!glob_match("app_*", "ap_orders"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*_ro", "billing_ro"));
        assert!(!glob_match("*_ro", "billing_rw"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("a*b*c", "abbbc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
        assert!(glob_match("é*", "éa"));
    }

    #[test]
    fn requests_default_and_round_trip() {
        let r: ReconcileRequest = serde_json::from_str(r#"{"credentials":[]}"#).unwrap();
        assert!(!r.repair);
        assert_eq!(r.stale_after_ms, DEFAULT_STALE_AFTER_MS);
        let s = serde_json::to_string(&ReconcileStatus::WouldRepair).unwrap();
        assert_eq!(s, "\"would_repair\"");
        for st in ReconcileStatus::ALL {
            let j = serde_json::to_string(&st).unwrap();
            assert_eq!(j, format!("\"{}\"", st.as_str()));
        }
    }
}
