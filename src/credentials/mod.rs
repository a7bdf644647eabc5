//! Outbound credentials: what the broker presents to an upstream on a caller's behalf.
//!
//! [`Credentials::resolve`] turns a server's [`UpstreamAuth`] plus the [`Caller`] (and the tool) into
//! concrete secrets: an RFC 8693 exchanged token (audience = that upstream, scope narrowed to the
//! tool), a field of a Vault secret, or a static value; `first = [...]` chains fall back in order.
//! The caller's own token is only ever the `subject_token` of an exchange; it never goes upstream.
//! Every secret stays wrapped in [`Secret`]; errors never contain one.
//!
//! Exchanged tokens and Vault secrets are cached in this instance's memory; with `[cluster]
//! share_credentials = true` also in Redis, sealed ([`SharedCache`]).

mod exchange;
mod shared;
mod vault;

use std::collections::HashMap;
use std::sync::Arc;

pub use exchange::TokenExchange;
pub use shared::SharedCache;
pub use vault::VaultClient;

use crate::auth::Caller;
use crate::cluster::Cluster;
use crate::config::{Config, CredentialStore, Secret, SecretTarget, UpstreamAuth};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The token endpoint refused; `code` is its RFC 6749 §5.2 error (`invalid_scope`, …).
    #[error("token exchange for `{audience}` was refused: {code}{}", .description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    ExchangeRefused {
        audience: String,
        code: String,
        description: Option<String>,
    },
    #[error("token exchange failed: {0}")]
    Exchange(String),
    /// The caller has no token to exchange (no `[auth]`, or stdio).
    #[error("this server needs the caller's identity, but the request carries no token")]
    NoSubjectToken,
    #[error("vault: {0}")]
    Vault(String),
    #[error("vault: no secret at `{0}`")]
    VaultNotFound(String),
    #[error("vault: the secret at `{path}` has no field `{field}`")]
    VaultField { path: String, field: String },
    /// A path template value from the caller's claims is unsafe or missing.
    #[error("cannot fill the vault path: {0}")]
    Template(String),
    #[error("no [credentials.{0}] is configured")]
    UnknownStore(String),
    #[error("every credential source failed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    #[error(transparent)]
    OAuth(#[from] crate::oauth::OAuthError),
}

/// Concrete secrets for one upstream connection or request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credential {
    /// Header name → value (already formatted, e.g. `Bearer …`).
    pub headers: Vec<(String, Secret)>,
    /// Environment variables for a stdio child.
    pub env: Vec<(String, Secret)>,
    /// For audit: `token_exchange`, `vault` or `static` (never the value).
    pub kind: &'static str,
    /// What was asked for, without secrets (`exchange <audience> <scope>`, `vault <path>`): a
    /// caller's connection for one slot is replaced when the slot's secret changes.
    pub slot: String,
}

impl Credential {
    fn put(&mut self, target: &SecretTarget, value: &str) {
        match target {
            SecretTarget::Header { name, format } => self
                .headers
                .push((name.clone(), Secret::new(format.replace("{value}", value)))),
            SecretTarget::Env(var) => self.env.push((var.clone(), Secret::new(value))),
        }
    }
}

/// The named stores from `[credentials.*]`.
pub struct Credentials {
    exchanges: HashMap<String, Arc<TokenExchange>>,
    vaults: HashMap<String, Arc<VaultClient>>,
}

impl Credentials {
    /// Caches in this instance's memory only.
    pub fn new(config: &Config) -> Result<Self, CredentialError> {
        Self::with_cluster(config, None)
    }

    /// With `cluster` and its `share_credentials`, the caches are shared through Redis.
    pub fn with_cluster(
        config: &Config,
        cluster: Option<&Arc<Cluster>>,
    ) -> Result<Self, CredentialError> {
        let shared = cluster
            .filter(|c| c.config.share_credentials)
            .map(|c| Arc::new(SharedCache::new(c.clone())));
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .map_err(|e| CredentialError::Exchange(e.to_string()))?;
        let mut exchanges = HashMap::new();
        for (name, store) in &config.credentials {
            if let CredentialStore::TokenExchange(c) = store {
                exchanges.insert(
                    name.clone(),
                    Arc::new(
                        TokenExchange::new(c.clone(), http.clone()).with_shared(shared.clone()),
                    ),
                );
            }
        }
        let mut vaults = HashMap::new();
        for (name, store) in &config.credentials {
            if let CredentialStore::Vault(c) = store {
                vaults.insert(
                    name.clone(),
                    Arc::new(
                        VaultClient::new(c.clone(), http.clone(), &exchanges)
                            .with_shared(shared.clone()),
                    ),
                );
            }
        }
        Ok(Self { exchanges, vaults })
    }

    /// Whether `auth` depends on who is calling (then connections must be per caller).
    pub fn per_caller(auth: &UpstreamAuth) -> bool {
        auth.per_caller()
    }

    /// The credential for a request by `caller` to the server configured with `auth`, for `tool`
    /// (scopes narrow per tool). Fallback chains try each entry in order.
    pub async fn resolve(
        &self,
        auth: &UpstreamAuth,
        caller: &Caller,
        tool: Option<&str>,
    ) -> Result<Credential, CredentialError> {
        self.resolve_with(auth, caller, tool, false).await
    }

    /// [`Self::resolve`]; `fresh` bypasses the caches (after an upstream refused the credential).
    pub async fn resolve_with(
        &self,
        auth: &UpstreamAuth,
        caller: &Caller,
        tool: Option<&str>,
        fresh: bool,
    ) -> Result<Credential, CredentialError> {
        match auth {
            UpstreamAuth::First(list) => {
                let mut errors = Vec::new();
                for a in list {
                    match Box::pin(self.resolve_with(a, caller, tool, fresh)).await {
                        Ok(c) => return Ok(c),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                Err(CredentialError::AllFailed(errors))
            }
            UpstreamAuth::OAuth(o) => {
                let server = o.server.as_str();
                let token = crate::oauth::engine()
                    .token(server, o, caller, fresh)
                    .await?;
                Ok(Credential {
                    slot: format!("{} {server}", o.kind()),
                    headers: vec![(
                        "Authorization".into(),
                        Secret::new(format!("Bearer {}", token.expose())),
                    )],
                    env: Vec::new(),
                    kind: o.kind(),
                })
            }
            UpstreamAuth::Static(values) => {
                let mut c = Credential {
                    kind: "static",
                    slot: "static".into(),
                    ..Default::default()
                };
                for (target, value) in values {
                    c.put(target, value.expose());
                }
                Ok(c)
            }
            UpstreamAuth::Exchange {
                client,
                audience,
                scopes,
                tool_scopes,
                ttl,
            } => {
                let ex = self
                    .exchanges
                    .get(client)
                    .ok_or_else(|| CredentialError::UnknownStore(client.clone()))?;
                let subject = caller
                    .token
                    .as_ref()
                    .ok_or(CredentialError::NoSubjectToken)?;
                let mut wanted = scopes.clone();
                if let Some(extra) = tool.and_then(|t| tool_scopes.get(t)) {
                    wanted.extend(extra.iter().cloned());
                }
                wanted.sort();
                wanted.dedup();
                let slot = format!("exchange {client} {audience} {}", wanted.join(" "));
                let token = ex.exchange(subject, audience, &wanted, *ttl, fresh).await?;
                Ok(Credential {
                    slot,
                    headers: vec![(
                        "Authorization".into(),
                        Secret::new(format!("Bearer {}", token.expose())),
                    )],
                    env: vec![("MCP_UPSTREAM_TOKEN".into(), token)],
                    kind: "token_exchange",
                })
            }
            UpstreamAuth::Vault {
                store,
                path,
                field,
                target,
            } => {
                let v = self
                    .vaults
                    .get(store)
                    .ok_or_else(|| CredentialError::UnknownStore(store.clone()))?;
                let path = fill_template(path, caller)?;
                let value = v.read_field(&path, field, caller, fresh).await?;
                let mut c = Credential {
                    kind: "vault",
                    slot: format!("vault {store} {path} {field}"),
                    ..Default::default()
                };
                c.put(target, value.expose());
                Ok(c)
            }
        }
    }
}

/// Fill `{sub}`, `{client_id}` and `{claims.NAME}` in a Vault path. Each value must be one plain path
/// segment (`A-Z a-z 0-9 . _ @ -`, not `.` or `..`), so a claim can never reach another path.
pub fn fill_template(path: &str, caller: &Caller) -> Result<String, CredentialError> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| CredentialError::Template(format!("unclosed `{{` in `{path}`")))?;
        let name = &rest[open + 1..open + close];
        let value = match name {
            // A client acting for no user has no user subject: a per-user path must not be derived
            // from it (its `sub` is `client.<id>`, which a user's path could otherwise be named after).
            "sub" if caller.is_client() => {
                return Err(CredentialError::Template(format!(
                    "`{{sub}}` in `{path}` names a user, and this caller is the OAuth client `{}` acting for no user (its token has no `sub`); a path for clients can use `{{client_id}}`",
                    caller.client_id.as_deref().unwrap_or("?")
                )));
            }
            "sub" => Some(caller.sub.clone()),
            "client_id" => caller.client_id.clone(),
            _ => match name.strip_prefix("claims.") {
                Some(claim) => caller
                    .claims
                    .get(claim)
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                None => {
                    return Err(CredentialError::Template(format!(
                        "unknown placeholder `{{{name}}}`"
                    )));
                }
            },
        }
        .ok_or_else(|| CredentialError::Template(format!("the caller has no `{name}`")))?;
        let safe = !value.is_empty()
            && value != "."
            && value != ".."
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'));
        if !safe {
            return Err(CredentialError::Template(format!(
                "the caller's `{name}` is not a safe path segment"
            )));
        }
        out.push_str(&value);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sub: &str) -> Caller {
        let mut c = Caller::anonymous();
        c.sub = sub.into();
        c.client_id = Some("agent-1".into());
        let mut claims = serde_json::Map::new();
        claims.insert("team".into(), "ops".into());
        c.claims = Arc::new(claims);
        c
    }

    #[test]
    fn templates_fill_and_refuse_injection() {
        let p = "secret/data/mcp/{sub}/{claims.team}/{client_id}";
        assert_eq!(
            fill_template(p, &caller("alice@example.com")).unwrap(),
            "secret/data/mcp/alice@example.com/ops/agent-1"
        );
        for evil in ["..", "a/b", "../../sys", "", "x y", "a%2fb"] {
            assert!(
                fill_template(p, &caller(evil)).is_err(),
                "`{evil}` must be refused"
            );
        }
        assert!(fill_template("secret/{nope}", &caller("a")).is_err());
        assert!(fill_template("secret/{claims.missing}", &caller("a")).is_err());
    }

    #[test]
    fn sub_template_refuses_a_client_without_a_user() {
        let mut c = caller("client.alice");
        c.client_id = Some("alice".into());
        c.authenticated = true;
        let e = fill_template("secret/data/users/{sub}/key", &c).unwrap_err();
        assert!(
            e.to_string().contains("acting for no user"),
            "unclear refusal: {e}"
        );
        // The same client may use a path named after the client.
        assert_eq!(
            fill_template("secret/data/clients/{client_id}/key", &c).unwrap(),
            "secret/data/clients/alice/key"
        );
    }

    #[test]
    fn static_credentials_and_chains() {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("c.toml"),
            "[servers.s]\ntransport = \"http\"\nurl = \"http://h/mcp\"\nupstream_auth = { first = [ { kind = \"static\", header = \"X-Api-Key\", value = \"k1\" } ] }\n[servers.c]\ntransport = \"stdio\"\ncommand = \"x\"\nupstream_auth = { kind = \"static\", env = { API_KEY = \"k2\" } }\n",
            &|_| None,
        )
        .unwrap();
        let creds = Credentials::new(&cfg).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = cfg.servers[0].upstream_auth.as_ref().unwrap();
        assert!(!Credentials::per_caller(a));
        let c = rt.block_on(creds.resolve(a, &caller("a"), None)).unwrap();
        assert_eq!(
            c.headers,
            vec![("X-Api-Key".to_string(), Secret::new("k1"))]
        );
        assert_eq!(c.kind, "static");
        let c = rt
            .block_on(creds.resolve(
                cfg.servers[1].upstream_auth.as_ref().unwrap(),
                &caller("a"),
                None,
            ))
            .unwrap();
        assert_eq!(c.env, vec![("API_KEY".to_string(), Secret::new("k2"))]);
        assert!(!format!("{c:?}").contains("k2"));
    }
}
