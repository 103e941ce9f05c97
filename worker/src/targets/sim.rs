//! The simulated target, for demos, benchmarks and protocol tests. It keeps,
//! per principal, the SHA-256 hashes of the secrets that authenticate (never
//! the clear values), and counts the successful add/replace calls so tests can
//! prove a credential was set exactly once.

use super::{AuthCheck, Target, TargetError};
use async_trait::async_trait;
use keywave_common::crypto::{Secret, SecretPolicy};
use keywave_common::wire::TargetKind;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Behaviour of a [`SimTarget`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimOptions {
    /// Sleep before each operation, as a stand-in for a network round trip.
    pub latency: Duration,
    /// Probability (0.0..=1.0) that an add or replace fails with
    /// [`TargetError::Injected`].
    pub fail_rate: f64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            latency: Duration::ZERO,
            fail_rate: 0.0,
        }
    }
}

#[derive(Default)]
struct Principal {
    valid: HashSet<[u8; 32]>,
    sets: u64,
}

/// An in-memory credential system.
pub struct SimTarget {
    opts: SimOptions,
    principals: Mutex<HashMap<String, Principal>>,
}

fn hash(secret: &Secret) -> [u8; 32] {
    Sha256::digest(secret.expose().as_bytes()).into()
}

impl SimTarget {
    pub fn new(opts: SimOptions) -> Arc<Self> {
        Arc::new(SimTarget {
            opts,
            principals: Mutex::new(HashMap::new()),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Principal>) -> R) -> R {
        // A poisoned lock only means another test thread panicked; the map
        // itself is still consistent (every mutation is a single call).
        let mut g = self.principals.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Makes `secret` valid for `principal` (today's secret before enrolment).
    /// Does not count as a set.
    pub fn seed(&self, principal: &str, secret: &Secret) {
        self.with(|m| {
            m.entry(principal.to_string())
                .or_default()
                .valid
                .insert(hash(secret));
        });
    }

    /// Whether `secret` authenticates `principal` right now.
    pub fn accepts(&self, principal: &str, secret: &Secret) -> bool {
        let h = hash(secret);
        self.with(|m| m.get(principal).is_some_and(|p| p.valid.contains(&h)))
    }

    /// Number of add/replace calls that succeeded for `principal`.
    pub fn set_count(&self, principal: &str) -> u64 {
        self.with(|m| m.get(principal).map_or(0, |p| p.sets))
    }

    /// Number of secrets that authenticate `principal` right now.
    pub fn valid_count(&self, principal: &str) -> usize {
        self.with(|m| m.get(principal).map_or(0, |p| p.valid.len()))
    }

    async fn pause(&self) {
        if !self.opts.latency.is_zero() {
            tokio::time::sleep(self.opts.latency).await;
        }
    }

    fn maybe_fail(&self) -> Result<(), TargetError> {
        if self.opts.fail_rate > 0.0 && rand::thread_rng().gen::<f64>() < self.opts.fail_rate {
            return Err(TargetError::Injected);
        }
        Ok(())
    }
}

#[async_trait]
impl Target for SimTarget {
    fn kind(&self) -> TargetKind {
        TargetKind::Sim
    }

    fn policy(&self) -> SecretPolicy {
        SecretPolicy::default()
    }

    async fn add(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.pause().await;
        self.maybe_fail()?;
        let h = hash(new);
        self.with(|m| {
            let p = m.entry(principal.to_string()).or_default();
            p.valid.insert(h);
            p.sets += 1;
        });
        Ok(())
    }

    async fn replace(&self, principal: &str, new: &Secret) -> Result<(), TargetError> {
        self.pause().await;
        self.maybe_fail()?;
        let h = hash(new);
        self.with(|m| {
            let p = m.entry(principal.to_string()).or_default();
            p.valid.clear();
            p.valid.insert(h);
            p.sets += 1;
        });
        Ok(())
    }

    async fn remove(&self, principal: &str, old: &Secret) -> Result<(), TargetError> {
        self.pause().await;
        let h = hash(old);
        self.with(|m| {
            if let Some(p) = m.get_mut(principal) {
                p.valid.remove(&h);
            }
        });
        Ok(())
    }

    async fn check(&self, principal: &str, secret: &Secret) -> Result<AuthCheck, TargetError> {
        self.pause().await;
        Ok(if self.accepts(principal, secret) {
            AuthCheck::Accepted
        } else {
            AuthCheck::Rejected
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Secret {
        Secret::new(v.into())
    }

    #[tokio::test]
    async fn add_keeps_old_replace_drops_it() {
        let t = SimTarget::new(SimOptions::default());
        t.seed("app", &s("old"));
        assert_eq!(t.set_count("app"), 0);
        t.add("app", &s("new")).await.unwrap();
        assert!(t.accepts("app", &s("old")) && t.accepts("app", &s("new")));
        t.remove("app", &s("old")).await.unwrap();
        t.remove("app", &s("old")).await.unwrap();
        assert!(!t.accepts("app", &s("old")));
        t.replace("app", &s("newer")).await.unwrap();
        assert_eq!(t.check("app", &s("new")).await, Ok(AuthCheck::Rejected));
        assert_eq!(t.check("app", &s("newer")).await, Ok(AuthCheck::Accepted));
        assert_eq!(t.set_count("app"), 2);
        assert_eq!(t.check("nobody", &s("x")).await, Ok(AuthCheck::Rejected));
    }

    #[tokio::test]
    async fn fail_rate_one_always_fails() {
        let t = SimTarget::new(SimOptions {
            fail_rate: 1.0,
            ..Default::default()
        });
        assert_eq!(t.add("a", &s("x")).await, Err(TargetError::Injected));
        assert_eq!(t.set_count("a"), 0);
    }
}
