//! Process plumbing for the task supervisor: pidfds and the child's pre-exec setup.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Opens a pidfd for `pid` (Linux ≥ 5.3): a handle that keeps naming this process even
/// after its pid is reused, so signals sent through it can never hit a stranger.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes (pid_t, unsigned int flags) and returns a new fd or -1;
    // no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sends `sig` to the process behind `pidfd`. `ESRCH` (already exited) is `Ok(false)`.
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: Signal) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: (int pidfd, int sig, siginfo_t *info = NULL, unsigned int flags = 0);
    // a null info makes the kernel fill it in as kill(2) does.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Prepares `cmd` to run as an agent: its own process group, the parent-death signal
/// `death_signal`, and an empty signal mask (walkie blocks signals for its signalfd and
/// the mask is inherited through exec).
pub fn agent_pre_exec(cmd: &mut Command, death_signal: Signal) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (prctl, sigprocmask, getppid); it allocates nothing
    // (SigSet is a plain struct on the stack).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(death_signal).map_err(io::Error::from)?;
            // If walkie died between fork and prctl, the death signal will never come.
            if nix::unistd::getppid().as_raw() == 1 {
                return Err(io::Error::other("parent exited before exec"));
            }
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            Ok(())
        });
    }
}
