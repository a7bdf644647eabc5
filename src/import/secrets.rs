//! Whether a name or a value is a secret: by the name (`API_KEY`, `Authorization`) or by the value's
//! shape (`Bearer …`, known token prefixes, a URL with a password, a long random string).

/// A name (env var, header, flag, query parameter) that says its value is a secret.
pub(super) fn secret_name(name: &str) -> bool {
    let up = name.to_ascii_uppercase();
    const WORDS: &[&str] = &[
        "KEY",
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "AUTH",
        "CREDENTIAL",
        "COOKIE",
    ];
    WORDS.iter().any(|w| up.contains(w))
        // `PAT` only as a word of its own: `PATH` is not a secret.
        || up.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w == "PAT")
}

/// A value whose shape says it is a secret, whatever its name.
pub(super) fn secret_value(value: &str) -> bool {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    if ["bearer ", "basic ", "token "]
        .iter()
        .any(|p| lower.starts_with(p))
    {
        return true;
    }
    const PREFIXES: &[&str] = &[
        "ghp_",
        "gho_",
        "ghu_",
        "ghs_",
        "ghr_",
        "github_pat_",
        "glpat-",
        "sk-",
        "sk_",
        "rk_live_",
        "pk_live_",
        "xox",
        "xapp-",
        "AKIA",
        "ASIA",
        "AIza",
        "eyJ",
        "npm_",
        "hf_",
        "ya29.",
        "-----BEGIN",
    ];
    if PREFIXES.iter().any(|p| v.starts_with(p)) && v.len() >= 8 {
        return true;
    }
    if url_has_password(v) {
        return true;
    }
    high_entropy(v)
}

/// `scheme://user:password@host…`
pub(super) fn url_has_password(v: &str) -> bool {
    let Some((_, rest)) = v.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// Long, no spaces, not a path or URL, letters and digits mixed, and varied: an API key's shape.
fn high_entropy(v: &str) -> bool {
    if v.len() < 24
        || v.contains(char::is_whitespace)
        || v.starts_with(['/', '.', '~', '@', '-'])
        || v.contains("://")
        || !v.chars().any(|c| c.is_ascii_digit())
        || !v.chars().any(|c| c.is_ascii_alphabetic())
    {
        return false;
    }
    let mut counts = std::collections::HashMap::new();
    for c in v.chars() {
        *counts.entry(c).or_insert(0usize) += 1;
    }
    let n = v.chars().count() as f64;
    let entropy: f64 = counts
        .values()
        .map(|&k| {
            let p = k as f64 / n;
            -p * p.log2()
        })
        .sum();
    entropy >= 3.5
}
