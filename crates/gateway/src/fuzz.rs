//! What must hold for any bytes a client or an instance sends, checked by
//! the fuzz targets (`crates/gateway/fuzz`: `cargo +nightly fuzz run
//! request_head`, …) and, over seeds and their mutations, by the unit tests
//! below, which run in every `cargo test`.
//!
//! Each check panics when a property fails; that is what libFuzzer reports.
//! They are where hostile bytes enter: the request head and its framing,
//! the chunked coding, an instance's response head as the client is sent
//! it, and bearer tokens and key sets.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::{StatusCode, Version};

use crate::chunked::{self, ChunkedDecoder, ChunkedError, Decoded};
use crate::h1::decode::Decoder;
use crate::h1::encode::{self, Exchange, Framing, HeadFields, Out, Then};
use crate::h1::head::{self, BodyLength, Head, Invalid, Limits};
use crate::jwt::{jwks, jws};
use crate::outbound::BodySize;

const LIMITS: Limits = Limits {
    max_bytes: 8192,
    max_headers: 100,
};

fn parse_request(data: &[u8]) -> (Result<Option<Head>, Invalid>, usize) {
    let mut buf = BytesMut::from(data);
    let parsed = head::parse(&mut buf, LIMITS, &mut Vec::new());
    (parsed, data.len() - buf.len())
}

/// A request head parses to the same request however its bytes are split
/// between reads (a prefix of a head is never an answer); every value it
/// keeps is one `HeaderValue` accepts (the parser builds them unchecked);
/// its framing is one reading only (no `Transfer-Encoding` beside a
/// `Content-Length`, chunked only on HTTP/1.1, one `Host`, without
/// userinfo); its host is one, and an HTTP/1.1 request has one; and the head
/// an instance is sent for it has the gateway's framing alone; the path
/// it is routed by, once normalised, stays so; and the body after it
/// decodes without a panic.
pub fn request_head(data: &[u8]) {
    let (whole, used) = parse_request(data);
    for cut in cuts(data.len(), used) {
        let (part, part_used) = parse_request(&data[..cut]);
        match &whole {
            Ok(Some(_)) if cut < used => assert!(
                matches!(part, Ok(None)),
                "the first {cut} of {used} bytes of a head were taken as {part:?}: {:?}",
                data.escape_ascii().to_string()
            ),
            Ok(Some(_)) => assert!(
                format!("{part:?}") == format!("{whole:?}") && part_used == used,
                "split at {cut}, a head parsed otherwise: {:?}",
                data.escape_ascii().to_string()
            ),
            Ok(None) => assert!(
                matches!(part, Ok(None)),
                "a prefix of an incomplete head was {part:?}: {:?}",
                data.escape_ascii().to_string()
            ),
            Err(_) => assert!(
                !matches!(part, Ok(Some(_))),
                "a prefix of a refused head was taken: {:?}",
                data.escape_ascii().to_string()
            ),
        }
    }
    let Ok(Some(head)) = whole else { return };
    let show = || data.escape_ascii().to_string();
    for (name, value) in &head.headers {
        assert!(
            HeaderValue::from_bytes(value.as_bytes()).is_ok(),
            "{name}: {value:?} kept, which HeaderValue refuses: {:?}",
            show()
        );
    }
    let lengths = head.headers.get_all(header::CONTENT_LENGTH).iter().count();
    let codings = head
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .count();
    assert!(head.headers.get_all(header::HOST).iter().count() <= 1);
    assert!(
        !head
            .headers
            .get(header::HOST)
            .is_some_and(|h| h.as_bytes().contains(&b'@')),
        "a Host with userinfo: {:?}",
        show()
    );
    // A host is one (`Host`, or the target's), and HTTP/1.1 names one.
    let host = head.headers.get(header::HOST).map(HeaderValue::as_bytes);
    let authority = head.uri.authority().map(|a| a.as_str().as_bytes());
    assert!(
        host.is_none_or(crate::headers::is_valid_host)
            && authority.is_none_or(crate::headers::is_valid_host),
        "a host that is none: {:?}",
        show()
    );
    assert!(
        head.version != Version::HTTP_11 || host.is_some() || authority.is_some(),
        "an HTTP/1.1 request without a host: {:?}",
        show()
    );
    match head.body {
        BodyLength::Chunked => {
            assert!(lengths == 0 && codings > 0 && head.version == Version::HTTP_11);
        }
        BodyLength::Length(n) => {
            assert!(n > 0 && lengths > 0 && codings == 0, "{:?}", show());
        }
        BodyLength::None => assert!(codings == 0, "{:?}", show()),
    }
    forwarded(&head, &show);
    // The path routed by is a fixed point: normalised once, it stays as
    // it is, and it is a valid target.
    if let Ok(Some(path)) = crate::routes::routed_path(head.uri.path()) {
        assert_eq!(
            crate::routes::routed_path(&path),
            Ok(None),
            "{path:?} from {:?}",
            show()
        );
        assert!(
            http::uri::PathAndQuery::try_from(path.as_str()).is_ok(),
            "{path:?} from {:?}",
            show()
        );
    }
    let mut decoder = match head.body {
        BodyLength::None => return,
        BodyLength::Length(n) => Decoder::Length(n),
        BodyLength::Chunked => Decoder::Chunked(ChunkedDecoder::default()),
    };
    let mut rest = BytesMut::from(&data[used..]);
    while let Ok(Decoded::Data(_)) = decoder.decode(&mut rest) {}
}

/// The head `head` goes to an instance with parses whole, as the same
/// method and target, with one `Host` and one framing: the gateway's own
/// for the body it forwards (never a client's `Content-Length` or
/// `Transfer-Encoding`, nor a `Connection` naming fields away).
fn forwarded(head: &Head, show: &dyn Fn() -> String) {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = head.method.clone();
    parts.uri = head.uri.clone();
    parts.version = head.version;
    parts.headers = head.headers.clone();
    // The body as the h1 server hands it on: none ends at once (and is
    // sent as an empty one), a length is known, chunks are streamed.
    let size = match head.body {
        BodyLength::None => BodySize::Empty,
        BodyLength::Length(n) => BodySize::Known(n),
        BodyLength::Chunked => BodySize::Unknown,
    };
    let written = crate::outbound::forward_head(parts, size, head.websocket);
    let mut slots = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut slots);
    assert_eq!(
        req.parse(&written),
        Ok(httparse::Status::Complete(written.len())),
        "forwarded {:?} from {:?}",
        written.escape_ascii().to_string(),
        show()
    );
    assert_eq!(req.method, Some(head.method.as_str()));
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    assert_eq!(req.path, Some(if target.is_empty() { "/" } else { target }));
    let named = |name: &str| values(req.headers, name);
    assert_eq!(named("host").len(), 1, "{:?}", show());
    let (lengths, codings) = (named("content-length"), named("transfer-encoding"));
    match size {
        BodySize::Known(n) => {
            assert_eq!(lengths, [n.to_string().as_bytes()], "{:?}", show());
            assert!(codings.is_empty(), "{:?}", show());
        }
        BodySize::Unknown => {
            assert!(lengths.is_empty(), "{:?}", show());
            assert_eq!(codings, [&b"chunked"[..]], "{:?}", show());
        }
        BodySize::Empty => {
            assert!(codings.is_empty() && lengths.len() <= 1, "{:?}", show());
            assert!(lengths.iter().all(|v| *v == b"0"), "{:?}", show());
        }
    }
    let connection = named("connection");
    if head.websocket {
        assert_eq!(connection, [&b"upgrade"[..]], "{:?}", show());
    } else {
        assert!(connection.is_empty(), "{:?}", show());
    }
}

/// The values of the fields named `name` (any case) of a parsed head.
fn values<'h>(fields: &[httparse::Header<'h>], name: &str) -> Vec<&'h [u8]> {
    fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
        .collect()
}

/// Where to split `len` bytes to feed them in two reads: around `used`
/// (the end of what a whole read took) and in the middle.
fn cuts(len: usize, used: usize) -> Vec<usize> {
    let mut cuts = vec![1, len / 2, used.saturating_sub(1), used, used + 1];
    cuts.retain(|&c| c > 0 && c < len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// A chunked body decodes to the same bytes, ending at the same place (or
/// failing the same way), whether it arrives at once, in pieces or a byte
/// at a time; and `data` sent in chunks as the gateway frames them
/// decodes back to itself.
pub fn chunked_body(data: &[u8]) {
    let whole = decode_in_pieces(data, &[]);
    let step = 1 + data.first().map_or(0, |&b| usize::from(b % 7));
    let pieces: Vec<usize> = (step..data.len()).step_by(step).collect();
    let bytes: Vec<usize> = (1..data.len()).collect();
    for cuts in [pieces, bytes] {
        let split = decode_in_pieces(data, &cuts);
        assert_eq!(
            split,
            whole,
            "fed in pieces at {cuts:?}: {:?}",
            data.escape_ascii().to_string()
        );
    }

    let mut framed = Vec::new();
    let mut sizes = Vec::new();
    for piece in data.chunks(step * 3) {
        chunked::chunk_head(&mut framed, piece.len());
        framed.extend_from_slice(piece);
        framed.extend_from_slice(b"\r\n");
        sizes.push(framed.len());
    }
    framed.extend_from_slice(chunked::LAST_CHUNK);
    framed.extend_from_slice(b"GET /");
    assert_eq!(
        decode_in_pieces(&framed, &sizes),
        Ok((data.to_vec(), true, b"GET /".to_vec())),
        "{:?}",
        framed.escape_ascii().to_string()
    );
}

type Decoding = Result<(Vec<u8>, bool, Vec<u8>), ChunkedError>;

/// `data` fed to one decoder in reads that end at `cuts` (ascending): the
/// body, whether it ended, and what follows it.
fn decode_in_pieces(data: &[u8], cuts: &[usize]) -> Decoding {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([data.len()]) {
        buf.extend_from_slice(&data[start..end]);
        start = end;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(piece) => {
                    assert!(!piece.is_empty(), "an empty piece of data");
                    body.extend_from_slice(&piece);
                }
                Decoded::NeedMore => {
                    assert!(buf.is_empty(), "more wanted with {} bytes left", buf.len());
                    break;
                }
                Decoded::Done => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&data[start..]);
                    return Ok((body, true, rest));
                }
            }
        }
    }
    Ok((body, false, Vec::new()))
}

/// An instance's response head, relayed, becomes a head the client parses
/// whole, with the same status and the instance's end-to-end fields as
/// sent, in order; the framing fields are the gateway's own, one of each
/// at most, and a length is announced only when the instance's body is
/// read by that length (never one beside a transfer coding).
pub fn response_head(data: &[u8]) {
    for head_only in [false, true] {
        let mut read = BytesMut::from(data);
        let Ok(Some((status, relayed, length))) = crate::outbound::relay_head(&mut read, head_only)
        else {
            continue;
        };
        let used = data.len() - read.len();
        let show = || data.escape_ascii().to_string();
        for cut in [used / 2, used - 1] {
            let part = crate::outbound::relay_head(&mut BytesMut::from(&data[..cut]), head_only);
            assert!(
                matches!(part, Ok(None)),
                "{cut} of {used} bytes: {:?}",
                show()
            );
        }

        let map = HeaderMap::new();
        let fields = HeadFields {
            map: &map,
            relayed: Some(&relayed),
        };
        let ex = Exchange {
            head: head_only,
            version: Version::HTTP_11,
            websocket: false,
        };
        // As `h1::Conn::response_head` frames it: the body an instance's
        // response gets knows its length when the instance gave one.
        let (framing, announced) =
            encode::framing_of(ex, status, fields, length == Some(0), length);
        let mut out = Out::default();
        encode::head(
            &mut out,
            Version::HTTP_11,
            status,
            fields,
            framing,
            announced,
            Then::KeepAlive,
        );
        let written = out.single().unwrap_or_default();
        let mut slots = [httparse::EMPTY_HEADER; 256];
        let mut res = httparse::Response::new(&mut slots);
        let parsed = res.parse(written);
        assert_eq!(
            parsed,
            Ok(httparse::Status::Complete(written.len())),
            "written {:?} from {:?}",
            written.escape_ascii().to_string(),
            show()
        );
        assert_eq!(res.code, Some(status.as_u16()));
        let named = |name: &str| values(res.headers, name);
        // The fields the connection speaks for, on both sides (`trailer`
        // among them, which a chunked head keeps).
        let framed_by = |name: &[u8]| {
            encode::REPLACED
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
        };
        let theirs: Vec<(&[u8], &[u8])> = relayed
            .sent()
            .filter(|(name, _)| !framed_by(name))
            .collect();
        let relayed_out: Vec<(&[u8], &[u8])> = res
            .headers
            .iter()
            .map(|h| (h.name.as_bytes(), h.value))
            .filter(|(name, _)| !framed_by(name))
            .take(theirs.len())
            .collect();
        assert_eq!(relayed_out, theirs, "{:?}", show());

        let lengths = named("content-length");
        assert!(lengths.len() <= 1, "{:?}", show());
        let sent_length = lengths.first().map(|v| {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
        });
        assert_eq!(sent_length, announced.map(Some), "{:?}", show());
        assert_eq!(
            named("transfer-encoding"),
            if framing == Framing::Chunked {
                vec![&b"chunked"[..]]
            } else {
                Vec::new()
            },
            "{:?}",
            show()
        );
        if !head_only && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED {
            match length {
                Some(n) => assert!(
                    announced == Some(n) || (n == 0 && announced.is_none()),
                    "read by {n} bytes, announced {announced:?}: {:?}",
                    show()
                ),
                None => assert!(
                    announced.is_none(),
                    "read by chunks or to the close, announced {announced:?}: {:?}",
                    show()
                ),
            }
        }
    }
}

/// A bearer token or a key set, however malformed, is refused with an
/// error, never a panic; a token that parses still fails against keys that
/// did not sign it.
pub fn token(data: &[u8]) {
    let _ = jwks::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = jws::parse(text, 8192) else {
        return;
    };
    let keys = jwks::parse(KEYS.as_bytes()).ok().map(|p| p.keys);
    let key = keys.as_ref().and_then(|k| k.get(&token.kid));
    if let Some(key) = key {
        assert!(
            token.verify(&key).is_err(),
            "a token verified against a key nobody holds: {text:?}"
        );
    }
}

/// Public keys of RFC 8037 (A.2) and RFC 7515 (A.3) whose private halves
/// the checks never use.
const KEYS: &str = r#"{"keys": [
    {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "alg": "EdDSA",
     "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
    {"kty": "EC", "crv": "P-256", "kid": "ec", "alg": "ES256",
     "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
     "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
]}"#;

/// xorshift64*: a fixed sequence from its seed, so that a failing test
/// fails the same way every run.
#[cfg(test)]
pub(crate) struct Rng(pub u64);

#[cfg(test)]
impl Rng {
    /// A number below `n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    //! The checks over seeds and deterministic mutations of them: what a
    //! short fuzzing run would try first, on stable and in every test run.

    use super::*;

    /// Bytes that matter to the parsers.
    const TOKENS: &[&[u8]] = &[
        b"\r\n",
        b"\r",
        b"\n",
        b"\t",
        b" ",
        b":",
        b";",
        b",",
        b"0",
        b"f",
        b"-",
        b"+",
        b"\0",
        b"\x7f",
        b"\x80",
        b"\"",
        b"=",
        b"chunked",
        b"content-length: ",
        b"transfer-encoding: ",
        b"connection: close, content-length\r\n",
        b"0\r\n\r\n",
        b"\r\n\r\n",
        b"ffffffffffffffff",
        b"HTTP/1.0",
        b".",
        b"e30",
    ];

    fn mutate(rng: &mut Rng, seeds: &[&[u8]]) -> Vec<u8> {
        let mut v = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..=rng.below(4) {
            let at = rng.below(v.len() + 1);
            match rng.below(6) {
                0 if at < v.len() => v[at] ^= 1 << rng.below(8),
                1 => {
                    let t = TOKENS[rng.below(TOKENS.len())];
                    v.splice(at..at, t.iter().copied());
                }
                2 if at < v.len() => {
                    let end = (at + 1 + rng.below(8)).min(v.len());
                    v.drain(at..end);
                }
                3 if at < v.len() => {
                    let end = (at + 1 + rng.below(16)).min(v.len());
                    let copy = v[at..end].to_vec();
                    v.splice(at..at, copy);
                }
                4 if at < v.len() => {
                    let t = TOKENS[rng.below(TOKENS.len())];
                    let end = (at + t.len()).min(v.len());
                    v.splice(at..end, t.iter().copied());
                }
                _ => {
                    let other = seeds[rng.below(seeds.len())];
                    let from = rng.below(other.len());
                    v.truncate(at);
                    v.extend_from_slice(&other[from..]);
                }
            }
        }
        v
    }

    /// Each check's mutations: `FLOTILLA_FUZZ_ROUNDS` (default 5 000,
    /// about a tenth of a second each) for a longer run without the fuzzer,
    /// `FLOTILLA_FUZZ_SEED` for another sequence.
    fn run(check: fn(&[u8]), seeds: &[&[u8]]) {
        let env = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let rounds = env("FLOTILLA_FUZZ_ROUNDS", 5_000);
        let mut rng = Rng(env("FLOTILLA_FUZZ_SEED", 0x9e37_79b9_7f4a_7c15) | 1);
        for seed in seeds {
            check(seed);
        }
        for _ in 0..rounds {
            check(&mutate(&mut rng, seeds));
        }
    }

    const REQUESTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /o?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx: y\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"PUT / HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2, 2\r\nExpect: 100-continue\r\n\r\nab",
        b"\r\nGET http://a/b HTTP/1.1\r\nx-v: a\x80b\r\nauthorization: Bearer e30.e30.e30\r\n\r\n",
        b"GET /%61dmin//x/./y%2e%2E/%2Fz?q=%61 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a.example/caf\xc3\xa9/%7e%41 HTTP/1.1\r\nhost: b\r\n\r\n",
    ];

    #[test]
    fn request_heads_hold() {
        run(request_head, REQUESTS);
    }

    const BODIES: &[&[u8]] = &[
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;a=b\r\nhello\r\nA \t; x\r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\nGET",
        b"0\r\n\r\n",
        b"1\r\n\r\r\n0\r\n\r\n",
        b"",
    ];

    #[test]
    fn chunked_bodies_hold() {
        run(chunked_body, BODIES);
    }

    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nDate: x\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive, x-b\r\nKeep-Alive: 5\r\nX-B: 2\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: \"a\"\r\nContent-Length: 9\r\n\r\n",
        b"HTTP/1.1 404 Nope\r\ncontent-length: 0\r\nset-cookie: a=b\r\nset-cookie: c=d\r\n\r\n",
    ];

    #[test]
    fn relayed_response_heads_hold() {
        run(response_head, RESPONSES);
    }

    const TOKENS_SEEDS: &[&[u8]] = &[
        b"eyJhbGciOiJFZERTQSIsImtpZCI6ImVkIn0.eyJzdWIiOiJ1In0.c2ln",
        b"eyJhbGciOiJFUzI1NiIsImtpZCI6ImVjIiwidHlwIjoiSldUIn0.e30.AAAA",
        b"eyJhbGciOiJub25lIn0.e30.",
        KEYS.as_bytes(),
    ];

    #[test]
    fn tokens_and_key_sets_hold() {
        run(token, TOKENS_SEEDS);
    }
}
