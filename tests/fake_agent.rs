//! Integration tests of tools/fake-agent, driving the binary as walkie will.
//!
//! The output is compared with real captures of the Claude Code CLI (copied into
//! tests/fixtures/claude-cli/): same line types in the same order and the keys walkie reads.
//! Signal tests wait for the line that proves the agent reached the state under test before
//! signalling; a watchdog bounds every read so a broken agent fails the test instead of
//! hanging it. The kept-open tests (`--input-format stream-json`) write user messages and
//! control lines on a real stdin pipe, each after the line that shows the agent is where the
//! fixture's supervisor wrote it, and compare with the kept-open captures.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

mod common;

const EXE: &str = common::FAKE_AGENT;
const WATCHDOG: Duration = Duration::from_secs(10);

fn fixture(name: &str) -> Vec<Value> {
    // The real CLI captures (tests/fixtures/claude-cli/<case>/stdout.jsonl; the resumed run
    // of the resume case is stdout2.jsonl).
    let (case, file) = match name {
        "resume2" => ("resume", "stdout2.jsonl"),
        other => (other, "stdout.jsonl"),
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/claude-cli")
        .join(case)
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// walkie's default agent template, with `prompt` in place.
fn stream_args(prompt: &str) -> Vec<String> {
    [
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "acceptEdits",
    ]
    .map(String::from)
    .to_vec()
}

fn command(dir: &Path, args: &[String]) -> Command {
    common::fakes_built();
    let mut cmd = Command::new(EXE);
    cmd.args(args)
        .current_dir(dir)
        .env_remove("FAKE_AGENT_DIRECTIVES")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

struct Finished {
    stdout: Vec<u8>,
    stderr: String,
    status: ExitStatus,
}

impl Finished {
    fn lines(&self) -> Vec<Value> {
        String::from_utf8(self.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// Runs to completion (bounded by the watchdog).
fn run_in(dir: &Path, args: &[String]) -> Finished {
    let mut agent = Agent::spawn(command(dir, args));
    let stdout = agent.rest();
    let (status, stderr) = agent.wait();
    Finished {
        stdout,
        stderr,
        status,
    }
}

fn run(dir: &Path, prompt: &str) -> Finished {
    run_in(dir, &stream_args(prompt))
}

/// A running agent whose stdout lines arrive through a reader thread.
struct Agent {
    child: Child,
    lines: Receiver<Vec<u8>>,
    deadline: Instant,
}

impl Agent {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Agent {
            child,
            lines,
            deadline: Instant::now() + WATCHDOG,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap();
    }

    /// The next line, None at end of output.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("fake-agent stuck"),
        }
    }

    /// Reads lines until one satisfies `wanted`; returns it parsed.
    fn wait_for(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = self.next_line().expect("output ended first");
            if let Ok(value) = serde_json::from_slice::<Value>(&line)
                && wanted(&value)
            {
                return value;
            }
        }
    }

    /// Everything until the end of output.
    fn rest(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(line) = self.next_line() {
            out.extend(line);
        }
        out
    }

    fn wait(&mut self) -> (ExitStatus, String) {
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).unwrap();
        }
        (self.child.wait().unwrap(), stderr)
    }

    /// Whether the signal has been taken off the process's pending set (delivered).
    fn signal_delivered(&self, signal: Signal) -> bool {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()));
        let Ok(status) = status else {
            return true; // gone
        };
        let bit = 1u64 << (signal as i32 - 1);
        status
            .lines()
            .filter(|l| l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .all(|mask| mask & bit == 0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn parse_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `type` or `type/subtype` of each line, consecutive repeats collapsed (the real CLI may
/// split one message's blocks over several lines).
fn shape(lines: &[Value]) -> Vec<String> {
    let mut shape: Vec<String> = Vec::new();
    for line in lines {
        let kind = match (line["type"].as_str(), line["subtype"].as_str()) {
            (Some(t), Some(s)) => format!("{t}/{s}"),
            (Some(t), None) => t.to_owned(),
            _ => panic!("no type: {line}"),
        };
        if shape.last() != Some(&kind) {
            shape.push(kind);
        }
    }
    shape
}

/// The keys walkie relies on, per line type (reference/claude-cli.md).
fn required_keys(kind: &str) -> &'static [&'static str] {
    match kind {
        "system/init" => &[
            "type",
            "subtype",
            "cwd",
            "session_id",
            "tools",
            "model",
            "permissionMode",
            "claude_code_version",
            "uuid",
        ],
        "assistant" | "user" => &[
            "type",
            "message",
            "parent_tool_use_id",
            "session_id",
            "uuid",
        ],
        "result" => &[
            "type",
            "subtype",
            "is_error",
            "duration_ms",
            "num_turns",
            "session_id",
            "total_cost_usd",
            "usage",
            "permission_denials",
            "terminal_reason",
            "uuid",
        ],
        _ => &["type", "session_id", "uuid"],
    }
}

fn kind(line: &Value) -> String {
    shape(std::slice::from_ref(line)).remove(0)
}

fn blocks(line: &Value) -> Vec<Value> {
    line["message"]["content"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Same line types in the same order as `fixture`, the required keys on every line (checked
/// on the fixture too, so the list stays true to the real CLI), content blocks shaped alike.
fn assert_like_fixture(ours: &[Value], fixture_name: &str) {
    let real = fixture(fixture_name);
    assert_eq!(
        shape(ours),
        shape(&real),
        "line types vs fixture {fixture_name}"
    );
    for line in real.iter().chain(ours) {
        for key in required_keys(&kind(line)) {
            assert!(line.get(*key).is_some(), "{key} missing in {line}");
        }
        for block in blocks(line) {
            let keys: &[&str] = match block["type"].as_str() {
                Some("text") => &["text"],
                Some("tool_use") => &["id", "name", "input"],
                Some("tool_result") => &["tool_use_id", "content"],
                other => panic!("unexpected block {other:?} in {line}"),
            };
            for key in keys {
                assert!(block.get(*key).is_some(), "{key} missing in block {block}");
            }
        }
    }
    let session = &ours[0]["session_id"];
    assert!(ours.iter().all(|l| &l["session_id"] == session));
}

fn result_line(lines: &[Value]) -> &Value {
    let last = lines.last().expect("no output");
    assert_eq!(last["type"], "result", "last line {last}");
    last
}

fn tool_uses(lines: &[Value]) -> Vec<Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "assistant")
        .flat_map(blocks)
        .filter(|b| b["type"] == "tool_use")
        .collect()
}

fn is_uuid_v4(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && text.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
        && parts[2].starts_with('4')
}

#[test]
fn default_run_looks_like_the_write_fixture_and_writes_notes() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "tidy the docs");
    assert!(done.status.success(), "{}", done.stderr);
    let lines = done.lines();
    assert_like_fixture(&lines, "write");
    let init = &lines[0];
    assert_eq!(init["cwd"], dir.path().display().to_string());
    assert_eq!(init["permissionMode"], "acceptEdits");
    assert!(is_uuid_v4(init["session_id"].as_str().unwrap()));
    let uuids: std::collections::HashSet<&str> =
        lines.iter().filter_map(|l| l["uuid"].as_str()).collect();
    assert_eq!(uuids.len(), lines.len(), "every line has its own uuid");

    let writes = tool_uses(&lines);
    let notes = dir.path().join("notes-1.md");
    assert_eq!(writes[0]["name"], "Write");
    assert_eq!(writes[0]["input"]["file_path"], notes.display().to_string());
    assert!(
        std::fs::read_to_string(&notes)
            .unwrap()
            .contains("tidy the docs")
    );

    let result = result_line(&lines);
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["is_error"], false);
    assert_eq!(result["result"], "Done: tidy the docs");
    assert_eq!(result["num_turns"], 2);

    // A follow-up adds a file instead of overwriting the first.
    let again = run(dir.path(), "more");
    assert!(again.status.success());
    assert!(dir.path().join("notes-2.md").exists());
}

#[test]
fn session_ids_resume_and_choose() {
    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), "@sleep=0 one").lines();
    let id = first[0]["session_id"].as_str().unwrap().to_owned();
    let other = run(dir.path(), "@sleep=0 two").lines();
    assert_ne!(other[0]["session_id"], first[0]["session_id"]);

    let mut args = stream_args("@sleep=0 follow up");
    args.extend(["--resume".into(), id.clone()]);
    let resumed = run_in(dir.path(), &args).lines();
    assert!(resumed.iter().all(|l| l["session_id"] == id.as_str()));
    let cost = |lines: &[Value]| result_line(lines)["total_cost_usd"].as_f64().unwrap();
    assert!(cost(&resumed) > cost(&first), "resumed cost is cumulative");
    assert_eq!(shape(&fixture("resume2"))[0], shape(&resumed)[0]);

    let chosen = "11111111-2222-4333-8444-555555555555";
    let mut args = stream_args("@sleep=0 fresh");
    args.extend(["--session-id".into(), chosen.into()]);
    let lines = run_in(dir.path(), &args).lines();
    assert!(lines.iter().all(|l| l["session_id"] == chosen));
}

#[test]
fn stream_json_without_verbose_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-p", "hi", "--output-format", "stream-json"].map(String::from);
    let done = run_in(dir.path(), &args);
    assert_eq!(done.status.code(), Some(1));
    assert!(done.stdout.is_empty());
    assert!(
        done.stderr.contains("requires --verbose"),
        "{}",
        done.stderr
    );
}

#[test]
fn json_and_text_formats_print_only_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["-p", "@sleep=0 hello", "--output-format", "json"].map(String::from);
    let lines = run_in(dir.path(), &args).lines();
    assert_eq!(shape(&lines), shape(&fixture("json")));
    assert_eq!(lines[0]["result"], "Done: hello");

    let args = ["--print", "@sleep=0 hello", "--model", "sonnet"].map(String::from);
    let done = run_in(dir.path(), &args);
    assert_eq!(String::from_utf8(done.stdout).unwrap(), "Done: hello\n");
}

#[test]
fn unknown_flags_and_environment_directives() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = stream_args("say it");
    args.splice(
        0..0,
        ["--bare", "--append-system-prompt", "be brief"].map(String::from),
    );
    let mut cmd = command(dir.path(), &args);
    cmd.env("FAKE_AGENT_DIRECTIVES", "@sleep=0 @text=from_the_env");
    let mut agent = Agent::spawn(cmd);
    let lines = parse_lines(&agent.rest());
    assert!(agent.wait().0.success());
    assert_eq!(result_line(&lines)["result"], "from the env");
}

#[test]
fn bad_directive_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=soon");
    assert_eq!(done.status.code(), Some(2));
    assert!(done.stderr.contains("@sleep"), "{}", done.stderr);
}

#[test]
fn edit_and_bash_look_like_their_fixtures() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @edit=hello.txt");
    assert!(done.status.success());
    assert_like_fixture(&done.lines(), "edit");
    let done = run(dir.path(), "@sleep=0 @bash=echo_hi");
    assert!(done.status.success());
    assert_like_fixture(&done.lines(), "bash");
}

#[test]
fn write_edit_and_bash_tools() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.txt"), "first line\nsecond\n").unwrap();
    let done = run(
        dir.path(),
        "@sleep=0 @write=src/new.rs @edit=old.txt @edit=missing.txt @bash=touch_ran.txt",
    );
    assert!(done.status.success());
    let lines = done.lines();
    let names: Vec<Value> = tool_uses(&lines)
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(names, ["Write", "Edit", "Write", "Edit", "Bash"]);
    assert!(
        std::fs::read_to_string(dir.path().join("src/new.rs"))
            .unwrap()
            .starts_with("Written by fake-agent")
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("old.txt")).unwrap(),
        "first line (edited by fake-agent)\nsecond\n"
    );
    assert!(dir.path().join("missing.txt").exists());
    assert_eq!(tool_uses(&lines)[4]["input"]["command"], "touch ran.txt");
    assert!(
        !dir.path().join("ran.txt").exists(),
        "Bash commands are not run"
    );
    assert!(!dir.path().join("notes-1.md").exists());
}

#[test]
fn fail_is_an_api_error_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @fail anything");
    assert_eq!(done.status.code(), Some(1));
    let lines = done.lines();
    assert_like_fixture(&lines, "error401");
    let result = result_line(&lines);
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["is_error"], true);
    assert_eq!(result["api_error_status"], 401);
    assert!(
        result["result"]
            .as_str()
            .unwrap()
            .contains("API Error: 401")
    );
}

#[test]
fn maxturns_and_the_max_turns_flag() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @maxturns loop");
    assert_eq!(done.status.code(), Some(1));
    let lines = done.lines();
    assert_like_fixture(&lines, "maxturns");
    let result = result_line(&lines);
    assert_eq!(result["subtype"], "error_max_turns");
    assert!(result.get("result").is_none());

    let mut args = stream_args("@sleep=0 @bash=a @bash=b");
    args.extend(["--max-turns".into(), "1".into()]);
    let done = run_in(dir.path(), &args);
    assert_eq!(done.status.code(), Some(1));
    let lines = done.lines();
    assert_eq!(tool_uses(&lines).len(), 1);
    assert_eq!(result_line(&lines)["subtype"], "error_max_turns");
}

#[test]
fn exit_directive_forces_the_status_after_a_normal_result() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @exit=3");
    assert_eq!(done.status.code(), Some(3));
    assert_eq!(result_line(&done.lines())["is_error"], false);
}

#[test]
fn sigint_prints_an_interrupted_result_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@stall wait")));
    let init = agent.wait_for(|l| l["subtype"] == "init");
    agent.signal(Signal::SIGINT);
    let mut lines = vec![init];
    lines.extend(parse_lines(&agent.rest()));
    assert!(agent.wait().0.success());
    let result = result_line(&lines);
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(result["is_error"], true);
    assert_eq!(
        blocks(&lines[1])[0]["text"],
        "[Request interrupted by user]"
    );
}

#[test]
fn sigterm_exits_143_without_a_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@stall wait")));
    let init = agent.wait_for(|l| l["subtype"] == "init");
    agent.signal(Signal::SIGTERM);
    let mut lines = vec![init];
    lines.extend(parse_lines(&agent.rest()));
    assert_eq!(agent.wait().0.code(), Some(143));
    assert_eq!(shape(&lines), shape(&fixture("sigterm")));
}

#[test]
fn ignore_term_survives_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@stall @ignore-term")));
    agent.wait_for(|l| l["subtype"] == "init");
    agent.signal(Signal::SIGTERM);
    let deadline = Instant::now() + WATCHDOG;
    while !agent.signal_delivered(Signal::SIGTERM) {
        assert!(Instant::now() < deadline, "SIGTERM never delivered");
        std::thread::yield_now();
    }
    assert!(matches!(agent.child.try_wait(), Ok(None)), "still running");
    // Still alive and still answering: SIGINT ends it the normal way.
    agent.signal(Signal::SIGINT);
    let lines = parse_lines(&agent.rest());
    assert_eq!(agent.wait().0.code(), Some(0));
    assert_eq!(result_line(&lines)["subtype"], "error_during_execution");
}

#[test]
fn ignore_int_survives_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@stall @ignore-int")));
    agent.wait_for(|l| l["subtype"] == "init");
    agent.signal(Signal::SIGINT);
    let deadline = Instant::now() + WATCHDOG;
    while !agent.signal_delivered(Signal::SIGINT) {
        assert!(Instant::now() < deadline, "SIGINT never delivered");
        std::thread::yield_now();
    }
    agent.signal(Signal::SIGTERM);
    let rest = agent.rest();
    assert_eq!(agent.wait().0.code(), Some(143));
    assert!(rest.is_empty(), "no result after an ignored SIGINT");
}

/// Kills and reaps the grandchild however the test ends.
struct Grandchild(Pid);

impl Drop for Grandchild {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.0, None);
    }
}

fn stat_fields(pid: Pid) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; fields after it are plain.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split_whitespace().map(String::from).collect()
}

#[test]
fn grandchild_lives_in_its_own_session_like_the_sigint_tool_fixture() {
    // Orphans are re-parented to us, so the test can reap the grandchild it leaves.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@grandchild @stall")));
    let mut lines = vec![agent.wait_for(|l| l["subtype"] == "init")];
    lines.push(agent.wait_for(|l| l["type"] == "assistant"));
    lines.push(agent.wait_for(|l| l["subtype"] == "task_started"));
    let pid_text = std::fs::read_to_string(dir.path().join("grandchild.pid")).unwrap();
    let grandchild = Grandchild(Pid::from_raw(pid_text.trim().parse().unwrap()));
    let command = tool_uses(&lines)[0]["input"]["command"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(command.contains("--sleep-forever"), "{command}");

    // stat fields after the name: state, ppid, pgrp, session, …
    let theirs = stat_fields(grandchild.0);
    let agents = stat_fields(agent.pid());
    assert_eq!(theirs[3], grandchild.0.to_string(), "leads its own session");
    assert_ne!(theirs[3], agents[3]);
    assert_ne!(theirs[2], agents[2], "not in the agent's process group");

    agent.signal(Signal::SIGINT);
    lines.extend(parse_lines(&agent.rest()));
    assert!(agent.wait().0.success());
    assert_like_fixture(&lines, "sigint-tool");
    assert_eq!(result_line(&lines)["terminal_reason"], "aborted_tools");

    // The agent is gone; its grandchild is not (walkie has to sweep it).
    let state = &stat_fields(grandchild.0)[0];
    assert_ne!(state, "Z", "grandchild outlives the agent");
    assert_eq!(stat_fields(grandchild.0)[1], std::process::id().to_string());
}

#[test]
fn flood_writes_exactly_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * 1024 * 1024;
    let done = run(dir.path(), "@sleep=0 @flood=2M");
    assert!(done.status.success());
    let text = String::from_utf8(done.stdout).unwrap();
    let all: Vec<&str> = text.lines().collect();
    // Everything between the init line and the final assistant text is flood.
    let flood = &all[1..all.len() - 2];
    let bytes: usize = flood.iter().map(|l| l.len() + 1).sum();
    assert_eq!(bytes, size);
    for line in flood {
        let value: Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["type"], "assistant");
        let block_len = blocks(&value)[0]["text"].as_str().unwrap().len();
        assert!(block_len <= 4096, "text blocks of at most 4 KB");
    }
    assert!(flood.len() > size / 4096, "many paragraph-sized lines");
    assert_eq!(
        result_line(&parse_lines(text.as_bytes()))["is_error"],
        false
    );
}

#[test]
fn paced_flood_without_size_runs_until_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(command(dir.path(), &stream_args("@flood-rate=200K")));
    agent.wait_for(|l| l["subtype"] == "init");
    for _ in 0..3 {
        agent.wait_for(|l| l["type"] == "assistant");
    }
    agent.signal(Signal::SIGINT);
    let lines = parse_lines(&agent.rest());
    assert!(agent.wait().0.success());
    assert_eq!(result_line(&lines)["subtype"], "error_during_execution");
}

#[test]
fn oversize_is_one_line_of_the_given_size() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @oversize=1M");
    assert!(done.status.success());
    let text = String::from_utf8(done.stdout).unwrap();
    let big: Vec<&str> = text.lines().filter(|l| l.len() > 100_000).collect();
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].len() + 1, 1024 * 1024);
    let value: Value = serde_json::from_str(big[0]).unwrap();
    assert_eq!(value["type"], "assistant");
    assert_eq!(
        result_line(&parse_lines(text.as_bytes()))["subtype"],
        "success"
    );
}

#[test]
fn env_prints_the_whole_environment_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(dir.path(), &stream_args("@sleep=0 @env"));
    cmd.env_clear()
        .env("ZED", "last")
        .env("ALPHA", "first")
        .env("MIDDLE", "a=b");
    let mut agent = Agent::spawn(cmd);
    let lines = parse_lines(&agent.rest());
    assert!(agent.wait().0.success());
    let expected = "ALPHA=first\nMIDDLE=a=b\nZED=last";
    assert_eq!(result_line(&lines)["result"], expected);
    let texts: Vec<Value> = lines
        .iter()
        .filter(|l| l["type"] == "assistant")
        .flat_map(blocks)
        .map(|b| b["text"].clone())
        .collect();
    assert!(texts.contains(&Value::from(expected)));
}

#[test]
fn malformed_lines_come_before_the_normal_output() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @malformed");
    assert!(done.status.success());
    let raw: Vec<&[u8]> = done.stdout.split(|b| *b == b'\n').collect();
    assert!(
        std::str::from_utf8(&done.stdout).is_err(),
        "holds invalid UTF-8"
    );
    let parsed: Vec<Option<Value>> = raw
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).ok())
        .collect();
    let not_json = parsed.iter().filter(|p| p.is_none()).count();
    assert!(not_json >= 3, "garbage, truncated, invalid UTF-8");
    let values: Vec<&Value> = parsed.iter().flatten().collect();
    assert!(values.iter().any(|v| **v == serde_json::json!([])));
    assert!(values.iter().any(|v| **v == serde_json::json!({})));
    assert!(values.iter().any(|v| v["type"] == 5));
    assert!(
        values.iter().any(|v| v["status"] == "split-line"),
        "the split line is whole"
    );
    let init = values.iter().position(|v| v["subtype"] == "init").unwrap();
    assert!(init >= 4, "the bad lines come first");
    assert_eq!(values.last().unwrap()["subtype"], "success");
}

#[test]
fn plain_prints_no_json() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @plain do things");
    assert!(done.status.success());
    let text = String::from_utf8(done.stdout).unwrap();
    assert!(!text.is_empty());
    for line in text.lines() {
        assert!(serde_json::from_str::<Value>(line).is_err(), "{line}");
    }
    assert!(text.contains("Done: do things"));
}

#[test]
fn secret_text_stderr_and_pidfile() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(
        dir.path(),
        "@sleep=0 @secret @stderr=warning_here @pidfile=agent.pid",
    );
    assert!(done.status.success());
    let result = result_line(&done.lines())["result"]
        .as_str()
        .unwrap()
        .to_owned();
    for secret in [
        "sk-proj-",
        "ghp_",
        "https://bob:hunter2@example.com",
        "DB_PASSWORD=",
    ] {
        assert!(result.contains(secret), "{secret} in {result}");
    }
    assert!(done.stderr.contains("warning here"));
    let pid: u32 = std::fs::read_to_string(dir.path().join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid > 0);

    let done = run(dir.path(), "@sleep=0 @text=All_good");
    assert_eq!(result_line(&done.lines())["result"], "All good");
}

#[test]
fn partial_messages_add_stream_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = stream_args("@sleep=0 @text=Hello_from_the_fake_Anthropic_server.");
    args.push("--include-partial-messages".into());
    let lines = run_in(dir.path(), &args).lines();
    let real = fixture("partial");
    let kinds: BTreeMap<String, usize> = lines.iter().fold(BTreeMap::new(), |mut m, l| {
        *m.entry(kind(l)).or_default() += 1;
        m
    });
    for line in &real {
        assert!(kinds.contains_key(&kind(line)), "{} missing", kind(line));
    }
    let streamed: String = lines
        .iter()
        .rev()
        .skip_while(|l| l["type"] != "assistant")
        .take_while(|l| l["type"] != "user")
        .filter_map(|l| l["event"]["delta"]["text"].as_str())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(streamed, "Hello from the fake Anthropic server.");
}

// ---- Kept open on stdin (`--input-format stream-json`) ------------------------------------

/// The flags walkie passes for the kept-open protocol (the protocol core's own list).
fn walkie_duplex_args() -> Vec<String> {
    walkie::tasks::claude::agent_args("acceptEdits")
}

/// The flags the kept-open fixtures were captured with: no replays. `mode` is theirs
/// (`default`; `acceptEdits` for perm-write-allow).
fn fixture_duplex_args(mode: &str) -> Vec<String> {
    [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-prompt-tool",
        "stdio",
        "--permission-mode",
        mode,
    ]
    .map(String::from)
    .to_vec()
}

/// A fake agent with stdin kept open; every line it prints is kept in `seen`.
struct Session {
    agent: Agent,
    stdin: Option<ChildStdin>,
    seen: Vec<Value>,
}

impl Session {
    fn spawn(dir: &Path, args: &[String], session_state: bool) -> Session {
        let mut cmd = command(dir, args);
        cmd.stdin(Stdio::piped());
        if session_state {
            let (name, value) = walkie::tasks::claude::SESSION_STATE_ENV;
            cmd.env(name, value);
        } else {
            cmd.env_remove(walkie::tasks::claude::SESSION_STATE_ENV.0);
        }
        let mut agent = Agent::spawn(cmd);
        let stdin = agent.child.stdin.take();
        Session {
            agent,
            stdin,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, line: Value) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn user(&mut self, text: &str) {
        self.send(json!({"type": "user", "message": {"role": "user", "content": text}}));
    }

    fn user_with_uuid(&mut self, text: &str, uuid: &str) {
        self.send(
            json!({"type": "user", "message": {"role": "user", "content": text},
                         "uuid": uuid}),
        );
    }

    fn interrupt(&mut self, request_id: &str) {
        self.send(json!({"type": "control_request", "request_id": request_id,
                         "request": {"subtype": "interrupt"}}));
    }

    fn answer(&mut self, request_id: &str, response: Value) {
        self.send(
            json!({"type": "control_response", "response": {"subtype": "success",
                         "request_id": request_id, "response": response}}),
        );
    }

    /// Reads until a line satisfies `wanted`; returns it.
    fn wait_for(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = self.agent.next_line().expect("output ended first");
            let value: Value = serde_json::from_slice(&line)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&line)));
            self.seen.push(value.clone());
            if wanted(&value) {
                return value;
            }
        }
    }

    /// The next `result` line.
    fn result(&mut self) -> Value {
        self.wait_for(|l| l["type"] == "result")
    }

    /// Closes stdin, reads to the end; returns every line, the exit status and stderr.
    fn finish(mut self) -> (Vec<Value>, ExitStatus, String) {
        self.stdin = None;
        let rest = self.agent.rest();
        self.seen.extend(parse_lines(&rest));
        let (status, stderr) = self.agent.wait();
        (self.seen, status, stderr)
    }
}

/// The kinds walkie reads, in order: partial `stream_event`s, `system/status`,
/// `command_lifecycle` and the aborted text of a stream cut short are left out (the fake
/// streams no text while it stalls).
fn kept_open_shape(lines: &[Value]) -> Vec<String> {
    let kept: Vec<Value> = lines
        .iter()
        .filter(|l| {
            !matches!(
                l["type"].as_str(),
                Some("stream_event" | "command_lifecycle")
            ) && l["subtype"] != "status"
                && l["aborted"] != true
        })
        .cloned()
        .collect();
    shape(&kept)
}

/// Same kinds in the same order as the kept-open fixture, and the keys walkie reads.
fn assert_like_kept_open(ours: &[Value], fixture_name: &str) {
    let real = fixture(fixture_name);
    assert_eq!(
        kept_open_shape(ours),
        kept_open_shape(&real),
        "line types vs fixture {fixture_name}"
    );
    for line in real.iter().chain(ours) {
        let keys: &[&str] = match kind(line).as_str() {
            "control_request" => &["type", "request_id", "request"],
            "control_cancel_request" => &["type", "request_id"],
            "control_response" => &["type", "response"],
            other => required_keys(other),
        };
        for key in keys {
            assert!(line.get(*key).is_some(), "{key} missing in {line}");
        }
    }
    let session = &ours[0]["session_id"];
    assert!(
        ours.iter()
            .all(|l| l.get("session_id").is_none() || &l["session_id"] == session)
    );
}

fn control_requests(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "control_request")
        .collect()
}

fn results(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["type"] == "result").collect()
}

#[test]
fn kept_open_steer_is_taken_in_at_the_tool_boundary() {
    // The progress run, with walkie's flags: replays carry our uuids, the steering message
    // is replayed (taken in) only after the running step's result, one result in all.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), true);
    let first = "00000000-0000-4000-8000-000000000001";
    let second = "00000000-0000-4000-8000-000000000002";
    s.user_with_uuid(
        "Please loop @tool-ms=1500 @bash=timeout_2_tail_-f_/dev/null",
        first,
    );
    let replay = s.wait_for(|l| l["isReplay"] == true);
    assert_eq!(replay["uuid"], first);
    s.wait_for(|l| l["type"] == "assistant");
    s.user_with_uuid("WALKIE_STOP: stop looping now and summarise.", second);
    s.wait_for(|l| l["type"] == "command_lifecycle" && l["command_uuid"] == second);
    let result = s.result();
    let (lines, status, stderr) = s.finish();
    assert!(status.success(), "{stderr}");
    assert_like_kept_open(&lines, "progress");

    let at = |wanted: &dyn Fn(&Value) -> bool| lines.iter().position(wanted).unwrap();
    let tool_result =
        at(&|l| l["type"] == "user" && blocks(l).iter().any(|b| b["type"] == "tool_result"));
    let taken = at(&|l| l["isReplay"] == true && l["uuid"] == second);
    assert!(tool_result < taken, "taken in at the boundary");
    assert_eq!(
        lines[taken]["message"]["content"],
        "WALKIE_STOP: stop looping now and summarise."
    );
    assert_eq!(results(&lines).len(), 1);
    assert!(
        result["result"]
            .as_str()
            .unwrap()
            .contains("The user sent a new message while you were working: WALKIE_STOP"),
        "{result}"
    );
    let states: Vec<&Value> = lines
        .iter()
        .filter(|l| l["subtype"] == "session_state_changed")
        .map(|l| &l["state"])
        .collect();
    assert_eq!(states, ["running", "idle"]);
    let lifecycle: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["type"] == "command_lifecycle")
        .map(|l| {
            (
                l["command_uuid"].as_str().unwrap(),
                l["state"].as_str().unwrap(),
            )
        })
        .collect();
    for uuid in [first, second] {
        for state in ["queued", "started", "completed"] {
            assert!(
                lifecycle.contains(&(uuid, state)),
                "{uuid} {state}: {lifecycle:?}"
            );
        }
    }
}

#[test]
fn kept_open_steer_during_a_long_step_like_the_steer_fixture() {
    // A step over 3 s: task_started and task_notification around it, as in the capture.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user("Please loop with bash until I tell you to stop. @tool-ms=3200 @bash=timeout_3_tail_-f_/dev/null");
    s.wait_for(|l| l["type"] == "assistant");
    s.user("WALKIE_STOP: stop looping now and summarise.");
    s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "steer");
    let notification = lines
        .iter()
        .find(|l| l["subtype"] == "task_notification")
        .unwrap();
    assert_eq!(notification["status"], "completed");
}

#[test]
fn kept_open_steer_adds_its_tools_to_the_turn() {
    // "And also do X": the tools of a message taken in mid-turn join the turn.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    s.user("fix it @tool-ms=500 @bash=cargo_test");
    s.wait_for(|l| l["type"] == "assistant");
    s.user("and also update the notes @write=NOTES.md");
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    let names: Vec<Value> = tool_uses(&lines)
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(names, ["Bash", "Write"]);
    assert!(dir.path().join("NOTES.md").exists());
    assert_eq!(results(&lines).len(), 1);
    assert!(
        result["result"]
            .as_str()
            .unwrap()
            .ends_with("while you were working: and also update the notes"),
        "{result}"
    );
}

#[test]
fn kept_open_priority_now_ends_the_turn_at_the_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user("Please loop @tool-ms=3200 @bash=timeout_3_tail_-f_/dev/null");
    s.wait_for(|l| l["type"] == "assistant");
    s.send(json!({"type": "user", "message": {"role": "user",
        "content": "WALKIE_STOP: stop looping now and summarise."}, "priority": "now"}));
    let first = s.result();
    let second = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "steer-now");
    assert_eq!(first["terminal_reason"], "aborted_tools");
    assert_eq!(first["result"], "");
    assert_eq!(first["is_error"], false);
    assert!(
        second["result"]
            .as_str()
            .unwrap()
            .contains("Done: WALKIE_STOP"),
        "{second}"
    );
}

#[test]
fn kept_open_message_while_thinking_is_the_next_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user("first question @sleep=1 @text=first_answer");
    s.wait_for(|l| l["subtype"] == "init");
    s.user("second question, sent while the first answer streams @sleep=0 @text=second_answer");
    let first = s.result();
    let second = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "steer-queued-text");
    assert_eq!(first["result"], "first answer");
    assert_eq!(second["result"], "second answer");
    assert_eq!(second["result_index"], 1);
    assert_eq!(first["session_id"], second["session_id"]);
}

#[test]
fn kept_open_interrupt_mid_tool_keeps_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user("sleep a while @tool-ms=60000 @bash=timeout_120_tail_-f_/dev/null");
    s.wait_for(|l| l["subtype"] == "task_started");
    let pid = s.agent.child.id();
    s.interrupt("r1");
    let response = s.wait_for(|l| l["type"] == "control_response");
    let interrupted = s.result();
    s.user("are you still there? @text=Done_sleeping.");
    let answered = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success(), "the last turn succeeded");
    assert_like_kept_open(&lines, "interrupt-tool");
    let real = fixture("interrupt-tool");
    let real_response = real
        .iter()
        .find(|l| l["type"] == "control_response")
        .unwrap();
    assert_eq!(response, *real_response);
    for key in ["subtype", "is_error", "terminal_reason"] {
        let real_result = real.iter().find(|l| l["type"] == "result").unwrap();
        assert_eq!(interrupted[key], real_result[key], "{key}");
    }
    assert!(interrupted.get("result").is_none());
    let stopped = lines
        .iter()
        .flat_map(blocks)
        .find(|b| b["type"] == "tool_result")
        .unwrap();
    assert_eq!(stopped["is_error"], true);
    assert!(
        stopped["content"]
            .as_str()
            .unwrap()
            .contains("stopped while running")
    );
    assert_eq!(answered["result"], "Done sleeping.");
    // One process served both turns.
    assert!(lines.iter().filter(|l| l["subtype"] == "init").all(|l| {
        l["messaging_socket_path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{pid}.sock"))
    }));
}

#[test]
fn kept_open_interrupt_while_thinking_and_while_idle() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user("tell me a long story @stall");
    s.wait_for(|l| l["subtype"] == "init");
    s.interrupt("int-1");
    let result = s.result();
    s.interrupt("int-idle");
    let idle = s
        .wait_for(|l| l["type"] == "control_response" && l["response"]["request_id"] == "int-idle");
    let (lines, status, _) = s.finish();
    assert_like_kept_open(&lines, "interrupt-stream");
    assert_eq!(result["terminal_reason"], "aborted_streaming");
    assert_eq!(result["is_error"], true);
    assert_eq!(idle["response"]["subtype"], "success");
    assert_eq!(
        status.code(),
        Some(1),
        "the exit status follows the last turn, as in the capture"
    );
}

/// The first `can_use_tool` request, after checking its keys against the fixture's.
fn permission_request(s: &mut Session, fixture_name: &str) -> Value {
    let request = s.wait_for(|l| l["type"] == "control_request");
    let real = fixture(fixture_name);
    let real_request = real
        .iter()
        .find(|l| l["type"] == "control_request")
        .unwrap();
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.retain(|k| k != "blocked_path");
        keys.sort();
        keys
    };
    assert_eq!(keys(&request["request"]), keys(&real_request["request"]));
    assert_eq!(request["request"]["subtype"], "can_use_tool");
    request
}

const BASH_TXT: &str = "@ask=echo_hi_from_bash_>_bash.txt_&&_cat_bash.txt write bash.txt with bash";

#[test]
fn kept_open_permission_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user(BASH_TXT);
    let request = permission_request(&mut s, "perm-allow");
    let asked = &request["request"];
    assert_eq!(asked["tool_name"], "Bash");
    assert_eq!(
        asked["input"]["command"],
        "echo hi from bash > bash.txt && cat bash.txt"
    );
    let tool_use = tool_uses(&s.seen).pop().unwrap();
    assert_eq!(asked["tool_use_id"], tool_use["id"]);
    assert_eq!(
        asked["permission_suggestions"][0]["rules"][0]["ruleContent"],
        "echo hi *"
    );
    let id = request["request_id"].as_str().unwrap().to_owned();
    s.answer(
        &id,
        json!({"behavior": "allow", "updatedInput": asked["input"]}),
    );
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "perm-allow");
    assert_eq!(result["permission_denials"], json!([]));
    let tool_result = lines
        .iter()
        .flat_map(blocks)
        .find(|b| b["type"] == "tool_result")
        .unwrap();
    assert_eq!(tool_result["is_error"], false);
}

#[test]
fn kept_open_permission_denied_with_a_message_the_agent_sees() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user(BASH_TXT);
    let request = permission_request(&mut s, "perm-deny");
    let id = request["request_id"].as_str().unwrap().to_owned();
    s.answer(
        &id,
        json!({"behavior": "deny", "message": "The user said no by voice."}),
    );
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "perm-deny");
    let tool_result = lines
        .iter()
        .flat_map(blocks)
        .find(|b| b["type"] == "tool_result")
        .unwrap();
    assert_eq!(tool_result["is_error"], true);
    assert_eq!(tool_result["content"], "The user said no by voice.");
    assert_eq!(
        result["is_error"], false,
        "the turn goes on without the tool"
    );
    assert_eq!(result["permission_denials"][0]["tool_name"], "Bash");
    assert_eq!(
        result["permission_denials"][0]["tool_use_id"],
        request["request"]["tool_use_id"]
    );
}

#[test]
fn kept_open_permission_denied_with_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user(BASH_TXT);
    let request = permission_request(&mut s, "perm-deny-interrupt");
    let id = request["request_id"].as_str().unwrap().to_owned();
    s.answer(
        &id,
        json!({"behavior": "deny", "message": "Stop everything.", "interrupt": true}),
    );
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert_like_kept_open(&lines, "perm-deny-interrupt");
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(result["terminal_reason"], "aborted_tools");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn kept_open_unanswered_request_is_withdrawn_by_an_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("default"), false);
    s.user(BASH_TXT);
    let request = permission_request(&mut s, "perm-unanswered");
    s.interrupt("int-perm");
    let cancel = s.wait_for(|l| l["type"] == "control_cancel_request");
    assert_eq!(cancel["request_id"], request["request_id"]);
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert_like_kept_open(&lines, "perm-unanswered");
    assert_eq!(result["terminal_reason"], "aborted_tools");
    assert_eq!(result["permission_denials"].as_array().unwrap().len(), 1);
    assert_eq!(status.code(), Some(1));
}

#[test]
fn kept_open_write_outside_the_project_asks_and_writes_once_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("outside.txt");
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("acceptEdits"), false);
    s.user(&format!("write outside @ask-write={}", target.display()));
    let request = permission_request(&mut s, "perm-write-allow");
    let asked = &request["request"];
    assert_eq!(asked["tool_name"], "Write");
    assert_eq!(asked["input"]["file_path"], target.display().to_string());
    assert_eq!(
        asked["decision_reason"],
        "Path is outside allowed working directories"
    );
    assert!(!target.exists(), "nothing written before the answer");
    let id = request["request_id"].as_str().unwrap().to_owned();
    let mut input = asked["input"].clone();
    input["content"] = json!("outside\n");
    s.answer(&id, json!({"behavior": "allow", "updatedInput": input}));
    s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_like_kept_open(&lines, "perm-write-allow");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "outside\n",
        "the updated input is used"
    );
}

#[test]
fn kept_open_always_adds_the_suggested_rule() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    s.user("@ask=npm_test @ask=npm_test_--_--watch=false @ask=rm_-rf_build");
    let request = s.wait_for(|l| l["type"] == "control_request");
    let id = request["request_id"].as_str().unwrap().to_owned();
    let suggestions = request["request"]["permission_suggestions"].clone();
    s.answer(
        &id,
        json!({"behavior": "allow", "updatedInput": request["request"]["input"],
                         "updatedPermissions": suggestions}),
    );
    // The second npm command matches "npm test *"; rm does not, so it is asked about.
    let next = s.wait_for(|l| l["type"] == "control_request");
    assert_eq!(next["request"]["input"]["command"], "rm -rf build");
    let id = next["request_id"].as_str().unwrap().to_owned();
    s.answer(&id, json!({"behavior": "allow"}));
    s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert_eq!(control_requests(&lines).len(), 2);
    assert_eq!(tool_uses(&lines).len(), 3);
}

#[test]
fn kept_open_request_withdrawn_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), true);
    s.user("@withdraw=200 @ask=make_deploy");
    let request = s.wait_for(|l| l["type"] == "control_request");
    let cancel = s.wait_for(|l| l["type"] == "control_cancel_request");
    assert_eq!(cancel["request_id"], request["request_id"]);
    // A late answer is not for anything pending any more: ignored.
    let id = request["request_id"].as_str().unwrap().to_owned();
    s.answer(&id, json!({"behavior": "allow"}));
    let result = s.result();
    let (_, status, stderr) = s.finish();
    assert!(status.success());
    assert_eq!(
        result["is_error"], false,
        "the turn goes on without the tool"
    );
    assert_eq!(result["permission_denials"].as_array().unwrap().len(), 1);
    assert!(stderr.contains("no pending request"), "{stderr}");
}

#[test]
fn kept_open_without_the_prompt_tool_approvals_are_refused() {
    // What walkie's old default does to a Bash command needing approval (issue 10).
    let dir = tempfile::tempdir().unwrap();
    let mut args = fixture_duplex_args("acceptEdits");
    args.drain(6..8); // no --permission-prompt-tool
    let mut s = Session::spawn(dir.path(), &args, false);
    s.user("@ask=python3_-m_pytest_-q");
    let result = s.result();
    let (lines, status, _) = s.finish();
    assert!(status.success());
    assert!(control_requests(&lines).is_empty());
    let refused = lines
        .iter()
        .flat_map(blocks)
        .find(|b| b["type"] == "tool_result")
        .unwrap();
    assert_eq!(refused["content"], "This command requires approval");
    assert_eq!(result["permission_denials"].as_array().unwrap().len(), 1);

    // bypassPermissions runs it without asking.
    let mut s = Session::spawn(dir.path(), &fixture_duplex_args("bypassPermissions"), false);
    s.user("@ask=python3_-m_pytest_-q");
    let result = s.result();
    let (lines, _, _) = s.finish();
    assert!(control_requests(&lines).is_empty());
    assert_eq!(result["permission_denials"], json!([]));
}

#[test]
fn kept_open_control_requests_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    // One the supervisor does not handle: walkie must answer it with an error.
    s.user("@control=hook_callback go");
    let request = s.wait_for(|l| l["type"] == "control_request");
    assert_eq!(request["request"]["subtype"], "hook_callback");
    let id = request["request_id"].as_str().unwrap().to_owned();
    s.send(
        json!({"type": "control_response", "response": {"subtype": "error",
                  "request_id": id, "error": "walkie does not handle it"}}),
    );
    s.result();
    // One the fake does not handle: answered with an error, never left hanging.
    s.send(json!({"type": "control_request", "request_id": "m1",
                  "request": {"subtype": "set_model", "model": "x"}}));
    let answer = s.wait_for(|l| l["type"] == "control_response");
    assert_eq!(answer["response"]["subtype"], "error");
    assert_eq!(answer["response"]["request_id"], "m1");
    // Garbage on stdin is skipped.
    s.stdin
        .as_mut()
        .unwrap()
        .write_all(b"not json\n{\"type\":\"mystery\"}\n")
        .unwrap();
    s.user("@text=still_here");
    assert_eq!(s.result()["result"], "still here");
    let (_, status, stderr) = s.finish();
    assert!(status.success());
    assert!(
        stderr.contains("hook_callback answered") && stderr.contains("walkie does not handle it"),
        "{stderr}"
    );
    assert!(stderr.contains("unreadable stdin line"), "{stderr}");
}

#[test]
fn kept_open_eof_finishes_what_is_queued_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    s.user("one @sleep=0.3 @text=first");
    s.user("two @sleep=0 @text=second @exit=3");
    s.wait_for(|l| l["subtype"] == "init");
    let (lines, status, _) = s.finish(); // closes stdin mid-turn
    let texts: Vec<&Value> = results(&lines).iter().map(|r| &r["result"]).collect();
    assert_eq!(texts, ["first", "second"]);
    assert_eq!(status.code(), Some(3), "the last turn's @exit");

    // No message at all: the CLI's error.
    let s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    let (lines, status, stderr) = s.finish();
    assert!(lines.is_empty());
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("Input must be provided"), "{stderr}");

    // A bad directive is a usage error, as in one-shot mode.
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    s.user("@sleep=soon");
    let (_, status, stderr) = s.finish();
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("@sleep"), "{stderr}");
}

#[test]
fn kept_open_needs_stream_json_output() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "text",
    ]
    .map(String::from);
    let s = Session::spawn(dir.path(), &args, false);
    let (lines, status, stderr) = s.finish();
    assert!(lines.is_empty());
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("requires output-format=stream-json"),
        "{stderr}"
    );
}

#[test]
fn kept_open_sigint_ends_the_turn_and_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::spawn(dir.path(), &walkie_duplex_args(), false);
    s.user("@tool-ms=60000 @bash=make");
    s.wait_for(|l| l["type"] == "assistant");
    s.agent.signal(Signal::SIGINT);
    let result = s.result();
    let (_, status, _) = s.finish();
    assert_eq!(result["terminal_reason"], "aborted_tools");
    assert!(status.success(), "SIGINT exits 0, as in one-shot mode");
}

#[test]
fn one_shot_approvals_are_refused_and_tool_time_is_interruptible() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(dir.path(), "@sleep=0 @ask=npm_test");
    assert!(done.status.success());
    let lines = done.lines();
    let refused = lines
        .iter()
        .flat_map(blocks)
        .find(|b| b["type"] == "tool_result")
        .unwrap();
    assert_eq!(refused["content"], "This command requires approval");
    assert_eq!(refused["is_error"], true);

    let mut agent = Agent::spawn(command(
        dir.path(),
        &stream_args("@tool-ms=60000 @bash=make"),
    ));
    let mut lines = vec![agent.wait_for(|l| l["subtype"] == "init")];
    lines.push(agent.wait_for(|l| l["type"] == "assistant"));
    agent.signal(Signal::SIGINT);
    lines.extend(parse_lines(&agent.rest()));
    assert!(agent.wait().0.success());
    assert_eq!(result_line(&lines)["terminal_reason"], "aborted_tools");
}

/// walkie's protocol core on one side of real pipes, the fake agent on the other: what the
/// core writes is what the agent understands, and the core follows what the agent says.
struct Driven {
    session: Session,
    core: walkie::tasks::claude::ClaudeSession,
    parser: walkie::tasks::stream::StreamParser,
    events: Vec<walkie::tasks::claude::SessionEvent>,
}

impl Driven {
    fn start(dir: &Path, prompt: &str) -> Driven {
        let session = Session::spawn(dir, &walkie_duplex_args(), true);
        let core = walkie::tasks::claude::ClaudeSession::new(
            prompt,
            &dir.display().to_string(),
            Duration::from_secs(600),
            fastrand::u64(..),
            Instant::now(),
        );
        let mut driven = Driven {
            session,
            core,
            parser: walkie::tasks::stream::StreamParser::new(),
            events: Vec::new(),
        };
        driven.flush();
        driven
    }

    /// Writes what the core has for the agent's stdin.
    fn flush(&mut self) {
        let pending = self.core.stdin_pending().to_vec();
        let stdin = self.session.stdin.as_mut().unwrap();
        stdin.write_all(&pending).unwrap();
        stdin.flush().unwrap();
        self.core.stdin_written(pending.len());
    }

    /// Feeds agent lines to the core until it reports an event matching `wanted`.
    fn until(&mut self, wanted: impl Fn(&walkie::tasks::claude::SessionEvent) -> bool) {
        loop {
            if let Some(at) = self.events.iter().position(&wanted) {
                self.events.drain(..=at);
                return;
            }
            self.feed_line();
        }
    }

    /// Feeds agent lines to the core until its activity starts with `words`.
    fn until_doing(&mut self, words: &str) {
        while !self.core.activity("").what.starts_with(words) {
            self.feed_line();
        }
    }

    fn feed_line(&mut self) {
        let line = self.session.agent.next_line().expect("output ended first");
        let mut parsed = Vec::new();
        self.parser.feed(&line, &mut parsed);
        for event in &parsed {
            self.core.handle_event(Instant::now(), event);
        }
        self.events
            .extend(std::iter::from_fn(|| self.core.poll_event()));
        self.flush(); // automatic answers (errors to unhandled requests)
    }
}

#[test]
fn protocol_core_drives_the_fake_agent() {
    use walkie::tasks::claude::{Decision, MessageStatus, SessionEvent};
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driven::start(
        dir.path(),
        "fix the tests @tool-ms=400 @bash=cargo_test @ask=npm_test",
    );
    let prompt = d.core.prompt_uuid().unwrap().to_owned();
    d.until(|e| matches!(e, SessionEvent::MessageTakenIn { uuid } if *uuid == prompt));
    d.until_doing("running `cargo test`");

    // Steering while the Bash step runs: taken in at its end.
    let steer = d
        .core
        .send_message("also check the docs", false, Instant::now())
        .unwrap();
    d.flush();
    d.until(|e| matches!(e, SessionEvent::MessageTakenIn { uuid } if *uuid == steer));
    assert_eq!(d.core.message_status(&steer), Some(MessageStatus::TakenIn));

    // The approval: asked, then allowed through the core's own answer line.
    d.until(|e| matches!(e, SessionEvent::PermissionRequested { .. }));
    let pending = d.core.pending_permissions()[0].clone();
    assert_eq!(
        (pending.verb, pending.object.as_str()),
        ("run", "`npm test`")
    );
    assert_eq!(
        d.core.activity("").what,
        "waiting for your approval to run `npm test`"
    );
    d.core
        .answer(&pending.request_id, Decision::Allow, Instant::now())
        .unwrap();
    d.flush();
    d.until(|e| matches!(e, SessionEvent::TurnEnded { idle: true, .. }));
    assert_eq!(d.core.activity("").what, "waiting for a follow-up");
    assert!(
        d.core
            .activity("")
            .last_sentence
            .unwrap()
            .contains("also check the docs")
    );

    // A follow-up in the same process, interrupted mid-step; then one more turn.
    d.core
        .send_message(
            "run the slow suite @tool-ms=60000 @bash=make_slow",
            false,
            Instant::now(),
        )
        .unwrap();
    d.flush();
    d.until(|e| matches!(e, SessionEvent::MessageTakenIn { .. }));
    d.until_doing("running `make slow`");
    let held = d
        .core
        .send_message(
            "stop, do the quick one @text=quick_done",
            true,
            Instant::now(),
        )
        .unwrap();
    d.flush();
    d.until(|e| matches!(e, SessionEvent::InterruptAnswered { error: None }));
    d.until(|e| {
        matches!(e, SessionEvent::TurnEnded { result, idle: false } if result.subtype == "error_during_execution")
    });
    d.flush(); // the held message goes after the interrupted turn's result
    d.until(|e| matches!(e, SessionEvent::MessageTakenIn { uuid } if *uuid == held));
    d.until(|e| matches!(e, SessionEvent::TurnEnded { result, idle: true } if result.text.as_deref() == Some("quick done")));
    assert_eq!(d.core.turns(), 3);

    // A control request walkie does not handle is answered (the agent goes on), then close.
    d.core
        .send_message("@control=hook_callback go", false, Instant::now())
        .unwrap();
    d.flush();
    d.until(|e| matches!(e, SessionEvent::Refused { subtype, .. } if subtype == "hook_callback"));
    d.until(|e| matches!(e, SessionEvent::TurnEnded { idle: true, .. }));
    d.core.close();
    assert!(d.core.wants_stdin_closed());
    let (_, status, stderr) = d.session.finish();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("walkie does not handle"), "{stderr}");
}
