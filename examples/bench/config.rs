//! The broker configurations the bench writes: which layers are on, and which upstreams.

use std::path::{Path, PathBuf};

use crate::idp::{BROKER_AUDIENCE, Idp};

/// The broker features in the request path, cumulatively.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Layers {
    /// No `[auth]`: every caller is anonymous, no policy applies.
    Off,
    /// `[auth]` with a JWT from the bench IdP (JWKS), required scopes and three `[[policy]]` rules.
    AuthPolicy,
    /// As `AuthPolicy`, and every upstream gets an RFC 8693 token exchanged for the caller's
    /// (cached by the broker; with it the broker opens one upstream connection per caller).
    AuthPolicyExchange,
}

impl Layers {
    pub fn authenticates(self) -> bool {
        self != Self::Off
    }
}

/// One `[servers.NAME]` entry: a ledger over stdio (the broker launches it) or over HTTP.
pub enum Upstream {
    Stdio { ledger: PathBuf },
    Http { url: String },
}

/// The TOML for a broker on a free loopback port with `upstreams`.
/// `n` stdio ledgers named `l01`, `l02`, …: their names and their server entries.
pub fn ledgers(ledger: &Path, n: usize) -> (Vec<String>, Vec<(String, Upstream)>) {
    let names: Vec<String> = (1..=n).map(|i| format!("l{i:02}")).collect();
    let servers = names
        .iter()
        .map(|name| {
            let ledger = ledger.to_path_buf();
            (name.clone(), Upstream::Stdio { ledger })
        })
        .collect();
    (names, servers)
}

pub fn render(layers: Layers, upstreams: &[(String, Upstream)], idp: &Idp) -> String {
    render_with(layers, upstreams, idp, None)
}

/// As [`render`], with `[broker] max_sessions` and `max_sessions_per_subject` both set to
/// `max_sessions` when given (the defaults, 10,000 and 1,000, would refuse the sessions a memory
/// row opens as one anonymous caller).
pub fn render_with(
    layers: Layers,
    upstreams: &[(String, Upstream)],
    idp: &Idp,
    max_sessions: Option<usize>,
) -> String {
    let mut toml = String::from(
        "# Written by examples/bench.rs.\n\
         [broker]\n\
         listen = \"127.0.0.1:0\"\n\
         session_idle_timeout = \"10m\"\n",
    );
    if let Some(n) = max_sessions {
        toml.push_str(&format!(
            "max_sessions = {n}\nmax_sessions_per_subject = {n}\n"
        ));
    }
    if layers.authenticates() {
        toml.push_str(&auth_and_policy(idp));
    }
    if layers == Layers::AuthPolicyExchange {
        toml.push_str(&format!(
            "\n[credentials.sts]\n\
             kind = \"token_exchange\"\n\
             token_endpoint = {}\n\
             client_id = \"mcp-broker\"\n\
             client_secret = \"bench-secret\"\n",
            quote(&idp.token_endpoint)
        ));
    }
    for (name, upstream) in upstreams {
        toml.push_str(&format!("\n[servers.{name}]\n"));
        match upstream {
            Upstream::Stdio { ledger } => toml.push_str(&format!(
                "transport = \"stdio\"\n\
                 command = {}\n\
                 args = [\"stdio\"]\n\
                 env = {{ RUST_LOG = \"warn\" }}\n",
                quote(&ledger.display().to_string())
            )),
            Upstream::Http { url } => {
                toml.push_str(&format!("transport = \"http\"\nurl = {}\n", quote(url)))
            }
        }
        if layers == Layers::AuthPolicyExchange {
            toml.push_str(&format!(
                "upstream_auth = {{ use = \"sts\", audience = {}, scopes = [\"ledger:read\"] }}\n",
                quote(&format!("urn:bench:{name}"))
            ));
        }
    }
    toml
}

/// `[auth]` against the bench IdP and rules shaped like a real deployment's: two refusals the
/// workload's tool is checked against (and passes), then the allow rule that admits it.
fn auth_and_policy(idp: &Idp) -> String {
    format!(
        "\n[auth]\n\
         issuer = {issuer}\n\
         jwks_uri = {jwks}\n\
         audience = {audience}\n\
         required_scopes = [\"mcp:tools\"]\n\
         \n[[policy]]\n\
         tools = [\"get_customer_pii\"]\n\
         require_scopes = [\"pii:read\"]\n\
         message = \"PII access requires the pii:read scope.\"\n\
         \n[[policy]]\n\
         tools = [\"update_*\"]\n\
         effect = \"deny\"\n\
         message = \"The bench caller is read-only.\"\n\
         \n[[policy]]\n\
         require_scopes = [\"ledger:read\"]\n\
         claims = {{ groups = \"finance\" }}\n",
        issuer = quote(&idp.issuer),
        jwks = quote(&idp.jwks_uri),
        audience = quote(BROKER_AUDIENCE),
    )
}

/// A TOML basic string (JSON string escapes are valid TOML escapes).
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serializes")
}

/// Write `toml` to `dir/name.toml`.
pub fn write(dir: &Path, name: &str, toml: &str) -> Result<PathBuf, String> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
