//! The mTLS listener: accepts TCP, completes the handshake with
//! [`crate::tls`]'s config, resolves the caller once per connection, and
//! serves HTTP/2 with bounds on everything a client controls.
//!
//! - at most `max_connections` connections, handshakes included; beyond it
//!   new connections wait in the kernel's backlog;
//! - at most [`MAX_HANDSHAKES`] handshakes at once, each within
//!   [`HANDSHAKE_TIMEOUT`] (a second when half the handshake slots are taken:
//!   a legitimate mTLS handshake takes milliseconds); a connection that finds
//!   no slot soon is closed;
//! - accept errors (file descriptors exhausted) back off instead of spinning;
//! - the HTTP/2 preface must arrive within [`PREFACE_TIMEOUT`] of the
//!   handshake;
//! - [`MAX_CONCURRENT_STREAMS`] streams per connection, small flow-control
//!   windows, keepalive PINGs;
//! - `idle_timeout` without a request, or `max_connection_age` in all, ends a
//!   connection with GOAWAY (in-flight calls finish within a grace period),
//!   so that CA, CRL and caller changes reach long-lived channels too.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use hyper::server::conn::http2;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    edge::Connection,
    error::Error,
    identity::{Callers, PeerIdentity},
    tls::ReloadingConfig,
};

/// Handshakes in progress at once.
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// How long a client may take to finish the handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The handshake budget while more than half the handshake slots are taken.
const HANDSHAKE_TIMEOUT_UNDER_LOAD: Duration = Duration::from_secs(1);
/// How long a new connection waits for a handshake slot before it is closed.
const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_millis(100);
/// How long after the handshake the HTTP/2 preface must have arrived.
pub(crate) const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams a client may open at once on one connection (advertised in
/// SETTINGS). A caller needs a few; hundreds only serve to starve others.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 32;
/// Per-stream receive window: a request is at most 4 KiB.
const STREAM_WINDOW: u32 = 64 * 1024;
/// Per-connection receive window: bounds what one connection can make
/// credgate buffer, whatever its streams do.
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// Largest header block accepted.
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Keepalive PINGs find dead peers; a peer that does not answer is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Accept errors are logged at most this often.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Connection limits from `[server]`.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_connections: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_connection_age: Duration,
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

/// Accepts connections until `shutdown`, then drops the listener (new
/// connections are refused) and asks every connection to finish (GOAWAY).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Arc<ReloadingConfig>,
    callers: Arc<Callers>,
    settings: Settings,
    make: Arc<impl MakeService>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(settings.max_connections));
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut backoff = AcceptBackoff::default();
    let builder = http2_builder();
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.cancelled() => return,
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
        tracker.spawn(conn.run(
            tls.clone(),
            callers.clone(),
            handshakes.clone(),
            settings.clone(),
            builder.clone(),
            make.clone(),
            shutdown.clone(),
        ));
    }
}

fn http2_builder() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
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

/// Backs off after accept errors (EMFILE under a flood): doubling from
/// 10 ms to 1 s, logging at most every few seconds.
#[derive(Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    async fn failed(&mut self, e: &io::Error) {
        let delay = self.delay.map_or(Duration::from_millis(10), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        self.delay = Some(delay);
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL)
        {
            tracing::warn!(
                error = %e,
                suppressed = self.suppressed,
                backoff_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "accept failed; backing off"
            );
            self.last_log = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
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
    #[allow(clippy::too_many_arguments)]
    async fn run(
        self,
        tls: Arc<ReloadingConfig>,
        callers: Arc<Callers>,
        handshakes: Arc<Semaphore>,
        settings: Settings,
        builder: http2::Builder<TokioExecutor>,
        make: Arc<impl MakeService>,
        shutdown: CancellationToken,
    ) {
        let peer = self.peer;
        let Some(stream) = handshake(self.tcp, peer, &tls, &handshakes).await else {
            return;
        };
        let Some(preface) = read_preface(stream, peer).await else {
            return;
        };
        let (stream, prefix) = preface;
        let conn = Arc::new(Connection::new(peer, caller_of(&stream, &callers)));
        let service = make.make(conn.clone());
        let io = TokioIo::new(Rewind {
            prefix,
            inner: stream,
        });
        let served = builder.serve_connection(io, TowerToHyperService::new(service));
        tokio::pin!(served);
        let retire_at = Instant::now() + settings.max_connection_age;
        let why = tokio::select! {
            result = &mut served => {
                if let Err(e) = result {
                    tracing::debug!(peer.address = %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            why = retire(&conn, &settings, retire_at, &shutdown) => why,
        };
        tracing::debug!(peer.address = %peer, why = why.as_str(), "asking the client to reconnect (GOAWAY)");
        served.as_mut().graceful_shutdown();
        if tokio::time::timeout(settings.grace, served).await.is_err() {
            tracing::debug!(peer.address = %peer, "GOAWAY grace expired; connection dropped");
        }
    }
}

async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: &ReloadingConfig,
    handshakes: &Arc<Semaphore>,
) -> Option<TlsStream<TcpStream>> {
    // gRPC is latency-sensitive and small-message: don't wait to coalesce.
    let _ = tcp.set_nodelay(true);
    let slot = match handshakes.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            match tokio::time::timeout(HANDSHAKE_SLOT_WAIT, handshakes.clone().acquire_owned())
                .await
            {
                Ok(Ok(slot)) => slot,
                _ => {
                    tracing::debug!(peer.address = %peer, "too many handshakes in progress; connection closed");
                    return None;
                }
            }
        }
    };
    let budget = if handshakes.available_permits() < MAX_HANDSHAKES / 2 {
        HANDSHAKE_TIMEOUT_UNDER_LOAD
    } else {
        HANDSHAKE_TIMEOUT
    };
    let acceptor = TlsAcceptor::from(tls.current());
    let result = tokio::time::timeout(budget, acceptor.accept(tcp)).await;
    drop(slot);
    match result {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(peer.address = %peer, error = %e, "TLS handshake rejected");
            None
        }
        Err(_) => {
            tracing::info!(peer.address = %peer, budget_ms = u64::try_from(budget.as_millis()).unwrap_or(0), "TLS handshake timed out");
            None
        }
    }
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
fn caller_of(
    stream: &TlsStream<TcpStream>,
    callers: &Callers,
) -> Result<Arc<crate::identity::Caller>, Error> {
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
    Shutdown,
}

impl Retire {
    fn as_str(&self) -> &'static str {
        match self {
            Self::Idle => "idle_timeout",
            Self::Age => "max_connection_age",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Waits until the connection should be asked to finish: idle for
/// `idle_timeout`, older than `max_connection_age`, or server shutdown.
async fn retire(
    conn: &Connection,
    settings: &Settings,
    retire_at: Instant,
    shutdown: &CancellationToken,
) -> Retire {
    loop {
        // While busy, look again a little later.
        let check = conn.idle_since().map_or_else(
            || Instant::now() + settings.idle_timeout.min(Duration::from_secs(1)),
            |since| since + settings.idle_timeout,
        );
        tokio::select! {
            () = tokio::time::sleep_until(retire_at) => return Retire::Age,
            () = shutdown.cancelled() => return Retire::Shutdown,
            () = tokio::time::sleep_until(check) => {
                if conn
                    .idle_since()
                    .is_some_and(|since| since.elapsed() >= settings.idle_timeout)
                {
                    return Retire::Idle;
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
