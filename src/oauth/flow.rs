//! Authorizations in progress: rmcp's PKCE state by `state` value (the [`StateStore`] it asks),
//! plus what the broker was doing when it redirected (signing a user in, or connecting them to an
//! upstream). Each entry is used once (a replayed or altered `state` finds nothing) and expires with
//! the consent link. Bounded; kept in this process.
//!
//! Consent links carry a sealed [`Ticket`]: who the link is for, which server, until when.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use rmcp::transport::auth::{AuthError, StateStore, StoredAuthorizationState};
use serde::{Deserialize, Serialize};

use crate::cluster::sealed::Sealer;

/// Most authorizations in progress at once (a flood of /oauth/start costs a bounded amount).
pub const MAX_FLOWS: usize = 10_000;

/// What the broker does when the authorization server redirects back.
#[derive(Clone, Debug)]
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

struct Entry {
    state: Option<StoredAuthorizationState>,
    purpose: Option<Purpose>,
    /// A hash of the browser cookie the flow was started with: the callback must come from the
    /// same browser.
    browser: Option<String>,
    until: Instant,
}

#[derive(Clone)]
pub struct Flows {
    inner: Arc<DashMap<String, Entry>>,
    ttl: Duration,
}

impl Flows {
    pub fn new(ttl: Duration) -> Self {
        Self {
            inner: Arc::new(DashMap::new()),
            ttl,
        }
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
    pub fn attach(&self, state: &str, purpose: Purpose, browser: &str) {
        let until = Instant::now() + self.ttl;
        let mut e = self.inner.entry(state.to_string()).or_insert(Entry {
            state: None,
            purpose: None,
            browser: None,
            until,
        });
        e.purpose = Some(purpose);
        e.browser = Some(browser.to_string());
    }

    /// The purpose of `state`, once: a second callback with it finds nothing. `browser` must be
    /// the one the flow started in.
    pub fn take(&self, state: &str, browser: &str) -> Result<Purpose, &'static str> {
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

    pub fn forget(&self, state: &str) {
        self.inner.remove(state);
    }
}

#[async_trait]
impl StateStore for Flows {
    async fn save(&self, csrf: &str, state: StoredAuthorizationState) -> Result<(), AuthError> {
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
        Ok(self
            .inner
            .get(csrf)
            .filter(|e| e.until > Instant::now())
            .and_then(|e| e.state.clone()))
    }

    async fn delete(&self, csrf: &str) -> Result<(), AuthError> {
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
        f.attach("st", p, "b1");
        assert!(f.take("st", "b2").is_err());
        assert!(f.take("st", "b1").is_ok());
        assert!(f.take("st", "b1").is_err());
        assert!(f.take("nope", "b1").is_err());
    }
}
