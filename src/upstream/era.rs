//! The two protocol eras on the client side: how a connection starts (`server/discover` or
//! `initialize`), the 2025-11-25 companion connection kept beside a 2026-07-28 one, the
//! `subscriptions/listen` stream that carries a 2026-07-28 server's list changes, and what a
//! 2026-07-28 listing needs for `Mcp-Param-*` headers.

use std::sync::Arc;
use std::time::Duration;

use rmcp::RoleClient;
use rmcp::model::{ProtocolVersion, ServerPeerInfo};
use rmcp::service::{ClientLifecycleMode, Peer};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{BACKOFF_CAP, BACKOFF_START, EventSender, Secrets, Upstream, UpstreamEvent};
use crate::catalog::Kind;
use crate::config::Protocol;

impl Upstream {
    /// Keep a 2025-11-25 connection beside a 2026-07-28 one, while `stop` is not cancelled. A
    /// server that refuses `initialize` speaks 2026-07-28 only: its 2025-era clients are then
    /// translated for (see `broker::mrtr`).
    pub(super) async fn companion(
        self: Arc<Self>,
        secrets: Secrets,
        events: EventSender,
        stop: CancellationToken,
        ready: oneshot::Sender<()>,
    ) {
        let mut backoff = BACKOFF_START;
        let mut first = true;
        let mut ready = Some(ready);
        while !stop.is_cancelled() {
            let attempt = tokio::select! {
                r = self.open(&secrets, &events, Protocol::Legacy) => r,
                _ = stop.cancelled() => return,
            };
            match attempt {
                Ok((running, conn)) => {
                    first = false;
                    backoff = BACKOFF_START;
                    let peer = conn.peer.clone();
                    if let Ok(mut s) = self.legacy.write() {
                        *s = Some(conn);
                    }
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                    let _ = events.send(UpstreamEvent::StateChanged {
                        server: self.name.clone(),
                    });
                    self.watch(running, &peer, &stop).await;
                    if let Ok(mut s) = self.legacy.write() {
                        *s = None;
                    }
                    let _ = events.send(UpstreamEvent::StateChanged {
                        server: self.name.clone(),
                    });
                }
                Err(e) if first => {
                    tracing::info!(server = %self.name, error = %e, "the server speaks 2026-07-28 only; 2025-era clients are translated for");
                    return;
                }
                Err(e) => {
                    tracing::debug!(server = %self.name, error = %e, "2025-11-25 connection failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }
}

/// Hold a `subscriptions/listen` stream open on a 2026-07-28 connection and turn its list changes
/// into events (reopened after a second if it ends, until the connection closes).
pub(super) async fn listen_changes(
    server: Arc<str>,
    conn: u64,
    peer: Peer<RoleClient>,
    events: EventSender,
) {
    use rmcp::model::{ServerNotification as N, SubscriptionFilter};
    let filter = SubscriptionFilter::builder()
        .tools_list_changed()
        .prompts_list_changed()
        .resources_list_changed()
        .build();
    let mut delay = Duration::from_secs(1);
    while !peer.is_transport_closed() {
        tracing::debug!(server = %server, connection = conn, "opening subscriptions/listen");
        match peer.listen(filter.clone()).await {
            Ok(mut sub) => loop {
                delay = Duration::from_secs(1);
                let n = sub.next().await;
                tracing::debug!(server = %server, connection = conn, notification = ?n, "subscriptions/listen");
                let kind = match n {
                    Ok(Some(N::ToolListChangedNotification(_))) => Kind::Tool,
                    Ok(Some(N::PromptListChangedNotification(_))) => Kind::Prompt,
                    Ok(Some(N::ResourceListChangedNotification(_))) => Kind::Resource,
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                };
                let _ = events.send(UpstreamEvent::ListChanged {
                    server: server.clone(),
                    conn,
                    kind,
                });
            },
            Err(e) => {
                tracing::debug!(server = %server, error = %e, "subscriptions/listen failed");
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
        tokio::time::sleep(delay).await;
    }
}

/// How a connection starts for `protocol` (stdio: rmcp's auto mode falls back to `initialize` when
/// the server answers `server/discover` with a JSON-RPC error).
pub(super) fn lifecycle(protocol: Protocol) -> ClientLifecycleMode {
    match protocol {
        Protocol::Auto => ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: None,
        },
        Protocol::Legacy => ClientLifecycleMode::Initialize,
        Protocol::Modern => discover(),
    }
}

pub(super) fn discover() -> ClientLifecycleMode {
    ClientLifecycleMode::Discover {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
    }
}

/// Does this connection speak 2026-07-28 or later (started with `server/discover`)?
pub(super) fn is_modern(info: Option<&ServerPeerInfo>) -> bool {
    info.is_some_and(|i| i.protocol_version.as_str() >= ProtocolVersion::V_2026_07_28.as_str())
}

/// Does a tool's input schema annotate any argument with `x-mcp-header`?
pub(super) fn wants_param_headers(tool: &serde_json::Map<String, serde_json::Value>) -> bool {
    fn walk(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(o) => o.contains_key("x-mcp-header") || o.values().any(walk),
            serde_json::Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    tool.get("inputSchema").is_some_and(walk)
}
