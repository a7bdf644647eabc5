//! `mcp-broker status`: ask a running broker what every server is doing (`GET /status`) and print
//! it as a table, or as the JSON it answered (`--json`).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

/// Where `/status` is, from the configuration: `metrics_listen` if set, else the main listener.
fn default_url(config: &Path) -> anyhow::Result<String> {
    let c = Config::load(config)?;
    let b = &c.broker;
    Ok(match b.metrics_listen {
        Some(addr) => format!("http://{}/status", loopback(addr)),
        None => {
            let scheme = if b.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}/status", loopback(b.listen))
        }
    })
}

/// An unspecified listen address (`0.0.0.0`) is reached on loopback.
fn loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    a
}

pub async fn run(
    config: &Path,
    url: Option<&str>,
    json: bool,
    token: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let url = match url {
        Some(u) => u.to_string(),
        None => default_url(config)?,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut req = client.get(&url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let report = send_json(req, &url).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The report for a person.
fn table(r: &Value) -> String {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let sessions = &r["sessions"];
    let by: Vec<String> = sessions["by_protocol"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}: {v}")).collect())
        .unwrap_or_default();
    out.push_str(&format!(
        "up {} s · config generation {} · {} sessions{} · {} calls in flight{}{}\n",
        s(&r["uptime_s"]),
        s(&r["generation"]),
        s(&sessions["total"]),
        if by.is_empty() {
            String::new()
        } else {
            format!(" ({})", by.join(", "))
        },
        s(&r["calls_in_flight"]),
        if r["draining"] == Value::Bool(true) {
            " · DRAINING"
        } else {
            ""
        },
        match r["cluster"].as_object() {
            Some(c) => format!(
                " · cluster instance {} (Redis {})",
                s(&c["instance_id"]),
                if c["redis_up"] == Value::Bool(true) {
                    "up"
                } else {
                    "UNREACHABLE"
                }
            ),
            None => String::new(),
        }
    ));
    let headers = [
        "SERVER",
        "TRANSPORT",
        "STATE",
        "TOOLS",
        "PROMPTS",
        "RESOURCES",
        "CONNS",
        "CALLS",
        "RESTARTS",
        "FAILED",
        "NEXT RETRY",
        "LAST ERROR",
    ];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for srv in r["servers"].as_array().into_iter().flatten() {
        let next = match srv["next_retry_ms"].as_u64() {
            Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
            None => "-".into(),
        };
        let err = match (srv["last_error"].as_str(), srv["last_error_at"].as_str()) {
            (Some(e), Some(at)) => format!("{at} {e}"),
            (Some(e), None) => e.to_string(),
            _ => "-".into(),
        };
        rows.push(vec![
            s(&srv["name"]),
            s(&srv["transport"]),
            s(&srv["state"]).replace('_', " "),
            s(&srv["tools"]),
            s(&srv["prompts"]),
            s(&srv["resources"]),
            s(&srv["connections"]),
            s(&srv["calls_in_flight"]),
            s(&srv["restarts"]),
            s(&srv["failed_attempts"]),
            next,
            // One line per server: the error's first line.
            err.lines().next().unwrap_or_default().to_string(),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

/// Send an admin request to a running broker and read its JSON answer; any HTTP error status is
/// an error carrying the broker's message (shared by `status`, `tokens` and `approvals`).
pub(crate) async fn send_json(req: reqwest::RequestBuilder, url: &str) -> anyhow::Result<Value> {
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        anyhow::bail!("{url} answered HTTP {status}: {}", body.trim());
    }
    serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{url} did not answer JSON: {e}"))
}

/// `rows` (the first is the header) as aligned columns, two spaces apart, the last one unpadded.
pub(crate) fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_each_server_on_one_line() {
        let r = serde_json::json!({
            "uptime_s": 12, "generation": 2, "draining": false, "cluster": null, "calls_in_flight": 0,
            "sessions": {"total": 3, "by_protocol": {"2025-11-25": 2, "2025-06-18": 1}},
            "servers": [
                {"name": "ledger", "transport": "stdio", "state": "ready", "tools": 7, "prompts": 1,
                 "resources": 1, "connections": 1, "calls_in_flight": 0, "restarts": 0, "failed_attempts": 0,
                 "next_retry_ms": null, "last_error": null, "last_error_at": null},
                {"name": "git", "transport": "stdio", "state": "backing_off", "tools": 0, "prompts": 0,
                 "resources": 0, "connections": 0, "calls_in_flight": 0, "restarts": 2, "failed_attempts": 5,
                 "next_retry_ms": 1500, "last_error": "exit status 3\nstderr: boom",
                 "last_error_at": "2026-11-30T17:00:00.000Z"}
            ]
        });
        let t = table(&r);
        assert!(
            t.starts_with(
                "up 12 s · config generation 2 · 3 sessions (2025-11-25: 2, 2025-06-18: 1)"
            ),
            "{t}"
        );
        let git = t
            .lines()
            .find(|l| l.starts_with("git"))
            .expect("a row for git");
        assert!(
            git.contains("backing off") && git.contains("1.5 s"),
            "{git}"
        );
        assert!(
            git.ends_with("2026-11-30T17:00:00.000Z exit status 3"),
            "{git}"
        );
        assert_eq!(t.lines().count(), 4, "{t}");
    }
}
