//! The wave decision as a pure function: a finished wave's counters and the
//! campaign spec in, a [`Decision`] and the human reason out (the reason goes
//! into the `decision` event and the campaign status verbatim).

use keywave_common::{
    api::WaveStatus,
    planner,
    wire::{CampaignSpec, Decision, OnFailure},
};

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The wave exceeded its failure budget.
    pub tripped: bool,
    pub reason: String,
}

/// Decides what follows a finished wave. Failures are `failed + no_result`;
/// the wave trips when they exceed the budget (strictly, see
/// [`planner::wave_failed`]).
pub fn decide(wave: &WaveStatus, spec: &CampaignSpec, is_last: bool) -> Verdict {
    let failed = wave.failed + wave.no_result;
    let pct = if wave.size == 0 {
        0.0
    } else {
        failed as f64 * 100.0 / wave.size as f64
    };
    let budget = spec.failure_budget * 100.0;
    let head = format!(
        "wave {}: {failed} of {} failed ({pct:.1}%)",
        wave.wave, wave.size
    );
    if planner::wave_failed(failed, wave.size, spec.failure_budget) {
        let top = top_class(wave).unwrap_or("unknown");
        let decision = match spec.on_failure {
            OnFailure::Pause => Decision::Pause,
            OnFailure::Rollback => Decision::Rollback,
        };
        return Verdict {
            decision,
            tripped: true,
            reason: format!("{head} > budget {budget:.1}%; top class: {top}"),
        };
    }
    let (decision, next) = if is_last {
        (
            Decision::Complete,
            "last wave, campaign complete".to_string(),
        )
    } else if spec.bake_ms > 0 {
        (
            Decision::NextWave,
            format!(
                "next wave after a {} bake",
                keywave_common::duration::format_ms(spec.bake_ms)
            ),
        )
    } else {
        (Decision::NextWave, "next wave".to_string())
    };
    Verdict {
        decision,
        tripped: false,
        reason: format!("{head} <= budget {budget:.1}%; {next}"),
    }
}

/// The most frequent failure class (ties go to the alphabetically first).
pub fn top_class(wave: &WaveStatus) -> Option<&str> {
    let mut best: Option<(&str, u64)> = None;
    for (class, &n) in &wave.failures {
        let better = match best {
            Some((_, b)) => n > b,
            None => n > 0,
        };
        if better {
            best = Some((class, n));
        }
    }
    best.map(|(c, _)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keywave_common::wire::{Strategy, WaveSize, SCHEMA_VERSION};

    fn spec(budget: f64, on_failure: OnFailure, bake_ms: u64) -> CampaignSpec {
        CampaignSpec {
            v: SCHEMA_VERSION,
            name: String::new(),
            reason: None,
            selector: Default::default(),
            strategy: Strategy::Continuity,
            waves: vec![WaveSize::Count(1)],
            failure_budget: budget,
            bake_ms,
            on_failure,
            task_timeout_ms: 1000,
            approve_before_waves: Vec::new(),
            preflight: None,
            preflight_max_unreachable: 0.0,
            requested_by: None,
        }
    }

    fn wave(size: u64, failed: u64, no_result: u64, classes: &[(&str, u64)]) -> WaveStatus {
        WaveStatus {
            wave: 2,
            size,
            succeeded: size - failed - no_result,
            failed,
            no_result,
            failures: classes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn tripped_wave_rolls_back_or_pauses_with_a_reason() {
        let w = wave(100, 55, 6, &[("injected", 55), ("no_result", 6)]);
        let v = decide(&w, &spec(0.05, OnFailure::Rollback, 0), false);
        assert_eq!(v.decision, Decision::Rollback);
        assert!(v.tripped);
        assert_eq!(
            v.reason,
            "wave 2: 61 of 100 failed (61.0%) > budget 5.0%; top class: injected"
        );
        let v = decide(&w, &spec(0.05, OnFailure::Pause, 0), true);
        assert_eq!(v.decision, Decision::Pause);
    }

    #[test]
    fn no_result_counts_as_failure() {
        let w = wave(10, 0, 2, &[("no_result", 2)]);
        let v = decide(&w, &spec(0.1, OnFailure::Pause, 0), false);
        assert!(v.tripped);
        assert!(v.reason.ends_with("top class: no_result"), "{}", v.reason);
    }

    #[test]
    fn budget_boundary_is_not_a_failure() {
        let w = wave(10, 1, 0, &[("injected", 1)]);
        let v = decide(&w, &spec(0.1, OnFailure::Rollback, 30_000), false);
        assert_eq!(v.decision, Decision::NextWave);
        assert!(!v.tripped);
        assert_eq!(
            v.reason,
            "wave 2: 1 of 10 failed (10.0%) <= budget 10.0%; next wave after a 30s bake"
        );
        let v = decide(&w, &spec(0.1, OnFailure::Rollback, 0), true);
        assert_eq!(v.decision, Decision::Complete);
    }

    #[test]
    fn top_class_prefers_count_then_name() {
        let w = wave(10, 4, 0, &[("b", 2), ("a", 2), ("c", 1)]);
        assert_eq!(top_class(&w), Some("a"));
        assert_eq!(top_class(&wave(1, 0, 0, &[])), None);
    }
}
