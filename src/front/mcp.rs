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
        ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities,
        ServerConfig, SetLevelRequestParams, SubscribeRequestParams, SubscriptionFilter,
        UnsubscribeRequestParams,
    },
    service::{RequestContext, SubscriptionContext},
};

use crate::auth::Caller;
use crate::broker::lists::{ListOf, Listed};
use crate::broker::{Broker, Downstream, Op, Reply};
use crate::upstream::ListKind;

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
    ) -> Result<u64, ErrorData> {
        if let Some(g) = self.session.get() {
            return Ok(g.id);
        }
        let id = self
            .broker
            .open_session(peer.clone(), caller)
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

    fn downstream(&self, ctx: &RequestContext<RoleServer>) -> Downstream {
        // 2026-07-28 requests carry their protocol version in `_meta`.
        let stateless = ctx.meta.protocol_version() == Some(ProtocolVersion::V_2026_07_28);
        Downstream {
            peer: ctx.peer.clone(),
            request_id: ctx.id.clone(),
            progress_token: ctx.meta.get_progress_token(),
            capabilities: ctx.client_capabilities(),
            stateless,
            session: if stateless {
                None
            } else {
                // stdio sessions and sessions that skipped `initialize` register on first use.
                self.session
                    .get()
                    .map(|g| g.id)
                    .or_else(|| self.open_session(&ctx.peer, caller_of(ctx)).ok())
            },
        }
    }

    async fn run(&self, op: Op, ctx: RequestContext<RoleServer>) -> Result<Reply, ErrorData> {
        let caller = caller_of(&ctx);
        let down = self.downstream(&ctx);
        self.broker.handle(&caller, op, down, ctx.ct.clone()).await
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

fn no_cursor(p: &Option<PaginatedRequestParams>) -> Result<(), ErrorData> {
    // Every list fits one page; a cursor can only be one the broker never issued.
    match p.as_ref().and_then(|p| p.cursor.as_deref()) {
        Some(c) if !c.is_empty() => Err(ErrorData::invalid_params(
            format!("invalid cursor `{c}`"),
            None,
        )),
        _ => Ok(()),
    }
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
        self.open_session(&ctx.peer, caller_of(&ctx))?;
        ctx.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        no_cursor(&p)?;
        match self.run(Op::List(ListOf::Tools), ctx).await? {
            Reply::Listed(Listed::Tools(t)) => Ok(ListToolsResult::with_all_items(t)),
            _ => Err(unexpected_reply()),
        }
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
        no_cursor(&p)?;
        match self.run(Op::List(ListOf::Prompts), ctx).await? {
            Reply::Listed(Listed::Prompts(t)) => Ok(ListPromptsResult::with_all_items(t)),
            _ => Err(unexpected_reply()),
        }
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
        no_cursor(&p)?;
        match self.run(Op::List(ListOf::Resources), ctx).await? {
            Reply::Listed(Listed::Resources(t)) => Ok(ListResourcesResult::with_all_items(t)),
            _ => Err(unexpected_reply()),
        }
    }

    async fn list_resource_templates(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        no_cursor(&p)?;
        match self.run(Op::List(ListOf::Templates), ctx).await? {
            Reply::Listed(Listed::Templates(t)) => {
                Ok(ListResourceTemplatesResult::with_all_items(t))
            }
            _ => Err(unexpected_reply()),
        }
    }

    async fn read_resource(
        &self,
        p: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        match self.run(Op::ReadResource(p), ctx).await? {
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
            Reply::Complete(r) => Ok(r),
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
        self.run(Op::SetLevel(p.level), ctx).await.map(|_| ())
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        // A known method whose params did not decode lands here (rmcp's typed parse failed).
        let known = matches!(request.method.as_str(), "logging/setLevel");
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
        // Announce a change only where this caller's own view changed (a change hidden from it is
        // not its business).
        let caller = caller_of(ctx.request_context());
        let mut seen = self.broker.list_view(&caller);
        let mut changes = self.broker.subscribe_changes();
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                ev = changes.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = ev {
                        return Ok(());
                    }
                    // A lagged receiver re-checks everything, like any other change.
                    let view = self.broker.list_view(&caller);
                    for (i, kind) in [ListKind::Tools, ListKind::Prompts, ListKind::Resources].into_iter().enumerate() {
                        if view[i] == seen[i] {
                            continue;
                        }
                        let sent = match kind {
                            ListKind::Tools => ctx.sink().notify_tool_list_changed().await,
                            ListKind::Prompts => ctx.sink().notify_prompt_list_changed().await,
                            ListKind::Resources => ctx.sink().notify_resource_list_changed().await,
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
