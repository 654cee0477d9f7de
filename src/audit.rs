//! The audit trail: exactly one event per `ChangePassword` attempt, allowed or
//! not, on the `credgate::audit` target so it can be routed separately.

use std::net::SocketAddr;

/// What one attempt did.
#[derive(Debug, Default)]
pub struct Attempt<'a> {
    /// The matched caller identity, or the presented one when unmapped.
    pub caller: &'a str,
    /// The IAM user acted as; empty when the caller was not mapped.
    pub iam_user: &'a str,
    /// `OK`, `VALIDATED`, or the ErrorInfo reason.
    pub outcome: &'a str,
    /// IAM's request id, when IAM answered.
    pub request_id: &'a str,
    /// The TCP peer.
    pub peer: Option<SocketAddr>,
    /// The trace this attempt belongs to.
    pub trace_id: &'a str,
}

/// Emits the audit event.
pub fn record(attempt: &Attempt<'_>) {
    let peer = attempt.peer.map(|p| p.to_string()).unwrap_or_default();
    tracing::info!(
        target: "credgate::audit",
        caller = attempt.caller,
        iam_user = attempt.iam_user,
        outcome = attempt.outcome,
        iam_request_id = attempt.request_id,
        peer.address = peer,
        trace_id = attempt.trace_id,
        "password change attempt"
    );
}
