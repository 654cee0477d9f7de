//! The in-process state backend: one replica's promises only (its leases
//! too: they keep this process's own jobs apart, never another replica's).
//!
//! One lock over every caller's attempts and `request_id` records makes each
//! [`Backend`] step atomic, as a Lua script is in Redis. Bounded: a caller's
//! attempts are at most `failed_attempts` entries (a reservation beyond the
//! limit is refused), its records at most `max_request_ids_per_caller`, and
//! records expire.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use futures_util::{FutureExt, future::BoxFuture};
use tokio::{sync::Notify, time::Instant};

use super::backend::{
    Backend, Began, BeginFailed, BeginOp, EndOp, EndRecord, Ended, Failures, Limit, OUTCOME_TTL,
    StoredOutcome, Verdict, still_pending,
};
use crate::error::Cause;

/// How often idle callers' expired records are swept, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Attempt {
    id: String,
    at: Instant,
    pending: bool,
}

#[derive(Debug, Clone)]
enum RecordState {
    Pending { owner: String, started: Instant },
    Done(StoredOutcome),
}

#[derive(Debug)]
struct Record {
    state: RecordState,
    expires: Instant,
}

#[derive(Debug, Default)]
struct CallerState {
    attempts: VecDeque<Attempt>,
    records: HashMap<String, Record>,
    /// Attempts given up before their `begin` was answered, with when that
    /// is forgotten (see [`EndOp::unanswered`]).
    released: HashMap<String, Instant>,
}

impl CallerState {
    /// Drops what has expired.
    fn prune(&mut self, now: Instant, window: Duration, reservation_ttl: Duration) {
        self.attempts.retain(|a| {
            let ttl = if a.pending { reservation_ttl } else { window };
            now.duration_since(a.at) < ttl
        });
        self.records.retain(|_, r| r.expires > now);
        self.released.retain(|_, until| *until > now);
    }

    fn is_empty(&self) -> bool {
        self.attempts.is_empty() && self.records.is_empty() && self.released.is_empty()
    }

    fn failures(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| !a.pending)
    }

    /// Applies `op.record` to the `request_id` record; returns what it found
    /// and the verdict the reservation is to be settled with.
    fn settle_record(&mut self, request_id: &str, op: &EndOp, now: Instant) -> (Ended, Verdict) {
        let mut verdict = op.verdict;
        let mut ended = Ended::Settled;
        let current = self.records.get(request_id).map(|r| r.state.clone());
        let ours = match &current {
            Some(RecordState::Pending { owner, .. }) => *owner == op.id,
            Some(RecordState::Done(stored)) => {
                matches!(&op.record, EndRecord::Store(outcome, _) if outcome == stored)
            }
            None => false,
        };
        match &op.record {
            EndRecord::Hold => {}
            EndRecord::Release => {
                if ours {
                    self.records.remove(request_id);
                }
            }
            EndRecord::Store(outcome, ttl) => {
                if !ours {
                    ended = if current.is_some() {
                        Ended::Replaced
                    } else {
                        Ended::Missing
                    };
                    // Raced another call for the same id: a wrong old
                    // password is likely the other call's change.
                    if current.is_some() && verdict == Verdict::Failure {
                        verdict = Verdict::Release;
                    }
                }
                let theirs_changed = matches!(
                    current,
                    Some(RecordState::Done(StoredOutcome::Changed { .. }))
                );
                let changed = matches!(outcome, StoredOutcome::Changed { .. });
                if ours || current.is_none() || (changed && !theirs_changed) {
                    self.records.insert(
                        request_id.to_owned(),
                        Record {
                            state: RecordState::Done(outcome.clone()),
                            expires: now + *ttl,
                        },
                    );
                }
            }
        }
        (ended, verdict)
    }

    /// Settles attempt `id`'s reservation.
    fn settle_attempt(&mut self, id: &str, verdict: Verdict, now: Instant) {
        match verdict {
            Verdict::Release => self.attempts.retain(|a| a.id != id),
            // Earlier failures are forgotten; other calls still in flight
            // keep their reservations.
            Verdict::Success => self.attempts.retain(|a| a.pending && a.id != id),
            Verdict::Failure => match self.attempts.iter_mut().find(|a| a.id == id) {
                Some(a) => {
                    a.pending = false;
                    a.at = now;
                }
                None => self.attempts.push_back(Attempt {
                    id: id.to_owned(),
                    at: now,
                    pending: false,
                }),
            },
        }
    }

    fn found(&self, request_id: &str, now: Instant) -> Option<Began> {
        self.records.get(request_id).map(|r| match &r.state {
            RecordState::Pending { started, .. } => Began::Pending(now.duration_since(*started)),
            RecordState::Done(outcome) => Began::Done(outcome.clone()),
        })
    }
}

#[derive(Debug, Default)]
struct Callers {
    by_key: HashMap<String, CallerState>,
    last_sweep: Option<Instant>,
}

/// A lease: its owner and when it expires.
#[derive(Debug)]
struct Lease {
    owner: String,
    expires: Instant,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    callers: Mutex<Callers>,
    /// Leases by name; an expired one is as good as none.
    leases: Mutex<HashMap<String, Lease>>,
    /// Woken whenever a record changes, for retries waiting on a claim.
    changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the maps consistent before it can panic.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Memory {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Sweeps idle callers' expired records now and then: a caller that
    /// never comes back must not keep its records for the life of the
    /// process.
    fn sweep(callers: &mut Callers, now: Instant) {
        if callers
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        callers.last_sweep = Some(now);
        callers.by_key.retain(|_, c| {
            c.records.retain(|_, r| r.expires > now);
            c.released.retain(|_, until| *until > now);
            !c.is_empty()
        });
    }

    fn begin_now(&self, op: &BeginOp) -> Began {
        let now = Instant::now();
        let mut callers = lock(&self.callers);
        Self::sweep(&mut callers, now);
        let caller = callers.by_key.entry(op.caller.clone()).or_default();
        caller.prune(now, op.window, op.reservation_ttl);
        if caller.released.contains_key(&op.id) {
            return Began::Released;
        }
        // The same op again: granted already.
        if caller.attempts.iter().any(|a| a.id == op.id && a.pending) {
            return Began::Granted;
        }
        if let Some(request_id) = &op.request_id
            && let Some(found) = caller.found(request_id, now)
        {
            return found;
        }
        let count = caller.failures().count();
        if count >= op.max_failures as usize {
            let oldest = caller.failures().map(|a| a.at).min().unwrap_or(now);
            let retry = op.window.saturating_sub(now.duration_since(oldest));
            return Began::Refused(Limit::Failures(retry.max(Duration::from_millis(1))));
        }
        if caller.attempts.len() >= op.max_failures as usize {
            return Began::Refused(Limit::InFlight);
        }
        if let Some(request_id) = &op.request_id {
            if caller.records.len() >= op.max_request_ids as usize {
                let oldest = caller
                    .records
                    .values()
                    .map(|r| r.expires)
                    .min()
                    .unwrap_or(now);
                let retry = oldest.saturating_duration_since(now);
                return Began::Refused(Limit::RequestIds(retry.max(Duration::from_millis(1))));
            }
            caller.records.insert(
                request_id.clone(),
                Record {
                    state: RecordState::Pending {
                        owner: op.id.clone(),
                        started: now,
                    },
                    expires: now + OUTCOME_TTL,
                },
            );
        }
        caller.attempts.push_back(Attempt {
            id: op.id.clone(),
            at: now,
            pending: true,
        });
        Began::Granted
    }

    fn end_now(&self, op: &EndOp) -> Ended {
        let now = Instant::now();
        let mut callers = lock(&self.callers);
        let caller = callers.by_key.entry(op.caller.clone()).or_default();
        if let Some(memory) = op.unanswered {
            caller.released.insert(op.id.clone(), now + memory);
        }
        let (ended, verdict) = match &op.request_id {
            Some(request_id) => caller.settle_record(request_id, op, now),
            None => (Ended::Settled, op.verdict),
        };
        caller.settle_attempt(&op.id, verdict, now);
        if caller.is_empty() {
            callers.by_key.remove(&op.caller);
        }
        drop(callers);
        self.changed.notify_waiters();
        ended
    }

    fn failures_now(&self, caller: &str, window: Duration, reservation_ttl: Duration) -> Failures {
        let now = Instant::now();
        let mut callers = lock(&self.callers);
        let Some(state) = callers.by_key.get_mut(caller) else {
            return Failures {
                count: 0,
                oldest_age: None,
                in_flight: 0,
            };
        };
        state.prune(now, window, reservation_ttl);
        let count = state.failures().count();
        let oldest_age = state.failures().map(|a| now.duration_since(a.at)).max();
        let in_flight = state.attempts.len() - count;
        if state.is_empty() {
            callers.by_key.remove(caller);
        }
        Failures {
            count: u32::try_from(count).unwrap_or(u32::MAX),
            oldest_age,
            in_flight: u32::try_from(in_flight).unwrap_or(u32::MAX),
        }
    }

    fn reset_now(&self, caller: &str, window: Duration) -> u32 {
        let now = Instant::now();
        let mut callers = lock(&self.callers);
        let Some(state) = callers.by_key.get_mut(caller) else {
            return 0;
        };
        let before = state.attempts.len();
        state
            .attempts
            .retain(|a| a.pending || now.duration_since(a.at) >= window);
        let forgotten = before - state.attempts.len();
        if state.is_empty() {
            callers.by_key.remove(caller);
        }
        u32::try_from(forgotten).unwrap_or(u32::MAX)
    }

    /// Takes or renews `name` for `owner` when `may_take` (a free lease may
    /// be taken) or `owner` holds it; whether `owner` holds it now.
    fn lease_now(&self, name: &str, owner: &str, ttl: Duration, may_take: bool) -> bool {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        leases.retain(|_, l| l.expires > now);
        match leases.get_mut(name) {
            Some(lease) if lease.owner == owner => {
                lease.expires = now + ttl;
                true
            }
            Some(_) => false,
            None if may_take => {
                leases.insert(
                    name.to_owned(),
                    Lease {
                        owner: owner.to_owned(),
                        expires: now + ttl,
                    },
                );
                true
            }
            None => false,
        }
    }

    fn release_now(&self, name: &str, owner: &str) -> bool {
        let now = Instant::now();
        let mut leases = lock(&self.leases);
        match leases.get(name) {
            Some(lease) if lease.owner == owner && lease.expires > now => {
                leases.remove(name);
                true
            }
            _ => false,
        }
    }

    fn peek(&self, caller: &str, request_id: &str) -> Option<Began> {
        let now = Instant::now();
        lock(&self.callers)
            .by_key
            .get(caller)
            .and_then(|c| c.records.get(request_id).filter(|r| r.expires > now))
            .map(|r| match &r.state {
                RecordState::Pending { started, .. } => {
                    Began::Pending(now.duration_since(*started))
                }
                RecordState::Done(outcome) => Began::Done(outcome.clone()),
            })
    }
}

impl Backend for Memory {
    fn begin<'a>(&'a self, op: &'a BeginOp) -> BoxFuture<'a, Result<Began, BeginFailed>> {
        std::future::ready(Ok(self.begin_now(op))).boxed()
    }

    fn end<'a>(&'a self, op: &'a EndOp) -> BoxFuture<'a, Result<Ended, Cause>> {
        std::future::ready(Ok(self.end_now(op))).boxed()
    }

    fn failures<'a>(
        &'a self,
        caller: &'a str,
        window: Duration,
        reservation_ttl: Duration,
    ) -> BoxFuture<'a, Result<Failures, Cause>> {
        std::future::ready(Ok(self.failures_now(caller, window, reservation_ttl))).boxed()
    }

    fn reset<'a>(&'a self, caller: &'a str, window: Duration) -> BoxFuture<'a, Result<u32, Cause>> {
        std::future::ready(Ok(self.reset_now(caller, window))).boxed()
    }

    fn wait<'a>(
        &'a self,
        caller: &'a str,
        request_id: &'a str,
        until: Instant,
        lost_after: Duration,
    ) -> BoxFuture<'a, Result<Option<Began>, Cause>> {
        async move {
            loop {
                // Registered before looking, so a change in between still
                // wakes us.
                let changed = self.changed.notified();
                let found = self.peek(caller, request_id);
                if !still_pending(&found, lost_after) || Instant::now() >= until {
                    return Ok(found);
                }
                // A claim turns "lost" by age alone, without a change.
                let _ =
                    tokio::time::timeout_at(until.min(Instant::now() + lost_after), changed).await;
            }
        }
        .boxed()
    }

    fn lease_acquire<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        std::future::ready(Ok(self.lease_now(name, owner, ttl, true))).boxed()
    }

    fn lease_renew<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        std::future::ready(Ok(self.lease_now(name, owner, ttl, false))).boxed()
    }

    fn lease_release<'a>(
        &'a self,
        name: &'a str,
        owner: &'a str,
    ) -> BoxFuture<'a, Result<bool, Cause>> {
        std::future::ready(Ok(self.release_now(name, owner))).boxed()
    }

    fn eviction_policies(&self) -> BoxFuture<'_, Result<Option<Vec<String>>, Cause>> {
        std::future::ready(Ok(None)).boxed()
    }

    fn shared(&self) -> bool {
        false
    }
}
