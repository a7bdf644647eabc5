//! The upstream leg of a request: the connection it goes on (shared, or the owner's under
//! `isolation = "caller" | "session"`, opened with the caller's credential), then the request itself
//! with progress relayed, cancellation forwarded and server-to-client routes held while it runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rmcp::model::{
    CancelledNotificationParam, ClientCapabilities, ClientRequest, CustomRequest, CustomResult,
    NumberOrString, ProgressNotificationParam, ProgressToken, RequestId, RequestMetaObject,
    ServerResult,
};
use rmcp::service::{PeerRequestOptions, ServiceError};
use tokio_util::sync::CancellationToken;

use crate::audit::CallRecord;
use crate::auth::Caller;
use crate::config::{Isolation, UpstreamAuth};
use crate::upstream::lane::{self, Lane, LaneError};
use crate::upstream::{Connection, Secrets, Upstream};

use super::errors::{Failure, unexpected};
use super::sessions::Session;
use super::state::State;
use super::{Broker, Downstream, InflightKey};

/// One forwarded request: where it goes, for whom, and how long it may stay silent.
#[derive(Clone, Copy)]
pub(super) struct Call<'a> {
    pub server: &'a Arc<str>,
    pub caller: &'a Caller,
    pub tool: Option<&'a str>,
    pub down: &'a Downstream,
    pub ct: &'a CancellationToken,
    pub timeout: Duration,
}

impl Broker {
    /// Who owns the connection a request by `caller` from session `session` goes on.
    pub(super) fn owner_for(up: &Upstream, caller: &Caller, session: Option<u64>) -> String {
        match (up.config.isolation, session) {
            (Isolation::Session, Some(id)) => Session::owner_key(id),
            // A request without a session (2026-07-28 stateless, the `tools` command) is the caller's.
            _ => format!("sub:{}", caller.sub),
        }
    }

    /// The connection a request goes on, and the credential kind used (for audit).
    pub(super) async fn connection_for(
        &self,
        st: &State,
        up: &Upstream,
        caller: &Caller,
        owner: &str,
        tool: Option<&str>,
        legacy: bool,
    ) -> Result<(Arc<Connection>, &'static str), Failure> {
        let server = &up.name;
        if !up.per_caller {
            let kind = up
                .config
                .upstream_auth
                .as_ref()
                .map_or("none", credential_kind);
            // A 2025-era client's request goes on the server's 2025-11-25 connection, if it keeps one.
            return up
                .connection_in(legacy)
                .map(|c| (c, kind))
                .ok_or_else(|| Failure::Unavailable(unavailable(up)));
        }
        // A refused connect (an upstream 401/403 surfaces here) gets one retry with a fresh
        // credential (re-exchange, Vault re-read), then a clear error.
        let mut last = None;
        for fresh in [false, true] {
            let (secrets, kind, slot) = match &up.config.upstream_auth {
                Some(auth) => {
                    let cred = st
                        .credentials
                        .resolve_with(auth, caller, tool, fresh)
                        .await
                        .map_err(|e| {
                            if matches!(e, crate::credentials::CredentialError::OAuth(crate::oauth::OAuthError::ConsentRequired { .. })) {
                                tracing::debug!(server = %server, sub = %caller.sub, "not connected yet (upstream OAuth)");
                            } else {
                                tracing::warn!(server = %server, sub = %caller.sub, error = %e, "no upstream credential");
                            }
                            Failure::Unavailable(format!("server `{server}`: {e}"))
                        })?;
                    let secrets = Secrets {
                        headers: cred.headers,
                        env: cred.env,
                    };
                    (secrets, cred.kind, cred.slot)
                }
                None => (Secrets::default(), "none", String::new()),
            };
            // One connection per (owner, credential): servers bind sessions to the token that
            // opened them, so a new or narrower token gets its own session.
            use sha2::Digest;
            let hex = |h: sha2::Sha256| crate::hex(&h.finalize());
            let mut k = sha2::Sha256::new();
            k.update(owner.as_bytes());
            k.update([0u8]);
            k.update(slot.as_bytes());
            let mut v = sha2::Sha256::new();
            for (name, value) in secrets.headers.iter().chain(&secrets.env) {
                v.update(name.as_bytes());
                v.update([0u8]);
                v.update(value.expose().as_bytes());
                v.update([0u8]);
            }
            let (key, version) = (hex(k), hex(v));
            match up
                .connection_for(owner, &key, &version, &secrets, &self.events_tx)
                .await
            {
                Ok(c) => return Ok((c, kind)),
                Err(e) => {
                    tracing::warn!(server = %server, sub = %caller.sub, fresh, error = %e, "per-owner connection failed");
                    last = Some(e);
                }
            }
            if up.config.upstream_auth.is_none() {
                break;
            }
        }
        Err(Failure::Unavailable(format!(
            "server `{server}` is unavailable (could not connect for this caller: {})",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Send `req` to `call.server` and wait for its result, forwarding progress and cancellation.
    /// The call's timeout is an idle timeout: each progress notification from the upstream restarts it.
    pub(super) async fn forward(
        &self,
        st: &State,
        call: Call<'_>,
        mut req: ClientRequest,
        rec: &mut CallRecord,
    ) -> Result<ServerResult, Failure> {
        let Call {
            server,
            caller,
            tool,
            down,
            ct,
            timeout,
        } = call;
        let up = st
            .upstream(server)
            .ok_or_else(|| Failure::Rpc(unexpected(server)))?;
        let _active = ActiveCall::new(self);
        let owner = Self::owner_for(up, caller, down.session);
        let credential_span = rec.child_span("mcp credential");
        let (conn, kind) = self
            .connection_for(st, up, caller, &owner, tool, !down.stateless)
            .await?;
        drop(credential_span);
        rec.credential(kind);
        rec.upstream_started();
        if let Some(tp) = rec.traceparent() {
            super::pipeline::set_traceparent(&mut req, tp, conn.modern);
        }
        if let Some((lane, custom)) = conn.lane_for(&req) {
            return self.forward_lane(call, up, &conn, lane, custom, rec).await;
        }
        let mut opts = PeerRequestOptions::with_timeout(timeout).reset_timeout_on_progress();
        if conn.modern {
            // 2026-07-28 requests carry the client's capabilities: the caller's own, so the upstream
            // asks (input_required) only for what this caller can answer, not what the broker can.
            let mut meta = RequestMetaObject::default();
            meta.set_client_capabilities(forwarded_capabilities(down.capabilities.clone()));
            opts.meta = Some(meta);
        }
        rec.upstream_started();
        let handle = conn
            .peer
            .send_request_with_option(req, opts)
            .await
            .map_err(|e| {
                up.report_failure();
                up.drop_connection(conn.id);
                tracing::warn!(server = %server, error = %e, "could not send the request upstream");
                Failure::Unavailable(format!(
                    "server `{server}` is unavailable (reconnecting; last error: {e})"
                ))
            })?;
        // Routes registered before the first await on the response; removed when this call ends, however.
        let mut progress = conn.progress.route(&handle.progress_token);
        let _routes = RouteGuard::new(
            self,
            server,
            &handle.id,
            &handle.progress_token,
            &conn,
            down,
        );
        let (id, upeer) = (handle.id.clone(), handle.peer.clone());
        let mut response = std::pin::pin!(handle.await_response());
        let result = loop {
            tokio::select! {
                biased;
                Some(p) = progress.recv() => relay_progress(down, p).await,
                r = &mut response => {
                    // Progress that preceded the response on the wire is already queued: send it first.
                    while let Ok(p) = progress.try_recv() {
                        relay_progress(down, p).await;
                    }
                    break r;
                }
                _ = ct.cancelled() => {
                    let p = CancelledNotificationParam::new(Some(id), Some("cancelled by the client".into()));
                    let _ = upeer.notify_cancelled(p).await;
                    return Err(Failure::Cancelled("request cancelled by the client".into()));
                }
                _ = self.drain_cancel.cancelled() => {
                    let p = CancelledNotificationParam::new(Some(id), Some("mcp-broker is shutting down".into()));
                    let _ = upeer.notify_cancelled(p).await;
                    return Err(Failure::Cancelled(
                        "cancelled: mcp-broker is shutting down and the drain deadline passed".into(),
                    ));
                }
            }
        };
        rec.upstream_finished();
        match result {
            Ok(r) => Ok(r),
            Err(ServiceError::McpError(e)) => Err(Failure::Rpc(e)),
            Err(ServiceError::Timeout { timeout }) => {
                let p = CancelledNotificationParam::new(
                    Some(id),
                    Some("timed out at mcp-broker".into()),
                );
                let _ = upeer.notify_cancelled(p).await;
                Err(Failure::Timeout(format!(
                    "server `{server}` did not answer within {timeout:?} (no result or progress in that time)"
                )))
            }
            Err(e) => {
                up.report_failure();
                up.drop_connection(conn.id);
                tracing::warn!(server = %server, error = %e, "upstream connection failed during a request");
                Err(Failure::Unavailable(format!(
                    "server `{server}` is unavailable (the connection failed during the request; reconnecting)"
                )))
            }
        }
    }
}

impl Broker {
    /// [`Broker::forward`] on the connection's lane (see `upstream::lane`): the same routes, audit,
    /// progress, cancellation and error mapping, without rmcp's client service. The lane id is the
    /// request id and the progress token.
    async fn forward_lane(
        &self,
        call: Call<'_>,
        up: &Upstream,
        conn: &Arc<Connection>,
        lane: &Lane,
        req: &CustomRequest,
        rec: &mut CallRecord,
    ) -> Result<ServerResult, Failure> {
        let Call {
            server,
            down,
            ct,
            timeout,
            ..
        } = call;
        let n = lane::next_id();
        let (id, token) = (
            RequestId::Number(n),
            ProgressToken(NumberOrString::Number(n)),
        );
        // 2026-07-28: the caller's capabilities, as `forward` gives rmcp.
        let caps = conn
            .modern
            .then(|| forwarded_capabilities(down.capabilities.clone()));
        rec.upstream_started();
        // Routes registered before the request goes out; removed when this call ends, however.
        let mut progress = conn.progress.route(&token);
        let _routes = RouteGuard::new(self, server, &id, &token, conn, down);
        let cancel = |reason: &'static str| {
            let p = CancelledNotificationParam::new(Some(id.clone()), Some(reason.into()));
            let peer = conn.peer.clone();
            async move {
                let _ = peer.notify_cancelled(p).await;
            }
        };
        let mut response = std::pin::pin!(lane.request(n, req, caps));
        // An idle timeout: each progress notification restarts it.
        let idle = tokio::time::sleep(timeout);
        tokio::pin!(idle);
        let result = loop {
            tokio::select! {
                biased;
                Some(p) = progress.recv() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + timeout);
                    relay_progress(down, p).await;
                }
                r = &mut response => {
                    // Progress that preceded the response on the wire is already queued: send it first.
                    while let Ok(p) = progress.try_recv() {
                        relay_progress(down, p).await;
                    }
                    break r;
                }
                _ = &mut idle => {
                    cancel("timed out at mcp-broker").await;
                    rec.upstream_finished();
                    return Err(Failure::Timeout(format!(
                        "server `{server}` did not answer within {timeout:?} (no result or progress in that time)"
                    )));
                }
                _ = ct.cancelled() => {
                    cancel("cancelled by the client").await;
                    return Err(Failure::Cancelled("request cancelled by the client".into()));
                }
                _ = self.drain_cancel.cancelled() => {
                    cancel("mcp-broker is shutting down").await;
                    return Err(Failure::Cancelled(
                        "cancelled: mcp-broker is shutting down and the drain deadline passed".into(),
                    ));
                }
            }
        };
        rec.upstream_finished();
        match result {
            Ok(v) => Ok(ServerResult::CustomResult(CustomResult(v))),
            Err(LaneError::Rpc(e)) => Err(Failure::Rpc(e)),
            Err(e) => {
                up.report_failure();
                up.drop_connection(conn.id);
                tracing::warn!(server = %server, error = %e, "upstream connection failed during a request");
                Err(Failure::Unavailable(format!(
                    "server `{server}` is unavailable (the connection failed during the request; reconnecting)"
                )))
            }
        }
    }
}

/// The capabilities a 2026-07-28 request carries upstream: the caller's, less the tasks extension
/// (SEP-2663). The broker does not relay `tasks/*` (it does not declare the extension), so an
/// upstream must not answer a call through it with a task the caller could never poll: the call
/// runs synchronously, and a tool that requires a task refuses it itself.
fn forwarded_capabilities(caps: Option<ClientCapabilities>) -> ClientCapabilities {
    let mut caps = caps.unwrap_or_default();
    if let Some(ext) = caps.extensions.as_mut() {
        ext.remove(rmcp::model::TASKS_EXTENSION_ID);
        if ext.is_empty() {
            caps.extensions = None;
        }
    }
    caps
}

/// "server X is unavailable (reconnecting; last error: …)".
fn unavailable(up: &Upstream) -> String {
    match up.last_error() {
        Some(e) => format!(
            "server `{}` is unavailable (reconnecting; last error: {e})",
            up.name
        ),
        None => format!("server `{}` is unavailable (still connecting)", up.name),
    }
}

/// The credential kind a configured `upstream_auth` sends (for audit; a chain reports its first).
fn credential_kind(auth: &UpstreamAuth) -> &'static str {
    match auth {
        UpstreamAuth::Exchange { .. } => "token_exchange",
        UpstreamAuth::Vault { .. } => "vault",
        UpstreamAuth::Static(_) => "static",
        UpstreamAuth::OAuth(o) => o.kind(),
        UpstreamAuth::First(list) => list.first().map_or("none", credential_kind),
    }
}

/// Progress from upstream, re-addressed to the caller's own token; dropped if it asked for none.
async fn relay_progress(down: &Downstream, mut p: ProgressNotificationParam) {
    if let Some(token) = &down.progress_token {
        p.progress_token = token.clone();
        let _ = down.peer.notify_progress(p).await;
    }
}

/// Counts a call in flight for draining; notifies the drain when the last one ends.
pub(super) struct ActiveCall<'a>(&'a Broker);

impl<'a> ActiveCall<'a> {
    pub(super) fn new(b: &'a Broker) -> Self {
        b.active_calls.fetch_add(1, Ordering::SeqCst);
        Self(b)
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        if self.0.active_calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Removes a call's progress and in-flight routes when the call ends, is cancelled or is dropped.
struct RouteGuard<'a> {
    broker: &'a Broker,
    conn: Arc<Connection>,
    progress: ProgressToken,
    inflight: InflightKey,
}

impl<'a> RouteGuard<'a> {
    fn new(
        broker: &'a Broker,
        server: &Arc<str>,
        id: &RequestId,
        token: &ProgressToken,
        conn: &Arc<Connection>,
        down: &Downstream,
    ) -> Self {
        let inflight = (server.clone(), conn.id, id.clone());
        broker.inflight.insert(inflight.clone(), down.clone());
        conn.active.fetch_add(1, Ordering::Relaxed);
        Self {
            broker,
            conn: conn.clone(),
            progress: token.clone(),
            inflight,
        }
    }
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.conn.progress.unroute(&self.progress);
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
        self.broker.inflight.remove(&self.inflight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tasks_extension_is_not_forwarded() {
        let mut ext = rmcp::model::ExtensionCapabilities::new();
        ext.insert(rmcp::model::TASKS_EXTENSION_ID.into(), Default::default());
        ext.insert("io.example/other".into(), Default::default());
        let caps = ClientCapabilities::builder()
            .enable_sampling()
            .enable_extensions_with(ext)
            .build();
        assert!(caps.supports_tasks());
        let out = forwarded_capabilities(Some(caps));
        assert!(!out.supports_tasks());
        assert!(out.sampling.is_some());
        assert!(
            out.extensions
                .as_ref()
                .is_some_and(|e| e.contains_key("io.example/other"))
        );
        assert!(forwarded_capabilities(None).extensions.is_none());
    }
}
