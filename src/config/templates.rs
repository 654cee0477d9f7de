//! Caller templates (DESIGN.md, "Templates"): one `[[callers]]` entry for a
//! whole family of workloads.
//!
//! A `spiffe_id` template captures whole path segments
//! (`spiffe://corp.example/ns/{ns}/sa/{sa}`), a `dns_name` template whole
//! leading labels (`{svc}.apps.corp.example`); `iam_user` and `aws_profile`
//! are built from the captures. Matching is by position: an identity
//! matches when it has the template's trust domain and exactly as many
//! segments (labels), every literal position is equal, and every captured
//! one is a value of [`is_capture`]. A capture is one whole segment or
//! label, so it never spans a `/` or a `.`; there is no glob.
//!
//! Everything here is pure: `net::identity` indexes the templates and
//! resolves certificates with them, `check-config --explain` and
//! `lockout --caller` read identities with the same functions.

use std::{fmt, sync::Arc};

/// Longest value a capture takes (one DNS label's limit).
pub(crate) const CAPTURE_MAX_LEN: usize = 63;
/// Longest IAM user name.
pub(crate) const IAM_USER_MAX_LEN: usize = 64;
/// The characters a capture may hold, as a sentence for messages.
pub(crate) const CAPTURE_RULE: &str = "[A-Za-z0-9._-]{1,63}";
/// The rule for IAM user names, as a sentence for messages.
pub(crate) const IAM_USER_RULE: &str = "[A-Za-z0-9+=,.@_-]{1,64}";

const SPIFFE_SCHEME: &str = "spiffe://";

/// Whether `value` may be captured: `[A-Za-z0-9._-]{1,63}`.
pub(crate) fn is_capture(value: &str) -> bool {
    (1..=CAPTURE_MAX_LEN).contains(&value.len()) && value.chars().all(is_capture_char)
}

fn is_capture_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Whether `name` is a valid IAM user name: `[A-Za-z0-9+=,.@_-]{1,64}`.
pub(crate) fn is_iam_user_name(name: &str) -> bool {
    (1..=IAM_USER_MAX_LEN).contains(&name.len()) && name.chars().all(is_iam_user_char)
}

fn is_iam_user_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '=' | ',' | '.' | '@' | '_' | '-')
}

/// Whether a `spiffe_id`, `dns_name` or `common_name` value uses template
/// syntax at all (a `{` or a `}`).
pub(crate) fn is_template(value: &str) -> bool {
    value.contains(['{', '}'])
}

/// The two matchers that have templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum TemplateKind {
    /// `spiffe_id`: captures are path segments.
    SpiffeId,
    /// `dns_name`: captures are leading labels.
    DnsName,
}

impl TemplateKind {
    /// The config key.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Self::SpiffeId => "spiffe_id",
            Self::DnsName => "dns_name",
        }
    }
}

/// One path segment or DNS label of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Position {
    /// Must be equal, byte for byte.
    Literal(String),
    /// Takes the identity's value at this position, by name.
    Capture(String),
}

/// Splits an identity into its anchor (a SPIFFE ID's trust domain; nothing
/// for a DNS name) and its positions (path segments; labels). `None` for a
/// `spiffe_id` that does not start with `spiffe://`. A SPIFFE ID must have
/// been validated first (no empty or dot segments).
pub(crate) fn split(kind: TemplateKind, identity: &str) -> Option<(&str, Vec<&str>)> {
    match kind {
        TemplateKind::SpiffeId => {
            let rest = identity.strip_prefix(SPIFFE_SCHEME)?;
            Some(match rest.split_once('/') {
                Some((trust_domain, path)) => (trust_domain, path.split('/').collect()),
                None => (rest, Vec::new()),
            })
        }
        TemplateKind::DnsName => Some(("", identity.split('.').collect())),
    }
}

/// A `spiffe_id` or `dns_name` template, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IdentityTemplate {
    /// Which matcher.
    pub kind: TemplateKind,
    /// As configured, for messages, logs and audit (shared by every
    /// caller it resolves).
    pub text: Arc<str>,
    /// A SPIFFE template's trust domain (never a capture); empty for DNS.
    pub anchor: String,
    /// Segments or labels, in order.
    pub positions: Vec<Position>,
}

/// Why an identity with a template's shape is still not matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Miss {
    /// Another trust domain, count of positions, or literal.
    Shape,
    /// Every literal is equal, but a captured value is not one of
    /// [`is_capture`]'s (too long, or a character outside the set).
    Capture {
        /// The capture's name.
        name: String,
        /// What the identity had there.
        value: String,
    },
}

/// Captured values by name, in the template's order.
pub(crate) type Captures = Vec<(String, String)>;

impl IdentityTemplate {
    /// Parses `text`, a value of `kind` that [`is_template`]; every
    /// problem is returned, each as a sentence.
    pub(crate) fn parse(kind: TemplateKind, text: &str) -> Result<Self, Vec<String>> {
        match kind {
            TemplateKind::SpiffeId => Self::parse_spiffe(text),
            TemplateKind::DnsName => Self::parse_dns(text),
        }
    }

    fn parse_spiffe(text: &str) -> Result<Self, Vec<String>> {
        let Some(rest) = text.strip_prefix(SPIFFE_SCHEME) else {
            return Err(vec!["must start with spiffe:// (lower case)".to_owned()]);
        };
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut problems = Vec::new();
        if is_template(trust_domain) {
            problems.push(
                "the trust domain cannot be a capture: captures are whole path segments".to_owned(),
            );
        }
        let positions = if path.is_empty() {
            Vec::new()
        } else {
            positions(path.split('/'), "path segment", &mut problems)
        };
        if problems.is_empty() {
            // Every literal part by the SPIFFE-ID rules: each capture
            // stands in as a value it could take.
            let probe = probe(trust_domain, &positions);
            if let Err(why) = crate::spiffe::validate(&probe) {
                problems.push(format!("is not a SPIFFE ID once captured: {why}"));
            }
        }
        finish(
            TemplateKind::SpiffeId,
            text,
            trust_domain,
            positions,
            problems,
        )
    }

    fn parse_dns(text: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let positions = positions(text.split('.'), "label", &mut problems);
        if let Some(literal) = positions
            .iter()
            .position(|p| matches!(p, Position::Literal(_)))
        {
            if positions[literal..]
                .iter()
                .any(|p| matches!(p, Position::Capture(_)))
            {
                problems.push(
                    "captures must be the leading labels ({svc}.apps.corp.example), \
                     followed only by literal labels"
                        .to_owned(),
                );
            }
        } else if problems.is_empty() {
            problems.push(
                "needs a literal DNS suffix after its captures ({svc}.apps.corp.example)"
                    .to_owned(),
            );
        }
        if positions
            .iter()
            .any(|p| matches!(p, Position::Literal(l) if l.is_empty()))
        {
            problems.push("has an empty label".to_owned());
        }
        finish(TemplateKind::DnsName, text, "", positions, problems)
    }

    /// The capture names, in order.
    pub(crate) fn capture_names(&self) -> impl Iterator<Item = &str> + Clone {
        self.positions.iter().filter_map(|p| match p {
            Position::Capture(name) => Some(name.as_str()),
            Position::Literal(_) => None,
        })
    }

    /// Matches an identity already [`split`]: its captures, or why not.
    pub(crate) fn captures(&self, anchor: &str, values: &[&str]) -> Result<Captures, Miss> {
        if anchor != self.anchor || values.len() != self.positions.len() {
            return Err(Miss::Shape);
        }
        let mut captures = Vec::new();
        let mut bad = None;
        for (position, value) in self.positions.iter().zip(values) {
            match position {
                Position::Literal(literal) if literal != value => return Err(Miss::Shape),
                Position::Literal(_) => {}
                Position::Capture(name) if !is_capture(value) => {
                    // Keep going: a later literal may still rule the shape out.
                    bad.get_or_insert_with(|| Miss::Capture {
                        name: name.clone(),
                        value: (*value).to_owned(),
                    });
                }
                Position::Capture(name) => captures.push((name.clone(), (*value).to_owned())),
            }
        }
        match bad {
            Some(miss) => Err(miss),
            None => Ok(captures),
        }
    }

    /// Matches `identity` (a validated SPIFFE ID, or a DNS name).
    pub(crate) fn matches(&self, identity: &str) -> Result<Captures, Miss> {
        let (anchor, values) = split(self.kind, identity).ok_or(Miss::Shape)?;
        self.captures(anchor, &values)
    }

    /// An identity both templates match, if there is one: then they
    /// overlap. Exact: same kind, same trust domain, as many positions,
    /// and at every position two equal literals, two captures, or a
    /// capture and a literal the capture could take.
    pub(crate) fn overlap(&self, other: &Self) -> Option<String> {
        if self.kind != other.kind
            || self.anchor != other.anchor
            || self.positions.len() != other.positions.len()
        {
            return None;
        }
        let mut witness = Vec::new();
        for pair in self.positions.iter().zip(&other.positions) {
            let value = match pair {
                (Position::Literal(a), Position::Literal(b)) if a == b => a.as_str(),
                (Position::Literal(_), Position::Literal(_)) => return None,
                (Position::Literal(l), Position::Capture(_))
                | (Position::Capture(_), Position::Literal(l)) => {
                    if !is_capture(l) {
                        return None;
                    }
                    l.as_str()
                }
                (Position::Capture(_), Position::Capture(_)) => "x",
            };
            witness.push(value);
        }
        Some(match self.kind {
            TemplateKind::SpiffeId => {
                let path: String = witness.iter().map(|v| format!("/{v}")).collect();
                format!("{SPIFFE_SCHEME}{}{path}", self.anchor)
            }
            TemplateKind::DnsName => witness.join("."),
        })
    }
}

impl fmt::Display for IdentityTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} template {:?}", self.kind.key(), self.text)
    }
}

/// The SPIFFE ID a template's shortest match would be: each capture
/// replaced by a one-character value.
fn probe(trust_domain: &str, positions: &[Position]) -> String {
    let path: String = positions
        .iter()
        .map(|p| match p {
            Position::Literal(l) => format!("/{l}"),
            Position::Capture(_) => "/x".to_owned(),
        })
        .collect();
    format!("{SPIFFE_SCHEME}{trust_domain}{path}")
}

/// Each part as a literal or a whole `{capture}`.
fn positions<'a>(
    parts: impl Iterator<Item = &'a str>,
    what: &str,
    problems: &mut Vec<String>,
) -> Vec<Position> {
    parts
        .map(|part| {
            if !is_template(part) {
                return Position::Literal(part.to_owned());
            }
            match part
                .strip_prefix('{')
                .and_then(|p| p.strip_suffix('}'))
                .filter(|name| !is_template(name))
            {
                Some(name) if is_capture_name(name) => Position::Capture(name.to_owned()),
                Some(name) => {
                    problems.push(format!(
                        "capture name {name:?} must be letters, digits and '_'"
                    ));
                    Position::Literal(part.to_owned())
                }
                None => {
                    problems.push(unbalanced(part).unwrap_or_else(|| {
                        format!(
                            "{what} {part:?} mixes a capture with other text: \
                             a capture is a whole {what}"
                        )
                    }));
                    Position::Literal(part.to_owned())
                }
            }
        })
        .collect()
}

/// The problem with `text`'s braces, if they do not pair up.
fn unbalanced(text: &str) -> Option<String> {
    let mut open = false;
    for c in text.chars() {
        match c {
            '{' if open => return Some(format!("{text:?} opens a capture inside a capture")),
            '{' => open = true,
            '}' if !open => return Some(format!("{text:?} has a '}}' that closes nothing")),
            '}' => open = false,
            _ => {}
        }
    }
    open.then(|| format!("{text:?} has a '{{' that is not closed"))
}

fn is_capture_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn finish(
    kind: TemplateKind,
    text: &str,
    anchor: &str,
    positions: Vec<Position>,
    mut problems: Vec<String>,
) -> Result<IdentityTemplate, Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    for name in positions.iter().filter_map(|p| match p {
        Position::Capture(name) => Some(name),
        Position::Literal(_) => None,
    }) {
        if !seen.insert(name) {
            problems.push(format!("capture {{{name}}} is used twice"));
        }
    }
    if problems.is_empty() && seen.is_empty() {
        problems.push("has no capture".to_owned());
    }
    if problems.is_empty() {
        Ok(IdentityTemplate {
            kind,
            text: Arc::from(text),
            anchor: anchor.to_owned(),
            positions,
        })
    } else {
        Err(problems)
    }
}

/// One piece of a [`NameTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Capture(String),
}

/// An `iam_user` or `aws_profile` built from captures: `svc-{ns}-{sa}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NameTemplate {
    /// As configured.
    pub text: String,
    parts: Vec<Part>,
}

impl NameTemplate {
    /// Parses `text`, whose captures must all be in `defined`.
    pub(crate) fn parse<'a>(
        text: &str,
        defined: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let Some(open) = rest.find(['{', '}']) else {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            };
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open..];
            let close = after.find('}').filter(|_| after.starts_with('{'));
            let Some(close) = close.filter(|c| !after[1..*c].contains('{')) else {
                problems.push(unbalanced(text).unwrap_or_else(|| format!("{text:?}: bad braces")));
                break;
            };
            let name = &after[1..close];
            if !is_capture_name(name) {
                problems.push(format!(
                    "capture name {name:?} must be letters, digits and '_'"
                ));
            } else if !defined.clone().any(|d| d == name) {
                problems.push(format!(
                    "uses {{{name}}}, which the identity template does not capture"
                ));
            }
            parts.push(Part::Capture(name.to_owned()));
            rest = &after[close + 1..];
        }
        if problems.is_empty() {
            Ok(Self {
                text: text.to_owned(),
                parts,
            })
        } else {
            Err(problems)
        }
    }

    /// The captures it uses.
    pub(crate) fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Capture(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Why no name it builds can be a valid IAM user name, if that is so:
    /// a literal character IAM does not allow, or literal parts so long
    /// that even one-character captures exceed 64.
    pub(crate) fn never_an_iam_user(&self) -> Option<String> {
        let mut shortest = 0;
        for part in &self.parts {
            match part {
                Part::Literal(l) => {
                    if let Some(c) = l.chars().find(|c| !is_iam_user_char(*c)) {
                        return Some(format!(
                            "its literal text has {c:?}, which no IAM user name may hold \
                             ({IAM_USER_RULE})"
                        ));
                    }
                    shortest += l.len();
                }
                Part::Capture(_) => shortest += 1,
            }
        }
        (shortest > IAM_USER_MAX_LEN).then(|| {
            format!(
                "every name it builds is at least {shortest} characters long; an IAM user \
                 name has at most {IAM_USER_MAX_LEN}"
            )
        })
    }

    /// The name for `captures` (which hold every capture it uses).
    pub(crate) fn build(&self, captures: &Captures) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Capture(name) => {
                    if let Some((_, value)) = captures.iter().find(|(n, _)| n == name) {
                        out.push_str(value);
                    }
                }
            }
        }
        out
    }
}

/// A templated `[[callers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallerTemplate {
    /// Its index in `[[callers]]`.
    pub entry: usize,
    /// Which identities it maps.
    pub identity: IdentityTemplate,
    /// The IAM user each acts as.
    pub iam_user: NameTemplate,
    /// The profile holding that user's key (source `profiles`).
    pub aws_profile: Option<NameTemplate>,
}

/// What a template makes of one identity it matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Built {
    /// The captured values.
    pub captures: Captures,
    /// The IAM user name; checked by the caller against [`is_iam_user_name`].
    pub iam_user: String,
    /// The profile name (source `profiles`).
    pub aws_profile: Option<String>,
}

impl CallerTemplate {
    /// The names for `captures`.
    pub(crate) fn build(&self, captures: Captures) -> Built {
        Built {
            iam_user: self.iam_user.build(&captures),
            aws_profile: self.aws_profile.as_ref().map(|p| p.build(&captures)),
            captures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spiffe(text: &str) -> IdentityTemplate {
        IdentityTemplate::parse(TemplateKind::SpiffeId, text).expect(text)
    }

    fn dns(text: &str) -> IdentityTemplate {
        IdentityTemplate::parse(TemplateKind::DnsName, text).expect(text)
    }

    fn caps(pairs: &[(&str, &str)]) -> Captures {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_spiffe_template_captures_whole_segments() {
        let t = spiffe("spiffe://corp.example/ns/{ns}/sa/{sa}");
        assert_eq!(
            t.matches("spiffe://corp.example/ns/payments/sa/api"),
            Ok(caps(&[("ns", "payments"), ("sa", "api")]))
        );
        for other in [
            "spiffe://corp.example/ns/payments/sa/api/extra",
            "spiffe://corp.example/ns/payments/sa",
            "spiffe://other.example/ns/payments/sa/api",
            "spiffe://corp.example/NS/payments/sa/api",
            "spiffe://corp.example/ns/a/b/sa/api",
        ] {
            assert_eq!(t.matches(other), Err(Miss::Shape), "{other}");
        }
    }

    #[test]
    fn a_capture_outside_the_charset_or_too_long_is_a_miss_of_its_own() {
        let t = dns("{svc}.apps.corp.example");
        assert_eq!(
            t.matches("web.apps.corp.example"),
            Ok(caps(&[("svc", "web")]))
        );
        assert_eq!(
            t.matches("*.apps.corp.example"),
            Err(Miss::Capture {
                name: "svc".into(),
                value: "*".into()
            })
        );
        let long = format!("{}.apps.corp.example", "a".repeat(64));
        assert!(matches!(t.matches(&long), Err(Miss::Capture { .. })));
        // A literal that differs rules the shape out, whatever the capture.
        assert_eq!(t.matches("*.apps.corp.other"), Err(Miss::Shape));
        let spiffe_long = spiffe("spiffe://corp/{x}");
        assert!(matches!(
            spiffe_long.matches(&format!("spiffe://corp/{}", "a".repeat(64))),
            Err(Miss::Capture { .. })
        ));
    }

    #[test]
    fn malformed_templates_are_refused_with_their_rule() {
        let cases = [
            (
                TemplateKind::SpiffeId,
                "spiffe://{td}/ns/{ns}",
                "trust domain",
            ),
            (TemplateKind::SpiffeId, "spiffe://corp/ns/{ns", "not closed"),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/ns/ns}",
                "closes nothing",
            ),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/ns/x-{ns}",
                "mixes a capture",
            ),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/ns/{ns}-x",
                "mixes a capture",
            ),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/{a}/{a}",
                "used twice",
            ),
            (TemplateKind::SpiffeId, "spiffe://corp/{}", "capture name"),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/{a-b}",
                "capture name",
            ),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp/{{a}}",
                "inside a capture",
            ),
            (
                TemplateKind::SpiffeId,
                "spiffe://corp//{a}",
                "empty segment",
            ),
            (TemplateKind::SpiffeId, "spiffe://corp/../{a}", "'..'"),
            (TemplateKind::SpiffeId, "https://corp/{a}", "spiffe://"),
            (TemplateKind::DnsName, "apps.{svc}.corp", "leading labels"),
            (TemplateKind::DnsName, "{a}.{b}", "literal DNS suffix"),
            (TemplateKind::DnsName, "{svc}-x.corp", "mixes a capture"),
            (TemplateKind::DnsName, "{svc}..corp", "empty label"),
            (TemplateKind::DnsName, "{svc}.corp.", "empty label"),
        ];
        for (kind, text, needle) in cases {
            let problems = IdentityTemplate::parse(kind, text).expect_err(text);
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{text}: {problems:?}"
            );
        }
    }

    #[test]
    fn names_are_built_from_defined_captures_only() {
        let t = spiffe("spiffe://corp.example/ns/{ns}/sa/{sa}");
        let user = NameTemplate::parse("svc-{ns}-{sa}", t.capture_names()).expect("valid");
        assert_eq!(user.build(&caps(&[("ns", "a"), ("sa", "b")])), "svc-a-b");
        for (text, needle) in [
            ("svc-{team}", "does not capture"),
            ("svc-{ns", "not closed"),
            ("svc-ns}", "closes nothing"),
            ("svc-{}", "capture name"),
            ("{{ns}}", "inside a capture"),
        ] {
            let problems = NameTemplate::parse(text, t.capture_names()).expect_err(text);
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{text}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_name_template_that_can_never_be_an_iam_user_is_found() {
        let names = ["a"];
        let parse = |t: &str| NameTemplate::parse(t, names.iter().copied()).expect(t);
        assert_eq!(parse("svc-{a}").never_an_iam_user(), None);
        assert_eq!(
            parse(&format!("{}{{a}}", "x".repeat(63))).never_an_iam_user(),
            None
        );
        assert!(
            parse(&format!("{}{{a}}", "x".repeat(64)))
                .never_an_iam_user()
                .is_some()
        );
        assert!(parse("svc/{a}").never_an_iam_user().is_some());
        assert!(parse("svc {a}").never_an_iam_user().is_some());
    }

    #[test]
    fn overlap_is_decided_position_by_position() {
        let cases = [
            ("spiffe://c/ns/{a}/sa/{b}", "spiffe://c/ns/{x}/sa/{y}", true),
            (
                "spiffe://c/ns/{a}/sa/{b}",
                "spiffe://c/ns/team/sa/{y}",
                true,
            ),
            (
                "spiffe://c/ns/{a}/sa/{b}",
                "spiffe://c/ns/{a}/sa/{b}/{c}",
                false,
            ),
            (
                "spiffe://c/ns/{a}/sa/{b}",
                "spiffe://d/ns/{a}/sa/{b}",
                false,
            ),
            (
                "spiffe://c/ns/{a}/sa/{b}",
                "spiffe://c/ns/{a}/role/{b}",
                false,
            ),
            ("spiffe://c/{a}/x", "spiffe://c/y/{b}", true),
        ];
        for (a, b, overlap) in cases {
            let found = spiffe(a).overlap(&spiffe(b));
            assert_eq!(found.is_some(), overlap, "{a} / {b}: {found:?}");
            if let Some(witness) = found {
                assert!(spiffe(a).matches(&witness).is_ok(), "{witness}");
                assert!(spiffe(b).matches(&witness).is_ok(), "{witness}");
            }
        }
        // A literal a capture cannot take keeps two templates apart.
        let long = format!("{{b}}.{}.corp", "l".repeat(64));
        let a = dns(&format!("{{a}}.{}.corp", "l".repeat(64)));
        assert!(a.overlap(&dns(&long)).is_some());
        assert!(dns("{a}.{b}.corp").overlap(&a).is_none());
        assert!(dns("{a}.x.corp").overlap(&dns("{a}.{b}.corp")).is_some());
        assert!(
            dns("{a}.x.corp")
                .overlap(&spiffe("spiffe://c/{a}/x"))
                .is_none()
        );
    }

    #[test]
    fn iam_user_names_follow_iam() {
        for ok in ["a", "svc-a.b_c", "x+y=z,w@v", &"a".repeat(64)] {
            assert!(is_iam_user_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(!is_iam_user_name(bad), "{bad}");
        }
    }

    /// A template of `n` positions over a small alphabet of literals, so
    /// that generated templates and identities collide often.
    fn template_positions(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Option<String>>> {
        proptest::collection::vec(prop_oneof![Just(None), "[ab]{1,2}".prop_map(Some)], n)
    }

    fn spiffe_template(positions: &[Option<String>]) -> Option<IdentityTemplate> {
        let path: String = positions
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Some(literal) => format!("/{literal}"),
                None => format!("/{{c{i}}}"),
            })
            .collect();
        IdentityTemplate::parse(TemplateKind::SpiffeId, &format!("spiffe://td{path}")).ok()
    }

    proptest! {
        #[test]
        fn a_template_never_matches_another_segment_count(
            positions in template_positions(1..6),
            segments in proptest::collection::vec("[ab]{1,2}", 0..8),
        ) {
            if let Some(t) = spiffe_template(&positions) {
                let id = format!("spiffe://td{}", segments.iter().map(|s| format!("/{s}")).collect::<String>());
                if segments.len() != positions.len() {
                    prop_assert_eq!(t.matches(&id), Err(Miss::Shape));
                }
            }
        }

        #[test]
        fn a_capture_never_crosses_a_slash_or_a_dot(
            positions in template_positions(1..5),
            segments in proptest::collection::vec("[ab./]{1,4}", 1..5),
            labels in proptest::collection::vec("[ab.]{1,4}", 1..5),
        ) {
            if let Some(t) = spiffe_template(&positions) {
                let id = format!("spiffe://td/{}", segments.join("/"));
                if let Ok(captures) = t.matches(&id) {
                    for (_, value) in &captures {
                        prop_assert!(!value.contains('/'), "{} captured {}", id, value);
                        prop_assert!(is_capture(value));
                    }
                }
            }
            let d = dns("{a}.{b}.corp");
            let name = format!("{}.corp", labels.join("."));
            if let Ok(captures) = d.matches(&name) {
                for (_, value) in &captures {
                    prop_assert!(!value.contains('.'), "{} captured {}", name, value);
                }
                prop_assert_eq!(name.split('.').count(), 3);
            }
        }

        #[test]
        fn templates_that_do_not_overlap_never_match_one_identity(
            a in template_positions(1..5),
            b in template_positions(1..5),
            segments in proptest::collection::vec("[ab]{1,2}", 1..5),
        ) {
            if let (Some(ta), Some(tb)) = (spiffe_template(&a), spiffe_template(&b)) {
                let id = format!("spiffe://td/{}", segments.join("/"));
                let both = ta.matches(&id).is_ok() && tb.matches(&id).is_ok();
                if ta.overlap(&tb).is_none() {
                    prop_assert!(!both, "{} and {} both match {}", ta.text, tb.text, id);
                }
                if both {
                    prop_assert!(ta.overlap(&tb).is_some());
                }
            }
        }
    }
}
