//! Resumable request streams for 2025-era sessions: every event of a POST's SSE stream is kept (per
//! session, bounded) so a client that comes back with `Last-Event-ID` gets what it missed, and an
//! upstream's early close (SEP-1699 polling) is passed on to clients that expect one.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, GetExtensions, JsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::{
    RestoreOutcome, SessionId, SessionManager,
    session::ServerSseMessage,
    session::local::{LocalSessionManager, LocalSessionManagerError},
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::cluster;
use crate::cluster::{Cluster, Wire};
use crate::upstream::StreamLink;

/// Holds a session's standalone stream for this instance while alive (see
/// [`ResumableSessions::standalone`]).
struct Held {
    cluster: Arc<Cluster>,
    session: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let (c, s) = (self.cluster.clone(), std::mem::take(&mut self.session));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { c.stream_closed(&s).await });
        }
    }
}

/// Events kept per session for clients that come back with `Last-Event-ID`: at most this many...
const REPLAY_MAX_EVENTS: usize = 256;
/// ...holding at most this many bytes of encoded messages. An event larger than this reaches a
/// connected client but is not kept.
const REPLAY_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A call's stream stays resumable this long after its last event (rmcp keeps a finished stream's
/// cache as long), unless the session ends first.
const REPLAY_LINGER: Duration = Duration::from_secs(60);
/// Events on their way to one connected client; past these the stream waits for the client (as
/// rmcp's own streams do).
const LIVE_CAPACITY: usize = 16;
/// Reconnections to one stream waiting to be served.
const ATTACH_QUEUE: usize = 8;
/// The first revision whose clients expect a server to end a call's stream early (SEP-1699).
const POLLING_REVISION: &str = "2025-11-25";

/// rmcp's `LocalSessionManager` with resumable request streams: every event of a POST's SSE stream
/// passes through a task of the broker's ([`forward`]) that keeps it in the session's [`Replay`]
/// and sends it on to whichever connection the client has open for that stream. rmcp's own cache
/// does not do here: it is dropped the moment the response is produced, so a client that was away
/// at that moment got an empty stream back.
///
/// A client of 2025-11-25 or later also has its stream ended when the upstream ends the call's
/// stream early (SEP-1699 polling; see `upstream::http_client`): the broker then goes back to the
/// upstream when its client comes back. Older clients keep their stream open while the broker
/// resumes upstream on its own. The standalone GET stream, and every other session operation, are
/// rmcp's. 2026-07-28 requests carry no session, and so are not resumable.
pub(super) struct ResumableSessions {
    inner: LocalSessionManager,
    /// Under `[cluster]`: sessions are restored from Redis, requests to the client name this
    /// instance, and client answers and cancellations reach the instance they are for (see
    /// `front::cluster`).
    cluster: Option<Arc<Cluster>>,
    /// Every open session; its [`Replay`] is made by its first request stream (an idle session,
    /// or one that only sends notifications, holds none).
    replays: std::sync::Mutex<HashMap<SessionId, Option<Arc<Replay>>>>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum SessionError {
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
    #[error("this session has no stream to resume after that event id")]
    NoStream,
}

impl ResumableSessions {
    pub(super) fn new(inner: LocalSessionManager, cluster: Option<Arc<Cluster>>) -> Self {
        ResumableSessions {
            inner,
            cluster,
            replays: Default::default(),
        }
    }

    /// Hand a client message to this instance's copy of the session (no cluster routing).
    pub(super) async fn accept_local(
        &self,
        id: &str,
        message: ClientJsonRpcMessage,
    ) -> Result<(), SessionError> {
        Ok(self
            .inner
            .accept_message(&SessionId::from(id.to_string()), message)
            .await?)
    }

    /// A standalone stream: under `[cluster]`, this instance holds the session's stream while it
    /// is open (notifications decided elsewhere come here), and its requests name this instance.
    async fn standalone(
        &self,
        id: &SessionId,
        stream: impl Stream<Item = ServerSseMessage> + Send + Sync + 'static,
    ) -> impl Stream<Item = ServerSseMessage> + Send + Sync + 'static {
        let Some(c) = &self.cluster else {
            return stream.left_stream();
        };
        c.stream_opened(id).await;
        let held = Held {
            cluster: c.clone(),
            session: id.to_string(),
        };
        cluster::outbound_ids(c, stream)
            .map(move |ev| {
                let _held = &held;
                ev
            })
            .right_stream()
    }

    fn replays(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Option<Arc<Replay>>>> {
        self.replays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session's replay, made on first use (a detached one if the session closed meanwhile:
    /// freed with the stream).
    fn replay(&self, id: &SessionId) -> Arc<Replay> {
        match self.replays().get_mut(id) {
            Some(slot) => slot.get_or_insert_with(Arc::default).clone(),
            None => Arc::default(),
        }
    }
}

impl SessionManager for ResumableSessions {
    type Error = SessionError;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        self.replays().insert(id.clone(), None);
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        message.insert_extension(cluster::FrontSession(Arc::from(id.as_ref())));
        Ok(self.inner.initialize_session(id, message).await?)
    }

    /// A session another instance opened: a fresh local session under its id (rmcp then replays
    /// the client's `initialize` into it).
    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        let r = self.inner.restore_session(id.clone()).await?;
        if matches!(r, RestoreOutcome::Restored(_)) {
            self.replays().insert(id, None);
        }
        Ok(r)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    /// Also when the session idles out or its worker ends (rmcp closes it then): its streams end
    /// and their kept events go.
    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        let replay = self.replays().remove(id).flatten();
        if let Some(r) = replay {
            r.closed.cancel();
        }
        if let Some(c) = &self.cluster {
            c.forget(id);
        }
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        mut message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let link = match &mut message {
            JsonRpcMessage::Request(r) if client_polls(r.request.extensions()) => {
                let link = StreamLink::default();
                r.request.extensions_mut().insert(link.clone());
                Some(link)
            }
            _ => None,
        };
        // Subscribed before the request runs: an upstream close cannot come first.
        let closes = link.as_ref().map(StreamLink::closes);
        let inner = self.inner.create_stream(id, message).await?;
        let inner = match &self.cluster {
            Some(c) => cluster::outbound_ids(c, inner).left_stream(),
            None => inner.right_stream(),
        };
        let (tx, rx) = mpsc::channel(LIVE_CAPACITY);
        tokio::spawn(forward(inner, tx, self.replay(id), closes, link));
        Ok(ReceiverStream::new(rx))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        let Some(c) = &self.cluster else {
            return Ok(self.inner.accept_message(id, message).await?);
        };
        match cluster::route(c, message) {
            cluster::Route::Here(m) => Ok(self.inner.accept_message(id, m).await?),
            cluster::Route::Instance(tag, m) => {
                let wire = Wire::Answer {
                    session: id.to_string(),
                    message: serde_json::to_value(&m).unwrap_or_default(),
                };
                if let Err(e) = c.to_instance(&tag, &wire).await {
                    tracing::warn!(error = %e, "cluster: a client's answer could not be passed to the instance that asked");
                }
                Ok(())
            }
            cluster::Route::Everywhere(m) => {
                let wire = Wire::Notify {
                    from: c.tag.clone(),
                    session: id.to_string(),
                    message: serde_json::to_value(&m).unwrap_or_default(),
                };
                if let Err(e) = c.broadcast(&wire).await {
                    tracing::debug!(error = %e, "cluster: a cancellation reached this instance only");
                }
                Ok(self.inner.accept_message(id, m).await?)
            }
        }
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let s = self.inner.create_standalone_stream(id).await?;
        Ok(self.standalone(id, s).await)
    }

    /// A request stream's id (`INDEX/STREAM`) is looked up in this session's replay only: another
    /// session's id, a finished stream past its linger, or an evicted one is refused (rmcp then
    /// answers with an empty stream). Other ids (the standalone stream's) are rmcp's.
    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        let Some((after, stream)) = request_event_id(&last_event_id) else {
            let s = self.inner.resume(id, last_event_id).await?;
            return Ok(self.standalone(id, s).await.right_stream());
        };
        let attach = {
            let replays = self.replays();
            replays
                .get(id)
                .and_then(Option::as_ref)
                .and_then(|r| r.attach_to(stream))
        };
        let attach = attach.ok_or(SessionError::NoStream)?;
        let (reply, connection) = oneshot::channel();
        attach
            .send(Attach { after, reply })
            .await
            .map_err(|_| SessionError::NoStream)?;
        let rx = connection.await.map_err(|_| SessionError::NoStream)?;
        Ok(ReceiverStream::new(rx).left_stream())
    }
}

/// Whether the request comes from a client that resumes a call's stream the server ended early
/// (its `MCP-Protocol-Version` is 2025-11-25 or later; revisions are dates, so they sort as text).
fn client_polls(ext: &rmcp::model::Extensions) -> bool {
    ext.get::<http::request::Parts>()
        .and_then(|p| p.headers.get("mcp-protocol-version"))
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= POLLING_REVISION)
}

/// rmcp's id of an event on a request stream, `INDEX/STREAM`, as (index, stream).
fn request_event_id(id: &str) -> Option<(usize, u64)> {
    let (index, stream) = id.split_once('/')?;
    Some((index.parse().ok()?, stream.parse().ok()?))
}

/// A client reconnecting to a stream: the events after `after` and the live ones go to the
/// connection sent back on `reply`.
struct Attach {
    after: usize,
    reply: oneshot::Sender<mpsc::Receiver<ServerSseMessage>>,
}

/// One session's kept events, across its request streams, within [`REPLAY_MAX_EVENTS`] and
/// [`REPLAY_MAX_BYTES`] (the oldest go first).
#[derive(Default)]
struct Replay {
    state: std::sync::Mutex<ReplayState>,
    /// Cancelled when the session closes.
    closed: CancellationToken,
}

#[derive(Default)]
struct ReplayState {
    streams: HashMap<u64, Slot>,
    /// Every kept event, oldest first: (its stream, its size).
    order: VecDeque<(u64, usize)>,
    bytes: usize,
}

struct Slot {
    /// (index, event, size), oldest first.
    events: VecDeque<(usize, ServerSseMessage, usize)>,
    attach: mpsc::Sender<Attach>,
    /// The stream has had its last event: once nothing of it is kept, the slot goes (and with it
    /// the only sender of `attach`, which ends the stream's lingering task).
    ended: bool,
}

impl Replay {
    fn state(&self) -> std::sync::MutexGuard<'_, ReplayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, stream: u64, attach: mpsc::Sender<Attach>) {
        self.state().streams.insert(
            stream,
            Slot {
                events: VecDeque::new(),
                attach,
                ended: false,
            },
        );
    }

    fn attach_to(&self, stream: u64) -> Option<mpsc::Sender<Attach>> {
        self.state().streams.get(&stream).map(|s| s.attach.clone())
    }

    fn record(&self, stream: u64, index: usize, event: &ServerSseMessage) {
        let size = encoded_len(event);
        if size > REPLAY_MAX_BYTES {
            tracing::debug!(
                size,
                "an SSE event is larger than the replay buffer: not kept for resumption"
            );
            return;
        }
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(slot) = st.streams.get_mut(&stream) else {
            return;
        };
        slot.events.push_back((index, event.clone(), size));
        st.order.push_back((stream, size));
        st.bytes += size;
        while st.order.len() > REPLAY_MAX_EVENTS || st.bytes > REPLAY_MAX_BYTES {
            let Some((oldest, size)) = st.order.pop_front() else {
                break;
            };
            st.bytes -= size;
            if let Some(s) = st.streams.get_mut(&oldest) {
                s.events.pop_front();
                if s.ended && s.events.is_empty() {
                    st.streams.remove(&oldest);
                }
            }
        }
    }

    /// `stream` had its last event (it stays resumable while any of it is kept).
    fn ended(&self, stream: u64) {
        let mut st = self.state();
        if let Some(s) = st.streams.get_mut(&stream) {
            s.ended = true;
            if s.events.is_empty() {
                st.streams.remove(&stream);
            }
        }
    }

    /// The kept events of `stream` after index `after`.
    fn after(&self, stream: u64, after: usize) -> VecDeque<ServerSseMessage> {
        self.state()
            .streams
            .get(&stream)
            .map(|s| {
                s.events
                    .iter()
                    .filter(|(i, _, _)| *i > after)
                    .map(|(_, e, _)| e.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn remove(&self, stream: u64) {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(slot) = st.streams.remove(&stream) {
            st.bytes -= slot.events.iter().map(|(_, _, n)| n).sum::<usize>();
            st.order.retain(|(s, _)| *s != stream);
        }
    }
}

/// Bytes of an event's id and encoded message, counted without building the text.
fn encoded_len(event: &ServerSseMessage) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut n = Count(event.event_id.as_ref().map_or(0, String::len));
    if let Some(m) = &event.message {
        let _ = serde_json::to_writer(&mut n, m.as_ref());
    }
    n.0
}

/// One request stream, from rmcp's session to the client's connections, until its last event is
/// delivered and [`REPLAY_LINGER`] has passed (or the session closes). Events are kept in `replay`
/// as they come; the connected client (first the POST's response, then each reconnection) gets
/// them in order, a reconnection first the kept ones after its `Last-Event-ID`. An upstream close
/// (through `closes`) ends the current connection once it holds an event id to resume from.
async fn forward(
    inner: impl Stream<Item = ServerSseMessage> + Send + 'static,
    first: mpsc::Sender<ServerSseMessage>,
    replay: Arc<Replay>,
    mut closes: Option<watch::Receiver<(u64, Duration)>>,
    link: Option<StreamLink>,
) {
    let mut inner = std::pin::pin!(inner);
    let (attach_tx, mut attach_rx) = mpsc::channel::<Attach>(ATTACH_QUEUE);
    // Registered with the replay once the stream's id is known (from its first event).
    let mut attach_tx = Some(attach_tx);
    let mut stream: Option<u64> = None;
    let mut live = Some(first);
    // Whether the connected client holds an event id to come back with.
    let mut live_has_id = false;
    let mut pending: VecDeque<ServerSseMessage> = VecDeque::new();
    let mut close_wanted: Option<Duration> = None;
    let mut ended = false;
    // False once the replay dropped the stream (nothing of it kept): no client can come back.
    let mut attachable = true;
    let linger = tokio::time::sleep(REPLAY_LINGER);
    let mut linger = std::pin::pin!(linger);
    loop {
        if let Some(wait) = close_wanted
            && (live.is_none() || live_has_id)
        {
            close_wanted = None;
            if let Some(tx) = live.take() {
                // SEP-1699: say when to come back, then end the response.
                let _ = tx.try_send(ServerSseMessage::retry(wait));
            }
            pending.clear();
        }
        if ended && pending.is_empty() {
            // Everything went out: the client's stream ends.
            live = None;
        }
        if ended && live.is_none() && !attachable {
            break;
        }
        tokio::select! {
            biased;
            _ = replay.closed.cancelled() => break,
            _ = &mut linger, if ended && live.is_none() => break,
            a = attach_rx.recv(), if attachable => {
                let Some(a) = a else {
                    attachable = false;
                    continue;
                };
                let kept = stream.map(|s| replay.after(s, a.after)).unwrap_or_default();
                let (tx, rx) = mpsc::channel(LIVE_CAPACITY);
                if a.reply.send(rx).is_ok() {
                    // A connection still open for this stream ends here.
                    live = Some(tx);
                    live_has_id = true;
                    pending = kept;
                    close_wanted = None;
                    if let Some(l) = &link {
                        l.client_resumed();
                    }
                }
            }
            wait = next_close(&mut closes), if !ended => close_wanted = Some(wait),
            sent = deliver(&live, pending.front()) => {
                if sent {
                    if pending.pop_front().is_some_and(|e| e.event_id.is_some()) {
                        live_has_id = true;
                    }
                } else {
                    // The client went away; what it missed is kept for its return.
                    live = None;
                    pending.clear();
                }
            }
            event = inner.next(), if !ended && (live.is_none() || pending.is_empty()) => match event {
                Some(event) => {
                    if let Some((index, s)) = event.event_id.as_deref().and_then(request_event_id) {
                        if stream.is_none() {
                            stream = Some(s);
                            if let Some(tx) = attach_tx.take() {
                                replay.register(s, tx);
                            }
                        }
                        if stream == Some(s) {
                            replay.record(s, index, &event);
                        }
                    }
                    if live.is_some() {
                        pending.push_back(event);
                    }
                }
                None => {
                    ended = true;
                    // The rest is on its way: no reason left to end the connection early.
                    close_wanted = None;
                    linger.as_mut().reset(tokio::time::Instant::now() + REPLAY_LINGER);
                    match stream {
                        Some(s) => replay.ended(s),
                        // Never had an id: nothing to come back to.
                        None => attachable = false,
                    }
                }
            },
        }
    }
    if let Some(s) = stream {
        replay.remove(s);
    }
}

/// The next upstream close's advised wait; never, without a link.
async fn next_close(closes: &mut Option<watch::Receiver<(u64, Duration)>>) -> Duration {
    if let Some(rx) = closes
        && rx.changed().await.is_ok()
    {
        return rx.borrow_and_update().1;
    }
    std::future::pending().await
}

/// Send `next` to the connected client: false if it went away; never resolves with nothing to send.
fn deliver(
    live: &Option<mpsc::Sender<ServerSseMessage>>,
    next: Option<&ServerSseMessage>,
) -> impl Future<Output = bool> + use<> {
    let job = live.clone().zip(next.cloned());
    async move {
        match job {
            Some((tx, event)) => tx.send(event).await.is_ok(),
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{CustomResult, NumberOrString, ServerResult};

    fn event(stream: u64, index: usize, text: &str) -> ServerSseMessage {
        let msg = ServerJsonRpcMessage::response(
            ServerResult::CustomResult(CustomResult(serde_json::json!(text))),
            NumberOrString::Number(index as i64),
        );
        ServerSseMessage::new(format!("{index}/{stream}"), msg)
    }

    fn registered(streams: &[u64]) -> (Replay, Vec<mpsc::Receiver<Attach>>) {
        let r = Replay::default();
        let rxs = streams
            .iter()
            .map(|s| {
                let (tx, rx) = mpsc::channel(1);
                r.register(*s, tx);
                rx
            })
            .collect();
        (r, rxs)
    }

    fn indices(r: &Replay, stream: u64) -> Vec<usize> {
        r.after(stream, 0)
            .iter()
            .filter_map(|e| e.event_id.as_deref().and_then(request_event_id))
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn only_clients_of_2025_11_25_or_later_have_their_streams_ended_early() {
        let ext = |version: Option<&str>| {
            let mut b = http::Request::builder();
            if let Some(v) = version {
                b = b.header("mcp-protocol-version", v);
            }
            let mut ext = rmcp::model::Extensions::new();
            if let Ok(req) = b.body(()) {
                ext.insert(req.into_parts().0);
            }
            ext
        };
        assert!(client_polls(&ext(Some("2025-11-25"))));
        for older in [
            Some("2025-06-18"),
            Some("2025-03-26"),
            Some("2024-11-05"),
            None,
        ] {
            assert!(!client_polls(&ext(older)), "{older:?}");
        }
        assert!(!client_polls(&rmcp::model::Extensions::new()));
    }

    #[tokio::test]
    async fn a_session_holds_no_replay_until_its_first_request_stream() {
        let sessions = ResumableSessions::new(LocalSessionManager::default(), None);
        let (id, _transport) = sessions.create_session().await.expect("session");
        assert!(
            matches!(sessions.replays().get(&id), Some(None)),
            "a fresh session is registered without a replay"
        );
        let first = sessions.replay(&id);
        assert!(
            sessions
                .replays()
                .get(&id)
                .and_then(Option::as_ref)
                .is_some_and(|r| Arc::ptr_eq(r, &first)),
            "the first request stream makes it, and later ones share it"
        );
        sessions.close_session(&id).await.ok();
        assert!(sessions.replays().get(&id).is_none());
        assert!(first.closed.is_cancelled(), "closing ends its streams");
        // A stream that raced the close gets a detached replay, not a new entry.
        let _detached = sessions.replay(&id);
        assert!(sessions.replays().get(&id).is_none());
    }

    #[test]
    fn event_ids() {
        assert_eq!(request_event_id("3/7"), Some((3, 7)));
        for bad in ["3", "3/", "/7", "-1/7", "3/-7", "3/7/1", "a/b", ""] {
            assert_eq!(request_event_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replay_keeps_the_newest_events_within_the_count() {
        let (r, _rx) = registered(&[1]);
        for i in 0..REPLAY_MAX_EVENTS + 40 {
            r.record(1, i, &event(1, i, "x"));
        }
        let kept = indices(&r, 1);
        assert_eq!(kept.len(), REPLAY_MAX_EVENTS);
        assert_eq!(kept.first(), Some(&40));
        assert_eq!(r.state().order.len(), REPLAY_MAX_EVENTS);
    }

    #[test]
    fn replay_keeps_within_the_bytes_across_streams_oldest_first() {
        let (r, _rx) = registered(&[1, 2]);
        // Four of these are just over the bound.
        let big = "y".repeat(REPLAY_MAX_BYTES / 4);
        r.record(1, 1, &event(1, 1, &big));
        r.record(2, 1, &event(2, 1, &big));
        r.record(1, 2, &event(1, 2, &big));
        r.record(2, 2, &event(2, 2, &big));
        assert!(r.state().bytes <= REPLAY_MAX_BYTES);
        assert_eq!(
            indices(&r, 1),
            vec![2],
            "stream 1's oldest event went first"
        );
        assert_eq!(indices(&r, 2), vec![1, 2]);
        // An event larger than the whole buffer is not kept (and evicts nothing).
        r.record(1, 3, &event(1, 3, &"z".repeat(REPLAY_MAX_BYTES + 1)));
        assert_eq!(indices(&r, 1), vec![2]);
        r.remove(1);
        r.remove(2);
        let st = r.state();
        assert!(st.streams.is_empty() && st.order.is_empty() && st.bytes == 0);
    }

    #[test]
    fn events_of_unregistered_streams_are_not_kept() {
        let (r, _rx) = registered(&[1]);
        r.record(9, 1, &event(9, 1, "x"));
        assert!(r.after(9, 0).is_empty());
        assert_eq!(r.state().bytes, 0);
    }

    async fn resume(replay: &Replay, stream: u64, after: usize) -> Option<Vec<ServerSseMessage>> {
        let attach = replay.attach_to(stream)?;
        let (reply, rx) = oneshot::channel();
        attach.send(Attach { after, reply }).await.ok()?;
        let rx = rx.await.ok()?;
        Some(ReceiverStream::new(rx).collect().await)
    }

    #[tokio::test]
    async fn a_response_produced_while_the_client_is_away_is_replayed_then_freed() {
        let replay = Arc::new(Replay::default());
        let (up, inner) = mpsc::channel(4);
        let (first, mut client) = mpsc::channel(LIVE_CAPACITY);
        let task = tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            None,
            None,
        ));
        up.send(event(5, 0, "priming")).await.ok();
        assert!(client.recv().await.is_some());
        drop(client); // the client goes away
        up.send(event(5, 1, "progress")).await.ok();
        up.send(event(5, 2, "result")).await.ok();
        drop(up); // the response went out: rmcp ends the stream
        tokio::time::timeout(Duration::from_secs(5), async {
            while indices(&replay, 5) != vec![1, 2] {
                tokio::task::yield_now().await;
            }
        })
        .await
        .ok();
        let got = resume(&replay, 5, 0).await.unwrap_or_default();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            resume(&replay, 5, 1).await.map(|v| v.len()),
            Some(1),
            "after the progress: just the result"
        );
        assert!(resume(&replay, 6, 0).await.is_none(), "no such stream");
        // The session closes: the stream's events go.
        replay.closed.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(replay.attach_to(5).is_none());
        assert_eq!(replay.state().bytes, 0);
    }

    #[tokio::test]
    async fn a_finished_stream_whose_events_were_evicted_stops_lingering() {
        let replay = Arc::new(Replay::default());
        let (up, inner) = mpsc::channel(4);
        let (first, client) = mpsc::channel(LIVE_CAPACITY);
        drop(client);
        let task = tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            None,
            None,
        ));
        up.send(event(3, 0, "priming")).await.ok();
        up.send(event(3, 1, "result")).await.ok();
        drop(up);
        let finished = tokio::time::timeout(Duration::from_secs(5), async {
            while !replay.state().streams.get(&3).is_some_and(|s| s.ended) {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(finished.is_ok(), "the stream is kept, ended");
        // Another stream's events push all of stream 3's out.
        let (tx, _rx) = mpsc::channel(1);
        replay.register(4, tx);
        for i in 0..REPLAY_MAX_EVENTS {
            replay.record(4, i, &event(4, i, "x"));
        }
        assert!(replay.attach_to(3).is_none());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_ok(),
            "its task ends well before REPLAY_LINGER"
        );
    }

    #[tokio::test]
    async fn an_upstream_close_ends_the_connection_after_an_id_and_a_resume_is_signalled() {
        let replay = Arc::new(Replay::default());
        let link = StreamLink::default();
        let closes = link.closes();
        let (up, inner) = mpsc::channel(4);
        let (first, mut client) = mpsc::channel(LIVE_CAPACITY);
        tokio::spawn(forward(
            ReceiverStream::new(inner),
            first,
            replay.clone(),
            Some(closes),
            Some(link.clone()),
        ));
        up.send(event(0, 0, "priming")).await.ok();
        assert!(client.recv().await.is_some_and(|e| e.event_id.is_some()));
        // What the upstream leg does when the upstream ends its stream early.
        let mut resumed = link_resumes(&link);
        link_close(&link, Duration::from_millis(1500));
        let closing = client.recv().await;
        assert_eq!(
            closing.and_then(|e| e.retry),
            Some(Duration::from_millis(1500))
        );
        assert!(client.recv().await.is_none(), "the client's stream ended");
        let attach = replay.attach_to(0);
        assert!(attach.is_some());
        let (reply, rx) = oneshot::channel();
        if let Some(a) = attach {
            a.send(Attach { after: 0, reply }).await.ok();
        }
        let mut again = rx.await.ok();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), resumed.changed())
                .await
                .is_ok(),
            "the upstream leg hears of the client's return"
        );
        up.send(event(0, 1, "result")).await.ok();
        let got = match again.as_mut() {
            Some(rx) => rx.recv().await,
            None => None,
        };
        assert_eq!(got.and_then(|e| e.event_id), Some("1/0".to_string()));
    }

    fn link_resumes(link: &StreamLink) -> watch::Receiver<u64> {
        link.resumes()
    }

    fn link_close(link: &StreamLink, wait: Duration) {
        link.upstream_closed(wait);
    }
}
