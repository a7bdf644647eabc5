//! MCP client connections to upstream servers, one supervised connection per configured server.
//!
//! Each [`Upstream`] runs a supervisor task: connect (stdio child, legacy SSE or Streamable HTTP),
//! `initialize`, list everything, publish the connection, then watch it (transport end, failed health
//! pings) and reconnect with capped exponential backoff. Connecting one server never waits on another.
//! Everything an upstream says on its own (progress, logs, list changes, sampling/elicitation/roots
//! requests) goes up to the broker as an [`UpstreamEvent`]; this layer knows nothing of downstream.

// Sampling, elicitation, roots, logging and resources/subscribe are deprecated by SEP-2577 in the
// 2026-07-28 revision, but Claude and most clients speak 2025-11-25, where they are live.
#![allow(deprecated)]

mod era;
mod http_client;
pub mod lane;
mod progress;
pub mod raw;
pub mod redirect;
mod sse;
pub mod status;
mod stdio;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rmcp::{
    ClientHandler, ErrorData, RoleClient, ServiceExt,
    model::{
        ClientCapabilities, ClientConfig, ClientResult, CreateMessageRequest,
        CreateMessageRequestParams, CreateMessageResult, ElicitRequest, ElicitRequestParams,
        ElicitResult, Implementation, ListRootsRequest, ListRootsResult,
        LoggingMessageNotificationParam, RequestId, ResourceUpdatedNotificationParam,
        ServerPeerInfo, ServerRequest,
    },
    service::ClientServiceExt,
    service::{InboundStreamOrigin, NotificationContext, Peer, RequestContext, RunningService},
    transport::{
        ConfigureCommandExt, StreamableHttpClientTransport,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Item, Kind, Listing};
use crate::config::{Protocol, Secret, ServerConfig, TransportConfig};
use era::{discover, is_modern, lifecycle, listen_changes, wants_param_headers};

pub use http_client::StreamLink;
pub use progress::ProgressRouter;
pub use sse::SseError;

/// How often a connected upstream is pinged; a ping that fails or times out triggers a reconnect.
const HEALTH_INTERVAL: Duration = Duration::from_secs(15);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A connection that stayed up this long resets the backoff: a server that was killed once
/// reconnects at once, while one that dies right after connecting still backs off.
const STABLE_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Sse(#[from] SseError),
    #[error("HTTP client: {0}")]
    HttpClient(reqwest::Error),
    #[error("TLS files: {0}")]
    Tls(String),
    #[error("initialize failed: {0}")]
    Initialize(String),
    /// A stdio child that ended before answering `initialize`: its status and last stderr lines.
    #[error("the process exited before `initialize` ({}){}", exit_status(.status), stderr_lines(.stderr))]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("credential: {0}")]
    Credential(String),
}

fn exit_status(status: &std::process::ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return format!("killed by signal {sig}");
        }
    }
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => status.to_string(),
    }
}

fn stderr_lines(tail: &str) -> String {
    if tail.is_empty() {
        "; it wrote nothing to stderr".into()
    } else {
        format!("; its last stderr lines: {tail}")
    }
}

impl UpstreamError {
    /// A stdio command that does not exist or cannot be executed: retrying cannot help until the
    /// configuration changes (a reload) or the broker restarts.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Spawn { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied))
    }
}

/// Something an upstream did on its own initiative, for the broker to route.
#[derive(Debug)]
pub enum UpstreamEvent {
    /// The server connected (with a fresh listing) or went away.
    StateChanged { server: Arc<str> },
    ListChanged {
        server: Arc<str>,
        conn: u64,
        kind: Kind,
    },
    /// `conn` is the connection it came on: a per-caller or per-session connection's events belong
    /// to its owner only.
    Log {
        server: Arc<str>,
        conn: u64,
        params: LoggingMessageNotificationParam,
    },
    ResourceUpdated {
        server: Arc<str>,
        conn: u64,
        params: ResourceUpdatedNotificationParam,
    },
    /// A server-to-client request (sampling, elicitation, roots). `origin` is the upstream request id
    /// of the call whose response stream carried it, where the transport knows (Streamable HTTP).
    Request {
        server: Arc<str>,
        /// The connection it came on ([`Connection::id`]): request ids are per connection.
        conn: u64,
        request: ServerRequest,
        origin: Option<RequestId>,
        /// Cancelled when the upstream cancels its request (`notifications/cancelled`).
        cancel: CancellationToken,
        reply: oneshot::Sender<Result<ClientResult, ErrorData>>,
    },
}

pub type EventSender = mpsc::UnboundedSender<UpstreamEvent>;

/// Secrets to present when connecting: headers (HTTP/SSE) or environment variables (stdio).
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub headers: Vec<(String, Secret)>,
    pub env: Vec<(String, Secret)>,
}

/// Where a shared connection gets its secrets, asked before every (re)connect.
pub type SecretsSource =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Secrets, String>> + Send + Sync>;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// A live, initialized connection.
pub struct Connection {
    /// Unique across the process: request ids and progress tokens are per connection.
    pub id: u64,
    pub peer: Peer<RoleClient>,
    pub info: Option<Arc<ServerPeerInfo>>,
    /// What the server lists; replaced on `list_changed`.
    pub listing: Mutex<Listing>,
    /// Where this connection's progress notifications go, in wire order.
    pub progress: Arc<ProgressRouter>,
    /// Requests in flight on it (a superseded connection closes when this reaches 0).
    pub active: std::sync::atomic::AtomicUsize,
    /// Started with `server/discover`: the upstream speaks 2026-07-28 (stateless requests, no
    /// `ping`, `logging/setLevel` or `resources/subscribe`, list changes on `subscriptions/listen`).
    pub modern: bool,
    /// The direct path for relayed calls (stdio and Streamable HTTP; not legacy SSE).
    pub lane: Option<lane::Lane>,
}

impl Connection {
    /// The lane and the request it carries, if `req` can go that way (see [`lane::Lane::accepts`]).
    pub fn lane_for<'r>(
        &self,
        req: &'r rmcp::model::ClientRequest,
    ) -> Option<(&lane::Lane, &'r rmcp::model::CustomRequest)> {
        let lane = self.lane.as_ref()?;
        let wants_params = |name: &str| {
            self.listing.lock().map_or(true, |l| {
                l.tools
                    .iter()
                    .any(|t| t.str("name") == name && wants_param_headers(t.object()))
            })
        };
        lane.accepts(req, wants_params).map(|c| (lane, c))
    }
}

/// A connection opened for one owner (a caller, or one session): `isolation = "caller" | "session"`.
struct SubjectConn {
    conn: Arc<Connection>,
    /// Whose it is (`sub:NAME` or `session:ID`): its events go to that owner's sessions only.
    owner: Arc<str>,
    /// Fingerprint of the secrets it was opened with: a different one replaces the connection.
    version: String,
    /// Ends the connection (the watcher task then closes it: stdin, SIGTERM, SIGKILL for stdio).
    stop: CancellationToken,
    last_used: Mutex<Instant>,
}

/// One configured upstream server and its connections: one supervised shared connection, or, when
/// its credential depends on the caller, one lazily opened connection per (caller, credential).
pub struct Upstream {
    pub name: Arc<str>,
    pub config: ServerConfig,
    /// Connections are per caller: no shared connection is made.
    pub per_caller: bool,
    state: RwLock<Option<Arc<Connection>>>,
    /// A second, 2025-11-25 connection to a server that speaks both revisions (the shared one
    /// then speaks 2026-07-28): 2025-era clients are served on it exactly as the server serves
    /// their era (HTTP servers under `protocol = "auto"` only). Opened after the shared one, closed
    /// with it (or on shutdown); its events and calls are routed like the shared one's.
    legacy: RwLock<Option<Arc<Connection>>>,
    secrets: std::sync::OnceLock<SecretsSource>,
    subjects: dashmap::DashMap<String, Arc<SubjectConn>>,
    /// One per-caller connect at a time per server (also single-flights identical connects).
    subject_connect: tokio::sync::Mutex<()>,
    /// For per-caller servers: the listing the catalog shows (from the latest subject connection).
    latest_listing: Mutex<Option<Listing>>,
    /// Watchers of per-caller connections, waited for on shutdown.
    watchers: tokio_util::task::TaskTracker,
    /// Connections replaced by a refreshed credential, closing once their calls finish.
    retired: Mutex<Vec<CancellationToken>>,
    /// Poked when a call saw the transport fail, so the supervisor checks at once.
    suspect: Notify,
    /// Connections made after the first; a metric and a test hook.
    pub reconnects: AtomicU64,
    /// Connection attempts that failed (a server that never connects, or crash-loops before
    /// `initialize`, shows here, not in `reconnects`).
    failed_attempts: AtomicU64,
    /// Set once the first connect attempt ended (either way): start-up waiting stops here.
    attempted: std::sync::atomic::AtomicBool,
    /// Why the last connect failed or the connection ended, for "unavailable" answers; and when.
    last_error: Mutex<Option<String>>,
    last_error_at: Mutex<Option<std::time::SystemTime>>,
    /// When the supervisor tries again, while it waits (backing off).
    next_retry: Mutex<Option<Instant>>,
    /// Set when connecting failed in a way retrying cannot fix (a missing executable): the
    /// supervisor stops, and a reload builds a fresh upstream instead of keeping this one.
    failed: std::sync::atomic::AtomicBool,
    http: reqwest::Client,
}

/// A private CA trusted besides the system's roots, and a client certificate (mutual TLS).
fn with_tls(
    mut http: reqwest::ClientBuilder,
    tls: &crate::config::UpstreamTls,
) -> Result<reqwest::ClientBuilder, UpstreamError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| UpstreamError::Tls(format!("{}: {e}", p.display())))
    };
    if let Some(ca) = &tls.ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?)
            .map_err(|e| UpstreamError::Tls(format!("{}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(UpstreamError::Tls(format!(
                "{}: no certificate in it",
                ca.display()
            )));
        }
        for c in certs {
            http = http.add_root_certificate(c);
        }
    }
    if let Some((cert, key)) = &tls.client_identity {
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            UpstreamError::Tls(format!("{} / {}: {e}", cert.display(), key.display()))
        })?;
        http = http.identity(id);
    }
    Ok(http)
}

impl Upstream {
    pub fn new(config: ServerConfig, per_caller: bool) -> Result<Arc<Self>, UpstreamError> {
        let mut http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            // Requests carry the server's headers and credentials: no redirect off its origin.
            .redirect(redirect::policy(config.transport.follow_redirects()));
        if let Some(tls) = config.transport.tls() {
            http = with_tls(http, tls)?;
        }
        let http = http.build().map_err(UpstreamError::HttpClient)?;
        Ok(Arc::new(Self {
            name: Arc::from(config.name.as_str()),
            config,
            per_caller,
            state: RwLock::new(None),
            legacy: RwLock::new(None),
            secrets: std::sync::OnceLock::new(),
            subjects: dashmap::DashMap::new(),
            subject_connect: tokio::sync::Mutex::new(()),
            latest_listing: Mutex::new(None),
            watchers: tokio_util::task::TaskTracker::new(),
            retired: Mutex::new(Vec::new()),
            suspect: Notify::new(),
            reconnects: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            attempted: std::sync::atomic::AtomicBool::new(false),
            last_error: Mutex::new(None),
            last_error_at: Mutex::new(None),
            next_retry: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            http,
        }))
    }

    /// The live connection, if the server is up.
    pub fn connection(&self) -> Option<Arc<Connection>> {
        self.state.read().ok().and_then(|s| s.clone())
    }

    /// The shared connection for a client of the 2025 era (`legacy`) or the 2026 one: the server's
    /// 2025-11-25 connection where it keeps one, else the shared one.
    pub fn connection_in(&self, legacy: bool) -> Option<Arc<Connection>> {
        if legacy && let Some(c) = self.legacy.read().ok().and_then(|s| s.clone()) {
            return Some(c);
        }
        self.connection()
    }

    /// What 2025-era clients are shown: the 2025-11-25 connection's listing where there is one.
    pub fn listing_in(&self, legacy: bool) -> Option<Listing> {
        if legacy && let Some(c) = self.legacy.read().ok().and_then(|s| s.clone()) {
            return c.listing.lock().ok().map(|l| l.clone());
        }
        self.listing()
    }

    /// Does this server keep a separate 2025-11-25 connection now?
    pub fn has_legacy(&self) -> bool {
        self.legacy.read().is_ok_and(|s| s.is_some())
    }

    pub fn is_up(&self) -> bool {
        self.connection().is_some() || !self.subjects.is_empty()
    }

    /// Open connections: the shared one (0 or 1) plus per-caller ones. For stdio, live children.
    pub fn open_connections(&self) -> usize {
        usize::from(self.connection().is_some()) + self.subjects.len()
    }

    /// Set where the shared connection's secrets come from (before `supervise`).
    pub fn set_secrets(&self, source: SecretsSource) {
        let _ = self.secrets.set(source);
    }

    /// What the catalog shows for this server: the shared connection's listing, or for a per-caller
    /// server the latest one a caller's connection fetched. While a server reconnects, its last-known
    /// listing stays (calls to it then answer "unavailable", not "unknown tool").
    pub fn listing(&self) -> Option<Listing> {
        if let Some(c) = self.connection() {
            return c.listing.lock().ok().map(|l| l.clone());
        }
        self.latest_listing.lock().ok().and_then(|l| l.clone())
    }

    /// Start from a listing known before this upstream existed (the server it replaces on a reload),
    /// so its entries stay listed, answering "unavailable", until it has listed itself.
    pub fn seed_listing(&self, listing: Option<Listing>) {
        if let Ok(mut l) = self.latest_listing.lock()
            && l.is_none()
        {
            *l = listing;
        }
    }

    /// What is left of this server's caching hint for its `kind` list, in milliseconds.
    pub fn list_ttl_ms(&self, kind: Kind) -> u64 {
        if let Some(c) = self.connection() {
            return c.listing.lock().map_or(0, |l| l.ttl_ms(kind));
        }
        self.latest_listing
            .lock()
            .ok()
            .and_then(|l| l.as_ref().map(|l| l.ttl_ms(kind)))
            .unwrap_or(0)
    }

    /// Has the first connect attempt ended (connected or failed)? Per-caller servers have none.
    pub fn attempted(&self) -> bool {
        self.per_caller || self.attempted.load(Ordering::Acquire)
    }

    /// Has connecting failed for good (see [`UpstreamError::is_permanent`])?
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why the server is not connected, if known.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set_error(&self, e: impl Into<String>) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e.into());
        }
        if let Ok(mut t) = self.last_error_at.lock() {
            *t = Some(std::time::SystemTime::now());
        }
    }

    /// The owner of a per-caller or per-session connection (`None`: the shared one, or gone).
    pub fn owner_of(&self, id: u64) -> Option<Arc<str>> {
        self.subjects
            .iter()
            .find(|e| e.value().conn.id == id)
            .map(|e| e.value().owner.clone())
    }

    /// The open per-owner connections of `owner`.
    pub fn connections_of(&self, owner: &str) -> Vec<Arc<Connection>> {
        self.subjects
            .iter()
            .filter(|e| e.value().owner.as_ref() == owner)
            .map(|e| e.value().conn.clone())
            .collect()
    }

    /// Ids of every open connection (shared and per owner).
    pub fn connection_ids(&self) -> Vec<u64> {
        self.connection()
            .map(|c| c.id)
            .into_iter()
            .chain(
                self.legacy
                    .read()
                    .ok()
                    .and_then(|s| s.as_ref().map(|c| c.id)),
            )
            .chain(self.subjects.iter().map(|e| e.value().conn.id))
            .collect()
    }

    /// Close every connection of `owner` (a session that ended): stdio children are stopped.
    pub fn close_owner(&self, owner: &str) {
        let keys: Vec<String> = self
            .subjects
            .iter()
            .filter(|e| e.value().owner.as_ref() == owner)
            .map(|e| e.key().clone())
            .collect();
        for k in keys {
            if let Some((_, s)) = self.subjects.remove(&k) {
                s.stop.cancel();
            }
        }
    }

    /// Has any caller's connection listed this per-caller server yet?
    pub fn listed(&self) -> bool {
        self.latest_listing.lock().is_ok_and(|l| l.is_some())
    }

    fn by_id(&self, id: u64) -> Option<Arc<Connection>> {
        if let Some(c) = self.connection().filter(|c| c.id == id) {
            return Some(c);
        }
        if let Some(c) = self
            .legacy
            .read()
            .ok()
            .and_then(|s| s.clone())
            .filter(|c| c.id == id)
        {
            return Some(c);
        }
        self.subjects
            .iter()
            .find(|e| e.value().conn.id == id)
            .map(|e| e.value().conn.clone())
    }

    /// The connection for one caller: `key` identifies (caller, credential slot), `version` the
    /// secrets presented when it is opened. Opened on first use; replaced when the slot's secrets
    /// change (the old one closes once its calls finish); closed after `subject_idle_timeout` idle,
    /// or when more than `max_subjects` are open (least recently used first).
    pub async fn connection_for(
        &self,
        owner: &str,
        key: &str,
        version: &str,
        secrets: &Secrets,
        events: &EventSender,
    ) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(s) = self.current(key, version) {
            return Ok(s);
        }
        let _one = self.subject_connect.lock().await;
        if let Some(s) = self.current(key, version) {
            return Ok(s);
        }
        if let Some((_, old)) = self.subjects.remove(key) {
            self.retire(old);
        }
        while self.subjects.len() >= self.config.max_subjects {
            let oldest = self
                .subjects
                .iter()
                .min_by_key(|e| {
                    e.value()
                        .last_used
                        .lock()
                        .map(|t| *t)
                        .unwrap_or_else(|_| Instant::now())
                })
                .map(|e| e.key().clone());
            match oldest.and_then(|k| self.subjects.remove(&k)) {
                Some((_, old)) => old.stop.cancel(),
                None => break,
            }
        }
        let (running, conn) = self.open(secrets, events, self.config.protocol).await?;
        if let Ok(mut l) = self.latest_listing.lock() {
            *l = conn.listing.lock().ok().map(|l| l.clone());
        }
        let id = conn.id;
        let stop = CancellationToken::new();
        self.subjects.insert(
            key.to_string(),
            Arc::new(SubjectConn {
                conn: conn.clone(),
                owner: Arc::from(owner),
                version: version.to_string(),
                stop: stop.clone(),
                last_used: Mutex::new(Instant::now()),
            }),
        );
        let server = self.name.clone();
        let ct = running.cancellation_token();
        self.watchers.spawn(async move {
            let mut done = std::pin::pin!(running.waiting());
            tokio::select! {
                _ = &mut done => {}
                _ = stop.cancelled() => {
                    ct.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(8), &mut done).await;
                }
            }
            tracing::info!(server = %server, connection = id, "per-caller upstream connection closed");
        });
        let _ = events.send(UpstreamEvent::StateChanged {
            server: self.name.clone(),
        });
        Ok(conn)
    }

    /// The open connection for `key` if it was opened with these secrets (touching it).
    fn current(&self, key: &str, version: &str) -> Option<Arc<Connection>> {
        let s = self.subjects.get(key)?;
        if s.version != version {
            return None;
        }
        if let Ok(mut t) = s.last_used.lock() {
            *t = Instant::now();
        }
        Some(s.conn.clone())
    }

    /// Close a superseded connection once no call is using it (at most `timeout` from now).
    fn retire(&self, old: Arc<SubjectConn>) {
        if let Ok(mut r) = self.retired.lock() {
            r.retain(|t| !t.is_cancelled());
            r.push(old.stop.clone());
        }
        let limit = self.config.timeout;
        tokio::spawn(async move {
            let since = Instant::now();
            while old.conn.active.load(Ordering::Relaxed) > 0 && since.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            old.stop.cancel();
        });
    }

    /// Close per-caller connections idle longer than `subject_idle_timeout`.
    fn reap_idle(&self) {
        let idle = self.config.subject_idle_timeout;
        let stale: Vec<String> = self
            .subjects
            .iter()
            .filter(|e| e.value().last_used.lock().is_ok_and(|t| t.elapsed() > idle))
            .map(|e| e.key().clone())
            .collect();
        for k in stale {
            if let Some((_, s)) = self.subjects.remove(&k) {
                s.stop.cancel();
            }
        }
    }

    /// Forget a per-caller connection that failed (the next use opens a fresh one).
    pub fn drop_connection(&self, id: u64) {
        let key = self
            .subjects
            .iter()
            .find(|e| e.value().conn.id == id)
            .map(|e| e.key().clone());
        if let Some((_, s)) = key.and_then(|k| self.subjects.remove(&k)) {
            s.stop.cancel();
        }
    }

    async fn close_subjects(&self) {
        for e in self.subjects.iter() {
            e.value().stop.cancel();
        }
        if let Ok(r) = self.retired.lock() {
            r.iter().for_each(CancellationToken::cancel);
        }
        self.subjects.clear();
        self.watchers.close();
        self.watchers.wait().await;
    }

    /// A call saw the transport fail: have the supervisor check the connection now.
    pub fn report_failure(&self) {
        self.suspect.notify_one();
    }

    fn set(&self, conn: Option<Arc<Connection>>) {
        if let Ok(mut s) = self.state.write() {
            *s = conn;
        }
    }

    /// Connect, serve and reconnect until `shutdown`. On return no child process of this server remains.
    pub async fn supervise(self: Arc<Self>, events: EventSender, shutdown: CancellationToken) {
        if self.per_caller {
            // No shared connection: reap idle per-caller ones until shutdown, then close them all.
            let tick = (self.config.subject_idle_timeout / 2)
                .clamp(Duration::from_millis(200), Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => self.reap_idle(),
                    _ = shutdown.cancelled() => break,
                }
            }
            self.close_subjects().await;
            return;
        }
        let mut backoff = BACKOFF_START;
        let mut connected_before = false;
        loop {
            let secrets = match self.secrets.get() {
                Some(source) => source().await,
                None => Ok(Secrets::default()),
            };
            let mut secrets_used = Secrets::default();
            let attempt = match secrets {
                Err(e) => Err(UpstreamError::Credential(e)),
                Ok(secrets) => {
                    let r = tokio::select! {
                        r = self.open(&secrets, &events, self.config.protocol) => r,
                        _ = shutdown.cancelled() => return,
                    };
                    secrets_used = secrets;
                    r
                }
            };
            // (Set once the connection is published: a caller waiting for start-up must then find it.)
            if attempt.is_err() {
                self.attempted.store(true, Ordering::Release);
            }
            match attempt {
                Ok((running, conn)) => {
                    if let Ok(mut l) = self.latest_listing.lock() {
                        *l = conn.listing.lock().ok().map(|l| l.clone());
                    }
                    if connected_before {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    let peer = conn.peer.clone();
                    let dual = conn.modern
                        && self.config.protocol == Protocol::Auto
                        && matches!(self.config.transport, TransportConfig::Http { .. });
                    let companion = shutdown.child_token();
                    if dual {
                        // Published together: 2025-era clients are not translated for meanwhile.
                        let (ready, first) = oneshot::channel();
                        tokio::spawn(self.clone().companion(
                            secrets_used.clone(),
                            events.clone(),
                            companion.clone(),
                            ready,
                        ));
                        let _ = tokio::time::timeout(self.config.connect_timeout, first).await;
                    }
                    self.set(Some(conn));
                    self.attempted.store(true, Ordering::Release);
                    let _ = events.send(UpstreamEvent::StateChanged {
                        server: self.name.clone(),
                    });
                    let since = Instant::now();
                    let stop = self.watch(running, &peer, &shutdown).await;
                    companion.cancel();
                    self.set(None);
                    let _ = events.send(UpstreamEvent::StateChanged {
                        server: self.name.clone(),
                    });
                    if stop {
                        return;
                    }
                    self.set_error("the connection ended");
                    tracing::warn!(server = %self.name, "upstream disconnected; reconnecting");
                    if since.elapsed() > STABLE_AFTER {
                        backoff = BACKOFF_START;
                    }
                }
                Err(e) if e.is_permanent() => {
                    self.set_error(e.to_string());
                    self.failed.store(true, Ordering::Release);
                    tracing::error!(server = %self.name, error = %e, "upstream failed; not retried (fix the command, then reload the config or restart)");
                    let _ = events.send(UpstreamEvent::StateChanged {
                        server: self.name.clone(),
                    });
                    shutdown.cancelled().await;
                    return;
                }
                Err(e) => {
                    self.set_error(e.to_string());
                    self.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(server = %self.name, error = %e, retry_in = ?backoff, "upstream unavailable");
                }
            }
            self.set_next_retry(Some(Instant::now() + backoff));
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            self.set_next_retry(None);
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    /// Serve until the connection ends (false) or shutdown (true); either way it is closed on return.
    async fn watch(
        &self,
        running: RunningService<RoleClient, UpstreamHandler>,
        peer: &Peer<RoleClient>,
        shutdown: &CancellationToken,
    ) -> bool {
        let ct = running.cancellation_token();
        let mut done = std::pin::pin!(running.waiting());
        let unhealthy = async {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                    _ = self.suspect.notified() => {}
                }
                // 2026-07-28 has no `ping`: a (never cached) `server/discover` is the probe there.
                let probe = if is_modern(peer.peer_info().as_deref()) {
                    raw::custom_request("server/discover", &serde_json::json!({}))
                } else {
                    rmcp::model::ClientRequest::PingRequest(Default::default())
                };
                let ping = tokio::time::timeout(HEALTH_TIMEOUT, peer.send_request(probe)).await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(server = %self.name, error = %e, "upstream failed a health ping");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(server = %self.name, "upstream did not answer a health ping");
                        return;
                    }
                }
            }
        };
        let stop = tokio::select! {
            _ = &mut done => return false,
            _ = unhealthy => false,
            _ = shutdown.cancelled() => true,
        };
        ct.cancel();
        // Closing a stdio transport closes stdin, waits, then SIGTERMs and kills the process group.
        if tokio::time::timeout(Duration::from_secs(8), &mut done)
            .await
            .is_err()
        {
            tracing::warn!(server = %self.name, "upstream did not close in time");
        }
        stop
    }

    /// Connect, `initialize` (within `connect_timeout`) and list everything: a ready connection.
    async fn open(
        &self,
        secrets: &Secrets,
        events: &EventSender,
        protocol: Protocol,
    ) -> Result<(RunningService<RoleClient, UpstreamHandler>, Arc<Connection>), UpstreamError> {
        let id = NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed);
        let handler = UpstreamHandler {
            server: self.name.clone(),
            conn: id,
            events: events.clone(),
        };
        let router = Arc::new(ProgressRouter::default());
        let client_info = handler.get_info().client_info;
        let (running, lane) = tokio::time::timeout(
            self.config.connect_timeout,
            self.connect(handler, router.clone(), secrets, protocol),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout(self.config.connect_timeout)))?;
        let peer = running.peer().clone();
        let info = peer.peer_info();
        let listing = fetch_listing(&self.name, &peer, info.as_deref()).await;
        tracing::info!(
            server = %self.name,
            connection = id,
            transport = self.config.transport.kind(),
            protocol = %info.as_ref().map_or("?", |i| i.protocol_version.as_str()),
            tools = listing.tools.len(),
            prompts = listing.prompts.len(),
            resources = listing.resources.len(),
            "upstream connected"
        );
        let modern = is_modern(info.as_deref());
        if modern {
            // 2026-07-28 announces list changes only on a `subscriptions/listen` stream.
            tokio::spawn(listen_changes(
                self.name.clone(),
                id,
                peer.clone(),
                events.clone(),
            ));
        }
        let lane = lane.filter(|_| lane::enabled()).map(|kind| {
            let meta = info
                .as_deref()
                .filter(|_| modern)
                .map(|i| lane::ModernMeta {
                    version: i.protocol_version.clone(),
                    client: client_info,
                });
            lane::Lane::new(kind, router.clone(), meta)
        });
        let conn = Arc::new(Connection {
            id,
            peer,
            info,
            listing: Mutex::new(listing),
            progress: router,
            active: Default::default(),
            modern,
            lane,
        });
        Ok((running, conn))
    }

    async fn connect(
        &self,
        handler: UpstreamHandler,
        router: Arc<ProgressRouter>,
        secrets: &Secrets,
        protocol: Protocol,
    ) -> Result<
        (
            RunningService<RoleClient, UpstreamHandler>,
            Option<lane::LaneKind>,
        ),
        UpstreamError,
    > {
        use progress::ProgressTap;
        let init =
            |e: rmcp::service::ClientInitializeError| UpstreamError::Initialize(e.to_string());
        match &self.config.transport {
            TransportConfig::Stdio {
                command,
                args,
                env,
                cwd,
                inherit_env,
                ..
            } => {
                let cmd = tokio::process::Command::new(command).configure(|c| {
                    c.args(args).current_dir(cwd).env_clear().kill_on_drop(true);
                    // Only allow-listed variables reach the child: the broker's secrets stay here.
                    for k in inherit_env {
                        if let Some(v) = std::env::var_os(k) {
                            c.env(k, v);
                        }
                    }
                    for (k, v) in env.iter().chain(&secrets.env) {
                        c.env(k, v.expose());
                    }
                });
                let mut wrap = process_wrap::tokio::CommandWrap::from(cmd);
                // Own process group, so stopping it reaches grandchildren (npx → sh → node).
                wrap.wrap(process_wrap::tokio::ProcessGroup::leader());
                wrap.wrap(process_wrap::tokio::KillOnDrop);
                let (transport, stderr, exit) =
                    stdio::StdioTransport::spawn(self.name.clone(), wrap, router.clone()).map_err(
                        |source| UpstreamError::Spawn {
                            command: command.clone(),
                            source,
                        },
                    )?;
                let lane = lane::LaneKind::Stdio(transport.lane());
                let tail = Arc::new(Mutex::new(stdio::StderrTail::default()));
                let forwarder = stderr.map(|stderr| {
                    let (server, tail) = (self.name.clone(), tail.clone());
                    // The child's stderr goes to the log; its last lines are also kept to explain
                    // an early exit.
                    tokio::spawn(async move {
                        let mut lines = tokio::io::BufReader::new(stderr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::info!(target: "mcp_broker::upstream::stderr", server = %server, "{line}");
                            if let Ok(mut t) = tail.lock() {
                                t.push(&line);
                            }
                        }
                    })
                });
                match handler
                    .serve_with_lifecycle(ProgressTap::new(transport, router), lifecycle(protocol))
                    .await
                {
                    Ok(r) => Ok((r, Some(lane))),
                    Err(e) => Err(early_exit(&exit, forwarder, &tail)
                        .await
                        .unwrap_or_else(|| init(e))),
                }
            }
            TransportConfig::Http { url, headers, .. } => {
                let mut custom = std::collections::HashMap::new();
                for (k, v) in headers.iter().chain(&secrets.headers) {
                    if let (Ok(k), Ok(v)) = (
                        http::HeaderName::from_bytes(k.as_bytes()),
                        http::HeaderValue::from_str(v.expose()),
                    ) {
                        custom.insert(k, v);
                    }
                }
                let cfg = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                    .custom_headers(custom);
                let discover_status = Arc::new(std::sync::atomic::AtomicU16::new(0));
                // Each transport with its lane: the lane POSTs as that transport's worker did and
                // injects into that transport's receive side.
                let transport = || {
                    let client = http_client::RawHttpClient {
                        inner: self.http.clone(),
                        discover_status: discover_status.clone(),
                        lane: Default::default(),
                    };
                    // Bounded: a lane call whose stream carries more than rmcp has taken waits
                    // for it (as rmcp's own worker would); freed with the connection.
                    let (inject, injected) = mpsc::channel(256);
                    let lane =
                        lane::LaneKind::Http(lane::http::HttpLane::new(client.clone(), inject));
                    let t = StreamableHttpClientTransport::with_client(client, cfg.clone());
                    (
                        ProgressTap::new(t, router.clone()).with_injection(injected),
                        lane,
                    )
                };
                if protocol == Protocol::Auto {
                    // rmcp's own fallback needs a correlated JSON-RPC error, but a 2025-era HTTP
                    // server answers an unknown first request without a session with HTTP 400 and
                    // `id: null`. So: discover on one transport; anything but a 2026-07-28 answer
                    // gets `initialize` on a fresh one.
                    let (t, lane) = transport();
                    match handler.clone().serve_with_lifecycle(t, discover()).await {
                        Ok(running) => return Ok((running, Some(lane))),
                        // The credential was refused: `initialize` would be refused the same way.
                        Err(e) if matches!(discover_status.load(Ordering::Relaxed), 401 | 403) => {
                            return Err(init(e));
                        }
                        Err(e) => {
                            tracing::debug!(server = %self.name, error = %e, "server/discover refused; using initialize");
                        }
                    }
                    let (t, lane) = transport();
                    return handler
                        .serve(t)
                        .await
                        .map(|r| (r, Some(lane)))
                        .map_err(init);
                }
                let (t, lane) = transport();
                handler
                    .serve_with_lifecycle(t, lifecycle(protocol))
                    .await
                    .map(|r| (r, Some(lane)))
                    .map_err(init)
            }
            TransportConfig::Sse { url, headers, .. } => {
                let mut map = reqwest::header::HeaderMap::new();
                for (k, v) in headers.iter().chain(&secrets.headers) {
                    if let (Ok(k), Ok(mut v)) = (
                        reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                        reqwest::header::HeaderValue::from_str(v.expose()),
                    ) {
                        v.set_sensitive(true);
                        map.insert(k, v);
                    }
                }
                let transport =
                    sse::SseTransport::connect(self.name.clone(), self.http.clone(), url, map)
                        .await?;
                // Legacy SSE keeps rmcp's path: no lane.
                handler
                    .serve(ProgressTap::new(transport, router))
                    .await
                    .map(|r| (r, None))
                    .map_err(init)
            }
        }
    }

    /// Re-list one kind on connection `id` after the upstream said it changed. Returns whether
    /// anything was fetched.
    pub async fn refresh(&self, id: u64, kind: Kind) -> bool {
        let Some(conn) = self.by_id(id) else {
            return false;
        };
        let fresh = fetch_listing(&self.name, &conn.peer, conn.info.as_deref()).await;
        let Ok(mut l) = conn.listing.lock() else {
            return false;
        };
        let slots: &[Kind] = match kind.family() {
            Kind::Resource => &[Kind::Resource, Kind::Template],
            _ => &[kind],
        };
        for k in slots {
            l.fresh_until[k.slot()] = fresh.fresh_until[k.slot()];
        }
        match kind {
            Kind::Tool => l.tools = fresh.tools,
            Kind::Prompt => l.prompts = fresh.prompts,
            Kind::Resource | Kind::Template => {
                l.resources = fresh.resources;
                l.templates = fresh.templates;
            }
        }
        if let Ok(mut latest) = self.latest_listing.lock() {
            *latest = Some(l.clone());
        }
        true
    }
}

/// If the child of a failed `initialize` exited by itself: that, with its status and the last lines
/// of its stderr (waiting briefly for the status to be reaped and the stderr to be read to its end).
async fn early_exit(
    exit: &stdio::ExitSlot,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    tail: &Mutex<stdio::StderrTail>,
) -> Option<UpstreamError> {
    let deadline = Instant::now() + Duration::from_secs(1);
    let status = loop {
        if let Some(s) = exit.get() {
            break *s;
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(f) = forwarder {
        let _ = tokio::time::timeout(Duration::from_millis(500), f).await;
    }
    let stderr = tail.lock().map(|t| t.joined()).unwrap_or_default();
    Some(UpstreamError::Exited { status, stderr })
}

/// Everything the server lists, following pagination cursors. A kind the server does not declare,
/// or fails to list, counts as empty (logged): one broken list must not hide the others. Items are
/// kept as the upstream sent them ([`crate::catalog::Item`]).
async fn fetch_listing(
    server: &str,
    peer: &Peer<RoleClient>,
    info: Option<&ServerPeerInfo>,
) -> Listing {
    use crate::catalog::{PROMPT_KEY, RESOURCE_KEY, TEMPLATE_KEY, TOOL_KEY};
    let caps = info.map(|i| &i.capabilities);
    let has = |f: fn(&rmcp::model::ServerCapabilities) -> bool| caps.is_none_or(f);
    let mut l = Listing::default();
    let lists: [(&str, &str, &str, &mut Vec<Item>, bool); 4] = [
        (
            "tools/list",
            "tools",
            TOOL_KEY,
            &mut l.tools,
            has(|c| c.tools.is_some()),
        ),
        (
            "prompts/list",
            "prompts",
            PROMPT_KEY,
            &mut l.prompts,
            has(|c| c.prompts.is_some()),
        ),
        (
            "resources/list",
            "resources",
            RESOURCE_KEY,
            &mut l.resources,
            has(|c| c.resources.is_some()),
        ),
        (
            "resources/templates/list",
            "resourceTemplates",
            TEMPLATE_KEY,
            &mut l.templates,
            has(|c| c.resources.is_some()),
        ),
    ];
    let mut fresh = [None; 4];
    for (i, (method, field, key, out, declared)) in lists.into_iter().enumerate() {
        if !declared {
            continue;
        }
        let fetched = Instant::now();
        match list_raw(server, peer, method, field, key).await {
            Ok((items, ttl)) => {
                *out = items;
                fresh[i] = ttl.map(|ms| fetched + Duration::from_millis(ms));
            }
            Err(e) => tracing::warn!(server, error = %e, "{method} failed"),
        }
    }
    l.fresh_until = fresh;
    // SEP-2243: a 2026-07-28 call mirrors arguments annotated `x-mcp-header` in `Mcp-Param-*`
    // headers. rmcp's transport adds them from the tool schemas it saw in a typed `tools/list`
    // (the raw listing above is not one): list typed once more where a schema asks for them.
    if is_modern(info)
        && l.tools.iter().any(|t| wants_param_headers(t.object()))
        && let Err(e) = peer.list_all_tools().await
    {
        tracing::warn!(server, error = %e, "tools/list (for Mcp-Param headers) failed");
    }
    l
}

/// The most pages one list may take (a server that keeps returning new cursors stops here).
const MAX_PAGES: usize = 1000;

/// One list, all pages, each item exactly as sent; an item without its string `key` is skipped.
async fn list_raw(
    server: &str,
    peer: &Peer<RoleClient>,
    method: &str,
    field: &str,
    key: &str,
) -> Result<(Vec<Item>, Option<u64>), String> {
    let mut items = Vec::new();
    // The smallest caching hint of the pages; a page without one means none for the list.
    let mut ttl: Option<Option<u64>> = None;
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let params = cursor.as_ref().map(|c| serde_json::json!({ "cursor": c }));
        let request = rmcp::model::ClientRequest::CustomRequest(rmcp::model::CustomRequest::new(
            method, params,
        ));
        let result = peer
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let serde_json::Value::Object(mut page) = raw::into_value(result) else {
            return Err("the result is not an object".into());
        };
        let page_ttl = page.get("ttlMs").and_then(|t| t.as_u64());
        ttl = Some(match ttl {
            None => page_ttl,
            Some(t) => t.zip(page_ttl).map(|(a, b)| a.min(b)),
        });
        match page.remove(field) {
            Some(serde_json::Value::Array(list)) => {
                for v in list {
                    match v {
                        serde_json::Value::Object(o)
                            if o.get(key).is_some_and(|n| n.is_string()) =>
                        {
                            items.push(Item::new(o))
                        }
                        _ => tracing::warn!(
                            server,
                            "{method}: skipping an item without a string `{key}`"
                        ),
                    }
                }
            }
            None => {}
            Some(_) => return Err(format!("`{field}` is not an array")),
        }
        match page.get("nextCursor").and_then(|c| c.as_str()) {
            Some(c) if !c.is_empty() && cursor.as_deref() != Some(c) => {
                cursor = Some(c.to_string())
            }
            _ => return Ok((items, ttl.flatten())),
        }
    }
    tracing::warn!(
        server,
        "{method}: more than {MAX_PAGES} pages; keeping what was listed"
    );
    Ok((items, ttl.flatten()))
}

/// The broker's client-side handler for one upstream connection: forwards what the upstream says.
#[derive(Clone)]
pub struct UpstreamHandler {
    server: Arc<str>,
    conn: u64,
    events: EventSender,
}

impl UpstreamHandler {
    fn emit(&self, ev: UpstreamEvent) {
        let _ = self.events.send(ev);
    }

    async fn ask(
        &self,
        request: ServerRequest,
        ctx: &RequestContext<RoleClient>,
    ) -> Result<ClientResult, ErrorData> {
        let origin = match ctx.extensions.get::<InboundStreamOrigin>() {
            Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id.clone()),
            // Read on a lane call's stream (see `lane::http`).
            _ => ctx
                .extensions
                .get::<lane::LaneOrigin>()
                .map(|o| o.0.clone()),
        };
        let (reply, rx) = oneshot::channel();
        self.emit(UpstreamEvent::Request {
            server: self.server.clone(),
            conn: self.conn,
            request,
            origin,
            cancel: ctx.ct.clone(),
            reply,
        });
        tokio::select! {
            r = rx => r.unwrap_or_else(|_| Err(ErrorData::internal_error("the broker dropped the request", None))),
            _ = ctx.ct.cancelled() => Err(ErrorData::internal_error("cancelled by the upstream", None)),
        }
    }
}

fn unexpected() -> ErrorData {
    ErrorData::internal_error(
        "the downstream client answered with an unexpected result",
        None,
    )
}

impl ClientHandler for UpstreamHandler {
    fn get_info(&self) -> ClientConfig {
        // Declared so upstreams may ask; the broker declines per call when the downstream client
        // that caused the request did not declare the same capability.
        // Both elicitation modes: a server offers URL-mode flows only to clients that declare them,
        // and the broker forwards each mode only to callers that declared it.
        let elicitation = rmcp::model::ElicitationCapability::new()
            .with_form(Default::default())
            .with_url(Default::default());
        let caps = ClientCapabilities::builder()
            .enable_roots()
            .enable_sampling()
            .enable_elicitation_with(elicitation)
            .build();
        ClientConfig::new(
            caps,
            Implementation::new("mcp-broker", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        ctx: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, ErrorData> {
        let req = ServerRequest::CreateMessageRequest(CreateMessageRequest::new(params));
        match self.ask(req, &ctx).await? {
            ClientResult::CreateMessageResult(r) => Ok(*r),
            _ => Err(unexpected()),
        }
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        ctx: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        let req = ServerRequest::ElicitRequest(ElicitRequest::new(params));
        match self.ask(req, &ctx).await? {
            ClientResult::ElicitResult(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn list_roots(
        &self,
        ctx: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, ErrorData> {
        let req = ServerRequest::ListRootsRequest(ListRootsRequest::default());
        match self.ask(req, &ctx).await? {
            ClientResult::ListRootsResult(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    #[allow(deprecated)]
    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.emit(UpstreamEvent::Log {
            server: self.server.clone(),
            conn: self.conn,
            params,
        });
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        self.emit(UpstreamEvent::ResourceUpdated {
            server: self.server.clone(),
            conn: self.conn,
            params,
        });
    }

    async fn on_tool_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.emit(UpstreamEvent::ListChanged {
            server: self.server.clone(),
            conn: self.conn,
            kind: Kind::Tool,
        });
    }

    async fn on_prompt_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.emit(UpstreamEvent::ListChanged {
            server: self.server.clone(),
            conn: self.conn,
            kind: Kind::Prompt,
        });
    }

    async fn on_resource_list_changed(&self, _: NotificationContext<RoleClient>) {
        self.emit(UpstreamEvent::ListChanged {
            server: self.server.clone(),
            conn: self.conn,
            kind: Kind::Resource,
        });
    }
}
