//! The `credgate.v1.PasswordService` handlers. The edge ([`crate::rpc::edge`]) has
//! already identified the caller, set the deadline and opened the audit slot;
//! a handler checks the input and hands the attempt over ([`crate::change::attempt`]).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    api::{
        ChangePasswordRequest, ChangePasswordResponse, GetPasswordPolicyRequest,
        GetPasswordPolicyResponse, PasswordPolicy, password_service_server::PasswordService,
    },
    aws::password::{self, Password},
    change::attempt::{self, Gate},
    change::audit::Outcome,
    error::{Error, reject},
    rpc::edge::Admitted,
};

/// The service: its handlers share one [`Gate`].
pub(crate) struct PasswordGate {
    gate: Arc<Gate>,
}

impl PasswordGate {
    pub(crate) fn new(gate: Arc<Gate>) -> Self {
        Self { gate }
    }
}

/// What the edge attached to the request. Every PasswordService request
/// passes the edge, so its absence is a wiring bug.
fn admitted<T>(request: &Request<T>) -> Result<Admitted, Status> {
    request
        .extensions()
        .get::<Admitted>()
        .cloned()
        .ok_or_else(|| Status::internal("request did not pass the edge"))
}

/// IAM's character rules for both passwords, then the `request_id` syntax.
fn check_input(old: &Password, new: &Password, request_id: &str) -> Result<Option<String>, Error> {
    password::check_charset("old_password", old).map_err(Error::PasswordInvalid)?;
    password::check_charset("new_password", new).map_err(Error::PasswordInvalid)?;
    if request_id.is_empty() {
        return Ok(None);
    }
    // One spelling per UUID, so that a retry cannot miss its record.
    uuid::Uuid::try_parse(request_id)
        .map(|id| Some(id.hyphenated().to_string()))
        .map_err(|_| Error::RequestIdInvalid)
}

#[tonic::async_trait]
impl PasswordService for PasswordGate {
    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let admitted = admitted(&request)?;
        let audit = admitted
            .audit
            .ok_or_else(|| Status::internal("ChangePassword without an audit slot"))?;
        let body = request.into_inner();
        audit.describe(&body.request_id, body.validate_only);
        // Move both strings into wiping containers straight away.
        let (old, new) = (
            Password::new(body.old_password),
            Password::new(body.new_password),
        );
        let answer = match check_input(&old, &new, &body.request_id) {
            Err(e) => {
                audit.close(Outcome::of(e.reason().as_str()));
                Err(e)
            }
            Ok(request_id) => {
                attempt::answer(
                    &self.gate,
                    attempt::Request {
                        caller: admitted.caller,
                        old,
                        new,
                        validate_only: body.validate_only,
                        request_id,
                        deadline: admitted.deadline,
                        audit,
                    },
                )
                .await
            }
        };
        match answer {
            // `request_id` (2) is deprecated for `iam_request_id` (3) and
            // still carries the same value for older clients.
            #[allow(deprecated)]
            Ok(changed) => Ok(Response::new(ChangePasswordResponse {
                iam_user: changed.iam_user,
                request_id: changed.iam_request_id.clone(),
                iam_request_id: changed.iam_request_id,
                replayed: changed.replayed,
            })),
            Err(e) => Err(reject(e)),
        }
    }

    async fn get_password_policy(
        &self,
        request: Request<GetPasswordPolicyRequest>,
    ) -> Result<Response<GetPasswordPolicyResponse>, Status> {
        let admitted = admitted(&request)?;
        let signer = attempt::signer(&admitted.caller);
        let policy = self
            .gate
            .policies
            .get(&self.gate.iam, &signer, admitted.deadline)
            .await
            .map_err(reject)?;
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
