//! Tower middleware giving each `credgate.v1` RPC its SERVER span (continuing
//! the caller's W3C trace) and its `rpc.server.duration` measurement.
//!
//! It runs outside everything else, so that requests refused at the edge or
//! by tonic's decoder are traced and measured too. Health and reflection pass
//! through untraced: probes every few seconds would drown real traces. Method
//! names come from a closed set (unknown ones are `_OTHER`), so a client
//! inventing paths cannot grow span names or metric series.

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

use crate::{
    error::{Reason, reason_of},
    telemetry,
};

/// The gRPC service traced by this layer.
pub(crate) const SERVICE: &str = "credgate.v1.PasswordService";

/// A `credgate.v1.PasswordService` method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    ChangePassword,
    GetPasswordPolicy,
    /// Any other path under the service: not a method.
    Other,
}

impl Method {
    /// The method a request path names, `None` outside the service.
    pub(crate) fn of_path(path: &str) -> Option<Self> {
        let method = path
            .strip_prefix('/')?
            .strip_prefix(SERVICE)?
            .strip_prefix('/')?;
        Some(match method {
            "ChangePassword" => Self::ChangePassword,
            "GetPasswordPolicy" => Self::GetPasswordPolicy,
            _ => Self::Other,
        })
    }

    /// The name in spans and metric attributes.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ChangePassword => "ChangePassword",
            Self::GetPasswordPolicy => "GetPasswordPolicy",
            Self::Other => "_OTHER",
        }
    }

    fn span_name(self) -> &'static str {
        match self {
            Self::ChangePassword => "credgate.v1.PasswordService/ChangePassword",
            Self::GetPasswordPolicy => "credgate.v1.PasswordService/GetPasswordPolicy",
            Self::Other => "credgate.v1.PasswordService/_OTHER",
        }
    }
}

/// Adds [`RpcSpan`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RpcSpanLayer;

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcSpan { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub(crate) struct RpcSpan<S> {
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
        let Some(method) = Method::of_path(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let span = tracing::info_span!(
            "rpc",
            otel.name = method.span_name(),
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
            let (code, reason) = match &result {
                Ok(response) => {
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or(0);
                    let reason = response
                        .extensions()
                        .get::<tonic::Status>()
                        .and_then(reason_of);
                    (code, reason)
                }
                Err(_) => (tonic::Code::Unknown as i32, None),
            };
            span.record("rpc.grpc.status_code", code);
            if let Some(reason) = reason {
                span.record("error.type", reason.as_str());
            }
            if is_server_fault(tonic::Code::from(code)) {
                span.record("otel.status_code", "ERROR");
            }
            let mut attributes = vec![
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", SERVICE),
                KeyValue::new("rpc.method", method.as_str()),
                KeyValue::new("rpc.grpc.status_code", i64::from(code)),
            ];
            if let Some(reason) = reason {
                attributes.push(KeyValue::new("error.type", Reason::as_str(reason)));
            }
            telemetry::metrics()
                .rpc_server_duration
                .record(started.elapsed().as_secs_f64() * 1000.0, &attributes);
            result
        })
    }
}

/// Status codes that mark a server span as failed, per the OpenTelemetry RPC
/// conventions; the others are the caller's doing.
pub(crate) fn is_server_fault(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}
