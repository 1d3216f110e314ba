//! The daemon's own interfaces through the real binary: configuration, state file, control
//! socket, single instance, signals.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_bad_config_names_the_key_and_line_and_exits_2() {
    let w = Walkie::new();
    let cases = [
        ("[audio]\nperiod_ms = 0\n", ":2:", "period_ms"),
        ("[realtime]\nvoce = \"marin\"\n", ":2:", "voce"),
        ("[button]\nmode = \"sideways\"\n", ":2:", "mode"),
        (
            "\n\n[agent]\nmax_running = \"three\"\n",
            ":4:",
            "max_running",
        ),
        ("[agent\n", ":1:", ""),
        (
            "[realtime]\nurl = \"ws://example.com/v1/realtime\"\n",
            ":2:",
            "url",
        ),
    ];
    for (text, line, key) in cases {
        w.write_config(text);
        let out = w.run_cmd(&["run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text:?}: {err}");
        let path = w.config_path().display().to_string();
        assert!(
            err.contains(&format!("{path}{line}")) && err.contains(key),
            "{text:?}: {err}"
        );
        let out = w.run_cmd(&["config", "check"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(key));
    }
    let explicit = w.path("other.toml");
    std::fs::write(&explicit, "[audio]\npreroll_ms = 100000\n").unwrap();
    let out = w.run_cmd(&["run", "--config", explicit.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other.toml:2"));
}

#[test]
fn config_example_is_valid_and_check_says_ok() {
    let w = Walkie::new();
    let out = w.run_cmd(&["config", "example"]);
    assert_eq!(out.status.code(), Some(0));
    let example = String::from_utf8(out.stdout).unwrap();
    for key in [
        "[realtime]",
        "api_key_env",
        "[audio]",
        "preroll_ms",
        "[button]",
        "max_hold_s",
        "[agent]",
        "env_pass",
        "[projects]",
    ] {
        assert!(example.contains(key), "example lacks {key}");
    }
    std::fs::write(w.config_path(), &example).unwrap();
    let out = w.run_cmd(&["config", "check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    std::fs::remove_file(w.config_path()).unwrap();
    let out = w.run_cmd(&["config", "check"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("defaults"));
}

#[test]
fn a_corrupt_state_file_is_moved_aside_and_the_daemon_starts() {
    let mut w = Walkie::new();
    std::fs::create_dir_all(w.path("state/walkie")).unwrap();
    std::fs::write(
        w.state_file(),
        "{\"version\":1,\"tasks\":[{\"name\": 12}] garbage",
    )
    .unwrap();
    w.start();
    // The socket accepts from the moment it is bound, before the state file is read.
    w.ctl_json(&["status"]);
    assert!(w.log().contains("moved to"), "{}", w.log());
    let aside: Vec<_> = std::fs::read_dir(w.path("state/walkie"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
    assert!(
        std::fs::read_to_string(aside[0].path())
            .unwrap()
            .contains("garbage"),
        "kept as it was"
    );
    let name = w.start_task(&["@sleep=0"]);
    w.wait_finished(&name, T);
    // The corrupt file was moved aside: until the writer thread's first save there is none.
    w.wait_state_json("the task", |s| {
        s["tasks"].as_array().is_some_and(|t| t.len() == 1)
    });
    let mode = std::fs::metadata(w.state_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn malformed_control_requests_get_clear_errors_and_the_daemon_keeps_going() {
    let mut w = Walkie::new();
    w.start();
    for (bad, needle) in [
        (&b"hello\n"[..], "not JSON"),
        (b"[1]\n", "JSON object"),
        (b"{\"cmd\":\"launch\"}\n", "launch"),
        (b"{\"cmd\":\"start\"}\n", "prompt"),
        (b"{\"cmd\":\"start\",\"prompt\":\"  \"}\n", "empty"),
        (b"{\"cmd\":\"status\",\"x\":1}\n", "x"),
        (
            b"{\"cmd\":\"cancel\",\"name\":\"nobody\"}\n",
            "no task matches",
        ),
        (b"\xff\xfe\n", "UTF-8"),
    ] {
        let reply = w.raw_request(bad);
        assert_eq!(reply["ok"], false, "{reply}");
        let err = reply["error"].as_str().unwrap();
        assert!(
            err.contains(needle),
            "{:?} → {err}",
            String::from_utf8_lossy(bad)
        );
    }
    // Several requests on one connection, answered in order; a half-closed client still
    // gets its replies.
    let mut s = UnixStream::connect(w.socket()).unwrap();
    s.write_all(b"{\"cmd\":\"tasks\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut lines = BufReader::new(s).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(first["tasks"].is_array() && second["status"].is_object());
    // An endless line is cut off with an error, not buffered forever.
    let mut s = UnixStream::connect(w.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..20 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("longer than"), "{reply}");
    // Still serving.
    assert_eq!(w.ctl_json(&["status"])["tasks"]["running"], 0);
}

#[test]
fn the_control_socket_is_private_and_a_second_daemon_refuses_to_start() {
    let mut w = Walkie::new();
    w.start();
    let mode = std::fs::metadata(w.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = w.run_cmd(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") && err.contains(&w.pid().to_string()),
        "{err}"
    );
    // The first one still owns its socket.
    assert_eq!(w.ctl_json(&["status"])["pid"], w.pid());
}

#[test]
fn ctl_without_a_daemon_exits_3() {
    let w = Walkie::new();
    let (code, _, err) = w.ctl(&["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("not reachable"), "{err}");
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_old_one_on_error() {
    let mut w = Walkie::new();
    w.write_config(&w.default_config("max_running = 1"));
    w.start();
    w.start_task(&["--name", "a", "@stall"]);
    let (code, _, _) = w.ctl(&["start", "--name", "b", "@stall"]);
    assert_eq!(code, 1, "limit 1");
    w.write_config("[agent]\nmax_running = 0\n");
    w.signal(Signal::SIGHUP);
    assert!(
        wait_until(T, || w.log().contains("old one stays in force")),
        "{}",
        w.log()
    );
    assert!(w.log().contains("max_running"));
    let (code, _, _) = w.ctl(&["start", "--name", "b", "@stall"]);
    assert_eq!(code, 1, "still limit 1");
    w.write_config(&w.default_config("max_running = 2"));
    w.signal(Signal::SIGHUP);
    assert!(wait_until(T, || w.log().contains("configuration reloaded")));
    w.start_task(&["--name", "b", "@stall"]);
    assert_eq!(w.ctl_json(&["status"])["tasks"]["running"], 2);
}

#[test]
fn status_reports_every_part() {
    let mut w = Walkie::new();
    w.start();
    let st = w.ctl_json(&["status"]);
    assert_eq!(st["link"], "disabled");
    assert_eq!(st["audio"]["state"], "disabled");
    assert_eq!(st["button"]["state"], "disabled");
    assert_eq!(
        st["tasks"],
        serde_json::json!({"running": 0, "finished": 0})
    );
    assert!(st["uptime_s"].is_u64());
    let (code, out, _) = w.ctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("link:") && out.contains("tasks:    0 running"),
        "{out}"
    );
}

#[test]
fn sigint_shuts_down_cleanly_too() {
    let mut w = Walkie::new();
    w.start();
    w.start_task(&["--name", "x", "@stall"]);
    w.signal(Signal::SIGINT);
    assert_eq!(w.wait_exit(T), Some(0));
    assert_eq!(w.state_json()["tasks"][0]["state"], "interrupted");
}

#[test]
fn devices_lists_alsa_pcms_and_input_devices() {
    let mut w = Walkie::new();
    w.use_test_alsa();
    let out = w.run_cmd(&["devices"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ALSA PCMs:")
            && text.contains("walkie_capture")
            && text.contains("walkie_speaker"),
        "{text}"
    );
    assert!(text.contains("input devices:"), "{text}");
}

#[test]
fn a_second_daemon_of_the_same_state_directory_refuses_whatever_its_runtime_dir() {
    let mut w = Walkie::new();
    w.start();
    let name = w.start_task(&["--name", "precious", "@stall"]);
    assert!(wait_until(T, || w.task(&name)["session_id"].is_string()));
    let agent = w.task(&name)["pid"].as_i64().unwrap() as i32;
    // As `sudo -u`, `su` or cron would start it: the same state, another runtime dir
    // (or none at all).
    let other_runtime = w.path("other-runtime");
    std::fs::create_dir_all(&other_runtime).unwrap();
    for runtime in [Some(other_runtime.as_path()), None] {
        let mut cmd = w.command(&["run"]);
        cmd.env_remove("XDG_RUNTIME_DIR");
        if let Some(dir) = runtime {
            cmd.env("XDG_RUNTIME_DIR", dir);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("already running") && err.contains(&format!("pid {}", w.pid())),
            "{err}"
        );
    }
    // The first daemon's task was never touched.
    assert!(
        alive(agent),
        "the second daemon killed the first one's agent"
    );
    let t = w.task(&name);
    assert_eq!(t["state"], "running", "{t}");
    w.wait_state_json("the running task", |s| s["tasks"][0]["state"] == "running");
    assert_eq!(w.ctl_json(&["status"])["pid"], w.pid());
    let mode = std::fs::metadata(w.path("state/walkie/walkie.lock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
}
