//! The upstream token store under `[cluster]`: entries in the Redis hash `mcpb:tok`, sealed with
//! the cluster's `secret_key`, readable by every instance holding that key and by nothing else.
//! Starts its own `redis-server` (see `support::Redis`; `MCP_BROKER_SKIP_REDIS=1` skips).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_broker::cluster::Cluster;
use mcp_broker::config::{ClusterConfig, Secret};
use mcp_broker::oauth::store::{StoreError, TokenEntry, TokenStore};
use support::Redis;
use tokio_util::sync::CancellationToken;

mod support;

const KEY: &str = "cluster-secret-key-aaaaaaaaaaaaaaaaaaaaaaaa";
const OTHER_KEY: &str = "cluster-secret-key-bbbbbbbbbbbbbbbbbbbbbbbb";
const ACCESS: &str = "gho_upstream-access-token-9f8e7d";
const REFRESH: &str = "ghr_upstream-refresh-token-6c5b4a";
const SUB: &str = "alice@example.com";
const SERVER: &str = "github-enterprise";

struct Instance {
    store: TokenStore,
    stop: CancellationToken,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn instance(port: u16, key: &str) -> Instance {
    let stop = CancellationToken::new();
    let cluster: Arc<Cluster> = Cluster::start(
        ClusterConfig {
            redis_url: Secret::new(format!("redis://127.0.0.1:{port}")),
            instance_id: "test".into(),
            secret_key: Secret::new(key),
            share_credentials: false,
        },
        Duration::from_secs(60),
        stop.clone(),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster.is_up() {
        assert!(Instant::now() < deadline, "the cluster never reached Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Instance {
        store: TokenStore::redis(cluster),
        stop,
    }
}

fn entry(sub: &str, server: &str) -> TokenEntry {
    TokenEntry {
        sub: sub.into(),
        server: server.into(),
        kind: "oauth".into(),
        issuer: Some("https://ghe.example/login/oauth".into()),
        client_id: Some("broker-client".into()),
        scopes: vec!["repo".into()],
        expires_at: Some(1_900_000_000),
        updated_at: 1_800_000_000,
        secret: Secret::new(format!(
            r#"{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}"}}"#
        )),
    }
}

async fn conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key in Redis and every value under it, as text.
/// `word` in `text` other than wholly inside a run of base64url text (a neighbour on either side is
/// not base64url): a sealed value is base64url of random-looking bytes, so a short word turns up
/// inside one by chance now and then.
fn in_clear(text: &str, word: &str) -> bool {
    let b64 =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    text.match_indices(word).any(|(at, _)| {
        !b64(text[..at].chars().next_back()) || !b64(text[at + word.len()..].chars().next())
    })
}

async fn everything(port: u16) -> String {
    let mut c = conn(port).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = String::new();
    for k in keys {
        out.push_str(&k);
        out.push('\n');
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        match kind.as_str() {
            "hash" => {
                let all: Vec<String> = redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                out.push_str(&all.join("\n"));
            }
            "string" => {
                let v: String = redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap();
                out.push_str(&v);
            }
            other => out.push_str(other),
        }
        out.push('\n');
    }
    out
}

#[tokio::test]
async fn tokens_round_trip_through_redis_sealed() {
    let Some(redis) = Redis::start() else { return };
    let a = instance(redis.port, KEY).await;
    assert_eq!(a.store.describe(), "redis");
    a.store.put(entry(SUB, SERVER)).await.unwrap();
    a.store.put(entry(SUB, "linear")).await.unwrap();
    a.store.put(entry("bob@example.com", SERVER)).await.unwrap();

    // Another instance with the same key reads what the first wrote.
    let b = instance(redis.port, KEY).await;
    let got = b.store.get(SUB, SERVER).await.unwrap().expect("shared");
    assert!(got.secret.expose().contains(REFRESH));
    assert_eq!(got.scopes, ["repo"]);
    assert_eq!(b.store.list(None).await.unwrap().len(), 3);
    assert_eq!(b.store.list(Some(SUB)).await.unwrap().len(), 2);

    // Nothing in Redis shows a token, a sub or a server name.
    let seen = everything(redis.port).await;
    assert!(seen.contains("mcpb:tok"), "{seen}");
    for clear in [
        ACCESS,
        REFRESH,
        "alice",
        "bob",
        "example.com",
        "github",
        "linear",
        "ghe.example",
    ] {
        assert!(!in_clear(&seen, clear), "`{clear}` shows in Redis:\n{seen}");
    }

    // Another key opens nothing: an error, never an entry.
    let other = instance(redis.port, OTHER_KEY).await;
    assert!(matches!(
        other.store.get(SUB, SERVER).await,
        Ok(None) | Err(StoreError::Unopenable { .. })
    ));
    assert!(other.store.list(None).await.unwrap().is_empty());

    // Two values swapped between fields open as neither.
    let mut c = conn(redis.port).await;
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg("mcpb:tok")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(fields.len(), 3);
    let before = b.store.list(None).await.unwrap();
    redis::pipe()
        .cmd("HSET")
        .arg("mcpb:tok")
        .arg(&fields[0].0)
        .arg(&fields[1].1)
        .cmd("HSET")
        .arg("mcpb:tok")
        .arg(&fields[1].0)
        .arg(&fields[0].1)
        .query_async::<()>(&mut c)
        .await
        .unwrap();
    let after = b.store.list(None).await.unwrap();
    assert_eq!(after.len(), 1, "swapped entries must not open: {after:?}");
    let unreadable: Vec<_> = before.iter().filter(|s| !after.contains(s)).collect();
    for s in unreadable {
        assert!(
            matches!(
                b.store.get(&s.sub, &s.server).await,
                Err(StoreError::Unopenable { .. })
            ),
            "{s:?}"
        );
    }

    // Revoking by sub removes that caller's only, across instances.
    for (k, v) in &fields {
        redis::cmd("HSET")
            .arg("mcpb:tok")
            .arg(k)
            .arg(v)
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
    let removed = a.store.remove(Some(SUB), None).await.unwrap();
    assert_eq!(removed.len(), 2);
    assert!(b.store.get(SUB, SERVER).await.unwrap().is_none());
    assert!(
        b.store
            .get("bob@example.com", SERVER)
            .await
            .unwrap()
            .is_some()
    );
    let removed = b.store.remove(None, Some(SERVER)).await.unwrap();
    assert_eq!(removed.len(), 1);
    let left: Option<usize> = redis::cmd("HLEN")
        .arg("mcpb:tok")
        .query_async(&mut c)
        .await
        .ok();
    assert_eq!(left, Some(0));
}
