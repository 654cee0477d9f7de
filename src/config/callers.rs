//! `[[callers]]`: who may call, recognised by which certificate attribute,
//! acting as which IAM user with which profile's key.
//!
//! Caller templates (DESIGN.md, "Templates": `{capture}`s in `spiffe_id`
//! and `dns_name`) are parsed here too, as more kinds of [`Matcher`];
//! `net::identity` resolves a certificate against them.

use std::{collections::HashSet, fmt};

use toml::{Table, Value};

use super::{
    keys::{KeySource, is_iam_user_name},
    problems::Problems,
};
use crate::spiffe;

/// The keys of a `[[callers]]` entry.
pub(super) const KEYS: &[&str] = &[
    "spiffe_id",
    "dns_name",
    "common_name",
    "iam_user",
    "aws_profile",
];

/// One `[[callers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallerSettings {
    /// How the caller's certificate is recognised.
    pub matcher: Matcher,
    /// The IAM user this caller acts as.
    pub iam_user: String,
    /// The shared-config profile holding that user's access key (source
    /// `profiles`); `None` with Secrets Manager, where the key is found by
    /// `iam_user`.
    pub aws_profile: Option<String>,
}

/// Longest DNS SAN or CN a certificate may present (a DNS name is at most
/// 253 bytes): a `dns_name` or `common_name` longer than this could never
/// match, and a certificate with one is refused at the handshake.
pub(crate) const MAX_NAME_LEN: usize = 255;

/// The one certificate attribute a caller is recognised by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Matcher {
    /// The certificate's only URI SAN.
    SpiffeId(String),
    /// Any DNS SAN.
    DnsName(String),
    /// The subject common name.
    CommonName(String),
}

impl Matcher {
    /// The kind and value together, as the state store keys a caller by
    /// (DESIGN.md: "keyed by the matcher's kind and value together"). A
    /// templated caller (to come) keys by the identity it resolved to, in
    /// the same form.
    pub(crate) fn state_key(&self) -> String {
        match self {
            Self::SpiffeId(v) => format!("spiffe:{v}"),
            Self::DnsName(v) => format!("dns:{v}"),
            Self::CommonName(v) => format!("cn:{v}"),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SpiffeId(v) => write!(f, "spiffe_id {v:?}"),
            Self::DnsName(v) => write!(f, "dns_name {v:?}"),
            Self::CommonName(v) => write!(f, "common_name {v:?}"),
        }
    }
}

pub(super) fn parse(p: &mut Problems, root: &Table, source: KeySource) -> Vec<CallerSettings> {
    let mut seen = HashSet::new();
    let mut callers = Vec::new();
    for (i, entry) in entries(p, root).iter().enumerate() {
        let path = format!("callers[{i}]");
        let Value::Table(t) = entry else {
            p.push(format!("{path}: expected a table"));
            continue;
        };
        p.unknown_keys(t, &format!("{path}."), KEYS);
        if let Some(caller) = caller(p, &path, t, source, &mut seen, &callers) {
            callers.push(caller);
        }
    }
    callers
}

/// The `[[callers]]` entries; none is a problem (everyone would be denied).
fn entries<'a>(p: &mut Problems, root: &'a Table) -> &'a [Value] {
    match root.get("callers") {
        None => {
            p.push("callers: no [[callers]] entries; every caller would be denied".to_owned());
            &[]
        }
        Some(Value::Array(entries)) => entries,
        Some(other) => {
            p.push(format!(
                "callers: expected an array of tables ([[callers]]), found {}",
                other.type_str()
            ));
            &[]
        }
    }
}

/// One entry, checked against the entries before it: its identity must be
/// new, and its profile must not already hold another IAM user's key.
fn caller(
    p: &mut Problems,
    path: &str,
    t: &Table,
    source: KeySource,
    seen: &mut HashSet<Matcher>,
    before: &[CallerSettings],
) -> Option<CallerSettings> {
    let matchers = matchers(p, path, t)?;
    let iam_user = p.required_string(t, path, "iam_user");
    let aws_profile = profile(p, path, t, source, iam_user.as_deref());
    let matcher = only_matcher(p, path, matchers)?;
    if !seen.insert(matcher.clone()) {
        p.push(format!(
            "{path}: duplicate identity {matcher}: each identity maps to exactly one IAM user"
        ));
        return None;
    }
    let (iam_user, aws_profile) = (iam_user?, aws_profile?);
    // A profile holds one user's key: two users on one profile means one
    // caller would act as the other's IAM user.
    if let Some(first) = before
        .iter()
        .find(|c| aws_profile.is_some() && c.aws_profile == aws_profile && c.iam_user != iam_user)
    {
        let aws_profile = aws_profile.unwrap_or_default();
        p.push(format!(
            "{path}: aws_profile {aws_profile:?} is already the profile of iam_user {:?}; \
             a profile holds one IAM user's key, so it cannot act as {iam_user:?} too",
            first.iam_user
        ));
        return None;
    }
    Some(CallerSettings {
        matcher,
        iam_user,
        aws_profile,
    })
}

/// `aws_profile`, as the key source wants it: required for `profiles`,
/// absent for Secrets Manager (the key is the secret of `iam_user`, which
/// must then be a valid IAM user name, as it names the secret). `None`:
/// a problem was reported; `Some(None)`: no profile, rightly.
fn profile(
    p: &mut Problems,
    path: &str,
    t: &Table,
    source: KeySource,
    iam_user: Option<&str>,
) -> Option<Option<String>> {
    match source {
        KeySource::Profiles => p.required_string(t, path, "aws_profile").map(Some),
        KeySource::SecretsManager => {
            if t.contains_key("aws_profile") {
                p.push(format!(
                    "{path}.aws_profile: not used with keys.source = \"secretsmanager\" (the key \
                     is the secret of iam_user); remove it"
                ));
                return None;
            }
            if let Some(user) = iam_user.filter(|u| !is_iam_user_name(u)) {
                p.push(format!(
                    "{path}.iam_user: {user:?} is not an IAM user name ([A-Za-z0-9+=,.@_-], \
                     1 to 64 characters)"
                ));
                return None;
            }
            Some(None)
        }
    }
}

/// Every matcher the entry sets; `None` when its `spiffe_id` breaks the
/// SPIFFE-ID rules (reported with the rule).
fn matchers(p: &mut Problems, path: &str, t: &Table) -> Option<Vec<Matcher>> {
    let mut matchers = Vec::new();
    if let Some(v) = p.value::<String>(t, path, "spiffe_id") {
        if let Err(why) = spiffe::validate(&v) {
            p.push(format!(
                "{path}.spiffe_id: {v:?} is not a SPIFFE ID (spiffe://trust-domain/path): {why}"
            ));
            return None;
        }
        matchers.push(Matcher::SpiffeId(v));
    }
    if let Some(v) = p.value::<String>(t, path, "dns_name") {
        matchers.push(Matcher::DnsName(v));
    }
    if let Some(v) = p.value::<String>(t, path, "common_name") {
        matchers.push(Matcher::CommonName(v));
    }
    Some(matchers)
}

/// The entry's one matcher, with a name a certificate could present.
fn only_matcher(p: &mut Problems, path: &str, mut matchers: Vec<Matcher>) -> Option<Matcher> {
    if matchers.len() != 1 {
        p.push(format!(
            "{path}: needs exactly one of spiffe_id, dns_name, common_name (found {})",
            matchers.len()
        ));
        return None;
    }
    let matcher = matchers.remove(0);
    if let Matcher::DnsName(v) | Matcher::CommonName(v) = &matcher {
        if v.trim().is_empty() {
            p.push(format!("{path}: identity must not be empty"));
            return None;
        }
        if v.len() > MAX_NAME_LEN {
            p.push(format!(
                "{path}: identity longer than {MAX_NAME_LEN} bytes can never match a certificate"
            ));
            return None;
        }
    }
    Some(matcher)
}
