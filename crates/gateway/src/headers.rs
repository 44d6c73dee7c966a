//! Header rewriting between client and upstream.
//!
//! Hop-by-hop headers describe one connection and must not be relayed
//! (RFC 9110 §7.6.1); relaying them lets a client steer the gateway's own
//! upstream connection (`Connection: close`, `Upgrade`, `Transfer-Encoding`
//! smuggling) or strip headers a later hop relies on. `X-Forwarded-*` tell
//! the service who really called, since it only sees the gateway.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::sync::Arc;

use flotilla_manifest::{ForwardedHeader, HOP_BY_HOP};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;

use crate::jwt::Identity;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether `name`, a field name httparse or `HeaderName` accepted (a
/// token), is `lower` in any case, where `lower` is made of lower-case
/// letters, digits and `-`, as the names the gateway looks for are.
///
/// Eight bytes at a time, where `eq_ignore_ascii_case` folds and compares
/// a byte at a time (~6 instructions a byte: a response's
/// `content-length` was compared so three times per request). Setting
/// bit 0x20 of a byte folds an upper-case letter into its lower-case one
/// and leaves a lower-case letter, a digit and `-` as they are; the only
/// other bytes it turns into one of those are control bytes (0x0d into
/// `-`, 0x10–0x19 into digits), which no token holds.
#[inline(always)]
pub(crate) fn name_is(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(
        lower
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
    );
    if name.len() != lower.len() {
        return false;
    }
    let word = |b: &[u8]| <[u8; 8]>::try_from(b).map_or(0, u64::from_ne_bytes);
    let (mut a, mut b) = (name.chunks_exact(8), lower.chunks_exact(8));
    for (x, y) in (&mut a).zip(&mut b) {
        if word(x) | 0x2020_2020_2020_2020 != word(y) {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// The `HeaderName` of a field's name (a token, as httparse checked, or a
/// `HeaderName`'s own bytes) when it is one of the names most requests
/// carry; `None`: any other, for `HeaderName::from_bytes`.
///
/// `from_bytes` lower-cases a standard name into a scratch buffer and
/// matches it by length and bytes, ~110 instructions a name
/// (`instructions.sh`: `Host` and `Authorization` cost 227 a request);
/// [`name_is`] settles these in a few words.
#[inline]
pub(crate) fn known_name(raw: &[u8]) -> Option<HeaderName> {
    let is = |lower: &[u8]| name_is(raw, lower);
    let name = match raw.len() {
        4 if is(b"host") => header::HOST,
        6 if is(b"accept") => header::ACCEPT,
        6 if is(b"cookie") => header::COOKIE,
        6 if is(b"origin") => header::ORIGIN,
        7 if is(b"referer") => header::REFERER,
        10 if is(b"user-agent") => header::USER_AGENT,
        10 if is(b"connection") => header::CONNECTION,
        12 if is(b"content-type") => header::CONTENT_TYPE,
        13 if is(b"authorization") => header::AUTHORIZATION,
        13 if is(b"cache-control") => header::CACHE_CONTROL,
        13 if is(b"if-none-match") => header::IF_NONE_MATCH,
        14 if is(b"content-length") => header::CONTENT_LENGTH,
        15 if is(b"accept-encoding") => header::ACCEPT_ENCODING,
        15 if is(b"accept-language") => header::ACCEPT_LANGUAGE,
        _ => return None,
    };
    Some(name)
}

/// A field name's bit in a 64-bit filter, from its length and first byte,
/// in any case (`| 0x20` is a lower-case letter's bit, already set in a
/// digit and `-`): most names are told apart from the few looked for by
/// it alone, without a comparison. `content-type` and `x-request-id`,
/// both 12 bytes long, get bits of their own, as a bit per length alone
/// did not give them.
pub(crate) const fn name_bit(name: &[u8]) -> u64 {
    let first = if name.is_empty() {
        0
    } else {
        (name[0] | 0x20) as usize
    };
    1 << ((name.len() + 8 * first) % 64)
}

/// The [`name_bit`]s of `names`.
pub(crate) const fn name_bits(names: &[&str]) -> u64 {
    let (mut bits, mut i) = (0, 0);
    while i < names.len() {
        bits |= name_bit(names[i].as_bytes());
        i += 1;
    }
    bits
}

/// What a head is written into: an upstream request's (`Vec<u8>`) or a
/// response's (`BytesMut`).
pub(crate) trait HeadBuffer {
    /// Room for `len` more bytes, past the length: uninitialised.
    fn room(&mut self, len: usize) -> &mut [MaybeUninit<u8>];
    /// Moves the length past `len` bytes of the room.
    ///
    /// # Safety
    /// The first `len` bytes of the last [`HeadBuffer::room`] were written.
    unsafe fn filled(&mut self, len: usize);
}

impl HeadBuffer for Vec<u8> {
    fn room(&mut self, len: usize) -> &mut [MaybeUninit<u8>] {
        self.reserve(len);
        &mut self.spare_capacity_mut()[..len]
    }
    unsafe fn filled(&mut self, len: usize) {
        // SAFETY: the caller wrote them, and `room` reserved them.
        unsafe { self.set_len(self.len() + len) };
    }
}

impl HeadBuffer for bytes::BytesMut {
    fn room(&mut self, len: usize) -> &mut [MaybeUninit<u8>] {
        self.reserve(len);
        &mut self.spare_capacity_mut()[..len]
    }
    unsafe fn filled(&mut self, len: usize) {
        // SAFETY: the caller wrote them, and `room` reserved them.
        unsafe { self.set_len(self.len() + len) };
    }
}

/// Writes `name: value` and its line end. Room for the line is made once
/// and the four pieces copied into it: four `extend_from_slice`s each
/// checked the capacity and moved the length, ~90 instructions a field
/// with the copies (callgrind, line by line), and a request has eight
/// upstream fields and half a dozen response fields.
pub(crate) fn put_field(out: &mut impl HeadBuffer, name: &[u8], value: &[u8]) {
    let (n, v) = (name.len(), value.len());
    let len = n + v + 4;
    let line = out.room(len);
    line[..n].write_copy_of_slice(name);
    line[n..n + 2].write_copy_of_slice(b": ");
    line[n + 2..n + 2 + v].write_copy_of_slice(value);
    line[n + 2 + v..].write_copy_of_slice(b"\r\n");
    // SAFETY: `line` is exactly `len` long, and its four parts, all
    // written just above, cover it.
    unsafe { out.filled(len) };
}

/// Whether a field named `name` (any case) is hop-by-hop whatever
/// `Connection` says.
fn is_hop_by_hop(name: &[u8]) -> bool {
    // By length and first byte first: most names are compared with
    // nothing. (A `Proxy-*` name 7, 10 or 17 bytes long was once taken
    // for end-to-end: only the fixed set was looked at for those lengths.)
    let fixed = || matches!(name.len(), 2 | 7 | 10 | 17);
    let proxy = || name.len() >= 6 && name[0] | 0x20 == b'p' && name_is(&name[..6], b"proxy-");
    (fixed() && HOP_BY_HOP.iter().any(|h| name_is(name, h.as_bytes()))) || proxy()
}

/// The elements of a list field's values (RFC 9110 §5.6.1): split at
/// commas, trimmed, empty ones skipped.
pub(crate) fn list_elements<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// Takes out of a request's `headers` the fields its `Connection` names
/// (RFC 9110 §7.6.1: they are for this hop alone), and leaves in
/// `Connection` only connection options (`close`, `keep-alive`,
/// `upgrade`). Done as a request arrives, before the gateway adds fields
/// of its own: still named at forwarding, `Connection:
/// x-forwarded-client-cert` or an authz check's `x-tenant` would take out
/// what the gateway tells the instance. `host`, `traceparent`,
/// `tracestate` and `x-request-id` stay, as at forwarding.
pub(crate) fn take_connection_named(headers: &mut http::HeaderMap) {
    let is_option = |token: &[u8]| token.eq_ignore_ascii_case(b"close") || is_hop_by_hop(token);
    let stays = |token: &[u8]| {
        [&b"host"[..], b"traceparent", b"tracestate", b"x-request-id"]
            .iter()
            .any(|kept| token.eq_ignore_ascii_case(kept))
    };
    let values = || headers.get_all(header::CONNECTION).iter();
    // A browser's `Connection: keep-alive` names no field: nothing to do.
    let named: Vec<HeaderName> = list_elements(values().map(HeaderValue::as_bytes))
        .filter(|token| !is_option(token) && !stays(token))
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    if named.is_empty() {
        return;
    }
    let mut options = Vec::new();
    for token in list_elements(values().map(HeaderValue::as_bytes)).filter(|t| is_option(t)) {
        if !options.is_empty() {
            options.extend_from_slice(b", ");
        }
        options.extend_from_slice(token);
    }
    for name in named {
        headers.remove(name);
    }
    match HeaderValue::from_bytes(&options) {
        Ok(options) if !options.is_empty() => {
            headers.insert(header::CONNECTION, options);
        }
        _ => {
            headers.remove(header::CONNECTION);
        }
    }
}

/// The hop-by-hop fields of a head still in `httparse`'s form: a field
/// name (any case) is hop-by-hop when [`is_hop_by_hop`] says so or one of
/// the head's `Connection` fields names it. For a response from an
/// instance, whose hop-by-hop fields are dropped before its header map is
/// built rather than removed from it after.
#[cfg(test)]
pub(crate) fn hop_by_hop<'h>(fields: &'h [httparse::Header<'h>]) -> impl Fn(&[u8]) -> bool + 'h {
    let connection = fields
        .iter()
        .any(|f| name_is(f.name.as_bytes(), b"connection"));
    hop_by_hop_given(fields, connection)
}

/// [`hop_by_hop`] for a head whose caller already knows whether it has a
/// `Connection` field (most have none: then no name needs the scan).
pub(crate) fn hop_by_hop_given<'h>(
    fields: &'h [httparse::Header<'h>],
    connection: bool,
) -> impl Fn(&[u8]) -> bool + 'h {
    move |name: &[u8]| {
        is_hop_by_hop(name)
            || (connection
                && list_elements(
                    fields
                        .iter()
                        .filter(|f| name_is(f.name.as_bytes(), b"connection"))
                        .map(|f| f.value),
                )
                .any(|token| token.eq_ignore_ascii_case(name)))
    }
}

/// What the gateway tells an instance about who sent a request: decided
/// where the request arrived, written into the upstream request head by
/// [`forward_fields`].
#[derive(Debug, Clone)]
pub(crate) struct Forwarding {
    /// The peer the request came from.
    pub peer: IpAddr,
    /// When the peer is a trusted proxy, the header it writes: only then,
    /// and only from that header, is the forwarding chain it sent kept
    /// (otherwise it is the client's own claim, and services never see a
    /// forged hop).
    pub trusted_proxy: Option<ForwardedHeader>,
    /// The scheme the client used.
    pub proto: &'static str,
    /// The trace to send the request in when it brings no `traceparent`
    /// to keep (`trace`); `None`: the request's fields as they are.
    pub trace: Option<crate::trace::Started>,
    /// What the request's fields do not hold, written after them.
    pub told: Told,
}

/// What the gateway tells an instance that a request's fields do not hold
/// (and are not made to hold: each insertion into the request's map costs
/// a hashed lookup and a move of entries, ~300 instructions per request
/// for each of these).
#[derive(Debug, Clone, Default)]
pub(crate) struct Told {
    /// The request's id, when the gateway made it (`RequestId::unsent`);
    /// any `X-Request-Id` among the fields is then left out.
    pub request_id: Option<HeaderValue>,
    /// The caller the gateway verified, whose fields
    /// (`x-flotilla-user-id`, the forwarded claims) go with the request.
    /// (A client's own are taken off at the edge.)
    pub identity: Option<Arc<Identity>>,
}

/// The fields of a client's request `parts` as they go to an instance,
/// each passed to `put` as (name, value), in order:
///
/// - the hop-by-hop fields (the fixed set, every `Proxy-*`, and those the
///   `Connection` fields name) are left out, and so is `Expect`: the
///   gateway streams the body itself, and the instance's `100 Continue`
///   would have nowhere to go;
/// - so are `Content-Length` and `Transfer-Encoding`: the upstream
///   connection frames the body itself;
/// - `X-Forwarded-For` is the peer, appended to the chain the client sent
///   when the peer is a trusted proxy that writes it; `Forwarded` is
///   dropped unless the peer is a trusted proxy that writes that;
/// - `X-Forwarded-Proto` is the scheme (`fwd.proto`, which a trusted proxy
///   may have set), and `X-Forwarded-Host` the `Host` (an HTTP/2 client's
///   `:authority` becomes both when it sent no `Host`), or from a trusted
///   proxy the right-most element of the one it sent (the `host=` of its
///   `Forwarded`, for one that writes that): the name its client asked it
///   for;
/// - `traceparent` is the request's when it has exactly one, well-formed,
///   else `fwd.trace`'s, and then `tracestate` is left out with it;
/// - `X-Request-Id` is `fwd.told`'s when there is one, else the
///   request's; the told identity's fields come last.
///
/// Returns whether a `Host` was put (if not, the caller names the
/// instance).
///
/// The fields are filtered as they are written rather than removed from
/// the map and inserted first: each removal or insertion is a hashed
/// operation on the map, and this runs for every proxied request.
pub(crate) fn forward_fields(
    parts: &Parts,
    fwd: &Forwarding,
    mut put: impl FnMut(&[u8], &[u8]),
) -> bool {
    let headers = &parts.headers;
    // A request's names are compared by their filter bits (`name_bit`)
    // first, the few that share one with a name looked for by their
    // bytes: `HeaderName`'s own comparison with each of a dozen names,
    // for every field, cost ~100 instructions per request.
    const SEEN: u64 = name_bits(&[
        "connection",
        "host",
        "x-forwarded-for",
        "traceparent",
        "tracestate",
        "cookie",
    ]);
    // Left out besides the hop-by-hop ones (`is_hop_by_hop` settles most
    // names by length and first byte itself).
    const LEFT_OUT: u64 = name_bits(&[
        "expect",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "traceparent",
        "tracestate",
        "x-request-id",
    ]);
    // One pass to learn what the second needs.
    let (mut connection, mut chain) = (false, false);
    let mut host: Option<&[u8]> = None;
    // The trace fields: how many `traceparent`s, the first, a `tracestate`.
    let (mut parents, mut parent, mut state) = (0, None, false);
    let mut cookies = 0;
    for (name, value) in headers {
        let raw = name.as_str().as_bytes();
        if name_bit(raw) & SEEN == 0 {
            continue;
        }
        // A `HeaderName` is lower case: plain comparisons.
        match raw {
            b"connection" => connection = true,
            b"host" => {
                host.get_or_insert(value.as_bytes());
            }
            b"x-forwarded-for" => chain = true,
            b"traceparent" => {
                parents += 1;
                parent.get_or_insert(value.as_bytes());
            }
            b"tracestate" => state = true,
            b"cookie" => cookies += 1,
            _ => {}
        }
    }
    // An HTTP/2 client sends each cookie as a field of its own; before an
    // HTTP/1.1 hop they MUST be one, joined with "; " (RFC 9113 §8.2.3):
    // servers that read one `Cookie` line would see only the first cookie.
    let mut joined_cookies = (cookies > 1).then(|| {
        let mut joined = Vec::with_capacity(256);
        for value in headers.get_all(header::COOKIE) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(value.as_bytes());
        }
        joined
    });
    // A request whose target names its host (absolute form, or HTTP/2's
    // `:authority`) is for that host, whatever a `Host` beside it says: it
    // was routed by the target's (`edge::request_host`), and a proxy sends
    // the target's on rather than the field (RFC 9112 §3.2.2). Forwarded,
    // a `Host` that differs would tell the instance of a host other than
    // the one the request was routed and authorised for.
    let authority = parts.uri.authority();
    let replace_host = authority.is_some() && host.is_some();
    let keep_trace = parents == 1 && parent.is_some_and(crate::trace::is_valid);
    let started = fwd.trace.filter(|_| !keep_trace);
    // Only compared in the second pass when there is something to leave out.
    let drop_trace = started.is_some() && (parents > 0 || state);
    let named_by_connection = |name: &[u8]| {
        connection
            && list_elements(
                headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .map(|v| v.as_bytes()),
            )
            .any(|token| token.eq_ignore_ascii_case(name))
    };
    for (name, value) in headers {
        let raw = name.as_str().as_bytes();
        let left_out = is_hop_by_hop(raw)
            || (name_bit(raw) & LEFT_OUT != 0
                && match raw {
                    b"expect" | b"content-length" | b"x-forwarded-for" | b"x-forwarded-proto"
                    | b"x-forwarded-host" => true,
                    b"forwarded" => fwd.trusted_proxy != Some(ForwardedHeader::Forwarded),
                    b"traceparent" | b"tracestate" => drop_trace,
                    b"x-request-id" => fwd.told.request_id.is_some(),
                    _ => false,
                })
            // Not the fields the first pass settled on and the gateway
            // relies on reaching the instance: `Connection: host` would
            // send a request with no `Host` (and none put back), and
            // naming `traceparent` or `x-request-id` one with neither the
            // client's nor the gateway's. RFC 9110 §7.6.1 forbids a sender
            // to name a field meant for every recipient; kept, as nginx
            // (which removes nothing `Connection` names) keeps them.
            || (named_by_connection(raw)
                && !matches!(
                    raw,
                    b"host" | b"traceparent" | b"tracestate" | b"x-request-id"
                ))
            || (replace_host && raw == b"host");
        if left_out {
            continue;
        }
        if cookies > 1 && raw == b"cookie" {
            // Where the first was, once.
            if let Some(joined) = joined_cookies.take() {
                put(raw, &joined);
            }
            continue;
        }
        put(raw, value.as_bytes());
    }
    if let Some(authority) = authority {
        // An authority's characters are all valid in a field value.
        host = Some(authority.as_str().as_bytes());
        put(b"host", authority.as_str().as_bytes());
    }
    // Looked up only for a trusted proxy: not a comparison per field of
    // every request.
    let forwarded_host = fwd
        .trusted_proxy
        .and_then(|header| trusted_forwarded_host(headers, header));
    if let Some(host) = forwarded_host.or(host) {
        put(X_FORWARDED_HOST.as_str().as_bytes(), host);
    }
    if fwd.trusted_proxy == Some(ForwardedHeader::XForwardedFor) && chain {
        // Several `X-Forwarded-For` lines are one list (RFC 9110 §5.3).
        let mut hops: Vec<u8> = Vec::with_capacity(64);
        for hop in list_elements(
            headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .map(|v| v.as_bytes()),
        ) {
            hops.extend_from_slice(hop);
            hops.extend_from_slice(b", ");
        }
        hops.extend_from_slice(address_value(fwd.peer).as_bytes());
        put(X_FORWARDED_FOR.as_str().as_bytes(), &hops);
    } else {
        put(
            X_FORWARDED_FOR.as_str().as_bytes(),
            address_value(fwd.peer).as_bytes(),
        );
    }
    put(X_FORWARDED_PROTO.as_str().as_bytes(), fwd.proto.as_bytes());
    if let Some(started) = &started {
        put(
            crate::trace::TRACEPARENT.as_str().as_bytes(),
            &started.text(),
        );
    }
    if let Some(id) = &fwd.told.request_id {
        put(
            crate::request_id::X_REQUEST_ID.as_str().as_bytes(),
            id.as_bytes(),
        );
    }
    if let Some(identity) = &fwd.told.identity {
        for (name, value) in &identity.headers {
            put(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    host.is_some()
}

/// The right-most element of the `X-Forwarded-Host` a trusted proxy sent
/// (or the `host=` of its `Forwarded`, for one that writes `header`
/// `Forwarded`): the name its own client asked for. Out of line: most
/// requests come from no trusted proxy, and their forwarding pass should
/// not carry it.
#[cold]
#[inline(never)]
pub(crate) fn trusted_forwarded_host(
    headers: &http::HeaderMap,
    header: ForwardedHeader,
) -> Option<&[u8]> {
    if header == ForwardedHeader::Forwarded {
        return crate::ip::forwarded_host(headers);
    }
    let last = headers.get_all(&X_FORWARDED_HOST).iter().next_back()?;
    let host = last.as_bytes().rsplit(|&b| b == b',').next()?.trim_ascii();
    (!host.is_empty()).then_some(host)
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
            let value = HeaderValue::from_str(&crate::ip::text(ip))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
            *last = Some((ip, value.clone()));
            value
        }
    })
}

/// The most fields a map may hold for [`has_field`] to scan it.
const SCANNED: usize = 8;

/// Whether `map` holds a field named `name`: `map.contains_key(name)`, but
/// a map of a few fields is scanned.
///
/// A hashed lookup that misses costs ~150 instructions (the name hashed,
/// then the table probed: `instructions.sh`), and a request's id is looked
/// for in every request, which most clients send with a handful of fields
/// and no id. A scan of the map's names compares each with a word or two
/// (a standard name is a byte, and never equal to a custom one).
pub(crate) fn has_field(map: &http::HeaderMap, name: &HeaderName) -> bool {
    if map.len() <= SCANNED {
        map.keys().any(|n| n == name)
    } else {
        map.contains_key(name)
    }
}

/// Request header maps emptied and kept for the thread's next requests:
/// at most this many, each of at most [`KEPT_MAP_CAPACITY`] fields (a
/// map grown by a request with many fields is let go).
const KEPT_MAPS: usize = 32;
const KEPT_MAP_CAPACITY: usize = 96;

thread_local! {
    static KEPT: RefCell<Vec<http::HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `capacity` fields: one a finished
/// request left on this thread ([`recycle`]) when there is one.
///
/// A request's map is two allocations (its index table and its entries),
/// made, zeroed and freed for every request: ~450 instructions of a
/// proxied request's ~22 k (`instructions.sh`), where taking an emptied one
/// back costs a few dozen. hyper's HTTP/1 server keeps a connection's last
/// map the same way. Each worker thread runs its own requests, so the maps
/// stay with the thread that made them.
pub(crate) fn map_with_capacity(capacity: usize) -> http::HeaderMap {
    let kept = KEPT.try_with(|kept| kept.borrow_mut().pop()).ok().flatten();
    match kept {
        Some(mut map) => {
            // Never fails below the map's size limit, which a head's
            // limits keep requests far under.
            let _ = map.try_reserve(capacity);
            map
        }
        None => http::HeaderMap::with_capacity(capacity),
    }
}

/// Keeps `map`, emptied, for a later request on this thread
/// ([`map_with_capacity`]), unless enough are kept or it grew large.
pub(crate) fn recycle(mut map: http::HeaderMap) {
    if map.capacity() == 0 || map.capacity() > KEPT_MAP_CAPACITY {
        return;
    }
    // Its values share the request head's bytes: cleared now, so the head
    // is not kept alive with the map.
    map.clear();
    let _ = KEPT.try_with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() < KEPT_MAPS {
            kept.push(map);
        }
    });
}

/// `bytes` as a header value, checked as `HeaderValue::from_maybe_shared`
/// checks it, but eight bytes at a time.
///
/// `http` checks a value a byte at a time (~4 instructions a byte); every
/// field of every head goes through here, a bearer token alone is hundreds
/// of bytes, and callgrind counted that check at 2–3 % of the gateway's
/// instructions per request. The common case, nothing but space and
/// visible ASCII, is recognised here a word at a time; anything else (a
/// tab, obs-text, a control byte) takes `http`'s own check, so what is
/// accepted and refused is exactly `http`'s.
pub(crate) fn value(bytes: bytes::Bytes) -> Result<HeaderValue, header::InvalidHeaderValue> {
    if is_space_or_visible_ascii(&bytes) {
        // SAFETY: every byte is in 0x20..=0x7E. That is ASCII, so valid
        // UTF-8 (the function's documented contract), and inside the set
        // `HeaderValue` itself accepts (visible ASCII, space, tab and
        // 0x80..=0xFF): the value upholds every invariant its checked
        // constructor would have.
        Ok(unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) })
    } else {
        HeaderValue::from_maybe_shared(bytes)
    }
}

/// A value the gateway wrote itself, from visible ASCII only (digits,
/// hex, quotes, punctuation): not checked again in release builds, where
/// [`value`]'s check of a generated request id or `RateLimit` field cost
/// more than making it. Tests (debug builds) still check every one.
pub(crate) fn own_value(bytes: bytes::Bytes) -> HeaderValue {
    debug_assert!(
        is_space_or_visible_ascii(&bytes),
        "own_value given {bytes:?}"
    );
    // SAFETY: the callers write only bytes in 0x20..=0x7E (checked above in
    // debug builds): ASCII, so valid UTF-8 (the function's documented
    // contract), and inside what `HeaderValue` accepts.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// Whether `HeaderValue` accepts `bytes` as a value: checked a word at a
/// time for the common case, as [`value`] is, and by `http` itself when a
/// byte is outside space and visible ASCII.
pub(crate) fn is_valid_value(bytes: &[u8]) -> bool {
    is_space_or_visible_ascii(bytes) || HeaderValue::from_bytes(bytes).is_ok()
}

/// What each byte is to a host name (RFC 3986 §3.2.2's `reg-name`:
/// unreserved, sub-delims, `%` of an escape), for [`is_valid_host`]'s one
/// pass: [`NAME`] for a byte of a name; `%` and `:` (the port's start)
/// stand for themselves; 0 is none. `,` is not a host name's: a `Host` goes
/// on as `X-Forwarded-Host`, a list, where `a,b` would be two hosts, the
/// first or the last taken depending on the reader. IPv4 addresses are
/// host names' bytes.
static HOST_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let names = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+;=";
    let mut i = 0;
    while i < names.len() {
        table[names[i] as usize] = NAME;
        i += 1;
    }
    table[b'%' as usize] = b'%';
    table[b':' as usize] = b':';
    table
};
const NAME: u8 = 1;

/// Whether `value` names a host as a `Host` field or an authority may
/// (RFC 9110 §7.2, RFC 3986 §3.2.2–3): a host name (a `reg-name`, without
/// `,`: see [`HOST_BYTE`]; `%` only in an escape), an IPv4 address, or
/// an IPv6 address in brackets, then optionally `:` and a port (digits,
/// up to 65535). Empty is valid: RFC 9112 §3.2 has a client send an empty
/// `Host` for a target without an authority. Refused are what a reader
/// might take apart otherwise: userinfo (`@`), a path or query (`/`,
/// `?`), spaces, a list (`,`).
///
/// It runs for every request: one pass, a table lookup a byte, for a name
/// (a name has no `:`, so the first one starts the port). Three passes
/// (the last `:`, the name, the port) cost 300 instructions for
/// `127.0.0.1:8080`, as many as the rest of reading the head's fields.
pub(crate) fn is_valid_host(value: &[u8]) -> bool {
    if let Some(literal) = value.strip_prefix(b"[") {
        let Some(close) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let (address, rest) = literal.split_at(close);
        let is_v6 =
            std::str::from_utf8(address).is_ok_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        return is_v6
            && match rest.get(1..).unwrap_or_default() {
                [] => true,
                [b':', port @ ..] => is_port(port),
                _ => false,
            };
    }
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        match HOST_BYTE[usize::from(b)] {
            NAME => i += 1,
            b'%' => {
                let hex = |at: usize| value.get(at).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
            }
            b':' => return is_port(value.get(i + 1..).unwrap_or_default()),
            _ => return false,
        }
    }
    true
}

/// A port: digits (none is allowed, RFC 3986 §3.2.3), at most 65535.
fn is_port(port: &[u8]) -> bool {
    if port.len() > 5 {
        return false;
    }
    let mut n = 0u32;
    for &d in port {
        if !d.is_ascii_digit() {
            return false;
        }
        n = n * 10 + u32::from(d - b'0');
    }
    n <= u32::from(u16::MAX)
}

/// Whether `bytes` holds `byte`, a word at a time: for short values read
/// on every request (a `Host`), where `<[u8]>::contains` (a call into
/// `memchr`) cost ~90 instructions for a dozen bytes.
pub(crate) fn has_byte(bytes: &[u8], byte: u8) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let pattern = u64::from_ne_bytes([byte; 8]);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        // A byte equal to `byte` is a zero byte of `x`: "has a zero byte",
        // exact as a yes or no.
        let x = u64::from_ne_bytes(w) ^ pattern;
        if x.wrapping_sub(ONES) & !x & HIGH != 0 {
            return true;
        }
    }
    // Not `contains`: that is the call into `memchr` this avoids.
    words
        .remainder()
        .iter()
        .fold(false, |found, &b| found | (b == byte))
}

/// Whether every byte is in 0x20..=0x7E.
fn is_space_or_visible_ascii(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const SPACES: u64 = u64::from_ne_bytes([0x20; 8]);
    const DELS: u64 = u64::from_ne_bytes([0x7f; 8]);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut w = [0; 8];
        w.copy_from_slice(word);
        let x = u64::from_ne_bytes(w);
        // A byte's high bit set in `x` (not ASCII), in the second term (a
        // byte below 0x20) or in the third (a byte equal to 0x7F). The
        // second and third are the classic "has a byte less than n" and
        // "has a zero byte" tests: exact in whether any byte matches,
        // which is all that is asked.
        let below_space = x.wrapping_sub(SPACES) & !x;
        let y = x ^ DELS;
        let del = y.wrapping_sub(ONES) & !y;
        if (x | below_space | del) & HIGH != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|b| (0x20..0x7f).contains(b))
}

/// The value of the cookie `name` among the request's `Cookie` fields
/// (HTTP/2 clients may send one field per cookie), without the quotes
/// RFC 6265 allows around it. Empty values count as none.
pub(crate) fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a [u8]> {
    cookies(headers, name).next()
}

/// The one value of the cookie `name`, as [`cookie`] finds it; `Err` when
/// the request carries two different ones. A browser sends every cookie
/// of that name it holds: its site's own, and one a sibling host set for
/// the parent domain (`Domain=shop.example`, "cookie tossing"), longer
/// paths first. Which is the site's cannot be told, so neither is taken:
/// the first would be the planted one, and a client signed in as the
/// planter.
pub(crate) fn cookie_once<'a>(
    headers: &'a http::HeaderMap,
    name: &str,
) -> Result<Option<&'a [u8]>, ()> {
    let mut values = cookies(headers, name);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.any(|other| other != first) {
        return Err(());
    }
    Ok(Some(first))
}

/// Every non-empty value of the cookie `name`, in the order sent.
fn cookies<'a, 'n>(
    headers: &'a http::HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'a [u8]> + use<'a, 'n> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(move |field| {
            field
                .as_bytes()
                .split(|b| *b == b';')
                .filter_map(move |pair| {
                    let pair = pair.trim_ascii();
                    let eq = pair.iter().position(|b| *b == b'=')?;
                    let (n, v) = (&pair[..eq], &pair[eq + 1..]);
                    if n.trim_ascii() != name.as_bytes() {
                        return None;
                    }
                    let v = v.trim_ascii();
                    let v = v
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                        .unwrap_or(v);
                    (!v.is_empty()).then_some(v)
                })
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn hosts_are_names_or_addresses_with_an_optional_port() {
        for good in [
            "shop.example",
            "shop.example:8080",
            "SHOP.example.:1",
            "localhost",
            "192.0.2.1",
            "192.0.2.1:443",
            "[::1]",
            "[2001:db8::1]:8443",
            "[::ffff:192.0.2.1]",
            "my_host-1~x",
            "caf%C3%A9.example",
            "a!$&'()*+;=b",
            "shop.example:",
            "shop.example:65535",
            "",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good:?}");
        }
        for bad in [
            "a/b?c",
            "good, evil",
            "good,evil",
            "user@shop.example",
            "shop.example/",
            "shop.example?x",
            "shop.example#x",
            "shop example",
            "shop.example:80:80",
            "shop.example:x",
            "shop.example:65536",
            "shop.example:000080",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[not-an-address]",
            "[192.0.2.1]",
            "[::1%25eth0]",
            "%",
            "a%4",
            "a%zz",
            "shop\\.example",
            "\"shop\"",
            "shop.example\t",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_valid_host(b"caf\xc3\xa9.example"));
    }

    #[test]
    fn cookies_are_found_by_exact_name_in_any_field() {
        let headers = |fields: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let h = headers(&[
            ("cookie", "theme=dark; sticky=abc"),
            ("cookie", "Sticky=other"),
        ]);
        assert_eq!(cookie(&h, "sticky"), Some(&b"abc"[..]));
        assert_eq!(cookie(&h, "Sticky"), Some(&b"other"[..]));
        assert_eq!(cookie(&h, "stick"), None);
        let h = headers(&[("cookie", "a=1;sticky=\"q\" ; b=2")]);
        assert_eq!(cookie(&h, "sticky"), Some(&b"q"[..]));
        // A value that is empty, or no value at all, is no key.
        let h = headers(&[("cookie", "sticky=; sticky")]);
        assert_eq!(cookie(&h, "sticky"), None);
    }

    #[test]
    fn has_byte_finds_a_byte_anywhere() {
        // Neighbours of `@` (0x3f, 0x41), and it with the high bit set, are
        // not it: in a whole word and in the bytes after the words.
        let near = [0x3f, 0x41, 0xc0, 0x3f, 0x41, 0xc0, 0x3f, 0x41, 0xc0, 0x3f];
        for len in 0..=near.len() {
            assert!(!has_byte(&near[..len], b'@'), "{len}");
        }
        for len in 0..40 {
            let clean: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(!has_byte(&clean, b'@'), "{len}");
            for at in 0..len {
                let mut with = clean.clone();
                with[at] = b'@';
                assert!(has_byte(&with, b'@'), "{len} {at}");
            }
        }
    }

    /// `name_is` says what `eq_ignore_ascii_case` says for every field
    /// name httparse accepts: every token byte, at every place of a word
    /// and of the rest after the words, against the names the gateway
    /// looks for.
    #[test]
    fn names_compare_as_eq_ignore_ascii_case_does() {
        let tokens: Vec<u8> = (0..=255u8)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        let wanted = [
            "connection",
            "content-length",
            "transfer-encoding",
            "te",
            "date",
            "proxy-",
            "x-request-id",
            "accept-encoding",
        ];
        for lower in wanted {
            let lower = lower.as_bytes();
            assert!(name_is(lower, lower));
            assert!(name_is(&lower.to_ascii_uppercase(), lower));
            for at in 0..lower.len() {
                for &b in &tokens {
                    let mut name = lower.to_vec();
                    name[at] = b;
                    assert_eq!(
                        name_is(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{:?} against {:?}",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(lower)
                    );
                }
            }
            assert!(!name_is(&lower[1..], lower));
            assert!(!name_is(&[lower, b"x"].concat(), lower));
        }
        // Every hop-by-hop name, in any case, `Proxy-*` of every length
        // (the fixed set's lengths too), and nothing close to one.
        let hop_by_hop = [
            "Connection",
            "KEEP-ALIVE",
            "te",
            "Trailer",
            "Transfer-Encoding",
            "upgrade",
            "Proxy-Authorization",
            "proxy-x",
            "Proxy-Auth",
            "proxy-abcdefghijk",
            "PROXY-",
        ];
        let end_to_end = [
            "content-length",
            "proxy",
            "proxyx-",
            "tf",
            "connectiom",
            "date",
        ];
        for (names, is) in [(&hop_by_hop[..], true), (&end_to_end[..], false)] {
            for name in names {
                assert_eq!(is_hop_by_hop(name.as_bytes()), is, "{name}");
            }
        }
    }

    #[test]
    fn values_are_checked_as_http_checks_them() {
        for b in 0..=255u8 {
            for at in [0usize, 7, 8, 31, 40] {
                let mut v = vec![b'a'; 41];
                v[at] = b;
                let ours = value(bytes::Bytes::from(v.clone())).ok();
                let theirs = HeaderValue::from_bytes(&v).ok();
                assert_eq!(ours, theirs, "byte {b:#x} at {at}");
            }
        }
        assert_eq!(
            value(bytes::Bytes::new()).ok(),
            Some(HeaderValue::from_static(""))
        );
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// `pairs` as `httparse` gives a head's fields.
    pub(crate) fn raw(pairs: &[(&'static str, &'static str)]) -> Vec<httparse::Header<'static>> {
        pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_names_in_any_case() {
        for name in [
            "Connection",
            "KEEP-ALIVE",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-",
            "proxy-authorization",
        ] {
            assert!(is_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in [
            "proxy",
            "ted",
            "upgrades",
            "connections",
            "content-length",
            "x-te",
        ] {
            assert!(!is_hop_by_hop(name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn connection_named_fields_go_as_the_request_arrives_and_options_stay() {
        let map = |fields: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in fields {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let mut h = map(&[
            ("connection", "Keep-Alive, X-Secret"),
            ("connection", "host, Upgrade,,close"),
            ("host", "a.example"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x-secret", "2"),
            ("x-kept", "1"),
        ]);
        take_connection_named(&mut h);
        assert!(!h.contains_key("x-secret"));
        assert_eq!(h["host"], "a.example", "a field meant for every hop stays");
        assert_eq!(h["x-kept"], "1");
        assert_eq!(
            h["upgrade"], "websocket",
            "hop-by-hop: dropped at forwarding"
        );
        // Only the options are left to name, so a field the gateway adds
        // after (`x-secret`, say) is not taken off with them.
        let options: Vec<_> = h.get_all("connection").iter().collect();
        assert_eq!(options, ["Keep-Alive, Upgrade, close"]);

        // Nothing named: nothing changes.
        let mut h = map(&[("connection", "keep-alive"), ("x-a", "1")]);
        let before = h.clone();
        take_connection_named(&mut h);
        assert_eq!(h, before);
        // Only fields named: no `Connection` left.
        let mut h = map(&[("connection", "x-a"), ("x-a", "1")]);
        take_connection_named(&mut h);
        assert!(h.is_empty(), "{h:?}");
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

        // The same fields in a client's request, on their way upstream.
        let (f, _) = forwarded(
            &[
                ("connection", "keep-alive, x-secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic abc"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("x-secret", "1"),
                ("content-type", "text/plain"),
                // `Proxy-*` of the fixed set's lengths (7, 10 and 17).
                ("proxy-a", "1"),
                ("proxy-auth", "2"),
                ("proxy-abcdefghijk", "3"),
                // From an untrusted peer.
                ("forwarded", "for=192.0.2.1"),
            ],
            "/",
            [10, 0, 0, 1],
            false,
            "http",
        );
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-forwarded-for", "x-forwarded-proto"]
        );
    }

    /// The fields `forward_fields` writes for a request to `uri` with
    /// `pairs`, forwarded as `fwd` says, and whether it wrote a `Host`.
    fn written(
        pairs: &[(&'static str, &'static str)],
        uri: &str,
        fwd: &Forwarding,
    ) -> (Vec<(String, String)>, bool) {
        let (mut parts, ()) = http::Request::get(uri)
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts.headers = map(pairs);
        let mut out = Vec::new();
        let host = forward_fields(&parts, fwd, |name, value| {
            out.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        });
        (out, host)
    }

    /// The fields `forward_fields` writes for a request with `pairs`, and
    /// whether it wrote a `Host`.
    fn forwarded(
        pairs: &[(&'static str, &'static str)],
        uri: &str,
        peer: [u8; 4],
        trust_chain: bool,
        proto: &'static str,
    ) -> (Vec<(String, String)>, bool) {
        let fwd = Forwarding {
            peer: IpAddr::from(peer),
            trusted_proxy: trust_chain.then_some(ForwardedHeader::XForwardedFor),
            proto,
            trace: None,
            told: Told::default(),
        };
        written(pairs, uri, &fwd)
    }

    /// The fields written for a GET of `/` from an untrusted 10.0.0.1,
    /// with `trace` and `request_id` to send.
    fn sent(
        pairs: &[(&'static str, &'static str)],
        trace: Option<crate::trace::Started>,
        request_id: Option<&'static str>,
    ) -> Vec<(String, String)> {
        let fwd = Forwarding {
            peer: IpAddr::from([10, 0, 0, 1]),
            trusted_proxy: None,
            proto: "http",
            trace,
            told: Told {
                request_id: request_id.map(HeaderValue::from_static),
                identity: None,
            },
        };
        written(pairs, "/", &fwd).0
    }

    /// The value of the one field `name` among `fields`.
    fn one<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        let mut found = fields.iter().filter(|(n, _)| n == name);
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{name} written twice: {fields:?}");
        first
    }

    #[test]
    fn forwarded_headers_append_client_and_keep_host() {
        let (f, host) = forwarded(
            &[
                ("host", "shop.example:8080"),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "198.51.100.1"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "shop.example, cdn.example"),
                ("expect", "100-continue"),
                ("content-length", "5"),
                ("forwarded", "for=203.0.113.7"),
                ("accept", "*/*"),
            ],
            "/",
            [127, 0, 0, 1],
            true,
            "http",
        );
        assert!(host);
        assert_eq!(
            one(&f, "x-forwarded-for"),
            Some("203.0.113.7, 198.51.100.1, 127.0.0.1")
        );
        assert_eq!(one(&f, "x-forwarded-proto"), Some("http"));
        assert_eq!(one(&f, "host"), Some("shop.example:8080"));
        // The name the trusted proxy's own client asked for: its right-most.
        assert_eq!(one(&f, "x-forwarded-host"), Some("cdn.example"));
        // `Forwarded` is not what this proxy writes: its client's own.
        assert_eq!(one(&f, "forwarded"), None);
        assert_eq!(one(&f, "accept"), Some("*/*"));
        assert_eq!(one(&f, "expect"), None);
        assert_eq!(one(&f, "content-length"), None);
    }

    #[test]
    fn a_proxy_that_writes_forwarded_has_it_passed_on_and_its_host_read() {
        let fwd = Forwarding {
            peer: IpAddr::from([127, 0, 0, 1]),
            trusted_proxy: Some(ForwardedHeader::Forwarded),
            proto: "https",
            trace: None,
            told: Told::default(),
        };
        let (f, host) = written(
            &[
                ("host", "shop.example:8080"),
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-host", "evil.example"),
                (
                    "forwarded",
                    "for=198.51.100.1;host=\"cdn.example\";proto=https",
                ),
            ],
            "/",
            &fwd,
        );
        assert!(host);
        // The client's `X-Forwarded-For` is not a chain this proxy wrote.
        assert_eq!(one(&f, "x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(one(&f, "x-forwarded-host"), Some("cdn.example"));
        assert_eq!(one(&f, "x-forwarded-proto"), Some("https"));
        assert_eq!(
            one(&f, "forwarded"),
            Some("for=198.51.100.1;host=\"cdn.example\";proto=https")
        );
    }

    /// A scanned map and a hashed one say what `contains_key` says.
    #[test]
    fn has_field_is_contains_key_whether_scanned_or_hashed() {
        let names = [
            "host",
            "authorization",
            "x-request-id",
            "x-request-ie",
            "accept",
            "x-other",
            "cookie",
        ];
        for fields in [0usize, 1, 3, 8, 9, 20] {
            let mut map = http::HeaderMap::new();
            for i in 0..fields {
                let name = names[(i * 5) % (names.len() - 1)];
                map.append(HeaderName::from_static(name), HeaderValue::from_static("v"));
            }
            for name in names {
                let name = HeaderName::from_static(name);
                assert_eq!(
                    has_field(&map, &name),
                    map.contains_key(&name),
                    "{name} in a map of {fields}"
                );
            }
        }
    }

    #[test]
    fn known_names_are_the_names_http_makes_of_them() {
        let known = [
            "host",
            "accept",
            "cookie",
            "origin",
            "referer",
            "user-agent",
            "connection",
            "content-type",
            "authorization",
            "cache-control",
            "if-none-match",
            "content-length",
            "accept-encoding",
            "accept-language",
        ];
        for lower in known {
            for raw in [
                lower.to_string(),
                lower.to_ascii_uppercase(),
                // Every other byte upper case.
                lower
                    .char_indices()
                    .map(|(i, c)| {
                        if i % 2 == 0 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect(),
            ] {
                let made = HeaderName::from_bytes(raw.as_bytes()).ok();
                assert_eq!(known_name(raw.as_bytes()), made, "{raw}");
            }
        }
        // Other names, some of the same lengths, are left to `from_bytes`.
        for other in [
            "hosts",
            "x-id",
            "accepts",
            "content-types",
            "authorizatio",
            "x-forwarded-for",
        ] {
            assert_eq!(known_name(other.as_bytes()), None, "{other}");
        }
        // A byte off in any place is another name.
        for lower in known {
            for at in 0..lower.len() {
                let mut raw = lower.as_bytes().to_vec();
                raw[at] = if raw[at] == b'x' { b'y' } else { b'x' };
                assert_eq!(known_name(&raw), None, "{}", String::from_utf8_lossy(&raw));
            }
        }
    }

    #[test]
    fn a_recycled_map_comes_back_empty_and_lets_its_bytes_go() {
        // On a thread of its own: the pool is the thread's.
        let outcome = std::thread::spawn(|| {
            let head = bytes::Bytes::from(b"x-a: 1".to_vec());
            let mut map = map_with_capacity(4);
            map.append("x-a", own_value(head.slice(5..)));
            map.append("x-b", HeaderValue::from_static("2"));
            let table = map.capacity();
            recycle(map);
            // The value's share of the head is gone: the head is ours alone.
            let head_freed = head.is_unique();
            let again = map_with_capacity(2);
            let fresh = map_with_capacity(2);
            // A map grown past what is kept is let go.
            let mut big = map_with_capacity(1);
            for n in 0..200 {
                big.append(
                    HeaderName::from_bytes(format!("x-{n}").as_bytes()).unwrap_or(header::ACCEPT),
                    HeaderValue::from_static("v"),
                );
            }
            recycle(big);
            let after_big = map_with_capacity(2).capacity();
            (
                head_freed,
                again.is_empty(),
                again.capacity() == table,
                fresh.capacity(),
                after_big,
            )
        })
        .join();
        let Ok((head_freed, empty, same_table, fresh, after_big)) = outcome else {
            panic!("the thread panicked");
        };
        assert!(head_freed, "the kept map still held the head's bytes");
        assert!(empty, "a kept map came back with fields");
        assert!(same_table, "the kept map was not the one given back");
        assert!(fresh >= 2, "a new map without room");
        assert!(
            after_big <= KEPT_MAP_CAPACITY,
            "a grown map was kept: {after_big}"
        );
    }

    #[test]
    fn a_made_request_id_is_sent_in_place_of_the_fields_one() {
        // The fields' own (a client's id, kept).
        let sent = |pairs: &[(&'static str, &'static str)], id| sent(pairs, None, id);
        let f = sent(&[("x-request-id", "client-1"), ("accept", "*/*")], None);
        assert_eq!(one(&f, "x-request-id"), Some("client-1"));
        // One the gateway made, written once, whatever the fields hold.
        let f = sent(&[("accept", "*/*")], Some("made-1"));
        assert_eq!(one(&f, "x-request-id"), Some("made-1"));
        let f = sent(&[("x-request-id", "client-2")], Some("made-2"));
        assert_eq!(one(&f, "x-request-id"), Some("made-2"));
        assert_eq!(one(&f, "accept"), None);
    }

    #[test]
    fn a_told_identity_s_fields_come_after_the_request_s() {
        let fwd = Forwarding {
            peer: IpAddr::from([10, 0, 0, 1]),
            trusted_proxy: None,
            proto: "http",
            trace: None,
            told: Told {
                request_id: None,
                identity: Some(Arc::new(Identity::consumer("partner"))),
            },
        };
        let (f, _) = written(&[("accept", "*/*")], "/", &fwd);
        assert_eq!(one(&f, "x-flotilla-user-id"), Some("partner"));
        assert_eq!(
            f.last().map(|(n, _)| n.as_str()),
            Some("x-flotilla-user-id")
        );
        assert_eq!(one(&f, "accept"), Some("*/*"));
    }

    #[test]
    fn a_good_traceparent_is_kept_and_anything_else_replaced_without_its_state() {
        let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let started = crate::trace::Started::new();
        let started_text = String::from_utf8_lossy(&started.text()).into_owned();
        let sent = |pairs: &[(&'static str, &'static str)]| sent(pairs, Some(started), None);
        let f = sent(&[("traceparent", given), ("tracestate", "congo=t61rcWkgMzE")]);
        assert_eq!(one(&f, "traceparent"), Some(given));
        assert_eq!(one(&f, "tracestate"), Some("congo=t61rcWkgMzE"));
        for pairs in [
            &[][..],
            &[("tracestate", "congo=t61rcWkgMzE")][..],
            &[
                ("traceparent", "00-nonsense"),
                ("tracestate", "congo=t61rcWkgMzE"),
            ][..],
            &[("traceparent", given), ("traceparent", given)][..],
        ] {
            let f = sent(pairs);
            assert_eq!(
                one(&f, "traceparent"),
                Some(started_text.as_str()),
                "{pairs:?}"
            );
            assert_eq!(one(&f, "tracestate"), None, "{pairs:?}");
        }
    }

    #[test]
    fn an_untrusted_peer_cannot_forge_the_chain() {
        let (f, _) = forwarded(
            &[
                ("host", "shop.example"),
                ("x-forwarded-for", "6.6.6.6"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-proto", "https"),
            ],
            "/",
            [203, 0, 113, 9],
            false,
            "http",
        );
        assert_eq!(one(&f, "x-forwarded-for"), Some("203.0.113.9"));
        assert_eq!(one(&f, "forwarded"), None);
        assert_eq!(one(&f, "x-forwarded-host"), Some("shop.example"));
        assert_eq!(one(&f, "x-forwarded-proto"), Some("http"));
    }

    #[test]
    fn each_request_gets_its_own_peer_in_x_forwarded_for() {
        for ip in [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 2], [10, 0, 0, 1]] {
            let (f, host) = forwarded(&[("connection", "close")], "/", ip, false, "https");
            assert_eq!(
                one(&f, "x-forwarded-for"),
                Some(IpAddr::from(ip).to_string().as_str())
            );
            assert_eq!(one(&f, "x-forwarded-proto"), Some("https"));
            assert_eq!(one(&f, "connection"), None);
            // No `Host` and no authority: the caller names the instance.
            assert!(!host);
            assert_eq!(one(&f, "x-forwarded-host"), None);
        }
        assert_eq!(
            address_value(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])),
            "2001:db8::1"
        );
    }

    #[test]
    fn headers_named_by_connection_go_only_with_it() {
        // Without a `Connection` header, nothing it could name is removed.
        let fields = raw(&[("x-secret", "1"), ("host", "a")]);
        let doomed = hop_by_hop(&fields);
        assert!(fields.iter().all(|f| !doomed(f.name.as_bytes())));
        let (f, _) = forwarded(
            &[("x-secret", "1"), ("host", "a")],
            "/",
            [10, 0, 0, 1],
            false,
            "http",
        );
        assert_eq!(one(&f, "x-secret"), Some("1"));
        // With one, on the way to an instance too.
        let (f, _) = forwarded(
            &[
                ("x-secret", "1"),
                ("connection", "keep-alive, X-Secret"),
                ("x-kept", "2"),
            ],
            "/",
            [10, 0, 0, 1],
            false,
            "http",
        );
        assert_eq!(one(&f, "x-secret"), None);
        assert_eq!(one(&f, "connection"), None);
        assert_eq!(one(&f, "x-kept"), Some("2"));
    }

    #[test]
    fn an_http2_client_s_cookie_fields_go_on_as_one() {
        let (f, _) = forwarded(
            &[
                ("cookie", "a=1"),
                ("x-between", "v"),
                ("cookie", "b=2"),
                ("cookie", "c=3; d=4"),
            ],
            "http://shop.example/",
            [10, 0, 0, 1],
            false,
            "https",
        );
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(&names[..2], ["cookie", "x-between"], "{f:?}");
        assert_eq!(one(&f, "cookie"), Some("a=1; b=2; c=3; d=4"));
        let (f, _) = forwarded(&[("cookie", "a=1; b=2")], "/", [10, 0, 0, 1], false, "http");
        assert_eq!(one(&f, "cookie"), Some("a=1; b=2"));
    }

    #[test]
    fn connection_cannot_name_away_the_fields_the_gateway_relies_on() {
        let (f, host) = forwarded(
            &[
                ("host", "shop.example"),
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
                ("x-request-id", "client-1"),
                ("x-secret", "1"),
                ("connection", "host, traceparent, x-request-id, x-secret"),
            ],
            "/",
            [10, 0, 0, 1],
            false,
            "http",
        );
        assert!(host);
        assert_eq!(one(&f, "host"), Some("shop.example"));
        assert_eq!(
            one(&f, "traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(one(&f, "x-request-id"), Some("client-1"));
        assert_eq!(one(&f, "x-secret"), None);
    }

    #[test]
    fn http2_authority_becomes_host() {
        let (f, host) = forwarded(&[], "http://api.local/x", [10, 0, 0, 1], true, "http");
        assert!(host);
        assert_eq!(one(&f, "host"), Some("api.local"));
        assert_eq!(one(&f, "x-forwarded-host"), Some("api.local"));
        assert_eq!(one(&f, "x-forwarded-for"), Some("10.0.0.1"));
    }
}
