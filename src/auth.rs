//! Who is calling. Today the broker runs without inbound auth, so every caller is either a local stdio
//! client or an anonymous HTTP client; the OAuth resource server (a later issue) will attach a
//! validated [`Caller`] to each HTTP request's extensions, where the front already reads it.

/// The identity behind a request, as the broker's policy and audit see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The subject: a token's `sub`, or a fixed label when there is no token.
    pub sub: String,
    /// The OAuth client the subject used, when known.
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
}

impl Caller {
    /// The client that launched `mcp-broker stdio`: the local user.
    pub fn local() -> Self {
        Self {
            sub: "local".into(),
            client_id: None,
            scopes: Vec::new(),
        }
    }

    /// An HTTP client on a broker configured without inbound auth.
    pub fn anonymous() -> Self {
        Self {
            sub: "anonymous".into(),
            client_id: None,
            scopes: Vec::new(),
        }
    }
}
