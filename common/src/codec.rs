//! Encoding of every keywave message. The `Content-Type` header picks the
//! format: `application/msgpack` on the hot task/result path, `application/json`
//! accepted everywhere (and assumed when the header is absent). Decoding never
//! panics: oversized, malformed and unknown-version payloads are typed errors.

use crate::wire::{Versioned, SCHEMA_VERSION};
use async_nats::{header::HeaderName, HeaderMap};
use bytes::Bytes;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use thiserror::Error;

pub const CONTENT_TYPE: &str = "Content-Type";
pub const MSGPACK: &str = "application/msgpack";
pub const JSON: &str = "application/json";
/// Header carrying the schema version of the body.
pub const SCHEMA_HEADER: &str = "Keywave-Schema";
/// JetStream de-duplication header.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";

/// Largest message body keywave accepts (tasks and results are a few hundred bytes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Deepest nesting accepted in a MessagePack body. keywave's messages nest
/// four levels at most; rmp-serde's own default (1,024) recurses deep enough
/// to overflow a 2 MiB thread stack in a debug build, so a hostile payload
/// of nested one-element arrays could crash a worker. JSON bodies are bounded
/// by serde_json's recursion limit (128).
pub const MAX_DEPTH: usize = 32;

// The header names as prebuilt `HeaderName`s: building one from a `&str`
// validates and copies it, once per insert and once per lookup, on every
// message of the hot path.
const CONTENT_TYPE_NAME: HeaderName = HeaderName::from_static(CONTENT_TYPE);
const SCHEMA_HEADER_NAME: HeaderName = HeaderName::from_static(SCHEMA_HEADER);
const MSG_ID_NAME: HeaderName = HeaderName::from_static(MSG_ID);
/// [`SCHEMA_VERSION`] as the header carries it (a test keeps the two equal).
const SCHEMA_VERSION_TEXT: &str = "1";
/// Initial capacity of an encoding buffer: a task (~300 bytes) or a result
/// (~550 bytes) is written without growing it.
const ENCODE_CAPACITY: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    MsgPack,
    Json,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::MsgPack => MSGPACK,
            Format::Json => JSON,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("unsupported content type {0:?}")]
    UnsupportedContentType(String),
    #[error("unknown schema version {found} (this build speaks {SCHEMA_VERSION})")]
    UnknownVersion { found: u16 },
    #[error("malformed {format} payload: {detail}")]
    Malformed {
        format: &'static str,
        detail: String,
    },
    #[error("could not encode message: {0}")]
    Encode(String),
}

impl CodecError {
    /// A short machine-friendly reason, for dead letters and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::Oversized { .. } => "oversized",
            CodecError::UnsupportedContentType(_) => "unsupported_content_type",
            CodecError::UnknownVersion { .. } => "unknown_version",
            CodecError::Malformed { .. } => "malformed",
            CodecError::Encode(_) => "encode",
        }
    }
}

/// Encodes `msg` in `format`. MessagePack uses named fields so that optional
/// fields can be added without breaking older readers.
pub fn encode<T: Serialize>(format: Format, msg: &T) -> Result<Bytes, CodecError> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    match format {
        Format::MsgPack => rmp_serde::encode::write_named(&mut out, msg)
            .map_err(|e| CodecError::Encode(e.to_string()))?,
        Format::Json => {
            serde_json::to_writer(&mut out, msg).map_err(|e| CodecError::Encode(e.to_string()))?
        }
    }
    Ok(Bytes::from(out))
}

/// Headers for a published message: content type, schema version, message id.
pub fn headers(format: Format, msg_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE_NAME, format.content_type());
    h.insert(SCHEMA_HEADER_NAME, SCHEMA_VERSION_TEXT);
    h.insert(MSG_ID_NAME, msg_id);
    h
}

/// Picks the format from the headers; JSON when no `Content-Type` is given.
pub fn format_of(headers: Option<&HeaderMap>) -> Result<Format, CodecError> {
    let ct = headers
        .and_then(|h| h.get(CONTENT_TYPE_NAME))
        .map(|v| v.as_str());
    match ct {
        None => Ok(Format::Json),
        Some(ct) => {
            let base = ct.split(';').next().unwrap_or("").trim();
            match base {
                MSGPACK | "application/x-msgpack" => Ok(Format::MsgPack),
                JSON => Ok(Format::Json),
                other => Err(CodecError::UnsupportedContentType(
                    other.chars().take(64).collect(),
                )),
            }
        }
    }
}

#[derive(Deserialize)]
struct Probe {
    v: u16,
}

/// Decodes a body in `format` with no size or version check (callers apply
/// their own size limit), nesting bounded by [`MAX_DEPTH`] / serde_json.
pub fn from_bytes<T: DeserializeOwned>(format: Format, payload: &[u8]) -> Result<T, CodecError> {
    match format {
        Format::MsgPack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(payload);
            de.set_max_depth(MAX_DEPTH);
            T::deserialize(&mut de).map_err(|e| CodecError::Malformed {
                format: "msgpack",
                detail: truncate(e.to_string()),
            })
        }
        Format::Json => serde_json::from_slice(payload).map_err(|e| CodecError::Malformed {
            format: "json",
            detail: truncate(e.to_string()),
        }),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Decodes a versioned message, enforcing size, content type and version.
pub fn decode<T: DeserializeOwned + Versioned>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<T, CodecError> {
    decode_with_limit(headers, payload, MAX_MESSAGE_BYTES)
}

/// [`decode`] with an explicit size limit.
pub fn decode_with_limit<T: DeserializeOwned + Versioned>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
    max: usize,
) -> Result<T, CodecError> {
    if payload.len() > max {
        return Err(CodecError::Oversized {
            len: payload.len(),
            max,
        });
    }
    let format = format_of(headers)?;
    if let Some(v) = headers.and_then(|h| h.get(SCHEMA_HEADER_NAME)) {
        match v.as_str().parse::<u16>() {
            Ok(SCHEMA_VERSION) => {}
            Ok(found) => return Err(CodecError::UnknownVersion { found }),
            Err(_) => {
                return Err(CodecError::Malformed {
                    format: "header",
                    detail: format!("{SCHEMA_HEADER} is not a number"),
                })
            }
        }
    }
    // One pass on the hot path. Only when the body does not parse as `T` is
    // its version read on its own, so that a message from another schema is
    // reported as such rather than as a confusing field error.
    match from_bytes::<T>(format, payload) {
        Ok(msg) if msg.version() == SCHEMA_VERSION => Ok(msg),
        Ok(msg) => Err(CodecError::UnknownVersion {
            found: msg.version(),
        }),
        Err(e) => match from_bytes::<Probe>(format, payload) {
            Ok(probe) if probe.v != SCHEMA_VERSION => {
                Err(CodecError::UnknownVersion { found: probe.v })
            }
            _ => Err(e),
        },
    }
}

/// Decodes an unversioned body (API requests) as JSON or MessagePack.
pub fn decode_plain<T: DeserializeOwned>(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<T, CodecError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversized {
            len: payload.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    from_bytes(format_of(headers)?, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        ErrorClass, Outcome, RotationResult, RotationTask, Step, StepTiming, Strategy, TargetKind,
        TaskAction,
    };
    use proptest::prelude::{any, prop_assert_eq, proptest};

    fn task(id: String, principal: String, wave: u32, deadline: u64) -> RotationTask {
        RotationTask {
            v: SCHEMA_VERSION,
            task_id: id,
            campaign_id: "c-1".into(),
            wave,
            index: 3,
            action: TaskAction::Rotate,
            strategy: Strategy::Continuity,
            credential_id: "cred-1".into(),
            region: "eu".into(),
            endpoint: "redis-main".into(),
            kind: TargetKind::Redis,
            principal,
            issued_at_ms: 1,
            deadline_ms: deadline,
            run_timeout_ms: 0,
            consumers: Vec::new(),
        }
    }

    proptest! {
        #[test]
        fn task_round_trips_in_both_formats(id in "[a-z0-9:-]{1,40}", principal in ".{0,40}", wave in 0u32..1000, deadline in any::<u64>()) {
            let t = task(id, principal, wave, deadline);
            for f in [Format::MsgPack, Format::Json] {
                let bytes = encode(f, &t).unwrap();
                let h = headers(f, &t.task_id);
                let back: RotationTask = decode(Some(&h), &bytes).unwrap();
                prop_assert_eq!(&back, &t);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for f in [Format::MsgPack, Format::Json] {
                let h = headers(f, "x");
                let _ = decode::<RotationTask>(Some(&h), &bytes);
                let _ = decode::<RotationResult>(Some(&h), &bytes);
            }
        }

        #[test]
        fn result_round_trips(err in proptest::option::of(".{0,60}"), micros in any::<u64>()) {
            let r = RotationResult {
                v: SCHEMA_VERSION, task_id: "t".into(), campaign_id: "c".into(), wave: 1, index: 0,
                action: TaskAction::Rotate, credential_id: "x".into(), region: "eu".into(),
                outcome: Outcome::Failed, step: Step::Set, error_class: Some(ErrorClass::TargetUnavailable),
                error: err, timings: vec![StepTiming { step: Step::Staged, micros }],
                new_fingerprint: Some("fp1:00".into()), old_fingerprint: None, old_rejected: Some(true),
                worker_id: "w".into(), finished_at_ms: 5,
                consumers: Vec::new(),
            };
            for f in [Format::MsgPack, Format::Json] {
                let back: RotationResult = decode(Some(&headers(f, "t")), &encode(f, &r).unwrap()).unwrap();
                prop_assert_eq!(&back, &r);
            }
        }
    }

    #[test]
    fn unknown_version_is_typed() {
        let mut t = task("a".into(), "p".into(), 0, 0);
        t.v = 99;
        let bytes = encode(Format::MsgPack, &t).unwrap();
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, MSGPACK);
        let err = decode::<RotationTask>(Some(&h), &bytes).unwrap_err();
        assert_eq!(err, CodecError::UnknownVersion { found: 99 });
        // The header alone is enough to refuse.
        let h = {
            let mut h = headers(Format::MsgPack, "a");
            h.insert(SCHEMA_HEADER, "7");
            h
        };
        let ok = encode(Format::MsgPack, &task("a".into(), "p".into(), 0, 0)).unwrap();
        assert_eq!(
            decode::<RotationTask>(Some(&h), &ok).unwrap_err(),
            CodecError::UnknownVersion { found: 7 }
        );
    }

    #[test]
    fn oversized_and_bad_content_type_are_typed() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode::<RotationTask>(None, &big),
            Err(CodecError::Oversized { .. })
        ));
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, "text/plain");
        assert!(matches!(
            decode::<RotationTask>(Some(&h), b"{}"),
            Err(CodecError::UnsupportedContentType(_))
        ));
        assert!(matches!(
            decode::<RotationTask>(None, b"{\"v\":1}"),
            Err(CodecError::Malformed { .. })
        ));
    }

    #[test]
    fn schema_header_text_matches_the_version() {
        assert_eq!(SCHEMA_VERSION_TEXT, SCHEMA_VERSION.to_string());
        let h = headers(Format::MsgPack, "id-1");
        assert_eq!(h.get(SCHEMA_HEADER).unwrap().as_str(), SCHEMA_VERSION_TEXT);
        assert_eq!(h.get(CONTENT_TYPE).unwrap().as_str(), MSGPACK);
        assert_eq!(h.get(MSG_ID).unwrap().as_str(), "id-1");
    }

    /// A body from a future schema whose fields no longer fit this build's
    /// type is still reported as an unknown version, not as malformed.
    #[test]
    fn unknown_version_with_unparseable_fields_is_typed() {
        for f in [Format::MsgPack, Format::Json] {
            let future = serde_json::json!({"v": 2, "task_id": 17, "shape": "new"});
            let bytes = encode(f, &future).unwrap();
            let err = decode::<RotationTask>(Some(&headers(f, "x")), &bytes).unwrap_err();
            assert_eq!(err, CodecError::UnknownVersion { found: 2 });
            // The same body at this version is malformed.
            let current = serde_json::json!({"v": 1, "task_id": 17, "shape": "new"});
            let bytes = encode(f, &current).unwrap();
            assert!(matches!(
                decode::<RotationTask>(Some(&headers(f, "x")), &bytes).unwrap_err(),
                CodecError::Malformed { .. }
            ));
        }
    }

    #[test]
    fn json_is_accepted_without_header() {
        let t = task("a".into(), "p".into(), 0, 0);
        let bytes = encode(Format::Json, &t).unwrap();
        let back: RotationTask = decode(None, &bytes).unwrap();
        assert_eq!(back, t);
    }

    /// Nesting is bounded too: a payload that is all brackets (JSON) or all
    /// one-element arrays (MessagePack), as deep as the size limit allows,
    /// is a typed error and never exhausts the stack.
    #[test]
    fn deeply_nested_payloads_are_malformed_not_a_crash() {
        let deep_json = format!(
            "{{\"v\":1,\"x\":{}{}}}",
            "[".repeat(60_000),
            "]".repeat(60_000)
        );
        let json = headers(Format::Json, "m");
        assert!(deep_json.len() > MAX_MESSAGE_BYTES);
        assert!(matches!(
            decode::<RotationTask>(Some(&json), deep_json.as_bytes()),
            Err(CodecError::Oversized { .. })
        ));
        let nested = format!(
            "{{\"v\":1,\"x\":{}{}}}",
            "[".repeat(30_000),
            "]".repeat(30_000)
        );
        assert!(nested.len() < MAX_MESSAGE_BYTES);
        assert!(matches!(
            decode::<RotationTask>(Some(&json), nested.as_bytes()),
            Err(CodecError::Malformed { .. })
        ));

        // fixmap{ "v": 1, "x": [[[[...]]]] } in MessagePack: 0x91 is a
        // one-element array.
        let mut deep_mp = vec![0x82, 0xa1, b'v', 0x01, 0xa1, b'x'];
        deep_mp.extend(std::iter::repeat_n(0x91, 60_000));
        deep_mp.push(0xc0);
        let mp = headers(Format::MsgPack, "m");
        assert!(matches!(
            decode::<RotationTask>(Some(&mp), &deep_mp),
            Err(CodecError::Malformed { .. })
        ));
    }
}
