//! What an upstream is doing, for `GET /status` and `mcp-broker status`: its state, why it last
//! failed and when, when it tries again, what it lists.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::Upstream;

/// An upstream's state, as an operator asks about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The first connection attempt has not ended yet.
    Connecting,
    /// Connected.
    Ready,
    /// Down, waiting before the next attempt (`next_retry_ms`).
    BackingOff,
    /// Down for good until the configuration is reloaded or the broker restarted (a missing
    /// executable): `last_error` says why.
    Failed,
    /// Per caller or per session: connections open on demand (`connections` says how many).
    OnDemand,
}

/// One upstream's status.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub transport: &'static str,
    pub state: Phase,
    /// Why it last failed or disconnected, and when (RFC 3339).
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// Connections made after the first (reconnects, child restarts).
    pub restarts: u64,
    /// Connection attempts that failed (a server that never connected, or crash-loops).
    pub failed_attempts: u64,
    /// Milliseconds until the next attempt, while backing off.
    pub next_retry_ms: Option<u64>,
    pub tools: usize,
    pub prompts: usize,
    pub resources: usize,
    /// Open connections (stdio: child processes): the shared one, or one per caller or session.
    pub connections: usize,
    /// Calls waiting for this server's answer now.
    pub calls_in_flight: usize,
}

impl Upstream {
    pub(super) fn set_next_retry(&self, at: Option<Instant>) {
        if let Ok(mut n) = self.next_retry.lock() {
            *n = at;
        }
    }

    fn calls_in_flight(&self) -> usize {
        let active = |c: &super::Connection| c.active.load(Ordering::Relaxed);
        self.connection().map_or(0, |c| active(&c))
            + self
                .legacy
                .read()
                .ok()
                .and_then(|l| l.as_ref().map(|c| active(c)))
                .unwrap_or(0)
            + self
                .subjects
                .iter()
                .map(|e| active(&e.value().conn))
                .sum::<usize>()
    }

    /// Its status now.
    pub fn status(&self) -> ServerStatus {
        let listing = self.listing();
        let next = self.next_retry.lock().ok().and_then(|n| *n);
        let state = if self.per_caller {
            Phase::OnDemand
        } else if self.failed() {
            Phase::Failed
        } else if self.is_up() {
            Phase::Ready
        } else if next.is_some() {
            Phase::BackingOff
        } else {
            Phase::Connecting
        };
        ServerStatus {
            name: self.name.to_string(),
            transport: self.config.transport.kind(),
            state,
            last_error: self.last_error(),
            last_error_at: self.last_error_at.lock().ok().and_then(|t| *t).map(rfc3339),
            restarts: self.reconnects.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            next_retry_ms: next.map(|t| {
                u64::try_from(t.saturating_duration_since(Instant::now()).as_millis())
                    .unwrap_or(u64::MAX)
            }),
            tools: listing.as_ref().map_or(0, |l| l.tools.len()),
            prompts: listing.as_ref().map_or(0, |l| l.prompts.len()),
            resources: listing.as_ref().map_or(0, |l| l.resources.len()),
            connections: self.open_connections(),
            calls_in_flight: self.calls_in_flight(),
        }
    }
}

/// RFC 3339 UTC, as audit records write time.
fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    crate::audit::format_rfc3339(
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        d.subsec_millis(),
    )
}
