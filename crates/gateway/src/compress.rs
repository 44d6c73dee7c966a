//! gzip for responses to clients that accept it (`Config::compression`), as
//! nginx's `gzip`, Envoy's compressor filter and Caddy's `encode` do.
//!
//! A response is compressed when its media type is one of the configured
//! ones, it says no length or one of at least `min_bytes`, and nothing
//! rules it out: an encoding already (`Content-Encoding`), a part of a
//! resource (206, `Content-Range`), `Cache-Control: no-transform`, or no
//! body at all (HEAD, 204, 304). Every response that could be compressed
//! gets `Vary: Accept-Encoding`, compressed or not, so a shared cache never
//! hands a gzip body to a client that did not ask for one.
//!
//! The body streams: each piece the instance sends is compressed as it
//! arrives, and whatever is compressed is flushed whenever the instance
//! pauses, so a slow response reaches the client as it is written rather
//! than when it ends. A compressed response has no `Content-Length` (it is
//! sent chunked over HTTP/1.1), no `Accept-Ranges`, and a strong `ETag`
//! becomes weak: the bytes are no longer the instance's.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::StatusCode;
use http::header::{
    ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, HeaderMap, HeaderValue, VARY,
};
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{self, Body, BoxError};
use crate::headers::list_elements;
use crate::relayed::Reply;

/// What to compress, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionConfig {
    /// The smallest body compressed, when the response says its length.
    pub min_bytes: u64,
    /// Media types, lower case: `type/subtype` or `type/*`.
    pub types: Vec<String>,
    /// gzip level, 1 to 9.
    pub level: u32,
}

impl CompressionConfig {
    pub fn from_manifest(c: &flotilla_manifest::Compression) -> CompressionConfig {
        CompressionConfig {
            min_bytes: c.min_bytes,
            types: c.types.clone(),
            level: c.level,
        }
    }
}

/// A [`CompressionConfig`], ready for the way out.
#[derive(Debug)]
pub(crate) struct Compression {
    min_bytes: u64,
    /// Whole media types (`application/json`).
    types: Vec<String>,
    /// Top-level types of the `type/*` entries, with their slash (`text/`).
    kinds: Vec<String>,
    level: flate2::Compression,
}

impl Compression {
    pub(crate) fn new(config: &CompressionConfig) -> Compression {
        let (kinds, types): (Vec<String>, Vec<String>) = config
            .types
            .iter()
            .map(|t| t.to_ascii_lowercase())
            .partition(|t| t.ends_with("/*"));
        Compression {
            min_bytes: config.min_bytes,
            types,
            kinds: kinds
                .into_iter()
                .map(|k| k.trim_end_matches('*').to_string())
                .collect(),
            level: flate2::Compression::new(config.level.clamp(1, 9)),
        }
    }

    /// Compresses `reply` if it may be and `gzip` (the client accepts it:
    /// [`accepts_gzip`]) says so; marks it `Vary: Accept-Encoding` if it
    /// may be at all.
    pub(crate) fn apply(&self, reply: &mut Reply, gzip: bool) {
        if !self.eligible(reply) {
            return;
        }
        if !gzip {
            varies(reply);
            return;
        }
        encoded(reply, None);
        let body = std::mem::replace(reply.res.body_mut(), body::empty());
        *reply.res.body_mut() = body::boxed(Gzip::new(body, self.level));
    }

    /// `body` gzipped whole, at the configured level: for the response
    /// cache, which keeps it beside the body so that a hit is not
    /// compressed again for every client.
    pub(crate) fn gzip(&self, body: &[u8]) -> Option<Bytes> {
        let mut encoder = GzEncoder::new(Vec::with_capacity(body.len() / 3 + 64), self.level);
        encoder.write_all(body).ok()?;
        encoder.finish().ok().map(Bytes::from)
    }

    /// Whether `reply` is one to compress, for a client that takes gzip.
    pub(crate) fn eligible(&self, reply: &Reply) -> bool {
        let status = reply.res.status();
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
            || reply.res.body().is_end_stream()
        {
            return false;
        }
        let Some(media) = reply.values(&CONTENT_TYPE).next() else {
            return false;
        };
        if !self.compresses(media) {
            return false;
        }
        let length = reply
            .values(&CONTENT_LENGTH)
            .next()
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<u64>().ok())
            .or_else(|| reply.res.body().size_hint().exact());
        // An empty body stays empty whatever `min_bytes` says.
        if length.is_some_and(|n| n < self.min_bytes.max(1)) {
            return false;
        }
        reply.values(&CONTENT_ENCODING).next().is_none()
            && reply.values(&CONTENT_RANGE).next().is_none()
            && !list_elements(reply.values(&CACHE_CONTROL))
                .any(|d| d.eq_ignore_ascii_case(b"no-transform"))
    }

    /// Whether a `Content-Type` value names one of the configured types.
    fn compresses(&self, content_type: &[u8]) -> bool {
        let media = content_type
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        self.types
            .iter()
            .any(|t| media.eq_ignore_ascii_case(t.as_bytes()))
            || self.kinds.iter().any(|k| {
                media.len() > k.len() && media[..k.len()].eq_ignore_ascii_case(k.as_bytes())
            })
    }
}

/// `reply`, whose body the response cache gzipped already (`gzipped`,
/// of an [`Compression::eligible`] response), as a compressed response: its
/// fields as [`Compression::apply`] sets them, with the length known.
pub(crate) fn gzipped(reply: &mut Reply, gzipped: Bytes) {
    encoded(reply, Some(gzipped.len()));
    *reply.res.body_mut() = body::full(gzipped);
}

/// Marks `reply` as varying by `Accept-Encoding`, once: an instance may
/// have said so already.
fn varies(reply: &mut Reply) {
    let varies = list_elements(reply.values(&VARY))
        .any(|v| v == b"*" || v.eq_ignore_ascii_case(b"accept-encoding"));
    if !varies {
        reply
            .fields()
            .append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// The fields of a gzipped response: `Content-Encoding`, a weak `ETag`,
/// no ranges, and `length` if it is known (else none: chunked).
fn encoded(reply: &mut Reply, length: Option<usize>) {
    varies(reply);
    let etag = reply.values(&ETAG).next().and_then(weakened);
    let mut fields = reply.fields();
    match length {
        Some(length) => fields.insert(CONTENT_LENGTH, HeaderValue::from(length)),
        None => fields.remove(&CONTENT_LENGTH),
    }
    fields.remove(&ACCEPT_RANGES);
    fields.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    if let Some(etag) = etag {
        fields.insert(ETAG, etag);
    }
}

/// `W/"x"` for a strong `"x"`; `None` for a weak one, which stays.
fn weakened(etag: &[u8]) -> Option<HeaderValue> {
    if etag.starts_with(b"W/") {
        return None;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(etag);
    HeaderValue::from_bytes(&weak).ok()
}

/// Whether a request's `Accept-Encoding` takes gzip: `gzip` (or `x-gzip`,
/// or else `*`) listed with a quality above 0 (RFC 9110 section 12.5.3).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    for element in list_elements(
        headers
            .get_all(ACCEPT_ENCODING)
            .iter()
            .map(|v| v.as_bytes()),
    ) {
        let mut parts = element.split(|&b| b == b';');
        let coding = parts.next().unwrap_or_default().trim_ascii();
        let wanted = parts.all(|param| {
            let param = param.trim_ascii();
            match param.split_first() {
                Some((q, rest)) if q.eq_ignore_ascii_case(&b'q') && rest.first() == Some(&b'=') => {
                    std::str::from_utf8(&rest[1..])
                        .ok()
                        .and_then(|v| v.trim().parse::<f32>().ok())
                        .is_some_and(|q| q > 0.0)
                }
                _ => true,
            }
        });
        if coding.eq_ignore_ascii_case(b"gzip") || coding.eq_ignore_ascii_case(b"x-gzip") {
            gzip = Some(wanted);
        } else if coding == b"*" {
            any = Some(wanted);
        }
    }
    gzip.or(any).unwrap_or(false)
}

pin_project_lite::pin_project! {
    /// `inner`, gzipped as it streams.
    struct Gzip {
        #[pin]
        inner: Body,
        // `None` once the stream is finished.
        encoder: Option<GzEncoder<Vec<u8>>>,
        // Input written since the last flush.
        unflushed: bool,
    }
}

impl Gzip {
    fn new(inner: Body, level: flate2::Compression) -> Gzip {
        Gzip {
            inner,
            encoder: Some(GzEncoder::new(Vec::new(), level)),
            unflushed: false,
        }
    }
}

/// The compressed bytes `encoder` has written so far, taken out of it.
fn take(encoder: &mut GzEncoder<Vec<u8>>) -> Option<Frame<Bytes>> {
    let out = std::mem::take(encoder.get_mut());
    (!out.is_empty()).then(|| Frame::data(Bytes::from(out)))
}

impl http_body::Body for Gzip {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not relayed by the gateway; only data.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    encoder.write_all(&data)?;
                    *this.unflushed = true;
                    if let Some(out) = take(encoder) {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    let Some(encoder) = this.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    let out = encoder.finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                Poll::Pending => {
                    // The instance paused: what it sent so far goes out
                    // now, not when it writes more.
                    if std::mem::take(this.unflushed) {
                        encoder.flush()?;
                        if let Some(out) = take(encoder) {
                            return Poll::Ready(Some(Ok(out)));
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use http::Response;
    use http_body_util::BodyExt;

    use super::*;

    fn policy() -> Compression {
        Compression::new(&CompressionConfig {
            min_bytes: 100,
            types: vec!["application/json".into(), "text/*".into()],
            level: 5,
        })
    }

    fn reply(headers: &[(&'static str, &'static str)], body: Body) -> Reply {
        let mut res = Response::new(body);
        for (name, value) in headers {
            res.headers_mut()
                .append(*name, HeaderValue::from_static(value));
        }
        Reply::from(res)
    }

    async fn gunzip(body: Body) -> Vec<u8> {
        let bytes = match body.collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => panic!("{e}"),
        };
        let mut out = Vec::new();
        if let Err(e) = flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut out) {
            panic!("not gzip: {e}");
        }
        out
    }

    fn header(reply: &Reply, name: &http::header::HeaderName) -> Option<String> {
        reply
            .values(name)
            .next()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    #[tokio::test]
    async fn a_large_json_response_is_gzipped_and_its_validators_adjusted() {
        let text = "{\"a\":1}".repeat(100);
        let mut r = reply(
            &[
                ("content-type", "application/json; charset=utf-8"),
                ("content-length", "700"),
                ("etag", "\"v1\""),
                ("accept-ranges", "bytes"),
            ],
            body::full(text.clone()),
        );
        policy().apply(&mut r, true);
        assert_eq!(header(&r, &CONTENT_ENCODING).as_deref(), Some("gzip"));
        assert_eq!(header(&r, &VARY).as_deref(), Some("accept-encoding"));
        assert_eq!(header(&r, &ETAG).as_deref(), Some("W/\"v1\""));
        assert_eq!(header(&r, &CONTENT_LENGTH), None);
        assert_eq!(header(&r, &ACCEPT_RANGES), None);
        let res = r.into_response();
        assert_eq!(gunzip(res.into_body()).await, text.as_bytes());
    }

    #[tokio::test]
    async fn what_may_not_or_need_not_be_compressed_is_left_alone() {
        let big = || body::full("x".repeat(500));
        let cases: Vec<(&str, Reply)> = vec![
            ("image", reply(&[("content-type", "image/png")], big())),
            ("no type", reply(&[], big())),
            (
                "small",
                reply(&[("content-type", "text/plain")], body::full("tiny")),
            ),
            (
                "declared small",
                reply(
                    &[("content-type", "text/plain"), ("content-length", "99")],
                    big(),
                ),
            ),
            (
                "encoded",
                reply(
                    &[("content-type", "text/plain"), ("content-encoding", "br")],
                    big(),
                ),
            ),
            (
                "no-transform",
                reply(
                    &[
                        ("content-type", "text/plain"),
                        ("cache-control", "public, No-Transform"),
                    ],
                    big(),
                ),
            ),
            (
                "empty",
                reply(&[("content-type", "text/plain")], body::empty()),
            ),
        ];
        for (what, mut r) in cases {
            policy().apply(&mut r, true);
            assert_eq!(
                header(&r, &CONTENT_ENCODING).filter(|e| e == "gzip"),
                None,
                "{what}"
            );
            assert_eq!(header(&r, &VARY), None, "{what}");
        }
        let mut partial = reply(&[("content-type", "text/plain")], big());
        *partial.res.status_mut() = StatusCode::PARTIAL_CONTENT;
        policy().apply(&mut partial, true);
        assert_eq!(header(&partial, &CONTENT_ENCODING), None);

        // A client that does not take gzip gets the body as it was, marked
        // as varying with what it accepts.
        let mut plain = reply(&[("content-type", "text/html"), ("etag", "\"v1\"")], big());
        policy().apply(&mut plain, false);
        assert_eq!(header(&plain, &CONTENT_ENCODING), None);
        assert_eq!(header(&plain, &VARY).as_deref(), Some("accept-encoding"));
        assert_eq!(header(&plain, &ETAG).as_deref(), Some("\"v1\""));

        // An instance that says it varies by encoding is not told twice.
        let mut said = reply(
            &[
                ("content-type", "text/html"),
                ("vary", "Origin, Accept-Encoding"),
            ],
            big(),
        );
        policy().apply(&mut said, true);
        assert_eq!(header(&said, &CONTENT_ENCODING).as_deref(), Some("gzip"));
        assert_eq!(said.values(&VARY).count(), 1);
    }

    #[test]
    fn accept_encoding_is_read_with_its_qualities() {
        let accepts = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(value));
            accepts_gzip(&headers)
        };
        for yes in [
            "gzip",
            "br, gzip",
            "GZIP;q=0.5",
            "deflate, x-gzip",
            "*",
            "br;q=1, *;q=0.1",
            "gzip; q=1.0",
        ] {
            assert!(accepts(yes), "{yes}");
        }
        for no in [
            "br",
            "gzip;q=0",
            "gzip; Q=0.000",
            "identity",
            "*;q=0",
            "gzip;q=0, *",
            "",
        ] {
            assert!(!accepts(no), "{no}");
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[tokio::test]
    async fn a_streamed_body_is_flushed_whenever_the_instance_pauses() {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let inner = body::boxed(http_body_util::StreamBody::new(stream));
        let mut gz = Gzip::new(inner, flate2::Compression::new(5));
        let sent = tx
            .send(Ok(Frame::data(Bytes::from_static(b"first event\n"))))
            .await;
        assert!(sent.is_ok());
        // The first piece is readable before the stream goes on.
        let mut got = Vec::new();
        while let Some(Ok(frame)) =
            std::future::poll_fn(|cx| match Pin::new(&mut gz).poll_frame(cx) {
                Poll::Pending => Poll::Ready(None),
                ready => ready,
            })
            .await
        {
            got.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        let mut decoded = Vec::new();
        let mut decoder = flate2::write::GzDecoder::new(&mut decoded);
        assert!(decoder.write_all(&got).is_ok() && decoder.flush().is_ok());
        drop(decoder);
        assert_eq!(decoded, b"first event\n");
        drop(tx);
        let rest = BodyExt::collect(gz).await.map(|c| c.to_bytes());
        assert!(rest.is_ok_and(|b| !b.is_empty()), "the trailer follows");
    }
}
