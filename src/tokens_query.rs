//! `mcp-broker tokens list|revoke`: the upstream tokens a running broker keeps per caller
//! (`GET /admin/tokens`), and revoking them (`DELETE /admin/tokens`). Never shows a secret: the
//! broker answers summaries only.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;

/// Where `/admin/tokens` is: the main listener (it is never served on `metrics_listen`).
fn default_url(config: &Path) -> anyhow::Result<String> {
    let c = Config::load(config)?;
    let b = &c.broker;
    let scheme = if b.tls.is_some() { "https" } else { "http" };
    let mut addr = b.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("{scheme}://{addr}{}", crate::front::tokens::PATH))
}

/// Where and as whom to ask.
pub struct Target<'a> {
    pub config: &'a Path,
    pub url: Option<&'a str>,
    pub token: Option<&'a str>,
}

/// `tokens list`: a table (or the JSON the broker answered, with `json`).
pub async fn list(t: &Target<'_>, sub: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if let Some(s) = sub {
        query.push(("sub", s));
    }
    let answer = ask(t, reqwest::Method::GET, &query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", table(&answer["tokens"]));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tokens revoke`: what was removed, as a table (or the JSON, with `json`).
pub async fn revoke(
    t: &Target<'_>,
    sub: Option<&str>,
    server: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut query = Vec::new();
    if let Some(s) = sub {
        query.push(("sub", s));
    }
    if let Some(s) = server {
        query.push(("server", s));
    }
    if query.is_empty() {
        anyhow::bail!("tokens revoke needs --sub, --server, or both");
    }
    let answer = ask(t, reqwest::Method::DELETE, &query).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let removed = &answer["removed"];
        let n = removed.as_array().map_or(0, Vec::len);
        println!("removed {n} token{}", if n == 1 { "" } else { "s" });
        if n > 0 {
            print!("{}", table(removed));
        }
        print!("{}", told(&answer["upstream"]));
    }
    Ok(ExitCode::SUCCESS)
}

async fn ask(
    t: &Target<'_>,
    method: reqwest::Method,
    query: &[(&str, &str)],
) -> anyhow::Result<Value> {
    let url = match t.url {
        Some(u) => u.to_string(),
        None => default_url(t.config)?,
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut target = url::Url::parse(&url).map_err(|e| anyhow::anyhow!("--url {url}: {e}"))?;
    if !query.is_empty() {
        target.query_pairs_mut().extend_pairs(query);
    }
    let mut req = client.request(method, target);
    if let Some(tok) = t.token {
        req = req.bearer_auth(tok);
    }
    crate::status_query::send_json(req, &url).await
}

/// Unix seconds as RFC 3339 (UTC, to the second), `-` when absent.
fn when(v: &Value) -> String {
    match v.as_i64() {
        Some(secs) => {
            let t = crate::audit::format_rfc3339(secs, 0);
            // `…T12:00:00.000Z` → `…T12:00:00Z`
            t.strip_suffix(".000Z")
                .map(|s| format!("{s}Z"))
                .unwrap_or(t)
        }
        None => "-".into(),
    }
}

/// The summaries for a person, one line each.
fn table(tokens: &Value) -> String {
    let s = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let headers = ["SUB", "SERVER", "KIND", "ISSUER", "EXPIRES", "UPDATED"];
    let mut rows: Vec<Vec<String>> = vec![headers.iter().map(|h| h.to_string()).collect()];
    for t in tokens.as_array().into_iter().flatten() {
        rows.push(vec![
            s(&t["sub"]),
            s(&t["server"]),
            s(&t["kind"]),
            s(&t["issuer"]),
            when(&t["expires_at"]),
            when(&t["updated_at"]),
        ]);
    }
    if rows.len() == 1 {
        return "no tokens\n".into();
    }
    crate::status_query::columns(&rows)
}

/// What each authorization server was told of a revoke (RFC 7009), a line each.
fn told(upstream: &Value) -> String {
    let mut out = String::new();
    for t in upstream.as_array().into_iter().flatten() {
        let s = |k: &str| t[k].as_str().unwrap_or("-").to_string();
        let result = t["upstream"]["result"].as_str().unwrap_or("-");
        let detail = match t["upstream"]["detail"].as_str() {
            Some(d) => format!(" ({d})"),
            None => String::new(),
        };
        out.push_str(&format!(
            "{} {}: at the authorization server: {}{detail}\n",
            s("sub"),
            s("server"),
            result.replace('_', " ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_one_line_per_token_with_rfc3339_times() {
        let t = table(&serde_json::json!([
            {"sub": "alice@example.com", "server": "github", "kind": "oauth",
             "issuer": "https://github.com/login/oauth", "client_id": "c", "scopes": ["repo"],
             "expires_at": 1_900_000_000u64, "updated_at": 1_800_000_000u64},
            {"sub": "bob", "server": "@sign-in", "kind": "sign_in", "issuer": null,
             "client_id": null, "scopes": [], "expires_at": null, "updated_at": 0}
        ]));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("SUB"), "{t}");
        assert!(lines[1].contains("2030-03-17T17:46:40Z"), "{t}");
        assert!(lines[1].contains("2027-01-15T08:00:00Z"), "{t}");
        assert!(lines[2].starts_with("bob "), "{t}");
        assert!(lines[2].contains(" - "), "{t}");
        assert_eq!(table(&serde_json::json!([])), "no tokens\n");
    }

    #[test]
    fn told_says_what_each_server_was_told() {
        let t = told(&serde_json::json!([
            {"sub": "alice", "server": "crm", "upstream": {"result": "revoked"}},
            {"sub": "bob", "server": "wiki", "upstream": {"result": "not_offered"}},
            {"sub": "bob", "server": "crm", "upstream": {"result": "failed", "detail": "HTTP 500"}}
        ]));
        assert_eq!(
            t,
            "alice crm: at the authorization server: revoked\n\
             bob wiki: at the authorization server: not offered\n\
             bob crm: at the authorization server: failed (HTTP 500)\n"
        );
    }
}
