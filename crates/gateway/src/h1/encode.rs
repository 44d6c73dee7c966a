//! Response encoding: the status line and headers, the body's framing, the
//! cached `date`, and the write buffer that lets a head and the body frames
//! already available leave in one write.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{StatusCode, Version};

use crate::relayed::{Relayed, Values};

/// Data frames up to this size are copied into the write buffer; larger
/// ones are queued as they are and written with `writev`.
const COPY_MAX: usize = 8 * 1024;

/// Pending output, in order: `queue`, then `flat`.
#[derive(Default)]
pub(crate) struct Out {
    queue: VecDeque<Bytes>,
    queued: usize,
    flat: BytesMut,
}

impl Out {
    pub(crate) fn len(&self) -> usize {
        self.queued + self.flat.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        self.flat.extend_from_slice(bytes);
    }

    fn data(&mut self, data: Bytes) {
        if data.len() <= COPY_MAX {
            self.flat.extend_from_slice(&data);
        } else {
            if !self.flat.is_empty() {
                let flat = self.flat.split().freeze();
                self.queued += flat.len();
                self.queue.push_back(flat);
            }
            self.queued += data.len();
            self.queue.push_back(data);
        }
    }

    /// The pending bytes as slices for one (vectored) write; how many of
    /// `slices` were filled.
    pub(crate) fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let parts = self
            .queue
            .iter()
            .map(|b| &b[..])
            .chain(std::iter::once(&self.flat[..]));
        for (slot, part) in slices.iter_mut().zip(parts.filter(|p| !p.is_empty())) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    /// The only pending slice, when there is just one (the common case).
    pub(crate) fn single(&self) -> Option<&[u8]> {
        self.queue.is_empty().then_some(&self.flat[..])
    }

    /// Drops `n` written bytes.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 {
            match self.queue.front_mut() {
                Some(front) if n >= front.len() => {
                    n -= front.len();
                    self.queued -= front.len();
                    self.queue.pop_front();
                }
                Some(front) => {
                    front.advance(n);
                    self.queued -= n;
                    return;
                }
                None => {
                    self.flat.advance(n.min(self.flat.len()));
                    return;
                }
            }
        }
        if self.flat.is_empty() {
            // Lets the buffer reuse its space from the start.
            self.flat.clear();
        }
    }
}

/// How the response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body may be sent (HEAD; 1xx, 204, 304): the body is not polled.
    None,
    /// `content-length`: this many bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client, length unknown).
    Close,
}

/// What the request said that shapes its response.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    pub head: bool,
    pub version: Version,
    /// A WebSocket handshake (`head`): a `101` to it may switch.
    pub websocket: bool,
}

/// [`framing`] for a response with `fields`: its own `content-length`
/// read off them, where an invalid one (from the stack) is replaced by the
/// body's own size.
pub(crate) fn framing_of(
    ex: Exchange,
    status: StatusCode,
    fields: HeadFields<'_>,
    end_stream: bool,
    exact: Option<u64>,
) -> (Framing, Option<u64>) {
    let declared = content_length(fields.get_all(&header::CONTENT_LENGTH)).unwrap_or(None);
    framing(ex, status, declared, end_stream, exact)
}

/// The framing of a response and the `content-length` to announce, from
/// the request, the status, the response's own `content-length` (if
/// valid) and what its body knows of its size.
pub(crate) fn framing(
    ex: Exchange,
    status: StatusCode,
    declared: Option<u64>,
    end_stream: bool,
    exact: Option<u64>,
) -> (Framing, Option<u64>) {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return (Framing::None, None);
    }
    if ex.head {
        // The length the GET would have, when known; never a body.
        return (Framing::None, declared.or(exact.filter(|&n| n > 0)));
    }
    if end_stream {
        return (Framing::Length(0), Some(0));
    }
    if let Some(n) = declared.or(exact) {
        return (Framing::Length(n), Some(n));
    }
    if ex.version == Version::HTTP_11 {
        (Framing::Chunked, None)
    } else {
        (Framing::Close, None)
    }
}

/// The value of a `content-length` header: digits, or a list of identical
/// ones. Several headers must agree too.
pub(crate) fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, ()> {
    let mut found = None;
    for value in values {
        for part in value.split(|&b| b == b',') {
            let part = trim_ows(part);
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(());
            }
            let mut n: u64 = 0;
            for &d in part {
                n = n
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d - b'0')))
                    .ok_or(())?;
            }
            match found {
                Some(prev) if prev != n => return Err(()),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let Some((b' ' | b'\t', rest)) = s.split_first() {
        s = rest;
    }
    while let Some((b' ' | b'\t', rest)) = s.split_last() {
        s = rest;
    }
    s
}

/// Whether a comma-separated header holds `token` (case-insensitively).
pub(crate) fn has_token<'a>(mut values: impl Iterator<Item = &'a [u8]>, token: &[u8]) -> bool {
    values.any(|v| {
        v.split(|&b| b == b',')
            .any(|t| trim_ows(t).eq_ignore_ascii_case(token))
    })
}

/// What the connection does after a response, as its head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    /// Stays open for the next request.
    KeepAlive,
    /// Closes (`connection: close`).
    Close,
    /// Switches to WebSocket (`connection: upgrade`, `upgrade: websocket`).
    WebSocket,
}

/// Writes the status line and headers. The response's own `connection`,
/// `keep-alive`, `transfer-encoding` and `content-length` are replaced by
/// what this connection does; `trailer` is kept only for a chunked body.
pub(crate) fn head(
    out: &mut Out,
    version: Version,
    status: StatusCode,
    fields: HeadFields<'_>,
    framing: Framing,
    length: Option<u64>,
    then: Then,
) {
    let b = &mut out.flat;
    b.reserve(256 + fields.len() * 48);
    if version == Version::HTTP_10 {
        b.extend_from_slice(b"HTTP/1.0 ");
    } else {
        b.extend_from_slice(b"HTTP/1.1 ");
    }
    b.extend_from_slice(status.as_str().as_bytes());
    b.extend_from_slice(b" ");
    b.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    b.extend_from_slice(b"\r\n");
    let mut has_date = false;
    let mut field = |b: &mut BytesMut, name: &[u8], value: &[u8]| {
        if replaced(name, framing) {
            return;
        }
        has_date |= crate::headers::name_is(name, b"date");
        crate::headers::put_field(b, name, value);
    };
    // An instance's fields first, as it sent them, then what the gateway
    // set beside them, then the map's.
    if let Some(relayed) = fields.relayed {
        for (name, value) in relayed.sent() {
            field(b, name, value);
        }
        // The gateway's lines copied at once, unless one may be left out
        // here or be a date.
        match relayed.added_lines(REPLACED_OR_DATE) {
            Some(lines) => b.extend_from_slice(lines),
            None => {
                for (name, value) in relayed.added() {
                    field(b, name, value);
                }
            }
        }
    }
    for (name, value) in fields.map {
        field(b, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(n) = length {
        b.extend_from_slice(b"content-length: ");
        b.extend_from_slice(itoa(n, &mut [0; 20]));
        b.extend_from_slice(b"\r\n");
    }
    if framing == Framing::Chunked {
        b.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    match then {
        Then::Close => b.extend_from_slice(b"connection: close\r\n"),
        Then::KeepAlive if version == Version::HTTP_10 => {
            b.extend_from_slice(b"connection: keep-alive\r\n");
        }
        Then::KeepAlive => {}
        // `upgrade` is hop-by-hop, left out of an instance's fields: this
        // connection's switch is written here.
        Then::WebSocket => b.extend_from_slice(b"connection: upgrade\r\nupgrade: websocket\r\n"),
    }
    if !has_date {
        b.extend_from_slice(b"date: ");
        date(|d| b.extend_from_slice(d));
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"\r\n");
}

/// A response's fields as the head is written: its map and, for a response
/// relayed from an instance, the instance's fields and the gateway's beside
/// them (see `relayed`), which come first.
#[derive(Clone, Copy)]
pub(crate) struct HeadFields<'a> {
    pub map: &'a HeaderMap,
    pub relayed: Option<&'a Relayed>,
}

impl<'a> HeadFields<'a> {
    /// The values of the fields named `name`, in order.
    pub(crate) fn get_all(self, name: &'a HeaderName) -> Values<'a> {
        let map = self.map.get_all(name);
        match self.relayed {
            Some(relayed) => relayed.get_all(name).then(map),
            None => Values::of_map(map),
        }
    }

    fn len(self) -> usize {
        self.map.len() + self.relayed.map_or(0, Relayed::len)
    }
}

impl<'a> From<&'a HeaderMap> for HeadFields<'a> {
    fn from(map: &'a HeaderMap) -> HeadFields<'a> {
        HeadFields { map, relayed: None }
    }
}

/// The fields a response head leaves out because what this connection
/// does replaces them: its framing and persistence fields, and `trailer`
/// unless the body is chunked. One list, for [`replaced`] and for the
/// bits that send the gateway's own lines through it ([`REPLACED_OR_DATE`]).
pub(crate) const REPLACED: [&str; 5] = [
    "trailer",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
];

/// The [`name_bit`](crate::headers::name_bit)s of [`REPLACED`].
const REPLACED_BITS: u64 = crate::headers::name_bits(&REPLACED);

/// The [`name_bit`](crate::headers::name_bit)s of [`REPLACED`] and of
/// `date`, which `head` notes: a relayed response's added lines with none
/// of these go into the head at once.
const REPLACED_OR_DATE: u64 = REPLACED_BITS | crate::headers::name_bit(b"date");

/// Whether a response's field named `name` (any case) is one of
/// [`REPLACED`], left out of the head.
fn replaced(name: &[u8], framing: Framing) -> bool {
    // By the name's bit first: most names are compared with nothing.
    if REPLACED_BITS & crate::headers::name_bit(name) == 0 {
        return false;
    }
    let is = |known: &str| crate::headers::name_is(name, known.as_bytes());
    REPLACED.iter().any(|known| is(known)) && !(framing == Framing::Chunked && is("trailer"))
}

/// Fields a trailer section must not carry, whatever the response's
/// `Trailer` announces (RFC 9110 §6.5.1): framing, routing, the fields
/// this connection sets itself, and those a recipient acts on before the
/// body (its content coding, type and range, caching, cookies,
/// authentication). A client that merged a trailer `Content-Length` or
/// `Set-Cookie` into the head's fields would act on what the instance
/// could not put in its head.
const NOT_IN_TRAILERS: [&str; 18] = [
    "trailer",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "host",
    "content-encoding",
    "content-type",
    "content-range",
    "cache-control",
    "expires",
    "age",
    "set-cookie",
    "www-authenticate",
    "authorization",
    "location",
];

/// The body writer for one response.
pub(crate) struct BodyEncoder {
    framing: Framing,
    /// Names the response announced in `trailer`; only these are sent.
    trailer_names: Vec<HeaderName>,
    done: bool,
    /// The body ended before its `content-length`.
    short: bool,
}

/// The body had more bytes than its length. The connection cannot be
/// reused.
#[derive(Debug)]
pub(crate) struct LengthMismatch;

impl BodyEncoder {
    pub(crate) fn new(framing: Framing, fields: HeadFields<'_>) -> BodyEncoder {
        let trailer_names = if framing == Framing::Chunked {
            fields
                .get_all(&header::TRAILER)
                .flat_map(|v| v.split(|&b| b == b','))
                .filter_map(|n| HeaderName::from_bytes(trim_ows(n)).ok())
                .filter(|n| !NOT_IN_TRAILERS.contains(&n.as_str()))
                .collect()
        } else {
            Vec::new()
        };
        BodyEncoder {
            framing,
            trailer_names,
            done: matches!(framing, Framing::None),
            short: false,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// The body ended short of its length: the message is incomplete and
    /// the connection cannot be reused.
    pub(crate) fn is_short(&self) -> bool {
        self.short
    }

    pub(crate) fn data(&mut self, out: &mut Out, data: Bytes) -> Result<(), LengthMismatch> {
        if data.is_empty() {
            // An empty chunk would end a chunked body.
            return Ok(());
        }
        match &mut self.framing {
            Framing::None => Ok(()),
            Framing::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(LengthMismatch);
                }
                *left -= n;
                out.data(data);
                Ok(())
            }
            Framing::Chunked => {
                let mut size = [0u8; 16];
                out.extend(hex(data.len(), &mut size));
                out.extend(b"\r\n");
                out.data(data);
                out.extend(b"\r\n");
                Ok(())
            }
            Framing::Close => {
                out.data(data);
                Ok(())
            }
        }
    }

    /// The body ended (with `trailers`, if it had any).
    pub(crate) fn finish(&mut self, out: &mut Out, trailers: Option<&HeaderMap>) {
        self.done = true;
        match self.framing {
            Framing::Length(left) if left > 0 => self.short = true,
            Framing::Chunked => {
                out.extend(b"0\r\n");
                if let Some(trailers) = trailers {
                    for (name, value) in trailers {
                        if self.trailer_names.contains(name) {
                            out.extend(name.as_str().as_bytes());
                            out.extend(b": ");
                            out.extend(value.as_bytes());
                            out.extend(b"\r\n");
                        }
                    }
                }
                out.extend(b"\r\n");
            }
            _ => {}
        }
    }
}

fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(slot) = buf.get_mut(i) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or_default()
}

fn hex(mut n: usize, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        if let (Some(slot), Some(&d)) = (buf.get_mut(i), DIGITS.get(n % 16)) {
            *slot = d;
        }
        n /= 16;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or_default()
}

/// An IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`.
const DATE_LEN: usize = 29;

struct CachedDate {
    secs: u64,
    text: [u8; DATE_LEN],
}

thread_local! {
    static DATE: RefCell<CachedDate> = const {
        RefCell::new(CachedDate { secs: u64::MAX, text: [b' '; DATE_LEN] })
    };
}

/// Calls `f` with the current date, formatted at most once a second per
/// thread (formatting it for every response costs measurably).
pub(crate) fn date(f: impl FnOnce(&[u8])) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.secs != secs {
            cached.secs = secs;
            cached.text = format_date(secs);
        }
        f(&cached.text);
    });
}

/// Formats `secs` since the epoch as an IMF-fixdate (RFC 9110 §5.6.7),
/// with `httpdate` (the formatter hyper uses).
fn format_date(secs: u64) -> [u8; DATE_LEN] {
    let when = UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let text = httpdate::fmt_http_date(when);
    let mut out = [b' '; DATE_LEN];
    // Always 29 bytes for years 1970-9999; anything else stays blank
    // rather than a truncated date.
    if text.len() == DATE_LEN {
        out.copy_from_slice(text.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relayed::Field;
    use http::HeaderValue;

    const HTTP11: Exchange = Exchange {
        head: false,
        version: Version::HTTP_11,
        websocket: false,
    };

    fn written(out: &Out) -> String {
        let mut s = Vec::new();
        for b in &out.queue {
            s.extend_from_slice(b);
        }
        s.extend_from_slice(&out.flat);
        String::from_utf8_lossy(&s).into_owned()
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(&format_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&format_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&format_date(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &format_date(1_767_225_599),
            b"Wed, 31 Dec 2025 23:59:59 GMT"
        );
    }

    #[test]
    fn framing_follows_method_status_and_size() {
        let head = Exchange {
            head: true,
            ..HTTP11
        };
        let http10 = Exchange {
            version: Version::HTTP_10,
            ..HTTP11
        };
        let ok = StatusCode::OK;
        assert_eq!(
            framing(HTTP11, ok, None, true, Some(0)),
            (Framing::Length(0), Some(0))
        );
        assert_eq!(
            framing(HTTP11, ok, None, false, Some(5)),
            (Framing::Length(5), Some(5))
        );
        // The response's own length wins over the size hint.
        assert_eq!(
            framing(HTTP11, ok, Some(7), false, None),
            (Framing::Length(7), Some(7))
        );
        assert_eq!(
            framing(HTTP11, ok, None, false, None),
            (Framing::Chunked, None)
        );
        assert_eq!(
            framing(http10, ok, None, false, None),
            (Framing::Close, None)
        );
        assert_eq!(
            framing(http10, ok, None, false, Some(3)),
            (Framing::Length(3), Some(3))
        );
        // HEAD: the length is announced, nothing is sent.
        assert_eq!(
            framing(head, ok, Some(1234), true, Some(0)),
            (Framing::None, Some(1234))
        );
        assert_eq!(
            framing(head, ok, None, false, Some(9)),
            (Framing::None, Some(9))
        );
        assert_eq!(
            framing(head, ok, None, true, Some(0)),
            (Framing::None, None)
        );
        for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
            assert_eq!(
                framing(HTTP11, status, Some(5), false, Some(5)),
                (Framing::None, None)
            );
        }
    }

    #[test]
    fn heads_replace_connection_level_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("connection", HeaderValue::from_static("x-secret"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("transfer-encoding", HeaderValue::from_static("gzip"));
        headers.insert("content-length", HeaderValue::from_static("99"));
        headers.insert("trailer", HeaderValue::from_static("x-sum"));
        headers.insert("date", HeaderValue::from_static("yesterday"));
        let mut out = Out::default();
        head(
            &mut out,
            Version::HTTP_11,
            StatusCode::OK,
            (&headers).into(),
            Framing::Length(3),
            Some(3),
            Then::Close,
        );
        assert_eq!(
            written(&out),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: yesterday\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
        );
        let mut out = Out::default();
        head(
            &mut out,
            Version::HTTP_10,
            StatusCode::from_u16(299).unwrap_or(StatusCode::OK),
            (&HeaderMap::new()).into(),
            Framing::Length(0),
            Some(0),
            Then::KeepAlive,
        );
        let text = written(&out);
        assert!(
            text.starts_with(
                "HTTP/1.0 299 \r\ncontent-length: 0\r\nconnection: keep-alive\r\ndate: "
            ),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    }

    /// An instance's fields go out as it sent them and before the
    /// gateway's, with the same framing and persistence fields left out as
    /// from a map, whatever their case.
    #[test]
    fn relayed_fields_are_written_as_sent_before_the_maps() {
        let head: &[u8] = b"Content-Type: text/plain\r\nCONTENT-LENGTH: 99\r\nConnection: x\r\nKeep-Alive: 1\r\nTransfer-Encoding: gzip\r\nTrailer: X-Sum\r\nDate: yesterday\r\nset-cookie: a=1\r\n";
        let fields = head
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|line| {
                let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
                Field::within(head, &line[..colon], &line[colon + 2..line.len() - 1])
            })
            .collect();
        let relayed = Relayed::new(Bytes::from_static(head), fields);
        let mut map = HeaderMap::new();
        map.insert("x-request-id", HeaderValue::from_static("id"));
        let fields = HeadFields {
            map: &map,
            relayed: Some(&relayed),
        };
        let mut out = Out::default();
        head_of(&mut out, fields, Framing::Length(3));
        assert_eq!(
            written(&out),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: yesterday\r\nset-cookie: a=1\r\nx-request-id: id\r\ncontent-length: 3\r\n\r\n"
        );
        // `Trailer` is kept for a chunked body, whose trailer it announces.
        let mut out = Out::default();
        head_of(&mut out, fields, Framing::Chunked);
        assert!(written(&out).contains("\r\nTrailer: X-Sum\r\n"));
        let enc = BodyEncoder::new(Framing::Chunked, fields);
        assert_eq!(enc.trailer_names, [HeaderName::from_static("x-sum")]);
    }

    /// What the gateway set on a relayed response goes out after the
    /// instance's fields, copied at once; one the connection replaces
    /// (`content-length`, here set by compression) is still left out, and
    /// a `date` of its own is not doubled.
    #[test]
    fn the_gateways_fields_on_a_relayed_response_follow_the_instances() {
        use crate::relayed::Reply;
        let head: &[u8] = b"Content-Type: text/plain\r\n";
        let field = Field::within(head, &head[..12], &head[14..24]);
        let mut reply = Reply {
            res: http::Response::new(crate::body::empty()),
            relayed: Some(Relayed::new(Bytes::from_static(head), vec![field])),
        };
        let mut fields = reply.fields();
        let id = HeaderName::from_static("x-request-id");
        fields.insert_ref(&id, &HeaderValue::from_static("id"));
        fields.insert(header::SERVER, HeaderValue::from_static("flotilla"));
        let written_now = |reply: &Reply| {
            let mut out = Out::default();
            let fields = HeadFields {
                map: reply.res.headers(),
                relayed: reply.relayed.as_ref(),
            };
            head_of(&mut out, fields, Framing::Length(3));
            written(&out)
        };
        let text = written_now(&reply);
        assert!(
            text.starts_with(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-request-id: id\r\nserver: flotilla\r\ncontent-length: 3\r\ndate: "
            ),
            "{text}"
        );
        let mut fields = reply.fields();
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        fields.insert(header::DATE, HeaderValue::from_static("yesterday"));
        assert_eq!(
            written_now(&reply),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-request-id: id\r\nserver: flotilla\r\ndate: yesterday\r\ncontent-length: 3\r\n\r\n"
        );
        // Nor does any other field the connection replaces.
        for name in REPLACED {
            let mut fields = reply.fields();
            fields.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            let text = written_now(&reply);
            assert!(!text.contains(&format!("{name}: x")), "{name}: {text}");
        }
    }

    fn head_of(out: &mut Out, fields: HeadFields<'_>, framing: Framing) {
        let length = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        head(
            out,
            Version::HTTP_11,
            StatusCode::OK,
            fields,
            framing,
            length,
            Then::KeepAlive,
        );
    }

    #[test]
    fn a_switch_to_websocket_says_so_and_nothing_about_a_body() {
        let mut map = HeaderMap::new();
        map.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        map.insert("connection", HeaderValue::from_static("close"));
        let mut out = Out::default();
        head(
            &mut out,
            Version::HTTP_11,
            StatusCode::SWITCHING_PROTOCOLS,
            (&map).into(),
            Framing::None,
            None,
            Then::WebSocket,
        );
        let text = written(&out);
        assert!(
            text.starts_with(
                "HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nconnection: upgrade\r\nupgrade: websocket\r\ndate: "
            ),
            "{text}"
        );
    }

    #[test]
    fn chunked_bodies_are_framed_with_announced_trailers_only() {
        let mut headers = HeaderMap::new();
        // Announced or not, framing and fields acted on before the body
        // never go into a trailer.
        headers.insert(
            "trailer",
            HeaderValue::from_static("x-sum, Content-Length, transfer-encoding, set-cookie"),
        );
        let mut enc = BodyEncoder::new(Framing::Chunked, (&headers).into());
        let mut out = Out::default();
        assert!(enc.data(&mut out, Bytes::from("hello")).is_ok());
        assert!(enc.data(&mut out, Bytes::new()).is_ok());
        assert!(enc.data(&mut out, Bytes::from(vec![b'x'; 20_000])).is_ok());
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("42"));
        trailers.insert("x-secret", HeaderValue::from_static("no"));
        trailers.insert("content-length", HeaderValue::from_static("0"));
        trailers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        trailers.insert("set-cookie", HeaderValue::from_static("session=evil"));
        enc.finish(&mut out, Some(&trailers));
        assert!(!enc.is_short());
        let text = written(&out);
        let expected = format!(
            "5\r\nhello\r\n4e20\r\n{}\r\n0\r\nx-sum: 42\r\n\r\n",
            "x".repeat(20_000)
        );
        assert_eq!(text, expected);
        // The large frame went by reference, between copied pieces.
        assert_eq!(out.queue.len(), 2);
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(out.slices(&mut slices), 3);
        let len = out.len();
        out.advance(len - 3);
        assert_eq!(written(&out), expected[expected.len() - 3..]);
        out.advance(3);
        assert!(out.is_empty());
    }

    #[test]
    fn lengths_are_enforced() {
        let mut enc = BodyEncoder::new(Framing::Length(4), (&HeaderMap::new()).into());
        let mut out = Out::default();
        assert!(enc.data(&mut out, Bytes::from("abc")).is_ok());
        assert!(enc.data(&mut out, Bytes::from("de")).is_err());
        let mut enc = BodyEncoder::new(Framing::Length(4), (&HeaderMap::new()).into());
        assert!(enc.data(&mut out, Bytes::from("abc")).is_ok());
        enc.finish(&mut out, None);
        assert!(enc.is_short());
    }

    #[test]
    fn content_lengths_must_be_digits_and_agree() {
        let cl = |vals: &[&str]| content_length(vals.iter().map(|v| v.as_bytes()));
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["42"]), Ok(Some(42)));
        assert_eq!(cl(&["007"]), Ok(Some(7)));
        assert_eq!(cl(&["5", "5"]), Ok(Some(5)));
        assert_eq!(cl(&["5, 5"]), Ok(Some(5)));
        for bad in [
            &["5", "6"][..],
            &["5, 6"],
            &[""],
            &["+5"],
            &["-5"],
            &["5 5"],
            &["0x5"],
            &["5,"],
            &["18446744073709551616"],
        ] {
            assert_eq!(cl(bad), Err(()), "{bad:?}");
        }
    }
}
