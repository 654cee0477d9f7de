//! Verified mappings: whose key each profile really holds.
//!
//! `[[callers]]` says "this caller acts as IAM user X with profile P"; only
//! AWS knows whose key P holds. At start-up every distinct profile is asked
//! (STS `GetCallerIdentity`, which needs no permission; IAM `GetUser` as the
//! fallback) in the background, and a profile not verified yet is verified on
//! first use. A profile whose key belongs to another IAM user, to the root
//! user or to a role session is refused (`IAM_USER_MISMATCH`) without calling
//! `ChangePassword`; one whose identity cannot be read at all is served as
//! before, with one warning. A refreshed key (rotation) is verified again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::StreamExt;
use tokio::time::Instant;

use crate::{aws::iam::Iam, config::CallerSettings, deadline::Deadline, error::Error};

/// How long an unverifiable profile is served before credgate asks again
/// (STS may have been down, or a permission may have been added).
const RETRY_UNVERIFIABLE: Duration = Duration::from_secs(60);
/// Budget of one profile's verification in the background.
const BACKGROUND_BUDGET: Duration = Duration::from_secs(10);
/// Profiles verified at once in the background.
const BACKGROUND_CONCURRENCY: usize = 4;

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
    /// The configured `iam_user` (config makes it one per profile).
    expected: String,
    state: Mutex<State>,
    /// One verification at a time per profile.
    flight: tokio::sync::Mutex<()>,
}

/// Verification state of every configured profile, and of every templated
/// caller's profile once used.
pub(crate) struct Principals {
    by_profile: HashMap<String, Profile>,
    /// Templated callers' profiles, each expecting the IAM user of the
    /// first caller that used it. Only profiles the shared files define
    /// get here (`AwsClients::provision` comes first), so the files bound
    /// it. Issue 19's second part moves every check to first use.
    templated: Mutex<HashMap<String, Arc<Profile>>>,
}

impl Principals {
    /// Every distinct profile of `callers`, none verified yet.
    pub(crate) fn new(callers: &[CallerSettings]) -> Self {
        let mut by_profile = HashMap::new();
        for c in callers {
            by_profile
                .entry(c.aws_profile.clone())
                .or_insert_with(|| Profile::new(&c.iam_user));
        }
        Self {
            by_profile,
            templated: Mutex::default(),
        }
    }

    /// The verdict on `profile` for a call, from a caller acting as
    /// `iam_user`, due by `deadline`, verifying it first if needed.
    /// `Err(IamUserMismatch)` refuses the call — also when the profile is
    /// already known to hold another configured user's key; a deadline
    /// reached while verifying is `DEADLINE_BEFORE_SEND` (nothing was sent).
    pub(crate) async fn check(
        &self,
        iam: &Iam,
        profile: &str,
        iam_user: &str,
        deadline: Deadline,
    ) -> Result<Verdict, Error> {
        let templated;
        let entry = match self.by_profile.get(profile) {
            Some(entry) => entry,
            None => {
                templated = self
                    .templated
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(profile.to_owned())
                    .or_insert_with(|| Arc::new(Profile::new(iam_user)))
                    .clone();
                &templated
            }
        };
        // One profile holds one user's key: a second user on it (two
        // templates, or a template and an exact entry) is refused.
        if entry.expected != iam_user {
            tracing::error!(
                profile,
                iam_user,
                expected_iam_user = entry.expected.as_str(),
                "two callers act as different IAM users with one profile; refused"
            );
            return Err(Error::IamUserMismatch);
        }
        Self::verify(iam, profile, entry, deadline).await
    }

    /// The verdict on `entry`, verifying it first if needed.
    async fn verify(
        iam: &Iam,
        profile: &str,
        entry: &Profile,
        deadline: Deadline,
    ) -> Result<Verdict, Error> {
        let generation = iam.clients().generation(profile);
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
        match iam.caller_identity(profile, deadline).await {
            Ok(identity) => entry.settle(profile, generation, &identity.arn),
            // Out of this call's time: leave the profile unverified and let
            // the next call (or the background task) finish the job.
            Err((Error::DeadlineBeforeSend { .. } | Error::IamTimeout, _))
            | Err((_, Error::DeadlineBeforeSend { .. } | Error::IamTimeout))
                if deadline.passed() =>
            {
                Err(Error::DeadlineBeforeSend { stage: "identity" })
            }
            Err((sts, iam_err)) => {
                tracing::warn!(
                    profile,
                    sts = %sts,
                    sts_cause = %crate::error::chain(&sts),
                    iam = %iam_err,
                    "cannot read whose key this profile holds (STS GetCallerIdentity and IAM GetUser \
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

    /// Verifies every profile, a few at a time, each within its own
    /// budget. `serve` runs it in the background: start-up does not wait.
    pub(crate) async fn verify_all(&self, iam: &Iam) {
        futures_util::stream::iter(self.by_profile.iter())
            .for_each_concurrent(BACKGROUND_CONCURRENCY, |(profile, entry)| async move {
                let deadline = Deadline::at(Instant::now() + BACKGROUND_BUDGET);
                let _ = Self::verify(iam, profile, entry, deadline).await;
            })
            .await;
    }

    /// Offline problems and verdicts for `check-config --online`: every
    /// profile, one line per problem.
    pub(crate) async fn problems(&self, iam: &Iam) -> Vec<String> {
        let mut problems = Vec::new();
        let mut profiles: Vec<&String> = self.by_profile.keys().collect();
        profiles.sort();
        for profile in profiles {
            let deadline = Deadline::at(Instant::now() + BACKGROUND_BUDGET);
            let entry = &self.by_profile[profile];
            match Self::verify(iam, profile, entry, deadline).await {
                Ok(Verdict::Verified(_)) => {}
                Ok(Verdict::Unverifiable) => problems.push(format!(
                    "aws_profile {profile:?}: cannot verify whose key it holds: neither STS \
                     GetCallerIdentity nor IAM GetUser answered (see the log above)"
                )),
                Err(Error::IamUserMismatch) => {
                    problems.push(format!(
                        "aws_profile {profile:?} signs as {}, not as the configured IAM user {:?}",
                        entry.signer(),
                        entry.expected
                    ));
                }
                Err(e) => problems.push(format!(
                    "aws_profile {profile:?}: cannot verify whose key it holds: {e}"
                )),
            }
        }
        problems
    }
}

impl Profile {
    fn new(expected: &str) -> Self {
        Self {
            expected: expected.to_owned(),
            state: Mutex::new(State::Unknown),
            flight: tokio::sync::Mutex::new(()),
        }
    }

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

    fn settle(&self, profile: &str, generation: u64, arn: &str) -> Result<Verdict, Error> {
        let principal = Principal::of_arn(arn);
        match &principal {
            Principal::User(name) if *name == self.expected => {
                tracing::info!(
                    profile,
                    arn,
                    "profile verified: its key is the configured IAM user's"
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
                    profile,
                    arn,
                    expected_iam_user = self.expected.as_str(),
                    "profile holds the key of {what}: its callers are refused with IAM_USER_MISMATCH \
                     until the profile is fixed"
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One profile holds one user's key: a caller acting as another user
    /// with it is refused before anything is asked of AWS, whether the
    /// profile is an exact entry's or was first used by a templated caller.
    #[tokio::test]
    async fn a_profile_first_held_for_one_user_refuses_another() {
        let settings = crate::config::AwsSettings {
            // Nothing listens there; nothing is sent anyway.
            endpoint_url: Some("http://127.0.0.1:9".to_owned()),
            ..crate::config::AwsSettings::default()
        };
        let iam = Iam::new(crate::aws::credentials::AwsClients::new(&settings, ["p"]).await);
        let exact = CallerSettings {
            matcher: crate::config::Matcher::CommonName("alice".into()),
            iam_user: "alice".into(),
            aws_profile: "p".into(),
            entry: 0,
        };
        let principals = Principals::new(&[exact]);
        let now = || Deadline::at(Instant::now());
        let refused = principals.check(&iam, "p", "bob", now()).await;
        assert!(
            matches!(refused, Err(Error::IamUserMismatch)),
            "{refused:?}"
        );
        // A templated caller's profile: the first user it served holds it.
        let first = principals.check(&iam, "t", "carol", now()).await;
        assert!(!matches!(first, Err(Error::IamUserMismatch)), "{first:?}");
        let second = principals.check(&iam, "t", "dave", now()).await;
        assert!(matches!(second, Err(Error::IamUserMismatch)), "{second:?}");
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
}
