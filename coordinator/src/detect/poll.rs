//! The polling fallback: for sources whose webhooks cannot reach the
//! coordinator (or to catch what a lost webhook delivery missed), a
//! configured source is fetched on an interval with `GET <url>` (optional
//! `Authorization: Bearer <token>`, the token read from an environment
//! variable or a file and never logged) and every open alert in the answer
//! is published as a detection, exactly as the webhook intake would.
//!
//! Formats of the answer ([`PollFormat`]):
//! - `detections`: a JSON array of normalized detections (docs/detection.schema.json);
//! - `github_alerts`: GitHub's REST "list secret scanning alerts"
//!   (`GET /repos/{owner}/{repo}/secret-scanning/alerts?state=open`, or the
//!   organization's), following `Link: rel="next"` on the same host for at
//!   most `max_pages` pages.
//!
//! De-duplication: a detection keeps its `source:source_id`
//! (`github:owner/repo#number` for GitHub, as the webhook makes it), which
//! is its `Nats-Msg-Id`: JetStream drops a repeat within the stream's
//! duplicate window, the poller skips what it already published, and the
//! intake's claims make a later repeat of a credential already being (or
//! already) contained a recorded no-op. An alert that arrived by webhook and
//! by polling is one detection and one containment.
//!
//! Every bound is explicit: interval (1 s to 24 h), request timeout (100 ms
//! to 60 s), body size (1 KiB to 64 MiB), pages per poll (1 to 100).

use super::adapters::{self, AdapterError, Translated};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use keywave_common::crypto::Secret;
use keywave_common::detect::{self as wire_detect, Detection};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Bounds of the settings.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
pub const MIN_BODY_BYTES: usize = 1024;
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
pub const MAX_PAGES: usize = 100;
/// Most sources one coordinator polls.
pub const MAX_SOURCES: usize = 32;
/// Most message ids remembered as published per source (then forgotten:
/// JetStream's duplicate window and the intake's claims still dedupe).
const MAX_SEEN: usize = 100_000;

/// What a polled URL answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PollFormat {
    /// A JSON array of normalized detections.
    #[default]
    Detections,
    /// GitHub's list of secret scanning alerts.
    GithubAlerts,
}

/// One polled source.
#[derive(Debug, Clone)]
pub struct PollSource {
    /// Its name in logs (`[A-Za-z0-9][A-Za-z0-9_-]*`).
    pub name: String,
    /// `http://` or `https://` URL fetched with GET.
    pub url: String,
    pub format: PollFormat,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<Secret>,
    pub interval: Duration,
    pub timeout: Duration,
    pub max_body_bytes: usize,
    pub max_pages: usize,
}

impl PollSource {
    /// A source with the default bounds: every 5 min, 10 s timeout, 4 MiB, 10 pages.
    pub fn new(name: impl Into<String>, url: impl Into<String>, format: PollFormat) -> Self {
        PollSource {
            name: name.into(),
            url: url.into(),
            format,
            token: None,
            interval: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            max_body_bytes: 4 * 1024 * 1024,
            max_pages: 10,
        }
    }

    /// Checks every bound; names the bad field.
    pub fn validate(&self) -> Result<(), SourceError> {
        keywave_common::ids::validate("name", &self.name)?;
        let uri: Uri = self.url.parse().map_err(|source| SourceError::NotAUrl {
            url: self.url.clone(),
            source,
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(SourceError::NotHttp(self.url.clone()));
        }
        let within = |field: &'static str, v: Duration, lo: Duration, hi: Duration| {
            if v < lo || v > hi {
                Err(SourceError::OutOfBounds { field, lo, hi })
            } else {
                Ok(())
            }
        };
        within("interval", self.interval, MIN_INTERVAL, MAX_INTERVAL)?;
        within("timeout", self.timeout, MIN_TIMEOUT, MAX_TIMEOUT)?;
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&self.max_body_bytes) {
            return Err(SourceError::MaxBodyBytes);
        }
        if !(1..=MAX_PAGES).contains(&self.max_pages) {
            return Err(SourceError::MaxPages);
        }
        Ok(())
    }
}

/// A poll source setting out of bounds; the message names the field.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Name(#[from] keywave_common::ids::IdError),
    #[error("url: {url:?} is not a URL")]
    NotAUrl {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("url: {0:?} must be an http(s) URL")]
    NotHttp(String),
    #[error("{field}: must be between {lo:?} and {hi:?}")]
    OutOfBounds {
        field: &'static str,
        lo: Duration,
        hi: Duration,
    },
    #[error("max_body_bytes: must be between {MIN_BODY_BYTES} and {MAX_BODY_BYTES}")]
    MaxBodyBytes,
    #[error("max_pages: must be between 1 and {MAX_PAGES}")]
    MaxPages,
}

/// A source as written in the `--poll-config` JSON file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    url: String,
    #[serde(default)]
    format: PollFormat,
    /// Environment variable holding the bearer token.
    #[serde(default)]
    token_env: Option<String>,
    /// File holding the bearer token.
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    max_pages: Option<usize>,
}

/// Why the `--poll-config` file was refused. Never holds a token.
#[derive(Debug, Error)]
pub enum PollConfigError {
    #[error("not a JSON array of sources: {0}")]
    Json(#[source] serde_json::Error),
    #[error("at most {MAX_SOURCES} sources")]
    TooMany,
    #[error("source {name:?}: {problem}")]
    Source {
        name: String,
        #[source]
        problem: SourceConfigError,
    },
}

/// What is wrong with one source of the `--poll-config` file.
#[derive(Debug, Error)]
pub enum SourceConfigError {
    #[error("interval: {0}")]
    Interval(#[source] keywave_common::duration::DurationError),
    #[error("timeout: {0}")]
    Timeout(#[source] keywave_common::duration::DurationError),
    #[error("set token_env or token_file, not both")]
    TwoTokens,
    #[error("token_env: {0} is not set")]
    TokenEnvUnset(String),
    #[error("token_file: cannot read {}: {source}", path.display())]
    TokenFileUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token_file: {} is empty", path.display())]
    TokenFileEmpty { path: PathBuf },
    #[error(transparent)]
    Invalid(#[from] SourceError),
    #[error("a source of that name is already configured")]
    Duplicate,
}

/// Parses the `--poll-config` file: a JSON array of sources. Tokens are read
/// through `env` (the variable named by `token_env`) or from `token_file`.
pub fn parse_config(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Vec<PollSource>, PollConfigError> {
    let raw: Vec<RawSource> = serde_json::from_str(text).map_err(PollConfigError::Json)?;
    if raw.len() > MAX_SOURCES {
        return Err(PollConfigError::TooMany);
    }
    let mut out: Vec<PollSource> = Vec::with_capacity(raw.len());
    for r in raw {
        let name = r.name.clone();
        let s = source_of(r, &env, &out)
            .map_err(|problem| PollConfigError::Source { name, problem })?;
        out.push(s);
    }
    Ok(out)
}

/// One source of the file, validated; `before` are the sources read so far.
fn source_of(
    r: RawSource,
    env: &impl Fn(&str) -> Option<String>,
    before: &[PollSource],
) -> Result<PollSource, SourceConfigError> {
    let mut s = PollSource::new(r.name, r.url, r.format);
    if let Some(v) = &r.interval {
        s.interval = keywave_common::duration::parse(v).map_err(SourceConfigError::Interval)?;
    }
    if let Some(v) = &r.timeout {
        s.timeout = keywave_common::duration::parse(v).map_err(SourceConfigError::Timeout)?;
    }
    if let Some(v) = r.max_body_bytes {
        s.max_body_bytes = v;
    }
    if let Some(v) = r.max_pages {
        s.max_pages = v;
    }
    s.token = match (r.token_env, r.token_file) {
        (Some(_), Some(_)) => return Err(SourceConfigError::TwoTokens),
        (Some(var), None) => match env(&var).filter(|t| !t.trim().is_empty()) {
            Some(t) => Some(Secret::new(t.trim().to_string())),
            None => return Err(SourceConfigError::TokenEnvUnset(var)),
        },
        (None, Some(path)) => {
            let t = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(source) => return Err(SourceConfigError::TokenFileUnreadable { path, source }),
            };
            let t = t.trim();
            if t.is_empty() {
                return Err(SourceConfigError::TokenFileEmpty { path });
            }
            Some(Secret::new(t.to_string()))
        }
        (None, None) => None,
    };
    s.validate()?;
    if before.iter().any(|o| o.name == s.name) {
        return Err(SourceConfigError::Duplicate);
    }
    Ok(s)
}

/// Why one poll failed (never carries the token).
#[derive(Debug, Error)]
pub enum PollError {
    #[error("bad url {0:?}")]
    Url(String),
    #[error("connecting to {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the server answered {0}")]
    Status(StatusCode),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the answer is not what was expected: {0}")]
    Format(#[from] AdapterError),
    #[error("publishing a detection: {0}")]
    Publish(#[source] wire_detect::PublishDetectionError),
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollStats {
    pub pages: usize,
    /// Detections published for the first time.
    pub published: usize,
    /// Already stored (a webhook or an earlier poll brought them).
    pub duplicates: usize,
    /// Not leaks (resolved alerts).
    pub ignored: usize,
    /// Entries that could not be read (logged, skipped).
    pub invalid: usize,
}

/// Fetches one source on its interval and publishes what it finds.
pub struct Poller {
    src: PollSource,
    js: async_nats::jetstream::Context,
    tls: Option<tokio_rustls::TlsConnector>,
    seen: HashSet<String>,
}

/// Why a poller could not be prepared.
#[derive(Debug, Error)]
pub enum PollSetupError {
    #[error(transparent)]
    Invalid(#[from] SourceError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// Why the TLS client of https sources could not be built.
#[derive(Debug, Error)]
pub enum TlsSetupError {
    #[error("no root certificate found on this system (install ca-certificates)")]
    NoRoots,
    #[error("TLS protocol versions: {0}")]
    Protocols(#[source] tokio_rustls::rustls::Error),
}

impl Poller {
    /// Prepares a poller (loads the system's root certificates for https).
    pub fn new(
        src: PollSource,
        js: async_nats::jetstream::Context,
    ) -> Result<Self, PollSetupError> {
        src.validate()?;
        let tls = if src.url.starts_with("https://") {
            Some(tls_connector()?)
        } else {
            None
        };
        Ok(Poller {
            src,
            js,
            tls,
            seen: HashSet::new(),
        })
    }

    /// Polls at once, then every interval, until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.src.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(source = %self.src.name, format = ?self.src.format, interval = ?self.src.interval, "Polling detection source");
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let polled = tokio::select! {
                r = self.poll_once() => r,
                _ = shutdown.cancelled() => return,
            };
            match polled {
                Ok(s) if s.published > 0 || s.invalid > 0 => {
                    info!(source = %self.src.name, pages = s.pages, published = s.published, duplicates = s.duplicates, ignored = s.ignored, invalid = s.invalid, "Polled detection source")
                }
                Ok(s) => {
                    debug!(source = %self.src.name, pages = s.pages, duplicates = s.duplicates, ignored = s.ignored, "Polled detection source: nothing new")
                }
                Err(e) => {
                    warn!(source = %self.src.name, error = %e, "Polling a detection source failed; trying again at the next interval")
                }
            }
        }
    }

    /// One poll: every page, every entry published (or skipped).
    pub async fn poll_once(&mut self) -> Result<PollStats, PollError> {
        let mut stats = PollStats::default();
        let mut url = self.src.url.clone();
        loop {
            stats.pages += 1;
            let (body, next) = self.fetch(&url).await?;
            let entries = match self.src.format {
                PollFormat::Detections => adapters::detections_list(&body)?,
                PollFormat::GithubAlerts => adapters::github_alerts_list(&body, &url)?,
            };
            drop(body);
            for entry in entries {
                match entry {
                    Ok(Translated::Detection(d)) => self.publish(&d, &mut stats).await?,
                    Ok(Translated::Ignored(_)) => stats.ignored += 1,
                    Err(e) => {
                        stats.invalid += 1;
                        debug!(source = %self.src.name, error = %e, "Skipping an unreadable entry");
                    }
                }
            }
            match next {
                Some(n) if stats.pages < self.src.max_pages => url = n,
                _ => break,
            }
        }
        Ok(stats)
    }

    async fn publish(&mut self, d: &Detection, stats: &mut PollStats) -> Result<(), PollError> {
        let id = d.msg_id();
        if self.seen.contains(&id) {
            stats.duplicates += 1;
            return Ok(());
        }
        let duplicate = wire_detect::publish(&self.js, d)
            .await
            .map_err(PollError::Publish)?;
        if duplicate {
            stats.duplicates += 1;
        } else {
            stats.published += 1;
            info!(source = %self.src.name, detection = %id, credential = %d.credential.describe(), "Detection found by polling");
        }
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        self.seen.insert(id);
        Ok(())
    }

    /// GET `url` within the timeout; the body (bounded) and the next page.
    async fn fetch(&self, url: &str) -> Result<(Bytes, Option<String>), PollError> {
        let timeout = self.src.timeout;
        tokio::time::timeout(timeout, self.fetch_inner(url))
            .await
            .map_err(|_| PollError::Timeout(timeout))?
    }

    async fn fetch_inner(&self, url: &str) -> Result<(Bytes, Option<String>), PollError> {
        let uri: Uri = url.parse().map_err(|_| PollError::Url(url.to_string()))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(PollError::Url(url.to_string())),
        };
        let host = uri
            .host()
            .ok_or_else(|| PollError::Url(url.to_string()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.clone());
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut req = Request::get(path)
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("keywave/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                header::ACCEPT,
                match self.src.format {
                    PollFormat::GithubAlerts => "application/vnd.github+json",
                    PollFormat::Detections => "application/json",
                },
            );
        if self.src.format == PollFormat::GithubAlerts {
            req = req.header("X-GitHub-Api-Version", "2022-11-28");
        }
        if let Some(t) = &self.src.token {
            let mut v = header::HeaderValue::from_str(&format!("Bearer {}", t.expose()))
                .map_err(|_| PollError::Http("the token is not a valid header value".into()))?;
            v.set_sensitive(true);
            req = req.header(header::AUTHORIZATION, v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| PollError::Http(e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| PollError::Connect {
                host: format!("{host}:{port}"),
                source,
            })?;
        let (body, link) = if https {
            let tls = self
                .tls
                .as_ref()
                .ok_or_else(|| PollError::Tls("no TLS configuration".into()))?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| PollError::Tls(e.to_string()))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| PollError::Tls(e.to_string()))?;
            send(TokioIo::new(stream), req, self.src.max_body_bytes).await?
        } else {
            send(TokioIo::new(tcp), req, self.src.max_body_bytes).await?
        };
        // Follow only to the same scheme and host: the token goes nowhere else.
        let next = link
            .as_deref()
            .and_then(next_link)
            .filter(|n| same_origin(&uri, n));
        Ok((body, next))
    }
}

async fn send<I>(
    io: I,
    req: Request<Empty<Bytes>>,
    max: usize,
) -> Result<(Bytes, Option<String>), PollError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| PollError::Http(e.to_string()))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "Polling connection ended with an error");
        }
    });
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| PollError::Http(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(PollError::Status(resp.status()));
        }
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(PollError::TooLarge(max));
        }
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let body = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    PollError::TooLarge(max)
                } else {
                    PollError::Http(e.to_string())
                }
            })?
            .to_bytes();
        Ok((body, link))
    }
    .await;
    conn.abort();
    result
}

/// The `rel="next"` URL of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| url.to_string())
    })
}

fn same_origin(base: &Uri, next: &str) -> bool {
    next.parse::<Uri>()
        .is_ok_and(|n| n.scheme() == base.scheme() && n.authority() == base.authority())
}

fn tls_connector() -> Result<tokio_rustls::TlsConnector, TlsSetupError> {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsSetupError::NoRoots);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsSetupError::Protocols)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_and_origins() {
        let l = r#"<https://api.github.com/repositories/1/secret-scanning/alerts?page=2>; rel="next", <https://api.github.com/repositories/1/secret-scanning/alerts?page=5>; rel="last""#;
        let next = next_link(l).unwrap();
        assert!(next.ends_with("page=2"));
        let base: Uri = "https://api.github.com/repos/acme/app/secret-scanning/alerts"
            .parse()
            .unwrap();
        assert!(same_origin(&base, &next));
        assert!(!same_origin(&base, "https://evil.example/x"));
        assert!(!same_origin(&base, "http://api.github.com/x"));
        assert_eq!(next_link(r#"<https://x/y>; rel="prev""#), None);
    }

    #[test]
    fn config_is_bounded_and_reads_tokens() {
        let env = |k: &str| (k == "GH_TOKEN").then(|| "tok-123".to_string());
        let srcs = parse_config(
            r#"[{"name":"gh-acme-app","format":"github_alerts","url":"https://api.github.com/repos/acme/app/secret-scanning/alerts?state=open&per_page=100","token_env":"GH_TOKEN","interval":"2m"},
                {"name":"siem","url":"http://siem.internal:8080/open-alerts"}]"#,
            env,
        )
        .unwrap();
        assert_eq!(srcs.len(), 2);
        assert_eq!(srcs[0].format, PollFormat::GithubAlerts);
        assert_eq!(srcs[0].interval, Duration::from_secs(120));
        assert_eq!(srcs[0].token.as_ref().unwrap().expose(), "tok-123");
        assert_eq!(srcs[1].format, PollFormat::Detections);
        assert!(srcs[1].token.is_none());
        for (bad, what) in [
            (r#"[{"name":"a","url":"ftp://x/y"}]"#, "url"),
            (
                r#"[{"name":"a","url":"http://x/y","interval":"10ms"}]"#,
                "interval",
            ),
            (
                r#"[{"name":"a","url":"http://x/y","timeout":"5m"}]"#,
                "timeout",
            ),
            (
                r#"[{"name":"a","url":"http://x/y","max_body_bytes":10}]"#,
                "max_body_bytes",
            ),
            (
                r#"[{"name":"a","url":"http://x/y","token_env":"NOPE"}]"#,
                "NOPE",
            ),
            (r#"[{"name":"a","url":"http://x/y","extra":1}]"#, "extra"),
            (
                r#"[{"name":"a","url":"http://x/y"},{"name":"a","url":"http://x/z"}]"#,
                "already",
            ),
        ] {
            let e = parse_config(bad, env).unwrap_err().to_string();
            assert!(e.contains(what), "{bad}: {e}");
            assert!(!e.contains("tok-123"));
        }
    }

    #[test]
    fn github_list_translates_like_the_webhook() {
        let body = br#"[
          {"number": 12, "state": "open", "created_at": "2026-03-17T15:42:05Z",
           "url": "https://api.github.com/repos/acme/payments/secret-scanning/alerts/12",
           "html_url": "https://github.com/acme/payments/security/secret-scanning/12",
           "secret_type": "redis_password", "secret": "s3cr3t-value", "validity": "unknown"},
          {"number": 13, "state": "resolved", "resolution": "revoked"},
          {"state": "open"}
        ]"#;
        let out = adapters::github_alerts_list(
            body,
            "https://api.github.com/repos/acme/payments/secret-scanning/alerts?state=open",
        )
        .unwrap();
        assert_eq!(out.len(), 3);
        let Ok(Translated::Detection(d)) = &out[0] else {
            panic!("{:?}", out[0])
        };
        assert_eq!(d.msg_id(), "github:acme/payments#12");
        assert!(d.credential.fingerprint.is_some());
        assert!(!serde_json::to_string(d).unwrap().contains("s3cr3t-value"));
        assert!(matches!(out[1], Ok(Translated::Ignored(_))));
        assert!(out[2].is_err());
        assert_eq!(
            adapters::github_repo_of_url("https://api.github.com/repos/o/r?x=1"),
            Some("o/r".into())
        );
        assert!(adapters::github_alerts_list(b"{}", "x").is_err());
    }
}
