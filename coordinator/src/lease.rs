//! The coordinator lease: which of several coordinators is active. One key in
//! KV bucket `keywave-leases` holds a [`LeaseRecord`]; every write is a
//! compare-and-set on the revision last seen, and expiry is a timestamp in the
//! value (nats-server 2.9 has no per-message TTL). The holder renews it every
//! `renew_every`; a standby takes it over once `expires_at_ms` has passed.
//!
//! The revision the holder last wrote is its fencing token: before publishing
//! a wave or deciding, the engine calls [`Lease::check`], which fails as soon
//! as anybody else wrote the key or the holder could not renew in time. A
//! stale holder that comes back after a pause therefore stops instead of
//! publishing.
//!
//! Every process has an instance nonce ([`Claimant`]). A coordinator that
//! restarts with the holder's id takes the lease back at once instead of
//! waiting out the ttl; should the earlier process with that id still run,
//! its next renewal or fence finds the new instance in the record and it
//! stops for good ([`LeaseError::Duplicate`]) rather than fight back.

use async_nats::jetstream::kv::{self, Operation};
use keywave_common::now_ms;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// The key of the coordinators' lease.
pub const LEASE_KEY: &str = "coordinator";

/// Lease timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long a lease lasts without renewal: a standby takes over at most
    /// this long (plus `poll_every`) after the holder died. Default 4s.
    pub ttl: Duration,
    /// How often the holder renews. At most half of `ttl`. Default 1s.
    pub renew_every: Duration,
    /// How often a standby looks at the lease. Default 500ms.
    pub poll_every: Duration,
}

/// Default lease ttl: a dead coordinator is replaced within this (plus a
/// poll) — under 5 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(4);

impl Default for Config {
    fn default() -> Self {
        Config::with_ttl(DEFAULT_TTL)
    }
}

/// A lease timing out of bounds; [`ConfigError::field`] names it, the
/// message says what is wrong with it.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    #[error("must be at least 100ms")]
    Ttl,
    #[error("must be positive and at most half the lease ttl")]
    RenewPeriod,
    #[error("must be positive")]
    PollPeriod,
}

impl ConfigError {
    /// The timing at fault, as operators name it.
    pub fn field(self) -> &'static str {
        match self {
            ConfigError::Ttl => "lease ttl",
            ConfigError::RenewPeriod => "lease renew period",
            ConfigError::PollPeriod => "lease poll period",
        }
    }
}

impl Config {
    /// Timings derived from a ttl: renew every quarter of it, poll every
    /// eighth (4s gives the defaults 1s and 500ms).
    pub fn with_ttl(ttl: Duration) -> Config {
        Config {
            ttl,
            renew_every: ttl / 4,
            poll_every: ttl / 8,
        }
    }

    /// Checks the timings; names the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ttl < Duration::from_millis(100) {
            return Err(ConfigError::Ttl);
        }
        if self.renew_every.is_zero() || self.renew_every * 2 > self.ttl {
            return Err(ConfigError::RenewPeriod);
        }
        if self.poll_every.is_zero() {
            return Err(ConfigError::PollPeriod);
        }
        Ok(())
    }

    /// How long after its last renewal the holder still trusts its lease by
    /// its own clock: a fifth of the ttl short of the expiry the others see,
    /// to absorb clock skew and the time a renewal takes.
    fn trusted_for(&self) -> Duration {
        self.ttl - self.ttl / 5
    }
}

/// The value stored under [`LEASE_KEY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The coordinator id of the holder.
    pub holder: String,
    /// Random per process (the instance nonce): tells a restarted
    /// coordinator with the same id from the process it replaces, and a
    /// second live process started with the same id by mistake.
    pub instance: String,
    pub acquired_at_ms: u64,
    pub renewed_at_ms: u64,
    /// After this instant anybody may take the lease; 0 when released.
    pub expires_at_ms: u64,
}

impl LeaseRecord {
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LeaseError {
    /// Somebody else holds the lease or wrote it since we did.
    #[error("the coordinator lease is held by {holder} (since revision {revision})")]
    Lost { holder: String, revision: u64 },
    /// The holder could not renew within the ttl (by its own clock).
    #[error("the coordinator lease could not be renewed in time")]
    Expired,
    /// The bucket could not be read or written now.
    #[error("coordinator lease bucket: {0}")]
    Unavailable(String),
    /// Another live process runs with this coordinator id (another instance
    /// wrote the lease as this id): this process stops for good.
    #[error("another process runs with coordinator id {id} (lease instance {instance}); this one stops: give every coordinator its own --id")]
    Duplicate { id: String, instance: String },
}

/// What a look at the lease found.
#[derive(Debug, Clone)]
pub enum Seen {
    /// Nobody holds it (never written, released or expired).
    Free { revision: u64 },
    /// Held by `record` until its expiry.
    Held { record: LeaseRecord, revision: u64 },
}

/// Who contends for the lease: a coordinator id and this process's instance
/// nonce, plus the lease revision this process saw at its first look.
#[derive(Debug)]
pub struct Claimant {
    pub holder: String,
    pub instance: String,
    /// Revision of the lease key at this process's first successful look
    /// (0 when the key did not exist).
    first_look: OnceLock<u64>,
}

impl Claimant {
    pub fn new(holder: impl Into<String>, instance: impl Into<String>) -> Claimant {
        Claimant {
            holder: holder.into(),
            instance: instance.into(),
            first_look: OnceLock::new(),
        }
    }
}

/// What a coordinator that does not hold the lease does about what it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Write the lease (compare-and-set on `revision`).
    Take { revision: u64, reason: TakeReason },
    /// Another coordinator holds it: stand by.
    Wait,
    /// Another live process with this coordinator id holds it: stop.
    Duplicate { instance: String },
}

/// Why a lease is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeReason {
    /// Nobody holds it (never written, released or expired).
    Free,
    /// This very process's own record (a renewal starved past the trusted
    /// window): nobody wrote since.
    Own,
    /// A record of this coordinator id from another instance, unchanged since
    /// this process's first look: the process this one replaces (restarted
    /// after a crash) — taken back at once instead of waiting out the ttl.
    Restarted,
}

/// The pure decision of a contender: see [`Verdict`]. `first_look` is the
/// revision this process saw first (`None` when `seen` is the first look).
///
/// A record with our id and another instance written *after* our first look
/// comes from a process that is alive now (a dead one writes nothing): a
/// second process runs with our id, and we stop rather than fence it in turn.
pub fn decide(seen: &Seen, me: &str, instance: &str, first_look: Option<u64>) -> Verdict {
    match seen {
        Seen::Free { revision } => Verdict::Take {
            revision: *revision,
            reason: TakeReason::Free,
        },
        Seen::Held { record, revision } if record.instance == instance => Verdict::Take {
            revision: *revision,
            reason: TakeReason::Own,
        },
        Seen::Held { record, revision } if record.holder == me => {
            if !matches!(first_look, Some(first) if first != *revision) {
                Verdict::Take {
                    revision: *revision,
                    reason: TakeReason::Restarted,
                }
            } else {
                Verdict::Duplicate {
                    instance: record.instance.clone(),
                }
            }
        }
        Seen::Held { .. } => Verdict::Wait,
    }
}

/// Why a holder lost its lease, from the record that replaced its own.
fn loss_of(seen: Seen, me: &str, instance: &str) -> LeaseError {
    match seen {
        Seen::Held { record, .. } if record.holder == me && record.instance != instance => {
            LeaseError::Duplicate {
                id: me.to_string(),
                instance: record.instance,
            }
        }
        Seen::Held { record, revision } => LeaseError::Lost {
            holder: record.holder,
            revision,
        },
        Seen::Free { revision } => LeaseError::Lost {
            holder: "nobody".into(),
            revision,
        },
    }
}

/// Reads the lease key.
pub async fn look(kv: &kv::Store) -> Result<Seen, LeaseError> {
    let entry = kv
        .entry(LEASE_KEY)
        .await
        .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
    Ok(match entry {
        None => Seen::Free { revision: 0 },
        Some(e) if matches!(e.operation, Operation::Delete | Operation::Purge) => Seen::Free {
            revision: e.revision,
        },
        Some(e) => match serde_json::from_slice::<LeaseRecord>(&e.value) {
            Ok(r) if !r.expired(now_ms()) => Seen::Held {
                record: r,
                revision: e.revision,
            },
            // Expired, released, or unreadable: free for a CAS on its revision.
            _ => Seen::Free {
                revision: e.revision,
            },
        },
    })
}

/// A lease this process holds (or held: see [`Lease::lost`]).
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    cfg: Config,
    record: Mutex<LeaseRecord>,
    /// The revision of our last write: the fencing token.
    revision: AtomicU64,
    /// When our last write succeeded, by the monotonic clock.
    renewed: Mutex<Instant>,
    /// Cancelled once the lease is lost, expired or released.
    lost: CancellationToken,
    /// Why it was lost (None when released).
    lost_reason: Mutex<Option<LeaseError>>,
}

impl Lease {
    /// Takes the lease if nobody holds it (or it is ours to take back, see
    /// [`decide`]); `Ok(None)` when somebody else does, and
    /// [`LeaseError::Duplicate`] when another live process runs with this
    /// coordinator id.
    pub async fn try_acquire(
        kv: &kv::Store,
        cfg: Config,
        me: &Claimant,
    ) -> Result<Option<Lease>, LeaseError> {
        let seen = look(kv).await?;
        let seen_revision = match &seen {
            Seen::Free { revision } | Seen::Held { revision, .. } => *revision,
        };
        let first_look = me.first_look.get().copied();
        if first_look.is_none() {
            let _ = me.first_look.set(seen_revision);
        }
        let (revision, reason) = match decide(&seen, &me.holder, &me.instance, first_look) {
            Verdict::Take { revision, reason } => (revision, reason),
            Verdict::Wait => return Ok(None),
            Verdict::Duplicate { instance } => {
                let e = LeaseError::Duplicate {
                    id: me.holder.clone(),
                    instance,
                };
                error!(error = %e, "Another live process holds the lease with this coordinator id");
                return Err(e);
            }
        };
        if let (TakeReason::Restarted, Seen::Held { record, .. }) = (reason, &seen) {
            info!(
                holder = %me.holder,
                earlier_instance = %record.instance,
                expires_in_ms = record.expires_at_ms.saturating_sub(now_ms()),
                "The lease is held by an earlier process with this coordinator id (a restart): \
                 taking it back at once; should that process still run, it is fenced and stops"
            );
        }
        let now = now_ms();
        let record = LeaseRecord {
            holder: me.holder.clone(),
            instance: me.instance.clone(),
            acquired_at_ms: now,
            renewed_at_ms: now,
            expires_at_ms: now + cfg.ttl.as_millis() as u64,
        };
        let started = Instant::now();
        let body = serde_json::to_vec(&record).expect("lease record serializes");
        let written = if revision == 0 {
            kv.create(LEASE_KEY, body.into()).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    None
                } else {
                    Some(LeaseError::Unavailable(e.to_string()))
                }
            })
        } else {
            kv.update(LEASE_KEY, body.into(), revision)
                .await
                .map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        None
                    } else {
                        Some(LeaseError::Unavailable(e.to_string()))
                    }
                })
        };
        match written {
            Ok(rev) => {
                info!(holder = %me.holder, instance = %me.instance, revision = rev, "Coordinator lease acquired");
                Ok(Some(Lease {
                    kv: kv.clone(),
                    cfg,
                    record: Mutex::new(record),
                    revision: AtomicU64::new(rev),
                    renewed: Mutex::new(started),
                    lost: CancellationToken::new(),
                    lost_reason: Mutex::new(None),
                }))
            }
            // Somebody else was faster.
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// Waits until the lease can be taken, then takes it. `Ok(None)` when
    /// `stop` is cancelled first; an error only when another live process
    /// runs with this coordinator id ([`LeaseError::Duplicate`]): other
    /// failures are retried.
    pub async fn acquire(
        kv: &kv::Store,
        cfg: Config,
        me: &Claimant,
        stop: &CancellationToken,
    ) -> Result<Option<Lease>, LeaseError> {
        let mut logged = false;
        loop {
            match Self::try_acquire(kv, cfg, me).await {
                Ok(Some(l)) => return Ok(Some(l)),
                Ok(None) => {
                    if !logged {
                        match look(kv).await {
                            Ok(Seen::Held { record, .. }) => info!(
                                holder = %me.holder,
                                lease_holder = %record.holder,
                                expires_in_ms = record.expires_at_ms.saturating_sub(now_ms()),
                                "Standing by: another coordinator holds the lease"
                            ),
                            _ => {
                                info!(holder = %me.holder, "Standing by: another coordinator holds the lease")
                            }
                        }
                        logged = true;
                    }
                }
                Err(e @ LeaseError::Duplicate { .. }) => return Err(e),
                Err(e) => warn!(error = %e, "Cannot read the coordinator lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.poll_every) => {}
                _ = stop.cancelled() => return Ok(None),
            }
        }
    }

    /// The revision of our last write.
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> Config {
        self.cfg
    }

    /// Cancelled once the lease is lost, expired or released.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Whether our own clock still trusts the lease.
    fn fresh(&self) -> bool {
        self.renewed.lock().expect("lease lock").elapsed() < self.cfg.trusted_for()
    }

    /// Why the lease was lost, once it was (None while held or after a
    /// release).
    pub fn lost_reason(&self) -> Option<LeaseError> {
        self.lost_reason.lock().expect("lease lock").clone()
    }

    fn mark_lost(&self, why: &LeaseError) {
        if !self.lost.is_cancelled() {
            match why {
                LeaseError::Duplicate { .. } => error!(
                    error = %why,
                    "Coordinator lease taken by another process with this coordinator id: this process stops for good"
                ),
                _ => warn!(error = %why, "Coordinator lease lost: this coordinator stops acting"),
            }
            *self.lost_reason.lock().expect("lease lock") = Some(why.clone());
            self.lost.cancel();
        }
    }

    /// Extends the lease (compare-and-set on our revision).
    pub async fn renew(&self) -> Result<(), LeaseError> {
        if self.lost.is_cancelled() {
            return Err(LeaseError::Expired);
        }
        if !self.fresh() {
            let e = LeaseError::Expired;
            self.mark_lost(&e);
            return Err(e);
        }
        let started = Instant::now();
        let now = now_ms();
        let body = {
            let mut r = self.record.lock().expect("lease lock");
            r.renewed_at_ms = now;
            r.expires_at_ms = now + self.cfg.ttl.as_millis() as u64;
            serde_json::to_vec(&*r).expect("lease record serializes")
        };
        match self
            .kv
            .update(LEASE_KEY, body.into(), self.revision())
            .await
        {
            Ok(rev) => {
                self.revision.store(rev, Ordering::SeqCst);
                *self.renewed.lock().expect("lease lock") = started;
                debug!(revision = rev, "Coordinator lease renewed");
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // A renewal whose reply was lost (a timeout under load) was
                // still written: the bucket then holds our own record at a
                // revision we never saw. Adopt it and renew again; any other
                // writer's record means the lease is lost.
                if self.adopt_own_write().await {
                    return Box::pin(self.renew()).await;
                }
                let e = self.lost_to_whom().await;
                self.mark_lost(&e);
                Err(e)
            }
            Err(e) => {
                let e = LeaseError::Unavailable(e.to_string());
                if !self.fresh() {
                    self.mark_lost(&LeaseError::Expired);
                }
                Err(e)
            }
        }
    }

    /// When the lease key holds a record written by this very process (its
    /// `instance`, random per process, so nobody else writes it) at a newer
    /// revision than our last confirmed write, takes that revision as ours.
    async fn adopt_own_write(&self) -> bool {
        let instance = self.record.lock().expect("lease lock").instance.clone();
        match look(&self.kv).await {
            Ok(Seen::Held { record, revision })
                if record.instance == instance && revision > self.revision() =>
            {
                debug!(
                    revision,
                    "Adopting our own lease write whose reply was lost"
                );
                self.revision.store(revision, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    async fn lost_to_whom(&self) -> LeaseError {
        let (holder, instance) = {
            let r = self.record.lock().expect("lease lock");
            (r.holder.clone(), r.instance.clone())
        };
        match look(&self.kv).await {
            Ok(seen) => loss_of(seen, &holder, &instance),
            Err(e) => e,
        }
    }

    /// The fence: succeeds only if we still hold the lease, by our clock and
    /// by the bucket (nobody wrote the key since our last write). Marks the
    /// lease lost otherwise.
    pub async fn check(&self) -> Result<(), LeaseError> {
        if self.lost.is_cancelled() {
            return Err(LeaseError::Expired);
        }
        if !self.fresh() {
            let e = LeaseError::Expired;
            self.mark_lost(&e);
            return Err(e);
        }
        let entry = self
            .kv
            .entry(LEASE_KEY)
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        match entry {
            Some(e) if e.revision == self.revision() => Ok(()),
            Some(_) if self.adopt_own_write().await => Ok(()),
            _ => {
                let e = self.lost_to_whom().await;
                self.mark_lost(&e);
                Err(e)
            }
        }
    }

    /// Renews every `renew_every` until the lease is lost or `stop` is
    /// cancelled.
    pub async fn keep(&self, stop: &CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.renew_every) => {}
                _ = stop.cancelled() => return,
                _ = self.lost.cancelled() => return,
            }
            if let Err(e) = self.renew().await {
                if self.lost.is_cancelled() {
                    return;
                }
                warn!(error = %e, "Could not renew the coordinator lease; retrying");
            }
        }
    }

    /// Hands the lease over: marks it expired now (compare-and-set), so a
    /// standby takes it at its next look instead of after the ttl.
    pub async fn release(&self) {
        if self.lost.is_cancelled() {
            return;
        }
        self.lost.cancel();
        let body = {
            let mut r = self.record.lock().expect("lease lock");
            r.expires_at_ms = 0;
            serde_json::to_vec(&*r).expect("lease record serializes")
        };
        match self
            .kv
            .update(LEASE_KEY, body.into(), self.revision())
            .await
        {
            Ok(_) => info!("Coordinator lease released"),
            Err(e) => {
                warn!(error = %e, "Could not release the coordinator lease; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn bucket() -> (keywave_harness::NatsServer, kv::Store) {
        let server = keywave_harness::NatsServer::start();
        let js = keywave_common::topology::context(server.client().await);
        let kv = keywave_common::topology::leases(&js, &Default::default())
            .await
            .unwrap();
        (server, kv)
    }

    fn quick() -> Config {
        Config {
            ttl: Duration::from_millis(600),
            renew_every: Duration::from_millis(100),
            poll_every: Duration::from_millis(50),
        }
    }

    #[test]
    fn config_validation_names_the_bad_timing() {
        assert!(Config::default().validate().is_ok());
        // A dead holder is replaced within ttl + poll: under 5 s by default.
        let d = Config::default();
        assert!(
            d.ttl + d.poll_every <= Duration::from_millis(4_500),
            "{d:?}"
        );
        assert_eq!(d.renew_every, Duration::from_secs(1));
        let bad = Config {
            renew_every: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "lease renew period");
    }

    #[tokio::test]
    async fn one_holder_a_standby_takes_over_after_expiry_and_the_stale_one_is_fenced() {
        let (_server, kv) = bucket().await;
        let a = Lease::try_acquire(&kv, quick(), &Claimant::new("a", "a1"))
            .await
            .unwrap()
            .expect("free lease");
        assert!(Lease::try_acquire(&kv, quick(), &Claimant::new("b", "b1"))
            .await
            .unwrap()
            .is_none());
        // Renewing keeps it.
        a.renew().await.unwrap();
        a.check().await.unwrap();

        // A stops renewing (a crash, or a long pause): B takes over once the
        // lease expired.
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let b = Lease::acquire(&kv, quick(), &Claimant::new("b", "b1"), &stop)
            .await
            .unwrap()
            .expect("takes over");
        assert!(t0.elapsed() <= quick().ttl + Duration::from_millis(500));
        b.check().await.unwrap();

        // A comes back: its fence fails and it knows who holds the lease.
        assert!(matches!(a.check().await, Err(LeaseError::Expired)));
        assert!(a.lost().is_cancelled());
        assert!(a.renew().await.is_err());

        // Release hands over at once.
        b.release().await;
        let c = Lease::try_acquire(&kv, quick(), &Claimant::new("c", "c1"))
            .await
            .unwrap()
            .expect("released lease is free");
        c.check().await.unwrap();
        assert!(b.check().await.is_err());
    }

    #[tokio::test]
    async fn a_writer_other_than_the_holder_fences_it() {
        let (_server, kv) = bucket().await;
        let cfg = Config {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_every: Duration::from_secs(1),
        };
        let a = Lease::try_acquire(&kv, cfg, &Claimant::new("a", "a1"))
            .await
            .unwrap()
            .unwrap();
        // Somebody overwrites the key (an operator, a buggy peer).
        kv.put(LEASE_KEY, "{}".into()).await.unwrap();
        match a.check().await {
            Err(LeaseError::Lost { .. }) => {}
            other => panic!("expected a lost lease, got {other:?}"),
        }
        assert!(a.lost().is_cancelled());
    }

    /// A renewal written by the server whose reply never came back leaves
    /// the key at a revision the holder did not see: the holder adopts its
    /// own write instead of fencing itself, but still yields to anybody
    /// else's.
    #[tokio::test]
    async fn a_renewal_whose_reply_was_lost_is_adopted_not_fenced() {
        let (_server, kv) = bucket().await;
        let cfg = Config {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_every: Duration::from_secs(1),
        };
        let a = Lease::try_acquire(&kv, cfg, &Claimant::new("a", "a1"))
            .await
            .unwrap()
            .unwrap();
        let before = a.revision();
        // The lost write: our own record, one revision on.
        let own = a.record.lock().unwrap().clone();
        let rev = kv
            .update(LEASE_KEY, serde_json::to_vec(&own).unwrap().into(), before)
            .await
            .unwrap();
        a.check().await.unwrap();
        assert_eq!(a.revision(), rev);
        kv.update(LEASE_KEY, serde_json::to_vec(&own).unwrap().into(), rev)
            .await
            .unwrap();
        a.renew().await.unwrap();
        assert!(a.revision() > rev);
        assert!(!a.lost().is_cancelled());

        // Another process's record is not adopted.
        let mut other = own.clone();
        other.holder = "b".into();
        other.instance = "b1".into();
        kv.put(LEASE_KEY, serde_json::to_vec(&other).unwrap().into())
            .await
            .unwrap();
        assert!(matches!(a.renew().await, Err(LeaseError::Lost { .. })));
        assert!(a.lost().is_cancelled());
    }

    fn held(holder: &str, instance: &str, revision: u64) -> Seen {
        let now = now_ms();
        Seen::Held {
            record: LeaseRecord {
                holder: holder.into(),
                instance: instance.into(),
                acquired_at_ms: now,
                renewed_at_ms: now,
                expires_at_ms: now + 4_000,
            },
            revision,
        }
    }

    #[test]
    fn the_instance_nonce_decides_who_takes_the_lease() {
        let take = |revision, reason| Verdict::Take { revision, reason };
        // Free: anybody takes it.
        assert_eq!(
            decide(&Seen::Free { revision: 7 }, "x", "x1", None),
            take(7, TakeReason::Free)
        );
        // Our own process's record: ours.
        assert_eq!(
            decide(&held("x", "x1", 7), "x", "x1", Some(3)),
            take(7, TakeReason::Own)
        );
        // Another coordinator's: stand by.
        assert_eq!(decide(&held("y", "y1", 7), "x", "x1", None), Verdict::Wait);
        assert_eq!(
            decide(&held("y", "y1", 7), "x", "x1", Some(7)),
            Verdict::Wait
        );
        // Our id, another instance, seen at our first look (or unchanged
        // since): the process we replace, taken back at once.
        assert_eq!(
            decide(&held("x", "x0", 7), "x", "x1", None),
            take(7, TakeReason::Restarted)
        );
        assert_eq!(
            decide(&held("x", "x0", 7), "x", "x1", Some(7)),
            take(7, TakeReason::Restarted)
        );
        // Our id, another instance, written after our first look: that
        // process is alive: we are the duplicate.
        assert_eq!(
            decide(&held("x", "x0", 9), "x", "x1", Some(7)),
            Verdict::Duplicate {
                instance: "x0".into()
            }
        );
    }

    #[test]
    fn a_holder_replaced_by_its_own_id_learns_it_is_a_duplicate() {
        assert!(matches!(
            loss_of(held("x", "x2", 9), "x", "x1"),
            LeaseError::Duplicate { id, instance } if id == "x" && instance == "x2"
        ));
        assert!(matches!(
            loss_of(held("y", "y1", 9), "x", "x1"),
            LeaseError::Lost { holder, revision: 9 } if holder == "y"
        ));
        assert!(matches!(
            loss_of(Seen::Free { revision: 9 }, "x", "x1"),
            LeaseError::Lost { .. }
        ));
    }

    /// A coordinator restarted with the holder's id takes the lease back at
    /// once (no wait for the ttl); the earlier process, should it still
    /// run, is fenced as a duplicate and does not take it back.
    #[tokio::test]
    async fn a_restart_with_the_same_id_takes_the_lease_back_at_once() {
        let (_server, kv) = bucket().await;
        let cfg = Config {
            ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            poll_every: Duration::from_millis(50),
        };
        let old = Lease::try_acquire(&kv, cfg, &Claimant::new("x", "x-old"))
            .await
            .unwrap()
            .unwrap();
        let t0 = Instant::now();
        let stop = CancellationToken::new();
        let new_me = Claimant::new("x", "x-new");
        let new = Lease::acquire(&kv, cfg, &new_me, &stop)
            .await
            .unwrap()
            .expect("taken back");
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t0.elapsed()
        );
        new.check().await.unwrap();

        // The earlier process is fenced, as a duplicate.
        assert!(matches!(
            old.renew().await,
            Err(LeaseError::Duplicate { ref id, ref instance }) if id == "x" && instance == "x-new"
        ));
        assert!(old.lost().is_cancelled());
        assert!(matches!(
            old.lost_reason(),
            Some(LeaseError::Duplicate { .. })
        ));
        assert!(old.check().await.is_err());
        // Had it been standing by instead, it would not take the lease back
        // either: the record changed since its first look.
        let old_me = Claimant::new("x", "x-old");
        let _ = old_me.first_look.set(new.revision() - 1);
        assert!(matches!(
            Lease::try_acquire(&kv, cfg, &old_me).await,
            Err(LeaseError::Duplicate { .. })
        ));
        new.renew().await.unwrap();
        new.check().await.unwrap();
    }

    /// Two live processes with one id, both standing by while another
    /// coordinator holds the lease: whichever gets the lease next keeps it,
    /// the other stops as a duplicate instead of taking it from a live
    /// process.
    #[tokio::test]
    async fn a_second_live_process_with_the_same_id_stops() {
        let (_server, kv) = bucket().await;
        let cfg = quick();
        let z = Lease::try_acquire(&kv, cfg, &Claimant::new("z", "z1"))
            .await
            .unwrap()
            .unwrap();
        let one = Claimant::new("x", "x1");
        let two = Claimant::new("x", "x2");
        assert!(Lease::try_acquire(&kv, cfg, &one).await.unwrap().is_none());
        assert!(Lease::try_acquire(&kv, cfg, &two).await.unwrap().is_none());
        z.release().await;
        let held = Lease::try_acquire(&kv, cfg, &one)
            .await
            .unwrap()
            .expect("free after the release");
        assert!(matches!(
            Lease::try_acquire(&kv, cfg, &two).await,
            Err(LeaseError::Duplicate { ref instance, .. }) if instance == "x1"
        ));
        held.check().await.unwrap();
    }
}
