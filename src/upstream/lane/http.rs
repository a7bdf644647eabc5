//! The lane over Streamable HTTP: one POST per call with the headers rmcp's worker used on its
//! latest POST, the reply read here (a JSON body, or an SSE stream resumed like rmcp's would be).

use futures::StreamExt;
use rmcp::RoleClient;
use rmcp::model::{CustomRequest, GetExtensions, JsonRpcMessage, RequestId, ServerJsonRpcMessage};
use rmcp::service::RxJsonRpcMessage;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Answer, Call, Envelope, LaneError, LaneOrigin};
use crate::upstream::ProgressRouter;
use crate::upstream::StreamLink;
use crate::upstream::http_client::{
    RawHttpClient, bounded_events, lane_stream, read_bounded, too_large,
};

pub struct HttpLane {
    client: RawHttpClient,
    /// Into rmcp's receive side (the connection's `ProgressTap`).
    inject: mpsc::Sender<RxJsonRpcMessage<RoleClient>>,
}

/// The `Mcp-Name` of a relayed call, if it can travel as a plain header value (else the call
/// takes rmcp's path, which Base64-wraps it).
/// Let an answered call's stream run to its end, so its connection goes back to the pool (a reply
/// body dropped before its end closes the connection: a new TCP connection per call). Servers end
/// the stream right after the response, so the end is usually already read; otherwise a short task
/// waits for it. Events after the response are not the call's business and are dropped.
fn drain(mut events: crate::upstream::http_client::Events) {
    use futures::FutureExt;
    for _ in 0..8 {
        match events.next().now_or_never() {
            Some(None) => return,
            Some(Some(_)) => continue,
            None => break,
        }
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN_WAIT, async { while events.next().await.is_some() {} })
            .await;
    });
}

/// How long an answered call's stream may take to end before its connection is given up.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn mcp_name(c: &CustomRequest) -> Option<&str> {
    let key = if c.method == "resources/read" {
        "uri"
    } else {
        "name"
    };
    let v = c.params.as_ref()?.get(key)?.as_str()?;
    let edge = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    let wrapped = v.starts_with("=?base64?") && v.ends_with("?=");
    let needs_base64 = edge(v.as_bytes().first())
        || edge(v.as_bytes().last())
        || v.bytes().any(|b| !(0x20..=0x7e).contains(&b))
        || wrapped;
    (!needs_base64).then_some(v)
}

fn transport(e: reqwest::Error) -> LaneError {
    match crate::upstream::redirect::refusal(&e) {
        Some(r) => LaneError::Transport(r.to_string()),
        None => LaneError::Transport(e.to_string()),
    }
}

impl HttpLane {
    pub fn new(client: RawHttpClient, inject: mpsc::Sender<RxJsonRpcMessage<RoleClient>>) -> Self {
        Self { client, inject }
    }

    pub(super) async fn request(
        &self,
        call: Call<'_>,
        router: &ProgressRouter,
        modern: bool,
    ) -> Result<Answer, LaneError> {
        let ctx = self.client.lane_context().ok_or_else(|| {
            LaneError::Transport("nothing was sent on this connection yet".into())
        })?;
        let mut req = self
            .client
            .inner
            .post(ctx.url.clone())
            .header(http::header::ACCEPT, "text/event-stream, application/json")
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(t) = &ctx.auth {
            req = req.bearer_auth(t);
        }
        for (k, v) in &ctx.headers {
            req = req.header(k, v);
        }
        if let Some(s) = &ctx.session_id {
            req = req.header("mcp-session-id", s.as_ref());
        }
        if let Some(tp) = call
            .request
            .extensions
            .get::<crate::telemetry::TraceParent>()
        {
            req = req.header("traceparent", tp.0.as_str());
        }
        if modern {
            // SEP-2243, as rmcp's worker sends them (`accepts` let through only plain names).
            req = req.header("mcp-method", call.method);
            if let Some(n) = mcp_name(call.request) {
                req = req.header("mcp-name", n);
            }
        }
        let resp = req.body(call.body).send().await.map_err(transport)?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND && ctx.session_id.is_some() {
            return Err(LaneError::SessionExpired);
        }
        if !status.is_success() {
            let body = read_bounded(resp, ctx.limits.max_error_response_size)
                .await
                .unwrap_or_default();
            // A JSON-RPC error in the body is the answer.
            let text = String::from_utf8_lossy(&body);
            if let Some(env) = Envelope::parse(&text)
                && env.error.is_some()
            {
                return Ok(env.answer());
            }
            return Err(LaneError::Transport(format!(
                "the upstream answered HTTP {status}"
            )));
        }
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if content_type.starts_with("text/event-stream") {
            let session = resp
                .headers()
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
                .map(std::sync::Arc::from)
                .or_else(|| ctx.session_id.clone());
            let link = call.request.extensions.get::<StreamLink>().cloned();
            let body = bounded_events(resp.bytes_stream(), ctx.limits.max_sse_event_size);
            let first = sse_stream::SseStream::from_bytes_stream(body).boxed();
            let mut events = lane_stream(
                &self.client,
                &ctx,
                session,
                link,
                first,
                RequestId::Number(call.id),
            );
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) => {
                        let Some(data) = ev.data.as_deref().filter(|d| !d.trim().is_empty()) else {
                            continue;
                        };
                        if let Some(a) = self.on_message(data, call.id, router).await {
                            drain(events);
                            return Ok(a);
                        }
                    }
                    Err(e) if too_large(&e) => {
                        return Err(LaneError::Transport(format!(
                            "an SSE event from the upstream exceeds {} bytes",
                            ctx.limits.max_sse_event_size
                        )));
                    }
                    Err(e) => {
                        return Err(LaneError::Transport(format!(
                            "the call's stream from the upstream failed: {e}"
                        )));
                    }
                }
            }
            return Err(LaneError::Transport(
                "the upstream ended the call's stream without a response".into(),
            ));
        }
        if content_type.starts_with("application/json") {
            let body = read_bounded(resp, ctx.limits.max_json_response_size)
                .await
                .map_err(|e| LaneError::Transport(e.to_string()))?;
            // Usually the response alone; some servers put notifications before it.
            let messages: Vec<&RawValue> = serde_json::Deserializer::from_slice(&body)
                .into_iter::<&RawValue>()
                .collect::<Result<_, _>>()
                .map_err(|e| LaneError::Transport(format!("unparsable JSON reply: {e}")))?;
            for m in messages {
                if let Some(a) = self.on_message(m.get(), call.id, router).await {
                    return Ok(a);
                }
            }
            return Err(LaneError::Transport(
                "the upstream's JSON reply holds no response".into(),
            ));
        }
        Err(LaneError::Transport(format!(
            "unexpected content type {content_type:?} from the upstream"
        )))
    }

    /// One message on lane call `id`'s reply: its response (returned), its progress (to `router`,
    /// now, in wire order), or anything else, which goes to rmcp as if its transport had read it.
    async fn on_message(&self, text: &str, id: i64, router: &ProgressRouter) -> Option<Answer> {
        let Some(env) = Envelope::parse(text) else {
            tracing::warn!("unparsable message from the upstream on a call's stream");
            return None;
        };
        match env.answers() {
            Some(n) if n == id => return Some(env.answer()),
            // Another lane call's (it ended): nobody waits for it.
            Some(_) => return None,
            None => {}
        }
        if let Some(p) = env.lane_progress() {
            router.deliver_routed(&p);
            return None;
        }
        match serde_json::from_str::<ServerJsonRpcMessage>(text) {
            Ok(mut m) => {
                if let JsonRpcMessage::Request(r) = &mut m {
                    // Which call's stream carried it: the broker routes it to that call's client.
                    r.request
                        .extensions_mut()
                        .insert(LaneOrigin(RequestId::Number(id)));
                }
                let _ = self.inject.send(m).await;
            }
            Err(e) => tracing::warn!(error = %e, "unparsable message from the upstream"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::HeaderMap;
    use rmcp::model::{NumberOrString, ProgressToken, ServerRequest};
    use rmcp::transport::streamable_http_client::StreamableHttpResponseLimits;

    use super::super::{Lane, LaneKind, next_id};
    use super::*;

    /// How the stand-in upstream answers a lane call.
    #[derive(Clone, Copy)]
    enum Reply {
        /// SSE: progress, a server-to-client request, a log, then the response.
        Events,
        /// SSE: one event over the bound.
        Huge,
        /// SSE: a priming event, then the stream closes; the response comes on the GET.
        CloseThenResume,
        /// JSON: a JSON-RPC error.
        Error,
        /// HTTP 404 (its session is gone).
        Gone,
        /// SSE: the response, then the stream ends a little later (as rmcp's server does).
        LateEnd,
    }

    const RESULT: &str = r#"{"zeta":1,"execution":{"taskSupport":"optional"},"alpha":[2]}"#;

    fn sse(events: Vec<String>) -> axum::response::Response {
        axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(events.concat()))
            .unwrap_or_default()
    }

    /// Counts the TCP connections the stand-in upstream accepts.
    struct Counting(tokio::net::TcpListener, Arc<std::sync::atomic::AtomicUsize>);

    impl axum::serve::Listener for Counting {
        type Io = tokio::net::TcpStream;
        type Addr = std::net::SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                if let Ok(c) = self.0.accept().await {
                    self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return c;
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.0.local_addr()
        }
    }

    /// Serve `reply`; returns the URL and the headers of each request seen.
    async fn upstream(reply: Reply) -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
        let (url, seen, _) = upstream_counting(reply).await;
        (url, seen)
    }

    /// As [`upstream`], with the count of connections accepted.
    async fn upstream_counting(
        reply: Reply,
    ) -> (
        String,
        Arc<Mutex<Vec<HeaderMap>>>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use axum::routing::post;
        let seen: Arc<Mutex<Vec<HeaderMap>>> = Arc::default();
        let (on_post, on_get) = (seen.clone(), seen.clone());
        // The call's id, for the resumed stream to answer.
        let last: Arc<std::sync::atomic::AtomicI64> = Arc::default();
        let posted = last.clone();
        let app = axum::Router::new().route(
            "/mcp",
            post(move |headers: HeaderMap, body: String| async move {
                if let Ok(mut s) = on_post.lock() {
                    s.push(headers);
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let id = v["id"].as_i64().unwrap_or_default();
                posted.store(id, std::sync::atomic::Ordering::Relaxed);
                let token = v["params"]["_meta"]["progressToken"].as_i64().unwrap_or_default();
                match reply {
                    Reply::Events => sse(vec![
                        format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":{token},\"progress\":1}}}}\n\n"),
                        "data: {\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"roots/list\"}\n\n".into(),
                        format!("data: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":{token},\"progress\":2}}}}\n\n"),
                        format!("data: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{RESULT}}}\n\n"),
                    ]),
                    Reply::Huge => sse(vec![format!("data: \"{}\"\n\n", "x".repeat(4096))]),
                    Reply::CloseThenResume => sse(vec!["id: p1\nretry: 50\ndata: \n\n".into()]),
                    Reply::Error => axum::response::Response::builder()
                        .header("content-type", "application/json")
                        .body(Body::from(format!(
                            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":-32602,\"message\":\"unknown tool\"}}}}"
                        )))
                        .unwrap_or_default(),
                    Reply::Gone => axum::response::Response::builder()
                        .status(404)
                        .body(Body::empty())
                        .unwrap_or_default(),
                    Reply::LateEnd => {
                        let event = format!("data: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{RESULT}}}\n\n");
                        let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(event)])
                            .chain(futures::stream::once(async {
                                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                                Ok(String::new())
                            }));
                        axum::response::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Body::from_stream(chunks))
                            .unwrap_or_default()
                    }
                }
            })
            .get(move |headers: HeaderMap| async move {
                if let Ok(mut s) = on_get.lock() {
                    s.push(headers);
                }
                let id = last.load(std::sync::atomic::Ordering::Relaxed);
                sse(vec![format!(
                    "id: r1\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{RESULT}}}\n\n"
                )])
            }),
        );
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("cannot listen on loopback");
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let accepted: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let counting = Counting(listener, accepted.clone());
        tokio::spawn(async move {
            let _ = axum::serve(counting, app).await;
        });
        (format!("http://{addr}/mcp"), seen, accepted)
    }

    /// A lane whose rmcp worker "POSTed" to `url` with a session and a custom header.
    fn lane(
        url: &str,
    ) -> (
        Lane,
        mpsc::Receiver<RxJsonRpcMessage<RoleClient>>,
        Arc<ProgressRouter>,
    ) {
        let client = RawHttpClient {
            inner: reqwest::Client::new(),
            discover_status: Default::default(),
            lane: Default::default(),
        };
        let mut headers = HashMap::new();
        headers.insert(
            http::HeaderName::from_static("x-api-key"),
            http::HeaderValue::from_static("k1"),
        );
        headers.insert(
            http::HeaderName::from_static("mcp-method"),
            http::HeaderValue::from_static("tools/list"),
        );
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = 1024;
        client.record(
            &Arc::from(url),
            &Some(Arc::from("s-1")),
            &None,
            &headers,
            limits,
        );
        let (tx, rx) = mpsc::channel(16);
        let router = Arc::new(ProgressRouter::default());
        let lane = Lane::new(
            LaneKind::Http(HttpLane::new(client, tx)),
            router.clone(),
            None,
        );
        (lane, rx, router)
    }

    fn call() -> CustomRequest {
        CustomRequest::new(
            "tools/call",
            Some(serde_json::json!({"name": "echo", "arguments": {}})),
        )
    }

    #[tokio::test]
    async fn calls_reuse_one_connection_when_the_stream_ends_after_the_response() {
        let (url, _, accepted) = upstream_counting(Reply::LateEnd).await;
        let (lane, _injected, _router) = lane(&url);
        for _ in 0..3 {
            let got = lane.request(next_id(), &call(), None).await;
            assert!(got.is_ok(), "{got:?}");
            // The stream's end comes 30 ms after the response; the drain waits for it.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "each call opened a new connection"
        );
    }

    #[tokio::test]
    async fn the_response_comes_back_raw_after_its_progress_and_the_rest_goes_to_rmcp() {
        let (url, seen) = upstream(Reply::Events).await;
        let (lane, mut injected, router) = lane(&url);
        let id = next_id();
        let mut progress = router.route(&ProgressToken(NumberOrString::Number(id)));
        let got = lane.request(id, &call(), None).await;
        let Ok(v) = got else {
            panic!("{got:?}");
        };
        assert_eq!(
            v.to_string(),
            RESULT,
            "every field, in the upstream's order"
        );
        // Both progress notifications were routed, in order, before the response was returned.
        assert_eq!(progress.try_recv().map(|p| p.progress).ok(), Some(1.0));
        assert_eq!(progress.try_recv().map(|p| p.progress).ok(), Some(2.0));
        // The server's request reached rmcp's side, tagged with the call whose stream carried it.
        let m = injected.try_recv();
        let Ok(JsonRpcMessage::Request(r)) = m else {
            panic!("not injected: {m:?}");
        };
        assert!(matches!(r.request, ServerRequest::ListRootsRequest(_)));
        let origin = r
            .request
            .extensions()
            .get::<LaneOrigin>()
            .map(|o| o.0.clone());
        assert_eq!(origin, Some(RequestId::Number(id)));
        // The POST carried the connection's session and headers, not the last request's own.
        let h = seen.lock().map(|s| s[0].clone()).unwrap_or_default();
        assert_eq!(
            h.get("mcp-session-id").and_then(|v| v.to_str().ok()),
            Some("s-1")
        );
        assert_eq!(h.get("x-api-key").and_then(|v| v.to_str().ok()), Some("k1"));
        assert!(
            h.get("mcp-method").is_none(),
            "legacy connection: no SEP-2243 headers"
        );
    }

    #[tokio::test]
    async fn an_error_answer_is_the_upstreams() {
        let (url, _) = upstream(Reply::Error).await;
        let (lane, _rx, _) = lane(&url);
        let got = lane.request(next_id(), &call(), None).await;
        assert!(
            matches!(&got, Err(LaneError::Rpc(e)) if e.code.0 == -32602 && e.message == "unknown tool"),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn an_oversized_event_is_refused() {
        let (url, _) = upstream(Reply::Huge).await;
        let (lane, _rx, _) = lane(&url);
        let got = lane.request(next_id(), &call(), None).await;
        assert!(
            matches!(&got, Err(LaneError::Transport(m)) if m.contains("exceeds 1024 bytes")),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn an_expired_session_is_reported() {
        let (url, _) = upstream(Reply::Gone).await;
        let (lane, _rx, _) = lane(&url);
        let got = lane.request(next_id(), &call(), None).await;
        assert!(matches!(got, Err(LaneError::SessionExpired)), "{got:?}");
    }

    #[tokio::test]
    async fn a_stream_closed_before_the_response_is_resumed() {
        let (url, seen) = upstream(Reply::CloseThenResume).await;
        let (lane, _rx, _) = lane(&url);
        let id = next_id();
        let got =
            tokio::time::timeout(Duration::from_secs(10), lane.request(id, &call(), None)).await;
        let Ok(Ok(v)) = got else {
            panic!("{got:?}");
        };
        assert_eq!(v.to_string(), RESULT);
        let get = seen
            .lock()
            .map(|s| s.get(1).cloned())
            .ok()
            .flatten()
            .unwrap_or_default();
        assert_eq!(
            get.get("last-event-id").and_then(|v| v.to_str().ok()),
            Some("p1")
        );
        assert_eq!(
            get.get("mcp-session-id").and_then(|v| v.to_str().ok()),
            Some("s-1")
        );
    }
}
