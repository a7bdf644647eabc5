//! Multi-round-trip requests (SEP-2322, MCP 2026-07-28) through the broker, for clients of both eras.
//!
//! A 2026-07-28 upstream asks for client input by answering a call, prompt or read with
//! `resultType: "input_required"`, `inputRequests` and an opaque `requestState`; the client retries
//! the same request with `inputResponses` and the state echoed.
//!
//! * To a 2026-07-28 client the result is relayed, its `requestState` replaced by the broker's own
//!   [`Seal`]: the upstream's state inside an HMAC-sealed token bound to the caller, the server and a
//!   digest of the request, expiring after [`STATE_TTL`]. A retry's state is opened before anything
//!   is forwarded, so a state replayed by another caller, against another request, altered or
//!   expired is refused (-32602) and never reaches the upstream.
//! * A 2025-11-25 session has no such result: the broker asks the client itself (elicitation,
//!   sampling, roots, on the calling session) and retries upstream with the answers.
//!
//! The token is signed, not encrypted: like the upstream's own state, it is readable by the client
//! it was issued to. The key is random per process, so a state does not survive a broker restart.

use std::time::Duration;

use rmcp::model::{ErrorData, InputRequest, InputRequests, InputResponses, RequestStateCodec, ServerRequest, SealOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;

use super::{Broker, Downstream};

/// How long a sealed `requestState` may be echoed back (a person may be answering a form).
pub(super) const STATE_TTL: Duration = Duration::from_secs(10 * 60);
/// How many times one request may come back `input_required` before the broker gives up on it.
pub(super) const MAX_ROUNDS: usize = 8;
/// Most input requests one result may carry.
pub(super) const MAX_INPUTS: usize = 16;

/// What a sealed state carries: the upstream's own state, if it sent one.
#[derive(Serialize, Deserialize)]
struct Sealed {
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
}

/// Seals and opens the broker's `requestState` tokens.
pub(super) struct Seal {
    codec: RequestStateCodec,
}

impl Seal {
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        // Without an OS random source the process has bigger problems; a state sealed with a
        // fixed key would still be bound to caller and request, but forgeable: refuse to go on.
        if let Err(e) = getrandom::fill(&mut key) {
            panic!("no OS random source for the requestState key: {e}");
        }
        Self {
            codec: RequestStateCodec::new(key.to_vec()),
        }
    }

    /// The token a client echoes instead of the upstream's `state`.
    pub fn seal(&self, bind: &[u8], state: Option<String>) -> String {
        let payload = serde_json::to_vec(&Sealed { upstream: state }).unwrap_or_default();
        self.codec.seal_with(
            &payload,
            &SealOptions::new().associated_data(bind).ttl(STATE_TTL),
        )
    }

    /// The upstream's state inside a token from a client, if the token is this broker's, for this
    /// binding, and not expired.
    pub fn open(&self, bind: &[u8], token: &str) -> Result<Option<String>, ErrorData> {
        let refused = |why: &str| {
            ErrorData::invalid_params(
                format!("requestState refused: {why}; start the request again without it"),
                None,
            )
        };
        let payload = self.codec.open_with(token, bind).map_err(|e| match e {
            rmcp::model::RequestStateError::Expired { .. } => refused("it expired"),
            _ => refused("it was not issued by mcp-broker for this caller and request, or it was altered"),
        })?;
        let sealed: Sealed =
            serde_json::from_slice(&payload).map_err(|_| refused("it is malformed"))?;
        Ok(sealed.upstream)
    }
}

/// What a sealed state is bound to: the caller, the server and the request (method, the upstream's
/// name or URI, and the arguments in canonical form), so it opens for the same request only.
pub(super) fn binding(caller: &Caller, server: &str, method: &str, original: &str, args: Option<&Value>) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    for part in [caller.sub.as_str(), server, method, original] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    if let Some(a) = args {
        let mut out = Vec::new();
        canonical(a, &mut out);
        h.update(&out);
    }
    h.finalize().to_vec()
}

/// JSON with object keys sorted, so the same arguments bind the same however a client orders them.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                if let Some(x) = o.get(k) {
                    canonical(x, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(x, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(other.to_string().as_bytes()),
    }
}

impl Broker {
    /// Ask a 2025-era client, on its own session, what a 2026-07-28 upstream's `input_required`
    /// result asks for; the answers, keyed as the requests were, for the retry's `inputResponses`.
    pub(super) async fn answer_inputs(
        &self,
        server: &str,
        down: &Downstream,
        inputs: InputRequests,
        ct: &CancellationToken,
    ) -> Result<InputResponses, ErrorData> {
        if inputs.len() > MAX_INPUTS {
            return Err(ErrorData::invalid_request(
                format!("server `{server}` asked for {} inputs at once (mcp-broker relays at most {MAX_INPUTS})", inputs.len()),
                None,
            ));
        }
        let asks = inputs.into_iter().map(|(key, input)| async move {
            let request = match input {
                InputRequest::CreateMessage(r) => ServerRequest::CreateMessageRequest(r),
                InputRequest::Elicitation(r) => ServerRequest::ElicitRequest(r),
                InputRequest::ListRoots(r) => ServerRequest::ListRootsRequest(r),
                _ => {
                    return Err(ErrorData::invalid_request(
                        format!("server `{server}` asked for an input kind mcp-broker does not know"),
                        None,
                    ));
                }
            };
            let answer = self.ask_client(server, down, request, ct).await?;
            let value = serde_json::to_value(answer)
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
            Ok((key, value))
        });
        futures::future::try_join_all(asks)
            .await
            .map(|v| v.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(sub: &str) -> Caller {
        let mut c = Caller::anonymous();
        c.sub = sub.into();
        c
    }

    #[test]
    fn a_state_opens_only_for_its_caller_and_request() {
        let seal = Seal::new();
        let args = serde_json::json!({"b": 1, "a": [true, {"y": 2, "x": 1}]});
        let bind = binding(&caller("alice"), "ref", "tools/call", "t", Some(&args));
        let token = seal.seal(&bind, Some("upstream-state".into()));
        assert_eq!(seal.open(&bind, &token).expect("opens"), Some("upstream-state".into()));
        // Same arguments in another key order bind the same.
        let reordered = serde_json::json!({"a": [true, {"x": 1, "y": 2}], "b": 1});
        let same = binding(&caller("alice"), "ref", "tools/call", "t", Some(&reordered));
        assert!(seal.open(&same, &token).is_ok());
        // Another caller, server, tool or argument: refused.
        for other in [
            binding(&caller("bob"), "ref", "tools/call", "t", Some(&args)),
            binding(&caller("alice"), "other", "tools/call", "t", Some(&args)),
            binding(&caller("alice"), "ref", "tools/call", "u", Some(&args)),
            binding(&caller("alice"), "ref", "tools/call", "t", Some(&serde_json::json!({"b": 2}))),
        ] {
            let e = seal.open(&other, &token).expect_err("bound elsewhere");
            assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
        }
        // Altered, or from another broker process: refused.
        assert!(seal.open(&bind, &format!("{token}x")).is_err());
        assert!(Seal::new().open(&bind, &token).is_err());
        assert!(seal.open(&bind, "garbage").is_err());
    }
}
