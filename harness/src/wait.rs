//! Waiting without sleeping: poll a condition until it holds or a timeout
//! passes, and unique names so that tests sharing a server never collide.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A condition that did not hold in time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub after: Duration,
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "condition still false after {:?}", self.after)
    }
}

impl std::error::Error for TimedOut {}

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Polls `cond` until it returns `true`, backing off from 5 ms to 200 ms
/// between polls, or fails after `timeout`.
///
/// ```no_run
/// # async fn f(counter: std::sync::Arc<std::sync::atomic::AtomicU64>) {
/// use keywave_harness::wait_until;
/// use std::time::Duration;
/// wait_until(Duration::from_secs(5), || async {
///     counter.load(std::sync::atomic::Ordering::SeqCst) == 3
/// })
/// .await
/// .expect("three increments");
/// # }
/// ```
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> Result<(), TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, || {
        let fut = cond();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it returns `Some(value)` and returns the value, or
/// fails after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(TimedOut { after: elapsed });
        }
        tokio::time::sleep(pause.min(timeout - elapsed)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// A name nobody else in this test run uses: `<prefix>-<n><random>`, made of
/// `[A-Za-z0-9-]` only, so it is valid as a keywave id, a NATS subject token
/// and a Redis ACL user name.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand::random();
    format!("{prefix}-{n}{r:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    #[tokio::test]
    async fn wait_until_returns_once_true() {
        let calls = Arc::new(AtomicU32::new(0));
        wait_until(Duration::from_secs(5), || {
            let calls = calls.clone();
            async move { calls.fetch_add(1, Ordering::SeqCst) >= 3 }
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_until_times_out() {
        let err = wait_until(Duration::from_secs(2), || async { false })
            .await
            .unwrap_err();
        assert!(err.after >= Duration::from_secs(2));
    }

    #[test]
    fn unique_names_differ_and_are_tokens() {
        let a = unique("c");
        let b = unique("c");
        assert_ne!(a, b);
        keywave_common::ids::validate("name", &a).unwrap();
    }
}
