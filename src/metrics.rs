//! Prometheus metrics: process-wide counters and histograms, rendered in the text exposition format
//! (version 0.0.4) at `/metrics`.
//!
//! Call counters and latency histograms are derived from audit records: `audit` hands each record's
//! labels and timings over as a [`Finished`] ([`Metrics::audit_record`]), so `/metrics` and the audit
//! trail always agree, and this module needs nothing from `audit` (data flows one way, audit → metrics). Gauges that describe live state (upstreams up,
//! sessions, child processes) are read from the broker at scrape time. Labels never carry a
//! subject, a secret or a name a client made up: only configured server names, catalog tool and
//! prompt names (anything else is `unknown`) and fixed values, so the number of series is bounded
//! by the config and the catalog.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write;
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

/// What one finished request (one audit record) contributes to the metrics, as plain values.
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished<'a> {
    /// `tool`, `prompt`, `resource`, `completion` or `list`.
    pub kind: &'a str,
    pub server: Option<&'a str>,
    /// The exposed name, or for lists what was listed.
    pub name: &'a str,
    /// `name` is a catalog entry. A tool or prompt name labels its series only then; any other
    /// labels as `unknown`, so made-up names cannot grow the series count beyond the catalog's.
    pub listed: bool,
    /// The audit outcome (`ok`, `denied`, …).
    pub outcome: &'a str,
    pub latency_ms: f64,
    pub upstream_ms: Option<f64>,
    /// The approval step this record notes (`requested`, `approved`, `denied`, `grant_used`, …;
    /// policy `effect = "approve"`), if any.
    pub approval: Option<&'a str>,
}

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

struct Counter {
    labels: Vec<(&'static str, String)>,
    value: AtomicU64,
}

struct Histogram {
    labels: Vec<(&'static str, String)>,
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Microseconds.
    sum_us: AtomicU64,
}

/// One counter family: label values → count. Keyed by a hash of the label values so that the hot
/// path does not allocate once a series exists.
#[derive(Default)]
struct Family(DashMap<u64, Counter>);

impl Family {
    fn inc(&self, labels: &[(&'static str, &str)], by: u64) {
        let key = key_of(labels);
        if let Some(c) = self.0.get(&key) {
            c.value.fetch_add(by, Ordering::Relaxed);
            return;
        }
        self.0
            .entry(key)
            .or_insert_with(|| Counter {
                labels: owned(labels),
                value: AtomicU64::new(0),
            })
            .value
            .fetch_add(by, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        let mut rows: Vec<(String, u64)> = self
            .0
            .iter()
            .map(|e| (label_text(&e.labels, None), e.value.load(Ordering::Relaxed)))
            .collect();
        rows.sort();
        for (l, v) in rows {
            let _ = writeln!(out, "{name}{l} {v}");
        }
    }
}

#[derive(Default)]
struct HistogramFamily(DashMap<u64, Histogram>);

impl HistogramFamily {
    fn observe(&self, labels: &[(&'static str, &str)], seconds: f64) {
        let key = key_of(labels);
        let record = |h: &Histogram| {
            for (i, b) in BUCKETS.iter().enumerate() {
                if seconds <= *b {
                    h.buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            h.sum_us
                .fetch_add((seconds * 1e6).max(0.0) as u64, Ordering::Relaxed);
        };
        if let Some(h) = self.0.get(&key) {
            record(&h);
            return;
        }
        let h = self.0.entry(key).or_insert_with(|| Histogram {
            labels: owned(labels),
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        });
        record(&h);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut series: Vec<(String, String)> = Vec::new();
        for h in self.0.iter() {
            let mut s = String::new();
            for (i, b) in BUCKETS.iter().enumerate() {
                let le = format!("{b}");
                let _ = writeln!(
                    s,
                    "{name}_bucket{} {}",
                    label_text(&h.labels, Some(&le)),
                    h.buckets[i].load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                s,
                "{name}_bucket{} {count}",
                label_text(&h.labels, Some("+Inf"))
            );
            let plain = label_text(&h.labels, None);
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(s, "{name}_sum{plain} {sum}");
            let _ = writeln!(s, "{name}_count{plain} {count}");
            series.push((plain, s));
        }
        series.sort();
        for (_, s) in series {
            out.push_str(&s);
        }
    }
}

fn key_of(labels: &[(&'static str, &str)]) -> u64 {
    let mut h = DefaultHasher::new();
    for (k, v) in labels {
        k.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

fn owned(labels: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// `{a="x",b="y"}` (with `le` last for buckets), values escaped per the exposition format.
fn label_text(labels: &[(&'static str, String)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `name` label of a tool or prompt the catalog does not list.
pub const UNKNOWN: &str = "unknown";

/// The process-wide registry.
#[derive(Default)]
pub struct Metrics {
    requests: Family,
    duration: HistogramFamily,
    upstream_duration: HistogramFamily,
    policy_denies: Family,
    rate_limited: Family,
    credential_cache: Family,
    upstream_oauth: Family,
    masked: Family,
    approvals: Family,
    reloads: Family,
    pin_drifts: Family,
    description_findings: Family,
    audit_records: AtomicU64,
    audit_dropped: AtomicU64,
    limit_fallbacks: AtomicU64,
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::default);

pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    /// Count a finished request from its audit record.
    pub fn audit_record(&self, r: &Finished<'_>) {
        self.audit_records.fetch_add(1, Ordering::Relaxed);
        let server = r.server.unwrap_or("");
        // Names a client made up (unknown tools, even those an unprefixed server is asked about)
        // or unbounded ones (resource URIs) would let a caller create series without limit: only
        // catalog tool/prompt names and list kinds label.
        let name = match r.kind {
            "tool" | "prompt" if r.listed && r.server.is_some() => r.name,
            "tool" | "prompt" => UNKNOWN,
            "list" => r.name,
            _ => "",
        };
        self.requests.inc(
            &[
                ("kind", r.kind),
                ("server", server),
                ("name", name),
                ("outcome", r.outcome),
            ],
            1,
        );
        self.duration
            .observe(&[("kind", r.kind), ("server", server)], r.latency_ms / 1e3);
        if let Some(up) = r.upstream_ms {
            self.upstream_duration
                .observe(&[("server", server)], up / 1e3);
        }
        if r.outcome == "denied" {
            self.policy_denies
                .inc(&[("kind", r.kind), ("server", server)], 1);
        }
        if let Some(state) = r.approval {
            self.approvals
                .inc(&[("server", server), ("state", state)], 1);
        }
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// A call refused by a limit: `scope` is `caller`, `server`, `tool` or `concurrency`.
    pub fn rate_limited(&self, scope: &'static str, server: &str) {
        self.rate_limited
            .inc(&[("scope", scope), ("server", server)], 1);
    }

    /// A limit checked by this instance alone although `[cluster]` is set (Redis unreachable).
    pub fn limit_fallback(&self) {
        self.limit_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// A credential lookup: `store` is `token_exchange` or `vault`.
    pub fn credential_cache(&self, store: &'static str, hit: bool) {
        self.credential_cache.inc(
            &[
                ("store", store),
                ("result", if hit { "hit" } else { "miss" }),
            ],
            1,
        );
    }

    /// An upstream OAuth token asked for: `result` is `cached`, `fetched`, `consent_required` or
    /// `error`; `kind` is `oauth`, `id_jag` or `client_credentials`.
    pub fn upstream_oauth(&self, server: &str, kind: &'static str, result: &'static str) {
        self.upstream_oauth
            .inc(&[("server", server), ("kind", kind), ("result", result)], 1);
    }

    /// `[guard] pins`: a tool found to differ from its pin (`drift`: changed, new), once per definition.
    pub fn pin_drift(&self, server: &str, drift: &'static str) {
        self.pin_drifts
            .inc(&[("server", server), ("drift", drift)], 1);
    }

    /// `[guard] scan_descriptions`: a finding in a tool definition, once per definition.
    pub fn description_finding(&self, server: &str, kind: &'static str) {
        self.description_findings
            .inc(&[("server", server), ("kind", kind)], 1);
    }

    /// Secrets masked in results (`[guard] mask_results`): `kind` is a built-in or configured
    /// detector's, so the series are bounded by the config.
    pub fn masked(&self, server: &str, kind: &str, n: u64) {
        self.masked.inc(&[("server", server), ("kind", kind)], n);
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .inc(&[("result", if ok { "ok" } else { "error" })], 1);
    }

    /// The exposition text: these counters, then `gauges` (already formatted by the caller).
    pub fn render(&self, gauges: &str) -> String {
        let mut out = String::with_capacity(4096);
        self.requests.render(
            &mut out,
            "mcp_broker_requests_total",
            "Requests by kind (tool, prompt, resource, completion, list), server, exposed name and outcome.",
        );
        self.duration.render(
            &mut out,
            "mcp_broker_request_duration_seconds",
            "Total request latency at the broker, by kind and server.",
        );
        self.upstream_duration.render(
            &mut out,
            "mcp_broker_upstream_duration_seconds",
            "Time waiting for the upstream, by server.",
        );
        self.policy_denies.render(
            &mut out,
            "mcp_broker_policy_denies_total",
            "Requests refused by policy, by kind and server.",
        );
        self.rate_limited.render(
            &mut out,
            "mcp_broker_rate_limited_total",
            "Calls refused by a limit, by scope (caller, server, tool, concurrency) and server.",
        );
        self.credential_cache.render(
            &mut out,
            "mcp_broker_credential_cache_total",
            "Outbound credential lookups by store (token_exchange, vault) and result (hit, miss).",
        );
        self.upstream_oauth.render(
            &mut out,
            "mcp_broker_upstream_oauth_tokens_total",
            "Upstream OAuth tokens asked for, by server, kind (oauth, id_jag, client_credentials) and result (cached, fetched, consent_required, error).",
        );
        self.masked.render(
            &mut out,
            "mcp_broker_masked_total",
            "Secrets masked in results ([guard] mask_results), by server and detector kind.",
        );
        self.approvals.render(
            &mut out,
            "mcp_broker_approvals_total",
            "Approval steps (policy effect = \"approve\"), by server and state (requested, approved, denied, timeout, grant_used, expired, cancelled, refused).",
        );
        self.reloads.render(
            &mut out,
            "mcp_broker_config_reloads_total",
            "Configuration reloads by result (ok, error).",
        );
        self.pin_drifts.render(
            &mut out,
            "mcp_broker_pin_drifts_total",
            "Tool definitions found to differ from their pin ([guard] pins), by server and drift (changed, new).",
        );
        self.description_findings.render(
            &mut out,
            "mcp_broker_description_findings_total",
            "Findings in tool descriptions ([guard] scan_descriptions), by server and kind (hidden_unicode, bidi, instruction, tag, base64).",
        );
        let _ = writeln!(
            out,
            "# HELP mcp_broker_audit_records_total Audit records produced.\n# TYPE mcp_broker_audit_records_total counter\nmcp_broker_audit_records_total {}",
            self.audit_records.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_broker_audit_dropped_total Audit records lost because the queue was full or the sink failed.\n# TYPE mcp_broker_audit_dropped_total counter\nmcp_broker_audit_dropped_total {}",
            self.audit_dropped.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mcp_broker_cluster_limit_fallbacks_total Limit and cap checks made by this instance alone because Redis was unreachable.\n# TYPE mcp_broker_cluster_limit_fallbacks_total counter\nmcp_broker_cluster_limit_fallbacks_total {}",
            self.limit_fallbacks.load(Ordering::Relaxed)
        );
        out.push_str(gauges);
        out
    }
}

/// A gauge family with one sample per label set, for the broker's scrape-time gauges.
pub fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    samples: &[(Vec<(&'static str, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{} {v}", label_text(labels, None));
    }
}

/// A counter family read at scrape time (e.g. an upstream's reconnects).
pub fn counter(
    out: &mut String,
    name: &str,
    help: &str,
    samples: &[(Vec<(&'static str, String)>, f64)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{} {v}", label_text(labels, None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        let r = Finished {
            kind: "tool",
            server: Some("ledger"),
            name: "ledger__x\"y",
            listed: true,
            outcome: "ok",
            latency_ms: 3.0,
            upstream_ms: Some(2.0),
            approval: None,
        };
        m.audit_record(&r);
        m.audit_record(&r);
        m.audit_record(&Finished {
            kind: "approval",
            server: Some("ledger"),
            outcome: "ok",
            approval: Some("approved"),
            ..Finished::default()
        });
        let text = m.render("");
        assert!(
            text.contains("mcp_broker_approvals_total{server=\"ledger\",state=\"approved\"} 1")
        );
        assert!(
            !text.contains("mcp_broker_approvals_total{server=\"ledger\",state=\"requested\"}")
        );
        assert!(text.contains(
            "mcp_broker_requests_total{kind=\"tool\",server=\"ledger\",name=\"ledger__x\\\"y\",outcome=\"ok\"} 2"
        ));
        assert!(text.contains(
            "mcp_broker_request_duration_seconds_bucket{kind=\"tool\",server=\"ledger\",le=\"0.0025\"} 0"
        ));
        assert!(text.contains(
            "mcp_broker_request_duration_seconds_bucket{kind=\"tool\",server=\"ledger\",le=\"0.005\"} 2"
        ));
        assert!(text.contains(
            "mcp_broker_request_duration_seconds_count{kind=\"tool\",server=\"ledger\"} 2"
        ));
    }

    #[test]
    fn made_up_names_do_not_become_labels() {
        let m = Metrics::default();
        for i in 0..300 {
            let name = format!("made-up-{i}");
            // an unprefixed server is asked about a name it does not list: routed, but not listed
            m.audit_record(&Finished {
                kind: "tool",
                server: Some("ledger"),
                name: &name,
                listed: false,
                outcome: "error",
                ..Finished::default()
            });
            // and an unknown prompt no server offers
            m.audit_record(&Finished {
                kind: "prompt",
                name: &name,
                outcome: "error",
                ..Finished::default()
            });
        }
        let text = m.render("");
        assert!(!text.contains("made-up"), "a made-up name became a label");
        assert!(text.contains(
            "mcp_broker_requests_total{kind=\"tool\",server=\"ledger\",name=\"unknown\",outcome=\"error\"} 300"
        ));
        assert!(text.contains(
            "mcp_broker_requests_total{kind=\"prompt\",server=\"\",name=\"unknown\",outcome=\"error\"} 300"
        ));
        assert_eq!(
            m.requests.0.len(),
            2,
            "one series per (kind, server, outcome)"
        );
    }

    #[test]
    fn catalog_names_and_list_kinds_label() {
        let m = Metrics::default();
        m.audit_record(&Finished {
            kind: "list",
            name: "tools",
            outcome: "ok",
            ..Finished::default()
        });
        m.audit_record(&Finished {
            kind: "resource",
            server: Some("ledger"),
            name: "ledger+ledger://accounts/ACC-1",
            listed: true,
            outcome: "ok",
            ..Finished::default()
        });
        let text = m.render("");
        assert!(text.contains("name=\"tools\""));
        // resource URIs are unbounded (templates): never a label
        assert!(text.contains("kind=\"resource\",server=\"ledger\",name=\"\""));
        assert!(!text.contains("ACC-1"));
    }
}
