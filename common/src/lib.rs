//! Everything the keywave coordinator, workers and operator CLI must agree on,
//! defined once: wire types, subjects, codecs, the JetStream topology, the
//! bounded publisher and the crypto primitives for secrets.
//!
//! # Layout
//! - [`ids`]: validation of the names that end up in subjects and KV keys.
//! - [`subjects`]: every NATS subject keywave publishes or listens on.
//! - [`wire`]: versioned message types (tasks, results, campaigns, events, inventory).
//! - [`detect`]: leak detections (`keywave.detect.<source>`), their streams and keyed detection fingerprints.
//! - [`api`]: request/response bodies of the operator API under `keywave.api.v1.`.
//! - [`client`]: [`client::ApiClient`], the typed client of that API (CLI, dev kit, tests, detection intake).
//! - [`flags`]: [`flags::UsageError`], the one usage error of every binary, and shared flag parsers.
//! - [`duration`]: durations as operators write them (`30s`, `1m30s`) and as keywave prints them.
//! - [`admin`]: request/response bodies of the workers' admin service under `keywave.admin.v1.<region>.` (reconcile, discover).
//! - [`codec`]: MessagePack / JSON encoding chosen by `Content-Type`, with size and version checks.
//! - [`topology`]: streams, consumers and KV buckets, created idempotently.
//! - [`nats`]: connecting to a comma-separated list of NATS servers with keywave's client settings.
//! - [`presence`]: workers' presence heartbeats (`keywave.worker.<region>`): how the coordinator knows which regions have live workers.
//! - [`publish`]: JetStream publishing with `Nats-Msg-Id` and bounded windows of un-awaited acks.
//! - [`crypto`]: secret generation, fingerprints and the regional AEAD.
//! - [`planner`]: pure wave sizing and the failure-budget rule.
//! - [`sign`]: Ed25519 signatures of tasks (coordinator signs, workers verify).
//! - [`audit`]: the hash-chained audit records of `KEYWAVE_AUDIT` and their verification.
//! - [`exposition`]: the `/metrics`, `/healthz` and `/readyz` endpoint every daemon serves.
//! - [`telemetry`]: logs (`text`/`json`), OpenTelemetry traces over OTLP with W3C trace context in NATS headers, and the Prometheus text format.

pub mod admin;
pub mod api;
pub mod audit;
pub mod client;
pub mod codec;
pub mod crypto;
pub mod detect;
pub mod duration;
pub mod exposition;
pub mod flags;
pub mod ids;
pub mod nats;
pub mod planner;
pub mod presence;
pub mod publish;
pub mod sign;
pub mod subjects;
pub mod telemetry;
pub mod topology;
pub mod wire;

/// Milliseconds since the Unix epoch, the one clock format on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
