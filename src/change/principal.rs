//! Verified mappings: whose key each signer really holds.
//!
//! `[[callers]]` says "this caller acts as IAM user X" (with the key of
//! profile P, or the key of X's secret); only AWS knows whose key that is.
//! Each signer is asked (STS `GetCallerIdentity`, which needs no permission;
//! IAM `GetUser` as the fallback) at its first use, not at start: with
//! thousands of configured callers, start-up would otherwise send thousands
//! of calls to AWS and build thousands of clients (`check-config --online`
//! asks for every configured one). A key
//! that belongs to another IAM user, to the root user or to a role session is
//! refused (`IAM_USER_MISMATCH`) without calling `ChangePassword`; one whose
//! identity cannot be read at all is served as before, with one warning. A
//! changed key (a re-read profile, a rotated secret) is verified again. A
//! signer without a key at all (`IAM_USER_NOT_PROVISIONED`) or whose key
//! cannot be read right now (`KEY_SOURCE_UNAVAILABLE`) is refused before
//! anything is sent to AWS.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    aws::iam::{Iam, Principal},
    aws::keys::Signer,
    deadline::Deadline,
    error::Error,
};

/// How long an unverifiable profile is served before credgate asks again
/// (STS may have been down, or a permission may have been added).
const RETRY_UNVERIFIABLE: Duration = Duration::from_secs(60);
/// Budget of one signer's verification for `check-config --online`.
const ONLINE_BUDGET: Duration = Duration::from_secs(10);

/// The verdict on a profile, for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The key is the configured IAM user's, whose name IAM reports.
    Verified(String),
    /// Nobody could say whose key it is: served as configured.
    Unverifiable,
}

#[derive(Debug, Clone)]
enum State {
    Unknown,
    Verified { name: String, generation: u64 },
    Mismatch { arn: String, generation: u64 },
    Unverifiable { at: Instant, generation: u64 },
}

struct Profile {
    /// The IAM user the key must be.
    expected: String,
    state: Mutex<State>,
    /// One verification at a time per signer.
    flight: tokio::sync::Mutex<()>,
}

/// Verification state of every signer that called (or that
/// `check-config --online` asked about).
#[derive(Default)]
pub(crate) struct Principals {
    by_signer: Mutex<HashMap<Signer, Arc<Profile>>>,
}

impl Principals {
    /// None verified yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn entry(&self, signer: &Signer) -> Arc<Profile> {
        self.by_signer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(signer.clone())
            .or_insert_with(|| {
                Arc::new(Profile {
                    expected: signer.iam_user().to_owned(),
                    state: Mutex::new(State::Unknown),
                    flight: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// The verdict on `signer` for a call due by `deadline`, reading its key
    /// and verifying it first if needed. `Err(IamUserMismatch)` refuses the
    /// call, and so do `IAM_USER_NOT_PROVISIONED` and `KEY_SOURCE_UNAVAILABLE`;
    /// a deadline reached on the way is `DEADLINE_BEFORE_SEND` (nothing was
    /// sent to IAM).
    pub(crate) async fn check(
        &self,
        iam: &Iam,
        signer: &Signer,
        deadline: Deadline,
    ) -> Result<Verdict, Error> {
        // The key first: without one there is nothing to verify or send.
        tokio::time::timeout_at(deadline.instant(), iam.keys().for_user(signer))
            .await
            .map_err(|_| Error::DeadlineBeforeSend { stage: "key" })??;
        let entry = self.entry(signer);
        let generation = iam.keys().generation(signer);
        if let Some(known) = entry.known(generation) {
            return known;
        }
        let _flight = tokio::time::timeout_at(deadline.instant(), entry.flight.lock())
            .await
            .map_err(|_| Error::DeadlineBeforeSend { stage: "identity" })?;
        // Another call may have verified it while this one waited.
        if let Some(known) = entry.known(generation) {
            return known;
        }
        match iam.caller_identity(signer, deadline).await {
            Ok(identity) => entry.settle(signer, generation, &identity.arn),
            // Out of this call's time: leave the profile unverified and let
            // the next call (or the background task) finish the job.
            Err((Error::DeadlineBeforeSend { .. } | Error::IamTimeout, _))
            | Err((_, Error::DeadlineBeforeSend { .. } | Error::IamTimeout))
                if deadline.passed() =>
            {
                Err(Error::DeadlineBeforeSend { stage: "identity" })
            }
            // No key, or none readable: refused, nothing was sent.
            Err((e @ (Error::IamUserNotProvisioned | Error::KeySourceUnavailable(_)), _)) => Err(e),
            Err((sts, iam_err)) => {
                tracing::warn!(
                    iam_user = signer.iam_user(),
                    profile = signer.profile(),
                    sts = %sts,
                    sts_cause = %crate::error::chain(&sts),
                    iam = %iam_err,
                    "cannot read whose key this is (STS GetCallerIdentity and IAM GetUser \
                     both failed); serving it as configured, unverified"
                );
                *entry.lock() = State::Unverifiable {
                    at: Instant::now(),
                    generation,
                };
                Ok(Verdict::Unverifiable)
            }
        }
    }

    /// Problems and verdicts for `check-config --online`: every one of
    /// `signers`, one line per problem.
    pub(crate) async fn problems(&self, iam: &Iam, signers: &[Signer]) -> Vec<String> {
        let mut problems = Vec::new();
        for signer in signers {
            let deadline = Deadline::at(Instant::now() + ONLINE_BUDGET);
            match self.check(iam, signer, deadline).await {
                Ok(Verdict::Verified(_)) => {}
                Ok(Verdict::Unverifiable) => problems.push(format!(
                    "{signer}: cannot verify whose key it holds: neither STS \
                     GetCallerIdentity nor IAM GetUser answered (see the log above)"
                )),
                Err(Error::IamUserMismatch) => {
                    let entry = self.entry(signer);
                    problems.push(format!(
                        "{signer} signs as {}, not as the configured IAM user {:?}",
                        entry.signer(),
                        entry.expected
                    ));
                }
                Err(Error::IamUserNotProvisioned) => problems.push(format!(
                    "{signer}: no such key (IAM user {:?} is not provisioned)",
                    signer.iam_user()
                )),
                Err(e) => problems.push(format!(
                    "{signer}: cannot verify whose key it holds: {e}: {}",
                    crate::error::chain(&e)
                )),
            }
        }
        problems
    }
}

impl Profile {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The verdict from what is already known about this key generation.
    fn known(&self, generation: u64) -> Option<Result<Verdict, Error>> {
        match &*self.lock() {
            State::Verified {
                name,
                generation: g,
            } if *g == generation => Some(Ok(Verdict::Verified(name.clone()))),
            State::Mismatch { generation: g, .. } if *g == generation => {
                Some(Err(Error::IamUserMismatch))
            }
            State::Unverifiable { at, generation: g }
                if *g == generation && at.elapsed() < RETRY_UNVERIFIABLE =>
            {
                Some(Ok(Verdict::Unverifiable))
            }
            _ => None,
        }
    }

    fn settle(&self, signer: &Signer, generation: u64, arn: &str) -> Result<Verdict, Error> {
        let principal = Principal::of_arn(arn);
        match &principal {
            Principal::User(name) if *name == self.expected => {
                tracing::info!(
                    iam_user = signer.iam_user(),
                    profile = signer.profile(),
                    arn,
                    "key verified: it is the configured IAM user's"
                );
                *self.lock() = State::Verified {
                    name: name.clone(),
                    generation,
                };
                Ok(Verdict::Verified(name.clone()))
            }
            _ => {
                let what = match principal {
                    Principal::User(_) => "another IAM user",
                    Principal::Root => "the account root user",
                    Principal::Other => "a role or federated session, not an IAM user",
                };
                tracing::error!(
                    iam_user = signer.iam_user(),
                    profile = signer.profile(),
                    arn,
                    expected_iam_user = self.expected.as_str(),
                    "the key is {what}'s: its callers are refused with IAM_USER_MISMATCH \
                     until it is fixed"
                );
                *self.lock() = State::Mismatch {
                    arn: arn.to_owned(),
                    generation,
                };
                Err(Error::IamUserMismatch)
            }
        }
    }

    /// Whose key it is, as far as known.
    fn signer(&self) -> String {
        match &*self.lock() {
            State::Mismatch { arn, .. } => arn.clone(),
            _ => "an unknown principal".to_owned(),
        }
    }
}
