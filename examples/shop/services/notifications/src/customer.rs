//! Whose notifications: the signed-in user, as the gateway verified it.
//!
//! Its route carries `auth = "jwt"` in the manifest: the gateway
//! verifies the bearer token, strips any `x-flotilla-user-*` header the
//! client sent, and passes the token's `sub` as `x-flotilla-user-id`.
//! Messages belong to that id; nothing the client writes in the body or query
//! can choose the customer. The chassis strips `x-flotilla-user-*` from any
//! caller whose mTLS identity is not the gateway's, so only the gateway can
//! set it.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use flotilla_chassis::ApiError;

/// The header the gateway sets from the verified token's `sub`.
pub const USER_HEADER: &str = "x-flotilla-user-id";

/// Longest accepted user id; accounts issues UUIDs.
const MAX_LEN: usize = 128;

/// A verified customer identity: the token's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customer(String);

impl Customer {
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn from_header(value: Option<&str>) -> Option<Customer> {
        let v = value?.trim();
        let ok = !v.is_empty() && v.len() <= MAX_LEN && v.chars().all(|c| c.is_ascii_graphic());
        ok.then(|| Customer(v.to_owned()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Customer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(USER_HEADER).and_then(|v| v.to_str().ok());
        Customer::from_header(value).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "sign in first: notifications belong to the signed-in user",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_verified_subject() {
        assert_eq!(
            Customer::from_header(Some(" u-1 ")).unwrap().as_str(),
            "u-1"
        );
        for bad in [None, Some(""), Some("a b"), Some(&*"x".repeat(200))] {
            assert!(Customer::from_header(bad).is_none(), "{bad:?}");
        }
    }
}
