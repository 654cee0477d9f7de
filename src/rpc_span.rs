//! Tower middleware giving each `credgate.v1` RPC its SERVER span (continuing
//! the caller's W3C trace) and its `rpc.server.duration` measurement.
//!
//! It runs outside the generated service so that requests tonic rejects before
//! the handler (undecodable, oversized) are traced too. Health and reflection
//! pass through untraced: probes every few seconds would drown real traces.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::KeyValue;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry;

/// The gRPC service traced by this layer.
pub const SERVICE: &str = "credgate.v1.PasswordService";

/// Adds [`RpcSpan`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcSpan { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for RpcSpan<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(method) = req
            .uri()
            .path()
            .strip_prefix("/")
            .and_then(|p| p.strip_prefix(SERVICE))
            .and_then(|p| p.strip_prefix('/'))
            .map(str::to_owned)
        else {
            return Box::pin(self.inner.call(req));
        };
        let span = tracing::info_span!(
            "rpc",
            otel.name = format!("{SERVICE}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = SERVICE,
            rpc.method = method.as_str(),
            rpc.grpc.status_code = tracing::field::Empty,
            credgate.caller = tracing::field::Empty,
            credgate.iam_user = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // A caller without a traceparent gets a new trace: the extracted
        // context is then empty and the span becomes a root.
        let _ = span.set_parent(telemetry::extract_parent(req.headers()));
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.instrument(span.clone()).await;
            // Errors come back trailers-only, with grpc-status in the
            // headers; a success carries it in the trailers, after the body.
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                Err(_) => tonic::Code::Unknown as i32,
            };
            span.record("rpc.grpc.status_code", code);
            if is_server_fault(tonic::Code::from(code)) {
                span.record("otel.status_code", "ERROR");
            }
            telemetry::metrics().rpc_server_duration.record(
                started.elapsed().as_secs_f64() * 1000.0,
                &[
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", SERVICE),
                    KeyValue::new("rpc.method", method),
                    KeyValue::new("rpc.grpc.status_code", i64::from(code)),
                ],
            );
            result
        })
    }
}

/// Status codes that mark a server span as failed, per the OpenTelemetry RPC
/// conventions; the others are the caller's doing.
pub fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}
