//! Fault-injection points for crash tests. The protocol calls
//! [`Faults::after`] when a step completes; with no fault configured (the
//! default) that is a no-op. In-process tests stop the worker as a killed
//! process would ([`CrashMode::StopWithoutAck`]); the binary aborts for real
//! when `KEYWAVE_FAULT_CRASH_AFTER=<step>` is set ([`CrashMode::Abort`]).

use keywave_common::wire::Step;
use thiserror::Error;

/// Environment variable read by the binary: crash right after this step.
pub const ENV_CRASH_AFTER: &str = "KEYWAVE_FAULT_CRASH_AFTER";

/// How an injected crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// In-process tests: the worker stops right after the step completes and
    /// leaves the task un-acked, as a killed process would; `run()` returns.
    #[default]
    StopWithoutAck,
    /// `std::process::abort()`: the process dies on the spot.
    Abort,
}

/// Which faults to inject. `Faults::default()` injects none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Crash right after this step completes (for every task that reaches it).
    pub crash_after: Option<Step>,
    pub mode: CrashMode,
}

/// The signal that an injected crash happened after `step` (mode `StopWithoutAck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("injected crash after step {step}")]
pub struct Crash {
    pub step: Step,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{ENV_CRASH_AFTER}: unknown step {0:?} (expected one of staged, set, tested, promoted, revoked, verified, restored)")]
pub struct FaultError(pub String);

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
        }
    }

    /// Reads [`ENV_CRASH_AFTER`] through `lookup` (mode `Abort`). Unset or
    /// empty means no fault.
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, FaultError> {
        match lookup(ENV_CRASH_AFTER) {
            None => Ok(Faults::none()),
            Some(v) if v.trim().is_empty() => Ok(Faults::none()),
            Some(v) => parse_step(&v)
                .map(|s| Faults::crash_after(s, CrashMode::Abort))
                .ok_or(FaultError(v)),
        }
    }

    /// [`Faults::from_env_with`] on the process environment.
    pub fn from_env() -> Result<Self, FaultError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// Called by the protocol when `step` has completed (and, for durable
    /// steps, been recorded). Returns `Err(Crash)` in `StopWithoutAck` mode,
    /// never returns in `Abort` mode, and is a no-op for other steps.
    pub fn after(&self, step: Step) -> Result<(), Crash> {
        if self.crash_after != Some(step) {
            return Ok(());
        }
        match self.mode {
            CrashMode::StopWithoutAck => {
                tracing::warn!(step = %step, "Fault injection: stopping without ack");
                Err(Crash { step })
            }
            CrashMode::Abort => {
                tracing::error!(step = %step, "Fault injection: aborting the process");
                std::process::abort()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_parsing() {
        assert_eq!(Faults::from_env_with(|_| None).unwrap(), Faults::none());
        assert_eq!(
            Faults::from_env_with(|_| Some("set".into())).unwrap(),
            Faults::crash_after(Step::Set, CrashMode::Abort)
        );
        assert_eq!(
            Faults::from_env_with(|_| Some(" Promoted ".into())).unwrap(),
            Faults::crash_after(Step::Promoted, CrashMode::Abort)
        );
        assert!(Faults::from_env_with(|_| Some("later".into())).is_err());
    }

    #[test]
    fn only_the_configured_step_crashes() {
        let f = Faults::crash_after(Step::Set, CrashMode::StopWithoutAck);
        assert_eq!(f.after(Step::Staged), Ok(()));
        assert_eq!(f.after(Step::Set), Err(Crash { step: Step::Set }));
        assert_eq!(Faults::none().after(Step::Set), Ok(()));
    }
}
