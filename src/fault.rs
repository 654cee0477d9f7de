//! Test-only fault points, compiled in only with the `fault-injection`
//! cargo feature, which `scripts/test` turns on for the integration tests
//! and which no shipped build has (the Dockerfile builds without it, and
//! `scripts/test` checks that the default binary lacks this module).
//!
//! - `CREDGATE_FAULT_PANIC=<point>` makes that point panic, so a test can
//!   show what a bug in an attempt leaves behind.
//! - `CREDGATE_FAULT_ABORT=<point>` makes that point abort the process, as
//!   `kill -9` would at that instant: nothing is flushed, no destructor
//!   runs. The key rotation's crash-safety tests stop credgate after each
//!   step of the protocol this way.
//!
//! A shared vocabulary (layer 1) rather than part of one module: the points
//! are in `change` (an attempt) and in `aws` (a rotation).

/// Panics or aborts when `CREDGATE_FAULT_PANIC` or `CREDGATE_FAULT_ABORT`
/// names this point.
pub(crate) fn point(name: &str) {
    let armed = |var: &str| std::env::var_os(var).is_some_and(|armed| armed == name);
    if armed("CREDGATE_FAULT_ABORT") {
        eprintln!("credgate: fault injected at {name}: aborting");
        std::process::abort();
    }
    if armed("CREDGATE_FAULT_PANIC") {
        panic!("fault injected at {name}");
    }
}
