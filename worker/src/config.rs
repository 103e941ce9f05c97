//! The worker's configuration: a TOML file ([`File`], as written, with
//! unknown fields refused) validated into a [`Config`] at start-up. The doc
//! comments of [`File`], [`JetStreamFile`] and [`EndpointFile`] are the user
//! documentation; `keywave-worker.example.toml` shows every field.
//!
//! Secrets never sit in the file: the region key comes from `region_key_file`
//! or `KEYWAVE_REGION_KEY`, the optional detection key from
//! `detect_key_file`, `KEYWAVE_DETECT_KEY_FILE` or `KEYWAVE_DETECT_KEY`, an
//! endpoint's admin password from the environment variable or file the
//! endpoint names. Environment lookups go through [`Env`]
//! so tests pass a map.

use crate::targets::db::{self, Admin, Continuity, Logins, Tls, TlsMode, TlsRequire};
use crate::targets::mysql::{self, MysqlOptions, MysqlTarget};
use crate::targets::postgres::{self, PostgresOptions, PostgresTarget};
use crate::targets::redis::RedisTarget;
use crate::targets::sim::{SimOptions, SimTarget};
use crate::targets::{Target, TargetError, Targets};
use ::redis::{ConnectionInfo, IntoConnectionInfo};
use keywave_common::crypto::{Charset, RegionKey, Secret, SecretPolicy};
use keywave_common::detect::DetectKey;
use keywave_common::ids;
use keywave_common::sign::PublicKey;
use keywave_common::topology;
use keywave_common::wire::TargetKind;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::warn;

/// Environment variable holding the region key when `region_key_file` is not set.
pub const ENV_REGION_KEY: &str = "KEYWAVE_REGION_KEY";
/// Environment variable naming the detection-key file when `detect_key_file`
/// is not set (the same name the coordinator reads).
pub const ENV_DETECT_KEY_FILE: &str = "KEYWAVE_DETECT_KEY_FILE";
/// Environment variable holding the detection key itself (hex or base64),
/// read when neither `detect_key_file` nor `KEYWAVE_DETECT_KEY_FILE` is set.
pub const ENV_DETECT_KEY: &str = "KEYWAVE_DETECT_KEY";
/// Environment variable listing coordinator public keys (comma-separated hex)
/// when `coordinator_public_keys` is empty.
pub const ENV_COORDINATOR_PUBLIC_KEYS: &str = "KEYWAVE_COORDINATOR_PUBLIC_KEYS";
/// Environment variable of the explicit opt-out from signed tasks (`1`:
/// like `insecure_unsigned_tasks = true`; development only).
pub const ENV_INSECURE_UNSIGNED_TASKS: &str = "KEYWAVE_INSECURE_UNSIGNED_TASKS";
/// Environment variable with the NATS URL (overridden by `--nats`).
pub const ENV_NATS_URL: &str = "KEYWAVE_NATS_URL";
/// Environment variable with today's secret for `keywave-worker enroll`.
pub const ENV_ENROLL_SECRET: &str = "KEYWAVE_ENROLL_SECRET";
/// Environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "KEYWAVE_WORKER_CONFIG";
/// NATS URL used when neither the flag, the environment nor the file sets one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_CONCURRENCY: usize = 64;
pub const DEFAULT_MAX_CONCURRENCY: usize = 16;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 30;
pub const DEFAULT_POSTGRES_PORT: u16 = 5432;
pub const DEFAULT_POSTGRES_DBNAME: &str = "postgres";
pub const DEFAULT_MYSQL_PORT: u16 = 3306;
pub const DEFAULT_ACCOUNT_HOST: &str = "%";
/// Admin connections per database endpoint, unless `max_concurrency` is lower.
pub const DEFAULT_ADMIN_CONNECTIONS: usize = 4;

/// Where environment variables come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    /// A field has a bad value; `field` is its path, e.g. `endpoint[1].url`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

impl ConfigError {
    /// The offending field, for validation errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The worker configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Region this worker serves: it takes tasks from `keywave.task.<region>.>`
    /// and keeps secrets in KV bucket `keywave-secrets-<region>`. Letters,
    /// digits, `-` and `_`. Required here or with `--region` (which wins).
    #[serde(default)]
    pub region: Option<String>,
    /// Name of this worker in results and logs. Default: `worker-<random hex>`.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Tasks this worker runs at once. Default 64.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// NATS server URL (several comma-separated for a cluster). `--nats` or
    /// `KEYWAVE_NATS_URL` override it. Default `nats://127.0.0.1:4222`.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// `[nats]`: who this worker is on NATS and TLS to the server: at most
    /// one of `creds_file`, `nkey_seed_file` or `user` (with `password_file`
    /// or `password_env`; default variable `KEYWAVE_NATS_PASSWORD`), plus
    /// `inbox_prefix` (e.g. `_INBOX_worker_eu` with `deploy/nats-secure.conf`),
    /// `ca_file`, `client_cert_file`, `client_key_file`, `tls_required`.
    /// The `KEYWAVE_NATS_*` variables (`KEYWAVE_NATS_USER`,
    /// `KEYWAVE_NATS_PASSWORD_FILE`, `KEYWAVE_NATS_CREDS`, `KEYWAVE_NATS_NKEY`,
    /// `KEYWAVE_NATS_CA`, ...) override it. Default: anonymous, plain TCP.
    #[serde(default)]
    pub nats: keywave_common::nats::ConnectConfig,
    /// File holding the region key (64 hex characters or base64 of 32 bytes;
    /// create one with `keywave-worker keygen`). Keep it readable by the worker
    /// only. When absent, the key is read from `KEYWAVE_REGION_KEY`.
    #[serde(default)]
    pub region_key_file: Option<PathBuf>,
    /// File holding the detection key shared with the coordinator (hex or
    /// base64 of 32 bytes; it can only fingerprint, never decrypt). With a
    /// key, the worker announces the keyed fingerprint of every secret it
    /// makes CURRENT on `keywave.rotated.<region>.<credential>`, so leak
    /// detections that carry a `sha256:` fingerprint find the credential.
    /// When absent, `KEYWAVE_DETECT_KEY_FILE` or `KEYWAVE_DETECT_KEY` is read;
    /// with none of them, nothing is announced.
    #[serde(default)]
    pub detect_key_file: Option<PathBuf>,
    /// Coordinator public keys (64 hex digits each, as printed by
    /// `keywave-coordinator keygen`) whose Ed25519 signatures this worker
    /// accepts on tasks. List two while the coordinator's key is rotated.
    /// With keys, unsigned, wrongly signed, altered or expired tasks are
    /// refused and dead-lettered. `KEYWAVE_COORDINATOR_PUBLIC_KEYS`
    /// (comma-separated) is used when this is empty. Required to serve
    /// tasks, unless `insecure_unsigned_tasks`.
    #[serde(default)]
    pub coordinator_public_keys: Vec<String>,
    /// Tasks must be signed; this may only repeat the default (`true`):
    /// the opt-out is `insecure_unsigned_tasks`.
    #[serde(default)]
    pub require_signed_tasks: Option<bool>,
    /// INSECURE, development only: serve tasks without checking signatures
    /// when no coordinator public key is configured. Anyone who can publish
    /// on `keywave.task.<region>.>` can then make this worker rotate
    /// credentials. `KEYWAVE_INSECURE_UNSIGNED_TASKS=1` has the same effect.
    #[serde(default)]
    pub insecure_unsigned_tasks: bool,
    /// Seconds the worker lets in-flight tasks finish after SIGTERM or SIGINT;
    /// tasks still running then are redelivered to another worker. Default 30.
    #[serde(default)]
    pub shutdown_grace_secs: Option<u64>,
    /// Address (`host:port`) to serve `/metrics` (Prometheus), `/healthz`
    /// and `/readyz` on, e.g. `0.0.0.0:9464`. `--metrics-addr` or
    /// `KEYWAVE_METRICS_ADDR` override it. Default: not served.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// JetStream settings used when this worker creates streams, the region's
    /// consumer and its secret store (existing ones are left as they are).
    #[serde(default)]
    pub jetstream: JetStreamFile,
    /// The credential systems this worker reaches, one `[[endpoint]]` table
    /// each, named as the inventory names them.
    #[serde(default, rename = "endpoint")]
    pub endpoints: Vec<EndpointFile>,
}

/// The `[jetstream]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamFile {
    /// Replicas of the streams and buckets this worker creates (3 on a
    /// cluster). Default 1.
    #[serde(default)]
    pub replicas: Option<usize>,
    /// Redelivery delays of an un-acked task, in seconds, one per delivery
    /// (the last repeats); the first is the ack wait. Default
    /// `[5, 5, 10, 20, 30]` (`topology::DEFAULT_TASK_BACKOFF_SECS`).
    #[serde(default)]
    pub task_backoff_secs: Option<Vec<u64>>,
    /// Deliveries of a task before the server gives up on it; must be greater
    /// than the number of `task_backoff_secs` entries. Default 10.
    #[serde(default)]
    pub task_max_deliver: Option<i64>,
    /// Tasks of the region handed out but not yet acked, over all its workers.
    /// Default 20000.
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
    /// Supercluster: where this region's secret store is created if this
    /// worker creates it (server tags and/or `cluster=<name>`, joined by
    /// `+`, e.g. `"region:eu"`), as the coordinator's `--placement` says for
    /// this region. Default: the server places it.
    #[serde(default)]
    pub placement: Option<String>,
    /// Supercluster: where the shared streams and buckets are created if
    /// this worker creates them, as the coordinator's `--home-placement`
    /// (e.g. `"cluster=home"`). Default: the server places them.
    #[serde(default)]
    pub home_placement: Option<String>,
    /// Replicas of this region's secret store if this worker creates it.
    /// Default: `replicas`.
    #[serde(default)]
    pub region_replicas: Option<usize>,
}

/// One `[[endpoint]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// The endpoint name used by the inventory (`Credential.endpoint`).
    pub name: String,
    /// `postgres` (PostgreSQL login roles), `mysql` (MariaDB / MySQL user
    /// accounts), `redis` (Redis ACL users) or `sim` (in-memory simulation for
    /// demos).
    pub kind: TargetKind,
    /// Operations this worker runs against the endpoint at once. Default 16.
    /// A database endpoint sees at most `admin_connections` + this many
    /// connections from one worker (each login check opens its own).
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// Rotations (`add` / `replace` operations, retries included) this
    /// worker starts per second against the endpoint, at most; fractions
    /// allowed (`0.5`: one every two seconds). Default: no limit.
    #[serde(default)]
    pub max_rotations_per_second: Option<f64>,
    /// redis: admin connection URL without a password, e.g.
    /// `redis://10.0.0.5:6379`.
    #[serde(default)]
    pub url: Option<String>,
    /// postgres, mysql: server host name or IP address. Required.
    #[serde(default)]
    pub host: Option<String>,
    /// postgres, mysql: server TCP port. Default 5432 (postgres) or 3306 (mysql).
    #[serde(default)]
    pub port: Option<u16>,
    /// postgres: database every connection opens, the admin's and each
    /// login check's (roles must be allowed to `CONNECT` to it). Default
    /// `postgres`.
    #[serde(default)]
    pub dbname: Option<String>,
    /// The admin login used to rotate, never itself rotated. redis: the ACL
    /// user (needs `ACL SETUSER`), default the `default` user. postgres
    /// (required): a superuser, or a `CREATEROLE` role with `ADMIN OPTION` on
    /// the roles it rotates. mysql (required): a user with `CREATE USER` (and
    /// `SELECT` on `mysql.global_priv` / `mysql.user` for alternating users).
    #[serde(default)]
    pub admin_user: Option<String>,
    /// redis, postgres, mysql: name of the environment variable holding the
    /// admin password.
    #[serde(default)]
    pub admin_password_env: Option<String>,
    /// redis, postgres, mysql: file holding the admin password (trailing
    /// newline ignored). Set this or `admin_password_env` (or neither for no
    /// password).
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
    /// postgres, mysql: TLS on every connection to the server, the admin
    /// pool's and each login check's alike. `disable` (plain TCP: loopback, a
    /// private network or a tunnel) or `require`: TLS with a verified
    /// certificate chain and host name (`host`, or `server_name`), no
    /// plain-text fallback. A certificate that fails verification fails the
    /// operation with `target_unreachable` (retried, then reported with the
    /// reason); a server that refuses plain text while this is `disable`
    /// fails it with `target_auth`. Default `disable`.
    #[serde(default)]
    pub tls: Option<TlsMode>,
    /// postgres, mysql, with `tls = "require"`: PEM bundle of the CA
    /// certificates to trust for this server (then only these); read at
    /// start-up. Default: the system trust store (`SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` or the distribution's bundle).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// postgres, mysql, with `tls = "require"`: the DNS name (or IP address)
    /// the server's certificate must carry, when it is not `host`, e.g. when
    /// connecting by IP address or through a tunnel. Default: `host`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// postgres, mysql: admin connections kept open at most, shared by every
    /// task of this worker. Default 4 (or `max_concurrency` if lower).
    #[serde(default)]
    pub admin_connections: Option<usize>,
    /// postgres, mysql: how a continuity rotation keeps the old secret valid
    /// on a server with one password per login. `auto` (default): principals
    /// listed in `alternating` alternate, others use MySQL 8.0.14+ dual
    /// passwords, else continuity is refused; `refuse`: only containment
    /// runs (except for `alternating` principals); `alternating`: every
    /// principal alternates with its clone; `overwrite`: continuity sets the
    /// one password, the old one dies at once; `dual` (mysql): dual passwords.
    #[serde(default)]
    pub continuity: Option<Continuity>,
    /// postgres, mysql: with `continuity = "alternating"`, the clone of a
    /// principal without an `alternating` entry is principal + this suffix.
    /// Default `_clone`.
    #[serde(default)]
    pub clone_suffix: Option<String>,
    /// postgres, mysql: principals rotated with alternating users and their
    /// clone login, e.g. `{ app = "app_clone" }`. Both logins must exist with
    /// the same privileges; between rotations exactly one can log in (the
    /// other has `NOLOGIN` / `ACCOUNT LOCK`).
    #[serde(default)]
    pub alternating: Option<BTreeMap<String, String>>,
    /// mysql: host part of the account when a principal is a bare user name;
    /// a principal `user@host` names it itself (split at the last `@`).
    /// Default `%`.
    #[serde(default)]
    pub account_host: Option<String>,
    /// postgres, mysql: length of generated secrets. Default 40; 16 to 512
    /// (postgres) or 16 to 128 (mysql).
    #[serde(default)]
    pub secret_length: Option<usize>,
    /// postgres, mysql: characters of generated secrets: `alphanumeric`
    /// (default), `alphanumeric_symbols` (adds `-_.~!#%^*+=`) or `hex`.
    #[serde(default)]
    pub secret_charset: Option<Charset>,
    /// sim: milliseconds each operation takes. Default 0.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// sim: probability (0 to 1) that a set fails on purpose. Default 0.
    #[serde(default)]
    pub fail_rate: Option<f64>,
}

impl EndpointFile {
    /// The fields that are set, by name, for refusing those a kind ignores.
    fn set_fields(&self) -> Vec<&'static str> {
        [
            ("url", self.url.is_some()),
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("dbname", self.dbname.is_some()),
            ("admin_user", self.admin_user.is_some()),
            ("admin_password_env", self.admin_password_env.is_some()),
            ("admin_password_file", self.admin_password_file.is_some()),
            ("tls", self.tls.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("server_name", self.server_name.is_some()),
            ("admin_connections", self.admin_connections.is_some()),
            ("continuity", self.continuity.is_some()),
            ("clone_suffix", self.clone_suffix.is_some()),
            ("alternating", self.alternating.is_some()),
            ("account_host", self.account_host.is_some()),
            ("secret_length", self.secret_length.is_some()),
            ("secret_charset", self.secret_charset.is_some()),
            ("latency_ms", self.latency_ms.is_some()),
            ("fail_rate", self.fail_rate.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
    }
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub region: Option<String>,
    pub nats_url: Option<String>,
}

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    pub region: String,
    pub worker_id: String,
    pub concurrency: usize,
    pub nats_url: String,
    /// Identity and TLS settings of the NATS connection (no secret inside).
    pub nats: keywave_common::nats::ConnectConfig,
    pub region_key: RegionKey,
    /// The detection key, when rotation notices are announced.
    pub detect_key: Option<DetectKey>,
    /// Coordinator public keys task signatures are checked against.
    pub coordinator_keys: Vec<PublicKey>,
    /// Refuse to serve tasks without `coordinator_keys` (false only with
    /// the explicit `insecure_unsigned_tasks` opt-out).
    pub require_signed_tasks: bool,
    pub shutdown_grace: Duration,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (none: off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub topology: topology::Config,
    pub endpoints: Vec<EndpointConfig>,
}

/// A validated endpoint.
#[derive(Debug)]
pub struct EndpointConfig {
    pub name: String,
    pub max_concurrency: usize,
    pub max_rotations_per_second: Option<f64>,
    pub spec: EndpointSpec,
}

/// How to reach an endpoint.
pub enum EndpointSpec {
    /// Admin connection settings, admin credentials included.
    Redis(ConnectionInfo),
    Postgres(PostgresOptions),
    Mysql(MysqlOptions),
    Sim(SimOptions),
}

impl std::fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // ConnectionInfo may hold the admin password: show the address only.
            EndpointSpec::Redis(info) => write!(f, "Redis({})", info.addr()),
            // Admin's Debug redacts the password.
            EndpointSpec::Postgres(o) => write!(f, "Postgres({o:?})"),
            EndpointSpec::Mysql(o) => write!(f, "Mysql({o:?})"),
            EndpointSpec::Sim(o) => write!(f, "Sim({o:?})"),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, overrides: &Overrides, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string(), overrides, env)
    }

    /// Parses and validates TOML `text` (`origin` names it in errors).
    pub fn parse(
        text: &str,
        origin: &str,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            detail: e.to_string(),
        })?;
        Self::validate(file, overrides, env)
    }

    /// Turns a parsed file into a configuration, or names the first bad field.
    pub fn validate(
        file: File,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        let region = overrides
            .region
            .clone()
            .or(file.region)
            .ok_or_else(|| invalid("region", "required (in the file or with --region)"))?;
        ids::validate("region", &region).map_err(|e| invalid("region", e.to_string()))?;

        let worker_id = file.worker_id.unwrap_or_else(|| ids::random_id("worker"));
        if worker_id.trim().is_empty() || worker_id.chars().any(char::is_control) {
            return Err(invalid("worker_id", "must be non-empty printable text"));
        }
        let concurrency = file.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            return Err(invalid("concurrency", "must be at least 1"));
        }
        let nats_url = overrides
            .nats_url
            .clone()
            .or_else(|| env.var(ENV_NATS_URL))
            .or(file.nats_url)
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_string());
        if nats_url.trim().is_empty() {
            return Err(invalid("nats_url", "must not be empty"));
        }
        keywave_common::nats::server_addrs(&nats_url)
            .map_err(|e| invalid("nats_url", format!("{nats_url:?}: {e}")))?;
        let nats = file
            .nats
            .with_env(|k| env.var(k))
            .map_err(|e| invalid(e.field, e.message))?;
        nats.validate().map_err(|e| invalid(e.field, e.message))?;

        let region_key = match &file.region_key_file {
            Some(p) => {
                warn_if_readable_by_others(p);
                RegionKey::from_file(p).map_err(|e| invalid("region_key_file", e.to_string()))?
            }
            None => {
                let v = env.var(ENV_REGION_KEY).ok_or_else(|| {
                    invalid(
                        "region_key_file",
                        format!("not set, and {ENV_REGION_KEY} is not set either"),
                    )
                })?;
                RegionKey::parse(&v).map_err(|e| invalid(ENV_REGION_KEY, e.to_string()))?
            }
        };

        let detect_key = detect_key(file.detect_key_file.as_deref(), env)?;
        let coordinator_keys = coordinator_keys(&file.coordinator_public_keys, env)?;
        let insecure_unsigned = file.insecure_unsigned_tasks
            || env
                .var(ENV_INSECURE_UNSIGNED_TASKS)
                .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes"));
        match file.require_signed_tasks {
            Some(false) => return Err(invalid(
                "require_signed_tasks",
                "= false is not an opt-out: tasks are signed by default; for development only, \
                     insecure_unsigned_tasks = true serves unsigned tasks",
            )),
            Some(true) if insecure_unsigned => {
                return Err(invalid(
                    "insecure_unsigned_tasks",
                    "contradicts require_signed_tasks = true",
                ))
            }
            _ => {}
        }

        let shutdown_grace = Duration::from_secs(
            file.shutdown_grace_secs
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
        );
        let topology = jetstream_config(&file.jetstream, &region)?;
        let metrics_addr = match &file.metrics_addr {
            Some(a) => Some(a.trim().parse().map_err(|_| {
                invalid(
                    "metrics_addr",
                    format!("{a:?} is not a host:port address such as 0.0.0.0:9464"),
                )
            })?),
            None => None,
        };

        let mut names = HashSet::new();
        let mut endpoints = Vec::with_capacity(file.endpoints.len());
        for (i, e) in file.endpoints.into_iter().enumerate() {
            let at = format!("endpoint[{i}]");
            ids::validate("endpoint name", &e.name)
                .map_err(|err| invalid(format!("{at}.name"), err.to_string()))?;
            if !names.insert(e.name.clone()) {
                return Err(invalid(
                    format!("{at}.name"),
                    format!("endpoint {:?} is defined twice", e.name),
                ));
            }
            endpoints.push(endpoint(&at, e, env)?);
        }

        Ok(Config {
            region,
            worker_id,
            concurrency,
            nats_url,
            nats,
            region_key,
            detect_key,
            coordinator_keys,
            require_signed_tasks: !insecure_unsigned,
            shutdown_grace,
            metrics_addr,
            topology,
            endpoints,
        })
    }

    pub fn endpoint(&self, name: &str) -> Option<&EndpointConfig> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Builds every endpoint's target. A server that cannot be reached
    /// now is logged and connected on first use, so one endpoint being down
    /// does not keep the worker from serving the others.
    pub async fn targets(&self) -> Result<Targets, TargetError> {
        let mut t = Targets::new();
        for e in &self.endpoints {
            t.insert_limited(
                &e.name,
                e.connect_or_defer().await?,
                e.max_concurrency,
                e.max_rotations_per_second,
            );
        }
        Ok(t)
    }
}

impl EndpointConfig {
    /// Connects to the endpoint now.
    pub async fn connect(&self) -> Result<Arc<dyn Target>, TargetError> {
        Ok(match &self.spec {
            EndpointSpec::Redis(info) => RedisTarget::connect_info(info.clone()).await?,
            EndpointSpec::Postgres(o) => PostgresTarget::connect(o.clone()).await?,
            EndpointSpec::Mysql(o) => MysqlTarget::connect(o.clone()).await?,
            EndpointSpec::Sim(o) => SimTarget::new(*o),
        })
    }

    async fn connect_or_defer(&self) -> Result<Arc<dyn Target>, TargetError> {
        match self.connect().await {
            Ok(t) => Ok(t),
            Err(why) if why.is_transient() => {
                warn!(endpoint = %self.name, error = %why, "Endpoint unreachable at start-up; will connect on first use");
                match &self.spec {
                    EndpointSpec::Redis(info) => Ok(RedisTarget::lazy(info.clone())?),
                    EndpointSpec::Postgres(o) => Ok(PostgresTarget::new(o.clone())?),
                    EndpointSpec::Mysql(o) => Ok(MysqlTarget::new(o.clone())?),
                    EndpointSpec::Sim(o) => Ok(SimTarget::new(*o)),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// The coordinator public keys from the file, else from
/// [`ENV_COORDINATOR_PUBLIC_KEYS`] (comma-separated).
fn coordinator_keys(listed: &[String], env: &dyn Env) -> Result<Vec<PublicKey>, ConfigError> {
    if !listed.is_empty() {
        return listed
            .iter()
            .enumerate()
            .map(|(i, k)| {
                PublicKey::from_hex(k)
                    .map_err(|e| invalid(format!("coordinator_public_keys[{i}]"), e.to_string()))
            })
            .collect();
    }
    match env.var(ENV_COORDINATOR_PUBLIC_KEYS) {
        Some(v) => v
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                PublicKey::from_hex(k)
                    .map_err(|e| invalid(ENV_COORDINATOR_PUBLIC_KEYS, e.to_string()))
            })
            .collect(),
        None => Ok(Vec::new()),
    }
}

/// The detection key from `detect_key_file`, else from the file named by
/// [`ENV_DETECT_KEY_FILE`], else from [`ENV_DETECT_KEY`]; none when no source
/// is set (empty environment variables count as unset).
fn detect_key(file: Option<&Path>, env: &dyn Env) -> Result<Option<DetectKey>, ConfigError> {
    let from_file = |p: &Path, field: &str| {
        warn_if_readable_by_others(p);
        DetectKey::from_file(p).map_err(|e| invalid(field, e.to_string()))
    };
    if let Some(p) = file {
        return from_file(p, "detect_key_file").map(Some);
    }
    if let Some(p) = env.var(ENV_DETECT_KEY_FILE).filter(|v| !v.is_empty()) {
        return from_file(Path::new(&p), ENV_DETECT_KEY_FILE).map(Some);
    }
    match env.var(ENV_DETECT_KEY).filter(|v| !v.is_empty()) {
        Some(k) => DetectKey::parse(&k)
            .map(Some)
            .map_err(|e| invalid(ENV_DETECT_KEY, e.to_string())),
        None => Ok(None),
    }
}

fn jetstream_config(js: &JetStreamFile, region: &str) -> Result<topology::Config, ConfigError> {
    let mut t = topology::Config::default();
    if let Some(spec) = &js.placement {
        let p = topology::Placement::parse(spec)
            .map_err(|e| invalid("jetstream.placement", e.to_string()))?;
        t.region_placement.insert(region.to_string(), p);
    }
    if let Some(spec) = &js.home_placement {
        t.home_placement = Some(
            topology::Placement::parse(spec)
                .map_err(|e| invalid("jetstream.home_placement", e.to_string()))?,
        );
    }
    if let Some(r) = js.region_replicas {
        if !(1..=5).contains(&r) {
            return Err(invalid(
                "jetstream.region_replicas",
                "must be between 1 and 5",
            ));
        }
        t.region_replicas = Some(r);
    }
    if let Some(r) = js.replicas {
        if !(1..=5).contains(&r) {
            return Err(invalid("jetstream.replicas", "must be between 1 and 5"));
        }
        t.replicas = r;
    }
    if let Some(b) = &js.task_backoff_secs {
        if b.is_empty() || b.contains(&0) {
            return Err(invalid(
                "jetstream.task_backoff_secs",
                "needs at least one delay, each at least 1 second",
            ));
        }
        t.task_backoff = b.iter().map(|s| Duration::from_secs(*s)).collect();
    }
    if let Some(m) = js.task_max_deliver {
        t.task_max_deliver = m;
    }
    if t.task_max_deliver <= t.task_backoff.len() as i64 {
        return Err(invalid(
            "jetstream.task_max_deliver",
            format!(
                "must be greater than the number of task_backoff_secs entries ({})",
                t.task_backoff.len()
            ),
        ));
    }
    if let Some(m) = js.max_ack_pending {
        if m < 1 {
            return Err(invalid("jetstream.max_ack_pending", "must be at least 1"));
        }
        t.max_ack_pending = m;
    }
    Ok(t)
}

/// Refuses every field in `set` that is not in `allowed` for `kind`.
fn only_fields(
    at: &str,
    e: &EndpointFile,
    kind: TargetKind,
    allowed: &[&str],
) -> Result<(), ConfigError> {
    match e.set_fields().into_iter().find(|f| !allowed.contains(f)) {
        Some(f) => Err(invalid(
            format!("{at}.{f}"),
            format!("not valid for kind = \"{kind}\""),
        )),
        None => Ok(()),
    }
}

/// The admin password named by `admin_password_env` or `admin_password_file`.
fn admin_password(
    at: &str,
    e: &EndpointFile,
    env: &dyn Env,
) -> Result<Option<Secret>, ConfigError> {
    Ok(match (&e.admin_password_env, &e.admin_password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                format!("{at}.admin_password_env"),
                "set admin_password_env or admin_password_file, not both",
            ))
        }
        (Some(var), None) => Some(Secret::new(env.var(var).ok_or_else(|| {
            invalid(
                format!("{at}.admin_password_env"),
                format!("environment variable {var} is not set"),
            )
        })?)),
        (None, Some(path)) => {
            let s = std::fs::read_to_string(path).map_err(|err| {
                invalid(
                    format!("{at}.admin_password_file"),
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            warn_if_readable_by_others(path);
            Some(Secret::new(s.trim_end_matches(['\n', '\r']).to_string()))
        }
        (None, None) => None,
    })
}

/// Fields every database kind takes.
const DB_FIELDS: &[&str] = &[
    "host",
    "port",
    "admin_user",
    "admin_password_env",
    "admin_password_file",
    "tls",
    "ca_file",
    "server_name",
    "admin_connections",
    "continuity",
    "clone_suffix",
    "alternating",
    "secret_length",
    "secret_charset",
];

/// `tls`, `ca_file` and `server_name`, validated and loaded (the CA bundle
/// is read now, so a bad one stops the worker at start-up).
fn db_tls(at: &str, e: &EndpointFile) -> Result<Tls, ConfigError> {
    match e.tls.unwrap_or_default() {
        TlsMode::Disable => {
            for (field, set) in [
                ("ca_file", e.ca_file.is_some()),
                ("server_name", e.server_name.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        format!("{at}.{field}"),
                        "only valid with tls = \"require\"",
                    ));
                }
            }
            Ok(Tls::Disable)
        }
        TlsMode::Require => {
            if let Some(n) = &e.server_name {
                if n.trim().is_empty() {
                    return Err(invalid(format!("{at}.server_name"), "must not be empty"));
                }
            }
            TlsRequire::new(e.ca_file.as_deref(), e.server_name.as_deref())
                .map(Tls::Require)
                .map_err(|err| invalid(format!("{at}.{}", err.field()), err.to_string()))
        }
    }
}

/// The settings postgres and mysql endpoints share, validated.
struct DbCommon {
    admin: Admin,
    logins: Logins,
    policy: SecretPolicy,
}

fn db_common(
    at: &str,
    e: &EndpointFile,
    env: &dyn Env,
    default_port: u16,
    max_concurrency: usize,
    lengths: std::ops::RangeInclusive<usize>,
    login_name: &dyn Fn(&str) -> Result<(), crate::targets::TargetError>,
) -> Result<DbCommon, ConfigError> {
    let kind = e.kind;
    let host = e.host.clone().ok_or_else(|| {
        invalid(
            format!("{at}.host"),
            format!("required for kind = \"{kind}\""),
        )
    })?;
    if host.trim().is_empty() {
        return Err(invalid(format!("{at}.host"), "must not be empty"));
    }
    let port = e.port.unwrap_or(default_port);
    if port == 0 {
        return Err(invalid(format!("{at}.port"), "must be between 1 and 65535"));
    }
    let user = e.admin_user.clone().ok_or_else(|| {
        invalid(
            format!("{at}.admin_user"),
            format!("required for kind = \"{kind}\""),
        )
    })?;
    login_name(&user).map_err(|e| invalid(format!("{at}.admin_user"), e.to_string()))?;
    let tls = db_tls(at, e)?;
    let connections = e
        .admin_connections
        .unwrap_or(DEFAULT_ADMIN_CONNECTIONS.min(max_concurrency));
    if connections == 0 {
        return Err(invalid(
            format!("{at}.admin_connections"),
            "must be at least 1",
        ));
    }

    let continuity = e.continuity.unwrap_or_default();
    if continuity == Continuity::Dual && kind != TargetKind::Mysql {
        return Err(invalid(
            format!("{at}.continuity"),
            format!("\"dual\" needs MySQL 8.0.14+; {kind} keeps one password per login"),
        ));
    }
    let clone_suffix = e
        .clone_suffix
        .clone()
        .unwrap_or_else(|| db::DEFAULT_CLONE_SUFFIX.to_string());
    if clone_suffix.is_empty() {
        return Err(invalid(format!("{at}.clone_suffix"), "must not be empty"));
    }
    let alternating = e.alternating.clone().unwrap_or_default();
    let mut clones = HashSet::new();
    for (principal, clone) in &alternating {
        let field = format!("{at}.alternating.{principal:?}");
        for name in [principal, clone] {
            login_name(name).map_err(|e| invalid(&field, e.to_string()))?;
            if *name == user {
                return Err(invalid(&field, "the admin login is never rotated"));
            }
        }
        if principal == clone {
            return Err(invalid(&field, "a principal cannot be its own clone"));
        }
        if !clones.insert(clone.clone()) || alternating.contains_key(clone) {
            return Err(invalid(
                &field,
                format!("{clone:?} is already used by another pair"),
            ));
        }
    }

    let policy = SecretPolicy {
        length: e.secret_length.unwrap_or(SecretPolicy::default().length),
        charset: e.secret_charset.unwrap_or(SecretPolicy::default().charset),
    };
    if !lengths.contains(&policy.length) {
        return Err(invalid(
            format!("{at}.secret_length"),
            format!(
                "must be between {} and {} for kind = \"{kind}\"",
                lengths.start(),
                lengths.end()
            ),
        ));
    }
    Ok(DbCommon {
        admin: Admin {
            host,
            port,
            user,
            password: admin_password(at, e, env)?,
            tls,
            connections,
        },
        logins: Logins {
            continuity,
            clone_suffix,
            alternating,
        },
        policy,
    })
}

fn endpoint(at: &str, e: EndpointFile, env: &dyn Env) -> Result<EndpointConfig, ConfigError> {
    let max_concurrency = e.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if max_concurrency == 0 {
        return Err(invalid(
            format!("{at}.max_concurrency"),
            "must be at least 1",
        ));
    }
    let spec = match e.kind {
        TargetKind::Redis => {
            only_fields(
                at,
                &e,
                e.kind,
                &[
                    "url",
                    "admin_user",
                    "admin_password_env",
                    "admin_password_file",
                ],
            )?;
            let url = e
                .url
                .clone()
                .ok_or_else(|| invalid(format!("{at}.url"), "required for kind = \"redis\""))?;
            // Parse errors may quote the URL: report without it.
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|_| invalid(format!("{at}.url"), "not a valid redis:// URL"))?;
            if info.redis_settings().password().is_some() {
                return Err(invalid(
                    format!("{at}.url"),
                    "must not contain a password; use admin_password_env or admin_password_file",
                ));
            }
            let password = admin_password(at, &e, env)?;
            let mut redis = info.redis_settings().clone();
            if let Some(u) = &e.admin_user {
                if u.is_empty() {
                    return Err(invalid(format!("{at}.admin_user"), "must not be empty"));
                }
                redis = redis.set_username(u);
            }
            if let Some(p) = &password {
                redis = redis.set_password(p.expose());
            }
            EndpointSpec::Redis(info.set_redis_settings(redis))
        }
        TargetKind::Postgres => {
            let mut allowed = DB_FIELDS.to_vec();
            allowed.push("dbname");
            only_fields(at, &e, e.kind, &allowed)?;
            let role = |n: &str| postgres::quote_ident(n).map(|_| ());
            let c = db_common(
                at,
                &e,
                env,
                DEFAULT_POSTGRES_PORT,
                max_concurrency,
                postgres::SECRET_LENGTHS,
                &role,
            )?;
            let dbname = e
                .dbname
                .clone()
                .unwrap_or_else(|| DEFAULT_POSTGRES_DBNAME.to_string());
            if dbname.is_empty() || dbname.contains('\0') {
                return Err(invalid(format!("{at}.dbname"), "must be a database name"));
            }
            EndpointSpec::Postgres(PostgresOptions {
                admin: c.admin,
                dbname,
                logins: c.logins,
                policy: c.policy,
            })
        }
        TargetKind::Mysql => {
            let mut allowed = DB_FIELDS.to_vec();
            allowed.push("account_host");
            only_fields(at, &e, e.kind, &allowed)?;
            let account_host = e
                .account_host
                .clone()
                .unwrap_or_else(|| DEFAULT_ACCOUNT_HOST.to_string());
            mysql::account("u", &account_host)
                .and_then(|_| mysql::quote_literal("account_host", &account_host))
                .map_err(|err| invalid(format!("{at}.account_host"), err.to_string()))?;
            let user = |n: &str| mysql::account(n, &account_host).map(|_| ());
            let c = db_common(
                at,
                &e,
                env,
                DEFAULT_MYSQL_PORT,
                max_concurrency,
                mysql::SECRET_LENGTHS,
                &user,
            )?;
            EndpointSpec::Mysql(MysqlOptions {
                admin: c.admin,
                account_host,
                logins: c.logins,
                policy: c.policy,
            })
        }
        TargetKind::Sim => {
            only_fields(at, &e, e.kind, &["latency_ms", "fail_rate"])?;
            let fail_rate = e.fail_rate.unwrap_or(0.0);
            if !(0.0..=1.0).contains(&fail_rate) {
                return Err(invalid(
                    format!("{at}.fail_rate"),
                    "must be between 0 and 1",
                ));
            }
            EndpointSpec::Sim(SimOptions {
                latency: Duration::from_millis(e.latency_ms.unwrap_or(0)),
                fail_rate,
            })
        }
    };
    if let Some(r) = e.max_rotations_per_second {
        if !r.is_finite() || r <= 0.0 {
            return Err(invalid(
                format!("{at}.max_rotations_per_second"),
                "must be a positive number",
            ));
        }
    }
    Ok(EndpointConfig {
        name: e.name,
        max_rotations_per_second: e.max_rotations_per_second,
        max_concurrency,
        spec,
    })
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            warn!(path = %path.display(), "Secret file is readable by group or others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key_env() -> HashMap<String, String> {
        env(&[
            (ENV_REGION_KEY, &RegionKey::generate().to_hex()),
            ("REDIS_PW", "s3cret"),
            ("KEYWAVE_PG_MAIN_PASSWORD", "pg-s3cret"),
            ("KEYWAVE_MARIADB_MAIN_PASSWORD", "my-s3cret"),
        ])
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test.toml", &Overrides::default(), &key_env())
    }

    fn bad_field(text: &str) -> String {
        match parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn the_example_file_is_valid() {
        let text = include_str!("../keywave-worker.example.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.region, "eu");
        assert!(c.endpoint("redis-main").is_some());
        assert!(c.endpoint("sim-demo").is_some());
        assert!(matches!(
            c.endpoint("pg-main").unwrap().spec,
            EndpointSpec::Postgres(_)
        ));
        assert!(matches!(
            c.endpoint("mariadb-main").unwrap().spec,
            EndpointSpec::Mysql(_)
        ));
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("region = \"eu\"\n").unwrap();
        assert_eq!(c.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(c.nats_url, DEFAULT_NATS_URL);
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(c.worker_id.starts_with("worker-"));
        let c = Config::parse(
            "region = \"eu\"\nnats_url = \"nats://file:4222\"",
            "t",
            &Overrides {
                region: Some("us".into()),
                nats_url: None,
            },
            &{
                let mut e = key_env();
                e.insert(ENV_NATS_URL.into(), "nats://env:4222".into());
                e
            },
        )
        .unwrap();
        assert_eq!(c.region, "us");
        assert_eq!(c.nats_url, "nats://env:4222");
    }

    #[test]
    fn nats_url_takes_a_comma_separated_server_list() {
        let c = parse("region = \"eu\"\nnats_url = \"nats://a:4222, nats://b:4222\"").unwrap();
        assert_eq!(c.nats_url, "nats://a:4222, nats://b:4222");
        assert_eq!(
            bad_field("region = \"eu\"\nnats_url = \"nats://a:4222,http://b\""),
            "nats_url"
        );
        assert_eq!(bad_field("region = \"eu\"\nnats_url = \" , \""), "nats_url");
    }

    #[test]
    fn nats_identity_from_the_file_or_the_environment() {
        let dir = std::env::temp_dir().join(format!("keywave-nats-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("nats.pw");
        std::fs::write(&pw, "pw\n").unwrap();
        let text = format!(
            "region = \"eu\"\n[nats]\nuser = \"worker-eu\"\npassword_file = {:?}\ninbox_prefix = \"_INBOX_worker_eu\"\n",
            pw.display().to_string()
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.nats.user.as_deref(), Some("worker-eu"));
        assert_eq!(c.nats.inbox_prefix.as_deref(), Some("_INBOX_worker_eu"));
        // The environment wins.
        let mut e = key_env();
        e.insert(keywave_common::nats::ENV_USER.into(), "worker-us".into());
        let c = Config::parse(&text, "t", &Overrides::default(), &e).unwrap();
        assert_eq!(c.nats.user.as_deref(), Some("worker-us"));
        assert_eq!(c.nats.password_file.as_deref(), Some(pw.as_path()));
        // Errors name the field; unknown keys are refused.
        assert_eq!(
            bad_field("region = \"eu\"\n[nats]\npassword_file = \"/nonexistent\"\n"),
            "nats.user"
        );
        assert_eq!(
            bad_field(
                "region = \"eu\"\n[nats]\nuser = \"w\"\npassword_file = \"/nonexistent/pw\"\n"
            ),
            "nats.password_file"
        );
        assert!(parse("region = \"eu\"\n[nats]\npassword = \"x\"\n").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn coordinator_keys_from_file_or_environment() {
        use keywave_common::sign::SigningKey;
        let (a, b) = (SigningKey::generate(), SigningKey::generate());
        let (pa, pb) = (a.public().to_hex(), b.public().to_hex());
        let c = parse(&format!(
            "region = \"eu\"\ncoordinator_public_keys = [{pa:?}, {pb:?}]\nrequire_signed_tasks = true"
        ))
        .unwrap();
        assert_eq!(c.coordinator_keys.len(), 2);
        assert!(c.require_signed_tasks);
        let mut e = key_env();
        e.insert(ENV_COORDINATOR_PUBLIC_KEYS.into(), format!("{pa}, {pb}"));
        let c = Config::parse("region = \"eu\"", "t", &Overrides::default(), &e).unwrap();
        assert_eq!(c.coordinator_keys[1].id(), b.id());
        assert!(parse("region = \"eu\"")
            .unwrap()
            .coordinator_keys
            .is_empty());
        // Signed tasks are the default; the only opt-out is named as such.
        assert!(parse("region = \"eu\"").unwrap().require_signed_tasks);
        assert!(
            !parse("region = \"eu\"\ninsecure_unsigned_tasks = true")
                .unwrap()
                .require_signed_tasks
        );
        let mut e = key_env();
        e.insert(ENV_INSECURE_UNSIGNED_TASKS.into(), "1".into());
        let c = Config::parse("region = \"eu\"", "t", &Overrides::default(), &e).unwrap();
        assert!(!c.require_signed_tasks);
        assert_eq!(
            bad_field("region = \"eu\"\nrequire_signed_tasks = false"),
            "require_signed_tasks"
        );
        assert_eq!(
            bad_field(
                "region = \"eu\"\nrequire_signed_tasks = true\ninsecure_unsigned_tasks = true"
            ),
            "insecure_unsigned_tasks"
        );
        assert_eq!(
            bad_field("region = \"eu\"\ncoordinator_public_keys = [\"xyz\"]"),
            "coordinator_public_keys[0]"
        );
    }

    #[test]
    fn detect_key_from_file_or_environment() {
        let with = |file_field: &str, extra: &[(&str, &str)]| {
            let mut e = key_env();
            for (k, v) in extra {
                e.insert(k.to_string(), v.to_string());
            }
            Config::parse(
                &format!("region = \"eu\"\n{file_field}"),
                "t",
                &Overrides::default(),
                &e,
            )
        };
        // None configured: no key, nothing is announced.
        assert!(with("", &[]).unwrap().detect_key.is_none());
        assert!(with("", &[(ENV_DETECT_KEY, "")])
            .unwrap()
            .detect_key
            .is_none());

        let k = DetectKey::generate();
        let from_env = with("", &[(ENV_DETECT_KEY, &k.to_hex())]).unwrap();
        assert_eq!(from_env.detect_key.unwrap().to_hex(), k.to_hex());

        let dir = std::env::temp_dir().join(ids::random_id("kw-detect"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("detect.key");
        std::fs::write(&path, format!("{}\n", k.to_hex())).unwrap();
        let p = path.display().to_string();
        let other = DetectKey::generate().to_hex();
        // The file field wins over both variables; the file variable over the key one.
        let c = with(
            &format!("detect_key_file = {p:?}"),
            &[(ENV_DETECT_KEY_FILE, "/nope"), (ENV_DETECT_KEY, &other)],
        )
        .unwrap();
        assert_eq!(c.detect_key.unwrap().to_hex(), k.to_hex());
        let c = with("", &[(ENV_DETECT_KEY_FILE, &p), (ENV_DETECT_KEY, &other)]).unwrap();
        assert_eq!(c.detect_key.as_ref().unwrap().to_hex(), k.to_hex());
        // Its Debug never shows the key.
        assert!(!format!("{c:?}").contains(&k.to_hex()));

        let field = |r: Result<Config, ConfigError>| r.unwrap_err().field().map(str::to_string);
        assert_eq!(
            field(with("detect_key_file = \"/nonexistent/kw.key\"", &[])).as_deref(),
            Some("detect_key_file")
        );
        assert_eq!(
            field(with("", &[(ENV_DETECT_KEY_FILE, "/nonexistent/kw.key")])).as_deref(),
            Some(ENV_DETECT_KEY_FILE)
        );
        assert_eq!(
            field(with("", &[(ENV_DETECT_KEY, "not-a-key")])).as_deref(),
            Some(ENV_DETECT_KEY)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_name_the_bad_field() {
        assert_eq!(bad_field(""), "region");
        assert_eq!(bad_field("region = \"e.u\""), "region");
        assert_eq!(bad_field("region = \"eu\"\nconcurrency = 0"), "concurrency");
        assert_eq!(
            bad_field("region = \"eu\"\n[[endpoint]]\nname = \"r\"\nkind = \"redis\""),
            "endpoint[0].url"
        );
        assert_eq!(
            bad_field("region = \"eu\"\n[[endpoint]]\nname = \"r\"\nkind = \"redis\"\nurl = \"redis://u:pw@h:1\""),
            "endpoint[0].url"
        );
        assert_eq!(
            bad_field("region = \"eu\"\n[[endpoint]]\nname = \"r\"\nkind = \"redis\"\nurl = \"redis://h:1\"\nadmin_password_env = \"NOPE\""),
            "endpoint[0].admin_password_env"
        );
        assert_eq!(
            bad_field(
                "region = \"eu\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\"\nfail_rate = 2.0"
            ),
            "endpoint[0].fail_rate"
        );
        assert_eq!(
            bad_field(
                "region = \"eu\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\"\nurl = \"redis://h\""
            ),
            "endpoint[0].url"
        );
        assert_eq!(
            bad_field("region = \"eu\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\""),
            "endpoint[1].name"
        );
        assert_eq!(
            bad_field("region = \"eu\"\n[[endpoint]]\nname = \"p\"\nkind = \"postgres\""),
            "endpoint[0].host"
        );
        assert_eq!(
            bad_field(
                "region = \"eu\"\n[jetstream]\ntask_backoff_secs = [1, 2]\ntask_max_deliver = 2"
            ),
            "jetstream.task_max_deliver"
        );
        let no_key = Config::parse("region = \"eu\"", "t", &Overrides::default(), &env(&[]));
        assert_eq!(no_key.unwrap_err().field(), Some("region_key_file"));
    }

    #[test]
    fn placement_keys_place_this_region_and_home() {
        let c = parse(
            "region = \"eu\"\n[jetstream]\nplacement = \"region:eu\"\nhome_placement = \"cluster=home\"\nregion_replicas = 1",
        )
        .unwrap();
        assert_eq!(c.topology.region_placement["eu"].to_string(), "region:eu");
        assert_eq!(
            c.topology.home_placement.unwrap().cluster.as_deref(),
            Some("home")
        );
        assert_eq!(c.topology.region_replicas, Some(1));
        assert_eq!(
            bad_field("region = \"eu\"\n[jetstream]\nplacement = \"zone=x\""),
            "jetstream.placement"
        );
        assert_eq!(
            bad_field("region = \"eu\"\n[jetstream]\nregion_replicas = 0"),
            "jetstream.region_replicas"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(matches!(
            parse("region = \"eu\"\ncolour = \"red\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            parse("region = \"eu\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\"\nlatency = 3"),
            Err(ConfigError::Parse { .. })
        ));
    }

    const PG: &str = "region = \"eu\"\n[[endpoint]]\nname = \"pg\"\nkind = \"postgres\"\nhost = \"127.0.0.1\"\nadmin_user = \"keywave\"\nadmin_password_env = \"REDIS_PW\"\n";
    const MY: &str = "region = \"eu\"\n[[endpoint]]\nname = \"my\"\nkind = \"mysql\"\nhost = \"127.0.0.1\"\nadmin_user = \"keywave\"\n";

    #[test]
    fn database_endpoints_with_their_defaults() {
        let c = parse(PG).unwrap();
        let EndpointSpec::Postgres(o) = &c.endpoints[0].spec else {
            panic!("postgres endpoint expected");
        };
        assert_eq!(o.admin.port, DEFAULT_POSTGRES_PORT);
        assert_eq!(o.dbname, "postgres");
        assert_eq!(o.admin.user, "keywave");
        assert_eq!(o.admin.password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(o.admin.tls, Tls::Disable);
        assert_eq!(o.admin.connections, DEFAULT_ADMIN_CONNECTIONS);
        assert_eq!(o.logins, Logins::default());
        assert_eq!(o.policy, SecretPolicy::default());
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.endpoints[0].max_rotations_per_second, None);
        let c = parse(&format!("{PG}max_rotations_per_second = 2.5")).unwrap();
        assert_eq!(c.endpoints[0].max_rotations_per_second, Some(2.5));

        let c = parse(&format!(
            "{MY}port = 3307\nmax_concurrency = 2\ncontinuity = \"alternating\"\nclone_suffix = \"_b\"\n\
             account_host = \"10.0.%\"\nsecret_length = 32\nsecret_charset = \"hex\"\n\
             alternating = {{ app = \"app_green\", \"o'brien\" = \"o'brien_2\" }}"
        ))
        .unwrap();
        let EndpointSpec::Mysql(o) = &c.endpoints[0].spec else {
            panic!("mysql endpoint expected");
        };
        assert_eq!(o.admin.port, 3307);
        assert_eq!(o.admin.connections, 2, "capped by max_concurrency");
        assert_eq!(o.admin.password, None);
        assert_eq!(o.account_host, "10.0.%");
        assert_eq!(o.logins.continuity, Continuity::Alternating);
        assert_eq!(o.logins.clone_suffix, "_b");
        assert_eq!(o.logins.alternating["o'brien"], "o'brien_2");
        assert_eq!(o.policy.length, 32);
        assert_eq!(o.policy.charset, Charset::Hex);
    }

    #[test]
    fn the_readme_database_endpoint_is_valid() {
        // docs/targets.md's database example is its toml block with a
        // postgres endpoint (other toml blocks show single settings).
        let readme = include_str!("../../docs/targets.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .map(|b| &b[..b.find("```").unwrap()])
            .find(|b| b.contains("kind = \"postgres\""))
            .expect("a toml block with a postgres endpoint in docs/targets.md");
        let text = format!("region = \"eu\"\n{block}");
        let c = Config::parse(
            &text,
            "docs/targets.md",
            &Overrides::default(),
            &env(&[
                (ENV_REGION_KEY, &RegionKey::generate().to_hex()),
                ("KEYWAVE_PG_MAIN_PASSWORD", "pw"),
            ]),
        )
        .unwrap();
        let EndpointSpec::Postgres(o) = &c.endpoints[0].spec else {
            panic!("postgres endpoint expected");
        };
        assert_eq!(o.logins.alternating.len(), 1);
    }

    #[test]
    fn database_endpoint_errors_name_the_field() {
        let cases = [
            (
                format!("{PG}ca_file = \"/etc/ca.pem\""),
                "endpoint[0].ca_file",
            ),
            (
                format!("{MY}tls = \"disable\"\nserver_name = \"db\""),
                "endpoint[0].server_name",
            ),
            (
                format!("{PG}tls = \"require\"\nca_file = \"/nonexistent/kw-ca.pem\""),
                "endpoint[0].ca_file",
            ),
            (
                format!("{MY}tls = \"require\"\nserver_name = \"not a host name\""),
                "endpoint[0].server_name",
            ),
            (
                format!("{PG}tls = \"require\"\nserver_name = \"\""),
                "endpoint[0].server_name",
            ),
            (
                format!("{PG}continuity = \"dual\""),
                "endpoint[0].continuity",
            ),
            (
                format!("{PG}account_host = \"%\""),
                "endpoint[0].account_host",
            ),
            (format!("{PG}url = \"redis://h\""), "endpoint[0].url"),
            (
                format!("{PG}secret_length = 8"),
                "endpoint[0].secret_length",
            ),
            (
                format!("{MY}secret_length = 200"),
                "endpoint[0].secret_length",
            ),
            (
                format!("{PG}admin_connections = 0"),
                "endpoint[0].admin_connections",
            ),
            (
                format!("{PG}max_rotations_per_second = 0"),
                "endpoint[0].max_rotations_per_second",
            ),
            (
                format!("{PG}max_rotations_per_second = -1.5"),
                "endpoint[0].max_rotations_per_second",
            ),
            (
                format!("{PG}clone_suffix = \"\""),
                "endpoint[0].clone_suffix",
            ),
            (format!("{PG}port = 0"), "endpoint[0].port"),
            (format!("{MY}dbname = \"x\""), "endpoint[0].dbname"),
            (
                format!("{MY}account_host = \"a\\\\b\""),
                "endpoint[0].account_host",
            ),
            (
                format!("{PG}alternating = {{ app = \"{}\" }}", "r".repeat(64)),
                "endpoint[0].alternating.\"app\"",
            ),
            (
                format!("{PG}alternating = {{ app = \"app\" }}"),
                "endpoint[0].alternating.\"app\"",
            ),
            (
                format!("{PG}alternating = {{ app = \"keywave\" }}"),
                "endpoint[0].alternating.\"app\"",
            ),
            (
                format!("{PG}alternating = {{ a = \"c\", b = \"c\" }}"),
                "endpoint[0].alternating.\"b\"",
            ),
            (
                "region = \"eu\"\n[[endpoint]]\nname = \"my\"\nkind = \"mysql\"\nhost = \"h\""
                    .into(),
                "endpoint[0].admin_user",
            ),
            (
                "region = \"eu\"\n[[endpoint]]\nname = \"s\"\nkind = \"sim\"\nhost = \"h\"".into(),
                "endpoint[0].host",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(bad_field(&text), field, "{text}");
        }
        assert!(matches!(
            parse(&format!("{PG}tls = \"verify-full\"")),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn database_tls_settings_are_loaded_and_checked() {
        // The system trust store when no ca_file is given.
        let c = parse(&format!("{PG}tls = \"require\"")).unwrap();
        let EndpointSpec::Postgres(o) = &c.endpoints[0].spec else {
            panic!("postgres endpoint expected");
        };
        let Tls::Require(t) = &o.admin.tls else {
            panic!("tls = require expected");
        };
        assert_eq!(t.ca_file(), None);
        assert!(t.server_name().is_none());

        // A CA bundle and a server name, for mysql too.
        let dir = std::env::temp_dir().join(ids::random_id("kw-db-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let pki = keywave_harness::secure::TestPki::generate(&dir);
        let ca = pki.ca.display().to_string();
        let c = parse(&format!(
            "{MY}tls = \"require\"\nca_file = {ca:?}\nserver_name = \"db.internal\""
        ))
        .unwrap();
        let EndpointSpec::Mysql(o) = &c.endpoints[0].spec else {
            panic!("mysql endpoint expected");
        };
        let Tls::Require(t) = &o.admin.tls else {
            panic!("tls = require expected");
        };
        assert_eq!(t.ca_file(), Some(pki.ca.as_path()));
        assert_eq!(t.server_name().unwrap().to_str(), "db.internal");
        // An IP address is a name too.
        assert!(parse(&format!(
            "{PG}tls = \"require\"\nca_file = {ca:?}\nserver_name = \"10.0.0.7\""
        ))
        .is_ok());

        // A file without a certificate (a key, say) is refused at start-up,
        // and the error names the field.
        let key = pki.key.display().to_string();
        let err = parse(&format!("{PG}tls = \"require\"\nca_file = {key:?}")).unwrap_err();
        assert_eq!(err.field(), Some("endpoint[0].ca_file"));
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
        // The TLS keys are refused where they mean nothing.
        assert_eq!(
            bad_field(&format!(
                "region = \"eu\"\n[[endpoint]]\nname = \"r\"\nkind = \"redis\"\nurl = \"redis://h:1\"\nca_file = {ca:?}"
            )),
            "endpoint[0].ca_file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn redis_admin_password_comes_from_the_environment() {
        let c = parse(
            "region = \"eu\"\n[[endpoint]]\nname = \"r\"\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\nadmin_user = \"kw\"\nadmin_password_env = \"REDIS_PW\"",
        )
        .unwrap();
        let EndpointSpec::Redis(info) = &c.endpoints[0].spec else {
            panic!("redis endpoint expected");
        };
        assert_eq!(info.redis_settings().username(), Some("kw"));
        assert_eq!(info.redis_settings().password(), Some("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
