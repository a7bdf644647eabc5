//! `mcp-broker approvals list|approve|deny`: the calls a running broker holds for an approver
//! (`GET /admin/approvals`), and deciding them (`POST /admin/approvals/{id}/approve|deny`), with
//! the approver's own token.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{ApprovalsCommand, ApproverTarget};
use crate::config::Config;

/// Where `/admin/approvals` is: the main listener.
fn default_url(config: &Path) -> anyhow::Result<String> {
    let c = Config::load(config)?;
    let b = &c.broker;
    let scheme = if b.tls.is_some() { "https" } else { "http" };
    let mut addr = b.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!(
        "{scheme}://{addr}{}",
        crate::front::approvals::PATH
    ))
}

pub async fn run(cmd: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    let (target, path, body) = match &cmd {
        ApprovalsCommand::List { target } => (target, String::new(), None),
        ApprovalsCommand::Approve {
            id,
            duration,
            target,
        } => (
            target,
            format!("/{}/approve", seg(id)?),
            Some(match duration {
                Some(d) => serde_json::json!({ "duration": d }),
                None => serde_json::json!({}),
            }),
        ),
        ApprovalsCommand::Deny { id, target } => (
            target,
            format!("/{}/deny", seg(id)?),
            Some(serde_json::json!({})),
        ),
    };
    let answer = ask(target, &path, body).await?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    match cmd {
        ApprovalsCommand::List { .. } => print!("{}", table(&answer["approvals"])),
        _ => {
            let s = |k: &str| answer[k].as_str().unwrap_or("-").to_string();
            let grant = answer["grant"]
                .as_str()
                .map(|g| format!(" (grant: {g})"))
                .unwrap_or_default();
            println!(
                "{} {}: {}'s call to {}{grant}",
                s("decision"),
                s("id"),
                s("caller"),
                s("tool")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// An id as one path segment.
fn seg(id: &str) -> anyhow::Result<&str> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        anyhow::bail!("\"{id}\" is not an approval id (a number from `approvals list`)");
    }
    Ok(id)
}

async fn ask(t: &ApproverTarget, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let base = match &t.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => default_url(&t.config)?,
    };
    let url = format!("{base}{path}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let target = url::Url::parse(&url).map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
    let mut req = match body {
        Some(b) => client.post(target).json(&b),
        None => client.get(target),
    };
    let token = t
        .token
        .clone()
        .or_else(|| std::env::var("MCP_BROKER_TOKEN").ok());
    if let Some(tok) = token {
        req = req.bearer_auth(tok);
    }
    crate::status_query::send_json(req, &url).await
}

/// The pending approvals for a person, one line each.
fn table(items: &Value) -> String {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let headers = ["ID", "CALLER", "TOOL", "ARGUMENTS", "EXPIRES", "GRANTS"];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for p in items.as_array().into_iter().flatten() {
        let grants = p["grants"]
            .as_array()
            .map(|g| g.iter().map(&s).collect::<Vec<_>>().join(","))
            .unwrap_or_default();
        rows.push(vec![
            s(&p["id"]),
            s(&p["caller"]),
            s(&p["tool"]),
            s(&p["arguments"]),
            s(&p["expires"]),
            grants,
        ]);
    }
    if rows.len() == 1 {
        return "no calls waiting for approval\n".into();
    }
    crate::status_query::columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_one_call_per_line() {
        let t = table(&serde_json::json!([
            {"id": "42", "caller": "alice", "server": "ledger", "tool": "ledger__update_account_status",
             "arguments": "{account_id: ACC-1001}", "expires": "2026-11-30T20:00:00.000Z",
             "grants": ["once", "15m"]}
        ]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[1].starts_with("42  alice"), "{t}");
        assert!(lines[1].ends_with("once,15m"), "{t}");
        assert_eq!(
            table(&serde_json::json!([])),
            "no calls waiting for approval\n"
        );
        assert!(seg("12").is_ok() && seg("../x").is_err());
    }
}
