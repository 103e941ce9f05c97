//! A private PostgreSQL server for tests that rotate real login roles:
//! `initdb` (password authentication with scram-sha-256 everywhere) and
//! `pg_ctl` from `PATH` or `/usr/lib/postgresql/<version>/bin`, a random
//! loopback port, a temporary data directory, stopped on drop.
//!
//! PostgreSQL refuses to run as root; when the tests do, the server runs as
//! the `postgres` system user (via `runuser`) in a directory it owns.
//!
//! [`PostgresServer::start_tls`] turns TLS on with a throw-away CA
//! ([`TestPki`]) and accepts TCP connections over TLS only (`hostssl` in
//! `pg_hba.conf`), so a plain-text connection is refused.

use crate::process::{free_port, is_root, random_password, require, run_logged, system_user};
use crate::secure::TestPki;
use std::path::{Path, PathBuf};
use std::process::Command;
use tempfile::TempDir;

const PORT_ATTEMPTS: usize = 5;
/// Seconds `pg_ctl start -w` waits for the server to accept connections.
const START_TIMEOUT_SECS: &str = "60";

/// A private PostgreSQL server with superuser `postgres` and a random password.
pub struct PostgresServer {
    port: u16,
    password: String,
    data: PathBuf,
    log: PathBuf,
    running: bool,
    /// The CA and server certificate, when TLS is on.
    tls: Option<TestPki>,
    // Dropped last, after the server is stopped.
    dir: TempDir,
}

/// `bin` as a command, run as the `postgres` user when we are root.
fn as_postgres(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new(require("runuser"));
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl PostgresServer {
    /// Initialises a cluster in a temporary directory, starts it on a random
    /// port of 127.0.0.1 and waits until it accepts connections.
    pub fn start() -> PostgresServer {
        Self::start_with(false)
    }

    /// [`PostgresServer::start`] with TLS: `ssl = on` with a server
    /// certificate for 127.0.0.1 / localhost signed by a fresh CA
    /// ([`PostgresServer::ca_file`]), and `hostssl` lines only, so every TCP
    /// connection must use TLS (still scram-sha-256).
    pub fn start_tls() -> PostgresServer {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> PostgresServer {
        let initdb = require("initdb");
        let pg_ctl = require("pg_ctl");
        let dir = tempfile::Builder::new()
            .prefix("keywave-postgres-")
            .tempdir()
            .expect("temporary directory");
        if is_root() {
            let (uid, gid) = system_user("postgres").unwrap_or_else(|| {
                panic!("running as root, PostgreSQL needs the `postgres` system user (apt-get install postgresql creates it)")
            });
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the PostgreSQL directory to postgres");
        }
        let password = random_password(24);
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).expect("write password file");
        if is_root() {
            let (uid, gid) = system_user("postgres").expect("postgres user");
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).expect("chown pwfile");
        }
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let mut cmd = as_postgres(&initdb);
        cmd.arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run_logged("initdb", cmd, &dir.path().join("initdb.log")).unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_file(&pwfile);
        let tls = tls.then(|| enable_tls(dir.path(), &data));

        let mut server = PostgresServer {
            port: 0,
            password,
            data,
            log,
            running: false,
            tls,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            match server.pg_ctl_start(&pg_ctl) {
                Ok(()) => {
                    server.running = true;
                    return server;
                }
                Err(e) => {
                    let log = crate::process::tail(&server.log, 20);
                    if log.contains("could not bind") && attempt < PORT_ATTEMPTS {
                        continue;
                    }
                    panic!("{e}\nserver log:\n{log}");
                }
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `pg_ctl start` on this server's data directory and port.
    fn pg_ctl_start(&self, pg_ctl: &Path) -> Result<(), String> {
        let mut cmd = as_postgres(pg_ctl);
        let ssl = match &self.tls {
            Some(p) => format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                p.cert.display(),
                p.key.display()
            ),
            None => String::new(),
        };
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", START_TIMEOUT_SECS, "-o"])
            .arg(format!(
                // Durability is pointless for a throw-away test database.
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200{ssl}",
                self.port,
                self.dir.path().display()
            ))
            .arg("start");
        run_logged("pg_ctl start", cmd, &self.dir.path().join("pg_ctl.log"))
    }

    /// Stops the server with `pg_ctl stop -m fast` (sessions are terminated,
    /// new connections refused) and waits until it is down. The data stays;
    /// [`PostgresServer::restart`] brings it back on the same port.
    pub fn stop_fast(&mut self) {
        let mut cmd = as_postgres(&require("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_logged("pg_ctl stop", cmd, &self.dir.path().join("pg_ctl.log"))
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.log_tail()));
        self.running = false;
    }

    /// Starts a server stopped by [`PostgresServer::stop_fast`] again, on the
    /// same port and data directory, and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(!self.running, "restart of a running server");
        self.pg_ctl_start(&require("pg_ctl"))
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.log_tail()));
        self.running = true;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The CA certificate (PEM) that signed the server's certificate, when
    /// started with [`PostgresServer::start_tls`].
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|p| p.ca.as_path())
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.url_as("postgres", &self.password)
    }

    /// The URL of database `postgres` as another role; the password must be URL-safe.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/postgres",
            self.port
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        crate::process::tail(&self.log, 40)
    }

    /// Runs SQL as the superuser with `psql` over TCP (password auth) and
    /// returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> Result<String, String> {
        self.psql_as("postgres", &self.password, sql)
    }

    /// [`PostgresServer::psql`] as another role: also a real authentication check.
    pub fn psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        let mut cmd = Command::new(require("psql"));
        cmd.args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
        if let Some(p) = &self.tls {
            cmd.env("PGSSLMODE", "verify-ca")
                .env("PGSSLROOTCERT", &p.ca);
        }
        let out = cmd.output().map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

/// TLS material in `<dir>/tls` (readable by the server only) and a
/// `pg_hba.conf` that takes TCP connections over TLS only.
fn enable_tls(dir: &Path, data: &Path) -> TestPki {
    let tls_dir = dir.join("tls");
    std::fs::create_dir(&tls_dir).expect("create the TLS directory");
    let pki = TestPki::generate(&tls_dir);
    let hba = data.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "# keywave test server: TLS for every TCP connection.\n\
         local   all all                scram-sha-256\n\
         hostssl all all 127.0.0.1/32   scram-sha-256\n\
         hostssl all all ::1/128        scram-sha-256\n",
    )
    .expect("write pg_hba.conf");
    // The server refuses a key file others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the server key");
    if is_root() {
        let (uid, gid) = system_user("postgres").expect("postgres user");
        for p in [&tls_dir, &pki.cert, &pki.key, &hba] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown TLS files to postgres");
        }
    }
    pki
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log ({}) ---\n{}\n--- end of postgres log ---",
                self.log.display(),
                self.log_tail()
            );
        }
        // Immediate: the data is thrown away, so skip the shutdown checkpoint.
        if let Some(pg_ctl) = crate::process::find("pg_ctl") {
            let mut cmd = as_postgres(&pg_ctl);
            cmd.arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"]);
            let _ = run_logged("pg_ctl stop", cmd, &self.dir.path().join("pg_ctl.log"));
        }
    }
}
