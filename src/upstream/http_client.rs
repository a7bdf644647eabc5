//! The Streamable HTTP client: rmcp's reqwest client, except that a custom request is POSTed here so
//! its result reaches rmcp raw ([`super::raw`]): a JSON reply is decoded here, an SSE reply's
//! response event is marked for the progress tap to unmark. Everything else (notifications,
//! responses, typed requests, the GET stream, DELETE) goes through rmcp's own implementation.
//!
//! **Resumption (SEP-1699 polling).** An upstream may end a call's SSE stream before the response
//! (after an event id) and expect the client to come back with `GET` + `Last-Event-ID` after the
//! `retry` it advised. The custom request's stream does that itself, so the resumed stream's
//! response is marked like the first one's (rmcp's own reconnect would hand it back unmarked). When
//! the call came from a downstream session that can resume too (a [`StreamLink`], see the HTTP
//! front), the upstream's close is passed on: the front ends its client's stream, advising the same
//! wait, and the broker goes back upstream when its client comes back (or when the wait is over,
//! whichever is first). The broker so never reconnects sooner than its own client does, and a
//! server that keeps a response only for a client that returns promptly still gets one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, GetExtensions, JsonRpcMessage, RequestId};
use rmcp::transport::streamable_http_client::{
    HttpStatusError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
    StreamableHttpResponseLimits,
};
use sse_stream::{Error as SseError, Sse};
use tokio::sync::watch;

use super::raw::{RawIds, mark};

/// How long to wait before resuming a stream the upstream closed without advising a `retry`
/// (rmcp's default first reconnect delay).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// Never sooner than this on the broker's own clock (`retry: 0` from a server that closes every
/// stream at once would otherwise be a busy loop); a returning client is followed at once.
const MIN_RETRY: Duration = Duration::from_millis(100);

/// The downstream side of one call's stream, lent by the HTTP front to the upstream request it
/// causes (in the request's extensions; see [`StreamLink::scope`]). Carries two signals: the
/// upstream closed the call's stream before its response (with the wait advised), and the
/// downstream client reconnected to the call's stream.
#[derive(Clone, Debug)]
pub struct StreamLink(Arc<Link>);

#[derive(Debug)]
struct Link {
    /// (how many times the upstream closed the stream, the wait it advised the last time)
    closed: watch::Sender<(u64, Duration)>,
    /// How many times the client reconnected.
    resumed: watch::Sender<u64>,
}

tokio::task_local! {
    static LINK: Option<StreamLink>;
}

impl Default for StreamLink {
    fn default() -> Self {
        StreamLink(Arc::new(Link {
            closed: watch::Sender::new((0, DEFAULT_RETRY)),
            resumed: watch::Sender::new(0),
        }))
    }
}

impl StreamLink {
    /// Upstream closes from now on: `changed()` resolves at each, the value holds the wait.
    pub fn closes(&self) -> watch::Receiver<(u64, Duration)> {
        self.0.closed.subscribe()
    }

    /// The client reconnected to the call's stream.
    pub fn client_resumed(&self) {
        self.0.resumed.send_modify(|n| *n += 1);
    }

    /// Client reconnections from now on (the upstream leg waits on these).
    pub(crate) fn resumes(&self) -> watch::Receiver<u64> {
        self.0.resumed.subscribe()
    }

    /// The upstream ended the call's stream before its response, advising `wait`.
    pub(crate) fn upstream_closed(&self, wait: Duration) {
        self.0.closed.send_modify(|(n, w)| {
            *n += 1;
            *w = wait;
        });
    }

    /// Run `f` (a broker call) with `link` attached to the custom requests it sends upstream.
    pub async fn scope<F: Future>(link: Option<StreamLink>, f: F) -> F::Output {
        LINK.scope(link, f).await
    }

    /// The link of the call being made, if any (inside [`StreamLink::scope`]).
    pub fn current() -> Option<StreamLink> {
        LINK.try_with(Clone::clone).ok().flatten()
    }
}

type HttpError = StreamableHttpError<reqwest::Error>;

#[derive(Clone)]
pub struct RawHttpClient {
    pub inner: reqwest::Client,
    /// The HTTP status of the last `server/discover` POST (0 before any): tells a legacy server
    /// (400, 404, 405: try `initialize`) from one refusing the credential (401, 403: don't).
    pub discover_status: Arc<std::sync::atomic::AtomicU16>,
    /// Where and how rmcp's worker POSTed last, for the lane to POST the same way.
    pub lane: LaneSlot,
}

/// What rmcp's worker sent on its latest POST (see [`super::lane`]): the connection's URI,
/// session, credentials and headers (`MCP-Protocol-Version` included), less the headers that
/// describe one request (SEP-2243 `Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`).
pub struct PostContext {
    pub url: reqwest::Url,
    pub uri: Arc<str>,
    pub session_id: Option<Arc<str>>,
    pub auth: Option<String>,
    pub headers: HashMap<HeaderName, HeaderValue>,
    pub limits: StreamableHttpResponseLimits,
}

pub type LaneSlot = Arc<std::sync::RwLock<Option<Arc<PostContext>>>>;

/// Is `name` a header that rmcp sets for one request only?
fn per_request(name: &HeaderName) -> bool {
    let n = name.as_str();
    n == "mcp-method" || n == "mcp-name" || n.starts_with("mcp-param-")
}

fn custom_request_id(message: &ClientJsonRpcMessage) -> Option<RequestId> {
    match message {
        JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::CustomRequest(_)) => {
            Some(r.id.clone())
        }
        _ => None,
    }
}

/// Requests POSTed by [`RawHttpClient`] itself: custom requests (raw results),
/// `subscriptions/listen` (whose stream may come as JSON lines) and `server/discover` (whose status
/// is kept).
fn posted_here(message: &ClientJsonRpcMessage) -> bool {
    match message {
        JsonRpcMessage::Request(r) => matches!(
            r.request,
            ClientRequest::CustomRequest(_)
                | ClientRequest::SubscriptionsListenRequest(_)
                | ClientRequest::DiscoverRequest(_)
        ),
        _ => false,
    }
}

/// The response body, failing once an SSE event (the bytes between blank lines) exceeds `max`, so
/// an upstream cannot make the broker buffer an endless event.
pub(super) fn bounded_events<S, B, E>(
    body: S,
    max: usize,
) -> impl futures::Stream<Item = Result<B, std::io::Error>> + Send + 'static
where
    S: futures::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut since = 0usize;
    let mut newline = false;
    body.map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        for &b in chunk.as_ref() {
            match b {
                b'\r' => {}
                b'\n' => {
                    if newline {
                        since = 0;
                    }
                    newline = true;
                }
                _ => {
                    newline = false;
                    since += 1;
                    if since > max {
                        return Err(std::io::Error::other(EventTooLarge(max)));
                    }
                }
            }
        }
        Ok(chunk)
    })
}

/// An SSE event over the bound: final (reading the stream again would meet it again).
#[derive(Debug)]
struct EventTooLarge(usize);

impl std::fmt::Display for EventTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an SSE event from the upstream exceeds {} bytes", self.0)
    }
}

impl std::error::Error for EventTooLarge {}

pub(super) fn too_large(e: &SseError) -> bool {
    matches!(e, SseError::Body(b) if b
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .is_some_and(|inner| inner.is::<EventTooLarge>()))
}

pub(super) async fn read_bounded(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > max {
            return Err(StreamableHttpError::ResponseBodyTooLarge { max_size: max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(super) type Events = BoxStream<'static, Result<Sse, SseError>>;

/// `events` with the response to custom request `id` (if any) marked for the progress tap.
fn marked(events: Events, id: Option<RequestId>) -> Events {
    let Some(id) = id else {
        return events;
    };
    events
        .map(move |ev| {
            ev.map(|mut ev| {
                if let Some(m) = ev.data.as_deref().and_then(|d| mark(d, &id)) {
                    ev.data = Some(m);
                }
                ev
            })
        })
        .boxed()
}

/// The `subscriptions/listen` request's id, if `message` is one.
fn listen_id(message: &ClientJsonRpcMessage) -> Option<RequestId> {
    match message {
        JsonRpcMessage::Request(r)
            if matches!(r.request, ClientRequest::SubscriptionsListenRequest(_)) =>
        {
            Some(r.id.clone())
        }
        _ => None,
    }
}

/// Notifications on a listen stream name their subscription by the listen request's id; some
/// servers send a numeric id back as text (`"5"` for `5`), which rmcp would not match to the
/// subscription. Such an id is given back its type.
fn with_listen(events: Events, id: Option<RequestId>) -> Events {
    match id {
        Some(id) => listen_events(events, id),
        None => events,
    }
}

fn listen_events(events: Events, id: RequestId) -> Events {
    const KEY: &str = "io.modelcontextprotocol/subscriptionId";
    let text = match &id {
        RequestId::Number(n) => n.to_string(),
        RequestId::String(_) => return events,
    };
    events
        .map(move |ev| {
            ev.map(|mut ev| {
                let fixed = ev.data.as_deref().and_then(|d| {
                    let mut v: serde_json::Value = serde_json::from_str(d).ok()?;
                    let sid = v.get_mut("params")?.get_mut("_meta")?.get_mut(KEY)?;
                    if sid.as_str() != Some(text.as_str()) {
                        return None;
                    }
                    *sid = serde_json::to_value(&id).ok()?;
                    serde_json::to_string(&v).ok()
                });
                if let Some(f) = fixed {
                    ev.data = Some(f);
                }
                ev
            })
        })
        .boxed()
}

/// A body of JSON messages one after another (newline-delimited, or pretty-printed), as events:
/// some 2026-07-28 servers answer long-lived requests (`subscriptions/listen`) and calls with
/// notifications this way under `application/json`. Each message becomes an event as soon as it is
/// complete; the body's own bound (`bounded_events`) limits what one message may buffer.
fn json_lines<S, B>(body: S) -> Events
where
    S: futures::Stream<Item = Result<B, std::io::Error>> + Send + 'static,
    B: AsRef<[u8]>,
{
    let mut buf: Vec<u8> = Vec::new();
    let flush = |buf: &mut Vec<u8>, out: &mut Vec<Result<Sse, SseError>>| {
        let text = String::from_utf8_lossy(buf).trim().to_string();
        buf.clear();
        if !text.is_empty() {
            out.push(Ok(Sse {
                data: Some(text),
                ..Default::default()
            }));
        }
    };
    let events = body.flat_map(move |chunk| {
        let mut out = Vec::new();
        match chunk {
            Ok(chunk) => {
                for &b in chunk.as_ref() {
                    buf.push(b);
                    // A line ends a message once what is buffered parses as one.
                    if b == b'\n' && serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok() {
                        flush(&mut buf, &mut out);
                    }
                }
                if serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok() {
                    flush(&mut buf, &mut out);
                }
            }
            Err(e) => out.push(Err(SseError::Body(Box::new(e)))),
        }
        futures::stream::iter(out)
    });
    events.boxed()
}

impl RawHttpClient {
    /// Keep what this POST carries for the lane (see [`PostContext`]).
    pub(super) fn record(
        &self,
        uri: &Arc<str>,
        session_id: &Option<Arc<str>>,
        auth: &Option<String>,
        headers: &HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) {
        let Ok(mut slot) = self.lane.write() else {
            return;
        };
        let url = match slot.as_ref().filter(|c| c.uri == *uri) {
            Some(c) => c.url.clone(),
            None => match reqwest::Url::parse(uri) {
                Ok(u) => u,
                Err(_) => return,
            },
        };
        *slot = Some(Arc::new(PostContext {
            url,
            uri: uri.clone(),
            session_id: session_id.clone(),
            auth: auth.clone(),
            headers: headers
                .iter()
                .filter(|(k, _)| !per_request(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            limits,
        }));
    }

    /// What the lane POSTs with, once rmcp has POSTed.
    pub fn lane_context(&self) -> Option<Arc<PostContext>> {
        self.lane.read().ok().and_then(|s| s.clone())
    }

    async fn post_custom(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_token: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let id = custom_request_id(&message);
        let listen = listen_id(&message);
        let link = match &message {
            JsonRpcMessage::Request(r) => r.request.extensions().get::<StreamLink>().cloned(),
            _ => None,
        };
        // Kept for resuming the reply's stream with the same credentials and headers.
        let (stream_session, stream_auth, stream_headers) = (
            session_id.clone(),
            auth_token.clone(),
            custom_headers.clone(),
        );
        let mut req = self
            .inner
            .post(uri.as_ref())
            .header(http::header::ACCEPT, "text/event-stream, application/json");
        if let Some(t) = auth_token {
            req = req.bearer_auth(t);
        }
        for (k, v) in custom_headers {
            req = req.header(k, v);
        }
        let had_session = session_id.is_some();
        if let Some(s) = session_id {
            req = req.header("mcp-session-id", s.as_ref());
        }
        let resp = req.json(&message).send().await?;
        let status = resp.status();
        if matches!(&message, JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::DiscoverRequest(_)))
        {
            self.discover_status
                .store(status.as_u16(), std::sync::atomic::Ordering::Relaxed);
        }
        if matches!(
            status,
            reqwest::StatusCode::ACCEPTED | reqwest::StatusCode::NO_CONTENT
        ) {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == reqwest::StatusCode::NOT_FOUND && had_session {
            return Err(StreamableHttpError::SessionExpired);
        }
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !status.is_success() {
            // As rmcp's client: 429 and 5xx keep their status (and Retry-After) unless a JSON-RPC
            // error in the body says more.
            let status_error = (status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error())
            .then(|| {
                let retry_after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                HttpStatusError::new(status.as_u16(), retry_after)
            });
            let body = read_bounded(resp, limits.max_error_response_size)
                .await
                .unwrap_or_default();
            // A JSON-RPC error in the body is the answer (passed on as the upstream's error).
            if let Ok(m @ JsonRpcMessage::Error(_)) =
                serde_json::from_slice::<rmcp::model::ServerJsonRpcMessage>(&body)
            {
                return Ok(StreamableHttpPostResponse::Json(m, session));
            }
            if let Some(e) = status_error {
                return Err(e.into());
            }
            return Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
            )));
        }
        match content_type.as_deref() {
            Some(ct) if ct.starts_with("text/event-stream") => {
                let body = bounded_events(resp.bytes_stream(), limits.max_sse_event_size);
                let first = sse_stream::SseStream::from_bytes_stream(body).boxed();
                let Some(id) = id else {
                    // Not a relayed call (subscriptions/listen, server/discover): no resuming here.
                    return Ok(StreamableHttpPostResponse::Sse(
                        with_listen(first, listen),
                        session,
                    ));
                };
                let call = CallStream {
                    client: self.clone(),
                    uri,
                    session_id: session
                        .as_deref()
                        .map(Arc::from)
                        .or_else(|| stream_session.clone()),
                    auth_token: stream_auth,
                    custom_headers: stream_headers,
                    max_event: limits.max_sse_event_size,
                    id: Some(id),
                    watch: None,
                    link,
                    current: first,
                    last_event_id: None,
                    retry: None,
                    answered: false,
                    broke: false,
                    failed: false,
                };
                Ok(StreamableHttpPostResponse::Sse(call.into_stream(), session))
            }
            Some(ct) if ct.starts_with("application/json") && listen.is_some() => {
                // A long-lived request (subscriptions/listen) answered as JSON lines.
                let body = bounded_events(resp.bytes_stream(), limits.max_sse_event_size);
                Ok(StreamableHttpPostResponse::Sse(
                    with_listen(json_lines(body), listen),
                    session,
                ))
            }
            Some(ct) if ct.starts_with("application/json") => {
                let body = read_bounded(resp, limits.max_json_response_size).await?;
                let text = std::str::from_utf8(&body).map_err(|e| {
                    StreamableHttpError::UnexpectedServerResponse(Cow::Owned(e.to_string()))
                })?;
                let ids = RawIds::default();
                ids.note(&message);
                match ids.decode(text) {
                    Ok(m) => Ok(StreamableHttpPostResponse::Json(m, session)),
                    // Several messages in one JSON body (notifications, then the response): read
                    // as the stream they are, instead of failing the connection.
                    Err(e) if e.is_syntax() && e.line() > 1 => {
                        let body = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
                        Ok(StreamableHttpPostResponse::Sse(
                            marked(json_lines(body), id),
                            session,
                        ))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            other => Err(StreamableHttpError::UnexpectedContentType(
                other.map(str::to_string),
            )),
        }
    }
}

/// The SSE reply to a custom request, resumed across the upstream's closes (see the module docs).
struct CallStream {
    client: RawHttpClient,
    uri: Arc<str>,
    session_id: Option<Arc<str>>,
    auth_token: Option<String>,
    custom_headers: HashMap<HeaderName, HeaderValue>,
    max_event: usize,
    /// The request's id: its response event is marked. `None` for the lane, which reads the
    /// events itself and stops at its response.
    id: Option<RequestId>,
    /// The lane's request id: its response ends the stream's need for resuming (not marked).
    watch: Option<RequestId>,
    link: Option<StreamLink>,
    current: BoxStream<'static, Result<Sse, SseError>>,
    last_event_id: Option<String>,
    /// The upstream's last advised reconnection delay.
    retry: Option<Duration>,
    /// The response (or an error for the request) went by: the stream is done with.
    answered: bool,
    /// The connection broke (and was reopened) since the last event.
    broke: bool,
    /// An error was passed on: rmcp's own reconnect takes over from here.
    failed: bool,
}

/// A lane call's SSE reply (`first`), resumed across the upstream's closes like a custom request's
/// (SEP-1699), with the same session, credentials and headers as the POST.
pub(super) fn lane_stream(
    client: &RawHttpClient,
    ctx: &PostContext,
    session_id: Option<Arc<str>>,
    link: Option<StreamLink>,
    first: Events,
    id: RequestId,
) -> Events {
    CallStream {
        client: client.clone(),
        uri: ctx.uri.clone(),
        session_id,
        auth_token: ctx.auth.clone(),
        custom_headers: ctx.headers.clone(),
        max_event: ctx.limits.max_sse_event_size,
        id: None,
        watch: Some(id),
        link,
        current: first,
        last_event_id: None,
        retry: None,
        answered: false,
        broke: false,
        failed: false,
    }
    .into_stream()
}

impl CallStream {
    fn into_stream(self) -> BoxStream<'static, Result<Sse, SseError>> {
        futures::stream::unfold(self, |mut s| async move {
            if s.failed {
                return None;
            }
            loop {
                match s.current.next().await {
                    Some(Ok(mut ev)) => {
                        s.broke = false;
                        if let Some(id) = &ev.id {
                            s.last_event_id = Some(id.clone());
                        }
                        if let Some(ms) = ev.retry {
                            s.retry = Some(Duration::from_millis(ms));
                        }
                        if let (Some(data), Some(id)) = (ev.data.as_deref(), &s.id) {
                            if let Some(marked) = mark(data, id) {
                                ev.data = Some(marked);
                                s.answered = true;
                            } else if answers(data, id) {
                                s.answered = true;
                            }
                        } else if let (Some(data), Some(id)) = (ev.data.as_deref(), &s.watch)
                            && answers(data, id)
                        {
                            s.answered = true;
                        }
                        return Some((Ok(ev), s));
                    }
                    Some(Err(e)) => {
                        // A broken connection before the response: reopened at once, as rmcp
                        // would (but keeping the response marked); failing again right away, the
                        // error is rmcp's to retry, with its backoff.
                        let resumable = !s.answered && !s.broke && !too_large(&e);
                        let Some(last) = s.last_event_id.clone().filter(|_| resumable) else {
                            s.failed = true;
                            return Some((Err(e), s));
                        };
                        tracing::debug!(error = %e, "a call's stream from the upstream broke; resuming");
                        s.broke = true;
                        if let Err(e) = s.reopen(last).await {
                            s.failed = true;
                            return Some((Err(e), s));
                        }
                    }
                    None => {
                        // Ended after the response, or before any event id (nothing to resume
                        // from: rmcp reports the stream's end).
                        let last = s.last_event_id.clone().filter(|_| !s.answered)?;
                        let wait = s.retry.unwrap_or(DEFAULT_RETRY);
                        tracing::debug!(
                            ?wait,
                            linked = s.link.is_some(),
                            "upstream closed a call's stream before its response; resuming"
                        );
                        wait_to_resume(s.link.clone(), wait).await;
                        if let Err(e) = s.reopen(last).await {
                            // rmcp's reconnect (with its backoff) retries from the same id.
                            s.failed = true;
                            return Some((Err(e), s));
                        }
                    }
                }
            }
        })
        .boxed()
    }

    /// GET the stream again from event `last` (`Last-Event-ID`).
    async fn reopen(&mut self, last: String) -> Result<(), SseError> {
        let stream = self
            .client
            .inner
            .get_stream_with_max_sse_event_size(
                self.uri.clone(),
                self.session_id.clone(),
                Some(last),
                self.auth_token.clone(),
                self.custom_headers.clone(),
                self.max_event,
            )
            .await
            .map_err(|e| SseError::Body(Box::new(explain(e))))?;
        self.current = stream;
        Ok(())
    }
}

/// Wait `wait` (the upstream's advice) or, when the front lent a link, until its client comes back,
/// whichever is first. The front is told first, so it can end its client's stream.
async fn wait_to_resume(link: Option<StreamLink>, wait: Duration) {
    let timer = tokio::time::sleep(wait.max(MIN_RETRY));
    let Some(link) = link else {
        timer.await;
        return;
    };
    let mut resumed = link.resumes();
    link.upstream_closed(wait);
    tokio::pin!(timer);
    tokio::select! {
        r = resumed.changed() => {
            if r.is_err() {
                timer.await;
            }
        }
        _ = &mut timer => {}
    }
}

/// Whether an SSE event's data is the response (result or error) to request `id`.
fn answers(data: &str, id: &RequestId) -> bool {
    #[derive(serde::Deserialize)]
    struct Peek {
        id: Option<RequestId>,
        result: Option<serde::de::IgnoredAny>,
        error: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_str::<Peek>(data)
        .is_ok_and(|p| p.id.as_ref() == Some(id) && (p.result.is_some() || p.error.is_some()))
}

/// A refused redirect's reason as the error: reqwest's own message does not say why, and rmcp shows
/// a client error by its message alone.
fn explain(e: HttpError) -> HttpError {
    match e {
        StreamableHttpError::Client(c) => match super::redirect::refusal(&c) {
            Some(r) => StreamableHttpError::UnexpectedServerResponse(Cow::Owned(r.to_string())),
            None => StreamableHttpError::Client(c),
        },
        other => other,
    }
}

impl StreamableHttpClient for RawHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = max_sse_event_size;
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            limits,
        )
        .await
    }

    // What rmcp's worker calls (since 3.11): every POST goes through here.
    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.record(&uri, &session_id, &auth_header, &custom_headers, limits);
        // Added after `record`: a trace context belongs to this request, not to the connection.
        let mut custom_headers = custom_headers;
        if let JsonRpcMessage::Request(r) = &message
            && let Some(tp) = r
                .request
                .extensions()
                .get::<crate::telemetry::TraceParent>()
            && let Ok(v) = HeaderValue::from_str(&tp.0)
        {
            custom_headers.insert(HeaderName::from_static("traceparent"), v);
        }
        let r = if posted_here(&message) {
            self.post_custom(
                uri,
                message,
                session_id,
                auth_header,
                custom_headers,
                limits,
            )
            .await
        } else {
            self.inner
                .post_message_with_response_limits(
                    uri,
                    message,
                    session_id,
                    auth_header,
                    custom_headers,
                    limits,
                )
                .await
        };
        r.map_err(explain)
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), HttpError> {
        self.inner
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
            .map_err(explain)
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        self.inner
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
            .map_err(explain)
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        self.inner
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
            .map_err(explain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::CustomRequest;
    use std::sync::Mutex;
    use std::time::Instant;

    /// [`super::super::raw::RAW_MARK`] as it reads inside an event's JSON text.
    const MARKED: &str = "\\u0001mcp-broker-raw\\u0001";

    /// How the stand-in upstream ends a call's POST stream after its first event.
    #[derive(Clone, Copy)]
    enum End {
        Close,
        Break,
    }

    /// An upstream that ends the POST stream early (advising `retry_ms`) and answers request 7 on a
    /// GET with `Last-Event-ID`; the ids it was resumed from are recorded.
    async fn upstream(end: End, retry_ms: u64) -> (String, Arc<Mutex<Vec<String>>>) {
        use axum::{body::Body, http::HeaderMap, routing::post};
        let resumed: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = resumed.clone();
        let app = axum::Router::new().route(
            "/mcp",
            post(move || async move {
                let first = format!("id: p1\nretry: {retry_ms}\ndata: \n\n");
                let mut chunks: Vec<Result<String, std::io::Error>> = vec![Ok(first)];
                if let End::Break = end {
                    chunks.push(Err(std::io::Error::other("connection lost")));
                }
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from_stream(futures::stream::iter(chunks).then(
                        |c| async move {
                            // Headers and the first event go out before the connection breaks.
                            if c.is_err() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            c
                        },
                    )))
                    .unwrap_or_default()
            })
            .get(move |headers: HeaderMap| async move {
                let last = headers
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                if let Ok(mut v) = seen.lock() {
                    v.push(last);
                }
                axum::response::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(Body::from(
                        "id: r1\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"z\":1,\"a\":2}}\n\n",
                    ))
                    .unwrap_or_default()
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await;
        let Ok(listener) = listener else {
            panic!("cannot listen on loopback");
        };
        let url = format!(
            "http://{}/mcp",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (url, resumed)
    }

    /// POST custom request 7 (with `link`) and collect its SSE events' data.
    async fn call(url: &str, link: Option<StreamLink>) -> Vec<String> {
        let mut req = CustomRequest::new("tools/call", None);
        if let Some(l) = link {
            req.extensions.insert(l);
        }
        let msg =
            ClientJsonRpcMessage::request(ClientRequest::CustomRequest(req), RequestId::Number(7));
        let client = RawHttpClient {
            inner: reqwest::Client::new(),
            discover_status: Default::default(),
            lane: Default::default(),
        };
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = 1 << 20;
        let resp = client
            .post_custom(Arc::from(url), msg, None, None, HashMap::new(), limits)
            .await;
        let Ok(StreamableHttpPostResponse::Sse(stream, _)) = resp else {
            panic!("not an SSE reply");
        };
        // rmcp stops reading at the response; so does this.
        let mut out = Vec::new();
        let mut stream = stream;
        while let Some(ev) = stream.next().await {
            let Ok(ev) = ev else {
                out.push("error".to_string());
                break;
            };
            let data = ev.data.unwrap_or_default();
            let done = data.contains(MARKED);
            out.push(data);
            if done {
                break;
            }
        }
        out
    }

    #[tokio::test]
    async fn a_closed_stream_is_resumed_after_the_retry_and_its_response_marked() {
        let (url, resumed) = upstream(End::Close, 300).await;
        let t = Instant::now();
        let got = call(&url, None).await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "the advised retry is waited"
        );
        assert_eq!(
            resumed.lock().map(|v| v.clone()).unwrap_or_default(),
            vec!["p1"]
        );
        let last = got.last().cloned().unwrap_or_default();
        assert!(last.contains(MARKED), "{got:?}");
    }

    #[tokio::test]
    async fn a_linked_call_is_resumed_when_the_client_comes_back() {
        let (url, resumed) = upstream(End::Close, 60_000).await;
        let link = StreamLink::default();
        let mut closes = link.closes();
        let front = link.clone();
        tokio::spawn(async move {
            if closes.changed().await.is_ok() {
                assert_eq!(closes.borrow().1, Duration::from_secs(60));
                front.client_resumed();
            }
        });
        let got = tokio::time::timeout(Duration::from_secs(10), call(&url, Some(link))).await;
        let got = got.unwrap_or_default();
        assert!(got.last().is_some_and(|d| d.contains(MARKED)), "{got:?}");
        assert_eq!(resumed.lock().map(|v| v.len()).unwrap_or_default(), 1);
    }

    #[tokio::test]
    async fn a_broken_stream_is_reopened_at_once() {
        let (url, resumed) = upstream(End::Break, 60_000).await;
        let got = tokio::time::timeout(Duration::from_secs(10), call(&url, None)).await;
        let got = got.unwrap_or_default();
        assert!(got.last().is_some_and(|d| d.contains(MARKED)), "{got:?}");
        assert_eq!(
            resumed.lock().map(|v| v.clone()).unwrap_or_default(),
            vec!["p1"]
        );
    }

    #[tokio::test]
    async fn an_oversized_event_is_final() {
        let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = vec![Ok(
            axum::body::Bytes::from_static(b"data: 123456789012345\n\n"),
        )];
        let mut s = sse_stream::SseStream::from_bytes_stream(bounded_events(
            futures::stream::iter(chunks),
            12,
        ));
        let e = s.next().await;
        assert!(matches!(&e, Some(Err(e)) if too_large(e)), "{e:?}");
    }

    #[tokio::test]
    async fn sse_events_are_bounded() {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(b"data: 12345\n\n".to_vec()),
            Ok(b"data: 1234".to_vec()),
            Ok(b"5\r\n\r\ndata: 123456789012345".to_vec()),
        ];
        let out: Vec<_> = bounded_events(futures::stream::iter(chunks), 12)
            .collect()
            .await;
        assert!(
            out[0].is_ok() && out[1].is_ok(),
            "events within the bound pass"
        );
        assert!(out[2].is_err(), "an event past the bound ends the stream");
    }
}
