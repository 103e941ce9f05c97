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

use async_nats::jetstream::kv::{self, Operation};
use keywave_common::now_ms;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The key of the coordinators' lease.
pub const LEASE_KEY: &str = "coordinator";

/// Lease timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long a lease lasts without renewal: a standby takes over at most
    /// this long (plus `poll_every`) after the holder died. Default 15s.
    pub ttl: Duration,
    /// How often the holder renews. Must be well under `ttl`. Default 5s.
    pub renew_every: Duration,
    /// How often a standby looks at the lease. Default 1s.
    pub poll_every: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
            poll_every: Duration::from_secs(1),
        }
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
    /// Random per process: a restarted coordinator with the same id is
    /// another instance and waits for the expiry like anybody else.
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

#[derive(Debug, Error)]
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
}

/// What a look at the lease found.
#[derive(Debug, Clone)]
pub enum Seen {
    /// Nobody holds it (never written, released or expired).
    Free { revision: u64 },
    /// Held by `record` until its expiry.
    Held { record: LeaseRecord, revision: u64 },
}

/// Says who holds the lease a coordinator waits for. A record with this
/// coordinator's own id comes from an earlier process (a restart after a
/// crash): it is not taken back at once, because a second live process
/// started with the same id would then take over from the first one and the
/// two would fence each other in turn; it is waited out like any other.
async fn log_standby(kv: &kv::Store, holder: &str) {
    match look(kv).await {
        Ok(Seen::Held { record, .. }) if record.holder == holder => {
            let left = record.expires_at_ms.saturating_sub(now_ms());
            info!(
                holder,
                earlier_instance = %record.instance,
                expires_in_ms = left,
                "Standing by: the lease is held by an earlier process with this coordinator id; \
                 waiting for it to expire (a live process with the same id must not be taken over)"
            );
        }
        Ok(Seen::Held { record, .. }) => {
            info!(holder, lease_holder = %record.holder, "Standing by: another coordinator holds the lease")
        }
        _ => info!(holder, "Standing by: another coordinator holds the lease"),
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
}

impl Lease {
    /// Takes the lease if nobody holds it; `Ok(None)` when somebody does.
    pub async fn try_acquire(
        kv: &kv::Store,
        cfg: Config,
        holder: &str,
        instance: &str,
    ) -> Result<Option<Lease>, LeaseError> {
        let revision = match look(kv).await? {
            // Our own record, left by this very process after it stopped
            // trusting its lease (a renewal starved past the trusted window):
            // nobody wrote since, and the compare-and-set below fails if
            // anybody does first, so taking it back is safe and avoids
            // standing by for our own expiry.
            Seen::Held { record, revision } if record.instance == instance => revision,
            Seen::Held { .. } => return Ok(None),
            Seen::Free { revision } => revision,
        };
        let now = now_ms();
        let record = LeaseRecord {
            holder: holder.to_string(),
            instance: instance.to_string(),
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
                info!(holder, revision = rev, "Coordinator lease acquired");
                Ok(Some(Lease {
                    kv: kv.clone(),
                    cfg,
                    record: Mutex::new(record),
                    revision: AtomicU64::new(rev),
                    renewed: Mutex::new(started),
                    lost: CancellationToken::new(),
                }))
            }
            // Somebody else was faster.
            Err(None) => Ok(None),
            Err(Some(e)) => Err(e),
        }
    }

    /// Waits until the lease can be taken, then takes it. `None` when `stop`
    /// is cancelled first.
    pub async fn acquire(
        kv: &kv::Store,
        cfg: Config,
        holder: &str,
        instance: &str,
        stop: &CancellationToken,
    ) -> Option<Lease> {
        let mut logged = false;
        loop {
            match Self::try_acquire(kv, cfg, holder, instance).await {
                Ok(Some(l)) => return Some(l),
                Ok(None) => {
                    if !logged {
                        log_standby(kv, holder).await;
                        logged = true;
                    }
                }
                Err(e) => warn!(error = %e, "Cannot read the coordinator lease; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.poll_every) => {}
                _ = stop.cancelled() => return None,
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

    fn mark_lost(&self, why: &LeaseError) {
        if !self.lost.is_cancelled() {
            warn!(error = %why, "Coordinator lease lost: this coordinator stops acting");
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
        match look(&self.kv).await {
            Ok(Seen::Held { record, revision }) => LeaseError::Lost {
                holder: record.holder,
                revision,
            },
            Ok(Seen::Free { revision }) => LeaseError::Lost {
                holder: "nobody".into(),
                revision,
            },
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
        let bad = Config {
            renew_every: Duration::from_secs(10),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field(), "lease renew period");
    }

    #[tokio::test]
    async fn one_holder_a_standby_takes_over_after_expiry_and_the_stale_one_is_fenced() {
        let (_server, kv) = bucket().await;
        let a = Lease::try_acquire(&kv, quick(), "a", "a1")
            .await
            .unwrap()
            .expect("free lease");
        assert!(Lease::try_acquire(&kv, quick(), "b", "b1")
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
        let b = Lease::acquire(&kv, quick(), "b", "b1", &stop)
            .await
            .expect("takes over");
        assert!(t0.elapsed() <= quick().ttl + Duration::from_millis(500));
        b.check().await.unwrap();

        // A comes back: its fence fails and it knows who holds the lease.
        assert!(matches!(a.check().await, Err(LeaseError::Expired)));
        assert!(a.lost().is_cancelled());
        assert!(a.renew().await.is_err());

        // Release hands over at once.
        b.release().await;
        let c = Lease::try_acquire(&kv, quick(), "c", "c1")
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
        let a = Lease::try_acquire(&kv, cfg, "a", "a1")
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
        let a = Lease::try_acquire(&kv, cfg, "a", "a1")
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
        other.instance = "b1".into();
        kv.put(LEASE_KEY, serde_json::to_vec(&other).unwrap().into())
            .await
            .unwrap();
        assert!(matches!(a.renew().await, Err(LeaseError::Lost { .. })));
        assert!(a.lost().is_cancelled());
    }
}
