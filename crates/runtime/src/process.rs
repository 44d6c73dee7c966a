//! One operating-system process of an instance: spawn it with its
//! environment, tie its life to ours, capture its output, stop it gently.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::fs::OpenOptions;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::console::Console;

/// The open-files limit the process was started with, kept when
/// [`raise_open_files_limit`] raised it, for instances to start with.
static STARTED_WITH: OnceLock<libc::rlimit> = OnceLock::new();

/// Raises this process's soft limit on open files to its hard limit, as
/// Go's runtime does at start. The gateway holds a descriptor for each
/// client connection and each upstream one, and the usual soft limit (1024)
/// is far below `[gateway.limits] max_connections`; past it, accepting
/// fails for everyone. Instances still start with the limit we were given
/// (a program written for it, say one using `select`, keeps working).
/// Returns the soft limit before and after.
pub(crate) fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    let limit = open_files_limit()?;
    let before = limit.rlim_cur;
    if limit.rlim_cur >= limit.rlim_max {
        return Ok((before, before));
    }
    let _ = STARTED_WITH.set(limit);
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given, which lives here.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, raised.rlim_cur))
}

/// This process's soft and hard limits on open files.
fn open_files_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives here.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// What to execute for every instance of a service.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub dir: PathBuf,
}

/// A running child process.
pub(crate) struct Proc {
    child: Child,
    pid: u32,
    /// The output copiers; awaited briefly after exit so a crash report
    /// includes the last lines the process wrote.
    pumps: Vec<tokio::task::JoinHandle<()>>,
    /// Whether its process group has been killed: what `kill_on_drop`
    /// does for the process itself, [`Drop`] does for the group (a
    /// `sh -c` wrapper's server, a master's workers) until then.
    group_killed: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.group_killed {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// How long to wait for a dead process's last output to be in its log.
/// Bounded because a grandchild may still hold the pipe open; generous
/// because on a loaded machine the writes (on the blocking pool) take a
/// while, and the crash report that reads the log needs the last lines.
const FLUSH_AFTER_EXIT: Duration = Duration::from_secs(1);

/// A line longer than this is cut: a process that never prints a newline
/// must not make us buffer without bound.
const MAX_LINE: usize = 16 * 1024;

impl Proc {
    /// Starts `launch` with exactly `env` added to ours, output to `log_file`
    /// (and the console, prefixed with `instance`).
    pub(crate) async fn spawn(
        launch: &Launch,
        env: &[(String, String)],
        instance: &str,
        log_file: &Path,
        console: Arc<Console>,
    ) -> io::Result<Proc> {
        let mut cmd = Command::new(&launch.program);
        // The platform's variables come from the runtime alone: one in
        // flotilla's environment (a `FLOTILLA_URL_*` or
        // `FLOTILLA_BROKER_URL` left in the developer's shell) would reach
        // the instances the runtime sets no value for, as a peer they do
        // not have. Not `DATABASE_URL`: a service without `data = "sqlite"`
        // may be given its database elsewhere that way, as before.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with("FLOTILLA_")) {
                cmd.env_remove(&name);
            }
        }
        cmd.args(&launch.args)
            .current_dir(&launch.dir)
            .envs(
                env.iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Read before the fork: the child only makes the system call.
        let started_with = STARTED_WITH.get().copied();
        // Who the child's parent must be: `getppid() == 1` would also hold
        // when `flotilla` is itself PID 1 (a container without an init),
        // and every instance would kill itself before it ran.
        #[cfg(target_os = "linux")]
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid,
        // kill) and setrlimit, a plain system call, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(limit) = &started_with
                    && libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // Own process group, so Ctrl-C in the terminal reaches only
                // `flotilla`, which then stops instances in order.
                libc::setpgid(0, 0);
                // Die with the parent: no orphans even after `kill -9 flotilla`.
                #[cfg(target_os = "linux")]
                {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent may have died before prctl took effect.
                    if libc::getppid() != parent {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
                Ok(())
            });
        }
        // Opened first: a log that cannot be written must not leave a
        // process running that nothing watches.
        let log = LogFile::open(log_file, MAX_LOG).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open its log {}: {e}", log_file.display()),
            )
        })?;
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let log = Arc::new(tokio::sync::Mutex::new(log));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(
                out,
                Arc::clone(&log),
                instance.to_string(),
                Arc::clone(&console),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, log, instance.to_string(), console)));
        }
        Ok(Proc {
            child,
            pid,
            pumps,
            group_killed: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit on its own; what it leaves behind in
    /// its group (a crashed master's workers, still holding its files) is
    /// killed with it, as systemd does with a unit's processes.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.kill_group();
        // Taken out so a second call cannot poll a finished handle again.
        let pumps: Vec<_> = self.pumps.drain(..).collect();
        let _ = tokio::time::timeout(FLUSH_AFTER_EXIT, async {
            for pump in pumps {
                let _ = pump.await;
            }
        })
        .await;
        status
    }

    /// SIGTERM to the process group, then SIGKILL after `drain`.
    pub(crate) async fn stop(&mut self, drain: Duration) -> io::Result<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.kill_group();
            return Ok(status);
        }
        signal_group(self.pid, libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + drain;
        match tokio::time::timeout_at(deadline, self.child.wait()).await {
            Ok(status) => {
                // A wrapper (`sh -c`, `npm start`) exits at once on SIGTERM
                // while the server it started drains: the rest of the group
                // has what is left of `drain` too, then goes.
                while group_alive(self.pid) && tokio::time::Instant::now() < deadline {
                    reap_group(self.pid);
                    tokio::time::sleep(GROUP_POLL).await;
                }
                self.kill_group();
                status
            }
            Err(_) => {
                tracing::warn!(pid = self.pid, "did not stop within {drain:?}; killing");
                self.kill_group();
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        }
    }

    fn kill_group(&mut self) {
        signal_group(self.pid, libc::SIGKILL);
        reap_group(self.pid);
        self.group_killed = true;
    }
}

/// How often a stopping group is looked at after its leader exited.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// Reaps the exited members of process group `pid` that are this
/// process's children: none, unless `flotilla` is PID 1 (or a subreaper)
/// and so inherited them when their parent, the instance, exited. Without
/// it they stay zombies, and [`group_alive`] sees the group alive until
/// the drain's end. Only after the group's leader, a child tokio waits
/// for, has been reaped, so nothing of tokio's is taken from it.
fn reap_group(pid: u32) {
    let Some(group) = group_of(pid) else { return };
    // SAFETY: waitpid(2) on the group, without blocking; the status is
    // not read.
    while unsafe { libc::waitpid(group, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
}

/// The negative pid that names the process group led by `pid` in kill(2)
/// and waitpid(2); `None` for no process (0) or one out of range.
fn group_of(pid: u32) -> Option<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .ok()
        .filter(|pid| *pid != 0)
        .map(|pid| -pid)
}

/// Whether process group `pid` still has a member (zombies included,
/// until whoever inherited them reaps them).
fn group_alive(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the group exists.
    group_of(pid).is_some_and(|group| unsafe { libc::kill(group, 0) } == 0)
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if let Some(group) = group_of(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group only.
        unsafe {
            libc::kill(group, signal);
        }
    }
}

/// The size past which an instance's log is rotated.
const MAX_LOG: u64 = 32 << 20;

/// An instance's log file, kept to about twice `max` on disk: past `max`
/// it becomes `<id>.log.1` (replacing the one before) and a new one is
/// begun, as logrotate's `size` with `rotate 1` does. It is appended to
/// across restarts and runs, so without this a chatty service filled the
/// disk.
struct LogFile {
    file: tokio::fs::File,
    path: PathBuf,
    written: u64,
    max: u64,
}

impl LogFile {
    async fn open(path: &Path, max: u64) -> io::Result<LogFile> {
        // An instance's output is its owner's to read (it may log what
        // its requests carried).
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await?;
        let written = file.metadata().await.map_or(0, |m| m.len());
        Ok(LogFile {
            file,
            path: path.to_path_buf(),
            written,
            max,
        })
    }

    /// Appends `bytes`, rotating first when the file is full. Errors (a
    /// full disk) are the caller's to ignore: the console still shows it.
    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.written >= self.max {
            self.rotate().await;
        }
        self.file.write_all(bytes).await?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.file.flush().await
    }

    async fn rotate(&mut self) {
        let mut kept = self.path.clone().into_os_string();
        kept.push(".1");
        let renamed = tokio::fs::rename(&self.path, &kept).await;
        let fresh = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .await;
        if let (Ok(()), Ok(file)) = (renamed, fresh) {
            self.file = file;
        }
        // Rotated, or not (a read-only directory): either way, write on
        // and try again only after as much again.
        self.written = 0;
    }
}

/// Copies a child's output into its log file and the console, line by line.
/// Its stdout and stderr share the file, so each pump writes whole lines
/// only: a read ends anywhere (a block-buffered stdout, as Python's is when
/// piped, is cut mid-line), and the other stream's lines would land inside
/// this one's. A line longer than [`MAX_LINE`] is written in pieces, so
/// what is held back stays bounded.
async fn pump<R: AsyncRead + Unpin>(
    mut from: R,
    log: Arc<tokio::sync::Mutex<LogFile>>,
    instance: String,
    console: Arc<Console>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let mut unwritten: Vec<u8> = Vec::with_capacity(8192);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        unwritten.extend_from_slice(&buf[..n]);
        let whole = match unwritten.iter().rposition(|&b| b == b'\n') {
            Some(end) => end + 1,
            None if unwritten.len() >= MAX_LINE => unwritten.len(),
            None => 0,
        };
        if whole > 0 {
            let mut file = log.lock().await;
            // A full disk must not stop the service: the console still shows it.
            let _ = file.write(&unwritten[..whole]).await;
            drop(file);
            unwritten.drain(..whole);
        }
        for &b in &buf[..n] {
            if b == b'\n' {
                console.instance_line(&instance, &String::from_utf8_lossy(&line));
                line.clear();
            } else if line.len() < MAX_LINE {
                line.push(b);
            }
        }
    }
    if !line.is_empty() {
        console.instance_line(&instance, &String::from_utf8_lossy(&line));
    }
    let mut file = log.lock().await;
    // The last line had no newline: given one, so that the other stream's
    // next line does not go on from it.
    if !unwritten.is_empty() {
        unwritten.push(b'\n');
        let _ = file.write(&unwritten).await;
    }
    // A tokio file finishes a write in the background: without this the
    // last one (a panic message, say) may not be in the file yet when the
    // crash report reads it.
    let _ = file.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit() -> libc::rlimit {
        match open_files_limit() {
            Ok(l) => l,
            Err(e) => panic!("getrlimit: {e}"),
        }
    }

    #[tokio::test]
    async fn a_pump_has_written_everything_when_it_returns() {
        // What a crash report reads right after the process and its pumps
        // are done. Many times: an unfinished write is a race, not a
        // certainty.
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let console = Arc::new(Console::new(false, false));
        for i in 0..100 {
            let path = dir.path().join(format!("{i}.log"));
            let file = match LogFile::open(&path, MAX_LOG).await {
                Ok(f) => f,
                Err(e) => panic!("{e}"),
            };
            let log = Arc::new(tokio::sync::Mutex::new(file));
            let output: &[u8] = b"starting\npanicked: cannot open config\n";
            pump(output, log, format!("p-{i}"), Arc::clone(&console)).await;
            let written = std::fs::read_to_string(&path).unwrap_or_default();
            assert_eq!(written.as_bytes(), output, "run {i}");
        }
    }

    /// stdout and stderr share the log file; neither's lines are cut by the
    /// other's, however their writes are split.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_streams_interleave_whole_lines_only() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("both.log");
        let log = Arc::new(tokio::sync::Mutex::new(
            LogFile::open(&path, MAX_LOG).await.unwrap(),
        ));
        let console = Arc::new(Console::new(false, false));
        let mut pumps = Vec::new();
        let mut writers = Vec::new();
        for stream in ["out", "err"] {
            let (mut tx, rx) = tokio::io::duplex(64);
            pumps.push(tokio::spawn(pump(
                rx,
                Arc::clone(&log),
                stream.into(),
                Arc::clone(&console),
            )));
            writers.push(tokio::spawn(async move {
                for i in 0..300 {
                    let line = format!("{stream} line {i} of the {stream} stream\n");
                    // In pieces, as a buffered stream's writes end anywhere.
                    for piece in line.as_bytes().chunks(7) {
                        tx.write_all(piece).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                }
                // The last line has no newline.
                tx.write_all(format!("{stream} end").as_bytes())
                    .await
                    .unwrap();
            }));
        }
        for task in writers.into_iter().chain(pumps) {
            task.await.unwrap();
        }
        let written = std::fs::read_to_string(&path).unwrap();
        let mut counts = std::collections::HashMap::new();
        assert!(written.ends_with('\n'), "{written}");
        for line in written.lines() {
            let stream = line.split(' ').next().unwrap_or_default();
            let ok = line == format!("{stream} end")
                || line.ends_with(&format!(" of the {stream} stream"));
            assert!(ok, "a cut line: {line:?}");
            *counts.entry(stream.to_string()).or_insert(0) += 1;
        }
        assert_eq!(counts["out"], 301, "{counts:?}");
        assert_eq!(counts["err"], 301, "{counts:?}");
    }

    /// Past its size a log becomes `.log.1`, the one before it dropped;
    /// what was there before this run counts toward the size.
    #[tokio::test]
    async fn a_log_past_its_size_is_rotated_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-0.log");
        std::fs::write(&path, b"from the last run\n").unwrap();
        let mut log = LogFile::open(&path, 20).await.unwrap();
        log.write(b"one\n").await.unwrap(); // 18 + 4 = 22 bytes: full
        log.write(b"two\n").await.unwrap(); // rotated first
        for line in [b"three\n", b"four!\n"] {
            log.write(line).await.unwrap(); // 10, 16: not yet
        }
        log.write(b"five\n").await.unwrap(); // 21: full
        log.write(b"six\n").await.unwrap(); // rotated first
        log.write(b"seven\n").await.unwrap();
        log.flush().await.unwrap();
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "six\nseven\n");
        // The last run's and the first rotation's lines are gone.
        let kept = dir.path().join("a-0.log.1");
        assert_eq!(read(&kept), "two\nthree\nfour!\nfive\n");
    }

    /// One test, since the limit is the process's: the only one in this
    /// binary that changes it.
    #[tokio::test]
    async fn the_limit_is_raised_for_us_and_not_for_instances() {
        let given = limit();
        if given.rlim_max == libc::RLIM_INFINITY {
            flotilla_testenv::skip(
                "no finite hard limit on open files to raise to",
                "run the tests under a finite hard limit, e.g. `ulimit -Hn 65536`",
            );
            return;
        }
        // Start below the hard limit, as a login shell's 1024 would, but
        // only just: the other tests' descriptors still fit.
        let lowered = libc::rlimit {
            rlim_cur: given.rlim_max - 1,
            rlim_max: given.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given, which lives here.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let raised = match raise_open_files_limit() {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(raised, (given.rlim_max - 1, given.rlim_max));
        assert_eq!(limit().rlim_cur, given.rlim_max);
        // A second call has nothing left to raise.
        assert!(matches!(raise_open_files_limit(), Ok((b, a)) if b == a));

        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let launch = Launch {
            program: PathBuf::from("sh"),
            args: vec!["-c".into(), "ulimit -Sn".into()],
            dir: dir.path().to_path_buf(),
        };
        let log = dir.path().join("out.log");
        let console = Arc::new(Console::new(false, false));
        let mut proc = match Proc::spawn(&launch, &[], "limit-0", &log, console).await {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        assert!(proc.wait().await.is_ok_and(|s| s.success()));
        // The output reaches the log through the pump and the blocking
        // pool, which a loaded machine may take longer over than `wait`
        // waits for the pumps: poll, with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let out = loop {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            if out.ends_with('\n') || std::time::Instant::now() > deadline {
                break out;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            out.trim(),
            (given.rlim_max - 1).to_string(),
            "the instance did not get the limit we started with: {out}"
        );
    }
}
