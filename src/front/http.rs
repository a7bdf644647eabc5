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
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
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
    let limit = BodyLimit(cfg.max_request_body);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route_service("/mcp", mcp)
        .layer(middleware::from_fn(identify))
        .layer(middleware::from_fn_with_state(limit, jsonrpc_errors))
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

#[derive(Clone, Copy)]
struct BodyLimit(usize);

/// Malformed bodies get JSON-RPC errors (rmcp answers them with a plain-text 415): invalid JSON is a
/// -32700 parse error, JSON that is not one JSON-RPC message (a batch, a bare object) is -32600.
/// The body is read once here, bounded, and handed on as bytes.
async fn jsonrpc_errors(State(limit): State<BodyLimit>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        let method = req.method().clone();
        let mut resp = next.run(req).await;
        // rmcp answers a session DELETE with 202; clients (the Python SDK) expect 200 or 204.
        if method == Method::DELETE && resp.status() == StatusCode::ACCEPTED {
            *resp.status_mut() = StatusCode::NO_CONTENT;
        }
        return resp;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit.0).await {
        Ok(b) => b,
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {} bytes", limit.0),
            );
        }
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
        return rpc_error(-32700, "Parse error: the body is not valid JSON");
    }
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let batch = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if resp.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE && is_json {
        let msg = if batch {
            "Invalid Request: JSON-RPC batches are not supported (removed in MCP 2025-06-18)"
        } else {
            "Invalid Request: the body is not a JSON-RPC request, notification or response"
        };
        return rpc_error(-32600, msg);
    }
    resp
}

fn rpc_error(code: i64, message: &str) -> Response {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": { "code": code, "message": message },
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(status: StatusCode, message: String) -> Response {
    let mut resp = Response::new(Body::from(message));
    *resp.status_mut() = status;
    resp
}
