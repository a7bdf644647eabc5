//! The namespaced view over every upstream's tools, prompts and resources. Pure: no I/O.
//!
//! Exposed tool and prompt names are `<prefix><separator><name>`, always within
//! `^[A-Za-z0-9_-]{1,64}$` (Claude rejects a whole connector when one name fails). Resource URIs
//! become `<scheme-prefix>+<original-uri>`. Routing goes through lookup tables built here, never by
//! splitting a string.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{Config, NameFilter};

/// What an item is. One type for the catalog's sections, policy decisions, audit records and
/// list-change events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Tool,
    Prompt,
    Resource,
    Template,
}

impl Kind {
    /// The kinds that have a list and a `list_changed` notification (templates change with resources).
    pub const LISTED: [Kind; 3] = [Kind::Tool, Kind::Prompt, Kind::Resource];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tool => "tool",
            Kind::Prompt => "prompt",
            Kind::Resource => "resource",
            Kind::Template => "resource_template",
        }
    }

    /// Templates are decided, listed-as-changed and fingerprinted with resources.
    pub fn family(self) -> Kind {
        match self {
            Kind::Template => Kind::Resource,
            k => k,
        }
    }

    /// Position among the four lists (tools, prompts, resources, templates).
    pub fn slot(self) -> usize {
        match self {
            Kind::Tool => 0,
            Kind::Prompt => 1,
            Kind::Resource => 2,
            Kind::Template => 3,
        }
    }

    /// Position among [`Kind::LISTED`] (a template counts as a resource).
    pub fn index(self) -> usize {
        match self.family() {
            Kind::Tool => 0,
            Kind::Prompt => 1,
            _ => 2,
        }
    }

    /// The list method's result field that holds items of this kind.
    pub fn list_field(self) -> &'static str {
        match self {
            Kind::Tool => "tools",
            Kind::Prompt => "prompts",
            Kind::Resource => "resources",
            Kind::Template => "resourceTemplates",
        }
    }

    /// The name of this kind's list (the audit record of a list names it).
    pub fn list_name(self) -> &'static str {
        match self {
            Kind::Tool => "tools",
            Kind::Prompt => "prompts",
            Kind::Resource => "resources",
            Kind::Template => "resource_templates",
        }
    }
}

/// The longest exposed name Claude accepts.
pub const MAX_NAME: usize = 64;

/// A JSON object as an upstream sent it (insertion-ordered: serde_json's `preserve_order`).
pub type Object = serde_json::Map<String, Value>;

/// One listed definition (tool, prompt, resource or resource template) exactly as the upstream
/// sent it: every field, known to rmcp or not, in the upstream's key order. The catalog rewrites
/// only the key it namespaces (`name`, `uri` or `uriTemplate`), in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Item(Arc<Object>);

impl Item {
    pub fn new(object: Object) -> Self {
        Self(Arc::new(object))
    }

    pub fn object(&self) -> &Object {
        &self.0
    }

    /// The very same definition (not an equal copy): what a cache of serialised lists keys on.
    pub fn same(&self, other: &Item) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Where the definition lives, for hashing alongside [`Self::same`].
    pub fn addr(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// A string field (`""` when absent or not a string).
    pub fn str(&self, key: &str) -> &str {
        self.0.get(key).and_then(Value::as_str).unwrap_or("")
    }

    /// A copy with `key` set to `value`, keeping the key's position.
    fn with(&self, key: &str, value: String) -> Item {
        let mut o = (*self.0).clone();
        match o.get_mut(key) {
            Some(v) => *v = Value::String(value),
            None => {
                o.insert(key.to_string(), Value::String(value));
            }
        }
        Item::new(o)
    }
}

impl serde::Serialize for Item {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// The key that names an item of each kind.
pub const TOOL_KEY: &str = "name";
pub const PROMPT_KEY: &str = "name";
pub const RESOURCE_KEY: &str = "uri";
pub const TEMPLATE_KEY: &str = "uriTemplate";

/// What one upstream currently offers, as it listed it.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub tools: Vec<Item>,
    pub prompts: Vec<Item>,
    pub resources: Vec<Item>,
    pub templates: Vec<Item>,
    /// Until when each list may be cached, by [`Kind::slot`]: when it was fetched plus the smallest
    /// `ttlMs` its pages carried (SEP-2549); `None` when the server gave no hint (a 2025-era server).
    pub fresh_until: [Option<std::time::Instant>; 4],
}

impl Listing {
    /// What is left of the server's caching hint for `kind`, in milliseconds (0 without a hint).
    pub fn ttl_ms(&self, kind: Kind) -> u64 {
        self.fresh_until[kind.slot()]
            .map(|t| {
                t.saturating_duration_since(std::time::Instant::now())
                    .as_millis() as u64
            })
            .unwrap_or(0)
    }
}

impl Listing {
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
            && self.prompts.is_empty()
            && self.resources.is_empty()
            && self.templates.is_empty()
    }
}

/// The naming rules for one server, taken from its config.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub server: Arc<str>,
    pub prefix: String,
    /// Lower-case, URI-scheme-safe form of the prefix used for resource URIs; empty when `prefix` is.
    pub uri_prefix: String,
    pub tools: NameFilter,
}

impl Namespace {
    pub fn from_config(config: &Config) -> Vec<Namespace> {
        config
            .servers
            .iter()
            .map(|s| Namespace {
                server: Arc::from(s.name.as_str()),
                prefix: s.prefix.clone(),
                uri_prefix: uri_prefix(&s.prefix),
                tools: s.tools.clone(),
            })
            .collect()
    }
}

/// An exposed item and where it routes.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    pub server: Arc<str>,
    /// The name (or URI) the upstream knows it by.
    pub original: String,
    /// The item as exposed (name or URI rewritten, everything else unchanged).
    pub item: T,
}

/// Two servers wanted the same exposed name; `kept` has it, `dropped` does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collision {
    pub kind: &'static str,
    pub name: String,
    pub kept: Arc<str>,
    pub dropped: Arc<str>,
}

impl std::fmt::Display for Collision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} `{}` is exposed by both `{}` and `{}`; `{}` keeps it (set a distinct `prefix` or a `tools` filter)",
            self.kind, self.name, self.kept, self.dropped, self.kept
        )
    }
}

/// Items of one kind, in exposure order, with a name index.
#[derive(Debug, Clone)]
pub struct Section<T> {
    pub entries: Vec<Entry<T>>,
    index: HashMap<String, usize>,
    /// A hash of each entry's serialized item, computed once on first use (view fingerprints).
    hashes: std::sync::OnceLock<Vec<u64>>,
}

impl<T> Default for Section<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            index: HashMap::new(),
            hashes: std::sync::OnceLock::new(),
        }
    }
}

impl<T> Section<T> {
    pub fn get(&self, exposed: &str) -> Option<&Entry<T>> {
        self.index.get(exposed).map(|&i| &self.entries[i])
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    fn owner(&self, exposed: &str) -> Option<&Arc<str>> {
        self.get(exposed).map(|e| &e.server)
    }
}

/// The merged view. Immutable; a change builds a new one.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub tools: Section<Item>,
    pub prompts: Section<Item>,
    pub resources: Section<Item>,
    pub templates: Section<Item>,
    /// `uri_prefix` → server, for routing rewritten URIs.
    uri_routes: HashMap<String, Arc<str>>,
    /// Servers whose URIs are not rewritten, in config order.
    unprefixed: Vec<Arc<str>>,
}

/// Where an exposed resource URI goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriRoute {
    pub server: Arc<str>,
    pub original: String,
}

impl Catalog {
    /// Build the view. Servers are taken in `namespaces` order; on a collision the server that owned
    /// the name in `previous` keeps it (so a late or changed upstream never takes a name away), else
    /// the earlier server does.
    pub fn build(
        namespaces: &[Namespace],
        listings: &HashMap<Arc<str>, Listing>,
        separator: &str,
        previous: Option<&Catalog>,
    ) -> (Catalog, Vec<Collision>) {
        let mut collisions = Vec::new();
        let mut cat = Catalog::default();
        for ns in namespaces {
            if ns.uri_prefix.is_empty() {
                cat.unprefixed.push(ns.server.clone());
            } else {
                cat.uri_routes
                    .insert(ns.uri_prefix.clone(), ns.server.clone());
            }
        }
        // Tools.
        let mut candidates = Vec::new();
        for ns in namespaces {
            let Some(l) = listings.get(&ns.server) else {
                continue;
            };
            for t in &l.tools {
                let name = t.str(TOOL_KEY);
                if !ns.tools.admits(name) {
                    continue;
                }
                let exposed = expose_name(&ns.prefix, separator, name);
                candidates.push(Entry {
                    server: ns.server.clone(),
                    original: name.to_string(),
                    item: t.with(TOOL_KEY, exposed),
                });
            }
        }
        cat.tools = merge(
            "tool",
            candidates,
            |e| e.item.str(TOOL_KEY).to_string(),
            previous.map(|p| &p.tools),
            &mut collisions,
        );

        // Prompts.
        let mut candidates = Vec::new();
        for ns in namespaces {
            let Some(l) = listings.get(&ns.server) else {
                continue;
            };
            for p in &l.prompts {
                let name = p.str(PROMPT_KEY);
                let exposed = expose_name(&ns.prefix, separator, name);
                candidates.push(Entry {
                    server: ns.server.clone(),
                    original: name.to_string(),
                    item: p.with(PROMPT_KEY, exposed),
                });
            }
        }
        cat.prompts = merge(
            "prompt",
            candidates,
            |e| e.item.str(PROMPT_KEY).to_string(),
            previous.map(|p| &p.prompts),
            &mut collisions,
        );

        // Resources and templates.
        let mut candidates = Vec::new();
        let mut tcandidates = Vec::new();
        for ns in namespaces {
            let Some(l) = listings.get(&ns.server) else {
                continue;
            };
            for r in &l.resources {
                let uri = r.str(RESOURCE_KEY);
                candidates.push(Entry {
                    server: ns.server.clone(),
                    original: uri.to_string(),
                    item: r.with(RESOURCE_KEY, expose_uri(&ns.uri_prefix, uri)),
                });
            }
            for t in &l.templates {
                let uri = t.str(TEMPLATE_KEY);
                tcandidates.push(Entry {
                    server: ns.server.clone(),
                    original: uri.to_string(),
                    item: t.with(TEMPLATE_KEY, expose_uri(&ns.uri_prefix, uri)),
                });
            }
        }
        cat.resources = merge(
            "resource",
            candidates,
            |e| e.item.str(RESOURCE_KEY).to_string(),
            previous.map(|p| &p.resources),
            &mut collisions,
        );
        cat.templates = merge(
            "resource template",
            tcandidates,
            |e| e.item.str(TEMPLATE_KEY).to_string(),
            previous.map(|p| &p.templates),
            &mut collisions,
        );
        (cat, collisions)
    }

    /// Route an exposed resource URI to its server and the upstream's own URI.
    pub fn route_uri(&self, exposed: &str) -> Option<UriRoute> {
        if let Some(e) = self.resources.get(exposed) {
            return Some(UriRoute {
                server: e.server.clone(),
                original: e.original.clone(),
            });
        }
        if let Some((scheme, rest)) = exposed.split_once('+')
            && let Some(server) = self.uri_routes.get(scheme)
        {
            return Some(UriRoute {
                server: server.clone(),
                original: rest.to_string(),
            });
        }
        // An unlisted URI on an unprefixed server: a template match decides, else the only such server.
        for t in &self.templates.entries {
            if self.unprefixed.contains(&t.server) && template_matches(&t.original, exposed) {
                return Some(UriRoute {
                    server: t.server.clone(),
                    original: exposed.to_string(),
                });
            }
        }
        match self.unprefixed.as_slice() {
            [only] => Some(UriRoute {
                server: only.clone(),
                original: exposed.to_string(),
            }),
            _ => None,
        }
    }

    /// The exposed form of an upstream URI from `server` (for rewriting read results and updates).
    pub fn expose_uri_of(&self, server: &str, original: &str) -> String {
        let prefix = self
            .uri_routes
            .iter()
            .find(|(_, s)| s.as_ref() == server)
            .map(|(p, _)| p.as_str())
            .unwrap_or("");
        expose_uri(prefix, original)
    }

    /// Rewrite the URIs in a raw `resources/read` result from `server` (`contents[].uri`) to their
    /// exposed form; everything else is left as the upstream sent it.
    pub fn expose_read_result(&self, server: &str, result: &mut Value) {
        let Some(contents) = result.get_mut("contents").and_then(Value::as_array_mut) else {
            return;
        };
        for c in contents {
            if let Some(Value::String(uri)) = c.get_mut("uri") {
                *uri = self.expose_uri_of(server, uri);
            }
        }
    }

    /// A fingerprint per kind (tools, prompts, resources with templates), so a rebuild notifies
    /// sessions only when their view really changed.
    pub fn fingerprint(&self) -> [u64; 3] {
        self.fingerprint_where(&|_, _, _| true)
    }

    /// [`Self::fingerprint`] over the entries `keep(kind, server, original)` admits (templates count
    /// with resources).
    pub fn fingerprint_where(&self, keep: &dyn Fn(Kind, &str, &str) -> bool) -> [u64; 3] {
        use std::hash::{Hash, Hasher};
        fn section<T: serde::Serialize>(
            s: &mut std::collections::hash_map::DefaultHasher,
            sec: &Section<T>,
            kind: Kind,
            keep: &dyn Fn(Kind, &str, &str) -> bool,
        ) {
            let hashes = sec.hashes.get_or_init(|| {
                sec.entries
                    .iter()
                    .map(|e| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        serde_json::to_string(&e.item)
                            .unwrap_or_default()
                            .hash(&mut h);
                        h.finish()
                    })
                    .collect()
            });
            for (e, h) in sec.entries.iter().zip(hashes) {
                if keep(kind, &e.server, &e.original) {
                    h.hash(s);
                }
            }
        }
        let mut out = [0u64; 3];
        let mut t = std::collections::hash_map::DefaultHasher::new();
        section(&mut t, &self.tools, Kind::Tool, keep);
        out[0] = t.finish();
        let mut p = std::collections::hash_map::DefaultHasher::new();
        section(&mut p, &self.prompts, Kind::Prompt, keep);
        out[1] = p.finish();
        let mut r = std::collections::hash_map::DefaultHasher::new();
        section(&mut r, &self.resources, Kind::Resource, keep);
        section(&mut r, &self.templates, Kind::Template, keep);
        out[2] = r.finish();
        out
    }
}

fn merge<T>(
    kind: &'static str,
    candidates: Vec<Entry<T>>,
    key: impl Fn(&Entry<T>) -> String,
    previous: Option<&Section<T>>,
    collisions: &mut Vec<Collision>,
) -> Section<T> {
    // Which server gets each contested name: the previous owner if it still offers it, else the first.
    let mut winner: HashMap<String, Arc<str>> = HashMap::new();
    for c in &candidates {
        let k = key(c);
        match winner.get(&k) {
            None => {
                winner.insert(k, c.server.clone());
            }
            Some(w) if *w == c.server => {}
            Some(_) => {
                if previous.and_then(|p| p.owner(&k)) == Some(&c.server) {
                    winner.insert(k, c.server.clone());
                }
            }
        }
    }
    let mut section = Section::default();
    let mut reported = HashSet::new();
    for c in candidates {
        let k = key(&c);
        let w = &winner[&k];
        if *w != c.server || section.index.contains_key(&k) {
            if reported.insert((k.clone(), c.server.clone())) {
                collisions.push(Collision {
                    kind,
                    name: k,
                    kept: w.clone(),
                    dropped: c.server.clone(),
                });
            }
            continue;
        }
        section.index.insert(k, section.entries.len());
        section.entries.push(c);
    }
    section
}

/// `<prefix><sep><name>` made valid for Claude: other characters become `_`; a name longer than 64
/// keeps its first 55 characters and gets `_` plus 8 hex digits of a hash of the full name, so the
/// shortening is stable across restarts and distinct for distinct names.
pub fn expose_name(prefix: &str, separator: &str, name: &str) -> String {
    let full = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}{separator}{name}")
    };
    let mut clean: String = full
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        clean.push('_');
    }
    if clean.len() > MAX_NAME {
        let digest = Sha256::digest(full.as_bytes());
        let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        clean.truncate(MAX_NAME - 9);
        clean.push('_');
        clean.push_str(&hex);
    }
    clean
}

/// A URI-scheme-safe, lower-case form of a prefix (`_` → `-`; must start with a letter). The rule
/// lives with the config, which refuses two prefixes that fold to one.
pub use crate::config::uri_prefix;

pub fn expose_uri(uri_prefix: &str, uri: &str) -> String {
    if uri_prefix.is_empty() {
        uri.to_string()
    } else {
        format!("{uri_prefix}+{uri}")
    }
}

/// Does an RFC 6570 level-1 template (`file:///{path}`) match `uri`? Each `{var}` matches any run of
/// characters; literal parts must match exactly.
fn template_matches(template: &str, uri: &str) -> bool {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        parts.push(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => rest = &rest[open + close + 1..],
            None => return template == uri,
        }
    }
    parts.push(rest);
    if parts.len() == 1 {
        return template == uri;
    }
    let mut pos = 0;
    for (i, lit) in parts.iter().enumerate() {
        if i == 0 {
            if !uri.starts_with(lit) {
                return false;
            }
            pos = lit.len();
        } else if i == parts.len() - 1 {
            return uri.len() >= pos + lit.len() && uri[pos..].ends_with(lit);
        } else {
            match uri[pos..].find(lit) {
                Some(j) if !lit.is_empty() => pos += j + lit.len(),
                Some(_) => {}
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: Value) -> Item {
        match v {
            Value::Object(o) => Item::new(o),
            other => panic!("not an object: {other}"),
        }
    }

    fn tool(name: &str) -> Item {
        item(
            serde_json::json!({"name": name, "description": "d", "inputSchema": {"type": "object"}}),
        )
    }

    fn ns(server: &str, prefix: &str) -> Namespace {
        Namespace {
            server: server.into(),
            prefix: prefix.into(),
            uri_prefix: uri_prefix(prefix),
            tools: NameFilter::default(),
        }
    }

    fn listings(items: &[(&str, &[&str])]) -> HashMap<Arc<str>, Listing> {
        items
            .iter()
            .map(|(s, tools)| {
                (
                    Arc::from(*s),
                    Listing {
                        tools: tools.iter().map(|t| tool(t)).collect(),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn names_are_prefixed_and_valid() {
        assert_eq!(
            expose_name("ledger", "__", "list_accounts"),
            "ledger__list_accounts"
        );
        assert_eq!(
            expose_name("", "__", "list.accounts/v2"),
            "list_accounts_v2"
        );
        let long = "x".repeat(100);
        let a = expose_name("srv", "__", &long);
        let b = expose_name("srv", "__", &format!("{long}y"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b, "distinct long names must stay distinct");
        assert_eq!(a, expose_name("srv", "__", &long), "shortening is stable");
        let re = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        assert!(re(&a) && re(&b));
    }

    #[test]
    fn collisions_keep_first_and_previous_owner() {
        let nss = [ns("a", ""), ns("b", "")];
        let (cat, col) = Catalog::build(
            &nss,
            &listings(&[("a", &["x", "y"]), ("b", &["x", "z"])]),
            "__",
            None,
        );
        assert_eq!(cat.tools.get("x").unwrap().server.as_ref(), "a");
        assert_eq!(cat.tools.len(), 3);
        assert_eq!(col.len(), 1);
        assert_eq!((col[0].kept.as_ref(), col[0].dropped.as_ref()), ("a", "b"));
        assert!(col[0].to_string().contains("`a` and `b`"));

        // b owned `x` first (a was down); when a comes back, b keeps it.
        let (prev, _) = Catalog::build(&nss, &listings(&[("b", &["x"])]), "__", None);
        let (cat, col) = Catalog::build(
            &nss,
            &listings(&[("a", &["x"]), ("b", &["x"])]),
            "__",
            Some(&prev),
        );
        assert_eq!(cat.tools.get("x").unwrap().server.as_ref(), "b");
        assert_eq!(col[0].dropped.as_ref(), "a");
    }

    #[test]
    fn filters_and_routing() {
        let cfg = crate::config::Config::parse(
            std::path::Path::new("s.toml"),
            "[servers.ev]\ntransport=\"stdio\"\ncommand=\"x\"\ntools={exclude=[\"get-env\"]}\n",
            &|_| None,
        )
        .unwrap();
        let nss = Namespace::from_config(&cfg);
        let (cat, _) = Catalog::build(&nss, &listings(&[("ev", &["echo", "get-env"])]), "__", None);
        let e = cat.tools.get("ev__echo").unwrap();
        assert_eq!(e.original, "echo");
        assert!(cat.tools.get("ev__get-env").is_none());
    }

    #[test]
    fn uris_route_back() {
        let nss = [ns("My_Srv", "My_Srv"), ns("plain", "")];
        let mut l = HashMap::new();
        let mut a = Listing::default();
        a.resources.push(item(
            serde_json::json!({"uri": "demo://doc/1", "name": "doc"}),
        ));
        l.insert(Arc::from("My_Srv"), a);
        let mut b = Listing::default();
        b.templates.push(item(
            serde_json::json!({"uriTemplate": "file:///{path}", "name": "files"}),
        ));
        l.insert(Arc::from("plain"), b);
        let (cat, _) = Catalog::build(&nss, &l, "__", None);
        assert_eq!(
            cat.resources.entries[0].item.str(RESOURCE_KEY),
            "my-srv+demo://doc/1"
        );
        let r = cat.route_uri("my-srv+demo://doc/1").unwrap();
        assert_eq!(
            (r.server.as_ref(), r.original.as_str()),
            ("My_Srv", "demo://doc/1")
        );
        let r = cat.route_uri("my-srv+demo://doc/2").unwrap();
        assert_eq!(r.original, "demo://doc/2");
        let r = cat.route_uri("file:///etc/motd").unwrap();
        assert_eq!(r.server.as_ref(), "plain");
        assert_eq!(cat.expose_uri_of("My_Srv", "demo://x"), "my-srv+demo://x");
        assert!(template_matches("a://{x}/b/{y}", "a://1/b/2"));
        assert!(!template_matches("a://{x}/b", "a://1/c"));
    }

    #[test]
    fn definitions_pass_through_with_only_the_name_rewritten() {
        // Key order not alphabetical, a field rmcp does not model (`execution`), nested order.
        let text = r#"{"name":"sequentialthinking","title":"T","description":"d","inputSchema":{"type":"object","properties":{"thought":{"type":"string"},"nextThoughtNeeded":{"type":"boolean"},"alpha":{"type":"integer"}},"required":["thought"]},"execution":{"taskSupport":"forbidden"},"annotations":{"readOnlyHint":true},"x-future":[1,{"b":2,"a":1}]}"#;
        let raw: Object = serde_json::from_str(text).unwrap();
        let mut l = Listing::default();
        l.tools.push(Item::new(raw));
        l.prompts.push(item(
            serde_json::json!({"name": "p", "zz": 1, "arguments": []}),
        ));
        l.resources.push(item(
            serde_json::json!({"uri": "demo://a", "name": "a", "size": 3, "_meta": {"k": 1}}),
        ));
        l.templates.push(item(
            serde_json::json!({"uriTemplate": "demo://{x}", "name": "t", "mimeType": "text/plain"}),
        ));
        let listings = HashMap::from([(Arc::from("st"), l)]);
        let (cat, _) = Catalog::build(&[ns("st", "st")], &listings, "__", None);
        let out = serde_json::to_string(&cat.tools.entries[0].item).unwrap();
        assert_eq!(
            out,
            text.replace("\"sequentialthinking\"", "\"st__sequentialthinking\"")
        );
        assert_eq!(cat.tools.entries[0].original, "sequentialthinking");
        assert_eq!(
            serde_json::to_string(&cat.prompts.entries[0].item).unwrap(),
            r#"{"name":"st__p","zz":1,"arguments":[]}"#
        );
        assert_eq!(
            serde_json::to_string(&cat.resources.entries[0].item).unwrap(),
            r#"{"uri":"st+demo://a","name":"a","size":3,"_meta":{"k":1}}"#
        );
        assert_eq!(
            serde_json::to_string(&cat.templates.entries[0].item).unwrap(),
            r#"{"uriTemplate":"st+demo://{x}","name":"t","mimeType":"text/plain"}"#
        );
        assert!(cat.tools.get("st__sequentialthinking").is_some());
        assert!(cat.resources.get("st+demo://a").is_some());
    }

    #[test]
    fn read_results_get_exposed_uris_only() {
        let (cat, _) = Catalog::build(&[ns("ev", "ev")], &HashMap::new(), "__", None);
        let mut r: Value = serde_json::from_str(
            r#"{"contents":[{"uri":"demo://r/1","text":"t","mimeType":"text/plain","x":1},{"blob":"AA==","uri":"demo://r/2"}],"_meta":{"z":0}}"#,
        )
        .unwrap();
        cat.expose_read_result("ev", &mut r);
        assert_eq!(
            r.to_string(),
            r#"{"contents":[{"uri":"ev+demo://r/1","text":"t","mimeType":"text/plain","x":1},{"blob":"AA==","uri":"ev+demo://r/2"}],"_meta":{"z":0}}"#
        );
    }
}
