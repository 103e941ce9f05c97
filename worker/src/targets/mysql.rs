//! MariaDB and MySQL user accounts as a target. A password is set with
//! `ALTER USER '<user>'@'<host>' IDENTIFIED BY ...`: on MariaDB as the
//! `mysql_native_password` hash computed on the worker (`IDENTIFIED BY
//! PASSWORD '*…'`, so the clear secret never reaches the server or its logs);
//! on MySQL in the clear, which MySQL rewrites out of its logs, because its
//! dual passwords need it. `check` is a real login as the user (then
//! `SELECT 1`) from the worker.
//!
//! Continuity comes from the endpoint's [`Logins`]: MySQL 8.0.14+ dual
//! passwords (`RETAIN CURRENT PASSWORD` / `DISCARD OLD PASSWORD`), or
//! alternating users (between rotations exactly one account of the pair is
//! unlocked), or an explicit overwrite, or a clear refusal.
//!
//! `ALTER USER` cannot take placeholders, so user, host and password are
//! string literals built by [`quote_literal`]: quotes doubled, and anything
//! whose meaning depends on the session (backslashes, control characters) is
//! refused rather than escaped. Catalog lookups bind their parameters.
//!
//! With `tls = "require"` every connection, the admin pool's and each login
//! check's, negotiates TLS (mysql_async over rustls, the endpoint's roots
//! only) and verifies the server's certificate and name, or fails.

use super::db::{
    describe, rustls_error, tls_failure, Admin, Logins, Scheme, Tls, TlsRequire, CONNECT_TIMEOUT,
};
use super::{AuthCheck, Target, TargetError};
use async_trait::async_trait;
use keywave_common::crypto::{generate, Secret, SecretPolicy};
use keywave_common::wire::TargetKind;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts};
use sha1::{Digest, Sha1};
use std::sync::Arc;
use tokio::sync::OnceCell;

/// What the target accepts as a secret length.
pub const SECRET_LENGTHS: std::ops::RangeInclusive<usize> = 16..=128;

/// Server error codes (MariaDB and MySQL share them unless noted).
mod code {
    pub const ACCESS_DENIED: u16 = 1045;
    /// MariaDB: "this account is locked".
    pub const MARIADB_ACCOUNT_LOCKED: u16 = 4151;
    /// MySQL: "Access denied for user ... Account is locked."
    pub const MYSQL_ACCOUNT_LOCKED: u16 = 3118;
    pub const DB_ACCESS_DENIED: u16 = 1044;
    pub const TABLE_ACCESS_DENIED: u16 = 1142;
    pub const SPECIFIC_ACCESS_DENIED: u16 = 1227;
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    pub const SERVER_SHUTDOWN: u16 = 1053;
    pub const USER_LIMIT_REACHED: u16 = 1203;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    pub const DEADLOCK: u16 = 1213;
    /// MySQL: "Connections using insecure transport are prohibited while
    /// --require_secure_transport=ON." (MariaDB answers ACCESS_DENIED.)
    pub const SECURE_TRANSPORT_REQUIRED: u16 = 3159;
}

/// How to reach a MariaDB / MySQL endpoint and what to rotate there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MysqlOptions {
    pub admin: Admin,
    /// Host part of the account when a principal has none (`user` rather
    /// than `user@host`).
    pub account_host: String,
    pub logins: Logins,
    pub policy: SecretPolicy,
}

/// Which server answered, read once per target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    pub mariadb: bool,
    /// MySQL 8.0.14+: `RETAIN CURRENT PASSWORD`.
    pub dual_passwords: bool,
}

impl Server {
    /// From `SELECT VERSION()`, e.g. `10.11.6-MariaDB-0+deb12u1` or `8.0.36`.
    pub fn from_version(v: &str) -> Server {
        let mariadb = v.to_ascii_lowercase().contains("mariadb");
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let version = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        Server {
            mariadb,
            dual_passwords: !mariadb && version >= (8, 0, 14),
        }
    }
}

/// A MariaDB or MySQL server whose accounts keywave rotates.
pub struct MysqlTarget {
    opts: MysqlOptions,
    pool: Pool,
    /// Address and TLS of every login check (a clone shares the TLS
    /// connector, built on first use).
    login_opts: OptsBuilder,
    server: OnceCell<Server>,
}

impl std::fmt::Debug for MysqlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlTarget")
            .field("opts", &self.opts)
            .field("server", &self.server.get())
            .finish_non_exhaustive()
    }
}

/// `'value'` with every `'` doubled. Refuses NUL, backslashes and other
/// control characters: their meaning depends on the session's `sql_mode`
/// (`NO_BACKSLASH_ESCAPES`), so they are never quoted, whatever the mode.
pub fn quote_literal(what: &str, value: &str) -> Result<String, TargetError> {
    if let Some(c) = value.chars().find(|c| *c == '\\' || c.is_control()) {
        return Err(TargetError::Rejected(format!(
            "{what} contains {c:?}, which keywave does not put in SQL"
        )));
    }
    Ok(format!("'{}'", value.replace('\'', "''")))
}

/// The `user@host` account a principal names: split at the last `@`, or the
/// whole principal with `default_host`.
pub fn account(principal: &str, default_host: &str) -> Result<(String, String), TargetError> {
    let (user, host) = match principal.rsplit_once('@') {
        Some((u, h)) => (u, h),
        None => (principal, default_host),
    };
    if user.is_empty() {
        return Err(TargetError::Rejected("empty user name".into()));
    }
    if host.is_empty() {
        return Err(TargetError::Rejected("empty host in user@host".into()));
    }
    quote_literal("user name", user)?;
    quote_literal("host", host)?;
    Ok((user.to_string(), host.to_string()))
}

/// The `mysql_native_password` hash: `*` + upper-case hex of SHA1(SHA1(pw)).
pub fn native_hash(secret: &Secret) -> String {
    let inner = Sha1::digest(secret.expose().as_bytes());
    let outer = Sha1::digest(inner);
    let mut s = String::with_capacity(41);
    s.push('*');
    for b in outer {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// Maps a driver error to a secret-free [`TargetError`].
fn classify(e: &mysql_async::Error, secrets: &[&Secret]) -> TargetError {
    match e {
        mysql_async::Error::Server(s) => {
            let text = format!("{} ({})", describe(&s.message, secrets), s.code);
            match s.code {
                code::ACCESS_DENIED => TargetError::Auth(text),
                code::DB_ACCESS_DENIED
                | code::TABLE_ACCESS_DENIED
                | code::SPECIFIC_ACCESS_DENIED => TargetError::Permission(text),
                code::SERVER_SHUTDOWN => TargetError::Unreachable(text),
                code::LOCK_WAIT_TIMEOUT => TargetError::Timeout(text),
                code::TOO_MANY_CONNECTIONS | code::USER_LIMIT_REACHED | code::DEADLOCK => {
                    TargetError::Unavailable(text)
                }
                _ => TargetError::Rejected(text),
            }
        }
        mysql_async::Error::Url(_) => TargetError::Internal("invalid connection settings".into()),
        // I/O, a dropped connection, a driver-level failure.
        mysql_async::Error::Io(io) if io_timed_out(io) => {
            TargetError::Timeout(describe(&io.to_string(), secrets))
        }
        other => TargetError::Unreachable(describe(&other.to_string(), secrets)),
    }
}

/// Whether a driver I/O error is a timeout.
fn io_timed_out(e: &mysql_async::IoError) -> bool {
    match e {
        mysql_async::IoError::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        #[allow(unreachable_patterns)]
        _ => false,
    }
}

/// Why a connection could not be opened, without secrets: a TLS failure
/// (`target_unreachable`, see [`tls_failure`]), a plain-text connection the
/// server refuses because it requires TLS (`target_auth`: fix the worker's
/// configuration), or the usual classes.
///
/// MySQL says when it refuses plain text (3159); MariaDB answers "access
/// denied" (1045) as for a wrong password, so without TLS a refused admin
/// login carries the hint. A login check cannot tell either: there 1045 is
/// a refused secret (so a rotation against such a server fails when the
/// new secret is tested, before any old one is declared refused).
fn connect_error(e: &mysql_async::Error, tls: &Tls, secrets: &[&Secret]) -> TargetError {
    if let Some(r) = rustls_error(e) {
        return tls_failure(r, tls);
    }
    match e {
        mysql_async::Error::Server(s) if s.code == code::SECURE_TRANSPORT_REQUIRED => {
            TargetError::Auth(format!(
                "the server refuses connections without TLS: {} ({}); set tls = \"require\"",
                describe(&s.message, secrets),
                s.code
            ))
        }
        mysql_async::Error::Server(s)
            if s.code == code::ACCESS_DENIED && matches!(tls, Tls::Disable) =>
        {
            TargetError::Auth(format!(
                "{} ({}); if the server requires TLS (require_secure_transport, REQUIRE SSL), set tls = \"require\"",
                describe(&s.message, secrets),
                s.code
            ))
        }
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            TargetError::Unreachable(
                "TLS: the server does not offer TLS (tls = \"require\")".into(),
            )
        }
        e => classify(e, secrets),
    }
}

/// The endpoint's address and TLS, without a login.
fn base_opts(admin: &Admin) -> OptsBuilder {
    OptsBuilder::default()
        .ip_or_hostname(admin.host.clone())
        .tcp_port(admin.port)
        .prefer_socket(false)
        .stmt_cache_size(0)
        .ssl_opts(match &admin.tls {
            Tls::Disable => None,
            Tls::Require(t) => Some(ssl_opts(t)),
        })
}

/// mysql_async's TLS settings for `tls`: the endpoint's roots only (no
/// bundled roots), certificate and name verified; `server_name`, when set,
/// is the name verified instead of the host.
fn ssl_opts(tls: &TlsRequire) -> SslOpts {
    // mysql_async builds its rustls configuration with the process's default
    // provider: make sure it is ring, as everywhere else (a no-op when one
    // is installed already).
    let _ = super::db::crypto_provider()
        .as_ref()
        .clone()
        .install_default();
    SslOpts::default()
        .with_root_certs(vec![tls.roots_pem().into()])
        .with_disable_built_in_roots(true)
        .with_danger_tls_hostname_override(tls.server_name().map(|n| n.to_str().into_owned()))
}

impl MysqlTarget {
    /// A target that connects on first use. Fails on an `account_host` that
    /// cannot be quoted.
    pub fn new(opts: MysqlOptions) -> Result<Arc<Self>, TargetError> {
        quote_literal("account_host", &opts.account_host)?;
        let size = opts.admin.connections.max(1);
        let constraints = PoolConstraints::new(0, size)
            .ok_or_else(|| TargetError::Internal("invalid admin pool size".into()))?;
        let login_opts = base_opts(&opts.admin);
        let builder = login_opts
            .clone()
            .user(Some(&opts.admin.user))
            .pass(opts.admin.password.as_ref().map(|p| p.expose()))
            .pool_opts(PoolOpts::default().with_constraints(constraints));
        let pool = Pool::new(Opts::from(builder));
        Ok(Arc::new(MysqlTarget {
            opts,
            pool,
            login_opts,
            server: OnceCell::new(),
        }))
    }

    /// [`MysqlTarget::new`], then an admin connection to prove the address
    /// and the admin login work (and to learn the server's flavour).
    pub async fn connect(opts: MysqlOptions) -> Result<Arc<Self>, TargetError> {
        let t = Self::new(opts)?;
        t.server().await?;
        Ok(t)
    }

    pub fn options(&self) -> &MysqlOptions {
        &self.opts
    }

    async fn admin(&self) -> Result<Conn, TargetError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.pool.get_conn()).await {
            Ok(r) => r.map_err(|e| connect_error(&e, &self.opts.admin.tls, &[])),
            Err(_) => Err(TargetError::Timeout(format!(
                "connect timed out after {}s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// The server's flavour, asked once.
    pub async fn server(&self) -> Result<Server, TargetError> {
        self.server
            .get_or_try_init(|| async {
                let mut c = self.admin().await?;
                let v: Option<String> = c
                    .query_first("SELECT VERSION()")
                    .await
                    .map_err(|e| classify(&e, &[]))?;
                Ok(Server::from_version(&v.unwrap_or_default()))
            })
            .await
            .copied()
    }

    /// The scheme of `principal` and its account(s), validated: quotable and
    /// never the admin login.
    async fn scheme(&self, principal: &str) -> Result<Scheme, TargetError> {
        let server = self.server().await?;
        let scheme = self.opts.logins.scheme(principal, server.dual_passwords);
        let logins: Vec<&str> = match &scheme {
            Scheme::Alternating { primary, clone } => vec![primary, clone],
            _ => vec![principal],
        };
        for l in logins {
            let (user, _) = account(l, &self.opts.account_host)?;
            if user == self.opts.admin.user {
                return Err(TargetError::Rejected(format!(
                    "{user:?} is the endpoint's admin login; keywave never rotates it"
                )));
            }
        }
        Ok(scheme)
    }

    /// `'user'@'host'` for `login`.
    fn account_sql(&self, login: &str) -> Result<String, TargetError> {
        let (user, host) = account(login, &self.opts.account_host)?;
        Ok(format!(
            "{}@{}",
            quote_literal("user name", &user)?,
            quote_literal("host", &host)?
        ))
    }

    /// `IDENTIFIED BY ...` for `secret` on this server.
    async fn identified_by(&self, secret: &Secret) -> Result<String, TargetError> {
        Ok(if self.server().await?.mariadb {
            format!(
                "IDENTIFIED BY PASSWORD {}",
                quote_literal("password hash", &native_hash(secret))?
            )
        } else {
            format!(
                "IDENTIFIED BY {}",
                quote_literal("secret", secret.expose()).map_err(|_| {
                    TargetError::Rejected("the secret holds a character keywave does not put in SQL; check the endpoint's secret_charset".into())
                })?
            )
        })
    }

    /// Runs admin statements one after the other, redacting `secrets` (and
    /// their hashes) from errors.
    async fn exec(&self, statements: &[String], secrets: &[&Secret]) -> Result<(), TargetError> {
        let hashes: Vec<Secret> = secrets
            .iter()
            .map(|s| Secret::new(native_hash(s)))
            .collect();
        let mut all: Vec<&Secret> = secrets.to_vec();
        all.extend(hashes.iter());
        let mut c = self.admin().await?;
        for sql in statements {
            c.query_drop(sql.as_str())
                .await
                .map_err(|e| classify(&e, &all))?;
        }
        Ok(())
    }

    /// `ALTER USER <account> IDENTIFIED BY ... [suffix]`.
    async fn set_sql(
        &self,
        login: &str,
        secret: &Secret,
        suffix: &str,
    ) -> Result<String, TargetError> {
        Ok(format!(
            "ALTER USER {} {}{suffix}",
            self.account_sql(login)?,
            self.identified_by(secret).await?
        ))
    }

    /// Locks `login` and gives it a password nobody knows.
    async fn deactivate_sql(&self, login: &str) -> Result<String, TargetError> {
        let unknown = generate(&SecretPolicy::default());
        self.set_sql(login, &unknown, " ACCOUNT LOCK").await
    }

    /// Whether each login's account is unlocked; a missing account is an error.
    async fn unlocked(&self, logins: [&str; 2]) -> Result<[bool; 2], TargetError> {
        let mariadb = self.server().await?.mariadb;
        let sql = if mariadb {
            "SELECT IFNULL(JSON_VALUE(Priv, '$.account_locked'), 'false') FROM mysql.global_priv WHERE User = ? AND Host = ?"
        } else {
            "SELECT account_locked FROM mysql.user WHERE User = ? AND Host = ?"
        };
        let mut c = self.admin().await?;
        let mut out = [false; 2];
        for (i, login) in logins.iter().enumerate() {
            let (user, host) = account(login, &self.opts.account_host)?;
            let v: Option<String> = c
                .exec_first(sql, (user.as_str(), host.as_str()))
                .await
                .map_err(|e| classify(&e, &[]))?;
            let v = v.ok_or_else(|| {
                TargetError::Rejected(format!(
                    "alternating users: account {user:?}@{host:?} does not exist (create both accounts of the pair)"
                ))
            })?;
            out[i] = !matches!(v.as_str(), "1" | "true" | "Y");
        }
        Ok(out)
    }

    /// One real login as `login` with `secret`, then `SELECT 1`.
    pub async fn login(&self, login: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        let (user, _) = account(login, &self.opts.account_host)?;
        let opts = self
            .login_opts
            .clone()
            .user(Some(&user))
            .pass(Some(secret.expose()));
        let mut conn = match tokio::time::timeout(CONNECT_TIMEOUT, Conn::new(opts)).await {
            Err(_) => {
                return Err(TargetError::Timeout(format!(
                    "connect timed out after {}s",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
            Ok(Err(mysql_async::Error::Server(s)))
                if matches!(
                    s.code,
                    code::ACCESS_DENIED | code::MARIADB_ACCOUNT_LOCKED | code::MYSQL_ACCOUNT_LOCKED
                ) =>
            {
                return Ok(AuthCheck::Rejected)
            }
            Ok(Err(e)) => return Err(connect_error(&e, &self.opts.admin.tls, &[secret])),
            Ok(Ok(c)) => c,
        };
        let r = conn.query_drop("SELECT 1").await;
        let _ = conn.disconnect().await;
        match r {
            Ok(()) => Ok(AuthCheck::Accepted),
            Err(e) => Err(classify(&e, &[secret])),
        }
    }

    /// Which login of `principal`'s scheme `secret` opens, if any.
    pub async fn active_login(
        &self,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<String>, TargetError> {
        let logins = match self.scheme(principal).await? {
            Scheme::Alternating { primary, clone } => vec![primary, clone],
            _ => vec![principal.to_string()],
        };
        for l in logins {
            if self.login(&l, secret).await? == AuthCheck::Accepted {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl Target for MysqlTarget {
    fn kind(&self) -> TargetKind {
        TargetKind::Mysql
    }

    fn policy(&self) -> SecretPolicy {
        self.opts.policy
    }

    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal).await? {
            Scheme::Refuse => Err(TargetError::Rejected(format!(
                "this server keeps one password per account, so a continuity rotation of {principal:?} \
                 needs alternating users (an `alternating` entry or continuity = \"alternating\") \
                 or continuity = \"overwrite\"; or rotate it with containment"
            ))),
            Scheme::Dual if !self.server().await?.dual_passwords => Err(TargetError::Rejected(
                "continuity = \"dual\" needs MySQL 8.0.14 or later (RETAIN CURRENT PASSWORD); \
                 use alternating users on this server"
                    .into(),
            )),
            Scheme::Dual => {
                let sql = self
                    .set_sql(principal, new, " RETAIN CURRENT PASSWORD")
                    .await?;
                self.exec(&[sql], &[new]).await
            }
            Scheme::Overwrite => {
                let sql = self.set_sql(principal, new, "").await?;
                self.exec(&[sql], &[new]).await
            }
            Scheme::Alternating { primary, clone } => {
                let unlocked = self.unlocked([&primary, &clone]).await?;
                // An unlocked account that `new` already opens: an earlier
                // delivery of this task set it (and the rotation may have
                // moved on since). Setting the other one now would leave two
                // accounts with the same secret.
                for (login, on) in [(&primary, unlocked[0]), (&clone, unlocked[1])] {
                    if on && self.login(login, new).await? == AuthCheck::Accepted {
                        return Ok(());
                    }
                }
                let inactive = match unlocked {
                    [true, false] => clone,
                    [false, true] | [false, false] => primary,
                    [true, true] => {
                        return Err(TargetError::Rejected(format!(
                            "alternating users: both {primary:?} and {clone:?} are unlocked, so keywave cannot tell which one is in use; \
                             lock the unused one (ALTER USER ... ACCOUNT LOCK)"
                        )))
                    }
                };
                let sql = self.set_sql(&inactive, new, " ACCOUNT UNLOCK").await?;
                self.exec(&[sql], &[new]).await
            }
        }
    }

    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal).await? {
            Scheme::Refuse | Scheme::Overwrite => {
                let sql = self.set_sql(principal, new, "").await?;
                self.exec(&[sql], &[new]).await
            }
            Scheme::Dual => {
                // A primary change keeps a retained password: discard it too.
                let set = self.set_sql(principal, new, "").await?;
                let discard = format!(
                    "ALTER USER {} DISCARD OLD PASSWORD",
                    self.account_sql(principal)?
                );
                self.exec(&[set, discard], &[new]).await
            }
            Scheme::Alternating { primary, clone } => {
                // Keep the login that already has `new`, else take the
                // locked one; the other is locked first (containment: the
                // exposed secret dies before the new one lives).
                let (target, other) = match self.active_login(principal, new).await? {
                    Some(l) if l == primary => (primary, clone),
                    Some(_) => (clone, primary),
                    None => match self.unlocked([&primary, &clone]).await? {
                        [true, false] => (clone, primary),
                        _ => (primary, clone),
                    },
                };
                let off = self.deactivate_sql(&other).await?;
                let on = self.set_sql(&target, new, " ACCOUNT UNLOCK").await?;
                self.exec(&[off, on], &[new]).await
            }
        }
    }

    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal).await? {
            Scheme::Refuse | Scheme::Overwrite => {
                if self.login(principal, old).await? == AuthCheck::Accepted {
                    // A password nobody knows; no lock, which would also
                    // keep out whatever is set next.
                    let unknown = generate(&SecretPolicy::default());
                    let sql = self.set_sql(principal, &unknown, "").await?;
                    self.exec(&[sql], &[old]).await?;
                }
                Ok(())
            }
            Scheme::Dual => {
                if self.login(principal, old).await? == AuthCheck::Rejected {
                    return Ok(());
                }
                let sql = format!(
                    "ALTER USER {} DISCARD OLD PASSWORD",
                    self.account_sql(principal)?
                );
                self.exec(&[sql], &[old]).await?;
                if self.login(principal, old).await? == AuthCheck::Accepted {
                    // `old` was the primary password, not the retained one:
                    // only a stale staged secret is removed this way.
                    return Err(TargetError::Internal(
                        "the secret to remove is the account's primary password; the retained password was discarded instead"
                            .into(),
                    ));
                }
                Ok(())
            }
            Scheme::Alternating { primary, clone } => {
                for login in [&primary, &clone] {
                    if self.login(login, old).await? == AuthCheck::Accepted {
                        let sql = self.deactivate_sql(login).await?;
                        self.exec(&[sql], &[old]).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn placement(
        &self,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<String>, TargetError> {
        self.active_login(principal, secret).await
    }

    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        Ok(match self.active_login(principal, secret).await? {
            Some(_) => AuthCheck::Accepted,
            None => AuthCheck::Rejected,
        })
    }

    /// The accounts of `mysql.user` (roles and anonymous accounts aside),
    /// named `user` when their host is the endpoint's `account_host`, else
    /// `user@host`. Privileged: `SUPER`, `GRANT OPTION`, every global
    /// privilege (`ALL ON *.*`), the server's system accounts and the admin
    /// login. Alternating pairs fold into their primary.
    async fn discover(&self) -> Result<Vec<super::Login>, TargetError> {
        let mut c = self.admin().await?;
        // A constant statement (nothing to bind): the columns differ between
        // MariaDB and MySQL versions, so they are read by name.
        let rows: Vec<mysql_async::Row> = c
            .query("SELECT * FROM mysql.user")
            .await
            .map_err(|e| classify(&e, &[]))?;
        let mut found = Vec::new();
        for row in rows {
            let cols = row.columns_ref().to_vec();
            let text = |name: &str| -> Option<String> {
                let i = cols
                    .iter()
                    .position(|c| c.name_str().eq_ignore_ascii_case(name))?;
                row.get_opt::<Option<String>, usize>(i)
                    .and_then(|r| r.ok())
                    .flatten()
            };
            let (Some(user), Some(host)) = (text("User"), text("Host")) else {
                continue;
            };
            if user.is_empty() || text("is_role").as_deref() == Some("Y") {
                continue;
            }
            let mut privileged = Vec::new();
            if text("Super_priv").as_deref() == Some("Y") {
                privileged.push("SUPER".to_string());
            }
            if text("Grant_priv").as_deref() == Some("Y") {
                privileged.push("GRANT OPTION".to_string());
            }
            let privs: Vec<Option<String>> = cols
                .iter()
                .enumerate()
                // ALL PRIVILEGES never includes GRANT OPTION (checked above).
                .filter(|(_, c)| {
                    let n = c.name_str();
                    n.ends_with("_priv") && !n.eq_ignore_ascii_case("Grant_priv")
                })
                .map(|(i, _)| {
                    row.get_opt::<Option<String>, usize>(i)
                        .and_then(|r| r.ok())
                        .flatten()
                })
                .collect();
            if !privs.is_empty() && privs.iter().all(|p| p.as_deref() == Some("Y")) {
                privileged.push("ALL PRIVILEGES ON *.*".to_string());
            }
            if matches!(
                user.as_str(),
                "mariadb.sys" | "mysql.sys" | "mysql.session" | "mysql.infoschema"
            ) {
                privileged.push("system account".to_string());
            }
            if user == self.opts.admin.user {
                privileged.push("the endpoint's admin login".to_string());
            }
            let principal = if host == self.opts.account_host {
                user
            } else {
                format!("{user}@{host}")
            };
            found.push(super::Login {
                principal,
                privileged,
                never: None,
            });
        }
        super::fold_alternating(&self.opts.logins, &mut found);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::db::Continuity;
    use keywave_common::wire::ErrorClass;
    use keywave_harness::mariadb::ADMIN_USER;
    use keywave_harness::MariaDbServer;
    use std::collections::BTreeMap;

    #[test]
    fn literals_double_quotes_and_refuse_what_sql_mode_changes() {
        assert_eq!(quote_literal("u", "app").unwrap(), "'app'");
        assert_eq!(quote_literal("u", "o'brien").unwrap(), "'o''brien'");
        assert_eq!(quote_literal("u", "'").unwrap(), "''''");
        assert_eq!(
            quote_literal("u", "x'; DROP USER root; --").unwrap(),
            "'x''; DROP USER root; --'"
        );
        assert_eq!(
            quote_literal("u", "x\"; DROP ROLE postgres; --").unwrap(),
            "'x\"; DROP ROLE postgres; --'"
        );
        assert_eq!(quote_literal("u", "Ünïcødé `%_").unwrap(), "'Ünïcødé `%_'");
        for nasty in ["a\\", "\\'", "a\0b", "a\nb", "a\rb", "\u{1a}", "\u{7f}"] {
            assert!(
                matches!(quote_literal("u", nasty), Err(TargetError::Rejected(_))),
                "{nasty:?}"
            );
        }
        // Whatever goes in, exactly the outer quotes are unpaired.
        for s in ["", "'", "''", "a'b''c'''", "'; --"] {
            let q = quote_literal("u", s).unwrap();
            let inner = &q[1..q.len() - 1];
            assert_eq!(inner.replace("''", ""), s.replace('\'', ""), "{s:?}");
        }
    }

    #[test]
    fn accounts_split_at_the_last_at_sign() {
        assert_eq!(
            account("app", "%").unwrap(),
            ("app".to_string(), "%".to_string())
        );
        assert_eq!(
            account("app@10.0.%", "%").unwrap(),
            ("app".to_string(), "10.0.%".to_string())
        );
        assert_eq!(
            account("a@b@localhost", "%").unwrap(),
            ("a@b".to_string(), "localhost".to_string())
        );
        assert!(account("", "%").is_err());
        assert!(account("@h", "%").is_err());
        assert!(account("u@", "%").is_err());
        assert!(account("u\\", "%").is_err());
    }

    #[test]
    fn native_hash_matches_the_server_function() {
        // SELECT PASSWORD('password') on MariaDB / MySQL 5.7.
        assert_eq!(
            native_hash(&Secret::new("password".into())),
            "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19"
        );
    }

    #[test]
    fn server_flavour_from_version() {
        let mdb = Server::from_version("10.11.19-MariaDB-0+deb12u1");
        assert!(mdb.mariadb && !mdb.dual_passwords);
        assert!(Server::from_version("8.0.14").dual_passwords);
        assert!(Server::from_version("8.4.0-commercial").dual_passwords);
        assert!(!Server::from_version("8.0.13").dual_passwords);
        assert!(!Server::from_version("5.7.44-log").dual_passwords);
    }

    struct Fixture {
        server: MariaDbServer,
        /// What the targets of [`Fixture::options`] use.
        tls: Tls,
    }

    /// `tls = "require"` trusting `ca`, verifying `server_name` (else the host).
    fn require(ca: &std::path::Path, server_name: Option<&str>) -> Tls {
        Tls::Require(TlsRequire::new(Some(ca), server_name).unwrap())
    }

    impl Fixture {
        async fn new() -> Fixture {
            Self::start(false).await
        }

        /// A server that requires TLS on TCP; targets trust its CA.
        async fn tls() -> Fixture {
            Self::start(true).await
        }

        async fn start(tls: bool) -> Fixture {
            let server = tokio::task::spawn_blocking(move || match tls {
                true => MariaDbServer::start_tls(),
                false => MariaDbServer::start(),
            })
            .await
            .unwrap();
            let tls = match server.ca_file() {
                Some(ca) => require(ca, None),
                None => Tls::Disable,
            };
            Fixture { server, tls }
        }

        fn options(&self, logins: Logins) -> MysqlOptions {
            MysqlOptions {
                admin: Admin {
                    host: "127.0.0.1".into(),
                    port: self.server.port(),
                    user: ADMIN_USER.into(),
                    password: Some(Secret::new(self.server.password().into())),
                    tls: self.tls.clone(),
                    connections: 2,
                },
                account_host: "%".into(),
                logins,
                policy: SecretPolicy::default(),
            }
        }

        async fn target(&self, logins: Logins) -> Arc<MysqlTarget> {
            MysqlTarget::connect(self.options(logins)).await.unwrap()
        }

        /// Runs SQL with the `mariadb` client as the admin user.
        fn sql(&self, sql: &str) -> String {
            self.server
                .sql(sql)
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }

        fn create_user(&self, quoted_user: &str, password: &Secret) {
            self.sql(&format!(
                "CREATE USER {quoted_user}@'%' IDENTIFIED BY '{}'",
                password.expose()
            ));
        }

        fn users(&self) -> String {
            self.sql("SELECT User, Host, Priv FROM mysql.global_priv ORDER BY User, Host")
        }
    }

    fn unique(prefix: &str) -> String {
        keywave_harness::unique(prefix).replace('-', "_")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_password_and_alternating_users_against_real_mariadb() {
        let fx = Fixture::new().await;
        let p = SecretPolicy::default();
        let user = unique("kw_user");
        let (a, b, c) = (generate(&p), generate(&p), generate(&p));
        fx.create_user(&format!("'{user}'"), &a);

        let t = fx.target(Logins::default()).await;
        assert_eq!(
            t.server().await.unwrap(),
            Server {
                mariadb: true,
                dual_passwords: false
            }
        );
        assert_eq!(t.check(&user, &a).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Rejected);
        // MariaDB has no dual passwords: continuity is refused clearly.
        let err = t.add(&user, &b).await.unwrap_err();
        assert!(err.to_string().contains("alternating"), "{err}");
        t.replace(&user, &b).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&user, &a).await.unwrap(), AuthCheck::Rejected);
        // The server holds the hash computed on the worker.
        let stored = fx.sql(&format!(
            "SELECT JSON_VALUE(Priv, '$.authentication_string') FROM mysql.global_priv WHERE User = '{user}'"
        ));
        assert_eq!(stored, native_hash(&b));
        t.remove(&user, &a).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Accepted);
        t.remove(&user, &b).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Rejected);
        // The admin is never rotated; an unknown user is not created.
        assert!(matches!(
            t.replace(ADMIN_USER, &c).await,
            Err(TargetError::Rejected(_))
        ));
        let ghost = unique("kw_ghost");
        assert!(matches!(
            t.replace(&ghost, &c).await,
            Err(TargetError::Rejected(_))
        ));
        assert!(!fx.users().contains(&ghost));

        // Alternating users.
        let app = unique("kw_app");
        let clone = format!("{app}_clone");
        fx.create_user(&format!("'{app}'"), &a);
        fx.create_user(&format!("'{clone}'"), &c);
        fx.sql(&format!("ALTER USER '{clone}'@'%' ACCOUNT LOCK"));
        let t = fx
            .target(Logins {
                continuity: Continuity::Alternating,
                ..Logins::default()
            })
            .await;
        let next = generate(&p);
        t.add(&app, &next).await.unwrap();
        assert_eq!(
            t.active_login(&app, &next).await.unwrap(),
            Some(clone.clone())
        );
        assert_eq!(t.check(&app, &a).await.unwrap(), AuthCheck::Accepted);
        t.remove(&app, &a).await.unwrap();
        t.remove(&app, &a).await.unwrap();
        assert_eq!(t.check(&app, &a).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(t.check(&app, &next).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.unlocked([&app, &clone]).await.unwrap(), [false, true]);
        // The clone's old password was never revealed, and stays dead.
        assert_eq!(t.login(&clone, &c).await.unwrap(), AuthCheck::Rejected);

        let third = generate(&p);
        t.add(&app, &third).await.unwrap();
        assert_eq!(
            t.active_login(&app, &third).await.unwrap(),
            Some(app.clone())
        );
        t.remove(&app, &next).await.unwrap();

        // Containment moves to the other login, locking this one first; a
        // repeated replace leaves it where it is.
        let fourth = generate(&p);
        t.replace(&app, &fourth).await.unwrap();
        assert_eq!(t.check(&app, &third).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(
            t.active_login(&app, &fourth).await.unwrap(),
            Some(clone.clone())
        );
        t.replace(&app, &fourth).await.unwrap();
        assert_eq!(
            t.active_login(&app, &fourth).await.unwrap(),
            Some(clone.clone())
        );
        assert_eq!(t.unlocked([&app, &clone]).await.unwrap(), [false, true]);

        // Both unlocked: add refuses instead of guessing.
        fx.sql(&format!("ALTER USER '{app}'@'%' ACCOUNT UNLOCK"));
        assert!(matches!(
            t.add(&app, &generate(&p)).await,
            Err(TargetError::Rejected(_))
        ));
        let t2 = fx
            .target(Logins {
                alternating: BTreeMap::from([(user.clone(), unique("kw_missing"))]),
                ..Logins::default()
            })
            .await;
        let err = t2.add(&user, &next).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        for u in [&user, &app, &clone] {
            fx.sql(&format!("DROP USER '{u}'@'%'"));
        }

        // tls = "require" against a server without TLS: refused, never
        // plain text.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = Tls::Require(TlsRequire::new(None, None).unwrap());
        let err = MysqlTarget::connect(opts).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::TargetUnreachable, "{err:?}");
        assert!(err.to_string().contains("does not offer TLS"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_user_names_change_nothing_else() {
        let fx = Fixture::new().await;
        let p = SecretPolicy {
            length: 64,
            charset: keywave_common::crypto::Charset::AlphanumericSymbols,
        };
        fx.sql("CREATE DATABASE canary; CREATE TABLE canary.t (v TEXT); INSERT INTO canary.t VALUES ('alive')");
        // (principal, the same user quoted for the mariadb client)
        let hostile = [
            ("o'brien", "'o''brien'"),
            (
                "x\"; DROP ROLE postgres; --",
                "'x\"; DROP ROLE postgres; --'",
            ),
            (
                "x'; DROP DATABASE canary; --",
                "'x''; DROP DATABASE canary; --'",
            ),
            ("`; DROP USER keywave; `", "'`; DROP USER keywave; `'"),
        ];
        for (_, quoted) in &hostile {
            fx.create_user(quoted, &generate(&p));
        }
        // A backslash name exists but is refused, not mangled.
        fx.create_user("'back\\\\slash'", &generate(&p));
        let before = fx.users();
        let t = fx.target(Logins::default()).await;
        for (name, _) in &hostile {
            let s = generate(&p);
            t.replace(name, &s).await.unwrap();
            assert_eq!(
                t.check(name, &s).await.unwrap(),
                AuthCheck::Accepted,
                "{name}"
            );
        }
        let err = t.replace("back\\slash", &generate(&p)).await.unwrap_err();
        assert!(matches!(err, TargetError::Rejected(_)), "{err:?}");
        // Only the authentication strings changed: same accounts.
        let names = |s: &str| -> Vec<String> {
            s.lines()
                .map(|l| l.split('\t').take(2).collect::<Vec<_>>().join("@"))
                .collect()
        };
        assert_eq!(names(&fx.users()), names(&before));
        assert_eq!(fx.sql("SELECT v FROM canary.t"), "alive");
        assert!(fx.server.sql("SELECT 1").is_ok(), "admin still logs in");
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable() {
        let opts = MysqlOptions {
            admin: Admin {
                host: "127.0.0.1".into(),
                port: 1,
                user: "keywave".into(),
                password: None,
                tls: Tls::Disable,
                connections: 1,
            },
            account_host: "%".into(),
            logins: Logins::default(),
            policy: SecretPolicy::default(),
        };
        let s = generate(&SecretPolicy::default());
        let t = MysqlTarget::new(opts.clone()).unwrap();
        assert!(matches!(
            t.check("app", &s).await,
            Err(TargetError::Unreachable(_))
        ));
        assert!(matches!(
            t.replace("app", &s).await,
            Err(TargetError::Unreachable(_))
        ));
        // With TLS too: the handshake never starts.
        let mut tls = opts;
        tls.admin.tls = Tls::Require(TlsRequire::new(None, None).unwrap());
        let t = MysqlTarget::new(tls).unwrap();
        assert!(matches!(
            t.check("app", &s).await,
            Err(TargetError::Unreachable(_))
        ));
    }

    /// Every secret of a test, to prove none reaches an error.
    fn leaks(err: &TargetError, secrets: &[&str]) -> bool {
        let text = format!("{err} {err:?}");
        secrets.iter().any(|s| text.contains(s))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_require_rotates_and_verifies_against_real_mariadb() {
        let fx = Fixture::tls().await;
        let p = SecretPolicy::default();
        let user = unique("kw_tls");
        let (a, b) = (generate(&p), generate(&p));
        fx.create_user(&format!("'{user}'"), &a);

        // Admin pool and login checks over verified TLS: the new secret logs
        // in, the old one is refused by the server (not by TLS).
        let t = fx.target(Logins::default()).await;
        assert_eq!(t.check(&user, &a).await.unwrap(), AuthCheck::Accepted);
        t.replace(&user, &b).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&user, &a).await.unwrap(), AuthCheck::Rejected);
        t.remove(&user, &a).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Accepted);

        // The admin connection is encrypted (and could not be otherwise:
        // require_secure_transport).
        let mut c = t.admin().await.unwrap();
        let cipher: Option<(String, String)> = c
            .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            .await
            .unwrap();
        assert!(
            !cipher.unwrap().1.is_empty(),
            "admin connection without TLS"
        );
        drop(c);

        // Connecting by IP address and verifying another name the
        // certificate carries.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = require(fx.server.ca_file().unwrap(), Some("localhost"));
        let t = MysqlTarget::connect(opts).await.unwrap();
        assert_eq!(t.check(&user, &b).await.unwrap(), AuthCheck::Accepted);
        fx.sql(&format!("DROP USER '{user}'@'%'"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_misconfigurations_are_classified_and_secret_free_against_real_mariadb() {
        let fx = Fixture::tls().await;
        let p = SecretPolicy::default();
        let user = unique("kw_tls_bad");
        let (a, b) = (generate(&p), generate(&p));
        fx.create_user(&format!("'{user}'"), &a);
        let secrets = [a.expose(), b.expose(), fx.server.password()];

        // A CA that did not sign the server's certificate, the system trust
        // store (no ca_file), a name the certificate does not carry: the
        // worker cannot reach a server it trusts. Never Rejected: a failed
        // handshake proves nothing about a secret.
        let other = fx.server.dir().join("other-ca");
        std::fs::create_dir(&other).unwrap();
        let other_ca = keywave_harness::secure::TestPki::generate(&other).ca;
        let ca = fx.server.ca_file().unwrap();
        let cases = [
            (require(&other_ca, None), "not signed by a trusted CA"),
            (
                Tls::Require(TlsRequire::new(None, None).unwrap()),
                "not signed by a trusted CA",
            ),
            (
                require(ca, Some("db.example.com")),
                "not valid for \"db.example.com\"",
            ),
        ];
        for (tls, says) in cases {
            let mut opts = fx.options(Logins::default());
            opts.admin.tls = tls;
            let err = MysqlTarget::connect(opts.clone()).await.unwrap_err();
            assert!(matches!(err, TargetError::Unreachable(_)), "{err:?}");
            assert_eq!(err.class(), ErrorClass::TargetUnreachable);
            assert!(err.to_string().contains(says), "{err}");
            assert!(!leaks(&err, &secrets));
            let t = MysqlTarget::new(opts).unwrap();
            for e in [
                t.login(&user, &a).await.unwrap_err(),
                t.login(&user, &b).await.unwrap_err(),
                t.replace(&user, &b).await.unwrap_err(),
            ] {
                assert_eq!(e.class(), ErrorClass::TargetUnreachable, "{e:?}");
                assert!(!leaks(&e, &secrets));
            }
        }

        // Plain text against a server that requires secure transport: the
        // server refuses the admin login (MariaDB says "access denied"),
        // classified as the worker's configuration (target_auth, not
        // retried), with the hint; no operation runs.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = Tls::Disable;
        let err = MysqlTarget::connect(opts.clone()).await.unwrap_err();
        assert!(matches!(err, TargetError::Auth(_)), "{err:?}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains("set tls = \"require\""), "{err}");
        assert!(!leaks(&err, &secrets));
        let t = MysqlTarget::new(opts).unwrap();
        let err = t.replace(&user, &b).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::TargetAuth, "{err:?}");
        assert!(!leaks(&err, &secrets));
        // A login check cannot tell that refusal from a wrong password: the
        // new secret is refused too, so no rotation gets past its test.
        assert_eq!(t.login(&user, &a).await.unwrap(), AuthCheck::Rejected);

        // Nothing was changed by any of them.
        let good = fx.target(Logins::default()).await;
        assert_eq!(good.check(&user, &a).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(good.check(&user, &b).await.unwrap(), AuthCheck::Rejected);
        fx.sql(&format!("DROP USER '{user}'@'%'"));
    }
}
