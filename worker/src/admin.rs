//! The worker's admin service: NATS request/reply on
//! `keywave.admin.v1.<region>.<verb>` (queue group
//! [`keywave_common::admin::QUEUE_GROUP`], so one worker of the region
//! answers). Only a region's workers hold its key and reach its targets, so
//! the operator CLI asks them to `reconcile` credentials (the store against
//! what the target accepts, repairing half-done rotations) and to `discover`
//! an endpoint's logins. Replies carry fingerprints, never secrets.
//!
//! # When a task may still be in flight
//!
//! A reconcile never races a task. A PENDING secret (or, after a promote, a
//! PREVIOUS secret not yet revoked) belongs to a task that may still act
//! while it is younger than the *in-flight window*: the task's campaign
//! timeout plus [`IN_FLIGHT_MARGIN_MS`] when the campaign's snapshot is found
//! (past its deadline a task starts no new step), capped by the request's
//! `stale_after_ms`; `stale_after_ms` alone when the campaign is unknown.
//! Inside the window the credential is reported `in_flight` and nothing is
//! touched. Every store change is a compare-and-set on the revision read at
//! the start, so a task that writes in between wins and the credential is
//! reported `in_flight` too.

use crate::notice::Notifier;
use crate::store::{Applied, Loaded, RecordStore, StoreError, Version};
use crate::targets::{AuthCheck, Endpoint, TargetError, Targets};
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use keywave_common::admin::{
    errors, glob_match, verbs, CredentialReport, DiscoverReply, DiscoverRequest, FoundLogin,
    Observed, ReconcileItem, ReconcileReply, ReconcileRequest, ReconcileStatus, SecretCheck, Stage,
    IN_FLIGHT_MARGIN_MS, MAX_BATCH, MAX_DISCOVERED, QUEUE_GROUP,
};
use keywave_common::api::{ApiReply, CampaignStatus};
use keywave_common::wire::{Step, TaskAction};
use keywave_common::{now_ms, subjects, topology};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Credentials of one request checked at once (each check also holds a
/// permit of its endpoint's semaphore).
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Requests served at once by one worker.
const REQUESTS_IN_FLIGHT: usize = 4;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot subscribe to {subject}: {detail}")]
    Subscribe { subject: String, detail: String },
}

/// A request that cannot be answered with data: becomes an error reply.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct Refusal {
    pub class: &'static str,
    pub message: String,
}

fn refuse(class: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        class,
        message: message.into(),
    }
}

/// Where and how the service answers.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub region: String,
    pub worker_id: String,
    /// Credentials of one request checked at once.
    pub concurrency: usize,
}

/// The admin service of one worker. Cheap to clone.
#[derive(Clone)]
pub struct AdminService {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    store: Arc<dyn RecordStore>,
    targets: Arc<Targets>,
    notifier: Option<Notifier>,
    opts: AdminOptions,
    /// The campaigns bucket, opened on first use.
    campaigns: Mutex<Option<kv::Store>>,
}

impl std::fmt::Debug for AdminService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminService")
            .field("opts", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl AdminService {
    pub fn new(
        client: async_nats::Client,
        opts: AdminOptions,
        store: impl RecordStore + 'static,
        targets: Arc<Targets>,
        notifier: Option<Notifier>,
    ) -> Self {
        AdminService {
            inner: Arc::new(Inner {
                js: topology::context(client.clone()),
                client,
                store: Arc::new(store),
                targets,
                notifier,
                opts,
                campaigns: Mutex::new(None),
            }),
        }
    }

    /// Joins the region's admin queue group and serves it in the background
    /// until `shutdown` is cancelled. The server knows the subscription when
    /// this returns.
    pub async fn spawn(
        &self,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, AdminError> {
        let subject = subjects::admin_region_filter(&self.inner.opts.region);
        let fail = |e: String| AdminError::Subscribe {
            subject: subject.clone(),
            detail: e,
        };
        let sub = self
            .inner
            .client
            .queue_subscribe(subject.clone(), QUEUE_GROUP.to_string())
            .await
            .map_err(|e| fail(e.to_string()))?;
        self.inner
            .client
            .flush()
            .await
            .map_err(|e| fail(e.to_string()))?;
        info!(region = %self.inner.opts.region, subject = %subject, "Admin service listening");
        let svc = self.clone();
        Ok(tokio::spawn(async move {
            sub.take_until(shutdown.cancelled())
                .for_each_concurrent(REQUESTS_IN_FLIGHT, |msg| {
                    let svc = svc.clone();
                    async move {
                        let Some(reply_to) = msg.reply.clone() else {
                            debug!(subject = %msg.subject, "Admin message without reply subject ignored");
                            return;
                        };
                        let prefix = format!("keywave.admin.v1.{}.", svc.inner.opts.region);
                        let verb = msg.subject.as_str().strip_prefix(&prefix).unwrap_or("");
                        let body = svc.handle(verb, &msg.payload).await;
                        if let Err(e) = svc.inner.client.publish(reply_to, body).await {
                            warn!(verb, error = %e, "Could not send an admin reply");
                        }
                    }
                })
                .await;
        }))
    }

    /// Answers one request: an [`ApiReply`] as JSON.
    pub async fn handle(&self, verb: &str, payload: &[u8]) -> Bytes {
        fn reply<T: Serialize>(r: Result<T, Refusal>) -> Bytes {
            let r = match r {
                Ok(d) => ApiReply::ok(d),
                Err(e) => ApiReply::err(e.class, e.message),
            };
            serde_json::to_vec(&r)
                .unwrap_or_else(|_| br#"{"ok":false,"error":{"class":"internal","message":"cannot encode the reply"}}"#.to_vec())
                .into()
        }
        match verb {
            verbs::RECONCILE => reply(match serde_json::from_slice(payload) {
                Ok(req) => self.reconcile(req).await,
                Err(e) => Err(refuse(errors::BAD_REQUEST, format!("reconcile: {e}"))),
            }),
            verbs::DISCOVER => reply(match serde_json::from_slice(payload) {
                Ok(req) => self.discover(req).await,
                Err(e) => Err(refuse(errors::BAD_REQUEST, format!("discover: {e}"))),
            }),
            other => reply::<()>(Err(refuse(
                errors::BAD_REQUEST,
                format!("unknown admin verb {other:?} (expected reconcile or discover)"),
            ))),
        }
    }

    /// Reconciles a batch of at most [`MAX_BATCH`] credentials.
    pub async fn reconcile(&self, req: ReconcileRequest) -> Result<ReconcileReply, Refusal> {
        if req.credentials.len() > MAX_BATCH {
            return Err(refuse(
                errors::BAD_REQUEST,
                format!(
                    "{} credentials in one request; at most {MAX_BATCH}",
                    req.credentials.len()
                ),
            ));
        }
        let timeouts = Timeouts::default();
        // Indexes rather than borrowed items: the future stays `Send`.
        let items = &req.credentials;
        let reports = futures::stream::iter(0..items.len())
            .map(|i| self.reconcile_one(&items[i], req.repair, req.stale_after_ms, &timeouts))
            .buffered(self.inner.opts.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        Ok(ReconcileReply {
            region: self.inner.opts.region.clone(),
            worker_id: self.inner.opts.worker_id.clone(),
            reports,
        })
    }

    /// The logins of one endpoint, filtered and split into proposed and excluded.
    pub async fn discover(&self, req: DiscoverRequest) -> Result<DiscoverReply, Refusal> {
        let ep = self.inner.targets.get(&req.endpoint).ok_or_else(|| {
            refuse(
                errors::UNKNOWN_ENDPOINT,
                format!(
                    "endpoint {:?} is not in the configuration of worker {} (region {})",
                    req.endpoint, self.inner.opts.worker_id, self.inner.opts.region
                ),
            )
        })?;
        let logins = ep.discover().await.map_err(|e| match e {
            e if e.is_transient() => refuse(errors::TARGET_UNAVAILABLE, e.to_string()),
            TargetError::Rejected(m) if m.starts_with("discovery is not supported") => {
                refuse(errors::UNSUPPORTED, m)
            }
            other => refuse(errors::TARGET_REJECTED, other.to_string()),
        })?;
        let (proposed, excluded, truncated) =
            split_discovered(logins, req.pattern.as_deref(), req.include_privileged);
        info!(
            endpoint = %req.endpoint,
            proposed = proposed.len(),
            excluded = excluded.len(),
            "Discovery answered"
        );
        Ok(DiscoverReply {
            region: self.inner.opts.region.clone(),
            worker_id: self.inner.opts.worker_id.clone(),
            endpoint: req.endpoint,
            kind: ep.kind(),
            proposed,
            excluded,
            truncated,
        })
    }

    /// The task timeout of campaign `cid`, from its snapshot (None when the
    /// bucket or the snapshot is missing or unreadable).
    async fn task_timeout(&self, cid: &str, cache: &Timeouts) -> Option<u64> {
        if let Some(v) = cache.0.lock().await.get(cid) {
            return *v;
        }
        let kv = {
            let mut slot = self.inner.campaigns.lock().await;
            if slot.is_none() {
                *slot = self
                    .inner
                    .js
                    .get_key_value(topology::KV_CAMPAIGNS)
                    .await
                    .ok();
            }
            slot.clone()
        };
        let mut timeout = None;
        if let Some(kv) = kv {
            if let Ok(Some(v)) = kv.get(format!("campaign.{cid}")).await {
                timeout = serde_json::from_slice::<CampaignStatus>(&v)
                    .ok()
                    .map(|s| s.spec.task_timeout_ms);
            }
        }
        cache.0.lock().await.insert(cid.to_string(), timeout);
        timeout
    }

    /// Whether the task `task_id`, whose last known write is at `since_ms`,
    /// may still act (see the module documentation).
    async fn may_be_in_flight(
        &self,
        task_id: Option<&str>,
        since_ms: u64,
        stale_after_ms: u64,
        cache: &Timeouts,
    ) -> (bool, u64) {
        let timeout = match task_id.and_then(|t| t.split_once(':')).map(|(c, _)| c) {
            Some(cid) => self.task_timeout(cid, cache).await,
            None => None,
        };
        let window = in_flight_window(timeout, stale_after_ms);
        (now_ms().saturating_sub(since_ms) < window, window)
    }

    async fn reconcile_one(
        &self,
        item: &ReconcileItem,
        repair: bool,
        stale_after_ms: u64,
        cache: &Timeouts,
    ) -> CredentialReport {
        let mut r = Reconciling {
            report: CredentialReport {
                id: item.id.clone(),
                region: self.inner.opts.region.clone(),
                endpoint: item.endpoint.clone(),
                principal: item.principal.clone(),
                status: ReconcileStatus::Consistent,
                checks: Vec::new(),
                findings: Vec::new(),
                actions: Vec::new(),
            },
            attention: false,
            unreachable: false,
            in_flight: false,
            repair,
        };
        self.evaluate(item, stale_after_ms, cache, &mut r).await;
        let status = r.status();
        r.report.status = status;
        if status != ReconcileStatus::Consistent {
            info!(
                credential = %item.id,
                status = %status,
                findings = ?r.report.findings,
                actions = ?r.report.actions,
                "Reconciled"
            );
        }
        r.report
    }

    async fn evaluate(
        &self,
        item: &ReconcileItem,
        stale_after_ms: u64,
        cache: &Timeouts,
        r: &mut Reconciling,
    ) {
        let Some(ep) = self.inner.targets.get(&item.endpoint) else {
            r.attention(format!(
                "endpoint {:?} is not in the configuration of worker {} (region {})",
                item.endpoint, self.inner.opts.worker_id, self.inner.opts.region
            ));
            return;
        };
        if ep.kind() != item.kind {
            r.attention(format!(
                "endpoint {:?} is of kind {}, the inventory says {}",
                item.endpoint,
                ep.kind(),
                item.kind
            ));
            return;
        }
        let loaded = match self.inner.store.load(&item.id).await {
            Ok(l) => l,
            Err(StoreError::Unavailable(e)) => {
                r.unreachable(format!("secret store unavailable: {e}"));
                return;
            }
            Err(e) => {
                r.attention(format!("secret store: {e}"));
                return;
            }
        };
        let rec = loaded.record.clone();
        let now = now_ms();

        // PENDING: in flight (leave it), set at the target (finish the
        // rotation), or never set (discard it).
        if let Some(p) = &rec.pending {
            let (in_flight, window) = self
                .may_be_in_flight(p.task_id.as_deref(), p.since_ms, stale_after_ms, cache)
                .await;
            if in_flight {
                r.check(Stage::Pending, p, Observed::NotChecked, now);
                r.in_flight(format!(
                    "PENDING {} was staged {} ago by task {}, which may still be running (in-flight window {}); left alone",
                    p.fingerprint,
                    human_ms(now.saturating_sub(p.since_ms)),
                    p.task_id.as_deref().unwrap_or("(none)"),
                    human_ms(window)
                ));
                return;
            }
            let Some(seen) = r.try_auth(&ep, item, Stage::Pending, p, now).await else {
                return;
            };
            if seen == AuthCheck::Accepted {
                self.finish_rotation(&ep, item, loaded, r).await;
                return;
            }
            r.finding(format!(
                "PENDING {} (task {}) never reached the target: it does not log in",
                p.fingerprint,
                p.task_id.as_deref().unwrap_or("(none)")
            ));
            r.action(format!("discard PENDING {}", p.fingerprint));
            if r.repair {
                let mut l = loaded.clone();
                l.record.pending = None;
                match self.inner.store.save(&item.id, &l.record, l.revision).await {
                    Ok(_) => {}
                    Err(e) => {
                        r.store_failed(e);
                        return;
                    }
                }
            }
        }

        // CURRENT must log in.
        let Some(cur) = &rec.current else {
            r.attention(
                "no CURRENT secret in the region's store: enroll the secret in use (keywave-worker enroll) or rotate it"
                    .to_string(),
            );
            return;
        };
        let Some(cur_seen) = r.try_auth(&ep, item, Stage::Current, cur, now).await else {
            return;
        };
        if cur_seen == AuthCheck::Rejected {
            r.attention(format!(
                "CURRENT {} is refused at the target: the secret was changed outside keywave; \
                 not guessed at: enroll the secret in use, or rotate the credential with containment",
                cur.fingerprint
            ));
        }

        // PREVIOUS must not log in (every strategy revokes it once the
        // rotation is over; alternating users switch the old login off).
        let Some(prev) = rec
            .previous
            .as_ref()
            .filter(|p| p.fingerprint != cur.fingerprint)
        else {
            return;
        };
        let last_at = rec
            .last_task
            .as_deref()
            .and_then(|t| rec.applied(t))
            .map(|a| a.at_ms)
            .unwrap_or(cur.since_ms);
        let (in_flight, window) = self
            .may_be_in_flight(rec.last_task.as_deref(), last_at, stale_after_ms, cache)
            .await;
        let Some(prev_seen) = r.try_auth(&ep, item, Stage::Previous, prev, now).await else {
            return;
        };
        if prev_seen == AuthCheck::Rejected {
            return;
        }
        if in_flight {
            r.in_flight(format!(
                "PREVIOUS {} still logs in, but task {} promoted {} ago and may still be revoking it (in-flight window {}); left alone",
                prev.fingerprint,
                rec.last_task.as_deref().unwrap_or("(none)"),
                human_ms(now.saturating_sub(last_at)),
                human_ms(window)
            ));
            return;
        }
        if cur_seen != AuthCheck::Accepted {
            r.attention(format!(
                "PREVIOUS {} still logs in while CURRENT does not: not revoked, so that nothing is locked out",
                prev.fingerprint
            ));
            return;
        }
        r.finding(format!(
            "PREVIOUS {} still logs in: its revocation never finished",
            prev.fingerprint
        ));
        r.action(format!(
            "revoke PREVIOUS {} at the target and prove it is refused",
            prev.fingerprint
        ));
        if r.repair {
            self.revoke(&ep, item, prev, r).await;
        }
    }

    /// A stale PENDING that logs in: the rotation got past its set. Promote
    /// it (CAS, recorded under the task that staged it so that a late
    /// redelivery of that task resumes after the promote), then revoke the
    /// old CURRENT and prove it is refused, as the protocol would have.
    async fn finish_rotation(
        &self,
        ep: &Endpoint,
        item: &ReconcileItem,
        loaded: Loaded,
        r: &mut Reconciling,
    ) {
        let rec = &loaded.record;
        let Some(pending) = rec.pending.clone() else {
            return;
        };
        // "Logs in" proves something only where a wrong secret is refused.
        let wrong = keywave_common::crypto::generate(&ep.policy());
        match ep.check(&item.principal, &wrong).await {
            Ok(AuthCheck::Rejected) => {}
            Ok(AuthCheck::Accepted) => {
                r.finding(
                    "the target lets a random wrong secret in for this login (target_accepts_any_secret): \
                     no login check proves anything, so PENDING is not promoted; close the login first"
                        .to_string(),
                );
                return;
            }
            Err(e) => {
                r.target_failed(e);
                return;
            }
        }
        let old = rec.current.clone();
        if let Some(old) = &old {
            // Shown for the report; its answer decides nothing here.
            let _ = r.try_auth(ep, item, Stage::Current, old, now_ms()).await;
        }
        let task = pending.task_id.clone();
        r.finding(format!(
            "PENDING {} (task {}) already logs in: the rotation stopped between set and promote",
            pending.fingerprint,
            task.as_deref().unwrap_or("(none)")
        ));
        r.action(format!(
            "promote PENDING {} to CURRENT{}",
            pending.fingerprint,
            task.as_deref()
                .map(|t| format!(" (finishing task {t})"))
                .unwrap_or_default()
        ));
        match &old {
            Some(o) => r.action(format!(
                "revoke the old CURRENT {} at the target and prove it is refused",
                o.fingerprint
            )),
            None => r.action("make the new secret the only one at the target".to_string()),
        }
        if !r.repair {
            return;
        }
        let mut l = loaded.clone();
        // Which login it opens, for consumers (alternating users); unknown
        // when the target does not answer now, as for an enrolled secret.
        let login = ep
            .placement(&item.principal, &pending.secret)
            .await
            .ok()
            .flatten();
        let new = Version {
            since_ms: now_ms(),
            login,
            ..pending.clone()
        };
        l.record.previous = old.clone();
        l.record.current = Some(new.clone());
        l.record.pending = None;
        l.record.push_applied(Applied {
            task_id: task.unwrap_or_else(|| format!("reconcile-{}", now_ms())),
            action: TaskAction::Rotate,
            step: Step::Promoted,
            at_ms: now_ms(),
            new_fingerprint: Some(new.fingerprint.clone()),
            old_fingerprint: old.as_ref().map(|o| o.fingerprint.clone()),
        });
        if let Err(e) = self.inner.store.save(&item.id, &l.record, l.revision).await {
            r.store_failed(e);
            return;
        }
        if let Some(n) = &self.inner.notifier {
            n.announce(&item.id, &new.secret, old.as_ref().map(|o| &o.secret))
                .await;
        }
        match &old {
            Some(o) => self.revoke(ep, item, o, r).await,
            None => {
                if let Err(e) = ep.replace(&item.principal, &new.secret).await {
                    r.target_failed(e);
                }
            }
        }
    }

    /// Removes `old` at the target and proves it is refused.
    async fn revoke(
        &self,
        ep: &Endpoint,
        item: &ReconcileItem,
        old: &Version,
        r: &mut Reconciling,
    ) {
        if let Err(e) = ep.remove(&item.principal, &old.secret).await {
            r.target_failed(e);
            return;
        }
        match ep.check(&item.principal, &old.secret).await {
            Ok(AuthCheck::Rejected) => {}
            Ok(AuthCheck::Accepted) => r.attention(format!(
                "{} still logs in after its revocation",
                old.fingerprint
            )),
            Err(e) => r.target_failed(e),
        }
    }
}

/// Task timeouts of the campaigns met in one request.
#[derive(Default)]
struct Timeouts(Mutex<HashMap<String, Option<u64>>>);

/// The in-flight window (ms): the campaign's task timeout plus
/// [`IN_FLIGHT_MARGIN_MS`], at most `stale_after_ms`; `stale_after_ms` when
/// the campaign is unknown.
pub fn in_flight_window(task_timeout_ms: Option<u64>, stale_after_ms: u64) -> u64 {
    match task_timeout_ms {
        Some(t) if t > 0 => t.saturating_add(IN_FLIGHT_MARGIN_MS).min(stale_after_ms),
        _ => stale_after_ms,
    }
}

/// Applies the pattern and the privilege rule to what an endpoint listed.
fn split_discovered(
    logins: Vec<crate::targets::Login>,
    pattern: Option<&str>,
    include_privileged: bool,
) -> (Vec<FoundLogin>, Vec<FoundLogin>, bool) {
    let mut proposed = Vec::new();
    let mut excluded = Vec::new();
    let mut truncated = false;
    for l in logins {
        if pattern.is_some_and(|p| !glob_match(p, &l.principal)) {
            continue;
        }
        if proposed.len() + excluded.len() >= MAX_DISCOVERED {
            truncated = true;
            break;
        }
        let out = FoundLogin {
            principal: l.principal,
            privileged: l.privileged,
            never: l.never,
        };
        if out.never.is_some() || (!out.privileged.is_empty() && !include_privileged) {
            excluded.push(out);
        } else {
            proposed.push(out);
        }
    }
    (proposed, excluded, truncated)
}

/// `90s`, `12m`, `3h` (rounded down).
fn human_ms(ms: u64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms}ms"),
        ms if ms < 120_000 => format!("{}s", ms / 1_000),
        ms if ms < 7_200_000 => format!("{}m", ms / 60_000),
        ms => format!("{}h", ms / 3_600_000),
    }
}

/// One credential's report being built.
struct Reconciling {
    report: CredentialReport,
    attention: bool,
    unreachable: bool,
    in_flight: bool,
    repair: bool,
}

impl Reconciling {
    fn status(&self) -> ReconcileStatus {
        if self.attention {
            ReconcileStatus::NeedsAttention
        } else if self.unreachable {
            ReconcileStatus::Unreachable
        } else if self.in_flight {
            ReconcileStatus::InFlight
        } else if !self.report.actions.is_empty() {
            if self.repair {
                ReconcileStatus::Repaired
            } else {
                ReconcileStatus::WouldRepair
            }
        } else {
            ReconcileStatus::Consistent
        }
    }

    fn finding(&mut self, s: String) {
        self.report.findings.push(s);
    }
    fn action(&mut self, s: String) {
        self.report.actions.push(s);
    }
    fn attention(&mut self, s: String) {
        self.attention = true;
        self.finding(s);
    }
    fn unreachable(&mut self, s: String) {
        self.unreachable = true;
        self.finding(s);
    }
    fn in_flight(&mut self, s: String) {
        self.in_flight = true;
        self.finding(s);
    }

    fn check(&mut self, stage: Stage, v: &Version, observed: Observed, now: u64) {
        self.report.checks.push(SecretCheck {
            stage,
            fingerprint: v.fingerprint.clone(),
            observed,
            age_ms: now.saturating_sub(v.since_ms),
            task_id: v.task_id.clone(),
        });
    }

    /// A real login with `v` at the target, recorded; `None` (and the
    /// failure recorded) when the target could not answer.
    async fn try_auth(
        &mut self,
        ep: &Endpoint,
        item: &ReconcileItem,
        stage: Stage,
        v: &Version,
        now: u64,
    ) -> Option<AuthCheck> {
        match ep.check(&item.principal, &v.secret).await {
            Ok(a) => {
                let o = match a {
                    AuthCheck::Accepted => Observed::Accepted,
                    AuthCheck::Rejected => Observed::Rejected,
                };
                self.check(stage, v, o, now);
                Some(a)
            }
            Err(e) => {
                self.check(stage, v, Observed::Error, now);
                self.target_failed(e);
                None
            }
        }
    }

    fn target_failed(&mut self, e: TargetError) {
        // Target errors never carry a secret (the drivers redact them).
        if e.is_transient() {
            self.unreachable(e.to_string());
        } else {
            self.attention(e.to_string());
        }
    }

    fn store_failed(&mut self, e: StoreError) {
        match e {
            StoreError::Conflict { .. } => self.in_flight(
                "the record changed while it was being reconciled (a task wrote it): nothing was changed; run reconcile again"
                    .to_string(),
            ),
            StoreError::Unavailable(e) => self.unreachable(format!("secret store unavailable: {e}")),
            e => self.attention(format!("secret store: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::sim::{SimOptions, SimTarget};
    use crate::testutil::TestBucket;
    use keywave_common::crypto::{generate, Secret, SecretPolicy};
    use keywave_common::wire::{Strategy, TargetKind};

    struct Fx {
        bucket: TestBucket,
        sim: Arc<SimTarget>,
        svc: AdminService,
    }

    async fn fx() -> Fx {
        let bucket = TestBucket::new().await;
        let sim = SimTarget::new(SimOptions::default());
        let mut t = Targets::new();
        t.insert("sim", sim.clone(), 4);
        let client = async_nats::connect(bucket.server.url()).await.unwrap();
        let svc = AdminService::new(
            client,
            AdminOptions {
                region: bucket.region.clone(),
                worker_id: "w-admin".into(),
                concurrency: 4,
            },
            bucket.store.clone(),
            Arc::new(t),
            None,
        );
        Fx { bucket, sim, svc }
    }

    fn item(id: &str) -> ReconcileItem {
        ReconcileItem {
            id: id.into(),
            endpoint: "sim".into(),
            kind: TargetKind::Sim,
            principal: format!("user-{id}"),
        }
    }

    async fn run(fx: &Fx, id: &str, repair: bool, stale_after_ms: u64) -> CredentialReport {
        let mut reply = fx
            .svc
            .reconcile(ReconcileRequest {
                repair,
                stale_after_ms,
                credentials: vec![item(id)],
            })
            .await
            .unwrap();
        reply.reports.remove(0)
    }

    /// Enrolls today's secret and stages a new one as a crashed task would
    /// (set at the target with continuity, never promoted).
    async fn half_rotated(fx: &Fx, id: &str, set: bool) -> (Secret, Secret) {
        let old = generate(&SecretPolicy::default());
        fx.sim.seed(&format!("user-{id}"), &old);
        fx.bucket.store.enroll(id, old.clone()).await.unwrap();
        let new = generate(&SecretPolicy::default());
        let mut l = fx.bucket.store.load(id).await.unwrap();
        l.record.pending = Some(fx.bucket.store.version(
            new.clone(),
            Some(format!("c-gone:w0:{id}")),
            Some(Strategy::Continuity),
        ));
        fx.bucket
            .store
            .save(id, &l.record, l.revision)
            .await
            .unwrap();
        if set {
            crate::targets::Target::add(&*fx.sim, &format!("user-{id}"), &new)
                .await
                .unwrap();
        }
        (old, new)
    }

    #[tokio::test]
    async fn enrolled_credential_is_consistent_and_unknown_endpoint_needs_attention() {
        let fx = fx().await;
        let s = generate(&SecretPolicy::default());
        fx.sim.seed("user-a", &s);
        fx.bucket.store.enroll("a", s).await.unwrap();
        let r = run(&fx, "a", false, 60_000).await;
        assert_eq!(r.status, ReconcileStatus::Consistent, "{r:?}");
        assert_eq!(r.checks.len(), 1);
        assert_eq!(r.checks[0].observed, Observed::Accepted);

        let mut bad = item("a");
        bad.endpoint = "nowhere".into();
        let reply = fx
            .svc
            .reconcile(ReconcileRequest {
                repair: true,
                stale_after_ms: 0,
                credentials: vec![bad],
            })
            .await
            .unwrap();
        assert_eq!(reply.reports[0].status, ReconcileStatus::NeedsAttention);

        // Never enrolled: nothing to compare.
        let r = run(&fx, "never", false, 60_000).await;
        assert_eq!(r.status, ReconcileStatus::NeedsAttention);
    }

    #[tokio::test]
    async fn stale_pending_that_logs_in_is_promoted_and_the_old_revoked() {
        let fx = fx().await;
        let (old, new) = half_rotated(&fx, "b", true).await;
        // Fresh: may still be in flight, left alone.
        let r = run(&fx, "b", true, 60_000).await;
        assert_eq!(r.status, ReconcileStatus::InFlight, "{r:?}");
        assert!(fx.sim.accepts("user-b", &old));

        let r = run(&fx, "b", false, 0).await;
        assert_eq!(r.status, ReconcileStatus::WouldRepair, "{r:?}");
        assert!(fx.sim.accepts("user-b", &old), "a dry run changes nothing");

        let r = run(&fx, "b", true, 0).await;
        assert_eq!(r.status, ReconcileStatus::Repaired, "{r:?}");
        assert!(!fx.sim.accepts("user-b", &old));
        assert!(fx.sim.accepts("user-b", &new));
        let rec = fx.bucket.store.get("b").await.unwrap().unwrap();
        assert_eq!(rec.current.as_ref().unwrap().secret, new);
        assert!(rec.pending.is_none());
        assert_eq!(rec.last_task.as_deref(), Some("c-gone:w0:b"));

        let r = run(&fx, "b", false, 0).await;
        assert_eq!(r.status, ReconcileStatus::Consistent, "{r:?}");
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains(new.expose()) && !text.contains(old.expose()));
    }

    #[tokio::test]
    async fn pending_never_set_is_discarded_and_drift_needs_attention() {
        let fx = fx().await;
        let (old, _) = half_rotated(&fx, "c", false).await;
        let r = run(&fx, "c", true, 0).await;
        assert_eq!(r.status, ReconcileStatus::Repaired, "{r:?}");
        let rec = fx.bucket.store.get("c").await.unwrap().unwrap();
        assert!(rec.pending.is_none());
        assert_eq!(rec.current.unwrap().secret, old);

        // Changed out of band: reported, never guessed at.
        let other = generate(&SecretPolicy::default());
        crate::targets::Target::replace(&*fx.sim, "user-c", &other)
            .await
            .unwrap();
        let r = run(&fx, "c", true, 0).await;
        assert_eq!(r.status, ReconcileStatus::NeedsAttention, "{r:?}");
        assert!(r.actions.is_empty());
        assert!(fx.sim.accepts("user-c", &other));
    }

    #[test]
    fn windows_and_discovery_filters() {
        assert_eq!(in_flight_window(Some(30_000), 900_000), 65_000);
        assert_eq!(in_flight_window(Some(3_600_000), 900_000), 900_000);
        assert_eq!(in_flight_window(None, 900_000), 900_000);
        assert_eq!(in_flight_window(Some(0), 5), 5);
        let l = |p: &str, privileged: &[&str], never: Option<&str>| crate::targets::Login {
            principal: p.into(),
            privileged: privileged.iter().map(|s| s.to_string()).collect(),
            never: never.map(String::from),
        };
        let logins = vec![
            l("app_a", &[], None),
            l("app_a_clone", &[], Some("clone")),
            l("app_root", &["superuser"], None),
            l("other", &[], None),
        ];
        let (p, e, t) = split_discovered(logins.clone(), Some("app_*"), false);
        assert_eq!(
            p.iter().map(|f| f.principal.as_str()).collect::<Vec<_>>(),
            ["app_a"]
        );
        assert_eq!(e.len(), 2);
        assert!(!t);
        let (p, e, _) = split_discovered(logins, None, true);
        assert_eq!(p.len(), 3);
        assert_eq!(e.len(), 1, "clones are never proposed");
    }
}
