//! The audit trail: exactly one event per `ChangePassword` attempt that
//! reaches credgate, on the `credgate::audit` target, with the attempt's
//! final outcome.
//!
//! An [`AuditSlot`] is opened when the request arrives, before queueing or
//! reading its body. Whoever learns the final outcome closes it: the edge
//! (caller not mapped, too large, timed out while queued), the handler
//! (invalid input), or the attempt task (everything that went further, long
//! after a caller may have gone away). A slot that is dropped unclosed — the
//! caller cancelled before the attempt started — records `CANCELLED`. Either
//! way the event is written once and only once.
//!
//! Audit events have their own subscriber filter ([`crate::telemetry`]):
//! `RUST_LOG` cannot switch them off. An attempt that reached IAM holds its
//! slot's drain token until the event is written: shutdown waits for it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::{
    error::Reason,
    telemetry::{AUDIT_REFUSED_EVENT, AUDIT_TARGET},
};

/// Outcome recorded when the caller went away before the attempt started:
/// nothing was sent to IAM.
pub(crate) const CANCELLED: &str = "CANCELLED";

/// How an attempt ended.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// `OK`, `VALIDATED`, an ErrorInfo reason, or [`CANCELLED`].
    pub(crate) outcome: &'static str,
    /// IAM's request id, when IAM answered.
    pub(crate) iam_request_id: Option<String>,
    /// The outcome was replayed from an earlier attempt with the same
    /// `request_id`; IAM was not called.
    pub(crate) replayed: bool,
    /// What IAM answered (`OK` or a reason), when that differs from the
    /// outcome: an attempt that failed internally after IAM answered.
    pub(crate) iam_outcome: Option<&'static str>,
}

impl Outcome {
    /// An outcome without an IAM request id.
    pub(crate) fn of(outcome: &'static str) -> Self {
        Self {
            outcome,
            ..Self::default()
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    caller: String,
    /// The `[[callers]]` template that mapped the caller, if one did.
    caller_template: Option<Arc<str>>,
    iam_user: String,
    peer: Option<SocketAddr>,
    trace_id: String,
    request_id: String,
    validate_only: bool,
}

/// One attempt's pending audit event.
#[derive(Debug)]
pub(crate) struct AuditSlot {
    /// `None` once written.
    record: Mutex<Option<Record>>,
    /// Set when an attempt task took the slot over: from then on only that
    /// task writes the event.
    handed_off: AtomicBool,
    /// Held from the moment the attempt goes to IAM until the event is
    /// written: shutdown waits for every such token.
    drain: Mutex<Option<TaskTrackerToken>>,
}

impl AuditSlot {
    /// Opens the slot for a request from `caller` (the matched identity, or
    /// what an unmapped certificate presented), mapped by `caller_template`
    /// when a template mapped it.
    pub(crate) fn open(
        caller: &str,
        caller_template: Option<Arc<str>>,
        iam_user: &str,
        peer: Option<SocketAddr>,
        trace_id: String,
    ) -> Self {
        Self {
            record: Mutex::new(Some(Record {
                caller: caller.to_owned(),
                caller_template,
                iam_user: iam_user.to_owned(),
                peer,
                trace_id,
                ..Record::default()
            })),
            handed_off: AtomicBool::new(false),
            drain: Mutex::new(None),
        }
    }

    /// The attempt is about to call IAM: shutdown must wait for its event,
    /// so it holds `token` until then.
    pub(crate) fn reached_iam(&self, token: TaskTrackerToken) {
        *self.drain.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }

    /// Marks the slot as owned by an attempt task.
    pub(crate) fn hand_off(&self) {
        self.handed_off.store(true, Ordering::Release);
    }

    /// Whether an attempt task owns the slot.
    pub(crate) fn handed_off(&self) -> bool {
        self.handed_off.load(Ordering::Acquire)
    }

    /// Adds what the request body said, once decoded.
    pub(crate) fn describe(&self, request_id: &str, validate_only: bool) {
        if let Some(record) = self.lock().as_mut() {
            request_id.clone_into(&mut record.request_id);
            record.validate_only = validate_only;
        }
    }

    /// The IAM user as IAM reported it, once known.
    pub(crate) fn set_iam_user(&self, name: &str) {
        if let Some(record) = self.lock().as_mut() {
            name.clone_into(&mut record.iam_user);
        }
    }

    /// Writes the event with its final outcome; later calls do nothing.
    pub(crate) fn close(&self, outcome: Outcome) {
        let record = self.lock().take();
        if let Some(record) = record {
            emit(&record, &outcome);
        }
        // Released only now that the event is in the log writer.
        self.drain
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Record>> {
        // A panic while holding the lock cannot leave the record half-written.
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for AuditSlot {
    fn drop(&mut self) {
        let record = self
            .record
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(record) = record {
            emit(&record, &Outcome::of(CANCELLED));
        }
    }
}

fn emit(record: &Record, outcome: &Outcome) {
    // Two call sites, one field list: a refusal for a stalled sink has an
    // event name of its own, which the log writer tells apart.
    macro_rules! event {
        ($($name:tt)*) => {
            tracing::info!(
                $($name)*
                target: AUDIT_TARGET,
                caller = record.caller.as_str(),
                caller_template = record.caller_template.as_deref(),
                iam_user = record.iam_user.as_str(),
                outcome = outcome.outcome,
                iam_outcome = outcome.iam_outcome,
                iam_request_id = outcome.iam_request_id.as_deref().unwrap_or_default(),
                request_id = record.request_id.as_str(),
                validate_only = record.validate_only,
                replayed = outcome.replayed,
                peer.address = record.peer.map(tracing::field::display),
                trace_id = record.trace_id.as_str(),
                "password change attempt"
            )
        };
    }
    if outcome.outcome == Reason::AuditUnavailable.as_str() {
        event!(name: AUDIT_REFUSED_EVENT,);
    } else {
        event!();
    }
}
