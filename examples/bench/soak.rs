//! Suite 3, last part: memory growth. The broker with every layer on (auth, policy, exchanged
//! upstream token) in front of a ledger over HTTP takes a warm-up, then a long run of calls; its
//! RSS before and after tells whether anything accumulates per call.

use std::time::Duration;

use serde::Serialize;

use crate::load::{self, Stats, Stop};
use crate::procs;
use crate::targets::{self, Env, Front, Transport};

pub struct Settings {
    pub calls: u64,
    pub concurrency: usize,
}

#[derive(Serialize)]
pub struct Soak {
    pub front: &'static str,
    pub upstream: &'static str,
    pub concurrency: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub growth_kib: i64,
    #[serde(flatten)]
    pub stats: Stats,
}

/// Calls before the "before" RSS is read: sessions, caches and allocator pools are warm by then.
const WARMUP_CALLS: u64 = 2_000;

pub async fn run(env: &Env, settings: &Settings) -> Result<Soak, String> {
    let front = Front::BrokerAuthExchange;
    eprintln!(
        "== memory: {} calls through {} over http",
        settings.calls,
        front.label()
    );
    let target = targets::start(env, front, Transport::Http, "soak").await?;
    let result = async {
        let sessions = target.sessions(settings.concurrency).await?;
        let (sessions, _) = load::phase(sessions, &target.call, Stop::calls(WARMUP_CALLS)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = procs::rss_kib(target.server_pid).ok_or("cannot read the broker's RSS")?;
        let (sessions, sample) =
            load::phase(sessions, &target.call, Stop::calls(settings.calls)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = procs::rss_kib(target.server_pid).ok_or("cannot read the broker's RSS")?;
        for session in sessions {
            session.close().await;
        }
        eprintln!("   RSS {before} → {after} KiB");
        Ok(Soak {
            front: front.label(),
            upstream: Transport::Http.label(),
            concurrency: settings.concurrency,
            rss_before_kib: before,
            rss_after_kib: after,
            growth_kib: after as i64 - before as i64,
            stats: sample.stats(),
        })
    }
    .await;
    target.stop().await;
    result
}
