//! One daemon per state directory: an `flock` on `$XDG_STATE_HOME/walkie/walkie.lock`,
//! taken before the state file is read and held for the daemon's lifetime.
//!
//! The state directory is what two daemons must never share: both would read the same
//! registry, the second would take the first's running tasks for leftovers of a crash and
//! kill them, and both would write the same state file. The lock lives there, not in the
//! runtime directory, because `sudo -u`, `su` or cron give the same user another runtime
//! directory (or none) and the same state directory. The control socket keeps its own lock
//! in the runtime directory (control/server.rs), so two daemons never fight over a socket
//! either.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Why walkie cannot be the daemon of this state directory. Reported, then exit 1.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another walkie ({holder}) is already running with the state directory {dir}; stop it first (systemctl --user stop walkie) or talk to it with `walkie ctl`"
    )]
    AlreadyRunning { holder: String, dir: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Held while the daemon runs; the kernel lets go when the process ends, however it ends.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
}

impl InstanceLock {
    /// Takes the lock at `path` (in the state directory, created 0700 if missing) and
    /// writes our pid into it for the next one to name.
    pub fn acquire(path: &Path) -> Result<InstanceLock, InstanceError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| InstanceError::Io { path, source }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        crate::files::ensure_private_dir(dir).map_err(|e| io_err(dir)(io::Error::other(e)))?;
        // Never through a symlink, a regular file of this user, 0600 whatever the umask.
        let file = crate::files::open_private(path).map_err(io_err(path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.take(64).read_to_string(&mut holder);
                let holder = match holder.trim() {
                    pid if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
                        format!("pid {pid}")
                    }
                    _ => "its pid unknown".to_string(),
                };
                return Err(InstanceError::AlreadyRunning {
                    holder,
                    dir: dir.to_path_buf(),
                });
            }
            Err((_, errno)) => return Err(io_err(path)(io::Error::from(errno))),
        };
        let written = lock
            .set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(&mut *lock, "{}", std::process::id()));
        if let Err(e) = written {
            log::warn!("cannot write the pid into {}: {e}", path.display());
        }
        Ok(InstanceLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_the_first_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/walkie.lock");
        let first = InstanceLock::acquire(&path).unwrap();
        // flock locks belong to the open file description: a second open is a second
        // holder even within one process.
        let err = InstanceLock::acquire(&path).unwrap_err().to_string();
        assert!(
            err.contains("already running") && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        InstanceLock::acquire(&path).expect("free again");
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep").unwrap();
        let path = dir.path().join("walkie.lock");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(InstanceLock::acquire(&path).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
    }
}
