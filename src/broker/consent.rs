//! Upstream OAuth in the pipeline: a caller who has not connected a server with a per-user OAuth
//! credential (`kind = "oauth" | "id_jag"`) is asked to, with a consent link (`crate::oauth`):
//! a URL-mode elicitation on a 2025-11-25 session whose client declared `elicitation.url` (the call
//! then waits for the consent and goes on); for a 2026-07-28 request that declared it, an
//! `input_required` result asking the same (its retry goes on once the consent is given); otherwise
//! a refusal carrying the link. Lists show such a
//! caller `<prefix><sep>authorize` in place of the server's tools (unless `share_catalog`).

use std::collections::HashSet;
use std::sync::Arc;

use std::time::Duration;

use rmcp::model::{
    ClientResult, ElicitRequest, ElicitRequestParams, ElicitationAction, InputRequest,
    InputRequests, InputRequiredResult, ServerRequest,
};
use tokio_util::sync::CancellationToken;

use crate::audit::{CallRecord, Outcome};
use crate::auth::Caller;
use crate::catalog::{Item, expose_name};
use crate::config::{OAuthAuth, UpstreamAuth};
use crate::oauth::engine;

use super::errors::Failure;
use super::state::State;
use super::{Broker, Downstream};

/// What a consent `input_required` seals as its state (never sent upstream).
pub(super) const CONSENT_STATE: &str = "mcpb-consent";

/// How long a retry of a consent `input_required` waits for the consent to complete.
const RETRY_WAIT: Duration = Duration::from_secs(30);

/// Whether the request may go on.
pub(super) enum Consent {
    Ready,
    /// A 2026-07-28 request: ask with this `input_required` result.
    Ask(InputRequiredResult),
}

/// The upstream name of the broker's own per-server tool that starts the consent.
pub(super) const AUTHORIZE: &str = "authorize";

/// `server`'s per-user OAuth settings, if it has any.
pub(super) fn consent_auth<'a>(st: &'a State, server: &str) -> Option<&'a OAuthAuth> {
    match &st.config.server(server)?.upstream_auth {
        Some(UpstreamAuth::OAuth(o)) if o.needs_browser() => Some(o),
        _ => None,
    }
}

impl Broker {
    /// The servers whose tools `caller` is shown as one `authorize` tool: per-user OAuth servers
    /// they have not connected, unless the catalog is shared and some caller's listing is known.
    pub(super) async fn pending_consent(&self, st: &State, caller: &Caller) -> HashSet<Arc<str>> {
        let mut out = HashSet::new();
        for up in &st.upstreams {
            let Some(o) = consent_auth(st, &up.name) else {
                continue;
            };
            if o.share_catalog && up.listing().is_some() {
                continue;
            }
            if !engine().is_connected(&caller.sub, &up.name).await {
                out.insert(up.name.clone());
            }
        }
        out
    }

    /// The `authorize` tool of `server`, as listed.
    pub(super) fn authorize_item(st: &State, server: &str) -> Option<Item> {
        let s = st.config.server(server)?;
        let name = expose_name(&s.prefix, &st.config.broker.separator, AUTHORIZE);
        let v = serde_json::json!({
            "name": name,
            "description": format!("Connect your account at `{server}`: call this to get a sign-in link (the call waits while you sign in, where your client supports it). `{server}`'s own tools appear once you are connected."),
            "inputSchema": {"type": "object", "properties": {}},
        });
        match v {
            serde_json::Value::Object(o) => Some(Item::new(o)),
            _ => None,
        }
    }

    /// Make sure `caller` has connected `server` (a per-user OAuth server), asking them if not.
    /// `retry`: a 2026-07-28 request answering a consent `input_required` (its state was opened
    /// for this caller and request); `bind` is what a new state is sealed to.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ensure_connected(
        &self,
        server: &str,
        caller: &Caller,
        down: &Downstream,
        ct: &CancellationToken,
        rec: &mut CallRecord,
        retry: bool,
        bind: &[u8],
    ) -> Result<Consent, Failure> {
        let e = engine();
        if e.is_connected(&caller.sub, server).await {
            return Ok(Consent::Ready);
        }
        if retry {
            // The client says the user went through the link: give the callback a moment.
            let done = tokio::select! {
                d = e.wait_connected(&caller.sub, server, RETRY_WAIT) => d,
                _ = ct.cancelled() => return Err(Failure::Cancelled("cancelled while waiting for consent".into())),
            };
            if done {
                return Ok(Consent::Ready);
            }
        }
        let ttl = self.config().oauth.link_ttl;
        let mut id = [0u8; 16];
        let _ = getrandom::fill(&mut id);
        let elicitation = crate::hex(&id);
        let url = e.consent_link(&caller.sub, server, Some(&elicitation));
        let message = format!(
            "`{server}` needs you to connect your account. Open the link, sign in, and allow access; the request continues afterwards."
        );
        let declared_url = down
            .capabilities
            .as_ref()
            .and_then(|c| c.elicitation.as_ref())
            .is_some_and(|el| el.url.is_some());
        rec.note(&format!("consent required for `{server}`"));
        tracing::info!(server = %server, sub = %caller.sub, "asking the caller to connect an upstream");
        if declared_url && !down.stateless {
            let req = ServerRequest::ElicitRequest(ElicitRequest::new(
                ElicitRequestParams::UrlElicitationParams {
                    meta: None,
                    message,
                    url: url.clone(),
                    elicitation_id: elicitation.clone(),
                },
            ));
            let answer = tokio::select! {
                a = self.ask_client(server, down, req, ct) => a,
                _ = ct.cancelled() => return Err(Failure::Cancelled("cancelled while waiting for consent".into())),
            };
            let action = match answer {
                Ok(ClientResult::ElicitResult(r)) => r.action,
                Ok(_) => ElicitationAction::Cancel,
                Err(e) => {
                    return Err(self.consent_refused(rec, format!("{}: {url}", e.message)));
                }
            };
            if action != ElicitationAction::Accept {
                return Err(self.consent_refused(
                    rec,
                    format!("you did not connect `{server}` (the sign-in was declined), so the request was not sent"),
                ));
            }
            let done = tokio::select! {
                d = e.wait_connected(&caller.sub, server, ttl) => d,
                _ = ct.cancelled() => return Err(Failure::Cancelled("cancelled while waiting for consent".into())),
            };
            if !done {
                return Err(self.consent_refused(
                    rec,
                    format!("`{server}` was not connected in time; call again for a new link"),
                ));
            }
            let note = rmcp::model::ServerNotification::CustomNotification(
                rmcp::model::CustomNotification::new(
                    "notifications/elicitation/complete",
                    Some(serde_json::json!({ "elicitationId": elicitation })),
                ),
            );
            let _ = down.peer.send_notification(note).await;
            return Ok(Consent::Ready);
        }
        if declared_url {
            // 2026-07-28: no server-to-client requests; the client is asked in the result, and
            // retries with the sealed state once the user went through the link.
            let mut asks = InputRequests::new();
            asks.insert(
                "consent".into(),
                InputRequest::Elicitation(ElicitRequest::new(
                    ElicitRequestParams::UrlElicitationParams {
                        meta: None,
                        message,
                        url,
                        elicitation_id: elicitation,
                    },
                )),
            );
            let state = self.seal_marker(bind, CONSENT_STATE);
            let ir = InputRequiredResult::new(Some(asks), Some(state));
            crate::upstream::raw::keep(serde_json::to_value(&ir).unwrap_or_default());
            rec.finish(
                Outcome::Ok,
                Some(format!("consent required for `{server}`")),
            );
            return Ok(Consent::Ask(ir));
        }
        Err(self.consent_refused(
            rec,
            format!(
                "`{server}` needs you to connect your account. Open this link in a browser, sign in, allow access, then call again: {url}"
            ),
        ))
    }

    fn consent_refused(&self, rec: &mut CallRecord, message: String) -> Failure {
        // The audit record names the step, not the link.
        let short = message
            .split(": http")
            .next()
            .unwrap_or_default()
            .to_string();
        rec.finish(Outcome::Denied, Some(short));
        Failure::Refused(message)
    }
}
