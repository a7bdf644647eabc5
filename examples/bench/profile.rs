//! `--profile [CELL]`: one calls cell measured while `perf record` samples the process the client
//! talks to (the broker, for a broker front), then a summary of where its CPU went: the top
//! symbols by self time and by cumulative (children) time, printed and written to
//! `<target>/bench/profile.txt` (the raw `perf.data` stays beside it for `perf report`). Reading
//! the DWARF stacks back takes perf a few minutes on 2 cores.
//!
//! Call graphs are unwound from DWARF (`--call-graph dwarf`): a release build keeps no frame
//! pointers, so frame-pointer graphs would stop at the first Rust frame. Without perf, or without
//! permission to use it (`kernel.perf_event_paranoid`), the cell is still measured and the reason
//! is printed instead of the summary.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clap::ValueEnum;
use tokio::process::Command;

use crate::calls::Cell;
use crate::load::{self, Stop};
use crate::targets::{self, Env, Front, Transport};

/// The cell profiled when `--profile` names none: every layer on, where the broker does most.
pub const DEFAULT_CELL: &str = "broker+auth+exchange:http:8";
/// Rows of each summary table.
const TOP: usize = 25;
/// Sampling frequency and the stack bytes copied per sample for DWARF unwinding.
const FREQUENCY: &str = "2000";
const CALL_GRAPH: &str = "dwarf,16384";

/// `FRONT:TRANSPORT:CONCURRENCY`, e.g. `broker+auth+exchange:http:8`.
pub struct CellSpec {
    pub front: Front,
    pub transport: Transport,
    pub concurrency: usize,
}

impl CellSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("--profile takes FRONT:TRANSPORT:CONCURRENCY (e.g. {DEFAULT_CELL}), not {s:?}")
        };
        let mut parts = s.split(':');
        let (Some(front), Some(transport), Some(concurrency), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let front = Front::from_str(front, true).map_err(|e| format!("{}: {e}", bad()))?;
        let transport =
            Transport::from_str(transport, true).map_err(|e| format!("{}: {e}", bad()))?;
        let concurrency = concurrency
            .parse::<usize>()
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(bad)?;
        Ok(Self {
            front,
            transport,
            concurrency,
        })
    }

    fn label(&self) -> String {
        format!(
            "{}:{}:{}",
            self.front.label(),
            self.transport.label(),
            self.concurrency
        )
    }
}

/// Measure `spec` for `seconds` after `warmup` while perf samples the server process; print the
/// cell and the summary.
pub async fn run(env: &Env, spec: &CellSpec, warmup: Duration, seconds: f64) -> Result<(), String> {
    let out_dir = &env.paths.out_dir;
    let data = out_dir.join("perf.data");
    let summary_path = out_dir.join("profile.txt");
    eprintln!("== profile: {} for {seconds} s", spec.label());
    let perf = perf_usable().await;
    if let Err(why) = &perf {
        eprintln!("   note: no profile: {why}; the cell is measured anyway");
    }
    let target = targets::start(env, spec.front, spec.transport, "profile").await?;
    let pid = target.server_pid;
    let measured = async {
        let mut sessions = target.sessions(spec.concurrency).await?;
        if !warmup.is_zero() {
            sessions = load::phase(sessions, &target.call, Stop::after(warmup))
                .await
                .0;
        }
        let record = async {
            if perf.is_err() {
                return None;
            }
            Some(record(pid, seconds, &data).await)
        };
        let before = crate::procs::cpu_time(pid);
        // The load runs a little past the recording, so every sample is of a loaded process.
        let load = load::phase(
            sessions,
            &target.call,
            Stop::after(Duration::from_secs_f64(seconds + 0.5)),
        );
        let (recorded, (sessions, sample)) = tokio::join!(record, load);
        let after = crate::procs::cpu_time(pid);
        for session in sessions {
            session.close().await;
        }
        Ok::<_, String>((recorded, sample.stats(), before.zip(after)))
    }
    .await;
    target.stop().await;
    let (recorded, stats, cpu) = measured?;
    let calls = stats.calls;
    let cell = Cell {
        upstream: spec.transport.label(),
        front: spec.front.label(),
        concurrency: spec.concurrency,
        server_cpu_us_per_call: cpu
            .filter(|_| calls > 0)
            .map(|(b, a)| a.saturating_sub(b).as_secs_f64() * 1e6 / calls as f64),
        client_cpu_us_per_call: None,
        stats,
    };
    crate::report::print_cells(std::slice::from_ref(&cell));
    match recorded {
        None => {}
        Some(Err(e)) => println!("\nno profile: {e}"),
        Some(Ok(())) => {
            let text = summarise(&data, &cell).await?;
            println!("\n{text}");
            std::fs::write(&summary_path, &text)
                .map_err(|e| format!("cannot write {}: {e}", summary_path.display()))?;
            println!(
                "wrote {} (perf data: {})",
                summary_path.display(),
                data.display()
            );
        }
    }
    Ok(())
}

/// Whether `perf` runs here and may sample another process.
async fn perf_usable() -> Result<(), String> {
    let version = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    match version {
        Ok(s) if s.success() => {}
        Ok(_) => return Err("`perf --version` failed (perf for this kernel missing?)".into()),
        Err(e) => return Err(format!("perf not found ({e})")),
    }
    // 2 allows sampling one's own processes in user space; 3 and above (some distributions)
    // forbid it, as does anything above 2 for a non-root user.
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match paranoid {
        Some(p) if p > 2 => Err(format!(
            "kernel.perf_event_paranoid is {p}: perf may not sample processes (set it to 2 or lower)"
        )),
        _ => Ok(()),
    }
}

/// `perf record` attached to `pid` for `seconds`.
async fn record(pid: u32, seconds: f64, data: &Path) -> Result<(), String> {
    let out = Command::new("perf")
        .args(["record", "-F", FREQUENCY, "-g", "--call-graph", CALL_GRAPH])
        .args(["-p", &pid.to_string(), "-o"])
        .arg(data)
        .args(["--", "sleep", &format!("{seconds}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|e| format!("cannot run perf record: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "perf record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The two views of `data`, as text.
async fn summarise(data: &Path, cell: &Cell) -> Result<String, String> {
    let s = &cell.stats;
    let mut text = format!(
        "profile of {} over {} at concurrency {}: {} calls, {:.0} calls/s, p50 {:.3} ms, server CPU {} us per call (perf attached)\n",
        cell.front,
        cell.upstream,
        cell.concurrency,
        s.calls,
        s.rps,
        s.p50_ms,
        cell.server_cpu_us_per_call
            .map_or("?".into(), |v| format!("{v:.0}"))
    );
    // One report carries both columns: unwinding the DWARF stacks is most of its (minutes long)
    // cost, so it is not run twice.
    let mut rows = report(data).await?;
    text.push_str(&format!(
        "\ntop {TOP} symbols by self time\n{:>8}  {:>8}  symbol\n",
        "self", "children"
    ));
    rows.sort_by(|a, b| b.self_pct.total_cmp(&a.self_pct));
    for row in rows.iter().take(TOP) {
        text.push_str(&row.line());
    }
    text.push_str(&format!(
        "\ntop {TOP} symbols by cumulative time (callees included)\n{:>8}  {:>8}  symbol\n",
        "self", "children"
    ));
    rows.sort_by(|a, b| b.children_pct.total_cmp(&a.children_pct));
    for row in rows.iter().take(TOP) {
        text.push_str(&row.line());
    }
    Ok(text)
}

/// One symbol of `perf report --children`.
struct Row {
    children_pct: f64,
    self_pct: f64,
    /// `[.]` user space, `[k]` kernel, then the name.
    symbol: String,
}

impl Row {
    /// `  68.87%     0.00%  [.] name   -   -` (perf pads the name and may add empty columns).
    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let pct = |w: Option<&str>| w?.strip_suffix('%')?.parse::<f64>().ok();
        let children_pct = pct(words.next())?;
        let self_pct = pct(words.next())?;
        let mut symbol: Vec<&str> = words.collect();
        while symbol.last() == Some(&"-") {
            symbol.pop();
        }
        Some(Self {
            children_pct,
            self_pct,
            symbol: symbol.join(" "),
        })
    }

    fn line(&self) -> String {
        // Generic types make names of thousands of characters; the head names the function.
        let name: String = self.symbol.chars().take(160).collect();
        format!(
            "{:>7.2}%  {:>7.2}%  {name}\n",
            self.self_pct, self.children_pct
        )
    }
}

/// `perf report --children --stdio` rows without call graphs.
async fn report(data: &Path) -> Result<Vec<Row>, String> {
    let out = Command::new("perf")
        .arg("report")
        .arg("-i")
        .arg(data)
        .args(["--children", "--sort", "symbol", "--stdio", "-g", "none"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run perf report: {e}"))?;
    if !out.status.success() {
        return Err(format!("perf report failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(Row::parse)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_rows_parse_with_perfs_padding() {
        let row = Row::parse(
            "    17.31%     0.05%  [.] serde_json::de::from_trait<R, T>                 -      -   ",
        )
        .expect("a row");
        assert_eq!(row.children_pct, 17.31);
        assert_eq!(row.self_pct, 0.05);
        assert_eq!(row.symbol, "[.] serde_json::de::from_trait<R, T>");
        assert!(Row::parse("# Children      Self  Symbol").is_none());
        assert!(Row::parse("").is_none());
    }

    #[test]
    fn cells_parse() {
        let c = CellSpec::parse(DEFAULT_CELL).expect("the default parses");
        assert_eq!(c.label(), DEFAULT_CELL);
        for bad in [
            "broker",
            "broker:http",
            "broker:http:0",
            "nope:http:8",
            "broker:ftp:8",
        ] {
            assert!(CellSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
