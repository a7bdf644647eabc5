//! The direct lane: the common request of an established session answered without rmcp's server
//! machinery.
//!
//! rmcp's Streamable HTTP service decodes every message into its typed model, hands it to the
//! session's worker task, spawns a task per request, and sends the response back through channels
//! as an SSE stream. For a relayed call or a list from a 2025-era session that is all overhead: the
//! broker needs the JSON-RPC id, the method and the params, and the answer is one JSON object. So a
//! `POST` that is
//!
//! - `tools/call`, `prompts/get`, `resources/read` or one of the four lists (no cursor),
//! - on a session registered here whose client declared no `sampling`, `elicitation` or `roots`
//!   (nothing but the result can then belong on the call's stream: the broker answers an
//!   upstream's request for those itself), without a `progressToken`,
//! - accepting `application/json`,
//!
//! runs the broker's pipeline directly (the same [`relay_call`] / [`relay_list`] rmcp's handler
//! uses: policy, limits, audit, credentials unchanged) and is answered `application/json`, which
//! the transport allows for any request. Everything else goes to rmcp as before.
//!
//! Because such requests never reach rmcp's session worker, its idle timer would close a session
//! that is busy on the lane. So rmcp's keep-alive is off and idleness is kept here, for every
//! session: any request naming the session counts as activity, and a session idle for
//! `session_idle_timeout` is closed through the session manager by the sweeper.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use dashmap::DashMap;
use rmcp::model::{ErrorData, RequestId};
use rmcp::transport::streamable_http_server::SessionManager;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::mcp::{CallParams, relay_call, relay_list_items};
use crate::auth::Caller;
use crate::broker::{Broker, Downstream};
use crate::catalog::{Item, Kind};

/// Set by `Front::initialize` to the broker's id of the session it opened (or restored, under
/// `[cluster]`), and whether the lane may serve it (the client declared no sampling, elicitation or
/// roots). The request carries it in its extensions; the lane reads it once rmcp answered.
#[derive(Clone, Default)]
pub struct OpenedSession(pub Arc<OnceLock<(u64, bool)>>);

/// The sessions the HTTP front knows: their broker ids, whether the lane may serve them, and when
/// they were last used. One entry per session rmcp opened (registered from the `initialize`
/// response naming it), freed on `DELETE`, when the session idles out (the sweeper closes it), or
/// when the broker no longer has it (the sweeper's next pass).
pub struct Lanes {
    broker: Arc<Broker>,
    sessions: DashMap<Arc<str>, Entry>,
    /// The Host values rmcp accepts (names, or `name:port`).
    hosts: Vec<String>,
    /// Lists already serialised, per set of items shown (callers with the same view share one).
    lists: ListCache,
    epoch: Instant,
}

struct Entry {
    /// The broker's session (none when `initialize` failed to register one).
    id: Option<u64>,
    /// The client declared none of sampling, elicitation, roots.
    direct: bool,
    /// Milliseconds after `epoch` of the last request naming the session.
    seen: AtomicU64,
    /// Lane calls in flight, by JSON-RPC id, for `notifications/cancelled`: each entry lives as
    /// long as its HTTP request (removed on drop), so it holds at most the session's concurrent
    /// requests (bounded by the front's connection cap).
    inflight: Mutex<HashMap<RequestId, CancellationToken>>,
}

/// The parts of a JSON-RPC message the lane decides on; `params` stay raw until needed.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    jsonrpc: Option<Cow<'a, str>>,
    id: Option<RequestId>,
    #[serde(borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
}

impl Lanes {
    pub fn new(broker: Arc<Broker>, hosts: Vec<String>) -> Self {
        Self {
            broker,
            sessions: DashMap::new(),
            hosts,
            lists: ListCache::default(),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The request's `Host` is one rmcp's DNS-rebinding check accepts (a request without one,
    /// or with another, goes to rmcp, which decides).
    pub fn host_allowed(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|host| host_matches(&self.hosts, host))
    }

    /// A session was opened by `initialize`, or restored from another instance.
    pub fn register(&self, session: &str, id: Option<u64>, direct: bool) {
        self.sessions.insert(
            Arc::from(session),
            Entry {
                id,
                direct,
                seen: AtomicU64::new(self.now_ms()),
                inflight: Mutex::new(HashMap::new()),
            },
        );
    }

    /// A request named the session: it is not idle.
    pub fn touch(&self, session: &str) {
        if let Some(e) = self.sessions.get(session) {
            e.seen.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    pub fn forget(&self, session: &str) {
        self.sessions.remove(session);
    }

    /// Cancel a lane call on `notifications/cancelled` (the notification then goes on to rmcp,
    /// which ignores an id it does not know).
    fn cancel(&self, session: &str, params: Option<&RawValue>) {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Cancelled {
            request_id: RequestId,
        }
        let Some(p) = params.and_then(|p| serde_json::from_str::<Cancelled>(p.get()).ok()) else {
            return;
        };
        self.cancel_request(session, &p.request_id);
    }

    /// Cancel the lane call `request` of `session`, if one runs here.
    pub fn cancel_request(&self, session: &str, request: &RequestId) {
        if let Some(e) = self.sessions.get(session)
            && let Ok(map) = e.inflight.lock()
            && let Some(ct) = map.get(request)
        {
            ct.cancel();
        }
    }

    /// Whether the lane knows the session (opened or restored here).
    pub fn knows(&self, session: &str) -> bool {
        self.sessions.contains_key(session)
    }

    /// Serve `body` on the lane if it qualifies (see the module docs); `None` hands it to rmcp.
    pub async fn serve(
        &self,
        session: &str,
        headers: &HeaderMap,
        caller: &Caller,
        body: &[u8],
    ) -> Option<Response> {
        let env: Envelope = serde_json::from_slice(body).ok()?;
        if env.jsonrpc.as_deref() != Some("2.0") {
            return None;
        }
        let method = env.method.as_deref()?;
        let Some(id) = env.id else {
            if method == "notifications/cancelled" {
                self.cancel(session, env.params);
            }
            return None;
        };
        let (broker_id, direct) = {
            let e = self.sessions.get(session)?;
            (e.id?, e.direct)
        };
        if !direct || !accepts_json(headers) || !lane_version(headers) {
            return None;
        }
        let work = match method {
            "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" => {
                if env.params.is_some_and(has_cursor) {
                    return None;
                }
                Work::List(match method {
                    "tools/list" => Kind::Tool,
                    "prompts/list" => Kind::Prompt,
                    "resources/list" => Kind::Resource,
                    _ => Kind::Template,
                })
            }
            "tools/call" | "prompts/get" | "resources/read" => {
                // Params that do not decode get rmcp's own error answer.
                let p = CallParams::from_raw(method, env.params?.get())?;
                if p.progress_token().is_some() {
                    return None;
                }
                Work::Call(Box::new(p))
            }
            _ => return None,
        };
        let Some(peer) = self.broker.session_peer(broker_id) else {
            // Closed meanwhile: rmcp answers (404 for a session it no longer has).
            self.forget(session);
            return None;
        };
        let capabilities = peer.peer_info().map(|i| i.capabilities.clone());
        let down = Downstream {
            peer,
            request_id: id.clone(),
            progress_token: None,
            capabilities,
            stateless: false,
            session: Some(broker_id),
            asks: None,
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        };
        let ct = CancellationToken::new();
        let _inflight = Inflight::new(self, session, &id, &ct);
        Some(match work {
            Work::List(which) => {
                match relay_list_items(&self.broker, caller, down, ct, which).await {
                    Ok((items, _)) => {
                        list_response(&id, which.list_field(), self.lists.json(&items))
                    }
                    Err(e) => json_response(&id, Err(e)),
                }
            }
            Work::Call(p) => json_response(
                &id,
                relay_call(&self.broker, caller, down, ct, *p, false, None).await,
            ),
        })
    }

    /// Close sessions idle for `idle` (through `manager`, as rmcp's own keep-alive would) and forget
    /// ones the broker no longer has. Runs until `ct` is cancelled.
    pub async fn sweep<M: SessionManager>(
        self: Arc<Self>,
        manager: Arc<M>,
        idle: Duration,
        ct: CancellationToken,
    ) {
        let every = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let idle_ms = idle.as_millis() as u64;
        loop {
            tokio::select! {
                _ = ct.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let now = self.now_ms();
            let mut idle_ones = Vec::new();
            self.sessions.retain(|sid, e| {
                if now.saturating_sub(e.seen.load(Ordering::Relaxed)) >= idle_ms {
                    idle_ones.push(sid.clone());
                    return false;
                }
                e.id.is_none_or(|id| self.broker.session_peer(id).is_some())
            });
            for sid in idle_ones {
                tracing::debug!(session = %sid, "closing an idle session");
                let _ = manager.close_session(&sid).await;
            }
        }
    }
}

/// A list's items as JSON text, and the very items it was made from: the cache entry is used only
/// when the items shown now are the same ones (a catalog change makes new items, so nothing stale
/// is ever served, and holding them keeps their addresses from being reused).
struct CachedList {
    items: Vec<Item>,
    json: Bytes,
}

/// Serialised lists kept at most, and their bytes at most (beyond either, the cache starts
/// afresh: a stale entry holds a replaced catalog's items only until then).
const MAX_CACHED_LISTS: usize = 64;
const MAX_CACHED_BYTES: usize = 32 << 20;

/// Shared by every caller (an entry is a list of items some caller may see, served only to a
/// caller shown exactly those items); bounded by [`MAX_CACHED_LISTS`] and [`MAX_CACHED_BYTES`].
#[derive(Default)]
struct ListCache(Mutex<CachedLists>);

#[derive(Default)]
struct CachedLists {
    map: HashMap<u64, CachedList>,
    bytes: usize,
}

impl ListCache {
    /// `items` as a JSON array, serialised once per distinct list.
    fn json(&self, items: &[Item]) -> Bytes {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        items.len().hash(&mut h);
        for i in items {
            i.addr().hash(&mut h);
        }
        let key = h.finish();
        let mut lists = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = lists.map.get(&key)
            && c.items.len() == items.len()
            && c.items.iter().zip(items).all(|(a, b)| a.same(b))
        {
            return c.json.clone();
        }
        let json = Bytes::from(serde_json::to_vec(items).unwrap_or_else(|_| b"[]".to_vec()));
        if lists.map.len() >= MAX_CACHED_LISTS || lists.bytes + json.len() > MAX_CACHED_BYTES {
            lists.map.clear();
            lists.bytes = 0;
        }
        if json.len() <= MAX_CACHED_BYTES {
            lists.bytes += json.len();
            let old = lists.map.insert(
                key,
                CachedList {
                    items: items.to_vec(),
                    json: json.clone(),
                },
            );
            if let Some(old) = old {
                lists.bytes -= old.json.len();
            }
        }
        json
    }
}

enum Work {
    List(Kind),
    Call(Box<CallParams>),
}

/// Registers a lane call for cancellation while it runs.
struct Inflight<'a> {
    lanes: &'a Lanes,
    session: &'a str,
    id: &'a RequestId,
}

impl<'a> Inflight<'a> {
    fn new(lanes: &'a Lanes, session: &'a str, id: &'a RequestId, ct: &CancellationToken) -> Self {
        if let Some(e) = lanes.sessions.get(session)
            && let Ok(mut map) = e.inflight.lock()
        {
            map.insert(id.clone(), ct.clone());
        }
        Self { lanes, session, id }
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.lanes.sessions.get(self.session)
            && let Ok(mut map) = e.inflight.lock()
        {
            map.remove(self.id);
        }
    }
}

/// `host` (a Host header: name, `name:port`, `[v6]:port`) names one of `hosts` (names, or
/// `name:port` authorities).
fn host_matches(hosts: &[String], host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(name))
}

/// The request's `Accept` allows a JSON reply.
fn accepts_json(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                let t = t.split(';').next().unwrap_or("").trim();
                t.eq_ignore_ascii_case("application/json") || t == "*/*" || t == "application/*"
            })
        })
    })
}

/// The request's `MCP-Protocol-Version` is a 2025-era revision, or absent (2025-03-26 then). Any
/// other value goes to rmcp, which refuses an unsupported one (400) and checks a 2026-07-28
/// request's SEP-2243 headers.
fn lane_version(headers: &HeaderMap) -> bool {
    match headers.get("mcp-protocol-version") {
        None => true,
        Some(v) => v
            .to_str()
            .is_ok_and(|v| matches!(v, "2024-11-05" | "2025-03-26" | "2025-06-18" | "2025-11-25")),
    }
}

fn has_cursor(params: &RawValue) -> bool {
    #[derive(Deserialize)]
    struct P {
        cursor: Option<serde_json::Value>,
    }
    serde_json::from_str::<P>(params.get()).map_or(true, |p| p.cursor.is_some())
}

/// `{"jsonrpc":"2.0","id":…,"result":{"<field>":<items>}}`, the items already serialised (sent
/// from the cache as they are, not copied into a new body).
fn list_response(id: &RequestId, field: &str, items: Bytes) -> Response {
    let id = serde_json::to_string(id).unwrap_or_else(|_| "null".into());
    let field = serde_json::to_string(field).unwrap_or_else(|_| "\"items\"".into());
    let head = Bytes::from(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"result":{{{field}:"#
    ));
    let chunks = [head, items, Bytes::from_static(b"}}")];
    let body = Body::from_stream(futures::stream::iter(
        chunks.map(Ok::<_, std::convert::Infallible>),
    ));
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_body(body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `{"jsonrpc":"2.0","id":…,"result":…}` or `…"error":…}` as an `application/json` response.
fn json_response(id: &RequestId, result: Result<serde_json::Value, ErrorData>) -> Response {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        jsonrpc: &'static str,
        id: &'a RequestId,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<&'a serde_json::Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<&'a ErrorData>,
    }
    let (result, error) = match &result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e)),
    };
    let body = serde_json::to_vec(&Out {
        jsonrpc: "2.0",
        id,
        result,
        error,
    })
    .unwrap_or_default();
    json_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_and_version_headers() {
        let mut h = HeaderMap::new();
        assert!(!accepts_json(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream, application/json"),
        );
        assert!(accepts_json(&h));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        assert!(!accepts_json(&h));
        assert!(lane_version(&h));
        h.insert(
            "mcp-protocol-version",
            HeaderValue::from_static("2025-11-25"),
        );
        assert!(lane_version(&h));
        for refused in ["2026-07-28", "1999-01-01", ""] {
            h.insert("mcp-protocol-version", HeaderValue::from_static(refused));
            assert!(!lane_version(&h), "{refused}");
        }
    }

    #[test]
    fn hosts_as_rmcp_accepts_them() {
        let hosts: Vec<String> = ["localhost", "127.0.0.1", "::1", "mcp.example.com:443"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(host_matches(&hosts, "127.0.0.1:8080"));
        assert!(host_matches(&hosts, "[::1]:8080"));
        assert!(host_matches(&hosts, "localhost"));
        assert!(host_matches(&hosts, "mcp.example.com:443"));
        assert!(!host_matches(&hosts, "mcp.example.com:8443"));
        assert!(!host_matches(&hosts, "evil.example:8080"));
        assert!(!host_matches(&hosts, "localhost.evil.example"));
    }

    #[test]
    fn cursors_and_envelopes() {
        let raw = |s: &str| serde_json::from_str::<&RawValue>(s).unwrap().to_owned();
        assert!(!has_cursor(&raw(r#"{"_meta":{}}"#)));
        assert!(has_cursor(&raw(r#"{"cursor":"x"}"#)));
        let body = br#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x","arguments":{"b":1,"a":2}}}"#;
        let env: Envelope = serde_json::from_slice(body).unwrap();
        assert_eq!(env.method.as_deref(), Some("tools/call"));
        assert_eq!(
            env.params.unwrap().get(),
            r#"{"name":"x","arguments":{"b":1,"a":2}}"#
        );
    }

    #[test]
    fn lists_are_serialised_once_per_set_of_items() {
        let item = |n: &str| {
            let mut o = crate::catalog::Object::new();
            o.insert("name".into(), n.into());
            o.insert("b".into(), 1.into());
            o.insert("a".into(), 2.into());
            Item::new(o)
        };
        let cache = ListCache::default();
        let (x, y) = (item("x"), item("y"));
        let first = cache.json(&[x.clone(), y.clone()]);
        assert_eq!(
            &first[..],
            br#"[{"name":"x","b":1,"a":2},{"name":"y","b":1,"a":2}]"#
        );
        let same = |a: &Bytes, b: &Bytes| a.as_ptr() == b.as_ptr();
        assert!(same(&first, &cache.json(&[x.clone(), y.clone()])));
        // An equal but new definition (a rebuilt catalog) is serialised again; a subset is its own.
        assert!(!same(&first, &cache.json(&[x.clone(), item("y")])));
        assert_eq!(
            &cache.json(std::slice::from_ref(&y))[..],
            br#"[{"name":"y","b":1,"a":2}]"#
        );
        for i in 0..(MAX_CACHED_LISTS + 1) {
            cache.json(&[item(&i.to_string())]);
        }
        let lists = cache.0.lock().unwrap();
        assert!(lists.map.len() <= MAX_CACHED_LISTS);
        assert_eq!(
            lists.bytes,
            lists.map.values().map(|c| c.json.len()).sum::<usize>()
        );
    }

    #[tokio::test]
    async fn list_replies_are_one_json_document() {
        let r = list_response(
            &RequestId::String("a\"b".into()),
            "tools",
            Bytes::from_static(br#"[{"name":"x"}]"#),
        );
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"jsonrpc": "2.0", "id": "a\"b", "result": {"tools": [{"name": "x"}]}})
        );
    }

    #[test]
    fn replies_carry_the_callers_id() {
        let id = RequestId::Number(7);
        let r = json_response(&id, Ok(serde_json::json!({"content": [], "z": 1, "a": 2})));
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = json_response(&id, Err(ErrorData::invalid_params("nope", None)));
        assert_eq!(r.status(), StatusCode::OK);
    }
}
