//! One `ChangePassword` attempt, which ends the same way whatever the caller
//! does.
//!
//! Once the handler has checked the input, it drives the attempt itself —
//! no task hand-off on the common path — until the caller has its answer.
//! Whatever of the attempt is left then (IAM still working at the deadline),
//! or when the handler is dropped (the caller cancelled or disconnected),
//! moves to a task of its own that nothing can cancel. The attempt claims the `request_id`,
//! reserves an attempt against the limit, verifies the profile, checks the
//! policy and calls IAM, all within the request's deadline. If the deadline
//! passes before IAM was sent anything, the attempt stops there
//! (`DEADLINE_BEFORE_SEND`). If it passes while IAM is working, the caller is
//! answered `OUTCOME_UNKNOWN` on time, and the task keeps waiting (up to
//! [`UPSTREAM_TIMEOUT`]) for IAM's real answer, which then settles the
//! limit, is stored under the `request_id`, and goes into the one audit
//! event. Shutdown waits for every attempt that went to IAM until its event
//! is written, whatever `shutdown_grace` says (see `server`).
//!
//! A panic inside an attempt is caught where it happens, once: the attempt
//! ends `INTERNAL_ERROR`, its reservation is settled by what IAM really
//! answered (kept in a [`Witness`] outside the panicking future), and its
//! audit event carries that answer too.

use std::{
    any::Any,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::FutureExt as _;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{
    aws::credentials::TRANSMITTED,
    aws::iam::Iam,
    aws::keys::Signer,
    aws::password::Password,
    change::audit::{AuditSlot, Outcome},
    change::policy_cache::PolicyCache,
    change::principal::{Principals, Verdict as Principal},
    deadline::Deadline,
    error::{Error, Reason},
    net::identity::Caller,
    state::{Begin, Limit, Record, Store, StoredOutcome, Ticket, Verdict, Waited},
    telemetry::logs::Output,
};

/// How long an attempt waits for IAM after its caller's deadline passed.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything an attempt needs, shared by all of them.
pub(crate) struct Gate {
    /// Shared with the key custody's background work.
    pub(crate) iam: Arc<Iam>,
    pub(crate) store: Store,
    pub(crate) principals: Principals,
    pub(crate) policies: PolicyCache,
    /// Attempt tasks, waited for at shutdown.
    pub(crate) tracker: TaskTracker,
    /// One token per attempt that went to IAM, held until its audit event
    /// is written: shutdown waits for all of them.
    pub(crate) at_iam: TaskTracker,
    /// The log writer: no attempt goes to IAM while it is stalled.
    pub(crate) sink: Output,
}

/// A checked `ChangePassword` request.
pub(crate) struct Request {
    pub(crate) caller: Arc<Caller>,
    pub(crate) old: Password,
    pub(crate) new: Password,
    pub(crate) validate_only: bool,
    /// A valid UUID, when the caller sent one.
    pub(crate) request_id: Option<String>,
    pub(crate) deadline: Deadline,
    pub(crate) audit: Arc<AuditSlot>,
}

/// A successful attempt.
#[derive(Debug, Clone)]
pub(crate) struct Changed {
    /// Whose password changed (or would), as IAM reports it when known.
    pub(crate) iam_user: String,
    /// IAM's request id; empty for `validate_only`.
    pub(crate) iam_request_id: String,
    /// The stored outcome of an earlier call with the same `request_id`.
    pub(crate) replayed: bool,
}

/// What the caller is told.
pub(crate) type Answer = Result<Changed, Error>;

/// Sends the caller's answer once; later sends are dropped.
struct Reply(Option<oneshot::Sender<Answer>>);

impl Reply {
    fn send(&mut self, answer: Answer) {
        if let Some(tx) = self.0.take() {
            // The handler may be gone (cancelled): the attempt goes on.
            let _ = tx.send(answer);
        }
    }
}

type Running = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The part of an attempt still running when its driver goes away: it moves
/// to a task of its own, tracked for shutdown.
struct Detach {
    attempt: Option<Running>,
    tracker: TaskTracker,
}

impl Drop for Detach {
    fn drop(&mut self) {
        if let Some(attempt) = self.attempt.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(self.tracker.track_future(attempt));
        }
    }
}

/// Runs the attempt; returns the caller's answer by the request's deadline.
/// Dropping this future does not stop the attempt.
pub(crate) async fn answer(gate: &Arc<Gate>, request: Request) -> Answer {
    let (tx, mut rx) = oneshot::channel();
    request.audit.hand_off();
    let span = tracing::Span::current();
    let audit = request.audit.clone();
    // The last resort, for a panic outside `attempt`'s own guard (the
    // request_id claim, storing the outcome): the attempt future never
    // unwinds into its driver, so it is never polled again after a panic.
    let run = AssertUnwindSafe(run(gate.clone(), request, Reply(Some(tx))))
        .catch_unwind()
        .map(move |ended| {
            if let Err(panic) = ended {
                log_panic(panic.as_ref());
                audit.close(Outcome {
                    outcome: Reason::InternalError.as_str(),
                    ..Outcome::default()
                });
            }
        });
    let mut detach = Detach {
        attempt: Some(Box::pin(run.instrument(span))),
        tracker: gate.tracker.clone(),
    };
    let answer = std::future::poll_fn(|cx| {
        if let Some(attempt) = detach.attempt.as_mut()
            && attempt.as_mut().poll(cx).is_ready()
        {
            detach.attempt = None;
        }
        // The attempt answers before it ends; an attempt that ended without
        // answering (a panic) closes the channel.
        Pin::new(&mut rx).poll(cx)
    })
    .await;
    drop(detach);
    // Only a panicked attempt leaves no answer, and then nobody knows
    // whether IAM was called.
    answer.unwrap_or(Err(Error::Internal {
        maybe_sent: true,
        iam_outcome: None,
        aws: None,
    }))
}

/// Logs a caught panic once, with its message.
fn log_panic(panic: &(dyn Any + Send)) {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(
        panic = message,
        "a password change attempt panicked; it ends INTERNAL_ERROR"
    );
}

async fn run(gate: Arc<Gate>, request: Request, mut reply: Reply) {
    if request.validate_only {
        let answer = validate(&gate, &request).await;
        return finish(&request, &mut reply, answer, false);
    }
    let caller = request.caller.key.as_str();
    let request_id = request.request_id.as_deref();
    let ticket = loop {
        let begun = gate.store.begin(caller, request_id, request.deadline).await;
        let waited = match (begun, request_id) {
            (Ok(Begin::Granted(ticket)), _) => break ticket,
            (Ok(Begin::Refused(limit)), _) => {
                return finish(&request, &mut reply, Err(refusal(&gate, limit)), false);
            }
            (Ok(Begin::Done(stored)), _) => return replay(&request, &mut reply, stored),
            (Ok(Begin::Lost), _) => Ok(Waited::Lost),
            (Ok(Begin::Pending), Some(id)) => gate.store.wait(caller, id, request.deadline).await,
            // A store error: nothing was reserved, claimed or replayed.
            (Err(e), _) => return finish(&request, &mut reply, Err(e), false),
            (Ok(Begin::Pending), None) => Err(Error::StateUnavailable(crate::error::Cause::msg(
                "the store reported a pending claim for a call without request_id",
            ))),
        };
        let ended = match waited {
            Ok(Waited::Done(stored)) => return replay(&request, &mut reply, stored),
            // The first call gave up having changed nothing: run again.
            Ok(Waited::Gone) if !request.deadline.passed() => continue,
            Ok(Waited::Gone) => Error::DeadlineBeforeSend { stage: "state" },
            Ok(Waited::StillPending) => Error::StillInProgress,
            Ok(Waited::Lost) => Error::OutcomeLost,
            Err(e) => e,
        };
        // No stored outcome was found: nothing here is a replay.
        return finish(&request, &mut reply, Err(ended), false);
    };

    let answer = attempt(&gate, &request, &mut reply, ticket).await;
    finish(&request, &mut reply, answer, false);
}

/// What a refusal by the limits tells the caller.
fn refusal(gate: &Gate, limit: Limit) -> Error {
    match limit {
        Limit::Failures(retry_after) => Error::TooManyFailedAttempts { retry_after },
        Limit::InFlight => Error::CallerConcurrencyExceeded {
            limit: gate.store.failed_attempts(),
        },
        Limit::RequestIds(retry_after) => Error::TooManyRequestIds {
            limit: gate.store.max_request_ids(),
            retry_after,
        },
    }
}

/// What a retry with the same `request_id` must get: the stored outcome, or
/// (when the attempt changed nothing and a retry should run again) nothing.
fn record(answer: &Answer) -> Record {
    match answer {
        // A panic before anything was sent changed nothing: a retry runs.
        Err(Error::Internal {
            maybe_sent: false, ..
        }) => Record::Release,
        Ok(changed) => Record::Store(StoredOutcome::Changed {
            iam_user: changed.iam_user.clone(),
            iam_request_id: changed.iam_request_id.clone(),
        }),
        Err(e) if runs_again_on_retry(e.reason()) => Record::Release,
        Err(e) => Record::Store(StoredOutcome::Rejected(e.rejection())),
    }
}

/// Outcomes that changed nothing and invite a retry: a retry with the same
/// `request_id` runs the attempt again instead of replaying them.
fn runs_again_on_retry(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::DeadlineBeforeSend
            | Reason::TooManyFailedAttempts
            | Reason::IamThrottled
            | Reason::EntityTemporarilyUnmodifiable
            | Reason::IamServiceFailure
            | Reason::IamUnreachable
            | Reason::IamTimeout
            | Reason::StateUnavailable
            | Reason::CallerConcurrencyExceeded
            | Reason::AuditUnavailable
            | Reason::TooManyRequestIds
            | Reason::KeySourceUnavailable
            // Nothing was sent, and a new caller's key is often provisioned
            // minutes after its first call: the retry then runs.
            | Reason::IamUserNotProvisioned
    )
}

fn replay(request: &Request, reply: &mut Reply, stored: StoredOutcome) {
    let answer = match stored {
        StoredOutcome::Changed {
            iam_user,
            iam_request_id,
        } => Ok(Changed {
            iam_user,
            iam_request_id,
            replayed: true,
        }),
        StoredOutcome::Rejected(rejection) => Err(Error::Replayed(Box::new(rejection))),
    };
    finish(request, reply, answer, true);
}

/// Writes the audit event and answers the caller (if not answered yet).
fn finish(request: &Request, reply: &mut Reply, answer: Answer, replayed: bool) {
    let outcome = match &answer {
        Ok(_) if request.validate_only => "VALIDATED",
        Ok(_) => "OK",
        Err(e) => e.reason().as_str(),
    };
    let iam_request_id = match &answer {
        Ok(c) if !c.iam_request_id.is_empty() => Some(c.iam_request_id.clone()),
        Ok(_) => None,
        Err(e) => e.rejection().aws_request_id,
    };
    let iam_outcome = match &answer {
        Err(Error::Internal { iam_outcome, .. }) => *iam_outcome,
        _ => None,
    };
    if let Ok(c) = &answer {
        request.audit.set_iam_user(&c.iam_user);
    }
    request.audit.close(Outcome {
        outcome,
        iam_request_id,
        replayed,
        iam_outcome,
    });
    reply.send(answer);
}

/// A pre-send step, bounded by the deadline.
async fn bounded<T>(
    deadline: Deadline,
    stage: &'static str,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout_at(deadline.instant(), step)
        .await
        .unwrap_or(Err(Error::DeadlineBeforeSend { stage }))
}

/// A `validate_only` call: no reservation (a validation never reaches
/// ChangePassword), but a locked-out caller is still told so.
async fn validate(gate: &Gate, request: &Request) -> Answer {
    if let Some(retry_after) = bounded(
        request.deadline,
        "state",
        gate.store.check(&request.caller.key),
    )
    .await?
    {
        return Err(Error::TooManyFailedAttempts { retry_after });
    }
    prepare(gate, request).await.map(|prepared| Changed {
        iam_user: prepared.iam_user,
        iam_request_id: String::new(),
        replayed: false,
    })
}

/// The attempt proper, once reserved: identity, policy, IAM. Its end
/// settles the limit and the `request_id` record with IAM's own answer, also
/// when credgate failed after it (a caught panic).
async fn attempt(gate: &Gate, request: &Request, reply: &mut Reply, mut ticket: Ticket) -> Answer {
    let witness = Witness::default();
    let answer = guarded(&witness, async {
        let prepared = prepare(gate, request).await?;
        ticket.sending();
        change(gate, request, prepared, reply, &witness).await
    })
    .await;
    let settles = witness.answer.get().unwrap_or(&answer);
    ticket.end(verdict(settles), record(settles)).await;
    answer
}

/// What reached IAM and what it answered, kept outside the attempt's
/// future so that a panic after IAM answered cannot lose it.
#[derive(Default)]
struct Witness {
    /// Set (by the SDK interceptor) once the request may have left.
    transmitted: Arc<AtomicBool>,
    /// IAM's answer (or the upstream wait's end), once known.
    answer: OnceLock<Answer>,
}

impl Witness {
    /// Records IAM's answer and hands it on.
    fn answered(&self, answer: Answer) -> Answer {
        let _ = self.answer.set(answer.clone());
        #[cfg(feature = "fault-injection")]
        crate::fault::point("after_iam");
        answer
    }

    /// The answer of an attempt that panicked: INTERNAL_ERROR, with what
    /// IAM answered when it did.
    fn after_panic(&self) -> Answer {
        let iam = self.answer.get();
        Err(Error::Internal {
            maybe_sent: self.transmitted.load(Ordering::Acquire),
            iam_outcome: iam.map(|a| a.as_ref().map_or_else(|e| e.reason().as_str(), |_| "OK")),
            aws: iam.map(|a| match a {
                Ok(changed) => crate::error::AwsContext {
                    code: None,
                    request_id: Some(changed.iam_request_id.clone()).filter(|id| !id.is_empty()),
                },
                Err(e) => e.aws().cloned().unwrap_or_default(),
            }),
        })
    }
}

/// Runs `step` and turns a panic in it into [`Witness::after_panic`]: the
/// attempt then still settles, stores and audits as any other.
async fn guarded(witness: &Witness, step: impl Future<Output = Answer>) -> Answer {
    match AssertUnwindSafe(step).catch_unwind().await {
        Ok(answer) => answer,
        Err(panic) => {
            log_panic(panic.as_ref());
            witness.after_panic()
        }
    }
}

/// What is known before calling IAM.
struct Prepared {
    /// The IAM user, as IAM reports it when verified.
    iam_user: String,
    /// Whether the profile's key is known to be that user's.
    verified: bool,
}

/// Whose key signs for `caller`.
pub(crate) fn signer(caller: &Caller) -> Signer {
    Signer::new(&caller.iam_user, caller.aws_profile.as_deref())
}

/// Verifies the caller's key and checks the new password against the
/// account policy.
async fn prepare(gate: &Gate, request: &Request) -> Result<Prepared, Error> {
    let caller = &request.caller;
    let signer = signer(caller);
    let (iam_user, verified) = match gate
        .principals
        .check(&gate.iam, &signer, request.deadline)
        .await?
    {
        Principal::Verified(name) => (name, true),
        Principal::Unverifiable => (caller.iam_user.clone(), false),
    };
    match gate
        .policies
        .get(&gate.iam, &signer, request.deadline)
        .await
    {
        Ok(Some(policy)) => {
            let violations = policy.violations(&request.new);
            if !violations.is_empty() {
                return Err(Error::PolicyViolation {
                    violations,
                    aws: None,
                });
            }
        }
        Ok(None) => {}
        // validate_only promises the policy was checked.
        Err(e) if request.validate_only => return Err(e),
        // Out of time: the change itself was never sent.
        Err(_) if request.deadline.passed() => {
            return Err(Error::DeadlineBeforeSend { stage: "policy" });
        }
        // A real change can go ahead while time remains: IAM enforces the
        // policy itself.
        Err(e) => tracing::warn!(
            reason = %e.reason(),
            error = %e,
            "account password policy unavailable; relying on IAM's own check"
        ),
    }
    Ok(Prepared { iam_user, verified })
}

/// Calls IAM `ChangePassword`, answering the caller at its deadline at the
/// latest, and returns IAM's real outcome (also into `witness`).
async fn change(
    gate: &Gate,
    request: &Request,
    prepared: Prepared,
    reply: &mut Reply,
    witness: &Witness,
) -> Answer {
    // The last moment to refuse: an attempt whose audit event could not be
    // written now is not made.
    if gate.sink.stalled() {
        return Err(Error::AuditUnavailable);
    }
    request.audit.reached_iam(gate.at_iam.token());
    let caller = &request.caller;
    let Prepared { iam_user, verified } = prepared;
    let transmitted = witness.transmitted.clone();
    // The signer's kind disambiguates InvalidUserType: a verified profile is
    // known to hold an IAM user's key; otherwise the key's shape decides.
    let verified = verified.then_some(true);
    let signer = signer(caller);
    let call = TRANSMITTED.scope(
        transmitted.clone(),
        gate.iam.change_password(
            &signer,
            &request.old,
            &request.new,
            request.deadline,
            verified,
        ),
    );
    tokio::pin!(call);
    let changed = |iam_request_id| Changed {
        iam_user: iam_user.clone(),
        iam_request_id,
        replayed: false,
    };
    tokio::select! {
        result = &mut call => return witness.answered(result.map(changed)),
        () = tokio::time::sleep_until(request.deadline.instant()) => {}
    }
    if !transmitted.load(Ordering::Acquire) {
        // Nothing was handed to the network yet, and the call is not being
        // polled: dropping it cannot send anything.
        return Err(Error::DeadlineBeforeSend { stage: "iam" });
    }
    reply.send(Err(Error::OutcomeUnknown {
        aws: None,
        cause: None,
    }));
    let result = match tokio::time::timeout(UPSTREAM_TIMEOUT, &mut call).await {
        Ok(result) => result.map(changed),
        Err(_) => Err(Error::OutcomeUnknown {
            aws: None,
            cause: Some(crate::error::Cause::msg(format!(
                "IAM did not answer within {}s after the caller's deadline",
                UPSTREAM_TIMEOUT.as_secs()
            ))),
        }),
    };
    tracing::info!(
        outcome = result
            .as_ref()
            .map_or_else(|e| e.reason().as_str(), |_| "OK"),
        "IAM answered after the caller's deadline; recorded for the audit, the limit and the request_id"
    );
    witness.answered(result)
}

/// What an attempt's end means for the wrong-old-password limit. Only a
/// change clears the caller's failures. An answer that shows the old
/// password wrong, or cannot rule that out, counts; an attempt whose old
/// password was never tested, or not shown wrong, is released.
///
/// No wildcard: a new error must be placed here on purpose.
fn verdict(answer: &Answer) -> Verdict {
    let Err(e) = answer else {
        return Verdict::Success;
    };
    match e {
        // A wrong old password, or an answer that cannot rule one out:
        // AWS does not document in which order IAM checks the old password
        // and these conditions.
        Error::OldPasswordIncorrect(_)
        | Error::OutcomeUnknown { .. }
        | Error::IamServiceFailure(_)
        | Error::IamError(_)
        | Error::InvalidUserType(_)
        | Error::IamLimitExceeded(_)
        | Error::EntityTemporarilyUnmodifiable(_)
        // A panic after the request may have left, IAM's answer unknown.
        | Error::Internal {
            maybe_sent: true, ..
        } => Verdict::Failure,
        // IAM refused the new password. Whichever IAM checks first, the old
        // password was either right or not tested, so it is no wrong guess;
        // but it is no change either, and clearing the failures on it would
        // let a guesser reset the limit at will (AWS does not document that
        // IAM checks the old password first).
        Error::PolicyViolation { .. }
        // Never sent, or refused before the old password was looked at
        // (authentication, authorization, no login profile, throttling).
        | Error::DeadlineBeforeSend { .. }
        | Error::IamTimeout
        | Error::IamUnreachable(_)
        | Error::IamThrottled(_)
        | Error::IamUserMismatch
        | Error::StateUnavailable(_)
        | Error::UpstreamCredentialsRejected(..)
        | Error::IamAccessDenied(_)
        | Error::LoginProfileMissing(_)
        | Error::IamUserNotProvisioned
        | Error::KeySourceUnavailable(_)
        | Error::AuditUnavailable
        | Error::Internal {
            maybe_sent: false, ..
        }
        // Refused before the attempt was reserved: this attempt sent nothing.
        | Error::CallerNotMapped { .. }
        | Error::PasswordInvalid(_)
        | Error::TooManyFailedAttempts { .. }
        | Error::CallerConcurrencyExceeded { .. }
        | Error::TooManyRequestIds { .. }
        | Error::RequestIdInvalid
        | Error::RequestMalformed(_)
        | Error::RequestTooLarge { .. }
        | Error::CompressionUnsupported
        | Error::UnknownMethod
        | Error::StillInProgress
        | Error::OutcomeLost
        | Error::Replayed(_) => Verdict::Release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{AwsContext, Cause, IamCode};

    fn aws(code: IamCode) -> AwsContext {
        AwsContext {
            code: Some(code),
            request_id: None,
        }
    }

    /// Every reason, with the verdict its error gets. Only a change is a
    /// success; IAM's own policy violation is released, never a success.
    #[test]
    fn the_verdict_of_every_reason_follows_the_table() {
        use crate::error::Violation;
        let violation = || Violation {
            field: "new_password",
            description: "x".into(),
        };
        let rows: Vec<(Error, Verdict)> = vec![
            (
                Error::CallerNotMapped {
                    presented: "cn=x".into(),
                },
                Verdict::Release,
            ),
            (Error::PasswordInvalid(violation()), Verdict::Release),
            (
                Error::PolicyViolation {
                    violations: vec![violation()],
                    aws: None,
                },
                Verdict::Release,
            ),
            (
                Error::PolicyViolation {
                    violations: vec![violation()],
                    aws: Some(aws(IamCode::PasswordPolicyViolation)),
                },
                Verdict::Release,
            ),
            (
                Error::OldPasswordIncorrect(aws(IamCode::InvalidUserType)),
                Verdict::Failure,
            ),
            (
                Error::TooManyFailedAttempts {
                    retry_after: Duration::from_secs(1),
                },
                Verdict::Release,
            ),
            (
                Error::InvalidUserType(aws(IamCode::InvalidUserType)),
                Verdict::Failure,
            ),
            (
                Error::LoginProfileMissing(aws(IamCode::NoSuchEntity)),
                Verdict::Release,
            ),
            (
                Error::IamAccessDenied(aws(IamCode::AccessDenied)),
                Verdict::Release,
            ),
            (
                Error::IamLimitExceeded(aws(IamCode::LimitExceeded)),
                Verdict::Failure,
            ),
            (
                Error::IamThrottled(aws(IamCode::Throttling)),
                Verdict::Release,
            ),
            (
                Error::EntityTemporarilyUnmodifiable(aws(IamCode::EntityTemporarilyUnmodifiable)),
                Verdict::Failure,
            ),
            (
                Error::IamServiceFailure(aws(IamCode::ServiceFailure)),
                Verdict::Failure,
            ),
            (
                Error::UpstreamCredentialsRejected(Some(aws(IamCode::InvalidClientTokenId)), None),
                Verdict::Release,
            ),
            (
                Error::IamUnreachable(Cause::msg("refused")),
                Verdict::Release,
            ),
            (
                Error::OutcomeUnknown {
                    aws: None,
                    cause: None,
                },
                Verdict::Failure,
            ),
            (Error::StillInProgress, Verdict::Release),
            (Error::OutcomeLost, Verdict::Release),
            (Error::DeadlineBeforeSend { stage: "iam" }, Verdict::Release),
            (Error::IamTimeout, Verdict::Release),
            (Error::IamUserMismatch, Verdict::Release),
            (
                Error::CallerConcurrencyExceeded { limit: 5 },
                Verdict::Release,
            ),
            (Error::RequestIdInvalid, Verdict::Release),
            (
                Error::StateUnavailable(Cause::msg("down")),
                Verdict::Release,
            ),
            (
                Error::IamError(aws(IamCode::Other("New".into()))),
                Verdict::Failure,
            ),
            (Error::RequestMalformed("x".into()), Verdict::Release),
            (Error::RequestTooLarge { limit: 1 }, Verdict::Release),
            (Error::CompressionUnsupported, Verdict::Release),
            (Error::UnknownMethod, Verdict::Release),
            (Error::AuditUnavailable, Verdict::Release),
            (
                Error::Internal {
                    maybe_sent: false,
                    iam_outcome: None,
                    aws: None,
                },
                Verdict::Release,
            ),
            (
                Error::Internal {
                    maybe_sent: true,
                    iam_outcome: None,
                    aws: None,
                },
                Verdict::Failure,
            ),
            (
                Error::TooManyRequestIds {
                    limit: 1,
                    retry_after: Duration::from_secs(1),
                },
                Verdict::Release,
            ),
            (
                Error::Replayed(Box::new(
                    Error::OldPasswordIncorrect(aws(IamCode::InvalidUserType)).rejection(),
                )),
                Verdict::Release,
            ),
            (Error::IamUserNotProvisioned, Verdict::Release),
            (
                Error::KeySourceUnavailable(Cause::msg("down")),
                Verdict::Release,
            ),
        ];
        for reason in Reason::ALL {
            assert!(
                rows.iter().any(|(e, _)| e.reason() == *reason),
                "{reason} has no row"
            );
        }
        for (error, expected) in rows {
            assert_eq!(verdict(&Err(error.clone())), expected, "{error:?}");
        }
        let changed: Answer = Ok(Changed {
            iam_user: "u".into(),
            iam_request_id: "r".into(),
            replayed: false,
        });
        assert_eq!(verdict(&changed), Verdict::Success, "only a change");
    }

    #[tokio::test]
    async fn a_panic_after_iam_answered_keeps_iams_answer_for_the_audit_and_the_limit() {
        let witness = Witness::default();
        let answer = guarded(&witness, async {
            witness.transmitted.store(true, Ordering::Release);
            let _ = witness.answered(Err(Error::OldPasswordIncorrect(AwsContext {
                code: Some(IamCode::InvalidUserType),
                request_id: Some("req-7".into()),
            })));
            panic!("a bug after IAM answered");
        })
        .await;
        let Err(Error::Internal {
            maybe_sent,
            iam_outcome,
            aws,
        }) = &answer
        else {
            panic!("{answer:?}");
        };
        assert!(*maybe_sent);
        assert_eq!(*iam_outcome, Some("OLD_PASSWORD_INCORRECT"));
        assert_eq!(
            aws.as_ref().and_then(|a| a.request_id.as_deref()),
            Some("req-7")
        );
        // What settles the limit is IAM's answer: a wrong old password.
        let settles = witness.answer.get().unwrap_or(&answer);
        assert_eq!(verdict(settles), Verdict::Failure);

        // A panic before anything was sent releases the reservation.
        let witness = Witness::default();
        let answer = guarded(&witness, async { panic!("a bug before IAM") }).await;
        assert_eq!(verdict(&answer), Verdict::Release);
    }

    #[test]
    fn outcomes_that_changed_nothing_run_again_on_retry_and_the_others_replay() {
        for reason in Reason::ALL {
            if runs_again_on_retry(*reason) {
                assert!(reason.guarantees_not_applied(), "{reason}");
            }
        }
        assert!(!runs_again_on_retry(Reason::OutcomeUnknown));
        assert!(!runs_again_on_retry(Reason::OldPasswordIncorrect));
        assert!(!runs_again_on_retry(Reason::PasswordPolicyViolation));
    }
}
