//! The membership helper thread (`walkie-members`): finds the processes of a task, signals
//! them, and reports how many were alive — off the poll loop.
//!
//! A probe reads the task's cgroup (`cgroup.events`, `cgroup.procs`, `memory.events`; the
//! last step of a kill is one write to `cgroup.kill`) or, without a cgroup, walks `/proc`
//! for the task's marker and process tree — a few milliseconds per call on a busy machine,
//! which the loop must never spend. Each probe answers with a [`Report`] and wakes the loop
//! (the DNS helper's pattern). Removing an emptied task cgroup happens here too.
//!
//! Signals go through pidfds opened after the process was found and checked again through
//! the pidfd's process (same start time, or still in the task's cgroup): a pid that was
//! reused between the scan and the signal is never hit.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use nix::sys::signal::Signal;

use super::lifecycle::Members;
use super::proc;

/// Jobs waiting at once; each task has at most a couple out, so this is never reached in
/// practice — past it a job is dropped with an error line rather than memory grown.
const MAX_JOBS: usize = 4096;

/// Where to look for a task's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The `WALKIE_TASK` marker value.
    pub task_id: String,
    /// The agent `(pid, start time)` while it is unreaped, for the process tree.
    pub root: Option<(i32, u64)>,
    /// The task's cgroup.
    pub cgroup: Option<CgroupScope>,
    /// Walk `/proc` for the marker and the tree (no cgroup, or leftovers of a run that
    /// may have had none).
    pub scan: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupScope {
    pub dir: PathBuf,
    /// The cgroup's path inside the hierarchy (`/walkie-…/task-…`), as `/proc/<pid>/cgroup`
    /// names it.
    pub path: String,
    /// SIGKILL is one write to `cgroup.kill`.
    pub kill_file: bool,
}

#[derive(Debug)]
enum Job {
    Probe {
        key: u64,
        scope: Scope,
        signal: Option<Signal>,
    },
    RemoveCgroup(PathBuf),
}

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// The key the probe was asked with.
    pub key: u64,
    pub members: Members,
    /// Of `members.alive`, those in uninterruptible sleep (D state).
    pub stuck: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stop: bool,
    exited: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    reports: Mutex<Vec<Report>>,
}

/// The loop's handle on the helper thread.
pub struct MembershipSource {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MembershipSource {
    pub fn start(waker: Arc<mio::Waker>) -> std::io::Result<MembershipSource> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            reports: Mutex::new(Vec::new()),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("walkie-members".into())
            .spawn(move || members_worker(&worker, &waker))?;
        Ok(MembershipSource {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for a probe of `scope`, sending `signal` to every process found; the report
    /// comes back through [`MembershipSource::take_reports`] after a wake-up.
    pub fn probe(&self, key: u64, scope: Scope, signal: Option<Signal>) {
        self.push(Job::Probe { key, scope, signal });
    }

    /// Removes an emptied task cgroup.
    pub fn remove_cgroup(&self, dir: PathBuf) {
        self.push(Job::RemoveCgroup(dir));
    }

    /// Reports that came back since the last call (oldest first).
    pub fn take_reports(&self, out: &mut Vec<Report>) {
        let mut reports = lock(&self.shared.reports);
        out.append(&mut reports);
    }

    fn push(&self, job: Job) {
        let mut q = lock(&self.shared.queue);
        if q.jobs.len() >= MAX_JOBS {
            log::error!("membership helper is {MAX_JOBS} jobs behind; dropped {job:?}");
            return;
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_all();
    }
}

impl Drop for MembershipSource {
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A read of /proc/<pid>/environ can wait on a process stuck in the kernel: give it
        // a moment, never the exit.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut q = lock(&self.shared.queue);
        q.stop = true;
        q.jobs.clear();
        self.shared.ready.notify_all();
        while !q.exited {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return; // left behind; the process exit ends it
            }
            q = self
                .shared
                .ready
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(q);
        let _ = thread.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic on the helper thread must not take the loop down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn members_worker(shared: &Shared, waker: &mio::Waker) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.stop {
                    q.exited = true;
                    shared.ready.notify_all();
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        match job {
            Job::Probe { key, scope, signal } => {
                let (members, stuck) = probe(&scope, signal);
                lock(&shared.reports).push(Report {
                    key,
                    members,
                    stuck,
                });
                let _ = waker.wake();
            }
            Job::RemoveCgroup(dir) => remove_cgroup(&dir),
        }
    }
}

/// Finds (and signals) the processes of `scope`. Returns the members and how many of them
/// are stuck in the kernel.
pub fn probe(scope: &Scope, signal: Option<Signal>) -> (Members, usize) {
    let mut seen: HashSet<i32> = HashSet::new();
    let mut stuck = 0;
    let mut oom_kills = 0;
    if let Some(cg) = scope.cgroup.as_ref().filter(|c| c.dir.is_dir()) {
        oom_kills = read_key(&cg.dir.join("memory.events"), "oom_kill").unwrap_or(0)
            + read_key(&cg.dir.join("memory.events"), "oom_group_kill").unwrap_or(0);
        if read_key(&cg.dir.join("cgroup.events"), "populated") != Some(0) {
            let kill_all = signal == Some(Signal::SIGKILL) && cg.kill_file;
            if kill_all {
                if let Err(e) = fs::write(cg.dir.join("cgroup.kill"), "1") {
                    log::warn!("cannot write {}/cgroup.kill: {e}", cg.dir.display());
                }
            }
            for pid in read_pids(&cg.dir.join("cgroup.procs")) {
                let Some(stat) = proc::stat(pid).filter(proc::ProcStat::is_alive) else {
                    continue;
                };
                seen.insert(pid);
                if stat.state == 'D' {
                    stuck += 1;
                }
                if let Some(sig) = signal.filter(|_| !kill_all) {
                    signal_member(pid, &cg.path, sig);
                }
            }
        }
    }
    if scope.scan {
        for stat in proc::task_processes(&scope.task_id, scope.root) {
            if !seen.insert(stat.pid) {
                continue;
            }
            if stat.state == 'D' {
                stuck += 1;
            }
            if let Some(sig) = signal {
                signal_same(&stat, sig);
            }
        }
    }
    (
        Members {
            alive: seen.len(),
            oom_kills,
        },
        stuck,
    )
}

/// Signals `stat.pid` only if, once pinned by a pidfd, it is still the process the scan saw.
fn signal_same(stat: &proc::ProcStat, sig: Signal) {
    let Ok(fd) = crate::sys::process::pidfd_open(stat.pid) else {
        return;
    };
    if proc::is_same_process(stat.pid, stat.start_time) {
        let _ = crate::sys::process::pidfd_send_signal(&fd, sig);
    }
}

/// Signals `pid` only if, once pinned by a pidfd, it is still in the task's cgroup.
fn signal_member(pid: i32, cgroup_path: &str, sig: Signal) {
    let Ok(fd) = crate::sys::process::pidfd_open(pid) else {
        return;
    };
    let still_member = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|t| super::contain::own_cgroup(&t))
        .is_some_and(|p| p == cgroup_path);
    if still_member {
        let _ = crate::sys::process::pidfd_send_signal(&fd, sig);
    }
}

fn remove_cgroup(dir: &std::path::Path) {
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Busy: something is still in it (given up on); the next start tries again.
        Err(e) => log::warn!("cannot remove cgroup {}: {e}", dir.display()),
    }
}

/// The value of `key` in a flat-keyed cgroup file (`populated 1`, `oom_kill 0`).
fn read_key(path: &std::path::Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn read_pids(path: &std::path::Path) -> Vec<i32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_scan_probe_finds_signals_and_counts_marked_processes_off_the_loop() {
        let id = format!("members{}", fastrand::u64(..));
        let mut marked = std::process::Command::new("sleep")
            .arg("30")
            .env(proc::MARKER_VAR, &id)
            .spawn()
            .unwrap();
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(1)).unwrap());
        let source = MembershipSource::start(waker).unwrap();
        let scope = Scope {
            task_id: id.clone(),
            root: None,
            cgroup: None,
            scan: true,
        };
        let wait = |key| {
            let end = Instant::now() + Duration::from_secs(10);
            let mut got = Vec::new();
            while Instant::now() < end {
                source.take_reports(&mut got);
                if let Some(r) = got.iter().find(|r: &&Report| r.key == key) {
                    return *r;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("no report {key}");
        };
        source.probe(1, scope.clone(), None);
        assert_eq!(wait(1).members.alive, 1);
        source.probe(2, scope.clone(), Some(Signal::SIGKILL));
        assert_eq!(wait(2).members.alive, 1, "counted before the signal");
        let status = marked.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        source.probe(3, scope, None);
        assert_eq!(wait(3).members.alive, 0);
    }

    #[test]
    fn flat_keyed_files_are_read_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        std::fs::write(&p, "low 0\nhigh 3\nmax 9\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(read_key(&p, "oom_kill"), Some(1));
        assert_eq!(read_key(&p, "oom"), Some(2));
        assert_eq!(read_key(&p, "nothing"), None);
        assert_eq!(read_key(&dir.path().join("missing"), "x"), None);
    }
}
