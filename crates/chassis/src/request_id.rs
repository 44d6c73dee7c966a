//! Carries the gateway's `x-request-id` from an incoming request to the
//! calls a handler makes, so one id follows a request across services.
//!
//! A tokio task-local set by the metrics middleware for the duration of the
//! handler; [`crate::Client`] reads it. Work spawned onto other tasks does
//! not inherit it (task-locals do not cross `tokio::spawn`).

use std::future::Future;

use http::HeaderMap;

/// The header name.
pub const HEADER: &str = "x-request-id";

/// Longest id accepted; the gateway's are far shorter.
const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: Option<String>;
}

/// The id if present and well-formed (visible ASCII without spaces, at most
/// 128 bytes); anything else is dropped rather than forwarded.
pub(crate) fn from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(HEADER)?.to_str().ok()?;
    let ok =
        !value.is_empty() && value.len() <= MAX_LEN && value.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| value.to_owned())
}

pub(crate) async fn scope<F: Future>(id: Option<String>, fut: F) -> F::Output {
    REQUEST_ID.scope(id, fut).await
}

/// The request id of the request being handled on this task, if any.
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_ids_are_kept() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), None);
        h.insert(HEADER, "abc-123".parse().unwrap());
        assert_eq!(from_headers(&h).as_deref(), Some("abc-123"));
        h.insert(HEADER, "has space".parse().unwrap());
        assert_eq!(from_headers(&h), None);
        h.insert(HEADER, "x".repeat(129).parse().unwrap());
        assert_eq!(from_headers(&h), None);
    }

    #[tokio::test]
    async fn current_is_scoped() {
        assert_eq!(current(), None);
        let inside = scope(Some("r1".into()), async { current() }).await;
        assert_eq!(inside.as_deref(), Some("r1"));
        assert_eq!(current(), None);
    }
}
