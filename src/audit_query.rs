//! `mcp-broker audit`: read the JSONL audit trail (with its rotated files), filter, print a table or
//! the matching JSON lines.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

use crate::config::Config;

/// The `audit` subcommand's arguments: defined here, where they are used, so `cli` only parses them.
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// The audit file; defaults to `[audit] file` of the configuration.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    #[arg(long, short, default_value = "servers.toml")]
    pub config: PathBuf,
    /// Only this subject.
    #[arg(long)]
    pub sub: Option<String>,
    /// Only this tool (or prompt/resource) name, exposed or upstream; `*` globs allowed.
    #[arg(long)]
    pub tool: Option<String>,
    /// Only this server.
    #[arg(long)]
    pub server: Option<String>,
    /// Only records newer than this (`90s`, `15m`, `1h`, `2d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only denied or rate-limited requests.
    #[arg(long)]
    pub denied: bool,
    /// Only this outcome (ok, tool_error, error, timeout, cancelled, denied, rate_limited).
    #[arg(long)]
    pub outcome: Option<String>,
    /// Print the matching records as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show at most the last N matching records.
    #[arg(long)]
    pub last: Option<usize>,
}

pub fn run(args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.file {
        Some(f) => f.clone(),
        None => {
            let config = Config::load(&args.config)?;
            config.audit.file.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no `[audit] file` is configured; pass --file",
                    args.config.display()
                )
            })?
        }
    };
    let since = match &args.since {
        Some(s) => Some(
            now_secs()
                - parse_age(s)
                    .ok_or_else(|| anyhow::anyhow!("--since {s:?}: use e.g. 90s, 15m, 1h, 2d"))?,
        ),
        None => None,
    };
    let tool = match &args.tool {
        Some(t) => Some(
            globset::Glob::new(t)
                .map_err(|e| anyhow::anyhow!("--tool {t:?}: {e}"))?
                .compile_matcher(),
        ),
        None => None,
    };
    let mut rows = Vec::new();
    let mut unreadable = 0usize;
    for path in files_oldest_first(&file) {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if path == file => {
                anyhow::bail!("{}: cannot read: {e}", path.display())
            }
            Err(_) => continue,
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                unreadable += 1;
                continue;
            };
            let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
            if args.sub.as_deref().is_some_and(|sub| s("sub") != sub)
                || args.server.as_deref().is_some_and(|x| s("server") != x)
                || args.outcome.as_deref().is_some_and(|o| s("outcome") != o)
                || (args.denied && s("decision") != "deny")
            {
                continue;
            }
            if let Some(m) = &tool
                && !m.is_match(s("name"))
                && !m.is_match(s("upstream_name"))
            {
                continue;
            }
            if let Some(since) = since
                && crate::audit::parse_rfc3339(s("ts")).is_none_or(|t| t < since)
            {
                continue;
            }
            rows.push((line.to_string(), v));
        }
    }
    if let Some(n) = args.last
        && rows.len() > n
    {
        rows.drain(..rows.len() - n);
    }
    if args.json {
        for (line, _) in &rows {
            println!("{line}");
        }
    } else {
        print_table(&rows);
    }
    if unreadable > 0 {
        eprintln!("warning: {unreadable} line(s) were not JSON and were skipped");
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit.jsonl.N` … `audit.jsonl.1`, then `audit.jsonl`.
fn files_oldest_first(file: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = Vec::new(); // ascending: .1, .2, …
    for i in 1..=1000 {
        let mut p = file.as_os_str().to_owned();
        p.push(format!(".{i}"));
        let p = PathBuf::from(p);
        if !p.exists() {
            break;
        }
        rotated.push((i, p));
    }
    let mut out: Vec<PathBuf> = rotated.into_iter().rev().map(|(_, p)| p).collect();
    out.push(file.to_path_buf());
    out
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `90s`, `15m`, `1h`, `2d` → seconds.
fn parse_age(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(d) = s.strip_suffix('d') {
        return d.trim().parse::<f64>().ok().map(|n| n * 86_400.0);
    }
    crate::config::parse_duration(s).map(|d| d.as_secs_f64())
}

fn print_table(rows: &[(String, Value)]) {
    let cols = [
        ("TIME", "ts"),
        ("SUB", "sub"),
        ("CLIENT", "client_id"),
        ("KIND", "kind"),
        ("SERVER", "server"),
        ("NAME", "name"),
        ("DECISION", "decision"),
        ("OUTCOME", "outcome"),
        ("MS", "latency_ms"),
        ("REASON", "reason"),
    ];
    let cell = |v: &Value, key: &str| -> String {
        match v.get(key) {
            Some(Value::String(s)) => {
                if key == "ts" {
                    // 2026-11-22T04:10:00.123Z → 2026-11-22 04:10:00
                    s.get(..19).unwrap_or(s).replace('T', " ")
                } else if key == "reason" {
                    let s = match v.get("error").and_then(Value::as_str) {
                        Some(e) if !e.is_empty() => e,
                        _ => s,
                    };
                    shorten(s, 60)
                } else {
                    shorten(s, 40)
                }
            }
            Some(Value::Number(n)) => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
            Some(Value::Null) | None => "-".into(),
            Some(other) => shorten(&other.to_string(), 40),
        }
    };
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, v)| cols.iter().map(|(_, k)| cell(v, k)).collect())
        .collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let mut out = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                let pad = widths[i] - c.chars().count();
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(cols.iter().map(|(h, _)| h.to_string()).collect());
    for r in table {
        line(r);
    }
    println!(
        "({} record{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
}

fn shorten(s: &str, max: usize) -> String {
    let first = s.lines().next().unwrap_or("");
    if first.chars().count() > max {
        first.chars().take(max - 1).chain(['…']).collect()
    } else {
        first.to_string()
    }
}
