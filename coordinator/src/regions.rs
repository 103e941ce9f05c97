//! Which regions have live workers. Workers announce themselves on
//! `keywave.worker.<region>` (see [`keywave_common::presence`]); this
//! module follows the heartbeats, reads each region's task consumer
//! (`workers-<region>`: tasks queued, in flight, pull requests waiting) and
//! publishes a [`RegionView`] every [`VIEW_EVERY`] that the campaign owners
//! decide on (a region silent for [`Config::pause_after`] pauses the
//! campaigns that need it) and that `/metrics` shows.
//!
//! [`Liveness`] is the pure bookkeeping, a function of the heartbeats heard
//! and the time; [`Tracker`] is its I/O shell.

use crate::metrics::{CoordinatorMetrics, RegionFigures};
use async_nats::jetstream;
use futures::StreamExt;
use keywave_common::{now_ms, presence::Presence, subjects, topology};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

/// How long a region may have no live worker before the campaigns that
/// need it pause (default of [`Config::pause_after`]).
pub const DEFAULT_PAUSE_AFTER: Duration = Duration::from_secs(10);
/// How often the view is published.
pub const VIEW_EVERY: Duration = Duration::from_secs(1);
/// How often each region's consumer is read.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// Longest wait for one consumer read.
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// A worker not heard from for this long is forgotten (its region keeps
/// the time it was last heard from).
const FORGET_AFTER_MS: u64 = 3_600_000;
/// Most workers remembered per region and regions remembered (bounds the
/// memory a flood of forged heartbeats can take).
const MAX_WORKERS_PER_REGION: usize = 10_000;
const MAX_REGIONS: usize = 1_000;

/// Settings of region liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How long a region may have no live worker before the campaigns that
    /// need it pause, naming it. Default 10s.
    pub pause_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pause_after: DEFAULT_PAUSE_AFTER,
        }
    }
}

/// One region as the coordinator sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionLive {
    /// Workers whose heartbeat is recent.
    pub workers: u32,
    /// Since when the region has no live worker (the last time one was
    /// heard from, or when this coordinator started listening); `None`
    /// while it has one.
    pub silent_since_ms: Option<u64>,
    /// Tasks on `workers-<region>` not pulled yet (`num_pending`).
    pub queued: Option<u64>,
    /// Tasks pulled and not acked yet (`num_ack_pending`).
    pub in_flight: Option<u64>,
}

/// Every region's liveness at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionView {
    pub at_ms: u64,
    /// When this coordinator started listening: a region never heard from
    /// is silent since then.
    pub listening_since_ms: u64,
    pub regions: BTreeMap<String, RegionLive>,
}

impl RegionView {
    /// Since when `region` has had no live worker (`None`: it has one).
    pub fn silent_since(&self, region: &str) -> Option<u64> {
        match self.regions.get(region) {
            Some(r) => r.silent_since_ms,
            None => Some(self.listening_since_ms),
        }
    }

    /// The region, or a silent one when never heard from.
    pub fn region(&self, region: &str) -> RegionLive {
        self.regions.get(region).cloned().unwrap_or(RegionLive {
            silent_since_ms: Some(self.listening_since_ms),
            ..Default::default()
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Live until then (last heartbeat + its interval × `MISSED_BEATS`;
    /// the heartbeat's time for a leaving worker).
    until_ms: u64,
    last_ms: u64,
}

#[derive(Debug, Default)]
struct RegionBook {
    workers: BTreeMap<String, Seen>,
    /// Last heartbeat of any of its workers.
    last_heard_ms: Option<u64>,
    /// A worker pulled from the consumer (`num_waiting > 0`) when last
    /// read, and when that was last the case: how workers from before
    /// heartbeats count as live, for a region none ever announced itself in.
    pulling: bool,
    last_pulling_ms: Option<u64>,
    queue: Option<(u64, u64)>,
}

/// Heartbeats and consumer readings in, liveness out; no I/O, no clock.
#[derive(Debug)]
pub struct Liveness {
    started_ms: u64,
    regions: BTreeMap<String, RegionBook>,
}

impl Liveness {
    pub fn new(now_ms: u64) -> Liveness {
        Liveness {
            started_ms: now_ms,
            regions: BTreeMap::new(),
        }
    }

    /// A heartbeat arrived at `now_ms` (the receiver's clock: workers'
    /// clocks may be skewed).
    pub fn heard(&mut self, p: &Presence, now_ms: u64) {
        if !self.regions.contains_key(&p.region) && self.regions.len() >= MAX_REGIONS {
            return;
        }
        let r = self.regions.entry(p.region.clone()).or_default();
        if !r.workers.contains_key(&p.worker_id) && r.workers.len() >= MAX_WORKERS_PER_REGION {
            return;
        }
        let until_ms = if p.leaving {
            now_ms
        } else {
            now_ms + p.ttl().as_millis() as u64
        };
        r.workers.insert(
            p.worker_id.clone(),
            Seen {
                until_ms,
                last_ms: now_ms,
            },
        );
        r.last_heard_ms = Some(r.last_heard_ms.map_or(now_ms, |t| t.max(now_ms)));
    }

    /// The region's consumer was read: tasks queued and in flight, pull
    /// requests waiting.
    pub fn consumer(&mut self, region: &str, queued: u64, in_flight: u64, waiting: u64, now: u64) {
        if !self.regions.contains_key(region) && self.regions.len() >= MAX_REGIONS {
            return;
        }
        let r = self.regions.entry(region.to_string()).or_default();
        r.queue = Some((queued, in_flight));
        r.pulling = waiting > 0;
        if r.pulling {
            r.last_pulling_ms = Some(now);
        }
    }

    /// The region's consumer could not be read (missing, or NATS busy).
    pub fn consumer_unknown(&mut self, region: &str) {
        if let Some(r) = self.regions.get_mut(region) {
            r.queue = None;
            r.pulling = false;
        }
    }

    /// Workers of `region` live at `now_ms`.
    pub fn live_workers(&self, region: &str, now_ms: u64) -> u32 {
        self.regions.get(region).map_or(0, |r| {
            r.workers.values().filter(|s| s.until_ms > now_ms).count() as u32
        })
    }

    /// Since when `region` has had no live worker at `now_ms`; `None` while
    /// it has one. A region none of whose workers ever announced itself
    /// counts as live while a worker pulls from its consumer (workers from
    /// before heartbeats).
    pub fn silent_since(&self, region: &str, now_ms: u64) -> Option<u64> {
        let Some(r) = self.regions.get(region) else {
            return Some(self.started_ms);
        };
        if self.live_workers(region, now_ms) > 0 {
            return None;
        }
        if r.last_heard_ms.is_none() {
            if r.pulling {
                return None;
            }
            return Some(r.last_pulling_ms.unwrap_or(self.started_ms));
        }
        let last = r
            .workers
            .values()
            .map(|s| s.last_ms)
            .chain(r.last_heard_ms)
            .max()
            .unwrap_or(self.started_ms);
        Some(last.max(self.started_ms))
    }

    /// Forgets workers not heard from for an hour.
    pub fn prune(&mut self, now_ms: u64) {
        for r in self.regions.values_mut() {
            r.workers
                .retain(|_, s| now_ms.saturating_sub(s.last_ms) < FORGET_AFTER_MS);
        }
    }

    /// Regions heard from or read so far.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.regions.keys().map(String::as_str)
    }

    /// The view at `now_ms` of the regions known, plus `wanted` ones.
    pub fn view<'a>(
        &'a self,
        now_ms: u64,
        wanted: impl IntoIterator<Item = &'a str>,
    ) -> RegionView {
        let mut regions: BTreeMap<String, RegionLive> = BTreeMap::new();
        let mut names: BTreeSet<&str> = self.regions().collect();
        names.extend(wanted);
        for name in names {
            let queue = self.regions.get(name).and_then(|r| r.queue);
            regions.insert(
                name.to_string(),
                RegionLive {
                    workers: self.live_workers(name, now_ms),
                    silent_since_ms: self.silent_since(name, now_ms),
                    queued: queue.map(|q| q.0),
                    in_flight: queue.map(|q| q.1),
                },
            );
        }
        RegionView {
            at_ms: now_ms,
            listening_since_ms: self.started_ms,
            regions,
        }
    }
}

/// The regions the tracker reads consumers of, besides those it heard from.
#[derive(Debug, Default)]
struct Wanted(Mutex<BTreeSet<String>>);

/// Follows heartbeats and consumers; see the module documentation. Stops
/// when dropped.
#[derive(Debug, Clone)]
pub struct Tracker {
    view: watch::Receiver<Arc<RegionView>>,
    wanted: Arc<Wanted>,
    config: Config,
    _stop: Arc<DropGuard>,
}

impl Tracker {
    /// Subscribes to every region's heartbeats and starts following them
    /// (and the consumers of `regions` and of every region heard from).
    pub fn start(
        client: async_nats::Client,
        config: Config,
        regions: &[String],
        metrics: Arc<CoordinatorMetrics>,
    ) -> Tracker {
        let stop = CancellationToken::new();
        let now = now_ms();
        let liveness = Liveness::new(now);
        let wanted = Arc::new(Wanted(Mutex::new(regions.iter().cloned().collect())));
        let (tx, view) = watch::channel(Arc::new(
            liveness.view(now, regions.iter().map(String::as_str)),
        ));
        tokio::spawn(follow(
            client,
            liveness,
            wanted.clone(),
            tx,
            metrics,
            stop.clone(),
        ));
        Tracker {
            view,
            wanted,
            config,
            _stop: Arc::new(stop.drop_guard()),
        }
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// The latest view.
    pub fn view(&self) -> Arc<RegionView> {
        self.view.borrow().clone()
    }

    /// Every view from now on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RegionView>> {
        self.view.clone()
    }

    /// Adds regions to read the consumers of (a campaign's regions).
    pub fn want<'a>(&self, regions: impl IntoIterator<Item = &'a str>) {
        let mut w = self.wanted.0.lock().unwrap_or_else(|e| e.into_inner());
        for r in regions {
            if w.len() >= MAX_REGIONS {
                break;
            }
            if !w.contains(r) {
                w.insert(r.to_string());
            }
        }
    }
}

async fn follow(
    client: async_nats::Client,
    mut liveness: Liveness,
    wanted: Arc<Wanted>,
    tx: watch::Sender<Arc<RegionView>>,
    metrics: Arc<CoordinatorMetrics>,
    stop: CancellationToken,
) {
    let js = topology::context(client.clone());
    let mut tick = tokio::time::interval(VIEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polled_at: Option<tokio::time::Instant> = None;
    let mut sub: Option<async_nats::Subscriber> = None;
    let mut live: BTreeSet<String> = BTreeSet::new();
    loop {
        if sub.is_none() {
            match client.subscribe(subjects::WORKER_PRESENCE_ALL).await {
                Ok(s) => sub = Some(s),
                Err(e) => warn!(error = %e, "Cannot follow worker heartbeats; retrying"),
            }
        }
        let heartbeat = async {
            match sub.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            m = heartbeat => match m {
                Some(m) => match Presence::decode(m.subject.as_str(), &m.payload) {
                    Ok(p) => liveness.heard(&p, now_ms()),
                    Err(e) => debug!(subject = %m.subject, error = %e, "Ignoring a malformed worker heartbeat"),
                },
                None => sub = None,
            },
            _ = tick.tick() => {
                let now = now_ms();
                let names: Vec<String> = {
                    let w = wanted.0.lock().unwrap_or_else(|e| e.into_inner());
                    liveness.regions().map(str::to_string).chain(w.iter().cloned()).collect::<BTreeSet<_>>().into_iter().collect()
                };
                if polled_at.is_none_or(|t| t.elapsed() >= POLL_EVERY) {
                    polled_at = Some(tokio::time::Instant::now());
                    for region in &names {
                        let read = tokio::time::timeout(POLL_TIMEOUT, read_consumer(&js, region));
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            r = read => match r {
                                Ok(Ok(info)) => liveness.consumer(region, info.num_pending, info.num_ack_pending as u64, info.num_waiting as u64, now_ms()),
                                _ => liveness.consumer_unknown(region),
                            },
                        }
                    }
                }
                liveness.prune(now);
                let view = liveness.view(now, names.iter().map(String::as_str));
                for (name, r) in &view.regions {
                    let was = live.contains(name);
                    let is = r.silent_since_ms.is_none();
                    if was && !is {
                        warn!(region = %name, "Region has no live worker any more");
                        live.remove(name);
                    } else if !was && is {
                        info!(region = %name, workers = r.workers, "Region has live workers");
                        live.insert(name.clone());
                    }
                }
                metrics.set_regions(
                    view.regions
                        .iter()
                        .map(|(n, r)| {
                            (n.clone(), RegionFigures {
                                workers: r.workers,
                                silent_ms: r.silent_since_ms.map(|s| now.saturating_sub(s)),
                                queued: r.queued,
                                in_flight: r.in_flight,
                            })
                        })
                        .collect(),
                );
                tx.send_replace(Arc::new(view));
            }
        }
    }
}

async fn read_consumer(
    js: &jetstream::Context,
    region: &str,
) -> Result<jetstream::consumer::Info, async_nats::Error> {
    let mut c: jetstream::consumer::Consumer<jetstream::consumer::pull::Config> = js
        .get_consumer_from_stream(
            topology::worker_consumer(region),
            topology::tasks_stream(region),
        )
        .await?;
    Ok(c.info().await?.clone())
}

/// Seconds, rounded down, for reasons people read.
pub fn secs(ms: u64) -> u64 {
    ms / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::presence::VERSION;

    fn beat(region: &str, worker: &str) -> Presence {
        Presence {
            v: VERSION,
            region: region.into(),
            worker_id: worker.into(),
            interval_ms: 2_000,
            in_flight: 0,
            concurrency: 8,
            leaving: false,
            at_ms: 0,
        }
    }

    #[test]
    fn a_region_never_heard_from_is_silent_since_listening_started() {
        let l = Liveness::new(1_000);
        assert_eq!(l.silent_since("ap", 50_000), Some(1_000));
        let v = l.view(50_000, ["ap"]);
        assert_eq!(v.silent_since("ap"), Some(1_000));
        assert_eq!(v.silent_since("never-asked"), Some(1_000));
        assert_eq!(v.region("ap").workers, 0);
    }

    #[test]
    fn a_worker_is_live_for_three_intervals_after_its_heartbeat() {
        let mut l = Liveness::new(0);
        l.heard(&beat("eu", "w1"), 10_000);
        assert_eq!(l.live_workers("eu", 10_000), 1);
        assert_eq!(l.silent_since("eu", 15_999), None);
        // 3 × 2 s after the last heartbeat: gone, silent since that heartbeat.
        assert_eq!(l.live_workers("eu", 16_000), 0);
        assert_eq!(l.silent_since("eu", 16_000), Some(10_000));
        assert_eq!(l.silent_since("eu", 30_000), Some(10_000));
        // A second worker keeps the region live.
        l.heard(&beat("eu", "w2"), 29_000);
        l.heard(&beat("eu", "w1"), 30_000);
        assert_eq!(l.live_workers("eu", 30_000), 2);
        assert_eq!(l.silent_since("eu", 35_000), None);
        assert_eq!(l.live_workers("eu", 35_000), 1);
        assert_eq!(l.silent_since("eu", 36_000), Some(30_000));
    }

    #[test]
    fn a_leaving_worker_is_gone_at_once() {
        let mut l = Liveness::new(0);
        l.heard(&beat("eu", "w1"), 1_000);
        let mut bye = beat("eu", "w1");
        bye.leaving = true;
        l.heard(&bye, 2_000);
        assert_eq!(l.live_workers("eu", 2_000), 0);
        assert_eq!(l.silent_since("eu", 2_001), Some(2_000));
    }

    #[test]
    fn workers_without_heartbeats_count_while_they_pull() {
        let mut l = Liveness::new(0);
        l.consumer("eu", 5, 2, 1, 4_000);
        assert_eq!(l.silent_since("eu", 4_000), None);
        let v = l.view(4_000, []);
        assert_eq!(v.regions["eu"].queued, Some(5));
        assert_eq!(v.regions["eu"].in_flight, Some(2));
        l.consumer("eu", 5, 0, 0, 8_000);
        assert_eq!(l.silent_since("eu", 8_000), Some(4_000));
        l.consumer_unknown("eu");
        assert_eq!(l.silent_since("eu", 9_000), Some(4_000));
        // Once heartbeats are heard, only they count.
        l.consumer("eu", 0, 0, 3, 10_000);
        l.heard(&beat("eu", "w1"), 10_000);
        assert_eq!(l.silent_since("eu", 17_000), Some(10_000));
    }

    #[test]
    fn silence_never_starts_before_listening() {
        let mut l = Liveness::new(100_000);
        // A heartbeat with the worker's clock far behind changes nothing:
        // the receiver's clock counts.
        l.heard(&beat("eu", "w1"), 100_500);
        assert_eq!(l.silent_since("eu", 200_000), Some(100_500));
    }

    #[test]
    fn forgotten_workers_leave_the_region_silent_since_their_last_heartbeat() {
        let mut l = Liveness::new(0);
        l.heard(&beat("eu", "w1"), 1_000);
        l.prune(1_000 + FORGET_AFTER_MS);
        assert_eq!(l.live_workers("eu", 1_000 + FORGET_AFTER_MS), 0);
        assert_eq!(l.silent_since("eu", 1_000 + FORGET_AFTER_MS), Some(1_000));
    }
}
