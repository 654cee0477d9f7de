//! Configuration: parse the TOML file, validate every setting, and report all
//! problems at once.
//!
//! Parsing walks the TOML tree by hand instead of deriving `Deserialize` so
//! that one run lists every unknown key, bad value and missing section rather
//! than stopping at the first, as serde would. Each section has its file,
//! with its settings type, its keys and its parser; [`problems`] is the
//! reader they share.

mod aws;
mod callers;
mod keys;
mod limits;
mod problems;
mod server;
mod state;
mod telemetry;
mod templates;
#[cfg(test)]
mod tests;
mod tls;

use std::path::Path;

use toml::Table;

pub(crate) use aws::AwsSettings;
pub(crate) use callers::{CallerSettings, MAX_NAME_LEN, Matcher};
pub(crate) use keys::{KeySettings, KeySource, SecretName};
pub(crate) use limits::LimitSettings;
use problems::Problems;
pub(crate) use server::ServerSettings;
pub(crate) use state::{REDIS_PASSWORD_ENV, RedisSettings, StateBackend, StateSettings, Topology};
pub(crate) use telemetry::{LogFormat, TelemetrySettings};
pub(crate) use templates::{
    Built, CAPTURE_RULE, CallerTemplate, IAM_USER_RULE, Miss, Position, TemplateKind,
    is_iam_user_name, split,
};
pub(crate) use tls::TlsSettings;

/// Every section and the keys the parser knows in it. Anything else is an
/// error, and `docs/configuration.md` lists exactly these (`tests`).
pub(crate) const SECTIONS: &[(&str, &[&str])] = &[
    ("server", server::KEYS),
    ("tls", tls::KEYS),
    ("aws", aws::KEYS),
    ("limits", limits::KEYS),
    ("state", state::KEYS),
    ("telemetry", telemetry::KEYS),
    ("keys", keys::KEYS),
    ("callers", callers::KEYS),
];

/// Environment variable naming the config file when `--config` is absent.
pub(crate) const CONFIG_ENV: &str = "CREDGATE_CONFIG";

/// The validated configuration.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Listeners, deadlines and drain budget.
    pub server: ServerSettings,
    /// Server certificate, client CA and optional CRL.
    pub tls: TlsSettings,
    /// How IAM is reached.
    pub aws: AwsSettings,
    /// Brute-force protection for the old password.
    pub limits: LimitSettings,
    /// Where the attempt counters and `request_id` outcomes live.
    pub state: StateSettings,
    /// Log format.
    pub telemetry: TelemetrySettings,
    /// Where the IAM users' access keys live, and their age and rotation.
    pub keys: KeySettings,
    /// Caller identities and the IAM users they act as: the exact entries
    /// (every part of credgate that lists callers or profiles reads these).
    pub callers: Vec<CallerSettings>,
    /// The templated entries, each mapping a family of identities.
    pub templates: Vec<CallerTemplate>,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} configuration problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
pub(crate) struct ConfigError {
    /// One human-readable line per problem, naming the key.
    pub problems: Vec<String>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("cannot read {}: {e}", path.display())],
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub(crate) fn parse(text: &str) -> Result<Self, ConfigError> {
        let root: Table = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![format!("not valid TOML: {}", e.message())],
        })?;
        let mut p = Problems::default();
        let sections: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
        p.unknown_keys(&root, "", &sections);
        let server = server::parse(&mut p, &root);
        let tls = tls::parse(&mut p, &root);
        let aws = aws::parse(&mut p, &root);
        let limits = limits::parse(&mut p, &root);
        let state = state::parse(&mut p, &root);
        let telemetry = telemetry::parse(&mut p, &root);
        let keys = keys::parse(&mut p, &root);
        let (callers, templates) = callers::parse(&mut p, &root, keys.source);
        match tls {
            Some(tls) if p.0.is_empty() => Ok(Self {
                server,
                tls,
                aws,
                limits,
                state,
                telemetry,
                keys,
                callers,
                templates,
            }),
            _ => Err(ConfigError { problems: p.0 }),
        }
    }
}
