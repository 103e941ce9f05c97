//! Pure campaign arithmetic: wave sizing and the failure-budget rule. No I/O,
//! so it is unit- and property-tested directly.

use crate::wire::WaveSize;

/// Splits `total` credentials into waves following `plan`: each entry is a
/// count or a percentage of the total (floored, at least 1), the last entry
/// repeats until everything is covered, and the final wave takes what is left.
/// `1,10%,50%` over 1,000 gives `[1, 100, 500, 399]`.
pub fn wave_sizes(total: u64, plan: &[WaveSize]) -> Vec<u64> {
    let mut sizes = Vec::new();
    if total == 0 || plan.is_empty() {
        return sizes;
    }
    let mut remaining = total;
    let mut i = 0;
    while remaining > 0 {
        let entry = plan[i.min(plan.len() - 1)];
        let want = match entry {
            WaveSize::Count(n) => n,
            WaveSize::Percent(p) => ((total as f64) * p / 100.0).floor() as u64,
        }
        .max(1);
        let size = want.min(remaining);
        sizes.push(size);
        remaining -= size;
        i += 1;
    }
    sizes
}

/// The failure-budget rule: a wave fails when `failed / size` is strictly
/// greater than `budget`. Tasks with no result by the deadline count as failed.
pub fn wave_failed(failed: u64, size: u64, budget: f64) -> bool {
    if size == 0 {
        return false;
    }
    // Exact integer comparison in parts per million, so that a budget such as
    // 0.29 (which is 0.28999.. in binary) does not flip the boundary case:
    // failed/size > budget  <=>  failed * 1e6 > round(budget * 1e6) * size.
    let budget_ppm = (budget.clamp(0.0, 1.0) * 1_000_000.0).round() as u128;
    (failed as u128) * 1_000_000 > budget_ppm * (size as u128)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn example_from_the_design() {
        let plan = crate::wire::parse_wave_plan("1,10%,50%").unwrap();
        assert_eq!(wave_sizes(1000, &plan), vec![1, 100, 500, 399]);
    }

    #[test]
    fn small_totals() {
        let plan = crate::wire::parse_wave_plan("10%").unwrap();
        assert_eq!(wave_sizes(3, &plan), vec![1, 1, 1]);
        assert_eq!(wave_sizes(0, &plan), Vec::<u64>::new());
        let plan = crate::wire::parse_wave_plan("5").unwrap();
        assert_eq!(wave_sizes(12, &plan), vec![5, 5, 2]);
    }

    #[test]
    fn budget_boundary_is_strict() {
        assert!(!wave_failed(1, 10, 0.1));
        assert!(wave_failed(2, 10, 0.1));
        assert!(wave_failed(1, 1, 0.0));
        assert!(!wave_failed(0, 1, 0.0));
        assert!(!wave_failed(10, 10, 1.0));
    }

    fn arb_size() -> impl Strategy<Value = WaveSize> {
        prop_oneof![
            (1u64..5000).prop_map(WaveSize::Count),
            (1u32..=100).prop_map(|p| WaveSize::Percent(p as f64)),
        ]
    }

    proptest! {
        #[test]
        fn waves_cover_total_exactly(total in 0u64..200_000, plan in proptest::collection::vec(arb_size(), 1..6)) {
            let sizes = wave_sizes(total, &plan);
            prop_assert_eq!(sizes.iter().sum::<u64>(), total);
            prop_assert!(sizes.iter().all(|&s| s >= 1));
            // Every wave but the last has exactly the planned size.
            for (i, s) in sizes.iter().enumerate().take(sizes.len().saturating_sub(1)) {
                let want = match plan[i.min(plan.len() - 1)] {
                    WaveSize::Count(n) => n,
                    WaveSize::Percent(p) => ((total as f64) * p / 100.0).floor() as u64,
                }.max(1);
                prop_assert_eq!(*s, want);
            }
        }

        #[test]
        fn budget_matches_exact_fraction(failed in 0u64..1000, extra in 0u64..1000, budget_pct in 0u32..=100) {
            let size = failed + extra + 1;
            let budget = budget_pct as f64 / 100.0;
            // Exact rational comparison: failed/size > pct/100 <=> failed*100 > pct*size.
            let exact = (failed as u128) * 100 > (budget_pct as u128) * (size as u128);
            prop_assert_eq!(wave_failed(failed, size, budget), exact);
        }
    }
}
