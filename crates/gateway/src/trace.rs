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
//! come from a per-thread wyrand generator seeded from the thread's
//! CSPRNG: trace ids must be unlikely to collide, not secret.

use std::cell::Cell;

use http::{HeaderMap, HeaderName, HeaderValue};

pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

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
        Started([next(), next() | 1, next() | 1])
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

thread_local! {
    static STATE: Cell<u64> = Cell::new(rand::RngCore::next_u64(&mut rand::rng()));
}

/// wyrand: one multiply per 64 bits.
fn next() -> u64 {
    STATE.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

/// `x` as 16 lower-case hex digits, most significant first, without a
/// table: each nibble spread into a byte of its own, then made a digit.
fn hex(x: u64) -> [u8; 16] {
    fn spread(x: u32) -> u64 {
        let mut x = u64::from(x);
        x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    fn digits(n: u64) -> u64 {
        // Nibbles of 10 and more get 'a' - '0' - 10 = 39 more.
        let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        n + 0x3030_3030_3030_3030 + letters * 39
    }
    // `spread` puts a u32's nibbles one to a byte, the most significant
    // in the most significant byte: read big-endian, they are in order.
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&digits(spread((x >> 32) as u32)).to_be_bytes());
    out[8..].copy_from_slice(&digits(spread(x as u32)).to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn hex_is_what_format_writes() {
        for x in [
            0u64,
            1,
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            u64::MAX,
            0xa0a0_0505_f00f_9999,
        ] {
            assert_eq!(
                std::str::from_utf8(&hex(x)).unwrap_or_default(),
                format!("{x:016x}")
            );
        }
        for _ in 0..1000 {
            let x = next();
            assert_eq!(
                std::str::from_utf8(&hex(x)).unwrap_or_default(),
                format!("{x:016x}")
            );
        }
    }

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
