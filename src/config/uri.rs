//! Pure URI rules that validation needs and the layers above share: the resource URI prefix a server's
//! `prefix` becomes, and the normal form resource policy matches.
//!
//! [`normalise_uri`] follows RFC 3986 §6.2.2 (syntax-based normalisation) so that a deny rule cannot be
//! walked around by spelling one URI another way: scheme and host lower-cased (§6.2.2.1),
//! percent-encoded unreserved characters decoded and the remaining escapes' hex upper-cased (§6.2.2.2),
//! dot segments removed from an absolute path (§6.2.2.3 with the §5.2.4 algorithm). Reserved escapes
//! such as `%2F` stay encoded: by the RFC they name a different resource than the literal character.

/// The resource URI prefix of a server `prefix`: lower-cased, every character outside `a-z 0-9 - .`
/// becomes `-`, and an `s` goes in front unless it starts with a letter (a URI scheme must).
/// `""` stays `""` (URIs unchanged). Two prefixes with one result would share resource URIs.
///
/// The catalog routes resource URIs by it (`crate::catalog::uri_prefix` is this function).
pub fn uri_prefix(prefix: &str) -> String {
    if prefix.is_empty() {
        return String::new();
    }
    let mut s: String = prefix
        .chars()
        .map(|c| match c {
            'A'..='Z' => c.to_ascii_lowercase(),
            'a'..='z' | '0'..='9' | '-' | '.' => c,
            _ => '-',
        })
        .collect();
    if !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        s.insert(0, 's');
    }
    s
}

/// A URI in normal form, as resource policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalUri {
    pub text: String,
    /// A `..` climbed above the path's root, or a path that is not absolute has a `.` or `..`
    /// segment. Upstreams read such a URI differently (`ledger://public/../secret/x` is
    /// `ledger://public/secret/x` by RFC 3986, `secret/x` to one that takes all after `//` as a path),
    /// so no glob over one reading can safely decide it.
    pub ambiguous: bool,
}

/// The normal form of a URI (or URI reference) for policy matching; idempotent, never fails.
///
/// A string without a scheme gets the percent normalisation only, unless that reveals a scheme
/// (`%6Cedger://x` → `ledger://x`), in which case it is normalised as that URI.
pub fn normalise_uri(uri: &str) -> NormalUri {
    if let Some((scheme, rest)) = split_scheme(uri) {
        return absolute(scheme, rest);
    }
    let decoded = percent(uri, false);
    match split_scheme(&decoded) {
        Some((scheme, rest)) => absolute(scheme, rest),
        None => NormalUri {
            ambiguous: has_dot_segment(decoded.split(['?', '#']).next().unwrap_or("")),
            text: decoded,
        },
    }
}

fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|seg| seg == "." || seg == "..")
}

/// `scheme ":" rest` when the text before the first `:` is a scheme (`ALPHA *(ALPHA / DIGIT / + - .)`).
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some((scheme, rest))
}

fn absolute(scheme: &str, rest: &str) -> NormalUri {
    let mut out = scheme.to_ascii_lowercase();
    out.push(':');
    let (authority, rest) = match rest.strip_prefix("//") {
        Some(r) => {
            let end = r.find(['/', '?', '#']).unwrap_or(r.len());
            (Some(&r[..end]), &r[end..])
        }
        None => (None, rest),
    };
    let (rest, fragment) = match rest.split_once('#') {
        Some((r, f)) => (r, Some(f)),
        None => (rest, None),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if let Some(a) = authority {
        out.push_str("//");
        // Userinfo is case-sensitive; the host (and port, digits) is not.
        match a.rsplit_once('@') {
            Some((user, host)) => {
                out.push_str(&percent(user, false));
                out.push('@');
                out.push_str(&percent(host, true));
            }
            None => out.push_str(&percent(a, true)),
        }
    }
    let path = percent(path, false);
    let ambiguous = if path.starts_with('/') {
        let (resolved, climbed) = remove_dot_segments(&path);
        // Without an authority a path may not begin `//` (it would read as one): RFC 3986 §3.3.
        if authority.is_none() && resolved.starts_with("//") {
            out.push_str("/.");
        }
        out.push_str(&resolved);
        climbed
    } else {
        out.push_str(&path);
        has_dot_segment(&path)
    };
    if let Some(q) = query {
        out.push('?');
        out.push_str(&percent(q, false));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(&percent(f, false));
    }
    NormalUri {
        text: out,
        ambiguous,
    }
}

/// Percent normalisation of one component: `%XX` of an unreserved character becomes the character,
/// other escapes get upper-case hex, and a `%` that starts no escape becomes `%25` (what it means
/// literally), so the result is a fixed point. `lower` also lower-cases ASCII letters (for a host).
fn percent(s: &str, lower: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        push_cased(&mut out, &rest[..at], lower);
        let hex = match rest.as_bytes().get(at + 1..at + 3) {
            Some(&[h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                Some(hex_value(h) << 4 | hex_value(l))
            }
            _ => None,
        };
        match hex {
            Some(b) if is_unreserved(b) => {
                out.push(if lower { b.to_ascii_lowercase() } else { b } as char);
                rest = &rest[at + 3..];
            }
            Some(b) => {
                out.push_str(&format!("%{b:02X}"));
                rest = &rest[at + 3..];
            }
            None => {
                out.push_str("%25");
                rest = &rest[at + 1..];
            }
        }
    }
    push_cased(&mut out, rest, lower);
    out
}

fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        _ => (c | 0x20) - b'a' + 10,
    }
}

fn push_cased(out: &mut String, s: &str, lower: bool) {
    if lower {
        out.push_str(&s.to_ascii_lowercase());
    } else {
        out.push_str(s);
    }
}

/// RFC 3986 §2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 §5.2.4, for a path that begins with `/`; and whether a `..` climbed above the root.
fn remove_dot_segments(path: &str) -> (String, bool) {
    let mut input = path;
    let mut out = String::with_capacity(path.len());
    let mut climbed = false;
    let mut pop = |out: &mut String| {
        climbed |= out.is_empty();
        let cut = out.rfind('/').unwrap_or(0);
        out.truncate(cut);
    };
    while !input.is_empty() {
        if let Some(r) = input.strip_prefix("../") {
            input = r;
        } else if let Some(r) = input.strip_prefix("./") {
            input = r;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") {
            input = &input[3..];
            pop(&mut out);
        } else if input == "/.." {
            input = "/";
            pop(&mut out);
        } else if input == "." || input == ".." {
            input = "";
        } else {
            let from = usize::from(input.starts_with('/'));
            let end = input[from..].find('/').map_or(input.len(), |i| i + from);
            out.push_str(&input[..end]);
            input = &input[end..];
        }
    }
    (out, climbed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_percent_and_dot_segments_normalise() {
        for (raw, want) in [
            ("LEDGER://Secret/X", "ledger://secret/X"),
            ("ledger://secret/%78", "ledger://secret/x"),
            ("ledger://secret/%2f%7e", "ledger://secret/%2F~"),
            ("ledger://secret/./a/b/../x", "ledger://secret/a/x"),
            ("ledger://secret/a/%2E%2E/x", "ledger://secret/x"),
            (
                "ledger://Us%65r@HOST:80/p?Q=%41#F%41",
                "ledger://User@host:80/p?Q=A#FA",
            ),
            ("ledger://h/100%", "ledger://h/100%25"),
            ("x:/a/..//b", "x:/.//b"),
            ("%6Cedger://secret/x", "ledger://secret/x"),
            ("ledger://accounts/{id}", "ledger://accounts/{id}"),
        ] {
            let n = normalise_uri(raw);
            assert_eq!((n.text.as_str(), n.ambiguous), (want, false), "{raw}");
            assert_eq!(
                normalise_uri(want).text,
                want,
                "{want} is not a fixed point"
            );
        }
    }

    #[test]
    fn dot_segments_that_readers_resolve_differently_are_ambiguous() {
        for raw in [
            "ledger://public/../secret/x",
            "ledger://public/%2e%2E/secret/x",
            "ledger://a/b/../../../x",
            "x:/..",
            "urn:a/../b",
            "urn:./b",
            "no/scheme/../x",
        ] {
            assert!(normalise_uri(raw).ambiguous, "{raw}");
        }
        assert!(!normalise_uri("ledger://a/b/../x").ambiguous);
        assert!(!normalise_uri("ledger://a/x?q=../..").ambiguous);
    }

    #[test]
    fn prefixes_that_differ_by_case_or_dash_share_a_uri_prefix() {
        assert_eq!(uri_prefix("team_a"), uri_prefix("team-a"));
        assert_eq!(uri_prefix("Team"), uri_prefix("team"));
        assert_eq!(uri_prefix("1a"), uri_prefix("s1a"));
        assert_eq!(uri_prefix(""), "");
    }
}
