//! Shared state: the wrong-old-password attempt limit and the outcomes of
//! `ChangePassword` calls by `request_id`, in this process ([`memory`]) or in
//! Redis/Valkey shared by every replica ([`redis`]: one server, Cluster or
//! Sentinel). Both implement [`Backend`]; [`Store`] holds the rules that do
//! not depend on where the state lives.
//!
//! A caller is keyed by its matcher's kind and value together
//! ([`crate::config::Matcher::state_key`]), never by the bare value.
//!
//! An attempt touches the store twice, one atomic step each:
//! - [`Store::begin`], before IAM: replays a stored outcome of its
//!   `request_id`, or finds it pending; otherwise checks the limit and
//!   reserves the attempt (pending reservations count like failures, so
//!   concurrent guesses cannot all pass the check) and claims the
//!   `request_id`. What it grants is a [`Ticket`].
//! - [`Ticket::end`], after: settles the reservation (released, a failure,
//!   or a success that forgets the caller's failures) and stores the outcome
//!   under the `request_id`, or gives the claim up.
//!
//! A ticket that is dropped without `end` — a cancelled `begin`, a timeout, a
//! store error, a panic — is ended in the background: released when IAM was
//! never called, counted as a failure and left pending (so a retry is told
//! the outcome is unknown) when it may have been. An `end` the store did not
//! take is retried in the background too. So no claim is left behind whose
//! IAM call never started.
//!
//! [`Store::lease`] lets one replica at a time do a job (a key rotation):
//! a lease is one record with its owner's random token and a TTL, renewed
//! and given up by its owner only. In memory it keeps this process's jobs
//! apart, never two replicas'.
//!
//! Nothing stored here is, or is derived from, a password. Every operation
//! has a time budget; any failure is [`Error::StateUnavailable`] and the
//! caller fails closed.

mod backend;
pub(crate) mod lockout;
pub(crate) mod memory;
pub(crate) mod redis;
#[cfg(test)]
mod tests;

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::KeyValue;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub(crate) use backend::{Limit, StoredOutcome, Verdict};

use crate::{
    config::{LimitSettings, StateBackend, StateSettings},
    deadline::Deadline,
    error::{Cause, Error},
    telemetry,
};
use backend::{Backend, Began, BeginOp, EndOp, EndRecord, Ended, ms};

/// How long an `end` the store did not take is retried in the background.
/// A claim still pending after this tells retries `OUTCOME_UNKNOWN`.
const END_RETRY_FOR: Duration = Duration::from_secs(10 * 60);
/// Most background `end`s at once: each is small, but an outage must not
/// grow them without bound.
const MAX_BACKGROUND_ENDS: usize = 4096;
/// How often the store's eviction policy is looked at again.
const POLICY_RECHECK: Duration = Duration::from_secs(60);

/// The answer to [`Store::begin`].
#[derive(Debug)]
pub(crate) enum Begin {
    /// The attempt may go ahead; end the ticket when it does.
    Granted(Ticket),
    /// The caller is over a limit; nothing was reserved or claimed.
    Refused(Limit),
    /// An earlier call with this `request_id` finished with this outcome.
    Done(StoredOutcome),
    /// An earlier call with this `request_id` is still running.
    Pending,
    /// An earlier call with this `request_id` died mid-way; its outcome will
    /// never be known.
    Lost,
}

/// What waiting for a pending claim found.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The earlier call finished.
    Done(StoredOutcome),
    /// The earlier call gave its claim up (it changed nothing): begin again.
    Gone,
    /// Still running at the deadline.
    StillPending,
    /// Its call died mid-way; the outcome will never be known.
    Lost,
}

/// What becomes of the `request_id` claim when an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// Keep this outcome for retries to replay.
    Store(StoredOutcome),
    /// Give the claim up: nothing changed and a retry should run again.
    Release,
}

/// Why a store cannot serve ([`Store::verify`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unfit {
    /// It did not answer.
    #[error("state store unreachable: {}", crate::error::chain(.0))]
    Unreachable(Error),
    /// It may evict credgate's keys.
    #[error(
        "the state store's maxmemory-policy is {0:?}; credgate requires noeviction \
         (its keys all carry TTLs, so every volatile-* policy evicts exactly them, \
         and an evicted failure counter is a reset lockout)"
    )]
    Evicts(String),
}

/// A caller's standing against the limit (`credgate lockout status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lockout {
    /// Failures in the window.
    pub(crate) failures: u32,
    /// `limits.failed_attempts`.
    pub(crate) limit: u32,
    /// Attempts reserved and not yet settled.
    pub(crate) in_flight: u32,
    /// When the caller may try again, if it is locked out now.
    pub(crate) retry_after: Option<Duration>,
}

/// The configured store (a handle: clones share it).
#[derive(Clone)]
pub(crate) struct Store {
    shared: Arc<Shared>,
}

/// What tickets and background work need of the store.
struct Shared {
    backend: Box<dyn Backend>,
    limits: LimitSettings,
    max_request_ids: u32,
    /// After this long a pending claim's call cannot still be running.
    pending_lifetime: Duration,
    /// Last known reachability, to log and count transitions once.
    up: Arc<AtomicBool>,
    /// An eviction policy other than `noeviction`, when one was seen.
    bad_policy: Mutex<Option<String>>,
    /// When the eviction policy was last looked at (ms since `epoch`).
    policy_checked_ms: AtomicU64,
    epoch: Instant,
    /// Background `end`s.
    tasks: TaskTracker,
    background: Arc<Semaphore>,
    /// The background limit was hit (logged once until it frees up).
    background_full: AtomicBool,
}

impl Store {
    /// Builds the configured backend. Redis is connected lazily: credgate
    /// starts (and fails closed) while the store is down.
    pub(crate) fn new(
        settings: &StateSettings,
        limits: &LimitSettings,
        pending_lifetime: Duration,
    ) -> Result<Self, String> {
        let backend: Box<dyn Backend> = match &settings.backend {
            StateBackend::Memory => Box::new(memory::Memory::new()),
            StateBackend::Redis(redis) => Box::new(redis::Redis::new(redis, &settings.key_prefix)?),
        };
        let up = Arc::new(AtomicBool::new(true));
        if backend.shared() {
            telemetry::observe_state_up(up.clone());
            // Exported at 0 from the start, so that an alert on its
            // increase has a series to compare with.
            for record in ["missing", "replaced"] {
                telemetry::metrics()
                    .state_lost_records
                    .add(0, &[KeyValue::new("record", record)]);
            }
        }
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                limits: limits.clone(),
                max_request_ids: settings.max_request_ids_per_caller,
                pending_lifetime,
                up,
                bad_policy: Mutex::new(None),
                policy_checked_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                tasks: TaskTracker::new(),
                background: Arc::new(Semaphore::new(MAX_BACKGROUND_ENDS)),
                background_full: AtomicBool::new(false),
            }),
        })
    }

    /// `limits.failed_attempts`: also the most attempts a caller may have
    /// in flight at once, since any of them may be a wrong guess.
    pub(crate) fn failed_attempts(&self) -> usize {
        self.shared.limits.failed_attempts as usize
    }

    /// `state.max_request_ids_per_caller`.
    pub(crate) fn max_request_ids(&self) -> u32 {
        self.shared.max_request_ids
    }

    /// Whether the backend is shared by every replica.
    pub(crate) fn is_shared(&self) -> bool {
        self.shared.backend.shared()
    }

    /// Before an attempt calls IAM, within `deadline`: see the module docs.
    /// Whatever happens to this future, a reservation or claim it made is
    /// either handed over in [`Begin::Granted`] or given back.
    pub(crate) async fn begin(
        &self,
        caller: &str,
        request_id: Option<&str>,
        deadline: Deadline,
    ) -> Result<Begin, Error> {
        let shared = &self.shared;
        tokio::time::timeout_at(deadline.instant(), shared.refuse_if_evicting())
            .await
            .unwrap_or(Err(Error::DeadlineBeforeSend { stage: "state" }))?;
        let op = shared.begin_op(caller, request_id);
        // Armed before the first byte is sent: from here on, dropping it
        // gives back whatever the store may have done.
        let mut ticket = Ticket::armed(shared, &op);
        let began = shared.send_begin(&op, &mut ticket, deadline).await?;
        ticket.answered = true;
        shared.decide(began, ticket)
    }

    /// Whether `caller` is over the limit now, without reserving
    /// (`validate_only` calls, which never reach IAM `ChangePassword`).
    pub(crate) async fn check(&self, caller: &str) -> Result<Option<Duration>, Error> {
        self.shared.refuse_if_evicting().await?;
        let lockout = self.lockout(caller).await?;
        Ok(lockout.retry_after)
    }

    /// The caller's standing against the limit.
    pub(crate) async fn lockout(&self, caller: &str) -> Result<Lockout, Error> {
        let shared = &self.shared;
        let window = shared.limits.failed_attempts_window;
        let failures = shared
            .track(
                "failures",
                shared
                    .backend
                    .failures(caller, window, shared.reservation_ttl()),
            )
            .await?;
        let limit = shared.limits.failed_attempts;
        let retry_after = match failures.oldest_age {
            Some(age) if failures.count >= limit => {
                Some(window.saturating_sub(age).max(Duration::from_millis(1)))
            }
            _ => None,
        };
        Ok(Lockout {
            failures: failures.count,
            limit,
            in_flight: failures.in_flight,
            retry_after,
        })
    }

    /// Forgets `caller`'s failures (`credgate lockout reset`); returns how
    /// many there were. Attempts in flight keep their reservations.
    pub(crate) async fn reset(&self, caller: &str) -> Result<u32, Error> {
        let shared = &self.shared;
        shared
            .track(
                "reset",
                shared
                    .backend
                    .reset(caller, shared.limits.failed_attempts_window),
            )
            .await
    }

    /// Waits, until `deadline`, for a pending claim to finish.
    pub(crate) async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        deadline: Deadline,
    ) -> Result<Waited, Error> {
        let shared = &self.shared;
        let found = shared
            .track(
                "wait",
                shared.backend.wait(
                    caller,
                    request_id,
                    deadline.instant(),
                    shared.pending_lifetime,
                ),
            )
            .await?;
        Ok(match found {
            None | Some(Began::Released | Began::Granted | Began::Refused(_)) => Waited::Gone,
            Some(Began::Done(outcome)) => {
                count_replay("stored");
                Waited::Done(outcome)
            }
            Some(Began::Pending(age)) if age > shared.pending_lifetime => Waited::Lost,
            Some(Began::Pending(_)) => {
                count_replay("in_progress");
                Waited::StillPending
            }
        })
    }

    /// Reachability and configuration (start-up, `check-config --online`):
    /// whether the store can be reached and keeps every key until its TTL.
    pub(crate) async fn verify(&self) -> Result<(), Unfit> {
        self.shared.check_policy().await
    }

    /// Takes the lease `name` for `ttl`: `None` while another holder has it.
    pub(crate) async fn lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, Error> {
        let shared = &self.shared;
        let owner = unique_id();
        let held = shared
            .track("lease", shared.backend.lease_acquire(name, &owner, ttl))
            .await?;
        Ok(held.then(|| Lease {
            shared: shared.clone(),
            name: name.to_owned(),
            owner,
            ttl,
            released: false,
        }))
    }

    /// Waits up to `within` for background `end`s (shutdown).
    pub(crate) async fn drain(&self, within: Duration) {
        let tasks = &self.shared.tasks;
        tasks.close();
        if tokio::time::timeout(within, tasks.wait()).await.is_err() {
            tracing::error!(
                still_running = tasks.len(),
                "shutting down with attempts not yet settled in the state store; \
                 their request_id claims stay pending and retries get OUTCOME_UNKNOWN"
            );
        }
    }
}

impl Shared {
    fn begin_op(&self, caller: &str, request_id: Option<&str>) -> BeginOp {
        BeginOp {
            caller: caller.to_owned(),
            id: unique_id(),
            request_id: request_id.map(str::to_owned),
            max_failures: self.limits.failed_attempts,
            window: self.limits.failed_attempts_window,
            reservation_ttl: self.reservation_ttl(),
            max_request_ids: self.max_request_ids,
        }
    }

    /// Sends `op` within `deadline`. A failure the store cannot have run
    /// (never sent) ends `ticket`: there is nothing to give back.
    async fn send_begin(
        &self,
        op: &BeginOp,
        ticket: &mut Ticket,
        deadline: Deadline,
    ) -> Result<Began, Error> {
        let mut may_have_run = true;
        let sent = self.track("begin", async {
            self.backend.begin(op).await.map_err(|e| {
                may_have_run = e.may_have_run;
                e.cause
            })
        });
        match tokio::time::timeout_at(deadline.instant(), sent).await {
            Ok(Ok(began)) => Ok(began),
            Ok(Err(e)) => {
                ticket.ended = !may_have_run;
                Err(e)
            }
            Err(_) => Err(Error::DeadlineBeforeSend { stage: "state" }),
        }
    }

    /// What the store's answer means for the attempt. Only a grant keeps the
    /// ticket; otherwise nothing was reserved or claimed, and the ticket is
    /// done — but for an answer to an attempt already given up, which the
    /// dropped ticket gives back once more.
    fn decide(&self, began: Began, mut ticket: Ticket) -> Result<Begin, Error> {
        let begin = match began {
            Began::Granted => {
                count_decision("allowed");
                return Ok(Begin::Granted(ticket));
            }
            Began::Refused(limit) => {
                // The request_id bound is no decision of the attempt limit.
                if !matches!(limit, Limit::RequestIds(_)) {
                    count_decision("refused");
                }
                Begin::Refused(limit)
            }
            Began::Done(outcome) => {
                count_replay("stored");
                Begin::Done(outcome)
            }
            Began::Pending(age) if age > self.pending_lifetime => Begin::Lost,
            Began::Pending(_) => Begin::Pending,
            Began::Released => {
                return Err(Error::StateUnavailable(Cause::msg(
                    "the store answered an attempt that was already given up",
                )));
            }
        };
        ticket.ended = true;
        Ok(begin)
    }

    fn reservation_ttl(&self) -> Duration {
        self.limits.failed_attempts_window + self.pending_lifetime
    }

    /// How long a release is remembered: longer than a `begin` can stay in
    /// the network or a paused server.
    fn release_memory(&self) -> Duration {
        self.pending_lifetime.max(Duration::from_secs(60))
    }

    /// Fails closed while the store is known to evict keys. Its policy is
    /// read before the first step on a (new) connection — at start, after
    /// the store was unreachable (a restart, a failover) — and again in the
    /// background at most every minute (a `CONFIG SET` at run time).
    async fn refuse_if_evicting(self: &Arc<Self>) -> Result<(), Error> {
        if !self.backend.shared() {
            return Ok(());
        }
        let now = self.ms_since_epoch().max(1);
        let last = self.policy_checked_ms.load(Ordering::Relaxed);
        if last == 0 {
            if let Err(Unfit::Unreachable(_)) = self.check_policy().await {
                // Read again once it answers; the step itself fails closed.
                self.policy_checked_ms.store(0, Ordering::Relaxed);
            }
        } else if now.saturating_sub(last) >= ms(POLICY_RECHECK)
            && self
                .policy_checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let shared = self.clone();
            tokio::spawn(async move {
                // Logged there; this only refreshes what later calls see.
                let _ = shared.check_policy().await;
            });
        }
        match lock(&self.bad_policy).as_deref() {
            None => Ok(()),
            Some(policy) => Err(Error::StateUnavailable(Cause::msg(format!(
                "the state store's maxmemory-policy is {policy:?}; credgate requires noeviction"
            )))),
        }
    }

    fn ms_since_epoch(&self) -> u64 {
        ms(self.epoch.elapsed())
    }

    /// Reads the eviction policy and remembers whether it is acceptable.
    async fn check_policy(&self) -> Result<(), Unfit> {
        let policies = self
            .track("policy", self.backend.eviction_policies())
            .await
            .map_err(Unfit::Unreachable)?;
        self.policy_checked_ms
            .store(self.ms_since_epoch().max(1), Ordering::Relaxed);
        let bad = policies
            .unwrap_or_default()
            .into_iter()
            .find(|p| p != "noeviction");
        let mut current = lock(&self.bad_policy);
        match (&*current, &bad) {
            (None, Some(policy)) => tracing::error!(
                policy,
                "the state store may evict keys (maxmemory-policy is not noeviction): \
                 an evicted failure counter resets a lockout and an evicted request_id \
                 record lets a retry call IAM again; ChangePassword fails closed with \
                 STATE_UNAVAILABLE until it is noeviction"
            ),
            (Some(_), None) => {
                tracing::info!("the state store's maxmemory-policy is noeviction again")
            }
            _ => {}
        }
        current.clone_from(&bad);
        drop(current);
        match bad {
            None => Ok(()),
            Some(policy) => Err(Unfit::Evicts(policy)),
        }
    }

    /// Runs one backend step under a span and the store metrics, and keeps
    /// the reachability state (one log line per transition). In memory a
    /// step is a map lookup: no span, no metrics.
    async fn track<T>(
        &self,
        command: &'static str,
        op: impl Future<Output = Result<T, Cause>>,
    ) -> Result<T, Error> {
        if !self.backend.shared() {
            return op.await.map_err(Error::StateUnavailable);
        }
        let span = tracing::info_span!(
            "state",
            otel.name = command,
            otel.kind = "client",
            db.system = "redis",
            db.operation = command,
        );
        let started = std::time::Instant::now();
        let result = op.instrument(span).await;
        let attrs = [KeyValue::new("command", command)];
        let metrics = telemetry::metrics();
        metrics
            .state_duration
            .record(started.elapsed().as_secs_f64() * 1000.0, &attrs);
        match result {
            Ok(v) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("state store reachable again");
                    // It may have come back as another server (a restart,
                    // a failover): read its eviction policy again first.
                    self.policy_checked_ms.store(0, Ordering::Relaxed);
                }
                Ok(v)
            }
            Err(cause) => {
                metrics.state_errors.add(1, &attrs);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::error!(
                        command,
                        error = %cause,
                        "state store unreachable: ChangePassword fails closed with STATE_UNAVAILABLE until it is back"
                    );
                }
                Err(Error::StateUnavailable(cause))
            }
        }
    }

    /// Runs `op` once; what the store did not take is retried in the
    /// background.
    async fn end(self: &Arc<Self>, op: EndOp) {
        match self.track("end", self.backend.end(&op)).await {
            Ok(ended) => report(&op, ended),
            Err(e) => {
                tracing::warn!(
                    caller = op.caller,
                    request_id = op.request_id,
                    error = %crate::error::chain(&e),
                    "cannot settle an attempt in the state store; retrying in the background"
                );
                self.end_in_background(op, true);
            }
        }
    }

    /// Retries `op` with backoff until the store takes it or
    /// [`END_RETRY_FOR`] passes.
    fn end_in_background(self: &Arc<Self>, op: EndOp, after_failure: bool) {
        let Ok(permit) = self.background.clone().try_acquire_owned() else {
            // Once per burst: an outage must not also flood the log.
            if !self.background_full.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    caller = op.caller,
                    request_id = op.request_id,
                    limit = MAX_BACKGROUND_ENDS,
                    "too many attempts waiting to be settled in the state store; those \
                     beyond the limit keep their reservations (counted as failures until \
                     they expire) and their request_id claims stay pending"
                );
            }
            return;
        };
        self.background_full.store(false, Ordering::Relaxed);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        runtime.spawn(self.tasks.track_future(async move {
            let _permit = permit;
            let started = Instant::now();
            let mut delay = Duration::from_millis(50);
            if after_failure {
                tokio::time::sleep(delay).await;
            }
            loop {
                match shared.track("end", shared.backend.end(&op)).await {
                    Ok(ended) => {
                        report(&op, ended);
                        if after_failure {
                            tracing::info!(
                                caller = op.caller,
                                request_id = op.request_id,
                                "attempt settled in the state store after a retry"
                            );
                        }
                        return;
                    }
                    Err(e) if started.elapsed() >= END_RETRY_FOR => {
                        tracing::error!(
                            caller = op.caller,
                            request_id = op.request_id,
                            error = %crate::error::chain(&e),
                            "gave up settling an attempt in the state store; its reservation \
                             counts as a failure until it expires, and a retry of its \
                             request_id gets OUTCOME_UNKNOWN until the claim expires"
                        );
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }));
    }
}

/// Logs and counts an `end` that found its claim gone.
fn report(op: &EndOp, ended: Ended) {
    let record = match ended {
        Ended::Settled => return,
        Ended::Missing => "missing",
        Ended::Replaced => "replaced",
    };
    telemetry::metrics()
        .state_lost_records
        .add(1, &[KeyValue::new("record", record)]);
    match ended {
        Ended::Missing => tracing::error!(
            caller = op.caller,
            request_id = op.request_id,
            "the request_id claim was gone from the state store when its outcome arrived \
             (restart without persistence, flush, or a failover that lost it); the outcome \
             was stored again, but a retry in between may have called IAM a second time"
        ),
        _ => tracing::error!(
            caller = op.caller,
            request_id = op.request_id,
            "another call claimed this request_id after its claim vanished from the state \
             store: IAM was called twice for it; the stored outcome says whether the \
             password changed"
        ),
    }
}

/// One attempt's reservation and (if it has a `request_id`) claim, from a
/// granted [`Store::begin`] until [`Ticket::end`]. Dropped without `end`,
/// it is ended in the background: released if IAM was never called, else
/// counted as a failure with its claim left pending.
#[must_use = "a ticket must be ended; dropping it gives the attempt up"]
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    caller: String,
    id: String,
    request_id: Option<String>,
    /// The store's answer to the `begin` arrived.
    answered: bool,
    /// IAM may be called from now on.
    sending: bool,
    ended: bool,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("caller", &self.caller)
            .field("request_id", &self.request_id)
            .field("sending", &self.sending)
            .finish_non_exhaustive()
    }
}

impl Ticket {
    /// The ticket of `op`, before it is sent.
    fn armed(shared: &Arc<Shared>, op: &BeginOp) -> Self {
        Self {
            shared: shared.clone(),
            caller: op.caller.clone(),
            id: op.id.clone(),
            request_id: op.request_id.clone(),
            answered: false,
            sending: false,
            ended: false,
        }
    }

    /// Marks the point after which IAM may have been called: a ticket
    /// dropped from here on no longer releases its claim.
    pub(crate) fn sending(&mut self) {
        self.sending = true;
    }

    /// Settles the reservation and stores (or gives up) the claim: one
    /// round trip. A store failure here is retried in the background.
    pub(crate) async fn end(mut self, verdict: Verdict, record: Record) {
        self.ended = true;
        let record = match record {
            Record::Store(outcome) => {
                let ttl = outcome.ttl();
                EndRecord::Store(outcome, ttl)
            }
            Record::Release => EndRecord::Release,
        };
        let op = self.op(verdict, record);
        self.shared.end(op).await;
    }

    fn op(&self, verdict: Verdict, record: EndRecord) -> EndOp {
        EndOp {
            caller: self.caller.clone(),
            id: self.id.clone(),
            request_id: self.request_id.clone(),
            verdict,
            record,
            window: self.shared.limits.failed_attempts_window,
            unanswered: (!self.answered).then(|| self.shared.release_memory()),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let op = if self.sending {
            self.op(Verdict::Failure, EndRecord::Hold)
        } else {
            self.op(Verdict::Release, EndRecord::Release)
        };
        self.shared.end_in_background(op, false);
    }
}

/// A lease this process holds (see [`Store::lease`]). Dropped without
/// [`Lease::release`], it is given up in the background; a process that
/// dies leaves it to expire.
#[must_use = "a lease is held until released; dropping it gives it up in the background"]
pub(crate) struct Lease {
    shared: Arc<Shared>,
    name: String,
    owner: String,
    ttl: Duration,
    released: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("name", &self.name)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Extends the lease to its TTL from now: `false` when it was lost (it
    /// expired and another holder may have taken it).
    pub(crate) async fn renew(&self) -> Result<bool, Error> {
        let shared = &self.shared;
        shared
            .track(
                "lease",
                shared
                    .backend
                    .lease_renew(&self.name, &self.owner, self.ttl),
            )
            .await
    }

    /// Its TTL.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Gives the lease up: whether it was still held.
    pub(crate) async fn release(mut self) -> Result<bool, Error> {
        self.released = true;
        let shared = &self.shared;
        shared
            .track(
                "lease",
                shared.backend.lease_release(&self.name, &self.owner),
            )
            .await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (shared, name, owner) = (
            self.shared.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.owner),
        );
        runtime.spawn(async move {
            // Best effort: a lease not given up expires on its own.
            let _ = shared.backend.lease_release(&name, &owner).await;
        });
    }
}

fn count_decision(decision: &'static str) {
    telemetry::metrics()
        .limit_decisions
        .add(1, &[KeyValue::new("decision", decision)]);
}

fn count_replay(result: &'static str) {
    telemetry::metrics()
        .idempotency_replays
        .add(1, &[KeyValue::new("result", result)]);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An id no other attempt of any replica shares: this process's random
/// 128-bit prefix (one `getrandom` at start) and a counter, instead of a
/// system call per attempt.
fn unique_id() -> String {
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", *PREFIX, COUNTER.fetch_add(1, Ordering::Relaxed))
}
