//! `bench`: what a hop through `mcp-broker` costs, measured against the same upstream without it.
//!
//! Run it with `scripts/bench.sh` (release build, peer gateways installed); `--help` lists the
//! knobs. Nothing is asserted: the figures are printed as tables and written as JSON
//! (`target/bench/results.json` by default), with the machine's core count, the rmcp version, the
//! git commit and a timestamp.
//!
//! # What is measured
//!
//! The upstream is the example `ledger` (`examples/ledger.rs`), fast and deterministic; the
//! workload is `tools/call get_account {"account_id": "ACC-1001"}` (a small JSON result, no
//! progress), and a call counts only when its result is not `isError` and names the account.
//!
//! 1. **tools/call** latency (p50/p90/p99) and throughput at concurrency 1, 8 and 64, with the
//!    ledger reached over Streamable HTTP and over stdio, for each front:
//!    - `direct`: the ledger itself. Over stdio the bench speaks newline-delimited JSON-RPC to a
//!      ledger child, concurrency = requests in flight on that one connection.
//!    - `broker`: the broker without `[auth]`.
//!    - `broker+auth`: `[auth]` with a JWT from the bench's own IdP (an Ed25519 key, JWKS served
//!      from this process) and three `[[policy]]` rules the call is checked against.
//!    - `broker+auth+exchange`: as above, and the upstream gets an RFC 8693 token exchanged at
//!      the bench's own token endpoint, cached by the broker (so the broker keeps one upstream
//!      connection for the bench's one caller).
//!    - `mcp-proxy` (PyPI 0.13.0) and `supergateway` (npm 4.0.0, stateful) in front of the ledger
//!      over stdio, when installed under `target/bench-peers/`.
//!
//!    Overhead is reported against `direct` over the same transport at the same concurrency, as a
//!    difference and a ratio, with the CPU time the front process spent per call.
//! 2. **tools/list** through the broker in front of 1, 10 and 50 stdio ledgers: start-up time
//!    (spawn until every upstream's tools are listed), idle RSS, the first list of a fresh session
//!    (cold) and repeated lists (warm), against one ledger listed directly.
//! 3. **Memory**: broker RSS per open client session (100 sessions, 10 upstreams), and RSS before
//!    and after 100,000 calls with every layer on.
//! 4. **Idle sessions**: 10,000 sessions (`--idle-sessions`) held open at once over one pooled
//!    client, 10 upstreams: RSS before, with them open and after closing them, KiB per session,
//!    and RSS at 10,000 against the target of under 300 MB (`examples/bench/idle.rs`).
//! 5. **`[cluster]`** (`examples/bench/cluster.rs`): one `redis-server`, the ledger over stdio, no
//!    `[auth]`, tools/call at the same concurrency levels through `broker` (one instance without
//!    `[cluster]`, the baseline), `broker+cluster` (one instance with it: the difference is what
//!    the Redis lookups cost per call), `broker+cluster+limits` (plus a per-server `rate_limit`
//!    that never refuses and `max_concurrent`: a Lua token bucket and a lease in Redis per call),
//!    and HAProxy running `examples/cluster/haproxy.cfg` (round robin, `option
//!    http-server-close`) in front of one and of three `[cluster]` instances, and in front of three
//!    without `http-server-close` (`keep-alive`). Besides latency, throughput and CPU per call
//!    (summed over the instances; Redis's and HAProxy's apart), Redis commands per call from
//!    `INFO commandstats`, heartbeats left out. Skipped with a note when `redis-server` or
//!    `haproxy` is not on `PATH`; `--cluster-only` runs only this suite, `--no-cluster` leaves it
//!    out. On a small machine the three instances share the cores with HAProxy, Redis and the
//!    load generator: that row shows the cost of spreading calls, not three machines' capacity.
//!
//! The front's CPU per call is its utime + stime over the cell; a timed broker cell runs on until
//! it has made `--cpu-calls` (10,000) calls, so the 10 ms ticks it is counted in resolve 1 µs.
//! `--profile [CELL]` measures one cell under `perf record` instead (`examples/bench/profile.rs`).
//!
//! # How
//!
//! Closed-loop workers, each with its own Streamable HTTP session and its own pooled reqwest
//! client (`TCP_NODELAY`), so concurrency = calls in flight; every request has its own id; replies
//! may be JSON or an event stream. Each cell starts with a warm-up; then a fixed duration or a
//! fixed number of calls. Latency runs from sending a request to having read its complete reply.
//! The load generator runs on one tokio thread by default (`--client-threads`), so on a small
//! machine it leaves the other cores to the processes under test; everything shares the machine,
//! so on 2 cores absolute figures include the generator's own cost on both sides of a comparison.
//! Every process the bench starts runs in its own process group and is stopped at the end (or
//! killed on error or ctrl-c); logs go to `target/bench/logs/`.
//!
//! The modules live in `examples/bench/` (a crate root's `mod` looks beside it, hence `#[path]`).

#[path = "bench/calls.rs"]
mod calls;
#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/config.rs"]
mod config;
#[path = "bench/fanout.rs"]
mod fanout;
#[path = "bench/idle.rs"]
mod idle;
#[path = "bench/idp.rs"]
mod idp;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/mcp.rs"]
mod mcp;
#[path = "bench/procs.rs"]
mod procs;
#[path = "bench/profile.rs"]
mod profile;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/soak.rs"]
mod soak;
#[path = "bench/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;
use targets::{Front, Transport};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Measure mcp-broker against the ledger directly and against peer gateways",
    args_override_self = true
)]
struct Args {
    /// A short smoke run: 0.5 s cells after 0.2 s warm-up, fewer lists, 10,000 soak calls,
    /// 2,000 idle sessions.
    #[arg(long)]
    quick: bool,
    /// Seconds each cell measures [default: 3, --quick 0.5].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Seconds of warm-up before each cell [default: 1, --quick 0.2].
    #[arg(long, value_name = "SECS")]
    warmup: Option<f64>,
    /// Measure a fixed number of calls per cell instead of a duration.
    #[arg(long, value_name = "N")]
    calls: Option<u64>,
    /// A timed broker cell runs on until it has made at least this many calls, so the broker's
    /// CPU per call is taken over them [default: 10000, --quick 0].
    #[arg(long, value_name = "N")]
    cpu_calls: Option<u64>,
    /// Concurrency levels (calls in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Fronts to measure tools/call through [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    fronts: Vec<Front>,
    /// How the ledger is reached [default: both].
    #[arg(long, value_delimiter = ',', value_enum)]
    transports: Vec<Transport>,
    /// Upstream counts for the tools/list suite.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    upstreams: Vec<usize>,
    /// Client sessions opened for the per-session RSS figure.
    #[arg(long, default_value_t = 100)]
    sessions: usize,
    /// Calls in the memory-growth run [default: 100000, --quick 10000].
    #[arg(long, value_name = "N")]
    soak_calls: Option<u64>,
    /// Concurrency of the memory-growth run.
    #[arg(long, default_value_t = 8)]
    soak_concurrency: usize,
    /// Idle sessions held open at once for the session-memory row [default: 10000, --quick 2000].
    #[arg(long, value_name = "N")]
    idle_sessions: Option<usize>,
    /// Only profile one calls cell, FRONT:TRANSPORT:CONCURRENCY, with `perf record` (DWARF call
    /// graphs) and print the top symbols by self and cumulative time (also written to
    /// <target dir>/bench/profile.txt); every other suite is skipped.
    #[arg(long, value_name = "CELL", num_args = 0..=1, default_missing_value = profile::DEFAULT_CELL)]
    profile: Option<String>,
    /// Seconds perf records during the profiled cell.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    profile_seconds: f64,
    /// Suites to leave out.
    #[arg(long, value_delimiter = ',', value_enum)]
    skip: Vec<Suite>,
    /// Only the [cluster] cells (one Redis, one and three instances, HAProxy); every other suite
    /// is skipped.
    #[arg(long, conflicts_with = "no_cluster")]
    cluster_only: bool,
    /// Leave out the [cluster] cells.
    #[arg(long)]
    no_cluster: bool,
    /// Where the JSON goes [default: <target dir>/bench/results.json].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The broker binary [default: beside this bench's profile directory].
    #[arg(long)]
    broker: Option<PathBuf>,
    /// The ledger example binary [default: beside this bench binary].
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Where scripts/bench.sh installed the peer gateways [default: <target dir>/bench-peers].
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// tools/call latency and throughput.
    Calls,
    /// tools/list over N upstreams, start-up time, idle RSS and RSS per session.
    Lists,
    /// RSS growth over many calls.
    Memory,
    /// RSS with many concurrent idle sessions.
    Idle,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Dropping `run` on ctrl-c drops every child process guard, which kills them.
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let paths = resolve_paths(&args)?;
    let idp = idp::Idp::start().await?;
    let token = idp.caller_token("bench-user")?;
    let env = targets::Env { paths, idp, token };
    if let Some(cell) = &args.profile {
        let spec = profile::CellSpec::parse(cell)?;
        let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(1.0));
        return profile::run(&env, &spec, warmup, args.profile_seconds).await;
    }
    let mut notes = Vec::new();
    let meta = report::Meta::collect(args.client_threads, &env.paths.broker, &env.paths.ledger);
    if meta.cores < 4 {
        eprintln!(
            "bench: {} cores: the load generator, the broker and the upstream share them; read absolute figures with that in mind",
            meta.cores
        );
    }

    let call_settings = calls::Settings {
        fronts: or_all(&args.fronts, Front::value_variants()),
        transports: or_all(&args.transports, Transport::value_variants()),
        concurrency: args.concurrency.clone(),
        warmup: Duration::from_secs_f64(args.warmup.unwrap_or(if args.quick { 0.2 } else { 1.0 })),
        measure: match args.calls {
            Some(n) => calls::Measure::Calls(n),
            None => {
                calls::Measure::Seconds(args.duration.unwrap_or(if args.quick { 0.5 } else { 3.0 }))
            }
        },
        cpu_calls: args
            .cpu_calls
            .unwrap_or(if args.quick { 0 } else { 10_000 }),
    };
    let fanout_settings = fanout::Settings {
        upstream_counts: args.upstreams.clone(),
        cold_lists: if args.quick { 3 } else { 5 },
        warm_lists: if args.quick { 20 } else { 200 },
        sessions: args.sessions,
        rss_upstreams: 10,
    };
    let soak_settings = soak::Settings {
        calls: args
            .soak_calls
            .unwrap_or(if args.quick { 10_000 } else { 100_000 }),
        concurrency: args.soak_concurrency,
    };
    let idle_settings = idle::Settings {
        sessions: args.idle_sessions.unwrap_or(if args.quick {
            2_000
        } else {
            idle::TARGET_SESSIONS
        }),
        upstreams: 10,
        open_concurrency: 8,
    };

    let skip = |suite: Suite| args.cluster_only || args.skip.contains(&suite);
    let calls = if skip(Suite::Calls) {
        Vec::new()
    } else {
        calls::run(&env, &call_settings, &mut notes).await
    };
    let fanout = if skip(Suite::Lists) {
        None
    } else {
        Some(fanout::run(&env, &fanout_settings, &mut notes).await)
    };
    let soak = if skip(Suite::Memory) {
        None
    } else {
        match soak::run(&env, &soak_settings).await {
            Ok(s) => Some(s),
            Err(e) => {
                calls::note(&mut notes, format!("memory run: {e}"));
                None
            }
        }
    };

    let idle = if skip(Suite::Idle) || idle_settings.sessions == 0 {
        None
    } else {
        match idle::run(&env, &idle_settings).await {
            Ok(i) => Some(i),
            Err(e) => {
                calls::note(&mut notes, format!("idle sessions: {e}"));
                None
            }
        }
    };

    let cluster = if args.no_cluster {
        None
    } else {
        cluster::run(&env, &call_settings, &mut notes).await
    };

    let counters = &env.idp.counters;
    let mut report = report::Report {
        meta,
        settings: json!({
            "tool": format!("{} {{\"account_id\": \"{}\"}}", targets::TOOL, targets::ACCOUNT),
            "sessions": "one Streamable HTTP session per worker (stdio direct: one connection, one id per in-flight request)",
            "warmup_seconds": call_settings.warmup.as_secs_f64(),
            "measure": call_settings.measure,
            "cpu_calls": call_settings.cpu_calls,
            "concurrency": call_settings.concurrency,
            "upstream_counts": fanout_settings.upstream_counts,
            "cold_lists": fanout_settings.cold_lists,
            "warm_lists": fanout_settings.warm_lists,
            "rss_sessions": fanout_settings.sessions,
            "soak_calls": soak_settings.calls,
            "soak_concurrency": soak_settings.concurrency,
            "idle_sessions": idle_settings.sessions,
            "quick": args.quick,
        }),
        calls,
        fanout,
        soak,
        idle,
        cluster,
        idp: json!({
            "jwks_fetches": counters.jwks_fetches.load(std::sync::atomic::Ordering::Relaxed),
            "exchanges": counters.exchanges.load(std::sync::atomic::Ordering::Relaxed),
        }),
        notes,
    };
    report.meta.loadavg_end = report::loadavg();
    report.print();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| env.paths.out_dir.join("results.json"));
    report.write_json(&out)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

fn or_all<T: Copy>(chosen: &[T], all: &[T]) -> Vec<T> {
    if chosen.is_empty() { all } else { chosen }.to_vec()
}

/// Binaries beside this one (`<target>/<profile>/examples/bench` → `<target>/<profile>/mcp-broker`
/// and `…/examples/ledger`), output under `<target>/bench/`.
fn resolve_paths(args: &Args) -> Result<procs::Paths, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this binary: {e}"))?;
    let examples = exe.parent().ok_or("this binary has no folder")?;
    let profile = examples
        .parent()
        .ok_or("this binary is not in a cargo profile folder")?;
    let target = profile
        .parent()
        .ok_or("this binary is not in a cargo target folder")?;
    let broker = args
        .broker
        .clone()
        .unwrap_or_else(|| profile.join("mcp-broker"));
    let ledger = args
        .ledger
        .clone()
        .unwrap_or_else(|| examples.join("ledger"));
    for (what, path) in [("broker", &broker), ("ledger", &ledger)] {
        if !path.is_file() {
            return Err(format!(
                "no {what} binary at {}: build with `cargo build --release --bin mcp-broker --example ledger --example bench` (scripts/bench.sh does)",
                path.display()
            ));
        }
    }
    if profile.file_name().is_some_and(|p| p != "release") {
        eprintln!(
            "bench: not a release build ({}): figures will not mean much",
            profile.display()
        );
    }
    let out_dir = target.join("bench");
    let logs = out_dir.join("logs");
    reset_dir(&logs)?;
    Ok(procs::Paths {
        broker: absolute(broker)?,
        ledger: absolute(ledger)?,
        peers: args
            .peers_dir
            .clone()
            .unwrap_or_else(|| target.join("bench-peers")),
        out_dir,
        logs,
    })
}

/// An empty `dir` (old logs would mix with this run's).
fn reset_dir(dir: &Path) -> Result<(), String> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Config files name the ledger by absolute path (the broker resolves relative ones elsewhere).
fn absolute(path: PathBuf) -> Result<PathBuf, String> {
    std::fs::canonicalize(&path).map_err(|e| format!("{}: {e}", path.display()))
}
