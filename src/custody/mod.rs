//! Key custody at work: the schedule that checks every IAM user's key (its
//! age for any source; for Secrets Manager, whether a rotation is due or
//! unfinished) and rotates it under a lease in the state store, so that one
//! replica at a time rotates a given user; and what `credgate keys status`
//! and `credgate keys rotate` show and do ([`status`]).
//!
//! The users are the configured callers' and, with Secrets Manager, every
//! user whose secret exists under `keys.secret_name`'s prefix: rotation does
//! not depend on the caller list. With profiles, a templated caller's user
//! is known only once it calls: its key age is checked then, and with every
//! sweep after.

pub(crate) mod status;

use std::{
    collections::{BTreeSet, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt, StreamExt, future::BoxFuture};
use opentelemetry::KeyValue;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    aws::{
        iam::{Iam, LastUsed},
        keys::{
            Signer,
            age::Ages,
            rotation::{self, Ended, Plan, RotationError, Trigger},
            secrets::{CURRENT, PENDING, PREVIOUS},
        },
    },
    config::{CallerSettings, KeySettings, KeySource},
    error::Error,
    state::Store,
    telemetry,
};

/// A rotation lease lives this long unless renewed (every third of it).
const LEASE_TTL: Duration = Duration::from_secs(60);
/// Users checked at once.
const CHECK_CONCURRENCY: usize = 4;
/// Bounds of the time between two checks (see [`Custody::interval`]).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Where a user's rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RotationState {
    /// One key, the secret's current one.
    Idle,
    /// A new key stored as `AWSPENDING`, not promoted yet.
    Pending,
    /// The old key is still there, awaiting its grace.
    OldKeyInGrace,
    /// A key the secret does not hold (the next run deletes it).
    OrphanKey,
    /// Source `profiles`: credgate does not rotate.
    Manual,
    /// No key for this user in the source.
    NotProvisioned,
    /// It could not be read (see the report's error).
    Unknown,
}

impl RotationState {
    /// As `keys status` shows it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Pending => "pending",
            Self::OldKeyInGrace => "old_key_in_grace",
            Self::OrphanKey => "orphan_key",
            Self::Manual => "manual",
            Self::NotProvisioned => "not_provisioned",
            Self::Unknown => "unknown",
        }
    }

    /// Whether an unfinished rotation waits for a run.
    fn unfinished(self) -> bool {
        matches!(self, Self::Pending | Self::OldKeyInGrace | Self::OrphanKey)
    }
}

/// One user's key, as a check found it. The key id is kept whole here and
/// shown by its last four characters only.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    /// Whose key.
    pub(crate) signer: Signer,
    /// The key in use.
    pub(crate) key_id: Option<String>,
    /// When IAM created it.
    pub(crate) created: Option<SystemTime>,
    /// When it was last used (`keys status` only).
    pub(crate) last_used: Option<LastUsed>,
    /// The rotation's stage.
    pub(crate) state: RotationState,
    /// What could not be read, if anything.
    pub(crate) error: Option<String>,
}

impl Report {
    fn new(signer: &Signer) -> Self {
        Self {
            signer: signer.clone(),
            key_id: None,
            created: None,
            last_used: None,
            state: RotationState::Unknown,
            error: None,
        }
    }
}

/// Why `credgate keys rotate` (or a scheduled rotation) could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CustodyError {
    /// The configuration does not allow it (EX_USAGE).
    #[error("{0}")]
    Usage(String),
    /// Another replica (or run) holds this user's rotation lease now.
    #[error(
        "a rotation of IAM user {0:?} is in progress elsewhere (its lease is held); try again \
         once it is done"
    )]
    Busy(String),
    /// The state store did not answer.
    #[error("state store: {}", crate::error::chain(.0))]
    Store(#[source] Error),
    /// The rotation stopped.
    #[error(transparent)]
    Rotation(RotationError),
}

/// A rotation lease in the state store, as the protocol keeps it.
struct Held(crate::state::Lease);

impl rotation::Lease for Held {
    fn keep(&self) -> BoxFuture<'_, Result<(), RotationError>> {
        async move {
            match self.0.renew().await {
                Ok(true) => Ok(()),
                Ok(false) => Err(RotationError::LeaseLost(
                    "it expired and may be held by another replica".to_owned(),
                )),
                Err(e) => Err(RotationError::LeaseLost(format!(
                    "the state store did not renew it: {e}"
                ))),
            }
        }
        .boxed()
    }

    fn ttl(&self) -> Duration {
        self.0.ttl()
    }
}

/// See the module docs.
pub(crate) struct Custody {
    iam: Arc<Iam>,
    store: Store,
    settings: KeySettings,
    configured: Vec<Signer>,
    ages: Arc<Ages>,
    /// Users this process is rotating now.
    running: Mutex<HashSet<String>>,
    tasks: TaskTracker,
}

impl Custody {
    /// Custody of the configured `signers`' keys (and, with Secrets Manager,
    /// of every enrolled user's).
    pub(crate) fn new(
        iam: Arc<Iam>,
        store: Store,
        settings: &KeySettings,
        signers: impl IntoIterator<Item = Signer>,
    ) -> Self {
        let mut configured: Vec<Signer> = signers.into_iter().collect();
        configured.sort();
        configured.dedup();
        Self {
            iam,
            store,
            settings: settings.clone(),
            configured,
            ages: Arc::new(Ages::new(settings.warn_key_age)),
            running: Mutex::new(HashSet::new()),
            tasks: TaskTracker::new(),
        }
    }

    /// The settings.
    pub(crate) fn settings(&self) -> &KeySettings {
        &self.settings
    }

    /// Every user whose key is in custody: the configured callers', the
    /// users with a secret (Secrets Manager), and the users templated
    /// callers used (profiles).
    pub(crate) async fn users(&self) -> Result<Vec<Signer>, String> {
        let mut users: BTreeSet<Signer> = self.configured.iter().cloned().collect();
        users.extend(self.unconfigured().await?);
        Ok(users.into_iter().collect())
    }

    /// The users in custody that no configured caller names: with Secrets
    /// Manager the users with a secret, with profiles the users templated
    /// callers used. A sweep checks them after the configured ones, which
    /// it does not copy (there may be thousands).
    async fn unconfigured(&self) -> Result<Vec<Signer>, String> {
        let used = self.iam.keys().used_unconfigured();
        let Some(secrets) = self.iam.keys().secrets() else {
            return Ok(used);
        };
        let enrolled = secrets
            .enrolled()
            .await
            .map_err(|e| format!("{e}: {}", crate::error::chain(&e)))?;
        Ok(enrolled
            .iter()
            .map(|u| Signer::new(u, None))
            .filter(|s| self.configured.binary_search(s).is_err())
            .collect())
    }

    /// Reads `signer`'s key: its id and age, whether a rotation is
    /// unfinished, and (when asked) when it was last used.
    pub(crate) async fn inspect(&self, signer: &Signer, last_used: bool) -> Report {
        let mut report = Report::new(signer);
        let user = signer.iam_user();
        let clients = match self.iam.keys().peek(signer).await {
            Ok(clients) => clients,
            Err(Error::IamUserNotProvisioned) => {
                report.state = RotationState::NotProvisioned;
                self.ages.forget(user);
                return report;
            }
            Err(e) => {
                report.error = Some(error_text(&e));
                return report;
            }
        };
        let Some(key_id) = clients.access_key_id().await else {
            report.error = Some("the key cannot be loaded".to_owned());
            return report;
        };
        report.key_id = Some(key_id.clone());
        let keys = match self.iam.list_access_keys(&clients, user).await {
            Ok(keys) => keys,
            Err(e) => {
                report.error = Some(format!("IAM ListAccessKeys: {}", error_text(&e)));
                return report;
            }
        };
        report.created = keys.iter().find(|k| k.id == key_id).and_then(|k| k.created);
        if let Some(created) = report.created {
            self.ages.record(user, &key_id, created);
        }
        let extra = keys.iter().find(|k| k.id != key_id).map(|k| k.id.clone());
        report.state = match self.settings.source {
            KeySource::Profiles => RotationState::Manual,
            KeySource::SecretsManager => {
                self.stage(user, extra.as_deref())
                    .await
                    .unwrap_or_else(|e| {
                        report.error = Some(e);
                        RotationState::Unknown
                    })
            }
        };
        if last_used {
            match self.iam.access_key_last_used(&clients, &key_id).await {
                Ok(used) => report.last_used = Some(used),
                Err(e) => {
                    report.error = Some(format!("IAM GetAccessKeyLastUsed: {}", error_text(&e)))
                }
            }
        }
        report
    }

    /// The rotation stage of `user`'s secret, given the key beside the
    /// current one in IAM (if any).
    async fn stage(&self, user: &str, extra: Option<&str>) -> Result<RotationState, String> {
        let Some(secrets) = self.iam.keys().secrets() else {
            return Ok(RotationState::Manual);
        };
        let Some(name) = secrets.name_of(user) else {
            return Ok(RotationState::NotProvisioned);
        };
        let versions = secrets.versions(&name).await.map_err(|e| e.to_string())?;
        let current = versions.iter().find(|v| v.has(CURRENT));
        if versions
            .iter()
            .any(|v| v.has(PENDING) && Some(v) != current)
        {
            return Ok(RotationState::Pending);
        }
        let Some(extra) = extra else {
            return Ok(RotationState::Idle);
        };
        let previous = match versions.iter().any(|v| v.has(PREVIOUS)) {
            true => secrets.read(&name, PREVIOUS).await.ok(),
            false => None,
        };
        Ok(match previous {
            Some(key) if key.access_key_id == extra => RotationState::OldKeyInGrace,
            _ => RotationState::OrphanKey,
        })
    }

    /// When `report`'s key is due for rotation (`None`: never).
    pub(crate) fn next_rotation(&self, report: &Report) -> Option<SystemTime> {
        match self.settings.source {
            KeySource::Profiles => None,
            KeySource::SecretsManager => Some(report.created? + self.settings.rotate_after?),
        }
    }

    /// Rotates `iam_user`'s key now, under its lease (see
    /// [`rotation`]); a schedule's run rotates only a key that is due.
    pub(crate) async fn rotate(
        &self,
        iam_user: &str,
        trigger: Trigger,
    ) -> Result<Ended, CustodyError> {
        let Some(secrets) = self.iam.keys().secrets() else {
            return Err(CustodyError::Usage(
                "credgate rotates keys only with keys.source = \"secretsmanager\"; with \
                 \"profiles\", rotate them by hand (docs/operations.md, Key custody)"
                    .to_owned(),
            ));
        };
        let lease = self
            .store
            .lease(&format!("rotate:{iam_user}"), LEASE_TTL)
            .await
            .map_err(CustodyError::Store)?
            .ok_or_else(|| CustodyError::Busy(iam_user.to_owned()))?;
        let held = Held(lease);
        let plan = Plan {
            rotate_after: self.settings.rotate_after,
            grace: self.settings.old_key_grace,
            trigger,
        };
        let result = rotation::run(&self.iam, secrets, iam_user, plan, &held).await;
        if let Err(e) = held.0.release().await {
            tracing::debug!(error = %e, "the rotation lease could not be given up; it expires");
        }
        let outcome = match &result {
            Ok(Ended::Rotated) => Some("ok"),
            Ok(Ended::Unchanged) => None,
            Err(_) => Some("failed"),
        };
        if let Some(outcome) = outcome {
            telemetry::metrics()
                .key_rotations
                .add(1, &[KeyValue::new("outcome", outcome)]);
        }
        match &result {
            Ok(Ended::Rotated) => tracing::info!(iam_user, "access key rotated"),
            Ok(Ended::Unchanged) => {}
            Err(e) => tracing::error!(
                iam_user,
                error = %e,
                cause = %crate::error::chain(e),
                "key rotation stopped; the next run resumes it from the secret's stages"
            ),
        }
        result.map_err(CustodyError::Rotation)
    }

    /// Exports the key metrics (their series exist from the start, so that
    /// an alert on their increase has something to compare with).
    pub(crate) fn export_metrics(&self) {
        let (oldest, over) = (self.ages.clone(), self.ages.clone());
        telemetry::observe_key_ages(move || oldest.oldest_seconds(), move || over.over_age());
        for outcome in ["ok", "failed"] {
            telemetry::metrics()
                .key_rotations
                .add(0, &[KeyValue::new("outcome", outcome)]);
        }
    }

    /// Checks every user now, then again every [`Custody::interval`], until
    /// `stop`; rotations run in tasks of their own, dropped at `stop` (each
    /// step is resumable: the next run, here or on another replica, goes on
    /// from the secret's stages).
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let interval = self.interval();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.check_all(&stop) => {}
            }
            // Up to a tenth more, so that replicas started together drift apart.
            let jitter = interval.mul_f64(f64::from(rand_percent()) / 1000.0);
            let next = tokio::time::sleep(interval + jitter);
            tokio::pin!(next);
            loop {
                tokio::select! {
                    () = stop.cancelled() => {
                        self.tasks.close();
                        return;
                    }
                    () = &mut next => break,
                    () = self.iam.keys().new_user() => self.check_new().await,
                }
            }
        }
        self.tasks.close();
    }

    /// The key ages of users a templated caller started using since the
    /// last sweep, now rather than up to an hour later.
    async fn check_new(&self) {
        for signer in self.iam.keys().used_unconfigured() {
            if self.ages.knows(signer.iam_user()) {
                continue;
            }
            let report = self.inspect(&signer, false).await;
            if let Some(error) = &report.error {
                tracing::warn!(signer = %signer, error = error.as_str(), "cannot check this IAM user's key");
            }
        }
    }

    /// How often keys are checked: a twentieth of `rotate_after` between a
    /// second and an hour, hourly without rotation.
    fn interval(&self) -> Duration {
        match (self.settings.source, self.settings.rotate_after) {
            (KeySource::SecretsManager, Some(after)) => {
                (after / 20).clamp(MIN_INTERVAL, MAX_INTERVAL)
            }
            _ => MAX_INTERVAL,
        }
    }

    async fn check_all(self: &Arc<Self>, stop: &CancellationToken) {
        let extra = match self.unconfigured().await {
            Ok(extra) => extra,
            Err(e) => {
                tracing::warn!(
                    error = e,
                    "cannot list the users with a secret; checking the configured ones"
                );
                Vec::new()
            }
        };
        let users = || self.configured.iter().chain(&extra);
        self.ages.keep_only(users().map(Signer::iam_user));
        // With AWS down, thousands of users fail alike: one line per user
        // at debug, and one warning for the check.
        let failed = Mutex::new((0usize, None::<(Signer, String)>));
        futures_util::stream::iter(users())
            .for_each_concurrent(CHECK_CONCURRENCY, |signer| {
                let failed = &failed;
                async move {
                    let report = self.inspect(signer, false).await;
                    if let Some(error) = &report.error {
                        tracing::debug!(signer = %signer, error = error.as_str(), "cannot check this IAM user's key");
                        let mut failed = failed.lock().unwrap_or_else(PoisonError::into_inner);
                        failed.0 += 1;
                        failed.1.get_or_insert_with(|| (signer.clone(), error.clone()));
                    }
                    if self.settings.source == KeySource::SecretsManager && self.needs_run(&report) {
                        self.spawn_rotation(signer.iam_user(), stop);
                    }
                }
            })
            .await;
        let (count, first) = failed.into_inner().unwrap_or_else(PoisonError::into_inner);
        if let Some((signer, error)) = first {
            tracing::warn!(
                failed = count,
                checked = self.configured.len() + extra.len(),
                first = %signer,
                error = error.as_str(),
                "cannot check some IAM users' keys (each at debug level)"
            );
        }
    }

    /// Whether `report` calls for a rotation run: one is unfinished, or the
    /// key is due.
    fn needs_run(&self, report: &Report) -> bool {
        report.state.unfinished()
            || self
                .next_rotation(report)
                .is_some_and(|due| SystemTime::now() >= due)
    }

    fn spawn_rotation(self: &Arc<Self>, iam_user: &str, stop: &CancellationToken) {
        let inserted = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(iam_user.to_owned());
        if !inserted {
            return;
        }
        let (custody, user, stop) = (self.clone(), iam_user.to_owned(), stop.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                // Other outcomes are logged by rotate.
                result = custody.rotate(&user, Trigger::Schedule) => {
                    if let Err(CustodyError::Busy(_)) = result {
                        tracing::debug!(iam_user = user.as_str(), "another replica is rotating this user");
                    }
                }
                () = stop.cancelled() => tracing::info!(
                    iam_user = user.as_str(),
                    "shutting down mid-rotation; the next run resumes it from the secret's stages"
                ),
            }
            custody
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&user);
        });
    }
}

/// Whose keys the configured callers sign with.
/// The configured callers' signers, each once.
pub(crate) fn signers(callers: &[CallerSettings]) -> Vec<Signer> {
    let mut signers: Vec<Signer> = callers
        .iter()
        .map(|c| Signer::new(&c.iam_user, c.aws_profile.as_deref()))
        .collect();
    signers.sort();
    signers.dedup();
    signers
}

/// An error as a line: its message and cause chain (never a secret: no
/// error carries one).
fn error_text(e: &Error) -> String {
    let chain = crate::error::chain(e);
    if chain.is_empty() {
        e.to_string()
    } else {
        format!("{e}: {chain}")
    }
}

/// 0..100, from the process's random source.
fn rand_percent() -> u16 {
    (uuid::Uuid::new_v4().as_u128() % 100) as u16
}
