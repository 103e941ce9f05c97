//! The coordinator's `/metrics` (Prometheus text format), `/healthz` and
//! `/readyz`, served on `--metrics-addr` (`KEYWAVE_METRICS_ADDR`, off when
//! unset).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `keywave_coordinator_results_total` | counter | `region`, `action` (`rotate`, `rollback`), `outcome`, `error_class` (`none` or the class); each result counted once when applied |
//! | `keywave_coordinator_campaigns` | gauge | `state`: campaigns in the `keywave-campaigns` bucket by state |
//! | `keywave_coordinator_campaign_wave` | gauge | `campaign`: current wave (0-based) of each unfinished campaign |
//! | `keywave_coordinator_consumer_pending` | gauge | `region`: tasks not yet delivered on `workers-<region>` (`num_pending`, for autoscaling) |
//! | `keywave_coordinator_consumer_ack_pending` | gauge | `region`: tasks delivered, not yet acked |
//! | `keywave_coordinator_region_workers` | gauge | `region`: live workers (heartbeat heard within 3 intervals; see `crate::regions`) |
//! | `keywave_coordinator_region_silent_seconds` | gauge | `region`: how long the region has had no live worker (0 while it has one) |
//! | `keywave_coordinator_region_tasks_queued` | gauge | `region`: tasks on `workers-<region>` no worker pulled yet (read by the liveness tracker every 2s) |
//! | `keywave_coordinator_region_tasks_in_flight` | gauge | `region`: tasks pulled by a worker and not answered yet |
//! | `keywave_coordinator_active` | gauge | 1 when this coordinator holds the lease, 0 standing by |
//! | `keywave_coordinator_ready` | gauge | 1 when `/readyz` answers 200 |
//!
//! Campaign and consumer figures are read from JetStream when scraped, at
//! most every [`REFRESH`] (bounded by [`LOOKUP_TIMEOUT`]): a scrape never
//! waits long on a slow server. `/readyz` answers 200 once NATS is connected
//! and the lease state is known (active or standing by), 503 otherwise.

use async_nats::jetstream;
use keywave_common::api::CampaignStatus;
use keywave_common::telemetry::prom;
use keywave_common::topology;
use keywave_common::wire::{CampaignState, RotationResult, TaskAction};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Environment variable with the metrics listen address (`host:port`).
pub const ENV_METRICS_ADDR: &str = "KEYWAVE_METRICS_ADDR";
/// Campaign and consumer figures are at most this old when scraped.
pub const REFRESH: Duration = Duration::from_secs(2);
/// Longest JetStream lookup of one scrape.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

const ALL_STATES: [CampaignState; 8] = [
    CampaignState::Running,
    CampaignState::Baking,
    CampaignState::Paused,
    CampaignState::AwaitingApproval,
    CampaignState::RollingBack,
    CampaignState::RolledBack,
    CampaignState::Completed,
    CampaignState::Aborted,
];

/// Whether this coordinator holds the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// Not known yet (the lease could not be read).
    Unknown = 0,
    Standby = 1,
    Active = 2,
}

#[derive(Debug, Default)]
struct Snapshot {
    at: Option<Instant>,
    /// state → count.
    states: BTreeMap<&'static str, u64>,
    /// campaign → current wave, unfinished campaigns only.
    waves: BTreeMap<String, u32>,
    /// region → (num_pending, num_ack_pending).
    consumers: BTreeMap<String, (u64, u64)>,
}

/// One region's liveness figures, as the liveness tracker last saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionFigures {
    pub workers: u32,
    /// How long without a live worker (`None` while it has one).
    pub silent_ms: Option<u64>,
    pub queued: Option<u64>,
    pub in_flight: Option<u64>,
}

/// Labels of a result counter: region, action, outcome, error class.
type ResultKey = (String, &'static str, &'static str, &'static str);

/// A coordinator's counters and the JetStream figures it shows.
#[derive(Debug, Default)]
pub struct CoordinatorMetrics {
    /// (region, action, outcome, error class) → count.
    results: Mutex<BTreeMap<ResultKey, u64>>,
    role: AtomicU8,
    client: OnceLock<async_nats::Client>,
    topology: OnceLock<topology::Config>,
    snapshot: tokio::sync::Mutex<Snapshot>,
    /// region → liveness figures (see [`crate::regions`]).
    regions: Mutex<BTreeMap<String, RegionFigures>>,
}

fn outcome_label(o: keywave_common::wire::Outcome) -> &'static str {
    use keywave_common::wire::Outcome;
    match o {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::RolledBack => "rolled_back",
        Outcome::RollbackRefused => "rollback_refused",
    }
}

impl CoordinatorMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A result counted into its campaign (duplicates are not).
    pub fn result(&self, r: &RotationResult) {
        let action = match r.action {
            TaskAction::Rotate => "rotate",
            TaskAction::Rollback => "rollback",
        };
        let key = (
            r.region.clone(),
            action,
            outcome_label(r.outcome),
            r.error_class.map_or("none", |c| c.as_str()),
        );
        *self
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// Results counted with `outcome` (all regions, actions and classes).
    pub fn results(&self, outcome: &str) -> u64 {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((_, _, o, _), _)| *o == outcome)
            .map(|(_, n)| n)
            .sum()
    }

    /// The liveness tracker's latest figures.
    pub fn set_regions(&self, regions: BTreeMap<String, RegionFigures>) {
        *self.regions.lock().unwrap_or_else(|e| e.into_inner()) = regions;
    }

    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            1 => Role::Standby,
            2 => Role::Active,
            _ => Role::Unknown,
        }
    }

    /// The NATS connection (readiness, lookups) and topology to read from.
    pub fn attach(&self, client: async_nats::Client, topology: topology::Config) {
        let _ = self.client.set(client);
        let _ = self.topology.set(topology);
    }

    fn connected(&self) -> bool {
        self.client
            .get()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// Connected to NATS and the lease state is known.
    pub fn ready(&self) -> bool {
        self.connected() && self.role() != Role::Unknown
    }

    /// Reads campaign states and consumer figures from JetStream when the
    /// last read is older than [`REFRESH`].
    async fn refresh(&self) {
        let mut snap = self.snapshot.lock().await;
        if snap.at.is_some_and(|t| t.elapsed() < REFRESH) || !self.connected() {
            return;
        }
        let Some(client) = self.client.get() else {
            return;
        };
        let js = topology::context(client.clone());
        let mut next = Snapshot {
            at: Some(Instant::now()),
            ..Default::default()
        };
        let campaigns = async {
            let kv = js.get_key_value(topology::KV_CAMPAIGNS).await.ok()?;
            let mut states: BTreeMap<&'static str, u64> = BTreeMap::new();
            let mut waves = BTreeMap::new();
            crate::kvscan::for_each_latest(&kv, "campaign.*", |e| {
                if let Ok(s) = serde_json::from_slice::<CampaignStatus>(&e.value) {
                    *states.entry(s.state.as_str()).or_default() += 1;
                    if !s.state.is_terminal() {
                        waves.insert(s.campaign_id, s.current_wave);
                    }
                }
            })
            .await
            .ok()?;
            Some((states, waves))
        };
        if let Ok(Some((states, waves))) = tokio::time::timeout(LOOKUP_TIMEOUT, campaigns).await {
            next.states = states;
            next.waves = waves;
        } else {
            next.states = std::mem::take(&mut snap.states);
            next.waves = std::mem::take(&mut snap.waves);
        }
        // Each region's queue from its own task stream; a region that does
        // not answer (cut off) keeps its last figures.
        let regions =
            tokio::time::timeout(LOOKUP_TIMEOUT, topology::task_stream_regions(&js)).await;
        if let Ok(Ok(regions)) = regions {
            for region in regions {
                let info = async {
                    let mut c: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> =
                        js.get_consumer_from_stream(
                            topology::worker_consumer(&region),
                            topology::tasks_stream(&region),
                        )
                        .await
                        .ok()?;
                    c.info().await.ok().cloned()
                };
                match tokio::time::timeout(LOOKUP_TIMEOUT, info).await {
                    Ok(Some(info)) => {
                        next.consumers
                            .insert(region, (info.num_pending, info.num_ack_pending as u64));
                    }
                    _ => {
                        if let Some(old) = snap.consumers.get(&region) {
                            next.consumers.insert(region, *old);
                        }
                    }
                }
            }
        } else {
            next.consumers = std::mem::take(&mut snap.consumers);
        }
        *snap = next;
    }

    /// The Prometheus text of every metric (refreshing JetStream figures first).
    pub async fn render(&self) -> String {
        self.refresh().await;
        let mut out = String::with_capacity(4096);
        let name = "keywave_coordinator_results_total";
        prom::family(
            &mut out,
            name,
            "counter",
            "Task results counted into their campaign, by region, action, outcome and error class.",
        );
        for ((region, action, outcome, class), n) in self
            .results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            prom::sample(
                &mut out,
                name,
                &[
                    ("region", region),
                    ("action", action),
                    ("outcome", outcome),
                    ("error_class", class),
                ],
                *n as f64,
            );
        }
        let snap = self.snapshot.lock().await;
        let name = "keywave_coordinator_campaigns";
        prom::family(&mut out, name, "gauge", "Campaigns by state.");
        for s in ALL_STATES {
            let n = snap.states.get(s.as_str()).copied().unwrap_or(0);
            prom::sample(&mut out, name, &[("state", s.as_str())], n as f64);
        }
        let name = "keywave_coordinator_campaign_wave";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Current wave (0-based) of each unfinished campaign.",
        );
        for (cid, w) in &snap.waves {
            prom::sample(&mut out, name, &[("campaign", cid)], *w as f64);
        }
        let name = "keywave_coordinator_consumer_pending";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Tasks waiting on each region's workers-<region> consumer (num_pending).",
        );
        for (region, (pending, _)) in &snap.consumers {
            prom::sample(&mut out, name, &[("region", region)], *pending as f64);
        }
        let name = "keywave_coordinator_consumer_ack_pending";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Tasks delivered to each region's workers and not acked yet.",
        );
        for (region, (_, acks)) in &snap.consumers {
            prom::sample(&mut out, name, &[("region", region)], *acks as f64);
        }
        drop(snap);
        let regions = self
            .regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let name = "keywave_coordinator_region_workers";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Live workers per region (a heartbeat heard within three intervals).",
        );
        for (region, f) in &regions {
            prom::sample(&mut out, name, &[("region", region)], f64::from(f.workers));
        }
        let name = "keywave_coordinator_region_silent_seconds";
        prom::family(
            &mut out,
            name,
            "gauge",
            "How long each region has had no live worker (0 while it has one).",
        );
        for (region, f) in &regions {
            let s = f.silent_ms.unwrap_or(0) as f64 / 1000.0;
            prom::sample(&mut out, name, &[("region", region)], s);
        }
        let name = "keywave_coordinator_region_tasks_queued";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Tasks in each region's queue that no worker has pulled yet.",
        );
        for (region, f) in &regions {
            if let Some(q) = f.queued {
                prom::sample(&mut out, name, &[("region", region)], q as f64);
            }
        }
        let name = "keywave_coordinator_region_tasks_in_flight";
        prom::family(
            &mut out,
            name,
            "gauge",
            "Tasks pulled by a worker of each region and not answered yet.",
        );
        for (region, f) in &regions {
            if let Some(n) = f.in_flight {
                prom::sample(&mut out, name, &[("region", region)], n as f64);
            }
        }
        prom::family(
            &mut out,
            "keywave_coordinator_active",
            "gauge",
            "1 when this coordinator holds the lease and drives campaigns.",
        );
        prom::sample(
            &mut out,
            "keywave_coordinator_active",
            &[],
            if self.role() == Role::Active {
                1.0
            } else {
                0.0
            },
        );
        prom::family(
            &mut out,
            "keywave_coordinator_ready",
            "gauge",
            "1 when connected to NATS with the lease state known.",
        );
        prom::sample(
            &mut out,
            "keywave_coordinator_ready",
            &[],
            if self.ready() { 1.0 } else { 0.0 },
        );
        out
    }
}

impl keywave_common::exposition::Exposition for CoordinatorMetrics {
    fn render(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send + '_>> {
        Box::pin(async move { self.render().await })
    }
    fn ready(&self) -> bool {
        CoordinatorMetrics::ready(self)
    }
}

/// Binds `addr` and serves `/metrics`, `/healthz` and `/readyz` until
/// `shutdown`; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<CoordinatorMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    keywave_common::exposition::serve(addr, metrics, shutdown.cancelled_owned()).await
}
