//! `id_jag` with `subject = "access_token"` (non-standard): the caller's own access token is
//! exchanged at the enterprise IdP that issued it for an ID-JAG, which is then redeemed at the
//! upstream's authorization server with the JWT bearer grant (RFC 7523).
//!
//! The extension exchanges an ID token or a refresh token, and rmcp's `EmaExchangeRequest` only
//! takes those, so this one variant is two form posts made here, with the same guard, the same
//! client authentication and the same checks (`issued_token_type`, a bearer token back). The
//! caller's token goes only to the IdP that issued it (as with `kind = "token_exchange"`), never
//! upstream.

use super::OAuthError;
use super::form::{Client, post, step};
use super::http::Guarded;
use crate::config::Secret;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ID_JAG: &str = "urn:ietf:params:oauth:token-type:id-jag";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What to exchange, for what.
pub struct Exchange<'a> {
    pub subject: &'a Secret,
    /// The upstream authorization server's issuer (the ID-JAG's audience).
    pub audience: &'a str,
    /// The upstream (RFC 8707).
    pub resource: &'a str,
    pub scopes: &'a [String],
}

const IDP_STEP: &str = "exchanging the caller's access token for an ID-JAG at the enterprise IdP (RFC 8693, subject = \"access_token\")";
const AS_STEP: &str =
    "redeeming the ID-JAG at the upstream's authorization server (JWT bearer grant)";

/// The upstream access token and its expiry (Unix seconds).
pub async fn exchange(
    x: &Exchange<'_>,
    idp: (&Client<'_>, &Guarded),
    upstream: (&Client<'_>, &Guarded),
    now: u64,
) -> Result<(Secret, u64), OAuthError> {
    let scope = x.scopes.join(" ");
    let mut form = vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("requested_token_type", ID_JAG),
        ("subject_token", x.subject.expose()),
        ("subject_token_type", ACCESS_TOKEN),
        ("audience", x.audience),
        ("resource", x.resource),
    ];
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    let jag = post(idp, form, IDP_STEP).await?;
    if jag.get("issued_token_type").and_then(|v| v.as_str()) != Some(ID_JAG) {
        return Err(step(
            IDP_STEP,
            "the answer's issued_token_type is not an ID-JAG",
        ));
    }
    let assertion = token_in(&jag, IDP_STEP)?;
    let got = post(
        upstream,
        vec![("grant_type", JWT_BEARER), ("assertion", &assertion)],
        AS_STEP,
    )
    .await?;
    let bearer = got
        .get("token_type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t.eq_ignore_ascii_case("bearer"));
    if !bearer {
        return Err(step(AS_STEP, "the answer's token_type is not Bearer"));
    }
    let token = token_in(&got, AS_STEP)?;
    let lifetime = got
        .get("expires_in")
        .and_then(|v| v.as_u64())
        .unwrap_or(300);
    Ok((Secret::new(token), now + lifetime))
}

fn token_in(body: &serde_json::Value, what: &'static str) -> Result<String, OAuthError> {
    body.get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .ok_or_else(|| step(what, "the answer has no access_token"))
}
