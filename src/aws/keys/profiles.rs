//! Key source `profiles`: each caller's key in a named profile of the AWS
//! shared config/credentials files.
//!
//! Each profile's clients read their credentials only from that profile. The
//! SDK's default chain would fall back to environment variables or instance
//! metadata when a profile is missing, and silently sign as somebody else;
//! credgate must never do that.
//!
//! A profile's clients are built at its first use and kept in a bounded
//! cache ([`cache`]); the files are parsed once for all of them, and parsed
//! again only when they change. aws-config's
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
use aws_config::profile::{Profile, ProfileFileCredentialsProvider};
use aws_credential_types::{Credentials, provider::SharedCredentialsProvider};
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_types::os_shim_internal::{Env, Fs};
use tokio::time::Instant;

use super::cache::{self, UserCache};
use crate::{
    aws::credentials::{ClientFactory, UserClients},
    config::CallerSettings,
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
    /// Replaced by every re-read: a verified identity belongs to a
    /// generation.
    generation: AtomicU64,
}

/// The clients of each profile, by name, built on first use from the last
/// parse of the files and kept in a bounded cache.
pub(crate) struct Profiles {
    factory: ClientFactory,
    /// The configured callers' profiles and the IAM user each holds the key
    /// of. One the files do not define is served anyway and fails at its
    /// call (re-reading the files, so that a Secret updated later is picked
    /// up); any other profile (a templated caller's) is
    /// `IAM_USER_NOT_PROVISIONED` until the files define it.
    configured: HashMap<String, String>,
    /// The other profiles in use, each held by the IAM user of the first
    /// caller that used it.
    claimed: Mutex<HashMap<String, String>>,
    /// Told when a profile is claimed: key custody checks the new user's
    /// key age then, not at its next sweep.
    new_user: tokio::sync::Notify,
    slots: UserCache<Slot>,
    /// The last parse of the files and their stamp: one parse serves every
    /// new profile until the files change.
    parsed: tokio::sync::Mutex<Option<Parsed>>,
}

/// One parse of the files, and their stamp then.
struct Parsed {
    stamp: FilesStamp,
    defined: Arc<Defined>,
}

/// What the files define, kept compact (a whole parse of 10,000 profiles
/// would cost megabytes): each profile's static key, or `None` for one that
/// the SDK's provider must resolve (a role, `credential_process`, SSO).
type Defined = HashMap<String, Option<Credentials>>;

impl Profiles {
    /// The source over the configured `callers`' profiles; nothing is read
    /// or built until a profile is first used.
    pub(crate) fn new(factory: &ClientFactory, callers: &[CallerSettings]) -> Self {
        let configured = callers
            .iter()
            .filter_map(|c| Some((c.aws_profile.clone()?, c.iam_user.clone())))
            .collect();
        Self {
            factory: factory.clone(),
            configured,
            claimed: Mutex::default(),
            new_user: tokio::sync::Notify::new(),
            slots: UserCache::new(cache::MAX_USERS, cache::IDLE_AFTER),
            parsed: tokio::sync::Mutex::default(),
        }
    }

    /// The clients that sign with `profile`'s key for `iam_user` (see
    /// [`Profiles::configured`] for a profile the files do not define).
    /// One profile holds one user's key: `IAM_USER_MISMATCH` when it is
    /// another user's (two templates, or a template and an exact entry,
    /// reaching it as different users).
    pub(crate) async fn get(
        &self,
        profile: &str,
        iam_user: &str,
    ) -> Result<Arc<UserClients>, Error> {
        let configured = self.configured.get(profile);
        if let Some(holder) = configured.filter(|u| *u != iam_user) {
            return Err(mismatch(profile, iam_user, holder));
        }
        if let Some(slot) = self.slots.get(profile) {
            if configured.is_none() {
                self.claim(profile, iam_user)?;
            }
            return Ok(slot.client.load_full());
        }
        let parsed = self.parsed().await;
        let defined = parsed.as_ref().ok().and_then(|d| d.get(profile));
        if configured.is_none() {
            if defined.is_none() {
                return Err(parsed.err().unwrap_or(Error::IamUserNotProvisioned));
            }
            self.claim(profile, iam_user)?;
        }
        let client = build(&self.factory, profile, defined.cloned().flatten());
        let slot = self.slots.get_or_insert_with(profile, || Slot::new(client));
        Ok(slot.client.load_full())
    }

    /// `profile` for `iam_user`, unless another user holds it.
    fn claim(&self, profile: &str, iam_user: &str) -> Result<(), Error> {
        let mut claimed = lock(&self.claimed);
        let mut new = false;
        let holder = claimed.entry(profile.to_owned()).or_insert_with(|| {
            new = true;
            iam_user.to_owned()
        });
        if holder != iam_user {
            return Err(mismatch(profile, iam_user, holder));
        }
        if new {
            self.new_user.notify_one();
        }
        Ok(())
    }

    /// The profiles no configured caller names that callers used (a
    /// templated caller's), each with its user.
    pub(crate) fn claimed(&self) -> Vec<(String, String)> {
        lock(&self.claimed)
            .iter()
            .map(|(profile, user)| (profile.clone(), user.clone()))
            .collect()
    }

    /// Resolves once a profile no configured caller names was first used.
    pub(crate) async fn new_user(&self) {
        self.new_user.notified().await;
    }

    /// `profile`'s clients for a look at its key (custody's key-age check):
    /// the cached ones, or clients made for this look only and not kept,
    /// so that checking thousands of users keeps neither their clients nor
    /// pushes out those of the users calling.
    pub(crate) async fn peek(&self, profile: &str) -> Result<Arc<UserClients>, Error> {
        if let Some(slot) = self.slots.peek(profile) {
            return Ok(slot.client.load_full());
        }
        let parsed = self.parsed().await?;
        let Some(keys) = parsed.get(profile) else {
            return Err(Error::IamUserNotProvisioned);
        };
        Ok(Arc::new(build(&self.factory, profile, keys.clone())))
    }

    /// The files as last parsed, parsed again when they changed on disk.
    /// One parse at a time, shared by every profile while they stay the
    /// same; `KEY_SOURCE_UNAVAILABLE` when they cannot be read.
    async fn parsed(&self) -> Result<Arc<Defined>, Error> {
        let mut parsed = self.parsed.lock().await;
        let stamp = files_stamp();
        if let Some(p) = parsed.as_ref().filter(|p| p.stamp == stamp) {
            return Ok(p.defined.clone());
        }
        let defined = Arc::new(load_defined().await.map_err(|e| {
            Error::KeySourceUnavailable(Cause::msg(format!(
                "cannot read the AWS shared files: {e}"
            )))
        })?);
        *parsed = Some(Parsed {
            stamp,
            defined: defined.clone(),
        });
        Ok(defined)
    }

    /// Rebuilds `profile`'s clients from a fresh read of the credentials
    /// files: when AWS says the key is expired or unknown (a rotated Secret)
    /// or the profile could not be loaded. Returns whether it re-read them:
    /// not when the files are unchanged since a re-read less than
    /// [`REREAD_UNCHANGED_AFTER`] ago.
    pub(crate) async fn refresh(&self, profile: &str) -> bool {
        let Some(slot) = self.slots.get(profile) else {
            return false;
        };
        let stamp = files_stamp();
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
        let keys = load_defined()
            .await
            .ok()
            .and_then(|mut defined| defined.remove(profile).flatten());
        slot.client
            .store(Arc::new(build(&self.factory, profile, keys)));
        slot.generation
            .store(cache::generation(), Ordering::Release);
        true
    }

    /// The generation of `profile`'s key: it may have changed since another
    /// generation was verified (0: not in use).
    pub(crate) fn generation(&self, profile: &str) -> u64 {
        self.slots
            .get(profile)
            .map_or(0, |s| s.generation.load(Ordering::Acquire))
    }
}

impl Slot {
    fn new(client: UserClients) -> Self {
        Self {
            client: ArcSwap::from_pointee(client),
            last_refresh: Mutex::new(None),
            generation: AtomicU64::new(cache::generation()),
        }
    }
}

fn mismatch(profile: &str, iam_user: &str, holder: &str) -> Error {
    tracing::error!(
        profile,
        iam_user,
        expected_iam_user = holder,
        "two callers act as different IAM users with one profile; refused"
    );
    Error::IamUserMismatch
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `profile`'s clients: over its static key when it has one, else over the
/// SDK's provider for the profile.
fn build(factory: &ClientFactory, profile: &str, static_keys: Option<Credentials>) -> UserClients {
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

/// Sections of the credentials file given to the SDK's parser at once.
/// Its parse of a whole file allocates about 1.2 KiB of small pieces per
/// profile (12 MiB for 10,000), which glibc keeps once freed; a few hundred
/// sections at a time reuse the same few hundred kilobytes, and what is
/// kept is the compact map.
const SECTIONS_PER_PARSE: usize = 256;

/// Reads the shared config and credentials files (`AWS_CONFIG_FILE`,
/// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/...`; a missing one is
/// empty) and parses them on a blocking thread.
async fn load_defined() -> Result<Defined, String> {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let [credentials, config] = shared_files().map(|path| match path {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(e) => Err(format!("{}: {e}", path.display())),
            },
            None => Ok(String::new()),
        });
        defined(&handle, &config?, &credentials?, SECTIONS_PER_PARSE)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Every profile of the two files, compact: the SDK parses the whole config
/// file with `per_parse` sections of the credentials file at a time. Both
/// sections of one name go to one parse (the SDK merges them), and a
/// profile the config file defines is taken from the parse that also had
/// its credentials section, if any (the SDK merges the files too).
fn defined(
    handle: &tokio::runtime::Handle,
    config: &str,
    credentials: &str,
    per_parse: usize,
) -> Result<Defined, String> {
    let mut chunks: Vec<(String, std::collections::HashSet<&str>)> = Vec::new();
    let mut chunk_of: HashMap<&str, usize> = HashMap::new();
    for (name, text) in sections(credentials) {
        let next = chunks.len().saturating_sub(1);
        let index = *chunk_of.entry(name).or_insert_with(|| match chunks.last() {
            Some((_, names)) if names.len() < per_parse.max(1) => next,
            _ => chunks.len(),
        });
        if index == chunks.len() {
            chunks.push((String::new(), std::collections::HashSet::new()));
        }
        let (chunk_text, names) = &mut chunks[index];
        chunk_text.push_str(text);
        names.insert(name);
    }
    if chunks.is_empty() {
        chunks.push((String::new(), std::collections::HashSet::new()));
    }
    let mut out = Defined::new();
    for (text, names) in chunks {
        let files = EnvConfigFiles::builder()
            .include_default_config_file(false)
            .include_default_credentials_file(false)
            .with_contents(EnvConfigFileKind::Config, config)
            .with_contents(EnvConfigFileKind::Credentials, text)
            .build();
        let set = handle
            .block_on(aws_config::profile::load(
                &Fs::real(),
                &Env::real(),
                &files,
                None,
            ))
            .map_err(|e| e.to_string())?;
        for name in set.profiles() {
            if names.contains(name) || !out.contains_key(name) {
                let keys = set.get_profile(name).and_then(static_credentials);
                out.insert(name.to_owned(), keys);
            }
        }
    }
    Ok(out)
}

/// The credentials file's sections: the name in a header line (a line
/// that starts with `[`, as the SDK's parser reads it) and the text up to
/// the next one. Text before the first header goes with the first section
/// (the SDK refuses a property there, as it should).
fn sections(text: &str) -> Vec<(&str, &str)> {
    let mut starts: Vec<usize> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('[') {
            starts.push(offset);
        }
        offset += line.len();
    }
    if starts.is_empty() {
        return if text.trim().is_empty() {
            Vec::new()
        } else {
            vec![("", text)]
        };
    }
    starts[0] = 0;
    let mut out = Vec::with_capacity(starts.len());
    for (i, &start) in starts.iter().enumerate() {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        let section = &text[start..end];
        let header = section
            .lines()
            .find(|l| l.starts_with('['))
            .unwrap_or_default();
        let name = header
            .trim()
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or_default()
            .trim();
        out.push((name, section));
    }
    out
}

/// The AWS shared credentials and config files' paths, as the SDK finds
/// them (`~/` expanded).
fn shared_files() -> [Option<std::path::PathBuf>; 2] {
    let env = Env::real();
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let path = |var: &str, default: &str| match env.get(var).ok() {
        Some(path) => match (path.strip_prefix("~/"), &home) {
            (Some(rest), Some(home)) => Some(home.join(rest)),
            _ => Some(std::path::PathBuf::from(path)),
        },
        None => home.as_ref().map(|h| h.join(".aws").join(default)),
    };
    [
        path("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
        path("AWS_CONFIG_FILE", "config"),
    ]
}

/// The AWS shared files' sizes and modification times (`None`: missing).
/// Two `stat`s of local files (a mounted Secret), on the calling thread:
/// a hop to a blocking thread would cost more than they do, for every
/// profile of a sweep over thousands.
fn files_stamp() -> FilesStamp {
    shared_files()
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(file?).ok()?;
            Some((meta.len(), meta.modified().ok()?))
        })
        .collect()
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
    let defined = match load_defined().await {
        Ok(defined) => defined,
        Err(e) => return vec![format!("AWS shared config/credentials files: {e}")],
    };
    let wanted: BTreeSet<&str> = profiles.into_iter().collect();
    wanted
        .into_iter()
        .filter(|p| !defined.contains_key(*p))
        .map(|p| {
            format!(
                "aws_profile {p:?} is not in the AWS shared config/credentials files \
                 (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    }

    /// The SDK's own parse of the whole files, compact.
    fn whole(handle: &tokio::runtime::Handle, config: &str, credentials: &str) -> Defined {
        defined(handle, config, credentials, usize::MAX).expect("parses")
    }

    const CONFIG: &str = "\
[default]
region = us-east-1
[profile role]
role_arn = arn:aws:iam::123456789012:role/r
source_profile = a
[profile both]
region = eu-west-1
[sso-session corp]
sso_region = us-east-1
";

    const CREDENTIALS: &str = "\
# a comment
[a]
aws_access_key_id = AKIAAAAAAAAAAAAAAAA1
aws_secret_access_key = secret/with+chars=  ; a comment
[b] # a comment on the header
aws_access_key_id=AKIABBBBBBBBBBBBBBB2
aws_secret_access_key=b
s3 =
  max_concurrent_requests = 20
[ both ]
aws_access_key_id = AKIABOTHBOTHBOTHBOT3
aws_secret_access_key = both
[a]
aws_session_token = token-of-a
[profile c]
aws_access_key_id = AKIACCCCCCCCCCCCCCC4
aws_secret_access_key = c
";

    #[test]
    fn a_few_sections_at_a_time_read_what_one_whole_parse_reads() {
        let rt = runtime();
        let expected = whole(rt.handle(), CONFIG, CREDENTIALS);
        // The SDK merged [a]'s two sections, the files' [both]s, and saw the
        // role profile as dynamic.
        let a = expected["a"].as_ref().expect("a static key");
        assert_eq!(a.session_token(), Some("token-of-a"));
        assert_eq!(a.secret_access_key(), "secret/with+chars=");
        assert!(expected["both"].is_some());
        assert_eq!(expected["role"], None);
        assert!(expected.contains_key("default"));
        for per_parse in 1..=4 {
            assert_eq!(
                defined(rt.handle(), CONFIG, CREDENTIALS, per_parse).expect("parses"),
                expected,
                "{per_parse} sections at a time"
            );
        }
        assert_eq!(
            defined(rt.handle(), "", "", 1).expect("parses"),
            whole(rt.handle(), "", "")
        );
        assert!(defined(rt.handle(), "", "key = before any section\n", 1).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any mix of static, dynamic and repeated sections, in both files,
        /// reads the same a few sections at a time as in one parse.
        #[test]
        fn chunked_parses_agree_with_one_parse(
            sections in proptest::collection::vec((0u8..12, 0u8..4), 0..30),
            in_config in proptest::collection::vec((0u8..12, any::<bool>()), 0..6),
            per_parse in 1usize..5,
        ) {
            let mut credentials = String::new();
            for (i, (name, kind)) in sections.iter().enumerate() {
                credentials.push_str(&format!("[p{name}]\n"));
                match kind {
                    0 => credentials.push_str(&format!(
                        "aws_access_key_id = AKIA{i:016}\naws_secret_access_key = s{i}\n"
                    )),
                    1 => credentials.push_str(&format!("aws_session_token = t{i}\n")),
                    2 => credentials.push_str("credential_process = /bin/true\n"),
                    _ => credentials.push_str("region = us-west-2\n"),
                }
            }
            let mut config = String::new();
            for (name, role) in &in_config {
                config.push_str(&format!("[profile p{name}]\n"));
                if *role {
                    config.push_str("role_arn = arn:aws:iam::123456789012:role/r\n");
                } else {
                    config.push_str("region = eu-central-1\n");
                }
            }
            let rt = runtime();
            let expected = whole(rt.handle(), &config, &credentials);
            prop_assert_eq!(
                defined(rt.handle(), &config, &credentials, per_parse).expect("parses"),
                expected
            );
        }
    }
}
