//! What the SQL database targets ([`super::postgres`], [`super::mysql`])
//! share: how a principal keeps working through a continuity rotation on a
//! server that holds one password per login ([`Continuity`], [`Logins`],
//! [`Scheme`]), the admin connection settings, and secret-free error text.
//!
//! Nothing here talks to a server; the drivers decide what each scheme means
//! in SQL.

use super::redact;
use keywave_common::crypto::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

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

/// TLS on the connections to a database endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tls {
    /// Plain TCP. For loopback, a private network or an encrypted tunnel only.
    #[default]
    Disable,
    /// TLS required, certificate verified. Not supported by this build yet:
    /// the configuration is refused at start-up.
    Require,
}

impl Tls {
    pub fn as_str(self) -> &'static str {
        match self {
            Tls::Disable => "disable",
            Tls::Require => "require",
        }
    }
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
