//! Trace context: the ids of the current span (for log lines, audit events
//! and error metadata) and the caller's W3C `traceparent`/`tracestate`.

use opentelemetry::{global, propagation::Extractor, trace::TraceContextExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Calls `f` with the current span's trace and span ids (hex when shown),
/// `None` when there is no valid span context. Allocates nothing.
pub(crate) fn with_current_ids<R>(
    f: impl FnOnce(opentelemetry::trace::TraceId, opentelemetry::trace::SpanId) -> R,
) -> Option<R> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| f(sc.trace_id(), sc.span_id()))
}

/// The trace and span id of the current span, hex-encoded; empty strings when
/// there is no valid span context.
pub(crate) fn current_ids() -> (String, String) {
    let context = tracing::Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    if sc.is_valid() {
        (sc.trace_id().to_string(), sc.span_id().to_string())
    } else {
        (String::new(), String::new())
    }
}

/// Reads W3C `traceparent`/`tracestate` from gRPC metadata (HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context from request headers; a new root when absent.
pub(crate) fn extract_parent(headers: &http::HeaderMap) -> opentelemetry::Context {
    global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}
