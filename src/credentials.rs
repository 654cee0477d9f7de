//! Caller → IAM client: one aws-sdk-iam client per configured profile, built
//! once, all sharing one HTTP connection pool.
//!
//! Each client reads its credentials only from its own profile in the shared
//! AWS config/credentials files. The SDK's default chain would fall back to
//! environment variables or instance metadata when a profile is missing, and
//! silently sign as somebody else; credgate must never do that.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use aws_config::{
    BehaviorVersion, Region, profile::ProfileFileCredentialsProvider, retry::RetryConfig,
    timeout::TimeoutConfig,
};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_iam::{Client, config::SharedHttpClient};
use aws_smithy_http_client::{
    Builder,
    tls::{Provider, rustls_provider::CryptoMode},
};

use aws_types::os_shim_internal::{Env, Fs};

use crate::config::{AwsSettings, CallerSettings};

/// Time to open a TCP/TLS connection to IAM. Failing here means the request
/// was never sent, so it is safe to retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
    /// Builds one client per distinct profile.
    pub async fn new<'a>(
        settings: &AwsSettings,
        profiles: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let http = Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
            .build_https();
        let mut clients = Self {
            settings: settings.clone(),
            http,
            by_profile: HashMap::new(),
        };
        for profile in profiles {
            if !clients.by_profile.contains_key(profile) {
                let client = clients.build(profile).await;
                clients
                    .by_profile
                    .insert(profile.to_owned(), ArcSwap::from_pointee(client));
            }
        }
        clients
    }

    async fn build(&self, profile: &str) -> ProfileClient {
        let credentials = SharedCredentialsProvider::new(
            ProfileFileCredentialsProvider::builder()
                .profile_name(profile)
                .build(),
        );
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
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
            loader = loader.endpoint_url(url);
        }
        ProfileClient {
            client: Client::new(&loader.load().await),
            credentials,
        }
    }

    /// The client that signs as `profile`'s IAM user.
    pub fn get(&self, profile: &str) -> Option<Arc<ProfileClient>> {
        self.by_profile.get(profile).map(ArcSwap::load_full)
    }

    /// Rebuilds `profile`'s client, re-reading the credentials files: used
    /// once when IAM says the key is expired or unknown (a rotated Secret).
    pub async fn refresh(&self, profile: &str) {
        if let Some(slot) = self.by_profile.get(profile) {
            slot.store(Arc::new(self.build(profile).await));
        }
    }

    /// The IAM region requests are signed for.
    pub fn region(&self) -> &str {
        &self.settings.region
    }
}

/// The callers' `aws_profile`s that the shared config/credentials files
/// (`AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE`) do not define, one
/// problem line each. Read offline: nothing is sent to AWS.
pub async fn missing_profiles(callers: &[CallerSettings]) -> Vec<String> {
    let files = aws_runtime::env_config::file::EnvConfigFiles::default();
    let profiles = match aws_config::profile::load(&Fs::real(), &Env::real(), &files, None).await {
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
