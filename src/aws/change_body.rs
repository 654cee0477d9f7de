//! The IAM `ChangePassword` form body, written where its memory is wiped.
//!
//! Given the passwords, the SDK would copy them into its input struct, a
//! serializer `String` and the request body, and free all three unwiped.
//! So the SDK is given fixed placeholders, and [`FillPasswords`] replaces
//! them in the serialized body just before signing: the real passwords,
//! form-encoded as the SDK encodes them, go straight into one buffer of a
//! size computed up front (no reallocation leaves a copy), which is wiped
//! when the SDK drops the body after sending it.
//!
//! Still not wiped, because credgate does not own it: the signer's SHA-256
//! state over the body, and the HTTP client's write path (over TLS, rustls
//! encrypts a copy in its own buffer, in place).

use aws_sdk_iam::config::{ConfigBag, RuntimeComponents};
use aws_smithy_runtime_api::{
    box_error::BoxError,
    client::interceptors::{Intercept, context::BeforeTransmitInterceptorContextMut},
};
use aws_smithy_types::body::SdkBody;
use zeroize::Zeroizing;

use crate::aws::password::{self, Password};

/// What the SDK is given as `OldPassword`: unreserved characters only, so it
/// appears in the body verbatim.
pub(crate) const OLD_PLACEHOLDER: &str = "credgate-placeholder-old-password";
/// What the SDK is given as `NewPassword`.
pub(crate) const NEW_PLACEHOLDER: &str = "credgate-placeholder-new-password";

/// Puts the real passwords into a `ChangePassword` body built with the
/// placeholders (one interceptor per call; it holds wiping copies).
#[derive(Debug)]
pub(crate) struct FillPasswords {
    old: Password,
    new: Password,
}

impl FillPasswords {
    pub(crate) fn new(old: &Password, new: &Password) -> Self {
        Self {
            old: old.clone(),
            new: new.clone(),
        }
    }
}

impl Intercept for FillPasswords {
    fn name(&self) -> &'static str {
        "credgate-fill-passwords"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request_mut();
        let body = request
            .body()
            .bytes()
            .ok_or("the ChangePassword body is not in memory")?;
        let filled = fill(body, &self.old, &self.new).inspect_err(|e| {
            // A serializer change in the SDK; nothing was sent.
            tracing::error!(error = %e, "cannot build the ChangePassword body");
        })?;
        let len = filled.len();
        *request.body_mut() = SdkBody::from(password::wiped_on_drop(filled));
        request
            .headers_mut()
            .insert("content-length", len.to_string());
        Ok(())
    }
}

/// `body` with each placeholder value replaced by its password,
/// form-encoded; an error unless each placeholder is there exactly once.
fn fill(body: &[u8], old: &Password, new: &Password) -> Result<Zeroizing<Vec<u8>>, String> {
    let pairs = || body.split(|b| *b == b'&');
    // Some(true): the old password's pair, Some(false): the new one's.
    let placeholder = |pair: &[u8]| match pair {
        p if p == format!("OldPassword={OLD_PLACEHOLDER}").as_bytes() => Some(true),
        p if p == format!("NewPassword={NEW_PLACEHOLDER}").as_bytes() => Some(false),
        _ => None,
    };
    let (mut olds, mut news) = (0, 0);
    for pair in pairs() {
        match placeholder(pair) {
            Some(true) => olds += 1,
            Some(false) => news += 1,
            None => {}
        }
    }
    if (olds, news) != (1, 1) {
        return Err(format!(
            "expected each password placeholder once in the body, found OldPassword {olds}, NewPassword {news}"
        ));
    }
    let key_len = "OldPassword=".len();
    let size = body.len() - OLD_PLACEHOLDER.len() - NEW_PLACEHOLDER.len()
        + encoded_len(old.expose())
        + encoded_len(new.expose());
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    for (i, pair) in pairs().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        match placeholder(pair) {
            Some(is_old) => {
                out.extend_from_slice(&pair[..key_len]);
                encode(if is_old { old } else { new }.expose(), &mut out);
            }
            None => out.extend_from_slice(pair),
        }
    }
    debug_assert_eq!(out.len(), size);
    Ok(out)
}

/// Whether the SDK's form encoding (`urlencoding`) leaves `b` as it is.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

fn encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|b| if unreserved(b) { 1 } else { 3 })
        .sum()
}

/// Percent-encodes `text` into `out` as the SDK would (a space is `%20`).
fn encode(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in text.bytes() {
        if unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> Password {
        Password::new(s.to_owned())
    }

    fn body() -> String {
        format!(
            "Action=ChangePassword&Version=2010-05-08&OldPassword={OLD_PLACEHOLDER}&NewPassword={NEW_PLACEHOLDER}"
        )
    }

    #[test]
    fn placeholders_become_the_form_encoded_passwords_in_a_buffer_of_exact_size() {
        let filled =
            fill(body().as_bytes(), &pw("a b&c=d+e%"), &pw("Ünïcode~.-_ \t")).expect("filled");
        assert_eq!(filled.capacity(), filled.len(), "sized up front");
        assert_eq!(
            std::str::from_utf8(&filled).expect("ascii"),
            "Action=ChangePassword&Version=2010-05-08&OldPassword=a%20b%26c%3Dd%2Be%25\
             &NewPassword=%C3%9Cn%C3%AFcode~.-_%20%09"
        );
    }

    #[test]
    fn everything_but_unreserved_characters_is_percent_encoded() {
        let text = "Sp ace&=+%/:,é\u{ff}~._-AZaz09";
        let mut ours = Vec::new();
        encode(text, &mut ours);
        assert_eq!(
            std::str::from_utf8(&ours).expect("ascii"),
            "Sp%20ace%26%3D%2B%25%2F%3A%2C%C3%A9%C3%BF~._-AZaz09"
        );
        assert_eq!(encoded_len(text), ours.len());
    }

    #[test]
    fn a_body_without_exactly_one_of_each_placeholder_is_refused() {
        let old = format!("OldPassword={OLD_PLACEHOLDER}");
        for bad in [
            "Action=ChangePassword".to_owned(),
            format!("{old}&{old}&NewPassword={NEW_PLACEHOLDER}"),
            format!("{old}&NewPassword=other"),
        ] {
            assert!(fill(bad.as_bytes(), &pw("a"), &pw("b")).is_err(), "{bad}");
        }
    }
}
