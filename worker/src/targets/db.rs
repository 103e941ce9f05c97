//! What the SQL database targets ([`super::postgres`], [`super::mysql`])
//! share: how a principal keeps working through a continuity rotation on a
//! server that holds one password per login ([`Continuity`], [`Logins`],
//! [`Scheme`]), the admin connection settings with their TLS ([`Tls`]: the
//! trusted roots and the name to verify, loaded once per endpoint), and
//! secret-free error text, TLS failures included.
//!
//! Nothing here talks to a server; the drivers decide what each scheme means
//! in SQL.

use super::{redact, TargetError};
use keywave_common::crypto::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Connect timeout of every database connection (admin and login checks).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest server error text kept in a [`super::TargetError`].
const MAX_ERROR_TEXT: usize = 200;

/// How a continuity rotation (`add` then, after promote, `remove`) keeps the
/// old secret valid while the new one is set. Containment (`replace`) is the
/// same in every scheme: the new secret becomes the only valid one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuity {
    /// Principals listed in `alternating` alternate; the others use dual
    /// passwords where the server has them (MySQL 8.0.14+), else a continuity
    /// rotation is refused with a clear error.
    #[default]
    Auto,
    /// Continuity rotations are refused (`add` fails, not retried): only
    /// containment rotations run. Principals listed in `alternating` still
    /// alternate.
    Refuse,
    /// Every principal alternates with its clone login (the `alternating`
    /// entry, else principal + `clone_suffix`).
    Alternating,
    /// `add` overwrites the one password: the old secret stops working at
    /// once, as in containment. For logins whose consumers re-read CURRENT on
    /// every connect and tolerate a failed login.
    Overwrite,
    /// MySQL 8.0.14+ dual passwords (`RETAIN CURRENT PASSWORD` /
    /// `DISCARD OLD PASSWORD`); a server without them refuses `add`.
    Dual,
}

impl Continuity {
    pub fn as_str(self) -> &'static str {
        match self {
            Continuity::Auto => "auto",
            Continuity::Refuse => "refuse",
            Continuity::Alternating => "alternating",
            Continuity::Overwrite => "overwrite",
            Continuity::Dual => "dual",
        }
    }
}

/// How a principal is rotated at its endpoint: the configured [`Continuity`]
/// and alternating pairs, resolved for one principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// One login, one password; `add` is refused.
    Refuse,
    /// One login, one password; `add` overwrites it.
    Overwrite,
    /// One login with a primary and a retained password (MySQL 8.0.14+).
    Dual,
    /// Two logins; the inactive one takes the new secret. Exactly one of them
    /// can log in between rotations.
    Alternating { primary: String, clone: String },
}

/// The continuity settings of an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logins {
    pub continuity: Continuity,
    /// Clone name = principal + suffix, when `continuity = "alternating"` and
    /// the principal has no explicit entry.
    pub clone_suffix: String,
    /// Explicit pairs: principal → clone login. Listed principals always
    /// alternate, whatever `continuity` says.
    pub alternating: BTreeMap<String, String>,
}

/// Default of `clone_suffix`.
pub const DEFAULT_CLONE_SUFFIX: &str = "_clone";

impl Default for Logins {
    fn default() -> Self {
        Logins {
            continuity: Continuity::Auto,
            clone_suffix: DEFAULT_CLONE_SUFFIX.to_string(),
            alternating: BTreeMap::new(),
        }
    }
}

impl Logins {
    /// The scheme of `principal`. `dual_supported` says whether the server
    /// has dual passwords (only ever true for MySQL 8.0.14+).
    pub fn scheme(&self, principal: &str, dual_supported: bool) -> Scheme {
        if let Some(clone) = self.alternating.get(principal) {
            return Scheme::Alternating {
                primary: principal.to_string(),
                clone: clone.clone(),
            };
        }
        match self.continuity {
            Continuity::Alternating => Scheme::Alternating {
                primary: principal.to_string(),
                clone: format!("{principal}{}", self.clone_suffix),
            },
            Continuity::Auto if dual_supported => Scheme::Dual,
            Continuity::Auto | Continuity::Refuse => Scheme::Refuse,
            Continuity::Overwrite => Scheme::Overwrite,
            Continuity::Dual => Scheme::Dual,
        }
    }

    /// Every login keywave may change for `principal`: the principal and, for
    /// alternating users, its clone.
    pub fn logins(&self, principal: &str) -> Vec<String> {
        match self.scheme(principal, false) {
            Scheme::Alternating { primary, clone } => vec![primary, clone],
            _ => vec![principal.to_string()],
        }
    }
}

/// `tls` as written in the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plain TCP. For loopback, a private network or an encrypted tunnel only.
    #[default]
    Disable,
    /// TLS with a verified server certificate and host name; no plain-text
    /// fallback.
    Require,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Require => "require",
        }
    }
}

/// TLS on every connection to a database endpoint: the admin pool's and each
/// login check's alike (a check over another path would prove nothing about
/// the one the consumers use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Tls {
    /// Plain TCP.
    #[default]
    Disable,
    /// Verified TLS, or no connection.
    Require(TlsRequire),
}

impl Tls {
    pub fn mode(&self) -> TlsMode {
        match self {
            Tls::Disable => TlsMode::Disable,
            Tls::Require(_) => TlsMode::Require,
        }
    }

    pub fn as_str(&self) -> &'static str {
        self.mode().as_str()
    }
}

/// Why [`TlsRequire::new`] refused its settings; [`TlsSetupError::field`]
/// names the configuration key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsSetupError {
    /// `ca_file` cannot be read or holds no usable CA certificate.
    #[error("{0}")]
    CaFile(String),
    /// No `ca_file` and no root certificate in the platform's trust store.
    #[error("not set, and the system trust store has no root certificate (install ca-certificates, or set ca_file to the CA bundle of the server)")]
    NoPlatformRoots,
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("{0:?} is not a DNS name or an IP address")]
    ServerName(String),
}

impl TlsSetupError {
    /// The configuration key at fault: `ca_file` or `server_name`.
    pub fn field(&self) -> &'static str {
        match self {
            TlsSetupError::CaFile(_) | TlsSetupError::NoPlatformRoots => "ca_file",
            TlsSetupError::ServerName(_) => "server_name",
        }
    }
}

/// `tls = "require"`, loaded: the trusted roots (the `ca_file` bundle, else
/// the platform's trust store, read once at start-up) and the name the
/// server's certificate must carry. Built once per endpoint; every
/// connection shares it.
#[derive(Clone)]
pub struct TlsRequire {
    ca_file: Option<PathBuf>,
    server_name: Option<ServerName<'static>>,
    roots: Arc<Vec<CertificateDer<'static>>>,
    client: Arc<rustls::ClientConfig>,
}

impl PartialEq for TlsRequire {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file
            && self.server_name == other.server_name
            && self.roots == other.roots
    }
}

impl Eq for TlsRequire {}

impl std::fmt::Debug for TlsRequire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRequire")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// The platform's root certificates, read once per process.
fn platform_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// The crypto provider of every database TLS connection: ring, as for NATS.
pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsRequire {
    /// Loads the roots: every certificate of the PEM bundle `ca_file` (then
    /// only those are trusted), else the platform's trust store. The server
    /// certificate must carry `server_name` when given, else the endpoint's
    /// `host` (DNS name or IP address).
    pub fn new(ca_file: Option<&Path>, server_name: Option<&str>) -> Result<Self, TlsSetupError> {
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .map_err(|_| TlsSetupError::ServerName(n.to_string()))
            })
            .transpose()?;
        let roots: Vec<CertificateDer<'static>> = match ca_file {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| {
                    TlsSetupError::CaFile(format!("cannot read {}: {e}", path.display()))
                })?;
                let certs = CertificateDer::pem_slice_iter(&text)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        TlsSetupError::CaFile(format!(
                            "{} is not a PEM bundle: {e}",
                            path.display()
                        ))
                    })?;
                if certs.is_empty() {
                    return Err(TlsSetupError::CaFile(format!(
                        "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        path.display()
                    )));
                }
                certs
            }
            None => platform_roots().to_vec(),
        };
        let mut store = rustls::RootCertStore::empty();
        let mut usable = Vec::with_capacity(roots.len());
        for (i, c) in roots.into_iter().enumerate() {
            match (store.add(c.clone()), ca_file) {
                (Ok(()), _) => usable.push(c),
                (Err(e), Some(path)) => {
                    return Err(TlsSetupError::CaFile(format!(
                        "certificate {} of {} is not a usable CA certificate: {e}",
                        i + 1,
                        path.display()
                    )))
                }
                // A platform store may hold a certificate rustls cannot use:
                // skip it, as every TLS client does.
                (Err(_), None) => {}
            }
        }
        if store.is_empty() {
            return Err(TlsSetupError::NoPlatformRoots);
        }
        let client = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsSetupError::CaFile(format!("TLS set-up: {e}")))?
            .with_root_certificates(store)
            .with_no_client_auth();
        Ok(TlsRequire {
            ca_file: ca_file.map(Path::to_path_buf),
            server_name,
            roots: Arc::new(usable),
            client: Arc::new(client),
        })
    }

    /// The `ca_file` the roots come from (`None`: the platform's store).
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// The name verified in the server's certificate, when it is not the host.
    pub fn server_name(&self) -> Option<&ServerName<'static>> {
        self.server_name.as_ref()
    }

    /// The rustls client configuration (roots, ring provider, TLS 1.2 and 1.3).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The trusted roots as one PEM bundle (for drivers that build their own
    /// rustls configuration from PEM).
    pub fn roots_pem(&self) -> Vec<u8> {
        use base64::Engine;
        let mut out = Vec::new();
        for c in self.roots.iter() {
            out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
            for line in b64.as_bytes().chunks(64) {
                out.extend_from_slice(line);
                out.push(b'\n');
            }
            out.extend_from_slice(b"-----END CERTIFICATE-----\n");
        }
        out
    }

    /// Where the trusted roots come from, for error messages.
    fn roots_source(&self) -> String {
        match &self.ca_file {
            Some(p) => format!("ca_file {}", p.display()),
            None => "the system trust store (no ca_file)".to_string(),
        }
    }
}

/// The rustls error somewhere in `e`'s chain of sources, looking inside I/O
/// errors (whose `source` skips the error they wrap).
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(r) = rustls_error(inner) {
                return Some(r);
            }
        }
        next = e.source();
    }
    None
}

/// A failed TLS handshake as a secret-free [`TargetError::Unreachable`]
/// (class `target_unreachable`, retried): the worker cannot reach a server it
/// can trust, like a refused connection, and not a login the server refused
/// (`target_auth`). A certificate the worker does not trust is usually a
/// worker configuration problem (`ca_file`, `server_name`) but may also be a
/// server whose certificate is being replaced, so it is retried within the
/// task's deadline; the message says which check failed.
pub fn tls_failure(e: &rustls::Error, tls: &Tls) -> TargetError {
    use rustls::CertificateError as C;
    let source = match tls {
        Tls::Require(t) => t.roots_source(),
        Tls::Disable => "no TLS settings".to_string(),
    };
    let what = match e {
        // BadSignature: a trusted CA has the issuer's name but did not sign it.
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the server's certificate is not signed by a trusted CA (trusted: {source}; {e})"
        ),
        rustls::Error::InvalidCertificate(C::NotValidForNameContext {
            expected,
            presented,
        }) => format!(
            "the server's certificate is not valid for {:?} (it names {}); check host or server_name",
            expected.to_str(),
            presented.join(", ")
        ),
        rustls::Error::InvalidCertificate(C::NotValidForName) => {
            "the server's certificate is not valid for the name verified; check host or server_name"
                .to_string()
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the server's certificate has expired ({e})")
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate failed verification ({e})")
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the server aborted the handshake (alert {alert:?})")
        }
        other => format!("handshake failed ({other})"),
    };
    TargetError::Unreachable(describe(&format!("TLS: {what}"), &[]))
}

/// Where a database endpoint is and how keywave logs in to administer it.
#[derive(Clone, PartialEq, Eq)]
pub struct Admin {
    pub host: String,
    pub port: u16,
    /// The admin login used to rotate (never itself a principal).
    pub user: String,
    pub password: Option<Secret>,
    pub tls: Tls,
    /// Admin connections kept open at most (a bounded pool shared by every
    /// task of the worker).
    pub connections: usize,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("connections", &self.connections)
            .finish()
    }
}

/// A secret-free, bounded description of a server error message: the
/// `near '...'` / `at or near "..."` part (which quotes the statement) is
/// cut, then every value in `secrets` is redacted.
pub fn describe(text: &str, secrets: &[&Secret]) -> String {
    let mut text = text.to_string();
    for marker in [" near '", " at or near \"", " near \""] {
        if let Some(i) = text.find(marker) {
            text.truncate(i);
            text.push_str(" near <statement>");
        }
    }
    let mut out = redact(&text, secrets);
    if out.len() > MAX_ERROR_TEXT {
        let mut cut = MAX_ERROR_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logins(continuity: Continuity) -> Logins {
        Logins {
            continuity,
            alternating: [("app".to_string(), "app_b".to_string())].into(),
            ..Logins::default()
        }
    }

    #[test]
    fn schemes_resolve_per_principal() {
        let alt = |p: &str, c: &str| Scheme::Alternating {
            primary: p.into(),
            clone: c.into(),
        };
        for c in [
            Continuity::Auto,
            Continuity::Refuse,
            Continuity::Overwrite,
            Continuity::Dual,
        ] {
            // Explicit pairs win over the endpoint's default.
            assert_eq!(logins(c).scheme("app", true), alt("app", "app_b"));
        }
        assert_eq!(logins(Continuity::Auto).scheme("x", false), Scheme::Refuse);
        assert_eq!(logins(Continuity::Auto).scheme("x", true), Scheme::Dual);
        assert_eq!(logins(Continuity::Refuse).scheme("x", true), Scheme::Refuse);
        assert_eq!(
            logins(Continuity::Overwrite).scheme("x", true),
            Scheme::Overwrite
        );
        assert_eq!(logins(Continuity::Dual).scheme("x", false), Scheme::Dual);
        assert_eq!(
            logins(Continuity::Alternating).scheme("x", true),
            alt("x", "x_clone")
        );
        assert_eq!(
            logins(Continuity::Alternating).logins("x"),
            vec!["x".to_string(), "x_clone".to_string()]
        );
        assert_eq!(
            logins(Continuity::Refuse).logins("x"),
            vec!["x".to_string()]
        );
    }

    #[test]
    fn tls_settings_are_checked_when_loaded() {
        let dir = std::env::temp_dir().join(keywave_common::ids::random_id("kw-tls-db"));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = TlsRequire::new(Some(&missing), None).unwrap_err();
        assert_eq!(err.field(), "ca_file");
        assert!(err.to_string().contains("cannot read"), "{err}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = TlsRequire::new(Some(&empty), None).unwrap_err();
        assert_eq!(err.field(), "ca_file");
        let err = TlsRequire::new(None, Some("no spaces allowed")).unwrap_err();
        assert_eq!(err.field(), "server_name");
        // The system trust store, re-encoded as PEM, loads as a ca_file.
        let system = TlsRequire::new(None, Some("127.0.0.1")).unwrap();
        let bundle = dir.join("system.pem");
        std::fs::write(&bundle, system.roots_pem()).unwrap();
        let t = TlsRequire::new(Some(&bundle), None).unwrap();
        assert_eq!(t, TlsRequire::new(Some(&bundle), None).unwrap());
        assert_eq!(t.roots, system.roots);
        assert_ne!(t, system, "a ca_file is not the system store");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_failures_are_found_inside_io_errors_and_classified() {
        use rustls::CertificateError as C;
        let tls = Tls::Disable;
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(C::UnknownIssuer),
        );
        let found = rustls_error(&io).unwrap();
        let err = tls_failure(found, &tls);
        assert_eq!(
            err.class(),
            keywave_common::wire::ErrorClass::TargetUnreachable
        );
        assert!(err.to_string().contains("not signed by a trusted CA"));
        assert!(rustls_error(&std::io::Error::other("refused")).is_none());
        for (e, says) in [
            (
                rustls::Error::InvalidCertificate(C::BadSignature),
                "not signed by a trusted CA",
            ),
            (rustls::Error::InvalidCertificate(C::Expired), "has expired"),
            (
                rustls::Error::InvalidCertificate(C::NotValidForName),
                "server_name",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
                "aborted the handshake",
            ),
        ] {
            let err = tls_failure(&e, &tls);
            assert!(matches!(err, TargetError::Unreachable(_)), "{err:?}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn describe_cuts_the_statement_and_redacts() {
        let s = Secret::new("s3cr3t-value-123".into());
        let d = describe(
            "You have an error in your SQL syntax; check the manual near 's3cr3t-value-123' at line 1",
            &[&s],
        );
        assert_eq!(
            d,
            "You have an error in your SQL syntax; check the manual near <statement>"
        );
        let d = describe("syntax error at or near \"PASSWORD\"", &[]);
        assert_eq!(d, "syntax error near <statement>");
        assert_eq!(
            describe("role s3cr3t-value-123 is odd", &[&s]),
            "role <redacted> is odd"
        );
        assert!(describe(&"x".repeat(1000), &[]).len() <= MAX_ERROR_TEXT);
        let admin = Admin {
            host: "h".into(),
            port: 1,
            user: "u".into(),
            password: Some(s.clone()),
            tls: Tls::Disable,
            connections: 1,
        };
        assert!(!format!("{admin:?}").contains(s.expose()));
    }
}
