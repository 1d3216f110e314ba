#!/bin/bash
# Which thread of walkie touches the disk, while tasks start, flood and end.
#
# Traces every thread of a running walkie with strace (file syscalls, writes, fsync,
# renames, removals, directory reads, signals) during: 105 short tasks that each leave a
# setsid grandchild (the sweep, and pruning: the registry keeps 100 finished tasks), then
# 10 agents flooding 5 MB/s each for 8 s, cancelled, and a finished task's log read back.
# Then prints, per thread, what it did and on what (report.py). The poll loop is the thread
# named "walkie": it must show no write, rename, unlink, rmdir or fsync of a disk file and
# no /proc walk.
#
#   tools/loop-io/run.sh [TARGET_DIR]          (default: target/debug; build first)
#   CONTAINMENT=scan tools/loop-io/run.sh      (the /proc scan instead of cgroups)
#
# Needs strace, python3, and root or ptrace rights over walkie.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${1:-$here/../../target/debug}
walkie=$(realpath "$target/walkie")
agent=$(realpath "$target/fake-agent")
work=$(mktemp -d /tmp/walkie-loop-io.XXXXXX)
mkdir -p "$work"/{home,state,data,runtime,config/walkie}
export HOME=$work/home XDG_STATE_HOME=$work/state XDG_DATA_HOME=$work/data \
    XDG_RUNTIME_DIR=$work/runtime XDG_CONFIG_HOME=$work/config WALKIE_LOG=info
cat > "$work/config/walkie/config.toml" <<CFG
[realtime]
url = "none"
[audio]
backend = "none"
[button]
device = "none"
[agent]
command = ["$agent", "-p", "{prompt}", "--output-format", "stream-json", "--verbose"]
cancel_grace_ms = 1000
max_running = 12
containment = "${CONTAINMENT:-auto}"
CFG
"$walkie" run 2> >(cat > "$work/walkie.log") &
pid=$!
for _ in $(seq 100); do [ -S "$work/runtime/walkie/control.sock" ] && break; sleep 0.05; done
sleep 0.5 # the task engine's threads start after the socket
for t in /proc/$pid/task/*; do echo "$(basename "$t") $(cat "$t/comm")"; done > "$work/threads"
strace -f -p "$pid" -tt -y -o "$work/trace" -e trace=%file,getdents64,write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg,fsync,fdatasync,sync_file_range,ftruncate,fallocate,kill,tgkill,pidfd_send_signal &
tracer=$!
sleep 1
running() { "$walkie" ctl status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["tasks"]["running"])'; }
n=0
while [ $n -lt 105 ]; do
    if [ "$(running)" -ge 10 ]; then sleep 0.05; continue; fi
    "$walkie" ctl start --name "short $n" "@sleep=0 @grandchild" > /dev/null
    n=$((n + 1))
done
while [ "$(running)" != 0 ]; do sleep 0.1; done
for i in $(seq 10); do "$walkie" ctl start --name "flood $i" "@flood-rate=5M" > /dev/null; done
sleep 8
for i in $(seq 10); do "$walkie" ctl cancel "flood-$i" > /dev/null; done
while [ "$(running)" != 0 ]; do sleep 0.1; done
"$walkie" ctl logs flood-3 > /dev/null
"$walkie" ctl status --json | python3 -c 'import json,sys; print("containment:", json.load(sys.stdin)["containment"]["kind"])'
kill -INT $tracer; wait $tracer 2> /dev/null || true
kill -TERM $pid; wait $pid 2> /dev/null || true
python3 "$here/report.py" "$work/threads" "$work/trace" "$work"
rm -rf "$work"
