//! W3C Trace Context at the edge: every request reaches its instance with
//! a `traceparent`, as DESIGN.md has the gateway do, so that what the
//! services make of it (log lines with `trace_id`, the events they publish
//! with the CloudEvents `traceparent` extension, and their consumers'
//! work) joins one trace per client request, which the access log names
//! too.
//!
//! A client's well-formed `traceparent` is kept, so a trace a client (or
//! a proxy in front) started goes on, as Envoy and Kong do. A missing,
//! malformed or repeated one is replaced by a new trace (random trace id
//! and parent id, sampled), and `tracestate` is dropped with it: Trace
//! Context §3.3 says a `tracestate` must not be taken on without the
//! `traceparent` it belongs to.

use http::header::Entry;
use http::{HeaderMap, HeaderName, HeaderValue};

pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `00-<trace id>-<parent id>-<flags>`: the version 00 form.
const LEN: usize = 55;

/// Keeps the trace the request's `headers` carry, or starts one.
pub(crate) fn keep_or_start(headers: &mut HeaderMap) {
    match headers.entry(&TRACEPARENT) {
        Entry::Occupied(mut given) => {
            let mut values = given.iter();
            let kept =
                values.next().is_some_and(|v| is_valid(v.as_bytes())) && values.next().is_none();
            if !kept {
                given.insert(start());
                headers.remove(&TRACESTATE);
            }
        }
        Entry::Vacant(none) => {
            none.insert(start());
            // A `tracestate` without its `traceparent` belongs to no trace.
            if headers.contains_key(&TRACESTATE) {
                headers.remove(&TRACESTATE);
            }
        }
    }
}

/// The trace id of a kept or started `traceparent`: its 32 hex digits.
pub(crate) fn trace_id(traceparent: &HeaderValue) -> Option<&str> {
    traceparent.to_str().ok()?.get(3..35)
}

/// A new trace: random trace and parent ids from the thread's CSPRNG (as
/// request ids are made), sampled, so that a tracer behind the gateway
/// records it.
fn start() -> HeaderValue {
    let mut random = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    // All-zero ids are invalid; 2^-64 at worst, but never sent.
    if random[16..].iter().all(|&b| b == 0) {
        random[23] = 1;
    }
    if random[..16].iter().all(|&b| b == 0) {
        random[15] = 1;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; LEN];
    buf[..3].copy_from_slice(b"00-");
    let mut at = 3;
    for (i, byte) in random.iter().enumerate() {
        if i == 16 {
            buf[at] = b'-';
            at += 1;
        }
        buf[at] = HEX[usize::from(byte >> 4)];
        buf[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    buf[at..].copy_from_slice(b"-01");
    // Hex digits and hyphens.
    crate::headers::own_value(bytes::Bytes::from_owner(buf))
}

/// Whether `v` is a `traceparent` to keep: version 00 exactly as the
/// specification writes it (lower-case hex, ids not all zero), or a later
/// version (not `ff`) whose first 55 characters read so and whose rest, if
/// any, starts with `-` (§3.2.4: a newer version is parsed as 00).
fn is_valid(v: &[u8]) -> bool {
    let hex = |s: &[u8]| s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|&b| b != b'0');
    if v.len() < LEN {
        return false;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let newer = version != b"00";
    hex(version)
        && version != b"ff"
        && (v.len() == LEN || (newer && v[LEN] == b'-'))
        && v[2] == b'-'
        && v[35] == b'-'
        && v[52] == b'-'
        && hex(trace)
        && nonzero(trace)
        && hex(parent)
        && nonzero(parent)
        && hex(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn only_well_formed_traceparents_are_valid() {
        assert!(is_valid(GIVEN.as_bytes()));
        // A later version with more after the 00 fields.
        assert!(is_valid(
            b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-later"
        ));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert!(!is_valid(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_started_trace_is_valid_random_and_sampled() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let v = start();
            assert!(is_valid(v.as_bytes()), "{v:?}");
            assert!(v.as_bytes().ends_with(b"-01"));
            let id = trace_id(&v).unwrap_or_default().to_string();
            assert_eq!(id.len(), 32);
            assert!(seen.insert(id), "a trace id twice");
        }
    }

    #[test]
    fn a_good_trace_is_kept_and_anything_else_replaced_without_its_state() {
        let header = |s: &'static str| HeaderValue::from_static(s);
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, header(GIVEN));
        h.insert(&TRACESTATE, header("vendor=1"));
        keep_or_start(&mut h);
        assert_eq!(h.get(&TRACEPARENT), Some(&header(GIVEN)));
        assert_eq!(h.get(&TRACESTATE), Some(&header("vendor=1")));

        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, header("00-nonsense"));
        h.insert(&TRACESTATE, header("vendor=1"));
        keep_or_start(&mut h);
        let started = h.get(&TRACEPARENT).cloned().unwrap_or(header(""));
        assert!(is_valid(started.as_bytes()), "{started:?}");
        assert_eq!(h.get(&TRACESTATE), None);

        // Two are one too many: which would be the parent?
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, header(GIVEN));
        h.append(&TRACEPARENT, header(GIVEN));
        keep_or_start(&mut h);
        assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
        assert_ne!(h.get(&TRACEPARENT), Some(&header(GIVEN)));

        let mut h = HeaderMap::new();
        h.insert(&TRACESTATE, header("vendor=1"));
        keep_or_start(&mut h);
        assert!(h.get(&TRACEPARENT).is_some_and(|v| is_valid(v.as_bytes())));
        assert_eq!(h.get(&TRACESTATE), None);
        assert_eq!(
            trace_id(&header(GIVEN)),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
    }
}
