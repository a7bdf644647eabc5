//! Upstream events → the sessions entitled to them. One router asks, for every event and every
//! session: may this session's caller see it? The router never awaits a session: it queues.
//!
//! - `notifications/message`: sessions that set a log level the message meets, whose caller may see
//!   the server; for a per-caller or per-session connection, only its owner's sessions.
//! - `notifications/resources/updated`: sessions subscribed through that connection whose caller
//!   may (still) see the resource.
//! - list changes: re-list, rebuild, and queue list_changed only where a session's view changed.
//! - server-to-client requests: only to the session whose call caused them.

// Sampling, elicitation, roots and logging are deprecated by SEP-2577 in 2026-07-28, but live in
// 2025-11-25.
#![allow(deprecated)]

use std::sync::Arc;

use rmcp::{
    ErrorData,
    model::{
        CancelledNotificationParam, ClientCapabilities, ClientResult, GetExtensions,
        ListRootsResult, LoggingMessageNotificationParam, RequestId,
        ResourceUpdatedNotificationParam, ServerRequest,
    },
    service::{OriginatingRequestId, PeerRequestOptions},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::policy::Kind;
use crate::upstream::UpstreamEvent;

use super::Broker;
use super::errors::service_error;
use super::sessions::{MAX_PENDING_REQUESTS, Outbound, Session, Slot};
use crate::cluster::Wire;

impl Broker {
    pub(super) async fn route_events(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<UpstreamEvent>,
    ) {
        while let Some(ev) = rx.recv().await {
            match ev {
                UpstreamEvent::StateChanged { .. } => {
                    self.rebuild();
                    self.state_changed.notify_waiters();
                }
                UpstreamEvent::ListChanged { server, conn, kind } => {
                    // Re-list off the router so a slow upstream does not hold up anyone else.
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Some(up) = me.state().upstream(&server).cloned()
                            && up.refresh(conn, kind).await
                        {
                            me.rebuild_announced(Some((&server, kind)));
                        }
                    });
                }
                UpstreamEvent::Log {
                    server,
                    conn,
                    mut params,
                } => {
                    params.logger = Some(match params.logger.take() {
                        Some(l) => format!("{server}/{l}"),
                        None => server.to_string(),
                    });
                    self.route_log(&server, conn, params);
                }
                UpstreamEvent::ResourceUpdated {
                    server,
                    conn,
                    params,
                } => self.route_update(&server, conn, params),
                UpstreamEvent::Request {
                    server,
                    conn,
                    request,
                    origin,
                    cancel,
                    reply,
                } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let r = me
                            .route_request(&server, conn, request, origin, cancel)
                            .await;
                        let _ = reply.send(r);
                    });
                }
            }
        }
    }

    /// May `s` receive what connection `conn` of `server` says on its own? Shared connections speak
    /// to everyone who may see the server; per-owner connections to their owner only.
    fn hears(&self, s: &Session, server: &str, owner: Option<&str>) -> bool {
        if !s.sees_server(server) {
            return false;
        }
        match owner {
            None => true,
            Some(o) => {
                o == Session::owner_key(s.id)
                    || o.strip_prefix("sub:") == Some(s.caller.sub.as_str())
                    || o.strip_prefix("front:")
                        .is_some_and(|f| s.front.as_deref() == Some(f))
            }
        }
    }

    fn owner_of(&self, server: &str, conn: u64) -> Option<Arc<str>> {
        let up = self.state().upstream(server).cloned()?;
        if up.per_caller {
            // A per-owner connection that is already gone speaks to no one.
            Some(up.owner_of(conn).unwrap_or_else(|| Arc::from("gone:")))
        } else {
            None
        }
    }

    fn route_log(&self, server: &Arc<str>, conn: u64, params: LoggingMessageNotificationParam) {
        let owner = self.owner_of(server, conn);
        if let Some(c) = &self.cluster {
            // Every instance routes it to the sessions whose stream it holds (wherever their
            // requests went); a per-session owner is named by the front's session id, which
            // every instance knows.
            let owner = owner.as_deref().map(|o| match o.strip_prefix("session:") {
                Some(id) => id
                    .parse()
                    .ok()
                    .and_then(|id| self.sessions.get(id))
                    .and_then(|s| s.front.clone())
                    .map_or_else(|| "gone:".to_string(), |f| format!("front:{f}")),
                None => o.to_string(),
            });
            let wire = Wire::Log {
                from: c.tag.clone(),
                server: server.to_string(),
                owner,
                params: serde_json::to_value(&params).unwrap_or_default(),
            };
            let c = c.clone();
            let me = self.me.upgrade();
            let (server, params2) = (server.clone(), params);
            tokio::spawn(async move {
                if let Err(e) = c.broadcast(&wire).await
                    && let Some(me) = me
                {
                    // Redis unreachable: at least the sessions held here get it.
                    tracing::debug!(error = %e, "cluster: a log message reached this instance's sessions only");
                    let owner = me.owner_of(&server, conn);
                    me.route_log_to(&server, owner.as_deref(), params2, |_| true);
                }
            });
            return;
        }
        self.route_log_to(server, owner.as_deref(), params, |_| true);
    }

    /// A log message to every session that set a level it meets, hears that connection, and
    /// passes `only`.
    fn route_log_to(
        &self,
        server: &str,
        owner: Option<&str>,
        params: LoggingMessageNotificationParam,
        only: impl Fn(&Session) -> bool,
    ) {
        let bytes = encoded_len(&params);
        for s in self.sessions.all() {
            if s.wants_log(params.level) && self.hears(&s, server, owner) && only(&s) {
                self.sessions.send(&s, Outbound::Log(params.clone(), bytes));
            }
        }
    }

    /// A log message broadcast by an instance of the cluster (this one included): to the sessions
    /// whose standalone stream this instance holds (each stream is held by one instance, so each
    /// session gets it once).
    pub fn route_cluster_log(
        &self,
        server: &str,
        owner: Option<&str>,
        params: LoggingMessageNotificationParam,
    ) {
        let Some(c) = &self.cluster else {
            return;
        };
        self.route_log_to(server, owner, params, |s| {
            s.front.as_deref().is_some_and(|f| c.holds_stream(f))
        });
    }

    /// A notification another instance decided to send the session whose stream this one holds.
    pub fn deliver_relayed(&self, front: &str, n: rmcp::model::ServerNotification) {
        if let Some(s) = self.sessions.by_front(front) {
            let bytes = encoded_len(&n);
            self.sessions.send(&s, Outbound::Relayed(n, bytes));
        }
    }

    fn route_update(&self, server: &Arc<str>, conn: u64, params: ResourceUpdatedNotificationParam) {
        let ids: Vec<u64> = match self.subscriptions.lock() {
            Ok(subs) => subs
                .get(&(server.clone(), conn, params.uri.clone()))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Err(_) => return,
        };
        if ids.is_empty() {
            return;
        }
        let st = self.state();
        let exposed = self.catalog().expose_uri_of(server, &params.uri);
        let owner = self.owner_of(server, conn);
        for id in ids {
            let Some(s) = self.sessions.get(id) else {
                continue;
            };
            // Checked again on delivery: a reload may have taken the resource away.
            let allowed = st
                .policy
                .decide(&s.caller, server, Kind::Resource, &params.uri)
                .allow;
            if allowed && self.hears(&s, server, owner.as_deref()) {
                let mut p = params.clone();
                p.uri = exposed.clone();
                let bytes = encoded_len(&p);
                self.sessions.send(&s, Outbound::Updated(p, bytes));
            }
        }
    }

    /// The downstream call an upstream request belongs to: the call whose response stream carried it
    /// (HTTP), else the only call in flight on that connection (stdio and SSE carry no link; more
    /// than one would be ambiguous).
    fn caller_of_request(
        &self,
        server: &Arc<str>,
        conn: u64,
        origin: Option<&RequestId>,
    ) -> Option<super::Downstream> {
        origin
            .and_then(|id| {
                self.inflight
                    .get(&(server.clone(), conn, id.clone()))
                    .map(|d| d.clone())
            })
            .or_else(|| {
                let mut it = self
                    .inflight
                    .iter()
                    .filter(|e| &e.key().0 == server && e.key().1 == conn);
                match (it.next(), it.next()) {
                    (Some(only), None) => Some(only.value().clone()),
                    _ => None,
                }
            })
    }

    /// Route an upstream's sampling/elicitation/roots request to the downstream call that caused it.
    async fn route_request(
        &self,
        server: &Arc<str>,
        conn: u64,
        request: ServerRequest,
        origin: Option<RequestId>,
        cancel: CancellationToken,
    ) -> Result<ClientResult, ErrorData> {
        if let ServerRequest::PingRequest(_) = request {
            return Ok(ClientResult::empty(()));
        }
        // The call's route is registered just after its request went out, so a fast upstream's
        // request can arrive first: look again for a short while before giving up.
        let mut target = None;
        for _ in 0..50 {
            target = self.caller_of_request(server, conn, origin.as_ref());
            if target.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let Some(down) = target else {
            if matches!(request, ServerRequest::ListRootsRequest(_)) {
                return Ok(ClientResult::ListRootsResult(ListRootsResult::default()));
            }
            return Err(ErrorData::invalid_request(
                format!(
                    "mcp-broker cannot tell which client `{server}`'s {} is for (it is not tied to exactly one call in flight)",
                    method_of(&request).0
                ),
                None,
            ));
        };
        self.ask_client(server, &down, request, &cancel).await
    }

    /// Ask the client behind `down` (on the session of the call it made) what an upstream asks:
    /// only what it declared it can answer, a bounded number at once per session.
    pub(super) async fn ask_client(
        &self,
        server: &str,
        down: &super::Downstream,
        mut request: ServerRequest,
        cancel: &CancellationToken,
    ) -> Result<ClientResult, ErrorData> {
        let (method, declared) = method_of(&request);
        let is_roots = matches!(request, ServerRequest::ListRootsRequest(_));
        // A session's client answers a bounded number of upstream requests at once.
        let session = down.session.and_then(|id| self.sessions.get(id));
        let _slot = match &session {
            Some(s) => Some(
                Slot::take(&s.pending_requests, MAX_PENDING_REQUESTS).ok_or_else(|| {
                    ErrorData::invalid_request(
                        format!(
                            "the client already has {MAX_PENDING_REQUESTS} requests from upstream servers waiting; `{server}`'s {method} was not forwarded"
                        ),
                        None,
                    )
                })?,
            ),
            None => None,
        };
        if !down
            .capabilities
            .as_ref()
            .is_some_and(|c| declared(c, &request))
        {
            if is_roots {
                return Ok(ClientResult::ListRootsResult(ListRootsResult::default()));
            }
            return Err(ErrorData::invalid_request(
                format!(
                    "the client did not declare the capability for {method}, so `{server}`'s request was not forwarded"
                ),
                None,
            ));
        }
        if down.stateless {
            // 2026-07-28 has no server-to-client requests: the call parks and the client is asked
            // with an input_required result (see `mrtr`).
            let Some(asks) = &down.asks else {
                return Err(ErrorData::invalid_request(
                    format!(
                        "the client uses protocol 2026-07-28, which has no server-to-client requests; `{server}`'s {method} cannot reach it"
                    ),
                    None,
                ));
            };
            let (reply, answer) = tokio::sync::oneshot::channel();
            asks.try_send(super::mrtr::Ask { request, reply }).map_err(|_| {
                ErrorData::invalid_request(
                    format!("too many requests from `{server}` wait for the client; {method} was not forwarded"),
                    None,
                )
            })?;
            return tokio::select! {
                a = answer => a.unwrap_or_else(|_| Err(ErrorData::internal_error(
                    format!("the client did not answer `{server}`'s {method} (its request state expired or the call was cancelled)"),
                    None,
                ))),
                _ = cancel.cancelled() => Err(ErrorData::internal_error("cancelled by the upstream", None)),
            };
        }
        // Ride the originating call's response stream, not the session's standalone one.
        request
            .extensions_mut()
            .insert(OriginatingRequestId(down.request_id.clone()));
        let handle = down
            .peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await
            .map_err(service_error)?;
        let (id, peer) = (handle.id.clone(), handle.peer.clone());
        tokio::select! {
            r = handle.await_response() => r.map_err(service_error),
            // The upstream gave up on its request: tell the client, with the client-side id.
            _ = cancel.cancelled() => {
                let p = CancelledNotificationParam::new(Some(id), Some(format!("cancelled by server `{server}`")));
                let _ = peer.notify_cancelled(p).await;
                Err(ErrorData::internal_error("cancelled by the upstream", None))
            }
        }
    }
}

/// A server-to-client request's method, and whether a client's capabilities cover it. Elicitation
/// honours the declared modes: `elicitation: {}` means form only; `url` must be declared.
fn method_of(
    request: &ServerRequest,
) -> (
    &'static str,
    fn(&ClientCapabilities, &ServerRequest) -> bool,
) {
    match request {
        ServerRequest::CreateMessageRequest(_) => {
            ("sampling/createMessage", |c, _| c.sampling.is_some())
        }
        ServerRequest::ElicitRequest(_) => ("elicitation/create", |c, r| {
            let Some(e) = &c.elicitation else {
                return false;
            };
            let url = matches!(r, ServerRequest::ElicitRequest(q) if matches!(q.params, rmcp::model::ElicitRequestParams::UrlElicitationParams { .. }));
            if url {
                e.url.is_some()
            } else {
                e.form.is_some() || e.url.is_none()
            }
        }),
        ServerRequest::ListRootsRequest(_) => ("roots/list", |c, _| c.roots.is_some()),
        ServerRequest::PingRequest(_) => ("ping", |_, _| true),
        _ => ("a custom request", |_, _| false),
    }
}

/// The size of a notification's params as JSON (what a session's queue bound counts).
fn encoded_len(p: &impl serde::Serialize) -> usize {
    serde_json::to_vec(p).map_or(0, |v| v.len())
}
