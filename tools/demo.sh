#!/bin/sh
# `make demo`: walkie's whole voice loop on local stand-ins — no API key, no sound card,
# no button. A spoken request (tools/demo/request.wav) is the microphone (wav backend); the
# button is pressed and released with `walkie ctl`; tools/fake-realtime plays the model and
# calls start_task; tools/fake-agent plays Claude Code, kept open on stdin; it asks to run
# the tests, walkie asks the user, a typed "yes" lets the model answer it (answer_task);
# everything walkie would say (answers, earcons, the question, the completion announcement)
# lands in an output WAV. Then the timeline.
set -eu
cd "$(dirname "$0")/.."
BIN=${WALKIE_BIN_DIR:-${CARGO_TARGET_DIR:-target}/debug}
DEMO=${WALKIE_DEMO_DIR:-$(mktemp -d /tmp/walkie-demo.XXXXXX)}
mkdir -p "$DEMO/config/walkie" "$DEMO/state" "$DEMO/data" "$DEMO/runtime" "$DEMO/home"
export HOME="$DEMO/home" XDG_CONFIG_HOME="$DEMO/config" XDG_STATE_HOME="$DEMO/state" \
       XDG_DATA_HOME="$DEMO/data" XDG_RUNTIME_DIR="$DEMO/runtime" WALKIE_LOG=info
unset OPENAI_API_KEY || true

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

say "fake Realtime server (tools/fake-realtime, script tools/demo/script.json)"
"$BIN/fake-realtime" --script tools/demo/script.json --record "$DEMO/server-received.jsonl" \
    --port-file "$DEMO/port" >"$DEMO/fake-realtime.out" 2>&1 &
pids="$pids $!"
i=0; while [ ! -s "$DEMO/port" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
PORT=$(cat "$DEMO/port")
echo "listening on ws://127.0.0.1:$PORT"

cat >"$DEMO/config/walkie/config.toml" <<TOML
[realtime]
url = "ws://127.0.0.1:$PORT/v1/realtime"
[audio]
backend = "wav"
input_wav = "$PWD/tools/demo/request.wav"
output_wav = "$DEMO/walkie-output.wav"
[button]
device = "none"
[agent]
command = ["$(cd "$BIN" && pwd)/fake-agent"]
TOML
say "the stand-in agent (tools/fake-agent)"
cat <<'TXT'
The fake agent plays Claude Code: it prints the CLI's stream-json and acts on @directives
in its prompt instead of thinking. The scripted model writes them into the task prompts it
sends, e.g. "Fix the flaky login test. @sleep=3 @edit=tests/test_login.py
@ask=python3_-m_pytest_-q @text=The_login_test_is_fixed…": work for 3 s, edit a file,
ask for permission to run a command (walkie asks you; the command runs once allowed), and
finish with that text (underscores are spaces). Others make it fail, stall, flood output or
ignore signals (tools/fake-agent/README.md); the tests use them all. With the real agent
the prompt is just what you said, and walkie gives it to the agent on its input (not on its
command line: `agent.command` is just the program).
TXT

say "configuration ($DEMO/config/walkie/config.toml)"
cat "$DEMO/config/walkie/config.toml"

say "walkie run (its log follows)"
"$BIN/walkie" run --trace "$DEMO/trace.jsonl" 2>&1 | sed -u 's/^/  walkie | /' &
pids="$pids $!"
i=0; until "$BIN/walkie" ctl status >/dev/null 2>&1 || [ $i -gt 100 ]; do sleep 0.05; i=$((i+1)); done
"$BIN/walkie" ctl events | sed -u 's/^/  event  | /' &
pids="$pids $!"
sleep 0.5

say "the user holds the button and speaks (tools/demo/request.wav: \"Please start a task to fix the flaky login test.\")"
"$BIN/walkie" ctl press
sleep 4.3
"$BIN/walkie" ctl release
echo "button released"

say "the agent asks to run the tests; walkie asks the user (when they are idle, after a chime)"
i=0
until "$BIN/walkie" ctl transcript | grep -q 'assistant: flaky-login-test wants to run' || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done
"$BIN/walkie" ctl tasks
sleep 2

say "the user answers, typed: walkie ctl say \"Yes, allow it.\" (a spoken answer works the same)"
"$BIN/walkie" ctl say "Yes, allow it."

say "waiting for the task to finish and the announcement"
i=0
until "$BIN/walkie" ctl transcript | grep -q 'assistant: Task update' || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done
sleep 3

say "a typed turn: walkie ctl say \"Also start a task to update the changelog.\""
"$BIN/walkie" ctl say "Also start a task to update the changelog."
i=0
until "$BIN/walkie" ctl tasks --json | grep -q '"name": "changelog"' || [ $i -gt 100 ]; do sleep 0.1; i=$((i+1)); done
i=0
until [ "$("$BIN/walkie" ctl transcript | grep -c 'assistant: Task update')" -ge 2 ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done
sleep 3

say "walkie ctl status"
"$BIN/walkie" ctl status
say "walkie ctl tasks"
"$BIN/walkie" ctl tasks
say "walkie ctl result flaky"
"$BIN/walkie" ctl result flaky
say "walkie ctl transcript"
"$BIN/walkie" ctl transcript

say "stopping walkie (SIGTERM)"
pkill -TERM -f "$BIN/walkie run --trace $DEMO/trace.jsonl" || true
sleep 1

say "timeline (from the trace file $DEMO/trace.jsonl)"
python3 tools/demo/timeline.py "$DEMO/trace.jsonl"

say "what walkie played"
echo "$DEMO/walkie-output.wav — speech, earcons and silence as the speaker would have played them"
echo "(listen with: aplay $DEMO/walkie-output.wav)"
