//! Authorizations in progress: rmcp's PKCE state by `state` value (the [`StateStore`] it asks),
//! plus what the broker was doing when it redirected (signing a user in, or connecting them to an
//! upstream). Each entry is used once (a replayed or altered `state` finds nothing) and expires with
//! the consent link. Bounded in process; under `[cluster]` kept in Redis instead (sealed with the
//! cluster key, under a digest of the state), so the browser's callback may reach any instance.
//!
//! Consent links carry a sealed [`Ticket`]: who the link is for, which server, until when.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use rmcp::transport::auth::{AuthError, StateStore, StoredAuthorizationState};
use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::cluster::sealed::Sealer;

/// Most authorizations in progress at once (a flood of /oauth/start costs a bounded amount).
pub const MAX_FLOWS: usize = 10_000;

/// What the broker does when the authorization server redirects back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Purpose {
    /// The browser's user signs in at `[auth] issuer`; proceed only if they are `ticket.sub`.
    SignIn { ticket: Ticket },
    /// `sub` authorizes the broker at `server`'s authorization server.
    Connect {
        sub: String,
        server: String,
        client_id: String,
        client_secret: Option<String>,
    },
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    state: Option<StoredAuthorizationState>,
    purpose: Option<Purpose>,
    /// A hash of the browser cookie the flow was started with: the callback must come from the
    /// same browser.
    browser: Option<String>,
    #[serde(skip, default = "Instant::now")]
    until: Instant,
}

#[derive(Clone)]
pub struct Flows {
    inner: Arc<DashMap<String, Entry>>,
    ttl: Duration,
    /// Weak: the process-wide engine must not keep a broker's Redis connections alive.
    cluster: Arc<std::sync::RwLock<std::sync::Weak<Cluster>>>,
}

impl Flows {
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::new(DashMap::new()),
            ttl,
            cluster: Arc::new(std::sync::RwLock::new(std::sync::Weak::new())),
        }
    }

    /// Under `[cluster]`: keep flows in Redis.
    pub fn use_cluster(&self, c: &Arc<Cluster>) {
        if let Ok(mut slot) = self.cluster.write() {
            *slot = Arc::downgrade(c);
        }
    }

    fn shared(&self) -> Option<Arc<Cluster>> {
        self.cluster.read().ok().and_then(|c| c.upgrade())
    }

    fn key(state: &str) -> String {
        use sha2::Digest;
        format!(
            "mcpb:oauth:{}",
            crate::hex(&sha2::Sha256::digest(state.as_bytes()))
        )
    }

    async fn load_shared(c: &Cluster, key: &str) -> Result<Option<Entry>, String> {
        let mut conn = c.conn();
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        let get = cmd.query_async::<Option<String>>(&mut conn);
        let text = tokio::time::timeout(Duration::from_secs(2), get)
            .await
            .map_err(|_| "Redis did not answer in time".to_string())?
            .map_err(|e| format!("Redis: {e}"))?;
        let Some(text) = text else { return Ok(None) };
        let plain = c
            .sealer
            .open(key.as_bytes(), &text)
            .map_err(|_| "an authorization in progress does not open".to_string())?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    async fn store_shared(&self, c: &Cluster, key: &str, e: &Entry) -> Result<(), String> {
        let plain = serde_json::to_vec(e).map_err(|e| e.to_string())?;
        let text = c
            .sealer
            .seal(key.as_bytes(), &plain)
            .map_err(|e| e.to_string())?;
        let mut conn = c.conn();
        let mut set = redis::cmd("SET");
        set.arg(key)
            .arg(text)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64);
        tokio::time::timeout(Duration::from_secs(2), set.query_async::<()>(&mut conn))
            .await
            .map_err(|_| "Redis did not answer in time".to_string())?
            .map_err(|e| format!("Redis: {e}"))
    }

    async fn delete_shared(c: &Cluster, key: &str) {
        let mut conn = c.conn();
        let mut cmd = redis::cmd("DEL");
        cmd.arg(key);
        let del = cmd.query_async::<i64>(&mut conn);
        let _ = tokio::time::timeout(Duration::from_secs(2), del).await;
    }

    fn sweep(&self) {
        let now = Instant::now();
        self.inner.retain(|_, e| e.until > now);
    }

    /// Room for one more flow?
    pub fn has_room(&self) -> bool {
        if self.inner.len() >= MAX_FLOWS {
            self.sweep();
        }
        self.inner.len() < MAX_FLOWS
    }

    /// Record what `state` is for (after rmcp saved its PKCE state under it).
    pub async fn attach(&self, state: &str, purpose: Purpose, browser: &str) -> Result<(), String> {
        if let Some(c) = self.shared() {
            let key = Self::key(state);
            let mut e = Self::load_shared(&c, &key).await?.unwrap_or(Entry {
                state: None,
                purpose: None,
                browser: None,
                until: Instant::now(),
            });
            e.purpose = Some(purpose);
            e.browser = Some(browser.to_string());
            return self.store_shared(&c, &key, &e).await;
        }
        let until = Instant::now() + self.ttl;
        let mut e = self.inner.entry(state.to_string()).or_insert(Entry {
            state: None,
            purpose: None,
            browser: None,
            until,
        });
        e.purpose = Some(purpose);
        e.browser = Some(browser.to_string());
        Ok(())
    }

    /// The purpose of `state`, once: a second callback with it finds nothing. `browser` must be
    /// the one the flow started in.
    pub async fn take(&self, state: &str, browser: &str) -> Result<Purpose, &'static str> {
        if let Some(c) = self.shared() {
            let key = Self::key(state);
            let mut e = Self::load_shared(&c, &key)
                .await
                .map_err(|_| "the authorization could not be looked up (Redis)")?
                .ok_or("unknown, used or expired state")?;
            if e.browser.as_deref() != Some(browser) {
                return Err("this authorization was started in another browser");
            }
            let purpose = e.purpose.take().ok_or("unknown, used or expired state")?;
            self.store_shared(&c, &key, &e)
                .await
                .map_err(|_| "the authorization could not be updated (Redis)")?;
            return Ok(purpose);
        }
        let mut e = self
            .inner
            .get_mut(state)
            .ok_or("unknown, used or expired state")?;
        if e.until <= Instant::now() {
            drop(e);
            self.inner.remove(state);
            return Err("unknown, used or expired state");
        }
        if e.browser.as_deref() != Some(browser) {
            return Err("this authorization was started in another browser");
        }
        e.purpose.take().ok_or("unknown, used or expired state")
    }

    pub async fn forget(&self, state: &str) {
        if let Some(c) = self.shared() {
            Self::delete_shared(&c, &Self::key(state)).await;
            return;
        }
        self.inner.remove(state);
    }
}

#[async_trait]
impl StateStore for Flows {
    async fn save(&self, csrf: &str, state: StoredAuthorizationState) -> Result<(), AuthError> {
        if let Some(c) = self.shared() {
            let e = Entry {
                state: Some(state),
                purpose: None,
                browser: None,
                until: Instant::now(),
            };
            return self
                .store_shared(&c, &Self::key(csrf), &e)
                .await
                .map_err(AuthError::InternalError);
        }
        if !self.has_room() {
            return Err(AuthError::InternalError(
                "too many authorizations in progress".into(),
            ));
        }
        let until = Instant::now() + self.ttl;
        self.inner
            .entry(csrf.to_string())
            .or_insert(Entry {
                state: None,
                purpose: None,
                browser: None,
                until,
            })
            .state = Some(state);
        Ok(())
    }

    async fn load(&self, csrf: &str) -> Result<Option<StoredAuthorizationState>, AuthError> {
        if let Some(c) = self.shared() {
            return Self::load_shared(&c, &Self::key(csrf))
                .await
                .map(|e| e.and_then(|e| e.state))
                .map_err(AuthError::InternalError);
        }
        Ok(self
            .inner
            .get(csrf)
            .filter(|e| e.until > Instant::now())
            .and_then(|e| e.state.clone()))
    }

    async fn delete(&self, csrf: &str) -> Result<(), AuthError> {
        if let Some(c) = self.shared() {
            Self::delete_shared(&c, &Self::key(csrf)).await;
            return Ok(());
        }
        self.inner.remove(csrf);
        Ok(())
    }
}

/// A consent link's content: made for one caller and one server, valid until `exp` (unix secs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ticket {
    pub sub: String,
    pub server: String,
    pub exp: u64,
    /// The elicitation this link answers (for `notifications/elicitation/complete`).
    #[serde(default)]
    pub elicitation: Option<String>,
}

const TICKET_AAD: &[u8] = b"mcp-broker oauth link v1";

impl Ticket {
    pub fn seal(&self, sealer: &Sealer) -> Option<String> {
        let json = serde_json::to_vec(self).ok()?;
        sealer.seal(TICKET_AAD, &json).ok()
    }

    pub fn open(sealer: &Sealer, text: &str, now: u64) -> Result<Self, &'static str> {
        if text.len() > 4096 {
            return Err("link too long");
        }
        let bytes = sealer
            .open(TICKET_AAD, text)
            .map_err(|_| "this link is not valid (altered, or made by another broker)")?;
        let t: Ticket = serde_json::from_slice(&bytes).map_err(|_| "this link is not valid")?;
        if t.exp <= now {
            return Err("this link has expired: call the tool again for a new one");
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_sealed_and_expire() {
        let s = Sealer::new("0123456789abcdef0123456789abcdef");
        let t = Ticket {
            sub: "alice".into(),
            server: "crm".into(),
            exp: 100,
            elicitation: None,
        };
        let text = t.seal(&s).unwrap();
        assert_eq!(Ticket::open(&s, &text, 50).unwrap().sub, "alice");
        assert!(Ticket::open(&s, &text, 100).is_err());
        let other = Sealer::new("fedcba9876543210fedcba9876543210");
        assert!(Ticket::open(&other, &text, 50).is_err());
        let mut bad = text.clone();
        bad.replace_range(10..11, if &text[10..11] == "A" { "B" } else { "A" });
        assert!(Ticket::open(&s, &bad, 50).is_err());
    }

    #[tokio::test]
    async fn a_state_is_used_once_and_only_from_its_browser() {
        let f = Flows::new(Duration::from_secs(60));
        let p = Purpose::Connect {
            sub: "a".into(),
            server: "s".into(),
            client_id: "c".into(),
            client_secret: None,
        };
        f.attach("st", p, "b1").await.unwrap();
        assert!(f.take("st", "b2").await.is_err());
        assert!(f.take("st", "b1").await.is_ok());
        assert!(f.take("st", "b1").await.is_err());
        assert!(f.take("nope", "b1").await.is_err());
    }
}
