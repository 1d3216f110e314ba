//! The task engine through the real binary: `walkie run` + `walkie ctl` + the fake agent.

mod common;

use std::time::Duration;

use std::os::unix::process::CommandExt;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

#[test]
fn start_finish_result() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&[
        "--name",
        "Flaky Test",
        "fix the flaky test @write=src/fix.rs @edit=README.md @sleep=0.3",
    ]);
    assert_eq!(name, "flaky-test");
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["exit_code"], 0);
    assert!(t["pid"].is_null());
    assert!(t["ended_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        t["session_id"].as_str().is_some_and(|s| s.len() >= 32),
        "{t}"
    );
    let files: Vec<&str> = t["files_changed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f.as_str())
        .collect();
    assert!(files.iter().any(|f| f.ends_with("src/fix.rs")), "{files:?}");
    assert!(files.iter().any(|f| f.ends_with("README.md")), "{files:?}");
    // The agent really ran in the task's scratch directory.
    let cwd = w.task_cwd(&name);
    assert!(cwd.starts_with(w.path("data/walkie/scratch")), "{cwd:?}");
    assert!(cwd.join("src/fix.rs").exists());
    let result = w.ctl_json(&["result", "flaky"]);
    assert_eq!(result["name"], "flaky-test");
    assert!(
        result["summary"]
            .as_str()
            .unwrap()
            .contains("fix the flaky test"),
        "{result}"
    );
    let (code, out, _) = w.ctl(&["result", "flaky-test"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("succeeded") && out.contains("src/fix.rs"),
        "{out}"
    );
    let (code, logs, _) = w.ctl(&["logs", "flaky-test"]);
    assert_eq!(code, 0);
    assert!(logs.contains("[tool] Write"), "{logs}");
    // The on-disk output exists and the state file records the task.
    assert!(
        w.path("state/walkie/tasks/flaky-test/stdout.jsonl")
            .exists()
    );
    // The state writer runs on its own thread: wait for its save of the finished task.
    let state = w.wait_state_json("the finished task", |s| {
        s["tasks"][0]["state"] == "succeeded"
    });
    assert_eq!(state["tasks"][0]["name"], "flaky-test");
}

#[test]
fn failures_and_plain_output_are_reported() {
    let mut w = Walkie::new();
    w.start();
    let failed = w.start_task(&["--name", "bad", "@fail"]);
    let plain = w.start_task(&["--name", "plain", "@plain"]);
    let garbage = w.start_task(&["--name", "garbage", "@garbage=64K"]);
    let t = w.wait_finished(&failed, T);
    assert_eq!(t["state"], "failed", "{t}");
    assert_eq!(t["exit_code"], 1);
    // The summary says why; the state is said beside it everywhere, so it is not repeated
    // ("failed: failed: …", "interrupted: interrupted: …" before).
    let summary = t["summary"].as_str().unwrap();
    assert!(
        summary.contains("401") && !summary.starts_with("failed"),
        "{t}"
    );
    // An agent started for stream-json that prints no result line did not finish its work,
    // whatever its exit status: plain text, or random bytes, and exit 0.
    for name in [&plain, &garbage] {
        let t = w.wait_finished(name, T);
        assert_eq!(t["state"], "failed", "{t}");
        assert_eq!(t["exit_code"], 0, "{t}");
        assert_eq!(
            t["summary"], "no result from the agent (it exited with code 0).",
            "{t}"
        );
    }
    // The same plain agent started for plain text succeeds on its exit status.
    w.write_config(
        &w.default_config("")
            .replace(r#""stream-json", "--verbose""#, r#""text""#),
    );
    w.signal(Signal::SIGHUP);
    assert!(wait_until(T, || w.log().contains("configuration reloaded")));
    let plain = w.start_task(&["--name", "plain text", "@plain"]);
    let t = w.wait_finished(&plain, T);
    assert_eq!(t["state"], "succeeded", "{t}");
    // An agent that is not there is a clear error, not a crash.
    w.write_config(
        &w.default_config("")
            .replace(FAKE_AGENT, "/nonexistent/agent"),
    );
    w.signal(Signal::SIGHUP);
    assert!(wait_until(T, || w
        .log()
        .matches("configuration reloaded")
        .count()
        == 2));
    let (code, _, err) = w.ctl(&["start", "anything"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("could not start the agent") && err.contains("/nonexistent/agent"),
        "{err}"
    );
    assert_eq!(w.ctl_json(&["status"])["tasks"]["running"], 0);
}

#[test]
fn five_concurrent_tasks_keep_their_own_results() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 5"));
    w.start();
    let sleeps = [0.9, 0.2, 0.6, 0.1, 0.4];
    let names: Vec<String> = sleeps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            w.start_task(&[
                "--name",
                &format!("job {i}"),
                &format!("@sleep={s} @text=answer_number_{i} @write=f{i}.txt"),
            ])
        })
        .collect();
    for (i, name) in names.iter().enumerate() {
        let t = w.wait_finished(name, T);
        assert_eq!(t["state"], "succeeded");
        assert_eq!(
            t["summary"].as_str().unwrap().trim_end_matches('.'),
            format!("answer number {i}"),
            "{t}"
        );
        let files = t["files_changed"].to_string();
        assert!(
            files.contains(&format!("f{i}.txt"))
                && !files.contains(&format!("f{}.txt", (i + 1) % 5)),
            "{files}"
        );
    }
    // Every completion was announced as an event and in the log, once each.
    for name in &names {
        assert_eq!(
            w.log().matches(&format!("task {name} succeeded")).count(),
            1,
            "{name}"
        );
    }
}

#[test]
fn the_running_limit_rejects_and_names_the_running_tasks() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 2"));
    w.start();
    w.start_task(&["--name", "one", "@stall"]);
    w.start_task(&["--name", "two", "@stall"]);
    let (code, _, err) = w.ctl(&["start", "--name", "three", "@stall"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("one") && err.contains("two") && err.contains("already running"),
        "{err}"
    );
    assert!(
        w.tasks().iter().all(|t| t["name"] != "three"),
        "no hidden queue"
    );
    w.ctl(&["cancel", "one"]);
    w.wait_finished("one", T);
    w.start_task(&["--name", "three", "@sleep=0"]);
}

#[test]
fn cancel_reaches_an_agent_that_ignores_signals_and_its_escaped_grandchild() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&[
        "--name",
        "stubborn",
        "@grandchild @ignore-term @ignore-int @stall",
    ]);
    let cwd = w.task_cwd(&name);
    assert!(wait_until(T, || cwd.join("grandchild.pid").exists()));
    let grandchild = read_pid(&cwd.join("grandchild.pid")).unwrap();
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    assert!(alive(grandchild) && alive(agent));
    // The agent leads its own process group; the grandchild escaped into its own session.
    let stat = |pid: i32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<i32> = s
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .skip(1)
            .take(3)
            .map(|x| x.parse().unwrap())
            .collect();
        (f[1], f[2]) // (pgid, sid)
    };
    assert_eq!(stat(agent).0, agent);
    assert_eq!(stat(grandchild).1, grandchild);
    let (code, out, err) = w.ctl(&["cancel", "stubborn"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelling stubborn"));
    // Still running during the grace: cancelled is reported only when everything is gone.
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "cancelled", "{t}");
    assert!(!alive(agent), "agent {agent} survived");
    assert!(!alive(grandchild), "grandchild {grandchild} survived");
    let id = t["id"].as_str().unwrap().to_string();
    assert!(processes_with_env(&format!("WALKIE_TASK={id}")).is_empty());
    assert!(zombies_of(w.pid()).is_empty());
    // A cancel of a finished task is refused clearly.
    let (code, _, err) = w.ctl(&["cancel", "stubborn"]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
}

#[test]
fn cancel_of_a_cooperative_agent_uses_sigint() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "polite", "@stall"]);
    assert!(wait_until(T, || w.task(&name)["session_id"].is_string()));
    w.ctl(&["cancel", "polite"]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "cancelled");
    // The fake CLI answers SIGINT like the real one: a result line and exit 0.
    assert_eq!(t["exit_code"], 0, "{t}");
}

#[test]
fn sigterm_of_the_daemon_stops_every_task_and_leaves_a_valid_state_file() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 3"));
    w.start();
    let a = w.start_task(&["--name", "alpha", "@stall @grandchild"]);
    let _b = w.start_task(&["--name", "beta", "@stall @ignore-term @ignore-int"]);
    let cwd = w.task_cwd(&a);
    assert!(wait_until(T, || cwd.join("grandchild.pid").exists()));
    let grandchild = read_pid(&cwd.join("grandchild.pid")).unwrap();
    // From walkie itself: its state file may not have both tasks yet.
    let ids: Vec<String> = w
        .tasks()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0), "{}", w.log());
    assert!(!alive(grandchild));
    for id in &ids {
        assert!(
            processes_with_env(&format!("WALKIE_TASK={id}")).is_empty(),
            "task {id} left processes"
        );
    }
    let state = w.state_json();
    for t in state["tasks"].as_array().unwrap() {
        assert_eq!(t["state"], "interrupted", "{t}");
        assert!(t["pid"].is_null());
    }
    assert!(!w.socket().exists(), "control socket removed");
}

#[test]
fn after_sigkill_a_restart_marks_tasks_interrupted_and_stops_the_orphans() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&[
        "--name",
        "orphan maker",
        "@stall @grandchild @ignore-term @ignore-int",
    ]);
    let cwd = w.task_cwd(&name);
    assert!(wait_until(T, || cwd.join("grandchild.pid").exists()));
    let grandchild = read_pid(&cwd.join("grandchild.pid")).unwrap();
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    // What the restart reads: the task's save, made on walkie's writer thread.
    w.wait_state_json("the running task", |s| {
        s["tasks"][0]["name"] == name.as_str() && s["tasks"][0]["state"] == "running"
    });
    w.signal(Signal::SIGKILL);
    w.wait_exit(T);
    // The agent ignores the SIGTERM of its parent-death signal; both live on, orphaned.
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(grandchild));
    w.start();
    let t = w.task(&name);
    assert_eq!(t["state"], "interrupted", "{t}");
    assert!(
        wait_until(T, || !alive(grandchild) && !alive(agent)),
        "orphans left: agent {} grandchild {}",
        alive(agent),
        alive(grandchild)
    );
    assert!(w.log().contains("marked interrupted"));
    // The restarted daemon works normally.
    let n = w.start_task(&["after restart @sleep=0"]);
    assert_eq!(w.wait_finished(&n, T)["state"], "succeeded");
}

#[test]
fn no_zombie_after_200_short_tasks() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 32"));
    w.start();
    let mut started = 0;
    while started < 200 {
        let running = w.ctl_json(&["status"])["tasks"]["running"]
            .as_u64()
            .unwrap();
        if running >= 24 {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        w.start_task(&["--name", "quick", "@sleep=0 @grandchild"]);
        started += 1;
    }
    assert!(wait_until(Duration::from_secs(120), || w
        .ctl_json(&["status"])["tasks"]["running"]
        == 0));
    let st = w.ctl_json(&["status"]);
    assert!(st["tasks"]["finished"].as_u64().unwrap() >= 100, "{st}");
    assert!(
        wait_until(Duration::from_secs(5), || zombies_of(w.pid()).is_empty()),
        "zombies: {:?}",
        zombies_of(w.pid())
    );
    let names: std::collections::HashSet<String> = w
        .tasks()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), w.tasks().len(), "names are unique");
    assert!(names.contains("quick-2"));
    // Every task was reported finished only once its escaped grandchild was gone: not one
    // process carrying a task marker of this walkie is left.
    assert_eq!(marked_processes(&w), Vec::<i32>::new());
}

#[test]
fn a_flooding_agent_does_not_starve_the_control_socket_or_grow_memory() {
    let mut w = Walkie::new();
    w.start();
    let before = rss_kib(w.pid());
    let name = w.start_task(&["--name", "flood", "@flood=50M"]);
    let mut peak = before;
    let mut answered = 0;
    while w.task(&name)["state"] == "running" {
        let t0 = std::time::Instant::now();
        let st = w.ctl_json(&["status"]);
        // (0 once the flood has just ended between the two requests.)
        assert!(st["tasks"]["running"].as_u64().unwrap() <= 1, "{st}");
        // Generous: this is about starvation (seconds), not speed (rt-bench measures that).
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "status took {:?}",
            t0.elapsed()
        );
        answered += 1;
        peak = peak.max(rss_kib(w.pid()));
    }
    let t = w.task(&name);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert!(
        answered >= 2,
        "the flood finished before status could be asked twice"
    );
    assert!(
        peak < before + 32 * 1024,
        "RSS grew from {before} KiB to {peak} KiB"
    );
    // Output on disk is capped (4 MiB per file, rotated once).
    let dir = w.path("state/walkie/tasks/flood");
    let total: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(total <= 6 * 4 * 1024 * 1024, "{total} bytes on disk");
    let (_, logs, _) = w.ctl(&["logs", "flood"]);
    assert!(
        logs.len() <= 70 * 1024,
        "logs are a bounded tail: {}",
        logs.len()
    );
}

#[test]
fn agents_flooding_together_share_the_loop_and_every_byte_is_read() {
    // Together they print more than one iteration of the loop may read (a pipe left with
    // data waits its turn): one that never got its turn back would fill its pipe, block
    // in its write and never finish.
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 6"));
    w.start();
    let names: Vec<String> = (0..6)
        .map(|i| w.start_task(&["--name", &format!("flood{i}"), "@flood=3M"]))
        .collect();
    for name in &names {
        let t = w.wait_finished(name, T);
        assert_eq!(t["state"], "succeeded", "{t}");
    }
    let st = w.ctl_json(&["status"]);
    assert_eq!(st["tasks"]["running"], 0, "{st}");
}

/// The nice value in `/proc/PID/stat` (the 19th field).
fn nice_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(16).unwrap().parse().unwrap()
}

#[test]
fn agents_run_ten_nice_levels_below_walkie() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "busy", "@stall"]);
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    assert_eq!(nice_of(agent), (nice_of(w.pid()) + 10).min(19));
    w.ctl(&["cancel", &name]);
    assert_eq!(w.wait_finished(&name, T)["state"], "cancelled");
}

#[test]
fn agents_get_only_the_allowed_environment() {
    let mut w = Walkie::new();
    w.extra_env.insert(
        "OPENAI_API_KEY".into(),
        "sk-proj-shouldneverleak0123456789".into(),
    );
    w.extra_env.insert("PASSED_VAR".into(), "yes".into());
    w.extra_env.insert("SECRET_OTHER".into(), "no".into());
    let cfg = w.default_config(
        r#"env_pass = ["PATH", "HOME", "PASSED_VAR", "OPENAI_API_KEY"]
env_set = { CLAUDE_CODE_MAX_RETRIES = "3", SET_VAR = "set" }"#,
    );
    w.write_config(&cfg);
    // The configuration itself refuses to pass the key.
    let out = w.run_cmd(&["config", "check", w.config_path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY"));
    w.write_config(&cfg.replace(", \"OPENAI_API_KEY\"]", "]"));
    w.start();
    let name = w.start_task(&["--name", "env", "@env"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    let (_, logs, _) = w.ctl(&["logs", "env"]);
    assert!(logs.contains("PASSED_VAR=yes"), "{logs}");
    assert!(
        logs.contains("SET_VAR=set") && logs.contains("CLAUDE_CODE_MAX_RETRIES=3"),
        "{logs}"
    );
    assert!(!logs.contains("SECRET_OTHER"), "{logs}");
    assert!(
        !logs.contains("OPENAI_API_KEY") && !logs.contains("shouldneverleak"),
        "{logs}"
    );
    assert!(!logs.contains("XDG_STATE_HOME"), "{logs}");
    let tmpdir = logs
        .lines()
        .find_map(|l| l.strip_prefix("TMPDIR="))
        .expect("TMPDIR set");
    assert!(
        tmpdir.starts_with(w.path("runtime").to_str().unwrap()),
        "{tmpdir}"
    );
    assert!(logs.contains("WALKIE_TASK="));
}

#[test]
fn secrets_never_reach_the_summary_or_the_result() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "leaky", "@secret"]);
    let t = w.wait_finished(&name, T);
    let text = format!(
        "{} {}",
        t["summary"],
        w.ctl_json(&["result", "leaky"])["result_text"]
    );
    for secret in ["sk-proj-", "ghp_", "hunter2", "DB_PASSWORD=s"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert!(text.contains("[redacted]"), "{text}");
}

#[test]
fn continue_resumes_the_same_session_in_the_same_directory() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "story", "@write=one.txt"]);
    let first = w.wait_finished(&name, T);
    let (code, out, err) = w.ctl(&["continue", "story", "now", "add", "@write=two.txt"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "started story");
    let second = w.wait_finished(&name, T);
    assert_eq!(second["state"], "succeeded");
    assert_eq!(second["session_id"], first["session_id"]);
    assert_eq!(second["cwd"], first["cwd"]);
    assert_eq!(second["prompt"], "now add @write=two.txt");
    let files = second["files_changed"].to_string();
    assert!(
        files.contains("one.txt") && files.contains("two.txt"),
        "{files}"
    );
    assert_eq!(w.tasks().len(), 1);
    // Refused while running, and for an unknown name.
    w.ctl(&["continue", "story", "@stall"]);
    let (code, _, err) = w.ctl(&["continue", "story", "again"]);
    assert_eq!(code, 1);
    assert!(err.contains("still running"), "{err}");
    let (code, _, err) = w.ctl(&["continue", "nosuch", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("no task matches"), "{err}");
}

#[test]
fn references_resolve_by_prefix_and_words_and_ambiguity_lists_candidates() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 4"));
    w.start();
    w.start_task(&["--name", "flaky test", "@stall"]);
    w.start_task(&["--name", "flaky build", "@stall"]);
    let (code, _, err) = w.ctl(&["cancel", "flaky"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("flaky-build") && err.contains("flaky-test"),
        "{err}"
    );
    let reply = w.raw_request(b"{\"cmd\":\"cancel\",\"name\":\"flaky\"}\n");
    assert_eq!(reply["ok"], false);
    assert_eq!(
        reply["candidates"],
        serde_json::json!(["flaky-build", "flaky-test"])
    );
    let (code, out, _) = w.ctl(&["cancel", "build"]);
    assert_eq!(code, 0);
    assert!(out.contains("flaky-build"));
    let (code, out, _) = w.ctl(&["cancel", "flaky-t"]);
    assert_eq!(code, 0);
    assert!(out.contains("flaky-test"));
}

#[test]
fn projects_set_the_working_directory() {
    let mut w = Walkie::new();
    let proj = w.path("home/code/webapp");
    std::fs::create_dir_all(&proj).unwrap();
    w.write_config(&format!(
        "{}\n[projects]\nwebapp = \"~/code/webapp\"\ngone = \"/nonexistent/dir\"\n",
        w.default_config("")
    ));
    w.start();
    let name = w.start_task(&["--project", "webapp", "--name", "p", "@write=hello.txt"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    assert!(proj.join("hello.txt").exists());
    assert_eq!(w.task(&name)["project"], "webapp");
    let (code, _, err) = w.ctl(&["start", "--project", "nope", "x"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown project") && err.contains("webapp"),
        "{err}"
    );
    let (code, _, err) = w.ctl(&["start", "--project", "gone", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn logs_follow_streams_until_the_task_ends() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&[
        "--name",
        "talker",
        "@sleep=1.5 @bash=make_test @text=all_done",
    ]);
    let out = w.run_cmd(&["ctl", "logs", &name, "--follow"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(text.contains("[tool] Bash"), "{text}");
    assert!(text.contains("all done"), "{text}");
    assert!(
        text.trim_end().ends_with("[task talker: succeeded]"),
        "{text}"
    );
}

#[test]
fn events_stream_shows_completions() {
    use std::io::BufRead;
    let mut w = Walkie::new();
    w.start();
    let mut child = w
        .command(&["ctl", "events", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // The first line confirms the subscription: nothing after it can be missed.
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["subscribed"], "events", "{first}");
    let name = w.start_task(&["--name", "evented", "@sleep=0.2 @text=it_worked"]);
    let started: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        started["event"],
        serde_json::json!({"kind": "started", "task": name})
    );
    let finished: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(finished["event"]["kind"], "finished");
    assert_eq!(finished["event"]["state"], "succeeded");
    assert_eq!(
        finished["event"]["summary"]
            .as_str()
            .unwrap()
            .trim_end_matches('.'),
        "it worked"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn malformed_and_oversized_agent_output_is_survived() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&[
        "--name",
        "messy",
        "@malformed @oversize=1M @text=still_fine",
    ]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(
        t["summary"].as_str().unwrap().trim_end_matches('.'),
        "still fine"
    );
    let (_, logs, _) = w.ctl(&["logs", "messy"]);
    assert!(logs.contains("[walkie: dropped an oversized"), "{logs}");
    assert!(logs.contains("[walkie: unreadable line"), "{logs}");
    assert_eq!(w.ctl_json(&["status"])["tasks"]["finished"], 1);
}

#[test]
fn an_agent_dies_with_walkie_through_its_parent_death_signal() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "loyal", "@stall"]);
    assert!(wait_until(T, || w.task(&name)["session_id"].is_string()));
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    w.signal(Signal::SIGKILL);
    w.wait_exit(T);
    // No restart needed: PR_SET_PDEATHSIG delivered SIGTERM when walkie died.
    assert!(
        wait_until(Duration::from_secs(5), || !alive(agent)),
        "agent {agent} outlived walkie"
    );
}

#[test]
fn a_reused_pid_in_the_state_file_is_never_touched() {
    let mut w = Walkie::new();
    // A stranger now holds the pid the state file names; its start time differs. It leads
    // its own process group, as the agent did: a killpg without the start-time check
    // would hit it.
    let mut stranger = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = stranger.id();
    assert_eq!(
        pgid_sid(pid as i32).0,
        pid as i32,
        "the stranger leads its group"
    );
    let state = serde_json::json!({"version": 1, "tasks": [{
        "name": "old", "id": "00000000deadbeef", "state": "running", "project": null,
        "cwd": "/", "prompt": "x", "pid": pid, "pid_start_time": 1,
        "started_at": "2026-01-01T00:00:00Z", "ended_at": null, "exit_code": null,
        "summary": null, "session_id": null, "files_changed": []
    }], "transcript": []});
    std::fs::create_dir_all(w.path("state/walkie")).unwrap();
    std::fs::write(w.state_file(), state.to_string()).unwrap();
    w.start();
    assert_eq!(w.task("old")["state"], "interrupted");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(pid as i32),
        "walkie killed a process that only shares the pid"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

/// (pgid, sid) of a process.
fn pgid_sid(pid: i32) -> (i32, i32) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<i32> = s
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|x| x.parse().unwrap())
        .collect();
    (f[1], f[2])
}

/// Live processes carrying a task marker of this walkie (any task: pruned ones included),
/// told apart from other walkies' by their TMPDIR in this walkie's runtime directory.
fn marked_processes(w: &Walkie) -> Vec<i32> {
    let tmp = format!("TMPDIR={}", w.path("runtime").display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let marked = vars.iter().any(|v| v.starts_with(b"WALKIE_TASK="));
        let ours = vars.iter().any(|v| v.starts_with(tmp.as_bytes()));
        if marked && ours && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// Subscribes to `ctl events`; the first line (the subscription) is read already.
fn events(w: &Walkie) -> (std::process::Child, impl Iterator<Item = serde_json::Value>) {
    use std::io::BufRead;
    let mut child = w
        .command(&["ctl", "events", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).unwrap());
    let first = lines.next().unwrap();
    assert_eq!(first["subscribed"], "events", "{first}");
    (child, lines)
}

/// The config for a containment: `auto` (a cgroup per task here, as root) or `scan`.
fn with_containment(w: &Walkie, mode: &str, extra: &str) -> String {
    w.default_config(&format!("containment = \"{mode}\"\n{extra}"))
}

#[test]
fn a_cooperative_agents_escaped_grandchild_is_gone_when_the_task_is_reported_finished() {
    for mode in ["auto", "scan"] {
        let mut w = Walkie::new();
        w.write_config(&with_containment(&w, mode, ""));
        w.start();
        let (mut sub, mut lines) = events(&w);
        // The agent starts a process in its own session, then exits 0 at once.
        let name = w.start_task(&["--name", "tidy", "@grandchild @sleep=0.3"]);
        let cwd = w.task_cwd(&name);
        let started = lines.next().unwrap();
        assert_eq!(started["event"]["kind"], "started", "{started}");
        let finished = lines.next().unwrap();
        // Right at the announcement: nothing of the task may be left.
        let grandchild = read_pid(&cwd.join("grandchild.pid")).expect("grandchild started");
        let left = marked_processes(&w);
        assert_eq!(finished["event"]["kind"], "finished", "{finished}");
        assert_eq!(finished["event"]["state"], "succeeded", "{finished}");
        assert!(
            !alive(grandchild),
            "{mode}: grandchild {grandchild} outlived its task"
        );
        assert_eq!(left, Vec::<i32>::new(), "{mode}");
        assert_eq!(
            w.ctl_json(&["status"])["containment"]["kind"],
            if mode == "scan" || !cgroups_usable() {
                "scan"
            } else {
                "cgroup"
            }
        );
        let _ = sub.kill();
        let _ = sub.wait();
    }
}

#[test]
fn the_scan_fallback_stops_an_agent_that_ignores_signals_and_its_escaped_grandchild() {
    let mut w = Walkie::new();
    w.write_config(&with_containment(&w, "scan", ""));
    w.start();
    let st = w.ctl_json(&["status"]);
    assert_eq!(
        st["containment"],
        serde_json::json!({"kind": "scan", "reason": "agent.containment is \"scan\""})
    );
    let name = w.start_task(&[
        "--name",
        "stubborn",
        "@grandchild @ignore-term @ignore-int @stall",
    ]);
    let cwd = w.task_cwd(&name);
    assert!(wait_until(T, || cwd.join("grandchild.pid").exists()));
    let grandchild = read_pid(&cwd.join("grandchild.pid")).unwrap();
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    w.ctl(&["cancel", "stubborn"]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "cancelled", "{t}");
    assert!(!alive(agent) && !alive(grandchild));
    assert_eq!(marked_processes(&w), Vec::<i32>::new());
    assert!(zombies_of(w.pid()).is_empty());
}

/// Whether this machine lets walkie create cgroups: a cgroup2 mount and write access to
/// the cgroup this test runs in (root, or a delegated systemd unit).
fn cgroups_usable() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(mount) = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2").then(|| left.split_whitespace().nth(4))?
    }) else {
        return false;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(own) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return false;
    };
    let dir = std::path::Path::new(mount).join(own.trim().trim_start_matches('/'));
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Starts walkie under umask 000 (`sh` sets it, then becomes walkie).
fn start_under_umask_000(w: &mut Walkie) {
    let log = std::fs::File::create(w.log_file()).unwrap();
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", "umask 000 && exec \"$0\" run", WALKIE])
        .env_clear()
        .envs(w.env())
        .current_dir(w.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    w.child = Some(child);
    assert!(
        wait_until(T, || std::os::unix::net::UnixStream::connect(w.socket())
            .is_ok()),
        "{}",
        w.log()
    );
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn under_umask_000_task_logs_and_directories_are_private() {
    let mut w = Walkie::new();
    start_under_umask_000(&mut w);
    let name = w.start_task(&["--name", "private", "@stderr=hello @write=note.txt @stall"]);
    let dir = w.path("state/walkie/tasks/private");
    let files = ["log.txt", "stdout.jsonl", "stderr.log"];
    assert!(
        wait_until(T, || files.iter().all(|f| dir.join(f).is_file())),
        "{:?}",
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    let id = w.task(&name)["id"].as_str().unwrap().to_string();
    let cwd = w.task_cwd(&name);
    // The umask really is 000: what the agent itself creates is open to all.
    assert!(wait_until(T, || cwd.join("note.txt").exists()));
    assert_eq!(mode_of(&cwd.join("note.txt")), 0o666);
    for f in files {
        assert_eq!(mode_of(&dir.join(f)), 0o600, "{f}");
    }
    for d in [
        dir.clone(),
        w.path("state/walkie/tasks"),
        cwd,
        w.path("data/walkie/scratch"),
        w.path(&format!("runtime/walkie/tmp/{id}")),
        w.path("runtime/walkie/tmp"),
    ] {
        assert_eq!(mode_of(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode_of(&w.path("state/walkie/walkie.lock")), 0o600);
    w.ctl(&["cancel", "private"]);
    w.wait_finished(&name, T);
    // The run's TMPDIR goes with it (on the writer thread).
    assert!(wait_until(T, || !w
        .path(&format!("runtime/walkie/tmp/{id}"))
        .exists()));
}

/// One thread of another process held in a ptrace stop (the others run on): a disk that
/// does not answer, for the thread that writes to it.
struct Stalled(nix::unistd::Pid);

impl Stalled {
    fn thread(pid: i32, name: &str) -> Stalled {
        let find = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .ok()?
                .flatten()
                .find(|t| {
                    std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
                })
                .and_then(|t| t.file_name().to_str()?.parse::<i32>().ok())
        };
        // The socket answers before the task engine (and its threads) is built.
        let mut tid = None;
        assert!(
            wait_until(T, || {
                tid = find();
                tid.is_some()
            }),
            "no thread {name} in walkie {pid}"
        );
        let tid = tid.unwrap();
        let tid = nix::unistd::Pid::from_raw(tid);
        nix::sys::ptrace::seize(tid, nix::sys::ptrace::Options::empty())
            .unwrap_or_else(|e| panic!("cannot ptrace walkie's {name} thread: {e}"));
        nix::sys::ptrace::interrupt(tid).unwrap();
        nix::sys::wait::waitpid(tid, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
        Stalled(tid)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        let _ = nix::sys::ptrace::detach(self.0, None);
    }
}

#[test]
fn a_disk_that_cannot_keep_up_costs_dropped_log_bytes_never_the_loop() {
    let mut w = Walkie::new();
    w.start();
    let before = rss_kib(w.pid());
    // The writer thread is idle (waiting for work, its queue lock free) when it stops.
    let stalled = Stalled::thread(w.pid(), "walkie-writer");
    let name = w.start_task(&["--name", "flood", "@flood=12M @stall"]);
    let mut reply = serde_json::Value::Null;
    let dropped = |reply: &serde_json::Value| reply["dropped_bytes"].as_u64().unwrap_or(0);
    // The loop keeps answering; the log bytes the disk cannot take are counted, and said.
    assert!(
        wait_until(T, || {
            reply = w.raw_request(b"{\"cmd\":\"logs\",\"name\":\"flood\"}\n");
            dropped(&reply) > 8 * 1024 * 1024
        }),
        "{}",
        reply["dropped_bytes"]
    );
    assert_eq!(reply["state"], "running");
    let text = reply["text"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "[walkie: {} bytes of agent output were not written",
            dropped(&reply)
        )),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    let (code, out, _) = w.ctl(&["logs", "flood"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("the disk did not keep up"),
        "{}",
        &out[out.len().saturating_sub(300)..]
    );
    assert_eq!(w.ctl_json(&["status"])["tasks"]["running"], 1);
    // Queued bytes are bounded: memory did not take what the disk could not.
    assert!(
        rss_kib(w.pid()) < before + 24 * 1024,
        "RSS grew from {before} KiB to {} KiB",
        rss_kib(w.pid())
    );
    drop(stalled);
    w.ctl(&["cancel", "flood"]);
    w.wait_finished(&name, T);
    // After the run, its log file says it too (read back through the writer).
    let (_, out, _) = w.ctl(&["logs", "flood"]);
    assert!(
        out.contains("bytes of agent output were not written to the log files"),
        "{}",
        &out[out.len().saturating_sub(400)..]
    );
    let on_disk: u64 = ["stdout.jsonl", "stdout.jsonl.1"]
        .iter()
        .filter_map(|f| std::fs::metadata(w.path("state/walkie/tasks/flood").join(f)).ok())
        .map(|m| m.len())
        .sum();
    assert!(on_disk < 12 * 1024 * 1024, "{on_disk} bytes of stdout kept");
}

#[test]
fn tasks_run_in_a_cgroup_of_their_own_where_walkie_can_create_cgroups() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("memory_max = \"256M\""));
    w.start();
    let c = w.ctl_json(&["status"])["containment"].clone();
    if !cgroups_usable() {
        eprintln!(
            "walkie cannot create cgroups here ({}): cgroup containment is not tested, the scan is",
            c["reason"]
        );
        assert_eq!(c["kind"], "scan", "{c}");
        return;
    }
    assert_eq!(c["kind"], "cgroup", "{c}");
    let base = std::path::PathBuf::from(c["path"].as_str().unwrap());
    assert!(base.is_dir(), "{c}");
    let name = w.start_task(&["--name", "boxed", "@grandchild @stall"]);
    let cwd = w.task_cwd(&name);
    assert!(wait_until(T, || cwd.join("grandchild.pid").exists()));
    let grandchild = read_pid(&cwd.join("grandchild.pid")).unwrap();
    let t = w.task(&name);
    let agent = t["pid"].as_i64().unwrap() as i32;
    let dir = base.join(format!("task-{}", t["id"].as_str().unwrap()));
    let procs: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // The agent and the process that escaped into its own session are both members;
    // walkie is not.
    assert!(
        procs.contains(&agent) && procs.contains(&grandchild),
        "{procs:?}"
    );
    assert!(!procs.contains(&w.pid()));
    let events = std::fs::read_to_string(dir.join("cgroup.events")).unwrap();
    assert!(events.contains("populated 1"), "{events}");
    let memory = std::fs::read_to_string(base.join("cgroup.controllers"))
        .unwrap_or_default()
        .split_whitespace()
        .any(|c| c == "memory");
    if memory {
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max"))
                .unwrap()
                .trim(),
            (256u64 << 20).to_string()
        );
    } else {
        eprintln!(
            "the memory controller is not available in {}: memory.max is not tested here",
            base.display()
        );
        assert!(
            c["reason"]
                .as_str()
                .unwrap()
                .contains("agent.memory_max cannot apply"),
            "{c}"
        );
        assert!(w.log().contains("agent.memory_max is not applied"));
    }
    w.ctl(&["cancel", "boxed"]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "cancelled");
    assert!(!alive(agent) && !alive(grandchild));
    // The emptied cgroup goes (on the membership thread).
    assert!(wait_until(T, || !dir.exists()), "{} left", dir.display());
    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0));
    // walkie shared its cgroup (as under a test runner): the subtree it made goes too.
    if base
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("walkie-")
    {
        assert!(!base.exists(), "{} left", base.display());
    }
}

#[test]
fn an_agent_killed_for_memory_fails_with_out_of_memory() {
    let mut w = Walkie::new();
    let config = w.default_config("memory_max = \"64M\"").replace(
        &format!("command = [\"{FAKE_AGENT}\", \"-p\", \"{{prompt}}\", \"--output-format\", \"stream-json\", \"--verbose\"]"),
        "command = [\"python3\", \"-c\", \"import time; x = bytearray(512 << 20); time.sleep(5)\", \"{prompt}\"]",
    );
    w.write_config(&config);
    w.start();
    let c = w.ctl_json(&["status"])["containment"].clone();
    let reason = c["reason"].as_str().unwrap_or("");
    if c["kind"] != "cgroup" || reason.contains("agent.memory_max cannot apply") {
        eprintln!(
            "memory.max is not available here ({reason}): the out-of-memory outcome is covered by the lifecycle's unit test only"
        );
        return;
    }
    let name = w.start_task(&["--name", "hungry", "allocate"]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(
        t["summary"].as_str().unwrap().contains("out of memory"),
        "{t}"
    );
}

#[test]
fn doctor_says_which_containment_and_why() {
    let mut w = Walkie::new();
    let line = |w: &Walkie| {
        let out = w.run_cmd(&["doctor"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.contains("containment:"))
            .unwrap_or_else(|| panic!("no containment line:\n{text}"))
            .to_string()
    };
    // No daemon: what one started now would get, found without creating anything.
    let before = line(&w);
    if cgroups_usable() {
        assert!(before.contains("a cgroup per task in "), "{before}");
    } else {
        assert!(before.contains("/proc scan"), "{before}");
    }
    w.write_config(&with_containment(&w, "scan", "memory_max = \"1G\""));
    let scan = line(&w);
    assert!(
        scan.contains("/proc scan") && scan.contains("agent.containment is \"scan\""),
        "{scan}"
    );
    assert!(scan.contains("agent.memory_max will not apply"), "{scan}");
    // A running daemon is asked, and its reason told.
    w.write_config(&w.default_config(""));
    w.start();
    let running = line(&w);
    let status = w.ctl_json(&["status"])["containment"].clone();
    assert!(running.contains("(the running daemon)"), "{running}");
    assert!(
        running.contains(status["reason"].as_str().unwrap()),
        "{running} / {status}"
    );
}

#[test]
fn a_cgroup_subtree_removed_under_walkie_is_made_again() {
    if !cgroups_usable() {
        eprintln!("walkie cannot create cgroups here: nothing to remove");
        return;
    }
    let mut w = Walkie::new();
    w.start();
    let base = std::path::PathBuf::from(
        w.ctl_json(&["status"])["containment"]["path"]
            .as_str()
            .unwrap(),
    );
    if !base
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("walkie-")
    {
        return; // walkie owns its cgroup (a unit): it cannot be removed under it
    }
    std::fs::remove_dir(&base).unwrap();
    let name = w.start_task(&["@sleep=0"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    assert!(base.is_dir());
}

/// Starts an agent whose first instruction reads its own `/proc/self/cgroup` (a shell
/// redirection, before it runs anything else) and returns the unified-hierarchy line it
/// printed, with the task's id.
fn cgroup_seen_by_the_agent_at_its_start(w: &Walkie) -> (String, String) {
    let name = w.start_task(&["--name", "where", "anything"]);
    let t = w.wait_finished(&name, T);
    assert_eq!(t["state"], "succeeded", "{t}");
    let (_, logs, _) = w.ctl(&["logs", &name]);
    let line = logs
        .lines()
        .find_map(|l| l.strip_prefix("cg 0::"))
        .unwrap_or_else(|| panic!("no cgroup line in:\n{logs}"))
        .to_string();
    (line, t["id"].as_str().unwrap().to_string())
}

fn cgroup_printing_agent(w: &Walkie) -> String {
    w.default_config("")
        .replace(
            &format!(r#"["{FAKE_AGENT}", "-p", "{{prompt}}", "--output-format", "stream-json", "--verbose"]"#),
            r#"["/bin/sh", "-c", "while read -r l; do echo \"cg $l\"; done < /proc/self/cgroup", "sh", "{prompt}"]"#,
        )
}

#[test]
fn an_agent_is_in_its_task_cgroup_from_its_first_instruction() {
    if !cgroups_usable() {
        eprintln!("walkie cannot create cgroups here: nothing to check");
        return;
    }
    let mut w = Walkie::new();
    w.write_config(&cgroup_printing_agent(&w));
    w.start();
    let (seen, id) = cgroup_seen_by_the_agent_at_its_start(&w);
    assert!(seen.ends_with(&format!("/task-{id}")), "{seen}");
    // Started there by clone3, not moved there by a write to cgroup.procs.
    let log = w.log();
    assert!(
        log.contains("agents start by clone3, inside their task cgroup (CLONE_INTO_CGROUP)"),
        "{log}"
    );
    assert!(!log.contains("refused clone3"), "{log}");
}

/// A seccomp filter answering clone3 with ENOSYS, as a kernel before 5.3 (or Docker's
/// default profile) does; everything else is allowed. For `pre_exec`: nothing allocated.
fn deny_clone3() -> std::io::Result<()> {
    const fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    static FILTER: [libc::sock_filter; 4] = [
        // The syscall number (seccomp_data.nr, offset 0).
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_clone3 as u32,
        },
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: FILTER.len() as u16,
        filter: FILTER.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with a valid, static filter program.
    let rc = unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            -1
        } else {
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog)
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn where_clone3_is_refused_the_agent_joins_its_task_cgroup_before_exec() {
    if !cgroups_usable() {
        eprintln!("walkie cannot create cgroups here: nothing to check");
        return;
    }
    let mut w = Walkie::new();
    w.write_config(&cgroup_printing_agent(&w));
    let mut cmd = w.command(&["run"]);
    // SAFETY: deny_clone3 only makes prctl calls on static data.
    unsafe { std::os::unix::process::CommandExt::pre_exec(&mut cmd, deny_clone3) };
    w.start_command(cmd);
    let (seen, id) = cgroup_seen_by_the_agent_at_its_start(&w);
    assert!(seen.ends_with(&format!("/task-{id}")), "{seen}");
    let log = w.log();
    assert!(
        log.contains("the kernel refused clone3")
            && log.contains("join their task cgroup before exec"),
        "{log}"
    );
    assert!(!log.contains("agents start by clone3"), "{log}");
}

/// The task cgroups left under walkie's subtree (empty where there are no cgroups).
fn task_cgroups(w: &Walkie) -> Vec<String> {
    let c = w.ctl_json(&["status"])["containment"].clone();
    let Some(base) = c["path"].as_str().filter(|_| c["kind"] == "cgroup") else {
        return Vec::new();
    };
    let mut dirs: Vec<String> = std::fs::read_dir(base)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("task-"))
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn an_agent_that_cannot_start_says_why_and_leaves_nothing_behind() {
    // A working directory gone by the time of a follow-up is not "command not found".
    let mut w = Walkie::new();
    let proj = w.path("home/proj");
    std::fs::create_dir_all(&proj).unwrap();
    w.write_config(&format!(
        "{}\n[projects]\nproj = \"~/proj\"\n",
        w.default_config("")
    ));
    w.start();
    let name = w.start_task(&["--project", "proj", "--name", "p", "hello"]);
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");
    std::fs::remove_dir_all(&proj).unwrap();
    let (code, _, err) = w.ctl(&["continue", "p", "again"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("cannot enter its working directory: No such file or directory"),
        "{err}"
    );
    assert!(!err.contains("not found"), "{err}");
    assert_eq!(w.task(&name)["state"], "succeeded");
    // A NUL byte in a prompt cannot be an argument.
    let reply = w.raw_request(b"{\"cmd\":\"start\",\"prompt\":\"a\\u0000b\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("an argument contains a NUL byte")),
        "{reply}"
    );
    // Removed by the membership helper, off the loop.
    assert!(
        wait_until(T, || task_cgroups(&w).is_empty()),
        "{:?}",
        task_cgroups(&w)
    );
    assert_eq!(w.tasks().len(), 1);
    // walkie keeps going.
    std::fs::create_dir_all(&proj).unwrap();
    let (code, _, err) = w.ctl(&["continue", "p", "again"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(w.wait_finished(&name, T)["state"], "succeeded");

    // A program that is nowhere on PATH is.
    let mut w = Walkie::new();
    w.write_config(&w.default_config("").replace(
        &format!(r#"["{FAKE_AGENT}","#),
        r#"["walkie-test-no-such-agent","#,
    ));
    w.start();
    let (code, _, err) = w.ctl(&["start", "hello"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("walkie-test-no-such-agent: command not found (agent.command, PATH)"),
        "{err}"
    );
    // Removed by the membership helper, off the loop.
    assert!(
        wait_until(T, || task_cgroups(&w).is_empty()),
        "{:?}",
        task_cgroups(&w)
    );
    assert!(w.tasks().is_empty());
}
