use super::*;

const KEY: &str = "token-store-key-0123456789abcdef-0123";
const OTHER_KEY: &str = "another-token-store-key-fedcba9876543210";
const ACCESS: &str = "upstream-access-token-a1b2c3d4";
const REFRESH: &str = "upstream-refresh-token-e5f6a7b8";

fn entry(sub: &str, server: &str) -> TokenEntry {
    TokenEntry {
        sub: sub.into(),
        server: server.into(),
        kind: "oauth".into(),
        issuer: Some("https://as.example".into()),
        client_id: Some("mcp-broker".into()),
        scopes: vec!["repo".into(), "read:org".into()],
        expires_at: Some(1_900_000_000),
        updated_at: 1_800_000_000,
        secret: Secret::new(format!(
            r#"{{"access_token":"{ACCESS}-{sub}-{server}","refresh_token":"{REFRESH}-{sub}-{server}"}}"#
        )),
    }
}

fn cfg(dir: &tempfile::TempDir, key: &str) -> TokenStoreConfig {
    TokenStoreConfig {
        path: dir.path().join("tokens.json"),
        key: Secret::new(key),
    }
}

/// The behaviour every backend shares.
async fn round_trip(store: &TokenStore) {
    assert!(store.get("alice", "github").await.unwrap().is_none());
    store.put(entry("alice", "github")).await.unwrap();
    store.put(entry("alice", "linear")).await.unwrap();
    store.put(entry("bob", "github")).await.unwrap();
    let got = store.get("alice", "github").await.unwrap().expect("stored");
    assert_eq!(got.sub, "alice");
    assert_eq!(got.server, "github");
    assert_eq!(got.scopes, ["repo", "read:org"]);
    assert_eq!(got.expires_at, Some(1_900_000_000));
    assert!(
        got.secret
            .expose()
            .contains(&format!("{ACCESS}-alice-github"))
    );
    // Replacing keeps one entry per (sub, server).
    let mut newer = entry("alice", "github");
    newer.updated_at += 10;
    store.put(newer).await.unwrap();
    let all = store.list(None).await.unwrap();
    let pairs: Vec<_> = all
        .iter()
        .map(|s| (s.sub.as_str(), s.server.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [("alice", "github"), ("alice", "linear"), ("bob", "github")]
    );
    assert_eq!(all[0].updated_at, 1_800_000_010);
    assert_eq!(store.list(Some("bob")).await.unwrap().len(), 1);
    // A summary never holds the secret.
    let shown = serde_json::to_string(&all).unwrap();
    assert!(
        !shown.contains(ACCESS) && !shown.contains(REFRESH),
        "{shown}"
    );
    assert!(matches!(
        store.remove(None, None).await,
        Err(StoreError::NoFilter)
    ));
    // By server: every caller's entry for it.
    let removed = store.remove(None, Some("github")).await.unwrap();
    assert_eq!(removed.len(), 2);
    assert!(store.get("bob", "github").await.unwrap().is_none());
    assert!(store.get("alice", "linear").await.unwrap().is_some());
    // By sub and server; then nothing left to remove.
    let removed = store.remove(Some("alice"), Some("linear")).await.unwrap();
    assert_eq!(removed[0].server, "linear");
    assert!(store.remove(Some("alice"), None).await.unwrap().is_empty());
    assert!(store.list(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_round_trip() {
    let store = TokenStore::memory();
    assert_eq!(store.describe(), "memory");
    round_trip(&store).await;
}

#[tokio::test]
async fn file_round_trip_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    assert_eq!(store.describe(), "file");
    round_trip(&store).await;
    store
        .put(entry("alice@example.com", "github"))
        .await
        .unwrap();
    store.put(entry("bob@example.com", "linear")).await.unwrap();
    drop(store);
    let again = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    let got = again
        .get("alice@example.com", "github")
        .await
        .unwrap()
        .expect("kept across reopening");
    assert!(
        got.secret
            .expose()
            .contains(&format!("{REFRESH}-alice@example.com-github"))
    );
    assert_eq!(again.list(None).await.unwrap().len(), 2);
    // By sub: only that caller's.
    let removed = again.remove(Some("bob@example.com"), None).await.unwrap();
    assert_eq!(removed.len(), 1);
    drop(again);
    let third = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    assert!(
        third
            .get("bob@example.com", "linear")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        third
            .get("alice@example.com", "github")
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn the_file_shows_no_token_sub_or_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    store
        .put(entry("alice@example.com", "github-enterprise"))
        .await
        .unwrap();
    let text = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
    assert!(!text.contains(ACCESS) && !text.contains(REFRESH), "{text}");
    let disk: OnDisk = serde_json::from_str(&text).unwrap();
    assert_eq!(disk.version, 1);
    assert_eq!(disk.entries.len(), 1);
    // A sealed value is base64url of random-looking bytes, where a short word can turn up by chance:
    // the words are looked for in the file's names and in the values' decoded bytes.
    use base64::Engine as _;
    let mut opened = Vec::new();
    for v in disk.entries.values().chain([&disk.check]) {
        opened.extend(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(v)
                .unwrap(),
        );
    }
    let names: String = disk.entries.keys().cloned().collect();
    for clear in [
        ACCESS,
        REFRESH,
        "alice",
        "example.com",
        "github",
        "enterprise",
        "as.example",
        "repo",
        "oauth",
    ] {
        assert!(
            !names.contains(clear),
            "`{clear}` shows in the file: {text}"
        );
        let found = opened.windows(clear.len()).any(|w| w == clear.as_bytes());
        assert!(!found, "`{clear}` shows in the file: {text}");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600, "created empty at open");
    store.put(entry("alice", "github")).await.unwrap();
    assert_eq!(mode(&path), 0o600, "after a write");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["tokens.json"]);
}

#[tokio::test]
async fn a_wrong_key_fails_at_open_and_leaves_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    store.put(entry("alice", "github")).await.unwrap();
    drop(store);
    let path = dir.path().join("tokens.json");
    let before = std::fs::read(&path).unwrap();
    let err = TokenStore::open(&cfg(&dir, OTHER_KEY))
        .await
        .err()
        .expect("another key must not open the file");
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.contains(OTHER_KEY) && !msg.contains(KEY), "{msg}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was changed"
    );
    // Not a store at all: refused too, and left alone.
    std::fs::write(&path, b"{\"some\": \"thing\"}").unwrap();
    let err = TokenStore::open(&cfg(&dir, KEY))
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"some\": \"thing\"}");
}

#[tokio::test]
async fn swapped_values_open_as_neither() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    store.put(entry("alice", "github")).await.unwrap();
    store.put(entry("bob", "github")).await.unwrap();
    store.put(entry("carol", "github")).await.unwrap();
    drop(store);
    let keys = Keys::new(KEY);
    let (a, b) = (keys.name("alice", "github"), keys.name("bob", "github"));
    let mut disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let entries = disk["entries"].as_object_mut().unwrap();
    let va = entries[&a].clone();
    let vb = entries[&b].clone();
    entries.insert(a, vb);
    entries.insert(b, va);
    std::fs::write(&path, serde_json::to_vec(&disk).unwrap()).unwrap();
    let store = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    for sub in ["alice", "bob"] {
        match store.get(sub, "github").await {
            Err(StoreError::Unopenable { server }) => assert_eq!(server, "github"),
            other => panic!("{sub}: expected an error, got {other:?}"),
        }
    }
    assert!(store.get("carol", "github").await.unwrap().is_some());
    // Listing shows what still opens; the swapped pair can still be removed by name.
    let listed = store.list(None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sub, "carol");
    let removed = store.remove(Some("alice"), Some("github")).await.unwrap();
    assert_eq!(removed[0].kind, "unreadable");
    assert!(store.get("alice", "github").await.unwrap().is_none());
}

#[tokio::test]
async fn an_oversized_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = TokenStore::open(&cfg(&dir, KEY)).await.unwrap();
    for store in [TokenStore::memory(), file] {
        let mut big = entry("alice", "github");
        big.secret = Secret::new("x".repeat(MAX_ENTRY_BYTES));
        match store.put(big).await {
            Err(StoreError::TooLarge(n)) => assert!(n > MAX_ENTRY_BYTES),
            other => panic!("{}: expected TooLarge, got {other:?}", store.describe()),
        }
        assert!(store.get("alice", "github").await.unwrap().is_none());
        // Just under the bound is fine.
        let mut fits = entry("alice", "github");
        fits.secret = Secret::new("x".repeat(MAX_ENTRY_BYTES - 1024));
        store.put(fits).await.unwrap();
    }
}

#[test]
fn debug_never_shows_the_secret() {
    let e = entry("alice", "github");
    let shown = format!("{e:?}");
    assert!(
        !shown.contains(ACCESS) && !shown.contains(REFRESH),
        "{shown}"
    );
    assert!(shown.contains("redacted"), "{shown}");
}

#[test]
fn names_are_keyed_and_unambiguous() {
    let k = Keys::new(KEY);
    assert_ne!(k.name("ab", "c"), k.name("a", "bc"));
    assert_ne!(
        k.name("alice", "github"),
        Keys::new(OTHER_KEY).name("alice", "github")
    );
    assert_eq!(
        k.name("alice", "github"),
        Keys::new(KEY).name("alice", "github")
    );
    assert_eq!(k.name("alice", "github").len(), 64);
}
