//! The `keywave-worker` command line (clap), in the library so that the
//! configuration reference (docs/configuration.md) is generated from it.

use clap::builder::TypedValueParser;
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
    /// Record the secret a credential uses today as its CURRENT secret (one, or many with --file).
    ///
    /// One credential: --credential, --endpoint and --principal; the secret is
    /// read from KEYWAVE_ENROLL_SECRET or, when that is unset, from the first
    /// line of stdin. It must authenticate at the endpoint; it is never
    /// echoed.
    ///
    /// Many credentials: --file FILE (or --file - for stdin), JSON Lines, one
    /// record per line: {"credential": ID, "endpoint": NAME, "principal":
    /// LOGIN, "secret": VALUE}; "endpoint" may be left out when --endpoint
    /// gives the default. A FILE that group or others may read or write is
    /// refused. Each record is checked as a single enrolment is (id and
    /// principal rules, the endpoint must refuse a random wrong secret, and
    /// unless --no-verify the secret must authenticate) and stored only if
    /// the credential has no record yet: one that has is reported `skipped`
    /// and left as it is, so the same input can be run again after a
    /// failure. One report line per record (line number, credential id,
    /// enrolled / skipped / failed with the reason; never a secret) and a
    /// summary; the exit status is 1 when any record failed. See
    /// docs/inventory.md, "Enrolling today's secrets".
    #[command(after_help = "Examples:\n  \
        keywave-worker -c worker.toml enroll --credential billing-db-app --endpoint pg-eu-main --principal billing_app\n  \
        keywave-worker -c worker.toml enroll --file secrets.jsonl        # mode 0600\n  \
        vault kv get -format=json secret/pg-eu-main \\\n    \
        | jq -c '.data.data | to_entries[] | {credential: (\"pg-eu-main-\" + .key), principal: .key, secret: .value}' \\\n    \
        | keywave-worker -c worker.toml enroll --endpoint pg-eu-main --file - --json\n\n\
        JSON Lines example:\n  \
        {\"credential\":\"billing-db-app\",\"endpoint\":\"pg-eu-main\",\"principal\":\"billing_app\",\"secret\":\"...\"}")]
    Enroll {
        /// Credential id, as in the inventory (one credential).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        credential: Option<String>,
        /// Endpoint name from the configuration; with --file, the endpoint of records without "endpoint".
        #[arg(long, required_unless_present = "file")]
        endpoint: Option<String>,
        /// The login (role, user) the secret belongs to (one credential).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        principal: Option<String>,
        /// Enrol the credentials of a JSON Lines file, `-` for stdin, one record per line (docs/inventory.md); refused if group or others may read or write it.
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// With --file: records checked and stored at once (each endpoint's max_concurrency still bounds its operations) [default: 16].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
        concurrency: Option<usize>,
        /// With --file: log in with each secret before storing it (the default).
        #[arg(long, overrides_with = "no_verify")]
        verify: bool,
        /// With --file: store each secret without logging in with it; the endpoint must still refuse a random wrong secret for the principal.
        #[arg(long, overrides_with = "verify")]
        no_verify: bool,
        /// With --file: one JSON object per record on stdout, then {"summary": {...}}.
        #[arg(long)]
        json: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn enroll(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["keywave-worker", "enroll"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command.unwrap())
    }

    #[test]
    fn enroll_takes_one_credential_or_a_file() {
        assert!(enroll(&["--credential", "c", "--endpoint", "e", "--principal", "p"]).is_ok());
        // Without --file all three are required; with it, neither id nor
        // principal may be given.
        assert!(enroll(&["--credential", "c", "--endpoint", "e"]).is_err());
        assert!(enroll(&["--file", "f", "--credential", "c"]).is_err());
        assert!(enroll(&["--file", "f", "--principal", "p"]).is_err());
        assert!(enroll(&["--file", "-", "--concurrency", "0"]).is_err());
        let Command::Enroll {
            file,
            endpoint,
            concurrency,
            no_verify,
            json,
            ..
        } = enroll(&[
            "--file",
            "-",
            "--endpoint",
            "e",
            "--concurrency",
            "4",
            "--no-verify",
            "--json",
        ])
        .unwrap()
        else {
            panic!("not enroll")
        };
        assert_eq!(file.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(endpoint.as_deref(), Some("e"));
        assert_eq!(concurrency, Some(4));
        assert!(no_verify && json);
        // The last of --verify / --no-verify wins.
        let Command::Enroll {
            verify, no_verify, ..
        } = enroll(&["--file", "f", "--no-verify", "--verify"]).unwrap()
        else {
            panic!("not enroll")
        };
        assert!(verify && !no_verify);
    }
}
