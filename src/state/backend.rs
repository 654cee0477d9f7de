//! The contract between [`Store`](super::Store) and where the state lives:
//! the [`Backend`] trait, the two atomic steps of an attempt ([`BeginOp`],
//! [`EndOp`]) and what they answer, what is stored for a `request_id`, and
//! the leases that let one replica at a time do a job (a key rotation).
//! [`memory`](super::memory) and [`redis`](super::redis) implement it; the
//! same behavioural suite (`state::tests`) runs against both.

use std::{future::Future, time::Duration};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::{Cause, Rejection};

/// How long the outcome of a change that may have been applied is kept for
/// replay under its `request_id` (and how long a pending claim lives).
pub(crate) const OUTCOME_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long the outcome of a call that changed nothing is kept: long enough
/// for a client's retries, which would otherwise run it again (harmless, as
/// it changed nothing, but a wrong old password would count twice).
pub(crate) const UNCHANGED_OUTCOME_TTL: Duration = Duration::from_secs(15 * 60);
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

impl StoredOutcome {
    /// How long it is kept: a day when the password may have changed, only
    /// as long as a retry needs it when nothing changed.
    pub(crate) fn ttl(&self) -> Duration {
        match self {
            Self::Rejected(r) if r.reason.guarantees_not_applied() => UNCHANGED_OUTCOME_TTL,
            _ => OUTCOME_TTL,
        }
    }
}

/// A finished `request_id` record as Redis holds it (JSON). The pending form,
/// `{"pending":{"owner":..,"started_ms":..}}`, is written by the Lua scripts
/// on the server's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Entry {
    /// The call finished.
    Done(StoredOutcome),
}

/// What fills a caller's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `failed_attempts` failures in the window: until the oldest leaves it.
    Failures(Duration),
    /// Failures and attempts still in flight together: the in-flight ones
    /// count because any of them may be a wrong guess. Frees up soon.
    InFlight,
    /// `state.max_request_ids_per_caller` records held: until the oldest
    /// expires.
    RequestIds(Duration),
}

/// How a reserved attempt ended, for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The password changed: forget this caller's failures.
    Success,
    /// The old password was not shown wrong: as if the attempt never
    /// happened.
    Release,
    /// The old password was wrong, or may have been tested: a failure.
    Failure,
}

/// One atomic step before IAM: see [`Backend::begin`].
#[derive(Debug, Clone)]
pub(crate) struct BeginOp {
    /// The caller's state key.
    pub(crate) caller: String,
    /// This attempt's id: its reservation, and the owner of its claim.
    pub(crate) id: String,
    /// The `request_id` to claim, if the call has one.
    pub(crate) request_id: Option<String>,
    /// `limits.failed_attempts`.
    pub(crate) max_failures: u32,
    /// `limits.failed_attempts_window`.
    pub(crate) window: Duration,
    /// After this long a reservation is taken for the remains of a replica
    /// that died mid-call: the window plus the longest call, so that it
    /// counts at least as long as the failure it may stand for.
    pub(crate) reservation_ttl: Duration,
    /// `state.max_request_ids_per_caller`.
    pub(crate) max_request_ids: u32,
}

/// What [`Backend::begin`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Began {
    /// Reserved (and claimed).
    Granted,
    /// Refused by a limit; nothing written.
    Refused(Limit),
    /// The `request_id` has this stored outcome.
    Done(StoredOutcome),
    /// The `request_id` is claimed by a call that started this long ago.
    Pending(Duration),
    /// This attempt was already given up (its `end` arrived first).
    Released,
}

/// One atomic step after IAM: see [`Backend::end`].
#[derive(Debug, Clone)]
pub(crate) struct EndOp {
    /// The caller's state key.
    pub(crate) caller: String,
    /// The attempt's id, as in its [`BeginOp`].
    pub(crate) id: String,
    /// Its `request_id`, if it claimed one.
    pub(crate) request_id: Option<String>,
    /// How the reservation is settled.
    pub(crate) verdict: Verdict,
    /// What becomes of the claim.
    pub(crate) record: EndRecord,
    /// `limits.failed_attempts_window`.
    pub(crate) window: Duration,
    /// Set when the attempt's `begin` was never answered (a timeout, a
    /// dropped connection): for this long a `begin` of it still on its way
    /// (a paused server, a resend) is refused, so that it cannot reserve or
    /// claim after this release.
    pub(crate) unanswered: Option<Duration>,
}

/// What [`Backend::end`] does with the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EndRecord {
    /// Store this outcome for this long, in place of the claim.
    Store(StoredOutcome, Duration),
    /// Delete the claim (if it is still this attempt's).
    Release,
    /// Leave the claim pending: IAM may have been called and its answer is
    /// unknown, so retries must be told so rather than run again.
    Hold,
}

/// What [`Backend::end`] found about the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// As expected.
    Settled,
    /// The claim had vanished (a store restarted without persistence,
    /// flushed, failed over before replicating it); the outcome was stored
    /// anew so that retries replay it instead of calling IAM again.
    Missing,
    /// Another call had claimed the id after this one's claim vanished:
    /// IAM was called twice for one `request_id`.
    Replaced,
}

/// A [`Backend::begin`] that failed.
#[derive(Debug)]
pub(crate) struct BeginFailed {
    /// Why.
    pub(crate) cause: Cause,
    /// Whether the store may have run it (the request was sent, the answer
    /// lost): then it must be given back.
    pub(crate) may_have_run: bool,
}

impl From<Cause> for BeginFailed {
    fn from(cause: Cause) -> Self {
        Self {
            cause,
            may_have_run: true,
        }
    }
}

/// A caller's failures, as [`Backend::failures`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failures {
    /// Failures in the window.
    pub(crate) count: u32,
    /// How long ago the oldest of them was recorded.
    pub(crate) oldest_age: Option<Duration>,
    /// Reservations not yet settled.
    pub(crate) in_flight: u32,
}

/// Where the state lives. Each method is one round trip to a shared store,
/// and atomic: every decision and its write happen in one step.
pub(crate) trait Backend: Send + Sync + 'static {
    /// In order: a stored outcome or a pending claim of the `request_id`
    /// (returned as is; nothing reserved); the limit (refused when
    /// failures, or failures and reservations together, reach
    /// `max_failures`, or when the caller holds `max_request_ids` records);
    /// then the reservation and the claim. Running the same op again (a
    /// client's resend) grants again without reserving twice; an op whose
    /// attempt was already ended answers [`Began::Released`].
    fn begin<'a>(&'a self, op: &'a BeginOp) -> BoxFuture<'a, Result<Began, BeginFailed>>;
    /// Settles the reservation and applies [`EndRecord`] to the claim.
    /// Idempotent: running it again changes nothing more.
    fn end<'a>(&'a self, op: &'a EndOp) -> BoxFuture<'a, Result<Ended, Cause>>;
    /// The caller's failures in `window`, without reserving.
    fn failures<'a>(
        &'a self,
        caller: &'a str,
        window: Duration,
        reservation_ttl: Duration,
    ) -> BoxFuture<'a, Result<Failures, Cause>>;
    /// Forgets the caller's failures; returns how many there were.
    fn reset<'a>(&'a self, caller: &'a str, window: Duration) -> BoxFuture<'a, Result<u32, Cause>>;
    /// The `request_id` record once it is no longer pending (or pending
    /// for longer than `lost_after`), or as it is at `until`: `None` when
    /// there is none.
    fn wait<'a>(
        &'a self,
        caller: &'a str,
        request_id: &'a str,
        until: Instant,
        lost_after: Duration,
    ) -> BoxFuture<'a, Result<Option<Began>, Cause>>;
    /// Takes the lease `name` for `owner` for `ttl`, unless another owner
    /// holds it; `owner` taking it again (a resend) renews it. Whether
    /// `owner` holds it now.
    fn lease_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>>;
    /// Extends `owner`'s lease `name` to `ttl` from now; `false` when
    /// `owner` no longer holds it (it expired, another took it).
    fn lease_renew<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>>;
    /// Gives `owner`'s lease `name` up; `false` when `owner` did not hold
    /// it (then it is left as it is).
    fn lease_release<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<bool, Cause>>;
    /// Whether the store keeps every key until its TTL: its eviction
    /// policies (one per Cluster primary), `None` when it has none.
    fn eviction_policies(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, Cause>>;
    /// Shared by every replica.
    fn shared(&self) -> bool;
}

/// Whole milliseconds, at least 1 (Redis refuses a TTL of 0).
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Whether a record seen as `found` is worth waiting on: pending, and not
/// for so long that its call must have died.
pub(crate) fn still_pending(found: &Option<Began>, lost_after: Duration) -> bool {
    matches!(found, Some(Began::Pending(age)) if *age <= lost_after)
}

/// Polls `peek` until the record is no longer pending or `until` passes
/// (backends without change notifications).
pub(crate) async fn poll_until<F, Fut>(
    until: Instant,
    lost_after: Duration,
    mut peek: F,
) -> Result<Option<Began>, Cause>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<Began>, Cause>>,
{
    loop {
        let found = peek().await?;
        if !still_pending(&found, lost_after) || Instant::now() >= until {
            return Ok(found);
        }
        tokio::time::sleep_until((Instant::now() + PENDING_POLL).min(until)).await;
    }
}
