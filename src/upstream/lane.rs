//! The lane: relayed calls (`tools/call`, `prompts/get`, `resources/read`) sent to the upstream
//! directly, their result read back raw, without rmcp's client service.
//!
//! rmcp's client path costs a relayed call several task hops (peer → service loop → transport
//! worker), an untagged `ServerResult` decode, and for HTTP its worker's SSE handling: about a third
//! of the broker's CPU per call. The lane keeps rmcp for everything else on the connection
//! (initialize, lists, notifications, server-to-client requests and their answers, cancellation):
//!
//! * **stdio**: the request line is written on the child's stdin (the same lock rmcp's sends take,
//!   so lines never interleave) and the transport's one reader hands the response to the waiting
//!   call ([`Pending`]) before anything is decoded for rmcp, which never sees it.
//! * **Streamable HTTP** ([`http`]): the request is POSTed with the headers rmcp's worker used on
//!   its latest POST; the reply (JSON, or SSE with resumption) is read here. Whatever else the reply
//!   carries (logs, server-to-client requests) is injected into rmcp's receive side
//!   ([`super::progress::ProgressTap`]), as if rmcp had read it.
//!
//! Either way the lane's own progress (its token is the lane id) goes to the connection's
//! [`ProgressRouter`] from the reader, in wire order, before the response is handed over. Each
//! message is parsed once into an [`Envelope`] (raw parts); only the response's `result` is decoded,
//! into a `Value` that keeps the upstream's fields and key order.

pub mod http;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rmcp::ErrorData;
use rmcp::model::{
    ClientCapabilities, ClientRequest, CustomRequest, Implementation, NumberOrString,
    ProgressNotificationParam, ProgressToken, ProtocolVersion, RequestId, RequestMetaObject,
};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::oneshot;

use super::ProgressRouter;

/// The first lane id. rmcp numbers its requests (and progress tokens) up from 0 per connection and
/// never gets near this, so lane ids cannot collide with its ids; JavaScript servers read ids as
/// doubles, so lane ids stay below 2^53 (2^53 - 2^50 calls).
pub const FIRST_ID: i64 = 1 << 50;
static NEXT_ID: AtomicI64 = AtomicI64::new(FIRST_ID);

/// A fresh lane id (unique in the process, so also per connection).
pub fn next_id() -> i64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Is `id` one the lane hands out?
pub fn is_lane_id(id: i64) -> bool {
    id >= FIRST_ID
}

/// In the extensions of a server-to-client request read on a lane call's stream: the call (its
/// lane id) whose stream carried it. rmcp's own tag for this (`InboundStreamOrigin`) is left off:
/// rmcp checks it against its own requests in flight, which the lane's are not.
#[derive(Debug, Clone)]
pub struct LaneOrigin(pub RequestId);

/// `MCP_BROKER_UPSTREAM_LANE=off` sends every call through rmcp's client instead: a kill switch
/// for the lane, and the baseline when measuring it.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("MCP_BROKER_UPSTREAM_LANE").as_deref(),
            Ok("off" | "0" | "false")
        )
    })
}

/// The methods the lane carries: the relayed calls.
const METHODS: [&str; 3] = ["tools/call", "prompts/get", "resources/read"];

#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The upstream answered with a JSON-RPC error.
    #[error("{}", .0.message)]
    Rpc(ErrorData),
    #[error("the connection to the upstream closed")]
    Closed,
    /// HTTP 404 on a request that carried a session id.
    #[error("the upstream's session expired")]
    SessionExpired,
    #[error("{0}")]
    Transport(String),
}

/// The response to one lane call: its raw `result`, or its `error`.
pub type Answer = Result<Value, ErrorData>;

/// How a connection's lane reaches its upstream.
pub enum LaneKind {
    Stdio(StdioLane),
    Http(http::HttpLane),
}

/// What a 2026-07-28 request carries in `_meta` besides the caller's capabilities (what rmcp adds
/// to its own requests on such a connection).
pub struct ModernMeta {
    pub version: ProtocolVersion,
    pub client: Implementation,
}

pub struct Lane {
    kind: LaneKind,
    router: Arc<ProgressRouter>,
    modern: Option<ModernMeta>,
}

/// One lane call: what is sent, and what the HTTP lane needs besides.
pub struct Call<'a> {
    pub id: i64,
    pub method: &'a str,
    pub body: Vec<u8>,
    pub request: &'a CustomRequest,
}

impl Lane {
    pub fn new(kind: LaneKind, router: Arc<ProgressRouter>, modern: Option<ModernMeta>) -> Self {
        Self {
            kind,
            router,
            modern,
        }
    }

    /// The request the lane can carry, if `req` is one: a relayed call, and on a 2026-07-28 HTTP
    /// connection only one whose SEP-2243 headers the lane sends itself (`Mcp-Method`, a plain
    /// `Mcp-Name`; not `Mcp-Param-*`, see `wants_params`).
    pub fn accepts<'r>(
        &self,
        req: &'r ClientRequest,
        wants_params: impl FnOnce(&str) -> bool,
    ) -> Option<&'r CustomRequest> {
        let ClientRequest::CustomRequest(c) = req else {
            return None;
        };
        if !METHODS.contains(&c.method.as_str()) {
            return None;
        }
        if self.modern.is_some() && matches!(self.kind, LaneKind::Http(_)) {
            let name = http::mcp_name(c)?;
            if c.method == "tools/call" && wants_params(name) {
                return None;
            }
        }
        Some(c)
    }

    /// Send `req` as lane call `id` and wait for its response. `caps` (2026-07-28 connections) are
    /// the capabilities the request declares. The progress token is the lane id; the caller routes
    /// it before calling. Dropping the future drops the call (the caller tells the upstream).
    pub async fn request(
        &self,
        id: i64,
        req: &CustomRequest,
        caps: Option<ClientCapabilities>,
    ) -> Result<Value, LaneError> {
        let body = encode(id, req, self.modern.as_ref(), caps)
            .map_err(|e| LaneError::Transport(format!("cannot encode the request: {e}")))?;
        let call = Call {
            id,
            method: &req.method,
            body,
            request: req,
        };
        let answer = match &self.kind {
            LaneKind::Stdio(s) => s.request(call).await?,
            LaneKind::Http(h) => h.request(call, &self.router, self.modern.is_some()).await?,
        };
        answer.map_err(LaneError::Rpc)
    }
}

/// The request's JSON text: `params` as the broker built them, with `_meta.progressToken` set to
/// the lane id (and on 2026-07-28 connections the protocol version, client info and `caps`).
fn encode(
    id: i64,
    req: &CustomRequest,
    modern: Option<&ModernMeta>,
    caps: Option<ClientCapabilities>,
) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Out<'a> {
        jsonrpc: &'static str,
        id: i64,
        method: &'a str,
        params: &'a Value,
    }
    let mut params = match &req.params {
        Some(Value::Object(o)) => o.clone(),
        _ => serde_json::Map::new(),
    };
    let mut meta = RequestMetaObject::default();
    if let Some(m) = modern {
        meta.set_protocol_version(m.version.clone());
        meta.set_client_info(m.client.clone());
        meta.set_client_capabilities(caps.unwrap_or_default());
    }
    meta.set_progress_token(ProgressToken(NumberOrString::Number(id)));
    let slot = params
        .entry("_meta")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(o) = slot {
        for (k, v) in meta.0.0 {
            o.insert(k, v);
        }
    }
    let params = Value::Object(params);
    serde_json::to_vec(&Out {
        jsonrpc: "2.0",
        id,
        method: &req.method,
        params: &params,
    })
}

/// One upstream message, parsed once: its parts kept as raw JSON text.
#[derive(serde::Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

impl<'a> Envelope<'a> {
    pub fn parse(text: &'a str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// The lane id this message answers, if it is the response to a lane call.
    pub fn answers(&self) -> Option<i64> {
        if self.method.is_some() || (self.result.is_none() && self.error.is_none()) {
            return None;
        }
        lane_number(self.id?.get())
    }

    /// The response's result or error, decoded (the result as a `Value` in the upstream's key
    /// order).
    pub fn answer(&self) -> Answer {
        if let Some(r) = self.result {
            return serde_json::from_str(r.get()).map_err(|e| {
                ErrorData::internal_error(format!("unparsable result from the upstream: {e}"), None)
            });
        }
        let error = self
            .error
            .map(|e| serde_json::from_str::<ErrorData>(e.get()));
        match error {
            Some(Ok(e)) => Err(e),
            _ => Err(ErrorData::internal_error(
                "the upstream answered with a malformed error",
                None,
            )),
        }
    }

    /// Progress for a lane call (its token is a lane id).
    pub fn lane_progress(&self) -> Option<ProgressNotificationParam> {
        if self.method.as_deref() != Some("notifications/progress") {
            return None;
        }
        let p: ProgressNotificationParam = serde_json::from_str(self.params?.get()).ok()?;
        match &p.progress_token.0 {
            NumberOrString::Number(n) if is_lane_id(*n) => Some(p),
            _ => None,
        }
    }
}

/// A lane id in an upstream's JSON (a number; a server may echo it as text).
fn lane_number(raw: &str) -> Option<i64> {
    let n = match raw.parse::<i64>() {
        Ok(n) => n,
        Err(_) => match serde_json::from_str::<&str>(raw) {
            Ok(s) => s.parse().ok()?,
            Err(_) => {
                // A server that reads ids as doubles may write them back as such (`1.1e15`).
                let f = raw.parse::<f64>().ok()?;
                if f.fract() != 0.0 || f >= (1u64 << 53) as f64 {
                    return None;
                }
                f as i64
            }
        },
    };
    is_lane_id(n).then_some(n)
}

/// Lane calls waiting for their response on a stdio connection; `None` once the reader ended.
/// One entry per call in flight on the connection, removed when the response arrives or the
/// call is dropped (cancelled, timed out), and all at once when the reader ends: so it holds at
/// most the calls the pipeline admitted (its per-session and per-server caps).
#[derive(Default)]
pub struct Pending(Mutex<Option<HashMap<i64, oneshot::Sender<Answer>>>>);

impl Pending {
    pub fn open() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Some(HashMap::new()))))
    }

    fn insert(&self, id: i64) -> Option<oneshot::Receiver<Answer>> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.0.lock().ok()?;
        map.as_mut()?.insert(id, tx);
        Some(rx)
    }

    fn remove(&self, id: i64) -> Option<oneshot::Sender<Answer>> {
        self.0.lock().ok()?.as_mut()?.remove(&id)
    }

    /// The reader ended: every waiting call fails, and later ones at once.
    pub fn close(&self) {
        if let Ok(mut m) = self.0.lock() {
            m.take();
        }
    }

    /// From the reader: if `text` concerns the lane, handle it and return true (rmcp must not see
    /// it). A lane response goes to its waiter (or, for a call that ended, nowhere); lane progress
    /// goes to `router` first, in wire order.
    pub fn route(&self, text: &str, router: &ProgressRouter) -> bool {
        let Some(env) = Envelope::parse(text) else {
            return false;
        };
        if let Some(id) = env.answers() {
            if let Some(tx) = self.remove(id) {
                let _ = tx.send(env.answer());
            }
            return true;
        }
        if let Some(p) = env.lane_progress() {
            router.deliver_routed(&p);
            return true;
        }
        false
    }
}

/// The lane of a stdio connection: the child's stdin (shared with the rmcp transport) and the
/// calls its reader answers.
pub struct StdioLane {
    pub stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    pub pending: Arc<Pending>,
}

impl StdioLane {
    async fn request(&self, mut call: Call<'_>) -> Result<Answer, LaneError> {
        let rx = self.pending.insert(call.id).ok_or(LaneError::Closed)?;
        // Removed however the call ends (answered, failed, or dropped by a cancel or timeout).
        struct Forget<'p>(&'p Pending, i64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.remove(self.1);
            }
        }
        let _forget = Forget(&self.pending, call.id);
        call.body.push(b'\n');
        {
            let mut stdin = self.stdin.lock().await;
            let w = stdin.as_mut().ok_or(LaneError::Closed)?;
            let written = async {
                w.write_all(&call.body).await?;
                w.flush().await
            };
            written.await.map_err(|e| {
                LaneError::Transport(format!("writing to the upstream failed: {e}"))
            })?;
        }
        rx.await.map_err(|_| LaneError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_ids_never_meet_rmcp_ids_and_stay_exact_in_a_double() {
        let a = next_id();
        let b = next_id();
        assert!(b > a && is_lane_id(a));
        // rmcp counts from 0 per connection (u32 counters): far below.
        assert!(!is_lane_id(u32::MAX as i64));
        assert!(a < (1i64 << 53) && (a as f64) as i64 == a);
        assert_eq!(lane_number(&a.to_string()), Some(a));
        assert_eq!(lane_number(&format!("\"{a}\"")), Some(a));
        assert_eq!(lane_number(&format!("{}.0", a)), Some(a));
        assert_eq!(lane_number("7"), None);
    }

    fn request(params: Value) -> CustomRequest {
        CustomRequest::new("tools/call", Some(params))
    }

    #[test]
    fn the_request_carries_the_lane_token_and_keeps_params_in_order() {
        let req = request(
            serde_json::json!({"name": "t", "arguments": {"z": 1, "a": 2}, "_meta": {"x": 1}}),
        );
        let body = encode(FIRST_ID, &req, None, None).unwrap_or_default();
        let text = String::from_utf8(body).unwrap_or_default();
        assert_eq!(
            text,
            format!(
                r#"{{"jsonrpc":"2.0","id":{FIRST_ID},"method":"tools/call","params":{{"name":"t","arguments":{{"z":1,"a":2}},"_meta":{{"x":1,"progressToken":{FIRST_ID}}}}}}}"#
            )
        );
        let modern = ModernMeta {
            version: ProtocolVersion::V_2026_07_28,
            client: Implementation::new("mcp-broker", "0"),
        };
        let caps = ClientCapabilities::builder().enable_sampling().build();
        let body = encode(7, &req, Some(&modern), Some(caps)).unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let meta = &v["params"]["_meta"];
        assert!(
            meta["io.modelcontextprotocol/protocolVersion"].is_string(),
            "{meta}"
        );
        assert!(
            meta["io.modelcontextprotocol/clientCapabilities"]["sampling"].is_object(),
            "{meta}"
        );
    }

    #[tokio::test]
    async fn a_response_reaches_its_waiter_raw_and_progress_comes_first() {
        let pending = Pending::open();
        let router = ProgressRouter::default();
        let id = next_id();
        let token = ProgressToken(NumberOrString::Number(id));
        let mut progress = router.route(&token);
        let rx = pending.insert(id);
        let other = pending.insert(id + 1_000_000);
        let p = format!(
            r#"{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progressToken":{id},"progress":1}}}}"#
        );
        let r = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"result":{{"zeta":1,"execution":{{"taskSupport":"x"}},"alpha":[1]}}}}"#
        );
        assert!(pending.route(&p, &router));
        assert!(pending.route(&r, &router));
        // rmcp's own messages are not the lane's.
        assert!(!pending.route(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#, &router));
        assert!(!pending.route(
            r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":0,"progress":1}}"#,
            &router
        ));
        assert_eq!(progress.try_recv().map(|p| p.progress).ok(), Some(1.0));
        let got = match rx {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        let text = got.and_then(|a| a.ok()).map(|v| v.to_string());
        assert_eq!(
            text.as_deref(),
            Some(r#"{"zeta":1,"execution":{"taskSupport":"x"},"alpha":[1]}"#)
        );
        // An error answer.
        let e = format!(
            r#"{{"jsonrpc":"2.0","id":{},"error":{{"code":-32602,"message":"no"}}}}"#,
            id + 1_000_000
        );
        assert!(pending.route(&e, &router));
        let got = match other {
            Some(rx) => rx.await.ok(),
            None => None,
        };
        assert!(matches!(got, Some(Err(e)) if e.code.0 == -32602 && e.message == "no"));
        // Closed: waiting calls fail, new ones are refused.
        let late = pending.insert(next_id());
        pending.close();
        assert!(pending.insert(next_id()).is_none());
        let late = match late {
            Some(rx) => rx.await.is_err(),
            None => false,
        };
        assert!(late, "a waiting call fails when the reader ends");
    }
}
