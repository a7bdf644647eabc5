//! An authenticated form POST to an authorization server's endpoint, for the requests rmcp's OAuth
//! client does not make (`enterprise`, `revoke`): the broker's client authentication (HTTP Basic
//! or `client_secret_post`, RFC 6749 §2.3.1), the guard of [`super::http`], and an OAuth error
//! answer (RFC 6749 §5.2) turned into the failed step's message.

use super::OAuthError;
use super::http::Guarded;
use crate::config::Secret;

/// The broker's client at one endpoint of an authorization server.
pub struct Client<'a> {
    pub endpoint: &'a str,
    pub client_id: &'a str,
    pub client_secret: Option<&'a Secret>,
    /// `client_secret_post` rather than HTTP Basic.
    pub secret_in_body: bool,
}

/// POST `form` to `client`'s endpoint, authenticated as it; the JSON of a 200 answer (`null` when
/// it has no body, as RFC 7009's).
pub async fn post(
    (client, http): (&Client<'_>, &Guarded),
    mut form: Vec<(&str, &str)>,
    what: &'static str,
) -> Result<serde_json::Value, OAuthError> {
    let url = url::Url::parse(client.endpoint).map_err(|e| step(what, &e.to_string()))?;
    let secret = client.client_secret.map(Secret::expose);
    let basic = match secret {
        Some(s) if !client.secret_in_body => Some((client.client_id, s)),
        Some(s) => {
            form.push(("client_id", client.client_id));
            form.push(("client_secret", s));
            None
        }
        None => {
            form.push(("client_id", client.client_id));
            None
        }
    };
    let (status, body) = http
        .post_form(&url, &form, basic)
        .await
        .map_err(|e| step(what, &e))?;
    if status != 200 {
        // An OAuth error body (RFC 6749 5.2) names the error; nothing else of it is repeated.
        let text = |k: &str| body.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let detail = text("error_description")
            .chars()
            .take(200)
            .collect::<String>();
        return Err(step(
            what,
            &format!("HTTP {status} {} {detail}", text("error")),
        ));
    }
    Ok(body)
}

/// A failed `step` of a flow.
pub(super) fn step(step: &'static str, message: &str) -> OAuthError {
    OAuthError::Step {
        step,
        message: message.trim().to_string(),
    }
}
