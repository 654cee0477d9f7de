//! Key source `secretsmanager`: one AWS Secrets Manager secret per IAM user
//! (`keys.secret_name`), whose `AWSCURRENT` version's SecretString is
//! `{"access_key_id": ..., "secret_access_key": ...}`, read with credgate's
//! own AWS identity (the SDK's default chain: environment, shared profile,
//! web identity/IRSA, EKS Pod Identity, instance metadata).
//!
//! A user's key is fetched on first use, by one call while the others wait
//! for its answer, and kept at most `keys.refresh`; a user without a secret
//! is remembered as such for as long. When IAM rejects the key, the secret
//! is read again at once (at most once a second per user), so a rotated key
//! reaches every replica on its first rejected call. While Secrets Manager
//! cannot be read, a user's last key keeps serving (retried every few
//! seconds); a user with no key at hand gets `KEY_SOURCE_UNAVAILABLE`. The
//! users' keys are kept in a bounded cache ([`cache`](super::cache)): one
//! idle long enough to be dropped is read again at its next call.
//!
//! This is also the one seam over aws-sdk-secretsmanager: the version and
//! stage operations of a rotation, and the listing of the enrolled users.

use std::{
    fmt,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_credential_types::Credentials;
use aws_sdk_secretsmanager::{
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    operation::RequestId,
    types::{Filter, FilterNameStringType},
};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::Instrument;
use zeroize::Zeroizing;

use super::cache::{self, UserCache};
use crate::{
    aws::credentials::{CONNECT_TIMEOUT, ClientFactory, UserClients},
    config::{KeySettings, SecretName},
    error::{Cause, Error},
    telemetry,
};

/// A user's last key keeps serving this long after Secrets Manager failed
/// to answer, before it is asked again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Forced re-reads (IAM rejected the key) of one user, at most this often.
const FORCED_REREAD_EVERY: Duration = Duration::from_secs(1);
/// Budget of one Secrets Manager call attempt (the SDK retries reads).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most pages of one listing read: a bound, should a service keep answering
/// a next token (100 secrets a page: 100,000 enrolled users).
const MAX_PAGES: usize = 1000;

/// The version stage callers read.
pub(crate) const CURRENT: &str = "AWSCURRENT";
/// The version stage of a key stored but not yet proven and promoted.
pub(crate) const PENDING: &str = "AWSPENDING";
/// The version stage Secrets Manager moves to the version `AWSCURRENT` left.
pub(crate) const PREVIOUS: &str = "AWSPREVIOUS";

/// A key as a secret version holds it. Debug shows the key id's last four
/// characters only, never the secret.
pub(crate) struct StoredKey {
    /// The access key id.
    pub(crate) access_key_id: String,
    secret_access_key: Zeroizing<String>,
    /// The secret version holding it.
    pub(crate) version_id: String,
}

impl StoredKey {
    /// The key, for signing.
    pub(crate) fn credentials(&self) -> Credentials {
        Credentials::new(
            &self.access_key_id,
            self.secret_access_key.as_str(),
            None,
            None,
            "credgate-secretsmanager",
        )
    }
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("access_key_id", &super::key_id::suffix(&self.access_key_id))
            .field("version_id", &self.version_id)
            .finish_non_exhaustive()
    }
}

/// The SecretString's JSON.
#[derive(Deserialize)]
struct SecretKey {
    access_key_id: String,
    /// Moved into a [`Zeroizing`] as soon as it is read.
    secret_access_key: String,
}

/// One version of a secret, and its stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    /// The version id.
    pub(crate) id: String,
    /// Its staging labels.
    pub(crate) stages: Vec<String>,
}

impl Version {
    /// Whether `stage` is on this version.
    pub(crate) fn has(&self, stage: &str) -> bool {
        self.stages.iter().any(|s| s == stage)
    }
}

/// Why a secret could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SecretError {
    /// No such secret (or no such version stage).
    #[error("secret {0} does not exist (or has no such version)")]
    NotFound(String),
    /// The secret's value is not a key.
    #[error(
        "secret {name} does not hold a key: {why} (its SecretString must be \
         {{\"access_key_id\": ..., \"secret_access_key\": ...}})"
    )]
    Malformed {
        /// The secret.
        name: String,
        /// What is wrong, never the value.
        why: &'static str,
    },
    /// Secrets Manager did not answer, or refused.
    #[error("Secrets Manager {operation} on {name}: {code}")]
    Failed {
        /// The operation.
        operation: &'static str,
        /// The secret (or the name prefix listed).
        name: String,
        /// Secrets Manager's error code, or what happened instead.
        code: String,
        /// The SDK's account of it, for the log.
        #[source]
        cause: Cause,
    },
}

/// What a user's slot knows.
enum Held {
    Nothing,
    Key {
        clients: Arc<UserClients>,
        key_id: String,
        fresh_until: Instant,
    },
    Missing {
        until: Instant,
    },
}

struct Slot {
    held: Mutex<Held>,
    /// One fetch at a time per user.
    flight: tokio::sync::Mutex<()>,
    /// Bumped whenever the key changes: a verified identity belongs to a
    /// generation.
    generation: AtomicU64,
    last_forced: Mutex<Option<Instant>>,
}

/// See the module docs.
pub(crate) struct Secrets {
    client: aws_sdk_secretsmanager::Client,
    factory: ClientFactory,
    names: SecretName,
    refresh: Duration,
    by_user: UserCache<Slot>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Secrets {
    /// The source, with a Secrets Manager client of credgate's own identity.
    /// Nothing is sent until the first key is needed.
    pub(crate) async fn new(factory: &ClientFactory, keys: &KeySettings) -> Self {
        let settings = factory.settings();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .http_client(factory.http())
            // Reads, and writes made idempotent by their ClientRequestToken:
            // the SDK's standard retries are safe here.
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        let mut config = aws_sdk_secretsmanager::config::Builder::from(&shared);
        if let Some(url) = &settings.endpoint_url {
            config = config.endpoint_url(url);
        }
        Self {
            client: aws_sdk_secretsmanager::Client::from_conf(config.build()),
            factory: factory.clone(),
            names: keys.secret_name.clone(),
            refresh: keys.refresh,
            by_user: UserCache::new(cache::MAX_USERS, cache::IDLE_AFTER),
        }
    }

    fn slot(&self, iam_user: &str) -> Arc<Slot> {
        self.by_user.get_or_insert_with(iam_user, || Slot {
            held: Mutex::new(Held::Nothing),
            flight: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(cache::generation()),
            last_forced: Mutex::new(None),
        })
    }

    /// The secret of `iam_user`, if it can have one.
    pub(crate) fn name_of(&self, iam_user: &str) -> Option<String> {
        self.names.of(iam_user)
    }

    /// The clients signing with `iam_user`'s current key.
    pub(crate) async fn get(&self, iam_user: &str) -> Result<Arc<UserClients>, Error> {
        let slot = self.slot(iam_user);
        if let Some(answer) = slot.cached() {
            return answer;
        }
        let _flight = slot.flight.lock().await;
        // Another call may have fetched it while this one waited.
        if let Some(answer) = slot.cached() {
            return answer;
        }
        self.fetch(iam_user, &slot)
            .await
            .map(|(clients, _)| clients)
    }

    /// `iam_user`'s clients for a look at its key (custody's checks): the
    /// cached ones while fresh, or clients over the secret's current key
    /// made for this look only and not kept (see `Profiles::peek`).
    pub(crate) async fn peek(&self, iam_user: &str) -> Result<Arc<UserClients>, Error> {
        if let Some(Some(Ok(clients))) = self.by_user.peek(iam_user).map(|s| s.cached()) {
            return Ok(clients);
        }
        let name = self.name_of(iam_user).ok_or(Error::IamUserNotProvisioned)?;
        match self.read(&name, CURRENT).await {
            Ok(key) => Ok(Arc::new(self.factory.with_key(key.credentials()))),
            Err(SecretError::NotFound(_) | SecretError::Malformed { .. }) => {
                Err(Error::IamUserNotProvisioned)
            }
            Err(e) => Err(Error::KeySourceUnavailable(Cause::new(e))),
        }
    }

    /// Reads `iam_user`'s secret again now, because IAM rejected its key.
    /// Returns whether the key changed (else a retry would fail the same).
    pub(crate) async fn refresh(&self, iam_user: &str) -> bool {
        let slot = self.slot(iam_user);
        {
            let mut last = lock(&slot.last_forced);
            if last.is_some_and(|t| t.elapsed() < FORCED_REREAD_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        let _flight = slot.flight.lock().await;
        matches!(self.fetch(iam_user, &slot).await, Ok((_, true)))
    }

    /// Makes `iam_user`'s cached key stale: the next call reads the secret
    /// (a rotation just promoted a new key); the old key still serves if
    /// that read fails.
    pub(crate) fn invalidate(&self, iam_user: &str) {
        let Some(slot) = self.by_user.get(iam_user) else {
            return;
        };
        let mut held = lock(&slot.held);
        match &mut *held {
            Held::Key { fresh_until, .. } => *fresh_until = Instant::now(),
            other => *other = Held::Nothing,
        }
    }

    /// The generation of `iam_user`'s key: it may have changed since
    /// another generation was verified (0: not in use).
    pub(crate) fn generation(&self, iam_user: &str) -> u64 {
        self.by_user
            .get(iam_user)
            .map_or(0, |s| s.generation.load(Ordering::Acquire))
    }

    /// Reads the current key and installs it; returns its clients and
    /// whether the key differs from the one held before.
    async fn fetch(&self, iam_user: &str, slot: &Slot) -> Result<(Arc<UserClients>, bool), Error> {
        let Some(name) = self.name_of(iam_user) else {
            tracing::warn!(
                iam_user,
                "this IAM user name cannot name a Secrets Manager secret (it holds a ','): \
                 IAM_USER_NOT_PROVISIONED"
            );
            slot.missing(self.refresh);
            return Err(Error::IamUserNotProvisioned);
        };
        match self.read(&name, CURRENT).await {
            Ok(key) => {
                let clients = Arc::new(self.factory.with_key(key.credentials()));
                let changed = slot.install(clients.clone(), key.access_key_id, self.refresh);
                Ok((clients, changed))
            }
            Err(SecretError::NotFound(_)) => {
                tracing::info!(
                    iam_user,
                    secret = name.as_str(),
                    "no secret for this IAM user: its callers get IAM_USER_NOT_PROVISIONED"
                );
                slot.missing(self.refresh);
                Err(Error::IamUserNotProvisioned)
            }
            Err(e @ SecretError::Malformed { .. }) => {
                tracing::error!(iam_user, error = %e, "IAM_USER_NOT_PROVISIONED");
                slot.missing(self.refresh);
                Err(Error::IamUserNotProvisioned)
            }
            Err(e) => match slot.stale() {
                Some(clients) => {
                    tracing::warn!(
                        iam_user,
                        error = %e,
                        cause = %crate::error::chain(&e),
                        "cannot read the key from Secrets Manager; the last one read keeps serving"
                    );
                    Ok((clients, false))
                }
                None => Err(Error::KeySourceUnavailable(Cause::new(e))),
            },
        }
    }

    /// The key `stage` of secret `name` holds.
    pub(crate) async fn read(&self, name: &str, stage: &str) -> Result<StoredKey, SecretError> {
        let span = client_span("GetSecretValue");
        let out = self
            .client
            .get_secret_value()
            .secret_id(name)
            .version_stage(stage)
            .send()
            .instrument(span.clone())
            .await;
        let out = settle(&span, "GetSecretValue", name, out)?;
        let malformed = |why| SecretError::Malformed {
            name: name.to_owned(),
            why,
        };
        let text = out
            .secret_string()
            .ok_or_else(|| malformed("no SecretString"))?;
        let key: SecretKey =
            serde_json::from_str(text).map_err(|_| malformed("not the expected JSON object"))?;
        if key.access_key_id.is_empty() || key.secret_access_key.is_empty() {
            return Err(malformed("an empty access_key_id or secret_access_key"));
        }
        Ok(StoredKey {
            access_key_id: key.access_key_id,
            secret_access_key: Zeroizing::new(key.secret_access_key),
            version_id: out.version_id().unwrap_or_default().to_owned(),
        })
    }

    /// The versions of secret `name` that carry a stage.
    pub(crate) async fn versions(&self, name: &str) -> Result<Vec<Version>, SecretError> {
        let span = client_span("ListSecretVersionIds");
        let mut versions = Vec::new();
        let mut next: Option<String> = None;
        for pages in 1.. {
            let out = self
                .client
                .list_secret_version_ids()
                .secret_id(name)
                .set_next_token(next.take())
                .send()
                .instrument(span.clone())
                .await;
            let out = settle(&span, "ListSecretVersionIds", name, out)?;
            for v in out.versions() {
                if let Some(id) = v.version_id() {
                    versions.push(Version {
                        id: id.to_owned(),
                        stages: v.version_stages().to_vec(),
                    });
                }
            }
            // Some implementations answer an empty token on the last page.
            match out.next_token().filter(|t| !t.is_empty()) {
                Some(token) if pages < MAX_PAGES => next = Some(token.to_owned()),
                _ => break,
            }
        }
        Ok(versions)
    }

    /// Stores `key` as a new version of secret `name` with the stage
    /// `AWSPENDING` only, under `token`: sent again (a retry, a resumed
    /// rotation), it finds its own version and changes nothing.
    pub(crate) async fn put_pending(
        &self,
        name: &str,
        key: &Credentials,
        token: &str,
    ) -> Result<String, SecretError> {
        let value = Zeroizing::new(
            serde_json::json!({
                "access_key_id": key.access_key_id(),
                "secret_access_key": key.secret_access_key(),
            })
            .to_string(),
        );
        let span = client_span("PutSecretValue");
        let out = self
            .client
            .put_secret_value()
            .secret_id(name)
            .secret_string(value.as_str())
            .client_request_token(token)
            .version_stages(PENDING)
            .send()
            .instrument(span.clone())
            .await;
        let out = settle(&span, "PutSecretValue", name, out)?;
        Ok(out.version_id().unwrap_or(token).to_owned())
    }

    /// Moves `stage` of secret `name` to version `to` (if any), removing it
    /// from version `from` (if any).
    pub(crate) async fn move_stage(
        &self,
        name: &str,
        stage: &str,
        to: Option<&str>,
        from: Option<&str>,
    ) -> Result<(), SecretError> {
        let span = client_span("UpdateSecretVersionStage");
        let out = self
            .client
            .update_secret_version_stage()
            .secret_id(name)
            .version_stage(stage)
            .set_move_to_version_id(to.map(str::to_owned))
            .set_remove_from_version_id(from.map(str::to_owned))
            .send()
            .instrument(span.clone())
            .await;
        settle(&span, "UpdateSecretVersionStage", name, out).map(|_| ())
    }

    /// The IAM users that have a secret: every secret whose name starts
    /// with the template's prefix and reads back as a user's.
    pub(crate) async fn enrolled(&self) -> Result<Vec<String>, SecretError> {
        let prefix = self.names.prefix();
        let span = client_span("ListSecrets");
        let filter = Filter::builder()
            .key(FilterNameStringType::Name)
            .values(prefix)
            .build();
        let mut users = Vec::new();
        let mut next: Option<String> = None;
        for pages in 1.. {
            let out = self
                .client
                .list_secrets()
                .filters(filter.clone())
                .set_next_token(next.take())
                .send()
                .instrument(span.clone())
                .await;
            let out = settle(&span, "ListSecrets", prefix, out)?;
            // The name filter is a prefix match that ignores case: the exact
            // template decides.
            users.extend(
                out.secret_list()
                    .iter()
                    .filter_map(|s| s.name())
                    .filter_map(|name| self.names.user_of(name))
                    .map(str::to_owned),
            );
            match out.next_token().filter(|t| !t.is_empty()) {
                Some(token) if pages < MAX_PAGES => next = Some(token.to_owned()),
                _ => break,
            }
        }
        users.sort();
        users.dedup();
        Ok(users)
    }
}

impl Slot {
    /// The answer from what is held, while it is fresh.
    fn cached(&self) -> Option<Result<Arc<UserClients>, Error>> {
        let now = Instant::now();
        match &*lock(&self.held) {
            Held::Key {
                clients,
                fresh_until,
                ..
            } if now < *fresh_until => Some(Ok(clients.clone())),
            Held::Missing { until } if now < *until => Some(Err(Error::IamUserNotProvisioned)),
            _ => None,
        }
    }

    /// Holds a freshly read key; returns whether it differs from the last.
    fn install(&self, clients: Arc<UserClients>, key_id: String, refresh: Duration) -> bool {
        let mut held = lock(&self.held);
        let changed = match &*held {
            Held::Key { key_id: before, .. } => *before != key_id,
            _ => true,
        };
        *held = Held::Key {
            clients,
            key_id,
            fresh_until: Instant::now() + refresh,
        };
        drop(held);
        if changed {
            self.generation
                .store(cache::generation(), Ordering::Release);
        }
        changed
    }

    fn missing(&self, refresh: Duration) {
        *lock(&self.held) = Held::Missing {
            until: Instant::now() + refresh,
        };
    }

    /// The last key read, kept a little longer after a failed read.
    fn stale(&self) -> Option<Arc<UserClients>> {
        match &mut *lock(&self.held) {
            Held::Key {
                clients,
                fresh_until,
                ..
            } => {
                *fresh_until = Instant::now() + RETRY_AFTER_FAILURE;
                Some(clients.clone())
            }
            _ => None,
        }
    }
}

fn client_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "SecretsManager",
        otel.name = span_name(method),
        otel.kind = "client",
        rpc.system = "aws-api",
        rpc.service = "SecretsManager",
        rpc.method = method,
        aws.request_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn span_name(method: &'static str) -> &'static str {
    match method {
        "GetSecretValue" => "SecretsManager.GetSecretValue",
        "ListSecretVersionIds" => "SecretsManager.ListSecretVersionIds",
        "PutSecretValue" => "SecretsManager.PutSecretValue",
        "UpdateSecretVersionStage" => "SecretsManager.UpdateSecretVersionStage",
        "ListSecrets" => "SecretsManager.ListSecrets",
        _ => "SecretsManager",
    }
}

/// The outcome of one call: recorded on its span and in the outcome
/// counter, and its error classified.
fn settle<T: RequestId, E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    span: &tracing::Span,
    method: &'static str,
    name: &str,
    result: Result<T, SdkError<E>>,
) -> Result<T, SecretError> {
    match result {
        Ok(out) => {
            if let Some(id) = out.request_id() {
                span.record("aws.request_id", id);
            }
            telemetry::count_iam_outcome(method, "OK");
            Ok(out)
        }
        Err(err) => {
            if let Some(id) = err.request_id() {
                span.record("aws.request_id", id);
            }
            let code = err.code().map(str::to_owned).unwrap_or_else(|| match &err {
                SdkError::TimeoutError(_) => "timeout".to_owned(),
                SdkError::DispatchFailure(_) => "unreachable".to_owned(),
                _ => "no answer".to_owned(),
            });
            telemetry::count_iam_outcome(method, &code);
            if code == "ResourceNotFoundException" {
                return Err(SecretError::NotFound(name.to_owned()));
            }
            span.record("otel.status_code", "ERROR");
            Err(SecretError::Failed {
                operation: method,
                name: name.to_owned(),
                code,
                cause: Cause::msg(super::key_id::redact_key_ids(
                    &DisplayErrorContext(&err).to_string(),
                )),
            })
        }
    }
}
