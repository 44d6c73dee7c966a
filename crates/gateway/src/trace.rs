//! W3C Trace Context at the edge: every request reaches its instance with
//! a `traceparent`, as DESIGN.md has the gateway do, so that what the
//! services make of it (log lines with `trace_id`, the events they publish
//! with the CloudEvents `traceparent` extension, and their consumers'
//! work) joins one trace per client request, which the access log names
//! too.
//!
//! A client's well-formed `traceparent` is kept, so a trace a client (or
//! a proxy in front) started goes on, as Envoy and Kong do. A missing,
//! malformed or repeated one is replaced by a new trace (random trace and
//! parent ids, sampled), and `tracestate` is dropped with it: Trace
//! Context §3.3 says a `tracestate` must not be taken on without the
//! `traceparent` it belongs to.
//!
//! The new trace is written straight into the instance's request head
//! (`headers::forward_fields`), never put in the request's header map: a
//! first version that inserted it there, and removed `tracestate`, cost
//! ~1.5 k instructions per request (`instructions.sh`), most of it
//! hashing and moving map entries; this one ~0.5 k (making the ids at the
//! edge, writing them out as hex and the field into the head). Its ids
//! come from the gateway's id generator (`random`).

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::random::{self, hex};

pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// `00-<trace id>-<parent id>-<flags>`: the version 00 form.
const LEN: usize = 55;

/// A trace the gateway starts for a request, sent in its place when the
/// request brings no `traceparent` to keep: its random ids (the trace
/// id's two halves, the parent id), written out only when sent or logged,
/// so that carrying it with the request copies 24 bytes, not 55.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Started([u64; 3]);

impl Started {
    /// A new trace: random trace and parent ids, sampled, so that a tracer
    /// behind the gateway records it. Never all-zero ids (invalid): the low
    /// bit of each id's last word is set.
    pub(crate) fn new() -> Started {
        Started([random::next(), random::next() | 1, random::next() | 1])
    }

    /// As a `traceparent` value.
    pub(crate) fn text(&self) -> [u8; LEN] {
        let mut buf = *b"00-................................-................-01";
        buf[3..19].copy_from_slice(&hex(self.0[0]));
        buf[19..35].copy_from_slice(&hex(self.0[1]));
        buf[36..52].copy_from_slice(&hex(self.0[2]));
        buf
    }

    /// Its trace id: 32 hex digits.
    pub(crate) fn trace_id(&self) -> [u8; 32] {
        let mut id = [0u8; 32];
        id[..16].copy_from_slice(&hex(self.0[0]));
        id[16..].copy_from_slice(&hex(self.0[1]));
        id
    }
}

/// The `traceparent` of `headers` to keep: exactly one, well-formed.
pub(crate) fn kept(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    match (all.next(), all.next()) {
        (Some(one), None) if is_valid(one.as_bytes()) => Some(one),
        _ => None,
    }
}

/// The trace id of a kept `traceparent`.
pub(crate) fn trace_id_of(traceparent: &HeaderValue) -> Option<[u8; 32]> {
    let mut id = [0u8; 32];
    id.copy_from_slice(traceparent.as_bytes().get(3..35)?);
    Some(id)
}

/// Whether `v` is a `traceparent` to keep: version 00 exactly as the
/// specification writes it (lower-case hex, ids not all zero), or a later
/// version (not `ff`) whose first 55 characters read so and whose rest, if
/// any, starts with `-` (§3.2.4: a newer version is parsed as 00).
pub(crate) fn is_valid(v: &[u8]) -> bool {
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
            let started = Started::new();
            let text = started.text();
            assert!(is_valid(&text), "{started:?}");
            assert!(text.ends_with(b"-01"));
            assert_eq!(&text[3..35], &started.trace_id()[..]);
            assert!(seen.insert(started.trace_id()), "a trace id twice");
        }
    }

    #[test]
    fn only_one_good_traceparent_is_kept() {
        let header = HeaderValue::from_static;
        let mut h = HeaderMap::new();
        assert_eq!(kept(&h), None);
        h.insert(&TRACEPARENT, header(GIVEN));
        assert_eq!(kept(&h), Some(&header(GIVEN)));
        assert_eq!(
            kept(&h).and_then(trace_id_of).as_ref().map(|id| &id[..]),
            Some(&b"0af7651916cd43dd8448eb211c80319c"[..])
        );
        // Two are one too many: which would be the parent?
        h.append(&TRACEPARENT, header(GIVEN));
        assert_eq!(kept(&h), None);
        h.insert(&TRACEPARENT, header("00-nonsense"));
        assert_eq!(kept(&h), None);
    }
}
