//! An in-memory [`RecordStore`] with the KV bucket's compare-and-set
//! semantics (one revision sequence per store, delete markers, conflicts), so
//! protocol tests and demos need no nats-server. It can be told to be
//! unavailable or to lose CAS races, to exercise the protocol's failure paths.

use super::{Loaded, Record, RecordStore, StoreError};
use async_trait::async_trait;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::ids;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A region's secret store held in this process. Cheap to clone: clones
/// share the records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    region: String,
    key: RegionKey,
    records: Mutex<Records>,
    unavailable: AtomicBool,
    conflicts: AtomicUsize,
}

#[derive(Default)]
struct Records {
    /// The bucket's last revision: like a stream sequence, shared by all keys.
    last: u64,
    /// Per credential: the revision of its last write and the record (`None`
    /// after `forget`, which leaves a marker at its own revision as a purge does).
    entries: HashMap<String, (u64, Option<Record>)>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("region", &self.inner.region)
            .finish_non_exhaustive()
    }
}

impl MemoryStore {
    pub fn new(region: &str, key: RegionKey) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                region: region.to_string(),
                key,
                records: Mutex::new(Records::default()),
                unavailable: AtomicBool::new(false),
                conflicts: AtomicUsize::new(0),
            }),
        }
    }

    /// While `down`, every operation fails with [`StoreError::Unavailable`],
    /// as during a JetStream leader election.
    pub fn set_unavailable(&self, down: bool) {
        self.inner.unavailable.store(down, Ordering::SeqCst);
    }

    /// The next `n` saves fail with [`StoreError::Conflict`] without writing,
    /// as if another writer had won each race.
    pub fn lose_next_saves(&self, n: usize) {
        self.inner.conflicts.store(n, Ordering::SeqCst);
    }

    /// Writes made so far (every save and forget takes one revision).
    pub fn revision(&self) -> u64 {
        self.records().last
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        // Every mutation is a single insert under the lock, so a panic in
        // another test thread cannot leave the map half-written.
        self.inner.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn available(&self) -> Result<(), StoreError> {
        if self.inner.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "in-memory store set unavailable".into(),
            ));
        }
        Ok(())
    }

    fn take_conflict(&self) -> bool {
        self.inner
            .conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

#[async_trait]
impl RecordStore for MemoryStore {
    fn region(&self) -> &str {
        &self.inner.region
    }

    fn fingerprint(&self, secret: &Secret) -> String {
        self.inner.key.fingerprint(secret)
    }

    async fn load(&self, credential_id: &str) -> Result<Loaded, StoreError> {
        ids::validate("credential id", credential_id)?;
        self.available()?;
        Ok(match self.records().entries.get(credential_id) {
            None => Loaded::default(),
            Some((revision, record)) => Loaded {
                record: record.clone().unwrap_or_default(),
                revision: *revision,
                exists: record.is_some(),
            },
        })
    }

    async fn save(
        &self,
        credential_id: &str,
        record: &Record,
        expected_revision: u64,
    ) -> Result<u64, StoreError> {
        ids::validate("credential id", credential_id)?;
        self.available()?;
        let conflict = || StoreError::Conflict {
            credential: credential_id.to_string(),
        };
        if self.take_conflict() {
            return Err(conflict());
        }
        let mut records = self.records();
        let stored = records.entries.get(credential_id).map_or(0, |(r, _)| *r);
        if stored != expected_revision {
            return Err(conflict());
        }
        records.last += 1;
        let revision = records.last;
        records
            .entries
            .insert(credential_id.to_string(), (revision, Some(record.clone())));
        Ok(revision)
    }

    async fn forget(&self, credential_id: &str) -> Result<(), StoreError> {
        ids::validate("credential id", credential_id)?;
        self.available()?;
        let mut records = self.records();
        records.last += 1;
        let revision = records.last;
        records
            .entries
            .insert(credential_id.to_string(), (revision, None));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Enrolment;

    fn store() -> MemoryStore {
        MemoryStore::new("mem", RegionKey::generate())
    }

    #[tokio::test]
    async fn cas_follows_the_kv_revisions() {
        let s = store();
        let l = s.load("c1").await.unwrap();
        assert_eq!((l.revision, l.exists), (0, false));
        let mut r = Record::default();
        let r1 = s.save("c1", &r, 0).await.unwrap();
        // Revision 0 means "must not exist yet".
        assert!(matches!(
            s.save("c1", &r, 0).await,
            Err(StoreError::Conflict { .. })
        ));
        // Revisions are shared by all credentials, as a stream's sequence.
        let other = s.save("c2", &r, 0).await.unwrap();
        assert!(other > r1);
        r.last_task = Some("t1".into());
        let r2 = s.save("c1", &r, r1).await.unwrap();
        assert!(r2 > other);
        assert!(matches!(
            s.save("c1", &r, r1).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            s.get("c1").await.unwrap().unwrap().last_task.as_deref(),
            Some("t1")
        );
    }

    #[tokio::test]
    async fn forget_leaves_a_marker_the_next_save_must_expect() {
        let s = store();
        let secret = Secret::new("today".into());
        s.enroll("c1", secret.clone()).await.unwrap();
        s.enroll("c1", secret.clone()).await.unwrap();
        assert!(matches!(
            s.enroll("c1", Secret::new("other".into())).await,
            Err(StoreError::AlreadyManaged { .. })
        ));
        s.forget("c1").await.unwrap();
        let l = s.load("c1").await.unwrap();
        assert!(!l.exists && l.revision > 0);
        assert!(s.get("c1").await.unwrap().is_none());
        assert!(matches!(
            s.save("c1", &Record::default(), 0).await,
            Err(StoreError::Conflict { .. })
        ));
        s.enroll("c1", Secret::new("other".into())).await.unwrap();
    }

    #[tokio::test]
    async fn enroll_new_never_overwrites() {
        let s = store();
        let first = Secret::new("first".into());
        // A lost race on a never-written key: the record is still absent,
        // so the next attempt stores it.
        s.lose_next_saves(1);
        assert_eq!(
            s.enroll_new("c1", first.clone()).await.unwrap(),
            Enrolment::Stored
        );
        let rev = s.revision();
        assert_eq!(
            s.enroll_new("c1", Secret::new("second".into()))
                .await
                .unwrap(),
            Enrolment::Exists
        );
        assert_eq!(s.revision(), rev, "nothing written");
        assert_eq!(
            s.get("c1").await.unwrap().unwrap().current.unwrap().secret,
            first
        );
        // Forgotten, then enrolled again over the marker.
        s.forget("c1").await.unwrap();
        assert_eq!(
            s.enroll_new("c1", Secret::new("third".into()))
                .await
                .unwrap(),
            Enrolment::Stored
        );
        s.set_unavailable(true);
        assert!(s.enroll_new("c2", first).await.unwrap_err().is_transient());
    }

    #[tokio::test]
    async fn failure_switches_and_invalid_ids() {
        let s = store();
        s.set_unavailable(true);
        let e = s.load("c1").await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
        s.set_unavailable(false);
        s.lose_next_saves(1);
        assert!(matches!(
            s.save("c1", &Record::default(), 0).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(s.revision(), 0);
        s.save("c1", &Record::default(), 0).await.unwrap();
        assert!(matches!(s.get("a.b").await, Err(StoreError::InvalidId(_))));
    }
}
