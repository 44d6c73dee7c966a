//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection and must not be relayed
//! (RFC 9110 §7.6.1); relaying them lets a client steer the gateway's own
//! upstream connection (`Connection: close`, `Upgrade`, `Transfer-Encoding`
//! smuggling) or strip headers a later hop relies on. `X-Forwarded-*` tell
//! the service who really called, since it only sees the gateway.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers: the fixed set, every `Proxy-*`, and any
/// header the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
}

/// Prepares a client's request headers for an upstream: strips hop-by-hop
/// headers, appends the peer to `X-Forwarded-For`, sets
/// `X-Forwarded-Proto` and `X-Forwarded-Host`, and makes sure `Host` carries
/// what the client asked for (HTTP/2 clients send it as `:authority`).
///
/// The forwarding chain the client sent is kept only when `trust_chain`
/// (the peer is a trusted proxy); otherwise it is the client's own claim
/// and is replaced by the peer, so services never see a forged hop.
pub(crate) fn prepare_request(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    trust_chain: bool,
    proto: &'static str,
    authority: Option<&str>,
) {
    strip_hop_by_hop(headers);
    // The gateway streams the body itself; the upstream's `100 Continue`
    // would have nowhere to go.
    headers.remove(header::EXPECT);
    if !trust_chain {
        headers.remove(&X_FORWARDED_FOR);
        headers.remove(header::FORWARDED);
    }

    if let Some(client) = client {
        let client = client.to_string();
        // Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3).
        let mut hops: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        hops.push(&client);
        let forwarded_for = hops.join(", ");
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(X_FORWARDED_FOR.clone(), v);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));

    if !headers.contains_key(header::HOST)
        && let Some(v) = authority.and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::HOST, v);
    }
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("content-type", "text/plain"),
            ("authorization", "Bearer t"),
            ("x-keep", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "content-type", "x-keep"]);
    }

    #[test]
    fn forwarded_headers_append_client_and_keep_host() {
        let mut h = map(&[
            ("host", "shop.example:8080"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("expect", "100-continue"),
        ]);
        prepare_request(
            &mut h,
            Some(IpAddr::from([127, 0, 0, 1])),
            true,
            "http",
            None,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.51.100.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "shop.example:8080");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert!(h.get("expect").is_none());
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_the_chain() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]);
        prepare_request(
            &mut h,
            Some(IpAddr::from([203, 0, 113, 9])),
            false,
            "http",
            None,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            Some(IpAddr::from([10, 0, 0, 1])),
            true,
            "http",
            Some("api.local"),
        );
        assert_eq!(h["host"], "api.local");
        assert_eq!(h["x-forwarded-host"], "api.local");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
    }
}
