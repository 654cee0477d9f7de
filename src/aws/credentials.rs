//! An IAM user's AWS clients: one aws-sdk-iam and one aws-sdk-sts client
//! signing with that user's key, all users' clients sharing one HTTP
//! connection pool ([`ClientFactory`]); and the marker that tells whether a
//! request may have left for AWS ([`TRANSMITTED`]). Where the keys come from
//! is [`crate::aws::keys`]' business.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_credential_types::{
    Credentials,
    provider::{ProvideCredentials, SharedCredentialsProvider},
};
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

use crate::config::AwsSettings;

/// Time to open a TCP/TLS connection to IAM. Failing here means the request
/// was never sent, so it is safe to retry.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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

/// One IAM user's AWS clients and the credentials they sign with.
pub(crate) struct UserClients {
    /// IAM.
    pub(crate) iam: aws_sdk_iam::Client,
    /// STS, for `GetCallerIdentity`.
    pub(crate) sts: aws_sdk_sts::Client,
    /// Kept beside the clients: the SDK config does not expose it.
    credentials: SharedCredentialsProvider,
}

impl UserClients {
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

    /// The access key id these clients sign with, when the credentials load.
    pub(crate) async fn access_key_id(&self) -> Option<String> {
        let creds = self.credentials.provide_credentials().await.ok()?;
        Some(creds.access_key_id().to_owned())
    }
}

/// Builds per-user clients, all over one HTTP connection pool.
#[derive(Clone)]
pub(crate) struct ClientFactory {
    settings: AwsSettings,
    http: SharedHttpClient,
}

impl ClientFactory {
    /// A factory for `settings`' region and endpoints, with a new pool.
    pub(crate) fn new(settings: &AwsSettings) -> Self {
        Self {
            settings: settings.clone(),
            http: shared_http_client(),
        }
    }

    /// The region requests are signed for.
    pub(crate) fn region(&self) -> &str {
        &self.settings.region
    }

    /// The `[aws]` settings.
    pub(crate) fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    /// The pool every client shares.
    pub(crate) fn http(&self) -> SharedHttpClient {
        self.http.clone()
    }

    /// IAM and STS clients signing with `credentials`.
    pub(crate) fn build(&self, credentials: SharedCredentialsProvider) -> UserClients {
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
        UserClients {
            iam: aws_sdk_iam::Client::from_conf(iam.build()),
            sts: aws_sdk_sts::Client::from_conf(sts.build()),
            credentials,
        }
    }

    /// Clients signing with one static key pair.
    pub(crate) fn with_key(&self, credentials: Credentials) -> UserClients {
        self.build(SharedCredentialsProvider::new(credentials))
    }
}

/// The one HTTP client every user's clients share, so they share one
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
