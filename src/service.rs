//! The `credgate.v1.PasswordService` implementation: identify the caller,
//! check the request, call IAM, audit. Each step lives in its own module;
//! this one only orders them.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::{
    api::{
        ChangePasswordRequest, ChangePasswordResponse, GetPasswordPolicyRequest,
        GetPasswordPolicyResponse, PasswordPolicy, password_service_server::PasswordService,
    },
    audit,
    error::Error,
    iam::Iam,
    identity::{Caller, Callers, PeerIdentity},
    limits::FailedAttempts,
    password::{self, Password, Policy},
    telemetry,
};

/// How long an account password policy is trusted before IAM is asked again.
/// Short: a stricter policy should apply within a minute, and IAM re-checks
/// every change anyway.
const POLICY_TTL: Duration = Duration::from_secs(60);

/// How much earlier than the caller's own deadline credgate gives up.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// Shared state of the service.
pub struct PasswordGate {
    callers: Callers,
    iam: Iam,
    failed_attempts: FailedAttempts,
    request_timeout: Duration,
    /// Account policy by profile (each profile belongs to one account).
    policies: Mutex<HashMap<String, (Instant, Option<Policy>)>>,
}

impl PasswordGate {
    /// Assembles the service from its parts.
    pub fn new(
        callers: Callers,
        iam: Iam,
        failed_attempts: FailedAttempts,
        request_timeout: Duration,
    ) -> Self {
        Self {
            callers,
            iam,
            failed_attempts,
            request_timeout,
            policies: Mutex::new(HashMap::new()),
        }
    }

    /// The caller behind the request's verified client certificate.
    fn identify<T>(&self, request: &Request<T>) -> Result<Arc<Caller>, Error> {
        let certs = request.peer_certs().unwrap_or_default();
        let Some(leaf) = certs.first() else {
            // rustls requires a client certificate; reaching here means the
            // server was wired without mTLS.
            return Err(Error::CallerNotMapped {
                presented: "(no client certificate)".to_owned(),
            });
        };
        let peer =
            PeerIdentity::from_der(leaf).map_err(|e| Error::CallerNotMapped { presented: e })?;
        let caller = self.callers.resolve(&peer);
        let span = tracing::Span::current();
        match &caller {
            Ok(c) => {
                span.record("credgate.caller", c.identity.as_str());
                span.record("credgate.iam_user", c.iam_user.as_str());
            }
            Err(_) => {
                span.record("credgate.caller", peer.to_string());
            }
        }
        caller
    }

    /// The RPC deadline: the shorter of `request_timeout` and the caller's
    /// `grpc-timeout`.
    ///
    /// The caller's deadline is cut a little short: tonic cancels the call
    /// when the caller's deadline passes, and the caller should get
    /// `OUTCOME_UNKNOWN` from us first rather than a bare CANCELLED.
    fn deadline<T>(&self, request: &Request<T>) -> Instant {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| t.saturating_sub(DEADLINE_MARGIN.min(t / 10)))
            .map_or(self.request_timeout, |t| t.min(self.request_timeout));
        Instant::now() + timeout
    }

    async fn policy(&self, caller: &Caller, deadline: Instant) -> Result<Option<Policy>, Error> {
        if let Some((fetched, policy)) = self.lock_policies().get(&caller.aws_profile)
            && fetched.elapsed() < POLICY_TTL
        {
            return Ok(*policy);
        }
        let policy = self.iam.password_policy(caller, deadline).await?;
        self.lock_policies()
            .insert(caller.aws_profile.clone(), (Instant::now(), policy));
        Ok(policy)
    }

    fn lock_policies(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Option<Policy>)>> {
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn change(
        &self,
        caller: &Caller,
        old: Password,
        new: Password,
        validate_only: bool,
        deadline: Instant,
    ) -> Result<String, Error> {
        password::check_charset("old_password", &old).map_err(Error::PasswordInvalid)?;
        password::check_charset("new_password", &new).map_err(Error::PasswordInvalid)?;
        self.failed_attempts.check(&caller.identity)?;
        match self.policy(caller, deadline).await {
            Ok(Some(policy)) => {
                let violations = policy.violations(&new);
                if !violations.is_empty() {
                    return Err(Error::PolicyViolation {
                        violations,
                        aws: None,
                    });
                }
            }
            Ok(None) => {}
            // validate_only promises the policy was checked; a real change
            // can go ahead, since IAM enforces the policy itself.
            Err(e) if validate_only => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "account password policy unavailable; relying on IAM's own check")
            }
        }
        if validate_only {
            return Ok(String::new());
        }
        match self.iam.change_password(caller, &old, &new, deadline).await {
            Ok(changed) => {
                self.failed_attempts.clear(&caller.identity);
                Ok(changed.request_id)
            }
            Err(e) => {
                if matches!(e, Error::OldPasswordIncorrect(_)) {
                    self.failed_attempts.record_failure(&caller.identity);
                }
                Err(e)
            }
        }
    }
}

#[tonic::async_trait]
impl PasswordService for PasswordGate {
    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let peer: Option<SocketAddr> = request.remote_addr();
        let deadline = self.deadline(&request);
        let caller = self.identify(&request);
        let body = request.into_inner();
        let validate_only = body.validate_only;
        // Move both strings into wiping containers straight away.
        let (old, new) = (
            Password::new(body.old_password),
            Password::new(body.new_password),
        );
        let result = match &caller {
            Ok(caller) => self.change(caller, old, new, validate_only, deadline).await,
            Err(e) => Err(e.clone()),
        };

        let (trace_id, _) = telemetry::current_ids();
        let (caller_id, iam_user) = match &caller {
            Ok(c) => (c.identity.as_str(), c.iam_user.as_str()),
            Err(Error::CallerNotMapped { presented }) => (presented.as_str(), ""),
            Err(_) => ("", ""),
        };
        let request_id = match &result {
            Ok(id) => id.clone(),
            Err(e) => e
                .aws()
                .and_then(|a| a.request_id.clone())
                .unwrap_or_default(),
        };
        let outcome = match &result {
            Ok(_) if validate_only => "VALIDATED",
            Ok(_) => "OK",
            Err(e) => e.reason(),
        };
        audit::record(&audit::Attempt {
            caller: caller_id,
            iam_user,
            outcome,
            request_id: &request_id,
            peer,
            trace_id: &trace_id,
        });

        match result {
            Ok(request_id) => Ok(Response::new(ChangePasswordResponse {
                iam_user: iam_user.to_owned(),
                request_id,
            })),
            Err(e) => Err(reject(e)),
        }
    }

    async fn get_password_policy(
        &self,
        request: Request<GetPasswordPolicyRequest>,
    ) -> Result<Response<GetPasswordPolicyResponse>, Status> {
        let deadline = self.deadline(&request);
        let caller = self.identify(&request).map_err(reject)?;
        let policy = self.policy(&caller, deadline).await.map_err(reject)?;
        Ok(Response::new(GetPasswordPolicyResponse {
            policy: policy.map(|p| PasswordPolicy {
                minimum_password_length: p.minimum_length,
                require_symbols: p.require_symbols,
                require_numbers: p.require_numbers,
                require_uppercase_characters: p.require_uppercase,
                require_lowercase_characters: p.require_lowercase,
                allow_users_to_change_password: p.allow_users_to_change_password,
                max_password_age_days: p.max_age_days,
                password_reuse_prevention: p.reuse_prevention,
                hard_expiry: p.hard_expiry,
            }),
        }))
    }
}

/// Logs the failure once, on the RPC span, and converts it.
fn reject(err: Error) -> Status {
    let span = tracing::Span::current();
    span.record("error.type", err.reason());
    tracing::info!(reason = err.reason(), error = %err, "request rejected");
    err.into()
}

/// Parses a gRPC `grpc-timeout` header: up to 8 digits and a unit.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(parse_grpc_timeout("10"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
