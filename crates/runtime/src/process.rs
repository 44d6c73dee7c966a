//! One operating-system process of an instance: spawn it with its
//! environment, tie its life to ours, capture its output, stop it gently.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::fs::OpenOptions;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::console::Console;

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
}

/// How long to wait for a dead process's last output. Bounded because a
/// grandchild may still hold the pipe open.
const FLUSH_AFTER_EXIT: Duration = Duration::from_millis(250);

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
        // SAFETY: only async-signal-safe calls (setpgid, prctl, getppid, kill)
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
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
                    if libc::getppid() == 1 {
                        libc::kill(libc::getpid(), libc::SIGKILL);
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .await?;
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
        Ok(Proc { child, pid, pumps })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit on its own.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
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
            return Ok(status);
        }
        signal_group(self.pid, libc::SIGTERM);
        match tokio::time::timeout(drain, self.child.wait()).await {
            Ok(status) => {
                // Children the instance left behind in its group go too.
                signal_group(self.pid, libc::SIGKILL);
                status
            }
            Err(_) => {
                tracing::warn!(pid = self.pid, "did not stop within {drain:?}; killing");
                signal_group(self.pid, libc::SIGKILL);
                let _ = self.child.start_kill();
                self.child.wait().await
            }
        }
    }
}

fn signal_group(pid: u32, signal: libc::c_int) {
    if pid == 0 {
        return;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals that process group only.
    unsafe {
        libc::kill(-pid, signal);
    }
}

/// Copies a child's output into its log file and the console, line by line.
async fn pump<R: AsyncRead + Unpin>(
    mut from: R,
    log: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    instance: String,
    console: Arc<Console>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut file = log.lock().await;
            // A full disk must not stop the service: the console still shows it.
            let _ = file.write_all(&buf[..n]).await;
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
}
