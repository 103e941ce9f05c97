//! The keywave regional worker: pulls its region's rotation tasks from
//! JetStream, runs the resumable rotation protocol against the real credential
//! systems, keeps the region's encrypted secret store, and publishes results
//! that carry fingerprints only.
//!
//! # Layout
//! - [`config`]: the worker's TOML configuration (region, key source, endpoints), validated at start-up.
//! - [`store`]: the regional secret store (KV `keywave-secrets-<region>`), sealed with the region key, updated by CAS.
//! - [`targets`]: the [`targets::Target`] trait, the per-endpoint registry with concurrency bounds, and the sim and Redis targets.
//! - [`protocol`]: the rotation / rollback state machine (stage, set, test, promote, revoke, verify), resumable and idempotent.
//! - [`runner`]: the JetStream consume loop: bounded concurrency, one ack decision per message, dead letters, graceful drain.
//! - [`fault`]: fault-injection points for crash tests (off by default).

pub mod config;
pub mod fault;
pub mod protocol;
pub mod runner;
pub mod store;
pub mod targets;

pub use runner::{Worker, WorkerError, WorkerOptions, WorkerStats};

#[cfg(test)]
pub(crate) mod testutil;
