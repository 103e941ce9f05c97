//! The `keywave` operator CLI. It talks to a running system through NATS:
//! the coordinators' operator API (`keywave.api.v1.<verb>`), the streams and
//! buckets it may read, and the regional workers' admin service. It never
//! holds a secret.
//!
//! # Layout
//! - [`args`]: clap definitions of `keywave` and their validation into typed
//!   configuration (campaign specs, dev and bench options).
//! - [`context`]: what every command shares: [`context::CommandError`] and its
//!   exit code, the NATS connection, `--json` output.
//! - [`watch`]: `keywave campaign watch`: live per-wave and per-region progress bars and the latest events.
//! - [`containment`]: time to contain of a detection-started campaign, from the detections bucket and the results.
//! - [`report`]: `keywave campaign report`: a campaign's evidence as JSON, Markdown or HTML.
//! - [`reconcile`]: `keywave reconcile`: the regional stores against the targets, through the workers' admin service.
//! - [`discover`]: `keywave inventory discover`: an endpoint's logins as proposed inventory records.
//! - [`detect`]: `keywave detect`: publish a detection, report time to contain, list unmatched detections.
//! - [`commands`]: what each command does and prints; dispatches to the modules above.

pub mod args;
pub mod commands;
pub mod containment;
pub mod context;
pub mod detect;
pub mod discover;
pub mod reconcile;
pub mod report;
pub mod watch;
