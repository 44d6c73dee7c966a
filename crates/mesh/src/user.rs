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

/// Removes every `x-flotilla-user-*` and `x-forwarded-client-cert` header
/// unless `peer` is `gateway`;
/// returns how many distinct header names were removed. A request with no
/// verified peer (`None`) is never trusted.
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
        .filter(|name| {
            name.as_str().starts_with(USER_HEADER_PREFIX) || name.as_str() == CLIENT_CERT_HEADER
        })
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
        assert_eq!(h.len(), 5);

        for peer in [Some(&orders), Some(&other_gateway), None] {
            let mut h = headers();
            assert_eq!(strip_untrusted_user_headers(&mut h, peer, &gateway), 3);
            assert_eq!(h.len(), 1);
            assert!(h.contains_key("x-request-id"));
        }
    }
}
