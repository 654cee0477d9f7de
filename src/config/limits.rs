//! `[limits]`: the wrong-old-password limit.

use std::time::Duration;

use toml::Table;

use super::problems::Problems;

/// The keys of `[limits]`.
pub(super) const KEYS: &[&str] = &["failed_attempts", "failed_attempts_window"];

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LimitSettings {
    /// Wrong old passwords tolerated per caller within the window.
    pub failed_attempts: u32,
    /// Sliding window for `failed_attempts`.
    pub failed_attempts_window: Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            failed_attempts: 5,
            failed_attempts_window: Duration::from_secs(15 * 60),
        }
    }
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> LimitSettings {
    let mut s = LimitSettings::default();
    let Some(t) = p.section(root, "limits", KEYS) else {
        return s;
    };
    s.failed_attempts = p
        .positive(t, "limits", "failed_attempts")
        .unwrap_or(s.failed_attempts);
    s.failed_attempts_window = p
        .duration(t, "limits", "failed_attempts_window")
        .unwrap_or(s.failed_attempts_window);
    s
}
