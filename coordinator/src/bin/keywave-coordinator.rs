//! The coordinator daemon: parse flags, set up logging, connect, run until
//! SIGTERM or SIGINT. Everything else lives in the library.

use anyhow::Context;
use clap::Parser;
use keywave_coordinator::{config::DaemonArgs, Coordinator};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = DaemonArgs::parse();
    if let Some(keywave_coordinator::config::DaemonCommand::Keygen { out }) = &args.command {
        let key = keywave_common::sign::SigningKey::generate();
        if let Err(e) = key.to_file(out) {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
        eprintln!(
            "wrote the task-signing key {} to {} (mode 0600); its public key (for coordinator_public_keys):",
            key.id(),
            out.display()
        );
        println!("{}", key.public());
        return std::process::ExitCode::SUCCESS;
    }
    // Logs (--log-format) and, with OTEL_EXPORTER_OTLP_ENDPOINT, span export.
    let telemetry = match keywave_common::telemetry::init(&keywave_common::telemetry::Options::new(
        "keywave-coordinator",
        args.log_format,
        "info",
    )) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let code = match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Coordinator failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

/// A setting from the environment that does not validate.
#[derive(Debug, thiserror::Error)]
enum EnvError {
    #[error(transparent)]
    Faults(#[from] keywave_coordinator::engine::fault::FaultError),
}

/// Fault injection from the environment (lease timings are flags, see
/// `--lease-ttl`).
fn from_env(opts: &mut keywave_coordinator::CoordinatorOptions) -> Result<(), EnvError> {
    opts.faults = keywave_coordinator::engine::fault::Faults::from_env()?;
    if opts.faults.crash.is_some() {
        tracing::warn!(faults = ?opts.faults, "Fault injection is ON");
    }
    Ok(())
}

async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let mut opts = match args.to_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = from_env(&mut opts) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    // Detection intake (`--detections`, default on): see keywave_coordinator::detect.
    let detect = match args
        .detect
        .to_options(opts.topology.clone(), |k| std::env::var(k).ok())
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    // Who this coordinator is on NATS (--nats-user, --nats-creds, ...).
    let (nats_auth, regions) = match (args.nats_auth.to_config(), args.region_list()) {
        (Ok(a), Ok(r)) => (a, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let client = keywave_common::nats::connect_as(
        &args.nats,
        keywave_common::nats::options(format!("keywave-coordinator {}", opts.coordinator_id))
            .retry_on_initial_connect(),
        &nats_auth,
    )
    .await
    .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    // /metrics, /healthz, /readyz (--metrics-addr): up before the topology
    // and the lease, so /readyz says 503 until both are there.
    let metrics_stop = CancellationToken::new();
    let _metrics_stop = metrics_stop.clone().drop_guard();
    if let Some(addr) = args.metrics_addr {
        opts.metrics.attach(client.clone(), opts.topology.clone());
        keywave_coordinator::metrics::serve(addr, opts.metrics.clone(), metrics_stop)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    // With least-privilege NATS users only the coordinator creates the
    // topology: each --regions region's task consumer and secret store.
    if !regions.is_empty() {
        let js = keywave_common::topology::context(client.clone());
        keywave_common::topology::ensure_core(&js, &opts.topology).await?;
        for r in &regions {
            keywave_common::topology::ensure_region(&js, r, &opts.topology).await?;
        }
        tracing::info!(regions = ?regions, "Region topology ready");
    }
    match &opts.signer {
        Some(s) => tracing::info!(key_id = %s.key_id(), "Tasks are signed"),
        None => tracing::warn!(
            "INSECURE: --insecure-unsigned-tasks: tasks are published UNSIGNED; only workers started with insecure_unsigned_tasks accept them, and anyone who can publish on keywave.task.> can make those rotate credentials. Use --signing-key-file outside development"
        ),
    }
    let coordinator = Coordinator::start(client.clone(), opts).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    let detector = match detect {
        Some(d) => Some(tokio::spawn(
            keywave_coordinator::detect::Detector::start(client, d)
                .await?
                .run(shutdown.clone()),
        )),
        None => None,
    };
    coordinator.run(shutdown.clone()).await?;
    if let Some(d) = detector {
        shutdown.cancel();
        d.await??;
    }
    Ok(())
}

/// Cancels `token` on the first SIGTERM or SIGINT.
async fn signals(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for SIGTERM; only SIGINT stops the coordinator");
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
    token.cancel();
}
