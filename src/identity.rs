//! Caller identity: what a verified client certificate says about its holder,
//! and which configured caller (and so which IAM user) that is.

use std::{collections::HashMap, fmt, sync::Arc};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{
    config::{CallerSettings, Matcher},
    error::Error,
};

/// The identities a client certificate presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Every URI SAN; a SPIFFE identity requires exactly one.
    pub uris: Vec<String>,
    /// Every DNS SAN.
    pub dns_names: Vec<String>,
    /// The subject CN, if any.
    pub common_name: Option<String>,
}

impl PeerIdentity {
    /// Reads the identities from a DER certificate that rustls has already
    /// verified against the client CA.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| format!("client certificate does not parse: {e}"))?;
        let mut identity = Self::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => identity.uris.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => identity.dns_names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        identity.common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(identity)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        parts.extend(self.uris.iter().map(|u| format!("uri={u}")));
        parts.extend(self.dns_names.iter().map(|d| format!("dns={d}")));
        parts.extend(self.common_name.iter().map(|c| format!("cn={c}")));
        if parts.is_empty() {
            f.write_str("(no identity)")
        } else {
            f.write_str(&parts.join(","))
        }
    }
}

/// A configured caller, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity that matched, as configured (for logs and spans).
    pub identity: String,
    /// The IAM user this caller acts as.
    pub iam_user: String,
    /// The profile whose access key signs for that user.
    pub aws_profile: String,
}

/// The `[[callers]]` table, indexed for exact lookups.
#[derive(Debug, Default)]
pub struct Callers {
    by_matcher: HashMap<Matcher, Arc<Caller>>,
}

impl Callers {
    /// Indexes the configured callers (already checked for duplicates).
    pub fn new(callers: &[CallerSettings]) -> Self {
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
                    iam_user: c.iam_user.clone(),
                    aws_profile: c.aws_profile.clone(),
                };
                (c.matcher.clone(), Arc::new(caller))
            })
            .collect();
        Self { by_matcher }
    }

    /// Maps a certificate to exactly one caller.
    ///
    /// Every identity the certificate presents is looked up; the call is
    /// allowed only when they all lead to one caller. A certificate that could
    /// act as two different IAM users is refused rather than guessed at, and a
    /// certificate with several URI SANs has no SPIFFE identity at all.
    pub fn resolve(&self, peer: &PeerIdentity) -> Result<Arc<Caller>, Error> {
        let not_mapped = || Error::CallerNotMapped {
            presented: peer.to_string(),
        };
        if peer.uris.len() > 1 {
            return Err(not_mapped());
        }
        let candidates = peer
            .uris
            .iter()
            .map(|u| Matcher::SpiffeId(u.clone()))
            .chain(peer.dns_names.iter().map(|d| Matcher::DnsName(d.clone())))
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

    fn callers() -> Callers {
        let entry = |matcher, user: &str| CallerSettings {
            matcher,
            iam_user: user.into(),
            aws_profile: user.into(),
        };
        Callers::new(&[
            entry(Matcher::SpiffeId("spiffe://corp/ns/a/sa/a".into()), "a"),
            entry(Matcher::DnsName("b.corp".into()), "b"),
            entry(Matcher::CommonName("c".into()), "c"),
        ])
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
                "CALLER_NOT_MAPPED"
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
    fn a_certificate_matching_two_callers_is_refused() {
        let c = callers();
        let p = peer(&["spiffe://corp/ns/a/sa/a"], &["b.corp"], None);
        assert!(c.resolve(&p).is_err());
    }
}
