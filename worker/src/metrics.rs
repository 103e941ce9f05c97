//! The worker's `/metrics` (Prometheus text format), `/healthz` and
//! `/readyz`, served on `metrics_addr` (`KEYWAVE_METRICS_ADDR`, off when
//! unset).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keywave_worker_tasks_total` | counter | `region`, `outcome` (`succeeded`, `failed`, `rolled_back`, `rollback_refused`, `dead_lettered`, `requeued`), `error_class` (`none` or the result's class) |
//! | `keywave_worker_step_duration_seconds` | histogram | `region`, `step` |
//! | `keywave_worker_tasks_in_flight` | gauge | `region` |
//! | `keywave_worker_ready` | gauge | `region` |
//!
//! `/healthz` answers 200 while the process runs; `/readyz` 200 once the
//! region's consumer is bound and while the NATS connection is up, else 503.
//! Counting costs a few atomic operations and one uncontended lock per task.

use keywave_common::telemetry::prom;
use keywave_common::wire::{Outcome, RotationResult};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio_util::sync::CancellationToken;

/// Environment variable with the metrics listen address (`host:port`).
pub const ENV_METRICS_ADDR: &str = "KEYWAVE_METRICS_ADDR";

/// A worker's counters. Cheap to update; rendered on scrape.
#[derive(Debug)]
pub struct WorkerMetrics {
    region: String,
    /// (outcome, error class) → count.
    tasks: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// step → latency histogram.
    steps: Mutex<BTreeMap<&'static str, Arc<prom::Histogram>>>,
    in_flight: AtomicI64,
    consumer_bound: AtomicBool,
    client: OnceLock<async_nats::Client>,
}

/// Decrements the in-flight gauge when the task ends (dropped).
pub struct InFlight(Arc<WorkerMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::RollbackRefused => "rollback_refused",
    }
}

impl WorkerMetrics {
    pub fn new(region: &str) -> Arc<Self> {
        Arc::new(WorkerMetrics {
            region: region.to_string(),
            tasks: Mutex::new(BTreeMap::new()),
            steps: Mutex::new(BTreeMap::new()),
            in_flight: AtomicI64::new(0),
            consumer_bound: AtomicBool::new(false),
            client: OnceLock::new(),
        })
    }

    /// The region's consumer is bound; readiness also follows `client`'s connection.
    pub(crate) fn bound(&self, client: async_nats::Client) {
        let _ = self.client.set(client);
        self.consumer_bound.store(true, Ordering::Relaxed);
    }

    /// Whether the worker can take tasks now.
    pub fn ready(&self) -> bool {
        self.consumer_bound.load(Ordering::Relaxed)
            && self
                .client
                .get()
                .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// A task started; the gauge goes down when the guard is dropped.
    pub fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Tasks running now.
    pub fn tasks_in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed).max(0) as u64
    }

    fn add(&self, outcome: &'static str, class: &'static str) {
        *self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((outcome, class))
            .or_default() += 1;
    }

    /// A result was published: its outcome, error class and step timings.
    pub fn result(&self, r: &RotationResult) {
        self.add(
            outcome_label(r.outcome),
            r.error_class.map_or("none", |c| c.as_str()),
        );
        if r.timings.is_empty() {
            return;
        }
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        for t in &r.timings {
            steps
                .entry(t.step.as_str())
                .or_insert_with(|| Arc::new(prom::Histogram::new(prom::LATENCY_BUCKETS)))
                .observe(t.micros as f64 / 1e6);
        }
    }

    /// A message was dead-lettered (refused, never run).
    pub fn dead_lettered(&self) {
        self.add("dead_lettered", "none");
    }

    /// A task was handed back for redelivery.
    pub fn requeued(&self) {
        self.add("requeued", "none");
    }

    /// Count of `outcome` over every error class (tests, logs).
    pub fn tasks(&self, outcome: &str) -> u64 {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((o, _), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let region = self.region.as_str();
        prom::family(
            &mut out,
            "keywave_worker_tasks_total",
            "counter",
            "Tasks handled by this worker, by outcome and error class.",
        );
        for ((outcome, class), n) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            prom::sample(
                &mut out,
                "keywave_worker_tasks_total",
                &[
                    ("region", region),
                    ("outcome", outcome),
                    ("error_class", class),
                ],
                *n as f64,
            );
        }
        prom::family(
            &mut out,
            "keywave_worker_step_duration_seconds",
            "histogram",
            "Time spent in each rotation protocol step.",
        );
        let steps: Vec<_> = self
            .steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (step, h) in steps {
            h.write(
                &mut out,
                "keywave_worker_step_duration_seconds",
                &[("region", region), ("step", step)],
            );
        }
        prom::family(
            &mut out,
            "keywave_worker_tasks_in_flight",
            "gauge",
            "Tasks running in this worker now.",
        );
        prom::sample(
            &mut out,
            "keywave_worker_tasks_in_flight",
            &[("region", region)],
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        prom::family(
            &mut out,
            "keywave_worker_ready",
            "gauge",
            "1 when the region's consumer is bound and NATS is connected.",
        );
        prom::sample(
            &mut out,
            "keywave_worker_ready",
            &[("region", region)],
            if self.ready() { 1.0 } else { 0.0 },
        );
        out
    }
}

impl keywave_common::exposition::Exposition for WorkerMetrics {
    fn render(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move { self.render() })
    }
    fn ready(&self) -> bool {
        WorkerMetrics::ready(self)
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown`; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<WorkerMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    keywave_common::exposition::serve(addr, metrics, shutdown.cancelled_owned()).await
}
