//! The one error type of the RPC boundary and its one mapping to
//! `tonic::Status` with `google.rpc` details (DESIGN.md, "Error model").

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::password::Violation;

/// ErrorInfo domain of every credgate error.
pub const DOMAIN: &str = "credgate";

/// Retry hint for retryable IAM outcomes without a better estimate.
const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// What IAM said when it answered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsContext {
    /// IAM's error code, e.g. `Throttling`.
    pub code: String,
    /// IAM's request id, when the response carried one.
    pub request_id: Option<String>,
}

/// Everything that can end an RPC unsuccessfully.
///
/// Messages are written here, never copied from a request, so no variant can
/// carry a password.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The caller's certificate identity is not in `[[callers]]`.
    #[error("caller {presented} is not mapped to an IAM user")]
    CallerNotMapped {
        /// The identities the certificate presented, for the operator.
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
    #[error("too many incorrect old passwords; retry after {}s", .retry_after.as_secs())]
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
    /// IAM failed internally.
    #[error("IAM failed to process the request")]
    IamServiceFailure(AwsContext),
    /// IAM rejected the access key, or no credentials could be loaded.
    #[error("IAM rejected the credentials of this caller's profile")]
    UpstreamCredentialsRejected(Option<AwsContext>),
    /// The request never reached IAM.
    #[error("IAM is unreachable: {0}")]
    IamUnreachable(String),
    /// The deadline passed after the request may have reached IAM.
    #[error(
        "the deadline passed after the request was sent to IAM; the password may or may not have changed"
    )]
    OutcomeUnknown,
    /// Any other IAM answer.
    #[error("IAM returned an unexpected error")]
    IamError(AwsContext),
    /// tonic could not decode the request (before any handler ran).
    #[error("the request is not a valid protobuf message: {0}")]
    RequestMalformed(String),
    /// The request is larger than credgate accepts (before decoding).
    #[error("the request is too large: {0}")]
    RequestTooLarge(String),
}

impl Error {
    /// The ErrorInfo reason: the stable, machine-readable name of the outcome.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CallerNotMapped { .. } => "CALLER_NOT_MAPPED",
            Self::PasswordInvalid(_) => "PASSWORD_INVALID",
            Self::PolicyViolation { .. } => "PASSWORD_POLICY_VIOLATION",
            Self::OldPasswordIncorrect(_) => "OLD_PASSWORD_INCORRECT",
            Self::TooManyFailedAttempts { .. } => "TOO_MANY_FAILED_ATTEMPTS",
            Self::InvalidUserType(_) => "INVALID_USER_TYPE",
            Self::LoginProfileMissing(_) => "LOGIN_PROFILE_MISSING",
            Self::IamAccessDenied(_) => "IAM_ACCESS_DENIED",
            Self::IamLimitExceeded(_) => "IAM_LIMIT_EXCEEDED",
            Self::IamThrottled(_) => "IAM_THROTTLED",
            Self::EntityTemporarilyUnmodifiable(_) => "ENTITY_TEMPORARILY_UNMODIFIABLE",
            Self::IamServiceFailure(_) => "IAM_SERVICE_FAILURE",
            Self::UpstreamCredentialsRejected(_) => "UPSTREAM_CREDENTIALS_REJECTED",
            Self::IamUnreachable(_) => "IAM_UNREACHABLE",
            Self::OutcomeUnknown => "OUTCOME_UNKNOWN",
            Self::IamError(_) => "IAM_ERROR",
            Self::RequestMalformed(_) => "REQUEST_MALFORMED",
            Self::RequestTooLarge(_) => "REQUEST_TOO_LARGE",
        }
    }

    /// The gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            Self::CallerNotMapped { .. }
            | Self::OldPasswordIncorrect(_)
            | Self::IamAccessDenied(_) => Code::PermissionDenied,
            Self::PasswordInvalid(_) | Self::PolicyViolation { .. } => Code::InvalidArgument,
            Self::TooManyFailedAttempts { .. } | Self::IamLimitExceeded(_) => {
                Code::ResourceExhausted
            }
            Self::InvalidUserType(_)
            | Self::LoginProfileMissing(_)
            | Self::UpstreamCredentialsRejected(_) => Code::FailedPrecondition,
            Self::IamThrottled(_)
            | Self::EntityTemporarilyUnmodifiable(_)
            | Self::IamServiceFailure(_)
            | Self::IamUnreachable(_) => Code::Unavailable,
            Self::OutcomeUnknown => Code::DeadlineExceeded,
            // The codes gRPC's status-code table gives a server for these.
            Self::IamError(_) | Self::RequestMalformed(_) => Code::Internal,
            Self::RequestTooLarge(_) => Code::ResourceExhausted,
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
            Self::PolicyViolation { aws, .. } | Self::UpstreamCredentialsRejected(aws) => {
                aws.as_ref()
            }
            Self::CallerNotMapped { .. }
            | Self::PasswordInvalid(_)
            | Self::TooManyFailedAttempts { .. }
            | Self::IamUnreachable(_)
            | Self::OutcomeUnknown
            | Self::RequestMalformed(_)
            | Self::RequestTooLarge(_) => None,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let mut details = ErrorDetails::new();
        let mut metadata = HashMap::new();
        if let Some(aws) = err.aws() {
            // Empty when IAM's answer had no code (e.g. a proxy's bare 503).
            if !aws.code.is_empty() {
                metadata.insert("awsErrorCode".to_owned(), aws.code.clone());
            }
            if let Some(id) = &aws.request_id {
                metadata.insert("awsRequestId".to_owned(), id.clone());
            }
        }
        match &err {
            Error::CallerNotMapped { presented } => {
                metadata.insert("peerIdentity".to_owned(), presented.clone());
            }
            Error::PasswordInvalid(v) => {
                details.add_bad_request_violation(v.field, &v.description);
            }
            Error::PolicyViolation { violations, .. } => {
                for v in violations {
                    details.add_bad_request_violation(v.field, &v.description);
                }
            }
            Error::TooManyFailedAttempts { retry_after } => {
                details.set_retry_info(Some(*retry_after));
            }
            Error::IamLimitExceeded(_) => {
                details.add_quota_failure_violation(
                    "iam",
                    "an IAM quota was exceeded; see awsErrorCode and the IAM quotas page",
                );
            }
            Error::IamThrottled(_)
            | Error::EntityTemporarilyUnmodifiable(_)
            | Error::IamServiceFailure(_)
            | Error::IamUnreachable(_) => {
                details.set_retry_info(Some(DEFAULT_RETRY_DELAY));
            }
            _ => {}
        }
        details.set_error_info(err.reason(), DOMAIN, metadata);
        Status::with_error_details(err.code(), err.to_string(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws(code: &str) -> AwsContext {
        AwsContext {
            code: code.to_owned(),
            request_id: Some("req-1".to_owned()),
        }
    }

    #[test]
    fn every_row_of_the_design_table_maps_to_its_code_and_reason() {
        let v = Violation {
            field: "new_password",
            description: "x".into(),
        };
        let rows: Vec<(Error, Code, &str)> = vec![
            (
                Error::CallerNotMapped {
                    presented: "cn=x".into(),
                },
                Code::PermissionDenied,
                "CALLER_NOT_MAPPED",
            ),
            (
                Error::PasswordInvalid(v.clone()),
                Code::InvalidArgument,
                "PASSWORD_INVALID",
            ),
            (
                Error::PolicyViolation {
                    violations: vec![v],
                    aws: None,
                },
                Code::InvalidArgument,
                "PASSWORD_POLICY_VIOLATION",
            ),
            (
                Error::OldPasswordIncorrect(aws("InvalidUserType")),
                Code::PermissionDenied,
                "OLD_PASSWORD_INCORRECT",
            ),
            (
                Error::TooManyFailedAttempts {
                    retry_after: Duration::from_secs(3),
                },
                Code::ResourceExhausted,
                "TOO_MANY_FAILED_ATTEMPTS",
            ),
            (
                Error::InvalidUserType(aws("InvalidUserType")),
                Code::FailedPrecondition,
                "INVALID_USER_TYPE",
            ),
            (
                Error::LoginProfileMissing(aws("NoSuchEntity")),
                Code::FailedPrecondition,
                "LOGIN_PROFILE_MISSING",
            ),
            (
                Error::IamAccessDenied(aws("AccessDenied")),
                Code::PermissionDenied,
                "IAM_ACCESS_DENIED",
            ),
            (
                Error::IamLimitExceeded(aws("LimitExceeded")),
                Code::ResourceExhausted,
                "IAM_LIMIT_EXCEEDED",
            ),
            (
                Error::IamThrottled(aws("Throttling")),
                Code::Unavailable,
                "IAM_THROTTLED",
            ),
            (
                Error::EntityTemporarilyUnmodifiable(aws("EntityTemporarilyUnmodifiable")),
                Code::Unavailable,
                "ENTITY_TEMPORARILY_UNMODIFIABLE",
            ),
            (
                Error::IamServiceFailure(aws("ServiceFailure")),
                Code::Unavailable,
                "IAM_SERVICE_FAILURE",
            ),
            (
                Error::UpstreamCredentialsRejected(Some(aws("InvalidClientTokenId"))),
                Code::FailedPrecondition,
                "UPSTREAM_CREDENTIALS_REJECTED",
            ),
            (
                Error::IamUnreachable("refused".into()),
                Code::Unavailable,
                "IAM_UNREACHABLE",
            ),
            (
                Error::OutcomeUnknown,
                Code::DeadlineExceeded,
                "OUTCOME_UNKNOWN",
            ),
            (Error::IamError(aws("Weird")), Code::Internal, "IAM_ERROR"),
            (
                Error::RequestMalformed("invalid wire type".into()),
                Code::Internal,
                "REQUEST_MALFORMED",
            ),
            (
                Error::RequestTooLarge("found 65550 bytes".into()),
                Code::ResourceExhausted,
                "REQUEST_TOO_LARGE",
            ),
        ];
        for (err, code, reason) in rows {
            let has_aws = err.aws().is_some();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{reason}");
            let details = status.get_error_details();
            let info = details.error_info().expect("ErrorInfo");
            assert_eq!(info.reason, reason);
            assert_eq!(info.domain, DOMAIN);
            assert_eq!(
                info.metadata.contains_key("awsErrorCode"),
                has_aws,
                "{reason}"
            );
        }
    }

    #[test]
    fn retryable_rows_carry_retry_info_and_quota_rows_quota_failure() {
        let throttled = Status::from(Error::IamThrottled(aws("Throttling")));
        assert!(throttled.get_error_details().retry_info().is_some());
        let limit = Status::from(Error::IamLimitExceeded(aws("LimitExceeded")));
        assert!(limit.get_error_details().quota_failure().is_some());
        assert!(limit.get_error_details().retry_info().is_none());
        let unknown = Status::from(Error::OutcomeUnknown);
        assert!(unknown.get_error_details().retry_info().is_none());
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
}
