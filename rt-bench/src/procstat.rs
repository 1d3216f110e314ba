//! What the kernel counts for a process and its threads (`/proc/PID/task/*`): CPU time,
//! context switches and resident memory. Read from outside; nothing in the subject helps.

use std::collections::BTreeMap;

/// One thread's counters.
#[derive(Debug, Clone, Default)]
pub struct ThreadStat {
    pub name: String,
    /// Time on a CPU in ns (`schedstat`: exact, unlike the 10 ms ticks of `stat`).
    pub cpu_ns: u64,
    /// Times the thread blocked and was woken again.
    pub voluntary: u64,
    /// Times it was preempted.
    pub involuntary: u64,
}

/// The threads of `pid`, by thread id.
pub fn threads(pid: i32) -> BTreeMap<i32, ThreadStat> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Ok(tid) = task.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let cpu_ns = std::fs::read_to_string(path.join("schedstat"))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        out.insert(
            tid,
            ThreadStat {
                name: name.trim().to_string(),
                cpu_ns,
                voluntary: field("voluntary_ctxt_switches:"),
                involuntary: field("nonvoluntary_ctxt_switches:"),
            },
        );
    }
    out
}

/// Resident set size of `pid` in KiB (0 when it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The difference between two snapshots, per thread name (threads of one name summed).
pub fn delta_by_name(
    before: &BTreeMap<i32, ThreadStat>,
    after: &BTreeMap<i32, ThreadStat>,
) -> BTreeMap<String, ThreadStat> {
    let mut out: BTreeMap<String, ThreadStat> = BTreeMap::new();
    for (tid, a) in after {
        let b = before.get(tid).cloned().unwrap_or_default();
        let e = out.entry(a.name.clone()).or_insert_with(|| ThreadStat {
            name: a.name.clone(),
            ..Default::default()
        });
        e.cpu_ns += a.cpu_ns.saturating_sub(b.cpu_ns);
        e.voluntary += a.voluntary.saturating_sub(b.voluntary);
        e.involuntary += a.involuntary.saturating_sub(b.involuntary);
    }
    out
}
