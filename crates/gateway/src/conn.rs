//! The client side of an HTTP/2 connection as hyper sees it, watched for
//! idleness and for bodies that stall either way; and the lingering close
//! every connection ends with.
//!
//! hyper's HTTP/2 server has no idle timeout: a client could open
//! connections, make a request or none, and keep them forever, each a
//! socket and a task. So each h2 connection (h2c, or h2 over TLS) keeps a
//! [`Watch`]: requests in progress and the time the last one finished (or
//! the connection began). Once no request has been in progress for
//! `idle_timeout`, the connection is told to go away (GOAWAY)
//! and closes, as nginx closes an idle HTTP/2 connection; a long request or
//! a slow response stream keeps it open. (HTTP/1 is served by the gateway's
//! own driver, `h1`, which applies its idle and slow-head timeouts itself.)
//! The watch also counts the streams begun, and says when the connection
//! has carried `max_connection_requests` ([`Watch::spent`]): it is then
//! told to go away as an idle one is, its streams in progress finishing.
//!
//! A client that stops reading a response keeps its stream's flow-control
//! window shut, and hyper then stops asking the body for more: nothing on
//! the stream ever times out, and the response holds its place in flight
//! and its instance connection for ever. So each response body is
//! [`Paced`]: it tells the watch when the client is what the stream waits
//! for (the body gave data and has not been asked again), and a stream
//! that waits on the client for `body_timeout` is reset (`RST_STREAM`
//! `CANCEL`) while the connection's other streams go on, as Envoy's
//! per-stream idle timeout does. A browser multiplexes a whole page over one
//! connection, so closing it for one unread download (nginx's
//! `send_timeout`) would fail every other request of that page. hyper has no
//! call to reset a stream, and a stream waiting for window is not polled;
//! but it spawns each stream's task through the connection's executor, so
//! [`StreamExecutor`] spawns it abortable and lends the abort handle to the
//! body (a tokio task-local, set while the stream's task is polled).
//! Dropping the task drops the stream's handles, which h2 answers with the
//! reset. Only a body polled outside such a task (none is) would still
//! close its connection. (A body waiting on its instance is the instance's
//! `body_timeout`, in `outbound`.)
//!
//! A client may also stop sending a request body it began: the stream
//! then holds its place in flight and an instance connection for as long
//! as the route's `timeout` (a day, for an upload route). So a request
//! body still to come is [`Paused`]: once whoever reads it (the proxy,
//! streaming it on or buffering it) has waited `body_timeout` for its next
//! frame, it fails with [`BodyStalled`], which the proxy answers with 408,
//! as h1's connection does for HTTP/1. A reader busy elsewhere (an
//! instance slow to take what it was given) is not waiting, and its time
//! does not count.
//!
//! When a connection ends with the client still sending (a head over the
//! size limit answered with 431, a body refused with 413), closing at once
//! would make the kernel reset the connection and the client could lose the
//! answer. So the write side is shut first and what the client still sends
//! is read and dropped for a moment ([`linger`], as nginx's
//! `lingering_close` does).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{AbortHandle, Abortable};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use crate::body::{Body, BodyStalled, BoxError};
use crate::clock;

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// At most this much is read and dropped while lingering.
const LINGER_BYTES: usize = 1024 * 1024;
/// How long writing a last answer (`https_required`) may take.
const WRITE_PLAIN: Duration = Duration::from_secs(1);

/// How an HTTP/2 connection starts (the first line of its preface).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What an HTTP/2 connection's socket and requests tell its idle timer.
#[derive(Debug)]
pub(crate) struct Watch {
    epoch: Instant,
    /// Requests handed to the service whose responses are not done.
    in_request: AtomicU64,
    /// Millis since `epoch` (+1) the last request finished; 0 for none.
    last_activity: AtomicU64,
    /// Each response body's [`Paced`] clock.
    bodies: Mutex<Vec<Weak<Pacing>>>,
    /// Streams begun (requests handed to the connection's service).
    begun: AtomicU64,
    /// Streams that spend the connection (`max_connection_requests`);
    /// `u64::MAX`: no limit.
    max_streams: u64,
    /// Told once `begun` reaches `max_streams`.
    spent: Notify,
}

/// A response body's wait on the client, and how to reset its stream.
#[derive(Debug)]
struct Pacing {
    /// When the body last gave data (millis since the watch's epoch, +1),
    /// until it is asked again; 0 when not waiting on the client.
    since: AtomicU64,
    /// Aborts the stream's task (`StreamExecutor`); `None` for a body
    /// polled outside one, whose stall closes the connection instead.
    stream: Option<AbortHandle>,
}

tokio::task_local! {
    /// The abort handle of the HTTP/2 stream whose task is being polled.
    static STREAM: AbortHandle;
}

/// hyper's executor for an HTTP/2 server connection: each stream's task
/// is spawned [`Abortable`], its handle in the task-local `STREAM` for the
/// response body to take ([`Watch::pace`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StreamExecutor;

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let (handle, registration) = AbortHandle::new_pair();
        let task = Abortable::new(fut, registration);
        tokio::spawn(STREAM.scope(handle, async move {
            // Aborted: the stream's handles are dropped with `fut`.
            let _ = task.await;
        }));
    }
}

impl Watch {
    /// A watch for a connection that is spent once `max_streams` streams
    /// have begun (`u64::MAX`: never).
    pub(crate) fn new(max_streams: u64) -> Arc<Watch> {
        Arc::new(Watch {
            epoch: Instant::now(),
            in_request: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            bodies: Mutex::new(Vec::new()),
            begun: AtomicU64::new(0),
            max_streams,
            spent: Notify::new(),
        })
    }

    /// A stream began (a request reached the connection's service).
    pub(crate) fn stream_begun(&self) {
        if self.begun.fetch_add(1, Ordering::Relaxed) + 1 == self.max_streams {
            self.spent.notify_one();
        }
    }

    /// Resolves once `max_streams` streams have begun: the connection is
    /// to go away (`max_connection_requests`).
    pub(crate) async fn spent(&self) {
        self.spent.notified().await;
    }

    /// `body`, telling this watch when it waits on the client. Called
    /// from the stream's task, whose abort handle it takes.
    pub(crate) fn pace(self: &Arc<Self>, body: Body) -> Paced {
        let pacing = Arc::new(Pacing {
            since: AtomicU64::new(0),
            stream: STREAM.try_with(AbortHandle::clone).ok(),
        });
        let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
        bodies.retain(|b| b.strong_count() > 0);
        bodies.push(Arc::downgrade(&pacing));
        Paced {
            inner: body,
            pacing,
            watch: Arc::clone(self),
        }
    }

    /// Resets every stream whose response body has waited on the client
    /// (given data that the client's flow control has not let out) for
    /// `timeout`; resolves once such a body cannot be reset on its own, and
    /// the connection must close instead.
    pub(crate) async fn stalled(&self, timeout: Duration) {
        let timeout_ms = timeout.as_millis() as u64;
        let every = (timeout / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let now = self.now_ms();
            let mut close = false;
            let mut bodies = self.bodies.lock().unwrap_or_else(|e| e.into_inner());
            bodies.retain(|b| {
                let Some(pacing) = b.upgrade() else {
                    return false;
                };
                let since = pacing.since.load(Ordering::Relaxed);
                if since == 0 || now < since + timeout_ms {
                    return true;
                }
                match &pacing.stream {
                    Some(stream) => {
                        tracing::debug!(target: "flotilla::gateway", ?timeout, "an HTTP/2 client read nothing of a response; resetting its stream");
                        stream.abort();
                        false
                    }
                    None => {
                        close = true;
                        true
                    }
                }
            });
            if close {
                return;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// A request was handed to the service.
    pub(crate) fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_request.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
    }

    /// Resolves once no request has been in progress for `idle_timeout`.
    /// Bytes read do not count, as Envoy's idle timeout counts only
    /// streams: a client's PINGs (or SETTINGS, or WINDOW_UPDATEs) alone
    /// would otherwise keep a connection, a socket and a task, for ever.
    pub(crate) async fn idle(&self, idle_timeout: Duration) {
        let idle_ms = idle_timeout.as_millis() as u64;
        loop {
            let now = self.now_ms();
            let wake_in = if self.in_request.load(Ordering::Acquire) > 0 {
                idle_ms
            } else {
                let last = self.last_activity.load(Ordering::Relaxed);
                if now >= last + idle_ms {
                    return;
                }
                last + idle_ms - now
            };
            tokio::time::sleep(Duration::from_millis(wake_in.max(10))).await;
        }
    }
}

/// A response body on an HTTP/2 connection ([`Watch::pace`]).
pub(crate) struct Paced {
    inner: Body,
    pacing: Arc<Pacing>,
    watch: Arc<Watch>,
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let gave_data = matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data());
        let since = if gave_data { self.watch.now_ms() } else { 0 };
        self.pacing.since.store(since, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body on an HTTP/2 stream that is not at its end yet: fails
    /// with [`BodyStalled`] once its reader has waited `timeout` for the
    /// next frame (see the module's notes).
    pub(crate) struct Paused<B> {
        #[pin]
        inner: B,
        timeout: Duration,
        // Made at the first wait and kept: a later wait moves it, later
        // only when it fires early (as `h1`'s `arm`), not at each frame.
        timer: Option<Pin<Box<Sleep>>>,
        // Since when the reader has waited, without a frame since.
        since: Option<Instant>,
        stalled: bool,
    }
}

impl<B> Paused<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Paused<B> {
        Paused {
            inner,
            timeout,
            timer: None,
            since: None,
            stalled: false,
        }
    }
}

impl<B> http_body::Body for Paused<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.stalled {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            *this.since = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = *this.since.get_or_insert_with(clock::now) + *this.timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !clock::poll_deadline(timer, cx, deadline) {
            return Poll::Pending;
        }
        *this.stalled = true;
        let stalled = BodyStalled {
            timeout: *this.timeout,
        };
        Poll::Ready(Some(Err(Box::new(stalled))))
    }

    fn is_end_stream(&self) -> bool {
        self.stalled || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream.poll_read_ready(cx))?;
            // Into the uninitialised part directly (`ReadBuf` is a `BufMut`):
            // zeroing hyper's read buffer on every read costs measurably.
            match self.stream.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
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
/// returned handle lingers once hyper is done. Its watch is spent after
/// `max_streams` streams ([`Watch::new`]).
pub(crate) fn watch(stream: TcpStream, read: Bytes, max_streams: u64) -> (Io, Watched) {
    let stream = Arc::new(stream);
    let watch = Watch::new(max_streams);
    (
        Io {
            stream: Arc::clone(&stream),
            prefix: read,
        },
        Watched { stream, watch },
    )
}

/// The gateway's side of an h2c connection, beside hyper's.
pub(crate) struct Watched {
    stream: Arc<TcpStream>,
    pub watch: Arc<Watch>,
}

impl Watched {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use http_body::Body as _;

    /// The wait counts from the reader's poll that found nothing, not from
    /// the last frame: a reader busy with what it took (an instance slow
    /// to take it) is not kept waiting by the client.
    #[tokio::test(start_paused = true)]
    async fn a_request_body_fails_once_its_reader_has_waited_the_timeout_for_it() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(data)), rx))
        });
        let timeout = Duration::from_secs(1);
        let mut body = Box::pin(Paused::new(
            http_body_util::StreamBody::new(frames),
            timeout,
        ));
        let mut poll = || {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Pending => "pending".to_string(),
                Poll::Ready(None) => "end".to_string(),
                Poll::Ready(Some(Ok(_))) => "frame".to_string(),
                Poll::Ready(Some(Err(e))) => match crate::body::cause::<BodyStalled>(e.as_ref()) {
                    Some(stalled) => format!("stalled {:?}", stalled.timeout),
                    None => format!("error {e}"),
                },
            }
        };
        assert!(tx.send(Bytes::from_static(b"a")).await.is_ok());
        assert_eq!(poll(), "frame");
        // Busy elsewhere for three timeouts: no wait yet.
        tokio::time::advance(3 * timeout).await;
        assert_eq!(poll(), "pending");
        tokio::time::advance(timeout - Duration::from_millis(100)).await;
        assert_eq!(poll(), "pending");
        // A frame ends the wait; the next one counts from its own start.
        assert!(tx.send(Bytes::from_static(b"b")).await.is_ok());
        assert_eq!(poll(), "frame");
        assert_eq!(poll(), "pending");
        tokio::time::advance(timeout - Duration::from_millis(100)).await;
        assert_eq!(poll(), "pending");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(poll(), "stalled 1s");
        assert_eq!(poll(), "end");
    }
}
