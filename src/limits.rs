//! Brute-force protection: wrong old passwords per caller within a sliding
//! window. IAM has no lockout for `ChangePassword`, so without this a caller
//! could try old passwords as fast as IAM answers.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;

use crate::{config::LimitSettings, error::Error};

/// Failure timestamps per caller identity.
pub struct FailedAttempts {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl FailedAttempts {
    /// An empty tracker.
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            max: settings.failed_attempts as usize,
            window: settings.failed_attempts_window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Refuses the caller while it has `max` failures inside the window.
    pub fn check(&self, caller: &str) -> Result<(), Error> {
        let now = Instant::now();
        let mut failures = self.lock();
        let Some(times) = failures.get_mut(caller) else {
            return Ok(());
        };
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        match times.front() {
            Some(oldest) if times.len() >= self.max => Err(Error::TooManyFailedAttempts {
                retry_after: self.window.saturating_sub(now.duration_since(*oldest)),
            }),
            _ => Ok(()),
        }
    }

    /// Records one wrong old password.
    pub fn record_failure(&self, caller: &str) {
        let mut failures = self.lock();
        let times = failures.entry(caller.to_owned()).or_default();
        times.push_back(Instant::now());
        // Only the newest `max` failures can matter for the decision.
        while times.len() > self.max {
            times.pop_front();
        }
    }

    /// Forgets the caller's failures after a successful change.
    pub fn clear(&self, caller: &str) {
        self.lock().remove(caller);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Instant>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> FailedAttempts {
        FailedAttempts::new(&LimitSettings {
            failed_attempts: 3,
            failed_attempts_window: Duration::from_secs(60),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_is_refused_after_too_many_failures_until_the_window_passes() {
        let t = tracker();
        for _ in 0..3 {
            assert!(t.check("a").is_ok());
            t.record_failure("a");
        }
        let Err(Error::TooManyFailedAttempts { retry_after }) = t.check("a") else {
            panic!("expected a lockout");
        };
        assert_eq!(retry_after, Duration::from_secs(60));
        assert!(t.check("b").is_ok(), "other callers are unaffected");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(t.check("a").is_err());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(t.check("a").is_ok(), "the oldest failure left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_the_failures() {
        let t = tracker();
        t.record_failure("a");
        t.record_failure("a");
        t.clear("a");
        t.record_failure("a");
        assert!(t.check("a").is_ok());
    }
}
