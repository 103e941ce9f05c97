//! The optional webhook intake over HTTP (axum). Authentic scanner events
//! become [`Detection`](keywave_common::detect::Detection)s published on
//! `keywave.detect.<source>` with `Nats-Msg-Id: <source>:<source_id>`; the
//! server itself never starts anything.
//!
//! | route | authentication |
//! |---|---|
//! | `POST /webhooks/github` | `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>` |
//! | `POST /webhooks/gitguardian` | `Gitguardian-Signature: sha256=<hex HMAC-SHA256(timestamp ‖ secret, body)>`, `Timestamp: <unix s>` within the allowed skew |
//! | `POST /webhooks/detection` | `Content-Type: application/json`, `X-Keywave-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`, `X-Keywave-Timestamp: <unix s>` within the allowed skew |
//! | `GET /metrics` | none: Prometheus text, `keywave_webhook_requests_total{source,outcome}` |
//! | `GET /healthz` | none |
//!
//! Unsigned, wrongly signed, stale, oversized, malformed and (on the generic
//! route) non-JSON requests get a
//! 4xx with a JSON `reason`, are counted, and publish nothing. Signatures are
//! compared in constant time. Secrets are never logged.

use super::adapters::{self, AdapterError, Translated};
use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use hmac::{Hmac, Mac};
use keywave_common::crypto::Secret;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Environment variables holding webhook secrets; each also has a `_FILE`
/// variant naming a file that holds the secret.
pub const GITHUB_SECRET_ENV: &str = "KEYWAVE_GITHUB_WEBHOOK_SECRET";
pub const GITGUARDIAN_SECRET_ENV: &str = "KEYWAVE_GITGUARDIAN_WEBHOOK_SECRET";
pub const GENERIC_SECRET_ENV: &str = "KEYWAVE_DETECT_WEBHOOK_SECRET";

/// Settings of the webhook server.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Address to listen on, e.g. `0.0.0.0:8088` (`127.0.0.1:0` in tests).
    pub listen: SocketAddr,
    /// GitHub webhook secret; the GitHub route is off without it.
    pub github_secret: Option<Secret>,
    /// GitGuardian signature token; the GitGuardian route is off without it.
    pub gitguardian_secret: Option<Secret>,
    /// Secret of the generic signed JSON route; off without it.
    pub generic_secret: Option<Secret>,
    /// Largest accepted body. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Largest accepted distance between a signed timestamp and now. Default 5 min.
    pub max_skew: Duration,
}

impl WebhookConfig {
    pub fn new(listen: SocketAddr) -> Self {
        WebhookConfig {
            listen,
            github_secret: None,
            gitguardian_secret: None,
            generic_secret: None,
            max_body_bytes: 1024 * 1024,
            max_skew: Duration::from_secs(300),
        }
    }

    /// Reads the three secrets from `env` (`NAME` or `NAME_FILE`).
    pub fn secrets_from_env(
        mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SecretFileError> {
        let read = |name: &str| -> Result<Option<Secret>, SecretFileError> {
            if let Some(v) = env(name).filter(|v| !v.is_empty()) {
                return Ok(Some(Secret::new(v)));
            }
            let var = format!("{name}_FILE");
            match env(&var).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(path) => {
                    let s = match std::fs::read_to_string(&path) {
                        Ok(s) => s,
                        Err(source) => {
                            return Err(SecretFileError::Unreadable { var, path, source })
                        }
                    };
                    let s = s.trim_end_matches(['\n', '\r']).to_string();
                    if s.is_empty() {
                        return Err(SecretFileError::Empty { var, path });
                    }
                    Ok(Some(Secret::new(s)))
                }
            }
        };
        self.github_secret = read(GITHUB_SECRET_ENV)?;
        self.gitguardian_secret = read(GITGUARDIAN_SECRET_ENV)?;
        self.generic_secret = read(GENERIC_SECRET_ENV)?;
        Ok(self)
    }
}

/// A webhook secret file (`<NAME>_FILE`) that cannot be used; names the
/// variable and the file, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{var}: cannot read {path}: {source}")]
    Unreadable {
        var: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{var}: {path} is empty")]
    Empty { var: String, path: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    GitHub,
    GitGuardian,
    Generic,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::GitHub => "github",
            Source::GitGuardian => "gitguardian",
            Source::Generic => "detection",
        }
    }
}

/// Why a request was refused (or what became of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Accepted,
    Duplicate,
    Ignored,
    NotConfigured,
    Oversized,
    Unsigned,
    BadSignature,
    Stale,
    Malformed,
    /// The body is not declared `application/json`.
    WrongMediaType,
    PublishFailed,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Accepted => "accepted",
            Verdict::Duplicate => "duplicate",
            Verdict::Ignored => "ignored",
            Verdict::NotConfigured => "not_configured",
            Verdict::Oversized => "oversized",
            Verdict::Unsigned => "unsigned",
            Verdict::BadSignature => "bad_signature",
            Verdict::Stale => "stale",
            Verdict::Malformed => "malformed",
            Verdict::WrongMediaType => "unsupported_media_type",
            Verdict::PublishFailed => "publish_failed",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Verdict::Accepted | Verdict::Duplicate | Verdict::Ignored => StatusCode::ACCEPTED,
            Verdict::NotConfigured => StatusCode::NOT_FOUND,
            Verdict::Oversized => StatusCode::PAYLOAD_TOO_LARGE,
            Verdict::Unsigned | Verdict::BadSignature | Verdict::Stale => StatusCode::UNAUTHORIZED,
            Verdict::Malformed => StatusCode::BAD_REQUEST,
            Verdict::WrongMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Verdict::PublishFailed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Request counters, by source and verdict.
#[derive(Default)]
struct Metrics {
    counts: Mutex<BTreeMap<(Source, Verdict), u64>>,
}

impl Metrics {
    fn add(&self, s: Source, v: Verdict) {
        *self
            .counts
            .lock()
            .expect("metrics lock")
            .entry((s, v))
            .or_default() += 1;
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# HELP keywave_webhook_requests_total Webhook requests by source and outcome.\n# TYPE keywave_webhook_requests_total counter\n",
        );
        for ((s, v), n) in self.counts.lock().expect("metrics lock").iter() {
            out.push_str(&format!(
                "keywave_webhook_requests_total{{source=\"{}\",outcome=\"{}\"}} {n}\n",
                s.as_str(),
                v.as_str()
            ));
        }
        out
    }
}

struct Shared {
    cfg: WebhookConfig,
    js: async_nats::jetstream::Context,
    metrics: Metrics,
}

/// A bound webhook server.
pub struct WebhookServer {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl WebhookServer {
    /// Binds `cfg.listen`.
    pub async fn bind(
        cfg: WebhookConfig,
        js: async_nats::jetstream::Context,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        Ok(WebhookServer {
            listener,
            shared: Arc::new(Shared {
                cfg,
                js,
                metrics: Metrics::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`; requests in flight finish.
    pub async fn serve(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let s = &self.shared.cfg;
        info!(
            listen = %self.local_addr()?,
            github = s.github_secret.is_some(),
            gitguardian = s.gitguardian_secret.is_some(),
            generic = s.generic_secret.is_some(),
            "Webhook intake listening"
        );
        let app = Router::new()
            .route("/webhooks/github", post(github))
            .route("/webhooks/gitguardian", post(gitguardian))
            .route("/webhooks/detection", post(generic))
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.shared.clone());
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }
}

async fn github(State(s): State<Arc<Shared>>, req: Request) -> Response {
    s.handle(Source::GitHub, req).await
}

async fn gitguardian(State(s): State<Arc<Shared>>, req: Request) -> Response {
    s.handle(Source::GitGuardian, req).await
}

async fn generic(State(s): State<Arc<Shared>>, req: Request) -> Response {
    s.handle(Source::Generic, req).await
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Compares a `sha256=<hex>` header with the expected MAC in constant time.
fn signature_matches(header: &str, expected: &[u8; 32]) -> bool {
    let Some(hex_sig) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let mut given = [0u8; 32];
    if hex::decode_to_slice(hex_sig, &mut given).is_err() {
        return false;
    }
    given.ct_eq(expected).into()
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A refusal or an acceptance, with its reason for the sender.
struct Reply {
    verdict: Verdict,
    body: serde_json::Value,
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|v| {
        v.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    })
}

fn refuse(verdict: Verdict, reason: impl Into<String>) -> Reply {
    Reply {
        verdict,
        body: serde_json::json!({ "ok": false, "outcome": verdict.as_str(), "reason": reason.into() }),
    }
}

impl Shared {
    async fn handle(&self, source: Source, req: Request) -> Response {
        let reply = self.process(source, req).await;
        self.metrics.add(source, reply.verdict);
        match reply.verdict {
            Verdict::Accepted | Verdict::Duplicate | Verdict::Ignored => {
                info!(
                    source = source.as_str(),
                    outcome = reply.verdict.as_str(),
                    "Webhook request"
                );
            }
            v => {
                warn!(source = source.as_str(), outcome = v.as_str(), reason = %reply.body["reason"].as_str().unwrap_or(""), "Webhook request refused");
            }
        }
        (
            reply.verdict.status(),
            [(header::CONTENT_TYPE, "application/json")],
            reply.body.to_string(),
        )
            .into_response()
    }

    fn secret(&self, source: Source) -> Option<&Secret> {
        match source {
            Source::GitHub => self.cfg.github_secret.as_ref(),
            Source::GitGuardian => self.cfg.gitguardian_secret.as_ref(),
            Source::Generic => self.cfg.generic_secret.as_ref(),
        }
    }

    async fn process(&self, source: Source, req: Request) -> Reply {
        let Some(secret) = self.secret(source) else {
            return refuse(
                Verdict::NotConfigured,
                format!(
                    "the {} webhook is not configured on this coordinator",
                    source.as_str()
                ),
            );
        };
        let max = self.cfg.max_body_bytes;
        let (parts, body) = req.into_parts();
        // The generic route takes exactly what its schema says: a JSON body
        // declared as such (a form or text/plain post from a browser page
        // must not start a containment).
        if source == Source::Generic && !is_json(header_str(&parts.headers, "content-type")) {
            return refuse(
                Verdict::WrongMediaType,
                "content-type must be application/json",
            );
        }
        let declared =
            header_str(&parts.headers, "content-length").and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return refuse(
                Verdict::Oversized,
                format!("body exceeds the limit of {max} bytes"),
            );
        }
        let body = match axum::body::to_bytes(Body::new(body), max).await {
            Ok(b) => b,
            Err(_) => {
                return refuse(
                    Verdict::Oversized,
                    format!("body exceeds the limit of {max} bytes (or was cut off)"),
                )
            }
        };
        let h = &parts.headers;
        let (sig_header, ts_header) = match source {
            Source::GitHub => ("x-hub-signature-256", None),
            Source::GitGuardian => ("gitguardian-signature", Some("timestamp")),
            Source::Generic => ("x-keywave-signature", Some("x-keywave-timestamp")),
        };
        let Some(sig) = header_str(h, sig_header) else {
            return refuse(Verdict::Unsigned, format!("missing {sig_header} header"));
        };
        let key = secret.expose().as_bytes();
        let expected = match ts_header {
            None => hmac_sha256(key, &[&body]),
            Some(ts_name) => {
                let Some(ts) = header_str(h, ts_name) else {
                    return refuse(Verdict::Unsigned, format!("missing {ts_name} header"));
                };
                let Ok(ts_secs) = ts.trim().parse::<u64>() else {
                    return refuse(
                        Verdict::Malformed,
                        format!("{ts_name} header is not a Unix time in seconds"),
                    );
                };
                let expected = match source {
                    // GitGuardian keys the HMAC with the timestamp followed by the token.
                    Source::GitGuardian => {
                        let mut k = ts.trim().as_bytes().to_vec();
                        k.extend_from_slice(key);
                        let mac = hmac_sha256(&k, &[&body]);
                        zeroize_vec(&mut k);
                        mac
                    }
                    _ => hmac_sha256(key, &[ts.trim().as_bytes(), b".", &body]),
                };
                if !signature_matches(sig, &expected) {
                    return refuse(
                        Verdict::BadSignature,
                        format!("{sig_header} does not match the body"),
                    );
                }
                let now = keywave_common::now_ms() / 1000;
                if now.abs_diff(ts_secs) > self.cfg.max_skew.as_secs() {
                    return refuse(
                        Verdict::Stale,
                        format!(
                            "{ts_name} is {}s away from this server's clock (at most {}s allowed)",
                            now.abs_diff(ts_secs),
                            self.cfg.max_skew.as_secs()
                        ),
                    );
                }
                expected
            }
        };
        if !signature_matches(sig, &expected) {
            return refuse(
                Verdict::BadSignature,
                format!("{sig_header} does not match the body"),
            );
        }
        let translated = match source {
            Source::GitHub => {
                adapters::github(header_str(h, "x-github-event").unwrap_or(""), &body)
            }
            Source::GitGuardian => adapters::gitguardian(&body),
            Source::Generic => adapters::generic(&body),
        };
        let d = match translated {
            Err(e) => {
                let reason = match &e {
                    AdapterError::NotJson(_) => format!("malformed JSON: {e}"),
                    _ => e.to_string(),
                };
                return refuse(Verdict::Malformed, reason);
            }
            Ok(Translated::Ignored(reason)) => {
                return Reply {
                    verdict: Verdict::Ignored,
                    body: serde_json::json!({ "ok": true, "outcome": "ignored", "reason": reason }),
                }
            }
            Ok(Translated::Detection(d)) => d,
        };
        match keywave_common::detect::publish(&self.js, &d).await {
            Ok(duplicate) => {
                let verdict = if duplicate {
                    Verdict::Duplicate
                } else {
                    Verdict::Accepted
                };
                Reply {
                    verdict,
                    body: serde_json::json!({
                        "ok": true,
                        "outcome": verdict.as_str(),
                        "detection": d.msg_id(),
                        "identified": !d.credential.is_empty(),
                    }),
                }
            }
            Err(e) => refuse(
                Verdict::PublishFailed,
                format!("could not record the detection, retry later: {e}"),
            ),
        }
    }
}

fn zeroize_vec(v: &mut [u8]) {
    for b in v.iter_mut() {
        *b = 0;
    }
}

/// Signature header values for tests and for senders written in Rust.
pub mod sign {
    use super::hmac_sha256;

    /// `X-Hub-Signature-256` of `body`.
    pub fn github(secret: &str, body: &[u8]) -> String {
        format!(
            "sha256={}",
            hex::encode(hmac_sha256(secret.as_bytes(), &[body]))
        )
    }

    /// `Gitguardian-Signature` of `body` sent with `Timestamp: timestamp`.
    pub fn gitguardian(secret: &str, timestamp: &str, body: &[u8]) -> String {
        let key = format!("{timestamp}{secret}");
        format!(
            "sha256={}",
            hex::encode(hmac_sha256(key.as_bytes(), &[body]))
        )
    }

    /// `X-Keywave-Signature` of `body` sent with `X-Keywave-Timestamp: timestamp`.
    pub fn generic(secret: &str, timestamp: &str, body: &[u8]) -> String {
        format!(
            "sha256={}",
            hex::encode(hmac_sha256(
                secret.as_bytes(),
                &[timestamp.as_bytes(), b".", body]
            ))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_compare_exactly() {
        let sig = sign::github("s3cret", b"{}");
        let expected = hmac_sha256(b"s3cret", &[b"{}"]);
        assert!(signature_matches(&sig, &expected));
        assert!(!signature_matches(
            &sig.replace("sha256=", "sha1="),
            &expected
        ));
        assert!(!signature_matches("sha256=zz", &expected));
        assert!(!signature_matches(&sign::github("other", b"{}"), &expected));
        // GitHub documents this test vector for X-Hub-Signature-256.
        assert_eq!(
            sign::github("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn secrets_come_from_env_or_files_and_are_not_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gg");
        std::fs::write(&file, "token-from-file\n").unwrap();
        let env: std::collections::HashMap<String, String> = [
            (GITHUB_SECRET_ENV.to_string(), "gh-secret".to_string()),
            (
                format!("{GITGUARDIAN_SECRET_ENV}_FILE"),
                file.display().to_string(),
            ),
        ]
        .into_iter()
        .collect();
        let cfg = WebhookConfig::new("127.0.0.1:0".parse().unwrap())
            .secrets_from_env(|k| env.get(k).cloned())
            .unwrap();
        assert_eq!(cfg.github_secret.as_ref().unwrap().expose(), "gh-secret");
        assert_eq!(
            cfg.gitguardian_secret.as_ref().unwrap().expose(),
            "token-from-file"
        );
        assert!(cfg.generic_secret.is_none());
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("gh-secret") && !printed.contains("token-from-file"));
    }
}
