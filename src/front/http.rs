//! The HTTP front: axum router with the MCP endpoint at `/mcp` and `GET /healthz`.
//!
//! rmcp's `StreamableHttpService` does the transport (sessions, SSE responses, the 2026-07-28
//! stateless mode, Host/Origin checks against DNS rebinding, the body limit). Around it: `Accept`
//! normalisation (clients that send `*/*` would get 406), the caller seam for the auth middleware, and
//! `TCP_NODELAY` on accepted sockets (an SSE reply goes out in two writes; with Nagle on, the second
//! waits for a delayed ACK, ~40 ms).

use std::future::Future;
use std::sync::Arc;

use axum::{
    Router,
    extract::Request,
    http::{HeaderValue, Method, header},
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::broker::Broker;
use crate::front::mcp::Front;

/// The router. `ct` ends every MCP session (and their open SSE streams) when cancelled.
pub fn router(broker: Arc<Broker>, ct: CancellationToken) -> Router {
    let cfg = &broker.config().broker;
    let public = &cfg.public_url;
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut origins: Vec<String> = Vec::new();
    for h in ["localhost", "127.0.0.1", "[::1]"] {
        for scheme in ["http", "https"] {
            origins.push(format!("{scheme}://{h}:*"));
        }
    }
    if let Some(host) = public.host_str() {
        let authority = match public.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        hosts.push(authority);
        origins.push(public.origin().ascii_serialization());
    }
    let mut sessions = LocalSessionManager::default();
    sessions.session_config.keep_alive = Some(cfg.session_idle_timeout);
    let server_cfg = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_request_body)
        .with_cancellation_token(ct);
    let b = broker.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(Front::new(b.clone())),
        Arc::new(sessions),
        server_cfg,
    );
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route_service("/mcp", mcp)
        .layer(middleware::from_fn(identify))
        .layer(middleware::from_fn(normalize_accept))
}

/// Bind, announce the URL on stdout (tests and scripts read it), and serve until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Without inbound auth every HTTP caller is anonymous; the OAuth middleware will replace this.
async fn identify(mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(Caller::anonymous());
    next.run(req).await
}

/// `Accept: */*` (or none) means "anything": say so in the form rmcp's transport checks for.
async fn normalize_accept(mut req: Request, next: Next) -> Response {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*");
    let wildcard = accept.split(',').any(|p| {
        let p = p.trim();
        p.starts_with("*/*") || p.is_empty()
    });
    if wildcard {
        let value = if req.method() == Method::GET {
            "text/event-stream"
        } else {
            "application/json, text/event-stream"
        };
        req.headers_mut()
            .insert(header::ACCEPT, HeaderValue::from_static(value));
    }
    next.run(req).await
}
