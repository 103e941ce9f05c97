//! Real `nats-server` processes for tests: a restartable single JetStream
//! node ([`NatsServer`]) and a three-node JetStream cluster ([`NatsCluster`]),
//! on random loopback ports with temporary store directories, killed on drop.
//! Modelled on the `nats-server` test crate of nats.rs.

use crate::process::{free_port, require, Daemon, StartError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;
use tempfile::TempDir;

/// Base configuration shared by every server the harness starts.
pub const BASE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/jetstream.conf");

/// How long a server may take to answer JetStream requests after it starts.
/// A cluster needs to elect a meta leader first, hence the generous bound.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts at finding a free port before giving up.
const PORT_ATTEMPTS: usize = 5;

/// A small runtime of its own for readiness probes, so that the synchronous
/// `start`/`restart` work both inside and outside a test's tokio runtime.
fn probe_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nats-probe")
            .enable_all()
            .build()
            .expect("probe runtime")
    })
}

/// Whether a client can connect to `url` and JetStream answers an account
/// info request (which, on a cluster, needs an elected meta leader).
fn jetstream_answers(url: &str) -> Result<(), String> {
    let url = url.to_string();
    let (tx, rx) = mpsc::channel();
    probe_runtime().spawn(async move {
        let r = async {
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(Duration::from_secs(1))
                .connect(url.as_str())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            // A raw request rather than `query_account`: it only needs the
            // reply to be a JSON object without an `error`, whatever the
            // server version's account-info fields are.
            let reply = tokio::time::timeout(
                Duration::from_secs(2),
                client.request("$JS.API.INFO", "".into()),
            )
            .await
            .map_err(|_| "JetStream account info timed out".to_string())?
            .map_err(|e| format!("JetStream account info: {e}"))?;
            let v: serde_json::Value = serde_json::from_slice(&reply.payload)
                .map_err(|e| format!("JetStream account info is not JSON: {e}"))?;
            match v.get("error") {
                None => Ok(()),
                Some(e) => Err(format!("JetStream account info: {e}")),
            }
        }
        .await;
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(5))
        .map_err(|_| "probe did not finish".to_string())?
}

/// One `nats-server` process: its fixed ports and directories, and the
/// running daemon if any. Restarting reuses everything but the process.
struct Node {
    name: String,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    daemon: Option<Daemon>,
}

impl Node {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        self.kill();
        let mut cmd = Command::new(require("nats-server"));
        cmd.arg("-c")
            .arg(BASE_CONFIG)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store)
            .arg("-n")
            .arg(&self.name)
            .args(&self.extra);
        self.daemon = Some(Daemon::spawn(
            format!("nats-server {}", self.name),
            cmd,
            &self.log,
        ));
    }

    fn wait_ready(&mut self) -> Result<(), StartError> {
        let url = self.url();
        let daemon = self.daemon.as_mut().expect("node spawned");
        daemon.wait_ready(START_TIMEOUT, || jetstream_answers(&url))
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    fn log_tail(&self) -> String {
        crate::process::tail(&self.log, 40)
    }
}

/// A single JetStream-enabled `nats-server` on a random port of 127.0.0.1
/// with a temporary store directory. Killed (and the directory removed) on
/// drop; if the test is panicking, the end of the server log is printed.
///
/// ```no_run
/// # async fn f() {
/// let server = keywave_tests::NatsServer::start();
/// let client = server.client().await;
/// # }
/// ```
pub struct NatsServer {
    node: Node,
    // Dropped after `node`, so the process is gone before its files are.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server and waits until JetStream answers. Panics with the
    /// server log when it does not come up (or when `nats-server` is missing).
    pub fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("keywave-nats-")
            .tempdir()
            .expect("temporary directory");
        let mut node = Node {
            name: "keywave-test".to_string(),
            port: 0,
            store: dir.path().join("store"),
            log: dir.path().join("nats-server.log"),
            extra: Vec::new(),
            daemon: None,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            node.port = free_port();
            node.spawn();
            match node.wait_ready() {
                Ok(()) => return NatsServer { node, dir },
                Err(e) if e.port_clash() && attempt < PORT_ATTEMPTS => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the last attempt panics")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.node.url()
    }

    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> &Path {
        &self.node.store
    }

    /// The temporary directory holding the store and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> &Path {
        &self.node.log
    }

    /// The last lines of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        self.node.log_tail()
    }

    /// A client connected to this server. It reconnects on its own after a
    /// [`NatsServer::restart`], as an application's client would.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}\n{}", self.url(), self.log_tail()))
    }

    /// Kills the server (SIGKILL) and starts it again on the same port with
    /// the same store directory, then waits until JetStream answers.
    pub fn restart(&mut self) {
        self.node.spawn();
        if let Err(e) = self.node.wait_ready() {
            panic!("restart: {e}");
        }
    }

    /// Kills the server (SIGKILL). [`NatsServer::restart`] brings it back.
    pub fn kill(&mut self) {
        self.node.kill();
    }

    /// Whether the server process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.node.daemon.as_mut() {
            Some(d) => d.exited().is_none(),
            None => false,
        }
    }
}

/// A JetStream cluster of `n` `nats-server` nodes on random loopback ports,
/// fully meshed by routes, each with its own store directory.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes (3 is the smallest cluster that survives losing one)
    /// and waits until every node answers JetStream requests.
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let dir = tempfile::Builder::new()
            .prefix("keywave-nats-cluster-")
            .tempdir()
            .expect("temporary directory");
        let client_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let cluster_name = crate::wait::unique("keywave-test");
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let routes: Vec<String> = route_ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect();
                Node {
                    name: format!("node{}", i + 1),
                    port: client_ports[i],
                    store: dir.path().join(format!("node{}", i + 1)),
                    log: dir.path().join(format!("node{}.log", i + 1)),
                    extra: vec![
                        "--cluster_name".into(),
                        cluster_name.clone(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{}", route_ports[i]),
                        "--routes".into(),
                        routes.join(","),
                    ],
                    daemon: None,
                }
            })
            .collect();
        // All nodes first: none answers JetStream before a quorum is up.
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            if let Err(e) = node.wait_ready() {
                panic!("cluster start: {e}");
            }
        }
        NatsCluster { nodes, dir }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Client URLs of every node, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    /// Client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    /// The temporary directory holding every node's store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].log_tail()
    }

    /// A client that knows every node and fails over between them.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(self.urls())
            .await
            .unwrap_or_else(|e| panic!("connect to cluster {:?}: {e}", self.urls()))
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Kills node `i` if it runs, starts it again with the same ports and
    /// store, and waits until it answers JetStream requests.
    pub fn restart_node(&mut self, i: usize) {
        self.nodes[i].spawn();
        if let Err(e) = self.nodes[i].wait_ready() {
            panic!("restart of node {i}: {e}");
        }
    }
}
