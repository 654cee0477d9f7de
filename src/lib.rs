//! credgate: a gRPC service that changes AWS IAM console passwords for
//! internal services, without those services ever holding AWS keys.
//!
//! # Layout
//!
//! A request flows through the modules in this order:
//!
//! - [`connections`]: accepts TCP within bounds (a connection that has not
//!   sent its ClientHello gives way first), completes the mTLS handshake
//!   with [`tls`]'s config (client certificate required and checked, CRLs
//!   and their expiry, hot reload), resolves the caller once per connection
//!   ([`identity`]) within its identity's connection budget, and serves
//!   HTTP/2 with bounded streams (each reset at `request_timeout`), idle
//!   timeout and connection age.
//! - [`rpc_span`]: the SERVER span and `rpc.server.duration` of each call.
//! - [`edge`]: admission — the [`deadline`] from arrival, the [`audit`]
//!   slot, an unmapped caller refused, the per-caller and global limits, the
//!   body read within bounds.
//! - [`service`]: the `PasswordService` handlers: check the input, hand the
//!   attempt over.
//! - [`attempt`]: one `ChangePassword` in its own task: the `request_id`
//!   claim and the attempt limit in [`state`], the profile's identity
//!   ([`principal`]), the account policy ([`policy_cache`], [`password`]),
//!   then [`iam`] over [`credentials`] (the passwords go into the request
//!   body through [`change_body`]); its outcome settles the limit, is
//!   stored for replay and closes the audit slot.
//! - [`error`]: the single error enum, the reason table and the one mapping
//!   to `tonic::Status`.
//! - [`server`]: wires it all, health on both ports, reflection, shutdown.
//! - [`telemetry`]: the subscriber (logs, audit events, OTLP traces and
//!   metrics); [`logs`]: the JSON line format and the writer that never
//!   blocks a runtime thread (and says when stdout stalls).
//! - [`config`], [`spiffe`], [`cli`], [`devpki`], [`lockout`]:
//!   configuration, SPIFFE ID rules, command line, dev PKI, the operator's
//!   view of a caller's attempt limit; `fault`: test-only fault points (cargo
//!   feature `fault-injection`, never in a shipped build).
//! - [`api`]: the generated `credgate.v1` types.

#![forbid(unsafe_code)]

pub mod api;
pub(crate) mod attempt;
pub(crate) mod audit;
pub(crate) mod change_body;
pub mod cli;
pub(crate) mod config;
pub(crate) mod connections;
pub(crate) mod credentials;
pub(crate) mod deadline;
pub mod devpki;
pub(crate) mod edge;
pub(crate) mod error;
#[cfg(feature = "fault-injection")]
pub(crate) mod fault;
pub(crate) mod iam;
pub(crate) mod identity;
pub(crate) mod lockout;
pub(crate) mod logs;
pub(crate) mod password;
pub(crate) mod policy_cache;
pub(crate) mod principal;
pub(crate) mod rpc_span;
pub(crate) mod server;
pub(crate) mod service;
pub(crate) mod spiffe;
pub(crate) mod state;
pub(crate) mod telemetry;
pub mod tls;
