//! Carries the incoming W3C `traceparent` header to the events a handler
//! creates, so an event joins the trace of the request that caused it, and
//! its trace id to the handler's log lines (`logging`).
//!
//! There is no span export yet: the chassis does not start spans of its
//! own, it only passes on the context it was given (the gateway's, or the
//! broker's when it pushes an event). Like [`crate::request_id`], this is a
//! task-local set by the metrics middleware for the duration of a handler;
//! work spawned onto other tasks does not inherit it.

use std::future::Future;

use http::HeaderMap;

/// The header name, and the CloudEvents extension that carries the same
/// value (Distributed Tracing extension).
pub(crate) const TRACEPARENT: &str = "traceparent";

tokio::task_local! {
    static CURRENT: Option<String>;
}

/// The header's value if it is a well-formed version-00 `traceparent`
/// (`00-<32 hex>-<16 hex>-<2 hex>`, ids not all zero); anything else is
/// dropped rather than propagated.
pub(crate) fn from_headers(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?.trim();
    valid(value).then(|| value.to_ascii_lowercase())
}

fn valid(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [version, trace, span, flags]
        if *version == "00"
            && hex(trace, 32) && nonzero(trace)
            && hex(span, 16) && nonzero(span)
            && hex(flags, 2))
}

pub(crate) async fn scope<F: Future>(traceparent: Option<String>, fut: F) -> F::Output {
    CURRENT.scope(traceparent, fut).await
}

/// The trace context of the request being handled on this task, if any.
pub(crate) fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok().flatten()
}

/// The trace id (32 hex digits) of the request being handled on this
/// task, if any: what its log lines carry as `trace_id`, as the gateway's
/// access log does.
pub(crate) fn current_trace_id() -> Option<String> {
    CURRENT
        .try_with(|tp| {
            tp.as_deref()
                .and_then(|tp| tp.get(3..35))
                .map(str::to_owned)
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_traceparents_are_kept() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), None);
        let ok = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        h.insert(TRACEPARENT, ok.parse().unwrap());
        assert_eq!(from_headers(&h).as_deref(), Some(ok));
        for bad in [
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "garbage",
        ] {
            h.insert(TRACEPARENT, bad.parse().unwrap());
            assert_eq!(from_headers(&h), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn current_is_scoped() {
        assert_eq!(current(), None);
        let inside = scope(Some("tp".into()), async { current() }).await;
        assert_eq!(inside.as_deref(), Some("tp"));
        assert_eq!(current(), None);
    }
}
