//! `servers.toml` → a validated [`Config`].
//!
//! Two stages, as in agentgateway: raw serde types (`Raw*` in the `raw` submodule, `deny_unknown_fields`
//! everywhere) are the user's surface; [`Config::parse`] normalises them into the internal types the
//! rest of the broker uses.
//! Where the keys a table takes depend on one of its values, the raw type is an enum with one variant per
//! value (a server's `transport`, a store's `kind`, a vault `login`'s `method`, the shape of
//! `upstream_auth`), so a key that does not apply cannot be written rather than being checked by hand.
//! Every error names the file, the line and the key, so `mcp-broker check` output can be acted on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

mod command;
mod guard;
mod oauth;
mod raw;
mod uri;
pub use guard::{GuardConfig, MaskPattern, OnDrift, Scan};
pub use oauth::{JagSubject, OAuthAuth, OAuthClientReg, OAuthFlow, OAuthSettings};
use raw::*;
pub use uri::{NormalUri, normalise_uri, uri_prefix};

/// Environment variables a stdio child gets from the broker when `inherit_env` is not set.
pub const DEFAULT_INHERIT_ENV: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR"];

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax errors, unknown keys and wrong types, as reported by the TOML parser.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value that parses but is not acceptable; `key` is the dotted path (`servers.ledger.url`).
    #[error("{path}:{line}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// A string that must never be logged: header values, env values. `Debug` prints `"[redacted]"`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to the value; call it where the value is sent, nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"[redacted]\"")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from; relative paths in it (a stdio `cwd`) resolve against its folder.
    pub path: PathBuf,
    pub broker: BrokerConfig,
    /// In file order: that order breaks ties when two servers expose the same name.
    pub servers: Vec<ServerConfig>,
    /// Inbound OAuth; `None` = no authentication (loopback only unless explicitly overridden).
    pub auth: Option<AuthConfig>,
    /// `[[policy]]` rules, in file order: the first that applies decides.
    pub policy: Vec<PolicyRule>,
    /// `[policy_engine]`: an OPA Rego policy evaluated after the rules.
    pub rego: Option<RegoConfig>,
    /// `[credentials.NAME]`: named token-exchange clients and Vault stores servers `use`.
    pub credentials: IndexMap<String, CredentialStore>,
    pub audit: AuditConfig,
    /// `[limits]`: limits across servers.
    pub limits: GlobalLimits,
    /// Identifies the `[credentials]` section, so a reload keeps the credential caches when it is unchanged.
    pub credentials_fingerprint: String,
    /// `[cluster]`: state shared with other instances in Redis; `None` = everything in process.
    /// Read at start only (a reload that changes it is refused).
    pub cluster: Option<ClusterConfig>,
    /// `[telemetry]`: OTLP/HTTP span export; `None` = no spans. Read at start only (a reload that
    /// changes it logs a warning and keeps the running exporter).
    pub telemetry: Option<TelemetryConfig>,
    /// `[oauth]`: the broker as an OAuth client of upstream authorization servers.
    pub oauth: OAuthSettings,
    /// `[guard]`: masking, pinned definitions, description scanning, approval announcements.
    pub guard: GuardConfig,
    /// `[token_store]`: the file that keeps upstream OAuth tokens across restarts; `None` = in
    /// memory (or, under `[cluster]`, in Redis). Read at start only.
    pub token_store: Option<TokenStoreConfig>,
}

/// `[token_store]`: where upstream OAuth tokens are kept, sealed with `key`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStoreConfig {
    /// Resolved against the config file's folder.
    pub path: PathBuf,
    /// At least [`MIN_SECRET_KEY`] bytes, from the environment.
    pub key: Secret,
}

/// `[telemetry]`: where spans go and how many.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP traces URL, `/v1/traces` appended when the configured URL has no path.
    pub endpoint: String,
    pub service_name: String,
    /// Sent with every export (typically a collector's API key, hence secret).
    pub headers: Vec<(String, Secret)>,
    /// Fraction of traces started here that are recorded (a sampled parent is always followed).
    pub sample_ratio: f64,
}

/// `[cluster]`: several broker instances behind one load balancer, sharing state in Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// `redis://[user:password@]host:port[/db]` (may hold a password, hence secret).
    pub redis_url: Secret,
    /// This instance's name in Redis and in logs; default `HOSTNAME-PID`.
    pub instance_id: String,
    /// Signs and encrypts what any instance must be able to verify (sealed `requestState`, shared
    /// credentials); at least 32 bytes.
    pub secret_key: Secret,
    /// Store exchanged tokens and Vault secrets in Redis (encrypted with `secret_key`).
    pub share_credentials: bool,
}

/// `[broker] tls`: the listener's certificate chain and private key, PEM files (relative to the
/// config file's folder).
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The fewest bytes `[cluster] secret_key` may have.
pub const MIN_SECRET_KEY: usize = 32;

/// `[audit]`: where decision records go and how arguments appear in them.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// A JSONL file (resolved against the config file's folder), rotated at `max_file_bytes`.
    pub file: Option<PathBuf>,
    pub stdout: bool,
    /// Records also go to the log on stderr (the `mcp_broker::audit` target; list records at debug).
    pub stderr: bool,
    pub arguments: AuditArguments,
    pub max_file_bytes: u64,
    /// Rotated files kept: `audit.jsonl.1` … `audit.jsonl.N`.
    pub keep_files: usize,
    /// Records waiting to be written; when full, new records are counted as dropped, never waited for.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            file: None,
            stdout: false,
            stderr: false,
            arguments: AuditArguments::Hash,
            max_file_bytes: 100 * 1024 * 1024,
            keep_files: 5,
            queue: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditArguments {
    None,
    Hash,
    Full,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalLimits {
    /// Per caller (`sub`), across every server.
    pub per_caller: Option<RateLimit>,
}

/// `[servers.NAME.tool_limits.TOOL]`: overrides for one upstream tool.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolLimits {
    pub timeout: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
}

/// A named source of outbound credentials.
#[derive(Debug, Clone)]
pub enum CredentialStore {
    TokenExchange(ExchangeConfig),
    Vault(VaultConfig),
}

/// An RFC 8693 token-exchange client.
#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub token_endpoint: url::Url,
    pub client_id: String,
    pub client_secret: Secret,
    /// `client_secret_post` sends the secret in the form instead of HTTP Basic.
    pub secret_in_body: bool,
    /// Delegation: send the broker's own client-credentials token as `actor_token`.
    pub actor: bool,
}

#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub address: url::Url,
    /// 2 (default): `data.data` holds the secret; 1: `data` does.
    pub kv_version: u8,
    pub login: VaultLogin,
    /// How long a read secret is reused (KV v2 reports lease_duration 0).
    pub cache_ttl: Duration,
    pub namespace: Option<String>,
}

#[derive(Debug, Clone)]
pub enum VaultLogin {
    Token(Secret),
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Secret,
    },
    /// Per-user: the caller's token is exchanged for `audience` through the `exchange` client first;
    /// the broker-audience token itself never goes to Vault.
    Jwt {
        mount: String,
        role: String,
        exchange: String,
        audience: String,
    },
}

/// How a server's upstream requests are credentialed.
#[derive(Debug, Clone)]
pub enum UpstreamAuth {
    /// An RFC 8693 token for this upstream, per caller.
    Exchange {
        client: String,
        audience: String,
        scopes: Vec<String>,
        tool_scopes: BTreeMap<String, Vec<String>>,
        /// Caps how long an exchanged token is reused (the token's own `exp` also bounds it).
        ttl: Option<Duration>,
    },
    /// A field of a Vault secret; `path` may use `{sub}`, `{client_id}`, `{claims.NAME}`.
    Vault {
        store: String,
        path: String,
        field: String,
        target: SecretTarget,
    },
    Static(Vec<(SecretTarget, Secret)>),
    /// A token from the upstream's own authorization server (`crate::oauth`).
    OAuth(OAuthAuth),
    /// Tried in order; the first that yields a credential is used.
    First(Vec<UpstreamAuth>),
}

impl UpstreamAuth {
    /// Whether the credential depends on the caller (so one connection cannot serve everyone).
    pub fn per_caller(&self) -> bool {
        match self {
            Self::Exchange { .. } => true,
            Self::Vault { path, .. } => path.contains('{'),
            Self::Static(_) => false,
            Self::OAuth(o) => o.per_caller(),
            Self::First(list) => list.iter().any(Self::per_caller),
        }
    }
}

/// Which MCP revision the broker speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    /// Probe with `server/discover` (2026-07-28); a server that does not know it gets `initialize`.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// Only `initialize` (2025-11-25 and earlier; rmcp negotiates down).
    #[serde(rename = "2025-11-25")]
    Legacy,
    /// Only `server/discover` (2026-07-28); a legacy server fails to connect.
    #[serde(rename = "2026-07-28")]
    Modern,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Legacy => "2025-11-25",
            Self::Modern => "2026-07-28",
        }
    }
}

/// Who shares an upstream connection (and, for stdio, its child process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// One connection for every caller and session.
    Shared,
    /// One connection per caller identity (and credential).
    Caller,
    /// One connection per downstream session, closed with the session.
    Session,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Caller => "caller",
            Self::Session => "session",
        }
    }
}

/// Where a secret goes: an HTTP header (with a format around the value) or a stdio child's env var.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretTarget {
    Header { name: String, format: String },
    Env(String),
}

#[derive(Debug, Clone)]
pub struct RegoConfig {
    /// Resolved against the config file's folder.
    pub path: PathBuf,
    /// The rule evaluated per decision; it yields `{"allowed": bool, "message": string}` or a bool.
    pub query: String,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Compared exactly with the token's `iss`; also where metadata is discovered from.
    pub issuer: String,
    /// Given = trusted as is; otherwise learned from the issuer's metadata.
    pub jwks_uri: Option<url::Url>,
    /// What the token's `aud` must contain: defaults to `[broker].public_url`.
    pub audience: String,
    pub required_scopes: Vec<String>,
    pub scopes_supported: Vec<String>,
    pub introspection: Option<IntrospectionConfig>,
    /// Claims read into the caller's groups (policy `claims` conditions can use any claim).
    pub group_claims: Vec<String>,
    /// A token holding one of these may use the admin endpoints (`GET /status`) on the main
    /// listener; none = those are served only on `metrics_listen`.
    pub admin_scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    pub endpoint: url::Url,
    pub client_id: String,
    pub client_secret: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    /// Allow, once someone approved (`approval` says who).
    Approve,
}

/// What an `effect = "approve"` rule asks for before a call goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    /// The rule's 1-based number (audit, and which approvers a pending call names).
    pub rule: usize,
    pub mode: ApprovalMode,
    /// `approvers.groups` (matched against the caller's groups claim).
    pub groups: Vec<String>,
    /// `approvers.subjects`.
    pub subjects: Vec<String>,
    /// How long a call waits for the decision before it is refused.
    pub timeout: Duration,
    /// The choices offered, in the order written.
    pub grants: Vec<GrantDuration>,
    /// A grant covers only calls with the same arguments (their canonical SHA-256).
    pub bind_arguments: bool,
}

impl ApprovalRule {
    /// May `caller` decide calls under this rule?
    pub fn is_approver(&self, sub: &str, groups: &[String]) -> bool {
        self.subjects.iter().any(|s| s == sub) || groups.iter().any(|g| self.groups.contains(g))
    }

    /// The offered grant written as `label`.
    pub fn grant(&self, label: &str) -> Option<&GrantDuration> {
        self.grants.iter().find(|g| g.label == label)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalMode {
    /// The calling user answers an elicitation.
    Caller,
    /// Someone in `approvers` decides (`mcp-broker approvals`, the webhook's links).
    Approver,
}

/// One grant choice: `once` (this call only) or a duration during which the same calls go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantDuration {
    /// As written (`once`, `15m`): what clients and approvers choose by.
    pub label: String,
    /// `None` = once.
    pub lasts: Option<Duration>,
}

/// One `[[policy]]` rule. `None` selectors mean "not restricted by this selector".
#[derive(Debug, Clone)]
pub struct PolicyRule {
    /// 1-based position in the file, for messages and audit.
    pub number: usize,
    pub servers: Option<Globs>,
    pub tools: Option<Globs>,
    pub prompts: Option<Globs>,
    pub resources: Option<Globs>,
    pub require_scopes: Vec<String>,
    pub claims: Vec<(String, String)>,
    pub effect: Effect,
    pub message: Option<String>,
    pub step_up: bool,
    /// With `effect = "approve"`: who approves and what they may grant.
    pub approval: Option<std::sync::Arc<ApprovalRule>>,
}

/// A compiled glob set with its source patterns.
#[derive(Clone)]
pub struct Globs {
    set: GlobSet,
    patterns: Vec<String>,
}

impl Globs {
    pub fn matches(&self, s: &str) -> bool {
        self.set.is_match(s)
    }
}

impl fmt::Debug for Globs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.patterns.fmt(f)
    }
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    /// The broker's own MCP URL: the resource identifier, and the one non-loopback Host/Origin accepted.
    pub public_url: url::Url,
    /// `tls = { cert, key }`: serve HTTPS (PEM files, read again on SIGHUP).
    pub tls: Option<TlsConfig>,
    pub separator: String,
    pub session_idle_timeout: Duration,
    pub max_request_body: usize,
    /// Serve `/metrics` (and the health endpoints) on this address instead of the MCP listener.
    pub metrics_listen: Option<SocketAddr>,
    /// On SIGTERM/ctrl-c, how long in-flight calls may run before they are cancelled.
    pub drain_timeout: Duration,
    /// Reload when the config file changes (SIGHUP always reloads).
    pub watch_config: bool,
    /// How long a session's first list waits for upstreams that are still starting.
    pub startup_wait: Duration,
    /// Open downstream sessions at most, in total and per subject.
    pub max_sessions: usize,
    pub max_sessions_per_subject: usize,
    /// A connection must deliver a request's headers within this (counted from when it connects or
    /// its previous response ended, so it is also the keep-alive idle timeout), else it is closed.
    pub header_read_timeout: Duration,
    /// An `/mcp` POST body must arrive whole within this once the broker starts reading it (after
    /// the token is checked), else 408.
    pub body_read_timeout: Duration,
    /// Open connections at most on each listener; beyond it new ones wait (unaccepted) for a slot.
    pub max_connections: usize,
    /// How long a `requestState` the broker seals for a 2026-07-28 client stays valid (and a call
    /// parked for that client's answers waits).
    pub request_state_ttl: Duration,
    /// Answer the common request of an established HTTP session (a call without progress from a
    /// client that declared no sampling, elicitation or roots; a list) as `application/json` on the
    /// front's direct lane, without rmcp's session machinery (`front::lane`). Off: every request
    /// goes through rmcp, and every call gets a resumable event stream.
    pub direct_lane: bool,
    /// `[broker] inherit_env`: the allow-list of a stdio server without its own `inherit_env` (which
    /// replaces it rather than adding to it, so no server's environment widens unseen).
    pub inherit_env: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub name: String,
    /// `""` exposes the upstream's names unchanged.
    pub prefix: String,
    pub transport: TransportConfig,
    pub tools: NameFilter,
    /// Per-request timeout; progress notifications from the upstream restart it.
    pub timeout: Duration,
    /// How long connecting plus `initialize` may take before the attempt counts as failed.
    pub connect_timeout: Duration,
    pub upstream_auth: Option<UpstreamAuth>,
    /// Who shares a connection: `caller` by default where the credential is per caller, else `shared`.
    pub isolation: Isolation,
    /// The revision spoken upstream: `auto` (discover, else initialize), `2025-11-25` or `2026-07-28`.
    pub protocol: Protocol,
    /// Per-caller connections: at most this many open (least recently used closed first).
    pub max_subjects: usize,
    /// Per-caller connections idle this long are closed (stdio children stopped).
    pub subject_idle_timeout: Duration,
    /// `/readyz` reports not ready while this server is down.
    pub required: bool,
    /// Calls to this server, from all callers together.
    pub rate_limit: Option<RateLimit>,
    /// Calls in flight to this server at once; more wait (up to the call's timeout) for a slot.
    pub max_concurrent: Option<usize>,
    /// Keyed by the upstream's own tool name.
    pub tool_limits: BTreeMap<String, ToolLimits>,
    /// Identifies this server's configuration (its table and the credential stores), so a reload can
    /// tell a changed server from an unchanged one.
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub enum TransportConfig {
    Stdio {
        command: String,
        args: Vec<String>,
        env: Vec<(String, Secret)>,
        cwd: PathBuf,
        inherit_env: Vec<String>,
        /// The line of `command` in the config file, for `check`'s "not found" error.
        command_line: usize,
    },
    Sse {
        url: url::Url,
        headers: Vec<(String, Secret)>,
        follow_redirects: FollowRedirects,
        tls: UpstreamTls,
    },
    Http {
        url: url::Url,
        headers: Vec<(String, Secret)>,
        follow_redirects: FollowRedirects,
        tls: UpstreamTls,
    },
}

/// `ca_file`, `client_cert` and `client_key` of an http or sse server: PEM files (relative to the
/// config file's folder), checked readable when the config is read, loaded when the server's
/// client is built.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamTls {
    /// Trusted besides the system's roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain and its key, for servers that require one (mutual TLS).
    pub client_identity: Option<(PathBuf, PathBuf)>,
}

impl TransportConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Stdio { .. } => "stdio",
            Self::Sse { .. } => "sse",
            Self::Http { .. } => "http",
        }
    }

    /// The URL of an http or sse server.
    pub fn url(&self) -> Option<&url::Url> {
        match self {
            Self::Stdio { .. } => None,
            Self::Sse { url, .. } | Self::Http { url, .. } => Some(url),
        }
    }

    /// The TLS settings of an http or sse server (none for stdio).
    pub fn tls(&self) -> Option<&UpstreamTls> {
        match self {
            Self::Stdio { .. } => None,
            Self::Sse { tls, .. } | Self::Http { tls, .. } => Some(tls),
        }
    }

    pub fn follow_redirects(&self) -> FollowRedirects {
        match self {
            Self::Stdio { .. } => FollowRedirects::None,
            Self::Sse {
                follow_redirects, ..
            }
            | Self::Http {
                follow_redirects, ..
            } => *follow_redirects,
        }
    }
}

/// `follow_redirects` of an http or sse server. A redirect to another origin is never followed: the
/// request would carry the server's headers (`x-api-key`, ...) and credentials there, and reqwest
/// strips only `Authorization`, `Cookie` and `Proxy-Authorization` on such a hop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowRedirects {
    /// A 3xx answer is an error naming the status and the target.
    #[default]
    None,
    /// Follow a redirect whose scheme, host and port equal the original request's (a few hops at most).
    SameOrigin,
}

impl FollowRedirects {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::SameOrigin => "same_origin",
        }
    }
}

/// Include/exclude globs over an upstream's own names. Empty include = everything.
#[derive(Clone, Default)]
pub struct NameFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    /// The patterns as written, for `Debug` and error messages.
    source: (Vec<String>, Vec<String>),
}

impl fmt::Debug for NameFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NameFilter")
            .field("include", &self.source.0)
            .field("exclude", &self.source.1)
            .finish()
    }
}

impl NameFilter {
    pub fn admits(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|s| s.is_match(name))
            && !self.exclude.as_ref().is_some_and(|s| s.is_match(name))
    }
}

// ---------------------------------------------------------------------------------------------

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text, &|k| std::env::var(k).ok())
    }

    /// Validate `text` as if read from `path`; `env` resolves `${VAR}` references.
    pub fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        let ctx = Ctx { path, text, env };
        let broker = ctx.broker(raw.broker)?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut credentials = IndexMap::new();
        for (name, c) in raw.credentials {
            let store = ctx.credential_store(&name, &c)?;
            credentials.insert(name, store);
        }
        for (name, c) in &credentials {
            if let CredentialStore::Vault(VaultConfig {
                login: VaultLogin::Jwt { exchange, .. },
                ..
            }) = c
                && !matches!(
                    credentials.get(exchange),
                    Some(CredentialStore::TokenExchange(_))
                )
            {
                return Err(ctx.invalid(
                    &["credentials", name],
                    "login",
                    format!("exchange uses `{exchange}`, which is not a [credentials.{exchange}] of kind \"token_exchange\""),
                ));
            }
        }
        // Fingerprints for reload: a server's own table, plus the credential stores when it uses any.
        let doc: toml::Table = toml::from_str(text).unwrap_or_default();
        let section = |name: &str| -> String {
            doc.get(name)
                .map(|v| toml::to_string(v).unwrap_or_default())
                .unwrap_or_default()
        };
        // `[oauth]` configures the same credentials layer (its clients and sign-in).
        let stores_text = section("credentials") + &section("oauth");
        let servers_doc = doc.get("servers").and_then(|v| v.as_table());
        let mut servers = Vec::with_capacity(raw.servers.len());
        for (name, s) in raw.servers {
            let mut server = ctx.server(&name, &s, &base, &credentials, &broker.inherit_env)?;
            let own = servers_doc
                .and_then(|t| t.get(&name))
                .map(|v| toml::to_string(v).unwrap_or_default())
                .unwrap_or_default();
            // A stdio server's allow-list may come from `[broker] inherit_env`: a change there is a
            // change to the server.
            let own = match &server.transport {
                TransportConfig::Stdio { inherit_env, .. } => {
                    format!("{own}\ninherit_env = {inherit_env:?}")
                }
                _ => own,
            };
            server.fingerprint = if server.upstream_auth.is_some() {
                format!("{own}\n{}", stores_text)
            } else {
                own
            };
            servers.push(server);
        }
        let audit = match raw.audit {
            Some(a) => ctx.audit(a, &base)?,
            None => AuditConfig::default(),
        };
        let limits = GlobalLimits {
            per_caller: match raw.limits.and_then(|l| l.per_caller) {
                Some(r) => Some(ctx.rate_limit(&["limits"], "per_caller", r)?),
                None => None,
            },
        };
        // Two servers with one non-empty prefix would shadow each other's names wholesale; two whose
        // prefixes differ only where the resource URI prefix folds them (`team_a`, `team-a`) would
        // share resource URIs, and one would silently take the other's unlisted ones.
        for (i, a) in servers.iter().enumerate() {
            if a.prefix.is_empty() {
                continue;
            }
            if let Some(b) = servers[..i].iter().find(|b| b.prefix == a.prefix) {
                return Err(ctx.invalid(
                    &["servers", &a.name],
                    "prefix",
                    format!(
                        "prefix \"{}\" is also used by server `{}`: their names would collide",
                        a.prefix, b.name
                    ),
                ));
            }
            let uris = uri_prefix(&a.prefix);
            if let Some(b) = servers[..i]
                .iter()
                .find(|b| !b.prefix.is_empty() && uri_prefix(&b.prefix) == uris)
            {
                return Err(ctx.invalid(
                    &["servers", &a.name],
                    "prefix",
                    format!(
                        "prefix \"{}\" of server `{}` and prefix \"{}\" of server `{}` both give resource URIs the prefix `{uris}+` (case and `-`/`_` are folded): give one a prefix that differs in more than that",
                        a.prefix, a.name, b.prefix, b.name
                    ),
                ));
            }
        }
        let cluster = match raw.cluster {
            Some(c) => Some(ctx.cluster(c)?),
            None => None,
        };
        let telemetry = match raw.telemetry {
            Some(t) => Some(ctx.telemetry(t)?),
            None => None,
        };
        let token_store = match raw.token_store {
            Some(_) if cluster.is_some() => {
                return Err(ctx.invalid(
                    &["token_store"],
                    "",
                    "cannot be used with [cluster]: upstream tokens are then kept in Redis, sealed with [cluster] secret_key".into(),
                ));
            }
            Some(t) => Some(ctx.token_store(t, &base)?),
            None => None,
        };
        let auth = match raw.auth {
            Some(a) => Some(ctx.auth(a, &broker)?),
            None => None,
        };
        let oauth = ctx.oauth_settings(raw.oauth, &credentials, &base)?;
        let guard = ctx.guard(raw.guard, &base)?;
        for s in &servers {
            let Some(UpstreamAuth::OAuth(o)) = &s.upstream_auth else {
                continue;
            };
            let t = &["servers", s.name.as_str()];
            if o.flow == OAuthFlow::ClientCredentials {
                continue;
            }
            if auth.is_none() {
                return Err(ctx.invalid(t, "upstream_auth", format!("kind = \"{}\" keeps a token per user, so callers must be known: it needs [auth]", o.kind())));
            }
            let Some(sign_in) = &oauth.sign_in else {
                return Err(ctx.invalid(t, "upstream_auth", format!("kind = \"{}\" needs [oauth] sign_in = \"NAME\": the [credentials.NAME] client at [auth] issuer that signs the user in before a consent (the spec's anti-phishing check)", o.kind())));
            };
            if let OAuthFlow::IdJag { idp, .. } = &o.flow
                && !idp.is_empty()
                && idp != sign_in
            {
                return Err(ctx.invalid(t, "upstream_auth", format!("idp = \"{idp}\": the enterprise IdP is where users sign in, [oauth] sign_in = \"{sign_in}\"; name that one (or leave `idp` out)")));
            }
        }
        let policy = raw
            .policy
            .into_iter()
            .enumerate()
            .map(|(i, r)| ctx.policy_rule(i + 1, r))
            .collect::<Result<_, _>>()?;
        let rego = match raw.policy_engine {
            Some(e) => {
                let t = &["policy_engine"];
                let query = e.query.unwrap_or_else(|| "data.mcp.broker.decision".into());
                if !query.starts_with("data.") {
                    return Err(ctx.invalid(
                        t,
                        "query",
                        "must be a rule path starting with `data.`".into(),
                    ));
                }
                Some(RegoConfig {
                    path: base.join(ctx.expand(t, "rego", &e.rego)?),
                    query,
                })
            }
            None => None,
        };
        Ok(Config {
            path: path.to_path_buf(),
            broker,
            servers,
            auth,
            policy,
            rego,
            credentials,
            audit,
            limits,
            credentials_fingerprint: stores_text,
            cluster,
            telemetry,
            oauth,
            token_store,
            guard,
        })
    }

    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// `HOSTNAME-PID`, with anything but letters, digits, `-`, `_`, `.` dropped from the host name.
fn default_instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "broker".into());
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(48)
        .collect();
    format!("{host}-{}", std::process::id())
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn invalid(&self, table: &[&str], key: &str, message: String) -> ConfigError {
        let mut dotted = table.join(".");
        if !key.is_empty() {
            dotted = format!("{dotted}.{key}");
        }
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line: find_line(self.text, table, key),
            key: dotted,
            message,
        }
    }

    fn telemetry(&self, c: raw::RawTelemetry) -> Result<TelemetryConfig, ConfigError> {
        let t = &["telemetry"];
        let endpoint = self.expand(t, "otlp_endpoint", &c.otlp_endpoint)?;
        let mut url = match url::Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => u,
            _ => {
                return Err(self.invalid(
                    t,
                    "otlp_endpoint",
                    "must be an http or https URL (an OTLP/HTTP collector, e.g. `http://collector:4318`)".into(),
                ));
            }
        };
        // OTLP/HTTP: a base URL gets the signal's path; a URL with a path is used as written.
        if url.path() == "/" || url.path().is_empty() {
            url.set_path("/v1/traces");
        }
        let service_name = c.service_name.unwrap_or_else(|| "mcp-broker".into());
        if service_name.trim().is_empty() {
            return Err(self.invalid(t, "service_name", "must not be empty".into()));
        }
        let sample_ratio = c.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(self.invalid(t, "sample_ratio", "must be between 0.0 and 1.0".into()));
        }
        let mut headers = Vec::new();
        for (k, v) in c.headers {
            if http::HeaderName::try_from(k.as_str()).is_err() {
                return Err(self.invalid(t, "headers", format!("`{k}` is not a header name")));
            }
            let v = self.expand(t, "headers", &v)?;
            if http::HeaderValue::try_from(v.as_str()).is_err() {
                return Err(self.invalid(
                    t,
                    "headers",
                    format!("the value of `{k}` is not a valid header value"),
                ));
            }
            headers.push((k, Secret::new(v)));
        }
        Ok(TelemetryConfig {
            endpoint: url.to_string(),
            service_name,
            headers,
            sample_ratio,
        })
    }

    fn token_store(
        &self,
        c: raw::RawTokenStore,
        base: &Path,
    ) -> Result<TokenStoreConfig, ConfigError> {
        let t = &["token_store"];
        let path = self.expand(t, "path", &c.path)?;
        if path.trim().is_empty() {
            return Err(self.invalid(t, "path", "must not be empty".into()));
        }
        let key = self.secret_key(t, "key", &c.key)?;
        Ok(TokenStoreConfig {
            path: base.join(path),
            key,
        })
    }

    /// A key that seals what is stored: from the environment (`${VAR}`), at least
    /// [`MIN_SECRET_KEY`] bytes.
    fn secret_key(&self, t: &[&str], key: &str, written: &str) -> Result<Secret, ConfigError> {
        let value = self.expand(t, key, written)?;
        if value.len() < MIN_SECRET_KEY {
            return Err(self.invalid(
                t,
                key,
                format!(
                    "must be at least {MIN_SECRET_KEY} bytes (every instance must have the same one; e.g. `openssl rand -hex 32`)"
                ),
            ));
        }
        if value == written && !written.is_empty() {
            return Err(self.invalid(
                t,
                key,
                "must come from the environment (`${VAR}`), not be written in the file".into(),
            ));
        }
        Ok(Secret::new(value))
    }

    fn cluster(&self, c: raw::RawCluster) -> Result<ClusterConfig, ConfigError> {
        let t = &["cluster"];
        let redis_url = self.expand(t, "redis_url", &c.redis_url)?;
        match url::Url::parse(&redis_url) {
            Ok(u) if u.scheme() == "redis" && u.host_str().is_some() => {}
            _ => {
                return Err(self.invalid(
                    t,
                    "redis_url",
                    "must be a `redis://host:port` URL".into(),
                ));
            }
        }
        let secret_key = self.secret_key(t, "secret_key", &c.secret_key)?;
        let instance_id = match c.instance_id {
            Some(id) => {
                let id = self.expand(t, "instance_id", &id)?;
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(self.invalid(
                        t,
                        "instance_id",
                        "must be 1 to 64 letters, digits, `-`, `_` or `.`".into(),
                    ));
                }
                id
            }
            None => default_instance_id(),
        };
        Ok(ClusterConfig {
            redis_url: Secret::new(redis_url),
            instance_id,
            secret_key,
            share_credentials: c.share_credentials.unwrap_or(false),
        })
    }

    /// An http or sse server's `ca_file`, `client_cert` and `client_key`: each a readable file;
    /// the certificate and key only together.
    fn upstream_tls(
        &self,
        t: &[&str],
        base: &Path,
        ca_file: Option<String>,
        client_cert: Option<String>,
        client_key: Option<String>,
    ) -> Result<UpstreamTls, ConfigError> {
        let file = |key: &str, v: String| -> Result<PathBuf, ConfigError> {
            let path = base.join(self.expand(t, key, &v)?);
            std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file())
                .ok_or_else(|| {
                    self.invalid(t, key, format!("{} is not a readable file", path.display()))
                })?;
            Ok(path)
        };
        let ca_file = ca_file.map(|v| file("ca_file", v)).transpose()?;
        let client_identity = match (client_cert, client_key) {
            (Some(c), Some(k)) => Some((file("client_cert", c)?, file("client_key", k)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.invalid(t, "client_cert", "needs `client_key` too".into()));
            }
            (None, Some(_)) => {
                return Err(self.invalid(t, "client_key", "needs `client_cert` too".into()));
            }
        };
        Ok(UpstreamTls {
            ca_file,
            client_identity,
        })
    }

    /// Expand `${VAR}` (and `$$` → `$`); an unset variable is an error naming the key.
    fn expand(&self, table: &[&str], key: &str, value: &str) -> Result<String, ConfigError> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
            } else if let Some(body) = after.strip_prefix('{') {
                let Some(end) = body.find('}') else {
                    return Err(self.invalid(table, key, "unterminated `${` in value".into()));
                };
                let var = &body[..end];
                match (self.env)(var) {
                    Some(v) => out.push_str(&v),
                    None => {
                        return Err(self.invalid(
                            table,
                            key,
                            format!("environment variable `{var}` is not set"),
                        ));
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn duration(
        &self,
        table: &[&str],
        key: &str,
        value: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(&v).ok_or_else(|| {
                self.invalid(
                    table,
                    key,
                    format!(
                        "\"{v}\" is not a duration (use e.g. \"500ms\", \"30s\", \"5m\", \"1h\")"
                    ),
                )
            }),
        }
    }

    fn broker(&self, raw: RawBroker) -> Result<BrokerConfig, ConfigError> {
        let t = &["broker"];
        let listen_s = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen: SocketAddr = listen_s.parse().map_err(|_| {
            self.invalid(
                t,
                "listen",
                format!("\"{listen_s}\" is not an address (use e.g. \"127.0.0.1:8080\")"),
            )
        })?;
        let public_url = match raw.public_url {
            Some(u) => {
                let url = url::Url::parse(&u)
                    .map_err(|e| self.invalid(t, "public_url", format!("\"{u}\": {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(self.invalid(
                        t,
                        "public_url",
                        "must be an http or https URL with a host".into(),
                    ));
                }
                url
            }
            None => {
                let scheme = if raw.tls.is_some() { "https" } else { "http" };
                url::Url::parse(&format!("{scheme}://{listen}/mcp")).map_err(|e| {
                    self.invalid(t, "listen", format!("cannot form a URL from it: {e}"))
                })?
            }
        };
        let tls = match raw.tls {
            Some(tls) => {
                let base = self
                    .path
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."));
                Some(TlsConfig {
                    cert: base.join(self.expand(t, "tls", &tls.cert)?),
                    key: base.join(self.expand(t, "tls", &tls.key)?),
                })
            }
            None => None,
        };
        let separator = raw.separator.unwrap_or_else(|| "__".into());
        if separator.is_empty() || !separator.chars().all(is_name_char) {
            return Err(self.invalid(
                t,
                "separator",
                "must be one or more of A-Z a-z 0-9 _ - (Claude rejects other characters in tool names)".into(),
            ));
        }
        let session_idle_timeout = self.duration(
            t,
            "session_idle_timeout",
            raw.session_idle_timeout,
            Duration::from_secs(3600),
        )?;
        let max_request_body = raw.max_request_body.unwrap_or(4 * 1024 * 1024);
        if max_request_body < 1024 {
            return Err(self.invalid(t, "max_request_body", "must be at least 1024 bytes".into()));
        }
        let metrics_listen = match raw.metrics_listen {
            Some(m) => Some(m.parse().map_err(|_| {
                self.invalid(
                    t,
                    "metrics_listen",
                    format!("\"{m}\" is not an address (use e.g. \"127.0.0.1:9090\")"),
                )
            })?),
            None => None,
        };
        let drain_timeout = self.duration(
            t,
            "drain_timeout",
            raw.drain_timeout,
            Duration::from_secs(30),
        )?;
        let startup_wait =
            self.duration(t, "startup_wait", raw.startup_wait, Duration::from_secs(10))?;
        let max_sessions = raw.max_sessions.unwrap_or(10_000);
        if max_sessions == 0 {
            return Err(self.invalid(t, "max_sessions", "must be at least 1".into()));
        }
        let max_sessions_per_subject = raw.max_sessions_per_subject.unwrap_or(1_000);
        if max_sessions_per_subject == 0 {
            return Err(self.invalid(t, "max_sessions_per_subject", "must be at least 1".into()));
        }
        let header_read_timeout = self.duration(
            t,
            "header_read_timeout",
            raw.header_read_timeout,
            Duration::from_secs(10),
        )?;
        let body_read_timeout = self.duration(
            t,
            "body_read_timeout",
            raw.body_read_timeout,
            Duration::from_secs(30),
        )?;
        let request_state_ttl = self.duration(
            t,
            "request_state_ttl",
            raw.request_state_ttl,
            Duration::from_secs(10 * 60),
        )?;
        for (key, d) in [
            ("header_read_timeout", header_read_timeout),
            ("body_read_timeout", body_read_timeout),
            ("request_state_ttl", request_state_ttl),
        ] {
            if d.is_zero() {
                return Err(self.invalid(t, key, "must be greater than zero".into()));
            }
        }
        let max_connections = raw.max_connections.unwrap_or(1024);
        if max_connections == 0 {
            return Err(self.invalid(t, "max_connections", "must be at least 1".into()));
        }
        Ok(BrokerConfig {
            listen,
            public_url,
            tls,
            separator,
            session_idle_timeout,
            max_request_body,
            metrics_listen,
            drain_timeout,
            watch_config: raw.watch_config.unwrap_or(true),
            startup_wait,
            max_sessions,
            max_sessions_per_subject,
            header_read_timeout,
            body_read_timeout,
            max_connections,
            request_state_ttl,
            direct_lane: raw.direct_lane.unwrap_or(true),
            inherit_env: raw
                .inherit_env
                .unwrap_or_else(|| DEFAULT_INHERIT_ENV.iter().map(|s| s.to_string()).collect()),
        })
    }

    fn server(
        &self,
        name: &str,
        raw: &Spanned<KeyedTable>,
        base: &Path,
        stores: &IndexMap<String, CredentialStore>,
        default_env: &[String],
    ) -> Result<ServerConfig, ConfigError> {
        let t = &["servers", name];
        if name.is_empty() || name.len() > 32 || !name.chars().all(is_name_char) {
            return Err(self.invalid(
                t,
                "",
                "server names are 1-32 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        let command_line = raw
            .get_ref()
            .0
            .iter()
            .find(|(k, _)| k.get_ref() == "command")
            .map_or(raw.span().start, |(k, _)| k.span().start);
        let command_line = line_col(self.text, command_line).0;
        let (transport, raw): (RawTransport, RawServer) = self.tagged(
            t,
            raw,
            "transport",
            // `sse` is never inferred: a `url` alone is Streamable HTTP.
            &[("command", "stdio"), ("url", "http")],
        )?;
        let transport = match transport {
            RawTransport::Stdio {
                command,
                args,
                env,
                cwd,
                inherit_env,
            } => TransportConfig::Stdio {
                command: self.expand(t, "command", &command)?,
                args: args
                    .unwrap_or_default()
                    .iter()
                    .map(|a| self.expand(t, "args", a))
                    .collect::<Result<_, _>>()?,
                env: env
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| Ok((k, Secret::new(self.expand(t, "env", &v)?))))
                    .collect::<Result<_, _>>()?,
                cwd: match cwd {
                    Some(c) => base.join(self.expand(t, "cwd", &c)?),
                    None => base.to_path_buf(),
                },
                inherit_env: inherit_env.unwrap_or_else(|| default_env.to_vec()),
                command_line,
            },
            RawTransport::Http {
                url,
                headers,
                follow_redirects,
                ca_file,
                client_cert,
                client_key,
            } => {
                let (url, headers) = self.remote(t, &url, headers)?;
                TransportConfig::Http {
                    url,
                    headers,
                    follow_redirects: follow_redirects.unwrap_or_default(),
                    tls: self.upstream_tls(t, base, ca_file, client_cert, client_key)?,
                }
            }
            RawTransport::Sse {
                url,
                headers,
                follow_redirects,
                ca_file,
                client_cert,
                client_key,
            } => {
                let (url, headers) = self.remote(t, &url, headers)?;
                TransportConfig::Sse {
                    url,
                    headers,
                    follow_redirects: follow_redirects.unwrap_or_default(),
                    tls: self.upstream_tls(t, base, ca_file, client_cert, client_key)?,
                }
            }
        };
        let prefix = raw.prefix.unwrap_or_else(|| name.to_string());
        if prefix.len() > 32 || !prefix.chars().all(is_name_char) {
            return Err(self.invalid(
                t,
                "prefix",
                "must be 0-32 characters of A-Z a-z 0-9 _ -".into(),
            ));
        }
        let tools = match raw.tools {
            None => NameFilter::default(),
            Some(f) => NameFilter {
                include: self.globs(t, &f.include)?,
                exclude: self.globs(t, &f.exclude)?,
                source: (f.include, f.exclude),
            },
        };
        let timeout = self.duration(t, "timeout", raw.timeout, Duration::from_secs(60))?;
        let connect_timeout = self.duration(
            t,
            "connect_timeout",
            raw.connect_timeout,
            Duration::from_secs(30),
        )?;
        let stdio = matches!(transport, TransportConfig::Stdio { .. });
        let mut upstream_auth = match raw.upstream_auth {
            Some(a) => Some(self.upstream_auth(t, a, stdio, stores, 0)?),
            None => None,
        };
        if let Some(UpstreamAuth::OAuth(o)) = &mut upstream_auth {
            o.server = name.to_string();
        }
        let per_caller = upstream_auth.as_ref().is_some_and(UpstreamAuth::per_caller);
        let isolation = match raw.isolation {
            Some(Isolation::Shared) if per_caller => {
                return Err(self.invalid(
                    t,
                    "isolation",
                    "\"shared\" cannot be used with a per-caller credential (token exchange or a templated Vault path): one connection would carry one caller's credential for everyone; use \"caller\" or \"session\"".into(),
                ));
            }
            Some(i) => i,
            None if per_caller => Isolation::Caller,
            None => Isolation::Shared,
        };
        let protocol = raw.protocol.unwrap_or_default();
        if protocol == Protocol::Modern && matches!(transport, TransportConfig::Sse { .. }) {
            return Err(self.invalid(
                t,
                "protocol",
                "the legacy SSE transport predates 2026-07-28; use \"auto\" or \"2025-11-25\", or transport = \"http\"".into(),
            ));
        }
        let max_subjects = raw.max_subjects.unwrap_or(64);
        if max_subjects == 0 {
            return Err(self.invalid(t, "max_subjects", "must be at least 1".into()));
        }
        let subject_idle_timeout = self.duration(
            t,
            "subject_idle_timeout",
            raw.subject_idle_timeout,
            Duration::from_secs(300),
        )?;
        let rate_limit = match raw.rate_limit {
            Some(r) => Some(self.rate_limit(t, "rate_limit", r)?),
            None => None,
        };
        if raw.max_concurrent == Some(0) {
            return Err(self.invalid(t, "max_concurrent", "must be at least 1".into()));
        }
        let mut tool_limits = BTreeMap::new();
        for (tool, l) in raw.tool_limits.unwrap_or_default() {
            let tt = &["servers", name, "tool_limits", &tool];
            let timeout = match l.timeout {
                Some(v) => Some(self.duration(tt, "timeout", Some(v), Duration::ZERO)?),
                None => None,
            };
            let rate_limit = match l.rate_limit {
                Some(r) => Some(self.rate_limit(tt, "rate_limit", r)?),
                None => None,
            };
            tool_limits.insert(
                tool,
                ToolLimits {
                    timeout,
                    rate_limit,
                },
            );
        }
        Ok(ServerConfig {
            name: name.to_string(),
            prefix,
            transport,
            tools,
            timeout,
            connect_timeout,
            upstream_auth,
            isolation,
            protocol,
            max_subjects,
            subject_idle_timeout,
            required: raw.required.unwrap_or(false),
            rate_limit,
            max_concurrent: raw.max_concurrent,
            tool_limits,
            fingerprint: String::new(),
        })
    }

    /// The `url` and `headers` of an http or sse server.
    fn remote(
        &self,
        t: &[&str],
        url: &str,
        headers: Option<BTreeMap<String, String>>,
    ) -> Result<(url::Url, Vec<(String, Secret)>), ConfigError> {
        let url_s = self.expand(t, "url", url)?;
        let url = url::Url::parse(&url_s)
            .map_err(|e| self.invalid(t, "url", format!("\"{url_s}\": {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(self.invalid(t, "url", "must be an http or https URL".into()));
        }
        let mut out = Vec::new();
        for (k, v) in headers.unwrap_or_default() {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                return Err(self.invalid(t, "headers", format!("`{k}` is not a header name")));
            }
            let v = self.expand(t, "headers", &v)?;
            if http::HeaderValue::from_str(&v).is_err() {
                return Err(self.invalid(
                    t,
                    "headers",
                    format!("the value of `{k}` is not a valid header value"),
                ));
            }
            out.push((k, Secret::new(v)));
        }
        Ok((url, out))
    }

    /// `{ rate = "10/s", burst = 20 }`; `burst` defaults to one second's worth (at least 1).
    fn rate_limit(
        &self,
        table: &[&str],
        key: &str,
        raw: RawRateLimit,
    ) -> Result<RateLimit, ConfigError> {
        let per_second = parse_rate(&raw.rate).ok_or_else(|| {
            self.invalid(
                table,
                key,
                format!(
                    "rate \"{}\" is not a rate (use e.g. \"10/s\", \"600/m\", \"1000/h\")",
                    raw.rate
                ),
            )
        })?;
        let burst = raw
            .burst
            .unwrap_or_else(|| per_second.ceil().max(1.0) as u32);
        if burst == 0 {
            return Err(self.invalid(table, key, "burst must be at least 1".into()));
        }
        Ok(RateLimit { per_second, burst })
    }

    fn audit(&self, raw: RawAudit, base: &Path) -> Result<AuditConfig, ConfigError> {
        let t = &["audit"];
        let d = AuditConfig::default();
        let arguments = match raw.arguments.as_deref() {
            None | Some("hash") => AuditArguments::Hash,
            Some("none") => AuditArguments::None,
            Some("full") => AuditArguments::Full,
            Some(other) => {
                return Err(self.invalid(
                    t,
                    "arguments",
                    format!("\"{other}\" is not one of \"none\", \"hash\", \"full\""),
                ));
            }
        };
        let file = match raw.file {
            Some(f) => Some(base.join(self.expand(t, "file", &f)?)),
            None => None,
        };
        let max_file_bytes = match raw.max_file_size {
            Some(v) => parse_size(&v).filter(|n| *n >= 4096).ok_or_else(|| {
                self.invalid(
                    t,
                    "max_file_size",
                    format!("\"{v}\" is not a size of at least 4KB (use e.g. \"100MB\")"),
                )
            })?,
            None => d.max_file_bytes,
        };
        let queue = raw.queue.unwrap_or(d.queue);
        if queue == 0 {
            return Err(self.invalid(t, "queue", "must be at least 1".into()));
        }
        Ok(AuditConfig {
            file,
            stdout: raw.stdout.unwrap_or(false),
            stderr: raw.stderr.unwrap_or(false),
            arguments,
            max_file_bytes,
            keep_files: raw.keep_files.unwrap_or(d.keep_files),
            queue,
        })
    }

    fn auth(&self, raw: RawAuth, broker: &BrokerConfig) -> Result<AuthConfig, ConfigError> {
        let t = &["auth"];
        let issuer = self.expand(t, "issuer", &raw.issuer)?;
        let issuer_url = url::Url::parse(&issuer)
            .map_err(|e| self.invalid(t, "issuer", format!("\"{issuer}\": {e}")))?;
        if !matches!(issuer_url.scheme(), "http" | "https") {
            return Err(self.invalid(t, "issuer", "must be an http or https URL".into()));
        }
        let jwks_uri = match raw.jwks_uri {
            Some(u) => {
                let u = self.expand(t, "jwks_uri", &u)?;
                Some(
                    url::Url::parse(&u)
                        .map_err(|e| self.invalid(t, "jwks_uri", format!("\"{u}\": {e}")))?,
                )
            }
            None => None,
        };
        let audience = match raw.audience {
            Some(a) => self.expand(t, "audience", &a)?,
            None => broker.public_url.to_string(),
        };
        let introspection = match raw.introspection {
            Some(i) => Some(IntrospectionConfig {
                endpoint: {
                    let e = self.expand(t, "introspection", &i.endpoint)?;
                    url::Url::parse(&e).map_err(|err| {
                        self.invalid(t, "introspection", format!("endpoint \"{e}\": {err}"))
                    })?
                },
                client_id: self.expand(t, "introspection", &i.client_id)?,
                client_secret: Secret::new(self.expand(t, "introspection", &i.client_secret)?),
            }),
            None => None,
        };
        for s in raw.required_scopes.iter().chain(&raw.scopes_supported) {
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
                return Err(self.invalid(
                    t,
                    "required_scopes",
                    format!("\"{s}\" is not a valid scope"),
                ));
            }
        }
        Ok(AuthConfig {
            issuer,
            jwks_uri,
            audience,
            required_scopes: raw.required_scopes,
            scopes_supported: raw.scopes_supported,
            introspection,
            group_claims: raw
                .group_claims
                .unwrap_or_else(|| vec!["groups".into(), "roles".into()]),
            admin_scopes: raw.admin_scopes,
        })
    }

    fn credential_store(
        &self,
        name: &str,
        raw: &Spanned<KeyedTable>,
    ) -> Result<CredentialStore, ConfigError> {
        let t = &["credentials", name];
        let (raw, NoSharedKeys {}) =
            self.tagged::<RawCredentialStore, NoSharedKeys>(t, raw, "kind", &[])?;
        let url = |key: &str, v: &str| -> Result<url::Url, ConfigError> {
            let v = self.expand(t, key, v)?;
            let u =
                url::Url::parse(&v).map_err(|e| self.invalid(t, key, format!("\"{v}\": {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(self.invalid(t, key, "must be an http or https URL".into()));
            }
            Ok(u)
        };
        match raw {
            RawCredentialStore::TokenExchange {
                token_endpoint,
                client_id,
                client_secret,
                auth_method,
                actor,
            } => {
                let secret_in_body = match auth_method.as_deref() {
                    None | Some("client_secret_basic") => false,
                    Some("client_secret_post") => true,
                    Some(o) => {
                        return Err(self.invalid(
                            t,
                            "auth_method",
                            format!(
                                "\"{o}\": use \"client_secret_basic\" or \"client_secret_post\""
                            ),
                        ));
                    }
                };
                let actor = match actor.as_deref() {
                    None => false,
                    Some("client_credentials") => true,
                    Some(o) => {
                        return Err(self.invalid(
                            t,
                            "actor",
                            format!("\"{o}\": the only actor source is \"client_credentials\""),
                        ));
                    }
                };
                Ok(CredentialStore::TokenExchange(ExchangeConfig {
                    token_endpoint: url("token_endpoint", &token_endpoint)?,
                    client_id: self.expand(t, "client_id", &client_id)?,
                    client_secret: Secret::new(self.expand(t, "client_secret", &client_secret)?),
                    secret_in_body,
                    actor,
                }))
            }
            RawCredentialStore::Vault {
                address,
                kv_version,
                login,
                cache_ttl,
                namespace,
            } => {
                let kv_version = kv_version.unwrap_or(2);
                if !matches!(kv_version, 1 | 2) {
                    return Err(self.invalid(t, "kv_version", "must be 1 or 2".into()));
                }
                let secret = |v: &str| self.expand(t, "login", v).map(Secret::new);
                let login = match login {
                    RawVaultLogin::Token { token } => VaultLogin::Token(secret(&token)?),
                    RawVaultLogin::AppRole {
                        mount,
                        role_id,
                        secret_id,
                    } => VaultLogin::AppRole {
                        mount: mount.unwrap_or_else(|| "approle".into()),
                        role_id: self.expand(t, "login", &role_id)?,
                        secret_id: secret(&secret_id)?,
                    },
                    RawVaultLogin::Jwt {
                        mount,
                        role,
                        exchange,
                    } => {
                        let ex = exchange.ok_or_else(|| {
                            self.invalid(t, "login", "login method \"jwt\" needs `exchange = { use = \"<token_exchange store>\", audience = \"<vault role's bound audience>\" }`: the caller's own token is never sent to Vault".into())
                        })?;
                        VaultLogin::Jwt {
                            mount: mount.unwrap_or_else(|| "jwt".into()),
                            role: self.expand(t, "login", &role)?,
                            exchange: ex.use_,
                            audience: ex.audience,
                        }
                    }
                };
                let namespace = match namespace {
                    Some(n) => Some(self.expand(t, "namespace", &n)?),
                    None => None,
                };
                Ok(CredentialStore::Vault(VaultConfig {
                    address: url("address", &address)?,
                    kv_version,
                    login,
                    cache_ttl: self.duration(t, "cache_ttl", cache_ttl, Duration::from_secs(60))?,
                    namespace,
                }))
            }
        }
    }

    fn upstream_auth(
        &self,
        t: &[&str],
        raw: RawUpstreamAuth,
        stdio: bool,
        stores: &IndexMap<String, CredentialStore>,
        depth: usize,
    ) -> Result<UpstreamAuth, ConfigError> {
        let key = "upstream_auth";
        let bad = |m: String| self.invalid(t, key, m);
        let target = |header: Option<String>,
                      format: Option<String>,
                      env: Option<&toml::Value>|
         -> Result<SecretTarget, ConfigError> {
            match (header, env) {
                (Some(_), Some(_)) => Err(bad("give `header` or `env`, not both".into())),
                (Some(h), None) => {
                    if stdio {
                        return Err(bad(
                            "a stdio server takes credentials as `env`, not `header`".into(),
                        ));
                    }
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        return Err(bad(format!("`{h}` is not a header name")));
                    }
                    let format = format.unwrap_or_else(|| {
                        if h.eq_ignore_ascii_case("authorization") {
                            "Bearer {value}".into()
                        } else {
                            "{value}".into()
                        }
                    });
                    if !format.contains("{value}") {
                        return Err(bad("`format` must contain {value}".into()));
                    }
                    Ok(SecretTarget::Header { name: h, format })
                }
                (None, Some(toml::Value::String(var))) => Ok(SecretTarget::Env(var.clone())),
                (None, Some(_)) => Err(bad(
                    "`env` names the variable that receives the secret, e.g. env = \"API_KEY\""
                        .into(),
                )),
                (None, None) => Ok(if stdio {
                    SecretTarget::Env("MCP_UPSTREAM_TOKEN".into())
                } else {
                    SecretTarget::Header {
                        name: "Authorization".into(),
                        format: "Bearer {value}".into(),
                    }
                }),
            }
        };
        let (store, rest) = match raw {
            RawUpstreamAuth::First(first) => {
                if depth > 0 {
                    return Err(bad("`first` chains cannot be nested".into()));
                }
                if first.is_empty() {
                    return Err(bad("`first` needs at least one entry".into()));
                }
                return Ok(UpstreamAuth::First(
                    first
                        .into_iter()
                        .map(|a| self.upstream_auth(t, a, stdio, stores, depth + 1))
                        .collect::<Result<_, _>>()?,
                ));
            }
            RawUpstreamAuth::Static(s) => {
                // Either one `value` (into `header` or a single `env` name), or an `env` table of values.
                if let Some(toml::Value::Table(tbl)) = &s.env {
                    if s.value.is_some() || s.header.is_some() {
                        return Err(bad(
                            "an `env` table carries its own values; drop `value`/`header`".into(),
                        ));
                    }
                    let mut out = Vec::new();
                    for (k, v) in tbl {
                        let v = v
                            .as_str()
                            .ok_or_else(|| bad(format!("env `{k}` must be a string")))?;
                        out.push((
                            SecretTarget::Env(k.clone()),
                            Secret::new(self.expand(t, key, v)?),
                        ));
                    }
                    return Ok(UpstreamAuth::Static(out));
                }
                let value = s.value.ok_or_else(|| {
                    bad("a static credential needs `value` (or an `env` table)".into())
                })?;
                let target = target(s.header, s.format, s.env.as_ref())?;
                return Ok(UpstreamAuth::Static(vec![(
                    target,
                    Secret::new(self.expand(t, key, &value)?),
                )]));
            }
            RawUpstreamAuth::OAuth(o) => {
                if depth > 0 {
                    return Err(bad(format!(
                        "kind = \"{}\" cannot be part of a `first` chain",
                        o.kind
                    )));
                }
                return Ok(UpstreamAuth::OAuth(self.oauth_auth(t, o, stdio)?));
            }
            RawUpstreamAuth::Store { store, rest } => (store, rest),
        };
        // The keys besides `use` are those of the store's kind.
        let keys_of = |kind: &str, e: toml::de::Error| {
            let m = e.message();
            bad(match m.strip_prefix("unknown field ") {
                Some(rest) => format!(
                    "`{}` does not apply to `{store}`, a {kind} store; {}",
                    backticked(m).unwrap_or_default(),
                    rest.split_once(", ").map_or("", |(_, e)| e)
                ),
                None => match m.strip_prefix("missing field ") {
                    Some(key) => format!("`{store}` is a {kind} store: it needs {key}"),
                    None => format!("`{store}` is a {kind} store: {m}"),
                },
            })
        };
        let rest = toml::Value::Table(rest);
        match stores.get(&store) {
            None => Err(bad(format!("no [credentials.{store}] is configured"))),
            Some(CredentialStore::TokenExchange(_)) => {
                let raw =
                    RawExchangeAuth::deserialize(rest).map_err(|e| keys_of("token_exchange", e))?;
                let ttl = match raw.ttl {
                    Some(v) => Some(
                        parse_duration(&v)
                            .ok_or_else(|| bad(format!("ttl \"{v}\" is not a duration")))?,
                    ),
                    None => None,
                };
                Ok(UpstreamAuth::Exchange {
                    audience: self.expand(t, key, &raw.audience)?,
                    client: store,
                    scopes: raw.scopes.unwrap_or_default(),
                    tool_scopes: raw.tool_scopes.unwrap_or_default(),
                    ttl,
                })
            }
            Some(CredentialStore::Vault(_)) => {
                let raw = RawVaultAuth::deserialize(rest).map_err(|e| keys_of("vault", e))?;
                if raw.path.starts_with('/') || raw.path.split('/').any(|seg| seg == "..") {
                    return Err(bad(format!(
                        "path \"{}\" must be relative to /v1/ and contain no `..`",
                        raw.path
                    )));
                }
                Ok(UpstreamAuth::Vault {
                    store,
                    path: raw.path,
                    field: raw.field.unwrap_or_else(|| "token".into()),
                    target: target(raw.header, raw.format, raw.env.as_ref())?,
                })
            }
        }
    }

    fn policy_rule(&self, number: usize, mut raw: RawPolicy) -> Result<PolicyRule, ConfigError> {
        let t = &["policy"];
        let effect = match raw.effect.as_deref() {
            None | Some("allow") => Effect::Allow,
            Some("deny") => Effect::Deny,
            Some("approve") => Effect::Approve,
            Some(other) => {
                return Err(self.invalid(
                    t,
                    "effect",
                    format!(
                        "rule {number}: \"{other}\" is not an effect; use \"allow\", \"deny\" or \"approve\""
                    ),
                ));
            }
        };
        // Resource globs match the normalised URI (`crate::policy`), so they are read in that form
        // too, and `*` stays within one path segment while `**` crosses `/`. Names have no
        // `/`: their globs keep matching any character.
        let globs = |key: &str, v: Option<Vec<String>>| -> Result<Option<Globs>, ConfigError> {
            match v {
                None => Ok(None),
                Some(p) => {
                    let mut b = GlobSetBuilder::new();
                    for pat in &p {
                        let glob = if key == "resources" {
                            GlobBuilder::new(&normalise_uri(pat).text)
                                .literal_separator(true)
                                .build()
                        } else {
                            Glob::new(pat)
                        };
                        b.add(glob.map_err(|e| {
                            self.invalid(t, key, format!("rule {number}: bad glob \"{pat}\": {e}"))
                        })?);
                    }
                    let set = b
                        .build()
                        .map_err(|e| self.invalid(t, key, format!("rule {number}: {e}")))?;
                    Ok(Some(Globs { set, patterns: p }))
                }
            }
        };
        if raw.step_up && raw.require_scopes.is_empty() {
            return Err(self.invalid(
                t,
                "step_up",
                format!(
                    "rule {number}: step_up needs require_scopes (the scopes to ask the user for)"
                ),
            ));
        }
        let approval = self.approval_rule(number, effect, &mut raw)?;
        Ok(PolicyRule {
            number,
            servers: globs("servers", raw.servers)?,
            tools: globs("tools", raw.tools)?,
            prompts: globs("prompts", raw.prompts)?,
            resources: globs("resources", raw.resources)?,
            require_scopes: raw.require_scopes,
            claims: raw.claims.into_iter().collect(),
            effect,
            message: raw.message,
            step_up: raw.step_up,
            approval,
        })
    }

    /// The approval keys of rule `number`: required with `effect = "approve"`, refused without.
    fn approval_rule(
        &self,
        number: usize,
        effect: Effect,
        raw: &mut RawPolicy,
    ) -> Result<Option<std::sync::Arc<ApprovalRule>>, ConfigError> {
        let t = &["policy"];
        if effect != Effect::Approve {
            let stray = [
                ("approval", raw.approval.is_some()),
                ("approvers", raw.approvers.is_some()),
                ("approval_timeout", raw.approval_timeout.is_some()),
                ("grant_durations", raw.grant_durations.is_some()),
                ("bind_arguments", raw.bind_arguments.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.invalid(
                    t,
                    key,
                    format!("rule {number}: `{key}` applies only to effect = \"approve\""),
                ));
            }
            return Ok(None);
        }
        let mode = match raw.approval.as_deref() {
            Some("caller") => ApprovalMode::Caller,
            Some("approver") => ApprovalMode::Approver,
            Some(other) => {
                return Err(self.invalid(
                    t,
                    "approval",
                    format!(
                        "rule {number}: \"{other}\" is not an approval; use \"caller\" or \"approver\""
                    ),
                ));
            }
            None => {
                return Err(self.invalid(
                    t,
                    "approval",
                    format!(
                        "rule {number}: effect = \"approve\" needs approval = \"caller\" or \"approver\""
                    ),
                ));
            }
        };
        let (groups, subjects) = match raw.approvers.take() {
            Some(a) => (a.groups, a.subjects),
            None => (Vec::new(), Vec::new()),
        };
        match mode {
            ApprovalMode::Approver if groups.is_empty() && subjects.is_empty() => {
                return Err(self.invalid(
                    t,
                    "approvers",
                    format!(
                        "rule {number}: approval = \"approver\" needs approvers = {{ groups = [...] }} or {{ subjects = [...] }}"
                    ),
                ));
            }
            ApprovalMode::Caller if !groups.is_empty() || !subjects.is_empty() => {
                return Err(self.invalid(
                    t,
                    "approvers",
                    format!(
                        "rule {number}: approvers applies only to approval = \"approver\" (the caller approves their own calls)"
                    ),
                ));
            }
            _ => {}
        }
        let timeout = match raw.approval_timeout.as_deref() {
            None => Duration::from_secs(300),
            Some(s) => match parse_duration(s) {
                Some(d) if (Duration::from_secs(5)..=Duration::from_secs(3600)).contains(&d) => d,
                _ => {
                    return Err(self.invalid(
                        t,
                        "approval_timeout",
                        format!(
                            "rule {number}: \"{s}\" is not a duration between 5s and 1h (e.g. \"5m\")"
                        ),
                    ));
                }
            },
        };
        let labels = raw
            .grant_durations
            .take()
            .unwrap_or_else(|| vec!["once".into(), "15m".into(), "1h".into()]);
        if labels.is_empty() {
            return Err(self.invalid(
                t,
                "grant_durations",
                format!("rule {number}: offer at least one grant (e.g. [\"once\"])"),
            ));
        }
        let mut grants: Vec<GrantDuration> = Vec::new();
        for label in labels {
            let lasts = match label.as_str() {
                "once" => None,
                s => match parse_duration(s) {
                    Some(d) if d > Duration::ZERO && d <= Duration::from_secs(7 * 24 * 3600) => {
                        Some(d)
                    }
                    _ => {
                        return Err(self.invalid(
                            t,
                            "grant_durations",
                            format!(
                                "rule {number}: \"{s}\" is neither \"once\" nor a duration up to 7 days (e.g. \"15m\")"
                            ),
                        ));
                    }
                },
            };
            if label == "deny" || grants.iter().any(|g| g.label == label) {
                return Err(self.invalid(
                    t,
                    "grant_durations",
                    format!("rule {number}: \"{label}\" is offered twice"),
                ));
            }
            grants.push(GrantDuration { label, lasts });
        }
        Ok(Some(std::sync::Arc::new(ApprovalRule {
            rule: number,
            mode,
            groups,
            subjects,
            timeout,
            grants,
            bind_arguments: raw.bind_arguments.unwrap_or(false),
        })))
    }

    fn globs(&self, table: &[&str], patterns: &[String]) -> Result<Option<GlobSet>, ConfigError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            let g = Glob::new(p)
                .map_err(|e| self.invalid(table, "tools", format!("bad glob \"{p}\": {e}")))?;
            b.add(g);
        }
        b.build()
            .map(Some)
            .map_err(|e| self.invalid(table, "tools", e.to_string()))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// `"10/s"`, `"600/m"`, `"1000/h"` (also `"1.5/s"`) → events per second.
pub fn parse_rate(s: &str) -> Option<f64> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: f64 = n.trim().parse().ok()?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return None,
    };
    (n.is_finite() && n > 0.0).then_some(n / per)
}

/// `"4096"`, `"512KB"`, `"100MB"`, `"1GB"` (powers of 1024) → bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" | "KIB" => 1024,
        "MB" | "M" | "MIB" => 1024 * 1024,
        "GB" | "G" | "GIB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best-effort line of `key` inside table `[a.b]` (or of the table header, or line 1): good enough
/// to point a user at the right place for semantic errors, which the TOML parser cannot locate.
fn find_line(text: &str, table: &[&str], key: &str) -> usize {
    let header = format!("[{}]", table.join("."));
    let mut in_table = false;
    let mut header_line = None;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            in_table = l.replace(' ', "") == header;
            if in_table {
                header_line = Some(i + 1);
                if key.is_empty() {
                    return i + 1;
                }
            }
            continue;
        }
        if in_table
            && !key.is_empty()
            && let Some(rest) = l.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            return i + 1;
        }
    }
    // Dotted or inline forms: `ledger = { ... }` under `[servers]`.
    if header_line.is_none() && table.len() >= 2 {
        let last = table[table.len() - 1];
        for (i, line) in text.lines().enumerate() {
            let l = line.trim();
            if (l.starts_with(last) || l.contains(&format!("{}.{}", table[0], last)))
                && l.contains('=')
            {
                return i + 1;
            }
        }
    }
    header_line.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("conf/servers.toml"), text, &|k| {
            (k == "TOKEN").then(|| "s3cret".to_string())
        })
    }

    #[test]
    fn upstream_tls_files_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").expect("write");
        let cfg = dir.path().join("servers.toml");
        let p = |extra: &str| {
            let text = format!(
                "[servers.w]\ntransport = \"http\"\nurl = \"https://w.example/mcp\"\n{extra}\n"
            );
            Config::parse(&cfg, &text, &|_| None)
        };
        let c = p("ca_file = \"ca.pem\"").expect("valid");
        assert_eq!(
            c.servers[0].transport.tls().and_then(|t| t.ca_file.clone()),
            Some(ca.clone())
        );
        for (extra, key, why) in [
            (
                "ca_file = \"missing.pem\"",
                "servers.w.ca_file",
                "not a readable file",
            ),
            (
                "client_cert = \"ca.pem\"",
                "servers.w.client_cert",
                "needs `client_key`",
            ),
            (
                "client_key = \"ca.pem\"",
                "servers.w.client_key",
                "needs `client_cert`",
            ),
        ] {
            match p(extra) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(message.contains(why), "{extra}: {message}");
                }
                other => panic!("{extra}: expected an error on {key}, got {other:?}"),
            }
        }
    }

    #[test]
    fn approve_rules_are_parsed_strictly() {
        let c = parse(
            "[[policy]]\ntools = [\"update_*\"]\neffect = \"approve\"\napproval = \"caller\"\n\n[[policy]]\ntools = [\"delete_*\"]\neffect = \"approve\"\napproval = \"approver\"\napprovers = { groups = [\"sec-ops\"], subjects = [\"bob\"] }\napproval_timeout = \"30s\"\ngrant_durations = [\"once\", \"1s\"]\nbind_arguments = true\n",
        )
        .expect("valid");
        let a = c.policy[0].approval.as_ref().expect("approval");
        assert_eq!(c.policy[0].effect, Effect::Approve);
        assert_eq!(a.mode, ApprovalMode::Caller);
        assert_eq!(a.timeout, Duration::from_secs(300));
        let labels: Vec<&str> = a.grants.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(labels, ["once", "15m", "1h"]);
        assert_eq!(a.grants[0].lasts, None);
        assert_eq!(a.grants[1].lasts, Some(Duration::from_secs(900)));
        assert!(!a.bind_arguments);
        let b = c.policy[1].approval.as_ref().expect("approval");
        assert_eq!(b.mode, ApprovalMode::Approver);
        assert_eq!(b.timeout, Duration::from_secs(30));
        assert!(b.bind_arguments);
        assert!(b.is_approver("bob", &[]));
        assert!(b.is_approver("carol", &["sec-ops".into()]));
        assert!(!b.is_approver("carol", &["staff".into()]));
        assert_eq!(
            b.grant("1s").and_then(|g| g.lasts),
            Some(Duration::from_secs(1))
        );
        assert!(c.policy.iter().all(|r| r.number > 0));
        let rule = |extra: &str| format!("[[policy]]\ntools = [\"t\"]\n{extra}\n");
        for (extra, key, why) in [
            ("effect = \"approve\"", "policy.approval", "needs approval"),
            (
                "effect = \"approve\"\napproval = \"boss\"",
                "policy.approval",
                "not an approval",
            ),
            (
                "effect = \"approve\"\napproval = \"approver\"",
                "policy.approvers",
                "needs approvers",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\napprovers = { subjects = [\"bob\"] }",
                "policy.approvers",
                "only to approval = \"approver\"",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\napproval_timeout = \"2s\"",
                "policy.approval_timeout",
                "between 5s and 1h",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\napproval_timeout = \"2h\"",
                "policy.approval_timeout",
                "between 5s and 1h",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\ngrant_durations = [\"forever\"]",
                "policy.grant_durations",
                "neither \"once\"",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\ngrant_durations = []",
                "policy.grant_durations",
                "at least one",
            ),
            (
                "effect = \"approve\"\napproval = \"caller\"\ngrant_durations = [\"once\", \"once\"]",
                "policy.grant_durations",
                "offered twice",
            ),
            ("approval = \"caller\"", "policy.approval", "only to effect"),
            (
                "effect = \"deny\"\nbind_arguments = true",
                "policy.bind_arguments",
                "only to effect",
            ),
            ("effect = \"maybe\"", "policy.effect", "\"approve\""),
        ] {
            match parse(&rule(extra)) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key, "{extra}");
                    assert!(message.contains(why), "{extra}: {message}");
                }
                other => panic!("{extra}: expected an error on {key}, got {other:?}"),
            }
        }
        // Unknown keys inside approvers are refused too.
        assert!(
            parse(&rule(
                "effect = \"approve\"\napproval = \"approver\"\napprovers = { teams = [\"x\"] }"
            ))
            .is_err()
        );
    }

    #[test]
    fn telemetry_section_is_parsed_strictly() {
        let c = parse(
            "[telemetry]\notlp_endpoint = \"http://collector:4318\"\nheaders = { \"x-api-key\" = \"${TOKEN}\" }\n",
        )
        .expect("valid");
        let t = c.telemetry.expect("telemetry");
        assert_eq!(t.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(t.service_name, "mcp-broker");
        assert_eq!(t.sample_ratio, 1.0);
        assert_eq!(t.headers[0].0, "x-api-key");
        assert_eq!(t.headers[0].1.expose(), "s3cret");
        assert!(!format!("{:?}", t.headers).contains("s3cret"));
        let c = parse("[telemetry]\notlp_endpoint = \"https://otel.example/custom/traces\"\n")
            .expect("valid");
        assert_eq!(
            c.telemetry.expect("telemetry").endpoint,
            "https://otel.example/custom/traces"
        );
        assert!(parse("").expect("valid").telemetry.is_none());
        for (text, key, line) in [
            (
                "[telemetry]\notlp_endpoint = \"collector:4318\"\n",
                "telemetry.otlp_endpoint",
                2,
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://c:4318\"\nsample_ratio = 1.5\n",
                "telemetry.sample_ratio",
                3,
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://c:4318\"\nheaders = { k = \"${NOPE}\" }\n",
                "telemetry.headers",
                3,
            ),
            (
                "[telemetry]\notlp_endpoint = \"http://c:4318\"\nservice_name = \" \"\n",
                "telemetry.service_name",
                3,
            ),
        ] {
            match parse(text) {
                Err(ConfigError::Invalid {
                    key: k, line: l, ..
                }) => {
                    assert_eq!((k.as_str(), l), (key, line), "{text}")
                }
                other => panic!("{text}: expected an error on {key}, got {other:?}"),
            }
        }
        let e = parse("[telemetry]\notlp_endpoint = \"http://c:4318\"\nprotocol = \"grpc\"\n")
            .expect_err("unknown key");
        assert!(e.to_string().contains("protocol"), "{e}");
    }

    #[test]
    fn cluster_section_is_parsed_strictly() {
        let env = |k: &str| match k {
            "KEY" => Some("k".repeat(32)),
            "SHORT" => Some("short".into()),
            "PW" => Some("hunter2".into()),
            _ => None,
        };
        let p = |t: &str| Config::parse(Path::new("servers.toml"), t, &env);
        let c = p(
            "[cluster]\nredis_url = \"redis://:${PW}@redis:6379/2\"\nsecret_key = \"${KEY}\"\n\
                   instance_id = \"b-1\"\nshare_credentials = true\n",
        )
        .expect("valid");
        let cl = c.cluster.expect("[cluster]");
        assert_eq!(cl.redis_url.expose(), "redis://:hunter2@redis:6379/2");
        assert_eq!(cl.instance_id, "b-1");
        assert!(cl.share_credentials);
        // The password and the key never show in a debug print.
        let printed = format!("{cl:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains(&"k".repeat(32)),
            "{printed}"
        );
        // The default instance id is HOSTNAME-PID.
        let c = p("[cluster]\nredis_url = \"redis://127.0.0.1\"\nsecret_key = \"${KEY}\"\n")
            .expect("valid");
        assert!(
            c.cluster
                .expect("[cluster]")
                .instance_id
                .ends_with(&format!("-{}", std::process::id()))
        );
        for (text, key, why) in [
            (
                "redis_url = \"redis://r\"\nsecret_key = \"${SHORT}\"",
                "cluster.secret_key",
                "at least 32",
            ),
            (
                "redis_url = \"redis://r\"\nsecret_key = \"0123456789abcdef0123456789abcdef\"",
                "cluster.secret_key",
                "environment",
            ),
            (
                "redis_url = \"http://r\"\nsecret_key = \"${KEY}\"",
                "cluster.redis_url",
                "redis://",
            ),
            (
                "redis_url = \"redis://r\"\nsecret_key = \"${KEY}\"\ninstance_id = \"a b\"",
                "cluster.instance_id",
                "letters",
            ),
        ] {
            match p(&format!("[cluster]\n{text}\n")) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key, "{text}");
                    assert!(message.contains(why), "{text}: {message}");
                }
                other => panic!("{text}: expected an error on {key}, got {other:?}"),
            }
        }
        // Unknown keys are refused, as everywhere.
        assert!(
            p("[cluster]\nredis_url = \"redis://r\"\nsecret_key = \"${KEY}\"\nsticky = true\n")
                .is_err()
        );
    }

    #[test]
    fn token_store_section_is_parsed_strictly() {
        let env = |k: &str| match k {
            "KEY" => Some("k".repeat(32)),
            "SHORT" => Some("short".into()),
            _ => None,
        };
        let p = |t: &str| Config::parse(Path::new("conf/servers.toml"), t, &env);
        let c = p("[token_store]\npath = \"tokens.json\"\nkey = \"${KEY}\"\n").expect("valid");
        let ts = c.token_store.expect("[token_store]");
        // Relative to the config file's folder.
        assert_eq!(ts.path, Path::new("conf/tokens.json"));
        assert_eq!(ts.key.expose(), "k".repeat(32));
        assert!(!format!("{ts:?}").contains(&"k".repeat(32)));
        let c = p("[token_store]\npath = \"/var/lib/mcpb/tokens.json\"\nkey = \"${KEY}\"\n")
            .expect("valid");
        assert_eq!(
            c.token_store.expect("[token_store]").path,
            Path::new("/var/lib/mcpb/tokens.json")
        );
        assert!(p("").expect("valid").token_store.is_none());
        for (text, key, why) in [
            (
                "[token_store]\npath = \"t.json\"\nkey = \"${SHORT}\"",
                "token_store.key",
                "at least 32",
            ),
            (
                "[token_store]\npath = \"t.json\"\nkey = \"0123456789abcdef0123456789abcdef\"",
                "token_store.key",
                "environment",
            ),
            (
                "[token_store]\npath = \"t.json\"\nkey = \"${NOPE}\"",
                "token_store.key",
                "NOPE",
            ),
            (
                "[token_store]\npath = \"\"\nkey = \"${KEY}\"",
                "token_store.path",
                "empty",
            ),
            (
                "[cluster]\nredis_url = \"redis://r\"\nsecret_key = \"${KEY}\"\n\
                 [token_store]\npath = \"t.json\"\nkey = \"${KEY}\"",
                "token_store",
                "Redis",
            ),
        ] {
            match p(&format!("{text}\n")) {
                Err(ConfigError::Invalid {
                    key: k, message, ..
                }) => {
                    assert_eq!(k, key, "{text}");
                    assert!(message.contains(why), "{text}: {message}");
                }
                other => panic!("{text}: expected an error on {key}, got {other:?}"),
            }
        }
        // Unknown and missing keys are refused, as everywhere.
        assert!(p("[token_store]\npath = \"t\"\nkey = \"${KEY}\"\nmode = \"0600\"\n").is_err());
        assert!(p("[token_store]\npath = \"t\"\n").is_err());
    }

    #[test]
    fn audit_limits_and_operations_keys() {
        let c = parse(
            "[broker]\nmetrics_listen = \"127.0.0.1:9100\"\ndrain_timeout = \"5s\"\nwatch_config = false\n\
             [audit]\nfile = \"logs/audit.jsonl\"\narguments = \"full\"\nmax_file_size = \"1MB\"\n\
             [limits]\nper_caller = { rate = \"600/m\", burst = 20 }\n\
             [servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nrequired = true\nmax_concurrent = 4\n\
             rate_limit = { rate = \"2.5/s\" }\n\
             [servers.a.tool_limits.slow]\ntimeout = \"10m\"\nrate_limit = { rate = \"1/h\", burst = 2 }\n",
        )
        .unwrap();
        assert_eq!(
            c.broker.metrics_listen.unwrap().to_string(),
            "127.0.0.1:9100"
        );
        assert_eq!(c.broker.drain_timeout, Duration::from_secs(5));
        assert!(!c.broker.watch_config);
        assert_eq!(
            c.audit.file.as_deref(),
            Some(Path::new("conf/logs/audit.jsonl"))
        );
        assert_eq!(c.audit.arguments, AuditArguments::Full);
        assert_eq!(c.audit.max_file_bytes, 1024 * 1024);
        let caller = c.limits.per_caller.unwrap();
        assert!((caller.per_second - 10.0).abs() < 1e-9 && caller.burst == 20);
        let a = &c.servers[0];
        assert!(a.required);
        assert_eq!(a.max_concurrent, Some(4));
        // burst defaults to one second's worth, rounded up
        assert_eq!(a.rate_limit.unwrap().burst, 3);
        let slow = &a.tool_limits["slow"];
        assert_eq!(slow.timeout, Some(Duration::from_secs(600)));
        assert_eq!(slow.rate_limit.unwrap().burst, 2);
        // unchanged text, same fingerprint; a changed server table, a different one
        let again = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\n").unwrap();
        let changed = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"y\"\n").unwrap();
        let same = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\n").unwrap();
        assert_eq!(again.servers[0].fingerprint, same.servers[0].fingerprint);
        assert_ne!(again.servers[0].fingerprint, changed.servers[0].fingerprint);
    }

    #[test]
    fn connection_limit_keys() {
        let c = parse("[broker]\n").unwrap();
        assert_eq!(c.broker.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.broker.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.broker.max_connections, 1024);
        let c = parse(
            "[broker]\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"1m\"\nmax_connections = 20\n",
        )
        .unwrap();
        assert_eq!(c.broker.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.broker.body_read_timeout, Duration::from_secs(60));
        assert_eq!(c.broker.max_connections, 20);
        for (text, key, line) in [
            (
                "[broker]\nheader_read_timeout = \"soon\"\n",
                "header_read_timeout",
                2,
            ),
            (
                "[broker]\n\nbody_read_timeout = \"0s\"\n",
                "body_read_timeout",
                3,
            ),
            ("[broker]\nmax_connections = 0\n", "max_connections", 2),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("conf/servers.toml:{line}: `broker.{key}`")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_operations_values_name_their_key_and_line() {
        let e = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nrate_limit = { rate = \"fast\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:4: `servers.a.rate_limit`"),
            "{e}"
        );
        assert!(e.contains("\"10/s\""), "{e}");
        let e = parse("[audit]\narguments = \"some\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:2: `audit.arguments`"),
            "{e}"
        );
        let e = parse("[limits]\nper_caller = { rate = \"1/s\", burst = 0 }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`limits.per_caller`") && e.contains("burst"),
            "{e}"
        );
        let e = parse("[broker]\nmetrics_listen = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:2: `broker.metrics_listen`"),
            "{e}"
        );
        let e = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nmax_concurrent = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`servers.a.max_concurrent`"), "{e}");
        let e = parse("[audit]\nbogus = 1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("conf/servers.toml:2:1: unknown field `bogus`"),
            "{e}"
        );
    }

    #[test]
    fn defaults() {
        let c = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\n").unwrap();
        assert_eq!(c.broker.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.broker.public_url.as_str(), "http://127.0.0.1:8080/mcp");
        assert_eq!(c.broker.separator, "__");
        assert_eq!(c.broker.session_idle_timeout, Duration::from_secs(3600));
        let s = &c.servers[0];
        assert_eq!(s.prefix, "a");
        match &s.transport {
            TransportConfig::Stdio {
                cwd, inherit_env, ..
            } => {
                assert_eq!(cwd, Path::new("conf"));
                assert_eq!(inherit_env, &["PATH", "HOME", "LANG", "TMPDIR"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = parse("[servers.a]\ntransport = \"stdio\"\ncomand = \"x\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("conf/servers.toml:3:"), "{msg}");
        assert!(msg.contains("comand"), "{msg}");
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let e = parse("[broker]\n\n[servers.web]\ntransport = \"http\"\nurl = \"ftp://x\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:5: `servers.web.url`: must be an http or https URL"
        );
        let e = parse("[servers.web]\ntransport = \"carrier-pigeon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2: `servers.web.transport`"), "{e}");
        let e = parse("[servers.web]\ntransport = \"http\"\nurl = \"http://x\"\ncommand = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":4: `servers.web.command`: `command` does not apply"),
            "{e}"
        );
    }

    #[test]
    fn env_expansion_and_secret_redaction() {
        let c = parse(
            "[servers.w]\ntransport = \"http\"\nurl = \"http://h/mcp\"\nheaders = { Authorization = \"Bearer ${TOKEN}\" }\n",
        )
        .unwrap();
        let TransportConfig::Http { headers, .. } = &c.servers[0].transport else {
            panic!()
        };
        assert_eq!(headers[0].1.expose(), "Bearer s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = parse("[servers.w]\ntransport = \"stdio\"\ncommand = \"${NOPE}\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`servers.w.command`: environment variable `NOPE` is not set"),
            "{e}"
        );
    }

    #[test]
    fn prefixes_that_fold_to_one_resource_uri_prefix_are_refused() {
        // `team_a` and `team-a` are distinct tool prefixes but both route `team-a+…` URIs.
        let e = parse(
            "[servers.team_a]\ntransport = \"stdio\"\ncommand = \"x\"\n\n[servers.team-a]\ntransport = \"stdio\"\ncommand = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("conf/servers.toml:5: `servers.team-a.prefix`:")
                && e.contains("server `team_a`")
                && e.contains("server `team-a`")
                && e.contains("`team-a+`"),
            "{e}"
        );
        let e = parse(
            "[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"Team\"\n[servers.b]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"team\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("conf/servers.toml:8: `servers.b.prefix`:") && e.contains("server `a`"),
            "{e}"
        );
        // Unprefixed servers share no URI prefix; distinct ones stay valid.
        parse(
            "[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"\"\n[servers.b]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"\"\n[servers.team_a]\ntransport = \"stdio\"\ncommand = \"x\"\n[servers.team_b]\ntransport = \"stdio\"\ncommand = \"x\"\n",
        )
        .unwrap();
    }

    #[test]
    fn servers_keep_file_order_and_prefixes_must_differ() {
        let c = parse(
            "[servers.zeta]\ntransport = \"stdio\"\ncommand = \"x\"\n[servers.alpha]\ntransport = \"stdio\"\ncommand = \"x\"\n",
        )
        .unwrap();
        assert_eq!(c.servers[0].name, "zeta");
        let e = parse(
            "[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"p\"\n[servers.b]\ntransport = \"stdio\"\ncommand = \"x\"\nprefix = \"p\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`servers.b.prefix`") && e.contains("server `a`"),
            "{e}"
        );
    }

    #[test]
    fn auth_and_policy() {
        let c = parse(
            "[broker]\npublic_url = \"https://mcp.example.com/mcp\"\n[auth]\nissuer = \"https://idp.example.com\"\nrequired_scopes = [\"mcp:tools\"]\n[[policy]]\nservers = [\"ledger\"]\ntools = [\"get_*\"]\nrequire_scopes = [\"pii:read\"]\nclaims = { groups = \"finance\" }\nmessage = \"no\"\n[[policy]]\neffect = \"deny\"\n",
        )
        .unwrap();
        let a = c.auth.as_ref().unwrap();
        assert_eq!(a.audience, "https://mcp.example.com/mcp");
        assert_eq!(a.group_claims, ["groups", "roles"]);
        assert_eq!(c.policy.len(), 2);
        assert!(c.policy[0].tools.as_ref().unwrap().matches("get_account"));
        assert_eq!(
            c.policy[0].claims,
            [("groups".to_string(), "finance".to_string())]
        );
        assert_eq!(c.policy[1].effect, Effect::Deny);
        let e = parse("[[policy]]\neffect = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`policy.effect`") && e.contains("rule 1"), "{e}");
        let e = parse("[auth]\nissuer = \"x\"\nisuer = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":3:") && e.contains("isuer"), "{e}");
    }

    #[test]
    fn filters_and_durations() {
        let c = parse(
            "[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\ntimeout = \"250ms\"\ntools = { include = [\"get_*\", \"list_*\"], exclude = [\"get_secret\"] }\n",
        )
        .unwrap();
        let s = &c.servers[0];
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert!(s.tools.admits("get_account"));
        assert!(!s.tools.admits("get_secret"));
        assert!(!s.tools.admits("delete_account"));
        assert!(parse_duration("1h") == Some(Duration::from_secs(3600)));
        assert!(parse_duration("abc").is_none());
    }

    #[test]
    fn follow_redirects_is_an_http_and_sse_key() {
        let c = parse("[servers.a]\ntransport = \"http\"\nurl = \"http://x\"\n[servers.b]\ntransport = \"sse\"\nurl = \"http://y/sse\"\nfollow_redirects = \"same_origin\"\n[servers.c]\ntransport = \"http\"\nurl = \"http://z\"\nfollow_redirects = \"none\"\n")
            .unwrap();
        let modes: Vec<_> = c
            .servers
            .iter()
            .map(|s| s.transport.follow_redirects())
            .collect();
        assert_eq!(
            modes,
            [
                FollowRedirects::None,
                FollowRedirects::SameOrigin,
                FollowRedirects::None
            ]
        );
        let e = parse("[servers.s]\ntransport = \"stdio\"\ncommand = \"x\"\nfollow_redirects = \"same_origin\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:4: `servers.s.follow_redirects`: `follow_redirects` does not apply to transport \"stdio\""),
            "{e}"
        );
        let e = parse(
            "[servers.h]\ntransport = \"http\"\nurl = \"http://x\"\nfollow_redirects = \"all\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("conf/servers.toml:4: `servers.h.follow_redirects`: unknown variant `all`, expected `none` or `same_origin`"),
            "{e}"
        );
    }

    #[test]
    fn a_key_of_another_transport_is_named_with_what_applies() {
        let e = parse("[servers.web]\ntransport = \"http\"\nurl = \"http://x\"\ncwd = \"/tmp\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:4: `servers.web.cwd`: `cwd` does not apply to transport \"http\"; expected one of `url`, `headers`, `follow_redirects`, `ca_file`, `client_cert`, `client_key`, or a key every transport takes: `prefix`"),
            "{e}"
        );
        // the same key written before `transport`, and in an inline table
        let e =
            parse("[servers.web]\nenv = { A = \"b\" }\ntransport = \"sse\"\nurl = \"http://x\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            e.starts_with(
                "conf/servers.toml:2: `servers.web.env`: `env` does not apply to transport \"sse\""
            ),
            "{e}"
        );
        let e = parse("[servers]\nweb = { transport = \"http\", url = \"http://x\", args = [] }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:2: `servers.web.args`: `args` does not apply"),
            "{e}"
        );
        // and a stdio server needs its own keys
        let e = parse("[servers.a]\ntransport = \"stdio\"\nargs = []\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:1: `servers.a.command`: transport \"stdio\" needs `command`"
        );
    }

    #[test]
    fn transport_is_inferred_from_command_or_url_and_sse_stays_explicit() {
        let c = parse("[servers.a]\ncommand = \"x\"\n[servers.b]\nurl = \"http://h/mcp\"\n[servers.c]\ntransport = \"sse\"\nurl = \"http://h/sse\"\n").unwrap();
        let kinds: Vec<_> = c.servers.iter().map(|s| s.transport.kind()).collect();
        assert_eq!(kinds, ["stdio", "http", "sse"]);
        // An explicit transport still decides, and its keys are still checked.
        let e = parse("[servers.a]\ntransport = \"http\"\ncommand = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:3: `servers.a.command`: `command` does not apply to transport \"http\";"),
            "{e}"
        );
    }

    #[test]
    fn keys_of_another_transport_are_refused_when_it_is_inferred() {
        let e = parse("[servers.a]\ncommand = \"x\"\nheaders = { A = \"b\" }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:3: `servers.a.headers`: `headers` does not apply to transport \"stdio\" (inferred from `command`); expected one of `command`"),
            "{e}"
        );
        let e = parse("[servers.b]\nurl = \"http://h/mcp\"\ncwd = \"/tmp\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:3: `servers.b.cwd`: `cwd` does not apply to transport \"http\" (inferred from `url`)"),
            "{e}"
        );
        // Both: `command` wins, and `url` is refused on its line.
        let e = parse("[servers.c]\nurl = \"http://h/mcp\"\ncommand = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/servers.toml:2: `servers.c.url`: `url` does not apply to transport \"stdio\" (inferred from `command`)"),
            "{e}"
        );
    }

    #[test]
    fn broker_inherit_env_is_the_default_a_server_replaces() {
        let c = parse("[broker]\ninherit_env = [\"PATH\", \"SSL_CERT_FILE\"]\n[servers.a]\ncommand = \"x\"\n[servers.b]\ncommand = \"y\"\ninherit_env = [\"HOME\"]\n").unwrap();
        let envs: Vec<_> = c
            .servers
            .iter()
            .map(|s| match &s.transport {
                TransportConfig::Stdio { inherit_env, .. } => inherit_env.clone(),
                _ => Vec::new(),
            })
            .collect();
        // b's own list replaces the broker's: SSL_CERT_FILE and PATH do not reach it.
        assert_eq!(envs, [vec!["PATH", "SSL_CERT_FILE"], vec!["HOME"]]);
        let plain = parse("[servers.a]\ncommand = \"x\"\n").unwrap();
        assert_eq!(plain.broker.inherit_env, DEFAULT_INHERIT_ENV);
        // A change to [broker] inherit_env changes the servers that use it (a reload restarts them).
        let other = parse("[broker]\ninherit_env = [\"PATH\"]\n[servers.a]\ncommand = \"x\"\n[servers.b]\ncommand = \"y\"\ninherit_env = [\"HOME\"]\n").unwrap();
        assert_ne!(c.servers[0].fingerprint, other.servers[0].fingerprint);
        assert_eq!(c.servers[1].fingerprint, other.servers[1].fingerprint);
    }

    #[test]
    fn an_unknown_transport_lists_the_transports() {
        let e = parse("[servers.web]\ntransport = \"carrier-pigeon\"\ncommand = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:2: `servers.web.transport`: \"carrier-pigeon\" is not a transport; use one of `stdio`, `http`, `sse`"
        );
        // Neither `transport` nor a key to infer it from.
        let e = parse("[servers.web]\nprefix = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:1: `servers.web.transport`: missing: give one of `stdio`, `http`, `sse`, or leave it out and give `command` (for stdio) or `url` (for http)"
        );
        let e = parse("[credentials.v]\nkind = \"kms\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:2: `credentials.v.kind`: \"kms\" is not a kind; use one of `token_exchange`, `vault`"
        );
    }

    #[test]
    fn an_unknown_key_inside_a_variant_names_its_line() {
        let e = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\nargs = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:4: `servers.a.args`: invalid type: string \"y\", expected a sequence"
        );
        let e = parse("[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\n[servers.a.tool_limits.slow]\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "conf/servers.toml:4: `servers.a.tool_limits.slow.bogus`: unknown field `bogus`"
            ),
            "{e}"
        );
        let vault = "[credentials.v]\nkind = \"vault\"\naddress = \"https://v\"\n";
        let e = parse(&format!(
            "{vault}client_id = \"c\"\nlogin = {{ method = \"token\", token = \"t\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("conf/servers.toml:4: `credentials.v.client_id`: `client_id` does not apply to kind \"vault\"; expected one of `address`"), "{e}");
        let e = parse(&format!(
            "{vault}login = {{ method = \"token\", token = \"t\", role = \"r\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:4: `credentials.v.login`: unknown field `role`, expected `token`"
        );
        let e = parse(&format!("{vault}login = {{ method = \"ldap\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`credentials.v.login.method`: unknown variant `ldap`, expected one of `token`, `approle`, `jwt`"), "{e}");
    }

    #[test]
    fn upstream_auth_takes_the_keys_of_its_stores_kind() {
        let idp = "[credentials.idp]\nkind = \"token_exchange\"\ntoken_endpoint = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[servers.a]\ntransport = \"stdio\"\ncommand = \"x\"\n";
        let c = parse(&format!(
            "{idp}upstream_auth = {{ use = \"idp\", audience = \"urn:a\", ttl = \"5s\" }}\n"
        ))
        .unwrap();
        assert!(
            matches!(&c.servers[0].upstream_auth, Some(UpstreamAuth::Exchange { client, ttl: Some(_), .. }) if client == "idp")
        );
        assert_eq!(c.servers[0].isolation, Isolation::Caller);
        let e = parse(&format!(
            "{idp}upstream_auth = {{ use = \"idp\", audience = \"urn:a\", path = \"p\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "conf/servers.toml:9: `servers.a.upstream_auth`: `path` does not apply to `idp`, a token_exchange store; expected one of `audience`, `scopes`, `tool_scopes`, `ttl`"
        );
        let e = parse(&format!(
            "{idp}upstream_auth = {{ first = [{{ use = \"idp\" }}] }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`idp` is a token_exchange store: it needs `audience`"),
            "{e}"
        );
        let e = parse(&format!(
            "{idp}upstream_auth = {{ kind = \"static\", use = \"idp\", value = \"v\" }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":9: `servers.a.upstream_auth`: kind = \"static\": unknown field `use`"),
            "{e}"
        );
        let c = parse(&format!(
            "{idp}upstream_auth = {{ kind = \"static\", env = {{ KEY = \"v\" }} }}\n"
        ))
        .unwrap();
        assert!(
            matches!(&c.servers[0].upstream_auth, Some(UpstreamAuth::Static(v)) if v.len() == 1)
        );
        let e = parse(&format!("{idp}upstream_auth = {{ value = \"v\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "needs `use = \"<credentials store>\"`, `kind = \"static\"` or `first = [...]`"
            ),
            "{e}"
        );
    }
}
