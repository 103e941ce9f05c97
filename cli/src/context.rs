//! What every `keywave` command shares: the typed [`CommandError`] (and the
//! error types of the commands it wraps, kept here so that no command module
//! and this one import each other) with its
//! exit code, the NATS connection under the CLI's client name, and the one
//! way a command prints `--json` output.

use keywave_common::client::ClientError;
use keywave_common::flags::UsageError;
use keywave_common::topology::TopologyError;
use keywave_coordinator::inventory::{ImportError, InventoryError};
use serde::Serialize;
use thiserror::Error;

/// Exit code of `campaign start --wait` when the campaign did not complete.
pub const EXIT_NOT_COMPLETED: u8 = 3;
/// Exit code of `audit verify` when a chain is broken.
pub const EXIT_AUDIT_BROKEN: u8 = 4;

#[derive(Debug, Error)]
pub enum CommandError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the selector matches no credential in the inventory")]
    EmptySelection,
    /// `keywave dev` failed; the message is the whole chain of causes.
    #[error("{0:#}")]
    Dev(#[source] anyhow::Error),
    /// `keywave bench` failed; the message is the whole chain of causes.
    #[error("{0:#}")]
    Bench(#[source] anyhow::Error),
    #[error(transparent)]
    Detect(#[from] DetectCommandError),
    /// A worker admin request (reconcile, discover) failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// `inventory discover --import` could not write a proposed record.
    #[error(transparent)]
    Discover(#[from] DiscoverImportError),
    /// The audit stream could not be read.
    #[error(transparent)]
    Audit(#[from] keywave_coordinator::audit::AuditError),
    /// `campaign report` could not read its sources or write its output.
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Why a `keywave detect` command failed once its flags were valid.
#[derive(Debug, Error)]
pub enum DetectCommandError {
    /// The detection streams or bucket could not be created or opened.
    #[error(transparent)]
    Topology(#[from] keywave_common::topology::TopologyError),
    #[error(transparent)]
    Publish(#[from] keywave_common::detect::PublishDetectionError),
    #[error(transparent)]
    Report(#[from] crate::containment::ContainmentError),
    #[error(transparent)]
    Records(#[from] keywave_common::topology::StreamReadError),
}

/// Why a worker admin request (reconcile, discover) failed; its text is a
/// sentence for the report.
#[derive(Debug, Error)]
pub enum AdminError {
    #[error("cannot encode the request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("no worker answers on {subject} (is a keywave-worker of that region running?)")]
    NoResponders {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("no reply on {subject} within {timeout:?}")]
    TimedOut {
        subject: String,
        timeout: std::time::Duration,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("request on {subject} failed: {source}")]
    Request {
        subject: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("malformed reply on {subject}: {source}")]
    Malformed {
        subject: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("malformed reply on {subject}: no data")]
    NoData { subject: String },
    /// The worker answered with an error.
    #[error("{}: {}", .0.class, .0.message)]
    Refused(keywave_common::api::ApiError),
}

/// Why `inventory discover --import` could not write a proposed record.
#[derive(Debug, Error)]
pub enum DiscoverImportError {
    #[error("encoding inventory record {id}: {source}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing inventory record {id}: {source}")]
    Write {
        id: String,
        #[source]
        source: async_nats::jetstream::kv::CreateError,
    },
}

/// Why `campaign report` could not read its sources or write its output.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error("reading the events of {campaign}: {source}")]
    Events {
        campaign: String,
        #[source]
        source: keywave_common::topology::StreamReadError,
    },
    #[error("reading the results of {campaign}: {source}")]
    Results {
        campaign: String,
        #[source]
        source: keywave_common::topology::StreamReadError,
    },
    #[error("encoding the report: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("writing the report: {0}")]
    Write(#[source] std::io::Error),
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Rename {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CommandError {
    /// 2 for usage errors (like clap), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// The API client of the commands: a control request that waits for a
/// coordinator take-over says so on stderr.
pub fn api(client: async_nats::Client) -> keywave_common::client::ApiClient {
    keywave_common::client::ApiClient::new(client).on_wait(|line| eprintln!("keywave: {line}"))
}

/// Connects to NATS with the CLI's client name.
pub async fn connect(url: &str) -> Result<async_nats::Client, CommandError> {
    keywave_common::nats::connect(url, "keywave-cli")
        .await
        .map_err(|source| CommandError::Connect {
            url: url.to_string(),
            source,
        })
}

pub fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn wrapped_errors_keep_their_message_and_their_cause() {
        let e = CommandError::Dev(anyhow::anyhow!("address in use").context("starting NATS"));
        assert_eq!(e.to_string(), "starting NATS: address in use");
        assert!(e.source().is_some());
        assert_eq!(e.exit_code(), 1);

        let e = CommandError::from(AdminError::NoData {
            subject: "keywave.admin.v1.eu.reconcile".into(),
        });
        assert_eq!(
            e.to_string(),
            "malformed reply on keywave.admin.v1.eu.reconcile: no data"
        );

        let e = CommandError::from(ReportError::Write(std::io::Error::other("disk full")));
        assert_eq!(e.to_string(), "writing the report: disk full");
        assert_eq!(
            e.source().map(|c| c.to_string()).as_deref(),
            Some("disk full")
        );
        assert_eq!(e.exit_code(), 1);
    }
}
