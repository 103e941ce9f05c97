//! The keywave regional worker: pulls its region's rotation tasks from
//! JetStream, runs the resumable rotation protocol against the real credential
//! systems, keeps the region's encrypted secret store, and publishes results
//! that carry fingerprints only.
//!
//! # Layout
//! - [`cli`]: the `keywave-worker` command line (clap definitions).
//! - [`config_keys`]: every configuration key with its default and environment variable (docs/configuration.md).
//! - [`config`]: the worker's TOML configuration (region, NATS servers, region and detection keys, endpoints), validated at start-up.
//! - [`store`]: the regional secret store behind [`store::RecordStore`]: [`store::SecretStore`] (KV `keywave-secrets-<region>`, sealed with the region key), updated by CAS.
//!   - [`store::memory`]: the same CAS semantics in memory, for protocol tests and demos without a nats-server.
//! - [`targets`]: the [`targets::Target`] trait and the per-endpoint registry with concurrency bounds.
//!   - [`targets::sim`]: in-memory simulation, for demos, benchmarks and protocol tests.
//!   - [`targets::redis`]: Redis ACL users (native dual passwords).
//!   - [`targets::postgres`]: PostgreSQL login roles (SCRAM verifiers computed on the worker).
//!   - [`targets::mysql`]: MariaDB / MySQL user accounts (native hashes, MySQL dual passwords).
//!   - [`targets::db`]: what the SQL targets share: continuity schemes (alternating users), admin settings, redacted errors.
//! - [`protocol`]: the executor of the rotation / rollback protocols (stage, set, test, promote, revoke, verify), resumable and idempotent.
//!   - [`protocol::machine`]: the protocols as a pure next-step function over the record and what this delivery has seen.
//! - [`notice`]: rotation notices (`keywave.rotated.<region>.<credential>`): keyed detection fingerprints of each new CURRENT secret, only with a detection key.
//! - [`enroll`]: bulk enrolment (`keywave-worker enroll --file`): JSON Lines records of today's secrets, checked at their endpoints and stored create-if-absent, with bounded concurrency.
//! - [`consumers`]: consumer verification after promote (attestations on `KEYWAVE_ATTEST`, HTTP probes), before revoke.
//! - [`agent`]: the consumer agent (`keywave-worker agent`): writes each new CURRENT secret for an application, reloads it, attests the fingerprint.
//! - [`agent_ping`]: the agent's answer to the coordinator's pre-flight ping (`keywave.agent.v1.<region>.<consumer>.ping`): alive, version, credentials watched, health.
//! - [`presence`]: the worker's presence heartbeat on `keywave.worker.<region>` (how the coordinator knows the region has a live worker).
//! - [`runner`]: the JetStream consume loop: bounded concurrency, one ack decision per message, dead letters, graceful drain.
//! - [`fault`]: fault-injection points for crash tests (off by default).
//! - [`metrics`]: `/metrics` (Prometheus), `/healthz` and `/readyz` on `metrics_addr`.
//! - [`admin`]: the admin service (`keywave.admin.v1.<region>.<verb>`): reconcile the store against the targets, discover an endpoint's logins.
//! - `testutil` (tests only): a private `nats-server` per test, unique regions, a secret-store bucket.

pub mod admin;
pub mod agent;
pub mod agent_ping;
pub mod cli;
pub mod config;
pub mod config_keys;
pub mod consumers;
pub mod enroll;
pub mod fault;
mod keyed_lock;
pub mod metrics;
pub mod notice;
pub mod presence;
pub mod protocol;
pub mod runner;
pub mod store;
pub mod targets;

pub use runner::{Worker, WorkerError, WorkerOptions, WorkerStats};

#[cfg(test)]
pub(crate) mod testutil;
