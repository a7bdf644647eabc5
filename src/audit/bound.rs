//! Bounds on what a caller can make the broker write: every caller-chosen string is clipped, and an
//! audit record never becomes a line above [`RECORD_CEILING`].
//!
//! Without them a caller with no rights at all could send a few calls with multi-megabyte names
//! (repeated in `reason` and `error`) and rotate everyone else's records out of the trail. A clipped
//! string keeps its head, says how long the whole was and ends with a short hash of the whole, so
//! two long names that share their first bytes still read as different.

use std::borrow::Cow;

use serde_json::Value;
use sha2::Digest;

use super::Record;

/// The cap on a name, URI, request id, subject, upstream name or argument string, in bytes.
pub const FIELD_CAP: usize = 256;
/// The cap on `reason` and `error`: sentences the broker or an upstream wrote, which may quote a
/// clipped name and still need room to say why.
pub const TEXT_CAP: usize = 1024;
/// The largest audit line written, newline included, in bytes.
pub const RECORD_CEILING: usize = 8192;
/// How far [`shrink`] clips a field before giving up on it (the head left is short but readable).
const SHRINK_FLOOR: usize = 64;
/// How many delegation actors a record keeps when it must shrink.
const ACT_KEPT: usize = 4;

/// `s` if it is at most [`FIELD_CAP`] bytes, else its clipped form.
pub fn clip(s: &str) -> Cow<'_, str> {
    clip_to(s, FIELD_CAP)
}

/// `s` if it is at most `cap` bytes, else its head (cut on a UTF-8 boundary) followed by
/// `…(LEN bytes, sha256:HASH)`, where `HASH` is the first 12 hex digits of the whole's SHA-256;
/// the result is at most `cap` bytes (unless `cap` is too small for the suffix alone). Clipping a
/// clipped string again at the same cap changes nothing.
pub fn clip_to(s: &str, cap: usize) -> Cow<'_, str> {
    if s.len() <= cap {
        return Cow::Borrowed(s);
    }
    let digest = sha2::Sha256::digest(s.as_bytes());
    let suffix = format!("…({} bytes, sha256:{})", s.len(), crate::hex(&digest[..6]));
    let mut head = cap.saturating_sub(suffix.len());
    while !s.is_char_boundary(head) {
        head -= 1;
    }
    let mut out = String::with_capacity(head + suffix.len());
    out.push_str(&s[..head]);
    out.push_str(&suffix);
    Cow::Owned(out)
}

/// Clip `s` in place.
pub(super) fn clip_in_place(s: &mut String, cap: usize) {
    if let Cow::Owned(c) = clip_to(s, cap) {
        *s = c;
    }
}

/// Every string in `v` (object keys included) clipped to [`FIELD_CAP`].
pub(super) fn clip_value(v: Value) -> Value {
    match v {
        Value::String(s) => Value::String(clip_owned(s)),
        Value::Array(a) => Value::Array(a.into_iter().map(clip_value).collect()),
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (clip_owned(k), clip_value(v)))
                .collect(),
        ),
        other => other,
    }
}

fn clip_owned(s: String) -> String {
    match clip(&s) {
        Cow::Borrowed(_) => s,
        Cow::Owned(c) => c,
    }
}

/// The record as one JSON line, newline included, of at most [`RECORD_CEILING`] bytes: while it is
/// longer, its largest field is shrunk (`arguments` become their hash; strings are clipped further;
/// a long delegation chain keeps its nearest actors).
pub(super) fn line_of(r: &mut Record) -> String {
    loop {
        let mut line = serde_json::to_string(&*r).unwrap_or_default();
        line.push('\n');
        if line.len() <= RECORD_CEILING {
            return line;
        }
        if !shrink(r) {
            // Unreachable with the caps above (every field is small once shrunk); kept so that the
            // ceiling holds whatever a future field adds.
            let stub = Record {
                ts: std::mem::take(&mut r.ts),
                kind: r.kind,
                decision: r.decision,
                outcome: r.outcome,
                authenticated: r.authenticated,
                sub: clip_to(&r.sub, SHRINK_FLOOR).into_owned(),
                reason: "the record exceeded the audit ceiling and was cut to these fields".into(),
                ..Record::default()
            };
            let mut line = serde_json::to_string(&stub).unwrap_or_default();
            line.push('\n');
            return line;
        }
    }
}

/// Make the largest variable part of `r` that can still shrink smaller. False when nothing can.
fn shrink(r: &mut Record) -> bool {
    let json_len = |s: &str| serde_json::to_string(s).map_or(s.len(), |j| j.len());
    if r.act.len() > ACT_KEPT + 1 {
        let more = r.act.len() - ACT_KEPT;
        r.act.truncate(ACT_KEPT);
        r.act.push(format!("…({more} more)"));
        return true;
    }
    let args = r
        .arguments
        .as_ref()
        .filter(|v| !v.is_string())
        .map_or(0, |v| v.to_string().len());
    let mut fields: Vec<&mut String> = vec![&mut r.name, &mut r.reason, &mut r.sub];
    fields.extend(r.client_id.as_mut());
    fields.extend(r.server.as_mut());
    fields.extend(r.upstream_name.as_mut());
    fields.extend(r.error.as_mut());
    fields.extend(r.rule.as_mut());
    fields.extend(r.act.iter_mut());
    if let Some(Value::String(id)) = r.request_id.as_mut() {
        fields.push(id);
    }
    let mut sized: Vec<(usize, &mut String)> =
        fields.into_iter().map(|s| (json_len(s), s)).collect();
    sized.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    if args > 0 && args >= sized.first().map_or(0, |(n, _)| *n) {
        let hash = r.arguments_hash.take().unwrap_or_else(|| {
            let v = r
                .arguments
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default();
            format!("sha256:{}", crate::hex(&sha2::Sha256::digest(v.as_bytes())))
        });
        r.arguments = Some(Value::String(hash));
        return true;
    }
    for (n, s) in sized {
        // Halve what the JSON takes (escapes count), never below the floor.
        let cap = (s.len() * (n / 2) / n.max(1)).max(SHRINK_FLOOR);
        let before = s.len();
        clip_in_place(s, cap);
        if s.len() < before {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;

    #[test]
    fn short_strings_are_borrowed() {
        assert!(matches!(clip("ledger__get_account"), Cow::Borrowed(_)));
        let exact = "a".repeat(FIELD_CAP);
        assert!(matches!(clip(&exact), Cow::Borrowed(_)));
    }

    #[test]
    fn long_strings_are_capped_with_length_and_hash() {
        let long = "x".repeat(4_000_000);
        let c = clip(&long);
        assert!(c.len() <= FIELD_CAP, "{} bytes", c.len());
        assert!(c.starts_with("xxxx"));
        assert!(c.contains("…(4000000 bytes, sha256:"), "{c}");
        let hex = crate::hex(&sha2::Sha256::digest(long.as_bytes()));
        assert!(c.ends_with(&format!("sha256:{})", &hex[..12])), "{c}");
        // clipping is idempotent at the same cap
        assert_eq!(clip(&c), c);
    }

    #[test]
    fn cut_falls_on_a_utf8_boundary() {
        // 3-byte and 4-byte characters, at every offset against the cap
        for pad in 0..4 {
            let s = format!("{}{}", "a".repeat(pad), "€😀".repeat(200));
            let c = clip(&s);
            assert!(c.len() <= FIELD_CAP);
            let head = c.split('…').next().unwrap();
            assert!(s.starts_with(head), "the head is a prefix of the whole");
            assert!(head.len() >= FIELD_CAP - 60, "head of {} bytes", head.len());
        }
    }

    #[test]
    fn distinct_long_names_stay_distinct() {
        let a = format!("{}a", "n".repeat(1000));
        let b = format!("{}b", "n".repeat(1000));
        assert_ne!(clip(&a), clip(&b));
        assert_eq!(clip(&a), clip(&a.clone()));
    }

    #[test]
    fn values_are_clipped_everywhere() {
        let long = "v".repeat(10_000);
        let v = serde_json::json!({ "k": long, "list": [long], long.clone(): 1, "n": 5 });
        let c = clip_value(v);
        let text = c.to_string();
        assert!(text.len() < 4 * FIELD_CAP + 100, "{} bytes", text.len());
        assert_eq!(c["n"], 5);
    }

    fn huge_record() -> Record {
        // Even fields already at their caps exceed the ceiling once JSON escapes them.
        let ctl = "\u{1}".repeat(FIELD_CAP);
        Record {
            ts: "2026-11-30T00:00:00.000Z".into(),
            request_id: Some(Value::String(ctl.clone())),
            sub: ctl.clone(),
            client_id: Some(ctl.clone()),
            act: vec![ctl.clone(); 40],
            kind: "tool",
            server: Some("ledger".into()),
            name: ctl.clone(),
            upstream_name: Some(ctl.clone()),
            decision: "deny",
            reason: "\u{1}".repeat(TEXT_CAP),
            error: Some("\u{1}".repeat(TEXT_CAP)),
            outcome: Outcome::Error,
            arguments: Some(
                serde_json::json!({ "a": "\u{1}".repeat(FIELD_CAP), "b": vec![ctl; 30] }),
            ),
            arguments_hash: Some("sha256:abc".into()),
            ..Record::default()
        }
    }

    #[test]
    fn a_record_never_exceeds_the_ceiling() {
        let mut r = huge_record();
        let before = serde_json::to_string(&r).unwrap().len();
        assert!(
            before > 4 * RECORD_CEILING,
            "the test record is large: {before}"
        );
        let line = line_of(&mut r);
        assert!(line.len() <= RECORD_CEILING, "{} bytes", line.len());
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        // the largest fields went first: the arguments became their hash, the chain was cut
        assert_eq!(v["arguments"], "sha256:abc");
        assert_eq!(v["act"].as_array().unwrap().len(), ACT_KEPT + 1);
        assert_eq!(v["outcome"], "error");
        assert_eq!(v["server"], "ledger");
    }

    #[test]
    fn a_record_within_the_ceiling_is_unchanged() {
        let mut r = Record {
            name: "ledger__get_account".into(),
            arguments: Some(serde_json::json!({ "account_id": "ACC-1" })),
            ..Record::default()
        };
        let before = serde_json::to_string(&r).unwrap() + "\n";
        assert_eq!(line_of(&mut r), before);
    }
}
