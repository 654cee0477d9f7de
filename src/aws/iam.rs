//! The one narrow seam over the AWS SDK: the IAM and STS calls credgate
//! makes, deliberate retries, and the classification of every outcome into
//! [`Error`].
//!
//! Retries: `ChangePassword` is not idempotent, so a request is repeated only
//! when it provably was not applied — the connection to IAM never opened, or
//! IAM answered `Throttling` — and once after refreshing credentials that IAM
//! called expired or unknown. A request that may have been sent is never
//! repeated here.
//!
//! Honesty: an answer that may hide an applied change — a 2xx cut off
//! mid-body, a 5xx without an IAM error code (a proxy's 502/504), a timeout
//! after sending — is `OUTCOME_UNKNOWN` for a change. For reads it is
//! `IAM_TIMEOUT` or `IAM_SERVICE_FAILURE`: nothing changes on a read.

use std::{
    error::Error as StdError,
    future::Future,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use aws_config::timeout::TimeoutConfig;
use aws_credential_types::{Credentials, provider::error::CredentialsError};
use aws_sdk_iam::{
    error::{ProvideErrorMetadata, SdkError},
    operation::RequestId,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    aws::change_body::{FillPasswords, NEW_PLACEHOLDER, OLD_PLACEHOLDER},
    aws::credentials::{CONNECT_TIMEOUT, TRANSMITTED, UserClients},
    aws::keys::{Keys, Signer, key_id::redact_key_ids},
    aws::password::{Password, Policy},
    deadline::Deadline,
    error::{AwsContext, Cause, Error, IamCode, Violation},
    telemetry,
};

/// Attempts for outcomes that were provably not applied.
const MAX_ATTEMPTS: u32 = 3;
/// First backoff; doubles each attempt.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Connect timeouts used when less than [`CONNECT_TIMEOUT`] remains. A
/// handful of fixed values, because the SDK keeps one connection pool per
/// distinct timeout setting.
const SHORT_CONNECT_TIMEOUTS: [Duration; 5] = [
    Duration::from_secs(2),
    Duration::from_secs(1),
    Duration::from_millis(500),
    Duration::from_millis(250),
    Duration::from_millis(100),
];

/// How an SDK call failed, before deciding what that means for the caller.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// IAM (or something in front of it) answered.
    Answered {
        /// IAM's error code; `None` when the body had none (e.g. a proxy's 502).
        code: Option<IamCode>,
        /// IAM's request id.
        request_id: Option<String>,
        /// HTTP status.
        status: u16,
    },
    /// A response arrived but could not be read to the end (cut off).
    Unreadable {
        /// HTTP status of the unreadable response.
        status: u16,
        /// Why it could not be read.
        cause: Cause,
    },
    /// The connection never opened: nothing reached IAM.
    NeverSent(Cause),
    /// The request may have reached IAM but no answer came back.
    MaybeSent(Cause),
    /// The profile's credentials could not be loaded (nothing was sent).
    NoCredentials(Cause),
}

impl Failure {
    fn of<E>(err: SdkError<E>) -> Self
    where
        E: AwsError,
    {
        if find_in_chain::<CredentialsError>(&err).is_some() {
            return Self::NoCredentials(sdk_cause(&err));
        }
        match &err {
            SdkError::ServiceError(ctx) => Self::Answered {
                code: ctx.err().code().map(IamCode::parse),
                request_id: err.request_id().map(str::to_owned),
                status: ctx.raw().status().as_u16(),
            },
            SdkError::ResponseError(ctx) => Self::Unreadable {
                status: ctx.raw().status().as_u16(),
                cause: sdk_cause(&err),
            },
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                match find_in_chain::<hyper_util::client::legacy::Error>(&err) {
                    Some(e) if e.is_connect() => Self::NeverSent(sdk_cause(&err)),
                    _ => Self::MaybeSent(sdk_cause(&err)),
                }
            }
            // Failed while building or signing the request: nothing was sent.
            _ => Self::NeverSent(sdk_cause(&err)),
        }
    }

    /// Whether repeating the request cannot apply a change twice.
    fn is_retryable(&self) -> bool {
        match self {
            Self::Answered { code, .. } => *code == Some(IamCode::Throttling),
            Self::NeverSent(_) => true,
            Self::Unreadable { .. } | Self::MaybeSent(_) | Self::NoCredentials(_) => false,
        }
    }

    /// Whether re-reading the profile might help: IAM called the key expired
    /// or unknown (a rotated Secret), or the profile could not be loaded (a
    /// Secret fixed since start-up).
    fn is_stale_credentials(&self) -> bool {
        matches!(
            self,
            Self::Answered {
                code: Some(IamCode::ExpiredToken | IamCode::InvalidClientTokenId),
                ..
            } | Self::NoCredentials(_)
        )
    }
}

/// The SDK error as the SDK renders it with its whole context (endpoint,
/// connector, IAM's message): for the server log only.
fn sdk_cause<E: StdError + 'static>(err: &SdkError<E>) -> Cause {
    Cause::msg(redact_key_ids(
        &aws_sdk_iam::error::DisplayErrorContext(err).to_string(),
    ))
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
/// text), and on the HTTP status only when there is no code.
///
/// `signer_is_iam_user` disambiguates `InvalidUserType`: IAM sends it for a
/// wrong old password and for principals that are not IAM users.
pub(crate) fn classify(failure: Failure, signer_is_iam_user: bool) -> Error {
    let (code, request_id, status) = match failure {
        Failure::Answered {
            code,
            request_id,
            status,
        } => (code, request_id, status),
        Failure::Unreadable { status, cause } => {
            let aws = AwsContext::default();
            // A success cut off mid-body was applied; a cut-off 5xx may have
            // been. Only a client error is known not to have been.
            return if !(400..500).contains(&status) {
                Error::OutcomeUnknown {
                    aws: Some(aws),
                    cause: Some(cause),
                }
            } else {
                Error::IamError(aws)
            };
        }
        Failure::NeverSent(cause) => return Error::IamUnreachable(cause),
        Failure::MaybeSent(cause) => {
            return Error::OutcomeUnknown {
                aws: None,
                cause: Some(cause),
            };
        }
        Failure::NoCredentials(cause) => {
            return Error::UpstreamCredentialsRejected(None, Some(cause));
        }
    };
    let aws = AwsContext {
        code: code.clone(),
        request_id,
    };
    match code {
        Some(IamCode::PasswordPolicyViolation) => Error::PolicyViolation {
            violations: vec![Violation {
                field: "new_password",
                description: "IAM rejected the new password under the account password policy \
                              (for example, a recently used password)"
                    .to_owned(),
            }],
            aws: Some(aws),
        },
        Some(IamCode::InvalidUserType) if signer_is_iam_user => Error::OldPasswordIncorrect(aws),
        Some(IamCode::InvalidUserType) => Error::InvalidUserType(aws),
        Some(IamCode::NoSuchEntity) => Error::LoginProfileMissing(aws),
        Some(IamCode::AccessDenied) => Error::IamAccessDenied(aws),
        Some(IamCode::LimitExceeded) => Error::IamLimitExceeded(aws),
        Some(IamCode::Throttling) => Error::IamThrottled(aws),
        Some(IamCode::EntityTemporarilyUnmodifiable) => Error::EntityTemporarilyUnmodifiable(aws),
        Some(IamCode::ServiceFailure) => Error::IamServiceFailure(aws),
        Some(
            IamCode::InvalidClientTokenId | IamCode::SignatureDoesNotMatch | IamCode::ExpiredToken,
        ) => Error::UpstreamCredentialsRejected(Some(aws), None),
        Some(IamCode::Other(_)) => Error::IamError(aws),
        // A 5xx without IAM's code comes from something in front of IAM (a
        // proxy or VPC endpoint) that may have passed the request on.
        None if status >= 500 => Error::OutcomeUnknown {
            aws: Some(aws),
            cause: None,
        },
        None => Error::IamError(aws),
    }
}

/// What a read answers instead of `OUTCOME_UNKNOWN`: nothing changes on a
/// read, so a lost answer is a timeout or a service failure, and retrying
/// is always safe.
fn for_read(err: Error) -> Error {
    match err {
        Error::OutcomeUnknown { aws, .. } => Error::IamServiceFailure(aws.unwrap_or_default()),
        // An answer that could not be read at all (cut off): try again.
        Error::IamError(aws) if aws.code.is_none() => Error::IamServiceFailure(aws),
        other => other,
    }
}

/// Budget of each key-management call (rotation, key age): a background
/// step, not bound to a caller's deadline.
const KEY_CALL_BUDGET: Duration = Duration::from_secs(15);

/// Whose key a profile holds, as STS or IAM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallerIdentity {
    /// The principal's ARN.
    pub(crate) arn: String,
}

/// What an ARN says about its principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// An IAM user, by name (the last path segment).
    User(String),
    /// The account root user.
    Root,
    /// Anything else: an assumed-role or federated session.
    Other,
}

impl Principal {
    /// Reads `arn:<partition>:iam::<account>:user/<path/>name`,
    /// `arn:<partition>:iam::<account>:root`, or anything else.
    pub(crate) fn of_arn(arn: &str) -> Self {
        let mut parts = arn.splitn(6, ':');
        let (Some("arn"), Some(_partition), Some(service), Some(_region), Some(_account)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Self::Other;
        };
        match (service, parts.next()) {
            ("iam", Some("root")) => Self::Root,
            ("iam", Some(resource)) => match resource.strip_prefix("user/") {
                Some(path) => Self::User(path.rsplit('/').next().unwrap_or_default().to_owned()),
                None => Self::Other,
            },
            _ => Self::Other,
        }
    }
}

/// One access key of a user, as IAM lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccessKeyInfo {
    /// The access key id.
    pub(crate) id: String,
    /// `Active` (else `Inactive`).
    pub(crate) active: bool,
    /// When it was created.
    pub(crate) created: Option<SystemTime>,
}

/// When an access key was last used, as IAM records it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct LastUsed {
    /// When; `None`: never (or not yet recorded).
    pub(crate) at: Option<SystemTime>,
    /// The service it was used with.
    pub(crate) service: Option<String>,
}

/// AWS, as credgate uses it.
pub(crate) struct Iam {
    keys: Keys,
}

impl Iam {
    /// Signs with the users' keys from `keys`.
    pub(crate) fn new(keys: Keys) -> Self {
        Self { keys }
    }

    /// Where the keys come from.
    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Changes the console password of `profile`'s IAM user, signed with
    /// that user's own key. The deadline bounds connecting and the decision
    /// to retry, never a request in flight: the caller of this function
    /// decides what to do when its deadline passes (see `attempt`), and must
    /// run it inside a [`TRANSMITTED`] scope.
    pub(crate) async fn change_password(
        &self,
        signer: &Signer,
        old: &Password,
        new: &Password,
        deadline: Deadline,
        signer_is_iam_user: Option<bool>,
    ) -> Result<String, Error> {
        let span = client_span("ChangePassword", self.keys.region());
        let result = self
            .call(signer, deadline, signer_is_iam_user, |client, connect| {
                // Placeholders: the passwords go into the body only where
                // it is wiped (change_body).
                let op = client
                    .iam
                    .change_password()
                    .old_password(OLD_PLACEHOLDER)
                    .new_password(NEW_PLACEHOLDER);
                iam_connect(op.customize(), connect)
                    .interceptor(FillPasswords::new(old, new))
                    .send()
            })
            .instrument(span.clone())
            .await;
        record_outcome(&span, "ChangePassword", &result);
        result.map(|(_, request_id)| request_id)
    }

    /// The account password policy, `None` when the account has none.
    pub(crate) async fn password_policy(
        &self,
        signer: &Signer,
        deadline: Deadline,
    ) -> Result<Option<Policy>, Error> {
        let result = self
            .read(
                "GetAccountPasswordPolicy",
                signer,
                deadline,
                |client, connect| {
                    iam_connect(
                        client.iam.get_account_password_policy().customize(),
                        connect,
                    )
                    .send()
                },
            )
            .await;
        match result {
            // No password policy (see `record_outcome`).
            Err(Error::LoginProfileMissing(_)) => Ok(None),
            result => result.map(|(out, _)| out.password_policy().map(policy_from_iam)),
        }
    }

    /// Whose key `signer` holds: STS `GetCallerIdentity` (no permission
    /// needed), else IAM `GetUser` (needs `iam:GetUser` on itself).
    pub(crate) async fn caller_identity(
        &self,
        signer: &Signer,
        deadline: Deadline,
    ) -> Result<CallerIdentity, (Error, Error)> {
        let sts = self
            .read("GetCallerIdentity", signer, deadline, |client, connect| {
                sts_connect(client.sts.get_caller_identity().customize(), connect).send()
            })
            .await;
        let sts_err = match sts {
            Ok((out, _)) if out.arn().is_some() => {
                return Ok(CallerIdentity {
                    arn: out.arn().unwrap_or_default().to_owned(),
                });
            }
            Ok(_) => Error::IamError(AwsContext::default()),
            Err(e) => e,
        };
        let user = self
            .read("GetUser", signer, deadline, |client, connect| {
                iam_connect(client.iam.get_user().customize(), connect).send()
            })
            .await;
        match user {
            Ok((out, _)) => match out.user() {
                Some(user) => Ok(CallerIdentity {
                    arn: user.arn().to_owned(),
                }),
                None => Err((sts_err, Error::IamError(AwsContext::default()))),
            },
            Err(e) => Err((sts_err, e)),
        }
    }

    /// The access keys of `iam_user`, listed with `clients` (the user's own
    /// key: `iam:ListAccessKeys` on itself).
    pub(crate) async fn list_access_keys(
        &self,
        clients: &UserClients,
        iam_user: &str,
    ) -> Result<Vec<AccessKeyInfo>, Error> {
        let call = clients.iam.list_access_keys().user_name(iam_user).send();
        let out = self.direct("ListAccessKeys", call, false).await?;
        Ok(out
            .access_key_metadata()
            .iter()
            .filter_map(|k| {
                Some(AccessKeyInfo {
                    id: k.access_key_id()?.to_owned(),
                    active: k.status() == Some(&aws_sdk_iam::types::StatusType::Active),
                    created: k.create_date().and_then(|d| SystemTime::try_from(*d).ok()),
                })
            })
            .collect())
    }

    /// A new access key of `iam_user`, created with `clients`.
    pub(crate) async fn create_access_key(
        &self,
        clients: &UserClients,
        iam_user: &str,
    ) -> Result<Credentials, Error> {
        let call = clients.iam.create_access_key().user_name(iam_user).send();
        let out = self.direct("CreateAccessKey", call, true).await?;
        let key = out
            .access_key()
            .ok_or_else(|| Error::IamError(AwsContext::default()))?;
        Ok(Credentials::new(
            key.access_key_id(),
            key.secret_access_key(),
            None,
            None,
            "credgate-rotation",
        ))
    }

    /// Marks `iam_user`'s key `key_id` inactive, with `clients`.
    pub(crate) async fn deactivate_access_key(
        &self,
        clients: &UserClients,
        iam_user: &str,
        key_id: &str,
    ) -> Result<(), Error> {
        let call = clients
            .iam
            .update_access_key()
            .user_name(iam_user)
            .access_key_id(key_id)
            .status(aws_sdk_iam::types::StatusType::Inactive)
            .send();
        self.direct("UpdateAccessKey", call, true).await.map(|_| ())
    }

    /// Deletes `iam_user`'s key `key_id`, with `clients`.
    pub(crate) async fn delete_access_key(
        &self,
        clients: &UserClients,
        iam_user: &str,
        key_id: &str,
    ) -> Result<(), Error> {
        let call = clients
            .iam
            .delete_access_key()
            .user_name(iam_user)
            .access_key_id(key_id)
            .send();
        self.direct("DeleteAccessKey", call, true).await.map(|_| ())
    }

    /// When key `key_id` was last used, asked with `clients`.
    pub(crate) async fn access_key_last_used(
        &self,
        clients: &UserClients,
        key_id: &str,
    ) -> Result<LastUsed, Error> {
        let call = clients
            .iam
            .get_access_key_last_used()
            .access_key_id(key_id)
            .send();
        let out = self.direct("GetAccessKeyLastUsed", call, false).await?;
        let used = out.access_key_last_used();
        Ok(LastUsed {
            at: used
                .and_then(|u| u.last_used_date())
                .and_then(|d| SystemTime::try_from(*d).ok()),
            // IAM says "N/A" for a key never used.
            service: used
                .map(|u| u.service_name().to_owned())
                .filter(|s| s != "N/A"),
        })
    }

    /// Whose key `clients` sign with, by STS `GetCallerIdentity` alone (no
    /// permission needed): how a new key is proven before it is promoted.
    pub(crate) async fn identity_of(&self, clients: &UserClients) -> Result<CallerIdentity, Error> {
        let call = clients.sts.get_caller_identity().send();
        let out = self.direct("GetCallerIdentity", call, false).await?;
        Ok(CallerIdentity {
            arn: out
                .arn()
                .ok_or_else(|| Error::IamError(AwsContext::default()))?
                .to_owned(),
        })
    }

    /// One key-management call, signed with the clients it was built on
    /// (a rotation signs with the key it read, or the one it just created:
    /// never one looked up anew), within [`KEY_CALL_BUDGET`], in a CLIENT
    /// span. Nothing is retried here: a rotation resumes from the secret's
    /// stages instead. A `write` whose answer is lost is `OUTCOME_UNKNOWN`.
    async fn direct<T, E>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, SdkError<E>>>,
        write: bool,
    ) -> Result<T, Error>
    where
        T: RequestId,
        E: AwsError,
    {
        let span = client_span(method, self.keys.region());
        let result =
            match tokio::time::timeout(KEY_CALL_BUDGET, call.instrument(span.clone())).await {
                Ok(Ok(out)) => {
                    let request_id = out.request_id().unwrap_or_default().to_owned();
                    Ok((out, request_id))
                }
                Ok(Err(err)) => {
                    let failure = Failure::of(err);
                    tracing::debug!(failure = ?failure, method, "AWS call failed");
                    let err = classify(failure, true);
                    Err(if write { err } else { for_read(err) })
                }
                Err(_) if write => Err(Error::OutcomeUnknown {
                    aws: None,
                    cause: Some(Cause::msg(format!(
                        "no answer from IAM within {}s",
                        KEY_CALL_BUDGET.as_secs()
                    ))),
                }),
                Err(_) => Err(Error::IamTimeout),
            };
        record_outcome(&span, method, &result);
        result.map(|(out, _)| out)
    }

    /// A read in a CLIENT span named for `method`, bounded by the deadline
    /// as a whole; its outcome is recorded on the span and in the metrics.
    async fn read<T, E, F>(
        &self,
        method: &'static str,
        signer: &Signer,
        deadline: Deadline,
        op: F,
    ) -> Result<(T, String), Error>
    where
        T: RequestId,
        E: AwsError,
        F: SdkCall<T, E>,
    {
        let span = client_span(method, self.keys.region());
        let transmitted = Arc::default();
        let call = TRANSMITTED.scope(
            Arc::clone(&transmitted),
            self.call(signer, deadline, Some(true), op),
        );
        let result = match tokio::time::timeout_at(
            deadline.instant(),
            call.instrument(span.clone()),
        )
        .await
        {
            Ok(result) => result.map_err(for_read),
            Err(_) if transmitted.load(Ordering::Acquire) => Err(Error::IamTimeout),
            Err(_) => Err(Error::DeadlineBeforeSend { stage: "iam" }),
        };
        record_outcome(&span, method, &result);
        result
    }

    async fn call<T, E, F>(
        &self,
        signer: &Signer,
        deadline: Deadline,
        signer_is_iam_user: Option<bool>,
        op: F,
    ) -> Result<(T, String), Error>
    where
        T: RequestId,
        E: AwsError,
        F: SdkCall<T, E>,
    {
        let mut refreshed = false;
        let mut attempt = 1;
        loop {
            let client = self.keys.for_user(signer).await?;
            let connect = match connect_timeout(deadline.remaining()) {
                Ok(connect) => connect,
                Err(()) => return Err(Error::DeadlineBeforeSend { stage: "connect" }),
            };
            let failure = match op(&client, connect).await {
                Ok(out) => {
                    let request_id = out.request_id().unwrap_or_default().to_owned();
                    return Ok((out, request_id));
                }
                Err(err) => {
                    let failure = Failure::of(err);
                    tracing::debug!(failure = ?failure, attempt, "AWS call failed");
                    failure
                }
            };
            if failure.is_stale_credentials() && !refreshed {
                refreshed = true;
                if self.keys.refresh(signer).await {
                    tracing::info!(
                        iam_user = signer.iam_user(),
                        profile = signer.profile(),
                        "AWS rejected the credentials; re-read the key, trying once more"
                    );
                }
                not_transmitted();
                continue;
            }
            let backoff = BASE_BACKOFF * 2u32.pow(attempt - 1);
            if failure.is_retryable()
                && attempt < MAX_ATTEMPTS
                && Instant::now() + backoff < deadline.instant()
            {
                attempt += 1;
                not_transmitted();
                tokio::time::sleep(backoff).await;
                continue;
            }
            let is_user = match signer_is_iam_user {
                Some(known) => known,
                None => client.looks_like_user_key().await,
            };
            return Err(classify(failure, is_user));
        }
    }
}

/// One SDK call as [`Iam`] runs it: given a user's clients and the
/// connect timeout left, the call's future.
trait SdkCall<T, E>: Fn(&UserClients, Option<TimeoutConfig>) -> Self::Call {
    type Call: Future<Output = Result<T, SdkError<E>>>;
}

impl<T, E, F, Fut> SdkCall<T, E> for F
where
    F: Fn(&UserClients, Option<TimeoutConfig>) -> Fut,
    Fut: Future<Output = Result<T, SdkError<E>>>,
{
    type Call = Fut;
}

/// An operation's error, carrying AWS's error code.
trait AwsError: ProvideErrorMetadata + StdError + Send + Sync + 'static {}

impl<E: ProvideErrorMetadata + StdError + Send + Sync + 'static> AwsError for E {}

/// An IAM operation with its connect timeout shortened to `connect`.
fn iam_connect<T, E, B>(
    op: aws_sdk_iam::client::customize::CustomizableOperation<T, E, B>,
    connect: Option<aws_config::timeout::TimeoutConfig>,
) -> aws_sdk_iam::client::customize::CustomizableOperation<T, E, B> {
    match connect {
        Some(t) => op.config_override(aws_sdk_iam::config::Builder::default().timeout_config(t)),
        None => op,
    }
}

/// An STS operation with its connect timeout shortened to `connect`.
fn sts_connect<T, E, B>(
    op: aws_sdk_sts::client::customize::CustomizableOperation<T, E, B>,
    connect: Option<aws_config::timeout::TimeoutConfig>,
) -> aws_sdk_sts::client::customize::CustomizableOperation<T, E, B> {
    match connect {
        Some(t) => op.config_override(aws_sdk_sts::config::Builder::default().timeout_config(t)),
        None => op,
    }
}

/// The previous try provably applied nothing: what follows starts afresh.
fn not_transmitted() {
    let _ = TRANSMITTED.try_with(|flag| flag.store(false, Ordering::Release));
}

/// The connect timeout for a try with `remaining` time: the default when
/// there is time for it, else the largest short one that fits; `Err` when
/// not even the shortest fits (nothing can be sent in time).
fn connect_timeout(remaining: Duration) -> Result<Option<aws_config::timeout::TimeoutConfig>, ()> {
    if remaining >= CONNECT_TIMEOUT {
        return Ok(None);
    }
    let fits = SHORT_CONNECT_TIMEOUTS
        .iter()
        .find(|t| **t <= remaining)
        .ok_or(())?;
    Ok(Some(
        aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(*fits)
            .build(),
    ))
}

fn client_span(method: &'static str, region: &str) -> tracing::Span {
    tracing::info_span!(
        "IAM",
        otel.name = method_span_name(method),
        otel.kind = "client",
        rpc.system = "aws-api",
        rpc.service = if method == "GetCallerIdentity" {
            "STS"
        } else {
            "IAM"
        },
        rpc.method = method,
        cloud.region = region,
        aws.request_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn method_span_name(method: &'static str) -> &'static str {
    match method {
        "ChangePassword" => "IAM.ChangePassword",
        "GetAccountPasswordPolicy" => "IAM.GetAccountPasswordPolicy",
        "GetUser" => "IAM.GetUser",
        "GetCallerIdentity" => "STS.GetCallerIdentity",
        "ListAccessKeys" => "IAM.ListAccessKeys",
        "CreateAccessKey" => "IAM.CreateAccessKey",
        "UpdateAccessKey" => "IAM.UpdateAccessKey",
        "DeleteAccessKey" => "IAM.DeleteAccessKey",
        "GetAccessKeyLastUsed" => "IAM.GetAccessKeyLastUsed",
        _ => "IAM",
    }
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
        // IAM's way of saying "this account has no password policy": an
        // answer, not a failed call.
        Err(Error::LoginProfileMissing(_)) if method == "GetAccountPasswordPolicy" => {
            telemetry::count_iam_outcome(method, "NoSuchEntity");
        }
        Err(err) => {
            if let Some(id) = err.aws().and_then(|a| a.request_id.as_deref()) {
                span.record("aws.request_id", id);
            }
            span.record("otel.status_code", "ERROR");
            let code = err
                .aws()
                .and_then(|a| a.code.as_ref())
                .map_or(err.reason().as_str(), IamCode::as_str);
            telemetry::count_iam_outcome(method, code);
            // Key custody reads every user's keys in one sweep: with AWS
            // down, thousands fail alike, and custody logs one warning for
            // the sweep. Every other failure is a warning of its own.
            let sweep_read = matches!(method, "ListAccessKeys" | "GetAccessKeyLastUsed");
            span.in_scope(|| {
                if sweep_read {
                    tracing::debug!(exception.type = code, exception.message = %err, "exception");
                } else {
                    tracing::warn!(exception.type = code, exception.message = %err, "exception");
                }
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
    use crate::error::Reason;

    fn answered(code: &str, status: u16) -> Failure {
        Failure::Answered {
            code: Some(IamCode::parse(code)),
            request_id: Some("rid".to_owned()),
            status,
        }
    }

    #[test]
    fn arns_are_read_by_kind() {
        let cases = [
            (
                "arn:aws:iam::123456789012:user/alice",
                Principal::User("alice".into()),
            ),
            (
                "arn:aws:iam::123456789012:user/team/ops/alice",
                Principal::User("alice".into()),
            ),
            (
                "arn:aws-cn:iam::123456789012:user/bob",
                Principal::User("bob".into()),
            ),
            ("arn:aws:iam::123456789012:root", Principal::Root),
            (
                "arn:aws:sts::123456789012:assumed-role/admin/session",
                Principal::Other,
            ),
            (
                "arn:aws:sts::123456789012:federated-user/bob",
                Principal::Other,
            ),
            ("arn:aws:iam::123456789012:role/admin", Principal::Other),
            ("not an arn", Principal::Other),
            ("", Principal::Other),
        ];
        for (arn, principal) in cases {
            assert_eq!(Principal::of_arn(arn), principal, "{arn}");
        }
    }

    #[test]
    fn each_iam_code_classifies_to_its_row() {
        let rows = [
            (
                "PasswordPolicyViolation",
                true,
                Reason::PasswordPolicyViolation,
            ),
            ("InvalidUserType", true, Reason::OldPasswordIncorrect),
            ("InvalidUserType", false, Reason::InvalidUserType),
            ("NoSuchEntity", true, Reason::LoginProfileMissing),
            ("AccessDenied", true, Reason::IamAccessDenied),
            ("LimitExceeded", true, Reason::IamLimitExceeded),
            ("Throttling", true, Reason::IamThrottled),
            (
                "EntityTemporarilyUnmodifiable",
                true,
                Reason::EntityTemporarilyUnmodifiable,
            ),
            ("ServiceFailure", true, Reason::IamServiceFailure),
            (
                "InvalidClientTokenId",
                true,
                Reason::UpstreamCredentialsRejected,
            ),
            (
                "SignatureDoesNotMatch",
                true,
                Reason::UpstreamCredentialsRejected,
            ),
            ("ExpiredToken", true, Reason::UpstreamCredentialsRejected),
            ("SomethingNew", true, Reason::IamError),
        ];
        for (code, user, reason) in rows {
            let err = classify(answered(code, 400), user);
            assert_eq!(err.reason(), reason, "{code}");
            let aws = err.aws().expect("IAM answered");
            assert_eq!(aws.code.as_ref().map(IamCode::as_str), Some(code));
            assert_eq!(aws.request_id.as_deref(), Some("rid"));
        }
    }

    #[test]
    fn the_http_status_is_used_only_without_a_code() {
        // A 500 with a client-error code is still classified by the code.
        assert_eq!(
            classify(answered("AccessDenied", 500), true).reason(),
            Reason::IamAccessDenied
        );
        // IAM's own ServiceFailure says nothing was applied...
        assert_eq!(
            classify(answered("ServiceFailure", 500), true).reason(),
            Reason::IamServiceFailure
        );
        let no_code = |status| Failure::Answered {
            code: None,
            request_id: None,
            status,
        };
        // ...a proxy's bare 502/504 says nothing about IAM.
        assert_eq!(
            classify(no_code(502), true).reason(),
            Reason::OutcomeUnknown
        );
        assert_eq!(
            classify(no_code(504), true).reason(),
            Reason::OutcomeUnknown
        );
        assert_eq!(classify(no_code(418), true).reason(), Reason::IamError);
    }

    #[test]
    fn a_response_cut_off_after_a_success_status_is_outcome_unknown() {
        let cut = |status| Failure::Unreadable {
            status,
            cause: Cause::msg("connection closed before message completed"),
        };
        assert_eq!(classify(cut(200), true).reason(), Reason::OutcomeUnknown);
        assert_eq!(classify(cut(502), true).reason(), Reason::OutcomeUnknown);
        assert_eq!(classify(cut(400), true).reason(), Reason::IamError);
    }

    #[test]
    fn transport_failures_classify_by_whether_anything_was_sent() {
        assert_eq!(
            classify(Failure::NeverSent(Cause::msg("refused")), true).reason(),
            Reason::IamUnreachable
        );
        assert_eq!(
            classify(Failure::MaybeSent(Cause::msg("reset")), true).reason(),
            Reason::OutcomeUnknown
        );
        assert_eq!(
            classify(Failure::NoCredentials(Cause::msg("no profile")), true).reason(),
            Reason::UpstreamCredentialsRejected
        );
    }

    #[test]
    fn reads_never_answer_outcome_unknown() {
        let lost = classify(Failure::MaybeSent(Cause::msg("reset")), true);
        assert_eq!(for_read(lost).reason(), Reason::IamServiceFailure);
        let proxy = classify(
            Failure::Answered {
                code: None,
                request_id: None,
                status: 502,
            },
            true,
        );
        assert_eq!(for_read(proxy).reason(), Reason::IamServiceFailure);
    }

    #[test]
    fn only_unapplied_outcomes_are_retryable() {
        assert!(answered("Throttling", 400).is_retryable());
        assert!(Failure::NeverSent(Cause::msg("")).is_retryable());
        assert!(!Failure::MaybeSent(Cause::msg("")).is_retryable());
        for code in [
            "ServiceFailure",
            "LimitExceeded",
            "EntityTemporarilyUnmodifiable",
        ] {
            assert!(!answered(code, 500).is_retryable(), "{code}");
        }
    }

    #[test]
    fn short_deadlines_get_a_connect_timeout_that_fits() {
        assert!(matches!(connect_timeout(Duration::from_secs(5)), Ok(None)));
        let t = connect_timeout(Duration::from_millis(1_400))
            .expect("fits")
            .expect("short");
        assert_eq!(t.connect_timeout(), Some(Duration::from_secs(1)));
        assert!(connect_timeout(Duration::from_millis(40)).is_err());
    }
}
