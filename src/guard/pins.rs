//! Pinned tool definitions: `servers.lock`, written by `mcp-broker pin`, read at start and on every
//! reload. A pin is the SHA-256 of the upstream's own definition (the object it listed, before the
//! broker renamed it) in RFC 8785 canonical JSON, so key order and number spelling never count as a
//! change, and anything else — a description, a schema, an annotation — does.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::catalog::Object;

/// The lock format this build reads and writes.
pub const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a pins lock file: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: lock version {found} is not supported (this broker reads version {VERSION})")]
    Version { path: String, found: u32 },
}

/// One tool's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// Lower-case hex SHA-256 of the canonical definition.
    pub sha256: String,
    /// RFC 3339, UTC.
    pub pinned_at: String,
    pub pinned_by: String,
}

/// `servers.lock`: server → tool (the upstream's own name) → pin. Sorted maps, so a re-pin that
/// changes nothing rewrites the same bytes and a diff of the file reads well.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    pub servers: BTreeMap<String, BTreeMap<String, Pin>>,
}

impl Default for Lock {
    fn default() -> Self {
        Self {
            version: VERSION,
            servers: BTreeMap::new(),
        }
    }
}

/// How a tool stands against its server's pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Listed with a definition other than the pinned one.
    Changed { pinned: String, current: String },
    /// Listed, but its server's pins do not name it (a new tool is as much a change as an edit).
    Unpinned { current: String },
    /// Pinned, but no longer listed (reported by `check --pins`; nothing to hide at run time).
    Removed { pinned: String },
}

impl Drift {
    pub fn as_str(&self) -> &'static str {
        match self {
            Drift::Changed { .. } => "changed",
            Drift::Unpinned { .. } => "new",
            Drift::Removed { .. } => "removed",
        }
    }
}

impl Lock {
    /// Read the lock at `path`; a missing file is an empty lock (nothing pinned yet).
    pub fn load(path: &Path) -> Result<Lock, PinsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lock::default()),
            Err(source) => {
                return Err(PinsError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        let lock: Lock = serde_json::from_str(&text).map_err(|source| PinsError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        if lock.version != VERSION {
            return Err(PinsError::Version {
                path: path.display().to_string(),
                found: lock.version,
            });
        }
        Ok(lock)
    }

    /// Write the lock to `path` atomically (a temporary file in the same folder, then a rename), so
    /// a broker reloading at that moment reads the old lock or the new one, never half of one.
    pub fn save(&self, path: &Path) -> Result<(), PinsError> {
        let io = |source| PinsError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut text = serde_json::to_string_pretty(self).map_err(|e| io(e.into()))?;
        text.push('\n');
        // Unique per process, so two `pin` runs at once cannot write into each other's file.
        let tmp = dir.join(format!(
            ".{}.{}.tmp",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("servers.lock"),
            std::process::id()
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)?;
        Ok(())
    }

    /// Does the lock hold pins for `server` (only those servers are checked)?
    pub fn covers(&self, server: &str) -> bool {
        self.servers.get(server).is_some_and(|t| !t.is_empty())
    }

    /// How `tool` of `server`, whose definition hashes to `current`, stands: `None` when it matches
    /// its pin or its server is not pinned at all.
    pub fn drift(&self, server: &str, tool: &str, current: &str) -> Option<Drift> {
        let pins = self.servers.get(server).filter(|t| !t.is_empty())?;
        match pins.get(tool) {
            Some(p) if p.sha256 == current => None,
            Some(p) => Some(Drift::Changed {
                pinned: p.sha256.clone(),
                current: current.to_string(),
            }),
            None => Some(Drift::Unpinned {
                current: current.to_string(),
            }),
        }
    }

    /// Every drift of `server` given what it lists now (`(tool, hash)`), removed tools included,
    /// by tool name.
    pub fn drifts(&self, server: &str, listed: &[(String, String)]) -> Vec<(String, Drift)> {
        let mut out: Vec<(String, Drift)> = listed
            .iter()
            .filter_map(|(t, h)| self.drift(server, t, h).map(|d| (t.clone(), d)))
            .collect();
        if let Some(pins) = self.servers.get(server) {
            for (t, p) in pins {
                if !listed.iter().any(|(l, _)| l == t) {
                    out.push((
                        t.clone(),
                        Drift::Removed {
                            pinned: p.sha256.clone(),
                        },
                    ));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Pin `tool` of `server` to `sha256`.
    pub fn pin(&mut self, server: &str, tool: &str, sha256: &str, at: &str, by: &str) {
        self.servers.entry(server.to_string()).or_default().insert(
            tool.to_string(),
            Pin {
                sha256: sha256.to_string(),
                pinned_at: at.to_string(),
                pinned_by: by.to_string(),
            },
        );
    }
}

/// RFC 8785 (JCS) canonical JSON of `value`: keys sorted by UTF-16 code units, ECMAScript number
/// spelling, minimal string escapes.
pub fn canonical(value: &serde_json::Value) -> String {
    // Serialising a `Value` cannot fail (string keys only); an empty string would only ever hash to
    // a pin no definition matches.
    serde_json_canonicalizer::to_string(value).unwrap_or_default()
}

/// The pin of a definition: lower-case hex SHA-256 of its canonical JSON.
pub fn definition_hash(definition: &Object) -> String {
    let text = serde_json_canonicalizer::to_string(definition).unwrap_or_default();
    crate::hex(&Sha256::digest(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_keys_by_utf16_code_units() {
        // RFC 8785 §3.2.3: the sorting example (property names as UTF-16 code units).
        let v: serde_json::Value = serde_json::from_str(
            r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
                "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#,
        )
        .unwrap();
        let c = canonical(&v);
        let keys: Vec<String> =
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&c)
                .unwrap()
                .keys()
                .cloned()
                .collect();
        assert_eq!(
            keys,
            [
                "\r",
                "1",
                "\u{80}",
                "\u{f6}",
                "\u{20ac}",
                "\u{1f600}",
                "\u{fb33}"
            ],
            "{c}"
        );
    }

    #[test]
    fn canonical_matches_rfc8785_example() {
        // RFC 8785 §3.2.2 input and its canonical output.
        let v: serde_json::Value = serde_json::from_str(
            r#"{
              "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
              "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
              "literals": [null, true, false]
            }"#,
        )
        .unwrap();
        assert_eq!(
            canonical(&v),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn canonical_numbers_use_ecmascript_spelling() {
        for (input, out) in [
            ("0", "0"),
            ("-0.0", "0"),
            ("1.0", "1"),
            ("100", "100"),
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("0.000001", "0.000001"),
            ("0.0000001", "1e-7"),
            ("9007199254740992", "9007199254740992"),
        ] {
            let v: serde_json::Value = serde_json::from_str(input).unwrap();
            assert_eq!(canonical(&v), out, "{input}");
        }
    }

    #[test]
    fn definition_hash_ignores_key_order_not_content() {
        let a = json!({"name": "t", "description": "d", "inputSchema": {"type": "object", "properties": {}}});
        let b = json!({"inputSchema": {"properties": {}, "type": "object"}, "description": "d", "name": "t"});
        let c = json!({"name": "t", "description": "d.", "inputSchema": {"type": "object", "properties": {}}});
        let h = |v: serde_json::Value| definition_hash(v.as_object().unwrap());
        assert_eq!(h(a.clone()), h(b));
        assert_ne!(h(a.clone()), h(c));
        assert_eq!(h(a).len(), 64);
    }

    #[test]
    fn lock_roundtrips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servers.lock");
        assert_eq!(Lock::load(&path).unwrap(), Lock::default());
        let mut lock = Lock::default();
        lock.pin(
            "ledger",
            "get_balance",
            "ab",
            "2026-01-01T00:00:00Z",
            "alice",
        );
        lock.pin("ledger", "freeze", "cd", "2026-01-01T00:00:00Z", "alice");
        lock.save(&path).unwrap();
        assert_eq!(Lock::load(&path).unwrap(), lock);
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["servers"]["ledger"]["freeze"]["sha256"], "cd");
        assert_eq!(v["servers"]["ledger"]["freeze"]["pinned_by"], "alice");
    }

    #[test]
    fn lock_rejects_other_versions_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("servers.lock");
        std::fs::write(&path, r#"{"version": 2, "servers": {}}"#).unwrap();
        assert!(matches!(Lock::load(&path), Err(PinsError::Version { .. })));
        std::fs::write(&path, "not json").unwrap();
        assert!(matches!(Lock::load(&path), Err(PinsError::Parse { .. })));
    }

    #[test]
    fn drifts_are_classified() {
        let mut lock = Lock::default();
        lock.pin("s", "same", "h1", "t", "u");
        lock.pin("s", "edited", "h2", "t", "u");
        lock.pin("s", "gone", "h3", "t", "u");
        assert_eq!(lock.drift("s", "same", "h1"), None);
        assert_eq!(
            lock.drift("other", "anything", "x"),
            None,
            "unpinned server"
        );
        assert!(lock.covers("s") && !lock.covers("other"));
        let listed = vec![
            ("same".to_string(), "h1".to_string()),
            ("edited".to_string(), "h2b".to_string()),
            ("added".to_string(), "h4".to_string()),
        ];
        let d = lock.drifts("s", &listed);
        let kinds: Vec<(&str, &str)> = d.iter().map(|(t, d)| (t.as_str(), d.as_str())).collect();
        assert_eq!(
            kinds,
            [("added", "new"), ("edited", "changed"), ("gone", "removed")]
        );
    }
}
