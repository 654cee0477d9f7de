//! The network edge, below the RPC layer: TCP and the mTLS handshake, and
//! who the client is.
//!
//! - [`connections`]: the mTLS listener — bounded accepts and handshakes,
//!   the caller resolved once per connection, HTTP/2 with bounded streams,
//!   idle timeout and connection age.
//! - [`tls`]: credgate's own rustls config (client certificates required
//!   and checked, CRLs, hot reload).
//! - [`identity`]: what a verified client certificate presents, and which
//!   configured caller that is.

pub(crate) mod connections;
pub(crate) mod identity;
pub mod tls;
