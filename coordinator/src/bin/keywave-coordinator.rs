//! The coordinator daemon: parse flags, set up logging, connect, run until
//! SIGTERM or SIGINT. Everything else lives in the library.

use anyhow::Context;
use clap::Parser;
use keywave_coordinator::{cli::DaemonArgs, Coordinator};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = DaemonArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "Coordinator failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let opts = match args.to_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let client = async_nats::ConnectOptions::new()
        .name(format!("keywave-coordinator {}", opts.coordinator_id))
        .retry_on_initial_connect()
        .connect(&args.nats)
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats))?;
    let coordinator = Coordinator::start(client, opts).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    coordinator.run(shutdown).await?;
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
