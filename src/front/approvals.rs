//! `/admin/approvals`: calls waiting for an approver (`effect = "approve"`, `approval =
//! "approver"`), and deciding them (`mcp-broker approvals`).
//!
//! `GET /admin/approvals` answers `{"approvals": [pending…]}` (those the token's holder may decide);
//! `POST /admin/approvals/{id}/approve` (body `{"duration": "15m"}`, optional: the rule's first
//! grant otherwise) and `POST /admin/approvals/{id}/deny` decide one. Each is authenticated with the
//! approver's own bearer token, validated like any caller's: no admin scope is needed, being in the
//! rule's `approvers` is what counts. Nobody decides their own call (403, audited). Only on the main
//! listener, and only with `[auth]`: without it there is no way to tell an approver.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::http::{bearer, plain};
use crate::audit::ApprovalNote;
use crate::auth::{Authenticator, Caller};
use crate::broker::Broker;
use crate::broker::approvals::{DecideError, LINK_APPROVER, LINK_PATH};

pub const PATH: &str = "/admin/approvals";

const NOT_SERVED: &str = "Not Found: /admin/approvals is served only with [auth] (approvers are told apart by their tokens)";

#[derive(Clone)]
struct Approvers {
    broker: Arc<Broker>,
    /// `None` = no `[auth]`: nothing is served.
    auth: Option<Arc<Authenticator>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Decision {
    duration: Option<String>,
}

pub fn router(broker: Arc<Broker>, auth: Option<Arc<Authenticator>>) -> Router {
    let s = Approvers { broker, auth };
    Router::new()
        .route(PATH, get(list).with_state(s.clone()))
        .route(
            &format!("{PATH}/{{id}}/approve"),
            post(approve).with_state(s.clone()),
        )
        .route(
            &format!("{PATH}/{{id}}/deny"),
            post(deny).with_state(s.clone()),
        )
        .route(
            &format!("{LINK_PATH}/{{id}}/{{action}}"),
            get(link_page).post(link_decide).with_state(s),
        )
}

#[derive(serde::Deserialize)]
struct Sig {
    sig: String,
}

/// A signed link opened (GET): a page that asks to confirm with a POST, so a link previewer or
/// scanner that fetches it decides nothing.
async fn link_page(
    State(a): State<Approvers>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<Sig>,
) -> Response {
    let (Ok(n), true) = (
        id.parse::<u64>(),
        matches!(action.as_str(), "approve" | "deny"),
    ) else {
        return plain(StatusCode::NOT_FOUND, "no such approval link".into());
    };
    let Some(p) = a.broker.approvals.get(n) else {
        return page(
            StatusCode::NOT_FOUND,
            "This approval is no longer pending (decided, timed out, or cancelled).".into(),
        );
    };
    let what = format!(
        "{} asks to call {} with {}.",
        esc(&p.caller),
        esc(&p.tool),
        esc(&p.summary)
    );
    let button = if action == "approve" {
        "Approve"
    } else {
        "Deny"
    };
    let form = format!(
        "<p>{what}</p><form method=\"post\" action=\"?sig={}\"><button type=\"submit\">{button}</button></form>",
        esc(&url::form_urlencoded::byte_serialize(q.sig.as_bytes()).collect::<String>())
    );
    page(StatusCode::OK, form)
}

/// A signed link confirmed (POST, the page's form, which posts to the same URL and so carries
/// `sig` in the query): decides.
async fn link_decide(
    State(a): State<Approvers>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<Sig>,
) -> Response {
    let Ok(n) = id.parse::<u64>() else {
        return plain(StatusCode::NOT_FOUND, "no such approval link".into());
    };
    match a.broker.decide_by_link(n, &action, &q.sig) {
        Ok(p) => {
            let verb = if action == "approve" {
                "approved"
            } else {
                "denied"
            };
            let grant = (action == "approve")
                .then(|| p.rule.grants.first().map(|g| g.label.clone()))
                .flatten();
            let mut link = Caller::anonymous();
            link.sub = LINK_APPROVER.into();
            a.broker.audit_decision(
                &link,
                &p,
                ApprovalNote {
                    state: verb,
                    by: Some(LINK_APPROVER.into()),
                    grant,
                    id: Some(n),
                },
                &format!(
                    "`{}`'s call {verb} through the webhook's signed link",
                    p.caller
                ),
            );
            tracing::info!(id = n, caller = %p.caller, tool = %p.tool, "approval {verb} by signed link");
            page(StatusCode::OK, format!("<p>{} {verb}.</p>", esc(&p.tool)))
        }
        Err(e @ DecideError::BadLink) => page(StatusCode::FORBIDDEN, esc(&e.to_string())),
        Err(e) => page(StatusCode::NOT_FOUND, esc(&e.to_string())),
    }
}

fn page(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        format!("<!doctype html><html><head><meta name=\"robots\" content=\"noindex\"><title>mcp-broker approval</title></head><body>{body}</body></html>"),
    )
        .into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The token holder, or the refusal to answer with.
async fn admit(a: &Approvers, headers: &HeaderMap) -> Result<Caller, Response> {
    let Some(auth) = &a.auth else {
        return Err(plain(StatusCode::NOT_FOUND, NOT_SERVED.into()));
    };
    let Some(token) = bearer(headers) else {
        return Err(plain(
            StatusCode::UNAUTHORIZED,
            "the approver's own bearer token is required".into(),
        ));
    };
    auth.authenticate(&token)
        .await
        .map_err(|e| plain(StatusCode::UNAUTHORIZED, e.to_string()))
}

async fn list(State(a): State<Approvers>, headers: HeaderMap) -> Response {
    let who = match admit(&a, &headers).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let rules = a.broker.approval_rules();
    if !a.broker.approvals.is_known_approver(&rules, &who) {
        return plain(
            StatusCode::FORBIDDEN,
            format!("`{}` is not an approver of any policy rule", who.sub),
        );
    }
    axum::Json(serde_json::json!({ "approvals": a.broker.approvals.visible_to(&who) }))
        .into_response()
}

async fn approve(
    State(a): State<Approvers>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let d: Decision = if body.iter().all(u8::is_ascii_whitespace) {
        Decision::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(d) => d,
            Err(e) => {
                return plain(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not {{\"duration\": \"…\"}}: {e}"),
                );
            }
        }
    };
    decide(a, id, headers, true, d.duration).await
}

async fn deny(State(a): State<Approvers>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    decide(a, id, headers, false, None).await
}

async fn decide(
    a: Approvers,
    id: String,
    headers: HeaderMap,
    approve: bool,
    duration: Option<String>,
) -> Response {
    let who = match admit(&a, &headers).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let Ok(id) = id.parse::<u64>() else {
        return plain(StatusCode::NOT_FOUND, format!("no pending approval {id}"));
    };
    let verb = if approve { "approved" } else { "denied" };
    match a
        .broker
        .approvals
        .decide(id, &who, approve, duration.as_deref())
    {
        Ok(p) => {
            let grant = approve
                .then(|| {
                    duration
                        .clone()
                        .or_else(|| p.rule.grants.first().map(|g| g.label.clone()))
                })
                .flatten();
            a.broker.audit_decision(
                &who,
                &p,
                ApprovalNote {
                    state: verb,
                    by: Some(who.sub.clone()),
                    grant: grant.clone(),
                    id: Some(id),
                },
                &format!("`{}`'s call {verb} by `{}`", p.caller, who.sub),
            );
            tracing::info!(id, approver = %who.sub, caller = %p.caller, tool = %p.tool, "approval {verb}");
            axum::Json(serde_json::json!({
                "id": id.to_string(),
                "decision": verb,
                "grant": grant,
                "caller": p.caller,
                "tool": p.tool,
            }))
            .into_response()
        }
        Err(e) => {
            let status = match &e {
                DecideError::NotFound(_) => StatusCode::NOT_FOUND,
                DecideError::NotApprover(_) | DecideError::OwnCall(_) => StatusCode::FORBIDDEN,
                DecideError::BadGrant(..) => StatusCode::BAD_REQUEST,
                DecideError::BadLink => StatusCode::FORBIDDEN,
            };
            if let DecideError::OwnCall(_) | DecideError::NotApprover(_) = &e {
                a.broker.audit_refused_decision(&who, id, &e.to_string());
            }
            tracing::warn!(id, who = %who.sub, error = %e, "approval decision refused");
            plain(status, e.to_string())
        }
    }
}
