//! The worker's presence heartbeat: while a worker runs it publishes a
//! [`Presence`] on `keywave.worker.<region>` (core NATS) every
//! [`DEFAULT_INTERVAL`], so the coordinator knows the region has a live
//! worker; a worker that stops cleanly says so once (`leaving`). A killed
//! worker just falls silent, and counts as gone three intervals later.

use crate::metrics::WorkerMetrics;
use keywave_common::{
    now_ms,
    presence::{Presence, DEFAULT_INTERVAL, VERSION},
    subjects,
};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::debug;

/// Announces a running worker. Dropping it stops the heartbeats without a
/// goodbye (as a killed process would); [`Announcer::leave`] says goodbye.
pub struct Announcer {
    client: async_nats::Client,
    beat: Presence,
    _stop: DropGuard,
}

impl Announcer {
    /// Starts announcing worker `worker_id` of `region` every `interval`.
    pub fn start(
        client: async_nats::Client,
        region: &str,
        worker_id: &str,
        concurrency: usize,
        metrics: Arc<WorkerMetrics>,
        interval: Duration,
    ) -> Announcer {
        let beat = Presence {
            v: VERSION,
            region: region.to_string(),
            worker_id: worker_id.to_string(),
            interval_ms: interval.as_millis() as u64,
            in_flight: 0,
            concurrency: concurrency as u64,
            leaving: false,
            at_ms: 0,
        };
        let stop = CancellationToken::new();
        tokio::spawn(beat_loop(
            client.clone(),
            beat.clone(),
            metrics,
            interval,
            stop.clone(),
        ));
        Announcer {
            client,
            beat,
            _stop: stop.drop_guard(),
        }
    }

    /// With the default interval.
    pub fn with_default_interval(
        client: async_nats::Client,
        region: &str,
        worker_id: &str,
        concurrency: usize,
        metrics: Arc<WorkerMetrics>,
    ) -> Announcer {
        Self::start(
            client,
            region,
            worker_id,
            concurrency,
            metrics,
            DEFAULT_INTERVAL,
        )
    }

    /// Stops the heartbeats and announces that this worker leaves (best
    /// effort: if it does not arrive, the coordinator notices the silence).
    pub async fn leave(self) {
        let Announcer {
            client,
            mut beat,
            _stop,
        } = self;
        drop(_stop);
        beat.leaving = true;
        beat.at_ms = now_ms();
        let subject = subjects::worker_presence(&beat.region);
        if client.publish(subject, beat.encode().into()).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        }
    }
}

async fn beat_loop(
    client: async_nats::Client,
    mut beat: Presence,
    metrics: Arc<WorkerMetrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let subject = subjects::worker_presence(&beat.region);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        beat.at_ms = now_ms();
        beat.in_flight = metrics.tasks_in_flight();
        // Core NATS: a heartbeat lost while disconnected is simply missed.
        if let Err(e) = client.publish(subject.clone(), beat.encode().into()).await {
            debug!(error = %e, "Could not publish the presence heartbeat");
        }
    }
}
