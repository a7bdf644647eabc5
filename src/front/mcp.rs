//! The rmcp `ServerHandler` adapter: turns MCP requests from a downstream client into broker calls.
//!
//! One [`Front`] per session (stateful Streamable HTTP, stdio) or per request (2026-07-28 stateless);
//! it is a cheap handle on the shared [`Broker`].

// Sampling, elicitation, roots, logging and resources/subscribe are deprecated by SEP-2577 in the
// 2026-07-28 revision, but Claude and most clients speak 2025-11-25, where they are live.
#![allow(deprecated)]

use std::sync::{Arc, OnceLock};

use rmcp::{
    ErrorData, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CompleteRequestParams, CompleteResult,
        CustomRequest, CustomResult, ErrorCode, GetPromptRequestParams, GetPromptResponse,
        Implementation, InitializeRequestParams, InitializeResult, ListPromptsResult,
        ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
        ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse, ResultType,
        ServerCapabilities, ServerConfig, ServerResult, SetLevelRequestParams,
        SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
    },
    service::{RequestContext, SubscriptionContext},
};

use crate::auth::Caller;
use crate::broker::{Broker, Downstream, Op, Reply};
use crate::catalog::Kind;
use crate::front::relay;
use crate::upstream::{StreamLink, raw};

#[derive(Clone)]
pub struct Front {
    broker: Arc<Broker>,
    /// This session's registration, set at `initialize` (legacy sessions only). When the last
    /// handle of the session is dropped (the session closed or idled out), it is unregistered.
    session: Arc<OnceLock<SessionGuard>>,
}

/// Unregisters a session from the broker when dropped.
struct SessionGuard {
    broker: Arc<Broker>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.broker.close_session(self.id);
    }
}

impl Front {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            session: Arc::new(OnceLock::new()),
        }
    }

    /// Register this session (once), within the broker's session caps.
    fn open_session(
        &self,
        peer: &rmcp::service::Peer<RoleServer>,
        caller: Caller,
        front: Option<Arc<str>>,
    ) -> Result<u64, ErrorData> {
        if let Some(g) = self.session.get() {
            return Ok(g.id);
        }
        let id = self
            .broker
            .open_session(peer.clone(), caller, front)
            .map_err(|e| ErrorData::new(ErrorCode(SESSION_LIMIT), e.to_string(), None))?;
        if let Err(dup) = self.session.set(SessionGuard {
            broker: self.broker.clone(),
            id,
        }) {
            // Registered concurrently: keep the first, drop ours.
            drop(dup);
        }
        Ok(self.session.get().map_or(id, |g| g.id))
    }

    /// `[cluster]`: a new session is written to Redis (owner and `initialize` params) before the
    /// client learns its id, so any instance can serve its next request; one restored here from
    /// there is remembered (written again if Redis loses it), and gets the log level it set.
    async fn share_session(
        &self,
        c: &Arc<crate::cluster::Cluster>,
        front: &str,
        caller: &Caller,
        request: &InitializeRequestParams,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let reg = crate::cluster::Registered {
            owner: caller.sub.clone(),
            init: serde_json::to_string(request).unwrap_or_default(),
        };
        let restored = ctx
            .extensions
            .get::<rmcp::transport::streamable_http_server::SessionRestoreMarker>()
            .is_some();
        if !restored {
            return c.register(front, reg, c.idle).await.map_err(|e| {
                ErrorData::internal_error(
                    format!("mcp-broker cannot open a session: {e}; new sessions are refused until it is back"),
                    None,
                )
            });
        }
        c.remember(front, reg);
        if let Ok(Some(level)) = c.level(front).await
            && let Ok(level) = serde_json::from_value(serde_json::Value::String(level))
        {
            self.broker.apply_level(front, level).await;
        }
        Ok(())
    }

    fn downstream(&self, ctx: &RequestContext<RoleServer>) -> Downstream {
        // 2026-07-28 requests carry their protocol version in `_meta`.
        let stateless = ctx.meta.protocol_version() == Some(ProtocolVersion::V_2026_07_28);
        Downstream {
            peer: ctx.peer.clone(),
            request_id: ctx.id.clone(),
            progress_token: ctx.meta.get_progress_token(),
            capabilities: ctx.client_capabilities(),
            stateless,
            asks: None,
            traceparent: ctx
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.headers.get("traceparent"))
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            session: if stateless {
                None
            } else {
                // stdio sessions and sessions that skipped `initialize` register on first use.
                self.session
                    .get()
                    .map(|g| g.id)
                    .or_else(|| self.open_session(&ctx.peer, caller_of(ctx), None).ok())
            },
        }
    }

    async fn run(&self, op: Op, ctx: RequestContext<RoleServer>) -> Result<Reply, ErrorData> {
        let caller = caller_of(&ctx);
        let down = self.downstream(&ctx);
        // Boxed, as every large future under a handler method is: rmcp awaits `initialize` inline
        // in the session's own task, whose future is sized for the largest handler future and
        // lives as long as the session (see `handler_futures_stay_small`).
        Box::pin(self.broker.handle(&caller, op, down, ctx.ct.clone())).await
    }
}

/// JSON-RPC error code for "session limit reached" (implementation-defined server error range).
pub const SESSION_LIMIT: i32 = -32030;

fn unexpected_reply() -> ErrorData {
    ErrorData::internal_error("mcp-broker: unexpected reply kind", None)
}

/// The caller behind a request: set by the HTTP front's middleware in the request's extensions; a
/// request without HTTP parts came over stdio from the local user.
pub fn caller_of(ctx: &RequestContext<RoleServer>) -> Caller {
    match ctx.extensions.get::<http::request::Parts>() {
        Some(parts) => parts
            .extensions
            .get::<Caller>()
            .cloned()
            .unwrap_or_else(Caller::anonymous),
        None => Caller::local(),
    }
}

fn cursor_of(p: &Option<PaginatedRequestParams>) -> Option<String> {
    p.as_ref().and_then(|p| p.cursor.clone())
}

fn no_cursor(cursor: Option<&str>) -> Result<(), ErrorData> {
    // Every list fits one page; a cursor can only be one the broker never issued.
    match cursor {
        Some(c) if !c.is_empty() => Err(ErrorData::invalid_params(
            format!("invalid cursor `{c}`"),
            None,
        )),
        _ => Ok(()),
    }
}

/// Does the request speak 2026-07-28 or later (as rmcp decides before shaping typed results)?
fn is_modern(ctx: &RequestContext<RoleServer>) -> bool {
    ctx.protocol_version()
        .is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str())
}

fn params_of<T: serde::de::DeserializeOwned>(
    method: &str,
    params: Option<serde_json::Value>,
) -> Result<T, ErrorData> {
    serde_json::from_value(params.unwrap_or_default())
        .map_err(|e| ErrorData::invalid_params(format!("invalid params for `{method}`: {e}"), None))
}

/// The JSON answer to a call: the upstream's own result when the broker relayed one unchanged
/// (`raw`), else the broker's typed response shaped as rmcp shapes typed results.
fn call_result(
    typed: ServerResult,
    raw: Option<serde_json::Value>,
    modern: bool,
) -> Result<serde_json::Value, ErrorData> {
    let complete = matches!(
        typed,
        ServerResult::CallToolResult(_)
            | ServerResult::GetPromptResult(_)
            | ServerResult::ReadResourceResult(_)
    );
    // An input_required result as the upstream sent it, its requestState sealed by the broker.
    let input = matches!(typed, ServerResult::InputRequiredResult(_));
    if input
        && modern
        && let Some(serde_json::Value::Object(o)) = raw
    {
        return Ok(serde_json::Value::Object(o));
    }
    if complete && let Some(serde_json::Value::Object(mut o)) = raw {
        if modern {
            o.entry("resultType").or_insert_with(|| "complete".into());
            if matches!(typed, ServerResult::ReadResourceResult(_)) {
                o.entry("ttlMs").or_insert_with(|| 0.into());
                o.entry("cacheScope").or_insert_with(|| "private".into());
            }
        } else if o.get("resultType").and_then(|t| t.as_str()) == Some("complete") {
            o.shift_remove("resultType");
        }
        return Ok(serde_json::Value::Object(o));
    }
    let mut typed = typed;
    if matches!(typed, ServerResult::InputRequiredResult(_)) && !modern {
        return Err(ErrorData::invalid_request(
            "InputRequiredResult requires negotiated protocol version 2026-07-28 or newer",
            None,
        ));
    }
    if modern {
        typed.fill_missing_cache_hints();
    } else {
        typed.strip_result_type_for_legacy_peer();
        typed.strip_non_object_output_for_legacy_peer();
    }
    serde_json::to_value(typed).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

/// A resources/read (or subscribe) error in the client's revision: resource not found is -32602 in
/// 2026-07-28 and -32002 in 2025-11-25 (SEP-2164); either way `data.uri` names the URI the client asked
/// for when the upstream (or the broker) left it out. Other errors pass unchanged.
fn resource_error(mut e: ErrorData, uri: &str, modern: bool) -> ErrorData {
    let not_found = e.code == ErrorCode::RESOURCE_NOT_FOUND
        || (e.code == ErrorCode::INVALID_PARAMS && e.data.is_none());
    if !not_found {
        return e;
    }
    if modern && e.code == ErrorCode::RESOURCE_NOT_FOUND {
        e.code = ErrorCode::INVALID_PARAMS;
    }
    match &mut e.data {
        None => e.data = Some(serde_json::json!({ "uri": uri })),
        Some(serde_json::Value::Object(o)) => {
            o.entry("uri").or_insert_with(|| uri.into());
        }
        Some(_) => {}
    }
    e
}

/// SEP-2575 removed `logging/setLevel` from 2026-07-28: a stateless request for it is -32601 (which
/// rmcp's HTTP transport answers with 404), as for `ping` and `resources/subscribe`.
fn removed_method(method: &str) -> ErrorData {
    ErrorData::new(
        ErrorCode::METHOD_NOT_FOUND,
        format!("method not found: `{method}` (removed in protocol 2026-07-28)"),
        None,
    )
}

/// A raw list result decoded into rmcp's type (loses what rmcp does not model).
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ErrorData> {
    serde_json::from_value(v).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

impl Front {
    /// tools/call, prompts/get or resources/read through the broker's pipeline, answered with the
    /// upstream's raw result.
    async fn call_raw(
        &self,
        method: &str,
        params: Option<serde_json::Value>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<serde_json::Value, ErrorData> {
        let modern = is_modern(&ctx);
        // The HTTP front's link to this call's stream goes with the request upstream.
        let link = ctx.extensions.get::<StreamLink>().cloned();
        let caller = caller_of(&ctx);
        let down = self.downstream(&ctx);
        let params = params_of_call(method, params)?;
        relay_call(&self.broker, &caller, down, ctx.ct, params, modern, link).await
    }

    /// One list as JSON, every item as its upstream sent it (name or URI namespaced), filtered for
    /// the caller by the pipeline (one audit record, kind `list`).
    async fn list_raw(
        &self,
        which: Kind,
        cursor: Option<String>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<serde_json::Value, ErrorData> {
        no_cursor(cursor.as_deref())?;
        let modern = is_modern(&ctx);
        let caller = caller_of(&ctx);
        let down = self.downstream(&ctx);
        relay_list(&self.broker, &caller, down, ctx.ct, which, modern).await
    }
}

/// The decoded params of a relayed call.
pub enum CallParams {
    Tool(CallToolRequestParams),
    Prompt(GetPromptRequestParams),
    Read(ReadResourceRequestParams),
}

impl CallParams {
    /// Decode a relayed call's params straight from their JSON text (`None` when they do not
    /// decode: rmcp then answers with its own error).
    pub fn from_raw(method: &str, params: &str) -> Option<Self> {
        Some(match method {
            "tools/call" => CallParams::Tool(serde_json::from_str(params).ok()?),
            "prompts/get" => CallParams::Prompt(serde_json::from_str(params).ok()?),
            "resources/read" => CallParams::Read(serde_json::from_str(params).ok()?),
            _ => return None,
        })
    }

    /// The progress token the caller asked for, if any.
    pub fn progress_token(&self) -> Option<rmcp::model::ProgressToken> {
        match self {
            CallParams::Tool(p) => p.meta.as_ref().and_then(|m| m.get_progress_token()),
            CallParams::Prompt(p) => p.meta.as_ref().and_then(|m| m.get_progress_token()),
            CallParams::Read(p) => p.meta.as_ref().and_then(|m| m.get_progress_token()),
        }
    }
}

/// Decode a relayed call's params (`method` is one of [`relay::CALLS`]).
pub fn params_of_call(
    method: &str,
    params: Option<serde_json::Value>,
) -> Result<CallParams, ErrorData> {
    Ok(match method {
        "tools/call" => CallParams::Tool(params_of(method, params)?),
        "prompts/get" => CallParams::Prompt(params_of(method, params)?),
        _ => CallParams::Read(params_of(method, params)?),
    })
}

/// A relayed call through the broker's pipeline, answered with the upstream's raw result (shaped
/// for the client's revision). Shared by rmcp's handler and the HTTP front's direct lane.
pub async fn relay_call(
    broker: &Broker,
    caller: &Caller,
    down: Downstream,
    ct: tokio_util::sync::CancellationToken,
    params: CallParams,
    modern: bool,
    link: Option<StreamLink>,
) -> Result<serde_json::Value, ErrorData> {
    match params {
        CallParams::Tool(p) => {
            let declared_tasks = down
                .capabilities
                .as_ref()
                .is_some_and(|c| c.supports_tasks());
            let run = broker.handle(caller, Op::CallTool(p), down, ct);
            let (r, raw) = raw::capture(StreamLink::scope(link, run)).await;
            let Reply::Tool(r) = r? else {
                return Err(unexpected_reply());
            };
            // SEP-2663, as rmcp checks for typed calls.
            if matches!(r, CallToolResponse::Task(_)) && !declared_tasks {
                return Err(ErrorData::missing_required_client_capability(
                    rmcp::model::ClientCapabilities::builder()
                        .enable_tasks()
                        .build(),
                ));
            }
            call_result(ServerResult::from(r), raw, modern)
        }
        CallParams::Prompt(p) => {
            let run = broker.handle(caller, Op::GetPrompt(p), down, ct);
            let (r, raw) = raw::capture(StreamLink::scope(link, run)).await;
            let Reply::Prompt(r) = r? else {
                return Err(unexpected_reply());
            };
            call_result(ServerResult::from(r), raw, modern)
        }
        CallParams::Read(p) => {
            let exposed = p.uri.clone();
            let run = broker.handle(caller, Op::ReadResource(p), down, ct);
            let (r, raw) = raw::capture(StreamLink::scope(link, run)).await;
            let Reply::Resource(r) = r.map_err(|e| resource_error(e, &exposed, modern))? else {
                return Err(unexpected_reply());
            };
            // The broker rewrote the typed contents' URIs; the raw ones get the same.
            let raw = raw.map(|mut v| {
                let cat = broker.catalog_in(!modern);
                if let Some(route) = cat.route_uri(&exposed) {
                    cat.expose_read_result(&route.server, &mut v);
                }
                v
            });
            call_result(ServerResult::from(r), raw, modern)
        }
    }
}

/// One list for the caller: the items shown and the SEP-2549 time to live (see [`Front::list_raw`]).
/// Shared with the direct lane.
pub async fn relay_list_items(
    broker: &Broker,
    caller: &Caller,
    down: Downstream,
    ct: tokio_util::sync::CancellationToken,
    which: Kind,
) -> Result<(Vec<crate::catalog::Item>, u64), ErrorData> {
    let Reply::Listed(items, ttl_ms) = broker.handle(caller, Op::List(which), down, ct).await?
    else {
        return Err(unexpected_reply());
    };
    Ok((items, ttl_ms))
}

/// One list for the caller as JSON.
async fn relay_list(
    broker: &Broker,
    caller: &Caller,
    down: Downstream,
    ct: tokio_util::sync::CancellationToken,
    which: Kind,
    modern: bool,
) -> Result<serde_json::Value, ErrorData> {
    let (items, ttl_ms) = relay_list_items(broker, caller, down, ct, which).await?;
    let mut out = serde_json::Map::new();
    out.insert(
        which.list_field().into(),
        serde_json::to_value(items).unwrap_or_else(|_| serde_json::Value::Array(Vec::new())),
    );
    if modern {
        // SEP-2549 caching hints: the list is filtered per caller, so private, for as long as
        // the shortest-lived of the upstreams it merges allows.
        out.insert("resultType".into(), "complete".into());
        out.insert("ttlMs".into(), ttl_ms.into());
        out.insert("cacheScope".into(), "private".into());
    }
    Ok(serde_json::Value::Object(out))
}

impl ServerHandler for Front {
    fn get_info(&self) -> ServerConfig {
        let caps = ServerCapabilities::builder()
            .enable_logging()
            .enable_completions()
            .enable_prompts()
            .enable_resources()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_prompts_list_changed()
            .enable_resources_list_changed()
            .enable_resources_subscribe()
            .build();
        ServerConfig::new(caps)
            .with_server_info(Implementation::new("mcp-broker", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "mcp-broker: one endpoint for several MCP servers. Tool and prompt names are `<server>{}<name>`.",
                self.broker.config().broker.separator
            ))
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        let front = ctx
            .extensions
            .get::<super::cluster::FrontSession>()
            .map(|f| f.0.clone());
        let caller = caller_of(&ctx);
        let id = self.open_session(&ctx.peer, caller.clone(), front.clone())?;
        if let (Some(c), Some(f)) = (self.broker.cluster(), &front) {
            // Boxed: `initialize`'s future is held by the session's task for its whole life.
            Box::pin(self.share_session(c, f, &caller, &request, &ctx)).await?;
        }
        // The HTTP front's direct lane learns which broker session the new one is, and whether
        // it may serve it (only clients the broker never has to ask anything).
        if let Some(opened) = ctx
            .extensions
            .get::<http::request::Parts>()
            .and_then(|p| p.extensions.get::<super::lane::OpenedSession>())
        {
            let c = &request.capabilities;
            let direct = c.sampling.is_none() && c.elicitation.is_none() && c.roots.is_none();
            let _ = opened.0.set((id, direct));
        }
        ctx.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    // The list and call methods normally arrive renamed, as custom requests (see `relay`), and are
    // answered raw by `on_custom_request`; these typed forms serve one that reached rmcp unrenamed.
    async fn list_tools(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        typed(Box::pin(self.list_raw(Kind::Tool, cursor_of(&p), ctx)).await?)
    }

    async fn call_tool(
        &self,
        p: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        match self.run(Op::CallTool(p), ctx).await? {
            Reply::Tool(r) => Ok(r),
            _ => Err(unexpected_reply()),
        }
    }

    async fn list_prompts(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        typed(Box::pin(self.list_raw(Kind::Prompt, cursor_of(&p), ctx)).await?)
    }

    async fn get_prompt(
        &self,
        p: GetPromptRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        match self.run(Op::GetPrompt(p), ctx).await? {
            Reply::Prompt(r) => Ok(r),
            _ => Err(unexpected_reply()),
        }
    }

    async fn list_resources(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        typed(Box::pin(self.list_raw(Kind::Resource, cursor_of(&p), ctx)).await?)
    }

    async fn list_resource_templates(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        typed(Box::pin(self.list_raw(Kind::Template, cursor_of(&p), ctx)).await?)
    }

    async fn read_resource(
        &self,
        p: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let (uri, modern) = (p.uri.clone(), is_modern(&ctx));
        let r = self.run(Op::ReadResource(p), ctx).await;
        match r.map_err(|e| resource_error(e, &uri, modern))? {
            Reply::Resource(r) => Ok(r),
            _ => Err(unexpected_reply()),
        }
    }

    async fn complete(
        &self,
        p: CompleteRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        match self.run(Op::Complete(p), ctx).await? {
            // A 2025-era upstream's result has no `resultType`, which 2026-07-28 requires; rmcp
            // strips it again for legacy peers.
            Reply::Complete(mut r) => {
                r.result_type.get_or_insert(ResultType::COMPLETE);
                Ok(r)
            }
            _ => Err(unexpected_reply()),
        }
    }

    async fn subscribe(
        &self,
        p: SubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.run(Op::Subscribe(p.uri), ctx).await.map(|_| ())
    }

    async fn unsubscribe(
        &self,
        p: UnsubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.run(Op::Unsubscribe(p.uri), ctx).await.map(|_| ())
    }

    async fn set_level(
        &self,
        p: SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        if is_modern(&ctx) {
            return Err(removed_method("logging/setLevel"));
        }
        self.run(Op::SetLevel(p.level), ctx).await.map(|_| ())
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        if let Some(list) = relay::list_method(&request.method) {
            let cursor = request
                .params
                .as_ref()
                .and_then(|p| p.get("cursor"))
                .map(|c| {
                    c.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| c.to_string())
                });
            let which = match list {
                "tools/list" => Kind::Tool,
                "prompts/list" => Kind::Prompt,
                "resources/list" => Kind::Resource,
                _ => Kind::Template,
            };
            return Ok(CustomResult(
                Box::pin(self.list_raw(which, cursor, ctx)).await?,
            ));
        }
        if let Some(call) = relay::call_method(&request.method) {
            return Box::pin(self.call_raw(call, request.params, ctx))
                .await
                .map(CustomResult);
        }
        // A known method whose params did not decode lands here (rmcp's typed parse failed).
        let known = matches!(request.method.as_str(), "logging/setLevel");
        if known && is_modern(&ctx) {
            return Err(removed_method(&request.method));
        }
        if known {
            return Err(ErrorData::invalid_params(
                format!("invalid params for `{}`", request.method),
                None,
            ));
        }
        Err(ErrorData::new(
            rmcp::model::ErrorCode::METHOD_NOT_FOUND,
            format!("method not found: `{}`", request.method),
            None,
        ))
    }

    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(requested.clone())
    }

    async fn listen(&self, ctx: SubscriptionContext) -> Result<(), ErrorData> {
        // Boxed like `run`: this loop's state would otherwise size every session's task.
        Box::pin(self.listen_changes(ctx)).await
    }
}

impl Front {
    /// The subscription loop of [`ServerHandler::listen`].
    async fn listen_changes(&self, ctx: SubscriptionContext) -> Result<(), ErrorData> {
        // Announce a change only where this caller's own view changed (a change hidden from it is
        // not its business).
        let caller = caller_of(ctx.request_context());
        let mut seen = self.broker.list_view(&caller);
        let mut changes = self.broker.subscribe_changes();
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                ev = changes.recv() => {
                    let told = match ev {
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                        // A server's own announcement reaches those who may see that server.
                        Ok((kind, Some(server))) if self.broker.sees_server(&caller, &server) => {
                            Some(kind.index())
                        }
                        // A lagged receiver re-checks everything, like any other change.
                        _ => None,
                    };
                    let view = self.broker.list_view(&caller);
                    for (i, kind) in Kind::LISTED.into_iter().enumerate() {
                        if view[i] == seen[i] && told != Some(i) {
                            continue;
                        }
                        let sent = match kind {
                            Kind::Tool => ctx.sink().notify_tool_list_changed().await,
                            Kind::Prompt => ctx.sink().notify_prompt_list_changed().await,
                            Kind::Resource | Kind::Template => {
                                ctx.sink().notify_resource_list_changed().await
                            }
                        };
                        if sent.is_err() {
                            return Ok(());
                        }
                    }
                    seen = view;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_not_found_in_each_revision() {
        let uri = "test://missing";
        // The broker's own -32002: kept for 2025-11-25, -32602 for 2026-07-28; data.uri added.
        let own = || ErrorData::resource_not_found("no server offers it", None);
        let legacy = resource_error(own(), uri, false);
        assert_eq!(legacy.code, ErrorCode::RESOURCE_NOT_FOUND);
        assert_eq!(legacy.data, Some(serde_json::json!({"uri": uri})));
        let modern = resource_error(own(), uri, true);
        assert_eq!(modern.code, ErrorCode::INVALID_PARAMS);
        assert_eq!(modern.data, Some(serde_json::json!({"uri": uri})));
        // An upstream's -32602 without data (the TypeScript SDK's "Resource ... not found").
        let up = resource_error(
            ErrorData::invalid_params("Resource x not found", None),
            uri,
            true,
        );
        assert_eq!(up.code, ErrorCode::INVALID_PARAMS);
        assert_eq!(up.data, Some(serde_json::json!({"uri": uri})));
        // The upstream's own data is kept; other errors pass unchanged.
        let kept = resource_error(
            ErrorData::resource_not_found("gone", Some(serde_json::json!({"uri": "u", "x": 1}))),
            uri,
            false,
        );
        assert_eq!(kept.data, Some(serde_json::json!({"uri": "u", "x": 1})));
        let other = resource_error(ErrorData::internal_error("boom", None), uri, true);
        assert_eq!(other.code, ErrorCode::INTERNAL_ERROR);
        assert_eq!(other.data, None);
        let with_data = resource_error(
            ErrorData::invalid_params("bad", Some(serde_json::json!("why"))),
            uri,
            true,
        );
        assert_eq!(with_data.data, Some(serde_json::json!("why")));
    }

    /// The size of the future an async fn `f(&A, B, C)` returns (named by the fn item alone).
    fn future_size<'a, A: 'a, B, C, F>(_: impl Fn(&'a A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn handler_futures_stay_small() {
        // rmcp awaits `initialize` through `handle_request` inside each session's own task, so
        // that task holds a future sized for the largest request handler for as long as the
        // session lives: unboxed, the relay's call path made it ~20 KB per idle session.
        use rmcp::Service;
        let size = future_size(<Front as Service<RoleServer>>::handle_request);
        assert!(size <= 6 * 1024, "handle_request future is {size} bytes");
    }

    #[test]
    fn removed_methods_are_method_not_found() {
        let e = removed_method("logging/setLevel");
        assert_eq!(e.code, ErrorCode::METHOD_NOT_FOUND);
        assert!(e.message.contains("logging/setLevel"));
    }

    #[test]
    fn typed_call_results_are_shaped_as_rmcp_shapes_them() {
        // SEP-2106: non-object structured output is 2026-07-28 only; rmcp (3.11) moves it into a
        // text block for older peers, and so does the broker's typed answer.
        let result = || {
            ServerResult::CallToolResult(rmcp::model::CallToolResult::structured(
                serde_json::json!(["a", "b"]),
            ))
        };
        let legacy = call_result(result(), None, false).expect("shaped");
        assert!(legacy.get("structuredContent").is_none(), "{legacy}");
        assert!(legacy.get("resultType").is_none(), "{legacy}");
        assert_eq!(legacy["content"][0]["text"], r#"["a","b"]"#);
        let modern = call_result(result(), None, true).expect("shaped");
        assert_eq!(modern["structuredContent"], serde_json::json!(["a", "b"]));
        assert_eq!(modern["resultType"], "complete");
    }
}
