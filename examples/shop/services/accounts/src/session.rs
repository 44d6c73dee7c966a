//! Browser sessions in cookies: the tokens of a login or refresh that asked
//! for them (`"session": "cookie"`) go into `HttpOnly` cookies instead of
//! the response body, so no script on the page, and no cross-site
//! scripting bug, can read either token.
//!
//! - `shop_at`: the access token, which the gateway reads on `jwt` routes
//!   (`[gateway] jwt` `cookie`) and acts on only for requests from the
//!   shop's own pages (its CSRF check). It lives as long as the token.
//! - `shop_rt`: the refresh token, sent only to `/api/accounts` and only
//!   by the shop's own pages (`SameSite=Strict`): a refresh or logout
//!   another site makes the browser send carries no token.
//! - `shop_session`: not a secret. When the access token expires (Unix
//!   seconds), for the page: it tells the page a session exists without
//!   asking, and tells a tab whose call was refused whether another tab
//!   has refreshed the session meanwhile (presenting the same refresh
//!   token twice would end it: reuse detection).
//!
//! `Secure` is set when the client's connection was HTTPS, as the gateway
//! tells in `x-forwarded-proto` (it replaces a client's own): a browser
//! refuses `Secure` cookies over plain HTTP on any host but localhost.
//!
//! `SameSite=Strict` keeps other sites' pages from making the browser send
//! the refresh token, but not pages of the same site: a sibling host
//! (`promo.shop.example` beside `shop.example`) is the same site. So a
//! login, refresh or logout that works by cookie must also come from this
//! origin ([`from_this_origin`]), as the gateway checks for the access
//! token's cookie.

use axum::http::{HeaderMap, HeaderValue, header};
use cookie::{Cookie, SameSite};

/// The access token's cookie; `[gateway] jwt` `cookie` names it.
pub const ACCESS_COOKIE: &str = "shop_at";
/// The refresh token's cookie.
pub const REFRESH_COOKIE: &str = "shop_rt";
/// When the access token expires, readable by the page.
pub const SESSION_COOKIE: &str = "shop_session";

/// Where a session's tokens are sent: the response body (API clients,
/// the default) or cookies (browsers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Body,
    Cookie,
}

impl Delivery {
    /// The `session` field of a login: `"token"` (or none) or `"cookie"`.
    pub fn parse(value: Option<&str>) -> Option<Delivery> {
        match value {
            None | Some("token") => Some(Delivery::Body),
            Some("cookie") => Some(Delivery::Cookie),
            Some(_) => None,
        }
    }
}

/// Whether the client reached the gateway over HTTPS.
pub fn secure(request: &HeaderMap) -> bool {
    request
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"))
}

/// Whether a request comes from this origin's own pages: the browser's
/// `Sec-Fetch-Site` (which no script can set) says `same-origin` or `none`
/// (typed by the user); without it (an older browser), its `Origin` names
/// the host the request was sent to, the scheme's default port written on
/// one side only counting as that port. A request with neither is no
/// browser's cross-origin one (browsers send `Origin` with every POST).
pub fn from_this_origin(request: &HeaderMap) -> bool {
    if let Some(site) = request.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = request.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = request.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return false; // `null`, or no origin at all
    };
    let default = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let split = |a: &str| -> (String, String) {
        match a.rsplit_once(':') {
            Some((name, port)) if !port.contains(']') => {
                (name.to_ascii_lowercase(), port.to_owned())
            }
            _ => (a.to_ascii_lowercase(), default.to_owned()),
        }
    };
    !authority.contains(['/', '@']) && split(authority) == split(host)
}

/// The refresh tokens in the request's cookies, each once, in the order
/// sent. More than one is not the shop's doing: a sibling host
/// (`promo.shop.example`) can set a cookie for the parent domain, which
/// the browser sends beside ours, and first when its path is longer
/// ("cookie tossing"). Which one is ours cannot be told.
pub fn refresh_tokens(request: &HeaderMap) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    for cookie in request
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|field| field.to_str().ok())
        .flat_map(Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|c| c.name() == REFRESH_COOKIE && !c.value().is_empty())
    {
        if !tokens.iter().any(|t| t == cookie.value()) {
            tokens.push(cookie.value().to_owned());
        }
    }
    tokens
}

/// The cookies of a new session: the access token until `access_expires`
/// (Unix seconds, `access_ttl` from now), the refresh token for
/// `refresh_ttl` seconds.
pub fn set(
    response: &mut HeaderMap,
    access: &str,
    access_ttl: i64,
    access_expires: i64,
    refresh: &str,
    refresh_ttl: i64,
    secure: bool,
) {
    let cookies = [
        made(ACCESS_COOKIE, access, "/api", access_ttl, true, secure),
        made(
            REFRESH_COOKIE,
            refresh,
            "/api/accounts",
            refresh_ttl,
            true,
            secure,
        ),
        made(
            SESSION_COOKIE,
            &access_expires.to_string(),
            "/",
            refresh_ttl,
            false,
            secure,
        ),
    ];
    append(response, cookies);
}

/// Cookies that end the session in the browser: the same names and paths,
/// empty and expired.
pub fn clear(response: &mut HeaderMap, secure: bool) {
    let cookies = [
        made(ACCESS_COOKIE, "", "/api", 0, true, secure),
        made(REFRESH_COOKIE, "", "/api/accounts", 0, true, secure),
        made(SESSION_COOKIE, "", "/", 0, false, secure),
    ];
    append(response, cookies);
}

fn made(
    name: &'static str,
    value: &str,
    path: &'static str,
    max_age: i64,
    http_only: bool,
    secure: bool,
) -> Cookie<'static> {
    Cookie::build((name, value.to_owned()))
        .path(path)
        .max_age(cookie::time::Duration::seconds(max_age))
        .http_only(http_only)
        .secure(secure)
        .same_site(SameSite::Strict)
        .build()
}

fn append(response: &mut HeaderMap, cookies: [Cookie<'static>; 3]) {
    for c in cookies {
        // Tokens are base64url and JWS compact form, the expiry digits:
        // always a valid field value.
        if let Ok(v) = HeaderValue::from_str(&c.to_string()) {
            response.append(header::SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_three_cookies_and_only_the_expiry_is_readable() {
        let mut h = HeaderMap::new();
        set(&mut h, "a.b.c", 900, 1_900_000_900, "rt", 86_400, false);
        let set: Vec<&str> = h
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            set,
            [
                "shop_at=a.b.c; HttpOnly; SameSite=Strict; Path=/api; Max-Age=900",
                "shop_rt=rt; HttpOnly; SameSite=Strict; Path=/api/accounts; Max-Age=86400",
                "shop_session=1900000900; SameSite=Strict; Path=/; Max-Age=86400",
            ]
        );
        let mut h = HeaderMap::new();
        clear(&mut h, true);
        for v in h.get_all(header::SET_COOKIE) {
            let v = v.to_str().unwrap();
            assert!(v.contains("=;") && v.contains("Max-Age=0") && v.contains("Secure"));
        }
    }

    #[test]
    fn the_refresh_token_is_read_from_any_cookie_field() {
        let mut h = HeaderMap::new();
        assert!(refresh_tokens(&h).is_empty());
        h.append(header::COOKIE, HeaderValue::from_static("a=1; shop_rt="));
        assert!(refresh_tokens(&h).is_empty(), "empty is none");
        h.append(header::COOKIE, HeaderValue::from_static("x=2; shop_rt=tok"));
        assert_eq!(refresh_tokens(&h), ["tok"]);
        // The same one twice is one; another beside it is a second.
        h.append(header::COOKIE, HeaderValue::from_static("shop_rt=tok"));
        assert_eq!(refresh_tokens(&h), ["tok"]);
        h.append(
            header::COOKIE,
            HeaderValue::from_static("shop_rt=planted; y=3"),
        );
        assert_eq!(refresh_tokens(&h), ["tok", "planted"]);
        assert!(!secure(&h));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(secure(&h));
    }

    #[test]
    fn only_this_origins_pages_may_act_with_the_cookies() {
        let check = |fields: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(*n, HeaderValue::from_static(v));
            }
            from_this_origin(&h)
        };
        let host = ("host", "shop.example");
        for ok in [
            vec![host, ("sec-fetch-site", "same-origin")],
            vec![host, ("sec-fetch-site", "none")],
            vec![host, ("origin", "http://shop.example")],
            vec![
                ("host", "shop.example:443"),
                ("origin", "https://SHOP.example"),
            ],
            vec![("host", "[::1]:8080"), ("origin", "http://[::1]:8080")],
            vec![host],
        ] {
            assert!(check(&ok), "{ok:?}");
        }
        for refused in [
            // A sibling host is the same site, not the same origin.
            vec![
                host,
                ("sec-fetch-site", "same-site"),
                ("origin", "http://shop.example"),
            ],
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("origin", "http://promo.shop.example")],
            vec![host, ("origin", "http://shop.example:8080")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "http://shop.example@evil.example")],
            vec![("origin", "http://shop.example")],
        ] {
            assert!(!check(&refused), "{refused:?}");
        }
    }

    #[test]
    fn delivery_is_token_by_default() {
        assert_eq!(Delivery::parse(None), Some(Delivery::Body));
        assert_eq!(Delivery::parse(Some("token")), Some(Delivery::Body));
        assert_eq!(Delivery::parse(Some("cookie")), Some(Delivery::Cookie));
        assert_eq!(Delivery::parse(Some("cookies")), None);
    }
}
