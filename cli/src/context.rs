//! What every `keywave` command shares: the typed [`CommandError`] with its
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
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect { url: String, detail: String },
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
    #[error("{0}")]
    Dev(String),
    #[error("{0}")]
    Bench(String),
    #[error("{0}")]
    Detect(String),
    /// A worker admin request (reconcile, discover) failed.
    #[error("{0}")]
    Admin(String),
    /// The audit stream could not be read.
    #[error("{0}")]
    Audit(String),
    /// `campaign report` could not read its sources or write its output.
    #[error("{0}")]
    Report(String),
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

/// Connects to NATS with the CLI's client name.
pub async fn connect(url: &str) -> Result<async_nats::Client, CommandError> {
    keywave_common::nats::connect(url, "keywave-cli")
        .await
        .map_err(|e| CommandError::Connect {
            url: url.to_string(),
            detail: e.to_string(),
        })
}

pub fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"))
    );
}
