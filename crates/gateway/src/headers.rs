//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection and must not be relayed
//! (RFC 9110 §7.6.1); relaying them lets a client steer the gateway's own
//! upstream connection (`Connection: close`, `Upgrade`, `Transfer-Encoding`
//! smuggling) or strip headers a later hop relies on. `X-Forwarded-*` tell
//! the service who really called, since it only sees the gateway.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `name` is hop-by-hop whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str().starts_with("proxy-")
}

/// The hop-by-hop fields of a head still in `httparse`'s form: a field
/// name (any case) is hop-by-hop when it is in the fixed set, starts with
/// `Proxy-`, or is named by one of the head's `Connection` fields. For a
/// response from an instance, whose hop-by-hop fields are dropped before
/// its header map is built rather than removed from it after.
pub(crate) fn hop_by_hop<'h>(fields: &'h [httparse::Header<'h>]) -> impl Fn(&[u8]) -> bool + 'h {
    const FIXED: [&[u8]; 6] = [
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    // Most heads have no `Connection` field: then no name needs the scan.
    let connection = fields
        .iter()
        .any(|f| f.name.eq_ignore_ascii_case("connection"));
    move |name: &[u8]| {
        FIXED.iter().any(|f| name.eq_ignore_ascii_case(f))
            || name
                .get(..6)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"proxy-"))
            || (connection
                && fields
                    .iter()
                    .filter(|f| f.name.eq_ignore_ascii_case("connection"))
                    .flat_map(|f| f.value.split(|b| *b == b','))
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(name)))
    }
}

/// Removes the hop-by-hop headers and those `also` picks. One pass over
/// the names, and a removal (a hash lookup) only for a header that is
/// there: this runs twice per proxied request, and usually finds nothing.
fn strip(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || also(name))
        .cloned()
        .collect();
    if doomed.is_empty() {
        return;
    }
    doomed.extend(
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
    );
    for name in doomed {
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
    client: IpAddr,
    trust_chain: bool,
    proto: &'static str,
    authority: Option<&str>,
) {
    // The gateway streams the body itself; the upstream's `100 Continue`
    // would have nowhere to go.
    strip(headers, |name| {
        name == header::EXPECT
            || (!trust_chain && (name == X_FORWARDED_FOR || name == header::FORWARDED))
    });

    let forwarded_for = if headers.contains_key(&X_FORWARDED_FOR) {
        // Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3).
        let client = client.to_string();
        let mut hops: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        hops.push(&client);
        HeaderValue::from_str(&hops.join(", ")).ok()
    } else {
        Some(address_value(client))
    };
    if let Some(v) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));

    // One lookup of `Host` for the usual request that has one.
    let host = match headers.get(header::HOST) {
        Some(host) => Some(host.clone()),
        None => {
            let host = authority.and_then(|a| HeaderValue::from_str(a).ok());
            if let Some(v) = &host {
                headers.insert(header::HOST, v.clone());
            }
            host
        }
    };
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// `ip` as a header value. The last one made on this thread is kept: a
/// connection's requests (and often its connections: a load balancer, a
/// busy client) come from one address, and a clone of the value shares its
/// bytes where formatting it would allocate again.
fn address_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, value)) if *cached == ip => value.clone(),
        _ => {
            // An address's text is always a valid header value.
            let value = HeaderValue::from_str(&ip.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
            *last = Some((ip, value.clone()));
            value
        }
    })
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

    fn raw(pairs: &[(&'static str, &'static str)]) -> Vec<httparse::Header<'static>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let fields = raw(&[
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
            ("X-Keep", "yes"),
            ("Proxy-Foo", "no"),
            ("X-SECRET", "2"),
        ]);
        let doomed = hop_by_hop(&fields);
        let left: Vec<&str> = fields
            .iter()
            .filter(|f| !doomed(f.name.as_bytes()))
            .map(|f| f.name)
            .collect();
        assert_eq!(left, ["content-type", "authorization", "X-Keep"]);
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
        prepare_request(&mut h, IpAddr::from([127, 0, 0, 1]), true, "http", None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 198.51.100.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["host"], "shop.example:8080");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert!(h.get("expect").is_none());
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_the_chain() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=6.6.6.6")]);
        prepare_request(&mut h, IpAddr::from([203, 0, 113, 9]), false, "http", None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert!(h.get("forwarded").is_none());
    }

    #[test]
    fn each_request_gets_its_own_peer_in_x_forwarded_for() {
        for ip in [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 2], [10, 0, 0, 1]] {
            let mut h = map(&[("connection", "close")]);
            prepare_request(&mut h, IpAddr::from(ip), false, "https", None);
            assert_eq!(h["x-forwarded-for"], IpAddr::from(ip).to_string());
            assert_eq!(h["x-forwarded-proto"], "https");
            assert!(h.get("connection").is_none());
        }
        let mut h = HeaderMap::new();
        let v6 = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
        prepare_request(&mut h, v6, false, "http", None);
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
    }

    #[test]
    fn headers_named_by_connection_go_only_with_it() {
        // Without a `Connection` header, nothing it could name is removed.
        let fields = raw(&[("x-secret", "1"), ("host", "a")]);
        let doomed = hop_by_hop(&fields);
        assert!(fields.iter().all(|f| !doomed(f.name.as_bytes())));
        // Through the request path's map too.
        let mut h = map(&[("x-secret", "1"), ("host", "a")]);
        prepare_request(&mut h, IpAddr::from([10, 0, 0, 1]), false, "http", None);
        assert!(h.contains_key("x-secret"));
        let mut h = map(&[("x-secret", "1"), ("connection", "X-Secret")]);
        prepare_request(&mut h, IpAddr::from([10, 0, 0, 1]), false, "http", None);
        assert!(!h.contains_key("x-secret") && !h.contains_key("connection"));
    }

    #[test]
    fn http2_authority_becomes_host() {
        let mut h = HeaderMap::new();
        prepare_request(
            &mut h,
            IpAddr::from([10, 0, 0, 1]),
            true,
            "http",
            Some("api.local"),
        );
        assert_eq!(h["host"], "api.local");
        assert_eq!(h["x-forwarded-host"], "api.local");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
    }
}
