//! Test-only fault points, compiled in only with the `fault-injection`
//! cargo feature, which `scripts/test` turns on for the integration tests
//! and which no shipped build has (the Dockerfile builds without it, and
//! `scripts/test` checks that the default binary lacks this module).
//!
//! `CREDGATE_FAULT_PANIC=<point>` in the environment makes that point
//! panic, so a test can show what a bug in an attempt leaves behind.

/// Panics when `CREDGATE_FAULT_PANIC` names this point.
pub(crate) fn point(name: &str) {
    if std::env::var_os("CREDGATE_FAULT_PANIC").is_some_and(|armed| armed == name) {
        panic!("fault injected at {name}");
    }
}
