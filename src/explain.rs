//! `credgate check-config --explain IDENTITY`: which `[[callers]]` entry
//! maps an identity, as which IAM user with which key, or why none does —
//! the answer to "why do I get CALLER_NOT_MAPPED?".
//!
//! The answer comes from [`Callers::lookup`], the very lookup the server
//! resolves certificates with, so it cannot disagree with it. The AWS
//! shared files are read offline to say whether the key's profile exists;
//! with Secrets Manager it names the user's secret without reading it:
//! nothing is sent anywhere.

use std::fmt::Write as _;

use crate::{
    aws::keys::profiles,
    config::{
        Built, CAPTURE_RULE, CallerSettings, CallerTemplate, Config, IAM_USER_RULE, Matcher,
        TemplateKind,
    },
    error::Reason,
    net::identity::{Callers, Mapping, Unmapped},
    spiffe,
};

/// What `--explain` found.
#[derive(Debug)]
pub(crate) struct Explanation {
    /// Whether some reading of the identity is mapped.
    pub(crate) mapped: bool,
    /// The report, one paragraph per reading.
    pub(crate) text: String,
}

/// The readings of `identity`: `spiffe://...` (or `spiffe:ID`), `dns:NAME`,
/// `cn:NAME`, or a bare name, which may be a DNS SAN or a CN.
pub(crate) fn readings(identity: &str) -> Result<Vec<Matcher>, String> {
    let (readings, value) = if spiffe::is_spiffe_uri(identity) {
        (vec![Matcher::SpiffeId(identity.to_owned())], identity)
    } else if let Some(id) = identity.strip_prefix("spiffe:") {
        (vec![Matcher::SpiffeId(id.to_owned())], id)
    } else if let Some(name) = identity.strip_prefix("dns:") {
        (vec![Matcher::DnsName(name.to_owned())], name)
    } else if let Some(name) = identity.strip_prefix("cn:") {
        (vec![Matcher::CommonName(name.to_owned())], name)
    } else {
        let both = vec![
            Matcher::DnsName(identity.to_owned()),
            Matcher::CommonName(identity.to_owned()),
        ];
        (both, identity)
    };
    if value.is_empty() {
        return Err(format!("--explain {identity:?} names no identity"));
    }
    Ok(readings)
}

/// Explains every reading of `identity` against `config`.
pub(crate) async fn explain(config: &Config, identity: &str) -> Result<Explanation, String> {
    let readings = readings(identity)?;
    let callers = Callers::new(&config.callers, &config.templates, 1);
    let mut explanation = Explanation {
        mapped: false,
        text: String::new(),
    };
    if readings.len() > 1 {
        explanation.text.push_str(&format!(
            "{identity:?} could be a DNS SAN or a subject CN: both are shown \
             (name one with dns:{identity} or cn:{identity})\n\n"
        ));
    }
    for (i, reading) in readings.iter().enumerate() {
        if i > 0 {
            explanation.text.push('\n');
        }
        let mapping = callers.lookup(reading);
        let text = match mapping {
            Mapping::Exact(caller) => {
                explanation.mapped = true;
                let entry = config.callers.iter().find(|c| c.entry == caller.entry);
                exact(
                    reading,
                    entry,
                    &caller.iam_user,
                    caller.aws_profile.as_deref(),
                    config,
                )
                .await
            }
            Mapping::Template { template, built } => {
                explanation.mapped = true;
                templated(reading, template, &built, config).await
            }
            Mapping::Unmapped(why) => unmapped(reading, &why, config),
        };
        explanation.text.push_str(&text);
    }
    Ok(explanation)
}

async fn exact(
    reading: &Matcher,
    entry: Option<&CallerSettings>,
    iam_user: &str,
    aws_profile: Option<&str>,
    config: &Config,
) -> String {
    let mut out = format!("{reading}\n");
    let index = entry.map_or_else(|| "?".to_owned(), |e| e.entry.to_string());
    let _ = writeln!(out, "  mapped by callers[{index}], an exact entry");
    let _ = writeln!(out, "  iam_user: {iam_user}");
    let reason = Reason::UpstreamCredentialsRejected;
    out.push_str(&key_line(iam_user, aws_profile, config, reason).await);
    // A template that would also match is shadowed: the exact entry wins.
    let (kind, value) = match reading {
        Matcher::SpiffeId(v) => (Some(TemplateKind::SpiffeId), v),
        Matcher::DnsName(v) => (Some(TemplateKind::DnsName), v),
        Matcher::CommonName(v) => (None, v),
    };
    for t in config
        .templates
        .iter()
        .filter(|t| Some(t.identity.kind) == kind)
        .filter(|t| t.identity.matches(value).is_ok())
    {
        let _ = writeln!(
            out,
            "  (callers[{}]'s {} matches it too; the exact entry wins)",
            t.entry, t.identity
        );
    }
    state_line(&mut out, reading);
    out
}

async fn templated(
    reading: &Matcher,
    template: &CallerTemplate,
    built: &Built,
    config: &Config,
) -> String {
    let mut out = format!("{reading}\n");
    let _ = writeln!(
        out,
        "  mapped by callers[{}], the {}",
        template.entry, template.identity
    );
    let captures: Vec<String> = built
        .captures
        .iter()
        .map(|(name, value)| format!("{name}={value:?}"))
        .collect();
    let _ = writeln!(out, "  captures: {}", captures.join(" "));
    let _ = writeln!(
        out,
        "  iam_user: {} (from {:?})",
        built.iam_user, template.iam_user.text
    );
    let reason = Reason::IamUserNotProvisioned;
    let profile = built.aws_profile.as_deref();
    out.push_str(&key_line(&built.iam_user, profile, config, reason).await);
    state_line(&mut out, reading);
    out
}

/// Which key signs for the caller: its profile, and whether the AWS shared
/// files define it (read offline), or its user's Secrets Manager secret
/// (named, not read). A call without it fails with `reason`.
async fn key_line(
    iam_user: &str,
    aws_profile: Option<&str>,
    config: &Config,
    reason: Reason,
) -> String {
    let Some(aws_profile) = aws_profile else {
        return match config.keys.secret_name.of(iam_user) {
            Some(secret) => format!(
                "  key: the Secrets Manager secret {secret:?} (not read here: its calls get \
                 {} until it exists; `credgate keys status` reads it)\n",
                Reason::IamUserNotProvisioned
            ),
            None => format!(
                "  key: none: {iam_user:?} makes no valid secret name from {:?}; its calls get \
                 {}\n",
                config.keys.secret_name.template(),
                Reason::IamUserNotProvisioned
            ),
        };
    };
    let missing = profiles::missing_profiles([aws_profile]).await;
    let found = match missing.first() {
        None => "defined in the AWS shared files".to_owned(),
        Some(problem) if problem.starts_with("aws_profile") => format!(
            "NOT defined in the AWS shared files (AWS_SHARED_CREDENTIALS_FILE / \
             AWS_CONFIG_FILE): its calls get {reason} until it is"
        ),
        Some(problem) => format!("not known: {problem}"),
    };
    format!("  key: aws_profile {aws_profile:?}, {found}\n")
}

fn state_line(out: &mut String, reading: &Matcher) {
    let _ = writeln!(
        out,
        "  state key: {} (its failed attempts and request_id records; `credgate lockout \
         --caller` takes it), and its own limits of calls in flight and connections",
        reading.state_key()
    );
}

fn unmapped(reading: &Matcher, why: &Unmapped<'_>, config: &Config) -> String {
    let mut out = format!("{reading}\n  not mapped (CALLER_NOT_MAPPED): ");
    match why {
        Unmapped::InvalidSpiffeId(rule) => {
            let _ = writeln!(out, "not a valid SPIFFE ID: {rule}");
        }
        Unmapped::Capture {
            template,
            name,
            value,
        } => {
            let _ = writeln!(
                out,
                "callers[{}]'s {} has its shape, but {{{name}}} would capture {value:?}, \
                 and a capture is {CAPTURE_RULE}",
                template.entry, template.identity
            );
        }
        Unmapped::IamUser { template, built } => {
            let _ = writeln!(
                out,
                "callers[{}]'s {} matches it, but builds the IAM user name {:?} from {:?}, \
                 which is not a valid IAM user name ({IAM_USER_RULE})",
                template.entry, template.identity, built.iam_user, template.iam_user.text
            );
        }
        Unmapped::NoEntry => {
            out.push_str("no exact entry names it");
            let near = near_templates(reading, config);
            if near.is_empty() {
                out.push_str(", and no template has its kind and trust domain or suffix\n");
            } else {
                let _ = writeln!(
                    out,
                    ", and no template has its shape; templates of its kind that differ \
                     in a literal or in length ({}):",
                    segments(reading)
                );
                for t in near {
                    let _ = writeln!(
                        out,
                        "    callers[{}]: {} ({} {})",
                        t.entry,
                        t.identity,
                        t.identity.positions.len(),
                        unit(t.identity.kind)
                    );
                }
            }
        }
    }
    out
}

/// Templates an operator probably meant: same kind, and the same trust
/// domain (SPIFFE) or last label (DNS). At most five.
fn near_templates<'a>(reading: &Matcher, config: &'a Config) -> Vec<&'a CallerTemplate> {
    let (kind, value) = match reading {
        Matcher::SpiffeId(v) => (TemplateKind::SpiffeId, v),
        Matcher::DnsName(v) => (TemplateKind::DnsName, v),
        Matcher::CommonName(_) => return Vec::new(),
    };
    let Some((anchor, values)) = crate::config::split(kind, value) else {
        return Vec::new();
    };
    config
        .templates
        .iter()
        .filter(|t| t.identity.kind == kind)
        .filter(|t| match kind {
            TemplateKind::SpiffeId => t.identity.anchor == anchor,
            TemplateKind::DnsName => {
                let last = t.identity.positions.last();
                matches!(last, Some(crate::config::Position::Literal(l)) if Some(&l.as_str()) == values.last())
            }
        })
        .take(5)
        .collect()
}

fn unit(kind: TemplateKind) -> &'static str {
    match kind {
        TemplateKind::SpiffeId => "path segments",
        TemplateKind::DnsName => "labels",
    }
}

/// "this one has N path segments" / "N labels".
fn segments(reading: &Matcher) -> String {
    let (kind, value) = match reading {
        Matcher::SpiffeId(v) => (TemplateKind::SpiffeId, v),
        Matcher::DnsName(v) => (TemplateKind::DnsName, v),
        Matcher::CommonName(_) => return String::new(),
    };
    crate::config::split(kind, value).map_or_else(String::new, |(_, values)| {
        format!("this one has {} {}", values.len(), unit(kind))
    })
}
