//! `[server]`: listeners, deadlines, the drain, and the bounds on calls
//! and connections.

use std::{net::SocketAddr, time::Duration};

use toml::Table;

use super::problems::{Problems, set};

/// The keys of `[server]`.
pub(super) const KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "request_timeout",
    "shutdown_grace",
    "max_concurrent_requests",
    "max_requests_per_caller",
    "max_connections",
    "max_connections_per_caller",
    "idle_timeout",
    "max_connection_age",
];

const SECTION: &str = "server";

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerSettings {
    /// mTLS gRPC listener.
    pub listen: SocketAddr,
    /// Plaintext health-only listener for Kubernetes probes.
    pub admin_listen: SocketAddr,
    /// Budget for a whole RPC, IAM call included.
    pub request_timeout: Duration,
    /// Drain budget after SIGTERM.
    pub shutdown_grace: Duration,
    /// PasswordService requests served at once across all connections.
    pub max_concurrent_requests: usize,
    /// PasswordService requests in flight per caller identity.
    pub max_requests_per_caller: usize,
    /// Open mTLS connections, handshakes included.
    pub max_connections: usize,
    /// Of those, per client identity; every unmapped identity shares one
    /// budget of this size. Below `max_connections`, so that no single
    /// certificate can take them all.
    pub max_connections_per_caller: usize,
    /// An HTTP/2 connection without a call for this long is closed.
    pub idle_timeout: Duration,
    /// Every connection is asked to reconnect (GOAWAY) after this long, so
    /// that CA, CRL and caller changes reach long-lived channels too.
    pub max_connection_age: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            max_concurrent_requests: 512,
            max_requests_per_caller: 16,
            max_connections: 4096,
            max_connections_per_caller: 64,
            idle_timeout: Duration::from_secs(5 * 60),
            max_connection_age: Duration::from_secs(60 * 60),
        }
    }
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> ServerSettings {
    let mut s = ServerSettings::default();
    let Some(t) = p.section(root, SECTION, KEYS) else {
        return s;
    };
    for (key, slot) in [
        ("listen", &mut s.listen),
        ("admin_listen", &mut s.admin_listen),
    ] {
        set(slot, p.addr(t, SECTION, key));
    }
    for (key, slot) in [
        ("request_timeout", &mut s.request_timeout),
        ("shutdown_grace", &mut s.shutdown_grace),
        ("idle_timeout", &mut s.idle_timeout),
        ("max_connection_age", &mut s.max_connection_age),
    ] {
        set(slot, p.duration(t, SECTION, key));
    }
    // Keys set to a value that was refused (already reported).
    let mut refused = Vec::new();
    for (key, slot) in [
        ("max_concurrent_requests", &mut s.max_concurrent_requests),
        ("max_requests_per_caller", &mut s.max_requests_per_caller),
        ("max_connections", &mut s.max_connections),
        (
            "max_connections_per_caller",
            &mut s.max_connections_per_caller,
        ),
    ] {
        let value = p.positive(t, SECTION, key);
        if value.is_none() && t.contains_key(key) {
            refused.push(key);
        }
        set(slot, value);
    }
    check_connection_budgets(
        p,
        &s,
        &refused,
        !t.contains_key("max_connections_per_caller"),
    );
    check_drain(p, &s);
    check_listeners(p, &s);
    s
}

/// One identity must never be able to hold every connection. Compared only
/// when both values are usable (a refused one is reported already).
fn check_connection_budgets(
    p: &mut Problems,
    s: &ServerSettings,
    refused: &[&str],
    per_caller_is_default: bool,
) {
    let usable = ["max_connections", "max_connections_per_caller"]
        .iter()
        .all(|key| !refused.contains(key));
    if usable && s.max_connections_per_caller >= s.max_connections {
        let default = if per_caller_is_default {
            ", the default"
        } else {
            ""
        };
        p.push(format!(
            "server.max_connections_per_caller: must be below server.max_connections ({}), \
             or one certificate could hold every connection (it is {}{default})",
            s.max_connections, s.max_connections_per_caller
        ));
    }
}

/// A call admitted just before SIGTERM must be able to finish within the
/// drain (DESIGN.md, "Audit").
fn check_drain(p: &mut Problems, s: &ServerSettings) {
    if s.shutdown_grace < s.request_timeout {
        p.push(format!(
            "server.shutdown_grace: {} is shorter than server.request_timeout ({}); a call admitted just before shutdown could not finish",
            humantime::format_duration(s.shutdown_grace),
            humantime::format_duration(s.request_timeout)
        ));
    }
}

/// The two ports must differ; port 0 (any free port) on both is fine, as
/// each bind gets its own.
fn check_listeners(p: &mut Problems, s: &ServerSettings) {
    if s.listen == s.admin_listen && s.listen.port() != 0 {
        p.push(format!(
            "server.admin_listen: must differ from server.listen ({})",
            s.listen
        ));
    }
}
