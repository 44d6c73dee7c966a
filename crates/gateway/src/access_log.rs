//! The access log: one JSON line per request, to a file and to `tracing`
//! (target `flotilla::access`), plus the per-request metrics.
//!
//! A line is written when the response body is finished (or abandoned), so
//! it carries the real duration and byte count of a streamed response. A
//! request whose client went away before the response started is logged
//! with status 499, as nginx does, so that no request goes unrecorded, and
//! counted under the route, client and trace the edge had found for it by
//! then: the edge writes them into the request's [`Entry`] as it finds
//! them.
//!
//! File writes happen on a writer task fed by a bounded channel: the request
//! path never waits for the disk. When the writer falls behind, lines are
//! dropped and counted (`flotilla_gateway_access_log_dropped_total`) rather
//! than slowing traffic or growing memory without bound. Lines a full or
//! failing disk refuses are kept, up to a bound, and written once it takes
//! them again; past the bound they are dropped and counted too.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use http::{Method, Request, StatusCode, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Error;
use crate::body::{self, Body};
use crate::edge::Served;
use crate::json;
use crate::proxy::Upstream;
use crate::rejection::Refusal;
use crate::request_id::RequestId;
use crate::stats;

/// Lines queued for the writer. A line is ~300 bytes, so the queue holds
/// about 1.2 MB; at 10k requests/s that absorbs ~0.4 s of disk stall
/// before lines are dropped. What a client sends is clipped in a line
/// ([`clip`]), so a line is at most about 3 KiB (besides the manifest's
/// route, service and instance names), and the queue at most about
/// 12 MB: a flood of requests with 60 KiB paths while the disk stalls
/// would otherwise queue 240 MB.
const QUEUE_LINES: usize = 4096;

/// Most bytes a line gives a value the client chose, escaped: its path, its
/// method (an extension method is any token), and the verified caller's id
/// (a token's `sub`, as long as its issuer made it). A longer one is cut
/// ([`clip`]). 2 KiB of path tells one request from another; nginx's
/// lines carry up to 8 KiB of request line, in a buffer of their own.
const MAX_PATH: usize = 2048;
const MAX_METHOD: usize = 32;
const MAX_USER: usize = 256;

/// What ends a value cut short in a line, which then says
/// `"truncated":true`.
const CUT_MARK: &str = "…";

/// Lines written in one burst at most, so the file stays current even under
/// sustained load.
const LINES_PER_BURST: usize = 2048;

/// How long the writer lets lines gather after one wakes it, before it
/// writes them: a line takes at most this long to reach the file. Woken
/// (a cross-thread wake-up) and writing (a hand-off to the blocking pool
/// and a `write`) for each line, or each few, the log cost a busy gateway
/// 5.5 µs of CPU per request, nginx's 1.6 (`benches/gateway/access_log.sh`):
/// gathered, a busy gateway's writer wakes and writes once per interval.
const GATHER: Duration = Duration::from_millis(10);

/// Status logged when the client left before a response was produced.
const CLIENT_CLOSED: u16 = 499;

/// The sending side of the access-log file.
#[derive(Debug)]
pub(crate) struct Sink {
    tx: mpsc::Sender<Vec<u8>>,
    dropped: AtomicU64,
    path: PathBuf,
}

impl Sink {
    fn send(&self, line: Vec<u8>) {
        if self.tx.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            stats::access_log_dropped(stats::DROPPED_QUEUE_FULL, 1);
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                target: "flotilla::gateway",
                path = %self.path.display(),
                dropped,
                "access-log lines were dropped because the writer fell behind"
            );
        }
    }
}

/// Opens (appending) `path` and starts its writer task, which ends once
/// every [`Sink`] clone is gone and the queue is written out.
pub(crate) async fn open(path: &Path) -> Result<(Arc<Sink>, JoinHandle<()>), Error> {
    let owned = path.to_path_buf();
    let file = match tokio::task::spawn_blocking(move || reopen(&owned)).await {
        Ok(opened) => opened,
        Err(e) => Err(std::io::Error::other(e)),
    }
    .map_err(|source| Error::AccessLog {
        path: path.to_path_buf(),
        source,
    })?;
    let (tx, rx) = mpsc::channel(QUEUE_LINES);
    let writer = tokio::spawn(write_lines(rx, file, path.to_path_buf(), TUNING));
    let sink = Arc::new(Sink {
        tx,
        dropped: AtomicU64::new(0),
        path: path.to_path_buf(),
    });
    Ok((sink, writer))
}

/// How the writer treats its file: how often it looks whether the file is
/// still the one at its path, how much it keeps while the disk refuses
/// lines, how often it tries a refusing disk again, and how long it lets
/// lines gather before writing them.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    check_every: Duration,
    keep_bytes: usize,
    retry_every: Duration,
    gather: Duration,
}

const TUNING: Tuning = Tuning {
    check_every: Duration::from_secs(1),
    // About 3 500 lines, besides the queue's 4 096: a disk full for a
    // moment (until a rotation's compression frees room, say) loses none.
    keep_bytes: 1024 * 1024,
    retry_every: Duration::from_secs(1),
    gather: GATHER,
};

/// The file a handle or path is: device and inode.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Writes what comes in `rx` to `file` (opened at `path`), a burst at a
/// time, each burst written on tokio's blocking pool with `std`'s file:
/// tokio's own file type reports a failed write only at the next one, its
/// bytes gone, and writes a buffer whole or in part without saying which
/// part: with it a full disk would lose lines uncounted, and could leave
/// one cut in two.
///
/// Lines the disk refuses (full, or failing) are kept, up to
/// `keep_bytes`, and written, in order, once it takes them again, tried
/// every `retry_every`; past that, new lines are dropped whole and counted
/// (`flotilla_gateway_access_log_dropped_total{reason="write_failed"}`). A
/// line cut by a short write is finished by the next write that succeeds.
///
/// A log rotated by renaming it (logrotate's default) or removed is noticed
/// at the first burst `check_every` after the last look, and a new file is
/// made at `path` for it and what follows, as a log shipper following the
/// path expects; nginx needs a signal for that. (A `copytruncate` rotation
/// needs nothing: the file is opened to append.)
async fn write_lines(
    mut rx: mpsc::Receiver<Vec<u8>>,
    file: std::fs::File,
    path: PathBuf,
    tuning: Tuning,
) {
    // The file's identity is read on the blocking pool, as every other
    // call on the file is.
    let Some(mut out) = on_blocking_pool(move || Out::new(file, path, tuning)).await else {
        return;
    };
    loop {
        let line = if out.failing.is_some() {
            // Woken to try the disk again even when no line comes.
            match tokio::time::timeout(tuning.retry_every, rx.recv()).await {
                Ok(None) => break,
                Ok(Some(line)) => Some(line),
                Err(_) => None,
            }
        } else {
            match rx.recv().await {
                Some(line) => Some(line),
                None => break,
            }
        };
        if let Some(line) = line {
            out.keep(&line);
            tokio::time::sleep(tuning.gather).await;
            // Take what else is queued: a burst costs one write. At most
            // half the room for kept lines, so that only lines a refusing
            // disk left behind ever fill it.
            for _ in 0..LINES_PER_BURST {
                if out.pending.len() + out.fresh.len() >= tuning.keep_bytes / 2 {
                    break;
                }
                match rx.try_recv() {
                    Ok(line) => out.keep(&line),
                    Err(_) => break,
                }
            }
        }
        if out.resting() {
            continue;
        }
        out = match on_blocking_pool(move || out.burst()).await {
            Some(out) => out,
            // Nothing left to write with.
            None => return,
        };
    }
    // The queue is empty and every sender gone: one last try.
    if let Some(mut out) = on_blocking_pool(move || out.burst()).await
        && !out.pending.is_empty()
    {
        let lines = out.pending.iter().filter(|&&b| b == b'\n').count();
        stats::access_log_dropped(stats::DROPPED_WRITE_FAILED, lines as u64);
        tracing::error!(target: "flotilla::gateway", path = %out.path.display(), lines, "the access log could not be written out; its last lines are lost");
        out.pending.clear();
    }
}

/// `work` on tokio's blocking pool; `None` only if it panicked (nothing
/// here does) or the runtime is going away.
async fn on_blocking_pool<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    tokio::task::spawn_blocking(work).await.ok()
}

/// The writer's file and the lines it has not written yet.
struct Out {
    file: std::fs::File,
    path: PathBuf,
    /// The file `file` is (device, inode), to tell a rotation.
    writing: Option<(u64, u64)>,
    /// Whole lines taken and not yet written, but for a part of the first
    /// that a short write took.
    pending: Vec<u8>,
    /// Lines taken since the last burst: they go to the file at the path
    /// when it changed, where `pending` goes to the file it was meant for.
    fresh: Vec<u8>,
    tuning: Tuning,
    looked: Instant,
    /// When the disk last refused a write, until it takes one again.
    failing: Option<Instant>,
    /// Lines dropped since the disk last took a write.
    dropped: u64,
    /// The path could not be made again after a rotation.
    lost: bool,
}

impl Out {
    /// Blocks (the file's metadata).
    fn new(file: std::fs::File, path: PathBuf, tuning: Tuning) -> Out {
        Out {
            writing: file.metadata().ok().map(|m| identity(&m)),
            file,
            path,
            pending: Vec::new(),
            fresh: Vec::new(),
            tuning,
            looked: Instant::now(),
            failing: None,
            dropped: 0,
            lost: false,
        }
    }

    /// Takes `line` to write, unless what is kept already leaves no room
    /// for it (only a disk refusing lines leaves that much unwritten: a
    /// burst takes at most half the room): then it is dropped and counted.
    fn keep(&mut self, line: &[u8]) {
        if self.pending.len() + self.fresh.len() + line.len() > self.tuning.keep_bytes {
            if self.dropped == 0 {
                tracing::warn!(target: "flotilla::gateway", path = %self.path.display(), kept_bytes = self.pending.len() + self.fresh.len(), "the access log cannot be written and the lines kept for it fill their room; new lines are dropped until it can");
            }
            self.dropped += 1;
            stats::access_log_dropped(stats::DROPPED_WRITE_FAILED, 1);
            return;
        }
        self.fresh.extend_from_slice(line);
    }

    /// Whether to wait before trying a refusing disk again.
    fn resting(&self) -> bool {
        self.failing
            .is_some_and(|tried| tried.elapsed() < self.tuning.retry_every)
    }

    /// Looks for a rotation when it is time, then writes what is pending.
    /// Blocks.
    fn burst(mut self) -> Out {
        if self.looked.elapsed() >= self.tuning.check_every {
            self.looked = Instant::now();
            self.follow_path();
        }
        if self.pending.is_empty() {
            // Usually: no copy.
            std::mem::swap(&mut self.pending, &mut self.fresh);
        } else {
            self.pending.append(&mut self.fresh);
        }
        match write_out(&mut self.file, &mut self.pending) {
            Ok(()) => {
                if self.dropped > 0 {
                    tracing::warn!(target: "flotilla::gateway", path = %self.path.display(), dropped = self.dropped, "the access log is written again; lines were dropped while it could not be");
                } else if self.failing.is_some() {
                    tracing::info!(target: "flotilla::gateway", path = %self.path.display(), "the access log is written again, with the lines kept while it could not be");
                }
                self.failing = None;
                self.dropped = 0;
                // Room kept for a refusing disk is not held on to after it.
                if self.pending.capacity() > 64 * 1024 {
                    self.pending = Vec::new();
                }
                if self.fresh.capacity() > 64 * 1024 {
                    self.fresh = Vec::new();
                }
            }
            Err(e) => {
                // Said once while it lasts.
                if self.failing.is_none() {
                    tracing::error!(target: "flotilla::gateway", path = %self.path.display(), error = %e, kept_up_to = self.tuning.keep_bytes, "cannot write the access log; its lines are kept, up to kept_up_to bytes, and written when it can");
                }
                self.failing = Some(Instant::now());
            }
        }
        self
    }

    /// Opens the file at the path again when the one being written is no
    /// longer there (rotated by a rename, or removed). What is pending goes
    /// to the new file if the old one refuses it.
    fn follow_path(&mut self) {
        let at_path = std::fs::metadata(&self.path).ok().map(|m| identity(&m));
        if at_path.is_some() && at_path == self.writing {
            return;
        }
        // What is written so far belongs to the old file.
        let _ = write_out(&mut self.file, &mut self.pending);
        match reopen(&self.path) {
            Ok(file) => {
                self.lost = false;
                self.writing = file.metadata().ok().map(|m| identity(&m));
                self.file = file;
                tracing::info!(target: "flotilla::gateway", path = %self.path.display(), "the access log was rotated; writing a new file");
            }
            // Said once, not at every look while it lasts.
            Err(e) if !self.lost => {
                self.lost = true;
                tracing::error!(target: "flotilla::gateway", path = %self.path.display(), error = %e, "the access log was moved and cannot be made again; writing the moved file");
            }
            Err(_) => {}
        }
    }
}

/// Writes all of `pending` to `file`, leaving in it what the file did not
/// take. Blocks.
fn write_out(file: &mut std::fs::File, pending: &mut Vec<u8>) -> std::io::Result<()> {
    use std::io::Write;
    while !pending.is_empty() {
        match file.write(pending) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                pending.drain(..n.min(pending.len()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn reopen(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Records every request (log line and metrics), one [`Entry`] each.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    sink: Option<Arc<Sink>>,
    stats: Arc<stats::GatewayStats>,
}

impl AccessLog {
    /// Counts into `stats`, the gateway's.
    pub(crate) fn new(sink: Option<Arc<Sink>>, stats: Arc<stats::GatewayStats>) -> AccessLog {
        AccessLog { sink, stats }
    }

    /// A request refused because `max_in_flight` were in flight.
    pub(crate) fn shed(&self) {
        self.stats.shed();
    }

    /// Starts the record of `req`, counted in flight until it is dropped.
    /// Until [`Entry::responded`] it stands for a client that left: dropped
    /// with the request's future, it logs a 499, under what the edge had
    /// found by then ([`Entry::serving`]).
    pub(crate) fn begin(&self, req: &Request<Body>, request_id: RequestId, peer: IpAddr) -> Entry {
        // What only a line needs is kept only when a line will be written
        // (a file, or the console's filter letting access lines through):
        // the URI's clone and drop were ~1 % of a request's instructions
        // (`instructions.sh`) in a gateway that logs nothing. A request
        // begun with neither on writes no line.
        let logged = self.sink.is_some()
            || tracing::enabled!(target: "flotilla::access", tracing::Level::INFO);
        Entry {
            sink: self.sink.clone(),
            stats: {
                self.stats.in_flight().increment(1.0);
                Arc::clone(&self.stats)
            },
            // Only the file's lines carry a wall-clock time.
            ts: self.sink.as_ref().map(|_| SystemTime::now()),
            start: crate::clock::now(),
            request_id,
            // The query string is left out when logging: it often carries
            // tokens. Cloning the URI shares its bytes: no copy unless a
            // line is written.
            request: logged.then(|| Told {
                method: req.method().clone(),
                uri: req.uri().clone(),
                client: peer,
                trace_id: crate::trace::kept(req.headers()).and_then(crate::trace::trace_id_of),
                refusal: None,
            }),
            served: Served {
                logged,
                ..Served::default()
            },
            status: StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            bytes: 0,
        }
    }
}

/// One request's record; written when dropped.
pub(crate) struct Entry {
    sink: Option<Arc<Sink>>,
    /// The gateway's: its in-flight gauge is decremented when the entry is
    /// dropped, and a request no route matched is counted there.
    stats: Arc<stats::GatewayStats>,
    ts: Option<SystemTime>,
    start: Instant,
    request_id: RequestId,
    /// What only a line needs, when a line is to be written.
    request: Option<Told>,
    /// What the edge found as it went (route, client, trace, caller,
    /// instance), written here as it found it rather than handed over
    /// with the response: a request whose client left midway is logged
    /// and counted under its route, client and trace all the same. Its
    /// instance is kept until the response body is done: it also counts
    /// the request on its instance.
    served: Served,
    status: StatusCode,
    bytes: u64,
}

/// A request as its line tells it.
struct Told {
    method: Method,
    uri: Uri,
    /// Who sent it, unless the edge found another behind trusted proxies
    /// (`Served::client`): the connection's peer (the client a PROXY
    /// header named).
    client: IpAddr,
    /// The client's kept `traceparent`'s trace, else it is in the one the
    /// edge started (`Served::trace`).
    trace_id: Option<[u8; 32]>,
    /// Why the gateway answered it itself, if it did.
    refusal: Option<Refusal>,
}

/// `s`, cut to what takes at most `max` bytes written as a JSON string's
/// content, and whether it was cut: at a character, before an escape,
/// never inside either, so that the line stays valid JSON and the value
/// valid UTF-8.
fn clip(s: &str, max: usize) -> (&str, bool) {
    // An escape takes at most 6 bytes (`\u001f`): so short a value fits
    // however it is written, and costs the usual request one comparison.
    if s.len() <= max / 6 {
        return (s, false);
    }
    let mut written = 0;
    for (at, b) in s.bytes().enumerate() {
        written += json::escaped_len(b);
        if written > max {
            // A boundary is at most 3 bytes back.
            let end = (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            return (s.get(..end).unwrap_or_default(), true);
        }
    }
    (s, false)
}

/// Which of a line's values [`clip`] cut.
#[derive(Debug, Clone, Copy, Default)]
struct Cut {
    method: bool,
    path: bool,
    user: bool,
}

impl Cut {
    fn any(self) -> bool {
        self.method || self.path || self.user
    }
}

/// `s` as a JSON string, ended with [`CUT_MARK`] when it was `cut`.
fn push_string(out: &mut Vec<u8>, s: &str, cut: bool) {
    json::string(out, s);
    if cut {
        // Before the closing quote.
        out.pop();
        out.extend_from_slice(CUT_MARK.as_bytes());
        out.push(b'"');
    }
}

/// `s`, or `null`, as [`push_string`] writes it.
fn push_string_or_null(out: &mut Vec<u8>, s: Option<&str>, cut: bool) {
    match s {
        Some(s) => push_string(out, s, cut),
        None => out.extend_from_slice(b"null"),
    }
}

/// [`clip`] of a value there may not be.
fn clip_some(s: Option<&str>, max: usize) -> (Option<&str>, bool) {
    match s {
        Some(s) => {
            let (s, cut) = clip(s, max);
            (Some(s), cut)
        }
        None => (None, false),
    }
}

/// `took` in microseconds, rounded: resolution enough, and short lines.
fn micros(took: Duration) -> u64 {
    u64::try_from((took.as_nanos() + 500) / 1000).unwrap_or(u64::MAX)
}

/// A line of the file, as [`Line::encode`] writes it.
struct Line<'a> {
    ts: SystemTime,
    /// `[A-Za-z0-9._:-]` (`request_id::is_valid`, or made so).
    request_id: &'a [u8],
    /// The trace the request's `traceparent` names: the services' log
    /// lines carry the same `trace_id`.
    trace_id: Option<&'a [u8; 32]>,
    client: IpAddr,
    /// `None` only for a request refused before its request line was
    /// read whole (`Refused`).
    method: Option<&'a str>,
    path: Option<&'a str>,
    route: Option<&'a str>,
    service: Option<&'a str>,
    instance: Option<&'a str>,
    /// Only on routes with a cache.
    cache: Option<&'a str>,
    /// The verified caller, when it has one.
    user: Option<&'a str>,
    /// The `error.code` of an answer the gateway made itself.
    error: Option<&'a str>,
    /// Why a credential was refused (`expired`, `bad_signature`, …).
    reason: Option<&'a str>,
    /// Which of the method, path and user were cut ([`clip`]): they are
    /// given here cut, and written with [`CUT_MARK`].
    cut: Cut,
    status: u16,
    /// From arrival to the last byte, in microseconds; written as
    /// milliseconds (`duration_ms`).
    duration_us: u64,
    bytes: u64,
}

/// Room for a line's fixed parts (keys, quotes, the time, the ids), so that
/// its buffer is allocated once.
const LINE_ROOM: usize = 320;

thread_local! {
    /// The second a line's time was last written for on this thread, and
    /// its text up to the seconds (`2025-12-01T12:06:31`): a line takes
    /// the text and adds its milliseconds, as nginx keeps its time's text
    /// (`ngx_cached_http_log_iso8601`). Formatting the whole time took
    /// about 370 instructions a line.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `ts` in RFC 3339, UTC, with milliseconds: `2025-12-01T12:06:31.721Z`,
/// as `humantime::format_rfc3339_millis` writes it.
fn push_time(out: &mut Vec<u8>, ts: SystemTime) {
    let since = ts
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let second = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != second {
        use std::io::Write;
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(second);
        // `2025-12-01T12:06:31Z`: its first 19 bytes. Writing into a slice
        // of its length cannot fail.
        let mut rest = &mut text[..];
        let _ = write!(rest, "{}", humantime::format_rfc3339_seconds(whole));
        SECOND.set((second, text));
    }
    out.extend_from_slice(&text);
    let millis = since.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

/// `micros` as milliseconds with up to three decimals, as `serde_json`
/// writes that `f64`: `9.043`, `12.5`, `0.0`.
fn push_millis(out: &mut Vec<u8>, micros: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let fraction = micros % 1000;
    let digits = [
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    // Without trailing zeros, but for one after the point.
    let len = if fraction.is_multiple_of(100) {
        2
    } else if fraction.is_multiple_of(10) {
        3
    } else {
        4
    };
    out.extend_from_slice(&digits[..len]);
}

impl Line<'_> {
    /// The line, with its newline, as `serde_json` wrote it from a struct
    /// of these fields (the keys in this order, `null` for a missing route,
    /// service or instance, the other missing fields left out). Written
    /// here: through `serde_json`, which escapes strings a byte at a time
    /// and grows its buffer as it goes, a line cost the gateway about
    /// 6 700 instructions, three times nginx's (`ACCESS_LOG=1
    /// benches/gateway/instructions.sh`).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            LINE_ROOM
                + self.method.map_or(0, str::len)
                + self.path.map_or(0, str::len)
                + self.route.map_or(0, str::len)
                + self.service.map_or(0, str::len)
                + self.instance.map_or(0, str::len)
                + self.user.map_or(0, str::len),
        );
        out.extend_from_slice(b"{\"ts\":\"");
        push_time(&mut out, self.ts);
        // The ids have nothing to escape (nor to check as UTF-8): a request
        // id is of `[A-Za-z0-9._:-]`, a trace id hex digits.
        out.extend_from_slice(b"\",\"request_id\":\"");
        out.extend_from_slice(self.request_id);
        if let Some(trace_id) = self.trace_id {
            out.extend_from_slice(b"\",\"trace_id\":\"");
            out.extend_from_slice(trace_id);
        }
        out.extend_from_slice(b"\",\"client\":\"");
        crate::ip::push_text(self.client, &mut out);
        out.extend_from_slice(b"\",\"method\":");
        push_string_or_null(&mut out, self.method, self.cut.method);
        out.extend_from_slice(b",\"path\":");
        push_string_or_null(&mut out, self.path, self.cut.path);
        out.extend_from_slice(b",\"route\":");
        json::string_or_null(&mut out, self.route);
        out.extend_from_slice(b",\"service\":");
        json::string_or_null(&mut out, self.service);
        out.extend_from_slice(b",\"instance\":");
        json::string_or_null(&mut out, self.instance);
        for (key, value, cut) in [
            (&b",\"cache\":"[..], self.cache, false),
            (b",\"user\":", self.user, self.cut.user),
            (b",\"error\":", self.error, false),
            (b",\"reason\":", self.reason, false),
        ] {
            if let Some(value) = value {
                out.extend_from_slice(key);
                push_string(&mut out, value, cut);
            }
        }
        if self.cut.any() {
            out.extend_from_slice(b",\"truncated\":true");
        }
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        out.extend_from_slice(b",\"duration_ms\":");
        push_millis(&mut out, self.duration_us);
        out.extend_from_slice(b",\"bytes\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.bytes).as_bytes());
        out.extend_from_slice(b"}\n");
        out
    }

    /// Writes the line: to the console when its filter lets the access
    /// target through, and to the file of `sink` if there is one.
    fn record(&self, sink: Option<&Sink>) {
        // The fields are evaluated only when the line is traced.
        tracing::info!(
            target: "flotilla::access",
            // `[A-Za-z0-9._:-]`.
            request_id = std::str::from_utf8(self.request_id).unwrap_or("-"),
            // Hex digits.
            trace_id = self.trace_id.and_then(|id| std::str::from_utf8(id).ok()),
            client = %self.client,
            method = self.method,
            path = self.path,
            route = self.route,
            service = self.service,
            instance = self.instance,
            cache = self.cache,
            user = self.user,
            error = self.error,
            reason = self.reason,
            truncated = self.cut.any().then_some(true),
            status = self.status,
            duration_ms = self.duration_us as f64 / 1000.0,
            bytes = self.bytes,
            "request"
        );
        if let Some(sink) = sink {
            sink.send(self.encode());
        }
    }
}

/// A request the HTTP/1 driver answered itself before it became one the
/// edge could take (`h1`): its head too slow (408), too large (431),
/// malformed (400, 414, 501, 505), or its chunked body malformed (400).
pub(crate) struct Refused<'a> {
    pub status: StatusCode,
    /// The answer's `error.code`.
    pub code: &'static str,
    /// Made up for it, and sent in the answer.
    pub request_id: &'a RequestId,
    /// The connection's peer (or the client a PROXY header named): the
    /// fields of a head refused are not read for another.
    pub client: IpAddr,
    /// As far as its request line came whole.
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    /// From the head's first byte to the answer's last.
    pub took: Duration,
    /// The answer's body bytes written.
    pub bytes: u64,
}

impl AccessLog {
    /// Records `refused` as the gateway's other answers before a route are:
    /// counted under `route="unmatched"`, and a line without a route.
    pub(crate) fn refused(&self, refused: &Refused<'_>) {
        self.stats
            .unmatched()
            .finished(refused.status, refused.took);
        let traced = tracing::enabled!(target: "flotilla::access", tracing::Level::INFO);
        if !traced && self.sink.is_none() {
            return;
        }
        let (method, cut_method) = clip_some(refused.method, MAX_METHOD);
        let (path, cut_path) = clip_some(refused.path, MAX_PATH);
        let line = Line {
            // When its head began.
            ts: SystemTime::now()
                .checked_sub(refused.took)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            request_id: refused.request_id.header().as_bytes(),
            trace_id: None,
            client: refused.client,
            method,
            path,
            route: None,
            service: None,
            instance: None,
            cache: None,
            user: None,
            error: Some(refused.code),
            reason: None,
            cut: Cut {
                method: cut_method,
                path: cut_path,
                user: false,
            },
            status: refused.status.as_u16(),
            duration_us: micros(refused.took),
            bytes: refused.bytes,
        };
        line.record(self.sink.as_deref());
    }
}

impl Entry {
    pub(crate) fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    /// Whether a line will be written for it: what only a line needs is
    /// gathered only then.
    pub(crate) fn logs(&self) -> bool {
        self.request.is_some()
    }

    /// The request's id, and where the edge writes what it finds (its
    /// route, client, trace, caller, instance) as it finds it.
    pub(crate) fn serving(&mut self) -> (&RequestId, &mut Served) {
        (&self.request_id, &mut self.served)
    }

    /// The response is ready: its status, and why the gateway answered it
    /// itself, if it did.
    pub(crate) fn responded(&mut self, status: StatusCode, refusal: Option<Refusal>) {
        self.status = status;
        if let Some(told) = &mut self.request {
            told.refusal = refusal;
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let took = crate::clock::now().saturating_duration_since(self.start);
        self.stats.in_flight().decrement(1.0);
        // A sticky split's service, when one took it, else its route.
        let matched = self.served.split.as_ref().or(self.served.route.as_ref());
        let route = matched.map(|r| r.label());
        let service = matched.map(|r| r.service.as_str());
        match matched {
            Some(r) => r.stats.finished(self.status, took),
            None => self.stats.unmatched().finished(self.status, took),
        }
        // Usually neither is on (no file, and the line filtered out of the
        // console): then the line's fields are not worth computing.
        let Some(Told {
            method,
            uri,
            client,
            trace_id,
            refusal,
        }) = &self.request
        else {
            return;
        };
        let traced = tracing::enabled!(target: "flotilla::access", tracing::Level::INFO);
        if !traced && self.sink.is_none() {
            return;
        }
        // What the client chose, clipped: a line stays a few KiB.
        let (method, cut_method) = clip(method.as_str(), MAX_METHOD);
        let (path, cut_path) = clip(uri.path(), MAX_PATH);
        // A verified id is a header value, visible ASCII (the chassis's
        // rule); one that is not is left out rather than mangled.
        let user = self.served.user.as_ref().and_then(|u| u.to_str().ok());
        let (user, cut_user) = clip_some(user, MAX_USER);
        let trace_id = (*trace_id).or_else(|| self.served.trace.map(|t| t.trace_id()));
        let line = Line {
            // Set exactly when a file is written.
            ts: self.ts.unwrap_or(SystemTime::UNIX_EPOCH),
            request_id: self.request_id.header().as_bytes(),
            trace_id: trace_id.as_ref(),
            client: self.served.client.unwrap_or(*client),
            method: Some(method),
            path: Some(path),
            route,
            service,
            instance: self.served.upstream.as_ref().map(Upstream::instance),
            cache: self.served.cache,
            user,
            error: refusal.map(|r| r.code),
            reason: refusal.and_then(|r| r.reason),
            cut: Cut {
                method: cut_method,
                path: cut_path,
                user: cut_user,
            },
            status: self.status.as_u16(),
            duration_us: micros(took),
            bytes: self.bytes,
        };
        line.record(self.sink.as_deref());
    }
}

/// The response body as the client gets it: counts its bytes, and ends the
/// request's record (and, before it, whatever `held` keeps: the in-flight
/// count) when the body is finished or abandoned. The one wrapper a
/// response body gets on its way out.
pub(crate) fn logged<H: Send + 'static>(inner: Body, held: H, entry: Entry) -> Body {
    Logged { inner, held, entry }.boxed_unsync()
}

pin_project_lite::pin_project! {
    struct Logged<H> {
        #[pin]
        inner: Body,
        // Fields drop in order: `held` before `entry`.
        held: H,
        entry: Entry,
    }
}

impl<H> http_body::Body for Logged<H> {
    type Data = bytes::Bytes;
    type Error = body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.entry.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn read_lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn request(uri: &str) -> Request<Body> {
        match Request::builder().uri(uri).body(body::empty()) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    async fn open_log(dir: &tempfile::TempDir) -> (PathBuf, AccessLog, JoinHandle<()>) {
        let path = dir.path().join("access.log");
        let (sink, writer) = match open(&path).await {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        };
        (
            path,
            AccessLog::new(Some(sink), stats::GatewayStats::new()),
            writer,
        )
    }

    /// Waits until the file at `path` reads `want`.
    async fn reads(path: &Path, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} reads {text:?}, not {want:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_rotated_or_removed_log_is_made_again_at_its_path() {
        // Looks at every burst.
        let tuning = Tuning {
            check_every: Duration::ZERO,
            ..TUNING
        };
        let TestLog {
            _dir,
            path,
            tx,
            writer,
        } = test_log(tuning, false);
        let send = |line: &str| {
            let tx = tx.clone();
            let line = line.as_bytes().to_vec();
            async move { assert!(tx.send(line).await.is_ok()) }
        };
        send("one\n").await;
        reads(&path, "one\n").await;
        // logrotate's default: rename, and the writer makes a new file.
        let rotated = path.with_file_name("access.log.1");
        assert!(std::fs::rename(&path, &rotated).is_ok());
        send("two\n").await;
        reads(&path, "two\n").await;
        // Removed outright: made again too.
        assert!(std::fs::remove_file(&path).is_ok());
        send("three\n").await;
        reads(&path, "three\n").await;
        send("four\n").await;
        reads(&path, "three\nfour\n").await;
        drop(tx);
        finished(writer).await;
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap_or_default(),
            "one\n"
        );
    }

    /// The lines `flotilla_gateway_access_log_dropped_total` counts as
    /// dropped for `reason`, in this process.
    fn dropped(reason: &str) -> u64 {
        let prefix = format!("flotilla_gateway_access_log_dropped_total{{reason=\"{reason}\"}} ");
        stats::prometheus_recorder()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `what` holds, or fails the test after 5 s.
    async fn until(what: &str, holds: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !holds() {
            assert!(Instant::now() < deadline, "not so after 5 s: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Held by each test that counts lines dropped for a failing disk, so
    /// that each counts only its own: the counter is the process's.
    static FAILING_DISK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A writer of `access.log` in a temp dir of its own, which it holds.
    struct TestLog {
        _dir: tempfile::TempDir,
        path: PathBuf,
        tx: mpsc::Sender<Vec<u8>>,
        writer: JoinHandle<()>,
    }

    /// With `full`, the log's path leads to `/dev/full`, where every write
    /// fails with ENOSPC, as on a full disk.
    fn test_log(tuning: Tuning, full: bool) -> TestLog {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let path = dir.path().join("access.log");
        if full {
            assert!(std::os::unix::fs::symlink("/dev/full", &path).is_ok());
        }
        let file = match reopen(&path) {
            Ok(f) => f,
            Err(e) => panic!("{e}"),
        };
        let (tx, rx) = mpsc::channel(64);
        TestLog {
            _dir: dir,
            writer: tokio::spawn(write_lines(rx, file, path.clone(), tuning)),
            path,
            tx,
        }
    }

    /// A log on a full disk, with the lines already counted as dropped for
    /// a failing disk when it started (`before`). Dropped with the test:
    /// the lock and the directory are held as long.
    struct FullDisk {
        _counting: tokio::sync::MutexGuard<'static, ()>,
        log: TestLog,
        before: u64,
    }

    async fn full_disk(tuning: Tuning) -> FullDisk {
        let counting = FAILING_DISK.lock().await;
        let _ = stats::prometheus_recorder();
        // Read before the writer can have dropped anything.
        let before = dropped(stats::DROPPED_WRITE_FAILED);
        FullDisk {
            _counting: counting,
            log: test_log(tuning, true),
            before,
        }
    }

    /// Lines that gather faster than the room for kept lines holds go out
    /// in several bursts, none dropped: only a refusing disk fills it.
    #[tokio::test]
    async fn a_burst_bigger_than_the_room_for_kept_lines_is_written_whole() {
        // Room for three 10-byte lines; ten arrive while the first gathers.
        let log = test_log(
            Tuning {
                keep_bytes: 30,
                gather: Duration::from_millis(50),
                ..TUNING
            },
            false,
        );
        let mut want = String::new();
        for i in 0..10 {
            let line = format!("line-{i:04}\n");
            want.push_str(&line);
            assert!(log.tx.send(line.into_bytes()).await.is_ok());
        }
        reads(&log.path, &want).await;
        drop(log.tx);
        finished(log.writer).await;
    }

    #[tokio::test]
    async fn lines_a_full_disk_refuses_are_kept_and_written_once_one_takes_them() {
        // Room for three 10-byte lines; the path looked at every burst.
        let disk = full_disk(Tuning {
            check_every: Duration::ZERO,
            keep_bytes: 30,
            retry_every: Duration::from_millis(10),
            gather: Duration::ZERO,
        })
        .await;
        let (path, before) = (&disk.log.path, disk.before);
        for i in 0..10 {
            let line = format!("line-{i:04}\n").into_bytes();
            assert!(disk.log.tx.send(line).await.is_ok());
        }
        // Three kept, seven dropped: however the writer took them in, no
        // write ever succeeds.
        until("seven lines counted as dropped", || {
            dropped(stats::DROPPED_WRITE_FAILED) >= before + 7
        })
        .await;
        // The disk takes lines again: here, the path is a file once more
        // (the writer makes it, as after a rotation), and the kept lines
        // are written to it without another line coming to prompt it.
        assert!(std::fs::remove_file(path).is_ok());
        reads(path, "line-0000\nline-0001\nline-0002\n").await;
        assert!(disk.log.tx.send(b"after\n".to_vec()).await.is_ok());
        reads(path, "line-0000\nline-0001\nline-0002\nafter\n").await;
        drop(disk.log.tx);
        finished(disk.log.writer).await;
        assert_eq!(dropped(stats::DROPPED_WRITE_FAILED), before + 7);
    }

    #[tokio::test]
    async fn lines_a_full_disk_still_refuses_at_the_end_are_counted_and_the_writer_ends() {
        let disk = full_disk(TUNING).await;
        for i in 0..3 {
            let line = format!("line-{i}\n").into_bytes();
            assert!(disk.log.tx.send(line).await.is_ok());
        }
        drop(disk.log.tx);
        // Not waiting a retry interval per line, nor forever.
        finished(disk.log.writer).await;
        assert_eq!(dropped(stats::DROPPED_WRITE_FAILED), disk.before + 3);
    }

    /// A line's time is `humantime`'s RFC 3339 text with milliseconds,
    /// through seconds the thread formats once and milliseconds it adds.
    #[test]
    fn a_line_s_time_is_rfc3339_with_milliseconds() {
        let mut millis: Vec<u64> = vec![0, 999, 1_000, 1_764_590_791_721, 1_764_590_791_722];
        // Random times to the year 2200, each followed by one in the same
        // second and one in the next, which the thread's second serves.
        for _ in 0..2_000 {
            // A failure names the time it was at.
            let ms = crate::random::next() % 7_258_118_400_000;
            millis.extend([ms, ms - ms % 1000 + 999, ms + 1000]);
        }
        for ms in millis {
            let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            let mut out = Vec::new();
            push_time(&mut out, ts);
            let want = humantime::format_rfc3339_millis(ts).to_string();
            assert_eq!(String::from_utf8(out).unwrap_or_default(), want, "{ms}");
        }
    }

    /// A duration in microseconds is written as `serde_json` writes the
    /// milliseconds as an `f64`.
    #[test]
    fn a_line_s_duration_is_serde_json_s_float() {
        let mut micros: Vec<u64> = (0..20_000).collect();
        micros.extend((0..2_000).map(|i| i * 7_919 + 1_000_000));
        micros.extend([3_600_000_000, 86_400_000_001, 999_999_999_999]);
        for us in micros {
            let mut out = Vec::new();
            push_millis(&mut out, us);
            let want = serde_json::to_vec(&(us as f64 / 1000.0)).unwrap_or_default();
            assert_eq!(
                String::from_utf8(out).unwrap_or_default(),
                String::from_utf8(want).unwrap_or_default(),
                "{us}"
            );
        }
    }

    /// A line keeps its keys in their order, with `null` for a missing
    /// route, service or instance and the other missing fields left out,
    /// and strings escaped as JSON escapes them.
    #[test]
    fn a_line_is_json_with_its_keys_in_order() {
        let full = Line {
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_590_791_721),
            request_id: b"5efe8de8-0dc2-4ec3-b548-32b341a36756",
            trace_id: Some(b"4bf92f3577b34da6a3ce929d0e0e4736"),
            client: IpAddr::from([203, 0, 113, 9]),
            method: Some("GET"),
            path: Some("/api/catalog/products"),
            route: Some("/api/catalog/**"),
            service: Some("catalog"),
            instance: Some("catalog-0"),
            cache: Some("hit"),
            user: Some("user-1"),
            error: Some("rate_limited"),
            reason: Some("d-user"),
            cut: Cut::default(),
            status: 429,
            duration_us: 9_043,
            bytes: 2856,
        };
        let text = String::from_utf8(full.encode()).unwrap_or_default();
        assert_eq!(
            text,
            concat!(
                r#"{"ts":"2025-12-01T12:06:31.721Z","request_id":"5efe8de8-0dc2-4ec3-b548-32b341a36756","#,
                r#""trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","client":"203.0.113.9","method":"GET","#,
                r#""path":"/api/catalog/products","route":"/api/catalog/**","service":"catalog","#,
                r#""instance":"catalog-0","cache":"hit","user":"user-1","error":"rate_limited","#,
                r#""reason":"d-user","status":429,"duration_ms":9.043,"bytes":2856}"#,
                "\n"
            )
        );
        let bare = Line {
            trace_id: None,
            client: IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7]),
            method: Some("PURGE"),
            path: Some("/a\"b\\c\u{1}é"),
            route: None,
            service: None,
            instance: None,
            cache: None,
            user: Some("a \"quoted\" user"),
            error: None,
            reason: None,
            status: 499,
            duration_us: 0,
            bytes: 0,
            ..full
        };
        let text = String::from_utf8(bare.encode()).unwrap_or_default();
        assert!(
            text.ends_with(",\"duration_ms\":0.0,\"bytes\":0}\n"),
            "{text}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(
            parsed,
            serde_json::json!({
                "ts": "2025-12-01T12:06:31.721Z",
                "request_id": "5efe8de8-0dc2-4ec3-b548-32b341a36756",
                "client": "2001:db8::7",
                "method": "PURGE",
                "path": "/a\"b\\c\u{1}é",
                "route": null,
                "service": null,
                "instance": null,
                "user": "a \"quoted\" user",
                "status": 499,
                "duration_ms": 0.0,
                "bytes": 0,
            })
        );
        // A request refused before its request line came whole.
        let unread = Line {
            method: None,
            path: None,
            user: None,
            error: Some("request_timeout"),
            status: 408,
            ..bare
        };
        let text = String::from_utf8(unread.encode()).unwrap_or_default();
        assert!(
            text.contains(r#""client":"2001:db8::7","method":null,"path":null,"route":null,"#),
            "{text}"
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok(),
            "{text}"
        );
    }

    /// A value too long for a line is cut where its escaped text would
    /// pass the bound, never inside a character or an escape; the line
    /// stays JSON, says `truncated`, and the value ends with the mark.
    #[test]
    fn a_value_too_long_is_cut_at_a_character_and_the_line_stays_json() {
        for (unit, escaped) in [
            ("a", 1),
            ("é", 2),
            ("€", 3),
            ("𝄞", 4),
            ("\"", 2),
            ("\\", 2),
            ("\u{1}", 6),
        ] {
            for max in [12, 13, 14, 15, 16, 17, 18, 100, 2048] {
                // Lengths about the bound, and far past it.
                for units in [max / escaped - 1, max / escaped, max / escaped + 1, max * 3] {
                    let value = unit.repeat(units);
                    let (kept, cut) = clip(&value, max);
                    let mut text = Vec::new();
                    json::string(&mut text, kept);
                    let written = text.len() - 2;
                    assert!(written <= max, "{unit:?}×{units} in {max}: {written}");
                    assert_eq!(cut, units * escaped > max, "{unit:?}×{units} in {max}");
                    if cut {
                        // As much as fits: one more would not.
                        assert!(written + escaped > max, "{unit:?}×{units} in {max}");
                        assert_eq!(kept, unit.repeat(written / escaped));
                    } else {
                        assert_eq!(kept, value);
                    }
                }
            }
        }
        let long = format!("/{}", "a\"é\\".repeat(30_000));
        let line = Line {
            ts: SystemTime::UNIX_EPOCH,
            request_id: b"id",
            trace_id: None,
            client: IpAddr::from([203, 0, 113, 9]),
            method: Some("GET"),
            path: Some(clip(&long, MAX_PATH).0),
            route: None,
            service: None,
            instance: None,
            cache: None,
            user: Some("u"),
            error: None,
            reason: None,
            cut: Cut {
                path: true,
                ..Cut::default()
            },
            status: 404,
            duration_us: 1,
            bytes: 0,
        };
        let text = line.encode();
        assert!(text.len() < 3 * 1024, "{}", text.len());
        let parsed: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
        let path = parsed["path"].as_str().unwrap_or_default();
        let kept = path.strip_suffix(CUT_MARK).unwrap_or_default();
        assert!(long.starts_with(kept), "{path}");
        // As much as fits: the next character takes at most 2.
        let mut escaped = Vec::new();
        json::string(&mut escaped, kept);
        assert!(
            (MAX_PATH - 1..=MAX_PATH).contains(&(escaped.len() - 2)),
            "{path}"
        );
        assert_eq!(parsed["truncated"], true);
        assert_eq!(parsed["user"], "u");
    }

    /// However long the path, method and verified caller a client sends,
    /// a request's line is a few KiB: the queue's bound in lines is then
    /// one in bytes.
    #[tokio::test]
    async fn a_request_s_line_is_a_few_kib_whatever_the_client_sent() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let (path, log, writer) = open_log(&dir).await;
        // The longest target the HTTP/1 driver takes.
        let long_path = format!("/{}", "p".repeat(60 * 1024));
        let mut req = request(&long_path);
        let method = "X".repeat(1000);
        *req.method_mut() = match Method::from_bytes(method.as_bytes()) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        };
        let mut entry = log.begin(
            &req,
            RequestId::of(&mut http::HeaderMap::new()),
            IpAddr::from([10, 0, 0, 2]),
        );
        let user = "u".repeat(8 * 1024);
        entry.serving().1.user = http::HeaderValue::from_str(&user).ok();
        entry.responded(StatusCode::NOT_FOUND, None);
        drop(entry);
        drop(log);
        finished(writer).await;
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(text.len() < 3 * 1024, "{} bytes", text.len());
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["status"], 404);
        assert_eq!(line["truncated"], true);
        for (key, value, max) in [
            ("path", &long_path, MAX_PATH),
            ("method", &method, MAX_METHOD),
            ("user", &user, MAX_USER),
        ] {
            let logged = line[key].as_str().unwrap_or_default();
            let kept = logged.strip_suffix(CUT_MARK).unwrap_or_default();
            assert_eq!(kept.len(), max, "{key}: {logged}");
            assert!(value.starts_with(kept), "{key}: {logged}");
        }
    }

    async fn finished(writer: JoinHandle<()>) {
        match tokio::time::timeout(Duration::from_secs(5), writer).await {
            Ok(Ok(())) => {}
            other => panic!("writer did not finish: {other:?}"),
        }
    }

    #[tokio::test]
    async fn writes_one_json_line_per_request_after_the_body() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let (path, log, writer) = open_log(&dir).await;
        let req = request("/a/b?token=secret");
        let peer = IpAddr::from([10, 0, 0, 2]);
        let mut entry = log.begin(&req, RequestId::of(&mut http::HeaderMap::new()), peer);
        // The client the edge found behind the proxy at `peer`.
        assert!(entry.logs());
        let (_, served) = entry.serving();
        served.client = Some(IpAddr::from([203, 0, 113, 9]));
        served.user = Some(http::HeaderValue::from_static("user-1"));
        let refusal = Refusal {
            code: "invalid_token",
            reason: Some("expired"),
        };
        entry.responded(StatusCode::UNAUTHORIZED, Some(refusal));
        let held = Arc::new(());
        let body = logged(body::full("hello"), Arc::clone(&held), entry);
        assert_eq!(Arc::strong_count(&held), 2);
        let collected = body.collect().await;
        assert!(collected.is_ok());
        assert_eq!(Arc::strong_count(&held), 1, "held until the body is done");
        // The log (and with it the sink) is gone: the writer drains and ends.
        drop(log);
        finished(writer).await;
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["method"], "GET");
        assert_eq!(line["client"], "203.0.113.9");
        assert_eq!(line["path"], "/a/b");
        assert_eq!(line["status"], 401);
        assert_eq!(line["user"], "user-1");
        assert_eq!(line["error"], "invalid_token");
        assert_eq!(line["reason"], "expired");
        assert_eq!(line["bytes"], 5);
        assert_eq!(line["route"], serde_json::Value::Null);
        assert!(line["request_id"].as_str().is_some_and(|id| id.len() == 36));
        assert!(line["ts"].as_str().is_some_and(|ts| ts.ends_with('Z')));
        assert!(line["duration_ms"].is_number());
    }

    #[tokio::test]
    async fn an_abandoned_request_is_logged_as_499() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let (path, log, writer) = open_log(&dir).await;
        let peer = IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7]);
        let entry = log.begin(
            &request("/slow"),
            RequestId::of(&mut http::HeaderMap::new()),
            peer,
        );
        // The request's future, holding the entry, is dropped before any
        // response.
        drop(entry);
        drop(log);
        finished(writer).await;
        let lines = read_lines(&path);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["status"], 499);
        assert_eq!(lines[0]["path"], "/slow");
        // Before the edge found anyone else: the connection's peer.
        assert_eq!(lines[0]["client"], "2001:db8::7");
    }
}
