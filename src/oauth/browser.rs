//! The browser side: `/oauth/start` (sign the user in at `[auth] issuer`, check they are the caller
//! the link was made for) and `/oauth/callback` (finish the sign-in, or the authorization at the
//! upstream's server), with registration in the spec's order.

use std::collections::HashMap;

use rmcp::transport::auth::{AuthorizationRequest, AuthorizationSession};

use super::flow::{Purpose, Ticket};
use super::store::TokenEntry;
use super::*;

impl Engine {
    /// `GET /oauth/start?t=LINK`: sign the browser's user in at `[auth] issuer` first.
    pub async fn start(&self, link: &str, browser: &str) -> Result<Outcome, PageError> {
        let ticket =
            Ticket::open(&self.sealer(), link, now()).map_err(|m| PageError::new(400, m))?;
        let s = self.settings();
        let Some((_, auth)) = s
            .servers
            .get(&ticket.server)
            .filter(|(_, a)| a.per_caller())
        else {
            return Err(PageError::new(
                404,
                format!("server `{}` takes no consent", ticket.server),
            ));
        };
        if !self.flows.has_room() {
            return Err(PageError::new(
                503,
                "too many authorizations in progress; try again shortly",
            ));
        }
        let (m, client) = self.sign_in_manager().await?;
        let mut scopes = vec!["openid".to_string()];
        if matches!(auth.flow, OAuthFlow::IdJag { .. }) {
            scopes.push("offline_access".into());
        }
        let req = AuthorizationRequest::new(s.redirect_uri.clone())
            .with_scopes(scopes)
            .with_preregistered_client(client.client_id.clone())
            .with_client_secret(client.client_secret.expose().to_string());
        let session = AuthorizationSession::new(m, req)
            .await
            .map_err(|(_, e)| PageError::new(502, format!("starting the sign-in: {e}")))?;
        let mut auth_url = url::Url::parse(session.get_authorization_url())
            .map_err(|e| PageError::new(502, e.to_string()))?;
        let state = state_of(&auth_url)
            .ok_or_else(|| PageError::new(502, "no state in the sign-in URL"))?;
        auth_url
            .query_pairs_mut()
            .append_pair("login_hint", &ticket.sub);
        self.flows
            .attach(&state, Purpose::SignIn { ticket }, &hash(browser))
            .await
            .map_err(|e| PageError::new(503, e))?;
        Ok(Outcome::Redirect(auth_url.to_string()))
    }

    /// `GET /oauth/callback`: where both the sign-in and the upstream's authorization return.
    pub async fn callback(
        &self,
        q: &HashMap<String, String>,
        browser: &str,
    ) -> Result<Outcome, PageError> {
        let state = q
            .get("state")
            .ok_or_else(|| PageError::new(400, "no state"))?;
        if let Some(err) = q.get("error") {
            self.flows.forget(state).await;
            return Err(PageError::new(
                400,
                format!(
                    "the authorization server answered {err}{}",
                    q.get("error_description")
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ),
            ));
        }
        let code = q
            .get("code")
            .ok_or_else(|| PageError::new(400, "no code"))?;
        let iss = q.get("iss").map(String::as_str);
        let purpose = self
            .flows
            .take(state, &hash(browser))
            .await
            .map_err(|m| PageError::new(400, m))?;
        match purpose {
            Purpose::SignIn { ticket } => self.signed_in(ticket, code, state, iss, browser).await,
            Purpose::Connect {
                sub,
                server,
                client_id,
                client_secret,
            } => {
                let (url, d) = self
                    .discover(&server)
                    .await
                    .map_err(|e| PageError::new(502, e.to_string()))?;
                let mut m = self
                    .manager(&url, &d)
                    .await
                    .map_err(|e| PageError::new(502, e.to_string()))?;
                let auth = self.settings().servers.get(&server).map(|(_, a)| a.clone());
                m.configure_client(client_config(
                    client_id.clone(),
                    client_secret.clone(),
                    auth.map(|a| a.scopes).unwrap_or_default(),
                    self.settings().redirect_uri.clone(),
                ))
                .map_err(|e| PageError::new(502, e.to_string()))?;
                m.set_credential_store(EntryStore {
                    store: self.store(),
                    sub: sub.clone(),
                    server: server.clone(),
                    kind: "oauth",
                    issuer: Some(d.issuer.clone()),
                    client_secret,
                });
                m.exchange_code_for_token_with_issuer(code, state, iss)
                    .await
                    .map_err(|e| PageError::new(400, format!("redeeming the authorization code at `{server}`'s authorization server: {e}")))?;
                self.mark_connected(&sub, &server);
                self.audit_event(
                    &sub,
                    &server,
                    true,
                    &format!("connected: authorized at {}", d.issuer),
                );
                tracing::info!(sub = %sub, server = %server, "upstream connected (oauth)");
                Ok(Outcome::Done(format!(
                    "Connected `{server}` for {sub}. You can close this window and return to your client."
                )))
            }
        }
    }

    pub(super) async fn signed_in(
        &self,
        ticket: Ticket,
        code: &str,
        state: &str,
        iss: Option<&str>,
        browser: &str,
    ) -> Result<Outcome, PageError> {
        let s = self.settings();
        let (mut m, client) = self.sign_in_manager().await?;
        m.configure_client(client_config(
            client.client_id.clone(),
            Some(client.client_secret.expose().to_string()),
            vec!["openid".into()],
            s.redirect_uri.clone(),
        ))
        .map_err(|e| PageError::new(502, e.to_string()))?;
        let resp = m
            .exchange_code_for_token_with_issuer(code, state, iss)
            .await
            .map_err(|e| PageError::new(400, format!("signing in at [auth] issuer: {e}")))?;
        let id_token = resp
            .extra_fields()
            .0
            .get("id_token")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PageError::new(502, "the sign-in returned no ID token"))?;
        let issuer = s.issuer.clone().unwrap_or_default();
        let who = id_token_subject(id_token, &issuer, &client.client_id)
            .map_err(|m| PageError::new(502, format!("the sign-in's ID token: {m}")))?;
        if who != ticket.sub {
            tracing::warn!(link_for = %ticket.sub, signed_in = %who, server = %ticket.server, "consent link opened by another user: refused");
            self.audit_event(
                &ticket.sub,
                &ticket.server,
                false,
                &format!("consent link opened by another user (`{who}` signed in): refused"),
            );
            return Err(PageError::new(
                403,
                "This link was made for another user. Sign in as the user who asked for it, or ask your client for a new link.",
            ));
        }
        let auth = s.servers.get(&ticket.server).map(|(_, a)| a.clone());
        match auth.map(|a| a.flow) {
            Some(OAuthFlow::IdJag { .. }) => {
                use oauth2::TokenResponse;
                let rt = resp.refresh_token().ok_or_else(|| {
                    PageError::new(502, "the enterprise IdP issued no refresh token (offline_access): the broker cannot exchange it later")
                })?;
                let body = serde_json::to_string(&SignedIn {
                    refresh_token: rt.secret().clone(),
                })
                .unwrap_or_default();
                self.store()
                    .put(TokenEntry {
                        sub: who.clone(),
                        server: SIGN_IN.into(),
                        kind: "sign_in".into(),
                        issuer: Some(issuer),
                        client_id: Some(client.client_id.clone()),
                        scopes: vec!["openid".into(), "offline_access".into()],
                        expires_at: None,
                        updated_at: now(),
                        secret: Secret::new(body),
                    })
                    .await
                    .map_err(|e| PageError::new(500, e.to_string()))?;
                self.mark_connected(&who, SIGN_IN);
                self.audit_event(
                    &who,
                    &ticket.server,
                    true,
                    "signed in at the enterprise IdP; the sign-in serves every id_jag server",
                );
                tracing::info!(sub = %who, "enterprise sign-in kept for id_jag servers");
                Ok(Outcome::Done(format!(
                    "Signed in as {who}: `{}` is connected. You can close this window and return to your client.",
                    ticket.server
                )))
            }
            Some(OAuthFlow::Consent) => self.begin_connect(&who, &ticket.server, browser).await,
            _ => Err(PageError::new(404, "no such server")),
        }
    }

    /// Send the (signed-in) browser to `server`'s authorization server.
    pub(super) async fn begin_connect(
        &self,
        sub: &str,
        server: &str,
        browser: &str,
    ) -> Result<Outcome, PageError> {
        let s = self.settings();
        let bad = |e: OAuthError| PageError::new(502, e.to_string());
        let (url, d) = self.discover(server).await.map_err(bad)?;
        let mut m = self.manager(&url, &d).await.map_err(bad)?;
        let scopes = s
            .servers
            .get(server)
            .map(|(_, a)| a.scopes.clone())
            .unwrap_or_default();
        let supports_cimd = d
            .metadata
            .additional_fields
            .get("client_id_metadata_document_supported")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        // Registration, in the spec's order: configured, Client ID Metadata Document, dynamic.
        let (client_id, client_secret) = if let Some(reg) = s.oauth.client_for(&d.issuer) {
            (
                reg.client_id.clone(),
                reg.client_secret.as_ref().map(|s| s.expose().to_string()),
            )
        } else if let (Some(cimd), true) = (&s.oauth.client_metadata_url, supports_cimd) {
            (cimd.to_string(), None)
        } else if let Some(hit) = self.registered.get(&d.issuer) {
            hit.clone()
        } else if d.metadata.registration_endpoint.is_some() {
            let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
            let reg = m
                .register_client(&s.oauth.client_name, &s.redirect_uri, &scope_refs)
                .await
                .map_err(|e| {
                    PageError::new(
                        502,
                        format!("dynamic client registration at {}: {e}", d.issuer),
                    )
                })?;
            let pair = (reg.client_id.clone(), reg.client_secret.clone());
            self.registered.insert(d.issuer.clone(), pair.clone());
            pair
        } else {
            return Err(PageError::new(
                502,
                format!(
                    "the broker has no client at {} and it offers no registration: configure [oauth.clients.\"{}\"]",
                    d.issuer, d.issuer
                ),
            ));
        };
        let mut req = AuthorizationRequest::new(s.redirect_uri.clone())
            .with_preregistered_client(client_id.clone());
        if let Some(sec) = &client_secret {
            req = req.with_client_secret(sec.clone());
        }
        if !scopes.is_empty() {
            req = req.with_scopes(scopes);
        }
        m.set_metadata(d.metadata.clone());
        let session = AuthorizationSession::new(m, req).await.map_err(|(_, e)| {
            PageError::new(
                502,
                format!("starting the authorization at {}: {e}", d.issuer),
            )
        })?;
        let auth_url = session.get_authorization_url().to_string();
        let state = url::Url::parse(&auth_url)
            .ok()
            .and_then(|u| state_of(&u))
            .ok_or_else(|| PageError::new(502, "no state in the authorization URL"))?;
        self.flows
            .attach(
                &state,
                Purpose::Connect {
                    sub: sub.to_string(),
                    server: server.to_string(),
                    client_id,
                    client_secret,
                },
                &hash(browser),
            )
            .await
            .map_err(|e| PageError::new(503, e))?;
        Ok(Outcome::Redirect(auth_url))
    }
}

fn state_of(u: &url::Url) -> Option<String> {
    u.query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
}

fn hash(browser: &str) -> String {
    use sha2::Digest;
    crate::hex(&sha2::Sha256::digest(browser.as_bytes()))
}

/// The `sub` of an ID token received straight from the token endpoint over TLS (OpenID Connect
/// Core §3.1.3.7 allows TLS in place of the signature there); `iss`, `aud` and `exp` are checked.
pub(super) fn id_token_subject(
    token: &str,
    issuer: &str,
    client_id: &str,
) -> Result<String, &'static str> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "not a JWT")?;
    let c: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| "not a JWT")?;
    if c.get("iss").and_then(|v| v.as_str()) != Some(issuer) {
        return Err("issued by another issuer");
    }
    let aud_ok = match c.get("aud") {
        Some(serde_json::Value::String(a)) => a == client_id,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(client_id)),
        _ => false,
    };
    if !aud_ok {
        return Err("issued to another client");
    }
    if c.get("exp")
        .and_then(|v| v.as_u64())
        .is_none_or(|e| e + 60 < now())
    {
        return Err("expired");
    }
    c.get("sub")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or("no sub")
}
