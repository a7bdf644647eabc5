//! Which redirects an upstream's HTTP client follows (`follow_redirects`, http and sse servers).
//!
//! A request to an upstream carries the server's configured headers and credentials. reqwest strips
//! only `Authorization`, `Cookie` and `Proxy-Authorization` when a redirect leaves the origin, not a
//! custom `x-api-key`, so a redirect to another origin is never followed, whatever the setting. By
//! default none is: a 3xx is an error naming the status and the target. With `"same_origin"`, a
//! redirect whose scheme, host and port equal the original request's is followed, [`MAX_HOPS`] at most.

use crate::config::FollowRedirects;

/// The most redirects one request follows under `"same_origin"`.
pub const MAX_HOPS: usize = 5;

/// Why a redirect was not followed; the source of the reqwest error the request then fails with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    #[error(
        "the upstream answered HTTP {status} redirecting to {to}; redirects are not followed (follow_redirects = \"none\")"
    )]
    NotFollowed { status: u16, to: String },
    #[error(
        "the upstream answered HTTP {status} redirecting to another origin ({to}); a redirect off the server's origin is never followed with its headers or credentials"
    )]
    OtherOrigin { status: u16, to: String },
    #[error("the upstream redirected more than {MAX_HOPS} times (last HTTP {status} to {to})")]
    TooMany { status: u16, to: String },
}

/// Whether to follow a redirect answered with `status` to `next`; `previous` are the URLs requested so
/// far, the original request's first (as reqwest's `Attempt::previous`).
pub fn decide(
    mode: FollowRedirects,
    status: u16,
    next: &url::Url,
    previous: &[url::Url],
) -> Result<(), RedirectRefused> {
    let to = shown(next);
    match mode {
        FollowRedirects::None => Err(RedirectRefused::NotFollowed { status, to }),
        FollowRedirects::SameOrigin => {
            // An opaque origin (no host) equals nothing, not even itself.
            let same = previous
                .first()
                .is_some_and(|first| first.origin() == next.origin() && next.origin().is_tuple());
            if !same {
                Err(RedirectRefused::OtherOrigin { status, to })
            } else if previous.len() > MAX_HOPS {
                Err(RedirectRefused::TooMany { status, to })
            } else {
                Ok(())
            }
        }
    }
}

/// The client's redirect policy for `mode`.
pub fn policy(mode: FollowRedirects) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        match decide(
            mode,
            attempt.status().as_u16(),
            attempt.url(),
            attempt.previous(),
        ) {
            Ok(()) => attempt.follow(),
            Err(refused) => {
                tracing::warn!(error = %refused, "upstream redirect not followed");
                attempt.error(refused)
            }
        }
    })
}

/// The refusal inside `e`, if a redirect was refused: reqwest's own message ("error following
/// redirect for url (...)") does not say why.
pub fn refusal(e: &reqwest::Error) -> Option<&RedirectRefused> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return Some(r);
        }
        source = s.source();
    }
    None
}

/// A redirect target as shown in errors and logs: scheme, host, port and path; no user info, query or
/// fragment (they may carry secrets).
fn shown(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn none_follows_nothing_not_even_same_origin() {
        let from = [u("http://h:8080/mcp")];
        let e = decide(FollowRedirects::None, 307, &u("http://h:8080/new"), &from).unwrap_err();
        assert_eq!(
            e,
            RedirectRefused::NotFollowed {
                status: 307,
                to: "http://h:8080/new".into()
            }
        );
        assert!(e.to_string().contains("HTTP 307"), "{e}");
        assert!(e.to_string().contains("not followed"), "{e}");
    }

    #[test]
    fn same_origin_follows_only_scheme_host_and_port_of_the_original() {
        let m = FollowRedirects::SameOrigin;
        let from = [u("http://h:8080/old/mcp")];
        assert_eq!(decide(m, 307, &u("http://h:8080/mcp"), &from), Ok(()));
        assert_eq!(decide(m, 308, &u("http://h:8080/a?b=c"), &from), Ok(()));
        // the default port, written or not, is the same origin
        let https = [u("https://h/mcp")];
        assert_eq!(decide(m, 307, &u("https://h:443/v2/mcp"), &https), Ok(()));
        for other in [
            "http://other:8080/mcp",   // host
            "http://h:8081/mcp",       // port
            "https://h:8080/mcp",      // scheme
            "http://h/mcp",            // default port 80 is another port
            "http://sub.h:8080/mcp",   // a subdomain is another host
            "http://127.0.0.1:8080/x", // an address is another host than a name
        ] {
            let e = decide(m, 307, &u(other), &from).unwrap_err();
            assert!(
                matches!(e, RedirectRefused::OtherOrigin { .. }),
                "{other}: {e}"
            );
        }
        assert!(decide(m, 307, &u("https://h/x"), &[]).is_err());
    }

    #[test]
    fn same_origin_compares_with_the_original_request_not_the_last_hop() {
        let m = FollowRedirects::SameOrigin;
        let chain = [u("http://h:1/a"), u("http://h:1/b")];
        assert_eq!(decide(m, 307, &u("http://h:1/c"), &chain), Ok(()));
        assert!(decide(m, 307, &u("http://evil:1/c"), &chain).is_err());
    }

    #[test]
    fn hop_limit() {
        let m = FollowRedirects::SameOrigin;
        let next = u("http://h:1/next");
        let chain: Vec<_> = (0..=MAX_HOPS)
            .map(|i| u(&format!("http://h:1/{i}")))
            .collect();
        // the original plus MAX_HOPS - 1 hops so far: this is hop MAX_HOPS, followed
        assert_eq!(decide(m, 307, &next, &chain[..MAX_HOPS]), Ok(()));
        // one more is refused
        let e = decide(m, 307, &next, &chain[..MAX_HOPS + 1]).unwrap_err();
        assert!(matches!(e, RedirectRefused::TooMany { .. }), "{e}");
        assert!(e.to_string().contains("more than 5"), "{e}");
    }

    #[test]
    fn shown_targets_lose_credentials_query_and_fragment() {
        let e = decide(
            FollowRedirects::None,
            302,
            &u("http://user:pw@h:1/p?token=s3cret#f"),
            &[u("http://h:1/")],
        )
        .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("http://h:1/p"), "{m}");
        assert!(!m.contains("s3cret") && !m.contains("pw"), "{m}");
    }

    /// The policy on a real client: reqwest hands the refusal back as the error's source.
    #[tokio::test]
    async fn the_client_fails_with_the_refusal() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:9/elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        for mode in [FollowRedirects::None, FollowRedirects::SameOrigin] {
            let client = reqwest::Client::builder()
                .redirect(policy(mode))
                .build()
                .unwrap();
            let e = client
                .get(format!("http://{addr}/mcp"))
                .header("x-api-key", "secret")
                .send()
                .await
                .unwrap_err();
            assert!(e.is_redirect(), "{e}");
            let r = refusal(&e).expect("the refusal is the source");
            let expect_status = 307;
            match (mode, r) {
                (FollowRedirects::None, RedirectRefused::NotFollowed { status, to })
                | (FollowRedirects::SameOrigin, RedirectRefused::OtherOrigin { status, to }) => {
                    assert_eq!(*status, expect_status);
                    assert_eq!(to, "http://127.0.0.2:9/elsewhere");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
