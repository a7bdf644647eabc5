//! Bounded, expiring memory of token verdicts.
//!
//! Every verdict the authenticator keeps (a verified JWT, an introspection answer, a refusal) lives in a
//! [`Verdicts`] map keyed by the SHA-256 of the token, so a heap dump or a debug print never holds a bearer
//! token, and with an entry cap, so a caller sending endless distinct tokens cannot grow memory.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use sha2::{Digest as _, Sha256};

/// The key every cache uses: SHA-256 of the token, never the token itself.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// A map from token digest to a verdict that expires, holding at most `cap` entries.
///
/// When full, expired entries go first; if that is not enough, the entries closest to expiry are evicted
/// (they are the least valuable) until a tenth of the room is free, so eviction is amortised over many
/// inserts. Concurrent inserts may pass the cap by the number of inserts racing at that moment, no more.
pub struct Verdicts<V> {
    map: DashMap<TokenDigest, (V, Instant)>,
    cap: usize,
}

impl<V: Clone> Verdicts<V> {
    pub fn new(cap: usize) -> Self {
        Self {
            map: DashMap::new(),
            cap: cap.max(1),
        }
    }

    /// The live verdict for `key`; an expired one is dropped.
    pub fn get(&self, key: &TokenDigest) -> Option<V> {
        let now = Instant::now();
        if let Some(hit) = self.map.get(key) {
            if hit.1 > now {
                return Some(hit.0.clone());
            }
        } else {
            return None;
        }
        self.map.remove_if(key, |_, (_, until)| *until <= now);
        None
    }

    /// Remember `value` for `ttl` (nothing is kept for a zero `ttl`).
    pub fn insert(&self, key: TokenDigest, value: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            self.make_room();
        }
        self.map.insert(key, (value, Instant::now() + ttl));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    fn make_room(&self) {
        let now = Instant::now();
        self.map.retain(|_, (_, until)| *until > now);
        let keep = self.cap - self.cap.div_ceil(10);
        if self.map.len() <= keep {
            return;
        }
        let mut by_expiry: Vec<(Instant, TokenDigest)> =
            self.map.iter().map(|e| (e.value().1, *e.key())).collect();
        let excess = by_expiry.len() - keep;
        by_expiry.select_nth_unstable(excess - 1);
        for (_, key) in &by_expiry[..excess] {
            self.map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> TokenDigest {
        digest(&format!("token-{n}"))
    }

    #[test]
    fn verdicts_expire() {
        let v = Verdicts::new(10);
        v.insert(key(1), "a", Duration::from_secs(60));
        v.insert(key(2), "b", Duration::from_nanos(1));
        v.insert(key(3), "c", Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(v.get(&key(1)), Some("a"));
        assert_eq!(v.get(&key(2)), None);
        assert_eq!(v.get(&key(3)), None);
        assert_eq!(v.len(), 1, "the expired entry is dropped when read");
    }

    #[test]
    fn verdicts_stay_under_their_cap_and_keep_the_longest_lived() {
        let v = Verdicts::new(100);
        // One long-lived verdict, then a flood of short-lived ones.
        v.insert(key(0), 0, Duration::from_secs(3600));
        for n in 1..1000 {
            v.insert(key(n), n, Duration::from_secs(10 + u64::from(n % 7)));
            assert!(v.len() <= 100, "{} entries after {n} inserts", v.len());
        }
        assert_eq!(
            v.get(&key(0)),
            Some(0),
            "the entry furthest from expiry survives eviction"
        );
        assert_eq!(v.get(&key(999)), Some(999), "the newest entry is kept");
    }
}
