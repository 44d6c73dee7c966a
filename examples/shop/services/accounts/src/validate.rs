//! Input rules for e-mail addresses, passwords and display names, each
//! failing with a [`FieldError`] that names the field.
//!
//! E-mail addresses are normalised (trimmed, lower-cased) before they are
//! checked, stored or compared, so `Alice@Example.com` and
//! `alice@example.com` are one account. Only ASCII addresses are accepted:
//! internationalised ones (RFC 6531) would need IDNA and Unicode
//! normalisation to compare safely, which this does not do.

use flotilla_chassis::FieldError;

/// Longest address (RFC 5321's path limit less the angle brackets).
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;
/// Shortest password, in characters (NIST SP 800-63B asks at least 8).
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password, in bytes: long passphrases are welcome, megabytes of
/// input to a deliberately slow hash are not.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// `raw` as a normalised e-mail address.
pub fn email(field: &str, raw: Option<&str>) -> Result<String, FieldError> {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else {
        return Err(FieldError::new(field, "is required"));
    };
    let value = raw.to_ascii_lowercase();
    let invalid = || FieldError::new(field, "must be an e-mail address like alice@example.com");
    if value.len() > MAX_EMAIL_LEN {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_EMAIL_LEN} characters"),
        ));
    }
    let Some((local, domain)) = value.rsplit_once('@') else {
        return Err(invalid());
    };
    if local.len() > MAX_LOCAL_LEN {
        return Err(FieldError::new(
            field,
            format!("the part before @ must be at most {MAX_LOCAL_LEN} characters"),
        ));
    }
    let local_ok = !local.is_empty()
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && !tld.chars().all(|c| c.is_ascii_digit()));
    if local_ok && domain_ok {
        Ok(value)
    } else {
        Err(invalid())
    }
}

/// A new password: [`MIN_PASSWORD_CHARS`] to [`MAX_PASSWORD_BYTES`], not the
/// e-mail address. Taken as is: spaces are part of a passphrase.
pub fn new_password(raw: Option<&str>, email: Option<&str>) -> Result<String, FieldError> {
    let field = "password";
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Err(FieldError::new(field, "is required"));
    };
    if raw.chars().count() < MIN_PASSWORD_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at least {MIN_PASSWORD_CHARS} characters"),
        ));
    }
    if raw.len() > MAX_PASSWORD_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    if email.is_some_and(|e| raw.trim().eq_ignore_ascii_case(e)) {
        return Err(FieldError::new(field, "must not be your e-mail address"));
    }
    Ok(raw.to_owned())
}

/// A password presented at login: present and not oversized. Its other
/// rules are not checked: a wrong password is just wrong credentials.
pub fn login_password(raw: Option<&str>) -> Result<String, FieldError> {
    let field = "password";
    match raw {
        None | Some("") => Err(FieldError::new(field, "is required")),
        Some(p) if p.len() > MAX_PASSWORD_BYTES => Err(FieldError::new(
            field,
            format!("must be at most {MAX_PASSWORD_BYTES} bytes"),
        )),
        Some(p) => Ok(p.to_owned()),
    }
}

/// An optional display name: trimmed, empty is none, no control characters.
pub fn name(raw: Option<&str>) -> Result<Option<String>, FieldError> {
    let field = "name";
    let Some(name) = raw.map(str::trim).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(FieldError::new(
            field,
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(Some(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            email("email", Some("  Alice.B+shop@Example.COM ")).unwrap(),
            "alice.b+shop@example.com"
        );
        assert_eq!(
            email("email", Some("o'hara@sub.example.co.uk")).unwrap(),
            "o'hara@sub.example.co.uk"
        );
        for bad in [
            "alice",
            "@example.com",
            "alice@",
            "a@b",
            "a@@b.com",
            "a b@c.de",
            "a@.com",
            "a@c.",
            ".a@example.com",
            "a.@example.com",
            "a..b@example.com",
            "a@-x.com",
            "a@x-.com",
            "a@x..com",
            "a@1.2.3.4",
            "\"quoted\"@example.com",
            "ünï@example.com",
            "a@exa_mple.com",
            "a@example.c",
        ] {
            let err = email("email", Some(bad)).unwrap_err();
            assert_eq!(err.field, "email", "{bad}");
        }
        assert_eq!(email("email", None).unwrap_err().message, "is required");
        assert_eq!(
            email("email", Some("  ")).unwrap_err().message,
            "is required"
        );
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(
            email("email", Some(&long_local))
                .unwrap_err()
                .message
                .contains("64")
        );
        let long = format!("a@{}.com", "b".repeat(250));
        assert!(
            email("email", Some(&long))
                .unwrap_err()
                .message
                .contains("254")
        );
    }

    #[test]
    fn passwords_have_length_limits_and_are_not_the_email() {
        assert_eq!(
            new_password(Some(" ten chars "), None).unwrap(),
            " ten chars ",
            "kept as typed"
        );
        assert!(new_password(Some("123456789"), None).is_err());
        // Characters, not bytes: ten accented letters are ten characters.
        assert!(new_password(Some("éééééééééé"), None).is_ok());
        assert!(new_password(Some(&"x".repeat(1024)), None).is_ok());
        let err = new_password(Some(&"x".repeat(1025)), None).unwrap_err();
        assert!(err.message.contains("1024"), "{}", err.message);
        let err = new_password(Some("Alice@Example.com"), Some("alice@example.com")).unwrap_err();
        assert_eq!(err.message, "must not be your e-mail address");
        assert_eq!(new_password(None, None).unwrap_err().message, "is required");
        assert_eq!(new_password(Some(""), None).unwrap_err().field, "password");

        assert!(login_password(Some("short")).is_ok());
        assert!(login_password(Some("")).is_err());
        assert!(login_password(Some(&"x".repeat(1025))).is_err());
    }

    #[test]
    fn names_are_optional_and_bounded() {
        assert_eq!(name(None).unwrap(), None);
        assert_eq!(name(Some("   ")).unwrap(), None);
        assert_eq!(name(Some(" Alice ")).unwrap().as_deref(), Some("Alice"));
        assert!(name(Some(&"n".repeat(101))).is_err());
        assert!(name(Some("a\u{0}b")).is_err());
    }
}
