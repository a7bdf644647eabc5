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
        CustomRequest, CustomResult, GetPromptRequestParams, GetPromptResponse, Implementation,
        ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, ListToolsResult,
        PaginatedRequestParams, ProtocolVersion, ReadResourceRequestParams, ReadResourceResponse,
        ServerCapabilities, ServerConfig, ServerResult, SetLevelRequestParams,
        SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
    },
    service::{NotificationContext, RequestContext, SubscriptionContext},
};

use crate::auth::Caller;
use crate::broker::{Broker, Downstream};
use crate::front::relay;
use crate::upstream::ListKind;
use crate::upstream::raw;

#[derive(Clone)]
pub struct Front {
    broker: Arc<Broker>,
    /// The broker's id for this session, set on `notifications/initialized` (legacy sessions only).
    session: Arc<OnceLock<u64>>,
}

impl Front {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self {
            broker,
            session: Arc::new(OnceLock::new()),
        }
    }

    fn session_id(&self, ctx: &RequestContext<RoleServer>) -> u64 {
        *self.session.get_or_init(|| {
            self.broker
                .register_session(ctx.peer.clone(), Some(caller_of(ctx)))
        })
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
            // rmcp runs each message in its own task: a request may be handled before
            // `notifications/initialized`, so register the session here if that has not happened.
            session: (!stateless).then(|| self.session_id(ctx)),
        }
    }
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
    }
    serde_json::to_value(typed).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

/// A raw list result decoded into rmcp's type (loses what rmcp does not model).
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ErrorData> {
    serde_json::from_value(v).map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

impl Front {
    /// tools/call, prompts/get or resources/read through the broker (policy, credentials, audit,
    /// progress and cancellation as for the typed methods), answered with the upstream's raw result.
    async fn call_raw(
        &self,
        method: &str,
        params: Option<serde_json::Value>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<serde_json::Value, ErrorData> {
        let caller = caller_of(&ctx);
        let modern = is_modern(&ctx);
        let down = self.downstream(&ctx);
        let ct = ctx.ct.clone();
        match method {
            "tools/call" => {
                let p: CallToolRequestParams = params_of(method, params)?;
                let declared_tasks = ctx
                    .client_capabilities()
                    .is_some_and(|c| c.supports_tasks());
                let (r, raw) = raw::capture(self.broker.call_tool(&caller, p, down, ct)).await;
                let r = r?;
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
            "prompts/get" => {
                let p: GetPromptRequestParams = params_of(method, params)?;
                let (r, raw) = raw::capture(self.broker.get_prompt(&caller, p, down, ct)).await;
                call_result(ServerResult::from(r?), raw, modern)
            }
            _ => {
                let p: ReadResourceRequestParams = params_of(method, params)?;
                let exposed = p.uri.clone();
                let (r, raw) = raw::capture(self.broker.read_resource(&caller, p, down, ct)).await;
                // The broker rewrote the typed contents' URIs; the raw ones get the same.
                let raw = raw.map(|mut v| {
                    let cat = self.broker.catalog();
                    if let Some(route) = cat.route_uri(&exposed) {
                        cat.expose_read_result(&route.server, &mut v);
                    }
                    v
                });
                call_result(ServerResult::from(r?), raw, modern)
            }
        }
    }

    /// One list as JSON, every item as its upstream sent it (name or URI namespaced), filtered for
    /// the caller (one audit record, kind `list`).
    async fn list_raw(
        &self,
        method: &str,
        cursor: Option<String>,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<serde_json::Value, ErrorData> {
        no_cursor(cursor.as_deref())?;
        let caller = caller_of(ctx);
        self.broker.prepare(&caller).await;
        let down = self.downstream(ctx);
        let (field, items) = match method {
            "tools/list" => ("tools", self.broker.list_tools(&caller, Some(&down))),
            "prompts/list" => ("prompts", self.broker.list_prompts(&caller, Some(&down))),
            "resources/list" => (
                "resources",
                self.broker.list_resources(&caller, Some(&down)),
            ),
            _ => (
                "resourceTemplates",
                self.broker.list_resource_templates(&caller, Some(&down)),
            ),
        };
        let mut out = serde_json::Map::new();
        out.insert(
            field.into(),
            serde_json::to_value(items).unwrap_or_else(|_| serde_json::Value::Array(Vec::new())),
        );
        if is_modern(ctx) {
            // What rmcp adds to its typed list results for 2026-07-28 peers: the result type and
            // the most conservative SEP-2549 caching hints (the view is per caller).
            out.insert("resultType".into(), "complete".into());
            out.insert("ttlMs".into(), 0.into());
            out.insert("cacheScope".into(), "private".into());
        }
        Ok(serde_json::Value::Object(out))
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

    async fn on_initialized(&self, ctx: NotificationContext<RoleServer>) {
        let _ = self.session.get_or_init(|| {
            let caller = match ctx.extensions.get::<http::request::Parts>() {
                Some(parts) => parts.extensions.get::<Caller>().cloned(),
                None => Some(Caller::local()),
            };
            self.broker.register_session(ctx.peer.clone(), caller)
        });
    }

    // The list methods normally arrive renamed, as custom requests (see `relay`), and are answered
    // raw by `on_custom_request`; these typed forms serve a list that reached rmcp unrenamed.
    async fn list_tools(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        typed(self.list_raw("tools/list", cursor_of(&p), &ctx).await?)
    }

    async fn call_tool(
        &self,
        p: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = caller_of(&ctx);
        self.broker
            .call_tool(&caller, p, self.downstream(&ctx), ctx.ct.clone())
            .await
    }

    async fn list_prompts(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        typed(self.list_raw("prompts/list", cursor_of(&p), &ctx).await?)
    }

    async fn get_prompt(
        &self,
        p: GetPromptRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let caller = caller_of(&ctx);
        self.broker
            .get_prompt(&caller, p, self.downstream(&ctx), ctx.ct.clone())
            .await
    }

    async fn list_resources(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        typed(self.list_raw("resources/list", cursor_of(&p), &ctx).await?)
    }

    async fn list_resource_templates(
        &self,
        p: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        typed(
            self.list_raw("resources/templates/list", cursor_of(&p), &ctx)
                .await?,
        )
    }

    async fn read_resource(
        &self,
        p: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let caller = caller_of(&ctx);
        self.broker
            .read_resource(&caller, p, self.downstream(&ctx), ctx.ct.clone())
            .await
    }

    async fn complete(
        &self,
        p: CompleteRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let caller = caller_of(&ctx);
        self.broker
            .complete(&caller, p, self.downstream(&ctx), ctx.ct.clone())
            .await
    }

    async fn subscribe(
        &self,
        p: SubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let id = self.session_id(&ctx);
        self.broker.subscribe(id, &p.uri).await
    }

    async fn unsubscribe(
        &self,
        p: UnsubscribeRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let id = self.session_id(&ctx);
        self.broker.unsubscribe(id, &p.uri).await
    }

    async fn set_level(
        &self,
        p: SetLevelRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let id = self.session_id(&ctx);
        self.broker.set_level(id, p.level).await
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
            return Ok(CustomResult(self.list_raw(list, cursor, &ctx).await?));
        }
        if let Some(call) = relay::call_method(&request.method) {
            return self
                .call_raw(call, request.params, ctx)
                .await
                .map(CustomResult);
        }
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
        let mut changes = self.broker.subscribe_changes();
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                ev = changes.recv() => {
                    let sent = match ev {
                        Ok(ListKind::Tools) => ctx.sink().notify_tool_list_changed().await,
                        Ok(ListKind::Prompts) => ctx.sink().notify_prompt_list_changed().await,
                        Ok(ListKind::Resources) => ctx.sink().notify_resource_list_changed().await,
                        // Missed some: say everything changed, the client re-lists.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            ctx.sink().notify_tool_list_changed().await
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                    };
                    if sent.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }
}
