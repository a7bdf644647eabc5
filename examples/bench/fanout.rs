//! Suite 3: the broker in front of N stdio ledgers. Per N (and with the layers off and with
//! auth+policy on): start-up time from spawn until every upstream's tools are listed, idle RSS,
//! `tools/list` cold (the first list of a fresh session after ready) and warm (repeated on one
//! session). With 10 upstreams and no auth, also RSS per open client session. For reference, the
//! same lists directly against one ledger over HTTP.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{self, Layers};
use crate::load::{ms, percentile_ms};
use crate::mcp::{HttpSession, Session};
use crate::procs;
use crate::targets::{self, Env};

pub struct Settings {
    pub upstream_counts: Vec<usize>,
    /// Fresh sessions whose first list is timed (cold).
    pub cold_lists: usize,
    /// Lists timed on one session after its first (warm).
    pub warm_lists: usize,
    /// Sessions opened for the per-session RSS figure.
    pub sessions: usize,
    /// The upstream count at which per-session RSS is taken (idle RSS is taken at every count).
    pub rss_upstreams: usize,
}

#[derive(Serialize)]
pub struct ListLatency {
    /// First list of each fresh session, in order (the first is right after ready).
    pub cold_ms: Vec<f64>,
    pub cold_median_ms: f64,
    pub warm_p50_ms: f64,
    pub warm_p90_ms: f64,
    pub warm_p99_ms: f64,
    /// Tools in one list.
    pub tools: usize,
}

#[derive(Serialize)]
pub struct FanoutRun {
    pub upstreams: usize,
    pub layers: &'static str,
    /// Spawn of the broker until `tools/list` shows every upstream.
    pub startup_ms: f64,
    /// Broker `VmRSS` one second after ready, before any measured list.
    pub idle_rss_kib: Option<u64>,
    #[serde(flatten)]
    pub lists: ListLatency,
}

#[derive(Serialize)]
pub struct SessionRss {
    pub upstreams: usize,
    pub sessions: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub per_session_kib: f64,
}

#[derive(Serialize)]
pub struct Fanout {
    /// One ledger over HTTP, no broker: the floor a broker list is compared with.
    pub direct: Option<ListLatency>,
    pub runs: Vec<FanoutRun>,
    pub session_rss: Option<SessionRss>,
}

pub async fn run(env: &Env, settings: &Settings, notes: &mut Vec<String>) -> Fanout {
    let mut fanout = Fanout {
        direct: None,
        runs: Vec::new(),
        session_rss: None,
    };
    if !settings.upstream_counts.contains(&settings.rss_upstreams) {
        crate::calls::note(
            notes,
            format!(
                "per-session RSS is taken with {} upstreams, which --upstreams leaves out",
                settings.rss_upstreams
            ),
        );
    }
    eprintln!("== tools/list: one ledger directly");
    match direct(env, settings).await {
        Ok(lists) => fanout.direct = Some(lists),
        Err(e) => crate::calls::note(notes, format!("direct tools/list: {e}")),
    }
    for layers in [Layers::Off, Layers::AuthPolicy] {
        for &n in &settings.upstream_counts {
            eprintln!(
                "== tools/list: broker ({}) with {n} stdio upstreams",
                layers_label(layers)
            );
            match broker(env, settings, layers, n, &mut fanout.session_rss).await {
                Ok(run) => {
                    eprintln!(
                        "   ready in {:.0} ms, idle RSS {} KiB, cold {:.2} ms, warm p50 {:.2} ms",
                        run.startup_ms,
                        run.idle_rss_kib.unwrap_or(0),
                        run.lists.cold_median_ms,
                        run.lists.warm_p50_ms
                    );
                    fanout.runs.push(run);
                }
                Err(e) => crate::calls::note(notes, format!("tools/list with {n} upstreams: {e}")),
            }
        }
    }
    fanout
}

pub fn layers_label(layers: Layers) -> &'static str {
    match layers {
        Layers::Off => "off",
        Layers::AuthPolicy => "auth+policy",
        Layers::AuthPolicyExchange => "auth+policy+exchange",
    }
}

async fn direct(env: &Env, settings: &Settings) -> Result<ListLatency, String> {
    let (ledger, url) = procs::start_ledger_http(&env.paths, "lists-direct").await?;
    let lists = time_lists(&url, None, settings).await;
    ledger.stop().await;
    lists
}

async fn broker(
    env: &Env,
    settings: &Settings,
    layers: Layers,
    n: usize,
    session_rss: &mut Option<SessionRss>,
) -> Result<FanoutRun, String> {
    let (names, servers) = config::ledgers(&env.paths.ledger, n);
    let tag = format!("lists-{n}-{}", layers_label(layers).replace('+', "-"));
    let path = config::write(
        &env.paths.out_dir,
        &tag,
        &config::render(layers, &servers, &env.idp),
    )?;
    let token = layers.authenticates().then_some(env.token.as_str());

    let spawned = Instant::now();
    let (broker, url) = procs::start_broker(&env.paths, &tag, &path).await?;
    let ready = targets::wait_listed(&url, token, &names).await;
    let startup = spawned.elapsed();
    if let Err(e) = ready {
        broker.stop().await;
        return Err(e);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_rss_kib = broker.rss_kib();
    let lists = time_lists(&url, token, settings).await;
    if layers == Layers::Off && n == settings.rss_upstreams {
        match rss_per_session(&url, broker.pid(), settings.sessions, n).await {
            Ok(rss) => *session_rss = Some(rss),
            Err(e) => eprintln!("   per-session RSS: {e}"),
        }
    }
    broker.stop().await;
    Ok(FanoutRun {
        upstreams: n,
        layers: layers_label(layers),
        startup_ms: ms(&startup),
        idle_rss_kib,
        lists: lists?,
    })
}

/// Cold: the first list of each of `cold_lists` fresh sessions. Warm: `warm_lists` more on the
/// last of them.
async fn time_lists(
    url: &str,
    token: Option<&str>,
    settings: &Settings,
) -> Result<ListLatency, String> {
    let mut cold = Vec::new();
    let mut session = None;
    let mut tools = 0;
    for _ in 0..settings.cold_lists.max(1) {
        if let Some(old) = session.take() {
            Session::close(old).await;
        }
        let mut fresh = Session::Http(HttpSession::open(url, token).await?);
        let sent = Instant::now();
        tools = fresh.list_tools().await?.len();
        cold.push(sent.elapsed());
        session = Some(fresh);
    }
    let mut session = session.expect("at least one cold list ran");
    let mut warm = Vec::with_capacity(settings.warm_lists);
    for _ in 0..settings.warm_lists {
        let sent = Instant::now();
        session.list_tools().await?;
        warm.push(sent.elapsed());
    }
    session.close().await;
    let cold_ms: Vec<f64> = cold.iter().map(ms).collect();
    cold.sort_unstable();
    warm.sort_unstable();
    Ok(ListLatency {
        cold_ms,
        cold_median_ms: percentile_ms(&cold, 0.5),
        warm_p50_ms: percentile_ms(&warm, 0.5),
        warm_p90_ms: percentile_ms(&warm, 0.9),
        warm_p99_ms: percentile_ms(&warm, 0.99),
        tools,
    })
}

/// Open `count` sessions (initialize + initialized, nothing else) and see what the broker's RSS
/// grew by.
async fn rss_per_session(
    url: &str,
    pid: u32,
    count: usize,
    upstreams: usize,
) -> Result<SessionRss, String> {
    let before = procs::rss_kib(pid).ok_or("cannot read the broker's RSS")?;
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        sessions.push(HttpSession::open(url, None).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = procs::rss_kib(pid).ok_or("cannot read the broker's RSS")?;
    for s in sessions {
        Session::Http(s).close().await;
    }
    eprintln!("   {count} sessions: RSS {before} → {after} KiB");
    Ok(SessionRss {
        upstreams,
        sessions: count,
        rss_before_kib: before,
        rss_after_kib: after,
        per_session_kib: (after as f64 - before as f64) / count.max(1) as f64,
    })
}
