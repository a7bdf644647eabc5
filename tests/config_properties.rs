//! Property tests over what a config file and a caller control: config text, resource URIs and the
//! resource globs that match them. Each property runs a modest number of cases so `cargo test` stays
//! fast; for a longer run: `PROPTEST_CASES=100000 cargo test --release --test config_properties`.

mod support;

use std::path::Path;

use mcp_broker::auth::Caller;
use mcp_broker::config::{Config, normalise_uri};
use mcp_broker::policy::{Kind, Policy};
use proptest::prelude::*;
use support::proptest_cases as cases;

/// A config that exercises most tables, for mutation.
const SEED: &str = r#"[broker]
listen = "127.0.0.1:0"
separator = "__"
session_idle_timeout = "1h"
max_request_body = 4194304

[auth]
issuer = "https://as.example.com"
audience = "https://mcp.example.com/mcp"
required_scopes = ["mcp:tools"]

[[policy]]
servers = ["ledger"]
resources = ["ledger://policies/**"]
require_scopes = ["audit:read"]
message = "no"

[[policy]]
effect = "deny"
tools = ["delete_*"]
claims = { groups = "contractors" }

[limits]
per_caller = { rate = "10/s", burst = 20 }

[servers.ledger]
transport = "stdio"
command = "ledger"
args = ["stdio"]
env = { A = "${TOKEN}" }
timeout = "30s"
tools = { include = ["get_*"], exclude = ["get_audit_log"] }

[servers.web]
transport = "http"
url = "https://example.com/mcp"
headers = { "x-api-key" = "k" }
prefix = "web_1"
"#;

/// Fragments a mutation splices in: TOML syntax, keys and values the config knows.
const SNIPPETS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    "\"",
    "'",
    "{",
    "}",
    ",",
    "\n",
    "#",
    ".",
    "${",
    "}",
    "\\u",
    "\"\"\"",
    "[servers.x]",
    "[[policy]]",
    "transport = \"sse\"",
    "prefix = \"\"",
    "prefix = \"WEB-1\"",
    "url = \"ftp://x\"",
    "resources = [\"[\"]",
    "timeout = \"-1s\"",
    "listen = \"::\"",
    "1e999",
    "effect = \"maybe\"",
    "step_up = true",
    "inf",
    "nan",
    "-",
    "\u{0}",
    "\u{fffd}",
    "é",
];

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(Path::new("p.toml"), text, &|k| {
        (k == "TOKEN").then(|| "t".to_string())
    })
    .map_err(|e| e.to_string())
}

/// Every refusal points at the file and a line: `p.toml:LINE:` (then a column or a key).
fn names_file_and_line(message: &str) -> bool {
    message
        .strip_prefix("p.toml:")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(line, _)| !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, usize),
    Replace(usize, char),
    DuplicateLine(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), 0..SNIPPETS.len()).prop_map(|(at, i)| Mutation::Insert(at, i)),
        (any::<usize>(), any::<char>()).prop_map(|(at, c)| Mutation::Replace(at, c)),
        any::<usize>().prop_map(Mutation::DuplicateLine),
    ]
}

/// `at` scaled into `text` and moved back to a char boundary.
fn boundary(text: &str, at: usize) -> usize {
    let mut i = at % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &mut String, m: &Mutation) {
    match *m {
        Mutation::Delete(at, n) => {
            let from = boundary(text, at);
            let to = boundary(text, from.saturating_add(n).min(text.len()));
            text.replace_range(from..to, "");
        }
        Mutation::Insert(at, i) => text.insert_str(boundary(text, at), SNIPPETS[i]),
        Mutation::Replace(at, c) => {
            let from = boundary(text, at);
            if let Some(old) = text[from..].chars().next() {
                text.replace_range(from..from + old.len_utf8(), c.encode_utf8(&mut [0; 4]));
            }
        }
        Mutation::DuplicateLine(at) => {
            let lines: Vec<&str> = text.lines().collect();
            let line = lines[at % lines.len()].to_string();
            let from = boundary(text, at);
            text.insert_str(from, &format!("\n{line}\n"));
        }
    }
}

/// URI-ish text: mostly the characters that carry URI structure, escapes and dot segments.
fn uri_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-zA-Z0-9]{1,3}",
            2 => prop::sample::select(vec![
                "/", "//", ":", "://", "?", "#", "@", ".", "..", "/./", "/../", "%", "%2e", "%2E",
                "%2F", "%7e", "%41", "%4", "%zz", "~", "_", "-", "+", "[", "]", "*", "{id}", "é",
            ])
            .prop_map(str::to_string),
            1 => any::<char>().prop_map(String::from),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

/// A URI in normal form with no dot segments: scheme, optional host, path segments, optional query.
#[derive(Debug, Clone)]
struct Canonical {
    scheme: String,
    host: Option<String>,
    segments: Vec<String>,
    query: Option<String>,
}

impl Canonical {
    fn text(&self) -> String {
        let mut s = format!("{}:", self.scheme);
        if let Some(h) = &self.host {
            s.push_str("//");
            s.push_str(h);
        }
        for seg in &self.segments {
            s.push('/');
            s.push_str(seg);
        }
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s
    }
}

fn canonical() -> impl Strategy<Value = Canonical> {
    (
        "[a-z][a-z0-9+.-]{0,5}",
        prop::option::of("[a-z0-9-]{1,8}"),
        prop::collection::vec("[a-zA-Z0-9_~-][a-zA-Z0-9_~.-]{0,4}(%2F|%20)?", 0..5),
        prop::option::of("[a-zA-Z0-9=&_~.-]{0,8}"),
    )
        .prop_map(|(scheme, host, segments, query)| Canonical {
            scheme,
            host,
            segments,
            query,
        })
}

/// Bytes that decide each choice a respelling makes.
struct Noise<'a>(std::iter::Cycle<std::slice::Iter<'a, u8>>);

impl Noise<'_> {
    fn next(&mut self) -> u8 {
        self.0.next().copied().unwrap_or(0)
    }
}

/// `s` with unreserved characters percent-encoded at random (hex in either case), existing escapes'
/// hex in either case, and (for a host) letters in either case.
fn encode(s: &str, may_change_case: bool, noise: &mut Noise) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            out.push('%');
            if noise.next().is_multiple_of(2) {
                out.push_str(&hex.to_ascii_lowercase());
            } else {
                out.push_str(&hex);
            }
            continue;
        }
        let n = noise.next();
        let ch = if may_change_case && n.is_multiple_of(3) {
            ch.to_ascii_uppercase()
        } else {
            ch
        };
        let unreserved_special = matches!(ch, '.' | '_' | '~' | '-');
        if (ch.is_ascii_alphanumeric() && n % 4 == 1) || (unreserved_special && n % 2 == 1) {
            let hex = format!("{:02X}", ch as u32);
            out.push('%');
            out.push_str(&if n % 8 == 1 {
                hex.to_ascii_lowercase()
            } else {
                hex
            });
        } else {
            out.push(ch);
        }
    }
    out
}

/// Another spelling of `c`: random case in scheme and host, unreserved characters percent-encoded,
/// and `.`, `zz/..` and `%2E` segments inserted between segments.
fn respell(c: &Canonical, noise: &[u8]) -> String {
    let mut noise = Noise(noise.iter().cycle());
    let mut s: String = c
        .scheme
        .chars()
        .map(|ch| {
            if noise.next().is_multiple_of(2) {
                ch.to_ascii_uppercase()
            } else {
                ch
            }
        })
        .collect();
    s.push(':');
    if let Some(h) = &c.host {
        s.push_str("//");
        s.push_str(&encode(h, true, &mut noise));
    }
    for seg in &c.segments {
        match noise.next() % 5 {
            0 => s.push_str("/."),
            1 => s.push_str("/zz/.."),
            2 => s.push_str("/%2E"),
            _ => {}
        }
        s.push('/');
        s.push_str(&encode(seg, false, &mut noise));
    }
    if let Some(q) = &c.query {
        s.push('?');
        s.push_str(&encode(q, false, &mut noise));
    }
    s
}

fn deny_resources(patterns: &[String]) -> Result<Policy, String> {
    let list: Vec<String> = patterns
        .iter()
        .map(|p| toml::Value::String(p.clone()).to_string())
        .collect();
    let text = format!(
        "[[policy]]\neffect = \"deny\"\nresources = [{}]\n",
        list.join(", ")
    );
    parse(&text).map(|c| Policy::new(c.policy, false))
}

fn refused(p: &Policy, uri: &str) -> bool {
    !p.decide(&Caller::anonymous(), "s", Kind::Resource, uri)
        .allow
}

proptest! {
    // 256 cases each keeps the whole file near two seconds; PROPTEST_CASES overrides it. A failure is
    // printed with its shrunk input rather than saved to a file beside the test.
    #![proptest_config(cases(256))]

    #[test]
    fn config_text_parses_or_names_file_and_line(text in "\\PC{0,200}") {
        if let Err(e) = parse(&text) {
            prop_assert!(names_file_and_line(&e), "{e}");
        }
    }

    #[test]
    fn mutated_config_parses_or_names_file_and_line(
        mutations in prop::collection::vec(mutation(), 1..6)
    ) {
        let mut text = SEED.to_string();
        for m in &mutations {
            apply(&mut text, m);
        }
        if let Err(e) = parse(&text) {
            prop_assert!(names_file_and_line(&e), "{e}\n--- text ---\n{text}");
        }
    }

    #[test]
    fn normalising_is_idempotent(uri in uri_text()) {
        let once = normalise_uri(&uri).text;
        prop_assert_eq!(&normalise_uri(&once).text, &once, "from {:?}", uri);
    }

    #[test]
    fn arbitrary_text_normalises_without_panic(uri in "\\PC{0,64}") {
        let once = normalise_uri(&uri).text;
        prop_assert_eq!(normalise_uri(&once).text, once);
    }

    #[test]
    fn equivalent_spellings_normalise_alike(
        c in canonical(),
        noise in prop::collection::vec(any::<u8>(), 1..32),
    ) {
        let want = normalise_uri(&c.text());
        prop_assert!(!want.ambiguous);
        let spelled = respell(&c, &noise);
        let got = normalise_uri(&spelled);
        prop_assert_eq!(&got.text, &want.text, "spelled {:?}", spelled);
        prop_assert!(!got.ambiguous, "{:?}", spelled);
    }

    #[test]
    fn a_star_never_crosses_a_slash(
        c in canonical(),
        a in "[a-zA-Z0-9_~-]{1,6}",
        b in "[a-zA-Z0-9_~-]{1,6}",
    ) {
        // No query, and the generator's characters hold no glob syntax: the base is a literal.
        let base = normalise_uri(&Canonical { query: None, ..c }.text()).text;
        let one = deny_resources(&[format!("{base}/*")]).expect("a literal base and `*` compile");
        let any = deny_resources(&[format!("{base}/**")]).expect("`**` compiles");
        let (one_deep, two_deep) = (format!("{base}/{a}"), format!("{base}/{a}/{b}"));
        prop_assert!(refused(&one, &one_deep), "{}", one_deep);
        prop_assert!(!refused(&one, &two_deep), "`*` crossed `/` in {}", two_deep);
        prop_assert!(refused(&any, &two_deep), "{}", two_deep);
    }

    #[test]
    fn arbitrary_globs_and_uris_decide_without_panic(
        patterns in prop::collection::vec(uri_text(), 1..4),
        uri in uri_text(),
    ) {
        match deny_resources(&patterns) {
            Ok(p) => {
                let _ = refused(&p, &uri);
            }
            Err(e) => prop_assert!(names_file_and_line(&e), "{e}"),
        }
    }
}

#[test]
fn the_mutation_seed_is_valid() {
    // Else every mutation would start from an error and the parser's deeper checks would go untried.
    parse(SEED).expect("SEED validates");
}
