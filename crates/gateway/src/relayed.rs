//! A proxied response's end-to-end fields, kept as the instance wrote them
//! and written to the client as they are.
//!
//! Building an `http::HeaderMap` for a response the gateway only relays
//! cost more than a third of the gateway's work on the way out: a
//! `HeaderName` parsed and a hashed insert per field, a map allocated and
//! freed, and every field walked again to write it (`benches/gateway`,
//! `instructions.sh`). The instance's head is already in one buffer and
//! `httparse` has checked it, so the response travels as a [`Reply`]: the
//! response, whose map stays empty, and beside it a [`Relayed`]: that
//! buffer, where each field lies in it, and the fields the gateway sets on
//! the way out (request id, `server`, rate-limit and CORS fields) copied
//! into a second one. Beside, not in the response's extensions: the first
//! extension costs three allocations.
//!
//! The way out changes fields through [`Fields`], so that a field the
//! gateway sets replaces the instance's (a `RateLimit` or
//! `Access-Control-Allow-Origin` of its own never reaches the client). A
//! response the gateway made itself (a refusal, a preflight, a static
//! file) has no `Relayed`, and `Fields` changes its map. The HTTP/1 writer
//! writes the relayed fields, then the added ones, then the map's; hyper's
//! HTTP/2 server, which only knows the map, gets them all moved into it
//! first ([`Reply::into_response`]).
//!
//! Why relaying the bytes is safe: `httparse` refuses a field name that is
//! not a token and a value with a control character other than tab, which
//! is exactly what `HeaderName::from_bytes` and `HeaderValue::from_bytes`
//! refuse (a test checks every byte value), and the hop-by-hop fields are
//! left out before a `Relayed` is made (`outbound`).

use bytes::Bytes;
use http::Response;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::body::Body;
use crate::headers::name_bit;

/// Where a field's name and value lie in the head: `(start, end)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

impl Field {
    /// The field `name: value`, both slices of `head` (the head's first
    /// bytes: a span past them, which a caller that took its slices from
    /// the head never makes, reads as empty).
    pub(crate) fn within(head: &[u8], name: &[u8], value: &[u8]) -> Field {
        let base = head.as_ptr() as usize;
        let span = |part: &[u8]| -> (u32, u32) {
            let start = (part.as_ptr() as usize).wrapping_sub(base);
            let end = start
                .checked_add(part.len())
                .filter(|&end| end <= head.len());
            match (u32::try_from(start), end.map(u32::try_from)) {
                (Ok(start), Some(Ok(end))) => (start, end),
                _ => (0, 0),
            }
        };
        Field {
            name: span(name),
            value: span(value),
        }
    }
}

/// The end-to-end fields of a response from an instance, as it sent them,
/// and what the gateway set on the way out.
#[derive(Debug, Clone)]
pub(crate) struct Relayed {
    head: Bytes,
    fields: Vec<Field>,
    /// A field's [`name_bit`] is set here: most lookups and removals by
    /// name are settled by it without a scan.
    names: u64,
    /// Set by the gateway ([`Fields`]); written after the instance's.
    added: Added,
    /// The [`name_bit`]s of what was ever added (a removal leaves its bit).
    added_names: u64,
}

/// The fields the gateway set on a relayed response, as they go out:
/// `name: value` lines, one after another in one buffer, names lower case
/// (a `HeaderName`'s).
///
/// Not a list of `(HeaderName, HeaderValue)`: a handful of fields, each set
/// once, cost less copied into one buffer than cloned in and dropped one by
/// one (a value's drop is a call through its `Bytes`' vtable); a value the
/// gateway formats (the `RateLimit` field) is written here in place, not
/// allocated on its own (`Fields::insert_with`); and the HTTP/1 writer
/// copies the lines into the head at once ([`Relayed::added_lines`]), not a
/// field at a time (callgrind, `benches/gateway`).
///
/// A line is read back by its first `:` (a name is a token, which holds
/// none) and its `\r` (every value is checked as it is added: none holds
/// a CR or LF).
#[derive(Debug, Clone, Default)]
struct Added {
    lines: Vec<u8>,
    count: usize,
}

/// Line buffers emptied and kept for the thread's next responses: at most
/// this many, each of [`LINES_CAPACITY`] bytes (one grown by a response
/// with many fields is let go).
///
/// A buffer made and freed per response cost ~170 instructions of a
/// proxied request (`instructions.sh`), taking a kept one back a few
/// dozen: the request's header maps are kept so too (`headers::recycle`).
const KEPT_LINES: usize = 32;
const LINES_CAPACITY: usize = 256;

thread_local! {
    static KEPT: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Added {
    /// Adds `name: value`, `value` a `HeaderValue`'s bytes (valid as they
    /// are).
    fn push(&mut self, name: &[u8], value: &[u8]) {
        let b = self.line_start(name);
        b.extend_from_slice(value);
        b.extend_from_slice(b"\r\n");
        self.count += 1;
    }

    /// Adds `name` with the value `write` appends to the buffer it is
    /// given. A value `HeaderValue` would refuse (a control byte, which
    /// could end the line and start a field of its own) is taken back, and
    /// the field left out.
    fn push_with(&mut self, name: &[u8], write: impl FnOnce(&mut Vec<u8>)) {
        let at = self.lines.len();
        let b = self.line_start(name);
        let start = b.len();
        write(b);
        if crate::headers::is_valid_value(b.get(start..).unwrap_or_default()) {
            b.extend_from_slice(b"\r\n");
            self.count += 1;
        } else {
            b.truncate(at);
        }
    }

    /// The buffer, with room for a line and `name: ` written.
    #[inline]
    fn line_start(&mut self, name: &[u8]) -> &mut Vec<u8> {
        if self.lines.capacity() == 0 {
            // Room at once for the few fields a response gets (request id,
            // `server`, a rate limit's pair: about 130 bytes): growing
            // from nothing would copy them several times over.
            self.lines = KEPT
                .try_with(|kept| kept.borrow_mut().pop())
                .ok()
                .flatten()
                .unwrap_or_else(|| Vec::with_capacity(LINES_CAPACITY));
        }
        let b = &mut self.lines;
        // The name, `: `, a value of up to 64 bytes and the line's end.
        b.reserve(name.len() + 68);
        b.extend_from_slice(name);
        b.extend_from_slice(b": ");
        b
    }

    /// The field whose line begins at byte `at`, and where the next begins.
    fn at(&self, at: usize) -> Option<(&[u8], &[u8], usize)> {
        let rest = self.lines.get(at..)?;
        let cr = rest.iter().position(|&b| b == b'\r')?;
        let line = &rest[..cr];
        let colon = line.iter().position(|&b| b == b':')?;
        let value = line.get(colon + 2..).unwrap_or_default();
        Some((&line[..colon], value, at + cr + 2))
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (name, value, next) = self.at(at)?;
            at = next;
            Some((name, value))
        })
    }

    /// Leaves out every field named `name` (lower case).
    fn remove(&mut self, name: &[u8]) {
        if !self.iter().any(|(n, _)| n == name) {
            return;
        }
        let mut kept = Added::default();
        for (n, v) in self.iter().filter(|(n, _)| *n != name) {
            kept.push(n, v);
        }
        *self = kept;
    }
}

impl Drop for Added {
    /// Keeps the buffer, emptied, for a later response on this thread.
    fn drop(&mut self) {
        if self.lines.capacity() != LINES_CAPACITY {
            return;
        }
        let mut lines = std::mem::take(&mut self.lines);
        lines.clear();
        let _ = KEPT.try_with(|kept| {
            let mut kept = kept.borrow_mut();
            if kept.len() < KEPT_LINES {
                kept.push(lines);
            }
        });
    }
}

/// The value of a field the gateway sets: a `HeaderValue`'s bytes, or
/// what a closure writes (checked as it is added).
enum Line<'v, W> {
    Value(&'v [u8]),
    Written(W),
}

/// A `HeaderValue`'s bytes as a [`Line`].
fn copied(value: &[u8]) -> Line<'_, fn(&mut Vec<u8>)> {
    Line::Value(value)
}

impl Relayed {
    /// A response's fields, in the order the instance sent them, as spans
    /// of `head` ([`Field::within`]).
    pub(crate) fn new(head: Bytes, fields: Vec<Field>) -> Relayed {
        let mut names = 0;
        for f in &fields {
            let (start, end) = f.name;
            names |= name_bit(head.get(start as usize..end as usize).unwrap_or_default());
        }
        Relayed {
            head,
            fields,
            names,
            added: Added::default(),
            added_names: 0,
        }
    }

    /// Sets a field after the instance's.
    fn add<W: FnOnce(&mut Vec<u8>)>(&mut self, name: &HeaderName, line: Line<'_, W>) {
        let name = name.as_str().as_bytes();
        self.added_names |= name_bit(name);
        match line {
            Line::Value(value) => self.added.push(name, value),
            Line::Written(write) => self.added.push_with(name, write),
        }
    }

    fn bytes(&self, (start, end): (u32, u32)) -> &[u8] {
        self.head
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// Whether `field` is named `name` (lower case, as a `HeaderName` is),
    /// in any case. By length first: most names are compared with nothing.
    #[inline(always)]
    fn is_named(&self, field: &Field, name: &[u8]) -> bool {
        let (start, end) = field.name;
        if end.wrapping_sub(start) as usize != name.len() {
            return false;
        }
        let sent = self.bytes(field.name);
        // Many servers write names in lower case: one plain comparison.
        sent == name || sent.eq_ignore_ascii_case(name)
    }

    /// Every field as `(name, value)`: the instance's, names as sent (any
    /// case), then the gateway's.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.sent().chain(self.added.iter())
    }

    /// The instance's fields, names as sent (any case).
    pub(crate) fn sent(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields
            .iter()
            .map(|f| (self.bytes(f.name), self.bytes(f.value)))
    }

    /// The gateway's fields.
    pub(crate) fn added(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.added.iter()
    }

    /// The gateway's fields as the `name: value` lines of a head, when
    /// none of them may have a name in `names` (by [`name_bit`]s: a
    /// writer that would leave such a field out, or note it, goes through
    /// [`Relayed::added`] instead).
    pub(crate) fn added_lines(&self, names: u64) -> Option<&[u8]> {
        (self.added_names & names == 0).then_some(&self.added.lines[..])
    }

    /// The values of the fields named `name`, in order.
    pub(crate) fn get_all<'a>(&'a self, name: &'a HeaderName) -> Values<'a> {
        let raw = name.as_str().as_bytes();
        let bit = name_bit(raw);
        // Past the instance's fields when none can have the name, past the
        // gateway's too when none of those can.
        let at = if self.names & bit != 0 {
            0
        } else {
            self.fields.len()
        };
        Values {
            relayed: Some(Lookup {
                relayed: self,
                raw,
                at,
                added_at: (self.added_names & bit != 0).then_some(0),
            }),
            map: None,
        }
    }

    /// Leaves out every field named `name`.
    fn remove(&mut self, name: &HeaderName) {
        let raw = name.as_str().as_bytes();
        // Usually there is none: then nothing is moved.
        let bit = name_bit(raw);
        if self.names & bit != 0 && self.fields.iter().any(|f| self.is_named(f, raw)) {
            let mut fields = std::mem::take(&mut self.fields);
            fields.retain(|f| !self.is_named(f, raw));
            self.fields = fields;
        }
        if self.added_names & bit != 0 {
            self.added.remove(raw);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.fields.len() + self.added.count
    }

    /// The bytes of the instance's head, which this holds on to.
    pub(crate) fn head_len(&self) -> usize {
        self.head.len()
    }
}

/// The values of the fields of one name: a [`Relayed`]'s, then a map's.
/// A loop rather than chained adapters: it runs for every response, and
/// the adapters cost several times what it does.
pub(crate) struct Values<'a> {
    /// The relayed fields still to look at, if any.
    relayed: Option<Lookup<'a>>,
    map: Option<http::header::ValueIter<'a, HeaderValue>>,
}

struct Lookup<'a> {
    relayed: &'a Relayed,
    /// The name looked for, lower case.
    raw: &'a [u8],
    /// The next of the instance's fields.
    at: usize,
    /// Where the next of the gateway's fields begins in its buffer; `None`
    /// when none may have the name (`added_names`), or all were seen.
    added_at: Option<usize>,
}

impl<'a> Values<'a> {
    /// Goes on with `map`'s values of the name once the relayed ones are
    /// done.
    pub(crate) fn then(mut self, map: http::header::GetAll<'a, HeaderValue>) -> Values<'a> {
        self.map = Some(map.into_iter());
        self
    }

    /// Only `map`'s values.
    pub(crate) fn of_map(map: http::header::GetAll<'a, HeaderValue>) -> Values<'a> {
        Values {
            relayed: None,
            map: Some(map.into_iter()),
        }
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if let Some(l) = &mut self.relayed {
            let r = l.relayed;
            while let Some(f) = r.fields.get(l.at) {
                l.at += 1;
                if r.is_named(f, l.raw) {
                    return Some(r.bytes(f.value));
                }
            }
            // The instance's field found, its duplicates looked for: the
            // gateway's are compared only when one may have the name.
            while let Some((n, v, next)) = l.added_at.and_then(|at| r.added.at(at)) {
                l.added_at = Some(next);
                if n == l.raw {
                    return Some(v);
                }
            }
            self.relayed = None;
        }
        self.map.as_mut()?.next().map(HeaderValue::as_bytes)
    }
}

/// What the request path answers: a response and, for one relayed from an
/// instance, the instance's fields, which go out before the response's own.
pub(crate) struct Reply {
    pub res: Response<Body>,
    pub relayed: Option<Relayed>,
}

impl Reply {
    /// The values of the fields named `name`: the instance's, then those
    /// the gateway set.
    pub(crate) fn values<'a>(&'a self, name: &'a HeaderName) -> Values<'a> {
        let map = self.res.headers().get_all(name);
        match &self.relayed {
            Some(relayed) => relayed.get_all(name).then(map),
            None => Values::of_map(map),
        }
    }

    /// The fields, to change on the way out.
    pub(crate) fn fields(&mut self) -> Fields<'_> {
        Fields {
            map: self.res.headers_mut(),
            relayed: self.relayed.as_mut(),
        }
    }

    /// The response with the relayed fields moved into its map, before the
    /// map's own fields (so that one of the same name the gateway appended,
    /// like `Vary: Origin`, stays after the instance's): for hyper's HTTP/2
    /// server, and for tests that read a response's map.
    pub(crate) fn into_response(self) -> Response<Body> {
        let Some(relayed) = self.relayed else {
            return self.res;
        };
        let (mut parts, body) = self.res.into_parts();
        let mut map = HeaderMap::with_capacity(relayed.len() + parts.headers.len());
        for f in &relayed.fields {
            // Both always succeed for what httparse accepted (see the
            // module doc and the tests); a field that did not would be
            // left out.
            let name = HeaderName::from_bytes(relayed.bytes(f.name));
            let value =
                crate::headers::value(relayed.head.slice(f.value.0 as usize..f.value.1 as usize));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        for (name, value) in relayed.added.iter() {
            // Both made from a `HeaderName` and a checked value.
            let name = added_name(name).map_or_else(|| HeaderName::from_bytes(name), Ok);
            let value = crate::headers::value(Bytes::copy_from_slice(value));
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        let mut last = None;
        for (name, value) in std::mem::take(&mut parts.headers) {
            // `None` continues the previous name's values.
            if let Some(name) = name {
                last = Some(name);
            }
            if let Some(name) = &last {
                map.append(name.clone(), value);
            }
        }
        parts.headers = map;
        Response::from_parts(parts, body)
    }
}

/// The `HeaderName` of a field the gateway sets, from its (lower-case)
/// bytes, for the names it sets on most responses: `from_bytes` would
/// allocate each custom one again (three allocations a response on
/// HTTP/2), where these are clones of statics.
fn added_name(raw: &[u8]) -> Option<HeaderName> {
    let statics = [
        &crate::request_id::X_REQUEST_ID,
        &crate::ratelimit::RATELIMIT,
        &crate::ratelimit::RATELIMIT_POLICY,
        &crate::cache::CACHE_STATUS,
    ];
    statics
        .into_iter()
        .find(|n| n.as_str().as_bytes() == raw)
        .cloned()
        .or_else(|| crate::headers::known_name(raw))
}

impl From<Response<Body>> for Reply {
    fn from(res: Response<Body>) -> Reply {
        Reply { res, relayed: None }
    }
}

/// The fields of a response on its way out: its map and, for a response
/// relayed from an instance, the instance's fields. An insert or a removal
/// applies to both.
pub(crate) struct Fields<'a> {
    map: &'a mut HeaderMap,
    relayed: Option<&'a mut Relayed>,
}

impl Fields<'_> {
    /// Sets `name` to `value`, replacing any field of that name.
    pub(crate) fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        if self.relayed.is_some() {
            self.replace_relayed(&name, copied(value.as_bytes()));
        } else {
            self.map.insert(name, value);
        }
    }

    /// [`Fields::insert`] of a name and value the caller keeps: a relayed
    /// response copies their bytes, and only a map clones them.
    pub(crate) fn insert_ref(&mut self, name: &HeaderName, value: &HeaderValue) {
        if self.relayed.is_some() {
            self.replace_relayed(name, copied(value.as_bytes()));
        } else {
            self.map.insert(name.clone(), value.clone());
        }
    }

    /// Sets `name` to the value `write` appends to the buffer it is given,
    /// replacing any field of that name: for a relayed response, written in
    /// place among the gateway's fields. A value `HeaderValue` refuses is
    /// left out.
    pub(crate) fn insert_with(&mut self, name: &HeaderName, write: impl FnOnce(&mut Vec<u8>)) {
        if self.relayed.is_some() {
            self.replace_relayed(name, Line::Written(write));
        } else {
            let mut value = Vec::new();
            write(&mut value);
            if let Ok(value) = crate::headers::value(Bytes::from(value)) {
                self.map.insert(name.clone(), value);
            }
        }
    }

    /// A relayed response's `name` replaced by `line`'s value.
    fn replace_relayed<W: FnOnce(&mut Vec<u8>)>(&mut self, name: &HeaderName, line: Line<'_, W>) {
        if let Some(relayed) = self.relayed.as_deref_mut() {
            relayed.remove(name);
            if !self.map.is_empty() {
                self.map.remove(name);
            }
            relayed.add(name, line);
        }
    }

    /// Adds a field, after any of the same name.
    pub(crate) fn append(&mut self, name: HeaderName, value: HeaderValue) {
        match self.relayed.as_deref_mut() {
            // Written after the instance's fields: after any of its own of
            // that name. (The map of a relayed response holds nothing the
            // gateway set: everything goes through here.)
            Some(relayed) => relayed.add(&name, copied(value.as_bytes())),
            None => {
                self.map.append(name, value);
            }
        }
    }

    /// Removes every field named `name`.
    pub(crate) fn remove(&mut self, name: &HeaderName) {
        if let Some(relayed) = self.relayed.as_deref_mut() {
            relayed.remove(name);
        }
        if !self.map.is_empty() {
            self.map.remove(name);
        }
    }
}

impl<'a> From<&'a mut HeaderMap> for Fields<'a> {
    fn from(map: &'a mut HeaderMap) -> Fields<'a> {
        Fields { map, relayed: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relayed(head: &'static [u8]) -> Relayed {
        let mut slots = [httparse::EMPTY_HEADER; 16];
        let mut res = httparse::Response::new(&mut slots);
        assert!(matches!(res.parse(head), Ok(httparse::Status::Complete(_))));
        let fields = res
            .headers
            .iter()
            .map(|h| Field::within(head, h.name.as_bytes(), h.value))
            .collect();
        Relayed::new(Bytes::from_static(head), fields)
    }

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nVary: Accept-Encoding\r\nRateLimit: \"x\";r=1\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n\r\n";

    #[test]
    fn fields_are_read_as_sent_and_by_name_in_any_case() {
        let r = relayed(HEAD);
        assert_eq!(r.len(), 5);
        assert_eq!(
            r.iter().next(),
            Some((&b"Content-Type"[..], &b"text/plain"[..]))
        );
        let cookies: Vec<&[u8]> = r.get_all(&http::header::SET_COOKIE).collect();
        assert_eq!(cookies, [&b"a=1"[..], b"b=2"]);
        assert_eq!(r.get_all(&http::header::DATE).count(), 0);
    }

    fn reply() -> Reply {
        Reply {
            res: Response::new(crate::body::empty()),
            relayed: Some(relayed(HEAD)),
        }
    }

    #[test]
    fn an_insert_replaces_the_instances_field_and_an_append_keeps_it() {
        let mut reply = reply();
        let mut fields = reply.fields();
        let ratelimit = HeaderName::from_static("ratelimit");
        fields.insert(ratelimit.clone(), HeaderValue::from_static("\"g\";r=9"));
        fields.append(http::header::VARY, HeaderValue::from_static("Origin"));
        fields.remove(&http::header::SET_COOKIE);
        let r = reply.relayed.as_ref().map(|r| {
            r.iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            r,
            Some(vec![
                (b"Content-Type".to_vec(), b"text/plain".to_vec()),
                (b"Vary".to_vec(), b"Accept-Encoding".to_vec()),
                (b"ratelimit".to_vec(), b"\"g\";r=9".to_vec()),
                (b"vary".to_vec(), b"Origin".to_vec()),
            ])
        );
        // A second insert replaces the gateway's own first one too.
        reply
            .fields()
            .insert(ratelimit.clone(), HeaderValue::from_static("\"g\";r=8"));
        let values = |name: &HeaderName| -> Vec<Vec<u8>> {
            let r = reply.relayed.as_ref();
            r.map(|r| r.get_all(name).map(<[u8]>::to_vec).collect())
                .unwrap_or_default()
        };
        assert_eq!(values(&ratelimit), [b"\"g\";r=8".to_vec()]);
        assert_eq!(
            values(&http::header::VARY),
            [b"Accept-Encoding".to_vec(), b"Origin".to_vec()]
        );
        assert!(values(&http::header::SET_COOKIE).is_empty());
        // The instance's alone, with fields of other names added after.
        assert_eq!(
            values(&http::header::CONTENT_TYPE),
            [b"text/plain".to_vec()]
        );
        let res = reply.into_response();
        let headers = res.headers();
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(headers[&ratelimit], "\"g\";r=8");
        let vary: Vec<_> = headers.get_all(http::header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        assert!(headers.get(http::header::SET_COOKIE).is_none());
    }

    /// What the gateway writes in place goes out as written, a value
    /// `HeaderValue` refuses never (it could end the line and start a
    /// field of its own), and a removal keeps the rest in order, in a
    /// relayed response and in a map alike.
    #[test]
    fn values_written_in_place_are_checked_and_removed_by_name() {
        let mut reply = reply();
        let name = HeaderName::from_static("x-made");
        let other = HeaderName::from_static("x-other");
        let mut fields = reply.fields();
        fields.insert_with(&name, |b| b.extend_from_slice(b"one"));
        fields.insert_ref(&other, &HeaderValue::from_static("kept"));
        fields.insert_with(&name, |b| b.extend_from_slice(b"two\r\nx-evil: 1"));
        fields.append(name.clone(), HeaderValue::from_static("three"));
        fields.insert_with(&other, |b| b.extend_from_slice(b"tab\tand \x80 obs-text"));
        let added: Vec<(Vec<u8>, Vec<u8>)> = reply
            .relayed
            .iter()
            .flat_map(Relayed::iter)
            .skip(5)
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            added,
            [
                (b"x-made".to_vec(), b"three".to_vec()),
                (b"x-other".to_vec(), b"tab\tand \x80 obs-text".to_vec()),
            ]
        );
        assert_eq!(reply.relayed.as_ref().map(Relayed::len), Some(7));
        let res = reply.into_response();
        assert_eq!(res.headers()[&name], "three");
        assert_eq!(res.headers()[&other].as_bytes(), b"tab\tand \x80 obs-text");
        assert!(res.headers().get("x-evil").is_none());

        let mut map = HeaderMap::new();
        let mut fields = Fields::from(&mut map);
        fields.insert_with(&name, |b| b.extend_from_slice(b"one"));
        fields.insert_with(&other, |b| b.extend_from_slice(b"bad\n"));
        assert_eq!(map[&name], "one");
        assert!(map.get(&other).is_none());
    }

    /// A response's line buffer is kept, emptied, for the thread's next
    /// one; one grown past the usual size is let go.
    #[test]
    fn line_buffers_are_kept_per_thread_and_come_back_empty() {
        let kept = std::thread::spawn(|| {
            let mut a = Added::default();
            a.push(b"x-a", b"1");
            let first = a.lines.as_ptr();
            drop(a);
            let mut b = Added::default();
            b.push(b"x-b", b"2");
            assert_eq!(b.lines.as_ptr(), first, "the kept buffer was not taken");
            let fields: Vec<(&[u8], &[u8])> = b.iter().collect();
            assert_eq!(fields, [(&b"x-b"[..], &b"2"[..])]);
            let mut c = Added::default();
            c.push(b"x-c", &[b'v'; 300]);
            drop(b);
            drop(c);
            KEPT.with(|kept| kept.borrow().len())
        })
        .join();
        assert_eq!(kept.ok(), Some(1));
    }

    #[test]
    fn the_gateways_names_are_made_as_from_bytes_makes_them() {
        for raw in [
            "x-request-id",
            "ratelimit",
            "ratelimit-policy",
            "cache-status",
            "content-type",
        ] {
            let made = added_name(raw.as_bytes());
            assert_eq!(made, HeaderName::from_bytes(raw.as_bytes()).ok(), "{raw}");
        }
        // Any other is left to `from_bytes`.
        assert_eq!(added_name(b"x-request-ie"), None);
        assert_eq!(added_name(b"vary"), None);
    }

    #[test]
    fn into_response_keeps_every_value_of_the_maps_own_fields() {
        let mut reply = reply();
        let map = reply.res.headers_mut();
        map.append(http::header::VARY, HeaderValue::from_static("Origin"));
        map.append(http::header::VARY, HeaderValue::from_static("Cookie"));
        map.insert(http::header::SERVER, HeaderValue::from_static("flotilla"));
        let res = reply.into_response();
        let headers = res.headers();
        let vary: Vec<_> = headers.get_all(http::header::VARY).iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin", "Cookie"]);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
        assert_eq!(headers[http::header::SERVER], "flotilla");
        assert_eq!(headers.len(), 8);
    }

    /// Names are found by a bit per length and first byte (modulo 64)
    /// before any scan: names that share a bit are still told apart by
    /// their bytes.
    #[test]
    fn names_of_any_length_are_found_and_removed() {
        let long = "x".repeat(70);
        let head: &'static [u8] =
            format!("HTTP/1.1 200 OK\r\n{long}: 1\r\nxbcdef: 2\r\nXbCdEf: 3\r\n\r\n")
                .into_bytes()
                .leak();
        let mut reply = Reply {
            res: Response::new(crate::body::empty()),
            relayed: Some(relayed(head)),
        };
        let values = |r: &Reply, name: &HeaderName| -> Vec<Vec<u8>> {
            r.relayed
                .as_ref()
                .map(|r| r.get_all(name).map(<[u8]>::to_vec).collect())
                .unwrap_or_default()
        };
        let long = HeaderName::from_bytes(long.as_bytes()).unwrap_or(http::header::DATE);
        let six = HeaderName::from_static("xbcdef");
        // (70 + 8 * 'x') % 64 == (6 + 8 * 'x') % 64: the bit is shared,
        // the bytes are not.
        assert_eq!(values(&reply, &long), [b"1".to_vec()]);
        assert_eq!(values(&reply, &six), [b"2".to_vec(), b"3".to_vec()]);
        assert!(values(&reply, &HeaderName::from_static("xbcdeg")).is_empty());
        reply.fields().remove(&six);
        assert_eq!(values(&reply, &long), [b"1".to_vec()]);
        assert!(values(&reply, &six).is_empty());
        reply.fields().remove(&long);
        assert_eq!(reply.relayed.as_ref().map(Relayed::len), Some(0));
    }

    #[test]
    fn spans_outside_the_head_read_as_empty() {
        let head: &[u8] = b"a: bc";
        let other: &[u8] = b"elsewhere";
        let fields = vec![
            Field::within(head, &head[..1], &head[3..]),
            Field::within(head, &head[..1], other),
            Field::within(&head[..4], &head[..1], &head[3..]),
        ];
        let r = Relayed::new(Bytes::from_static(head), fields);
        let read: Vec<(&[u8], &[u8])> = r.iter().collect();
        assert_eq!(read, [(&b"a"[..], &b"bc"[..]), (b"a", b""), (b"a", b"")]);
    }

    /// The one field of a response head `HTTP/1.1 200 OK\r\n{field}\r\n\r\n`
    /// as httparse reads it, if it does.
    fn one_field(field: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        head.extend_from_slice(field);
        head.extend_from_slice(b"\r\n\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 4];
        match httparse::Response::new(&mut slots).parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                Some((slots[0].name.as_bytes().to_vec(), slots[0].value.to_vec()))
            }
            _ => None,
        }
    }

    /// The reason relaying the instance's bytes is as strict as building
    /// `HeaderName`s and `HeaderValue`s from them: for every byte value,
    /// httparse accepts a response field with it in the name or the value
    /// exactly when `http` accepts that name or value. (httparse ends a
    /// value at CR or LF; those two are covered by the head not parsing as
    /// one field with that value.)
    #[test]
    fn httparse_accepts_exactly_what_http_accepts() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            let field = [&b"x-v: "[..], &value].concat();
            let value_ok = one_field(&field).is_some_and(|(_, v)| v == value);
            assert_eq!(
                value_ok,
                HeaderValue::from_bytes(&value).is_ok(),
                "value byte {b:#04x}"
            );
            let name = [b'x', b, b'y'];
            let field = [&name[..], b": v"].concat();
            let name_ok = one_field(&field).is_some_and(|(n, _)| n == name);
            assert_eq!(
                name_ok,
                HeaderName::from_bytes(&name).is_ok(),
                "name byte {b:#04x}"
            );
        }
    }
}
