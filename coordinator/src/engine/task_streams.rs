//! Each region's task stream, as the coordinator sees it: created before
//! the first task is published to a region (a region named by a campaign
//! but by no `--regions` flag and no worker yet still queues its tasks),
//! listed to withdraw a wave's tasks and for the metrics, and read by name
//! for a poison task.

use async_nats::jetstream::{self, consumer::pull, Context};
use keywave_common::topology::{self, TopologyError};
use std::collections::HashSet;
use std::sync::Mutex;

/// The task streams known to exist (see the module documentation).
pub(crate) struct TaskStreams {
    js: Context,
    cfg: topology::Config,
    ensured: Mutex<HashSet<String>>,
}

impl TaskStreams {
    pub fn new(js: Context, cfg: topology::Config) -> TaskStreams {
        TaskStreams {
            js,
            cfg,
            ensured: Mutex::new(HashSet::new()),
        }
    }

    /// Makes sure `region`'s task stream and consumer exist, creating them
    /// when missing; remembered, so asked once per region and term.
    pub async fn ensure(&self, region: &str) -> Result<(), TopologyError> {
        if self.ensured.lock().expect("task streams").contains(region) {
            return Ok(());
        }
        // An existing consumer is used as it is (whoever created it chose
        // its settings; `--regions` updates them at start-up).
        let existing = self
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(
                topology::worker_consumer(region),
                topology::tasks_stream(region),
            )
            .await;
        if existing.is_err() {
            topology::ensure_region_tasks(&self.js, region, &self.cfg).await?;
        }
        self.ensured
            .lock()
            .expect("task streams")
            .insert(region.to_string());
        Ok(())
    }

    /// The task stream of `region`.
    pub async fn get(
        &self,
        region: &str,
    ) -> Result<jetstream::stream::Stream, jetstream::context::GetStreamError> {
        self.js.get_stream(topology::tasks_stream(region)).await
    }

    /// The regions that have a task stream.
    pub async fn regions(&self) -> Result<Vec<String>, TopologyError> {
        topology::task_stream_regions(&self.js).await
    }
}
