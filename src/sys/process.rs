//! Process plumbing for the task supervisor: pidfds and the child's pre-exec setup.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::stat::Mode;

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

/// What the forked child does before it execs the agent. Everything is prepared by the
/// parent: the child between fork and exec may only make async-signal-safe syscalls and
/// must not allocate (another thread of walkie may have held the allocator's lock at fork).
#[derive(Debug)]
pub struct ChildSetup {
    /// Delivered to the agent when walkie dies.
    pub death_signal: Signal,
    /// `cgroup.procs` of the task's cgroup, open for writing: the child moves itself in
    /// before anything else, so every process it starts is contained.
    pub cgroup_procs: Option<OwnedFd>,
    /// Directories the child creates, mode 0700 whatever the umask (the task's scratch
    /// directory and its TMPDIR); one that already exists is kept.
    pub make_dirs: Vec<CString>,
    /// The agent's working directory.
    pub cwd: CString,
}

/// Prepares `cmd` to run as an agent: its own process group, the task's cgroup, its
/// directories, the parent-death signal, and an empty signal mask (walkie blocks signals
/// for its signalfd and the mask is inherited through exec). A failed step fails the spawn
/// with that step's errno.
pub fn agent_pre_exec(cmd: &mut Command, setup: ChildSetup) {
    cmd.process_group(0);
    let ChildSetup {
        death_signal,
        cgroup_procs,
        make_dirs,
        cwd,
    } = setup;
    let private = Mode::from_bits_truncate(0o700);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (prctl, getppid, write, mkdir, fchmodat, chdir,
    // sigprocmask) on data prepared before the fork. It allocates nothing: nix's errors
    // are plain errno values, the paths are `CStr`s passed through without copying, and
    // its own error is an OS error code, never a message (an `io::Error::other` would
    // allocate in the child).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(death_signal).map_err(io::Error::from)?;
            // If walkie died between fork and prctl, the death signal will never come.
            if nix::unistd::getppid().as_raw() == 1 {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            if let Some(procs) = &cgroup_procs {
                // "0" moves the writing process (cgroup v2, like v1's cgroup.procs).
                nix::unistd::write(procs, b"0").map_err(io::Error::from)?;
            }
            for dir in &make_dirs {
                match nix::unistd::mkdir(dir.as_c_str(), private) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                // The umask narrowed (or, at 0, did not narrow) mkdir's mode: set it.
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    dir.as_c_str(),
                    private,
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(io::Error::from)?;
            }
            nix::unistd::chdir(cwd.as_c_str()).map_err(io::Error::from)?;
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(io::Error::from)?;
            Ok(())
        });
    }
}
