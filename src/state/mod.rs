//! Shared state: the wrong-old-password attempt limit and the outcomes of
//! `ChangePassword` calls by `request_id`, in this process ([`memory`]) or in
//! Redis/Valkey shared by every replica ([`redis`]).
//!
//! Attempt limit: an attempt is *reserved* before IAM is called, in the same
//! atomic step that checks the limit, so concurrent guesses cannot all pass
//! the check before the first failure is recorded. Pending reservations
//! count like failures. When the attempt ends, [`Store::settle`] releases
//! the reservation (the old password was right, or never tested), turns it
//! into a failure, or — on success — also forgets earlier failures.
//!
//! Outcomes: the first call with a `request_id` claims it; a retry with the
//! same id finds the claim pending (and waits) or done (and replays the
//! stored outcome). Nothing stored here is, or is derived from, a password.
//!
//! Every operation has a time budget; any failure is
//! [`Error::StateUnavailable`] and the caller fails closed.

pub(crate) mod memory;
pub(crate) mod redis;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::{
    config::{LimitSettings, StateBackend, StateSettings},
    deadline::Deadline,
    error::{Cause, Error, Rejection},
    telemetry,
};

/// How long an outcome is kept for replay under its `request_id`.
pub(crate) const OUTCOME_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How often a retry looks again at a claim still pending in Redis.
const PENDING_POLL: Duration = Duration::from_millis(50);

/// What a finished `ChangePassword` answered, as stored for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StoredOutcome {
    /// The password changed.
    Changed {
        /// The IAM user whose password changed.
        iam_user: String,
        /// IAM's request id.
        iam_request_id: String,
    },
    /// The call failed, and a retry would fail the same way.
    Rejected(Rejection),
}

/// A `request_id` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Entry {
    /// A call is (or was, if its replica died) running.
    Pending {
        /// Identifies the claiming call, so only it can give the claim up.
        owner: String,
        /// When it started, milliseconds since the Unix epoch.
        started_ms: u64,
    },
    /// The call finished.
    Done(StoredOutcome),
}

impl Entry {
    fn encode(&self) -> String {
        // Serializing these plain enums cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    fn decode(text: &str) -> Result<Self, Cause> {
        serde_json::from_str(text).map_err(Cause::new)
    }
}

/// The answer to a claim.
#[derive(Debug)]
pub(crate) enum Claim {
    /// This call owns the id; it must [`Store::complete`] or
    /// [`Store::abandon`] it.
    Fresh(ClaimToken),
    /// An earlier call finished with this outcome.
    Done(StoredOutcome),
    /// An earlier call is still running.
    Pending,
    /// An earlier call died mid-way; its outcome will never be known.
    Lost,
}

/// What waiting for a pending claim found.
#[derive(Debug)]
pub(crate) enum Waited {
    /// The earlier call finished.
    Done(StoredOutcome),
    /// The earlier call gave its claim up (it changed nothing): claim again.
    Gone,
    /// Still running at the deadline.
    StillPending,
    /// Its call died mid-way; the outcome will never be known.
    Lost,
}

/// Proof of a fresh claim.
#[derive(Debug)]
pub(crate) struct ClaimToken {
    caller: String,
    request_id: String,
    owner: String,
}

/// The answer to a reservation.
#[derive(Debug)]
pub(crate) enum Reserve {
    /// The attempt may go ahead; settle it when it ends.
    Granted(Reservation),
    /// The caller is over the limit.
    Refused(Limit),
}

/// What fills a caller's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `failed_attempts` failures in the window: until the oldest leaves it.
    Failures(Duration),
    /// Failures and attempts still in flight together: the in-flight ones
    /// count because any of them may be a wrong guess. Frees up soon.
    InFlight,
}

/// One reserved attempt.
#[derive(Debug)]
pub(crate) struct Reservation {
    caller: String,
    id: String,
}

/// How a reserved attempt ended, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The old password was right: forget this caller's failures.
    Success,
    /// The old password was never tested: as if the attempt never happened.
    Release,
    /// The old password was wrong, or may have been tested: a failure.
    Failure,
}

enum Backend {
    Memory(memory::Memory),
    Redis(redis::Redis),
}

/// The configured store.
pub(crate) struct Store {
    backend: Backend,
    limits: LimitSettings,
    /// After this long a pending claim's call cannot still be running.
    pending_lifetime: Duration,
    /// Last known reachability, to log and count transitions once.
    up: Arc<AtomicBool>,
}

impl Store {
    /// Builds the configured backend. Redis is connected lazily: credgate
    /// starts (and fails closed) while the store is down.
    pub(crate) fn new(
        settings: &StateSettings,
        limits: &LimitSettings,
        pending_lifetime: Duration,
    ) -> Result<Self, String> {
        let backend = match &settings.backend {
            StateBackend::Memory => Backend::Memory(memory::Memory::new()),
            StateBackend::Redis(redis) => {
                Backend::Redis(redis::Redis::new(redis, &settings.key_prefix)?)
            }
        };
        let up = Arc::new(AtomicBool::new(true));
        if matches!(backend, Backend::Redis(_)) {
            telemetry::observe_state_up(up.clone());
        }
        Ok(Self {
            backend,
            limits: limits.clone(),
            pending_lifetime,
            up,
        })
    }

    /// `limits.failed_attempts`: also the most attempts a caller may have
    /// in flight at once, since any of them may be a wrong guess.
    pub(crate) fn failed_attempts(&self) -> usize {
        self.limits.failed_attempts as usize
    }

    /// Whether the backend is shared by every replica.
    pub(crate) fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// Reserves one attempt for `caller`, or refuses it over the limit.
    pub(crate) async fn reserve(&self, caller: &str) -> Result<Reserve, Error> {
        let id = unique_id();
        let (max, window) = (
            self.limits.failed_attempts,
            self.limits.failed_attempts_window,
        );
        let refused = match &self.backend {
            Backend::Memory(m) => Ok(m.reserve(caller, &id, max, window)),
            Backend::Redis(r) => {
                self.track("reserve", r.reserve(caller, &id, max, window))
                    .await
            }
        }?;
        let decision = if refused.is_some() {
            "refused"
        } else {
            "allowed"
        };
        telemetry::metrics()
            .limit_decisions
            .add(1, &[KeyValue::new("decision", decision)]);
        Ok(match refused {
            Some(limit) => Reserve::Refused(limit),
            None => Reserve::Granted(Reservation {
                caller: caller.to_owned(),
                id,
            }),
        })
    }

    /// Whether `caller` is over the limit now, without reserving
    /// (`validate_only` calls, which never reach IAM `ChangePassword`).
    pub(crate) async fn check(&self, caller: &str) -> Result<Option<Duration>, Error> {
        let (max, window) = (
            self.limits.failed_attempts,
            self.limits.failed_attempts_window,
        );
        match &self.backend {
            Backend::Memory(m) => Ok(m.check(caller, max, window)),
            Backend::Redis(r) => self.track("check", r.check(caller, max, window)).await,
        }
    }

    /// Ends a reservation. A store failure here leaves the reservation in
    /// place, where it counts as a failure until the window passes: closed.
    pub(crate) async fn settle(&self, reservation: Reservation, verdict: Verdict) {
        let Reservation { caller, id } = reservation;
        let window = self.limits.failed_attempts_window;
        let result = match &self.backend {
            Backend::Memory(m) => {
                m.settle(&caller, &id, verdict, window);
                Ok(())
            }
            Backend::Redis(r) => {
                self.track("settle", r.settle(&caller, &id, verdict, window))
                    .await
            }
        };
        if let Err(e) = result {
            tracing::error!(
                caller,
                ?verdict,
                error = %crate::error::chain(&e),
                "cannot settle an attempt in the state store; it counts as a failure until the window passes"
            );
        }
    }

    /// Claims `request_id` for `caller`, or reports an earlier call's state.
    pub(crate) async fn claim(&self, caller: &str, request_id: &str) -> Result<Claim, Error> {
        let owner = unique_id();
        let pending = Entry::Pending {
            owner: owner.clone(),
            started_ms: now_ms(),
        };
        let existing = match &self.backend {
            Backend::Memory(m) => Ok(m.claim(caller, request_id, pending, OUTCOME_TTL)),
            Backend::Redis(r) => {
                self.track(
                    "claim",
                    r.claim(caller, request_id, &pending.encode(), OUTCOME_TTL),
                )
                .await
            }
        }?;
        Ok(match existing {
            None => Claim::Fresh(ClaimToken {
                caller: caller.to_owned(),
                request_id: request_id.to_owned(),
                owner,
            }),
            Some(entry) => self.claim_of(entry),
        })
    }

    fn claim_of(&self, entry: Entry) -> Claim {
        match entry {
            Entry::Done(outcome) => {
                telemetry::metrics()
                    .idempotency_replays
                    .add(1, &[KeyValue::new("result", "stored")]);
                Claim::Done(outcome)
            }
            Entry::Pending { started_ms, .. } => {
                let age = Duration::from_millis(now_ms().saturating_sub(started_ms));
                if self.pending_is_lost(age) {
                    Claim::Lost
                } else {
                    Claim::Pending
                }
            }
        }
    }

    /// Waits, until `deadline`, for a pending claim to finish.
    pub(crate) async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        deadline: Deadline,
    ) -> Result<Waited, Error> {
        loop {
            let entry = match &self.backend {
                Backend::Memory(m) => m.wait(caller, request_id, deadline).await,
                Backend::Redis(r) => self.track("get", r.get(caller, request_id)).await?,
            };
            let age = match entry {
                None => return Ok(Waited::Gone),
                Some(Entry::Done(outcome)) => {
                    telemetry::metrics()
                        .idempotency_replays
                        .add(1, &[KeyValue::new("result", "stored")]);
                    return Ok(Waited::Done(outcome));
                }
                Some(Entry::Pending { started_ms, .. }) => {
                    Duration::from_millis(now_ms().saturating_sub(started_ms))
                }
            };
            if self.pending_is_lost(age) {
                return Ok(Waited::Lost);
            }
            if deadline.passed() {
                telemetry::metrics()
                    .idempotency_replays
                    .add(1, &[KeyValue::new("result", "in_progress")]);
                return Ok(Waited::StillPending);
            }
            if let Backend::Redis(_) = self.backend {
                tokio::time::sleep(PENDING_POLL.min(deadline.remaining())).await;
            }
        }
    }

    /// Whether a claim pending for `age` can no longer finish: its call
    /// would have ended long ago, so its replica died mid-call.
    fn pending_is_lost(&self, age: Duration) -> bool {
        age > self.pending_lifetime
    }

    /// Stores the outcome of a claimed call for replay.
    pub(crate) async fn complete(&self, token: ClaimToken, outcome: StoredOutcome) {
        let entry = Entry::Done(outcome);
        let result = match &self.backend {
            Backend::Memory(m) => {
                m.complete(&token.caller, &token.request_id, entry, OUTCOME_TTL);
                Ok(())
            }
            Backend::Redis(r) => {
                self.track(
                    "complete",
                    r.complete(
                        &token.caller,
                        &token.request_id,
                        &entry.encode(),
                        OUTCOME_TTL,
                    ),
                )
                .await
            }
        };
        if let Err(e) = result {
            tracing::error!(
                caller = token.caller,
                request_id = token.request_id,
                error = %crate::error::chain(&e),
                "cannot store a call's outcome; a retry with its request_id will get OUTCOME_UNKNOWN"
            );
        }
    }

    /// Gives a claim up: the call ended without changing anything and
    /// invites a retry, which should then run again rather than replay.
    pub(crate) async fn abandon(&self, token: ClaimToken) {
        let result = match &self.backend {
            Backend::Memory(m) => {
                m.abandon(&token.caller, &token.request_id, &token.owner);
                Ok(())
            }
            Backend::Redis(r) => {
                self.track(
                    "abandon",
                    r.abandon(&token.caller, &token.request_id, &token.owner),
                )
                .await
            }
        };
        if let Err(e) = result {
            tracing::warn!(
                caller = token.caller,
                request_id = token.request_id,
                error = %crate::error::chain(&e),
                "cannot release a request_id claim; retries with it will wait for it to expire"
            );
        }
    }

    /// One round trip to the store (`check-config --online`).
    pub(crate) async fn ping(&self) -> Result<(), Error> {
        match &self.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Redis(r) => self.track("ping", r.ping()).await,
        }
    }

    /// Runs one Redis command under a span and the store metrics, and keeps
    /// the reachability state (one log line per transition).
    async fn track<T>(
        &self,
        command: &'static str,
        op: impl Future<Output = Result<T, Cause>>,
    ) -> Result<T, Error> {
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
}

/// An id no other attempt of any replica shares: this process's random
/// 128-bit prefix (one `getrandom` at start) and a counter, instead of a
/// system call per attempt.
fn unique_id() -> String {
    static PREFIX: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| uuid::Uuid::new_v4().simple().to_string());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("{}-{}", *PREFIX, COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
