//! The HTTP front: axum router with the MCP endpoint at `/mcp` and `GET /healthz`.
//!
//! rmcp's `StreamableHttpService` does the transport (sessions, SSE responses, the 2026-07-28
//! stateless mode, Host/Origin checks against DNS rebinding, the body limit). Around it: `Accept`
//! normalisation (clients that send `*/*` would get 406), the caller seam for the auth middleware, and
//! `TCP_NODELAY` on accepted sockets (an SSE reply goes out in two writes; with Nagle on, the second
//! waits for a delayed ACK, ~40 ms).
//!
//! A request costs nothing before it is authenticated: the token is checked from the headers, and
//! only then is the body read (bounded by `max_request_body` and `body_read_timeout`). [`serve`]
//! bounds the connections themselves: how long headers may take, and how many may be open.
//!
//! Sessions are rmcp's `LocalSessionManager` wrapped in [`ResumableSessions`]: a call's SSE stream
//! outlives its HTTP response, so a client that loses it (or that the broker closes, passing on an
//! upstream's SEP-1699 poll) gets the rest, response included, by `GET` with `Last-Event-ID`.

use std::future::Future;
use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::lane::{Lanes, OpenedSession};
use super::resume::ResumableSessions;
use crate::auth::{AuthError, Authenticator, Caller, SessionOwners};
use crate::broker::Broker;
use crate::front::mcp::Front;

/// The router. `ct` ends every MCP session (and their open SSE streams) when cancelled. With `auth`,
/// every request to `/mcp` must carry a valid bearer token; the RFC 9728 metadata documents and
/// `/healthz` stay open.
pub fn router(
    broker: Arc<Broker>,
    auth: Option<Arc<Authenticator>>,
    ct: CancellationToken,
    posts: Posts,
) -> Router {
    let config = broker.config();
    let cfg = &config.broker;
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
    // Idleness is kept by the front (`lane`): requests served on the direct lane never reach
    // rmcp's session worker, whose own timer would close a busy session.
    sessions.session_config.keep_alive = None;
    let cluster = broker.cluster().cloned();
    let sessions = Arc::new(ResumableSessions::new(sessions, cluster.clone()));
    let lanes = Arc::new(Lanes::new(broker.clone(), hosts.clone()));
    let owners = Arc::new(SessionOwners::default());
    let forwarder = cluster
        .as_ref()
        .map(|c| Arc::new(super::forward::Forwarder::new(c.clone())));
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(
            lanes
                .clone()
                .sweep(sessions.clone(), cfg.session_idle_timeout, ct.clone()),
        );
        if let Some(c) = &cluster {
            rt.spawn(super::cluster::inbound(
                c.clone(),
                sessions.clone(),
                broker.clone(),
                lanes.clone(),
                owners.clone(),
                forwarder.clone(),
            ));
        }
    }
    let mut server_cfg = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_request_body)
        .with_cancellation_token(ct);
    if let Some(c) = &cluster {
        server_cfg.session_store = Some(Arc::new(super::cluster::StoredSessions(c.clone())));
    }
    let b = broker.clone();
    let mcp = Arc::new(StreamableHttpService::new(
        move || Ok(Front::new(b.clone())),
        sessions,
        server_cfg,
    ));
    let public_path = public.path().trim_end_matches('/').to_string();
    let metadata_url = format!(
        "{}/.well-known/oauth-protected-resource{}",
        public.origin().ascii_serialization(),
        public_path
    );
    let state = Gate {
        broker: broker.clone(),
        auth: auth.clone(),
        owners,
        metadata_url: Arc::from(metadata_url),
    };
    let mut app = ops_routes(Router::new(), &broker, cfg.metrics_listen.is_none())
        .route(
            "/status",
            get(status_handler).with_state(StatusAccess {
                broker: broker.clone(),
                auth: auth.clone(),
            }),
        )
        .merge(super::tokens::router(broker.tokens.clone(), auth.clone()))
        .merge(super::approvals::router(broker.clone(), auth.clone()))
        .route(
            MCP_PATH,
            axum::routing::any(move |req: Request| {
                // One shared service: `route_service` would clone it (and its host/origin lists) for
                // every request; `handle` takes `&self`.
                let mcp = mcp.clone();
                async move { mcp.handle(req).await }
            }),
        );
    // Upstream consent and sign-in pages (browser-facing; `crate::oauth` answers 404 for a link to
    // a server that takes none).
    app = app.merge(super::oauth::routes(public.scheme() == "https"));
    if let Some(auth) = auth {
        let doc = auth.metadata_document(public.as_str());
        let serve_doc = move || {
            let doc = doc.clone();
            async move { axum::Json(doc) }
        };
        // RFC 9728 §3.1: the path-inserted form for our resource, plus the root form clients try next.
        app = app
            .route(
                "/.well-known/oauth-protected-resource",
                get(serve_doc.clone()),
            )
            .route(
                &format!("/.well-known/oauth-protected-resource{MCP_PATH}"),
                get(serve_doc.clone()),
            );
        if !public_path.is_empty() && public_path != MCP_PATH {
            app = app.route(
                &format!("/.well-known/oauth-protected-resource{public_path}"),
                get(serve_doc),
            );
        }
    }
    let body = BodyRules {
        limit: cfg.max_request_body,
        timeout: cfg.body_read_timeout,
    };
    // Outermost last. The gate decides from the headers alone, so no body byte of an
    // unauthenticated request is read; `jsonrpc_errors` then reads the body once (bounded in size
    // and time) and the layers inside it get bytes.
    let relay = Relay {
        body,
        lanes,
        direct: cfg.direct_lane,
        cluster: cluster.is_some(),
        forwarder: forwarder.clone(),
    };
    let app = app
        .layer(middleware::from_fn_with_state(relay, relay_rename))
        .layer(middleware::from_fn_with_state(state.clone(), step_up))
        .layer(middleware::from_fn_with_state(body, jsonrpc_errors))
        .layer(middleware::from_fn_with_state(state, gate))
        .layer(middleware::from_fn(normalize_accept))
        .layer(middleware::from_fn_with_state(posts, track_posts));
    if let Some(f) = &forwarder {
        let _ = f.app.set(app.clone());
    }
    app
}

/// POST requests to `/mcp` whose responses are still being written (an SSE response stream counts
/// until it ends). Draining waits for these before it ends the sessions, so a call that finished
/// during the drain still reaches its client.
#[derive(Clone, Default)]
pub struct Posts(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

impl Posts {
    /// Wait until no POST response is open, at most `deadline`; returns how many were left.
    pub async fn wait_idle(&self, deadline: std::time::Duration) -> usize {
        use std::sync::atomic::Ordering;
        let wait = async {
            loop {
                let idle = self.0.1.notified();
                if self.0.0.load(Ordering::SeqCst) == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        self.0.0.load(Ordering::SeqCst)
    }
}

struct PostGuard(Posts);

impl Drop for PostGuard {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        if self.0.0.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

async fn track_posts(State(posts): State<Posts>, req: Request, next: Next) -> Response {
    use futures::StreamExt;
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    posts.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let guard = PostGuard(posts);
    let resp = next.run(req).await;
    let (parts, body) = resp.into_parts();
    // The guard lives as long as the body stream: dropped when it ends or the client goes away.
    let stream = body.into_data_stream().map(move |chunk| {
        let _held = &guard;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

pub(super) const MCP_PATH: &str = "/mcp";

/// `/healthz` (the process answers), `/readyz` (every `required` server is up and the broker is not
/// draining) and, with `metrics`, `/metrics` (Prometheus text). None of them needs a token.
pub fn ops_routes(app: Router, broker: &Arc<Broker>, metrics: bool) -> Router {
    let b = broker.clone();
    let app = app.route("/healthz", get(|| async { "ok\n" })).route(
        "/readyz",
        get(move || {
            let b = b.clone();
            async move {
                let down = b.required_down();
                if b.is_draining() {
                    (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_string())
                } else if b.cluster().is_some_and(|c| !c.is_up()) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: the cluster store (Redis) is unreachable\n".to_string(),
                    )
                } else if down.is_empty() {
                    (StatusCode::OK, "ready\n".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: required server(s) down: {}\n", down.join(", ")),
                    )
                }
            }
        }),
    );
    if !metrics {
        return app;
    }
    let b = broker.clone();
    app.route(
        "/metrics",
        get(move || {
            let b = b.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    b.render_metrics(),
                )
            }
        }),
    )
}

/// The router for `[broker] metrics_listen`: the operational endpoints only (`/status` included,
/// with no token, like `/metrics`).
pub fn ops_router(broker: &Arc<Broker>) -> Router {
    ops_routes(Router::new(), broker, true).route(
        "/status",
        get(status_handler).with_state(StatusAccess {
            broker: broker.clone(),
            auth: None,
        }),
    )
}

/// Who may read `/status`: anyone without `[auth]` (the broker is then on loopback, or was told
/// otherwise) and on the metrics listener; on the main listener under `[auth]`, a valid token holding
/// one of `[auth] admin_scopes`.
#[derive(Clone)]
struct StatusAccess {
    broker: Arc<Broker>,
    auth: Option<Arc<Authenticator>>,
}

async fn status_handler(State(a): State<StatusAccess>, headers: axum::http::HeaderMap) -> Response {
    if let Some(auth) = &a.auth
        && let Err(refused) = require_admin(
            auth,
            &headers,
            "Not Found: /status is served on metrics_listen, or here to tokens holding one of [auth] admin_scopes (none is set)",
        )
        .await
    {
        return refused;
    }
    axum::Json(a.broker.status()).into_response()
}

/// An admin endpoint on the main listener: a valid bearer token holding one of `[auth]
/// admin_scopes` gets its caller; otherwise the answer to send (404 with `none_set` when no admin
/// scope is configured, 401 without a valid token, 403 without an admin scope).
pub(super) async fn require_admin(
    auth: &Authenticator,
    headers: &axum::http::HeaderMap,
    none_set: &str,
) -> Result<Caller, Response> {
    let admin = &auth.config().admin_scopes;
    if admin.is_empty() {
        return Err(plain(StatusCode::NOT_FOUND, none_set.into()));
    }
    let Some(token) = bearer(headers) else {
        return Err(plain(
            StatusCode::UNAUTHORIZED,
            "a bearer token with an admin scope is required".into(),
        ));
    };
    match auth.authenticate(&token).await {
        Ok(c) if c.scopes.iter().any(|s| admin.contains(s)) => Ok(c),
        Ok(_) | Err(AuthError::InsufficientScope(_)) => Err(plain(
            StatusCode::FORBIDDEN,
            "the token holds none of [auth] admin_scopes".into(),
        )),
        Err(e) => Err(plain(StatusCode::UNAUTHORIZED, e.to_string())),
    }
}

/// What the identity gate needs.
#[derive(Clone)]
struct Gate {
    broker: Arc<Broker>,
    auth: Option<Arc<Authenticator>>,
    owners: Arc<SessionOwners>,
    /// Our RFC 9728 document URL, for `resource_metadata` in challenges.
    metadata_url: Arc<str>,
}

const SESSION_HEADER: &str = "mcp-session-id";

/// Authenticate every `/mcp` request (RFC 6750 challenges on failure), keep each session with the
/// subject that opened it, and attach the [`Caller`] for the broker. Without `[auth]` every caller
/// is anonymous. Decides from the headers alone: a refused request's body is never read.
/// [`gate_inner`], plus: a refusal sent before the request's body was read closes the connection
/// (`Connection: close`), so a client does not send its next request on a connection the server
/// is about to drop with the unread body still in it.
async fn gate(state: State<Gate>, req: Request, next: Next) -> Response {
    let has_body = req.method() == Method::POST;
    let mut resp = gate_inner(state, req, next).await;
    let refused = matches!(
        resp.status(),
        StatusCode::UNAUTHORIZED
            | StatusCode::FORBIDDEN
            | StatusCode::NOT_FOUND
            | StatusCode::SERVICE_UNAVAILABLE
    );
    if has_body && refused {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

async fn gate_inner(State(g): State<Gate>, mut req: Request, next: Next) -> Response {
    if req.uri().path() != MCP_PATH {
        return next.run(req).await;
    }
    let Some(auth) = g.auth.clone() else {
        let caller = Caller::anonymous();
        if let Some(c) = g.broker.cluster() {
            let session = req
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Some(refused) =
                cluster_gate(&g, c, session.as_deref(), &caller, opens_session(&req)).await
            {
                return refused;
            }
            let sub = caller.sub.clone();
            req.extensions_mut().insert(caller);
            let resp = next.run(req).await;
            // A session opened here is known here (and served while Redis is away).
            if session.is_none()
                && let Some(new) = resp
                    .headers()
                    .get(SESSION_HEADER)
                    .and_then(|v| v.to_str().ok())
            {
                let idle = g.broker.config().broker.session_idle_timeout;
                g.owners.bind(new, &sub, idle);
            }
            return resp;
        }
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    };
    let required = auth.config().required_scopes.clone();
    // RFC 6750 §2.3 allows query tokens; MCP forbids them (they end up in logs).
    let query_token = req.uri().query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "access_token")
    });
    if query_token {
        return challenge(
            StatusCode::BAD_REQUEST,
            &g.metadata_url,
            Some((
                "invalid_request",
                "access tokens are accepted only in the Authorization header",
            )),
            &required,
        );
    }
    let Some(token) = bearer(req.headers()) else {
        return challenge(StatusCode::UNAUTHORIZED, &g.metadata_url, None, &required);
    };
    let caller = match auth.authenticate(&token).await {
        Ok(c) => c,
        Err(AuthError::InvalidToken(why)) => {
            tracing::info!(reason = %why, "rejected a bearer token");
            return challenge(
                StatusCode::UNAUTHORIZED,
                &g.metadata_url,
                Some(("invalid_token", &why)),
                &required,
            );
        }
        Err(AuthError::InsufficientScope(scopes)) => {
            return challenge(
                StatusCode::FORBIDDEN,
                &g.metadata_url,
                Some((
                    "insufficient_scope",
                    "the token lacks a scope this endpoint requires",
                )),
                &scopes,
            );
        }
        Err(e @ AuthError::Unavailable(_)) => {
            tracing::warn!(error = %e, "cannot validate tokens");
            return plain(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
    };
    // A session id is not a credential: only the subject that opened a session may use it.
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(s) = &session
        && !g.owners.may_use(s, &caller.sub)
    {
        tracing::warn!(sub = %caller.sub, "refused a session opened by another subject");
        return plain(StatusCode::NOT_FOUND, "Not Found: Session not found".into());
    }
    if let Some(c) = g.broker.cluster()
        && let Some(refused) =
            cluster_gate(&g, c, session.as_deref(), &caller, opens_session(&req)).await
    {
        return refused;
    }
    let method = req.method().clone();
    let sub = caller.sub.clone();
    req.extensions_mut().insert(caller);
    let resp = next.run(req).await;
    match (&session, method) {
        (Some(s), Method::DELETE) if resp.status().is_success() => g.owners.forget(s),
        (None, _) => {
            if let Some(new) = resp
                .headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                let idle = g.broker.config().broker.session_idle_timeout;
                g.owners.bind(new, &sub, idle);
            }
        }
        _ => {}
    }
    resp
}

/// A POST without a session of a 2025-era client: an `initialize` (2026-07-28 requests carry no
/// session and need none).
fn opens_session(req: &Request) -> bool {
    req.method() == Method::POST
        && req
            .headers()
            .get("mcp-protocol-version")
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v < "2026-07-28")
}

/// `[cluster]`: a session this instance does not know is looked up in Redis (its owner decides, as
/// here: another subject gets 404); a known one is marked in use there now and then, and found
/// deleted or expired if it is gone. A new session is refused (503) while Redis is unreachable:
/// no other instance could serve it. Without auth every caller is `anonymous`, as locally.
async fn cluster_gate(
    g: &Gate,
    c: &Arc<crate::cluster::Cluster>,
    session: Option<&str>,
    caller: &Caller,
    opens: bool,
) -> Option<Response> {
    let idle = g.broker.config().broker.session_idle_timeout;
    let not_found = || plain(StatusCode::NOT_FOUND, "Not Found: Session not found".into());
    let Some(s) = session else {
        if opens && !c.is_up() {
            return Some(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "mcp-broker: the cluster's session store (Redis) is unreachable, so no new session can be opened; retry shortly".into(),
            ));
        }
        return None;
    };
    if g.owners.knows(s) {
        let every = (idle / 4).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        if g.owners.touch_due(s, every)
            && let Ok(false) = c.touch(s, idle).await
        {
            g.owners.forget(s);
            return Some(not_found());
        }
        return None;
    }
    match c.load(s).await {
        Ok(Some(reg)) if reg.owner == caller.sub => {
            g.owners.bind(s, &caller.sub, idle);
            None
        }
        Ok(Some(_)) => {
            tracing::warn!(sub = %caller.sub, "refused a session opened by another subject");
            Some(not_found())
        }
        Ok(None) => Some(not_found()),
        Err(e) => {
            tracing::warn!(error = %e, "cluster: cannot look up a session");
            Some(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "mcp-broker: the cluster's session store (Redis) is unreachable and this instance does not hold the session; retry shortly".into(),
            ))
        }
    }
}

/// A `tools/call` whose policy rule wants a scope the caller's token lacks is refused with an
/// `insufficient_scope` challenge (step-up authorization), before it reaches the broker. Inside
/// `jsonrpc_errors`: it peeks at a body already read, and only for an authenticated caller.
async fn step_up(State(g): State<Gate>, req: Request, next: Next) -> Response {
    if req.uri().path() != MCP_PATH
        || req.method() != Method::POST
        || g.auth.is_none()
        || !g.broker.has_step_up()
    {
        return next.run(req).await;
    }
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    let (parts, body) = req.into_parts();
    // Already in memory (see `jsonrpc_errors`): collecting it again costs no wait.
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if let Some((id, name)) = peek_tool_call(&bytes)
        && let Some(d) = g.broker.step_up_refusal(&caller, &name, &id)
    {
        let scopes = d.step_up.unwrap_or_default();
        let mut resp = challenge(
            StatusCode::FORBIDDEN,
            &g.metadata_url,
            Some(("insufficient_scope", &d.reason)),
            &scopes,
        );
        *resp.body_mut() = Body::from(
            serde_json::json!({
                "jsonrpc": "2.0",
                "id": id,
                "error": { "code": -32600, "message": d.reason },
            })
            .to_string(),
        );
        return resp;
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The token from `Authorization: Bearer <token>` (scheme case-insensitive).
pub(super) fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// The id and tool name of a `tools/call` body, read without decoding the arguments.
fn peek_tool_call(body: &[u8]) -> Option<(serde_json::Value, String)> {
    #[derive(serde::Deserialize)]
    struct Peek {
        id: Option<serde_json::Value>,
        method: Option<String>,
        params: Option<PeekParams>,
    }
    #[derive(serde::Deserialize)]
    struct PeekParams {
        name: Option<String>,
    }
    let p: Peek = serde_json::from_slice(body).ok()?;
    if p.method.as_deref() != Some("tools/call") {
        return None;
    }
    Some((p.id.unwrap_or(serde_json::Value::Null), p.params?.name?))
}

/// An RFC 6750 challenge: `WWW-Authenticate: Bearer` with each attribute at most once.
fn challenge(
    status: StatusCode,
    metadata_url: &str,
    error: Option<(&str, &str)>,
    scopes: &[String],
) -> Response {
    let quote = |s: &str| s.replace(['"', '\\'], "'");
    let mut attrs = Vec::new();
    if let Some((code, description)) = error {
        attrs.push(format!("error=\"{code}\""));
        attrs.push(format!("error_description=\"{}\"", quote(description)));
    }
    attrs.push(format!("resource_metadata=\"{}\"", quote(metadata_url)));
    if !scopes.is_empty() {
        attrs.push(format!("scope=\"{}\"", quote(&scopes.join(" "))));
    }
    let value = format!("Bearer {}", attrs.join(", "));
    let body = match error {
        Some((code, description)) => {
            serde_json::json!({ "error": code, "error_description": description }).to_string()
        }
        None => serde_json::json!({ "error": "unauthorized", "error_description": "a bearer token is required" }).to_string(),
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// What one connection may hold, and how many there may be: the limits that keep a slow or
/// idle client from tying up the listener.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this. hyper starts the clock when it begins waiting
    /// for a request, so an idle keep-alive connection is closed after it too.
    pub header_read_timeout: std::time::Duration,
    /// Connections served at once. At the cap the listener stops accepting: new connections wait
    /// in the kernel's backlog (costing no task or buffer) until one closes.
    pub max_connections: usize,
    /// `[broker] tls`: connections are TLS (the handshake must end within `header_read_timeout`).
    pub tls: Option<Arc<super::tls::Tls>>,
}

impl ConnectionLimits {
    pub fn of(cfg: &crate::config::BrokerConfig) -> Self {
        ConnectionLimits {
            header_read_timeout: cfg.header_read_timeout,
            max_connections: cfg.max_connections,
            tls: None,
        }
    }
}

/// Serve `app` on `listener` (HTTP/1.1, `TCP_NODELAY`) within `limits` until `shutdown`; then stop
/// accepting, let open requests finish (idle connections close at once) and return when every
/// connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_warned: Option<tokio::time::Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Once a minute at most: under a flood this would otherwise be a line per connection.
                if last_warned.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                    last_warned = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    if !is_connection_error(&e) {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::error!(error = %e, "accept failed");
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            _ = &mut shutdown => break,
                        }
                    }
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let Some(tls) = limits.tls.clone() else {
            let conn =
                http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
            let conn = connections.watch(conn);
            tokio::spawn(async move {
                // A client that goes away, or a header timeout: nothing to report.
                let _ = conn.await;
                drop(slot);
            });
            continue;
        };
        // The handshake runs in the connection's task, bounded like a request's headers: a client
        // that stalls it holds only its own slot.
        let (http, app, watcher) = (http.clone(), app.clone(), connections.watcher());
        let handshake = limits.header_read_timeout;
        tokio::spawn(async move {
            if let Ok(Ok(stream)) = tokio::time::timeout(handshake, tls.accept(tcp)).await {
                let conn =
                    http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
                let _ = watcher.watch(conn).await;
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Errors about one connection (it went away before we took it), not about the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
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

/// How much of a request body the broker reads, and how long it waits for it.
#[derive(Clone, Copy)]
struct BodyRules {
    limit: usize,
    /// The whole body must arrive within this: a client trickling a body cannot hold a request
    /// (and its buffer) open for longer.
    timeout: std::time::Duration,
}

impl BodyRules {
    /// The body, or the response that refuses it: 413 over the limit, 408 when it does not arrive
    /// in time (with `Connection: close`: the rest of it is never read).
    async fn read(&self, body: Body) -> Result<axum::body::Bytes, Response> {
        match tokio::time::timeout(self.timeout, axum::body::to_bytes(body, self.limit)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(_)) => Err(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {} bytes", self.limit),
            )),
            Err(_) => {
                tracing::info!(timeout = ?self.timeout, "request body not received in time");
                let mut resp = plain(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within {}s",
                        self.timeout.as_secs_f64()
                    ),
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                Err(resp)
            }
        }
    }
}

/// Malformed bodies get JSON-RPC errors (rmcp answers them with a plain-text 415): invalid JSON is a
/// -32700 parse error, JSON that is not one JSON-RPC message (a batch, a bare object) is -32600.
/// The body is read once here, bounded in size and time, and handed on as bytes. Inside the auth
/// gate: only an authenticated request's body is read.
async fn jsonrpc_errors(State(rules): State<BodyRules>, req: Request, next: Next) -> Response {
    if req.uri().path() != MCP_PATH {
        return next.run(req).await;
    }
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
    let bytes = match rules.read(body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
        return rpc_error(-32700, "Parse error: the body is not valid JSON");
    }
    let is_json = is_json(&parts.headers);
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

#[derive(Clone)]
struct Relay {
    body: BodyRules,
    lanes: Arc<Lanes>,
    /// `[broker] direct_lane`.
    direct: bool,
    /// `[cluster]`: a request may restore a session another instance opened.
    cluster: bool,
    /// `[cluster]`: passes a request that continues what another instance holds to it.
    forwarder: Option<Arc<super::forward::Forwarder>>,
}

/// The innermost layer (the step-up check sees the original request). A request the direct lane
/// can serve is answered here (see `lane`); lists and calls otherwise go on to rmcp under a private
/// method, so the front can answer them with the upstreams' raw JSON (see `relay`). Every request
/// naming a session marks it active, and a new session is registered with the lane.
async fn relay_rename(State(r): State<Relay>, req: Request, next: Next) -> Response {
    if req.uri().path() != MCP_PATH {
        return next.run(req).await;
    }
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(s) = &session {
        r.lanes.touch(s);
    }
    if req.method() != Method::POST {
        let delete = req.method() == Method::DELETE;
        // A `Last-Event-ID` naming a stream another instance holds: served there.
        if let Some(f) = &r.forwarder
            && let Some(tag) = f.stream_elsewhere(req.headers())
        {
            let (parts, _) = req.into_parts();
            return f.forward(&tag, &parts, Default::default()).await;
        }
        let mut req = req;
        // A GET may restore a session here (`[cluster]`): the lane learns it, as for a POST.
        let opened =
            (r.cluster && !delete && session.as_deref().is_some_and(|s| !r.lanes.knows(s)))
                .then(OpenedSession::default);
        if let Some(o) = &opened {
            req.extensions_mut().insert(o.clone());
        }
        let resp = next.run(req).await;
        if delete
            && let Some(s) = &session
            && resp.status().is_success()
        {
            r.lanes.forget(s);
        }
        if let (Some(o), Some(s)) = (opened, &session)
            && let Some((id, direct)) = o.0.get().copied()
        {
            r.lanes.register(s, Some(id), direct);
        }
        return resp;
    }
    let (mut parts, body) = req.into_parts();
    let bytes = match r.body.read(body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    // A 2026-07-28 retry continuing a call parked on another instance: served there.
    if let Some(f) = &r.forwarder
        && let Some(tag) = f.parked_elsewhere(&bytes)
    {
        return f.forward(&tag, &parts, bytes).await;
    }
    // Browsers send `Origin` on every POST: those requests get rmcp's Origin check, so the lane
    // serves only non-browser clients, on a Host rmcp would accept too.
    if let Some(s) = &session
        && r.direct
        && !parts.headers.contains_key(header::ORIGIN)
        && is_json(&parts.headers)
        && r.lanes.host_allowed(&parts.headers)
        && let Some(caller) = parts.extensions.get::<Caller>()
        && let Some(resp) = r.lanes.serve(s, &parts.headers, caller, &bytes).await
    {
        return resp;
    }
    // A new session, or (under `[cluster]`) one restored here from another instance.
    let opened = (session.is_none()
        || r.cluster && !session.as_deref().is_some_and(|s| r.lanes.knows(s)))
    .then(OpenedSession::default);
    if let Some(o) = &opened {
        parts.extensions.insert(o.clone());
    }
    let body = match super::relay::rename_request(&bytes, &mut parts.headers) {
        Some(renamed) => Body::from(renamed),
        None => Body::from(bytes.clone()),
    };
    let resp = next.run(Request::from_parts(parts, body)).await;
    if let Some(o) = opened
        && let Some((id, direct)) = o.0.get().copied()
        && let Some(s) = session.as_deref().or_else(|| {
            resp.headers()
                .get(SESSION_HEADER)
                .and_then(|v| v.to_str().ok())
        })
    {
        r.lanes.register(s, Some(id), direct);
    }
    resp
}

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
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

pub(super) fn plain(status: StatusCode, message: String) -> Response {
    let mut resp = Response::new(Body::from(message));
    *resp.status_mut() = status;
    resp
}
