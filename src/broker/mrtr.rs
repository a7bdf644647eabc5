//! Multi-round-trip requests (SEP-2322, MCP 2026-07-28) through the broker, for clients of both eras.
//!
//! A 2026-07-28 upstream asks for client input by answering a call, prompt or read with
//! `resultType: "input_required"`, `inputRequests` and an opaque `requestState`; the client retries
//! the same request with `inputResponses` and the state echoed.
//!
//! * To a 2026-07-28 client the result is relayed, its `requestState` replaced by the broker's own
//!   [`Seal`]: the upstream's state inside an HMAC-sealed token bound to the caller, the server and a
//!   digest of the request, expiring after `[broker] request_state_ttl` (10 minutes). A retry's state is opened before anything
//!   is forwarded, so a state replayed by another caller, against another request, altered or
//!   expired is refused (-32602) and never reaches the upstream.
//! * A 2025-11-25 session has no such result: the broker asks the client itself (elicitation,
//!   sampling, roots, on the calling session) and retries upstream with the answers.
//! * The other way round, a 2025-era upstream asks a 2026-07-28 client's call with a server-to-client
//!   request, which that client cannot receive. The call runs in a task of its own; such a request
//!   [`Parked`] the call and the client gets an input_required result whose sealed state names it.
//!   The client's retry hands its answers to the waiting upstream requests and waits on the call
//!   again: for its result, or the next requests. A parked call is cancelled upstream when its state
//!   expires; at most [`MAX_PARKED`] wait at once ([`MAX_PARKED_PER_CALLER`] per caller).
//!
//! The token is signed, not encrypted: like the upstream's own state, it is readable by the client
//! it was issued to. The key is random per process, so a state does not survive a broker restart.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmcp::model::{
    ClientResult, ErrorData, InputRequest, InputRequests, InputRequiredResult, InputResponses,
    RequestStateCodec, SealOptions, ServerRequest, ServerResult,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::upstream::raw;

use super::errors::Failure;
use super::forward::Call;
use super::pipeline::Op;
use super::pipeline::upstream_request;
use super::{Broker, Downstream};

/// How many times one request may come back `input_required` before the broker gives up on it.
pub(super) const MAX_ROUNDS: usize = 8;
/// Most input requests one result may carry.
pub(super) const MAX_INPUTS: usize = 16;

/// Calls parked at once, in all, and per caller.
pub(super) const MAX_PARKED: usize = 256;
pub(super) const MAX_PARKED_PER_CALLER: usize = 16;

/// What a sealed state carries: the upstream's own state, if it sent one, or the parked call it
/// continues.
#[derive(Debug, Serialize, Deserialize, Default)]
pub(super) struct Sealed {
    #[serde(rename = "s", default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<u64>,
    /// Under `[cluster]`: the instance holding the parked call.
    #[serde(rename = "i", default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// A server-to-client request from an upstream during a 2026-07-28 client's call, and where its
/// answer goes.
pub struct Ask {
    pub request: ServerRequest,
    pub reply: Answer,
}

/// Where the client's answer to an upstream's request goes.
pub type Answer = oneshot::Sender<Result<ClientResult, ErrorData>>;

/// What a parked call's task ends with: the pipeline's result and the upstream's raw JSON.
type Done = (Result<ServerResult, Failure>, Option<Value>);

/// A 2026-07-28 client's call to a 2025-era upstream, waiting for the client's answers.
pub(super) struct Parked {
    owner: String,
    expires: Instant,
    /// Asked and not answered yet: key in `inputRequests`, the request, where the answer goes.
    pending: Vec<(String, InputRequest, Answer)>,
    asks: mpsc::Receiver<Ask>,
    done: oneshot::Receiver<Done>,
    next_key: u32,
    /// Cancels the call upstream when the parked call is dropped (expired, refused, cancelled).
    _cancel: tokio_util::sync::DropGuard,
}

/// What waiting on a call gave.
pub(super) enum Waited {
    /// Its result.
    Done(Box<ServerResult>),
    /// It asked: the input_required result for the client (state sealed).
    Asked(InputRequiredResult),
}

/// Seals and opens the broker's `requestState` tokens.
pub(super) struct Seal {
    codec: RequestStateCodec,
}

impl Seal {
    /// A seal with a fresh random key. Without an OS random source the broker does not start: a
    /// fixed key would make every state forgeable.
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(Self {
            codec: RequestStateCodec::new(key.to_vec()),
        })
    }

    /// A seal whose key comes from `[cluster] secret_key`, so every instance opens what any other
    /// sealed. The key is derived for this use alone (the secret also seals other things).
    pub fn with_secret(secret: &str) -> Self {
        use sha2::{Digest, Sha256};
        let key = Sha256::new()
            .chain_update(b"mcp-broker requestState v1\0")
            .chain_update(secret.as_bytes())
            .finalize();
        Self {
            codec: RequestStateCodec::new(key.to_vec()),
        }
    }

    /// The token a client echoes instead of the upstream's `state` (or to continue a parked call).
    pub fn seal(&self, bind: &[u8], sealed: &Sealed, ttl: Duration) -> String {
        let payload = serde_json::to_vec(sealed).unwrap_or_default();
        self.codec
            .seal_with(&payload, &SealOptions::new().associated_data(bind).ttl(ttl))
    }

    /// The upstream's state inside a token from a client, if the token is this broker's, for this
    /// binding, and not expired.
    pub fn open(&self, bind: &[u8], token: &str) -> Result<Sealed, ErrorData> {
        let refused = |why: &str| {
            ErrorData::invalid_params(
                format!("requestState refused: {why}; start the request again without it"),
                None,
            )
        };
        let payload = self.codec.open_with(token, bind).map_err(|e| match e {
            rmcp::model::RequestStateError::Expired => refused("it expired"),
            _ => refused(
                "it was not issued by mcp-broker for this caller and request, or it was altered",
            ),
        })?;
        serde_json::from_slice(&payload).map_err(|_| refused("it is malformed"))
    }
}

/// What a sealed state is bound to: the caller, the server and the request (method, the upstream's
/// name or URI, and the arguments in canonical form), so it opens for the same request only.
pub(super) fn binding(
    caller: &Caller,
    server: &str,
    method: &str,
    original: &str,
    args: Option<&Value>,
) -> Vec<u8> {
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
    /// What [`Self::seal_marker`] sealed for `bind`, if `token` is one and has not expired.
    pub(super) fn open_marker(&self, bind: &[u8], token: &str) -> Option<String> {
        self.seal.open(bind, token).ok().and_then(|s| s.upstream)
    }

    /// A `requestState` that only says which of the broker's own steps asked (`marker`: consent,
    /// approval); the retry carrying it back is recognised by [`take_marker`].
    pub(super) fn seal_marker(&self, bind: &[u8], marker: &str) -> String {
        self.seal_marker_for(bind, marker, self.config().broker.request_state_ttl)
    }

    /// [`Self::seal_marker`], valid for `ttl`.
    pub(super) fn seal_marker_for(&self, bind: &[u8], marker: &str, ttl: Duration) -> String {
        self.seal.seal(
            bind,
            &Sealed {
                upstream: Some(marker.into()),
                parked: None,
                instance: None,
            },
            ttl,
        )
    }

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
                format!(
                    "server `{server}` asked for {} inputs at once (mcp-broker relays at most {MAX_INPUTS})",
                    inputs.len()
                ),
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
                        format!(
                            "server `{server}` asked for an input kind mcp-broker does not know"
                        ),
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

impl Broker {
    /// Run a 2026-07-28 client's call in a task of its own, so that it can wait for the client's
    /// answers across requests; wait for it here.
    pub(super) async fn forward_detached(
        &self,
        call: Call<'_>,
        op: Op,
        original: &str,
        bind: &[u8],
    ) -> Result<Waited, Failure> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Failure::Unavailable("mcp-broker is shutting down".into()))?;
        let (asks_tx, asks) = mpsc::channel(MAX_INPUTS);
        let (done_tx, done) = oneshot::channel();
        let cancel = CancellationToken::new();
        let mut down = call.down.clone();
        down.asks = Some(asks_tx);
        let (server, caller, tool) = (
            call.server.clone(),
            call.caller.clone(),
            call.tool.map(str::to_string),
        );
        let (timeout, ct) = (call.timeout, cancel.clone());
        let req = upstream_request(op, original);
        let name = original.to_string();
        tokio::spawn(async move {
            // The client's own requests are audited; this record only carries the upstream leg.
            let mut rec = me.audit.begin(&caller, "tool", &name);
            let st = me.state();
            let call = Call {
                server: &server,
                caller: &caller,
                tool: tool.as_deref(),
                down: &down,
                ct: &ct,
                timeout,
            };
            let (result, raw) =
                raw::capture(async { me.forward(&st, call, req, &mut rec).await.map(raw::typed) })
                    .await;
            rec.discard();
            let _ = done_tx.send((result, raw));
        });
        let parked = Parked {
            owner: call.caller.sub.clone(),
            expires: Instant::now() + self.config().broker.request_state_ttl,
            pending: Vec::new(),
            asks,
            done,
            next_key: 1,
            _cancel: cancel.drop_guard(),
        };
        self.wait_parked(parked, bind, call.ct).await
    }

    /// Continue the parked call a sealed state named: hand it the client's answers, then wait.
    pub(super) async fn resume_parked(
        &self,
        id: u64,
        responses: InputResponses,
        bind: &[u8],
        ct: &CancellationToken,
    ) -> Result<Waited, Failure> {
        let (_, mut p) = self.parked.remove(&id).ok_or_else(|| {
            Failure::Rpc(ErrorData::invalid_params(
                "requestState refused: the call it continues has ended or expired; start the request again without it",
                None,
            ))
        })?;
        let mut unanswered = Vec::new();
        for (key, input, reply) in std::mem::take(&mut p.pending) {
            match responses.get(&key) {
                Some(v) => {
                    let _ = reply.send(answer_of(&input, v.clone()));
                }
                None => unanswered.push((key, input, reply)),
            }
        }
        p.pending = unanswered;
        if !p.pending.is_empty() {
            // Asked again for what is still missing (SEP-2322: re-request, not an error).
            return Ok(Waited::Asked(self.park(p, bind)?));
        }
        self.wait_parked(p, bind, ct).await
    }

    /// Wait for the call's result, or its next requests to the client (then park it).
    async fn wait_parked(
        &self,
        mut p: Parked,
        bind: &[u8],
        ct: &CancellationToken,
    ) -> Result<Waited, Failure> {
        tokio::select! {
            biased;
            done = &mut p.done => {
                let (result, raw_json) = done.map_err(|_| {
                    Failure::Unavailable("the call ended without a result".into())
                })?;
                if let Some(v) = raw_json {
                    raw::keep(v);
                }
                result.map(|r| Waited::Done(Box::new(r)))
            }
            Some(ask) = p.asks.recv() => {
                let mut asks = vec![ask];
                while let Ok(a) = p.asks.try_recv() {
                    asks.push(a);
                }
                for a in asks {
                    let input = match a.request {
                        ServerRequest::CreateMessageRequest(r) => InputRequest::CreateMessage(r),
                        ServerRequest::ElicitRequest(r) => InputRequest::Elicitation(r),
                        ServerRequest::ListRootsRequest(r) => InputRequest::ListRoots(r),
                        _ => {
                            let _ = a.reply.send(Err(ErrorData::invalid_request(
                                "mcp-broker cannot ask a 2026-07-28 client this",
                                None,
                            )));
                            continue;
                        }
                    };
                    let key = format!("mcp-broker-{}", p.next_key);
                    p.next_key += 1;
                    p.pending.push((key, input, a.reply));
                }
                Ok(Waited::Asked(self.park(p, bind)?))
            }
            _ = ct.cancelled() => Err(Failure::Cancelled("request cancelled by the client".into())),
        }
    }

    /// Drop the parked calls whose state expired (each is cancelled upstream as it goes).
    pub(super) fn sweep_parked(&self) {
        let now = Instant::now();
        self.parked.retain(|_, q| q.expires > now);
    }

    /// Calls parked now (a test and metrics hook).
    pub fn parked_calls(&self) -> usize {
        self.parked.len()
    }

    /// Keep `p` for the client's retry; the input_required result that asks for its pending requests.
    fn park(&self, mut p: Parked, bind: &[u8]) -> Result<InputRequiredResult, Failure> {
        let now = Instant::now();
        self.sweep_parked();
        let mine = self.parked.iter().filter(|q| q.owner == p.owner).count();
        if self.parked.len() >= MAX_PARKED || mine >= MAX_PARKED_PER_CALLER {
            return Err(Failure::Refused(format!(
                "too many calls wait for client input (at most {MAX_PARKED_PER_CALLER} per caller, {MAX_PARKED} in all); answer or abandon one first"
            )));
        }
        let requests: InputRequests = p
            .pending
            .iter()
            .map(|(k, input, _)| (k.clone(), input.clone()))
            .collect();
        let ttl = self.config().broker.request_state_ttl;
        p.expires = now + ttl;
        let id = self.next_park.fetch_add(1, Ordering::Relaxed);
        self.parked.insert(id, p);
        let state = self.seal.seal(
            bind,
            &Sealed {
                upstream: None,
                parked: Some(id),
                instance: self.cluster.as_ref().map(|c| c.tag.clone()),
            },
            ttl,
        );
        // Under `[cluster]` the state names the instance holding the call (`TAG~…`), so a retry
        // that lands elsewhere is passed here (see `front::forward`).
        let state = match &self.cluster {
            Some(c) => format!("{}~{state}", c.tag),
            None => state,
        };
        let result = InputRequiredResult::new(Some(requests), Some(state));
        raw::keep(serde_json::to_value(&result).unwrap_or_default());
        Ok(result)
    }
}

/// A client's answer in `inputResponses`, as the result type of the request it answers.
fn answer_of(input: &InputRequest, v: Value) -> Result<ClientResult, ErrorData> {
    let bad = |e: serde_json::Error| {
        ErrorData::invalid_params(format!("the client's answer does not decode: {e}"), None)
    };
    Ok(match input {
        InputRequest::CreateMessage(_) => {
            ClientResult::CreateMessageResult(Box::new(serde_json::from_value(v).map_err(bad)?))
        }
        InputRequest::Elicitation(_) => {
            ClientResult::ElicitResult(serde_json::from_value(v).map_err(bad)?)
        }
        InputRequest::ListRoots(_) => {
            ClientResult::ListRootsResult(serde_json::from_value(v).map_err(bad)?)
        }
        _ => return Err(ErrorData::invalid_params("unknown input kind", None)),
    })
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
        let seal = Seal::new().expect("random key");
        let args = serde_json::json!({"b": 1, "a": [true, {"y": 2, "x": 1}]});
        let bind = binding(&caller("alice"), "ref", "tools/call", "t", Some(&args));
        let token = seal.seal(
            &bind,
            &Sealed {
                upstream: Some("upstream-state".into()),
                parked: None,
                instance: None,
            },
            Duration::from_secs(600),
        );
        assert_eq!(
            seal.open(&bind, &token).expect("opens").upstream.as_deref(),
            Some("upstream-state")
        );
        // Same arguments in another key order bind the same.
        let reordered = serde_json::json!({"a": [true, {"x": 1, "y": 2}], "b": 1});
        let same = binding(&caller("alice"), "ref", "tools/call", "t", Some(&reordered));
        assert!(seal.open(&same, &token).is_ok());
        // Another caller, server, tool or argument: refused.
        for other in [
            binding(&caller("bob"), "ref", "tools/call", "t", Some(&args)),
            binding(&caller("alice"), "other", "tools/call", "t", Some(&args)),
            binding(&caller("alice"), "ref", "tools/call", "u", Some(&args)),
            binding(
                &caller("alice"),
                "ref",
                "tools/call",
                "t",
                Some(&serde_json::json!({"b": 2})),
            ),
        ] {
            let e = seal.open(&other, &token).expect_err("bound elsewhere");
            assert_eq!(e.code, rmcp::model::ErrorCode::INVALID_PARAMS);
        }
        // Altered, or from another broker process: refused.
        assert!(seal.open(&bind, &format!("{token}x")).is_err());
        assert!(
            Seal::new()
                .expect("random key")
                .open(&bind, &token)
                .is_err()
        );
        assert!(seal.open(&bind, "garbage").is_err());
    }

    #[test]
    fn an_expired_state_is_refused() {
        let seal = Seal::new().expect("random key");
        let bind = binding(&caller("alice"), "ref", "tools/call", "t", None);
        let token = seal.seal(&bind, &Sealed::default(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        let e = seal.open(&bind, &token).expect_err("expired");
        assert!(e.message.contains("expired"), "{}", e.message);
    }
}
