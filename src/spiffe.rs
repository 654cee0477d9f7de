//! SPIFFE ID syntax, as the SPIFFE-ID specification (section 2) defines it:
//! `spiffe://<trust-domain><path>`, checked in `[[callers]]` and on every
//! X.509-SVID a client presents.

/// Longest SPIFFE ID the specification allows, in bytes.
pub(crate) const MAX_LEN: usize = 2048;
/// Longest trust domain name, in bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Whether a URI names itself a SPIFFE ID, valid or not: such a URI SAN makes
/// a certificate an X.509-SVID.
pub(crate) fn is_spiffe_uri(uri: &str) -> bool {
    uri.get(..SCHEME.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
}

/// Checks `id` against the specification; the error says which rule broke.
pub(crate) fn validate(id: &str) -> Result<(), String> {
    if id.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} bytes"));
    }
    let Some(rest) = id.strip_prefix(SCHEME) else {
        return Err("must start with spiffe:// (lower case)".to_owned());
    };
    let (trust_domain, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if trust_domain.is_empty() {
        return Err("empty trust domain".to_owned());
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "trust domain longer than {MAX_TRUST_DOMAIN_LEN} bytes"
        ));
    }
    if let Some(c) = trust_domain.chars().find(|c| !is_trust_domain_char(*c)) {
        return Err(match c {
            ':' => "the trust domain must not carry a port".to_owned(),
            '@' => "a SPIFFE ID must not carry userinfo".to_owned(),
            '?' => "a SPIFFE ID must not carry a query".to_owned(),
            '#' => "a SPIFFE ID must not carry a fragment".to_owned(),
            c if c.is_ascii_uppercase() => "the trust domain must be lower case".to_owned(),
            c => format!(
                "character {c:?} is not allowed in a trust domain (a-z, 0-9, '.', '-', '_')"
            ),
        });
    }
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("the path must not end with '/'".to_owned());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("the path has an empty segment ('//')".to_owned()),
            "." | ".." => return Err("the path must not contain '.' or '..' segments".to_owned()),
            _ => {}
        }
        if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
            return Err(match c {
                '?' => "a SPIFFE ID must not carry a query".to_owned(),
                '#' => "a SPIFFE ID must not carry a fragment".to_owned(),
                c if c.is_whitespace() => "a SPIFFE ID must not contain whitespace".to_owned(),
                c => format!(
                    "character {c:?} is not allowed in a path segment \
                     (a-z, A-Z, 0-9, '.', '-', '_')"
                ),
            });
        }
    }
    Ok(())
}

fn is_trust_domain_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn valid_ids_pass() {
        for id in [
            "spiffe://corp.example",
            "spiffe://corp.example/ns/portal/sa/portal",
            "spiffe://a-b_c.d/x.y-z_/A9",
        ] {
            assert_eq!(validate(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn each_rule_is_enforced_with_its_own_message() {
        let cases = [
            ("https://corp/ns/a", "spiffe://"),
            ("SPIFFE://corp/ns/a", "spiffe://"),
            ("spiffe:///ns/a", "empty trust domain"),
            ("spiffe://corp:8443/ns/a", "port"),
            ("spiffe://user@corp/ns/a", "userinfo"),
            ("spiffe://Corp/ns/a", "lower case"),
            ("spiffe://corp/ns/a?x=1", "query"),
            ("spiffe://corp/ns/a#frag", "fragment"),
            ("spiffe://corp/ns/../a", "'..'"),
            ("spiffe://corp/ns/./a", "'.'"),
            ("spiffe://corp/ns//a", "empty segment"),
            ("spiffe://corp/ns/a/", "end with '/'"),
            ("spiffe://corp/ns/a b", "whitespace"),
            ("spiffe://corp/ns/%41", "not allowed"),
        ];
        for (id, needle) in cases {
            let err = validate(id).expect_err(id);
            assert!(err.contains(needle), "{id}: {err}");
        }
        assert!(validate(&format!("spiffe://corp/{}", "a".repeat(MAX_LEN))).is_err());
    }

    proptest! {
        #[test]
        fn validation_never_panics(id in ".{0,300}") {
            let _ = validate(&id);
            let _ = is_spiffe_uri(&id);
        }

        #[test]
        fn well_formed_ids_are_accepted(
            td in "[a-z0-9][a-z0-9.-]{0,30}",
            segments in proptest::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,10}", 0..6),
        ) {
            let segments: Vec<_> = segments.into_iter().filter(|s| s != "." && s != "..").collect();
            let path: String = segments.iter().map(|s| format!("/{s}")).collect();
            let id = format!("spiffe://{td}{path}");
            prop_assert_eq!(validate(&id), Ok(()), "{}", id);
        }

        #[test]
        fn anything_after_a_valid_id_but_path_characters_is_refused(
            suffix in "[?#@: %]{1}[a-z]{0,5}",
        ) {
            let id = format!("spiffe://corp.example/ns/a{suffix}");
            prop_assert!(validate(&id).is_err(), "{}", id);
        }
    }
}
