//! One daemon per data plane: `lbd run` holds an exclusive `flock` on its
//! pin directory (bpffs directories take flocks) and on a lock file beside
//! its control socket for as long as it runs. A second `run`, or a
//! `teardown` of the same pin path, finds the lock taken and refuses,
//! naming the holder's pid. The kernel drops the locks when the process
//! dies, SIGKILL included, so there is nothing stale to clean up.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

pub struct InstanceLock {
    _held: Vec<File>,
}

impl InstanceLock {
    /// Locks `pin_dir` (created if missing; `None`: nothing pinned) and
    /// `<control_socket>.lock`.
    pub fn acquire(pin_dir: Option<&Path>, control_socket: &Path) -> Result<InstanceLock> {
        let mut held = Vec::new();
        if let Some(dir) = pin_dir {
            held.push(lock_pin_dir(dir)?);
        }
        let socket_lock = socket_lock_path(control_socket);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&socket_lock)
            .with_context(|| format!("creating {}", socket_lock.display()))?;
        drop(file);
        held.push(lock(&socket_lock, "control socket")?);
        Ok(InstanceLock { _held: held })
    }
}

/// Locks a bpffs pin directory, created if missing.
pub fn lock_pin_dir(dir: &Path) -> Result<File> {
    crate::dataplane::ensure_bpffs(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lock(dir, "pin path")
}

/// `<socket>.lock`.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the lock on `path` (a file or directory) without waiting.
pub fn lock(path: &Path, what: &str) -> Result<File> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = holder_pid(&file)
                .map(|p| format!(" (pid {p})"))
                .unwrap_or_default();
            bail!(
                "another lbd{holder} is running with {what} {}: stop it first (`systemctl stop lbd` or kill it); \
                 two daemons would overwrite each other's tables",
                path.display()
            );
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}

/// The pid holding a flock on `file`, from /proc/locks.
fn holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str()))
            .then(|| f.get(4)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_names_the_holder() {
        let dir = std::env::temp_dir().join(format!("lbd-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = lock(&dir, "pin path").unwrap();
        let err = format!("{:#}", lock(&dir, "pin path").unwrap_err());
        assert!(err.contains("another lbd"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        lock(&dir, "pin path").expect("free again once the holder is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
