//! The worker's configuration: a TOML file ([`File`], as written, with
//! unknown fields refused) validated into a [`Config`] at start-up. The doc
//! comments of [`File`], [`JetStreamFile`] and [`EndpointFile`] are the user
//! documentation; `keywave-worker.example.toml` shows every field.
//!
//! Secrets never sit in the file: the region key comes from `region_key_file`
//! or `KEYWAVE_REGION_KEY`, an endpoint's admin password from the environment
//! variable or file the endpoint names. Environment lookups go through [`Env`]
//! so tests pass a map.

use crate::targets::redis::RedisTarget;
use crate::targets::sim::{SimOptions, SimTarget};
use crate::targets::{Target, TargetError, Targets};
use ::redis::{ConnectionInfo, IntoConnectionInfo};
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::ids;
use keywave_common::topology;
use keywave_common::wire::TargetKind;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::warn;

/// Environment variable holding the region key when `region_key_file` is not set.
pub const ENV_REGION_KEY: &str = "KEYWAVE_REGION_KEY";
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
    /// File holding the region key (64 hex characters or base64 of 32 bytes;
    /// create one with `keywave-worker keygen`). Keep it readable by the worker
    /// only. When absent, the key is read from `KEYWAVE_REGION_KEY`.
    #[serde(default)]
    pub region_key_file: Option<PathBuf>,
    /// Seconds the worker lets in-flight tasks finish after SIGTERM or SIGINT;
    /// tasks still running then are redelivered to another worker. Default 30.
    #[serde(default)]
    pub shutdown_grace_secs: Option<u64>,
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
    /// Redelivery delays of an un-acked task, in seconds; the first is the ack
    /// wait. Default `[30, 60, 120, 300]`.
    #[serde(default)]
    pub task_backoff_secs: Option<Vec<u64>>,
    /// Deliveries of a task before the server gives up on it; must be greater
    /// than the number of `task_backoff_secs` entries. Default 5.
    #[serde(default)]
    pub task_max_deliver: Option<i64>,
    /// Tasks of the region handed out but not yet acked, over all its workers.
    /// Default 20000.
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
}

/// One `[[endpoint]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointFile {
    /// The endpoint name used by the inventory (`Credential.endpoint`).
    pub name: String,
    /// `redis` (Redis ACL users) or `sim` (in-memory simulation for demos).
    pub kind: TargetKind,
    /// Operations this worker runs against the endpoint at once. Default 16.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    /// redis: admin connection URL without a password, e.g.
    /// `redis://10.0.0.5:6379`.
    #[serde(default)]
    pub url: Option<String>,
    /// redis: the admin ACL user (needs `ACL SETUSER`). Default: the `default` user.
    #[serde(default)]
    pub admin_user: Option<String>,
    /// redis: name of the environment variable holding the admin password.
    #[serde(default)]
    pub admin_password_env: Option<String>,
    /// redis: file holding the admin password (trailing newline ignored).
    #[serde(default)]
    pub admin_password_file: Option<PathBuf>,
    /// sim: milliseconds each operation takes. Default 0.
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// sim: probability (0 to 1) that a set fails on purpose. Default 0.
    #[serde(default)]
    pub fail_rate: Option<f64>,
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
    pub region_key: RegionKey,
    pub shutdown_grace: Duration,
    pub topology: topology::Config,
    pub endpoints: Vec<EndpointConfig>,
}

/// A validated endpoint.
#[derive(Debug)]
pub struct EndpointConfig {
    pub name: String,
    pub max_concurrency: usize,
    pub spec: EndpointSpec,
}

/// How to reach an endpoint.
pub enum EndpointSpec {
    /// Admin connection settings, admin credentials included.
    Redis(ConnectionInfo),
    Sim(SimOptions),
}

impl std::fmt::Debug for EndpointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // ConnectionInfo may hold the admin password: show the address only.
            EndpointSpec::Redis(info) => write!(f, "Redis({})", info.addr()),
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

        let shutdown_grace = Duration::from_secs(
            file.shutdown_grace_secs
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
        );
        let topology = jetstream_config(&file.jetstream)?;

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
            region_key,
            shutdown_grace,
            topology,
            endpoints,
        })
    }

    pub fn endpoint(&self, name: &str) -> Option<&EndpointConfig> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// Builds every endpoint's target. A Redis server that cannot be reached
    /// now is logged and connected on first use, so one endpoint being down
    /// does not keep the worker from serving the others.
    pub async fn targets(&self) -> Result<Targets, TargetError> {
        let mut t = Targets::new();
        for e in &self.endpoints {
            t.insert(&e.name, e.connect_or_defer().await?, e.max_concurrency);
        }
        Ok(t)
    }
}

impl EndpointConfig {
    /// Connects to the endpoint now.
    pub async fn connect(&self) -> Result<Arc<dyn Target>, TargetError> {
        Ok(match &self.spec {
            EndpointSpec::Redis(info) => RedisTarget::connect_info(info.clone()).await?,
            EndpointSpec::Sim(o) => SimTarget::new(*o),
        })
    }

    async fn connect_or_defer(&self) -> Result<Arc<dyn Target>, TargetError> {
        match self.connect().await {
            Ok(t) => Ok(t),
            Err(TargetError::Unavailable(why)) => {
                warn!(endpoint = %self.name, error = %why, "Endpoint unreachable at start-up; will connect on first use");
                match &self.spec {
                    EndpointSpec::Redis(info) => Ok(RedisTarget::lazy(info.clone())?),
                    EndpointSpec::Sim(o) => Ok(SimTarget::new(*o)),
                }
            }
            Err(e) => Err(e),
        }
    }
}

fn jetstream_config(js: &JetStreamFile) -> Result<topology::Config, ConfigError> {
    let mut t = topology::Config::default();
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

fn endpoint(at: &str, e: EndpointFile, env: &dyn Env) -> Result<EndpointConfig, ConfigError> {
    let max_concurrency = e.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if max_concurrency == 0 {
        return Err(invalid(
            format!("{at}.max_concurrency"),
            "must be at least 1",
        ));
    }
    let only = |set: bool, field: &str, kind: &str| -> Result<(), ConfigError> {
        if set {
            Err(invalid(
                format!("{at}.{field}"),
                format!("only valid for kind = \"{kind}\""),
            ))
        } else {
            Ok(())
        }
    };
    let spec = match e.kind {
        TargetKind::Redis => {
            only(e.latency_ms.is_some(), "latency_ms", "sim")?;
            only(e.fail_rate.is_some(), "fail_rate", "sim")?;
            let url = e
                .url
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
            let password = match (&e.admin_password_env, &e.admin_password_file) {
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
            };
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
        TargetKind::Sim => {
            for (set, field) in [
                (e.url.is_some(), "url"),
                (e.admin_user.is_some(), "admin_user"),
                (e.admin_password_env.is_some(), "admin_password_env"),
                (e.admin_password_file.is_some(), "admin_password_file"),
            ] {
                only(set, field, "redis")?;
            }
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
        other => {
            return Err(invalid(
                format!("{at}.kind"),
                format!(
                    "{other} endpoints are not supported by this worker yet (use redis or sim)"
                ),
            ))
        }
    };
    Ok(EndpointConfig {
        name: e.name,
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
            "endpoint[0].kind"
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
