//! The HTTP client every OAuth request goes through (discovery, registration, tokens), with the SSRF
//! guard for URLs learned at run time: link-local and cloud-metadata hosts never; loopback and
//! private addresses only when the server the flow is for is itself on one (a broker beside its
//! upstreams), otherwise https to a public address. Bodies are bounded; redirects are not followed
//! unless rmcp asks for it, and then only to allowed URLs.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rmcp::transport::auth::{
    OAuthHttpClient, OAuthHttpClientError, OAuthHttpClientFuture, OAuthHttpRedirectPolicy,
    OAuthHttpRequest,
};
use tokio_stream::StreamExt;

/// Largest OAuth response read (metadata documents, token responses).
const MAX_BODY: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("refusing OAuth request to {0}: {1}")]
pub struct Refused(pub String, pub &'static str);

/// The clients, built once (TLS setup is the expensive part).
pub struct Clients {
    follow: reqwest::Client,
    stop: reqwest::Client,
}

impl Clients {
    /// `ca`: PEM bundle trusted besides the system roots (`[oauth] ca_file`).
    pub fn new(ca: Option<&[u8]>) -> Result<Arc<Self>, String> {
        let build = |follow: bool| {
            let mut b = reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .connect_timeout(Duration::from_secs(5))
                .redirect(if follow {
                    reqwest::redirect::Policy::custom(|a| {
                        if a.previous().len() > 3 {
                            a.error("too many redirects")
                        } else if !allowed(a.url(), true) {
                            a.error("redirect to a disallowed address")
                        } else {
                            a.follow()
                        }
                    })
                } else {
                    reqwest::redirect::Policy::none()
                });
            if let Some(pem) = ca {
                let certs = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| format!("[oauth] ca_file: {e}"))?;
                for c in certs {
                    b = b.add_root_certificate(c);
                }
            }
            b.build().map_err(|e| e.to_string())
        };
        Ok(Arc::new(Self {
            follow: build(true)?,
            stop: build(false)?,
        }))
    }

    /// A client for flows about `base` (the upstream, or the sign-in issuer).
    pub fn for_base(self: &Arc<Self>, base: &url::Url) -> Arc<Guarded> {
        Arc::new(Guarded {
            clients: self.clone(),
            private_ok: is_private_host(base),
        })
    }
}

/// [`Clients`] with the guard set for one base URL.
pub struct Guarded {
    clients: Arc<Clients>,
    private_ok: bool,
}

impl OAuthHttpClient for Guarded {
    fn execute(&self, request: OAuthHttpRequest) -> OAuthHttpClientFuture<'_> {
        Box::pin(async move {
            let OAuthHttpRequest {
                request,
                redirect_policy,
                ..
            } = request;
            let client = match redirect_policy {
                OAuthHttpRedirectPolicy::Stop => &self.clients.stop,
                _ => &self.clients.follow,
            };
            let request = reqwest::Request::try_from(request)
                .map_err(|e| Box::new(e) as OAuthHttpClientError)?;
            if !allowed(request.url(), self.private_ok) {
                return Err(Box::new(Refused(
                    redact(request.url()),
                    "not https to a public address (nor the private network the server itself is on)",
                )) as OAuthHttpClientError);
            }
            if !self.private_ok && resolves_private(request.url()).await {
                return Err(Box::new(Refused(
                    redact(request.url()),
                    "its name resolves to a private or special address",
                )) as OAuthHttpClientError);
            }
            let response = client
                .execute(request)
                .await
                .map_err(|e| Box::new(e) as OAuthHttpClientError)?;
            let mut builder = http::Response::builder()
                .status(response.status())
                .version(response.version());
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let mut body = Vec::new();
            let mut stream = response.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| Box::new(e) as OAuthHttpClientError)?;
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(
                        Box::new(Refused("a response".into(), "body larger than 256 KiB"))
                            as OAuthHttpClientError,
                    );
                }
                body.extend_from_slice(&chunk);
            }
            builder
                .body(body)
                .map_err(|e| Box::new(e) as OAuthHttpClientError)
        })
    }
}

impl Guarded {
    /// GET a JSON document (metadata), through the guard, without following redirects.
    pub async fn get_json(&self, u: &url::Url) -> Result<serde_json::Value, String> {
        let req = self
            .clients
            .stop
            .get(u.clone())
            .header("accept", "application/json");
        let (status, value) = self.send_json(u, req).await?;
        if !(200..300).contains(&status) {
            return Err(format!("GET {}: HTTP {status}", redact(u)));
        }
        Ok(value)
    }

    /// POST a form to a token endpoint, through the guard, without following redirects, with
    /// `basic` as HTTP Basic client authentication: the status and the JSON answer (an OAuth error
    /// body too). For the grants rmcp does not make (see `enterprise`).
    pub async fn post_form(
        &self,
        u: &url::Url,
        form: &[(&str, &str)],
        basic: Option<(&str, &str)>,
    ) -> Result<(u16, serde_json::Value), String> {
        let mut req = self
            .clients
            .stop
            .post(u.clone())
            .header("accept", "application/json")
            .form(form);
        if let Some((id, secret)) = basic {
            // RFC 6749 2.3.1: each part form-urlencoded before Basic encoding.
            let enc =
                |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
            req = req.basic_auth(enc(id), Some(enc(secret)));
        }
        self.send_json(u, req).await
    }

    /// Send `req` (to `u`) if the guard allows `u`; the status and the JSON body (≤ 256 KiB).
    async fn send_json(
        &self,
        u: &url::Url,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, serde_json::Value), String> {
        if !allowed(u, self.private_ok) || (!self.private_ok && resolves_private(u).await) {
            return Err(Refused(redact(u), "not https to a public address").to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{}: {e}", redact(u)))?;
        let status = resp.status().as_u16();
        if resp.content_length().is_some_and(|n| n as usize > MAX_BODY) {
            return Err(format!("{}: body larger than 256 KiB", redact(u)));
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if body.len() + chunk.len() > MAX_BODY {
                return Err(format!("{}: body larger than 256 KiB", redact(u)));
            }
            body.extend_from_slice(&chunk);
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, serde_json::Value::Null));
        }
        let value = serde_json::from_slice(&body)
            .map_err(|e| format!("{}: HTTP {status}, not JSON: {e}", redact(u)))?;
        Ok((status, value))
    }
}

/// The URL without query (which may carry codes) for messages.
fn redact(u: &url::Url) -> String {
    let mut u = u.clone();
    u.set_query(None);
    u.to_string()
}

fn special_name(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "metadata"
        || h.starts_with("metadata.")
        || h.ends_with(".internal") && h.contains("metadata")
}

fn ip_class(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() {
                Class::Never
            } else if v4.is_loopback()
                || v4.is_private()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64
            {
                Class::Private
            } else {
                Class::Public
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return ip_class(IpAddr::V4(v4));
            }
            let seg = v6.segments()[0];
            if v6.is_unspecified() || v6.is_multicast() || (seg & 0xffc0) == 0xfe80 {
                Class::Never
            } else if v6.is_loopback() || (seg & 0xfe00) == 0xfc00 {
                Class::Private
            } else {
                Class::Public
            }
        }
    }
}

#[derive(PartialEq)]
enum Class {
    Public,
    Private,
    Never,
}

fn host_class(u: &url::Url) -> Class {
    match u.host() {
        Some(url::Host::Ipv4(ip)) => ip_class(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => ip_class(IpAddr::V6(ip)),
        Some(url::Host::Domain(d)) if special_name(d) => Class::Never,
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => Class::Private,
        Some(url::Host::Domain(_)) => Class::Public,
        None => Class::Never,
    }
}

/// Is `base` on a loopback or private address (so its authorization server may be too)?
pub fn is_private_host(base: &url::Url) -> bool {
    host_class(base) == Class::Private
}

/// The guard: never special hosts; private ones only when allowed; otherwise https only.
pub fn allowed(u: &url::Url, private_ok: bool) -> bool {
    if !matches!(u.scheme(), "http" | "https") || !u.username().is_empty() || u.password().is_some()
    {
        return false;
    }
    match host_class(u) {
        Class::Never => false,
        Class::Private => private_ok,
        Class::Public => u.scheme() == "https",
    }
}

/// Does a public-looking name resolve to a private or special address (DNS rebinding)?
async fn resolves_private(u: &url::Url) -> bool {
    let Some(url::Host::Domain(d)) = u.host() else {
        return false;
    };
    let port = u.port_or_known_default().unwrap_or(443);
    match tokio::net::lookup_host((d, port)).await {
        Ok(addrs) => addrs.into_iter().any(|a| ip_class(a.ip()) != Class::Public),
        Err(_) => false, // the request itself will fail to connect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(allowed(&u("https://as.example.com/token"), false));
        assert!(!allowed(&u("http://as.example.com/token"), false));
        assert!(!allowed(
            &u("https://169.254.169.254/latest/meta-data/"),
            true
        ));
        assert!(!allowed(&u("http://metadata.google.internal/x"), true));
        assert!(!allowed(&u("https://[fe80::1]/x"), true));
        assert!(!allowed(&u("https://10.0.0.1/x"), false));
        assert!(allowed(&u("https://10.0.0.1/x"), true));
        assert!(!allowed(&u("https://127.0.0.1:9/x"), false));
        assert!(allowed(&u("http://127.0.0.1:9/x"), true));
        assert!(!allowed(&u("https://user:pw@as.example.com/x"), false));
        assert!(is_private_host(&u("http://127.0.0.1:8000/mcp")));
        assert!(!is_private_host(&u("https://mcp.vendor.example/mcp")));
    }
}
