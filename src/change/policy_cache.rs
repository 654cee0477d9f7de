//! The account password policy per signer: read once, shared by every call,
//! refreshed after a minute.
//!
//! Single-flight: a cold or expired entry is fetched by one call while the
//! others wait for its answer, so 100 concurrent cold requests cost one IAM
//! call. Failures are cached too (briefly), so a user without
//! `iam:GetAccountPasswordPolicy` costs one extra IAM call a minute, not one
//! per change.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
    time::Duration,
};

use tokio::{sync::Mutex, time::Instant};

use crate::{
    aws::iam::Iam, aws::keys::Signer, aws::password::Policy, deadline::Deadline, error::Error,
};

/// How long a policy is trusted. Short: a stricter policy should apply
/// within a minute, and IAM checks every change itself anyway.
const POLICY_TTL: Duration = Duration::from_secs(60);
/// How long a refusal (`AccessDenied`) is remembered: it only changes when
/// an operator changes the user's policy.
const DENIED_TTL: Duration = Duration::from_secs(60);
/// How long any other failure is remembered: enough to spare IAM a herd.
const FAILURE_TTL: Duration = Duration::from_secs(5);

type Answer = Result<Option<Policy>, Error>;

struct Cached {
    answer: Answer,
    until: Instant,
}

type Slot = Arc<Mutex<Option<Cached>>>;

/// See the module docs.
#[derive(Default)]
pub(crate) struct PolicyCache {
    by_signer: std::sync::Mutex<HashMap<Signer, Slot>>,
}

impl PolicyCache {
    /// An empty cache; a signer's slot is made when it first asks.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn slot(&self, signer: &Signer) -> Slot {
        self.by_signer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(signer.clone())
            .or_default()
            .clone()
    }

    /// The policy for `signer`, from the cache or from IAM.
    pub(crate) async fn get(&self, iam: &Iam, signer: &Signer, deadline: Deadline) -> Answer {
        let slot = self.slot(signer);
        // Held across the fetch: that is what makes it single-flight.
        let mut cached = tokio::time::timeout_at(deadline.instant(), slot.lock())
            .await
            .map_err(|_| Error::DeadlineBeforeSend { stage: "policy" })?;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.until
        {
            return c.answer.clone();
        }
        let answer = iam.password_policy(signer, deadline).await;
        let ttl = match &answer {
            Ok(_) => Some(POLICY_TTL),
            Err(Error::IamAccessDenied(_)) => Some(DENIED_TTL),
            // This call's own deadline, not IAM's health: the next call,
            // with its own budget, tries again.
            Err(Error::DeadlineBeforeSend { .. } | Error::IamTimeout) => None,
            Err(_) => Some(FAILURE_TTL),
        };
        *cached = ttl.map(|ttl| Cached {
            answer: answer.clone(),
            until: Instant::now() + ttl,
        });
        answer
    }
}
