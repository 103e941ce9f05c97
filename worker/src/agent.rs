//! The consumer agent: `keywave-worker agent --config agent.toml`
//! runs next to an application. It watches the region's secret store (KV
//! `keywave-secrets-<region>`; it holds the region key, like a worker) for
//! the credentials its consumer uses and, whenever a credential's CURRENT
//! secret changes (promote, rollback, enrolment):
//!
//! 1. writes it for the application, atomically (a temporary file in the same
//!    directory, fsync, rename, then fsync of the directory), with the
//!    configured mode (default `0600`), either the bare secret or a template
//!    with `{{secret}}`, `{{principal}}` and `{{login}}` placeholders
//!    (`{{login}}`: the login the secret opens, which for alternating users
//!    is whichever login of the pair is active);
//! 2. runs the optional reload command;
//! 3. runs the optional health command;
//! 4. publishes an [`Attestation`] on `keywave.attest.<region>.<credential>`:
//!    the consumer id, the region-keyed fingerprint of the secret it now uses
//!    and whether the health check passed. While the check fails it is
//!    retried, and a passing one is attested again.
//!
//! The agent never sends a secret on the bus and never logs one. Commands run
//! with `sh -c` and get `KEYWAVE_CONSUMER`, `KEYWAVE_CREDENTIAL`,
//! `KEYWAVE_FINGERPRINT`, `KEYWAVE_SECRET_FILE` and `KEYWAVE_LOGIN` in their
//! environment, never the secret itself.

use crate::config::{Env, ENV_NATS_URL, ENV_REGION_KEY};
use crate::store::SecretStore;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::wire::{Attestation, SCHEMA_VERSION};
use keywave_common::{codec, ids, now_ms, publish, subjects, topology};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub const DEFAULT_COMMAND_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_HEALTH_RETRY_SECS: u64 = 5;
pub const DEFAULT_MODE: u32 = 0o600;

/// The agent configuration file (TOML; unknown fields are refused).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// The consumer this agent speaks for (its id in the inventory).
    /// `--consumer` overrides it.
    #[serde(default)]
    pub consumer: Option<String>,
    /// The region whose secret store holds the credentials. `--region`
    /// overrides it.
    #[serde(default)]
    pub region: Option<String>,
    /// NATS URL(s); `--nats` or `KEYWAVE_NATS_URL` override it.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// `[nats]`: identity and TLS, as for the worker (e.g. user `agent-eu`,
    /// `inbox_prefix = "_INBOX_agent_eu"` with `deploy/nats-secure.conf`).
    #[serde(default)]
    pub nats: keywave_common::nats::ConnectConfig,
    /// File holding the region key; else `KEYWAVE_REGION_KEY`.
    #[serde(default)]
    pub region_key_file: Option<PathBuf>,
    /// Shell command run after a new secret was written (e.g.
    /// `systemctl reload orders-api`).
    #[serde(default)]
    pub reload_command: Option<String>,
    #[serde(default)]
    pub reload_timeout_secs: Option<u64>,
    /// Shell command that exits 0 when the application works with the new
    /// secret (e.g. a login with it).
    #[serde(default)]
    pub health_command: Option<String>,
    #[serde(default)]
    pub health_timeout_secs: Option<u64>,
    /// Pause between health checks while one fails. Default 5.
    #[serde(default)]
    pub health_retry_secs: Option<u64>,
    /// The credentials the consumer uses, one `[[credential]]` table each.
    #[serde(rename = "credential")]
    pub credentials: Vec<CredentialFile>,
}

/// One `[[credential]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFile {
    /// Credential id, as in the inventory.
    pub id: String,
    /// Where the secret (or the rendered template) is written.
    pub path: PathBuf,
    /// What is written: `{{secret}}`, `{{principal}}` and `{{login}}` are
    /// replaced. `{{login}}` is the login the secret opens as the worker
    /// proved it: for alternating users the active login of the pair (e.g.
    /// `app_clone`), else the principal; `principal` when not known yet.
    /// Default: the bare secret, no newline.
    #[serde(default)]
    pub template: Option<String>,
    /// The login, for `{{principal}}` (and `{{login}}` until the store
    /// records one).
    #[serde(default)]
    pub principal: Option<String>,
    /// File mode, octal as a string (`"0640"`). Default `"0600"`.
    #[serde(default)]
    pub mode: Option<String>,
}

/// A validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub consumer: String,
    pub region: String,
    pub nats_url: String,
    pub nats: keywave_common::nats::ConnectConfig,
    pub region_key: RegionKey,
    pub reload: Option<Command>,
    pub health: Option<Command>,
    pub health_retry: Duration,
    pub credentials: Vec<Output>,
}

/// A shell command with its timeout.
#[derive(Debug, Clone)]
pub struct Command {
    pub command: String,
    pub timeout: Duration,
}

/// Where and how one credential is written.
#[derive(Debug, Clone)]
pub struct Output {
    pub id: String,
    pub path: PathBuf,
    pub template: Option<String>,
    pub principal: Option<String>,
    pub mode: u32,
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot read {path}: {detail}")]
    Read { path: String, detail: String },
    #[error("{path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> AgentError {
    AgentError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Values from the command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct AgentOverrides {
    pub consumer: Option<String>,
    pub region: Option<String>,
    pub nats_url: Option<String>,
}

impl AgentConfig {
    pub fn load(
        path: &Path,
        overrides: &AgentOverrides,
        env: &dyn Env,
    ) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|e| AgentError::Read {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&text, &path.display().to_string(), overrides, env)
    }

    pub fn parse(
        text: &str,
        origin: &str,
        overrides: &AgentOverrides,
        env: &dyn Env,
    ) -> Result<AgentConfig, AgentError> {
        let file: AgentFile = toml::from_str(text).map_err(|e| AgentError::Parse {
            path: origin.to_string(),
            detail: e.to_string(),
        })?;
        let consumer = overrides
            .consumer
            .clone()
            .or(file.consumer)
            .ok_or_else(|| invalid("consumer", "required (in the file or with --consumer)"))?;
        ids::validate("consumer", &consumer).map_err(|e| invalid("consumer", e.to_string()))?;
        let region = overrides
            .region
            .clone()
            .or(file.region)
            .ok_or_else(|| invalid("region", "required (in the file or with --region)"))?;
        ids::validate("region", &region).map_err(|e| invalid("region", e.to_string()))?;
        let nats_url = overrides
            .nats_url
            .clone()
            .or_else(|| env.var(ENV_NATS_URL))
            .or(file.nats_url)
            .unwrap_or_else(|| crate::config::DEFAULT_NATS_URL.to_string());
        keywave_common::nats::server_addrs(&nats_url)
            .map_err(|e| invalid("nats_url", format!("{nats_url:?}: {e}")))?;
        let nats = file
            .nats
            .with_env(|k| env.var(k))
            .map_err(|e| invalid(e.field, e.message))?;
        nats.validate().map_err(|e| invalid(e.field, e.message))?;
        let region_key = match &file.region_key_file {
            Some(p) => {
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
        let command = |field: &str, c: Option<String>, t: Option<u64>| {
            let t = t.unwrap_or(DEFAULT_COMMAND_TIMEOUT_SECS);
            if t == 0 {
                return Err(invalid(format!("{field}_timeout_secs"), "must be positive"));
            }
            Ok(match c {
                Some(c) if c.trim().is_empty() => {
                    return Err(invalid(format!("{field}_command"), "must not be empty"))
                }
                Some(command) => Some(Command {
                    command,
                    timeout: Duration::from_secs(t),
                }),
                None => None,
            })
        };
        let reload = command("reload", file.reload_command, file.reload_timeout_secs)?;
        let health = command("health", file.health_command, file.health_timeout_secs)?;
        let health_retry = file.health_retry_secs.unwrap_or(DEFAULT_HEALTH_RETRY_SECS);
        if health_retry == 0 {
            return Err(invalid("health_retry_secs", "must be positive"));
        }
        if file.credentials.is_empty() {
            return Err(invalid(
                "credential",
                "at least one [[credential]] is required",
            ));
        }
        let mut credentials = Vec::new();
        for (i, c) in file.credentials.into_iter().enumerate() {
            let f = |name: &str| format!("credential[{i}].{name}");
            ids::validate("credential id", &c.id).map_err(|e| invalid(f("id"), e.to_string()))?;
            if credentials.iter().any(|o: &Output| o.id == c.id) {
                return Err(invalid(f("id"), format!("{:?} is listed twice", c.id)));
            }
            if c.path.file_name().is_none() || c.path.as_os_str().is_empty() {
                return Err(invalid(f("path"), "must name a file"));
            }
            if credentials.iter().any(|o: &Output| o.path == c.path) {
                return Err(invalid(f("path"), "is used by another credential"));
            }
            if let Some(t) = &c.template {
                if !t.contains("{{secret}}") {
                    return Err(invalid(f("template"), "must contain {{secret}}"));
                }
                if (t.contains("{{principal}}") || t.contains("{{login}}")) && c.principal.is_none()
                {
                    return Err(invalid(
                        f("principal"),
                        "required when the template uses {{principal}} or {{login}}",
                    ));
                }
            }
            let mode = match &c.mode {
                None => DEFAULT_MODE,
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| {
                        invalid(
                            f("mode"),
                            format!("{m:?} is not an octal mode like \"0600\""),
                        )
                    })?,
            };
            if mode & 0o002 != 0 {
                return Err(invalid(f("mode"), "must not be world-writable"));
            }
            credentials.push(Output {
                id: c.id,
                path: c.path,
                template: c.template,
                principal: c.principal,
                mode,
            });
        }
        Ok(AgentConfig {
            consumer,
            region,
            nats_url,
            nats,
            region_key,
            reload,
            health,
            health_retry: Duration::from_secs(health_retry),
            credentials,
        })
    }
}

/// What is written for `secret`: the bare secret or the rendered template.
/// `login` is the login the store records for the secret, if any.
pub fn render(out: &Output, secret: &Secret, login: Option<&str>) -> Secret {
    match &out.template {
        None => Secret::new(secret.expose().to_string()),
        Some(t) => {
            let principal = out.principal.as_deref().unwrap_or("");
            // The secret goes in last, so a secret that happens to contain
            // a placeholder is written as it is.
            let names = t
                .replace("{{principal}}", principal)
                .replace("{{login}}", login.unwrap_or(principal));
            Secret::new(names.replace("{{secret}}", secret.expose()))
        }
    }
}

/// Writes `content` to `path` atomically: a temporary file in the same
/// directory, created with `mode`, written and fsynced, renamed over `path`,
/// then the directory fsynced. A reader sees the old file or the new one,
/// never a part. Returns false (and writes nothing) when the file already
/// holds `content` with `mode`.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> std::io::Result<bool> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let (Ok(existing), Ok(meta)) = (std::fs::read(path), std::fs::metadata(path)) {
        let same = existing == content && meta.permissions().mode() & 0o777 == mode;
        let mut existing = existing;
        existing.fill(0);
        if same {
            return Ok(false);
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the path names no file"))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(
        ".{name}.keywave-{}-{}.tmp",
        std::process::id(),
        ids::random_id("w")
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode: set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    Passed,
    Failed(String),
}

/// Runs `cmd` with `sh -c`, killed at its timeout. Its output is not logged
/// (it could echo a secret the application printed); only the exit status is.
pub async fn run_command(cmd: &Command, env: &[(&str, String)]) -> CommandOutcome {
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(&cmd.command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = match c.spawn() {
        Ok(c) => c,
        Err(e) => return CommandOutcome::Failed(format!("cannot start: {e}")),
    };
    match tokio::time::timeout(cmd.timeout, child.wait()).await {
        Ok(Ok(s)) if s.success() => CommandOutcome::Passed,
        Ok(Ok(s)) => CommandOutcome::Failed(format!("exited with {s}")),
        Ok(Err(e)) => CommandOutcome::Failed(e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            CommandOutcome::Failed(format!("timed out after {}s", cmd.timeout.as_secs()))
        }
    }
}

/// A running agent.
pub struct Agent {
    cfg: AgentConfig,
    js: jetstream::Context,
    store: SecretStore,
    kv: kv::Store,
    /// Last health check per credential, reported to pings (crate::agent_ping).
    health: crate::agent_ping::HealthBoard,
}

impl Agent {
    /// Binds to the region's secret store (it must exist: workers create it).
    pub async fn start(client: async_nats::Client, cfg: AgentConfig) -> anyhow::Result<Agent> {
        let js = topology::context(client);
        let bucket = topology::kv_secrets(&cfg.region);
        let kv = js.get_key_value(&bucket).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot open the secret store {bucket} of region {}: {e}",
                cfg.region
            )
        })?;
        let store = SecretStore::from_kv(kv.clone(), &cfg.region, cfg.region_key.clone());
        let health =
            crate::agent_ping::HealthBoard::new(cfg.credentials.iter().map(|c| c.id.as_str()));
        Ok(Agent {
            cfg,
            js,
            store,
            kv,
            health,
        })
    }

    /// Follows every configured credential until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        info!(
            consumer = %self.cfg.consumer,
            region = %self.cfg.region,
            credentials = self.cfg.credentials.len(),
            "Agent started"
        );
        // Pre-flight pings (crate::agent_ping), answered until shutdown.
        let (c, r) = (self.cfg.consumer.clone(), self.cfg.region.clone());
        crate::agent_ping::spawn(self.js.client(), c, r, &self.health, shutdown.clone()).await?;
        let agent = std::sync::Arc::new(self);
        let tasks: Vec<_> = agent
            .cfg
            .credentials
            .iter()
            .cloned()
            .map(|out| {
                let agent = agent.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { agent.follow(out, shutdown).await })
            })
            .collect();
        for t in tasks {
            t.await?;
        }
        Ok(())
    }

    /// Watches one credential's record (re-watching after errors).
    async fn follow(&self, out: Output, shutdown: CancellationToken) {
        let mut state = State::default();
        while !shutdown.is_cancelled() {
            let mut watch = match self.kv.watch_with_history(&out.id).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(credential = %out.id, error = %e, "Cannot watch the secret store; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    }
                }
            };
            loop {
                let retry = async {
                    match state.unhealthy_since {
                        Some(_) => tokio::time::sleep(self.cfg.health_retry).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = retry => self.recheck(&out, &mut state).await,
                    next = watch.next() => match next {
                        Some(Ok(_)) => self.refresh(&out, &mut state).await,
                        Some(Err(e)) => {
                            warn!(credential = %out.id, error = %e, "Secret store watch failed; watching again");
                            break;
                        }
                        None => break,
                    },
                }
            }
        }
    }

    /// Reads the credential's CURRENT secret and applies it when its
    /// fingerprint changed.
    async fn refresh(&self, out: &Output, state: &mut State) {
        let loaded = match self.store.load(&out.id).await {
            Ok(l) => l,
            Err(e) => {
                warn!(credential = %out.id, error = %e, "Cannot read the credential's record");
                return;
            }
        };
        let Some(current) = loaded.record.current else {
            debug!(credential = %out.id, "No CURRENT secret yet");
            return;
        };
        if state.applied.as_deref() == Some(current.fingerprint.as_str()) {
            return;
        }
        let content = render(out, &current.secret, current.login.as_deref());
        let path = out.path.clone();
        let mode = out.mode;
        let written = tokio::task::spawn_blocking(move || {
            write_atomic(&path, content.expose().as_bytes(), mode)
        })
        .await;
        let changed = match written {
            Ok(Ok(changed)) => changed,
            Ok(Err(e)) => {
                warn!(credential = %out.id, path = %out.path.display(), error = %e, "Cannot write the secret; will try at the next change");
                return;
            }
            Err(e) => {
                warn!(credential = %out.id, error = %e, "Writer task failed");
                return;
            }
        };
        info!(
            credential = %out.id,
            fingerprint = %current.fingerprint,
            path = %out.path.display(),
            written = changed,
            "New CURRENT secret in place"
        );
        state.applied = Some(current.fingerprint.clone());
        state.login = current.login.clone();
        let env = self.command_env(out, state);
        if let Some(reload) = &self.cfg.reload {
            if let CommandOutcome::Failed(why) = run_command(reload, &env).await {
                warn!(credential = %out.id, reason = %why, "Reload command failed");
            }
        }
        self.check_and_attest(out, state).await;
    }

    /// A health check again while the last one failed.
    async fn recheck(&self, out: &Output, state: &mut State) {
        self.check_and_attest(out, state).await;
    }

    async fn check_and_attest(&self, out: &Output, state: &mut State) {
        let Some(fp) = state.applied.clone() else {
            return;
        };
        let healthy = match &self.cfg.health {
            None => true,
            Some(h) => match run_command(h, &self.command_env(out, state)).await {
                CommandOutcome::Passed => true,
                CommandOutcome::Failed(why) => {
                    warn!(credential = %out.id, reason = %why, "Health check failed with the new secret; retrying");
                    false
                }
            },
        };
        self.health.set(&out.id, healthy);
        state.unhealthy_since = if healthy {
            None
        } else {
            state.unhealthy_since.or(Some(now_ms()))
        };
        // Attest each (fingerprint, health) once.
        if state.attested.as_ref() == Some(&(fp.clone(), healthy)) {
            return;
        }
        if self.attest(&out.id, &fp, healthy).await {
            state.attested = Some((fp, healthy));
        }
    }

    fn command_env(&self, out: &Output, state: &State) -> Vec<(&'static str, String)> {
        let login = state
            .login
            .clone()
            .or_else(|| out.principal.clone())
            .unwrap_or_default();
        vec![
            ("KEYWAVE_CONSUMER", self.cfg.consumer.clone()),
            ("KEYWAVE_CREDENTIAL", out.id.clone()),
            (
                "KEYWAVE_FINGERPRINT",
                state.applied.clone().unwrap_or_default(),
            ),
            ("KEYWAVE_SECRET_FILE", out.path.display().to_string()),
            ("KEYWAVE_LOGIN", login),
        ]
    }

    /// Publishes the attestation and waits for JetStream's ack.
    async fn attest(&self, credential: &str, fingerprint: &str, healthy: bool) -> bool {
        let a = Attestation {
            v: SCHEMA_VERSION,
            consumer_id: self.cfg.consumer.clone(),
            region: self.cfg.region.clone(),
            credential_id: credential.to_string(),
            fingerprint: fingerprint.to_string(),
            healthy,
            at_ms: now_ms(),
        };
        let msg_id = format!(
            "attest:{}:{}:{}:{}:{}",
            self.cfg.region, credential, self.cfg.consumer, fingerprint, healthy
        );
        match publish::send_and_confirm(
            &self.js,
            subjects::attest(&self.cfg.region, credential),
            codec::Format::Json,
            &msg_id,
            &a,
        )
        .await
        {
            Ok(()) => {
                info!(credential, fingerprint, healthy, "Attested");
                true
            }
            Err(e) => {
                warn!(credential, error = %e, "Could not publish the attestation; retrying at the next check");
                false
            }
        }
    }
}

/// What the agent did for one credential.
#[derive(Debug, Default)]
struct State {
    /// Fingerprint of the secret written last.
    applied: Option<String>,
    /// Last attestation published: fingerprint and health.
    attested: Option<(String, bool)>,
    /// Since when the health check fails (None: passing or not run).
    unhealthy_since: Option<u64>,
    /// The login the store records for the secret written last.
    login: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env() -> HashMap<String, String> {
        let mut e = HashMap::new();
        e.insert(ENV_REGION_KEY.into(), RegionKey::generate().to_hex());
        e
    }

    #[test]
    fn config_parses_and_refuses_unknown_fields() {
        let text = r#"
consumer = "orders-api"
region = "eu"
reload_command = "true"
health_command = "true"
health_timeout_secs = 3
[[credential]]
id = "db-orders"
path = "/run/orders/db.env"
template = "DATABASE_URL=postgres://{{principal}}:{{secret}}@db/orders\n"
principal = "orders_rw"
mode = "0640"
"#;
        let c = AgentConfig::parse(text, "t", &AgentOverrides::default(), &env()).unwrap();
        assert_eq!(c.consumer, "orders-api");
        assert_eq!(c.credentials[0].mode, 0o640);
        assert_eq!(c.health.as_ref().unwrap().timeout, Duration::from_secs(3));
        let bad = format!("{text}\ncolour = 1\n");
        assert!(AgentConfig::parse(&bad, "t", &AgentOverrides::default(), &env()).is_err());
        let no_secret = text.replace("{{secret}}", "x");
        let e =
            AgentConfig::parse(&no_secret, "t", &AgentOverrides::default(), &env()).unwrap_err();
        assert!(e.to_string().contains("credential[0].template"), "{e}");
        let world = text.replace("0640", "0666");
        assert!(AgentConfig::parse(&world, "t", &AgentOverrides::default(), &env()).is_err());
    }

    #[test]
    fn renders_templates() {
        let out = Output {
            id: "c".into(),
            path: "/x".into(),
            template: Some("U={{principal}} P={{secret}}".into()),
            principal: Some("app".into()),
            mode: 0o600,
        };
        let s = Secret::new("s3cr3t".into());
        assert_eq!(render(&out, &s, None).expose(), "U=app P=s3cr3t");
        let out = Output {
            template: Some("{{login}}:{{secret}} ({{principal}})".into()),
            ..out
        };
        assert_eq!(render(&out, &s, None).expose(), "app:s3cr3t (app)");
        assert_eq!(
            render(&out, &s, Some("app_clone")).expose(),
            "app_clone:s3cr3t (app)"
        );
        // A placeholder inside the secret is not expanded.
        let odd = Secret::new("{{login}}".into());
        assert_eq!(render(&out, &odd, Some("b")).expose(), "b:{{login}} (app)");
    }

    #[test]
    fn writes_atomically_with_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let p = dir.join("secret");
        assert!(write_atomic(&p, b"one", 0o600).unwrap());
        assert!(!write_atomic(&p, b"one", 0o600).unwrap(), "unchanged");
        assert!(write_atomic(&p, b"two", 0o600).unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A reader polling the file while it is rewritten 500 times, between
    /// contents of very different lengths, only ever sees a whole one.
    #[test]
    fn a_polling_reader_never_sees_a_partial_file() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile_dir();
        let p = dir.join("secret");
        let versions: Vec<Vec<u8>> = (0..8u8)
            .map(|i| vec![b'a' + i; if i % 2 == 0 { 12 } else { 64 * 1024 }])
            .collect();
        write_atomic(&p, &versions[0], 0o600).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (p, done, versions) = (p.clone(), done.clone(), versions.clone());
            std::thread::spawn(move || {
                let (mut reads, mut torn) = (0u64, 0u64);
                while !done.load(Ordering::SeqCst) {
                    let got = std::fs::read(&p).expect("the file always exists");
                    reads += 1;
                    if !versions.contains(&got) {
                        torn += 1;
                    }
                }
                (reads, torn)
            })
        };
        for n in 1..=500 {
            write_atomic(&p, &versions[n % versions.len()], 0o600).unwrap();
        }
        done.store(true, Ordering::SeqCst);
        let (reads, torn) = reader.join().unwrap();
        assert!(reads > 0);
        assert_eq!(torn, 0, "{torn} of {reads} reads saw a partial file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(ids::random_id("kw-agent-test"));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
