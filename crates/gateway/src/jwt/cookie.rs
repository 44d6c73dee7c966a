//! Access tokens in a cookie (`[gateway] jwt` `cookie`), as Envoy's
//! `from_cookies` and Kong's `cookie_names` read them: a browser app that
//! keeps its token in an `HttpOnly` cookie, out of reach of any script a
//! cross-site scripting bug lets in.
//!
//! A browser sends cookies with requests that other sites make it send,
//! which a bearer header never is: cross-site request forgery. So a token
//! read from a cookie identifies the caller of a request that could change
//! something (any method but GET, HEAD and OPTIONS, and a WebSocket
//! handshake, whose tunnel then acts for the user) only if the request
//! comes from this site, as Envoy's CSRF filter and OWASP's origin check
//! decide it:
//!
//! - `Origin` names the host the request is for (its `Host`, or HTTP/2's
//!   `:authority`; behind a trusted proxy, also the host its client asked
//!   for, its `X-Forwarded-Host`), or an origin the route's CORS policy
//!   admits with credentials (a front end on another origin that the
//!   system trusts);
//! - without `Origin` (which browsers send on every cross-origin request
//!   that could change something), `Sec-Fetch-Site: same-origin` or `none`
//!   (typed by the user), which no script can set;
//! - without either, a `Referer` from the same host.
//!
//! Anything else, `Origin: null` included, is refused: a client that is
//! not a browser sends its token in `Authorization`, where no other site
//! can put it.

use http::header::{HOST, ORIGIN, REFERER};
use http::{HeaderMap, Method, Uri};

use crate::cors::CorsPolicy;

/// Whether a request may be acted on with a token from its cookies (see
/// the module doc): always for a read, and for anything else only from
/// this site or an origin `cors` admits with credentials. `forwarded` is
/// the host a trusted proxy's client asked for, when a trusted proxy sent
/// the request (a proxy that rewrites `Host` passes the site's name on
/// there).
pub(crate) fn same_site(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    websocket: bool,
    cors: Option<&CorsPolicy>,
    forwarded: Option<&[u8]>,
) -> bool {
    let reads = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if reads && !websocket {
        return true;
    }
    // The host the request is for: HTTP/2's `:authority`, else `Host`.
    let host = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(HOST).map(|h| h.as_bytes()));
    let Some(host) = host else {
        return false;
    };
    let this_site = |(a, default_port): (&[u8], &[u8])| {
        same_authority(a, host, default_port)
            || forwarded.is_some_and(|f| same_authority(a, f, default_port))
    };
    let mut origins = headers.get_all(ORIGIN).iter();
    if let Some(origin) = origins.next() {
        return origins.next().is_none()
            && (authority(origin.as_bytes()).is_some_and(this_site)
                || cors.is_some_and(|c| c.admits_credentials(origin)));
    }
    match headers.get("sec-fetch-site").map(|v| v.as_bytes()) {
        Some(b"same-origin" | b"none") => return true,
        Some(_) => return false,
        None => {}
    }
    headers
        .get(REFERER)
        .and_then(|r| authority(r.as_bytes()))
        .is_some_and(this_site)
}

/// The `host[:port]` of an origin or an absolute URL (`scheme://host...`),
/// with its scheme's default port; `None` for `null` and anything that is
/// not one.
fn authority(url: &[u8]) -> Option<(&[u8], &'static [u8])> {
    let at = url.windows(3).position(|w| w == b"://")?;
    let default_port: &'static [u8] = match &url[..at] {
        b"http" | b"ws" => b"80",
        b"https" | b"wss" => b"443",
        _ => return None,
    };
    let rest = &url[at + 3..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = &rest[..end];
    // Userinfo would make `https://shop.example@evil.example` look like
    // the shop.
    (!authority.is_empty() && !authority.contains(&b'@')).then_some((authority, default_port))
}

/// Whether an origin's `host[:port]` names the same host and port as a
/// request's `Host`, either of them leaving out the origin scheme's
/// default port: a browser never writes it in `Origin`, while some
/// clients and proxies write it in `Host` (`shop.example:443`).
fn same_authority(origin: &[u8], host: &[u8], default_port: &[u8]) -> bool {
    let (o_name, o_port) = split_port(origin);
    let (h_name, h_port) = split_port(host);
    o_name.eq_ignore_ascii_case(h_name)
        && o_port.unwrap_or(default_port) == h_port.unwrap_or(default_port)
}

/// `host[:port]` into its name and port; an IPv6 literal keeps its
/// brackets (`[::1]:8080` is `[::1]` and `8080`).
fn split_port(authority: &[u8]) -> (&[u8], Option<&[u8]>) {
    match authority.iter().rposition(|&b| b == b':') {
        Some(colon) if !authority[colon..].contains(&b']') => {
            (&authority[..colon], Some(&authority[colon + 1..]))
        }
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_reads_or_requests_from_this_site_may_use_a_cookie_token() {
        let uri: Uri = "/api/orders".parse().unwrap();
        let check = |method: Method, fields: &[(&'static str, &'static str)]| {
            same_site(&method, &uri, &headers(fields), false, None, None)
        };
        let host = ("host", "shop.example:8443");
        // Reads, whoever asks.
        assert!(check(
            Method::GET,
            &[host, ("origin", "https://evil.example")]
        ));
        // Anything else from this site.
        for ok in [
            vec![host, ("origin", "https://shop.example:8443")],
            vec![host, ("origin", "http://SHOP.example:8443")],
            vec![host, ("sec-fetch-site", "same-origin")],
            vec![host, ("sec-fetch-site", "none")],
            vec![host, ("referer", "https://shop.example:8443/cart?x=1")],
        ] {
            assert!(check(Method::POST, &ok), "{ok:?}");
        }
        // ... and from nowhere else.
        for refused in [
            vec![host],
            vec![host, ("origin", "https://evil.example")],
            vec![host, ("origin", "https://shop.example")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "https://shop.example:8443@evil.example")],
            vec![
                host,
                ("origin", "https://shop.example:8443"),
                ("origin", "https://evil.example"),
            ],
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![
                host,
                ("sec-fetch-site", "same-site"),
                ("referer", "https://shop.example:8443/"),
            ],
            vec![host, ("referer", "https://evil.example/shop.example:8443")],
            vec![("origin", "https://shop.example:8443")],
        ] {
            assert!(!check(Method::DELETE, &refused), "{refused:?}");
        }
        // The default port, written on one side only, is the same port;
        // another is not.
        let on = |host: &'static str, origin: &'static str| {
            check(Method::POST, &[("host", host), ("origin", origin)])
        };
        assert!(on("shop.example:443", "https://shop.example"));
        assert!(on("shop.example", "https://shop.example:443"));
        assert!(on("shop.example:80", "http://shop.example"));
        assert!(on("[::1]:443", "https://[::1]"));
        assert!(on("[::1]:8443", "https://[::1]:8443"));
        assert!(!on("shop.example:80", "https://shop.example"));
        assert!(!on("shop.example", "https://shop.example:8443"));
        assert!(!on("[::1]:8443", "https://[::1]"));
        assert!(!on("shop.example:443", "https://shop.example.evil:443"));
        // A WebSocket handshake is a GET, and acts for the user after it.
        let evil = headers(&[host, ("origin", "https://evil.example")]);
        assert!(!same_site(&Method::GET, &uri, &evil, true, None, None));
        // HTTP/2's `:authority` names the host.
        let h2: Uri = "https://shop.example:8443/api/orders".parse().unwrap();
        let own = headers(&[("origin", "https://shop.example:8443")]);
        assert!(same_site(&Method::POST, &h2, &own, false, None, None));
        // Behind a trusted proxy that rewrote `Host`: the name its client
        // asked for is this site too, and only when the proxy is trusted.
        let proxied = headers(&[
            ("host", "catalog.internal:8080"),
            ("origin", "https://shop.example"),
        ]);
        assert!(same_site(
            &Method::POST,
            &uri,
            &proxied,
            false,
            None,
            Some(b"shop.example")
        ));
        assert!(!same_site(&Method::POST, &uri, &proxied, false, None, None));
        assert!(!same_site(
            &Method::POST,
            &uri,
            &proxied,
            false,
            None,
            Some(b"evil.example")
        ));
    }
}
