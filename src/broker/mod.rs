//! The transport-free core.
//!
//! | file | job |
//! |---|---|
//! | [`pipeline`] | the one path every client request takes: caller limit → resolve → decide → limits → audit → credential → connection → forward → result |
//! | `forward` | the upstream leg: the connection for (server, isolation owner), progress, cancellation, server-to-client routes |
//! | `lists` | the catalog (rebuilt from upstream listings), what each caller is shown, start-up waiting |
//! | `sessions` | the session registry: owner, view, log level, a bounded outbound queue and writer per session |
//! | `events` | upstream events → the sessions entitled to them (never awaiting a session) |
//! | `guard` | `[guard]` pins and description findings: which upstream tools enter the catalog, refusals for held ones |
//! | `state` | what a reload replaces at once (servers, policy, credentials, limits) |
//! | `errors` | failures → JSON-RPC errors or `isError` results |

// Sampling, elicitation, roots, logging and resources/subscribe are deprecated by SEP-2577 in the
// 2026-07-28 revision, but Claude and most clients speak 2025-11-25, where they are live.
#![allow(deprecated)]

pub mod approvals;
mod consent;
mod errors;
mod events;
mod forward;
mod guard;
pub mod lists;
mod mrtr;
pub mod pipeline;
mod sessions;
mod state;
pub mod status;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rmcp::{
    RoleServer,
    model::{ClientCapabilities, ProgressToken, RequestId},
    service::Peer,
};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::Audit;
use crate::auth::Caller;
use crate::catalog::Catalog;
use crate::catalog::Kind;
use crate::config::Config;
use crate::credentials::CredentialError;
use crate::limits::RateLimiter;
use crate::metrics;
use crate::policy::PolicyError;
use crate::upstream::{Secrets, Upstream, UpstreamError, UpstreamEvent};

pub use errors::RATE_LIMITED;
pub use pipeline::{Op, Reply};
pub use sessions::SessionError;
pub use state::{ReloadSummary, build_policy};

use sessions::Sessions;
use state::State;

/// The downstream side of one request: where its progress and server-to-client requests go.
#[derive(Clone)]
pub struct Downstream {
    pub peer: Peer<RoleServer>,
    pub request_id: RequestId,
    pub progress_token: Option<ProgressToken>,
    pub capabilities: Option<ClientCapabilities>,
    /// A 2026-07-28 (stateless) request: the protocol has no server-to-client requests.
    pub stateless: bool,
    /// The broker's id for the downstream session, when it has one.
    pub session: Option<u64>,
    /// For a 2026-07-28 call: where an upstream's server-to-client request goes to be turned into
    /// an input_required result (set by the pipeline).
    pub asks: Option<mpsc::Sender<mrtr::Ask>>,
    /// The client's HTTP `traceparent` header (W3C): the parent of the request's span when its
    /// `_meta` carries none.
    pub traceparent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("[guard] pins: {0}")]
    Pins(#[from] crate::guard::pins::PinsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error("no OS random source for the requestState key: {0}")]
    Random(#[from] getrandom::Error),
    #[error("[cluster]: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// (server, connection id, upstream request id): request ids are only unique per connection.
type InflightKey = (Arc<str>, u64, RequestId);

/// (server, connection id, the upstream's own resource URI): subscriptions are per connection.
type SubscriptionKey = (Arc<str>, u64, String);

pub struct Broker {
    state: RwLock<Arc<State>>,
    /// Each upstream's supervisor stops when its token is cancelled (removed or replaced on reload).
    stops: Mutex<HashMap<Arc<str>, CancellationToken>>,
    catalog: RwLock<Arc<Catalog>>,
    /// What 2025-era clients are shown: the same catalog, except for servers kept on a separate
    /// 2025-11-25 connection (which may list differently in each revision).
    catalog_legacy: RwLock<Arc<Catalog>>,
    /// `[guard]`: the tools held out of the catalog, and what has been audited already.
    guard: guard::GuardMemory,
    sessions: Sessions,
    /// (server, connection, upstream request id) → the downstream request it serves, for
    /// server-to-client requests.
    inflight: DashMap<InflightKey, Downstream>,
    /// (server, connection, upstream URI) → the sessions subscribed through it.
    subscriptions: Mutex<HashMap<SubscriptionKey, std::collections::HashSet<u64>>>,
    /// For 2026-07-28 servers (no resources/subscribe): the `subscriptions/listen` stream held open
    /// per subscribed (connection, URI), stopped with its last subscriber (unsubscribe or session
    /// close); bounded as subscriptions are (per session).
    resource_listens: DashMap<SubscriptionKey, CancellationToken>,
    /// The log level last sent to each upstream connection (the most verbose its receivers want);
    /// entries of closed connections are dropped at the next setLevel.
    upstream_levels: DashMap<u64, u8>,
    audit: Arc<Audit>,
    limiter: RateLimiter,
    /// Seals the `requestState` of input_required results relayed to 2026-07-28 clients.
    seal: mrtr::Seal,
    /// 2026-07-28 calls to 2025-era upstreams waiting for the client's answers, by park id: only
    /// the caller the sealed state names resumes one; at most `mrtr::MAX_PARKED` (per caller
    /// `MAX_PARKED_PER_CALLER`); dropped (and cancelled upstream) when resumed to completion or
    /// swept once `request_state_ttl` passed.
    parked: DashMap<u64, mrtr::Parked>,
    next_park: AtomicU64,
    /// `[cluster]`: state shared with the other instances; `None` = everything in process.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Upstream OAuth tokens per (caller, server): in Redis under `[cluster]`, else the
    /// `[token_store]` file [`Broker::with_tokens`] was given, else in memory.
    pub tokens: Arc<crate::oauth::store::TokenStore>,
    /// Approval grants and calls waiting for an approver (`effect = "approve"` rules).
    pub approvals: approvals::Approvals,
    /// Configuration reloads applied since start.
    generation: AtomicU64,
    /// This broker (for the tasks a parked call runs in).
    me: std::sync::Weak<Broker>,
    /// Last audited limit refusal per subject: at most one such record per caller per second.
    limit_audited: DashMap<String, Instant>,
    /// Set on shutdown: new requests are refused while in-flight ones finish.
    draining: AtomicBool,
    /// Cancels the calls still in flight when the drain deadline passes.
    drain_cancel: CancellationToken,
    /// Calls waiting for an upstream right now; `idle` is notified when it drops to zero.
    active_calls: AtomicUsize,
    idle: Notify,
    /// Fan-out of list changes to 2026-07-28 `subscriptions/listen` streams.
    /// A list kind changed: in the catalog (`None`), or as announced by a server (`Some`).
    changes: broadcast::Sender<(Kind, Option<Arc<str>>)>,
    /// Poked whenever an upstream's state changes (start-up waiting).
    state_changed: Notify,
    started: Instant,
    events_tx: mpsc::UnboundedSender<UpstreamEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<UpstreamEvent>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Broker {
    /// A broker whose upstream tokens are in memory (or in Redis under `[cluster]`).
    pub fn new(config: Arc<Config>, audit: Arc<Audit>) -> Result<Arc<Self>, BrokerError> {
        Self::with_tokens(config, audit, None)
    }

    /// `file`: the opened `[token_store]` (opening it is async and can fail, so the caller does it);
    /// under `[cluster]` tokens go to Redis whatever is given.
    pub fn with_tokens(
        config: Arc<Config>,
        audit: Arc<Audit>,
        file: Option<crate::oauth::store::TokenStore>,
    ) -> Result<Arc<Self>, BrokerError> {
        let shutdown = CancellationToken::new();
        // One key for the whole cluster: any instance opens what another sealed.
        let (seal, cluster) = match &config.cluster {
            Some(c) => (
                mrtr::Seal::with_secret(c.secret_key.expose()),
                Some(crate::cluster::Cluster::start(
                    c.clone(),
                    config.broker.session_idle_timeout,
                    shutdown.clone(),
                )?),
            ),
            None => (mrtr::Seal::new()?, None),
        };
        // Consent links made by any instance open on every instance.
        if let Some(c) = &config.cluster {
            crate::oauth::engine().set_secret_key(c.secret_key.expose());
        }
        if let Some(c) = &cluster {
            crate::oauth::engine().use_cluster(c);
        }
        // After the cluster: shared credentials go through it. A failure stops its heartbeat.
        let state = State::build(config.clone(), None, cluster.as_ref())
            .inspect_err(|_| shutdown.cancel())?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let tokens = Arc::new(match (&cluster, file) {
            (Some(c), _) => crate::oauth::store::TokenStore::redis(c.clone()),
            (None, Some(f)) => f,
            (None, None) => crate::oauth::store::TokenStore::memory(),
        });
        crate::oauth::engine().set_store(&tokens);
        crate::oauth::engine().set_audit(&audit);
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            tokens,
            approvals: approvals::Approvals::default(),
            parked: DashMap::new(),
            next_park: AtomicU64::new(1),
            cluster,
            generation: AtomicU64::new(0),
            state: RwLock::new(Arc::new(state)),
            stops: Mutex::new(HashMap::new()),
            catalog: RwLock::new(Arc::new(Catalog::default())),
            catalog_legacy: RwLock::new(Arc::new(Catalog::default())),
            guard: guard::GuardMemory::default(),
            sessions: Sessions::default(),
            inflight: DashMap::new(),
            subscriptions: Mutex::new(HashMap::new()),
            resource_listens: DashMap::new(),
            upstream_levels: DashMap::new(),
            audit,
            limiter: RateLimiter::default(),
            seal,
            limit_audited: DashMap::new(),
            draining: AtomicBool::new(false),
            drain_cancel: CancellationToken::new(),
            active_calls: AtomicUsize::new(0),
            idle: Notify::new(),
            changes: broadcast::channel(64).0,
            state_changed: Notify::new(),
            started: Instant::now(),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            shutdown,
            tasks: TaskTracker::new(),
        }))
    }

    fn state(&self) -> Arc<State> {
        self.state
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Start every upstream's supervisor, the event router and the session (and parked call) sweeper.
    /// Call once.
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
        // A caller who connected an upstream (upstream OAuth) sees its tools instead of `authorize`.
        let mut connected = crate::oauth::engine().subscribe();
        let me = Arc::downgrade(self);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let sub = tokio::select! {
                    r = connected.recv() => match r {
                        Ok(sub) => sub,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                let Some(me) = me.upgrade() else { return };
                for s in me
                    .sessions
                    .all()
                    .into_iter()
                    .filter(|s| s.caller.sub == sub)
                {
                    me.sessions.list_changed(&s, crate::catalog::Kind::Tool);
                }
            }
        });
        // Backstop for sessions whose front handle was not dropped (a transport that died quietly).
        let me = Arc::downgrade(self);
        let stop = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.cancelled() => return,
                }
                let Some(me) = me.upgrade() else { return };
                for id in me.sessions.closed() {
                    me.close_session(id);
                }
                // Parked calls whose state expired: dropped, which cancels them upstream.
                me.sweep_parked();
                me.approvals.sweep();
            }
        });
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
        let new = match State::build(config, Some(&old), self.cluster.as_ref()) {
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
        self.generation.fetch_add(1, Ordering::Relaxed);
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
    /// The cluster this instance is part of (`[cluster]`), if any.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    pub fn config(&self) -> Arc<Config> {
        self.state().config.clone()
    }

    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.state().upstreams.clone()
    }

    /// The catalog for a client of the 2025 era (`legacy`) or the 2026 one.
    pub fn catalog_in(&self, legacy: bool) -> Arc<Catalog> {
        if !legacy {
            return self.catalog();
        }
        self.catalog_legacy
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<(Kind, Option<Arc<str>>)> {
        self.changes.subscribe()
    }

    /// Wait until every upstream has either connected or failed once (for `mcp-broker tools`).
    pub async fn wait_connected(&self, deadline: Duration) {
        self.wait_started(deadline).await;
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

    // -- sessions ---------------------------------------------------------------------------------

    /// Register a downstream session (stateful Streamable HTTP or stdio), within the session caps.
    /// It receives list changes, logs and resource updates it is entitled to until
    /// [`Self::close_session`].
    pub fn open_session(
        &self,
        peer: Peer<RoleServer>,
        caller: Caller,
        front: Option<Arc<str>>,
    ) -> Result<u64, SessionError> {
        // Sessions are 2025-era clients (2026-07-28 requests have none).
        let view = self.view_of(&self.state(), &self.catalog_in(true), &caller);
        let cfg = self.config();
        let s = self.sessions.open(
            peer,
            caller,
            front,
            self.cluster.clone(),
            view,
            cfg.broker.max_sessions,
            cfg.broker.max_sessions_per_subject,
        )?;
        Ok(s.id)
    }

    /// The peer of an open session (the HTTP front's direct lane answers its requests).
    pub fn session_peer(&self, id: u64) -> Option<Peer<RoleServer>> {
        self.sessions.get(id).map(|s| s.peer.clone())
    }

    /// Forget a session: its queue, subscriptions and `isolation = "session"` connections go.
    pub fn close_session(&self, id: u64) {
        let Some(session) = self.sessions.remove(id) else {
            return;
        };
        // Subscriptions only this session held end upstream too.
        let mut ended = Vec::new();
        if let Ok(mut subs) = self.subscriptions.lock() {
            subs.retain(|key, ids| {
                if ids.remove(&id) && ids.is_empty() {
                    ended.push(key.clone());
                }
                !ids.is_empty()
            });
        }
        if !ended.is_empty()
            && let (Some(me), Ok(rt)) = (self.me.upgrade(), tokio::runtime::Handle::try_current())
        {
            rt.spawn(async move {
                for key in ended {
                    me.end_subscription(&key, &session.caller, Some(id)).await;
                }
            });
        }
        let owner = sessions::Session::owner_key(id);
        for up in self.upstreams() {
            if up.config.isolation == crate::config::Isolation::Session {
                up.close_owner(&owner);
            }
        }
    }

    /// Sessions held in the registry (a test and metrics hook: closed sessions must not linger).
    pub fn session_entries(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions whose outbound queue and writer have started (a test hook: an idle session has
    /// none; they start with its first notification).
    pub fn session_queues(&self) -> usize {
        self.sessions.queues()
    }

    // -- draining ---------------------------------------------------------------------------------

    /// Stop taking new requests, let the ones in flight finish for up to `deadline`, then cancel
    /// the rest (each is recorded in the audit as `cancelled`). Returns how many had to be cancelled.
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

    // -- metrics ----------------------------------------------------------------------------------

    /// The broker's live-state gauges, in Prometheus text, followed by the process-wide counters.
    pub fn render_metrics(&self) -> String {
        let st = self.state();
        let mut g = String::new();
        let server = |u: &Upstream| vec![("server", u.name.to_string())];
        let per = |f: &dyn Fn(&Upstream) -> f64| -> Vec<_> {
            st.upstreams.iter().map(|u| (server(u), f(u))).collect()
        };
        metrics::gauge(
            &mut g,
            "mcp_broker_upstream_up",
            "1 when the server has a live connection (for per-caller servers: any caller's).",
            &per(&|u| if u.is_up() { 1.0 } else { 0.0 }),
        );
        metrics::counter(
            &mut g,
            "mcp_broker_upstream_restarts_total",
            "Connections made to the server after the first (reconnects, child restarts).",
            &per(&|u| u.reconnects.load(Ordering::Relaxed) as f64),
        );
        metrics::gauge(
            &mut g,
            "mcp_broker_upstream_connections",
            "Open upstream connections (shared plus per-caller and per-session).",
            &per(&|u| u.open_connections() as f64),
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
        if let Some(c) = &self.cluster {
            metrics::gauge(
                &mut g,
                "mcp_broker_cluster_up",
                "1 while the cluster store (Redis) answers this instance's heartbeat.",
                &[(vec![], if c.is_up() { 1.0 } else { 0.0 })],
            );
            metrics::counter(
                &mut g,
                "mcp_broker_cluster_messages_dropped_total",
                "Messages from other instances dropped (queue full or unreadable).",
                &[(vec![], c.dropped.load(Ordering::Relaxed) as f64)],
            );
            metrics::counter(
                &mut g,
                "mcp_broker_cluster_sessions_reregistered_total",
                "Sessions written to Redis again after it lost them (restarted empty).",
                &[(vec![], c.reregistered.load(Ordering::Relaxed) as f64)],
            );
        }
        let all = self.sessions.all();
        let live = all.iter().filter(|s| !s.peer.is_transport_closed()).count();
        metrics::gauge(
            &mut g,
            "mcp_broker_sessions",
            "Open downstream MCP sessions (stateful Streamable HTTP and stdio).",
            &[(vec![], live as f64)],
        );
        metrics::gauge(
            &mut g,
            "mcp_broker_session_entries",
            "Sessions held in the broker's registry (open, or closed and not yet swept).",
            &[(vec![], all.len() as f64)],
        );
        metrics::gauge(
            &mut g,
            "mcp_broker_parked_calls",
            "2026-07-28 calls waiting for the client's answers to a server's requests (input_required).",
            &[(vec![], self.parked.len() as f64)],
        );
        metrics::counter(
            &mut g,
            "mcp_broker_notifications_dropped_total",
            "Notifications dropped because the receiving session's queue was full.",
            &[(vec![], self.sessions.dropped.load(Ordering::Relaxed) as f64)],
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
        let ready = if self.required_down().is_empty() {
            1.0
        } else {
            0.0
        };
        metrics::gauge(
            &mut g,
            "mcp_broker_ready",
            "1 when every server marked required is up.",
            &[(vec![], ready)],
        );
        metrics::global().render(&g)
    }
}
