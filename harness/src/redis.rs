//! A private `redis-server` for tests that rotate real Redis ACL users: a
//! random loopback port (or a region namespace's address), nothing
//! persisted, its directory and log in a temporary directory, killed on
//! drop.

use crate::process::{free_port, require, Daemon};
use crate::RegionNet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tempfile::TempDir;

const START_TIMEOUT: Duration = Duration::from_secs(20);
const PORT_ATTEMPTS: usize = 5;

/// Whether the server on `host:port` answers `PING` with `+PONG`.
fn pong(host: IpAddr, port: u16) -> Result<(), String> {
    let addr = (host, port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"PING\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
    let reply = String::from_utf8_lossy(&buf[..n]);
    if reply.starts_with("+PONG") {
        Ok(())
    } else {
        // "-LOADING ..." while starting, or an error worth showing.
        Err(format!("PING answered {:?}", reply.trim_end()))
    }
}

/// A private Redis server. The default user is open (no password), as on a
/// fresh install; tests create their own ACL users on it.
pub struct RedisServer {
    host: IpAddr,
    port: u16,
    daemon: Daemon,
    // Dropped after `daemon`.
    dir: TempDir,
}

impl RedisServer {
    /// Starts `redis-server --port P --save "" --appendonly no --bind 127.0.0.1`
    /// in a temporary directory and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("keywave-redis-")
            .tempdir()
            .expect("temporary directory");
        RedisServer::start_with(Ipv4Addr::LOCALHOST, dir, |bin| Command::new(bin))
    }

    /// A server inside `region`'s namespace of `net`, listening on the
    /// region's address (reached from the root namespace while the region's
    /// link is up) and on the namespace's own 127.0.0.1.
    pub fn start_in(net: &RegionNet, region: &str) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix(&format!("redis-{region}-"))
            .tempdir_in(net.dir())
            .expect("temporary directory");
        RedisServer::start_with(net.addr(region), dir, |bin| net.command(region, bin))
    }

    fn start_with(
        host: Ipv4Addr,
        dir: TempDir,
        command: impl Fn(&PathBuf) -> Command,
    ) -> RedisServer {
        let bin = require("redis-server");
        let log = dir.path().join("redis-server.log");
        let mut bind = vec![host.to_string()];
        if !host.is_loopback() {
            bind.push(Ipv4Addr::LOCALHOST.to_string());
        }
        let host = IpAddr::V4(host);
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port();
            let mut cmd = command(&bin);
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--save", "", "--appendonly", "no", "--bind"])
                .args(&bind)
                .args(["--protected-mode", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(dir.path());
            let mut daemon = Daemon::spawn("redis-server", cmd, &log);
            match daemon.wait_ready(START_TIMEOUT, || pong(host, port)) {
                Ok(()) => {
                    return RedisServer {
                        host,
                        port,
                        daemon,
                        dir,
                    }
                }
                Err(e) if e.port_clash() && attempt < PORT_ATTEMPTS => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `redis://<host>:<port>` (the default user, no password); the host
    /// is 127.0.0.1, or the region's address for [`RedisServer::start_in`].
    pub fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }

    /// `redis://<user>:<password>@<host>:<port>`; the password must be URL-safe
    /// (keywave's generated secrets are alphanumeric by default).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@{}:{}", self.host, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }
}
