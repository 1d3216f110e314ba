//! Containment: how walkie knows every process of a task, so that none outlives it.
//!
//! With cgroup v2, where walkie may create cgroups (root, or a systemd unit with
//! `Delegate=yes`), each task runs in its own cgroup: its members are `cgroup.procs`, the
//! last step of a cancel is `cgroup.kill`, `populated 0` in `cgroup.events` says when the
//! last descendant is gone, and `agent.memory_max` becomes the task's `memory.max` where
//! the memory controller is delegated (an OOM kill shows in `memory.events`). Otherwise
//! the fallback is a scan of `/proc` for the task's marker and process tree, which runs on
//! the membership helper thread (members.rs), never on the loop.
//!
//! Where walkie's own subtree lives: walkie finds the cgroup2 mount in
//! `/proc/self/mountinfo` and its own cgroup in `/proc/self/cgroup`. When it is alone in
//! that cgroup (a service unit of its own), the cgroup is walkie's: walkie moves itself into
//! a leaf, `daemon/`, first — controllers can be enabled for children only in a cgroup
//! without processes of its own — and tasks are its siblings. When it shares the cgroup
//! (started from a shell), walkie creates a subtree of its own beside the others,
//! `walkie-<hash of the state directory>/`, stays where it is, and removes the subtree when
//! it exits. Either way task cgroups are named `task-<id>`, so a restart after a crash finds
//! the leftovers of the runs it marks interrupted.

use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Where the daemon's own process lives when walkie owns its cgroup.
const DAEMON_LEAF: &str = "daemon";
/// Prefix of a task's cgroup name.
const TASK_PREFIX: &str = "task-";

/// How this daemon contains its tasks.
#[derive(Debug)]
pub enum Containment {
    Cgroup(Cgroups),
    Scan { reason: String },
}

/// walkie's cgroup v2 subtree.
#[derive(Debug)]
pub struct Cgroups {
    /// The cgroup2 mount point.
    mount: PathBuf,
    /// Where tasks' cgroups are created (a path in the cgroup2 mount).
    base: PathBuf,
    /// walkie created `base` beside other processes and removes it at exit.
    shared: bool,
    /// The memory controller is enabled for task cgroups, or why not.
    memory: Result<(), String>,
    /// `cgroup.kill` exists (Linux ≥ 5.14).
    kill_file: bool,
    reason: String,
}

/// What the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `agent.containment = "scan"`: never use cgroups.
    pub scan_only: bool,
    /// Names walkie's subtree when it shares its cgroup: one per state directory.
    pub state_dir: PathBuf,
}

impl Containment {
    /// Sets up containment for this daemon (before any task starts). Never fails: what
    /// cannot be done with cgroups falls back to the scan, with the reason.
    pub fn setup(req: &Request) -> Containment {
        if req.scan_only {
            return Containment::Scan {
                reason: "agent.containment is \"scan\"".into(),
            };
        }
        match Cgroups::setup(req) {
            Ok(c) => Containment::Cgroup(c),
            Err(reason) => Containment::Scan { reason },
        }
    }

    pub fn cgroups(&self) -> Option<&Cgroups> {
        match self {
            Containment::Cgroup(c) => Some(c),
            Containment::Scan { .. } => None,
        }
    }

    /// `{"kind": "cgroup"|"scan", "reason": ..., "path"?: ...}` for `walkie ctl status`.
    pub fn status(&self) -> Value {
        match self {
            Containment::Cgroup(c) => {
                json!({"kind": "cgroup", "reason": c.reason, "path": c.base})
            }
            Containment::Scan { reason } => json!({"kind": "scan", "reason": reason}),
        }
    }

    /// One sentence for logs and `walkie doctor`.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup(c) => format!(
                "each task in its own cgroup under {} ({})",
                c.base.display(),
                c.reason
            ),
            Containment::Scan { reason } => format!(
                "a scan of /proc for each task's marker and process tree, on a helper thread ({reason})"
            ),
        }
    }

    /// At exit: walkie's shared subtree goes (the daemon leaf of an owned cgroup goes with
    /// the unit). Task cgroups still in use stay for the next start to clean up.
    pub fn release(&self) {
        if let Containment::Cgroup(c) = self {
            if c.shared {
                if let Ok(dir) = fs::read_dir(&c.base) {
                    for e in dir.flatten() {
                        if e.file_name().to_string_lossy().starts_with(TASK_PREFIX) {
                            let _ = fs::remove_dir(e.path());
                        }
                    }
                }
                let _ = fs::remove_dir(&c.base);
            }
        }
    }
}

/// The `walkie doctor` line: what the running daemon uses and why, or else what a daemon
/// started now would likely get (found without creating anything).
pub fn doctor_report(config: &crate::config::Config, paths: &crate::paths::Paths) -> String {
    if let Some(running) = ask_daemon(&paths.control_socket()) {
        return format!("{running} (the running daemon)");
    }
    let scan_only = config.agent.containment == crate::config::ContainmentMode::Scan;
    let mut text = preview(scan_only);
    if config.agent.memory_max_bytes().is_some() && !text.contains("memory controller available") {
        text.push_str("; agent.memory_max will not apply");
    }
    text
}

/// The running daemon's containment, from `walkie ctl status`.
fn ask_daemon(socket: &Path) -> Option<String> {
    use std::io::{BufRead, BufReader};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    stream.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let reply: Value = serde_json::from_str(&line).ok()?;
    let c = reply.get("status")?.get("containment")?;
    let reason = c.get("reason")?.as_str()?;
    Some(match c.get("kind")?.as_str()? {
        "cgroup" => format!(
            "a cgroup per task under {} ({reason})",
            c.get("path").and_then(Value::as_str).unwrap_or("?")
        ),
        _ => format!("/proc scan on a helper thread ({reason})"),
    })
}

/// What a daemon started now would likely get, and why, without creating anything.
pub fn preview(scan_only: bool) -> String {
    if scan_only {
        return "/proc scan on a helper thread (agent.containment is \"scan\")".into();
    }
    let (mount, own) = match locate() {
        Ok(found) => found,
        Err(reason) => return format!("/proc scan on a helper thread ({reason})"),
    };
    let dir = mount.join(own.trim_start_matches('/'));
    if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return format!(
            "/proc scan on a helper thread (cannot create cgroups in {}: run walkie as root, or as a systemd unit with Delegate=yes)",
            dir.display()
        );
    }
    let memory = read_words(&dir.join("cgroup.controllers"))
        .is_some_and(|c| c.iter().any(|w| w == "memory"));
    format!(
        "a cgroup per task in {} (cgroup v2 at {}; memory controller {})",
        dir.display(),
        mount.display(),
        if memory {
            "available"
        } else {
            "not available: agent.memory_max cannot apply"
        }
    )
}

impl Cgroups {
    fn setup(req: &Request) -> Result<Cgroups, String> {
        let (mount, own) = locate()?;
        let own_dir = mount.join(own.trim_start_matches('/'));
        let me = std::process::id();
        let procs = fs::read_to_string(own_dir.join("cgroup.procs"))
            .map_err(|e| format!("cannot read {}/cgroup.procs: {e}", own_dir.display()))?;
        let alone = procs.split_whitespace().all(|p| p.parse::<u32>() == Ok(me));
        let in_root = own == "/";
        let (base, shared) = if alone && !in_root {
            // Our own cgroup (a service unit): into a leaf first, so controllers can be
            // enabled for the task cgroups beside it ("no internal processes").
            let leaf = own_dir.join(DAEMON_LEAF);
            make_dir(&leaf)?;
            fs::write(leaf.join("cgroup.procs"), me.to_string())
                .map_err(|e| format!("cannot move walkie into {}: {e}", leaf.display()))?;
            (own_dir.clone(), false)
        } else {
            let base = own_dir.join(format!(
                "walkie-{:016x}",
                fnv1a(req.state_dir.as_os_str().as_encoded_bytes())
            ));
            make_dir(&base)?;
            (base, true)
        };
        let kill_file = base.join("cgroup.kill").exists() || probe_kill_file(&base);
        // Enabled whatever agent.memory_max says now: a SIGHUP may set it later.
        let memory = enable_memory(&base);
        let mut reason = format!(
            "cgroup v2 mounted at {}; walkie {}",
            mount.display(),
            if shared {
                "shares its cgroup, so it made a subtree of its own"
            } else {
                "owns its cgroup and moved itself into the daemon/ leaf"
            }
        );
        match &memory {
            Ok(()) => reason.push_str("; memory controller enabled (agent.memory_max applies)"),
            Err(p) => reason.push_str(&format!("; agent.memory_max cannot apply: {p}")),
        }
        if !kill_file {
            reason.push_str("; no cgroup.kill (kernel before 5.14): members are killed one by one");
        }
        Ok(Cgroups {
            mount,
            base,
            shared,
            memory,
            kill_file,
            reason,
        })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The cgroup of task `id`.
    pub fn task_dir(&self, id: &str) -> PathBuf {
        self.base.join(format!("{TASK_PREFIX}{id}"))
    }

    pub fn kill_file(&self) -> bool {
        self.kill_file
    }

    /// A cgroup directory's path inside the hierarchy (`/walkie-…/task-…`), as
    /// `/proc/<pid>/cgroup` shows it.
    pub fn hierarchy_path(&self, dir: &Path) -> String {
        let rel = dir.strip_prefix(&self.mount).unwrap_or(dir);
        format!("/{}", rel.display())
    }

    /// Why `agent.memory_max` cannot apply here, if it cannot.
    pub fn memory_problem(&self) -> Option<&str> {
        self.memory.as_ref().err().map(String::as_str)
    }

    /// Creates task `id`'s cgroup, with `memory_max` bytes as its `memory.max` where the
    /// controller is enabled, and opens the directory (`O_PATH`) for the agent to be started
    /// in (`sys::process::spawn_agent`).
    pub fn create_task(&self, id: &str, memory_max: Option<u64>) -> io::Result<(PathBuf, OwnedFd)> {
        let dir = self.task_dir(id);
        let created = match fs::create_dir(&dir) {
            // walkie's subtree was removed under it (by hand, a cleanup script): again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&self.base).and_then(|()| fs::create_dir(&dir))
            }
            other => other,
        };
        match created {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(bytes) = memory_max.filter(|_| self.memory.is_ok()) {
            fs::write(dir.join("memory.max"), bytes.to_string())?;
            // One OOM kill takes the whole task: the agent is never left half-alive.
            let _ = fs::write(dir.join("memory.oom.group"), "1");
        }
        let fd = nix::fcntl::open(
            &dir,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        Ok((dir, fd))
    }

    /// The task cgroups found in the subtree, as `(id, path)`: leftovers at start.
    pub fn task_dirs(&self) -> Vec<(String, PathBuf)> {
        let Ok(dir) = fs::read_dir(&self.base) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let id = name.strip_prefix(TASK_PREFIX)?.to_string();
                e.file_type().ok()?.is_dir().then(|| (id, e.path()))
            })
            .collect()
    }
}

/// The cgroup2 mount and walkie's own cgroup path in it.
fn locate() -> Result<(PathBuf, String), String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup2 hierarchy is mounted")?;
    let cgroup = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own_cgroup(&cgroup).ok_or("walkie's cgroup v2 path is not in /proc/self/cgroup")?;
    Ok((mount, own))
}

/// The mount point of the first cgroup2 filesystem in a `mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount(point)))
    })
}

/// Mount points escape space, tab, newline and backslash as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|oct| u8::from_str_radix(std::str::from_utf8(oct).ok()?, 8).ok());
        match code {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The unified-hierarchy path (`0::/path`) in a `/proc/<pid>/cgroup` text.
pub fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .filter(|p| p.starts_with('/'))
}

fn make_dir(dir: &Path) -> Result<(), String> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create cgroup {}: {e}", dir.display())),
    }
}

/// `cgroup.kill` is listed in child cgroups only; look in a throwaway child when `base` is
/// the root of the hierarchy.
fn probe_kill_file(base: &Path) -> bool {
    let probe = base.join(".walkie-probe");
    let found = fs::create_dir(&probe).is_ok() && probe.join("cgroup.kill").exists();
    let _ = fs::remove_dir(&probe);
    found
}

/// Turns on the memory controller for `base`'s children.
fn enable_memory(base: &Path) -> Result<(), String> {
    let available = read_words(&base.join("cgroup.controllers")).unwrap_or_default();
    if !available.iter().any(|c| c == "memory") {
        return Err(format!(
            "the memory controller is not available in {} (cgroup.controllers: {})",
            base.display(),
            if available.is_empty() {
                "none".to_string()
            } else {
                available.join(" ")
            }
        ));
    }
    let enabled = read_words(&base.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.iter().any(|c| c == "memory") {
        return Ok(());
    }
    fs::OpenOptions::new()
        .write(true)
        .open(base.join("cgroup.subtree_control"))
        .and_then(|mut f| f.write_all(b"+memory"))
        .map_err(|e| {
            format!(
                "cannot enable the memory controller in {}: {e}",
                base.display()
            )
        })
}

fn read_words(path: &Path) -> Option<Vec<String>> {
    Some(
        fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .map(str::to_string)
            .collect(),
    )
}

/// A stable 64-bit name for a path (FNV-1a): the same state directory always maps to the
/// same subtree, so a restart finds the previous run's task cgroups.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `memory.max` syntax from a size with an optional binary suffix (`512M`, `1G`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last()? {
        (i, 'K' | 'k') => (&t[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&t[..i], 1 << 20),
        (i, 'G' | 'g') => (&t[..i], 1 << 30),
        (i, 'T' | 't') => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(mult).filter(|v| *v > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_whatever_the_layout() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let odd = "29 23 0:26 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(odd), Some(PathBuf::from("/mnt/my cgroups")));
        assert_eq!(
            cgroup2_mount("35 31 0:32 / /x rw - cgroup cgroup rw\n"),
            None
        );
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn reads_the_unified_line_of_proc_self_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/x/y\n0::/user.slice/walkie.service\n";
        assert_eq!(
            own_cgroup(hybrid).as_deref(),
            Some("/user.slice/walkie.service")
        );
        assert_eq!(own_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size(" 64k "), Some(64 << 10));
        assert_eq!(parse_size("0"), None);
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn the_subtree_name_is_stable_per_state_directory() {
        assert_eq!(fnv1a(b"/a/state"), fnv1a(b"/a/state"));
        assert_ne!(fnv1a(b"/a/state"), fnv1a(b"/b/state"));
    }
}
