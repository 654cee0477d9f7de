//! Key custody: where each IAM user's access key comes from ([`Keys`], over
//! [`profiles`] or [`secrets`] in AWS Secrets Manager), how it is replaced
//! ([`rotation`], crash-safe, one replica at a time) and how old it is
//! ([`age`]).
//!
//! A key is looked up per IAM user, when first needed ([`Keys::for_user`]),
//! and kept in a bounded cache ([`cache`]): the set of users need not be
//! known at start (caller templates build them from certificates), a user
//! nobody calls costs nothing, and thousands who called once do not stay
//! in memory.

pub(crate) mod age;
pub(crate) mod cache;
pub(crate) mod key_id;
pub(crate) mod profiles;
pub(crate) mod rotation;
pub(crate) mod secrets;

use std::{fmt, sync::Arc};

use crate::{
    aws::credentials::{ClientFactory, UserClients},
    config::{AwsSettings, CallerSettings, KeySettings, KeySource},
    error::Error,
};
use profiles::Profiles;
use secrets::Secrets;

/// Whose key signs a call: an IAM user and, with the `profiles` source, the
/// profile holding its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Signer {
    iam_user: String,
    profile: Option<String>,
}

impl Signer {
    /// `iam_user`'s key, from `profile` when the source is `profiles`.
    pub(crate) fn new(iam_user: &str, profile: Option<&str>) -> Self {
        Self {
            iam_user: iam_user.to_owned(),
            profile: profile.map(str::to_owned),
        }
    }

    /// The IAM user.
    pub(crate) fn iam_user(&self) -> &str {
        &self.iam_user
    }

    /// The profile holding the key (source `profiles`).
    pub(crate) fn profile(&self) -> Option<&str> {
        self.profile.as_deref()
    }
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.profile {
            Some(profile) => write!(f, "aws_profile {profile:?}"),
            None => write!(f, "the secret of IAM user {:?}", self.iam_user),
        }
    }
}

enum Source {
    Profiles(Profiles),
    Secrets(Secrets),
}

/// Every IAM user's key, from the configured source; all their clients
/// share one HTTP connection pool.
pub(crate) struct Keys {
    factory: ClientFactory,
    source: Source,
}

impl Keys {
    /// The configured source (`profiles`: the configured callers'). Every
    /// user's key and clients are looked up on first use and kept in a
    /// bounded cache ([`cache`]).
    pub(crate) async fn new(
        aws: &AwsSettings,
        keys: &KeySettings,
        callers: &[CallerSettings],
    ) -> Self {
        let factory = ClientFactory::new(aws);
        let source = match keys.source {
            KeySource::Profiles => Source::Profiles(Profiles::new(&factory, callers)),
            KeySource::SecretsManager => Source::Secrets(Secrets::new(&factory, keys).await),
        };
        Self { factory, source }
    }

    /// The clients that sign as `signer`'s IAM user. Nothing is sent to IAM:
    /// `IAM_USER_NOT_PROVISIONED` when the source has no key for it,
    /// `KEY_SOURCE_UNAVAILABLE` when the source cannot be read.
    pub(crate) async fn for_user(&self, signer: &Signer) -> Result<Arc<UserClients>, Error> {
        match (&self.source, signer.profile()) {
            (Source::Profiles(profiles), Some(profile)) => {
                profiles.get(profile, signer.iam_user()).await
            }
            (Source::Profiles(_), None) => Err(Error::IamUserNotProvisioned),
            (Source::Secrets(secrets), _) => secrets.get(signer.iam_user()).await,
        }
    }

    /// The clients of `signer` for a look at its key (custody's checks of
    /// every user): as [`Keys::for_user`], but what is not cached already
    /// is made for this look only.
    pub(crate) async fn peek(&self, signer: &Signer) -> Result<Arc<UserClients>, Error> {
        match (&self.source, signer.profile()) {
            (Source::Profiles(profiles), Some(profile)) => profiles.peek(profile).await,
            (Source::Profiles(_), None) => Err(Error::IamUserNotProvisioned),
            (Source::Secrets(secrets), _) => secrets.peek(signer.iam_user()).await,
        }
    }

    /// Reads `signer`'s key again because AWS rejected it; whether that was
    /// done (see each source for how often).
    pub(crate) async fn refresh(&self, signer: &Signer) -> bool {
        match (&self.source, signer.profile()) {
            (Source::Profiles(profiles), Some(profile)) => profiles.refresh(profile).await,
            (Source::Profiles(_), None) => false,
            (Source::Secrets(secrets), _) => secrets.refresh(signer.iam_user()).await,
        }
    }

    /// How many times `signer`'s key may have changed: an identity verified
    /// for a lower generation must be verified again.
    pub(crate) fn generation(&self, signer: &Signer) -> u64 {
        match (&self.source, signer.profile()) {
            (Source::Profiles(profiles), Some(profile)) => profiles.generation(profile),
            (Source::Profiles(_), None) => 0,
            (Source::Secrets(secrets), _) => secrets.generation(signer.iam_user()),
        }
    }

    /// The users whose keys callers used but no configured caller names:
    /// templated callers' profiles (with Secrets Manager, every user with
    /// a secret is known from the secrets already).
    pub(crate) fn used_unconfigured(&self) -> Vec<Signer> {
        match &self.source {
            Source::Profiles(profiles) => profiles
                .claimed()
                .into_iter()
                .map(|(profile, user)| Signer::new(&user, Some(&profile)))
                .collect(),
            Source::Secrets(_) => Vec::new(),
        }
    }

    /// Resolves once such a user is first used (never with Secrets Manager).
    pub(crate) async fn new_user(&self) {
        match &self.source {
            Source::Profiles(profiles) => profiles.new_user().await,
            Source::Secrets(_) => std::future::pending().await,
        }
    }

    /// The Secrets Manager source, when it is the configured one.
    pub(crate) fn secrets(&self) -> Option<&Secrets> {
        match &self.source {
            Source::Secrets(secrets) => Some(secrets),
            Source::Profiles(_) => None,
        }
    }

    /// Builds clients (on the shared pool) for the given key.
    pub(crate) fn factory(&self) -> &ClientFactory {
        &self.factory
    }

    /// The region requests are signed for.
    pub(crate) fn region(&self) -> &str {
        self.factory.region()
    }
}
