//! HashiCorp Vault KV client (the documented HTTP API): KV v2 (`data.data`) by default, KV v1 as an
//! option; `X-Vault-Token` and `X-Vault-Namespace`; login by token, AppRole, or JWT. JWT login is
//! per user: the caller's token is first exchanged for the Vault role's audience, so the
//! broker-audience token never reaches Vault. A 403 triggers one re-login, then a clear error; read
//! secrets are cached for `cache_ttl` (KV v2 has no lease to go by), and with [`SharedCache`]
//! shared (sealed, for what is left of that time) with the other instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde_json::Value;

use super::shared::SharedCache;
use super::{CredentialError, TokenExchange};
use crate::auth::Caller;
use crate::config::{Secret, VaultConfig, VaultLogin};

const CACHE_MAX: usize = 10_000;
/// Waits between attempts at a read Vault answered with a transient status (3 attempts in all).
const RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::ZERO,
];

/// A read secret's data and until when it may be reused.
type CachedSecret = (Arc<serde_json::Map<String, Value>>, Instant);

#[derive(Clone)]
struct VaultToken {
    token: Secret,
    /// `None` = no expiry known (a configured token).
    until: Option<Instant>,
}

pub struct VaultClient {
    cfg: VaultConfig,
    http: reqwest::Client,
    /// The exchange client for JWT login, resolved at construction.
    exchange: Option<Arc<TokenExchange>>,
    /// Login results: one shared entry ("") for token/AppRole, one per subject for JWT.
    tokens: DashMap<String, VaultToken>,
    login_lock: tokio::sync::Mutex<()>,
    cache: DashMap<(String, String), CachedSecret>,
    /// Logins performed (a metric, and the re-login test's probe).
    pub logins: std::sync::atomic::AtomicU64,
    /// `[cluster] share_credentials`: the cache behind `cache`, shared with other instances.
    shared: Option<Arc<SharedCache>>,
}

enum Read {
    Found(serde_json::Map<String, Value>),
    Forbidden,
}

impl VaultClient {
    pub fn new(
        cfg: VaultConfig,
        http: reqwest::Client,
        exchanges: &HashMap<String, Arc<TokenExchange>>,
    ) -> Self {
        let exchange = match &cfg.login {
            VaultLogin::Jwt { exchange, .. } => exchanges.get(exchange).cloned(),
            _ => None,
        };
        Self {
            cfg,
            http,
            exchange,
            tokens: DashMap::new(),
            login_lock: tokio::sync::Mutex::new(()),
            cache: DashMap::new(),
            logins: Default::default(),
            shared: None,
        }
    }

    /// Share read secrets with the other instances (`[cluster] share_credentials`).
    pub fn with_shared(mut self, shared: Option<Arc<SharedCache>>) -> Self {
        self.shared = shared;
        self
    }

    /// The Redis key of a cache entry: this Vault (address, namespace) and the local key.
    fn shared_key(&self, shared: &SharedCache, who: &str, path: &str) -> String {
        shared.key(&[
            b"vault",
            self.cfg.address.as_str().as_bytes(),
            self.cfg.namespace.as_deref().unwrap_or("").as_bytes(),
            &[self.cfg.kv_version],
            who.as_bytes(),
            path.as_bytes(),
        ])
    }

    fn token_key(&self, caller: &Caller) -> String {
        match self.cfg.login {
            VaultLogin::Jwt { .. } => caller.sub.clone(),
            _ => String::new(),
        }
    }

    /// One field of the secret at `path` (the API path after `/v1/`).
    pub async fn read_field(
        &self,
        path: &str,
        field: &str,
        caller: &Caller,
        fresh: bool,
    ) -> Result<Secret, CredentialError> {
        if fresh {
            self.cache
                .remove(&(self.token_key(caller), path.to_string()));
        }
        let data = self.read(path, caller, fresh).await?;
        match data.get(field) {
            Some(Value::String(s)) => Ok(Secret::new(s.clone())),
            Some(v) if !v.is_null() => Ok(Secret::new(v.to_string())),
            _ => Err(CredentialError::VaultField {
                path: path.to_string(),
                field: field.to_string(),
            }),
        }
    }

    async fn read(
        &self,
        path: &str,
        caller: &Caller,
        fresh: bool,
    ) -> Result<Arc<serde_json::Map<String, Value>>, CredentialError> {
        let who = self.token_key(caller);
        let ckey = (who.clone(), path.to_string());
        if let Some(hit) = self.cache.get(&ckey)
            && hit.1 > Instant::now()
        {
            crate::metrics::global().credential_cache("vault", true);
            return Ok(hit.0.clone());
        }
        crate::metrics::global().credential_cache("vault", false);
        let shared = self
            .shared
            .as_ref()
            .map(|s| (s.as_ref(), self.shared_key(s, &who, path)));
        // `fresh`: the upstream refused what the caches hold, the shared entry included.
        if !fresh
            && let Some((s, name)) = &shared
            && let Some(hit) = s.get(name).await
            && let Ok(data) = serde_json::from_slice::<serde_json::Map<String, Value>>(&hit.value)
        {
            let data = Arc::new(data);
            self.remember(ckey, data.clone(), Instant::now() + hit.left);
            return Ok(data);
        }
        let mut relogged = false;
        loop {
            let token = self.token(&who, caller, relogged).await?;
            match self.get(path, &token).await? {
                Read::Found(data) => {
                    if let Some((s, name)) = &shared
                        && let Ok(value) = serde_json::to_vec(&data)
                    {
                        s.put(name, &value, self.cfg.cache_ttl).await;
                    }
                    let data = Arc::new(data);
                    self.remember(ckey, data.clone(), Instant::now() + self.cfg.cache_ttl);
                    return Ok(data);
                }
                // An expired or revoked token: log in again, once.
                Read::Forbidden if !relogged && !matches!(self.cfg.login, VaultLogin::Token(_)) => {
                    self.tokens.remove(&who);
                    relogged = true;
                }
                Read::Forbidden => {
                    return Err(CredentialError::Vault(format!(
                        "permission denied reading `{path}`"
                    )));
                }
            }
        }
    }

    fn remember(
        &self,
        key: (String, String),
        data: Arc<serde_json::Map<String, Value>>,
        until: Instant,
    ) {
        if self.cache.len() >= CACHE_MAX {
            self.cache.clear();
        }
        self.cache.insert(key, (data, until));
    }

    async fn get(&self, path: &str, token: &Secret) -> Result<Read, CredentialError> {
        let url = format!(
            "{}/v1/{}",
            self.cfg.address.as_str().trim_end_matches('/'),
            path
        );
        // 412 (eventual consistency), 429/472/473 (standby), 5xx (sealed, internal, upstream):
        // transient by Vault's documentation, so a few spaced retries before giving up.
        let mut attempt = 0;
        let resp = loop {
            let mut req = self
                .http
                .get(&url)
                .header("X-Vault-Token", token.expose())
                .header("X-Vault-Request", "true");
            if let Some(ns) = &self.cfg.namespace {
                req = req.header("X-Vault-Namespace", ns);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| CredentialError::Vault(format!("unreachable: {}", e.without_url())))?;
            let status = resp.status().as_u16();
            let transient = matches!(status, 412 | 429 | 472 | 473) || status >= 500;
            if !transient || attempt + 1 >= RETRIES.len() {
                break resp;
            }
            tokio::time::sleep(RETRIES[attempt]).await;
            attempt += 1;
        };
        match resp.status().as_u16() {
            200 => {
                let body: Value = resp
                    .json()
                    .await
                    .map_err(|_| CredentialError::Vault("the answer is not JSON".into()))?;
                let data = if self.cfg.kv_version == 2 {
                    body.pointer("/data/data")
                } else {
                    body.get("data")
                };
                match data {
                    Some(Value::Object(m)) => Ok(Read::Found(m.clone())),
                    // KV v2: a soft-deleted or destroyed latest version has `data: null`.
                    _ => Err(CredentialError::VaultNotFound(path.to_string())),
                }
            }
            403 => Ok(Read::Forbidden),
            404 => Err(CredentialError::VaultNotFound(path.to_string())),
            // Vault's error text is not shown to MCP clients; the status is enough to act on.
            s => Err(CredentialError::Vault(format!("HTTP {s} reading `{path}`"))),
        }
    }

    /// A Vault token for `who`, logging in when there is none, it expired, or `fresh` is asked.
    async fn token(
        &self,
        who: &str,
        caller: &Caller,
        fresh: bool,
    ) -> Result<Secret, CredentialError> {
        if !fresh && let Some(t) = self.valid_token(who) {
            return Ok(t);
        }
        let _one = self.login_lock.lock().await;
        if !fresh && let Some(t) = self.valid_token(who) {
            return Ok(t);
        }
        let t = self.login(caller).await?;
        self.tokens.insert(who.to_string(), t.clone());
        Ok(t.token)
    }

    fn valid_token(&self, who: &str) -> Option<Secret> {
        self.tokens.get(who).and_then(|t| {
            t.until
                .is_none_or(|u| u > Instant::now())
                .then(|| t.token.clone())
        })
    }

    async fn login(&self, caller: &Caller) -> Result<VaultToken, CredentialError> {
        let (mount, body) = match &self.cfg.login {
            VaultLogin::Token(t) => {
                return Ok(VaultToken {
                    token: t.clone(),
                    until: None,
                });
            }
            VaultLogin::AppRole {
                mount,
                role_id,
                secret_id,
            } => (
                mount.clone(),
                serde_json::json!({ "role_id": role_id, "secret_id": secret_id.expose() }),
            ),
            VaultLogin::Jwt {
                mount,
                role,
                audience,
                ..
            } => {
                let ex = self.exchange.as_ref().ok_or_else(|| {
                    CredentialError::Vault("the JWT login's exchange store is missing".into())
                })?;
                let subject = caller
                    .token
                    .as_ref()
                    .ok_or(CredentialError::NoSubjectToken)?;
                // Vault gets a token minted for Vault, never the caller's broker-audience token.
                let jwt = ex.exchange(subject, audience, &[], None, false).await?;
                (
                    mount.clone(),
                    serde_json::json!({ "role": role, "jwt": jwt.expose() }),
                )
            }
        };
        self.logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = format!(
            "{}/v1/auth/{mount}/login",
            self.cfg.address.as_str().trim_end_matches('/')
        );
        let mut req = self.http.post(&url).json(&body);
        if let Some(ns) = &self.cfg.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let resp = req.send().await.map_err(|e| {
            CredentialError::Vault(format!("login unreachable: {}", e.without_url()))
        })?;
        let status = resp.status();
        if !status.is_success() {
            return Err(CredentialError::Vault(format!(
                "login to auth/{mount} refused (HTTP {status})"
            )));
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|_| CredentialError::Vault("the login answer is not JSON".into()))?;
        let token = body
            .pointer("/auth/client_token")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                CredentialError::Vault("the login answer has no auth.client_token".into())
            })?;
        let lease = body
            .pointer("/auth/lease_duration")
            .and_then(Value::as_u64)
            .filter(|&s| s > 0);
        Ok(VaultToken {
            token: Secret::new(token),
            // Log in again at two thirds of the lease rather than renewing: simpler, and it also
            // covers max-TTL expiry.
            until: lease.map(|s| Instant::now() + Duration::from_secs(s * 2 / 3)),
        })
    }
}
