//! Caller → IAM client: one aws-sdk-iam client per configured profile, built
//! once, all sharing one HTTP connection pool.
//!
//! Each client reads its credentials only from its own profile in the shared
//! AWS config/credentials files. The SDK's default chain would fall back to
//! environment variables or instance metadata when a profile is missing, and
//! silently sign as somebody else; credgate must never do that.
//!
//! The shared files are parsed once for all callers. aws-config's
//! `ProfileFileCredentialsProvider` parses and keeps its own copy of the whole
//! files per profile, so memory grew with callers × profiles (302 MiB for 512
//! callers, docs/benchmark.md). Profiles holding static keys — the normal case
//! for IAM users — get those keys from the one parse; only profiles that need
//! more (a role, `credential_process`, SSO) use the SDK's provider.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
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
use aws_sdk_iam::{Client, config::SharedHttpClient};
use aws_smithy_http_client::{
    Builder, ConnectorBuilder,
    proxy::ProxyConfig,
    tls::{Provider, rustls_provider::CryptoMode},
};
use aws_types::os_shim_internal::{Env, Fs};

use crate::config::{AwsSettings, CallerSettings};

/// Time to open a TCP/TLS connection to IAM. Failing here means the request
/// was never sent, so it is safe to retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

/// One profile's IAM client and the credentials it signs with.
pub struct ProfileClient {
    /// The SDK client.
    pub client: Client,
    /// Kept beside the client: the SDK config does not expose it.
    credentials: SharedCredentialsProvider,
}

impl ProfileClient {
    /// Whether this client signs with a long-term IAM user access key (no
    /// session token, `AKIA` prefix). IAM answers `InvalidUserType` both for
    /// a wrong old password and for non-user principals; only for a user key
    /// does it mean the old password was wrong.
    pub async fn signs_as_iam_user(&self) -> bool {
        match self.credentials.provide_credentials().await {
            Ok(creds) => {
                creds.session_token().is_none() && creds.access_key_id().starts_with("AKIA")
            }
            Err(_) => false,
        }
    }
}

/// The IAM clients, by profile name.
pub struct IamClients {
    settings: AwsSettings,
    http: SharedHttpClient,
    by_profile: HashMap<String, ArcSwap<ProfileClient>>,
}

impl IamClients {
    /// Builds one client per distinct profile from one parse of the files.
    pub async fn new<'a>(
        settings: &AwsSettings,
        profiles: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut clients = Self {
            settings: settings.clone(),
            http: shared_http_client(),
            by_profile: HashMap::new(),
        };
        let parsed = load_profiles().await.ok();
        for profile in profiles {
            if !clients.by_profile.contains_key(profile) {
                let client = clients.build(profile, parsed.as_ref());
                clients
                    .by_profile
                    .insert(profile.to_owned(), ArcSwap::from_pointee(client));
            }
        }
        clients
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
        let mut config = aws_sdk_iam::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.settings.region.clone()))
            .credentials_provider(credentials.clone())
            .http_client(self.http.clone())
            // ChangePassword is not idempotent: the SDK must never retry on
            // its own. `iam` retries only what provably was not applied.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build(),
            );
        if let Some(url) = &self.settings.endpoint_url {
            config = config.endpoint_url(url);
        }
        ProfileClient {
            client: Client::from_conf(config.build()),
            credentials,
        }
    }

    /// The client that signs as `profile`'s IAM user.
    pub fn get(&self, profile: &str) -> Option<Arc<ProfileClient>> {
        self.by_profile.get(profile).map(ArcSwap::load_full)
    }

    /// Rebuilds `profile`'s client, re-reading the credentials files: used
    /// once when IAM says the key is expired or unknown (a rotated Secret),
    /// or when the profile could not be loaded.
    pub async fn refresh(&self, profile: &str) {
        if let Some(slot) = self.by_profile.get(profile) {
            let parsed = load_profiles().await.ok();
            slot.store(Arc::new(self.build(profile, parsed.as_ref())));
        }
    }

    /// The IAM region requests are signed for.
    pub fn region(&self) -> &str {
        &self.settings.region
    }
}

/// The one HTTP client every profile's IAM client shares, so they share one
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
/// `AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/...`).
async fn load_profiles() -> Result<ProfileSet, String> {
    aws_config::profile::load(&Fs::real(), &Env::real(), &EnvConfigFiles::default(), None)
        .await
        .map_err(|e| e.to_string())
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
pub async fn missing_profiles(callers: &[CallerSettings]) -> Vec<String> {
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
