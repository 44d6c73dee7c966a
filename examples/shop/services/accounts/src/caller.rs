//! Who is calling: the user the gateway verified.
//!
//! The gateway checks the access token and forwards its `sub` as
//! `x-flotilla-user-id`, stripping any copy a client sent. This is the ONE
//! place the service reads it, and today it trusts the header from
//! whoever connects: until the mesh issue adds the trust rule (accept it
//! only over mTLS from the gateway's identity), anything that can reach the
//! service directly can claim any user. Keep the service unreachable except
//! through the gateway until then.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use flotilla_chassis::ApiError;

/// The header the gateway sets after verifying the access token.
pub const USER_ID_HEADER: &str = "x-flotilla-user-id";

/// The verified caller; extracting it fails with 401 when absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
}

/// Ids are UUIDs; anything much longer is not one of ours.
const MAX_ID_LEN: usize = 64;

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // TRUST: see the module comment; the mesh issue adds the rule here.
        let user_id = parts
            .headers
            .get(USER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= MAX_ID_LEN);
        match user_id {
            Some(id) => Ok(Caller {
                user_id: id.to_owned(),
            }),
            None => Err(unauthenticated()),
        }
    }
}

/// 401 for a request without a (known) user.
pub fn unauthenticated() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "sign in first: this needs an access token",
    )
}
