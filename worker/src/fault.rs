//! Fault-injection points for crash tests, all off by default
//! ([`Faults::none`]). The protocol calls [`Faults::before`] and
//! [`Faults::after`] around every step and the runner calls
//! [`Faults::after_publish`] and [`Faults::drop_result`] around the result
//! publish; with no fault configured each is a no-op that costs a comparison.
//!
//! In-process tests stop the worker as a killed process would
//! ([`CrashMode::StopWithoutAck`]); the binary aborts for real
//! ([`CrashMode::Abort`]) when the environment asks for it (the `ENV_*`
//! constants; unset means no fault).

use keywave_common::wire::Step;
use rand::Rng;
use std::time::Duration;
use thiserror::Error;

/// Crash right after this step completes (and was recorded), or after the
/// result was published (`published`: the task is then redelivered although
/// its result is out).
pub const ENV_CRASH_AFTER: &str = "KEYWAVE_FAULT_CRASH_AFTER";
/// Crash right before this step starts.
pub const ENV_CRASH_BEFORE: &str = "KEYWAVE_FAULT_CRASH_BEFORE";
/// Sleep before a step: `<step>:<milliseconds>`, e.g. `set:5000`.
pub const ENV_DELAY: &str = "KEYWAVE_FAULT_DELAY";
/// Probability (0 to 1) that a result publish is dropped, as if lost on the
/// way: the worker sees the publish fail and hands the task back.
pub const ENV_DROP_RESULT: &str = "KEYWAVE_FAULT_DROP_RESULT";

/// How an injected crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// In-process tests: the worker stops at the fault point and leaves the
    /// task un-acked, as a killed process would; `run()` returns.
    #[default]
    StopWithoutAck,
    /// `std::process::abort()`: the process dies on the spot.
    Abort,
}

/// Where a crash is injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Right before the step starts (the previous step is complete).
    Before(Step),
    /// Right after the step completed (and, for durable steps, was recorded).
    After(Step),
    /// After the result was published, before the task is acked.
    AfterPublish,
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Point::Before(s) => write!(f, "before {s}"),
            Point::After(s) => write!(f, "after {s}"),
            Point::AfterPublish => f.write_str("after the result publish"),
        }
    }
}

/// Which faults to inject. `Faults::default()` injects none.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Crash right after this step completes (for every task that reaches it).
    pub crash_after: Option<Step>,
    pub mode: CrashMode,
    /// Crash right before this step starts.
    pub crash_before: Option<Step>,
    /// Crash after the result publish, before the ack.
    pub crash_after_publish: bool,
    /// Sleep this long before the step starts (a slow target or store).
    pub delay: Option<(Step, Duration)>,
    /// Probability that a result publish is dropped (0: never).
    pub drop_result_rate: f64,
}

/// The signal that an injected crash happened (mode `StopWithoutAck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("injected crash {point}")]
pub struct Crash {
    pub point: Point,
}

/// A fault variable with a value that does not parse; names the variable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{var}: {message}")]
pub struct FaultError {
    pub var: &'static str,
    pub message: String,
}

/// Every step, for parsing names.
const STEPS: [Step; 8] = [
    Step::Received,
    Step::Staged,
    Step::Set,
    Step::Tested,
    Step::Promoted,
    Step::Revoked,
    Step::Verified,
    Step::Restored,
];

/// Parses a step name as written on the wire (`set`, `promoted`, ...).
pub fn parse_step(s: &str) -> Option<Step> {
    let s = s.trim();
    STEPS
        .into_iter()
        .find(|st| st.as_str().eq_ignore_ascii_case(s))
}

fn step_of(var: &'static str, v: &str) -> Result<Step, FaultError> {
    parse_step(v).ok_or_else(|| FaultError {
        var,
        message: format!(
            "unknown step {v:?} (expected one of staged, set, tested, promoted, revoked, verified, restored)"
        ),
    })
}

impl Faults {
    /// No fault at all.
    pub fn none() -> Self {
        Faults::default()
    }

    /// Crash after `step` in the given mode.
    pub fn crash_after(step: Step, mode: CrashMode) -> Self {
        Faults {
            crash_after: Some(step),
            mode,
            ..Default::default()
        }
    }

    /// Crash before `step` in the given mode.
    pub fn crash_before(step: Step, mode: CrashMode) -> Self {
        Faults {
            crash_before: Some(step),
            mode,
            ..Default::default()
        }
    }

    /// A crash at `point` in the given mode.
    pub fn crash_at(point: Point, mode: CrashMode) -> Self {
        match point {
            Point::Before(s) => Self::crash_before(s, mode),
            Point::After(s) => Self::crash_after(s, mode),
            Point::AfterPublish => Faults {
                crash_after_publish: true,
                mode,
                ..Default::default()
            },
        }
    }

    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        self.crash_after.is_some()
            || self.crash_before.is_some()
            || self.crash_after_publish
            || self.delay.is_some()
            || self.drop_result_rate > 0.0
    }

    /// Reads the `ENV_*` variables through `lookup` (crashes in mode
    /// `Abort`). Unset or empty variables mean no fault.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, FaultError> {
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let mut f = Faults {
            mode: CrashMode::Abort,
            ..Default::default()
        };
        if let Some(v) = get(ENV_CRASH_AFTER) {
            if v.trim().eq_ignore_ascii_case("published") {
                f.crash_after_publish = true;
            } else {
                f.crash_after = Some(step_of(ENV_CRASH_AFTER, &v)?);
            }
        }
        if let Some(v) = get(ENV_CRASH_BEFORE) {
            f.crash_before = Some(step_of(ENV_CRASH_BEFORE, &v)?);
        }
        if let Some(v) = get(ENV_DELAY) {
            let bad = || FaultError {
                var: ENV_DELAY,
                message: format!("{v:?} is not <step>:<milliseconds>"),
            };
            let (s, ms) = v.split_once(':').ok_or_else(bad)?;
            let ms: u64 = ms.trim().parse().map_err(|_| bad())?;
            f.delay = Some((step_of(ENV_DELAY, s)?, Duration::from_millis(ms)));
        }
        if let Some(v) = get(ENV_DROP_RESULT) {
            let rate: f64 = v.trim().parse().map_err(|_| FaultError {
                var: ENV_DROP_RESULT,
                message: format!("{v:?} is not a number"),
            })?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(FaultError {
                    var: ENV_DROP_RESULT,
                    message: "must be between 0 and 1".into(),
                });
            }
            f.drop_result_rate = rate;
        }
        if !f.any() {
            return Ok(Faults::none());
        }
        Ok(f)
    }

    /// [`Faults::from_env_with`] on the process environment.
    pub fn from_env() -> Result<Self, FaultError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    fn crash(&self, point: Point) -> Result<(), Crash> {
        match self.mode {
            CrashMode::StopWithoutAck => {
                tracing::warn!(%point, "Fault injection: stopping without ack");
                Err(Crash { point })
            }
            CrashMode::Abort => {
                tracing::error!(%point, "Fault injection: aborting the process");
                std::process::abort()
            }
        }
    }

    /// Called by the protocol right before `step` starts: sleeps for a
    /// configured delay, crashes if configured.
    pub async fn before(&self, step: Step) -> Result<(), Crash> {
        if let Some((s, d)) = self.delay {
            if s == step {
                tracing::warn!(step = %step, delay_ms = d.as_millis() as u64, "Fault injection: delaying a step");
                tokio::time::sleep(d).await;
            }
        }
        if self.crash_before == Some(step) {
            return self.crash(Point::Before(step));
        }
        Ok(())
    }

    /// Called by the protocol when `step` has completed (and, for durable
    /// steps, been recorded). Returns `Err(Crash)` in `StopWithoutAck` mode,
    /// never returns in `Abort` mode, and is a no-op for other steps.
    pub fn after(&self, step: Step) -> Result<(), Crash> {
        if self.crash_after != Some(step) {
            return Ok(());
        }
        self.crash(Point::After(step))
    }

    /// Called by the runner once a result is published, before the ack.
    pub fn after_publish(&self) -> Result<(), Crash> {
        if !self.crash_after_publish {
            return Ok(());
        }
        self.crash(Point::AfterPublish)
    }

    /// Whether to drop this result publish.
    pub fn drop_result(&self) -> bool {
        self.drop_result_rate > 0.0 && rand::thread_rng().gen::<f64>() < self.drop_result_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Faults, FaultError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Faults::from_env_with(|k| m.get(k).cloned())
    }

    #[test]
    fn env_parsing() {
        assert_eq!(env(&[]).unwrap(), Faults::none());
        assert_eq!(env(&[(ENV_CRASH_AFTER, " ")]).unwrap(), Faults::none());
        assert_eq!(
            env(&[(ENV_CRASH_AFTER, "set")]).unwrap(),
            Faults::crash_after(Step::Set, CrashMode::Abort)
        );
        assert_eq!(
            env(&[(ENV_CRASH_AFTER, " Promoted ")]).unwrap(),
            Faults::crash_after(Step::Promoted, CrashMode::Abort)
        );
        assert_eq!(
            env(&[(ENV_CRASH_BEFORE, "verified")]).unwrap(),
            Faults::crash_before(Step::Verified, CrashMode::Abort)
        );
        assert_eq!(
            env(&[(ENV_CRASH_AFTER, "published")]).unwrap(),
            Faults::crash_at(Point::AfterPublish, CrashMode::Abort)
        );
        let f = env(&[(ENV_DELAY, "set:250"), (ENV_DROP_RESULT, "0.5")]).unwrap();
        assert_eq!(f.delay, Some((Step::Set, Duration::from_millis(250))));
        assert_eq!(f.drop_result_rate, 0.5);
        assert_eq!(
            env(&[(ENV_CRASH_AFTER, "later")]).unwrap_err().var,
            ENV_CRASH_AFTER
        );
        assert_eq!(env(&[(ENV_DELAY, "set")]).unwrap_err().var, ENV_DELAY);
        assert_eq!(env(&[(ENV_DELAY, "nope:5")]).unwrap_err().var, ENV_DELAY);
        assert_eq!(
            env(&[(ENV_DROP_RESULT, "2")]).unwrap_err().var,
            ENV_DROP_RESULT
        );
    }

    #[tokio::test]
    async fn only_the_configured_point_crashes() {
        let f = Faults::crash_after(Step::Set, CrashMode::StopWithoutAck);
        assert_eq!(f.after(Step::Staged), Ok(()));
        assert_eq!(f.before(Step::Set).await, Ok(()));
        assert_eq!(
            f.after(Step::Set),
            Err(Crash {
                point: Point::After(Step::Set)
            })
        );
        assert_eq!(f.after_publish(), Ok(()));
        let f = Faults::crash_before(Step::Tested, CrashMode::StopWithoutAck);
        assert_eq!(f.after(Step::Tested), Ok(()));
        assert_eq!(
            f.before(Step::Tested).await,
            Err(Crash {
                point: Point::Before(Step::Tested)
            })
        );
        let none = Faults::none();
        assert!(!none.any());
        assert_eq!(none.after(Step::Set), Ok(()));
        assert_eq!(none.before(Step::Set).await, Ok(()));
        assert_eq!(none.after_publish(), Ok(()));
        assert!(!none.drop_result());
        let drop_all = Faults {
            drop_result_rate: 1.0,
            ..Default::default()
        };
        assert!(drop_all.drop_result());
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_sleeps_before_its_step_only() {
        let f = Faults {
            delay: Some((Step::Set, Duration::from_secs(60))),
            ..Default::default()
        };
        let t0 = tokio::time::Instant::now();
        f.before(Step::Staged).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        f.before(Step::Set).await.unwrap();
        assert!(t0.elapsed() >= Duration::from_secs(60));
    }
}
