//! Who the end user is: the signed-in user, as the gateway verified it.
//!
//! Routes with `auth = "jwt"` in the manifest pass the gateway, which
//! verifies the bearer token, strips any `x-flotilla-user-*` header the
//! client sent, and passes the token's `sub` as `x-flotilla-user-id`
//! ([`USER_HEADER`]); for a token of another `[gateway] jwt` issuer than
//! the first (a company's staff directory beside the system's own
//! accounts), `<issuer name>:<sub>`, so that one issuer's user is never
//! taken for another's of the same `sub`. A handler takes [`VerifiedUser`]
//! to get that id; nothing the client writes in the body or query can
//! choose it.
//!
//! The trust rule: [`crate::Service::serve`] strips `x-flotilla-user-*`
//! from any caller whose mTLS identity is not the gateway's, so only the
//! gateway can set the header. (Served without mTLS, e.g. in unit tests or
//! a binary run by hand, nothing is checked: whoever connects is believed.)

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;

use crate::ApiError;

/// The header the gateway sets from the verified token's `sub`.
pub const USER_HEADER: &str = "x-flotilla-user-id";

/// Longest accepted user id; ids are expected to be UUIDs.
const MAX_LEN: usize = 128;

/// The verified end user: the access token's subject, from
/// [`USER_HEADER`]. As an extractor it answers 401 `unauthenticated`
/// ([`VerifiedUser::unauthenticated`]) when the header is missing, empty,
/// longer than 128 bytes or not printable ASCII without spaces; the id is
/// trimmed.
///
/// ```
/// use flotilla_chassis::VerifiedUser;
///
/// async fn my_orders(user: VerifiedUser) -> String {
///     format!("orders of {}", user.as_str())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedUser(String);

impl VerifiedUser {
    /// The user's id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user from the value of [`USER_HEADER`], if it is a valid id.
    pub fn from_header(value: Option<&str>) -> Option<VerifiedUser> {
        let v = value?.trim();
        let ok = !v.is_empty() && v.len() <= MAX_LEN && v.chars().all(|c| c.is_ascii_graphic());
        ok.then(|| VerifiedUser(v.to_owned()))
    }

    /// 401 `unauthenticated`: what the extractor answers without a user,
    /// and what a handler answers for a user id it does not know.
    pub fn unauthenticated() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "sign in first: this needs an access token",
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for VerifiedUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get(USER_HEADER).and_then(|v| v.to_str().ok());
        VerifiedUser::from_header(value).ok_or_else(VerifiedUser::unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Request;

    use super::*;

    #[test]
    fn takes_the_verified_subject() {
        assert_eq!(
            VerifiedUser::from_header(Some(" u-1 ")).unwrap().as_str(),
            "u-1"
        );
        for bad in [None, Some(""), Some("a b"), Some(&*"x".repeat(200))] {
            assert!(VerifiedUser::from_header(bad).is_none(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn extracts_or_answers_401() {
        let (mut parts, ()) = Request::get("/")
            .header(USER_HEADER, "u-1")
            .body(())
            .unwrap()
            .into_parts();
        let user = VerifiedUser::from_request_parts(&mut parts, &()).await;
        assert_eq!(user.unwrap().as_str(), "u-1");

        let (mut parts, ()) = Request::get("/").body(()).unwrap().into_parts();
        let err = VerifiedUser::from_request_parts(&mut parts, &())
            .await
            .unwrap_err();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        assert_eq!(err.code, "unauthenticated");
    }
}
