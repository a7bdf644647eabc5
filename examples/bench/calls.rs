//! Suite 1 and 2: `tools/call` latency and throughput at fixed concurrency, for every front in
//! front of the ledger over each transport. Every front gets fresh processes; every cell opens
//! its own sessions (one per worker), warms up, then measures.

use std::time::Duration;

use serde::Serialize;

use crate::load::{self, Stats, Stop};
use crate::procs;
use crate::targets::{self, Env, Front, Target, Transport};

/// How long each cell runs.
#[derive(Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    Seconds(f64),
    Calls(u64),
}

pub struct Settings {
    pub fronts: Vec<Front>,
    pub transports: Vec<Transport>,
    pub concurrency: Vec<usize>,
    pub warmup: Duration,
    pub measure: Measure,
    /// A timed broker cell runs on until it has made at least this many calls, so the broker's
    /// CPU per call is read over enough of them (see [`measure`]).
    pub cpu_calls: u64,
}

/// One (upstream transport, front, concurrency) measurement.
#[derive(Clone, Serialize)]
pub struct Cell {
    pub upstream: &'static str,
    pub front: &'static str,
    pub concurrency: usize,
    #[serde(flatten)]
    pub stats: Stats,
    /// CPU time of the process the client talks to (ledger, broker or peer), per successful call:
    /// its utime + stime (what `getrusage` reports for it) over the measured calls (`calls`).
    pub server_cpu_us_per_call: Option<f64>,
    /// CPU time of the load generator (this process) per successful call: when it nears
    /// `1e6 / rps * client threads`, the generator is the bottleneck.
    pub client_cpu_us_per_call: Option<f64>,
}

/// Run every cell; fronts that cannot run are noted and skipped.
pub async fn run(env: &Env, settings: &Settings, notes: &mut Vec<String>) -> Vec<Cell> {
    let mut cells = Vec::new();
    for &transport in &settings.transports {
        for &front in &settings.fronts {
            if front.is_peer() && transport == Transport::Http {
                continue;
            }
            if let Some(why) = targets::peer_missing(&env.paths, front) {
                note(notes, format!("skipped {}: {why}", front.label()));
                continue;
            }
            let tag = format!(
                "calls-{}-{}",
                transport.label(),
                front.label().replace('+', "-")
            );
            eprintln!(
                "== tools/call: {} over {}",
                front.label(),
                transport.label()
            );
            let target = match targets::start(env, front, transport, &tag).await {
                Ok(t) => t,
                Err(e) => {
                    note(
                        notes,
                        format!(
                            "{} over {} did not start: {e}",
                            front.label(),
                            transport.label()
                        ),
                    );
                    continue;
                }
            };
            for &concurrency in &settings.concurrency {
                match measure(&target, front, concurrency, settings).await {
                    Ok((stats, cpu)) => {
                        let cell = Cell {
                            upstream: transport.label(),
                            front: front.label(),
                            concurrency,
                            server_cpu_us_per_call: cpu.server,
                            client_cpu_us_per_call: cpu.client,
                            stats,
                        };
                        progress(&cell);
                        cells.push(cell);
                    }
                    Err(e) => note(
                        notes,
                        format!(
                            "{} over {} at concurrency {concurrency}: {e}",
                            front.label(),
                            transport.label()
                        ),
                    ),
                }
            }
            target.stop().await;
        }
    }
    cells
}

/// Record a note and show it at once.
pub fn note(notes: &mut Vec<String>, text: String) {
    eprintln!("   note: {text}");
    notes.push(text);
}

/// CPU time per successful call, in microseconds.
struct CpuPerCall {
    server: Option<f64>,
    client: Option<f64>,
}

/// Open `concurrency` sessions, warm up, measure.
///
/// CPU time comes from `/proc/PID/stat` (utime + stime, the process's own rusage) in clock ticks
/// of 10 ms: over 10,000 calls that is 1 µs per call, over the 1,500 calls a 1-in-flight cell may
/// make in 3 s it is 7 µs. So a timed broker cell runs on past its duration until it has made
/// `cpu_calls` calls (only broker cells: the CPU target is the broker's, and the peers are slow
/// enough that a call count would stretch their cells into minutes).
async fn measure(
    target: &Target,
    front: Front,
    concurrency: usize,
    settings: &Settings,
) -> Result<(Stats, CpuPerCall), String> {
    let mut sessions = target.sessions(concurrency).await?;
    if !settings.warmup.is_zero() {
        sessions = load::phase(sessions, &target.call, Stop::after(settings.warmup))
            .await
            .0;
    }
    let me = std::process::id();
    let before = (procs::cpu_time(target.server_pid), procs::cpu_time(me));
    let stop = match settings.measure {
        Measure::Seconds(s) if front.layers().is_some() => {
            Stop::after_at_least(Duration::from_secs_f64(s), settings.cpu_calls)
        }
        Measure::Seconds(s) => Stop::after(Duration::from_secs_f64(s)),
        Measure::Calls(n) => Stop::calls(n),
    };
    let (sessions, sample) = load::phase(sessions, &target.call, stop).await;
    let after = (procs::cpu_time(target.server_pid), procs::cpu_time(me));
    for session in sessions {
        session.close().await;
    }
    let stats = sample.stats();
    let per_call = |b: Option<Duration>, a: Option<Duration>| match (b, a) {
        (Some(b), Some(a)) if stats.calls > 0 => {
            Some(a.saturating_sub(b).as_secs_f64() * 1e6 / stats.calls as f64)
        }
        _ => None,
    };
    let cpu = CpuPerCall {
        server: per_call(before.0, after.0),
        client: per_call(before.1, after.1),
    };
    Ok((stats, cpu))
}

fn progress(cell: &Cell) {
    let s = &cell.stats;
    let errors = match &s.first_error {
        Some(e) => format!(", {} errors (first: {e})", s.errors),
        None => String::new(),
    };
    eprintln!(
        "   c={:<3} {:>8.0} calls/s  p50 {:.3} ms  p99 {:.3} ms{errors}",
        cell.concurrency, s.rps, s.p50_ms, s.p99_ms
    );
}
