//! Who is calling: the OAuth 2.1 resource-server side of the broker.
//!
//! [`Authenticator::authenticate`] turns a bearer token into a [`Caller`]: JWTs are validated with the
//! `jsonwebtoken` crate against the issuer's JWKS (asymmetric algorithms only, `iss`, `aud` = our
//! resource, `exp`/`nbf` with a small leeway, required scopes); opaque tokens go to RFC 7662
//! introspection when configured. Keys are cached; an unknown `kid` refreshes them at most once per
//! [`KEY_REFRESH_INTERVAL`], and cached keys keep working while the issuer is down. Nothing here knows
//! HTTP status codes: the front maps [`AuthError`] to RFC 6750 challenges.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde_json::{Map, Value};

use crate::config::{AuthConfig, Secret};

mod cache;
mod introspection;

use cache::{TokenDigest, Verdicts};

/// An unknown `kid` triggers at most one JWKS fetch per this interval.
pub const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;
/// The prefix of a caller whose token names a client and no user (no `sub`): `client.<client_id>`.
/// User tokens whose `sub` starts with it are refused, so the two kinds of subject can never meet.
pub const CLIENT_SUBJECT_PREFIX: &str = "client.";

/// Algorithms accepted for access tokens: asymmetric only, so a public key can never be used as an
/// HMAC secret (algorithm confusion), and never `none`.
const ALLOWED_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The identity behind a request, as the broker's policy and audit see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The subject, the key of sessions, rate-limit buckets, per-caller connections and audit records:
    /// the token's `sub`; `client.<client_id>` for a token that names a client and no user (see
    /// [`Caller::is_client`]); a fixed label when there is no token.
    pub sub: String,
    /// The OAuth client the subject used (`client_id`, else `azp`), when known.
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    /// Values of the configured group/role claims.
    pub groups: Vec<String>,
    /// The delegation chain from nested `act` claims, nearest actor first.
    pub act: Vec<String>,
    /// Every claim, for policy `claims` conditions.
    pub claims: Arc<Map<String, Value>>,
    /// Whether this caller proved an identity (false without `[auth]`).
    pub authenticated: bool,
    /// The validated inbound token: only ever sent to the token-exchange endpoint as the
    /// `subject_token`, never to an upstream (and never logged: `Secret` redacts itself).
    pub token: Option<Secret>,
}

impl Caller {
    /// The client that launched `mcp-broker stdio`: the local user.
    pub fn local() -> Self {
        Self::unauthenticated("local")
    }

    /// An HTTP client on a broker configured without inbound auth.
    pub fn anonymous() -> Self {
        Self::unauthenticated("anonymous")
    }

    fn unauthenticated(sub: &str) -> Self {
        Self {
            sub: sub.into(),
            client_id: None,
            scopes: Vec::new(),
            groups: Vec::new(),
            act: Vec::new(),
            claims: Arc::new(Map::new()),
            authenticated: false,
            token: None,
        }
    }

    /// The caller is an OAuth client acting for no user (its token had no `sub`): it has no user
    /// subject, so nothing keyed by a user (a Vault `{sub}` path) may be derived from it. Sound because
    /// [`Authenticator`] refuses user tokens whose `sub` starts with [`CLIENT_SUBJECT_PREFIX`].
    pub fn is_client(&self) -> bool {
        self.authenticated && self.sub.starts_with(CLIENT_SUBJECT_PREFIX)
    }

    pub fn has_scope(&self, s: &str) -> bool {
        self.scopes.iter().any(|x| x == s)
    }

    /// The claim equals `value`, or is an array that contains it.
    pub fn claim_matches(&self, claim: &str, value: &str) -> bool {
        match self.claims.get(claim) {
            Some(Value::String(s)) => s == value,
            Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(value)),
            Some(Value::Bool(b)) => b.to_string() == value,
            Some(Value::Number(n)) => n.to_string() == value,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// RFC 6750 `invalid_token`; the text is safe to show (it never contains the token).
    #[error("{0}")]
    InvalidToken(String),
    /// RFC 6750 `insufficient_scope`: the scopes the request needs.
    #[error("the token lacks the required scope(s) {}", .0.join(" "))]
    InsufficientScope(Vec<String>),
    /// Keys could not be obtained and none are cached.
    #[error("cannot verify tokens right now: {0}")]
    Unavailable(String),
}

fn invalid(msg: impl Into<String>) -> AuthError {
    AuthError::InvalidToken(msg.into())
}

#[derive(Default)]
struct KeyCache {
    jwks_uri: Option<url::Url>,
    keys: Option<Arc<JwkSet>>,
    fetched_at: Option<Instant>,
}

pub struct Authenticator {
    config: AuthConfig,
    http: reqwest::Client,
    keys: tokio::sync::RwLock<KeyCache>,
    /// One JWKS fetch at a time; waiters re-check the cache after it.
    refresh: tokio::sync::Mutex<()>,
    /// Opaque tokens found active → their caller (see [`introspection`] for the TTLs and bounds).
    introspected: Verdicts<Caller>,
    /// Opaque tokens found not valid → why: kept apart from `introspected` so a flood of made-up
    /// tokens evicts only other made-up tokens, never a real caller's answer.
    refused: Verdicts<String>,
    /// The introspection call under way for each token (single flight).
    in_flight: DashMap<TokenDigest, introspection::InFlight>,
    /// JWTs already verified (by SHA-256 of the token) → their caller, until the token expires or
    /// [`VERIFIED_TTL`] passes, whichever is first: a client's repeated calls skip the signature check.
    verified: Verdicts<Caller>,
}

/// How long a verified JWT is trusted without checking its signature again; bounds how long a
/// token keeps working after its key is withdrawn from the JWKS.
const VERIFIED_TTL: Duration = Duration::from_secs(60);
const VERIFIED_MAX: usize = 10_000;

/// Whole seconds until the token's `exp` (None when absent or already past).
fn seconds_left(claims: &Map<String, Value>) -> Option<u64> {
    let exp = claims.get("exp").and_then(Value::as_u64)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    exp.checked_sub(now).filter(|s| *s > 0)
}

impl Authenticator {
    pub fn new(config: AuthConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            keys: tokio::sync::RwLock::new(KeyCache {
                jwks_uri: config.jwks_uri.clone(),
                ..Default::default()
            }),
            config,
            http,
            refresh: tokio::sync::Mutex::new(()),
            introspected: Verdicts::new(introspection::CACHE_MAX),
            refused: Verdicts::new(introspection::CACHE_MAX),
            in_flight: DashMap::new(),
            verified: Verdicts::new(VERIFIED_MAX),
        })
    }

    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// Validate a bearer token and check the broker-wide required scopes.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        let is_jwt = token.split('.').count() == 3;
        let digest = cache::digest(token);
        if is_jwt && let Some(mut caller) = self.verified.get(&digest) {
            caller.token = Some(Secret::new(token));
            return Ok(caller);
        }
        let caller = if is_jwt {
            self.validate_jwt(token).await?
        } else if self.config.introspection.is_some() {
            self.introspect(token).await?
        } else {
            return Err(invalid(
                "the token is not a JWT and introspection is not configured",
            ));
        };
        let mut caller = caller;
        caller.token = Some(Secret::new(token));
        let missing: Vec<String> = self
            .config
            .required_scopes
            .iter()
            .filter(|s| !caller.has_scope(s))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(AuthError::InsufficientScope(
                self.config.required_scopes.clone(),
            ));
        }
        if is_jwt && let Some(left) = seconds_left(&caller.claims) {
            let mut cached = caller.clone();
            cached.token = None;
            self.verified
                .insert(digest, cached, VERIFIED_TTL.min(Duration::from_secs(left)));
        }
        Ok(caller)
    }

    async fn validate_jwt(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            invalid("the token header is malformed or names an unsupported algorithm")
        })?;
        if !ALLOWED_ALGS.contains(&header.alg) {
            return Err(invalid(format!(
                "tokens signed with {:?} are not accepted",
                header.alg
            )));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.validate_exp = true;
        // Audience is compared below in canonical form (RFC 8707 / MCP canonical server URI).
        v.validate_aud = false;
        v.set_issuer(&[&self.config.issuer]);
        v.set_required_spec_claims(&["exp", "iss"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            invalid(match e.kind() {
                K::ExpiredSignature => "the token has expired",
                K::ImmatureSignature => "the token is not valid yet (nbf)",
                K::InvalidIssuer => "the token was issued by another issuer",
                K::InvalidSignature => "the token signature is invalid",
                K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                    "the token algorithm does not match its key"
                }
                K::MissingRequiredClaim(_) => "the token lacks a required claim (exp, iss)",
                _ => "the token is invalid",
            })
        })?;
        let claims = data.claims;
        if !audience_matches(claims.get("aud"), &self.config.audience) {
            return Err(invalid("the token was not issued for this resource (aud)"));
        }
        self.caller_from(claims)
    }

    fn caller_from(&self, claims: Map<String, Value>) -> Result<Caller, AuthError> {
        let client_id = claims
            .get("client_id")
            .or_else(|| claims.get("azp"))
            .and_then(Value::as_str)
            .map(str::to_string);
        // A machine token (client credentials) may name only its client. It has no user subject: it is
        // the caller `client.<client_id>`, never a user whose `sub` happens to equal the client id.
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let sub = match (user, client_id.as_deref().filter(|c| !c.is_empty())) {
            (Some(u), _) if u.starts_with(CLIENT_SUBJECT_PREFIX) => {
                return Err(invalid(format!(
                    "the token's subject (sub) starts with `{CLIENT_SUBJECT_PREFIX}`, which this broker \
                     reserves for clients acting for no user"
                )));
            }
            (Some(u), _) => u.to_string(),
            (None, Some(c)) => format!("{CLIENT_SUBJECT_PREFIX}{c}"),
            (None, None) => {
                return Err(invalid(
                    "the token names no subject (sub) and no client (client_id, azp)",
                ));
            }
        };
        let scopes = match claims.get("scope").or_else(|| claims.get("scp")) {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut groups = Vec::new();
        for c in &self.config.group_claims {
            match claims.get(c) {
                Some(Value::String(s)) => groups.push(s.clone()),
                Some(Value::Array(a)) => {
                    groups.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
                }
                _ => {}
            }
        }
        let mut act = Vec::new();
        let mut cursor = claims.get("act");
        while let Some(Value::Object(a)) = cursor {
            if let Some(s) = a.get("sub").and_then(Value::as_str) {
                act.push(s.to_string());
            }
            cursor = a.get("act");
            if act.len() > 16 {
                break;
            }
        }
        Ok(Caller {
            sub,
            client_id,
            scopes,
            groups,
            act,
            claims: Arc::new(claims),
            authenticated: true,
            token: None,
        })
    }

    /// The verification key for `kid` (or the only suitable key when the token names none).
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        if let Some(k) = self.cached_key(kid, alg).await {
            return k;
        }
        let _one = self.refresh.lock().await;
        // Another request may have refreshed while this one waited.
        if let Some(k) = self.cached_key(kid, alg).await {
            return k;
        }
        let recent = self
            .keys
            .read()
            .await
            .fetched_at
            .is_some_and(|t| t.elapsed() < KEY_REFRESH_INTERVAL);
        let have_keys = self.keys.read().await.keys.is_some();
        if recent && have_keys {
            return Err(invalid("the token is signed with an unknown key (kid)"));
        }
        match self.fetch_keys().await {
            Ok(set) => {
                let mut c = self.keys.write().await;
                c.keys = Some(Arc::new(set));
                c.fetched_at = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch the issuer's JWKS; keeping cached keys");
                let mut c = self.keys.write().await;
                c.fetched_at = Some(Instant::now());
                if c.keys.is_none() {
                    return Err(AuthError::Unavailable(e));
                }
            }
        }
        self.cached_key(kid, alg)
            .await
            .unwrap_or_else(|| Err(invalid("the token is signed with an unknown key (kid)")))
    }

    async fn cached_key(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Option<Result<DecodingKey, AuthError>> {
        let keys = self.keys.read().await.keys.clone()?;
        let jwk = match kid {
            Some(k) => keys.find(k)?,
            None => {
                let mut usable = keys.keys.iter().filter(|k| {
                    k.common
                        .key_algorithm
                        .is_none_or(|ka| ka.to_string() == format!("{alg:?}"))
                });
                match (usable.next(), usable.next()) {
                    (Some(only), None) => only,
                    _ => {
                        return Some(Err(invalid(
                            "the token names no key (kid) and the issuer has several",
                        )));
                    }
                }
            }
        };
        Some(
            DecodingKey::from_jwk(jwk)
                .map_err(|_| invalid("the issuer's key for this token is unusable")),
        )
    }

    async fn fetch_keys(&self) -> Result<JwkSet, String> {
        // Bind first: a guard in the match scrutinee would live through the arms (and the write below).
        let known = self.keys.read().await.jwks_uri.clone();
        let uri = match known {
            Some(u) => u,
            None => {
                let u = self.discover_jwks_uri().await?;
                self.keys.write().await.jwks_uri = Some(u.clone());
                u
            }
        };
        let resp = self
            .http
            .get(uri.as_str())
            .send()
            .await
            .map_err(|e| format!("GET {uri}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {uri}: HTTP {}", resp.status()));
        }
        resp.json::<JwkSet>()
            .await
            .map_err(|e| format!("GET {uri}: not a JWK set: {e}"))
    }

    /// RFC 8414 authorization-server metadata, then OpenID discovery; the `jwks_uri` learned there is
    /// held to the SSRF rule: https, or the issuer's own origin.
    async fn discover_jwks_uri(&self) -> Result<url::Url, String> {
        let issuer = url::Url::parse(&self.config.issuer).map_err(|e| e.to_string())?;
        let path = issuer.path().trim_end_matches('/');
        let origin = issuer.origin().ascii_serialization();
        let candidates = [
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!(
                "{}/.well-known/openid-configuration",
                self.config.issuer.trim_end_matches('/')
            ),
        ];
        let mut last = String::new();
        for c in candidates {
            let doc = match self.http.get(&c).send().await {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.ok(),
                Ok(r) => {
                    last = format!("GET {c}: HTTP {}", r.status());
                    continue;
                }
                Err(e) => {
                    last = format!("GET {c}: {e}");
                    continue;
                }
            };
            let Some(doc) = doc else {
                last = format!("GET {c}: not JSON");
                continue;
            };
            if doc.get("issuer").and_then(Value::as_str) != Some(self.config.issuer.as_str()) {
                return Err(format!(
                    "{c}: its `issuer` does not match the configured issuer"
                ));
            }
            let jwks = doc
                .get("jwks_uri")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("{c}: no jwks_uri"))?;
            let u = url::Url::parse(jwks).map_err(|e| format!("{c}: jwks_uri: {e}"))?;
            if !learned_url_allowed(&u, &issuer) {
                return Err(format!(
                    "{c}: refusing jwks_uri {u}: it must be https and not a private address, or on the issuer's origin"
                ));
            }
            return Ok(u);
        }
        Err(last)
    }

    /// The RFC 9728 Protected Resource Metadata document for `resource` (our public URL).
    pub fn metadata_document(&self, resource: &str) -> Value {
        let mut doc = serde_json::json!({
            "resource": resource,
            "authorization_servers": [self.config.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "mcp-broker",
        });
        // RS-8: `offline_access` is not advertised (clients would ask for refresh tokens they need not hold).
        let scopes: Vec<&String> = self
            .config
            .scopes_supported
            .iter()
            .filter(|s| *s != "offline_access")
            .collect();
        if !scopes.is_empty() {
            doc["scopes_supported"] = serde_json::json!(scopes);
        }
        doc
    }
}

/// `aud` (a string or an array) contains `expected`, compared as canonical URIs: scheme and host
/// case-insensitive, no trailing slash, no fragment.
fn audience_matches(aud: Option<&Value>, expected: &str) -> bool {
    let want = canonical(expected);
    let one = |v: &Value| {
        v.as_str()
            .is_some_and(|s| want.is_some() && canonical(s) == want)
    };
    match aud {
        Some(Value::Array(a)) => a.iter().any(one),
        Some(v) => one(v),
        None => false,
    }
}

fn canonical(uri: &str) -> Option<String> {
    match url::Url::parse(uri) {
        Ok(u) if u.fragment().is_none() => {
            // `Url` lower-cases scheme and host already.
            Some(u.as_str().trim_end_matches('/').to_string())
        }
        Ok(_) => None,
        // Not a URL (some issuers use plain identifiers): exact comparison.
        Err(_) => Some(uri.to_string()),
    }
}

/// The SSRF rule for URLs learned at run time: the configured issuer's own origin, or https to a
/// host that is not a loopback, private, link-local or otherwise special address.
fn learned_url_allowed(u: &url::Url, issuer: &url::Url) -> bool {
    if u.origin() == issuer.origin() {
        return true;
    }
    if u.scheme() != "https" {
        return false;
    }
    match u.host() {
        Some(url::Host::Ipv4(ip)) => {
            !(ip.is_loopback()
                || ip.is_private()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_multicast())
        }
        Some(url::Host::Ipv6(ip)) => {
            let seg = ip.segments()[0];
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (seg & 0xfe00) == 0xfc00
                || (seg & 0xffc0) == 0xfe80)
        }
        Some(url::Host::Domain(d)) => d != "localhost" && !d.ends_with(".localhost"),
        None => false,
    }
}

/// Session ids bound to the subject that created them (a session id is never a credential).
#[derive(Default)]
pub struct SessionOwners {
    owners: DashMap<String, Owner>,
}

struct Owner {
    sub: String,
    seen: Instant,
    /// When this instance last told the cluster the session is in use (`[cluster]`).
    touched: Instant,
}

impl SessionOwners {
    const MAX: usize = 100_000;

    /// Whether `sub` may use `session`: it opened it, or the session is unknown here (rmcp then
    /// answers 404 itself, or, under `[cluster]`, the front asks Redis first).
    pub fn may_use(&self, session: &str, sub: &str) -> bool {
        match self.owners.get_mut(session) {
            Some(mut o) if o.sub == sub => {
                o.seen = Instant::now();
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Whether this instance knows who owns `session`.
    pub fn knows(&self, session: &str) -> bool {
        self.owners.contains_key(session)
    }

    pub fn bind(&self, session: &str, sub: &str, idle: Duration) {
        if self.owners.len() >= Self::MAX {
            self.owners.retain(|_, o| o.seen.elapsed() < idle);
        }
        let now = Instant::now();
        self.owners.insert(
            session.to_string(),
            Owner {
                sub: sub.to_string(),
                seen: now,
                touched: now,
            },
        );
    }

    /// Whether the cluster was last told of `session` at least `every` ago (and mark it told now).
    pub fn touch_due(&self, session: &str, every: Duration) -> bool {
        match self.owners.get_mut(session) {
            Some(mut o) if o.touched.elapsed() >= every => {
                o.touched = Instant::now();
                true
            }
            _ => false,
        }
    }

    pub fn forget(&self, session: &str) {
        self.owners.remove(session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_is_compared_canonically() {
        let want = "https://mcp.example.com/mcp";
        assert!(audience_matches(
            Some(&Value::from("https://MCP.example.com/mcp/")),
            want
        ));
        assert!(audience_matches(
            Some(&serde_json::json!(["other", "https://mcp.example.com/mcp"])),
            want
        ));
        assert!(!audience_matches(
            Some(&Value::from("https://mcp.example.com/mcp#x")),
            want
        ));
        assert!(!audience_matches(
            Some(&Value::from("https://evil.example.com/mcp")),
            want
        ));
        assert!(!audience_matches(None, want));
    }

    #[test]
    fn metadata_omits_offline_access() {
        let a = Authenticator::new(crate::config::AuthConfig {
            issuer: "https://idp".into(),
            jwks_uri: None,
            audience: "https://mcp/mcp".into(),
            required_scopes: vec![],
            scopes_supported: vec!["mcp:tools".into(), "offline_access".into()],
            introspection: None,
            group_claims: vec![],
            admin_scopes: vec![],
        })
        .unwrap();
        let doc = a.metadata_document("https://mcp/mcp");
        assert_eq!(doc["scopes_supported"], serde_json::json!(["mcp:tools"]));
        assert_eq!(doc["resource"], "https://mcp/mcp");
    }

    #[test]
    fn learned_urls_are_ssrf_guarded() {
        let issuer = url::Url::parse("https://idp.example.com/realm").unwrap();
        let ok = |s: &str| learned_url_allowed(&url::Url::parse(s).unwrap(), &issuer);
        assert!(ok("https://idp.example.com/jwks"));
        assert!(ok("https://keys.example.net/jwks"));
        assert!(!ok("http://keys.example.net/jwks"));
        assert!(!ok("https://169.254.169.254/latest/meta-data/"));
        assert!(!ok("https://10.0.0.1/jwks"));
        assert!(!ok("https://[fe80::1]/jwks"));
        assert!(!ok("https://localhost/jwks"));
        let local = url::Url::parse("http://127.0.0.1:9400").unwrap();
        assert!(learned_url_allowed(
            &url::Url::parse("http://127.0.0.1:9400/jwks").unwrap(),
            &local
        ));
    }

    #[test]
    fn claims_conditions_and_act_chain() {
        let a = Authenticator::new(crate::config::AuthConfig {
            issuer: "https://idp".into(),
            jwks_uri: None,
            audience: "https://mcp/mcp".into(),
            required_scopes: vec![],
            scopes_supported: vec![],
            introspection: None,
            group_claims: vec!["groups".into()],
            admin_scopes: vec![],
        })
        .unwrap();
        let claims = serde_json::json!({
            "sub": "alice", "azp": "agent", "scope": "a b", "groups": ["finance", "ops"],
            "act": {"sub": "broker", "act": {"sub": "gateway"}}
        });
        let Value::Object(m) = claims else { panic!() };
        let c = a.caller_from(m).unwrap();
        assert_eq!(c.client_id.as_deref(), Some("agent"));
        assert_eq!(c.scopes, ["a", "b"]);
        assert_eq!(c.groups, ["finance", "ops"]);
        assert_eq!(c.act, ["broker", "gateway"]);
        assert!(c.claim_matches("groups", "finance"));
        assert!(!c.claim_matches("groups", "hr"));
    }

    fn authenticator(introspection: Option<crate::config::IntrospectionConfig>) -> Authenticator {
        Authenticator::new(crate::config::AuthConfig {
            issuer: "https://idp".into(),
            jwks_uri: None,
            audience: "https://mcp/mcp".into(),
            required_scopes: vec![],
            scopes_supported: vec![],
            introspection,
            group_claims: vec![],
            admin_scopes: vec![],
        })
        .unwrap()
    }

    fn caller_of(a: &Authenticator, claims: Value) -> Result<Caller, AuthError> {
        let Value::Object(m) = claims else { panic!() };
        a.caller_from(m)
    }

    #[test]
    fn a_token_without_sub_is_its_client_never_a_user() {
        let a = authenticator(None);
        let c = caller_of(&a, serde_json::json!({"client_id": "alice", "scope": "s"})).unwrap();
        assert_eq!(c.sub, "client.alice");
        assert!(c.is_client());
        let c = caller_of(&a, serde_json::json!({"azp": "agent", "sub": ""})).unwrap();
        assert_eq!(c.sub, "client.agent");
        let c = caller_of(&a, serde_json::json!({"sub": "alice", "client_id": "cli"})).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(!c.is_client());
        // A user subject can never pose as a client subject, and a token naming neither is refused.
        for bad in [
            serde_json::json!({"sub": "client.alice", "client_id": "x"}),
            serde_json::json!({"scope": "s"}),
            serde_json::json!({"client_id": ""}),
        ] {
            assert!(
                matches!(caller_of(&a, bad.clone()), Err(AuthError::InvalidToken(_))),
                "{bad} must be refused"
            );
        }
    }

    /// A stand-in RFC 7662 endpoint that counts the calls it gets: the single-flight and refusal caches
    /// are only observable as "how many calls reached the authorization server", so the test needs a real
    /// HTTP endpoint (the authenticator's reqwest client), and a loopback axum handler is the smallest one.
    async fn counting_introspection(
        answer: Value,
        delay: Duration,
        status: u16,
    ) -> (
        crate::config::IntrospectionConfig,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let app = axum::Router::new().route(
            "/introspect",
            axum::routing::post(move || {
                let counter = counter.clone();
                let answer = answer.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        axum::Json(answer),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let cfg = crate::config::IntrospectionConfig {
            endpoint: url::Url::parse(&format!("http://{addr}/introspect")).unwrap(),
            client_id: "broker".into(),
            client_secret: Secret::new("s"),
        };
        (cfg, calls)
    }

    fn calls(c: &std::sync::atomic::AtomicUsize) -> usize {
        c.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn an_inactive_token_is_introspected_once_then_refused_from_memory() {
        let (cfg, n) =
            counting_introspection(serde_json::json!({"active": false}), Duration::ZERO, 200).await;
        let a = authenticator(Some(cfg));
        for _ in 0..100 {
            let r = a.authenticate("made-up-token").await;
            assert!(matches!(r, Err(AuthError::InvalidToken(_))));
        }
        assert_eq!(calls(&n), 1, "100 repeats of one inactive token");
        // Another token is another question.
        assert!(a.authenticate("another-made-up-token").await.is_err());
        assert_eq!(calls(&n), 2);
        // The refusal is kept by digest, never by the token.
        assert!(a.refused.get(&cache::digest("made-up-token")).is_some());
    }

    #[tokio::test]
    async fn concurrent_requests_with_one_token_share_one_introspection() {
        let (cfg, n) = counting_introspection(
            serde_json::json!({"active": true, "sub": "alice", "client_id": "cli", "scope": "mcp:tools"}),
            Duration::from_millis(300),
            200,
        )
        .await;
        let a = Arc::new(authenticator(Some(cfg)));
        let waits: Vec<_> = (0..50)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.authenticate("opaque-1").await })
            })
            .collect();
        for w in waits {
            let c = w.await.unwrap().unwrap();
            assert_eq!(c.sub, "alice");
        }
        assert_eq!(calls(&n), 1, "50 concurrent requests with one token");
        assert!(a.in_flight.is_empty(), "the finished call is not kept");
        // A later request is answered from the active cache.
        assert_eq!(a.authenticate("opaque-1").await.unwrap().sub, "alice");
        assert_eq!(calls(&n), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_with_an_inactive_token_share_one_introspection() {
        let (cfg, n) = counting_introspection(
            serde_json::json!({"active": false}),
            Duration::from_millis(300),
            200,
        )
        .await;
        let a = Arc::new(authenticator(Some(cfg)));
        let waits: Vec<_> = (0..50)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move { a.authenticate("opaque-2").await })
            })
            .collect();
        for w in waits {
            assert!(matches!(w.await.unwrap(), Err(AuthError::InvalidToken(_))));
        }
        assert_eq!(calls(&n), 1);
    }

    #[tokio::test]
    async fn distinct_tokens_in_flight_are_capped() {
        let (cfg, n) = counting_introspection(
            serde_json::json!({"active": false}),
            Duration::from_millis(500),
            200,
        )
        .await;
        let a = Arc::new(authenticator(Some(cfg)));
        let extra = 40;
        let waits: Vec<_> = (0..introspection::IN_FLIGHT_MAX + extra)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move { a.authenticate(&format!("made-up-{i}")).await })
            })
            .collect();
        let mut busy = 0;
        for w in waits {
            if let Err(AuthError::Unavailable(_)) = w.await.unwrap() {
                busy += 1;
            }
        }
        assert!(busy >= extra, "only {busy} requests were turned away");
        assert!(
            calls(&n) <= introspection::IN_FLIGHT_MAX,
            "{} calls",
            calls(&n)
        );
    }

    #[tokio::test]
    async fn an_unreachable_introspection_is_not_remembered() {
        let (cfg, n) =
            counting_introspection(serde_json::json!({"error": "x"}), Duration::ZERO, 500).await;
        let a = authenticator(Some(cfg));
        for _ in 0..3 {
            assert!(matches!(
                a.authenticate("opaque-3").await,
                Err(AuthError::Unavailable(_))
            ));
        }
        assert_eq!(
            calls(&n),
            3,
            "a server failure says nothing about the token"
        );
        assert!(a.refused.get(&cache::digest("opaque-3")).is_none());
    }

    #[tokio::test]
    async fn introspection_without_sub_is_the_client() {
        let (cfg, _) = counting_introspection(
            serde_json::json!({"active": true, "client_id": "alice"}),
            Duration::ZERO,
            200,
        )
        .await;
        let a = authenticator(Some(cfg));
        let c = a.authenticate("opaque-4").await.unwrap();
        assert_eq!(c.sub, "client.alice");
        assert!(c.is_client());
    }

    #[test]
    fn sessions_are_bound_to_their_subject() {
        let o = SessionOwners::default();
        o.bind("s1", "alice", Duration::from_secs(60));
        assert!(o.may_use("s1", "alice"));
        assert!(!o.may_use("s1", "bob"));
        assert!(o.may_use("unknown", "bob"));
        o.forget("s1");
        assert!(o.may_use("s1", "bob"));
    }
}
