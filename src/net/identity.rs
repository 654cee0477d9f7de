//! Caller identity: what a verified client certificate says about its holder,
//! the rules a client leaf must follow, and which configured caller (and so
//! which IAM user) the holder is.
//!
//! A certificate whose URI SAN is a SPIFFE ID is an X.509-SVID and is
//! identified by that ID alone: its DNS SANs and CN are not consulted, so an
//! SVID issued for one workload can never pass as a DNS or CN caller.

use std::{collections::HashMap, fmt, sync::Arc};

use tokio::sync::Semaphore;
use x509_parser::{
    certificate::X509Certificate,
    extensions::{GeneralName, ParsedExtension},
    prelude::FromDer,
};

use crate::{
    config::{CallerSettings, MAX_NAME_LEN, Matcher},
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
    /// The identity that matched, as configured (for logs and spans).
    pub identity: String,
    /// The matcher's kind and value together (`spiffe:<id>`, `dns:<name>`,
    /// `cn:<name>`): what this caller's records in the state store are
    /// keyed by, so that a DNS-name caller and a CN caller with the same
    /// value never share a failure counter or a `request_id` record.
    pub key: String,
    /// The IAM user this caller acts as, as configured.
    pub iam_user: String,
    /// The profile whose access key signs for that user (source
    /// `profiles`); `None` when the key is found by `iam_user`.
    pub aws_profile: Option<String>,
    /// `server.max_requests_per_caller` slots.
    pub(crate) in_flight: Arc<Semaphore>,
}

/// The `[[callers]]` table, indexed for exact lookups.
#[derive(Debug, Default)]
pub(crate) struct Callers {
    by_matcher: HashMap<Matcher, Arc<Caller>>,
}

impl Callers {
    /// Indexes the configured callers (already checked for duplicates).
    pub(crate) fn new(callers: &[CallerSettings], max_in_flight: usize) -> Self {
        let by_matcher = callers
            .iter()
            .map(|c| {
                let identity = match &c.matcher {
                    Matcher::SpiffeId(v) | Matcher::DnsName(v) | Matcher::CommonName(v) => {
                        v.clone()
                    }
                };
                let caller = Caller {
                    identity,
                    key: c.matcher.state_key(),
                    iam_user: c.iam_user.clone(),
                    aws_profile: c.aws_profile.clone(),
                    in_flight: Arc::new(Semaphore::new(max_in_flight)),
                };
                (c.matcher.clone(), Arc::new(caller))
            })
            .collect();
        Self { by_matcher }
    }

    /// Maps a certificate to exactly one caller.
    ///
    /// An X.509-SVID (a SPIFFE URI SAN) is looked up by its SPIFFE ID only.
    /// Otherwise every DNS SAN and the CN are looked up, and the call is
    /// allowed only when they all lead to one caller: a certificate that
    /// could act as two IAM users is refused rather than guessed at. A
    /// certificate with several URI SANs has no identity at all.
    pub(crate) fn resolve(&self, peer: &PeerIdentity) -> Result<Arc<Caller>, Error> {
        let not_mapped = || Error::CallerNotMapped {
            presented: peer.presented(),
        };
        if peer.uris.len() > 1 {
            return Err(not_mapped());
        }
        if let Some(uri) = peer.uris.first().filter(|u| spiffe::is_spiffe_uri(u)) {
            if spiffe::validate(uri).is_err() {
                return Err(not_mapped());
            }
            return self
                .by_matcher
                .get(&Matcher::SpiffeId(uri.clone()))
                .cloned()
                .ok_or_else(not_mapped);
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
        let mut found: Option<&Arc<Caller>> = None;
        for matcher in candidates {
            if let Some(caller) = self.by_matcher.get(&matcher) {
                match found {
                    Some(previous) if !Arc::ptr_eq(previous, caller) => return Err(not_mapped()),
                    _ => found = Some(caller),
                }
            }
        }
        found.cloned().ok_or_else(not_mapped)
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
        };
        Callers::new(
            &[
                entry(Matcher::SpiffeId("spiffe://corp/ns/a/sa/a".into()), "a"),
                entry(Matcher::DnsName("b.corp".into()), "b"),
                entry(Matcher::CommonName("c".into()), "c"),
            ],
            4,
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
