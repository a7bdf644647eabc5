//! Secret masking (`[guard] mask_results`): detectors for common credential formats, then the
//! configured ones, run over what a server returns before the client (and so the model) sees it.
//! Each match becomes `[masked:<kind>]`; each kind is counted for the audit record and metrics.
//!
//! Detectors are plain regexes (linear time in the text, whatever it holds), each tried on its own:
//! every built-in one starts with or contains a literal (`AKIA`, `eyJ`, `://`, …) that the regex
//! engine looks for first, so text without secrets costs a few fast scans and no allocation.
//! A detector masks its first capture group when it has one, so context it needs to be sure
//! (`aws_secret_access_key=`, `scheme://user:`) stays readable.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use crate::config::GuardConfig;

/// Matches masked, by kind.
pub type Counts = BTreeMap<String, u64>;

/// Prefix of what a match is replaced by; a match that already starts with it is left alone, so
/// a later detector does not re-mask (and re-count) what an earlier one replaced.
const MARK: &str = "[masked:";

/// One detector: its `kind` labels the replacement, the audit count and the metric.
#[derive(Debug, Clone)]
struct Detector {
    kind: String,
    regex: Regex,
}

/// The built-in detectors, most specific first: a token inside a URL's password is masked as
/// what it is before the connection-string detector sees the URL.
const BUILT_IN: [(&str, &str); 10] = [
    // A PEM private key block through its END line; a truncated one (no END) through the end of
    // its base64. The body is what PEM holds (base64, line breaks, literal `\n`, `Proc-Type:`-style
    // headers) and never `--`: a scan for the END stops at the next `-----`, so many BEGINs
    // without an END cost one pass, not one pass each.
    (
        "private_key",
        r"(-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY-----(?:[A-Za-z0-9+/=\s\\:,]|-[A-Za-z0-9])*(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY-----)?)",
    ),
    (
        "aws_access_key",
        r"(?-u:\b)((?:AKIA|ASIA)[A-Z0-9]{16})(?-u:\b)",
    ),
    // 40 characters are too common to mask unlabelled: only under a name that says what it is
    // (`aws_secret_access_key=…`, `"SecretAccessKey": "…"`, also inside escaped JSON text).
    (
        "aws_secret_key",
        r#"(?i:(?:aws_?)?secret_?access_?key)(?:\\?["'])?\s*[:=]\s*(?:\\?["'])?([A-Za-z0-9/+]{40})(?:[^A-Za-z0-9/+=]|$)"#,
    ),
    (
        "google_api_key",
        r"(?-u:\b)(AIza[0-9A-Za-z_\-]{35})(?:[^0-9A-Za-z_\-]|$)",
    ),
    (
        "github_token",
        r"(?-u:\b)((?:gh[pousr]_[A-Za-z0-9]{36,255})|(?:github_pat_[A-Za-z0-9_]{22,255}))(?-u:\b)",
    ),
    (
        "slack_token",
        r"(?-u:\b)(xox[abposr]-[0-9A-Za-z]{1,40}-[0-9A-Za-z\-]{8,250})",
    ),
    (
        "slack_webhook",
        r"(https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/\-]{8,300})",
    ),
    (
        "stripe_key",
        r"(?-u:\b)((?:sk|rk)_live_[0-9A-Za-z]{10,255})(?-u:\b)",
    ),
    // Header and payload are base64url JSON objects (`{"` encodes as `eyJ`); the signature may be
    // empty (`alg: none`).
    (
        "jwt",
        r"(?-u:\b)(eyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*)",
    ),
    // `scheme://user:PASSWORD@host`: only the password. The user part stops at `/`, so
    // `https://host/path@x` and `https://host:8080/x@y` are not taken for credentials.
    (
        "connection_string",
        r#"(?-u:\b)[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s/?#@:"'<>]{0,256}:([^\s/?#@"'<>]{1,256})@[^\s/?#@"'<>]"#,
    ),
];

static BUILT_IN_DETECTORS: LazyLock<Vec<Detector>> = LazyLock::new(|| {
    BUILT_IN
        .iter()
        .map(|(kind, re)| Detector {
            kind: (*kind).to_string(),
            // Constants, compiled by the unit tests: a typo fails `cargo test`, not a broker.
            regex: Regex::new(re).expect("built-in mask pattern compiles"),
        })
        .collect()
});

/// The detectors of one configuration (rebuilt with it on reload).
#[derive(Debug, Clone)]
pub struct Masker {
    detectors: Vec<Detector>,
}

impl Masker {
    /// The masker `[guard]` asks for: `None` unless `mask_results = true`, so a broker that does
    /// not mask checks one `Option` per result and does nothing else.
    pub fn from_config(guard: &GuardConfig) -> Option<Self> {
        guard.mask_results.then(|| {
            let configured = guard.mask_patterns.iter().map(|p| Detector {
                kind: p.kind.clone(),
                regex: p.regex.clone(),
            });
            Self {
                detectors: BUILT_IN_DETECTORS
                    .iter()
                    .cloned()
                    .chain(configured)
                    .collect(),
            }
        })
    }

    /// `s` with every detected secret replaced, and what was replaced; `None` when nothing was
    /// (nothing is allocated then).
    pub fn mask_text(&self, s: &str) -> Option<(String, Counts)> {
        let mut out: Option<String> = None;
        let mut counts = Counts::new();
        for d in &self.detectors {
            let cur = out.as_deref().unwrap_or(s);
            if let Some(t) = d.apply(cur, &mut counts) {
                out = Some(t);
            }
        }
        out.map(|t| (t, counts))
    }

    /// Mask every string value in `v` (object keys are left alone), so structured content keeps
    /// its shape and stays valid JSON; what was masked, by kind.
    pub fn mask_json(&self, v: &mut Value) -> Counts {
        let mut counts = Counts::new();
        // A stack rather than recursion: how deep a result nests is the upstream's choice.
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) => {
                    if let Some((t, c)) = self.mask_text(s) {
                        *s = t;
                        merge(&mut counts, c);
                    }
                }
                Value::Array(a) => stack.extend(a.iter_mut()),
                Value::Object(o) => stack.extend(o.values_mut()),
                _ => {}
            }
        }
        counts
    }
}

impl Detector {
    /// `s` with this detector's matches replaced (`None` when none was).
    fn apply(&self, s: &str, counts: &mut Counts) -> Option<String> {
        let mut out = String::new();
        let mut last = 0;
        let mut n = 0u64;
        for c in self.regex.captures_iter(s) {
            let Some(m) = c.get(1).or_else(|| c.get(0)) else {
                continue;
            };
            if m.as_str().starts_with(MARK) {
                continue;
            }
            if n == 0 {
                out.reserve(s.len());
            }
            out.push_str(&s[last..m.start()]);
            out.push_str(MARK);
            out.push_str(&self.kind);
            out.push(']');
            last = m.end();
            n += 1;
        }
        if n == 0 {
            return None;
        }
        out.push_str(&s[last..]);
        *counts.entry(self.kind.clone()).or_default() += n;
        Some(out)
    }
}

/// Add `more` to `counts`.
pub fn merge(counts: &mut Counts, more: Counts) {
    for (k, n) in more {
        *counts.entry(k).or_default() += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MaskPattern;

    fn masker() -> Masker {
        Masker::from_config(&GuardConfig {
            mask_results: true,
            mask_patterns: vec![MaskPattern {
                kind: "ticket".into(),
                regex: Regex::new("TCK-[0-9]{6}").expect("compiles"),
            }],
            ..GuardConfig::default()
        })
        .expect("masking on")
    }

    /// `input` masked, with its counts.
    fn masked(input: &str) -> (String, Counts) {
        masker()
            .mask_text(input)
            .unwrap_or_else(|| panic!("nothing masked in {input:?}"))
    }

    fn assert_masks(kind: &str, secret: &str, before: &str, after: &str) {
        let input = format!("{before}{secret}{after}");
        let (out, counts) = masked(&input);
        assert_eq!(out, format!("{before}[masked:{kind}]{after}"), "{input}");
        assert_eq!(counts.get(kind), Some(&1), "{counts:?}");
        assert_eq!(counts.len(), 1, "{counts:?}");
    }

    fn assert_untouched(input: &str) {
        assert_eq!(masker().mask_text(input), None, "{input}");
    }

    #[test]
    fn built_in_patterns_compile() {
        assert_eq!(BUILT_IN_DETECTORS.len(), BUILT_IN.len());
    }

    #[test]
    fn off_unless_asked() {
        assert!(Masker::from_config(&GuardConfig::default()).is_none());
    }

    #[test]
    fn aws_access_keys() {
        assert_masks("aws_access_key", "AKIAIOSFODNN7EXAMPLE", "key=", "\n");
        assert_masks("aws_access_key", "ASIAY34FZKBOKMUTVV7A", "\"", "\"");
        // Too short, lower case, or part of a longer word.
        assert_untouched("AKIAIOSFODNN7EXAMP");
        assert_untouched("akiaiosfodnn7example");
        assert_untouched("XAKIAIOSFODNN7EXAMPLE");
        assert_untouched("AKIAIOSFODNN7EXAMPLEX");
    }

    #[test]
    fn aws_secret_keys_where_labelled() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        assert_masks("aws_secret_key", secret, "aws_secret_access_key=", "\n");
        assert_masks("aws_secret_key", secret, "AWS_SECRET_ACCESS_KEY: ", "");
        assert_masks(
            "aws_secret_key",
            secret,
            r#"{"SecretAccessKey": ""#,
            r#""}"#,
        );
        assert_masks(
            "aws_secret_key",
            secret,
            r#"{\"AWS_SECRET_ACCESS_KEY\":\""#,
            r#"\"}"#,
        );
        // Unlabelled 40-character strings (a SHA-1, base64) are not secrets to this detector.
        assert_untouched(&format!("value={secret}"));
        assert_untouched("aws_secret_access_key=tooshort");
        assert_untouched(&format!("aws_secret_access_key={secret}AB"));
    }

    #[test]
    fn google_api_keys() {
        assert_masks(
            "google_api_key",
            "AIzaSyA-1234567890abcdefghijklmnopqrstu",
            "?key=",
            "&x=1",
        );
        assert_untouched("AIzaSyA-1234567890abcdefghijklmnopqrs");
    }

    #[test]
    fn github_tokens() {
        for prefix in ["ghp", "gho", "ghu", "ghs", "ghr"] {
            let t = format!("{prefix}_16C7e42F292c6912E7710c838347Ae178B4a");
            assert_masks("github_token", &t, "token ", " end");
        }
        let pat = "github_pat_11ABCDEFG0123456789abc_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVW";
        assert_masks("github_token", pat, "GH=", "");
        assert_untouched("ghp_short");
        assert_untouched("ghx_16C7e42F292c6912E7710c838347Ae178B4a");
    }

    #[test]
    fn slack_tokens_and_webhooks() {
        assert_masks(
            "slack_token",
            "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "SLACK=",
            "\n",
        );
        assert_masks(
            "slack_webhook",
            "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
            "post to ",
            " now",
        );
        assert_untouched("xoxb-");
        assert_untouched("see https://hooks.slack.com/ for details");
    }

    #[test]
    fn stripe_live_keys() {
        assert_masks("stripe_key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "k=", "");
        assert_untouched("sk_test_4eC39HqLyjWDarjtT1zdp7dc");
    }

    #[test]
    fn jwts() {
        let jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert_masks("jwt", jwt, "Authorization: Bearer ", "\n");
        // Base64 of ordinary text, and a lone base64url segment.
        assert_untouched("SGVsbG8sIHdvcmxkISBUaGlzIGlzIG5vdCBhIHRva2VuLg==");
        assert_untouched("eyJhbGciOiJIUzI1NiJ9 is a header alone");
    }

    #[test]
    fn private_keys() {
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----";
        assert_masks("private_key", pem, "key:\n", "\nafter");
        let encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\nMIIE\n-----END RSA PRIVATE KEY-----";
        assert_masks("private_key", encrypted, "", ".");
        let pkcs8 = "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBg\\n-----END PRIVATE KEY-----";
        assert_masks("private_key", pkcs8, "\"", "\"");
        // Truncated output: masked through its base64.
        let (out, _) = masked("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\nIBBQ");
        assert_eq!(out, "[masked:private_key]");
        assert_untouched("-----BEGIN PUBLIC KEY-----\nMIIBIjANBg\n-----END PUBLIC KEY-----");
        assert_untouched("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----");
    }

    #[test]
    fn connection_strings_keep_all_but_the_password() {
        assert_masks(
            "connection_string",
            "s3cr3t!",
            "postgres://app:",
            "@db.internal:5432/ledger?sslmode=require",
        );
        assert_masks("connection_string", "hunter2", "redis://:", "@cache:6379/0");
        assert_masks(
            "connection_string",
            "p%40ss",
            "DATABASE_URL=\"mysql+pymysql://root:",
            "@127.0.0.1/db\"",
        );
        assert_untouched("https://example.com/path@foo");
        assert_untouched("https://example.com:8443/path@foo");
        assert_untouched("mail alice@example.com or bob.smith+tag@mail.example.org");
        assert_untouched("mailto:alice@example.com");
        assert_untouched("https://example.com/?next=a:b@c");
    }

    #[test]
    fn configured_patterns() {
        assert_masks("ticket", "TCK-123456", "see ", ".");
        // The README's worked example.
        let (out, counts) = masked(
            "DATABASE_URL=postgres://app:hunter22@db:5432/ledger key=AKIAIOSFODNN7EXAMPLE ref TCK-482910",
        );
        assert_eq!(
            out,
            "DATABASE_URL=postgres://app:[masked:connection_string]@db:5432/ledger key=[masked:aws_access_key] ref [masked:ticket]"
        );
        assert_eq!(counts.values().sum::<u64>(), 3, "{counts:?}");
        let m = Masker::from_config(&GuardConfig {
            mask_results: true,
            mask_patterns: vec![MaskPattern {
                kind: "pin".into(),
                regex: Regex::new("pin=([0-9]{4})").expect("compiles"),
            }],
            ..GuardConfig::default()
        })
        .expect("on");
        let (out, counts) = m.mask_text("card pin=1234 ok").expect("masked");
        assert_eq!(out, "card pin=[masked:pin] ok", "only the group");
        assert_eq!(counts.get("pin"), Some(&1));
    }

    #[test]
    fn ordinary_text_is_left_alone() {
        for s in [
            "The quick brown fox jumps over the lazy dog. Nothing to see here: a=b, c:d.",
            "550e8400-e29b-41d4-a716-446655440000",
            "commit 4b2bcb0f002fd11dde0944affc69016c1b38cd28",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/home/user",
            "",
            "ünïcödé text with AKIA in it, and eyJ alone",
        ] {
            assert_untouched(s);
        }
    }

    #[test]
    fn several_secrets_counted_by_kind_and_not_masked_twice() {
        let input = "a AKIAIOSFODNN7EXAMPLE b AKIAI44QH8DHBEXAMPLE c https://u:ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/x";
        let (out, counts) = masked(input);
        assert_eq!(
            out,
            "a [masked:aws_access_key] b [masked:aws_access_key] c https://u:[masked:github_token]@github.com/x"
        );
        assert_eq!(counts.get("aws_access_key"), Some(&2));
        assert_eq!(counts.get("github_token"), Some(&1));
        assert_eq!(counts.get("connection_string"), None, "{counts:?}");
    }

    #[test]
    fn json_masked_field_by_field() {
        let mut v = serde_json::json!({
            "AKIAIOSFODNN7EXAMPLE": "keys are left alone",
            "accounts": [
                {"id": 1, "key": "AKIAIOSFODNN7EXAMPLE", "ok": true},
                {"id": 2, "nested": [["TCK-000042", null, 3.5]], "db": "postgres://a:b@h/d"}
            ],
            "note": "plain"
        });
        let counts = masker().mask_json(&mut v);
        assert_eq!(
            v,
            serde_json::json!({
                "AKIAIOSFODNN7EXAMPLE": "keys are left alone",
                "accounts": [
                    {"id": 1, "key": "[masked:aws_access_key]", "ok": true},
                    {"id": 2, "nested": [["[masked:ticket]", null, 3.5]], "db": "postgres://a:[masked:connection_string]@h/d"}
                ],
                "note": "plain"
            })
        );
        let want: Counts = [
            ("aws_access_key".to_string(), 1),
            ("connection_string".to_string(), 1),
            ("ticket".to_string(), 1),
        ]
        .into();
        assert_eq!(counts, want);
    }

    #[test]
    fn large_text_stays_linear() {
        // Many openings with no end, and many `scheme://` with no `@`: no quadratic rescans.
        let mut s = String::new();
        for _ in 0..20_000 {
            s.push_str("-----BEGIN PRIVATE KEY----- x https://a:b eyJabcdef.eyJabcde ");
            s.push_str("aws_secret_access_key= ghp_ AIza sk_live_ xoxb-1- TCK-1 ");
        }
        let t = std::time::Instant::now();
        let _ = masker().mask_text(&s);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }
}
