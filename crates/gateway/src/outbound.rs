//! The proxy's HTTP/1.1 client to instances: keep-alive connections pooled
//! per instance, each exchange driven entirely by the task that asks for it.
//!
//! Why not hyper's pooled client: it runs every upstream connection as a
//! task of its own, so each proxied request hops between tasks (request
//! into the connection's channel, response back through a oneshot) and
//! usually between the runtime's threads, which the profile of
//! `benches/gateway` showed as the largest single cost after the kernel's
//! own TCP work (scheduler wake-ups, futex and epoll traffic). Here the
//! request's own task writes the request and reads the response head and
//! body straight from the socket; a connection is a plain value that goes
//! back to the pool when its response has been read to the end. Parsing is
//! `httparse` (hyper's own parser); the framing rules are RFC 9112's.
//!
//! # Which service a connection belongs to
//!
//! Connections are opened for a service at an address (`client::Connector`
//! verifies the peer's certificate as that service under mutual TLS) and
//! handed out only for that same service and address: a connection
//! verified for `catalog` is never reused for a request to `orders`, even
//! if `orders` now listens on a port `catalog` once had.
//!
//! # Stale connections
//!
//! An instance may close an idle keep-alive connection at any time. A pooled
//! connection is checked before reuse without a syscall in the common case:
//! a poll of its socket that finds it readable (end of stream, or bytes no
//! request asked for) means it is dropped instead. That sees only what the
//! reactor has already reported: a close (or stray bytes) that arrived just
//! before, or while the request is on its way, shows only as the exchange
//! failing. A peek at the socket before each reuse would cost every request
//! a syscall and still lose that race, so, as hyper's and Go's clients do,
//! the failure itself is handled: an exchange on a *reused* connection that
//! fails before any response came (the write failed, the instance closed,
//! or what came is no response) is sent once more on a fresh connection
//! when it may be sent twice (a buffered body, and a method the proxy
//! would retry: [`may_send_twice`]), else it fails as
//! [`SendError::Stale`]. Either way it says nothing about the instance's
//! health (it closed an idle connection, as it may), and the proxy does
//! not count it toward ejection.

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{self, Body, BoxError};
use crate::chunked::{self, ChunkedDecoder, Decoded};
use crate::client::{ConnectError, Connector, MAX_IDLE_PER_INSTANCE, POOL_IDLE, Stream};
use crate::headers::{self, Forwarding};
use crate::relayed::{Field, Relayed, Reply};
use crate::upgrade::{self, Tunnel, WebSocket};

/// The largest response head accepted from an instance.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most response header fields accepted from an instance.
const MAX_HEADERS: usize = 128;
/// Bodies up to this size are written in one go with the head.
const COALESCE_BYTES: usize = 64 * 1024;
/// How long a connection whose write failed is read for an answer the
/// instance sent before closing it (it is closed: this is not a wait for
/// the instance, only for the reactor to report the socket).
const ANSWER_AFTER_FAILED_WRITE: std::time::Duration = std::time::Duration::from_secs(1);
/// Read buffer: initial capacity, and the least free space for a read.
const READ_CHUNK: usize = 8 * 1024;

/// How an exchange with an instance failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be opened (refused, unreachable, timed out, TLS).
    #[error("cannot connect to the instance: {0}")]
    Connect(#[source] ConnectError),
    /// The connection broke before the response head was complete.
    #[error("the connection to the instance was lost: {0}")]
    Lost(#[source] io::Error),
    /// The request body failed while it was being sent (the client went
    /// away, or the body exceeded its limit).
    #[error("the request body failed: {0}")]
    Body(#[source] BoxError),
    /// The instance answered something that is not a valid HTTP/1.x
    /// response.
    #[error("the instance sent an invalid response: {0}")]
    Protocol(String),
    /// The deadline passed before the response head arrived.
    #[error("no response head before the deadline")]
    TimedOut,
    /// The deadline passed while the request's body was awaited from the
    /// client: the client was too slow, not the instance.
    #[error("the client had not sent the request body by the deadline")]
    ClientTooSlow,
    /// A pooled connection failed before any response came, and the
    /// request could not be sent again (see "Stale connections" above):
    /// no evidence against the instance.
    #[error("the pooled connection to the instance was stale: {0}")]
    Stale(#[source] Box<SendError>),
}

/// How one exchange failed, for `Outbound::send` to decide on sending the
/// request again.
struct Failed {
    error: SendError,
    /// The connection, when it failed before any response came (see
    /// "Stale connections" above): it names the service and address to
    /// open a fresh one to.
    unanswered: Option<Box<Conn>>,
}

impl From<SendError> for Failed {
    fn from(error: SendError) -> Failed {
        Failed {
            error,
            unanswered: None,
        }
    }
}

/// Whether a request may reach an instance twice: one the proxy retries
/// (`proxy::may_retry_method`). A stale connection's close may have come
/// after the instance read the request, and acted on it: Go's client
/// sends again only such requests too.
fn may_send_twice(parts: &Parts) -> bool {
    crate::proxy::may_retry_method(parts)
}

/// A request as it goes to an instance: the client's head (after the
/// edge's changes) and what the gateway says about the client, which the
/// head is written with (see [`headers::forward_fields`]).
// Cloned only by tests that send one request twice.
#[cfg_attr(test, derive(Clone))]
pub(crate) struct UpstreamRequest {
    /// Taken apart as it is dropped, for its header map.
    pub parts: ManuallyDrop<Parts>,
    pub forwarding: Forwarding,
}

impl UpstreamRequest {
    pub(crate) fn new(parts: Parts, forwarding: Forwarding) -> UpstreamRequest {
        UpstreamRequest {
            parts: ManuallyDrop::new(parts),
            forwarding,
        }
    }
}

impl Drop for UpstreamRequest {
    /// Its header map, emptied, serves a later request on this thread
    /// (`headers::recycle`). Moved out of the parts, not swapped for an
    /// empty map that would then be dropped (~60 instructions).
    fn drop(&mut self) {
        // SAFETY: `parts` is taken once, here, and never used again: the
        // request is being dropped, and `ManuallyDrop` keeps it from being
        // dropped a second time.
        let parts = unsafe { ManuallyDrop::take(&mut self.parts) };
        headers::recycle(parts.headers);
    }
}

/// The request body to send.
pub(crate) enum OutBody {
    /// Known bytes (buffered, so a retry can send them again).
    Full(Bytes),
    /// Streamed from the client.
    Stream(Body),
}

/// The pooled client; cheap to clone.
#[derive(Clone)]
pub(crate) struct Outbound {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    /// Idle connections by instance address.
    /// Hashed with foldhash: the addresses come from discovery, not from
    /// clients, so SipHash's resistance to chosen keys buys nothing here.
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>, foldhash::fast::RandomState>>,
    /// Idle connections kept per instance ([`MAX_IDLE_PER_INSTANCE`]).
    max_idle: usize,
    /// The longest an instance may send nothing of a response body
    /// (`Limits::body_timeout`).
    body_timeout: Duration,
}

/// Connections are boxed from the pool to the response body and back: a
/// `Conn` is 144 bytes, copied at each of the half-dozen moves a request
/// makes of it, where a box is one allocation per connection opened.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One connection to an instance.
struct Conn {
    io: Stream,
    service: Box<str>,
    addr: SocketAddr,
    read: BytesMut,
    write: Vec<u8>,
    /// Times each exchange out; kept from one exchange to the next (out of
    /// the connection while an exchange runs).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Outbound {
    /// A client opening connections with `connector`; sweeps idle
    /// connections in the background (needs a tokio runtime).
    /// A response body the instance sends nothing of for `body_timeout`
    /// fails.
    pub(crate) fn new(connector: Connector, body_timeout: Duration) -> Outbound {
        Outbound::with_max_idle(connector, MAX_IDLE_PER_INSTANCE, body_timeout)
    }

    fn with_max_idle(connector: Connector, max_idle: usize, body_timeout: Duration) -> Outbound {
        let shared = Arc::new(Shared {
            connector,
            idle: Mutex::new(HashMap::default()),
            max_idle,
            body_timeout,
        });
        tokio::spawn(sweep(Arc::downgrade(&shared)));
        Outbound { shared }
    }

    /// Sends `req` with `body` to the instance of `service`
    /// at `addr`, and returns the response once its head has arrived, or
    /// [`SendError::TimedOut`] if it has not by `deadline`; the body streams
    /// from the connection.
    pub(crate) async fn send(
        &self,
        service: &str,
        addr: SocketAddr,
        req: &UpstreamRequest,
        body: OutBody,
        deadline: Instant,
    ) -> Result<Reply, SendError> {
        let Some(conn) = self.checkout(service, addr) else {
            let conn = self.open(service, addr, deadline).await?;
            return self
                .exchange(conn, req, body, deadline)
                .await
                .map_err(|f| f.error);
        };
        // What it takes to send the request again if the pooled connection
        // turns out stale: a body in memory (a shared `Bytes`, no copy).
        let again = match &body {
            OutBody::Full(bytes) => Some(bytes.clone()),
            OutBody::Stream(b) if b.is_end_stream() => Some(Bytes::new()),
            OutBody::Stream(_) => None,
        };
        // The outcome is matched on apart from the await below: a match on
        // it around that await would keep it in the future.
        let (failed, conn) = match self.exchange(conn, req, body, deadline).await {
            Ok(reply) => return Ok(reply),
            Err(Failed {
                error,
                unanswered: Some(conn),
            }) => (error, conn),
            Err(failed) => return Err(failed.error),
        };
        // Boxed: few requests come here, and inline the second exchange
        // made every request's future larger (by `size_of_val`: 976 bytes,
        // 904 boxed, 792 before a stale connection was replaced at all).
        Box::pin(self.send_again(conn, req, again, failed, deadline)).await
    }

    /// After the reused connection `stale` gave out before an answer
    /// (`failed`): the request sent on a fresh connection to the same
    /// instance, when its body is at hand (`again`) and it may be sent
    /// twice; else [`SendError::Stale`].
    async fn send_again(
        &self,
        stale: Box<Conn>,
        req: &UpstreamRequest,
        again: Option<Bytes>,
        failed: SendError,
        deadline: Instant,
    ) -> Result<Reply, SendError> {
        let Some(body) = again.filter(|_| may_send_twice(&req.parts)) else {
            return Err(SendError::Stale(Box::new(failed)));
        };
        // Closed here, its service's name kept.
        let Conn { service, addr, .. } = *stale;
        tracing::debug!(target: "flotilla::gateway", service = &*service, %addr, error = %failed, "a pooled connection was stale; sending again on a fresh one");
        drop(failed);
        let conn = self.open(&service, addr, deadline).await?;
        self.exchange(conn, req, OutBody::Full(body), deadline)
            .await
            .map_err(|f| f.error)
    }

    /// A new connection to `service` at `addr`, by `deadline`.
    async fn open(
        &self,
        service: &str,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<Box<Conn>, SendError> {
        // Boxed: opening a connection (TCP, then maybe a TLS handshake) is
        // a 1.7 KB future, and unboxed it would make every request's future
        // that much larger, and every move of it that much longer, for a
        // path few requests take.
        let open = Box::pin(self.shared.connector.open(service, addr));
        let io = tokio::time::timeout_at(deadline, open)
            .await
            .map_err(|_| SendError::TimedOut)?
            .map_err(SendError::Connect)?;
        Ok(Box::new(Conn {
            io,
            service: service.into(),
            addr,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(1024),
            timer: None,
        }))
    }

    /// One exchange on `conn`: `send`'s, on a connection it has.
    async fn exchange(
        &self,
        mut conn: Box<Conn>,
        req: &UpstreamRequest,
        body: OutBody,
        deadline: Instant,
    ) -> Result<Reply, Failed> {
        // The connection's own timer, moved to this deadline: registering
        // a new timer per request (and cancelling it) takes the runtime's
        // timer lock twice, which every worker thread contends for.
        let mut timer = conn
            .timer
            .take()
            .unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)));
        crate::clock::arm(&mut timer, deadline);
        let asked = Asked {
            head_only: req.parts.method == Method::HEAD,
            websocket: req.parts.extensions.get::<WebSocket>().is_some(),
        };
        // Whether the exchange is waiting for the next of the client's body:
        // a deadline that passes then is the client's doing.
        // An atomic only for `Send`: one task reads and writes it.
        let awaiting_client = AtomicBool::new(false);
        let done = {
            let exchange = async {
                let sent = conn
                    .write_request(req, body, asked.websocket, &awaiting_client)
                    .await?;
                let head = conn.read_head(asked).await?;
                Ok::<_, SendError>((sent, head))
            };
            tokio::pin!(exchange);
            loop {
                tokio::select! {
                    biased;
                    done = &mut exchange => break done,
                    () = timer.as_mut() => {
                        // It may fire early (see `clock::arm`): then it is re-armed.
                        if Instant::now() >= deadline {
                            return Err(Failed::from(if awaiting_client.load(Ordering::Relaxed) {
                                SendError::ClientTooSlow
                            } else {
                                SendError::TimedOut
                            }));
                        }
                        timer.as_mut().reset(deadline);
                    }
                }
            }
        };
        let (sent, (head, relayed, framing, mut reusable)) = match done {
            Ok(done) => done,
            Err(error) => {
                // Nothing of a response came: the connection gave out
                // (a failed write leaves what the instance answered
                // readable, `answered_anyway`), or what came is no
                // response at all, not even a malformed one.
                let unanswered = match &error {
                    SendError::Lost(_) => conn.read.is_empty(),
                    SendError::Protocol(_) => !conn.read.starts_with(b"HTTP/"),
                    _ => false,
                };
                return Err(Failed {
                    error,
                    unanswered: unanswered.then_some(conn),
                });
            }
        };
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(switched(conn, head, relayed));
        }
        conn.timer = Some(timer);
        // Answered before the whole request was written: the rest of it
        // would be read as the next request.
        reusable &= matches!(sent, Sent::All);
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing,
            reusable,
            shared: Arc::downgrade(&self.shared),
            idle: self.shared.body_timeout,
            waiting_since: None,
        };
        if matches!(body.framing, Framing::Done) {
            body.finish();
        }
        Ok(Reply {
            res: Response::from_parts(head, body::boxed(body)),
            relayed: Some(relayed),
        })
    }

    /// A pooled connection to `service` at `addr` that still looks alive.
    fn checkout(&self, service: &str, addr: SocketAddr) -> Option<Box<Conn>> {
        let now = crate::clock::now();
        loop {
            let mut conn = {
                let mut idle = self.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
                let list = idle.get_mut(&addr)?;
                let at = list.iter().rposition(|i| &*i.conn.service == service)?;
                let found = list.swap_remove(at);
                if list.is_empty() {
                    idle.remove(&addr);
                }
                found
            };
            if now.duration_since(conn.since) < POOL_IDLE && conn.conn.looks_alive() {
                return Some(conn.conn);
            }
        }
    }

    fn checkin(shared: &Shared, conn: Box<Conn>) {
        let mut idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(conn.addr).or_default();
        if list.len() < shared.max_idle {
            list.push(Idle {
                conn,
                since: crate::clock::now(),
            });
        }
    }
}

/// Closes connections idle for longer than `POOL_IDLE`, so an instance that
/// went away does not keep its sockets open here; ends with the client.
async fn sweep(shared: Weak<Shared>) {
    let mut every = tokio::time::interval(POOL_IDLE / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        // Dropped (closed) outside the lock.
        let mut expired = Vec::new();
        {
            let mut idle = shared.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|_, list| {
                let (keep, old): (Vec<Idle>, Vec<Idle>) = std::mem::take(list)
                    .into_iter()
                    .partition(|i| now.duration_since(i.since) < POOL_IDLE);
                expired.extend(old);
                *list = keep;
                !list.is_empty()
            });
        }
        drop(expired);
    }
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone)]
enum Framing {
    Fixed(u64),
    Chunked(ChunkedDecoder),
    /// Until the instance closes the connection.
    UntilClose,
    Done,
}

impl Conn {
    /// A read of the idle socket: readable means closed by the instance or
    /// holding bytes nobody asked for; either way not reusable. No syscall
    /// unless the socket has become readable.
    fn looks_alive(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        match &mut self.io {
            // `try_read` reads only when tokio has seen the socket readable
            // (and clears that when the read would block), without the
            // task's waker and budget that a poll registers and spends:
            // ~160 instructions a request became ~40 (`instructions.sh`).
            Stream::Plain(tcp) => matches!(
                tcp.try_read(&mut probe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            ),
            // TLS: a record may have come (an alert), which only a read
            // through the session tells apart.
            Stream::Tls(_) => {
                let mut buf = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                matches!(
                    Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
                    Poll::Pending
                )
            }
        }
    }

    async fn write_request(
        &mut self,
        req: &UpstreamRequest,
        body: OutBody,
        websocket: bool,
        awaiting_client: &AtomicBool,
    ) -> Result<Sent, SendError> {
        let parts = &req.parts;
        let out = &mut self.write;
        write_head(out, req, self.addr, websocket);
        let body = match body {
            OutBody::Stream(b) if b.is_end_stream() => OutBody::Full(Bytes::new()),
            other => other,
        };
        let sent = match body {
            OutBody::Full(bytes) => {
                let size = if bytes.is_empty() {
                    BodySize::Empty
                } else {
                    BodySize::Known(bytes.len() as u64)
                };
                end_head(out, &parts.method, size);
                if bytes.len() <= COALESCE_BYTES {
                    out.extend_from_slice(&bytes);
                    self.write_buffer().await?
                } else {
                    match self.write_buffer().await? {
                        Sent::All => self.write_watching(&bytes).await?,
                        answered => answered,
                    }
                }
            }
            OutBody::Stream(body) => {
                let length = body.size_hint().exact();
                end_head(
                    out,
                    &parts.method,
                    length.map_or(BodySize::Unknown, BodySize::Known),
                );
                self.write_body(body, length, awaiting_client).await?
            }
        };
        if let Sent::All = sent {
            self.io.flush().await.map_err(SendError::Lost)?;
        }
        Ok(sent)
    }

    /// Writes out the write buffer (see [`Conn::write_watching`]).
    async fn write_buffer(&mut self) -> Result<Sent, SendError> {
        let out = std::mem::take(&mut self.write);
        let sent = self.write_watching(&out).await;
        self.write = out;
        self.write.clear();
        sent
    }

    /// Writes `buf` while watching for an early answer: an instance may
    /// answer (a 413, a 401) without reading the rest of the request, and
    /// then either stops reading, so the write would wait for ever, or
    /// closes with the request unread, so the write fails with a reset. In
    /// both cases its answer is the response, as hyper's client does it.
    async fn write_watching(&mut self, buf: &[u8]) -> Result<Sent, SendError> {
        let mut written = 0;
        let io = &mut self.io;
        let read = &mut self.read;
        let sent = poll_fn(|cx| {
            while written < buf.len() {
                match Pin::new(&mut *io).poll_write(cx, &buf[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero)));
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return poll_answer(io, read, cx).map_ok(|()| Sent::Answered),
                }
            }
            Poll::Ready(Ok(Sent::All))
        })
        .await;
        match sent {
            Ok(sent) => Ok(sent),
            Err(e) => Box::pin(self.answered_anyway(e)).await,
        }
    }

    /// After a failed write: the instance's answer, if it sent one before
    /// it closed (a reset leaves what it sent before readable), else the
    /// failure. Its callers box it: few requests need it, and inline (with
    /// its timer) it made every request's exchange future 120 bytes larger
    /// (`Outbound::send`'s 1104 → 984, by `size_of_val`).
    async fn answered_anyway(&mut self, error: io::Error) -> Result<Sent, SendError> {
        let io = &mut self.io;
        let read = &mut self.read;
        let answer = poll_fn(|cx| poll_answer(io, read, cx));
        match tokio::time::timeout(ANSWER_AFTER_FAILED_WRITE, answer).await {
            Ok(Ok(())) => Ok(Sent::Answered),
            _ => Err(SendError::Lost(error)),
        }
    }

    /// Streams `body` after the head already in the write buffer: with
    /// `length` as declared, else chunked. Stops early if the instance
    /// answers meanwhile (also while the client's body is slow to come).
    async fn write_body(
        &mut self,
        mut body: Body,
        length: Option<u64>,
        awaiting_client: &AtomicBool,
    ) -> Result<Sent, SendError> {
        let mut sent: u64 = 0;
        loop {
            if let Sent::Answered = self.write_buffer().await? {
                return Ok(Sent::Answered);
            }
            let next = {
                let io = &mut self.io;
                let read = &mut self.read;
                let next = poll_fn(|cx| {
                    if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                        return Poll::Ready(Ok(Next::Frame(frame)));
                    }
                    awaiting_client.store(true, Ordering::Relaxed);
                    poll_answer(io, read, cx).map_ok(|()| Next::Answered)
                })
                .await;
                awaiting_client.store(false, Ordering::Relaxed);
                next
            };
            let frame = match next {
                Ok(Next::Frame(frame)) => frame,
                Ok(Next::Answered) => return Ok(Sent::Answered),
                Err(e) => return Box::pin(self.answered_anyway(e)).await,
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(SendError::Body(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers are not forwarded.
                    Err(_) => continue,
                },
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            match length {
                Some(n) if sent > n => {
                    return Err(SendError::Body(
                        format!("the body is longer than its declared {n} bytes").into(),
                    ));
                }
                Some(_) => self.write.extend_from_slice(&data),
                None => {
                    chunked::chunk_head(&mut self.write, data.len());
                    self.write.extend_from_slice(&data);
                    self.write.extend_from_slice(b"\r\n");
                }
            }
        }
        match length {
            Some(n) if sent != n => {
                return Err(SendError::Body(
                    format!("the body ended after {sent} of its declared {n} bytes").into(),
                ));
            }
            Some(_) => {}
            None => self.write.extend_from_slice(chunked::LAST_CHUNK),
        }
        self.write_buffer().await
    }

    /// Reads up to the end of a final (non-1xx) response head; returns it
    /// with how its body is framed and whether the connection may be
    /// reused afterwards.
    async fn read_head(
        &mut self,
        asked: Asked,
    ) -> Result<(http::response::Parts, Relayed, Framing, bool), SendError> {
        loop {
            if let Some(parsed) = parse_head(&mut self.read, asked)? {
                return Ok(parsed);
            }
            if self.read.len() >= MAX_HEAD_BYTES {
                return Err(SendError::Protocol(format!(
                    "response head longer than {MAX_HEAD_BYTES} bytes"
                )));
            }
            let n = poll_fn(|cx| poll_read_more(&mut self.io, &mut self.read, cx))
                .await
                .map_err(SendError::Lost)?;
            if n == 0 {
                return Err(SendError::Lost(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the instance closed the connection before a complete response head",
                )));
            }
        }
    }
}

/// The request line and fields of `req` as they go to the instance at
/// `addr`, into the emptied `out`: all but the framing fields, which are
/// this connection's and follow (`Conn::write_request`).
fn write_head(out: &mut Vec<u8>, req: &UpstreamRequest, addr: SocketAddr, websocket: bool) {
    let parts = &req.parts;
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    // Origin form: a request target is never empty.
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let has_host = headers::forward_fields(parts, &req.forwarding, |name, value| {
        headers::put_field(out, name, value);
    });
    if !has_host {
        headers::put_field(out, b"host", addr.to_string().as_bytes());
    }
    if websocket {
        ask_for_websocket(out);
    }
}

/// How big a request's body is, as its head says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BodySize {
    /// None at all.
    Empty,
    Known(u64),
    /// Streamed, of a length not known before its end: sent chunked.
    Unknown,
}

/// Ends the request head in `out` with its body's framing field, this
/// connection's own: the length, or chunked when it is not known. An
/// empty body is announced (`content-length: 0`) only for a method that
/// expects one.
fn end_head(out: &mut Vec<u8>, method: &Method, size: BodySize) {
    match size {
        BodySize::Empty if !expects_body(method) => {}
        BodySize::Empty => headers::put_field(out, b"content-length", b"0"),
        BodySize::Known(n) => headers::put_field(out, b"content-length", n.to_string().as_bytes()),
        BodySize::Unknown => headers::put_field(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// For the fuzz targets (`crate::fuzz`): the head a client's request
/// `parts` goes to an instance with, as `Conn::write_request` writes it
/// for a body of `size`, from an untrusted peer.
#[cfg(any(test, fuzzing))]
pub(crate) fn forward_head(parts: Parts, size: BodySize, websocket: bool) -> Vec<u8> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
    let forwarding = Forwarding {
        peer: addr.ip(),
        trusted_proxy: None,
        proto: "http",
        trace: None,
        told: headers::Told::default(),
    };
    let req = UpstreamRequest::new(parts, forwarding);
    let mut out = Vec::new();
    write_head(&mut out, &req, addr, websocket);
    end_head(&mut out, &req.parts.method, size);
    out
}

/// A complete final response head at the start of `read`, a connection's
/// read buffer (skipping 1xx heads), or `None` when more bytes are needed.
/// The head's bytes are taken off `read`.
fn parse_head(
    read: &mut BytesMut,
    asked: Asked,
) -> Result<Option<(http::response::Parts, Relayed, Framing, bool)>, SendError> {
    loop {
        if read.is_empty() {
            return Ok(None);
        }
        // Uninitialised slots: zeroing 128 of them (4 KiB) per response
        // cost more than parsing a small head.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            read,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(SendError::Protocol(e.to_string())),
        };
        let code = res.code.unwrap_or(0);
        let status = StatusCode::from_u16(code)
            .map_err(|_| SendError::Protocol(format!("invalid status code {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            may_switch(asked, res.headers)?;
        }
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // A `100 Continue` (or `103 Early Hints`) before the real
            // response: not relayed.
            let _ = read.split_to(len);
            continue;
        }
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Framing and reuse are read off the parsed fields, before
        // the hop-by-hop ones that carry them are dropped.
        let present = Present::of(res.headers);
        let (framing, mut reusable) = framing(status, asked.head_only, res.headers, present)?;
        reusable &= keep_alive(version, res.headers, present);
        // Where each end-to-end name and value lies in the head: the
        // response carries the head and these spans, and the fields
        // are written to the client as the instance sent them (see
        // `relayed`). The hop-by-hop fields describe this connection,
        // not the client's (RFC 9110 §7.6.1), so they are left out.
        let doomed = headers::hop_by_hop_given(res.headers, present.connection);
        // With a `Transfer-Encoding`, the body is framed by it and a
        // `Content-Length` beside it is wrong: relayed, it would frame the
        // client's copy by the wrong length. An intermediary must remove
        // it (RFC 9112 §6.3).
        let wrong_length = present.transfer_encoding && present.content_length;
        let dropped = |name: &[u8]| {
            doomed(name) || (wrong_length && headers::name_is(name, b"content-length"))
        };
        let within = &read[..len];
        // Sized once: collected from a filter, the list would grow.
        let mut fields = Vec::with_capacity(res.headers.len());
        fields.extend(
            res.headers
                .iter()
                .filter(|h| !dropped(h.name.as_bytes()))
                .map(|h| Field::within(within, h.name.as_bytes(), h.value)),
        );
        drop(doomed);
        let head = read.split_to(len).freeze();
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        let relayed = Relayed::new(head, fields);
        return Ok(Some((parts, relayed, framing, reusable)));
    }
}

/// For the fuzz targets (`crate::fuzz`): a response head at the start of
/// `read` as the gateway takes it from an instance, with the length its
/// body is read by (`Some(0)`: none; `None`: chunks, or until the close).
#[cfg(any(test, fuzzing))]
pub(crate) fn relay_head(
    read: &mut BytesMut,
    head_only: bool,
) -> Result<Option<(StatusCode, Relayed, Option<u64>)>, String> {
    let asked = Asked {
        head_only,
        websocket: false,
    };
    match parse_head(read, asked) {
        Ok(Some((parts, relayed, framing, _))) => {
            let length = match framing {
                Framing::Fixed(n) => Some(n),
                Framing::Done => Some(0),
                Framing::Chunked(_) | Framing::UntilClose => None,
            };
            Ok(Some((parts.status, relayed, length)))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Asks the instance to switch to WebSocket, as the client asked the
/// gateway (the client's own `Connection` and `Upgrade` are hop-by-hop, not
/// relayed). Out of line, as are the other steps only a WebSocket takes:
/// the path every request takes stays as short as before.
#[cold]
#[inline(never)]
fn ask_for_websocket(out: &mut Vec<u8>) {
    headers::put_field(out, b"connection", b"upgrade");
    headers::put_field(out, b"upgrade", b"websocket");
}

/// Whether an instance's `101` may be followed: only to WebSocket, and
/// only when the client asked for it (`upgrade`); tunnelling after any
/// other answer would let a client smuggle requests past the gateway.
#[cold]
#[inline(never)]
fn may_switch(asked: Asked, fields: &[httparse::Header<'_>]) -> Result<(), SendError> {
    let to_websocket = elements(fields, "upgrade").any(|p| p.eq_ignore_ascii_case(b"websocket"));
    if asked.websocket && to_websocket {
        Ok(())
    } else {
        Err(SendError::Protocol(
            "the instance switched protocols, and not to a WebSocket the client asked for".into(),
        ))
    }
}

/// The reply to a switch: the connection is the tunnel's now, with what
/// the instance sent after its head, handed to the client's connection in
/// the response (`upgrade::Handoff`); it never returns to the pool.
#[cold]
#[inline(never)]
#[expect(
    clippy::boxed_local,
    reason = "connections are boxed from the pool on (see `Idle`); taken apart here"
)]
fn switched(conn: Box<Conn>, head: http::response::Parts, relayed: Relayed) -> Reply {
    let Conn { io, read, .. } = *conn;
    let mut res = Response::from_parts(head, body::empty());
    upgrade::Handoff::attach(
        &mut res,
        Tunnel {
            io,
            read,
            slot: None,
        },
    );
    Reply {
        res,
        relayed: Some(relayed),
    }
}

/// What the request asked that shapes its response.
#[derive(Debug, Clone, Copy)]
struct Asked {
    /// A `HEAD`: the response has no body, whatever it says.
    head_only: bool,
    /// A WebSocket upgrade: a `101` to WebSocket is the answer.
    websocket: bool,
}

/// How much of a request was written.
enum Sent {
    All,
    /// The instance answered before the whole request was written.
    Answered,
}

enum Next {
    Frame(Option<Result<Frame<Bytes>, BoxError>>),
    Answered,
}

/// Reads what the instance sends while the request is still being written:
/// ready once a final (non-1xx) response head is complete in `read`; an
/// error if the instance closed the connection without one.
fn poll_answer(io: &mut Stream, read: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    loop {
        if has_final_head(read) {
            return Poll::Ready(Ok(()));
        }
        if read.len() >= MAX_HEAD_BYTES {
            // Too long to be a head; `read_head` will say so.
            return Poll::Ready(Ok(()));
        }
        match ready!(poll_read_more(io, read, cx)) {
            Ok(0) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the instance closed the connection while the request was being sent",
                )));
            }
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Whether `read` starts with a complete final response head (after any
/// complete 1xx heads).
fn has_final_head(read: &[u8]) -> bool {
    let mut rest = read;
    loop {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            rest,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => {
                if res
                    .code
                    .is_some_and(|c| (100..200).contains(&c) && c != 101)
                {
                    rest = rest.get(len..).unwrap_or_default();
                    continue;
                }
                return true;
            }
            // Not a head at all: let `read_head` report it.
            Err(_) => return true,
            Ok(httparse::Status::Partial) => return false,
        }
    }
}

/// Methods whose empty body is still announced (`content-length: 0`), as
/// clients do, so the instance does not wait for one.
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// The values of the fields named `name` (any case) among `fields`.
fn values<'f>(
    fields: &'f [httparse::Header<'f>],
    name: &'static str,
) -> impl Iterator<Item = &'f [u8]> {
    fields
        .iter()
        .filter(move |f| headers::name_is(f.name.as_bytes(), name.as_bytes()))
        .map(|f| f.value)
}

/// The list elements of the fields named `name` (any case).
fn elements<'f>(
    fields: &'f [httparse::Header<'f>],
    name: &'static str,
) -> impl Iterator<Item = &'f [u8]> {
    headers::list_elements(values(fields, name))
}

/// Which of the fields that framing and reuse depend on a response head
/// has, found in one pass (by length first) rather than one scan each: most
/// heads have a `Content-Length` and neither of the others.
#[derive(Debug, Clone, Copy, Default)]
struct Present {
    connection: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl Present {
    fn of(fields: &[httparse::Header<'_>]) -> Present {
        let mut present = Present::default();
        for f in fields {
            let name = f.name.as_bytes();
            match name.len() {
                10 => present.connection |= headers::name_is(name, b"connection"),
                14 => present.content_length |= headers::name_is(name, b"content-length"),
                17 => present.transfer_encoding |= headers::name_is(name, b"transfer-encoding"),
                _ => {}
            }
        }
        present
    }
}

/// The body framing of a response and whether the framing allows reuse,
/// from its parsed fields.
fn framing(
    status: StatusCode,
    head_only: bool,
    fields: &[httparse::Header<'_>],
    present: Present,
) -> Result<(Framing, bool), SendError> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Done, true));
    }
    if present.transfer_encoding {
        return Ok(match elements(fields, "transfer-encoding").last() {
            Some(c) if c.eq_ignore_ascii_case(b"chunked") => {
                // With both, the length is wrong; do not trust the
                // connection after this response.
                let reusable = !present.content_length;
                (Framing::Chunked(ChunkedDecoder::default()), reusable)
            }
            _ => (Framing::UntilClose, false),
        });
    }
    let mut length: Option<u64> = None;
    for value in values(fields, "content-length") {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or_else(|| SendError::Protocol("invalid content-length".into()))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Protocol(
                    "conflicting content-length values".into(),
                ));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Done, true),
        Some(n) => (Framing::Fixed(n), true),
        None => (Framing::UntilClose, false),
    })
}

/// Whether the instance keeps the connection open after this response.
fn keep_alive(version: Version, fields: &[httparse::Header<'_>], present: Present) -> bool {
    if !present.connection {
        return version != Version::HTTP_10;
    }
    let mut tokens = elements(fields, "connection");
    match version {
        Version::HTTP_10 => tokens.any(|t| t.eq_ignore_ascii_case(b"keep-alive")),
        _ => !tokens.any(|t| t.eq_ignore_ascii_case(b"close")),
    }
}

/// Reads more bytes into `buf`; `Ok(0)` at end of stream.
fn poll_read_more(
    io: &mut Stream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// A response body read from its connection; the connection goes back to
/// the pool once the body has been read to its end (and is closed if the
/// body is dropped before that).
struct UpstreamBody {
    conn: Option<Box<Conn>>,
    framing: Framing,
    reusable: bool,
    shared: Weak<Shared>,
    /// How long the instance may send nothing.
    idle: Duration,
    /// When a read last found nothing to read, since the last bytes came.
    waiting_since: Option<Instant>,
}

impl UpstreamBody {
    /// The body is complete: the connection is pooled if it can be reused.
    fn finish(&mut self) {
        self.framing = Framing::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes after the response would belong to no request.
        if self.reusable
            && conn.read.is_empty()
            && let Some(shared) = self.shared.upgrade()
        {
            Outbound::checkin(&shared, conn);
        }
    }
}

fn stalled(idle: Duration) -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the instance sent nothing of the response body for {}",
            humantime::format_duration(idle)
        ),
    ))
}

fn truncated() -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the instance closed the connection before the end of the response body",
    ))
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Done => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Fixed(remaining) => {
                    if !conn.read.is_empty() {
                        let n = usize::try_from(*remaining)
                            .unwrap_or(usize::MAX)
                            .min(conn.read.len());
                        let data = conn.read.split_to(n).freeze();
                        *remaining -= n as u64;
                        if *remaining == 0 {
                            // Pooled now: a server that stops polling at
                            // the announced length never asks again.
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                },
                Framing::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let read = match poll_read_more(&mut conn.io, &mut conn.read, cx) {
                Poll::Ready(read) => {
                    this.waiting_since = None;
                    read
                }
                Poll::Pending => {
                    // Nothing from the instance for `idle` since the last
                    // bytes: a hung instance would hold the client, its
                    // place in flight and this connection for ever (as
                    // nginx's `proxy_read_timeout`).
                    let now = crate::clock::now();
                    let deadline = *this.waiting_since.get_or_insert(now) + this.idle;
                    let timer = conn
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if crate::clock::poll_deadline(timer, cx, deadline) {
                        this.conn = None;
                        this.framing = Framing::Done;
                        return Poll::Ready(Some(Err(stalled(this.idle))));
                    }
                    return Poll::Pending;
                }
            };
            match read {
                Ok(0) => {
                    this.conn = None;
                    let until_close = matches!(this.framing, Framing::UntilClose);
                    this.framing = Framing::Done;
                    if until_close {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(truncated())));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Fixed(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Fixed(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A chunked body whose end is already buffered (the server stopped
        // polling after the last data frame) still leaves a reusable
        // connection.
        if let (Framing::Chunked(decoder), Some(conn)) = (&mut self.framing, self.conn.as_mut()) {
            loop {
                match decoder.decode(&mut conn.read) {
                    Ok(Decoded::Data(d)) if d.is_empty() => {}
                    Ok(Decoded::Done) => {
                        self.finish();
                        return;
                    }
                    _ => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// How long a test may wait; keeps a broken test from hanging.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    fn limits() -> crate::config::Limits {
        crate::config::Limits::default()
    }

    /// A deadline no test exchange reaches.
    fn far() -> Instant {
        Instant::now() + TEST_DEADLINE
    }

    fn outbound() -> Outbound {
        match crate::client::connector(&limits(), None) {
            Ok(c) => Outbound::new(c, Duration::from_secs(60)),
            Err(e) => panic!("{e}"),
        }
    }

    fn get(path: &str) -> UpstreamRequest {
        let (mut parts, ()) = http::Request::get(path)
            .body(())
            .unwrap_or_default()
            .into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("shop.test"));
        UpstreamRequest::new(
            parts,
            Forwarding {
                peer: std::net::IpAddr::from([192, 0, 2, 1]),
                trusted_proxy: None,
                proto: "http",
                trace: None,
                told: Default::default(),
            },
        )
    }

    /// A fake instance: answers each request head it reads with the next
    /// canned response, recording what it received; counts connections.
    async fn instance(
        responses: Vec<&'static [u8]>,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    ) {
        let responses = Mutex::new(responses.into_iter());
        let fake = fake_instance(move |_, _, _| {
            let mut responses = responses.lock().unwrap_or_else(|e| e.into_inner());
            Some(match responses.next() {
                // After the last canned response: close.
                Some(r) => Act::answer(r).closing_if(responses.len() == 0),
                None => Act::answer(b"").closing_if(true),
            })
        })
        .await;
        (fake.addr, fake.seen)
    }

    /// What a [`fake_instance`] does with one request: after `delay`,
    /// writes `write` (any bytes: a response or not), then closes the
    /// connection if `close`.
    struct Act {
        delay: Duration,
        write: &'static [u8],
        close: bool,
    }

    impl Act {
        fn answer(write: &'static [u8]) -> Act {
            Act {
                delay: Duration::ZERO,
                write,
                close: false,
            }
        }

        fn after(self, delay: Duration) -> Act {
            Act { delay, ..self }
        }

        fn closing_if(self, close: bool) -> Act {
            Act { close, ..self }
        }
    }

    /// A fake instance over raw sockets, for what hyper's server would
    /// never do. It reads request heads (and the body `content-length`
    /// gives, which test requests send with their heads), reports each
    /// with its connection's number, counts the connections it accepts,
    /// and does what `script` says with each request: given the
    /// connection's number, the request's number on it (from 1) and the
    /// request, `None` leaves it unanswered.
    async fn fake_instance(
        script: impl Fn(usize, usize, &[u8]) -> Option<Act> + Send + Sync + 'static,
    ) -> FakeInstance {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (tx, seen) = tokio::sync::mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let conn_no = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let (tx, script) = (tx.clone(), Arc::clone(&script));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut request_no = 0;
                    loop {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let mut request: Vec<u8> = buf.drain(..end + 4).collect();
                            let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                            if let Some(len) = text
                                .split("content-length: ")
                                .nth(1)
                                .and_then(|l| l.split('\r').next())
                                .and_then(|l| l.parse::<usize>().ok())
                            {
                                request.extend(buf.drain(..len.min(buf.len())));
                            }
                            request_no += 1;
                            let act = script(conn_no, request_no, &request);
                            let _ = tx.send((conn_no, request));
                            let Some(act) = act else { continue };
                            if !act.delay.is_zero() {
                                tokio::time::sleep(act.delay).await;
                            }
                            if s.write_all(act.write).await.is_err() || act.close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeInstance {
            addr,
            seen,
            accepted,
        }
    }

    struct FakeInstance {
        addr: SocketAddr,
        /// Each request as received, with its connection's number.
        seen: tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
        /// How many connections it accepted.
        accepted: Arc<AtomicUsize>,
    }

    async fn body_of(reply: Reply) -> Vec<u8> {
        match tokio::time::timeout(TEST_DEADLINE, reply.res.into_body().collect()).await {
            Ok(Ok(c)) => c.to_bytes().to_vec(),
            Ok(Err(e)) => panic!("body: {e}"),
            Err(_) => panic!("body timed out"),
        }
    }

    /// A fake instance that answers `ok` to every request head: after
    /// 300 ms for `GET /slow`, never for `GET /never`, at once otherwise;
    /// counts the connections it accepts.
    async fn slow_instance() -> (SocketAddr, Arc<AtomicUsize>) {
        let fake = fake_instance(|_, _, request| {
            const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if request.starts_with(b"GET /never ") {
                None
            } else if request.starts_with(b"GET /slow ") {
                Some(Act::answer(OK).after(Duration::from_millis(300)))
            } else {
                Some(Act::answer(OK))
            }
        })
        .await;
        (fake.addr, fake.accepted)
    }

    /// A burst of concurrent requests opens a connection each; once they
    /// are done, only `max_idle` of them stay pooled (the rest close).
    #[tokio::test]
    async fn the_pool_keeps_at_most_max_idle_connections_per_instance() {
        let (addr, _) = slow_instance().await;
        let connector = match crate::client::connector(&limits(), None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let client = Outbound::with_max_idle(connector, 3, Duration::from_secs(60));
        let burst = (0..5).map(|_| {
            let client = client.clone();
            async move {
                // Slow enough that the burst overlaps.
                let request = get("/slow");
                match client
                    .send("svc", addr, &request, OutBody::Full(Bytes::new()), far())
                    .await
                {
                    Ok(res) => body_of(res).await,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        for body in futures_util::future::join_all(burst).await {
            assert_eq!(body, b"ok");
        }
        let idle = client.shared.idle.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(idle.get(&addr).map(Vec::len), Some(3));
    }

    /// RFC 9112 §6.3, as the instance's response head says it.
    #[test]
    fn response_framing_follows_the_headers() {
        use crate::headers::tests::raw as map;
        // Framing as a word, and whether the connection is reusable.
        let of = |status: u16, head_only: bool, fields: &[(&'static str, &'static str)]| {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            let fields = map(fields);
            match framing(status, head_only, &fields, Present::of(&fields)) {
                Ok((Framing::Fixed(n), r)) => (format!("fixed {n}"), r),
                Ok((Framing::Chunked(_), r)) => ("chunked".to_string(), r),
                Ok((Framing::UntilClose, r)) => ("close".to_string(), r),
                Ok((Framing::Done, r)) => ("done".to_string(), r),
                Err(e) => (format!("error: {e}"), false),
            }
        };
        let te = "transfer-encoding";
        let cl = "content-length";
        let want = |s: &str, r: bool| (s.to_string(), r);
        assert_eq!(of(200, false, &[(cl, "5")]), want("fixed 5", true));
        assert_eq!(of(200, false, &[(cl, "5, 5")]), want("fixed 5", true));
        assert_eq!(
            of(200, false, &[(cl, "5"), (cl, "5")]),
            want("fixed 5", true)
        );
        assert_eq!(of(200, false, &[(cl, "0")]), want("done", true));
        assert!(of(200, false, &[(cl, "5, 6")]).0.contains("conflicting"));
        assert!(
            of(200, false, &[(cl, "5"), (cl, "6")])
                .0
                .contains("conflicting")
        );
        assert!(of(200, false, &[(cl, "+5")]).0.contains("invalid"));
        assert!(of(200, false, &[(cl, "")]).0.contains("invalid"));
        assert_eq!(of(200, false, &[(te, "chunked")]), want("chunked", true));
        assert_eq!(
            of(200, false, &[(te, "gzip, chunked")]),
            want("chunked", true)
        );
        assert_eq!(
            of(200, false, &[(te, "gzip"), (te, "Chunked")]),
            want("chunked", true)
        );
        assert_eq!(
            of(200, false, &[(te, "chunked, gzip")]),
            want("close", false)
        );
        // Both: chunked wins, and the connection is not trusted after.
        assert_eq!(
            of(200, false, &[(cl, "5"), (te, "chunked")]),
            want("chunked", false)
        );
        // An invalid length does not matter when chunked says otherwise.
        assert_eq!(
            of(200, false, &[(cl, "x"), (te, "chunked")]),
            want("chunked", false)
        );
        assert_eq!(of(200, false, &[]), want("close", false));
        assert_eq!(of(204, false, &[(cl, "5")]), want("done", true));
        assert_eq!(of(304, false, &[(te, "chunked")]), want("done", true));
        assert_eq!(of(200, true, &[(cl, "5")]), want("done", true));

        let conn = "connection";
        let ka = |version: Version, fields: &[(&'static str, &'static str)]| {
            let fields = map(fields);
            keep_alive(version, &fields, Present::of(&fields))
        };
        assert!(ka(Version::HTTP_11, &[]));
        assert!(!ka(Version::HTTP_11, &[(conn, "close")]));
        assert!(!ka(Version::HTTP_11, &[(conn, "keep-alive, Close")]));
        assert!(!ka(Version::HTTP_10, &[]));
        assert!(ka(Version::HTTP_10, &[(conn, "Keep-Alive")]));
        assert!(ka(Version::HTTP_11, &[("Connection", "x-foo")]));
    }

    /// The connection's timer is kept between exchanges: a later deadline
    /// than the last exchange's must not cut a slow answer short (the timer
    /// fires early and is re-armed), and an earlier one must still hold.
    #[tokio::test]
    async fn each_exchange_keeps_its_own_deadline_on_a_reused_connection() {
        let (addr, accepted) = slow_instance().await;
        let client = outbound();
        let send = |path: &'static str, within: Duration| {
            let client = client.clone();
            async move {
                let deadline = Instant::now() + within;
                let request = get(path);
                let sending =
                    client.send("svc", addr, &request, OutBody::Full(Bytes::new()), deadline);
                match tokio::time::timeout(TEST_DEADLINE, sending).await {
                    Ok(result) => result,
                    Err(_) => panic!("{path}: no answer and no timeout"),
                }
            }
        };
        // Arms the connection's timer 100 ms out.
        match send("/fast", Duration::from_millis(100)).await {
            Ok(res) => assert_eq!(body_of(res).await, b"ok"),
            Err(e) => panic!("/fast: {e}"),
        }
        // 300 ms to answer, within a deadline of 5 min on the same
        // connection: far beyond TEST_DEADLINE, so a timer left at it
        // below shows as no answer and no timeout.
        match send("/slow", Duration::from_secs(300)).await {
            Ok(res) => assert_eq!(body_of(res).await, b"ok"),
            Err(e) => panic!("/slow: {e}"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A deadline earlier than the timer's: it must be moved back.
        match send("/never", Duration::from_millis(200)).await {
            Err(SendError::TimedOut) => {}
            Ok(res) => panic!("/never answered {}", res.res.status()),
            Err(e) => panic!("/never: {e}"),
        }
    }

    #[tokio::test]
    async fn reuses_a_connection_after_a_complete_response() {
        let (addr, mut seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ])
        .await;
        let client = outbound();
        for want in [&b"ok"[..], b"abc", b""] {
            let res = match client
                .send(
                    "svc",
                    addr,
                    &get("/x?y=1"),
                    OutBody::Full(Bytes::new()),
                    far(),
                )
                .await
            {
                Ok(r) => r,
                Err(e) => panic!("{e}"),
            };
            assert_eq!(body_of(res).await, want);
        }
        let mut conns = Vec::new();
        for _ in 0..3 {
            match seen.recv().await {
                Some((c, req)) => {
                    assert!(req.starts_with(b"GET /x?y=1 HTTP/1.1\r\n"), "{req:?}");
                    conns.push(c);
                }
                None => panic!("instance gone"),
            }
        }
        assert_eq!(conns, vec![1, 1, 1], "all three on one connection");
    }

    #[tokio::test]
    async fn a_connection_is_never_reused_for_another_service() {
        let (addr, mut seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let client = outbound();
        for service in ["catalog", "orders"] {
            match client
                .send(service, addr, &get("/"), OutBody::Full(Bytes::new()), far())
                .await
            {
                Ok(res) => drop(body_of(res).await),
                Err(e) => panic!("{e}"),
            }
        }
        let a = seen.recv().await.map(|s| s.0);
        let b = seen.recv().await.map(|s| s.0);
        assert_eq!((a, b), (Some(1), Some(2)));
    }

    #[tokio::test]
    async fn a_connection_closed_by_the_instance_is_not_reused() {
        let (addr, mut seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\na",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb",
        ])
        .await;
        let client = outbound();
        for want in [&b"a"[..], b"b"] {
            match client
                .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
                .await
            {
                Ok(res) => assert_eq!(body_of(res).await, want),
                Err(e) => panic!("{e}"),
            }
        }
        let a = seen.recv().await.map(|s| s.0);
        let b = seen.recv().await.map(|s| s.0);
        assert_eq!((a, b), (Some(1), Some(2)));
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_to_the_end() {
        let (addr, _seen) = instance(vec![b"HTTP/1.0 200 OK\r\n\r\nall of it"]).await;
        let client = outbound();
        match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => {
                assert_eq!(res.res.version(), Version::HTTP_10);
                // The fake instance keeps the socket until its next read
                // fails; close-delimited means the end comes with EOF, so
                // only check the bytes that arrived.
                let mut body = res.res.into_body();
                let frame = tokio::time::timeout(TEST_DEADLINE, body.frame()).await;
                match frame {
                    Ok(Some(Ok(f))) => {
                        assert_eq!(f.into_data().ok(), Some(Bytes::from_static(b"all of it")))
                    }
                    other => panic!("{other:?}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let (addr, _seen) = instance(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nhi",
        ])
        .await;
        let client = outbound();
        match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => {
                assert_eq!(res.res.status(), StatusCode::CREATED);
                assert_eq!(body_of(res).await, b"hi");
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// A reply's relayed fields as the instance sent them, then the
    /// gateway's.
    fn relayed_of(reply: &Reply) -> Vec<(&[u8], &[u8])> {
        reply
            .relayed
            .as_ref()
            .map(|r| r.iter().collect())
            .unwrap_or_default()
    }

    /// The instance's hop-by-hop fields (RFC 9110 §7.6.1) are not in the
    /// response the proxy relays; its end-to-end fields are, and the
    /// connection they described is reused as they said it may be.
    #[tokio::test]
    async fn hop_by_hop_fields_of_a_response_are_not_relayed() {
        let (addr, mut seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Authenticate: Basic\r\nX-Secret: 1\r\nUpgrade: h2c\r\nTrailer: x-sum\r\n\
              Transfer-Encoding: chunked\r\nX-Keep: yes\r\nContent-Type: text/plain\r\n\r\n\
              2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
        ])
        .await;
        let client = outbound();
        let res = match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => res,
            Err(e) => panic!("{e}"),
        };
        // As sent, in order, beside the response, whose map is left for
        // what the gateway adds.
        let relayed = relayed_of(&res);
        assert_eq!(
            relayed,
            [
                (&b"X-Keep"[..], &b"yes"[..]),
                (b"Content-Type", b"text/plain")
            ]
        );
        assert!(res.res.headers().is_empty());
        let res = res.into_response();
        let mut names: Vec<&str> = res.headers().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-keep"]);
        assert_eq!(body_of(res.into()).await, b"hi");
        // `Connection: keep-alive`: the same connection serves the next.
        match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => assert_eq!(res.res.status(), StatusCode::NO_CONTENT),
            Err(e) => panic!("{e}"),
        }
        let conns: Vec<usize> = [seen.recv().await, seen.recv().await]
            .into_iter()
            .flatten()
            .map(|(conn, _)| conn)
            .collect();
        assert_eq!(conns, [1, 1]);
    }

    /// RFC 9112 §6.3: a response framed by `Transfer-Encoding` whose
    /// `Content-Length` disagrees is read by its chunks, and the length is
    /// not relayed (it would frame the client's copy: cut short here).
    #[tokio::test]
    async fn a_length_beside_a_transfer_coding_is_not_relayed() {
        let (addr, _seen) = instance(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\
              X-Keep: yes\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ])
        .await;
        let res = match outbound()
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => res,
            Err(e) => panic!("{e}"),
        };
        let relayed = relayed_of(&res);
        assert_eq!(relayed, [(&b"X-Keep"[..], &b"yes"[..])]);
        assert_eq!(body_of(res.into_response().into()).await, b"hello");
    }

    #[tokio::test]
    async fn a_switch_to_websocket_becomes_a_tunnel_only_when_asked() {
        const SWITCHED: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        let ws = || {
            let mut req = get("/ws");
            for (name, value) in [
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("sec-websocket-version", "13"),
            ] {
                req.parts.headers.insert(
                    header::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            req
        };
        let mut asked = ws();
        asked.parts.extensions.insert(WebSocket);
        let (addr, mut seen) = instance(vec![SWITCHED]).await;
        let reply = match outbound()
            .send("svc", addr, &asked, OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(reply) => reply,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(reply.res.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut res = reply.res;
        let Some(tunnel) = upgrade::Handoff::take(&mut res) else {
            panic!("no tunnel");
        };
        // The first frame came with the head: it stays for the client.
        assert_eq!(&tunnel.read[..], b"\x81\x02hi");
        let fields: Vec<String> = reply
            .relayed
            .iter()
            .flat_map(|r| r.iter())
            .map(|(n, _)| String::from_utf8_lossy(n).to_lowercase())
            .collect();
        assert_eq!(fields, ["sec-websocket-accept"]);
        let Some((_, sent)) = seen.recv().await else {
            panic!("the instance saw no request");
        };
        let sent = String::from_utf8_lossy(&sent).to_lowercase();
        assert!(sent.starts_with("get /ws http/1.1\r\n"), "{sent}");
        assert!(
            sent.contains("\r\nsec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n"),
            "{sent}"
        );
        assert!(
            sent.contains("\r\nconnection: upgrade\r\nupgrade: websocket\r\n"),
            "{sent}"
        );
        assert_eq!(sent.matches("upgrade: websocket").count(), 1, "{sent}");

        // Unasked (a plain GET whose client said Upgrade over HTTP/2, or a
        // body-carrying request), or switched to something else: refused.
        let mut h2c = ws();
        h2c.parts.extensions.insert(WebSocket);
        for (req, answer) in [
            (ws(), SWITCHED),
            (
                h2c,
                &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
                    [..],
            ),
        ] {
            let (addr, _seen) = instance(vec![answer]).await;
            match outbound()
                .send("svc", addr, &req, OutBody::Full(Bytes::new()), far())
                .await
            {
                Err(SendError::Protocol(_)) => {}
                Err(e) => panic!("{e}"),
                Ok(r) => panic!("accepted {}", r.res.status()),
            }
        }
    }

    #[tokio::test]
    async fn invalid_responses_are_protocol_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\nx"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ] {
            let (addr, _seen) = instance(vec![bad]).await;
            match outbound()
                .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
                .await
            {
                Err(SendError::Protocol(_)) => {}
                Err(e) => panic!("{:?}: {e}", String::from_utf8_lossy(bad)),
                Ok(r) => panic!(
                    "{:?}: accepted {}",
                    String::from_utf8_lossy(bad),
                    r.res.status()
                ),
            }
        }
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error_and_an_early_close_is_lost() {
        let (addr, _seen) =
            instance(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]).await;
        let client = outbound();
        // The fake instance closes after its last canned response.
        match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => {
                let r = tokio::time::timeout(TEST_DEADLINE, res.res.into_body().collect()).await;
                assert!(matches!(r, Ok(Err(_))), "a truncated body must fail");
            }
            Err(e) => panic!("{e}"),
        }
        let (addr, _seen) = instance(vec![]).await;
        match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Err(SendError::Lost(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(r) => panic!("{}", r.res.status()),
        }
    }

    #[tokio::test]
    async fn a_body_the_instance_stops_sending_fails_after_the_body_timeout() {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("{e}"),
        };
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        // Sends 3 of 10 bytes, then nothing, with the connection open.
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await;
            std::future::pending::<()>().await;
            drop(s);
        });
        let client = match crate::client::connector(&limits(), None) {
            Ok(c) => Outbound::new(c, Duration::from_millis(200)),
            Err(e) => panic!("{e}"),
        };
        let res = match client
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => res,
            Err(e) => panic!("{e}"),
        };
        let mut body = res.res.into_body();
        let first = tokio::time::timeout(TEST_DEADLINE, body.frame()).await;
        let first = first.ok().flatten().and_then(|f| f.ok()?.into_data().ok());
        assert_eq!(first.as_deref(), Some(&b"abc"[..]));
        match tokio::time::timeout(TEST_DEADLINE, body.frame()).await {
            Ok(Some(Err(e))) => assert!(
                e.to_string()
                    .contains("sent nothing of the response body for 200ms"),
                "{e}"
            ),
            Ok(other) => panic!("{:?}", other.map(|f| f.map(|_| ()))),
            Err(_) => panic!("the stalled body never failed"),
        }
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
            l.local_addr().unwrap_or_else(|e| panic!("{e}"))
        };
        match outbound()
            .send("svc", addr, &get("/"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Err(SendError::Connect(_)) => {}
            Err(e) => panic!("{e}"),
            Ok(r) => panic!("{}", r.res.status()),
        }
    }

    #[tokio::test]
    async fn request_bodies_are_framed_by_length_or_chunks() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            let mut answered = 0;
            while answered < 2 {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
                if answered == 0 && got.windows(9).any(|w| w == b"\r\n\r\nhello") {
                    let _ = s.write_all(ok).await;
                    answered = 1;
                }
                if answered == 1 && got.ends_with(b"0\r\n\r\n") {
                    let _ = s.write_all(ok).await;
                    answered = 2;
                }
            }
            got
        });
        let client = outbound();
        let mut post = get("/");
        post.parts.method = Method::POST;
        // A length-known body: content-length.
        match client
            .send(
                "svc",
                addr,
                &post,
                OutBody::Full(Bytes::from_static(b"hello")),
                far(),
            )
            .await
        {
            Ok(res) => drop(body_of(res).await),
            Err(e) => panic!("{e}"),
        }
        // A stream of unknown length: chunked.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let stream = body::boxed(http_body_util::StreamBody::new(frames));
        let sending = tokio::spawn({
            let client = client.clone();
            let post = post.clone();
            async move {
                client
                    .send("svc", addr, &post, OutBody::Stream(stream), far())
                    .await
                    .map(|_| ())
            }
        });
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).await;
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"cde")))).await;
        drop(tx);
        match tokio::time::timeout(TEST_DEADLINE, sending).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("{other:?}"),
        }
        let got = match tokio::time::timeout(TEST_DEADLINE, server).await {
            Ok(Ok(g)) => g,
            other => panic!("{other:?}"),
        };
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("content-length: 5\r\n\r\nhello"), "{text}");
        assert!(
            text.contains("transfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"),
            "{text}"
        );
    }

    /// An instance that answers `413` as soon as it has a request head and
    /// never reads the body; with `close`, it then closes the connection
    /// (with the body unread: a reset).
    async fn early_answerer(close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig",
                        )
                        .await;
                    if !close {
                        // Holds the connection without reading.
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                });
            }
        });
        addr
    }

    fn post() -> UpstreamRequest {
        let mut req = get("/upload");
        req.parts.method = Method::POST;
        req
    }

    #[tokio::test]
    async fn an_answer_before_the_body_is_written_is_the_response() {
        let big = Bytes::from(vec![b'x'; 8 * 1024 * 1024]);
        for close in [false, true] {
            let addr = early_answerer(close).await;
            let client = outbound();
            // Several times: with `close`, the reset races the answer.
            let request = post();
            for _ in 0..5 {
                let sending = client.send("svc", addr, &request, OutBody::Full(big.clone()), far());
                match tokio::time::timeout(TEST_DEADLINE, sending).await {
                    Ok(Ok(res)) => {
                        assert_eq!(
                            res.res.status(),
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "close={close}"
                        );
                        assert_eq!(body_of(res).await, b"big");
                    }
                    Ok(Err(e)) => panic!("close={close}: {e}"),
                    Err(_) => panic!("close={close}: no answer"),
                }
            }
            // Nothing of those requests' connections may be reused.
            let idle = client.shared.idle.lock().map(|i| i.len()).unwrap_or(1);
            assert_eq!(idle, 0);
        }
    }

    #[tokio::test]
    async fn an_answer_while_the_client_is_still_sending_is_the_response() {
        let addr = early_answerer(false).await;
        // A client body that never ends.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let _ = tx
            .send(Ok(Frame::data(Bytes::from_static(b"partial"))))
            .await;
        let stream = body::boxed(http_body_util::StreamBody::new(frames));
        let (client, request) = (outbound(), post());
        let sending = client.send("svc", addr, &request, OutBody::Stream(stream), far());
        match tokio::time::timeout(TEST_DEADLINE, sending).await {
            Ok(Ok(res)) => assert_eq!(res.res.status(), StatusCode::PAYLOAD_TOO_LARGE),
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!("the early answer was not seen"),
        }
        drop(tx);
    }

    #[tokio::test]
    async fn an_idle_connection_the_instance_closed_does_not_look_alive() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let conn_to = |io: tokio::net::TcpStream| Conn {
            io: Stream::Plain(io),
            service: "svc".into(),
            addr,
            read: BytesMut::new(),
            write: Vec::new(),
            timer: None,
        };
        let (open, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let mut conn = conn_to(open.unwrap_or_else(|e| panic!("{e}")));
        let (peer, _) = accepted.unwrap_or_else(|e| panic!("{e}"));
        assert!(conn.looks_alive(), "an idle open connection is reusable");

        drop(peer);
        // Once the reactor has seen the close, the check sees it too.
        let Stream::Plain(tcp) = &conn.io else {
            panic!("plain")
        };
        let ready = tokio::time::timeout(TEST_DEADLINE, tcp.readable()).await;
        assert!(ready.is_ok(), "the close was never reported");
        assert!(
            !conn.looks_alive(),
            "a closed connection was taken for alive"
        );
    }

    /// A fake instance whose connections each answer one request and then
    /// give out at the next: it reads that request, then closes without
    /// an answer (`garbage` false) or writes bytes that are no response
    /// and closes: what the gateway meets on a pooled connection the
    /// instance closed (or wrote into) as the request went out. Reports
    /// each request head with its connection's number.
    async fn stale_instance(
        garbage: bool,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    ) {
        let fake = fake_instance(move |_, request_no, _| {
            Some(if request_no == 1 {
                Act::answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            } else if garbage {
                Act::answer(b"\0\x15garbage\r\n\r\n").closing_if(true)
            } else {
                Act::answer(b"").closing_if(true)
            })
        })
        .await;
        (fake.addr, fake.seen)
    }

    /// A request that may be sent twice, on a pooled connection that gives
    /// out before any answer, is sent once more on a fresh connection and
    /// answered there: not a failure at all.
    #[tokio::test]
    async fn a_stale_pooled_connection_is_replaced_for_a_request_that_may_be_sent_twice() {
        for garbage in [false, true] {
            let (addr, mut seen) = stale_instance(garbage).await;
            let client = outbound();
            let mut put = get("/p");
            put.parts.method = Method::PUT;
            for (req, body) in [
                (get("/a"), OutBody::Full(Bytes::new())),
                (get("/b"), OutBody::Full(Bytes::new())),
                (put, OutBody::Full(Bytes::from_static(b"body"))),
            ] {
                match client.send("svc", addr, &req, body, far()).await {
                    Ok(res) => assert_eq!(body_of(res).await, b"ok", "garbage: {garbage}"),
                    Err(e) => panic!("garbage: {garbage}: {e}"),
                }
            }
            // `/a` opens connection 1; `/b` goes on it, which gives out,
            // and again on 2; the PUT on 2, which gives out, and on 3,
            // with its body both times.
            let mut got = Vec::new();
            while let Ok(Some((conn, head))) =
                tokio::time::timeout(Duration::from_millis(200), seen.recv()).await
            {
                let line = String::from_utf8_lossy(&head);
                let line = line.split("\r\n").next().unwrap_or_default().to_string();
                if line.starts_with("PUT") {
                    assert!(head.ends_with(b"\r\n\r\nbody"), "{head:?}");
                }
                got.push((conn, line));
            }
            let want: Vec<(usize, String)> = [
                (1, "GET /a"),
                (1, "GET /b"),
                (2, "GET /b"),
                (2, "PUT /p"),
                (3, "PUT /p"),
            ]
            .into_iter()
            .map(|(c, l)| (c, format!("{l} HTTP/1.1")))
            .collect();
            assert_eq!(got, want, "garbage: {garbage}");
        }
    }

    /// A request that may not reach the instance twice (a POST without an
    /// `Idempotency-Key`: the instance may have acted on it before it
    /// closed) is not sent again; it fails as `Stale`, which the proxy
    /// does not hold against the instance. A fresh connection that gives
    /// out is no stale one: `Lost`, as before.
    #[tokio::test]
    async fn a_stale_pooled_connection_is_not_replaced_for_a_request_that_may_not_be_sent_twice() {
        let (addr, mut seen) = stale_instance(false).await;
        let client = outbound();
        match client
            .send("svc", addr, &get("/a"), OutBody::Full(Bytes::new()), far())
            .await
        {
            Ok(res) => assert_eq!(body_of(res).await, b"ok"),
            Err(e) => panic!("{e}"),
        }
        let mut post = get("/p");
        post.parts.method = Method::POST;
        match client
            .send(
                "svc",
                addr,
                &post,
                OutBody::Full(Bytes::from_static(b"body")),
                far(),
            )
            .await
        {
            Err(SendError::Stale(error)) => assert!(matches!(*error, SendError::Lost(_))),
            Err(e) => panic!("{e}"),
            Ok(r) => panic!("{}", r.res.status()),
        }
        let mut conns = Vec::new();
        while let Ok(Some((conn, _))) =
            tokio::time::timeout(Duration::from_millis(200), seen.recv()).await
        {
            conns.push(conn);
        }
        assert_eq!(conns, [1, 1], "the POST was sent again");
    }
}
