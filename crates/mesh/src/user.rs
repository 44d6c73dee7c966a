//! End-user identity headers: trusted only from the gateway.
//!
//! The gateway validates the end user's JWT and passes who they are to the
//! service in `x-flotilla-user-*` headers. A service must believe those
//! headers only when the connection's verified peer is the gateway; from
//! any other caller (another service, the runtime) they are forged or
//! stale, so they are removed before the application sees the request.
//! The same holds for `x-forwarded-client-cert`, which the gateway sets
//! from a client certificate it verified at the edge. The chassis calls
//! [`strip_untrusted_user_headers`] on every request, with the peer from
//! [`crate::tls::peer_identity`].

use http::HeaderMap;
use http::header::HeaderName;

use crate::identity::SpiffeId;

/// The prefix of every end-user header (header names are lower case).
pub const USER_HEADER_PREFIX: &str = "x-flotilla-user-";

/// The edge client's verified certificate, in Envoy's format.
pub const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// Whether `name` (lower case, as a `HeaderName` is) is an end-user
/// header or the client certificate's, also when written with `_` for any
/// `-` (`x_flotilla_user_id`): servers that hand a request's fields over
/// CGI-style (WSGI, Rack, PHP) read both spellings as one variable
/// (`HTTP_X_FLOTILLA_USER_ID`), so such a field would speak for the
/// gateway there.
pub fn is_user_header(name: &str) -> bool {
    let bytes = name.as_bytes();
    let prefix = USER_HEADER_PREFIX.as_bytes();
    name.starts_with(USER_HEADER_PREFIX)
        || name == CLIENT_CERT_HEADER
        || (bytes.contains(&b'_')
            && (bytes
                .get(..prefix.len())
                .is_some_and(|p| spells_with_underscores(p, prefix))
                || spells_with_underscores(bytes, CLIENT_CERT_HEADER.as_bytes())))
}

/// Whether `name` is `field`, a lower-case field name, with any of its
/// `-` written `_`: one variable to a server that hands fields over
/// CGI-style (`HTTP_X_TENANT_ID`).
#[inline]
pub fn spells_with_underscores(name: &[u8], field: &[u8]) -> bool {
    name.len() == field.len()
        && name
            .iter()
            .zip(field)
            .all(|(n, f)| n == f || (*n == b'_' && *f == b'-'))
}

/// Removes every end-user header ([`is_user_header`]: `x-flotilla-user-*`
/// and `x-forwarded-client-cert`, in either spelling) unless `peer` is
/// `gateway`; returns how many distinct header names were removed. A
/// request with no verified peer (`None`) is never trusted.
pub fn strip_untrusted_user_headers(
    headers: &mut HeaderMap,
    peer: Option<&SpiffeId>,
    gateway: &SpiffeId,
) -> usize {
    if peer == Some(gateway) {
        return 0;
    }
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_user_header(name.as_str()))
        .cloned()
        .collect();
    for name in &forged {
        headers.remove(name);
    }
    if !forged.is_empty() {
        tracing::warn!(
            peer = %peer.map_or_else(|| "unauthenticated".to_string(), SpiffeId::to_string),
            headers = ?forged.iter().map(HeaderName::as_str).collect::<Vec<_>>(),
            "removed end-user headers from a caller that is not the gateway"
        );
    }
    forged.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-flotilla-user-id", "alice".parse().unwrap());
        h.append("X-Flotilla-User-Roles", "admin".parse().unwrap());
        h.append("x-flotilla-user-roles", "root".parse().unwrap());
        h.insert("x-request-id", "r1".parse().unwrap());
        h.insert("X-Forwarded-Client-Cert", "Hash=00".parse().unwrap());
        h.insert("x_flotilla_user_id", "mallory".parse().unwrap());
        h.insert("x-flotilla_user-roles", "admin".parse().unwrap());
        h.insert("x_forwarded_client_cert", "Hash=01".parse().unwrap());
        h.insert("x_flotilla_userid", "fine".parse().unwrap());
        h
    }

    #[test]
    fn only_the_gateway_may_send_user_headers() {
        let gateway = SpiffeId::local("shop", "gateway").unwrap();
        let orders = SpiffeId::local("shop", "orders").unwrap();
        let other_gateway = SpiffeId::local("bank", "gateway").unwrap();

        let mut h = headers();
        assert_eq!(
            strip_untrusted_user_headers(&mut h, Some(&gateway), &gateway),
            0
        );
        assert_eq!(h.len(), 9);

        for peer in [Some(&orders), Some(&other_gateway), None] {
            let mut h = headers();
            assert_eq!(strip_untrusted_user_headers(&mut h, peer, &gateway), 6);
            assert_eq!(h.len(), 2);
            assert!(h.contains_key("x-request-id"));
            // Not a spelling of the prefix: `userid` has no separator.
            assert!(h.contains_key("x_flotilla_userid"));
        }
    }
}
