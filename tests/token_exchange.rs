//! RFC 8693 details of the token-exchange client, against a capture server standing in for the STS:
//! a real authorization server cannot be made to omit REQUIRED response fields or to show the raw
//! form it received, which is what these tests check (SPEC-CHECKLIST TX-1…TX-7). The happy path
//! against the real oidc-provider AS is in tests/e2e/test_credentials.py.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, http::HeaderMap, response::IntoResponse, routing::post};
use mcp_broker::config::{ExchangeConfig, Secret};
use mcp_broker::credentials::{CredentialError, TokenExchange};

/// One request the STS received: its form fields and headers.
type Seen = (HashMap<String, String>, HeaderMap);

#[derive(Clone, Default)]
struct Sts {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The JSON body and status to answer exchanges with.
    answer: Arc<Mutex<(u16, serde_json::Value)>>,
}

async fn token(State(sts): State<Sts>, headers: HeaderMap, body: String) -> impl IntoResponse {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let is_cc = form.get("grant_type").map(String::as_str) == Some("client_credentials");
    sts.seen.lock().unwrap().push((form, headers));
    // Let concurrent callers pile up, so single flight is really exercised.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (status, body) = if is_cc {
        (
            200,
            serde_json::json!({"access_token": "broker-own-token", "token_type": "Bearer", "expires_in": 300}),
        )
    } else {
        sts.answer.lock().unwrap().clone()
    };
    (
        axum::http::StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json")],
        body.to_string(),
    )
}

async fn start(answer: (u16, serde_json::Value)) -> (Sts, String) {
    let sts = Sts::default();
    *sts.answer.lock().unwrap() = answer;
    let app = Router::new()
        .route("/token", post(token))
        .with_state(sts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (sts, url)
}

fn client(url: &str, actor: bool) -> TokenExchange {
    TokenExchange::new(
        ExchangeConfig {
            token_endpoint: url::Url::parse(url).unwrap(),
            client_id: "mcp-broker".into(),
            client_secret: Secret::new("broker-secret"),
            secret_in_body: false,
            actor,
        },
        reqwest::Client::new(),
    )
}

fn ok() -> (u16, serde_json::Value) {
    (
        200,
        serde_json::json!({
            "access_token": "exchanged-1", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer", "expires_in": 300
        }),
    )
}

#[tokio::test]
async fn request_form_follows_rfc_8693() {
    let (sts, url) = start(ok()).await;
    let ex = client(&url, false);
    let subject = Secret::new("callers-token");
    let scopes = vec!["ledger:read".to_string()];
    let t = ex
        .exchange(
            &subject,
            "https://ledger.internal/mcp",
            &scopes,
            None,
            false,
        )
        .await
        .unwrap();
    assert_eq!(t.expose(), "exchanged-1");
    let seen = sts.seen.lock().unwrap();
    let (form, headers) = &seen[0];
    assert_eq!(
        form["grant_type"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(form["subject_token"], "callers-token");
    assert_eq!(
        form["subject_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(form["resource"], "https://ledger.internal/mcp");
    assert_eq!(form["scope"], "ledger:read");
    assert!(!form.contains_key("actor_token") && !form.contains_key("actor_token_type"));
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/x-www-form-urlencoded")
    );
    assert!(
        headers["authorization"]
            .to_str()
            .unwrap()
            .starts_with("Basic "),
        "client_secret_basic"
    );
    assert!(!form.contains_key("client_secret"));
}

#[tokio::test]
async fn logical_audience_and_actor_token() {
    let (sts, url) = start(ok()).await;
    let ex = client(&url, true);
    ex.exchange(&Secret::new("s"), "vault", &[], None, false)
        .await
        .unwrap();
    let seen = sts.seen.lock().unwrap();
    // First the broker's own client-credentials token, then the exchange carrying it as actor.
    assert_eq!(seen[0].0["grant_type"], "client_credentials");
    let form = &seen[1].0;
    assert_eq!(form["audience"], "vault");
    assert!(!form.contains_key("resource"));
    assert_eq!(form["actor_token"], "broker-own-token");
    assert_eq!(
        form["actor_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert!(!form.contains_key("scope"), "no scope asked = none sent");
}

#[tokio::test]
async fn responses_missing_required_fields_are_refused() {
    let (_sts, url) = start((
        200,
        serde_json::json!({"access_token": "x", "token_type": "Bearer"}),
    ))
    .await;
    let e = client(&url, false)
        .exchange(&Secret::new("s"), "https://u/mcp", &[], None, false)
        .await
        .unwrap_err();
    assert!(
        matches!(e, CredentialError::Exchange(ref m) if m.contains("issued_token_type")),
        "{e}"
    );
}

#[tokio::test]
async fn errors_name_the_code_and_never_the_token() {
    let (_sts, url) = start((
        400,
        serde_json::json!({"error": "invalid_target", "error_description": "eyJhbGciOi.leaked.token"}),
    ))
    .await;
    let e = client(&url, false)
        .exchange(
            &Secret::new("eyJ-callers-token"),
            "https://u/mcp",
            &[],
            None,
            false,
        )
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("invalid_target") && msg.contains("https://u/mcp"),
        "{msg}"
    );
    assert!(!msg.contains("eyJ"), "{msg}");
}

#[tokio::test]
async fn cached_and_single_flight() {
    let (sts, url) = start(ok()).await;
    let ex = Arc::new(client(&url, false));
    let subject = Secret::new("alice");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (ex, subject) = (ex.clone(), subject.clone());
        tasks.push(tokio::spawn(async move {
            ex.exchange(&subject, "https://u/mcp", &["a".into()], None, false)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().expose(), "exchanged-1");
    }
    assert_eq!(
        sts.seen.lock().unwrap().len(),
        1,
        "20 identical exchanges, one request"
    );
    ex.exchange(&subject, "https://u/mcp", &["b".into()], None, false)
        .await
        .unwrap();
    ex.exchange(
        &Secret::new("bob"),
        "https://u/mcp",
        &["a".into()],
        None,
        false,
    )
    .await
    .unwrap();
    assert_eq!(
        sts.seen.lock().unwrap().len(),
        3,
        "another scope or subject is another exchange"
    );
    ex.exchange(&subject, "https://u/mcp", &["a".into()], None, true)
        .await
        .unwrap();
    assert_eq!(
        sts.seen.lock().unwrap().len(),
        4,
        "fresh bypasses the cache"
    );
}
