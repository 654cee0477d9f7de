//! `[telemetry]`: the log format (export is set by the `OTEL_*` variables).

use toml::Table;

use super::problems::Problems;

/// The keys of `[telemetry]`.
pub(super) const KEYS: &[&str] = &["log_format"];

/// `[telemetry]`
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TelemetrySettings {
    /// How log lines are written.
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> TelemetrySettings {
    let mut s = TelemetrySettings::default();
    let Some(t) = p.section(root, "telemetry", KEYS) else {
        return s;
    };
    match p.value::<String>(t, "telemetry", "log_format").as_deref() {
        None | Some("json") => {}
        Some("text") => s.log_format = LogFormat::Text,
        Some(other) => p.push(format!(
            "telemetry.log_format: {other:?} is not \"json\" or \"text\""
        )),
    }
    s
}
