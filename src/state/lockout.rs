//! `credgate lockout status|reset --caller IDENTITY`: one caller's
//! failed-attempt record in the configured shared state store, shown or
//! cleared by an operator. A reset is an audit event (`credgate::audit`,
//! `action = "lockout_reset"`).

use std::time::Duration;

use crate::{
    config::{Config, Matcher, StateBackend, TemplateKind},
    spiffe,
    state::{Lockout, Store},
    telemetry,
};

/// Why a lockout command could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockoutError {
    /// The identity, or the configuration, does not allow it (EX_USAGE).
    #[error("{0}")]
    Usage(String),
    /// The store did not answer (EX_UNAVAILABLE).
    #[error("{0}")]
    Store(String),
}

/// The state key of `identity`: an explicit `spiffe:`, `dns:` or `cn:`
/// form, a SPIFFE ID, or a DNS name or CN that exactly one configured
/// caller matches.
pub(crate) fn resolve(config: &Config, identity: &str) -> Result<String, LockoutError> {
    let usage = |m: String| Err(LockoutError::Usage(m));
    if let StateBackend::Memory = config.state.backend {
        return usage(
            "[state] keeps the attempt counters in each replica's memory: another process \
             cannot see or clear them (a restart of the replica clears them)"
                .to_owned(),
        );
    }
    let explicit = if spiffe::is_spiffe_uri(identity) {
        Some(Matcher::SpiffeId(identity.to_owned()))
    } else if let Some(id) = identity.strip_prefix("spiffe:") {
        Some(Matcher::SpiffeId(id.to_owned()))
    } else if let Some(name) = identity.strip_prefix("dns:") {
        Some(Matcher::DnsName(name.to_owned()))
    } else {
        identity
            .strip_prefix("cn:")
            .map(|name| Matcher::CommonName(name.to_owned()))
    };
    if let Some(matcher) = explicit {
        match &matcher {
            Matcher::SpiffeId(id) => {
                if let Err(why) = spiffe::validate(id) {
                    return usage(format!("--caller {id:?} is not a SPIFFE ID: {why}"));
                }
            }
            Matcher::DnsName(v) | Matcher::CommonName(v) if v.is_empty() => {
                return usage(format!("--caller {identity:?} names no identity"));
            }
            _ => {}
        }
        // Also callers no longer (or not literally) in the file: a template
        // resolves to identities the file does not list.
        return Ok(matcher.state_key());
    }
    let mut candidates: Vec<Matcher> = config
        .callers
        .iter()
        .map(|c| &c.matcher)
        .filter(|m| matches!(m, Matcher::DnsName(v) | Matcher::CommonName(v) if v == identity))
        .cloned()
        .collect();
    // A DNS name a template maps, when no exact entry names it as one.
    let dns = Matcher::DnsName(identity.to_owned());
    if !candidates.contains(&dns)
        && config.templates.iter().any(|t| {
            t.identity.kind == TemplateKind::DnsName && t.identity.matches(identity).is_ok()
        })
    {
        candidates.push(dns);
    }
    match candidates.as_slice() {
        [one] => Ok(one.state_key()),
        [] => usage(format!(
            "--caller {identity:?} matches no configured caller; name its kind \
             (spiffe://..., dns:NAME or cn:NAME)"
        )),
        several => usage(format!(
            "--caller {identity:?} is the value of several callers' matchers, each with its \
             own record; name one: {}",
            several
                .iter()
                .map(|m| m.state_key())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn store(config: &Config) -> Result<Store, LockoutError> {
    Store::new(&config.state, &config.limits, Duration::ZERO).map_err(LockoutError::Usage)
}

/// The caller's standing, as text or JSON.
pub(crate) async fn status(
    config: &Config,
    identity: &str,
    json: bool,
) -> Result<String, LockoutError> {
    let key = resolve(config, identity)?;
    let lockout = store(config)?
        .lockout(&key)
        .await
        .map_err(|e| LockoutError::Store(format!("{e}: {}", crate::error::chain(&e))))?;
    let window = config.limits.failed_attempts_window;
    Ok(if json {
        serde_json::json!({
            "caller": key,
            "failures": lockout.failures,
            "limit": lockout.limit,
            "window_seconds": window.as_secs(),
            "in_flight": lockout.in_flight,
            "locked_out": lockout.retry_after.is_some(),
            "retry_after_seconds": lockout.retry_after.map(|d| d.as_secs().max(1)),
        })
        .to_string()
    } else {
        describe(&key, &lockout, window)
    })
}

fn describe(key: &str, lockout: &Lockout, window: Duration) -> String {
    let standing = match lockout.retry_after {
        Some(after) => format!(
            "locked out for another {}",
            humantime::format_duration(Duration::from_secs(after.as_secs().max(1)))
        ),
        None => "not locked out".to_owned(),
    };
    format!(
        "{key}: {} of {} failed attempts in the last {}, {} in flight; {standing}",
        lockout.failures,
        lockout.limit,
        humantime::format_duration(window),
        lockout.in_flight,
    )
}

/// Clears the caller's failures and writes the audit event; returns what
/// to tell the operator.
pub(crate) async fn reset(config: &Config, identity: &str) -> Result<String, LockoutError> {
    let key = resolve(config, identity)?;
    let cleared = store(config)?
        .reset(&key)
        .await
        .map_err(|e| LockoutError::Store(format!("{e}: {}", crate::error::chain(&e))))?;
    let operator = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_default();
    tracing::info!(
        target: telemetry::AUDIT_TARGET,
        action = "lockout_reset",
        caller = key.as_str(),
        failures_cleared = cleared,
        operator = operator.as_str(),
        host = hostname().as_str(),
        "failed-attempt record reset"
    );
    Ok(format!(
        "{key}: cleared {cleared} failed attempt(s); attempts in flight keep their reservations"
    ))
}

/// The pod or host name, for the audit event.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(callers: &str) -> Config {
        Config::parse(&format!(
            "[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n\
             [state]\nurl = \"redis://127.0.0.1:1/0\"\n{callers}"
        ))
        .expect("valid")
    }

    #[test]
    fn a_bare_name_a_dns_template_maps_is_that_dns_identity() {
        let config = config(
            r#"
            [[callers]]
            dns_name = "{svc}.apps.corp.example"
            iam_user = "app-{svc}"
            aws_profile = "app-{svc}"
            [[callers]]
            common_name = "web.apps.corp.example"
            iam_user = "legacy"
            aws_profile = "legacy"
            "#,
        );
        let key = |id: &str| resolve(&config, id).map_err(|e| e.to_string());
        assert_eq!(
            key("api.apps.corp.example"),
            Ok("dns:api.apps.corp.example".to_owned())
        );
        // Both a templated DNS identity and an exact CN: the kind must be named.
        let both = key("web.apps.corp.example").expect_err("ambiguous");
        assert!(
            both.contains("cn:web.apps.corp.example, dns:web.apps.corp.example"),
            "{both}"
        );
        assert!(
            key("a.b.apps.corp.example").is_err(),
            "a capture is one label"
        );
        assert_eq!(
            key("spiffe://corp.example/ns/a/sa/b"),
            Ok("spiffe:spiffe://corp.example/ns/a/sa/b".to_owned())
        );
    }
}
