//! Lists answered with the upstreams' own JSON.
//!
//! rmcp's typed `ListToolsResult` (and friends) would drop fields it does not model and reorder the
//! rest, so the list methods reach [`super::mcp::Front`] as custom requests, answered with a
//! `CustomResult` that rmcp serialises as is. On the way in they are renamed to a private method:
//! the HTTP front rewrites the JSON-RPC body (and an `Mcp-Method` header) before rmcp parses it; the
//! stdio front wraps its transport ([`RawLists`]) to turn the typed request into a custom one.

use std::borrow::Cow;

use rmcp::{
    RoleServer,
    model::{ClientRequest, CustomRequest, JsonRpcMessage},
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
    transport::Transport,
};

/// Prefix of the private method a list request is renamed to.
pub const PRIVATE: &str = "io.mcp-broker/raw/";

/// The list methods answered raw.
pub const LISTS: [&str; 4] = [
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
];

/// The calls whose results are relayed raw (rewritten only where they carry exposed URIs).
pub const CALLS: [&str; 3] = ["tools/call", "prompts/get", "resources/read"];

/// The list method behind a private name (`io.mcp-broker/raw/tools/list` → `tools/list`).
pub fn list_method(private: &str) -> Option<&'static str> {
    let m = private.strip_prefix(PRIVATE)?;
    LISTS.iter().copied().find(|l| *l == m)
}

/// The call method behind a private name (`io.mcp-broker/raw/tools/call` → `tools/call`).
pub fn call_method(private: &str) -> Option<&'static str> {
    let m = private.strip_prefix(PRIVATE)?;
    CALLS.iter().copied().find(|l| *l == m)
}

/// SEP-2243 headers, checked by rmcp against the body's method for 2026-07-28 requests.
const MCP_METHOD: &str = "mcp-method";
const MCP_NAME: &str = "mcp-name";
const MCP_PROTOCOL_VERSION: &str = "mcp-protocol-version";

/// One header's value: `Ok(None)` when absent, `Err` when repeated or not text.
fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Result<Option<&'a str>, ()> {
    let mut all = headers.get_all(name).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(());
    }
    v.to_str().map(Some).map_err(|_| ())
}

/// Rename a list or call request in a JSON-RPC body (HTTP front) and its `Mcp-Method` header.
/// Whenever rmcp's own checks of the original would matter (an `Mcp-Method` or `Mcp-Name` header
/// that does not plainly agree with the body), the request is left alone: rmcp then checks and
/// answers it as before, with its typed results.
pub fn rename_request(body: &[u8], headers: &mut http::HeaderMap) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow)]
        method: Option<Cow<'a, str>>,
        id: Option<serde::de::IgnoredAny>,
        params: Option<PeekParams<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct PeekParams<'a> {
        #[serde(borrow)]
        name: Option<Cow<'a, str>>,
        #[serde(borrow)]
        uri: Option<Cow<'a, str>>,
    }
    let peek: Peek = serde_json::from_slice(body).ok()?;
    peek.id?;
    let method = peek.method.as_deref()?;
    let is_call = CALLS.contains(&method);
    if !is_call && !LISTS.contains(&method) {
        return None;
    }
    match header(headers, MCP_METHOD) {
        Ok(None) => {}
        Ok(Some(h)) if h == method => {}
        _ => return None,
    }
    let sep_2243 =
        matches!(header(headers, MCP_PROTOCOL_VERSION), Ok(Some(v)) if v >= "2026-07-28");
    if is_call && sep_2243 {
        let params = peek.params.as_ref()?;
        let name = if method == "resources/read" {
            params.uri.as_deref()
        } else {
            params.name.as_deref()
        };
        match header(headers, MCP_NAME) {
            Ok(Some(h)) if Some(h) == name && !h.starts_with("=?") => {}
            _ => return None,
        }
    }
    let private = format!("{PRIVATE}{method}");
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    *v.get_mut("method")? = serde_json::Value::String(private.clone());
    let out = serde_json::to_vec(&v).ok()?;
    if headers.contains_key(MCP_METHOD)
        && let Ok(h) = http::HeaderValue::from_str(&private)
    {
        headers.insert(MCP_METHOD, h);
    }
    Some(out)
}

/// Rename a typed list or call request to the private custom request (stdio front).
pub fn rename_message(msg: RxJsonRpcMessage<RoleServer>) -> RxJsonRpcMessage<RoleServer> {
    let JsonRpcMessage::Request(mut r) = msg else {
        return msg;
    };
    fn custom<P: serde::Serialize>(
        method: &str,
        params: Option<P>,
        extensions: rmcp::model::Extensions,
    ) -> ClientRequest {
        ClientRequest::CustomRequest(CustomRequest {
            method: format!("{PRIVATE}{method}"),
            params: params.and_then(|p| serde_json::to_value(p).ok()),
            extensions,
        })
    }
    r.request = match r.request {
        ClientRequest::ListToolsRequest(q) => custom("tools/list", q.params, q.extensions),
        ClientRequest::ListPromptsRequest(q) => custom("prompts/list", q.params, q.extensions),
        ClientRequest::ListResourcesRequest(q) => custom("resources/list", q.params, q.extensions),
        ClientRequest::ListResourceTemplatesRequest(q) => {
            custom("resources/templates/list", q.params, q.extensions)
        }
        ClientRequest::CallToolRequest(q) => custom("tools/call", Some(q.params), q.extensions),
        ClientRequest::GetPromptRequest(q) => custom("prompts/get", Some(q.params), q.extensions),
        ClientRequest::ReadResourceRequest(q) => {
            custom("resources/read", Some(q.params), q.extensions)
        }
        other => other,
    };
    JsonRpcMessage::Request(r)
}

/// A server transport whose list and call requests arrive as private custom requests.
pub struct RawLists<T>(pub T);

impl<T: Transport<RoleServer>> Transport<RoleServer> for RawLists<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.0.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        self.0.receive().await.map(rename_message)
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_and_call_bodies_are_renamed_and_others_left_alone() {
        let mut h = http::HeaderMap::new();
        let body = br#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"cursor":"x","_meta":{"a":1}}}"#;
        let out = rename_request(body, &mut h).expect("renamed");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"jsonrpc":"2.0","id":3,"method":"io.mcp-broker/raw/tools/list","params":{"cursor":"x","_meta":{"a":1}}}"#
        );
        assert!(h.get(MCP_METHOD).is_none());
        assert_eq!(
            list_method("io.mcp-broker/raw/tools/list"),
            Some("tools/list")
        );
        assert_eq!(
            call_method("io.mcp-broker/raw/tools/call"),
            Some("tools/call")
        );
        let call = br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"a__b","arguments":{"z":1,"a":2}}}"#;
        let out = rename_request(call, &mut h).expect("renamed");
        assert!(String::from_utf8_lossy(&out).contains(r#""arguments":{"z":1,"a":2}"#));
        assert!(
            rename_request(
                br#"{"jsonrpc":"2.0","id":3,"method":"completion/complete"}"#,
                &mut h
            )
            .is_none()
        );
        assert!(rename_request(br#"{"jsonrpc":"2.0","method":"tools/list"}"#, &mut h).is_none());
        assert!(list_method("io.mcp-broker/raw/tools/call").is_none());
    }

    #[test]
    fn sep_2243_headers_left_for_rmcp_unless_they_agree() {
        let call = br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"a__b"}}"#;
        let modern = |name: Option<&str>, method: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(
                MCP_PROTOCOL_VERSION,
                http::HeaderValue::from_static("2026-07-28"),
            );
            h.insert(MCP_METHOD, http::HeaderValue::from_str(method).unwrap());
            if let Some(n) = name {
                h.insert(MCP_NAME, http::HeaderValue::from_str(n).unwrap());
            }
            h
        };
        let mut h = modern(Some("a__b"), "tools/call");
        assert!(rename_request(call, &mut h).is_some());
        assert_eq!(h.get(MCP_METHOD).unwrap(), "io.mcp-broker/raw/tools/call");
        for (name, method) in [
            (Some("other"), "tools/call"),
            (None, "tools/call"),
            (Some("=?base64?YV9fYg==?="), "tools/call"),
            (Some("a__b"), "tools/list"),
        ] {
            let mut h = modern(name, method);
            assert!(rename_request(call, &mut h).is_none(), "{name:?} {method}");
            assert_eq!(h.get(MCP_METHOD).unwrap(), method, "header untouched");
        }
    }

    #[test]
    fn typed_list_requests_become_custom() {
        let m: RxJsonRpcMessage<RoleServer> = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/templates/list","params":{"cursor":"c"}}"#,
        )
        .expect("decodes");
        match rename_message(m) {
            JsonRpcMessage::Request(r) => match r.request {
                ClientRequest::CustomRequest(c) => {
                    assert_eq!(c.method, "io.mcp-broker/raw/resources/templates/list");
                    assert_eq!(c.params, Some(serde_json::json!({"cursor": "c"})));
                }
                other => panic!("still typed: {other:?}"),
            },
            other => panic!("not a request: {other:?}"),
        }
    }
}
