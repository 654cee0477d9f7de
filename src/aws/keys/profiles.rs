//! Key source `profiles`: each caller's key in a named profile of the AWS
//! shared config/credentials files.
//!
//! Each profile's clients read their credentials only from that profile. The
//! SDK's default chain would fall back to environment variables or instance
//! metadata when a profile is missing, and silently sign as somebody else;
//! credgate must never do that.
//!
//! The shared files are parsed once for all callers. aws-config's
//! `ProfileFileCredentialsProvider` parses and keeps its own copy of the whole
//! files per profile, so memory grew with callers × profiles (each profile's
//! provider held every profile of the files). Profiles holding static keys —
//! the normal case for IAM users — get those keys from the one parse; only
//! profiles that need more (a role, `credential_process`, SSO) use the SDK's
//! provider.
//!
//! The files are read on a blocking thread (aws-config reads them with
//! `std::fs`). A profile is re-read when the files changed on disk (size or
//! modification time: a rotated Secret), or at most once per
//! [`REREAD_UNCHANGED_AFTER`] when they did not, however many calls AWS
//! rejects meanwhile.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use aws_config::profile::{Profile, ProfileFileCredentialsProvider, ProfileSet};
use aws_credential_types::{Credentials, provider::SharedCredentialsProvider};
use aws_runtime::env_config::file::EnvConfigFiles;
use aws_types::os_shim_internal::{Env, Fs};
use tokio::time::Instant;

use crate::{
    aws::credentials::{ClientFactory, UserClients},
    error::{Cause, Error},
};

/// Unchanged files are re-read at most this often (a credential_process or
/// SSO profile can change without its files changing).
const REREAD_UNCHANGED_AFTER: Duration = Duration::from_secs(30);

/// Profile keys that make credentials more than a static key pair; such
/// profiles are resolved by the SDK's own provider.
const DYNAMIC_KEYS: &[&str] = &[
    "role_arn",
    "credential_process",
    "sso_session",
    "sso_start_url",
    "web_identity_token_file",
    "login_session",
];

/// Size and modification time of each AWS shared file.
type FilesStamp = Vec<Option<(u64, std::time::SystemTime)>>;

struct Slot {
    client: ArcSwap<UserClients>,
    /// When and on which files the last re-read happened.
    last_refresh: Mutex<Option<(Instant, FilesStamp)>>,
    /// Bumped by every re-read: a verified identity belongs to a generation.
    generation: AtomicU64,
}

/// The clients of each profile, by name: those of the configured callers
/// built at start from one parse of the files, a templated caller's on
/// first use once the files define it.
pub(crate) struct Profiles {
    factory: ClientFactory,
    by_profile: Mutex<HashMap<String, Arc<Slot>>>,
    /// The last parse of the files and their stamp: one parse serves every
    /// new profile until the files change.
    parsed: tokio::sync::Mutex<Option<(FilesStamp, Arc<ProfileSet>)>>,
}

impl Profiles {
    /// Builds the clients of every distinct profile from one parse of the files.
    pub(crate) async fn new<'a>(
        factory: &ClientFactory,
        profiles: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let parsed = load_profiles().await.ok();
        let by_profile = profiles
            .into_iter()
            .map(|profile| {
                let client = build(factory, profile, parsed.as_ref());
                (profile.to_owned(), Arc::new(Slot::new(client)))
            })
            .collect();
        Self {
            factory: factory.clone(),
            by_profile: Mutex::new(by_profile),
            parsed: tokio::sync::Mutex::default(),
        }
    }

    fn slot(&self, profile: &str) -> Option<Arc<Slot>> {
        lock(&self.by_profile).get(profile).cloned()
    }

    /// The clients that sign as `profile`'s IAM user. A configured
    /// caller's profile always has them (a profile missing from the files
    /// fails at its first call, which re-reads them); any other profile (a
    /// templated caller's) only once the files define it, else
    /// `IAM_USER_NOT_PROVISIONED`.
    pub(crate) async fn get(&self, profile: &str) -> Result<Arc<UserClients>, Error> {
        if let Some(slot) = self.slot(profile) {
            return Ok(slot.client.load_full());
        }
        let stamp = files_stamp().await;
        // One parse at a time, shared by every profile while the files
        // stay the same.
        let mut parsed = self.parsed.lock().await;
        if let Some(slot) = self.slot(profile) {
            return Ok(slot.client.load_full());
        }
        let set = match &*parsed {
            Some((at, set)) if *at == stamp => set.clone(),
            _ => {
                let set = Arc::new(load_profiles().await.map_err(|e| {
                    Error::KeySourceUnavailable(Cause::msg(format!(
                        "cannot read the AWS shared files: {e}"
                    )))
                })?);
                *parsed = Some((stamp, set.clone()));
                set
            }
        };
        if set.get_profile(profile).is_none() {
            return Err(Error::IamUserNotProvisioned);
        }
        let client = build(&self.factory, profile, Some(&set));
        let slot = lock(&self.by_profile)
            .entry(profile.to_owned())
            .or_insert_with(|| Arc::new(Slot::new(client)))
            .clone();
        Ok(slot.client.load_full())
    }

    /// Rebuilds `profile`'s clients from a fresh read of the credentials
    /// files: when AWS says the key is expired or unknown (a rotated Secret)
    /// or the profile could not be loaded. Returns whether it re-read them:
    /// not when the files are unchanged since a re-read less than
    /// [`REREAD_UNCHANGED_AFTER`] ago.
    pub(crate) async fn refresh(&self, profile: &str) -> bool {
        let Some(slot) = self.slot(profile) else {
            return false;
        };
        let stamp = files_stamp().await;
        {
            let mut last = lock(&slot.last_refresh);
            if last
                .as_ref()
                .is_some_and(|(t, s)| *s == stamp && t.elapsed() < REREAD_UNCHANGED_AFTER)
            {
                return false;
            }
            *last = Some((Instant::now(), stamp));
        }
        let parsed = load_profiles().await.ok();
        slot.client
            .store(Arc::new(build(&self.factory, profile, parsed.as_ref())));
        slot.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// How many times `profile` was re-read: its key may have changed since
    /// a lower generation was verified.
    pub(crate) fn generation(&self, profile: &str) -> u64 {
        self.slot(profile)
            .map_or(0, |s| s.generation.load(Ordering::Acquire))
    }
}

impl Slot {
    fn new(client: UserClients) -> Self {
        Self {
            client: ArcSwap::from_pointee(client),
            last_refresh: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn build(factory: &ClientFactory, profile: &str, parsed: Option<&ProfileSet>) -> UserClients {
    let static_keys = parsed
        .and_then(|set| set.get_profile(profile))
        .and_then(static_credentials);
    let credentials = match static_keys {
        Some(keys) => SharedCredentialsProvider::new(keys),
        // A missing profile lands here too: the provider then fails with
        // a clear error at the first call, which re-reads the files.
        None => SharedCredentialsProvider::new(
            ProfileFileCredentialsProvider::builder()
                .profile_name(profile)
                .build(),
        ),
    };
    factory.build(credentials)
}

/// Parses the shared config and credentials files (`AWS_CONFIG_FILE`,
/// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/...`) on a blocking thread.
async fn load_profiles() -> Result<ProfileSet, String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        handle.block_on(aws_config::profile::load(
            &Fs::real(),
            &Env::real(),
            &EnvConfigFiles::default(),
            None,
        ))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// The AWS shared files' sizes and modification times (`None`: missing).
async fn files_stamp() -> FilesStamp {
    let env = Env::real();
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let path = |var: &str, default: &str| {
        env.get(var)
            .ok()
            .map(std::path::PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let mut stamp = Vec::new();
    for file in [
        path("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        path("AWS_CONFIG_FILE", "config"),
    ] {
        let meta = match file {
            Some(file) => tokio::fs::metadata(file).await.ok(),
            None => None,
        };
        stamp.push(meta.and_then(|m| Some((m.len(), m.modified().ok()?))));
    }
    stamp
}

/// The profile's key pair, when that is all it holds.
fn static_credentials(profile: &Profile) -> Option<Credentials> {
    if DYNAMIC_KEYS.iter().any(|k| profile.get(k).is_some()) {
        return None;
    }
    Some(Credentials::new(
        profile.get("aws_access_key_id")?,
        profile.get("aws_secret_access_key")?,
        profile.get("aws_session_token").map(str::to_owned),
        None,
        "credgate-profile",
    ))
}

/// The `profiles` that the shared config/credentials files do not define,
/// one problem line each. Read offline: nothing is sent to AWS.
pub(crate) async fn missing_profiles<'a>(
    profiles: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    let parsed = match load_profiles().await {
        Ok(set) => set,
        Err(e) => return vec![format!("AWS shared config/credentials files: {e}")],
    };
    let wanted: BTreeSet<&str> = profiles.into_iter().collect();
    wanted
        .into_iter()
        .filter(|p| parsed.get_profile(p).is_none())
        .map(|p| {
            format!(
                "aws_profile {p:?} is not in the AWS shared config/credentials files \
                 (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
            )
        })
        .collect()
}
