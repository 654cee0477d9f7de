//! Caller identity: what a verified client certificate says about its holder,
//! the rules a client leaf must follow, and which configured caller (and so
//! which IAM user) the holder is.
//!
//! A certificate whose URI SAN is a SPIFFE ID is an X.509-SVID and is
//! identified by that ID alone: its DNS SANs and CN are not consulted, so an
//! SVID issued for one workload can never pass as a DNS or CN caller.
//!
//! An identity is looked up among the exact `[[callers]]` entries first,
//! then among the templates. A templated caller is made once per resolved
//! identity and shared by all its connections while any holds it, so its
//! state key, `max_requests_per_caller` and connection budget are that
//! identity's, as for an exact entry.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use tokio::sync::Semaphore;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

use crate::{
    config::{
        Built, CallerSettings, CallerTemplate, MAX_NAME_LEN, Matcher, Miss, Position, TemplateKind,
        is_iam_user_name, split,
    },
    error::{Error, MAX_PRESENTED_LEN, truncate},
    spiffe,
};

/// Most subject alternative names a client certificate may carry. Workload
/// certificates carry one or a few; thousands only bloat logs and errors.
pub(crate) const MAX_SANS: usize = 32;

/// The identities a client certificate presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PeerIdentity {
    /// Every URI SAN; a SPIFFE identity requires exactly one.
    pub uris: Vec<String>,
    /// Every DNS SAN.
    pub dns_names: Vec<String>,
    /// The subject CN, if any.
    pub common_name: Option<String>,
}

impl PeerIdentity {
    /// Reads the identities from a DER certificate, refusing certificates
    /// with more names, or longer names, than any workload needs.
    pub(crate) fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        Self::from_cert(&cert)
    }

    fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, String> {
        let mut identity = Self::default();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("client certificate has a malformed SAN extension: {e}"))?;
        if let Some(san) = san {
            let names = &san.value.general_names;
            if names.len() > MAX_SANS {
                return Err(format!(
                    "client certificate has {} subject alternative names (at most {MAX_SANS})",
                    names.len()
                ));
            }
            for name in names {
                match name {
                    GeneralName::URI(uri) => {
                        check_len("URI SAN", uri, spiffe::MAX_LEN)?;
                        identity.uris.push((*uri).to_owned());
                    }
                    GeneralName::DNSName(dns) => {
                        check_len("DNS SAN", dns, MAX_NAME_LEN)?;
                        identity.dns_names.push((*dns).to_owned());
                    }
                    _ => {}
                }
            }
        }
        let mut common_names = cert.subject().iter_common_name();
        if let Some(cn) = common_names.next() {
            let cn = cn
                .as_str()
                .map_err(|_| "client certificate CN is not a string".to_owned())?;
            check_len("CN", cn, MAX_NAME_LEN)?;
            identity.common_name = Some(cn.to_owned());
        }
        if common_names.next().is_some() {
            return Err("client certificate has several CNs".to_owned());
        }
        Ok(identity)
    }

    /// What the certificate presented, bounded for logs and error metadata.
    pub(crate) fn presented(&self) -> String {
        truncate(&self.to_string(), MAX_PRESENTED_LEN)
    }
}

fn check_len(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "client certificate {what} is {} bytes long (at most {max})",
            value.len()
        ));
    }
    Ok(())
}

/// The rules a client leaf must follow beyond chain validation, from the
/// X.509-SVID specification (not a CA, no certificate or CRL signing) plus
/// one stricter than it: the clientAuth extended key usage must be present
/// (cert-manager and SPIRE both set it; a certificate without any EKU would
/// otherwise be usable for everything).
pub(crate) fn check_leaf(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    let mut basic_constraints = None;
    let mut client_auth = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => basic_constraints = Some(bc.ca),
            ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                return Err(
                    "client certificate may sign certificates or CRLs (keyCertSign/cRLSign): \
                     a leaf must not"
                        .to_owned(),
                );
            }
            ParsedExtension::ExtendedKeyUsage(eku) => client_auth = eku.client_auth || eku.any,
            _ => {}
        }
    }
    match basic_constraints {
        None => {
            return Err(
                "client certificate has no basicConstraints extension (a leaf must say CA:FALSE)"
                    .to_owned(),
            );
        }
        Some(true) => return Err("client certificate is a CA certificate".to_owned()),
        Some(false) => {}
    }
    if !client_auth {
        return Err("client certificate lacks the clientAuth extended key usage".to_owned());
    }
    PeerIdentity::from_cert(&cert)
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut part = |f: &mut fmt::Formatter<'_>, kind: &str, value: &str| {
            let sep = if first { "" } else { "," };
            first = false;
            write!(f, "{sep}{kind}={value}")
        };
        for u in &self.uris {
            part(f, "uri", u)?;
        }
        for d in &self.dns_names {
            part(f, "dns", d)?;
        }
        if let Some(c) = &self.common_name {
            part(f, "cn", c)?;
        }
        if first {
            f.write_str("(no identity)")?;
        }
        Ok(())
    }
}

/// A configured caller, resolved.
#[derive(Debug)]
pub(crate) struct Caller {
    /// The identity that matched (for logs and spans): an exact entry's
    /// value, or the identity a template resolved.
    pub identity: String,
    /// The matcher's kind and value together (`spiffe:<id>`, `dns:<name>`,
    /// `cn:<name>`): what this caller's records in the state store are
    /// keyed by, so that a DNS-name caller and a CN caller with the same
    /// value never share a failure counter or a `request_id` record. A
    /// templated caller is keyed by its resolved identity.
    pub key: String,
    /// The IAM user this caller acts as, as configured or built.
    pub iam_user: String,
    /// The profile whose access key signs for that user (source
    /// `profiles`); `None` when the key is found by `iam_user`.
    pub aws_profile: Option<String>,
    /// That entry's template, for a templated caller (logs and audit say
    /// which rule let it in).
    pub template: Option<Arc<str>>,
    /// `server.max_requests_per_caller` slots.
    pub(crate) in_flight: Arc<Semaphore>,
}

/// What `[[callers]]` makes of one identity.
#[derive(Debug)]
pub(crate) enum Mapping<'a> {
    /// An exact entry.
    Exact(&'a Exact),
    /// A template, and what it built.
    Template {
        /// The entry.
        template: &'a CallerTemplate,
        /// The captures and the names built from them.
        built: Built,
    },
    /// Not mapped, and why.
    Unmapped(Unmapped<'a>),
}

/// Why an identity is not mapped.
#[derive(Debug)]
pub(crate) enum Unmapped<'a> {
    /// No entry names it, and no template has its shape.
    NoEntry,
    /// A URI that is not a valid SPIFFE ID, with the rule it breaks.
    InvalidSpiffeId(String),
    /// A template's literal parts match, but a captured value is not one a
    /// capture may take.
    Capture {
        /// The entry.
        template: &'a CallerTemplate,
        /// The capture's name.
        name: String,
        /// What the identity had there.
        value: String,
    },
    /// A template matched, but the IAM user name it built is not valid.
    IamUser {
        /// The entry.
        template: &'a CallerTemplate,
        /// What it built.
        built: Built,
    },
}

impl Mapping<'_> {
    fn is_mapped(&self) -> bool {
        !matches!(self, Self::Unmapped(_))
    }
}

/// An exact entry as the index keeps it; its [`Caller`] is made when the
/// identity connects, as a templated one's is, so that ten thousand
/// configured callers cost a few hundred bytes each until they call.
#[derive(Debug)]
pub(crate) struct Exact {
    /// The IAM user.
    pub iam_user: String,
    /// The profile holding its key (source `profiles`).
    pub aws_profile: Option<String>,
    /// Its index in `[[callers]]`.
    pub entry: usize,
}

/// Fewest dead entries the shared-caller map holds before it is swept.
const MIN_SWEEP: usize = 1024;

/// The `[[callers]]` table, indexed for lookups.
#[derive(Debug)]
pub(crate) struct Callers {
    by_matcher: HashMap<Matcher, Exact>,
    templates: TemplateIndex,
    max_in_flight: usize,
    /// Callers by resolved identity (exact or templated). An entry lives while some
    /// connection or attempt holds its caller; dead ones are swept once the
    /// map has doubled since the last sweep, so it holds at most about
    /// twice the live callers (which `max_connections` bounds) plus
    /// [`MIN_SWEEP`].
    resolved: Mutex<Resolved>,
}

#[derive(Debug, Default)]
struct Resolved {
    callers: HashMap<Matcher, Weak<Caller>>,
    sweep_at: usize,
}

impl Resolved {
    fn insert(&mut self, identity: Matcher, caller: &Arc<Caller>) {
        if self.callers.len() >= self.sweep_at {
            self.callers.retain(|_, c| c.strong_count() > 0);
            self.sweep_at = (2 * self.callers.len()).max(MIN_SWEEP);
        }
        self.callers.insert(identity, Arc::downgrade(caller));
    }
}

impl Callers {
    /// Indexes the configured callers (already checked for duplicates and
    /// overlaps).
    pub(crate) fn new(
        callers: &[CallerSettings],
        templates: &[CallerTemplate],
        max_in_flight: usize,
    ) -> Self {
        let by_matcher = callers
            .iter()
            .map(|c| {
                let exact = Exact {
                    iam_user: c.iam_user.clone(),
                    aws_profile: c.aws_profile.clone(),
                    entry: c.entry,
                };
                (c.matcher.clone(), exact)
            })
            .collect();
        Self {
            by_matcher,
            templates: TemplateIndex::new(templates),
            max_in_flight,
            resolved: Mutex::default(),
        }
    }

    /// Maps a certificate to exactly one caller.
    ///
    /// An X.509-SVID (a SPIFFE URI SAN) is looked up by its SPIFFE ID only.
    /// Otherwise every DNS SAN and the CN are looked up, and the call is
    /// allowed only when they all lead to one identity: a certificate that
    /// could act as two IAM users is refused rather than guessed at (two
    /// DNS SANs that one template both matches are two identities). A
    /// certificate with several URI SANs has no identity at all.
    pub(crate) fn resolve(&self, peer: &PeerIdentity) -> Result<Arc<Caller>, Error> {
        let not_mapped = || Error::CallerNotMapped {
            presented: peer.presented(),
        };
        if peer.uris.len() > 1 {
            return Err(not_mapped());
        }
        if let Some(uri) = peer.uris.first().filter(|u| spiffe::is_spiffe_uri(u)) {
            let identity = Matcher::SpiffeId(uri.clone());
            let mapping = self.lookup(&identity);
            return self.caller(identity, mapping).ok_or_else(not_mapped);
        }
        let candidates = peer
            .dns_names
            .iter()
            .map(|d| Matcher::DnsName(d.clone()))
            .chain(
                peer.common_name
                    .iter()
                    .map(|c| Matcher::CommonName(c.clone())),
            );
        let mut found: Option<(Matcher, Mapping<'_>)> = None;
        for identity in candidates {
            let mapping = self.lookup(&identity);
            if !mapping.is_mapped() {
                continue;
            }
            match &found {
                Some((previous, _)) if *previous != identity => return Err(not_mapped()),
                Some(_) => {}
                None => found = Some((identity, mapping)),
            }
        }
        let (identity, mapping) = found.ok_or_else(not_mapped)?;
        self.caller(identity, mapping).ok_or_else(not_mapped)
    }

    /// What the configuration makes of `identity`: an exact entry first,
    /// then the one template that can match it. `check-config --explain`
    /// shows this very answer.
    pub(crate) fn lookup(&self, identity: &Matcher) -> Mapping<'_> {
        if let Matcher::SpiffeId(id) = identity
            && let Err(why) = spiffe::validate(id)
        {
            return Mapping::Unmapped(Unmapped::InvalidSpiffeId(why));
        }
        if let Some(exact) = self.by_matcher.get(identity) {
            return Mapping::Exact(exact);
        }
        match identity {
            Matcher::SpiffeId(id) => self.templates.lookup(TemplateKind::SpiffeId, id),
            Matcher::DnsName(name) => self.templates.lookup(TemplateKind::DnsName, name),
            Matcher::CommonName(_) => Mapping::Unmapped(Unmapped::NoEntry),
        }
    }

    /// The one shared caller of a mapped identity, exact or templated.
    fn caller(&self, identity: Matcher, mapping: Mapping<'_>) -> Option<Arc<Caller>> {
        let mut resolved = self.resolved.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(caller) = resolved.callers.get(&identity).and_then(Weak::upgrade) {
            return Some(caller);
        }
        let (iam_user, aws_profile, template) = match mapping {
            Mapping::Exact(exact) => (exact.iam_user.clone(), exact.aws_profile.clone(), None),
            Mapping::Template { template, built } => (
                built.iam_user,
                built.aws_profile,
                Some(template.identity.text.clone()),
            ),
            Mapping::Unmapped(_) => return None,
        };
        let (Matcher::SpiffeId(value) | Matcher::DnsName(value) | Matcher::CommonName(value)) =
            &identity;
        let caller = Arc::new(Caller {
            identity: value.clone(),
            key: identity.state_key(),
            iam_user,
            aws_profile,
            template,
            in_flight: Arc::new(Semaphore::new(self.max_in_flight)),
        });
        resolved.insert(identity, &caller);
        Some(caller)
    }
}

/// The templates, indexed so that a lookup costs the same with 10 or
/// 10,000 entries: by kind and length, then trust domain, then, for each
/// shape (which positions are literal) in that group, by the identity's
/// values at those positions. Accepted templates never overlap, so at most
/// one can match; the index only finds it without trying them all.
#[derive(Debug, Default)]
struct TemplateIndex {
    templates: Vec<CallerTemplate>,
    groups: HashMap<(TemplateKind, usize), HashMap<String, Vec<Shape>>>,
}

#[derive(Debug)]
struct Shape {
    /// The positions that are literal.
    literals: Vec<usize>,
    /// Templates of this shape (indexes into `templates`) by their literal
    /// values, joined.
    by_literals: HashMap<String, Vec<usize>>,
}

/// `values` joined into one key. `\0` appears in no segment or label that
/// can match, and every candidate found is matched in full anyway.
fn literal_key<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut key = String::new();
    for v in values {
        key.push_str(v);
        key.push('\0');
    }
    key
}

impl TemplateIndex {
    fn new(templates: &[CallerTemplate]) -> Self {
        let mut index = Self::default();
        for (i, t) in templates.iter().enumerate() {
            let id = &t.identity;
            let literals: Vec<usize> = id
                .positions
                .iter()
                .enumerate()
                .filter(|(_, p)| matches!(p, Position::Literal(_)))
                .map(|(n, _)| n)
                .collect();
            let key = literal_key(id.positions.iter().filter_map(|p| match p {
                Position::Literal(l) => Some(l.as_str()),
                Position::Capture(_) => None,
            }));
            let shapes = index
                .groups
                .entry((id.kind, id.positions.len()))
                .or_default()
                .entry(id.anchor.clone())
                .or_default();
            let shape = match shapes.iter().position(|s| s.literals == literals) {
                Some(at) => &mut shapes[at],
                None => {
                    shapes.push(Shape {
                        literals,
                        by_literals: HashMap::new(),
                    });
                    let last = shapes.len() - 1;
                    &mut shapes[last]
                }
            };
            shape.by_literals.entry(key).or_default().push(i);
            index.templates.push(t.clone());
        }
        index
    }

    fn lookup(&self, kind: TemplateKind, identity: &str) -> Mapping<'_> {
        let Some((anchor, values)) = split(kind, identity) else {
            return Mapping::Unmapped(Unmapped::NoEntry);
        };
        let mut miss = Unmapped::NoEntry;
        for template in self.candidates(kind, anchor, &values) {
            match template.identity.captures(anchor, &values) {
                Ok(captures) => {
                    let built = template.build(captures);
                    if is_iam_user_name(&built.iam_user) {
                        return Mapping::Template { template, built };
                    }
                    if matches!(miss, Unmapped::NoEntry) {
                        miss = Unmapped::IamUser { template, built };
                    }
                }
                Err(Miss::Capture { name, value }) => {
                    if matches!(miss, Unmapped::NoEntry) {
                        miss = Unmapped::Capture {
                            template,
                            name,
                            value,
                        };
                    }
                }
                Err(Miss::Shape) => {}
            }
        }
        Mapping::Unmapped(miss)
    }

    /// The templates whose literal parts an identity split into `anchor`
    /// and `values` has: a few hash probes, one per shape of its group.
    fn candidates(
        &self,
        kind: TemplateKind,
        anchor: &str,
        values: &[&str],
    ) -> Vec<&CallerTemplate> {
        let shapes = self
            .groups
            .get(&(kind, values.len()))
            .and_then(|by_anchor| by_anchor.get(anchor));
        let mut found = Vec::new();
        for shape in shapes.into_iter().flatten() {
            let key = literal_key(shape.literals.iter().map(|&n| values[n]));
            if let Some(templates) = shape.by_literals.get(&key) {
                found.extend(templates.iter().map(|&i| &self.templates[i]));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devpki::{Authority, ClientSpec};
    use proptest::prelude::*;

    fn callers() -> Callers {
        let entry = |matcher, user: &str| CallerSettings {
            matcher,
            iam_user: user.into(),
            aws_profile: Some(user.into()),
            entry: 0,
        };
        Callers::new(
            &[
                entry(Matcher::SpiffeId("spiffe://corp/ns/a/sa/a".into()), "a"),
                entry(Matcher::DnsName("b.corp".into()), "b"),
                entry(Matcher::CommonName("c".into()), "c"),
            ],
            &[],
            4,
        )
    }

    /// Callers from `[[callers]]` TOML, through the config parser.
    fn from_toml(callers: &str) -> Callers {
        let text = format!("[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\n{callers}");
        let config = crate::config::Config::parse(&text).expect("valid config");
        Callers::new(&config.callers, &config.templates, 4)
    }

    /// An exact entry, a SPIFFE template and a DNS template.
    fn templated() -> Callers {
        from_toml(
            r#"
            [[callers]]
            spiffe_id = "spiffe://corp.example/ns/portal/sa/portal"
            iam_user = "portal-svc"
            aws_profile = "portal-svc"
            [[callers]]
            spiffe_id = "spiffe://corp.example/ns/{ns}/sa/{sa}"
            iam_user = "svc-{ns}-{sa}"
            aws_profile = "{ns}-{sa}"
            [[callers]]
            dns_name = "{svc}.apps.corp.example"
            iam_user = "app-{svc}"
            aws_profile = "app-{svc}"
            "#,
        )
    }

    fn peer(uris: &[&str], dns: &[&str], cn: Option<&str>) -> PeerIdentity {
        PeerIdentity {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            common_name: cn.map(str::to_owned),
        }
    }

    #[test]
    fn each_kind_of_identity_resolves_exactly() {
        let c = callers();
        let a = c.resolve(&peer(&["spiffe://corp/ns/a/sa/a"], &[], None));
        assert_eq!(a.expect("a").iam_user, "a");
        let b = c.resolve(&peer(&[], &["x.corp", "b.corp"], Some("zz")));
        assert_eq!(b.expect("b").iam_user, "b");
        assert_eq!(
            c.resolve(&peer(&[], &[], Some("c"))).expect("c").iam_user,
            "c"
        );
    }

    #[test]
    fn prefixes_and_case_variants_do_not_match() {
        let c = callers();
        for p in [
            peer(&["spiffe://corp/ns/a/sa/a/extra"], &[], None),
            peer(&["spiffe://corp/ns/a/sa"], &[], None),
            peer(&[], &["B.corp"], None),
            peer(&[], &[], Some("c ")),
        ] {
            assert_eq!(
                c.resolve(&p).expect_err("denied").reason(),
                crate::error::Reason::CallerNotMapped
            );
        }
    }

    #[test]
    fn several_uri_sans_are_rejected() {
        let c = callers();
        let p = peer(&["spiffe://corp/ns/a/sa/a", "spiffe://other/x"], &[], None);
        assert!(c.resolve(&p).is_err());
    }

    #[test]
    fn an_svid_is_its_spiffe_id_alone() {
        let c = callers();
        // A mapped CN or DNS name beside an unmapped SPIFFE ID does not help.
        for p in [
            peer(&["spiffe://corp/ns/evil/sa/evil"], &[], Some("c")),
            peer(&["spiffe://corp/ns/evil/sa/evil"], &["b.corp"], None),
        ] {
            assert!(c.resolve(&p).is_err(), "{p}");
        }
        // Nor do a mapped SPIFFE ID's extra DNS names make it ambiguous.
        let a = c.resolve(&peer(&["spiffe://corp/ns/a/sa/a"], &["b.corp"], Some("c")));
        assert_eq!(a.expect("a").iam_user, "a");
        // A non-SPIFFE URI is not an SVID: the other names still apply.
        let b = c.resolve(&peer(&["https://b.corp/x"], &["b.corp"], None));
        assert_eq!(b.expect("b").iam_user, "b");
    }

    #[test]
    fn a_certificate_matching_two_callers_is_refused() {
        let c = callers();
        let p = peer(&[], &["b.corp"], Some("c"));
        assert!(c.resolve(&p).is_err());
    }

    #[test]
    fn presented_identities_are_bounded() {
        let dns: Vec<String> = (0..100).map(|i| format!("name-{i}.corp.example")).collect();
        let p = PeerIdentity {
            dns_names: dns,
            ..PeerIdentity::default()
        };
        assert!(p.presented().len() <= MAX_PRESENTED_LEN + 20);
    }

    #[test]
    fn leaf_rules_are_enforced() {
        let ca = Authority::new("test CA").expect("CA");
        let good = ca
            .client(&ClientSpec::spiffe("spiffe://corp/ns/a/sa/a"))
            .expect("cert");
        assert!(check_leaf(&good.der()).is_ok());

        let too_many = ClientSpec {
            dns_names: (0..=MAX_SANS).map(|i| format!("n{i}.corp")).collect(),
            ..ClientSpec::default()
        };
        let err = check_leaf(&ca.client(&too_many).expect("cert").der()).expect_err("SANs");
        assert!(err.contains("subject alternative names"), "{err}");

        let long = ClientSpec {
            common_name: Some("x".repeat(MAX_NAME_LEN + 1)),
            ..ClientSpec::default()
        };
        let err = check_leaf(&ca.client(&long).expect("cert").der()).expect_err("long");
        assert!(err.contains("CN"), "{err}");
    }

    #[test]
    fn templated_identities_resolve_to_the_users_built_from_their_captures() {
        let c = templated();
        let api = c
            .resolve(&peer(
                &["spiffe://corp.example/ns/payments/sa/api"],
                &[],
                None,
            ))
            .expect("templated SPIFFE ID");
        assert_eq!(api.iam_user, "svc-payments-api");
        assert_eq!(api.aws_profile.as_deref(), Some("payments-api"));
        assert_eq!(api.identity, "spiffe://corp.example/ns/payments/sa/api");
        assert_eq!(api.key, "spiffe:spiffe://corp.example/ns/payments/sa/api");
        assert_eq!(
            api.template.as_deref(),
            Some("spiffe://corp.example/ns/{ns}/sa/{sa}")
        );
        let web = c
            .resolve(&peer(&[], &["web.apps.corp.example"], Some("anything")))
            .expect("templated DNS name");
        assert_eq!(web.iam_user, "app-web");
        assert_eq!(web.key, "dns:web.apps.corp.example");
    }

    #[test]
    fn an_exact_entry_wins_over_a_template() {
        let c = templated();
        let portal = c
            .resolve(&peer(
                &["spiffe://corp.example/ns/portal/sa/portal"],
                &[],
                None,
            ))
            .expect("exact");
        assert_eq!(portal.iam_user, "portal-svc");
        assert_eq!(portal.template, None);
    }

    #[test]
    fn a_template_maps_only_its_own_shape() {
        let c = templated();
        for p in [
            peer(&["spiffe://corp.example/ns/a/sa/b/extra"], &[], None),
            peer(&["spiffe://corp.example/ns/a/sa"], &[], None),
            peer(&["spiffe://corp.example/ns/a/role/b"], &[], None),
            peer(&["spiffe://other.example/ns/a/sa/b"], &[], None),
            peer(&[], &["x.web.apps.corp.example"], None),
            peer(&[], &["apps.corp.example"], None),
            peer(&[], &["*.apps.corp.example"], None),
            peer(
                &[],
                &[&format!("{}.apps.corp.example", "a".repeat(64))],
                None,
            ),
            // A CN is never matched by a DNS template.
            peer(&[], &[], Some("web.apps.corp.example")),
        ] {
            assert!(c.resolve(&p).is_err(), "{p}");
        }
    }

    #[test]
    fn a_built_name_that_is_no_iam_user_name_is_not_mapped() {
        let c = from_toml(&format!(
            r#"
            [[callers]]
            spiffe_id = "spiffe://corp/ns/{{ns}}"
            iam_user = "{}-{{ns}}"
            aws_profile = "p-{{ns}}"
            "#,
            "u".repeat(40)
        ));
        let short = c.resolve(&peer(&["spiffe://corp/ns/team"], &[], None));
        assert_eq!(
            short.expect("fits").iam_user,
            format!("{}-team", "u".repeat(40))
        );
        let long = format!("spiffe://corp/ns/{}", "t".repeat(30));
        assert!(c.resolve(&peer(&[&long], &[], None)).is_err());
        let Mapping::Unmapped(Unmapped::IamUser { built, .. }) =
            c.lookup(&Matcher::SpiffeId(long.clone()))
        else {
            panic!("expected an invalid IAM user");
        };
        assert_eq!(built.iam_user.len(), 71);
    }

    #[test]
    fn two_dns_names_one_template_maps_are_two_identities_and_refused() {
        let c = templated();
        let p = peer(&[], &["a.apps.corp.example", "b.apps.corp.example"], None);
        assert!(c.resolve(&p).is_err());
        // The same name twice is one identity.
        let p = peer(&[], &["a.apps.corp.example", "a.apps.corp.example"], None);
        assert_eq!(c.resolve(&p).expect("one identity").iam_user, "app-a");
    }

    #[test]
    fn connections_of_one_resolved_identity_share_one_caller_and_its_limits() {
        let c = templated();
        let p = peer(&["spiffe://corp.example/ns/a/sa/b"], &[], None);
        let first = c.resolve(&p).expect("mapped");
        let second = c.resolve(&p).expect("mapped");
        assert!(Arc::ptr_eq(&first, &second), "one caller per identity");
        let permits: Vec<_> = (0..4)
            .map(|_| first.in_flight.clone().try_acquire_owned().expect("slot"))
            .collect();
        assert!(
            second.in_flight.clone().try_acquire_owned().is_err(),
            "max_requests_per_caller holds across connections"
        );
        drop(permits);
        let other = c
            .resolve(&peer(&["spiffe://corp.example/ns/a/sa/c"], &[], None))
            .expect("mapped");
        assert!(!Arc::ptr_eq(&first, &other));
        // Once nobody holds it, the next connection gets a fresh caller.
        drop((first, second));
        assert_eq!(c.resolve(&p).expect("mapped").iam_user, "svc-a-b");
    }

    #[test]
    fn the_shared_caller_map_is_swept_of_callers_nobody_holds() {
        let c = templated();
        let held: Vec<_> = (0..10)
            .map(|i| {
                c.resolve(&peer(
                    &[&format!("spiffe://corp.example/ns/held/sa/s{i}")],
                    &[],
                    None,
                ))
                .expect("mapped")
            })
            .collect();
        for i in 0..20 * MIN_SWEEP {
            let id = format!("spiffe://corp.example/ns/gone/sa/s{i}");
            drop(c.resolve(&peer(&[&id], &[], None)).expect("mapped"));
        }
        let resolved = c.resolved.lock().expect("lock");
        assert!(
            resolved.callers.len() <= 2 * MIN_SWEEP + held.len(),
            "{} entries",
            resolved.callers.len()
        );
        let live = resolved
            .callers
            .values()
            .filter(|w| w.strong_count() > 0)
            .count();
        assert_eq!(live, held.len(), "the held callers stay shared");
    }

    #[test]
    fn ten_thousand_templates_resolve_through_the_index() {
        let mut toml = String::new();
        for i in 0..10_000 {
            toml.push_str(&format!(
                "[[callers]]\nspiffe_id = \"spiffe://corp/team-{i}/{{svc}}\"\n\
                 iam_user = \"t{i}-{{svc}}\"\naws_profile = \"t{i}-{{svc}}\"\n\
                 [[callers]]\ndns_name = \"exact-{i}.corp\"\niam_user = \"e{i}\"\n\
                 aws_profile = \"e{i}\"\n"
            ));
        }
        let c = from_toml(&toml);
        for i in (0..10_000).step_by(7) {
            let id = format!("spiffe://corp/team-{i}/api");
            let t = c.resolve(&peer(&[&id], &[], None));
            assert_eq!(t.expect("template").iam_user, format!("t{i}-api"));
            // The index hands exactly one template to be matched, not all.
            let (anchor, values) = split(TemplateKind::SpiffeId, &id).expect("split");
            let tried = c
                .templates
                .candidates(TemplateKind::SpiffeId, anchor, &values);
            assert_eq!(tried.len(), 1);
            let e = c.resolve(&peer(&[], &[&format!("exact-{i}.corp")], None));
            assert_eq!(e.expect("exact").iam_user, format!("e{i}"));
        }
        let (anchor, values) =
            split(TemplateKind::SpiffeId, "spiffe://corp/team-x/api").expect("split");
        let tried = c
            .templates
            .candidates(TemplateKind::SpiffeId, anchor, &values);
        assert!(tried.is_empty(), "no template has this literal");
    }

    proptest! {
        #[test]
        fn an_exact_entry_always_wins(
            ns in "[a-z][a-z0-9-]{0,8}",
            sa in "[a-z][a-z0-9_.-]{0,8}",
        ) {
            let id = format!("spiffe://corp.example/ns/{ns}/sa/{sa}");
            let c = from_toml(&format!(
                r#"
                [[callers]]
                spiffe_id = "spiffe://corp.example/ns/{{ns}}/sa/{{sa}}"
                iam_user = "svc-{{ns}}-{{sa}}"
                aws_profile = "{{ns}}-{{sa}}"
                [[callers]]
                spiffe_id = "{id}"
                iam_user = "exact"
                aws_profile = "exact"
                "#
            ));
            let caller = c.resolve(&peer(&[&id], &[], None));
            prop_assert_eq!(&caller.expect("mapped").iam_user, "exact");
            let other = format!("spiffe://corp.example/ns/{ns}x/sa/{sa}");
            let caller = c.resolve(&peer(&[&other], &[], None));
            prop_assert_eq!(&caller.expect("mapped").iam_user, &format!("svc-{ns}x-{sa}"));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(der in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = check_leaf(&der);
            let _ = PeerIdentity::from_der(&der);
        }

        #[test]
        fn mutated_certificates_never_panic_nor_gain_an_identity_they_lack(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            static CERT: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
                let ca = Authority::new("prop CA").expect("CA");
                ca.client(&ClientSpec::spiffe("spiffe://corp/ns/a/sa/a")).expect("cert").der()
            });
            let mut der = CERT.clone();
            for (index, byte) in flips {
                let i = index.index(der.len());
                der[i] ^= byte | 1;
            }
            if let Ok(peer) = PeerIdentity::from_der(&der) {
                prop_assert!(peer.uris.len() + peer.dns_names.len() <= MAX_SANS);
                prop_assert!(peer.presented().len() <= MAX_PRESENTED_LEN + 20);
                // Resolution of whatever survived is still exact: only the
                // untouched SPIFFE ID maps to caller "a".
                if let Ok(c) = callers().resolve(&peer) {
                    prop_assert_eq!(&peer.uris, &vec!["spiffe://corp/ns/a/sa/a".to_owned()]);
                    prop_assert_eq!(&c.iam_user, "a");
                }
            }
        }
    }
}
