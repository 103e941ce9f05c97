//! `keywave bench`: one whole campaign of simulated credentials, end to end,
//! measured, next to the bare broker path on the same server (measured
//! before and after the campaign). In: a NATS URL (or a self-started
//! `nats-server`), the fleet's size and shape. Out: a [`BenchReport`]
//! (throughput, per-step latency percentiles read back from
//! `KEYWAVE_RESULTS`, peak resident memory and CPU per credential of each
//! process, and keywave's throughput as a ratio of the baseline's). Method
//! and results: BENCHMARKS.md.
//!
//! Two modes. In-process (the default) runs the workers and the coordinator
//! inside this process, like `keywave dev`: its peak memory is that of the
//! whole process. `--workers-as-processes` spawns one `keywave-worker` per
//! worker (a generated TOML configuration with a `sim` endpoint) and a
//! `keywave-coordinator`, and reads each child's peak from `/proc`. A `sim`
//! target lives inside its worker process, so in that mode the bench cannot
//! seed it with today's secrets: the enrolled secret is unknown to the
//! simulated system, the staged one is created there by the first add, and
//! the final "old secret rejected" check is true trivially. The protocol's
//! steps, target calls and durable writes are the same in both modes.

use crate::dev::start_nats_server;
use crate::fleet::InProcess;
use anyhow::{bail, Context as _};
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy},
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use futures::{StreamExt, TryStreamExt};
use keywave_common::client::{ApiClient, ClientError};
use keywave_common::{
    codec::{self, Format},
    crypto::{self, RegionKey, Secret, SecretPolicy},
    ids, now_ms,
    publish::AckWindow,
    subjects, topology,
    wire::{
        CampaignSpec, CampaignState, Credential, OnFailure, Outcome, RotationResult, RotationTask,
        Selector, Step, StepTiming, Strategy, TargetKind, TaskAction, WaveSize, SCHEMA_VERSION,
    },
};
use keywave_coordinator::{
    engine::{CoordinatorOptions, TASK_ACK_WINDOW},
    inventory,
};
use keywave_worker::{
    store::{Record, SecretStore, StoreError},
    targets::{
        sim::{SimOptions, SimTarget},
        Targets,
    },
    WorkerOptions,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Inventory writes and enrolments in flight.
const LOAD_CONCURRENCY: usize = 256;
/// Credentials generated and written per batch (bounds the bench's own memory).
const LOAD_BATCH: u64 = 10_000;
/// Concurrent operations per simulated endpoint (as in `keywave dev`).
const SIM_ENDPOINT_CONCURRENCY: usize = 1024;
/// Most tasks requested from the server in one pull (as the worker does).
const MAX_PULL_BATCH: usize = 256;
/// How often the campaign's status is polled.
const POLL: Duration = Duration::from_millis(100);
/// How long workers, a coordinator or a read of the results may stay silent.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The steps of a rotation, in order (the keys of `step_latency_ms`).
const STEPS: [Step; 6] = [
    Step::Staged,
    Step::Set,
    Step::Tested,
    Step::Promoted,
    Step::Revoked,
    Step::Verified,
];
/// Key of the whole protocol run (sum of a result's step timings).
const TOTAL_KEY: &str = "total";

/// Settings of `keywave bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A running NATS server; `None` starts `nats-server` from PATH.
    pub nats_url: Option<String>,
    pub credentials: u64,
    pub regions: Vec<String>,
    pub workers_per_region: usize,
    /// Tasks in flight per worker.
    pub concurrency: usize,
    /// Sleep of every simulated target operation.
    pub target_latency: Duration,
    /// Spawn `keywave-worker` and `keywave-coordinator` processes.
    pub workers_as_processes: bool,
    pub waves: Vec<WaveSize>,
    /// Task timeout of the campaign: it must cover the largest wave's
    /// queueing, because a task's deadline runs from its publication.
    pub task_timeout: Duration,
    /// Skip the bare broker measurement.
    pub skip_baseline: bool,
    /// Machine output: no progress on stderr.
    pub json: bool,
    /// Keep the worker configurations and every process's log (the
    /// self-started nats-server's included) in this directory.
    pub logs: Option<PathBuf>,
    /// Replicas and placement of the streams and buckets the bench creates
    /// (on a supercluster: the home state on the home cluster, each
    /// region's secret store in its region). Default: production settings,
    /// one replica, placed by the server.
    pub topology: topology::Config,
    /// NATS URLs (comma-separated) each region's workers connect to, e.g.
    /// that region's servers of a supercluster; a region not listed
    /// connects to the bench's own URL.
    pub region_nats: BTreeMap<String, String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            nats_url: None,
            credentials: 10_000,
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            workers_per_region: 1,
            concurrency: 64,
            target_latency: Duration::ZERO,
            workers_as_processes: false,
            waves: vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(50.0),
            ],
            task_timeout: Duration::from_secs(3600),
            skip_baseline: false,
            json: false,
            logs: None,
            topology: topology::Config::default(),
            region_nats: BTreeMap::new(),
        }
    }
}

/// Latency percentiles of one step, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// What `keywave bench` prints; with `--json`, one line of this.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub credentials: u64,
    /// From the start request to the campaign's last decision.
    pub elapsed_s: f64,
    /// Finished rotations (succeeded or failed) per second of `elapsed_s`.
    pub credentials_per_s: f64,
    /// Peak resident memory (VmHWM) of the coordinator's process.
    pub coordinator_peak_rss_mb: Option<f64>,
    /// Peak resident memory of the largest worker process.
    pub worker_peak_rss_mb: Option<f64>,
    /// `separate_processes`, or `combined_process` when the coordinator and
    /// the workers ran inside the bench process (both figures are then that
    /// one process's peak, bench bookkeeping and simulated targets included).
    pub rss_scope: &'static str,
    /// The bare broker path's throughput (tasks through a work queue and
    /// results back, both acked), on the same server, same sizes.
    /// (Measured twice, before and after the campaign: total work over total time.)
    pub baseline_per_s: Option<f64>,
    /// Mean time of one baseline run.
    pub baseline_elapsed_s: Option<f64>,
    /// Each baseline run's throughput (before, after).
    pub baseline_runs_per_s: Vec<f64>,
    /// `credentials_per_s / baseline_per_s`: the headline number.
    pub ratio_to_baseline: Option<f64>,
    /// Per step (and `total`, the sum of a result's steps): p50/p90/p99 in ms.
    pub step_latency_ms: BTreeMap<String, Percentiles>,
    pub regions: usize,
    pub region_names: Vec<String>,
    pub workers_per_region: usize,
    pub concurrency: usize,
    pub target_latency_ms: f64,
    pub workers_as_processes: bool,
    pub waves: Vec<String>,
    pub campaign_id: String,
    pub state: CampaignState,
    pub succeeded: u64,
    pub failed: u64,
    /// Failed tasks by error class (`deadline_exceeded`, `no_result`, ...).
    pub failures: BTreeMap<String, u64>,
    /// From the start request to the campaign's creation (inventory
    /// selection and plan writing), part of `elapsed_s`.
    pub plan_s: f64,
    /// Writing the inventory, and enrolling today's secrets (not in `elapsed_s`).
    pub inventory_s: f64,
    pub enroll_s: f64,
    /// Results read back from `KEYWAVE_RESULTS` for the percentiles.
    pub results_read: u64,
    /// Encoded size of a task and of a result (the baseline's message sizes),
    /// and the mean size of the campaign's stored results.
    pub task_bytes: usize,
    pub result_bytes: usize,
    pub result_bytes_observed: Option<f64>,
    pub nats_server_version: String,
    /// Peak resident memory of the self-started `nats-server`, if any.
    pub nats_server_peak_rss_mb: Option<f64>,
    /// CPU time (user + system) per credential during the campaign, in ms:
    /// `nats_server` (self-started only), and `coordinator` and `workers`
    /// (all worker processes together) or `keywave_process` (in-process).
    pub cpu_ms_per_credential: BTreeMap<String, f64>,
    /// The same during the baseline: `nats_server` and `clients`.
    pub baseline_cpu_ms_per_credential: BTreeMap<String, f64>,
    /// Baseline CPU per credential over keywave's, servers and clients
    /// included (self-started server only): what the throughput ratio would
    /// be on a machine where CPU is the only limit. Steadier than the
    /// throughput ratio on a machine shared with other work.
    pub cpu_ratio_to_baseline: Option<f64>,
}

impl BenchReport {
    /// The one-line JSON form (the last stdout line with `--json`).
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a bench report serializes")
    }

    /// The report for people.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mb = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.0} MB"));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nkeywave bench: {} credentials, {} regions x {} workers (concurrency {}), target latency {} ms, {}",
            self.credentials,
            self.regions,
            self.workers_per_region,
            self.concurrency,
            self.target_latency_ms,
            if self.workers_as_processes { "workers and coordinator as processes" } else { "in-process" }
        );
        let _ = writeln!(
            out,
            "  campaign {} {}: {} succeeded, {} failed{}, waves {}",
            self.campaign_id,
            self.state,
            self.succeeded,
            self.failed,
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    self.failures
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            self.waves.join(",")
        );
        let _ = writeln!(
            out,
            "  throughput: {:.0} credentials/s ({:.2}s from start request to last decision, of which planning {:.2}s)",
            self.credentials_per_s, self.elapsed_s, self.plan_s
        );
        match (self.baseline_per_s, self.ratio_to_baseline) {
            (Some(b), Some(r)) => {
                let _ = writeln!(
                    out,
                    "  bare broker path: {b:.0} credentials/s → keywave runs at {r:.2} of the baseline"
                );
            }
            _ => {
                let _ = writeln!(out, "  bare broker path: not measured");
            }
        }
        let _ = writeln!(
            out,
            "  peak RSS: coordinator {}, worker {} ({}); nats-server {}",
            mb(self.coordinator_peak_rss_mb),
            mb(self.worker_peak_rss_mb),
            self.rss_scope,
            mb(self.nats_server_peak_rss_mb)
        );
        let _ = writeln!(
            out,
            "  step latency (ms, from {} results):  {:>9} {:>9} {:>9}",
            self.results_read, "p50", "p90", "p99"
        );
        let keys = STEPS
            .iter()
            .map(|s| s.as_str())
            .chain(std::iter::once(TOTAL_KEY));
        for k in keys {
            if let Some(p) = self.step_latency_ms.get(k) {
                let _ = writeln!(
                    out,
                    "    {k:<34} {:>9.3} {:>9.3} {:>9.3}",
                    p.p50, p.p90, p.p99
                );
            }
        }
        let cpu = |m: &BTreeMap<String, f64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(r) = self.cpu_ratio_to_baseline {
            let _ = writeln!(
                out,
                "  CPU per credential: keywave uses {:.1}x the bare broker path's (CPU ratio {r:.2})",
                1.0 / r
            );
        }
        if !self.cpu_ms_per_credential.is_empty() {
            let _ = writeln!(
                out,
                "  CPU ms per credential: {}{}",
                cpu(&self.cpu_ms_per_credential),
                if self.baseline_cpu_ms_per_credential.is_empty() {
                    String::new()
                } else {
                    format!(" (baseline: {})", cpu(&self.baseline_cpu_ms_per_credential))
                }
            );
        }
        let _ = writeln!(
            out,
            "  setup: inventory {:.1}s, enrolment {:.1}s; messages: task {} B, result {} B; nats-server {}",
            self.inventory_s,
            self.enroll_s,
            self.task_bytes,
            self.result_bytes,
            self.nats_server_version
        );
        out
    }
}

/// A fixed-memory histogram of microsecond values: exact below 32, then 32
/// buckets per power of two (at most ~3% relative error).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; 32 + 59 * 32],
            total: 0,
        }
    }
}

impl Histogram {
    fn index(v: u64) -> usize {
        if v < 32 {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros() as usize;
        let sub = ((v >> (exp - 5)) - 32) as usize;
        32 + (exp - 5) * 32 + sub
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> f64 {
        if i < 32 {
            return i as f64;
        }
        let (exp, sub) = ((i - 32) / 32 + 5, (i - 32) % 32);
        let width = 1u64 << (exp - 5);
        ((32 + sub as u64) * width) as f64 + (width as f64 - 1.0) / 2.0
    }

    pub fn record(&mut self, micros: u64) {
        self.counts[Self::index(micros)] += 1;
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), in microseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(self.counts.len() - 1)
    }

    fn percentiles_ms(&self) -> Percentiles {
        let ms = |q| self.quantile(q).round() / 1000.0;
        Percentiles {
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
        }
    }
}

/// Peak resident memory (VmHWM) of `pid` (this process when `None`), in MB.
pub fn peak_rss_mb(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

/// CPU time (user + system, all threads) used so far by `pid` (this process
/// when `None`), in ms. `/proc` counts in USER_HZ ticks, 100 per second on Linux.
pub fn cpu_ms(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces: fields are counted after its `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 * 10.0)
}

/// Total baseline CPU over total keywave CPU per credential, when both
/// include the server.
fn cpu_ratio(baseline: &BTreeMap<String, f64>, keywave: &BTreeMap<String, f64>) -> Option<f64> {
    if !baseline.contains_key("nats_server") || !keywave.contains_key("nats_server") {
        return None;
    }
    let (b, k): (f64, f64) = (baseline.values().sum(), keywave.values().sum());
    (k > 0.0).then(|| (b / k * 1000.0).round() / 1000.0)
}

/// CPU used by named processes between two instants.
struct CpuMeter {
    start: Vec<(&'static str, Vec<u32>, Option<f64>)>,
}

impl CpuMeter {
    /// Starts measuring each group (a name and its pids; an empty list is this process).
    fn start(groups: Vec<(&'static str, Vec<u32>)>) -> Self {
        CpuMeter {
            start: groups
                .into_iter()
                .map(|(name, pids)| {
                    let now = Self::sum(&pids);
                    (name, pids, now)
                })
                .collect(),
        }
    }

    fn sum(pids: &[u32]) -> Option<f64> {
        if pids.is_empty() {
            return cpu_ms(None);
        }
        pids.iter().map(|&p| cpu_ms(Some(p))).sum()
    }

    /// CPU ms per unit of work of each group since `start`.
    fn per(&self, units: u64) -> BTreeMap<String, f64> {
        self.start
            .iter()
            .filter_map(|(name, pids, start)| {
                let used = Self::sum(pids)? - (*start)?;
                let v = used / units.max(1) as f64;
                Some((name.to_string(), (v * 1000.0).round() / 1000.0))
            })
            .collect()
    }
}

/// Credential `i` (0-based) of a run: generated on demand, never held as a fleet.
fn credential(run: &str, regions: &[String], i: u64) -> Credential {
    let n = i + 1;
    Credential {
        v: SCHEMA_VERSION,
        id: format!("{run}-{n:07}"),
        region: regions[(i % regions.len() as u64) as usize].clone(),
        endpoint: "sim".into(),
        kind: TargetKind::Sim,
        principal: format!("svc-{n:07}"),
        tags: vec![format!("run={run}")],
        owner: Some("keywave-bench".into()),
        consumers: vec![],
    }
}

/// Runs the bench; see the module documentation.
pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    validate(&opts)?;
    let server = match &opts.nats_url {
        Some(_) => None,
        None => {
            let s = start_nats_server().await?;
            if !opts.json {
                eprintln!("started nats-server on {}", s.url());
            }
            Some(s)
        }
    };
    let url = opts
        .nats_url
        .clone()
        .or_else(|| server.as_ref().map(|s| s.url()))
        .expect("a URL or a server");
    // Ctrl-C must not leave children behind (they are killed on drop).
    let server_pid = server.as_ref().and_then(|s| s.pid());
    let result = tokio::select! {
        r = run_on(&opts, &url, server_pid) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let result = result.map(|mut r| {
        r.nats_server_peak_rss_mb = server.as_ref().and_then(|s| peak_rss_mb(s.pid()));
        r
    });
    if let Some(s) = server {
        if let Some(dir) = &opts.logs {
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::copy(s.log_path(), dir.join("nats-server.log"));
        }
        // Kills the server and removes its directory.
        drop(s);
    }
    result
}

fn validate(opts: &BenchOptions) -> anyhow::Result<()> {
    if opts.regions.is_empty() || opts.credentials == 0 {
        bail!("keywave bench needs at least one region and one credential");
    }
    for r in &opts.regions {
        ids::validate("region", r)?;
    }
    if let Some(r) = opts.region_nats.keys().find(|r| !opts.regions.contains(r)) {
        bail!("--region-nats names region {r}, which is not in --regions");
    }
    if opts.workers_per_region == 0 || opts.concurrency == 0 {
        bail!("--workers-per-region and --concurrency must be at least 1");
    }
    if opts.workers_as_processes && !opts.target_latency.subsec_nanos().is_multiple_of(1_000_000) {
        bail!("--target-latency must be whole milliseconds with --workers-as-processes (the worker configuration's latency_ms)");
    }
    Ok(())
}

/// Connects to `url`, one server or several comma-separated (a cluster's).
async fn connect(url: &str, name: String) -> anyhow::Result<async_nats::Client> {
    let addrs =
        keywave_common::nats::server_addrs(url).with_context(|| format!("NATS URL {url}"))?;
    async_nats::ConnectOptions::new()
        .name(name)
        .connect(addrs)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// The NATS URL of region `region`'s workers.
fn region_url<'a>(opts: &'a BenchOptions, url: &'a str, region: &str) -> &'a str {
    opts.region_nats.get(region).map_or(url, String::as_str)
}

/// Everything that runs the campaign, in-process or as children.
enum Fleet {
    InProcess(Box<InProcess>),
    Processes {
        coordinator: Box<Child>,
        workers: Vec<Child>,
        /// Where configurations and logs are (deleted at the end unless `--logs`).
        _dir: Option<tempfile::TempDir>,
    },
}

/// A child process with its log file; killed on drop.
struct Child {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Child {
    fn spawn(
        name: String,
        mut cmd: tokio::process::Command,
        log: PathBuf,
    ) -> anyhow::Result<Child> {
        let file = std::fs::File::create(&log)?;
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Child { name, child, log })
    }

    fn peak_rss_mb(&self) -> Option<f64> {
        peak_rss_mb(self.child.id())
    }

    /// Fails when the child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}): {}", self.name, log_tail(&self.log));
        }
        Ok(())
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The last lines of a child's log, on one line (for an error message).
fn log_tail(path: &Path) -> String {
    keywave_harness::process::tail(path, 3).replace('\n', " | ")
}

/// A sibling of this executable (cargo puts the workspace's binaries side by
/// side), else one from PATH.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        // Test binaries live one level deeper, in `deps/`.
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    keywave_harness::process::find_on_path(name).with_context(|| {
        format!("{name} was found neither next to this binary nor in PATH (build it with `cargo build --release -p keywave-coordinator -p keywave-worker`)")
    })
}

async fn run_on(
    opts: &BenchOptions,
    url: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<BenchReport> {
    let say = |msg: String| {
        if !opts.json {
            eprintln!("{msg}");
        }
    };
    let client = connect(url, "keywave-bench".into()).await?;
    let server_version = client.server_info().version.clone();
    let cfg = opts.topology.clone();
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &cfg).await?;
    let run_id = ids::random_id("bench");

    // Representative messages: the baseline sends bytes of these sizes.
    let sample_task = sample_task(&credential(&run_id, &opts.regions, 0), opts);
    let task_bytes = codec::encode(Format::MsgPack, &sample_task)?.len();
    let result_bytes = codec::encode(Format::MsgPack, &sample_result(&sample_task))?.len();

    // The baseline runs before and after the campaign; their mean smooths
    // out a machine that is busier during one of the three.
    let measure_baseline = |pass: &'static str| {
        let run_id = run_id.clone();
        let say = &say;
        async move {
            if opts.skip_baseline {
                return anyhow::Ok(None);
            }
            say(format!(
                "baseline ({pass}): {} tasks of {task_bytes} B through a work queue, {} results of {result_bytes} B back...",
                opts.credentials, opts.credentials
            ));
            let b = baseline(
                opts,
                url,
                &format!("{run_id}-{pass}"),
                task_bytes,
                result_bytes,
                server_pid,
            )
            .await?;
            say(format!(
                "baseline ({pass}): {:.0} credentials/s ({:.2}s)",
                b.per_s, b.elapsed_s
            ));
            Ok(Some(b))
        }
    };
    let baseline_before = measure_baseline("before").await?;

    // Inventory, generated in batches and written with bounded concurrency.
    let t = Instant::now();
    let inv = topology::inventory(&js, &cfg).await?;
    let mut i = 0;
    while i < opts.credentials {
        let end = (i + LOAD_BATCH).min(opts.credentials);
        let batch: Vec<Credential> = (i..end)
            .map(|i| credential(&run_id, &opts.regions, i))
            .collect();
        inventory::put_all(&inv, &batch).await?;
        i = end;
    }
    let inventory_s = t.elapsed().as_secs_f64();
    say(format!(
        "inventory: {} sim credentials over {} regions ({inventory_s:.1}s)",
        opts.credentials,
        opts.regions.len()
    ));

    // Regions: a key, the store, today's secrets enrolled (and, in-process,
    // seeded at the simulated target).
    let t = Instant::now();
    let mut regions = Vec::new();
    for (r, name) in opts.regions.iter().enumerate() {
        let key = RegionKey::generate();
        let (_consumer, kv) = topology::ensure_region(&js, name, &cfg).await?;
        let sim = SimTarget::new(SimOptions {
            latency: opts.target_latency,
            fail_rate: 0.0,
        });
        let store = SecretStore::from_kv(kv, name, key.clone());
        let seed = (!opts.workers_as_processes).then_some(&sim);
        enroll(&store, seed, &run_id, &opts.regions, r, opts.credentials).await?;
        regions.push((name.clone(), key, sim));
    }
    let enroll_s = t.elapsed().as_secs_f64();
    say(format!("enrolled today's secrets ({enroll_s:.1}s)"));

    // Workers and a coordinator.
    let fleet = if opts.workers_as_processes {
        start_processes(opts, url, &run_id, &regions).await?
    } else {
        start_in_process(opts, url, &client, &run_id, &cfg, &regions).await?
    };
    let Measured {
        status,
        start_ms,
        rss,
        cpu,
    } = campaign(opts, &client, &js, fleet, &run_id, server_pid).await?;

    let end_ms = status.finished_at_ms.unwrap_or_else(|| {
        status
            .waves
            .iter()
            .filter_map(|w| w.finished_at_ms)
            .max()
            .unwrap_or_else(now_ms)
    });
    let elapsed_s = (end_ms.saturating_sub(start_ms) as f64 / 1000.0).max(0.001);
    let done = status.succeeded() + status.failed();
    let per_s = done as f64 / elapsed_s;
    say(format!(
        "campaign {} {} in {elapsed_s:.2}s ({per_s:.0}/s); reading the results back...",
        status.campaign_id, status.state
    ));

    let read = read_results(&js, &status.campaign_id).await?;
    let baseline_after = measure_baseline("after").await?;
    let baseline = Baseline::mean(baseline_before, baseline_after);
    let mut step_latency_ms = BTreeMap::new();
    for (step, h) in STEPS.iter().zip(&read.steps) {
        if h.count() > 0 {
            step_latency_ms.insert(step.as_str().to_string(), h.percentiles_ms());
        }
    }
    if read.total.count() > 0 {
        step_latency_ms.insert(TOTAL_KEY.to_string(), read.total.percentiles_ms());
    }
    Ok(BenchReport {
        credentials: opts.credentials,
        elapsed_s,
        credentials_per_s: per_s,
        coordinator_peak_rss_mb: rss.coordinator,
        worker_peak_rss_mb: rss.worker,
        rss_scope: if opts.workers_as_processes {
            "separate_processes"
        } else {
            "combined_process"
        },
        baseline_per_s: baseline.as_ref().map(|b| b.per_s),
        baseline_elapsed_s: baseline.as_ref().map(|b| b.elapsed_s),
        baseline_runs_per_s: baseline.as_ref().map_or(Vec::new(), |b| b.runs.clone()),
        ratio_to_baseline: baseline.as_ref().map(|b| per_s / b.per_s),
        step_latency_ms,
        regions: opts.regions.len(),
        region_names: opts.regions.clone(),
        workers_per_region: opts.workers_per_region,
        concurrency: opts.concurrency,
        target_latency_ms: opts.target_latency.as_secs_f64() * 1000.0,
        workers_as_processes: opts.workers_as_processes,
        waves: opts.waves.iter().map(ToString::to_string).collect(),
        campaign_id: status.campaign_id.clone(),
        state: status.state,
        succeeded: status.succeeded(),
        failed: status.failed(),
        failures: status.waves.iter().flat_map(|w| w.failures.iter()).fold(
            BTreeMap::new(),
            |mut m, (class, n)| {
                *m.entry(class.clone()).or_insert(0) += n;
                m
            },
        ),
        plan_s: (status.created_at_ms.saturating_sub(start_ms) as f64 / 1000.0),
        inventory_s,
        enroll_s,
        results_read: read.count,
        task_bytes,
        result_bytes,
        result_bytes_observed: (read.count > 0).then(|| read.bytes as f64 / read.count as f64),
        nats_server_version: server_version,
        nats_server_peak_rss_mb: None,
        cpu_ratio_to_baseline: baseline.as_ref().and_then(|b| cpu_ratio(&b.cpu, &cpu)),
        cpu_ms_per_credential: cpu,
        baseline_cpu_ms_per_credential: baseline.map(|b| b.cpu).unwrap_or_default(),
    })
}

/// A random 40-character secret standing for the one a credential uses today.
/// `crypto::generate` asks the OS for every character (a system call each,
/// see BENCHMARKS.md); setting up a million credentials uses the thread's
/// CSPRNG instead.
fn todays_secret() -> Secret {
    use rand::{distributions::Alphanumeric, Rng};
    Secret::new(
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(40)
            .map(char::from)
            .collect(),
    )
}

/// Records today's secret of every credential of region `r` as CURRENT: one
/// create-only write each (no read first: the ids are new to this run). With
/// `seed`, the same secret is made valid at the in-process simulated target.
async fn enroll(
    store: &SecretStore,
    seed: Option<&Arc<SimTarget>>,
    run: &str,
    regions: &[String],
    r: usize,
    credentials: u64,
) -> anyhow::Result<()> {
    let n = regions.len() as u64;
    futures::stream::iter((r as u64..credentials).step_by(n as usize))
        .map(|i| async move {
            let c = credential(run, regions, i);
            let secret = todays_secret();
            if let Some(sim) = seed {
                sim.seed(&c.principal, &secret);
            }
            let record = Record {
                current: Some(store.version(secret, None, None)),
                ..Default::default()
            };
            match store.save(&c.id, &record, 0).await {
                // Left over from an earlier run on the same server.
                Err(StoreError::Conflict { .. }) => {
                    store.forget(&c.id).await?;
                    let l = store.load(&c.id).await?;
                    store.save(&c.id, &record, l.revision).await.map(|_| ())
                }
                other => other.map(|_| ()),
            }
            .with_context(|| format!("enrolling {}", c.id))
        })
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect::<()>()
        .await
}

async fn start_in_process(
    opts: &BenchOptions,
    url: &str,
    client: &async_nats::Client,
    run_id: &str,
    cfg: &topology::Config,
    regions: &[(String, RegionKey, Arc<SimTarget>)],
) -> anyhow::Result<Fleet> {
    let mut fleet = InProcess::new();
    for (name, key, sim) in regions {
        let mut targets = Targets::new();
        targets.insert("sim", sim.clone(), SIM_ENDPOINT_CONCURRENCY);
        let wclient = connect(
            region_url(opts, url, name),
            format!("keywave-bench worker {name}"),
        )
        .await?;
        let template = WorkerOptions {
            region: name.clone(),
            worker_id: format!("bench-{name}"),
            concurrency: opts.concurrency,
            topology: cfg.clone(),
            ..Default::default()
        };
        fleet
            .start_workers(
                &wclient,
                template,
                key,
                Arc::new(targets),
                opts.workers_per_region,
            )
            .await?;
    }
    fleet
        .start_coordinator(
            client,
            CoordinatorOptions {
                topology: cfg.clone(),
                coordinator_id: format!("coordinator-{run_id}"),
                ..Default::default()
            },
        )
        .await?;
    Ok(Fleet::InProcess(Box::new(fleet)))
}

async fn start_processes(
    opts: &BenchOptions,
    url: &str,
    run_id: &str,
    regions: &[(String, RegionKey, Arc<SimTarget>)],
) -> anyhow::Result<Fleet> {
    let worker_bin = binary("keywave-worker")?;
    let coordinator_bin = binary("keywave-coordinator")?;
    let (tmp, dir) = match &opts.logs {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t =
                tempfile::tempdir().context("creating a directory for worker configurations")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    // Tasks are signed with an ephemeral key, so the signed path is measured.
    let signing = keywave_common::sign::SigningKey::generate();
    let key_file = dir.join(format!("coordinator-{run_id}.key"));
    signing
        .to_file(&key_file)
        .context("writing the ephemeral task-signing key")?;
    let public = signing.public().to_hex();
    let cfg = &opts.topology;
    let mut workers = Vec::new();
    for (name, key, _) in regions {
        for i in 0..opts.workers_per_region {
            let id = format!("bench-{name}-{i}");
            let config = dir.join(format!("{id}.toml"));
            let worker_url = region_url(opts, url, name);
            // Where this worker would create its topology, as the coordinator.
            let mut jetstream = format!("replicas = {}\n", cfg.replicas);
            if let Some(p) = cfg.region_placement.get(name) {
                jetstream.push_str(&format!("placement = \"{p}\"\n"));
            }
            if let Some(p) = &cfg.home_placement {
                jetstream.push_str(&format!("home_placement = \"{p}\"\n"));
            }
            if let Some(n) = cfg.region_replicas {
                jetstream.push_str(&format!("region_replicas = {n}\n"));
            }
            // The region key goes through the environment, never into the file.
            std::fs::write(
                &config,
                format!(
                    "region = \"{name}\"\nworker_id = \"{id}\"\nconcurrency = {}\nnats_url = \"{worker_url}\"\nshutdown_grace_secs = 5\ncoordinator_public_keys = [\"{public}\"]\nrequire_signed_tasks = true\n\n[jetstream]\n{jetstream}\n[[endpoint]]\nname = \"sim\"\nkind = \"sim\"\nmax_concurrency = {SIM_ENDPOINT_CONCURRENCY}\nlatency_ms = {}\n",
                    opts.concurrency,
                    opts.target_latency.as_millis()
                ),
            )?;
            let mut cmd = tokio::process::Command::new(&worker_bin);
            cmd.arg("--config")
                .arg(&config)
                .arg("run")
                .env(keywave_worker::config::ENV_REGION_KEY, key.to_hex());
            workers.push(Child::spawn(
                format!("keywave-worker {id}"),
                cmd,
                dir.join(format!("{id}.log")),
            )?);
        }
    }
    let mut cmd = tokio::process::Command::new(&coordinator_bin);
    cmd.args(["--nats", url, "--id", &format!("coordinator-{run_id}")])
        .arg("--signing-key-file")
        .arg(&key_file)
        .args(["--replicas", &cfg.replicas.to_string()]);
    if let Some(p) = &cfg.home_placement {
        cmd.args(["--home-placement", &p.to_string()]);
    }
    if !cfg.region_placement.is_empty() {
        let list = cfg
            .region_placement
            .iter()
            .map(|(r, p)| format!("{r}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        // Every placed region must be one the coordinator creates.
        cmd.args(["--placement", &list])
            .args(["--regions", &opts.regions.join(",")]);
    }
    if let Some(n) = cfg.region_replicas {
        cmd.args(["--region-replicas", &n.to_string()]);
    }
    let coordinator = Child::spawn(
        "keywave-coordinator".into(),
        cmd,
        dir.join("coordinator.log"),
    )?;
    Ok(Fleet::Processes {
        coordinator: Box::new(coordinator),
        workers,
        _dir: tmp,
    })
}

/// Peak memory of the campaign's processes, read before they stop.
struct Rss {
    coordinator: Option<f64>,
    worker: Option<f64>,
}

/// What [`campaign`] measured.
struct Measured {
    status: keywave_common::api::CampaignStatus,
    /// When the start request was sent, ms since the epoch.
    start_ms: u64,
    rss: Rss,
    cpu: BTreeMap<String, f64>,
}

/// Waits until every worker pulls and a coordinator answers, runs the
/// campaign to its end, reads the peaks and the CPU used, and stops the fleet.
async fn campaign(
    opts: &BenchOptions,
    client: &async_nats::Client,
    js: &jetstream::Context,
    mut fleet: Fleet,
    run_id: &str,
    server_pid: Option<u32>,
) -> anyhow::Result<Measured> {
    let api = ApiClient::new(client.clone());
    let outcome = async {
        wait_ready(opts, js, &api, &mut fleet).await?;
        let mut groups = Vec::new();
        if let Some(pid) = server_pid {
            groups.push(("nats_server", vec![pid]));
        }
        match &fleet {
            Fleet::InProcess { .. } => groups.push(("keywave_process", vec![])),
            Fleet::Processes {
                coordinator,
                workers,
                ..
            } => {
                groups.push(("coordinator", coordinator.child.id().into_iter().collect()));
                groups.push((
                    "workers",
                    workers.iter().filter_map(|w| w.child.id()).collect(),
                ));
            }
        }
        let meter = CpuMeter::start(groups);
        let spec = CampaignSpec {
            v: SCHEMA_VERSION,
            name: "bench".into(),
            reason: Some(format!("keywave bench {run_id}")),
            selector: Selector {
                tags: vec![format!("run={run_id}")],
                ..Default::default()
            },
            strategy: Strategy::Continuity,
            waves: opts.waves.clone(),
            failure_budget: 0.05,
            bake_ms: 0,
            on_failure: OnFailure::Pause,
            task_timeout_ms: opts.task_timeout.as_millis() as u64,
            approve_before_waves: Vec::new(),
            preflight: None,
            preflight_max_unreachable: 0.0,
            requested_by: None,
        };
        let start_ms = now_ms();
        let cid = api.start(spec).await?;
        if !opts.json {
            eprintln!("campaign {cid} started");
        }
        let mut last_print = Instant::now();
        let mut last_answer = Instant::now();
        let status = loop {
            // A busy coordinator may miss a poll (or reconnect): keep asking
            // for a while, as `campaign start --wait` does.
            let s = match api.status(&cid).await {
                Ok(s) => {
                    last_answer = Instant::now();
                    s
                }
                Err(
                    e @ (ClientError::NoCoordinator { .. }
                    | ClientError::Timeout { .. }
                    | ClientError::Request { .. }),
                ) if last_answer.elapsed() < READY_TIMEOUT => {
                    tracing::warn!(error = %e, "Campaign status unavailable; asking again");
                    tokio::time::sleep(POLL * 10).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if s.state.is_terminal() || s.state == CampaignState::Paused {
                break s;
            }
            if let Fleet::Processes {
                coordinator,
                workers,
                ..
            } = &mut fleet
            {
                coordinator.check_alive()?;
                for w in workers.iter_mut() {
                    w.check_alive()?;
                }
            }
            if !opts.json && last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                eprintln!(
                    "  wave {}: {} of {} done",
                    s.current_wave,
                    s.succeeded() + s.failed(),
                    s.total
                );
            }
            if now_ms().saturating_sub(start_ms) > opts.task_timeout.as_millis() as u64 * 4 {
                bail!(
                    "campaign {cid} still {} after {:?}",
                    s.state,
                    opts.task_timeout * 4
                );
            }
            tokio::time::sleep(POLL).await;
        };
        let cpu = meter.per(status.succeeded() + status.failed());
        anyhow::Ok((status, start_ms, cpu))
    }
    .await;
    // The processes' last words, for an error.
    let logs = match (&outcome, &fleet) {
        (
            Err(_),
            Fleet::Processes {
                coordinator,
                workers,
                ..
            },
        ) => Some(
            std::iter::once(&**coordinator)
                .chain(workers)
                .map(|c| format!("{}: {}", c.name, log_tail(&c.log)))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        _ => None,
    };
    let rss = match &fleet {
        Fleet::InProcess { .. } => {
            let me = peak_rss_mb(None);
            Rss {
                coordinator: me,
                worker: me,
            }
        }
        Fleet::Processes {
            coordinator,
            workers,
            ..
        } => Rss {
            coordinator: coordinator.peak_rss_mb(),
            worker: workers
                .iter()
                .filter_map(Child::peak_rss_mb)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v)))),
        },
    };
    match fleet {
        Fleet::InProcess(fleet) => fleet.shutdown().await,
        Fleet::Processes {
            coordinator,
            workers,
            ..
        } => {
            coordinator.stop().await;
            for w in workers {
                w.stop().await;
            }
        }
    }
    let (status, start_ms, cpu) = outcome.map_err(|e| match &logs {
        Some(tails) => e.context(tails.clone()),
        None => e,
    })?;
    Ok(Measured {
        status,
        start_ms,
        rss,
        cpu,
    })
}

/// Waits until every region's consumer has a pull waiting from each of its
/// workers, and a coordinator answers the API.
async fn wait_ready(
    opts: &BenchOptions,
    js: &jetstream::Context,
    api: &ApiClient,
    fleet: &mut Fleet,
) -> anyhow::Result<()> {
    let until = Instant::now() + READY_TIMEOUT;
    loop {
        if let Fleet::Processes {
            coordinator,
            workers,
            ..
        } = fleet
        {
            coordinator.check_alive()?;
            for w in workers.iter_mut() {
                w.check_alive()?;
            }
        }
        let mut ready = api.ping().await.is_ok();
        for r in &opts.regions {
            if !ready {
                break;
            }
            let mut c: jetstream::consumer::Consumer<pull::Config> = js
                .get_consumer_from_stream(topology::worker_consumer(r), topology::tasks_stream(r))
                .await
                .map_err(|e| anyhow::anyhow!("region {r}'s task consumer: {e}"))?;
            ready = c.info().await?.num_waiting >= opts.workers_per_region;
        }
        if ready {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("the workers and the coordinator were not ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What was read back from the results stream.
struct ResultsRead {
    steps: Vec<Histogram>,
    total: Histogram,
    count: u64,
    bytes: u64,
}

/// Reads every result of campaign `cid` from `KEYWAVE_RESULTS` with one
/// ordered consumer, into fixed-size histograms.
async fn read_results(js: &jetstream::Context, cid: &str) -> anyhow::Result<ResultsRead> {
    let mut out = ResultsRead {
        steps: vec![Histogram::default(); STEPS.len()],
        total: Histogram::default(),
        count: 0,
        bytes: 0,
    };
    let stream = js.get_stream(topology::STREAM_RESULTS).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::result_campaign_filter(cid),
            deliver_policy: DeliverPolicy::All,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    loop {
        let Some(msg) = tokio::time::timeout(READY_TIMEOUT, messages.next())
            .await
            .context("reading the results: no message within the timeout")?
        else {
            break;
        };
        let msg = msg?;
        let pending = msg.info().map(|i| i.pending).unwrap_or(0);
        if let Ok(r) = codec::decode::<RotationResult>(msg.headers.as_ref(), &msg.payload) {
            if r.action == TaskAction::Rotate && r.outcome == Outcome::Succeeded {
                let mut total = 0;
                for t in &r.timings {
                    if let Some(i) = STEPS.iter().position(|s| *s == t.step) {
                        out.steps[i].record(t.micros);
                    }
                    total += t.micros;
                }
                out.total.record(total);
            }
            out.count += 1;
            out.bytes += msg.payload.len() as u64;
        }
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// The task the coordinator would publish for `c`.
fn sample_task(c: &Credential, opts: &BenchOptions) -> RotationTask {
    let cid = ids::random_id("c");
    let issued = now_ms();
    RotationTask {
        v: SCHEMA_VERSION,
        task_id: RotationTask::make_id(&cid, 2, TaskAction::Rotate, &c.id),
        campaign_id: cid,
        wave: 2,
        index: (opts.credentials / 2) as u32,
        action: TaskAction::Rotate,
        strategy: Strategy::Continuity,
        credential_id: c.id.clone(),
        region: c.region.clone(),
        endpoint: c.endpoint.clone(),
        kind: c.kind,
        principal: c.principal.clone(),
        issued_at_ms: issued,
        deadline_ms: issued
            + keywave_coordinator::engine::start_window_ms(opts.task_timeout.as_millis() as u64),
        run_timeout_ms: opts.task_timeout.as_millis() as u64,
        consumers: Vec::new(),
    }
}

/// The result a worker would publish for `t`: every step, two fingerprints.
fn sample_result(t: &RotationTask) -> RotationResult {
    let key = RegionKey::generate();
    let fp = || key.fingerprint(&crypto::generate(&SecretPolicy::default()));
    RotationResult {
        v: SCHEMA_VERSION,
        task_id: t.task_id.clone(),
        campaign_id: t.campaign_id.clone(),
        wave: t.wave,
        index: t.index,
        action: t.action,
        credential_id: t.credential_id.clone(),
        region: t.region.clone(),
        outcome: Outcome::Succeeded,
        step: Step::Verified,
        error_class: None,
        error: None,
        timings: STEPS
            .iter()
            .map(|&step| StepTiming { step, micros: 1500 })
            .collect(),
        new_fingerprint: Some(fp()),
        old_fingerprint: Some(fp()),
        old_rejected: Some(true),
        worker_id: format!("bench-{}-0", t.region),
        finished_at_ms: now_ms(),
        consumers: Vec::new(),
    }
}

struct Baseline {
    per_s: f64,
    elapsed_s: f64,
    cpu: BTreeMap<String, f64>,
    runs: Vec<f64>,
}

impl Baseline {
    /// Two runs of the same size as one: total work over total time, mean CPU.
    fn mean(a: Option<Baseline>, b: Option<Baseline>) -> Option<Baseline> {
        match (a, b) {
            (Some(a), Some(b)) => {
                let elapsed_s = (a.elapsed_s + b.elapsed_s) / 2.0;
                let cpu = a
                    .cpu
                    .iter()
                    .filter_map(|(k, v)| {
                        let w = b.cpu.get(k)?;
                        Some((k.clone(), ((v + w) / 2.0 * 1000.0).round() / 1000.0))
                    })
                    .collect();
                Some(Baseline {
                    per_s: 2.0 / (1.0 / a.per_s + 1.0 / b.per_s),
                    elapsed_s,
                    cpu,
                    runs: vec![a.per_s, b.per_s],
                })
            }
            (a, b) => a.or(b),
        }
    }
}

/// The bare broker path: N task-sized messages published (acks awaited in
/// windows of [`TASK_ACK_WINDOW`], as the coordinator does) to a work-queue
/// stream; per region, `workers_per_region` consumers sharing one durable
/// consumer, each handling up to `concurrency` messages at once by
/// publishing a result-sized message, awaiting its ack, then acking the task
/// (as a worker does, minus the rotation); one consumer reads and acks the
/// results. Same headers as keywave's messages. The streams are deleted after.
async fn baseline(
    opts: &BenchOptions,
    url: &str,
    run_id: &str,
    task_bytes: usize,
    result_bytes: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<Baseline> {
    let tag = run_id.replace('-', "_").to_ascii_uppercase();
    let (tasks_name, results_name) = (format!("{tag}_TASKS"), format!("{tag}_RESULTS"));
    let root = format!("kwbench.{run_id}");
    let client = connect(url, "keywave-bench baseline".into()).await?;
    let js = topology::context(client.clone());
    let tasks = js
        .get_or_create_stream(stream::Config {
            name: tasks_name.clone(),
            subjects: vec![format!("{root}.task.>")],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            duplicate_window: topology::Config::default().duplicate_window,
            discard: DiscardPolicy::Old,
            ..Default::default()
        })
        .await?;
    let results = js
        .get_or_create_stream(stream::Config {
            name: results_name.clone(),
            subjects: vec![format!("{root}.result.>")],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: topology::Config::default().duplicate_window,
            ..Default::default()
        })
        .await?;
    let outcome = async {
        let mut consumers = Vec::new();
        for r in &opts.regions {
            let name = format!("workers-{r}");
            consumers.push(
                tasks
                    .get_or_create_consumer(
                        &name,
                        pull::Config {
                            durable_name: Some(name.clone()),
                            filter_subject: format!("{root}.task.{r}"),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: Duration::from_secs(30),
                            max_ack_pending: topology::Config::default().max_ack_pending,
                            ..Default::default()
                        },
                    )
                    .await?,
            );
        }
        let results_consumer = results
            .get_or_create_consumer(
                "coordinator",
                pull::Config {
                    durable_name: Some("coordinator".into()),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await?;
        let task_payload = bytes::Bytes::from(vec![b'x'; task_bytes]);
        let result_payload = bytes::Bytes::from(vec![b'y'; result_bytes]);
        let n = opts.credentials;

        let mut groups = vec![("clients", vec![])];
        if let Some(pid) = server_pid {
            groups.push(("nats_server", vec![pid]));
        }
        let meter = CpuMeter::start(groups);
        let t0 = Instant::now();
        let stop = CancellationToken::new();
        let mut set = JoinSet::new();
        // Results: read and ack until all N arrived.
        let received = Arc::new(AtomicU64::new(0));
        {
            let received = received.clone();
            let stop = stop.clone();
            set.spawn(async move {
                let mut messages = results_consumer
                    .stream()
                    .max_messages_per_batch(MAX_PULL_BATCH)
                    .messages()
                    .await?;
                while received.load(Ordering::Relaxed) < n {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = stop.cancelled() => break,
                    };
                    let Some(msg) = msg else { break };
                    let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
                    msg.ack().await.map_err(|e| anyhow::anyhow!(e))?;
                    received.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        // Workers: one connection per region, as in-process keywave.
        for (r, consumer) in opts.regions.iter().zip(consumers) {
            let wclient = connect(url, format!("keywave-bench baseline {r}")).await?;
            let wjs = topology::context(wclient);
            for _ in 0..opts.workers_per_region {
                let consumer = consumer.clone();
                let wjs = wjs.clone();
                let stop = stop.clone();
                let subject = format!("{root}.result.{r}");
                let payload = result_payload.clone();
                let concurrency = opts.concurrency;
                set.spawn(async move {
                    let slots = Arc::new(Semaphore::new(concurrency));
                    let mut messages = consumer
                        .stream()
                        .max_messages_per_batch(concurrency.min(MAX_PULL_BATCH))
                        .messages()
                        .await?;
                    let mut inflight = JoinSet::new();
                    loop {
                        while inflight.try_join_next().is_some() {}
                        let permit = slots.clone().acquire_owned().await?;
                        let msg = tokio::select! {
                            m = messages.next() => m,
                            _ = stop.cancelled() => break,
                        };
                        let Some(msg) = msg else { break };
                        let msg = msg.map_err(|e| anyhow::anyhow!(e))?;
                        let (wjs, subject, payload) =
                            (wjs.clone(), subject.clone(), payload.clone());
                        inflight.spawn(async move {
                            let id = msg
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(codec::MSG_ID))
                                .map(|v| v.as_str().to_string())
                                .unwrap_or_default();
                            let published = wjs
                                .publish_with_headers(
                                    subject,
                                    codec::headers(Format::MsgPack, &id),
                                    payload,
                                )
                                .await;
                            if let Ok(ack) = published {
                                if ack.await.is_ok() {
                                    let _ = msg.ack().await;
                                }
                            }
                            drop(permit);
                        });
                    }
                    inflight.shutdown().await;
                    anyhow::Ok(())
                });
            }
        }
        // Tasks: published with a bounded window of un-awaited acks.
        let mut window = AckWindow::new(TASK_ACK_WINDOW);
        for i in 0..n {
            let r = &opts.regions[(i % opts.regions.len() as u64) as usize];
            let id = format!("{run_id}:{i}");
            let ack = js
                .publish_with_headers(
                    format!("{root}.task.{r}"),
                    codec::headers(Format::MsgPack, &id),
                    task_payload.clone(),
                )
                .await?;
            window.push(ack).await?;
        }
        window.drain().await?;
        let mut last = 0;
        let mut last_change = Instant::now();
        loop {
            let got = received.load(Ordering::Relaxed);
            if got >= n {
                break;
            }
            if got != last {
                last = got;
                last_change = Instant::now();
            } else if last_change.elapsed() > READY_TIMEOUT {
                bail!("baseline stalled at {got} of {n} results");
            }
            if let Some(r) = set.try_join_next() {
                r??;
                bail!("a baseline task ended early at {got} of {n} results");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = meter.per(n);
        stop.cancel();
        while let Some(r) = set.join_next().await {
            r??;
        }
        let per_s = n as f64 / elapsed.max(0.001);
        anyhow::Ok(Baseline {
            per_s,
            elapsed_s: elapsed,
            cpu,
            runs: vec![per_s],
        })
    }
    .await;
    let _ = js.delete_stream(&tasks_name).await;
    let _ = js.delete_stream(&results_name).await;
    outcome
}

/// The keys `keywave bench --json` always prints (documented in BENCHMARKS.md).
pub const BENCH_JSON_KEYS: [&str; 15] = [
    "credentials",
    "elapsed_s",
    "credentials_per_s",
    "coordinator_peak_rss_mb",
    "worker_peak_rss_mb",
    "baseline_per_s",
    "ratio_to_baseline",
    "step_latency_ms",
    "regions",
    "workers_per_region",
    "target_latency_ms",
    "state",
    "succeeded",
    "failed",
    "rss_scope",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        for (q, want) in [(0.5, 5_000.0), (0.9, 9_000.0), (0.99, 9_900.0)] {
            let got = h.quantile(q);
            assert!((got - want).abs() / want < 0.04, "q{q}: {got} vs {want}");
        }
        let mut small = Histogram::default();
        small.record(3);
        assert_eq!(small.quantile(0.99), 3.0);
        assert_eq!(Histogram::default().quantile(0.5), 0.0);
        // Every index maps back into its own bucket.
        for v in [0, 31, 32, 33, 63, 64, 1_000, 123_456, u64::MAX / 3] {
            let i = Histogram::index(v);
            assert!(i < Histogram::default().counts.len());
            let mid = Histogram::value(i);
            assert!((mid - v as f64).abs() / (v as f64).max(1.0) < 0.04, "{v}");
        }
    }

    #[test]
    fn two_baselines_average_as_total_work_over_total_time() {
        let run = |per_s: f64, cpu: f64| Baseline {
            per_s,
            elapsed_s: 100.0 / per_s,
            cpu: BTreeMap::from([("nats_server".to_string(), cpu)]),
            runs: vec![per_s],
        };
        let m = Baseline::mean(Some(run(100.0, 0.02)), Some(run(50.0, 0.04))).unwrap();
        // 200 credentials in 1 s + 2 s.
        assert!((m.per_s - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.runs, vec![100.0, 50.0]);
        assert_eq!(m.cpu["nats_server"], 0.03);
        assert!(Baseline::mean(None, None).is_none());
        assert_eq!(
            Baseline::mean(None, Some(run(10.0, 0.1))).unwrap().per_s,
            10.0
        );
    }

    #[test]
    fn credentials_are_valid_and_round_robin() {
        let regions = vec!["eu".to_string(), "us".to_string()];
        let c = credential("bench-0a1b2c3d4e5f", &regions, 2);
        assert_eq!(c.region, "eu");
        assert_eq!(c.id, "bench-0a1b2c3d4e5f-0000003");
        let jsonl = serde_json::to_string(&c).unwrap() + "\n";
        assert_eq!(
            inventory::parse_reader(inventory::Format::JsonLines, jsonl.as_bytes())
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn peak_rss_and_cpu_of_this_process_are_read() {
        assert!(peak_rss_mb(None).is_some_and(|mb| mb > 0.0));
        let before = cpu_ms(None).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(60) {
            std::hint::black_box(crypto::generate(&SecretPolicy::default()));
        }
        assert!(cpu_ms(None).unwrap() >= before);
        let meter = CpuMeter::start(vec![("me", vec![])]);
        assert!(meter.per(10).contains_key("me"));
    }

    #[test]
    fn report_json_has_the_documented_keys() {
        let r = BenchReport {
            credentials: 1,
            elapsed_s: 1.0,
            credentials_per_s: 1.0,
            coordinator_peak_rss_mb: Some(1.0),
            worker_peak_rss_mb: Some(1.0),
            rss_scope: "combined_process",
            baseline_per_s: Some(2.0),
            baseline_elapsed_s: Some(0.5),
            baseline_runs_per_s: vec![2.0, 2.0],
            ratio_to_baseline: Some(0.5),
            step_latency_ms: BTreeMap::from([(
                "set".to_string(),
                Percentiles {
                    p50: 1.0,
                    p90: 2.0,
                    p99: 3.0,
                },
            )]),
            regions: 1,
            region_names: vec!["eu".into()],
            workers_per_region: 1,
            concurrency: 64,
            target_latency_ms: 0.0,
            workers_as_processes: false,
            waves: vec!["1".into()],
            campaign_id: "c-1".into(),
            state: CampaignState::Completed,
            succeeded: 1,
            failed: 0,
            failures: BTreeMap::new(),
            plan_s: 0.1,
            inventory_s: 0.1,
            enroll_s: 0.1,
            results_read: 1,
            task_bytes: 300,
            result_bytes: 400,
            result_bytes_observed: Some(401.0),
            nats_server_version: "2.9.10".into(),
            nats_server_peak_rss_mb: None,
            cpu_ms_per_credential: BTreeMap::new(),
            baseline_cpu_ms_per_credential: BTreeMap::new(),
            cpu_ratio_to_baseline: None,
        };
        let v: serde_json::Value = serde_json::from_str(&r.json_line()).unwrap();
        for k in BENCH_JSON_KEYS {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["state"], "completed");
        assert_eq!(v["step_latency_ms"]["set"]["p90"], 2.0);
        assert!(r.render().contains("0.50 of the baseline"));
    }
}
