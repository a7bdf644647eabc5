//! Raw results: the upstream's JSON as it sent it.
//!
//! rmcp decodes every response into its untagged `ServerResult`, whose typed variants drop fields
//! rmcp does not model and whose catch-all `CustomResult(Value)` comes last. So the broker sends the
//! requests whose results it relays (lists, calls, reads) as `CustomRequest`s, and the transports
//! (which see the bytes) hand rmcp the response to such a request as `CustomResult(raw)`:
//!
//! * stdio and legacy SSE decode each message here ([`RawIds::decode`]): a response whose id was
//!   sent as a custom request keeps its `result` as a `Value` (insertion-ordered: serde_json's
//!   `preserve_order`).
//! * Streamable HTTP responses on an SSE stream are decoded by rmcp's worker from the event text;
//!   there the result is replaced by a string holding [`RAW_MARK`] and its JSON text (a string
//!   matches no typed variant, so it lands in `CustomResult`), which [`unmark`] turns back into
//!   the object (done by the progress tap, before rmcp routes the response).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rmcp::{
    RoleClient,
    model::{
        CallToolResult, ClientNotification, ClientRequest, CustomResult, JsonRpcMessage,
        JsonRpcResponse, JsonRpcVersion2_0, RequestId, ServerResult,
    },
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
};
use serde_json::Value;

/// Prefix of a result carried as text through rmcp's decoder (see the module docs).
pub const RAW_MARK: &str = "\u{1}mcp-broker-raw\u{1}";

/// Ids of requests on one connection that were sent as custom requests and are not answered yet.
#[derive(Debug, Default, Clone)]
pub struct RawIds(Arc<Mutex<HashSet<RequestId>>>);

impl RawIds {
    /// Remember `msg`'s id if it is a custom request; forget a request the broker cancels (its
    /// answer may never come).
    pub fn note(&self, msg: &TxJsonRpcMessage<RoleClient>) {
        match msg {
            JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::CustomRequest(_)) => {
                if let Ok(mut ids) = self.0.lock() {
                    ids.insert(r.id.clone());
                }
            }
            JsonRpcMessage::Notification(n) => {
                if let ClientNotification::CancelledNotification(c) = &n.notification
                    && let Some(id) = &c.params.request_id
                {
                    self.take(id);
                }
            }
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        self.0.lock().map(|s| s.is_empty()).unwrap_or(true)
    }

    fn take(&self, id: &RequestId) -> bool {
        self.0.lock().is_ok_and(|mut s| s.remove(id))
    }

    /// Decode one message from an upstream; the response to a noted request keeps its `result`
    /// exactly as sent (every field, key order).
    pub fn decode(&self, text: &str) -> Result<RxJsonRpcMessage<RoleClient>, serde_json::Error> {
        if self.is_empty() {
            return serde_json::from_str(text);
        }
        let mut v: Value = serde_json::from_str(text)?;
        if let Some(obj) = v.as_object_mut()
            && obj.contains_key("result")
            && let Some(id) = obj
                .get("id")
                .and_then(|id| serde_json::from_value::<RequestId>(id.clone()).ok())
            && self.take(&id)
            && let Some(result) = obj.remove("result")
        {
            return Ok(raw_response(id, result));
        }
        if let Some(id) = v
            .get("id")
            .filter(|_| v.get("error").is_some())
            .and_then(|id| serde_json::from_value::<RequestId>(id.clone()).ok())
        {
            self.take(&id);
        }
        serde_json::from_value(v)
    }
}

/// A response carrying `result` untouched.
pub fn raw_response(id: RequestId, result: Value) -> RxJsonRpcMessage<RoleClient> {
    JsonRpcMessage::Response(JsonRpcResponse {
        jsonrpc: JsonRpcVersion2_0,
        id,
        result: ServerResult::CustomResult(CustomResult(result)),
    })
}

/// For a message that rmcp will decode itself (SSE events of Streamable HTTP): if it is the
/// response to request `id`, the same message with its result replaced by a marked string.
pub fn mark(text: &str, id: &RequestId) -> Option<String> {
    let mut v: Value = serde_json::from_str(text).ok()?;
    let obj = v.as_object_mut()?;
    let same = obj
        .get("id")
        .and_then(|i| serde_json::from_value::<RequestId>(i.clone()).ok())
        .is_some_and(|i| &i == id);
    if !same {
        return None;
    }
    let result = obj.get_mut("result")?;
    let text = serde_json::to_string(result).ok()?;
    *result = Value::String(format!("{RAW_MARK}{text}"));
    serde_json::to_string(&v).ok()
}

/// Undo [`mark`] on a decoded message (in place).
pub fn unmark(msg: &mut RxJsonRpcMessage<RoleClient>) {
    if let JsonRpcMessage::Response(r) = msg
        && let ServerResult::CustomResult(CustomResult(Value::String(s))) = &r.result
        && let Some(text) = s.strip_prefix(RAW_MARK)
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        r.result = ServerResult::CustomResult(CustomResult(v));
    }
}

tokio::task_local! {
    /// The raw result of the call made inside [`capture`].
    static KEPT: std::cell::RefCell<Option<Value>>;
}

/// Run `f` (a broker call) and return its output with the raw JSON of the upstream result it
/// received, if any (see [`typed`]).
pub async fn capture<F: Future>(f: F) -> (F::Output, Option<Value>) {
    KEPT.scope(std::cell::RefCell::new(None), async {
        let out = f.await;
        let raw = KEPT.with(|k| k.borrow_mut().take());
        (out, raw)
    })
    .await
}

/// Keep `v` as the raw result of the call [`capture`] runs (one that ran in another task).
pub fn keep(v: Value) {
    let _ = KEPT.try_with(|k| *k.borrow_mut() = Some(v));
}

/// Change the raw result kept by [`capture`] (if any) as the broker changed its typed form.
pub fn amend(f: impl FnOnce(&mut Value)) {
    let _ = KEPT.try_with(|k| {
        if let Some(v) = k.borrow_mut().as_mut() {
            f(v);
        }
    });
}

/// `method` with `params` as a custom request, so its result comes back raw. Inside
/// [`super::StreamLink::scope`] the request carries the front's link (for resuming its stream).
pub fn custom_request(method: &str, params: &impl serde::Serialize) -> ClientRequest {
    let mut req = rmcp::model::CustomRequest::new(method, serde_json::to_value(params).ok());
    if let Some(link) = super::StreamLink::current() {
        req.extensions.insert(link);
    }
    ClientRequest::CustomRequest(req)
}

/// The typed form of a custom request's result, for the broker's decisions (audit, errors, tasks);
/// inside [`capture`] the raw JSON is kept for the front to relay.
pub fn typed(result: ServerResult) -> ServerResult {
    let ServerResult::CustomResult(CustomResult(v)) = result else {
        return result;
    };
    // Untagged: a result no typed variant matches decodes as `CustomResult` (the broker then
    // reports an unexpected result, as it did when rmcp decoded it).
    let decode = |v: Value| {
        serde_json::from_value::<ServerResult>(v)
            .unwrap_or(ServerResult::CustomResult(CustomResult(Value::Null)))
    };
    if KEPT.try_with(|_| ()).is_err() {
        return decode(v);
    }
    // The front relays the raw result: a plain tool result is not decoded (rmcp's untagged
    // decode tries every variant, and cost more than the rest of the call's JSON handling).
    let t = tool_shell(&v).unwrap_or_else(|| decode(v.clone()));
    let _ = KEPT.try_with(|k| *k.borrow_mut() = Some(v));
    t
}

/// What the broker needs of a successful, complete tools/call result whose raw form is relayed:
/// only that it is one (audit outcome, metrics). `None` for anything else, decoded in full: errors
/// (the audit record keeps their text), `input_required`, tasks, other kinds of results.
fn tool_shell(v: &Value) -> Option<ServerResult> {
    /// Keys of the other results an untagged decode could pick (prompt, read, completion,
    /// lists, task, input_required, initialize).
    const OTHERS: [&str; 11] = [
        "messages",
        "contents",
        "completion",
        "tools",
        "prompts",
        "resources",
        "resourceTemplates",
        "task",
        "inputRequests",
        "requestState",
        "protocolVersion",
    ];
    let o = v.as_object()?;
    if !o.get("content")?.is_array() || OTHERS.iter().any(|k| o.contains_key(*k)) {
        return None;
    }
    if o.get("resultType").is_some_and(|t| t != "complete") {
        return None;
    }
    let is_error = match o.get("isError") {
        None => None,
        Some(Value::Bool(false)) => Some(false),
        Some(_) => return None,
    };
    let mut r = CallToolResult::success(Vec::new());
    r.is_error = is_error;
    r.result_type = None;
    Some(ServerResult::CallToolResult(r))
}

/// The result of a request sent as a custom request, as JSON: the raw object when the transport
/// kept it (always, for responses it saw), else the typed result re-serialised (a response that
/// reached rmcp another way, e.g. a resumed HTTP stream).
pub fn into_value(result: ServerResult) -> Value {
    match result {
        ServerResult::CustomResult(CustomResult(v)) => v,
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{ClientJsonRpcMessage, CustomRequest, JsonRpcRequest, NumberOrString};

    fn custom(id: i64, method: &str) -> ClientJsonRpcMessage {
        JsonRpcMessage::Request(JsonRpcRequest {
            jsonrpc: JsonRpcVersion2_0,
            id: NumberOrString::Number(id),
            request: ClientRequest::CustomRequest(CustomRequest::new(method, None)),
        })
    }

    const LIST: &str = r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"think","inputSchema":{"type":"object","properties":{"zeta":{"type":"string"},"alpha":{"type":"number"}},"required":["zeta"]},"execution":{"taskSupport":"forbidden"},"description":"d"}],"nextCursor":"c2"}}"#;

    fn result_text(m: &RxJsonRpcMessage<RoleClient>) -> String {
        match m {
            JsonRpcMessage::Response(r) => match &r.result {
                ServerResult::CustomResult(CustomResult(v)) => v.to_string(),
                other => panic!("typed result: {other:?}"),
            },
            other => panic!("not a response: {other:?}"),
        }
    }

    #[test]
    fn custom_request_responses_stay_raw() {
        let ids = RawIds::default();
        ids.note(&custom(7, "tools/list"));
        let m = ids.decode(LIST).expect("decodes");
        let expected = &LIST[LIST.find("\"result\":").map(|i| i + 9).unwrap_or(0)..LIST.len() - 1];
        assert_eq!(
            result_text(&m),
            expected,
            "every field, in the upstream's order"
        );
        // Answered: the id is forgotten, and responses to typed requests decode typed.
        let again = ids.decode(LIST).expect("decodes");
        assert!(matches!(
            again,
            JsonRpcMessage::Response(ref r) if matches!(r.result, ServerResult::ListToolsResult(_))
        ));
    }

    #[test]
    fn marked_results_come_back_raw() {
        let id = NumberOrString::Number(7);
        let marked = mark(LIST, &id).expect("is the response to 7");
        assert!(mark(LIST, &NumberOrString::Number(8)).is_none());
        let mut m: RxJsonRpcMessage<RoleClient> =
            serde_json::from_str(&marked).expect("rmcp decodes it");
        unmark(&mut m);
        assert!(result_text(&m).contains(r#""properties":{"zeta""#));
        assert!(result_text(&m).contains(r#""execution":{"taskSupport":"forbidden"}"#));
    }

    #[tokio::test]
    async fn plain_tool_results_are_kept_raw_and_not_decoded() {
        let ok =
            serde_json::json!({"content": [{"type": "text", "text": "a"}], "execution": {"x": 1}});
        let (t, raw) =
            capture(async { typed(ServerResult::CustomResult(CustomResult(ok.clone()))) }).await;
        match t {
            ServerResult::CallToolResult(r) => {
                assert!(r.content.is_empty(), "not decoded");
                assert_ne!(r.is_error, Some(true));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(raw, Some(ok));
        // An error keeps its decoded content (the audit record's text); other results decode.
        let err =
            serde_json::json!({"content": [{"type": "text", "text": "boom"}], "isError": true});
        let (t, _) = capture(async { typed(ServerResult::CustomResult(CustomResult(err))) }).await;
        match t {
            ServerResult::CallToolResult(r) => {
                assert_eq!(r.is_error, Some(true));
                assert_eq!(r.content.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        let prompt = serde_json::json!({"messages": [], "content": []});
        let (t, _) =
            capture(async { typed(ServerResult::CustomResult(CustomResult(prompt))) }).await;
        assert!(matches!(t, ServerResult::GetPromptResult(_)), "{t:?}");
    }
}
