"""Per thread of walkie: the syscalls an strace -f -y showed, grouped by what they touched."""
import collections
import re
import sys

threads_file, trace_file, home = sys.argv[1:4]
threads = {}
for line in open(threads_file):
    tid, name = line.split(None, 1)
    threads[tid] = name.strip()
per = collections.defaultdict(collections.Counter)
for line in open(trace_file):
    m = re.match(r"(\d+) +[\d:.]+ (\w+)\((.*)", line)
    if not m:
        continue
    tid, call, rest = m.groups()
    who = threads.get(tid, "(forked child, before exec)")
    fd = re.match(r"-?\d+<([^>]*)>", rest)
    if fd:
        target = fd.group(1)
    else:
        path = re.match(r'(?:AT_FDCWD(?:<[^>]*>)?|\d+<[^>]*>), "([^"]*)"|"([^"]*)"', rest)
        target = (path.group(1) or path.group(2)) if path else ""
    if target.startswith(("socket:", "pipe:")):
        kind = target.split(":")[0]
    elif target.startswith("anon_inode:"):
        kind = target
    elif re.match(r"/proc/\d+/", target):
        kind = "/proc/<pid>/" + target.split("/")[-1]
    elif target == "/proc":
        kind = "/proc (the directory: a walk)"
    elif target.startswith("/sys/fs/cgroup"):
        last = target.split("/")[-1]
        kind = "cgroupfs " + ("task-<id>" if last.startswith("task-") else last)
    elif target.startswith(home):
        rel = target[len(home):]
        rel = re.sub(r"/(short|flood)-\d+", r"/\1-<n>", rel)
        rel = re.sub(r"/[0-9a-f]{16}", "/<id>", rel)
        kind = "DISK " + rel
    else:
        kind = target[:60]
    per[who][(call, kind)] += 1
order = ["walkie"] + sorted(set(per) - {"walkie"})
for who in order:
    if who not in per:
        continue
    note = " (the poll loop)" if who == "walkie" else ""
    print(f"== {who}{note}")
    for (call, kind), n in sorted(per[who].items(), key=lambda x: -x[1])[:20]:
        print(f"  {n:7d} {call:18s} {kind}")
loop = per.get("walkie", {})
bad = [(c, k) for (c, k) in loop if k.startswith("DISK") and c in (
    "write", "writev", "pwrite64", "pwritev", "pwritev2", "rename", "renameat", "renameat2",
    "unlink", "unlinkat", "rmdir", "mkdir", "mkdirat", "fsync", "fdatasync", "ftruncate",
    "fallocate", "openat", "creat")] + [(c, k) for (c, k) in loop if "(the directory" in k]
print("\nthe poll loop:", "no disk write, rename, removal, creation or open and no /proc walk"
      if not bad else f"TOUCHED THE DISK: {bad}")
sys.exit(1 if bad else 0)
