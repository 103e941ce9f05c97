//! Child processes of the harness: finding a server binary on `PATH` (or
//! failing loudly with how to install it), free loopback ports, and a
//! [`Daemon`] that runs a server with its output in a log file and kills it
//! when dropped.

use crate::HarnessError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Directories searched after `PATH`: Debian installs daemons in `sbin`,
/// which is not on an unprivileged user's `PATH`.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// How to install each binary the harness starts, for the panic message.
fn install_hint(binary: &str) -> &'static str {
    match binary {
        "nats-server" => "apt-get install nats-server (or a release from https://github.com/nats-io/nats-server/releases on PATH)",
        "redis-server" | "redis-cli" => "apt-get install redis-server",
        "initdb" | "pg_ctl" | "postgres" | "psql" => {
            "apt-get install postgresql (its binaries live in /usr/lib/postgresql/<version>/bin)"
        }
        "mariadbd" | "mariadb-install-db" => "apt-get install mariadb-server",
        "mariadb" | "mariadb-admin" => "apt-get install mariadb-client",
        "runuser" => "apt-get install util-linux",
        "ip" => "apt-get install iproute2",
        _ => "install it with your package manager",
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where `binary` is on `PATH`, if anywhere.
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    first_executable(std::env::split_paths(&path), binary)
}

/// Where `binary` is, if installed: `PATH`, then the `sbin` directories, then
/// (for PostgreSQL's tools) the newest `/usr/lib/postgresql/<version>/bin`.
pub fn find(binary: &str) -> Option<PathBuf> {
    find_on_path(binary).or_else(|| {
        let mut dirs: Vec<PathBuf> = EXTRA_DIRS.iter().map(PathBuf::from).collect();
        if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
            versions.sort();
            dirs.extend(versions.into_iter().rev());
        }
        first_executable(dirs, binary)
    })
}

fn first_executable(dirs: impl IntoIterator<Item = PathBuf>, binary: &str) -> Option<PathBuf> {
    dirs.into_iter()
        .map(|d| d.join(binary))
        .find(|p| is_executable(p))
}

/// The path of `binary`, or [`HarnessError::Missing`] with how to install it.
pub fn locate(binary: &str) -> Result<PathBuf, HarnessError> {
    find(binary).ok_or_else(|| HarnessError::Missing {
        binary: binary.to_string(),
        searched: EXTRA_DIRS,
        hint: install_hint(binary),
    })
}

/// The path of `binary`, or a panic that says how to install it.
///
/// Tests that need a server never skip silently when it is missing: a green
/// run must mean the real thing was exercised (CI sets `CI` and relies on it).
pub fn require(binary: &str) -> PathBuf {
    match find(binary) {
        Some(p) => p,
        None => panic!(
            "`{binary}` is required by this test but was not found on PATH or in {EXTRA_DIRS:?}; \
             install it: {} (deploy/test.sh does this for you){}",
            install_hint(binary),
            if std::env::var_os("CI").is_some() {
                " [CI is set: missing test dependencies are errors, not skips]"
            } else {
                ""
            }
        ),
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago. The port is released
/// before the server binds it, so callers retry on "address in use".
pub fn try_free_port() -> Result<u16, HarnessError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(HarnessError::io("no free port on 127.0.0.1"))
}

/// [`try_free_port`], panicking when there is none.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("{e}"))
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(_) => return String::new(),
    };
    // Only the end of a long log matters for a failure message.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A server process whose stdout and stderr go to a log file, killed (SIGKILL)
/// and reaped on drop. If the thread is panicking at that moment, the end of
/// the log is printed so a failed test shows what the server said.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd`, appending its output to `log`.
    pub fn try_spawn(
        name: impl Into<String>,
        mut cmd: Command,
        log: &Path,
    ) -> Result<Daemon, HarnessError> {
        let name = name.into();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(HarnessError::io(format!(
                "{name}: cannot open log {}",
                log.display()
            )))?;
        let err = out
            .try_clone()
            .map_err(HarnessError::io(format!("{name}: clone log file handle")))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .map_err(HarnessError::io(format!("{name}: cannot start {cmd:?}")))?;
        Ok(Daemon {
            name,
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// [`Daemon::try_spawn`], panicking when the process cannot be started.
    pub fn spawn(name: impl Into<String>, cmd: Command, log: &Path) -> Daemon {
        Daemon::try_spawn(name, cmd, log).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process (SIGKILL: no chance to flush or say goodbye) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The end of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 40)
    }

    /// Polls `ready` until it returns `Ok`, the process exits, or `timeout`
    /// passes. The error says which, with the last probe error and the end of
    /// the log; [`HarnessError::port_clash`] tells a caller to retry elsewhere.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> Result<(), String>,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return Err(HarnessError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log.clone(),
                    log_tail: self.log_tail(),
                });
            }
            let last = match ready() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    name: self.name.clone(),
                    after: timeout,
                    probe: last,
                    log: self.log.clone(),
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- {} log ({}), last lines ---\n{}\n--- end of {} log ---",
                self.name,
                self.log.display(),
                self.log_tail(),
                self.name
            );
        }
        self.kill();
    }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The uid and gid of a local system user, from `/etc/passwd`.
pub fn system_user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// A random password of `len` alphanumeric characters (URL- and shell-safe).
pub fn random_password(len: usize) -> String {
    use rand::Rng;
    rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// Runs `cmd` to completion with its output appended to `log`; on failure the
/// error names the command and quotes the end of the log.
pub fn run_logged(what: &str, mut cmd: Command, log: &Path) -> Result<(), String> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{what}: cannot open log {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .status()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({status}); log {}:\n{}",
            log.display(),
            tail(log, 40)
        ))
    }
}
