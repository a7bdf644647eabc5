//! The broker served in-process by `app::run(config, listener, shutdown, ..)`: bind port 0, talk MCP
//! over HTTP to the real `ledger` example upstream through it, then pull the shutdown trigger and see
//! `run` return.

mod support;

use std::time::Duration;

use mcp_broker::app::{ServeOptions, run};
use mcp_broker::config::Config;
use serde_json::{Value, json};

/// The JSON-RPC message in a response body: plain JSON, or the `data:` line of an SSE stream that
/// carries a response (not a notification).
fn message(body: &str) -> Value {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v;
    }
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or_else(|| panic!("no JSON-RPC response in {body:?}"))
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    session: Option<&str>,
    body: Value,
) -> reqwest::Response {
    let mut req = http
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .header("Content-Type", "application/json")
        .header("MCP-Protocol-Version", "2025-06-18")
        .json(&body);
    if let Some(s) = session {
        req = req.header("Mcp-Session-Id", s);
    }
    req.send().await.expect("POST /mcp")
}

#[tokio::test]
async fn run_serves_on_the_given_listener_and_returns_on_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\n\n[servers.ledger]\ntransport = \"stdio\"\ncommand = \"{}\"\nargs = [\"stdio\"]\n",
        support::example_bin("ledger").display()
    );
    let config = Config::parse(&dir.path().join("servers.toml"), &text, &|_| None).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/mcp", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(run(
        config.into(),
        listener,
        async move {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    ));

    let http = reqwest::Client::new();
    let init = post(
        &http,
        &url,
        None,
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "serve_inprocess", "version": "0"}
        }}),
    )
    .await;
    assert!(init.status().is_success(), "initialize: {}", init.status());
    let session = init
        .headers()
        .get("mcp-session-id")
        .expect("Mcp-Session-Id")
        .to_str()
        .expect("ascii")
        .to_string();
    let init = message(&init.text().await.expect("body"));
    assert!(init["result"]["protocolVersion"].is_string(), "{init}");
    let r = post(
        &http,
        &url,
        Some(&session),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert!(r.status().is_success(), "initialized: {}", r.status());

    // The first list waits for upstreams still starting (`startup_wait`); poll in case it is slow.
    let names = support::eventually(Duration::from_secs(30), || async {
        let r = post(
            &http,
            &url,
            Some(&session),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await;
        let list = message(&r.text().await.ok()?);
        let names: Vec<String> = list["result"]["tools"]
            .as_array()?
            .iter()
            .filter_map(|t| t["name"].as_str().map(String::from))
            .collect();
        names
            .iter()
            .any(|n| n == "ledger__get_account")
            .then_some(names)
    })
    .await;
    assert!(names.iter().all(|n| n.starts_with("ledger__")), "{names:?}");

    stop.send(()).expect("run is waiting for the trigger");
    let result = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("run returns after shutdown")
        .expect("run did not panic");
    result.expect("run ends cleanly");
    assert!(
        tokio::net::TcpStream::connect(url.trim_start_matches("http://").trim_end_matches("/mcp"))
            .await
            .is_err(),
        "the listener is closed once run returns"
    );
}
