//! The one body type that flows through the gateway's tower stack, a
//! wrapper that keeps a value (a load guard) alive until a body is
//! finished, and the error of a request body the client paused in.
//!
//! Request and response bodies stream; boxing them to one type lets the
//! proxy, static files and generated error responses share the stack.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A request body of which the client sent nothing more for `timeout`
/// (`[gateway.limits] body_timeout`) while the gateway was waiting for
/// it: over HTTP/1 from `h1`'s connection, over HTTP/2 from `server`'s
/// streams. Whatever reads the body answers 408 on it, as for a body the
/// route's `timeout` ran out on, and charges no instance: the wait was
/// the client's. A type of its own, found by [`cause`], so that no other
/// body error becomes a 408.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing more of the request body for {}", humantime::format_duration(*.timeout))]
pub(crate) struct BodyStalled {
    pub timeout: Duration,
}

/// The first error of type `T` in `error`'s chain (`error` itself
/// first): a body error reaches its reader boxed, maybe within others.
pub(crate) fn cause<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        source = e.source();
    }
    None
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// `inner`, plus `held`, which is dropped only when the body is: used to
    /// count a request as in flight on its instance until the client has the
    /// whole response.
    pub(crate) struct Holding<B, T> {
        #[pin]
        inner: B,
        held: T,
    }
}

impl<B, T> Holding<B, T> {
    pub(crate) fn new(inner: B, held: T) -> Self {
        Holding { inner, held }
    }
}

impl<B: http_body::Body, T> http_body::Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn holding_keeps_its_value_until_the_body_is_dropped() {
        let token = Arc::new(());
        let body = Holding::new(full("abc"), Arc::clone(&token));
        assert_eq!(Arc::strong_count(&token), 2);
        let bytes = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(&bytes[..], b"abc");
        assert_eq!(Arc::strong_count(&token), 1);
    }
}
