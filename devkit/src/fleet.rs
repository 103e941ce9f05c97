//! The in-process fleet: regional workers and coordinators running as tasks
//! of this process. Each daemon is a [`WorkerTask`] or a [`CoordinatorTask`]:
//! it runs until its own token is cancelled (as SIGTERM would) or it ends by
//! itself, and stopping it tells how it ended (a worker with its
//! [`WorkerStats`]). The integration tests start them one by one with the
//! options, targets, faults and keys they need. [`InProcess`] is the fleet
//! `keywave dev` and `keywave bench` run: it signs tasks with an ephemeral
//! key that its workers require, so the signed path is what runs and what is
//! measured, and stops every daemon together.

use keywave_common::crypto::RegionKey;
use keywave_common::sign::{SigningKey, TaskSigner, Verifier, DEFAULT_EXPIRY_MARGIN};
use keywave_coordinator::engine::{Coordinator, CoordinatorError, CoordinatorOptions};
use keywave_worker::store::SecretStore;
use keywave_worker::targets::Targets;
use keywave_worker::{Worker, WorkerError, WorkerOptions, WorkerStats};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

/// How long [`InProcess::shutdown`] waits for the daemons to drain.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How a daemon of the fleet failed to end well.
#[derive(Debug, thiserror::Error)]
pub enum StopError<E> {
    /// It was still running when the grace period ended (it keeps running,
    /// detached, until the runtime ends).
    #[error("still running after {0:?}")]
    Timeout(Duration),
    /// Its task panicked or was aborted.
    #[error("task failed: {0}")]
    Task(#[from] JoinError),
    /// It returned an error.
    #[error("{0}")]
    Run(E),
}

/// A daemon's task and the token that stops it.
struct Running<T, E> {
    cancel: CancellationToken,
    handle: JoinHandle<Result<T, E>>,
}

impl<T, E> Running<T, E>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    /// Spawns `run` with a fresh token; an error it returns is logged as
    /// `what` stopping with an error (and returned by [`Running::join`]).
    fn spawn<F>(what: &'static str, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let run = run(cancel.clone());
        let handle = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "{what} stopped with an error");
            }
            result
        });
        Running { cancel, handle }
    }

    async fn join(self, grace: Duration) -> Result<T, StopError<E>> {
        match tokio::time::timeout(grace, self.handle).await {
            Err(_) => Err(StopError::Timeout(grace)),
            Ok(joined) => joined?.map_err(StopError::Run),
        }
    }

    async fn stop(self, grace: Duration) -> Result<T, StopError<E>> {
        self.cancel.cancel();
        self.join(grace).await
    }
}

/// A worker running as a task of this process.
pub struct WorkerTask {
    store: SecretStore,
    running: Running<WorkerStats, WorkerError>,
}

impl WorkerTask {
    /// Starts a worker ([`Worker::start`]) and runs it until stopped.
    pub async fn start(
        client: &async_nats::Client,
        opts: WorkerOptions,
        key: &RegionKey,
        targets: Arc<Targets>,
    ) -> Result<WorkerTask, WorkerError> {
        let worker = Worker::start(client.clone(), opts, key.clone(), targets).await?;
        Ok(WorkerTask::spawn(worker))
    }

    /// Runs a worker the caller started (to serve its metrics first, say).
    pub fn spawn(worker: Worker) -> WorkerTask {
        let store = worker.store().clone();
        let running = Running::spawn("Worker", |token| worker.run(token));
        WorkerTask { store, running }
    }

    /// The region's secret store the worker uses.
    pub fn store(&self) -> &SecretStore {
        &self.store
    }

    /// Whether the worker has ended (stopped, failed or crashed on purpose).
    pub fn is_finished(&self) -> bool {
        self.running.handle.is_finished()
    }

    /// Asks the worker to stop, as SIGTERM would: it drains the tasks in
    /// hand; waits up to `grace` for its counts.
    pub async fn stop(self, grace: Duration) -> Result<WorkerStats, StopError<WorkerError>> {
        self.running.stop(grace).await
    }

    /// Waits up to `grace` for the worker to end by itself (an injected
    /// crash) without asking it to stop.
    pub async fn join(self, grace: Duration) -> Result<WorkerStats, StopError<WorkerError>> {
        self.running.join(grace).await
    }
}

/// A coordinator running as a task of this process.
pub struct CoordinatorTask {
    running: Running<(), CoordinatorError>,
}

impl CoordinatorTask {
    /// Starts a coordinator ([`Coordinator::start`]) and runs it until
    /// stopped. It answers the API once its run has subscribed, shortly after.
    pub async fn start(
        client: &async_nats::Client,
        opts: CoordinatorOptions,
    ) -> Result<CoordinatorTask, CoordinatorError> {
        let coordinator = Coordinator::start(client.clone(), opts).await?;
        Ok(CoordinatorTask::spawn(coordinator))
    }

    /// Runs a coordinator the caller started (to keep its kill switch, say).
    pub fn spawn(coordinator: Coordinator) -> CoordinatorTask {
        let running = Running::spawn("Coordinator", |token| coordinator.run(token));
        CoordinatorTask { running }
    }

    /// Whether the coordinator has ended.
    pub fn is_finished(&self) -> bool {
        self.running.handle.is_finished()
    }

    /// Asks the coordinator to stop, as SIGTERM would (snapshots saved,
    /// lease handed over), and waits up to `grace` for it.
    pub async fn stop(self, grace: Duration) -> Result<(), StopError<CoordinatorError>> {
        self.running.stop(grace).await
    }

    /// Waits up to `grace` for the coordinator to end by itself (killed
    /// through its kill switch, or an injected crash).
    pub async fn join(self, grace: Duration) -> Result<(), StopError<CoordinatorError>> {
        self.running.join(grace).await
    }
}

/// The fleet of `keywave dev` and `keywave bench`: daemons that sign and
/// require signed tasks, stopped together.
pub struct InProcess {
    workers: Vec<WorkerTask>,
    coordinators: Vec<CoordinatorTask>,
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
            workers: Vec::new(),
            coordinators: Vec::new(),
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
            let worker = WorkerTask::start(client, opts, key, targets.clone()).await?;
            self.workers.push(worker);
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
        let coordinator = CoordinatorTask::start(client, opts).await?;
        self.coordinators.push(coordinator);
        Ok(())
    }

    /// Stops every daemon and waits up to [`SHUTDOWN_GRACE`] for them (an
    /// error a daemon ended with was logged when it ended).
    pub async fn shutdown(self) {
        use futures::future::{join, join_all};
        let (workers, coordinators) = join(
            join_all(self.workers.into_iter().map(|w| w.stop(SHUTDOWN_GRACE))),
            join_all(
                self.coordinators
                    .into_iter()
                    .map(|c| c.stop(SHUTDOWN_GRACE)),
            ),
        )
        .await;
        let timed_out = workers
            .iter()
            .any(|r| matches!(r, Err(StopError::Timeout(_))))
            || coordinators
                .iter()
                .any(|r| matches!(r, Err(StopError::Timeout(_))));
        if timed_out {
            tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "Workers and coordinator did not stop within the grace period"
            );
        }
    }
}
