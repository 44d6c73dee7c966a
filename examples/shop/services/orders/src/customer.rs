//! Who is ordering: a stand-in until accounts and JWT land.
//!
//! Today the client simply claims a customer: the `customer` field of
//! `POST /api/orders` and the `customer` query parameter of
//! `GET /api/orders`. Nothing verifies it, so anyone can read anyone's
//! orders. When the gateway verifies JWTs and passes the user in
//! `x-flotilla-user-*` headers, replace [`Customer::from_claim`] with an
//! extractor reading those headers; handlers take a [`Customer`] and do not
//! change.

use flotilla_chassis::FieldError;

/// A customer identity: a normalised (trimmed, lower-case) e-mail address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer(String);

/// Longest address (RFC 5321's path limit).
const MAX_LEN: usize = 254;

impl Customer {
    /// Accepts a claimed e-mail address from the request; `field` names
    /// where it came from, for the error.
    pub fn from_claim(field: &str, raw: Option<&str>) -> Result<Self, FieldError> {
        let value = raw.map(str::trim).unwrap_or_default().to_lowercase();
        let invalid = || FieldError::new(field, "must be an e-mail address like alice@example.com");
        if value.is_empty() || value.len() > MAX_LEN || value.chars().any(char::is_whitespace) {
            return Err(invalid());
        }
        let Some((local, domain)) = value.split_once('@') else {
            return Err(invalid());
        };
        let domain_ok = domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !domain.contains('@');
        if local.is_empty() || !domain_ok {
            return Err(invalid());
        }
        Ok(Customer(value))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_validates() {
        let c = Customer::from_claim("customer", Some("  Alice@Example.COM ")).unwrap();
        assert_eq!(c.as_str(), "alice@example.com");
        for bad in [
            "",
            "alice",
            "@example.com",
            "a@b",
            "a@@b.c",
            "a b@c.d",
            "a@.com",
            "a@c.",
        ] {
            let err = Customer::from_claim("customer", Some(bad)).unwrap_err();
            assert_eq!(err.field, "customer", "{bad}");
        }
        assert!(Customer::from_claim("customer", None).is_err());
    }
}
