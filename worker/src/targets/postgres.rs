//! PostgreSQL login roles as a target. A password is set with
//! `ALTER ROLE "<role>" PASSWORD 'SCRAM-SHA-256$…'`: the verifier is computed
//! on the worker, so the clear secret never reaches the server, its logs or
//! `pg_stat_statements`. `check` is a real login as the role (then
//! `SELECT 1`), exactly what an application does.
//!
//! PostgreSQL keeps one password per role, so continuity comes from the
//! endpoint's [`Logins`]: alternating users (the inactive login of a pair
//! takes the new secret; between rotations exactly one of the two has
//! `LOGIN`), an explicit overwrite, or a clear refusal.
//!
//! Role names are always quoted identifiers and the only literal is the
//! verifier (checked to hold nothing but base64, `$` and `:`); catalog
//! lookups bind their parameters. Admin statements share a bounded pool of
//! connections per endpoint.
//!
//! With `tls = "require"` every connection, the admin pool's and each login
//! check's, negotiates TLS (rustls, [`RustlsConnect`]) and verifies the
//! server's certificate and name, or fails; SCRAM then binds to the TLS
//! channel (`SCRAM-SHA-256-PLUS`, `tls-server-end-point`) where the
//! certificate's signature algorithm defines it.

use super::db::{
    describe, rustls_error, tls_failure, Admin, Logins, Scheme, Tls, TlsRequire, CONNECT_TIMEOUT,
};
use super::{AuthCheck, Target, TargetError};
use async_trait::async_trait;
use keywave_common::crypto::{Secret, SecretPolicy};
use keywave_common::wire::TargetKind;
use sha2::Digest;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_postgres::{Client, Config, NoTls, Socket};
use tokio_rustls::rustls::pki_types::ServerName;
use tracing::debug;

/// Longest role name PostgreSQL keeps (`NAMEDATALEN - 1` bytes). A longer
/// name would be truncated by the server, silently naming another role, so it
/// is refused instead.
pub const MAX_ROLE_NAME: usize = 63;

/// What the target accepts as a secret length.
pub const SECRET_LENGTHS: std::ops::RangeInclusive<usize> = 16..=512;

/// How to reach a PostgreSQL endpoint and what to rotate there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    pub admin: Admin,
    /// Database every connection opens (admin and login checks).
    pub dbname: String,
    pub logins: Logins,
    pub policy: SecretPolicy,
}

/// A PostgreSQL server whose login roles keywave rotates.
pub struct PostgresTarget {
    opts: PostgresOptions,
    pool: Pool,
}

impl std::fmt::Debug for PostgresTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresTarget")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

/// `"name"` with every `"` doubled, for a role name that is safe to send:
/// non-empty, no NUL, at most [`MAX_ROLE_NAME`] bytes.
pub fn quote_ident(name: &str) -> Result<String, TargetError> {
    if name.is_empty() {
        return Err(TargetError::Rejected("empty role name".into()));
    }
    if name.contains('\0') {
        return Err(TargetError::Rejected(
            "role name contains a NUL character".into(),
        ));
    }
    if name.len() > MAX_ROLE_NAME {
        return Err(TargetError::Rejected(format!(
            "role name is {} bytes long; PostgreSQL keeps {MAX_ROLE_NAME} and would rotate a truncated name",
            name.len()
        )));
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// The SCRAM-SHA-256 verifier of `secret` (random salt) as an SQL literal.
/// The verifier is base64 pieces joined by `$` and `:` behind the
/// `SCRAM-SHA-256$` prefix; anything else is refused rather than quoted.
pub fn verifier_literal(secret: &Secret) -> Result<String, TargetError> {
    let v = postgres_protocol::password::scram_sha_256(secret.expose().as_bytes());
    let body = v.strip_prefix("SCRAM-SHA-256$").ok_or_else(|| {
        TargetError::Internal("SCRAM verifier without its SCRAM-SHA-256$ prefix".into())
    })?;
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '$' | ':');
    if !body.chars().all(ok) {
        return Err(TargetError::Internal(
            "SCRAM verifier holds a character outside base64, '$' and ':'".into(),
        ));
    }
    Ok(format!("'{v}'"))
}

/// Whether an SQLSTATE says "busy, try again later": 40 (transaction
/// rollback: serialization, deadlock), 53 (insufficient resources: too many
/// connections), 58 (system error).
fn transient_state(code: &str) -> bool {
    ["40", "53", "58"].iter().any(|c| code.starts_with(c))
}

/// Whether an SQLSTATE says the server cannot be reached: 08 (connection
/// exception), 57 (operator intervention: shutting down, cannot connect
/// now) but 57014 (a cancelled statement, a timeout).
fn unreachable_state(code: &str) -> bool {
    code.starts_with("08") || (code.starts_with("57") && code != "57014")
}

/// Whether a driver error without SQLSTATE is a timeout.
fn is_timeout(e: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        source = s.source();
    }
    e.to_string().starts_with("timeout")
}

/// A driver error with its causes ("error connecting to server: Connection
/// refused"): the driver's own text names only the kind.
fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// Maps an SQLSTATE and its message to a secret-free [`TargetError`].
fn classify_state(code: &str, message: &str, secrets: &[&Secret]) -> TargetError {
    let text = format!("{} ({code})", describe(message, secrets));
    if unreachable_state(code) {
        TargetError::Unreachable(text)
    } else if code == "57014" {
        TargetError::Timeout(text)
    } else if transient_state(code)
        // Two sessions updating the same catalog row at once (a redelivered
        // task racing its first delivery): the statement is idempotent.
        || (code == "XX000" && message.contains("concurrently updated"))
    {
        TargetError::Unavailable(text)
    } else if code == "42501" {
        TargetError::Permission(text)
    } else if code.starts_with("28") {
        TargetError::Auth(text)
    } else {
        TargetError::Rejected(text)
    }
}

/// Maps a driver error of an admin statement to a secret-free
/// [`TargetError`]; `secrets` are redacted from the text.
fn classify(e: &tokio_postgres::Error, secrets: &[&Secret]) -> TargetError {
    match e.as_db_error() {
        Some(db) => classify_state(db.code().code(), db.message(), secrets),
        // No SQLSTATE: refused or dropped connection, timeout, I/O.
        None if is_timeout(e) => TargetError::Timeout(describe(&chain(e), secrets)),
        None => TargetError::Unreachable(describe(&chain(e), secrets)),
    }
}

/// A bounded pool of admin connections: at most `size` open at once, idle
/// ones reused, broken ones dropped.
struct Pool {
    config: Config,
    tls: Tls,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

/// An admin connection on loan from the [`Pool`].
struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                self.pool.idle().push(c);
            }
        }
    }
}

impl Pool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        // A poisoned lock only means another thread panicked while pushing.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get(&self) -> Result<Pooled<'_>, TargetError> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| TargetError::Internal("admin pool closed".into()))?;
        loop {
            let Some(c) = self.idle().pop() else { break };
            if !c.is_closed() {
                return Ok(Pooled {
                    pool: self,
                    client: Some(c),
                    _permit: permit,
                });
            }
        }
        let (client, _io) = connect(&self.config, &self.tls)
            .await
            .map_err(|e| match e {
                Login::Refused(why) => TargetError::Auth(format!("admin login refused: {why}")),
                Login::Failed(e) => e,
            })?;
        Ok(Pooled {
            pool: self,
            client: Some(client),
            _permit: permit,
        })
    }
}

/// Why a connection could not be opened.
enum Login {
    /// The server refused the credentials (SQLSTATE class 28).
    Refused(String),
    Failed(TargetError),
}

/// Opens a connection with `tls`; its I/O runs on a spawned task until the
/// client drops (the handle ends once the socket is closed).
async fn connect(
    config: &Config,
    tls: &Tls,
) -> Result<(Client, tokio::task::JoinHandle<()>), Login> {
    let connecting = async {
        match tls {
            Tls::Disable => config.connect(NoTls).await.map(|(c, io)| (c, spawn_io(io))),
            Tls::Require(t) => config
                .connect(RustlsConnect(t.clone()))
                .await
                .map(|(c, io)| (c, spawn_io(io))),
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(Login::Failed(TargetError::Timeout(format!(
            "connect timed out after {}s",
            CONNECT_TIMEOUT.as_secs()
        )))),
        Ok(Err(e)) => Err(connect_error(&e, tls)),
        Ok(Ok(pair)) => Ok(pair),
    }
}

/// Why a connection could not be opened, without secrets: a TLS failure
/// (`target_unreachable`, see [`tls_failure`]), a plain-text connection the
/// server refuses because it requires TLS (`target_auth`: fix the worker's
/// configuration; never a refused secret), refused credentials, or the
/// usual driver classes.
fn connect_error(e: &tokio_postgres::Error, tls: &Tls) -> Login {
    if let Some(r) = rustls_error(e) {
        return Login::Failed(tls_failure(r, tls));
    }
    match e.as_db_error() {
        // pg_hba.conf has only `hostssl` lines for this client: "no
        // pg_hba.conf entry for host ..., no encryption".
        Some(db)
            if db.code().code().starts_with("28")
                && matches!(tls, Tls::Disable)
                && db.message().ends_with("no encryption") =>
        {
            Login::Failed(TargetError::Auth(format!(
                "the server refuses connections without TLS: {} ({}); set tls = \"require\"",
                describe(db.message(), &[]),
                db.code().code()
            )))
        }
        Some(db) if db.code().code().starts_with("28") => Login::Refused(format!(
            "{} ({})",
            describe(db.message(), &[]),
            db.code().code()
        )),
        _ => Login::Failed(classify(e, &[])),
    }
}

/// Runs a connection's I/O until the client drops.
fn spawn_io<T>(connection: tokio_postgres::Connection<Socket, T>) -> tokio::task::JoinHandle<()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "PostgreSQL connection ended");
        }
    })
}

/// tokio-postgres over rustls: the endpoint's roots, its `server_name` or
/// else the host as the name to verify. Used with `sslmode=require`, so a
/// server without TLS is refused, never used in plain text.
#[derive(Clone)]
pub struct RustlsConnect(pub TlsRequire);

impl MakeTlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream<Socket>;
    type TlsConnect = RustlsHandshake;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsHandshake, std::io::Error> {
        let name = match self.0.server_name() {
            Some(n) => n.clone(),
            None => ServerName::try_from(host.to_string()).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "TLS: host {host:?} is not a DNS name or an IP address; set server_name"
                    ),
                )
            })?,
        };
        Ok(RustlsHandshake {
            connector: tokio_rustls::TlsConnector::from(self.0.client_config()),
            name,
        })
    }
}

/// One TLS handshake to a PostgreSQL server.
pub struct RustlsHandshake {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsHandshake
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
        })
    }
}

/// A TLS connection to a PostgreSQL server.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929): the server certificate's hash,
    /// with the hash of its signature algorithm (SHA-256 for MD5 and SHA-1).
    /// None for algorithms without one (RSA-PSS, EdDSA): SCRAM then runs
    /// without channel binding, as libpq does.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        match session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| tls_server_end_point(cert.as_ref()))
        {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

/// One DER item of `input`: (tag, contents, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, b| (l << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `tls-server-end-point` channel binding of a DER certificate, for the
/// signature algorithms that define one.
fn tls_server_end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    // 1.2.840.113549.1.1.x (PKCS #1) and 1.2.840.10045.4.x (ECDSA).
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    enum Hash {
        Sha256,
        Sha384,
        Sha512,
    }
    let (SEQUENCE, certificate, _) = der_item(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der_item(certificate)? else {
        return None;
    };
    let (SEQUENCE, algorithm, _) = der_item(rest)? else {
        return None;
    };
    let (OID, oid, _) = der_item(algorithm)? else {
        return None;
    };
    let hash = if let Some(arc) = oid.strip_prefix(PKCS1) {
        match arc {
            // md5WithRSA, sha1WithRSA, sha256WithRSA
            [0x04] | [0x05] | [0x0b] => Hash::Sha256,
            [0x0c] => Hash::Sha384,
            [0x0d] => Hash::Sha512,
            _ => return None,
        }
    } else if let Some(arc) = oid.strip_prefix(ECDSA) {
        match arc {
            // ecdsa-with-SHA1, ecdsa-with-SHA256
            [0x01] | [0x03, 0x02] => Hash::Sha256,
            [0x03, 0x03] => Hash::Sha384,
            [0x03, 0x04] => Hash::Sha512,
            _ => return None,
        }
    } else {
        return None;
    };
    Some(match hash {
        Hash::Sha256 => sha2::Sha256::digest(cert).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(cert).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// How long a login check waits for its connection to close (Terminate
/// sent, socket shut) before it gives its endpoint permit back, so the
/// server's connection count stays within the documented bound.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl PostgresTarget {
    /// A target that connects on first use (for a worker that starts while
    /// the server is down).
    pub fn new(opts: PostgresOptions) -> Result<Arc<Self>, TargetError> {
        let mut config = base_config(&opts);
        config.user(&opts.admin.user);
        config.application_name("keywave-admin");
        if let Some(p) = &opts.admin.password {
            config.password(p.expose());
        }
        let size = opts.admin.connections.max(1);
        let tls = opts.admin.tls.clone();
        Ok(Arc::new(PostgresTarget {
            opts,
            pool: Pool {
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(size),
            },
        }))
    }

    /// [`PostgresTarget::new`], then an admin connection to prove the
    /// address and admin login work.
    pub async fn connect(opts: PostgresOptions) -> Result<Arc<Self>, TargetError> {
        let t = Self::new(opts)?;
        let c = t.pool.get().await?;
        c.simple_query("SELECT 1")
            .await
            .map_err(|e| classify(&e, &[]))?;
        drop(c);
        Ok(t)
    }

    pub fn options(&self) -> &PostgresOptions {
        &self.opts
    }

    /// The logins a task on `principal` may change, validated: quotable and
    /// never the admin login.
    fn scheme(&self, principal: &str) -> Result<Scheme, TargetError> {
        let scheme = self.opts.logins.scheme(principal, false);
        let logins: Vec<&str> = match &scheme {
            Scheme::Alternating { primary, clone } => vec![primary, clone],
            _ => vec![principal],
        };
        for l in logins {
            quote_ident(l)?;
            if l == self.opts.admin.user {
                return Err(TargetError::Rejected(format!(
                    "{l:?} is the endpoint's admin login; keywave never rotates it"
                )));
            }
        }
        Ok(scheme)
    }

    /// Runs admin statements (one implicit transaction when there are
    /// several), redacting `secrets` from errors.
    async fn exec(&self, sql: &str, secrets: &[&Secret]) -> Result<(), TargetError> {
        let c = self.pool.get().await?;
        c.batch_execute(sql)
            .await
            .map_err(|e| classify(&e, secrets))
    }

    /// `ALTER ROLE <role> [LOGIN] PASSWORD '<verifier>'`.
    fn set_sql(role: &str, secret: &Secret, login: bool) -> Result<String, TargetError> {
        Ok(format!(
            "ALTER ROLE {}{} PASSWORD {}",
            quote_ident(role)?,
            if login { " LOGIN" } else { "" },
            verifier_literal(secret)?
        ))
    }

    /// `ALTER ROLE <role> NOLOGIN PASSWORD NULL`: no secret opens it.
    fn deactivate_sql(role: &str) -> Result<String, TargetError> {
        Ok(format!(
            "ALTER ROLE {} NOLOGIN PASSWORD NULL",
            quote_ident(role)?
        ))
    }

    /// Whether each of `roles` has `LOGIN`; a missing role is an error.
    async fn can_login(&self, roles: [&str; 2]) -> Result<[bool; 2], TargetError> {
        let c = self.pool.get().await?;
        let names: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let rows = c
            .query(
                "SELECT rolname, rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = ANY($1)",
                &[&names],
            )
            .await
            .map_err(|e| classify(&e, &[]))?;
        let mut out = [false; 2];
        for (i, role) in roles.iter().enumerate() {
            let row = rows
                .iter()
                .find(|r| r.get::<_, &str>(0) == *role)
                .ok_or_else(|| {
                    TargetError::Rejected(format!(
                        "alternating users: role {role:?} does not exist (create both logins of the pair)"
                    ))
                })?;
            out[i] = row.get(1);
        }
        Ok(out)
    }

    /// One real login as `role` with `secret`, then `SELECT 1`.
    pub async fn login(&self, role: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        quote_ident(role)?;
        let mut config = base_config(&self.opts);
        config
            .user(role)
            .password(secret.expose())
            .application_name("keywave-check");
        let (client, io) = match connect(&config, &self.opts.admin.tls).await {
            Ok(c) => c,
            // 28P01 (wrong password, unknown role) and 28000 (no LOGIN, no
            // pg_hba entry): the secret does not open this role.
            Err(Login::Refused(_)) => return Ok(AuthCheck::Rejected),
            Err(Login::Failed(e)) => return Err(redacted(e, secret)),
        };
        let r = client.simple_query("SELECT 1").await;
        // Close the connection before returning: the caller's endpoint
        // permit is what bounds the login connections open at once.
        drop(client);
        let _ = tokio::time::timeout(CLOSE_WAIT, io).await;
        match r {
            Ok(_) => Ok(AuthCheck::Accepted),
            Err(e) => Err(classify(&e, &[secret])),
        }
    }

    /// Which login of `principal`'s scheme `secret` opens, if any: the role
    /// itself, or for alternating users either login of the pair.
    pub async fn active_login(
        &self,
        principal: &str,
        secret: &Secret,
    ) -> Result<Option<String>, TargetError> {
        let logins = match self.scheme(principal)? {
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

fn base_config(opts: &PostgresOptions) -> Config {
    let mut c = Config::new();
    c.host(&opts.admin.host)
        .port(opts.admin.port)
        .dbname(&opts.dbname)
        .ssl_mode(match opts.admin.tls {
            Tls::Disable => SslMode::Disable,
            // TLS or no connection; the connector verifies the certificate.
            Tls::Require(_) => SslMode::Require,
        })
        .connect_timeout(CONNECT_TIMEOUT);
    c
}

fn redacted(e: TargetError, secret: &Secret) -> TargetError {
    e.map_detail(|t| describe(t, &[secret]))
}

#[async_trait]
impl Target for PostgresTarget {
    fn kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn policy(&self) -> SecretPolicy {
        self.opts.policy
    }

    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal)? {
            Scheme::Refuse | Scheme::Dual => Err(TargetError::Rejected(format!(
                "PostgreSQL keeps one password per role, so a continuity rotation of {principal:?} \
                 needs alternating users (an `alternating` entry or continuity = \"alternating\") \
                 or continuity = \"overwrite\"; or rotate it with containment"
            ))),
            Scheme::Overwrite => {
                self.exec(&Self::set_sql(principal, new, false)?, &[new])
                    .await
            }
            Scheme::Alternating { primary, clone } => {
                let active = self.can_login([&primary, &clone]).await?;
                // An active login that `new` already opens: an earlier
                // delivery of this task set it (and the rotation may have
                // moved on since). Setting the other one now would leave two
                // logins with the same secret.
                for (login, on) in [(&primary, active[0]), (&clone, active[1])] {
                    if on && self.login(login, new).await? == AuthCheck::Accepted {
                        return Ok(());
                    }
                }
                // The inactive login takes the new secret; the primary when
                // neither is active.
                let inactive = match active {
                    [true, false] => clone,
                    [false, true] | [false, false] => primary,
                    [true, true] => {
                        return Err(TargetError::Rejected(format!(
                            "alternating users: both {primary:?} and {clone:?} can log in, so keywave cannot tell which one is in use; \
                             give the unused one NOLOGIN (ALTER ROLE ... NOLOGIN PASSWORD NULL)"
                        )))
                    }
                };
                self.exec(&Self::set_sql(&inactive, new, true)?, &[new])
                    .await
            }
        }
    }

    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal)? {
            Scheme::Refuse | Scheme::Dual | Scheme::Overwrite => {
                self.exec(&Self::set_sql(principal, new, false)?, &[new])
                    .await
            }
            Scheme::Alternating { primary, clone } => {
                // Keep the login that already has `new` (a redelivery, or the
                // revoke step after `add`), else take the inactive one; the
                // other login is switched off in the same transaction.
                let (target, other) = match self.active_login(principal, new).await? {
                    Some(l) if l == primary => (primary.as_str(), clone.as_str()),
                    Some(_) => (clone.as_str(), primary.as_str()),
                    None => match self.can_login([&primary, &clone]).await? {
                        [true, false] => (clone.as_str(), primary.as_str()),
                        _ => (primary.as_str(), clone.as_str()),
                    },
                };
                let sql = format!(
                    "{}; {}",
                    Self::deactivate_sql(other)?,
                    Self::set_sql(target, new, true)?
                );
                self.exec(&sql, &[new]).await
            }
        }
    }

    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        match self.scheme(principal)? {
            // One password: `old` is invalid unless it is the password.
            Scheme::Refuse | Scheme::Dual | Scheme::Overwrite => {
                if self.login(principal, old).await? == AuthCheck::Accepted {
                    let sql = format!("ALTER ROLE {} PASSWORD NULL", quote_ident(principal)?);
                    self.exec(&sql, &[old]).await?;
                }
                Ok(())
            }
            Scheme::Alternating { primary, clone } => {
                for role in [&primary, &clone] {
                    if self.login(role, old).await? == AuthCheck::Accepted {
                        self.exec(&Self::deactivate_sql(role)?, &[old]).await?;
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

    /// The roles with `LOGIN` (`pg_roles.rolcanlogin`), built-in `pg_*`
    /// roles aside; `rolsuper`, `rolreplication`, `rolbypassrls` and the
    /// admin login are privileged. Alternating pairs fold into their primary.
    async fn discover(&self) -> Result<Vec<super::Login>, TargetError> {
        let c = self.pool.get().await?;
        // No parameter to bind: the statement is constant. The name pattern
        // is applied by the caller, never spliced into SQL.
        let rows = c
            .query(
                "SELECT rolname, rolsuper, rolreplication, rolbypassrls \
                 FROM pg_catalog.pg_roles WHERE rolcanlogin AND rolname NOT LIKE $1 \
                 ORDER BY rolname",
                &[&"pg\\_%"],
            )
            .await
            .map_err(|e| classify(&e, &[]))?;
        let mut found: Vec<super::Login> = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let mut privileged = Vec::new();
                if r.get::<_, bool>(1) {
                    privileged.push("superuser".to_string());
                }
                if r.get::<_, bool>(2) {
                    privileged.push("replication".to_string());
                }
                if r.get::<_, bool>(3) {
                    privileged.push("bypassrls".to_string());
                }
                if name == self.opts.admin.user {
                    privileged.push("the endpoint's admin login".to_string());
                }
                super::Login {
                    principal: name,
                    privileged,
                    never: None,
                }
            })
            .collect();
        super::fold_alternating(&self.opts.logins, &mut found);
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::db::Continuity;
    use keywave_common::crypto::generate;
    use keywave_common::wire::ErrorClass;
    use keywave_harness::PostgresServer;
    use postgres_protocol::escape::escape_identifier;
    use std::collections::BTreeMap;

    #[test]
    fn identifiers_are_quoted_with_doubled_quotes() {
        assert_eq!(quote_ident("app").unwrap(), "\"app\"");
        assert_eq!(
            quote_ident("x\"; DROP ROLE postgres; --").unwrap(),
            "\"x\"\"; DROP ROLE postgres; --\""
        );
        assert_eq!(quote_ident("o'brien").unwrap(), "\"o'brien\"");
        assert_eq!(quote_ident("\"").unwrap(), "\"\"\"\"");
        assert_eq!(quote_ident("Ünïcødé").unwrap(), "\"Ünïcødé\"");
        // The same as libpq's PQescapeIdentifier for everything we accept.
        for name in [
            "a",
            "x\"; DROP ROLE postgres; --",
            "o'brien",
            "\\",
            "a b\tc",
        ] {
            assert_eq!(quote_ident(name).unwrap(), escape_identifier(name));
        }
        assert!(matches!(quote_ident(""), Err(TargetError::Rejected(_))));
        assert!(matches!(quote_ident("a\0b"), Err(TargetError::Rejected(_))));
        assert!(quote_ident(&"r".repeat(63)).is_ok());
        assert!(matches!(
            quote_ident(&"r".repeat(64)),
            Err(TargetError::Rejected(_))
        ));
        // 32 two-byte characters = 64 bytes: over the limit.
        assert!(quote_ident(&"é".repeat(32)).is_err());
    }

    #[test]
    fn sqlstates_are_classified() {
        let c = |code: &str, msg: &str| classify_state(code, msg, &[]).class();
        assert_eq!(
            c(
                "57P01",
                "terminating connection due to administrator command"
            ),
            ErrorClass::TargetUnreachable
        );
        assert_eq!(
            c("57P03", "the database system is shutting down"),
            ErrorClass::TargetUnreachable
        );
        assert_eq!(
            c("08006", "connection failure"),
            ErrorClass::TargetUnreachable
        );
        assert_eq!(
            c("57014", "canceling statement due to statement timeout"),
            ErrorClass::TargetTimeout
        );
        assert_eq!(
            c("53300", "too many connections"),
            ErrorClass::TargetUnavailable
        );
        assert_eq!(
            c("40P01", "deadlock detected"),
            ErrorClass::TargetUnavailable
        );
        assert_eq!(
            c("XX000", "tuple concurrently updated"),
            ErrorClass::TargetUnavailable
        );
        assert_eq!(
            c("XX000", "cache lookup failed"),
            ErrorClass::TargetRejected
        );
        assert_eq!(
            c("42501", "permission denied to alter role"),
            ErrorClass::TargetPermission
        );
        assert_eq!(
            c("28P01", "password authentication failed"),
            ErrorClass::TargetAuth
        );
        assert_eq!(
            c("42704", "role \"x\" does not exist"),
            ErrorClass::TargetRejected
        );
        assert!(classify_state("XX000", "tuple concurrently updated", &[]).is_transient());
    }

    #[test]
    fn verifier_is_a_safe_literal_never_the_secret() {
        let s = generate(&SecretPolicy::default());
        let lit = verifier_literal(&s).unwrap();
        assert!(lit.starts_with("'SCRAM-SHA-256$4096:"), "{lit}");
        assert!(lit.ends_with('\''));
        assert!(!lit.contains(s.expose()));
        assert_eq!(lit.matches('\'').count(), 2);
        // A fresh salt every time.
        assert_ne!(lit, verifier_literal(&s).unwrap());
    }

    /// A private server, a target on it and a helper to run admin SQL.
    struct Fixture {
        server: PostgresServer,
        admin: Client,
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

        /// A server that takes TCP connections over TLS only; targets trust its CA.
        async fn tls() -> Fixture {
            Self::start(true).await
        }

        async fn start(tls: bool) -> Fixture {
            let server = tokio::task::spawn_blocking(move || match tls {
                true => PostgresServer::start_tls(),
                false => PostgresServer::start(),
            })
            .await
            .unwrap();
            let tls = match server.ca_file() {
                Some(ca) => require(ca, None),
                None => Tls::Disable,
            };
            let mut c = Config::new();
            c.host("127.0.0.1")
                .port(server.port())
                .user("postgres")
                .password(server.password())
                .dbname("postgres")
                .ssl_mode(match tls {
                    Tls::Disable => SslMode::Disable,
                    Tls::Require(_) => SslMode::Require,
                });
            let admin = match connect(&c, &tls).await {
                Ok((c, _)) => c,
                Err(_) => panic!("admin connection"),
            };
            Fixture { server, admin, tls }
        }

        fn options(&self, logins: Logins) -> PostgresOptions {
            PostgresOptions {
                admin: Admin {
                    host: "127.0.0.1".into(),
                    port: self.server.port(),
                    user: "postgres".into(),
                    password: Some(Secret::new(self.server.password().into())),
                    tls: self.tls.clone(),
                    connections: 2,
                },
                dbname: "postgres".into(),
                logins,
                policy: SecretPolicy::default(),
            }
        }

        async fn target(&self, logins: Logins) -> Arc<PostgresTarget> {
            PostgresTarget::connect(self.options(logins)).await.unwrap()
        }

        /// Creates a login role with `password` (quoted by libpq's rules,
        /// independently of the code under test).
        async fn create_role(&self, name: &str, password: Option<&Secret>, login: bool) {
            let pw = match password {
                Some(p) => format!(" PASSWORD '{}'", p.expose()),
                None => String::new(),
            };
            let sql = format!(
                "CREATE ROLE {} {}{pw}",
                escape_identifier(name),
                if login { "LOGIN" } else { "NOLOGIN" }
            );
            self.admin.batch_execute(&sql).await.unwrap();
        }

        async fn roles(&self) -> Vec<String> {
            self.admin
                .query("SELECT rolname FROM pg_roles ORDER BY rolname", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        }
    }

    fn unique(prefix: &str) -> String {
        keywave_harness::unique(prefix).replace('-', "_")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_password_roles_against_real_postgres() {
        let fx = Fixture::new().await;
        let policy = SecretPolicy::default();
        let role = unique("kw_role");
        let (a, b, c) = (generate(&policy), generate(&policy), generate(&policy));
        fx.create_role(&role, Some(&a), true).await;

        // Default continuity: containment works, continuity is refused clearly.
        let t = fx.target(Logins::default()).await;
        assert_eq!(t.check(&role, &a).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Rejected);
        let err = t.add(&role, &b).await.unwrap_err();
        assert!(matches!(err, TargetError::Rejected(_)), "{err:?}");
        assert!(err.to_string().contains("alternating"), "{err}");
        assert_eq!(t.check(&role, &a).await.unwrap(), AuthCheck::Accepted);

        t.replace(&role, &b).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&role, &a).await.unwrap(), AuthCheck::Rejected);
        // The server stored a SCRAM verifier, never the clear secret.
        let stored: String = fx
            .admin
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        assert!(stored.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!stored.contains(b.expose()));

        // remove is idempotent and only touches a password it is given.
        t.remove(&role, &a).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Accepted);
        t.remove(&role, &b).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Rejected);

        // Overwrite: add sets the one password.
        let t = fx
            .target(Logins {
                continuity: Continuity::Overwrite,
                ..Logins::default()
            })
            .await;
        t.add(&role, &c).await.unwrap();
        assert_eq!(t.check(&role, &c).await.unwrap(), AuthCheck::Accepted);

        // Unknown role: rejected, not created.
        let ghost = unique("kw_ghost");
        assert!(matches!(
            t.replace(&ghost, &a).await,
            Err(TargetError::Rejected(_))
        ));
        assert_eq!(t.check(&ghost, &a).await.unwrap(), AuthCheck::Rejected);
        assert!(!fx.roles().await.contains(&ghost));

        // The admin login itself is never rotated.
        assert!(matches!(
            t.replace("postgres", &a).await,
            Err(TargetError::Rejected(_))
        ));
        fx.admin
            .batch_execute(&format!("DROP ROLE {}", escape_identifier(&role)))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn alternating_users_against_real_postgres() {
        let fx = Fixture::new().await;
        let policy = SecretPolicy::default();
        let app = unique("kw_app");
        let clone = format!("{app}_b");
        let today = generate(&policy);
        fx.create_role(&app, Some(&today), true).await;
        fx.create_role(&clone, None, false).await;
        let t = fx
            .target(Logins {
                alternating: BTreeMap::from([(app.clone(), clone.clone())]),
                ..Logins::default()
            })
            .await;
        assert_eq!(
            t.active_login(&app, &today).await.unwrap(),
            Some(app.clone())
        );

        // Continuity: add puts the new secret on the inactive login, both work
        // until the old one is removed.
        let next = generate(&policy);
        t.add(&app, &next).await.unwrap();
        assert_eq!(
            t.active_login(&app, &next).await.unwrap(),
            Some(clone.clone())
        );
        // What a consumer is told to connect as.
        assert_eq!(t.placement(&app, &next).await.unwrap(), Some(clone.clone()));
        assert_eq!(t.placement(&app, &today).await.unwrap(), Some(app.clone()));
        assert_eq!(t.check(&app, &today).await.unwrap(), AuthCheck::Accepted);
        t.remove(&app, &today).await.unwrap();
        t.remove(&app, &today).await.unwrap();
        assert_eq!(t.check(&app, &today).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(t.check(&app, &next).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.can_login([&app, &clone]).await.unwrap(), [false, true]);

        // The next rotation alternates back.
        let third = generate(&policy);
        t.add(&app, &third).await.unwrap();
        assert_eq!(
            t.active_login(&app, &third).await.unwrap(),
            Some(app.clone())
        );
        t.remove(&app, &next).await.unwrap();

        // Containment moves to the other login and switches this one off at
        // once; a repeated replace keeps it where it is.
        let fourth = generate(&policy);
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
        assert_eq!(t.can_login([&app, &clone]).await.unwrap(), [false, true]);

        // Both logins active: add refuses instead of guessing.
        fx.admin
            .batch_execute(&format!("ALTER ROLE {} LOGIN", escape_identifier(&app)))
            .await
            .unwrap();
        assert!(matches!(
            t.add(&app, &generate(&policy)).await,
            Err(TargetError::Rejected(_))
        ));
        // A missing clone is a clear error.
        let lonely = unique("kw_lonely");
        fx.create_role(&lonely, Some(&today), true).await;
        let t2 = fx
            .target(Logins {
                continuity: Continuity::Alternating,
                ..Logins::default()
            })
            .await;
        let err = t2.add(&lonely, &next).await.unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        for r in [&app, &clone, &lonely] {
            fx.admin
                .batch_execute(&format!("DROP ROLE {}", escape_identifier(r)))
                .await
                .unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_role_names_change_nothing_else() {
        let fx = Fixture::new().await;
        let policy = SecretPolicy {
            length: 64,
            charset: keywave_common::crypto::Charset::AlphanumericSymbols,
        };
        fx.admin
            .batch_execute("CREATE TABLE canary (v text); INSERT INTO canary VALUES ('alive')")
            .await
            .unwrap();
        let hostile = [
            "x\"; DROP ROLE postgres; --".to_string(),
            "o'brien".to_string(),
            "x'; DROP TABLE canary; --".to_string(),
            "\"".to_string(),
            "a\\b".to_string(),
            "$$; DROP TABLE canary; $$".to_string(),
        ];
        for name in &hostile {
            fx.create_role(name, Some(&generate(&policy)), true).await;
        }
        let before = fx.roles().await;
        let t = fx.target(Logins::default()).await;
        for name in &hostile {
            let s = generate(&policy);
            t.replace(name, &s).await.unwrap();
            assert_eq!(
                t.check(name, &s).await.unwrap(),
                AuthCheck::Accepted,
                "{name}"
            );
        }
        // Names the server would truncate or cannot carry are refused.
        for bad in ["r".repeat(64), "a\0b".to_string(), String::new()] {
            assert!(matches!(
                t.replace(&bad, &generate(&policy)).await,
                Err(TargetError::Rejected(_))
            ));
        }
        assert_eq!(fx.roles().await, before);
        let canary: String = fx
            .admin
            .query_one("SELECT v FROM canary", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(canary, "alive");
        // The superuser still logs in with its own password.
        assert!(fx.server.psql("SELECT 1").is_ok());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_errors_are_classified_auth_and_permission() {
        let fx = Fixture::new().await;
        let policy = SecretPolicy::default();
        let (role, weak) = (unique("kw_cls"), unique("kw_weak"));
        let weak_pw = generate(&policy);
        fx.create_role(&role, Some(&generate(&policy)), true).await;
        fx.create_role(&weak, Some(&weak_pw), true).await;

        // A wrong admin password: the auth class, not retried.
        let mut opts = fx.options(Logins::default());
        opts.admin.password = Some(generate(&policy));
        let t = PostgresTarget::new(opts).unwrap();
        let err = t.replace(&role, &generate(&policy)).await.unwrap_err();
        assert!(matches!(err, TargetError::Auth(_)), "{err:?}");
        assert_eq!(err.class(), ErrorClass::TargetAuth);
        assert!(!err.is_transient());

        // An admin without CREATEROLE: the permission class.
        let mut opts = fx.options(Logins::default());
        opts.admin.user = weak.clone();
        opts.admin.password = Some(weak_pw);
        let t = PostgresTarget::new(opts).unwrap();
        let err = t.replace(&role, &generate(&policy)).await.unwrap_err();
        assert!(matches!(err, TargetError::Permission(_)), "{err:?}");
        assert_eq!(err.class(), ErrorClass::TargetPermission);
        drop(t);

        // tls = "require" against a server without TLS: refused, never
        // plain text.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = Tls::Require(TlsRequire::new(None, None).unwrap());
        let err = PostgresTarget::connect(opts).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::TargetUnreachable, "{err:?}");
        assert!(err.to_string().contains("does not support TLS"), "{err}");
        for r in [&role, &weak] {
            fx.admin
                .batch_execute(&format!("DROP ROLE {}", escape_identifier(r)))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_unreachable() {
        let opts = PostgresOptions {
            admin: Admin {
                host: "127.0.0.1".into(),
                port: 1,
                user: "postgres".into(),
                password: None,
                tls: Tls::Disable,
                connections: 1,
            },
            dbname: "postgres".into(),
            logins: Logins::default(),
            policy: SecretPolicy::default(),
        };
        let s = generate(&SecretPolicy::default());
        let t = PostgresTarget::new(opts.clone()).unwrap();
        assert!(matches!(
            t.check("app", &s).await,
            Err(TargetError::Unreachable(_))
        ));
        let err = t.replace("app", &s).await.unwrap_err();
        assert!(matches!(err, TargetError::Unreachable(_)), "{err:?}");
        assert!(err.is_transient());
        assert_eq!(err.class(), ErrorClass::TargetUnreachable);
        assert!(matches!(
            PostgresTarget::connect(opts).await,
            Err(TargetError::Unreachable(_))
        ));
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        // Certificate { tbs: SEQUENCE {}, algorithm: SEQUENCE { OID }, sig }.
        let cert = |oid: &[u8]| {
            let mut alg = vec![0x06, oid.len() as u8];
            alg.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
            body.extend_from_slice(&alg);
            body.extend_from_slice(&[0x03, 0x01, 0x00]);
            let mut der = vec![0x30, body.len() as u8];
            der.extend_from_slice(&body);
            der
        };
        let rsa = |last: u8| cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last]);
        let ecdsa = |tail: &[u8]| {
            let mut oid = vec![0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
            oid.extend_from_slice(tail);
            cert(&oid)
        };
        let len = |der: Vec<u8>| tls_server_end_point(&der).map(|h| h.len());
        assert_eq!(len(rsa(0x0b)), Some(32), "sha256WithRSAEncryption");
        assert_eq!(len(rsa(0x05)), Some(32), "sha1WithRSAEncryption: SHA-256");
        assert_eq!(len(rsa(0x0c)), Some(48));
        assert_eq!(len(rsa(0x0d)), Some(64));
        assert_eq!(len(ecdsa(&[0x03, 0x02])), Some(32));
        assert_eq!(len(ecdsa(&[0x03, 0x03])), Some(48));
        assert_eq!(len(rsa(0x0a)), None, "RSA-PSS: no binding");
        assert_eq!(len(cert(&[0x2b, 0x65, 0x70])), None, "Ed25519: no binding");
        let der = rsa(0x0b);
        assert_eq!(
            tls_server_end_point(&der).unwrap(),
            sha2::Sha256::digest(&der).to_vec()
        );
        // Truncated or malformed input: no binding, no panic.
        for n in 0..der.len() {
            assert_eq!(tls_server_end_point(&der[..n]), None);
        }
        assert_eq!(
            tls_server_end_point(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    /// Every secret of a test, to prove none reaches an error.
    fn leaks(err: &TargetError, secrets: &[&str]) -> bool {
        let text = format!("{err} {err:?}");
        secrets.iter().any(|s| text.contains(s))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_require_rotates_and_verifies_against_real_postgres() {
        let fx = Fixture::tls().await;
        let policy = SecretPolicy::default();
        let role = unique("kw_tls");
        let (a, b) = (generate(&policy), generate(&policy));
        fx.create_role(&role, Some(&a), true).await;

        // Admin pool and login checks over verified TLS: the new secret logs
        // in, the old one is refused by the server (not by TLS).
        let t = fx.target(Logins::default()).await;
        assert_eq!(t.check(&role, &a).await.unwrap(), AuthCheck::Accepted);
        t.replace(&role, &b).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&role, &a).await.unwrap(), AuthCheck::Rejected);
        t.remove(&role, &a).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Accepted);
        // An independent client (psql: libpq, verify-ca) agrees.
        assert!(fx.server.psql_as(&role, b.expose(), "SELECT 1").is_ok());
        assert!(fx.server.psql_as(&role, a.expose(), "SELECT 1").is_err());

        // The server saw the admin connections encrypted.
        let rows = fx
            .admin
            .query(
                "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'keywave-admin'",
                &[],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|r| r.get::<_, bool>(0)));

        // SCRAM bound to the TLS channel: a client that requires channel
        // binding gets in through this connector.
        let mut c = base_config(&fx.options(Logins::default()));
        c.user(&role)
            .password(b.expose())
            .channel_binding(tokio_postgres::config::ChannelBinding::Require);
        match connect(&c, &fx.tls).await {
            Ok((client, _)) => {
                client.simple_query("SELECT 1").await.unwrap();
            }
            Err(_) => panic!("SCRAM-SHA-256-PLUS login refused"),
        }

        // Connecting by IP address and verifying another name the
        // certificate carries.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = require(fx.server.ca_file().unwrap(), Some("localhost"));
        let t = PostgresTarget::connect(opts).await.unwrap();
        assert_eq!(t.check(&role, &b).await.unwrap(), AuthCheck::Accepted);
        fx.admin
            .batch_execute(&format!("DROP ROLE {}", escape_identifier(&role)))
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_misconfigurations_are_classified_and_secret_free_against_real_postgres() {
        let fx = Fixture::tls().await;
        let policy = SecretPolicy::default();
        let role = unique("kw_tls_bad");
        let (a, b) = (generate(&policy), generate(&policy));
        fx.create_role(&role, Some(&a), true).await;
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
            let err = PostgresTarget::connect(opts.clone()).await.unwrap_err();
            assert!(matches!(err, TargetError::Unreachable(_)), "{err:?}");
            assert_eq!(err.class(), ErrorClass::TargetUnreachable);
            assert!(err.to_string().contains(says), "{err}");
            assert!(!leaks(&err, &secrets));
            let t = PostgresTarget::new(opts).unwrap();
            for e in [
                t.check(&role, &a).await.unwrap_err(),
                t.check(&role, &b).await.unwrap_err(),
                t.replace(&role, &b).await.unwrap_err(),
            ] {
                assert_eq!(e.class(), ErrorClass::TargetUnreachable, "{e:?}");
                assert!(!leaks(&e, &secrets));
            }
        }

        // Plain text against a server that takes TLS only: the server's
        // refusal, classified as the worker's configuration (target_auth,
        // not retried), for the admin and the login checks alike.
        let mut opts = fx.options(Logins::default());
        opts.admin.tls = Tls::Disable;
        let err = PostgresTarget::connect(opts.clone()).await.unwrap_err();
        assert!(matches!(err, TargetError::Auth(_)), "{err:?}");
        assert!(!err.is_transient());
        assert!(err.to_string().contains("set tls = \"require\""), "{err}");
        assert!(!leaks(&err, &secrets));
        let t = PostgresTarget::new(opts).unwrap();
        let err = t.check(&role, &a).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::TargetAuth, "{err:?}");
        assert!(!leaks(&err, &secrets));

        // Nothing was changed by any of them.
        let good = fx.target(Logins::default()).await;
        assert_eq!(good.check(&role, &a).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(good.check(&role, &b).await.unwrap(), AuthCheck::Rejected);
        fx.admin
            .batch_execute(&format!("DROP ROLE {}", escape_identifier(&role)))
            .await
            .unwrap();
    }
}
