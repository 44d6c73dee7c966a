//! Request heads: httparse over the connection's buffer, then the framing
//! rules that decide where the body ends.
//!
//! The head's bytes become one shared `Bytes`; the URI and every header
//! value are slices of it, so building the `http::Request` copies nothing
//! but the (standard, static) header names.
//!
//! Framing follows RFC 9112 §6, strictly where two parsers could disagree
//! (request smuggling): `Transfer-Encoding` together with `Content-Length`
//! is refused rather than resolved, `Content-Length` must be digits (several
//! identical values allowed), the only transfer coding is `chunked`, an
//! HTTP/1.0 request may not use one at all, and at most one `Host`.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use super::encode::{content_length, trim_ows};

/// Room in a request's header map for what the gateway may still add to
/// it (a client certificate's `X-Forwarded-Client-Cert`, a route's
/// request-header changes, a caching route's identity fields and
/// validators): one allocation instead of a regrowth. The request id, the
/// forwarding fields and, elsewhere, the identity go straight into the
/// instance's head (`headers::Told`).
const HEADROOM: usize = 8;

/// Headers parsed into a stack array up to this many (the default limit is
/// 100); a higher configured limit uses the heap.
const STACK_HEADERS: usize = 128;
/// `http::Uri` refuses longer targets.
const MAX_TARGET: usize = u16::MAX as usize - 1;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_bytes: usize,
    pub max_headers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    None,
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub(crate) struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: BodyLength,
    /// The client lets the connection stay open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` from an HTTP/1.1 client.
    pub expect_continue: bool,
    /// An HTTP/1.1 `GET` without a body asking to switch to WebSocket
    /// (`Connection: upgrade` and `Upgrade: websocket`, RFC 6455 §4.1).
    pub websocket: bool,
}

/// Why a head is refused; each ends the connection after its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Over `max_header_bytes` or `max_headers`: 431.
    TooLarge,
    /// 400, with what was wrong.
    Malformed(&'static str),
    /// 414.
    TargetTooLong,
    /// A transfer coding other than chunked: 501.
    UnsupportedCoding,
    /// Not HTTP/1.x: 505.
    Version,
    /// `CONNECT`: 405 (see [`Invalid::Connect`]'s use in `request`).
    Connect,
    /// No host, or one that is not a host (`headers::is_valid_host`): 400
    /// `bad_host`, with what was wrong.
    BadHost(&'static str),
}

impl Invalid {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Invalid::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Invalid::Malformed(_) | Invalid::BadHost(_) => StatusCode::BAD_REQUEST,
            Invalid::TargetTooLong => StatusCode::URI_TOO_LONG,
            Invalid::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            Invalid::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            Invalid::Connect => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub(crate) fn code(self) -> &'static str {
        match self {
            Invalid::TooLarge => "headers_too_large",
            Invalid::Malformed(_) => "bad_request",
            Invalid::TargetTooLong => "uri_too_long",
            Invalid::UnsupportedCoding => "unsupported_transfer_coding",
            Invalid::Version => "http_version_not_supported",
            Invalid::Connect => "method_not_allowed",
            Invalid::BadHost(_) => "bad_host",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            Invalid::TooLarge => "the request headers are too large",
            Invalid::Malformed(why) | Invalid::BadHost(why) => why,
            Invalid::TargetTooLong => "the request target is too long",
            Invalid::UnsupportedCoding => "only the chunked transfer coding is supported",
            Invalid::Version => "only HTTP/1.0, HTTP/1.1 and HTTP/2 are supported",
            Invalid::Connect => CONNECT_REFUSED,
        }
    }
}

/// The message of a `CONNECT`'s refusal, over HTTP/1 and HTTP/2 alike
/// (`rejection`).
pub(crate) const CONNECT_REFUSED: &str =
    "CONNECT is not supported: the gateway is a reverse proxy, not a tunnel to other hosts";

/// Where a header's name and value are in the head.
#[derive(Debug, Clone)]
pub(crate) struct Span {
    name: Range<usize>,
    value: Range<usize>,
}

/// The offset of `part` (a sub-slice of `whole`) in `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// Parses the head at the start of `buf`, taking its bytes off `buf`.
/// `Ok(None)`: incomplete (and still within the limits). `spans` is
/// scratch space, reused between requests. A head refused is left in
/// `buf`, where the refusal's access-log line finds its request line
/// ([`request_line`]).
pub(crate) fn parse(
    buf: &mut BytesMut,
    limits: Limits,
    spans: &mut Vec<Span>,
) -> Result<Option<Head>, Invalid> {
    let mut on_stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut on_heap;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_headers <= STACK_HEADERS {
        on_stack.get_mut(..limits.max_headers).unwrap_or_default()
    } else {
        on_heap = vec![MaybeUninit::uninit(); limits.max_headers];
        &mut on_heap
    };
    let mut req = httparse::Request::new(&mut []);
    let bytes: &[u8] = buf;
    let len = match req.parse_with_uninit_headers(bytes, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if bytes.len() > limits.max_bytes => {
            return Err(Invalid::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Invalid::TooLarge),
        Err(httparse::Error::Version) => return Err(Invalid::Version),
        Err(_) => return Err(Invalid::Malformed("the request head is malformed")),
    };
    if len > limits.max_bytes {
        return Err(Invalid::TooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Invalid::Malformed("the request line is incomplete"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Invalid::Malformed("the request method is invalid"))?;
    let version = if version == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let target = range_in(bytes, target.as_bytes()).ok_or(Invalid::Malformed("bad target"))?;
    // Every line ends in CRLF, not in a bare LF as httparse also takes (RFC
    // 9112 §2.2 lets a recipient): a balancer in front that reads such a
    // line otherwise (as part of a field, or as no line end at all) would
    // see other fields, or another head, than the gateway does, the same
    // desync as smuggling by framing (chunk lines, `chunked`, must end in
    // CRLF too). A field's name starts its line (httparse takes no folded
    // or indented line), so the line before ends two bytes before it; the
    // last field's line and the empty one are the head's last four bytes.
    // A look at two bytes a line: a scan of the head (its bearer token
    // too) cost hundreds of instructions a request.
    let mut bare_lf = !bytes.get(..len).is_some_and(|h| h.ends_with(b"\r\n\r\n"));
    spans.clear();
    for h in req.headers.iter() {
        let (Some(name), Some(value)) =
            (range_in(bytes, h.name.as_bytes()), range_in(bytes, h.value))
        else {
            return Err(Invalid::Malformed("the request head is malformed"));
        };
        bare_lf |= name.start.checked_sub(2).and_then(|at| bytes.get(at)) != Some(&b'\r');
        spans.push(Span { name, value });
    }
    if bare_lf {
        return Err(Invalid::Malformed(
            "a line of the request head ends in a bare LF: lines end in CRLF",
        ));
    }

    let head = buf.split_to(len).freeze();
    match request(&head, method, target, version, spans) {
        Ok(head) => Ok(Some(head)),
        Err(invalid) => {
            // Put back (a copy, made only for a refusal), as what comes
            // before the split is.
            let mut whole = BytesMut::with_capacity(head.len() + buf.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(buf);
            *buf = whole;
            Err(invalid)
        }
    }
}

/// The request a whole `head` (its bytes, its request line parsed) is.
fn request(
    head: &Bytes,
    method: Method,
    target: Range<usize>,
    version: Version,
    spans: &[Span],
) -> Result<Head, Invalid> {
    // A CONNECT asks for a tunnel to the host it names, which the gateway
    // is not: forwarded, it would go to an instance as `CONNECT /` (a
    // 2xx answer making the instance's connection a tunnel) and its
    // answer would be framed for the client as an ordinary response,
    // whose bytes after the head a CONNECT client reads as the tunnel's.
    // Refused before its fields, as nginx does (405, since 1.21.1); the
    // bytes after its head would be the tunnel's, not a next request, so
    // the connection closes after the answer, as after every refusal here.
    if method == Method::CONNECT {
        return Err(Invalid::Connect);
    }
    if target.len() > MAX_TARGET {
        return Err(Invalid::TargetTooLong);
    }
    let uri = Uri::from_maybe_shared(slice(head, target)?)
        .map_err(|_| Invalid::Malformed("the request target is invalid"))?;
    let (headers, framing) = headers(head, spans, version)?;
    // The host the request is for: routed by, and sent on as `Host` and
    // `X-Forwarded-Host`, where an instance building links or keys from
    // it would take `a/b?c` or `good, evil` as given (and the response
    // cache keys no host on a route for any). The target's, in absolute
    // form, before the field (RFC 9112 §3.2.2); else the field, which
    // HTTP/1.1 requires (§3.2: 400 without one). HTTP/1.0 may omit it:
    // the instance is then named (`outbound`).
    match uri.authority() {
        Some(authority) if !crate::headers::is_valid_host(authority.as_str().as_bytes()) => {
            return Err(Invalid::BadHost(
                "the request target's host must be a host name, an IPv4 address or a bracketed IPv6 address, with an optional port, and no userinfo (`user@`)",
            ));
        }
        Some(_) => {}
        None if !framing.host && version == Version::HTTP_11 => {
            return Err(Invalid::BadHost(
                "an HTTP/1.1 request must name its host in a Host header",
            ));
        }
        None => {}
    }
    Ok(Head {
        uri,
        version,
        keep_alive: framing.keep_alive,
        expect_continue: framing.expect_continue,
        websocket: framing.websocket && method == Method::GET,
        body: framing.body,
        method,
        headers,
    })
}

/// The method and path of the request line `buf` starts with, each as far
/// as it came whole and can be read (a method of visible ASCII, a path of
/// UTF-8), never the query: for the access-log line of a request refused
/// before it became one (too slow, too large, malformed).
pub(crate) fn request_line(buf: &[u8]) -> (Option<&str>, Option<&str>) {
    // Line ends before a request line are skipped (`h1`'s `read_head`).
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let rest = buf.get(start..).unwrap_or_default();
    let mut words = rest.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return (None, None);
    };
    let method = (!method.is_empty() && method.iter().all(u8::is_ascii_graphic))
        .then(|| std::str::from_utf8(method).ok())
        .flatten();
    // Whole only if a space (before the version) followed it.
    let Some(method) = method.filter(|_| words.next().is_some()) else {
        return (method, None);
    };
    // The origin form's path (`/a/b?q`), or an absolute form's
    // (`http://host/a/b?q`), or `*`.
    let target = match target.windows(3).position(|w| w == b"://") {
        Some(scheme) if target.first() != Some(&b'/') => {
            let after = target.get(scheme + 3..).unwrap_or_default();
            match after.iter().position(|&b| b == b'/') {
                Some(slash) => after.get(slash..).unwrap_or_default(),
                None => b"/",
            }
        }
        _ => target,
    };
    let end = target
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let path = target
        .get(..end)
        .filter(|p| !p.is_empty())
        .and_then(|p| std::str::from_utf8(p).ok());
    (Some(method), path)
}

fn slice(head: &Bytes, range: Range<usize>) -> Result<Bytes, Invalid> {
    if range.start <= range.end && range.end <= head.len() {
        Ok(head.slice(range))
    } else {
        Err(Invalid::Malformed("the request head is malformed"))
    }
}

/// The headers, and what they say about framing (read as they are built:
/// no lookups afterwards).
fn headers(
    head: &Bytes,
    spans: &[Span],
    version: Version,
) -> Result<(HeaderMap, Framing), Invalid> {
    let mut headers = crate::headers::map_with_capacity(spans.len() + HEADROOM);
    let mut seen = Seen::default();
    for span in spans {
        let name = head
            .get(span.name.clone())
            .and_then(|n| crate::headers::known_name(n).or_else(|| HeaderName::from_bytes(n).ok()))
            .ok_or(Invalid::Malformed("a header name is invalid"))?;
        let value = checked_value(slice(head, span.value.clone())?)
            .ok_or(Invalid::Malformed("a header value is invalid"))?;
        seen.header(&name, value.as_bytes());
        headers.append(name, value);
    }
    Ok((headers, seen.framing(version)?))
}

/// A value httparse has accepted as a `HeaderValue`. httparse refuses
/// exactly the bytes `HeaderValue` refuses (`relayed`'s tests compare the
/// two for every byte value), so checking each byte again, hundreds for a
/// bearer token, would settle nothing: what is left is the unchecked
/// constructor's own contract, UTF-8, which ASCII (std's `is_ascii`, a
/// word at a time) meets. A value with obs-text (bytes over 0x7F) takes
/// the checked constructor.
fn checked_value(bytes: Bytes) -> Option<HeaderValue> {
    if bytes.is_ascii() {
        // SAFETY: ASCII is valid UTF-8, the constructor's documented
        // contract; and httparse accepted these bytes, so they hold none
        // that `HeaderValue` would refuse (no control byte but tab, no DEL).
        Some(unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) })
    } else {
        HeaderValue::from_maybe_shared(bytes).ok()
    }
}

struct Framing {
    /// A (single, valid) `Host` came.
    host: bool,
    body: BodyLength,
    keep_alive: bool,
    expect_continue: bool,
    websocket: bool,
}

/// The framing-relevant headers, as seen.
struct Seen {
    hosts: usize,
    /// A `Host` with an `@`.
    userinfo: bool,
    /// A `Host` that is no host (`headers::is_valid_host`).
    bad_host: bool,
    /// The agreed length so far; `Err`: invalid or disagreeing.
    length: Result<Option<u64>, ()>,
    transfer_encoding: bool,
    chunked: usize,
    other_codings: usize,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// `Connection` names `upgrade`.
    upgrade: bool,
    /// `Upgrade` offers `websocket`.
    websocket: bool,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen {
            hosts: 0,
            userinfo: false,
            bad_host: false,
            length: Ok(None),
            transfer_encoding: false,
            chunked: 0,
            other_codings: 0,
            close: false,
            keep_alive: false,
            expect_continue: false,
            upgrade: false,
            websocket: false,
        }
    }
}

impl Seen {
    fn header(&mut self, name: &HeaderName, value: &[u8]) {
        let tokens = || value.split(|&b| b == b',').map(trim_ows);
        if name == header::HOST {
            self.hosts += 1;
            // One scan of a valid host; what is wrong with another is
            // looked for only then.
            if !crate::headers::is_valid_host(value) {
                // Userinfo (`user@host`) names two hosts, depending on the
                // reader (RFC 9110 §4.2.4): refused with the request.
                self.userinfo |= crate::headers::has_byte(value, b'@');
                self.bad_host = true;
            }
        } else if name == header::CONTENT_LENGTH {
            self.length = match (self.length, content_length(std::iter::once(value))) {
                (Ok(None), new) => new,
                (Ok(Some(a)), Ok(Some(b))) if a == b => Ok(Some(a)),
                _ => Err(()),
            };
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            for coding in tokens() {
                match coding {
                    b"" => {}
                    c if c.eq_ignore_ascii_case(b"chunked") => self.chunked += 1,
                    _ => self.other_codings += 1,
                }
            }
        } else if name == header::CONNECTION {
            for token in tokens() {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                self.upgrade |= token.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::EXPECT {
            self.expect_continue |= trim_ows(value).eq_ignore_ascii_case(b"100-continue");
        } else if name == header::UPGRADE {
            // A protocol may carry a version (`websocket/13` is not one
            // RFC 6455 defines, but the name is what is asked for).
            self.websocket |= tokens().any(|p| {
                let name = p.split(|&b| b == b'/').next().unwrap_or_default();
                name.eq_ignore_ascii_case(b"websocket")
            });
        }
    }

    fn framing(self, version: Version) -> Result<Framing, Invalid> {
        let http11 = version == Version::HTTP_11;
        if self.hosts > 1 {
            return Err(Invalid::Malformed("more than one Host header"));
        }
        if self.userinfo {
            return Err(Invalid::Malformed(
                "the Host header carries userinfo (`user@`)",
            ));
        }
        if self.bad_host {
            return Err(Invalid::BadHost(
                "the Host header must be a host name, an IPv4 address or a bracketed IPv6 address, with an optional port",
            ));
        }
        let length = self
            .length
            .map_err(|()| Invalid::Malformed("the Content-Length header is invalid"))?;
        let body = if self.transfer_encoding {
            if length.is_some() {
                // RFC 9112 §6.1 lets a server drop the length; a gateway
                // passing the request on must not guess which one the next
                // hop reads.
                return Err(Invalid::Malformed(
                    "both Transfer-Encoding and Content-Length are present",
                ));
            }
            if !http11 {
                return Err(Invalid::Malformed(
                    "HTTP/1.0 requests cannot use Transfer-Encoding",
                ));
            }
            if self.other_codings > 0 {
                return Err(Invalid::UnsupportedCoding);
            }
            if self.chunked != 1 {
                return Err(Invalid::Malformed(
                    "the Transfer-Encoding header is invalid",
                ));
            }
            BodyLength::Chunked
        } else {
            match length {
                None | Some(0) => BodyLength::None,
                Some(n) => BodyLength::Length(n),
            }
        };
        Ok(Framing {
            host: self.hosts == 1,
            // With a body, the bytes after the head would be both the body
            // and the new protocol's: such a request is served as plain HTTP.
            websocket: http11 && self.upgrade && self.websocket && body == BodyLength::None,
            body,
            keep_alive: !self.close && (http11 || self.keep_alive),
            expect_continue: http11 && self.expect_continue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_bytes: 8192,
        max_headers: 100,
    };

    fn parse_str(raw: &str) -> Result<Option<Head>, Invalid> {
        let mut buf = BytesMut::from(raw);
        parse(&mut buf, LIMITS, &mut Vec::new())
    }

    fn head(raw: &str) -> Head {
        match parse_str(raw) {
            Ok(Some(head)) => head,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    /// Why `checked_value` may skip `HeaderValue`'s own check: for every
    /// byte value, a request head with it in a field value parses exactly
    /// when `HeaderValue` accepts the value, and to the same bytes.
    #[test]
    fn request_field_values_are_what_header_value_accepts() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nhost: x\r\nx-v: "[..]);
            buf.extend_from_slice(&value);
            buf.extend_from_slice(b"\r\n\r\n");
            let parsed = match parse(&mut buf, LIMITS, &mut Vec::new()) {
                Ok(Some(head)) => head.headers.get("x-v").map(|v| v.as_bytes().to_vec()),
                _ => None,
            };
            let accepted = HeaderValue::from_bytes(&value).is_ok();
            assert_eq!(parsed.is_some(), accepted, "value byte {b:#04x}");
            if let Some(parsed) = parsed {
                assert_eq!(parsed, value, "value byte {b:#04x}");
            }
        }
    }

    #[test]
    fn a_head_becomes_a_request_and_leaves_the_rest() {
        let mut buf = BytesMut::from(
            "\r\nPOST /a/b?c=d HTTP/1.1\r\nHost: x\r\nX-Two: 1\r\nx-two: 2\r\nContent-Length: 3\r\n\r\nabcGET",
        );
        let head = match parse(&mut buf, LIMITS, &mut Vec::new()) {
            Ok(Some(h)) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.uri, "/a/b?c=d");
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers["host"], "x");
        let two: Vec<_> = head.headers.get_all("x-two").iter().collect();
        assert_eq!(two, ["1", "2"]);
        assert_eq!(head.body, BodyLength::Length(3));
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(&buf[..], b"abcGET");
    }

    /// A refused head stays in the buffer, whichever check refused it, for
    /// its log line to read its request line from.
    #[test]
    fn a_refused_head_is_left_in_the_buffer() {
        for raw in [
            // Refused as it is read.
            "GET /a HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\nrest",
            // Refused once it is whole: its framing, a header, its target.
            "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\nrest",
            "GET /a HTTP/1.1\r\nhost: x\r\nhost: y\r\n\r\nrest",
            "GET /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\nrest",
        ] {
            let mut buf = BytesMut::from(raw);
            let parsed = parse(&mut buf, LIMITS, &mut Vec::new());
            assert!(parsed.is_err(), "{raw:?}: {parsed:?}");
            assert_eq!(&buf[..], raw.as_bytes(), "{raw:?}");
        }
    }

    /// What a refusal's log line names of its request: the method and the
    /// path, never the query, as far as they came whole and are text.
    #[test]
    fn a_request_line_is_read_as_far_as_it_came() {
        for (raw, want) in [
            (
                "GET /a/b?token=x HTTP/1.1\r\nhost: x",
                (Some("GET"), Some("/a/b")),
            ),
            ("\r\nPOST /p#f HTTP/1.1\r\n", (Some("POST"), Some("/p"))),
            (
                "GET http://h.example:80/x/y?q HTTP/1.1\r\n",
                (Some("GET"), Some("/x/y")),
            ),
            (
                "GET http://h.example HTTP/1.1\r\n",
                (Some("GET"), Some("/")),
            ),
            ("OPTIONS * HTTP/1.1\r\n", (Some("OPTIONS"), Some("*"))),
            // The target may not have come whole: no path.
            ("GET /a/very/long/tar", (Some("GET"), None)),
            ("GET", (None, None)),
            ("", (None, None)),
            ("\u{16}\u{3}\u{1}\r\n\r\n", (None, None)),
            ("G\u{1}T /a HTTP/1.1\r\n", (None, None)),
        ] {
            assert_eq!(request_line(raw.as_bytes()), want, "{raw:?}");
        }
        // A path that is not UTF-8 is left out; the method is not.
        assert_eq!(request_line(b"GET /\xff HTTP/1.1\r\n"), (Some("GET"), None));
    }

    #[test]
    fn request_targets_of_every_form() {
        let h = head("GET http://example.com:8080/x?y HTTP/1.1\r\nhost: a\r\n\r\n");
        assert_eq!(
            h.uri.authority().map(|a| a.as_str()),
            Some("example.com:8080")
        );
        assert_eq!(h.uri.path(), "/x");
        assert_eq!(head("OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n").uri, "*");
    }

    /// The authority form is CONNECT's only, and CONNECT is refused: the
    /// gateway tunnels to no host a client names.
    #[test]
    fn connect_is_refused_with_405() {
        for raw in [
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.0\r\n\r\n",
        ] {
            let refused = parse_str(raw).err();
            assert_eq!(refused, Some(Invalid::Connect), "{raw:?}");
            assert_eq!(Invalid::Connect.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(Invalid::Connect.code(), "method_not_allowed");
        }
    }

    #[test]
    fn incomplete_heads_wait_and_oversized_ones_are_refused() {
        assert!(matches!(
            parse_str("GET / HTTP/1.1\r\nhost: x\r\n"),
            Ok(None)
        ));
        let big = format!(
            "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n",
            "b".repeat(9000)
        );
        assert_eq!(parse_str(&big).err(), Some(Invalid::TooLarge));
        let big = format!("{big}\r\n");
        assert_eq!(parse_str(&big).err(), Some(Invalid::TooLarge));
        let mut many = String::from("GET / HTTP/1.1\r\nhost: x\r\n");
        for i in 0..101 {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        assert_eq!(parse_str(&many).err(), Some(Invalid::TooLarge));
        // More headers than fit on the stack, within a higher limit.
        let mut buf = BytesMut::from(format!("{many}\r\n").as_str());
        let limits = Limits {
            max_bytes: 8192,
            max_headers: 200,
        };
        assert!(matches!(
            parse(&mut buf, limits, &mut Vec::new()),
            Ok(Some(_))
        ));
    }

    #[test]
    fn malformed_heads_are_400() {
        for raw in [
            "GET / HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: x\r\nx : y\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: x\r\n x: y\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: x\r\nx: a\r\n folded\r\n\r\n",
            "GET  / HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET /\u{7f} HTTP/1.1\r\nhost: x\r\n\r\n",
            "G(T / HTTP/1.1\r\nhost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        ] {
            assert!(
                matches!(parse_str(raw), Err(Invalid::Malformed(_))),
                "{raw:?}: {:?}",
                parse_str(raw)
            );
        }
        assert_eq!(
            parse_str("GET / HTTP/2.0\r\n\r\n").err(),
            Some(Invalid::Version)
        );
    }

    /// Every line of a head ends in CRLF: a bare LF anywhere in it (the
    /// request line, a field, the empty line) is refused, where httparse
    /// alone would take it.
    #[test]
    fn a_bare_lf_in_a_head_is_400() {
        for raw in [
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\nX-B: 2\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            let parsed = parse(&mut buf, LIMITS, &mut Vec::new());
            assert!(
                matches!(parsed, Err(Invalid::Malformed(why)) if why.contains("bare LF")),
                "{raw:?}: {parsed:?}"
            );
            // Left for the refusal's log line, as every refused head is.
            assert_eq!(&buf[..], raw.as_bytes(), "{raw:?}");
        }
        // A bare LF after the head is the body's, not the head's.
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n\n\n");
        assert_eq!(h.body, BodyLength::Length(2));
    }

    /// A `Host` must be a host (RFC 9110 §7.2), and an HTTP/1.1 request
    /// must have one (RFC 9112 §3.2) unless its target names the host; so
    /// must an absolute-form target's be one.
    #[test]
    fn a_host_is_required_of_http11_and_must_be_a_host() {
        for (raw, why) in [
            ("GET / HTTP/1.1\r\n\r\n", "must name its host"),
            ("OPTIONS * HTTP/1.1\r\n\r\n", "must name its host"),
            (
                "GET / HTTP/1.1\r\nHost: a/b?c\r\n\r\n",
                "Host header must be",
            ),
            (
                "GET / HTTP/1.1\r\nHost: good, evil\r\n\r\n",
                "Host header must be",
            ),
            (
                "GET / HTTP/1.1\r\nHost: good,evil\r\n\r\n",
                "Host header must be",
            ),
            ("GET / HTTP/1.0\r\nHost: x:y\r\n\r\n", "Host header must be"),
            (
                "GET http://good,evil/x HTTP/1.1\r\nHost: good\r\n\r\n",
                "target's host must be",
            ),
            (
                "GET http://a@b.example/x HTTP/1.1\r\nHost: b.example\r\n\r\n",
                "userinfo",
            ),
        ] {
            match parse_str(raw) {
                Err(invalid @ Invalid::BadHost(message)) => {
                    assert!(message.contains(why), "{raw:?}: {message}");
                    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
                    assert_eq!(invalid.code(), "bad_host");
                }
                other => panic!("{raw:?}: {other:?}"),
            }
        }
        // As before: userinfo in `Host` is its own refusal.
        assert!(matches!(
            parse_str("GET / HTTP/1.1\r\nHost: a@b\r\n\r\n"),
            Err(Invalid::Malformed(m)) if m.contains("userinfo")
        ));
        for fine in [
            "GET / HTTP/1.1\r\nHost: shop.example:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n",
            // RFC 9112 §3.2: empty when the target has no authority.
            "GET / HTTP/1.1\r\nHost:\r\n\r\n",
            // HTTP/1.0 may leave it out; an absolute form names the host.
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://shop.example/x HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_str(fine), Ok(Some(_))),
                "{fine:?}: {:?}",
                parse_str(fine)
            );
        }
    }

    #[test]
    fn content_length_and_transfer_encoding_together_are_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nhost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(
                matches!(parse_str(raw), Err(Invalid::Malformed(_))),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn content_lengths_must_be_valid_and_agree() {
        let h =
            head("POST / HTTP/1.1\r\nhost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(h.body, BodyLength::Length(5));
        let h = head("POST / HTTP/1.1\r\nhost: x\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.body, BodyLength::None);
        for bad in [
            "5, 6",
            "-1",
            "+5",
            "0x10",
            "",
            "1e3",
            "99999999999999999999",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nhost: x\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(parse_str(&raw), Err(Invalid::Malformed(_))),
                "{bad}"
            );
        }
        let raw = "POST / HTTP/1.1\r\nhost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n";
        assert!(matches!(parse_str(raw), Err(Invalid::Malformed(_))));
    }

    #[test]
    fn only_chunked_is_a_transfer_coding() {
        for ok in ["chunked", "Chunked", " chunked ", "chunked,", ", chunked"] {
            let raw = format!("POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: {ok}\r\n\r\n");
            assert_eq!(head(&raw).body, BodyLength::Chunked, "{ok:?}");
        }
        for other in [
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "chunked;x=1",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: {other}\r\n\r\n");
            assert_eq!(
                parse_str(&raw).err(),
                Some(Invalid::UnsupportedCoding),
                "{other}"
            );
        }
        for bad in ["", "chunked, chunked"] {
            let raw = format!("POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: {bad}\r\n\r\n");
            assert!(
                matches!(parse_str(&raw), Err(Invalid::Malformed(_))),
                "{bad:?}"
            );
        }
        let raw = "POST / HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_str(raw), Err(Invalid::Malformed(_))));
        let raw = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse_str(raw), Err(Invalid::Malformed(_))));
    }

    #[test]
    fn keep_alive_and_expect() {
        assert!(head("GET / HTTP/1.1\r\nhost: x\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nhost: x\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(
            !head("GET / HTTP/1.1\r\nhost: x\r\nConnection: keep-alive, Close\r\n\r\n").keep_alive
        );
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(
            !head("GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n")
                .keep_alive
        );
        assert!(head("PUT / HTTP/1.1\r\nhost: x\r\nExpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!head("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn websocket_upgrades_are_http11_gets_without_a_body() {
        let ask = |request_line: &str, more: &str| {
            head(&format!(
                "{request_line}\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n{more}\r\n"
            ))
            .websocket
        };
        assert!(ask("GET /ws HTTP/1.1", ""));
        assert!(ask("GET /ws HTTP/1.1", "Content-Length: 0\r\n"));
        assert!(!ask("GET /ws HTTP/1.0", ""));
        assert!(!ask("POST /ws HTTP/1.1", ""));
        assert!(!ask("GET /ws HTTP/1.1", "Content-Length: 2\r\n"));
        assert!(!ask("GET /ws HTTP/1.1", "Transfer-Encoding: chunked\r\n"));
        // Both fields are needed, and the protocol must be WebSocket.
        assert!(!head("GET / HTTP/1.1\r\nhost: x\r\nUpgrade: websocket\r\n\r\n").websocket);
        assert!(!head("GET / HTTP/1.1\r\nhost: x\r\nConnection: upgrade\r\n\r\n").websocket);
        assert!(
            !head("GET / HTTP/1.1\r\nhost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
                .websocket
        );
        assert!(
            head("GET / HTTP/1.1\r\nhost: x\r\nConnection: upgrade\r\nUpgrade: foo/2, websocket\r\n\r\n")
                .websocket
        );
        assert!(!head("GET / HTTP/1.1\r\nhost: x\r\n\r\n").websocket);
    }
}
