//! The one place where failures become what the client sees: a JSON-RPC error, or for tools an
//! `isError` result the model can read.

use rmcp::{
    ErrorData,
    model::{CallToolResult, ContentBlock, ErrorCode},
    service::ServiceError,
};

use crate::audit::{CallRecord, Outcome};
use crate::limits::Refusal;

/// A JSON-RPC error code for "rate limited" (in the implementation-defined server error range).
pub const RATE_LIMITED: i32 = -32029;

/// Why a request produced no upstream result.
pub(super) enum Failure {
    /// A JSON-RPC error: the upstream's own, passed through, or the broker's (unknown name, bad params).
    Rpc(ErrorData),
    /// Refused before the upstream: policy, drain, session state. For tools an `isError` result.
    Refused(String),
    /// Refused by a rate limit or a concurrency cap.
    Limited(Refusal),
    /// The upstream could not be reached or did not answer; for tools an `isError` result.
    Unavailable(String),
    /// The upstream did not answer within the call's (idle) timeout.
    Timeout(String),
    /// The client cancelled, or the broker's drain deadline passed.
    Cancelled(String),
}

impl Failure {
    /// Record how the request ended (a refusal was already recorded as the decision).
    pub fn record(&self, rec: &mut CallRecord) {
        let (outcome, msg) = match self {
            Self::Rpc(e) => (Outcome::Error, e.message.to_string()),
            Self::Refused(_) | Self::Limited(_) => return,
            Self::Unavailable(m) => (Outcome::Error, m.clone()),
            Self::Timeout(m) => (Outcome::Timeout, m.clone()),
            Self::Cancelled(m) => (Outcome::Cancelled, m.clone()),
        };
        rec.finish(outcome, Some(msg));
    }

    /// As a JSON-RPC error (every method but tools/call).
    pub fn into_error(self) -> ErrorData {
        match self {
            Self::Rpc(e) => e,
            Self::Refused(m) => ErrorData::invalid_request(m, None),
            Self::Limited(r) => rate_limited_error(&r),
            Self::Unavailable(m) | Self::Timeout(m) | Self::Cancelled(m) => {
                ErrorData::internal_error(m, None)
            }
        }
    }

    /// As a tools/call answer: refusals and unavailability are results the model can read.
    pub fn into_tool_result(self) -> Result<CallToolResult, ErrorData> {
        match self {
            Self::Rpc(e) => Err(e),
            Self::Refused(m) | Self::Unavailable(m) | Self::Timeout(m) => Ok(tool_error(m)),
            Self::Limited(r) => Ok(rate_limited_result(&r)),
            Self::Cancelled(m) => Err(ErrorData::internal_error(m, None)),
        }
    }
}

pub(super) fn tool_error(msg: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(msg)])
}

/// A tool call refused by a limit: an `isError` result with the wait in `_meta`.
fn rate_limited_result(r: &Refusal) -> CallToolResult {
    let mut res = tool_error(r.message.clone());
    let mut meta = rmcp::model::MetaObject::new();
    meta.insert(
        "io.mcp-broker/retryAfterMs".into(),
        serde_json::json!(r.retry_after.as_millis() as u64),
    );
    res.meta = Some(meta);
    res
}

/// Any other request refused by a limit.
fn rate_limited_error(r: &Refusal) -> ErrorData {
    ErrorData::new(
        ErrorCode(RATE_LIMITED),
        r.message.clone(),
        Some(serde_json::json!({
            "scope": r.scope,
            "retryAfterMs": r.retry_after.as_millis() as u64,
        })),
    )
}

pub(super) fn unexpected(server: &str) -> ErrorData {
    ErrorData::internal_error(format!("server `{server}` gave an unexpected answer"), None)
}

pub(super) fn service_error(e: ServiceError) -> ErrorData {
    match e {
        ServiceError::McpError(e) => e,
        other => ErrorData::internal_error(other.to_string(), None),
    }
}

/// The first text of an `isError` result, shortened, for the audit record.
pub(super) fn tool_error_text(r: &CallToolResult) -> Option<String> {
    let text = r
        .content
        .iter()
        .find_map(|c| c.as_text().map(|t| t.text.clone()))?;
    Some(text.chars().take(200).collect())
}
