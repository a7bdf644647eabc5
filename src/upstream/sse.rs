//! Legacy HTTP+SSE client transport (MCP 2024-11-05), which rmcp removed in 0.11.
//!
//! `GET <url>` opens an event stream whose first `endpoint` event names the URL to POST messages to;
//! every server message then arrives as a `message` event on that stream. When the stream ends the
//! receiver closes, rmcp sees the transport closed, and the supervisor reconnects.

use std::sync::Arc;

use futures::StreamExt;
use rmcp::{
    RoleClient,
    service::{RxJsonRpcMessage, TxJsonRpcMessage},
    transport::Transport,
};
use tokio::sync::mpsc;

use super::raw::RawIds;

#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("GET {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("GET {url}: {refused}")]
    Redirect {
        url: String,
        refused: super::redirect::RedirectRefused,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("the event stream ended before its `endpoint` event")]
    NoEndpoint,
    #[error("bad `endpoint` event {0:?}: {1}")]
    BadEndpoint(String, url::ParseError),
    #[error("the `endpoint` event points at another origin ({0}); refusing to POST there")]
    ForeignEndpoint(String),
}

pub struct SseTransport {
    http: reqwest::Client,
    post_url: Arc<str>,
    headers: reqwest::header::HeaderMap,
    rx: mpsc::Receiver<RxJsonRpcMessage<RoleClient>>,
    reader: tokio::task::JoinHandle<()>,
    /// Requests sent as custom requests: their results are kept raw ([`super::raw`]).
    ids: RawIds,
}

impl SseTransport {
    pub async fn connect(
        server: Arc<str>,
        http: reqwest::Client,
        url: &url::Url,
        headers: reqwest::header::HeaderMap,
    ) -> Result<Self, SseError> {
        let resp = http
            .get(url.as_str())
            .headers(headers.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|source| match super::redirect::refusal(&source) {
                Some(r) => SseError::Redirect {
                    url: url.to_string(),
                    refused: r.clone(),
                },
                None => SseError::Connect {
                    url: url.to_string(),
                    source,
                },
            })?;
        if !resp.status().is_success() {
            return Err(SseError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        let mut events = sse_stream::SseStream::from_byte_stream(resp.bytes_stream());
        let endpoint = loop {
            match events.next().await {
                Some(Ok(ev)) if ev.event.as_deref() == Some("endpoint") => {
                    break ev.data.unwrap_or_default();
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(SseError::NoEndpoint),
            }
        };
        let post_url = url
            .join(endpoint.trim())
            .map_err(|e| SseError::BadEndpoint(endpoint.clone(), e))?;
        // The endpoint comes from the server; never let it redirect our credentials elsewhere.
        if post_url.origin() != url.origin() {
            return Err(SseError::ForeignEndpoint(post_url.to_string()));
        }
        let (tx, rx) = mpsc::channel(256);
        let ids = RawIds::default();
        let decode = ids.clone();
        let reader = tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) if ev.event.as_deref().unwrap_or("message") == "message" => {
                        let Some(data) = ev.data else { continue };
                        match decode.decode(&data) {
                            Ok(m) => {
                                if tx.send(m).await.is_err() {
                                    break;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(server = %server, error = %e, "unparsable SSE message from upstream")
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(server = %server, error = %e, "upstream SSE stream failed");
                        break;
                    }
                }
            }
            tracing::debug!(server = %server, "upstream SSE stream ended");
        });
        Ok(Self {
            http,
            post_url: post_url.as_str().into(),
            headers,
            rx,
            reader,
            ids,
        })
    }
}

impl Transport<RoleClient> for SseTransport {
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.ids.note(&item);
        let req = self
            .http
            .post(self.post_url.as_ref())
            .headers(self.headers.clone())
            .json(&item);
        async move {
            let resp = req
                .send()
                .await
                .map_err(|e| match super::redirect::refusal(&e) {
                    Some(r) => std::io::Error::other(format!("POST: {r}")),
                    None => std::io::Error::other(e),
                })?;
            if !resp.status().is_success() {
                return Err(std::io::Error::other(format!(
                    "upstream answered the POST with HTTP {}",
                    resp.status()
                )));
            }
            Ok(())
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<RxJsonRpcMessage<RoleClient>>> + Send {
        self.rx.recv()
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.reader.abort();
        Ok(())
    }
}

impl Drop for SseTransport {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
