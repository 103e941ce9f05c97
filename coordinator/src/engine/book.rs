//! The campaign's books: the [`CampaignStatus`] counters plus, per wave, two
//! bitsets indexed by the task's `index` (has a result, rotated). Results in,
//! counters and "is this wave complete" out; no I/O, so replays, duplicates and
//! late results are unit-tested here. Memory is two bits per credential, plus
//! one more for the wave being rolled back.

use keywave_common::{
    api::CampaignStatus,
    wire::{ErrorClass, Outcome, RotationResult, TaskAction},
};

/// A fixed-size set of small integers, one bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitSet {
    words: Vec<u64>,
    len: u64,
    ones: u64,
}

impl BitSet {
    pub fn new(len: u64) -> Self {
        BitSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            ones: 0,
        }
    }

    /// How many positions the set covers.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many positions are set.
    pub fn count(&self) -> u64 {
        self.ones
    }

    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Sets `i`; returns `false` when it was already set or out of range.
    pub fn insert(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        if self.words[w] & b != 0 {
            return false;
        }
        self.words[w] |= b;
        self.ones += 1;
        true
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.ones = 0;
    }

    /// The set positions, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + bit)
            })
        })
    }
}

/// One wave's bits.
#[derive(Debug, Clone)]
pub struct WaveTally {
    /// Indexes with a result.
    pub seen: BitSet,
    /// Indexes whose new secret became CURRENT: the rotation succeeded, or
    /// failed after its promote (e.g. a consumer did not verify the new
    /// secret, so the old one was kept). These get rollback tasks.
    pub rotated: BitSet,
    /// When the wave was finalized: its counters are frozen from then on.
    pub finished_at_ms: Option<u64>,
    /// First results per region (of the regions the wave plans tasks in).
    pub regions_done: std::collections::BTreeMap<String, u64>,
}

/// The bits of the wave being rolled back.
#[derive(Debug, Clone)]
pub struct RollbackTally {
    pub wave: u32,
    pub seen: BitSet,
}

/// What one result did to the books.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Counted in the wave's counters.
    Counted,
    /// The wave is finalized: the bits were updated (needed for rollback
    /// after a restart) but the frozen counters were not.
    BitsOnly,
    /// A second result for the same task (redelivery): ignored.
    Duplicate,
    /// Published after the wave was finalized: ignored.
    Late,
    /// Names a wave or index the campaign does not have, or a rollback of a
    /// credential that was not rotated: ignored.
    Unknown,
}

/// Counters and bits of one campaign.
#[derive(Debug, Clone)]
pub struct Book {
    pub status: CampaignStatus,
    tallies: Vec<WaveTally>,
    rollback: Option<RollbackTally>,
}

/// The failure class a result is counted under.
pub fn class_of(r: &RotationResult) -> &'static str {
    r.error_class.unwrap_or(ErrorClass::Internal).as_str()
}

impl Book {
    /// Books for a campaign loaded from its snapshot (or just created).
    /// Finalized waves keep their counters; the counters of the others are
    /// zeroed, because replaying the results stream rebuilds them exactly.
    pub fn new(mut status: CampaignStatus) -> Book {
        // Region tallies count every first result of a task (finalized
        // waves included): the replay rebuilds all of them from zero.
        for r in status.regions.values_mut() {
            r.succeeded = 0;
            r.failed = 0;
        }
        let tallies = status
            .waves
            .iter_mut()
            .map(|w| {
                if w.finished_at_ms.is_none() {
                    w.succeeded = 0;
                    w.failed = 0;
                    w.no_result = 0;
                    w.failures.clear();
                }
                w.rolled_back = 0;
                w.rollback_refused = 0;
                w.rollback_failed = 0;
                WaveTally {
                    seen: BitSet::new(w.size),
                    rotated: BitSet::new(w.size),
                    finished_at_ms: w.finished_at_ms,
                    regions_done: Default::default(),
                }
            })
            .collect();
        Book {
            status,
            tallies,
            rollback: None,
        }
    }

    pub fn tally(&self, wave: u32) -> Option<&WaveTally> {
        self.tallies.get(wave as usize)
    }

    /// Applies one result. `published_ms` is when the results stream stored
    /// it: a rotation result stored after its wave was finalized is late.
    pub fn apply(&mut self, r: &RotationResult, published_ms: u64) -> Applied {
        let w = r.wave as usize;
        let idx = u64::from(r.index);
        let (Some(tally), Some(ws)) = (self.tallies.get_mut(w), self.status.waves.get_mut(w))
        else {
            return Applied::Unknown;
        };
        if idx >= ws.size {
            return Applied::Unknown;
        }
        match r.action {
            TaskAction::Rotate => {
                if tally.finished_at_ms.is_some_and(|f| published_ms > f) {
                    return Applied::Late;
                }
                if !tally.seen.insert(idx) {
                    return Applied::Duplicate;
                }
                if ws.regions.contains_key(r.region.as_str()) {
                    match tally.regions_done.get_mut(r.region.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            tally.regions_done.insert(r.region.clone(), 1);
                        }
                    }
                }
                let ok = r.outcome == Outcome::Succeeded;
                if ok || r.new_fingerprint.is_some() {
                    tally.rotated.insert(idx);
                }
                if let Some(region) = self.status.regions.get_mut(r.region.as_str()) {
                    if ok {
                        region.succeeded += 1;
                    } else {
                        region.failed += 1;
                    }
                }
                if tally.finished_at_ms.is_some() {
                    return Applied::BitsOnly;
                }
                if ok {
                    ws.succeeded += 1;
                } else {
                    ws.failed += 1;
                    *ws.failures.entry(class_of(r).to_string()).or_default() += 1;
                }
                Applied::Counted
            }
            TaskAction::Rollback => {
                // Only credentials that were rotated get rollback tasks.
                if !tally.rotated.contains(idx) {
                    return Applied::Unknown;
                }
                let rb = self.rollback.get_or_insert_with(|| RollbackTally {
                    wave: r.wave,
                    seen: BitSet::new(ws.size),
                });
                if rb.wave != r.wave {
                    return Applied::Unknown;
                }
                if !rb.seen.insert(idx) {
                    return Applied::Duplicate;
                }
                match r.outcome {
                    Outcome::RolledBack => ws.rolled_back += 1,
                    Outcome::RollbackRefused => ws.rollback_refused += 1,
                    _ if r.error_class == Some(ErrorClass::RollbackRefused) => {
                        ws.rollback_refused += 1
                    }
                    _ => ws.rollback_failed += 1,
                }
                Applied::Counted
            }
        }
    }

    /// Tasks of wave `wave` planned in each region still without a result
    /// (regions with none left are left out). Empty when the snapshot does
    /// not plan the wave's regions (campaigns from before they were planned).
    pub fn wave_regions_left(&self, wave: u32) -> Vec<(&str, u64)> {
        let (Some(ws), Some(t)) = (
            self.status.waves.get(wave as usize),
            self.tallies.get(wave as usize),
        ) else {
            return Vec::new();
        };
        ws.regions
            .iter()
            .map(|(r, &planned)| {
                let done = t.regions_done.get(r).copied().unwrap_or(0);
                (r.as_str(), planned.saturating_sub(done))
            })
            .filter(|(_, left)| *left > 0)
            .collect()
    }

    /// Every task of the wave has a result.
    pub fn wave_complete(&self, wave: u32) -> bool {
        self.tallies
            .get(wave as usize)
            .is_some_and(|t| t.seen.count() == t.seen.len())
    }

    /// Closes a wave: indexes without a result count as `no_result` failures
    /// and the counters freeze. Idempotent: a second call changes nothing.
    pub fn finalize_wave(&mut self, wave: u32, now_ms: u64) {
        let w = wave as usize;
        let (Some(tally), Some(ws)) = (self.tallies.get_mut(w), self.status.waves.get_mut(w))
        else {
            return;
        };
        if tally.finished_at_ms.is_some() {
            return;
        }
        tally.finished_at_ms = Some(now_ms);
        ws.finished_at_ms = Some(now_ms);
        ws.no_result = ws.size - tally.seen.count();
        // Failed results of that class (poison tasks dead-lettered by the
        // coordinator) plus the indexes that never got a result.
        let key = ErrorClass::NoResult.as_str().to_string();
        let total = ws.failures.get(&key).copied().unwrap_or(0) + ws.no_result;
        if total > 0 {
            ws.failures.insert(key, total);
        } else {
            ws.failures.remove(&key);
        }
    }

    /// Starts (or restarts) the rollback of `wave`; returns how many rollback
    /// tasks it takes (one per credential whose new secret became CURRENT).
    pub fn begin_rollback(&mut self, wave: u32) -> u64 {
        let w = wave as usize;
        let Some(tally) = self.tallies.get(w) else {
            return 0;
        };
        let tasks = tally.rotated.count();
        if !matches!(&self.rollback, Some(rb) if rb.wave == wave) {
            self.rollback = Some(RollbackTally {
                wave,
                seen: BitSet::new(tally.seen.len()),
            });
        }
        self.status.waves[w].rollback_tasks = tasks;
        tasks
    }

    /// Rollback results received so far for `wave`.
    pub fn rollback_seen(&self, wave: u32) -> u64 {
        self.rollback
            .as_ref()
            .filter(|rb| rb.wave == wave)
            .map_or(0, |rb| rb.seen.count())
    }

    /// Every rollback task of `wave` has a result.
    pub fn rollback_complete(&self, wave: u32) -> bool {
        let tasks = self
            .status
            .waves
            .get(wave as usize)
            .map_or(0, |w| w.rollback_tasks);
        self.rollback_seen(wave) >= tasks
    }

    /// Whether a freshly applied result completed its wave or its rollback
    /// (the driver is woken only then).
    pub fn completes(&self, r: &RotationResult) -> bool {
        match r.action {
            TaskAction::Rotate => self.wave_complete(r.wave),
            TaskAction::Rollback => self.rollback_complete(r.wave),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::{
        api::WaveStatus,
        wire::{CampaignSpec, CampaignState, OnFailure, Step, Strategy, WaveSize, SCHEMA_VERSION},
    };

    #[test]
    fn bitset_basics() {
        let mut b = BitSet::new(130);
        assert!(b.insert(0));
        assert!(b.insert(129));
        assert!(!b.insert(129), "second insert is not new");
        assert!(!b.insert(130), "out of range");
        assert!(b.contains(129) && !b.contains(64) && !b.contains(1000));
        assert_eq!(b.count(), 2);
        b.insert(64);
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 64, 129]);
        b.clear();
        assert_eq!(b.count(), 0);
        assert_eq!(BitSet::new(0).iter().count(), 0);
    }

    fn status(sizes: &[u64]) -> CampaignStatus {
        CampaignStatus {
            campaign_id: "c-1".into(),
            spec: CampaignSpec {
                v: SCHEMA_VERSION,
                name: "t".into(),
                reason: None,
                selector: Default::default(),
                strategy: Strategy::Continuity,
                waves: vec![WaveSize::Count(1)],
                failure_budget: 0.1,
                bake_ms: 0,
                on_failure: OnFailure::Rollback,
                task_timeout_ms: 1000,
                approve_before_waves: Vec::new(),
                preflight: None,
                preflight_max_unreachable: 0.0,
                requested_by: None,
            },
            state: CampaignState::Running,
            total: sizes.iter().sum(),
            current_wave: 0,
            waves: sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| WaveStatus {
                    wave: i as u32,
                    size,
                    ..Default::default()
                })
                .collect(),
            created_at_ms: 0,
            finished_at_ms: None,
            reason: None,
            regions: [("eu".to_string(), Default::default())].into(),
            paused_regions: Vec::new(),
        }
    }

    fn result(wave: u32, index: u32, action: TaskAction, outcome: Outcome) -> RotationResult {
        RotationResult {
            v: SCHEMA_VERSION,
            task_id: format!("c-1:w{wave}:{index}"),
            campaign_id: "c-1".into(),
            wave,
            index,
            action,
            credential_id: format!("cred-{index}"),
            region: "eu".into(),
            outcome,
            step: Step::Verified,
            error_class: (outcome == Outcome::Failed).then_some(ErrorClass::Injected),
            error: None,
            timings: vec![],
            new_fingerprint: None,
            old_fingerprint: None,
            old_rejected: None,
            worker_id: "w".into(),
            finished_at_ms: 0,
            consumers: Vec::new(),
        }
    }

    #[test]
    fn duplicates_count_once_and_completion_is_by_index() {
        let mut b = Book::new(status(&[3]));
        let ok = |i| result(0, i, TaskAction::Rotate, Outcome::Succeeded);
        assert_eq!(b.apply(&ok(0), 1), Applied::Counted);
        assert_eq!(b.apply(&ok(0), 2), Applied::Duplicate);
        assert_eq!(
            b.apply(&result(0, 1, TaskAction::Rotate, Outcome::Failed), 3),
            Applied::Counted
        );
        assert!(!b.wave_complete(0));
        assert_eq!(b.apply(&ok(7), 3), Applied::Unknown, "index out of range");
        assert_eq!(
            b.apply(&result(4, 0, TaskAction::Rotate, Outcome::Succeeded), 3),
            Applied::Unknown
        );
        assert_eq!(b.apply(&ok(2), 4), Applied::Counted);
        assert!(b.wave_complete(0));
        let w = &b.status.waves[0];
        assert_eq!((w.succeeded, w.failed), (2, 1));
        assert_eq!(w.failures.get("injected"), Some(&1));
    }

    #[test]
    fn finalize_counts_missing_as_no_result_and_ignores_late_results() {
        let mut b = Book::new(status(&[4]));
        b.apply(&result(0, 0, TaskAction::Rotate, Outcome::Succeeded), 10);
        b.apply(&result(0, 1, TaskAction::Rotate, Outcome::Failed), 10);
        b.finalize_wave(0, 100);
        b.finalize_wave(0, 200); // idempotent
        let w = &b.status.waves[0];
        assert_eq!((w.succeeded, w.failed, w.no_result), (1, 1, 2));
        assert_eq!(w.failures.get("no_result"), Some(&2));
        assert_eq!(w.finished_at_ms, Some(100));
        assert_eq!(
            b.apply(&result(0, 2, TaskAction::Rotate, Outcome::Succeeded), 150),
            Applied::Late
        );
        // Published before the cut-off but read after: bits only.
        assert_eq!(
            b.apply(&result(0, 3, TaskAction::Rotate, Outcome::Succeeded), 90),
            Applied::BitsOnly
        );
        assert_eq!(b.status.waves[0].succeeded, 1, "frozen counters");
    }

    #[test]
    fn a_rotation_that_failed_after_its_promote_is_rolled_back() {
        let mut b = Book::new(status(&[3]));
        b.apply(&result(0, 0, TaskAction::Rotate, Outcome::Succeeded), 1);
        // Promoted, then a consumer did not verify: the new secret is CURRENT.
        let mut lagging = result(0, 1, TaskAction::Rotate, Outcome::Failed);
        lagging.error_class = Some(ErrorClass::ConsumerNotVerified);
        lagging.new_fingerprint = Some("fp-new".into());
        b.apply(&lagging, 1);
        // Failed before its promote: nothing to undo.
        b.apply(&result(0, 2, TaskAction::Rotate, Outcome::Failed), 1);
        b.finalize_wave(0, 5);
        assert_eq!(
            (b.status.waves[0].succeeded, b.status.waves[0].failed),
            (1, 2)
        );
        assert_eq!(b.begin_rollback(0), 2);
        assert_eq!(
            b.tally(0).unwrap().rotated.iter().collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    #[test]
    fn rollback_counts_only_rotated_credentials() {
        let mut b = Book::new(status(&[4]));
        b.apply(&result(0, 0, TaskAction::Rotate, Outcome::Succeeded), 1);
        b.apply(&result(0, 1, TaskAction::Rotate, Outcome::Succeeded), 1);
        b.apply(&result(0, 2, TaskAction::Rotate, Outcome::Failed), 1);
        b.finalize_wave(0, 5);
        assert_eq!(b.begin_rollback(0), 2);
        assert_eq!(
            b.tally(0).unwrap().rotated.iter().collect::<Vec<_>>(),
            vec![0, 1]
        );
        assert!(!b.rollback_complete(0));
        // A rollback result for a credential that was not rotated is ignored.
        assert_eq!(
            b.apply(&result(0, 2, TaskAction::Rollback, Outcome::RolledBack), 9),
            Applied::Unknown
        );
        assert_eq!(
            b.apply(&result(0, 0, TaskAction::Rollback, Outcome::RolledBack), 9),
            Applied::Counted
        );
        assert_eq!(
            b.apply(&result(0, 0, TaskAction::Rollback, Outcome::RolledBack), 9),
            Applied::Duplicate
        );
        b.apply(
            &result(0, 1, TaskAction::Rollback, Outcome::RollbackRefused),
            9,
        );
        assert!(b.rollback_complete(0));
        let w = &b.status.waves[0];
        assert_eq!(
            (w.rolled_back, w.rollback_refused, w.rollback_failed),
            (1, 1, 0)
        );
    }

    #[test]
    fn a_waves_regions_left_count_first_results_of_planned_regions() {
        let mut st = status(&[3]);
        st.waves[0].regions = [("eu".to_string(), 2), ("us".to_string(), 1)].into();
        let mut b = Book::new(st);
        let left = |b: &Book| -> Vec<(String, u64)> {
            b.wave_regions_left(0)
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect()
        };
        assert_eq!(left(&b), [("eu".to_string(), 2), ("us".to_string(), 1)]);
        let mut us = result(0, 2, TaskAction::Rotate, Outcome::Failed);
        us.region = "us".into();
        b.apply(&us, 1);
        b.apply(&us, 2); // duplicate
        b.apply(&result(0, 0, TaskAction::Rotate, Outcome::Succeeded), 3);
        assert_eq!(left(&b), [("eu".to_string(), 1)]);
        // Rebuilt from zero on replay, like every counter of an open wave.
        assert_eq!(left(&Book::new(b.status.clone())).len(), 2);
    }

    #[test]
    fn regions_count_first_results_and_rebuild_on_replay() {
        let mut b = Book::new(status(&[2, 2]));
        b.status.regions.get_mut("eu").unwrap().total = 4;
        let ok = |w, i| result(w, i, TaskAction::Rotate, Outcome::Succeeded);
        b.apply(&ok(0, 0), 1);
        b.apply(&ok(0, 0), 2); // duplicate
        b.apply(&result(0, 1, TaskAction::Rotate, Outcome::Failed), 3);
        let mut other = ok(1, 0);
        other.region = "mars".into(); // not in the plan: not counted, no new key
        b.apply(&other, 4);
        assert_eq!(
            b.status.regions["eu"],
            keywave_common::api::RegionStatus {
                total: 4,
                succeeded: 1,
                failed: 1,
                ..Default::default()
            }
        );
        assert!(!b.status.regions.contains_key("mars"));

        b.finalize_wave(0, 10);
        let mut replayed = Book::new(b.status.clone());
        assert_eq!(replayed.status.regions["eu"].succeeded, 0);
        replayed.apply(&ok(0, 0), 1);
        replayed.apply(&result(0, 1, TaskAction::Rotate, Outcome::Failed), 3);
        assert_eq!(replayed.status.regions, b.status.regions);
        // A snapshot from before region tallies reads as empty regions.
        let mut json = serde_json::to_value(&b.status).unwrap();
        json.as_object_mut().unwrap().remove("regions");
        let old: CampaignStatus = serde_json::from_value(json).unwrap();
        assert!(old.regions.is_empty());
    }

    #[test]
    fn replay_after_restart_rebuilds_the_same_counts() {
        // First life: wave 0 finalized, wave 1 half done.
        let mut live = Book::new(status(&[2, 4]));
        let results: Vec<(RotationResult, u64)> = vec![
            (result(0, 0, TaskAction::Rotate, Outcome::Succeeded), 1),
            (result(0, 1, TaskAction::Rotate, Outcome::Failed), 2),
            (result(1, 0, TaskAction::Rotate, Outcome::Succeeded), 20),
            (result(1, 1, TaskAction::Rotate, Outcome::Succeeded), 21),
            (result(1, 1, TaskAction::Rotate, Outcome::Succeeded), 22),
        ];
        for (r, t) in &results[..2] {
            live.apply(r, *t);
        }
        live.finalize_wave(0, 10);
        for (r, t) in &results[2..] {
            live.apply(r, *t);
        }
        // Second life: load the snapshot, replay the stream from the start.
        let mut restarted = Book::new(live.status.clone());
        assert_eq!(restarted.status.waves[1].succeeded, 0, "rebuilt by replay");
        for (r, t) in &results {
            restarted.apply(r, *t);
        }
        assert_eq!(restarted.status, live.status);
        assert_eq!(
            restarted.tally(0).unwrap().rotated,
            live.tally(0).unwrap().rotated
        );
    }
}
