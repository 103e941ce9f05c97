//! The keywave coordinator: it keeps the credential inventory, plans a
//! campaign into waves, publishes rotation tasks per region, aggregates the
//! workers' results and decides after each wave whether to go on, complete,
//! pause or roll back. NATS JetStream holds every bit of state, so a
//! restarted coordinator resumes each campaign where it stood.
//!
//! # Layout
//! - [`inventory`]: import (JSON, JSON Lines, CSV) and listing of the `keywave-inventory` KV bucket.
//! - [`engine`]: the [`Coordinator`]: campaign start, per-campaign driver, result
//!   aggregation, wave decisions, rollback, snapshots and restart recovery.
//! - [`metrics`]: `/metrics` (Prometheus), `/healthz` and `/readyz` of the coordinator daemon.
//! - [`lease`]: the coordinator lease (KV compare-and-set with expiry): one active coordinator, fenced.
//! - [`audit`]: the audit writer (hash chains on `KEYWAVE_AUDIT`) and `keywave audit verify`.
//! - [`api`]: the NATS request/reply server for `keywave.api.v1.<verb>`.
//! - [`client`]: [`client::ApiClient`], the typed client of that API (CLI, tests, `keywave dev`).
//! - [`cli`]: clap definitions of the `keywave` and `keywave-coordinator` binaries, and
//!   their validation into typed configuration (durations, campaign specs).
//! - [`config_ref`]: docs/configuration.md generated from the clap definitions and the worker's configuration keys.
//! - [`commands`]: what each `keywave` command does and prints (human or `--json`).
//! - [`detect`]: leak detections in (NATS, webhooks, CLI), containment campaigns out, time to contain.
//! - [`dev`]: `keywave dev`, a complete in-process demo (nats-server, sim workers, coordinator).
//! - [`bench`]: `keywave bench`, one measured sim campaign next to the bare broker path's throughput.
//! - [`reconcile`]: `keywave reconcile`: the regional stores against the targets, through the workers' admin service; repairs half-done rotations.
//! - [`discover`]: `keywave inventory discover`: an endpoint's logins as proposed inventory records (`--import` adds them).
//! - [`watch`]: `keywave campaign watch`: live per-wave and per-region progress bars and the latest events.
//! - [`report`]: `keywave campaign report`: a campaign's evidence as JSON, Markdown or HTML (outcomes, decisions, audit head, controls).
//! - `kvscan` (private): reading the latest value of every key of a KV bucket in one pass.

pub mod api;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config_ref;
pub mod deps;
pub mod detect;
pub mod dev;
pub mod discover;
pub mod engine;
pub mod inventory;
mod kvscan;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod report;
pub mod watch;

pub use engine::{Coordinator, CoordinatorError, CoordinatorOptions};
