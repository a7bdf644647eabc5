//! The audit trail: one JSON record per decision and per call.
//!
//! A [`CallRecord`] is opened when a request arrives and written when it is dropped, so a call that
//! returns early, fails, times out or is cancelled (the client went away, or the broker drained) is
//! recorded like any other. Records go through a bounded queue to one writer task: a full queue
//! never blocks a call; the record is counted in `mcp_broker_audit_dropped_total` instead.
//!
//! Sinks: a JSONL file (each record is one `write` of one complete line, so a killed broker leaves no
//! torn record; rotated by size), stdout, and/or the log on stderr (`[audit] stderr = true`).
//! Nothing secret is recorded: credentials appear by kind only, and arguments as a hash unless
//! `arguments = "full"`, which masks secret-looking keys and values.
//!
//! Bounded (`bound`): every caller-chosen string in a record is clipped (names, URIs, request ids
//! and argument strings at [`FIELD_CAP`], `reason` and `error` at [`TEXT_CAP`]) and no line is longer
//! than [`RECORD_CEILING`], so a flood of huge names cannot rotate other callers' records away.

mod bound;

pub use bound::{FIELD_CAP, RECORD_CEILING, TEXT_CAP, clip, clip_to};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};
use sha2::Digest;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::config::{AuditArguments, AuditConfig};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How a request ended. Serialized as `ok`, `tool_error`, `error`, `timeout`, `cancelled`,
/// `denied`, `rate_limited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    ToolError,
    Error,
    Timeout,
    /// What a record says until the request ends: a guard dropped early was cancelled.
    #[default]
    Cancelled,
    Denied,
    RateLimited,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ToolError => "tool_error",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Denied => "denied",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// One audit record: the documented schema (README, "Audit records").
#[derive(Debug, Clone, Serialize, Default)]
pub struct Record {
    /// RFC 3339, UTC, milliseconds.
    pub ts: String,
    /// The downstream JSON-RPC id of the request.
    pub request_id: Option<Value>,
    /// The broker's id for the downstream session (absent for stateless requests).
    pub session: Option<u64>,
    pub sub: String,
    pub client_id: Option<String>,
    /// The delegation chain, nearest actor first (empty when none).
    pub act: Vec<String>,
    pub authenticated: bool,
    /// `tool`, `prompt`, `resource`, `completion` or `list`.
    pub kind: &'static str,
    /// The upstream server (absent for lists and for names no server offers).
    pub server: Option<String>,
    /// The name the client used (exposed, namespaced), or for lists what was listed (`tools`, …).
    pub name: String,
    /// The upstream's own name for it.
    pub upstream_name: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub reason: String,
    /// What decided: `rule N`, `rego`, `default`, `limit`, `catalog`.
    pub rule: Option<String>,
    /// The kind of credential sent upstream: `none`, `static`, `vault`, `token_exchange`.
    pub credential: Option<&'static str>,
    pub outcome: Outcome,
    /// Error text for `error`/`timeout`/`tool_error` outcomes (never secret material).
    pub error: Option<String>,
    pub latency_ms: f64,
    /// Time spent waiting for the upstream (absent when the call never went upstream).
    pub upstream_ms: Option<f64>,
    /// `sha256:<hex>` of the arguments, the masked arguments, or absent (`arguments = "none"`).
    pub arguments: Option<Value>,
    /// With `arguments = "full"`: their hash, which replaces them if the record would exceed the
    /// ceiling.
    #[serde(skip)]
    pub arguments_hash: Option<String>,
    /// A call under an `effect = "approve"` rule (and `approval` records): what happened to the
    /// approval and who decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalNote>,
    /// For lists: how many items the caller was shown and how many the policy hid.
    pub shown: Option<usize>,
    pub hidden: Option<usize>,
    /// `[guard] mask_results`: secrets masked in the result, by kind (absent when none was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked: Option<crate::guard::mask::Counts>,
    /// `name` is an entry of the catalog (set by the broker once it resolved it): only then may it
    /// label metrics, so made-up names cannot create series.
    #[serde(skip)]
    pub listed: bool,
}

/// The approval step of a call: `state` is `requested`, `approved`, `denied`, `timeout`,
/// `grant_used`, `expired` or `refused` (no way to ask); `by` the subject who decided (the caller
/// for caller approvals); `grant` what was granted (`once`, `15m`, …).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ApprovalNote {
    pub state: &'static str,
    pub by: Option<String>,
    pub grant: Option<String>,
    /// The pending approval's id (approver approvals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

/// What the writer task receives.
enum Msg {
    Record(Box<Record>),
    /// Everything queued before this is written; then the sender is told.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The sender side, shared by every request.
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    arguments: AuditArguments,
}

impl Audit {
    /// Open the sinks and start the writer task. The task ends when every [`Audit`] handle is gone
    /// and the queue is drained; await the returned handle to be sure everything was written.
    pub fn start(
        config: &AuditConfig,
    ) -> Result<(Arc<Self>, tokio::task::JoinHandle<()>), AuditError> {
        let file = match &config.file {
            Some(path) => Some(RotatingFile::open(
                path,
                config.max_file_bytes,
                config.keep_files,
            )?),
            None => None,
        };
        let (tx, rx) = mpsc::channel(config.queue);
        if file.is_none() && !config.stdout && !config.stderr {
            tracing::info!(
                "audit records are not kept: set [audit] file (or stdout = true, or stderr = true)"
            );
        }
        let writer = Writer {
            file,
            stdout: config.stdout,
            stderr: config.stderr,
        };
        let handle = tokio::task::spawn_blocking(move || writer.run(rx));
        Ok((
            Arc::new(Self {
                tx,
                arguments: config.arguments,
            }),
            handle,
        ))
    }

    /// A handle that drops every record (for `mcp-broker tools` and tests).
    pub fn disabled() -> Arc<Self> {
        let (tx, _) = mpsc::channel(1);
        Arc::new(Self {
            tx,
            arguments: AuditArguments::None,
        })
    }

    fn submit(&self, record: Record) {
        metrics::global().audit_record(&metrics::Finished {
            kind: record.kind,
            server: record.server.as_deref(),
            name: &record.name,
            listed: record.listed,
            outcome: record.outcome.as_str(),
            latency_ms: record.latency_ms,
            upstream_ms: record.upstream_ms,
            approval: record.approval.as_ref().map(|a| a.state),
        });
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => metrics::global().audit_dropped(),
            // Disabled, or the writer already stopped at shutdown.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Wait until every record submitted so far is written (at shutdown), at most `wait`.
    pub async fn flush(&self, wait: std::time::Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tokio::time::timeout(wait, async {
            if self.tx.send(Msg::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        })
        .await;
    }

    /// How arguments are recorded.
    pub fn arguments(&self, args: Option<&Map<String, Value>>) -> Option<Value> {
        arguments_value(self.arguments, args)
    }

    /// The hash that stands in for full arguments too large for the record.
    fn arguments_hash(&self, args: Option<&Map<String, Value>>) -> Option<String> {
        match self.arguments {
            AuditArguments::Full => match arguments_value(AuditArguments::Hash, args) {
                Some(Value::String(h)) => Some(h),
                _ => None,
            },
            _ => None,
        }
    }

    /// Start a record for one request; it is written when the returned guard is dropped.
    pub fn begin(self: &Arc<Self>, caller: &Caller, kind: &'static str, name: &str) -> CallRecord {
        CallRecord {
            audit: self.clone(),
            started: Instant::now(),
            upstream_started: None,
            upstream_ms: None,
            record: Record {
                ts: now_rfc3339(),
                sub: clip(&caller.sub).into_owned(),
                client_id: caller.client_id.as_deref().map(|c| clip(c).into_owned()),
                act: caller.act.iter().map(|a| clip(a).into_owned()).collect(),
                authenticated: caller.authenticated,
                kind,
                name: clip(name).into_owned(),
                decision: "allow",
                ..Record::default()
            },
            done: false,
            span: None,
        }
    }
}

/// An open audit record: filled in as the request proceeds, written on drop.
pub struct CallRecord {
    audit: Arc<Audit>,
    started: Instant,
    upstream_started: Option<Instant>,
    upstream_ms: Option<f64>,
    record: Record,
    done: bool,
    /// The request's span (`[telemetry]`), ended with this record's facts when it is written.
    span: Option<crate::telemetry::RequestSpan>,
}

impl CallRecord {
    fn rec(&mut self) -> &mut Record {
        &mut self.record
    }

    pub fn request(&mut self, id: Value, session: Option<u64>) {
        let r = self.rec();
        r.request_id = Some(match id {
            Value::String(s) => Value::String(clip(&s).into_owned()),
            other => other,
        });
        r.session = session;
    }

    pub fn route(&mut self, server: &str, upstream_name: &str) {
        let r = self.rec();
        r.server = Some(clip(server).into_owned());
        r.upstream_name = Some(clip(upstream_name).into_owned());
    }

    /// The name resolved to a catalog entry (not a name the client made up).
    pub fn listed_name(&mut self) {
        self.rec().listed = true;
    }

    pub fn arguments(&mut self, args: Option<&Map<String, Value>>) {
        let v = self.audit.arguments(args);
        let h = self.audit.arguments_hash(args);
        let r = self.rec();
        r.arguments = v;
        r.arguments_hash = h;
    }

    /// What happened to the call's approval (see [`ApprovalNote`]); the pending id is kept.
    pub fn approval(&mut self, mut note: ApprovalNote) {
        if note.id.is_none() {
            note.id = self.approval_id();
        }
        self.rec().approval = Some(note);
    }

    pub fn approval_id(&self) -> Option<u64> {
        self.record.approval.as_ref().and_then(|a| a.id)
    }

    /// The policy's verdict; a denial also sets the outcome.
    pub fn decision(&mut self, allow: bool, reason: &str, rule: Option<String>) {
        let r = self.rec();
        r.decision = if allow { "allow" } else { "deny" };
        r.reason = clip_to(reason, TEXT_CAP).into_owned();
        r.rule = rule;
        if !allow {
            r.outcome = Outcome::Denied;
        }
    }

    /// Refused by a limit before reaching the upstream.
    pub fn rate_limited(&mut self, reason: &str) {
        let r = self.rec();
        r.decision = "deny";
        r.reason = clip_to(reason, TEXT_CAP).into_owned();
        r.rule = Some("limit".into());
        r.outcome = Outcome::RateLimited;
    }

    pub fn credential(&mut self, kind: &'static str) {
        self.rec().credential = Some(kind);
    }

    pub fn upstream_started(&mut self) {
        self.upstream_started = Some(Instant::now());
        if let Some(s) = &mut self.span {
            s.upstream_started(self.record.server.as_deref().unwrap_or_default());
        }
    }

    pub fn upstream_finished(&mut self) {
        if let Some(t) = self.upstream_started.take() {
            self.upstream_ms = Some(ms(t.elapsed()));
        }
        if let Some(s) = &mut self.span {
            s.upstream_finished();
        }
    }

    /// Open the request's span (`[telemetry]`; nothing without it), under the client's
    /// `traceparent` when it sent one.
    pub fn trace(&mut self, parent: Option<&str>) {
        self.span =
            crate::telemetry::RequestSpan::start(self.record.kind, &self.record.name, parent);
    }

    /// A child span of the request's (ended when dropped).
    pub fn child_span(&self, name: &'static str) -> Option<crate::telemetry::ChildSpan> {
        self.span.as_ref().and_then(|s| s.child(name))
    }

    /// The W3C `traceparent` for the upstream request, when the request is traced.
    pub fn traceparent(&self) -> Option<String> {
        self.span.as_ref().map(|s| s.traceparent())
    }

    pub fn listed(&mut self, shown: usize, hidden: usize) {
        let r = self.rec();
        r.shown = Some(shown);
        r.hidden = Some(hidden);
        r.outcome = Outcome::Ok;
    }

    /// Secrets masked in the result (`[guard] mask_results`), by kind; nothing when none was.
    pub fn masked(&mut self, counts: crate::guard::mask::Counts) {
        if !counts.is_empty() {
            self.rec().masked = Some(counts);
        }
    }

    /// How it ended; `error` is a message for the record (no secrets).
    pub fn finish(&mut self, outcome: Outcome, error: Option<String>) {
        let r = self.rec();
        r.outcome = outcome;
        r.error = error.map(|e| match clip_to(&e, TEXT_CAP) {
            std::borrow::Cow::Borrowed(_) => e,
            std::borrow::Cow::Owned(c) => c,
        });
    }

    /// Set the reason when the decision's own reason is empty (e.g. an allowed call that timed out).
    pub fn note(&mut self, reason: &str) {
        let r = self.rec();
        if r.reason.is_empty() {
            r.reason = clip_to(reason, TEXT_CAP).into_owned();
        }
    }

    pub fn outcome(&self) -> Outcome {
        self.record.outcome
    }

    /// The record as filled in so far (for tests of what a step records).
    #[cfg(test)]
    pub(crate) fn peek(&self) -> &Record {
        &self.record
    }

    /// Drop the record without writing it (a repeated limit refusal, throttled so that a flooding
    /// caller cannot rotate everyone else's records out of the trail).
    pub fn discard(mut self) {
        self.done = true;
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut r = std::mem::take(&mut self.record);
        if let Some(t) = self.upstream_started.take() {
            self.upstream_ms = Some(ms(t.elapsed()));
        }
        r.latency_ms = ms(self.started.elapsed());
        r.upstream_ms = self.upstream_ms;
        if r.outcome == Outcome::Cancelled && r.reason.is_empty() {
            r.reason =
                "the request ended before a result (cancelled by the client or the broker)".into();
        }
        if let Some(span) = self.span.take() {
            end_span(span, &r);
        }
        self.audit.submit(r);
    }
}

/// The span's attributes are the record's (the caller's `sub` included: the audit trail has it).
fn end_span(span: crate::telemetry::RequestSpan, r: &Record) {
    use opentelemetry::KeyValue;
    let mut a = vec![
        KeyValue::new("mcp.decision", r.decision),
        KeyValue::new("mcp.outcome", r.outcome.as_str()),
        KeyValue::new("enduser.id", r.sub.clone()),
    ];
    if let Some(s) = &r.server {
        a.push(KeyValue::new("mcp.server", s.clone()));
    }
    if let Some(n) = &r.upstream_name {
        a.push(KeyValue::new("mcp.upstream.name", n.clone()));
    }
    if let Some(rule) = &r.rule {
        a.push(KeyValue::new("mcp.decision.rule", rule.clone()));
    }
    if r.kind == "tool" {
        a.push(KeyValue::new("gen_ai.tool.name", r.name.clone()));
    }
    let failed = !matches!(r.outcome, Outcome::Ok | Outcome::Denied);
    let error = failed.then(|| r.error.as_deref().unwrap_or(r.outcome.as_str()));
    span.end(a, error);
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Arguments as recorded: nothing, a hash of their canonical JSON, or the masked JSON.
pub fn arguments_value(mode: AuditArguments, args: Option<&Map<String, Value>>) -> Option<Value> {
    match mode {
        AuditArguments::None => None,
        AuditArguments::Hash => {
            let canonical = args.map(canonical_json).unwrap_or_else(|| "{}".into());
            let digest = sha2::Sha256::digest(canonical.as_bytes());
            let hex = crate::hex(&digest);
            Some(Value::String(format!("sha256:{hex}")))
        }
        // Masked first, so a secret is recognised whole; then every string clipped.
        AuditArguments::Full => Some(bound::clip_value(mask(&Value::Object(
            args.cloned().unwrap_or_default(),
        )))),
    }
}

/// JSON with object keys sorted at every level, so equal arguments hash equally.
fn canonical_json(map: &Map<String, Value>) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                let mut out = Map::new();
                for k in keys {
                    out.insert(k.clone(), sort(&m[k]));
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(&Value::Object(map.clone())).to_string()
}

const MASK: &str = "[masked]";
/// How long the writer gathers records before one write (see `Writer::run`).
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(2);
/// The most records one write carries.
const MAX_BATCH: usize = 1024;

/// Mask values under secret-looking keys and values that look like credentials.
fn mask(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let masked = if secret_key(k) && !v.is_object() && !v.is_array() {
                        Value::String(MASK.into())
                    } else {
                        mask(v)
                    };
                    (k.clone(), masked)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(mask).collect()),
        Value::String(s) if secret_value(s) => Value::String(MASK.into()),
        other => other.clone(),
    }
}

fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "apikey",
        "api_key",
        "api-key",
        "authorization",
        "credential",
        "cookie",
        "private_key",
        "privatekey",
        "session",
    ]
    .iter()
    .any(|s| k.contains(s))
}

fn secret_value(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("bearer ") || lower.starts_with("basic ") {
        return true;
    }
    if lower.contains("-----begin") && lower.contains("private key") {
        return true;
    }
    // A JWT: three base64url segments, the first starting `eyJ` (`{"`).
    let parts: Vec<&str> = s.split('.').collect();
    if parts.len() == 3
        && s.starts_with("eyJ")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '=')
        })
    {
        return true;
    }
    // Well-known token prefixes (GitHub, Slack, OpenAI/Anthropic-style keys, AWS access keys).
    [
        "ghp_",
        "gho_",
        "ghs_",
        "github_pat_",
        "xoxb-",
        "xoxp-",
        "sk-",
        "akia",
    ]
    .iter()
    .any(|p| lower.starts_with(p) && s.len() >= 16)
}

/// `2026-11-22T04:10:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format_rfc3339(d.as_secs() as i64, d.subsec_millis())
}

pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(d.as_secs() as i64, d.subsec_millis())
}

pub fn format_rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parse our own `ts` format back to Unix seconds (for `mcp-broker audit --since`).
pub fn parse_rfc3339(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut dp = date.split('-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: i64 = dp.next()?.parse().ok()?;
    let d: i64 = dp.next()?.parse().ok()?;
    let mut tp = time.split(':');
    let hh: f64 = tp.next()?.parse().ok()?;
    let mm: f64 = tp.next()?.parse().ok()?;
    let ss: f64 = tp.next()?.parse().ok()?;
    // days_from_civil
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// The writer task's side.
struct Writer {
    file: Option<RotatingFile>,
    stdout: bool,
    stderr: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // blocking_recv: this runs on the blocking pool, so file writes never stall the runtime.
        while let Some(msg) = rx.blocking_recv() {
            self.handle(msg);
            // Records that arrive within BATCH_WAIT go out in one write: one syscall and one
            // wake-up of this thread per batch rather than per record (a busy broker writes
            // thousands a second). The call path never waits for this.
            std::thread::sleep(BATCH_WAIT);
            for _ in 0..MAX_BATCH {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(_) => break,
                }
            }
            self.flush_file();
        }
        self.flush_file();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Flush(done) => {
                self.flush_file();
                let _ = done.send(());
            }
            Msg::Record(mut r) => {
                let line = bound::line_of(&mut r);
                self.write(&line, &r);
            }
        }
    }

    fn flush_file(&mut self) {
        if let Some(f) = &mut self.file
            && let Err(e) = f.flush()
        {
            metrics::global().audit_dropped();
            tracing::error!(error = %e, "cannot write the audit file");
        }
    }

    fn write(&mut self, line: &str, r: &Record) {
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_line(line.as_bytes())
        {
            metrics::global().audit_dropped();
            tracing::error!(error = %e, "cannot write the audit file");
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(line.as_bytes());
            let _ = out.flush();
        }
        if !self.stderr {
            return;
        }
        // Lists are the bulk of a session's records and say little to a person reading the log:
        // debug (`RUST_LOG=mcp_broker::audit=debug` shows them). The file and stdout keep them all.
        if r.kind == "list" {
            tracing::debug!(
                target: "mcp_broker::audit",
                sub = %r.sub,
                kind = r.kind,
                name = %r.name,
                decision = r.decision,
                outcome = r.outcome.as_str(),
                latency_ms = r.latency_ms,
                reason = %r.reason,
                "audit"
            );
        } else {
            tracing::info!(
                target: "mcp_broker::audit",
                sub = %r.sub,
                kind = r.kind,
                server = r.server.as_deref().unwrap_or("-"),
                name = %r.name,
                decision = r.decision,
                outcome = r.outcome.as_str(),
                latency_ms = r.latency_ms,
                reason = %r.reason,
                "audit"
            );
        }
    }
}

/// An append-only JSONL file rotated by size: `f` → `f.1` → … → `f.N`.
struct RotatingFile {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max: u64,
    keep: usize,
    /// Lines not yet written (one batch of the writer).
    pending: Vec<u8>,
}

impl RotatingFile {
    fn open(path: &Path, max: u64, keep: usize) -> Result<Self, AuditError> {
        let err = |source| AuditError::File {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = open_append(path).map_err(err)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            max,
            keep,
            pending: Vec::new(),
        })
    }

    /// Queue one line (written by [`Self::flush`]), rotating first when it would not fit.
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max {
            self.flush()?;
            self.rotate()?;
        }
        self.pending.extend_from_slice(line);
        self.size += line.len() as u64;
        Ok(())
    }

    /// Write the queued lines in one `write_all` on the `O_APPEND` file: whole lines only.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(&self.pending);
        self.pending.clear();
        r
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |i: usize| -> PathBuf {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.keep == 0 {
            std::fs::remove_file(&self.path).ok();
        } else {
            for i in (1..self.keep).rev() {
                let from = name(i);
                if from.exists() {
                    std::fs::rename(&from, name(i + 1))?;
                }
            }
            std::fs::rename(&self.path, name(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The audit trail names who called what: readable by the broker's user only.
        o.mode(0o600);
    }
    o.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(1_795_000_000, 5), "2026-11-18T11:06:40.005Z");
        let back = parse_rfc3339("2026-11-18T11:06:40.005Z").unwrap();
        assert!((back - 1_795_000_000.005).abs() < 1e-6);
        assert_eq!(format_rfc3339(951_782_400, 0), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn hash_is_canonical() {
        let a: Map<String, Value> = serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":3}}"#).unwrap();
        let b: Map<String, Value> = serde_json::from_str(r#"{"a":{"x":3,"y":2},"b":1}"#).unwrap();
        let ha = arguments_value(AuditArguments::Hash, Some(&a));
        assert_eq!(ha, arguments_value(AuditArguments::Hash, Some(&b)));
        assert!(ha.unwrap().as_str().unwrap().starts_with("sha256:"));
        assert_eq!(arguments_value(AuditArguments::None, Some(&a)), None);
    }

    #[test]
    fn full_masks_secrets() {
        let a: Map<String, Value> = serde_json::from_str(
            r#"{"account":"acme","password":"hunter2","nested":{"api_key":"k","n":1},
                "note":"Bearer abc.def","jwt":"x","list":["eyJhbGciOi.eyJzdWIi.c2ln","plain"]}"#,
        )
        .unwrap();
        let v = arguments_value(AuditArguments::Full, Some(&a)).unwrap();
        assert_eq!(v["account"], "acme");
        assert_eq!(v["password"], MASK);
        assert_eq!(v["nested"]["api_key"], MASK);
        assert_eq!(v["nested"]["n"], 1);
        assert_eq!(v["note"], MASK);
        assert_eq!(v["list"][0], MASK);
        assert_eq!(v["list"][1], "plain");
    }

    #[test]
    fn a_record_clips_what_the_caller_chose() {
        let huge = "n".repeat(4_000_000);
        let mut caller = Caller::anonymous();
        caller.act = vec![huge.clone()];
        let mut rec = Audit::disabled().begin(&caller, "tool", &huge);
        rec.request(Value::String(huge.clone()), None);
        rec.route("ledger", &huge);
        rec.decision(
            false,
            &format!("unknown tool `{huge}`"),
            Some("catalog".into()),
        );
        rec.finish(Outcome::Error, Some(huge.clone()));
        let r = &rec.record;
        assert!(r.name.len() <= FIELD_CAP && r.name.contains("(4000000 bytes, sha256:"));
        assert!(r.upstream_name.as_ref().unwrap().len() <= FIELD_CAP);
        assert!(r.request_id.as_ref().unwrap().as_str().unwrap().len() <= FIELD_CAP);
        assert!(r.act[0].len() <= FIELD_CAP);
        assert!(r.reason.len() <= TEXT_CAP && r.reason.starts_with("unknown tool `nnn"));
        assert!(r.error.as_ref().unwrap().len() <= TEXT_CAP);
        assert!(
            !r.listed,
            "a name is not a catalog entry until the broker says so"
        );
        rec.discard();
    }

    #[test]
    fn rotation_keeps_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut f = RotatingFile::open(&path, 100, 2).unwrap();
        for i in 0..10 {
            f.write_line(format!("{{\"n\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}\n").as_bytes())
                .unwrap();
        }
        f.flush().unwrap();
        let cur = std::fs::read_to_string(&path).unwrap();
        let one = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        assert!(dir.path().join("audit.jsonl.2").exists());
        assert!(!dir.path().join("audit.jsonl.3").exists());
        for l in cur.lines().chain(one.lines()) {
            serde_json::from_str::<Value>(l).unwrap();
        }
        assert!(cur.contains("\"n\":9"));
    }
}
