//! RFC 7662 introspection of opaque tokens, with its cost bounded per token.
//!
//! An introspection call is a request to the authorization server made on a caller's behalf, so a caller
//! could use the broker to flood it (one call per request with a made-up token). Three rules bound that:
//! - an active token's caller is reused for [`ACTIVE_TTL`] (never past its `exp`);
//! - a token found not valid (inactive, another issuer or audience, no usable subject) is refused from
//!   memory for [`REFUSED_TTL`];
//! - one call per token is in flight at a time (single flight): concurrent requests with the same token
//!   wait for that call's answer, and at most [`IN_FLIGHT_MAX`] distinct tokens are being asked about at
//!   once (give or take requests racing for the last slot; beyond that the request is answered
//!   "unavailable" rather than queued at the server).
//!
//! A failure to reach the server (network, HTTP error, not JSON) says nothing about the token, so it is
//! shared with the requests waiting on that call but never remembered.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::cache::{TokenDigest, digest};
use super::{AuthError, Authenticator, Caller, audience_matches, invalid};

/// How long an active token's introspection answer is reused (never past the token's `exp`).
pub const ACTIVE_TTL: Duration = Duration::from_secs(30);
/// How long a token found not valid is refused without asking again.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Entry cap of each of the two answer caches.
pub const CACHE_MAX: usize = 10_000;
/// Distinct tokens whose introspection may be under way at once.
pub const IN_FLIGHT_MAX: usize = 256;

/// What one introspection call concluded; cloned to every request that waited for it.
#[derive(Clone)]
pub enum Answer {
    Active(Caller),
    /// The token is not valid here (the text is safe to show).
    Refused(String),
    /// The server could not be asked; says nothing about the token.
    Unavailable(String),
}

/// The call a group of concurrent requests for one token share: whoever gets there first makes it, the
/// others await the same cell (tokio's `OnceCell` hands the work to a waiter if the first one is cancelled).
pub type InFlight = Arc<tokio::sync::OnceCell<Answer>>;

impl Authenticator {
    pub(super) async fn introspect(&self, token: &str) -> Result<Caller, AuthError> {
        let key = digest(token);
        let answer = match self.remembered(&key) {
            Some(a) => a,
            None => {
                if !self.in_flight.contains_key(&key) && self.in_flight.len() >= IN_FLIGHT_MAX {
                    return Err(AuthError::Unavailable(
                        "too many token introspections are under way; retry shortly".into(),
                    ));
                }
                let cell: InFlight = self.in_flight.entry(key).or_default().clone();
                let answer = cell.get_or_init(|| self.ask(token, key)).await.clone();
                // Every waiter tries; only the entry that is still this call's cell is removed.
                self.in_flight.remove_if(&key, |_, c| Arc::ptr_eq(c, &cell));
                answer
            }
        };
        match answer {
            Answer::Active(caller) => Ok(caller),
            Answer::Refused(why) => Err(invalid(why)),
            Answer::Unavailable(why) => Err(AuthError::Unavailable(why)),
        }
    }

    fn remembered(&self, key: &TokenDigest) -> Option<Answer> {
        if let Some(caller) = self.introspected.get(key) {
            return Some(Answer::Active(caller));
        }
        self.refused.get(key).map(Answer::Refused)
    }

    /// One introspection call, its answer remembered before the waiters are released (so a request that
    /// arrives just after finds it in memory rather than starting a second call).
    async fn ask(&self, token: &str, key: TokenDigest) -> Answer {
        // A call that finished between our cache check and taking the cell has already answered.
        if let Some(a) = self.remembered(&key) {
            return a;
        }
        match self.call_introspection(token).await {
            Ok((caller, ttl)) => {
                self.introspected
                    .insert(key, caller.clone(), ttl.min(ACTIVE_TTL));
                Answer::Active(caller)
            }
            Err(AuthError::Unavailable(why)) => Answer::Unavailable(why),
            Err(refusal) => {
                let why = refusal.to_string();
                self.refused.insert(key, why.clone(), REFUSED_TTL);
                Answer::Refused(why)
            }
        }
    }

    /// The RFC 7662 request and the checks on its answer: the caller and how long the token lives.
    async fn call_introspection(&self, token: &str) -> Result<(Caller, Duration), AuthError> {
        let Some(cfg) = &self.config.introspection else {
            return Err(AuthError::Unavailable(
                "introspection is not configured".into(),
            ));
        };
        let resp = self
            .http
            .post(cfg.endpoint.as_str())
            .basic_auth(&cfg.client_id, Some(cfg.client_secret.expose()))
            .form(&[("token", token), ("token_type_hint", "access_token")])
            .send()
            .await
            .map_err(|e| AuthError::Unavailable(format!("introspection: {e}")))?;
        if !resp.status().is_success() {
            return Err(AuthError::Unavailable(format!(
                "introspection: HTTP {}",
                resp.status()
            )));
        }
        let claims: Map<String, Value> = resp
            .json()
            .await
            .map_err(|e| AuthError::Unavailable(format!("introspection: {e}")))?;
        if claims.get("active").and_then(Value::as_bool) != Some(true) {
            return Err(invalid("the token is not active"));
        }
        if let Some(iss) = claims.get("iss").and_then(Value::as_str)
            && iss != self.config.issuer
        {
            return Err(invalid("the token was issued by another issuer"));
        }
        if claims.contains_key("aud") && !audience_matches(claims.get("aud"), &self.config.audience)
        {
            return Err(invalid("the token was not issued for this resource (aud)"));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ttl = match claims.get("exp").and_then(Value::as_u64) {
            Some(exp) => Duration::from_secs(exp.saturating_sub(now)),
            None => ACTIVE_TTL,
        };
        let caller = self.caller_from(claims)?;
        Ok((caller, ttl))
    }
}
