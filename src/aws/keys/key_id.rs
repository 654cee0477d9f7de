//! How an access key id may be shown: by its last four characters, in
//! `keys status`, audit events and logs alike.

/// What may be shown of an access key id: its last four characters.
pub(crate) fn suffix(access_key_id: &str) -> String {
    let start = access_key_id
        .char_indices()
        .rev()
        .nth(3)
        .map_or(0, |(i, _)| i);
    access_key_id[start..].to_owned()
}

/// `text` with every access key id in it (`AKIA`/`ASIA` and 16 more
/// letters or digits) cut to its last four characters: AWS's messages name
/// key ids ("The Access Key with id ... cannot be found"), and those
/// messages go into logged error causes.
pub(crate) fn redact_key_ids(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let key = bytes.get(i..i + 20).filter(|w| {
            (w.starts_with(b"AKIA") || w.starts_with(b"ASIA"))
                && w[4..]
                    .iter()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        });
        let boundary = |b: Option<&u8>| b.is_none_or(|b| !b.is_ascii_alphanumeric());
        if key.is_some()
            && boundary(i.checked_sub(1).and_then(|j| bytes.get(j)))
            && boundary(bytes.get(i + 20))
        {
            out.push('…');
            out.push_str(&text[i + 16..i + 20]);
            i += 20;
        } else {
            let c = text[i..].chars().next().unwrap_or_default();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_in_messages_keep_their_last_four_characters_only() {
        assert_eq!(
            redact_key_ids("The Access Key with id AKIAIOSFODNN7EXAMPLE cannot be found. é"),
            "The Access Key with id …MPLE cannot be found. é"
        );
        assert_eq!(redact_key_ids("ASIA1234567890ABCDEF,x"), "…CDEF,x");
        // Not a key id: too long, lower case, or inside a word.
        for text in [
            "AKIAIOSFODNN7EXAMPLEX",
            "akiaiosfodnn7example",
            "xAKIAIOSFODNN7EXAMPLE",
        ] {
            assert_eq!(redact_key_ids(text), text);
        }
    }

    #[test]
    fn a_key_id_shows_its_last_four_characters_only() {
        assert_eq!(suffix("AKIAIOSFODNN7EXAMPLE"), "MPLE");
        assert_eq!(suffix("ABC"), "ABC");
        assert_eq!(suffix(""), "");
    }
}
