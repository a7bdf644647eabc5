//! The HTTP front's side of `[cluster]`: any instance serves any request of any session.
//!
//! - **Sessions** are written to Redis when opened (owner, the client's `initialize` params); an
//!   instance that gets a request for a session it does not hold has rmcp restore it from there
//!   (rmcp replays the `initialize` on a fresh local session: [`StoredSessions`]).
//! - **Requests to the client** (elicitation, sampling, roots) carry ids naming the instance that
//!   sent them (`TAG~N`): the client's answer, wherever it lands, is passed to that instance.
//! - **Client notifications** (`notifications/cancelled`) go to every instance: the request they
//!   name may run on any of them.
//! - **Notifications to the client** go to the instance holding its standalone (GET) stream: it
//!   listens on the session's channel while the stream is open (see `broker::sessions`).
//! - **Deletion** reaches every instance, which closes its copy.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, JsonRpcMessage, NumberOrString, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::{
    SessionId, SessionManager,
    session::ServerSseMessage,
    session::{SessionState, SessionStore, SessionStoreError},
};

use super::lane::Lanes;
use super::resume::ResumableSessions;
use crate::auth::SessionOwners;
use crate::broker::Broker;
use crate::cluster::{Cluster, Wire};

/// The HTTP front's id of the session an `initialize` opens (or restores), for the broker.
#[derive(Clone)]
pub struct FrontSession(pub Arc<str>);

/// rmcp's external session store, read when restoring a session this instance does not hold. The
/// session is written by the broker's `initialize` (which knows its owner), so `store` does nothing;
/// `delete` (HTTP DELETE) removes it everywhere.
pub(super) struct StoredSessions(pub Arc<Cluster>);

#[async_trait::async_trait]
impl SessionStore for StoredSessions {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        let Some(reg) = self.0.load(session_id).await? else {
            return Ok(None);
        };
        let params = serde_json::from_str(&reg.init)?;
        Ok(Some(SessionState::new(params)))
    }

    async fn store(&self, _: &str, _: &SessionState) -> Result<(), SessionStoreError> {
        Ok(())
    }

    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        Ok(self.0.delete(session_id, self.0.idle).await?)
    }
}

/// The id this instance gives a request to the client: `TAG~N`.
pub(super) fn outbound_ids(
    cluster: &Arc<Cluster>,
    stream: impl Stream<Item = ServerSseMessage> + Send + Sync + 'static,
) -> impl Stream<Item = ServerSseMessage> + Send + Sync + 'static {
    let tag = cluster.tag.clone();
    stream.map(move |mut ev| {
        if let Some(m) = &ev.message
            && let JsonRpcMessage::Request(r) = m.as_ref()
        {
            let mut r = r.clone();
            r.id = NumberOrString::String(format!("{tag}~{}", id_text(&r.id)).into());
            ev.message = Some(Arc::new(ServerJsonRpcMessage::Request(r)));
        }
        ev
    })
}

/// Event ids of a call's stream name this instance (`TAG:INDEX/STREAM`): a client resuming it with
/// `Last-Event-ID` through another instance is passed here (see `front::forward`).
pub(super) fn tag_event_ids(
    cluster: &Arc<Cluster>,
    stream: impl Stream<Item = ServerSseMessage> + Send + Sync + 'static,
) -> impl Stream<Item = ServerSseMessage> + Send + Sync + 'static {
    let tag = cluster.tag.clone();
    stream.map(move |mut ev| {
        if let Some(id) = &ev.event_id
            && id.contains('/')
        {
            ev.event_id = Some(format!("{tag}:{id}"));
        }
        ev
    })
}

fn id_text(id: &NumberOrString) -> String {
    match id {
        NumberOrString::Number(n) => n.to_string(),
        NumberOrString::String(s) => s.to_string(),
    }
}

/// Where a client's message goes.
pub(super) enum Route {
    /// Handle here (an answer to this instance's request has its own id back).
    Here(ClientJsonRpcMessage),
    /// An answer to another instance's request: sent there.
    Instance(String, ClientJsonRpcMessage),
    /// Handle here and tell every other instance (a cancellation).
    Everywhere(ClientJsonRpcMessage),
}

pub(super) fn route(cluster: &Cluster, mut message: ClientJsonRpcMessage) -> Route {
    let id = match &mut message {
        JsonRpcMessage::Response(r) => &mut r.id,
        JsonRpcMessage::Error(e) => match &mut e.id {
            Some(id) => id,
            None => return Route::Here(message),
        },
        JsonRpcMessage::Notification(n) => {
            return if matches!(
                n.notification,
                rmcp::model::ClientNotification::CancelledNotification(_)
            ) {
                Route::Everywhere(message)
            } else {
                Route::Here(message)
            };
        }
        _ => return Route::Here(message),
    };
    let NumberOrString::String(s) = &*id else {
        return Route::Here(message);
    };
    let Some((tag, n)) = s.split_once('~') else {
        return Route::Here(message);
    };
    if tag != cluster.tag {
        return Route::Instance(tag.to_string(), message);
    }
    *id = match n.parse::<i64>() {
        Ok(n) => NumberOrString::Number(n),
        Err(_) => NumberOrString::String(n.to_string().into()),
    };
    Route::Here(message)
}

/// A client's message for this instance's copy of `session`, if it holds one.
async fn hand_to_session(
    sessions: Arc<ResumableSessions>,
    session: String,
    msg: ClientJsonRpcMessage,
) {
    if let Ok(true) = sessions
        .has_session(&SessionId::from(session.clone()))
        .await
    {
        let _ = sessions.accept_local(&session, msg).await;
    }
}

/// Messages from the other instances (and this one's own broadcasts), until the process stops.
/// What may wait (on a session's worker, on an upstream) runs in a task of its own, so one slow
/// session never holds up the messages for the others.
pub(super) async fn inbound(
    cluster: Arc<Cluster>,
    sessions: Arc<ResumableSessions>,
    broker: Arc<Broker>,
    lanes: Arc<Lanes>,
    owners: Arc<SessionOwners>,
    forwarder: Option<Arc<super::forward::Forwarder>>,
) {
    let Some(mut rx) = cluster.take_inbound() else {
        return;
    };
    while let Some(m) = rx.recv().await {
        let mine = |from: &str| from == cluster.tag;
        match m.wire {
            Wire::Answer { session, message } => {
                let Ok(msg) = serde_json::from_value::<ClientJsonRpcMessage>(message) else {
                    continue;
                };
                if let Route::Here(msg) = route(&cluster, msg) {
                    tokio::spawn(hand_to_session(sessions.clone(), session, msg));
                }
            }
            Wire::Notify {
                from,
                session,
                message,
            } if !mine(&from) => {
                let Ok(msg) = serde_json::from_value::<ClientJsonRpcMessage>(message) else {
                    continue;
                };
                if let JsonRpcMessage::Notification(n) = &msg
                    && let rmcp::model::ClientNotification::CancelledNotification(c) =
                        &n.notification
                    && let Some(request) = &c.params.request_id
                {
                    lanes.cancel_request(&session, request);
                }
                tokio::spawn(hand_to_session(sessions.clone(), session, msg));
            }
            Wire::Closed { from, session } if !mine(&from) => {
                owners.forget(&session);
                lanes.forget(&session);
                let sessions = sessions.clone();
                tokio::spawn(async move {
                    let _ = sessions.close_session(&SessionId::from(session)).await;
                });
            }
            Wire::Level {
                from,
                session,
                level,
            } if !mine(&from) => {
                if let Ok(level) = serde_json::from_value(level) {
                    let broker = broker.clone();
                    tokio::spawn(async move { broker.apply_level(&session, level).await });
                }
            }
            Wire::Unsubscribed {
                from,
                session,
                server,
                uri,
            } if !mine(&from) => {
                let broker = broker.clone();
                tokio::spawn(
                    async move { broker.unsubscribe_front(&session, &server, &uri).await },
                );
            }
            Wire::Log {
                server,
                owner,
                params,
                ..
            } => {
                if let Ok(params) = serde_json::from_value(params) {
                    broker.route_cluster_log(&server, owner.as_deref(), params);
                }
            }
            Wire::Forward { from, rid, request } => {
                if let Some(f) = &forwarder {
                    tokio::spawn(f.clone().serve(from, rid, request));
                }
            }
            Wire::ForwardCancel { from, rid } => {
                if let Some(f) = &forwarder {
                    f.cancel(&from, rid);
                }
            }
            Wire::Reply { rid, part } => {
                if let Some(f) = &forwarder {
                    f.reply(rid, part);
                }
            }
            Wire::Deliver { session, message } => {
                if let Ok(JsonRpcMessage::Notification(n)) =
                    serde_json::from_value::<ServerJsonRpcMessage>(message)
                {
                    broker.deliver_relayed(&session, n.notification);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClusterConfig, Secret};

    fn message(json: &str) -> ClientJsonRpcMessage {
        serde_json::from_str(json).expect("a client message")
    }

    #[tokio::test]
    async fn answers_go_to_the_instance_their_id_names() {
        // Connects lazily: nothing here talks to Redis.
        let c = Cluster::start(
            ClusterConfig {
                redis_url: Secret::new("redis://127.0.0.1:1"),
                instance_id: "t".into(),
                secret_key: Secret::new("k".repeat(32)),
                share_credentials: false,
            },
            std::time::Duration::from_secs(60),
            tokio_util::sync::CancellationToken::new(),
        )
        .expect("cluster handle");
        let mine = format!(r#"{{"jsonrpc":"2.0","id":"{}~7","result":{{}}}}"#, c.tag);
        match route(&c, message(&mine)) {
            Route::Here(JsonRpcMessage::Response(r)) => {
                assert_eq!(r.id, NumberOrString::Number(7))
            }
            _ => panic!("an answer to this instance is handled here, with its own id back"),
        }
        let theirs = r#"{"jsonrpc":"2.0","id":"0badc0de~3","error":{"code":-1,"message":"no"}}"#;
        assert!(matches!(route(&c, message(theirs)), Route::Instance(t, _) if t == "0badc0de"));
        // A client's own ids (numbers, or strings without a tag) are handled here unchanged.
        let plain = r#"{"jsonrpc":"2.0","id":"abc","result":{}}"#;
        assert!(matches!(route(&c, message(plain)), Route::Here(_)));
        let cancel =
            r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":4}}"#;
        assert!(matches!(route(&c, message(cancel)), Route::Everywhere(_)));
        let other = r#"{"jsonrpc":"2.0","method":"notifications/roots/list_changed"}"#;
        assert!(matches!(route(&c, message(other)), Route::Here(_)));
    }
}
