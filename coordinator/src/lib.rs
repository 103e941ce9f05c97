//! The keywave coordinator daemon: it keeps the credential inventory, plans a
//! campaign into waves, publishes rotation tasks per region, aggregates the
//! workers' results and decides after each wave whether to go on, complete,
//! pause or roll back. NATS JetStream holds every bit of state, so a
//! restarted coordinator resumes each campaign where it stood.
//!
//! # Layout
//! - [`inventory`]: import (JSON, JSON Lines, CSV) and listing of the `keywave-inventory` KV bucket;
//!   `inventory::deps`: who consumes each credential (the consumer index).
//! - [`engine`]: the [`Coordinator`] and its operator API server (`engine::api`, `keywave.api.v1.<verb>`): campaign start, per-campaign owner, result
//!   aggregation, wave decisions, rollback, snapshots and restart recovery.
//! - [`metrics`]: `/metrics` (Prometheus), `/healthz` and `/readyz` of the coordinator daemon.
//! - [`regions`]: which regions have live workers (worker heartbeats on `keywave.worker.<region>`, each region's queue): a silent region pauses the campaigns that need it.
//! - [`lease`]: the coordinator lease (KV compare-and-set with expiry): one active coordinator, fenced.
//! - [`audit`]: the audit writer (hash chains on `KEYWAVE_AUDIT`) and `keywave audit verify`.
//! - [`config`]: the daemon's flags and environment, validated into [`CoordinatorOptions`].
//! - [`detect`]: leak detections in (NATS, webhooks, polled sources), containment campaigns out.
//! - `kvscan` (private): reading the latest value of every key of a KV bucket in one pass.
//!
//! The operator CLI (`keywave`) lives in the `keywave-cli` crate and the
//! in-process fleet in `keywave-devkit`: this crate links neither the worker
//! nor a database driver.

pub mod audit;
pub mod config;
pub mod detect;
pub mod engine;
pub mod inventory;
mod kvscan;
pub mod lease;
pub mod metrics;
pub mod regions;

pub use engine::api;
pub use engine::{Coordinator, CoordinatorError, CoordinatorOptions};
