//! The data directory's `lock` file, `flock`ed: one `flotilla up` per data
//! directory.
//!
//! Before it, a second `up` was refused only by asking the first's control
//! API, which answers once the first is ready (minutes, with a build):
//! meanwhile the second re-issued the identities, shared the databases and
//! overwrote `endpoints.json`. The kernel drops the lock when the process
//! ends, however it ends, and the file is opened close-on-exec, so no
//! instance inherits it. `flotilla down` waits for it too: the control API
//! stops answering before the runtime has finished stopping.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The lock, held until dropped.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes `dir`'s lock, writing this process's pid into it; `Ok(Err(pid))`
    /// when another process holds it (`pid` as that one wrote it).
    pub(crate) fn take(dir: &Path) -> std::io::Result<Result<DirLock, String>> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join("lock"))?;
        // SAFETY: flock(2) on a descriptor `file` owns and keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let pid = match holder.trim() {
                "" => "unknown".to_string(),
                pid => pid.to_string(),
            };
            return Ok(Err(pid));
        }
        // Who holds it, for the next one's message.
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Ok(DirLock { _file: file }))
    }

    /// Whether no process holds `dir`'s lock (nor ever took it there).
    pub(crate) fn free(dir: &Path) -> bool {
        if !dir.join("lock").exists() {
            return true;
        }
        matches!(DirLock::take(dir), Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        assert!(DirLock::free(dir.path()));
        let held = DirLock::take(dir.path()).unwrap().unwrap();
        let refused = DirLock::take(dir.path()).unwrap().unwrap_err();
        assert_eq!(refused, std::process::id().to_string());
        assert!(!DirLock::free(dir.path()));
        drop(held);
        assert!(DirLock::free(dir.path()));
        assert!(DirLock::take(dir.path()).unwrap().is_ok());
    }
}
