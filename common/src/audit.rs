//! The tamper-evident audit trail: stream `KEYWAVE_AUDIT`, one hash chain per
//! campaign on `keywave.audit.<campaign>`.
//!
//! Every campaign event (`KEYWAVE_EVENTS`) and every result (`KEYWAVE_RESULTS`,
//! as fingerprint digests, never secrets) is appended by the active
//! coordinator, the single writer, as an [`AuditRecord`]. A record is JSON:
//!
//! ```json
//! {"v":1,"campaign_id":"c-…","seq":7,"prev":"<64 hex>","at_ms":…,"writer":"coordinator-1",
//!  "hwm":{"events":120,"results":5031},"entry":{"type":"event",…},"hash":"<64 hex>"}
//! ```
//!
//! - `seq` counts the campaign's records from 1, without gaps.
//! - `prev` is the `hash` of record `seq - 1` ([`GENESIS`], 64 zeros, for record 1).
//! - `hash` is SHA-256 of `keywave-audit-v1\n` followed by the record's JSON
//!   *without* the `hash` field (`hash` is always the last field, so the
//!   hashed bytes are the payload with its `,"hash":"…"` suffix removed:
//!   [`seal`] and [`open`] work on the exact bytes, no re-serialization).
//! - `hwm` are the highest `KEYWAVE_EVENTS` and `KEYWAVE_RESULTS` stream
//!   sequences of this campaign appended so far: a coordinator that takes
//!   over reads the last record of each chain and continues after them.
//! - `entry` is an [`Entry`]: one event (its JSON, kept whole: events hold
//!   no secret), or a batch of result digests ([`ResultDigest`]).
//!
//! [`verify`] walks a chain in stream order and reports the first broken link:
//! a record whose hash does not match its content (edited), whose `prev` is
//! not the previous record's hash (replaced), or a sequence gap (a record
//! deleted, or a forged one appended out of place).
//!
//! A hash chain alone does not stop someone who can write to the stream from
//! rewriting a whole chain consistently. When the coordinator has a signing
//! key (`--signing-key-file`, the one it signs tasks with), every record also
//! carries an Ed25519 signature over its campaign, `seq` and `hash`, in the
//! message headers [`SIG_KEY_ID_HEADER`] and [`SIG_HEADER`] (the record bytes
//! are unchanged). [`verify_signed`] with the coordinator's public keys then
//! also requires every record to be signed by one of them: a rewritten chain
//! needs the private key, not just write access to NATS.

use crate::sign::PublicKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Header: id of the key that signed an audit record.
pub const SIG_KEY_ID_HEADER: &str = "Keywave-Audit-Key-Id";
/// Header: base64 Ed25519 signature of an audit record (see
/// [`crate::sign::SigningKey::sign_audit`]).
pub const SIG_HEADER: &str = "Keywave-Audit-Signature";

/// A record's signature as read from its message headers.
#[derive(Debug, Clone, Copy)]
pub struct RecordSig<'a> {
    pub key_id: &'a str,
    pub signature: &'a str,
}

/// `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain tag prefixed to the hashed bytes.
pub const DOMAIN: &[u8] = b"keywave-audit-v1\n";
/// Version of the record layout.
pub const RECORD_VERSION: u16 = 1;
/// Length of the `,"hash":"<64 hex>"}` suffix of a sealed record.
const SUFFIX_LEN: usize = 9 + 64 + 2;

/// High-water marks: the source stream sequences appended so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hwm {
    pub events: u64,
    pub results: u64,
}

/// One result, as audited: fingerprints and outcome, never a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultDigest {
    /// Sequence of the result in `KEYWAVE_RESULTS`.
    pub stream_seq: u64,
    /// SHA-256 of the result message body (to cross-check the results stream).
    pub body_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
}

/// What a record appends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Entry {
    /// A campaign event from `KEYWAVE_EVENTS`.
    Event {
        stream_seq: u64,
        subject: String,
        body_sha256: String,
        /// The event itself (JSON); `null` when the body was not JSON.
        event: serde_json::Value,
    },
    /// Results from `KEYWAVE_RESULTS`, in stream order.
    Results { results: Vec<ResultDigest> },
}

/// One link of a campaign's chain (everything but its `hash`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub v: u16,
    pub campaign_id: String,
    pub seq: u64,
    pub prev: String,
    pub at_ms: u64,
    /// The coordinator that appended it.
    pub writer: String,
    pub hwm: Hwm,
    pub entry: Entry,
}

/// The fields of a sealed record that the chain needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Link {
    pub campaign_id: String,
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    #[serde(default)]
    pub hwm: Hwm,
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn chain_hash(unsealed: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(unsealed);
    hex::encode(h.finalize())
}

/// Serializes `record` and appends its hash. Returns the payload and the hash.
pub fn seal(record: &AuditRecord) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut body = serde_json::to_vec(record)?;
    let hash = chain_hash(&body);
    // `body` is a JSON object: replace its closing brace by the hash field.
    body.pop();
    body.extend_from_slice(b",\"hash\":\"");
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}");
    Ok((body, hash))
}

/// Why a payload is not a well-formed sealed record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a sealed audit record: {0}")]
pub struct OpenError(pub String);

/// Parses a sealed record and recomputes its hash from its bytes. Returns
/// the link as stored and the hash the content actually has.
pub fn open(payload: &[u8]) -> Result<(Link, String), OpenError> {
    let link: Link =
        serde_json::from_slice(payload).map_err(|e| OpenError(format!("bad JSON: {e}")))?;
    if payload.len() < SUFFIX_LEN + 2 {
        return Err(OpenError("too short".into()));
    }
    let cut = payload.len() - SUFFIX_LEN;
    let suffix = &payload[cut..];
    if !suffix.starts_with(b",\"hash\":\"") || !suffix.ends_with(b"\"}") {
        return Err(OpenError("the hash is not the record's last field".into()));
    }
    let mut unsealed = Vec::with_capacity(cut + 1);
    unsealed.extend_from_slice(&payload[..cut]);
    unsealed.push(b'}');
    Ok((link, chain_hash(&unsealed)))
}

/// The first broken link of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Break {
    /// The record's content does not hash to its `hash` (edited in place).
    HashMismatch {
        seq: u64,
        stream_seq: u64,
        expected: String,
        found: String,
    },
    /// The record's `prev` is not the hash of the record before it.
    PrevMismatch {
        seq: u64,
        stream_seq: u64,
        expected: String,
        found: String,
    },
    /// Records are missing (deleted) before this one: `expected_seq` came
    /// next in the chain, `found_seq` was read.
    Gap {
        expected_seq: u64,
        found_seq: u64,
        stream_seq: u64,
    },
    /// The record names another campaign than its subject.
    WrongCampaign {
        seq: u64,
        stream_seq: u64,
        expected: String,
        found: String,
    },
    /// The payload is not a sealed record at all.
    Unreadable {
        position: u64,
        stream_seq: u64,
        detail: String,
    },
    /// Signatures are required and this record has none.
    Unsigned { seq: u64, stream_seq: u64 },
    /// Signed by a key that is not among the trusted ones.
    UnknownKey {
        seq: u64,
        stream_seq: u64,
        key_id: String,
    },
    /// The signature does not match the record under the key it names.
    BadSignature {
        seq: u64,
        stream_seq: u64,
        key_id: String,
    },
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::HashMismatch {
                seq,
                stream_seq,
                expected,
                found,
            } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) was altered: its content hashes to {expected}, the record says {found}"
            ),
            Break::PrevMismatch {
                seq,
                stream_seq,
                expected,
                found,
            } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) does not follow the record before it: prev should be {expected}, found {found}"
            ),
            Break::Gap {
                expected_seq,
                found_seq,
                stream_seq,
            } => write!(
                f,
                "gap: record {expected_seq} is missing (deleted or moved); found record {found_seq} (stream seq {stream_seq}) in its place"
            ),
            Break::WrongCampaign {
                seq,
                stream_seq,
                expected,
                found,
            } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) belongs to campaign {found}, not {expected}"
            ),
            Break::Unreadable {
                position,
                stream_seq,
                detail,
            } => write!(
                f,
                "record at position {position} (stream seq {stream_seq}) is unreadable: {detail}"
            ),
            Break::Unsigned { seq, stream_seq } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) is not signed, and signatures are required"
            ),
            Break::UnknownKey {
                seq,
                stream_seq,
                key_id,
            } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) is signed by key {key_id}, which is not trusted"
            ),
            Break::BadSignature {
                seq,
                stream_seq,
                key_id,
            } => write!(
                f,
                "record {seq} (stream seq {stream_seq}) has a signature that key {key_id} did not make over this record (forged or re-hashed)"
            ),
        }
    }
}

/// The outcome of verifying one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub campaign_id: String,
    /// Records read.
    pub records: u64,
    /// `seq` and `hash` of the last good record (the chain's head when intact).
    pub last_seq: u64,
    pub last_hash: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<Break>,
    /// Records whose signature was checked against a trusted key (0 when no
    /// key was given).
    pub signed: u64,
}

/// Verifies one campaign's chain from its records as read from the stream,
/// in stream order: `(stream_seq, payload)`. Stops at the first break.
/// Signatures are not looked at: see [`verify_signed`].
pub fn verify<'a, I>(campaign: &str, records: I) -> ChainReport
where
    I: IntoIterator<Item = (u64, &'a [u8])>,
{
    verify_signed(
        campaign,
        records.into_iter().map(|(s, p)| (s, p, None)),
        &[],
    )
}

/// [`verify`], and with `keys` not empty every record must also carry a
/// valid signature by one of them: `(stream_seq, payload, signature)`.
pub fn verify_signed<'a, I>(campaign: &str, records: I, keys: &[PublicKey]) -> ChainReport
where
    I: IntoIterator<Item = (u64, &'a [u8], Option<RecordSig<'a>>)>,
{
    let mut report = ChainReport {
        campaign_id: campaign.to_string(),
        records: 0,
        last_seq: 0,
        last_hash: GENESIS.to_string(),
        ok: true,
        broken: None,
        signed: 0,
    };
    for (stream_seq, payload, sig) in records {
        report.records += 1;
        let broken = match open(payload) {
            Err(e) => Some(Break::Unreadable {
                position: report.records,
                stream_seq,
                detail: e.0,
            }),
            Ok((link, actual)) => {
                if link.campaign_id != campaign {
                    Some(Break::WrongCampaign {
                        seq: link.seq,
                        stream_seq,
                        expected: campaign.to_string(),
                        found: link.campaign_id,
                    })
                } else if link.seq != report.last_seq + 1 {
                    Some(Break::Gap {
                        expected_seq: report.last_seq + 1,
                        found_seq: link.seq,
                        stream_seq,
                    })
                } else if actual != link.hash {
                    Some(Break::HashMismatch {
                        seq: link.seq,
                        stream_seq,
                        expected: actual,
                        found: link.hash,
                    })
                } else if link.prev != report.last_hash {
                    Some(Break::PrevMismatch {
                        seq: link.seq,
                        stream_seq,
                        expected: report.last_hash.clone(),
                        found: link.prev,
                    })
                } else if let Some(b) = check_signature(campaign, &link, stream_seq, sig, keys) {
                    Some(b)
                } else {
                    if !keys.is_empty() {
                        report.signed += 1;
                    }
                    report.last_seq = link.seq;
                    report.last_hash = link.hash;
                    None
                }
            }
        };
        if let Some(b) = broken {
            report.ok = false;
            report.broken = Some(b);
            break;
        }
    }
    report
}

/// The signature problem of a record whose links are intact, if any
/// (none when no key is required).
fn check_signature(
    campaign: &str,
    link: &Link,
    stream_seq: u64,
    sig: Option<RecordSig<'_>>,
    keys: &[PublicKey],
) -> Option<Break> {
    if keys.is_empty() {
        return None;
    }
    let seq = link.seq;
    let Some(sig) = sig else {
        return Some(Break::Unsigned { seq, stream_seq });
    };
    let Some(key) = keys.iter().find(|k| k.id().as_str() == sig.key_id) else {
        return Some(Break::UnknownKey {
            seq,
            stream_seq,
            key_id: sig.key_id.to_string(),
        });
    };
    if key.verify_audit(campaign, seq, &link.hash, sig.signature) {
        None
    } else {
        Some(Break::BadSignature {
            seq,
            stream_seq,
            key_id: sig.key_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Vec<u8>> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let r = AuditRecord {
                    v: RECORD_VERSION,
                    campaign_id: "c-1".into(),
                    seq,
                    prev: prev.clone(),
                    at_ms: 1_000 + seq,
                    writer: "w".into(),
                    hwm: Hwm {
                        events: seq,
                        results: 0,
                    },
                    entry: Entry::Event {
                        stream_seq: seq,
                        subject: "keywave.event.c-1.x".into(),
                        body_sha256: sha256_hex(b"x"),
                        event: serde_json::json!({"kind": {"type": "x", "n": seq}}),
                    },
                };
                let (payload, hash) = seal(&r).unwrap();
                prev = hash;
                payload
            })
            .collect()
    }

    fn run(c: &[Vec<u8>]) -> ChainReport {
        verify(
            "c-1",
            c.iter()
                .enumerate()
                .map(|(i, p)| (i as u64 + 10, p.as_slice())),
        )
    }

    /// Signatures make a consistently rewritten chain detectable: the
    /// rewrite has correct hashes and links, but not the key.
    #[test]
    fn signed_records_verify_and_a_rehashed_rewrite_does_not() {
        use crate::sign::SigningKey;
        let key = SigningKey::generate();
        let keys = [key.public().clone()];
        let c = chain(4);
        let sign = |payload: &[u8], key: &SigningKey| {
            let (link, _) = open(payload).unwrap();
            (
                key.id().to_string(),
                key.sign_audit("c-1", link.seq, &link.hash),
            )
        };
        let run_signed = |c: &[Vec<u8>], sigs: &[Option<(String, String)>], keys: &[PublicKey]| {
            verify_signed(
                "c-1",
                c.iter().zip(sigs).enumerate().map(|(i, (p, s))| {
                    (
                        i as u64 + 1,
                        p.as_slice(),
                        s.as_ref().map(|(k, sig)| RecordSig {
                            key_id: k,
                            signature: sig,
                        }),
                    )
                }),
                keys,
            )
        };
        let sigs: Vec<_> = c.iter().map(|p| Some(sign(p, &key))).collect();
        let r = run_signed(&c, &sigs, &keys);
        assert!(r.ok && r.signed == 4, "{r:?}");
        // Without keys the signatures are not looked at.
        assert_eq!(run_signed(&c, &sigs, &[]).signed, 0);

        // A rewrite from record 2 on with every hash and link recomputed
        // passes the chain checks, but record 2's signature no longer fits.
        let rewritten = {
            let mut prev = open(&c[0]).unwrap().0.hash;
            let mut out = vec![c[0].clone()];
            for p in &c[1..] {
                // The record without its `,"hash":"…"` suffix, closed again.
                let mut body = String::from_utf8(p[..p.len() - SUFFIX_LEN].to_vec()).unwrap();
                body.push('}');
                let mut r: AuditRecord = serde_json::from_str(&body).unwrap();
                r.prev = prev.clone();
                r.writer = "intruder".into();
                let (payload, hash) = seal(&r).unwrap();
                prev = hash;
                out.push(payload);
            }
            out
        };
        assert!(run(&rewritten).ok, "the rewrite fools the hash chain alone");
        match run_signed(&rewritten, &sigs, &keys).broken {
            Some(Break::BadSignature { seq: 2, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Signed by another key, or not at all.
        let other = SigningKey::generate();
        let foreign: Vec<_> = rewritten.iter().map(|p| Some(sign(p, &other))).collect();
        match run_signed(&rewritten, &foreign, &keys).broken {
            Some(Break::UnknownKey { seq: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
        let mut unsigned = sigs.clone();
        unsigned[2] = None;
        match run_signed(&c, &unsigned, &keys).broken {
            Some(Break::Unsigned { seq: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        let r = run(&c);
        assert!(r.ok, "{r:?}");
        assert_eq!((r.records, r.last_seq), (5, 5));
        let (link, actual) = open(&c[4]).unwrap();
        assert_eq!(link.hash, actual);
        assert_eq!(link.hwm.events, 5);
        assert!(run(&[]).ok);
    }

    #[test]
    fn edits_deletions_and_forgeries_are_found_where_they_are() {
        let c = chain(5);
        // Edited in place: a byte of record 3's content.
        let mut edited = c.clone();
        let s = String::from_utf8(edited[2].clone()).unwrap();
        edited[2] = s.replace("\"n\":3", "\"n\":4").into_bytes();
        match run(&edited).broken {
            Some(Break::HashMismatch { seq: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Deleted: record 2 gone.
        let mut deleted = c.clone();
        deleted.remove(1);
        assert_eq!(
            run(&deleted).broken,
            Some(Break::Gap {
                expected_seq: 2,
                found_seq: 3,
                stream_seq: 11
            })
        );
        // Replaced by a forged record 3 with a correct hash of its own
        // content but not chained to record 2.
        let forged_chain = {
            let mut f = chain(2);
            let r = AuditRecord {
                v: RECORD_VERSION,
                campaign_id: "c-1".into(),
                seq: 3,
                prev: GENESIS.into(),
                at_ms: 0,
                writer: "mallory".into(),
                hwm: Hwm::default(),
                entry: Entry::Results { results: vec![] },
            };
            f.push(seal(&r).unwrap().0);
            f
        };
        match run(&forged_chain).broken {
            Some(Break::PrevMismatch { seq: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        // Not a record at all.
        let junk = vec![b"{}".to_vec()];
        assert!(matches!(
            run(&junk).broken,
            Some(Break::Unreadable { position: 1, .. })
        ));
    }
}
