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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use futures::{Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::{
    SessionId, SessionManager, StreamableHttpServerConfig, StreamableHttpService,
    session::ServerSseMessage,
    session::local::{LocalSessionManager, LocalSessionManagerError},
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Authenticator, Caller, SessionOwners};
use crate::broker::Broker;
use crate::front::mcp::Front;
use crate::upstream::StreamLink;

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
    sessions.session_config.keep_alive = Some(cfg.session_idle_timeout);
    let server_cfg = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_request_body)
        .with_cancellation_token(ct);
    let b = broker.clone();
    let mcp = Arc::new(StreamableHttpService::new(
        move || Ok(Front::new(b.clone())),
        Arc::new(ResumableSessions::new(sessions)),
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
        owners: Arc::new(SessionOwners::default()),
        metadata_url: Arc::from(metadata_url),
    };
    let mut app = ops_routes(Router::new(), &broker, cfg.metrics_listen.is_none()).route(
        MCP_PATH,
        axum::routing::any(move |req: Request| {
            // One shared service: `route_service` would clone it (and its host/origin lists) for
            // every request; `handle` takes `&self`.
            let mcp = mcp.clone();
            async move { mcp.handle(req).await }
        }),
    );
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
    app.layer(middleware::from_fn_with_state(body, relay_rename))
        .layer(middleware::from_fn_with_state(state.clone(), step_up))
        .layer(middleware::from_fn_with_state(body, jsonrpc_errors))
        .layer(middleware::from_fn_with_state(state, gate))
        .layer(middleware::from_fn(normalize_accept))
        .layer(middleware::from_fn_with_state(posts, track_posts))
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

const MCP_PATH: &str = "/mcp";

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

/// The router for `[broker] metrics_listen`: the operational endpoints only.
pub fn ops_router(broker: &Arc<Broker>) -> Router {
    ops_routes(Router::new(), broker, true)
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
        req.extensions_mut().insert(Caller::anonymous());
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
fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
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

/// Events kept per session for clients that come back with `Last-Event-ID`: at most this many...
const REPLAY_MAX_EVENTS: usize = 256;
/// ...holding at most this many bytes of encoded messages. An event larger than this reaches a
/// connected client but is not kept.
const REPLAY_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A call's stream stays resumable this long after its last event (rmcp keeps a finished stream's
/// cache as long), unless the session ends first.
const REPLAY_LINGER: Duration = Duration::from_secs(60);
/// Events on their way to one connected client; past these the stream waits for the client (as
/// rmcp's own streams do).
const LIVE_CAPACITY: usize = 16;
/// Reconnections to one stream waiting to be served.
const ATTACH_QUEUE: usize = 8;
/// The first revision whose clients expect a server to end a call's stream early (SEP-1699).
const POLLING_REVISION: &str = "2025-11-25";

/// rmcp's `LocalSessionManager` with resumable request streams: every event of a POST's SSE stream
/// passes through a task of the broker's ([`forward`]) that keeps it in the session's [`Replay`]
/// and sends it on to whichever connection the client has open for that stream. rmcp's own cache
/// does not do here: it is dropped the moment the response is produced, so a client that was away
/// at that moment got an empty stream back.
///
/// A client of 2025-11-25 or later also has its stream ended when the upstream ends the call's
/// stream early (SEP-1699 polling; see `upstream::http_client`): the broker then goes back to the
/// upstream when its client comes back. Older clients keep their stream open while the broker
/// resumes upstream on its own. The standalone GET stream, and every other session operation, are
/// rmcp's. 2026-07-28 requests carry no session, and so are not resumable.
struct ResumableSessions {
    inner: LocalSessionManager,
    replays: std::sync::Mutex<HashMap<SessionId, Arc<Replay>>>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    #[error("this session has no stream to resume after that event id")]
    NoStream,
}

impl ResumableSessions {
    fn new(inner: LocalSessionManager) -> Self {
        ResumableSessions {
            inner,
            replays: Default::default(),
        }
    }

    fn replays(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Replay>>> {
        self.replays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's replay (a detached one if the session closed meanwhile: freed with the stream).
    fn replay(&self, id: &SessionId) -> Arc<Replay> {
        self.replays().get(id).cloned().unwrap_or_default()
    }
}

impl SessionManager for ResumableSessions {
    type Error = SessionError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        self.replays().insert(id.clone(), Arc::default());
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    /// Also when the session idles out or its worker ends (rmcp closes it then): its streams end
    /// and their kept events go.
    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let replay = self.replays().remove(id);
        if let Some(r) = replay {
            r.closed.cancel();
        }
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let link = match &mut message {
            JsonRpcMessage::Request(r) if client_polls(r.request.extensions()) => {
                let link = StreamLink::default();
                r.request.extensions_mut().insert(link.clone());
                Some(link)
            }
            _ => None,
        };
        // Subscribed before the request runs: an upstream close cannot come first.
        let closes = link.as_ref().map(StreamLink::closes);
        let inner = self.inner.create_stream(id, message).await?;
        let (tx, rx) = mpsc::channel(LIVE_CAPACITY);
        tokio::spawn(forward(inner, tx, self.replay(id), closes, link));
        Ok(ReceiverStream::new(rx))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    /// A request stream's id (`INDEX/STREAM`) is looked up in this session's replay only: another
    /// session's id, a finished stream past its linger, or an evicted one is refused (rmcp then
    /// answers with an empty stream). Other ids (the standalone stream's) are rmcp's.
    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let Some((after, stream)) = request_event_id(&last_event_id) else {
            return Ok(self.inner.resume(id, last_event_id).await?.right_stream());
        };
        let attach = {
            let replays = self.replays();
            replays.get(id).and_then(|r| r.attach_to(stream))
        };
        let attach = attach.ok_or(SessionError::NoStream)?;
        let (reply, connection) = oneshot::channel();
        attach
            .send(Attach { after, reply })
            .await
            .map_err(|_| SessionError::NoStream)?;
        let rx = connection.await.map_err(|_| SessionError::NoStream)?;
        Ok(ReceiverStream::new(rx).left_stream())
    }
}

/// Whether the request comes from a client that resumes a call's stream the server ended early
/// (its `MCP-Protocol-Version` is 2025-11-25 or later; revisions are dates, so they sort as text).
fn client_polls(ext: &rmcp::model::Extensions) -> bool {
    ext.get::<http::request::Parts>()
        .and_then(|p| p.headers.get("mcp-protocol-version"))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= POLLING_REVISION)
}

/// rmcp's id of an event on a request stream, `INDEX/STREAM`, as (index, stream).
fn request_event_id(id: &str) -> Option<(usize, u64)> {
    let (index, stream) = id.split_once('/')?;
    Some((index.parse().ok()?, stream.parse().ok()?))
}

/// A client reconnecting to a stream: the events after `after` and the live ones go to the
/// connection sent back on `reply`.
struct Attach {
    after: usize,
    reply: oneshot::Sender<mpsc::Receiver<ServerSseMessage>>,
}

/// One session's kept events, across its request streams, within [`REPLAY_MAX_EVENTS`] and
/// [`REPLAY_MAX_BYTES`] (the oldest go first).
#[derive(Default)]
struct Replay {
    state: std::sync::Mutex<ReplayState>,
    /// Cancelled when the session closes.
    closed: CancellationToken,
}

#[derive(Default)]
struct ReplayState {
    streams: HashMap<u64, Slot>,
    /// Every kept event, oldest first: (its stream, its size).
    order: VecDeque<(u64, usize)>,
    bytes: usize,
}

struct Slot {
    /// (index, event, size), oldest first.
    events: VecDeque<(usize, ServerSseMessage, usize)>,
    attach: mpsc::Sender<Attach>,
    /// The stream has had its last event: once nothing of it is kept, the slot goes (and with it
    /// the only sender of `attach`, which ends the stream's lingering task).
    ended: bool,
}

impl Replay {
    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, stream: u64, attach: mpsc::Sender<Attach>) {
        self.state().streams.insert(
            stream,
            Slot {
                events: VecDeque::new(),
                attach,
                ended: false,
            },
        );
    }

    fn attach_to(&self, stream: u64) -> Option<mpsc::Sender<Attach>> {
        self.state().streams.get(&stream).map(|s| s.attach.clone())
    }

    fn record(&self, stream: u64, index: usize, event: &ServerSseMessage) {
        let size = encoded_len(event);
        if size > REPLAY_MAX_BYTES {
            tracing::debug!(
                size,
                "an SSE event is larger than the replay buffer: not kept for resumption"
            );
            return;
        }
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(slot) = st.streams.get_mut(&stream) else {
            return;
        };
        slot.events.push_back((index, event.clone(), size));
        st.order.push_back((stream, size));
        st.bytes += size;
        while st.order.len() > REPLAY_MAX_EVENTS || st.bytes > REPLAY_MAX_BYTES {
            let Some((oldest, size)) = st.order.pop_front() else {
                break;
            };
            st.bytes -= size;
            if let Some(s) = st.streams.get_mut(&oldest) {
                s.events.pop_front();
                if s.ended && s.events.is_empty() {
                    st.streams.remove(&oldest);
                }
            }
        }
    }

    /// `stream` had its last event (it stays resumable while any of it is kept).
    fn ended(&self, stream: u64) {
        let mut st = self.state();
        if let Some(s) = st.streams.get_mut(&stream) {
            s.ended = true;
            if s.events.is_empty() {
                st.streams.remove(&stream);
            }
        }
    }

    /// The kept events of `stream` after index `after`.
    fn after(&self, stream: u64, after: usize) -> VecDeque<ServerSseMessage> {
        self.state()
            .streams
            .get(&stream)
            .map(|s| {
                s.events
                    .iter()
                    .filter(|(i, _, _)| *i > after)
                    .map(|(_, e, _)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remove(&self, stream: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(slot) = st.streams.remove(&stream) {
            st.bytes -= slot.events.iter().map(|(_, _, n)| n).sum::<usize>();
            st.order.retain(|(s, _)| *s != stream);
        }
    }
}

/// Bytes of an event's id and encoded message, counted without building the text.
fn encoded_len(event: &ServerSseMessage) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(event.event_id.as_ref().map_or(0, String::len));
    if let Some(m) = &event.message {
        let _ = serde_json::to_writer(&mut n, m.as_ref());
    }
    n.0
}

/// One request stream, from rmcp's session to the client's connections, until its last event is
/// delivered and [`REPLAY_LINGER`] has passed (or the session closes). Events are kept in `replay`
/// as they come; the connected client (first the POST's response, then each reconnection) gets
/// them in order, a reconnection first the kept ones after its `Last-Event-ID`. An upstream close
/// (through `closes`) ends the current connection once it holds an event id to resume from.
async fn forward(
    inner: impl Stream<Item = ServerSseMessage> + Send + 'static,
    first: mpsc::Sender<ServerSseMessage>,
    replay: Arc<Replay>,
    mut closes: Option<watch::Receiver<(u64, Duration)>>,
    link: Option<StreamLink>,
) {
    let mut inner = std::pin::pin!(inner);
    let (attach_tx, mut attach_rx) = mpsc::channel::<Attach>(ATTACH_QUEUE);
    // Registered with the replay once the stream's id is known (from its first event).
    let mut attach_tx = Some(attach_tx);
    let mut stream: Option<u64> = None;
    let mut live = Some(first);
    // Whether the connected client holds an event id to come back with.
    let mut live_has_id = false;
    let mut pending: VecDeque<ServerSseMessage> = VecDeque::new();
    let mut close_wanted: Option<Duration> = None;
    let mut ended = false;
    // False once the replay dropped the stream (nothing of it kept): no client can come back.
    let mut attachable = true;
    let linger = tokio::time::sleep(REPLAY_LINGER);
    let mut linger = std::pin::pin!(linger);
    loop {
        if let Some(wait) = close_wanted
            && (live.is_none() || live_has_id)
        {
            close_wanted = None;
            if let Some(tx) = live.take() {
                // SEP-1699: say when to come back, then end the response.
                let _ = tx.try_send(ServerSseMessage::retry(wait));
            }
            pending.clear();
        }
        if ended && pending.is_empty() {
            // Everything went out: the client's stream ends.
            live = None;
        }
        if ended && live.is_none() && !attachable {
            break;
        }
        tokio::select! {
            biased;
            _ = replay.closed.cancelled() => break,
            _ = &mut linger, if ended && live.is_none() => break,
            a = attach_rx.recv(), if attachable => {
                let Some(a) = a else {
                    attachable = false;
                    continue;
                };
                let kept = stream.map(|s| replay.after(s, a.after)).unwrap_or_default();
                let (tx, rx) = mpsc::channel(LIVE_CAPACITY);
                if a.reply.send(rx).is_ok() {
                    // A connection still open for this stream ends here.
                    live = Some(tx);
                    live_has_id = true;
                    pending = kept;
                    close_wanted = None;
                    if let Some(l) = &link {
                        l.client_resumed();
                    }
                }
            }
            wait = next_close(&mut closes), if !ended => close_wanted = Some(wait),
            sent = deliver(&live, pending.front()) => {
                if sent {
                    if pending.pop_front().is_some_and(|e| e.event_id.is_some()) {
                        live_has_id = true;
                    }
                } else {
                    // The client went away; what it missed is kept for its return.
                    live = None;
                    pending.clear();
                }
            }
            event = inner.next(), if !ended && (live.is_none() || pending.is_empty()) => match event {
                Some(event) => {
                    if let Some((index, s)) = event.event_id.as_deref().and_then(request_event_id) {
                        if stream.is_none() {
                            stream = Some(s);
                            if let Some(tx) = attach_tx.take() {
                                replay.register(s, tx);
                            }
                        }
                        if stream == Some(s) {
                            replay.record(s, index, &event);
                        }
                    }
                    if live.is_some() {
                        pending.push_back(event);
                    }
                }
                None => {
                    ended = true;
                    // The rest is on its way: no reason left to end the connection early.
                    close_wanted = None;
                    linger.as_mut().reset(tokio::time::Instant::now() + REPLAY_LINGER);
                    match stream {
                        Some(s) => replay.ended(s),
                        // Never had an id: nothing to come back to.
                        None => attachable = false,
                    }
                }
            },
        }
    }
    if let Some(s) = stream {
        replay.remove(s);
    }
}

/// The next upstream close's advised wait; never, without a link.
async fn next_close(closes: &mut Option<watch::Receiver<(u64, Duration)>>) -> Duration {
    if let Some(rx) = closes
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().1;
    }
    std::future::pending().await
}

/// Send `next` to the connected client: false if it went away; never resolves with nothing to send.
fn deliver(
    live: &Option<mpsc::Sender<ServerSseMessage>>,
    next: Option<&ServerSseMessage>,
) -> impl Future<Output = bool> + use<> {
    let job = live.clone().zip(next.cloned());
    async move {
        match job {
            Some((tx, event)) => tx.send(event).await.is_ok(),
            None => std::future::pending().await,
        }
    }
}

/// What one connection may hold, and how many there may be: the limits that keep a slow or
/// idle client from tying up the listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this. hyper starts the clock when it begins waiting
    /// for a request, so an idle keep-alive connection is closed after it too.
    pub header_read_timeout: std::time::Duration,
    /// Connections served at once. At the cap the listener stops accepting: new connections wait
    /// in the kernel's backlog (costing no task or buffer) until one closes.
    pub max_connections: usize,
}

impl ConnectionLimits {
    pub fn of(cfg: &crate::config::BrokerConfig) -> Self {
        ConnectionLimits {
            header_read_timeout: cfg.header_read_timeout,
            max_connections: cfg.max_connections,
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
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()));
        let conn = connections.watch(conn);
        tokio::spawn(async move {
            // A client that goes away, or a header timeout: nothing to report.
            let _ = conn.await;
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

/// Lists and calls go on to rmcp under a private method, so the front can answer them with the
/// upstreams' raw JSON (see `relay`). The innermost layer: the step-up check sees the original
/// request.
async fn relay_rename(State(rules): State<BodyRules>, req: Request, next: Next) -> Response {
    if req.uri().path() != MCP_PATH || req.method() != Method::POST {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let bytes = match rules.read(body).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let body = match super::relay::rename_request(&bytes, &mut parts.headers) {
        Some(renamed) => Body::from(renamed),
        None => Body::from(bytes),
    };
    next.run(Request::from_parts(parts, body)).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{CustomResult, NumberOrString, ServerResult};

    fn event(stream: u64, index: usize, text: &str) -> ServerSseMessage {
        let msg = ServerJsonRpcMessage::response(
            ServerResult::CustomResult(CustomResult(serde_json::json!(text))),
            NumberOrString::Number(index as i64),
        );
        ServerSseMessage::new(format!("{index}/{stream}"), msg)
    }

    fn registered(streams: &[u64]) -> (Replay, Vec<mpsc::Receiver<Attach>>) {
        let r = Replay::default();
        let rxs = streams
            .iter()
            .map(|s| {
                let (tx, rx) = mpsc::channel(1);
                r.register(*s, tx);
                rx
            })
            .collect();
        (r, rxs)
    }

    fn indices(r: &Replay, stream: u64) -> Vec<usize> {
        r.after(stream, 0)
            .iter()
            .filter_map(|e| e.event_id.as_deref().and_then(request_event_id))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn only_clients_of_2025_11_25_or_later_have_their_streams_ended_early() {
        let ext = |version: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(v) = version {
                b = b.header("mcp-protocol-version", v);
            }
            let mut ext = rmcp::model::Extensions::new();
            if let Ok(req) = b.body(()) {
                ext.insert(req.into_parts().0);
            }
            ext
        };
        assert!(client_polls(&ext(Some("2025-11-25"))));
        for older in [
            Some("2025-06-18"),
            Some("2025-03-26"),
            Some("2024-11-05"),
            None,
        ] {
            assert!(!client_polls(&ext(older)), "{older:?}");
        }
        assert!(!client_polls(&rmcp::model::Extensions::new()));
    }

    #[test]
    fn event_ids() {
        assert_eq!(request_event_id("3/7"), Some((3, 7)));
        for bad in ["3", "3/", "/7", "-1/7", "3/-7", "3/7/1", "a/b", ""] {
            assert_eq!(request_event_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replay_keeps_the_newest_events_within_the_count() {
        let (r, _rx) = registered(&[1]);
        for i in 0..REPLAY_MAX_EVENTS + 40 {
            r.record(1, i, &event(1, i, "x"));
        }
        let kept = indices(&r, 1);
        assert_eq!(kept.len(), REPLAY_MAX_EVENTS);
        assert_eq!(kept.first(), Some(&40));
        assert_eq!(r.state().order.len(), REPLAY_MAX_EVENTS);
    }

    #[test]
    fn replay_keeps_within_the_bytes_across_streams_oldest_first() {
        let (r, _rx) = registered(&[1, 2]);
        // Four of these are just over the bound.
        let big = "y".repeat(REPLAY_MAX_BYTES / 4);
        r.record(1, 1, &event(1, 1, &big));
        r.record(2, 1, &event(2, 1, &big));
        r.record(1, 2, &event(1, 2, &big));
        r.record(2, 2, &event(2, 2, &big));
        assert!(r.state().bytes <= REPLAY_MAX_BYTES);
        assert_eq!(
            indices(&r, 1),
            vec![2],
            "stream 1's oldest event went first"
        );
        assert_eq!(indices(&r, 2), vec![1, 2]);
        // An event larger than the whole buffer is not kept (and evicts nothing).
        r.record(1, 3, &event(1, 3, &"z".repeat(REPLAY_MAX_BYTES + 1)));
        assert_eq!(indices(&r, 1), vec![2]);
        r.remove(1);
        r.remove(2);
        let st = r.state();
        assert!(st.streams.is_empty() && st.order.is_empty() && st.bytes == 0);
    }

    #[test]
    fn events_of_unregistered_streams_are_not_kept() {
        let (r, _rx) = registered(&[1]);
        r.record(9, 1, &event(9, 1, "x"));
        assert!(r.after(9, 0).is_empty());
        assert_eq!(r.state().bytes, 0);
    }

    async fn resume(replay: &Replay, stream: u64, after: usize) -> Option<Vec<ServerSseMessage>> {
        let attach = replay.attach_to(stream)?;
        let (reply, rx) = oneshot::channel();
        attach.send(Attach { after, reply }).await.ok()?;
        let rx = rx.await.ok()?;
        Some(ReceiverStream::new(rx).collect().await)
    }

    #[tokio::test]
    async fn a_response_produced_while_the_client_is_away_is_replayed_then_freed() {
        let replay = Arc::new(Replay::default());
        let (up, inner) = mpsc::channel(4);
        let (first, mut client) = mpsc::channel(LIVE_CAPACITY);
        let task = tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            None,
            None,
        ));
        up.send(event(5, 0, "priming")).await.ok();
        assert!(client.recv().await.is_some());
        drop(client); // the client goes away
        up.send(event(5, 1, "progress")).await.ok();
        up.send(event(5, 2, "result")).await.ok();
        drop(up); // the response went out: rmcp ends the stream
        tokio::time::timeout(Duration::from_secs(5), async {
            while indices(&replay, 5) != vec![1, 2] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .ok();
        let got = resume(&replay, 5, 0).await.unwrap_or_default();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            resume(&replay, 5, 1).await.map(|v| v.len()),
            Some(1),
            "after the progress: just the result"
        );
        assert!(resume(&replay, 6, 0).await.is_none(), "no such stream");
        // The session closes: the stream's events go.
        replay.closed.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(replay.attach_to(5).is_none());
        assert_eq!(replay.state().bytes, 0);
    }

    #[tokio::test]
    async fn a_finished_stream_whose_events_were_evicted_stops_lingering() {
        let replay = Arc::new(Replay::default());
        let (up, inner) = mpsc::channel(4);
        let (first, client) = mpsc::channel(LIVE_CAPACITY);
        drop(client);
        let task = tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            None,
            None,
        ));
        up.send(event(3, 0, "priming")).await.ok();
        up.send(event(3, 1, "result")).await.ok();
        drop(up);
        let finished = tokio::time::timeout(Duration::from_secs(5), async {
            while !replay.state().streams.get(&3).is_some_and(|s| s.ended) {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(finished.is_ok(), "the stream is kept, ended");
        // Another stream's events push all of stream 3's out.
        let (tx, _rx) = mpsc::channel(1);
        replay.register(4, tx);
        for i in 0..REPLAY_MAX_EVENTS {
            replay.record(4, i, &event(4, i, "x"));
        }
        assert!(replay.attach_to(3).is_none());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_ok(),
            "its task ends well before REPLAY_LINGER"
        );
    }

    #[tokio::test]
    async fn an_upstream_close_ends_the_connection_after_an_id_and_a_resume_is_signalled() {
        let replay = Arc::new(Replay::default());
        let link = StreamLink::default();
        let closes = link.closes();
        let (up, inner) = mpsc::channel(4);
        let (first, mut client) = mpsc::channel(LIVE_CAPACITY);
        tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            Some(closes),
            Some(link.clone()),
        ));
        up.send(event(0, 0, "priming")).await.ok();
        assert!(client.recv().await.is_some_and(|e| e.event_id.is_some()));
        // What the upstream leg does when the upstream ends its stream early.
        let mut resumed = link_resumes(&link);
        link_close(&link, Duration::from_millis(1500));
        let closing = client.recv().await;
        assert_eq!(
            closing.and_then(|e| e.retry),
            Some(Duration::from_millis(1500))
        );
        assert!(client.recv().await.is_none(), "the client's stream ended");
        let attach = replay.attach_to(0);
        assert!(attach.is_some());
        let (reply, rx) = oneshot::channel();
        if let Some(a) = attach {
            a.send(Attach { after: 0, reply }).await.ok();
        }
        let mut again = rx.await.ok();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), resumed.changed())
                .await
                .is_ok(),
            "the upstream leg hears of the client's return"
        );
        up.send(event(0, 1, "result")).await.ok();
        let got = match again.as_mut() {
            Some(rx) => rx.recv().await,
            None => None,
        };
        assert_eq!(got.and_then(|e| e.event_id), Some("1/0".to_string()));
    }

    fn link_resumes(link: &StreamLink) -> watch::Receiver<u64> {
        link.resumes()
    }

    fn link_close(link: &StreamLink, wait: Duration) {
        link.upstream_closed(wait);
    }
}
