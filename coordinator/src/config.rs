//! The `keywave-coordinator` daemon's flags and environment, validated into
//! [`CoordinatorOptions`]: raw clap flags here, typed options out, and a
//! [`UsageError`] naming the bad flag otherwise. The operator CLI reuses the
//! shared pieces (NATS identity flags, [`UsageError`], the environment names).

use crate::engine::CoordinatorOptions;
use clap::{Args, Parser, Subcommand};
use keywave_common::{ids, topology};
use std::path::PathBuf;
use std::time::Duration;

/// Environment variable holding the NATS URL.
pub const NATS_URL_ENV: &str = "KEYWAVE_NATS_URL";
/// Environment variable listing the regions whose topology the coordinator creates.
pub const REGIONS_ENV: &str = "KEYWAVE_REGIONS";
/// Environment variable holding the coordinator's id.
pub const COORDINATOR_ID_ENV: &str = "KEYWAVE_COORDINATOR_ID";
/// NATS URL used when neither `--nats` nor [`NATS_URL_ENV`] is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

pub use keywave_common::flags::{usage, UsageError};

/// Who this process is on NATS, and TLS to the server (see
/// `deploy/nats-secure.conf` for the users of a least-privilege server).
/// Passwords and seeds are only read from files or the environment
/// (`KEYWAVE_NATS_PASSWORD`), never taken on the command line.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "NATS identity and TLS")]
pub struct NatsAuthArgs {
    /// NATS credentials file (user JWT and nkey seed, as written by `nsc`).
    #[arg(long, global = true, env = keywave_common::nats::ENV_CREDS, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// File holding a NATS user nkey seed (SU...).
    #[arg(long, global = true, env = keywave_common::nats::ENV_NKEY, value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// NATS user name; the password comes from --nats-password-file or KEYWAVE_NATS_PASSWORD.
    #[arg(long, global = true, env = keywave_common::nats::ENV_USER, value_name = "USER")]
    pub nats_user: Option<String>,
    /// File holding the NATS password of --nats-user.
    #[arg(long, global = true, env = keywave_common::nats::ENV_PASSWORD_FILE, value_name = "FILE")]
    pub nats_password_file: Option<PathBuf>,
    /// Prefix of this process's reply subjects (deploy/nats-secure.conf: _INBOX_<user>, e.g. _INBOX_operator).
    #[arg(long, global = true, env = keywave_common::nats::ENV_INBOX_PREFIX, value_name = "PREFIX")]
    pub nats_inbox_prefix: Option<String>,
    /// CA certificate (PEM) that signed the NATS server's certificate; implies TLS.
    #[arg(long, global = true, env = keywave_common::nats::ENV_CA, value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a server that verifies clients (with --nats-key).
    #[arg(long, global = true, env = keywave_common::nats::ENV_CERT, value_name = "FILE")]
    pub nats_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-cert.
    #[arg(long, global = true, env = keywave_common::nats::ENV_KEY, value_name = "FILE")]
    pub nats_key: Option<PathBuf>,
    /// Refuse to connect to NATS without TLS.
    #[arg(long, global = true, env = keywave_common::nats::ENV_TLS_REQUIRED)]
    pub nats_tls_required: bool,
}

impl NatsAuthArgs {
    /// The validated connection identity (no secret is read yet).
    pub fn to_config(&self) -> Result<keywave_common::nats::ConnectConfig, UsageError> {
        let cfg = keywave_common::nats::ConnectConfig {
            creds_file: self.nats_creds.clone(),
            nkey_seed_file: self.nats_nkey.clone(),
            user: self.nats_user.clone(),
            password_file: self.nats_password_file.clone(),
            password_env: None,
            inbox_prefix: self.nats_inbox_prefix.clone(),
            ca_file: self.nats_ca.clone(),
            client_cert_file: self.nats_cert.clone(),
            client_key_file: self.nats_key.clone(),
            tls_required: self.nats_tls_required,
        };
        cfg.validate().map_err(|e| {
            let flag = match e.field.as_str() {
                "nats.creds_file" => "--nats-creds",
                "nats.nkey_seed_file" => "--nats-nkey",
                "nats.password_file" => "--nats-password-file",
                "nats.inbox_prefix" => "--nats-inbox-prefix",
                "nats.ca_file" => "--nats-ca",
                "nats.client_cert_file" => "--nats-cert",
                "nats.client_key_file" => "--nats-key",
                _ => "--nats-user",
            };
            usage(flag, e.message)
        })?;
        Ok(cfg)
    }
}

/// `keywave-coordinator`: the coordinator daemon.
#[derive(Debug, Parser)]
#[command(
    name = "keywave-coordinator",
    version,
    about = "The keywave coordinator: plans campaigns into waves, publishes rotation tasks, aggregates results, decides.",
    long_about = "Runs a keywave coordinator. It creates the JetStream streams and buckets if needed, \
resumes every unfinished campaign found in the keywave-campaigns bucket and serves the operator API \
(keywave.api.v1.*, queue group keywave-coordinator). Run two or more for high availability: one holds \
the lease and is active, the others stand by. Every coordinator answers the read verbs (campaign status, \
list, ping) from the campaign snapshots; control verbs (start, pause, resume, abort, approve, rollback) \
are handled by the active one (a standby forwards them, and answers `takeover` while none is active). \
A standby takes over within --lease-ttl (4s) plus --lease-poll (500ms) after the active coordinator \
died; SIGTERM hands the lease over at once. SIGTERM or SIGINT stops it cleanly; \
campaigns resume in the next coordinator. Logs go to stderr; set RUST_LOG (e.g. info, keywave_coordinator=debug).",
    after_help = "Examples:\n  keywave-coordinator --nats nats://127.0.0.1:4222\n  KEYWAVE_NATS_URL=nats://nats:4222 RUST_LOG=info keywave-coordinator --id coord-1 --replicas 3"
)]
pub struct DaemonArgs {
    /// NATS server URL, or several comma-separated (cluster seeds): nats://a:4222,nats://b:4222.
    #[arg(long, env = NATS_URL_ENV, default_value = DEFAULT_NATS_URL, value_name = "URL")]
    pub nats: String,
    /// This coordinator's name in logs and control records (random by default).
    #[arg(long, env = COORDINATOR_ID_ENV)]
    pub id: Option<String>,
    /// Replicas of the streams and buckets this coordinator creates (3 on a cluster).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// How often campaign progress snapshots are saved.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub progress_interval: String,
    #[command(flatten)]
    pub detect: crate::detect::args::DaemonDetectArgs,
    /// Regions whose task consumer (`workers-<region>`) and secret store
    /// (`keywave-secrets-<region>`) this coordinator creates at start-up, so
    /// that least-privilege workers only have to look them up (comma-separated).
    /// An existing task consumer is given the default redelivery schedule
    /// (5 s ack wait, backoff 5,5,10,20,30 s, 10 deliveries) in place.
    #[arg(long, env = REGIONS_ENV, value_name = "REGIONS", default_value = "")]
    pub regions: String,
    /// Supercluster: where each region's secret store is created, as
    /// <region>=<placement> pairs, comma-separated; a placement is server
    /// tags and/or cluster=<name>, joined by `+` (e.g.
    /// eu=region:eu,us=region:us or eu=cluster=eu+region:eu). Every placed
    /// region must be in --regions. See docs/multi-region.md [default: the
    /// server places them].
    #[arg(long, env = PLACEMENT_ENV, value_name = "REGION=PLACEMENT,...", default_value = "")]
    pub placement: String,
    /// Supercluster: where every other stream and bucket (campaign state,
    /// inventory, tasks, results, events, audit, leases) is created, e.g.
    /// cluster=home [default: the server places them].
    #[arg(long, env = HOME_PLACEMENT_ENV, value_name = "PLACEMENT")]
    pub home_placement: Option<String>,
    /// Replicas of each region's secret store (a region placed on fewer
    /// servers than the home cluster needs fewer) [default: --replicas].
    #[arg(long, env = REGION_REPLICAS_ENV, value_name = "N")]
    pub region_replicas: Option<usize>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
    /// Ed25519 key that signs every task (create one with `keywave-coordinator keygen`); workers check it against their coordinator_public_keys. Required unless --insecure-unsigned-tasks.
    #[arg(long, env = SIGNING_KEY_FILE_ENV, value_name = "FILE")]
    pub signing_key_file: Option<PathBuf>,
    /// INSECURE, development only: publish tasks without a signature when no --signing-key-file is given. Anyone who can publish on keywave.task.> can then make workers that accept unsigned tasks rotate credentials.
    #[arg(long, env = INSECURE_UNSIGNED_TASKS_ENV, conflicts_with = "signing_key_file")]
    pub insecure_unsigned_tasks: bool,
    /// A signed task expires this long after its deadline (replays after that are refused).
    #[arg(long, env = TASK_EXPIRY_MARGIN_ENV, default_value = "5m", value_name = "DURATION")]
    pub task_expiry_margin: String,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this address, e.g. 0.0.0.0:9464 [default: off].
    #[arg(long, env = crate::metrics::ENV_METRICS_ADDR, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Log line format on stderr: text or json (RUST_LOG filters the lines).
    #[arg(long, env = keywave_common::telemetry::ENV_LOG_FORMAT, default_value = "text", value_name = "text|json")]
    pub log_format: keywave_common::telemetry::LogFormat,
    /// Pre-flight: how long a consumer agent has to answer its ping before a wave (up to 60s).
    #[arg(long, env = PREFLIGHT_TIMEOUT_ENV, default_value = "2s", value_name = "DURATION")]
    pub preflight_timeout: String,
    /// Coordinator lease ttl: a standby takes over at most this long (plus --lease-poll) after the active coordinator died; a coordinator restarted with the same --id takes its lease back at once.
    #[arg(long, env = LEASE_TTL_ENV, default_value = "4s", value_name = "DURATION")]
    pub lease_ttl: String,
    /// How often the active coordinator renews its lease (at most half the ttl) [default: a quarter of --lease-ttl, 1s].
    #[arg(long, env = LEASE_RENEW_ENV, value_name = "DURATION")]
    pub lease_renew: Option<String>,
    /// How often a standby looks at the lease [default: an eighth of --lease-ttl, 500ms].
    #[arg(long, env = LEASE_POLL_ENV, value_name = "DURATION")]
    pub lease_poll: Option<String>,
    /// Pause a campaign, naming the region, when a region its wave needs has had no live worker (no heartbeat on keywave.worker.<region>) for this long (1s to 1h).
    #[arg(long, env = REGION_PAUSE_AFTER_ENV, default_value = "10s", value_name = "DURATION")]
    pub region_pause_after: String,
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
}

/// Environment variable with the regions' secret store placements (`--placement`).
pub const PLACEMENT_ENV: &str = "KEYWAVE_PLACEMENT";
/// Environment variable with the home state's placement (`--home-placement`).
pub const HOME_PLACEMENT_ENV: &str = "KEYWAVE_HOME_PLACEMENT";
/// Environment variable with the regions' secret store replicas (`--region-replicas`).
pub const REGION_REPLICAS_ENV: &str = "KEYWAVE_REGION_REPLICAS";

/// Environment variable with the coordinator lease ttl.
pub const LEASE_TTL_ENV: &str = "KEYWAVE_LEASE_TTL";
/// Environment variable with the lease renewal period.
pub const LEASE_RENEW_ENV: &str = "KEYWAVE_LEASE_RENEW";
/// Environment variable with the standbys' lease poll period.
pub const LEASE_POLL_ENV: &str = "KEYWAVE_LEASE_POLL";
/// Environment variable with how long a region may have no live worker
/// before the campaigns that need it pause.
pub const REGION_PAUSE_AFTER_ENV: &str = "KEYWAVE_REGION_PAUSE_AFTER";

/// Environment variable with the pre-flight ping timeout.
pub const PREFLIGHT_TIMEOUT_ENV: &str = "KEYWAVE_PREFLIGHT_TIMEOUT";

/// Environment variable naming the coordinator's task-signing key file.
pub const SIGNING_KEY_FILE_ENV: &str = "KEYWAVE_SIGNING_KEY_FILE";
/// Environment variable of the explicit opt-out from signed tasks
/// (`--insecure-unsigned-tasks`).
pub const INSECURE_UNSIGNED_TASKS_ENV: &str = "KEYWAVE_INSECURE_UNSIGNED_TASKS";
/// Environment variable with the margin from a task's deadline to its expiry.
pub const TASK_EXPIRY_MARGIN_ENV: &str = "KEYWAVE_TASK_EXPIRY_MARGIN";

/// Subcommands of `keywave-coordinator` (without one it runs the daemon).
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Write a new Ed25519 task-signing key to FILE (mode 0600) and print its public key.
    #[command(
        after_help = "Example:\n  keywave-coordinator keygen --out /etc/keywave/coordinator.key\n  # put the printed public key in every worker's coordinator_public_keys,\n  # then start the coordinator with --signing-key-file /etc/keywave/coordinator.key"
    )]
    Keygen {
        /// Where to write the private key (refuses to overwrite).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

impl DaemonArgs {
    /// The validated `--regions` list (possibly empty).
    pub fn region_list(&self) -> Result<Vec<String>, UsageError> {
        let regions: Vec<String> = self
            .regions
            .split(',')
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty())
            .collect();
        for r in &regions {
            ids::validate("region", r).map_err(|e| usage("--regions", e.to_string()))?;
        }
        Ok(regions)
    }

    /// Validates `--placement`, `--home-placement` and `--region-replicas`
    /// into `topology`.
    fn placements(&self, topology: &mut topology::Config) -> Result<(), UsageError> {
        topology.region_placement = topology::parse_region_placements(&self.placement)
            .map_err(|e| usage("--placement", e.to_string()))?;
        let regions = self.region_list()?;
        if let Some(r) = topology
            .region_placement
            .keys()
            .find(|r| !regions.contains(r))
        {
            return Err(usage(
                "--placement",
                format!(
                    "places region {r}, which is not in --regions: the coordinator creates the secret stores of the regions in --regions only"
                ),
            ));
        }
        if let Some(spec) = &self.home_placement {
            topology.home_placement = Some(
                topology::Placement::parse(spec)
                    .map_err(|e| usage("--home-placement", e.to_string()))?,
            );
        }
        if let Some(n) = self.region_replicas {
            if n == 0 || n > 5 {
                return Err(usage("--region-replicas", "must be between 1 and 5"));
            }
            topology.region_replicas = Some(n);
        }
        Ok(())
    }

    pub fn to_options(&self) -> Result<CoordinatorOptions, UsageError> {
        let mut opts = CoordinatorOptions::default();
        if let Some(id) = &self.id {
            ids::validate("coordinator id", id).map_err(|e| usage("--id", e.to_string()))?;
            opts.coordinator_id = id.clone();
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(usage("--replicas", "must be between 1 and 5"));
        }
        opts.topology = topology::Config {
            replicas: self.replicas,
            ..Default::default()
        };
        self.placements(&mut opts.topology)?;
        opts.progress_interval =
            keywave_common::flags::duration("--progress-interval", &self.progress_interval)?;
        if opts.progress_interval.is_zero() {
            return Err(usage("--progress-interval", "must be positive"));
        }
        opts.preflight_timeout =
            keywave_common::flags::duration("--preflight-timeout", &self.preflight_timeout)?;
        if opts.preflight_timeout.is_zero() || opts.preflight_timeout > Duration::from_secs(60) {
            return Err(usage("--preflight-timeout", "must be between 1ms and 60s"));
        }
        let ttl = keywave_common::flags::duration("--lease-ttl", &self.lease_ttl)?;
        opts.lease = crate::lease::Config::with_ttl(ttl);
        if let Some(v) = &self.lease_renew {
            opts.lease.renew_every = keywave_common::flags::duration("--lease-renew", v)?;
        }
        if let Some(v) = &self.lease_poll {
            opts.lease.poll_every = keywave_common::flags::duration("--lease-poll", v)?;
        }
        opts.lease.validate().map_err(|e| {
            let flag = match e {
                crate::lease::ConfigError::Ttl => "--lease-ttl",
                crate::lease::ConfigError::RenewPeriod => "--lease-renew",
                crate::lease::ConfigError::PollPeriod => "--lease-poll",
            };
            usage(flag, e.to_string())
        })?;
        opts.region_liveness.pause_after =
            keywave_common::flags::duration("--region-pause-after", &self.region_pause_after)?;
        if opts.region_liveness.pause_after < Duration::from_secs(1)
            || opts.region_liveness.pause_after > Duration::from_secs(3600)
        {
            return Err(usage("--region-pause-after", "must be between 1s and 1h"));
        }
        let margin =
            keywave_common::flags::duration("--task-expiry-margin", &self.task_expiry_margin)?;
        match &self.signing_key_file {
            Some(path) => {
                let key = keywave_common::sign::SigningKey::from_file(path)
                    .map_err(|e| usage("--signing-key-file", e.to_string()))?;
                opts.signer = Some(keywave_common::sign::TaskSigner::new(key, margin));
            }
            // Signed tasks are the default: running without a key is a
            // choice made by name.
            None if !self.insecure_unsigned_tasks => {
                return Err(usage(
                    "--signing-key-file",
                    format!(
                        "is required: tasks are signed by default. Create a key with `keywave-coordinator keygen --out FILE`, \
                         give its public key to the workers (coordinator_public_keys) and start with --signing-key-file FILE \
                         (or {SIGNING_KEY_FILE_ENV}); for development only, --insecure-unsigned-tasks publishes unsigned tasks"
                    ),
                ))
            }
            None => {}
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<CoordinatorOptions, UsageError> {
        let mut argv = vec!["keywave-coordinator", "--insecure-unsigned-tasks"];
        argv.extend_from_slice(extra);
        DaemonArgs::try_parse_from(argv).unwrap().to_options()
    }

    #[test]
    fn placement_flags_fill_the_topology() {
        let o = parse(&[
            "--regions",
            "eu,us",
            "--placement",
            "eu=region:eu,us=region:us",
            "--home-placement",
            "cluster=home",
            "--replicas",
            "3",
            "--region-replicas",
            "1",
        ])
        .unwrap();
        assert_eq!(o.topology.region_placement.len(), 2);
        assert_eq!(o.topology.region_placement["us"].to_string(), "region:us");
        assert_eq!(
            o.topology.home_placement.unwrap().to_string(),
            "cluster=home"
        );
        assert_eq!(o.topology.region_replicas, Some(1));
        let none = parse(&[]).unwrap();
        assert!(
            none.topology.region_placement.is_empty() && none.topology.home_placement.is_none()
        );
    }

    #[test]
    fn placement_flags_are_validated() {
        for (argv, flag) in [
            (
                vec!["--regions", "eu", "--placement", "us=region:us"],
                "--placement",
            ),
            (vec!["--regions", "eu", "--placement", "eu"], "--placement"),
            (vec!["--home-placement", "cluster="], "--home-placement"),
            (vec!["--region-replicas", "0"], "--region-replicas"),
        ] {
            let e = parse(&argv).unwrap_err();
            assert_eq!(e.flag, flag, "{argv:?}: {}", e.message);
        }
    }
}
