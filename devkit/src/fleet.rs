//! The in-process fleet: regional workers and a coordinator running as tasks
//! of this process, stopped together. `keywave dev` and `keywave bench`
//! start their daemons through it, signing tasks with an ephemeral key that
//! the workers require, so the signed path is what runs and what is measured.

use keywave_common::crypto::RegionKey;
use keywave_common::sign::{SigningKey, TaskSigner, Verifier, DEFAULT_EXPIRY_MARGIN};
use keywave_coordinator::engine::{Coordinator, CoordinatorOptions};
use keywave_worker::targets::Targets;
use keywave_worker::{Worker, WorkerOptions};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long [`InProcess::shutdown`] waits for the daemons to drain.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Daemons running as tasks of this process.
pub struct InProcess {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    signing: SigningKey,
}

impl Default for InProcess {
    fn default() -> Self {
        InProcess::new()
    }
}

impl InProcess {
    /// An empty fleet with a fresh task-signing key.
    pub fn new() -> Self {
        InProcess {
            stop: CancellationToken::new(),
            tasks: Vec::new(),
            signing: SigningKey::generate(),
        }
    }

    /// Starts `count` workers of `template.region`, named
    /// `<template.worker_id>-<i>`, that accept only tasks signed by this fleet.
    pub async fn start_workers(
        &mut self,
        client: &async_nats::Client,
        template: WorkerOptions,
        key: &RegionKey,
        targets: Arc<Targets>,
        count: usize,
    ) -> anyhow::Result<()> {
        for i in 0..count {
            let opts = WorkerOptions {
                worker_id: format!("{}-{i}", template.worker_id),
                task_keys: Verifier::new(vec![self.signing.public().clone()]),
                require_signed_tasks: true,
                ..template.clone()
            };
            let worker = Worker::start(client.clone(), opts, key.clone(), targets.clone()).await?;
            let token = self.stop.clone();
            self.tasks.push(tokio::spawn(async move {
                if let Err(e) = worker.run(token).await {
                    tracing::warn!(error = %e, "Worker stopped with an error");
                }
            }));
        }
        Ok(())
    }

    /// Starts a coordinator that signs every task with this fleet's key.
    pub async fn start_coordinator(
        &mut self,
        client: &async_nats::Client,
        opts: CoordinatorOptions,
    ) -> anyhow::Result<()> {
        let opts = CoordinatorOptions {
            signer: Some(TaskSigner::new(self.signing.clone(), DEFAULT_EXPIRY_MARGIN)),
            ..opts
        };
        let coordinator = Coordinator::start(client.clone(), opts).await?;
        let token = self.stop.clone();
        self.tasks.push(tokio::spawn(async move {
            if let Err(e) = coordinator.run(token).await {
                tracing::warn!(error = %e, "Coordinator stopped with an error");
            }
        }));
        Ok(())
    }

    /// Stops every daemon and waits up to [`SHUTDOWN_GRACE`] for them.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let drained =
            tokio::time::timeout(SHUTDOWN_GRACE, futures::future::join_all(self.tasks)).await;
        if drained.is_err() {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "Workers and coordinator did not stop within the grace period"
            );
        }
    }
}
