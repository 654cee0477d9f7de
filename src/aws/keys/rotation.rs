//! Replacing an IAM user's access key, crash-safe (DESIGN.md, "Key
//! rotation").
//!
//! The user's secret is the record of where a rotation stands: its
//! `AWSCURRENT` version is the key every caller uses, an `AWSPENDING`
//! version a key created and stored but not yet promoted, and `AWSPREVIOUS`
//! the key `AWSCURRENT` left, kept until it is retired. IAM's limit of two
//! keys per user leaves room for exactly one key beside the current one. A
//! run looks at the stages and at the user's keys in IAM, then takes the
//! next step, always in this order:
//!
//! 1. an `AWSPENDING` key IAM still has is finished: proven, promoted; one
//!    IAM no longer has is dropped from the secret;
//! 2. a key beside the current one that is the old one (`AWSPREVIOUS`) is
//!    retired: after `old_key_grace`, deactivated, then deleted; any other
//!    (created, never stored: an orphan) is deleted at once;
//! 3. when due (or forced), a new key: created with the user's own current
//!    key, stored as `AWSPENDING` before anything else (under a
//!    `ClientRequestToken` derived from its id, so a resent store changes
//!    nothing), proven to sign as the same user (STS `GetCallerIdentity`,
//!    retried with backoff: IAM takes seconds to propagate a key), promoted
//!    to `AWSCURRENT`, and the old key retired as in 2.
//!
//! Whatever step a crash interrupts, the next run resumes from the stages:
//! at most one key ever exists that the secret does not hold (between the
//! create and the store), and the current key is never touched before a
//! proven new one is current, so no caller is ever without a working key.
//! Callers read `AWSCURRENT` at least every `keys.refresh`, and at once when
//! IAM rejects a key; the old key stays active for `old_key_grace` (at
//! least twice `refresh`) after the promotion. A run resumed by another
//! process does not know when the promotion happened, so it waits a whole
//! grace again before deactivating.
//!
//! A run holds a [`Lease`] (one replica per user), checked before every
//! step that changes something. Every step is an audit event (target
//! `credgate::audit`, `action = "rotate_key"`) naming the user, the step,
//! the keys by their last four characters, and the outcome.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use aws_credential_types::Credentials;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use crate::{
    aws::{
        credentials::UserClients,
        iam::{AccessKeyInfo, Iam, Principal},
        keys::{
            key_id::suffix,
            secrets::{CURRENT, PENDING, PREVIOUS, SecretError, Secrets, StoredKey, Version},
        },
    },
    error::{Error, IamCode},
    telemetry,
};

/// How long a new key is given to sign (IAM's propagation takes seconds).
const PROOF_BUDGET: Duration = Duration::from_secs(60);
/// The first wait between proof attempts; doubled each time up to
/// [`PROOF_MAX_BACKOFF`].
const PROOF_FIRST_BACKOFF: Duration = Duration::from_millis(250);
const PROOF_MAX_BACKOFF: Duration = Duration::from_secs(8);
/// Runs of the steps in one rotation at most: each run ends one stage.
const MAX_PASSES: usize = 4;
/// The namespace of the secret versions' `ClientRequestToken`s (a UUIDv5
/// of the new key's id: deterministic, so a resent store finds its own
/// version; and it reveals nothing of the key id).
const TOKEN_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x4c1e_9a57_0b6f_4f3d_9e21_8d5b_c7ed_9a01);

/// A lease on the user's rotation, held for the whole run.
pub(crate) trait Lease: Send + Sync {
    /// Extends the lease; an error when it is lost (another replica may
    /// hold it now), and then the run stops before its next step.
    fn keep(&self) -> BoxFuture<'_, Result<(), RotationError>>;
    /// Its TTL: how often [`Lease::keep`] must be called while waiting.
    fn ttl(&self) -> Duration;
}

/// What asked for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The schedule: rotate when the key is `rotate_after` old.
    Schedule,
    /// `credgate keys rotate`: rotate now.
    Command,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Command => "command",
        }
    }
}

/// How a run is to go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Replace a key this old (`None`: only when forced).
    pub(crate) rotate_after: Option<Duration>,
    /// How long the old key stays active after the promotion.
    pub(crate) grace: Duration,
    /// Why the run happens; `Command` rotates whatever the key's age.
    pub(crate) trigger: Trigger,
}

/// A step of the protocol, as audit events and errors name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Reading the secret's stages and the user's keys.
    Inspect,
    /// Dropping an `AWSPENDING` version whose key IAM no longer has.
    DropStalePending,
    /// Deleting a key the secret does not hold.
    DeleteOrphan,
    /// Creating the new key.
    Create,
    /// Storing it as `AWSPENDING`.
    StorePending,
    /// Proving it signs as the user.
    Prove,
    /// Moving `AWSCURRENT` to it.
    Promote,
    /// Deactivating the old key.
    DeactivateOld,
    /// Deleting the old key.
    DeleteOld,
}

impl Step {
    /// The step's name in audit events.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Inspect => "inspect",
            Self::DropStalePending => "drop_stale_pending",
            Self::DeleteOrphan => "delete_orphan",
            Self::Create => "create",
            Self::StorePending => "store_pending",
            Self::Prove => "prove",
            Self::Promote => "promote",
            Self::DeactivateOld => "deactivate_old",
            Self::DeleteOld => "delete_old",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RotationError {
    /// The user has no secret (or it holds no key).
    #[error("IAM user {0:?} has no secret holding its key (IAM_USER_NOT_PROVISIONED)")]
    NotProvisioned(String),
    /// IAM or STS failed a step.
    #[error("{step}: {error}")]
    Iam {
        /// The step.
        step: Step,
        /// IAM's answer, classified.
        #[source]
        error: Error,
    },
    /// Secrets Manager failed a step.
    #[error("{step}: {error}")]
    Secret {
        /// The step.
        step: Step,
        /// What Secrets Manager said.
        #[source]
        error: SecretError,
    },
    /// The lease was lost, or could not be renewed.
    #[error("the rotation lease was lost: {0}")]
    LeaseLost(String),
    /// What AWS reports contradicts the protocol; an operator must look.
    #[error("{step}: {what}")]
    Inconsistent {
        /// The step.
        step: Step,
        /// What was found.
        what: String,
    },
}

impl RotationError {
    /// Whether AWS (or the state store) was unavailable rather than the
    /// rotation wrong: trying again later may well succeed.
    pub(crate) fn unavailable(&self) -> bool {
        match self {
            Self::Iam { error, .. } => {
                error.reason().code() == tonic::Code::Unavailable
                    || matches!(error, Error::IamTimeout | Error::OutcomeUnknown { .. })
            }
            Self::Secret {
                error: SecretError::Failed { .. },
                ..
            } => true,
            Self::LeaseLost(_) => true,
            _ => false,
        }
    }

    /// The audit event's outcome for a failed step.
    fn outcome(&self) -> String {
        match self {
            Self::NotProvisioned(_) => "IAM_USER_NOT_PROVISIONED".to_owned(),
            Self::Iam { error, .. } => error.reason().as_str().to_owned(),
            Self::Secret { error, .. } => match error {
                SecretError::NotFound(_) => "SECRET_NOT_FOUND".to_owned(),
                SecretError::Malformed { .. } => "SECRET_MALFORMED".to_owned(),
                SecretError::Failed { code, .. } => format!("SECRETS_MANAGER_{code}"),
            },
            Self::LeaseLost(_) => "LEASE_LOST".to_owned(),
            Self::Inconsistent { .. } => "INCONSISTENT".to_owned(),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// A rotation was completed: the old key is gone.
    Rotated,
    /// Only leftovers of an earlier run were cleaned up, or nothing was due.
    Unchanged,
}

/// Where the user's rotation stands.
struct Stages {
    current: StoredKey,
    /// An `AWSPENDING` version other than the current one.
    pending: Option<StoredKey>,
    /// The key id `AWSPREVIOUS` holds.
    previous: Option<String>,
    /// The user's keys in IAM.
    keys: Vec<AccessKeyInfo>,
}

/// One run for one user.
struct Run<'a> {
    iam: &'a Iam,
    secrets: &'a Secrets,
    iam_user: &'a str,
    name: String,
    plan: Plan,
    lease: &'a dyn Lease,
    /// When this run promoted a key (the old one's grace starts then).
    promoted: Option<Instant>,
}

/// Runs the protocol for `iam_user` under `lease`; see the module docs.
pub(crate) async fn run(
    iam: &Iam,
    secrets: &Secrets,
    iam_user: &str,
    plan: Plan,
    lease: &dyn Lease,
) -> Result<Ended, RotationError> {
    let name = secrets
        .name_of(iam_user)
        .ok_or_else(|| RotationError::NotProvisioned(iam_user.to_owned()))?;
    let mut run = Run {
        iam,
        secrets,
        iam_user,
        name,
        plan,
        lease,
        promoted: None,
    };
    let mut ended = Ended::Unchanged;
    for _ in 0..MAX_PASSES {
        lease.keep().await?;
        let stages = run.inspect().await?;
        match run.next(stages).await? {
            Next::Again => {}
            Next::Retired => {
                ended = Ended::Rotated;
                if run.promoted.is_some() || plan.trigger == Trigger::Schedule {
                    return Ok(ended);
                }
            }
            Next::Done => return Ok(ended),
        }
    }
    Err(RotationError::Inconsistent {
        step: Step::Inspect,
        what: format!("the rotation did not settle in {MAX_PASSES} passes"),
    })
}

/// What a pass did.
enum Next {
    /// Changed something: look again.
    Again,
    /// Retired an old key.
    Retired,
    /// Nothing (more) to do.
    Done,
}

impl Run<'_> {
    /// One pass: the first step the stages call for.
    async fn next(&mut self, stages: Stages) -> Result<Next, RotationError> {
        let current = self.secrets_key_clients(&stages.current);
        if let Some(pending) = &stages.pending {
            if stages.keys.iter().any(|k| k.id == pending.access_key_id) {
                self.finish(&stages.current, pending).await?;
            } else {
                self.drop_stale_pending(pending).await?;
            }
            return Ok(Next::Again);
        }
        let extra: Vec<&AccessKeyInfo> = stages
            .keys
            .iter()
            .filter(|k| k.id != stages.current.access_key_id)
            .collect();
        if let Some(key) = extra.first() {
            if stages.previous.as_deref() == Some(key.id.as_str()) {
                self.retire(&current, &stages.current, key).await?;
                return Ok(Next::Retired);
            }
            self.delete_orphan(&current, &stages.current, key).await?;
            return Ok(Next::Again);
        }
        if self.promoted.is_none() && self.due(&stages) {
            self.rotate(&current, &stages.current).await?;
            return Ok(Next::Again);
        }
        Ok(Next::Done)
    }

    fn secrets_key_clients(&self, key: &StoredKey) -> UserClients {
        self.iam.keys().factory().with_key(key.credentials())
    }

    /// Whether a new key is due: always for a command, else by the current
    /// key's age.
    fn due(&self, stages: &Stages) -> bool {
        if self.plan.trigger == Trigger::Command {
            return true;
        }
        let Some(after) = self.plan.rotate_after else {
            return false;
        };
        stages
            .keys
            .iter()
            .find(|k| k.id == stages.current.access_key_id)
            .and_then(|k| k.created)
            .and_then(|created| SystemTime::now().duration_since(created).ok())
            .is_some_and(|age| age >= after)
    }

    /// Reads the stages and the user's keys (with the current key).
    async fn inspect(&self) -> Result<Stages, RotationError> {
        let step = Step::Inspect;
        let secret = |error| match error {
            SecretError::NotFound(_) | SecretError::Malformed { .. } => {
                RotationError::NotProvisioned(self.iam_user.to_owned())
            }
            error => RotationError::Secret { step, error },
        };
        let versions = self.secrets.versions(&self.name).await.map_err(secret)?;
        let current = self
            .secrets
            .read(&self.name, CURRENT)
            .await
            .map_err(secret)?;
        let pending = match versions.iter().find(|v| v.has(PENDING)) {
            // Left on the promoted version by a run stopped right after the
            // promotion: the label only, the key is current.
            Some(v) if v.id == current.version_id => {
                self.clear_pending_label(v).await?;
                None
            }
            Some(v) => match self.secrets.read(&self.name, PENDING).await {
                Ok(key) => Some(key),
                // A pending version that holds no key cannot be finished.
                Err(SecretError::Malformed { .. }) => {
                    self.clear_pending_label(v).await?;
                    None
                }
                Err(error) => return Err(RotationError::Secret { step, error }),
            },
            None => None,
        };
        let previous = match versions.iter().any(|v| v.has(PREVIOUS)) {
            true => match self.secrets.read(&self.name, PREVIOUS).await {
                Ok(key) => Some(key.access_key_id),
                Err(SecretError::Failed { .. }) | Err(SecretError::NotFound(_)) => None,
                Err(SecretError::Malformed { .. }) => None,
            },
            false => None,
        };
        let clients = self.secrets_key_clients(&current);
        let keys = self
            .iam
            .list_access_keys(&clients, self.iam_user)
            .await
            .map_err(|error| match &error {
                Error::UpstreamCredentialsRejected(..) => RotationError::Inconsistent {
                    step,
                    what: format!(
                        "IAM rejects the key the secret's AWSCURRENT holds ({}): restore a \
                         working key in the secret",
                        suffix(&current.access_key_id)
                    ),
                },
                _ => RotationError::Iam { step, error },
            })?;
        if !keys.iter().any(|k| k.id == current.access_key_id) {
            return Err(RotationError::Inconsistent {
                step,
                what: format!(
                    "the secret's AWSCURRENT key ({}) is not one of IAM user {:?}'s keys",
                    suffix(&current.access_key_id),
                    self.iam_user
                ),
            });
        }
        Ok(Stages {
            current,
            pending,
            previous,
            keys,
        })
    }

    async fn clear_pending_label(&self, version: &Version) -> Result<(), RotationError> {
        self.lease.keep().await?;
        self.secrets
            .move_stage(&self.name, PENDING, None, Some(&version.id))
            .await
            .map_err(|error| RotationError::Secret {
                step: Step::Promote,
                error,
            })
    }

    /// A fresh rotation: create, store, prove, promote.
    async fn rotate(
        &mut self,
        current: &UserClients,
        current_key: &StoredKey,
    ) -> Result<(), RotationError> {
        self.lease.keep().await?;
        let new = self
            .iam
            .create_access_key(current, self.iam_user)
            .await
            .map_err(|error| {
                self.failed(
                    Step::Create,
                    Some(&current_key.access_key_id),
                    None,
                    RotationError::Iam {
                        step: Step::Create,
                        error,
                    },
                )
            })?;
        let new_id = new.access_key_id().to_owned();
        self.audit(
            Step::Create,
            Some(&current_key.access_key_id),
            Some(&new_id),
            "OK",
        );
        #[cfg(feature = "fault-injection")]
        crate::fault::point("after_create");
        let pending = self.store_pending(current, current_key, &new).await?;
        #[cfg(feature = "fault-injection")]
        crate::fault::point("after_pending");
        self.finish(current_key, &pending).await
    }

    /// Stores `new` as `AWSPENDING`; when that fails, deletes `new` again,
    /// so that no key is left the secret does not hold.
    async fn store_pending(
        &self,
        current: &UserClients,
        current_key: &StoredKey,
        new: &Credentials,
    ) -> Result<StoredKey, RotationError> {
        let step = Step::StorePending;
        let token = request_token(new.access_key_id());
        let stored = match self.lease.keep().await {
            Ok(()) => self
                .secrets
                .put_pending(&self.name, new, &token)
                .await
                .map_err(|error| RotationError::Secret { step, error }),
            Err(lost) => Err(lost),
        };
        let new_id = new.access_key_id();
        match stored {
            Ok(version_id) => {
                self.audit(step, Some(&current_key.access_key_id), Some(new_id), "OK");
                self.secrets
                    .read(&self.name, PENDING)
                    .await
                    .ok()
                    .filter(|k| k.version_id == version_id && k.access_key_id == new_id)
                    .ok_or_else(|| RotationError::Inconsistent {
                        step,
                        what: "the stored AWSPENDING version does not read back".to_owned(),
                    })
            }
            Err(e) => {
                self.audit(
                    step,
                    Some(&current_key.access_key_id),
                    Some(new_id),
                    &e.outcome(),
                );
                // Not stored (or not known to be): take the key back. If that
                // fails too, the next run finds it as an orphan.
                let deleted = self
                    .iam
                    .delete_access_key(current, self.iam_user, new_id)
                    .await;
                self.audit(
                    Step::DeleteOrphan,
                    Some(&current_key.access_key_id),
                    Some(new_id),
                    deleted
                        .as_ref()
                        .map_or_else(|e| e.reason().as_str(), |_| "OK"),
                );
                Err(e)
            }
        }
    }

    /// Proves the pending key and promotes it.
    async fn finish(
        &mut self,
        current_key: &StoredKey,
        pending: &StoredKey,
    ) -> Result<(), RotationError> {
        let (old, new) = (&current_key.access_key_id, &pending.access_key_id);
        let clients = self.secrets_key_clients(pending);
        self.prove(&clients)
            .await
            .map_err(|e| self.failed(Step::Prove, Some(old), Some(new), e))?;
        self.audit(Step::Prove, Some(old), Some(new), "OK");
        #[cfg(feature = "fault-injection")]
        crate::fault::point("after_proof");
        let step = Step::Promote;
        self.lease.keep().await?;
        self.secrets
            .move_stage(
                &self.name,
                CURRENT,
                Some(&pending.version_id),
                Some(&current_key.version_id),
            )
            .await
            .map_err(|error| {
                self.failed(
                    step,
                    Some(old),
                    Some(new),
                    RotationError::Secret { step, error },
                )
            })?;
        self.promoted = Some(Instant::now());
        // This process signs with the new key from its next call on.
        self.secrets.invalidate(self.iam_user);
        self.secrets
            .move_stage(&self.name, PENDING, None, Some(&pending.version_id))
            .await
            .map_err(|error| {
                self.failed(
                    step,
                    Some(old),
                    Some(new),
                    RotationError::Secret { step, error },
                )
            })?;
        self.audit(step, Some(old), Some(new), "OK");
        #[cfg(feature = "fault-injection")]
        crate::fault::point("after_promote");
        Ok(())
    }

    /// STS `GetCallerIdentity` signed with the new key must name the user;
    /// retried with backoff while IAM does not know the key yet.
    async fn prove(&self, clients: &UserClients) -> Result<(), RotationError> {
        let step = Step::Prove;
        let started = Instant::now();
        let mut backoff = PROOF_FIRST_BACKOFF;
        loop {
            self.lease.keep().await?;
            let error = match self.iam.identity_of(clients).await {
                Ok(identity) => {
                    return match Principal::of_arn(&identity.arn) {
                        Principal::User(name) if name == self.iam_user => Ok(()),
                        _ => Err(RotationError::Inconsistent {
                            step,
                            what: format!(
                                "the new key signs as {}, not as IAM user {:?}",
                                identity.arn, self.iam_user
                            ),
                        }),
                    };
                }
                Err(error) => error,
            };
            let not_yet = matches!(
                error.aws().and_then(|a| a.code.as_ref()),
                Some(IamCode::InvalidClientTokenId | IamCode::SignatureDoesNotMatch)
            ) || error.reason().guarantees_not_applied()
                && error.reason().code() == tonic::Code::Unavailable;
            if !not_yet || started.elapsed() + backoff > PROOF_BUDGET {
                return Err(RotationError::Iam { step, error });
            }
            tracing::info!(
                iam_user = self.iam_user,
                reason = %error.reason(),
                "the new key does not sign yet (IAM propagates keys in seconds); trying again"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(PROOF_MAX_BACKOFF);
        }
    }

    /// Drops the `AWSPENDING` stage of a key IAM no longer has.
    async fn drop_stale_pending(&self, pending: &StoredKey) -> Result<(), RotationError> {
        let step = Step::DropStalePending;
        self.lease.keep().await?;
        self.secrets
            .move_stage(&self.name, PENDING, None, Some(&pending.version_id))
            .await
            .map_err(|error| {
                self.failed(
                    step,
                    None,
                    Some(&pending.access_key_id),
                    RotationError::Secret { step, error },
                )
            })?;
        self.audit(step, None, Some(&pending.access_key_id), "OK");
        Ok(())
    }

    /// Deletes a key the secret does not hold (created, never stored).
    async fn delete_orphan(
        &self,
        current: &UserClients,
        current_key: &StoredKey,
        orphan: &AccessKeyInfo,
    ) -> Result<(), RotationError> {
        let step = Step::DeleteOrphan;
        self.lease.keep().await?;
        let cur = Some(current_key.access_key_id.as_str());
        self.iam
            .delete_access_key(current, self.iam_user, &orphan.id)
            .await
            .map_err(|error| {
                self.failed(
                    step,
                    cur,
                    Some(&orphan.id),
                    RotationError::Iam { step, error },
                )
            })?;
        self.audit(step, cur, Some(&orphan.id), "OK");
        Ok(())
    }

    /// After the grace, deactivates and deletes the old key, signing with
    /// the current (new) one.
    async fn retire(
        &self,
        current: &UserClients,
        current_key: &StoredKey,
        old: &AccessKeyInfo,
    ) -> Result<(), RotationError> {
        let new = Some(current_key.access_key_id.as_str());
        if old.active {
            self.wait_grace().await?;
            let step = Step::DeactivateOld;
            self.lease.keep().await?;
            self.iam
                .deactivate_access_key(current, self.iam_user, &old.id)
                .await
                .map_err(|error| {
                    self.failed(step, Some(&old.id), new, RotationError::Iam { step, error })
                })?;
            self.audit(step, Some(&old.id), new, "OK");
            #[cfg(feature = "fault-injection")]
            crate::fault::point("after_deactivate");
        }
        let step = Step::DeleteOld;
        self.lease.keep().await?;
        self.iam
            .delete_access_key(current, self.iam_user, &old.id)
            .await
            .map_err(|error| {
                self.failed(step, Some(&old.id), new, RotationError::Iam { step, error })
            })?;
        self.audit(step, Some(&old.id), new, "OK");
        Ok(())
    }

    /// Waits out the old key's grace, keeping the lease: from this run's
    /// promotion, or a whole grace from now when an earlier run promoted.
    async fn wait_grace(&self) -> Result<(), RotationError> {
        let until = self.promoted.unwrap_or_else(Instant::now) + self.plan.grace;
        if self.promoted.is_none() {
            tracing::info!(
                iam_user = self.iam_user,
                grace = %humantime::format_duration(self.plan.grace),
                "resuming a rotation whose promotion time is unknown: the old key gets a whole \
                 grace from now"
            );
        }
        let every = (self.lease.ttl() / 3).max(Duration::from_millis(100));
        while Instant::now() < until {
            tokio::time::sleep_until(until.min(Instant::now() + every)).await;
            self.lease.keep().await?;
        }
        Ok(())
    }

    /// Audits a failed step and hands the error on.
    fn failed(
        &self,
        step: Step,
        old: Option<&str>,
        new: Option<&str>,
        error: RotationError,
    ) -> RotationError {
        self.audit(step, old, new, &error.outcome());
        error
    }

    /// One audit event: the step, the user, the keys' last four
    /// characters, the outcome.
    fn audit(&self, step: Step, old: Option<&str>, new: Option<&str>, outcome: &str) {
        tracing::info!(
            target: telemetry::AUDIT_TARGET,
            action = "rotate_key",
            step = step.as_str(),
            iam_user = self.iam_user,
            old_key = old.map(suffix).unwrap_or_default(),
            new_key = new.map(suffix).unwrap_or_default(),
            outcome,
            trigger = self.plan.trigger.as_str(),
            "key rotation step"
        );
    }
}

/// The `ClientRequestToken` of the secret version holding `access_key_id`.
fn request_token(access_key_id: &str) -> String {
    uuid::Uuid::new_v5(&TOKEN_NAMESPACE, access_key_id.as_bytes())
        .hyphenated()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_token_of_a_key_is_fixed_and_says_nothing_of_its_id() {
        let a = request_token("AKIAIOSFODNN7EXAMPLE");
        assert_eq!(
            a,
            request_token("AKIAIOSFODNN7EXAMPLE"),
            "a resend finds its version"
        );
        assert_ne!(a, request_token("AKIAIOSFODNN7EXAMPLF"));
        // Secrets Manager takes 32 to 64 characters.
        assert!((32..=64).contains(&a.len()), "{a}");
        assert!(!a.to_uppercase().contains("MPLE"), "{a}");
    }
}
