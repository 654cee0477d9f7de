//! credgate: a gRPC service that changes AWS IAM console passwords for
//! internal services, without those services ever holding AWS keys.
//!
//! # Layout
//!
//! A request flows through the folders in this order:
//!
//! - [`net`]: accepts TCP within bounds, completes the mTLS handshake
//!   (a connection that has not sent its ClientHello gives way first) with
//!   [`net::tls`]'s config (client certificate required and checked, CRLs
//!   and their expiry, hot reload), resolves the caller once per connection
//!   ([`net::identity`]) within its identity's connection budget, and
//!   serves HTTP/2 with bounded streams, idle timeout and connection age.
//! - [`rpc`]: the SERVER span and `rpc.server.duration` of each call, then
//!   admission at the edge — the [`deadline`] from arrival, the audit slot,
//!   an unmapped caller refused, the per-caller and global limits, the body
//!   read within bounds — then the `PasswordService` handlers, which check
//!   the input and hand the attempt over.
//! - [`change`]: one `ChangePassword` attempt, which ends the same way
//!   whatever the caller does: the `request_id` claim and the attempt limit
//!   in [`state`], the profile's identity and the account policy, then IAM
//!   through [`aws`]; its outcome settles the limit, is stored for replay
//!   and closes the audit slot.
//! - [`aws`]: IAM and STS behind one seam (each failure classified to one
//!   error), each IAM user's clients over a shared HTTP pool, the body the
//!   passwords are written into, and passwords as IAM defines them; and
//!   key custody ([`aws::keys`]): each user's key looked up when first
//!   needed, from the callers' profiles or from AWS Secrets Manager, the
//!   crash-safe rotation protocol, and key ages.
//! - [`state`]: the attempt limit and the `request_id` outcomes, in memory
//!   or Redis/Valkey behind one backend trait; the operator's view of a
//!   caller's lockout.
//! - [`telemetry`]: the subscriber (logs, audit events, OTLP traces and
//!   metrics), the trace context, the instruments, and the log writer that
//!   never blocks a runtime thread (and says when stdout stalls).
//!
//! Around them: [`custody`] checks every user's key on a schedule and
//! rotates it under a lease in [`state`] (and serves `keys status` and
//! `keys rotate`), [`server`] wires it all (health on both ports,
//! reflection, shutdown), [`cli`] is the command line, [`config`] loads and
//! validates the configuration (one file per section; caller templates are
//! parsed in its `callers` and `templates`, and resolved in
//! [`net::identity`]), [`explain`] tells which entry maps an identity,
//! [`devpki`] writes a dev PKI, [`api`] holds the generated `credgate.v1`
//! types, and
//! [`error`], [`deadline`] and [`spiffe`] are the vocabulary every layer
//! shares: the one error enum, its reason table and its one mapping to
//! `tonic::Status`; the one deadline of a call; the SPIFFE ID rules.
//! [`fault`] holds test-only fault points (cargo feature
//! `fault-injection`, never in a shipped build).
//!
//! # Layers
//!
//! A module imports only from the layers below its own, never from another
//! module of its own layer, and no two modules import each other, not even
//! round a cycle. `layers.rs` checks it against every path in `src/` (test
//! code aside), reading this list:
//!
//! 1. [`error`], [`deadline`], [`spiffe`], [`api`], [`fault`]: the shared
//!    vocabulary.
//! 2. [`config`]: the validated configuration.
//! 3. [`telemetry`]: logs, audit events, traces and metrics.
//! 4. [`net`], [`state`], [`aws`]: the connections, the shared state and
//!    AWS, each knowing nothing of the other two.
//! 5. [`change`], [`custody`]: one password change, and the keys' schedule
//!    and rotations, each over the three below them.
//! 6. [`rpc`]: each call, from its span to its handler.
//! 7. [`server`], [`devpki`], [`explain`]: what the commands run.
//! 8. [`cli`]: the commands.

#![forbid(unsafe_code)]

pub mod api;
pub(crate) mod aws;
pub(crate) mod change;
pub mod cli;
pub(crate) mod config;
pub(crate) mod custody;
pub(crate) mod deadline;
pub mod devpki;
pub(crate) mod error;
pub(crate) mod explain;
#[cfg(feature = "fault-injection")]
pub(crate) mod fault;
#[cfg(test)]
mod layers;
pub mod net;
pub(crate) mod rpc;
pub(crate) mod server;
pub(crate) mod spiffe;
pub(crate) mod state;
pub(crate) mod telemetry;
