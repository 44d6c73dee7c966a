//! Request body framing: a `Content-Length` count or the chunked coding,
//! decoded in place over the connection's read buffer (data is split off
//! as `Bytes`, never copied).
//!
//! Chunked decoding is `crate::chunked`'s, the one the upstream client uses
//! for responses: one strict decoder to audit for request smuggling (CRLF
//! only, sizes of at most 16 hex digits, nothing after a size but an
//! extension).

use bytes::BytesMut;

use crate::chunked::{ChunkedDecoder, ChunkedError, Decoded};

#[derive(Debug, Clone)]
pub(crate) enum Decoder {
    /// `Content-Length`: this many bytes still to come.
    Length(u64),
    Chunked(ChunkedDecoder),
}

impl Decoder {
    /// The next piece of the body from `buf`, `NeedMore` when `buf` holds
    /// no more of it, or `Done` at its end (leaving what follows).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        match self {
            Decoder::Length(0) => Ok(Decoded::Done),
            Decoder::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(*left).map_or(buf.len(), |l| l.min(buf.len()));
                *left -= n as u64;
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Decoder::Chunked(chunked) => chunked.decode(buf),
        }
    }

    /// The body's remaining length, when it is known.
    pub(crate) fn left(&self) -> Option<u64> {
        match self {
            Decoder::Length(n) => Some(*n),
            Decoder::Chunked(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything `input` decodes to, with what is left after the body.
    fn decode_all(mut d: Decoder, input: &[u8]) -> Result<(Vec<u8>, bool, Vec<u8>), ChunkedError> {
        crate::chunked::drain(|buf| d.decode(buf), input)
    }

    #[test]
    fn length_counts_down_across_reads() {
        let mut d = Decoder::Length(5);
        let mut buf = BytesMut::from("abc");
        assert_eq!(d.decode(&mut buf), Ok(Decoded::Data("abc".into())));
        assert_eq!(d.left(), Some(2));
        assert_eq!(d.decode(&mut buf), Ok(Decoded::NeedMore));
        let mut buf = BytesMut::from("defGET");
        assert_eq!(d.decode(&mut buf), Ok(Decoded::Data("de".into())));
        assert_eq!(d.decode(&mut buf), Ok(Decoded::Done));
        assert_eq!(&buf[..], b"fGET");
    }

    #[test]
    fn chunked_request_bodies_decode_and_leave_the_next_request() {
        let body = b"5\r\nhello\r\n6;name=\"v\"\r\n world\r\nA \t; x\r\n0123456789\r\n0\r\nx-sum: 1\r\n\r\nGET /next";
        let decoded = decode_all(Decoder::Chunked(ChunkedDecoder::default()), body);
        assert_eq!(
            decoded,
            Ok((
                b"hello world0123456789".to_vec(),
                true,
                b"GET /next".to_vec()
            ))
        );
        // Cut anywhere, it waits for more.
        for cut in 0..body.len() - 10 {
            let (data, done, _) =
                decode_all(Decoder::Chunked(ChunkedDecoder::default()), &body[..cut])
                    .unwrap_or_default();
            assert!(!done, "{cut}");
            assert!(b"hello world0123456789".starts_with(&data), "{cut}");
        }
    }

    #[test]
    fn bad_chunk_sizes_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"+5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
            b"5 5\r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\rx\r\n",
            b"10000000000000000\r\n",
            b"5\r\nhelloXX",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\n",
        ] {
            let decoded = decode_all(Decoder::Chunked(ChunkedDecoder::default()), bad);
            assert!(
                decoded.is_err(),
                "{:?}: {decoded:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
