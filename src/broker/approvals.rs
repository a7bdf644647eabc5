//! Just-in-time approvals: a call allowed by an `effect = "approve"` rule goes on only once someone
//! approved it, or while a grant from an earlier approval covers it.
//!
//! - `approval = "caller"`: the calling user is asked with a form-mode elicitation (a 2025-11-25
//!   session whose client declared it: the call waits for the answer), or an `input_required`
//!   result asking the same (a 2026-07-28 request that declared elicitation: its retry carries the
//!   answer); a client that cannot be asked is refused with why.
//! - `approval = "approver"`: the call waits in the pending registry (bounded in total and per
//!   caller) until someone in the rule's `approvers` decides through `/admin/approvals`
//!   (`crate::front::approvals`), the approval timeout passes, the client cancels, or the broker
//!   drains. Progress notifications keep a client that sent a progress token from timing out.
//!
//! A grant is keyed by (caller, server, tool[, SHA-256 of the canonical arguments]) and held in
//! process until it expires (swept with the sessions); `once` grants are never stored: they cover the
//! call that asked. Every request, decision, timeout and use of a grant is in an audit record (the
//! call's own `approval` field, and for approver approvals a record of kind `approval` when the call
//! starts waiting).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use rmcp::model::{
    ClientResult, ElicitRequest, ElicitRequestParams, ElicitationSchema, InputRequest,
    InputRequests, InputRequiredResult, InputResponses, ProgressNotificationParam, ServerRequest,
};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::audit::{ApprovalNote, CallRecord, Outcome};
use crate::auth::Caller;
use crate::config::{ApprovalMode, ApprovalRule, AuditArguments, GrantDuration};

use super::errors::Failure;
use super::{Broker, Downstream};

/// What an approval `input_required` seals as its state (never sent upstream).
pub(super) const APPROVAL_STATE: &str = "mcpb-approval";

/// The `inputRequests` key of the approval question.
const ASK_KEY: &str = "approval";

/// Calls waiting for an approver, in total and per caller.
pub const MAX_PENDING: usize = 256;
pub const MAX_PENDING_PER_CALLER: usize = 8;

/// Grants held at once (a full table still lets the approved call through, unrecorded).
const MAX_GRANTS: usize = 10_000;

/// How often a waiting call tells its client it is still alive.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The longest arguments summary shown to whoever approves.
const SUMMARY_CAP: usize = 300;

/// Whether the call may go on.
pub(super) enum Approved {
    Ready,
    /// A 2026-07-28 request: ask with this `input_required` result.
    Ask(InputRequiredResult),
}

/// What a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GrantKey {
    sub: String,
    server: Arc<str>,
    tool: String,
    /// `bind_arguments`: the arguments' `sha256:<hex>`.
    args: Option<String>,
}

struct Grant {
    expires: Instant,
    label: String,
    by: String,
}

/// An approver's decision.
#[derive(Debug)]
pub struct Verdict {
    pub approve: bool,
    pub by: String,
    pub grant: Option<GrantDuration>,
}

/// A call waiting for an approver.
pub struct Pending {
    pub id: u64,
    pub caller: String,
    pub server: Arc<str>,
    /// The exposed (namespaced) tool name.
    pub tool: String,
    pub summary: String,
    pub created: SystemTime,
    pub expires: SystemTime,
    pub rule: Arc<ApprovalRule>,
    /// Taken by the first decision.
    decide: std::sync::Mutex<Option<oneshot::Sender<Verdict>>>,
}

/// What `GET /admin/approvals` shows of one pending approval.
#[derive(Debug, serde::Serialize)]
pub struct PendingView {
    pub id: String,
    pub caller: String,
    pub server: String,
    pub tool: String,
    pub arguments: String,
    pub created: String,
    pub expires: String,
    pub rule: usize,
    pub grants: Vec<String>,
}

impl Pending {
    pub fn view(&self) -> PendingView {
        PendingView {
            id: self.id.to_string(),
            caller: self.caller.clone(),
            server: self.server.to_string(),
            tool: self.tool.clone(),
            arguments: self.summary.clone(),
            created: crate::audit::rfc3339(self.created),
            expires: crate::audit::rfc3339(self.expires),
            rule: self.rule.rule,
            grants: self.rule.grants.iter().map(|g| g.label.clone()).collect(),
        }
    }
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("no pending approval {0} (decided, timed out, or cancelled)")]
    NotFound(u64),
    #[error("`{0}` is not an approver for this call")]
    NotApprover(String),
    #[error("`{0}` cannot approve their own call")]
    OwnCall(String),
    #[error("\"{0}\" is not one of the grants offered ({1})")]
    BadGrant(String, String),
    #[error("the link is not valid for this approval, or it expired")]
    BadLink,
}

/// Grants and pending approvals.
#[derive(Default)]
pub struct Approvals {
    grants: DashMap<GrantKey, Grant>,
    pending: DashMap<u64, Arc<Pending>>,
    next: AtomicU64,
}

impl Approvals {
    /// Pending approvals `approver` may decide (approvers only see calls under their rules).
    pub fn visible_to(&self, approver: &Caller) -> Vec<PendingView> {
        let mut v: Vec<_> = self
            .pending
            .iter()
            .filter(|p| p.rule.is_approver(&approver.sub, &approver.groups))
            .map(|p| p.view())
            .collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        v
    }

    /// Is `who` an approver for any pending call? (Whether to answer a listing with 403.)
    pub fn is_known_approver(&self, rules: &[Arc<ApprovalRule>], who: &Caller) -> bool {
        rules.iter().any(|r| r.is_approver(&who.sub, &who.groups))
    }

    /// Decide pending approval `id` as `approver`. `grant`: the label chosen, else the rule's
    /// shortest (the first offered).
    pub fn decide(
        &self,
        id: u64,
        approver: &Caller,
        approve: bool,
        grant: Option<&str>,
    ) -> Result<Arc<Pending>, DecideError> {
        let p = self
            .pending
            .get(&id)
            .map(|p| p.clone())
            .ok_or(DecideError::NotFound(id))?;
        if !p.rule.is_approver(&approver.sub, &approver.groups) {
            return Err(DecideError::NotApprover(approver.sub.clone()));
        }
        if p.caller == approver.sub {
            return Err(DecideError::OwnCall(approver.sub.clone()));
        }
        let grant = match grant {
            Some(label) => Some(p.rule.grant(label).cloned().ok_or_else(|| {
                DecideError::BadGrant(
                    label.to_string(),
                    p.rule
                        .grants
                        .iter()
                        .map(|g| g.label.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                )
            })?),
            None => p.rule.grants.first().cloned(),
        };
        let tx = p
            .decide
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .ok_or(DecideError::NotFound(id))?;
        tx.send(Verdict {
            approve,
            by: approver.sub.clone(),
            grant: approve.then_some(grant).flatten(),
        })
        .map_err(|_| DecideError::NotFound(id))?;
        Ok(p)
    }

    /// The caller's approval this covers, if any, dropping it if it expired.
    fn grant_for(&self, key: &GrantKey) -> Result<Option<(String, String)>, String> {
        let now = Instant::now();
        match self.grants.get(key) {
            Some(g) if g.expires > now => Ok(Some((g.label.clone(), g.by.clone()))),
            Some(g) => {
                let label = g.label.clone();
                drop(g);
                self.grants.remove(key);
                Err(label)
            }
            None => Ok(None),
        }
    }

    fn record_grant(&self, key: GrantKey, grant: &GrantDuration, by: &str) {
        let Some(lasts) = grant.lasts else {
            return;
        };
        if self.grants.len() >= MAX_GRANTS {
            self.sweep();
            if self.grants.len() >= MAX_GRANTS {
                tracing::warn!(
                    "{MAX_GRANTS} approval grants held; this one covers only the call that asked"
                );
                return;
            }
        }
        self.grants.insert(
            key,
            Grant {
                expires: Instant::now() + lasts,
                label: grant.label.clone(),
                by: by.to_string(),
            },
        );
    }

    /// Forget expired grants.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.grants.retain(|_, g| g.expires > now);
    }

    pub fn get(&self, id: u64) -> Option<Arc<Pending>> {
        self.pending.get(&id).map(|p| p.clone())
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }
}

/// Removes a pending approval however the waiting call ends.
struct PendingGuard<'a>(&'a Approvals, u64);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.remove(&self.1);
    }
}

/// `{account_id: ACC-1001, status: frozen}`: the arguments as a person reads them, masked and
/// clipped like the audit's.
pub fn summary(args: Option<&Map<String, Value>>) -> String {
    let Some(Value::Object(m)) = crate::audit::arguments_value(AuditArguments::Full, args) else {
        return "no arguments".into();
    };
    if m.is_empty() {
        return "no arguments".into();
    }
    let parts: Vec<String> = m
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}: {s}"),
            other => format!("{k}: {other}"),
        })
        .collect();
    let s = format!("{{{}}}", parts.join(", "));
    if s.chars().count() > SUMMARY_CAP {
        let cut: String = s.chars().take(SUMMARY_CAP).collect();
        format!("{cut}…}}")
    } else {
        s
    }
}

/// What one approval is about.
pub(super) struct Ask<'a> {
    pub server: &'a Arc<str>,
    /// The name the client called.
    pub exposed: &'a str,
    pub original: &'a str,
    pub arguments: Option<&'a Map<String, Value>>,
    pub rule: &'a Arc<ApprovalRule>,
}

impl Broker {
    /// Approval rules in force (who may list `/admin/approvals`).
    pub fn approval_rules(&self) -> Vec<Arc<ApprovalRule>> {
        self.config()
            .policy
            .iter()
            .filter_map(|r| r.approval.clone())
            .collect()
    }

    /// Let the call go on if a grant covers it or someone approves it now. `answers`: a 2026-07-28
    /// retry answering the broker's approval `input_required` (its responses); `bind` is what a new
    /// state is sealed to.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn ensure_approved(
        &self,
        ask: Ask<'_>,
        caller: &Caller,
        down: &Downstream,
        ct: &CancellationToken,
        rec: &mut CallRecord,
        answers: Option<InputResponses>,
        bind: &[u8],
    ) -> Result<Approved, Failure> {
        let rule = ask.rule;
        let key = GrantKey {
            sub: caller.sub.clone(),
            server: ask.server.clone(),
            tool: ask.original.to_string(),
            args: rule.bind_arguments.then(|| {
                match crate::audit::arguments_value(AuditArguments::Hash, ask.arguments) {
                    Some(Value::String(h)) => h,
                    _ => String::new(),
                }
            }),
        };
        match self.approvals.grant_for(&key) {
            Ok(Some((label, by))) => {
                rec.approval(ApprovalNote {
                    state: "grant_used",
                    by: Some(by),
                    grant: Some(label),
                    id: None,
                });
                return Ok(Approved::Ready);
            }
            Ok(None) => {
                // Under `[cluster]` a grant given on another instance covers this call too.
                if let Some((label, by)) = self.shared_grant(&key).await {
                    rec.approval(ApprovalNote {
                        state: "grant_used",
                        by: Some(by),
                        grant: Some(label),
                        id: None,
                    });
                    return Ok(Approved::Ready);
                }
            }
            Err(label) => {
                // The call asks again below; the lapse is a record of its own.
                self.audit_approval(
                    caller,
                    &ask,
                    ApprovalNote {
                        state: "expired",
                        by: None,
                        grant: Some(label),
                        id: None,
                    },
                    true,
                    "the grant expired",
                );
            }
        }
        let summary = summary(ask.arguments);
        let verdict = match rule.mode {
            ApprovalMode::Caller => {
                match self
                    .ask_caller(&ask, caller, &summary, down, ct, rec, answers, bind)
                    .await?
                {
                    Asked::Answer(v) => v,
                    Asked::Later(ir) => return Ok(Approved::Ask(ir)),
                }
            }
            ApprovalMode::Approver => {
                self.ask_approver(&ask, &summary, caller, down, ct, rec)
                    .await?
            }
        };
        let grant = verdict.grant.filter(|_| verdict.approve);
        let Some(grant) = grant else {
            let who = if rule.mode == ApprovalMode::Caller {
                "you declined it".to_string()
            } else {
                format!("`{}` denied it", verdict.by)
            };
            rec.approval(ApprovalNote {
                state: "denied",
                by: Some(verdict.by),
                grant: None,
                id: None,
            });
            return Err(self.approval_refused(
                rec,
                format!(
                    "`{}` needs approval and {who}; it was not called",
                    ask.exposed
                ),
            ));
        };
        tracing::info!(server = %ask.server, tool = ask.original, sub = %caller.sub, by = %verdict.by, grant = %grant.label, "call approved");
        self.share_grant(&key, &grant, &verdict.by).await;
        self.approvals.record_grant(key, &grant, &verdict.by);
        let id = rec_id(rec);
        rec.approval(ApprovalNote {
            state: "approved",
            by: Some(verdict.by),
            grant: Some(grant.label),
            id,
        });
        Ok(Approved::Ready)
    }

    /// Ask the calling user.
    #[allow(clippy::too_many_arguments)]
    async fn ask_caller(
        &self,
        ask: &Ask<'_>,
        caller: &Caller,
        summary: &str,
        down: &Downstream,
        ct: &CancellationToken,
        rec: &mut CallRecord,
        answers: Option<InputResponses>,
        bind: &[u8],
    ) -> Result<Asked, Failure> {
        let caller_sub = caller.sub.clone();
        if let Some(mut answers) = answers {
            let answer = answers.remove(ASK_KEY).unwrap_or(Value::Null);
            return Ok(Asked::Answer(verdict_of(ask.rule, answer, caller_sub)));
        }
        let declared_form = down
            .capabilities
            .as_ref()
            .and_then(|c| c.elicitation.as_ref())
            .is_some_and(|e| e.form.is_some() || e.url.is_none());
        if !declared_form {
            rec.approval(ApprovalNote {
                state: "refused",
                by: None,
                grant: None,
                id: None,
            });
            return Err(self.approval_refused(
                rec,
                format!(
                    "`{}` needs your approval before it runs, and your client cannot ask you (it did not declare form elicitation); use a client that supports elicitation, or ask an administrator for a policy that allows it",
                    ask.exposed
                ),
            ));
        }
        let request = ElicitRequest::new(ElicitRequestParams::FormElicitationParams {
            meta: None,
            message: format!("Allow {} with {summary}?", ask.exposed),
            requested_schema: schema(ask.rule),
        });
        rec.note(&format!(
            "approval asked of the caller (rule {})",
            ask.rule.rule
        ));
        if down.stateless {
            // 2026-07-28: the client is asked in the result and retries with the sealed state.
            let mut asks = InputRequests::new();
            asks.insert(ASK_KEY.into(), InputRequest::Elicitation(request));
            let state = self.seal_marker(bind, APPROVAL_STATE);
            let ir = InputRequiredResult::new(Some(asks), Some(state));
            crate::upstream::raw::keep(serde_json::to_value(&ir).unwrap_or_default());
            rec.approval(ApprovalNote {
                state: "requested",
                by: None,
                grant: None,
                id: None,
            });
            rec.finish(Outcome::Ok, Some("approval requested".into()));
            return Ok(Asked::Later(ir));
        }
        let _active = super::forward::ActiveCall::new(self);
        let answer = tokio::select! {
            a = self.ask_client(ask.server, down, ServerRequest::ElicitRequest(request), ct) => Some(a),
            _ = tokio::time::sleep(ask.rule.timeout) => None,
            _ = self.drained() => {
                rec.approval(ApprovalNote { state: "refused", by: None, grant: None, id: None });
                return Err(self.approval_refused(
                    rec,
                    format!("mcp-broker is shutting down; `{}` was still waiting for your approval and was not called", ask.exposed),
                ));
            }
            _ = ct.cancelled() => return Err(Failure::Cancelled("cancelled while waiting for approval".into())),
        };
        match answer {
            None => Err(self.timed_out(
                rec,
                None,
                format!(
                    "`{}` needs your approval and none came within {}; it was not called",
                    ask.exposed,
                    human(ask.rule.timeout)
                ),
            )),
            Some(Ok(ClientResult::ElicitResult(r))) => {
                let v = serde_json::to_value(&r).unwrap_or(Value::Null);
                Ok(Asked::Answer(verdict_of(ask.rule, v, caller_sub.clone())))
            }
            Some(Ok(_)) => Ok(Asked::Answer(verdict_of(
                ask.rule,
                Value::Null,
                caller_sub.clone(),
            ))),
            Some(Err(e)) => {
                rec.approval(ApprovalNote {
                    state: "refused",
                    by: None,
                    grant: None,
                    id: None,
                });
                Err(self.approval_refused(
                    rec,
                    format!(
                        "`{}` needs your approval, and asking you failed: {}",
                        ask.exposed, e.message
                    ),
                ))
            }
        }
    }

    /// Wait for an approver.
    async fn ask_approver(
        &self,
        ask: &Ask<'_>,
        summary: &str,
        caller: &Caller,
        down: &Downstream,
        ct: &CancellationToken,
        rec: &mut CallRecord,
    ) -> Result<Verdict, Failure> {
        let a = &self.approvals;
        let mine = a.pending.iter().filter(|p| p.caller == caller.sub).count();
        if a.pending.len() >= MAX_PENDING || mine >= MAX_PENDING_PER_CALLER {
            return Err(self.approval_refused(
                rec,
                format!(
                    "`{}` needs an approver's approval, and too many calls are already waiting for one; retry later",
                    ask.exposed
                ),
            ));
        }
        let id = loop {
            let mut b = [0u8; 6];
            let _ = getrandom::fill(&mut b);
            // Random ids (not guessable from one's own), unique among the pending.
            let id = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]])
                ^ a.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !a.pending.contains_key(&id) {
                break id;
            }
        };
        let (tx, rx) = oneshot::channel();
        let now = SystemTime::now();
        let pending = Arc::new(Pending {
            id,
            caller: caller.sub.clone(),
            server: ask.server.clone(),
            tool: ask.exposed.to_string(),
            summary: summary.to_string(),
            created: now,
            expires: now + ask.rule.timeout,
            rule: ask.rule.clone(),
            decide: std::sync::Mutex::new(Some(tx)),
        });
        a.pending.insert(id, pending.clone());
        let _guard = PendingGuard(a, id);
        // Counted as in flight, so a drain waits for it to be refused (below) before the listener goes.
        let _active = super::forward::ActiveCall::new(self);
        self.audit_approval(
            caller,
            ask,
            ApprovalNote {
                state: "requested",
                by: None,
                grant: None,
                id: Some(id),
            },
            true,
            &format!("waiting for an approver (rule {})", ask.rule.rule),
        );
        rec.note(&format!(
            "approval {id} asked of the approvers (rule {})",
            ask.rule.rule
        ));
        tracing::info!(id, server = %ask.server, tool = ask.original, sub = %caller.sub, "call waiting for an approver");
        self.notify_webhook(&pending);
        let deadline = tokio::time::Instant::now() + ask.rule.timeout;
        let started = Instant::now();
        let mut rx = std::pin::pin!(rx);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_progress = Instant::now();
        let mut progress = 0u32;
        loop {
            tokio::select! {
                v = &mut rx => {
                    let Ok(v) = v else {
                        return Err(self.approval_refused(rec, "the approval was dropped".into()));
                    };
                    rec_set_id(rec, id);
                    return Ok(v);
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(self.timed_out(
                        rec,
                        Some(id),
                        format!(
                            "`{}` needs an approver's approval and no approver decided within {}; it was not called",
                            ask.exposed,
                            human(ask.rule.timeout)
                        ),
                    ));
                }
                _ = ct.cancelled() => {
                    rec.approval(ApprovalNote { state: "cancelled", by: None, grant: None, id: Some(id) });
                    return Err(Failure::Cancelled("cancelled while waiting for approval".into()));
                }
                _ = tick.tick() => {
                    if self.is_draining() {
                        rec.approval(ApprovalNote { state: "refused", by: None, grant: None, id: Some(id) });
                        return Err(self.approval_refused(
                            rec,
                            format!("mcp-broker is shutting down; `{}` was still waiting for approval and was not called", ask.exposed),
                        ));
                    }
                    if last_progress.elapsed() >= PROGRESS_EVERY
                        && let Some(token) = &down.progress_token
                    {
                        last_progress = Instant::now();
                        progress += 1;
                        let _ = down
                            .peer
                            .notify_progress(
                                ProgressNotificationParam::new(token.clone(), f64::from(progress))
                                    .with_message(format!(
                                        "waiting for an approver ({}s)",
                                        started.elapsed().as_secs()
                                    )),
                            )
                            .await;
                    }
                }
            }
        }
    }

    /// Resolves once the broker drains (checked every second).
    async fn drained(&self) {
        while !self.is_draining() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A refusal recorded as such.
    fn approval_refused(&self, rec: &mut CallRecord, message: String) -> Failure {
        rec.decision(false, &message, None);
        rec.finish(Outcome::Denied, Some(message.clone()));
        Failure::Refused(message)
    }

    fn timed_out(&self, rec: &mut CallRecord, id: Option<u64>, message: String) -> Failure {
        rec.approval(ApprovalNote {
            state: "timeout",
            by: None,
            grant: None,
            id,
        });
        self.approval_refused(rec, message)
    }

    /// A record of kind `approval` (not a call's own).
    fn audit_approval(
        &self,
        caller: &Caller,
        ask: &Ask<'_>,
        note: ApprovalNote,
        allow: bool,
        reason: &str,
    ) {
        let mut rec = self.audit.begin(caller, "approval", ask.exposed);
        rec.route(ask.server, ask.original);
        rec.arguments(ask.arguments);
        rec.decision(allow, reason, Some(format!("rule {}", ask.rule.rule)));
        rec.approval(note);
        rec.finish(Outcome::Ok, None);
    }

    /// An approver's decision on a pending call, recorded by whoever decided (an `approval` record
    /// of the approver; the call's own record names them too).
    pub fn audit_decision(&self, approver: &Caller, p: &Pending, note: ApprovalNote, reason: &str) {
        let allow = matches!(note.state, "approved");
        let mut rec = self.audit.begin(approver, "approval", &p.tool);
        rec.route(&p.server, "");
        rec.decision(allow, reason, Some(format!("rule {}", p.rule.rule)));
        rec.approval(note);
        rec.finish(Outcome::Ok, None);
    }

    /// A decision refused (self-approval, not an approver): a record of kind `approval`.
    pub fn audit_refused_decision(&self, who: &Caller, id: u64, reason: &str) {
        let p = self.approvals.pending.get(&id).map(|p| p.clone());
        let name = p.as_ref().map_or(String::new(), |p| p.tool.clone());
        let mut rec = self.audit.begin(who, "approval", &name);
        if let Some(p) = &p {
            rec.route(&p.server, "");
        }
        rec.decision(
            false,
            reason,
            p.as_ref().map(|p| format!("rule {}", p.rule.rule)),
        );
        rec.approval(ApprovalNote {
            state: "refused",
            by: Some(who.sub.clone()),
            grant: None,
            id: Some(id),
        });
    }

    /// `[guard] approval_webhook`: tell it about a new pending approval, with signed links that
    /// decide it (best effort: bounded, a short timeout, failures logged).
    fn notify_webhook(&self, p: &Pending) {
        let Some(hook) = self.config().guard.approval_webhook.clone() else {
            return;
        };
        if WEBHOOKS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_WEBHOOKS_IN_FLIGHT {
            WEBHOOKS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                id = p.id,
                "approval webhook: too many posts in flight; this one is skipped"
            );
            return;
        }
        let body = serde_json::json!({
            "id": p.id.to_string(),
            "caller": p.caller,
            "server": &*p.server,
            "tool": p.tool,
            "arguments": p.summary,
            "expires": crate::audit::rfc3339(p.expires),
            "grants": p.rule.grants.iter().map(|g| &g.label).collect::<Vec<_>>(),
            "approve_url": self.approval_link(p, "approve"),
            "deny_url": self.approval_link(p, "deny"),
        });
        let id = p.id;
        tokio::spawn(async move {
            let sent = async {
                reqwest::Client::builder()
                    .timeout(WEBHOOK_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?
                    .post(hook.clone())
                    .json(&body)
                    .send()
                    .await?
                    .error_for_status()
            }
            .await;
            WEBHOOKS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            match sent {
                Ok(_) => tracing::info!(id, "approval webhook notified"),
                Err(e) => {
                    tracing::warn!(id, host = hook.host_str().unwrap_or(""), error = %e, "approval webhook failed")
                }
            }
        });
    }

    /// A link that decides pending approval `p` (`action`: `approve` or `deny`) when opened and
    /// confirmed: the broker's public origin, `/approvals/{id}/{action}?sig=…`, where `sig` is sealed
    /// with the broker's key (per process, or `[cluster] secret_key`) for that id and action and
    /// expires with the approval.
    fn approval_link(&self, p: &Pending, action: &str) -> String {
        let ttl = p
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::from_secs(1));
        let sig = self.seal_marker_for(&link_binding(p.id, action), "approval-link", ttl);
        let mut u = self.config().broker.public_url.clone();
        u.set_path(&format!("{LINK_PATH}/{}/{action}", p.id));
        u.set_query(None);
        u.query_pairs_mut().append_pair("sig", &sig);
        u.to_string()
    }

    /// A signed link's decision (`crate::front::approvals`): `approve` grants the rule's first
    /// offered grant (the narrowest; `once` by default).
    pub fn decide_by_link(
        &self,
        id: u64,
        action: &str,
        sig: &str,
    ) -> Result<Arc<Pending>, DecideError> {
        if self.open_marker(&link_binding(id, action), sig).as_deref() != Some("approval-link") {
            return Err(DecideError::BadLink);
        }
        let p = self
            .approvals
            .pending
            .get(&id)
            .map(|p| p.clone())
            .ok_or(DecideError::NotFound(id))?;
        let approve = action == "approve";
        let tx = p
            .decide
            .lock()
            .ok()
            .and_then(|mut t| t.take())
            .ok_or(DecideError::NotFound(id))?;
        tx.send(Verdict {
            approve,
            by: LINK_APPROVER.into(),
            grant: if approve {
                p.rule.grants.first().cloned()
            } else {
                None
            },
        })
        .map_err(|_| DecideError::NotFound(id))?;
        Ok(p)
    }
}

/// Where signed links point.
pub const LINK_PATH: &str = "/approvals";

/// Who decided through a webhook's signed link (the link's holder is not known by name).
pub const LINK_APPROVER: &str = "webhook-link";

const MAX_WEBHOOKS_IN_FLIGHT: usize = 32;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
static WEBHOOKS_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn link_binding(id: u64, action: &str) -> Vec<u8> {
    format!("mcp-broker approval link\0{id}\0{action}").into_bytes()
}

enum Asked {
    Answer(Verdict),
    Later(InputRequiredResult),
}

/// The form: one required choice among the offered grants and `deny`.
fn schema(rule: &ApprovalRule) -> ElicitationSchema {
    let mut choices: Vec<&str> = rule.grants.iter().map(|g| g.label.as_str()).collect();
    choices.push("deny");
    let v = serde_json::json!({
        "type": "object",
        "properties": {
            "grant": {
                "type": "string",
                "title": "Allow for",
                "description": "\"once\" allows this call only; a duration allows the same calls for that long",
                "enum": choices,
            }
        },
        "required": ["grant"],
    });
    serde_json::from_value(v).unwrap_or_else(|_| ElicitationSchema::new(Default::default()))
}

/// The caller's answer (an `ElicitResult` as JSON): approve with a grant they were offered.
fn verdict_of(rule: &ApprovalRule, answer: Value, by: String) -> Verdict {
    let accepted = answer.get("action").and_then(Value::as_str) == Some("accept");
    let grant = answer
        .get("content")
        .and_then(|c| c.get("grant"))
        .and_then(Value::as_str)
        .and_then(|l| rule.grant(l))
        .cloned();
    Verdict {
        approve: accepted && grant.is_some(),
        by,
        grant,
    }
}

fn rec_id(rec: &CallRecord) -> Option<u64> {
    rec.approval_id()
}

fn rec_set_id(rec: &mut CallRecord, id: u64) {
    rec.approval(ApprovalNote {
        state: "requested",
        by: None,
        grant: None,
        id: Some(id),
    });
}

/// `5m`, `1h`, `30s`: a timeout as a person reads it.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// Under `[cluster]`, grants are written to Redis as well, so an approval given on one instance
/// covers the caller's calls on every instance: under a name keyed with `[cluster] secret_key` (no
/// subject or tool in it), the value sealed with it and bound to the name, expiring with the grant.
/// Redis trouble only means the grant stays on this instance.
impl Broker {
    fn grant_name(c: &crate::cluster::Cluster, key: &GrantKey) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"mcp-broker grant names\0");
        h.update(c.config.secret_key.expose().as_bytes());
        for part in [
            key.sub.as_str(),
            &key.server,
            key.tool.as_str(),
            key.args.as_deref().unwrap_or(""),
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        format!("mcpb:grant:{}", crate::hex(&h.finalize()))
    }

    async fn share_grant(&self, key: &GrantKey, grant: &GrantDuration, by: &str) {
        let (Some(c), Some(lasts)) = (&self.cluster, grant.lasts) else {
            return;
        };
        let name = Self::grant_name(c, key);
        let value = serde_json::json!({ "l": grant.label, "b": by }).to_string();
        let Ok(sealed) = c.sealer.seal(name.as_bytes(), value.as_bytes()) else {
            return;
        };
        let mut conn = c.conn();
        let mut set = redis::cmd("SET");
        set.arg(&name)
            .arg(sealed)
            .arg("PX")
            .arg(lasts.as_millis().max(1) as u64);
        let write = set.query_async::<()>(&mut conn);
        if let Ok(Err(e)) | Err(e) = tokio::time::timeout(Duration::from_secs(2), write)
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out")))
        {
            tracing::warn!(error = %e, "an approval grant was not shared through Redis (it covers this instance only)");
        }
    }

    async fn shared_grant(&self, key: &GrantKey) -> Option<(String, String)> {
        let c = self.cluster.as_ref()?;
        let name = Self::grant_name(c, key);
        let mut conn = c.conn();
        let mut pipe = redis::pipe();
        pipe.get(&name).pttl(&name);
        let read = pipe.query_async::<(Option<String>, i64)>(&mut conn);
        let (text, pttl) = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .ok()?
            .ok()?;
        let left = Duration::from_millis(u64::try_from(pttl).ok().filter(|&ms| ms > 0)?);
        let plain = c.sealer.open(name.as_bytes(), &text?).ok()?;
        let v: Value = serde_json::from_slice(&plain).ok()?;
        let (label, by) = (v["l"].as_str()?.to_string(), v["b"].as_str()?.to_string());
        // Kept here too for the rest of its life, so the next call needs no Redis round trip.
        self.approvals.record_grant(
            key.clone(),
            &GrantDuration {
                label: label.clone(),
                lasts: Some(left),
            },
            &by,
        );
        Some((label, by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn rule() -> Arc<ApprovalRule> {
        let c = Config::parse(
            Path::new("a.toml"),
            "[[policy]]\neffect = \"approve\"\napproval = \"approver\"\napprovers = { groups = [\"sec-ops\"] }\ngrant_durations = [\"once\", \"15m\"]\n",
            &|_| None,
        )
        .expect("valid");
        c.policy[0].approval.clone().expect("approval")
    }

    fn caller(sub: &str, groups: &[&str]) -> Caller {
        let mut c = Caller::anonymous();
        c.sub = sub.into();
        c.groups = groups.iter().map(|g| g.to_string()).collect();
        c
    }

    fn waiting(a: &Approvals, id: u64, who: &str) -> oneshot::Receiver<Verdict> {
        let (tx, rx) = oneshot::channel();
        let now = SystemTime::now();
        a.pending.insert(
            id,
            Arc::new(Pending {
                id,
                caller: who.into(),
                server: Arc::from("ledger"),
                tool: "ledger__update_account_status".into(),
                summary: "{}".into(),
                created: now,
                expires: now + Duration::from_secs(60),
                rule: rule(),
                decide: std::sync::Mutex::new(Some(tx)),
            }),
        );
        rx
    }

    #[test]
    fn only_other_approvers_decide_once_with_an_offered_grant() {
        let a = Approvals::default();
        let mut rx = waiting(&a, 7, "alice");
        let alice = caller("alice", &["sec-ops"]);
        let bob = caller("bob", &["sec-ops"]);
        let carol = caller("carol", &["staff"]);
        assert!(matches!(
            a.decide(7, &alice, true, None),
            Err(DecideError::OwnCall(_))
        ));
        assert!(matches!(
            a.decide(7, &carol, true, None),
            Err(DecideError::NotApprover(_))
        ));
        assert!(matches!(
            a.decide(7, &bob, true, Some("1d")),
            Err(DecideError::BadGrant(..))
        ));
        assert!(matches!(
            a.decide(8, &bob, true, None),
            Err(DecideError::NotFound(8))
        ));
        assert_eq!(a.visible_to(&bob).len(), 1);
        assert!(a.visible_to(&carol).is_empty());
        a.decide(7, &bob, true, Some("15m")).expect("decided");
        let v = rx.try_recv().expect("a verdict");
        assert!(v.approve && v.by == "bob");
        assert_eq!(v.grant.map(|g| g.label), Some("15m".to_string()));
        // Decided once only.
        assert!(matches!(
            a.decide(7, &bob, false, None),
            Err(DecideError::NotFound(7))
        ));
    }

    #[test]
    fn grants_cover_their_key_until_they_expire_and_once_is_never_kept() {
        let a = Approvals::default();
        let key = |args: Option<&str>| GrantKey {
            sub: "alice".into(),
            server: Arc::from("ledger"),
            tool: "t".into(),
            args: args.map(str::to_string),
        };
        let once = GrantDuration {
            label: "once".into(),
            lasts: None,
        };
        a.record_grant(key(None), &once, "alice");
        assert!(matches!(a.grant_for(&key(None)), Ok(None)));
        let short = GrantDuration {
            label: "1ms".into(),
            lasts: Some(Duration::from_millis(1)),
        };
        let long = GrantDuration {
            label: "1h".into(),
            lasts: Some(Duration::from_secs(3600)),
        };
        a.record_grant(key(Some("sha256:a")), &long, "bob");
        assert!(
            matches!(a.grant_for(&key(Some("sha256:a"))), Ok(Some((l, by))) if l == "1h" && by == "bob")
        );
        assert!(matches!(a.grant_for(&key(Some("sha256:b"))), Ok(None)));
        a.record_grant(key(None), &short, "alice");
        std::thread::sleep(Duration::from_millis(5));
        assert!(matches!(a.grant_for(&key(None)), Err(l) if l == "1ms"));
        assert!(matches!(a.grant_for(&key(None)), Ok(None)));
    }

    #[test]
    fn the_callers_answer_is_a_grant_they_were_offered() {
        let r = rule();
        let v = verdict_of(
            &r,
            serde_json::json!({"action": "accept", "content": {"grant": "15m"}}),
            "u".into(),
        );
        assert!(v.approve && v.grant.is_some());
        for answer in [
            serde_json::json!({"action": "accept", "content": {"grant": "deny"}}),
            serde_json::json!({"action": "accept", "content": {"grant": "1y"}}),
            serde_json::json!({"action": "decline"}),
            serde_json::json!({"action": "cancel"}),
            serde_json::Value::Null,
        ] {
            assert!(
                !verdict_of(&r, answer.clone(), "u".into()).approve,
                "{answer}"
            );
        }
        let s = schema(&r);
        let v = serde_json::to_value(&s).expect("schema");
        assert_eq!(v["required"], serde_json::json!(["grant"]));
        assert_eq!(
            v["properties"]["grant"]["enum"],
            serde_json::json!(["once", "15m", "deny"])
        );
    }

    #[test]
    fn summaries_read_like_the_call_and_stay_short() {
        let mut m = Map::new();
        m.insert("account_id".into(), "ACC-1001".into());
        m.insert("status".into(), "frozen".into());
        m.insert("n".into(), 3.into());
        assert_eq!(
            summary(Some(&m)),
            "{account_id: ACC-1001, status: frozen, n: 3}"
        );
        assert_eq!(summary(None), "no arguments");
        m.insert("long".into(), "x".repeat(2000).into());
        assert!(summary(Some(&m)).chars().count() <= SUMMARY_CAP + 2);
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(12)), "12s");
    }
}
