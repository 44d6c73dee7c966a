//! The gateway's own HTTP/1.x server connection: one task per client
//! connection reads and parses each request head, builds the
//! `http::Request`, polls the tower stack's future inline, and writes the
//! response, with nothing spawned per request.
//!
//! Why not hyper's server: with hyper on both sides, the gateway cost about
//! twice nginx's CPU per proxied request (benches/gateway), while a
//! prototype doing all of a connection's work in one task with httparse
//! (examples/bench_raw_h1.rs) beat nginx. Most of that was the pooled
//! client running every upstream connection as a task of its own (replaced
//! by `outbound`); on this side, hyper's generic connection machinery (a
//! dispatcher state machine between socket and service, the request body
//! behind a want-signalling channel, I/O through its own traits and
//! buffers) serves a proxy that has one request at a time per connection
//! no better than this loop does. Measured with the in-task client
//! (interleaved wrk -c64 runs, benches/gateway's upstream): 4–15 % less CPU
//! per request than hyper's server (about 22–24 µs against 25–26) and 5–14 %
//! more throughput. The parsing is hyper's all the same: httparse is the
//! parser hyper uses, the framing rules follow hyper's and RFC 9112, and
//! chunked bodies go through `chunked`, the decoder the upstream client
//! uses.
//! HTTP/2 (h2c, or h2 over TLS) is still served by hyper (see `server`).
//! The connection is a plain TCP socket or a TLS stream over one
//! (`transport`); the driver is the same for both.
//!
//! What a connection guarantees:
//!
//! - **Limits.** A head over `max_header_bytes` or with more than
//!   `max_headers` headers gets 431; a malformed one 400; a transfer coding
//!   other than chunked 501; a `CONNECT` 405. Each closes the connection (lingering, so the
//!   client reads the answer even while still sending), and is recorded as
//!   the stack records its own answers (`Handler::refused`: an access-log
//!   line, a count under `route="unmatched"`), under a request id the
//!   answer carries.
//! - **Framing** (`head`, `decode`): strict where two parsers could
//!   disagree about where a request ends (request smuggling):
//!   `Content-Length` with `Transfer-Encoding` is 400, `Content-Length` is
//!   digits only, the head's lines and chunk lines end in CRLF. A body already in the buffer
//!   becomes a plain in-memory body; a longer one streams through a
//!   one-frame slot filled by this task while it polls the stack
//!   (`incoming`), so the client is read as fast as the body is consumed.
//! - **`Expect: 100-continue`** is answered when the stack first polls the
//!   body; a request answered without reading its body closes the
//!   connection afterwards, as does any request whose body was not read to
//!   its end.
//! - **Timeouts.** A head taking longer than `header_read_timeout` from its
//!   first byte gets 408; a kept-alive connection idle for `idle_timeout`
//!   is closed silently. A streamed request body that the stack has
//!   waited `body_timeout` for, the client sending nothing, fails with
//!   `BodyStalled` (the proxy answers 408, and the connection closes
//!   with the rest unread): the pause is timed on the connection's one
//!   timer, and only while the stack waits for the client, not while it
//!   is busy with what it was given (an instance slow to take it). A
//!   client closing its side while its request is in progress abandons
//!   the request (the stack's future is dropped).
//! - **Responses** (`encode`): `content-length` when the size is known,
//!   chunked otherwise (close-delimited for HTTP/1.0), nothing for HEAD,
//!   1xx, 204 and 304; a cached `date`; the head and whatever body frames
//!   are ready leave in one write.
//! - **Keep-alive** for HTTP/1.1 unless either side says `close`, for
//!   HTTP/1.0 only on `Connection: keep-alive`; pipelined requests are
//!   answered in order.
//! - **Lifetime.** The `max_connection_requests`th response, or the first
//!   begun once the connection is `max_connection_age` old, says
//!   `connection: close`, and the connection closes once it is written (a
//!   request pipelined behind it unread); a kept-alive connection idle
//!   when it comes of age closes then. A request in progress is never
//!   cut, nor a WebSocket tunnel.
//! - **Shutdown.** When the gateway stops, an idle connection closes at
//!   once; one with a request in progress finishes it, says
//!   `connection: close` if its head is not written yet, and closes.
//! - **WebSocket.** A handshake (`head` decides what is one) is marked for
//!   the proxy; when the instance switches, the `101` is written and the
//!   connection becomes a tunnel to the instance's (`upgrade`), ending
//!   with it. Bytes the client sent after its handshake go to the
//!   instance first.

pub(crate) mod decode;
pub(crate) mod encode;
pub(crate) mod head;
mod incoming;

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Fuse};
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, SERVER};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body::Body as _;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use self::decode::Decoder;
use self::encode::{BodyEncoder, Exchange, Framing, HeadFields, Out, Then};
use self::head::{BodyLength, Head};
use self::incoming::{BodyError, Room};
use crate::access_log::Refused;
use crate::body::{self, Body, BodyStalled};
use crate::chunked::{ChunkedDecoder, ChunkedError, Decoded};
use crate::client_cert::ClientCert;
use crate::clock;
use crate::config::Limits;
use crate::conn_limit::Expired;
use crate::relayed::Reply;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::server::{ConnInfo, Handler};
use crate::transport::{Bufs, Transport};
use crate::upgrade::{self, Handoff, Tunnel, WebSocket};

/// Spare room in the read buffer before reading a head.
const READ_SPARE: usize = 8 * 1024;
/// Spare room before reading body bytes: fewer, larger reads.
const BODY_READ_SPARE: usize = 32 * 1024;
/// Body bytes gathered before writing; also the most buffered per
/// connection while the client reads slowly.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// How long writing a refusal (400, 408, 431 …) may take.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(1);
/// Body frames fed to the stack in one poll before yielding to other tasks.
const FEED_ROUNDS: usize = 16;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The limits an HTTP/1 connection enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// The longest pause in sending a response body, and in waiting for
    /// the client's request body (`Limits::body_timeout`).
    pub body_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// Responses a connection carries before it closes
    /// (`Limits::max_connection_requests`); `u64::MAX`: no limit.
    pub max_requests: u64,
    /// How long a connection lives before it closes, from when it was
    /// accepted (`Limits::max_connection_age`).
    pub max_age: Option<Duration>,
}

impl Settings {
    pub(crate) fn new(limits: &Limits) -> Settings {
        Settings {
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            body_timeout: limits.body_timeout,
            tunnel_idle_timeout: limits.tunnel_idle_timeout,
            max_requests: match limits.max_connection_requests {
                0 => u64::MAX,
                n => n,
            },
            max_age: limits.max_connection_age,
        }
    }
}

/// Serves HTTP/1.x on `io` until the connection ends; `read` holds what was
/// already read from it.
pub(crate) async fn serve<H: Handler>(
    start: Start,
    stack: H,
    settings: Settings,
    stopping: watch::Receiver<()>,
) {
    let Start {
        io,
        read,
        info,
        client_cert,
        head_by,
        accepted,
    } = start;
    let mut conn = Conn {
        first_head_by: Some(head_by),
        responses: 0,
        expires: settings.max_age.map(|age| accepted + age),
        timer: Box::pin(tokio::time::sleep(settings.idle_timeout)),
        stop_signal: StopSignal::new(&stopping),
        io,
        rbuf: read,
        out: Out::default(),
        info,
        client_cert,
        stack,
        settings,
        stopping,
        spans: Vec::new(),
        read_closed: false,
        bad_body: false,
    };
    if conn.run().await == End::Close {
        conn.io.close().await;
    }
}

/// Ready once the server is stopping. One future for the connection's
/// life: it registers with the channel once, where a `changed()` made at
/// each wait for a head would register and deregister under the channel's
/// lock (shared by every connection) on every request.
struct StopSignal {
    changed: Fuse<BoxFuture<'static, ()>>,
    stopping: watch::Receiver<()>,
    /// The waker `changed` is registered with, once it has been polled.
    /// Polled again with the same waker and nothing sent, it would only
    /// find that under the channel's lock again (~75 instructions per
    /// wait, twice a request, `instructions.sh`); the channel's version
    /// (one atomic load) says as much.
    armed: Option<Waker>,
}

impl StopSignal {
    fn new(stopping: &watch::Receiver<()>) -> StopSignal {
        let mut signal = stopping.clone();
        StopSignal {
            changed: async move {
                // An error means the server is gone: stopping too.
                let _ = signal.changed().await;
            }
            .boxed()
            .fuse(),
            stopping: stopping.clone(),
            armed: None,
        }
    }
}

impl Future for StopSignal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.armed
            && waker.will_wake(cx.waker())
            && !self.stopping.has_changed().unwrap_or(true)
        {
            return Poll::Pending;
        }
        match self.changed.poll_unpin(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                self.armed = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Shut the write side and linger.
    Close,
    /// Just drop the socket: the client is gone or the stream is broken.
    Abort,
}

/// Why no request head came.
enum Stop {
    Close,
    Abort,
    /// Answered with this status, `error.code` and message; the head began
    /// at the instant.
    Refuse(StatusCode, &'static str, &'static str, Instant),
}

/// After an exchange.
enum Next {
    KeepAlive,
    Close,
    Abort,
}

/// A request body being fed to the stack.
struct Feed {
    tx: incoming::Sender,
    decoder: Decoder,
    /// `100 Continue` is owed once the stack asks for the body.
    expect_continue: bool,
    /// The response head is written: too late for `100 Continue`.
    responded: bool,
    /// Nothing more will be fed: complete, failed, or no longer wanted.
    finished: bool,
    /// The whole body was read off the connection.
    complete: bool,
    /// Since when the stack has been waiting for more of the body and the
    /// client has sent nothing (`body_timeout`, see `poll_paused`); set
    /// only once the feed had to wait for the client.
    paused_since: Option<Instant>,
}

impl Feed {
    fn end(&mut self, end: Result<(), BodyError>) {
        self.complete = end.is_ok();
        self.finished = true;
        self.tx.finish(end);
    }
}

struct Conn<H> {
    io: Transport,
    rbuf: BytesMut,
    out: Out,
    info: ConnInfo,
    /// Given to each request, in its extensions.
    client_cert: Option<Arc<ClientCert>>,
    stack: H,
    settings: Settings,
    stopping: watch::Receiver<()>,
    stop_signal: StopSignal,
    /// One timer for the connection's life, moved as deadlines change.
    timer: Pin<Box<Sleep>>,
    /// Scratch for the head parser.
    spans: Vec<head::Span>,
    /// The client closed its sending side.
    read_closed: bool,
    /// A request body's framing was invalid: the connection cannot be reused.
    bad_body: bool,
    /// Until its first head has arrived: when it must have (see [`Start`]).
    first_head_by: Option<Instant>,
    /// Responses begun, toward `Settings::max_requests`.
    responses: u64,
    /// When it has lived `Settings::max_age`.
    expires: Option<Instant>,
}

/// A connection as the HTTP/1 driver takes it over.
pub(crate) struct Start {
    pub io: Transport,
    /// What was read from it already.
    pub read: BytesMut,
    pub info: ConnInfo,
    /// The client's verified certificate.
    pub client_cert: Option<Arc<ClientCert>>,
    /// When the first request's head must have arrived: `header_timeout`
    /// after the connection was accepted (or its TLS handshake done). A
    /// connection that has said nothing yet is no idle keep-alive one,
    /// whose wait for a head `idle_timeout` bounds: timed as one, a
    /// client could hold a connection for a minute by saying nothing after
    /// its handshake, and a head begun at the last moment would get
    /// `header_timeout` more.
    pub head_by: Instant,
    /// When it was accepted, which its age (`Settings::max_age`) counts
    /// from.
    pub accepted: Instant,
}

impl<H: Handler> Conn<H> {
    async fn run(&mut self) -> End {
        loop {
            let head = match self.read_head().await {
                Ok(head) => head,
                Err(Stop::Close) => return End::Close,
                Err(Stop::Abort) => return End::Abort,
                Err(Stop::Refuse(status, code, message, began)) => {
                    self.refuse_request(status, code, message, began, None)
                        .await;
                    return End::Close;
                }
            };
            // One request and its response. Here, not in an `async fn` of
            // its own: that future, with the stack's inside it (~3 KB),
            // would be made and then moved into this one on every request.
            // An empty body is a box of nothing: no allocation.
            let mut req = Request::new(body::empty());
            let (mut feed, ex, keep_alive) = match self.request(head, &mut req) {
                Ok(request) => request,
                Err(e) => {
                    tracing::debug!(target: "flotilla::gateway", peer = %self.info.peer, error = %e, "bad request body");
                    let (parts, _) = req.into_parts();
                    self.refuse_request(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "the chunked request body is malformed",
                        clock::now(),
                        Some((parts.method, parts.uri)),
                    )
                    .await;
                    return End::Close;
                }
            };
            let res = {
                // Pinned where it is made, in this task rather than a box of
                // its own; dropped at the block's end, before the response.
                let mut call = std::pin::pin!(self.stack.call(req, self.info));
                poll_fn(|cx| self.poll_call(cx, call.as_mut(), &mut feed)).await
            };
            let next = match res {
                Some(mut res) => {
                    if let Some(tunnel) = Handoff::take(&mut res.res) {
                        // Boxed: the tunnel's future would otherwise make
                        // this one larger for every request.
                        return Box::pin(self.switch(res, tunnel, ex.websocket)).await;
                    }
                    // The head here, the body in a future: see `response_head`.
                    let (body, encoder, close) = self.response_head(res, ex, keep_alive, &mut feed);
                    self.response_body(body, encoder, close, &mut feed).await
                }
                None => Next::Abort,
            };
            match next {
                Next::KeepAlive => {}
                Next::Close => return End::Close,
                Next::Abort => return End::Abort,
            }
        }
    }

    /// Whether this response, begun now, is the connection's last by its
    /// lifetime limits: the `max_requests`th, or the first after it has
    /// lived `max_age`. An add and a compare or two a request, with the
    /// clock this poll already read (`clock`); nothing without an age.
    fn spent(&mut self) -> Option<Expired> {
        self.responses += 1;
        if self.responses >= self.settings.max_requests {
            Some(Expired::MaxRequests)
        } else if self.expired() {
            Some(Expired::MaxAge)
        } else {
            None
        }
    }

    /// Whether it has lived `max_age`.
    fn expired(&self) -> bool {
        self.expires.is_some_and(|at| clock::now() >= at)
    }

    /// `deadline`, or the connection's expiry if that comes first: a
    /// connection that comes of age while idle closes then. One already of
    /// age as its idle wait begins keeps `deadline`: its last response
    /// began before the age (so it did not say `connection: close`) and
    /// ended after it, and closing now, as the client reuses it, would fail
    /// the request it may be sending; `spent` closes the next one.
    fn before_expiry(&self, deadline: Instant) -> Instant {
        match self.expires {
            Some(at) if at < deadline && at > clock::now() => at,
            _ => deadline,
        }
    }

    fn stopping(&self) -> bool {
        // An error means the server is gone: stopping too.
        self.stopping.has_changed().unwrap_or(true)
    }

    /// Reads until a whole head is buffered, or the connection should end.
    async fn read_head(&mut self) -> Result<Head, Stop> {
        let limits = head::Limits {
            max_bytes: self.settings.max_header_bytes,
            max_headers: self.settings.max_headers,
        };
        // Set when first waited for: a head that arrives whole in one read
        // (the usual case) costs no clock reads here.
        let mut idle_deadline = None;
        let mut head_deadline = None;
        if let Some(by) = self.first_head_by.take() {
            // Not cut short by the age: every connection serves a request
            // (its handshake may have taken most of `header_timeout`, and
            // a client does not retry a request on a fresh connection).
            idle_deadline = Some(by);
            head_deadline = Some(by);
        }
        let mut scanned = 0;
        loop {
            // Line ends before a request line are ignored (RFC 9112 §2.2:
            // old clients send one after a body); they do not start a head
            // nor its clock.
            let blank = self
                .rbuf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 && scanned == 0 {
                self.rbuf.advance(blank);
                if self.rbuf.is_empty() {
                    head_deadline = None;
                }
            }
            if self.rbuf.len() > scanned {
                // A head is complete only once a line ends: parse when one
                // did (and on a head's first bytes, to refuse garbage at
                // once), not on every read of a slowly arriving head.
                let fresh = self.rbuf.get(scanned..).unwrap_or_default();
                if scanned == 0 || fresh.contains(&b'\n') || self.rbuf.len() > limits.max_bytes {
                    match head::parse(&mut self.rbuf, limits, &mut self.spans) {
                        Ok(Some(head)) => return Ok(head),
                        Ok(None) => {}
                        Err(invalid) => {
                            // Its first bytes came when its clock started,
                            // or in this read.
                            let began = head_deadline
                                .and_then(|d| d.checked_sub(self.settings.header_timeout))
                                .unwrap_or_else(clock::now);
                            return Err(Stop::Refuse(
                                invalid.status(),
                                invalid.code(),
                                invalid.message(),
                                began,
                            ));
                        }
                    }
                }
                scanned = self.rbuf.len();
            }
            let idle = self.rbuf.is_empty();
            if self.read_closed || (idle && self.stopping()) {
                return Err(Stop::Close);
            }
            // The head's clock starts with its first bytes (or now, for one
            // pipelined behind the last request); the idle clock with the
            // wait for a head.
            let deadline = if idle {
                *idle_deadline.get_or_insert_with(|| {
                    self.before_expiry(clock::now() + self.settings.idle_timeout)
                })
            } else {
                *head_deadline.get_or_insert_with(|| clock::now() + self.settings.header_timeout)
            };
            clock::arm(&mut self.timer, deadline);
            let Conn {
                io,
                rbuf,
                stop_signal,
                timer,
                ..
            } = self;
            let event = tokio::select! {
                biased;
                read = poll_fn(|cx| io.poll_read_into(cx, rbuf, READ_SPARE)) => Some(read),
                () = stop_signal, if idle => return Err(Stop::Close),
                () = timer.as_mut() => None,
            };
            match event {
                Some(Ok(0)) => self.read_closed = true,
                Some(Ok(_)) => {}
                Some(Err(_)) => return Err(Stop::Abort),
                // The timer may fire early (see `clock::arm`): then it is re-armed.
                None if clock::now() < deadline => {}
                None if idle => {
                    // Between requests: an expired connection has nothing
                    // in progress to finish.
                    if self.expired() {
                        Expired::MaxAge.count();
                    }
                    return Err(Stop::Close);
                }
                // Only a head begun is timed out: a connection that sent
                // nothing (a preconnect, an idle keep-alive one) closes
                // silently above, and is no request to log.
                None => {
                    tracing::debug!(target: "flotilla::gateway", peer = %self.info.peer, "request headers too slow; answering 408");
                    return Err(Stop::Refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_timeout",
                        "the request headers took too long to arrive",
                        deadline
                            .checked_sub(self.settings.header_timeout)
                            .unwrap_or_else(clock::now),
                    ));
                }
            }
        }
    }

    /// Makes `req` the request `head` starts; returns what feeds it its
    /// body, how its response is framed, and whether the connection may
    /// stay open. Into the caller's request rather than returned with the
    /// rest: the request (240 bytes) was copied out in the result and again
    /// out of it, two `memcpy` calls a request.
    fn request(
        &mut self,
        head: Head,
        req: &mut Request<Body>,
    ) -> Result<(Option<Feed>, Exchange, bool), ChunkedError> {
        let ex = Exchange {
            head: head.method == Method::HEAD,
            version: head.version,
            websocket: head.websocket,
        };
        // Before the body, which may be refused: its log line names them.
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        let (body, feed) = self.request_body(head.body, head.expect_continue)?;
        *req.body_mut() = body;
        if head.websocket {
            req.extensions_mut().insert(WebSocket);
        }
        if let Some(cert) = &self.client_cert {
            req.extensions_mut().insert(Arc::clone(cert));
        }
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        Ok((feed, ex, head.keep_alive))
    }

    /// The request body: in memory if it is all buffered, else streamed
    /// (starting with what is buffered).
    fn request_body(
        &mut self,
        length: BodyLength,
        expect_continue: bool,
    ) -> Result<(Body, Option<Feed>), ChunkedError> {
        let (decoder, buffered) = match length {
            BodyLength::None => return Ok((body::empty(), None)),
            BodyLength::Length(n) => {
                if let Ok(len) = usize::try_from(n)
                    && len <= self.rbuf.len()
                {
                    return Ok((body::full(self.rbuf.split_to(len).freeze()), None));
                }
                (Decoder::Length(n), None)
            }
            BodyLength::Chunked => {
                // Decoded as far as it is buffered: framing errors in what
                // the client already sent are refused before the stack runs.
                let mut decoder = Decoder::Chunked(ChunkedDecoder::default());
                let mut pieces = Vec::new();
                let done = loop {
                    match decoder.decode(&mut self.rbuf)? {
                        Decoded::Data(data) => pieces.push(data),
                        Decoded::NeedMore => break false,
                        Decoded::Done => break true,
                    }
                };
                let data = concat(pieces);
                if done {
                    let body = if data.is_empty() {
                        body::empty()
                    } else {
                        body::full(data)
                    };
                    return Ok((body, None));
                }
                (decoder, (!data.is_empty()).then_some(data))
            }
        };
        let (tx, rx) = incoming::channel(decoder.left());
        if let Some(data) = buffered {
            tx.send(data);
        }
        let feed = Feed {
            tx,
            decoder,
            expect_continue,
            responded: false,
            finished: false,
            complete: false,
            paused_since: None,
        };
        Ok((body::boxed(rx), Some(feed)))
    }

    /// Polls the stack's future, feeding it the request body meanwhile.
    /// `None`: the client went away.
    fn poll_call(
        &mut self,
        cx: &mut Context<'_>,
        mut call: Pin<&mut impl Future<Output = Reply>>,
        feed: &mut Option<Feed>,
    ) -> Poll<Option<Reply>> {
        for _ in 0..FEED_ROUNDS {
            let (fed, watch) = match feed.as_mut().filter(|f| !f.finished) {
                Some(f) => match self.poll_feed(cx, f) {
                    Ok(fed) => (fed, false),
                    Err(()) => return Poll::Ready(None),
                },
                None => (false, true),
            };
            if let Poll::Ready(res) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(res));
            }
            // Whether the client went away is asked only while the stack
            // is still at work: the poll that brings the response (most
            // requests are two polls, the second that one) reads nothing,
            // a read of the client's socket fewer per request.
            if watch && self.poll_gone(cx) {
                return Poll::Ready(None);
            }
            // Fed a frame the stack may already have taken (an in-task
            // upstream client): feed the next one without a wake-up.
            if !fed {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Moves request body bytes from the connection into the body's slot
    /// while there is room. `Ok(true)`: something was handed over. `Err`:
    /// the connection broke.
    fn poll_feed(&mut self, cx: &mut Context<'_>, f: &mut Feed) -> Result<bool, ()> {
        let mut fed = false;
        while !f.finished {
            match f.tx.room(cx) {
                Room::Gone => {
                    // The stack dropped the body; the rest stays unread and
                    // the connection closes after the response.
                    f.finished = true;
                    break;
                }
                Room::Full => {
                    // The stack is not reading: any wait is the instance's.
                    f.paused_since = None;
                    break;
                }
                Room::Free { polled } => {
                    if f.expect_continue {
                        if !polled || f.responded {
                            break;
                        }
                        f.expect_continue = false;
                        self.out.extend(CONTINUE);
                    }
                }
            }
            if !f.responded {
                // Only a `100 Continue` can be pending before the response.
                match self.poll_flush(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        f.end(Err(BodyError::Io(e)));
                        return Err(());
                    }
                    Poll::Pending => break,
                }
            }
            match f.decoder.decode(&mut self.rbuf) {
                Err(e) => {
                    self.bad_body = true;
                    f.end(Err(e.into()));
                }
                Ok(Decoded::Data(data)) => {
                    f.tx.send(data);
                    fed = true;
                }
                Ok(Decoded::Done) => {
                    f.end(Ok(()));
                    fed = true;
                }
                Ok(Decoded::NeedMore) if self.read_closed => f.end(Err(BodyError::Incomplete)),
                Ok(Decoded::NeedMore) => {
                    match self.io.poll_read_into(cx, &mut self.rbuf, BODY_READ_SPARE) {
                        Poll::Pending => {
                            if self.poll_paused(cx, f) {
                                fed = true;
                            }
                            break;
                        }
                        Poll::Ready(Ok(0)) => {
                            self.read_closed = true;
                            f.end(Err(BodyError::Incomplete));
                        }
                        Poll::Ready(Ok(_)) => f.paused_since = None,
                        Poll::Ready(Err(e)) => {
                            f.end(Err(BodyError::Io(e)));
                            return Err(());
                        }
                    }
                }
            }
        }
        Ok(fed)
    }

    /// The feed waiting for the client's next bytes: if the stack is
    /// waiting for them too, the pause counts from when it began, and once
    /// it has lasted `body_timeout` the body ends with [`BodyStalled`]
    /// (`true`; the stack answers 408, and the connection closes with the
    /// rest of the body unread); meanwhile the connection's timer is set
    /// to wake the task then. A stack busy with the last frame is not
    /// waiting on the client: no pause, and the slot wakes the task when
    /// it asks for more (`incoming::Sender::wanted`). Only a body that
    /// streams, and only when it waits for the client, comes here.
    fn poll_paused(&mut self, cx: &mut Context<'_>, f: &mut Feed) -> bool {
        if !f.tx.wanted(cx) {
            f.paused_since = None;
            return false;
        }
        let since = *f.paused_since.get_or_insert_with(clock::now);
        let timeout = self.settings.body_timeout;
        if !clock::poll_deadline(&mut self.timer, cx, since + timeout) {
            return false;
        }
        tracing::debug!(target: "flotilla::gateway", peer = %self.info.peer, ?timeout, "request body stalled (the client sent nothing more of it); ending it");
        f.end(Err(BodyStalled { timeout }.into()));
        true
    }

    /// Whether the client has gone away while its request is in progress.
    /// Also reads ahead (once) what a pipelining client sends meanwhile.
    fn poll_gone(&mut self, cx: &mut Context<'_>) -> bool {
        if self.read_closed {
            return true;
        }
        if !self.rbuf.is_empty() {
            return false;
        }
        match self.io.poll_read_into(cx, &mut self.rbuf, READ_SPARE) {
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
                true
            }
            Poll::Ready(Ok(_)) | Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
        }
    }

    /// Puts the response's head in the output buffer; returns its body,
    /// how to frame that, and whether the connection closes after it
    /// (`response_body` writes the rest). Not in an `async fn`: the
    /// response (a few hundred bytes) would be copied into its future, and
    /// held there until the body is sent.
    fn response_head(
        &mut self,
        reply: Reply,
        ex: Exchange,
        keep_alive: bool,
        feed: &mut Option<Feed>,
    ) -> (Body, BodyEncoder, bool) {
        let Reply { res, relayed } = reply;
        let (parts, mut body) = res.into_parts();
        let (status, headers, relayed) = if parts.status.is_informational() {
            // A final response cannot be 1xx (an upstream switching
            // protocols, which the gateway does not relay).
            tracing::debug!(target: "flotilla::gateway", status = %parts.status, "an informational status as the final response; answering 502");
            body = body::full(refusal_body(
                "bad_gateway",
                "the upstream answered with an unsupported status",
            ));
            (StatusCode::BAD_GATEWAY, json_headers(), None)
        } else {
            (parts.status, parts.headers, relayed)
        };
        let fields = HeadFields {
            map: &headers,
            relayed: relayed.as_ref(),
        };
        let values = |name| fields.get_all(name);
        let (framing, length) = encode::framing_of(
            ex,
            status,
            fields,
            body.is_end_stream(),
            body.size_hint().exact(),
        );
        // A request body the stack stopped reading, or that the client has
        // not sent for want of `100 Continue`, leaves the connection unusable.
        if let Some(f) = feed.as_mut()
            && !f.finished
            && f.tx.is_gone()
        {
            f.finished = true;
        }
        let unread = feed
            .as_ref()
            .is_some_and(|f| !f.complete && (f.finished || f.expect_continue));
        if let Some(f) = feed.as_mut() {
            f.responded = true;
        }
        let mut close = !keep_alive
            || framing == Framing::Close
            || unread
            || self.bad_body
            || self.stopping()
            || encode::has_token(values(&CONNECTION), b"close");
        if !close && let Some(why) = self.spent() {
            why.count();
            close = true;
        }
        encode::head(
            &mut self.out,
            ex.version,
            status,
            fields,
            framing,
            length,
            if close { Then::Close } else { Then::KeepAlive },
        );
        let encoder = BodyEncoder::new(framing, fields);
        (body, encoder, close)
    }

    /// Writes the response's body after its head (`response_head`); says
    /// what becomes of the connection.
    async fn response_body(
        &mut self,
        mut body: Body,
        mut encoder: BodyEncoder,
        close: bool,
        feed: &mut Option<Feed>,
    ) -> Next {
        // Without progress either way (a body frame from the stack, bytes
        // written to the client) for `body_timeout`, the response is given
        // up: a hung instance or a client that reads nothing would hold the
        // connection and its place in flight for ever. Set at the first
        // wait: a response written whole at once reads no clock.
        let mut stalled_at: Option<Instant> = None;
        let sent = if encoder.is_done() {
            drop(body);
            poll_fn(|cx| {
                let before = self.out.len();
                match self.poll_flush(cx) {
                    Poll::Ready(done) => Poll::Ready(done.is_ok()),
                    Poll::Pending => {
                        self.poll_stalled(cx, self.out.len() < before, &mut stalled_at)
                    }
                }
            })
            .await
        } else {
            let mut trailers = None;
            let sent = poll_fn(|cx| {
                let mut progressed = false;
                match self.poll_send(
                    cx,
                    &mut body,
                    &mut encoder,
                    feed,
                    &mut trailers,
                    &mut progressed,
                ) {
                    Poll::Ready(sent) => Poll::Ready(sent),
                    Poll::Pending => self.poll_stalled(cx, progressed, &mut stalled_at),
                }
            })
            .await;
            // Ends the request's accounting (in flight, access log) now,
            // not when the next request arrives.
            drop(body);
            sent
        };
        if !sent {
            return Next::Abort;
        }
        let body_read = feed.as_ref().is_none_or(|f| f.complete);
        if close || !body_read || self.bad_body {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Writes the response body, gathering the frames already available
    /// into each write; keeps feeding the request body meanwhile (an
    /// upstream may answer while still reading it). `false`: the response
    /// could not be sent whole.
    /// `progressed` is set when a body frame came, bytes were written, or
    /// request body bytes were handed over.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        body: &mut Body,
        encoder: &mut BodyEncoder,
        feed: &mut Option<Feed>,
        trailers: &mut Option<HeaderMap>,
        progressed: &mut bool,
    ) -> Poll<bool> {
        loop {
            if let Some(f) = feed.as_mut().filter(|f| !f.finished) {
                // A request body still coming in is the exchange moving too.
                match self.poll_feed(cx, f) {
                    Ok(fed) => *progressed |= fed,
                    Err(()) => return Poll::Ready(false),
                }
            }
            let mut waiting = false;
            while !encoder.is_done() && self.out.len() < WRITE_HIGH_WATER {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready(None) => encoder.finish(&mut self.out, trailers.as_ref()),
                    Poll::Ready(Some(Ok(frame))) => {
                        match frame.into_data().inspect(|_| *progressed = true) {
                            Ok(data) => {
                                if encoder.data(&mut self.out, data).is_err() {
                                    tracing::debug!(target: "flotilla::gateway", "response body longer than its content-length; closing");
                                    return Poll::Ready(false);
                                }
                            }
                            Err(frame) => {
                                if let Ok(t) = frame.into_trailers() {
                                    *trailers = Some(t);
                                }
                            }
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // Mid-body: the only way to tell the client is to
                        // close without finishing the message.
                        tracing::debug!(target: "flotilla::gateway", error = %e, "response body failed; closing");
                        return Poll::Ready(false);
                    }
                }
            }
            let before = self.out.len();
            let flushed = self.poll_flush(cx);
            *progressed |= self.out.len() < before;
            match flushed {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Pending => return Poll::Pending,
            }
            if encoder.is_done() {
                if encoder.is_short() {
                    tracing::debug!(target: "flotilla::gateway", "response body shorter than its content-length; closing");
                }
                return Poll::Ready(!encoder.is_short());
            }
            if waiting {
                let feeding = feed.as_ref().is_some_and(|f| !f.finished);
                if !feeding && self.poll_gone(cx) {
                    return Poll::Ready(false);
                }
                return Poll::Pending;
            }
        }
    }

    /// A response waiting (its body or the client): `Ready(false)`, the
    /// response given up, once it has waited `body_timeout` since it last
    /// `progressed` (or since `stalled_at` was first set); else pending,
    /// with the connection's timer set to wake it then.
    fn poll_stalled(
        &mut self,
        cx: &mut Context<'_>,
        progressed: bool,
        stalled_at: &mut Option<Instant>,
    ) -> Poll<bool> {
        let now = clock::now();
        let since = match stalled_at {
            Some(since) if !progressed => *since,
            _ => *stalled_at.insert(now),
        };
        if clock::poll_deadline(&mut self.timer, cx, since + self.settings.body_timeout) {
            tracing::debug!(target: "flotilla::gateway", peer = %self.info.peer, timeout = ?self.settings.body_timeout, "response body stalled (the instance sent nothing, or the client read nothing); closing");
            return Poll::Ready(false);
        }
        Poll::Pending
    }

    /// Writes out everything pending: one `write` (or `writev` when large
    /// frames are queued by reference) per call when the socket keeps up.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let written = match self.out.single() {
                Some(bytes) => ready!(self.io.poll_write_bufs(cx, Bufs::One(bytes))),
                None => {
                    let mut slices = [IoSlice::new(&[]); 32];
                    let n = self.out.slices(&mut slices);
                    let slices = slices.get(..n).unwrap_or_default();
                    ready!(self.io.poll_write_bufs(cx, Bufs::Many(slices)))
                }
            };
            match written {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.out.advance(n),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.io.poll_flush_held(cx)
    }

    /// The instance switched to WebSocket (`reply` is its `101`): writes the
    /// `101`, then carries bytes both ways (first what either side sent
    /// past its head) until the tunnel ends, and the connection with it
    /// (see `upgrade`). A tunnel for a request that did not ask for one
    /// cannot come from `outbound`; should one come, it is refused rather
    /// than joined.
    async fn switch(&mut self, reply: Reply, tunnel: Tunnel, asked: bool) -> End {
        if !asked {
            tracing::warn!(target: "flotilla::gateway", "a protocol switch nobody asked for; answering 502");
            drop(tunnel);
            // The request's own line is written as its reply is dropped.
            self.refuse(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the upstream switched protocols unasked",
                None,
            )
            .await;
            return End::Close;
        }
        let fields = HeadFields {
            map: reply.res.headers(),
            relayed: reply.relayed.as_ref(),
        };
        encode::head(
            &mut self.out,
            Version::HTTP_11,
            StatusCode::SWITCHING_PROTOCOLS,
            fields,
            Framing::None,
            None,
            Then::WebSocket,
        );
        // The response's body (empty) carries the access-log entry: the
        // handshake is logged as done once its head is out.
        drop(reply);
        if poll_fn(|cx| self.poll_flush(cx)).await.is_err() {
            return End::Abort;
        }
        let from_client = self.rbuf.split().freeze();
        let idle = self.settings.tunnel_idle_timeout;
        match &mut self.io {
            Transport::Tcp(stream) => upgrade::relay(stream, from_client, tunnel, idle).await,
            Transport::Tls(stream) => {
                upgrade::relay(stream.as_mut(), from_client, tunnel, idle).await
            }
        };
        // Both directions were shut down, or one failed: nothing to linger for.
        End::Abort
    }

    /// Answers a request refused before it became one for the stack (its
    /// head, or its chunked body), and records it as the stack records its
    /// own answers before a route: a line in the access log and a count
    /// under `route="unmatched"`, so that a scan for smuggling shapes or a
    /// slowloris leaves a trace. Its request line is `line` (what its head
    /// made of it), else read from what is buffered, as far as it came.
    async fn refuse_request(
        &mut self,
        status: StatusCode,
        code: &'static str,
        message: &'static str,
        began: Instant,
        line: Option<(Method, http::Uri)>,
    ) {
        let request_id = RequestId::new();
        let bytes = self.refuse(status, code, message, Some(&request_id)).await;
        let (method, path) = match &line {
            Some((method, uri)) => (Some(method.as_str()), Some(uri.path())),
            None => head::request_line(&self.rbuf),
        };
        self.stack.refused(&Refused {
            status,
            code,
            request_id: &request_id,
            client: self.info.peer.ip(),
            method,
            path,
            took: clock::now().saturating_duration_since(began),
            bytes,
        });
    }

    /// Answers a request the gateway will not serve, with `request_id` when
    /// it has one, then the connection closes. Best effort: the client may
    /// be gone or not reading. Returns the body's bytes written.
    async fn refuse(
        &mut self,
        status: StatusCode,
        code: &'static str,
        message: &'static str,
        request_id: Option<&RequestId>,
    ) -> u64 {
        tracing::debug!(target: "flotilla::gateway", peer = %self.info.peer, %status, code, "request refused");
        let body =
            crate::rejection::error_body(code, message, request_id.map_or("", RequestId::as_str));
        let len = body.len() as u64;
        let mut fields = json_headers();
        if let Some(id) = request_id {
            fields.insert(X_REQUEST_ID.clone(), id.header().clone());
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // A 405 must say what is allowed (RFC 9110 §15.5.6); the only
            // one made here is CONNECT's, whose target (a host to tunnel
            // to) is nothing the gateway serves any method on.
            fields.insert(ALLOW, HeaderValue::from_static(""));
        }
        encode::head(
            &mut self.out,
            Version::HTTP_11,
            status,
            (&fields).into(),
            Framing::Length(len),
            Some(len),
            Then::Close,
        );
        self.out.extend(&body);
        let flushed =
            tokio::time::timeout(REFUSAL_DEADLINE, poll_fn(|cx| self.poll_flush(cx))).await;
        if matches!(flushed, Ok(Ok(()))) {
            len
        } else {
            0
        }
    }
}

/// The error body of the gateway's other refusals (`rejection`), without a
/// request id: these requests never reached the stack that assigns one.
fn refusal_body(code: &str, message: &str) -> Bytes {
    crate::rejection::error_body(code, message, "")
}

fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(SERVER, HeaderValue::from_static("flotilla"));
    headers
}

/// One `Bytes` of `pieces`, copying only when there are several.
fn concat(mut pieces: Vec<Bytes>) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
            for piece in &pieces {
                all.extend_from_slice(piece);
            }
            all.freeze()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Response;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const PATIENCE: Duration = Duration::from_secs(10);
    /// How long the stub's `/busy` leaves its request body alone.
    const BUSY: Duration = Duration::from_millis(1500);

    /// A waker that counts its wakes.
    struct Counting(AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_stop_signal_wakes_the_waker_it_was_last_polled_with() {
        let (tx, rx) = watch::channel(());
        let mut signal = StopSignal::new(&rx);
        let first = Arc::new(Counting(AtomicUsize::new(0)));
        let first_waker = Waker::from(Arc::clone(&first));
        let mut cx = Context::from_waker(&first_waker);
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        // Polled again with the same waker: still waiting, still armed.
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        // Another waker (the connection's task polled from elsewhere) is
        // registered in its place.
        let second = Arc::new(Counting(AtomicUsize::new(0)));
        let second_waker = Waker::from(Arc::clone(&second));
        let mut cx2 = Context::from_waker(&second_waker);
        assert!(Pin::new(&mut signal).poll(&mut cx2).is_pending());
        assert!(Pin::new(&mut signal).poll(&mut cx2).is_pending());
        assert!(tx.send(()).is_ok());
        assert_eq!(
            second.0.load(Ordering::SeqCst),
            1,
            "the last waker was not woken"
        );
        assert!(Pin::new(&mut signal).poll(&mut cx2).is_ready());
        // The sender gone is a stop too.
        let (tx, rx) = watch::channel(());
        let mut signal = StopSignal::new(&rx);
        assert!(Pin::new(&mut signal).poll(&mut cx).is_pending());
        drop(tx);
        assert!(Pin::new(&mut signal).poll(&mut cx).is_ready());
    }

    /// What the stub stack saw.
    #[derive(Default)]
    struct Probe {
        /// Requests whose future was dropped before it finished.
        abandoned: AtomicUsize,
        calls: AtomicUsize,
        /// Connections whose `serve` has returned.
        closed: AtomicUsize,
    }

    struct Abandoned(Arc<Probe>, bool);

    impl Drop for Abandoned {
        fn drop(&mut self) {
            if !self.1 {
                self.0.abandoned.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
        let mut res = Response::new(body::full(body.into()));
        *res.status_mut() = status;
        res
    }

    /// `/echo` answers `METHOD TARGET len=N` after reading the body;
    /// `/stream` answers with a body of unknown length; `/refuse` answers
    /// 401 without reading the body; `/hold` never answers; `/stall` sends
    /// a first chunk of its body and then nothing; `/drip` sends ten
    /// chunks 50 ms apart; `/big` is 32 MiB; `/late` answers at once and
    /// ends its body with the request body's length once it has all come;
    /// `/busy` takes the body's first frame, does something else for
    /// [`BUSY`], then reads the rest and answers as `/echo` does.
    #[derive(Clone)]
    struct Stub(Arc<Probe>);

    impl Handler for Stub {
        // What becomes of a refusal is the access log's to test.
        fn refused(&self, _: &Refused<'_>) {}

        fn call(
            &self,
            req: Request<Body>,
            _: ConnInfo,
        ) -> impl Future<Output = Reply> + Send + 'static {
            let probe = Arc::clone(&self.0);
            async move {
                probe.calls.fetch_add(1, Ordering::SeqCst);
                let mut guard = Abandoned(Arc::clone(&probe), false);
                let res = match req.uri().path() {
                    "/echo" => {
                        let (parts, body) = req.into_parts();
                        let len = match body.collect().await {
                            Ok(c) => c.to_bytes().len().to_string(),
                            Err(e) => format!("error: {e}"),
                        };
                        text(
                            StatusCode::OK,
                            format!("{} {} len={len}", parts.method, parts.uri),
                        )
                    }
                    "/stream" => {
                        Response::new(body::boxed(StreamBody::new(futures_util::stream::iter([
                            Ok::<_, Infallible>(Frame::data(Bytes::from("hello "))),
                            Ok(Frame::data(Bytes::from("world"))),
                        ]))))
                    }
                    "/refuse" => text(StatusCode::UNAUTHORIZED, "no"),
                    "/hold" => std::future::pending().await,
                    "/stall" => {
                        use futures_util::StreamExt as _;
                        let first = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                            Bytes::from("first "),
                        ))]);
                        Response::new(body::boxed(StreamBody::new(
                            first.chain(futures_util::stream::pending()),
                        )))
                    }
                    "/drip" => {
                        use futures_util::StreamExt as _;
                        let drops = futures_util::stream::iter(0..10).then(|i| async move {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, Infallible>(Frame::data(Bytes::from(format!("{i}"))))
                        });
                        Response::new(body::boxed(StreamBody::new(drops)))
                    }
                    "/big" => text(StatusCode::OK, vec![b'x'; 32 << 20]),
                    "/busy" => {
                        let mut body = req.into_body();
                        let first = match body.frame().await {
                            Some(Ok(f)) => f.into_data().map_or(0, |d| d.len()),
                            _ => 0,
                        };
                        tokio::time::sleep(BUSY).await;
                        let len = match body.collect().await {
                            Ok(c) => (first + c.to_bytes().len()).to_string(),
                            Err(e) => format!("error: {e}"),
                        };
                        text(StatusCode::OK, format!("len={len}"))
                    }
                    "/late" => {
                        // Answers at once, and ends once the whole request
                        // body has come.
                        use futures_util::StreamExt as _;
                        let body = req.into_body();
                        let first = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(
                            Bytes::from("first "),
                        ))]);
                        let rest = futures_util::stream::once(async move {
                            let len = body.collect().await.map_or(0, |c| c.to_bytes().len());
                            Ok(Frame::data(Bytes::from(format!("len={len}"))))
                        });
                        Response::new(body::boxed(StreamBody::new(first.chain(rest))))
                    }
                    _ => text(StatusCode::NOT_FOUND, "?"),
                };
                guard.1 = true;
                Reply::from(res)
            }
        }
    }

    struct Server {
        addr: SocketAddr,
        probe: Arc<Probe>,
        stop: watch::Sender<()>,
    }

    async fn server(settings: Settings) -> Server {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("addr: {e}"),
        };
        let probe = Arc::new(Probe::default());
        let stack = Stub(Arc::clone(&probe));
        let (stop, stopping) = watch::channel(());
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let info = ConnInfo {
                    peer,
                    scheme: "http",
                };
                let start = Start {
                    io: stream.into(),
                    read: BytesMut::new(),
                    info,
                    client_cert: None,
                    head_by: Instant::now() + settings.header_timeout,
                    accepted: Instant::now(),
                };
                let served = serve(start, stack.clone(), settings, stopping.clone());
                let probe = Arc::clone(&stack.0);
                tokio::spawn(async move {
                    served.await;
                    probe.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Server { addr, probe, stop }
    }

    fn settings() -> Settings {
        Settings::new(&Limits::default())
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => panic!("connect: {e}"),
        }
    }

    async fn send(stream: &mut TcpStream, raw: &[u8]) {
        if let Err(e) = stream.write_all(raw).await {
            panic!("write: {e}");
        }
    }

    /// Everything until the server closes.
    async fn read_all(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("read: {e} after {:?}", String::from_utf8_lossy(&out)),
            Err(_) => panic!("not closed: {:?}", String::from_utf8_lossy(&out)),
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads until `done` holds for what arrived.
    async fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if done(&text) {
                return text;
            }
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("closed after {text:?}"),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("read: {e} after {text:?}"),
                Err(_) => panic!("timed out after {text:?}"),
            }
        }
    }

    async fn round_trip(addr: SocketAddr, raw: &str) -> String {
        let mut stream = connect(addr).await;
        send(&mut stream, raw.as_bytes()).await;
        read_all(&mut stream).await
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let s = server(settings()).await;
        let answer = round_trip(
            s.addr,
            "GET /echo?1 HTTP/1.1\r\nhost: x\r\n\r\n\
             POST /echo?2 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc\
             POST /echo?3 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
             GET /echo?4 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let at = |needle: &str| match answer.find(needle) {
            Some(i) => i,
            None => panic!("no {needle:?} in {answer:?}"),
        };
        assert!(
            at("GET /echo?1 len=0") < at("POST /echo?2 len=3"),
            "{answer}"
        );
        assert!(
            at("POST /echo?2 len=3") < at("POST /echo?3 len=2"),
            "{answer}"
        );
        assert!(
            at("POST /echo?3 len=2") < at("GET /echo?4 len=0"),
            "{answer}"
        );
        assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{answer}");
        assert_eq!(answer.matches("connection: close").count(), 1, "{answer}");
        assert_eq!(
            answer.matches("content-length: 17\r\n").count(),
            2,
            "{answer}"
        );
        assert_eq!(
            answer.matches("content-length: 18\r\n").count(),
            2,
            "{answer}"
        );
        assert!(answer.contains("\r\ndate: "), "{answer}");
    }

    #[tokio::test]
    async fn head_responses_have_headers_and_no_body() {
        let s = server(settings()).await;
        let answer = round_trip(
            s.addr,
            "HEAD /echo HTTP/1.1\r\nhost: x\r\n\r\nHEAD /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let (first, second) = answer.split_once("\r\n\r\n").unwrap_or_default();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(first.contains("content-length: 16"), "{answer}");
        // Unknown length: neither a length nor chunked, and no body.
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(!second.contains("content-length"), "{answer}");
        assert!(!second.contains("transfer-encoding"), "{answer}");
        assert!(second.ends_with("\r\n\r\n"), "{answer}");
    }

    #[tokio::test]
    async fn http10_clients_get_keep_alive_only_when_asked_and_no_chunks() {
        let s = server(settings()).await;
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"GET /echo HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
        )
        .await;
        let first = read_until(&mut stream, |t| t.ends_with("GET /echo len=0")).await;
        assert!(first.starts_with("HTTP/1.0 200 OK\r\n"), "{first}");
        assert!(first.contains("connection: keep-alive\r\n"), "{first}");
        // Still open; without keep-alive the next one is the last.
        send(&mut stream, b"GET /echo HTTP/1.0\r\n\r\n").await;
        let second = read_all(&mut stream).await;
        assert!(second.starts_with("HTTP/1.0 200 OK\r\n"), "{second}");
        assert!(second.contains("connection: close\r\n"), "{second}");
        // A body of unknown length: delimited by the close, not chunked.
        let answer = round_trip(
            s.addr,
            "GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        assert!(!answer.contains("transfer-encoding"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nhello world"), "{answer}");
        // HTTP/1.1 gets the same body chunked.
        let answer = round_trip(
            s.addr,
            "GET /stream HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(
            answer.contains("transfer-encoding: chunked\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn smuggling_shapes_are_refused_and_close() {
        let s = server(settings()).await;
        for (raw, status) in [
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /echo HTTP/1.1\r\n\r\n",
                "400",
            ),
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\nabcde",
                "400",
            ),
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: +4\r\n\r\nabcd",
                "400",
            ),
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                "501",
            ),
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n",
                "400",
            ),
            ("GET /echo HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "400"),
            // A line ending in LF alone: a balancer in front may read it
            // as no line end, and see `x-a` where the gateway sees
            // `transfer-encoding`.
            (
                "POST /echo HTTP/1.1\r\nhost: x\r\nx-a: 1\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "400",
            ),
            ("GET /echo HTTP/1.1\nhost: x\n\n", "400"),
        ] {
            let answer = round_trip(s.addr, raw).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{raw:?}: {answer}"
            );
            assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{raw:?}: {answer}");
            assert!(answer.contains("connection: close"), "{answer}");
            assert!(answer.contains(r#""error":{"code":"#), "{answer}");
        }
        assert_eq!(s.probe.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_streamed_chunked_body_reaches_the_stack_whole() {
        let s = server(settings()).await;
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        send(&mut stream, b"4;ext=1\r\ndefg\r\n0\r\nx-trailer: 1\r\n\r\n").await;
        let answer = read_until(&mut stream, |t| t.ends_with("len=7")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // The connection is still usable.
        send(
            &mut stream,
            b"GET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(read_all(&mut stream).await.ends_with("GET /echo len=0"));
    }

    #[tokio::test]
    async fn expect_continue_is_sent_when_the_body_is_wanted_only() {
        let s = server(settings()).await;
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"PUT /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await;
        let interim = read_until(&mut stream, |t| t.ends_with("\r\n\r\n")).await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        send(&mut stream, b"hello").await;
        let answer = read_until(&mut stream, |t| t.ends_with("len=5")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(!answer.contains("connection: close"), "{answer}");

        // Refused without reading: no 100, and the connection closes.
        send(
            &mut stream,
            b"PUT /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await;
        let answer = read_all(&mut stream).await;
        assert_refused_and_closed(&answer);
        assert!(!answer.contains("100 Continue"), "{answer}");
    }

    /// `/refuse`'s 401, with the connection closed after it (the request
    /// body was not read).
    fn assert_refused_and_closed(answer: &str) {
        assert!(
            answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }

    #[tokio::test]
    async fn an_unread_body_closes_the_connection_after_the_response() {
        let s = server(settings()).await;
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\npartial",
        )
        .await;
        let answer = read_all(&mut stream).await;
        assert_refused_and_closed(&answer);
        // Read whole from the buffer, an unread body does not matter.
        let answer = round_trip(
            s.addr,
            "POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabcGET /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(answer.ends_with("GET /echo len=0"), "{answer}");
    }

    #[tokio::test]
    async fn a_client_leaving_mid_request_abandons_it() {
        let s = server(settings()).await;
        let mut stream = connect(s.addr).await;
        send(&mut stream, b"GET /hold HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let probe = Arc::clone(&s.probe);
        let deadline = Instant::now() + PATIENCE;
        while probe.calls.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "never called");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(stream);
        while probe.abandoned.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the request was not abandoned");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn slow_heads_get_408_and_idle_connections_close_silently() {
        let s = server(Settings {
            header_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(300),
            ..settings()
        })
        .await;
        let mut stream = connect(s.addr).await;
        send(&mut stream, b"GET /echo HTTP/1.1\r\nhost: x\r\n").await;
        let began = Instant::now();
        let answer = read_all(&mut stream).await;
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(
            began.elapsed() >= Duration::from_millis(150),
            "{:?}",
            began.elapsed()
        );

        // A stray line end after a request does not start a head.
        let mut stream = connect(s.addr).await;
        send(&mut stream, b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n\r\n").await;
        read_until(&mut stream, |t| t.ends_with("len=0")).await;
        let began = Instant::now();
        assert_eq!(read_all(&mut stream).await, "");
        assert!(
            began.elapsed() >= Duration::from_millis(250),
            "{:?}",
            began.elapsed()
        );
    }

    #[tokio::test]
    async fn a_response_body_that_stalls_either_way_is_given_up() {
        let s = server(Settings {
            body_timeout: Duration::from_millis(300),
            ..settings()
        })
        .await;
        // The stack sends part of the body, then nothing: the client gets
        // what came, and the connection ends without the last chunk.
        let mut stream = connect(s.addr).await;
        send(&mut stream, b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let answer = read_all(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("first "), "{answer}");
        assert!(!answer.ends_with("0\r\n\r\n"), "{answer}");

        // A body that keeps coming, if slowly, is never cut.
        let mut stream = connect(s.addr).await;
        send(&mut stream, b"GET /drip HTTP/1.1\r\nhost: x\r\n\r\n").await;
        read_until(&mut stream, |t| t.ends_with("0\r\n\r\n")).await;

        // Nor is one that waits for a request body still coming in, for
        // longer in all than the timeout: the exchange is moving.
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"POST /late HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await;
        read_until(&mut stream, |t| t.contains("first ")).await;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send(&mut stream, b"1\r\nx\r\n").await;
        }
        send(&mut stream, b"0\r\n\r\n").await;
        read_until(&mut stream, |t| t.contains("len=8")).await;

        // A client that reads nothing of a large response: closed once the
        // socket is full and nothing moves for the timeout.
        let mut reader = connect(s.addr).await;
        let before = s.probe.closed.load(Ordering::SeqCst);
        send(&mut reader, b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let deadline = Instant::now() + PATIENCE;
        while s.probe.closed.load(Ordering::SeqCst) == before {
            assert!(Instant::now() < deadline, "the stalled reader was kept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut got = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut got)).await;
        assert!(got.len() < 32 << 20, "the whole body was sent");
    }

    #[tokio::test]
    async fn a_request_body_the_client_pauses_in_fails_after_body_timeout() {
        let timeout = Duration::from_millis(300);
        let s = server(Settings {
            body_timeout: timeout,
            ..settings()
        })
        .await;
        // Three bytes of ten, or of a chunk, then nothing: the stack's
        // read fails with the pause, and the connection closes after the
        // answer (the rest of the body is unread).
        for raw in [
            &b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc"[..],
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\na\r\nabc",
        ] {
            let mut stream = connect(s.addr).await;
            let began = Instant::now();
            send(&mut stream, raw).await;
            let answer = read_all(&mut stream).await;
            assert!(began.elapsed() >= timeout, "{:?}", began.elapsed());
            assert!(answer.contains("connection: close\r\n"), "{answer}");
            assert!(
                answer.ends_with(
                    "len=error: the client sent nothing more of the request body for 300ms"
                ),
                "{answer}"
            );
        }
    }

    /// The pause counts only while the stack waits for the body: a stack
    /// busy with what it took (an instance slow to read it) is not kept
    /// waiting by the client, however long the client is quiet meanwhile.
    #[tokio::test]
    async fn a_request_body_is_not_timed_while_the_stack_is_not_reading_it() {
        let s = server(Settings {
            body_timeout: Duration::from_millis(300),
            ..settings()
        })
        .await;
        let mut stream = connect(s.addr).await;
        send(
            &mut stream,
            b"POST /busy HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc",
        )
        .await;
        // Quiet for twice the timeout, while the stack is busy for five
        // times it (the pause is the thing under test, not a wait).
        tokio::time::sleep(Duration::from_millis(600)).await;
        send(&mut stream, b"defghij").await;
        read_until(&mut stream, |t| t.ends_with("len=10")).await;
    }

    #[tokio::test]
    async fn stopping_closes_idle_connections_and_finishes_a_request_in_progress() {
        let s = server(settings()).await;
        let mut idle = connect(s.addr).await;
        send(&mut idle, b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n").await;
        read_until(&mut idle, |t| t.ends_with("len=0")).await;
        let mut busy = connect(s.addr).await;
        send(
            &mut busy,
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nabc",
        )
        .await;
        let deadline = Instant::now() + PATIENCE;
        while s.probe.calls.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "never called");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.stop.send_replace(());
        assert_eq!(read_all(&mut idle).await, "");
        send(&mut busy, b"def").await;
        let answer = read_all(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.ends_with("len=6"), "{answer}");
    }

    #[tokio::test]
    async fn oversized_heads_are_431() {
        let s = server(Settings {
            max_header_bytes: 8192,
            ..settings()
        })
        .await;
        let raw = format!("GET /echo HTTP/1.1\r\nx-big: {}\r\n\r\n", "b".repeat(9000));
        let answer = round_trip(s.addr, &raw).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("headers_too_large"), "{answer}");
    }

    /// One request of [`pipelines_split_anywhere_are_answered_in_order`]:
    /// its bytes, and the status and body its answer must have (`None`:
    /// a `HEAD`, answered with no body).
    fn random_request(
        rng: &mut crate::fuzz::Rng,
        i: usize,
        last: bool,
    ) -> (Vec<u8>, Option<String>) {
        let close = if last { "connection: close\r\n" } else { "" };
        let body: Vec<u8> = (0..rng.below(40)).map(|n| b'a' + (n % 26) as u8).collect();
        let len = body.len();
        match rng.below(6) {
            0 => (
                format!("GET /echo?{i} HTTP/1.1\r\nhost: x\r\n{close}\r\n").into_bytes(),
                Some(format!("GET /echo?{i} len=0")),
            ),
            1 => {
                let mut raw = format!(
                    "POST /echo?{i} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n{close}\r\n"
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                (raw, Some(format!("POST /echo?{i} len={len}")))
            }
            2 => {
                let mut raw = format!(
                    "POST /echo?{i} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n{close}\r\n"
                )
                .into_bytes();
                let mut rest = &body[..];
                while !rest.is_empty() {
                    let n = (1 + rng.below(rest.len())).min(rest.len());
                    let ext = if rng.below(3) == 0 { ";x=\"y\"" } else { "" };
                    raw.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                    raw.extend_from_slice(&rest[..n]);
                    raw.extend_from_slice(b"\r\n");
                    rest = &rest[n..];
                }
                let trailer = if rng.below(2) == 0 {
                    "x-sum: 1\r\n"
                } else {
                    ""
                };
                raw.extend_from_slice(format!("0\r\n{trailer}\r\n").as_bytes());
                (raw, Some(format!("POST /echo?{i} len={len}")))
            }
            3 => (
                format!("HEAD /echo?{i} HTTP/1.1\r\nhost: x\r\n{close}\r\n").into_bytes(),
                None,
            ),
            4 => (
                format!("GET /stream?{i} HTTP/1.1\r\nhost: x\r\n{close}\r\n").into_bytes(),
                Some("hello world".to_owned()),
            ),
            _ => {
                let mut raw = format!(
                    "PUT /echo?{i} HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: {len}\r\n{close}\r\n"
                )
                .into_bytes();
                raw.extend_from_slice(&body);
                (raw, Some(format!("PUT /echo?{i} len={len}")))
            }
        }
    }

    /// The responses in `raw`, each as its status and body (`None` for the
    /// answer to a `HEAD`, which has none), skipping `100 Continue`s.
    fn responses(mut raw: &[u8], heads: &[bool]) -> Vec<(u16, Option<String>)> {
        let mut out = Vec::new();
        while !raw.is_empty() {
            let mut slots = [httparse::EMPTY_HEADER; 32];
            let mut res = httparse::Response::new(&mut slots);
            let len = match res.parse(raw) {
                Ok(httparse::Status::Complete(len)) => len,
                other => panic!("{other:?} at {:?}", raw.escape_ascii().to_string()),
            };
            let code = res.code.unwrap_or_default();
            let field = |name: &str| {
                res.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
            };
            let (length, chunked) = (field("content-length"), field("transfer-encoding"));
            raw = &raw[len..];
            if code == 100 {
                continue;
            }
            if heads.get(out.len()).copied().unwrap_or(false) {
                out.push((code, None));
                continue;
            }
            let body = if chunked.as_deref() == Some("chunked") {
                let mut buf = BytesMut::from(raw);
                let mut decoder = crate::chunked::ChunkedDecoder::default();
                let mut body = Vec::new();
                loop {
                    match decoder.decode(&mut buf) {
                        Ok(crate::chunked::Decoded::Data(d)) => body.extend_from_slice(&d),
                        Ok(crate::chunked::Decoded::Done) => break,
                        other => panic!("{other:?} in {:?}", raw.escape_ascii().to_string()),
                    }
                }
                raw = &raw[raw.len() - buf.len()..];
                body
            } else {
                let n: usize = length.and_then(|l| l.parse().ok()).unwrap_or(raw.len());
                let (body, rest) = raw.split_at(n.min(raw.len()));
                raw = rest;
                body.to_vec()
            };
            out.push((code, Some(String::from_utf8_lossy(&body).into_owned())));
        }
        out
    }

    /// Pipelined requests of every framing (lengths, chunks with
    /// extensions and trailers, `HEAD`, `Expect`), their bytes cut into
    /// pieces at random places: each is answered once, in order, with its
    /// own body, and nothing else is sent. Where one request ends and the
    /// next begins must not depend on how the bytes arrive.
    #[tokio::test]
    async fn pipelines_split_anywhere_are_answered_in_order() {
        let s = server(settings()).await;
        let mut rng = crate::fuzz::Rng(0x5eed_1234_abcd_ef01);
        for case in 0..60 {
            let n = 1 + rng.below(6);
            let (mut raw, mut wanted, mut heads) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n {
                let (bytes, answer) = random_request(&mut rng, i, i + 1 == n);
                raw.extend_from_slice(&bytes);
                heads.push(answer.is_none());
                wanted.push((200, answer));
            }
            let mut cuts: Vec<usize> = (0..rng.below(6)).map(|_| rng.below(raw.len())).collect();
            cuts.sort_unstable();
            let mut stream = connect(s.addr).await;
            let _ = stream.set_nodelay(true);
            let mut at = 0;
            for cut in cuts.into_iter().chain([raw.len()]) {
                send(&mut stream, &raw[at..cut.max(at)]).await;
                at = cut.max(at);
                tokio::task::yield_now().await;
            }
            let mut answer = Vec::new();
            match tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await {
                Ok(Ok(_)) => {}
                other => panic!(
                    "case {case}: {other:?} after {:?}",
                    answer.escape_ascii().to_string()
                ),
            }
            assert_eq!(
                responses(&answer, &heads),
                wanted,
                "case {case}: {:?} answered {:?}",
                raw.escape_ascii().to_string(),
                answer.escape_ascii().to_string()
            );
        }
    }
}
