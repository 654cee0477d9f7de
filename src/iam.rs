//! The one narrow seam over aws-sdk-iam: the three IAM calls credgate makes,
//! deliberate retries, and the classification of every IAM outcome into
//! [`Error`].
//!
//! Retries: `ChangePassword` is not idempotent, so a request is repeated only
//! when it provably was not applied — the connection to IAM never opened, or
//! IAM answered `Throttling` — and once after refreshing credentials that IAM
//! called expired or unknown. A deadline that passes while a request is in
//! flight is `OUTCOME_UNKNOWN`, never a retry.

use std::{error::Error as StdError, future::Future, time::Duration};

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_iam::{
    Client,
    error::{ProvideErrorMetadata, SdkError},
    operation::RequestId,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    credentials::IamClients,
    error::{AwsContext, Error},
    identity::Caller,
    password::{Password, Policy, Violation},
    telemetry,
};

/// Attempts for outcomes that were provably not applied.
const MAX_ATTEMPTS: u32 = 3;
/// First backoff; doubles each attempt.
const BASE_BACKOFF: Duration = Duration::from_millis(100);

/// How an SDK call failed, before deciding what that means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// IAM answered with an error.
    Answered {
        /// IAM's error code; `None` when the body had none (e.g. a proxy's 503).
        code: Option<String>,
        /// IAM's request id.
        request_id: Option<String>,
        /// HTTP status, consulted only when there is no code.
        status: u16,
    },
    /// The connection never opened: nothing reached IAM.
    NeverSent(String),
    /// The request may have reached IAM but no answer came back.
    MaybeSent,
    /// The profile's credentials could not be loaded.
    NoCredentials(String),
}

impl Failure {
    fn of<E>(err: &SdkError<E>) -> Self
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        if let Some(e) = find_in_chain::<CredentialsError>(err) {
            return Self::NoCredentials(e.to_string());
        }
        match err {
            SdkError::ServiceError(ctx) => Self::Answered {
                code: ctx.err().code().map(str::to_owned),
                request_id: err.request_id().map(str::to_owned),
                status: ctx.raw().status().as_u16(),
            },
            SdkError::ResponseError(ctx) => Self::Answered {
                code: None,
                request_id: err.request_id().map(str::to_owned),
                status: ctx.raw().status().as_u16(),
            },
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                match find_in_chain::<hyper_util::client::legacy::Error>(err) {
                    Some(e) if e.is_connect() => {
                        Self::NeverSent(aws_sdk_iam::error::DisplayErrorContext(err).to_string())
                    }
                    _ => Self::MaybeSent,
                }
            }
            // Failed while building the request: nothing was sent.
            _ => Self::NeverSent(aws_sdk_iam::error::DisplayErrorContext(err).to_string()),
        }
    }

    /// Whether repeating the request cannot apply a change twice.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Answered { code, .. } => code.as_deref() == Some("Throttling"),
            Self::NeverSent(_) => true,
            Self::MaybeSent | Self::NoCredentials(_) => false,
        }
    }

    /// Whether re-reading the profile might help: IAM called the key expired
    /// or unknown (a rotated Secret), or the profile could not be loaded (a
    /// Secret fixed since start-up).
    fn is_stale_credentials(&self) -> bool {
        match self {
            Self::Answered { code: Some(c), .. } => {
                c == "ExpiredToken" || c == "InvalidClientTokenId"
            }
            Self::NoCredentials(_) => true,
            _ => false,
        }
    }
}

fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// Classifies a failed IAM call on IAM's error code (never on the message
/// text, and on the HTTP status only when there is no code).
///
/// `signer_is_iam_user` disambiguates `InvalidUserType`: IAM sends it for a
/// wrong old password and for principals that are not IAM users.
pub fn classify(failure: Failure, signer_is_iam_user: bool) -> Error {
    let (code, request_id, status) = match failure {
        Failure::Answered {
            code,
            request_id,
            status,
        } => (code, request_id, status),
        Failure::NeverSent(detail) => return Error::IamUnreachable(detail),
        Failure::MaybeSent => return Error::OutcomeUnknown,
        Failure::NoCredentials(_) => return Error::UpstreamCredentialsRejected(None),
    };
    let aws = AwsContext {
        code: code.clone().unwrap_or_default(),
        request_id,
    };
    match code.as_deref() {
        Some("PasswordPolicyViolation") => Error::PolicyViolation {
            violations: vec![Violation {
                field: "new_password",
                description: "IAM rejected the new password under the account password policy \
                              (for example, a recently used password)"
                    .to_owned(),
            }],
            aws: Some(aws),
        },
        Some("InvalidUserType") if signer_is_iam_user => Error::OldPasswordIncorrect(aws),
        Some("InvalidUserType") => Error::InvalidUserType(aws),
        Some("NoSuchEntity") => Error::LoginProfileMissing(aws),
        Some("AccessDenied") => Error::IamAccessDenied(aws),
        Some("LimitExceeded") => Error::IamLimitExceeded(aws),
        Some("Throttling") => Error::IamThrottled(aws),
        Some("EntityTemporarilyUnmodifiable") => Error::EntityTemporarilyUnmodifiable(aws),
        Some("ServiceFailure") => Error::IamServiceFailure(aws),
        Some("InvalidClientTokenId" | "SignatureDoesNotMatch" | "ExpiredToken") => {
            Error::UpstreamCredentialsRejected(Some(aws))
        }
        Some(_) => Error::IamError(aws),
        None if status >= 500 => Error::IamServiceFailure(aws),
        None => Error::IamError(aws),
    }
}

/// A successful change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// IAM's request id.
    pub request_id: String,
}

/// IAM, as credgate uses it.
pub struct Iam {
    clients: IamClients,
}

impl Iam {
    /// Wraps the per-profile clients.
    pub fn new(clients: IamClients) -> Self {
        Self { clients }
    }

    /// Changes `caller`'s IAM user's console password, signed with that
    /// user's own key.
    pub async fn change_password(
        &self,
        caller: &Caller,
        old: &Password,
        new: &Password,
        deadline: Instant,
    ) -> Result<Changed, Error> {
        let span = client_span("ChangePassword", self.clients.region());
        let result = self
            .call(&caller.aws_profile, deadline, |client| {
                client
                    .change_password()
                    .old_password(old.expose())
                    .new_password(new.expose())
                    .send()
            })
            .instrument(span.clone())
            .await;
        record_outcome(&span, "ChangePassword", &result);
        result.map(|(_, request_id)| Changed { request_id })
    }

    /// The account password policy, `None` when the account has none.
    pub async fn password_policy(
        &self,
        caller: &Caller,
        deadline: Instant,
    ) -> Result<Option<Policy>, Error> {
        let span = client_span("GetAccountPasswordPolicy", self.clients.region());
        let result = self
            .call(&caller.aws_profile, deadline, |client| {
                client.get_account_password_policy().send()
            })
            .instrument(span.clone())
            .await;
        match result {
            // IAM's way of saying "this account has no password policy"
            // (classified as a missing entity, which it is).
            Err(Error::LoginProfileMissing(aws)) => {
                telemetry::count_iam_outcome("GetAccountPasswordPolicy", &aws.code);
                Ok(None)
            }
            result => {
                record_outcome(&span, "GetAccountPasswordPolicy", &result);
                result.map(|(out, _)| out.password_policy().map(policy_from_iam))
            }
        }
    }

    /// The IAM user name that `profile`'s credentials belong to.
    pub async fn user_name(&self, profile: &str, deadline: Instant) -> Result<String, Error> {
        let (out, _) = self
            .call(profile, deadline, |client| client.get_user().send())
            .await?;
        Ok(out
            .user()
            .map(|u| u.user_name().to_owned())
            .unwrap_or_default())
    }

    async fn call<T, E, F, Fut>(
        &self,
        profile: &str,
        deadline: Instant,
        op: F,
    ) -> Result<(T, String), Error>
    where
        T: RequestId,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
    {
        let mut refreshed = false;
        let mut attempt = 1;
        loop {
            let client = self
                .clients
                .get(profile)
                .ok_or(Error::UpstreamCredentialsRejected(None))?;
            let sent = tokio::time::timeout_at(deadline, op(client.client.clone())).await;
            let failure = match sent {
                Err(_elapsed) => return Err(Error::OutcomeUnknown),
                Ok(Ok(out)) => {
                    let request_id = out.request_id().unwrap_or_default().to_owned();
                    return Ok((out, request_id));
                }
                Ok(Err(err)) => {
                    tracing::debug!(error = %aws_sdk_iam::error::DisplayErrorContext(&err), attempt, "IAM call failed");
                    Failure::of(&err)
                }
            };
            if failure.is_stale_credentials() && !refreshed {
                refreshed = true;
                tracing::info!(
                    profile,
                    "IAM rejected the credentials; re-reading the profile once"
                );
                self.clients.refresh(profile).await;
                continue;
            }
            let backoff = BASE_BACKOFF * 2u32.pow(attempt - 1);
            if failure.is_retryable()
                && attempt < MAX_ATTEMPTS
                && Instant::now() + backoff < deadline
            {
                attempt += 1;
                tokio::time::sleep(backoff).await;
                continue;
            }
            return Err(classify(failure, client.signs_as_iam_user().await));
        }
    }
}

fn client_span(method: &'static str, region: &str) -> tracing::Span {
    tracing::info_span!(
        "IAM",
        otel.name = format!("IAM.{method}"),
        otel.kind = "client",
        rpc.system = "aws-api",
        rpc.service = "IAM",
        rpc.method = method,
        cloud.region = region,
        aws.request_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// Records the outcome on the CLIENT span (request id; on failure status
/// Error and an `exception` event with IAM's code) and in the outcome counter.
fn record_outcome<T>(
    span: &tracing::Span,
    method: &'static str,
    result: &Result<(T, String), Error>,
) {
    match result {
        Ok((_, request_id)) => {
            span.record("aws.request_id", request_id.as_str());
            telemetry::count_iam_outcome(method, "OK");
        }
        Err(err) => {
            if let Some(aws) = err.aws()
                && let Some(id) = &aws.request_id
            {
                span.record("aws.request_id", id.as_str());
            }
            span.record("otel.status_code", "ERROR");
            let code = err
                .aws()
                .map(|a| a.code.as_str())
                .filter(|c| !c.is_empty())
                .unwrap_or(err.reason());
            telemetry::count_iam_outcome(method, code);
            span.in_scope(|| {
                tracing::event!(
                    tracing::Level::WARN,
                    exception.type = code,
                    exception.message = %err,
                    "exception"
                );
            });
        }
    }
}

fn policy_from_iam(p: &aws_sdk_iam::types::PasswordPolicy) -> Policy {
    let days = |v: Option<i32>| v.and_then(|d| u32::try_from(d).ok()).unwrap_or(0);
    Policy {
        minimum_length: days(p.minimum_password_length()),
        require_symbols: p.require_symbols(),
        require_numbers: p.require_numbers(),
        require_uppercase: p.require_uppercase_characters(),
        require_lowercase: p.require_lowercase_characters(),
        allow_users_to_change_password: p.allow_users_to_change_password(),
        max_age_days: days(p.max_password_age()),
        reuse_prevention: days(p.password_reuse_prevention()),
        hard_expiry: p.hard_expiry().unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(code: &str, status: u16) -> Failure {
        Failure::Answered {
            code: Some(code.to_owned()),
            request_id: Some("rid".to_owned()),
            status,
        }
    }

    #[test]
    fn each_iam_code_classifies_to_its_row() {
        let rows = [
            ("PasswordPolicyViolation", true, "PASSWORD_POLICY_VIOLATION"),
            ("InvalidUserType", true, "OLD_PASSWORD_INCORRECT"),
            ("InvalidUserType", false, "INVALID_USER_TYPE"),
            ("NoSuchEntity", true, "LOGIN_PROFILE_MISSING"),
            ("AccessDenied", true, "IAM_ACCESS_DENIED"),
            ("LimitExceeded", true, "IAM_LIMIT_EXCEEDED"),
            ("Throttling", true, "IAM_THROTTLED"),
            (
                "EntityTemporarilyUnmodifiable",
                true,
                "ENTITY_TEMPORARILY_UNMODIFIABLE",
            ),
            ("ServiceFailure", true, "IAM_SERVICE_FAILURE"),
            (
                "InvalidClientTokenId",
                true,
                "UPSTREAM_CREDENTIALS_REJECTED",
            ),
            (
                "SignatureDoesNotMatch",
                true,
                "UPSTREAM_CREDENTIALS_REJECTED",
            ),
            ("ExpiredToken", true, "UPSTREAM_CREDENTIALS_REJECTED"),
            ("SomethingNew", true, "IAM_ERROR"),
        ];
        for (code, user, reason) in rows {
            let err = classify(answered(code, 400), user);
            assert_eq!(err.reason(), reason, "{code}");
            let aws = err.aws().expect("IAM answered");
            assert_eq!(aws.code, code);
            assert_eq!(aws.request_id.as_deref(), Some("rid"));
        }
    }

    #[test]
    fn the_http_status_is_used_only_without_a_code() {
        // A 500 with a client-error code is still classified by the code.
        assert_eq!(
            classify(answered("AccessDenied", 500), true).reason(),
            "IAM_ACCESS_DENIED"
        );
        let no_code = |status| Failure::Answered {
            code: None,
            request_id: None,
            status,
        };
        assert_eq!(classify(no_code(503), true).reason(), "IAM_SERVICE_FAILURE");
        assert_eq!(classify(no_code(418), true).reason(), "IAM_ERROR");
    }

    #[test]
    fn transport_failures_classify_by_whether_anything_was_sent() {
        assert_eq!(
            classify(Failure::NeverSent("refused".into()), true).reason(),
            "IAM_UNREACHABLE"
        );
        assert_eq!(
            classify(Failure::MaybeSent, true).reason(),
            "OUTCOME_UNKNOWN"
        );
        assert_eq!(
            classify(Failure::NoCredentials("no profile".into()), true).reason(),
            "UPSTREAM_CREDENTIALS_REJECTED"
        );
    }

    #[test]
    fn only_unapplied_outcomes_are_retryable() {
        assert!(answered("Throttling", 400).is_retryable());
        assert!(Failure::NeverSent(String::new()).is_retryable());
        assert!(!Failure::MaybeSent.is_retryable());
        for code in [
            "ServiceFailure",
            "LimitExceeded",
            "EntityTemporarilyUnmodifiable",
        ] {
            assert!(!answered(code, 500).is_retryable(), "{code}");
        }
    }
}
