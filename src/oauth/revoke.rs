//! Telling an authorization server that a grant the broker held is over (RFC 7009), when an
//! operator revokes it (`mcp-broker tokens revoke`).
//!
//! Best effort, after the entry is gone from the store (the broker stops using it whatever the
//! server says): the refresh token is revoked if there is one (RFC 7009 §2.1: the server then
//! also drops the access tokens of that grant), else the access token, at the
//! `revocation_endpoint` the server's metadata names, authenticated as the broker's client there.
//! A server that names none is left alone (its tokens end with their lifetime). The request is a
//! two-field form; rmcp has no revocation call and the `oauth2` crate's would need its own HTTP
//! client beside the guarded one, so it is made here, through the same guard.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use oauth2::TokenResponse;
use serde::Serialize;

use super::form::Client;
use super::store::TokenEntry;
use super::{Engine, Held, SIGN_IN, SignedIn};

/// What the authorization server was told, for the admin's answer and the audit record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "result", content = "detail")]
pub enum Upstream {
    /// The server answered 200 to the revocation request.
    Revoked,
    /// The server's metadata names no `revocation_endpoint`.
    NotOffered,
    /// Nothing to tell (an entry that held no token, or whose server is no longer configured).
    Skipped(String),
    /// The request failed; the entry is gone from the broker all the same.
    Failed(String),
    /// Still under way when the admin was answered (its audit record follows).
    Pending,
}

/// One revoked entry and what its server was told.
#[derive(Debug, Clone, Serialize)]
pub struct Told {
    pub sub: String,
    pub server: String,
    pub upstream: Upstream,
}

/// At most this many revocation requests at a time.
const PARALLEL: usize = 8;

impl Upstream {
    /// For the audit record's reason.
    pub fn describe(&self) -> String {
        match self {
            Self::Revoked => "revoked at the authorization server".into(),
            Self::NotOffered => "the authorization server offers no revocation endpoint".into(),
            Self::Skipped(why) => format!("not sent to the authorization server: {why}"),
            Self::Failed(why) => format!("revocation at the authorization server failed: {why}"),
            Self::Pending => "revocation at the authorization server under way".into(),
        }
    }
}

/// Tell the servers of `entries` (just removed by `admin`) that their grants are over, a few at a
/// time, each outcome audited (a `consent` record naming `admin`) as it comes. Waits up to `wait`:
/// what is still under way then goes on in the background and shows as [`Upstream::Pending`].
pub async fn revoked_by(
    engine: Arc<Engine>,
    entries: Vec<TokenEntry>,
    admin: String,
    wait: Duration,
) -> Vec<Told> {
    let mut told: Vec<Told> = entries
        .iter()
        .map(|e| Told {
            sub: e.sub.clone(),
            server: e.server.clone(),
            upstream: Upstream::Pending,
        })
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut done = futures::stream::iter(entries.into_iter().enumerate())
            .map(|(i, e)| {
                let engine = engine.clone();
                async move {
                    let up = engine.revoke_upstream(&e).await;
                    (i, e, up)
                }
            })
            .buffer_unordered(PARALLEL);
        while let Some((i, e, up)) = done.next().await {
            let reason = format!("token revoked by `{admin}`; {}", up.describe());
            engine.audit_event(&e.sub, &e.server, true, &reason);
            match &up {
                Upstream::Failed(why) => {
                    tracing::warn!(sub = %e.sub, server = %e.server, error = %why, "upstream token revocation failed")
                }
                _ => {
                    tracing::debug!(sub = %e.sub, server = %e.server, outcome = %up.describe(), "upstream token revocation")
                }
            }
            let _ = tx.send((i, up));
        }
    });
    let _ = tokio::time::timeout(wait, async {
        while let Some((i, up)) = rx.recv().await {
            if let Some(t) = told.get_mut(i) {
                t.upstream = up;
            }
        }
    })
    .await;
    told
}

impl Engine {
    /// Revoke `e`'s grant at the server that issued it.
    pub async fn revoke_upstream(&self, e: &TokenEntry) -> Upstream {
        let result = if e.server == SIGN_IN {
            self.revoke_sign_in(e).await
        } else {
            self.revoke_consent(e).await
        };
        result.unwrap_or_else(|u| u)
    }

    async fn revoke_consent(&self, e: &TokenEntry) -> Result<Upstream, Upstream> {
        let held: Held = serde_json::from_str(e.secret.expose())
            .map_err(|_| Upstream::Skipped("the entry holds no OAuth grant".into()))?;
        let Some(tokens) = &held.credentials.token_response else {
            return Err(Upstream::Skipped("the entry holds no token".into()));
        };
        let (token, hint) = match tokens.refresh_token() {
            Some(r) => (r.secret().clone(), "refresh_token"),
            None => (tokens.access_token().secret().clone(), "access_token"),
        };
        if !self.settings().servers.contains_key(&e.server) {
            return Err(Upstream::Skipped(format!(
                "`{}` is no longer configured",
                e.server
            )));
        }
        let (url, d) = self
            .discover(&e.server)
            .await
            .map_err(|err| Upstream::Failed(err.to_string()))?;
        let endpoint = revocation_endpoint(&d.metadata.additional_fields)?;
        let s = self.settings();
        let configured = s.oauth.client_for(&d.issuer);
        let secret = held.client_secret.map(crate::config::Secret::new);
        let client = Client {
            endpoint: &endpoint,
            client_id: &held.credentials.client_id,
            client_secret: secret.as_ref(),
            secret_in_body: configured.is_some_and(|c| c.secret_in_body),
        };
        post(&client, &self.http(&url), &token, hint).await
    }

    async fn revoke_sign_in(&self, e: &TokenEntry) -> Result<Upstream, Upstream> {
        let signed: SignedIn = serde_json::from_str(e.secret.expose())
            .map_err(|_| Upstream::Skipped("the entry holds no sign-in".into()))?;
        let (url, meta, idp) = self
            .sign_in_metadata()
            .await
            .map_err(|p| Upstream::Failed(p.message))?;
        let endpoint = revocation_endpoint(&meta.additional_fields)?;
        let client = Client {
            endpoint: &endpoint,
            client_id: &idp.client_id,
            client_secret: Some(&idp.client_secret),
            secret_in_body: idp.secret_in_body,
        };
        post(
            &client,
            &self.http(&url),
            &signed.refresh_token,
            "refresh_token",
        )
        .await
    }
}

fn revocation_endpoint(
    fields: &std::collections::HashMap<String, serde_json::Value>,
) -> Result<String, Upstream> {
    fields
        .get("revocation_endpoint")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or(Upstream::NotOffered)
}

async fn post(
    client: &Client<'_>,
    http: &super::http::Guarded,
    token: &str,
    hint: &str,
) -> Result<Upstream, Upstream> {
    let form = [("token", token), ("token_type_hint", hint)];
    match super::form::post(
        (client, http),
        form.to_vec(),
        "revoking the token at the authorization server (RFC 7009)",
    )
    .await
    {
        Ok(_) => Ok(Upstream::Revoked),
        Err(e) => Err(Upstream::Failed(e.to_string())),
    }
}
