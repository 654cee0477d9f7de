//! Passwords as a secret type, IAM's character rules, and the account
//! password policy checks run before IAM is called.

use std::fmt;

use bytes::Bytes;
use zeroize::Zeroizing;

use crate::error::Violation;

/// A console password. Its memory is wiped on drop and Debug never shows it.
#[derive(Clone)]
pub(crate) struct Password(Zeroizing<String>);

impl Password {
    /// Takes ownership of the text: the caller's `String` buffer moves in,
    /// so this makes no copy to leave behind. (The buffers the bytes came
    /// through are wiped where credgate owns them: `edge::read_body`.)
    pub(crate) fn new(text: String) -> Self {
        Self(Zeroizing::new(text))
    }

    /// The password text, for the checks and for the IAM request body
    /// (`change_body`), nothing else.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([REDACTED])")
    }
}

/// `bytes` as a `Bytes` whose memory is wiped when its last reference is
/// dropped: for the buffers that hold passwords on their way in (the request
/// body) and out (the IAM request body).
pub(crate) fn wiped_on_drop(bytes: Zeroizing<Vec<u8>>) -> Bytes {
    /// The owner `Bytes` drops last.
    struct Wiped(Zeroizing<Vec<u8>>);

    impl AsRef<[u8]> for Wiped {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    Bytes::from_owner(Wiped(bytes))
}

/// IAM's hard limit for both passwords.
pub(crate) const MAX_LEN: usize = 128;

/// Checks IAM's own rules for `OldPassword`/`NewPassword`: 1..=128 characters
/// from `[\t\n\r\u{20}-\u{FF}]`.
pub(crate) fn check_charset(field: &'static str, password: &Password) -> Result<(), Violation> {
    let text = password.expose();
    let violation = |description: String| Violation { field, description };
    if text.is_empty() {
        return Err(violation("must not be empty".to_owned()));
    }
    if text.chars().count() > MAX_LEN {
        return Err(violation(format!("must be at most {MAX_LEN} characters")));
    }
    if !text.chars().all(is_iam_char) {
        return Err(violation(
            "contains a character outside IAM's allowed set (tab, newline, carriage return, U+0020..U+00FF)"
                .to_owned(),
        ));
    }
    Ok(())
}

fn is_iam_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FF}')
}

/// The account password policy, as IAM reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Minimum number of characters.
    pub minimum_length: u32,
    /// At least one of IAM's symbols.
    pub require_symbols: bool,
    /// At least one digit.
    pub require_numbers: bool,
    /// At least one of A-Z.
    pub require_uppercase: bool,
    /// At least one of a-z.
    pub require_lowercase: bool,
    /// Whether users may change their own password.
    pub allow_users_to_change_password: bool,
    /// Days until expiry; 0 = never.
    pub max_age_days: u32,
    /// Previous passwords that cannot be reused; 0 = none.
    pub reuse_prevention: u32,
    /// Whether an expired password needs an administrator.
    pub hard_expiry: bool,
}

/// The non-alphanumeric characters IAM accepts for `RequireSymbols`.
const IAM_SYMBOLS: &str = "!@#$%^&*()_+-=[]{}|'";

impl Policy {
    /// Every rule `new_password` breaks, one violation each, so a UI can show
    /// them all at once. Reuse prevention cannot be checked here: only IAM
    /// knows the history.
    pub(crate) fn violations(&self, password: &Password) -> Vec<Violation> {
        let text = password.expose();
        let mut out = Vec::new();
        let mut rule = |unmet: bool, description: String| {
            if unmet {
                out.push(Violation {
                    field: "new_password",
                    description,
                });
            }
        };
        rule(
            text.chars().count() < self.minimum_length as usize,
            format!("must be at least {} characters", self.minimum_length),
        );
        rule(
            self.require_symbols && !text.chars().any(|c| IAM_SYMBOLS.contains(c)),
            format!("must contain at least one symbol ({IAM_SYMBOLS})"),
        );
        rule(
            self.require_numbers && !text.chars().any(|c| c.is_ascii_digit()),
            "must contain at least one number (0-9)".to_owned(),
        );
        rule(
            self.require_uppercase && !text.chars().any(|c| c.is_ascii_uppercase()),
            "must contain at least one uppercase letter (A-Z)".to_owned(),
        );
        rule(
            self.require_lowercase && !text.chars().any(|c| c.is_ascii_lowercase()),
            "must contain at least one lowercase letter (a-z)".to_owned(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw(s: &str) -> Password {
        Password::new(s.to_owned())
    }

    #[test]
    fn debug_never_shows_the_password() {
        let shown = format!("{:?}", pw("hunter2-secret"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
    }

    #[test]
    fn iam_character_rules_are_enforced() {
        assert!(check_charset("new_password", &pw("ok\tpass\u{FF}")).is_ok());
        assert!(check_charset("new_password", &pw(&"a".repeat(128))).is_ok());
        let empty = check_charset("old_password", &pw("")).expect_err("empty");
        assert_eq!(empty.field, "old_password");
        assert!(check_charset("new_password", &pw(&"a".repeat(129))).is_err());
        let bad = check_charset("new_password", &pw("abc\u{100}")).expect_err("U+0100");
        assert!(
            bad.description.contains("outside IAM's allowed set"),
            "{bad:?}"
        );
        assert!(check_charset("new_password", &pw("a\u{7}b")).is_err());
    }

    #[test]
    fn every_unmet_policy_rule_is_listed() {
        let policy = Policy {
            minimum_length: 12,
            require_symbols: true,
            require_numbers: true,
            require_uppercase: true,
            require_lowercase: true,
            ..Policy::default()
        };
        assert_eq!(policy.violations(&pw("short")).len(), 4);
        assert_eq!(policy.violations(&pw("SHORT")).len(), 4);
        assert!(policy.violations(&pw("Long-enough-1")).is_empty());
        let only_symbol = policy.violations(&pw("Longenoughxx1"));
        assert_eq!(only_symbol.len(), 1);
        assert!(only_symbol[0].description.contains("symbol"));
    }

    #[test]
    fn no_policy_means_no_violation() {
        assert!(Policy::default().violations(&pw("x")).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn the_charset_check_accepts_exactly_iams_rules(text in "\\PC{0,140}|[\t\n\r -\u{ff}]{0,140}") {
            let len = text.chars().count();
            let valid = (1..=MAX_LEN).contains(&len) && text.chars().all(is_iam_char);
            let result = check_charset("new_password", &pw(&text));
            proptest::prop_assert_eq!(result.is_ok(), valid);
            if let Err(v) = result {
                // The description never quotes the password, nor says how
                // long it is.
                proptest::prop_assert!(text.len() < 4 || !v.description.contains(&text));
                let fixed = [
                    check_charset("f", &pw("")),
                    check_charset("f", &pw(&"a".repeat(MAX_LEN + 1))),
                    check_charset("f", &pw("\u{100}")),
                ]
                .map(|r| r.map_err(|v| v.description));
                proptest::prop_assert!(
                    fixed.contains(&Err(v.description.clone())),
                    "{}", v.description
                );
            }
        }

        #[test]
        fn a_password_meeting_every_rule_has_no_violation(
            lower in "[a-z]{1,10}", upper in "[A-Z]{1,10}", digits in "[0-9]{1,10}",
            symbols in "[!@#$%^&*()_+=\\[\\]{}|'-]{1,10}", min in 0u32..40,
        ) {
            let text = format!("{lower}{upper}{digits}{symbols}");
            let policy = Policy {
                minimum_length: min,
                require_symbols: true,
                require_numbers: true,
                require_uppercase: true,
                require_lowercase: true,
                ..Policy::default()
            };
            let violations = policy.violations(&pw(&text));
            let too_short = (text.chars().count() as u32) < min;
            proptest::prop_assert_eq!(violations.len(), usize::from(too_short));
        }
    }
}
