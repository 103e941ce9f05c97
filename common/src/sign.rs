//! Signed tasks. The coordinator signs every rotation and rollback task with
//! Ed25519; workers verify the signature against the coordinator public keys
//! they are configured with and refuse (terminate and dead-letter) anything
//! unsigned, signed by an unknown key, altered, moved to another subject or
//! expired.
//!
//! # On the wire
//!
//! Three headers, next to `Nats-Msg-Id`, `Content-Type` and `Keywave-Schema`:
//!
//! | header | value |
//! |---|---|
//! | `Keywave-Signature` | base64 (standard, padded) of the 64-byte Ed25519 signature |
//! | `Keywave-Key-Id` | id of the signing key: the first 8 bytes of SHA-256(public key), 16 hex digits |
//! | `Keywave-Expires` | expiry, milliseconds since the Unix epoch (decimal) |
//!
//! # What is signed
//!
//! The signature covers a canonical byte string ([`signing_bytes`]): a
//! domain tag and each of the following fields as a 4-byte big-endian length
//! followed by its bytes, in this order:
//!
//! 1. `keywave-task-sig-v1` (domain separation)
//! 2. the subject the message is published on (`keywave.task.<region>.<campaign>`)
//! 3. the region, campaign id and credential id of the task
//! 4. the `Nats-Msg-Id` (the task id)
//! 5. the `Content-Type`
//! 6. the key id
//! 7. the expiry (decimal milliseconds)
//! 8. SHA-256 of the message body
//!
//! So a valid signature cannot be moved to another subject (another region or
//! campaign), another body, another message id or another expiry. Workers
//! build the same string from the subject the message arrived on, its headers
//! and the decoded body, so a task moved or altered anywhere fails.
//!
//! # Replays
//!
//! A signed task replayed after its expiry is refused. Within its expiry a
//! replay is harmless: the rotation protocol is idempotent per task id (a
//! replayed task resumes or re-reports the task it belongs to, it never
//! rotates the credential a second time), and the worker's store remembers
//! the tasks that changed each credential.
//!
//! # Keys
//!
//! [`SigningKey`] holds the private key; it is zeroized on drop and its
//! `Debug` shows only the key id. Key files hold the 32-byte seed in hex on
//! one line ([`SigningKey::to_file`], mode 0600). Public keys are written as
//! 64 hex digits ([`PublicKey`]).

use async_nats::header::HeaderName;
use async_nats::jetstream::{context::PublishAckFuture, Context};
use async_nats::HeaderMap;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::codec::{self, Format};
use crate::publish::PublishError;
use crate::wire::RotationTask;

/// Header carrying the signature (base64 of 64 bytes).
pub const SIGNATURE_HEADER: &str = "Keywave-Signature";
/// Header carrying the signing key's id.
pub const KEY_ID_HEADER: &str = "Keywave-Key-Id";
/// Header carrying the expiry (ms since the Unix epoch).
pub const EXPIRES_HEADER: &str = "Keywave-Expires";
/// Domain tag of the canonical bytes.
pub const DOMAIN: &str = "keywave-task-sig-v1";
/// Default margin added to a task's deadline to make its expiry: covers
/// redeliveries near the deadline and clock skew between coordinator and
/// workers.
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(300);

const SIGNATURE_NAME: HeaderName = HeaderName::from_static(SIGNATURE_HEADER);
const KEY_ID_NAME: HeaderName = HeaderName::from_static(KEY_ID_HEADER);
const EXPIRES_NAME: HeaderName = HeaderName::from_static(EXPIRES_HEADER);
const CONTENT_TYPE_NAME: HeaderName = HeaderName::from_static(codec::CONTENT_TYPE);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(codec::MSG_ID);

/// Errors handling keys (never carrying key material).
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{what}: expected {expected} hex digits")]
    Format { what: &'static str, expected: usize },
    #[error("public key {0} is not a valid Ed25519 point")]
    InvalidPoint(String),
    #[error("signing key file {path}: {detail}")]
    File { path: String, detail: String },
}

/// The id of a key: the first 8 bytes of SHA-256 of the public key, in hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    fn of(public: &ed25519_dalek::VerifyingKey) -> KeyId {
        let h = Sha256::digest(public.as_bytes());
        KeyId(hex::encode(&h[..8]))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// A coordinator public key (what workers are configured with).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: ed25519_dalek::VerifyingKey,
    id: KeyId,
}

impl PublicKey {
    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<PublicKey, KeyError> {
        let s = s.trim();
        let mut raw = [0u8; 32];
        hex::decode_to_slice(s, &mut raw).map_err(|_| KeyError::Format {
            what: "public key",
            expected: 64,
        })?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| KeyError::InvalidPoint(s.chars().take(16).collect()))?;
        Ok(PublicKey {
            id: KeyId::of(&key),
            key,
        })
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }
    pub fn id(&self) -> &KeyId {
        &self.id
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}, id {})", self.to_hex(), self.id)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        PublicKey::from_hex(s)
    }
}

/// The coordinator's private signing key. Zeroized on drop (the inner
/// `ed25519_dalek::SigningKey` is `ZeroizeOnDrop`); `Debug` shows the key id only.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(id {}, <redacted>)", self.public.id)
    }
}

impl SigningKey {
    /// A new random key (OS randomness).
    pub fn generate() -> SigningKey {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
        SigningKey::from_seed(&seed)
    }

    fn from_seed(seed: &[u8; 32]) -> SigningKey {
        let key = ed25519_dalek::SigningKey::from_bytes(seed);
        let verifying = key.verifying_key();
        SigningKey {
            public: PublicKey {
                id: KeyId::of(&verifying),
                key: verifying,
            },
            key,
        }
    }

    /// Parses the seed from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<SigningKey, KeyError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(s.trim(), seed.as_mut()).map_err(|_| KeyError::Format {
            what: "signing key",
            expected: 64,
        })?;
        Ok(SigningKey::from_seed(&seed))
    }

    /// Reads a key file (the seed in hex). Refuses a file that others may read.
    pub fn from_file(path: &Path) -> Result<SigningKey, KeyError> {
        let err = |detail: String| KeyError::File {
            path: path.display().to_string(),
            detail,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "mode {mode:04o} lets others read it; chmod 600 it"
                )));
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
        SigningKey::from_hex(&text).map_err(|e| err(e.to_string()))
    }

    /// Writes the key to a new file with mode 0600 (refuses to overwrite).
    pub fn to_file(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        let err = |detail: String| KeyError::File {
            path: path.display().to_string(),
            detail,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| err(e.to_string()))?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(self.key.as_bytes())));
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(e.to_string()))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }
    pub fn id(&self) -> &KeyId {
        &self.public.id
    }
}

/// The routing facts a signature is bound to (besides the body).
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub subject: &'a str,
    pub region: &'a str,
    pub campaign: &'a str,
    pub credential: &'a str,
    pub msg_id: &'a str,
    pub content_type: &'a str,
    pub key_id: &'a str,
    pub expires_ms: u64,
}

/// The canonical bytes that are signed (see the module documentation).
pub fn signing_bytes(f: &Facts<'_>, body: &[u8]) -> Vec<u8> {
    let expires = f.expires_ms.to_string();
    let body_hash = Sha256::digest(body);
    let fields: [&[u8]; 10] = [
        DOMAIN.as_bytes(),
        f.subject.as_bytes(),
        f.region.as_bytes(),
        f.campaign.as_bytes(),
        f.credential.as_bytes(),
        f.msg_id.as_bytes(),
        f.content_type.as_bytes(),
        f.key_id.as_bytes(),
        expires.as_bytes(),
        body_hash.as_slice(),
    ];
    let mut out = Vec::with_capacity(fields.iter().map(|x| x.len() + 4).sum());
    for x in fields {
        out.extend_from_slice(&(x.len() as u32).to_be_bytes());
        out.extend_from_slice(x);
    }
    out
}

/// Domain tag of a signed audit record (see [`crate::audit`]).
pub const AUDIT_DOMAIN: &str = "keywave-audit-sig-v1";

/// The bytes an audit record's signature covers: the domain tag, the
/// campaign, the record's `seq` and its `hash` (which covers everything else
/// in the record, `prev` included).
fn audit_bytes(campaign: &str, seq: u64, hash: &str) -> Vec<u8> {
    format!("{AUDIT_DOMAIN}\n{campaign}\n{seq}\n{hash}").into_bytes()
}

impl SigningKey {
    /// Signs audit record `seq` of `campaign` with hash `hash`; base64 of
    /// the 64-byte signature.
    pub fn sign_audit(&self, campaign: &str, seq: u64, hash: &str) -> String {
        let sig = self.key.sign(&audit_bytes(campaign, seq, hash));
        base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())
    }
}

impl PublicKey {
    /// Whether `sig_b64` is this key's signature of audit record `seq` of
    /// `campaign` with hash `hash`.
    pub fn verify_audit(&self, campaign: &str, seq: u64, hash: &str, sig_b64: &str) -> bool {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(sig_b64.trim()) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(raw.as_slice()) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&bytes);
        self.key
            .verify_strict(&audit_bytes(campaign, seq, hash), &sig)
            .is_ok()
    }
}

/// What the coordinator signs tasks with.
#[derive(Debug, Clone)]
pub struct TaskSigner {
    key: std::sync::Arc<SigningKey>,
    /// Added to a task's deadline to give its expiry.
    pub expiry_margin: Duration,
}

impl TaskSigner {
    pub fn new(key: SigningKey, expiry_margin: Duration) -> TaskSigner {
        TaskSigner {
            key: std::sync::Arc::new(key),
            expiry_margin,
        }
    }
    pub fn key_id(&self) -> &KeyId {
        self.key.id()
    }
    pub fn public(&self) -> &PublicKey {
        self.key.public()
    }
    /// The key itself, shared (the audit writer signs its records with it
    /// too).
    pub fn shared_key(&self) -> std::sync::Arc<SigningKey> {
        self.key.clone()
    }

    /// The expiry of `task`: its deadline plus the margin.
    pub fn expiry_of(&self, task: &RotationTask) -> u64 {
        task.deadline_ms
            .saturating_add(self.expiry_margin.as_millis() as u64)
    }

    /// Adds `Keywave-Signature`, `Keywave-Key-Id` and `Keywave-Expires` to
    /// `headers` (which must already carry `Content-Type` and `Nats-Msg-Id`).
    pub fn sign_into(
        &self,
        headers: &mut HeaderMap,
        subject: &str,
        task: &RotationTask,
        expires_ms: u64,
        body: &[u8],
    ) {
        let content_type = headers
            .get(CONTENT_TYPE_NAME)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let msg_id = headers
            .get(MSG_ID_NAME)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let facts = Facts {
            subject,
            region: &task.region,
            campaign: &task.campaign_id,
            credential: &task.credential_id,
            msg_id: &msg_id,
            content_type: &content_type,
            key_id: self.key.id().as_str(),
            expires_ms,
        };
        let sig = self.key.key.sign(&signing_bytes(&facts, body));
        headers.insert(
            SIGNATURE_NAME,
            base64::engine::general_purpose::STANDARD
                .encode(sig.to_bytes())
                .as_str(),
        );
        headers.insert(KEY_ID_NAME, self.key.id().as_str());
        headers.insert(EXPIRES_NAME, expires_ms.to_string().as_str());
    }
}

/// Encodes and publishes one task (MessagePack), signed when `signer` is set;
/// returns the ack future unawaited. The task id is the `Nats-Msg-Id`.
pub async fn send_task(
    js: &Context,
    signer: Option<&TaskSigner>,
    subject: String,
    task: &RotationTask,
) -> Result<PublishAckFuture, PublishError> {
    let payload = codec::encode(Format::MsgPack, task)?;
    let mut headers = codec::headers(Format::MsgPack, &task.task_id);
    if let Some(s) = signer {
        s.sign_into(&mut headers, &subject, task, s.expiry_of(task), &payload);
    }
    // The wave span's trace context, so the worker's task span is its child
    // (not signed: it only links telemetry).
    crate::telemetry::inject(&mut headers);
    js.publish_with_headers(subject.clone(), headers, payload)
        .await
        .map_err(|e| PublishError::Send {
            subject,
            detail: e.to_string(),
        })
}

/// Why a task's signature was refused. [`SigError::reason`] is the dead
/// letter's reason class.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SigError {
    #[error(
        "task is not signed (no {SIGNATURE_HEADER} header) and this worker requires signed tasks"
    )]
    Unsigned,
    #[error("task is signed by key {0}, which is not among this worker's coordinator keys")]
    UnknownKey(String),
    #[error("signature headers are malformed: {0}")]
    Malformed(String),
    #[error("signature does not match the task (altered body, headers or subject, or wrong key)")]
    BadSignature,
    #[error("task expired at {expires_ms} (now {now_ms}): a replay or a task delivered too late")]
    Expired { expires_ms: u64, now_ms: u64 },
}

impl SigError {
    /// The machine-friendly reason class (dead letters, metrics).
    pub fn reason(&self) -> &'static str {
        match self {
            SigError::Unsigned => "unsigned",
            SigError::UnknownKey(_) => "unknown_signing_key",
            SigError::Malformed(_) => "bad_signature_header",
            SigError::BadSignature => "bad_signature",
            SigError::Expired { .. } => "expired",
        }
    }
    /// Whether the message is authentic (only its expiry failed): its wave
    /// may count it as failed at once. Anything else may be a forgery.
    pub fn is_authentic(&self) -> bool {
        matches!(self, SigError::Expired { .. })
    }
}

/// The coordinator public keys a worker trusts.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: Vec<PublicKey>,
}

impl Verifier {
    pub fn new(keys: Vec<PublicKey>) -> Verifier {
        let mut keys = keys;
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys.dedup_by(|a, b| a.id == b.id);
        Verifier { keys }
    }
    /// No keys: signatures are not checked (unsigned tasks accepted).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.id.to_string()).collect()
    }

    /// Checks the signature of `task` as received on `subject` with
    /// `headers` and `body`. With no keys configured, everything passes.
    /// Returns the id of the key that signed it (None when not checked).
    pub fn verify(
        &self,
        subject: &str,
        headers: Option<&HeaderMap>,
        task: &RotationTask,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Option<KeyId>, SigError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let get = |n: &HeaderName| headers.and_then(|h| h.get(n.clone())).map(|v| v.as_str());
        let Some(sig_b64) = get(&SIGNATURE_NAME) else {
            return Err(SigError::Unsigned);
        };
        let key_id = get(&KEY_ID_NAME)
            .ok_or_else(|| SigError::Malformed(format!("{KEY_ID_HEADER} is missing")))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.as_str() == key_id)
            .ok_or_else(|| SigError::UnknownKey(key_id.chars().take(32).collect()))?;
        let expires_ms: u64 = get(&EXPIRES_NAME)
            .ok_or_else(|| SigError::Malformed(format!("{EXPIRES_HEADER} is missing")))?
            .parse()
            .map_err(|_| SigError::Malformed(format!("{EXPIRES_HEADER} is not a number")))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(sig_b64)
            .map_err(|_| SigError::Malformed(format!("{SIGNATURE_HEADER} is not base64")))?;
        let raw: [u8; 64] = raw
            .try_into()
            .map_err(|_| SigError::Malformed(format!("{SIGNATURE_HEADER} is not 64 bytes")))?;
        let facts = Facts {
            subject,
            region: &task.region,
            campaign: &task.campaign_id,
            credential: &task.credential_id,
            msg_id: get(&MSG_ID_NAME).unwrap_or(""),
            content_type: get(&CONTENT_TYPE_NAME).unwrap_or(""),
            key_id,
            expires_ms,
        };
        let sig = ed25519_dalek::Signature::from_bytes(&raw);
        key.key
            .verify(&signing_bytes(&facts, body), &sig)
            .map_err(|_| SigError::BadSignature)?;
        // Only a task whose id is the message id is what was signed: the
        // body is bound to the signature, and the id in it must agree.
        if facts.msg_id != task.task_id {
            return Err(SigError::BadSignature);
        }
        if now_ms > expires_ms {
            return Err(SigError::Expired { expires_ms, now_ms });
        }
        Ok(Some(key.id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Strategy, TargetKind, TaskAction, SCHEMA_VERSION};

    fn task(region: &str) -> RotationTask {
        RotationTask {
            v: SCHEMA_VERSION,
            task_id: "c-1:w0:cred-1".into(),
            campaign_id: "c-1".into(),
            wave: 0,
            index: 0,
            action: TaskAction::Rotate,
            strategy: Strategy::Continuity,
            credential_id: "cred-1".into(),
            region: region.into(),
            endpoint: "sim".into(),
            kind: TargetKind::Sim,
            principal: "p".into(),
            issued_at_ms: 1_000,
            deadline_ms: 61_000,
            run_timeout_ms: 0,
            consumers: Vec::new(),
        }
    }

    fn signed(signer: &TaskSigner, subject: &str, t: &RotationTask) -> (HeaderMap, Vec<u8>) {
        let body = codec::encode(Format::MsgPack, t).unwrap().to_vec();
        let mut h = codec::headers(Format::MsgPack, &t.task_id);
        signer.sign_into(&mut h, subject, t, signer.expiry_of(t), &body);
        (h, body)
    }

    #[test]
    fn sign_and_verify_and_refusals() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let signer = TaskSigner::new(key.clone(), Duration::from_secs(60));
        let v = Verifier::new(vec![other.public().clone(), key.public().clone()]);
        let t = task("eu");
        let subj = "keywave.task.eu.c-1";
        let (h, body) = signed(&signer, subj, &t);
        assert_eq!(
            v.verify(subj, Some(&h), &t, &body, 2_000),
            Ok(Some(key.id().clone()))
        );
        // Expired: after deadline + margin.
        assert_eq!(
            v.verify(subj, Some(&h), &t, &body, 121_001)
                .unwrap_err()
                .reason(),
            "expired"
        );
        // Moved to another subject.
        assert_eq!(
            v.verify("keywave.task.us.c-1", Some(&h), &t, &body, 2_000),
            Err(SigError::BadSignature)
        );
        // Altered body.
        let mut t2 = t.clone();
        t2.principal = "q".into();
        let body2 = codec::encode(Format::MsgPack, &t2).unwrap().to_vec();
        assert_eq!(
            v.verify(subj, Some(&h), &t2, &body2, 2_000),
            Err(SigError::BadSignature)
        );
        // Altered expiry header.
        let mut h2 = h.clone();
        h2.insert(EXPIRES_NAME, "999999999999");
        assert_eq!(
            v.verify(subj, Some(&h2), &t, &body, 2_000),
            Err(SigError::BadSignature)
        );
        // Unsigned.
        let plain = codec::headers(Format::MsgPack, &t.task_id);
        assert_eq!(
            v.verify(subj, Some(&plain), &t, &body, 2_000),
            Err(SigError::Unsigned)
        );
        // Signed by a key the worker does not know.
        let stranger = TaskSigner::new(SigningKey::generate(), Duration::from_secs(60));
        let (h3, b3) = signed(&stranger, subj, &t);
        assert_eq!(
            v.verify(subj, Some(&h3), &t, &b3, 2_000)
                .unwrap_err()
                .reason(),
            "unknown_signing_key"
        );
        // No keys configured: nothing checked.
        assert_eq!(
            Verifier::default().verify(subj, Some(&plain), &t, &body, 2_000),
            Ok(None)
        );
    }

    #[test]
    fn keys_round_trip_and_never_show() {
        let k = SigningKey::generate();
        let dbg = format!("{k:?}");
        assert!(dbg.contains("redacted") && !dbg.contains(&hex::encode(k.key.as_bytes())));
        let p = PublicKey::from_hex(&k.public().to_hex()).unwrap();
        assert_eq!(p.id(), k.id());
        assert_eq!(k.id().as_str().len(), 16);
        let dir = std::env::temp_dir().join(format!("kw-sign-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("coordinator.key");
        k.to_file(&path).unwrap();
        assert!(k.to_file(&path).is_err(), "never overwrites");
        let back = SigningKey::from_file(&path).unwrap();
        assert_eq!(back.id(), k.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(SigningKey::from_file(&path).is_err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(PublicKey::from_hex("zz").is_err());
    }
}
