//! `[cluster]`: what several broker instances behind one load balancer share, in Redis.
//!
//! One multiplexed, self-reconnecting connection carries commands; a second one carries pub/sub
//! (RESP3 pushes, resubscribed by the client library after a reconnection). What lives here is
//! transport-free: keys and their lifetimes, the wire format of what instances tell each other,
//! and whether Redis answers. The front ([`crate::front`]) and the broker decide what to share.
//!
//! Keys (all under `mcpb:`):
//! - `s:{session}`: hash `owner`, `init` (the client's `initialize` params), `level`; expires after
//!   `session_idle_timeout` without a request on any instance.
//! - `gone:{session}`: a deleted session, so an instance that missed the broadcast does not bring it
//!   back; expires with the idle timeout.
//! - `i:{tag}`: an instance's heartbeat (its id), every second with a 10 s expiry. Missing when the
//!   heartbeat writes it means Redis lost its data (or this instance was cut off for 10 s): the
//!   instance then writes every session it holds again.
//!
//! - `rl:{scope}:{digest}`, `cc:{server}`: global rate-limit buckets and concurrency leases
//!   ([`limits`]).
//! - `cred:{digest}`: shared credentials, sealed ([`sealed`]; `crate::credentials`), only with
//!   `share_credentials = true`.
//!
//! Channels: `mcpb:ev` (every instance), `mcpb:i:{tag}` (one instance), `mcpb:s:{session}` (the
//! instance holding that session's standalone SSE stream, subscribed while it is open). What goes
//! on them is a [`Wire`] message, at most [`MAX_MESSAGE`] bytes.

pub mod limits;
pub mod sealed;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;

/// Every key and channel starts with this.
pub const PREFIX: &str = "mcpb:";
/// How often an instance writes its heartbeat (and notices Redis is back, or empty).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat's lifetime.
const HEARTBEAT_TTL_SECS: u64 = 10;
/// A command that takes longer than this counts as Redis being unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Messages from other instances waiting to be handled; past this they are dropped (and counted).
const INBOUND_QUEUE: usize = 4096;
/// A published message larger than this is not sent (events are small; a huge log line is not
/// worth a cluster-wide copy).
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis ({what}): {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("the cluster store (Redis) is unreachable")]
    Down,
    #[error("a message of {0} bytes is larger than the cluster passes between instances")]
    TooLarge(usize),
    #[error("no OS random source: {0}")]
    Random(#[from] getrandom::Error),
    #[error("{0}")]
    Sealed(String),
}

fn redis_err(what: &'static str) -> impl FnOnce(redis::RedisError) -> ClusterError {
    move |source| ClusterError::Redis { what, source }
}

/// A session this instance holds, as written to Redis (and written again after Redis lost it).
#[derive(Debug, Clone)]
pub struct Registered {
    pub owner: String,
    /// The client's `initialize` params, as JSON text.
    pub init: String,
}

/// What instances tell each other. `from` is the sender's tag: a broadcast reaches its sender too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Wire {
    /// `mcpb:ev`: an upstream's log message; `owner` is the connection's owner (`sub:X`,
    /// `front:SESSION`), none for a shared connection.
    Log {
        from: String,
        server: String,
        owner: Option<String>,
        params: Value,
    },
    /// `mcpb:ev`: a session was deleted (HTTP DELETE) on `from`.
    Closed { from: String, session: String },
    /// `mcpb:ev`: a session set its log level on `from`.
    Level {
        from: String,
        session: String,
        level: Value,
    },
    /// `mcpb:ev`: a client notification (`notifications/cancelled`) for a request that may run on
    /// any instance.
    Notify {
        from: String,
        session: String,
        message: Value,
    },
    /// `mcpb:ev`: a session unsubscribed from `server`'s `uri` (the upstream's own URI) on `from`;
    /// the subscription may have been made on any instance.
    Unsubscribed {
        from: String,
        session: String,
        server: String,
        uri: String,
    },
    /// `mcpb:i:{tag}`: the client's answer to a request the instance `tag` sent it.
    Answer { session: String, message: Value },
    /// `mcpb:s:{session}`: a notification for the session's standalone stream.
    Deliver { session: String, message: Value },
    /// `mcpb:i:{tag}`: an HTTP request to `/mcp` that `from` received and this instance must serve
    /// (it holds what the request continues); sealed, headers and all (see [`Forwarded`]).
    Forward {
        from: String,
        rid: u64,
        request: String,
    },
    /// `mcpb:i:{tag}`: `from` no longer wants the answer to its forwarded request `rid`.
    ForwardCancel { from: String, rid: u64 },
    /// `mcpb:i:{tag}`: part of the answer to forwarded request `rid`, in order.
    Reply { rid: u64, part: ReplyPart },
}

/// A forwarded HTTP request, sealed with the cluster key (it carries the caller's token).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    pub method: String,
    pub headers: Vec<(String, String)>,
    /// Base64url.
    pub body: String,
}

/// One part of a forwarded request's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "p", rename_all = "snake_case")]
pub enum ReplyPart {
    Head {
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// Base64url bytes of the body.
    Chunk {
        data: String,
    },
    End,
}

/// A message from another instance (or this one), with the channel it came on.
#[derive(Debug)]
pub struct Inbound {
    pub channel: String,
    pub wire: Wire,
}

/// The connection to Redis and this instance's place in the cluster.
pub struct Cluster {
    pub config: ClusterConfig,
    /// `[broker] session_idle_timeout`: how long a session key lives without a request.
    pub idle: Duration,
    /// A random tag naming this process in ids and channels (not its instance id, which names a host).
    pub tag: String,
    /// Seals what crosses Redis and must not be read there (forwarded requests carry tokens).
    pub sealer: sealed::Sealer,
    conn: ConnectionManager,
    pubsub: tokio::sync::Mutex<ConnectionManager>,
    up: AtomicBool,
    /// The pub/sub connection must subscribe again (at start, and after it was lost).
    resubscribe: AtomicBool,
    /// Sessions this instance holds (created or restored), for re-registration.
    known: DashMap<String, Registered>,
    /// Sessions whose standalone stream this instance holds, with how many are open.
    streams: DashMap<String, usize>,
    inbound: std::sync::Mutex<Option<mpsc::Receiver<Inbound>>>,
    /// Inbound messages dropped because a queue was full or they did not parse.
    pub dropped: Arc<AtomicU64>,
    /// Set when Redis came back empty (or this instance was away): the sessions were written again.
    pub reregistered: AtomicU64,
}

impl Cluster {
    /// The client and its two connections (made lazily: the broker starts while Redis is down, and
    /// reports itself not ready until it answers). Starts the heartbeat, stopped by `stop`.
    pub fn start(
        config: ClusterConfig,
        idle: Duration,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, ClusterError> {
        let mut url = url::Url::parse(config.redis_url.expose())
            .map_err(|e| ClusterError::Sealed(format!("[cluster] redis_url: {e}")))?;
        // Pub/sub on the multiplexed connection needs RESP3 (Redis 6 or later, and Valkey).
        if !url.query_pairs().any(|(k, _)| k == "protocol") {
            url.query_pairs_mut().append_pair("protocol", "resp3");
        }
        let client = redis::Client::open(url.as_str()).map_err(redis_err("redis_url"))?;
        let base = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), base.clone())
            .map_err(redis_err("connect"))?;
        let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
        // Bounded like the inbound queue: a flood of pushes is dropped (and counted by `pushes`'s
        // receiver falling behind), never buffered without end.
        let (push_tx, push_rx) = mpsc::channel::<redis::PushInfo>(INBOUND_QUEUE);
        let push_dropped = Arc::new(AtomicU64::new(0));
        let dropped_here = push_dropped.clone();
        let push_tx = move |p: redis::PushInfo| {
            if push_tx.try_send(p).is_err() {
                dropped_here.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), redis::aio::SendError>(())
        };
        let pubsub = ConnectionManager::new_lazy_with_config(
            client,
            base.set_push_sender(push_tx).set_automatic_resubscription(),
        )
        .map_err(redis_err("connect"))?;
        let mut tag = [0u8; 4];
        getrandom::fill(&mut tag)?;
        let sealer = sealed::Sealer::new(config.secret_key.expose());
        let me = Arc::new(Cluster {
            config,
            idle,
            tag: crate::hex(&tag),
            sealer,
            conn,
            pubsub: tokio::sync::Mutex::new(pubsub),
            up: AtomicBool::new(false),
            resubscribe: AtomicBool::new(true),
            known: DashMap::new(),
            streams: DashMap::new(),
            inbound: std::sync::Mutex::new(Some(rx)),
            dropped: push_dropped,
            reregistered: AtomicU64::new(0),
        });
        tokio::spawn(me.clone().pushes(push_rx, tx));
        tokio::spawn(me.clone().heartbeat(stop));
        Ok(me)
    }

    /// Messages from other instances; taken once, by the front.
    pub fn take_inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        self.inbound.lock().ok()?.take()
    }

    /// A connection for commands (a cheap handle on the one multiplexed connection).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether the last heartbeat reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn session_key(session: &str) -> String {
        format!("{PREFIX}s:{session}")
    }

    fn gone_key(session: &str) -> String {
        format!("{PREFIX}gone:{session}")
    }

    fn session_channel(session: &str) -> String {
        format!("{PREFIX}s:{session}")
    }

    fn instance_channel(tag: &str) -> String {
        format!("{PREFIX}i:{tag}")
    }

    const EVENTS: &'static str = "mcpb:ev";

    // -- sessions ---------------------------------------------------------------------------------

    /// Write a session this instance opened or restored (and remember it for re-registration).
    pub async fn register(
        &self,
        session: &str,
        reg: Registered,
        idle: Duration,
    ) -> Result<(), ClusterError> {
        let key = Self::session_key(session);
        let mut c = self.conn();
        redis::pipe()
            .atomic()
            .hset(&key, "owner", &reg.owner)
            .ignore()
            .hset(&key, "init", &reg.init)
            .ignore()
            .expire(&key, secs(idle))
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err("register session"))?;
        self.known.insert(session.to_string(), reg);
        Ok(())
    }

    /// Remember a session without writing it (it was read from Redis).
    pub fn remember(&self, session: &str, reg: Registered) {
        self.known.insert(session.to_string(), reg);
    }

    /// This instance no longer holds the session (closed or idle here); Redis keeps it.
    pub fn forget(&self, session: &str) {
        self.known.remove(session);
    }

    /// The session's owner and `initialize` params; `None` if it does not exist (or was deleted).
    pub async fn load(&self, session: &str) -> Result<Option<Registered>, ClusterError> {
        let mut c = self.conn();
        let (owner, init): (Option<String>, Option<String>) = c
            .hmget(Self::session_key(session), &["owner", "init"])
            .await
            .map_err(redis_err("load session"))?;
        Ok(match (owner, init) {
            (Some(owner), Some(init)) => Some(Registered { owner, init }),
            _ => None,
        })
    }

    /// The log level a session set, if any (read when an instance restores it).
    pub async fn level(&self, session: &str) -> Result<Option<String>, ClusterError> {
        let mut c = self.conn();
        c.hget(Self::session_key(session), "level")
            .await
            .map_err(redis_err("load session"))
    }

    /// Keep a session alive for another idle period. False when it no longer exists: deleted
    /// (its tombstone is there), or expired. A session this instance holds whose key vanished
    /// without a tombstone (Redis restarted empty) is written again, and stays.
    pub async fn touch(&self, session: &str, idle: Duration) -> Result<bool, ClusterError> {
        let mut c = self.conn();
        let alive: bool = c
            .expire(Self::session_key(session), secs(idle))
            .await
            .map_err(redis_err("touch session"))?;
        if alive {
            return Ok(true);
        }
        let gone: bool = c
            .exists(Self::gone_key(session))
            .await
            .map_err(redis_err("touch session"))?;
        let known = self.known.get(session).map(|r| r.clone());
        match (gone, known) {
            (false, Some(reg)) => {
                self.register(session, reg, idle).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Delete a session everywhere: its key, a tombstone, and a broadcast so every instance closes
    /// its copy.
    pub async fn delete(&self, session: &str, idle: Duration) -> Result<(), ClusterError> {
        self.known.remove(session);
        let mut c = self.conn();
        redis::pipe()
            .del(Self::session_key(session))
            .ignore()
            .set_ex(Self::gone_key(session), 1, secs(idle).unsigned_abs())
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err("delete session"))?;
        self.broadcast(&Wire::Closed {
            from: self.tag.clone(),
            session: session.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Record a session's log level (for instances that restore it later).
    pub async fn set_level(&self, session: &str, level: &str) -> Result<(), ClusterError> {
        let mut c = self.conn();
        c.hset::<_, _, _, ()>(Self::session_key(session), "level", level)
            .await
            .map_err(redis_err("set level"))
    }

    // -- messages ---------------------------------------------------------------------------------

    async fn publish(&self, channel: &str, wire: &Wire) -> Result<usize, ClusterError> {
        let body = serde_json::to_string(wire).map_err(|e| ClusterError::Sealed(e.to_string()))?;
        if body.len() > MAX_MESSAGE {
            return Err(ClusterError::TooLarge(body.len()));
        }
        let mut c = self.conn();
        c.publish(channel, body).await.map_err(redis_err("publish"))
    }

    /// To every instance, this one included.
    pub async fn broadcast(&self, wire: &Wire) -> Result<usize, ClusterError> {
        self.publish(Self::EVENTS, wire).await
    }

    /// To the instance whose tag is `tag`.
    pub async fn to_instance(&self, tag: &str, wire: &Wire) -> Result<usize, ClusterError> {
        self.publish(&Self::instance_channel(tag), wire).await
    }

    /// To the instance holding `session`'s standalone stream; how many received it (0: none holds it).
    pub async fn to_stream(&self, session: &str, wire: &Wire) -> Result<usize, ClusterError> {
        self.publish(&Self::session_channel(session), wire).await
    }

    /// Whether this instance holds `session`'s standalone stream.
    pub fn holds_stream(&self, session: &str) -> bool {
        self.streams.contains_key(session)
    }

    /// A standalone stream of `session` opened here: messages for it come here from now on.
    pub async fn stream_opened(&self, session: &str) {
        let first = {
            let mut n = self.streams.entry(session.to_string()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            let mut ps = self.pubsub.lock().await;
            if let Err(e) = ps.subscribe(Self::session_channel(session)).await {
                tracing::warn!(error = %e, "cluster: cannot subscribe to a session's channel");
            }
        }
    }

    /// A standalone stream of `session` closed here.
    pub async fn stream_closed(&self, session: &str) {
        let last = match self.streams.get_mut(session) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            self.streams.remove_if(session, |_, n| *n == 0);
            let mut ps = self.pubsub.lock().await;
            let _ = ps.unsubscribe(Self::session_channel(session)).await;
        }
    }

    // -- background -------------------------------------------------------------------------------

    /// Every second: write the heartbeat. Learns whether Redis answers (readiness), and whether it
    /// lost our data (then the sessions held here are written again).
    async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let key = format!("{PREFIX}i:{}", self.tag);
        loop {
            let mut c = self.conn();
            let was: Result<Option<String>, _> = redis::cmd("SET")
                .arg(&key)
                .arg(&self.config.instance_id)
                .arg("EX")
                .arg(HEARTBEAT_TTL_SECS)
                .arg("GET")
                .query_async(&mut c)
                .await;
            match was {
                Ok(previous) => {
                    // After a start, a lost connection or a Redis restart, listen again (the
                    // channels of a new or restarted Redis have no subscribers).
                    let mut subscribed = !self.resubscribe.load(Ordering::Acquire);
                    if !subscribed {
                        subscribed = self.subscribe_all().await;
                        self.resubscribe.store(!subscribed, Ordering::Release);
                    }
                    let was_up = self.up.swap(subscribed, Ordering::AcqRel);
                    if previous.is_none() && !self.known.is_empty() {
                        self.reregister().await;
                    } else if !was_up && subscribed {
                        tracing::info!(instance = %self.config.instance_id, "cluster: Redis reachable");
                    }
                }
                Err(e) => {
                    self.resubscribe.store(true, Ordering::Release);
                    if self.up.swap(false, Ordering::AcqRel) {
                        tracing::warn!(error = %e, "cluster: Redis unreachable; new sessions are refused until it is back");
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    let _: Result<(), _> = self.conn().del(&key).await;
                    return;
                }
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// The cluster's channel, this instance's, and those of the sessions whose stream it holds.
    async fn subscribe_all(&self) -> bool {
        let mut channels = vec![Self::EVENTS.to_string(), Self::instance_channel(&self.tag)];
        channels.extend(self.streams.iter().map(|e| Self::session_channel(e.key())));
        let mut ps = self.pubsub.lock().await;
        match ps.subscribe(channels).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot subscribe");
                false
            }
        }
    }

    /// Write every session held here again (Redis restarted empty, or expired them while this
    /// instance could not reach it).
    async fn reregister(&self) {
        let all: Vec<(String, Registered)> = self
            .known
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let idle = self.idle;
        let mut n = 0usize;
        for (id, reg) in all {
            if self.register(&id, reg, idle).await.is_ok() {
                n += 1;
            }
        }
        self.reregistered.fetch_add(n as u64, Ordering::Relaxed);
        tracing::info!(
            sessions = n,
            "cluster: Redis had lost this instance's sessions; written again"
        );
    }

    /// RESP3 pushes → parsed [`Inbound`] messages (bounded; the excess is dropped and counted).
    async fn pushes(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<redis::PushInfo>,
        tx: mpsc::Sender<Inbound>,
    ) {
        while let Some(p) = rx.recv().await {
            match p.kind {
                redis::PushKind::Message => {
                    let mut it = p.data.into_iter();
                    let (Some(ch), Some(body)) = (it.next(), it.next()) else {
                        continue;
                    };
                    let (Ok(channel), Ok(body)) = (
                        redis::from_redis_value::<String>(ch),
                        redis::from_redis_value::<Vec<u8>>(body),
                    ) else {
                        continue;
                    };
                    match serde_json::from_slice::<Wire>(&body) {
                        Ok(wire) => {
                            if tx.try_send(Inbound { channel, wire }).is_err() {
                                self.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                redis::PushKind::Disconnection => {
                    self.up.store(false, Ordering::Release);
                    self.resubscribe.store(true, Ordering::Release);
                }
                _ => {}
            }
        }
    }
}

/// Whole seconds, at least 1 (Redis expiries).
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)
}
