//! The systems whose credentials keywave rotates. A [`Target`] knows how to
//! add, replace and remove a principal's secret and how to attempt a real
//! login with one; [`Targets`] maps the endpoint names used by the inventory to
//! targets and bounds the concurrent operations per endpoint.
//!
//! Error messages never carry a secret: drivers redact anything the server
//! echoes back.

pub mod db;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sim;

use async_trait::async_trait;
use keywave_common::crypto::{Secret, SecretPolicy};
use keywave_common::wire::{ErrorClass, TargetKind};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Semaphore;

/// Upper bound on one target operation; past it the operation counts as
/// [`TargetError::Unavailable`] (and is retried by the protocol).
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

/// The answer of a real authentication attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCheck {
    Accepted,
    Rejected,
}

/// Why a target operation failed. Messages never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TargetError {
    /// The target is busy or loading (too many connections, a deadlock):
    /// worth retrying.
    #[error("target unavailable: {0}")]
    Unavailable(String),
    /// The target could not be reached (connection refused or reset, server
    /// shutting down): worth retrying.
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// Connecting or an operation timed out: worth retrying.
    #[error("target timed out: {0}")]
    Timeout(String),
    /// The target refused the endpoint's admin login: not retried.
    #[error("target refused the admin login: {0}")]
    Auth(String),
    /// The admin login lacks a privilege: not retried.
    #[error("permission denied on the target: {0}")]
    Permission(String),
    /// The target refused the operation (permissions, bad principal): not retried.
    #[error("target rejected the operation: {0}")]
    Rejected(String),
    /// A failure injected on purpose (sim `fail_rate`).
    #[error("injected failure")]
    Injected,
    /// The driver met a state it does not understand.
    #[error("target driver error: {0}")]
    Internal(String),
}

impl TargetError {
    /// The class reported in results.
    pub fn class(&self) -> ErrorClass {
        match self {
            TargetError::Unavailable(_) => ErrorClass::TargetUnavailable,
            TargetError::Unreachable(_) => ErrorClass::TargetUnreachable,
            TargetError::Timeout(_) => ErrorClass::TargetTimeout,
            TargetError::Auth(_) => ErrorClass::TargetAuth,
            TargetError::Permission(_) => ErrorClass::TargetPermission,
            TargetError::Rejected(_) => ErrorClass::TargetRejected,
            TargetError::Injected => ErrorClass::Injected,
            TargetError::Internal(_) => ErrorClass::Internal,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TargetError::Unavailable(_) | TargetError::Unreachable(_) | TargetError::Timeout(_)
        )
    }

    /// The message without the variant's prefix (empty for `Injected`).
    pub fn detail(&self) -> &str {
        match self {
            TargetError::Unavailable(m)
            | TargetError::Unreachable(m)
            | TargetError::Timeout(m)
            | TargetError::Auth(m)
            | TargetError::Permission(m)
            | TargetError::Rejected(m)
            | TargetError::Internal(m) => m,
            TargetError::Injected => "",
        }
    }

    /// The same class with `f` applied to the message (for redaction).
    pub fn map_detail(self, f: impl FnOnce(&str) -> String) -> TargetError {
        match self {
            TargetError::Unavailable(m) => TargetError::Unavailable(f(&m)),
            TargetError::Unreachable(m) => TargetError::Unreachable(f(&m)),
            TargetError::Timeout(m) => TargetError::Timeout(f(&m)),
            TargetError::Auth(m) => TargetError::Auth(f(&m)),
            TargetError::Permission(m) => TargetError::Permission(f(&m)),
            TargetError::Rejected(m) => TargetError::Rejected(f(&m)),
            TargetError::Internal(m) => TargetError::Internal(f(&m)),
            TargetError::Injected => TargetError::Injected,
        }
    }
}

/// A credential system. Every operation is idempotent: the protocol may
/// repeat any of them after a crash.
#[async_trait]
pub trait Target: Send + Sync {
    fn kind(&self) -> TargetKind;
    /// What a generated secret must look like for this target.
    fn policy(&self) -> SecretPolicy;
    /// Makes `new` valid in addition to the secrets already valid (continuity).
    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError>;
    /// Makes `new` the only valid secret (containment, revoke-all, rollback).
    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError>;
    /// Makes `old` invalid; `Ok` if it already was not valid.
    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError>;
    /// A real authentication attempt with `secret`.
    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError>;
    /// Which login `secret` opens for `principal`: the principal itself, or
    /// for alternating users whichever login of the pair holds it (what a
    /// consumer must connect as); `None` when it opens none. One real login
    /// per candidate. The default asks [`Target::check`].
    async fn placement(
        &self,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<String>, TargetError> {
        Ok(match self.check(principal, secret).await? {
            AuthCheck::Accepted => Some(principal.to_string()),
            AuthCheck::Rejected => None,
        })
    }
    /// The logins this endpoint has, for `keywave inventory discover`, with
    /// why each is privileged. Read-only. Targets that cannot list their
    /// logins keep this default, which says so.
    async fn discover(&self) -> Result<Vec<Login>, TargetError> {
        Err(TargetError::Rejected(format!(
            "discovery is not supported for {} endpoints",
            self.kind()
        )))
    }
}

/// A login found at an endpoint by [`Target::discover`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Login {
    /// The principal as the inventory names it.
    pub principal: String,
    /// Why it is privileged (superuser, replication, the endpoint's admin
    /// login, ...); empty when it is not.
    pub privileged: Vec<String>,
    /// Why it must never become a credential of its own, whatever the
    /// flags (e.g. the clone login of an alternating pair).
    pub never: Option<String>,
}

/// A rate limit on the rotations started against one endpoint: each start
/// (`add` or `replace`, retries included) reserves the next free slot, one
/// every `1 / per_second` seconds, and waits for it. No burst: a campaign
/// ramps up at the configured rate from its first task.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl RateLimit {
    /// `None` unless `per_second` is finite and positive.
    pub fn new(per_second: f64) -> Option<RateLimit> {
        if !per_second.is_finite() || per_second <= 0.0 {
            return None;
        }
        Some(RateLimit {
            interval: Duration::from_secs_f64(1.0 / per_second),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        })
    }

    /// Waits for this caller's slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// One configured endpoint: a target plus the semaphore that bounds the
/// operations running against it at once and the optional rate limit on
/// rotations. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    name: Arc<str>,
    target: Arc<dyn Target>,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    rate: Option<Arc<RateLimit>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("kind", &self.target.kind())
            .field("max_concurrency", &self.max_concurrency)
            .finish()
    }
}

impl Endpoint {
    /// `target` under `name`: at most `max_concurrency` operations against
    /// it at once (one at least), and at most `max_rotations_per_second`
    /// rotations started per second (`None`, zero or negative: no limit).
    pub fn new(
        name: &str,
        target: Arc<dyn Target>,
        max_concurrency: usize,
        max_rotations_per_second: Option<f64>,
    ) -> Endpoint {
        let max_concurrency = max_concurrency.max(1);
        Endpoint {
            name: Arc::from(name),
            target,
            permits: Arc::new(Semaphore::new(max_concurrency)),
            max_concurrency,
            rate: max_rotations_per_second
                .and_then(RateLimit::new)
                .map(Arc::new),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn kind(&self) -> TargetKind {
        self.target.kind()
    }
    pub fn policy(&self) -> SecretPolicy {
        self.target.policy()
    }
    pub fn max_concurrency(&self) -> usize {
        self.max_concurrency
    }
    /// The configured rate limit on rotations, per second.
    pub fn max_rotations_per_second(&self) -> Option<f64> {
        self.rate.as_ref().map(|r| 1.0 / r.interval.as_secs_f64())
    }
    /// The underlying target, without the concurrency bound.
    pub fn target(&self) -> &Arc<dyn Target> {
        &self.target
    }

    /// Runs one operation under the endpoint's concurrency bound and [`OP_TIMEOUT`].
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, TargetError>>,
    ) -> Result<T, TargetError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| TargetError::Internal("endpoint semaphore closed".into()))?;
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(r) => r,
            Err(_) => Err(TargetError::Timeout(format!(
                "operation timed out after {}s",
                OP_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Waits for the rate limit, if any (before taking a permit, so waiting
    /// tasks do not hold the endpoint's concurrency).
    async fn paced(&self) {
        if let Some(r) = &self.rate {
            r.acquire().await;
        }
    }

    pub async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.paced().await;
        self.bounded(self.target.add(principal, new)).await
    }
    pub async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.paced().await;
        self.bounded(self.target.replace(principal, new)).await
    }
    pub async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        self.bounded(self.target.remove(principal, old)).await
    }
    pub async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.bounded(self.target.check(principal, secret)).await
    }
    pub async fn placement(
        &self,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<String>, TargetError> {
        self.bounded(self.target.placement(principal, secret)).await
    }
    pub async fn discover(&self) -> Result<Vec<Login>, TargetError> {
        self.bounded(self.target.discover()).await
    }
}

/// The endpoints of one worker, by name.
#[derive(Default)]
pub struct Targets {
    endpoints: HashMap<String, Endpoint>,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.endpoints.values()).finish()
    }
}

impl Targets {
    pub fn new() -> Self {
        Targets::default()
    }

    /// Registers `target` under `endpoint`, allowing at most `max_concurrency`
    /// (at least 1) operations against it at once. Replaces a previous entry.
    pub fn insert(&mut self, endpoint: &str, target: Arc<dyn Target>, max_concurrency: usize) {
        self.insert_limited(endpoint, target, max_concurrency, None);
    }

    /// [`Targets::insert`] with a rate limit: at most
    /// `max_rotations_per_second` rotations (`add` / `replace`) start per
    /// second against the endpoint (`None`, zero or negative: no limit).
    pub fn insert_limited(
        &mut self,
        endpoint: &str,
        target: Arc<dyn Target>,
        max_concurrency: usize,
        max_rotations_per_second: Option<f64>,
    ) {
        self.endpoints.insert(
            endpoint.to_string(),
            Endpoint::new(endpoint, target, max_concurrency, max_rotations_per_second),
        );
    }

    pub fn get(&self, endpoint: &str) -> Option<Endpoint> {
        self.endpoints.get(endpoint).cloned()
    }

    /// Endpoint names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.endpoints.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Folds alternating pairs into their primaries in a discovery: a clone
/// login is never a credential of its own (it belongs to its primary), and a
/// primary that cannot log in right now (its clone is the active login) is
/// still the principal. Explicit `alternating` pairs always count; with
/// `continuity = "alternating"`, every login named `<base><clone_suffix>` is
/// the clone of `<base>`. The primary inherits its clone's privileges.
pub(crate) fn fold_alternating(logins: &db::Logins, found: &mut Vec<Login>) {
    let mut pairs: Vec<(String, String)> = logins
        .alternating
        .iter()
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    if logins.continuity == db::Continuity::Alternating && !logins.clone_suffix.is_empty() {
        for l in found.iter() {
            if let Some(base) = l.principal.strip_suffix(&logins.clone_suffix) {
                if !base.is_empty() && !logins.alternating.contains_key(base) {
                    pairs.push((base.to_string(), l.principal.clone()));
                }
            }
        }
    }
    for (primary, clone) in pairs {
        let Some(ci) = found.iter().position(|l| l.principal == clone) else {
            continue;
        };
        let inherited = found[ci].privileged.clone();
        found[ci].never = Some(format!("alternating clone of {primary:?}"));
        match found.iter_mut().find(|l| l.principal == primary) {
            Some(p) => {
                for r in inherited {
                    if !p.privileged.contains(&r) {
                        p.privileged.push(r);
                    }
                }
            }
            None => found.push(Login {
                principal: primary,
                privileged: inherited,
                never: None,
            }),
        }
    }
    found.sort_by(|a, b| a.principal.cmp(&b.principal));
}

/// Replaces every occurrence of each secret in `text` by `<redacted>`: for
/// server messages that echo their arguments.
pub(crate) fn redact(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        let v = s.expose();
        if !v.is_empty() {
            out = out.replace(v, "<redacted>");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts how many operations run at once.
    struct Gauge {
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    #[async_trait]
    impl Target for Gauge {
        fn kind(&self) -> TargetKind {
            TargetKind::Sim
        }
        fn policy(&self) -> SecretPolicy {
            SecretPolicy::default()
        }
        async fn add(&self, _: &str, _: &Secret) -> Result<(), TargetError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(n, Ordering::SeqCst);
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
        async fn replace(&self, p: &str, s: &Secret) -> Result<(), TargetError> {
            self.add(p, s).await
        }
        async fn remove(&self, _: &str, _: &Secret) -> Result<(), TargetError> {
            Ok(())
        }
        async fn check(&self, _: &str, _: &Secret) -> Result<AuthCheck, TargetError> {
            Ok(AuthCheck::Rejected)
        }
    }

    #[tokio::test]
    async fn endpoint_semaphore_bounds_concurrency() {
        let g = Arc::new(Gauge {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let mut t = Targets::new();
        t.insert("e", g.clone(), 3);
        let ep = t.get("e").unwrap();
        let s = Secret::new("x".repeat(20));
        let ops = (0..20).map(|_| ep.add("p", &s));
        futures::future::join_all(ops).await;
        assert!(g.peak.load(Ordering::SeqCst) <= 3);
        assert!(t.get("other").is_none());
        assert_eq!(t.names(), vec!["e".to_string()]);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_rotation_starts() {
        let g = Arc::new(Gauge {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let mut t = Targets::new();
        t.insert_limited("e", g.clone(), 50, Some(10.0));
        let ep = t.get("e").unwrap();
        assert_eq!(ep.max_rotations_per_second(), Some(10.0));
        let s = Secret::new("x".repeat(20));
        let start = tokio::time::Instant::now();
        let ops = (0..21).map(|_| ep.replace("p", &s));
        futures::future::join_all(ops).await;
        // 21 starts at 10/s: the last one 2 s after the first.
        let took = start.elapsed();
        assert!(took >= Duration::from_secs(2), "{took:?}");
        assert!(took < Duration::from_millis(2100), "{took:?}");
        assert!(RateLimit::new(0.0).is_none());
        assert!(RateLimit::new(f64::NAN).is_none());
        t.insert("f", g, 1);
        assert_eq!(t.get("f").unwrap().max_rotations_per_second(), None);
    }

    #[test]
    fn redaction() {
        let s = Secret::new("hunter2hunter2".into());
        assert_eq!(
            redact("modifier '<hunter2hunter2': no such password", &[&s]),
            "modifier '<<redacted>': no such password"
        );
    }
}
