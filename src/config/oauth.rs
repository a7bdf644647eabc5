//! `[oauth]` and `upstream_auth = { kind = "oauth" | "id_jag" | "client_credentials" }`: the broker
//! as an OAuth client of upstream authorization servers (read by `crate::oauth`).

use std::time::Duration;

use super::raw::{RawOAuth, RawOAuthAuth};
use super::{ConfigError, CredentialStore, Ctx, Secret};
use indexmap::IndexMap;

/// `[oauth]`; the defaults when the section is absent.
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    /// The `[credentials.NAME]` (a token_exchange client at `[auth] issuer`) that signs browsers
    /// in at `/oauth/start`, and is the enterprise IdP client of `id_jag`.
    pub sign_in: Option<String>,
    /// How long a consent link stays valid.
    pub link_ttl: Duration,
    /// The name dynamic client registration gives the broker.
    pub client_name: String,
    /// A Client ID Metadata Document URL (https) used at servers that support them.
    pub client_metadata_url: Option<url::Url>,
    /// Registrations at upstream authorization servers, by issuer (exact string).
    pub clients: Vec<OAuthClientReg>,
    /// PEM roots trusted for every OAuth request besides the system's (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for OAuthSettings {
    fn default() -> Self {
        Self {
            sign_in: None,
            link_ttl: Duration::from_secs(600),
            client_name: "mcp-broker".into(),
            client_metadata_url: None,
            clients: Vec::new(),
            ca_file: None,
        }
    }
}

impl OAuthSettings {
    /// The configured registration at the authorization server `issuer`.
    pub fn client_for(&self, issuer: &str) -> Option<&OAuthClientReg> {
        self.clients.iter().find(|c| c.issuer == issuer)
    }
}

/// `[oauth.clients."ISSUER"]`.
#[derive(Debug, Clone)]
pub struct OAuthClientReg {
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    /// `client_secret_post` rather than HTTP Basic.
    pub secret_in_body: bool,
}

/// How a server's tokens come from its own authorization server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OAuthFlow {
    /// Per user: authorization code + PKCE after the user's consent in a browser.
    Consent,
    /// Per user: Enterprise-Managed Authorization (an ID-JAG from the enterprise IdP, redeemed
    /// with the JWT bearer grant).
    IdJag { idp: String, subject: JagSubject },
    /// The broker itself (client credentials grant): one token for everyone.
    ClientCredentials,
}

/// What the broker exchanges at the enterprise IdP for an ID-JAG (`subject = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JagSubject {
    /// The refresh token of the user's sign-in at `/oauth/start` (the extension's way; default).
    SignIn,
    /// The caller's own access token, sent to the IdP that issued it (non-standard: only for an
    /// IdP configured to accept it; no sign-in is needed).
    AccessToken,
}

#[derive(Debug, Clone)]
pub struct OAuthAuth {
    /// The server this belongs to (filled in with its name).
    pub server: String,
    pub flow: OAuthFlow,
    pub scopes: Vec<String>,
    /// A caller not yet connected sees the server's tools (listed by any caller) rather than
    /// only `<prefix>__authorize`.
    pub share_catalog: bool,
}

impl OAuthAuth {
    pub fn kind(&self) -> &'static str {
        match self.flow {
            OAuthFlow::Consent => "oauth",
            OAuthFlow::IdJag { .. } => "id_jag",
            OAuthFlow::ClientCredentials => "client_credentials",
        }
    }

    /// Whether each caller needs their own token (and so their own connection).
    pub fn per_caller(&self) -> bool {
        self.flow != OAuthFlow::ClientCredentials
    }

    /// Whether a caller must connect in a browser first (a consent, or the sign-in an ID-JAG is
    /// exchanged from).
    pub fn needs_browser(&self) -> bool {
        match &self.flow {
            OAuthFlow::Consent => true,
            OAuthFlow::IdJag { subject, .. } => *subject == JagSubject::SignIn,
            OAuthFlow::ClientCredentials => false,
        }
    }
}

impl Ctx<'_> {
    pub(super) fn oauth_settings(
        &self,
        raw: Option<RawOAuth>,
        stores: &IndexMap<String, CredentialStore>,
        base: &std::path::Path,
    ) -> Result<OAuthSettings, ConfigError> {
        let Some(raw) = raw else {
            return Ok(OAuthSettings::default());
        };
        let t = &["oauth"];
        let mut out = OAuthSettings {
            link_ttl: self.duration(t, "link_ttl", raw.link_ttl, Duration::from_secs(600))?,
            ..OAuthSettings::default()
        };
        if out.link_ttl < Duration::from_secs(30) || out.link_ttl > Duration::from_secs(3600) {
            return Err(self.invalid(t, "link_ttl", "must be between 30s and 1h".into()));
        }
        if let Some(name) = raw.sign_in {
            match stores.get(&name) {
                Some(CredentialStore::TokenExchange(_)) => out.sign_in = Some(name),
                Some(_) => {
                    return Err(self.invalid(
                        t,
                        "sign_in",
                        format!("[credentials.{name}] must be a token_exchange client (the broker's client at [auth] issuer)"),
                    ));
                }
                None => {
                    return Err(self.invalid(
                        t,
                        "sign_in",
                        format!("no [credentials.{name}] is configured"),
                    ));
                }
            }
        }
        if let Some(ca) = raw.ca_file {
            let p = base.join(self.expand(t, "ca_file", &ca)?);
            if std::fs::metadata(&p).is_err() {
                return Err(self.invalid(t, "ca_file", format!("cannot read {}", p.display())));
            }
            out.ca_file = Some(p);
        }
        if let Some(n) = raw.client_name {
            out.client_name = n;
        }
        if let Some(u) = raw.client_metadata_url {
            let url = url::Url::parse(&u)
                .ok()
                .filter(|u| u.scheme() == "https" && u.path() != "/" && u.fragment().is_none());
            out.client_metadata_url = Some(url.ok_or_else(|| {
                self.invalid(
                    t,
                    "client_metadata_url",
                    "must be an https URL with a path (a Client ID Metadata Document)".into(),
                )
            })?);
        }
        for (issuer, c) in raw.clients {
            let tc = &["oauth", "clients"];
            if url::Url::parse(&issuer).is_err() {
                return Err(self.invalid(
                    tc,
                    &issuer,
                    "is not an issuer URL (the authorization server's `issuer`, exactly)".into(),
                ));
            }
            let secret_in_body = match c.auth_method.as_deref() {
                None | Some("client_secret_basic") => false,
                Some("client_secret_post") => true,
                Some(other) => {
                    return Err(self.invalid(
                        tc,
                        "auth_method",
                        format!(
                            "\"{other}\": use \"client_secret_basic\" or \"client_secret_post\""
                        ),
                    ));
                }
            };
            let client_secret = match c.client_secret {
                Some(s) => Some(Secret::new(self.expand(tc, "client_secret", &s)?)),
                None => None,
            };
            out.clients.push(OAuthClientReg {
                issuer,
                client_id: c.client_id,
                client_secret,
                secret_in_body,
            });
        }
        Ok(out)
    }

    pub(super) fn oauth_auth(
        &self,
        t: &[&str],
        raw: RawOAuthAuth,
        stdio: bool,
    ) -> Result<OAuthAuth, ConfigError> {
        let key = "upstream_auth";
        let bad = |m: String| self.invalid(t, key, m);
        if stdio {
            return Err(bad(format!(
                "kind = \"{}\" is for http and sse servers (a stdio server reads its credentials from `env`)",
                raw.kind
            )));
        }
        let flow = match raw.kind.as_str() {
            "oauth" => OAuthFlow::Consent,
            "id_jag" => OAuthFlow::IdJag {
                idp: raw.idp.clone().unwrap_or_default(),
                subject: match raw.subject.as_deref() {
                    None | Some("refresh_token") => JagSubject::SignIn,
                    Some("access_token") => JagSubject::AccessToken,
                    Some(other) => {
                        return Err(bad(format!(
                            "subject = \"{other}\": use \"refresh_token\" (the user's sign-in, the default) or \"access_token\" (the caller's token; non-standard, for an IdP that accepts it)"
                        )));
                    }
                },
            },
            _ => OAuthFlow::ClientCredentials,
        };
        if raw.subject.is_some() && !matches!(flow, OAuthFlow::IdJag { .. }) {
            return Err(bad(format!(
                "`subject` applies to kind = \"id_jag\", not \"{}\"",
                raw.kind
            )));
        }
        if raw.idp.is_some() && !matches!(flow, OAuthFlow::IdJag { .. }) {
            return Err(bad(format!(
                "`idp` applies to kind = \"id_jag\", not \"{}\"",
                raw.kind
            )));
        }
        if raw.share_catalog.is_some() && flow == OAuthFlow::ClientCredentials {
            return Err(bad(
                "`share_catalog` does not apply to client_credentials (one token for everyone)"
                    .into(),
            ));
        }
        let scopes = raw.scopes.unwrap_or_default();
        if scopes.iter().any(|s| {
            s.is_empty()
                || s.chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        }) {
            return Err(bad("each of `scopes` must be one scope token".into()));
        }
        Ok(OAuthAuth {
            server: String::new(),
            share_catalog: raw
                .share_catalog
                .unwrap_or(matches!(flow, OAuthFlow::IdJag { .. })),
            flow,
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, OAuthFlow, UpstreamAuth};

    const BASE: &str = "[auth]\nissuer = \"https://idp.example\"\n[credentials.corp]\nkind = \"token_exchange\"\ntoken_endpoint = \"https://idp.example/token\"\nclient_id = \"b\"\nclient_secret = \"s\"\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(std::path::Path::new("c.toml"), text, &|v| {
            (v == "SECRET").then(|| "s3cret".to_string())
        })
        .map_err(|e| e.to_string())
    }

    fn server(auth: &str) -> String {
        format!("[servers.crm]\nurl = \"https://crm.example/mcp\"\nupstream_auth = {auth}\n")
    }

    #[test]
    fn kinds_parse_with_their_defaults() {
        let c = parse(&format!(
            "{BASE}[oauth]\nsign_in = \"corp\"\n[oauth.clients.\"https://as.example\"]\nclient_id = \"x\"\nclient_secret = \"${{SECRET}}\"\n{}",
            server("{ kind = \"oauth\", scopes = [\"a\", \"b\"] }")
        ))
        .unwrap();
        let Some(UpstreamAuth::OAuth(o)) = &c.servers[0].upstream_auth else {
            panic!("oauth");
        };
        assert_eq!(o.flow, OAuthFlow::Consent);
        assert!(!o.share_catalog && o.per_caller() && o.server == "crm");
        assert_eq!(
            c.oauth.client_for("https://as.example").unwrap().client_id,
            "x"
        );
        let c = parse(&format!(
            "{BASE}[oauth]\nsign_in = \"corp\"\n{}",
            server("{ kind = \"id_jag\" }")
        ))
        .unwrap();
        let Some(UpstreamAuth::OAuth(o)) = &c.servers[0].upstream_auth else {
            panic!("id_jag");
        };
        assert!(o.share_catalog, "id_jag shares the catalog by default");
        assert!(
            o.needs_browser(),
            "the default subject is the user's sign-in"
        );
        let c = parse(&format!(
            "{BASE}[oauth]\nsign_in = \"corp\"\n{}",
            server("{ kind = \"id_jag\", subject = \"access_token\" }")
        ))
        .unwrap();
        let Some(UpstreamAuth::OAuth(o)) = &c.servers[0].upstream_auth else {
            panic!("id_jag");
        };
        assert!(matches!(
            o.flow,
            OAuthFlow::IdJag {
                subject: super::JagSubject::AccessToken,
                ..
            }
        ));
        assert!(o.per_caller() && !o.needs_browser());
        let c = parse(&server(
            "{ kind = \"client_credentials\", scopes = [\"r\"] }",
        ))
        .unwrap();
        let Some(UpstreamAuth::OAuth(o)) = &c.servers[0].upstream_auth else {
            panic!("cc");
        };
        assert!(!o.per_caller(), "one token for everyone needs no [auth]");
    }

    #[test]
    fn refusals_name_the_fix() {
        let cases = [
            (server("{ kind = \"oauth\" }"), "it needs [auth]"),
            (
                format!("{BASE}{}", server("{ kind = \"oauth\" }")),
                "needs [oauth] sign_in",
            ),
            (
                format!(
                    "{BASE}[oauth]\nsign_in = \"corp\"\n{}",
                    server("{ kind = \"id_jag\", idp = \"other\" }")
                ),
                "the enterprise IdP is where users sign in",
            ),
            (
                format!("{BASE}[oauth]\nsign_in = \"nope\"\n"),
                "no [credentials.nope]",
            ),
            (
                server("{ kind = \"client_credentials\", share_catalog = true }"),
                "does not apply to client_credentials",
            ),
            (
                server("{ kind = \"oauth\", idp = \"corp\" }"),
                "`idp` applies to kind = \"id_jag\"",
            ),
            (
                server("{ kind = \"oauth\", subject = \"access_token\" }"),
                "`subject` applies to kind = \"id_jag\"",
            ),
            (
                format!(
                    "{BASE}[oauth]\nsign_in = \"corp\"\n{}",
                    server("{ kind = \"id_jag\", subject = \"id_token\" }")
                ),
                "use \"refresh_token\"",
            ),
            (
                server("{ first = [ { kind = \"oauth\" } ] }"),
                "cannot be part of a `first` chain",
            ),
            (
                "[servers.s]\ncommand = \"x\"\nupstream_auth = { kind = \"oauth\" }\n".to_string(),
                "for http and sse servers",
            ),
            (
                "[oauth]\nclient_metadata_url = \"http://x/doc.json\"\n".to_string(),
                "must be an https URL with a path",
            ),
            (
                "[oauth]\nlink_ttl = \"5s\"\n".to_string(),
                "between 30s and 1h",
            ),
            (
                "[oauth.clients.\"https://as\"]\nclient_id = \"x\"\nauth_method = \"jwt\"\n"
                    .to_string(),
                "client_secret_basic",
            ),
            (
                server("{ kind = \"oauth\", scopes = [\"a b\"] }"),
                "one scope token",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).expect_err(&text);
            assert!(e.contains(want), "{text}\n→ {e}\n(wanted `{want}`)");
        }
    }
}
