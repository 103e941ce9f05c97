//! Consumer verification: after a continuity rotation promotes the
//! new secret, and before the old one is revoked, the worker waits until every
//! consumer of the credential is proven to use the new secret:
//!
//! - `attest`: an [`Attestation`] of the new fingerprint, with a passing
//!   health check, from the consumer's agent on
//!   `keywave.attest.<region>.<credential>`. Attestations are kept in the
//!   `KEYWAVE_ATTEST` stream, so one sent while no worker waited (or before a
//!   worker restarted) is still found: the wait reads the credential's subject
//!   from the start (bounded per subject) and then follows it.
//! - `http`: a plain HTTP `GET` of the consumer's URL must answer 2xx.
//! - `none`: never waited for; reported `unverified`.
//!
//! Each wait is bounded by the consumer's `timeout_ms` and by the task's
//! deadline (a reserve is kept for revoke and verify). Nothing here sees a
//! secret: only fingerprints are compared.

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::StreamExt;
use keywave_common::now_ms;
use keywave_common::wire::{
    Attestation, ConsumerCheck, ConsumerOutcome, ConsumerStatus, VerifyKind,
};
use keywave_common::{codec, subjects, topology};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Longest wait for a consumer when neither its timeout nor the task's
/// deadline bounds it.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(600);
/// Time kept before the task's deadline for revoke and verify: at most this,
/// at most a quarter of what is left.
pub const DEADLINE_RESERVE: Duration = Duration::from_secs(5);
/// Pause between two HTTP probes of one consumer.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// Time one HTTP probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for a region's consumers to move over.
#[derive(Clone)]
pub struct ConsumerVerifier {
    js: jetstream::Context,
    region: String,
}

impl std::fmt::Debug for ConsumerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerVerifier")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// Why a consumer was not verified; its text is the outcome's `detail`.
/// Cloned into the outcome of every check of the consumer, hence the shared
/// causes.
#[derive(Debug, Clone, Error)]
pub enum VerifyFailure {
    /// The wait ended without an answer for this consumer.
    #[error("no attestation of the new fingerprint")]
    NoAttestation,
    #[error("not probed")]
    NotProbed,
    #[error("cannot read stream {stream}: {source}", stream = topology::STREAM_ATTEST)]
    AttestStream {
        #[source]
        source: Arc<jetstream::context::GetStreamError>,
    },
    #[error("reading attestations: {0}")]
    AttestConsumer(#[source] Arc<jetstream::stream::ConsumerError>),
    #[error("reading attestations: {0}")]
    AttestMessages(#[source] Arc<jetstream::consumer::StreamError>),
    /// The consumer's time was up; what was last seen of it.
    #[error("{0} in time")]
    NotInTime(NotYet),
    #[error("attestation stream ended before the consumer attested")]
    StreamEnded,
    #[error("http verification without a url")]
    NoUrl,
    /// The last HTTP probe before the consumer's time was up.
    #[error(transparent)]
    Probe(#[from] ProbeFailure),
}

/// The last thing an attestation wait saw of a consumer that has not moved
/// over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NotYet {
    #[error("no attestation of the new fingerprint")]
    NoAttestation,
    #[error("attested another secret, not the new one")]
    OtherSecret,
    #[error("attested the new secret but its health check failed")]
    Unhealthy,
}

/// Why one HTTP probe did not pass.
#[derive(Debug, Clone, Error)]
pub enum ProbeFailure {
    #[error("probe answered HTTP {0}")]
    Status(u16),
    #[error("probe failed: {0}")]
    Failed(#[source] HttpGetError),
    #[error("probe timed out")]
    TimedOut,
}

/// Why a `GET` got no status code.
#[derive(Debug, Clone, Error)]
pub enum HttpGetError {
    #[error(transparent)]
    Url(#[from] HttpUrlError),
    /// Connecting, sending the request or reading the answer failed.
    #[error("{0}")]
    Io(#[source] Arc<std::io::Error>),
    #[error("malformed HTTP status line")]
    MalformedStatus(#[source] std::num::ParseIntError),
    #[error("not an HTTP answer")]
    NotHttp,
}

impl From<std::io::Error> for HttpGetError {
    fn from(e: std::io::Error) -> Self {
        HttpGetError::Io(Arc::new(e))
    }
}

/// A URL `http` verification cannot probe.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HttpUrlError {
    #[error("only http:// URLs can be probed")]
    NotHttp,
    #[error("the URL needs a host (and no credentials)")]
    NoHost,
    #[error("bad port {port:?}")]
    BadPort {
        port: String,
        #[source]
        source: std::num::ParseIntError,
    },
    #[error("the path must not contain whitespace")]
    BadPath,
}

/// Shutdown interrupted a wait: the task is handed back and resumes (the
/// attestations stay in their stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// The instant (ms since the epoch) a wait for `check` must end.
pub fn wait_limit(check: &ConsumerCheck, now: u64, deadline_ms: u64) -> u64 {
    let by_deadline = if deadline_ms == 0 {
        now + DEFAULT_WAIT.as_millis() as u64
    } else {
        let left = deadline_ms.saturating_sub(now);
        let reserve = (DEADLINE_RESERVE.as_millis() as u64).min(left / 4);
        deadline_ms.saturating_sub(reserve)
    };
    match check.timeout_ms {
        Some(t) => by_deadline.min(now.saturating_add(t)),
        None => by_deadline,
    }
}

impl ConsumerVerifier {
    pub fn new(js: jetstream::Context, region: impl Into<String>) -> Self {
        ConsumerVerifier {
            js,
            region: region.into(),
        }
    }

    /// Verifies every consumer in `checks` against the new secret's
    /// `fingerprint`, concurrently; returns one outcome per check, in order.
    pub async fn verify(
        &self,
        credential_id: &str,
        fingerprint: &str,
        checks: &[ConsumerCheck],
        deadline_ms: u64,
        shutdown: &CancellationToken,
    ) -> Result<Vec<ConsumerOutcome>, Interrupted> {
        let now = now_ms();
        let attest: Vec<&ConsumerCheck> = checks
            .iter()
            .filter(|c| c.verify == VerifyKind::Attest)
            .collect();
        let attest_wait = async {
            if attest.is_empty() {
                return HashMap::new();
            }
            self.await_attestations(credential_id, fingerprint, &attest, now, deadline_ms)
                .await
        };
        let probes =
            futures::future::join_all(checks.iter().filter(|c| c.verify == VerifyKind::Http).map(
                |c| async move {
                    let r = probe_until(c, wait_limit(c, now, deadline_ms)).await;
                    (c.id.clone(), r)
                },
            ));
        let (attested, probed) = tokio::select! {
            _ = shutdown.cancelled() => return Err(Interrupted),
            r = async { tokio::join!(attest_wait, probes) } => r,
        };
        let probed: HashMap<String, Result<u64, VerifyFailure>> = probed.into_iter().collect();
        Ok(checks
            .iter()
            .map(|c| {
                let r = match c.verify {
                    VerifyKind::None => None,
                    VerifyKind::Attest => Some(
                        attested
                            .get(&c.id)
                            .cloned()
                            .unwrap_or(Err(VerifyFailure::NoAttestation)),
                    ),
                    VerifyKind::Http => Some(
                        probed
                            .get(&c.id)
                            .cloned()
                            .unwrap_or(Err(VerifyFailure::NotProbed)),
                    ),
                };
                let (status, detail, at) = match r {
                    None => (ConsumerStatus::Unverified, None, None),
                    Some(Ok(at)) => (ConsumerStatus::Verified, None, Some(at)),
                    Some(Err(d)) => (ConsumerStatus::Failed, Some(d.to_string()), None),
                };
                ConsumerOutcome {
                    id: c.id.clone(),
                    verify: c.verify,
                    status,
                    detail,
                    verified_at_ms: at,
                    after_ms: at.map(|at| at.saturating_sub(now)),
                }
            })
            .collect())
    }

    /// Reads `keywave.attest.<region>.<credential>` from the start of the
    /// stream and follows it until every consumer in `checks` attested the
    /// fingerprint with a passing health check, or its limit passed.
    async fn await_attestations(
        &self,
        credential_id: &str,
        fingerprint: &str,
        checks: &[&ConsumerCheck],
        now: u64,
        deadline_ms: u64,
    ) -> HashMap<String, Result<u64, VerifyFailure>> {
        let mut out: HashMap<String, Result<u64, VerifyFailure>> = HashMap::new();
        let mut limits: HashMap<&str, u64> = checks
            .iter()
            .map(|c| (c.id.as_str(), wait_limit(c, now, deadline_ms)))
            .collect();
        let subject = subjects::attest(&self.region, credential_id);
        let consumer = match self.js.get_stream(topology::STREAM_ATTEST).await {
            Ok(stream) => {
                stream
                    .create_consumer(pull::OrderedConfig {
                        filter_subject: subject.clone(),
                        deliver_policy: DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
            }
            Err(e) => {
                let failure = VerifyFailure::AttestStream {
                    source: Arc::new(e),
                };
                warn!(credential = %credential_id, error = %failure, "Consumer attestations unavailable");
                for c in checks {
                    out.insert(c.id.clone(), Err(failure.clone()));
                }
                return out;
            }
        };
        let failed = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => Ok(m),
                Err(e) => Err(VerifyFailure::AttestMessages(Arc::new(e))),
            },
            Err(e) => Err(VerifyFailure::AttestConsumer(Arc::new(e))),
        };
        let mut messages = match failed {
            Ok(m) => m,
            Err(failure) => {
                for c in checks {
                    out.insert(c.id.clone(), Err(failure.clone()));
                }
                return out;
            }
        };
        // Last reason each pending consumer was not verified yet.
        let mut why: HashMap<&str, NotYet> = HashMap::new();
        while !limits.is_empty() {
            let now = now_ms();
            // Consumers whose time is up fail now.
            limits.retain(|id, limit| {
                if *limit <= now {
                    let d = why.remove(id).unwrap_or(NotYet::NoAttestation);
                    out.insert(id.to_string(), Err(VerifyFailure::NotInTime(d)));
                    false
                } else {
                    true
                }
            });
            let Some(next) = limits.values().min().copied() else {
                break;
            };
            let wait = Duration::from_millis(next.saturating_sub(now).max(1));
            let msg = match tokio::time::timeout(wait, messages.next()).await {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    debug!(error = %e, "Attestation stream hiccup");
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            let a: Attestation = match codec::decode(msg.headers.as_ref(), &msg.payload) {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "Skipping an attestation that does not decode");
                    continue;
                }
            };
            if a.credential_id != credential_id || a.region != self.region {
                continue;
            }
            let Some((&id, _)) = limits.get_key_value(a.consumer_id.as_str()) else {
                continue;
            };
            if a.fingerprint != fingerprint {
                why.insert(id, NotYet::OtherSecret);
                continue;
            }
            if a.healthy {
                debug!(credential = %credential_id, consumer = %id, "Consumer attested the new secret");
                limits.remove(id);
                why.remove(id);
                out.insert(id.to_string(), Ok(now_ms()));
            } else {
                why.insert(id, NotYet::Unhealthy);
            }
        }
        for (id, _) in limits {
            out.insert(id.to_string(), Err(VerifyFailure::StreamEnded));
        }
        out
    }
}

/// Probes `check.url` until it answers 2xx or `limit` (ms since the epoch)
/// passes; returns when it answered.
async fn probe_until(check: &ConsumerCheck, limit: u64) -> Result<u64, VerifyFailure> {
    let Some(url) = check.url.as_deref() else {
        return Err(VerifyFailure::NoUrl);
    };
    let mut last;
    loop {
        let left = limit.saturating_sub(now_ms());
        let per_try = PROBE_TIMEOUT.min(Duration::from_millis(left.max(1)));
        last = match tokio::time::timeout(per_try, http_get_status(url)).await {
            Ok(Ok(code)) if (200..300).contains(&code) => return Ok(now_ms()),
            Ok(Ok(code)) => ProbeFailure::Status(code),
            Ok(Err(e)) => ProbeFailure::Failed(e),
            Err(_) => ProbeFailure::TimedOut,
        };
        if now_ms() + PROBE_INTERVAL.as_millis() as u64 >= limit {
            return Err(last.into());
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// An `http://host[:port][/path]` URL, split.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// Parses the plain-HTTP URLs `http` verification accepts.
pub fn parse_http_url(url: &str) -> Result<HttpUrl, HttpUrlError> {
    let rest = url.strip_prefix("http://").ok_or(HttpUrlError::NotHttp)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(HttpUrlError::NoHost);
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
            h,
            p.parse().map_err(|source| HttpUrlError::BadPort {
                port: p.to_string(),
                source,
            })?,
        ),
        _ => (authority, 80),
    };
    if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(HttpUrlError::BadPath);
    }
    Ok(HttpUrl {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        path: path.to_string(),
    })
}

/// One `GET`, returning the status code.
async fn http_get_status(url: &str) -> Result<u16, HttpGetError> {
    let u = parse_http_url(url)?;
    let mut s = tokio::net::TcpStream::connect((u.host.as_str(), u.port)).await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: keywave-worker\r\nConnection: close\r\n\r\n",
        u.path, u.host
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => {
            code.parse().map_err(HttpGetError::MalformedStatus)
        }
        _ => Err(HttpGetError::NotHttp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_parse() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/healthz").unwrap(),
            HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/healthz".into()
            }
        );
        assert_eq!(parse_http_url("http://svc").unwrap().port, 80);
        assert!(parse_http_url("https://svc/").is_err());
        assert!(parse_http_url("http://u:p@svc/").is_err());
        assert!(parse_http_url("http://svc:x/").is_err());
        assert_eq!(parse_http_url("http://u:p@svc/"), Err(HttpUrlError::NoHost));
    }

    #[test]
    fn failures_read_as_the_outcome_details() {
        assert_eq!(
            VerifyFailure::NotInTime(NotYet::OtherSecret).to_string(),
            "attested another secret, not the new one in time"
        );
        assert_eq!(
            VerifyFailure::NotInTime(NotYet::NoAttestation).to_string(),
            "no attestation of the new fingerprint in time"
        );
        assert_eq!(
            VerifyFailure::from(ProbeFailure::Status(503)).to_string(),
            "probe answered HTTP 503"
        );
    }

    #[tokio::test]
    async fn a_refused_probe_keeps_the_io_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let check = ConsumerCheck {
            id: "a".into(),
            verify: VerifyKind::Http,
            url: Some(format!("http://127.0.0.1:{port}/healthz")),
            timeout_ms: None,
        };
        let e = probe_until(&check, now_ms() + 200).await.unwrap_err();
        assert!(
            matches!(
                &e,
                VerifyFailure::Probe(ProbeFailure::Failed(HttpGetError::Io(_)))
            ),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("probe failed: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn waits_are_bounded_by_timeout_and_deadline() {
        let c = |t| ConsumerCheck {
            id: "a".into(),
            verify: VerifyKind::Attest,
            url: None,
            timeout_ms: t,
        };
        // A consumer timeout shorter than the deadline wins.
        assert_eq!(wait_limit(&c(Some(1_000)), 10_000, 100_000), 11_000);
        // Else the deadline less the reserve (5 s, or a quarter of what is left).
        assert_eq!(wait_limit(&c(None), 10_000, 100_000), 95_000);
        assert_eq!(wait_limit(&c(None), 10_000, 14_000), 13_000);
        assert_eq!(
            wait_limit(&c(None), 10_000, 0),
            10_000 + DEFAULT_WAIT.as_millis() as u64
        );
    }
}
