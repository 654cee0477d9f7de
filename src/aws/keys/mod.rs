//! Key custody: where each IAM user's access key comes from ([`Keys`], over
//! [`profiles`] or [`secrets`] in AWS Secrets Manager), how it is replaced
//! ([`rotation`], crash-safe, one replica at a time) and how old it is
//! ([`age`]).
//!
//! A key is looked up per IAM user, when first needed ([`Keys::for_user`]):
//! the set of users need not be known at start (caller templates build
//! them from certificates), and a user nobody calls costs nothing.

pub(crate) mod age;
pub(crate) mod key_id;
pub(crate) mod profiles;
pub(crate) mod rotation;
pub(crate) mod secrets;

use std::{fmt, sync::Arc};

use crate::{
    aws::credentials::{ClientFactory, UserClients},
    config::{AwsSettings, KeySettings, KeySource},
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
    /// The configured source. With `profiles`, the clients of `profiles`
    /// are built now from one parse of the files; everything else is
    /// looked up on first use.
    pub(crate) async fn new<'a>(
        aws: &AwsSettings,
        keys: &KeySettings,
        profiles: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let factory = ClientFactory::new(aws);
        let source = match keys.source {
            KeySource::Profiles => Source::Profiles(Profiles::new(&factory, profiles).await),
            KeySource::SecretsManager => Source::Secrets(Secrets::new(&factory, keys).await),
        };
        Self { factory, source }
    }

    /// The clients that sign as `signer`'s IAM user. Nothing is sent to IAM:
    /// `IAM_USER_NOT_PROVISIONED` when the source has no key for it,
    /// `KEY_SOURCE_UNAVAILABLE` when the source cannot be read.
    pub(crate) async fn for_user(&self, signer: &Signer) -> Result<Arc<UserClients>, Error> {
        match (&self.source, signer.profile()) {
            (Source::Profiles(profiles), Some(profile)) => profiles.get(profile).await,
            (Source::Profiles(_), None) => Err(Error::IamUserNotProvisioned),
            (Source::Secrets(secrets), _) => secrets.get(signer.iam_user()).await,
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
