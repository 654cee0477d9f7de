//! The in-process state backend: one replica's promises only.
//!
//! Bounded: a caller's attempts are at most `failed_attempts` entries (a
//! reservation beyond the limit is refused), callers are the configured ones,
//! and `request_id` records expire after a day and are capped per caller.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};

use super::{Entry, Limit, Verdict};
use crate::deadline::Deadline;

/// Most `request_id` records kept per caller; the oldest finished ones go
/// first. A day of changes from one caller stays far below it.
const MAX_RECORDS_PER_CALLER: usize = 10_000;
/// How often expired records are swept, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Attempt {
    id: String,
    at: Instant,
    pending: bool,
}

#[derive(Debug)]
struct Record {
    entry: Entry,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Records {
    by_caller: HashMap<String, HashMap<String, Record>>,
    last_sweep: Option<Instant>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    attempts: Mutex<HashMap<String, VecDeque<Attempt>>>,
    records: Mutex<Records>,
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

    /// Drops failures older than the window (reservations stay until
    /// settled, however long their call takes); `None` when nothing is left.
    fn current<'a>(
        attempts: &'a mut HashMap<String, VecDeque<Attempt>>,
        caller: &str,
        window: Duration,
    ) -> Option<&'a mut VecDeque<Attempt>> {
        let now = Instant::now();
        let list = attempts.get_mut(caller)?;
        list.retain(|a| a.pending || now.duration_since(a.at) < window);
        if list.is_empty() {
            attempts.remove(caller);
            return None;
        }
        attempts.get_mut(caller)
    }

    /// Whether `list` is at the limit: by failures alone, or (when
    /// reserving) by failures and calls in flight together.
    fn over_limit(
        list: &VecDeque<Attempt>,
        max: u32,
        window: Duration,
        reserving: bool,
    ) -> Option<Limit> {
        let failures = list.iter().filter(|a| !a.pending);
        if failures.clone().count() >= max as usize {
            let oldest = failures.map(|a| a.at).min()?;
            return Some(Limit::Failures(window.saturating_sub(oldest.elapsed())));
        }
        (reserving && list.len() >= max as usize).then_some(Limit::InFlight)
    }

    pub(crate) fn reserve(
        &self,
        caller: &str,
        id: &str,
        max: u32,
        window: Duration,
    ) -> Option<Limit> {
        let mut attempts = lock(&self.attempts);
        if let Some(list) = Self::current(&mut attempts, caller, window)
            && let Some(limit) = Self::over_limit(list, max, window, true)
        {
            return Some(limit);
        }
        attempts
            .entry(caller.to_owned())
            .or_default()
            .push_back(Attempt {
                id: id.to_owned(),
                at: Instant::now(),
                pending: true,
            });
        None
    }

    pub(crate) fn check(&self, caller: &str, max: u32, window: Duration) -> Option<Duration> {
        let mut attempts = lock(&self.attempts);
        match Self::current(&mut attempts, caller, window)
            .and_then(|list| Self::over_limit(list, max, window, false))
        {
            Some(Limit::Failures(retry_after)) => Some(retry_after),
            _ => None,
        }
    }

    pub(crate) fn settle(&self, caller: &str, id: &str, verdict: Verdict, window: Duration) {
        let mut attempts = lock(&self.attempts);
        let Some(list) = Self::current(&mut attempts, caller, window) else {
            return;
        };
        match verdict {
            Verdict::Release => list.retain(|a| a.id != id),
            // Earlier failures are forgotten; other calls still in flight
            // keep their reservations.
            Verdict::Success => list.retain(|a| a.pending && a.id != id),
            Verdict::Failure => {
                if let Some(a) = list.iter_mut().find(|a| a.id == id) {
                    a.pending = false;
                    a.at = Instant::now();
                }
            }
        }
        if list.is_empty() {
            attempts.remove(caller);
        }
    }

    fn sweep(records: &mut Records) {
        let now = Instant::now();
        if records
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        records.last_sweep = Some(now);
        records.by_caller.retain(|_, ids| {
            ids.retain(|_, r| r.expires > now);
            !ids.is_empty()
        });
    }

    fn live<'a>(records: &'a Records, caller: &str, request_id: &str) -> Option<&'a Record> {
        records
            .by_caller
            .get(caller)
            .and_then(|ids| ids.get(request_id))
            .filter(|r| r.expires > Instant::now())
    }

    pub(crate) fn claim(
        &self,
        caller: &str,
        request_id: &str,
        pending: Entry,
        ttl: Duration,
    ) -> Option<Entry> {
        let mut records = lock(&self.records);
        Self::sweep(&mut records);
        if let Some(existing) = Self::live(&records, caller, request_id) {
            return Some(existing.entry.clone());
        }
        let ids = records.by_caller.entry(caller.to_owned()).or_default();
        if ids.len() >= MAX_RECORDS_PER_CALLER {
            let oldest = ids
                .iter()
                .filter(|(_, r)| matches!(r.entry, Entry::Done(_)))
                .min_by_key(|(_, r)| r.expires)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                ids.remove(&oldest);
            }
        }
        ids.insert(
            request_id.to_owned(),
            Record {
                entry: pending,
                expires: Instant::now() + ttl,
            },
        );
        None
    }

    pub(crate) fn complete(&self, caller: &str, request_id: &str, entry: Entry, ttl: Duration) {
        let mut records = lock(&self.records);
        if let Some(record) = records
            .by_caller
            .get_mut(caller)
            .and_then(|ids| ids.get_mut(request_id))
        {
            record.entry = entry;
            record.expires = Instant::now() + ttl;
        }
        drop(records);
        self.changed.notify_waiters();
    }

    pub(crate) fn abandon(&self, caller: &str, request_id: &str, owner: &str) {
        let mut records = lock(&self.records);
        if let Some(ids) = records.by_caller.get_mut(caller) {
            let ours = ids
                .get(request_id)
                .is_some_and(|r| matches!(&r.entry, Entry::Pending { owner: o, .. } if o == owner));
            if ours {
                ids.remove(request_id);
            }
        }
        drop(records);
        self.changed.notify_waiters();
    }

    /// The record, once it is no longer pending or the deadline passes.
    pub(crate) async fn wait(
        &self,
        caller: &str,
        request_id: &str,
        deadline: Deadline,
    ) -> Option<Entry> {
        loop {
            // Registered before looking, so a change in between still wakes us.
            let changed = self.changed.notified();
            let entry =
                Self::live(&lock(&self.records), caller, request_id).map(|r| r.entry.clone());
            match entry {
                Some(Entry::Pending { .. }) if !deadline.passed() => {
                    let _ = tokio::time::timeout_at(deadline.instant(), changed).await;
                }
                other => return other,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StoredOutcome;

    const WINDOW: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn reservations_count_before_any_failure_is_known() {
        let m = Memory::new();
        for i in 0..3 {
            assert_eq!(m.reserve("a", &format!("r{i}"), 3, WINDOW), None);
        }
        // Three guesses in flight: the fourth is refused at once.
        assert_eq!(m.reserve("a", "r3", 3, WINDOW), Some(Limit::InFlight));
        assert_eq!(m.check("a", 3, WINDOW), None, "no failure yet");
        assert_eq!(m.reserve("b", "r0", 3, WINDOW), None, "per caller");
        m.settle("a", "r0", Verdict::Release, WINDOW);
        assert_eq!(
            m.reserve("a", "r4", 3, WINDOW),
            None,
            "a release frees a slot"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_expire_with_the_window_and_success_forgets_them() {
        let m = Memory::new();
        for i in 0..3 {
            let id = format!("r{i}");
            assert_eq!(m.reserve("a", &id, 3, WINDOW), None);
            m.settle("a", &id, Verdict::Failure, WINDOW);
        }
        assert_eq!(m.check("a", 3, WINDOW), Some(WINDOW));
        assert_eq!(
            m.reserve("a", "r9", 3, WINDOW),
            Some(Limit::Failures(WINDOW))
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(m.check("a", 3, WINDOW), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(m.check("a", 3, WINDOW), None);
        assert!(lock(&m.attempts).is_empty(), "idle callers leave no entry");

        assert_eq!(m.reserve("a", "x", 3, WINDOW), None);
        m.settle("a", "x", Verdict::Failure, WINDOW);
        assert_eq!(m.reserve("a", "y", 3, WINDOW), None);
        assert_eq!(m.reserve("a", "z", 3, WINDOW), None);
        m.settle("a", "z", Verdict::Success, WINDOW);
        // The failure is forgotten, the other in-flight reservation is not.
        assert_eq!(lock(&m.attempts)["a"].len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_claim_replays_and_only_its_owner_can_abandon_it() {
        let m = Memory::new();
        let pending = |owner: &str| Entry::Pending {
            owner: owner.to_owned(),
            started_ms: 0,
        };
        assert_eq!(m.claim("a", "id", pending("o1"), WINDOW), None);
        assert!(matches!(
            m.claim("a", "id", pending("o2"), WINDOW),
            Some(Entry::Pending { .. })
        ));
        assert_eq!(
            m.claim("b", "id", pending("o3"), WINDOW),
            None,
            "per caller"
        );
        m.abandon("a", "id", "o2");
        assert!(
            m.claim("a", "id", pending("o4"), WINDOW).is_some(),
            "not o2's to abandon"
        );
        let done = Entry::Done(StoredOutcome::Changed {
            iam_user: "u".into(),
            iam_request_id: "r".into(),
        });
        m.complete("a", "id", done.clone(), WINDOW);
        assert_eq!(m.claim("a", "id", pending("o5"), WINDOW), Some(done));
        tokio::time::advance(WINDOW).await;
        assert_eq!(m.claim("a", "id", pending("o6"), WINDOW), None, "expired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_when_the_claim_completes() {
        let m = std::sync::Arc::new(Memory::new());
        let pending = Entry::Pending {
            owner: "o".into(),
            started_ms: 0,
        };
        m.claim("a", "id", pending, WINDOW);
        let waiter = {
            let m = m.clone();
            tokio::spawn(async move {
                m.wait("a", "id", Deadline::at(Instant::now() + WINDOW))
                    .await
            })
        };
        tokio::time::advance(Duration::from_secs(1)).await;
        let done = Entry::Done(StoredOutcome::Changed {
            iam_user: "u".into(),
            iam_request_id: "r".into(),
        });
        m.complete("a", "id", done.clone(), WINDOW);
        assert_eq!(waiter.await.expect("join"), Some(done));
    }
}
