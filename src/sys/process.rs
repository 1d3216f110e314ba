//! Process plumbing for the task supervisor: starting an agent, and pidfds.
//!
//! [`spawn_agent`] starts an agent with `clone3()`: `CLONE_INTO_CGROUP` makes the child a
//! member of its task's cgroup from its first instruction, and `CLONE_PIDFD` hands back a
//! pidfd that can never name a stranger. Joining a cgroup after the fork instead — the
//! child writing itself into `cgroup.procs`, all that std's `Command` + `pre_exec` allows —
//! takes the kernel's `cgroup_threadgroup_rwsem` for writing, which waits for an RCU grace
//! period: several milliseconds at every start, during which the poll loop (waiting to
//! learn whether the exec worked) stood still. Where the kernel refuses clone3 or the
//! flag (before Linux 5.7, or a seccomp filter answering ENOSYS or EPERM), walkie forks and
//! the child joins its cgroup before exec, as it always did; the choice is made once and
//! logged.
//!
//! On x86-64 the child shares walkie's memory until its exec (`CLONE_VM | CLONE_VFORK`, on
//! a stack of its own, entered by a few instructions of assembly). Other architectures —
//! the Pi's aarch64 — use clone3 as a fork: no assembly that only a Pi would ever run, a
//! copy of the page tables (a fraction of a millisecond), the same cgroup placement. The
//! unit tests run all three ways on the build machine.
//!
//! Everything the child needs — argv, environment, the candidate paths of the program, the
//! directories it creates, its pipes — is prepared by the parent: between the fork and the
//! exec the child only makes async-signal-safe system calls and never allocates (another
//! thread of walkie may have held the allocator's lock at the fork). It reports a failed
//! step through memory it shares with walkie until its exec (vfork-style clone3), or
//! through a close-on-exec pipe the parent reads, end of file meaning the exec worked. It
//! takes no fd of walkie's but its stdin, stdout and stderr to the agent.

use std::ffi::{CString, c_char, c_int};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::sys::signal::Signal;

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

/// What one of the child's standard fds is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildIo {
    /// `/dev/null`.
    Null,
    /// A new pipe; walkie keeps the other end ([`Spawned`]).
    Pipe,
}

/// An agent to start.
#[derive(Debug)]
pub struct AgentSpawn<'a> {
    /// The program: a path, or a name looked up in the `PATH` of `env` (`/bin:/usr/bin`
    /// without one), as `execvp` would.
    pub program: &'a str,
    /// The arguments after the program.
    pub args: &'a [String],
    /// The agent's whole environment.
    pub env: &'a [(String, String)],
    /// The agent's working directory.
    pub cwd: &'a std::path::Path,
    /// Directories the child creates before entering `cwd`, mode 0700 whatever the umask
    /// (the task's scratch directory and its TMPDIR); one that already exists is kept.
    pub make_dirs: &'a [&'a std::path::Path],
    /// Delivered to the agent when walkie dies.
    pub death_signal: Signal,
    /// Added to walkie's nice value for the agent (and all it starts), up to 19.
    pub nice: u8,
    /// The task's cgroup v2 directory (opened `O_PATH`), which the agent starts in.
    pub cgroup: Option<&'a OwnedFd>,
    pub stdin: ChildIo,
    pub stdout: ChildIo,
    pub stderr: ChildIo,
}

/// A started agent: its pid, its pidfd and walkie's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// `None` only where the kernel has no pidfds (before 5.3).
    pub pidfd: Option<OwnedFd>,
    /// The write end of the agent's stdin ([`ChildIo::Pipe`]).
    pub stdin: Option<OwnedFd>,
    /// The read ends of its stdout and stderr ([`ChildIo::Pipe`]).
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

/// The step of the child's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStep {
    DeathSignal,
    /// walkie died between the fork and `prctl`: the death signal would never come.
    Orphaned,
    JoinCgroup,
    MakeDir,
    Chdir,
    Stdio,
    ProcessGroup,
    SignalMask,
    Priority,
    Exec,
}

impl fmt::Display for ChildStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildStep::DeathSignal => "cannot set its parent-death signal",
            ChildStep::Orphaned => "walkie was exiting",
            ChildStep::JoinCgroup => "cannot join the task's cgroup",
            ChildStep::MakeDir => "cannot create its directories",
            ChildStep::Chdir => "cannot enter its working directory",
            ChildStep::Stdio => "cannot connect its stdin/stdout/stderr",
            ChildStep::ProcessGroup => "cannot give it a process group",
            ChildStep::SignalMask => "cannot reset its signal mask",
            ChildStep::Priority => "cannot lower its priority",
            ChildStep::Exec => "cannot run it",
        })
    }
}

impl ChildStep {
    fn from_code(code: u32) -> ChildStep {
        [
            ChildStep::DeathSignal,
            ChildStep::Orphaned,
            ChildStep::JoinCgroup,
            ChildStep::MakeDir,
            ChildStep::Chdir,
            ChildStep::Stdio,
            ChildStep::ProcessGroup,
            ChildStep::SignalMask,
            ChildStep::Priority,
        ]
        .into_iter()
        .find(|s| *s as u32 == code)
        .unwrap_or(ChildStep::Exec)
    }
}

/// Why an agent did not start. The caller reports it (a control reply, a tool output);
/// nothing is left behind: the child, if there was one, has been reaped.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// An argument, a variable or a path holds a NUL byte.
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    /// No process could be created (pipes, fork: out of fds, pids or memory).
    #[error("cannot start a process: {0}")]
    Create(io::Error),
    /// The child failed a step of its setup, or the exec.
    #[error("{step}: {err}")]
    Child { step: ChildStep, err: io::Error },
}

impl SpawnError {
    /// The program was not found (exec's `ENOENT`).
    pub fn is_not_found(&self) -> bool {
        matches!(self, SpawnError::Child { step: ChildStep::Exec, err }
            if err.kind() == io::ErrorKind::NotFound)
    }
}

const CLONE_VM: u64 = 0x100;
const CLONE_VFORK: u64 = 0x4000;
const CLONE_PIDFD: u64 = 0x1000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, Linux 5.7). An older kernel
/// accepts the size as long as the fields it does not know are zero.
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Whether clone3 as walkie uses it works here: not tried yet, yes, or refused.
static CLONE3: AtomicU8 = AtomicU8::new(UNTRIED);
const UNTRIED: u8 = 0;
const WORKS: u8 = 1;
const REFUSED: u8 = 2;

/// The child's stack while it shares walkie's memory (until its exec): its setup uses a
/// few hundred bytes, this leaves room for debug builds and libc's wrappers.
const CHILD_STACK: usize = 64 * 1024;

/// Starts an agent (see the module header). The calling thread waits only for the child's
/// setup and `execve` (it shares walkie's memory until then, as with `posix_spawn`):
/// well under a millisecond on an idle machine.
pub fn spawn_agent(spec: &AgentSpawn<'_>) -> Result<Spawned, SpawnError> {
    let plan = Plan::new(spec)?;
    if CLONE3.load(Ordering::Relaxed) != REFUSED {
        match plan.run(Create::clone3(spec.cgroup)) {
            Err(Started::Refused(err)) => {
                CLONE3.store(REFUSED, Ordering::Relaxed);
                log::warn!(
                    "the kernel refused clone3 ({err}; CLONE_INTO_CGROUP needs Linux 5.7): agents \
                     start by fork and join their task cgroup before exec, which holds walkie's \
                     loop for a few ms at every task start"
                );
            }
            done => {
                if done.is_ok() && CLONE3.swap(WORKS, Ordering::Relaxed) == UNTRIED {
                    log::info!(
                        "agents start by clone3{}",
                        if spec.cgroup.is_some() {
                            ", inside their task cgroup (CLONE_INTO_CGROUP)"
                        } else {
                            ""
                        }
                    );
                }
                return done.map_err(Started::into_error);
            }
        }
    }
    // The fallback: fork; the child writes itself into cgroup.procs.
    let procs = match spec.cgroup {
        Some(dir) => Some(open_procs(dir).map_err(|err| SpawnError::Child {
            step: ChildStep::JoinCgroup,
            err,
        })?),
        None => None,
    };
    plan.run(Create::Fork {
        procs: procs.as_ref(),
    })
    .map_err(Started::into_error)
}

/// `cgroup.procs` of a cgroup directory, open for writing.
fn open_procs(dir: &OwnedFd) -> io::Result<OwnedFd> {
    // SAFETY: `dir` is an open directory fd and the path a NUL-terminated literal;
    // openat returns a new fd or -1.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c"cgroup.procs".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How an attempt ended when it did not start the agent.
enum Started {
    /// clone3 or one of its flags is not supported here: use the fallback.
    Refused(io::Error),
    Failed(SpawnError),
}

impl Started {
    fn into_error(self) -> SpawnError {
        match self {
            Started::Refused(err) => SpawnError::Create(err),
            Started::Failed(e) => e,
        }
    }
}

/// How the child is created.
enum Create<'a> {
    /// clone3 with `CLONE_VM | CLONE_VFORK | CLONE_PIDFD`, and `CLONE_INTO_CGROUP` when
    /// there is a cgroup.
    Clone3 { cgroup: Option<&'a OwnedFd> },
    /// clone3 as a fork (`CLONE_PIDFD`, and `CLONE_INTO_CGROUP` when there is a cgroup):
    /// the child gets a copy of walkie's memory and continues on its copy of this stack.
    Clone3Fork { cgroup: Option<&'a OwnedFd> },
    /// fork; the child writes itself into `procs` when there is one.
    Fork { procs: Option<&'a OwnedFd> },
}

impl<'a> Create<'a> {
    /// The clone3 way this architecture uses. The vfork-style entry needs a few
    /// instructions of assembly per architecture; it exists for x86-64 only, where the tests
    /// and the kernel tests run it. Elsewhere (the Pi's aarch64) clone3 starts the child as
    /// fork does: the page tables are copied (a fraction of a millisecond), but the child
    /// still joins its cgroup at creation instead of waiting for an RCU grace period.
    fn clone3(cgroup: Option<&'a OwnedFd>) -> Create<'a> {
        if cfg!(target_arch = "x86_64") {
            Create::Clone3 { cgroup }
        } else {
            Create::Clone3Fork { cgroup }
        }
    }
}

/// Everything the child needs, prepared before the fork.
struct Plan {
    /// Where the program may be, in `PATH` order.
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const c_char>,
    _env: Vec<CString>,
    env_ptrs: Vec<*const c_char>,
    cwd: CString,
    make_dirs: Vec<CString>,
    death_signal: c_int,
    /// The agent's nice value, when it differs from walkie's.
    nice: Option<c_int>,
    /// walkie's pid: the child checks that it is still its parent.
    parent: libc::pid_t,
    stdin: ChildIo,
    stdout: ChildIo,
    stderr: ChildIo,
}

fn cstring(s: impl Into<Vec<u8>>, what: &'static str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(what))
}

fn path_cstring(p: &std::path::Path, what: &'static str) -> Result<CString, SpawnError> {
    use std::os::unix::ffi::OsStrExt;
    cstring(p.as_os_str().as_bytes(), what)
}

impl Plan {
    fn new(spec: &AgentSpawn<'_>) -> Result<Plan, SpawnError> {
        let argv: Vec<CString> = std::iter::once(spec.program)
            .chain(spec.args.iter().map(String::as_str))
            .map(|a| cstring(a, "an argument"))
            .collect::<Result<_, _>>()?;
        let env: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}"), "an environment variable"))
            .collect::<Result<_, _>>()?;
        let candidates = if spec.program.contains('/') {
            vec![cstring(spec.program, "agent.command")?]
        } else {
            let path = spec
                .env
                .iter()
                .rev()
                .find(|(k, _)| k == "PATH")
                .map_or("/bin:/usr/bin", |(_, v)| v.as_str());
            // An empty entry is the working directory, as for execvp.
            path.split(':')
                .map(|dir| {
                    let dir = if dir.is_empty() { "." } else { dir };
                    cstring(format!("{dir}/{}", spec.program), "agent.command")
                })
                .collect::<Result<_, _>>()?
        };
        let nul_terminated = |v: &[CString]| {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(Plan {
            argv_ptrs: nul_terminated(&argv),
            env_ptrs: nul_terminated(&env),
            _argv: argv,
            _env: env,
            candidates,
            cwd: path_cstring(spec.cwd, "the working directory")?,
            make_dirs: spec
                .make_dirs
                .iter()
                .map(|d| path_cstring(d, "a directory"))
                .collect::<Result<_, _>>()?,
            death_signal: spec.death_signal as c_int,
            nice: (spec.nice > 0).then(|| {
                // SAFETY: getpriority has no memory arguments. It returns the calling
                // thread's nice value (-1 is a valid answer: errno is not needed, as
                // PRIO_PROCESS 0 cannot fail).
                let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
                (own + c_int::from(spec.nice)).min(19)
            }),
            parent: std::process::id() as libc::pid_t,
            stdin: spec.stdin,
            stdout: spec.stdout,
            stderr: spec.stderr,
        })
    }

    /// Creates the child and waits for its exec.
    fn run(&self, create: Create<'_>) -> Result<Spawned, Started> {
        let failed = |e: io::Error| Started::Failed(SpawnError::Create(e));
        let null = if [self.stdin, self.stdout, self.stderr].contains(&ChildIo::Null) {
            Some(open_null().map_err(failed)?)
        } else {
            None
        };
        let mut ours = [None, None, None];
        let mut theirs: [RawFd; 3] = [-1; 3];
        for (i, io) in [self.stdin, self.stdout, self.stderr]
            .into_iter()
            .enumerate()
        {
            match io {
                ChildIo::Null => theirs[i] = null.as_ref().map_or(-1, |n| n.as_raw_fd()),
                ChildIo::Pipe => {
                    let (read, write) = pipe().map_err(failed)?;
                    // fd 0 is the child's stdin: it reads; 1 and 2 it writes.
                    let (mine, child) = if i == 0 { (write, read) } else { (read, write) };
                    theirs[i] = child.as_raw_fd();
                    ours[i] = Some((mine, child));
                }
            }
        }
        let (pid, pidfd, outcome) = match create {
            Create::Clone3 { cgroup } => {
                let child = ChildSide::new(self, theirs, None, None);
                let (pid, pidfd) = clone_vfork(cgroup, &child)?;
                // CLONE_VFORK: back here once the child has exec'd or exited; what it
                // reported (if anything) is in shared memory.
                (pid, pidfd, child.outcome.load(Ordering::Acquire))
            }
            Create::Fork { .. } | Create::Clone3Fork { .. } => {
                let (report_read, report_write) = pipe().map_err(failed)?;
                let procs = match create {
                    Create::Fork { procs } => procs.map(AsRawFd::as_raw_fd),
                    _ => None,
                };
                let child = ChildSide::new(self, theirs, procs, Some(report_write.as_raw_fd()));
                let (pid, pidfd) = match create {
                    Create::Clone3Fork { cgroup } => clone_fork(cgroup, &child)?,
                    _ => fork(&child).map_err(failed)?,
                };
                // The child keeps the only write end: EOF once it has exec'd.
                drop(report_write);
                let mut buf = [0u8; 8];
                let outcome = if read_full(&report_read, &mut buf) == buf.len() {
                    u64::from_ne_bytes(buf)
                } else {
                    0
                };
                (pid, pidfd, outcome)
            }
        };
        let [stdin, stdout, stderr] = ours.map(|p| p.map(|(mine, _theirs)| mine));
        drop(null);
        if outcome != 0 {
            // The child has reported and exited (or is exiting): reap it now, as std's
            // spawn does, so that nothing of it is left (its cgroup can go at once).
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            let (step, errno) = decode(outcome);
            return Err(Started::Failed(SpawnError::Child {
                step,
                err: io::Error::from_raw_os_error(errno),
            }));
        }
        Ok(Spawned {
            pid,
            pidfd,
            stdin,
            stdout,
            stderr,
        })
    }
}

/// A failed step as the child reports it: never 0 (0 is "no report").
fn encode(step: ChildStep, errno: c_int) -> u64 {
    (u64::from(step as u32 + 1) << 32) | u64::from(errno as u32)
}

fn decode(outcome: u64) -> (ChildStep, i32) {
    let step = ((outcome >> 32) as u32).saturating_sub(1);
    (ChildStep::from_code(step), outcome as u32 as i32)
}

/// Reads until `buf` is full or EOF; the count read.
fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match nix::unistd::read(fd, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    n
}

fn open_null() -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        c"/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    above_stdio(fd)
}

/// A close-on-exec pipe, (read end, write end), both above fd 2.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// Moves `fd` above 2: the child dup2()s its fds onto 0–2 one after the other, and one
/// already sitting on a later target would be overwritten first. (Rust's runtime keeps
/// 0–2 open, so this never happens unless walkie closed them itself.)
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let moved = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// clone3 with `CLONE_VM | CLONE_VFORK` (as `posix_spawn` does): no copy of walkie's page
/// tables — with `mlockall` and the audio libraries that copy alone took 0.6 ms, and left
/// every page walkie's threads wrote afterwards to fault — and the calling thread sleeps
/// until the child has exec'd or exited. The child runs on a stack of its own.
fn clone_vfork(
    cgroup: Option<&OwnedFd>,
    child: &ChildSide<'_>,
) -> Result<(i32, Option<OwnedFd>), Started> {
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    let base = stack.as_mut_ptr() as u64;
    // Both ABIs want a 16-byte aligned stack pointer; the kernel starts it at the top.
    let top = (base + CHILD_STACK as u64) & !15;
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: CLONE_VM
            | CLONE_VFORK
            | CLONE_PIDFD
            | if cgroup.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        pidfd: &raw mut pidfd as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: base,
        stack_size: top - base,
        cgroup: cgroup.map_or(0, |c| c.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed and lives across the call;
    // the kernel writes the pidfd into `pidfd`. The child starts on `stack` (alive until
    // this returns: CLONE_VFORK suspends us until the child's exec or exit) and runs only
    // `vfork_child(child)`, which never returns and writes nothing of ours but
    // `child.outcome` (see `ChildSide::exec`).
    let rc = unsafe {
        raw_clone3(
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
            vfork_child,
            std::ptr::from_ref(child).cast_mut().cast(),
        )
    };
    drop(stack);
    if rc < 0 {
        return Err(clone3_refusal(-rc as i32, cgroup.is_some()));
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a fresh fd in `pidfd` that nothing owns.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    Ok((rc as i32, pidfd))
}

/// clone3 as a fork ([`Create::Clone3Fork`]): no new stack, no shared memory; the child
/// returns from the system call on its copy of this stack, as from fork().
fn clone_fork(
    cgroup: Option<&OwnedFd>,
    child: &ChildSide<'_>,
) -> Result<(i32, Option<OwnedFd>), Started> {
    let mut pidfd: c_int = -1;
    let args = CloneArgs {
        flags: CLONE_PIDFD
            | if cgroup.is_some() {
                CLONE_INTO_CGROUP
            } else {
                0
            },
        pidfd: &raw mut pidfd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.map_or(0, |c| c.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    // SAFETY: `args` is a valid clone_args of the size passed and lives across the call.
    // Without CLONE_VM or a stack the child continues here on a copy of walkie's memory,
    // as after fork(), and runs only `ChildSide::exec`, which never returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if rc == 0 {
        // SAFETY: in the new child; see `ChildSide::exec`.
        unsafe { child.exec() }
    }
    if rc < 0 {
        return Err(clone3_refusal(errno(), cgroup.is_some()));
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a fresh fd in `pidfd` that nothing owns.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd) });
    Ok((rc as i32, pidfd))
}

/// What a failed clone3 means: refused as a whole (use the fork fallback), the task's
/// cgroup refused, or another failure.
fn clone3_refusal(errno: c_int, into_cgroup: bool) -> Started {
    let err = io::Error::from_raw_os_error(errno);
    {
        match errno {
            // No clone3 (before 5.3), a flag or size it does not know (5.3–5.6), or a
            // seccomp filter that forbids it (ENOSYS as Docker's, EPERM as older ones).
            libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EPERM => Started::Refused(err),
            // What CLONE_INTO_CGROUP answers for the cgroup itself: removed (ENODEV), not
            // a leaf (EBUSY), not writable (EACCES, ENOENT), not cgroup2 (EBADF), threaded
            // (EOPNOTSUPP). The fork path's write to cgroup.procs would meet the same.
            libc::ENODEV
            | libc::EBUSY
            | libc::EACCES
            | libc::ENOENT
            | libc::EBADF
            | libc::EOPNOTSUPP
                if into_cgroup =>
            {
                Started::Failed(SpawnError::Child {
                    step: ChildStep::JoinCgroup,
                    err,
                })
            }
            _ => Started::Failed(SpawnError::Create(err)),
        }
    }
}

/// The child's entry on its own stack.
extern "C" fn vfork_child(arg: *mut libc::c_void) -> ! {
    // SAFETY: `arg` is the `ChildSide` that `clone_vfork` passed, alive while the parent
    // is suspended (until this child's exec or exit).
    unsafe { (*arg.cast::<ChildSide<'_>>()).exec() }
}

/// The clone3 system call with a child that starts on a new stack: the child calls
/// `entry(arg)` at once (it cannot return into Rust code whose frames live on the parent's
/// stack). Returns the child's pid, or `-errno`.
///
/// # Safety
/// `args` must be a valid `clone_args` of `size` bytes with a 16-byte aligned stack top;
/// `entry` must never return.
#[cfg(target_arch = "x86_64")]
unsafe fn raw_clone3(
    args: *const CloneArgs,
    size: usize,
    entry: extern "C" fn(*mut libc::c_void) -> !,
    arg: *mut libc::c_void,
) -> i64 {
    let ret: i64;
    // SAFETY: the caller's contract. `syscall` keeps every register but rax, rcx and r11
    // (hence not late: `arg` and `entry` must survive it); the child gets the same
    // registers with rax = 0 and rsp at the new stack's top, and calls `entry` there.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, {arg}",
            "call {entry}",
            "ud2",
            "2:",
            arg = in(reg) arg,
            entry = in(reg) entry,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") args,
            in("rsi") size,
            out("rcx") _,
            out("r11") _,
        );
    }
    ret
}

/// Elsewhere the vfork-style entry is not written: [`Create::clone3`] does not use it.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn raw_clone3(
    _args: *const CloneArgs,
    _size: usize,
    _entry: extern "C" fn(*mut libc::c_void) -> !,
    _arg: *mut libc::c_void,
) -> i64 {
    -i64::from(libc::ENOSYS)
}

/// fork(), then a pidfd for the child.
fn fork(child: &ChildSide<'_>) -> io::Result<(i32, Option<OwnedFd>)> {
    // SAFETY: the child runs only `ChildSide::exec` (async-signal-safe, no allocation),
    // which never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the new child; see `ChildSide::exec`.
        unsafe { child.exec() }
    }
    Ok((pid, pidfd_open(pid).ok()))
}

/// What the child works with: the plan and raw fds, nothing it would have to allocate.
struct ChildSide<'a> {
    plan: &'a Plan,
    /// What becomes its fds 0, 1, 2.
    fds: [RawFd; 3],
    /// `cgroup.procs` to write itself into (the fork path).
    procs: Option<RawFd>,
    /// Where a failed step is reported after a fork (close-on-exec).
    report: Option<RawFd>,
    /// Where a failed step is reported by a child sharing walkie's memory ([`encode`]).
    outcome: std::sync::atomic::AtomicU64,
}

impl<'a> ChildSide<'a> {
    fn new(
        plan: &'a Plan,
        fds: [RawFd; 3],
        procs: Option<RawFd>,
        report: Option<RawFd>,
    ) -> ChildSide<'a> {
        ChildSide {
            plan,
            fds,
            procs,
            report,
            outcome: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The child's whole life until exec.
    ///
    /// # Safety
    /// Only in a child just created by `clone_vfork` or `fork`. It makes only
    /// async-signal-safe system calls (prctl, getppid, write, mkdir, chmod, chdir, dup2,
    /// close_range, setpgid, sigaction, sigprocmask, execve, _exit) on memory prepared before, never
    /// allocates, has no path that can panic, and never returns. Sharing walkie's memory
    /// (clone_vfork), it writes only its own stack, `outcome` and the calling thread's
    /// errno (that thread is suspended meanwhile).
    unsafe fn exec(&self) -> ! {
        let plan = self.plan;
        // SAFETY (whole body): see the function's contract; every pointer passed is a
        // NUL-terminated string or array owned by `plan`.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, plan.death_signal as libc::c_ulong) != 0 {
                self.fail(ChildStep::DeathSignal, errno());
            }
            // walkie died before prctl: the death signal will never come.
            if libc::getppid() != plan.parent {
                self.fail(ChildStep::Orphaned, libc::ESRCH);
            }
            if let Some(procs) = self.procs {
                // "0" moves the writing process (cgroup v2, like v1's cgroup.procs).
                if libc::write(procs, c"0".as_ptr().cast(), 1) != 1 {
                    self.fail(ChildStep::JoinCgroup, errno());
                }
            }
            for dir in &plan.make_dirs {
                if libc::mkdir(dir.as_ptr(), 0o700) != 0 && errno() != libc::EEXIST {
                    self.fail(ChildStep::MakeDir, errno());
                }
                // The umask narrowed (or, at 0, did not narrow) mkdir's mode: set it.
                if libc::chmod(dir.as_ptr(), 0o700) != 0 {
                    self.fail(ChildStep::MakeDir, errno());
                }
            }
            if libc::chdir(plan.cwd.as_ptr()) != 0 {
                self.fail(ChildStep::Chdir, errno());
            }
            for (target, &fd) in (0..).zip(self.fds.iter()) {
                // Above 2 (see `above_stdio`), so dup2 never meets itself; the copy on
                // 0–2 is not close-on-exec.
                if libc::dup2(fd, target) < 0 {
                    self.fail(ChildStep::Stdio, errno());
                }
            }
            // Nothing else of walkie's reaches the agent, not even an fd a library or
            // walkie's own parent left inheritable (an audio device, a socket): all above
            // 2 are closed but the report pipe, which its exec closes. Before Linux 5.9
            // (ENOSYS) they stay as they were.
            let close_range = |first: libc::c_uint, last: libc::c_uint| {
                libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint)
            };
            match self.report {
                // Above 2 (`above_stdio`); at 3 the first range is empty (EINVAL).
                Some(report) => {
                    let report = report as libc::c_uint;
                    close_range(3, report - 1);
                    close_range(report + 1, libc::c_uint::MAX);
                }
                None => {
                    close_range(3, libc::c_uint::MAX);
                }
            }
            // Raising one's own nice value needs no privilege.
            if let Some(nice) = plan.nice {
                if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                    self.fail(ChildStep::Priority, errno());
                }
            }
            if libc::setpgid(0, 0) != 0 {
                self.fail(ChildStep::ProcessGroup, errno());
            }
            // A handler of walkie's (Rust's own SIGSEGV/SIGBUS ones, a library's) must not
            // run in this child, which may share walkie's memory: back to the default, as
            // posix_spawn does, before any signal is unblocked. Rust ignores SIGPIPE, and
            // an ignored signal stays ignored across exec: SIGPIPE goes back too.
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            let mut old: libc::sigaction = std::mem::zeroed();
            // Linux's _NSIG is 65 on every architecture walkie builds for.
            for sig in 1..65 {
                if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                    continue;
                }
                // EINVAL: a signal glibc keeps for itself (32, 33) or none.
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    continue;
                }
                let caught = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
                if (caught || sig == libc::SIGPIPE)
                    && libc::sigaction(sig, &dfl, std::ptr::null_mut()) != 0
                {
                    self.fail(ChildStep::SignalMask, errno());
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            // walkie blocks the signals of its signalfd, and the mask survives exec.
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                self.fail(ChildStep::SignalMask, errno());
            }
            // As execvp: the next candidate after ENOENT and the like; EACCES is kept for
            // the end unless a later one runs.
            let mut denied = false;
            let mut last = libc::ENOENT;
            for path in &plan.candidates {
                libc::execve(
                    path.as_ptr(),
                    plan.argv_ptrs.as_ptr(),
                    plan.env_ptrs.as_ptr(),
                );
                last = errno();
                match last {
                    libc::EACCES => denied = true,
                    libc::ENOENT
                    | libc::ENOTDIR
                    | libc::ESTALE
                    | libc::ENODEV
                    | libc::ETIMEDOUT => {}
                    _ => break,
                }
            }
            if denied
                && matches!(
                    last,
                    libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT
                )
            {
                last = libc::EACCES;
            }
            self.fail(ChildStep::Exec, last)
        }
    }

    /// Reports `step` and `err` to the parent and exits.
    ///
    /// # Safety
    /// Only in the child (see [`ChildSide::exec`]).
    unsafe fn fail(&self, step: ChildStep, err: c_int) -> ! {
        let outcome = encode(step, err);
        self.outcome.store(outcome, Ordering::Release);
        if let Some(report) = self.report {
            let msg = outcome.to_ne_bytes();
            // SAFETY: write is async-signal-safe; `msg` is on this stack. A pipe write of
            // 8 bytes is atomic and the pipe is empty: it cannot be short.
            unsafe { libc::write(report, msg.as_ptr().cast(), msg.len()) };
        }
        // SAFETY: _exit ends only this child (exit_group of its own thread group).
        unsafe { libc::_exit(127) }
    }
}

fn errno() -> c_int {
    nix::errno::Errno::last_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        std::fs::File::from(fd).read_to_string(&mut s).unwrap();
        s
    }

    fn spec<'a>(
        program: &'a str,
        args: &'a [String],
        env: &'a [(String, String)],
    ) -> AgentSpawn<'a> {
        AgentSpawn {
            program,
            args,
            env,
            cwd: std::path::Path::new("/"),
            make_dirs: &[],
            death_signal: Signal::SIGTERM,
            nice: 0,
            cgroup: None,
            stdin: ChildIo::Null,
            stdout: ChildIo::Pipe,
            stderr: ChildIo::Pipe,
        }
    }

    /// The ways a child is created: clone3 vfork-style (x86-64's), clone3 as a fork
    /// (other architectures'), and the fork fallback.
    const WAYS: [&str; 3] = ["clone3", "clone3-fork", "fork"];

    /// Starts `spec` every way (see [`WAYS`]).
    fn every_way(spec: &AgentSpawn<'_>) -> [(&'static str, Result<Spawned, SpawnError>); 3] {
        let start = |create| Plan::new(spec)?.run(create).map_err(Started::into_error);
        [
            ("clone3", start(Create::Clone3 { cgroup: None })),
            ("clone3-fork", start(Create::Clone3Fork { cgroup: None })),
            ("fork", start(Create::Fork { procs: None })),
        ]
    }

    fn exit_code(pid: i32) -> i32 {
        let pid = nix::unistd::Pid::from_raw(pid);
        match nix::sys::wait::waitpid(pid, None).unwrap() {
            nix::sys::wait::WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_agent_gets_its_argv_environment_directory_and_pipes() {
        let dir = tempfile::tempdir().unwrap();
        for way in WAYS {
            let work = dir.path().join(way).join("work");
            let tmp = dir.path().join(way).join("tmp");
            std::fs::create_dir(dir.path().join(way)).unwrap();
            let args = [
                "-c".to_string(),
                "pwd; echo \"$A|$#|$1\"; ls -ld \"$TMPDIR\" >&2; read x; echo \"in:$x\"".into(),
                "sh".into(),
                "one arg; $HOME".into(),
            ];
            let env = [
                ("PATH".to_string(), "/nonexistent:/usr/bin:/bin".to_string()),
                ("A".to_string(), "b c".to_string()),
                ("TMPDIR".to_string(), tmp.display().to_string()),
            ];
            let mut s = spec("sh", &args, &env);
            s.cwd = &work;
            let dirs = [work.as_path(), tmp.as_path()];
            s.make_dirs = &dirs;
            s.stdin = ChildIo::Pipe;
            let (_, started) = every_way(&s).into_iter().find(|(w, _)| *w == way).unwrap();
            let child = started.unwrap();
            assert!(child.pidfd.is_some(), "{way}");
            std::fs::File::from(child.stdin.unwrap())
                .write_all(b"hello\n")
                .unwrap();
            let out = read_all(child.stdout.unwrap());
            assert_eq!(
                out,
                format!("{}\nb c|1|one arg; $HOME\nin:hello\n", work.display()),
                "{way}"
            );
            let err = read_all(child.stderr.unwrap());
            assert!(err.starts_with("drwx------"), "{way}: {err}");
            assert_eq!(exit_code(child.pid), 0, "{way}");
        }
    }

    #[test]
    fn the_agent_has_only_its_three_fds_an_empty_mask_and_default_signals() {
        // This thread blocks a signal (as walkie's do) and the test binary ignores SIGPIPE
        // (as every Rust program does); an fd left inheritable must not reach the agent.
        let mut term = nix::sys::signal::SigSet::empty();
        term.add(Signal::SIGUSR2);
        term.thread_block().unwrap();
        let stray = nix::unistd::dup(std::io::stdin()).unwrap();
        eprintln!(
            "PARENT {}",
            std::fs::read_to_string("/proc/self/status")
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("Sig"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let fds = ["-1".to_string(), "/proc/self/fd".into()];
        let status = [
            "-E".to_string(),
            "^Sig(Blk|Ign)".into(),
            "/proc/self/status".into(),
        ];
        // Ignored signals walkie inherited are passed on, as exec does; SIGPIPE, which
        // Rust's runtime ignores, is not.
        let ignored = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|hex| u64::from_str_radix(hex, 16).unwrap())
            .unwrap();
        let sigpipe = 1 << (libc::SIGPIPE - 1);
        assert_ne!(ignored & sigpipe, 0);
        let signals = format!(
            "SigBlk:\t0000000000000000\nSigIgn:\t{:016x}\n",
            ignored & !sigpipe
        );
        for (program, args, expected) in [
            // ls's own fd 3 is the directory it reads.
            ("/bin/ls", &fds[..], "0\n1\n2\n3\n"),
            ("/bin/grep", &status, &signals),
        ] {
            for (way, started) in every_way(&spec(program, args, &[])) {
                let child = started.unwrap();
                let out = read_all(child.stdout.unwrap());
                assert_eq!(out, expected, "{way}");
                assert_eq!(exit_code(child.pid), 0, "{way}");
            }
        }
        drop(stray);
        term.thread_unblock().unwrap();
    }

    /// The nice value in a `/proc/PID/stat` text (the 19th field).
    fn nice_of(stat: &str) -> i32 {
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn the_agent_runs_nicer_than_walkie_by_what_is_asked() {
        let own = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        let args = ["/proc/self/stat".to_string()];
        for (nice, expected) in [(0, own), (5, (own + 5).min(19)), (40, 19)] {
            let mut s = spec("/bin/cat", &args, &[]);
            s.nice = nice;
            for (way, started) in every_way(&s) {
                let child = started.unwrap();
                let stat = read_all(child.stdout.unwrap());
                assert_eq!(nice_of(&stat), expected, "{way} +{nice}: {stat}");
                assert_eq!(exit_code(child.pid), 0, "{way}");
            }
        }
    }

    #[test]
    fn failures_name_the_step_and_a_missing_program_is_not_found() {
        let env = [("PATH".to_string(), "/nonexistent".to_string())];
        let args = ["x\0y".to_string()];
        let mut no_dir = spec("/bin/true", &[], &[]);
        no_dir.cwd = std::path::Path::new("/nonexistent/dir");
        for (way, e) in every_way(&spec("sh", &[], &env)) {
            let e = e.unwrap_err();
            assert!(e.is_not_found(), "{way}: {e}");
        }
        for (way, e) in every_way(&spec("/nonexistent/agent", &[], &[])) {
            let e = e.unwrap_err();
            assert!(e.is_not_found(), "{way}: {e}");
        }
        for (way, e) in every_way(&no_dir) {
            let e = e.unwrap_err();
            assert!(
                matches!(
                    e,
                    SpawnError::Child {
                        step: ChildStep::Chdir,
                        ..
                    }
                ) && !e.is_not_found(),
                "{way}: {e}"
            );
            assert_eq!(
                e.to_string(),
                "cannot enter its working directory: No such file or directory (os error 2)"
            );
        }
        // A directory is not a program: EACCES, not "not found".
        for (way, e) in every_way(&spec("/tmp", &[], &[])) {
            let e = e.unwrap_err();
            assert!(
                matches!(&e, SpawnError::Child { step: ChildStep::Exec, err } if err.raw_os_error() == Some(libc::EACCES)),
                "{way}: {e}"
            );
        }
        let e = spawn_agent(&spec("/bin/true", &args, &[])).unwrap_err();
        assert_eq!(e.to_string(), "an argument contains a NUL byte");
        let mut s = spec("/bin/true", &[], &[]);
        let nul_dir = std::path::PathBuf::from(
            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                b"/tmp/a\0b".to_vec(),
            ),
        );
        s.cwd = &nul_dir;
        let e = spawn_agent(&s).unwrap_err();
        assert_eq!(e.to_string(), "the working directory contains a NUL byte");
    }

    /// A fresh cgroup beside this test process's own, when cgroup v2 is there and
    /// writable; removed on drop.
    struct TestCgroup(std::path::PathBuf);

    impl TestCgroup {
        fn make(name: &str) -> Option<TestCgroup> {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            let mount = crate::tasks::contain::cgroup2_mount(&mountinfo)?;
            let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
            let own = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim()
                .to_owned();
            let dir = mount
                .join(own.trim_start_matches('/'))
                .join(format!("{name}-{}", std::process::id()));
            std::fs::create_dir(&dir).ok()?;
            Some(TestCgroup(dir))
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    #[test]
    fn every_way_puts_the_agent_in_its_cgroup_before_it_runs() {
        let Some(cgroup) = TestCgroup::make("walkie-process-test") else {
            eprintln!("no writable cgroup v2 here: nothing to check");
            return;
        };
        let dir: OwnedFd = std::fs::File::open(&cgroup.0).unwrap().into();
        let procs = open_procs(&dir).unwrap();
        let args = ["/proc/self/cgroup".to_string()];
        let s = spec("cat", &args, &[]);
        let start = |create| {
            Plan::new(&s)
                .unwrap()
                .run(create)
                .map_err(Started::into_error)
        };
        let name = cgroup.0.file_name().unwrap().to_string_lossy().into_owned();
        for (way, started) in [
            ("clone3", start(Create::Clone3 { cgroup: Some(&dir) })),
            (
                "clone3-fork",
                start(Create::Clone3Fork { cgroup: Some(&dir) }),
            ),
            (
                "fork",
                start(Create::Fork {
                    procs: Some(&procs),
                }),
            ),
        ] {
            let child = started.unwrap_or_else(|e| panic!("{way}: {e}"));
            let seen = read_all(child.stdout.unwrap());
            assert!(
                seen.lines()
                    .any(|l| l.starts_with("0::") && l.ends_with(&format!("/{name}"))),
                "{way}: {seen}"
            );
            assert_eq!(exit_code(child.pid), 0, "{way}");
        }
    }
}
