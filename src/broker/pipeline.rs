//! The one path every client request takes, in one order:
//!
//! caller limit → resolve (catalog) → decide (the policy decision lists use) → server and tool
//! limits → audit decision → credential and connection → forward → result mapping.
//!
//! The audit record is opened first and written when it is dropped, however the request ends.
//! A new method is an arm of [`Op`], not a copy of this path.

// logging/setLevel and resources/subscribe are deprecated by SEP-2577 in 2026-07-28, but live in
// 2025-11-25, which Claude and most clients speak.
#![allow(deprecated)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::{
    ErrorData,
    model::{
        CallToolRequestParams, CallToolResponse, ClientRequest, CompleteRequest,
        CompleteRequestParams, CompleteResult, GetPromptRequestParams, GetPromptResponse,
        InputResponses, LoggingLevel, ReadResourceRequestParams, ReadResourceResponse, Reference,
        RequestId, RequestMetaObject, ResourceContents, ServerResult, SetLevelRequest,
        SetLevelRequestParams, SubscribeRequest, SubscribeRequestParams, UnsubscribeRequest,
        UnsubscribeRequestParams,
    },
};
use tokio_util::sync::CancellationToken;

use crate::audit::{CallRecord, Outcome, clip};
use crate::auth::Caller;
use crate::catalog::Item;
use crate::cluster::limits::{Permit, acquire_slot, take_token};
use crate::limits::{Refusal, retry_hint, tool_key};
use crate::metrics;
use crate::policy::Kind;
use crate::upstream::raw;

use super::errors::{Failure, service_error, tool_error_text, unexpected};
use super::forward::Call;
use super::sessions::{MAX_INFLIGHT, MAX_SUBSCRIPTIONS, Slot, rank};
use super::state::State;
use super::{Broker, Downstream, mrtr};
use super::{approvals, consent};

/// A client request the broker serves.
#[derive(Clone)]
pub enum Op {
    List(Kind),
    CallTool(CallToolRequestParams),
    GetPrompt(GetPromptRequestParams),
    ReadResource(ReadResourceRequestParams),
    Subscribe(String),
    Unsubscribe(String),
    Complete(CompleteRequestParams),
    SetLevel(LoggingLevel),
}

/// Its answer.
pub enum Reply {
    /// The items of one list the caller may see, as the upstreams sent them (names/URIs namespaced).
    /// With the milliseconds it may be cached (the smallest hint of the servers it merges).
    Listed(Vec<Item>, u64),
    Tool(CallToolResponse),
    Prompt(GetPromptResponse),
    Resource(ReadResourceResponse),
    Complete(CompleteResult),
    Empty,
}

impl Op {
    /// What a sealed `requestState` echoes back in (calls, prompts and reads; see `mrtr`).
    fn mrtr(&mut self) -> Option<(&mut Option<String>, &mut Option<InputResponses>)> {
        match self {
            Op::CallTool(p) => Some((&mut p.request_state, &mut p.input_responses)),
            Op::GetPrompt(p) => Some((&mut p.request_state, &mut p.input_responses)),
            Op::ReadResource(p) => Some((&mut p.request_state, &mut p.input_responses)),
            _ => None,
        }
    }

    /// The arguments a sealed state is bound to, besides the name.
    fn arguments(&self) -> Option<serde_json::Value> {
        match self {
            Op::CallTool(p) => p.arguments.clone().map(serde_json::Value::Object),
            Op::GetPrompt(p) => p.arguments.clone().map(serde_json::Value::Object),
            _ => None,
        }
    }

    /// The audit record's `kind`.
    fn kind(&self) -> &'static str {
        match self {
            Op::List(_) => "list",
            Op::CallTool(_) => Kind::Tool.as_str(),
            Op::GetPrompt(_) => Kind::Prompt.as_str(),
            Op::ReadResource(_) => Kind::Resource.as_str(),
            Op::Subscribe(_) => "subscribe",
            Op::Unsubscribe(_) => "unsubscribe",
            Op::Complete(_) => "completion",
            Op::SetLevel(_) => "set_level",
        }
    }

    /// The name the client used (the audit record's `name`).
    fn name(&self) -> String {
        match self {
            Op::List(w) => w.list_name().to_string(),
            Op::CallTool(p) => p.name.to_string(),
            Op::GetPrompt(p) => p.name.clone(),
            Op::ReadResource(p) => p.uri.clone(),
            Op::Subscribe(u) | Op::Unsubscribe(u) => u.clone(),
            Op::Complete(p) => match &p.r#ref {
                Reference::Prompt(p) => p.name.clone(),
                Reference::Resource(r) => r.uri.clone(),
                _ => String::new(),
            },
            Op::SetLevel(l) => format!("{l:?}").to_lowercase(),
        }
    }

    /// Requests that reach an upstream: refused once the broker drains, counted by the caller's
    /// rate limit.
    fn forwards(&self) -> bool {
        !matches!(self, Op::List(_) | Op::SetLevel(_) | Op::Unsubscribe(_))
    }
}

/// A retry answering one of the broker's own `input_required` results (its opened state is
/// `marker`): the state is the broker's, not an upstream's, so it is cleared; the client's answers
/// are handed back (empty when it sent none).
fn take_marker(op: &mut Op, marker: &str) -> Option<InputResponses> {
    let (state, responses) = op.mrtr()?;
    if state.as_deref() != Some(marker) {
        return None;
    }
    *state = None;
    Some(responses.take().unwrap_or_default())
}

/// Where a request goes once resolved.
struct Target {
    server: Arc<str>,
    kind: Kind,
    original: String,
    /// A tool or prompt name that is a catalog entry (not one made up for an unprefixed server);
    /// false for resources, whose URIs never label metrics.
    listed: bool,
}

impl Broker {
    /// Serve one client request: the whole pipeline. Refusals of tool calls are `isError` results;
    /// of anything else, JSON-RPC errors.
    pub async fn handle(
        &self,
        caller: &Caller,
        op: Op,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<Reply, ErrorData> {
        let is_tool = matches!(op, Op::CallTool(_));
        let mut rec = self.audit.begin(caller, op.kind(), &op.name());
        rec.request(request_id_value(&down.request_id), down.session);
        rec.trace(client_traceparent(&op).or(down.traceparent.as_deref()));
        match &op {
            Op::CallTool(p) => rec.arguments(p.arguments.as_ref()),
            Op::GetPrompt(p) => rec.arguments(p.arguments.as_ref()),
            _ => {}
        }
        // Boxed: the pipeline's state is large; on the heap it cannot overflow the stack of the task
        // that polls it (seen with 2026-07-28 stateless calls in debug builds).
        let r = Box::pin(self.run(caller, op, &down, &ct, &mut rec)).await;
        match r {
            Ok(reply) => Ok(reply),
            Err(f) => {
                f.record(&mut rec);
                if matches!(f, Failure::Limited(_)) && self.limit_record_throttled(&caller.sub) {
                    rec.discard();
                }
                if is_tool {
                    f.into_tool_result().map(|r| Reply::Tool(r.into()))
                } else {
                    Err(f.into_error())
                }
            }
        }
    }

    async fn run(
        &self,
        caller: &Caller,
        mut op: Op,
        down: &Downstream,
        ct: &CancellationToken,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        if op.forwards() && self.is_draining() {
            let msg = "mcp-broker is shutting down and accepts no new calls; retry shortly";
            rec.decision(false, msg, Some("drain".into()));
            rec.finish(Outcome::Error, Some(msg.into()));
            return Err(Failure::Refused(msg.into()));
        }
        let st = self.state();
        if let Some(e) = too_long(&op) {
            rec.decision(false, &e.message, Some("limit".into()));
            return Err(Failure::Rpc(e));
        }
        // Every request that names an upstream item counts against the caller's limit, denied and
        // unknown ones too. Lists and setLevel are answered locally and are not counted: clients send
        // several at connect, and a limit meant for calls must not break connecting.
        if op.forwards()
            && let Err(r) = self.limit_caller(&st, caller).await
        {
            // The metric names the server the request was for, where it names a known one.
            let server = self
                .resolve(&st, &mut op, !down.stateless)
                .map(|t| t.server)
                .ok();
            return Err(self.refused(rec, server.as_deref().unwrap_or_default(), r));
        }
        // A name asked for while upstreams are still starting may belong to one of them.
        if op.forwards() && !self.upstreams().iter().all(|u| u.attempted()) {
            self.wait_started(st.config.broker.startup_wait).await;
        }
        let target = match &mut op {
            Op::List(which) => {
                let which = *which;
                self.prepare_list(caller, down.session).await;
                let pending = self.pending_consent(&st, caller).await;
                let (items, ttl) = self.listed(caller, which, rec, !down.stateless, &pending);
                return Ok(Reply::Listed(items, ttl));
            }
            Op::SetLevel(level) => return self.set_level(&st, caller, *level, down, rec).await,
            op => self.resolve(&st, op, !down.stateless).inspect_err(|f| {
                if let Failure::Rpc(e) = f {
                    rec.decision(false, &e.message, Some("catalog".into()));
                }
            })?,
        };
        let Target {
            server,
            kind,
            original,
            listed,
        } = target;
        rec.route(&server, &original);
        if listed {
            rec.listed_name();
        }
        // `[guard]`: a drifted or suspicious tool, kept out of the catalog, is refused here whatever
        // route reached it (its exposed name, or an unprefixed server's unlisted names).
        if kind == Kind::Tool
            && let Some(reason) = self.held_refusal(&server, &original)
        {
            rec.decision(false, &reason, Some("guard".into()));
            return Err(Failure::Refused(reason));
        }
        let args = match &op {
            Op::CallTool(p) => p.arguments.as_ref(),
            _ => None,
        };
        let d = st
            .policy
            .decide_call(caller, &server, kind, &original, args);
        rec.decision(d.allow, &d.reason, Some(d.label()));
        if !d.allow {
            // A completion for something hidden completes nothing, as if it did not exist.
            if matches!(op, Op::Complete(_)) {
                rec.finish(Outcome::Denied, None);
                return Ok(Reply::Complete(CompleteResult::default()));
            }
            return Err(Failure::Refused(d.reason));
        }
        // A server that does not offer completions completes nothing (rmcp 3.11 servers answer
        // -32601 to an unadvertised method; the broker advertises completions for all of them).
        if matches!(op, Op::Complete(_))
            && st
                .upstream(&server)
                .and_then(|u| u.connection_in(!down.stateless))
                .and_then(|c| c.info.clone())
                .is_some_and(|i| i.capabilities.completions.is_none())
        {
            rec.finish(Outcome::Ok, None);
            return Ok(Reply::Complete(CompleteResult::default()));
        }
        // A retry of an input_required request echoes the broker's sealed state: opened here (for
        // this caller and this very request only) before anything goes upstream.
        // Only 2026-07-28 clients are given sealed states: a 2025 session's call that echoes none
        // skips the digest.
        let echoed = op.mrtr().is_some_and(|(state, _)| state.is_some());
        let bind = if down.stateless || echoed {
            mrtr::binding(
                caller,
                &server,
                op.kind(),
                &original,
                op.arguments().as_ref(),
            )
        } else {
            Vec::new()
        };
        let mut parked = None;
        if let Some((state, _)) = op.mrtr()
            && let Some(token) = state.take()
        {
            // A parked call's state may start with its instance's tag (`[cluster]`).
            let token = match token.split_once('~') {
                Some((tag, rest))
                    if tag.len() == 8 && tag.bytes().all(|b| b.is_ascii_hexdigit()) =>
                {
                    rest.to_string()
                }
                _ => token,
            };
            match self.seal.open(&bind, &token) {
                Ok(sealed) => {
                    // Under `[cluster]` a parked call lives on the instance that parked it.
                    if sealed.parked.is_some()
                        && let Some(c) = &self.cluster
                        && sealed.instance.as_deref().is_some_and(|t| t != c.tag)
                    {
                        let why = "requestState refused: the call it continues waits on another broker instance (parked calls are not shared); start the request again without it";
                        rec.decision(false, why, Some("request_state".into()));
                        return Err(Failure::Rpc(ErrorData::invalid_params(why, None)));
                    }
                    *state = sealed.upstream;
                    parked = sealed.parked;
                }
                Err(e) => {
                    rec.decision(false, &e.message, Some("request_state".into()));
                    return Err(Failure::Rpc(e));
                }
            }
        }
        // A session's requests in flight are bounded (each holds routes and a connection slot).
        let session = down.session.and_then(|id| self.sessions.get(id));
        let _slot = match &session {
            Some(s) => Some(Slot::take(&s.inflight, MAX_INFLIGHT).ok_or_else(|| {
                self.refused(
                    rec,
                    &server,
                    Refusal {
                        scope: "session",
                        message: format!(
                            "this session already has {MAX_INFLIGHT} requests in flight; retry when one finishes"
                        ),
                        retry_after: Duration::from_secs(1),
                    },
                )
            })?),
            None => None,
        };
        let tool = matches!(op, Op::CallTool(_)).then_some(original.as_str());
        let timeout = call_timeout(&st, &server, tool);
        let _permit = self.admit(&st, caller, &server, tool, timeout, rec).await?;
        // A per-user OAuth server the caller has not connected: ask them first.
        if consent::consent_auth(&st, &server).is_some() {
            // A retry answering the broker's own consent input_required: its state is the broker's.
            let retry = take_marker(&mut op, consent::CONSENT_STATE).is_some();
            let asked = self
                .ensure_connected(&server, caller, down, ct, rec, retry, &bind)
                .await?;
            if let consent::Consent::Ask(ir) = asked {
                return self.map_result(
                    &server,
                    op.kind(),
                    ServerResult::InputRequiredResult(ir),
                    rec,
                );
            }
            if !listed && original == consent::AUTHORIZE && matches!(op, Op::CallTool(_)) {
                rec.finish(Outcome::Ok, None);
                return Ok(Reply::Tool(CallToolResponse::Complete(
                    rmcp::model::CallToolResult::success(vec![rmcp::model::ContentBlock::text(
                        format!("`{server}` is connected for you; its tools are listed now."),
                    )]),
                )));
            }
        }
        // An `effect = "approve"` rule: a grant covers the call, or someone approves it now.
        if let Some(rule) = &d.approval
            && let Op::CallTool(p) = &op
        {
            let arguments = p.arguments.clone();
            let exposed = p.name.to_string();
            let answers = take_marker(&mut op, approvals::APPROVAL_STATE);
            let ask = approvals::Ask {
                server: &server,
                exposed: &exposed,
                original: &original,
                arguments: arguments.as_ref(),
                rule,
            };
            let asked = self
                .ensure_approved(ask, caller, down, ct, rec, answers, &bind)
                .await?;
            if let approvals::Approved::Ask(ir) = asked {
                return self.map_result(
                    &server,
                    op.kind(),
                    ServerResult::InputRequiredResult(ir),
                    rec,
                );
            }
        }
        let call = Call {
            server: &server,
            caller,
            tool,
            down,
            ct,
            timeout,
        };
        let reply = match op {
            Op::Subscribe(_) => return self.subscribe(&st, call, &original, rec).await,
            Op::Unsubscribe(_) => return self.unsubscribe(call, &original, rec).await,
            op => {
                self.forward_rounds(call, op, &original, &bind, parked, rec)
                    .await?
            }
        };
        match &reply {
            Reply::Tool(CallToolResponse::Complete(r)) if r.is_error == Some(true) => {
                rec.finish(Outcome::ToolError, tool_error_text(r))
            }
            _ => rec.finish(Outcome::Ok, None),
        }
        Ok(reply)
    }

    /// Forward a call, prompt or read; an `input_required` answer is sealed for a 2026-07-28
    /// client, or answered by asking a 2025-era client on its session and retried (see `mrtr`).
    async fn forward_rounds(
        &self,
        call: Call<'_>,
        mut op: Op,
        original: &str,
        bind: &[u8],
        parked: Option<u64>,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        let what = op.kind();
        if call.down.stateless {
            // Detached, so a 2025-era upstream's request to the client can park it (see `mrtr`).
            let waited = match parked {
                Some(id) => {
                    let answers = op.mrtr().and_then(|(_, r)| r.take()).unwrap_or_default();
                    self.resume_parked(id, answers, bind, call.ct).await?
                }
                None => self.forward_detached(call, op, original, bind).await?,
            };
            let result = match waited {
                mrtr::Waited::Asked(ir) => ServerResult::InputRequiredResult(ir),
                mrtr::Waited::Done(r) => match *r {
                    ServerResult::InputRequiredResult(mut ir) => {
                        // A 2026-07-28 upstream's own input_required: its state sealed for this caller.
                        let sealed = mrtr::Sealed {
                            upstream: ir.request_state.take(),
                            parked: None,
                            instance: None,
                        };
                        let sealed =
                            self.seal
                                .seal(bind, &sealed, self.config().broker.request_state_ttl);
                        raw::amend(|v| {
                            if let Some(o) = v.as_object_mut() {
                                o.insert("requestState".into(), sealed.clone().into());
                            }
                        });
                        ir.request_state = Some(sealed);
                        ServerResult::InputRequiredResult(ir)
                    }
                    other => other,
                },
            };
            return self.map_result(call.server, what, result, rec);
        }
        if parked.is_some() {
            return Err(Failure::Rpc(ErrorData::invalid_params(
                "requestState refused: it continues a 2026-07-28 request",
                None,
            )));
        }
        let st = self.state();
        for _ in 0..=mrtr::MAX_ROUNDS {
            let req = upstream_request(op.clone(), original);
            let result = raw::typed(self.forward(&st, call, req, rec).await?);
            let ServerResult::InputRequiredResult(mut ir) = result else {
                return self.map_result(call.server, what, result, rec);
            };
            let inputs = ir.input_requests.take().unwrap_or_default();
            let answers = self
                .answer_inputs(call.server, call.down, inputs, call.ct)
                .await
                .map_err(Failure::Rpc)?;
            if let Some((state, responses)) = op.mrtr() {
                *state = ir.request_state.take();
                *responses = Some(answers);
            }
        }
        Err(Failure::Rpc(ErrorData::internal_error(
            format!(
                "server `{}` still asked for input after {} rounds; mcp-broker gave up",
                call.server,
                mrtr::MAX_ROUNDS
            ),
            None,
        )))
    }

    /// Which server and upstream name a request is for; unknown names are -32602 (resources:
    /// resource not found), as a server would answer itself.
    fn resolve(&self, st: &State, op: &mut Op, legacy: bool) -> Result<Target, Failure> {
        let cat = self.catalog_in(legacy);
        let named = |kind: Kind, exposed: &str| -> Result<Target, Failure> {
            let entry = match kind {
                Kind::Tool => cat.tools.get(exposed).map(|e| (&e.server, &e.original)),
                _ => cat.prompts.get(exposed).map(|e| (&e.server, &e.original)),
            };
            let (server, original, listed) = match entry {
                Some((s, o)) => (s.clone(), o.clone(), true),
                // Held by `[guard]`: routed, so that the call is refused with the reason.
                None => match (kind == Kind::Tool)
                    .then(|| self.held_route(exposed))
                    .flatten()
                    .or_else(|| {
                        unlisted(st, exposed, kind == Kind::Tool).map(|s| (s, exposed.to_string()))
                    })
                    .or_else(|| authorize_tool(st, exposed, kind))
                {
                    Some((s, original)) => (s, original, false),
                    None => {
                        return Err(Failure::Rpc(ErrorData::invalid_params(
                            format!("unknown {} `{}`", kind.as_str(), clip(exposed)),
                            None,
                        )));
                    }
                },
            };
            Ok(Target {
                server,
                kind,
                original,
                listed,
            })
        };
        let uri = |uri: &str| -> Result<Target, Failure> {
            let route = cat.route_uri(uri).ok_or_else(|| {
                Failure::Rpc(ErrorData::resource_not_found(
                    format!("no server offers resource `{}`", clip(uri)),
                    None,
                ))
            })?;
            Ok(Target {
                server: route.server,
                kind: Kind::Resource,
                original: route.original,
                listed: false,
            })
        };
        match op {
            Op::CallTool(p) => named(Kind::Tool, &p.name),
            Op::GetPrompt(p) => named(Kind::Prompt, &p.name),
            Op::ReadResource(p) => uri(&p.uri),
            Op::Subscribe(u) | Op::Unsubscribe(u) => uri(u),
            Op::Complete(p) => match &p.r#ref {
                Reference::Prompt(p) => named(Kind::Prompt, &p.name),
                Reference::Resource(r) => match cat.templates.get(&r.uri) {
                    Some(e) => Ok(Target {
                        server: e.server.clone(),
                        kind: Kind::Resource,
                        original: e.original.clone(),
                        listed: false,
                    }),
                    None => uri(&r.uri),
                },
                _ => Err(Failure::Rpc(ErrorData::invalid_params(
                    "unsupported completion reference",
                    None,
                ))),
            },
            Op::List(_) | Op::SetLevel(_) => Err(Failure::Rpc(ErrorData::internal_error(
                "not a routed request",
                None,
            ))),
        }
    }

    /// The upstream's result, with the URIs the broker namespaces rewritten and, under
    /// `[guard] mask_results`, secrets masked. Every forwarded call, prompt and read ends here,
    /// whichever revision, transport or round trip it took.
    fn map_result(
        &self,
        server: &Arc<str>,
        what: &str,
        mut result: ServerResult,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        if let Some(m) = &self.state().masker {
            mask_result(m, server, &mut result, rec);
        }
        Ok(match result {
            ServerResult::CallToolResult(r) => Reply::Tool(CallToolResponse::Complete(r)),
            ServerResult::CreateTaskResult(r) => Reply::Tool(CallToolResponse::Task(r)),
            ServerResult::GetPromptResult(r) => Reply::Prompt(GetPromptResponse::Complete(r)),
            ServerResult::ReadResourceResult(mut r) => {
                let cat = self.catalog();
                for c in &mut r.contents {
                    match c {
                        ResourceContents::TextResourceContents { uri, .. }
                        | ResourceContents::BlobResourceContents { uri, .. } => {
                            *uri = cat.expose_uri_of(server, uri);
                        }
                        _ => {}
                    }
                }
                Reply::Resource(ReadResourceResponse::Complete(r))
            }
            ServerResult::CompleteResult(r) => Reply::Complete(r),
            // 2026-07-28 multi-round-trip: the request it answers decides the wrapper.
            ServerResult::InputRequiredResult(r) => match what {
                "tool" => Reply::Tool(CallToolResponse::InputRequired(r)),
                "prompt" => Reply::Prompt(GetPromptResponse::InputRequired(r)),
                "resource" => Reply::Resource(ReadResourceResponse::InputRequired(r)),
                _ => return Err(Failure::Rpc(unexpected(server))),
            },
            _ => return Err(Failure::Rpc(unexpected(server))),
        })
    }

    // -- limits -----------------------------------------------------------------------------------

    /// The caller's own rate limit (`[limits] per_caller`), before anything else is done.
    async fn limit_caller(&self, st: &State, caller: &Caller) -> Result<(), Refusal> {
        let Some(limit) = st.config.limits.per_caller.as_ref() else {
            return Ok(());
        };
        let cluster = self.cluster().map(|c| &**c);
        take_token(cluster, &self.limiter, "caller", &caller.sub, limit)
            .await
            .map_err(|wait| Refusal {
                scope: "caller",
                message: format!(
                    "rate limit exceeded for caller `{}` ({:.3}/s, burst {}); {}",
                    caller.sub,
                    limit.per_second,
                    limit.burst,
                    retry_hint(wait)
                ),
                retry_after: wait,
            })
    }

    /// Server and tool rate limits, then the server's concurrency cap. The permit, if any, is held
    /// until the call ends. Under `[cluster]` both are cluster-wide while Redis answers, and this
    /// instance's own otherwise ([`crate::cluster::limits`]).
    async fn admit(
        &self,
        st: &State,
        caller: &Caller,
        server: &Arc<str>,
        tool: Option<&str>,
        timeout: Duration,
        rec: &mut CallRecord,
    ) -> Result<Option<Permit>, Failure> {
        let _ = caller;
        let cluster = self.cluster().map(|c| &**c);
        let Some(cfg) = st.config.server(server) else {
            return Ok(None);
        };
        let tool_limit = tool
            .and_then(|t| cfg.tool_limits.get(t))
            .and_then(|l| l.rate_limit.as_ref());
        let checks = [
            ("server", server.to_string(), cfg.rate_limit.as_ref()),
            (
                "tool",
                tool_key(server, tool.unwrap_or_default()),
                tool_limit,
            ),
        ];
        for (scope, key, limit) in checks {
            let Some(limit) = limit else { continue };
            if let Err(wait) = take_token(cluster, &self.limiter, scope, &key, limit).await {
                let what = match scope {
                    "server" => format!("server `{server}`"),
                    _ => format!("tool `{}` on server `{server}`", tool.unwrap_or_default()),
                };
                return Err(self.refused(
                    rec,
                    server,
                    Refusal {
                        scope,
                        message: format!(
                            "rate limit exceeded for {what} ({:.3}/s, burst {}); {}",
                            limit.per_second,
                            limit.burst,
                            retry_hint(wait)
                        ),
                        retry_after: wait,
                    },
                ));
            }
        }
        let Some(slots) = st.concurrency.get(server) else {
            return Ok(None);
        };
        match acquire_slot(cluster, slots, server, timeout, timeout).await {
            Some(p) => Ok(Some(p)),
            None => Err(self.refused(
                rec,
                server,
                Refusal {
                    scope: "concurrency",
                    message: format!(
                        "server `{server}` already has {} calls in flight (max_concurrent) and none finished within {timeout:?}; retry after 1 s",
                        slots.max
                    ),
                    retry_after: Duration::from_secs(1),
                },
            )),
        }
    }

    fn refused(&self, rec: &mut CallRecord, server: &str, r: Refusal) -> Failure {
        metrics::global().rate_limited(r.scope, server);
        rec.rate_limited(&r.message);
        Failure::Limited(r)
    }

    /// At most one limit-refusal record per caller per second: a flooding caller cannot rotate
    /// everyone else's records out of the trail. True = this one is not written.
    fn limit_record_throttled(&self, sub: &str) -> bool {
        let now = Instant::now();
        let mut throttled = false;
        self.limit_audited
            .entry(sub.to_string())
            .and_modify(|t| {
                if now.duration_since(*t) < Duration::from_secs(1) {
                    throttled = true;
                } else {
                    *t = now;
                }
            })
            .or_insert(now);
        if self.limit_audited.len() > 10_000 {
            self.limit_audited
                .retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
        }
        throttled
    }

    // -- session-scoped methods -------------------------------------------------------------------

    /// `resources/subscribe`: subscribe upstream once per (connection, URI); the session is
    /// remembered so updates reach it (and only it, among sessions on that connection).
    async fn subscribe(
        &self,
        st: &State,
        call: Call<'_>,
        original: &str,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        let session = call.down.session.ok_or_else(no_session)?;
        let up = st
            .upstream(call.server)
            .ok_or_else(|| Failure::Rpc(unexpected(call.server)))?;
        let owner = Self::owner_for(up, call.caller, Some(session));
        let (conn, kind) = self
            .connection_for(st, up, call.caller, &owner, None, true)
            .await?;
        rec.credential(kind);
        let key = (call.server.clone(), conn.id, original.to_string());
        let counter = self.sessions.get(session).ok_or_else(no_session)?;
        let first = {
            let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
            let set = subs.entry(key.clone()).or_default();
            let first = set.is_empty();
            if !set.contains(&session) {
                // Counted until unsubscribed (not a guard: the subscription outlives this call).
                let taken = Slot::take(&counter.subscriptions, MAX_SUBSCRIPTIONS)
                    .map(std::mem::forget)
                    .is_some();
                if !taken {
                    if set.is_empty() {
                        subs.remove(&key);
                    }
                    return Err(Failure::Rpc(ErrorData::invalid_request(
                        format!(
                            "this session already has {MAX_SUBSCRIPTIONS} resource subscriptions; unsubscribe from one first"
                        ),
                        None,
                    )));
                }
                set.insert(session);
            }
            first
        };
        if first {
            rec.upstream_started();
            let subscribed = if conn.modern {
                // 2026-07-28 replaced resources/subscribe with a listen stream filtered to the URI.
                self.listen_resource(&key, &conn).await
            } else {
                let req = ClientRequest::SubscribeRequest(SubscribeRequest::new(
                    SubscribeRequestParams::new(original.to_string()),
                ));
                conn.peer.send_request(req).await.map(|_| ())
            };
            if let Err(e) = subscribed {
                // Not subscribed after all: whoever joined this key gives its count back.
                let ids = self
                    .subscriptions
                    .lock()
                    .ok()
                    .and_then(|mut subs| subs.remove(&key))
                    .unwrap_or_default();
                for id in ids {
                    if let Some(s) = self.sessions.get(id) {
                        s.subscriptions
                            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    }
                }
                return Err(Failure::Rpc(service_error(e)));
            }
            rec.upstream_finished();
        }
        rec.finish(Outcome::Ok, None);
        Ok(Reply::Empty)
    }

    async fn unsubscribe(
        &self,
        call: Call<'_>,
        original: &str,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        let session = call.down.session.ok_or_else(no_session)?;
        self.unsubscribe_session(call.server, original, session, call.caller)
            .await;
        // Under `[cluster]` the subscription may have been made on another instance.
        if let Some(c) = &self.cluster
            && let Some(front) = self.sessions.get(session).and_then(|s| s.front.clone())
        {
            let _ = c
                .broadcast(&crate::cluster::Wire::Unsubscribed {
                    from: c.tag.clone(),
                    session: front.to_string(),
                    server: call.server.to_string(),
                    uri: original.to_string(),
                })
                .await;
        }
        rec.finish(Outcome::Ok, None);
        Ok(Reply::Empty)
    }

    /// `session` no longer wants updates of `server`'s `uri` (the upstream's own URI).
    async fn unsubscribe_session(
        &self,
        server: &Arc<str>,
        original: &str,
        session: u64,
        caller: &Caller,
    ) {
        let mut last_on = Vec::new();
        let mut removed = 0;
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.retain(|(srv, conn, uri), ids| {
                if srv == server && uri == original && ids.remove(&session) {
                    removed += 1;
                    if ids.is_empty() {
                        last_on.push(*conn);
                    }
                }
                !ids.is_empty()
            });
        }
        if let Some(s) = self.sessions.get(session) {
            s.subscriptions
                .fetch_sub(removed, std::sync::atomic::Ordering::AcqRel);
        }
        for conn in last_on {
            let key = (server.clone(), conn, original.to_string());
            self.end_subscription(&key, caller, Some(session)).await;
        }
    }

    /// An unsubscribe another instance of the cluster served, for this instance's copy of the
    /// session.
    pub async fn unsubscribe_front(&self, front: &str, server: &str, uri: &str) {
        let Some(s) = self.sessions.by_front(front) else {
            return;
        };
        let Some(server) = self.state().upstream(server).map(|u| u.name.clone()) else {
            return;
        };
        self.unsubscribe_session(&server, uri, s.id, &s.caller)
            .await;
    }

    /// End upstream what `key` subscribed to, once its last subscriber (a session of `caller`)
    /// left: stop its listen stream (2026-07-28), or send resources/unsubscribe on the connection
    /// it went on, if that is still open.
    pub(super) async fn end_subscription(
        &self,
        key: &super::SubscriptionKey,
        caller: &Caller,
        session: Option<u64>,
    ) {
        if let Some((_, stop)) = self.resource_listens.remove(key) {
            stop.cancel();
            return;
        }
        let (server, conn, uri) = key;
        let st = self.state();
        let Some(up) = st.upstream(server) else {
            return;
        };
        let live = [up.connection_in(true), up.connection()]
            .into_iter()
            .flatten()
            .chain(up.connections_of(&Self::owner_for(up, caller, session)))
            .find(|c| c.id == *conn);
        if let Some(c) = live {
            let req = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(
                UnsubscribeRequestParams::new(uri.clone()),
            ));
            let _ = c.peer.send_request(req).await;
        }
    }

    /// Hold a `subscriptions/listen` stream filtered to one resource open on a 2026-07-28
    /// connection; its updates enter the event router like a 2025 server's. Answers once the
    /// server acknowledged the subscription.
    async fn listen_resource(
        &self,
        key: &super::SubscriptionKey,
        conn: &Arc<crate::upstream::Connection>,
    ) -> Result<(), rmcp::service::ServiceError> {
        use rmcp::model::{ServerNotification, SubscriptionFilter};
        let filter = SubscriptionFilter::builder()
            .resource_subscription(key.2.clone())
            .build();
        let mut sub = conn.peer.listen(filter).await?;
        let stop = CancellationToken::new();
        self.resource_listens.insert(key.clone(), stop.clone());
        let (events, server, id) = (self.events_tx.clone(), key.0.clone(), conn.id);
        tokio::spawn(async move {
            loop {
                let n = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = sub.next() => n,
                };
                match n {
                    Ok(Some(ServerNotification::ResourceUpdatedNotification(n))) => {
                        let _ = events.send(crate::upstream::UpstreamEvent::ResourceUpdated {
                            server: server.clone(),
                            conn: id,
                            params: n.params,
                        });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return,
                }
            }
        });
        Ok(())
    }

    /// `logging/setLevel`: the session's own level, applied by the broker to what it forwards (one
    /// session never changes what another receives). Upstream connections this session may hear
    /// from are asked for the most verbose level any of their listeners wants.
    async fn set_level(
        &self,
        st: &State,
        caller: &Caller,
        level: LoggingLevel,
        down: &Downstream,
        rec: &mut CallRecord,
    ) -> Result<Reply, Failure> {
        let id = down.session.ok_or_else(no_session)?;
        let session = self.sessions.get(id).ok_or_else(no_session)?;
        let _ = caller;
        session.set_level(level);
        rec.decision(true, "the session's own log level", None);
        self.push_level(st, &session, level).await;
        // Under `[cluster]`: the instance holding the client's stream filters its logs by this
        // level, and an instance that restores the session later reads it.
        if let (Some(c), Some(front)) = (&self.cluster, &session.front) {
            let name = serde_json::to_value(level).unwrap_or_default();
            let text = name.as_str().unwrap_or_default().to_string();
            if let Err(e) = c.set_level(front, &text).await {
                tracing::warn!(error = %e, "cluster: a session's log level is known to this instance only");
            }
            let _ = c
                .broadcast(&crate::cluster::Wire::Level {
                    from: c.tag.clone(),
                    session: front.to_string(),
                    level: name,
                })
                .await;
        }
        rec.finish(Outcome::Ok, None);
        Ok(Reply::Empty)
    }

    /// A session's log level set where another instance decided it (`[cluster]`).
    pub async fn apply_level(&self, front: &str, level: LoggingLevel) {
        if let Some(s) = self.sessions.by_front(front) {
            s.set_level(level);
            self.push_level(&self.state(), &s, level).await;
        }
    }

    /// Ask the upstream connections `session` hears for logs at `level`, where none was asked for
    /// a more verbose one already.
    async fn push_level(
        &self,
        st: &State,
        session: &super::sessions::Session,
        level: LoggingLevel,
    ) {
        let (caller, id) = (&session.caller, session.id);
        // Levels sent to connections that have since closed are forgotten here (setLevel is rare).
        let live: std::collections::HashSet<u64> = st
            .upstreams
            .iter()
            .flat_map(|u| u.connection_ids())
            .collect();
        self.upstream_levels.retain(|id, _| live.contains(id));
        for up in &st.upstreams {
            if !session.sees_server(&up.name) {
                continue;
            }
            let conns = if up.per_caller {
                up.connections_of(&Self::owner_for(up, caller, Some(id)))
            } else {
                up.connection_in(true).into_iter().collect()
            };
            for conn in conns {
                // 2026-07-28 has no logging/setLevel.
                let declares = !conn.modern
                    && conn
                        .info
                        .as_ref()
                        .is_none_or(|i| i.capabilities.logging.is_some());
                if !declares {
                    continue;
                }
                let want = rank(level);
                let lower = match self.upstream_levels.get(&conn.id) {
                    Some(have) => want < *have,
                    None => true,
                };
                if !lower {
                    continue;
                }
                self.upstream_levels.insert(conn.id, want);
                let req = ClientRequest::SetLevelRequest(SetLevelRequest::new(
                    SetLevelRequestParams::new(level),
                ));
                if let Err(e) = conn.peer.send_request(req).await {
                    tracing::debug!(server = %up.name, error = %e, "logging/setLevel not accepted upstream");
                }
            }
        }
    }
}

/// The request to send upstream, with the exposed name replaced by the upstream's own.
pub(super) fn upstream_request(op: Op, original: &str) -> ClientRequest {
    match op {
        // Sent as custom requests so their results come back as the upstream's JSON (see
        // `upstream::raw`): the front relays that, the broker decides on its typed form.
        Op::CallTool(mut p) => {
            p.name = original.to_string().into();
            p.meta = forwardable_meta(p.meta.take());
            raw::custom_request("tools/call", &p)
        }
        Op::GetPrompt(mut p) => {
            p.name = original.to_string();
            p.meta = forwardable_meta(p.meta.take());
            raw::custom_request("prompts/get", &p)
        }
        Op::ReadResource(mut p) => {
            p.uri = original.to_string();
            p.meta = forwardable_meta(p.meta.take());
            raw::custom_request("resources/read", &p)
        }
        Op::Complete(mut p) => {
            match &mut p.r#ref {
                Reference::Prompt(r) => r.name = original.to_string(),
                Reference::Resource(r) => r.uri = original.to_string(),
                _ => {}
            }
            p.meta = forwardable_meta(p.meta.take());
            ClientRequest::CompleteRequest(CompleteRequest::new(p))
        }
        // Not forwarded as such (handled before this point).
        Op::List(_) | Op::Subscribe(_) | Op::Unsubscribe(_) | Op::SetLevel(_) => {
            ClientRequest::PingRequest(Default::default())
        }
    }
}

/// Mask a complete call, prompt or read result (an `input_required` one carries the broker's own
/// sealed state and the server's questions, not its output): the raw JSON the front relays when
/// the transport kept it, and the typed form, which the front serialises otherwise and whose error
/// text the audit record keeps. Counted once, from the raw JSON where there is one.
fn mask_result(
    m: &crate::guard::mask::Masker,
    server: &str,
    result: &mut ServerResult,
    rec: &mut CallRecord,
) {
    fn typed<T: serde::Serialize + serde::de::DeserializeOwned>(
        m: &crate::guard::mask::Masker,
        r: &mut T,
    ) -> crate::guard::mask::Counts {
        let Ok(mut v) = serde_json::to_value(&*r) else {
            return Default::default();
        };
        let counts = m.mask_json(&mut v);
        if !counts.is_empty()
            && let Ok(masked) = serde_json::from_value(v)
        {
            *r = masked;
        }
        counts
    }
    let typed_counts = match result {
        ServerResult::CallToolResult(r) => typed(m, r),
        ServerResult::GetPromptResult(r) => typed(m, r),
        ServerResult::ReadResourceResult(r) => typed(m, r),
        _ => return,
    };
    let mut raw_counts = None;
    raw::amend(|v| raw_counts = Some(m.mask_json(v)));
    let counts = raw_counts.unwrap_or(typed_counts);
    for (kind, n) in &counts {
        metrics::global().masked(server, kind, *n);
    }
    rec.masked(counts);
}

/// Longest tool or prompt name, and longest resource URI, the broker accepts from a client.
const MAX_NAME_BYTES: usize = 1024;
const MAX_URI_BYTES: usize = 8192;

/// A name or URI longer than any server would use is refused before any work (-32602).
fn too_long(op: &Op) -> Option<ErrorData> {
    let (what, len, max) = match op {
        Op::CallTool(p) => ("tool name", p.name.len(), MAX_NAME_BYTES),
        Op::GetPrompt(p) => ("prompt name", p.name.len(), MAX_NAME_BYTES),
        Op::ReadResource(p) => ("resource URI", p.uri.len(), MAX_URI_BYTES),
        Op::Subscribe(u) | Op::Unsubscribe(u) => ("resource URI", u.len(), MAX_URI_BYTES),
        Op::Complete(p) => match &p.r#ref {
            Reference::Prompt(r) => ("prompt name", r.name.len(), MAX_NAME_BYTES),
            Reference::Resource(r) => ("resource URI", r.uri.len(), MAX_URI_BYTES),
            _ => return None,
        },
        Op::List(_) | Op::SetLevel(_) => return None,
    };
    (len > max).then(|| {
        ErrorData::invalid_params(
            format!("{what} too long ({len} bytes; at most {max})"),
            None,
        )
    })
}

fn no_session() -> Failure {
    Failure::Rpc(ErrorData::invalid_request(
        "this method needs a session (2025-11-25 `initialize`); it is not available statelessly",
        None,
    ))
}

/// Where a name the catalog does not list goes: to the one connected server that exposes names
/// unchanged (`prefix = ""`) and whose `tools` filter admits it, so that server answers for itself
/// exactly as it would directly. Prefixed names are never split to guess a server.
/// A tool of a per-user OAuth server that is not in the catalog: its `<prefix><sep>authorize`
/// (the broker's own tool, see `consent`), or, while no caller has listed the server, any name
/// with its prefix (the call starts the consent, then goes upstream under the unprefixed name).
fn authorize_tool(st: &State, exposed: &str, kind: Kind) -> Option<(Arc<str>, String)> {
    if kind != Kind::Tool {
        return None;
    }
    let sep = &st.config.broker.separator;
    st.upstreams
        .iter()
        .filter(|u| consent::consent_auth(st, &u.name).is_some())
        .find_map(|u| {
            let c = st.config.server(&u.name)?;
            if crate::catalog::expose_name(&c.prefix, sep, consent::AUTHORIZE) == exposed {
                return Some((u.name.clone(), consent::AUTHORIZE.to_string()));
            }
            let rest = exposed
                .strip_prefix(c.prefix.as_str())?
                .strip_prefix(sep.as_str())?;
            (!c.prefix.is_empty() && !rest.is_empty() && u.listing().is_none())
                .then(|| (u.name.clone(), rest.to_string()))
        })
}

fn unlisted(st: &State, name: &str, is_tool: bool) -> Option<Arc<str>> {
    let mut candidates = st.namespaces.iter().filter(|ns| {
        ns.prefix.is_empty()
            && (!is_tool || ns.tools.admits(name))
            && st.upstream(&ns.server).is_some_and(|u| u.is_up())
    });
    match (candidates.next(), candidates.next()) {
        (Some(only), None) => Some(only.server.clone()),
        _ => None,
    }
}

/// A tool's own timeout, else its server's.
fn call_timeout(st: &State, server: &str, tool: Option<&str>) -> Duration {
    let cfg = st.config.server(server);
    tool.and_then(|t| cfg.and_then(|c| c.tool_limits.get(t)))
        .and_then(|l| l.timeout)
        .or_else(|| cfg.map(|c| c.timeout))
        .unwrap_or(Duration::from_secs(60))
}

fn request_id_value(id: &RequestId) -> serde_json::Value {
    serde_json::to_value(id).unwrap_or(serde_json::Value::Null)
}

/// The client's W3C trace context (`_meta.traceparent`), which parents the request's span.
fn client_traceparent(op: &Op) -> Option<&str> {
    let meta = match op {
        Op::CallTool(p) => p.meta.as_ref(),
        Op::GetPrompt(p) => p.meta.as_ref(),
        Op::ReadResource(p) => p.meta.as_ref(),
        Op::Complete(p) => p.meta.as_ref(),
        _ => None,
    }?;
    meta.get("traceparent")?.as_str()
}

/// Give the upstream request the upstream call's `traceparent`: in its extensions (the HTTP
/// clients send it as a header) and in `_meta` where the revision carries it (2026-07-28, SEP-414)
/// or where the client's own was (replaced: the upstream's parent is the broker's span).
pub(super) fn set_traceparent(req: &mut ClientRequest, traceparent: String, modern: bool) {
    use rmcp::model::GetExtensions;
    req.extensions_mut()
        .insert(crate::telemetry::TraceParent(traceparent.clone()));
    match req {
        ClientRequest::CustomRequest(c) => {
            if let Some(serde_json::Value::Object(params)) = &mut c.params {
                let had = params
                    .get("_meta")
                    .is_some_and(|m| m.get("traceparent").is_some());
                if modern || had {
                    let meta = params
                        .entry("_meta")
                        .or_insert_with(|| serde_json::Value::Object(Default::default()));
                    if let serde_json::Value::Object(m) = meta {
                        m.insert("traceparent".into(), traceparent.into());
                    }
                }
            }
        }
        ClientRequest::CompleteRequest(c) => {
            let had = c
                .params
                .meta
                .as_ref()
                .is_some_and(|m| m.contains_key("traceparent"));
            if modern || had {
                c.params
                    .meta
                    .get_or_insert_with(Default::default)
                    .insert("traceparent".into(), traceparent.into());
            }
        }
        _ => {}
    }
}

/// The downstream `_meta` minus what belongs to the downstream hop: its progress token (rmcp sets its
/// own upstream) and the 2026-07-28 protocol keys (rmcp re-adds them on modern connections).
fn forwardable_meta(meta: Option<RequestMetaObject>) -> Option<RequestMetaObject> {
    let mut meta = meta?;
    meta.retain(|k, _| k != "progressToken" && !k.starts_with("io.modelcontextprotocol/"));
    if meta.is_empty() { None } else { Some(meta) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GuardConfig;
    use crate::guard::mask::Masker;
    use rmcp::model::{CustomResult, GetPromptResult, InputRequiredResult, ReadResourceResult};
    use serde_json::json;

    const KEY: &str = "AKIAIOSFODNN7EXAMPLE";

    fn masker() -> Masker {
        Masker::from_config(&GuardConfig {
            mask_results: true,
            ..GuardConfig::default()
        })
        .expect("on")
    }

    fn record() -> CallRecord {
        crate::audit::Audit::disabled().begin(&Caller::local(), "resource", "r")
    }

    /// A result as the upstream sent it: decoded as the pipeline does, inside `capture` (as the
    /// front runs the pipeline), then masked; the typed form and the raw JSON kept for the front.
    async fn masked(
        upstream: serde_json::Value,
    ) -> (ServerResult, Option<serde_json::Value>, CallRecord) {
        let mut rec = record();
        let ((typed, rec2), raw) = raw::capture(async move {
            let mut t = raw::typed(ServerResult::CustomResult(CustomResult(upstream)));
            mask_result(&masker(), "s", &mut t, &mut rec);
            (t, rec)
        })
        .await;
        rec = rec2;
        (typed, raw, rec)
    }

    #[tokio::test]
    async fn resource_contents_masked_raw_and_typed_counted_once() {
        let up = json!({"contents": [
            {"uri": "file:///etc/app.env", "mimeType": "text/plain", "text": format!("KEY={KEY}\nOK=1")},
            {"uri": "file:///x", "blob": "AAEC"}
        ], "_meta": {"x": 1}});
        let (typed, raw, rec) = masked(up).await;
        let raw = raw.expect("kept raw");
        assert_eq!(
            raw["contents"][0]["text"],
            "KEY=[masked:aws_access_key]\nOK=1"
        );
        assert_eq!(raw["contents"][1]["blob"], "AAEC");
        assert_eq!(raw["_meta"], json!({"x": 1}), "shape kept");
        let ServerResult::ReadResourceResult(ReadResourceResult { contents, .. }) = typed else {
            panic!("{typed:?}");
        };
        assert!(
            !serde_json::to_string(&contents)
                .expect("json")
                .contains(KEY)
        );
        let counts = rec.peek().masked.clone().expect("counted");
        assert_eq!(
            counts.get("aws_access_key"),
            Some(&1),
            "once, not raw + typed"
        );
    }

    #[tokio::test]
    async fn prompt_messages_and_tool_errors_masked() {
        let up = json!({"messages": [{"role": "user", "content": {"type": "text", "text": format!("use {KEY}")}}]});
        let (typed, raw, _) = masked(up).await;
        assert_eq!(
            raw.expect("raw")["messages"][0]["content"]["text"],
            "use [masked:aws_access_key]"
        );
        let ServerResult::GetPromptResult(GetPromptResult { messages, .. }) = typed else {
            panic!("{typed:?}");
        };
        assert!(
            !serde_json::to_string(&messages)
                .expect("json")
                .contains(KEY)
        );
        // A tool error is decoded (its text goes to the audit record): masked there too.
        let up = json!({"content": [{"type": "text", "text": format!("bad key {KEY}")}], "isError": true});
        let (typed, _, _) = masked(up).await;
        let ServerResult::CallToolResult(r) = typed else {
            panic!("{typed:?}");
        };
        assert_eq!(
            crate::broker::errors::tool_error_text(&r).as_deref(),
            Some("bad key [masked:aws_access_key]")
        );
    }

    #[tokio::test]
    async fn structured_content_masked_field_by_field() {
        let up = json!({
            "content": [{"type": "text", "text": "{}"}],
            "structuredContent": {"rows": [{"k": KEY, "n": 1}, {"k": "x", "n": [2, {"deep": KEY}]}]}
        });
        let (_, raw, rec) = masked(up).await;
        assert_eq!(
            raw.expect("raw")["structuredContent"],
            json!({"rows": [{"k": "[masked:aws_access_key]", "n": 1}, {"k": "x", "n": [2, {"deep": "[masked:aws_access_key]"}]}]})
        );
        assert_eq!(
            rec.peek()
                .masked
                .as_ref()
                .and_then(|c| c.get("aws_access_key")),
            Some(&2)
        );
    }

    #[tokio::test]
    async fn input_required_and_clean_results_untouched() {
        let ir = InputRequiredResult::new(None, Some(format!("state-{KEY}")));
        let mut t = ServerResult::InputRequiredResult(ir.clone());
        let mut rec = record();
        mask_result(&masker(), "s", &mut t, &mut rec);
        assert!(
            matches!(t, ServerResult::InputRequiredResult(ref r) if r.request_state == ir.request_state)
        );
        assert!(rec.peek().masked.is_none());
        let (_, raw, rec) = masked(json!({"content": [{"type": "text", "text": "fine"}]})).await;
        assert_eq!(raw.expect("raw")["content"][0]["text"], "fine");
        assert!(rec.peek().masked.is_none());
    }
}
