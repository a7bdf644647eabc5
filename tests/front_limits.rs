//! The HTTP front's limits, served in-process (`app::run` on port 0) and probed with raw sockets:
//! a request without a token is refused from its headers, slow headers and stalled bodies are cut
//! off, and past `max_connections` a new connection waits until one closes.

use std::sync::Arc;
use std::time::Duration;

use mcp_broker::app::{ServeOptions, run};
use mcp_broker::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// A broker with no upstreams serving `broker_keys` (and `[auth]` if `auth`), and what stops it.
async fn start(broker_keys: &str, auth: bool) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let mut text = format!("[broker]\nlisten = \"127.0.0.1:0\"\n{broker_keys}\n");
    if auth {
        // Never contacted: no request in these tests carries a token.
        text.push_str(
            "[auth]\nissuer = \"https://as.example\"\njwks_uri = \"http://127.0.0.1:9/jwks\"\n",
        );
    }
    let config = Config::parse(std::path::Path::new("front.toml"), &text, &|_| None).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run(
        Arc::new(config),
        listener,
        async move {
            let _ = stopped.await;
        },
        ServeOptions::default(),
    ));
    (addr, stop)
}

/// Everything the server sends until it closes the connection, or `None` if it is still open
/// (and silent) after `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&out).into_owned())
}

fn post_head(addr: std::net::SocketAddr, content_length: usize, extra: &str) -> String {
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {content_length}\r\n{extra}\r\n"
    )
}

#[tokio::test]
async fn a_request_without_a_token_is_refused_from_its_headers() {
    let (addr, _stop) = start("", true).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A megabyte announced, none of it sent: the answer cannot have waited for it.
    s.write_all(post_head(addr, 1_000_000, "").as_bytes())
        .await
        .unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .expect("no answer before the body");
    assert!(got.starts_with("HTTP/1.1 401"), "{got}");
    assert!(
        got.to_ascii_lowercase()
            .contains("www-authenticate: bearer resource_metadata="),
        "{got}"
    );
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (addr, _stop) = start("header_read_timeout = \"300ms\"", false).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /mcp HTTP/1.1\r\nHost: ").await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        got.is_some(),
        "still open 3 s after a 300 ms header timeout"
    );
    // An idle connection (no request at all) is closed the same way.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert!(
        read_until_closed(&mut idle, Duration::from_secs(3))
            .await
            .is_some()
    );
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let (addr, _stop) = start("body_read_timeout = \"300ms\"", false).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(post_head(addr, 100, "").as_bytes())
        .await
        .unwrap();
    s.write_all(b"{\"jsonrpc\":").await.unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(3))
        .await
        .expect("still open 3 s after a 300 ms body timeout");
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
}

#[tokio::test]
async fn past_the_cap_a_connection_waits_for_a_free_slot() {
    let (addr, _stop) = start("max_connections = 2", false).await;
    let a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(
        read_until_closed(&mut c, Duration::from_millis(500)).await,
        None,
        "served past the cap"
    );
    drop(a);
    let got = read_until_closed(&mut c, Duration::from_secs(3))
        .await
        .expect("not served once a slot was free");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}
