//! Workers' presence heartbeats: every worker publishes a small [`Presence`]
//! on `keywave.worker.<region>` (core NATS, JSON) every
//! [`DEFAULT_INTERVAL`], and one with `leaving` set when it stops. The
//! coordinator follows them to know which regions have live workers (a
//! region without any pauses the campaigns that need it). Nothing secret
//! travels: region, worker id, load and timing only.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use thiserror::Error;

/// How often a worker announces itself.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Shortest and longest interval a heartbeat may announce (a receiver
/// clamps to these, so a bad value can neither flood nor hide a worker).
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);
pub const MAX_INTERVAL: Duration = Duration::from_secs(30);
/// A worker counts as live until this many of its announced intervals
/// passed without a heartbeat.
pub const MISSED_BEATS: u32 = 3;
/// Largest heartbeat accepted, in bytes.
pub const MAX_BYTES: usize = 4 * 1024;
/// Version of the heartbeat body.
pub const VERSION: u16 = 1;

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    pub v: u16,
    pub region: String,
    pub worker_id: String,
    /// Milliseconds until the next heartbeat.
    pub interval_ms: u64,
    /// Tasks this worker runs right now.
    #[serde(default)]
    pub in_flight: u64,
    /// Tasks it runs at most at once.
    #[serde(default)]
    pub concurrency: u64,
    /// The worker stops: count it gone at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
    /// The worker's clock when sent (for logs only; receivers use their own).
    #[serde(default)]
    pub at_ms: u64,
}

/// Why a heartbeat was ignored.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PresenceError {
    #[error("heartbeat of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("undecodable heartbeat: {0}")]
    Decode(String),
    #[error("heartbeat version {0} is not supported")]
    Version(u16),
    #[error("heartbeat for region {body:?} arrived on the subject of region {subject:?}")]
    WrongRegion { subject: String, body: String },
    #[error("heartbeat without a worker id")]
    NoWorker,
}

impl Presence {
    /// The heartbeat's interval, clamped to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms).clamp(MIN_INTERVAL, MAX_INTERVAL)
    }

    /// How long after this heartbeat its worker still counts as live.
    pub fn ttl(&self) -> Duration {
        self.interval() * MISSED_BEATS
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a heartbeat always serializes")
    }

    /// Decodes a heartbeat received on `subject` and checks it names the
    /// subject's region.
    pub fn decode(subject: &str, payload: &[u8]) -> Result<Presence, PresenceError> {
        if payload.len() > MAX_BYTES {
            return Err(PresenceError::TooLarge(payload.len()));
        }
        let p: Presence =
            serde_json::from_slice(payload).map_err(|e| PresenceError::Decode(e.to_string()))?;
        if p.v != VERSION {
            return Err(PresenceError::Version(p.v));
        }
        let region = subject.strip_prefix("keywave.worker.").unwrap_or_default();
        if region != p.region {
            return Err(PresenceError::WrongRegion {
                subject: region.to_string(),
                body: p.region,
            });
        }
        if p.worker_id.trim().is_empty() {
            return Err(PresenceError::NoWorker);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(region: &str) -> Presence {
        Presence {
            v: VERSION,
            region: region.into(),
            worker_id: "w-1".into(),
            interval_ms: 2_000,
            in_flight: 3,
            concurrency: 64,
            leaving: false,
            at_ms: 5,
        }
    }

    #[test]
    fn round_trips_and_checks_the_region() {
        let b = beat("eu");
        let subject = crate::subjects::worker_presence("eu");
        assert_eq!(Presence::decode(&subject, &b.encode()), Ok(b.clone()));
        assert!(matches!(
            Presence::decode("keywave.worker.us", &b.encode()),
            Err(PresenceError::WrongRegion { .. })
        ));
        assert!(matches!(
            Presence::decode(&subject, b"{"),
            Err(PresenceError::Decode(_))
        ));
        let mut old = b.clone();
        old.v = 99;
        assert_eq!(
            Presence::decode(&subject, &old.encode()),
            Err(PresenceError::Version(99))
        );
        assert!(matches!(
            Presence::decode(&subject, &vec![b' '; MAX_BYTES + 1]),
            Err(PresenceError::TooLarge(_))
        ));
    }

    #[test]
    fn interval_is_clamped() {
        let mut b = beat("eu");
        b.interval_ms = 0;
        assert_eq!(b.interval(), MIN_INTERVAL);
        b.interval_ms = u64::MAX;
        assert_eq!(b.interval(), MAX_INTERVAL);
        b.interval_ms = 2_000;
        assert_eq!(b.ttl(), Duration::from_secs(6));
    }
}
