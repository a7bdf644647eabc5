//! `[cluster] share_credentials = true`: exchanged tokens and Vault secrets one instance fetched are
//! found by the others in Redis, so a caller moving between instances costs one exchange, not one
//! per instance.
//!
//! The in-memory caches stay in front: Redis is asked only on a local miss, and written after a
//! fetch. Each entry is `mcpb:cred:{hex}`, where `hex` is a SHA-256 keyed by the cluster secret over
//! the cache key's parts (so the name shows no subject, token or path, and cannot be confirmed by
//! hashing a guess); its value is sealed ([`crate::cluster::sealed`]) and bound to that name; it
//! expires when the local entry would. Redis unreachable, slow, or holding what does not open (the
//! secret was rotated) is a miss: the broker behaves as without sharing, and says so at most every
//! [`WARN_EVERY`].

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::cluster::sealed::Sealer;
use crate::cluster::{Cluster, PREFIX};

/// Longest wait for Redis before going on without it (a local miss goes to the network anyway).
const OP_TIMEOUT: Duration = Duration::from_millis(1000);
/// At most one warning about the shared cache per this long.
const WARN_EVERY: Duration = Duration::from_secs(30);
/// What the naming key is for (a different label from the sealing key's).
const NAMES: &[u8] = b"mcp-broker credential names v1\0";

/// A value read back from Redis, with how long it has left there.
pub(super) struct Shared {
    pub value: Vec<u8>,
    pub left: Duration,
}

pub struct SharedCache {
    cluster: Arc<Cluster>,
    sealer: Sealer,
    /// Keys the hash that names entries: without the secret, a name cannot be matched to a guessed
    /// subject (emails are guessable, tokens' digests are not worth leaking either).
    names: [u8; 32],
    /// When the last warning was logged: an outage warns every [`WARN_EVERY`], not per request.
    warned: Mutex<Option<Instant>>,
}

impl SharedCache {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let secret = cluster.config.secret_key.expose();
        let names = Sha256::new()
            .chain_update(NAMES)
            .chain_update(secret.as_bytes())
            .finalize()
            .into();
        Self {
            sealer: Sealer::new(secret),
            names,
            cluster,
            warned: Mutex::new(None),
        }
    }

    /// The Redis key for a cache key made of `parts` (length-prefixed, so parts cannot run into
    /// each other).
    pub(super) fn key(&self, parts: &[&[u8]]) -> String {
        let mut h = Sha256::new().chain_update(self.names);
        for p in parts {
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        format!("{PREFIX}cred:{}", crate::hex(&h.finalize()))
    }

    /// The entry stored under `key`, if there is one that opens and has time left.
    pub(super) async fn get(&self, key: &str) -> Option<Shared> {
        if !self.cluster.is_up() {
            return None;
        }
        let mut c = self.cluster.conn();
        let mut pipe = redis::pipe();
        pipe.get(key).pttl(key);
        let read = pipe.query_async::<(Option<String>, i64)>(&mut c);
        let (text, pttl) = match tokio::time::timeout(OP_TIMEOUT, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.warn(&format!("Redis: {e}"));
                return None;
            }
            Err(_) => {
                self.warn("Redis did not answer in time");
                return None;
            }
        };
        let text = text?;
        // -1: no expiry (not written by us); -2: gone meanwhile.
        let left = Duration::from_millis(u64::try_from(pttl).ok().filter(|&ms| ms > 0)?);
        match self.sealer.open(key.as_bytes(), &text) {
            Ok(value) => Some(Shared { value, left }),
            Err(_) => {
                // Rotated secret_key (or a value not written by a broker): fetched again, and
                // overwritten.
                self.warn("a shared credential does not open (was [cluster] secret_key changed?)");
                None
            }
        }
    }

    /// Store `value` sealed under `key` for `ttl` (nothing under a millisecond).
    pub(super) async fn put(&self, key: &str, value: &[u8], ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ms == 0 || !self.cluster.is_up() {
            return;
        }
        let text = match self.sealer.seal(key.as_bytes(), value) {
            Ok(t) => t,
            Err(e) => {
                self.warn(&e.to_string());
                return;
            }
        };
        let mut c = self.cluster.conn();
        let mut set = redis::cmd("SET");
        set.arg(key).arg(text).arg("PX").arg(ms);
        let write = set.query_async::<()>(&mut c);
        match tokio::time::timeout(OP_TIMEOUT, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.warn(&format!("Redis: {e}")),
            Err(_) => self.warn("Redis did not answer in time"),
        }
    }

    /// `why` never holds a secret: Redis errors name commands and keys, and keys are digests.
    fn warn(&self, why: &str) {
        let now = Instant::now();
        let Ok(mut last) = self.warned.lock() else {
            return;
        };
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return;
        }
        *last = Some(now);
        tracing::warn!(
            reason = why,
            "shared credential cache unavailable; using this instance's cache only"
        );
    }
}
