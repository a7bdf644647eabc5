//! The load generator's MCP clients, written against the wire format rather than rmcp so the
//! client side costs the same for every target:
//!
//! - [`HttpSession`]: one Streamable HTTP session (initialize, `Mcp-Session-Id`,
//!   `MCP-Protocol-Version`, `notifications/initialized`) over its own pooled reqwest client with
//!   `TCP_NODELAY`; replies may be `application/json` or `text/event-stream`.
//! - [`StdioConn`]: newline-delimited JSON-RPC to a child's stdin/stdout, shared by all workers;
//!   each in-flight request has its own id and a reader task routes replies back by id.
//!
//! Every request gets a fresh id, and a `tools/call` only counts as a success when its result is
//! not `isError` and carries the expected content.

use std::collections::HashMap;
use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot};

/// The version the bench asks for in `initialize`; later requests carry the negotiated one.
const PROTOCOL_VERSION: &str = "2025-11-25";
const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// A request that takes longer than this counts as an error (nothing in the bench should).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The `tools/call` the workload repeats and how its result is recognised.
#[derive(Clone)]
pub struct ToolCall {
    /// `{"name": ..., "arguments": ...}`, cloned into each request.
    pub params: Value,
    /// A string the result's first text content must contain.
    pub needle: String,
}

impl ToolCall {
    pub fn new(tool: &str, arguments: Value, needle: &str) -> Self {
        Self {
            params: json!({ "name": tool, "arguments": arguments }),
            needle: needle.into(),
        }
    }

    /// `Ok` when `result` is a successful tools/call result with the expected content.
    fn check(&self, result: &Value) -> Result<(), String> {
        let text = result
            .pointer("/content/0/text")
            .and_then(Value::as_str)
            .unwrap_or("");
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Err(format!("tool error: {}", clip(text)));
        }
        if !text.contains(&self.needle) {
            return Err(format!(
                "unexpected content (no {:?}): {}",
                self.needle,
                clip(text)
            ));
        }
        Ok(())
    }
}

/// A client session with one target, whatever the transport.
pub enum Session {
    Http(HttpSession),
    Stdio(Arc<StdioConn>),
}

impl Session {
    pub async fn call_tool(&mut self, call: &ToolCall) -> Result<(), String> {
        let result = self.request("tools/call", call.params.clone()).await?;
        call.check(&result)
    }

    /// The tool names `tools/list` returns (one page: the broker and the ledger never paginate).
    /// Only the names are decoded, so a long list costs the client little beyond reading it.
    pub async fn list_tools(&mut self) -> Result<Vec<String>, String> {
        let result: ToolList = self.request("tools/list", json!({})).await?;
        Ok(result.tools.into_iter().map(|t| t.name).collect())
    }

    async fn request<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<R, String> {
        match self {
            Self::Http(s) => s.request(method, params).await,
            Self::Stdio(c) => c.request(method, params).await,
        }
    }

    /// End the session (HTTP `DELETE`); a shared stdio connection stays open.
    pub async fn close(self) {
        if let Self::Http(s) = self {
            s.close().await;
        }
    }
}

/// A pooled HTTP client as every session uses (`TCP_NODELAY`, no proxy, a request timeout).
pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

fn initialize_params() -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": {},
        "clientInfo": { "name": "mcp-broker-bench", "version": env!("CARGO_PKG_VERSION") },
    })
}

/// One Streamable HTTP session with its own connection pool.
pub struct HttpSession {
    http: reqwest::Client,
    url: String,
    /// `Bearer …`, sent on every request when the target authenticates.
    authorization: Option<String>,
    session_id: Option<String>,
    /// Negotiated in `initialize`; sent as `MCP-Protocol-Version` afterwards.
    protocol: Option<String>,
    next_id: u64,
}

impl HttpSession {
    /// Open a session: `initialize`, then `notifications/initialized`.
    pub async fn open(url: &str, token: Option<&str>) -> Result<Self, String> {
        Self::open_with(http_client()?, url, token).await
    }

    /// Open a session over `http`, a client (and so a connection pool) other sessions may share:
    /// thousands of sessions need not mean thousands of TCP connections.
    pub async fn open_with(
        http: reqwest::Client,
        url: &str,
        token: Option<&str>,
    ) -> Result<Self, String> {
        let mut session = Self {
            http,
            url: url.into(),
            authorization: token.map(|t| format!("Bearer {t}")),
            session_id: None,
            protocol: None,
            next_id: 0,
        };
        let (result, session_id): (Value, _) = session
            .exchange("initialize", initialize_params())
            .await
            .map_err(|e| format!("initialize at {url}: {e}"))?;
        session.session_id = session_id;
        session.protocol = Some(
            result
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or(PROTOCOL_VERSION)
                .to_owned(),
        );
        session.notify("notifications/initialized").await?;
        Ok(session)
    }

    async fn request<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<R, String> {
        self.exchange(method, params)
            .await
            .map(|(result, _)| result)
    }

    /// POST one request; the result and the session id the response carried.
    async fn exchange<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<(R, Option<String>), String> {
        let id = self.next_id;
        self.next_id += 1;
        let body = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let response = self.post(&body).await?;
        let session_id = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let reply: Reply<R> = read_reply(response, id).await?;
        Ok((reply.into_result()?, session_id))
    }

    async fn notify(&mut self, method: &str) -> Result<(), String> {
        let response = self
            .post(&json!({ "jsonrpc": "2.0", "method": method }))
            .await?;
        // Drain the (empty) body so the connection goes back to the pool.
        response
            .bytes()
            .await
            .map(drop)
            .map_err(|e| format!("{method}: {e}"))
    }

    /// POST a JSON-RPC message with the session headers; non-2xx statuses are errors.
    async fn post(&self, body: &Value) -> Result<reqwest::Response, String> {
        let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let mut request = self
            .http
            .post(&self.url)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream")
            .body(bytes);
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth);
        }
        if let Some(id) = &self.session_id {
            request = request.header(SESSION_HEADER, id);
        }
        if let Some(version) = &self.protocol {
            request = request.header(VERSION_HEADER, version);
        }
        let response = request.send().await.map_err(|e| format!("POST: {e}"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!("HTTP {status}: {}", clip(&text)))
    }

    pub async fn close(self) {
        let Some(id) = &self.session_id else { return };
        let mut request = self.http.delete(&self.url).header(SESSION_HEADER, id);
        if let Some(auth) = &self.authorization {
            request = request.header(AUTHORIZATION, auth);
        }
        // Best effort: a target that does not support DELETE expires the session on its own.
        let _ = request.send().await;
    }
}

/// The `tools/list` result, names only (serde skips the rest without building it).
#[derive(Deserialize)]
struct ToolList {
    tools: Vec<ToolName>,
}

#[derive(Deserialize)]
struct ToolName {
    name: String,
}

/// A JSON-RPC message as far as the bench needs it; `R` is the expected result type.
#[derive(Deserialize)]
struct Reply<R> {
    id: Option<Value>,
    result: Option<R>,
    error: Option<Value>,
}

impl<R> Reply<R> {
    fn answers(&self, id: u64) -> bool {
        self.id.as_ref().and_then(Value::as_u64) == Some(id)
            && (self.result.is_some() || self.error.is_some())
    }

    /// The `result`, or the `error` as an `Err`.
    fn into_result(self) -> Result<R, String> {
        match (self.result, self.error) {
            (_, Some(error)) => Err(format!("JSON-RPC error: {}", clip(&error.to_string()))),
            (Some(result), None) => Ok(result),
            (None, None) => Err("the reply has neither result nor error".into()),
        }
    }
}

/// The JSON-RPC response with `id` from a JSON body or an event stream (`data:` lines; rmcp and
/// the peers put each message on one line). The stream is read to its end so the connection can
/// be reused.
async fn read_reply<R: DeserializeOwned>(
    mut response: reqwest::Response,
    id: u64,
) -> Result<Reply<R>, String> {
    let is_stream = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if !is_stream {
        let body = response.bytes().await.map_err(|e| format!("body: {e}"))?;
        let reply: Reply<R> =
            serde_json::from_slice(&body).map_err(|e| format!("invalid JSON reply: {e}"))?;
        return if reply.answers(id) {
            Ok(reply)
        } else {
            Err(format!("the JSON reply does not answer request {id}"))
        };
    }
    let mut pending: Vec<u8> = Vec::new();
    // Bytes of `pending` known to hold no newline: a long `data:` line (a big tools/list) arrives
    // in many chunks and must not be rescanned from its start for each.
    let mut scanned = 0;
    let mut found = None;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("event stream: {e}"))?
    {
        pending.extend_from_slice(&chunk);
        while let Some(offset) = pending[scanned..].iter().position(|&b| b == b'\n') {
            let end = scanned + offset;
            if found.is_none() {
                found = sse_data(&pending[..end])
                    .and_then(|data| serde_json::from_slice::<Reply<R>>(data).ok())
                    .filter(|reply| reply.answers(id));
            }
            pending.drain(..=end);
            scanned = 0;
        }
        scanned = pending.len();
    }
    found.ok_or_else(|| format!("the event stream ended without the reply to request {id}"))
}

/// The payload of an SSE `data:` line, if it is one and not empty.
fn sse_data(line: &[u8]) -> Option<&[u8]> {
    let data = line.strip_prefix(b"data:")?.trim_ascii();
    (!data.is_empty()).then_some(data)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A JSON-RPC connection over a child's stdin/stdout.
pub struct StdioConn {
    lines: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
}

impl StdioConn {
    /// Start the writer and reader tasks and do the MCP handshake.
    pub async fn open(stdin: ChildStdin, stdout: ChildStdout) -> Result<Arc<Self>, String> {
        let (lines, outgoing) = mpsc::unbounded_channel();
        let pending: Pending = Arc::default();
        tokio::spawn(write_lines(stdin, outgoing));
        tokio::spawn(route_replies(stdout, pending.clone()));
        let conn = Arc::new(Self {
            lines,
            pending,
            next_id: AtomicU64::new(0),
        });
        conn.request::<Value>("initialize", initialize_params())
            .await
            .map_err(|e| format!("initialize over stdio: {e}"))?;
        conn.send(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))?;
        Ok(conn)
    }

    async fn request<R: DeserializeOwned>(&self, method: &str, params: Value) -> Result<R, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(message)) => serde_json::from_value::<Reply<R>>(message)
                .map_err(|e| format!("unexpected reply: {e}"))?
                .into_result(),
            Ok(Err(_)) => Err("the stdio server closed its output".into()),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(format!(
                    "no reply to request {id} within {REQUEST_TIMEOUT:?}"
                ))
            }
        }
    }

    fn send(&self, message: &Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.lines
            .send(line)
            .map_err(|_| "the stdio server's input is closed".into())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn write_lines(mut stdin: ChildStdin, mut lines: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(line) = lines.recv().await {
        if stdin.write_all(&line).await.is_err() {
            break;
        }
    }
}

/// Hand each reply to the request waiting for its id; on EOF, fail every waiting request.
async fn route_replies(stdout: ChildStdout, pending: Pending) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let is_reply = message.get("result").is_some() || message.get("error").is_some();
        let Some(id) = message
            .get("id")
            .and_then(Value::as_u64)
            .filter(|_| is_reply)
        else {
            continue; // a notification or a server-to-client request: the workload expects none
        };
        if let Some(waiter) = lock(&pending).remove(&id) {
            let _ = waiter.send(message);
        }
    }
    lock(&pending).clear();
}

/// At most 200 characters of `s`, for error messages.
fn clip(s: &str) -> String {
    match s.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}
