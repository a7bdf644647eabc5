//! `[cluster] share_credentials`: exchanged tokens and Vault secrets shared between instances
//! through a real Redis, sealed. Each test starts its own `redis-server` on a free port (killed on
//! drop), and stand-ins for the token endpoint and Vault that count their hits. Without
//! `redis-server` on PATH these tests fail, unless `MCP_BROKER_SKIP_REDIS=1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use mcp_broker::auth::Caller;
use mcp_broker::cluster::Cluster;
use mcp_broker::config::{Config, Secret, UpstreamAuth};
use mcp_broker::credentials::Credentials;
use support::Redis;
use tokio_util::sync::CancellationToken;

mod support;

const SUBJECT_TOKEN: &str = "subject-token-of-alice-7f3a";
const SUB: &str = "alice@example.com";
const CLIENT_SECRET: &str = "sts-client-secret-91bc";
const VAULT_VALUE: &str = "vault-held-github-token-5d2e";
const KEY_A: &str = "cluster-secret-key-aaaaaaaaaaaaaaaaaaaaaaaa";
const KEY_B: &str = "cluster-secret-key-bbbbbbbbbbbbbbbbbbbbbbbb";

// -- stand-ins for the token endpoint and Vault ------------------------------------------------------

#[derive(Clone)]
struct Counters {
    sts: Arc<AtomicU64>,
    vault: Arc<AtomicU64>,
    /// The token endpoint's `expires_in`.
    lifetime: u64,
}

/// Every exchange issues a new token, so a token says which exchange made it.
async fn token(State(c): State<Counters>) -> Json<serde_json::Value> {
    let n = c.sts.fetch_add(1, Ordering::SeqCst) + 1;
    Json(serde_json::json!({
        "access_token": format!("exchanged-token-{n}-c0ffee"),
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": c.lifetime,
    }))
}

async fn secret(State(c): State<Counters>) -> Json<serde_json::Value> {
    c.vault.fetch_add(1, Ordering::SeqCst);
    Json(serde_json::json!({ "data": { "data": { "token": VAULT_VALUE } } }))
}

async fn idp(lifetime: u64) -> (Counters, String) {
    let c = Counters {
        sts: Default::default(),
        vault: Default::default(),
        lifetime,
    };
    let app = Router::new()
        .route("/token", post(token))
        .route("/v1/secret/data/users/{sub}/github", get(secret))
        .with_state(c.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (c, base)
}

// -- one broker instance's resolver --------------------------------------------------------------------

struct Instance {
    creds: Credentials,
    config: Config,
    stop: CancellationToken,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Instance {
    fn auth(&self, server: &str) -> &UpstreamAuth {
        self.config
            .servers
            .iter()
            .find(|s| s.name == server)
            .and_then(|s| s.upstream_auth.as_ref())
            .unwrap()
    }

    async fn exchanged(&self, fresh: bool) -> String {
        let c = self
            .creds
            .resolve_with(self.auth("ledger"), &alice(), None, fresh)
            .await
            .unwrap();
        c.env[0].1.expose().to_string()
    }

    async fn vault(&self) -> String {
        let c = self
            .creds
            .resolve(self.auth("github"), &alice(), None)
            .await
            .unwrap();
        c.headers[0].1.expose().to_string()
    }
}

fn alice() -> Caller {
    let mut c = Caller::anonymous();
    c.sub = SUB.into();
    c.authenticated = true;
    c.token = Some(Secret::new(SUBJECT_TOKEN));
    c
}

/// A resolver as the broker builds it, against `redis_port`; waits until the cluster is up unless
/// `expect_down`.
async fn instance(
    base: &str,
    redis_port: u16,
    secret: &str,
    share: bool,
    expect_down: bool,
) -> Instance {
    let text = format!(
        r#"
[credentials.sts]
kind = "token_exchange"
token_endpoint = "{base}/token"
client_id = "mcp-broker"
client_secret = "${{STS_SECRET}}"

[credentials.vault]
kind = "vault"
address = "{base}"
login = {{ method = "token", token = "${{VAULT_TOKEN}}" }}
cache_ttl = "60s"

[servers.ledger]
transport = "http"
url = "http://127.0.0.1:9/mcp"
upstream_auth = {{ use = "sts", audience = "https://ledger.internal/mcp", scopes = ["ledger:read"] }}

[servers.github]
transport = "http"
url = "http://127.0.0.1:9/mcp"
upstream_auth = {{ use = "vault", path = "secret/data/users/{{sub}}/github", field = "token", header = "Authorization", format = "Bearer {{value}}" }}

[cluster]
redis_url = "redis://127.0.0.1:{redis_port}"
secret_key = "${{CLUSTER_KEY}}"
share_credentials = {share}
"#
    );
    let secret = secret.to_string();
    let env = move |k: &str| match k {
        "STS_SECRET" => Some(CLIENT_SECRET.to_string()),
        "VAULT_TOKEN" => Some("vault-root-token".to_string()),
        "CLUSTER_KEY" => Some(secret.clone()),
        _ => None,
    };
    let config = Config::parse(std::path::Path::new("servers.toml"), &text, &env).unwrap();
    let stop = CancellationToken::new();
    let cluster = Cluster::start(
        config.cluster.clone().unwrap(),
        Duration::from_secs(60),
        stop.clone(),
    )
    .unwrap();
    if !expect_down {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster.is_up() {
            assert!(Instant::now() < deadline, "the cluster never reached Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let creds = Credentials::with_cluster(&config, Some(&cluster)).unwrap();
    Instance {
        creds,
        config,
        stop,
    }
}

// -- reading Redis back ------------------------------------------------------------------------------

async fn redis_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key in Redis, with its serialized value (`DUMP`) and its string value (`GET`) if any.
async fn everything(port: u16) -> Vec<(String, Vec<u8>, Option<Vec<u8>>)> {
    let mut c = redis_conn(port).await;
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = Vec::new();
    for k in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        let value: Option<Vec<u8>> = if kind == "string" {
            redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap()
        } else {
            None
        };
        out.push((k, dump.unwrap_or_default(), value));
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

async fn cred_keys(port: u16) -> Vec<String> {
    everything(port)
        .await
        .into_iter()
        .map(|(k, _, _)| k)
        .filter(|k| k.starts_with("mcpb:cred:"))
        .collect()
}

// -- the tests ----------------------------------------------------------------------------------------

#[tokio::test]
async fn a_second_instance_uses_what_the_first_exchanged_and_redis_holds_nothing_in_clear() {
    let Some(r) = Redis::start() else { return };
    let (hits, base) = idp(300).await;
    let a = instance(&base, r.port, KEY_A, true, false).await;
    let b = instance(&base, r.port, KEY_A, true, false).await;

    let first = a.exchanged(false).await;
    assert_eq!(first, "exchanged-token-1-c0ffee");
    assert_eq!(hits.sts.load(Ordering::SeqCst), 1);
    assert_eq!(b.exchanged(false).await, first, "b exchanged again");
    assert_eq!(
        hits.sts.load(Ordering::SeqCst),
        1,
        "b called the token endpoint"
    );

    assert_eq!(a.vault().await, format!("Bearer {VAULT_VALUE}"));
    assert_eq!(b.vault().await, format!("Bearer {VAULT_VALUE}"));
    assert_eq!(hits.vault.load(Ordering::SeqCst), 1, "b read Vault again");

    let keys = cred_keys(r.port).await;
    assert_eq!(
        keys.len(),
        2,
        "one exchanged token, one Vault secret: {keys:?}"
    );
    for (key, dump, value) in everything(r.port).await {
        for clear in [
            SUBJECT_TOKEN,
            SUB,
            "alice",
            CLIENT_SECRET,
            VAULT_VALUE,
            "exchanged-token-",
            "ledger",
            "github",
        ] {
            assert!(!key.contains(clear), "`{clear}` in the key name {key}");
            assert!(!contains(&dump, clear), "`{clear}` in the value of {key}");
            assert!(
                !value.as_deref().is_some_and(|v| contains(v, clear)),
                "`{clear}` in the value of {key}"
            );
        }
    }

    // A value copied under another name does not open: c finds nothing and exchanges.
    let mut conn = redis_conn(r.port).await;
    let mut values = Vec::new();
    for k in &keys {
        let v: String = redis::cmd("GET")
            .arg(k)
            .query_async(&mut conn)
            .await
            .unwrap();
        values.push(v);
    }
    // Swap the two entries' values (each still under an existing name).
    for (k, v) in keys.iter().zip(values.iter().rev()) {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg(v)
            .arg("EX")
            .arg(300)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let c = instance(&base, r.port, KEY_A, true, false).await;
    assert_eq!(c.exchanged(false).await, "exchanged-token-2-c0ffee");
    assert_eq!(c.vault().await, format!("Bearer {VAULT_VALUE}"));
    assert_eq!(hits.vault.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn fresh_bypasses_and_overwrites_the_shared_entry() {
    let Some(r) = Redis::start() else { return };
    let (hits, base) = idp(300).await;
    let a = instance(&base, r.port, KEY_A, true, false).await;
    let b = instance(&base, r.port, KEY_A, true, false).await;
    assert_eq!(a.exchanged(false).await, "exchanged-token-1-c0ffee");
    // The upstream refused token 1 at b: b exchanges again, and the shared entry is token 2.
    assert_eq!(b.exchanged(true).await, "exchanged-token-2-c0ffee");
    let c = instance(&base, r.port, KEY_A, true, false).await;
    assert_eq!(c.exchanged(false).await, "exchanged-token-2-c0ffee");
    assert_eq!(hits.sts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn another_secret_key_does_not_read_the_entries() {
    let Some(r) = Redis::start() else { return };
    let (hits, base) = idp(300).await;
    let a = instance(&base, r.port, KEY_A, true, false).await;
    let rotated = instance(&base, r.port, KEY_B, true, false).await;
    assert_eq!(a.exchanged(false).await, "exchanged-token-1-c0ffee");
    assert_eq!(rotated.exchanged(false).await, "exchanged-token-2-c0ffee");
    assert_eq!(hits.sts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_share_credentials_nothing_is_written() {
    let Some(r) = Redis::start() else { return };
    let (hits, base) = idp(300).await;
    let a = instance(&base, r.port, KEY_A, false, false).await;
    let b = instance(&base, r.port, KEY_A, false, false).await;
    a.exchanged(false).await;
    a.vault().await;
    b.exchanged(false).await;
    b.vault().await;
    assert_eq!(
        hits.sts.load(Ordering::SeqCst),
        2,
        "each instance exchanges"
    );
    assert_eq!(hits.vault.load(Ordering::SeqCst), 2);
    assert!(cred_keys(r.port).await.is_empty());
    for (key, dump, _) in everything(r.port).await {
        assert!(
            !contains(&dump, "exchanged-token-") && !contains(&dump, VAULT_VALUE),
            "a credential under {key}"
        );
    }
}

#[tokio::test]
async fn the_entry_expires_with_the_token() {
    let Some(r) = Redis::start() else { return };
    // A 2 s token is reused until 1.8 s (the margin is a tenth of short lifetimes).
    let (hits, base) = idp(2).await;
    let a = instance(&base, r.port, KEY_A, true, false).await;
    a.exchanged(false).await;
    let keys = cred_keys(r.port).await;
    assert_eq!(keys.len(), 1);
    let mut conn = redis_conn(r.port).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1000..=1800).contains(&pttl), "PTTL {pttl} ms");
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "still there after the token's lifetime");
    let b = instance(&base, r.port, KEY_A, true, false).await;
    assert_eq!(b.exchanged(false).await, "exchanged-token-2-c0ffee");
    assert_eq!(hits.sts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn redis_unreachable_means_local_only() {
    // Nothing listens on this port: the resolver works as without a cluster.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let (hits, base) = idp(300).await;
    let a = instance(&base, port, KEY_A, true, true).await;
    let started = Instant::now();
    assert_eq!(a.exchanged(false).await, "exchanged-token-1-c0ffee");
    assert_eq!(a.exchanged(false).await, "exchanged-token-1-c0ffee");
    assert_eq!(a.vault().await, format!("Bearer {VAULT_VALUE}"));
    assert_eq!(hits.sts.load(Ordering::SeqCst), 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "Redis slowed it"
    );
}
