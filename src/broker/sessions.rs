//! Downstream sessions: who owns each, what it may see, and a bounded outbound queue per session.
//!
//! The event router never awaits a session: it puts a message in the session's queue (`try_send`)
//! and a writer task per session sends it. Queue and writer start with the session's first message:
//! most sessions never get one, and idle sessions are what a broker holds most of. A session whose client stops reading fills only its own
//! queue; further notifications for it are dropped and counted. A session is removed when it closes
//! (its front handle is dropped) or its transport is found closed.

// Logging is deprecated by SEP-2577 in 2026-07-28, but 2025-11-25 clients use it.
#![allow(deprecated)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rmcp::{
    RoleServer,
    model::{
        LoggingLevel, LoggingMessageNotificationParam, ResourceUpdatedNotificationParam,
        ServerJsonRpcMessage, ServerNotification,
    },
    service::Peer,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::catalog::Kind;
use crate::cluster::{Cluster, Wire};

/// Messages a session's queue holds before new ones are dropped…
const QUEUE: usize = 1024;
/// …and their encoded size at most (a few large log lines must not hold megabytes per session).
const QUEUE_BYTES: usize = 1 << 20;
/// Resources one session may be subscribed to at once.
pub(super) const MAX_SUBSCRIPTIONS: usize = 1024;
/// Requests of one session waiting for an upstream at once.
pub(super) const MAX_INFLIGHT: usize = 256;
/// Server-to-client requests (sampling, elicitation, roots) waiting for one session's client.
pub(super) const MAX_PENDING_REQUESTS: usize = 16;
/// At most one list_changed per kind per this interval per session.
const LIST_CHANGED_EVERY: Duration = Duration::from_millis(100);

/// A notification waiting for a session's writer.
pub(super) enum Outbound {
    /// With its encoded size, counted against the queue's byte bound.
    Log(LoggingMessageNotificationParam, usize),
    Updated(ResourceUpdatedNotificationParam, usize),
    ListChanged(Kind),
    /// Decided on another instance, for the standalone stream this one holds: sent as is.
    Relayed(ServerNotification, usize),
}

impl Outbound {
    fn bytes(&self) -> usize {
        match self {
            Outbound::Log(_, n) | Outbound::Updated(_, n) | Outbound::Relayed(_, n) => *n,
            Outbound::ListChanged(_) => 0,
        }
    }
}

/// What a session's caller is shown, recomputed when the catalog or the policy changes.
#[derive(Default, Clone)]
pub(super) struct View {
    /// Fingerprint of what the caller is shown, per list kind.
    pub lists: [u64; 3],
    /// Servers with at least one entry the caller may see: their logs may reach it.
    pub servers: HashSet<Arc<str>>,
}

pub(super) struct Session {
    pub id: u64,
    pub caller: Caller,
    pub peer: Peer<RoleServer>,
    /// The HTTP front's session id (`Mcp-Session-Id`); none on the stdio front.
    pub front: Option<Arc<str>>,
    /// Under `[cluster]`: the client's standalone stream may be open on another instance, and
    /// what this session is sent goes there (see [`write`]).
    pub cluster: Option<Arc<Cluster>>,
    /// Set, and the writer started, by the first message ([`Session::queue`]).
    queue: OnceLock<mpsc::Sender<Outbound>>,
    /// The level set by this session's `logging/setLevel`; `None` = no logs forwarded.
    level: Mutex<Option<LoggingLevel>>,
    pub view: Mutex<View>,
    /// A list_changed of that kind is queued and not yet sent (coalescing).
    pending: [AtomicBool; 3],
    /// Cancelled when the session is removed: stops its writer.
    closed: CancellationToken,
    /// Encoded bytes waiting in `queue` (at most [`QUEUE_BYTES`]).
    queued_bytes: AtomicUsize,
    /// Resources it is subscribed to (at most [`MAX_SUBSCRIPTIONS`]).
    pub subscriptions: AtomicUsize,
    /// Its requests waiting for an upstream (at most [`MAX_INFLIGHT`]).
    pub inflight: AtomicUsize,
    /// Upstream requests waiting for its client (at most [`MAX_PENDING_REQUESTS`]).
    pub pending_requests: AtomicUsize,
}

/// One unit of a per-session bound, given back when dropped.
pub(super) struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    /// Take a unit of `counter` if fewer than `max` are taken.
    pub fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Session {
    /// The owner key of connections opened for this session (`isolation = "session"`).
    pub fn owner_key(id: u64) -> String {
        format!("session:{id}")
    }

    pub fn level(&self) -> Option<LoggingLevel> {
        self.level.lock().ok().and_then(|l| *l)
    }

    pub fn set_level(&self, level: LoggingLevel) {
        if let Ok(mut l) = self.level.lock() {
            *l = Some(level);
        }
    }

    /// Does a log message at `level` pass this session's own filter?
    pub fn wants_log(&self, level: LoggingLevel) -> bool {
        self.level().is_some_and(|min| rank(level) >= rank(min))
    }

    pub fn sees_server(&self, server: &str) -> bool {
        self.view.lock().is_ok_and(|v| v.servers.contains(server))
    }

    /// The outbound queue, created with its writer on first use. `None` outside a tokio runtime
    /// (nothing could write it there).
    fn queue(self: &Arc<Self>) -> Option<&mpsc::Sender<Outbound>> {
        if let Some(q) = self.queue.get() {
            return Some(q);
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            runtime.spawn(write(self.clone(), rx));
            tx
        }))
    }

    /// Queue a message without waiting; false if the queue is full, by count or by bytes (the
    /// message is dropped).
    fn offer(self: &Arc<Self>, m: Outbound) -> bool {
        let n = m.bytes();
        let held = self.queued_bytes.fetch_add(n, Ordering::AcqRel);
        let queued = held + n <= QUEUE_BYTES || n == 0;
        if !queued || self.queue().is_none_or(|q| q.try_send(m).is_err()) {
            self.queued_bytes.fetch_sub(n, Ordering::AcqRel);
            return false;
        }
        true
    }
}

/// The notification an outbound message is.
fn notification_of(m: Outbound) -> ServerNotification {
    use rmcp::model::{
        LoggingMessageNotification, PromptListChangedNotification, ResourceListChangedNotification,
        ResourceUpdatedNotification, ToolListChangedNotification,
    };
    match m {
        Outbound::Log(p, _) => {
            ServerNotification::LoggingMessageNotification(LoggingMessageNotification::new(p))
        }
        Outbound::Updated(p, _) => {
            ServerNotification::ResourceUpdatedNotification(ResourceUpdatedNotification::new(p))
        }
        Outbound::ListChanged(Kind::Tool) => {
            ServerNotification::ToolListChangedNotification(ToolListChangedNotification::default())
        }
        Outbound::ListChanged(Kind::Prompt) => ServerNotification::PromptListChangedNotification(
            PromptListChangedNotification::default(),
        ),
        Outbound::ListChanged(Kind::Resource | Kind::Template) => {
            ServerNotification::ResourceListChangedNotification(
                ResourceListChangedNotification::default(),
            )
        }
        Outbound::Relayed(n, _) => n,
    }
}

/// Severity order of MCP log levels (RFC 5424 names, debug lowest).
pub(super) fn rank(l: LoggingLevel) -> u8 {
    match l {
        LoggingLevel::Debug => 0,
        LoggingLevel::Info => 1,
        LoggingLevel::Notice => 2,
        LoggingLevel::Warning => 3,
        LoggingLevel::Error => 4,
        LoggingLevel::Critical => 5,
        LoggingLevel::Alert => 6,
        LoggingLevel::Emergency => 7,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "mcp-broker session limit reached: {0} sessions are open (broker.max_sessions); close one or retry later"
    )]
    Total(usize),
    #[error(
        "mcp-broker session limit reached: `{sub}` already has {max} sessions open (broker.max_sessions_per_subject); close one or retry later"
    )]
    Subject { sub: String, max: usize },
}

/// Every open downstream session.
#[derive(Default)]
pub(super) struct Sessions {
    map: DashMap<u64, Arc<Session>>,
    /// The HTTP front's session id → ours.
    by_front: DashMap<Arc<str>, u64>,
    /// Open sessions per subject; the lock also makes check-then-insert atomic for the caps.
    per_subject: Mutex<std::collections::HashMap<String, usize>>,
    next: AtomicU64,
    /// Notifications dropped because a session's queue was full.
    pub dropped: AtomicU64,
}

impl Sessions {
    /// Register a session, within the caps (its writer starts with its first message).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &self,
        peer: Peer<RoleServer>,
        caller: Caller,
        front: Option<Arc<str>>,
        cluster: Option<Arc<Cluster>>,
        view: View,
        max_total: usize,
        max_per_subject: usize,
    ) -> Result<Arc<Session>, SessionError> {
        let mut per = self.per_subject.lock().unwrap_or_else(|p| p.into_inner());
        if self.map.len() >= max_total {
            return Err(SessionError::Total(max_total));
        }
        let count = per.entry(caller.sub.clone()).or_default();
        if *count >= max_per_subject {
            return Err(SessionError::Subject {
                sub: caller.sub.clone(),
                max: max_per_subject,
            });
        }
        *count += 1;
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let s = Arc::new(Session {
            id,
            caller,
            peer,
            cluster: front.as_ref().and(cluster),
            front,
            queue: OnceLock::new(),
            level: Mutex::new(None),
            view: Mutex::new(view),
            pending: Default::default(),
            closed: CancellationToken::new(),
            queued_bytes: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            pending_requests: AtomicUsize::new(0),
        });
        self.map.insert(id, s.clone());
        if let Some(f) = &s.front {
            self.by_front.insert(f.clone(), id);
        }
        drop(per);
        Ok(s)
    }

    /// Forget a session and stop its writer. Returns it if it was registered.
    pub fn remove(&self, id: u64) -> Option<Arc<Session>> {
        let (_, s) = self.map.remove(&id)?;
        s.closed.cancel();
        if let Some(f) = &s.front {
            self.by_front.remove_if(f, |_, v| *v == id);
        }
        let mut per = self.per_subject.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per.get_mut(&s.caller.sub) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&s.caller.sub);
            }
        }
        Some(s)
    }

    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.map.get(&id).map(|s| s.clone())
    }

    /// The session the HTTP front knows as `front`.
    pub fn by_front(&self, front: &str) -> Option<Arc<Session>> {
        let id = *self.by_front.get(front)?;
        self.get(id)
    }

    /// A snapshot of every registered session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// Entries held (open or not yet found closed).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Sessions whose queue (and writer) has started.
    pub fn queues(&self) -> usize {
        self.map
            .iter()
            .filter(|e| e.value().queue.get().is_some())
            .count()
    }

    /// Ids of sessions whose transport is closed (for the sweeper).
    pub fn closed(&self) -> Vec<u64> {
        self.map
            .iter()
            .filter(|e| e.value().peer.is_transport_closed())
            .map(|e| *e.key())
            .collect()
    }

    /// Queue `m` for `s`; a full queue drops it and counts the drop.
    pub fn send(&self, s: &Arc<Session>, m: Outbound) {
        if !s.offer(m) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queue a list_changed of `kind` unless one is already waiting (coalesced).
    pub fn list_changed(&self, s: &Arc<Session>, kind: Kind) {
        let i = kind.index();
        if s.pending[i].swap(true, Ordering::AcqRel) {
            return;
        }
        if !s.offer(Outbound::ListChanged(kind)) {
            s.pending[i].store(false, Ordering::Release);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A session's writer: sends its queue in order; waits only on this session's client.
async fn write(s: Arc<Session>, mut rx: mpsc::Receiver<Outbound>) {
    let mut last_list: [Option<Instant>; 3] = [None; 3];
    loop {
        let m = tokio::select! {
            _ = s.closed.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => return },
        };
        s.queued_bytes.fetch_sub(m.bytes(), Ordering::AcqRel);
        let sent = async {
            // Under `[cluster]`, the client's standalone stream may be open on another instance:
            // what this instance decided to send goes there, as it is.
            let elsewhere = match (&s.cluster, &s.front) {
                (Some(c), Some(f)) if !c.holds_stream(f) && !matches!(m, Outbound::Relayed(..)) => {
                    Some((c, f))
                }
                _ => None,
            };
            if let Some((c, f)) = elsewhere {
                if let Outbound::ListChanged(kind) = &m {
                    let i = kind.index();
                    if let Some(t) = last_list[i] {
                        tokio::time::sleep_until((t + LIST_CHANGED_EVERY).into()).await;
                    }
                    s.pending[i].store(false, Ordering::Release);
                    last_list[i] = Some(Instant::now());
                }
                let message =
                    serde_json::to_value(ServerJsonRpcMessage::notification(notification_of(m)))
                        .unwrap_or_default();
                let wire = Wire::Deliver {
                    session: f.to_string(),
                    message,
                };
                if let Err(e) = c.to_stream(f, &wire).await {
                    tracing::debug!(error = %e, "cluster: a notification for a session's stream on another instance was lost");
                }
                return Ok(());
            }
            match m {
                Outbound::Relayed(n, _) => s.peer.send_notification(n).await,
                Outbound::Log(p, _) => s.peer.notify_logging_message(p).await,
                Outbound::Updated(p, _) => s.peer.notify_resource_updated(p).await,
                Outbound::ListChanged(kind) => {
                    let i = kind.index();
                    if let Some(t) = last_list[i] {
                        tokio::time::sleep_until((t + LIST_CHANGED_EVERY).into()).await;
                    }
                    // Changes that arrive from here on queue another notification.
                    s.pending[i].store(false, Ordering::Release);
                    last_list[i] = Some(Instant::now());
                    match kind {
                        Kind::Tool => s.peer.notify_tool_list_changed().await,
                        Kind::Prompt => s.peer.notify_prompt_list_changed().await,
                        Kind::Resource | Kind::Template => {
                            s.peer.notify_resource_list_changed().await
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = s.closed.cancelled() => return,
            r = sent => if r.is_err() && s.peer.is_transport_closed() { return },
        }
    }
}
