//! Request ids: every request gets one, the upstream sees it and the client
//! gets it back, so a client's bug report, the access log, the service's
//! logs and traces can be joined on one value.
//!
//! A client-supplied `x-request-id` is kept when it is well-formed (1–128
//! characters from `[A-Za-z0-9._:-]`), so callers can correlate across
//! systems; anything else is replaced, because the id is copied into logs
//! and headers and must not carry arbitrary bytes.

use http::{HeaderName, HeaderValue};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The id of the current request. Set on the request by the front of the
/// request path (`server`), which also echoes it on the response.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    fn generate() -> RequestId {
        // A v4 UUID from the gateway's id generator (`random`), written
        // in the buffer that becomes the header value's owner: one
        // allocation, which every clone of the value (the request's, the
        // response's) shares. A value copied from a slice would allocate
        // twice, once for the bytes and again when first cloned.
        let buf = crate::random::uuid_v4();
        // Hex digits and hyphens.
        RequestId(crate::headers::own_value(bytes::Bytes::from_owner(buf)))
    }

    /// Keeps `value` if it is a well-formed id, else makes a new one.
    pub(crate) fn keep_or_generate(value: Option<&HeaderValue>) -> RequestId {
        match value {
            Some(v) if is_valid(v.as_bytes()) => RequestId(v.clone()),
            _ => RequestId::generate(),
        }
    }

    /// The id as a header value.
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.0
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ever built from validated ASCII or a UUID, so any UTF-8
        // check settles it; std's goes a word at a time, `to_str` a byte.
        std::str::from_utf8(self.0.as_bytes()).unwrap_or("-")
    }
}

/// 1–128 visible ASCII characters from `[A-Za-z0-9._:-]`.
pub(crate) fn is_valid(id: &[u8]) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
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

    #[test]
    fn generated_ids_are_random_v4_uuids_in_canonical_form() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let id = RequestId::generate();
            let text = id.as_str();
            let parsed = match uuid::Uuid::parse_str(text) {
                Ok(u) => u,
                Err(e) => panic!("{text}: {e}"),
            };
            assert_eq!(parsed.get_version_num(), 4, "{text}");
            assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{text}");
            // Lower case, hyphenated: what the uuid crate writes.
            assert_eq!(parsed.hyphenated().to_string(), text);
            assert!(seen.insert(text.to_string()), "{text} twice");
        }
    }
}
