//! Every configuration we ship must validate, through the same path `mcp-broker check` takes.

use std::path::Path;

#[test]
fn default_servers_toml_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("servers.toml");
    let c = mcp_broker::config::Config::load(&path).expect("servers.toml validates");
    let names: Vec<&str> = c.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["ledger", "directory"]);
    assert!(
        c.broker.listen.ip().is_loopback(),
        "the default must bind loopback"
    );
}

#[test]
fn check_command_reports_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[broker]\nlisten = \"127.0.0.1:0\"\n\n[servers.a]\ntransport = \"stdio\"\ncomand = \"x\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mcp-broker"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:", path.display())) && err.contains("comand"),
        "{err}"
    );
}

#[test]
fn example_rego_policy_compiles_and_decides() {
    let text = format!(
        "[policy_engine]\nrego = \"{}\"\n",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/policies/broker.rego")
            .display()
    );
    let c =
        mcp_broker::config::Config::parse(Path::new("p.toml"), &text, &|_| None).expect("parses");
    let policy = mcp_broker::broker::build_policy(&c).expect("the shipped Rego policy compiles");
    let bob = mcp_broker::auth::Caller::anonymous();
    use mcp_broker::policy::Kind;
    let d = policy.decide(&bob, "ledger", Kind::Tool, "get_customer_pii");
    assert!(!d.allow);
    assert_eq!(d.reason, "PII access requires the pii:read scope.");
    assert!(
        policy
            .decide(&bob, "ledger", Kind::Tool, "list_accounts")
            .allow
    );
    let close = serde_json::json!({"account_id": "ACC-1", "status": "closed"});
    assert!(
        !policy
            .decide_call(
                &bob,
                "ledger",
                Kind::Tool,
                "update_account_status",
                close.as_object()
            )
            .allow
    );
}
