//! The user's surface: serde types for `servers.toml` as written, `deny_unknown_fields` everywhere.
//!
//! Where the keys a table takes depend on one of its values, the type is an enum with one variant per
//! value, so a key that does not apply cannot be written: a server's `transport` ([`RawTransport`]), a
//! store's `kind` ([`RawCredentialStore`]), a Vault login's `method` ([`RawVaultLogin`]), and
//! `upstream_auth` ([`RawUpstreamAuth`], inferred from its keys). Such tables are read as a
//! [`KeyedTable`] first and typed by [`Ctx::tagged`], which keeps each key's line for the errors.

use std::collections::BTreeMap;
use std::fmt;

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx, FollowRedirects, Isolation, Protocol, line_col};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) broker: RawBroker,
    pub(super) audit: Option<RawAudit>,
    pub(super) limits: Option<RawLimits>,
    /// Typed per server by [`Ctx::tagged`]: `transport` decides which keys apply.
    #[serde(default)]
    pub(super) servers: IndexMap<String, Spanned<KeyedTable>>,
    pub(super) auth: Option<RawAuth>,
    #[serde(default)]
    pub(super) policy: Vec<RawPolicy>,
    pub(super) policy_engine: Option<RawPolicyEngine>,
    /// Typed per store by [`Ctx::tagged`]: `kind` decides which keys apply.
    #[serde(default)]
    pub(super) credentials: IndexMap<String, Spanned<KeyedTable>>,
    pub(super) cluster: Option<RawCluster>,
    pub(super) telemetry: Option<RawTelemetry>,
    pub(super) oauth: Option<RawOAuth>,
    pub(super) token_store: Option<RawTokenStore>,
    pub(super) guard: Option<RawGuard>,
}

/// `[guard]`: masking, pins, description scanning, approval announcements.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGuard {
    pub(super) mask_results: Option<bool>,
    #[serde(default)]
    pub(super) mask_patterns: Vec<RawMaskPattern>,
    pub(super) pins: Option<String>,
    pub(super) on_drift: Option<String>,
    pub(super) scan_descriptions: Option<String>,
    pub(super) approval_webhook: Option<String>,
}

/// `mask_patterns = [{ kind = "ticket", regex = "TCK-[0-9]{6}" }]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMaskPattern {
    pub(super) kind: String,
    pub(super) regex: String,
}

/// `[oauth]`: the broker as an OAuth client of upstream authorization servers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    pub(super) sign_in: Option<String>,
    pub(super) link_ttl: Option<String>,
    pub(super) client_name: Option<String>,
    pub(super) client_metadata_url: Option<String>,
    pub(super) ca_file: Option<String>,
    /// Keyed by the authorization server's issuer.
    #[serde(default)]
    pub(super) clients: IndexMap<String, RawOAuthClient>,
}

/// `[oauth.clients."ISSUER"]`: the broker's registration at one upstream authorization server.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuthClient {
    pub(super) client_id: String,
    pub(super) client_secret: Option<String>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    pub(super) auth_method: Option<String>,
}

/// `upstream_auth = { kind = "oauth" | "id_jag" | "client_credentials", ... }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuthAuth {
    pub(super) kind: String,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) share_catalog: Option<bool>,
    pub(super) idp: Option<String>,
    pub(super) subject: Option<String>,
}

/// `[token_store]`: the file upstream OAuth tokens are kept in, sealed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokenStore {
    pub(super) path: String,
    pub(super) key: String,
}

/// `[telemetry]`: OpenTelemetry spans over OTLP/HTTP.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) otlp_endpoint: String,
    pub(super) service_name: Option<String>,
    #[serde(default)]
    pub(super) headers: IndexMap<String, String>,
    pub(super) sample_ratio: Option<f64>,
}

/// `[cluster]`: several brokers sharing state in Redis.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub(super) redis_url: String,
    pub(super) instance_id: Option<String>,
    pub(super) secret_key: String,
    pub(super) share_credentials: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) file: Option<String>,
    pub(super) stdout: Option<bool>,
    pub(super) stderr: Option<bool>,
    pub(super) arguments: Option<String>,
    pub(super) max_file_size: Option<String>,
    pub(super) keep_files: Option<usize>,
    pub(super) queue: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) per_caller: Option<RawRateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) rate: String,
    pub(super) burst: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToolLimits {
    pub(super) timeout: Option<String>,
    pub(super) rate_limit: Option<RawRateLimit>,
}

/// `[credentials.NAME]`: `kind` picks the variant, and each kind takes only its own keys.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum RawCredentialStore {
    TokenExchange {
        token_endpoint: String,
        client_id: String,
        client_secret: String,
        auth_method: Option<String>,
        actor: Option<String>,
    },
    Vault {
        address: String,
        kv_version: Option<u8>,
        login: RawVaultLogin,
        cache_ttl: Option<String>,
        namespace: Option<String>,
    },
}

/// `login = { method = "...", ... }` of a vault store.
#[derive(Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum RawVaultLogin {
    Token {
        token: String,
    },
    AppRole {
        mount: Option<String>,
        role_id: String,
        secret_id: String,
    },
    Jwt {
        mount: Option<String>,
        role: String,
        /// Optional here only so its absence gets a message that says why it is needed.
        exchange: Option<RawVaultExchange>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVaultExchange {
    #[serde(rename = "use")]
    pub(super) use_: String,
    pub(super) audience: String,
}

/// `upstream_auth`: the shape is inferred from the keys (see its `Deserialize`): `first = [...]`,
/// `kind = "static"`, or `use = "<store>"`, whose other keys are typed once the store's kind is known.
pub(super) enum RawUpstreamAuth {
    First(Vec<RawUpstreamAuth>),
    Static(RawStaticAuth),
    OAuth(RawOAuthAuth),
    Store { store: String, rest: toml::Table },
}

impl<'de> Deserialize<'de> for RawUpstreamAuth {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(d)?;
        if table.contains_key("first") {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Chain {
                first: Vec<RawUpstreamAuth>,
            }
            let chain = Chain::deserialize(toml::Value::Table(table))
                .map_err(|e| D::Error::custom(format!("in a `first` chain: {}", e.message())))?;
            return Ok(Self::First(chain.first));
        }
        if let Some(toml::Value::String(kind)) = table.get("kind")
            && matches!(kind.as_str(), "oauth" | "id_jag" | "client_credentials")
        {
            let kind = kind.clone();
            return RawOAuthAuth::deserialize(toml::Value::Table(table))
                .map(Self::OAuth)
                .map_err(|e| D::Error::custom(format!("kind = \"{kind}\": {}", e.message())));
        }
        if table.contains_key("kind") {
            return RawStaticAuth::deserialize(toml::Value::Table(table))
                .map(Self::Static)
                .map_err(|e| D::Error::custom(format!("kind = \"static\": {}", e.message())));
        }
        match table.remove("use") {
            Some(toml::Value::String(store)) => Ok(Self::Store { store, rest: table }),
            Some(_) => Err(D::Error::custom("`use` names a [credentials.NAME] store")),
            None => Err(D::Error::custom(
                "needs `use = \"<credentials store>\"`, `kind = \"static\"` or `first = [...]`",
            )),
        }
    }
}

/// `kind = "static"`: one `value` (into `header` or an `env` name), or an `env` table of values.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStaticAuth {
    /// Only `"static"` is accepted: the value is the whole check.
    #[serde(rename = "kind")]
    _kind: StaticKind,
    pub(super) value: Option<String>,
    pub(super) header: Option<String>,
    pub(super) format: Option<String>,
    pub(super) env: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StaticKind {
    Static,
}

/// `use` of a token_exchange store.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExchangeAuth {
    pub(super) audience: String,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) tool_scopes: Option<BTreeMap<String, Vec<String>>>,
    pub(super) ttl: Option<String>,
}

/// `use` of a vault store.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVaultAuth {
    pub(super) path: String,
    pub(super) field: Option<String>,
    pub(super) header: Option<String>,
    pub(super) format: Option<String>,
    pub(super) env: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicyEngine {
    pub(super) rego: String,
    pub(super) query: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) issuer: String,
    pub(super) jwks_uri: Option<String>,
    pub(super) audience: Option<String>,
    #[serde(default)]
    pub(super) required_scopes: Vec<String>,
    #[serde(default)]
    pub(super) scopes_supported: Vec<String>,
    pub(super) introspection: Option<RawIntrospection>,
    pub(super) group_claims: Option<Vec<String>>,
    #[serde(default)]
    pub(super) admin_scopes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntrospection {
    pub(super) endpoint: String,
    pub(super) client_id: String,
    pub(super) client_secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) servers: Option<Vec<String>>,
    pub(super) tools: Option<Vec<String>>,
    pub(super) prompts: Option<Vec<String>>,
    pub(super) resources: Option<Vec<String>>,
    #[serde(default)]
    pub(super) require_scopes: Vec<String>,
    #[serde(default)]
    pub(super) claims: BTreeMap<String, String>,
    pub(super) effect: Option<String>,
    pub(super) message: Option<String>,
    #[serde(default)]
    pub(super) step_up: bool,
    pub(super) approval: Option<String>,
    pub(super) approvers: Option<RawApprovers>,
    pub(super) approval_timeout: Option<String>,
    pub(super) grant_durations: Option<Vec<String>>,
    pub(super) bind_arguments: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApprovers {
    #[serde(default)]
    pub(super) groups: Vec<String>,
    #[serde(default)]
    pub(super) subjects: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBroker {
    pub(super) listen: Option<String>,
    pub(super) public_url: Option<String>,
    pub(super) separator: Option<String>,
    pub(super) session_idle_timeout: Option<String>,
    pub(super) max_request_body: Option<usize>,
    pub(super) metrics_listen: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) watch_config: Option<bool>,
    pub(super) startup_wait: Option<String>,
    pub(super) max_sessions: Option<usize>,
    pub(super) max_sessions_per_subject: Option<usize>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) request_state_ttl: Option<String>,
    pub(super) direct_lane: Option<bool>,
    pub(super) inherit_env: Option<Vec<String>>,
    pub(super) tls: Option<RawTls>,
}

/// `[broker] tls = { cert = "…", key = "…" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: String,
    pub(super) key: String,
}

/// `[servers.NAME]` keys every transport takes; the rest of the table is the [`RawTransport`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) prefix: Option<String>,
    pub(super) tools: Option<RawFilter>,
    pub(super) timeout: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) upstream_auth: Option<RawUpstreamAuth>,
    pub(super) isolation: Option<Isolation>,
    pub(super) protocol: Option<Protocol>,
    pub(super) max_subjects: Option<usize>,
    pub(super) subject_idle_timeout: Option<String>,
    pub(super) required: Option<bool>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) max_concurrent: Option<usize>,
    pub(super) tool_limits: Option<BTreeMap<String, RawToolLimits>>,
}

/// `transport = "..."` picks the variant, and each transport takes only its own keys.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub(super) enum RawTransport {
    Stdio {
        command: String,
        args: Option<Vec<String>>,
        env: Option<BTreeMap<String, String>>,
        cwd: Option<String>,
        inherit_env: Option<Vec<String>>,
    },
    Http {
        url: String,
        headers: Option<BTreeMap<String, String>>,
        follow_redirects: Option<FollowRedirects>,
        ca_file: Option<String>,
        client_cert: Option<String>,
        client_key: Option<String>,
    },
    Sse {
        url: String,
        headers: Option<BTreeMap<String, String>>,
        follow_redirects: Option<FollowRedirects>,
        ca_file: Option<String>,
        client_cert: Option<String>,
        client_key: Option<String>,
    },
}

/// Keys no table takes: the shared half of a table whose variants share nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoSharedKeys {}

/// A TOML table read before its shape is known: each key with its place in the file, each value
/// untyped. A table whose allowed keys depend on one of its values (a server's `transport`, a store's
/// `kind`) is read this way, then typed as that variant ([`Ctx::tagged`]); serde's own tagged enums
/// would do the same but lose the keys' positions, and errors must name the line.
pub(super) struct KeyedTable(pub(super) Vec<(Spanned<String>, toml::Value)>);

impl<'de> Deserialize<'de> for KeyedTable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = KeyedTable;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<KeyedTable, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(KeyedTable(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// The field names of a derived struct, or the variant names of a derived enum, as serde sees them:
/// what a [`KeyedTable`] is split by, and what error messages list as allowed.
pub(super) fn serde_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Names(&'static [&'static str]);
    impl fmt::Display for Names {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("names")
        }
    }
    impl std::error::Error for Names {}
    impl serde::de::Error for Names {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Names(&[])
        }
    }
    struct Probe;
    impl<'de> serde::Deserializer<'de> for Probe {
        type Error = Names;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Names> {
            Err(Names(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Names> {
            Err(Names(fields))
        }
        fn deserialize_enum<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Names> {
            Err(Names(variants))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map identifier ignored_any
        }
    }
    match T::deserialize(Probe) {
        Err(Names(names)) => names,
        Ok(_) => &[],
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFilter {
    #[serde(default)]
    pub(super) include: Vec<String>,
    #[serde(default)]
    pub(super) exclude: Vec<String>,
}

/// The first `quoted` name in a serde message (`missing field \`command\``).
pub(super) fn backticked(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once('`')?;
    rest.split_once('`').map(|(name, _)| name)
}

impl Ctx<'_> {
    /// Type a [`KeyedTable`] whose `tag` key picks the variant of `V` (an enum of struct variants named
    /// as the tag's values, `deny_unknown_fields`); the keys of `S` are shared by every variant. Errors
    /// name the line of the key they concern and say which keys the variant takes.
    ///
    /// Without the `tag` key, the first `(key, variant)` of `infer` whose key the table has picks the
    /// variant (a server with `command` is stdio); the variant's own keys are then checked as usual.
    pub(super) fn tagged<V: serde::de::DeserializeOwned, S: serde::de::DeserializeOwned>(
        &self,
        table: &[&str],
        raw: &Spanned<KeyedTable>,
        tag: &str,
        infer: &[(&str, &str)],
    ) -> Result<(V, S), ConfigError> {
        let at = Place {
            ctx: self,
            table,
            raw,
        };
        let (variants, shared) = (serde_names::<V>(), serde_names::<S>());
        let (mut own, mut common, mut variant) = (toml::Table::new(), toml::Table::new(), None);
        for (k, v) in &raw.get_ref().0 {
            let k = k.get_ref();
            if k == tag {
                let name = v
                    .as_str()
                    .ok_or_else(|| at.error(tag, format!("must be one of {}", listed(variants))))?;
                variant = Some(name);
            } else if shared.contains(&k.as_str()) {
                common.insert(k.clone(), v.clone());
            } else {
                own.insert(k.clone(), v.clone());
            }
        }
        let has = |key: &str| raw.get_ref().0.iter().any(|(k, _)| k.get_ref() == key);
        let (variant, inferred) = match variant {
            Some(v) => (v, String::new()),
            None => match infer.iter().find(|(key, _)| has(key)) {
                Some((key, v)) => (*v, format!(" (inferred from `{key}`)")),
                None => {
                    let or: Vec<_> = infer
                        .iter()
                        .map(|(key, v)| format!("`{key}` (for {v})"))
                        .collect();
                    let or = if or.is_empty() {
                        String::new()
                    } else {
                        format!(", or leave it out and give {}", or.join(" or "))
                    };
                    return Err(at.error(
                        tag,
                        format!("missing: give one of {}{or}", listed(variants)),
                    ));
                }
            },
        };
        // Externally tagged (`{ stdio = { ... } }`) so serde picks the variant and the path names the key.
        let value = toml::Table::from_iter([(variant.to_string(), toml::Value::Table(own))]);
        let own = typed::<V>(value).map_err(|(keys, message)| {
            let Some(key) = keys.first() else {
                if message.starts_with("unknown variant") {
                    let m = format!(
                        "\"{variant}\" is not a {tag}; use one of {}",
                        listed(variants)
                    );
                    return at.error(tag, m);
                }
                let missing = backticked(&message).unwrap_or_default();
                return at.error(
                    missing,
                    format!("{tag} \"{variant}\"{inferred} needs `{missing}`"),
                );
            };
            let message = match message.strip_prefix("unknown field ") {
                // An unknown key of the variant itself (not one inside a value of it).
                Some(rest) if keys.len() == 1 && backticked(&message) == Some(key) => {
                    let expected = rest.split_once(", ").map_or("", |(_, e)| e);
                    let also = if shared.is_empty() {
                        String::new()
                    } else {
                        format!(", or a key every {tag} takes: {}", listed(shared))
                    };
                    format!(
                        "`{key}` does not apply to {tag} \"{variant}\"{inferred}; {expected}{also}"
                    )
                }
                _ => message,
            };
            at.error(&keys.join("."), message)
        })?;
        let common = typed::<S>(common).map_err(|(keys, m)| at.error(&keys.join("."), m))?;
        Ok((own, common))
    }
}

/// A [`KeyedTable`] being typed, to place its errors: the dotted key and the line of its first part.
struct Place<'a, 'c> {
    ctx: &'a Ctx<'c>,
    table: &'a [&'a str],
    raw: &'a Spanned<KeyedTable>,
}

impl Place<'_, '_> {
    fn error(&self, key: &str, message: String) -> ConfigError {
        let first = key.split('.').next().unwrap_or_default();
        let span = self
            .raw
            .get_ref()
            .0
            .iter()
            .find(|(k, _)| k.get_ref() == first)
            .map_or(self.raw.span(), |(k, _)| k.span());
        ConfigError::Invalid {
            path: self.ctx.path.to_path_buf(),
            line: line_col(self.ctx.text, span.start).0,
            key: format!("{}.{key}", self.table.join(".")),
            message,
        }
    }
}

/// Deserialize `table` as `T`; an error comes with the keys that lead to it and serde's message.
fn typed<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T, (Vec<String>, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let keys = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                _ => None,
            })
            .collect();
        (keys, e.inner().message().to_string())
    })
}

/// `` `a`, `b`, `c` ``
fn listed(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
