//! `keywave-worker`: the regional worker binary. Parses flags, loads and
//! validates the configuration, wires NATS, the targets and the worker
//! together, and turns SIGTERM/SIGINT into a graceful drain.

use anyhow::{bail, Context, Result};
use clap::Parser;
use keywave_common::crypto::{RegionKey, Secret};
use keywave_common::{ids, topology};
use keywave_worker::config::{self, Config, ConfigError, Overrides, ProcessEnv};
use keywave_worker::fault::Faults;
use keywave_worker::notice::Notifier;
use keywave_worker::store::SecretStore;
use keywave_worker::targets::AuthCheck;
use keywave_worker::{Worker, WorkerOptions};
use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use keywave_worker::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keywave-worker: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keywave-worker: {e:#}");
            // Configuration mistakes are usage errors.
            if e.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Logs (`--log-format`) and, with `OTEL_EXPORTER_OTLP_ENDPOINT`, span export.
fn init_tracing(cli: &Cli) -> Result<keywave_common::telemetry::Guard> {
    keywave_common::telemetry::init(&keywave_common::telemetry::Options::new(
        "keywave-worker",
        cli.log_format,
        "info",
    ))
    .context("setting up logs and traces")
}

async fn dispatch(cli: Cli) -> Result<()> {
    let telemetry = match cli.command {
        Some(Command::Keygen) => None,
        _ => Some(init_tracing(&cli)?),
    };
    let r = dispatch_command(cli).await;
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    r
}

async fn dispatch_command(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Keygen) => {
            println!("{}", RegionKey::generate().to_hex());
            Ok(())
        }
        Some(Command::Enroll {
            ref credential,
            ref endpoint,
            ref principal,
            ref file,
            concurrency,
            verify,
            no_verify,
            json,
        }) => {
            if file.is_none() && (concurrency.is_some() || verify || no_verify || json) {
                return Err(ConfigError::Invalid {
                    field: "--file".into(),
                    message: "--concurrency, --verify, --no-verify and --json apply to --file only"
                        .into(),
                }
                .into());
            }
            let cfg = load_config(&cli)?;
            if let Some(file) = file {
                let opts = keywave_worker::enroll::Options {
                    concurrency: concurrency.unwrap_or(keywave_worker::enroll::DEFAULT_CONCURRENCY),
                    verify: !no_verify,
                    default_endpoint: endpoint.clone(),
                };
                return enroll_file(&cfg, file, &opts, json).await;
            }
            // clap requires all three without --file.
            let (Some(credential), Some(endpoint), Some(principal)) =
                (credential, endpoint, principal)
            else {
                bail!("--credential, --endpoint and --principal are required without --file");
            };
            enroll(&cfg, credential, endpoint, principal).await
        }
        Some(Command::Agent { ref consumer }) => agent(&cli, consumer.clone()).await,
        None | Some(Command::Run) => {
            let cfg = load_config(&cli)?;
            run(cfg, cli.metrics_addr).await
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config> {
    let Some(path) = &cli.config else {
        return Err(ConfigError::Invalid {
            field: "--config".into(),
            message: format!(
                "a configuration file is required (or set {})",
                config::ENV_CONFIG
            ),
        }
        .into());
    };
    let overrides = Overrides {
        region: cli.region.clone(),
        nats_url: cli.nats.clone(),
    };
    Ok(Config::load(path, &overrides, &ProcessEnv)?)
}

async fn connect(cfg: &Config) -> Result<async_nats::Client> {
    keywave_common::nats::connect_as(
        &cfg.nats_url,
        keywave_common::nats::options(format!("keywave-worker {}", cfg.worker_id)),
        &cfg.nats,
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))
}

async fn run(cfg: Config, metrics_addr: Option<std::net::SocketAddr>) -> Result<()> {
    // Tasks must be signed: refused before any connection, as a usage error.
    if cfg.require_signed_tasks && cfg.coordinator_keys.is_empty() {
        return Err(ConfigError::Invalid {
            field: "coordinator_public_keys".into(),
            message: format!(
                "is empty: tasks must be signed. Add the coordinator's public key (printed by \
                 `keywave-coordinator keygen`) or set {}; for development only, \
                 insecure_unsigned_tasks = true (or {}=1) serves unsigned tasks",
                config::ENV_COORDINATOR_PUBLIC_KEYS,
                config::ENV_INSECURE_UNSIGNED_TASKS
            ),
        }
        .into());
    }
    let faults = Faults::from_env()?;
    if faults.any() {
        warn!(?faults, "Fault injection is ON");
    }
    let client = connect(&cfg).await?;
    let targets = Arc::new(cfg.targets().await.context("building the endpoints")?);
    info!(endpoints = ?targets.names(), "Endpoints ready");
    let worker = Worker::start(
        client.clone(),
        WorkerOptions {
            region: cfg.region.clone(),
            worker_id: cfg.worker_id.clone(),
            concurrency: cfg.concurrency,
            topology: cfg.topology.clone(),
            faults,
            detect_key: cfg.detect_key.clone(),
            task_keys: keywave_common::sign::Verifier::new(cfg.coordinator_keys.clone()),
            require_signed_tasks: cfg.require_signed_tasks,
        },
        cfg.region_key.clone(),
        targets.clone(),
    )
    .await?;

    let shutdown = CancellationToken::new();
    // /metrics, /healthz, /readyz (--metrics-addr, KEYWAVE_METRICS_ADDR, metrics_addr).
    if let Some(addr) = metrics_addr.or(cfg.metrics_addr) {
        keywave_worker::metrics::serve(addr, worker.metrics(), shutdown.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    // The admin service (reconcile, discover) answers next to the consume loop.
    let admin = keywave_worker::admin::AdminService::new(
        client.clone(),
        keywave_worker::admin::AdminOptions {
            region: cfg.region.clone(),
            worker_id: cfg.worker_id.clone(),
            concurrency: keywave_worker::admin::DEFAULT_CONCURRENCY,
        },
        worker.store().clone(),
        targets,
        cfg.detect_key
            .clone()
            .map(|k| Notifier::new(topology::context(client.clone()), k, &cfg.region)),
    );
    let _admin = admin.spawn(shutdown.clone()).await?;
    let mut running = tokio::spawn(worker.run(shutdown.clone()));
    tokio::select! {
        r = &mut running => {
            let stats = r.context("worker task")??;
            info!(?stats, "Worker returned");
            return Ok(());
        }
        signal = shutdown_signal() => info!(signal, "Shutting down; draining in-flight tasks"),
    }
    shutdown.cancel();
    match tokio::time::timeout(cfg.shutdown_grace, &mut running).await {
        Ok(r) => {
            let stats = r.context("worker task")??;
            info!(?stats, "Drained");
        }
        Err(_) => {
            warn!(
                grace_secs = cfg.shutdown_grace.as_secs(),
                "Grace period ran out; tasks still in flight stay un-acked and will be redelivered"
            );
            running.abort();
        }
    }
    if let Err(e) = client.flush().await {
        warn!(error = %e, "Could not flush the NATS connection");
    }
    Ok(())
}

async fn agent(cli: &Cli, consumer: Option<String>) -> Result<()> {
    use keywave_worker::agent::{Agent, AgentConfig, AgentOverrides};
    let Some(path) = &cli.config else {
        return Err(ConfigError::Invalid {
            field: "--config".into(),
            message: "an agent configuration file is required".into(),
        }
        .into());
    };
    let overrides = AgentOverrides {
        consumer,
        region: cli.region.clone(),
        nats_url: cli.nats.clone(),
    };
    let cfg =
        AgentConfig::load(path, &overrides, &ProcessEnv).map_err(|e| ConfigError::Invalid {
            field: path.display().to_string(),
            message: e.to_string(),
        })?;
    let client = keywave_common::nats::connect_as(
        &cfg.nats_url,
        keywave_common::nats::options(format!("keywave-agent {}", cfg.consumer)),
        &cfg.nats,
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))?;
    let agent = Agent::start(client.clone(), cfg).await?;
    let shutdown = CancellationToken::new();
    let mut running = tokio::spawn(agent.run(shutdown.clone()));
    tokio::select! {
        r = &mut running => return r.context("agent task")?,
        signal = shutdown_signal() => info!(signal, "Agent stopping"),
    }
    shutdown.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), running).await;
    let _ = client.flush().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, naming which.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(e) => {
                warn!(error = %e, "Cannot listen for SIGTERM; only SIGINT stops the worker");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Today's secret, from the environment or the first line of stdin.
fn read_enroll_secret() -> Result<Secret> {
    if let Ok(v) = std::env::var(config::ENV_ENROLL_SECRET) {
        if v.is_empty() {
            bail!("{} is set but empty", config::ENV_ENROLL_SECRET);
        }
        return Ok(Secret::new(v));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!(
            "Reading the current secret from stdin (it will show as you type; prefer piping it or {}):",
            config::ENV_ENROLL_SECRET
        );
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the secret from stdin")?;
    let secret = Secret::new(line.trim_end_matches(['\n', '\r']).to_string());
    line.clear();
    if secret.expose().is_empty() {
        bail!(
            "no secret given: set {} or pipe it on stdin",
            config::ENV_ENROLL_SECRET
        );
    }
    Ok(secret)
}

async fn enroll(cfg: &Config, credential: &str, endpoint: &str, principal: &str) -> Result<()> {
    ids::validate("credential id", credential).map_err(|e| ConfigError::Invalid {
        field: "--credential".into(),
        message: e.to_string(),
    })?;
    // The rules of an inventory import: what is enrolled must be importable.
    ids::validate_principal(principal).map_err(|e| ConfigError::Invalid {
        field: "--principal".into(),
        message: e.to_string(),
    })?;
    let ep = cfg.endpoint(endpoint).ok_or_else(|| ConfigError::Invalid {
        field: "--endpoint".into(),
        message: format!("endpoint {endpoint:?} is not in the configuration"),
    })?;
    let secret = read_enroll_secret()?;
    let target = ep
        .connect()
        .await
        .with_context(|| format!("connecting to endpoint {endpoint}"))?;
    // A login that lets a wrong secret in proves nothing: refuse to enrol it.
    let wrong = keywave_common::crypto::generate(&target.policy());
    if target
        .check(principal, &wrong)
        .await
        .with_context(|| format!("checking that endpoint {endpoint} refuses a wrong secret"))?
        == AuthCheck::Accepted
    {
        bail!(
            "endpoint {endpoint} lets {principal:?} in with a random wrong secret (a Redis user with nopass, \
             a trust rule in pg_hba.conf, an account without a password): nothing it answers proves anything, \
             so nothing was stored (error class target_accepts_any_secret)"
        );
    }
    match target
        .check(principal, &secret)
        .await
        .with_context(|| format!("checking the secret at endpoint {endpoint}"))?
    {
        AuthCheck::Accepted => {}
        AuthCheck::Rejected => bail!(
            "the given secret does not authenticate {principal:?} at endpoint {endpoint}; nothing was stored"
        ),
    }
    let client = connect(cfg).await?;
    let js = topology::context(client);
    let (_, kv) = topology::bind_or_ensure_region(&js, &cfg.region, &cfg.topology).await?;
    let store = SecretStore::from_kv(kv, &cfg.region, cfg.region_key.clone());
    let fingerprint = store.fingerprint(&secret);
    store.enroll(credential, secret.clone()).await?;
    if let Some(key) = &cfg.detect_key {
        // Advisory, like after a rotation: a lost notice is logged, the
        // enrolment stands.
        Notifier::new(js, key.clone(), &cfg.region)
            .announce(credential, &secret, None)
            .await;
    }
    println!(
        "enrolled {credential} ({principal} at {endpoint}, region {}): fingerprint {fingerprint}",
        cfg.region
    );
    Ok(())
}

/// `enroll --file`: every record of a JSON Lines file (or stdin), reported
/// one line each on stdout as it completes, then a summary.
async fn enroll_file(
    cfg: &Config,
    file: &std::path::Path,
    opts: &keywave_worker::enroll::Options,
    json: bool,
) -> Result<()> {
    use keywave_worker::enroll::{self, Enroller, Report};
    use std::io::Write;
    if let Some(name) = &opts.default_endpoint {
        if cfg.endpoint(name).is_none() {
            return Err(ConfigError::Invalid {
                field: "--endpoint".into(),
                message: format!("endpoint {name:?} is not in the configuration"),
            }
            .into());
        }
    }
    let stdin = file.as_os_str() == "-";
    // Refused before anything is connected: a file others can read.
    let input: Box<dyn std::io::Read + Send> = if stdin {
        if std::io::stdin().is_terminal() {
            eprintln!(
                "Reading records from stdin (secrets show as you type; prefer piping them in), end with Ctrl-D:"
            );
        }
        Box::new(enroll::stdin_records().context("reading the records from stdin")?)
    } else {
        Box::new(
            enroll::open_records(file).map_err(|e| ConfigError::Invalid {
                field: "--file".into(),
                message: e.to_string(),
            })?,
        )
    };
    let client = connect(cfg).await?;
    let js = topology::context(client.clone());
    let (_, kv) = topology::bind_or_ensure_region(&js, &cfg.region, &cfg.topology).await?;
    let store = SecretStore::from_kv(kv, &cfg.region, cfg.region_key.clone());
    let notifier = cfg
        .detect_key
        .clone()
        .map(|k| Notifier::new(js.clone(), k, &cfg.region));
    let source = if stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    info!(source = %source, region = %cfg.region, concurrency = opts.concurrency, verify = opts.verify, "Bulk enrolment started");
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    let emit = |r: &Report| {
        let line = if json {
            serde_json::to_string(r).unwrap_or_default()
        } else {
            r.to_string()
        };
        if let Err(e) = writeln!(out, "{line}") {
            write_error.get_or_insert(e);
        }
    };
    let summary = Enroller::new(&store, cfg, notifier.as_ref())
        .run(input, opts, emit)
        .await;
    if json {
        #[derive(serde::Serialize)]
        struct Last<'a> {
            summary: SummaryOut<'a>,
        }
        #[derive(serde::Serialize)]
        struct SummaryOut<'a> {
            #[serde(flatten)]
            counts: &'a enroll::Summary,
            region: &'a str,
            source: &'a str,
            verify: bool,
        }
        let last = Last {
            summary: SummaryOut {
                counts: &summary,
                region: &cfg.region,
                source: &source,
                verify: opts.verify,
            },
        };
        let _ = writeln!(out, "{}", serde_json::to_string(&last)?);
    } else {
        let _ = writeln!(out, "enroll {source} (region {}): {summary}", cfg.region);
    }
    let _ = out.flush();
    if let Err(e) = client.flush().await {
        warn!(error = %e, "Could not flush the NATS connection");
    }
    if let Some(e) = write_error {
        return Err(e).context("writing the reports to stdout");
    }
    if summary.failed > 0 {
        bail!(
            "{} of {} records failed (see their lines above); fix them and run the same input again: what was stored is skipped",
            summary.failed,
            summary.records
        );
    }
    Ok(())
}
