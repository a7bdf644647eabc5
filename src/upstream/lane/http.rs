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
            let mut events = lane_stream(&self.client, &ctx, session, link, first);
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) => {
                        let Some(data) = ev.data.as_deref().filter(|d| !d.trim().is_empty()) else {
                            continue;
                        };
                        if let Some(a) = self.on_message(data, call.id, router).await {
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
