//! The mTLS listener: accepts TCP, completes the handshake with
//! [`crate::net::tls`]'s config, resolves the caller once per connection, and
//! serves HTTP/2 with bounds on everything a client controls.
//!
//! - at most `max_connections` connections, handshakes included; beyond it
//!   new connections wait in the kernel's backlog, unless some connection
//!   has not sent its TLS ClientHello yet: the one that has waited longest
//!   is closed to make room (the way HAProxy's `timeout client-hs` and
//!   Envoy's overload manager treat handshakes that make no progress);
//! - the handshake itself is bounded in time, in slots and per source
//!   address ([`super::handshake`]);
//! - accept errors (file descriptors exhausted) back off instead of
//!   spinning; [`raise_fd_limit`] lifts the soft descriptor limit first;
//! - the HTTP/2 preface must arrive within [`PREFACE_TIMEOUT`] of the
//!   handshake;
//! - each client identity may hold `max_connections_per_caller`
//!   connections, and every unmapped identity shares one budget of that
//!   size; a connection over its identity's budget is told so (GOAWAY
//!   `ENHANCE_YOUR_CALM`) and closed. An unmapped connection is served
//!   health only, and is closed [`REFUSED_LINGER`] after its first refused
//!   call (once no call is in flight) or [`UNMAPPED_IDLE_TIMEOUT`] without a
//!   call;
//! - [`MAX_CONCURRENT_STREAMS`] streams per connection, small flow-control
//!   windows (what one connection can make credgate buffer), keepalive
//!   PINGs; every stream is reset when `request_timeout` has passed since it
//!   opened, whatever the client does with its flow-control window;
//! - `idle_timeout` without a request, or `max_connection_age` in all, ends a
//!   connection with GOAWAY (in-flight calls finish within a grace period),
//!   so that CA, CRL and caller changes reach long-lived channels too.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hyper::server::conn::http2;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError},
    time::Instant,
};
use tokio_rustls::server::TlsStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    budget::{Budgets, LogThrottle},
    handshake::Handshakes,
};
use crate::{
    error::Error,
    net::identity::{Caller, Callers, PeerIdentity},
    net::tls::ReloadingConfig,
};

/// How long after the handshake the HTTP/2 preface must have arrived.
pub(crate) const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection refused for its identity's budget may take to
/// send its preface, and then to take the GOAWAY.
const REFUSAL_BUDGET: Duration = Duration::from_secs(1);
/// An unmapped connection without a call for this long is closed (or
/// sooner, at `idle_timeout`): it may only ask for health.
pub(crate) const UNMAPPED_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// After an unmapped caller was refused, its connection goes once it has
/// been this long without a call. Not at once: a client that sends its next
/// call on the same channel right after the refusal would otherwise race the
/// GOAWAY and see a transport error instead of `CALLER_NOT_MAPPED`.
const REFUSED_LINGER: Duration = Duration::from_millis(500);
/// Streams a client may open at once on one connection (advertised in
/// SETTINGS). A caller needs a few; hundreds only serve to starve others.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 32;
/// Per-stream receive window: a request is at most 4 KiB
/// ([`crate::rpc::edge::MAX_REQUEST_BYTES`]) plus its 5-byte gRPC prefix.
pub(crate) const STREAM_WINDOW: u32 = 8 * 1024;
/// Per-connection receive window: HTTP/2's initial 65,535 bytes, never
/// enlarged. With [`STREAM_WINDOW`] × [`MAX_CONCURRENT_STREAMS`] above it,
/// this is what one connection can make credgate buffer
/// (docs/operations.md, "Memory and connections").
pub(crate) const CONNECTION_WINDOW: u32 = 65_535;
/// Largest header block accepted.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Keepalive PINGs find dead peers; a peer that does not answer is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// File descriptors credgate needs besides its mTLS connections: listeners,
/// the admin port's connections, IAM/STS/Redis/OTLP pools, files.
const SPARE_FDS: u64 = 256;

/// Connection limits from `[server]`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_connections: usize,
    /// Connections per client identity; also the one budget every unmapped
    /// identity shares.
    pub(crate) max_connections_per_caller: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connection_age: Duration,
    /// No stream lives longer than this after it opened.
    pub(crate) request_timeout: Duration,
    /// How long in-flight calls get after a GOAWAY.
    pub(crate) grace: Duration,
}

/// The HTTP/2 service of one connection.
pub(crate) trait MakeService: Send + Sync + 'static {
    /// The service.
    type Service: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static;

    /// The service for `conn`.
    fn make(&self, conn: Arc<Connection>) -> Self::Service;
}

/// One established connection, as the RPC layer sees it: who the caller
/// is, and whether requests are in flight (for the idle timeout).
pub(crate) struct Connection {
    /// The TCP peer.
    pub(crate) peer: SocketAddr,
    /// The caller its certificate maps to, resolved once after the handshake.
    pub(crate) caller: Result<Arc<Caller>, Error>,
    /// Requests in flight and the time of the last one, for the idle timeout.
    active: AtomicUsize,
    last_active_ms: AtomicU64,
    opened: Instant,
    /// Cancelled once an unmapped caller was refused: the connection is
    /// then closed (it has nothing more to ask for).
    refused: CancellationToken,
}

impl Connection {
    pub(crate) fn new(peer: SocketAddr, caller: Result<Arc<Caller>, Error>) -> Self {
        Self {
            peer,
            caller,
            active: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            opened: Instant::now(),
            refused: CancellationToken::new(),
        }
    }

    /// Resolves once an unmapped caller was refused on this connection.
    pub(crate) async fn refused(&self) {
        self.refused.cancelled().await;
    }

    /// An unmapped caller was refused: the connection goes once this
    /// answer is out (it has nothing more to ask for).
    pub(crate) fn refuse(&self) {
        self.refused.cancel();
    }

    /// A request begins; it counts as activity until the guard is dropped.
    pub(crate) fn begin_request(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    /// When the connection went idle (no request in flight), `None` while
    /// busy.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = self.last_active_ms.load(Ordering::Acquire);
        Some(self.opened + Duration::from_millis(ms))
    }
}

/// A request in flight on its connection.
pub(crate) struct ActiveGuard(Arc<Connection>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let c = &self.0;
        let ms = u64::try_from(c.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        c.last_active_ms.store(ms, Ordering::Release);
        c.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime
/// does: a container runtime may start credgate with a soft limit of 1024
/// (containerd 2.x), far below `max_connections`, and Kubernetes has no
/// setting for it. Warns when even the hard limit leaves too few.
pub(crate) fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited; an unlimited hard limit is not a value to set.
    let mut soft = limit.current;
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = Some(maximum),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_FDS);
    if let Some(soft) = soft.filter(|&soft| soft < needed) {
        tracing::warn!(
            open_files = soft,
            needed,
            "the open-file limit is below server.max_connections plus {SPARE_FDS}: \
             connections beyond it fail to be accepted; lower max_connections or raise \
             the container's RLIMIT_NOFILE"
        );
    }
}

/// What every connection task shares.
struct Shared<M> {
    handshakes: Handshakes,
    callers: Arc<Callers>,
    settings: Settings,
    builder: http2::Builder<StreamExecutor>,
    make: Arc<M>,
    shutdown: CancellationToken,
    /// `max_connections_per_caller` per identity (`None`: every unmapped one).
    by_identity: Arc<Budgets<Option<String>>>,
    over_budget: LogThrottle,
}

/// Accepts connections until `shutdown`, then drops the listener (new
/// connections are refused) and asks every connection to finish (GOAWAY).
pub(crate) async fn serve<M: MakeService>(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    callers: Arc<Callers>,
    settings: Settings,
    make: Arc<M>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let shared = Arc::new(Shared {
        handshakes: Handshakes::new(tls),
        callers,
        builder: http2_builder(settings.request_timeout),
        by_identity: Budgets::new(settings.max_connections_per_caller),
        settings,
        make,
        shutdown: shutdown.clone(),
        over_budget: LogThrottle::default(),
    });
    let mut backoff = AcceptBackoff::default();
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                // Full. A connection that has not even sent its ClientHello
                // is the one to give way; without one, wait (backlog).
                shared.handshakes.make_room();
                tokio::select! {
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    () = shutdown.cancelled() => return,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        backoff.reset();
        let conn = Accepted {
            tcp,
            peer,
            _permit: permit,
        };
        tracker.spawn(conn.run(shared.clone()));
    }
}

fn http2_builder(request_timeout: Duration) -> http2::Builder<StreamExecutor> {
    let mut builder = http2::Builder::new(StreamExecutor {
        lifetime: request_timeout,
    });
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    builder
}

/// Runs each HTTP/2 stream (hyper hands every stream to its executor) as a
/// task that ends `lifetime` after the stream opened. The edge ends a
/// stream cleanly at its deadline (a status in the trailers), but only
/// while hyper polls the response body, and hyper stops polling it when
/// the client's flow-control window is closed; dropping the stream's task
/// resets it (RST_STREAM) whatever the window.
#[derive(Clone, Copy)]
struct StreamExecutor {
    lifetime: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let lifetime = self.lifetime;
        tokio::spawn(async move {
            if tokio::time::timeout(lifetime, stream).await.is_err() {
                tracing::debug!(
                    lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX),
                    "stream still open at request_timeout (client not reading?); reset"
                );
            }
        });
    }
}

/// Backs off after accept errors (EMFILE under a flood): doubling from
/// 10 ms to 1 s, logging at most every few seconds.
#[derive(Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    log: LogThrottle,
}

impl AcceptBackoff {
    async fn failed(&mut self, e: &io::Error) {
        let delay = self.delay.map_or(Duration::from_millis(10), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        self.delay = Some(delay);
        if let Some(suppressed) = self.log.ready() {
            tracing::warn!(
                error = %e,
                suppressed,
                backoff_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "accept failed; backing off"
            );
        }
        tokio::time::sleep(delay).await;
    }

    fn reset(&mut self) {
        self.delay = None;
    }
}

struct Accepted {
    tcp: TcpStream,
    peer: SocketAddr,
    /// A `max_connections` slot, held for the connection's life.
    _permit: OwnedSemaphorePermit,
}

impl Accepted {
    async fn run<M: MakeService>(self, shared: Arc<Shared<M>>) {
        let peer = self.peer;
        let Some(stream) = shared.handshakes.handshake(self.tcp, peer).await else {
            return;
        };
        // The identity's budget is taken before anything else: a connection
        // that then says nothing still counts against its certificate.
        let caller = caller_of(&stream, &shared.callers);
        // Keyed by kind and value (the state key): a templated identity's
        // connections share one budget, as an exact entry's do.
        let identity = caller.as_ref().ok().map(|c| c.key.clone());
        let Some(_identity_slot) = shared.by_identity.try_take(identity) else {
            if let Some(suppressed) = shared.over_budget.ready() {
                tracing::warn!(
                    peer.address = %peer,
                    caller = caller.as_ref().map_or("(unmapped)", |c| c.identity.as_str()),
                    limit = shared.settings.max_connections_per_caller,
                    suppressed,
                    "connection refused: its identity holds server.max_connections_per_caller connections"
                );
            }
            refuse_over_budget(stream, shared.settings.max_connections_per_caller).await;
            return;
        };
        let Some((stream, prefix)) = read_preface(stream, peer).await else {
            return;
        };
        let conn = Arc::new(Connection::new(peer, caller));
        let service = shared.make.make(conn.clone());
        let io = TokioIo::new(Rewind {
            prefix,
            inner: stream,
        });
        let served = shared
            .builder
            .serve_connection(io, TowerToHyperService::new(service));
        tokio::pin!(served);
        let settings = &shared.settings;
        let retire_at = Instant::now() + settings.max_connection_age;
        let why = tokio::select! {
            result = &mut served => {
                if let Err(e) = result {
                    tracing::debug!(peer.address = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            why = retire(&conn, settings, retire_at, &shared.shutdown) => why,
        };
        tracing::debug!(peer.address = %peer, why = why.as_str(), "asking the client to reconnect (GOAWAY)");
        served.as_mut().graceful_shutdown();
        if tokio::time::timeout(settings.grace, served).await.is_err() {
            tracing::debug!(peer.address = %peer, "GOAWAY grace expired; connection dropped");
        }
    }
}

/// Tells a client over its identity's connection budget why it is refused
/// (the server preface, then GOAWAY `ENHANCE_YOUR_CALM` with a reason that
/// gRPC clients report), and closes. Its own preface is read first (briefly)
/// so that closing does not reset the connection before the client has read
/// the GOAWAY. Bounded: a client that neither writes nor reads cannot hold
/// the task.
async fn refuse_over_budget(mut stream: TlsStream<TcpStream>, limit: usize) {
    let mut preface = [0u8; PREFACE.len()];
    let _ = tokio::time::timeout(REFUSAL_BUDGET, stream.read_exact(&mut preface)).await;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    let debug = format!(
        "this client identity already holds server.max_connections_per_caller ({limit}) connections"
    );
    let mut frames = BytesMut::with_capacity(32 + debug.len());
    let mut frame = |kind: u8, payload: &[u8]| {
        let len = u32::try_from(payload.len()).unwrap_or(0);
        frames.put_slice(&len.to_be_bytes()[1..]);
        frames.put_u8(kind);
        frames.put_u8(0);
        frames.put_u32(0);
        frames.put_slice(payload);
    };
    frame(SETTINGS, &[]);
    let mut goaway = Vec::with_capacity(8 + debug.len());
    goaway.extend_from_slice(&0u32.to_be_bytes());
    goaway.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
    goaway.extend_from_slice(debug.as_bytes());
    frame(GOAWAY, &goaway);
    let _ = tokio::time::timeout(REFUSAL_BUDGET, async {
        stream.write_all(&frames).await?;
        stream.shutdown().await
    })
    .await;
}

/// Reads the HTTP/2 preface (to be replayed to hyper), so that a client that
/// completes TLS and then says nothing is closed after [`PREFACE_TIMEOUT`].
async fn read_preface(
    mut stream: TlsStream<TcpStream>,
    peer: SocketAddr,
) -> Option<(TlsStream<TcpStream>, Bytes)> {
    let mut preface = [0u8; PREFACE.len()];
    match tokio::time::timeout(PREFACE_TIMEOUT, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == PREFACE => Some((stream, Bytes::copy_from_slice(&preface))),
        Ok(Ok(_)) => {
            tracing::info!(peer.address = %peer, "not an HTTP/2 client (bad preface); connection closed");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(peer.address = %peer, error = %e, "connection closed before the HTTP/2 preface");
            None
        }
        Err(_) => {
            tracing::info!(
                peer.address = %peer,
                timeout_s = PREFACE_TIMEOUT.as_secs(),
                "no HTTP/2 preface after the TLS handshake; connection closed"
            );
            None
        }
    }
}

/// The caller the verified client certificate maps to.
fn caller_of(stream: &TlsStream<TcpStream>, callers: &Callers) -> Result<Arc<Caller>, Error> {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first());
    let Some(leaf) = leaf else {
        // rustls requires a client certificate: unreachable unless miswired.
        return Err(Error::CallerNotMapped {
            presented: "(no client certificate)".to_owned(),
        });
    };
    match PeerIdentity::from_der(leaf.as_ref()) {
        Ok(peer) => callers.resolve(&peer),
        Err(why) => Err(Error::CallerNotMapped {
            presented: crate::error::truncate(&why, crate::error::MAX_PRESENTED_LEN),
        }),
    }
}

/// Why a connection is asked to finish.
enum Retire {
    Idle,
    Age,
    Refused,
    Shutdown,
}

impl Retire {
    fn as_str(&self) -> &'static str {
        match self {
            Self::Idle => "idle_timeout",
            Self::Age => "max_connection_age",
            Self::Refused => "unmapped caller refused",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Waits until the connection should be asked to finish: idle for
/// `idle_timeout` (an unmapped one for at most [`UNMAPPED_IDLE_TIMEOUT`]),
/// older than `max_connection_age`, an unmapped caller refused, or server
/// shutdown.
async fn retire(
    conn: &Connection,
    settings: &Settings,
    retire_at: Instant,
    shutdown: &CancellationToken,
) -> Retire {
    let mut idle_timeout = if conn.caller.is_ok() {
        settings.idle_timeout
    } else {
        settings.idle_timeout.min(UNMAPPED_IDLE_TIMEOUT)
    };
    let mut refused = false;
    loop {
        // While busy, look again a little later.
        let check = conn.idle_since().map_or_else(
            || Instant::now() + idle_timeout.min(Duration::from_secs(1)),
            |since| since + idle_timeout,
        );
        tokio::select! {
            () = tokio::time::sleep_until(retire_at) => return Retire::Age,
            () = shutdown.cancelled() => return Retire::Shutdown,
            () = conn.refused(), if !refused => {
                refused = true;
                idle_timeout = idle_timeout.min(REFUSED_LINGER);
            }
            () = tokio::time::sleep_until(check) => {
                if conn
                    .idle_since()
                    .is_some_and(|since| since.elapsed() >= idle_timeout)
                {
                    return if refused { Retire::Refused } else { Retire::Idle };
                }
            }
        }
    }
}

/// A stream that first replays bytes already read from it.
struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
