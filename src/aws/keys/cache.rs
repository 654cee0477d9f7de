//! What the key sources keep per IAM user (its clients, its key): made on
//! first use, bounded, and dropped once idle. A configured caller that never
//! calls costs nothing here, and ten thousand users who each called once do
//! not all stay in memory: each entry holds an IAM and an STS client (about
//! 35 KiB), so the bound is what keeps a pod with thousands of callers
//! small.
//!
//! Dropping an entry is always safe: a call that holds it keeps it until it
//! ends, and the next call makes a new one (re-reading the key, and
//! verifying it again, as every new entry has a new [`generation`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Users whose entries are kept at most. Calls from more users than this
/// in turn cost a key read (and a verification) each.
pub(crate) const MAX_USERS: usize = 256;
/// An entry not used for this long is dropped when room is needed.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(15 * 60);

/// A generation no key held before had: a verified identity belongs to one
/// generation, so a key that changed, or an entry made again, is verified
/// again.
pub(crate) fn generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

struct Entry<V> {
    value: Arc<V>,
    used: Instant,
}

/// Entries by IAM user (or profile): at most `capacity`, the idle ones and
/// then the least recently used dropped first.
pub(crate) struct UserCache<V> {
    capacity: usize,
    idle_after: Duration,
    entries: Mutex<HashMap<String, Entry<V>>>,
}

impl<V> UserCache<V> {
    /// An empty cache of at most `capacity` entries.
    pub(crate) fn new(capacity: usize, idle_after: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            idle_after,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry<V>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `key`'s entry, if kept; it counts as used now.
    pub(crate) fn get(&self, key: &str) -> Option<Arc<V>> {
        let mut entries = self.lock();
        let entry = entries.get_mut(key)?;
        entry.used = Instant::now();
        Some(entry.value.clone())
    }

    /// `key`'s entry, if kept, without counting as a use: a background
    /// look at every user must not push out the ones callers use.
    pub(crate) fn peek(&self, key: &str) -> Option<Arc<V>> {
        self.lock().get(key).map(|e| e.value.clone())
    }

    /// `key`'s entry, made by `make` when not kept (room is made first).
    pub(crate) fn get_or_insert_with(&self, key: &str, make: impl FnOnce() -> V) -> Arc<V> {
        let now = Instant::now();
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(key) {
            entry.used = now;
            return entry.value.clone();
        }
        if entries.len() >= self.capacity {
            entries.retain(|_, e| now.duration_since(e.used) < self.idle_after);
        }
        while entries.len() >= self.capacity {
            let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            entries.remove(&oldest);
        }
        let value = Arc::new(make());
        entries.insert(
            key.to_owned(),
            Entry {
                value: value.clone(),
                used: now,
            },
        );
        value
    }

    /// How many entries are kept.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_at_most_its_capacity_and_drops_the_least_recently_used() {
        let cache = UserCache::new(3, Duration::from_secs(3600));
        for user in ["a", "b", "c"] {
            cache.get_or_insert_with(user, || user.to_owned());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // "a" is used again: "b" is now the least recently used.
        assert_eq!(cache.get("a").as_deref().map(String::as_str), Some("a"));
        tokio::time::advance(Duration::from_secs(1)).await;
        cache.get_or_insert_with("d", || "d".to_owned());
        assert_eq!(cache.len(), 3);
        assert!(cache.get("b").is_none(), "the least recently used went");
        for kept in ["a", "c", "d"] {
            assert!(cache.get(kept).is_some(), "{kept}");
        }
        for i in 0..1000 {
            cache.get_or_insert_with(&format!("u{i}"), String::new);
        }
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_entries_go_first_and_a_kept_one_is_not_made_again() {
        let cache = UserCache::new(2, Duration::from_secs(60));
        let first = cache.get_or_insert_with("a", || 1);
        let again = cache.get_or_insert_with("a", || 2);
        assert!(Arc::ptr_eq(&first, &again), "made once");
        cache.get_or_insert_with("b", || 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        cache.get_or_insert_with("c", || 4);
        assert_eq!(cache.len(), 1, "both idle entries went at once");
        // A caller still holding a dropped entry keeps it.
        assert_eq!(*first, 1);
    }

    #[test]
    fn every_generation_is_new() {
        let a = generation();
        let b = generation();
        assert!(b > a);
    }
}
