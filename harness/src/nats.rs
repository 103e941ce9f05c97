//! Real `nats-server` processes: a restartable single JetStream node
//! ([`NatsServer`], also what `keywave dev` and `keywave bench` start) and a
//! three-node JetStream cluster ([`NatsCluster`]), and the multi-region
//! supercluster of `deploy/multi-region/` ([`NatsSupercluster`]), on random
//! loopback ports with temporary store directories, killed on drop.
//! Modelled on the `nats-server` test crate of nats.rs.

use crate::process::{locate, try_free_port, Daemon};
use crate::HarnessError;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::time::Duration;
use tempfile::TempDir;

/// The configuration of the servers the tests start: small JetStream limits
/// and a payload limit that carries oversized tasks. Written into each
/// server's temporary directory (the binary using it may run anywhere).
pub const TEST_CONFIG: &str = include_str!("jetstream.conf");

/// The name of the configuration file in a server's directory.
const CONFIG_FILE: &str = "nats-server.conf";

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
pub(crate) fn jetstream_answers(url: &str) -> Result<(), String> {
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

/// How to start a [`NatsServer`]. The default is `nats-server`'s own
/// configuration (what `keywave dev` and `keywave bench` run);
/// [`NatsOptions::for_tests`] is what [`NatsServer::start`] runs.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The server name (`-n`); `None` lets `nats-server` choose one.
    pub name: Option<String>,
    /// A configuration file's text, written into the server's directory and
    /// passed with `-c`; the command line's address, port and store
    /// directory win over it. `None` passes no file.
    pub config: Option<String>,
}

impl NatsOptions {
    /// A server named `keywave-test` running [`TEST_CONFIG`].
    pub fn for_tests() -> NatsOptions {
        NatsOptions {
            name: Some("keywave-test".to_string()),
            config: Some(TEST_CONFIG.to_string()),
        }
    }
}

/// Writes `text` as the configuration file of `dir`.
fn write_config(dir: &Path, text: &str) -> Result<PathBuf, HarnessError> {
    let path = dir.join(CONFIG_FILE);
    std::fs::write(&path, text).map_err(HarnessError::io(format!("writing {}", path.display())))?;
    Ok(path)
}

/// A temporary directory named `<prefix>...`.
fn temp_dir(prefix: &str) -> Result<TempDir, HarnessError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(HarnessError::io("creating a temporary directory"))
}

/// One `nats-server` process: its fixed ports and directories, and the
/// running daemon if any. Restarting reuses everything but the process.
struct Node {
    name: Option<String>,
    config: Option<PathBuf>,
    port: u16,
    store: PathBuf,
    log: PathBuf,
    extra: Vec<String>,
    /// The configuration file has everything (address, ports, store): no
    /// command-line flags but `-c`.
    config_only: bool,
    daemon: Option<Daemon>,
}

impl Node {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        self.kill();
        let mut cmd = Command::new(locate("nats-server")?);
        if let Some(config) = &self.config {
            cmd.arg("-c").arg(config);
        }
        if !self.config_only {
            cmd.args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .arg("-sd")
                .arg(&self.store);
            if let Some(name) = &self.name {
                cmd.arg("-n").arg(name);
            }
        }
        cmd.args(&self.extra);
        let label = match &self.name {
            Some(name) => format!("nats-server {name}"),
            None => "nats-server".to_string(),
        };
        self.daemon = Some(Daemon::try_spawn(label, cmd, &self.log)?);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let url = self.url();
        let daemon = self.daemon.as_mut().expect("node spawned");
        daemon.wait_ready(START_TIMEOUT, || jetstream_answers(&url))
    }

    /// Starts the process (again) and waits until JetStream answers.
    fn start(&mut self) -> Result<(), HarnessError> {
        self.spawn()?;
        self.wait_ready()
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
/// let server = keywave_harness::NatsServer::start();
/// let client = server.client().await;
/// # }
/// ```
pub struct NatsServer {
    node: Node,
    // Dropped after `node`, so the process is gone before its files are.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server as [`NatsOptions::for_tests`] says and waits until
    /// JetStream answers. Panics with the server log when it does not come
    /// up (or when `nats-server` is missing).
    pub fn start() -> NatsServer {
        NatsServer::try_start(&NatsOptions::for_tests()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server as `opts` say and waits until JetStream answers,
    /// trying another port when the one picked was taken meanwhile.
    pub fn try_start(opts: &NatsOptions) -> Result<NatsServer, HarnessError> {
        let dir = temp_dir("keywave-nats-")?;
        let config = match &opts.config {
            Some(text) => Some(write_config(dir.path(), text)?),
            None => None,
        };
        let mut node = Node {
            name: opts.name.clone(),
            config,
            port: 0,
            store: dir.path().join("store"),
            log: dir.path().join("nats-server.log"),
            extra: Vec::new(),
            config_only: false,
            daemon: None,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            node.port = try_free_port()?;
            match node.start() {
                Ok(()) => return Ok(NatsServer { node, dir }),
                Err(e) if e.port_clash() && attempt < PORT_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
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
    pub fn try_restart(&mut self) -> Result<(), HarnessError> {
        self.node.start()
    }

    /// [`NatsServer::try_restart`], panicking when the server does not come back.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("restart: {e}");
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.node.daemon.as_ref().and_then(Daemon::pid)
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
    /// and waits until every node answers JetStream requests. Panics with
    /// the failing node's log when one does not come up.
    pub fn start(n: usize) -> NatsCluster {
        NatsCluster::try_start(n).unwrap_or_else(|e| panic!("cluster start: {e}"))
    }

    /// [`NatsCluster::start`], returning the error instead of panicking.
    pub fn try_start(n: usize) -> Result<NatsCluster, HarnessError> {
        assert!(n >= 1, "a cluster needs at least one node");
        let dir = temp_dir("keywave-nats-cluster-")?;
        let config = write_config(dir.path(), TEST_CONFIG)?;
        let client_ports = (0..n)
            .map(|_| try_free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let route_ports = (0..n)
            .map(|_| try_free_port())
            .collect::<Result<Vec<_>, _>>()?;
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
                    name: Some(format!("node{}", i + 1)),
                    config: Some(config.clone()),
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
                    config_only: false,
                    daemon: None,
                }
            })
            .collect();
        // All nodes first: none answers JetStream before a quorum is up.
        for node in &mut nodes {
            node.spawn()?;
        }
        for node in &mut nodes {
            node.wait_ready()?;
        }
        Ok(NatsCluster { nodes, dir })
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
        if let Err(e) = self.nodes[i].start() {
            panic!("restart of node {i}: {e}");
        }
    }
}

/// The server template of `deploy/multi-region/` (what `start.sh` renders).
pub const SUPERCLUSTER_TEMPLATE: &str = include_str!("../../deploy/multi-region/server.conf.tmpl");

/// The clusters of a [`NatsSupercluster`]: name, servers, the tag each
/// server carries. As `deploy/multi-region/start.sh` starts them.
pub const SUPERCLUSTER_LAYOUT: [(&str, usize, &str); 4] = [
    ("home", 3, "role:home"),
    ("eu", 1, "region:eu"),
    ("us", 1, "region:us"),
    ("ap", 1, "region:ap"),
];

/// One server of a [`NatsSupercluster`].
struct SuperNode {
    cluster: &'static str,
    http_port: u16,
    node: Node,
}

/// keywave's local multi-region supercluster (`deploy/multi-region/`): a
/// home cluster of 3 servers and one server per region `eu`, `us`, `ap`,
/// joined by gateways, every server tagged (`region:<region>`, `role:home`)
/// and named `<cluster><n>` (`home1`, `eu1`, ...), rendered from the same
/// template as `start.sh` with free loopback ports and temporary stores.
/// Killed on drop.
pub struct NatsSupercluster {
    nodes: Vec<SuperNode>,
    dir: TempDir,
}

impl NatsSupercluster {
    /// Starts every server and waits until each answers JetStream requests
    /// and the JetStream meta leader sees every server as a current peer
    /// (before that, placement may not find a region's servers). Panics
    /// with a log when one does not come up.
    pub fn start() -> NatsSupercluster {
        NatsSupercluster::try_start().unwrap_or_else(|e| panic!("supercluster start: {e}"))
    }

    /// [`NatsSupercluster::start`], returning the error instead of panicking.
    pub fn try_start() -> Result<NatsSupercluster, HarnessError> {
        let dir = temp_dir("keywave-nats-super-")?;
        struct Ports {
            client: u16,
            route: u16,
            gateway: u16,
            http: u16,
        }
        let mut servers = Vec::new();
        for (cluster, n, tag) in SUPERCLUSTER_LAYOUT {
            for i in 1..=n {
                let ports = Ports {
                    client: try_free_port()?,
                    route: try_free_port()?,
                    gateway: try_free_port()?,
                    http: try_free_port()?,
                };
                servers.push((cluster, format!("{cluster}{i}"), tag, ports));
            }
        }
        let routes_of = |cluster: &str| {
            servers
                .iter()
                .filter(|s| s.0 == cluster)
                .map(|s| format!("\"nats-route://127.0.0.1:{}\"", s.3.route))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let gateways = SUPERCLUSTER_LAYOUT
            .iter()
            .map(|(cluster, _, _)| {
                let first = servers.iter().find(|s| s.0 == *cluster).expect("a server");
                format!(
                    "{{name: {cluster}, urls: [\"nats://127.0.0.1:{}\"]}}",
                    first.3.gateway
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (cluster, name, tag, ports) in &servers {
            let home = dir.path().join(name);
            std::fs::create_dir_all(&home)
                .map_err(HarnessError::io(format!("creating {}", home.display())))?;
            let store = home.join("store");
            let text = SUPERCLUSTER_TEMPLATE
                .replace("@NAME@", name)
                .replace("@HOST@", "127.0.0.1")
                .replace("@CLUSTER@", cluster)
                .replace("@TAGS@", &format!("\"{tag}\""))
                .replace("@CLIENT_PORT@", &ports.client.to_string())
                .replace("@ROUTE_PORT@", &ports.route.to_string())
                .replace("@GATEWAY_PORT@", &ports.gateway.to_string())
                .replace("@HTTP_PORT@", &ports.http.to_string())
                .replace("@STORE_DIR@", &store.display().to_string())
                .replace("@MAX_MEMORY@", "256MB")
                .replace("@MAX_FILE@", "1GB")
                .replace("@ROUTES@", &routes_of(cluster))
                .replace("@GATEWAYS@", &gateways)
                .replace("@ACCOUNTS@", "");
            let config = write_config(&home, &text)?;
            nodes.push(SuperNode {
                cluster,
                http_port: ports.http,
                node: Node {
                    name: Some(name.clone()),
                    config: Some(config),
                    port: ports.client,
                    store,
                    log: dir.path().join(format!("{name}.log")),
                    extra: Vec::new(),
                    config_only: true,
                    daemon: None,
                },
            });
        }
        let mut sc = NatsSupercluster { nodes, dir };
        // All servers first: none answers JetStream before a meta leader
        // is elected, which needs a quorum of all of them.
        for n in &mut sc.nodes {
            n.node.spawn()?;
        }
        for n in &mut sc.nodes {
            n.node.wait_ready()?;
        }
        sc.wait_all_peers()?;
        Ok(sc)
    }

    /// Waits until one server, the meta leader, reports every other server
    /// as a current peer in its `/jsz`.
    fn wait_all_peers(&mut self) -> Result<(), HarnessError> {
        let want = self.nodes.len() - 1;
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.http_port).collect();
        let first = &mut self.nodes[0].node;
        let daemon = first.daemon.as_mut().expect("node spawned");
        daemon.wait_ready(START_TIMEOUT, || {
            let mut seen = Vec::new();
            for port in &ports {
                let Ok(jsz) = http_get_json(*port, "/jsz") else {
                    continue;
                };
                let Some(replicas) = jsz["meta_cluster"]["replicas"].as_array() else {
                    continue;
                };
                let current = replicas
                    .iter()
                    .filter(|r| r["current"].as_bool() == Some(true))
                    .count();
                if current >= want {
                    return Ok(());
                }
                seen.push(current);
            }
            Err(format!(
                "the JetStream meta leader sees {seen:?} of {want} other servers as current peers"
            ))
        })
    }

    /// The cluster (gateway) names, home first.
    pub fn clusters(&self) -> Vec<&'static str> {
        SUPERCLUSTER_LAYOUT.iter().map(|c| c.0).collect()
    }

    /// Server names of `cluster` (`home1`, `home2`, `home3`; `eu1`).
    pub fn server_names(&self, cluster: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.cluster == cluster)
            .filter_map(|n| n.node.name.clone())
            .collect()
    }

    /// Client URLs of `cluster`'s servers.
    pub fn urls(&self, cluster: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.cluster == cluster)
            .map(|n| n.node.url())
            .collect()
    }

    /// A client connected to `cluster`'s servers (failing over between them).
    pub async fn client(&self, cluster: &str) -> async_nats::Client {
        let urls = self.urls(cluster);
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(urls.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to {cluster} {urls:?}: {e}"))
    }

    /// The temporary directory holding every server's config, store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The JetStream store directory of server `name` (`home1`, `eu1`, ...).
    pub fn store_dir(&self, name: &str) -> Option<&Path> {
        self.nodes
            .iter()
            .find(|n| n.node.name.as_deref() == Some(name))
            .map(|n| n.node.store.as_path())
    }

    /// The last lines of every server's log, for assertion messages.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "--- {}:\n{}",
                    n.node.name.as_deref().unwrap_or("?"),
                    n.node.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `GET http://127.0.0.1:<port><path>` of a server's monitoring endpoint,
/// parsed as JSON (a blocking, bounded, dependency-free HTTP/1.0 request).
fn http_get_json(port: u16, path: &str) -> Result<serde_json::Value, String> {
    http_get_json_at([127, 0, 0, 1].into(), port, path)
}

/// [`http_get_json`] of a server listening on `ip`.
pub(crate) fn http_get_json_at(
    ip: std::net::IpAddr,
    port: u16,
    path: &str,
) -> Result<serde_json::Value, String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(ip, port);
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| format!("connect :{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|_| s.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut body = String::new();
    s.take(4 << 20)
        .read_to_string(&mut body)
        .map_err(|e| e.to_string())?;
    let json = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no HTTP body")?;
    serde_json::from_str(json).map_err(|e| format!("{path} is not JSON: {e}"))
}

/// Losing and bringing back one server of a [`NatsSupercluster`], by name
/// (`home1`, `eu1`, ...), and finding who leads: what the home cluster's
/// resilience tests need.
impl NatsSupercluster {
    fn node_named(&self, name: &str) -> &SuperNode {
        self.nodes
            .iter()
            .find(|n| n.node.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no server named {name} in the supercluster"))
    }

    fn node_named_mut(&mut self, name: &str) -> &mut SuperNode {
        self.nodes
            .iter_mut()
            .find(|n| n.node.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no server named {name} in the supercluster"))
    }

    /// Client URL of the server named `name`.
    pub fn url_of(&self, name: &str) -> String {
        self.node_named(name).node.url()
    }

    /// The name of the server listening for clients on `port` (what
    /// `client.server_info().port` says a client is connected to).
    pub fn server_on_port(&self, port: u16) -> Option<String> {
        self.nodes
            .iter()
            .find(|n| n.node.port == port)
            .and_then(|n| n.node.name.clone())
    }

    /// Kills the server named `name` (SIGKILL); its ports and store are kept
    /// for [`NatsSupercluster::restart_server`].
    pub fn kill_server(&mut self, name: &str) {
        self.node_named_mut(name).node.kill();
    }

    /// Kills the server named `name` if it runs, starts it again with the
    /// same configuration, ports and store, and waits until it answers
    /// JetStream requests.
    pub fn try_restart_server(&mut self, name: &str) -> Result<(), HarnessError> {
        self.node_named_mut(name).node.start()
    }

    /// [`NatsSupercluster::try_restart_server`], panicking with the
    /// server's log when it does not come back.
    pub fn restart_server(&mut self, name: &str) {
        if let Err(e) = self.try_restart_server(name) {
            panic!("restart of {name}: {e}");
        }
    }

    /// Whether the server named `name` runs.
    pub fn is_running(&mut self, name: &str) -> bool {
        match self.node_named_mut(name).node.daemon.as_mut() {
            Some(d) => d.exited().is_none(),
            None => false,
        }
    }

    /// The JetStream meta leader, as the first running server that names
    /// one in its `/jsz` says.
    pub fn meta_leader(&mut self) -> Option<String> {
        let mut running = Vec::new();
        for n in &mut self.nodes {
            if n.node.daemon.as_mut().is_some_and(|d| d.exited().is_none()) {
                running.push(n.http_port);
            }
        }
        running.into_iter().find_map(|port| {
            let jsz = http_get_json(port, "/jsz").ok()?;
            jsz["meta_cluster"]["leader"]
                .as_str()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
        })
    }
}
