//! Suite 4: many concurrent idle sessions. The broker in front of 10 stdio ledgers (no `[auth]`)
//! gets N Streamable HTTP sessions opened (`initialize` + `notifications/initialized`, nothing
//! else) and kept open; its RSS before and after tells what an idle session holds, against the
//! target of 10,000 sessions in under 300 MB.
//!
//! The sessions share one pooled HTTP client, so a few keep-alive connections carry them all: a
//! session is the broker's state, not a TCP connection, and 10,000 sockets would measure the
//! kernel and the connection cap (`[broker] max_connections`) instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{self, Layers};
use crate::mcp::{self, HttpSession};
use crate::procs;
use crate::targets::{self, Env};

/// The target: 10,000 idle sessions in under 300 MB (10^6 bytes) of broker RSS.
pub const TARGET_SESSIONS: usize = 10_000;
pub const TARGET_KIB: u64 = 300_000_000 / 1024;
/// Sessions the bench itself opens before the measured ones (readiness polling), left as slack
/// under the broker's session caps.
const SLACK: usize = 16;

pub struct Settings {
    pub sessions: usize,
    pub upstreams: usize,
    /// Sessions being opened at once (and so, at most, connections in the shared pool).
    pub open_concurrency: usize,
}

#[derive(Serialize)]
pub struct IdleSessions {
    pub upstreams: usize,
    /// Sessions opened and held open when `rss_after_kib` was read.
    pub sessions: usize,
    /// Wall time to open them all, `open_concurrency` at a time.
    pub open_seconds: f64,
    pub open_concurrency: usize,
    /// Broker `VmRSS` once every upstream is listed, before any measured session.
    pub rss_before_kib: u64,
    /// With every session open and idle.
    pub rss_after_kib: u64,
    /// After every session was closed (`DELETE`): what the broker gives back.
    pub rss_closed_kib: Option<u64>,
    pub per_session_kib: f64,
    /// RSS at 10,000 sessions: measured when `sessions` ≥ 10,000, else projected from
    /// `rss_before_kib` + 10,000 × `per_session_kib`.
    pub at_target_kib: f64,
    pub at_target_measured: bool,
    pub target_kib: u64,
    pub under_target: bool,
}

pub async fn run(env: &Env, settings: &Settings) -> Result<IdleSessions, String> {
    let n = settings.upstreams;
    eprintln!(
        "== idle sessions: {} sessions on the broker with {n} stdio upstreams",
        settings.sessions
    );
    let (names, servers) = config::ledgers(&env.paths.ledger, n);
    let tag = "idle-sessions";
    let caps = settings.sessions + SLACK;
    let toml = config::render_with(Layers::Off, &servers, &env.idp, Some(caps));
    let path = config::write(&env.paths.out_dir, tag, &toml)?;
    let (broker, url) = procs::start_broker(&env.paths, tag, &path).await?;
    let result = async {
        targets::wait_listed(&url, None, &names).await?;
        // Let start-up allocations settle (the catalog, the upstreams' first lists).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let pid = broker.pid();
        let before = procs::rss_kib(pid).ok_or("cannot read the broker's RSS")?;
        let started = Instant::now();
        let sessions = open_all(&url, settings).await?;
        let open_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = procs::rss_kib(pid).ok_or("cannot read the broker's RSS")?;
        let count = sessions.len();
        eprintln!("   {count} sessions opened in {open_seconds:.1} s: RSS {before} → {after} KiB");
        close_all(sessions, settings.open_concurrency).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let closed = procs::rss_kib(pid);
        let per_session_kib = (after as f64 - before as f64) / count.max(1) as f64;
        let at_target_measured = count >= TARGET_SESSIONS;
        let at_target_kib = if at_target_measured {
            after as f64
        } else {
            before as f64 + per_session_kib * TARGET_SESSIONS as f64
        };
        Ok(IdleSessions {
            upstreams: n,
            sessions: count,
            open_seconds,
            open_concurrency: settings.open_concurrency,
            rss_before_kib: before,
            rss_after_kib: after,
            rss_closed_kib: closed,
            per_session_kib,
            at_target_kib,
            at_target_measured,
            target_kib: TARGET_KIB,
            under_target: at_target_kib < TARGET_KIB as f64,
        })
    }
    .await;
    broker.stop().await;
    result
}

/// Open `settings.sessions` sessions, `open_concurrency` at a time over one shared client; the
/// first failure stops the lot.
async fn open_all(url: &str, settings: &Settings) -> Result<Vec<HttpSession>, String> {
    let http = mcp::http_client()?;
    let left = Arc::new(AtomicUsize::new(settings.sessions));
    let workers: Vec<_> = (0..settings.open_concurrency.max(1))
        .map(|_| {
            let (http, url, left) = (http.clone(), url.to_owned(), left.clone());
            tokio::spawn(async move {
                let mut opened = Vec::new();
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    match HttpSession::open_with(http.clone(), &url, None).await {
                        Ok(s) => opened.push(s),
                        Err(e) => {
                            // The others stop at their next session.
                            left.store(0, Ordering::Relaxed);
                            return (opened, Some(e));
                        }
                    }
                }
                (opened, None)
            })
        })
        .collect();
    let mut sessions = Vec::with_capacity(settings.sessions);
    let mut failure = None;
    for worker in workers {
        let (opened, err) = worker
            .await
            .map_err(|e| format!("a session opener failed: {e}"))?;
        sessions.extend(opened);
        failure = failure.or(err);
    }
    match failure {
        Some(e) => {
            let opened = sessions.len();
            close_all(sessions, settings.open_concurrency).await;
            Err(format!("after {opened} sessions: {e}"))
        }
        None => Ok(sessions),
    }
}

/// `DELETE` every session, `concurrency` at a time.
async fn close_all(sessions: Vec<HttpSession>, concurrency: usize) {
    use futures::StreamExt;
    futures::stream::iter(sessions)
        .for_each_concurrent(concurrency.max(1), HttpSession::close)
        .await;
}
