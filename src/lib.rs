//! credgate: a gRPC service that changes AWS IAM console passwords for
//! internal services, without those services ever holding AWS keys.
//!
//! # Layout
//!
//! A request flows through the modules in this order:
//!
//! - [`tls`]: accepts TCP, completes the mTLS handshake with credgate's own
//!   rustls config (client certificate required, CRLs, hot reload) and hands
//!   the stream to tonic.
//! - [`server`]: the tower stack ([`rpc_span`] for traces and metrics,
//!   [`rejections`] for tonic's own rejections, a global concurrency limit),
//!   health on both ports, reflection, graceful shutdown.
//! - [`service`]: the `PasswordService` handlers, which only order the steps:
//!   - [`identity`]: verified peer certificate → the one configured caller;
//!   - [`password`]: IAM's character rules and the account password policy;
//!   - [`limits`]: wrong-old-password lockout per caller;
//!   - [`iam`] over [`credentials`]: the IAM call, signed with the caller's
//!     own profile, with deliberate retries and outcome classification;
//!   - [`audit`]: one audit event per attempt.
//! - [`error`]: the single error enum and its one mapping to `tonic::Status`.
//! - [`telemetry`]: logs, OTLP traces and metrics.
//! - [`config`], [`cli`], [`devpki`]: configuration, command line, dev PKI.
//! - [`api`]: the generated `credgate.v1` types.

#![forbid(unsafe_code)]

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod devpki;
pub mod error;
pub mod iam;
pub mod identity;
pub mod limits;
pub mod password;
pub mod rejections;
pub mod rpc_span;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod tls;
