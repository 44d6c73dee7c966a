//! What `flotilla up` prints: instance output prefixed with the instance id,
//! and the runtime's own events. JSON log lines (the runtime contract asks
//! services for them) are shown compactly; anything else is shown as is.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// Lines waiting for the console at most. Past it, lines are dropped (and
/// counted, and the count printed once the console drains) rather than
/// waited for.
const BACKLOG: usize = 4096;

/// A queue of lines to a writer thread that writes them to `out` (stdout,
/// stderr): whoever sends never waits for the terminal or pipe behind it.
/// A console nobody reads (`flotilla up | less` left unscrolled, Ctrl-S in
/// the terminal) blocks only the writer thread, never the instances'
/// output pumps, the supervisors or the gateway. Past [`BACKLOG`] lines,
/// lines are dropped and counted, and the count written once it drains.
#[derive(Debug, Clone)]
pub struct Lines {
    tx: SyncSender<Line>,
    dropped: Arc<AtomicU64>,
}

#[derive(Debug)]
enum Line {
    /// Written as it is (ending with its newline).
    Bytes(Vec<u8>),
    /// Answered once every line before it is written.
    Flush(SyncSender<()>),
}

impl Lines {
    /// A writer thread called `name` writing to `out`; `None` if no thread
    /// could be started.
    pub fn spawn(name: &str, mut out: impl Write + Send + 'static) -> Option<Lines> {
        let (tx, rx) = std::sync::mpsc::sync_channel(BACKLOG);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_lines(&rx, &counted, &mut out))
            .ok()?;
        Some(Lines { tx, dropped })
    }

    /// Queues `line`, which ends with its newline; drops it if the queue
    /// is full.
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(Line::Bytes(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A writer of one line (a `tracing` event's, say), queued whole when
    /// it is dropped: `tracing_subscriber`'s `with_writer(move ||
    /// lines.writer())` logs through the queue.
    pub fn writer(&self) -> LineWriter {
        LineWriter {
            line: Vec::new(),
            to: self.clone(),
        }
    }

    /// Waits, up to `within`, for what was sent so far to be written:
    /// before `flotilla` exits, so that its last lines are not lost.
    pub fn flush(&self, within: Duration) {
        let until = std::time::Instant::now() + within;
        let (done, written) = std::sync::mpsc::sync_channel(1);
        let mut flush = Line::Flush(done);
        // A full queue is when the last lines matter most: wait for room.
        loop {
            match self.tx.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < until => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(until.saturating_duration_since(std::time::Instant::now()));
    }
}

/// See [`Lines::writer`].
#[derive(Debug)]
pub struct LineWriter {
    line: Vec<u8>,
    to: Lines,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.to.send(std::mem::take(&mut self.line));
        }
    }
}

/// Prints to stdout when enabled; always cheap to call, and never waits
/// for stdout (see [`Lines`]).
#[derive(Debug)]
pub(crate) struct Console {
    /// Instances' output (`flotilla up --quiet` turns it off).
    echo: bool,
    /// The runtime's own events and warnings: on for `flotilla up`, quiet
    /// or not (a refused reload or a crash loop must not go unseen because
    /// the services' output is), off for a system a test runs.
    events: bool,
    /// To the writer thread, when anything is printed at all.
    lines: Option<Lines>,
}

impl Console {
    pub(crate) fn new(echo: bool, events: bool) -> Self {
        let lines = if echo || events {
            Lines::spawn("flotilla-console", std::io::stdout())
        } else {
            None
        };
        Console {
            echo,
            events,
            lines,
        }
    }

    /// One line of an instance's output.
    pub(crate) fn instance_line(&self, instance: &str, line: &str) {
        if !self.echo {
            return;
        }
        let shown = compact_json(line).unwrap_or_else(|| line.to_string());
        self.print(format!("{instance:>12} | {}", defused(&shown)));
    }

    /// An event of the runtime itself (start, crash, restart, scale).
    pub(crate) fn event(&self, message: &str) {
        tracing::info!(target: "flotilla::runtime", "{message}");
        if self.events {
            self.print(format!("{:>12} | {message}", "flotilla"));
        }
    }

    /// A problem the operator should see even when output is quiet.
    pub(crate) fn warn(&self, message: &str) {
        tracing::warn!(target: "flotilla::runtime", "{message}");
        if self.events {
            self.print(format!("{:>12} | warning: {message}", "flotilla"));
        }
    }

    fn print(&self, mut line: String) {
        if let Some(lines) = &self.lines {
            line.push('\n');
            lines.send(line.into_bytes());
        }
    }

    /// See [`Lines::flush`].
    pub(crate) fn flush(&self, within: Duration) {
        if let Some(lines) = &self.lines {
            lines.flush(within);
        }
    }
}

impl Drop for Console {
    /// However the system ends (a failed start, Ctrl-C while starting),
    /// what it printed last reaches the console before `flotilla` exits.
    fn drop(&mut self) {
        self.flush(Duration::from_secs(1));
    }
}

/// The writer thread: writes `lines` to `out` as they come, and, once it
/// has caught up after some were dropped, says how many.
fn write_lines(lines: &Receiver<Line>, dropped: &AtomicU64, out: &mut impl Write) {
    while let Ok(line) = lines.recv() {
        match line {
            Line::Bytes(bytes) => {
                let _ = out.write_all(&bytes);
            }
            Line::Flush(done) => {
                let _ = out.flush();
                let _ = done.try_send(());
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let _ = writeln!(
                out,
                "{:>12} | warning: {lost} lines of output dropped: the console was not being read",
                "flotilla"
            );
        }
    }
}

/// Keys of a JSON log line that [`compact_json`] shows otherwise or not at
/// all: the level and message lead the line, the instance prefixes it, and
/// the rest say the same on every line of a process.
const STANDARD_KEYS: &[&str] = &[
    "level",
    "message",
    "msg",
    "fields",
    "timestamp",
    "time",
    "ts",
    "target",
    "span",
    "spans",
    "service",
    "instance",
    "system",
];

/// `line` with what a terminal would act on written out instead: control
/// characters (escape sequences, which can set the window title, write
/// the clipboard (OSC 52) or move the cursor; a newline, which would start
/// a line that looks like the runtime's own) and the bidirectional
/// overrides that reorder what is shown. An instance prints what its
/// clients sent it, and the JSON decoding of its lines turns `\u001b`
/// back into the byte. Colours (`ESC[…m`, which loggers such as
/// tracing's add by default) and a line's closing `\r` are dropped rather
/// than shown as noise.
fn defused(line: &str) -> std::borrow::Cow<'_, str> {
    let acts = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    if !line.chars().any(acts) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 16);
    let mut rest = line;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("\u{1b}[") {
            let params = after.len()
                - after
                    .trim_start_matches(|p: char| p.is_ascii_digit() || p == ';')
                    .len();
            if after[params..].starts_with('m') {
                rest = &after[params + 1..];
                continue;
            }
        }
        if acts(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// `LEVEL message key=value …` for a JSON log line: the key/values of
/// `fields` (tracing-subscriber's JSON shape), then the other top-level
/// ones (the chassis's shape, and most JSON-lines loggers').
fn compact_json(line: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let obj = value.as_object()?;
    let level = obj.get("level")?.as_str()?;
    let fields = obj.get("fields").and_then(|f| f.as_object());
    let message = fields
        .and_then(|f| f.get("message"))
        .or_else(|| obj.get("message"))
        .or_else(|| obj.get("msg"))
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let mut out = format!("{level:<5} {message}");
    let nested = fields
        .into_iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "message");
    let top = obj
        .iter()
        .filter(|(k, _)| !STANDARD_KEYS.contains(&k.as_str()));
    for (k, v) in nested.chain(top) {
        match v.as_str() {
            Some(s) => out.push_str(&format!(" {k}={s}")),
            None => out.push_str(&format!(" {k}={v}")),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines past the backlog are dropped, not waited for, and counted in
    /// a line of their own once the writer catches up.
    #[test]
    fn a_console_nobody_reads_drops_lines_instead_of_waiting() {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let lines = Lines {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        let console = Console {
            echo: true,
            events: true,
            lines: Some(lines.clone()),
        };
        // Nothing writes yet: the third and fourth lines find it full.
        for n in 0..4 {
            console.instance_line("a-0", &format!("line {n}"));
        }
        assert_eq!(lines.dropped.load(Ordering::Relaxed), 2);
        drop((console, lines.tx));
        let mut out = Vec::new();
        write_lines(&rx, &lines.dropped, &mut out);
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "         a-0 | line 0");
        assert!(lines[1].contains("2 lines of output dropped"), "{out}");
        assert_eq!(lines[2], "         a-0 | line 1");
        assert_eq!(lines.len(), 3, "{out}");
    }

    /// What tracing writes in pieces goes to the queue as one line, once
    /// the writer is dropped; a writer nothing was written to sends nothing.
    #[test]
    fn a_line_writer_queues_its_line_whole() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let lines = Lines {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        {
            let mut w = lines.writer();
            write!(w, "INFO ").unwrap();
            writeln!(w, "request done").unwrap();
            assert!(rx.try_recv().is_err(), "sent before the line was done");
        }
        drop(lines.writer());
        let Ok(Line::Bytes(line)) = rx.try_recv() else {
            panic!("no line queued");
        };
        assert_eq!(line, b"INFO request done\n");
        assert!(rx.try_recv().is_err(), "an empty writer sent a line");
    }

    /// What an instance logs from its clients cannot drive the operator's
    /// terminal nor forge a line of the runtime's.
    #[test]
    fn escape_sequences_and_newlines_are_shown_not_sent() {
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let console = Console {
            echo: true,
            events: false,
            lines: Some(Lines {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            }),
        };
        let json = r#"{"level":"WARN","message":"bad sku","sku":"\u001b]52;c;aGk=\u0007\n    flotilla | warning: x"}"#;
        console.instance_line("a-0", json);
        console.instance_line("a-0", "raw \u{1b}[2J\u{202e}txt\tok");
        console.instance_line(
            "a-0",
            "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready\r",
        );
        drop(console);
        let mut got = Vec::new();
        while let Ok(Line::Bytes(b)) = rx.try_recv() {
            got.push(String::from_utf8(b).unwrap());
        }
        assert_eq!(
            got[0],
            "         a-0 | WARN  bad sku sku=\\u{1b}]52;c;aGk=\\u{7}\\u{a}    flotilla | warning: x\n"
        );
        assert_eq!(got[1], "         a-0 | raw \\u{1b}[2J\\u{202e}txt\tok\n");
        // Colours and a CRLF's \r are dropped, not shown.
        assert_eq!(got[2], "         a-0 | 2026  INFO ready\n");
    }

    #[test]
    fn json_lines_are_compacted() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","addr":"127.0.0.1:1"},"target":"x"}"#;
        assert_eq!(
            compact_json(line).unwrap(),
            "INFO  listening addr=127.0.0.1:1"
        );
        assert!(compact_json("plain text").is_none());
    }

    /// The chassis writes its fields at the top level, beside `level` and
    /// `message`: they are shown, the ones every line repeats are not.
    #[test]
    fn top_level_fields_are_shown() {
        let line = r#"{"timestamp":"2026-01-01T00:00:00.000Z","level":"WARN","target":"flotilla_chassis::outbox","service":"orders","instance":"orders-0","system":"shop","span":"relay","request_id":"req-1","message":"outbox cannot publish; retrying","topic":"orders","error":"the broker answered 503"}"#;
        let shown = compact_json(line).unwrap();
        assert!(
            shown.starts_with("WARN  outbox cannot publish; retrying "),
            "{shown}"
        );
        for kv in [
            " error=the broker answered 503",
            " request_id=req-1",
            " topic=orders",
        ] {
            assert!(shown.contains(kv), "{kv} missing: {shown}");
        }
        for repeated in [
            "service=",
            "instance=",
            "system=",
            "target=",
            "span=",
            "timestamp=",
        ] {
            assert!(!shown.contains(repeated), "{repeated} shown: {shown}");
        }
        let line =
            r#"{"level":"info","msg":"ready","port":8080,"fields":{"message":"m","a":true}}"#;
        assert_eq!(compact_json(line).unwrap(), "info  m a=true port=8080");
    }
}
