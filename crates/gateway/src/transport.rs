//! What the HTTP/1 driver (`h1`) reads a client connection from and writes
//! it to: the TCP socket itself, or a TLS stream over it once the gateway
//! terminates TLS (`tls`).
//!
//! An enum rather than a type parameter of the driver: compiled once per
//! transport, the driver's small per-request helpers (response framing,
//! the body encoder) each had two callers, and LLVM stopped inlining them
//! into either copy: +118 instructions per plain request (`instructions.sh`,
//! gw-plain; +142 with JWT), where the enum costs +43 (+54): a branch per
//! read and write, and a larger connection. The plain socket
//! keeps the readiness calls it was tuned with: reads straight into the
//! buffer's spare room, a read that drains the socket forgetting its
//! readiness at once, one `write`/`writev` per flush. A TLS stream goes
//! through rustls, which buffers both ways, so it also needs a flush after
//! writing and a `close_notify` before the lingering close. Boxed: a
//! rustls session is over a kilobyte, and a plain connection's task should
//! not carry that room.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::conn;

/// How long a closing TLS connection may take to send its `close_notify`.
const CLOSE_NOTIFY: Duration = Duration::from_secs(1);

/// What is written in one call: one buffer, or several at once.
#[derive(Clone, Copy)]
pub(crate) enum Bufs<'a> {
    One(&'a [u8]),
    Many(&'a [IoSlice<'a>]),
}

/// A client connection's byte stream.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl From<TcpStream> for Transport {
    fn from(stream: TcpStream) -> Transport {
        Transport::Tcp(stream)
    }
}

impl From<TlsStream<TcpStream>> for Transport {
    fn from(stream: TlsStream<TcpStream>) -> Transport {
        Transport::Tls(Box::new(stream))
    }
}

impl Transport {
    /// Reads what is available into `buf`, with at least `spare` bytes of
    /// room made first; `Ok(0)` when the client has closed.
    pub(crate) fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        spare: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Transport::Tcp(stream) => poll_read_tcp(stream, cx, buf, spare),
            Transport::Tls(stream) => {
                if buf.capacity() - buf.len() < spare {
                    buf.reserve(spare);
                }
                tokio_util::io::poll_read_buf(Pin::new(stream.as_mut()), cx, buf)
            }
        }
    }

    /// Writes some of `bufs`; how many bytes were taken. Over TLS, rustls
    /// takes them into its records and sends what the socket accepts;
    /// [`Transport::poll_flush_held`] sends the rest. Always inlined into
    /// the driver's flush, as the socket's own calls were before there was
    /// TLS (LLVM would not, and left ~40 instructions per request of call).
    #[inline(always)]
    pub(crate) fn poll_write_bufs(
        &mut self,
        cx: &mut Context<'_>,
        bufs: Bufs<'_>,
    ) -> Poll<io::Result<usize>> {
        match self {
            Transport::Tcp(stream) => loop {
                ready!(stream.poll_write_ready(cx))?;
                let written = match bufs {
                    Bufs::One(bytes) => stream.try_write(bytes),
                    Bufs::Many(slices) => stream.try_write_vectored(slices),
                };
                match written {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return Poll::Ready(other),
                }
            },
            Transport::Tls(stream) => match bufs {
                Bufs::One(bytes) => Pin::new(stream.as_mut()).poll_write(cx, bytes),
                Bufs::Many(slices) => Pin::new(stream.as_mut()).poll_write_vectored(cx, slices),
            },
        }
    }

    /// Sends on what the transport itself still holds of what was written
    /// (a plain socket holds nothing: the kernel has it all).
    pub(crate) fn poll_flush_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Tcp(_) => Poll::Ready(Ok(())),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    /// Ends the connection: over TLS a `close_notify` first (so the client
    /// can tell the end of the stream from a cut connection), then the
    /// socket's lingering close (`conn::linger`).
    pub(crate) async fn close(&mut self) {
        match self {
            Transport::Tcp(stream) => conn::linger(stream).await,
            Transport::Tls(stream) => {
                let _ = tokio::time::timeout(CLOSE_NOTIFY, stream.shutdown()).await;
                conn::linger(stream.get_ref().0).await;
            }
        }
    }
}

/// Reads what the socket has into `buf`'s spare room.
fn poll_read_tcp(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    spare: usize,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < spare {
            buf.reserve(spare);
        }
        let room = buf.capacity() - buf.len();
        // A read that does not fill the buffer drained the socket (epoll is
        // edge-triggered): its readiness is forgotten, as tokio's own
        // `poll_read` does, rather than learnt from one more `recv` failing
        // with EAGAIN on every request. It must be the readiness seen
        // *before* the read: `try_io` takes it before running its closure
        // and forgets it only if the closure says `WouldBlock`, so the read
        // runs inside and says so once it has drained the socket. Forgetting
        // the readiness current after the read (as a second `try_io` did)
        // would also forget bytes that arrived in between, and the
        // connection would wait for more that may never come.
        let mut drained = None;
        let read = stream.try_io(Interest::READABLE, || {
            // Into the uninitialised spare room directly: no zeroing.
            let n = stream.try_read_buf(buf)?;
            if n > 0 && n < room {
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        if let Some(n) = drained {
            return Poll::Ready(Ok(n));
        }
        match read {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}
