//! Finding an agent's processes in `/proc`, including the ones that escaped.
//!
//! Claude's Bash tool starts commands in their own session, so a task's process group does
//! not cover them, and after the agent dies they are re-parented (to walkie, a child
//! subreaper, or to init when walkie itself died). Two independent threads of evidence find
//! them: the parent chain from the agent's pid, and the `WALKIE_TASK=<id>` marker every task
//! process inherits in its environment. A reused pid carries neither, so it is never touched.

use std::collections::{HashMap, HashSet};
use std::fs;

/// The environment variable that marks every process of a task.
pub const MARKER_VAR: &str = "WALKIE_TASK";

/// The fields of `/proc/<pid>/stat` walkie uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    /// Clock ticks after boot at which the process started (field 22): with the pid it
    /// names one process for the lifetime of the machine.
    pub start_time: u64,
}

impl ProcStat {
    /// Zombies and dead entries are gone as far as killing goes: only a reap is left.
    pub fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may contain spaces
/// and parentheses, so the fields after it are found from the *last* `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let mut rest = text.get(close + 1..)?.split_ascii_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgid = rest.next()?.parse().ok()?;
    let sid = rest.next()?.parse().ok()?;
    // Fields 7..21 (tty_nr … itrealvalue) are skipped; field 22 is starttime.
    let start_time = rest.nth(15)?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgid,
        sid,
        start_time,
    })
}

/// `/proc/<pid>/stat` of one process, or `None` when it does not exist.
pub fn stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True when `pid` is alive and still the process that started at `start_time`.
pub fn is_same_process(pid: i32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_time == start_time && s.is_alive())
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn environ_has(pid: i32, needle: &[u8]) -> bool {
    // Unreadable (another user's process, or gone) means "not ours".
    fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle))
}

/// Every live process that belongs to the task `task_id`: descendants of `root` (when
/// given as `(pid, start time)` and still that process) and every process carrying the
/// task's marker. Never includes walkie itself. It reads every `/proc/<pid>/stat` and
/// `environ`: milliseconds on a busy machine, so it runs on the membership helper thread
/// (members.rs), never on the poll loop.
pub fn task_processes(task_id: &str, root: Option<(i32, u64)>) -> Vec<ProcStat> {
    let me = std::process::id() as i32;
    let needle = format!("{MARKER_VAR}={task_id}").into_bytes();
    let stats: Vec<ProcStat> = all_pids().into_iter().filter_map(stat).collect();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for s in &stats {
        children.entry(s.ppid).or_default().push(s.pid);
    }
    let mut found: HashSet<i32> = HashSet::new();
    let mut queue: Vec<i32> = Vec::new();
    // A root that is not the process it was (its pid reused) roots a stranger's tree.
    if let Some((root, start)) = root
        && stats.iter().any(|s| s.pid == root && s.start_time == start)
    {
        queue.push(root);
    }
    for s in &stats {
        if s.pid != me && s.is_alive() && environ_has(s.pid, &needle) {
            queue.push(s.pid);
        }
    }
    while let Some(pid) = queue.pop() {
        if pid == me || !found.insert(pid) {
            continue;
        }
        if let Some(kids) = children.get(&pid) {
            queue.extend(kids.iter().copied());
        }
    }
    let mut out: Vec<ProcStat> = stats
        .into_iter()
        .filter(|s| s.is_alive() && found.contains(&s.pid))
        .collect();
    out.sort_unstable_by_key(|s| s.pid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_command_names() {
        let line = "4242 (evil) name (x) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50 18446744073709551615";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            (s.pid, s.state, s.ppid, s.pgid, s.sid),
            (4242, 'S', 1, 4242, 4242)
        );
        assert_eq!(s.start_time, 987654);
        assert!(s.is_alive());
        assert!(parse_stat("garbage").is_none());
        assert!(!parse_stat(&line.replace(" S ", " Z ")).unwrap().is_alive());
    }

    #[test]
    fn own_stat_is_readable_and_stable() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(is_same_process(me, s.start_time));
        assert!(!is_same_process(me, s.start_time + 1));
    }

    #[test]
    fn finds_marked_and_descendant_processes() {
        let id = format!("test{}", fastrand::u64(..));
        // A marked process (found by its environment) whose child is found by the tree.
        let mut marked = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .env(MARKER_VAR, &id)
            .spawn()
            .unwrap();
        let mut unmarked = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut found = Vec::new();
        while std::time::Instant::now() < deadline {
            found = task_processes(&id, None).iter().map(|s| s.pid).collect();
            if found.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(found.contains(&(marked.id() as i32)), "{found:?}");
        assert_eq!(found.len(), 2, "sh and its sleep: {found:?}");
        assert!(!found.contains(&(unmarked.id() as i32)));
        // The tree root alone finds the unmarked one, if it is still the same process.
        let root = unmarked.id() as i32;
        let start = stat(root).unwrap().start_time;
        let pids = |root| -> Vec<i32> {
            task_processes("nothing-has-this", root)
                .iter()
                .map(|s| s.pid)
                .collect()
        };
        assert_eq!(pids(Some((root, start))), vec![root]);
        assert_eq!(
            pids(Some((root, start + 1))),
            Vec::<i32>::new(),
            "a reused pid"
        );
        for pid in &found {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = unmarked.kill();
        let _ = marked.wait();
        let _ = unmarked.wait();
    }
}
