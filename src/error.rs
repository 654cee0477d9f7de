//! The one error type of the RPC boundary, the table of reasons, and the one
//! mapping to `tonic::Status` with `google.rpc` details (DESIGN.md, "Error
//! model").
//!
//! An [`Error`] is what went wrong, with its cause chain for the server log.
//! A [`Rejection`] is what the caller is told: reason, message, IAM's code and
//! request id, field violations and a retry delay. It is plain data, so the
//! outcome of a `ChangePassword` can be stored under its `request_id` and
//! replayed as the very same status. [`Rejection::into_status`] is the only
//! place a status is built.

use std::{collections::HashMap, error::Error as StdError, fmt, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// ErrorInfo domain of every credgate error.
pub(crate) const DOMAIN: &str = "credgate";

/// Retry hint for retryable outcomes without a better estimate.
pub(crate) const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest `peerIdentity` put into error metadata and logs: a certificate
/// with thousands of names must not turn every rejection into kilobytes.
pub(crate) const MAX_PRESENTED_LEN: usize = 256;

macro_rules! reasons {
    ($($variant:ident => $name:literal, $code:ident, $not_applied:literal;)*) => {
        /// The stable, machine-readable ErrorInfo reasons.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Reason {
            /// Every reason, in table order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            /// The reason as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name,)* }
            }

            /// The gRPC status code the reason is sent with.
            pub fn code(self) -> Code {
                match self { $(Self::$variant => Code::$code,)* }
            }

            /// Whether this outcome guarantees that IAM applied nothing, so
            /// the very same request may be sent again (DESIGN.md's "not
            /// applied" column).
            pub fn guarantees_not_applied(self) -> bool {
                match self { $(Self::$variant => $not_applied,)* }
            }

            /// The reason for its wire name.
            pub fn parse(name: &str) -> Option<Reason> {
                match name { $($name => Some(Self::$variant),)* _ => None }
            }
        }
    };
}

// The table. "not applied" is true only where credgate knows that nothing
// changed: refused before IAM, or IAM's answer says so.
reasons! {
    CallerNotMapped => "CALLER_NOT_MAPPED", PermissionDenied, true;
    PasswordInvalid => "PASSWORD_INVALID", InvalidArgument, true;
    PasswordPolicyViolation => "PASSWORD_POLICY_VIOLATION", InvalidArgument, true;
    OldPasswordIncorrect => "OLD_PASSWORD_INCORRECT", PermissionDenied, true;
    TooManyFailedAttempts => "TOO_MANY_FAILED_ATTEMPTS", ResourceExhausted, true;
    InvalidUserType => "INVALID_USER_TYPE", FailedPrecondition, true;
    LoginProfileMissing => "LOGIN_PROFILE_MISSING", FailedPrecondition, true;
    IamAccessDenied => "IAM_ACCESS_DENIED", PermissionDenied, true;
    IamLimitExceeded => "IAM_LIMIT_EXCEEDED", ResourceExhausted, true;
    IamThrottled => "IAM_THROTTLED", Unavailable, true;
    EntityTemporarilyUnmodifiable => "ENTITY_TEMPORARILY_UNMODIFIABLE", Unavailable, true;
    IamServiceFailure => "IAM_SERVICE_FAILURE", Unavailable, true;
    UpstreamCredentialsRejected => "UPSTREAM_CREDENTIALS_REJECTED", FailedPrecondition, true;
    IamUnreachable => "IAM_UNREACHABLE", Unavailable, true;
    OutcomeUnknown => "OUTCOME_UNKNOWN", DeadlineExceeded, false;
    DeadlineBeforeSend => "DEADLINE_BEFORE_SEND", DeadlineExceeded, true;
    IamTimeout => "IAM_TIMEOUT", DeadlineExceeded, true;
    IamUserMismatch => "IAM_USER_MISMATCH", FailedPrecondition, true;
    CallerConcurrencyExceeded => "CALLER_CONCURRENCY_EXCEEDED", ResourceExhausted, true;
    RequestIdInvalid => "REQUEST_ID_INVALID", InvalidArgument, true;
    StateUnavailable => "STATE_UNAVAILABLE", Unavailable, true;
    IamError => "IAM_ERROR", Internal, false;
    RequestTooLarge => "REQUEST_TOO_LARGE", ResourceExhausted, true;
    RequestMalformed => "REQUEST_MALFORMED", Internal, true;
    CompressionUnsupported => "COMPRESSION_UNSUPPORTED", Unimplemented, true;
    UnknownMethod => "UNKNOWN_METHOD", Unimplemented, true;
    AuditUnavailable => "AUDIT_UNAVAILABLE", Unavailable, true;
    InternalError => "INTERNAL_ERROR", Internal, false;
    TooManyRequestIds => "TOO_MANY_REQUEST_IDS", ResourceExhausted, true;
    IamUserNotProvisioned => "IAM_USER_NOT_PROVISIONED", FailedPrecondition, true;
    KeySourceUnavailable => "KEY_SOURCE_UNAVAILABLE", Unavailable, true;
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Reason::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown reason {name:?}")))
    }
}

/// One unmet rule, for a `google.rpc.BadRequest` field violation.
///
/// Descriptions are logged and stored (a `request_id`'s outcome, in Redis
/// for 24 hours), so they say which rule is unmet and nothing about the
/// password itself: not its characters, not its length, not where in it a
/// bad character sits (a position is a lower bound on the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The request field, e.g. `new_password`.
    pub field: &'static str,
    /// The unmet rule, in words.
    pub description: String,
}

/// Attached to every status credgate builds (as its source) so that the
/// tower layers can read the reason without decoding the details.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReasonTag(pub(crate) Reason);

impl fmt::Display for ReasonTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl StdError for ReasonTag {}

/// The reason of a status built by [`Rejection::into_status`].
pub(crate) fn reason_of(status: &Status) -> Option<Reason> {
    status
        .source()
        .and_then(|s| s.downcast_ref::<ReasonTag>())
        .map(|t| t.0)
}

macro_rules! iam_codes {
    ($($variant:ident,)*) => {
        /// The IAM (and STS) error codes credgate tells apart.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum IamCode {
            $(
                #[doc = concat!("`", stringify!($variant), "`")]
                $variant,
            )*
            /// Any code not listed, kept verbatim for `awsErrorCode`.
            Other(String),
        }

        impl IamCode {
            /// The code for IAM's text.
            pub fn parse(code: &str) -> IamCode {
                match code {
                    $(stringify!($variant) => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// The code as IAM writes it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => stringify!($variant),)*
                    Self::Other(code) => code,
                }
            }
        }
    };
}

iam_codes! {
    PasswordPolicyViolation,
    InvalidUserType,
    NoSuchEntity,
    AccessDenied,
    LimitExceeded,
    Throttling,
    EntityTemporarilyUnmodifiable,
    ServiceFailure,
    InvalidClientTokenId,
    SignatureDoesNotMatch,
    ExpiredToken,
}

/// What IAM said when it answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsContext {
    /// IAM's error code; `None` when the answer had none (a proxy's 502).
    pub code: Option<IamCode>,
    /// IAM's request id, when the response carried one.
    pub request_id: Option<String>,
}

/// A cause kept for the server log only: callers never see its text (it can
/// name internal hosts, proxies or file paths).
#[derive(Clone)]
pub struct Cause(Arc<dyn StdError + Send + Sync>);

impl Cause {
    /// Wraps any error.
    pub fn new(err: impl StdError + Send + Sync + 'static) -> Self {
        Self(Arc::new(err))
    }

    /// A cause that is only a message.
    pub fn msg(text: impl Into<String>) -> Self {
        Self(Arc::new(Message(text.into())))
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for Message {}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl StdError for Cause {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0.source()
    }
}

/// The whole cause chain of `err`, for one server-side log field.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = String::new();
    let mut next = err.source();
    while let Some(e) = next {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// Everything that can end an RPC unsuccessfully.
///
/// Messages are written here, never copied from a request, so no variant can
/// carry a password; causes (`#[source]`) go to the server log only.
#[derive(Debug, Clone, thiserror::Error)]
// Variants are named for their ErrorInfo reasons, IAM_ERROR included.
#[allow(clippy::enum_variant_names)]
pub enum Error {
    /// The caller's certificate identity is not in `[[callers]]`.
    #[error("caller {presented} is not mapped to an IAM user")]
    CallerNotMapped {
        /// What the certificate presented, truncated to [`MAX_PRESENTED_LEN`].
        presented: String,
    },
    /// A password breaks IAM's length or character rules.
    #[error("{}: {}", .0.field, .0.description)]
    PasswordInvalid(Violation),
    /// The new password breaks the account password policy.
    #[error("new_password does not meet the account password policy")]
    PolicyViolation {
        /// One entry per unmet rule.
        violations: Vec<Violation>,
        /// Set when IAM itself rejected the password.
        aws: Option<AwsContext>,
    },
    /// IAM rejected the old password.
    #[error("old_password is incorrect")]
    OldPasswordIncorrect(AwsContext),
    /// The caller guessed wrong too often.
    #[error("too many incorrect old passwords; retry after {}s", .retry_after.as_secs().max(1))]
    TooManyFailedAttempts {
        /// When the oldest failure leaves the window.
        retry_after: Duration,
    },
    /// The configured credentials are not an IAM user's.
    #[error("the credentials of this caller's profile do not belong to an IAM user")]
    InvalidUserType(AwsContext),
    /// The IAM user has no console password.
    #[error("the IAM user has no login profile (console password)")]
    LoginProfileMissing(AwsContext),
    /// IAM's policy evaluation denied the call.
    #[error("IAM denied the request (AccessDenied)")]
    IamAccessDenied(AwsContext),
    /// An IAM quota was hit.
    #[error("IAM limit exceeded")]
    IamLimitExceeded(AwsContext),
    /// IAM throttled the call.
    #[error("IAM throttled the request")]
    IamThrottled(AwsContext),
    /// The IAM user is being modified concurrently.
    #[error("the IAM user is temporarily unmodifiable")]
    EntityTemporarilyUnmodifiable(AwsContext),
    /// IAM failed internally and said so (`ServiceFailure`).
    #[error("IAM failed to process the request")]
    IamServiceFailure(AwsContext),
    /// IAM rejected the access key, or no credentials could be loaded.
    #[error("IAM rejected the credentials of this caller's profile")]
    UpstreamCredentialsRejected(Option<AwsContext>, #[source] Option<Cause>),
    /// The request never reached IAM.
    #[error("IAM is unreachable; the request was not sent")]
    IamUnreachable(#[source] Cause),
    /// The deadline passed (or the answer was lost) after the request may
    /// have reached IAM.
    #[error(
        "no answer from IAM in time, after the request may have reached it; \
         the password may or may not have changed: retry with the same request_id"
    )]
    OutcomeUnknown {
        /// IAM's (or a proxy's) partial answer, when there was one.
        aws: Option<AwsContext>,
        /// Why the answer was lost, for the log.
        #[source]
        cause: Option<Cause>,
    },
    /// An earlier call with the same `request_id` is still running.
    #[error(
        "an earlier call with this request_id is still running; \
         retry with the same request_id to get its outcome"
    )]
    StillInProgress,
    /// An earlier call with this `request_id` was interrupted before its
    /// outcome could be recorded (a replica stopped mid-call).
    #[error(
        "the call that first used this request_id was interrupted before its outcome \
         was recorded; the password may or may not have changed"
    )]
    OutcomeLost,
    /// The deadline passed before anything was sent to IAM.
    #[error("the deadline passed before the request was sent to IAM ({stage}); nothing changed")]
    DeadlineBeforeSend {
        /// Where the time went: `queue`, `body`, `state`, `policy`, `identity`, ...
        stage: &'static str,
    },
    /// A read from IAM (the password policy, an identity) got no answer in
    /// time. Nothing changes on a read.
    #[error("IAM did not answer in time; nothing was changed")]
    IamTimeout,
    /// The caller's IAM user has no key in the key source: a templated
    /// caller's built profile the AWS shared files do not define, no
    /// secret (Secrets Manager), or a secret without a usable key.
    #[error(
        "the IAM user this caller acts as has no access key in credgate's key source; \
         nothing was sent to IAM: the operator must provision it"
    )]
    IamUserNotProvisioned,
    /// The caller's profile signs as another principal than its `iam_user`.
    #[error(
        "the credentials configured for this caller belong to another principal \
         than its IAM user; the operator must fix the profile"
    )]
    IamUserMismatch,
    /// The caller already has as many requests (`max_requests_per_caller`)
    /// or password changes (`failed_attempts`) in flight as it may.
    #[error("too many calls in flight from this caller (at most {limit}); retry shortly")]
    CallerConcurrencyExceeded {
        /// The limit that was reached.
        limit: usize,
    },
    /// `request_id` is set but not a UUID.
    #[error("request_id must be a UUID (e.g. 0b7e6f2a-3c1d-4e5f-8a9b-0c1d2e3f4a5b)")]
    RequestIdInvalid,
    /// The shared state store (Redis) could not be used: fail closed.
    #[error("the shared state store is unavailable; nothing was sent to IAM")]
    StateUnavailable(#[source] Cause),
    /// Any other IAM answer.
    #[error("IAM returned an unexpected error")]
    IamError(AwsContext),
    /// The stored outcome of an earlier call with the same `request_id`.
    #[error("{}", .0.message)]
    Replayed(Box<Rejection>),
    /// The request is not a valid `credgate.v1` message.
    #[error("the request is not a valid credgate.v1 message: {0}")]
    RequestMalformed(String),
    /// The request is larger than credgate accepts.
    #[error("the request is larger than {limit} bytes")]
    RequestTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The request names a `grpc-encoding` other than `identity`: credgate
    /// reads no compressed messages (a password needs no compression, and
    /// a decompressor is attack surface).
    #[error(
        "compressed requests are not accepted: send them uncompressed (grpc-encoding identity)"
    )]
    CompressionUnsupported,
    /// A path under `credgate.v1.PasswordService` that names no method.
    #[error("credgate.v1.PasswordService has no such method")]
    UnknownMethod,
    /// The audit event of the attempt could not be written (the log sink
    /// accepts no bytes), so the attempt is not made.
    #[error(
        "the audit log cannot be written right now; the change was not sent to IAM, retry shortly"
    )]
    AuditUnavailable,
    /// A bug: the attempt panicked, and the panic was caught.
    #[error(
        "credgate failed internally while handling this call; the password may or may not have \
         changed (see awsRequestId when IAM answered): do not retry blindly"
    )]
    Internal {
        /// Whether the change may have been handed to IAM before the panic.
        maybe_sent: bool,
        /// What IAM answered before the panic (`OK` or a reason), when it did:
        /// the audit event carries it.
        iam_outcome: Option<&'static str>,
        /// IAM's answer, when there was one.
        aws: Option<AwsContext>,
    },
    /// The caller already holds `state.max_request_ids_per_caller` stored
    /// `request_id` outcomes (or claims): a new id would grow the shared
    /// store without bound.
    #[error(
        "this caller already has {limit} request_id outcomes stored; \
         retry after {}s, when the oldest expires", .retry_after.as_secs().max(1)
    )]
    TooManyRequestIds {
        /// The limit that was reached.
        limit: u32,
        /// When the oldest record expires.
        retry_after: Duration,
    },
    /// The key source (Secrets Manager) could not be read, and no key of
    /// the user was at hand.
    #[error("credgate cannot read this caller's access key right now; nothing was sent to IAM")]
    KeySourceUnavailable(#[source] Cause),
}

impl Error {
    /// The ErrorInfo reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::CallerNotMapped { .. } => Reason::CallerNotMapped,
            Self::PasswordInvalid(_) => Reason::PasswordInvalid,
            Self::PolicyViolation { .. } => Reason::PasswordPolicyViolation,
            Self::OldPasswordIncorrect(_) => Reason::OldPasswordIncorrect,
            Self::TooManyFailedAttempts { .. } => Reason::TooManyFailedAttempts,
            Self::InvalidUserType(_) => Reason::InvalidUserType,
            Self::LoginProfileMissing(_) => Reason::LoginProfileMissing,
            Self::IamAccessDenied(_) => Reason::IamAccessDenied,
            Self::IamLimitExceeded(_) => Reason::IamLimitExceeded,
            Self::IamThrottled(_) => Reason::IamThrottled,
            Self::EntityTemporarilyUnmodifiable(_) => Reason::EntityTemporarilyUnmodifiable,
            Self::IamServiceFailure(_) => Reason::IamServiceFailure,
            Self::UpstreamCredentialsRejected(..) => Reason::UpstreamCredentialsRejected,
            Self::IamUnreachable(_) => Reason::IamUnreachable,
            Self::OutcomeUnknown { .. } | Self::StillInProgress | Self::OutcomeLost => {
                Reason::OutcomeUnknown
            }
            Self::DeadlineBeforeSend { .. } => Reason::DeadlineBeforeSend,
            Self::IamTimeout => Reason::IamTimeout,
            Self::IamUserMismatch => Reason::IamUserMismatch,
            Self::IamUserNotProvisioned => Reason::IamUserNotProvisioned,
            Self::CallerConcurrencyExceeded { .. } => Reason::CallerConcurrencyExceeded,
            Self::RequestIdInvalid => Reason::RequestIdInvalid,
            Self::StateUnavailable(_) => Reason::StateUnavailable,
            Self::IamError(_) => Reason::IamError,
            Self::RequestMalformed(_) => Reason::RequestMalformed,
            Self::RequestTooLarge { .. } => Reason::RequestTooLarge,
            Self::CompressionUnsupported => Reason::CompressionUnsupported,
            Self::UnknownMethod => Reason::UnknownMethod,
            Self::AuditUnavailable => Reason::AuditUnavailable,
            Self::Internal { .. } => Reason::InternalError,
            Self::TooManyRequestIds { .. } => Reason::TooManyRequestIds,
            Self::KeySourceUnavailable(_) => Reason::KeySourceUnavailable,
            Self::Replayed(r) => r.reason,
        }
    }

    /// IAM's answer, when there was one.
    pub fn aws(&self) -> Option<&AwsContext> {
        match self {
            Self::OldPasswordIncorrect(aws)
            | Self::InvalidUserType(aws)
            | Self::LoginProfileMissing(aws)
            | Self::IamAccessDenied(aws)
            | Self::IamLimitExceeded(aws)
            | Self::IamThrottled(aws)
            | Self::EntityTemporarilyUnmodifiable(aws)
            | Self::IamServiceFailure(aws)
            | Self::IamError(aws) => Some(aws),
            Self::PolicyViolation { aws, .. }
            | Self::UpstreamCredentialsRejected(aws, _)
            | Self::OutcomeUnknown { aws, .. }
            | Self::Internal { aws, .. } => aws.as_ref(),
            _ => None,
        }
    }

    /// The retry delay a client should wait, for outcomes worth retrying.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::TooManyFailedAttempts { retry_after }
            | Self::TooManyRequestIds { retry_after, .. } => Some(*retry_after),
            Self::IamThrottled(_)
            | Self::EntityTemporarilyUnmodifiable(_)
            | Self::IamServiceFailure(_)
            | Self::IamUnreachable(_)
            | Self::StillInProgress
            | Self::CallerConcurrencyExceeded { .. }
            | Self::StateUnavailable(_)
            | Self::KeySourceUnavailable(_)
            | Self::AuditUnavailable => Some(DEFAULT_RETRY_DELAY),
            _ => None,
        }
    }

    /// What the caller is told.
    pub fn rejection(&self) -> Rejection {
        if let Self::Replayed(stored) = self {
            return (**stored).clone();
        }
        let aws = self.aws();
        let mut violations = Vec::new();
        match self {
            Self::PasswordInvalid(v) => violations.push(FieldViolation::from(v)),
            Self::PolicyViolation { violations: v, .. } => {
                violations.extend(v.iter().map(FieldViolation::from));
            }
            Self::RequestIdInvalid => violations.push(FieldViolation {
                field: "request_id".to_owned(),
                description: "must be a UUID".to_owned(),
            }),
            _ => {}
        }
        Rejection {
            reason: self.reason(),
            message: self.to_string(),
            aws_error_code: aws
                .and_then(|a| a.code.as_ref())
                .map(|c| c.as_str().to_owned()),
            aws_request_id: aws.and_then(|a| a.request_id.clone()),
            peer_identity: match self {
                Self::CallerNotMapped { presented } => Some(presented.clone()),
                _ => None,
            },
            violations,
            retry_after_ms: self.retry_after().map(|d| {
                // Never 0: "retry after 0 s" reads as "retry at once".
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
            }),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        err.rejection().into_status()
    }
}

/// One `google.rpc.BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldViolation {
    /// The request field.
    pub field: String,
    /// What is wrong with it (never its value).
    pub description: String,
}

impl From<&Violation> for FieldViolation {
    fn from(v: &Violation) -> Self {
        Self {
            field: v.field.to_owned(),
            description: v.description.clone(),
        }
    }
}

/// What a caller is told about a failure: plain data, storable and replayable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The ErrorInfo reason (its code follows from it).
    pub reason: Reason,
    /// The status message.
    pub message: String,
    /// `awsErrorCode` metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_error_code: Option<String>,
    /// `awsRequestId` metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_request_id: Option<String>,
    /// `peerIdentity` metadata (CALLER_NOT_MAPPED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    /// BadRequest field violations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub violations: Vec<FieldViolation>,
    /// RetryInfo delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Rejection {
    /// The status sent to the caller: the one place credgate builds one.
    pub fn into_status(self) -> Status {
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::new();
        if let Some(code) = self.aws_error_code {
            metadata.insert("awsErrorCode".to_owned(), code);
        }
        if let Some(id) = self.aws_request_id {
            metadata.insert("awsRequestId".to_owned(), id);
        }
        if let Some(peer) = self.peer_identity {
            metadata.insert("peerIdentity".to_owned(), peer);
        }
        for v in &self.violations {
            details.add_bad_request_violation(&v.field, &v.description);
        }
        if self.reason == Reason::IamLimitExceeded {
            details.add_quota_failure_violation(
                "iam",
                "an IAM quota was exceeded; see awsErrorCode and the IAM quotas page",
            );
        }
        if self.reason == Reason::TooManyRequestIds {
            details.add_quota_failure_violation(
                "request_id",
                "stored request_id outcomes per caller (state.max_request_ids_per_caller)",
            );
        }
        if let Some(ms) = self.retry_after_ms {
            details.set_retry_info(Some(Duration::from_millis(ms)));
        }
        details.set_error_info(self.reason.as_str(), DOMAIN, metadata);
        let mut status = Status::with_error_details(self.reason.code(), self.message, details);
        if self.reason == Reason::CompressionUnsupported {
            // What the gRPC compression spec asks of a server refusing an
            // encoding: name the ones it accepts.
            status.metadata_mut().insert(
                "grpc-accept-encoding",
                tonic::metadata::MetadataValue::from_static("identity"),
            );
        }
        status.set_source(Arc::new(ReasonTag(self.reason)));
        status
    }
}

/// Logs a failed RPC once, with its cause chain (server-side only), records
/// its reason on the RPC span, and converts it.
pub(crate) fn reject(err: Error) -> Status {
    let reason = err.reason();
    tracing::Span::current().record("error.type", reason.as_str());
    let cause = chain(&err);
    if cause.is_empty() {
        tracing::info!(reason = reason.as_str(), error = %err, "request rejected");
    } else {
        tracing::info!(reason = reason.as_str(), error = %err, cause, "request rejected");
    }
    err.into()
}

/// `text`, cut to at most `max` bytes on a character boundary, marked when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...(truncated)", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws(code: IamCode) -> AwsContext {
        AwsContext {
            code: Some(code),
            request_id: Some("req-1".to_owned()),
        }
    }

    fn every_error() -> Vec<Error> {
        let v = Violation {
            field: "new_password",
            description: "x".into(),
        };
        vec![
            Error::CallerNotMapped {
                presented: "cn=x".into(),
            },
            Error::PasswordInvalid(v.clone()),
            Error::PolicyViolation {
                violations: vec![v],
                aws: None,
            },
            Error::OldPasswordIncorrect(aws(IamCode::InvalidUserType)),
            Error::TooManyFailedAttempts {
                retry_after: Duration::from_secs(3),
            },
            Error::InvalidUserType(aws(IamCode::InvalidUserType)),
            Error::LoginProfileMissing(aws(IamCode::NoSuchEntity)),
            Error::IamAccessDenied(aws(IamCode::AccessDenied)),
            Error::IamLimitExceeded(aws(IamCode::LimitExceeded)),
            Error::IamThrottled(aws(IamCode::Throttling)),
            Error::EntityTemporarilyUnmodifiable(aws(IamCode::EntityTemporarilyUnmodifiable)),
            Error::IamServiceFailure(aws(IamCode::ServiceFailure)),
            Error::UpstreamCredentialsRejected(Some(aws(IamCode::InvalidClientTokenId)), None),
            Error::IamUnreachable(Cause::msg("refused")),
            Error::OutcomeUnknown {
                aws: None,
                cause: None,
            },
            Error::DeadlineBeforeSend { stage: "queue" },
            Error::IamTimeout,
            Error::IamUserMismatch,
            Error::CallerConcurrencyExceeded { limit: 16 },
            Error::RequestIdInvalid,
            Error::StateUnavailable(Cause::msg("connection refused")),
            Error::IamError(aws(IamCode::Other("Weird".into()))),
            Error::RequestMalformed("invalid wire type".into()),
            Error::RequestTooLarge { limit: 4096 },
            Error::CompressionUnsupported,
            Error::UnknownMethod,
            Error::AuditUnavailable,
            Error::Internal {
                maybe_sent: true,
                iam_outcome: Some("OK"),
                aws: Some(AwsContext {
                    code: None,
                    request_id: Some("req-1".into()),
                }),
            },
            Error::TooManyRequestIds {
                limit: 1000,
                retry_after: Duration::from_secs(60),
            },
            Error::IamUserNotProvisioned,
            Error::KeySourceUnavailable(Cause::msg("Secrets Manager unreachable")),
        ]
    }

    #[test]
    fn every_reason_has_a_variant_and_maps_to_its_code() {
        let errors = every_error();
        for reason in Reason::ALL {
            assert!(
                errors.iter().any(|e| e.reason() == *reason),
                "{reason} has no error"
            );
            assert_eq!(Reason::parse(reason.as_str()), Some(*reason));
        }
        for err in errors {
            let reason = err.reason();
            let has_aws = err.aws().and_then(|a| a.code.as_ref()).is_some();
            let status = Status::from(err);
            assert_eq!(status.code(), reason.code(), "{reason}");
            assert_eq!(reason_of(&status), Some(reason));
            let details = status.get_error_details();
            let info = details.error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason.as_str());
            assert_eq!(info.domain, DOMAIN);
            assert_eq!(
                info.metadata.contains_key("awsErrorCode"),
                has_aws,
                "{reason}"
            );
        }
    }

    #[test]
    fn the_design_table_codes_hold() {
        let rows = [
            (Reason::CallerNotMapped, Code::PermissionDenied),
            (Reason::PasswordInvalid, Code::InvalidArgument),
            (Reason::OldPasswordIncorrect, Code::PermissionDenied),
            (Reason::TooManyFailedAttempts, Code::ResourceExhausted),
            (Reason::IamThrottled, Code::Unavailable),
            (
                Reason::UpstreamCredentialsRejected,
                Code::FailedPrecondition,
            ),
            (Reason::OutcomeUnknown, Code::DeadlineExceeded),
            (Reason::DeadlineBeforeSend, Code::DeadlineExceeded),
            (Reason::IamUserMismatch, Code::FailedPrecondition),
            (Reason::IamUserNotProvisioned, Code::FailedPrecondition),
            (Reason::CallerConcurrencyExceeded, Code::ResourceExhausted),
            (Reason::RequestIdInvalid, Code::InvalidArgument),
            (Reason::StateUnavailable, Code::Unavailable),
            (Reason::KeySourceUnavailable, Code::Unavailable),
            (Reason::IamError, Code::Internal),
        ];
        for (reason, code) in rows {
            assert_eq!(reason.code(), code, "{reason}");
        }
        assert!(!Reason::OutcomeUnknown.guarantees_not_applied());
        assert!(!Reason::IamError.guarantees_not_applied());
        assert!(Reason::DeadlineBeforeSend.guarantees_not_applied());
    }

    #[test]
    fn retryable_rows_carry_retry_info_and_quota_rows_quota_failure() {
        let throttled = Status::from(Error::IamThrottled(aws(IamCode::Throttling)));
        assert!(throttled.get_error_details().retry_info().is_some());
        let limit = Status::from(Error::IamLimitExceeded(aws(IamCode::LimitExceeded)));
        assert!(limit.get_error_details().quota_failure().is_some());
        assert!(limit.get_error_details().retry_info().is_none());
        let unknown = Status::from(Error::OutcomeUnknown {
            aws: None,
            cause: None,
        });
        assert!(unknown.get_error_details().retry_info().is_none());
        let running = Status::from(Error::StillInProgress);
        assert_eq!(reason_of(&running), Some(Reason::OutcomeUnknown));
        assert!(running.get_error_details().retry_info().is_some());
        let state = Status::from(Error::StateUnavailable(Cause::msg("down")));
        assert!(state.get_error_details().retry_info().is_some());
    }

    #[test]
    fn policy_violations_become_one_field_violation_each() {
        let violations = ["a", "b", "c"]
            .map(|d| Violation {
                field: "new_password",
                description: d.into(),
            })
            .to_vec();
        let status = Status::from(Error::PolicyViolation {
            violations,
            aws: None,
        });
        let details = status.get_error_details();
        let bad = details.bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations.len(), 3);
        assert!(
            bad.field_violations
                .iter()
                .all(|v| v.field == "new_password")
        );
    }

    #[test]
    fn a_stored_rejection_replays_as_the_same_status() {
        for err in every_error() {
            let rejection = err.rejection();
            let stored = serde_json::to_string(&rejection).expect("serialize");
            let replayed: Rejection = serde_json::from_str(&stored).expect("deserialize");
            assert_eq!(replayed, rejection);
            let (a, b) = (rejection.into_status(), replayed.into_status());
            assert_eq!((a.code(), a.message()), (b.code(), b.message()));
            // Compared decoded: the metadata map has no fixed order.
            let (a, b) = (a.get_error_details(), b.get_error_details());
            let shown = |d: &ErrorDetails| {
                let info = d.error_info().map(|i| {
                    let mut m: Vec<_> = i.metadata.iter().collect();
                    m.sort();
                    format!("{} {m:?}", i.reason)
                });
                format!(
                    "{info:?} {:?} {:?} {:?}",
                    d.bad_request(),
                    d.retry_info(),
                    d.quota_failure()
                )
            };
            assert_eq!(shown(&a), shown(&b));
        }
    }

    #[test]
    fn causes_stay_out_of_the_message() {
        let err = Error::IamUnreachable(Cause::msg("connect to 10.1.2.3:8080 (proxy) refused"));
        let status = Status::from(err.clone());
        assert!(!status.message().contains("10.1.2.3"), "{status:?}");
        assert!(chain(&err).contains("10.1.2.3"));
    }

    #[test]
    fn truncation_keeps_character_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        let cut = truncate("ééééé", 3);
        assert!(
            cut.starts_with('é') && cut.ends_with("(truncated)"),
            "{cut}"
        );
    }

    /// A gRPC code as the docs write it: `PERMISSION_DENIED`.
    fn screaming(code: Code) -> String {
        let mut out = String::new();
        for (i, c) in format!("{code:?}").chars().enumerate() {
            if c.is_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    /// `docs/errors.md`'s table names every reason of the table above, no
    /// other, each with its gRPC code and its "applied?" answer (no: IAM
    /// changed nothing; maybe: it may have).
    #[test]
    fn the_error_reference_lists_every_reason_with_its_code_and_applied_answer() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/errors.md");
        let text = std::fs::read_to_string(path).expect("docs/errors.md");
        let mut documented = Vec::new();
        for line in text.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`');
            let reason = Reason::parse(name)
                .unwrap_or_else(|| panic!("docs/errors.md names {name}, which is no reason"));
            assert!(
                cells[2].starts_with(&screaming(reason.code())),
                "docs/errors.md gives {name} the code {:?}; it is {}",
                cells[2],
                screaming(reason.code())
            );
            let applied = cells[5];
            let documented_not_applied = applied.starts_with("no");
            assert!(
                documented_not_applied || applied.contains("maybe"),
                "{name}: applied? is {applied:?}"
            );
            assert_eq!(
                documented_not_applied,
                reason.guarantees_not_applied(),
                "{name}: docs/errors.md says applied? {applied:?}"
            );
            documented.push(reason);
        }
        for reason in Reason::ALL {
            assert!(
                documented.contains(reason),
                "docs/errors.md has no row for {reason}"
            );
        }
        assert_eq!(documented.len(), Reason::ALL.len(), "one row per reason");
    }
}
