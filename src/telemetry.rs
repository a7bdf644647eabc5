//! `[telemetry]`: OpenTelemetry spans for MCP requests, exported over OTLP/HTTP (protobuf) by
//! `opentelemetry-otlp`, posted through the broker's own reqwest client ([`Transport`]).
//!
//! One span per request the pipeline handles (`mcp tools/call`, …), carried by the audit record
//! ([`crate::audit::CallRecord`]) so that it ends, with the record's server, names, decision and
//! outcome, however the request ends. Children: `mcp credential` (connection and credential) and
//! `mcp upstream` (the upstream call), whose context goes upstream as W3C `traceparent`: the HTTP
//! header of that name to HTTP upstreams, and `_meta.traceparent` in the request to upstreams on
//! 2026-07-28, the revision that reserves that key (SEP-414). An older upstream gets it in `_meta`
//! only where the client had put its own there (it is replaced, so the upstream's parent is the
//! broker's span).
//!
//! Without `[telemetry]` there is no tracer: [`RequestSpan::start`] returns `None` at once, and
//! nothing else is done per request.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// Set once at start (`[telemetry]` is read at start only).
static TRACER: OnceLock<(SdkTracerProvider, SdkTracer)> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("[telemetry]: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("[telemetry]: cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Start exporting spans (no-op without `[telemetry]`). Call inside the tokio runtime.
pub fn start(cfg: Option<&TelemetryConfig>) -> Result<(), TelemetryError> {
    let Some(cfg) = cfg else { return Ok(()) };
    if TRACER.get().is_some() {
        return Ok(());
    }
    let transport = Transport {
        client: reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()?,
        runtime: tokio::runtime::Handle::current(),
    };
    let headers: HashMap<String, String> = cfg
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.expose().to_string()))
        .collect();
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(cfg.endpoint.clone())
        .with_headers(headers)
        .with_http_client(transport)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("mcp-broker");
    let _ = TRACER.set((provider, tracer));
    tracing::info!(endpoint = %cfg.endpoint, "exporting spans over OTLP/HTTP");
    Ok(())
}

/// Export what is buffered and stop (on exit, after the drain and the audit flush).
pub fn shutdown() {
    if let Some((provider, _)) = TRACER.get()
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "[telemetry]: could not export the last spans");
    }
}

/// The exporter's HTTP client: our reqwest (rustls) on the broker's runtime. The SDK's batch
/// processor exports from its own thread, so the request is spawned onto the runtime.
#[derive(Debug)]
struct Transport {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Transport {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut req = self.client.request(parts.method, parts.uri.to_string());
        for (k, v) in &parts.headers {
            req = req.header(k, v);
        }
        let req = req.body(body);
        let sent = self.runtime.spawn(async move {
            let resp = req.send().await?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        });
        let (status, headers, body) = match sent.await? {
            Ok(r) => r,
            Err(e) => {
                export_failed(&e.to_string());
                return Err(e.into());
            }
        };
        if status.is_success() {
            EXPORT_FAILING.store(false, Ordering::Relaxed);
        } else {
            export_failed(&format!("the collector answered HTTP {status}"));
        }
        let mut out = Response::builder().status(status);
        if let Some(h) = out.headers_mut() {
            *h = headers;
        }
        Ok(out.body(body)?)
    }
}

/// Set while exports fail, so that an unreachable collector is one warning, not one per batch.
static EXPORT_FAILING: AtomicBool = AtomicBool::new(false);

fn export_failed(why: &str) {
    if EXPORT_FAILING.swap(true, Ordering::Relaxed) {
        tracing::debug!(error = why, "[telemetry]: span export failed again");
    } else {
        tracing::warn!(
            error = why,
            "[telemetry]: span export failed (spans are dropped until the collector answers)"
        );
    }
}

/// The span of one request, carried by its audit record.
pub struct RequestSpan {
    cx: Context,
    /// The `mcp upstream` child while the upstream call runs.
    upstream: Option<Context>,
}

impl RequestSpan {
    /// `None` without `[telemetry]`. `parent`: the client's `traceparent` (its `_meta`), if any.
    pub fn start(kind: &'static str, name: &str, parent: Option<&str>) -> Option<Self> {
        let (_, tracer) = TRACER.get()?;
        let parent = match parent.and_then(parse_traceparent) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let span = tracer
            .span_builder(format!("mcp {}", method_of(kind)))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("mcp.method.name", method_of(kind)),
                KeyValue::new("mcp.request.name", name.to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(Self {
            cx: parent.with_span(span),
            upstream: None,
        })
    }

    /// A child span, ended when the returned guard is dropped.
    pub fn child(&self, name: &'static str) -> Option<ChildSpan> {
        let (_, tracer) = TRACER.get()?;
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(tracer, &self.cx);
        Some(ChildSpan(self.cx.with_span(span)))
    }

    /// Start the `mcp upstream` span (once per request; a second call keeps the first).
    pub fn upstream_started(&mut self, server: &str) {
        if self.upstream.is_some() {
            return;
        }
        let Some((_, tracer)) = TRACER.get() else {
            return;
        };
        let span = tracer
            .span_builder("mcp upstream")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("mcp.server", server.to_string())])
            .start_with_context(tracer, &self.cx);
        self.upstream = Some(self.cx.with_span(span));
    }

    pub fn upstream_finished(&mut self) {
        if let Some(cx) = self.upstream.take() {
            cx.span().end();
        }
    }

    /// The W3C `traceparent` to send upstream: the upstream call's span, else the request's.
    pub fn traceparent(&self) -> String {
        let cx = self.upstream.as_ref().unwrap_or(&self.cx);
        format_traceparent(cx.span().span_context())
    }

    /// End with the audit record's facts.
    pub fn end(mut self, attributes: Vec<KeyValue>, error: Option<&str>) {
        self.upstream_finished();
        let span = self.cx.span();
        span.set_attributes(attributes);
        if let Some(e) = error {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}

/// A child span; ends on drop.
pub struct ChildSpan(Context);

impl Drop for ChildSpan {
    fn drop(&mut self) {
        self.0.span().end();
    }
}

fn method_of(kind: &str) -> &'static str {
    match kind {
        "call" | "tool" => "tools/call",
        "prompt" => "prompts/get",
        "resource" | "read" => "resources/read",
        "complete" | "completion" => "completion/complete",
        "subscribe" => "resources/subscribe",
        "unsubscribe" => "resources/unsubscribe",
        "set_level" | "setLevel" => "logging/setLevel",
        k if k.starts_with("list") => "list",
        _ => "request",
    }
}

/// `00-<32 hex>-<16 hex>-<2 hex>` (W3C Trace Context level 1).
pub fn parse_traceparent(s: &str) -> Option<SpanContext> {
    let mut parts = s.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2
        || version == "ff"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// The upstream call's W3C `traceparent`, in the upstream request's extensions: the HTTP clients
/// send it as the header of the same name.
#[derive(Debug, Clone)]
pub struct TraceParent(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let s = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let sc = parse_traceparent(s).expect("valid");
        assert_eq!(format_traceparent(&sc), s);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none()
        );
        assert!(
            parse_traceparent("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
