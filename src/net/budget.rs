//! Budgets the connection layer keeps per key (a source address, a client
//! identity), and a throttle for the log lines a flood would repeat.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// Accept errors, evictions and refused identities are logged at most this
/// often (with a count of what was not logged).
pub(super) const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Slots per key (a source address, an identity), at most `limit` each.
pub(super) struct Budgets<K> {
    limit: usize,
    held: Mutex<HashMap<K, usize>>,
}

impl<K: Hash + Eq + Clone> Budgets<K> {
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: Mutex::default(),
        })
    }

    /// A slot of `key`'s budget, if one is free.
    pub(super) fn try_take(self: &Arc<Self>, key: K) -> Option<BudgetSlot<K>> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(key.clone()).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(BudgetSlot {
            budgets: self.clone(),
            key,
        })
    }
}

/// One slot of a [`Budgets`] key, given back when dropped.
#[must_use]
pub(super) struct BudgetSlot<K: Hash + Eq> {
    budgets: Arc<Budgets<K>>,
    key: K,
}

impl<K: Hash + Eq> Drop for BudgetSlot<K> {
    fn drop(&mut self) {
        let mut held = self
            .budgets
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Lets one log line through per [`LOG_INTERVAL`], counting the rest.
#[derive(Default)]
pub(super) struct LogThrottle(Mutex<(Option<Instant>, u64)>);

impl LogThrottle {
    /// How many lines were held back since the last one, when a line may be
    /// written now.
    pub(super) fn ready(&self) -> Option<u64> {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, suppressed) = &mut *state;
        if last.is_some_and(|t| t.elapsed() < LOG_INTERVAL) {
            *suppressed += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(suppressed))
    }
}
