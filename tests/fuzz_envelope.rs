//! Property tests over what a caller controls at the JSON-RPC level: envelopes, methods, params
//! shapes, ids, and the names and URIs the broker resolves.
//!
//! * `envelope_*`: the broker runs in this process in front of two `ledger` example upstreams over
//!   stdio (one prefixed, one with `prefix = ""`); each case opens a session over an in-memory pipe
//!   (as `mcp-broker stdio` serves it), writes a batch of arbitrary or mutated JSON-RPC lines, and
//!   checks: every output line is JSON; every line rmcp reads as a request gets exactly one answer
//!   (result or error) with its id within a deadline; nothing answers an id that was not asked; a
//!   well-formed but invalid message gets at most one id-less error; and a `ping` after the batch is
//!   answered (the session is still responsive). The broker is shared by all cases, so it must also
//!   survive every earlier one.
//! * `catalog_*`: direct properties of `mcp_broker::catalog`: no panic, exposed names always match
//!   `^[A-Za-z0-9_-]{1,64}$`, and `route_uri` inverts `expose_uri` on a built catalog.
//!
//! The default case counts keep this file within a few seconds. A longer run (the count applies to
//! each property):
//!
//!     PROPTEST_CASES=2000 cargo test --release --test fuzz_envelope

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mcp_broker::audit::Audit;
use mcp_broker::broker::Broker;
use mcp_broker::catalog::{Catalog, Item, Listing, Namespace, expose_name, expose_uri, uri_prefix};
use mcp_broker::config::Config;
use mcp_broker::front::mcp::Front;
use proptest::prelude::*;
use rmcp::RoleServer;
use rmcp::model::JsonRpcMessage;
use rmcp::service::{RxJsonRpcMessage, ServiceExt};
use serde_json::{Value, json};
use support::proptest_cases as cases;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

// ---------------------------------------------------------------------------------------- broker

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// One broker for the whole file, in front of a prefixed and an unprefixed ledger.
fn broker() -> Arc<Broker> {
    static BROKER: OnceLock<Arc<Broker>> = OnceLock::new();
    BROKER
        .get_or_init(|| {
            let ledger = support::example_bin("ledger");
            let ledger = ledger.to_string_lossy();
            let text = format!(
                "[broker]\nlisten = \"127.0.0.1:0\"\n\n\
                 [servers.ledger]\ntransport = \"stdio\"\ncommand = {ledger:?}\nargs = [\"stdio\"]\ntimeout = \"3s\"\n\n\
                 [servers.plain]\ntransport = \"stdio\"\ncommand = {ledger:?}\nargs = [\"stdio\"]\nprefix = \"\"\ntimeout = \"3s\"\n"
            );
            let cfg = Config::parse(std::path::Path::new("fuzz_envelope.toml"), &text, &|_| None)
                .expect("config");
            runtime().block_on(async {
                let broker = Broker::new(Arc::new(cfg), Audit::disabled()).expect("broker");
                broker.start();
                broker
            })
        })
        .clone()
}

/// Run `f` on a thread with a 64 MiB stack, the broker built first (outside the runtime it blocks
/// on). Debug builds of rmcp's (de)serialisers and of these futures need more than a test thread's
/// 2 MiB.
fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let _ = broker();
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .expect("thread")
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// What the transport makes of one line (mirrors rmcp's `AsyncRwTransport::receive`).
#[derive(Debug, PartialEq)]
enum Expect {
    /// Not JSON (or ignored): no answer.
    Nothing,
    /// A request: exactly one answer carrying this id.
    Answer(Value),
    /// JSON that is no valid message: at most one error without an id.
    Invalid,
}

fn classify(line: &str) -> Expect {
    match serde_json::from_str::<RxJsonRpcMessage<RoleServer>>(line) {
        Ok(JsonRpcMessage::Request(_)) => serde_json::from_str::<Value>(line)
            .map(|v| Expect::Answer(v["id"].clone()))
            .unwrap_or(Expect::Nothing),
        Ok(_) => Expect::Nothing,
        Err(e) => match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                Expect::Nothing
            }
            _ => Expect::Invalid,
        },
    }
}

/// Ids a `notifications/cancelled` line names: their requests may go unanswered.
fn cancelled_ids(line: &str) -> Vec<Value> {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut visit = |m: &Value| {
        if m.get("method").and_then(Value::as_str) == Some("notifications/cancelled")
            && let Some(id) = m.pointer("/params/requestId")
        {
            out.push(id.clone());
        }
    };
    match &v {
        Value::Array(items) => items.iter().for_each(&mut visit),
        other => visit(other),
    }
    out
}

async fn send(
    w: &mut tokio::io::WriteHalf<tokio::io::DuplexStream>,
    l: String,
) -> Result<(), String> {
    let mut bytes = l.into_bytes();
    bytes.push(b'\n');
    w.write_all(&bytes).await.map_err(|e| format!("write: {e}"))
}

/// Record one line the broker wrote: the answer's id (`None` for notifications and requests).
fn record(
    line: &str,
    got: &mut HashMap<String, usize>,
    null_errors: &mut usize,
) -> Result<Option<Value>, String> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| format!("broker wrote a line that is not JSON ({e}): {line:.300}"))?;
    if v.get("method").is_some() {
        return Ok(None); // a notification or a request of the broker's own
    }
    if v.get("result").is_none() && v.get("error").is_none() {
        return Err(format!(
            "an answer with neither result nor error: {line:.300}"
        ));
    }
    match v.get("id") {
        None | Some(Value::Null) => *null_errors += 1,
        Some(id) => *got.entry(id.to_string()).or_default() += 1,
    }
    Ok(v.get("id").cloned())
}

/// Run one session: initialize, the batch, then a ping; returns a description of what went wrong.
async fn run_session(lines: Vec<String>) -> Result<(), String> {
    let broker = broker();
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (their_read, their_write) = tokio::io::split(theirs);
    let front = Front::new(broker);
    let server = tokio::spawn(async move {
        let transport = mcp_broker::front::relay::RawLists(
            rmcp::transport::async_rw::AsyncRwTransport::new_server(their_read, their_write),
        );
        if let Ok(s) = front.serve(transport).await {
            let _ = s.waiting().await;
        }
    });
    let (read, mut write) = tokio::io::split(ours);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(read).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });

    send(&mut write, json!({"jsonrpc": "2.0", "id": "~init~", "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "0"}}}).to_string()).await?;
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .map_err(|_| "no answer to initialize".to_string())?
        .ok_or("session closed before initialize was answered")?;
    let first: Value =
        serde_json::from_str(&first).map_err(|e| format!("initialize answer is not JSON: {e}"))?;
    if first.get("result").is_none() {
        return Err(format!("initialize failed: {first}"));
    }
    send(
        &mut write,
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
    )
    .await?;

    let mut want: HashMap<String, usize> = HashMap::new();
    let mut excused: HashSet<String> = HashSet::new();
    let mut invalid = 0usize;
    for l in &lines {
        match classify(l) {
            Expect::Answer(id) => *want.entry(id.to_string()).or_default() += 1,
            Expect::Invalid => invalid += 1,
            Expect::Nothing => {}
        }
        excused.extend(cancelled_ids(l).iter().map(Value::to_string));
    }
    for l in lines {
        send(&mut write, l).await?;
    }

    let mut got: HashMap<String, usize> = HashMap::new();
    let mut null_errors = 0usize;
    let answered = |got: &HashMap<String, usize>| {
        want.keys()
            .all(|k| excused.contains(k) || got.contains_key(k))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !answered(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => {
                record(&l, &mut got, &mut null_errors)?;
            }
            Ok(None) => return Err("the session closed during the batch".into()),
            Err(_) => {
                let missing: Vec<_> = want
                    .keys()
                    .filter(|k| !excused.contains(*k) && !got.contains_key(*k))
                    .map(|k| format!("{k:.80}"))
                    .collect();
                return Err(format!("no answer within 20 s for ids {missing:?}"));
            }
        }
    }
    // Still responsive: a ping after the batch is answered.
    send(
        &mut write,
        json!({"jsonrpc": "2.0", "id": "~ping~", "method": "ping"}).to_string(),
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(l)) => {
                if record(&l, &mut got, &mut null_errors)? == Some(json!("~ping~")) {
                    break;
                }
            }
            Ok(None) => return Err("the session closed before the ping was answered".into()),
            Err(_) => return Err("no answer to a ping after the batch within 10 s".into()),
        }
    }
    got.remove(&json!("~ping~").to_string());
    for (id, n) in &got {
        match want.get(id) {
            None => return Err(format!("an answer for id {id:.80} that no request carried")),
            Some(_) if *n > 1 => return Err(format!("{n} answers for id {id:.80}")),
            Some(_) => {}
        }
    }
    if null_errors > invalid {
        return Err(format!(
            "{null_errors} id-less errors for {invalid} invalid messages"
        ));
    }
    // Close the pipe (both halves of our end) and let the session end.
    reader.abort();
    let _ = reader.await;
    drop(write);
    drop(rx);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .map_err(|_| "the session did not end within 5 s of its pipe closing".to_string())?
        .map_err(|e| format!("the session task failed: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------- inputs

const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/roots/list_changed",
    "io.mcp-broker/raw/tools/list",
    "io.mcp-broker/raw/tools/call",
    "io.mcp-broker/raw/prompts/get",
    "io.mcp-broker/raw/resources/read",
    "io.mcp-broker/raw/resources/list",
    "io.mcp-broker/raw/nope",
    "sampling/createMessage",
    "roots/list",
    "tasks/get",
];

const NAMES: &[&str] = &[
    "ledger__get_account",
    "ledger__list_accounts",
    "ledger__list_transactions",
    "ledger__reconcile_ledger",
    "ledger__update_account_status",
    "get_account",
    "list_accounts",
    "reconcile_ledger",
    "ledger__",
    "__",
    "",
    "ledger__account_summary",
    "account_summary",
    "LEDGER__get_account",
    "ledger__get_account\u{0}",
    "ledger__../../etc/passwd",
];

const URIS: &[&str] = &[
    "ledger+ledger://accounts/ACC-1001",
    "ledger://accounts/ACC-1001",
    "ledger+ledger://policies/overdraft",
    "ledger+",
    "+",
    "LEDGER+ledger://accounts/ACC-1001",
    "ledger+ledger://accounts/%2e%2e/%2E%2e/x",
    "ledger+ledger://ACCOUNTS/../accounts/ACC-1001",
    "ledger+ledger+ledger://x",
    "plain+x",
    "file:///etc/passwd",
    "",
    "ledger+ledger://accounts/{id}",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,40}",
        1 => "[a-z_+:/%.]{0,30}",
        1 => (prop::sample::select(vec!['a', '_', '+', '/', 'é', '\u{1F600}', '%']), 1usize..70_000)
            .prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(NAMES).prop_map(str::to_string),
        2 => text(),
        1 => (prop::sample::select(NAMES), text()).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

fn uri() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(URIS).prop_map(str::to_string),
        2 => text(),
        2 => (prop::sample::select(URIS), text()).prop_map(|(a, b)| format!("{a}{b}")),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        text().prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("\\PC{0,12}", inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn meta() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => Just(None),
        1 => leaf().prop_map(|t| Some(json!({"progressToken": t}))),
        1 => Just(Some(json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28"}))),
        1 => value().prop_map(Some),
    ]
}

fn params() -> impl Strategy<Value = Option<Value>> {
    let shaped = prop_oneof![
        (name(), value()).prop_map(|(n, a)| json!({"name": n, "arguments": a})),
        (name(), prop::collection::vec(("[a-z_]{1,12}", text()), 0..4)).prop_map(|(n, a)| {
            json!({"name": n, "arguments": a.into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<String, Value>>()})
        }),
        uri().prop_map(|u| json!({"uri": u})),
        (name(), uri(), text(), text()).prop_map(|(n, u, a, v)| {
            json!({"ref": {"type": "ref/prompt", "name": n, "uri": u}, "argument": {"name": a, "value": v}})
        }),
        (uri(), text()).prop_map(|(u, v)| {
            json!({"ref": {"type": "ref/resource", "uri": u}, "argument": {"name": "id", "value": v}})
        }),
        prop::sample::select(vec!["debug", "info", "emergency", "nope", ""])
            .prop_map(|l| json!({"level": l})),
        text().prop_map(|c| json!({"cursor": c})),
        (leaf(), text()).prop_map(|(id, r)| json!({"requestId": id, "reason": r})),
        (leaf(), leaf(), leaf()).prop_map(|(t, p, total)| {
            json!({"progressToken": t, "progress": p, "total": total})
        }),
    ];
    (
        prop_oneof![1 => Just(None), 1 => value().prop_map(Some), 3 => shaped.prop_map(Some)],
        meta(),
    )
        .prop_map(|(p, m)| match (p, m) {
            (Some(Value::Object(mut o)), Some(m)) => {
                o.insert("_meta".into(), m);
                Some(Value::Object(o))
            }
            (p, _) => p,
        })
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => prop::sample::select(METHODS).prop_map(str::to_string),
        1 => text(),
    ]
}

/// An id shape; the line's index makes a well-formed id unique within its batch.
#[derive(Debug, Clone)]
enum IdShape {
    Str,
    Num,
    Neg,
    Long,
    Weird(Value),
}

fn id_shape() -> impl Strategy<Value = IdShape> {
    prop_oneof![
        4 => Just(IdShape::Str),
        3 => Just(IdShape::Num),
        1 => Just(IdShape::Neg),
        1 => Just(IdShape::Long),
        1 => prop_oneof![
            Just(json!(null)),
            Just(json!(1.5)),
            Just(json!({})),
            Just(json!([1])),
            Just(json!(true)),
            Just(json!(u64::MAX)),
            Just(json!(1e300)),
        ]
        .prop_map(IdShape::Weird),
    ]
}

fn id_of(shape: &IdShape, i: usize) -> Value {
    match shape {
        IdShape::Str => json!(format!("~{i}~")),
        IdShape::Num => json!(1_000_000_000_000i64 + i as i64),
        IdShape::Neg => json!(-1_000_000_000_000i64 - i as i64),
        IdShape::Long => json!(format!("~{i}~{}", "x".repeat(20_000))),
        IdShape::Weird(v) => v.clone(),
    }
}

/// A line before ids are assigned.
#[derive(Debug, Clone)]
enum Msg {
    Request(IdShape, String, Option<Value>, u8),
    Notification(String, Option<Value>),
    Response(IdShape, Value),
    Batch(Vec<(String, Option<Value>)>),
    Raw(String),
    Truncated(IdShape, String, Option<Value>, usize),
    Scalar(Value),
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        8 => (id_shape(), method(), params(), 0u8..8).prop_map(|(i, m, p, e)| Msg::Request(i, m, p, e)),
        2 => (method(), params()).prop_map(|(m, p)| Msg::Notification(m, p)),
        1 => (id_shape(), value()).prop_map(|(i, v)| Msg::Response(i, v)),
        1 => prop::collection::vec((method(), params()), 0..4).prop_map(Msg::Batch),
        1 => "\\PC{0,200}".prop_map(Msg::Raw),
        1 => (id_shape(), method(), params(), any::<usize>()).prop_map(|(i, m, p, c)| Msg::Truncated(i, m, p, c)),
        1 => leaf().prop_map(Msg::Scalar),
    ]
}

fn request(id: Value, method: &str, params: &Option<Value>) -> Value {
    let mut v = json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let Some(p) = params {
        v["params"] = p.clone();
    }
    v
}

fn render(i: usize, m: &Msg) -> String {
    match m {
        Msg::Request(shape, method, params, envelope) => {
            let mut v = request(id_of(shape, i), method, params);
            // Envelope mutations.
            match envelope {
                1 => {
                    v.as_object_mut().map(|o| o.remove("jsonrpc"));
                }
                2 => v["jsonrpc"] = json!("1.0"),
                3 => v["extra"] = json!({"x": 1}),
                4 => v["result"] = json!({}),
                5 => v["jsonrpc"] = json!(2.0),
                _ => {}
            }
            v.to_string()
        }
        Msg::Notification(method, params) => {
            let mut v = json!({"jsonrpc": "2.0", "method": method});
            if let Some(p) = params {
                v["params"] = p.clone();
            }
            v.to_string()
        }
        Msg::Response(shape, v) => {
            json!({"jsonrpc": "2.0", "id": id_of(shape, i), "result": v}).to_string()
        }
        Msg::Batch(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(k, (m, p))| request(json!(format!("~{i}.{k}~")), m, p))
                .collect(),
        )
        .to_string(),
        Msg::Raw(s) => s.clone(),
        Msg::Truncated(shape, method, params, cut) => {
            let s = request(id_of(shape, i), method, params).to_string();
            let mut at = cut % s.len().max(1);
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s[..at].to_string()
        }
        Msg::Scalar(v) => v.to_string(),
    }
}

// ---------------------------------------------------------------------------------------- properties

#[test]
fn envelope_every_request_is_answered_once() {
    // Proptest's strategy trees for these nested inputs, and rmcp's deserialisers in debug builds,
    // need more than a test thread's stack: the whole run happens on a big-stack thread.
    on_big_stack(|| {
        let mut runner = proptest::test_runner::TestRunner::new(cases(12));
        let out = runner.run(&prop::collection::vec(msg(), 1..24), |msgs| {
            let lines: Vec<String> = msgs.iter().enumerate().map(|(i, m)| render(i, m)).collect();
            if let Err(e) = runtime().block_on(run_session(lines.clone())) {
                let shown: Vec<String> = lines.iter().map(|l| format!("{l:.300}")).collect();
                return Err(TestCaseError::fail(format!(
                    "{e}\nlines:\n{}",
                    shown.join("\n")
                )));
            }
            Ok(())
        });
        if let Err(e) = out {
            panic!("{e}");
        }
    });
}

#[test]
fn envelope_concurrent_sessions_stay_responsive() {
    // A few sessions at once, each with a fixed hostile batch, then a normal one.
    let hostile = vec![
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "a".repeat(200_000)}}).to_string(),
        json!({"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": format!("ledger+{}", "/".repeat(200_000))}}).to_string(),
        json!({"jsonrpc": "2.0", "id": 3, "method": "resources/subscribe", "params": {"uri": "x".repeat(100_000)}}).to_string(),
        json!({"jsonrpc": "2.0", "id": 4, "method": "completion/complete", "params": {"ref": {"type": "ref/resource", "uri": "ledger+ledger://accounts/{id}"}, "argument": {"name": "id", "value": "A"}}}).to_string(),
        json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "ledger__get_account", "arguments": {"account_id": "ACC-1001"}}}).to_string(),
        "{\"jsonrpc\":\"2.0\",\"id\":6,\"method\":\"tools/list\",\"params\":".to_string(),
        json!([{"jsonrpc": "2.0", "id": 7, "method": "ping"}]).to_string(),
    ];
    on_big_stack(move || {
        runtime().block_on(async {
            let runs: Vec<_> = (0..4)
                .map(|_| tokio::spawn(run_session(hostile.clone())))
                .collect();
            for r in runs {
                r.await.expect("join").expect("session");
            }
        })
    });
}

fn listing(tools: &[String], resources: &[String], templates: &[String]) -> Listing {
    let item = |k: &str, v: &str| {
        let Value::Object(o) = json!({k: v, "description": "d"}) else {
            unreachable!()
        };
        Item::new(o)
    };
    Listing {
        tools: tools.iter().map(|t| item("name", t)).collect(),
        prompts: tools.iter().map(|t| item("name", t)).collect(),
        resources: resources.iter().map(|r| item("uri", r)).collect(),
        templates: templates.iter().map(|r| item("uriTemplate", r)).collect(),
        fresh_until: Default::default(),
    }
}

fn name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn catalog_expose_name_is_always_valid(prefix in prop_oneof![Just(String::new()), text()], sep in "[A-Za-z0-9_-]{1,4}", n in name()) {
        let e = expose_name(&prefix, &sep, &n);
        prop_assert!(name_ok(&e), "{e:?} from {prefix:?} {sep:?} {n:?}");
        // Stable.
        prop_assert_eq!(&e, &expose_name(&prefix, &sep, &n));
    }

    #[test]
    fn catalog_uri_prefix_is_a_scheme(prefix in text()) {
        let p = uri_prefix(&prefix);
        prop_assert!(prefix.is_empty() == p.is_empty());
        if !p.is_empty() {
            prop_assert!(p.starts_with(|c: char| c.is_ascii_lowercase()), "{p:?}");
            prop_assert!(p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'), "{p:?}");
            prop_assert!(!p.contains('+'));
        }
        // The exposed URI splits back at the first `+`.
        let u = expose_uri(&p, "x+y://z");
        if !p.is_empty() {
            prop_assert_eq!(u.split_once('+'), Some((p.as_str(), "x+y://z")));
        }
    }

    #[test]
    fn catalog_route_uri_inverts_expose_uri(
        prefixes in prop::collection::vec("[A-Za-z][A-Za-z0-9_-]{0,10}", 1..4),
        unprefixed in any::<bool>(),
        tools in prop::collection::vec(name(), 0..4),
        resources in prop::collection::vec(uri(), 0..5),
        templates in prop::collection::vec(uri(), 0..3),
        probe in uri(),
    ) {
        // Distinct servers with distinct URI prefixes (`check` refuses colliding ones).
        let mut seen = HashSet::new();
        let mut namespaces = Vec::new();
        for (i, p) in prefixes.iter().enumerate() {
            if !seen.insert(uri_prefix(p)) {
                continue;
            }
            namespaces.push(Namespace {
                server: Arc::from(format!("s{i}").as_str()),
                prefix: p.clone(),
                uri_prefix: uri_prefix(p),
                tools: Default::default(),
            });
        }
        if unprefixed {
            namespaces.push(Namespace {
                server: Arc::from("bare"),
                prefix: String::new(),
                uri_prefix: String::new(),
                tools: Default::default(),
            });
        }
        let mut listings = HashMap::new();
        for ns in &namespaces {
            listings.insert(ns.server.clone(), listing(&tools, &resources, &templates));
        }
        let (cat, _collisions) = Catalog::build(&namespaces, &listings, "__", None);
        for t in &cat.tools.entries {
            prop_assert!(name_ok(t.item.str("name")), "{:?}", t.item.str("name"));
        }
        for e in &cat.resources.entries {
            let exposed = e.item.str("uri");
            let r = cat.route_uri(exposed);
            prop_assert_eq!(r.as_ref().map(|r| (&*r.server, r.original.as_str())), Some((&*e.server, e.original.as_str())), "listed {:?}", exposed);
        }
        for ns in &namespaces {
            for u in resources.iter().chain(std::iter::once(&probe)) {
                let exposed = expose_uri(&ns.uri_prefix, u);
                prop_assert_eq!(cat.expose_uri_of(&ns.server, u), exposed.clone());
                let r = cat.route_uri(&exposed);
                if ns.uri_prefix.is_empty() {
                    // An unprefixed server's URI may also belong to a prefixed one; only no panic.
                    continue;
                }
                // A listed entry of another server never has this prefix's `+` form unless
                // the URI itself starts with it; then the listing decides.
                if let Some(e) = cat.resources.get(&exposed) {
                    prop_assert_eq!(r.as_ref().map(|r| r.original.clone()), Some(e.original.clone()));
                } else {
                    prop_assert_eq!(r.as_ref().map(|r| (&*r.server, r.original.as_str())), Some((&*ns.server, u.as_str())), "unlisted {:?}", exposed);
                }
            }
        }
        // An arbitrary probe never panics.
        let _ = cat.route_uri(&probe);
    }
}
