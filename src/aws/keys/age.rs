//! How old the keys in use are: for `credgate.keys.oldest_age` and
//! `credgate.keys.over_age` (no per-user labels), and one WARN line per user
//! and day while a user's key is older than `keys.warn_key_age` (AWS
//! Security Hub control IAM.3: rotate access keys every 90 days).
//!
//! Ages are computed when read, from each key's creation time as IAM last
//! reported it: between two checks they keep growing. Users and keys are
//! kept as hashes, with no allocation of their own: a sweep over 10,000
//! users then leaves no small allocations scattered among the ones it
//! frees (which kept the allocator from returning that memory).

use std::{
    collections::{HashMap, HashSet, hash_map::RandomState},
    hash::BuildHasher,
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::key_id::suffix;

/// A user is warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

struct Seen {
    /// The key's id, hashed: a new key means a new warning.
    key: u64,
    created: SystemTime,
    warned: Option<Instant>,
}

/// See the module docs.
pub(crate) struct Ages {
    warn_after: Duration,
    /// Hashes users and key ids (keyed per process, like a `HashMap`'s).
    hasher: RandomState,
    /// By the user's name, hashed.
    by_user: Mutex<HashMap<u64, Seen>>,
}

impl Ages {
    /// Ages to warn about past `warn_after`.
    pub(crate) fn new(warn_after: Duration) -> Self {
        Self {
            warn_after,
            hasher: RandomState::new(),
            by_user: Mutex::new(HashMap::new()),
        }
    }

    fn hash(&self, value: &str) -> u64 {
        self.hasher.hash_one(value)
    }

    /// Records that `iam_user` signs with `key_id`, created at `created`,
    /// and warns if it is too old (once a day per user).
    pub(crate) fn record(&self, iam_user: &str, key_id: &str, created: SystemTime) {
        let key = self.hash(key_id);
        let mut by_user = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = by_user.entry(self.hash(iam_user)).or_insert(Seen {
            key,
            created,
            warned: None,
        });
        if seen.key != key {
            // A new key: a new warning if it too gets old.
            *seen = Seen {
                key,
                created,
                warned: None,
            };
        }
        seen.created = created;
        let age = age(created);
        if age <= self.warn_after || seen.warned.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        seen.warned = Some(Instant::now());
        tracing::warn!(
            iam_user,
            key = suffix(key_id),
            age_days = age.as_secs() / (24 * 60 * 60),
            warn_key_age = %humantime::format_duration(self.warn_after),
            "access key older than keys.warn_key_age (AWS Security Hub IAM.3): rotate it"
        );
    }

    /// Forgets `iam_user` (no longer configured or enrolled).
    pub(crate) fn forget(&self, iam_user: &str) {
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.hash(iam_user));
    }

    /// Whether `iam_user`'s key age is known.
    pub(crate) fn knows(&self, iam_user: &str) -> bool {
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(&self.hash(iam_user))
    }

    /// Forgets every user but `users` (no longer configured or enrolled).
    pub(crate) fn keep_only<'a>(&self, users: impl IntoIterator<Item = &'a str>) {
        let keep: HashSet<u64> = users.into_iter().map(|u| self.hash(u)).collect();
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|user, _| keep.contains(user));
    }

    /// The age of the oldest key in use, in seconds; `None` before any.
    pub(crate) fn oldest_seconds(&self) -> Option<u64> {
        self.by_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|s| age(s.created).as_secs())
            .max()
    }

    /// How many users' keys are older than `warn_key_age`.
    pub(crate) fn over_age(&self) -> u64 {
        let by_user = self.by_user.lock().unwrap_or_else(PoisonError::into_inner);
        by_user
            .values()
            .filter(|s| age(s.created) > self.warn_after)
            .count() as u64
    }
}

fn age(created: SystemTime) -> Duration {
    SystemTime::now()
        .duration_since(created)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    #[test]
    fn the_oldest_key_and_the_keys_over_age_are_counted_without_users() {
        let ages = Ages::new(90 * DAY);
        assert_eq!(ages.oldest_seconds(), None);
        assert_eq!(ages.over_age(), 0);
        let now = SystemTime::now();
        ages.record("a", "AKIAAAAAAAAAAAAAAAA1", now - 10 * DAY);
        ages.record("b", "AKIABBBBBBBBBBBBBBB2", now - 100 * DAY);
        ages.record("c", "AKIACCCCCCCCCCCCCCC3", now - 200 * DAY);
        let oldest = ages.oldest_seconds().expect("some");
        assert!((200 * DAY.as_secs()..200 * DAY.as_secs() + 60).contains(&oldest));
        assert_eq!(ages.over_age(), 2);
        // Rotated: a new key of c replaces the old.
        ages.record("c", "AKIACCCCCCCCCCCCCCC4", now);
        assert_eq!(ages.over_age(), 1);
        ages.forget("b");
        assert_eq!(ages.over_age(), 0);
        assert!(ages.oldest_seconds().expect("some") < 11 * DAY.as_secs());
        ages.record("d", "AKIADDDDDDDDDDDDDDD5", now - 300 * DAY);
        assert!(ages.knows("d") && !ages.knows("b"));
        ages.keep_only(["a", "c"]);
        assert_eq!(ages.over_age(), 0, "d is no longer in custody");
        assert!(ages.oldest_seconds().expect("some") < 11 * DAY.as_secs());
    }
}
