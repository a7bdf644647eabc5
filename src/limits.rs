//! Token-bucket rate limits (per caller, per server, per tool) and per-server concurrency caps.
//!
//! Pure apart from the clock, which every check takes as an argument, so tests control time.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::RateLimit;

/// Why a call was refused, and when trying again can succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// `caller`, `server`, `tool` or `concurrency`.
    pub scope: &'static str,
    pub message: String,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Buckets keyed by scope and name; created full on first use.
#[derive(Default)]
pub struct RateLimiter {
    buckets: DashMap<(&'static str, String), Mutex<Bucket>>,
}

/// Above this many buckets, full (idle) ones are forgotten: a forgotten bucket is full anyway.
const PRUNE_ABOVE: usize = 10_000;

impl RateLimiter {
    /// Take one token from the `(scope, key)` bucket, or say how long until one is available.
    pub fn take(
        &self,
        scope: &'static str,
        key: &str,
        limit: &RateLimit,
        now: Instant,
    ) -> Result<(), Duration> {
        if self.buckets.len() > PRUNE_ABOVE {
            self.prune(now, limit);
        }
        let k = (scope, key.to_string());
        let entry = self.buckets.entry(k).or_insert_with(|| {
            Mutex::new(Bucket {
                tokens: f64::from(limit.burst),
                last: now,
            })
        });
        let mut b = match entry.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / limit.per_second;
            Err(Duration::from_secs_f64(wait.max(0.001)))
        }
    }

    fn prune(&self, now: Instant, limit: &RateLimit) {
        self.buckets.retain(|_, b| {
            let b = match b.get_mut() {
                Ok(b) => b,
                Err(p) => p.into_inner(),
            };
            let refill = now.saturating_duration_since(b.last).as_secs_f64() * limit.per_second;
            b.tokens + refill < f64::from(limit.burst)
        });
    }

    /// Forget every bucket of a scope and key prefix (a server removed or changed on reload).
    pub fn forget_server(&self, server: &str) {
        let tool_prefix = format!("{server}\u{0}");
        self.buckets.retain(|(scope, key), _| match *scope {
            "server" => key != server,
            "tool" => !key.starts_with(&tool_prefix),
            _ => true,
        });
    }
}

/// The key of a per-tool bucket.
pub fn tool_key(server: &str, tool: &str) -> String {
    format!("{server}\u{0}{tool}")
}

/// A per-server cap on calls in flight.
pub struct Concurrency {
    sem: Arc<Semaphore>,
    pub max: usize,
}

impl Concurrency {
    pub fn new(max: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, waiting at most `wait`; `None` when none freed up in time.
    pub async fn acquire(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        match self.sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => tokio::time::timeout(wait, self.sem.clone().acquire_owned())
                .await
                .ok()
                .and_then(Result::ok),
        }
    }

    pub fn in_use(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

/// "retry after 1.5 s" in words a model and a human can act on.
pub fn retry_hint(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("retry after {} ms", (s * 1000.0).ceil() as u64)
    } else {
        format!("retry after {:.1} s", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_trips_and_recovers_on_a_controlled_clock() {
        let l = RateLimiter::default();
        let limit = RateLimit {
            per_second: 2.0,
            burst: 3,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.take("caller", "alice", &limit, t0), Ok(()));
        }
        // The fourth call in the same instant is refused, with a wait of one token's refill time.
        let wait = l.take("caller", "alice", &limit, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        // Another caller has their own bucket.
        assert_eq!(l.take("caller", "bob", &limit, t0), Ok(()));
        // Just before the refill: still refused, with a shorter wait.
        let t1 = t0 + Duration::from_millis(400);
        let wait = l.take("caller", "alice", &limit, t1).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        // After it: one call passes, the next is refused again.
        let t2 = t0 + Duration::from_millis(500);
        assert_eq!(l.take("caller", "alice", &limit, t2), Ok(()));
        assert!(l.take("caller", "alice", &limit, t2).is_err());
        // A long pause refills to the burst, not beyond.
        let t3 = t2 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.take("caller", "alice", &limit, t3), Ok(()));
        }
        assert!(l.take("caller", "alice", &limit, t3).is_err());
    }

    #[test]
    fn forget_server_drops_its_buckets_only() {
        let l = RateLimiter::default();
        let limit = RateLimit {
            per_second: 1.0,
            burst: 1,
        };
        let t0 = Instant::now();
        l.take("server", "a", &limit, t0).unwrap();
        l.take("tool", &tool_key("a", "x"), &limit, t0).unwrap();
        l.take("server", "b", &limit, t0).unwrap();
        l.forget_server("a");
        assert!(l.take("server", "a", &limit, t0).is_ok());
        assert!(l.take("tool", &tool_key("a", "x"), &limit, t0).is_ok());
        assert!(l.take("server", "b", &limit, t0).is_err());
    }

    #[tokio::test]
    async fn concurrency_cap_waits_then_gives_up() {
        let c = Concurrency::new(1);
        let first = c.acquire(Duration::from_millis(10)).await;
        assert!(first.is_some());
        assert_eq!(c.in_use(), 1);
        assert!(c.acquire(Duration::from_millis(10)).await.is_none());
        drop(first);
        assert!(c.acquire(Duration::from_millis(10)).await.is_some());
    }

    #[test]
    fn hints() {
        assert_eq!(retry_hint(Duration::from_millis(250)), "retry after 250 ms");
        assert_eq!(retry_hint(Duration::from_millis(1500)), "retry after 1.5 s");
    }
}
