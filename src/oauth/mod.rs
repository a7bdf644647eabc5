//! Upstream OAuth: tokens from an upstream's own authorization server (`upstream_auth = { kind =
//! "oauth" | "id_jag" | "client_credentials" }`), obtained with rmcp's OAuth client
//! (`rmcp::transport::auth`: discovery, PKCE, registration, refresh, Enterprise-Managed
//! Authorization).
//!
//! - **Discovery**: the upstream's RFC 9728 metadata (its `resource` must equal the configured URL
//!   exactly), then its authorization server's RFC 8414 / OpenID metadata; every URL passes the
//!   guard in [`http`]. Cached per server for an hour.
//! - **Consent** (`oauth`) and **sign-in** (`id_jag`): a caller without a token gets a link to
//!   `/oauth/start` carrying a sealed [`flow::Ticket`]. The browser's user first signs in at
//!   `[auth] issuer` (the spec's anti-phishing check: their `sub` must be the caller's); then, for
//!   `oauth`, authorizes the broker at the upstream's server (authorization code + PKCE, `resource`
//!   = the upstream, RFC 9207 `iss` checked). Tokens go to the [`store::TokenStore`] per (caller,
//!   server); `id_jag` keeps the IdP refresh token instead and exchanges it for an ID-JAG, redeemed
//!   with the JWT bearer grant at the upstream's server.
//! - **Client credentials**: one token for the broker, cached until it expires.
//!
//! The caller's own token never goes upstream, and no token is logged.

mod browser;
mod discovery;
mod enterprise;
pub mod flow;
mod form;
pub mod http;
pub mod revoke;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dashmap::DashMap;
use rmcp::transport::auth::enterprise::{
    EmaAuthorizationServer, EmaClientAuthentication, EmaError, EmaExchangeRequest, EmaExchangeStage,
};
use rmcp::transport::auth::{
    AuthError, AuthorizationMetadata, ClientCredentialsConfig, CredentialStore, OAuthClientConfig,
    StoredCredentials,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::auth::Caller;
use crate::cluster::sealed::Sealer;
use crate::config::{
    Config, CredentialStore as StoreConfig, ExchangeConfig, JagSubject, OAuthAuth, OAuthFlow,
    OAuthSettings, Secret, UpstreamAuth,
};
use flow::{Flows, Ticket};
use store::{TokenEntry, TokenStore};

/// The key under which a user's IdP sign-in (its refresh token) is kept.
pub const SIGN_IN: &str = "@sign-in";

/// Access tokens in hand past which expired ones are swept.
const MAX_CACHED: usize = 10_000;

/// How long discovered metadata is reused.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The caller has not connected this server yet (or their grant ended): `url` starts it.
    #[error("server `{server}` needs your authorization: open {url}")]
    ConsentRequired { server: String, url: String },
    #[error("discovering the authorization server of `{server}`: {message}")]
    Discovery { server: String, message: String },
    /// One step of a flow failed; `step` names it.
    #[error("{step}: {message}")]
    Step { step: &'static str, message: String },
    #[error(
        "no [oauth.clients.\"{issuer}\"] is configured: the broker must be registered at `{server}`'s authorization server for {why}"
    )]
    NoClient {
        issuer: String,
        server: String,
        why: &'static str,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// What a browser request to `/oauth/start` or `/oauth/callback` ends in.
pub enum Outcome {
    Redirect(String),
    Done(String),
}

/// A refused browser request: HTTP status and a message for the page.
#[derive(Debug)]
pub struct PageError {
    pub status: u16,
    pub message: String,
}

impl PageError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// From the configuration; replaced on reload.
struct Settings {
    oauth: OAuthSettings,
    /// `[auth] issuer`.
    issuer: Option<String>,
    sign_in: Option<ExchangeConfig>,
    redirect_uri: String,
    start_url: String,
    /// Servers with `upstream_auth` of these kinds: name → (upstream URL, settings).
    servers: HashMap<String, (String, OAuthAuth)>,
}

#[derive(Clone)]
struct Discovered {
    metadata: AuthorizationMetadata,
    issuer: String,
}

pub struct Engine {
    /// The broker's token store. Weak, like every other handle this process-wide engine gets
    /// from a broker: it must not outlive (or keep alive) the broker's Redis and writers.
    store: RwLock<std::sync::Weak<TokenStore>>,
    /// Used while no broker has set a store (tests, `mcp-broker tools`).
    fallback: Arc<TokenStore>,
    settings: RwLock<Arc<Settings>>,
    clients: RwLock<Arc<http::Clients>>,
    flows: Flows,
    sealer: RwLock<Arc<Sealer>>,
    discovered: DashMap<String, (Discovered, Instant)>,
    /// Dynamic registrations, per authorization-server issuer (client id, secret).
    registered: DashMap<String, (String, Option<String>)>,
    /// Access tokens in hand, per (sub, server) (`""` for client credentials): (token, expiry).
    cache: DashMap<(String, String), (Secret, u64)>,
    /// Woken when (sub, server) gets connected.
    connected: DashMap<(String, String), Arc<Notify>>,
    /// The subjects who just connected something (their sessions' tool lists change).
    changes: tokio::sync::broadcast::Sender<String>,
    /// Where consent events are recorded (kind `consent`). Weak: this process-wide engine must not
    /// keep a broker's audit writer alive after the broker is gone (its shutdown waits for it).
    audit: RwLock<std::sync::Weak<crate::audit::Audit>>,
}

static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();

/// The process's engine: tokens and authorizations in progress outlive configuration reloads.
pub fn engine() -> &'static Arc<Engine> {
    ENGINE.get_or_init(|| Arc::new(Engine::new()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    let _ = getrandom::fill(&mut b);
    crate::hex(&b)
}

impl Engine {
    fn new() -> Self {
        Self {
            store: RwLock::new(std::sync::Weak::new()),
            fallback: Arc::new(TokenStore::memory()),
            settings: RwLock::new(Arc::new(Settings {
                oauth: OAuthSettings::default(),
                issuer: None,
                sign_in: None,
                redirect_uri: String::new(),
                start_url: String::new(),
                servers: HashMap::new(),
            })),
            clients: RwLock::new(http::Clients::new(None).unwrap_or_else(|_| {
                // Building a client without extra roots does not fail in practice.
                http::Clients::new(None).expect("reqwest client")
            })),
            flows: Flows::new(Duration::from_secs(600)),
            sealer: RwLock::new(Arc::new(Sealer::new(&random_hex()))),
            discovered: DashMap::new(),
            registered: DashMap::new(),
            cache: DashMap::new(),
            connected: DashMap::new(),
            changes: tokio::sync::broadcast::channel(64).0,
            audit: RwLock::new(std::sync::Weak::new()),
        }
    }

    pub fn set_audit(&self, audit: &Arc<crate::audit::Audit>) {
        if let Ok(mut slot) = self.audit.write() {
            *slot = Arc::downgrade(audit);
        }
    }

    /// An audit record (kind `consent`) for what happened to `sub`'s connection to `server`.
    pub fn audit_event(&self, sub: &str, server: &str, allow: bool, reason: &str) {
        let Some(a) = self.audit.read().ok().and_then(|a| a.upgrade()) else {
            return;
        };
        let mut caller = Caller::anonymous();
        caller.sub = sub.to_string();
        caller.authenticated = true;
        let mut rec = a.begin(&caller, "consent", server);
        rec.route(server, "");
        rec.decision(allow, reason, Some("oauth".into()));
        if allow {
            rec.finish(crate::audit::Outcome::Ok, None);
        }
    }

    /// Subjects as they connect an upstream (or sign in).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Use `store` for tokens (the file, Redis, or memory), from start-up.
    pub fn set_store(&self, store: &Arc<TokenStore>) {
        if let Ok(mut s) = self.store.write() {
            *s = Arc::downgrade(store);
        }
        self.cache.clear();
    }

    pub fn store(&self) -> Arc<TokenStore> {
        self.store
            .read()
            .ok()
            .and_then(|s| s.upgrade())
            .unwrap_or_else(|| self.fallback.clone())
    }

    /// Under `[cluster]`: authorizations in progress are kept in Redis, so a browser's callback
    /// may reach any instance.
    pub fn use_cluster(&self, c: &Arc<crate::cluster::Cluster>) {
        self.flows.use_cluster(c);
    }

    /// Under `[cluster]`: links made by any instance open on every instance.
    pub fn set_secret_key(&self, key: &str) {
        if let Ok(mut s) = self.sealer.write() {
            *s = Arc::new(Sealer::new(key));
        }
    }

    fn sealer(&self) -> Arc<Sealer> {
        self.sealer
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn http(&self, base: &url::Url) -> Arc<http::Guarded> {
        let c = self
            .clients
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone());
        c.for_base(base)
    }

    /// Take the `[oauth]` settings of `config` (at start and on every reload).
    pub fn configure(&self, config: &Config) -> Result<(), OAuthError> {
        let origin = config.broker.public_url.origin().ascii_serialization();
        let mut servers = HashMap::new();
        for s in &config.servers {
            if let Some(UpstreamAuth::OAuth(o)) = &s.upstream_auth
                && let Some(url) = s.transport.url()
            {
                servers.insert(s.name.clone(), (url.to_string(), o.clone()));
            }
        }
        let sign_in = config
            .oauth
            .sign_in
            .as_ref()
            .and_then(|n| match config.credentials.get(n) {
                Some(StoreConfig::TokenExchange(x)) => Some(x.clone()),
                _ => None,
            });
        if let Some(ca) = &config.oauth.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                OAuthError::Config(format!("[oauth] ca_file {}: {e}", ca.display()))
            })?;
            let c = http::Clients::new(Some(&pem)).map_err(OAuthError::Config)?;
            if let Ok(mut slot) = self.clients.write() {
                *slot = c;
            }
        }
        let s = Settings {
            oauth: config.oauth.clone(),
            issuer: config.auth.as_ref().map(|a| a.issuer.clone()),
            sign_in,
            redirect_uri: format!("{origin}/oauth/callback"),
            start_url: format!("{origin}/oauth/start"),
            servers,
        };
        if let Ok(mut slot) = self.settings.write() {
            *slot = Arc::new(s);
        }
        Ok(())
    }

    /// Is any server configured with a consent or sign-in flow (so `/oauth/*` is served)?
    pub fn has_browser_flows(&self) -> bool {
        self.settings()
            .servers
            .values()
            .any(|(_, a)| a.per_caller())
    }

    // ------------------------------------------------------------------ tokens for requests

    /// The access token for `caller`'s request to the server `auth` belongs to. `fresh`: the
    /// upstream refused the last one, so refresh (or exchange again) rather than reuse it.
    pub async fn token(
        &self,
        server: &str,
        auth: &OAuthAuth,
        caller: &Caller,
        fresh: bool,
    ) -> Result<Secret, OAuthError> {
        let sub = match auth.flow {
            OAuthFlow::ClientCredentials => String::new(),
            _ => caller.sub.clone(),
        };
        let key = (sub.clone(), server.to_string());
        if fresh {
            self.cache.remove(&key);
        } else if let Some(hit) = self.cache.get(&key)
            && hit.1 > now() + 30
        {
            crate::metrics::global().upstream_oauth(server, auth.kind(), "cached");
            return Ok(hit.0.clone());
        }
        let got = match &auth.flow {
            OAuthFlow::ClientCredentials => self.client_credentials(server, auth).await,
            OAuthFlow::Consent => self.consented(server, auth, &sub, fresh).await,
            OAuthFlow::IdJag {
                subject: JagSubject::AccessToken,
                ..
            } => self.id_jag_from_access_token(server, auth, caller).await,
            OAuthFlow::IdJag { .. } => self.id_jag(server, auth, &sub).await,
        };
        let result = match &got {
            Ok(_) => "fetched",
            Err(OAuthError::ConsentRequired { .. }) => "consent_required",
            Err(_) => "error",
        };
        crate::metrics::global().upstream_oauth(server, auth.kind(), result);
        let (token, exp) = got?;
        // Bounded by callers × servers; expired entries are dropped once it grows.
        if self.cache.len() >= MAX_CACHED {
            let now = now();
            self.cache.retain(|_, (_, e)| *e > now);
        }
        self.cache.insert(key, (token.clone(), exp));
        Ok(token)
    }

    /// Has `sub` connected `server` (a token or, for id_jag, a sign-in is stored)?
    pub async fn is_connected(&self, sub: &str, server: &str) -> bool {
        let s = self.settings();
        let slot = match s.servers.get(server) {
            Some((_, a)) if !a.needs_browser() => return true,
            Some((_, a)) if matches!(a.flow, OAuthFlow::IdJag { .. }) => SIGN_IN,
            Some(_) => server,
            None => return true,
        };
        matches!(self.store().get(sub, slot).await, Ok(Some(_)))
    }

    /// Wait until `sub` has connected `server`, at most `limit`.
    pub async fn wait_connected(&self, sub: &str, server: &str, limit: Duration) -> bool {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let n = self
                .connected
                .entry((sub.to_string(), server.to_string()))
                .or_insert_with(|| Arc::new(Notify::new()))
                .clone();
            let woken = n.notified();
            if self.is_connected(sub, server).await {
                self.connected
                    .remove(&(sub.to_string(), server.to_string()));
                return true;
            }
            let tick = (tokio::time::Instant::now() + Duration::from_secs(2)).min(end);
            if tokio::time::timeout_at(tick, woken).await.is_err()
                && tokio::time::Instant::now() >= end
            {
                // Forgotten on timeout (another waiter still polls every 2 s).
                self.connected
                    .remove(&(sub.to_string(), server.to_string()));
                return self.is_connected(sub, server).await;
            }
        }
    }

    fn mark_connected(&self, sub: &str, server: &str) {
        self.cache.remove(&(sub.to_string(), server.to_string()));
        let _ = self.changes.send(sub.to_string());
        if let Some(n) = self.connected.get(&(sub.to_string(), server.to_string())) {
            n.notify_waiters();
        }
        // A sign-in connects every id_jag server for this user.
        if server == SIGN_IN {
            for e in self.connected.iter() {
                if e.key().0 == sub {
                    e.value().notify_waiters();
                }
            }
        }
    }

    /// Forget what the broker holds for `sub` (and `server`): cached access tokens too.
    pub fn forget_cached(&self, sub: Option<&str>, server: Option<&str>) {
        self.cache.retain(|(s, v), _| {
            !(sub.is_none_or(|x| x == s) && server.is_none_or(|x| x == v || v.is_empty()))
        });
    }

    /// A consent link for `sub` at `server`, valid for `[oauth] link_ttl`.
    pub fn consent_link(&self, sub: &str, server: &str, elicitation: Option<&str>) -> String {
        let s = self.settings();
        let t = Ticket {
            sub: sub.to_string(),
            server: server.to_string(),
            exp: now() + s.oauth.link_ttl.as_secs(),
            elicitation: elicitation.map(str::to_string),
        };
        let sealed = t.seal(&self.sealer()).unwrap_or_default();
        format!("{}?t={sealed}", s.start_url)
    }

    fn consent_required(&self, sub: &str, server: &str) -> OAuthError {
        OAuthError::ConsentRequired {
            server: server.to_string(),
            url: self.consent_link(sub, server, None),
        }
    }

    async fn client_credentials(
        &self,
        server: &str,
        auth: &OAuthAuth,
    ) -> Result<(Secret, u64), OAuthError> {
        let (url, d) = self.discover(server).await?;
        let s = self.settings();
        let reg = registration(&s, &d, server, "the client credentials grant")?;
        let secret = reg.client_secret.as_ref().ok_or_else(|| {
            OAuthError::Config(format!(
                "[oauth.clients.\"{}\"] needs client_secret for the client credentials grant",
                d.issuer
            ))
        })?;
        let mut m = self.manager(&url, &d).await?;
        let cfg = ClientCredentialsConfig::ClientSecret {
            client_id: reg.client_id.clone(),
            client_secret: secret.expose().to_string(),
            scopes: auth.scopes.clone(),
            resource: Some(url.to_string()),
        };
        let step = |e: AuthError| OAuthError::Step {
            step: "client credentials grant at the upstream's authorization server",
            message: e.to_string(),
        };
        m.configure_client_credentials(&cfg).map_err(step)?;
        m.exchange_client_credentials(&cfg).await.map_err(step)?;
        let (_, resp) = m.get_credentials().await.map_err(step)?;
        let resp = resp.ok_or_else(|| OAuthError::Step {
            step: "client credentials grant at the upstream's authorization server",
            message: "no token in the response".into(),
        })?;
        use oauth2::TokenResponse;
        let exp = now() + resp.expires_in().map_or(300, |d| d.as_secs());
        Ok((Secret::new(resp.access_token().secret().clone()), exp))
    }

    async fn consented(
        &self,
        server: &str,
        auth: &OAuthAuth,
        sub: &str,
        fresh: bool,
    ) -> Result<(Secret, u64), OAuthError> {
        let store = self.store();
        let Some(entry) = store.get(sub, server).await? else {
            return Err(self.consent_required(sub, server));
        };
        let held: Held = serde_json::from_str(entry.secret.expose()).map_err(|_| {
            OAuthError::Config(format!(
                "the stored token of `{sub}` for `{server}` is unreadable"
            ))
        })?;
        let (url, d) = self.discover(server).await?;
        let mut m = self.manager(&url, &d).await?;
        m.configure_client(client_config(
            held.credentials.client_id.clone(),
            held.client_secret.clone(),
            auth.scopes.clone(),
            self.settings().redirect_uri.clone(),
        ))
        .map_err(|e| OAuthError::Step {
            step: "configuring the client",
            message: e.to_string(),
        })?;
        m.set_credential_store(EntryStore {
            store: store.clone(),
            sub: sub.to_string(),
            server: server.to_string(),
            kind: "oauth",
            issuer: Some(d.issuer.clone()),
            client_secret: held.client_secret.clone(),
        });
        let token = if fresh {
            m.refresh_token().await.map(|r| {
                use oauth2::TokenResponse;
                r.access_token().secret().clone()
            })
        } else {
            m.get_access_token().await
        };
        match token {
            Ok(t) => {
                let exp = store
                    .get(sub, server)
                    .await?
                    .and_then(|e| e.expires_at)
                    .unwrap_or(now() + 300);
                Ok((Secret::new(t), exp))
            }
            Err(AuthError::AuthorizationRequired | AuthError::TokenRefreshRejected(_)) => {
                // The grant ended (revoked at the server, or no refresh token): consent again.
                let _ = store.remove(Some(sub), Some(server)).await;
                Err(self.consent_required(sub, server))
            }
            Err(e) => Err(OAuthError::Step {
                step: "refreshing the access token",
                message: e.to_string(),
            }),
        }
    }

    async fn id_jag(
        &self,
        server: &str,
        auth: &OAuthAuth,
        sub: &str,
    ) -> Result<(Secret, u64), OAuthError> {
        let store = self.store();
        let Some(entry) = store.get(sub, SIGN_IN).await? else {
            return Err(self.consent_required(sub, server));
        };
        let signed: SignedIn = serde_json::from_str(entry.secret.expose()).map_err(|_| {
            OAuthError::Config(format!("the stored sign-in of `{sub}` is unreadable"))
        })?;
        let JagParties {
            issuer,
            idp,
            url,
            d,
            reg,
        } = self.jag_parties(server).await?;
        let client_auth = |secret: Option<&Secret>, in_body: bool| match secret {
            None => EmaClientAuthentication::None,
            Some(s) if in_body => EmaClientAuthentication::ClientSecretPost(
                oauth2::ClientSecret::new(s.expose().into()),
            ),
            Some(s) => EmaClientAuthentication::ClientSecretBasic(oauth2::ClientSecret::new(
                s.expose().into(),
            )),
        };
        let idp_server = EmaAuthorizationServer::new(
            issuer.clone(),
            idp.token_endpoint.to_string(),
            idp.client_id.clone(),
        )
        .with_client_authentication(client_auth(Some(&idp.client_secret), idp.secret_in_body));
        let resource_as = EmaAuthorizationServer::new(
            d.issuer.clone(),
            d.metadata.token_endpoint.clone(),
            reg.client_id.clone(),
        )
        .with_client_authentication(client_auth(reg.client_secret.as_ref(), reg.secret_in_body));
        let refresh = oauth2::RefreshToken::new(signed.refresh_token.clone());
        let resource = url.to_string();
        let idp_url = url::Url::parse(&issuer).map_err(|e| OAuthError::Config(e.to_string()))?;
        let idp_http = self.http(&idp_url);
        let as_http = self.http(&url);
        let req = EmaExchangeRequest::new(idp_server, resource_as, &resource, &refresh)
            .with_scopes(auth.scopes.iter().cloned());
        match req.exchange(idp_http.as_ref(), as_http.as_ref()).await {
            Ok(t) => {
                let exp = now() + t.expires_in.map_or(300, |d| d.as_secs());
                Ok((Secret::new(t.access_token.secret().clone()), exp))
            }
            Err(EmaError::InvalidGrant(EmaExchangeStage::IdentityProvider)) => {
                // The IdP no longer honours the sign-in (revoked, expired): sign in again.
                let _ = store.remove(Some(sub), Some(SIGN_IN)).await;
                Err(self.consent_required(sub, server))
            }
            Err(e) => Err(OAuthError::Step {
                step: match stage_of(&e) {
                    Some(EmaExchangeStage::IdentityProvider) => {
                        "exchanging the sign-in for an ID-JAG at the enterprise IdP (RFC 8693)"
                    }
                    Some(EmaExchangeStage::ResourceAuthorizationServer) => {
                        "redeeming the ID-JAG at the upstream's authorization server (JWT bearer grant)"
                    }
                    _ => "enterprise-managed authorization",
                },
                message: e.to_string(),
            }),
        }
    }

    /// What both `id_jag` subjects need: the IdP and the upstream's authorization server.
    async fn jag_parties(&self, server: &str) -> Result<JagParties, OAuthError> {
        let s = self.settings();
        let (Some(issuer), Some(idp)) = (&s.issuer, &s.sign_in) else {
            return Err(OAuthError::Config(
                "id_jag needs [auth] and [oauth] sign_in".into(),
            ));
        };
        let (url, d) = self.discover(server).await?;
        let reg = registration(&s, &d, server, "redeeming ID-JAGs (the JWT bearer grant)")?.clone();
        Ok(JagParties {
            issuer: issuer.clone(),
            idp: idp.clone(),
            url,
            d,
            reg,
        })
    }

    /// `id_jag` with `subject = "access_token"` (non-standard; see [`enterprise`]).
    async fn id_jag_from_access_token(
        &self,
        server: &str,
        auth: &OAuthAuth,
        caller: &Caller,
    ) -> Result<(Secret, u64), OAuthError> {
        let Some(subject) = &caller.token else {
            return Err(OAuthError::Config(format!(
                "`{server}` exchanges the caller's access token (subject = \"access_token\"), and this caller presented none"
            )));
        };
        let JagParties {
            issuer,
            idp,
            url,
            d,
            reg,
        } = self.jag_parties(server).await?;
        let idp_url = url::Url::parse(&issuer).map_err(|e| OAuthError::Config(e.to_string()))?;
        let idp_client = form::Client {
            endpoint: idp.token_endpoint.as_str(),
            client_id: &idp.client_id,
            client_secret: Some(&idp.client_secret),
            secret_in_body: idp.secret_in_body,
        };
        let as_client = form::Client {
            endpoint: &d.metadata.token_endpoint,
            client_id: &reg.client_id,
            client_secret: reg.client_secret.as_ref(),
            secret_in_body: reg.secret_in_body,
        };
        let x = enterprise::Exchange {
            subject,
            audience: &d.issuer,
            resource: url.as_str(),
            scopes: &auth.scopes,
        };
        enterprise::exchange(
            &x,
            (&idp_client, &self.http(&idp_url)),
            (&as_client, &self.http(&url)),
            now(),
        )
        .await
    }
}

/// The enterprise IdP (`[auth] issuer` and the sign-in client) and an upstream (its URL, its
/// authorization server, the broker's registration there), for an ID-JAG.
struct JagParties {
    issuer: String,
    idp: ExchangeConfig,
    url: url::Url,
    d: Discovered,
    reg: crate::config::OAuthClientReg,
}

/// The broker's configured registration at `d`'s authorization server, needed for `why`.
fn registration<'a>(
    s: &'a Settings,
    d: &Discovered,
    server: &str,
    why: &'static str,
) -> Result<&'a crate::config::OAuthClientReg, OAuthError> {
    s.oauth
        .client_for(&d.issuer)
        .ok_or_else(|| OAuthError::NoClient {
            issuer: d.issuer.clone(),
            server: server.to_string(),
            why,
        })
}

fn client_config(
    id: String,
    secret: Option<String>,
    scopes: Vec<String>,
    redirect: String,
) -> OAuthClientConfig {
    let c = OAuthClientConfig::new(id, redirect).with_scopes(scopes);
    match secret {
        Some(s) => c.with_client_secret(s),
        None => c,
    }
}

fn stage_of(e: &EmaError) -> Option<EmaExchangeStage> {
    match e {
        EmaError::InvalidResponse { stage, .. } | EmaError::OAuthRejected { stage, .. } => {
            Some(*stage)
        }
        EmaError::RequestFailed(s)
        | EmaError::InvalidGrant(s)
        | EmaError::InsufficientUserAuthentication(s) => Some(*s),
        _ => None,
    }
}

/// What a consent keeps in the token store's secret (as JSON).
#[derive(Serialize, Deserialize)]
struct Held {
    credentials: StoredCredentials,
    client_secret: Option<String>,
}

/// What a sign-in keeps (for id_jag).
#[derive(Serialize, Deserialize)]
struct SignedIn {
    refresh_token: String,
}

/// rmcp's credential store for one (caller, server) entry of the token store.
struct EntryStore {
    store: Arc<TokenStore>,
    sub: String,
    server: String,
    kind: &'static str,
    issuer: Option<String>,
    client_secret: Option<String>,
}

#[async_trait]
impl CredentialStore for EntryStore {
    async fn load(&self) -> Result<Option<StoredCredentials>, AuthError> {
        let e = self
            .store
            .get(&self.sub, &self.server)
            .await
            .map_err(|e| AuthError::CredentialStoreError(e.to_string()))?;
        Ok(
            e.and_then(|e| serde_json::from_str::<Held>(e.secret.expose()).ok())
                .map(|h| h.credentials),
        )
    }

    async fn save(&self, c: StoredCredentials) -> Result<(), AuthError> {
        use oauth2::TokenResponse;
        let expires_at = c
            .token_response
            .as_ref()
            .and_then(|t| t.expires_in())
            .map(|d| c.token_received_at.unwrap_or_else(now) + d.as_secs());
        let entry = TokenEntry {
            sub: self.sub.clone(),
            server: self.server.clone(),
            kind: self.kind.into(),
            issuer: self.issuer.clone(),
            client_id: Some(c.client_id.clone()),
            scopes: c.granted_scopes.clone(),
            expires_at,
            updated_at: now(),
            secret: Secret::new(
                serde_json::to_string(&Held {
                    credentials: c,
                    client_secret: self.client_secret.clone(),
                })
                .unwrap_or_default(),
            ),
        };
        self.store
            .put(entry)
            .await
            .map_err(|e| AuthError::CredentialStoreError(e.to_string()))
    }

    async fn clear(&self) -> Result<(), AuthError> {
        self.store
            .remove(Some(&self.sub), Some(&self.server))
            .await
            .map(|_| ())
            .map_err(|e| AuthError::CredentialStoreError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::browser::id_token_subject;
    use super::*;
    use base64::Engine as _;

    fn jwt(claims: serde_json::Value) -> String {
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.sig",
            b(br#"{"alg":"RS256"}"#),
            b(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn id_token_subject_checks_issuer_audience_and_expiry() {
        let exp = now() + 300;
        let ok = jwt(
            serde_json::json!({"iss": "https://idp", "aud": "broker", "sub": "alice", "exp": exp}),
        );
        assert_eq!(
            id_token_subject(&ok, "https://idp", "broker").unwrap(),
            "alice"
        );
        let arr = jwt(
            serde_json::json!({"iss": "https://idp", "aud": ["x", "broker"], "sub": "a", "exp": exp}),
        );
        assert!(id_token_subject(&arr, "https://idp", "broker").is_ok());
        for (bad, why) in [
            (
                serde_json::json!({"iss": "https://evil", "aud": "broker", "sub": "a", "exp": exp}),
                "another issuer",
            ),
            (
                serde_json::json!({"iss": "https://idp", "aud": "other", "sub": "a", "exp": exp}),
                "another client",
            ),
            (
                serde_json::json!({"iss": "https://idp", "aud": "broker", "sub": "a", "exp": 10}),
                "expired",
            ),
            (
                serde_json::json!({"iss": "https://idp", "aud": "broker", "sub": "", "exp": exp}),
                "no sub",
            ),
        ] {
            let e = id_token_subject(&jwt(bad), "https://idp", "broker").unwrap_err();
            assert!(e.contains(why), "{e} (wanted {why})");
        }
        assert!(id_token_subject("not-a-jwt", "https://idp", "broker").is_err());
    }

    #[test]
    fn a_consent_link_names_its_caller_and_server_and_opens_only_here() {
        let e = Engine::new();
        let link = e.consent_link("alice", "crm", None);
        let t = link.split("?t=").nth(1).unwrap();
        let ticket = Ticket::open(&e.sealer(), t, now()).unwrap();
        assert_eq!(
            (ticket.sub.as_str(), ticket.server.as_str()),
            ("alice", "crm")
        );
        let other = Engine::new();
        assert!(
            Ticket::open(&other.sealer(), t, now()).is_err(),
            "another broker's key"
        );
        other.set_secret_key("0123456789abcdef0123456789abcdef");
        e.set_secret_key("0123456789abcdef0123456789abcdef");
        let shared = e.consent_link("bob", "crm", None);
        let t = shared.split("?t=").nth(1).unwrap();
        assert_eq!(
            Ticket::open(&other.sealer(), t, now()).unwrap().sub,
            "bob",
            "one [cluster] key: any instance"
        );
    }
}
