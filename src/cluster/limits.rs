//! Rate limits and concurrency caps shared by every instance, in Redis.
//!
//! Each check is one Lua script, so it is atomic however many instances run it at once, and it
//! reads the time from Redis (`TIME`), so the instances' clocks do not matter.
//!
//! - Rate limits: GCRA, the token bucket of [`RateLimiter::take`] stored as one number (the
//!   "theoretical arrival time": when the bucket is full again). Key `mcpb:rl:{scope}:{digest}`, the
//!   digest of the bucket's key (a caller's `sub` is the caller's to choose: hashed, it can neither
//!   collide with another bucket nor inject key syntax). The key expires when the bucket is full,
//!   so idle buckets vanish.
//! - Concurrency caps: `mcpb:cc:{server}` (server names are config-validated `[A-Za-z0-9_-]`), a
//!   sorted set of lease ids scored by their expiry (Redis time, ms). Acquiring drops expired
//!   leases, then adds one if fewer than the cap remain. A lease lasts the call's timeout plus
//!   [`LEASE_MARGIN`], renewed while its call runs (timeouts are idle timeouts: a call that reports
//!   progress may outlive one), and released on drop; an instance that dies stops renewing, so its
//!   leases expire and none leak.
//!
//! [`take_token`] and [`acquire_slot`] choose: Redis while the cluster is up, and the instance's
//! local [`RateLimiter`] / [`Concurrency`] when there is no cluster, it is down, or a command
//! fails (then each instance limits on its own, so the effective limit is up to N× the configured
//! one until Redis is back).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use tokio::sync::OwnedSemaphorePermit;

use super::{Cluster, ClusterError, PREFIX, redis_err};
use crate::config::RateLimit;
use crate::limits::{Concurrency, RateLimiter};

/// How much longer than its call's timeout a lease lives (the call's own bookkeeping, clock skew
/// between Redis and the renewal timer).
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// First pause between two tries for a slot; doubles up to [`POLL_MAX`].
const POLL_MIN: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(50);
/// At most one "limits are local" warning per this period.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// GCRA. KEYS[1] the bucket; ARGV[1] microseconds per token, ARGV[2] burst. Returns 0 (a token
/// was taken) or the microseconds until one is available.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local next_tat = tat + interval
local over = next_tat - now - burst * interval
-- (a microsecond of slack for the rounding of fractional intervals)
if over >= 1 then
  return math.ceil(over)
end
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.max(1, math.ceil((next_tat - now) / 1000)))
return 0
",
    )
});

/// KEYS[1] the server's leases; ARGV[1] the cap, ARGV[2] the lease's lifetime (ms), ARGV[3] its
/// id. Returns 1 (leased) or 0 (full).
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
",
    )
});

/// KEYS[1] the server's leases; ARGV[1] the lifetime from now (ms), ARGV[2] the lease id. Extends
/// a lease that still exists (an expired one stays gone: its slot may be someone else's now).
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', string.format('%.0f', now + ttl), ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return n
",
    )
});

/// The Redis key of a rate-limit bucket.
pub fn bucket_key(scope: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("{PREFIX}rl:{scope}:{}", crate::hex(&digest[..16]))
}

/// The Redis key of a server's concurrency leases.
pub fn leases_key(server: &str) -> String {
    format!("{PREFIX}cc:{server}")
}

impl Cluster {
    /// One token from the cluster-wide `(scope, key)` bucket: `Ok(Ok(()))`, or `Ok(Err(wait))`
    /// until one is available; `Err` when Redis did not answer.
    pub async fn take_token(
        &self,
        scope: &str,
        key: &str,
        limit: &RateLimit,
    ) -> Result<Result<(), Duration>, ClusterError> {
        let interval_us = 1e6 / limit.per_second;
        let mut c = self.conn();
        let wait_us: u64 = TAKE
            .key(bucket_key(scope, key))
            .arg(interval_us)
            .arg(limit.burst)
            .invoke_async(&mut c)
            .await
            .map_err(redis_err("rate limit"))?;
        Ok(match wait_us {
            0 => Ok(()),
            us => Err(Duration::from_micros(us).max(Duration::from_millis(1))),
        })
    }

    /// A cluster-wide slot of `server` (at most `max` at once), waiting at most `wait`; `Ok(None)`
    /// when none freed up in time. The lease lives `ttl` and is renewed while the guard lives.
    pub async fn lease(
        &self,
        server: &str,
        max: usize,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lease>, ClusterError> {
        let key = leases_key(server);
        let mut id = [0u8; 12];
        getrandom::fill(&mut id)?;
        let id = crate::hex(&id);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let deadline = Instant::now() + wait;
        let mut pause = POLL_MIN;
        let mut c = self.conn();
        loop {
            let got: u8 = ACQUIRE
                .key(&key)
                .arg(max)
                .arg(ttl_ms)
                .arg(&id)
                .invoke_async(&mut c)
                .await
                .map_err(redis_err("concurrency lease"))?;
            if got == 1 {
                return Ok(Some(Lease::new(c, key, id, ttl)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// How many leases of `server` are live now (for tests and diagnostics).
    pub async fn leases(&self, server: &str) -> Result<usize, ClusterError> {
        let mut c = self.conn();
        let t: (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .map_err(redis_err("time"))?;
        let now_ms = t.0 * 1000 + t.1 / 1000;
        redis::cmd("ZCOUNT")
            .arg(leases_key(server))
            .arg(format!("({now_ms}"))
            .arg("+inf")
            .query_async(&mut c)
            .await
            .map_err(redis_err("count leases"))
    }
}

/// A held cluster-wide slot. Dropping it releases the slot (in the background: `Drop` does not
/// wait for Redis; if the release fails, the lease expires by itself).
pub struct Lease {
    conn: ConnectionManager,
    key: String,
    id: String,
    /// Renews the lease every half lifetime while the call runs; stopped on drop. It dies with the
    /// instance, which is what lets a dead instance's leases expire.
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    fn new(conn: ConnectionManager, key: String, id: String, ttl: Duration) -> Self {
        let renew = tokio::spawn({
            let mut c = conn.clone();
            let (key, id) = (key.clone(), id.clone());
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            async move {
                loop {
                    tokio::time::sleep(ttl / 2).await;
                    let r: Result<u8, _> = RENEW
                        .key(&key)
                        .arg(ttl_ms)
                        .arg(&id)
                        .invoke_async(&mut c)
                        .await;
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "cluster: cannot renew a concurrency lease");
                    }
                }
            }
        });
        Self {
            conn,
            key,
            id,
            renew,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut c = self.conn.clone();
        let key = std::mem::take(&mut self.key);
        let id = std::mem::take(&mut self.id);
        rt.spawn(async move {
            let r: Result<u8, _> = redis::cmd("ZREM").arg(&key).arg(&id).query_async(&mut c).await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "cluster: cannot release a concurrency lease; it expires by itself");
            }
        });
    }
}

/// What holds a concurrency slot until the call ends.
pub enum Permit {
    Local(OwnedSemaphorePermit),
    Global(Lease),
}

/// One token from the `(scope, key)` bucket: cluster-wide while Redis answers, else from this
/// instance's `local` buckets. `Err` is the wait until a token is available.
pub async fn take_token(
    cluster: Option<&Cluster>,
    local: &RateLimiter,
    scope: &'static str,
    key: &str,
    limit: &RateLimit,
) -> Result<(), Duration> {
    if let Some(c) = cluster {
        if c.is_up() {
            match c.take_token(scope, key, limit).await {
                Ok(r) => return r,
                Err(e) => fell_back("rate limit", Some(&e)),
            }
        } else {
            fell_back("rate limit", None);
        }
    }
    local.take(scope, key, limit, Instant::now())
}

/// A slot of `server`, waiting at most `wait`: cluster-wide while Redis answers (a lease of
/// `timeout` + [`LEASE_MARGIN`]), else from this instance's `local` semaphore. `None` when none
/// freed up in time.
pub async fn acquire_slot(
    cluster: Option<&Cluster>,
    local: &Concurrency,
    server: &str,
    timeout: Duration,
    wait: Duration,
) -> Option<Permit> {
    let start = Instant::now();
    if let Some(c) = cluster {
        if c.is_up() {
            match c
                .lease(server, local.max, timeout + LEASE_MARGIN, wait)
                .await
            {
                Ok(lease) => return lease.map(Permit::Global),
                Err(e) => fell_back("concurrency cap", Some(&e)),
            }
        } else {
            fell_back("concurrency cap", None);
        }
    }
    let left = wait.saturating_sub(start.elapsed());
    local.acquire(left).await.map(Permit::Local)
}

/// Milliseconds since [`EPOCH`] of the last "limits are local" warning (0: never).
static LAST_WARNING: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A limit checked locally although `[cluster]` is set: counted, and warned about at most once
/// per [`WARN_EVERY`].
fn fell_back(what: &'static str, error: Option<&ClusterError>) {
    crate::metrics::global().limit_fallback();
    let now = u64::try_from(EPOCH.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let last = LAST_WARNING.load(Ordering::Relaxed);
    let every = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
    if (last != 0 && now.saturating_sub(last) < every)
        || LAST_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    match error {
        Some(e) => {
            tracing::warn!(error = %e, limit = what, "cluster: Redis failed; limits and caps are per instance until it answers")
        }
        None => tracing::warn!(
            limit = what,
            "cluster: Redis unreachable; limits and caps are per instance until it is back"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_hash_what_callers_choose() {
        let k = bucket_key("caller", "alice");
        assert!(k.starts_with("mcpb:rl:caller:"), "{k}");
        assert_eq!(k.len(), "mcpb:rl:caller:".len() + 32);
        assert_eq!(k, bucket_key("caller", "alice"));
        // Key syntax in a subject stays out of the key, and near-identical subjects do not collide.
        let odd = bucket_key("caller", "alice:*\r\n{x}");
        assert!(!odd.contains("alice") && !odd.contains('*') && !odd.contains('\n'));
        assert_ne!(
            bucket_key("caller", "alice"),
            bucket_key("caller", "alice ")
        );
        // Scopes are apart even for the same key.
        assert_ne!(bucket_key("server", "a"), bucket_key("caller", "a"));
        assert_eq!(leases_key("ledger"), "mcpb:cc:ledger");
    }
}
