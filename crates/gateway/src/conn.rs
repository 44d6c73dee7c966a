//! One client connection's socket, watched: slow-client and idle timeouts
//! that answer instead of just hanging up, and a lingering close so that
//! the answer is actually read.
//!
//! hyper's own `header_read_timeout` closes the connection without a word,
//! and its clock also runs while a kept-alive connection is idle, so it
//! cannot tell "idle" from "slow". Here the socket itself notes when the
//! first byte of a request head arrives and when a request is handed to the
//! service; a watchdog beside the connection then:
//!
//! - answers **408** and closes when a head has been arriving for longer
//!   than `header_read_timeout` (a slowloris client);
//! - closes silently when a kept-alive connection has been idle for
//!   `idle_timeout` (nothing is in progress, so nothing to answer).
//!
//! When a connection ends with the client still sending (a head over the
//! size limit answered with 431, a body refused with 413), closing at once
//! would make the kernel reset the connection and the client could lose the
//! answer. So the write side is shut first and what the client still sends
//! is read and dropped for a moment (as nginx's `lingering_close` does).
//!
//! HTTP/2 connections (which start with the h2 preface) are left to h2's own
//! flow control; the watchdog only handles HTTP/1. Today hyper serves only
//! h2c connections, so for them the watchdog just lingers: HTTP/1 is served
//! by the gateway's own driver (`h1`), which applies the same timeouts
//! itself and shares [`linger`]. HTTP/2 over TLS is served by hyper without
//! a watchdog (`Watch::detached`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// At most this much is read and dropped while lingering.
const LINGER_BYTES: usize = 1024 * 1024;
/// How long writing a last answer (a 408) may take.
const WRITE_PLAIN: Duration = Duration::from_secs(1);

/// How an HTTP/2 connection starts (the first line of its preface).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What the socket and the service tell the watchdog.
#[derive(Debug)]
pub(crate) struct Watch {
    epoch: Instant,
    /// Millis since `epoch` (+1) when the current head started; 0: none.
    head_started: AtomicU64,
    /// Requests handed to the service whose responses are not done.
    in_request: AtomicU64,
    /// Millis since `epoch` of the last byte read or request finished.
    last_activity: AtomicU64,
    h2: AtomicBool,
    seen_bytes: AtomicBool,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            epoch: Instant::now(),
            head_started: AtomicU64::new(0),
            in_request: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            seen_bytes: AtomicBool::new(false),
        }
    }

    /// A watch nobody reads: for connections without a watchdog (HTTP/2
    /// over TLS), whose requests still mark themselves in one.
    pub(crate) fn detached() -> Arc<Watch> {
        Arc::new(Watch::new())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn read(&self, bytes: &[u8]) {
        let now = self.now_ms();
        self.last_activity.store(now, Ordering::Relaxed);
        if !self.seen_bytes.swap(true, Ordering::Relaxed) && bytes.starts_with(H2_PREFACE) {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_request.load(Ordering::Acquire) == 0 {
            // Only the first byte of a head starts its clock.
            let _ = self
                .head_started
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// A request head was complete and handed to the service.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_request.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(0, Ordering::Release);
        RequestGuard(Arc::clone(self))
    }
}

/// Ends a request in [`Watch`] when the response body is done.
#[derive(Debug)]
pub(crate) struct RequestGuard(Arc<Watch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        self.0.last_activity.store(now, Ordering::Relaxed);
        self.0.in_request.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The socket as hyper sees it; shared with the watchdog, which may still
/// need to write a 408 and linger after hyper is gone.
pub(crate) struct Io {
    stream: Arc<TcpStream>,
    watch: Arc<Watch>,
    /// Bytes read before the connection was handed over (to tell HTTP/2
    /// from HTTP/1); hyper reads them first.
    prefix: Bytes,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let this = self.get_mut();
            let n = this.prefix.len().min(buf.remaining());
            let head = this.prefix.split_to(n);
            buf.put_slice(&head);
            this.watch.read(&head);
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            let before = buf.filled().len();
            // Into the uninitialised part directly (`ReadBuf` is a `BufMut`):
            // zeroing hyper's read buffer on every read costs measurably.
            match self.stream.try_read_buf(buf) {
                Ok(n) => {
                    if n > 0 {
                        self.watch.read(&buf.filled()[before..]);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The lingering close after hyper is done does the real work; a
        // write shutdown here just sends the FIN early.
        let _ = shutdown_write(&self.stream);
        Poll::Ready(Ok(()))
    }
}

fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write)
}

/// Wraps `stream`, of which `read` was already read, for hyper; the
/// returned handle runs the watchdog.
pub(crate) fn watch(stream: TcpStream, read: Bytes) -> (Io, Watched) {
    let stream = Arc::new(stream);
    let watch = Arc::new(Watch::new());
    (
        Io {
            stream: Arc::clone(&stream),
            watch: Arc::clone(&watch),
            prefix: read,
        },
        Watched { stream, watch },
    )
}

/// Why the watchdog ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    HeadTimeout,
    Idle,
}

/// The watchdog's side of a connection.
pub(crate) struct Watched {
    stream: Arc<TcpStream>,
    pub watch: Arc<Watch>,
}

impl Watched {
    /// Resolves when the connection has overstayed; never, for HTTP/2.
    pub(crate) async fn expired(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Verdict {
        let w = &self.watch;
        loop {
            let now = w.now_ms();
            let head = w.head_started.load(Ordering::Acquire);
            let busy = w.in_request.load(Ordering::Acquire) > 0;
            let h2 = w.h2.load(Ordering::Relaxed);
            let header_ms = header_timeout.as_millis() as u64;
            let idle_ms = idle_timeout.as_millis() as u64;
            // A head may start while we sleep: look again within a
            // quarter of the head timeout, so a 408 is at most 25 % late.
            let poll_ms = (header_ms / 4).max(10);
            let wake_in = if h2 || busy {
                poll_ms
            } else if head != 0 {
                if now >= head + header_ms {
                    return Verdict::HeadTimeout;
                }
                head + header_ms - now
            } else {
                let last = w.last_activity.load(Ordering::Relaxed);
                if now >= last + idle_ms {
                    return Verdict::Idle;
                }
                (last + idle_ms - now).min(poll_ms)
            };
            tokio::time::sleep(Duration::from_millis(wake_in.max(10))).await;
        }
    }

    /// Writes a 408 (best effort: the client may be gone).
    pub(crate) async fn send_408(&self) {
        const BODY: &str = r#"{"error":{"code":"request_timeout","message":"the request headers took too long to arrive","request_id":""}}"#;
        let response = format!(
            "HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: application/json\r\nserver: flotilla\r\ncontent-length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        write_plain(&self.stream, response.as_bytes()).await;
    }

    /// Shuts the write side and drains what the client still sends, so
    /// closing does not reset a connection whose last answer is unread.
    pub(crate) async fn linger(self) {
        linger(&self.stream).await;
    }
}

/// Writes `bytes` to a connection that is about to close, best effort: the
/// client may be gone or not reading, so this gives up after a moment.
pub(crate) async fn write_plain(stream: &TcpStream, bytes: &[u8]) {
    let write = async {
        let mut rest = bytes;
        while !rest.is_empty() {
            stream.writable().await?;
            match stream.try_write(rest) {
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(WRITE_PLAIN, write).await;
}

/// Shuts the write side of `stream` and reads and drops what the client
/// still sends, for a moment: closing a socket with unread input resets
/// the connection, and the client could lose the answer it has not read.
pub(crate) async fn linger(stream: &TcpStream) {
    let _ = shutdown_write(stream);
    let drain = async {
        // On the heap, and only here: a 16 KiB array in this future would
        // make every connection's task (which contains it) 16 KiB larger
        // from its first byte.
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0;
        while total < LINGER_BYTES {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
