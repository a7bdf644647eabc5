//! `mcp-broker tokens list|revoke` against the real broker binary serving `[token_store]`: a store
//! file seeded through the library, an RFC 7662 stand-in that knows an admin token and a user
//! token, and the CLI run as a process. The list never shows a secret; a revoke reaches the file.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use axum::Router;
use axum::routing::post;
use mcp_broker::config::{Secret, TokenStoreConfig};
use mcp_broker::oauth::store::{TokenEntry, TokenStore};

mod support;

const KEY: &str = "token-store-key-for-the-cli-test-0123456789";
const ACCESS: &str = "upstream-access-token-5e4d3c";
const REFRESH: &str = "upstream-refresh-token-2b1a09";
const ADMIN: &str = "opaque-admin-token";
const USER: &str = "opaque-user-token";

fn entry(sub: &str, server: &str) -> TokenEntry {
    TokenEntry {
        sub: sub.into(),
        server: server.into(),
        kind: "oauth".into(),
        issuer: Some("https://as.upstream.example".into()),
        client_id: Some("broker".into()),
        scopes: vec!["read".into()],
        expires_at: Some(1_900_000_000),
        updated_at: 1_800_000_000,
        secret: Secret::new(format!(
            r#"{{"access_token":"{ACCESS}-{sub}","refresh_token":"{REFRESH}-{sub}"}}"#
        )),
    }
}

/// RFC 7662: the admin token holds `mcp:admin`, the user token does not; anything else is inactive.
async fn introspection() -> String {
    let app = Router::new().route(
        "/introspect",
        post(|body: String| async move {
            let token = url::form_urlencoded::parse(body.as_bytes())
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            axum::Json(match token.as_str() {
                ADMIN => serde_json::json!({"active": true, "sub": "ops", "scope": "mcp:admin"}),
                USER => serde_json::json!({"active": true, "sub": "bob", "scope": "mcp"}),
                _ => serde_json::json!({"active": false}),
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/introspect")
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mcp-broker tokens ARGS…`: (exit code, stdout, stderr).
async fn tokens(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(support::broker_bin())
        .arg("tokens")
        .args(args)
        .env_remove("MCP_BROKER_TOKEN")
        .output()
        .await
        .expect("run mcp-broker tokens");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_revoke_through_the_admin_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store_cfg = TokenStoreConfig {
        path: dir.path().join("tokens.json"),
        key: Secret::new(KEY),
    };
    let seeded = TokenStore::open(&store_cfg).await.unwrap();
    seeded.put(entry("alice", "github")).await.unwrap();
    seeded.put(entry("bob", "github")).await.unwrap();
    drop(seeded);

    let introspect = introspection().await;
    let config = dir.path().join("servers.toml");
    std::fs::write(
        &config,
        format!(
            r#"[broker]
listen = "127.0.0.1:0"

[auth]
issuer = "https://as.example"
jwks_uri = "http://127.0.0.1:9/jwks"
admin_scopes = ["mcp:admin"]
introspection = {{ endpoint = "{introspect}", client_id = "broker", client_secret = "s" }}

[token_store]
path = "tokens.json"
key = "${{TOKEN_STORE_KEY}}"
"#
        ),
    )
    .unwrap();
    let mut child = Command::new(support::broker_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env("TOKEN_STORE_KEY", KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn broker");
    let stdout = child.stdout.take().unwrap();
    let _broker = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let mcp = line
        .trim()
        .strip_prefix("mcp-broker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let url = mcp.replace("/mcp", "/admin/tokens");
    let target = ["--config", config.to_str().unwrap(), "--url", &url];

    // The table shows both, and no secret.
    let (code, out, err) = tokens(&[&["list"][..], &target, &["--token", ADMIN]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("SUB"), "{out}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].starts_with("alice") && rows[0].contains("github"),
        "{out}"
    );
    assert!(rows[1].starts_with("bob"), "{out}");
    assert!(out.contains("2030-03-17T17:46:40Z"), "{out}");
    // The JSON too.
    let (code, out, err) =
        tokens(&[&["list", "--json"][..], &target, &["--token", ADMIN]].concat()).await;
    assert_eq!(code, 0, "{out}{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["tokens"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(json["tokens"][0]["scopes"][0], "read");
    assert!(!out.contains(ACCESS) && !out.contains(REFRESH), "{out}");
    assert!(json["tokens"][0].get("secret").is_none(), "{out}");

    // A token without an admin scope: 403, exit 1. No token: 401.
    let (code, out, err) = tokens(&[&["list"][..], &target, &["--token", USER]].concat()).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("403"), "{err}");
    let (code, _, err) = tokens(&[&["revoke", "--sub", "alice"][..], &target].concat()).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = tokens(
        &[
            &["revoke", "--sub", "alice"][..],
            &target,
            &["--token", USER],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("403"), "{err}");
    // DELETE naming nothing is refused by the broker itself.
    let resp = reqwest::Client::new()
        .delete(&url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Revoking alice removes hers only.
    let (code, out, err) = tokens(
        &[
            &["revoke", "--sub", "alice"][..],
            &target,
            &["--token", ADMIN],
        ]
        .concat(),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("removed 1 token\n"), "{out}");
    assert!(out.contains("alice") && !out.contains("bob"), "{out}");
    let (code, out, _) =
        tokens(&[&["list", "--sub", "bob"][..], &target, &["--token", ADMIN]].concat()).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (_, out, _) = tokens(&[&["list"][..], &target, &["--token", ADMIN]].concat()).await;
    assert!(!out.contains("alice") && out.contains("bob"), "{out}");

    // And the file no longer yields it.
    drop(_broker);
    let reopened = TokenStore::open(&store_cfg).await.unwrap();
    assert!(reopened.get("alice", "github").await.unwrap().is_none());
    let bob = reopened.get("bob", "github").await.unwrap().expect("kept");
    assert!(bob.secret.expose().contains(&format!("{ACCESS}-bob")));
}
