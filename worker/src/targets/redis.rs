//! Redis ACL users as a target. Redis keeps several passwords per user, so
//! continuity is native: `add` appends a password, `remove` drops one, and
//! `replace` resets them all. Admin commands go over one shared multiplexed
//! connection (re-established after a connection error); `check` is a real
//! `AUTH` on a fresh connection, exactly what an application would do.
//!
//! Users and secrets are always separate command arguments, never spliced into
//! a command string; server errors that echo an argument are redacted.

use super::{redact, AuthCheck, Target, TargetError};
use ::redis::aio::MultiplexedConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, ServerErrorKind,
};
use async_trait::async_trait;
use keywave_common::crypto::{Secret, SecretPolicy};
use keywave_common::wire::TargetKind;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Connect and response timeout of every Redis connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the admin connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Admin connection URL, e.g. `redis://127.0.0.1:6379` or
    /// `redis://admin:pw@host:port/` (`rediss://` needs a TLS-enabled build).
    pub url: String,
}

/// A Redis server whose ACL users keywave rotates.
pub struct RedisTarget {
    /// Admin connection settings (address and admin credentials).
    info: ConnectionInfo,
    admin: Mutex<Option<MultiplexedConnection>>,
}

fn io_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(IO_TIMEOUT))
        .set_response_timeout(Some(IO_TIMEOUT))
}

/// Whether a Redis error says "try again later" rather than "no".
fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// A secret-free description of a Redis error. `ACL SETUSER` errors quote the
/// failing modifier (which holds the password), so that part is cut before the
/// generic redaction.
fn describe(e: &RedisError, secrets: &[&Secret]) -> String {
    let mut text = e.to_string();
    if let Some(start) = text.find("modifier '") {
        let tail = text[start..]
            .find("': ")
            .map(|i| text[start + i + 3..].to_string())
            .unwrap_or_default();
        text = format!("{}modifier <redacted>: {tail}", &text[..start]);
    }
    let mut out = redact(&text, secrets);
    if out.len() > 200 {
        let mut cut = 200;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

impl RedisTarget {
    /// Parses the URL and opens the admin connection (failing if Redis cannot
    /// be reached).
    pub async fn connect(opts: RedisOptions) -> Result<Arc<Self>, TargetError> {
        // The URL may carry the admin password: never echo it.
        let info = opts
            .url
            .as_str()
            .into_connection_info()
            .map_err(|_| TargetError::Internal("invalid Redis URL".into()))?;
        Self::connect_info(info).await
    }

    /// [`RedisTarget::connect`] from parsed connection settings (the worker
    /// configuration sets the admin user and password this way).
    pub async fn connect_info(info: ConnectionInfo) -> Result<Arc<Self>, TargetError> {
        let t = Self::lazy(info)?;
        let mut conn = t.admin().await?;
        if let Err(e) = ::redis::cmd("PING").query_async::<()>(&mut conn).await {
            return Err(t.fail(&e, &[]).await);
        }
        Ok(t)
    }

    /// A target that connects on first use, for a worker that must start
    /// while one of its Redis servers is down.
    pub fn lazy(info: ConnectionInfo) -> Result<Arc<Self>, TargetError> {
        Client::open(info.clone())
            .map_err(|_| TargetError::Internal("invalid Redis connection settings".into()))?;
        Ok(Arc::new(RedisTarget {
            info,
            admin: Mutex::new(None),
        }))
    }

    async fn admin(&self) -> Result<MultiplexedConnection, TargetError> {
        let mut slot = self.admin.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let client = Client::open(self.info.clone())
            .map_err(|_| TargetError::Internal("invalid Redis connection settings".into()))?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&io_config())
            .await
            .map_err(|e| {
                if e.kind() == ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
                    TargetError::Rejected("admin authentication failed".into())
                } else {
                    TargetError::Unavailable(describe(&e, &[]))
                }
            })?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Maps an error of the admin connection, dropping that connection when it
    /// is broken so that the next operation reconnects.
    async fn fail(&self, e: &RedisError, secrets: &[&Secret]) -> TargetError {
        let text = describe(e, secrets);
        if is_transient(e) {
            *self.admin.lock().await = None;
            TargetError::Unavailable(text)
        } else {
            TargetError::Rejected(text)
        }
    }

    /// The user the admin connection logs in as (`default` without one).
    fn admin_user(&self) -> &str {
        self.info.redis_settings().username().unwrap_or("default")
    }

    /// Refuses the endpoint's own admin user as a credential: rotating it
    /// would cut keywave off, and proving it says nothing about a consumer.
    fn rotatable(&self, principal: &str) -> Result<(), TargetError> {
        if principal == self.admin_user() {
            return Err(TargetError::Rejected(format!(
                "{principal:?} is the endpoint's admin user; keywave never rotates or proves it"
            )));
        }
        Ok(())
    }

    /// `ACL SETUSER <user> <modifiers...>` on the admin connection.
    async fn setuser(
        &self,
        user: &str,
        modifiers: &[&str],
        secret: &Secret,
    ) -> Result<(), TargetError> {
        self.rotatable(user)?;
        let mut conn = self.admin().await?;
        let mut cmd = ::redis::cmd("ACL");
        cmd.arg("SETUSER").arg(user);
        for m in modifiers {
            cmd.arg(*m);
        }
        match cmd.query_async::<()>(&mut conn).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&e, &[secret]).await),
        }
    }
}

#[async_trait]
impl Target for RedisTarget {
    fn kind(&self) -> TargetKind {
        TargetKind::Redis
    }

    fn policy(&self) -> SecretPolicy {
        SecretPolicy::default()
    }

    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        let pw = Secret::new(format!(">{}", new.expose()));
        self.setuser(principal, &["on", pw.expose()], new).await
    }

    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        let pw = Secret::new(format!(">{}", new.expose()));
        self.setuser(principal, &["on", "resetpass", pw.expose()], new)
            .await
    }

    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        let pw = Secret::new(format!("<{}", old.expose()));
        match self.setuser(principal, &[pw.expose()], old).await {
            Ok(()) => Ok(()),
            // Redis refuses to remove a password the user does not have (or a
            // user that does not exist). That is success only if the old
            // secret really no longer authenticates.
            Err(TargetError::Rejected(why)) => match self.check(principal, old).await? {
                AuthCheck::Rejected => Ok(()),
                AuthCheck::Accepted => Err(TargetError::Rejected(why)),
            },
            Err(e) => Err(e),
        }
    }

    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.rotatable(principal)?;
        // A fresh connection with no credentials of its own, so that the AUTH
        // below is the only authentication it performs.
        let info = self
            .info
            .clone()
            .set_redis_settings(RedisConnectionInfo::default().set_skip_set_lib_name());
        let client = Client::open(info)
            .map_err(|_| TargetError::Internal("invalid Redis connection settings".into()))?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&io_config())
            .await
            .map_err(|e| TargetError::Unavailable(describe(&e, &[secret])))?;
        let r = ::redis::cmd("AUTH")
            .arg(principal)
            .arg(secret.expose())
            .query_async::<()>(&mut conn)
            .await;
        match r {
            Ok(()) => Ok(AuthCheck::Accepted),
            Err(e) if e.code() == Some("WRONGPASS") => Ok(AuthCheck::Rejected),
            Err(e) if is_transient(&e) => Err(TargetError::Unavailable(describe(&e, &[secret]))),
            Err(e) => Err(TargetError::Rejected(describe(&e, &[secret]))),
        }
    }

    /// `ACL USERS`, each looked at with `ACL GETUSER` (only its `commands`
    /// field is read: the password hashes are never kept). Privileged:
    /// `default`, users allowed every command (`+@all`) and the admin user.
    async fn discover(&self) -> Result<Vec<super::Login>, TargetError> {
        let mut conn = self.admin().await?;
        let users: Vec<String> = match ::redis::cmd("ACL")
            .arg("USERS")
            .query_async(&mut conn)
            .await
        {
            Ok(u) => u,
            Err(e) => return Err(self.fail(&e, &[]).await),
        };
        let admin_user = self.admin_user().to_string();
        let mut found = Vec::with_capacity(users.len());
        for user in users {
            let fields: Vec<::redis::Value> = match ::redis::cmd("ACL")
                .arg("GETUSER")
                .arg(&user)
                .query_async(&mut conn)
                .await
            {
                Ok(f) => f,
                // Deleted between the two commands.
                Err(e) if e.kind() == ErrorKind::UnexpectedReturnType => continue,
                Err(e) => return Err(self.fail(&e, &[]).await),
            };
            let commands = acl_field(&fields, "commands").unwrap_or_default();
            let mut privileged = Vec::new();
            if user == "default" {
                privileged.push("the default user".to_string());
            }
            if commands
                .split_whitespace()
                .any(|c| c == "+@all" || c == "allcommands")
            {
                privileged.push("+@all".to_string());
            }
            if user == admin_user && user != "default" {
                privileged.push("the endpoint's admin login".to_string());
            }
            found.push(super::Login {
                principal: user,
                privileged,
                never: None,
            });
        }
        found.sort_by(|a, b| a.principal.cmp(&b.principal));
        Ok(found)
    }
}

/// The text of field `name` in an `ACL GETUSER` reply (a flat list of
/// alternating names and values).
fn acl_field(fields: &[::redis::Value], name: &str) -> Option<String> {
    let i = fields.iter().position(
        |v| matches!(v, ::redis::Value::BulkString(b) if b.as_slice() == name.as_bytes()),
    )?;
    match fields.get(i + 1)? {
        ::redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        ::redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::crypto::generate;

    const URL: &str = "redis://127.0.0.1:6379";

    fn user() -> String {
        keywave_common::ids::random_id("kwtest-user")
    }

    async fn deluser(t: &RedisTarget, user: &str) {
        let mut c = t.admin().await.unwrap();
        let _: i64 = ::redis::cmd("ACL")
            .arg("DELUSER")
            .arg(user)
            .query_async(&mut c)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn add_replace_remove_check_against_real_redis() {
        let t = RedisTarget::connect(RedisOptions { url: URL.into() })
            .await
            .unwrap();
        let u = user();
        let p = t.policy();
        let (a, b, c) = (generate(&p), generate(&p), generate(&p));

        assert_eq!(t.check(&u, &a).await.unwrap(), AuthCheck::Rejected);
        t.add(&u, &a).await.unwrap();
        assert_eq!(t.check(&u, &a).await.unwrap(), AuthCheck::Accepted);

        // add keeps both valid.
        t.add(&u, &b).await.unwrap();
        t.add(&u, &b).await.unwrap();
        assert_eq!(t.check(&u, &a).await.unwrap(), AuthCheck::Accepted);
        assert_eq!(t.check(&u, &b).await.unwrap(), AuthCheck::Accepted);

        // remove drops one, and is idempotent.
        t.remove(&u, &a).await.unwrap();
        t.remove(&u, &a).await.unwrap();
        assert_eq!(t.check(&u, &a).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(t.check(&u, &b).await.unwrap(), AuthCheck::Accepted);

        // replace leaves only the new one.
        t.add(&u, &a).await.unwrap();
        t.replace(&u, &c).await.unwrap();
        assert_eq!(t.check(&u, &a).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(t.check(&u, &b).await.unwrap(), AuthCheck::Rejected);
        assert_eq!(t.check(&u, &c).await.unwrap(), AuthCheck::Accepted);

        // A wrong password is Rejected, not an error.
        let wrong = Secret::new("definitely-not-it".into());
        assert_eq!(t.check(&u, &wrong).await.unwrap(), AuthCheck::Rejected);

        // Removing from an unknown user does not create it.
        let ghost = user();
        t.remove(&ghost, &a).await.unwrap();
        let mut conn = t.admin().await.unwrap();
        let users: Vec<String> = ::redis::cmd("ACL")
            .arg("USERS")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!users.contains(&ghost));

        deluser(&t, &u).await;
    }

    #[tokio::test]
    async fn errors_never_echo_the_secret() {
        let t = RedisTarget::connect(RedisOptions { url: URL.into() })
            .await
            .unwrap();
        let u = user();
        let a = generate(&t.policy());
        t.add(&u, &a).await.unwrap();
        // Removing a password the user does not have makes the server quote
        // the modifier, password included, in its error.
        let other = generate(&t.policy());
        let err = t
            .setuser(&u, &[&format!("<{}", other.expose())], &other)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TargetError::Rejected(_)));
        assert!(!text.contains(other.expose()), "{text}");
        deluser(&t, &u).await;
    }

    #[tokio::test]
    async fn unreachable_redis_is_unavailable() {
        let t = RedisTarget::lazy("redis://127.0.0.1:1".into_connection_info().unwrap()).unwrap();
        let s = generate(&t.policy());
        assert!(matches!(
            t.check("x", &s).await,
            Err(TargetError::Unavailable(_))
        ));
        assert!(matches!(
            t.add("x", &s).await,
            Err(TargetError::Unavailable(_))
        ));
        assert!(matches!(
            RedisTarget::connect(RedisOptions {
                url: "redis://127.0.0.1:1".into()
            })
            .await,
            Err(TargetError::Unavailable(_))
        ));
    }
}
