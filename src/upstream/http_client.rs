//! The Streamable HTTP client: rmcp's reqwest client, except that a custom request is POSTed here so
//! its result reaches rmcp raw ([`super::raw`]): a JSON reply is decoded here, an SSE reply's
//! response event is marked for the progress tap to unmark. Everything else (notifications,
//! responses, typed requests, the GET stream, DELETE) goes through rmcp's own implementation.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, ClientRequest, JsonRpcMessage, RequestId};
use rmcp::transport::streamable_http_client::{
    HttpStatusError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
    StreamableHttpResponseLimits,
};
use sse_stream::{Error as SseError, Sse};

use super::raw::{RawIds, mark};

type HttpError = StreamableHttpError<reqwest::Error>;

#[derive(Clone)]
pub struct RawHttpClient {
    pub inner: reqwest::Client,
    /// The HTTP status of the last `server/discover` POST (0 before any): tells a legacy server
    /// (400, 404, 405: try `initialize`) from one refusing the credential (401, 403: don't).
    pub discover_status: Arc<std::sync::atomic::AtomicU16>,
}

fn custom_request_id(message: &ClientJsonRpcMessage) -> Option<RequestId> {
    match message {
        JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::CustomRequest(_)) => {
            Some(r.id.clone())
        }
        _ => None,
    }
}

/// Requests POSTed by [`RawHttpClient`] itself: custom requests (raw results),
/// `subscriptions/listen` (whose stream may come as JSON lines) and `server/discover` (whose status
/// is kept).
fn posted_here(message: &ClientJsonRpcMessage) -> bool {
    match message {
        JsonRpcMessage::Request(r) => matches!(
            r.request,
            ClientRequest::CustomRequest(_)
                | ClientRequest::SubscriptionsListenRequest(_)
                | ClientRequest::DiscoverRequest(_)
        ),
        _ => false,
    }
}

/// The response body, failing once an SSE event (the bytes between blank lines) exceeds `max`, so
/// an upstream cannot make the broker buffer an endless event.
fn bounded_events<S, B, E>(
    body: S,
    max: usize,
) -> impl futures::Stream<Item = Result<B, std::io::Error>> + Send + 'static
where
    S: futures::Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut since = 0usize;
    let mut newline = false;
    body.map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        for &b in chunk.as_ref() {
            match b {
                b'\r' => {}
                b'\n' => {
                    if newline {
                        since = 0;
                    }
                    newline = true;
                }
                _ => {
                    newline = false;
                    since += 1;
                    if since > max {
                        return Err(std::io::Error::other(format!(
                            "an SSE event from the upstream exceeds {max} bytes"
                        )));
                    }
                }
            }
        }
        Ok(chunk)
    })
}

async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > max {
            return Err(StreamableHttpError::ResponseBodyTooLarge { max_size: max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

type Events = BoxStream<'static, Result<Sse, SseError>>;

/// `events` with the response to custom request `id` (if any) marked for the progress tap.
fn marked(events: Events, id: Option<RequestId>) -> Events {
    let Some(id) = id else {
        return events;
    };
    events
        .map(move |ev| {
            ev.map(|mut ev| {
                if let Some(m) = ev.data.as_deref().and_then(|d| mark(d, &id)) {
                    ev.data = Some(m);
                }
                ev
            })
        })
        .boxed()
}

/// The `subscriptions/listen` request's id, if `message` is one.
fn listen_id(message: &ClientJsonRpcMessage) -> Option<RequestId> {
    match message {
        JsonRpcMessage::Request(r)
            if matches!(r.request, ClientRequest::SubscriptionsListenRequest(_)) =>
        {
            Some(r.id.clone())
        }
        _ => None,
    }
}

/// Notifications on a listen stream name their subscription by the listen request's id; some
/// servers send a numeric id back as text (`"5"` for `5`), which rmcp would not match to the
/// subscription. Such an id is given back its type.
fn with_listen(events: Events, id: Option<RequestId>) -> Events {
    match id {
        Some(id) => listen_events(events, id),
        None => events,
    }
}

fn listen_events(events: Events, id: RequestId) -> Events {
    const KEY: &str = "io.modelcontextprotocol/subscriptionId";
    let text = match &id {
        RequestId::Number(n) => n.to_string(),
        RequestId::String(_) => return events,
    };
    events
        .map(move |ev| {
            ev.map(|mut ev| {
                let fixed = ev.data.as_deref().and_then(|d| {
                    let mut v: serde_json::Value = serde_json::from_str(d).ok()?;
                    let sid = v.get_mut("params")?.get_mut("_meta")?.get_mut(KEY)?;
                    if sid.as_str() != Some(text.as_str()) {
                        return None;
                    }
                    *sid = serde_json::to_value(&id).ok()?;
                    serde_json::to_string(&v).ok()
                });
                if let Some(f) = fixed {
                    ev.data = Some(f);
                }
                ev
            })
        })
        .boxed()
}

/// A body of JSON messages one after another (newline-delimited, or pretty-printed), as events:
/// some 2026-07-28 servers answer long-lived requests (`subscriptions/listen`) and calls with
/// notifications this way under `application/json`. Each message becomes an event as soon as it is
/// complete; the body's own bound (`bounded_events`) limits what one message may buffer.
fn json_lines<S, B>(body: S) -> Events
where
    S: futures::Stream<Item = Result<B, std::io::Error>> + Send + 'static,
    B: AsRef<[u8]>,
{
    let mut buf: Vec<u8> = Vec::new();
    let flush = |buf: &mut Vec<u8>, out: &mut Vec<Result<Sse, SseError>>| {
        let text = String::from_utf8_lossy(buf).trim().to_string();
        buf.clear();
        if !text.is_empty() {
            out.push(Ok(Sse {
                data: Some(text),
                ..Default::default()
            }));
        }
    };
    let events = body.flat_map(move |chunk| {
        let mut out = Vec::new();
        match chunk {
            Ok(chunk) => {
                for &b in chunk.as_ref() {
                    buf.push(b);
                    // A line ends a message once what is buffered parses as one.
                    if b == b'\n' && serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok() {
                        flush(&mut buf, &mut out);
                    }
                }
                if serde_json::from_slice::<serde::de::IgnoredAny>(&buf).is_ok() {
                    flush(&mut buf, &mut out);
                }
            }
            Err(e) => out.push(Err(SseError::Body(Box::new(e)))),
        }
        futures::stream::iter(out)
    });
    events.boxed()
}

impl RawHttpClient {
    async fn post_custom(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_token: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let id = custom_request_id(&message);
        let listen = listen_id(&message);
        let mut req = self
            .inner
            .post(uri.as_ref())
            .header(http::header::ACCEPT, "text/event-stream, application/json");
        if let Some(t) = auth_token {
            req = req.bearer_auth(t);
        }
        for (k, v) in custom_headers {
            req = req.header(k, v);
        }
        let had_session = session_id.is_some();
        if let Some(s) = session_id {
            req = req.header("mcp-session-id", s.as_ref());
        }
        let resp = req.json(&message).send().await?;
        let status = resp.status();
        if matches!(&message, JsonRpcMessage::Request(r) if matches!(r.request, ClientRequest::DiscoverRequest(_)))
        {
            self.discover_status
                .store(status.as_u16(), std::sync::atomic::Ordering::Relaxed);
        }
        if matches!(
            status,
            reqwest::StatusCode::ACCEPTED | reqwest::StatusCode::NO_CONTENT
        ) {
            return Ok(StreamableHttpPostResponse::Accepted);
        }
        if status == reqwest::StatusCode::NOT_FOUND && had_session {
            return Err(StreamableHttpError::SessionExpired);
        }
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !status.is_success() {
            // As rmcp's client: 429 and 5xx keep their status (and Retry-After) unless a JSON-RPC
            // error in the body says more.
            let status_error = (status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status.is_server_error())
            .then(|| {
                let retry_after = resp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                HttpStatusError::new(status.as_u16(), retry_after)
            });
            let body = read_bounded(resp, limits.max_error_response_size)
                .await
                .unwrap_or_default();
            // A JSON-RPC error in the body is the answer (passed on as the upstream's error).
            if let Ok(m @ JsonRpcMessage::Error(_)) =
                serde_json::from_slice::<rmcp::model::ServerJsonRpcMessage>(&body)
            {
                return Ok(StreamableHttpPostResponse::Json(m, session));
            }
            if let Some(e) = status_error {
                return Err(e.into());
            }
            return Err(StreamableHttpError::UnexpectedServerResponse(Cow::Owned(
                format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
            )));
        }
        match content_type.as_deref() {
            Some(ct) if ct.starts_with("text/event-stream") => {
                let body = bounded_events(resp.bytes_stream(), limits.max_sse_event_size);
                let events = sse_stream::SseStream::from_bytes_stream(body).boxed();
                Ok(StreamableHttpPostResponse::Sse(
                    with_listen(marked(events, id), listen),
                    session,
                ))
            }
            Some(ct) if ct.starts_with("application/json") && listen.is_some() => {
                // A long-lived request (subscriptions/listen) answered as JSON lines.
                let body = bounded_events(resp.bytes_stream(), limits.max_sse_event_size);
                Ok(StreamableHttpPostResponse::Sse(
                    with_listen(json_lines(body), listen),
                    session,
                ))
            }
            Some(ct) if ct.starts_with("application/json") => {
                let body = read_bounded(resp, limits.max_json_response_size).await?;
                let text = std::str::from_utf8(&body).map_err(|e| {
                    StreamableHttpError::UnexpectedServerResponse(Cow::Owned(e.to_string()))
                })?;
                let ids = RawIds::default();
                ids.note(&message);
                match ids.decode(text) {
                    Ok(m) => Ok(StreamableHttpPostResponse::Json(m, session)),
                    // Several messages in one JSON body (notifications, then the response): read
                    // as the stream they are, instead of failing the connection.
                    Err(e) if e.is_syntax() && e.line() > 1 => {
                        let body = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
                        Ok(StreamableHttpPostResponse::Sse(
                            marked(json_lines(body), id),
                            session,
                        ))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            other => Err(StreamableHttpError::UnexpectedContentType(
                other.map(str::to_string),
            )),
        }
    }
}

/// A refused redirect's reason as the error: reqwest's own message does not say why, and rmcp shows
/// a client error by its message alone.
fn explain(e: HttpError) -> HttpError {
    match e {
        StreamableHttpError::Client(c) => match super::redirect::refusal(&c) {
            Some(r) => StreamableHttpError::UnexpectedServerResponse(Cow::Owned(r.to_string())),
            None => StreamableHttpError::Client(c),
        },
        other => other,
    }
}

impl StreamableHttpClient for RawHttpClient {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            StreamableHttpResponseLimits::default(),
        )
        .await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        let mut limits = StreamableHttpResponseLimits::default();
        limits.max_sse_event_size = max_sse_event_size;
        self.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            limits,
        )
        .await
    }

    // What rmcp's worker calls (since 3.11): every POST goes through here.
    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> Result<StreamableHttpPostResponse, HttpError> {
        match posted_here(&message) {
            true => self
                .post_custom(
                    uri,
                    message,
                    session_id,
                    auth_header,
                    custom_headers,
                    limits,
                )
                .await
                .map_err(explain),
            false => self
                .inner
                .post_message_with_response_limits(
                    uri,
                    message,
                    session_id,
                    auth_header,
                    custom_headers,
                    limits,
                )
                .await
                .map_err(explain),
        }
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), HttpError> {
        self.inner
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
            .map_err(explain)
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        self.inner
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
            .map_err(explain)
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, HttpError> {
        self.inner
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
            .map_err(explain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sse_events_are_bounded() {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
            Ok(b"data: 12345\n\n".to_vec()),
            Ok(b"data: 1234".to_vec()),
            Ok(b"5\r\n\r\ndata: 123456789012345".to_vec()),
        ];
        let out: Vec<_> = bounded_events(futures::stream::iter(chunks), 12)
            .collect()
            .await;
        assert!(
            out[0].is_ok() && out[1].is_ok(),
            "events within the bound pass"
        );
        assert!(out[2].is_err(), "an event past the bound ends the stream");
    }
}
