//! The same /mcp endpoint serves initialize-based sessions and the 2026-07-28 stateless revision, driven
//! here by rmcp's own client against the real broker binary and the real example upstreams.

mod support;

use std::time::Duration;

use rmcp::model::{CallToolRequestParams, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ServiceExt, model::ClientConfig};

fn config() -> String {
    format!(
        "[servers.ledger]\ntransport = \"stdio\"\ncommand = \"{}\"\nargs = [\"stdio\"]\n\n[servers.directory]\ntransport = \"stdio\"\ncommand = \"{}\"\n",
        support::example_bin("ledger").display(),
        support::example_bin("identity_directory").display(),
    )
}

async fn exercise(lifecycle: Option<ClientLifecycleMode>, expect: ProtocolVersion) {
    let broker = support::start_broker(&config());
    let transport = StreamableHttpClientTransport::from_uri(broker.url.as_str());
    let client = match lifecycle {
        None => ClientConfig::default().serve(transport).await,
        Some(l) => {
            ClientConfig::default()
                .serve_with_lifecycle(transport, l)
                .await
        }
    }
    .expect("client connects");
    let version = client
        .peer()
        .peer_info()
        .map(|i| i.protocol_version.clone());
    assert_eq!(version, Some(expect));

    let tools = support::eventually(Duration::from_secs(30), || async {
        let t = client.peer().list_all_tools().await.ok()?;
        let names: Vec<String> = t.iter().map(|t| t.name.to_string()).collect();
        (names.iter().any(|n| n == "ledger__get_account")
            && names.iter().any(|n| n == "directory__lookup_user"))
        .then_some(names)
    })
    .await;
    assert!(tools.iter().all(|n| {
        n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }));

    let mut args = serde_json::Map::new();
    args.insert("account_id".into(), "ACC-1001".into());
    let r = client
        .peer()
        .call_tool(CallToolRequestParams::new("ledger__get_account").with_arguments(args))
        .await
        .expect("call");
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let structured = r
        .structured_content
        .expect("structured content passes through");
    assert_eq!(structured["account"]["account_id"], "ACC-1001");

    let err = client
        .peer()
        .call_tool(CallToolRequestParams::new("nope__nope"))
        .await
        .expect_err("unknown tool is a JSON-RPC error");
    assert!(err.to_string().contains("nope__nope"), "{err}");
    let _ = client.cancel().await;
}

#[tokio::test]
async fn initialize_session_2025_11_25() {
    exercise(None, ProtocolVersion::V_2025_11_25).await;
}

#[tokio::test]
async fn stateless_2026_07_28_discover() {
    exercise(
        Some(ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        }),
        ProtocolVersion::V_2026_07_28,
    )
    .await;
}
