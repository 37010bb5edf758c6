//! Traces: OpenTelemetry spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! Each RPC is a server span (`api::rpc_metrics`) whose parent is the
//! caller's W3C `traceparent`, when it sent one. Under it: `cache.read` with
//! the cache outcome as attributes (`service::read_through`), a span per
//! Redis call (`cache::redis`) and per PostgreSQL query (`store`). They are
//! `tracing` spans at debug level, so without an exporter (and below
//! `RUST_LOG=debug`) they cost next to nothing: a hit does not pay for them.
//!
//! Without an exporter, an incoming `traceparent` still gives the RPC's logs
//! its trace id, so they can be joined with the caller's trace.

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use http::HeaderMap;
use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::{
    Resource, propagation::TraceContextPropagator, runtime, trace::SdkTracerProvider,
    trace::span_processor_with_async_runtime::BatchSpanProcessor,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are exported (set once, by `telemetry::init`).
pub(super) static EXPORTING: AtomicBool = AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A tracer provider that batches spans and sends them to `endpoint` from a
/// task of the current Tokio runtime (the SDK's default batcher runs a
/// thread of its own, where tonic's exporter finds no runtime).
pub(super) fn provider(endpoint: &str, service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("OTLP exporter for {}", crate::config::redact_url(endpoint)))?;
    let batches = BatchSpanProcessor::builder(exporter, runtime::Tokio).build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(Resource::builder().with_service_name(service_name.to_string()).build())
        .build())
}

/// Keeps the exporter: `shutdown` sends the spans still queued.
#[must_use = "spans still queued are lost unless `shutdown` is awaited"]
pub struct Tracing {
    pub(super) provider: Option<SdkTracerProvider>,
}

impl Tracing {
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // It blocks until the batch task, on this runtime, has exported.
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = flushed {
                tracing::warn!(%error, "exporting the last spans failed");
            }
        }
    }
}

/// The caller's span from a W3C `traceparent` header, if it sent a valid one.
pub fn remote_parent(headers: &HeaderMap) -> Option<Context> {
    if !headers.contains_key("traceparent") {
        return None;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    parent.span().span_context().is_valid().then_some(parent)
}

/// Makes `parent` the parent of `span`, and returns the trace id they share:
/// the caller's, or when exporting without a caller's, a new one.
pub fn join(span: &tracing::Span, parent: Option<Context>) -> Option<TraceId> {
    if !exporting() {
        return parent.map(|parent| parent.span().span_context().trace_id());
    }
    if let Some(parent) = parent {
        // Fails only for a span no subscriber knows (disabled): nothing to join.
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let trace = context.span().span_context().trace_id();
    (trace != TraceId::INVALID).then_some(trace)
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_traceparent_is_the_parent_and_a_bad_one_is_ignored() {
        let mut headers = HeaderMap::new();
        assert!(remote_parent(&headers).is_none());

        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let parent = remote_parent(&headers).expect("a parent");
        assert_eq!(
            parent.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(parent.span().span_context().is_remote());

        headers.insert("traceparent", "00-not-a-trace-01".parse().unwrap());
        assert!(remote_parent(&headers).is_none());
    }
}
