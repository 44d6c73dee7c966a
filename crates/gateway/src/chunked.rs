//! HTTP/1.1 chunked transfer coding (RFC 9112 §7.1): an incremental,
//! strict decoder over a connection's read buffer, and the encoder's
//! framing.
//!
//! Strict because a gateway that reads a chunked message differently from
//! the server behind it is the classic request-smuggling hole: only CRLF
//! ends a line (a bare LF is an error), a size is 1–16 hex digits, and
//! anything after a size other than whitespace and a `;` extension is an
//! error. Extensions are skipped; trailer fields are read and dropped.
//!
//! Neither counts toward a body's size, so each has a cap of its own per
//! body, not per line: 4 KiB of extensions on every 1-byte chunk would
//! otherwise be ~4 GiB read under a 1 MiB body limit (as Node's
//! CVE-2024-22019, which Node closed with the same 16 KiB cap).

use bytes::{Buf, Bytes, BytesMut};

/// The most trailer-section bytes accepted.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// The longest chunk-size line (size and extensions) accepted.
const MAX_SIZE_LINE: usize = 4096;
/// The most chunk-extension bytes accepted in one body, all its size
/// lines together: what follows each size on its line (whitespace, `;`,
/// names and values), up to its CRLF.
const MAX_EXTENSION_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkedError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size line too long")]
    SizeLineTooLong,
    #[error("too many chunk extension bytes in one body")]
    ExtensionsTooLong,
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    #[error("invalid or oversized trailer section")]
    Trailer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the size: `digits` read so far, `value` their value.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size: whitespace up to `;` or CR.
    SizeBws,
    /// After `;`: extensions (skipped) up to CR.
    Extension,
    /// CR seen after the size line; LF must follow.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// Trailer lines: `line` bytes of the current line so far.
    Trailer {
        line: usize,
    },
    TrailerLf {
        line: usize,
    },
    Done,
}

/// What [`ChunkedDecoder::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    Data(Bytes),
    /// The buffer holds no more of the message; read more.
    NeedMore,
    /// The last chunk and the trailers have been read.
    Done,
}

#[derive(Debug, Clone)]
pub(crate) struct ChunkedDecoder {
    state: State,
    line_bytes: usize,
    /// Chunk-extension bytes of the whole body; never reset, as
    /// `trailer_bytes` is not: the cap is per body.
    extension_bytes: usize,
    trailer_bytes: usize,
    /// The size of the chunk being read, kept for the size-line state.
    pending: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
            line_bytes: 0,
            extension_bytes: 0,
            trailer_bytes: 0,
            pending: 0,
        }
    }
}

impl ChunkedDecoder {
    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes framing from `buf` and returns the next piece of data (split
    /// off `buf` without copying), `NeedMore` when `buf` is exhausted, or
    /// `Done` at the end of the message (leaving any bytes after it).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        loop {
            if let State::Data { remaining } = self.state {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let data = buf.split_to(n).freeze();
                let left = remaining - n as u64;
                self.state = if left == 0 {
                    State::DataCr
                } else {
                    State::Data { remaining: left }
                };
                return Ok(Decoded::Data(data));
            }
            if self.state == State::Done {
                return Ok(Decoded::Done);
            }
            let Some(&byte) = buf.first() else {
                return Ok(Decoded::NeedMore);
            };
            buf.advance(1);
            self.step(byte)?;
        }
    }

    fn step(&mut self, byte: u8) -> Result<(), ChunkedError> {
        match self.state {
            State::Size { value, digits } => {
                self.line_bytes += 1;
                if let Some(d) = (byte as char).to_digit(16) {
                    if digits >= 16 {
                        return Err(ChunkedError::Size);
                    }
                    self.state = State::Size {
                        value: (value << 4) | u64::from(d),
                        digits: digits + 1,
                    };
                } else if digits == 0 {
                    return Err(ChunkedError::Size);
                } else {
                    self.pending = value;
                    if byte != b'\r' {
                        self.extension_byte()?;
                    }
                    self.state = match byte {
                        b'\r' => State::SizeLf { value },
                        b' ' | b'\t' => State::SizeBws,
                        b';' => State::Extension,
                        _ => return Err(ChunkedError::Size),
                    };
                }
            }
            State::SizeBws => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_SIZE_LINE {
                    return Err(ChunkedError::SizeLineTooLong);
                }
                if byte != b'\r' {
                    self.extension_byte()?;
                }
                self.state = match byte {
                    b'\r' => State::SizeLf {
                        value: self.pending,
                    },
                    b' ' | b'\t' => State::SizeBws,
                    b';' => State::Extension,
                    _ => return Err(ChunkedError::Size),
                };
            }
            State::Extension => {
                self.line_bytes += 1;
                if self.line_bytes > MAX_SIZE_LINE {
                    return Err(ChunkedError::SizeLineTooLong);
                }
                if byte != b'\r' {
                    self.extension_byte()?;
                }
                match byte {
                    b'\r' => {
                        self.state = State::SizeLf {
                            value: self.pending,
                        }
                    }
                    b'\n' => return Err(ChunkedError::Size),
                    _ => {}
                }
            }
            State::SizeLf { value } => {
                if byte != b'\n' {
                    return Err(ChunkedError::Size);
                }
                self.line_bytes = 0;
                self.state = if value == 0 {
                    State::Trailer { line: 0 }
                } else {
                    State::Data { remaining: value }
                };
            }
            State::DataCr => {
                if byte != b'\r' {
                    return Err(ChunkedError::DataEnd);
                }
                self.state = State::DataLf;
            }
            State::DataLf => {
                if byte != b'\n' {
                    return Err(ChunkedError::DataEnd);
                }
                self.state = State::Size {
                    value: 0,
                    digits: 0,
                };
            }
            State::Trailer { line } => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > MAX_TRAILER_BYTES {
                    return Err(ChunkedError::Trailer);
                }
                self.state = match byte {
                    b'\r' => State::TrailerLf { line },
                    b'\n' => return Err(ChunkedError::Trailer),
                    _ => State::Trailer { line: line + 1 },
                };
            }
            State::TrailerLf { line } => {
                if byte != b'\n' {
                    return Err(ChunkedError::Trailer);
                }
                self.state = if line == 0 {
                    State::Done
                } else {
                    State::Trailer { line: 0 }
                };
            }
            State::Data { .. } | State::Done => {}
        }
        Ok(())
    }

    /// Counts one byte of a chunk extension against the body's cap.
    fn extension_byte(&mut self) -> Result<(), ChunkedError> {
        self.extension_bytes += 1;
        if self.extension_bytes > MAX_EXTENSION_BYTES {
            return Err(ChunkedError::ExtensionsTooLong);
        }
        Ok(())
    }
}

/// The line that starts a chunk of `len` bytes.
pub(crate) fn chunk_head(out: &mut Vec<u8>, len: usize) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{len:x}\r\n");
}

/// The last chunk with no trailers.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Runs a body decoder's `step` over `input` until it needs more or is
/// done: the body's bytes, whether it ended, and what is left after it.
/// For the tests of this decoder and of the HTTP/1 server's.
#[cfg(test)]
pub(crate) fn drain(
    mut step: impl FnMut(&mut BytesMut) -> Result<Decoded, ChunkedError>,
    input: &[u8],
) -> Result<(Vec<u8>, bool, Vec<u8>), ChunkedError> {
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    loop {
        match step(&mut buf)? {
            Decoded::Data(b) => out.extend_from_slice(&b),
            Decoded::NeedMore => return Ok((out, false, buf.to_vec())),
            Decoded::Done => return Ok((out, true, buf.to_vec())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, bool, Vec<u8>), ChunkedError> {
        let mut d = ChunkedDecoder::default();
        drain(|buf| d.decode(buf), input)
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        let msg =
            b"5\r\nhello\r\n6;name=val\r\n world\r\nA \r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let (data, done, rest) = decode_all(msg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(data, b"hello world0123456789");
        assert!(done);
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn decodes_byte_by_byte() {
        let msg = b"3\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for b in msg {
            buf.extend_from_slice(&[*b]);
            loop {
                match d.decode(&mut buf) {
                    Ok(Decoded::Data(x)) => out.extend_from_slice(&x),
                    Ok(Decoded::NeedMore) => break,
                    Ok(Decoded::Done) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(out, b"abc");
        assert!(d.is_done());
    }

    #[test]
    fn refuses_what_a_lenient_parser_would_read_differently() {
        for bad in [
            &b"\r\n"[..],             // no size
            b"x\r\n",                 // not hex
            b"-1\r\n",                // sign
            b"3\nabc\r\n",            // bare LF after the size
            b"3\r\nabcd\r\n",         // data longer than its size
            b"3\r\nabc\n0\r\n\r\n",   // bare LF after data
            b"11111111111111111\r\n", // 17 digits
            b"3 x\r\nabc\r\n",        // junk after the size
            b"0\r\nx: 1\n\r\n",       // bare LF in a trailer
            b"3;ext\nabc",            // bare LF after an extension
        ] {
            assert!(
                decode_all(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn oversized_trailers_are_refused() {
        let mut msg = b"0\r\n".to_vec();
        for _ in 0..2000 {
            msg.extend_from_slice(b"x-trailer: 123456\r\n");
        }
        msg.extend_from_slice(b"\r\n");
        assert_eq!(decode_all(&msg).err(), Some(ChunkedError::Trailer));
    }

    /// `chunks` 1-byte chunks, each with `ext` bytes of extension after
    /// its size (`;` and a name), then the last chunk.
    fn with_extensions(chunks: usize, ext: usize) -> Vec<u8> {
        let mut msg = Vec::new();
        for _ in 0..chunks {
            msg.extend_from_slice(b"1;");
            msg.extend(std::iter::repeat_n(b'e', ext - 1));
            msg.extend_from_slice(b"\r\nx\r\n");
        }
        msg.extend_from_slice(b"0\r\n\r\n");
        msg
    }

    #[test]
    fn chunk_extensions_are_capped_per_body_not_per_line() {
        // Each line well under the line cap, the body's total over its
        // own: refused, however short each chunk is.
        let long = with_extensions(5, 4000);
        assert_eq!(
            decode_all(&long).err(),
            Some(ChunkedError::ExtensionsTooLong)
        );
        let many = with_extensions(2000, 10);
        assert_eq!(
            decode_all(&many).err(),
            Some(ChunkedError::ExtensionsTooLong)
        );
        // Up to the cap exactly, the body is read.
        let (data, done, _) = decode_all(&with_extensions(8, MAX_EXTENSION_BYTES / 8))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(done);
        assert_eq!(data, b"xxxxxxxx");
        // One byte more (after the first `1;`) is not.
        let mut one_more = with_extensions(8, MAX_EXTENSION_BYTES / 8);
        one_more.insert(2, b'e');
        assert_eq!(
            decode_all(&one_more).err(),
            Some(ChunkedError::ExtensionsTooLong)
        );
        // Whitespace after a size is part of its extension (RFC 9112's
        // `chunk-ext` begins with BWS), and counted too.
        let mut spaced = Vec::new();
        for _ in 0..5 {
            spaced.extend_from_slice(b"1");
            spaced.extend(std::iter::repeat_n(b' ', 4000));
            spaced.extend_from_slice(b"\r\nx\r\n");
        }
        spaced.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(
            decode_all(&spaced).err(),
            Some(ChunkedError::ExtensionsTooLong)
        );
    }

    #[test]
    fn encodes_chunk_heads() {
        let mut out = Vec::new();
        chunk_head(&mut out, 255);
        assert_eq!(out, b"ff\r\n");
    }
}
