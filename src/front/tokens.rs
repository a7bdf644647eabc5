//! `/admin/tokens`: what upstream tokens the broker keeps, and revoking them (`mcp-broker tokens`).
//!
//! `GET /admin/tokens[?sub=S]` answers `{"tokens": [summary…]}`; `DELETE /admin/tokens?sub=S
//! [&server=NAME]` (or `?server=NAME`) removes and answers `{"removed": [summary…]}`. A summary
//! never holds a secret. Only on the main listener, and only to a bearer token holding one of
//! `[auth] admin_scopes`: without `[auth]` there is no way to tell an admin, so it is not served.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::http::{plain, require_admin};
use crate::auth::Authenticator;
use crate::oauth::store::TokenStore;

pub const PATH: &str = "/admin/tokens";

const NOT_SERVED: &str = "Not Found: /admin/tokens is served only to tokens holding one of [auth] admin_scopes (needs [auth] with admin_scopes set)";

#[derive(Clone)]
struct Admin {
    store: Arc<TokenStore>,
    /// `None` = no `[auth]`: nothing is served.
    auth: Option<Arc<Authenticator>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    sub: Option<String>,
    server: Option<String>,
}

impl Filter {
    fn sub(&self) -> Option<&str> {
        self.sub.as_deref().filter(|s| !s.is_empty())
    }
    fn server(&self) -> Option<&str> {
        self.server.as_deref().filter(|s| !s.is_empty())
    }
}

pub fn router(store: Arc<TokenStore>, auth: Option<Arc<Authenticator>>) -> Router {
    Router::new().route(
        PATH,
        get(list).delete(revoke).with_state(Admin { store, auth }),
    )
}

/// The admin's subject, or the refusal to answer with.
async fn admit(a: &Admin, headers: &HeaderMap) -> Result<String, Response> {
    let Some(auth) = &a.auth else {
        return Err(plain(StatusCode::NOT_FOUND, NOT_SERVED.into()));
    };
    require_admin(auth, headers, NOT_SERVED)
        .await
        .map(|c| c.sub)
}

fn failed(e: crate::oauth::store::StoreError) -> Response {
    tracing::error!(error = %e, "token store");
    plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("token store: {e}"),
    )
}

async fn list(State(a): State<Admin>, headers: HeaderMap, Query(f): Query<Filter>) -> Response {
    if let Err(refused) = admit(&a, &headers).await {
        return refused;
    }
    match a.store.list(f.sub()).await {
        Ok(tokens) => axum::Json(serde_json::json!({ "tokens": tokens })).into_response(),
        Err(e) => failed(e),
    }
}

async fn revoke(State(a): State<Admin>, headers: HeaderMap, Query(f): Query<Filter>) -> Response {
    let admin = match admit(&a, &headers).await {
        Ok(sub) => sub,
        Err(refused) => return refused,
    };
    if f.sub().is_none() && f.server().is_none() {
        return plain(
            StatusCode::BAD_REQUEST,
            "give `sub`, `server`, or both: which tokens to revoke".into(),
        );
    }
    match a.store.remove(f.sub(), f.server()).await {
        Ok(removed) => {
            tracing::info!(
                admin = %admin,
                sub = f.sub().unwrap_or("*"),
                server = f.server().unwrap_or("*"),
                count = removed.len(),
                store = a.store.describe(),
                "upstream tokens revoked"
            );
            axum::Json(serde_json::json!({ "removed": removed })).into_response()
        }
        Err(e) => failed(e),
    }
}
