//! The TLS handshake of a new connection, in two stages, bounded so that a
//! flood of connections cannot crowd out anyone's handshake:
//!
//! - a connection waits for its ClientHello at most [`HANDSHAKE_TIMEOUT`],
//!   without a handshake slot, and one source address (an IPv6 /64) may
//!   have at most [`MAX_WAITING_PER_SOURCE`] connections waiting: beyond
//!   that its oldest is closed, so that a flood of connections that never
//!   start TLS cannot crowd out the handshakes of anyone else, nor of its own
//!   source for long; when `max_connections` is full, the connection that
//!   has waited longest is closed to make room ([`Handshakes::make_room`]),
//!   one that has sent no byte at all before one that has sent a first part;
//! - once its ClientHello is in, a handshake needs one of [`MAX_HANDSHAKES`]
//!   slots (at most [`MAX_HANDSHAKES_PER_SOURCE`] per source) and finishes
//!   within what is left of [`HANDSHAKE_TIMEOUT`] (a second when half the
//!   slots are taken: a legitimate mTLS handshake takes milliseconds); a
//!   connection that finds no slot soon is closed.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, server::TlsStream};
use tokio_util::sync::CancellationToken;

use super::{
    budget::{Budgets, LogThrottle},
    tls::ReloadingConfig,
};

/// Handshakes past their ClientHello at once: each costs credgate a key
/// exchange and a signature, so this bounds the CPU a burst can take.
pub(crate) const MAX_HANDSHAKES: usize = 256;
/// Of those, from one source address: a single host cannot take them all.
pub(crate) const MAX_HANDSHAKES_PER_SOURCE: usize = MAX_HANDSHAKES / 4;
/// Connections of one source address waiting for their ClientHello; a
/// newer one closes that source's oldest. A real client sends its
/// ClientHello right after connecting, so only a flood ever waits here.
pub(crate) const MAX_WAITING_PER_SOURCE: usize = 256;
/// How long a client may take to finish the handshake, ClientHello included.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The handshake budget while more than half the handshake slots are taken.
const HANDSHAKE_TIMEOUT_UNDER_LOAD: Duration = Duration::from_secs(1);
/// How long a handshake waits for a slot before its connection is closed.
const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_millis(100);

/// The handshakes of the mTLS listener: its TLS config, the connections
/// waiting for their ClientHello, and the handshake slots.
pub(super) struct Handshakes {
    tls: Arc<ReloadingConfig>,
    /// Connections whose ClientHello has not arrived yet.
    waiting: Arc<Waiting>,
    /// [`MAX_HANDSHAKES`] slots.
    slots: Arc<Semaphore>,
    /// [`MAX_HANDSHAKES_PER_SOURCE`] per source.
    by_source: Arc<Budgets<IpAddr>>,
    evictions: LogThrottle,
}

impl Handshakes {
    pub(super) fn new(tls: Arc<ReloadingConfig>) -> Self {
        Self {
            tls,
            waiting: Arc::default(),
            slots: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            by_source: Budgets::new(MAX_HANDSHAKES_PER_SOURCE),
            evictions: LogThrottle::default(),
        }
    }

    /// Closes the connection that has waited longest for its ClientHello:
    /// with `max_connections` full, it is the one to give way.
    pub(super) fn make_room(&self) {
        if self.waiting.evict_oldest() {
            self.evicted("max_connections");
        }
    }

    /// The TLS handshake in two stages: waiting for the ClientHello (evictable,
    /// see [`Waiting`]), then the rest with a handshake slot, within what is
    /// left of [`HANDSHAKE_TIMEOUT`].
    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        // gRPC is latency-sensitive and small-message: don't wait to coalesce.
        let _ = tcp.set_nodelay(true);
        let give_up = Instant::now() + HANDSHAKE_TIMEOUT;
        let source = source_of(peer);
        let start = self.client_hello(tcp, peer, source, give_up).await?;
        let Some(_source_slot) = self.by_source.try_take(source) else {
            tracing::debug!(peer.address = %peer, "too many handshakes in progress from this source; connection closed");
            return None;
        };
        let slot = self.slot(peer).await?;
        let budget = if self.slots.available_permits() < MAX_HANDSHAKES / 2 {
            HANDSHAKE_TIMEOUT_UNDER_LOAD
        } else {
            HANDSHAKE_TIMEOUT
        };
        let budget = budget.min(give_up.saturating_duration_since(Instant::now()));
        let result = tokio::time::timeout(budget, start.into_stream(self.tls.current())).await;
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

    /// Stage one: waits for the ClientHello without a handshake slot, in the
    /// queue a newer connection may evict it from ([`Waiting`]).
    async fn client_hello(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        source: IpAddr,
        give_up: Instant,
    ) -> Option<StartHandshake<TcpStream>> {
        let (ticket, evicted_another) = self.waiting.enter(source, &tcp);
        if evicted_another {
            self.evicted("max_waiting_per_source");
        }
        let hello = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        tokio::pin!(hello);
        let start = tokio::select! {
            // A ClientHello that has arrived wins over an eviction decided
            // before this task could read it.
            biased;
            hello = &mut hello => match hello {
                Ok(start) => start,
                Err(e) => {
                    tracing::debug!(peer.address = %peer, error = %e, "no TLS ClientHello; connection closed");
                    return None;
                }
            },
            () = ticket.evicted.cancelled() => {
                tracing::debug!(peer.address = %peer, "no TLS ClientHello yet; closed to make room");
                return None;
            }
            () = tokio::time::sleep_until(give_up) => {
                tracing::debug!(peer.address = %peer, "no TLS ClientHello within the handshake timeout; connection closed");
                return None;
            }
        };
        drop(ticket);
        Some(start)
    }

    /// One of the [`MAX_HANDSHAKES`] slots, waiting at most
    /// [`HANDSHAKE_SLOT_WAIT`] for one.
    async fn slot(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        match tokio::time::timeout(HANDSHAKE_SLOT_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Some(slot),
            _ => {
                tracing::debug!(peer.address = %peer, "too many handshakes in progress; connection closed");
                None
            }
        }
    }

    fn evicted(&self, why: &'static str) {
        if let Some(suppressed) = self.evictions.ready() {
            tracing::warn!(
                why,
                suppressed,
                "closing connections that have not sent a TLS ClientHello, to make room"
            );
        }
    }
}

/// The source a budget is kept for: the IPv4 address, or the /64 of an
/// IPv6 one (one host usually holds a whole /64).
fn source_of(peer: SocketAddr) -> IpAddr {
    match peer.ip().to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Connections waiting for their ClientHello, oldest first: the ones a
/// newer connection may close.
#[derive(Default)]
struct Waiting(Mutex<WaitQueue>);

#[derive(Default)]
struct WaitQueue {
    next: u64,
    entries: BTreeMap<u64, WaitEntry>,
    by_source: HashMap<IpAddr, BTreeSet<u64>>,
}

struct WaitEntry {
    source: IpAddr,
    evicted: CancellationToken,
    /// Some of its ClientHello has arrived: it is closed only after every
    /// connection that has sent nothing.
    started: bool,
    /// A duplicate of its socket, to look for bytes without reading them
    /// when it is a candidate for closing (`None` if it could not be made).
    /// Under a flood a connection's task may run long after its client's
    /// ClientHello arrived; the socket, not the task, says whether it is
    /// silent.
    socket: Option<OwnedFd>,
}

impl WaitEntry {
    fn has_sent_something(&mut self) -> bool {
        if !self.started && self.socket.as_ref().is_some_and(has_bytes) {
            self.started = true;
        }
        self.started
    }
}

/// Whether the client has sent anything yet, without reading it.
fn has_bytes(socket: impl AsFd) -> bool {
    let mut byte = [0u8; 1];
    rustix::net::recv(
        socket,
        &mut byte[..],
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    )
    .is_ok_and(|(n, _)| n > 0)
}

impl WaitQueue {
    /// The oldest connection that has sent nothing, else the oldest.
    fn victim(&mut self) -> Option<u64> {
        self.entries
            .iter_mut()
            .find_map(|(id, e)| (!e.has_sent_something()).then_some(*id))
            .or_else(|| self.entries.keys().next().copied())
    }

    /// The same among the connections from `source`.
    fn victim_from(&mut self, source: IpAddr) -> Option<u64> {
        let ids = self.by_source.get(&source)?;
        let entries = &mut self.entries;
        ids.iter()
            .copied()
            .find(|id| entries.get_mut(id).is_some_and(|e| !e.has_sent_something()))
            .or_else(|| ids.first().copied())
    }

    /// Removes `id` and closes its connection.
    fn evict(&mut self, id: u64) {
        if let Some(token) = self.remove(id) {
            token.cancel();
        }
    }

    fn remove(&mut self, id: u64) -> Option<CancellationToken> {
        let WaitEntry {
            source, evicted, ..
        } = self.entries.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(evicted)
    }
}

impl Waiting {
    /// Registers a connection from `source`; if that source then has more
    /// than [`MAX_WAITING_PER_SOURCE`] waiting, its oldest silent one is
    /// closed.
    fn enter(self: &Arc<Self>, source: IpAddr, tcp: &TcpStream) -> (WaitTicket, bool) {
        let mut queue = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let id = queue.next;
        queue.next += 1;
        let evicted = CancellationToken::new();
        queue.entries.insert(
            id,
            WaitEntry {
                source,
                evicted: evicted.clone(),
                started: false,
                socket: rustix::io::dup(tcp).ok(),
            },
        );
        let ids = queue.by_source.entry(source).or_default();
        ids.insert(id);
        let oldest = if ids.len() > MAX_WAITING_PER_SOURCE {
            queue.victim_from(source)
        } else {
            None
        };
        if let Some(oldest) = oldest {
            queue.evict(oldest);
        }
        let ticket = WaitTicket {
            id,
            evicted,
            waiting: self.clone(),
        };
        (ticket, oldest.is_some())
    }

    /// Closes the silent connection that has waited longest (else the
    /// oldest that has sent part of its ClientHello); whether there was one.
    fn evict_oldest(&self) -> bool {
        let mut queue = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match queue.victim() {
            Some(id) => {
                queue.evict(id);
                true
            }
            None => false,
        }
    }
}

/// A connection's place in [`Waiting`], left when dropped.
#[must_use]
struct WaitTicket {
    id: u64,
    evicted: CancellationToken,
    waiting: Arc<Waiting>,
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        self.waiting
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.id);
    }
}
