//! The report: run metadata, the tables printed at the end, and the JSON written beside them.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::calls::Cell;
use crate::cluster::{self, ClusterRun};
use crate::fanout::Fanout;
use crate::idle::IdleSessions;
use crate::soak::Soak;

/// Where and with what the figures were taken.
#[derive(Serialize)]
pub struct Meta {
    /// UTC, RFC 3339 (from `date`; `unix_time` is authoritative).
    pub timestamp: Option<String>,
    pub unix_time: u64,
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub rmcp_version: String,
    pub broker_version: &'static str,
    pub git_commit: Option<String>,
    /// Tracked files differed from `git_commit` when the bench ran.
    pub git_dirty: Option<bool>,
    /// 1-minute load average when the run started and ended (other work on the machine shows here).
    pub loadavg_start: Option<f64>,
    pub loadavg_end: Option<f64>,
    pub load_generator_threads: usize,
    pub broker_binary: String,
    pub ledger_binary: String,
}

impl Meta {
    pub fn collect(client_threads: usize, broker: &Path, ledger: &Path) -> Self {
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let repo = env!("CARGO_MANIFEST_DIR");
        Self {
            timestamp: output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            unix_time,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            }),
            kernel: output("uname", &["-r"]),
            rmcp_version: locked_version("rmcp").unwrap_or_else(|| "unknown".into()),
            broker_version: env!("CARGO_PKG_VERSION"),
            git_commit: output("git", &["-C", repo, "rev-parse", "HEAD"]),
            git_dirty: output(
                "git",
                &["-C", repo, "status", "--porcelain", "--untracked-files=no"],
            )
            .map(|s| !s.is_empty()),
            loadavg_start: loadavg(),
            loadavg_end: None,
            load_generator_threads: client_threads,
            broker_binary: broker.display().to_string(),
            ledger_binary: ledger.display().to_string(),
        }
    }
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The version of `package` in the Cargo.lock the bench was built with.
fn locked_version(package: &str) -> Option<String> {
    let lock = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"));
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    lines.find(|l| *l == name_line)?;
    lines
        .next()?
        .strip_prefix("version = ")
        .map(|v| v.trim_matches('"').to_owned())
}

/// A command's trimmed stdout, if it ran and succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[derive(Serialize)]
pub struct Report {
    pub meta: Meta,
    pub settings: serde_json::Value,
    pub calls: Vec<Cell>,
    pub fanout: Option<Fanout>,
    pub soak: Option<Soak>,
    pub idle: Option<IdleSessions>,
    pub cluster: Option<ClusterRun>,
    /// Requests the bench IdP served: JWKS fetches by the broker, token exchanges.
    pub idp: serde_json::Value,
    /// Skipped or failed parts, with the reason.
    pub notes: Vec<String>,
}

impl Report {
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let json = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, json + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn print(&self) {
        let m = &self.meta;
        println!();
        println!(
            "mcp-broker {} · rmcp {} · commit {}{} · {} cores · load avg {} → {} · {}",
            m.broker_version,
            m.rmcp_version,
            m.git_commit
                .as_deref()
                .map_or("unknown", |c| &c[..c.len().min(12)]),
            if m.git_dirty == Some(true) {
                " (dirty)"
            } else {
                ""
            },
            m.cores,
            fmt_opt(m.loadavg_start),
            fmt_opt(m.loadavg_end),
            m.timestamp.as_deref().unwrap_or("")
        );
        if !self.calls.is_empty() {
            print_calls(&self.calls);
        }
        if let Some(f) = &self.fanout {
            print_fanout(f);
        }
        if let Some(s) = &self.soak {
            print_soak(s);
        }
        if let Some(i) = &self.idle {
            print_idle(i);
        }
        if let Some(c) = &self.cluster {
            print_cluster(c, m.cores);
        }
        println!(
            "\nbench IdP: {} JWKS fetches, {} token exchanges",
            self.idp["jwks_fetches"], self.idp["exchanges"]
        );
        for note in &self.notes {
            println!("note: {note}");
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.2}"))
}

fn print_calls(cells: &[Cell]) {
    println!(
        "\ntools/call ledger get_account {{account_id: ACC-1001}}; one session per worker; overhead vs `direct` over the same upstream transport at the same concurrency"
    );
    println!(
        "{:<8} {:<21} {:>4} {:>7} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7} {:>6}",
        "upstream",
        "front",
        "conc",
        "calls",
        "calls/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "p50 x",
        "rps x",
        "srv us",
        "gen us",
        "errors"
    );
    for cell in cells {
        let s = &cell.stats;
        let direct = cells.iter().find(|d| {
            d.front == "direct" && d.upstream == cell.upstream && d.concurrency == cell.concurrency
        });
        let vs = |f: &dyn Fn(&Cell) -> String| match direct {
            Some(d) if cell.front != "direct" => f(d),
            _ => "-".to_owned(),
        };
        println!(
            "{:<8} {:<21} {:>4} {:>7} {:>9.0} {:>7.3} {:>7.3} {:>7.3} {:>8} {:>8} {:>6} {:>6} {:>7} {:>7} {:>6}",
            cell.upstream,
            cell.front,
            cell.concurrency,
            s.calls,
            s.rps,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            vs(&|d| format!("{:+.3}", s.p50_ms - d.stats.p50_ms)),
            vs(&|d| format!("{:+.3}", s.p99_ms - d.stats.p99_ms)),
            vs(&|d| ratio(s.p50_ms, d.stats.p50_ms)),
            vs(&|d| ratio(s.rps, d.stats.rps)),
            micros(cell.server_cpu_us_per_call),
            micros(cell.client_cpu_us_per_call),
            s.errors
        );
    }
    println!(
        "calls: successful calls measured (timed broker cells run on to at least --cpu-calls); +p50/+p99: added latency vs direct; p50 x / rps x: ratios vs direct; srv us: CPU time (utime + stime from /proc, 10 ms ticks) per call over those calls, of the process the client talks to (ledger, broker or peer; the broker's upstream not included); gen us: the load generator's CPU time per call"
    );
}

/// The calls table alone (the profile run prints its one cell with it).
pub fn print_cells(cells: &[Cell]) {
    print_calls(cells);
}

fn micros(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "?".into()
    }
}

fn print_fanout(f: &Fanout) {
    println!(
        "\ntools/list through the broker in front of N stdio ledgers (cold = first list of a fresh session after ready, median of the cold runs; warm = repeated on one session)"
    );
    println!(
        "{:<26} {:>3} {:>5} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "setup",
        "N",
        "tools",
        "ready ms",
        "idle RSS",
        "cold ms",
        "warm p50",
        "warm p90",
        "warm p99"
    );
    if let Some(d) = &f.direct {
        println!(
            "{:<26} {:>3} {:>5} {:>9} {:>9} {:>8.3} {:>9.3} {:>9.3} {:>9.3}",
            "direct (one ledger, http)",
            1,
            d.tools,
            "-",
            "-",
            d.cold_median_ms,
            d.warm_p50_ms,
            d.warm_p90_ms,
            d.warm_p99_ms
        );
    }
    for r in &f.runs {
        println!(
            "{:<26} {:>3} {:>5} {:>9.0} {:>9} {:>8.3} {:>9.3} {:>9.3} {:>9.3}",
            format!("broker, layers {}", r.layers),
            r.upstreams,
            r.lists.tools,
            r.startup_ms,
            r.idle_rss_kib
                .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            r.lists.cold_median_ms,
            r.lists.warm_p50_ms,
            r.lists.warm_p90_ms,
            r.lists.warm_p99_ms
        );
    }
    if let Some(s) = &f.session_rss {
        println!(
            "RSS per open client session ({} upstreams, {} sessions): {:.1} KiB ({} → {} KiB)",
            s.upstreams, s.sessions, s.per_session_kib, s.rss_before_kib, s.rss_after_kib
        );
    }
}

fn print_soak(s: &Soak) {
    println!(
        "\nmemory: {} calls through {} over {} at concurrency {}: RSS {} → {} KiB ({:+} KiB), {:.0} calls/s, {} errors",
        s.stats.calls + s.stats.errors,
        s.front,
        s.upstream,
        s.concurrency,
        s.rss_before_kib,
        s.rss_after_kib,
        s.growth_kib,
        s.stats.rps,
        s.stats.errors
    );
}

fn print_idle(i: &IdleSessions) {
    let mib = |kib: f64| kib / 1024.0;
    println!(
        "\nidle sessions: {} open at once on the broker with {} stdio upstreams (opened {} at a time in {:.1} s over one pooled client)",
        i.sessions, i.upstreams, i.open_concurrency, i.open_seconds
    );
    println!(
        "RSS {:.1} → {:.1} MiB: {:.1} KiB per session; after closing them all {}",
        mib(i.rss_before_kib as f64),
        mib(i.rss_after_kib as f64),
        i.per_session_kib,
        i.rss_closed_kib
            .map_or("?".into(), |k| format!("{:.1} MiB", mib(k as f64)))
    );
    println!(
        "at {} sessions: {:.1} MiB ({}) against the 300 MB ({:.1} MiB) target: {}",
        crate::idle::TARGET_SESSIONS,
        mib(i.at_target_kib),
        if i.at_target_measured {
            "measured"
        } else {
            "projected from the per-session figure"
        },
        mib(i.target_kib as f64),
        if i.under_target { "under" } else { "OVER" }
    );
}

fn print_cluster(run: &ClusterRun, cores: usize) {
    println!(
        "\n[cluster] tools/call ledger get_account, ledger over stdio, no [auth], direct lane; one Redis {} (no persistence); HAProxy {}; one session per worker; +p50 and rps x vs `{}` (one instance, no [cluster]) at the same concurrency",
        run.redis_version.as_deref().unwrap_or("?"),
        run.haproxy_version.as_deref().unwrap_or("?"),
        cluster::BASELINE
    );
    println!(
        "{:<21} {:>4} {:>4} {:>7} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6} {:>9} {:>8} {:>6} {:>6} {:>7} {:>6}  commands per call",
        "setup",
        "inst",
        "conc",
        "calls",
        "calls/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "+p50 ms",
        "rps x",
        "broker us",
        "redis us",
        "hap us",
        "gen us",
        "cmd/call",
        "errors",
    );
    for cell in &run.cells {
        let s = &cell.stats;
        let base = run
            .cells
            .iter()
            .find(|b| b.setup == cluster::BASELINE && b.concurrency == cell.concurrency);
        let vs = |f: &dyn Fn(&cluster::Cell) -> String| match base {
            Some(b) if cell.setup != cluster::BASELINE => f(b),
            _ => "-".to_owned(),
        };
        let commands: Vec<String> = cell
            .redis_commands
            .iter()
            // What rounds to 0.00 is a heartbeat more or less, or a session restored late.
            .filter(|(_, n)| **n >= 0.005)
            .map(|(name, n)| format!("{name} {n:.2}"))
            .collect();
        println!(
            "{:<21} {:>4} {:>4} {:>7} {:>9.0} {:>7.3} {:>7.3} {:>7.3} {:>8} {:>6} {:>9} {:>8} {:>6} {:>6} {:>7} {:>6}  {}",
            cell.setup,
            cell.instances,
            cell.concurrency,
            s.calls,
            s.rps,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            vs(&|b| format!("{:+.3}", s.p50_ms - b.stats.p50_ms)),
            vs(&|b| ratio(s.rps, b.stats.rps)),
            micros(cell.broker_cpu_us_per_call),
            if cell.cluster {
                micros(cell.redis_cpu_us_per_call)
            } else {
                "-".into()
            },
            if cell.balancer == "none" {
                "-".into()
            } else {
                micros(cell.haproxy_cpu_us_per_call)
            },
            micros(cell.client_cpu_us_per_call),
            cell.redis_commands_per_call
                .map_or("?".into(), |n| format!("{n:.2}")),
            s.errors,
            if commands.is_empty() {
                "-".into()
            } else {
                commands.join(", ")
            }
        );
    }
    for (setup, what, aim) in [
        ("broker+cluster", "[cluster]", " (aim: ≤ 0.1 ms)"),
        (
            "broker+cluster+limits",
            "[cluster] with a rate limit and max_concurrent",
            "",
        ),
    ] {
        let find = |name: &str| {
            run.cells
                .iter()
                .find(|c| c.setup == name && c.concurrency == 1)
        };
        if let (Some(b), Some(c)) = (find(cluster::BASELINE), find(setup)) {
            println!(
                "per-call cost of {what} at 1 in flight: {:+.3} ms p50{aim}, {} µs broker CPU, {} Redis commands",
                c.stats.p50_ms - b.stats.p50_ms,
                match (c.broker_cpu_us_per_call, b.broker_cpu_us_per_call) {
                    (Some(c), Some(b)) => format!("{:+.0}", c - b),
                    _ => "?".into(),
                },
                c.redis_commands_per_call
                    .map_or("?".into(), |n| format!("{n:.2}"))
            );
        }
    }
    println!(
        "setups: `broker` one instance without [cluster]; `broker+cluster` one instance with [cluster], reached directly; `+limits` adds a per-server rate_limit (1000000/s, never refuses) and max_concurrent = 1000, so each call runs the bucket's Lua script and takes a lease in Redis; `haproxy→N` examples/cluster/haproxy.cfg as documented (round robin, `option http-server-close`: the client's connection to HAProxy is kept alive, each request opens a new connection to an instance; the deployment the README and the e2e tests use) in front of N [cluster] instances; `keep-alive` the same file without `option http-server-close` (HAProxy's default, idle connections to the instances reused)"
    );
    println!(
        "broker us: CPU per call of the broker processes summed over the instances (their ledger children not included); redis us, hap us: of redis-server and HAProxy; gen us: of the load generator; cmd/call: commands Redis processed over the measured calls (INFO commandstats), less the heartbeats (one SET per instance per second) and the bench's own INFO, per call, with the commands a Lua script runs counted besides its EVALSHA (so `+limits` makes three requests per call: two EVALSHA, bucket and lease, and the ZREM releasing the lease); sessions are opened, and behind HAProxy restored on each instance, during warm-up, so this is the steady state of a session's calls"
    );
    println!(
        "{cores} cores: the three instances share them with HAProxy, Redis, their ledgers and the load generator, so `haproxy→3` shows the cost of spreading calls over instances on one machine, not the capacity of three machines"
    );
}
