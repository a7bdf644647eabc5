//! `GET /oauth/start` and `GET /oauth/callback`: the browser side of upstream consent and of the
//! enterprise sign-in (`crate::oauth`). A cookie (`mcpb_oauth`, HttpOnly, SameSite=Lax) ties a
//! callback to the browser its flow started in; the pages are plain HTML with nothing from the
//! request echoed unescaped.

use std::collections::HashMap;

use axum::Router;
use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::oauth::{Outcome, PageError, engine};

const COOKIE: &str = "mcpb_oauth";

pub fn routes(secure: bool) -> Router {
    Router::new()
        .route(
            "/oauth/start",
            get(move |q: Query<HashMap<String, String>>, h: HeaderMap| start(q, h, secure)),
        )
        .route(
            "/oauth/callback",
            get(move |q: Query<HashMap<String, String>>, h: HeaderMap| callback(q, h, secure)),
        )
}

/// The browser's flow cookie, or a new one (then it is set on the answer).
fn browser(h: &HeaderMap) -> (String, bool) {
    let found = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, v)| *k == COOKIE && v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(_, v)| v.to_string());
    match found {
        Some(v) => (v, false),
        None => {
            let mut b = [0u8; 32];
            let _ = getrandom::fill(&mut b);
            (crate::hex(&b), true)
        }
    }
}

async fn start(Query(q): Query<HashMap<String, String>>, h: HeaderMap, secure: bool) -> Response {
    let (id, new) = browser(&h);
    let Some(link) = q.get("t") else {
        return page(
            Err(PageError {
                status: 400,
                message: "no link".into(),
            }),
            None,
        );
    };
    let r = engine().start(link, &id).await;
    page(r, new.then(|| cookie(&id, secure)))
}

async fn callback(
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    secure: bool,
) -> Response {
    let (id, new) = browser(&h);
    let r = engine().callback(&q, &id).await;
    page(r, new.then(|| cookie(&id, secure)))
}

fn cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/oauth; HttpOnly; SameSite=Lax; Max-Age=3600{}",
        if secure { "; Secure" } else { "" }
    )
}

fn page(r: Result<Outcome, PageError>, set_cookie: Option<String>) -> Response {
    let mut resp = match r {
        Ok(Outcome::Redirect(to)) => {
            let mut resp = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            resp
        }
        Ok(Outcome::Done(msg)) => html(StatusCode::OK, "Connected", &msg),
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            html(status, "Not connected", &e.message)
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    if let Some(c) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    resp
}

fn html(status: StatusCode, title: &str, msg: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>mcp-broker: {}</title><h1>{}</h1><p>{}</p>",
        esc(title),
        esc(title),
        esc(msg)
    );
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}
