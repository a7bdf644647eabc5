//! In-process tests of the core: the broker runs in this process, its MCP front is served over
//! in-memory duplex pipes (as `mcp-broker stdio` serves it), and the upstream is an rmcp server on
//! 127.0.0.1:0 whose one tool emits log notifications on demand.
//!
//! The upstream is written here because no packaged server emits a chosen number of log lines at a
//! chosen level when asked, which event routing and back-pressure need to be tested exactly.

// Logging is deprecated by SEP-2577 (2026-07-28) but live in 2025-11-25, which these sessions speak.
#![allow(deprecated)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_broker::audit::Audit;
use mcp_broker::broker::Broker;
use mcp_broker::config::Config;
use mcp_broker::front::mcp::Front;
use rmcp::{
    ClientHandler, ErrorData, RoleClient, RoleServer, ServerHandler, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
        ContentBlock, Implementation, ListToolsResult, LoggingLevel,
        LoggingMessageNotificationParam, PaginatedRequestParams, ServerCapabilities, ServerConfig,
        SetLevelRequestParams, SubscribeRequestParams, Tool, UnsubscribeRequestParams,
    },
    service::{NotificationContext, RequestContext, RunningService},
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use serde_json::json;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------- upstream

/// `emit {level, count}` sends `count` log notifications at `level`, then answers.
#[derive(Clone)]
struct Noisy;

impl ServerHandler for Noisy {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_logging()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new("noisy", "1"))
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({"type": "object", "properties": {"level": {"type": "string"}, "count": {"type": "integer"}}});
        let schema = match schema {
            serde_json::Value::Object(m) => Arc::new(m),
            _ => Arc::default(),
        };
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("emit", "emit log lines", schema.clone()),
            Tool::new("sleep", "answer after `count` ms", schema),
        ]))
    }

    async fn call_tool(
        &self,
        p: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = p.arguments.unwrap_or_default();
        let count = args.get("count").and_then(|c| c.as_u64()).unwrap_or(1);
        if p.name == "sleep" {
            tokio::time::sleep(Duration::from_millis(count)).await;
            return Ok(CallToolResult::success(vec![ContentBlock::text("slept")]).into());
        }
        let level: LoggingLevel =
            serde_json::from_value(args.get("level").cloned().unwrap_or(json!("info")))
                .unwrap_or(LoggingLevel::Info);
        for i in 0..count {
            #[allow(deprecated)]
            let _ = ctx
                .peer
                .notify_logging_message(LoggingMessageNotificationParam::new(
                    level,
                    json!(format!("line {i}")),
                ))
                .await;
        }
        Ok(CallToolResult::success(vec![ContentBlock::text("done")]).into())
    }

    async fn subscribe(
        &self,
        _: SubscribeRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Ok(())
    }

    #[allow(deprecated)]
    async fn set_level(
        &self,
        _: SetLevelRequestParams,
        _: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        Ok(())
    }
}

async fn start_noisy() -> String {
    let svc = StreamableHttpService::new(
        || Ok(Noisy),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let app = axum::Router::new().nest_service("/mcp", svc);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Without TCP_NODELAY each SSE reply waits ~40 ms for a delayed ACK.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|t| {
        let _ = t.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/mcp")
}

// ---------------------------------------------------------------------------------------- broker

/// A broker in front of one noisy upstream; `broker` and `server` are extra lines for those tables.
async fn start_broker(broker: &str, server: &str) -> Arc<Broker> {
    let url = start_noisy().await;
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\n{broker}\n[servers.noisy]\ntransport = \"http\"\nurl = \"{url}\"\n{server}\n"
    );
    let cfg =
        Config::parse(std::path::Path::new("core_events.toml"), &text, &|_| None).expect("config");
    let broker = Broker::new(Arc::new(cfg), Audit::disabled()).expect("broker");
    broker.start();
    broker
}

/// A downstream client that records the log lines it receives.
#[derive(Clone)]
struct Client {
    logs: mpsc::UnboundedSender<LoggingMessageNotificationParam>,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("core-events-test", "1"),
        )
    }

    async fn on_logging_message(
        &self,
        p: LoggingMessageNotificationParam,
        _: NotificationContext<RoleClient>,
    ) {
        let _ = self.logs.send(p);
    }
}

type Session = (
    RunningService<RoleClient, Client>,
    mpsc::UnboundedReceiver<LoggingMessageNotificationParam>,
);

/// A session with the broker over an in-memory pipe, as a stdio client would have.
async fn connect(broker: &Arc<Broker>) -> Session {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let front = Front::new(broker.clone());
    tokio::spawn(async move {
        if let Ok(s) = front.serve(theirs).await {
            let _ = s.waiting().await;
        }
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let client = Client { logs: tx }.serve(ours).await.expect("initialize");
    (client, rx)
}

async fn set_level(s: &Session, level: LoggingLevel) {
    #[allow(deprecated)]
    s.0.peer()
        .set_level(SetLevelRequestParams::new(level))
        .await
        .expect("setLevel");
}

async fn emit(s: &Session, level: &str, count: u64) -> CallToolResult {
    let args = json!({"level": level, "count": count});
    let args = match args {
        serde_json::Value::Object(m) => m,
        _ => Default::default(),
    };
    s.0.peer()
        .call_tool(CallToolRequestParams::new("noisy__emit").with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("call: {e:?}"))
}

/// Log lines received until `quiet` passes without one.
async fn drain_logs(
    rx: &mut mpsc::UnboundedReceiver<LoggingMessageNotificationParam>,
    quiet: Duration,
) -> Vec<LoggingMessageNotificationParam> {
    let mut out = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push(p);
    }
    out
}

async fn wait_for(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(broker: &Broker, name: &str) -> f64 {
    broker
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

// ---------------------------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_list_waits_for_starting_upstreams() {
    let broker = start_broker("", "").await;
    // Listed right away: the upstream is still connecting, so the list waits for it.
    let s = connect(&broker).await;
    let tools = s.0.peer().list_all_tools().await.expect("list");
    assert!(
        tools.iter().any(|t| t.name == "noisy__emit"),
        "the first list of a fresh broker must hold the upstream's tools: {tools:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_is_per_session() {
    let broker = start_broker("", "").await;
    let mut a = connect(&broker).await;
    let mut b = connect(&broker).await;
    let mut quiet = connect(&broker).await;
    set_level(&a, LoggingLevel::Error).await;
    set_level(&b, LoggingLevel::Debug).await;
    emit(&b, "info", 3).await;
    emit(&b, "error", 2).await;
    let got_a = drain_logs(&mut a.1, Duration::from_millis(300)).await;
    let got_b = drain_logs(&mut b.1, Duration::from_millis(300)).await;
    let got_quiet = drain_logs(&mut quiet.1, Duration::from_millis(100)).await;
    assert!(
        got_a.iter().all(|p| p.level == LoggingLevel::Error) && got_a.len() == 2,
        "a session at `error` gets only the error lines: {got_a:?}"
    );
    assert_eq!(got_b.len(), 5, "a session at `debug` gets every line");
    assert!(
        got_b.iter().all(|p| p.logger.as_deref() == Some("noisy")),
        "the logger names the server"
    );
    assert!(
        got_quiet.is_empty(),
        "a session that never set a level gets no logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_has_no_queue_until_its_first_notification() {
    let broker = start_broker("", "").await;
    let mut a = connect(&broker).await;
    // The first list waits for the upstream; after it the catalog stays put, so no list_changed
    // reaches a session that connects from here on.
    a.0.peer().list_all_tools().await.expect("list");
    let _idle = connect(&broker).await;
    set_level(&a, LoggingLevel::Debug).await;
    emit(&a, "info", 2).await;
    let got = drain_logs(&mut a.1, Duration::from_millis(300)).await;
    assert_eq!(
        got.len(),
        2,
        "the first messages start the queue and arrive"
    );
    assert_eq!(broker.session_entries(), 2);
    assert_eq!(
        broker.session_queues(),
        1,
        "the idle session holds no queue or writer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_isolation_keeps_logs_with_their_owner() {
    let broker = start_broker("", "isolation = \"session\"").await;
    let mut a = connect(&broker).await;
    let mut b = connect(&broker).await;
    // Each session lists (opening its own upstream connection), then listens at debug.
    for s in [&a, &b] {
        s.0.peer().list_all_tools().await.expect("list");
        set_level(s, LoggingLevel::Debug).await;
    }
    emit(&a, "info", 4).await;
    let got_a = drain_logs(&mut a.1, Duration::from_millis(300)).await;
    let got_b = drain_logs(&mut b.1, Duration::from_millis(300)).await;
    assert_eq!(got_a.len(), 4, "the owner gets its connection's logs");
    assert!(
        got_b.is_empty(),
        "another session must not hear a per-session connection: {got_b:?}"
    );
    let conns = || metric(&broker, "mcp_broker_upstream_connections{server=\"noisy\"}");
    // b's first call opens b's own connection; what it says reaches b, not a.
    set_level(&b, LoggingLevel::Debug).await;
    emit(&b, "info", 2).await;
    let got_b = drain_logs(&mut b.1, Duration::from_millis(300)).await;
    let got_a = drain_logs(&mut a.1, Duration::from_millis(100)).await;
    assert_eq!(got_b.len(), 2, "b hears its own connection");
    assert!(
        got_a.is_empty(),
        "a must not hear b's connection: {got_a:?}"
    );
    assert_eq!(conns(), 2.0, "one upstream connection per session");
    a.0.cancel().await.expect("close a");
    wait_for(
        "a's connection to close with its session",
        Duration::from_secs(10),
        || conns() == 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_leave_the_registry() {
    let broker = start_broker("", "").await;
    for _ in 0..50 {
        let s = connect(&broker).await;
        s.0.cancel().await.expect("close");
    }
    wait_for("the registry to empty", Duration::from_secs(10), || {
        broker.session_entries() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_caps_refuse_with_a_clear_error() {
    let broker = start_broker("max_sessions_per_subject = 2", "").await;
    let _a = connect(&broker).await;
    let b = connect(&broker).await;
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let front = Front::new(broker.clone());
    tokio::spawn(async move {
        if let Ok(s) = front.serve(theirs).await {
            let _ = s.waiting().await;
        }
    });
    let (tx, _rx) = mpsc::unbounded_channel();
    let third = Client { logs: tx }.serve(ours).await;
    let err = third.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("session limit"),
        "a third session of the same subject is refused naming the limit: {err:?}"
    );
    b.0.cancel().await.expect("close");
    wait_for("a slot to free", Duration::from_secs(10), || {
        broker.session_entries() == 1
    })
    .await;
    let _c = connect(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_reads_delays_no_one() {
    let broker = start_broker("", "").await;
    // The stuck session: a raw client that completes the handshake, asks for every log, then
    // never reads again (its small pipe fills at once).
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (stuck, theirs) = tokio::io::duplex(1024);
    let front = Front::new(broker.clone());
    tokio::spawn(async move {
        if let Ok(s) = front.serve(theirs).await {
            let _ = s.waiting().await;
        }
    });
    let (rd, mut wr) = tokio::io::split(stuck);
    let mut rd = tokio::io::BufReader::new(rd);
    let mut line = String::new();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "stuck", "version": "1"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "logging/setLevel", "params": {"level": "debug"}}),
    ] {
        wr.write_all(format!("{msg}\n").as_bytes())
            .await
            .expect("write");
        if msg.get("id").is_some() {
            line.clear();
            rd.read_line(&mut line).await.expect("read");
        }
    }
    let mut other = connect(&broker).await;
    // Fill the stuck session's pipe and queue: 3000 lines only it asked for.
    let t = Instant::now();
    emit(&other, "debug", 3000).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "emitting took {:?} with a stuck session",
        t.elapsed()
    );
    wait_for("drops to be counted", Duration::from_secs(5), || {
        metric(&broker, "mcp_broker_notifications_dropped_total") > 0.0
    })
    .await;
    // Meanwhile another session is served at full speed and gets everything it asked for (at
    // `info`, so stragglers of the debug flood still in flight are not its business).
    set_level(&other, LoggingLevel::Info).await;
    let t = Instant::now();
    emit(&other, "info", 500).await;
    let got = drain_logs(&mut other.1, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 500, "the reading session gets every line");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "500 lines took {:?} to relay",
        t.elapsed()
    );
    let t = Instant::now();
    emit(&other, "debug", 0).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a plain call took {:?} while another session's queue is full",
        t.elapsed()
    );
    drop((rd, wr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_subscriptions_are_bounded() {
    let broker = start_broker("", "").await;
    let s = connect(&broker).await;
    let subscribe = |i: usize| {
        let peer = s.0.peer().clone();
        async move {
            peer.subscribe(SubscribeRequestParams::new(format!("noisy+mem://r/{i}")))
                .await
        }
    };
    for i in 0..1024 {
        subscribe(i).await.expect("within the bound");
    }
    // Subscribing again to one it has costs nothing.
    subscribe(7).await.expect("a repeated subscription");
    let err = subscribe(1024).await.expect_err("past the bound");
    assert!(
        err.to_string().contains("1024 resource subscriptions"),
        "{err}"
    );
    s.0.peer()
        .unsubscribe(UnsubscribeRequestParams::new("noisy+mem://r/0"))
        .await
        .expect("unsubscribe");
    subscribe(1024)
        .await
        .expect("room again after an unsubscribe");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_session_requests_in_flight_are_bounded() {
    let broker = start_broker("", "").await;
    let s = connect(&broker).await;
    s.0.peer().list_all_tools().await.expect("list");
    let sleep = |ms: u64| {
        let peer = s.0.peer().clone();
        let args = match json!({"count": ms}) {
            serde_json::Value::Object(m) => m,
            _ => Default::default(),
        };
        async move {
            peer.call_tool(CallToolRequestParams::new("noisy__sleep").with_arguments(args))
                .await
        }
    };
    let slow: Vec<_> = (0..256).map(|_| tokio::spawn(sleep(3000))).collect();
    wait_for("256 calls in flight", Duration::from_secs(10), || {
        metric(&broker, "mcp_broker_inflight_calls") >= 256.0
    })
    .await;
    let r = sleep(0).await.expect("answered");
    assert_eq!(
        r.is_error,
        Some(true),
        "the 257th call in flight is refused"
    );
    let text = format!("{:?}", r.content);
    assert!(text.contains("256 requests in flight"), "{text}");
    // Another session is not affected.
    let other = connect(&broker).await;
    let r = other
        .0
        .peer()
        .call_tool(CallToolRequestParams::new("noisy__emit"))
        .await
        .expect("answered");
    assert_ne!(r.is_error, Some(true), "{r:?}");
    for t in slow {
        let r = t.await.expect("join").expect("answered");
        assert_ne!(r.is_error, Some(true), "{r:?}");
    }
    let r = sleep(0).await.expect("answered");
    assert_ne!(r.is_error, Some(true), "room again once calls finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_and_uris_are_refused_up_front() {
    let broker = start_broker("", "").await;
    let s = connect(&broker).await;
    let err =
        s.0.peer()
            .call_tool(CallToolRequestParams::new("x".repeat(4096)))
            .await
            .expect_err("refused");
    assert!(err.to_string().contains("tool name too long"), "{err}");
    let err =
        s.0.peer()
            .subscribe(SubscribeRequestParams::new(format!(
                "noisy+mem://{}",
                "u".repeat(10_000)
            )))
            .await
            .expect_err("refused");
    assert!(err.to_string().contains("resource URI too long"), "{err}");
}
