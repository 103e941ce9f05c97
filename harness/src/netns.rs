//! Regions as places on one machine: [`RegionNet`] gives each region a Linux
//! network namespace joined to a bridge in the root namespace by a veth
//! pair, so that a region can be cut off from the others by taking its link
//! down ([`RegionNet::cut`]) and joined again ([`RegionNet::heal`]);
//! [`NetSupercluster`] runs the supercluster of `deploy/multi-region/` with
//! the home cluster in the root namespace and each region's server inside
//! its region's namespace. Needs root and `ip` (iproute2). Everything is
//! removed on drop (processes left in a namespace are killed), and what a
//! killed run left behind is removed by the next one.

use crate::nats::{
    http_get_json_at, jetstream_answers, SUPERCLUSTER_LAYOUT, SUPERCLUSTER_TEMPLATE,
};
use crate::process::{find, is_root, locate, try_free_port, Daemon};
use crate::HarnessError;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;
use tempfile::TempDir;

/// Every name this module creates starts with it, followed by the pid of
/// the process that created it and `x<n>`: `kwn1234x0` (namespaces
/// `kwn1234x0-eu`, bridge `kwn1234x0b`, veths `kwn1234x0h0` / `kwn1234x0n0`,
/// temporary directory `keywave-netns-kwn1234x0-...`). A name whose process
/// is gone is a leftover.
const PREFIX: &str = "kwn";
/// The temporary directories' prefix (then the name prefix above).
const DIR_PREFIX: &str = "keywave-netns-";
/// Where `ip netns add` mounts the namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Linux limits interface names to 15 bytes.
const IFNAMSIZ: usize = 15;
/// Subnets are `10.213.<n>.0/24`, `n` chosen among the unused ones.
const SUBNET_BASE: [u8; 2] = [10, 213];

/// The numbers after `kwn<pid>x` this process has in use.
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Runs `ip <args>`; the error quotes its output.
fn ip(args: &[&str]) -> Result<String, HarnessError> {
    let what = format!("ip {}", args.join(" "));
    let out = Command::new(find("ip").unwrap_or_else(|| "ip".into()))
        .args(args)
        .output()
        .map_err(HarnessError::io(format!("cannot run {what}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::Setup {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Fails with a clear error unless this process may create namespaces:
/// root, and `ip` installed.
fn check_prerequisites() -> Result<(), HarnessError> {
    locate("ip")?;
    if !is_root() {
        return Err(HarnessError::Setup {
            what: "network namespaces".into(),
            detail: "creating network namespaces, veth pairs and a bridge needs root \
                     (run the test as root, as CI does)"
                .into(),
        });
    }
    Ok(())
}

/// `(pid, n)` of a name made by this module (`kwn<pid>x<n>...`).
fn owner_of(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, rest) = rest.split_once('x')?;
    let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((pid.parse().ok()?, n.parse().ok()?))
}

/// Whether the run that made `name` is over: its process is gone, or it is
/// this process and the number is not in use (a reused pid).
fn is_stale(name: &str) -> bool {
    let Some((pid, n)) = owner_of(name) else {
        return false;
    };
    if pid == std::process::id() {
        return !LIVE.lock().unwrap_or_else(|e| e.into_inner()).contains(&n);
    }
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills (SIGKILL) every process in namespace `ns`.
fn kill_namespace_processes(ns: &str) {
    let Ok(pids) = ip(&["netns", "pids", ns]) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        kill(pid);
    }
}

fn kill(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Removes what runs killed before they could clean up left behind:
/// processes started from their directories (the home cluster's servers)
/// or inside their namespaces, the namespaces, links and directories.
pub fn remove_stale() {
    // Processes in the root namespace started from a stale directory.
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            let stale = cmdline.split('\0').any(|arg| {
                arg.split('/')
                    .filter_map(|part| part.strip_prefix(DIR_PREFIX))
                    .any(is_stale)
            });
            if stale {
                kill(pid);
            }
        }
    }
    if let Ok(list) = ip(&["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(PREFIX) && is_stale(ns) {
                kill_namespace_processes(ns);
                let _ = ip(&["netns", "delete", ns]);
            }
        }
    }
    if let Ok(links) = ip(&["-o", "link", "show"]) {
        for l in links.lines() {
            // "12: kwn1234x0h0@if11: <BROADCAST,...> ..."
            let Some(name) = l.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with(PREFIX) && is_stale(name) {
                let _ = ip(&["link", "delete", name]);
            }
        }
    }
    if let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) {
        for d in dirs.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.strip_prefix(DIR_PREFIX).is_some_and(is_stale) {
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
}

/// One region's place: its namespace and its link to the bridge.
#[derive(Debug)]
struct Place {
    region: String,
    ns: String,
    /// The veth end on the bridge (root namespace): taken down to cut.
    host_if: String,
    addr: Ipv4Addr,
}

/// A bridge in the root namespace (`10.213.<n>.1/24`) and one network
/// namespace per region (`10.213.<n>.<10 + i>`), each joined to the bridge
/// by a veth pair. The root namespace reaches every region through the
/// bridge, and the regions reach each other through it, while their links
/// are up. Deleted on drop, with every process still inside a namespace.
#[derive(Debug)]
pub struct RegionNet {
    prefix: String,
    n: u32,
    bridge: String,
    host: Ipv4Addr,
    places: Vec<Place>,
    dir: TempDir,
}

impl RegionNet {
    /// Creates the namespaces of `regions` (after removing the leftovers of
    /// killed runs). Panics with what is missing when not root or `ip` is
    /// not installed.
    pub fn create(regions: &[&str]) -> RegionNet {
        RegionNet::try_create(regions).unwrap_or_else(|e| panic!("region namespaces: {e}"))
    }

    /// [`RegionNet::create`], returning the error instead of panicking.
    pub fn try_create(regions: &[&str]) -> Result<RegionNet, HarnessError> {
        check_prerequisites()?;
        remove_stale();
        let n = {
            let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
            let n = (0..).find(|n| !live.contains(n)).expect("a free number");
            live.insert(n);
            n
        };
        let prefix = format!("{PREFIX}{}x{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{prefix}-"))
            .tempdir()
            .map_err(HarnessError::io("temporary directory"));
        let dir = match dir {
            Ok(d) => d,
            Err(e) => {
                LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(&n);
                return Err(e);
            }
        };
        let mut net = RegionNet {
            bridge: format!("{prefix}b"),
            prefix,
            n,
            host: Ipv4Addr::UNSPECIFIED,
            places: Vec::new(),
            dir,
        };
        // On an error from here on, drop removes what was made.
        net.build(regions)?;
        Ok(net)
    }

    fn build(&mut self, regions: &[&str]) -> Result<(), HarnessError> {
        let subnet = free_subnet()?;
        let [a, b] = SUBNET_BASE;
        self.host = Ipv4Addr::new(a, b, subnet, 1);
        let long = format!("{}h{}", self.prefix, regions.len());
        if long.len() > IFNAMSIZ {
            return Err(HarnessError::Setup {
                what: "interface names".into(),
                detail: format!("{long} is longer than {IFNAMSIZ} bytes"),
            });
        }
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.host),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        for (i, region) in regions.iter().enumerate() {
            let ns = format!("{}-{region}", self.prefix);
            let host_if = format!("{}h{i}", self.prefix);
            let ns_if = format!("{}n{i}", self.prefix);
            let addr = Ipv4Addr::new(a, b, subnet, 10 + i as u8);
            ip(&["netns", "add", &ns])?;
            self.places.push(Place {
                region: region.to_string(),
                ns: ns.clone(),
                host_if: host_if.clone(),
                addr,
            });
            ip(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ])?;
            ip(&["link", "set", &ns_if, "netns", &ns])?;
            ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &ns_if,
            ])?;
            ip(&["-n", &ns, "link", "set", &ns_if, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn place(&self, region: &str) -> &Place {
        self.places
            .iter()
            .find(|p| p.region == region)
            .unwrap_or_else(|| panic!("no namespace for region {region}"))
    }

    /// The regions, in creation order.
    pub fn regions(&self) -> Vec<&str> {
        self.places.iter().map(|p| p.region.as_str()).collect()
    }

    /// Whether `region` has a namespace here.
    pub fn has(&self, region: &str) -> bool {
        self.places.iter().any(|p| p.region == region)
    }

    /// The root namespace's address on the bridge.
    pub fn host(&self) -> Ipv4Addr {
        self.host
    }

    /// `region`'s address (inside its namespace).
    pub fn addr(&self, region: &str) -> Ipv4Addr {
        self.place(region).addr
    }

    /// The name of `region`'s namespace (`ip netns exec <name> ...`).
    pub fn namespace(&self, region: &str) -> &str {
        &self.place(region).ns
    }

    /// A temporary directory removed with the namespaces (and by the next
    /// run when this one is killed).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program` run inside `region`'s namespace: `ip netns exec <ns>
    /// <program>` (which executes it in place: the child is the program).
    pub fn command(&self, region: &str, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(find("ip").unwrap_or_else(|| "ip".into()));
        cmd.args(["netns", "exec", self.namespace(region)])
            .arg(program);
        cmd
    }

    /// A handle on `region`'s namespace, for running code inside it
    /// ([`Netns::run`]).
    pub fn netns(&self, region: &str) -> Netns {
        Netns {
            path: PathBuf::from(NETNS_DIR).join(self.namespace(region)),
        }
    }

    /// Cuts `region` off: its link to the bridge goes down, so nothing
    /// passes between its namespace and the root namespace or the other
    /// regions (connections are not reset: packets are lost, as on a
    /// broken wide-area link).
    pub fn cut(&self, region: &str) {
        let p = self.place(region);
        ip(&["link", "set", &p.host_if, "down"]).unwrap_or_else(|e| panic!("cut {region}: {e}"));
    }

    /// Joins `region` again: its link goes up.
    pub fn heal(&self, region: &str) {
        let p = self.place(region);
        ip(&["link", "set", &p.host_if, "master", &self.bridge, "up"])
            .unwrap_or_else(|e| panic!("heal {region}: {e}"));
    }
}

impl Drop for RegionNet {
    fn drop(&mut self) {
        for p in &self.places {
            kill_namespace_processes(&p.ns);
            let _ = ip(&["link", "delete", &p.host_if]);
            let _ = ip(&["netns", "delete", &p.ns]);
        }
        let _ = ip(&["link", "delete", &self.bridge]);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.n);
    }
}

/// A region's network namespace, by the path `ip netns add` mounted it on.
/// Valid while its [`RegionNet`] lives.
#[derive(Debug, Clone)]
pub struct Netns {
    path: PathBuf,
}

impl Netns {
    /// Runs `f` on a thread of its own inside the namespace and returns
    /// what it returns. Sockets it creates stay in the namespace: a
    /// listener only the region's processes reach on its 127.0.0.1, a
    /// connection that keeps working while the region is cut off. Blocks
    /// until `f` returns.
    pub fn run<T, F>(&self, f: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                ns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// A `10.213.<n>.0/24` no address or route of this machine uses.
fn free_subnet() -> Result<u8, HarnessError> {
    let used = format!(
        "{}\n{}",
        ip(&["-4", "-o", "addr", "show"])?,
        ip(&["-4", "route", "show", "table", "all"])?
    );
    let [a, b] = SUBNET_BASE;
    let start = (std::process::id() % 254) as u8;
    (0..254u16)
        .map(|i| ((start as u16 + i) % 254 + 1) as u8)
        .find(|n| !used.contains(&format!("{a}.{b}.{n}.")))
        .ok_or_else(|| HarnessError::Setup {
            what: "a subnet for the region namespaces".into(),
            detail: format!("every {a}.{b}.<n>.0/24 is in use"),
        })
}

/// How long a server may take to answer JetStream requests after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One server of a [`NetSupercluster`].
struct NetServer {
    name: String,
    cluster: &'static str,
    addr: Ipv4Addr,
    port: u16,
    http_port: u16,
    log: PathBuf,
    daemon: Daemon,
}

impl NetServer {
    fn url(&self) -> String {
        format!("nats://{}:{}", self.addr, self.port)
    }
}

/// The supercluster of `deploy/multi-region/` ([`crate::NatsSupercluster`]'s
/// layout: home cluster of 3, one server per region `eu`, `us`, `ap`, the
/// same template and tags) spread over a [`RegionNet`]: the home servers in
/// the root namespace on the bridge's address, each region's server inside
/// its region's namespace on the region's address, the gateways between
/// them over the bridge. Cutting a region's link cuts its server off from
/// the home cluster and the other regions, as a wide-area outage would.
/// Killed on drop.
pub struct NetSupercluster {
    servers: Vec<NetServer>,
    dir: TempDir,
}

impl NetSupercluster {
    /// Starts every server and waits until each answers JetStream requests
    /// and the meta leader sees all of them as current peers. Panics with
    /// the logs when one does not come up.
    pub fn start(net: &RegionNet) -> NetSupercluster {
        NetSupercluster::try_start(net).unwrap_or_else(|e| panic!("supercluster start: {e}"))
    }

    /// [`NetSupercluster::start`], returning the error instead of panicking.
    pub fn try_start(net: &RegionNet) -> Result<NetSupercluster, HarnessError> {
        let bin = crate::process::locate("nats-server")?;
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir_in(net.dir())
            .map_err(HarnessError::io("temporary directory"))?;
        // (cluster, name, tag, address, [client, route, gateway, http]).
        let mut plan = Vec::new();
        for (cluster, n, tag) in SUPERCLUSTER_LAYOUT {
            let addr = if cluster == "home" {
                net.host()
            } else if net.has(cluster) {
                net.addr(cluster)
            } else {
                return Err(HarnessError::Setup {
                    what: "supercluster".into(),
                    detail: format!("region {cluster} has no namespace"),
                });
            };
            for i in 1..=n {
                let ports = [
                    try_free_port()?,
                    try_free_port()?,
                    try_free_port()?,
                    try_free_port()?,
                ];
                plan.push((cluster, format!("{cluster}{i}"), tag, addr, ports));
            }
        }
        let routes_of = |cluster: &str| {
            plan.iter()
                .filter(|s| s.0 == cluster)
                .map(|s| format!("\"nats-route://{}:{}\"", s.3, s.4[1]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let gateways = SUPERCLUSTER_LAYOUT
            .iter()
            .map(|(cluster, _, _)| {
                let first = plan.iter().find(|s| s.0 == *cluster).expect("a server");
                format!(
                    "{{name: {cluster}, urls: [\"nats://{}:{}\"]}}",
                    first.3, first.4[2]
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for (cluster, name, tag, addr, [client, route, gateway, http]) in &plan {
            let home = dir.path().join(name);
            std::fs::create_dir_all(&home)
                .map_err(HarnessError::io(format!("creating {}", home.display())))?;
            let text = SUPERCLUSTER_TEMPLATE
                .replace("@NAME@", name)
                .replace("@HOST@", &addr.to_string())
                .replace("@CLUSTER@", cluster)
                .replace("@TAGS@", &format!("\"{tag}\""))
                .replace("@CLIENT_PORT@", &client.to_string())
                .replace("@ROUTE_PORT@", &route.to_string())
                .replace("@GATEWAY_PORT@", &gateway.to_string())
                .replace("@HTTP_PORT@", &http.to_string())
                .replace("@STORE_DIR@", &home.join("store").display().to_string())
                .replace("@MAX_MEMORY@", "256MB")
                .replace("@MAX_FILE@", "1GB")
                .replace("@ROUTES@", &routes_of(cluster))
                .replace("@GATEWAYS@", &gateways)
                .replace("@ACCOUNTS@", "");
            let config = home.join("nats-server.conf");
            std::fs::write(&config, text)
                .map_err(HarnessError::io(format!("writing {}", config.display())))?;
            let mut cmd = if *cluster == "home" {
                Command::new(&bin)
            } else {
                net.command(cluster, &bin)
            };
            cmd.arg("-c").arg(&config);
            let log = dir.path().join(format!("{name}.log"));
            let daemon = Daemon::try_spawn(format!("nats-server {name}"), cmd, &log)?;
            servers.push(NetServer {
                name: name.clone(),
                cluster,
                addr: *addr,
                port: *client,
                http_port: *http,
                log,
                daemon,
            });
        }
        let mut sc = NetSupercluster { servers, dir };
        for s in &mut sc.servers {
            let url = s.url();
            s.daemon
                .wait_ready(START_TIMEOUT, || jetstream_answers(&url))?;
        }
        let probes: Vec<(IpAddr, u16)> = sc
            .servers
            .iter()
            .map(|s| (IpAddr::V4(s.addr), s.http_port))
            .collect();
        let want = sc.servers.len() - 1;
        sc.servers[0]
            .daemon
            .wait_ready(START_TIMEOUT, || all_current(&probes, want))?;
        Ok(sc)
    }

    /// `Ok` when the JetStream meta leader sees every other server as a
    /// current peer (what a healed region's server must become again);
    /// else what it sees. Asks every server still reachable.
    pub fn peers_current(&self) -> Result<(), String> {
        let probes: Vec<(IpAddr, u16)> = self
            .servers
            .iter()
            .map(|s| (IpAddr::V4(s.addr), s.http_port))
            .collect();
        all_current(&probes, self.servers.len() - 1)
    }

    /// Client URLs of `cluster`'s servers.
    pub fn urls(&self, cluster: &str) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.cluster == cluster)
            .map(NetServer::url)
            .collect()
    }

    /// Server names of `cluster`.
    pub fn server_names(&self, cluster: &str) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.cluster == cluster)
            .map(|s| s.name.clone())
            .collect()
    }

    /// A client of this (root) namespace connected to `cluster`'s servers.
    pub async fn client(&self, cluster: &str) -> async_nats::Client {
        let urls = self.urls(cluster);
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(urls.clone())
            .await
            .unwrap_or_else(|e| panic!("connect to {cluster} {urls:?}: {e}"))
    }

    /// The directory holding every server's config, store and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of every server's log, for assertion messages.
    pub fn log_tails(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- {}:\n{}", s.name, crate::process::tail(&s.log, 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether a server's `/jsz` (the meta leader's) shows `want` current peers.
fn all_current(probes: &[(IpAddr, u16)], want: usize) -> Result<(), String> {
    let mut seen = Vec::new();
    for (addr, port) in probes {
        let Ok(jsz) = http_get_json_at(*addr, *port, "/jsz") else {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_tell_their_owner() {
        assert_eq!(owner_of("kwn1234x0-eu"), Some((1234, 0)));
        assert_eq!(owner_of("kwn1234x12h2"), Some((1234, 12)));
        assert_eq!(owner_of("kwn1234x0b"), Some((1234, 0)));
        assert_eq!(owner_of("kwn1234x0-abcdef"), Some((1234, 0)));
        assert_eq!(owner_of("eth0"), None);
        assert_eq!(owner_of("kwnx0"), None);
        // A process that cannot exist.
        assert!(is_stale("kwn4294967290x0h1"));
        assert!(!is_stale("veth0"));
    }
}
