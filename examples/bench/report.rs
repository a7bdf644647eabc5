//! The report: run metadata, the tables printed at the end, and the JSON written beside them.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::calls::Cell;
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
