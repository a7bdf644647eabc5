//! The bench's own identity provider, in process: a JWKS document for the broker's `[auth]`, an
//! RFC 8693 token endpoint for `[credentials.sts]`, and the caller tokens the load generator sends.
//!
//! The signing key is a fixed Ed25519 key made for this benchmark only (generated with
//! `openssl genpkey -algorithm ed25519 -outform DER`); it protects nothing.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::{
    Json, Router,
    extract::State,
    routing::{get, post},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// PKCS#8 (v1) DER of the bench-only Ed25519 private key.
const SIGNING_KEY_PKCS8_HEX: &str = "302e020100300506032b65700422042035479b769b615f17562692f61493b06cce0e53e3744ac7dd03fd4aa26492970f";
/// Its public key, base64url: the JWK `x`.
const PUBLIC_KEY_X: &str = "PduXc587VRPl5P4FCrDTIt_jvg-_jLqBtOI9ibzKQo4";
const KEY_ID: &str = "bench-ed25519";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What the broker's `[auth]` must accept as the token's `aud`.
pub const BROKER_AUDIENCE: &str = "urn:mcp-broker:bench";
/// The scopes every bench caller holds; the `[[policy]]` rules the bench writes need them.
pub const CALLER_SCOPES: &str = "mcp:tools ledger:read";

/// Request counters, so the report can show that exchanged tokens were really cached.
#[derive(Default)]
pub struct Counters {
    pub jwks_fetches: AtomicU64,
    pub exchanges: AtomicU64,
}

pub struct Idp {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    pub counters: Arc<Counters>,
    key: EncodingKey,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Idp {
    /// Serve `/jwks` and `/token` on a free loopback port.
    pub async fn start() -> Result<Self, String> {
        let counters = Arc::new(Counters::default());
        let app = Router::new()
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .with_state(counters.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot bind the bench IdP: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot read the IdP's address: {e}"))?;
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("bench IdP stopped: {e}");
            }
        });
        let key = EncodingKey::from_ed_der(&decode_hex(SIGNING_KEY_PKCS8_HEX));
        Ok(Self {
            issuer: format!("http://{addr}"),
            jwks_uri: format!("http://{addr}/jwks"),
            token_endpoint: format!("http://{addr}/token"),
            counters,
            key,
            server,
        })
    }

    /// A caller's access token for the broker, valid for an hour.
    pub fn caller_token(&self, sub: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({
            "iss": self.issuer,
            "sub": sub,
            "aud": BROKER_AUDIENCE,
            "client_id": "mcp-broker-bench",
            "scope": CALLER_SCOPES,
            "groups": ["finance"],
            "iat": now,
            "exp": now + 3600,
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KEY_ID.into());
        header.typ = Some("at+jwt".into());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("cannot sign the bench caller token: {e}"))
    }
}

async fn jwks(State(counters): State<Arc<Counters>>) -> Json<Value> {
    counters.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": PUBLIC_KEY_X,
            "kid": KEY_ID, "alg": "EdDSA", "use": "sig",
        }]
    }))
}

/// An RFC 8693 token endpoint that grants every exchange: the token it issues is opaque to the
/// ledger, which does not check credentials; what is measured is the broker's side.
async fn token(
    State(counters): State<Arc<Counters>>,
    body: String,
) -> Result<Json<Value>, (axum::http::StatusCode, Json<Value>)> {
    let exchange = url::form_urlencoded::parse(body.as_bytes())
        .any(|(k, v)| k == "grant_type" && v == TOKEN_EXCHANGE);
    if !exchange {
        return Err((
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        ));
    }
    let n = counters.exchanges.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(Json(json!({
        "access_token": format!("bench-exchanged-{n}"),
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 3600,
    })))
}

fn decode_hex(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16).expect("the key constant is hex") as u8;
            digit(pair[0]) << 4 | digit(pair[1])
        })
        .collect()
}
