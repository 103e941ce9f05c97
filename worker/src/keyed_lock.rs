//! One delivery per credential at a time in a worker.
//!
//! JetStream redelivers a task whose acknowledgement (or progress) did not
//! arrive within the ack wait, even when the first delivery is still running
//! in this very worker (a stalled event loop, a slow target). Two deliveries
//! of one task racing against the same target can undo each other's steps:
//! the late one's decision was taken on a state that no longer holds. The
//! protocol makes every step safe to repeat *after* another delivery, so it
//! is enough that deliveries of one credential take turns: the second waits
//! for the first, then reads the record and carries on from what it finds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Locks keyed by credential id; an entry lives while someone holds or
/// waits for it.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
}

/// Held while a delivery runs; dropping it lets the next delivery of the
/// same credential go.
pub struct KeyGuard<'a> {
    owner: &'a KeyedLocks,
    key: String,
    lock: Arc<AsyncMutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until no other holder of `key` remains in this process.
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        KeyGuard {
            owner: self,
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    /// Keys held or waited for (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else holds or waits.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliveries_of_one_key_take_turns_and_other_keys_do_not_wait() {
        let locks = Arc::new(KeyedLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, most) = (locks.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("cred-1").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another credential is not held up by cred-1's queue.
        let other = tokio::time::timeout(Duration::from_secs(1), locks.lock("cred-2")).await;
        assert!(other.is_ok(), "a different key must not wait");
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "one holder of a key at a time"
        );
        assert_eq!(locks.len(), 0, "entries are removed when nobody holds them");
    }
}
