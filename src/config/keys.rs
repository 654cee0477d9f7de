//! `[keys]`: where each IAM user's access key lives (the callers'
//! profiles, or one AWS Secrets Manager secret per IAM user), and how
//! credgate ages and rotates the keys it holds.

use std::time::Duration;

use toml::Table;

use super::{
    problems::{Problems, set},
    templates::is_iam_user_name,
};

/// The keys of `[keys]`.
pub(super) const KEYS: &[&str] = &[
    "source",
    "secret_name",
    "refresh",
    "rotate_after",
    "old_key_grace",
    "warn_key_age",
];

/// The keys that mean something only with the Secrets Manager source.
const SECRETS_MANAGER_ONLY: &[&str] = &["secret_name", "refresh", "rotate_after", "old_key_grace"];

/// The placeholder of `secret_name`.
const PLACEHOLDER: &str = "{iam_user}";

/// Longest Secrets Manager secret name.
const MAX_SECRET_NAME: usize = 512;

/// Where the access keys come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// Each caller's `aws_profile` in the AWS shared files.
    Profiles,
    /// One Secrets Manager secret per IAM user, read with credgate's own
    /// AWS identity.
    SecretsManager,
}

impl KeySource {
    /// As written in the configuration and reported by `keys status`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Profiles => "profiles",
            Self::SecretsManager => "secretsmanager",
        }
    }
}

/// `secret_name`: a name with one `{iam_user}`, split around it, so that a
/// user's secret can be named and a listed secret read back as its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SecretName {
    prefix: String,
    suffix: String,
}

impl SecretName {
    /// The secret of `iam_user`; `None` when that name is no valid secret
    /// name (IAM allows `,` in user names, Secrets Manager does not).
    pub(crate) fn of(&self, iam_user: &str) -> Option<String> {
        let name = format!("{}{iam_user}{}", self.prefix, self.suffix);
        (is_iam_user_name(iam_user) && is_secret_name(&name)).then_some(name)
    }

    /// The IAM user whose secret `name` is, if it is one.
    pub(crate) fn user_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let user = name
            .strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())?;
        is_iam_user_name(user).then_some(user)
    }

    /// What every secret name starts with: the `ListSecrets` name filter.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The template as configured.
    pub(crate) fn template(&self) -> String {
        format!("{}{PLACEHOLDER}{}", self.prefix, self.suffix)
    }

    fn parse(template: &str) -> Result<Self, String> {
        let Some((prefix, suffix)) = template.split_once(PLACEHOLDER) else {
            return Err(format!("must contain {PLACEHOLDER}"));
        };
        if prefix.is_empty() {
            // ListSecrets would list the whole account, and any secret whose
            // name looks like a user name would be taken for one.
            return Err(format!(
                "needs a fixed prefix before {PLACEHOLDER} (e.g. \"credgate/{PLACEHOLDER}\")"
            ));
        }
        let fixed = format!("{prefix}{suffix}");
        if fixed.contains(['{', '}']) {
            return Err(format!(
                "may contain {PLACEHOLDER} once and no other braces"
            ));
        }
        if !is_secret_name(&fixed) {
            return Err(
                "may contain only letters, digits and /_+=.@- (Secrets Manager's characters)"
                    .to_owned(),
            );
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }
}

/// `[keys]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeySettings {
    /// Where the keys come from.
    pub source: KeySource,
    /// Secrets Manager: the secret of each IAM user.
    pub secret_name: SecretName,
    /// Secrets Manager: a cached key is at most this stale.
    pub refresh: Duration,
    /// Secrets Manager: replace a key once it is this old; `None`: never.
    pub rotate_after: Option<Duration>,
    /// After a new key is promoted: how long the old one stays active.
    pub old_key_grace: Duration,
    /// Any source: a key older than this is reported.
    pub warn_key_age: Duration,
}

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            source: KeySource::Profiles,
            secret_name: SecretName {
                prefix: "credgate/".to_owned(),
                suffix: String::new(),
            },
            refresh: Duration::from_secs(60),
            rotate_after: Some(30 * DAY),
            old_key_grace: Duration::from_secs(10 * 60),
            warn_key_age: 90 * DAY,
        }
    }
}

pub(super) fn parse(p: &mut Problems, root: &Table) -> KeySettings {
    let mut s = KeySettings::default();
    let Some(t) = p.section(root, "keys", KEYS) else {
        return s;
    };
    set(&mut s.source, source(p, t));
    if s.source == KeySource::Profiles {
        for key in SECRETS_MANAGER_ONLY.iter().filter(|k| t.contains_key(**k)) {
            p.push(format!(
                "keys.{key}: applies to source \"secretsmanager\" only (source is \"profiles\")"
            ));
        }
    }
    if let Some(template) = p.value::<String>(t, "keys", "secret_name") {
        match SecretName::parse(&template) {
            Ok(name) => s.secret_name = name,
            Err(why) => p.push(format!("keys.secret_name: {template:?} {why}")),
        }
    }
    set(&mut s.refresh, p.duration(t, "keys", "refresh"));
    set(&mut s.rotate_after, rotate_after(p, t));
    set(&mut s.old_key_grace, p.duration(t, "keys", "old_key_grace"));
    set(&mut s.warn_key_age, p.duration(t, "keys", "warn_key_age"));
    if s.source == KeySource::SecretsManager {
        check_timing(p, &s);
    }
    s
}

fn source(p: &mut Problems, t: &Table) -> Option<KeySource> {
    let text: String = p.value(t, "keys", "source")?;
    match text.as_str() {
        "profiles" => Some(KeySource::Profiles),
        "secretsmanager" => Some(KeySource::SecretsManager),
        other => {
            p.push(format!(
                "keys.source: {other:?} is not \"profiles\" or \"secretsmanager\""
            ));
            None
        }
    }
}

/// `rotate_after`: a duration, where `"0s"` means never.
fn rotate_after(p: &mut Problems, t: &Table) -> Option<Option<Duration>> {
    let text: String = p.value(t, "keys", "rotate_after")?;
    match humantime::parse_duration(&text) {
        Ok(d) if d.is_zero() => Some(None),
        Ok(d) => Some(Some(d)),
        Err(e) => {
            p.push(format!(
                "keys.rotate_after: {text:?} is not a duration like \"30d\" (\"0s\": never): {e}"
            ));
            None
        }
    }
}

/// The rules between the durations that keep every caller on a working key.
fn check_timing(p: &mut Problems, s: &KeySettings) {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    // Another replica may hold the old key for up to `refresh` after the new
    // one is promoted: the old key must outlive every cached copy.
    if s.old_key_grace < 2 * s.refresh {
        p.push(format!(
            "keys.old_key_grace ({}) must be at least twice keys.refresh ({}): every replica \
             reads the new key within refresh, and the old one must still work until then",
            show(s.old_key_grace),
            show(s.refresh)
        ));
    }
    if let Some(rotate_after) = s.rotate_after
        && rotate_after <= s.old_key_grace
    {
        p.push(format!(
            "keys.rotate_after ({}) must be longer than keys.old_key_grace ({}), or \"0s\" \
             (never): a rotation ends only once the old key is gone",
            show(rotate_after),
            show(s.old_key_grace)
        ));
    }
}

/// A Secrets Manager secret name: `[A-Za-z0-9/_+=.@-]{1,512}`.
fn is_secret_name(name: &str) -> bool {
    (1..=MAX_SECRET_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+=.@-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_name_is_built_from_and_read_back_as_its_user() {
        let name = SecretName::parse("credgate/{iam_user}/key").expect("valid");
        assert_eq!(
            name.of("portal-svc").as_deref(),
            Some("credgate/portal-svc/key")
        );
        assert_eq!(name.user_of("credgate/portal-svc/key"), Some("portal-svc"));
        assert_eq!(name.prefix(), "credgate/");
        assert_eq!(name.template(), "credgate/{iam_user}/key");
        // Not of this template, or no user name inside.
        for other in [
            "credgate/portal-svc",
            "other/portal-svc/key",
            "credgate//key",
            "credgate/a/b/key",
        ] {
            assert_eq!(name.user_of(other), None, "{other}");
        }
        // A user name Secrets Manager cannot hold has no secret.
        assert_eq!(name.of("a,b"), None);
        assert_eq!(name.of(&"x".repeat(65)), None);
    }

    #[test]
    fn bad_secret_name_templates_say_why() {
        for (template, why) in [
            ("credgate/user", "must contain {iam_user}"),
            ("{iam_user}", "fixed prefix"),
            ("credgate/{iam_user}/{iam_user}", "no other braces"),
            ("credgate/{other}/{iam_user}", "no other braces"),
            ("credgate key/{iam_user}", "Secrets Manager's characters"),
        ] {
            let err = SecretName::parse(template).expect_err(template);
            assert!(err.contains(why), "{template}: {err}");
        }
    }
}
