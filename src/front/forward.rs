//! `[cluster]`: a request that continues something only one instance holds is passed to it.
//!
//! Two things live on one instance and cannot be rebuilt elsewhere: a 2026-07-28 call parked while
//! its 2025-era upstream waits for the client's input (its sealed `requestState` starts with the
//! instance's tag, `TAG~…`), and a call's SSE stream kept for `Last-Event-ID` (its event ids start
//! with `TAG:`). The instance a balancer gives such a request to sends it, sealed with the cluster
//! key (it carries the caller's token), to the instance named by the tag through Redis; that one
//! serves it through its whole front — authentication included — and streams the answer back in
//! order. A client that goes away cancels it there; an instance that is gone answers nothing, and
//! the client is told so.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::{
    Router,
    body::{Body, Bytes},
    response::Response,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use dashmap::DashMap;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, ClusterError, Forwarded, ReplyPart, Wire};

/// How long the answer's head may take (a forwarded call answered as JSON sends its head only
/// with its result).
const HEAD_WAIT: Duration = Duration::from_secs(300);
/// Parts of one answer waiting for the client; a client slower than this loses the stream.
const QUEUE: usize = 256;
/// Bytes of an answer per message.
const CHUNK: usize = 256 * 1024;
/// Requests forwarded to this instance served at once; more are refused (answered 503).
const MAX_SERVING: usize = 1024;
/// Headers that describe one connection, not the request or answer.
const HOP_BY_HOP: [&str; 5] = [
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
    "upgrade",
];

pub(super) struct Forwarder {
    pub cluster: Arc<Cluster>,
    /// Requests this instance forwarded, waiting for their answers: id → where the parts go.
    waiting: DashMap<u64, mpsc::Sender<ReplyPart>>,
    next: AtomicU64,
    /// Requests forwarded here, being served: (sender, id) → cancels it.
    serving: DashMap<(String, u64), CancellationToken>,
    /// The front's own router, set once it is built: forwarded requests go through all of it.
    pub app: OnceLock<Router>,
}

impl Forwarder {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self {
            cluster,
            waiting: DashMap::new(),
            next: AtomicU64::new(1),
            serving: DashMap::new(),
            app: OnceLock::new(),
        }
    }

    /// The instance a 2026-07-28 request's `requestState` names, if another one.
    pub fn parked_elsewhere(&self, body: &[u8]) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Req<'a> {
            #[serde(borrow)]
            params: Option<Params<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(rename = "requestState", borrow)]
            request_state: Option<std::borrow::Cow<'a, str>>,
        }
        if !contains(body, b"requestState") {
            return None;
        }
        let state = serde_json::from_slice::<Req>(body)
            .ok()?
            .params?
            .request_state?;
        let (tag, _) = split_tag(&state, '~')?;
        (tag != self.cluster.tag).then(|| tag.to_string())
    }

    /// The instance a `Last-Event-ID` names, if another one.
    pub fn stream_elsewhere(&self, headers: &http::HeaderMap) -> Option<String> {
        let id = headers.get("last-event-id")?.to_str().ok()?;
        let (tag, _) = split_tag(id, ':')?;
        (tag != self.cluster.tag).then(|| tag.to_string())
    }

    /// Send the request to instance `tag` and answer with what it answers.
    pub async fn forward(
        self: &Arc<Self>,
        tag: &str,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Response {
        let rid = self.next.fetch_add(1, Ordering::Relaxed);
        let request = Forwarded {
            method: parts.method.to_string(),
            headers: parts
                .headers
                .iter()
                .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            body: B64.encode(&body),
        };
        let Ok(plain) = serde_json::to_vec(&request) else {
            return plain_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the request",
            );
        };
        let Ok(sealed) = self.cluster.sealer.seal(aad(tag, rid).as_bytes(), &plain) else {
            return plain_response(StatusCode::INTERNAL_SERVER_ERROR, "cannot seal the request");
        };
        let (tx, mut rx) = mpsc::channel(QUEUE);
        self.waiting.insert(rid, tx);
        let mut guard = Waiting {
            forwarder: self.clone(),
            tag: tag.to_string(),
            rid,
            done: false,
        };
        let wire = Wire::Forward {
            from: self.cluster.tag.clone(),
            rid,
            request: sealed,
        };
        match self.cluster.to_instance(tag, &wire).await {
            Ok(0) => {
                guard.done = true;
                return plain_response(
                    StatusCode::NOT_FOUND,
                    "mcp-broker: the broker instance holding what this request continues is gone; start the request again (without its requestState or Last-Event-ID)",
                );
            }
            Ok(_) => {}
            Err(ClusterError::TooLarge(_)) => {
                guard.done = true;
                return plain_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "mcp-broker: this request is too large to pass to the broker instance holding what it continues",
                );
            }
            Err(e) => {
                guard.done = true;
                tracing::warn!(error = %e, "cluster: cannot forward a request");
                return plain_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "mcp-broker: the cluster store (Redis) is unreachable; retry shortly",
                );
            }
        }
        let (status, headers) = match tokio::time::timeout(HEAD_WAIT, rx.recv()).await {
            Ok(Some(ReplyPart::Head { status, headers })) => (status, headers),
            _ => {
                return plain_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "mcp-broker: the broker instance holding what this request continues did not answer",
                );
            }
        };
        let body = async_stream(rx, guard);
        let mut resp = Response::new(Body::from_stream(body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
                resp.headers_mut().append(k, v);
            }
        }
        resp
    }

    /// A part of the answer to one of this instance's forwarded requests.
    pub fn reply(&self, rid: u64, part: ReplyPart) {
        let full = match self.waiting.get(&rid) {
            Some(tx) => tx.try_send(part).is_err(),
            None => return,
        };
        if full {
            // Its client does not keep up (or went away): the answer stops here.
            self.waiting.remove(&rid);
        }
    }

    pub fn cancel(&self, from: &str, rid: u64) {
        if let Some((_, ct)) = self.serving.remove(&(from.to_string(), rid)) {
            ct.cancel();
        }
    }

    /// Serve a request `from` forwarded here, and send the answer back part by part.
    pub async fn serve(self: Arc<Self>, from: String, rid: u64, sealed: String) {
        let Some(app) = self.app.get().cloned() else {
            return;
        };
        let Ok(plain) = self
            .cluster
            .sealer
            .open(aad(&self.cluster.tag, rid).as_bytes(), &sealed)
        else {
            tracing::warn!("cluster: a forwarded request did not open (another secret_key?)");
            return;
        };
        let Ok(fw) = serde_json::from_slice::<Forwarded>(&plain) else {
            return;
        };
        let send = |part: ReplyPart| {
            let (c, from) = (self.cluster.clone(), from.clone());
            async move { c.to_instance(&from, &Wire::Reply { rid, part }).await }
        };
        if self.serving.len() >= MAX_SERVING {
            let _ = send(ReplyPart::Head {
                status: 503,
                headers: vec![],
            })
            .await;
            let _ = send(ReplyPart::End).await;
            return;
        }
        let ct = CancellationToken::new();
        self.serving.insert((from.clone(), rid), ct.clone());
        let mut req = http::Request::builder()
            .method(fw.method.as_str())
            .uri(super::http::MCP_PATH);
        for (k, v) in &fw.headers {
            req = req.header(k, v);
        }
        let body = B64.decode(fw.body.as_bytes()).unwrap_or_default();
        let Ok(req) = req.body(Body::from(body)) else {
            self.serving.remove(&(from.clone(), rid));
            return;
        };
        let served = async {
            use tower::ServiceExt;
            let Ok(resp) = app.oneshot(req).await;
            let head = ReplyPart::Head {
                status: resp.status().as_u16(),
                headers: resp
                    .headers()
                    .iter()
                    .filter(|(k, _)| !HOP_BY_HOP.contains(&k.as_str()))
                    .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                    .collect(),
            };
            if send(head).await.is_err() {
                return;
            }
            let mut body = resp.into_body().into_data_stream();
            while let Some(Ok(chunk)) = body.next().await {
                // In pieces a cluster message can carry (base64 makes them a third larger).
                for piece in chunk.chunks(CHUNK) {
                    let part = ReplyPart::Chunk {
                        data: B64.encode(piece),
                    };
                    if send(part).await.is_err() {
                        return;
                    }
                }
            }
            let _ = send(ReplyPart::End).await;
        };
        tokio::select! {
            _ = served => {}
            _ = ct.cancelled() => {}
        }
        self.serving.remove(&(from, rid));
    }
}

/// What a forwarded request is bound to when sealed: the instance it is for and its id.
fn aad(tag: &str, rid: u64) -> String {
    format!("forward:{tag}:{rid}")
}

/// `TAG{sep}rest` where TAG is an instance tag (8 lower-case hex digits).
pub(super) fn split_tag(s: &str, sep: char) -> Option<(&str, &str)> {
    let (tag, rest) = s.split_once(sep)?;
    (tag.len() == 8
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some((tag, rest))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A forwarded request still waiting for (the rest of) its answer; dropped when the client goes
/// away or the answer ended. Tells the serving instance to stop if the answer had not ended.
struct Waiting {
    forwarder: Arc<Forwarder>,
    tag: String,
    rid: u64,
    done: bool,
}

impl Waiting {
    /// The whole answer came: nothing to cancel.
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.forwarder.waiting.remove(&self.rid);
        if self.done {
            return;
        }
        let (f, tag, rid) = (
            self.forwarder.clone(),
            std::mem::take(&mut self.tag),
            self.rid,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let wire = Wire::ForwardCancel {
                    from: f.cluster.tag.clone(),
                    rid,
                };
                let _ = f.cluster.to_instance(&tag, &wire).await;
            });
        }
    }
}

/// The answer's body, from its parts; ends at `End` (or when the parts stop coming).
fn async_stream(
    rx: mpsc::Receiver<ReplyPart>,
    guard: Waiting,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::unfold((rx, guard), |(mut rx, mut guard)| async move {
        loop {
            match rx.recv().await? {
                ReplyPart::Chunk { data } => {
                    let bytes = B64.decode(data.as_bytes()).unwrap_or_default();
                    return Some((Ok(Bytes::from(bytes)), (rx, guard)));
                }
                ReplyPart::End => {
                    guard.finish();
                    return None;
                }
                ReplyPart::Head { .. } => continue,
            }
        }
    })
}

fn plain_response(status: StatusCode, message: &str) -> Response {
    let mut resp = Response::new(Body::from(format!("{message}\n")));
    *resp.status_mut() = status;
    resp
}
