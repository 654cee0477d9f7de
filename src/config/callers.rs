//! `[[callers]]`: who may call, recognised by which certificate attribute,
//! acting as which IAM user with which profile's key.
//!
//! An entry whose `spiffe_id` or `dns_name` holds `{captures}` is a
//! template ([`templates`](super::templates)): it is checked here — its
//! syntax, its names, and that no two templates could match one identity —
//! and kept apart from the exact entries, which every other part of
//! credgate reads as before. `net::identity` resolves a certificate
//! against both, exact entries first.

use std::{
    collections::{HashMap, HashSet},
    fmt,
};

use toml::{Table, Value};

use super::{
    keys::KeySource,
    problems::Problems,
    templates::{
        self, CallerTemplate, IdentityTemplate, NameTemplate, Position, TemplateKind,
        is_iam_user_name,
    },
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
    /// Its index in `[[callers]]`, for messages, logs and audit.
    pub entry: usize,
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
    /// templated caller keys by the identity it resolved to, in the same
    /// form.
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

/// The entries: exact ones, and templates.
pub(super) fn parse(
    p: &mut Problems,
    root: &Table,
    source: KeySource,
) -> (Vec<CallerSettings>, Vec<CallerTemplate>) {
    let mut seen = Seen::default();
    let mut callers = Vec::new();
    let mut templates = Vec::new();
    for (i, entry) in entries(p, root).iter().enumerate() {
        let path = format!("callers[{i}]");
        let Value::Table(t) = entry else {
            p.push(format!("{path}: expected a table"));
            continue;
        };
        p.unknown_keys(t, &format!("{path}."), KEYS);
        match caller(p, &path, i, t, source, &mut seen) {
            Some(Entry::Exact(caller)) => callers.push(caller),
            Some(Entry::Template(template)) => templates.push(template),
            None => {}
        }
    }
    overlapping(p, &templates);
    (callers, templates)
}

/// What the entries before this one took: identities, and each profile's
/// IAM user (hashed: 10,000 entries are checked in linear time).
#[derive(Default)]
struct Seen {
    identities: HashSet<Matcher>,
    profiles: HashMap<String, String>,
}

enum Entry {
    Exact(CallerSettings),
    Template(CallerTemplate),
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
    index: usize,
    t: &Table,
    source: KeySource,
    seen: &mut Seen,
) -> Option<Entry> {
    let matchers = matchers(p, path, t)?;
    let iam_user = p.required_string(t, path, "iam_user");
    let aws_profile = profile(p, path, t, source);
    let matcher = only_matcher(p, path, matchers)?;
    if let Some(kind) = template_kind(p, path, &matcher)? {
        return template(p, path, index, kind, &matcher, iam_user?, aws_profile?)
            .map(Entry::Template);
    }
    if !seen.identities.insert(matcher.clone()) {
        p.push(format!(
            "{path}: duplicate identity {matcher}: each identity maps to exactly one IAM user"
        ));
        return None;
    }
    let (iam_user, aws_profile) = (iam_user?, aws_profile?);
    let Some(aws_profile) = aws_profile else {
        // Secrets Manager: the user names its secret.
        if !is_iam_user_name(&iam_user) {
            p.push(format!(
                "{path}.iam_user: {iam_user:?} is not an IAM user name ([A-Za-z0-9+=,.@_-], \
                 1 to 64 characters)"
            ));
            return None;
        }
        return Some(Entry::Exact(CallerSettings {
            matcher,
            iam_user,
            aws_profile: None,
            entry: index,
        }));
    };
    // A profile holds one user's key: two users on one profile means one
    // caller would act as the other's IAM user.
    match seen.profiles.get(&aws_profile) {
        Some(first) if *first != iam_user => {
            p.push(format!(
                "{path}: aws_profile {aws_profile:?} is already the profile of iam_user {first:?}; \
                 a profile holds one IAM user's key, so it cannot act as {iam_user:?} too"
            ));
            return None;
        }
        Some(_) => {}
        None => {
            seen.profiles.insert(aws_profile.clone(), iam_user.clone());
        }
    }
    Some(Entry::Exact(CallerSettings {
        matcher,
        iam_user,
        aws_profile: Some(aws_profile),
        entry: index,
    }))
}

/// `aws_profile`, as the key source wants it: required for `profiles`,
/// absent for Secrets Manager (the key is the secret of `iam_user`).
/// `None`: a problem was reported; `Some(None)`: no profile, rightly.
fn profile(p: &mut Problems, path: &str, t: &Table, source: KeySource) -> Option<Option<String>> {
    match source {
        KeySource::Profiles => p.required_string(t, path, "aws_profile").map(Some),
        KeySource::SecretsManager if t.contains_key("aws_profile") => {
            p.push(format!(
                "{path}.aws_profile: not used with keys.source = \"secretsmanager\" (the key \
                 is the secret of iam_user); remove it"
            ));
            None
        }
        KeySource::SecretsManager => Some(None),
    }
}

/// Which template kind the matcher's value is, `Some(None)` when it is no
/// template; `None` for template syntax where there are no templates.
fn template_kind(p: &mut Problems, path: &str, matcher: &Matcher) -> Option<Option<TemplateKind>> {
    match matcher {
        Matcher::SpiffeId(v) if templates::is_template(v) => Some(Some(TemplateKind::SpiffeId)),
        Matcher::DnsName(v) if templates::is_template(v) => Some(Some(TemplateKind::DnsName)),
        Matcher::CommonName(v) if templates::is_template(v) => {
            p.push(format!(
                "{path}.common_name: {v:?}: common_name has no templates ('{{' and '}}' are \
                 template syntax); a family of callers is a spiffe_id or dns_name template"
            ));
            None
        }
        _ => Some(None),
    }
}

/// A templated entry: its identity template, and the names it builds.
fn template(
    p: &mut Problems,
    path: &str,
    entry: usize,
    kind: TemplateKind,
    matcher: &Matcher,
    iam_user: String,
    aws_profile: Option<String>,
) -> Option<CallerTemplate> {
    let (Matcher::SpiffeId(text) | Matcher::DnsName(text) | Matcher::CommonName(text)) = matcher;
    let key = kind.key();
    let identity = IdentityTemplate::parse(kind, text)
        .map_err(|problems| {
            for problem in problems {
                p.push(format!("{path}.{key}: template {text:?} {problem}"));
            }
        })
        .ok()?;
    let mut name = |field: &str, value: &str| {
        NameTemplate::parse(value, identity.capture_names())
            .map_err(|problems| {
                for problem in problems {
                    p.push(format!("{path}.{field}: {value:?} {problem}"));
                }
            })
            .ok()
    };
    let iam_user = name("iam_user", &iam_user);
    let aws_profile = match aws_profile {
        Some(profile) => Some(name("aws_profile", &profile)?),
        None => None,
    };
    let iam_user = iam_user?;
    let mut ok = true;
    if let Some(why) = iam_user.never_an_iam_user() {
        p.push(format!(
            "{path}.iam_user: {:?} can never be a valid IAM user name: {why}",
            iam_user.text
        ));
        ok = false;
    }
    // One profile holds one user's key: whatever tells two users apart
    // must tell their profiles apart too.
    let unused: Vec<&str> = match &aws_profile {
        Some(profile) => iam_user
            .capture_names()
            .filter(|c| !profile.capture_names().any(|d| d == *c))
            .collect(),
        None => Vec::new(),
    };
    if let (Some(aws_profile), false) = (&aws_profile, unused.is_empty()) {
        p.push(format!(
            "{path}.aws_profile: {:?} must use every capture iam_user uses (missing {}): \
             a profile holds one IAM user's key",
            aws_profile.text,
            unused
                .iter()
                .map(|c| format!("{{{c}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        ok = false;
    }
    ok.then_some(CallerTemplate {
        entry,
        identity,
        iam_user,
        aws_profile,
    })
}

/// Two templates that could both match one identity would leave it to the
/// order of the file which IAM user that identity acts as: refused, each
/// pair with an identity both match. Only templates of one kind, trust
/// domain and length can overlap; within such a group a trie of their
/// positions finds the pairs without comparing every template with every
/// other (10,000 templates of a family are checked in about linear time).
fn overlapping(p: &mut Problems, templates: &[CallerTemplate]) {
    let mut groups: HashMap<(TemplateKind, &str, usize), Trie> = HashMap::new();
    for (i, t) in templates.iter().enumerate() {
        let id = &t.identity;
        groups
            .entry((id.kind, id.anchor.as_str(), id.positions.len()))
            .or_default()
            .insert(&id.positions, i);
    }
    let mut pairs = Vec::new();
    for (i, t) in templates.iter().enumerate() {
        let id = &t.identity;
        if let Some(trie) = groups.get(&(id.kind, id.anchor.as_str(), id.positions.len())) {
            trie.earlier_overlaps(&id.positions, i, &mut pairs);
        }
        if pairs.len() > MAX_OVERLAPS_REPORTED {
            break;
        }
    }
    pairs.sort_unstable();
    pairs.dedup();
    for &(later, earlier) in pairs.iter().take(MAX_OVERLAPS_REPORTED) {
        let (a, b) = (&templates[later], &templates[earlier]);
        let witness = a.identity.overlap(&b.identity).unwrap_or_default();
        p.push(format!(
            "callers[{}]: template {:?} and callers[{}]'s template {:?} could both match one \
             identity (e.g. {witness:?}); templates must not overlap",
            a.entry, a.identity.text, b.entry, b.identity.text
        ));
    }
    if pairs.len() > MAX_OVERLAPS_REPORTED {
        p.push(format!(
            "callers: more overlapping templates than the {MAX_OVERLAPS_REPORTED} pairs above"
        ));
    }
}

/// Overlapping pairs listed before the rest is summed up in one line.
const MAX_OVERLAPS_REPORTED: usize = 100;

/// Templates of one group by their positions: a literal value or "a
/// capture" at each level.
#[derive(Default)]
struct Trie {
    literals: HashMap<String, Trie>,
    capture: Option<Box<Trie>>,
    /// Templates whose positions end here.
    ends: Vec<usize>,
}

impl Trie {
    fn insert(&mut self, positions: &[Position], template: usize) {
        let Some((first, rest)) = positions.split_first() else {
            self.ends.push(template);
            return;
        };
        let next = match first {
            Position::Literal(l) => self.literals.entry(l.clone()).or_default(),
            Position::Capture(_) => self.capture.get_or_insert_with(Box::default),
        };
        next.insert(rest, template);
    }

    /// Adds `(template, other)` for every `other` before `template` that
    /// could match an identity `positions` matches: at each level, an
    /// equal literal, a capture, or a literal the capture could take.
    fn earlier_overlaps(
        &self,
        positions: &[Position],
        template: usize,
        out: &mut Vec<(usize, usize)>,
    ) {
        if out.len() > MAX_OVERLAPS_REPORTED {
            return;
        }
        let Some((first, rest)) = positions.split_first() else {
            out.extend(
                self.ends
                    .iter()
                    .filter(|&&other| other < template)
                    .map(|&other| (template, other)),
            );
            return;
        };
        let capture = self.capture.as_deref();
        match first {
            Position::Literal(l) => {
                if let Some(next) = self.literals.get(l) {
                    next.earlier_overlaps(rest, template, out);
                }
                if let Some(next) = capture.filter(|_| templates::is_capture(l)) {
                    next.earlier_overlaps(rest, template, out);
                }
            }
            Position::Capture(_) => {
                if let Some(next) = capture {
                    next.earlier_overlaps(rest, template, out);
                }
                for (l, next) in &self.literals {
                    if templates::is_capture(l) {
                        next.earlier_overlaps(rest, template, out);
                    }
                }
            }
        }
    }
}

/// Every matcher the entry sets; `None` when its `spiffe_id` breaks the
/// SPIFFE-ID rules (reported with the rule). A template is checked by its
/// own rules later.
fn matchers(p: &mut Problems, path: &str, t: &Table) -> Option<Vec<Matcher>> {
    let mut matchers = Vec::new();
    if let Some(v) = p.value::<String>(t, path, "spiffe_id") {
        if !templates::is_template(&v)
            && let Err(why) = spiffe::validate(&v)
        {
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
