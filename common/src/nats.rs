//! Connecting to NATS the one way every keywave process does: a server list
//! given as one comma-separated string (`nats://a:4222,nats://b:4222`, the
//! seeds of a cluster), the process's client name, reconnect settings for
//! daemons that must ride out a server restart or a leader election, and
//! the process's identity and transport security ([`ConnectConfig`]: a
//! `.creds` file, an nkey seed file or a user and password, TLS, and the
//! per-user inbox prefix the least-privilege server configuration in
//! `deploy/nats-secure.conf` expects).
//!
//! Secrets (passwords, seeds) are read from files or the environment when
//! connecting, never taken from the command line, and never appear in an
//! error message or a log line.

use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions, Event, ServerAddr};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use thiserror::Error;

/// How long one connection attempt to one server may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of the client's pings: a dead server is noticed after two missed
/// pongs, well before a task's ack wait runs out.
pub const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Longest wait between two reconnect attempts.
pub const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(4);

/// Splits `urls` on `,`, trims each entry and parses it as a server address
/// (`nats://host:port`, `tls://...`, or a bare `host[:port]`). Empty entries
/// (a trailing comma) are skipped; no entry at all is an error.
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| ConnectError::with_source(ConnectErrorKind::ServerParse, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(ConnectError::with_source(
            ConnectErrorKind::ServerParse,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no NATS server URL given"),
        ));
    }
    Ok(addrs)
}

/// keywave's client settings, named `name` (shown by the server's
/// `connz`): reconnect forever with a capped exponential delay, so that a
/// daemon outlives a server restart; frequent enough pings to notice a dead
/// connection. The first connect still fails fast (unless the caller adds
/// `retry_on_initial_connect`), so a wrong URL is reported at start-up.
/// Errors the server reports on the connection (a permissions violation
/// names the refused subject) are logged as warnings.
pub fn options(name: impl Into<String>) -> ConnectOptions {
    ConnectOptions::new()
        .name(name.into())
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                Event::ServerError(e) => {
                    tracing::warn!(error = %e, "NATS server reported an error on this connection")
                }
                Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
                Event::Disconnected => tracing::info!("Disconnected from NATS"),
                Event::Connected => tracing::debug!("Connected to NATS"),
                other => tracing::debug!(event = %other, "NATS connection event"),
            }
        })
}

/// 0 ms, then 100 ms doubling up to [`MAX_RECONNECT_DELAY`].
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    (Duration::from_millis(100) * 2u32.pow(exp)).min(MAX_RECONNECT_DELAY)
}

/// Connects to the servers in `urls` (comma-separated) with [`options`]
/// and the process's [`installed`] identity, if any.
pub async fn connect(urls: &str, name: &str) -> Result<Client, ConnectError> {
    connect_with(urls, options(name)).await
}

/// Connects to the servers in `urls` (comma-separated) with `options`,
/// plus the process's [`installed`] identity if a binary installed one.
pub async fn connect_with(urls: &str, options: ConnectOptions) -> Result<Client, ConnectError> {
    let options = match installed() {
        Some(cfg) => cfg.apply(options).map_err(AuthError::into_connect_error)?,
        None => options,
    };
    options.connect(server_addrs(urls)?).await
}

/// Connects to the servers in `urls` with `options` and identity `auth`
/// (ignoring any [`installed`] one).
pub async fn connect_as(
    urls: &str,
    options: ConnectOptions,
    auth: &ConnectConfig,
) -> Result<Client, ConnectError> {
    let options = auth.apply(options).map_err(AuthError::into_connect_error)?;
    options.connect(server_addrs(urls)?).await
}

/// Environment variable: path of a `.creds` file (user JWT and nkey seed).
pub const ENV_CREDS: &str = "KEYWAVE_NATS_CREDS";
/// Environment variable: path of a file holding a user nkey seed (`SU...`).
pub const ENV_NKEY: &str = "KEYWAVE_NATS_NKEY";
/// Environment variable: NATS user name (with a password).
pub const ENV_USER: &str = "KEYWAVE_NATS_USER";
/// Environment variable: path of a file holding the NATS password.
pub const ENV_PASSWORD_FILE: &str = "KEYWAVE_NATS_PASSWORD_FILE";
/// Environment variable: the NATS password itself (when no file is named).
pub const ENV_PASSWORD: &str = "KEYWAVE_NATS_PASSWORD";
/// Environment variable: CA certificate file (PEM) that signed the server's certificate.
pub const ENV_CA: &str = "KEYWAVE_NATS_CA";
/// Environment variable: client certificate file (PEM), for servers that verify clients.
pub const ENV_CERT: &str = "KEYWAVE_NATS_CERT";
/// Environment variable: the client certificate's private key file (PEM).
pub const ENV_KEY: &str = "KEYWAVE_NATS_KEY";
/// Environment variable: `true` to refuse any connection that is not TLS.
pub const ENV_TLS_REQUIRED: &str = "KEYWAVE_NATS_TLS_REQUIRED";
/// Environment variable: prefix of this process's reply subjects.
pub const ENV_INBOX_PREFIX: &str = "KEYWAVE_NATS_INBOX_PREFIX";

/// Who a keywave process is on NATS and how it protects the connection: the
/// `[nats]` table of the worker configuration, the `--nats-*` flags of
/// `keywave` and `keywave-coordinator`, and the `KEYWAVE_NATS_*`
/// environment variables.
///
/// At most one identity: a `.creds` file (`creds_file`, decentralised JWT
/// auth), an nkey seed file (`nkey_seed_file`), or `user` with a password
/// (from `password_file`, the variable named by `password_env`, or
/// `KEYWAVE_NATS_PASSWORD`). None means an anonymous connection (a dev
/// server without authorization). Holds paths and names only, never a
/// secret: files are read when connecting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectConfig {
    /// A `.creds` file (user JWT plus nkey seed), as written by `nsc`.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// A file holding a user nkey seed (`SU...`), for `nkey` users of the
    /// server configuration.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// User name of a user/password user (e.g. `worker-eu` in
    /// `deploy/nats-secure.conf`).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the password of `user` (trailing newline ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Name of the environment variable holding the password of `user`
    /// (default `KEYWAVE_NATS_PASSWORD`).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Prefix of this process's reply subjects (`_INBOX` by default). The
    /// secure configuration lets each user subscribe to its own prefix only,
    /// e.g. `_INBOX_worker_eu`, so no identity can read another's replies.
    #[serde(default)]
    pub inbox_prefix: Option<String>,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients; needs
    /// `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Refuse to talk to the server without TLS (also implied by a
    /// `tls://` URL or `ca_file`).
    #[serde(default)]
    pub tls_required: bool,
}

/// A bad NATS identity or TLS setting; `field` names it. Never holds a
/// secret value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct AuthError {
    pub field: String,
    pub message: String,
}

impl AuthError {
    fn new(field: &str, message: impl Into<String>) -> AuthError {
        AuthError {
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn into_connect_error(self) -> ConnectError {
        ConnectError::with_source(ConnectErrorKind::Io, self)
    }
}

fn env_bool(field: &str, v: &str) -> Result<bool, AuthError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(AuthError::new(
            field,
            format!("expected true or false, got {other:?}"),
        )),
    }
}

fn read_trimmed(field: &str, path: &Path) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AuthError::new(field, format!("cannot read {}: {e}", path.display())))?;
    let v = text.trim_end_matches(['\n', '\r']).to_string();
    if v.is_empty() {
        return Err(AuthError::new(
            field,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(v)
}

fn must_exist(field: &str, path: &Option<PathBuf>) -> Result<(), AuthError> {
    match path {
        Some(p) if !p.is_file() => Err(AuthError::new(
            field,
            format!("{} is not a readable file", p.display()),
        )),
        _ => Ok(()),
    }
}

impl ConnectConfig {
    /// This configuration with every `KEYWAVE_NATS_*` variable that is set
    /// (and not empty) taking the place of the corresponding field. Setting
    /// an identity variable replaces the configured identity as a whole.
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Result<Self, AuthError> {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        let creds = var(ENV_CREDS);
        let nkey = var(ENV_NKEY);
        let user = var(ENV_USER);
        if creds.is_some() || nkey.is_some() || user.is_some() {
            self.creds_file = creds.map(PathBuf::from);
            self.nkey_seed_file = nkey.map(PathBuf::from);
            if user.is_some() {
                self.user = user;
            } else {
                self.user = None;
                self.password_file = None;
                self.password_env = None;
            }
        }
        if let Some(p) = var(ENV_PASSWORD_FILE) {
            self.password_file = Some(PathBuf::from(p));
        }
        if let Some(p) = var(ENV_CA) {
            self.ca_file = Some(PathBuf::from(p));
        }
        if let Some(p) = var(ENV_CERT) {
            self.client_cert_file = Some(PathBuf::from(p));
        }
        if let Some(p) = var(ENV_KEY) {
            self.client_key_file = Some(PathBuf::from(p));
        }
        if let Some(v) = var(ENV_TLS_REQUIRED) {
            self.tls_required = env_bool(ENV_TLS_REQUIRED, &v)?;
        }
        if let Some(p) = var(ENV_INBOX_PREFIX) {
            self.inbox_prefix = Some(p);
        }
        Ok(self)
    }

    /// Whether any identity is configured.
    pub fn has_identity(&self) -> bool {
        self.creds_file.is_some() || self.nkey_seed_file.is_some() || self.user.is_some()
    }

    /// Checks the settings without reading any secret: at most one
    /// identity, files that exist, a client key with a client certificate,
    /// a valid inbox prefix.
    pub fn validate(&self) -> Result<(), AuthError> {
        let identities = [
            self.creds_file.is_some(),
            self.nkey_seed_file.is_some(),
            self.user.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if identities > 1 {
            return Err(AuthError::new(
                "nats",
                "give one identity: creds_file, nkey_seed_file or user (with a password)",
            ));
        }
        if self.user.is_none() && (self.password_file.is_some() || self.password_env.is_some()) {
            return Err(AuthError::new("nats.user", "a password is set but no user"));
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(AuthError::new(
                    "nats.user",
                    "must be non-empty, without spaces",
                ));
            }
        }
        if let Some(v) = &self.password_env {
            if v.is_empty() {
                return Err(AuthError::new("nats.password_env", "must not be empty"));
            }
        }
        must_exist("nats.creds_file", &self.creds_file)?;
        must_exist("nats.nkey_seed_file", &self.nkey_seed_file)?;
        must_exist("nats.password_file", &self.password_file)?;
        must_exist("nats.ca_file", &self.ca_file)?;
        must_exist("nats.client_cert_file", &self.client_cert_file)?;
        must_exist("nats.client_key_file", &self.client_key_file)?;
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(AuthError::new(
                "nats.client_cert_file",
                "client_cert_file and client_key_file go together",
            ));
        }
        if let Some(p) = &self.inbox_prefix {
            let ok = !p.is_empty()
                && !p.starts_with('.')
                && !p.ends_with('.')
                && !p.contains("..")
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
            if !ok {
                return Err(AuthError::new(
                    "nats.inbox_prefix",
                    format!("{p:?} is not a subject prefix (letters, digits, _ - . $)"),
                ));
            }
        }
        Ok(())
    }

    /// The password of `user`, from `password_file`, else the variable named
    /// by `password_env`, else [`ENV_PASSWORD`].
    fn password(&self) -> Result<String, AuthError> {
        if let Some(p) = &self.password_file {
            return read_trimmed("nats.password_file", p);
        }
        let name = self.password_env.as_deref().unwrap_or(ENV_PASSWORD);
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(AuthError::new(
                "nats.user",
                format!("user is set but no password: set password_file or {name}"),
            )),
        }
    }

    /// `options` with this identity, TLS settings and inbox prefix. Reads
    /// the secret files now.
    pub fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, AuthError> {
        self.validate()?;
        if let Some(p) = &self.creds_file {
            let text = read_trimmed("nats.creds_file", p)?;
            options = options.credentials(&text).map_err(|e| {
                AuthError::new(
                    "nats.creds_file",
                    format!("{} is not a valid .creds file: {}", p.display(), e.kind()),
                )
            })?;
        } else if let Some(p) = &self.nkey_seed_file {
            let seed = read_trimmed("nats.nkey_seed_file", p)?;
            let seed = seed.trim().to_string();
            if !seed.starts_with("SU") {
                return Err(AuthError::new(
                    "nats.nkey_seed_file",
                    format!("{} does not hold a user nkey seed (SU...)", p.display()),
                ));
            }
            options = options.nkey(seed);
        } else if let Some(u) = &self.user {
            options = options.user_and_password(u.clone(), self.password()?);
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(c), Some(k)) = (&self.client_cert_file, &self.client_key_file) {
            options = options
                .add_client_certificate(c.clone(), k.clone())
                .require_tls(true);
        }
        if self.tls_required {
            options = options.require_tls(true);
        }
        if let Some(p) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(p);
        }
        Ok(options)
    }
}

static INSTALLED: OnceLock<ConnectConfig> = OnceLock::new();

/// Makes `cfg` the identity of every [`connect`] and [`connect_with`] of
/// this process (the `keywave` CLI and the coordinator daemon install the
/// one their flags give). Only the first call counts; false after that.
pub fn install(cfg: ConnectConfig) -> bool {
    INSTALLED.set(cfg).is_ok()
}

/// The identity installed by [`install`], if any.
pub fn installed() -> Option<&'static ConnectConfig> {
    INSTALLED.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(urls: &str) -> Vec<(String, u16)> {
        server_addrs(urls)
            .unwrap()
            .iter()
            .map(|a| (a.host().to_string(), a.port()))
            .collect()
    }

    #[test]
    fn comma_separated_urls_are_split_and_trimmed() {
        assert_eq!(hosts("nats://127.0.0.1:4222"), [("127.0.0.1".into(), 4222)]);
        assert_eq!(
            hosts("nats://a:4222,nats://b:4223"),
            [("a".into(), 4222), ("b".into(), 4223)]
        );
        assert_eq!(
            hosts(" nats://a:4222 ,\tb:5222, c ,"),
            [("a".into(), 4222), ("b".into(), 5222), ("c".into(), 4222)]
        );
    }

    #[test]
    fn bad_or_missing_urls_are_parse_errors() {
        for bad in [
            "",
            " , ",
            "http://a:4222",
            "nats://a:4222,nats://b:notaport",
        ] {
            let e = server_addrs(bad).unwrap_err();
            assert_eq!(e.kind(), ConnectErrorKind::ServerParse, "{bad:?}");
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = ConnectConfig {
            user: Some("worker-eu".into()),
            password_file: Some("/run/pw".into()),
            inbox_prefix: Some("_INBOX_worker_eu".into()),
            ..Default::default()
        };
        // No variable: unchanged.
        assert_eq!(file.clone().with_env(env(&[])).unwrap(), file);
        // Another identity replaces the whole identity.
        let c = file
            .clone()
            .with_env(env(&[(ENV_CREDS, "/run/w.creds")]))
            .unwrap();
        assert_eq!(c.creds_file.as_deref(), Some(Path::new("/run/w.creds")));
        assert_eq!(c.user, None);
        assert_eq!(c.password_file, None);
        let c = file
            .clone()
            .with_env(env(&[
                (ENV_USER, "worker-us"),
                (ENV_PASSWORD_FILE, "/run/pw2"),
                (ENV_TLS_REQUIRED, "true"),
                (ENV_CA, "/etc/ca.pem"),
                (ENV_INBOX_PREFIX, "_INBOX_worker_us"),
            ]))
            .unwrap();
        assert_eq!(c.user.as_deref(), Some("worker-us"));
        assert_eq!(c.password_file.as_deref(), Some(Path::new("/run/pw2")));
        assert!(c.tls_required);
        assert_eq!(c.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(c.inbox_prefix.as_deref(), Some("_INBOX_worker_us"));
        let e = file
            .with_env(env(&[(ENV_TLS_REQUIRED, "maybe")]))
            .unwrap_err();
        assert_eq!(e.field, ENV_TLS_REQUIRED);
    }

    #[test]
    fn validation_names_the_field_and_never_the_secret() {
        let dir = std::env::temp_dir().join(format!("keywave-nats-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("pw");
        std::fs::write(&pw, "hunter2-not-in-errors\n").unwrap();
        let ok = ConnectConfig {
            user: Some("op".into()),
            password_file: Some(pw.clone()),
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(ok.password().unwrap(), "hunter2-not-in-errors");
        assert!(ok.apply(ConnectOptions::new()).is_ok());

        let two = ConnectConfig {
            nkey_seed_file: Some(pw.clone()),
            ..ok.clone()
        };
        assert_eq!(two.validate().unwrap_err().field, "nats");
        let missing = ConnectConfig {
            password_file: Some(dir.join("nope")),
            ..ok.clone()
        };
        assert_eq!(missing.validate().unwrap_err().field, "nats.password_file");
        let orphan = ConnectConfig {
            password_file: Some(pw.clone()),
            ..Default::default()
        };
        assert_eq!(orphan.validate().unwrap_err().field, "nats.user");
        let half_tls = ConnectConfig {
            client_cert_file: Some(pw.clone()),
            ..Default::default()
        };
        assert_eq!(
            half_tls.validate().unwrap_err().field,
            "nats.client_cert_file"
        );
        let bad_prefix = ConnectConfig {
            inbox_prefix: Some("_INBOX.>".into()),
            ..Default::default()
        };
        assert_eq!(
            bad_prefix.validate().unwrap_err().field,
            "nats.inbox_prefix"
        );
        // A seed file that holds something else is refused without echoing it.
        let not_seed = ConnectConfig {
            nkey_seed_file: Some(pw.clone()),
            ..Default::default()
        };
        let e = not_seed.apply(ConnectOptions::new()).unwrap_err();
        assert_eq!(e.field, "nats.nkey_seed_file");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let no_pw = ConnectConfig {
            user: Some("op".into()),
            password_env: Some("KEYWAVE_TEST_SURELY_UNSET_PASSWORD".into()),
            ..Default::default()
        };
        let e = no_pw.apply(ConnectOptions::new()).unwrap_err();
        assert!(e.to_string().contains("KEYWAVE_TEST_SURELY_UNSET_PASSWORD"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn connect_config_parses_from_toml_like_data() {
        let c: ConnectConfig = serde_json::from_str(
            r#"{"user":"worker-eu","password_file":"/run/pw","inbox_prefix":"_INBOX_worker_eu","ca_file":"/etc/ca.pem","tls_required":true}"#,
        )
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("worker-eu"));
        assert!(c.tls_required);
        assert!(serde_json::from_str::<ConnectConfig>(r#"{"password":"x"}"#).is_err());
    }

    #[test]
    fn reconnect_delay_is_capped() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(100), MAX_RECONNECT_DELAY);
        assert_eq!(reconnect_delay(usize::MAX), MAX_RECONNECT_DELAY);
    }
}
