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
use crate::oauth::revoke;
use crate::oauth::store::{StoreError, TokenEntry, TokenStore};

pub const PATH: &str = "/admin/tokens";

/// How long a revoke waits for the authorization servers' answers before answering the admin
/// (the rest go on in the background; the `tokens` CLI waits 10 s).
const UPSTREAM_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// The readable entries `sub`/`server` select, secrets included.
async fn held(
    store: &TokenStore,
    sub: Option<&str>,
    server: Option<&str>,
) -> Result<Vec<TokenEntry>, StoreError> {
    let mut out = Vec::new();
    for s in store.list(sub).await? {
        if server.is_none_or(|want| want == s.server)
            && let Some(e) = store.get(&s.sub, &s.server).await?
        {
            out.push(e);
        }
    }
    Ok(out)
}

fn failed(e: StoreError) -> Response {
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
    // The entries with their secrets, read before they go: their servers are told afterwards.
    let entries = match held(&a.store, f.sub(), f.server()).await {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    match a.store.remove(f.sub(), f.server()).await {
        Ok(removed) => {
            // Access tokens in hand for what was revoked go too.
            let engine = crate::oauth::engine();
            engine.forget_cached(f.sub(), f.server());
            // Entries removed without being readable (a damaged one) are audited here; the
            // others as their server answers.
            for r in removed.iter().filter(|r| {
                !entries
                    .iter()
                    .any(|e| e.sub == r.sub && e.server == r.server)
            }) {
                engine.audit_event(
                    &r.sub,
                    &r.server,
                    true,
                    &format!("token revoked by `{admin}`"),
                );
            }
            let upstream =
                revoke::revoked_by(engine.clone(), entries, admin.clone(), UPSTREAM_WAIT).await;
            tracing::info!(
                admin = %admin,
                sub = f.sub().unwrap_or("*"),
                server = f.server().unwrap_or("*"),
                count = removed.len(),
                store = a.store.describe(),
                "upstream tokens revoked"
            );
            axum::Json(serde_json::json!({ "removed": removed, "upstream": upstream }))
                .into_response()
        }
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn authenticator(admin_scopes: Vec<String>) -> Arc<Authenticator> {
        Arc::new(
            Authenticator::new(crate::config::AuthConfig {
                issuer: "https://idp".into(),
                jwks_uri: Some(url::Url::parse("http://127.0.0.1:9/jwks").unwrap()),
                audience: "https://mcp/mcp".into(),
                required_scopes: vec![],
                scopes_supported: vec![],
                introspection: None,
                group_claims: vec![],
                admin_scopes,
            })
            .unwrap(),
        )
    }

    async fn status(app: Router, method: &str, uri: &str, token: Option<&str>) -> (u16, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let code = resp.status().as_u16();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn not_served_without_admin_scopes() {
        let store = Arc::new(TokenStore::memory());
        for auth in [None, Some(authenticator(vec![]))] {
            for method in ["GET", "DELETE"] {
                let app = router(store.clone(), auth.clone());
                let (code, body) = status(app, method, "/admin/tokens?sub=a", Some("t")).await;
                assert_eq!(code, 404, "{method}: {body}");
                assert!(body.contains("admin_scopes"), "{body}");
            }
        }
        // With admin scopes: no token is 401, a token that does not validate is 401 too.
        let app = router(store.clone(), Some(authenticator(vec!["mcp:admin".into()])));
        assert_eq!(
            status(app.clone(), "GET", "/admin/tokens", None).await.0,
            401
        );
        assert_eq!(
            status(app, "DELETE", "/admin/tokens?sub=a", Some("not-a-jwt"))
                .await
                .0,
            401
        );
    }
}
