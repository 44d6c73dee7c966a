//! Request ids: every request gets one, the upstream sees it and the client
//! gets it back, so a client's bug report, the access log, the service's
//! logs and traces can be joined on one value.
//!
//! A client-supplied `x-request-id` is kept when it is well-formed (1–128
//! characters from `[A-Za-z0-9._:-]`), so callers can correlate across
//! systems; anything else is replaced, because the id is copied into logs
//! and headers and must not carry arbitrary bytes.

use http::{HeaderMap, HeaderName, HeaderValue};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

const MAX_LEN: usize = 128;

/// The id of the current request, found or made by the front of the
/// request path (`server`), which also echoes it on the response.
///
/// A client's well-formed id stays where it came, in the request's
/// fields. One the gateway made is not put there: it is written straight
/// into the instance's request head with the forwarding fields
/// (`headers::forward_fields`, given it by [`RequestId::unsent`]), as a
/// new trace's `traceparent` is. Looking the name up, hashing it again
/// and inserting it cost ~300 instructions per request (`instructions.sh`,
/// 1.4 % of a proxied request with JWT and a rate limit).
#[derive(Debug, Clone)]
pub(crate) struct RequestId {
    value: HeaderValue,
    /// Whether the request's fields hold it (a client's id, kept).
    in_fields: bool,
}

impl RequestId {
    fn generate() -> RequestId {
        // A v4 UUID from the gateway's id generator (`random`), written
        // in the buffer that becomes the header value's owner: one
        // allocation, which every clone of the value (the request's, the
        // response's) shares. A value copied from a slice would allocate
        // twice, once for the bytes and again when first cloned.
        let buf = crate::random::uuid_v4();
        RequestId {
            // Hex digits and hyphens.
            value: crate::headers::own_value(bytes::Bytes::from_owner(buf)),
            in_fields: false,
        }
    }

    /// A new id, for a request the gateway answers before it reads its
    /// fields (`h1`'s refusals).
    pub(crate) fn new() -> RequestId {
        RequestId::generate()
    }

    /// The id of a request with `headers`: the client's, when it sent one
    /// well-formed id (the first of several, which then replaces the
    /// rest), else a new one, and then whatever the client sent under the
    /// name is removed.
    pub(crate) fn of(headers: &mut HeaderMap) -> RequestId {
        // Most requests carry none: told without a hashed lookup.
        if !crate::headers::has_field(headers, &X_REQUEST_ID) {
            return RequestId::generate();
        }
        let mut given = headers.get_all(&X_REQUEST_ID).iter();
        let (first, more) = (given.next(), given.next().is_some());
        match first {
            None => RequestId::generate(),
            Some(v) if is_valid(v.as_bytes()) => {
                let value = v.clone();
                if more {
                    headers.insert(X_REQUEST_ID.clone(), value.clone());
                }
                RequestId {
                    value,
                    in_fields: true,
                }
            }
            Some(_) => {
                headers.remove(&X_REQUEST_ID);
                RequestId::generate()
            }
        }
    }

    /// The id as a header value.
    pub(crate) fn header(&self) -> &HeaderValue {
        &self.value
    }

    /// The id, when the request's fields do not hold it: for the instance's
    /// request head.
    pub(crate) fn unsent(&self) -> Option<HeaderValue> {
        (!self.in_fields).then(|| self.value.clone())
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only ever built from validated ASCII or a UUID, so any UTF-8
        // check settles it; std's goes a word at a time, `to_str` a byte.
        std::str::from_utf8(self.value.as_bytes()).unwrap_or("-")
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

    fn headers(ids: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("shop.test"));
        for id in ids {
            headers.append(X_REQUEST_ID.clone(), HeaderValue::from_static(id));
        }
        headers
    }

    fn values(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(&X_REQUEST_ID)
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect()
    }

    #[test]
    fn a_well_formed_incoming_id_is_kept_in_the_fields() {
        let mut h = headers(&["abc-123"]);
        let kept = RequestId::of(&mut h);
        assert_eq!(kept.as_str(), "abc-123");
        assert_eq!(kept.unsent(), None, "the fields hold it");
        assert_eq!(values(&h), ["abc-123"]);
    }

    #[test]
    fn an_invalid_incoming_id_is_removed_and_replaced_by_a_uuid() {
        let mut h = headers(&["a b"]);
        let replaced = RequestId::of(&mut h);
        assert!(uuid::Uuid::parse_str(replaced.as_str()).is_ok());
        assert!(values(&h).is_empty(), "{:?}", values(&h));
        assert_eq!(replaced.unsent().as_ref(), Some(replaced.header()));
        // Several, the first invalid: none of them goes on.
        let mut h = headers(&["a b", "abc-123"]);
        let replaced = RequestId::of(&mut h);
        assert_ne!(replaced.as_str(), "abc-123");
        assert!(values(&h).is_empty(), "{:?}", values(&h));
    }

    #[test]
    fn of_several_ids_the_first_well_formed_one_is_the_only_one_kept() {
        let mut h = headers(&["first", "second"]);
        let kept = RequestId::of(&mut h);
        assert_eq!(kept.as_str(), "first");
        assert_eq!(values(&h), ["first"]);
        assert_eq!(kept.unsent(), None);
    }

    #[test]
    fn a_request_without_an_id_gets_a_new_one_for_its_head() {
        let mut h = headers(&[]);
        let generated = RequestId::of(&mut h);
        assert!(uuid::Uuid::parse_str(generated.as_str()).is_ok());
        assert!(values(&h).is_empty(), "not put in the fields");
        assert_eq!(generated.unsent().as_ref(), Some(generated.header()));
        assert_ne!(
            RequestId::of(&mut headers(&[])).as_str(),
            generated.as_str()
        );
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
