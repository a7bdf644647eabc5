//! The per-user upstream token store: what the broker obtained at an upstream authorization server
//! for (caller `sub`, upstream server), kept across restarts and never readable at rest.
//!
//! Three places, one behaviour ([`TokenStore`]): in process only (nothing configured), a file
//! (`[token_store]`), or Redis under `[cluster]` (hash `mcpb:tok`, shared by every instance).
//!
//! At rest, an entry is named by a keyed hash of (sub, server) (HMAC-SHA-256 under a key derived
//! from the store's secret, so a name shows neither and cannot be confirmed by hashing a guess),
//! and its value is the whole entry sealed ([`crate::cluster::sealed`], AES-256-GCM) with the
//! associated data naming its slot: a value moved to another slot does not open. The file is
//! `{"version": 1, "check": SEALED, "entries": {NAME: SEALED}}`, where `check` is an empty value
//! sealed under a fixed name: it tells a wrong key from a damaged entry when the file is opened.
//! The file is read once at open, kept in memory, and replaced whole (temporary file, then rename;
//! mode 0600) on every change, one change at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cluster::sealed::{SealError, Sealer};
use crate::cluster::{Cluster, PREFIX};
use crate::config::{Secret, TokenStoreConfig};

/// At most this many entries in a store (a new one past it is refused).
pub const MAX_ENTRIES: usize = 100_000;
/// At most this many bytes in one entry (its JSON, secrets included).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// What the naming key is for (hashed in front of the secret; the sealing key has another label).
const NAMES: &[u8] = b"mcp-broker token names v1\0";
/// The file format's version.
const FILE_VERSION: u32 = 1;
/// The slot the file's key check is sealed under (no entry's name looks like it).
const CHECK_SLOT: &str = "check";

/// One upstream grant. `secret` is opaque JSON text with every secret of the grant (access and
/// refresh tokens, a client secret): it is shown by nothing but [`Secret::expose`], and `Debug`
/// redacts it. `Serialize` writes it in clear: that is for sealing; do not serialize a
/// `TokenEntry` anywhere else (answer with a [`TokenSummary`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenEntry {
    pub sub: String,
    /// A `[servers.NAME]`, or `"@sign-in"` for the IdP refresh token of the enterprise sign-in.
    pub server: String,
    /// `"oauth"` | `"id_jag"` | `"sign_in"`.
    pub kind: String,
    /// The authorization server's issuer.
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    /// Access-token expiry, unix seconds.
    pub expires_at: Option<u64>,
    /// Unix seconds.
    pub updated_at: u64,
    #[serde(with = "secret_text")]
    pub secret: Secret,
}

/// What `tokens list` shows of an entry: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSummary {
    pub sub: String,
    pub server: String,
    pub kind: String,
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: Option<u64>,
    pub updated_at: u64,
}

impl From<&TokenEntry> for TokenSummary {
    fn from(e: &TokenEntry) -> Self {
        Self {
            sub: e.sub.clone(),
            server: e.server.clone(),
            kind: e.kind.clone(),
            issuer: e.issuer.clone(),
            client_id: e.client_id.clone(),
            scopes: e.scopes.clone(),
            expires_at: e.expires_at,
            updated_at: e.updated_at,
        }
    }
}

impl TokenSummary {
    /// What a removal reports for an entry that was removed without being read (it did not open).
    fn unreadable(sub: &str, server: &str) -> Self {
        Self {
            sub: sub.into(),
            server: server.into(),
            kind: "unreadable".into(),
            issuer: None,
            client_id: None,
            scopes: Vec::new(),
            expires_at: None,
            updated_at: 0,
        }
    }
}

/// The secret as a plain string inside the sealed JSON (and nowhere else).
mod secret_text {
    use crate::config::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
        ser.serialize_str(s.expose())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Secret, D::Error> {
        String::deserialize(de).map(Secret::new)
    }
}

/// Messages name files, servers and counts; never a token, and never a sub's secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: does not open with [token_store] key (was it written with another key?); it is left as it is"
    )]
    WrongKey { path: PathBuf },
    #[error("{path}: not a token store file ({why}); it is left as it is")]
    NotAStore { path: PathBuf, why: String },
    #[error(
        "the stored token for server `{server}` does not open (tampered with, or sealed with another key)"
    )]
    Unopenable { server: String },
    #[error("a token entry of {0} bytes is larger than the {MAX_ENTRY_BYTES} bytes allowed")]
    TooLarge(usize),
    #[error("the token store holds {MAX_ENTRIES} entries already")]
    Full,
    #[error("removing tokens needs a sub, a server, or both")]
    NoFilter,
    #[error("Redis ({what}): {source}")]
    Redis {
        what: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("{0}")]
    Seal(#[from] SealError),
}

/// Names and seals entries with one secret.
struct Keys {
    sealer: Sealer,
    names: hmac::Key,
}

impl Keys {
    fn new(secret: &str) -> Self {
        Self {
            sealer: Sealer::new(secret),
            names: names_key(secret),
        }
    }

    /// The name of (sub, server)'s slot: hex HMAC over the length-prefixed parts.
    fn name(&self, sub: &str, server: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.names);
        for p in [sub, server] {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p.as_bytes());
        }
        crate::hex(ctx.sign().as_ref())
    }

    /// `entry` sealed for slot `name`; refused past [`MAX_ENTRY_BYTES`].
    fn seal(&self, name: &str, entry: &TokenEntry) -> Result<String, StoreError> {
        let plain = serde_json::to_vec(entry).unwrap_or_default();
        if plain.len() > MAX_ENTRY_BYTES {
            return Err(StoreError::TooLarge(plain.len()));
        }
        Ok(self.sealer.seal(aad(name).as_bytes(), &plain)?)
    }

    /// The entry sealed in slot `name`; `None` when it does not open there.
    fn open(&self, name: &str, text: &str) -> Option<TokenEntry> {
        let plain = self.sealer.open(aad(name).as_bytes(), text).ok()?;
        let entry: TokenEntry = serde_json::from_slice(&plain).ok()?;
        // The associated data already binds the value to its slot; the slot's name binds the pair.
        (self.name(&entry.sub, &entry.server) == name).then_some(entry)
    }
}

fn names_key(secret: &str) -> hmac::Key {
    let k = Sha256::new()
        .chain_update(NAMES)
        .chain_update(secret.as_bytes())
        .finalize();
    hmac::Key::new(hmac::HMAC_SHA256, &k)
}

/// The associated data of slot `name` (the same in the file and in Redis).
fn aad(name: &str) -> String {
    format!("{PREFIX}tok:{name}")
}

fn check_size(entry: &TokenEntry) -> Result<(), StoreError> {
    let n = serde_json::to_vec(entry).map(|v| v.len()).unwrap_or(0);
    if n > MAX_ENTRY_BYTES {
        return Err(StoreError::TooLarge(n));
    }
    Ok(())
}

fn matches(e: &TokenSummary, sub: Option<&str>, server: Option<&str>) -> bool {
    sub.is_none_or(|s| e.sub == s) && server.is_none_or(|s| e.server == s)
}

fn sorted(mut v: Vec<TokenSummary>) -> Vec<TokenSummary> {
    v.sort_by(|a, b| (&a.sub, &a.server).cmp(&(&b.sub, &b.server)));
    v
}

/// Where the tokens are kept.
pub struct TokenStore {
    backend: Backend,
}

enum Backend {
    Memory(std::sync::Mutex<HashMap<(String, String), TokenEntry>>),
    File(FileStore),
    Redis(RedisStore),
}

impl TokenStore {
    /// In process only: tokens last as long as the broker.
    pub fn memory() -> Self {
        Self {
            backend: Backend::Memory(Default::default()),
        }
    }

    /// `[token_store]`: the file at `cfg.path`, created (empty) if missing. A file that exists but
    /// does not open with `cfg.key`, or is not a token store, is an error and is left untouched.
    pub async fn open(cfg: &TokenStoreConfig) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::File(FileStore::open(cfg).await?),
        })
    }

    /// Under `[cluster]`: the Redis hash `mcpb:tok`, sealed with the cluster's `secret_key`.
    pub fn redis(cluster: Arc<Cluster>) -> Self {
        let keys = Keys::new(cluster.config.secret_key.expose());
        Self {
            backend: Backend::Redis(RedisStore { cluster, keys }),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self.backend {
            Backend::Memory(_) => "memory",
            Backend::File(_) => "file",
            Backend::Redis(_) => "redis",
        }
    }

    /// The entry for (sub, server). An entry that is there but does not open is an error, never
    /// another entry and never "none".
    pub async fn get(&self, sub: &str, server: &str) -> Result<Option<TokenEntry>, StoreError> {
        match &self.backend {
            Backend::Memory(m) => Ok(lock(m).get(&(sub.into(), server.into())).cloned()),
            Backend::File(f) => f.get(sub, server).await,
            Backend::Redis(r) => r.get(sub, server).await,
        }
    }

    /// Add or replace the entry for (`entry.sub`, `entry.server`).
    pub async fn put(&self, entry: TokenEntry) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Memory(m) => {
                check_size(&entry)?;
                let mut m = lock(m);
                let key = (entry.sub.clone(), entry.server.clone());
                if m.len() >= MAX_ENTRIES && !m.contains_key(&key) {
                    return Err(StoreError::Full);
                }
                m.insert(key, entry);
                Ok(())
            }
            Backend::File(f) => f.put(entry).await,
            Backend::Redis(r) => r.put(entry).await,
        }
    }

    /// Remove every entry of `sub` (all its servers), of `server` (all callers), or the one of both;
    /// returns what was removed. At least one of them must be given.
    pub async fn remove(
        &self,
        sub: Option<&str>,
        server: Option<&str>,
    ) -> Result<Vec<TokenSummary>, StoreError> {
        if sub.is_none() && server.is_none() {
            return Err(StoreError::NoFilter);
        }
        let removed = match &self.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                let mut out = Vec::new();
                m.retain(|_, e| {
                    let s = TokenSummary::from(&*e);
                    let hit = matches(&s, sub, server);
                    if hit {
                        out.push(s);
                    }
                    !hit
                });
                out
            }
            Backend::File(f) => f.remove(sub, server).await?,
            Backend::Redis(r) => r.remove(sub, server).await?,
        };
        Ok(sorted(removed))
    }

    /// Every entry (of `sub` only, if given), sorted by sub then server. Entries that do not open
    /// are left out (and counted in a warning).
    pub async fn list(&self, sub: Option<&str>) -> Result<Vec<TokenSummary>, StoreError> {
        let all = match &self.backend {
            Backend::Memory(m) => lock(m)
                .values()
                .map(TokenSummary::from)
                .filter(|s| matches(s, sub, None))
                .collect(),
            Backend::File(f) => f.list(sub).await,
            Backend::Redis(r) => r.list(sub).await?,
        };
        Ok(sorted(all))
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens every (name, sealed) pair, keeping those that open and match; warns once about the rest.
fn open_all<'a>(
    keys: &Keys,
    pairs: impl Iterator<Item = (&'a String, &'a String)>,
    sub: Option<&str>,
    server: Option<&str>,
) -> Vec<(String, TokenSummary)> {
    let mut bad = 0usize;
    let mut out = Vec::new();
    for (name, text) in pairs {
        match keys.open(name, text) {
            Some(e) => {
                let s = TokenSummary::from(&e);
                if matches(&s, sub, server) {
                    out.push((name.clone(), s));
                }
            }
            None => bad += 1,
        }
    }
    if bad > 0 {
        tracing::warn!(
            unreadable = bad,
            "token store entries that do not open were skipped (tampered with, or sealed with another key)"
        );
    }
    out
}

// -- the file ---------------------------------------------------------------------------------------

/// The file as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    check: String,
    entries: BTreeMap<String, String>,
}

struct FileStore {
    path: PathBuf,
    keys: Keys,
    /// The file's contents; held across the write, so changes reach the disk one at a time and in
    /// order.
    state: tokio::sync::Mutex<OnDisk>,
}

impl FileStore {
    async fn open(cfg: &TokenStoreConfig) -> Result<Self, StoreError> {
        let path = cfg.path.clone();
        let keys = Keys::new(cfg.key.expose());
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let text = match tokio::fs::read(&path).await {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let not_a_store = |why: String| StoreError::NotAStore {
            path: path.clone(),
            why,
        };
        let state = match text {
            Some(t) => {
                let disk: OnDisk =
                    serde_json::from_slice(&t).map_err(|e| not_a_store(e.to_string()))?;
                if disk.version != FILE_VERSION {
                    return Err(not_a_store(format!("unknown version {}", disk.version)));
                }
                if disk.entries.len() > MAX_ENTRIES {
                    return Err(not_a_store(format!("more than {MAX_ENTRIES} entries")));
                }
                if keys
                    .sealer
                    .open(aad(CHECK_SLOT).as_bytes(), &disk.check)
                    .is_err()
                {
                    return Err(StoreError::WrongKey { path });
                }
                disk
            }
            None => {
                let disk = OnDisk {
                    version: FILE_VERSION,
                    check: keys.sealer.seal(aad(CHECK_SLOT).as_bytes(), b"")?,
                    entries: BTreeMap::new(),
                };
                // Written now, so a folder that cannot hold it is found at start, not at the first
                // sign-in.
                write(&path, &disk).await?;
                disk
            }
        };
        Ok(Self {
            path,
            keys,
            state: tokio::sync::Mutex::new(state),
        })
    }

    async fn get(&self, sub: &str, server: &str) -> Result<Option<TokenEntry>, StoreError> {
        let name = self.keys.name(sub, server);
        let state = self.state.lock().await;
        match state.entries.get(&name) {
            None => Ok(None),
            Some(text) => {
                self.keys
                    .open(&name, text)
                    .map(Some)
                    .ok_or_else(|| StoreError::Unopenable {
                        server: server.into(),
                    })
            }
        }
    }

    async fn put(&self, entry: TokenEntry) -> Result<(), StoreError> {
        let name = self.keys.name(&entry.sub, &entry.server);
        let text = self.keys.seal(&name, &entry)?;
        let mut state = self.state.lock().await;
        if state.entries.len() >= MAX_ENTRIES && !state.entries.contains_key(&name) {
            return Err(StoreError::Full);
        }
        let old = state.entries.insert(name.clone(), text);
        if let Err(e) = write(&self.path, &state).await {
            match old {
                Some(o) => state.entries.insert(name, o),
                None => state.entries.remove(&name),
            };
            return Err(e);
        }
        Ok(())
    }

    async fn remove(
        &self,
        sub: Option<&str>,
        server: Option<&str>,
    ) -> Result<Vec<TokenSummary>, StoreError> {
        let mut state = self.state.lock().await;
        let hits: Vec<(String, TokenSummary)> = match (sub, server) {
            // Both given: the slot is known, so even an entry that does not open can be removed.
            (Some(sub), Some(server)) => {
                let name = self.keys.name(sub, server);
                match state.entries.get(&name) {
                    None => Vec::new(),
                    Some(text) => {
                        let s = self
                            .keys
                            .open(&name, text)
                            .map(|e| TokenSummary::from(&e))
                            .unwrap_or_else(|| TokenSummary::unreadable(sub, server));
                        vec![(name, s)]
                    }
                }
            }
            _ => open_all(&self.keys, state.entries.iter(), sub, server),
        };
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let mut taken = Vec::with_capacity(hits.len());
        for (name, _) in &hits {
            if let Some(t) = state.entries.remove(name) {
                taken.push((name.clone(), t));
            }
        }
        if let Err(e) = write(&self.path, &state).await {
            state.entries.extend(taken);
            return Err(e);
        }
        Ok(hits.into_iter().map(|(_, s)| s).collect())
    }

    async fn list(&self, sub: Option<&str>) -> Vec<TokenSummary> {
        let state = self.state.lock().await;
        open_all(&self.keys, state.entries.iter(), sub, None)
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }
}

/// Replace the file with `disk`: a temporary file beside it (mode 0600), synced, then renamed over.
async fn write(path: &Path, disk: &OnDisk) -> Result<(), StoreError> {
    let body = serde_json::to_vec(disk).unwrap_or_default();
    let path = path.to_path_buf();
    let at = path.clone();
    tokio::task::spawn_blocking(move || write_blocking(&path, &body))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        .map_err(|source| StoreError::Io { path: at, source })
}

fn write_blocking(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tokens".into());
    let mut tag = [0u8; 6];
    getrandom::fill(&mut tag).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = dir.join(format!(".{file_name}.{}.tmp", crate::hex(&tag)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut f = options.open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename itself survives a crash once the folder is synced (best effort).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// -- Redis ------------------------------------------------------------------------------------------

/// The hash holding every entry: field = slot name, value = sealed entry.
const REDIS_KEY: &str = "mcpb:tok";

struct RedisStore {
    cluster: Arc<Cluster>,
    keys: Keys,
}

fn redis_err(what: &'static str) -> impl FnOnce(redis::RedisError) -> StoreError {
    move |source| StoreError::Redis { what, source }
}

impl RedisStore {
    async fn get(&self, sub: &str, server: &str) -> Result<Option<TokenEntry>, StoreError> {
        let name = self.keys.name(sub, server);
        let mut c = self.cluster.conn();
        let text: Option<String> = redis::cmd("HGET")
            .arg(REDIS_KEY)
            .arg(&name)
            .query_async(&mut c)
            .await
            .map_err(redis_err("read token"))?;
        match text {
            None => Ok(None),
            Some(t) => self
                .keys
                .open(&name, &t)
                .map(Some)
                .ok_or_else(|| StoreError::Unopenable {
                    server: server.into(),
                }),
        }
    }

    async fn put(&self, entry: TokenEntry) -> Result<(), StoreError> {
        let name = self.keys.name(&entry.sub, &entry.server);
        let text = self.keys.seal(&name, &entry)?;
        let mut c = self.cluster.conn();
        let (len, exists): (usize, bool) = redis::pipe()
            .cmd("HLEN")
            .arg(REDIS_KEY)
            .cmd("HEXISTS")
            .arg(REDIS_KEY)
            .arg(&name)
            .query_async(&mut c)
            .await
            .map_err(redis_err("write token"))?;
        if len >= MAX_ENTRIES && !exists {
            return Err(StoreError::Full);
        }
        redis::cmd("HSET")
            .arg(REDIS_KEY)
            .arg(&name)
            .arg(text)
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err("write token"))
    }

    async fn all(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut c = self.cluster.conn();
        redis::cmd("HGETALL")
            .arg(REDIS_KEY)
            .query_async(&mut c)
            .await
            .map_err(redis_err("list tokens"))
    }

    async fn remove(
        &self,
        sub: Option<&str>,
        server: Option<&str>,
    ) -> Result<Vec<TokenSummary>, StoreError> {
        let hits: Vec<(String, TokenSummary)> = match (sub, server) {
            (Some(sub), Some(server)) => {
                let name = self.keys.name(sub, server);
                let mut c = self.cluster.conn();
                let text: Option<String> = redis::cmd("HGET")
                    .arg(REDIS_KEY)
                    .arg(&name)
                    .query_async(&mut c)
                    .await
                    .map_err(redis_err("remove tokens"))?;
                match text {
                    None => Vec::new(),
                    Some(t) => {
                        let s = self
                            .keys
                            .open(&name, &t)
                            .map(|e| TokenSummary::from(&e))
                            .unwrap_or_else(|| TokenSummary::unreadable(sub, server));
                        vec![(name, s)]
                    }
                }
            }
            _ => {
                let all = self.all().await?;
                open_all(&self.keys, all.iter(), sub, server)
            }
        };
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let mut del = redis::cmd("HDEL");
        del.arg(REDIS_KEY);
        for (name, _) in &hits {
            del.arg(name);
        }
        let mut c = self.cluster.conn();
        del.query_async::<()>(&mut c)
            .await
            .map_err(redis_err("remove tokens"))?;
        Ok(hits.into_iter().map(|(_, s)| s).collect())
    }

    async fn list(&self, sub: Option<&str>) -> Result<Vec<TokenSummary>, StoreError> {
        let all = self.all().await?;
        Ok(open_all(&self.keys, all.iter(), sub, None)
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }
}

#[cfg(test)]
mod tests;
