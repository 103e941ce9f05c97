//! Versioned message types on the bus and in the KV buckets. Every top-level
//! message carries `v` ([`SCHEMA_VERSION`]); decoders refuse other versions
//! with a typed error (see [`crate::codec`]). No type here ever holds a secret:
//! results and events carry fingerprints only.

use serde::{Deserialize, Serialize};
use std::fmt;
use thiserror::Error;

/// The schema version every message written by this build carries.
pub const SCHEMA_VERSION: u16 = 1;

/// Messages that carry a schema version.
pub trait Versioned {
    fn version(&self) -> u16;
}

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn version(&self) -> u16 { self.v }
        }
    )*};
}
versioned!(
    RotationTask,
    RotationResult,
    CampaignSpec,
    CampaignEvent,
    Credential,
    Attestation,
    AgentStatus
);

/// A word that names none of the values a setting accepts (a strategy, a
/// target kind, a log format, ...). Shared by the `FromStr` impls of the
/// closed sets of names keywave reads from flags and files.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("unknown {what} {value:?} (expected {expected})")]
pub struct UnknownName {
    /// What was being named, e.g. `strategy`.
    pub what: &'static str,
    /// The word given.
    pub value: String,
    /// The accepted words, for people, e.g. `continuity or containment`.
    pub expected: &'static str,
}

impl UnknownName {
    pub fn new(what: &'static str, value: &str, expected: &'static str) -> Self {
        UnknownName {
            what,
            value: value.to_string(),
            expected,
        }
    }
}

/// How a credential is rotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// The old secret stays valid until consumers moved, then it is revoked.
    Continuity,
    /// A leak: the old secret is invalidated first. Never rolled back.
    Containment,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Continuity => "continuity",
            Strategy::Containment => "containment",
        })
    }
}

impl std::str::FromStr for Strategy {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "continuity" => Ok(Strategy::Continuity),
            "containment" => Ok(Strategy::Containment),
            o => Err(UnknownName::new("strategy", o, "continuity or containment")),
        }
    }
}

/// The kind of system that holds a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// Redis ACL users (`ACL SETUSER`).
    Redis,
    /// The embedded simulated target (demos and benchmarks).
    Sim,
    /// PostgreSQL login roles.
    Postgres,
    /// MariaDB / MySQL users.
    Mysql,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Redis => "redis",
            TargetKind::Sim => "sim",
            TargetKind::Postgres => "postgres",
            TargetKind::Mysql => "mysql",
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TargetKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "redis" => Ok(TargetKind::Redis),
            "sim" => Ok(TargetKind::Sim),
            "postgres" => Ok(TargetKind::Postgres),
            "mysql" => Ok(TargetKind::Mysql),
            o => Err(UnknownName::new(
                "target kind",
                o,
                "redis, sim, postgres or mysql",
            )),
        }
    }
}

/// One credential in the inventory (KV bucket `keywave-inventory`, key = id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    #[serde(default = "schema_version")]
    pub v: u16,
    /// Unique id, `[A-Za-z0-9][A-Za-z0-9_-]*`.
    pub id: String,
    /// Region whose workers rotate it and whose store holds its secret.
    pub region: String,
    /// Name of the target endpoint in that region's worker configuration.
    pub endpoint: String,
    /// Kind of the target endpoint.
    pub kind: TargetKind,
    /// The login whose secret is rotated (role, user, ACL user).
    pub principal: String,
    /// Free-form labels, `key=value` or `label`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Who owns the credential (team, person, service).
    #[serde(default)]
    pub owner: Option<String>,
    /// The systems that use the secret, and how each is verified after a
    /// rotation (a bare id in JSON: verified by attestation).
    #[serde(default)]
    pub consumers: Vec<ConsumerRef>,
}

/// How keywave proves that a consumer uses a credential's new secret.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum VerifyKind {
    /// Wait for the consumer's agent to attest the new fingerprint on
    /// `keywave.attest.<region>.<credential>` (the default: fails closed).
    #[default]
    Attest,
    /// Probe `url` over HTTP: it must answer 2xx after the rotation.
    Http,
    /// Explicitly unverified: reported as such, never waited for.
    None,
}

impl VerifyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyKind::Attest => "attest",
            VerifyKind::Http => "http",
            VerifyKind::None => "none",
        }
    }
}

impl fmt::Display for VerifyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VerifyKind {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "attest" => Ok(VerifyKind::Attest),
            "http" => Ok(VerifyKind::Http),
            "none" => Ok(VerifyKind::None),
            o => Err(UnknownName::new("verification", o, "attest, http or none")),
        }
    }
}

/// A consumer of a credential as the credential's inventory record names it.
/// Written as a bare id when nothing else is set (the original form), else
/// as an object. Fields left unset come from the consumer's own record
/// (`keywave-consumers`), else the defaults (`attest`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsumerRef {
    pub id: String,
    /// What the consumer is (`app`, `ci`, `cron`, ...); free text.
    pub kind: Option<String>,
    pub verify: Option<VerifyKind>,
    /// `http` verification: the URL probed (must answer 2xx).
    pub url: Option<String>,
    /// Longest wait for this consumer's verification, in milliseconds.
    pub timeout_ms: Option<u64>,
}

impl ConsumerRef {
    /// Just an id (verification from its record, else `attest`).
    pub fn id(id: impl Into<String>) -> Self {
        ConsumerRef {
            id: id.into(),
            ..Default::default()
        }
    }

    fn is_bare(&self) -> bool {
        self.kind.is_none()
            && self.verify.is_none()
            && self.url.is_none()
            && self.timeout_ms.is_none()
    }
}

impl From<&str> for ConsumerRef {
    fn from(id: &str) -> Self {
        ConsumerRef::id(id)
    }
}

impl PartialEq<&str> for ConsumerRef {
    fn eq(&self, other: &&str) -> bool {
        self.is_bare() && self.id == *other
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerRefObject {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    verify: Option<VerifyKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
}

impl Serialize for ConsumerRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_bare() {
            return s.serialize_str(&self.id);
        }
        ConsumerRefObject {
            id: self.id.clone(),
            kind: self.kind.clone(),
            verify: self.verify,
            url: self.url.clone(),
            timeout_ms: self.timeout_ms,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ConsumerRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Id(String),
            Object(ConsumerRefObject),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::Id(id) => ConsumerRef::id(id),
            Raw::Object(o) => ConsumerRef {
                id: o.id,
                kind: o.kind,
                verify: o.verify,
                url: o.url,
                timeout_ms: o.timeout_ms,
            },
        })
    }
}

/// A consumer of a credential as a task carries it: resolved verification,
/// never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerCheck {
    pub id: String,
    #[serde(default)]
    pub verify: VerifyKind,
    /// `http`: the URL to probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Longest wait for this consumer, in milliseconds (bounded by the task's
    /// deadline); `None`: until shortly before the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// What became of one consumer's verification after a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerStatus {
    /// Proven to use the new secret (attested, or the probe answered 2xx).
    Verified,
    /// Not proven in time (no attestation of the new fingerprint, an
    /// unhealthy attestation, or the probe failed).
    Failed,
    /// Not checked: verification `none`, or not reached (the task failed
    /// before the consumers were checked).
    Unverified,
}

impl ConsumerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerStatus::Verified => "verified",
            ConsumerStatus::Failed => "failed",
            ConsumerStatus::Unverified => "unverified",
        }
    }
}

/// One consumer's verification in a [`RotationResult`]; no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerOutcome {
    pub id: String,
    pub verify: VerifyKind,
    pub status: ConsumerStatus,
    /// Why it failed (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the worker saw the proof (attestation or 2xx probe), ms since
    /// the epoch on the worker's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at_ms: Option<u64>,
    /// How long after the wait began (right after promote for continuity,
    /// after the old secret's revoke for containment) the proof came, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
}

/// A consumer agent's statement, on `keywave.attest.<region>.<credential>`
/// (stream `KEYWAVE_ATTEST`), that it now uses the secret with `fingerprint`
/// (the region-keyed fingerprint; never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestation {
    pub v: u16,
    pub consumer_id: String,
    pub region: String,
    pub credential_id: String,
    pub fingerprint: String,
    /// Whether the consumer's local health check passed with this secret
    /// (true when it has none).
    pub healthy: bool,
    pub at_ms: u64,
}

/// A consumer agent's answer to a liveness ping on
/// `keywave.agent.v1.<region>.<consumer>.ping` (JSON; see
/// [`crate::subjects::agent_ping`]): who answers, which build, what it
/// watches and how its health checks went. Never a secret, not even a
/// fingerprint. The coordinator asks before each wave (pre-flight).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub v: u16,
    pub consumer_id: String,
    pub region: String,
    /// The agent's build (the `keywave-worker` version).
    pub version: String,
    /// The credentials it writes for its application.
    pub credentials: Vec<AgentCredential>,
    /// No credential's last health check failed.
    pub healthy: bool,
    pub at_ms: u64,
}

/// One credential an agent watches, in an [`AgentStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCredential {
    pub id: String,
    /// The last health check with its CURRENT secret: passed (also when no
    /// health command is configured) or failed; absent while no secret has
    /// been written yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
}

fn schema_version() -> u16 {
    SCHEMA_VERSION
}

/// What a task asks a worker to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskAction {
    /// Run the rotation protocol.
    Rotate,
    /// Put the previous secret back (continuity only; containment refuses).
    Rollback,
}

/// A rotation or rollback task for one credential, published by the coordinator
/// on `keywave.task.<region>.<campaign>`. It names the credential and endpoint;
/// it never carries a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationTask {
    pub v: u16,
    /// Unique per (campaign, wave, action, credential); also the `Nats-Msg-Id`.
    pub task_id: String,
    pub campaign_id: String,
    pub wave: u32,
    /// Position of the credential inside its wave (used by the aggregator).
    pub index: u32,
    pub action: TaskAction,
    pub strategy: Strategy,
    pub credential_id: String,
    pub region: String,
    pub endpoint: String,
    pub kind: TargetKind,
    pub principal: String,
    pub issued_at_ms: u64,
    /// After this instant the task is failed instead of started. With
    /// `run_timeout_ms` 0 (tasks from older coordinators) it also bounds
    /// every step.
    pub deadline_ms: u64,
    /// How long the task may run once a worker has received it: each step
    /// must start before `received + run_timeout_ms`. Counted from receipt,
    /// not publication, so a large wave that drains slower than the task
    /// timeout does not fail its tail in the queue. 0: `deadline_ms` only.
    #[serde(default)]
    pub run_timeout_ms: u64,
    /// The credential's consumers and how each is verified; empty
    /// (and left out of the encoding) when it has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerCheck>,
}

impl RotationTask {
    /// The deterministic task id: a republished wave dedupes on it.
    pub fn make_id(campaign: &str, wave: u32, action: TaskAction, credential: &str) -> String {
        match action {
            TaskAction::Rotate => format!("{campaign}:w{wave}:{credential}"),
            TaskAction::Rollback => format!("{campaign}:rb{wave}:{credential}"),
        }
    }
}

/// The steps of the rotation protocol, in order. A result names the last step
/// that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Task accepted, nothing done yet.
    Received,
    /// New secret generated and stored as PENDING.
    Staged,
    /// New secret set at the target.
    Set,
    /// New secret authenticates at the target.
    Tested,
    /// PENDING promoted to CURRENT, old CURRENT kept as PREVIOUS.
    Promoted,
    /// Old secret removed at the target.
    Revoked,
    /// Old secret proven rejected by the target.
    Verified,
    /// Rollback: previous secret put back and proven to authenticate.
    Restored,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Received => "received",
            Step::Staged => "staged",
            Step::Set => "set",
            Step::Tested => "tested",
            Step::Promoted => "promoted",
            Step::Revoked => "revoked",
            Step::Verified => "verified",
            Step::Restored => "restored",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Rotated: new secret works, old secret rejected.
    Succeeded,
    /// The task failed; `error_class` says why.
    Failed,
    /// Rollback done: the previous secret authenticates again.
    RolledBack,
    /// Rollback refused (containment never restores an exposed secret).
    RollbackRefused,
}

/// Why a task failed, in terms an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The target could not be reached or timed out.
    TargetUnavailable,
    /// The target refused the admin operation (permissions, unknown principal).
    TargetRejected,
    /// The target could not be reached (connection refused or reset, server
    /// shutting down), after the worker's bounded retries.
    TargetUnreachable,
    /// A connection or an operation on the target timed out, after the
    /// worker's bounded retries.
    TargetTimeout,
    /// The target refused the endpoint's admin login (wrong admin password,
    /// no `pg_hba` entry): fix the worker configuration.
    TargetAuth,
    /// The admin login lacks a privilege the operation needs.
    TargetPermission,
    /// The new secret did not authenticate after being set.
    NewSecretRejected,
    /// The old secret still authenticates after revocation.
    OldSecretStillAccepted,
    /// The target let a random wrong secret in for the login (a Redis user
    /// with `nopass`, a `trust` rule in `pg_hba.conf`, an account without a
    /// password): nothing it answers proves anything, so nothing was set or
    /// recorded.
    TargetAcceptsAnySecret,
    /// The task names an endpoint this worker does not have.
    UnknownEndpoint,
    /// The endpoint exists but is of another kind than the task says.
    KindMismatch,
    /// The regional secret store failed or conflicted.
    Store,
    /// The task's deadline passed before it finished.
    DeadlineExceeded,
    /// A failure injected on purpose (sim target, fault points).
    Injected,
    /// Containment credentials are never restored to the exposed secret.
    RollbackRefused,
    /// Nothing to roll back to (no previous secret in the store).
    NoPrevious,
    /// The message could not be decoded.
    Malformed,
    /// No result arrived before the wave deadline (set by the coordinator).
    NoResult,
    /// A consumer did not move over to the new secret in time; the old
    /// secret was not revoked.
    ConsumerNotVerified,
    /// A bug or unexpected state.
    Internal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::TargetUnavailable => "target_unavailable",
            ErrorClass::TargetRejected => "target_rejected",
            ErrorClass::TargetUnreachable => "target_unreachable",
            ErrorClass::TargetTimeout => "target_timeout",
            ErrorClass::TargetAuth => "target_auth",
            ErrorClass::TargetPermission => "target_permission",
            ErrorClass::NewSecretRejected => "new_secret_rejected",
            ErrorClass::OldSecretStillAccepted => "old_secret_still_accepted",
            ErrorClass::TargetAcceptsAnySecret => "target_accepts_any_secret",
            ErrorClass::UnknownEndpoint => "unknown_endpoint",
            ErrorClass::KindMismatch => "kind_mismatch",
            ErrorClass::Store => "store",
            ErrorClass::DeadlineExceeded => "deadline_exceeded",
            ErrorClass::Injected => "injected",
            ErrorClass::RollbackRefused => "rollback_refused",
            ErrorClass::NoPrevious => "no_previous",
            ErrorClass::Malformed => "malformed",
            ErrorClass::NoResult => "no_result",
            ErrorClass::ConsumerNotVerified => "consumer_not_verified",
            ErrorClass::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Time spent in one step, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: Step,
    pub micros: u64,
}

/// The outcome of one task, published by a worker on
/// `keywave.result.<region>.<campaign>`. Carries fingerprints, never secrets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationResult {
    pub v: u16,
    pub task_id: String,
    pub campaign_id: String,
    pub wave: u32,
    pub index: u32,
    pub action: TaskAction,
    pub credential_id: String,
    pub region: String,
    pub outcome: Outcome,
    /// Last step that completed.
    pub step: Step,
    #[serde(default)]
    pub error_class: Option<ErrorClass>,
    /// Human-readable cause; never contains a secret.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub timings: Vec<StepTiming>,
    /// Fingerprint of the secret now CURRENT (after rotation or rollback).
    #[serde(default)]
    pub new_fingerprint: Option<String>,
    /// Fingerprint of the secret that was replaced.
    #[serde(default)]
    pub old_fingerprint: Option<String>,
    /// Whether the target rejected the old secret when checked (None: not checked,
    /// e.g. a first rotation with no known old secret).
    #[serde(default)]
    pub old_rejected: Option<bool>,
    pub worker_id: String,
    pub finished_at_ms: u64,
    /// Per-consumer verification (ids and status, no secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<ConsumerOutcome>,
}

/// A wave size: an absolute count or a percentage of the campaign's total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WaveSize {
    Count(u64),
    Percent(f64),
}

impl fmt::Display for WaveSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSize::Count(n) => write!(f, "{n}"),
            WaveSize::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A wave size that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WaveSizeError {
    #[error("bad wave percentage {value:?}")]
    BadPercent {
        value: String,
        #[source]
        source: std::num::ParseFloatError,
    },
    #[error("wave percentage {0:?} must be in (0, 100]")]
    PercentOutOfRange(String),
    #[error("bad wave size {value:?} (expected a count like 10 or a percentage like 10%)")]
    BadCount {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("wave size must be at least 1")]
    Zero,
}

impl std::str::FromStr for WaveSize {
    type Err = WaveSizeError;
    fn from_str(s: &str) -> Result<Self, WaveSizeError> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|source| WaveSizeError::BadPercent {
                    value: s.to_string(),
                    source,
                })?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(WaveSizeError::PercentOutOfRange(s.to_string()));
            }
            Ok(WaveSize::Percent(p))
        } else {
            let n: u64 = s.parse().map_err(|source| WaveSizeError::BadCount {
                value: s.to_string(),
                source,
            })?;
            if n == 0 {
                return Err(WaveSizeError::Zero);
            }
            Ok(WaveSize::Count(n))
        }
    }
}

impl Serialize for WaveSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string().parse().map_err(serde::de::Error::custom),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A wave plan that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WavePlanError {
    #[error(transparent)]
    Size(#[from] WaveSizeError),
    #[error("wave plan is empty")]
    Empty,
}

/// Parses a wave plan such as `1,10%,50%`.
pub fn parse_wave_plan(s: &str) -> Result<Vec<WaveSize>, WavePlanError> {
    let plan: Vec<WaveSize> = s.split(',').map(str::parse).collect::<Result<_, _>>()?;
    if plan.is_empty() {
        return Err(WavePlanError::Empty);
    }
    Ok(plan)
}

/// Which credentials a campaign covers. Empty lists match everything; a
/// credential must match every non-empty list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Exact credential ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Tags that must all be present (`key=value` or `label`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Regions (any of).
    #[serde(default)]
    pub regions: Vec<String>,
    /// Endpoint names (any of).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Target kinds (any of).
    #[serde(default)]
    pub kinds: Vec<TargetKind>,
}

impl Selector {
    pub fn matches(&self, c: &Credential) -> bool {
        (self.ids.is_empty() || self.ids.iter().any(|i| i == &c.id))
            && self.tags.iter().all(|t| c.tags.iter().any(|ct| ct == t))
            && (self.regions.is_empty() || self.regions.iter().any(|r| r == &c.region))
            && (self.endpoints.is_empty() || self.endpoints.iter().any(|e| e == &c.endpoint))
            && (self.kinds.is_empty() || self.kinds.contains(&c.kind))
    }

    /// Parses the CLI form: `id=a,b tag=env=prod region=eu,us endpoint=x kind=redis`,
    /// space- or `;`-separated clauses.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let mut sel = Selector::default();
        for clause in s.split([' ', ';']).filter(|c| !c.trim().is_empty()) {
            let (k, v) = clause
                .split_once('=')
                .ok_or_else(|| SelectorError::NotKeyValue(clause.to_string()))?;
            match k {
                "id" | "ids" => sel.ids.extend(v.split(',').map(String::from)),
                "tag" | "tags" => sel.tags.extend(v.split(',').map(String::from)),
                "region" | "regions" => sel.regions.extend(v.split(',').map(String::from)),
                "endpoint" | "endpoints" => sel.endpoints.extend(v.split(',').map(String::from)),
                "kind" | "kinds" => {
                    for k in v.split(',') {
                        sel.kinds.push(k.parse()?);
                    }
                }
                o => {
                    return Err(SelectorError::UnknownKey(UnknownName::new(
                        "selector key",
                        o,
                        "id, tag, region, endpoint or kind",
                    )))
                }
            }
        }
        Ok(sel)
    }
}

/// A `--selector` expression that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SelectorError {
    #[error("selector clause {0:?} is not key=value")]
    NotKeyValue(String),
    #[error(transparent)]
    UnknownKey(UnknownName),
    #[error(transparent)]
    Kind(#[from] UnknownName),
}

/// What to do when a wave exceeds its failure budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Send rollback tasks for the wave's succeeded credentials, then stop.
    Rollback,
    /// Stop and wait for an operator.
    Pause,
}

impl OnFailure {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Pause => "pause",
        }
    }
}

impl std::str::FromStr for OnFailure {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "rollback" => Ok(OnFailure::Rollback),
            "pause" => Ok(OnFailure::Pause),
            o => Err(UnknownName::new("on_failure", o, "rollback or pause")),
        }
    }
}

/// A campaign request: which credentials, how, and in which waves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignSpec {
    #[serde(default = "schema_version")]
    pub v: u16,
    /// Short human name ("post-leak reset 2026-11").
    #[serde(default)]
    pub name: String,
    /// Why the campaign runs (ticket, incident).
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub selector: Selector,
    pub strategy: Strategy,
    /// Wave sizes; the last entry repeats until every credential is covered.
    pub waves: Vec<WaveSize>,
    /// Fraction of a wave allowed to fail (0.0..=1.0); the wave fails when
    /// failed / size is strictly greater.
    pub failure_budget: f64,
    /// Pause between a successful wave and the next one, in milliseconds.
    #[serde(default)]
    pub bake_ms: u64,
    pub on_failure: OnFailure,
    /// How long a task may take before it counts as failed, in milliseconds.
    pub task_timeout_ms: u64,
    /// Waves (numbered from 0) that wait for a human approval
    /// (`keywave campaign approve`) before they start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approve_before_waves: Vec<u32>,
    /// Pre-flight: before each wave, ask the agent of every
    /// `attest` consumer of the wave's credentials whether it is alive; when
    /// more than `preflight_max_unreachable` of them do not answer, the wave
    /// does not start and the campaign pauses. Unset in a request: on when
    /// the plan has `attest` consumers (the coordinator records the choice
    /// in the campaign); unset in a stored campaign (started before
    /// pre-flight existed): off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<bool>,
    /// Fraction of the asked agents that may be unreachable (0..=1): the
    /// pre-flight fails when unreachable / asked is strictly greater. 0 (the
    /// default): every agent must answer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub preflight_max_unreachable: f64,
    /// Who asked for the campaign, as the client stated it (`keywave
    /// campaign start --by`, default the local user name; `detection
    /// intake` for containment started by a detection). Recorded in the
    /// `created` event, hence in the audit chain, and shown in reports. Not
    /// authenticated by keywave: which NATS identity may start campaigns is
    /// the permission that holds (the `operator` user of
    /// `deploy/nats-secure.conf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// A campaign spec field that does not validate; `field` names it as the
/// spec spells it (`failure_budget`, `waves`, ...).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: &'static str,
    #[source]
    pub problem: SpecProblem,
}

/// What is wrong with a campaign spec field.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpecProblem {
    #[error("unsupported schema version {0}")]
    Version(u16),
    #[error("at least one wave size is required")]
    NoWaves,
    #[error("must be between 0 and 1")]
    NotAFraction,
    #[error("must be positive")]
    NotPositive,
    #[error(transparent)]
    BadRegion(#[from] crate::ids::IdError),
    #[error("at most 1000 approval gates")]
    TooManyGates,
    #[error("1 to 128 characters, no control characters")]
    BadRequester,
}

impl CampaignSpec {
    /// Checks the fields the coordinator relies on; names the bad one.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &'static str, problem: SpecProblem| Err(SpecError { field, problem });
        if self.v != SCHEMA_VERSION {
            return bad("v", SpecProblem::Version(self.v));
        }
        if self.waves.is_empty() {
            return bad("waves", SpecProblem::NoWaves);
        }
        if !(0.0..=1.0).contains(&self.failure_budget) {
            return bad("failure_budget", SpecProblem::NotAFraction);
        }
        if self.task_timeout_ms == 0 {
            return bad("task_timeout_ms", SpecProblem::NotPositive);
        }
        for r in &self.selector.regions {
            if let Err(e) = crate::ids::validate("region", r) {
                return bad("selector.regions", e.into());
            }
        }
        if self.approve_before_waves.len() > 1_000 {
            return bad("approve_before_waves", SpecProblem::TooManyGates);
        }
        if !(0.0..=1.0).contains(&self.preflight_max_unreachable) {
            return bad("preflight_max_unreachable", SpecProblem::NotAFraction);
        }
        if let Some(by) = &self.requested_by {
            if by.trim().is_empty() || by.chars().count() > 128 || by.chars().any(char::is_control)
            {
                return bad("requested_by", SpecProblem::BadRequester);
            }
        }
        Ok(())
    }
}

/// Lifecycle of a campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    Running,
    Baking,
    Paused,
    /// Waiting for `keywave campaign approve` before the current wave starts.
    AwaitingApproval,
    RollingBack,
    RolledBack,
    Completed,
    Aborted,
}

impl CampaignState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            CampaignState::RolledBack | CampaignState::Completed | CampaignState::Aborted
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Running => "running",
            CampaignState::Baking => "baking",
            CampaignState::Paused => "paused",
            CampaignState::AwaitingApproval => "awaiting_approval",
            CampaignState::RollingBack => "rolling_back",
            CampaignState::RolledBack => "rolled_back",
            CampaignState::Completed => "completed",
            CampaignState::Aborted => "aborted",
        }
    }
}

impl fmt::Display for CampaignState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The coordinator's decision after a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    NextWave,
    Complete,
    Pause,
    Rollback,
}

impl Decision {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::NextWave => "next_wave",
            Decision::Complete => "complete",
            Decision::Pause => "pause",
            Decision::Rollback => "rollback",
        }
    }
}

/// Per-class failure counts.
pub type FailureCounts = std::collections::BTreeMap<String, u64>;

/// Something that happened to a campaign, on `keywave.event.<campaign>.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignEvent {
    pub v: u16,
    pub campaign_id: String,
    pub at_ms: u64,
    pub kind: EventKind,
}

// `Created` carries the whole spec; events are few and short-lived.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    Created {
        spec: CampaignSpec,
        total: u64,
        wave_sizes: Vec<u64>,
    },
    WaveStarted {
        wave: u32,
        size: u64,
    },
    WaveFinished {
        wave: u32,
        size: u64,
        succeeded: u64,
        failed: u64,
        no_result: u64,
        failures: FailureCounts,
    },
    Decision {
        wave: u32,
        decision: Decision,
        reason: String,
    },
    RollbackStarted {
        wave: u32,
        tasks: u64,
    },
    RollbackRefused {
        wave: u32,
        credentials: u64,
        reason: String,
    },
    RollbackFinished {
        wave: u32,
        restored: u64,
        refused: u64,
        failed: u64,
    },
    StateChanged {
        state: CampaignState,
        reason: String,
    },
    /// The campaign reached a wave that needs a human approval.
    ApprovalRequired {
        wave: u32,
        size: u64,
    },
    /// A human approved the wave (`keywave campaign approve`).
    Approved {
        wave: u32,
        by: String,
    },
    DeadLetter {
        region: String,
        task_id: Option<String>,
        reason: String,
    },
    /// The pre-flight check before a wave (see `CampaignSpec::preflight`):
    /// `asked` agents of the wave's `attest` consumers were pinged and
    /// `unreachable` did not answer in time. `passed`: within the campaign's
    /// threshold. A failed pre-flight pauses a continuity campaign before
    /// the wave (a resumed campaign checks again); containment records it
    /// and goes on. Lists name at most [`PREFLIGHT_MAX_NAMED`] agents each.
    Preflight {
        wave: u32,
        asked: u64,
        unreachable: u64,
        passed: bool,
        reason: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unreachable_agents: Vec<PreflightAgent>,
        /// Agents that answered with a failing health check (not counted
        /// against the threshold).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unhealthy_agents: Vec<PreflightAgent>,
        /// Agents that answered but do not watch a credential of the wave
        /// that lists them as a consumer: they would never attest it (not
        /// counted against the threshold; the rotation fails
        /// `consumer_not_verified`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        not_watching: Vec<PreflightAgent>,
    },
}

/// Most agents a [`EventKind::Preflight`] names per list.
pub const PREFLIGHT_MAX_NAMED: usize = 20;

/// An agent named in a [`EventKind::Preflight`] event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightAgent {
    pub consumer: String,
    pub region: String,
    /// `not_watching`: the credential it does not watch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// `unreachable`: why (no agent listening, no answer in time, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl fmt::Display for PreflightAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}", self.consumer, self.region)
    }
}

impl EventKind {
    /// The last subject token of the event.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Created { .. } => "created",
            EventKind::WaveStarted { .. } => "wave_started",
            EventKind::WaveFinished { .. } => "wave_finished",
            EventKind::Decision { .. } => "decision",
            EventKind::RollbackStarted { .. } => "rollback_started",
            EventKind::RollbackRefused { .. } => "rollback_refused",
            EventKind::RollbackFinished { .. } => "rollback_finished",
            EventKind::StateChanged { .. } => "state_changed",
            EventKind::ApprovalRequired { .. } => "approval_required",
            EventKind::Approved { .. } => "approved",
            EventKind::DeadLetter { .. } => "dead_letter",
            EventKind::Preflight { .. } => "preflight",
        }
    }
}

/// A record on the dead-letter stream: what arrived and why it was refused.
/// The original payload is kept (base64) only up to a bound; tasks never carry
/// secrets, so keeping it is safe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u16,
    pub region: String,
    pub subject: String,
    pub reason: String,
    pub task_id: Option<String>,
    pub campaign_id: Option<String>,
    pub payload_len: usize,
    pub payload_b64: String,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wave_plan_parses() {
        assert_eq!(
            parse_wave_plan("1,10%,50%").unwrap(),
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(50.0)
            ]
        );
        assert!(parse_wave_plan("0").is_err());
        assert!(parse_wave_plan("150%").is_err());
        assert!(parse_wave_plan("x").is_err());
    }

    #[test]
    fn parse_errors_name_the_bad_word() {
        assert_eq!(
            "x".parse::<Strategy>().unwrap_err().to_string(),
            "unknown strategy \"x\" (expected continuity or containment)"
        );
        assert_eq!(
            "oracle".parse::<TargetKind>().unwrap_err().to_string(),
            "unknown target kind \"oracle\" (expected redis, sim, postgres or mysql)"
        );
        assert_eq!(
            parse_wave_plan("1,0").unwrap_err(),
            WavePlanError::Size(WaveSizeError::Zero)
        );
        let e = parse_wave_plan("x").unwrap_err();
        assert!(std::error::Error::source(&e).is_some(), "{e}");
        assert_eq!(
            Selector::parse("kind=oracle").unwrap_err(),
            SelectorError::Kind(UnknownName::new(
                "target kind",
                "oracle",
                "redis, sim, postgres or mysql"
            ))
        );
        assert_eq!(
            Selector::parse("color=red").unwrap_err().to_string(),
            "unknown selector key \"color\" (expected id, tag, region, endpoint or kind)"
        );
    }

    #[test]
    fn preflight_fields_are_optional_and_checked() {
        let text = r#"{"strategy":"continuity","waves":[1],"failure_budget":0.1,
            "on_failure":"pause","task_timeout_ms":1000}"#;
        let mut spec: CampaignSpec = serde_json::from_str(text).unwrap();
        assert_eq!(spec.preflight, None);
        assert_eq!(spec.preflight_max_unreachable, 0.0);
        // Left out when unset: older readers see the spec they know.
        let json = serde_json::to_string(&spec).unwrap();
        assert!(!json.contains("preflight"), "{json}");
        spec.preflight = Some(true);
        spec.preflight_max_unreachable = 0.5;
        let back: CampaignSpec =
            serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        assert!(spec.validate().is_ok());
        for bad in [-0.1, 1.5, f64::NAN] {
            spec.preflight_max_unreachable = bad;
            let e = spec.validate().unwrap_err();
            assert_eq!(e.field, "preflight_max_unreachable", "{e}");
            assert!(
                e.to_string().starts_with("preflight_max_unreachable: "),
                "{e}"
            );
        }
    }

    #[test]
    fn agent_status_round_trips_in_both_formats() {
        let s = AgentStatus {
            v: SCHEMA_VERSION,
            consumer_id: "orders-api".into(),
            region: "eu".into(),
            version: "0.1.0".into(),
            credentials: vec![
                AgentCredential {
                    id: "db-orders".into(),
                    healthy: Some(true),
                },
                AgentCredential {
                    id: "cache".into(),
                    healthy: None,
                },
            ],
            healthy: true,
            at_ms: 1,
        };
        for f in [crate::codec::Format::Json, crate::codec::Format::MsgPack] {
            let body = crate::codec::encode(f, &s).unwrap();
            let h = crate::codec::headers(f, "x");
            let back: AgentStatus = crate::codec::decode(Some(&h), &body).unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn selector_parses_and_matches() {
        let sel = Selector::parse("region=eu,us tag=env=prod kind=redis").unwrap();
        let mut c = Credential {
            v: 1,
            id: "a".into(),
            region: "eu".into(),
            endpoint: "r1".into(),
            kind: TargetKind::Redis,
            principal: "app".into(),
            tags: vec!["env=prod".into(), "team=x".into()],
            owner: None,
            consumers: vec![],
        };
        assert!(sel.matches(&c));
        c.region = "ap".into();
        assert!(!sel.matches(&c));
        assert!(Selector::parse("color=red").is_err());
    }
}
