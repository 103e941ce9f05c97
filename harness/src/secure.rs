//! A `nats-server` running keywave's real least-privilege configuration,
//! `deploy/nats-secure.conf` (or `deploy/nats-secure-tls.conf`), for the
//! permission and secret-hygiene tests. The files are copied unchanged into
//! a temporary directory but for the JetStream `store_dir` line; the port
//! and address come from the command line; every user gets a random
//! password through the server's environment, as in production.
//!
//! ```no_run
//! # async fn f() {
//! let server = keywave_harness::SecureNats::start();
//! let worker_eu = server.client("worker-eu").await;
//! # }
//! ```

use crate::process::{free_port, random_password, require, Daemon};
use keywave_common::nats::ConnectConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

/// The least-privilege server configuration the tests run.
pub const SECURE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats-secure.conf");
/// The same with TLS required.
pub const SECURE_TLS_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/nats-secure-tls.conf"
);

/// The accounts, users and permissions `deploy/nats-secure.conf` includes
/// (and every server of a secure supercluster).
pub const ACCOUNTS_CONFIG: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nats-accounts.conf");

/// Every user of `deploy/nats-accounts.conf`.
pub const USERS: [&str; 9] = [
    "coordinator",
    "worker-eu",
    "worker-us",
    "worker-ap",
    "agent-eu",
    "agent-us",
    "agent-ap",
    "detect-siem",
    "operator",
];

/// The environment variable holding `user`'s password for the server:
/// `KEYWAVE_NATS_PASSWORD_WORKER_EU` for `worker-eu`.
pub fn password_var(user: &str) -> String {
    format!(
        "KEYWAVE_NATS_PASSWORD_{}",
        user.to_ascii_uppercase().replace('-', "_")
    )
}

/// The inbox prefix the configuration grants `user`: `_INBOX_worker_eu`.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{}", user.replace('-', "_"))
}

/// Throw-away TLS material made with `openssl`: a CA and a server
/// certificate for 127.0.0.1 / localhost signed by it (TLS tests of
/// [`SecureNats`], [`crate::PostgresServer::start_tls`] and
/// [`crate::MariaDbServer::start_tls`]; generate a second one for a CA the
/// server's certificate does not chain to).
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// Generates the CA (`ca.pem`) and the server certificate and key
    /// (`server.pem`, `server-key.pem`) into `dir`, valid for one day.
    pub fn generate(dir: &Path) -> TestPki {
        let openssl = require("openssl");
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .current_dir(dir)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("write san.ext");
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            // A name of its own: a second CA is another issuer, as in life.
            &format!("/CN=keywave test CA {}", random_password(8)),
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server-key.pem"),
        }
    }
}

/// A `nats-server` with `deploy/nats-secure.conf`, killed on drop.
pub struct SecureNats {
    daemon: Daemon,
    port: u16,
    passwords: BTreeMap<String, String>,
    tls: Option<TestPki>,
    dir: TempDir,
}

impl SecureNats {
    /// Starts the plain-TCP configuration and waits until it answers.
    pub fn start() -> SecureNats {
        Self::start_with(false)
    }

    /// Starts `deploy/nats-secure-tls.conf` with a fresh CA and server certificate.
    pub fn start_tls() -> SecureNats {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> SecureNats {
        let dir = tempfile::Builder::new()
            .prefix("keywave-nats-secure-")
            .tempdir()
            .expect("temporary directory");
        let store = dir.path().join("store");
        let text = std::fs::read_to_string(SECURE_CONFIG).expect("read deploy/nats-secure.conf");
        let line = "store_dir: \"/var/lib/keywave/nats\"";
        assert!(
            text.contains(line),
            "deploy/nats-secure.conf no longer has the line {line:?} the tests replace"
        );
        let text = text.replace(
            line,
            &format!("store_dir: {:?}", store.display().to_string()),
        );
        std::fs::write(dir.path().join("nats-secure.conf"), text).expect("write config");
        std::fs::copy(ACCOUNTS_CONFIG, dir.path().join("nats-accounts.conf"))
            .expect("copy deploy/nats-accounts.conf");
        let config = if tls {
            std::fs::copy(SECURE_TLS_CONFIG, dir.path().join("nats-secure-tls.conf"))
                .expect("copy deploy/nats-secure-tls.conf");
            dir.path().join("nats-secure-tls.conf")
        } else {
            dir.path().join("nats-secure.conf")
        };
        let pki = tls.then(|| TestPki::generate(dir.path()));
        let passwords: BTreeMap<String, String> = USERS
            .iter()
            .map(|u| (u.to_string(), random_password(24)))
            .collect();
        for (user, pw) in &passwords {
            std::fs::write(dir.path().join(format!("{user}.password")), pw)
                .expect("write password file");
        }
        let log = dir.path().join("nats-server.log");
        for attempt in 1..=5 {
            let port = free_port();
            let mut cmd = Command::new(require("nats-server"));
            cmd.arg("-c")
                .arg(&config)
                .args(["-a", "127.0.0.1", "-p"])
                .arg(port.to_string());
            // Quoted: the server parses the value as a configuration value.
            for (user, pw) in &passwords {
                cmd.env(password_var(user), format!("\"{pw}\""));
            }
            if let Some(p) = &pki {
                cmd.env("KEYWAVE_NATS_TLS_CERT", &p.cert)
                    .env("KEYWAVE_NATS_TLS_KEY", &p.key)
                    .env("KEYWAVE_NATS_TLS_CA", &p.ca);
            }
            let mut daemon = Daemon::spawn("nats-server (secure)", cmd, &log);
            let probe = Probe {
                url: format!("nats://127.0.0.1:{port}"),
                auth: connect_config(dir.path(), "coordinator", pki.as_ref()),
            };
            match daemon.wait_ready(Duration::from_secs(20), || probe.check()) {
                Ok(()) => {
                    return SecureNats {
                        daemon,
                        port,
                        passwords,
                        tls: pki,
                        dir,
                    }
                }
                Err(e) if e.port_clash() && attempt < 5 => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The temporary directory (config copy, store, password files, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log (refused publishes and subscriptions are logged there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.log_path()).unwrap_or_default()
    }

    /// The last lines of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    /// `user`'s password (as the server got it).
    pub fn password(&self, user: &str) -> &str {
        &self.passwords[user]
    }

    /// The CA certificate, when started with TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|p| p.ca.as_path())
    }

    /// How keywave connects as `user`: user, password file, inbox prefix
    /// (and the CA with TLS) — what a deployment puts in `[nats]` or flags.
    pub fn connect_config(&self, user: &str) -> ConnectConfig {
        assert!(self.passwords.contains_key(user), "unknown user {user}");
        connect_config(self.dir.path(), user, self.tls.as_ref())
    }

    /// keywave's client options (named `user`) for `user`, before auth.
    pub fn options(&self, user: &str) -> async_nats::ConnectOptions {
        keywave_common::nats::options(format!("keywave-test {user}"))
            .connection_timeout(Duration::from_secs(5))
    }

    /// A request refused by the server is dropped and never answered:
    /// options for probing denials, whose requests give up after 2 s.
    pub fn probe_options(&self, user: &str) -> async_nats::ConnectOptions {
        self.options(user)
            .request_timeout(Some(Duration::from_secs(2)))
    }

    /// A client connected as `user` with keywave's connection code.
    pub async fn client(&self, user: &str) -> async_nats::Client {
        self.client_with(user, self.options(user)).await
    }

    /// A client connected as `user` with `options` plus the user's identity.
    pub async fn client_with(
        &self,
        user: &str,
        options: async_nats::ConnectOptions,
    ) -> async_nats::Client {
        keywave_common::nats::connect_as(&self.url(), options, &self.connect_config(user))
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}\n{}", self.log_tail()))
    }
}

fn connect_config(dir: &Path, user: &str, pki: Option<&TestPki>) -> ConnectConfig {
    ConnectConfig {
        user: Some(user.to_string()),
        password_file: Some(dir.join(format!("{user}.password"))),
        inbox_prefix: Some(inbox_prefix(user)),
        ca_file: pki.map(|p| p.ca.clone()),
        tls_required: pki.is_some(),
        ..Default::default()
    }
}

/// Readiness: the coordinator can log in and JetStream answers a stream
/// info request the coordinator may send (not found is an answer).
struct Probe {
    url: String,
    auth: ConnectConfig,
}

impl Probe {
    fn check(&self) -> Result<(), String> {
        let url = self.url.clone();
        let auth = self.auth.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("probe runtime");
            let r = rt.block_on(async move {
                let options =
                    async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(1));
                let client = keywave_common::nats::connect_as(&url, options, &auth)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let reply = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request("$JS.API.STREAM.INFO.KEYWAVE_RESULTS", "".into()),
                )
                .await
                .map_err(|_| "JetStream stream info timed out".to_string())?
                .map_err(|e| format!("JetStream stream info: {e}"))?;
                serde_json::from_slice::<serde_json::Value>(&reply.payload)
                    .map(|_| ())
                    .map_err(|e| format!("JetStream reply is not JSON: {e}"))
            });
            let _ = tx.send(r);
        });
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "probe did not finish".to_string())?
    }
}
