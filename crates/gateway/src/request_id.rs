//! Request ids: every request gets one, the upstream sees it and the client
//! gets it back, so a client's bug report, the access log, the service's
//! logs and traces can be joined on one value.
//!
//! A client-supplied `x-request-id` is kept when it is well-formed (1–128
//! characters from `[A-Za-z0-9._:-]`), so callers can correlate across
//! systems; anything else is replaced, because the id is copied into logs
//! and headers and must not carry arbitrary bytes.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, FutureExt};
use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::body::Body;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The id of the current request, in request extensions.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    fn generate() -> RequestId {
        // A v4 UUID from the thread-local CSPRNG: `Uuid::new_v4` would ask
        // the OS for randomness (a syscall) on every request.
        let id = uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string();
        // A hyphenated UUID is always a valid header value.
        RequestId(HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-")))
    }

    /// Keeps `value` if it is a well-formed id, else makes a new one.
    fn keep_or_generate(value: Option<&HeaderValue>) -> RequestId {
        match value {
            Some(v) if is_valid(v.as_bytes()) => RequestId(v.clone()),
            _ => RequestId::generate(),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ever built from validated ASCII or a UUID.
        self.0.to_str().unwrap_or("-")
    }
}

/// 1–128 visible ASCII characters from `[A-Za-z0-9._:-]`.
pub(crate) fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Sets the request id on the request (header and extension) and the response.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestIdService<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for RequestIdService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let id = RequestId::keep_or_generate(req.headers().get(&X_REQUEST_ID));
        req.headers_mut().insert(X_REQUEST_ID.clone(), id.0.clone());
        req.extensions_mut().insert(id.clone());
        let fut = self.inner.call(req).boxed();
        Box::pin(async move {
            let mut res = fut.await?;
            res.headers_mut().insert(X_REQUEST_ID.clone(), id.0);
            Ok(res)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_ids_are_accepted() {
        assert!(is_valid(b"a"));
        assert!(is_valid(b"3f2a9c1e-0b7d-4c5e-9a8b-1234567890ab"));
        assert!(is_valid(b"trace:span.1_x-Y"));
        assert!(is_valid("x".repeat(128).as_bytes()));
    }

    #[test]
    fn malformed_ids_are_rejected() {
        assert!(!is_valid(b""));
        assert!(!is_valid("x".repeat(129).as_bytes()));
        assert!(!is_valid(b"has space"));
        assert!(!is_valid(b"semi;colon"));
        assert!(!is_valid(b"slash/"));
        assert!(!is_valid(b"new\nline"));
        assert!(!is_valid("caf\u{e9}".as_bytes()));
    }

    #[test]
    fn invalid_incoming_id_is_replaced_by_a_uuid() {
        let kept = RequestId::keep_or_generate(Some(&HeaderValue::from_static("abc-123")));
        assert_eq!(kept.as_str(), "abc-123");
        let replaced = RequestId::keep_or_generate(Some(&HeaderValue::from_static("a b")));
        assert!(uuid::Uuid::parse_str(replaced.as_str()).is_ok());
        let generated = RequestId::keep_or_generate(None);
        assert!(uuid::Uuid::parse_str(generated.as_str()).is_ok());
        assert_ne!(generated.as_str(), replaced.as_str());
    }
}
