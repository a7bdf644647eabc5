//! Discovery: the upstream's RFC 9728 metadata (its `resource` must be the configured URL), then
//! its authorization server's RFC 8414 / OpenID metadata; `[auth] issuer`'s for signing browsers in.
//! Cached per server for an hour.

use std::time::Instant;

use rmcp::transport::auth::{AuthorizationManager, AuthorizationMetadataSource};

use super::*;

impl Engine {
    /// The upstream URL of `server` and its authorization server's metadata.
    pub(super) async fn discover(
        &self,
        server: &str,
    ) -> Result<(url::Url, Discovered), OAuthError> {
        let s = self.settings();
        let (raw_url, _) = s.servers.get(server).ok_or_else(|| {
            OAuthError::Config(format!(
                "server `{server}` has no upstream OAuth configured"
            ))
        })?;
        let url = url::Url::parse(raw_url).map_err(|e| OAuthError::Config(e.to_string()))?;
        if let Some(hit) = self.discovered.get(server)
            && hit.1.elapsed() < DISCOVERY_TTL
        {
            return Ok((url, hit.0.clone()));
        }
        let fail = |message: String| OAuthError::Discovery {
            server: server.to_string(),
            message,
        };
        // RFC 9728: the metadata's `resource` must be exactly this server.
        let prm_url = {
            let mut u = url.clone();
            let path = url.path().trim_end_matches('/');
            u.set_path(&format!("/.well-known/oauth-protected-resource{path}"));
            u.set_query(None);
            u
        };
        let prm = self.get_json(&url, &prm_url).await.map_err(&fail)?;
        let resource = prm
            .get("resource")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let same = url::Url::parse(resource).is_ok_and(|r| r == url);
        if !same {
            return Err(fail(format!(
                "its protected resource metadata names resource \"{resource}\", not {url}: refusing it"
            )));
        }
        let issuer = prm
            .get("authorization_servers")
            .and_then(|v| v.as_array())
            .and_then(|a| a.first())
            .and_then(|v| v.as_str())
            .ok_or_else(|| {
                fail("its protected resource metadata lists no authorization server".into())
            })?
            .to_string();
        let m = AuthorizationManager::new_with_oauth_http_client(url.clone(), self.http(&url))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let r = m
            .resolve_metadata()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if r.source == AuthorizationMetadataSource::LegacyEndpointFallback {
            return Err(fail(
                "its authorization server publishes no metadata".into(),
            ));
        }
        if r.metadata.issuer.as_deref() != Some(issuer.as_str()) {
            return Err(fail(format!(
                "the authorization server's metadata names issuer {:?}, not {issuer}",
                r.metadata.issuer
            )));
        }
        for u in [
            Some(&r.metadata.token_endpoint),
            Some(&r.metadata.authorization_endpoint),
            r.metadata.registration_endpoint.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if u.is_empty() {
                continue;
            }
            let ok =
                url::Url::parse(u).is_ok_and(|p| http::allowed(&p, http::is_private_host(&url)));
            if !ok {
                return Err(fail(format!(
                    "refusing endpoint {u}: not https to a public address"
                )));
            }
        }
        let d = Discovered {
            metadata: r.metadata,
            issuer,
        };
        self.discovered
            .insert(server.to_string(), (d.clone(), Instant::now()));
        Ok((url, d))
    }

    pub(super) async fn get_json(
        &self,
        base: &url::Url,
        u: &url::Url,
    ) -> Result<serde_json::Value, String> {
        self.http(base).get_json(u).await
    }

    /// A manager for flows about `url`, with its authorization server's metadata.
    pub(super) async fn manager(
        &self,
        url: &url::Url,
        d: &Discovered,
    ) -> Result<AuthorizationManager, OAuthError> {
        let mut m = AuthorizationManager::new_with_oauth_http_client(url.clone(), self.http(url))
            .await
            .map_err(|e| OAuthError::Step {
                step: "starting the OAuth client",
                message: e.to_string(),
            })?;
        m.set_metadata(d.metadata.clone());
        m.set_state_store(self.flows.clone());
        Ok(m)
    }

    /// `[auth] issuer`'s metadata (for signing browsers in).
    pub(super) async fn sign_in_manager(
        &self,
    ) -> Result<(AuthorizationManager, ExchangeConfig), PageError> {
        let (url, meta, client) = self.sign_in_metadata().await?;
        let mut m = AuthorizationManager::new_with_oauth_http_client(url.clone(), self.http(&url))
            .await
            .map_err(|e| PageError::new(500, e.to_string()))?;
        m.set_metadata(meta);
        m.set_state_store(self.flows.clone());
        Ok((m, client))
    }

    /// `[auth] issuer`, its metadata (cached like a server's) and the sign-in client.
    pub(super) async fn sign_in_metadata(
        &self,
    ) -> Result<(url::Url, AuthorizationMetadata, ExchangeConfig), PageError> {
        let s = self.settings();
        let (Some(issuer), Some(client)) = (&s.issuer, &s.sign_in) else {
            return Err(PageError::new(
                404,
                "sign-in is not configured ([auth] and [oauth] sign_in)",
            ));
        };
        let url = url::Url::parse(issuer).map_err(|e| PageError::new(500, e.to_string()))?;
        let key = format!("{SIGN_IN}:{issuer}");
        let meta = match self
            .discovered
            .get(&key)
            .filter(|h| h.1.elapsed() < DISCOVERY_TTL)
        {
            Some(h) => h.0.metadata.clone(),
            None => {
                let m =
                    AuthorizationManager::new_with_oauth_http_client(url.clone(), self.http(&url))
                        .await
                        .map_err(|e| PageError::new(502, e.to_string()))?;
                let r = m
                    .resolve_metadata()
                    .await
                    .map_err(|e| PageError::new(502, format!("discovering [auth] issuer: {e}")))?;
                self.discovered.insert(
                    key,
                    (
                        Discovered {
                            metadata: r.metadata.clone(),
                            issuer: issuer.clone(),
                        },
                        Instant::now(),
                    ),
                );
                r.metadata
            }
        };
        Ok((url, meta, client.clone()))
    }
}
