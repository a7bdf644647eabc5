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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rmcp::{
    ErrorData, RoleServer,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, CancelledNotificationParam,
        ClientCapabilities, ClientRequest, ClientResult, CompleteRequest, CompleteRequestParams,
        CompleteResult, ContentBlock, GetExtensions, GetPromptRequestParams, GetPromptResponse,
        ListRootsResult, LoggingLevel, LoggingMessageNotificationParam, ProgressNotificationParam,
        ProgressToken, ReadResourceRequestParams, ReadResourceResponse, Reference, RequestId,
        RequestMetaObject, ResourceContents, ResourceUpdatedNotificationParam, ServerRequest,
        ServerResult, SetLevelRequest, SetLevelRequestParams, SubscribeRequest,
        SubscribeRequestParams, UnsubscribeRequest, UnsubscribeRequestParams,
    },
    service::{OriginatingRequestId, Peer, PeerRequestOptions, ServiceError},
};
use tokio::sync::{Notify, OwnedSemaphorePermit, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Audit, CallRecord, Outcome};
use crate::auth::Caller;
use crate::catalog::{Catalog, Collision, Item, Listing, Namespace};
use crate::config::{Config, UpstreamAuth};
use crate::credentials::{CredentialError, Credentials};
use crate::limits::{Concurrency, RateLimiter, Refusal, retry_hint, tool_key};
use crate::metrics;
use crate::policy::{Decision, Kind, Policy, PolicyError, RegoPolicy};
use crate::upstream::{Connection, ListKind, Secrets, Upstream, UpstreamError, UpstreamEvent, raw};

/// The downstream side of one request: where its progress and server-to-client requests go.
#[derive(Clone)]
pub struct Downstream {
    pub peer: Peer<RoleServer>,
    pub request_id: RequestId,
    pub progress_token: Option<ProgressToken>,
    pub capabilities: Option<ClientCapabilities>,
    /// A 2026-07-28 (stateless) request: the protocol has no server-to-client requests.
    pub stateless: bool,
    /// The broker's id for the downstream session, when it has one (for audit).
    pub session: Option<u64>,
}

/// A downstream session that can receive notifications not tied to a request.
struct Session {
    peer: Peer<RoleServer>,
    /// Set once the client sent `logging/setLevel`: only then are upstream log messages forwarded.
    logging: AtomicBool,
    /// Who opened it: list changes are sent only when this caller's view changed.
    caller: Option<Caller>,
    /// The caller's view (tools, prompts, resources) as of the last notification.
    view: Mutex<[u64; 3]>,
}

/// Everything a configuration reload replaces at once. Requests take a snapshot (`Arc`) and use it
/// throughout, so a reload never changes the rules under a request in flight.
struct State {
    config: Arc<Config>,
    /// In config order.
    upstreams: Vec<Arc<Upstream>>,
    namespaces: Vec<Namespace>,
    policy: Policy,
    credentials: Arc<Credentials>,
    /// Per-server caps on calls in flight (`max_concurrent`).
    concurrency: HashMap<Arc<str>, Arc<Concurrency>>,
}

impl State {
    /// The state for `config`; servers whose configuration is unchanged from `old` keep their
    /// [`Upstream`] (and so their connections, children and concurrency slots).
    fn build(config: Arc<Config>, old: Option<&State>) -> Result<Self, BrokerError> {
        let policy = build_policy(&config)?;
        let credentials = match old {
            Some(o) if o.config.credentials_fingerprint == config.credentials_fingerprint => {
                o.credentials.clone()
            }
            _ => Arc::new(Credentials::new(&config)?),
        };
        let mut upstreams = Vec::with_capacity(config.servers.len());
        let mut concurrency = HashMap::new();
        for s in &config.servers {
            let per_caller = s
                .upstream_auth
                .as_ref()
                .is_some_and(Credentials::per_caller);
            let kept = old.and_then(|o| {
                o.upstream(&s.name)
                    .filter(|u| u.config.fingerprint == s.fingerprint && u.per_caller == per_caller)
                    .map(|u| (u.clone(), o.concurrency.get(&u.name).cloned()))
            });
            let (up, slots) = match kept {
                Some((u, slots)) => (u, slots),
                None => (Upstream::new(s.clone(), per_caller)?, None),
            };
            if let Some(max) = s.max_concurrent {
                let slots = slots.unwrap_or_else(|| Arc::new(Concurrency::new(max)));
                concurrency.insert(up.name.clone(), slots);
            }
            upstreams.push(up);
        }
        Ok(Self {
            namespaces: Namespace::from_config(&config),
            config,
            upstreams,
            policy,
            credentials,
            concurrency,
        })
    }

    fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name.as_ref() == name)
    }
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

/// Why a forwarded request produced no upstream result.
enum Failure {
    /// A JSON-RPC error: the upstream's own, passed through, or the broker's.
    Rpc(ErrorData),
    /// The upstream could not be reached or did not answer; for tools this becomes an `isError` result.
    Unavailable(String),
    /// The upstream did not answer within the call's (idle) timeout.
    Timeout(String),
    /// The client cancelled, or the broker's drain deadline passed.
    Cancelled(String),
}

impl Failure {
    /// The audit outcome and message; records the failure on `rec`.
    fn record(&self, rec: &mut CallRecord) {
        let (outcome, msg) = match self {
            Self::Rpc(e) => (Outcome::Error, e.message.to_string()),
            Self::Unavailable(m) => (Outcome::Error, m.clone()),
            Self::Timeout(m) => (Outcome::Timeout, m.clone()),
            Self::Cancelled(m) => (Outcome::Cancelled, m.clone()),
        };
        rec.finish(outcome, Some(msg));
    }

    /// As a JSON-RPC error (prompts, resources, completions).
    fn into_error(self) -> ErrorData {
        match self {
            Self::Rpc(e) => e,
            Self::Unavailable(m) | Self::Timeout(m) | Self::Cancelled(m) => {
                ErrorData::internal_error(m, None)
            }
        }
    }
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
    state: RwLock<Arc<State>>,
    /// Each upstream's supervisor stops when its token is cancelled (removed or replaced on reload).
    stops: Mutex<HashMap<Arc<str>, CancellationToken>>,
    catalog: RwLock<Arc<Catalog>>,
    sessions: DashMap<u64, Session>,
    next_session: AtomicU64,
    /// (server, upstream request id) → the downstream request it serves, for server-to-client routing.
    inflight: DashMap<InflightKey, Downstream>,
    audit: Arc<Audit>,
    limiter: RateLimiter,
    /// Set on shutdown: new calls are refused while in-flight ones finish.
    draining: AtomicBool,
    /// Cancels the calls still in flight when the drain deadline passes.
    drain_cancel: CancellationToken,
    /// Calls waiting for an upstream right now; `idle` is notified when it drops to zero.
    active_calls: AtomicUsize,
    idle: Notify,
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
    pub fn new(config: Arc<Config>, audit: Arc<Audit>) -> Result<Arc<Self>, BrokerError> {
        let state = State::build(config, None)?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            state: RwLock::new(Arc::new(state)),
            stops: Mutex::new(HashMap::new()),
            catalog: RwLock::new(Arc::new(Catalog::default())),
            sessions: DashMap::new(),
            next_session: AtomicU64::new(1),
            inflight: DashMap::new(),
            audit,
            limiter: RateLimiter::default(),
            draining: AtomicBool::new(false),
            drain_cancel: CancellationToken::new(),
            active_calls: AtomicUsize::new(0),
            idle: Notify::new(),
            subscriptions: Mutex::new(HashMap::new()),
            changes: broadcast::channel(64).0,
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    fn state(&self) -> Arc<State> {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Start every upstream's supervisor and the event router. Call once.
    pub fn start(self: &Arc<Self>) {
        let st = self.state();
        for up in &st.upstreams {
            self.launch(&st, up);
        }
        let rx = self.events_rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            let me = self.clone();
            tokio::spawn(async move { me.route_events(rx).await });
        }
    }

    /// Start one upstream's supervisor, stoppable on its own (reload) or with the broker.
    fn launch(&self, st: &State, up: &Arc<Upstream>) {
        // A shared connection with a configured credential (static, or a Vault path without
        // caller placeholders) resolves it before every (re)connect.
        if let Some(auth) = up.config.upstream_auth.clone()
            && !up.per_caller
        {
            let creds = st.credentials.clone();
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
        let stop = self.shutdown.child_token();
        if let Ok(mut stops) = self.stops.lock()
            && let Some(old) = stops.insert(up.name.clone(), stop.clone())
        {
            old.cancel();
        }
        self.tasks
            .spawn(up.clone().supervise(self.events_tx.clone(), stop));
    }

    /// Apply a new configuration without dropping sessions: servers added, removed or changed
    /// (compared by their configuration) are started and stopped; unchanged ones keep their
    /// connections. Policy, credentials and limits are replaced. Sessions whose view changed get
    /// list_changed. On error nothing changes.
    pub fn reload(&self, config: Arc<Config>) -> Result<ReloadSummary, BrokerError> {
        let old = self.state();
        let new = match State::build(config, Some(&old)) {
            Ok(s) => s,
            Err(e) => {
                metrics::global().reload(false);
                return Err(e);
            }
        };
        let mut summary = ReloadSummary::default();
        for up in &new.upstreams {
            match old.upstream(&up.name) {
                None => summary.added.push(up.name.to_string()),
                Some(o) if !Arc::ptr_eq(o, up) => summary.changed.push(up.name.to_string()),
                Some(_) => {}
            }
        }
        for up in &old.upstreams {
            if new.upstream(&up.name).is_none() {
                summary.removed.push(up.name.to_string());
            }
        }
        let new = Arc::new(new);
        if let Ok(mut slot) = self.state.write() {
            *slot = new.clone();
        }
        for name in summary.removed.iter() {
            if let Some(stop) = self
                .stops
                .lock()
                .ok()
                .and_then(|mut s| s.remove(name.as_str()))
            {
                stop.cancel();
            }
        }
        for name in summary.removed.iter().chain(&summary.changed) {
            self.limiter.forget_server(name);
        }
        for up in &new.upstreams {
            let name = up.name.to_string();
            if summary.added.contains(&name) || summary.changed.contains(&name) {
                self.launch(&new, up);
            }
        }
        metrics::global().reload(true);
        self.rebuild();
        Ok(summary)
    }

    /// Stop every upstream (children closed and reaped) and wait for it.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The configuration in force (it changes on reload).
    pub fn config(&self) -> Arc<Config> {
        self.state().config.clone()
    }

    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.state().upstreams.clone()
    }

    fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.state().upstream(name).cloned()
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
            if self.upstreams().iter().all(|u| u.per_caller || u.is_up()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.rebuild();
    }

    /// `/readyz`: the servers marked `required = true` that are down (empty = ready).
    pub fn required_down(&self) -> Vec<String> {
        self.upstreams()
            .iter()
            .filter(|u| u.config.required && !u.per_caller && !u.is_up())
            .map(|u| u.name.to_string())
            .collect()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The broker's live-state gauges, in Prometheus text, followed by the process-wide counters.
    pub fn render_metrics(&self) -> String {
        let st = self.state();
        let mut g = String::new();
        let server = |u: &Upstream| vec![("server", u.name.to_string())];
        let up: Vec<_> = st
            .upstreams
            .iter()
            .map(|u| (server(u), if u.is_up() { 1.0 } else { 0.0 }))
            .collect();
        metrics::gauge(
            &mut g,
            "mcp_broker_upstream_up",
            "1 when the server has a live connection (for per-caller servers: any caller's).",
            &up,
        );
        let restarts: Vec<_> = st
            .upstreams
            .iter()
            .map(|u| (server(u), u.reconnects.load(Ordering::Relaxed) as f64))
            .collect();
        metrics::counter(
            &mut g,
            "mcp_broker_upstream_restarts_total",
            "Connections made to the server after the first (reconnects, child restarts).",
            &restarts,
        );
        let conns: Vec<_> = st
            .upstreams
            .iter()
            .map(|u| (server(u), u.open_connections() as f64))
            .collect();
        metrics::gauge(
            &mut g,
            "mcp_broker_upstream_connections",
            "Open upstream connections (shared plus per-caller).",
            &conns,
        );
        let children: usize = st
            .upstreams
            .iter()
            .filter(|u| u.config.transport.kind() == "stdio")
            .map(|u| u.open_connections())
            .sum();
        metrics::gauge(
            &mut g,
            "mcp_broker_child_processes",
            "Live stdio upstream child processes.",
            &[(vec![], children as f64)],
        );
        let live = self
            .sessions
            .iter()
            .filter(|s| !s.peer.is_transport_closed())
            .count();
        metrics::gauge(
            &mut g,
            "mcp_broker_sessions",
            "Open downstream MCP sessions (stateful Streamable HTTP and stdio).",
            &[(vec![], live as f64)],
        );
        metrics::gauge(
            &mut g,
            "mcp_broker_inflight_calls",
            "Requests waiting for an upstream right now.",
            &[(vec![], self.active_calls.load(Ordering::Relaxed) as f64)],
        );
        let busy: Vec<_> = st
            .concurrency
            .iter()
            .map(|(name, c)| (vec![("server", name.to_string())], c.in_use() as f64))
            .collect();
        metrics::gauge(
            &mut g,
            "mcp_broker_concurrency_in_use",
            "Slots taken of a server's max_concurrent.",
            &busy,
        );
        metrics::gauge(
            &mut g,
            "mcp_broker_ready",
            "1 when every server marked required is up.",
            &[(
                vec![],
                if self.required_down().is_empty() {
                    1.0
                } else {
                    0.0
                },
            )],
        );
        metrics::global().render(&g)
    }

    // -- sessions ---------------------------------------------------------------------------------

    /// Remember a downstream session for list_changed, log and resource-update notifications.
    /// `caller` (who opened it) lets list changes go only to sessions whose view changed.
    pub fn register_session(&self, peer: Peer<RoleServer>, caller: Option<Caller>) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let view = match &caller {
            Some(c) => self.view_of(&self.state(), &self.catalog(), c),
            None => [0; 3],
        };
        self.sessions.insert(
            id,
            Session {
                peer,
                logging: AtomicBool::new(false),
                caller,
                view: Mutex::new(view),
            },
        );
        id
    }

    /// What `caller` is shown of `cat`, as a fingerprint per kind.
    fn view_of(&self, st: &State, cat: &Catalog, caller: &Caller) -> [u64; 3] {
        cat.fingerprint_where(&|kind, server, original| {
            let kind = match kind {
                0 => Kind::Tool,
                1 => Kind::Prompt,
                _ => Kind::Resource,
            };
            st.policy.decide(caller, server, kind, original).allow
        })
    }

    fn live_sessions(&self) -> Vec<u64> {
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
        self.sessions.iter().map(|e| *e.key()).collect()
    }

    /// For the HTTP front's step-up answer: the policy decision on a `tools/call` of `exposed`, when a
    /// `step_up` rule refuses it (then the call gets HTTP 403 instead of an `isError` result).
    pub fn step_up_refusal(
        &self,
        caller: &Caller,
        exposed: &str,
        request_id: &serde_json::Value,
    ) -> Option<Decision> {
        let st = self.state();
        if !st.policy.has_step_up() {
            return None;
        }
        let cat = self.catalog();
        let e = cat.tools.get(exposed)?;
        let d = st.policy.decide(caller, &e.server, Kind::Tool, &e.original);
        if d.step_up.is_none() || d.allow {
            return None;
        }
        // The elevation request is a decision too (SB-7): record what was asked and what was held.
        let mut rec = self.audit.begin(caller, "tool", exposed);
        rec.request(request_id.clone(), None);
        rec.route(&e.server, &e.original);
        let wanted = d.step_up.as_deref().unwrap_or_default().join(" ");
        rec.decision(
            false,
            &format!(
                "step-up required: scope \"{wanted}\" (token has \"{}\"): {}",
                caller.scopes.join(" "),
                d.reason
            ),
            Some(d.label()),
        );
        Some(d)
    }

    pub fn has_step_up(&self) -> bool {
        self.state().policy.has_step_up()
    }

    // -- lists ------------------------------------------------------------------------------------

    /// The entries of one catalog section `caller` may see; one audit record (kind `list`).
    fn visible<T: Clone>(
        &self,
        caller: &Caller,
        down: Option<&Downstream>,
        what: &str,
        kind: Kind,
        entries: &[crate::catalog::Entry<T>],
    ) -> Vec<T> {
        let st = self.state();
        let mut rec = self.audit.begin(caller, "list", what);
        if let Some(d) = down {
            rec.request(request_id_value(&d.request_id), d.session);
        }
        let shown: Vec<T> = entries
            .iter()
            .filter(|e| st.policy.decide(caller, &e.server, kind, &e.original).allow)
            .map(|e| e.item.clone())
            .collect();
        let hidden = entries.len() - shown.len();
        rec.decision(
            true,
            &format!("{} shown, {hidden} hidden by policy", shown.len()),
            None,
        );
        rec.listed(shown.len(), hidden);
        shown
    }

    pub fn list_tools(&self, caller: &Caller, down: Option<&Downstream>) -> Vec<Item> {
        let cat = self.catalog();
        self.visible(caller, down, "tools", Kind::Tool, &cat.tools.entries)
    }

    pub fn list_prompts(&self, caller: &Caller, down: Option<&Downstream>) -> Vec<Item> {
        let cat = self.catalog();
        self.visible(caller, down, "prompts", Kind::Prompt, &cat.prompts.entries)
    }

    pub fn list_resources(&self, caller: &Caller, down: Option<&Downstream>) -> Vec<Item> {
        let cat = self.catalog();
        self.visible(
            caller,
            down,
            "resources",
            Kind::Resource,
            &cat.resources.entries,
        )
    }

    pub fn list_resource_templates(&self, caller: &Caller, down: Option<&Downstream>) -> Vec<Item> {
        let cat = self.catalog();
        self.visible(
            caller,
            down,
            "resource_templates",
            Kind::Resource,
            &cat.templates.entries,
        )
    }

    /// (server, upstream name) for an exposed tool or prompt name: the catalog's entry, else an
    /// unprefixed server that may answer for itself; otherwise -32602.
    fn resolve_name(
        &self,
        st: &State,
        kind: Kind,
        exposed: &str,
    ) -> Result<(Arc<str>, String), ErrorData> {
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
            .or_else(|| unlisted(st, exposed, kind == Kind::Tool).map(|s| (s, exposed.to_string())))
            .ok_or_else(|| {
                ErrorData::invalid_params(format!("unknown {} `{exposed}`", kind.as_str()), None)
            })
    }

    /// Rebuild the catalog from the live connections; notify sessions whose view changed.
    fn rebuild(&self) -> Vec<Collision> {
        let st = self.state();
        let mut listings: HashMap<Arc<str>, Listing> = HashMap::new();
        for up in &st.upstreams {
            if let Some(l) = up.listing() {
                listings.insert(up.name.clone(), l);
            }
        }
        let old = self.catalog();
        let (new, collisions) = Catalog::build(
            &st.namespaces,
            &listings,
            &st.config.broker.separator,
            Some(&old),
        );
        for c in &collisions {
            tracing::warn!(kind = c.kind, name = %c.name, kept = %c.kept, dropped = %c.dropped, "name collision: entry left out");
        }
        let (before, after) = (old.fingerprint(), new.fingerprint());
        let new = Arc::new(new);
        if let Ok(mut slot) = self.catalog.write() {
            *slot = new.clone();
        }
        let kinds = [ListKind::Tools, ListKind::Prompts, ListKind::Resources];
        for (i, k) in kinds.iter().enumerate() {
            if before[i] != after[i] {
                let _ = self.changes.send(*k);
            }
        }
        // Per session: compare what its caller sees now with what it saw at the last notification
        // (a reload can change the policy without changing the catalog, so always check).
        let mut notify: Vec<(Peer<RoleServer>, Vec<ListKind>)> = Vec::new();
        for id in self.live_sessions() {
            let Some(s) = self.sessions.get(&id) else {
                continue;
            };
            let changed: Vec<ListKind> = match &s.caller {
                Some(c) => {
                    let view = self.view_of(&st, &new, c);
                    let Ok(mut seen) = s.view.lock() else {
                        continue;
                    };
                    let changed = (0..3)
                        .filter(|&i| seen[i] != view[i])
                        .map(|i| kinds[i])
                        .collect();
                    *seen = view;
                    changed
                }
                None => (0..3)
                    .filter(|&i| before[i] != after[i])
                    .map(|i| kinds[i])
                    .collect(),
            };
            if !changed.is_empty() {
                notify.push((s.peer.clone(), changed));
            }
        }
        if !notify.is_empty() {
            tokio::spawn(async move {
                for (peer, changed) in notify {
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

    /// Open the audit record of a request.
    fn begin(
        &self,
        caller: &Caller,
        kind: &'static str,
        name: &str,
        down: &Downstream,
    ) -> CallRecord {
        let mut rec = self.audit.begin(caller, kind, name);
        rec.request(request_id_value(&down.request_id), down.session);
        rec
    }

    /// Refuse new calls once draining.
    fn refuse_if_draining(&self, rec: &mut CallRecord) -> Result<(), String> {
        if !self.is_draining() {
            return Ok(());
        }
        let msg = "mcp-broker is shutting down and accepts no new calls; retry shortly".to_string();
        rec.decision(false, &msg, Some("drain".into()));
        rec.finish(Outcome::Error, Some(msg.clone()));
        Err(msg)
    }

    /// Rate limits (caller, server, tool) then the server's concurrency cap. The permit, if any,
    /// is held until the call ends.
    async fn admit(
        &self,
        st: &State,
        caller: &Caller,
        server: &Arc<str>,
        tool: Option<&str>,
        timeout: Duration,
        rec: &mut CallRecord,
    ) -> Result<Option<OwnedSemaphorePermit>, Refusal> {
        let now = Instant::now();
        let Some(cfg) = st.config.server(server) else {
            return Ok(None);
        };
        let tool_limit = tool
            .and_then(|t| cfg.tool_limits.get(t))
            .and_then(|l| l.rate_limit.as_ref());
        let checks = [
            (
                "caller",
                caller.sub.clone(),
                st.config.limits.per_caller.as_ref(),
            ),
            ("server", server.to_string(), cfg.rate_limit.as_ref()),
            (
                "tool",
                tool_key(server, tool.unwrap_or_default()),
                tool_limit,
            ),
        ];
        for (scope, key, limit) in checks {
            let Some(limit) = limit else { continue };
            if let Err(wait) = self.limiter.take(scope, &key, limit, now) {
                let what = match scope {
                    "caller" => format!("caller `{}`", caller.sub),
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
        match slots.acquire(timeout).await {
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

    fn refused(&self, rec: &mut CallRecord, server: &str, r: Refusal) -> Refusal {
        metrics::global().rate_limited(r.scope, server);
        rec.rate_limited(&r.message);
        r
    }

    pub async fn call_tool(
        &self,
        caller: &Caller,
        mut params: CallToolRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<CallToolResponse, ErrorData> {
        let mut rec = self.begin(caller, "tool", &params.name, &down);
        rec.arguments(params.arguments.as_ref());
        if let Err(msg) = self.refuse_if_draining(&mut rec) {
            return Ok(tool_error(msg).into());
        }
        let st = self.state();
        let (server, original) = self
            .resolve_name(&st, Kind::Tool, &params.name)
            .map_err(|e| unknown(&mut rec, e))?;
        rec.route(&server, &original);
        let decision = st.policy.decide_call(
            caller,
            &server,
            Kind::Tool,
            &original,
            params.arguments.as_ref(),
        );
        rec.decision(decision.allow, &decision.reason, Some(decision.label()));
        if !decision.allow {
            return Ok(tool_error(decision.reason).into());
        }
        let timeout = st
            .config
            .server(&server)
            .and_then(|c| c.tool_limits.get(&original))
            .and_then(|l| l.timeout)
            .or_else(|| st.config.server(&server).map(|c| c.timeout))
            .unwrap_or(Duration::from_secs(60));
        let _permit = match self
            .admit(&st, caller, &server, Some(&original), timeout, &mut rec)
            .await
        {
            Ok(p) => p,
            Err(r) => return Ok(rate_limited_result(&r).into()),
        };
        let tool_name = original.clone();
        params.name = original.into();
        params.meta = forwardable_meta(params.meta.take());
        let req = raw::custom_request("tools/call", &params);
        let call = Call {
            server: &server,
            caller,
            tool: Some(&tool_name),
            down: &down,
            ct: &ct,
            timeout,
        };
        match self.forward(&st, call, req, &mut rec).await.map(raw::typed) {
            Ok(ServerResult::CallToolResult(r)) => {
                if r.is_error == Some(true) {
                    rec.finish(Outcome::ToolError, tool_error_text(&r));
                } else {
                    rec.finish(Outcome::Ok, None);
                }
                Ok(CallToolResponse::Complete(r))
            }
            Ok(ServerResult::InputRequiredResult(r)) => {
                rec.finish(Outcome::Ok, None);
                Ok(CallToolResponse::InputRequired(r))
            }
            Ok(ServerResult::CreateTaskResult(r)) => {
                rec.finish(Outcome::Ok, None);
                Ok(CallToolResponse::Task(r))
            }
            Ok(_) => {
                let e = unexpected(&server);
                rec.finish(Outcome::Error, Some(e.message.to_string()));
                Err(e)
            }
            Err(f) => {
                f.record(&mut rec);
                match f {
                    Failure::Rpc(e) => Err(e),
                    Failure::Unavailable(m) | Failure::Timeout(m) => Ok(tool_error(m).into()),
                    Failure::Cancelled(m) => Err(ErrorData::internal_error(m, None)),
                }
            }
        }
    }

    pub async fn get_prompt(
        &self,
        caller: &Caller,
        mut params: GetPromptRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<GetPromptResponse, ErrorData> {
        let mut rec = self.begin(caller, "prompt", &params.name, &down);
        rec.arguments(params.arguments.as_ref());
        if let Err(msg) = self.refuse_if_draining(&mut rec) {
            return Err(ErrorData::internal_error(msg, None));
        }
        let st = self.state();
        let (server, original) = self
            .resolve_name(&st, Kind::Prompt, &params.name)
            .map_err(|e| unknown(&mut rec, e))?;
        rec.route(&server, &original);
        let decision = st.policy.decide(caller, &server, Kind::Prompt, &original);
        rec.decision(decision.allow, &decision.reason, Some(decision.label()));
        if !decision.allow {
            return Err(ErrorData::invalid_request(decision.reason, None));
        }
        let timeout = server_timeout(&st, &server);
        let _permit = self
            .admit(&st, caller, &server, None, timeout, &mut rec)
            .await
            .map_err(|r| rate_limited_error(&r))?;
        params.name = original;
        params.meta = forwardable_meta(params.meta.take());
        let req = raw::custom_request("prompts/get", &params);
        let call = Call {
            server: &server,
            caller,
            tool: None,
            down: &down,
            ct: &ct,
            timeout,
        };
        let r = match self.forward(&st, call, req, &mut rec).await.map(raw::typed) {
            Ok(ServerResult::GetPromptResult(r)) => Ok(GetPromptResponse::Complete(r)),
            Ok(ServerResult::InputRequiredResult(r)) => Ok(GetPromptResponse::InputRequired(r)),
            Ok(_) => Err(Failure::Rpc(unexpected(&server))),
            Err(f) => Err(f),
        };
        finish(&mut rec, r)
    }

    pub async fn read_resource(
        &self,
        caller: &Caller,
        mut params: ReadResourceRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let mut rec = self.begin(caller, "resource", &params.uri, &down);
        if let Err(msg) = self.refuse_if_draining(&mut rec) {
            return Err(ErrorData::internal_error(msg, None));
        }
        let st = self.state();
        let cat = self.catalog();
        let Some(route) = cat.route_uri(&params.uri) else {
            let e = ErrorData::resource_not_found(
                format!("no server offers resource `{}`", params.uri),
                None,
            );
            return Err(unknown(&mut rec, e));
        };
        drop(cat);
        rec.route(&route.server, &route.original);
        let decision = st
            .policy
            .decide(caller, &route.server, Kind::Resource, &route.original);
        rec.decision(decision.allow, &decision.reason, Some(decision.label()));
        if !decision.allow {
            return Err(ErrorData::invalid_request(decision.reason, None));
        }
        let timeout = server_timeout(&st, &route.server);
        let _permit = self
            .admit(&st, caller, &route.server, None, timeout, &mut rec)
            .await
            .map_err(|r| rate_limited_error(&r))?;
        params.uri = route.original.clone();
        params.meta = forwardable_meta(params.meta.take());
        let req = raw::custom_request("resources/read", &params);
        let call = Call {
            server: &route.server,
            caller,
            tool: None,
            down: &down,
            ct: &ct,
            timeout,
        };
        let r = match self.forward(&st, call, req, &mut rec).await.map(raw::typed) {
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
            Ok(_) => Err(Failure::Rpc(unexpected(&route.server))),
            Err(f) => Err(f),
        };
        finish(&mut rec, r)
    }

    pub async fn complete(
        &self,
        caller: &Caller,
        mut params: CompleteRequestParams,
        down: Downstream,
        ct: CancellationToken,
    ) -> Result<CompleteResult, ErrorData> {
        let st = self.state();
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
        let mut rec = self.begin(caller, "completion", &original, &down);
        rec.route(&server, &original);
        let decision = st.policy.decide(caller, &server, kind, &original);
        rec.decision(decision.allow, &decision.reason, Some(decision.label()));
        if !decision.allow {
            return Ok(CompleteResult::default());
        }
        params.meta = forwardable_meta(params.meta.take());
        let req = ClientRequest::CompleteRequest(CompleteRequest::new(params));
        let call = Call {
            server: &server,
            caller,
            tool: None,
            down: &down,
            ct: &ct,
            timeout: server_timeout(&st, &server),
        };
        let r = match self.forward(&st, call, req, &mut rec).await {
            Ok(ServerResult::CompleteResult(r)) => Ok(r),
            Ok(_) => Err(Failure::Rpc(unexpected(&server))),
            Err(f) => Err(f),
        };
        finish(&mut rec, r)
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
        for up in self.upstreams().iter() {
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
    /// per-caller server the caller's own, opened with the caller's credential. Returns the
    /// credential kind used, for audit.
    async fn connection_for(
        &self,
        st: &State,
        up: &Upstream,
        caller: &Caller,
        tool: Option<&str>,
    ) -> Result<(Arc<Connection>, &'static str), Failure> {
        let server = &up.name;
        if !up.per_caller {
            let kind = up
                .config
                .upstream_auth
                .as_ref()
                .map_or("none", credential_kind);
            return up.connection().map(|c| (c, kind)).ok_or_else(|| {
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
            let cred = st
                .credentials
                .resolve_with(auth, caller, tool, fresh)
                .await
                .map_err(|e| {
                    tracing::warn!(server = %server, sub = %caller.sub, error = %e, "no upstream credential");
                    Failure::Unavailable(format!("server `{server}`: {e}"))
                })?;
            let kind = cred.kind;
            // One connection per (caller, credential): servers bind sessions to the token that
            // opened them, so a new or narrower token gets its own session.
            use sha2::Digest;
            let hex = |h: sha2::Sha256| crate::hex(&h.finalize());
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
                Ok(c) => return Ok((c, kind)),
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
        let st = self.state();
        let mut listed = false;
        for up in st.upstreams.iter().filter(|u| u.per_caller && !u.listed()) {
            match tokio::time::timeout(
                up.config.connect_timeout,
                self.connection_for(&st, up, caller, None),
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

    /// Send `req` to `call.server` and wait for its result, forwarding progress and cancellation.
    /// The call's timeout is an idle timeout: each progress notification from the upstream restarts it.
    async fn forward(
        &self,
        st: &State,
        call: Call<'_>,
        req: ClientRequest,
        rec: &mut CallRecord,
    ) -> Result<ServerResult, Failure> {
        let Call {
            server,
            caller,
            tool,
            down,
            ct,
            timeout,
        } = call;
        let up = st
            .upstream(server)
            .ok_or_else(|| Failure::Rpc(unexpected(server)))?;
        let _active = ActiveCall::new(self);
        let (conn, kind) = self.connection_for(st, up, caller, tool).await?;
        rec.credential(kind);
        let opts = PeerRequestOptions::with_timeout(timeout).reset_timeout_on_progress();
        rec.upstream_started();
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
                    return Err(Failure::Cancelled("request cancelled by the client".into()));
                }
                _ = self.drain_cancel.cancelled() => {
                    let p = CancelledNotificationParam::new(Some(id), Some("mcp-broker is shutting down".into()));
                    let _ = upeer.notify_cancelled(p).await;
                    return Err(Failure::Cancelled(
                        "cancelled: mcp-broker is shutting down and the drain deadline passed".into(),
                    ));
                }
            }
        };
        rec.upstream_finished();
        match result {
            Ok(r) => Ok(r),
            Err(ServiceError::McpError(e)) => Err(Failure::Rpc(e)),
            Err(ServiceError::Timeout { timeout }) => {
                let p = CancelledNotificationParam::new(
                    Some(id),
                    Some("timed out at mcp-broker".into()),
                );
                let _ = upeer.notify_cancelled(p).await;
                Err(Failure::Timeout(format!(
                    "server `{server}` did not answer within {timeout:?} (no result or progress in that time)"
                )))
            }
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

    /// Stop taking new calls, let the ones in flight finish for up to `deadline`, then cancel the
    /// rest (each is recorded in the audit as `cancelled`). Returns how many had to be cancelled.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let idle = self.idle.notified();
            if self.active_calls.load(Ordering::SeqCst) == 0 {
                return 0;
            }
            if tokio::time::timeout_at(end, idle).await.is_err() {
                break;
            }
        }
        let left = self.active_calls.load(Ordering::SeqCst);
        if left > 0 {
            tracing::warn!(
                calls = left,
                ?deadline,
                "drain deadline passed: cancelling the calls still in flight"
            );
            self.drain_cancel.cancel();
            // Give the cancelled calls a moment to unwind and write their audit records.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while self.active_calls.load(Ordering::SeqCst) > 0 {
                    self.idle.notified().await;
                }
            })
            .await;
        }
        left
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

/// One forwarded request: where it goes, for whom, and how long it may stay silent.
struct Call<'a> {
    server: &'a Arc<str>,
    caller: &'a Caller,
    tool: Option<&'a str>,
    down: &'a Downstream,
    ct: &'a CancellationToken,
    timeout: Duration,
}

/// Counts a call in flight for draining; notifies the drain when the last one ends.
struct ActiveCall<'a>(&'a Broker);

impl<'a> ActiveCall<'a> {
    fn new(b: &'a Broker) -> Self {
        b.active_calls.fetch_add(1, Ordering::SeqCst);
        Self(b)
    }
}

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        if self.0.active_calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Where a name the catalog does not list goes: to the one connected server that exposes names
/// unchanged (`prefix = ""`) and whose `tools` filter admits it, so that server answers for itself
/// exactly as it would directly (it may have tools it does not list, or answer its own error).
/// Prefixed names are never split to guess a server.
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

/// The credential kind a configured `upstream_auth` sends (for audit; a chain reports its first).
fn credential_kind(auth: &UpstreamAuth) -> &'static str {
    match auth {
        UpstreamAuth::Exchange { .. } => "token_exchange",
        UpstreamAuth::Vault { .. } => "vault",
        UpstreamAuth::Static(_) => "static",
        UpstreamAuth::First(list) => list.first().map_or("none", credential_kind),
    }
}

/// A name no server offers: recorded as a catalog denial with outcome `error`.
fn unknown(rec: &mut CallRecord, e: ErrorData) -> ErrorData {
    rec.decision(false, &e.message, Some("catalog".into()));
    rec.finish(Outcome::Error, Some(e.message.to_string()));
    e
}

fn server_timeout(st: &State, server: &str) -> Duration {
    st.config
        .server(server)
        .map_or(Duration::from_secs(60), |c| c.timeout)
}

fn request_id_value(id: &RequestId) -> serde_json::Value {
    serde_json::to_value(id).unwrap_or(serde_json::Value::Null)
}

/// Record how a prompt/resource/completion request ended and map a failure to its JSON-RPC error.
fn finish<T>(rec: &mut CallRecord, r: Result<T, Failure>) -> Result<T, ErrorData> {
    match r {
        Ok(v) => {
            rec.finish(Outcome::Ok, None);
            Ok(v)
        }
        Err(f) => {
            f.record(rec);
            Err(f.into_error())
        }
    }
}

/// The first text of an `isError` result, shortened, for the audit record.
fn tool_error_text(r: &CallToolResult) -> Option<String> {
    let text = r
        .content
        .iter()
        .find_map(|c| c.as_text().map(|t| t.text.clone()))?;
    Some(text.chars().take(200).collect())
}

/// A JSON-RPC error code for "rate limited" (in the implementation-defined server error range).
pub const RATE_LIMITED: i32 = -32029;

/// A tool call refused by a limit: an `isError` result the model can read, with the wait in `_meta`.
fn rate_limited_result(r: &Refusal) -> CallToolResult {
    let mut res = tool_error(r.message.clone());
    let mut meta = rmcp::model::MetaObject::new();
    meta.insert(
        "io.mcp-broker/retryAfterMs".into(),
        serde_json::json!(r.retry_after.as_millis() as u64),
    );
    res.meta = Some(meta);
    res
}

/// A prompt or resource request refused by a limit.
fn rate_limited_error(r: &Refusal) -> ErrorData {
    ErrorData::new(
        rmcp::model::ErrorCode(RATE_LIMITED),
        r.message.clone(),
        Some(serde_json::json!({
            "scope": r.scope,
            "retryAfterMs": r.retry_after.as_millis() as u64,
        })),
    )
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
