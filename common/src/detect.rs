//! Leak detections: the normalized [`Detection`] every source (webhooks,
//! SIEM/SOAR, `keywave detect`) publishes on `keywave.detect.<source>`, its
//! streams, and the keyed *detection fingerprints* that let a scanner point at
//! a leaked value without the inventory holding guessable digests.
//!
//! The JSON form is specified by `docs/detection.schema.json`.
//!
//! # Detection fingerprints
//!
//! A scanner that holds a leaked value sends `sha256:<hex>`, the SHA-256 of
//! the value. The coordinator never compares that digest with stored digests
//! (a plain SHA-256 of a weak password is guessable offline): it holds a
//! 256-bit *detection key* `K` and computes
//! `dfp1:<hex(HMAC-SHA256(K, SHA-256(secret))[..16])>`. Workers, which hold
//! the same `K` (never a region key), announce the `dfp1:` of each CURRENT
//! secret on `keywave.rotated.<region>.<credential>` ([`RotatedNotice`]); the
//! coordinator indexes those. Someone who reads the index or the notices
//! learns nothing without `K`.

use crate::crypto::Secret;
use crate::wire::{Versioned, SCHEMA_VERSION};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Stream of detections, subjects `keywave.detect.>`.
pub const STREAM_DETECTIONS: &str = "KEYWAVE_DETECTIONS";
/// Stream of rotation notices (latest per credential), subjects `keywave.rotated.>`.
pub const STREAM_ROTATED: &str = "KEYWAVE_ROTATED";
/// Longest `source_id`, label key or value, in bytes.
pub const MAX_TEXT: usize = 256;
/// Longest `evidence_url`, in bytes.
pub const MAX_URL: usize = 2048;
/// Most labels a detection may carry.
pub const MAX_LABELS: usize = 16;
/// Largest encoded detection accepted from the bus.
pub const MAX_DETECTION_BYTES: usize = 16 * 1024;

/// How bad a detection is, as the source rates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = crate::wire::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "low" | "info" => Ok(Severity::Low),
            "medium" => Ok(Severity::Medium),
            "high" => Ok(Severity::High),
            "critical" => Ok(Severity::Critical),
            o => Err(crate::wire::UnknownName::new(
                "severity",
                o,
                "low, medium, high or critical",
            )),
        }
    }
}

fn default_severity() -> Severity {
    Severity::High
}

fn schema_version() -> u16 {
    SCHEMA_VERSION
}

/// What identifies the leaked credential. Exactly one form is expected: a
/// keywave credential `id`; a `principal` with its `endpoint`; or a
/// `fingerprint` of the leaked value. All empty means the source could not
/// tell (e.g. a GitHub alert, which never carries the value): such a
/// detection is recorded as unmatched, never dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `sha256:<64 hex>` (SHA-256 of the leaked value) or `dfp1:<32 hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl CredentialRef {
    pub fn by_id(id: impl Into<String>) -> Self {
        CredentialRef {
            id: Some(id.into()),
            ..Default::default()
        }
    }

    pub fn by_login(principal: impl Into<String>, endpoint: impl Into<String>) -> Self {
        CredentialRef {
            principal: Some(principal.into()),
            endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    pub fn by_fingerprint(fp: impl Into<String>) -> Self {
        CredentialRef {
            fingerprint: Some(fp.into()),
            ..Default::default()
        }
    }

    /// True when nothing identifies the credential.
    pub fn is_empty(&self) -> bool {
        self.id.is_none()
            && self.principal.is_none()
            && self.endpoint.is_none()
            && self.fingerprint.is_none()
    }

    /// A short description for events and logs (never a secret: fingerprints
    /// are digests).
    pub fn describe(&self) -> String {
        if let Some(id) = &self.id {
            return format!("id={id}");
        }
        if let (Some(p), Some(e)) = (&self.principal, &self.endpoint) {
            return format!("{p}@{e}");
        }
        if let Some(fp) = &self.fingerprint {
            return format!("fingerprint={fp}");
        }
        "unidentified".into()
    }
}

/// A leak detection, normalized. Published on `keywave.detect.<source>` with
/// `Nats-Msg-Id: <source>:<source_id>`, so a source that sends the same
/// alert twice creates one detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detection {
    #[serde(default = "schema_version")]
    pub v: u16,
    /// Who found it: `github`, `gitguardian`, `siem`, `cli`... (a subject token).
    pub source: String,
    /// The source's own id of the finding (alert number, incident id).
    pub source_id: String,
    /// When the source found the leak (RFC 3339 on the wire).
    pub detected_at: Timestamp,
    /// Which credential leaked.
    pub credential: CredentialRef,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// Where a human sees the evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence_url: Option<String>,
    /// Context from the source (repository, secret type...); never a secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Versioned for Detection {
    fn version(&self) -> u16 {
        self.v
    }
}

/// Why a detection is not acceptable; the field is named.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("detection field {field}: {message}")]
pub struct DetectError {
    pub field: &'static str,
    pub message: String,
}

fn derr(field: &'static str, message: impl Into<String>) -> DetectError {
    DetectError {
        field,
        message: message.into(),
    }
}

fn check_text(field: &'static str, s: &str) -> Result<(), DetectError> {
    if s.is_empty() {
        return Err(derr(field, "must not be empty"));
    }
    if s.len() > MAX_TEXT {
        return Err(derr(field, format!("longer than {MAX_TEXT} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(derr(field, "contains control characters"));
    }
    Ok(())
}

impl Detection {
    /// The subject it is published on.
    pub fn subject(&self) -> String {
        crate::subjects::detect(&self.source)
    }

    /// The de-duplication id: `<source>:<source_id>`.
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.source, self.source_id)
    }

    /// Checks every field; names the first bad one.
    pub fn validate(&self) -> Result<(), DetectError> {
        if self.v != SCHEMA_VERSION {
            return Err(derr("v", format!("unsupported schema version {}", self.v)));
        }
        crate::ids::validate("source", &self.source).map_err(|e| derr("source", e.to_string()))?;
        check_text("source_id", &self.source_id)?;
        let c = &self.credential;
        if let Some(id) = &c.id {
            crate::ids::validate("credential id", id)
                .map_err(|e| derr("credential.id", e.to_string()))?;
        }
        match (&c.principal, &c.endpoint) {
            (Some(p), Some(e)) => {
                check_text("credential.principal", p)?;
                crate::ids::validate("endpoint", e)
                    .map_err(|err| derr("credential.endpoint", err.to_string()))?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(derr(
                    "credential.endpoint",
                    "required with credential.principal",
                ))
            }
            (None, Some(_)) => {
                return Err(derr(
                    "credential.principal",
                    "required with credential.endpoint",
                ))
            }
        }
        if let Some(fp) = &c.fingerprint {
            Fingerprint::parse(fp)?;
        }
        if let Some(u) = &self.evidence_url {
            if u.len() > MAX_URL {
                return Err(derr("evidence_url", format!("longer than {MAX_URL} bytes")));
            }
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(derr("evidence_url", "must be an http(s) URL"));
            }
            if u.chars().any(|ch| ch.is_control() || ch.is_whitespace()) {
                return Err(derr(
                    "evidence_url",
                    "contains whitespace or control characters",
                ));
            }
        }
        if self.labels.len() > MAX_LABELS {
            return Err(derr("labels", format!("more than {MAX_LABELS} labels")));
        }
        for (k, v) in &self.labels {
            check_text("labels", k)?;
            if v.len() > MAX_TEXT || v.chars().any(char::is_control) {
                return Err(derr(
                    "labels",
                    format!(
                        "value of {k:?} is longer than {MAX_TEXT} bytes or has control characters"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Decodes a detection from the bus (JSON or MessagePack by
    /// `Content-Type`), with size, version and field checks.
    pub fn decode(
        headers: Option<&async_nats::HeaderMap>,
        payload: &[u8],
    ) -> Result<Detection, DecodeError> {
        if payload.len() > MAX_DETECTION_BYTES {
            return Err(DecodeError::Codec(crate::codec::CodecError::Oversized {
                len: payload.len(),
                max: MAX_DETECTION_BYTES,
            }));
        }
        let d: Detection = crate::codec::decode_plain(headers, payload)?;
        d.validate()?;
        Ok(d)
    }
}

/// Why a message on `keywave.detect.>` was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error(transparent)]
    Invalid(#[from] DetectError),
}

impl DecodeError {
    /// Short machine-friendly reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Codec(e) => e.reason(),
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

/// Milliseconds since the Unix epoch, written as RFC 3339 (UTC) in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(crate::now_ms())
    }
    pub fn ms(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_rfc3339(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_rfc3339(&s)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A date-time that is not RFC 3339; holds at most the first 64 characters
/// of the text.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0:?} is not an RFC 3339 date-time (e.g. 2026-03-17T15:42:05Z)")]
pub struct NotRfc3339(pub String);

/// Parses an RFC 3339 date-time (`2026-03-17T15:42:05Z`, optional fraction,
/// `Z` or `±HH:MM`) into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<u64, NotRfc3339> {
    let bad = || NotRfc3339(truncate(s));
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, NotRfc3339> {
        let part = s.get(r).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<i64>().map_err(|_| bad())
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let frac = &s[start..i.min(start + 3)];
        millis = frac.parse::<i64>().map_err(|_| bad())? * 10i64.pow(3 - frac.len() as u32);
    }
    let offset_min = match b.get(i) {
        Some(b'Z') | Some(b'z') if i + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let m = oh * 60 + om;
            if *sign == b'+' {
                m
            } else {
                -m
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec.min(59) - offset_min * 60;
    if secs < 0 {
        return Err(bad());
    }
    Ok((secs * 1000 + millis) as u64)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A parsed fingerprint from a detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fingerprint {
    /// SHA-256 of the leaked value, as a scanner computes it.
    Sha256([u8; 32]),
    /// Already keyed with the detection key (`dfp1:`).
    Keyed(String),
}

impl Fingerprint {
    pub fn parse(s: &str) -> Result<Fingerprint, DetectError> {
        let bad = || {
            derr(
                "credential.fingerprint",
                "expected sha256:<64 hex> (SHA-256 of the leaked value) or dfp1:<32 hex>",
            )
        };
        if let Some(h) = s.strip_prefix("sha256:") {
            let bytes = hex::decode(h).map_err(|_| bad())?;
            let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
            return Ok(Fingerprint::Sha256(arr));
        }
        if let Some(h) = s.strip_prefix("dfp1:") {
            if h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Fingerprint::Keyed(format!(
                    "dfp1:{}",
                    h.to_ascii_lowercase()
                )));
            }
        }
        Err(bad())
    }
}

/// `sha256:<hex>` of a secret: what a scanner sends for a leaked value.
pub fn sha256_fingerprint(secret: &Secret) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(secret.expose().as_bytes()))
    )
}

/// The detection key shared by the coordinator and the workers (not a
/// region key: it can only fingerprint, never decrypt).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DetectKey([u8; 32]);

impl fmt::Debug for DetectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DetectKey(<redacted>)")
    }
}

impl DetectKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        DetectKey(b)
    }

    pub fn generate() -> Self {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        DetectKey(b)
    }

    /// Parses 64 hex characters or base64 of 32 bytes (like a region key).
    pub fn parse(s: &str) -> Result<Self, crate::crypto::CryptoError> {
        let k = crate::crypto::RegionKey::parse(s)?;
        // Same encoding rules as a region key; the bytes are taken back out
        // through its hex form.
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(k.to_hex(), &mut bytes)
            .map_err(|e| crate::crypto::CryptoError::BadKey(e.to_string()))?;
        Ok(DetectKey(bytes))
    }

    /// Reads a key file (hex or base64).
    pub fn from_file(path: &std::path::Path) -> Result<Self, crate::crypto::CryptoError> {
        let s = std::fs::read_to_string(path).map_err(|e| crate::crypto::CryptoError::KeyFile {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&s)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn keyed_digest(&self, digest: &[u8; 32]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        mac.update(b"keywave/detect/v1");
        mac.update(digest);
        format!("dfp1:{}", hex::encode(&mac.finalize().into_bytes()[..16]))
    }

    /// The `dfp1:` fingerprint of a secret (what workers announce).
    pub fn fingerprint_secret(&self, secret: &Secret) -> String {
        let digest: [u8; 32] = Sha256::digest(secret.expose().as_bytes()).into();
        self.keyed_digest(&digest)
    }

    /// The `dfp1:` fingerprint a detection's fingerprint stands for.
    pub fn keyed(&self, fp: &Fingerprint) -> String {
        match fp {
            Fingerprint::Sha256(d) => self.keyed_digest(d),
            Fingerprint::Keyed(k) => k.clone(),
        }
    }
}

/// Announced by a worker on `keywave.rotated.<region>.<credential>` when a
/// secret becomes CURRENT (enrolment or rotation): the keyed detection
/// fingerprints of the new and the replaced secret. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatedNotice {
    pub v: u16,
    pub credential_id: String,
    pub region: String,
    /// `dfp1:` of the secret now CURRENT.
    pub detect_fp: String,
    /// `dfp1:` of the secret it replaced, if any.
    #[serde(default)]
    pub previous_detect_fp: Option<String>,
    pub at_ms: u64,
}

impl Versioned for RotatedNotice {
    fn version(&self) -> u16 {
        self.v
    }
}

impl RotatedNotice {
    /// The notice for `credential` whose CURRENT secret is now `current`.
    pub fn new(
        key: &DetectKey,
        credential_id: &str,
        region: &str,
        current: &Secret,
        previous: Option<&Secret>,
    ) -> Self {
        RotatedNotice {
            v: SCHEMA_VERSION,
            credential_id: credential_id.to_string(),
            region: region.to_string(),
            detect_fp: key.fingerprint_secret(current),
            previous_detect_fp: previous.map(|p| key.fingerprint_secret(p)),
            at_ms: crate::now_ms(),
        }
    }

    /// Publishes the notice (JSON, de-duplicated on credential and fingerprint).
    pub async fn publish(
        &self,
        js: &async_nats::jetstream::Context,
    ) -> Result<(), crate::publish::PublishError> {
        crate::publish::send_and_confirm(
            js,
            crate::subjects::rotated(&self.region, &self.credential_id),
            crate::codec::Format::Json,
            // The replaced secret is part of the id: a rollback that restores
            // a secret announced minutes ago is a new transition, not a
            // duplicate of the old one.
            &format!(
                "rotated:{}:{}:{}",
                self.credential_id,
                self.detect_fp,
                self.previous_detect_fp.as_deref().unwrap_or("-")
            ),
            self,
        )
        .await
    }
}

/// Publishes a validated detection and waits for JetStream's ack. Returns
/// whether the stream had already seen it (same `source:source_id`).
pub async fn publish(
    js: &async_nats::jetstream::Context,
    d: &Detection,
) -> Result<bool, PublishDetectionError> {
    d.validate()?;
    let ack = crate::publish::send(
        js,
        d.subject(),
        crate::codec::Format::Json,
        &d.msg_id(),
        d,
        None,
    )
    .await?
    .await
    .map_err(|e| crate::publish::PublishError::Ack(e.to_string()))?;
    Ok(ack.duplicate)
}

#[derive(Debug, Error)]
pub enum PublishDetectionError {
    #[error(transparent)]
    Invalid(#[from] DetectError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Detection {
        Detection {
            v: 1,
            source: "siem".into(),
            source_id: "alert-42".into(),
            detected_at: Timestamp(1_700_000_000_123),
            credential: CredentialRef::by_id("billing-db-app"),
            severity: Severity::Critical,
            evidence_url: Some("https://siem.example/alerts/42".into()),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn rfc3339_round_trips() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2023-03-17T15:42:05Z"), Ok(1_679_067_725_000));
        assert_eq!(
            parse_rfc3339("2023-12-29T17:38:06.788914Z"),
            Ok(1_703_871_486_788)
        );
        assert_eq!(
            parse_rfc3339("2023-03-17T17:42:05+02:00"),
            Ok(1_679_067_725_000)
        );
        for ms in [0, 1_679_067_725_000, 1_703_871_486_788, 4_102_444_800_999] {
            assert_eq!(parse_rfc3339(&format_rfc3339(ms)), Ok(ms));
        }
        for bad in [
            "",
            "2023-03-17",
            "2023-13-01T00:00:00Z",
            "2023-03-17T15:42:05",
            "yesterday",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn detection_json_round_trips_and_validates() {
        let d = sample();
        let json = serde_json::to_string(&d).unwrap();
        assert!(
            json.contains("\"detected_at\":\"2023-11-14T22:13:20.123Z\""),
            "{json}"
        );
        let back = Detection::decode(None, json.as_bytes()).unwrap();
        assert_eq!(back, d);
        assert_eq!(d.msg_id(), "siem:alert-42");
        assert_eq!(d.subject(), "keywave.detect.siem");
    }

    #[test]
    fn bad_detections_name_the_field() {
        let mut d = sample();
        d.credential = CredentialRef {
            principal: Some("app".into()),
            ..Default::default()
        };
        assert_eq!(d.validate().unwrap_err().field, "credential.endpoint");
        let mut d = sample();
        d.credential = CredentialRef::by_fingerprint("md5:abc");
        assert_eq!(d.validate().unwrap_err().field, "credential.fingerprint");
        let mut d = sample();
        d.source = "a.b".into();
        assert_eq!(d.validate().unwrap_err().field, "source");
        let mut d = sample();
        d.evidence_url = Some("javascript:alert(1)".into());
        assert_eq!(d.validate().unwrap_err().field, "evidence_url");
        assert!(matches!(
            Detection::decode(None, b"{\"source\":\"x\"}"),
            Err(DecodeError::Codec(_))
        ));
        assert!(matches!(
            Detection::decode(None, &vec![b' '; MAX_DETECTION_BYTES + 1]),
            Err(DecodeError::Codec(
                crate::codec::CodecError::Oversized { .. }
            ))
        ));
    }

    /// The published schema, `docs/detection.schema.json`.
    const SCHEMA: &str = include_str!("../../docs/detection.schema.json");

    /// A deliberately small JSON Schema checker for the keywords the
    /// detection schema uses (type, required, additionalProperties, const,
    /// enum, dependentRequired, maxProperties, nested properties). Patterns
    /// are left to the Rust validation.
    fn schema_accepts(schema: &serde_json::Value, doc: &serde_json::Value) -> Result<(), String> {
        use serde_json::Value;
        if let Some(t) = schema.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => doc.is_object(),
                "string" => doc.is_string(),
                "integer" => doc.is_u64() || doc.is_i64(),
                _ => true,
            };
            if !ok {
                return Err(format!("{doc} is not of type {t}"));
            }
        }
        if let Some(c) = schema.get("const") {
            if c != doc {
                return Err(format!("{doc} is not {c}"));
            }
        }
        if let Some(e) = schema.get("enum").and_then(Value::as_array) {
            if !e.contains(doc) {
                return Err(format!("{doc} is not one of {e:?}"));
            }
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            if doc.as_str().is_some_and(|s| s.chars().count() as u64 > max) {
                return Err("string too long".into());
            }
        }
        let Some(obj) = doc.as_object() else {
            return Ok(());
        };
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                return Err(format!("required property {r} missing"));
            }
        }
        if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64) {
            if obj.len() as u64 > max {
                return Err("too many properties".into());
            }
        }
        if let Some(deps) = schema.get("dependentRequired").and_then(Value::as_object) {
            for (k, needs) in deps {
                if obj.contains_key(k) {
                    for n in needs.as_array().unwrap() {
                        if !obj.contains_key(n.as_str().unwrap()) {
                            return Err(format!("{k} requires {n}"));
                        }
                    }
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => schema_accepts(sub, v)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("unknown property {k}")),
                    Some(sub @ Value::Object(_)) => schema_accepts(sub, v)?,
                    _ => {}
                },
            }
        }
        Ok(())
    }

    #[test]
    fn rust_type_and_published_schema_agree() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
        // Every example of the schema is a valid detection in Rust.
        let examples = schema["examples"].as_array().unwrap();
        assert!(examples.len() >= 3);
        for ex in examples {
            schema_accepts(&schema, ex).unwrap();
            let bytes = serde_json::to_vec(ex).unwrap();
            Detection::decode(None, &bytes).unwrap_or_else(|e| panic!("{ex}: {e}"));
        }
        // What Rust writes, fully populated, is valid under the schema, and
        // uses exactly the schema's property names.
        let mut full = sample();
        full.labels.insert("repository".into(), "acme/app".into());
        full.credential.fingerprint = Some(format!("sha256:{}", "ab".repeat(32)));
        let doc = serde_json::to_value(&full).unwrap();
        schema_accepts(&schema, &doc).unwrap();
        let mut rust_fields: Vec<&String> = doc.as_object().unwrap().keys().collect();
        let mut schema_fields: Vec<&String> =
            schema["properties"].as_object().unwrap().keys().collect();
        rust_fields.sort();
        schema_fields.sort();
        assert_eq!(rust_fields, schema_fields);
        let login = serde_json::to_value(CredentialRef::by_login("p", "e")).unwrap();
        schema_accepts(&schema["properties"]["credential"], &login).unwrap();
        // Required fields: dropping any of them fails both.
        for r in schema["required"].as_array().unwrap() {
            let mut d = doc.clone();
            d.as_object_mut().unwrap().remove(r.as_str().unwrap());
            assert!(schema_accepts(&schema, &d).is_err(), "schema requires {r}");
            let bytes = serde_json::to_vec(&d).unwrap();
            assert!(
                Detection::decode(None, &bytes).is_err(),
                "Rust requires {r}"
            );
        }
        // Documents both refuse.
        for bad in [
            serde_json::json!({"source":"s","source_id":"1","detected_at":"2026-01-01T00:00:00Z","credential":{"id":"a"},"extra":1}),
            serde_json::json!({"source":"s","source_id":"1","detected_at":"2026-01-01T00:00:00Z","credential":{"id":"a"},"severity":"urgent"}),
            serde_json::json!({"source":"s","source_id":"1","detected_at":"2026-01-01T00:00:00Z","credential":{"principal":"a"}}),
            serde_json::json!({"source":"s","source_id":"1","detected_at":"2026-01-01T00:00:00Z","credential":{"secret":"hunter2"}}),
            serde_json::json!({"v":2,"source":"s","source_id":"1","detected_at":"2026-01-01T00:00:00Z","credential":{"id":"a"}}),
        ] {
            assert!(
                schema_accepts(&schema, &bad).is_err(),
                "schema accepts {bad}"
            );
            let bytes = serde_json::to_vec(&bad).unwrap();
            assert!(
                Detection::decode(None, &bytes).is_err(),
                "Rust accepts {bad}"
            );
        }
    }

    #[test]
    fn detection_fingerprints_are_keyed() {
        let k = DetectKey::generate();
        let s = Secret::new("hunter2-but-longer".into());
        let sha = sha256_fingerprint(&s);
        let parsed = Fingerprint::parse(&sha).unwrap();
        assert_eq!(k.keyed(&parsed), k.fingerprint_secret(&s));
        assert_ne!(
            DetectKey::generate().fingerprint_secret(&s),
            k.fingerprint_secret(&s)
        );
        let dfp = k.fingerprint_secret(&s);
        assert_eq!(k.keyed(&Fingerprint::parse(&dfp).unwrap()), dfp);
        assert_eq!(DetectKey::parse(&k.to_hex()).unwrap().to_hex(), k.to_hex());
        assert_eq!(format!("{k:?}"), "DetectKey(<redacted>)");
    }
}
