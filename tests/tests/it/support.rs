//! Fixtures shared by the integration tests: a JetStream topology with short
//! redelivery delays, fleets of simulated credentials, and workers and
//! coordinators of the in-process fleet (`keywave_devkit::fleet`) that run
//! until stopped.

use keywave_common::client::ApiClient;
use keywave_common::crypto::{generate, RegionKey, Secret, SecretPolicy};
use keywave_common::topology;
use keywave_common::wire::{
    CampaignSpec, Credential, OnFailure, Selector, Strategy, TargetKind, SCHEMA_VERSION,
};
use keywave_coordinator::CoordinatorOptions;
use keywave_devkit::fleet::{CoordinatorTask, StopError, WorkerTask};
use keywave_worker::fault::Faults;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::Targets;
use keywave_worker::{WorkerError, WorkerOptions, WorkerStats};
use std::sync::Arc;
use std::time::Duration;

/// How long a test waits for a worker or a coordinator to stop.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// Logs to the test's captured output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Production topology but for redelivery: an un-acked task comes back after
/// one second instead of five (see `topology::DEFAULT_TASK_BACKOFF_SECS`),
/// so crash tests run in seconds.
pub fn topology() -> topology::Config {
    topology::Config {
        task_backoff: vec![Duration::from_secs(1)],
        task_max_deliver: 5,
        ..Default::default()
    }
}

/// `n` credentials named `<prefix>-<0000>`, spread round-robin over
/// `regions`, all on `endpoint` of `kind`; principal = id.
pub fn credentials(
    prefix: &str,
    n: usize,
    regions: &[&str],
    endpoint: &str,
    kind: TargetKind,
) -> Vec<Credential> {
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i:04}");
            Credential {
                v: SCHEMA_VERSION,
                principal: id.clone(),
                id,
                region: regions[i % regions.len()].to_string(),
                endpoint: endpoint.to_string(),
                kind,
                tags: vec!["env=test".into()],
                owner: Some("keywave-tests".into()),
                consumers: vec![],
            }
        })
        .collect()
}

/// A fresh secret in the default policy (alphanumeric: safe in URLs).
pub fn secret() -> Secret {
    generate(&SecretPolicy::default())
}

/// A campaign over `selector` with sensible test defaults: no bake time, a
/// 30 s task timeout.
pub fn spec(
    selector: Selector,
    strategy: Strategy,
    waves: &str,
    failure_budget: f64,
    on_failure: OnFailure,
) -> CampaignSpec {
    CampaignSpec {
        v: SCHEMA_VERSION,
        name: "integration test".into(),
        reason: Some("keywave-tests".into()),
        selector,
        strategy,
        waves: keywave_common::wire::parse_wave_plan(waves).unwrap(),
        failure_budget,
        bake_ms: 0,
        on_failure,
        task_timeout_ms: 30_000,
        approve_before_waves: Vec::new(),
        // Off in the fixture: tests that stop an agent on purpose check the
        // verification after the rotation; tests/it/preflight.rs turns it on.
        preflight: Some(false),
        preflight_max_unreachable: 0.0,
        requested_by: None,
    }
}

/// Selects every credential of `regions`.
pub fn in_regions(regions: &[&str]) -> Selector {
    Selector {
        regions: regions.iter().map(|r| r.to_string()).collect(),
        ..Default::default()
    }
}

/// A worker of the in-process fleet.
pub struct RunningWorker {
    /// Its region's secret store.
    pub store: SecretStore,
    task: WorkerTask,
}

impl From<WorkerTask> for RunningWorker {
    fn from(task: WorkerTask) -> Self {
        RunningWorker {
            store: task.store().clone(),
            task,
        }
    }
}

impl RunningWorker {
    /// Cancels the worker and waits for it to drain.
    pub async fn stop(self) -> WorkerStats {
        self.task
            .stop(STOP_GRACE)
            .await
            .unwrap_or_else(|e| panic!("worker stops within {STOP_GRACE:?}: {e}"))
    }

    /// Waits up to `within` for the worker to end by itself (an injected crash).
    pub async fn join(self, within: Duration) -> Result<WorkerStats, StopError<WorkerError>> {
        self.task.join(within).await
    }
}

/// Starts a worker of `region` with `targets`, optionally with faults.
pub async fn start_worker(
    client: &async_nats::Client,
    region: &str,
    key: &RegionKey,
    targets: Arc<Targets>,
    faults: Faults,
) -> RunningWorker {
    start_worker_on(client, topology(), region, key, targets, faults).await
}

/// [`start_worker`] with another topology (a cluster's replicas).
pub async fn start_worker_on(
    client: &async_nats::Client,
    topology: topology::Config,
    region: &str,
    key: &RegionKey,
    targets: Arc<Targets>,
    faults: Faults,
) -> RunningWorker {
    let opts = WorkerOptions {
        region: region.to_string(),
        worker_id: keywave_tests::unique(&format!("worker-{region}")),
        concurrency: 32,
        topology,
        faults,
        ..Default::default()
    };
    start_worker_with(client, opts, key, targets).await
}

/// Starts a worker with options of the caller's (task keys, region, ...).
pub async fn start_worker_with(
    client: &async_nats::Client,
    opts: WorkerOptions,
    key: &RegionKey,
    targets: Arc<Targets>,
) -> RunningWorker {
    WorkerTask::start(client, opts, key, targets)
        .await
        .expect("worker starts")
        .into()
}

/// A coordinator of the in-process fleet.
pub struct RunningCoordinator {
    task: CoordinatorTask,
}

impl RunningCoordinator {
    /// Cancels the coordinator (as SIGTERM would) and waits for it to stop.
    pub async fn stop(self) {
        self.task
            .stop(STOP_GRACE)
            .await
            .unwrap_or_else(|e| panic!("coordinator stops within {STOP_GRACE:?}: {e}"))
    }
}

/// Starts a coordinator and waits until it answers the API.
pub async fn start_coordinator(client: &async_nats::Client) -> RunningCoordinator {
    start_coordinator_on(client, topology()).await
}

/// [`start_coordinator`] with another topology (a cluster's replicas).
pub async fn start_coordinator_on(
    client: &async_nats::Client,
    topology: topology::Config,
) -> RunningCoordinator {
    let opts = CoordinatorOptions {
        topology,
        coordinator_id: keywave_tests::unique("coordinator"),
        ..Default::default()
    };
    start_coordinator_with(client, opts).await
}

/// Starts a coordinator with options of the caller's (a task signer, ...)
/// and waits until it answers the API.
pub async fn start_coordinator_with(
    client: &async_nats::Client,
    opts: CoordinatorOptions,
) -> RunningCoordinator {
    start_coordinator_answering(client, opts, client, Duration::from_secs(15)).await
}

/// Starts a coordinator on `client` and waits up to `within` until it
/// answers a ping sent on `operator` (its run subscribes to the API in the
/// background).
pub async fn start_coordinator_answering(
    client: &async_nats::Client,
    opts: CoordinatorOptions,
    operator: &async_nats::Client,
    within: Duration,
) -> RunningCoordinator {
    let task = CoordinatorTask::start(client, opts)
        .await
        .expect("coordinator starts");
    let api = ApiClient::new(operator.clone()).with_timeout(Duration::from_secs(1));
    keywave_tests::wait_until(within, || {
        let api = api.clone();
        async move { api.ping().await.is_ok() }
    })
    .await
    .expect("coordinator answers ping");
    RunningCoordinator { task }
}

/// Creates the core topology and stores `creds` in the inventory.
pub async fn put_inventory(client: &async_nats::Client, creds: &[Credential]) {
    put_inventory_on(client, topology(), creds).await
}

/// [`put_inventory`] with another topology (a cluster's replicas).
pub async fn put_inventory_on(
    client: &async_nats::Client,
    cfg: topology::Config,
    creds: &[Credential],
) {
    let js = topology::context(client.clone());
    topology::ensure_core(&js, &cfg).await.expect("topology");
    let kv = topology::inventory(&js, &cfg)
        .await
        .expect("inventory bucket");
    keywave_coordinator::inventory::put_all(&kv, creds)
        .await
        .expect("inventory import");
}

/// Every event of campaign `cid` recorded so far on `KEYWAVE_EVENTS`, in order.
pub async fn events(
    client: &async_nats::Client,
    cid: &str,
) -> Vec<keywave_common::wire::CampaignEvent> {
    read_stream(
        client,
        topology::STREAM_EVENTS,
        &keywave_common::subjects::event_campaign_filter(cid),
    )
    .await
    .iter()
    .map(|m| keywave_common::codec::decode(m.headers.as_ref(), &m.payload).expect("event decodes"))
    .collect()
}

/// Every message on `stream` matching `filter` right now, in order, read
/// with an ordered consumer (no state left on the server).
pub async fn read_stream(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
) -> Vec<async_nats::jetstream::Message> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    use futures::StreamExt;
    let js = topology::context(client.clone());
    let consumer = js
        .get_stream(stream)
        .await
        .expect("stream exists")
        .create_consumer(pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return out;
    }
    let mut messages = consumer.messages().await.expect("messages");
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("stream keeps delivering")
    {
        let m = m.expect("message");
        let pending = m.info().expect("jetstream message").pending;
        out.push(m);
        if pending == 0 {
            break;
        }
    }
    out
}

/// A binary of this workspace (`package`, `bin`), built (or brought up to
/// date) first: `cargo test -p keywave-tests` alone does not build other
/// packages' binaries. Blocking; call it before starting a runtime's work or
/// through `spawn_blocking`.
pub fn workspace_binary(package: &str, bin: &str) -> std::path::PathBuf {
    use std::path::Path;
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    if let Ok(cargo) = std::env::var("CARGO") {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .arg("--manifest-path")
            .arg(manifest);
        // What `cargo test` set for this test binary is not the build's
        // environment: a dependency whose build reads one of these
        // (`CARGO_MANIFEST_DIR`) would be rebuilt here, with every crate
        // above it, and again by the next `cargo test`.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "CARGO_MANIFEST_DIR"
                || name == "CARGO_MANIFEST_PATH"
                || name == "CARGO_CRATE_NAME"
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_TARGET_TMPDIR"
                || name == "OUT_DIR"
                || name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_")
            {
                build.env_remove(name.as_ref());
            }
        }
        let status = build.status().expect("cargo build runs");
        assert!(status.success(), "building {bin} failed");
    }
    let path = dir.join(bin);
    assert!(path.exists(), "{} is missing", path.display());
    path
}
