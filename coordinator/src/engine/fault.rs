//! Fault-injection points of the wave engine, off by default
//! ([`Faults::none`]): the coordinator dies in the middle of publishing a
//! wave, between two waves, or during a rollback. In-process tests stop the
//! coordinator as a killed process would ([`CrashMode::Kill`]: no snapshot
//! saved, lease not released); the daemon aborts for real ([`CrashMode::Abort`])
//! when [`ENV_CRASH`] asks for it.

use thiserror::Error;

/// `mid_publish:<wave>:<tasks>`, `between_waves:<wave>` or `rollback:<wave>`.
pub const ENV_CRASH: &str = "KEYWAVE_FAULT_COORDINATOR_CRASH";

/// Where the coordinator dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After `after` tasks of wave `wave` were published (acks awaited).
    MidPublish { wave: u32, after: u64 },
    /// After the previous wave's decision was saved, before wave `wave`
    /// starts.
    BetweenWaves { wave: u32 },
    /// After the rollback tasks of wave `wave` were published, before their
    /// results are in.
    Rollback { wave: u32 },
}

/// How an injected crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CrashMode {
    /// In-process tests: the coordinator stops at once, as if killed.
    #[default]
    Kill,
    /// `std::process::abort()`.
    Abort,
}

/// Which faults to inject. `Faults::default()` injects none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    pub crash: Option<CrashPoint>,
    pub mode: CrashMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{ENV_CRASH}: {0:?} is not mid_publish:<wave>:<tasks>, between_waves:<wave> or rollback:<wave>"
)]
pub struct FaultError(pub String);

/// The signal of an injected crash (mode `Kill`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("injected coordinator crash at {0:?}")]
pub struct Crash(pub CrashPoint);

impl Faults {
    pub fn none() -> Self {
        Faults::default()
    }

    pub fn crash_at(point: CrashPoint, mode: CrashMode) -> Self {
        Faults {
            crash: Some(point),
            mode,
        }
    }

    /// Parses [`ENV_CRASH`] through `lookup` (mode `Abort`).
    pub fn from_env_with(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, FaultError> {
        let Some(v) = lookup(ENV_CRASH).filter(|v| !v.trim().is_empty()) else {
            return Ok(Faults::none());
        };
        let bad = || FaultError(v.clone());
        let parts: Vec<&str> = v.trim().split(':').collect();
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        let point = match parts.as_slice() {
            ["mid_publish", w, n] => CrashPoint::MidPublish {
                wave: num(w)? as u32,
                after: num(n)?,
            },
            ["between_waves", w] => CrashPoint::BetweenWaves {
                wave: num(w)? as u32,
            },
            ["rollback", w] => CrashPoint::Rollback {
                wave: num(w)? as u32,
            },
            _ => return Err(bad()),
        };
        Ok(Faults::crash_at(point, CrashMode::Abort))
    }

    /// [`Faults::from_env_with`] on the process environment.
    pub fn from_env() -> Result<Self, FaultError> {
        Self::from_env_with(|k| std::env::var(k).ok())
    }

    /// The fault point `at`: crashes if it is the configured one.
    pub(crate) fn hit(&self, at: CrashPoint) -> Result<(), Crash> {
        if self.crash != Some(at) {
            return Ok(());
        }
        match self.mode {
            CrashMode::Kill => {
                tracing::warn!(point = ?at, "Fault injection: the coordinator stops as if killed");
                Err(Crash(at))
            }
            CrashMode::Abort => {
                tracing::error!(point = ?at, "Fault injection: aborting the coordinator");
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
        let env = |v: &'static str| Faults::from_env_with(move |_| Some(v.to_string()));
        assert_eq!(Faults::from_env_with(|_| None).unwrap(), Faults::none());
        assert_eq!(
            env("mid_publish:1:5").unwrap().crash,
            Some(CrashPoint::MidPublish { wave: 1, after: 5 })
        );
        assert_eq!(
            env("between_waves:2").unwrap().crash,
            Some(CrashPoint::BetweenWaves { wave: 2 })
        );
        assert_eq!(
            env("rollback:0").unwrap(),
            Faults::crash_at(CrashPoint::Rollback { wave: 0 }, CrashMode::Abort)
        );
        for bad in ["later", "mid_publish:1", "rollback:x", "between_waves:1:2"] {
            assert!(env(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_the_configured_point_crashes() {
        let f = Faults::crash_at(CrashPoint::BetweenWaves { wave: 1 }, CrashMode::Kill);
        assert!(f.hit(CrashPoint::BetweenWaves { wave: 2 }).is_ok());
        assert!(f.hit(CrashPoint::Rollback { wave: 1 }).is_ok());
        assert!(f.hit(CrashPoint::BetweenWaves { wave: 1 }).is_err());
        assert!(Faults::none()
            .hit(CrashPoint::MidPublish { wave: 0, after: 1 })
            .is_ok());
    }
}
