//! The regional secret store: one record per credential, holding the staged
//! versions (PENDING, CURRENT, PREVIOUS) and which task last changed them,
//! behind [`RecordStore`] so the protocol runs on either [`SecretStore`] (KV
//! bucket `keywave-secrets-<region>`, sealed with the region key) or
//! [`memory::MemoryStore`]; every write is a compare-and-set on the revision
//! read, so two workers can never both win a step.

pub mod memory;

use async_nats::jetstream::{
    self,
    kv::{self, Operation},
};
use async_trait::async_trait;
use bytes::Bytes;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::ids::{self, IdError};
use keywave_common::topology;
use keywave_common::wire::{Step, Strategy, TaskAction};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use thiserror::Error;

/// Applied tasks remembered per credential, so that a late redelivery of a task
/// that was superseded by a newer one is recognised instead of re-run.
pub const HISTORY_LEN: usize = 16;

/// Version of the sealed record layout.
const RECORD_FORMAT: u16 = 1;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The bucket does not exist (the worker creates it at start-up with
    /// `topology::ensure_region`).
    #[error("secret store bucket {bucket} does not exist")]
    Missing { bucket: String },
    /// NATS could not be reached or timed out: worth retrying.
    #[error("secret store unavailable: {0}")]
    Unavailable(String),
    /// Another writer changed the record since it was read.
    #[error("record of {credential} changed concurrently")]
    Conflict { credential: String },
    /// The record does not open with this region key, or does not parse.
    #[error("record of {credential} cannot be opened: {reason}")]
    Corrupt { credential: String, reason: String },
    /// `enroll` on a credential that already has a CURRENT secret.
    #[error("credential {credential} is already managed by keywave")]
    AlreadyManaged { credential: String },
    #[error(transparent)]
    InvalidId(#[from] IdError),
}

impl StoreError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// One staged version of a credential's secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub secret: Secret,
    /// `RegionKey::fingerprint` of the secret.
    pub fingerprint: String,
    /// The task that generated it (`None` for an enrolled secret).
    pub task_id: Option<String>,
    /// When it entered its current stage, ms since the epoch.
    pub since_ms: u64,
    /// Strategy of the rotation that generated it; a secret made CURRENT by a
    /// containment rotation is never rolled back from.
    pub strategy: Option<Strategy>,
    /// The login this secret opens, as the worker found it when it proved
    /// the secret: the principal itself, or for alternating users the login
    /// of the pair that holds it (what a consumer must connect as). `None`
    /// until proven (PENDING, enrolled secrets).
    pub login: Option<String>,
}

/// A task that changed the record (promote or rollback), as remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub task_id: String,
    pub action: TaskAction,
    /// Step recorded with the durable write (`Promoted` or `Restored`).
    pub step: Step,
    pub at_ms: u64,
    pub new_fingerprint: Option<String>,
    pub old_fingerprint: Option<String>,
}

/// The state of one credential.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub current: Option<Version>,
    pub previous: Option<Version>,
    pub pending: Option<Version>,
    /// The last task whose durable write completed.
    pub last_task: Option<String>,
    /// What that task was and the step it recorded.
    pub last_action: Option<TaskAction>,
    pub last_step: Option<Step>,
    /// The last [`HISTORY_LEN`] applied tasks, oldest first.
    pub history: Vec<Applied>,
}

impl Record {
    /// The applied-task entry of `task_id`, if this record remembers it.
    pub fn applied(&self, task_id: &str) -> Option<&Applied> {
        self.history.iter().rev().find(|a| a.task_id == task_id)
    }

    /// Marks `applied` as the last task and remembers it (bounded).
    pub fn push_applied(&mut self, applied: Applied) {
        self.last_task = Some(applied.task_id.clone());
        self.last_action = Some(applied.action);
        self.last_step = Some(applied.step);
        self.history.push(applied);
        if self.history.len() > HISTORY_LEN {
            let extra = self.history.len() - HISTORY_LEN;
            self.history.drain(..extra);
        }
    }
}

/// What [`RecordStore::enroll_new`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enrolment {
    /// The credential had no record; one now holds the secret as CURRENT.
    Stored,
    /// The credential already has a record, left exactly as it was.
    Exists,
}

/// A record with the KV revision it was read at (0: never written), for CAS.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub record: Record,
    pub revision: u64,
    pub exists: bool,
}

/// What the protocol, the runner and the admin service need from a region's
/// secret store. Implementations give revisions the KV semantics: 0 means
/// "never written", every write returns a larger revision, and a save whose
/// expected revision is stale fails with [`StoreError::Conflict`].
#[async_trait]
pub trait RecordStore: Send + Sync + std::fmt::Debug {
    fn region(&self) -> &str;

    /// The keyed fingerprint of `secret` under this region's key.
    fn fingerprint(&self, secret: &Secret) -> String;

    /// A new version of `secret`, fingerprinted.
    fn version(
        &self,
        secret: Secret,
        task_id: Option<String>,
        strategy: Option<Strategy>,
    ) -> Version {
        Version {
            fingerprint: self.fingerprint(&secret),
            secret,
            task_id,
            since_ms: keywave_common::now_ms(),
            strategy,
            login: None,
        }
    }

    /// Reads a credential's record with its revision (an empty record at
    /// revision 0 when it was never written).
    async fn load(&self, credential_id: &str) -> Result<Loaded, StoreError>;

    /// Writes `record` if the stored revision is still `expected_revision`
    /// (0: the record must not exist yet). Returns the new revision.
    async fn save(
        &self,
        credential_id: &str,
        record: &Record,
        expected_revision: u64,
    ) -> Result<u64, StoreError>;

    /// Removes a credential's record (its secrets are no longer managed).
    async fn forget(&self, credential_id: &str) -> Result<(), StoreError>;

    /// The record of a credential, if any.
    async fn get(&self, credential_id: &str) -> Result<Option<Record>, StoreError> {
        let l = self.load(credential_id).await?;
        Ok(l.exists.then_some(l.record))
    }

    /// Records `secret`, the one in use today, as CURRENT for a credential
    /// keywave has not managed before. Idempotent for the same secret; refused
    /// with [`StoreError::AlreadyManaged`] when another secret is CURRENT.
    async fn enroll(&self, credential_id: &str, secret: Secret) -> Result<(), StoreError> {
        loop {
            let mut l = self.load(credential_id).await?;
            if let Some(cur) = &l.record.current {
                if cur.secret == secret {
                    return Ok(());
                }
                return Err(StoreError::AlreadyManaged {
                    credential: credential_id.to_string(),
                });
            }
            l.record.current = Some(self.version(secret.clone(), None, None));
            match self.save(credential_id, &l.record, l.revision).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Records `secret` as CURRENT for a credential that has no record (never
    /// written, or forgotten): a create-if-absent write that never changes an
    /// existing record, whatever it holds ([`Enrolment::Exists`]), so that a
    /// bulk enrolment run again skips what it already stored. The first
    /// attempt expects a never-written key (one write); a conflict reads the
    /// record to tell an existing one from a delete marker, whose revision
    /// the next attempt expects.
    async fn enroll_new(
        &self,
        credential_id: &str,
        secret: Secret,
    ) -> Result<Enrolment, StoreError> {
        let record = Record {
            current: Some(self.version(secret, None, None)),
            ..Record::default()
        };
        let mut expected = 0;
        loop {
            match self.save(credential_id, &record, expected).await {
                Ok(_) => return Ok(Enrolment::Stored),
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            let l = self.load(credential_id).await?;
            if l.exists {
                return Ok(Enrolment::Exists);
            }
            expected = l.revision;
        }
    }
}

// The sealed layout, private to this module. Secrets are borrowed while a
// record is serialized and while it is parsed, so their clear form lives in
// `Secret`s (wiped on drop) and in the sealed buffer's clear text, itself held
// in a `Secret`.
#[derive(Serialize, Deserialize)]
struct StoredVersion<'a> {
    #[serde(borrow)]
    secret: Cow<'a, str>,
    fingerprint: String,
    #[serde(default)]
    task_id: Option<String>,
    since_ms: u64,
    #[serde(default)]
    strategy: Option<Strategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    login: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredRecord<'a> {
    format: u16,
    #[serde(default, borrow)]
    current: Option<StoredVersion<'a>>,
    #[serde(default, borrow)]
    previous: Option<StoredVersion<'a>>,
    #[serde(default, borrow)]
    pending: Option<StoredVersion<'a>>,
    #[serde(default)]
    last_task: Option<String>,
    #[serde(default)]
    last_action: Option<TaskAction>,
    #[serde(default)]
    last_step: Option<Step>,
    #[serde(default)]
    history: Vec<Applied>,
}

fn to_stored(v: &Option<Version>) -> Option<StoredVersion<'_>> {
    v.as_ref().map(|v| StoredVersion {
        secret: Cow::Borrowed(v.secret.expose()),
        fingerprint: v.fingerprint.clone(),
        task_id: v.task_id.clone(),
        since_ms: v.since_ms,
        strategy: v.strategy,
        login: v.login.clone(),
    })
}

fn from_stored(v: Option<StoredVersion>) -> Option<Version> {
    v.map(|v| Version {
        secret: Secret::new(v.secret.into_owned()),
        fingerprint: v.fingerprint,
        task_id: v.task_id,
        since_ms: v.since_ms,
        strategy: v.strategy,
        login: v.login,
    })
}

/// Handle on a region's secret store. Cheap to clone.
#[derive(Clone)]
pub struct SecretStore {
    kv: kv::Store,
    region: String,
    key: RegionKey,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl SecretStore {
    /// Opens the existing bucket `keywave-secrets-<region>`.
    pub async fn open(
        js: &jetstream::Context,
        region: &str,
        key: RegionKey,
    ) -> Result<Self, StoreError> {
        ids::validate("region", region)?;
        let bucket = topology::kv_secrets(region);
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|_| StoreError::Missing { bucket })?;
        Ok(Self::from_kv(kv, region, key))
    }

    /// Wraps a bucket handle already obtained (e.g. from `topology::ensure_region`).
    pub fn from_kv(kv: kv::Store, region: &str, key: RegionKey) -> Self {
        SecretStore {
            kv,
            region: region.to_string(),
            key,
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The keyed fingerprint of `secret` under this region's key.
    pub fn fingerprint(&self, secret: &Secret) -> String {
        self.key.fingerprint(secret)
    }

    /// A new version of `secret`, fingerprinted.
    pub fn version(
        &self,
        secret: Secret,
        task_id: Option<String>,
        strategy: Option<Strategy>,
    ) -> Version {
        RecordStore::version(self, secret, task_id, strategy)
    }

    fn aad(&self, credential_id: &str) -> Vec<u8> {
        format!("{}/{}", self.region, credential_id).into_bytes()
    }

    fn seal(&self, credential_id: &str, r: &Record) -> Result<Bytes, StoreError> {
        let stored = StoredRecord {
            format: RECORD_FORMAT,
            current: to_stored(&r.current),
            previous: to_stored(&r.previous),
            pending: to_stored(&r.pending),
            last_task: r.last_task.clone(),
            last_action: r.last_action,
            last_step: r.last_step,
            history: r.history.clone(),
        };
        // The clear JSON lives only inside a `Secret`, which is wiped on drop;
        // the buffer is sized up front so that growing it leaves no copies.
        let mut buf = Vec::with_capacity(16 * 1024);
        serde_json::to_writer(&mut buf, &stored).map_err(|e| StoreError::Corrupt {
            credential: credential_id.to_string(),
            reason: format!("encode: {e}"),
        })?;
        // serde_json writes valid UTF-8 only.
        let clear = Secret::new(String::from_utf8(buf).map_err(|_| StoreError::Corrupt {
            credential: credential_id.to_string(),
            reason: "encode: not UTF-8".into(),
        })?);
        drop(stored);
        Ok(Bytes::from(
            self.key
                .seal(&self.aad(credential_id), clear.expose().as_bytes()),
        ))
    }

    fn unseal(&self, credential_id: &str, sealed: &[u8]) -> Result<Record, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            credential: credential_id.to_string(),
            reason,
        };
        let clear = self
            .key
            .open(&self.aad(credential_id), sealed)
            .map_err(|e| corrupt(e.to_string()))?;
        let clear = Secret::new(String::from_utf8(clear).map_err(|_| corrupt("not UTF-8".into()))?);
        // serde_json's error text never quotes string values, only positions.
        let s: StoredRecord =
            serde_json::from_str(clear.expose()).map_err(|e| corrupt(e.to_string()))?;
        if s.format != RECORD_FORMAT {
            return Err(corrupt(format!("unknown record format {}", s.format)));
        }
        Ok(Record {
            current: from_stored(s.current),
            previous: from_stored(s.previous),
            pending: from_stored(s.pending),
            last_task: s.last_task,
            last_action: s.last_action,
            last_step: s.last_step,
            history: s.history,
        })
    }

    /// Reads a credential's record with its revision (an empty record at
    /// revision 0 when it was never written).
    pub async fn load(&self, credential_id: &str) -> Result<Loaded, StoreError> {
        ids::validate("credential id", credential_id)?;
        let entry = self
            .kv
            .entry(credential_id)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        match entry {
            None => Ok(Loaded::default()),
            // A deleted record is absent, but the CAS must expect the marker's revision.
            Some(e) if matches!(e.operation, Operation::Delete | Operation::Purge) => Ok(Loaded {
                record: Record::default(),
                revision: e.revision,
                exists: false,
            }),
            Some(e) => Ok(Loaded {
                record: self.unseal(credential_id, &e.value)?,
                revision: e.revision,
                exists: true,
            }),
        }
    }

    /// The record of a credential, if any.
    pub async fn get(&self, credential_id: &str) -> Result<Option<Record>, StoreError> {
        RecordStore::get(self, credential_id).await
    }

    /// Writes `record` if the stored revision is still `expected_revision`
    /// (0: the record must not exist yet). Returns the new revision.
    pub async fn save(
        &self,
        credential_id: &str,
        record: &Record,
        expected_revision: u64,
    ) -> Result<u64, StoreError> {
        ids::validate("credential id", credential_id)?;
        let sealed = self.seal(credential_id, record)?;
        self.kv
            .update(credential_id, sealed, expected_revision)
            .await
            .map_err(|e| match e.kind() {
                kv::UpdateErrorKind::WrongLastRevision => StoreError::Conflict {
                    credential: credential_id.to_string(),
                },
                _ => StoreError::Unavailable(e.to_string()),
            })
    }

    /// Records `secret`, the one in use today, as CURRENT for a credential
    /// keywave has not managed before. Idempotent for the same secret; refused
    /// with [`StoreError::AlreadyManaged`] when another secret is CURRENT.
    pub async fn enroll(&self, credential_id: &str, secret: Secret) -> Result<(), StoreError> {
        RecordStore::enroll(self, credential_id, secret).await
    }

    /// Records `secret` as CURRENT for a credential without a record;
    /// leaves an existing record untouched ([`RecordStore::enroll_new`]).
    pub async fn enroll_new(
        &self,
        credential_id: &str,
        secret: Secret,
    ) -> Result<Enrolment, StoreError> {
        RecordStore::enroll_new(self, credential_id, secret).await
    }

    /// Removes a credential's record (its secrets are no longer managed).
    pub async fn forget(&self, credential_id: &str) -> Result<(), StoreError> {
        ids::validate("credential id", credential_id)?;
        self.kv
            .purge(credential_id)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))
    }
}

#[async_trait]
impl RecordStore for SecretStore {
    fn region(&self) -> &str {
        &self.region
    }

    fn fingerprint(&self, secret: &Secret) -> String {
        self.key.fingerprint(secret)
    }

    async fn load(&self, credential_id: &str) -> Result<Loaded, StoreError> {
        SecretStore::load(self, credential_id).await
    }

    async fn save(
        &self,
        credential_id: &str,
        record: &Record,
        expected_revision: u64,
    ) -> Result<u64, StoreError> {
        SecretStore::save(self, credential_id, record, expected_revision).await
    }

    async fn forget(&self, credential_id: &str) -> Result<(), StoreError> {
        SecretStore::forget(self, credential_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestBucket;

    #[tokio::test]
    async fn enroll_get_and_cas() {
        let b = TestBucket::new().await;
        let store = b.store.clone();
        assert!(store.get("c1").await.unwrap().is_none());
        let s = Secret::new("today-secret-value".into());
        store.enroll("c1", s.clone()).await.unwrap();
        store.enroll("c1", s.clone()).await.unwrap();
        assert!(matches!(
            store
                .enroll("c1", Secret::new("another".into()))
                .await
                .unwrap_err(),
            StoreError::AlreadyManaged { .. }
        ));
        let l = store.load("c1").await.unwrap();
        let cur = l.record.current.clone().unwrap();
        assert_eq!(cur.secret, s);
        assert_eq!(cur.fingerprint, store.fingerprint(&s));

        // Enrolled: which login it opens is not known yet.
        assert_eq!(cur.login, None);

        // A stale revision loses; the login survives a round trip.
        let mut r = l.record.clone();
        r.last_task = Some("t1".into());
        r.current.as_mut().unwrap().login = Some("app_clone".into());
        let rev = store.save("c1", &r, l.revision).await.unwrap();
        assert!(matches!(
            store.save("c1", &r, l.revision).await.unwrap_err(),
            StoreError::Conflict { .. }
        ));
        assert!(rev > l.revision);
        let again = store.get("c1").await.unwrap().unwrap();
        assert_eq!(again.current.unwrap().login.as_deref(), Some("app_clone"));

        // The bucket holds ciphertext only, bound to the credential id.
        let raw = b.kv.get("c1").await.unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("today-secret-value"));
        assert!(matches!(
            store.unseal("c2", &raw).unwrap_err(),
            StoreError::Corrupt { .. }
        ));

        // Invalid ids never reach the bucket.
        assert!(matches!(
            store.get("a.b").await.unwrap_err(),
            StoreError::InvalidId(_)
        ));
    }

    #[tokio::test]
    async fn enroll_new_creates_only_what_is_absent() {
        let b = TestBucket::new().await;
        let store = b.store.clone();
        let first = Secret::new("first-secret".into());
        assert_eq!(
            store.enroll_new("c1", first.clone()).await.unwrap(),
            Enrolment::Stored
        );
        // Another secret, or the same one: the record is left as it was.
        let rev = store.load("c1").await.unwrap().revision;
        for s in [Secret::new("second-secret".into()), first.clone()] {
            assert_eq!(store.enroll_new("c1", s).await.unwrap(), Enrolment::Exists);
        }
        let l = store.load("c1").await.unwrap();
        assert_eq!(l.revision, rev);
        assert_eq!(l.record.current.unwrap().secret, first);

        // A record without CURRENT (a rotation staged) is a record too.
        let staged = Record {
            pending: Some(store.version(Secret::new("staged".into()), None, None)),
            ..Record::default()
        };
        store.save("c2", &staged, 0).await.unwrap();
        assert_eq!(
            store.enroll_new("c2", first.clone()).await.unwrap(),
            Enrolment::Exists
        );
        assert!(store.get("c2").await.unwrap().unwrap().current.is_none());

        // A forgotten credential is absent: the write expects its marker.
        store.forget("c1").await.unwrap();
        let again = Secret::new("after-forget".into());
        assert_eq!(
            store.enroll_new("c1", again.clone()).await.unwrap(),
            Enrolment::Stored
        );
        assert_eq!(
            store
                .get("c1")
                .await
                .unwrap()
                .unwrap()
                .current
                .unwrap()
                .secret,
            again
        );
        assert!(matches!(
            store.enroll_new("a.b", again).await.unwrap_err(),
            StoreError::InvalidId(_)
        ));
    }

    #[test]
    fn history_is_bounded() {
        let mut r = Record::default();
        for i in 0..(HISTORY_LEN + 5) {
            r.push_applied(Applied {
                task_id: format!("t{i}"),
                action: TaskAction::Rotate,
                step: Step::Promoted,
                at_ms: 0,
                new_fingerprint: None,
                old_fingerprint: None,
            });
        }
        assert_eq!(r.history.len(), HISTORY_LEN);
        assert_eq!(r.last_task.as_deref(), Some("t20"));
        assert!(r.applied("t0").is_none());
        assert!(r.applied("t20").is_some());
    }
}
