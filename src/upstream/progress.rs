//! Progress routing in wire order.
//!
//! rmcp hands each incoming notification to the handler in a task of its own, so a progress
//! notification can reach the handler after the response it preceded on the wire (and, in principle,
//! after a later progress). The caller would then miss the last steps, or see them out of order. So
//! every transport is wrapped in a [`ProgressTap`] that copies progress notifications, synchronously
//! and in arrival order, into the channel of the call they belong to, before rmcp sees the response
//! that follows them. The call drains its channel before returning its result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rmcp::{
    RoleClient,
    model::{JsonRpcMessage, ProgressNotificationParam, ProgressToken, ServerNotification},
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
    transport::Transport,
};
use tokio::sync::mpsc;

/// Bound on progress held for tokens no call has claimed yet (arrived before the route was set).
const MAX_PENDING_TOKENS: usize = 1024;
const MAX_PENDING_PER_TOKEN: usize = 64;

enum Slot {
    Routed(mpsc::UnboundedSender<ProgressNotificationParam>),
    /// Progress that arrived between sending a request and its caller claiming the token.
    Pending(Vec<ProgressNotificationParam>),
}

/// Upstream progress token → the channel of the call that owns it. One per connection (rmcp's
/// tokens are per connection).
#[derive(Default)]
pub struct ProgressRouter {
    slots: Mutex<HashMap<ProgressToken, Slot>>,
}

impl ProgressRouter {
    fn deliver(&self, p: &ProgressNotificationParam) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        match slots.get_mut(&p.progress_token) {
            Some(Slot::Routed(tx)) => {
                let _ = tx.send(p.clone());
            }
            Some(Slot::Pending(v)) => {
                if v.len() < MAX_PENDING_PER_TOKEN {
                    v.push(p.clone());
                }
            }
            None => {
                if slots.len() >= MAX_PENDING_TOKENS {
                    slots.retain(|_, s| matches!(s, Slot::Routed(_)));
                }
                slots.insert(p.progress_token.clone(), Slot::Pending(vec![p.clone()]));
            }
        }
    }

    /// Progress for a token only a call can own (a lane call's): passed on if the call still
    /// runs, else dropped (nothing will claim it later).
    pub(super) fn deliver_routed(&self, p: &ProgressNotificationParam) {
        if let Ok(slots) = self.slots.lock()
            && let Some(Slot::Routed(tx)) = slots.get(&p.progress_token)
        {
            let _ = tx.send(p.clone());
        }
    }

    /// Claim `token` for a call: its progress (including any that already arrived) goes to the receiver.
    pub fn route(
        &self,
        token: &ProgressToken,
    ) -> mpsc::UnboundedReceiver<ProgressNotificationParam> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(Slot::Pending(early)) = slots.remove(token) {
                for p in early {
                    let _ = tx.send(p);
                }
            }
            slots.insert(token.clone(), Slot::Routed(tx));
        }
        rx
    }

    /// The call ended: later progress for its token is dropped (the spec forbids sending it on).
    pub fn unroute(&self, token: &ProgressToken) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(token);
        }
    }
}

/// A transport wrapper that routes progress notifications as they are received.
///
/// It also receives what the lane (see [`super::lane`]) read on its own HTTP streams that is not
/// its response (logs, server-to-client requests): those reach rmcp here as if its transport had
/// read them.
pub struct ProgressTap<T> {
    inner: T,
    router: Arc<ProgressRouter>,
    injected: Option<mpsc::Receiver<RxJsonRpcMessage<RoleClient>>>,
}

impl<T> ProgressTap<T> {
    pub fn new(inner: T, router: Arc<ProgressRouter>) -> Self {
        Self {
            inner,
            router,
            injected: None,
        }
    }

    /// Also receive the messages sent on `injected`.
    pub fn with_injection(
        mut self,
        injected: mpsc::Receiver<RxJsonRpcMessage<RoleClient>>,
    ) -> Self {
        self.injected = Some(injected);
        self
    }
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for ProgressTap<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        // Both are cancel-safe (channel receives), as rmcp's loop requires of `receive`.
        let mut msg = match &mut self.injected {
            Some(injected) => tokio::select! {
                m = self.inner.receive() => m,
                Some(m) = injected.recv() => Some(m),
            },
            None => self.inner.receive().await,
        };
        if let Some(m) = &mut msg {
            super::raw::unmark(m);
        }
        if let Some(JsonRpcMessage::Notification(n)) = &msg
            && let ServerNotification::ProgressNotification(p) = &n.notification
        {
            self.router.deliver(&p.params);
        }
        // Passed on as well: rmcp uses it to restart the request's timeout.
        msg
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(token: &str, progress: f64) -> ProgressNotificationParam {
        ProgressNotificationParam::new(
            ProgressToken(rmcp::model::NumberOrString::String(token.into())),
            progress,
        )
    }

    #[test]
    fn early_progress_is_kept_for_the_call_and_late_progress_dropped() {
        let r = ProgressRouter::default();
        r.deliver(&p("a", 1.0));
        let mut rx = r.route(&p("a", 0.0).progress_token);
        r.deliver(&p("a", 2.0));
        assert_eq!(rx.try_recv().map(|x| x.progress).ok(), Some(1.0));
        assert_eq!(rx.try_recv().map(|x| x.progress).ok(), Some(2.0));
        r.unroute(&p("a", 0.0).progress_token);
        r.deliver(&p("a", 3.0));
        assert!(rx.try_recv().is_err(), "nothing after the call ended");
    }

    #[test]
    fn unclaimed_progress_is_bounded() {
        let r = ProgressRouter::default();
        for i in 0..(MAX_PENDING_TOKENS * 3) {
            r.deliver(&p(&i.to_string(), 1.0));
        }
        assert!(r.slots.lock().map(|s| s.len()).unwrap_or(0) <= MAX_PENDING_TOKENS);
    }
}
