//! The `keywave-worker` command line (clap), in the library so that the
//! configuration reference (docs/configuration.md) is generated from it.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Rotates credentials of one region: pulls its tasks from NATS JetStream,
/// sets, tests and revokes secrets at the real targets, and keeps the
/// region's encrypted secret store.
#[derive(Debug, Parser)]
#[command(name = "keywave-worker", version)]
pub struct Cli {
    /// Worker configuration file (TOML; see keywave-worker.example.toml).
    #[arg(long, short = 'c', env = crate::config::ENV_CONFIG, global = true)]
    pub config: Option<PathBuf>,
    /// Region to serve (overrides `region` in the file).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// NATS server URL, or several comma-separated (cluster seeds) [default: `nats_url` in the file, else nats://127.0.0.1:4222].
    #[arg(long, env = crate::config::ENV_NATS_URL, global = true)]
    pub nats: Option<String>,
    /// Log line format on stderr: text or json (RUST_LOG filters the lines).
    #[arg(long, env = keywave_common::telemetry::ENV_LOG_FORMAT, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: keywave_common::telemetry::LogFormat,
    /// Serve /metrics, /healthz and /readyz on this address, e.g. 0.0.0.0:9464 (overrides `metrics_addr` in the file) [default: off].
    #[arg(long, env = crate::metrics::ENV_METRICS_ADDR, global = true, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the region's tasks until SIGTERM or SIGINT (the default).
    Run,
    /// Print a new random region key (hex) to stdout.
    Keygen,
    /// Record the secret a credential uses today as its CURRENT secret.
    ///
    /// The secret is read from KEYWAVE_ENROLL_SECRET or, when that is unset,
    /// from the first line of stdin. It must authenticate at the endpoint; it
    /// is never echoed.
    Enroll {
        /// Credential id, as in the inventory.
        #[arg(long)]
        credential: String,
        /// Endpoint name from the configuration.
        #[arg(long)]
        endpoint: String,
        /// The login (role, user) the secret belongs to.
        #[arg(long)]
        principal: String,
    },
    /// Run a consumer agent next to an application: write each new CURRENT
    /// secret of its credentials to a file (atomically, mode 0600 by
    /// default), run the reload and health commands, and attest the
    /// fingerprint on `keywave.attest.<region>.<credential>`.
    ///
    /// The configuration (--config, TOML) names the consumer, the region, the
    /// region key source and the credentials; see README "Consumers".
    Agent {
        /// Consumer id (overrides `consumer` in the file).
        #[arg(long)]
        consumer: Option<String>,
    },
}
