//! The network edge, below the RPC layer: TCP and the mTLS handshake, and
//! who the client is.
//!
//! - [`connections`]: the mTLS listener — bounded accepts, the caller
//!   resolved once per connection, HTTP/2 with bounded streams, idle
//!   timeout and connection age; [`handshake`] bounds the TLS handshakes a
//!   flood could hold, [`budget`] the connections per source or identity.
//! - [`tls`]: credgate's own rustls config (client certificates required
//!   and checked, CRLs, hot reload).
//! - [`identity`]: what a verified client certificate presents, and which
//!   configured caller that is.

mod budget;
pub(crate) mod connections;
mod handshake;
pub(crate) mod identity;
pub mod tls;
