//! Caller → AWS clients: one aws-sdk-iam and one aws-sdk-sts client per
//! configured profile, built once, all sharing one HTTP connection pool.
//!
//! Each client reads its credentials only from its own profile in the shared
//! AWS config/credentials files. The SDK's default chain would fall back to
//! environment variables or instance metadata when a profile is missing, and
//! silently sign as somebody else; credgate must never do that.
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
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use aws_config::{
    BehaviorVersion, Region,
    profile::{Profile, ProfileFileCredentialsProvider, ProfileSet},
    retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_credential_types::{
    Credentials,
    provider::{ProvideCredentials, SharedCredentialsProvider},
};
use aws_runtime::env_config::file::EnvConfigFiles;
use aws_sdk_iam::config::{ConfigBag, RuntimeComponents, SharedHttpClient};
use aws_smithy_http_client::{
    Builder, ConnectorBuilder,
    proxy::ProxyConfig,
    tls::{Provider, rustls_provider::CryptoMode},
};
use aws_smithy_runtime_api::{
    box_error::BoxError,
    client::interceptors::{Intercept, context::BeforeTransmitInterceptorContextRef},
};
use aws_types::os_shim_internal::{Env, Fs};
use tokio::time::Instant;

use crate::config::{AwsSettings, CallerSettings};

/// Time to open a TCP/TLS connection to IAM. Failing here means the request
/// was never sent, so it is safe to retry.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

tokio::task_local! {
    /// Set by [`TransmitMarker`] when the SDK hands a request to the HTTP
    /// client: from then on it may reach AWS.
    pub(crate) static TRANSMITTED: Arc<AtomicBool>;
}

/// Marks, in [`TRANSMITTED`], the moment a request leaves the SDK for the
/// network. Before it, dropping the call cannot have sent anything; that is
/// what makes `DEADLINE_BEFORE_SEND` exact.
#[derive(Debug)]
struct TransmitMarker;

impl Intercept for TransmitMarker {
    fn name(&self) -> &'static str {
        "credgate-transmit-marker"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let _ = TRANSMITTED.try_with(|flag| flag.store(true, Ordering::Release));
        Ok(())
    }
}

/// One profile's AWS clients and the credentials they sign with.
pub(crate) struct ProfileClient {
    /// IAM.
    pub(crate) iam: aws_sdk_iam::Client,
    /// STS, for `GetCallerIdentity`.
    pub(crate) sts: aws_sdk_sts::Client,
    /// Kept beside the clients: the SDK config does not expose it.
    credentials: SharedCredentialsProvider,
}

impl ProfileClient {
    /// Whether this client signs with what looks like a long-term IAM user
    /// key (no session token, `AKIA` prefix). Used only while the profile's
    /// principal could not be verified: a root key looks the same.
    pub(crate) async fn looks_like_user_key(&self) -> bool {
        match self.credentials.provide_credentials().await {
            Ok(creds) => {
                creds.session_token().is_none() && creds.access_key_id().starts_with("AKIA")
            }
            Err(_) => false,
        }
    }
}

/// Size and modification time of each AWS shared file.
type FilesStamp = Vec<Option<(u64, std::time::SystemTime)>>;

struct Slot {
    client: ArcSwap<ProfileClient>,
    /// When and on which files the last re-read happened.
    last_refresh: Mutex<Option<(Instant, FilesStamp)>>,
    /// Bumped by every re-read: a verified identity belongs to a generation.
    generation: AtomicU64,
}

impl Slot {
    fn new(client: ProfileClient) -> Self {
        Self {
            client: ArcSwap::from_pointee(client),
            last_refresh: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }
}

/// The AWS clients, by profile name.
pub(crate) struct AwsClients {
    settings: AwsSettings,
    http: SharedHttpClient,
    /// The configured profiles' clients, built at start, and those of
    /// templated callers, added by [`AwsClients::provision`] at first use.
    by_profile: RwLock<HashMap<String, Arc<Slot>>>,
    /// The last parse of the shared files and their stamp, for
    /// [`AwsClients::provision`]: one parse serves every templated
    /// profile until the files change.
    parsed: tokio::sync::Mutex<Option<(FilesStamp, Arc<ProfileSet>)>>,
}

impl AwsClients {
    /// Builds the clients of every distinct profile from one parse of the files.
    pub(crate) async fn new<'a>(
        settings: &AwsSettings,
        profiles: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let clients = Self {
            settings: settings.clone(),
            http: shared_http_client(),
            by_profile: RwLock::default(),
            parsed: tokio::sync::Mutex::default(),
        };
        let parsed = load_profiles().await.ok();
        let mut by_profile = HashMap::new();
        for profile in profiles {
            if !by_profile.contains_key(profile) {
                let client = clients.build(profile, parsed.as_ref());
                by_profile.insert(profile.to_owned(), Arc::new(Slot::new(client)));
            }
        }
        *clients.write() = by_profile;
        clients
    }

    /// Whether `profile` has clients, building them when the shared files
    /// define it: a templated caller's profile is known only once its
    /// identity is resolved. `false` when the files do not define it (the
    /// caller's key is not provisioned). Issue 19's second part replaces
    /// this with lazy, bounded clients for every profile.
    pub(crate) async fn provision(&self, profile: &str) -> bool {
        if self.slot(profile).is_some() {
            return true;
        }
        let stamp = files_stamp().await;
        // One parse at a time, shared by every profile while the files
        // stay the same.
        let mut parsed = self.parsed.lock().await;
        if self.slot(profile).is_some() {
            return true;
        }
        let set = match &*parsed {
            Some((at, set)) if *at == stamp => set.clone(),
            _ => match load_profiles().await {
                Ok(set) => {
                    let set = Arc::new(set);
                    *parsed = Some((stamp, set.clone()));
                    set
                }
                Err(e) => {
                    tracing::warn!(profile, error = %e, "cannot read the AWS shared files");
                    return false;
                }
            },
        };
        if set.get_profile(profile).is_none() {
            return false;
        }
        let client = self.build(profile, Some(&set));
        self.write()
            .entry(profile.to_owned())
            .or_insert_with(|| Arc::new(Slot::new(client)));
        true
    }

    fn slot(&self, profile: &str) -> Option<Arc<Slot>> {
        self.by_profile
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(profile)
            .cloned()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Slot>>> {
        self.by_profile
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn build(&self, profile: &str, parsed: Option<&ProfileSet>) -> ProfileClient {
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
        let region = Region::new(self.settings.region.clone());
        // ChangePassword is not idempotent: the SDK must never retry on its
        // own. `iam` retries only what provably was not applied.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build();
        let mut iam = aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .credentials_provider(credentials.clone())
            .http_client(self.http.clone())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts.clone())
            .interceptor(TransmitMarker);
        if let Some(url) = &self.settings.endpoint_url {
            iam = iam.endpoint_url(url);
        }
        let mut sts = aws_sdk_sts::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(region)
            .credentials_provider(credentials.clone())
            .http_client(self.http.clone())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .interceptor(TransmitMarker);
        if let Some(url) = self
            .settings
            .sts_endpoint_url
            .as_ref()
            .or(self.settings.endpoint_url.as_ref())
        {
            sts = sts.endpoint_url(url);
        }
        ProfileClient {
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            credentials,
        }
    }

    /// The clients that sign as `profile`'s IAM user.
    pub(crate) fn get(&self, profile: &str) -> Option<Arc<ProfileClient>> {
        self.slot(profile).map(|s| s.client.load_full())
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
            let mut last = slot
                .last_refresh
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
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
            .store(Arc::new(self.build(profile, parsed.as_ref())));
        slot.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// How many times `profile` was re-read: its key may have changed since
    /// a lower generation was verified.
    pub(crate) fn generation(&self, profile: &str) -> u64 {
        self.slot(profile)
            .map_or(0, |s| s.generation.load(Ordering::Acquire))
    }

    /// The region requests are signed for.
    pub(crate) fn region(&self) -> &str {
        &self.settings.region
    }
}

/// The one HTTP client every profile's clients share, so they share one
/// connection pool. Built as aws-smithy-runtime builds the SDK's default
/// client (rustls with aws-lc, `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` from the
/// environment): a plain `build_https()` would silently ignore a proxy.
fn shared_http_client() -> SharedHttpClient {
    Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector =
            ConnectorBuilder::default().tls_provider(Provider::Rustls(CryptoMode::AwsLc));
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
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

/// The callers' `aws_profile`s that the shared config/credentials files do
/// not define, one problem line each. Read offline: nothing is sent to AWS.
pub(crate) async fn missing_profiles(callers: &[CallerSettings]) -> Vec<String> {
    let profiles = match load_profiles().await {
        Ok(set) => set,
        Err(e) => return vec![format!("AWS shared config/credentials files: {e}")],
    };
    let wanted: BTreeSet<&str> = callers.iter().map(|c| c.aws_profile.as_str()).collect();
    wanted
        .into_iter()
        .filter(|p| profiles.get_profile(p).is_none())
        .map(|p| {
            format!(
                "aws_profile {p:?} is not in the AWS shared config/credentials files \
                 (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
            )
        })
        .collect()
}
