//! Tower middleware that gives tonic's own rejections of a `credgate.v1`
//! request — too large, not decodable — the same `google.rpc.Status` shape
//! as every other credgate error (one ErrorInfo with a reason), mapped by
//! [`Error`]. tonic produces these before any handler runs, so they can only
//! be rewritten on the way out.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tower::{Layer, Service};

use crate::{error::Error, rpc_span::SERVICE};

/// Adds [`Rejections`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RejectionsLayer;

impl<S> Layer<S> for RejectionsLayer {
    type Service = Rejections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rejections { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Rejections<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Rejections<S>
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
        let ours = req.uri().path().starts_with(&format!("/{SERVICE}/"));
        let future = self.inner.call(req);
        Box::pin(async move {
            let mut response = future.await?;
            if ours {
                rewrite(response.headers_mut());
            }
            Ok(response)
        })
    }
}

/// Replaces a trailers-only tonic rejection that carries no details.
fn rewrite(headers: &mut http::HeaderMap) {
    if headers.contains_key("grpc-status-details-bin") {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else {
        return;
    };
    let message = status.message();
    let err = match status.code() {
        tonic::Code::OutOfRange if message.contains("message length too large") => {
            Error::RequestTooLarge(message.to_owned())
        }
        // prost's errors name the field and wire type, never a value.
        tonic::Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Error::RequestMalformed(message.to_owned())
        }
        _ => return,
    };
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    if let Err(e) = tonic::Status::from(err).add_header(headers) {
        tracing::warn!(error = %e, "cannot encode the rejection's details");
    }
}
