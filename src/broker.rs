//! The transport-free core: list and call, routing, progress/cancellation forwarding, server-to-client
//! request routing and list_changed fan-out.
//!
//! A request flows: resolve the exposed name in the [`Catalog`] → [`policy::decide`] → the upstream's
//! live connection → a fresh upstream request (its own id and progress token) → the result back.
//! Upstream events come in on one channel and are routed to the downstream session they belong to.

// Sampling, elicitation, roots, logging and resources/subscribe are deprecated by SEP-2577 in the
// 2026-07-28 revision, but Claude and most clients speak 2025-11-25, where they are live.
#![allow(deprecated)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dashmap::DashMap;
use rmcp::{
    ErrorData, RoleServer,
    model::{
        CallToolRequest, CallToolRequestParams, CallToolResponse, CallToolResult,
        CancelledNotificationParam, ClientCapabilities, ClientRequest, ClientResult,
        CompleteRequest, CompleteRequestParams, CompleteResult, ContentBlock, GetExtensions,
        GetPromptRequest, GetPromptRequestParams, GetPromptResponse, ListRootsResult, LoggingLevel,
        LoggingMessageNotificationParam, ProgressNotificationParam, ProgressToken, Prompt,
        ReadResourceRequest, ReadResourceRequestParams, ReadResourceResponse, Reference, RequestId,
        RequestMetaObject, Resource, ResourceContents, ResourceTemplate,
        ResourceUpdatedNotificationParam, ServerRequest, ServerResult, SetLevelRequest,
        SetLevelRequestParams, SubscribeRequest, SubscribeRequestParams, Tool, UnsubscribeRequest,
        UnsubscribeRequestParams,
    },
    service::{OriginatingRequestId, Peer, PeerRequestOptions, ServiceError},
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Caller;
use crate::catalog::{Catalog, Collision, Listing, Namespace};
use crate::config::Config;
use crate::credentials::{CredentialError, Credentials};
use crate::policy::{Decision, Kind, Policy, PolicyError, RegoPolicy};
use crate::upstream::{Connection, ListKind, Secrets, Upstream, UpstreamError, UpstreamEvent};

/// The downstream side of one request: where its progress and server-to-client requests go.
#[derive(Clone)]
pub struct Downstream {
    pub peer: Peer<RoleServer>,
    pub request_id: RequestId,
    pub progress_token: Option<ProgressToken>,
    pub capabilities: Option<ClientCapabilities>,
    /// A 2026-07-28 (stateless) request: the protocol has no server-to-client requests.
    pub stateless: bool,
}

/// A downstream session that can receive notifications not tied to a request.
struct Session {
    peer: Peer<RoleServer>,
    /// Set once the client sent `logging/setLevel`: only then are upstream log messages forwarded.
    logging: AtomicBool,
}

/// Why a forwarded request produced no upstream result.
enum Failure {
    /// A JSON-RPC error: the upstream's own, passed through, or the broker's.
    Rpc(ErrorData),
    /// The upstream could not be reached or did not answer; for tools this becomes an `isError` result.
    Unavailable(String),
}

/// (server, connection id, upstream request id): request ids are only unique per connection.
type InflightKey = (Arc<str>, u64, RequestId);

/// (server, the upstream's own resource URI).
type SubscriptionKey = (Arc<str>, String);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

pub struct Broker {
    config: Arc<Config>,
    /// In config order.
    upstreams: Vec<Arc<Upstream>>,
    namespaces: Vec<Namespace>,
    policy: Policy,
    catalog: RwLock<Arc<Catalog>>,
    sessions: DashMap<u64, Session>,
    next_session: AtomicU64,
    /// (server, upstream request id) → the downstream request it serves, for server-to-client routing.
    inflight: DashMap<InflightKey, Downstream>,
    credentials: Arc<Credentials>,
    /// (server, upstream URI) → sessions subscribed to its updates.
    subscriptions: Mutex<HashMap<SubscriptionKey, HashSet<u64>>>,
    /// Fan-out of list changes to 2026-07-28 `subscriptions/listen` streams.
    changes: broadcast::Sender<ListKind>,
    events_tx: mpsc::UnboundedSender<UpstreamEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<UpstreamEvent>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Broker {
    pub fn new(config: Arc<Config>) -> Result<Arc<Self>, BrokerError> {
        let upstreams = config
            .servers
            .iter()
            .map(|s| {
                let per_caller = s
                    .upstream_auth
                    .as_ref()
                    .is_some_and(Credentials::per_caller);
                Upstream::new(s.clone(), per_caller)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let credentials = Arc::new(Credentials::new(&config)?);
        Ok(Arc::new(Self {
            namespaces: Namespace::from_config(&config),
            policy: build_policy(&config)?,
            config,
            upstreams,
            catalog: RwLock::new(Arc::new(Catalog::default())),
            sessions: DashMap::new(),
            next_session: AtomicU64::new(1),
            inflight: DashMap::new(),
            credentials,
            subscriptions: Mutex::new(HashMap::new()),
            changes: broadcast::channel(64).0,
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    /// Start every upstream's supervisor and the event router. Call once.
    pub fn start(self: &Arc<Self>) {
        for up in &self.upstreams {
            // A shared connection with a configured credential (static, or a Vault path without
            // caller placeholders) resolves it before every (re)connect.
            if let Some(auth) = up.config.upstream_auth.clone()
                && !up.per_caller
            {
                let creds = self.credentials.clone();
                up.set_secrets(Arc::new(move || {
                    let (creds, auth) = (creds.clone(), auth.clone());
                    Box::pin(async move {
                        creds
                            .resolve(&auth, &Caller::local(), None)
                            .await
                            .map(|c| Secrets {
                                headers: c.headers,
                                env: c.env,
                            })
                            .map_err(|e| e.to_string())
                    })
                }));
            }
        }
        for up in &self.upstreams {
            self.tasks.spawn(
                up.clone()
                    .supervise(self.events_tx.clone(), self.shutdown.clone()),
            );
        }
        let rx = self.events_rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            let me = self.clone();
            tokio::spawn(async move { me.route_events(rx).await });
        }
    }

    /// Stop every upstream (children closed and reaped) and wait for it.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name.as_ref() == name)
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<ListKind> {
        self.changes.subscribe()
    }

    /// Wait until every upstream has either connected or failed once (for `mcp-broker tools`).
    pub async fn wait_connected(&self, deadline: std::time::Duration) {
        let end = tokio::time::Instant::now() + deadline;
        while tokio::time::Instant::now() < end {
            if self.upstreams.iter().all(|u| u.per_caller || u.is_up()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.rebuild();
    }

    // -- sessions ---------------------------------------------------------------------------------

    /// Remember a downstream session for list_changed, log and resource-update notifications.
    pub fn register_session(&self, peer: Peer<RoleServer>) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions.insert(
            id,
            Session {
                peer,
                logging: AtomicBool::new(false),
            },
        );
        id
    }

    fn live_sessions(&self) -> Vec<(u64, Peer<RoleServer>)> {
        let mut closed = Vec::new();
        self.sessions.retain(|id, s| {
            let open = !s.peer.is_transport_closed();
            if !open {
                closed.push(*id);
            }
            open
        });
        if !closed.is_empty()
            && let Ok(mut subs) = self.subscriptions.lock()
        {
            // Upstream subscriptions stay (cheap); only the closed sessions stop receiving updates.
            subs.retain(|_, ids| {
                ids.retain(|id| !closed.contains(id));
                !ids.is_empty()
            });
        }
        self.sessions
            .iter()
            .map(|e| (*e.key(), e.value().peer.clone()))
            .collect()
    }

    /// For the HTTP front's step-up answer: the policy decision on a `tools/call` of `exposed`, when a
    /// `step_up` rule refuses it (then the call gets HTTP 403 instead of an `isError` result).
    pub fn step_up_refusal(&self, caller: &Caller, exposed: &str) -> Option<Decision> {
        if !self.policy.has_step_up() {
            return None;
        }
        let cat = self.catalog();
        let e = cat.tools.get(exposed)?;
        let d = self
            .policy
            .decide(caller, &e.server, Kind::Tool, &e.original);
        (d.step_up.is_some() && !d.allow).then_some(d)
    }

    pub fn has_step_up(&self) -> bool {
        self.policy.has_step_up()
    }

    // -- lists ------------------------------------------------------------------------------------

    pub fn list_tools(&self, caller: &Caller) -> Vec<Tool> {
        let cat = self.catalog();
        cat.tools
            .entries
            .iter()
            .filter(|e| {
                self.policy
                    .decide(caller, &e.server, Kind::Tool, &e.original)
                    .allow
            })
            .map(|e| e.item.clone())
            .collect()
    }

    pub fn list_prompts(&self, caller: &Caller) -> Vec<Prompt> {
        let cat = self.catalog();
        cat.prompts
            .entries
            .iter()
            .filter(|e| {
                self.policy
                    .decide(caller, &e.server, Kind::Prompt, &e.original)
                    .allow
            })
            .map(|e| e.item.clone())
            .collect()
    }

    pub fn list_resources(&self, caller: &Caller) -> Vec<Resource> {
        let cat = self.catalog();
        cat.resources
            .entries
            .iter()
            .filter(|e| {
                self.policy
                    .decide(caller, &e.server, Kind::Resource, &e.original)
                    .allow
            })
            .map(|e| e.item.clone())
            .collect()
    }

    pub fn list_resource_templates(&self, caller: &Caller) -> Vec<ResourceTemplate> {
        let cat = self.catalog();
        cat.templates
            .entries
            .iter()
            .filter(|e| {
                self.policy
                    .decide(caller, &e.server, Kind::Resource, &e.original)
                    .allow
            })
            .map(|e| e.item.clone())
            .collect()
    }

    /// (server, upstream name) for an exposed tool or prompt name: the catalog's entry, else an
    /// unprefixed server that may answer for itself; otherwise -32602.
    fn resolve_name(&self, kind: Kind, exposed: &str) -> Result<(Arc<str>, String), ErrorData> {
        let cat = self.catalog();
        let entry = match kind {
            Kind::Tool => cat
                .tools
                .get(exposed)
                .map(|e| (e.server.clone(), e.original.clone())),
            _ => cat
                .prompts
                .get(exposed)
                .map(|e| (e.server.clone(), e.original.clone())),
        };
        entry
            .or_else(|| {
                self.unlisted(exposed, kind == Kind::Tool)
                    .map(|s| (s, exposed.to_string()))
            })
            .ok_or_else(|| {
                ErrorData::invalid_params(format!("unknown {} `{exposed}`", kind.as_str()), None)
            })
    }

    /// Where a name the catalog does not list goes: to the one connected server that exposes names
    /// unchanged (`prefix = ""`) and whose `tools` filter admits it, so that server answers for itself
    /// exactly as it would directly (it may have tools it does not list, or answer its own error).
    /// Prefixed names are never split to guess a server.
    fn unlisted(&self, name: &str, is_tool: bool) -> Option<Arc<str>> {
        let mut candidates = self.namespaces.iter().filter(|ns| {
            ns.prefix.is_empty()
                && (!is_tool || ns.tools.admits(name))
                && self.upstream(&ns.server).is_some_and(|u| u.is_up())
        });
        match (candidates.next(), candidates.next()) {
            (Some(only), None) => Some(only.server.clone()),
            _ => None,
        }
    }

    /// Rebuild the catalog from the live connections; notify sessions of the kinds that changed.
    fn rebuild(&self) -> Vec<Collision> {
        let mut listings: HashMap<Arc<str>, Listing> = HashMap::new();
        for up in &self.upstreams {
            if let Some(l) = up.listing() {
                listings.insert(up.name.clone(), l);
            }
        }
        let old = self.catalog();
        let (new, collisions) = Catalog::build(
            &self.namespaces,
            &listings,
            &self.config.broker.separator,
            Some(&old),
        );
        for c in &collisions {
            tracing::warn!(kind = c.kind, name = %c.name, kept = %c.kept, dropped = %c.dropped, "name collision: entry left out");
        }
        let (before, after) = (old.fingerprint(), new.fingerprint());
        if let Ok(mut slot) = self.catalog.write() {
            *slot = Arc::new(new);
        }
        let kinds = [ListKind::Tools, ListKind::Prompts, ListKind::Resources];
        let changed: Vec<ListKind> = kinds
            .into_iter()
            .zip(before.iter().zip(after.iter()))
            .filter(|(_, (b, a))| b != a)
            .map(|(k, _)| k)
            .collect();
        if !changed.is_empty() {
            for &k in &changed {
                let _ = self.changes.send(k);
            }
            let sessions = self.live_sessions();
            tokio::spawn(async move {
                for (_, peer) in sessions {
                    for k in &changed {
                        let _ = match k {
                            ListKind::Tools => peer.notify_tool_list_changed().await,
                            ListKind::Prompts => peer.notify_prompt_list_changed().await,
                            ListKind::Resources => peer.notify_resource_list_changed().await,
                        };
                    }
                }
            });
        }
        collisions
    }

    /// Collisions in the current view (for `mcp-broker tools`).
    pub fn collisions(&self) -> Vec<Collision> {
        self.rebuild()
    }

    // -- calls ------------------------------------------------------------------------------------

    pub async fn call_tool(
        &self,
        caller: &Caller,
        mut params: CallToolRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<CallToolResponse, ErrorData> {
        let (server, original) = self.resolve_name(Kind::Tool, &params.name)?;
        let decision = self.policy.decide_call(
            caller,
            &server,
            Kind::Tool,
            &original,
            params.arguments.as_ref(),
        );
        if !decision.allow {
            return Ok(tool_error(decision.reason).into());
        }
        let tool_name = original.clone();
        params.name = original.into();
        params.meta = forwardable_meta(params.meta.take());
        let req = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        match self
            .forward(&server, req, caller, Some(&tool_name), &down, &ct)
            .await
        {
            Ok(ServerResult::CallToolResult(r)) => Ok(CallToolResponse::Complete(r)),
            Ok(ServerResult::InputRequiredResult(r)) => Ok(CallToolResponse::InputRequired(r)),
            Ok(ServerResult::CreateTaskResult(r)) => Ok(CallToolResponse::Task(r)),
            Ok(_) => Err(unexpected(&server)),
            Err(Failure::Rpc(e)) => Err(e),
            Err(Failure::Unavailable(msg)) => Ok(tool_error(msg).into()),
        }
    }

    pub async fn get_prompt(
        &self,
        caller: &Caller,
        mut params: GetPromptRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<GetPromptResponse, ErrorData> {
        let (server, original) = self.resolve_name(Kind::Prompt, &params.name)?;
        let decision = self.policy.decide(caller, &server, Kind::Prompt, &original);
        if !decision.allow {
            return Err(ErrorData::invalid_request(decision.reason, None));
        }
        params.name = original;
        params.meta = forwardable_meta(params.meta.take());
        let req = ClientRequest::GetPromptRequest(GetPromptRequest::new(params));
        match self.forward(&server, req, caller, None, &down, &ct).await {
            Ok(ServerResult::GetPromptResult(r)) => Ok(GetPromptResponse::Complete(r)),
            Ok(ServerResult::InputRequiredResult(r)) => Ok(GetPromptResponse::InputRequired(r)),
            Ok(_) => Err(unexpected(&server)),
            Err(Failure::Rpc(e)) => Err(e),
            Err(Failure::Unavailable(msg)) => Err(ErrorData::internal_error(msg, None)),
        }
    }

    pub async fn read_resource(
        &self,
        caller: &Caller,
        mut params: ReadResourceRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let cat = self.catalog();
        let Some(route) = cat.route_uri(&params.uri) else {
            return Err(ErrorData::resource_not_found(
                format!("no server offers resource `{}`", params.uri),
                None,
            ));
        };
        drop(cat);
        let decision = self
            .policy
            .decide(caller, &route.server, Kind::Resource, &route.original);
        if !decision.allow {
            return Err(ErrorData::invalid_request(decision.reason, None));
        }
        params.uri = route.original.clone();
        params.meta = forwardable_meta(params.meta.take());
        let req = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(params));
        match self
            .forward(&route.server, req, caller, None, &down, &ct)
            .await
        {
            Ok(ServerResult::ReadResourceResult(mut r)) => {
                let cat = self.catalog();
                for c in &mut r.contents {
                    match c {
                        ResourceContents::TextResourceContents { uri, .. }
                        | ResourceContents::BlobResourceContents { uri, .. } => {
                            *uri = cat.expose_uri_of(&route.server, uri);
                        }
                        _ => {}
                    }
                }
                Ok(ReadResourceResponse::Complete(r))
            }
            Ok(ServerResult::InputRequiredResult(r)) => Ok(ReadResourceResponse::InputRequired(r)),
            Ok(_) => Err(unexpected(&route.server)),
            Err(Failure::Rpc(e)) => Err(e),
            Err(Failure::Unavailable(msg)) => Err(ErrorData::internal_error(msg, None)),
        }
    }

    pub async fn complete(
        &self,
        caller: &Caller,
        mut params: CompleteRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<CompleteResult, ErrorData> {
        let cat = self.catalog();
        let (server, kind, original) = match &mut params.r#ref {
            Reference::Prompt(p) => {
                let Some(e) = cat.prompts.get(&p.name) else {
                    return Err(ErrorData::invalid_params(
                        format!("unknown prompt `{}`", p.name),
                        None,
                    ));
                };
                p.name = e.original.clone();
                (e.server.clone(), Kind::Prompt, e.original.clone())
            }
            Reference::Resource(r) => {
                let route = match cat.templates.get(&r.uri) {
                    Some(e) => (e.server.clone(), e.original.clone()),
                    None => match cat.route_uri(&r.uri) {
                        Some(route) => (route.server, route.original),
                        None => {
                            return Err(ErrorData::invalid_params(
                                format!("unknown resource `{}`", r.uri),
                                None,
                            ));
                        }
                    },
                };
                r.uri = route.1.clone();
                (route.0, Kind::Resource, route.1)
            }
            _ => {
                return Err(ErrorData::invalid_params(
                    "unsupported completion reference",
                    None,
                ));
            }
        };
        drop(cat);
        if !self.policy.decide(caller, &server, kind, &original).allow {
            return Ok(CompleteResult::default());
        }
        params.meta = forwardable_meta(params.meta.take());
        let req = ClientRequest::CompleteRequest(CompleteRequest::new(params));
        match self.forward(&server, req, caller, None, &down, &ct).await {
            Ok(ServerResult::CompleteResult(r)) => Ok(r),
            Ok(_) => Err(unexpected(&server)),
            Err(Failure::Rpc(e)) => Err(e),
            Err(Failure::Unavailable(msg)) => Err(ErrorData::internal_error(msg, None)),
        }
    }

    /// `resources/subscribe`: subscribe upstream once per (server, URI); remember who wants updates.
    pub async fn subscribe(&self, session: u64, uri: &str) -> Result<(), ErrorData> {
        let route = self.catalog().route_uri(uri).ok_or_else(|| {
            ErrorData::resource_not_found(format!("no server offers resource `{uri}`"), None)
        })?;
        let key = (route.server.clone(), route.original.clone());
        let first = {
            let mut subs = self
                .subscriptions
                .lock()
                .map_err(|_| ErrorData::internal_error("subscription table poisoned", None))?;
            let set = subs.entry(key.clone()).or_default();
            let first = set.is_empty();
            set.insert(session);
            first
        };
        if first {
            let conn = self
                .upstream(&route.server)
                .and_then(|u| u.connection())
                .ok_or_else(|| unavailable_error(&route.server))?;
            #[allow(deprecated)]
            let req = ClientRequest::SubscribeRequest(SubscribeRequest::new(
                SubscribeRequestParams::new(route.original.clone()),
            ));
            if let Err(e) = conn.peer.send_request(req).await {
                if let Ok(mut subs) = self.subscriptions.lock() {
                    subs.remove(&key);
                }
                return Err(service_error(e));
            }
        }
        Ok(())
    }

    pub async fn unsubscribe(&self, session: u64, uri: &str) -> Result<(), ErrorData> {
        let Some(route) = self.catalog().route_uri(uri) else {
            return Ok(());
        };
        let key = (route.server.clone(), route.original.clone());
        let last = match self.subscriptions.lock() {
            Ok(mut subs) => match subs.get_mut(&key) {
                Some(set) => {
                    set.remove(&session);
                    let empty = set.is_empty();
                    if empty {
                        subs.remove(&key);
                    }
                    empty
                }
                None => false,
            },
            Err(_) => false,
        };
        if last && let Some(conn) = self.upstream(&route.server).and_then(|u| u.connection()) {
            #[allow(deprecated)]
            let req = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(
                UnsubscribeRequestParams::new(route.original.clone()),
            ));
            let _ = conn.peer.send_request(req).await;
        }
        Ok(())
    }

    /// `logging/setLevel`: acts on the shared upstream connections (every session's logs come from
    /// them), and turns on log forwarding for this session.
    pub async fn set_level(&self, session: u64, level: LoggingLevel) -> Result<(), ErrorData> {
        if let Some(s) = self.sessions.get(&session) {
            s.logging.store(true, Ordering::Relaxed);
        }
        for up in &self.upstreams {
            let Some(conn) = up.connection() else {
                continue;
            };
            let declares = conn
                .info
                .as_ref()
                .is_none_or(|i| i.capabilities.logging.is_some());
            if !declares {
                continue;
            }
            #[allow(deprecated)]
            let req = ClientRequest::SetLevelRequest(SetLevelRequest::new(
                SetLevelRequestParams::new(level),
            ));
            if let Err(e) = conn.peer.send_request(req).await {
                tracing::debug!(server = %up.name, error = %e, "logging/setLevel not accepted upstream");
            }
        }
        Ok(())
    }

    /// The connection a request by `caller` (for `tool`) goes on: the shared one, or for a
    /// per-caller server the caller's own, opened with the caller's credential.
    async fn connection_for(
        &self,
        up: &Upstream,
        caller: &Caller,
        tool: Option<&str>,
    ) -> Result<Arc<Connection>, Failure> {
        let server = &up.name;
        if !up.per_caller {
            return up.connection().ok_or_else(|| {
                Failure::Unavailable(format!(
                    "server `{server}` is unavailable right now; the broker is reconnecting to it"
                ))
            });
        }
        let Some(auth) = &up.config.upstream_auth else {
            return Err(Failure::Rpc(unexpected(server)));
        };
        // A refused connect (an upstream 401/403 surfaces here) gets one retry with a fresh
        // credential (re-exchange, Vault re-read), then a clear error.
        let mut last = None;
        for fresh in [false, true] {
            let cred = self
                .credentials
                .resolve_with(auth, caller, tool, fresh)
                .await
                .map_err(|e| {
                    tracing::warn!(server = %server, sub = %caller.sub, error = %e, "no upstream credential");
                    Failure::Unavailable(format!("server `{server}`: {e}"))
                })?;
            // One connection per (caller, credential): servers bind sessions to the token that
            // opened them, so a new or narrower token gets its own session.
            use sha2::Digest;
            let hex = |h: sha2::Sha256| -> String {
                h.finalize().iter().map(|b| format!("{b:02x}")).collect()
            };
            let mut k = sha2::Sha256::new();
            k.update(caller.sub.as_bytes());
            k.update([0u8]);
            k.update(cred.slot.as_bytes());
            let mut v = sha2::Sha256::new();
            for (name, value) in cred.headers.iter().chain(&cred.env) {
                v.update(name.as_bytes());
                v.update([0u8]);
                v.update(value.expose().as_bytes());
                v.update([0u8]);
            }
            let (key, version) = (hex(k), hex(v));
            let secrets = Secrets {
                headers: cred.headers,
                env: cred.env,
            };
            match up
                .connection_for(&key, &version, &secrets, &self.events_tx)
                .await
            {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::warn!(server = %server, sub = %caller.sub, fresh, error = %e, "per-caller connection failed");
                    last = Some(e);
                }
            }
        }
        Err(Failure::Unavailable(format!(
            "server `{server}` could not be reached with the caller's credential: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// For per-caller servers no caller has listed yet: connect with this caller's credential, so
    /// the catalog can show their tools. Failures are logged; the lists then omit that server.
    pub async fn prepare(&self, caller: &Caller) {
        let mut listed = false;
        for up in self
            .upstreams
            .iter()
            .filter(|u| u.per_caller && !u.listed())
        {
            match tokio::time::timeout(
                up.config.connect_timeout,
                self.connection_for(up, caller, None),
            )
            .await
            {
                Ok(Ok(_)) => listed = true,
                Ok(Err(_)) => {}
                Err(_) => {
                    tracing::warn!(server = %up.name, "listing a per-caller server timed out")
                }
            }
        }
        if listed {
            self.rebuild();
        }
    }

    /// Send `req` to `server` and wait for its result, forwarding progress and cancellation.
    async fn forward(
        &self,
        server: &Arc<str>,
        req: ClientRequest,
        caller: &Caller,
        tool: Option<&str>,
        down: &Downstream,
        ct: &CancellationToken,
    ) -> Result<ServerResult, Failure> {
        let up = self
            .upstream(server)
            .ok_or_else(|| Failure::Rpc(unexpected(server)))?;
        let conn = self.connection_for(up, caller, tool).await?;
        let opts = PeerRequestOptions::with_timeout(up.config.timeout).reset_timeout_on_progress();
        let handle = conn
            .peer
            .send_request_with_option(req, opts)
            .await
            .map_err(|e| {
                up.report_failure();
                up.drop_connection(conn.id);
                tracing::warn!(server = %server, error = %e, "could not send the request upstream");
                Failure::Unavailable(format!(
                    "server `{server}` could not be reached; the broker is reconnecting to it"
                ))
            })?;
        // Routes registered before the first await on the response; removed when this call ends, however.
        let mut progress = conn.progress.route(&handle.progress_token);
        let _routes = RouteGuard::new(
            self,
            server,
            &handle.id,
            &handle.progress_token,
            &conn,
            down,
        );
        let (id, upeer) = (handle.id.clone(), handle.peer.clone());
        let mut response = std::pin::pin!(handle.await_response());
        let result = loop {
            tokio::select! {
                biased;
                Some(p) = progress.recv() => self.relay_progress(down, p).await,
                r = &mut response => {
                    // Progress that preceded the response on the wire is already queued: send it first.
                    while let Ok(p) = progress.try_recv() {
                        self.relay_progress(down, p).await;
                    }
                    break r;
                }
                _ = ct.cancelled() => {
                    let p = CancelledNotificationParam::new(Some(id), Some("cancelled by the client".into()));
                    let _ = upeer.notify_cancelled(p).await;
                    return Err(Failure::Rpc(ErrorData::internal_error("request cancelled", None)));
                }
            }
        };
        match result {
            Ok(r) => Ok(r),
            Err(ServiceError::McpError(e)) => Err(Failure::Rpc(e)),
            Err(ServiceError::Timeout { timeout }) => Err(Failure::Unavailable(format!(
                "server `{server}` did not answer within {timeout:?}"
            ))),
            Err(e) => {
                up.report_failure();
                up.drop_connection(conn.id);
                tracing::warn!(server = %server, error = %e, "upstream connection failed during a request");
                Err(Failure::Unavailable(format!(
                    "the connection to server `{server}` failed during the request; the broker is reconnecting to it"
                )))
            }
        }
    }

    /// Progress from upstream, re-addressed to the caller's own token; dropped if it asked for none.
    async fn relay_progress(&self, down: &Downstream, mut p: ProgressNotificationParam) {
        if let Some(token) = &down.progress_token {
            p.progress_token = token.clone();
            let _ = down.peer.notify_progress(p).await;
        }
    }

    // -- upstream events --------------------------------------------------------------------------

    async fn route_events(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<UpstreamEvent>) {
        while let Some(ev) = rx.recv().await {
            match ev {
                UpstreamEvent::StateChanged { .. } => {
                    self.rebuild();
                }
                UpstreamEvent::ListChanged { server, conn, kind } => {
                    // Re-list off the router so a slow upstream does not hold up progress for others.
                    let me = self.clone();
                    tokio::spawn(async move {
                        if let Some(up) = me.upstream(&server)
                            && up.refresh(conn, kind).await
                        {
                            me.rebuild();
                        }
                    });
                }
                UpstreamEvent::Log { server, mut params } => {
                    params.logger = Some(match params.logger.take() {
                        Some(l) => format!("{server}/{l}"),
                        None => server.to_string(),
                    });
                    self.forward_log(params).await;
                }
                UpstreamEvent::ResourceUpdated { server, params } => {
                    self.forward_update(&server, params).await;
                }
                UpstreamEvent::Request {
                    server,
                    conn,
                    request,
                    origin,
                    cancel,
                    reply,
                } => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let r = me
                            .route_request(&server, conn, request, origin, cancel)
                            .await;
                        let _ = reply.send(r);
                    });
                }
            }
        }
    }

    async fn forward_log(&self, params: LoggingMessageNotificationParam) {
        let targets: Vec<Peer<RoleServer>> = self
            .sessions
            .iter()
            .filter(|s| s.logging.load(Ordering::Relaxed))
            .map(|s| s.peer.clone())
            .collect();
        for peer in targets {
            #[allow(deprecated)]
            let _ = peer.notify_logging_message(params.clone()).await;
        }
    }

    async fn forward_update(&self, server: &Arc<str>, params: ResourceUpdatedNotificationParam) {
        let ids: Vec<u64> = match self.subscriptions.lock() {
            Ok(subs) => subs
                .get(&(server.clone(), params.uri.clone()))
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
            Err(_) => return,
        };
        let exposed = self.catalog().expose_uri_of(server, &params.uri);
        for id in ids {
            let peer = self.sessions.get(&id).map(|s| s.peer.clone());
            if let Some(peer) = peer {
                let mut p = params.clone();
                p.uri = exposed.clone();
                let _ = peer.notify_resource_updated(p).await;
            }
        }
    }

    /// Route an upstream's sampling/elicitation/roots request to the downstream call that caused it.
    async fn route_request(
        &self,
        server: &Arc<str>,
        conn: u64,
        mut request: ServerRequest,
        origin: Option<RequestId>,
        cancel: CancellationToken,
    ) -> Result<ClientResult, ErrorData> {
        let target = origin
            .and_then(|id| {
                self.inflight
                    .get(&(server.clone(), conn, id))
                    .map(|d| d.clone())
            })
            .or_else(|| {
                // stdio and SSE carry no link to the call: route only when it cannot be ambiguous.
                let mut it = self
                    .inflight
                    .iter()
                    .filter(|e| &e.key().0 == server && e.key().1 == conn);
                match (it.next(), it.next()) {
                    (Some(only), None) => Some(only.value().clone()),
                    _ => None,
                }
            });
        let (method, declared): (&str, fn(&ClientCapabilities) -> bool) = match &request {
            ServerRequest::CreateMessageRequest(_) => {
                ("sampling/createMessage", |c| c.sampling.is_some())
            }
            ServerRequest::ElicitRequest(_) => ("elicitation/create", |c| c.elicitation.is_some()),
            ServerRequest::ListRootsRequest(_) => ("roots/list", |c| c.roots.is_some()),
            ServerRequest::PingRequest(_) => return Ok(ClientResult::empty(())),
            _ => ("a custom request", |_| false),
        };
        let is_roots = matches!(request, ServerRequest::ListRootsRequest(_));
        let Some(down) = target else {
            if is_roots {
                return Ok(ClientResult::ListRootsResult(ListRootsResult::default()));
            }
            return Err(ErrorData::invalid_request(
                format!(
                    "mcp-broker cannot tell which client `{server}`'s {method} is for (it is not tied to exactly one call in flight)"
                ),
                None,
            ));
        };
        if down.stateless {
            return Err(ErrorData::invalid_request(
                format!(
                    "the client uses protocol 2026-07-28, which has no server-to-client requests; {method} from `{server}` is not supported through mcp-broker yet"
                ),
                None,
            ));
        }
        if !down.capabilities.as_ref().is_some_and(declared) {
            if is_roots {
                return Ok(ClientResult::ListRootsResult(ListRootsResult::default()));
            }
            return Err(ErrorData::invalid_request(
                format!(
                    "the client did not declare the capability for {method}, so `{server}`'s request was not forwarded"
                ),
                None,
            ));
        }
        // Ride the originating call's response stream, not the session's standalone one.
        request
            .extensions_mut()
            .insert(OriginatingRequestId(down.request_id.clone()));
        let handle = down
            .peer
            .send_request_with_option(request, PeerRequestOptions::no_options())
            .await
            .map_err(service_error)?;
        let (id, peer) = (handle.id.clone(), handle.peer.clone());
        tokio::select! {
            r = handle.await_response() => r.map_err(service_error),
            // The upstream gave up on its request: tell the client, with the client-side id.
            _ = cancel.cancelled() => {
                let p = CancelledNotificationParam::new(Some(id), Some(format!("cancelled by server `{server}`")));
                let _ = peer.notify_cancelled(p).await;
                Err(ErrorData::internal_error("cancelled by the upstream", None))
            }
        }
    }
}

/// The rules plus, when configured, the Rego policy (loaded and checked here).
pub fn build_policy(config: &Config) -> Result<Policy, PolicyError> {
    let p = Policy::new(config.policy.clone(), config.auth.is_some());
    Ok(match &config.rego {
        Some(r) => p.with_rego(RegoPolicy::load(r)?),
        None => p,
    })
}

/// Removes a call's progress and in-flight routes when the call ends, is cancelled or is dropped.
struct RouteGuard<'a> {
    broker: &'a Broker,
    conn: Arc<Connection>,
    progress: ProgressToken,
    inflight: InflightKey,
}

impl<'a> RouteGuard<'a> {
    fn new(
        broker: &'a Broker,
        server: &Arc<str>,
        id: &RequestId,
        token: &ProgressToken,
        conn: &Arc<Connection>,
        down: &Downstream,
    ) -> Self {
        let inflight = (server.clone(), conn.id, id.clone());
        broker.inflight.insert(inflight.clone(), down.clone());
        conn.active.fetch_add(1, Ordering::Relaxed);
        Self {
            broker,
            conn: conn.clone(),
            progress: token.clone(),
            inflight,
        }
    }
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.conn.progress.unroute(&self.progress);
        self.conn.active.fetch_sub(1, Ordering::Relaxed);
        self.broker.inflight.remove(&self.inflight);
    }
}

/// The downstream `_meta` minus what belongs to the downstream hop: its progress token (rmcp sets its
/// own upstream) and the 2026-07-28 protocol keys (rmcp re-adds them on modern connections).
fn forwardable_meta(meta: Option<RequestMetaObject>) -> Option<RequestMetaObject> {
    let mut meta = meta?;
    meta.retain(|k, _| k != "progressToken" && !k.starts_with("io.modelcontextprotocol/"));
    if meta.is_empty() { None } else { Some(meta) }
}

fn tool_error(msg: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(msg)])
}

fn unexpected(server: &str) -> ErrorData {
    ErrorData::internal_error(format!("server `{server}` gave an unexpected answer"), None)
}

fn unavailable_error(server: &str) -> ErrorData {
    ErrorData::internal_error(
        format!("server `{server}` is unavailable right now; the broker is reconnecting to it"),
        None,
    )
}

fn service_error(e: ServiceError) -> ErrorData {
    match e {
        ServiceError::McpError(e) => e,
        other => ErrorData::internal_error(other.to_string(), None),
    }
}
