//! A private MariaDB server for tests that rotate real MariaDB / MySQL users:
//! `mariadb-install-db` and `mariadbd` from `PATH`, a random loopback port,
//! a temporary data directory, killed on drop. The tests get an admin user
//! `keywave` with a random password and every privilege (`WITH GRANT OPTION`).
//!
//! [`MariaDbServer::start_tls`] turns TLS on with a throw-away CA
//! ([`TestPki`]) and `require_secure_transport`, so a plain-text TCP
//! connection is refused.

use crate::process::{free_port, is_root, random_password, require, run_logged, Daemon};
use crate::secure::TestPki;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 5;
/// The admin user created for the tests.
pub const ADMIN_USER: &str = "keywave";

/// A private MariaDB server.
pub struct MariaDbServer {
    port: u16,
    password: String,
    socket: PathBuf,
    /// The CA and server certificate, when TLS is on.
    tls: Option<TestPki>,
    /// How to start `mariadbd` again on the same data and port.
    launch: Launch,
    daemon: Daemon,
    // Dropped after `daemon`.
    dir: TempDir,
}

impl MariaDbServer {
    /// Initialises a data directory, starts `mariadbd` on a random port of
    /// 127.0.0.1, waits until it answers and creates the admin user.
    pub fn start() -> MariaDbServer {
        Self::start_with(false)
    }

    /// [`MariaDbServer::start`] with TLS: a server certificate for
    /// 127.0.0.1 / localhost signed by a fresh CA
    /// ([`MariaDbServer::ca_file`]) and `require_secure_transport = ON`, so
    /// every TCP connection must use TLS (the Unix socket stays plain).
    pub fn start_tls() -> MariaDbServer {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> MariaDbServer {
        let install = require("mariadb-install-db");
        let mariadbd = require("mariadbd");
        let dir = tempfile::Builder::new()
            .prefix("keywave-mariadb-")
            .tempdir()
            .expect("temporary directory");
        let data = dir.path().join("data");
        // A private tmpdir: servers bootstrapping at once in the shared /tmp
        // collide on their temporary table files.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).expect("create the MariaDB tmpdir");
        // mariadbd refuses to run as root unless told so explicitly.
        let user = if is_root() {
            "root".to_string()
        } else {
            std::env::var("USER").unwrap_or_else(|_| "nobody".into())
        };
        let mut cmd = Command::new(install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--user={user}"))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--tmpdir={}", tmp.display()));
        run_logged("mariadb-install-db", cmd, &dir.path().join("install.log"))
            .unwrap_or_else(|e| panic!("{e}"));

        let tls = tls.then(|| {
            let tls_dir = dir.path().join("tls");
            std::fs::create_dir(&tls_dir).expect("create the TLS directory");
            TestPki::generate(&tls_dir)
        });
        let socket = dir.path().join("mariadb.sock");
        let launch = Launch {
            mariadbd,
            user,
            data,
            tmp,
            socket: socket.clone(),
            home: dir.path().to_path_buf(),
        };
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let mut daemon = launch.spawn(port, tls.as_ref());
            let sock = socket.clone();
            match daemon.wait_ready(START_TIMEOUT, || admin_ping(&sock)) {
                Ok(()) => {
                    let password = random_password(24);
                    let server = MariaDbServer {
                        port,
                        password,
                        socket,
                        tls,
                        launch,
                        daemon,
                        dir,
                    };
                    server
                        .sql_as_root(&format!(
                            "CREATE USER '{ADMIN_USER}'@'%' IDENTIFIED BY '{pw}'; \
                             GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'%' WITH GRANT OPTION;",
                            pw = server.password
                        ))
                        .unwrap_or_else(|e| panic!("creating the admin user: {e}"));
                    return server;
                }
                Err(e) if e.port_clash() && attempt < PORT_ATTEMPTS => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills `mariadbd` (SIGKILL, as a crashed or unplugged server): every
    /// connection breaks, new ones are refused until [`Self::restart`].
    pub fn stop_fast(&mut self) {
        self.daemon.kill();
    }

    /// Starts `mariadbd` again on the same data directory and port, and
    /// waits until it answers.
    pub fn restart(&mut self) {
        self.daemon.kill();
        let mut daemon = self.launch.spawn(self.port, self.tls.as_ref());
        let sock = self.socket.clone();
        daemon
            .wait_ready(START_TIMEOUT, || admin_ping(&sock))
            .unwrap_or_else(|e| panic!("restarting mariadbd: {e}"));
        self.daemon = daemon;
    }

    /// The admin user's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `mysql://keywave:<password>@127.0.0.1:<port>/mysql`.
    pub fn url(&self) -> String {
        self.url_as(ADMIN_USER, &self.password)
    }

    /// The URL as another user; the password must be URL-safe.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("mysql://{user}:{password}@127.0.0.1:{}/mysql", self.port)
    }

    /// The server's Unix socket (root can log in over it without a password).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM) that signed the server's certificate, when
    /// started with [`MariaDbServer::start_tls`].
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|p| p.ca.as_path())
    }

    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    /// Runs SQL as the admin user over TCP (password auth).
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        self.sql_as(ADMIN_USER, &self.password, sql)
    }

    /// Runs SQL as `user` over TCP: also a real authentication check.
    pub fn sql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(require("mariadb"));
        cmd.args(["--no-defaults", "--protocol=TCP", "-h", "127.0.0.1"])
            .arg(format!("--port={}", self.port))
            .arg(format!("--user={user}"))
            .args(["--batch", "--skip-column-names", "--connect-timeout=10"]);
        if let Some(p) = &self.tls {
            cmd.arg("--ssl").arg(format!("--ssl-ca={}", p.ca.display()));
        }
        cmd.arg("-e")
            .arg(sql)
            // Keeps the password off the command line.
            .env("MYSQL_PWD", password);
        output(cmd)
    }

    fn sql_as_root(&self, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(require("mariadb"));
        cmd.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["--user=root", "--batch", "--skip-column-names", "-e"])
            .arg(sql);
        output(cmd)
    }
}

/// Everything `mariadbd` is started with, but the port.
struct Launch {
    mariadbd: PathBuf,
    user: String,
    data: PathBuf,
    tmp: PathBuf,
    socket: PathBuf,
    home: PathBuf,
}

impl Launch {
    fn spawn(&self, port: u16, tls: Option<&TestPki>) -> Daemon {
        // A restart after a SIGKILL finds the old socket file.
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(&self.mariadbd);
        cmd.arg("--no-defaults")
            .arg(format!("--user={}", self.user))
            .arg(format!("--datadir={}", self.data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.socket.display()))
            .arg(format!("--tmpdir={}", self.tmp.display()))
            .arg(format!(
                "--pid-file={}",
                self.home.join("mariadbd.pid").display()
            ))
            .args(["--skip-log-bin", "--innodb-buffer-pool-size=32M"])
            .args([
                "--innodb-flush-log-at-trx-commit=0",
                "--max-connections=300",
            ]);
        if let Some(p) = tls {
            cmd.arg(format!("--ssl-cert={}", p.cert.display()))
                .arg(format!("--ssl-key={}", p.key.display()))
                .arg(format!("--ssl-ca={}", p.ca.display()))
                .arg("--require-secure-transport=ON");
        }
        Daemon::spawn("mariadbd", cmd, &self.home.join("mariadbd.log"))
    }
}

fn output(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("mariadb client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Whether the server on `socket` answers `mariadb-admin ping`.
fn admin_ping(socket: &Path) -> Result<(), String> {
    if !socket.exists() {
        return Err("socket not created yet".into());
    }
    let mut cmd = Command::new(require("mariadb-admin"));
    cmd.arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args(["--user=root", "--connect-timeout=2", "ping"]);
    output(cmd).map(|_| ())
}
