//! The RPC layer, per call: the SERVER span and duration metric
//! ([`span`]), admission ([`edge`]), then the `PasswordService` handlers
//! ([`service`]).

pub(crate) mod edge;
pub(crate) mod service;
pub(crate) mod span;
