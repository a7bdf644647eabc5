//! RFC 8693 token exchange: the caller's validated token in, a token for one upstream out.
//!
//! Results are cached by (subject token digest, audience, scope) until the token's expiry minus a
//! safety margin (and at most the configured `ttl`); concurrent identical requests wait on one lock
//! per key, so they share a single exchange. With `actor = "client_credentials"` the broker's own
//! client-credentials token goes along as `actor_token` (delegation: the result carries `act`).
//! With [`SharedCache`], a local miss looks in Redis before the token endpoint, and what the
//! endpoint issues is written there too, until the same expiry.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CredentialError;
use super::shared::SharedCache;
use crate::config::{ExchangeConfig, Secret};

const GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Reuse a token until this long before it expires, or a tenth of its life, whichever is smaller.
const SAFETY_MARGIN: Duration = Duration::from_secs(30);
/// Assumed lifetime when the response has no `expires_in`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 10_000;

type Key = ([u8; 32], String, String);

#[derive(Clone)]
struct Cached {
    token: Secret,
    issued: Instant,
    /// The token's own expiry minus the safety margin.
    until: Instant,
}

impl Cached {
    /// Usable now by a server whose `ttl` caps reuse (servers sharing an audience may differ).
    fn fresh_for(&self, ttl: Option<Duration>) -> bool {
        let now = Instant::now();
        self.until > now && ttl.is_none_or(|t| self.issued + t > now)
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// An exchanged token as stored (sealed) in Redis; its expiry is the key's.
#[derive(Serialize, Deserialize)]
struct SharedToken {
    token: String,
    /// When it was issued (Unix milliseconds): a server's `ttl` caps reuse from then, whichever
    /// instance exchanged it.
    issued_ms: u64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub struct TokenExchange {
    cfg: ExchangeConfig,
    http: reqwest::Client,
    cache: DashMap<Key, Slot>,
    /// The broker's own token for `actor_token`.
    actor: tokio::sync::Mutex<Option<Cached>>,
    /// Requests actually sent to the token endpoint (a metric, and the single-flight test's probe).
    pub requests: std::sync::atomic::AtomicU64,
    /// `[cluster] share_credentials`: the cache behind the local one, shared with other instances.
    shared: Option<Arc<SharedCache>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    issued_token_type: Option<String>,
    token_type: Option<String>,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    error_description: Option<String>,
}

impl TokenExchange {
    pub fn new(cfg: ExchangeConfig, http: reqwest::Client) -> Self {
        Self {
            cfg,
            http,
            cache: DashMap::new(),
            actor: tokio::sync::Mutex::new(None),
            requests: Default::default(),
            shared: None,
        }
    }

    /// Share exchanged tokens with the other instances (`[cluster] share_credentials`).
    pub fn with_shared(mut self, shared: Option<Arc<SharedCache>>) -> Self {
        self.shared = shared;
        self
    }

    /// The Redis key of a cache entry: this store (endpoint, client, actor) and the local key.
    fn shared_key(&self, shared: &SharedCache, key: &Key) -> String {
        shared.key(&[
            b"token_exchange",
            self.cfg.token_endpoint.as_str().as_bytes(),
            self.cfg.client_id.as_bytes(),
            &[u8::from(self.cfg.actor)],
            &key.0,
            key.1.as_bytes(),
            key.2.as_bytes(),
        ])
    }

    /// A usable token another instance (or this one, earlier) stored.
    async fn shared_get(
        &self,
        shared: &SharedCache,
        name: &str,
        ttl: Option<Duration>,
    ) -> Option<Cached> {
        let hit = shared.get(name).await?;
        let stored: SharedToken = serde_json::from_slice(&hit.value).ok()?;
        let now = Instant::now();
        let age =
            Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(stored.issued_ms));
        let c = Cached {
            token: Secret::new(stored.token),
            issued: now.checked_sub(age).unwrap_or(now),
            until: now + hit.left,
        };
        c.fresh_for(ttl).then_some(c)
    }

    /// A token for `audience` with `scopes` (empty = whatever the AS grants) on behalf of `subject`;
    /// `fresh` skips the cache (the upstream refused the cached token).
    pub async fn exchange(
        &self,
        subject: &Secret,
        audience: &str,
        scopes: &[String],
        ttl: Option<Duration>,
        fresh: bool,
    ) -> Result<Secret, CredentialError> {
        let scope = scopes.join(" ");
        let key: Key = (
            Sha256::digest(subject.expose().as_bytes()).into(),
            audience.to_string(),
            scope.clone(),
        );
        if self.cache.len() >= CACHE_MAX {
            let now = Instant::now();
            self.cache.retain(|_, slot| {
                slot.try_lock()
                    .map(|c| c.as_ref().is_some_and(|c| c.until > now))
                    .unwrap_or(true)
            });
        }
        // Named only on a local miss (a hash), but the key moves into the map here.
        let shared_key = self.shared.is_some().then(|| key.clone());
        let slot = self.cache.entry(key).or_default().clone();
        let mut held = slot.lock().await;
        if !fresh
            && let Some(c) = held.as_ref()
            && c.fresh_for(ttl)
        {
            crate::metrics::global().credential_cache("token_exchange", true);
            return Ok(c.token.clone());
        }
        crate::metrics::global().credential_cache("token_exchange", false);
        let shared = self
            .shared
            .as_deref()
            .zip(shared_key)
            .map(|(s, key)| (s, self.shared_key(s, &key)));
        // `fresh`: the upstream refused what the caches hold, the shared entry included.
        if !fresh
            && let Some((s, name)) = &shared
            && let Some(c) = self.shared_get(s, name, ttl).await
        {
            let token = c.token.clone();
            *held = Some(c);
            return Ok(token);
        }
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", GRANT.into()),
            ("subject_token", subject.expose().to_string()),
            ("subject_token_type", ACCESS_TOKEN.into()),
            ("requested_token_type", ACCESS_TOKEN.into()),
        ];
        // An absolute URI is a `resource` (RFC 8707); anything else is a logical `audience`.
        match url::Url::parse(audience) {
            Ok(u) if u.has_host() => form.push(("resource", audience.to_string())),
            _ => form.push(("audience", audience.to_string())),
        }
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        if self.cfg.actor {
            let actor = self.actor_token().await?;
            form.push(("actor_token", actor.expose().to_string()));
            form.push(("actor_token_type", ACCESS_TOKEN.into()));
        }
        let (token, lifetime) = self.post(form, audience).await?;
        let now = Instant::now();
        let usable = lifetime.saturating_sub(SAFETY_MARGIN.min(lifetime / 10));
        *held = Some(Cached {
            token: token.clone(),
            issued: now,
            until: now + usable,
        });
        if let Some((s, name)) = &shared {
            let stored = SharedToken {
                token: token.expose().to_string(),
                issued_ms: unix_ms(SystemTime::now()),
            };
            if let Ok(value) = serde_json::to_vec(&stored) {
                s.put(name, &value, usable).await;
            }
        }
        Ok(token)
    }

    /// The broker's own client-credentials token, cached until near expiry.
    async fn actor_token(&self) -> Result<Secret, CredentialError> {
        let mut held = self.actor.lock().await;
        if let Some(c) = held.as_ref()
            && c.fresh_for(None)
        {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = self
            .post(
                vec![("grant_type", "client_credentials".into())],
                "the broker's own token",
            )
            .await?;
        let now = Instant::now();
        *held = Some(Cached {
            token: token.clone(),
            issued: now,
            until: now + lifetime.saturating_sub(SAFETY_MARGIN.min(lifetime / 10)),
        });
        Ok(token)
    }

    async fn post(
        &self,
        mut form: Vec<(&str, String)>,
        audience: &str,
    ) -> Result<(Secret, Duration), CredentialError> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut req = self.http.post(self.cfg.token_endpoint.as_str());
        if self.cfg.secret_in_body {
            form.push(("client_id", self.cfg.client_id.clone()));
            form.push(("client_secret", self.cfg.client_secret.expose().to_string()));
        } else {
            req = req.basic_auth(&self.cfg.client_id, Some(self.cfg.client_secret.expose()));
        }
        let resp = req.form(&form).send().await.map_err(|e| {
            CredentialError::Exchange(format!("token endpoint unreachable: {}", e.without_url()))
        })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| CredentialError::Exchange(e.without_url().to_string()))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorResponse>(&body) {
                Ok(e) => CredentialError::ExchangeRefused {
                    audience: audience.to_string(),
                    code: e.error,
                    // The AS's description is shown only when it cannot echo a token back.
                    description: e
                        .error_description
                        .filter(|d| d.len() < 200 && !d.contains("eyJ")),
                },
                Err(_) => {
                    CredentialError::Exchange(format!("token endpoint answered HTTP {status}"))
                }
            });
        }
        let r: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            CredentialError::Exchange("the token endpoint's answer is not JSON".into())
        })?;
        // RFC 8693 §2.2.1: access_token, issued_token_type and token_type are REQUIRED.
        let (Some(token), Some(_), Some(_)) = (
            r.access_token,
            r.issued_token_type.or_else(|| {
                // client_credentials responses (the actor token) have no issued_token_type.
                form.iter()
                    .any(|(k, v)| *k == "grant_type" && v == "client_credentials")
                    .then(|| ACCESS_TOKEN.into())
            }),
            r.token_type,
        ) else {
            return Err(CredentialError::Exchange(
                "the token endpoint's answer lacks access_token, issued_token_type or token_type"
                    .into(),
            ));
        };
        let lifetime = r
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIFETIME);
        Ok((Secret::new(token), lifetime))
    }
}
