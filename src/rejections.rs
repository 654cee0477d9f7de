//! Tower middleware that gives tonic's own rejections of a request — too
//! large, not decodable — the same `google.rpc.Status` shape as every other
//! credgate error (one ErrorInfo with a reason), mapped by [`Error`]. tonic produces these before any handler runs, so they can only
//! be rewritten on the way out.

use crate::error::Error;

/// The layer: a plain response map, so any trailers-only rejection tonic
/// produced (for credgate.v1, health or reflection alike) gets the shape.
pub fn layer() -> tower::util::MapResponseLayer<fn(Response) -> Response> {
    tower::util::MapResponseLayer::new(with_error_info)
}

type Response = http::Response<tonic::body::Body>;

fn with_error_info(mut response: Response) -> Response {
    rewrite(response.headers_mut());
    response
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
