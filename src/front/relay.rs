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

/// The list method behind a private name (`io.mcp-broker/raw/tools/list` → `tools/list`).
pub fn list_method(private: &str) -> Option<&'static str> {
    let m = private.strip_prefix(PRIVATE)?;
    LISTS.iter().copied().find(|l| *l == m)
}

fn private_name(method: &str) -> Option<String> {
    LISTS
        .contains(&method)
        .then(|| format!("{PRIVATE}{method}"))
}

/// Rename a list request in a JSON-RPC body (HTTP front). Returns the new body and the private
/// method name, or `None` to pass the body on unchanged.
pub fn rename_in_body(body: &[u8]) -> Option<(Vec<u8>, String)> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow)]
        method: Option<Cow<'a, str>>,
        id: Option<serde::de::IgnoredAny>,
    }
    let peek: Peek = serde_json::from_slice(body).ok()?;
    peek.id?;
    let private = private_name(peek.method.as_deref()?)?;
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    *v.get_mut("method")? = serde_json::Value::String(private.clone());
    Some((serde_json::to_vec(&v).ok()?, private))
}

/// Rename a typed list request to the private custom request (stdio front).
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
        other => other,
    };
    JsonRpcMessage::Request(r)
}

/// A server transport whose list requests arrive as private custom requests.
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
    fn list_bodies_are_renamed_and_others_left_alone() {
        let body = br#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"cursor":"x","_meta":{"a":1}}}"#;
        let (out, private) = rename_in_body(body).expect("renamed");
        assert_eq!(private, "io.mcp-broker/raw/tools/list");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"jsonrpc":"2.0","id":3,"method":"io.mcp-broker/raw/tools/list","params":{"cursor":"x","_meta":{"a":1}}}"#
        );
        assert_eq!(list_method(&private), Some("tools/list"));
        assert!(rename_in_body(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call"}"#).is_none());
        assert!(rename_in_body(br#"{"jsonrpc":"2.0","method":"tools/list"}"#).is_none());
        assert!(list_method("io.mcp-broker/raw/tools/call").is_none());
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
