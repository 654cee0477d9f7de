//! Admission at the edge, before any handler runs or any shared slot is
//! taken, in this order:
//!
//! 1. the deadline is set from the arrival time ([`Deadline::on_arrival`]);
//! 2. a `ChangePassword` gets its audit slot, so even a request refused here
//!    leaves its one audit event;
//! 3. the caller, identified once per connection from its certificate, must
//!    be mapped (unmapped certificates take no slot at all); the request
//!    must be one credgate reads: no compressed messages (`grpc-encoding`
//!    other than `identity`), an existing method — checked here, not left
//!    to tonic, whose own refusals carry no ErrorInfo; and a
//!    `ChangePassword` is refused while the log sink is stalled
//!    (`AUDIT_UNAVAILABLE`): its audit event could not be written;
//! 4. the caller must be under `max_requests_per_caller`;
//! 5. the whole body must arrive within [`REQUEST_READ_TIMEOUT`] and fit in
//!    [`MAX_REQUEST_BYTES`]; it is read into memory that is wiped once the
//!    decoded request is done with it (it holds both passwords);
//! 6. a slot of `max_concurrent_requests` must free up before the deadline;
//! 7. the handler runs, bounded by the deadline.
//!
//! Health and reflection bypass 3–6: they must keep answering while
//! PasswordService is saturated, and they have their own small decode limits.
//! An unmapped connection is served health only: anything else is refused
//! (`CALLER_NOT_MAPPED`) and the connection is then closed.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tonic::body::Body;
use tower::Service;
use zeroize::{Zeroize as _, Zeroizing};

use crate::{
    aws::password,
    change::audit::{AuditSlot, Outcome},
    deadline::Deadline,
    error::{Error, Reason, reason_of, reject},
    net::{
        connections::{ActiveGuard, Connection},
        identity::Caller,
    },
    rpc::span::Method,
    telemetry,
    telemetry::logs::Output,
};

/// Largest request accepted. Two 128-character passwords and a UUID fit many
/// times over; anything bigger is not a password change.
pub(crate) const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// The whole request must have arrived this long after its headers: a
/// stream that sends headers and then nothing must not hold a slot.
pub(crate) const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The path prefix of `grpc.health.v1.Health`, the one service an unmapped
/// caller may use.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// What the edge hands to the handler in the request's extensions.
#[derive(Clone)]
pub(crate) struct Admitted {
    /// The mapped caller.
    pub(crate) caller: Arc<Caller>,
    /// The request's deadline, from its arrival.
    pub(crate) deadline: Deadline,
    /// The audit slot of a `ChangePassword`.
    pub(crate) audit: Option<Arc<AuditSlot>>,
}

/// Limits shared by every connection.
pub(crate) struct Limits {
    /// `server.request_timeout`.
    pub(crate) request_timeout: Duration,
    /// `server.max_concurrent_requests` slots.
    pub(crate) concurrent: Arc<Semaphore>,
    /// `server.max_requests_per_caller`.
    pub(crate) per_caller: usize,
    /// The log writer, whose stall refuses `ChangePassword`.
    pub(crate) sink: Output,
}

/// The edge around the routes of one connection.
#[derive(Clone)]
pub(crate) struct Edge<S> {
    inner: S,
    limits: Arc<Limits>,
    conn: Arc<Connection>,
}

impl<S> Edge<S> {
    pub(crate) fn new(inner: S, limits: Arc<Limits>, conn: Arc<Connection>) -> Self {
        Self {
            inner,
            limits,
            conn,
        }
    }
}

type Response = http::Response<Body>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S, B> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The routes are always ready; admission happens per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = Deadline::on_arrival(
            self.limits.request_timeout,
            req.headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
        );
        let active = self.conn.begin_request();
        // Take the service that was driven ready, leave a fresh clone.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let method = Method::of_path(req.uri().path());
        if let Err(not_mapped) = &self.conn.caller
            && !req.uri().path().starts_with(HEALTH_PATH)
        {
            // Refused below (a ChangePassword with its audit event); the
            // connection goes once this answer is out.
            self.conn.refuse();
            if method.is_none() {
                let refusal = reject(not_mapped.clone()).into_http();
                return Box::pin(async move {
                    drop(active);
                    Ok(refusal)
                });
            }
        }
        match method {
            None => Box::pin(pass_through(inner, req, deadline, active)),
            Some(method) => Box::pin(admit(
                inner,
                req,
                method,
                deadline,
                self.limits.clone(),
                self.conn.clone(),
                active,
            )),
        }
    }
}

/// Health and reflection: no identity or slot needed. Each message must fit
/// in [`MAX_REQUEST_BYTES`] (checked here on the framing, because the
/// reflection service ends a stream silently on a decode error), and a
/// stream lives at most `request_timeout`, like every other call.
async fn pass_through<S, B>(
    mut inner: S,
    req: http::Request<B>,
    deadline: Deadline,
    active: ActiveGuard,
) -> Result<Response, Infallible>
where
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    if let Err(e) = readable(req.headers()) {
        return Ok(reject(e).into_http());
    }
    let oversized = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(Framed {
            body,
            header: Vec::with_capacity(5),
            payload_left: 0,
            oversized: oversized.clone(),
            ends: Box::pin(tokio::time::sleep_until(deadline.instant())),
        })
    });
    let call = inner.call(req);
    let response = match tokio::time::timeout_at(deadline.instant(), call).await {
        Ok(Ok(_)) if oversized.load(Ordering::Acquire) => too_large().into_http(),
        Ok(Ok(response)) => with_details(response),
        Err(_) => Error::DeadlineBeforeSend { stage: "handler" }
            .rejection()
            .into_status()
            .into_http(),
    };
    // Streams (reflection, health Watch) count as activity until they end.
    Ok(response.map(|body| {
        Body::new(Tracked {
            body,
            oversized,
            ends: Box::pin(tokio::time::sleep_until(deadline.instant())),
            _active: active,
        })
    }))
}

fn too_large() -> tonic::Status {
    reject(Error::RequestTooLarge {
        limit: MAX_REQUEST_BYTES,
    })
}

/// A request body checked frame by frame: the first gRPC message whose
/// length prefix exceeds [`MAX_REQUEST_BYTES`] ends the body there (nothing
/// of it is buffered) and marks the request as oversized. It also ends at
/// the request's deadline: a handler reading a client stream (reflection
/// reads it in a task of its own) then lets go of it, so that the HTTP/2
/// stream is reset once its response side is dropped too.
struct Framed<B> {
    body: B,
    /// The 5-byte message prefix being read.
    header: Vec<u8>,
    /// Bytes of the current message still to pass through.
    payload_left: usize,
    oversized: Arc<AtomicBool>,
    /// The request's deadline.
    ends: Pin<Box<tokio::time::Sleep>>,
}

impl<B> Framed<B> {
    /// Follows the framing through `data`; false once a message is too big.
    fn admit(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(data.len());
                self.payload_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.header.clear();
                if len > MAX_REQUEST_BYTES {
                    return false;
                }
                self.payload_left = len;
            }
        }
        true
    }
}

impl<B> http_body::Body for Framed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.oversized.load(Ordering::Acquire) || self.ends.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(data) = frame.data_ref()
        {
            let data = data.clone();
            if !self.admit(&data) {
                self.oversized.store(true, Ordering::Release);
                return Poll::Ready(None);
            }
        }
        frame
    }
}

/// A `PasswordService` request through the steps of the module docs, in
/// their order; the first step that fails refuses it (and closes its audit
/// slot with the reason).
async fn admit<S, B>(
    inner: S,
    req: http::Request<B>,
    method: Method,
    deadline: Deadline,
    limits: Arc<Limits>,
    conn: Arc<Connection>,
    _active: ActiveGuard,
) -> Result<Response, Infallible>
where
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    let audit = open_audit_slot(&conn, method);
    let admitted = async {
        let caller = mapped(&conn)?;
        readable(req.headers())?;
        known(method)?;
        auditable(method, &limits)?;
        let _per_caller = per_caller_slot(&caller, &limits)?;
        let (parts, body) = req.into_parts();
        let body = read_in_time(body, deadline).await?;
        let _slot = concurrency_slot(&limits, deadline).await?;
        let admitted = Admitted {
            caller,
            deadline,
            audit: audit.clone(),
        };
        Ok::<_, Error>(handle(inner, parts, body, admitted).await)
    };
    let response = match admitted.await {
        Ok(response) => response,
        Err(refusal) => {
            if let Some(slot) = &audit {
                slot.close(Outcome::of(refusal.reason().as_str()));
            }
            return Ok(reject(refusal).into_http());
        }
    };
    // A rejection from before the handler (an undecodable body) closes the
    // slot; an attempt that was handed off closes it itself, later.
    if let Some(slot) = &audit
        && !slot.handed_off()
    {
        let reason = response
            .extensions()
            .get::<tonic::Status>()
            .and_then(reason_of)
            .map_or("OK", Reason::as_str);
        slot.close(Outcome::of(reason));
    }
    Ok(response)
}

/// Step 2: names the caller on the call's span and, for a
/// `ChangePassword`, opens its audit slot: from here on, whatever happens
/// to the request leaves its one audit event.
fn open_audit_slot(conn: &Connection, method: Method) -> Option<Arc<AuditSlot>> {
    let (presented_caller, iam_user) = match &conn.caller {
        Ok(c) => (c.identity.as_str(), c.iam_user.as_str()),
        Err(Error::CallerNotMapped { presented }) => (presented.as_str(), ""),
        Err(_) => ("", ""),
    };
    let span = tracing::Span::current();
    span.record("credgate.caller", presented_caller);
    if !iam_user.is_empty() {
        span.record("credgate.iam_user", iam_user);
    }
    (method == Method::ChangePassword).then(|| {
        let (trace_id, _) = telemetry::current_ids();
        Arc::new(AuditSlot::open(
            presented_caller,
            conn.caller.as_ref().ok().and_then(|c| c.template.clone()),
            iam_user,
            Some(conn.peer),
            trace_id,
        ))
    })
}

/// Step 3: the caller its certificate maps to.
fn mapped(conn: &Connection) -> Result<Arc<Caller>, Error> {
    conn.caller.clone()
}

/// Step 3: a method of the service (tonic would refuse others without an
/// ErrorInfo).
fn known(method: Method) -> Result<(), Error> {
    match method {
        Method::Other => Err(Error::UnknownMethod),
        Method::ChangePassword | Method::GetPasswordPolicy => Ok(()),
    }
}

/// Step 3: no `ChangePassword` while the log sink is stalled: its audit
/// event could not be written.
fn auditable(method: Method, limits: &Limits) -> Result<(), Error> {
    if method == Method::ChangePassword && limits.sink.stalled() {
        return Err(Error::AuditUnavailable);
    }
    Ok(())
}

/// Step 4: one of the caller's `max_requests_per_caller` slots, at once.
fn per_caller_slot(caller: &Caller, limits: &Limits) -> Result<OwnedSemaphorePermit, Error> {
    caller
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::CallerConcurrencyExceeded {
            limit: limits.per_caller,
        })
}

/// Step 5: the whole body, within [`REQUEST_READ_TIMEOUT`] and the deadline.
async fn read_in_time<B>(body: B, deadline: Deadline) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    let read_by = deadline
        .instant()
        .min(Instant::now() + REQUEST_READ_TIMEOUT);
    tokio::time::timeout_at(read_by, read_body(body))
        .await
        .unwrap_or(Err(Error::DeadlineBeforeSend { stage: "body" }))
}

/// Step 6: a slot of `max_concurrent_requests`, before the deadline.
async fn concurrency_slot(
    limits: &Limits,
    deadline: Deadline,
) -> Result<OwnedSemaphorePermit, Error> {
    match tokio::time::timeout_at(
        deadline.instant(),
        limits.concurrent.clone().acquire_owned(),
    )
    .await
    {
        Ok(Ok(permit)) => Ok(permit),
        // The semaphore is never closed; a timeout is the only way here.
        Ok(Err(_)) | Err(_) => Err(Error::DeadlineBeforeSend { stage: "queue" }),
    }
}

/// Step 7: the handler, given the body and what the edge learnt, bounded
/// by the deadline.
async fn handle<S>(
    mut inner: S,
    parts: http::request::Parts,
    body: Bytes,
    admitted: Admitted,
) -> Response
where
    S: Service<http::Request<Body>, Response = Response, Error = Infallible>,
{
    let deadline = admitted.deadline;
    let audit = admitted.audit.clone();
    let mut req = http::Request::from_parts(parts, Body::new(Full::new(body)));
    // From here the body is tonic's to decode; its memory is wiped when the
    // last reference to it goes (see `read_body`).
    req.extensions_mut().insert(admitted);
    let call = inner.call(req);
    // The handler answers by the deadline itself; this only catches a
    // handler that could not run in time.
    match tokio::time::timeout_at(deadline.fallback(), call).await {
        Ok(Ok(response)) => with_details(response),
        Err(_) => {
            let err = match &audit {
                Some(slot) if slot.handed_off() => Error::OutcomeUnknown {
                    aws: None,
                    cause: None,
                },
                _ => Error::DeadlineBeforeSend { stage: "handler" },
            };
            reject(err).into_http()
        }
    }
}

/// The whole request body, copied into one buffer of credgate's own that is
/// wiped when the last `Bytes` of it is dropped: it holds both passwords.
/// Its capacity is fixed up front, so no reallocation leaves a copy behind.
///
/// Not wiped, because credgate does not own them: rustls's and h2's receive
/// buffers (reused for the connection's next bytes), and tonic's decode
/// buffer, a copy of the message that tonic frees right after decoding.
/// A frame handed over whole (the usual case is one shared with h2's read
/// buffer) is wiped too when this was its last reference.
async fn read_body<B>(mut body: B) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    let mut buffer = Zeroizing::new(Vec::with_capacity(MAX_REQUEST_BYTES));
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(Error::RequestMalformed(
                "the request body could not be read".to_owned(),
            ));
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() + data.len() > MAX_REQUEST_BYTES {
            return Err(Error::RequestTooLarge {
                limit: MAX_REQUEST_BYTES,
            });
        }
        buffer.extend_from_slice(&data);
        if let Ok(mut only) = data.try_into_mut() {
            only.zeroize();
        }
    }
    Ok(password::wiped_on_drop(buffer))
}

/// Whether credgate can read the request's messages: uncompressed only.
/// Checked here, on the header, before tonic would refuse it with a bare
/// UNIMPLEMENTED of its own.
fn readable(headers: &http::HeaderMap) -> Result<(), Error> {
    match headers.get("grpc-encoding") {
        None => Ok(()),
        Some(encoding) if encoding.as_bytes() == b"identity" => Ok(()),
        Some(_) => Err(Error::CompressionUnsupported),
    }
}

/// The error credgate reports for a status tonic produced itself (no
/// details: every status credgate builds has an ErrorInfo). Compression and
/// unknown methods are refused before tonic sees them, so what is left is
/// message decoding; matched on tonic's codes, never its messages.
fn own_rejection(status: &tonic::Status) -> Option<Error> {
    if !status.details().is_empty() {
        return None;
    }
    match status.code() {
        tonic::Code::Ok => None,
        tonic::Code::OutOfRange => Some(Error::RequestTooLarge {
            limit: MAX_REQUEST_BYTES,
        }),
        // prost's decode errors name the field and wire type, never a value.
        tonic::Code::Internal => Some(Error::RequestMalformed(status.message().to_owned())),
        // Anything else tonic answers on its own is a refusal credgate did
        // not foresee: still one reason, never a bare status (or "OK" in
        // the audit). The handler did not run, so IAM was not called.
        _ => Some(Error::Internal {
            maybe_sent: false,
            iam_outcome: None,
            aws: None,
        }),
    }
}

/// A trailers-only rejection by tonic, given credgate's ErrorInfo.
fn with_details(response: Response) -> Response {
    match response
        .extensions()
        .get::<tonic::Status>()
        .and_then(own_rejection)
    {
        Some(err) => reject(err).into_http(),
        None => response,
    }
}

/// A response body that keeps its request counted as activity until it
/// ends, ends it at the request's deadline, and gives mid-stream rejections
/// (a reflection message over the limit) credgate's ErrorInfo.
///
/// The deadline here ends a stream cleanly, with a status, but only while
/// hyper polls this body: a client that keeps its flow-control window
/// closed stops that. The stream's own timer (its task in
/// `connections::StreamExecutor`) resets such a stream at `request_timeout`.
struct Tracked {
    body: Body,
    /// Set by the request's [`Framed`] body.
    oversized: Arc<AtomicBool>,
    /// When the stream is cut if still open.
    ends: Pin<Box<tokio::time::Sleep>>,
    _active: ActiveGuard,
}

impl Tracked {
    /// A trailers frame carrying `status`.
    fn trailers(status: &tonic::Status) -> http_body::Frame<Bytes> {
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            tracing::warn!(error = %e, "cannot encode a rejection's details");
        }
        http_body::Frame::trailers(trailers)
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.ends.as_mut().poll(cx).is_ready() {
            // Past request_timeout: no stream outlives it (a reflection
            // stream held open would otherwise live as long as its
            // connection). The stream ends here with this status.
            let cut = reject(Error::DeadlineBeforeSend { stage: "stream" });
            self.ends
                .as_mut()
                .reset(tokio::time::Instant::now() + Duration::from_secs(3600 * 24 * 365));
            self.oversized.store(true, Ordering::Release);
            return Poll::Ready(Some(Ok(Self::trailers(&cut))));
        }
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        match frame {
            Poll::Ready(Some(Ok(frame)))
                if frame.is_trailers() && self.oversized.load(Ordering::Acquire) =>
            {
                Poll::Ready(Some(Ok(Self::trailers(&too_large()))))
            }
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                let mut frame = frame;
                if let Some(trailers) = frame.trailers_mut()
                    && let Some(err) =
                        tonic::Status::from_header_map(trailers).and_then(|s| own_rejection(&s))
                {
                    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
                        trailers.remove(name);
                    }
                    if let Err(e) = reject(err).add_header(trailers) {
                        tracing::warn!(error = %e, "cannot encode a rejection's details");
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::span::SERVICE;

    fn path(method: &str) -> String {
        format!("/{SERVICE}/{method}")
    }

    #[test]
    fn only_password_service_paths_are_admitted() {
        assert_eq!(
            Method::of_path(&path("ChangePassword")),
            Some(Method::ChangePassword)
        );
        assert_eq!(
            Method::of_path(&path("Bogus")),
            Some(Method::Other),
            "made-up methods still pass the edge"
        );
        assert_eq!(Method::of_path("/grpc.health.v1.Health/Check"), None);
    }
}
