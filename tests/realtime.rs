//! The Realtime link and the conversation through the real binary, against fake-realtime.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use std::process::Command;

const T: Duration = Duration::from_secs(30);

/// A walkie connected to a fresh fake server.
fn connected(
    fake_args: &[&str],
    agent_extra: &str,
    realtime_extra: &str,
) -> (Walkie, FakeRealtime) {
    let mut w = Walkie::new();
    let fake = FakeRealtime::start(w.dir.path(), fake_args);
    w.write_config(&w.realtime_config(&fake, agent_extra, realtime_extra));
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-test-walkie-key-000".into());
    w.start_with(&["--trace", w.path("trace.jsonl").to_str().unwrap()]);
    w.wait_connected();
    // walkie counts the session ready at `session.created` and sends its `session.update` in
    // the same turn; the fake records it when its connection thread reads it, which can be
    // after the status that said "ready".
    fake.wait_events(T, "the session.update", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "session.update")
    });
    (w, fake)
}

/// The complete lines of a trace file, parsed (each must be JSON).
fn trace_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn types(events: &[(u64, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn system_texts(fake: &FakeRealtime) -> Vec<String> {
    fake.events_of_type("conversation.item.create")
        .into_iter()
        .filter(|e| e["item"]["role"] == "system")
        .map(|e| {
            e["item"]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn a_typed_turn_starts_a_task_and_its_completion_is_announced_once_idle() {
    let (w, fake) = connected(&[], "", "");
    // session.update went out first, GA shape, with server VAD off.
    let events = fake.events();
    assert_eq!(
        events[0].1["type"],
        "session.update",
        "{:?}",
        types(&events)
    );
    // The fake records an event before it handles it and publishes its state after: the
    // session.update in the record file may not be in `state` yet.
    assert!(
        wait_until(T, || fake.state()["turn_detection_null"] == true),
        "{}",
        fake.state()
    );
    let (code, _, err) = w.ctl(&[
        "say",
        "please start fixing the flaky test @sleep=2 @text=the_test_is_fixed",
    ]);
    assert_eq!(code, 0, "{err}");
    // The model calls start_task; walkie answers with function_call_output while the agent
    // is still running, then exactly one response.create for that response.
    fake.wait_events(T, "a function_call_output", |ev| {
        ev.iter().any(|(_, e)| {
            e["type"] == "conversation.item.create" && e["item"]["type"] == "function_call_output"
        })
    });
    let tasks = w.tasks();
    assert_eq!(tasks.len(), 1);
    assert_eq!(
        tasks[0]["state"], "running",
        "the output came before the agent finished"
    );
    let output = fake
        .events_of_type("conversation.item.create")
        .into_iter()
        .find(|e| e["item"]["type"] == "function_call_output")
        .unwrap();
    let out: Value = serde_json::from_str(output["item"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["status"], "started");
    let name = out["task"].as_str().unwrap().to_string();
    // Completion: a system message naming the task, then a response.create.
    fake.wait_events(T, "the completion system message", |_| {
        system_texts(&fake).iter().any(|t| t.contains(&name))
    });
    let announcement = system_texts(&fake)
        .into_iter()
        .find(|t| t.contains(&name))
        .unwrap();
    assert!(announcement.starts_with("Task update"), "{announcement}");
    assert!(announcement.contains("the test is fixed"), "{announcement}");
    fake.wait_events(T, "the announcement's response.create", |ev| {
        let t = types(ev);
        let sys = ev
            .iter()
            .rposition(|(_, e)| {
                e["type"] == "conversation.item.create" && e["item"]["role"] == "system"
            })
            .unwrap();
        t[sys..].iter().any(|x| x == "response.create")
    });
    // One response.create per response: say → 1, after the tool output → 1, announcement → 1.
    assert!(wait_until(T, || fake.state()["active_response"].is_null()));
    let creates = fake.events_of_type("response.create").len();
    assert_eq!(creates, 3, "{:?}", types(&fake.events()));
    // The server never had to reject a second response.create.
    assert!(
        !w.log().contains("conversation_already_has_active_response"),
        "{}",
        w.log()
    );
    // The transcript has the typed turn and the assistant's spoken answers.
    let transcript = w.ctl_json(&["transcript"]);
    let roles: Vec<&str> = transcript
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.first(), Some(&"user"));
    assert!(roles.contains(&"assistant"), "{transcript}");
    assert!(w.log().contains(&format!("task {name} succeeded")));
    let kinds = check_trace_with_sdk(&w.path("trace.jsonl"));
    for k in [
        "session.update",
        "conversation.item.create",
        "response.create",
    ] {
        assert!(
            kinds.iter().any(|x| x == k),
            "{k} not in the trace: {kinds:?}"
        );
    }
}

#[test]
fn the_sdk_check_catches_extra_keys_and_beta_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/sdk-check/check_trace.py");
    for bad in [
        json!({"type": "response.create", "bogus": 1}),
        json!({"type": "session.update", "session": {"type": "realtime", "modalities": ["audio"]}}),
        json!({"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "marin", "speed_up": 2}}}}),
        json!({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", "content": [{"type": "output_audio", "audio": "x"}]}, "extra": true}),
        json!({"type": "input_audio_buffer.append"}),
    ] {
        let trace = dir.path().join("t.jsonl");
        std::fs::write(
            &trace,
            format!("{}\n", json!({"t_ms": 0, "dir": "out", "event": bad})),
        )
        .unwrap();
        let out = Command::new(sdk_python())
            .arg(&script)
            .arg(&trace)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "accepted {bad}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let trace = dir.path().join("good.jsonl");
    std::fs::write(
        &trace,
        format!(
            "{}\n",
            json!({"t_ms": 0, "dir": "out", "event": {"type": "response.create"}})
        ),
    )
    .unwrap();
    assert_eq!(check_trace_with_sdk(&trace), vec!["response.create"]);
}

#[test]
fn completions_wait_for_a_held_button_and_arrive_batched() {
    let (w, fake) = connected(&[], "max_running = 4", "");
    w.ctl(&["press"]);
    let a = w.start_task(&["--name", "first", "@sleep=0.2 @text=first_done"]);
    let b = w.start_task(&["--name", "second", "@sleep=0.4 @text=second_done"]);
    w.wait_finished(&a, T);
    w.wait_finished(&b, T);
    // Held: nothing announced, however long it takes.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        system_texts(&fake).is_empty(),
        "announced while the button was held: {:?}",
        system_texts(&fake)
    );
    w.ctl(&["release"]);
    fake.wait_events(T, "the announcement", |_| !system_texts(&fake).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let texts = system_texts(&fake);
    assert_eq!(texts.len(), 1, "one batched system message: {texts:?}");
    assert!(
        texts[0].contains("first")
            && texts[0].contains("second")
            && texts[0].contains("second done"),
        "{}",
        texts[0]
    );
    // The short press was cleared, never committed; one response.create for the batch.
    assert!(fake.events_of_type("input_audio_buffer.commit").is_empty());
    assert!(!fake.events_of_type("input_audio_buffer.clear").is_empty());
    assert!(wait_until(T, || fake.state()["active_response"].is_null()));
    assert_eq!(fake.events_of_type("response.create").len(), 1);
}

#[test]
fn a_completion_waits_for_the_active_response_to_end() {
    let script =
        r#"{"default": {"say": "Let me tell you a long story about tests.", "audio_ms": 4000}}"#;
    let mut w = Walkie::new();
    std::fs::write(w.path("script.json"), script).unwrap();
    let fake = FakeRealtime::start(
        w.dir.path(),
        &[
            "--script",
            w.path("script.json").to_str().unwrap(),
            "--speed",
            "2",
        ],
    );
    w.write_config(&w.realtime_config(&fake, "", ""));
    w.start_with(&["--trace", w.path("trace.jsonl").to_str().unwrap()]);
    w.wait_connected();
    let name = w.start_task(&["--name", "during", "@sleep=0.5"]);
    w.ctl(&["say", "tell me a story"]);
    w.wait_finished(&name, T);
    fake.wait_events(T, "the announcement", |_| !system_texts(&fake).is_empty());
    // In walkie's trace: the system message went out only after the story's response.done.
    // walkie flushes its trace at the end of a loop iteration, after the send: the fake
    // can have the message before the trace file does.
    let is_system = |l: &Value| {
        l["dir"] == "out"
            && l["event"]["type"] == "conversation.item.create"
            && l["event"]["item"]["role"] == "system"
    };
    let mut trace: Vec<Value> = Vec::new();
    assert!(
        wait_until(T, || {
            trace = trace_lines(&w.path("trace.jsonl"));
            trace.iter().any(is_system)
        }),
        "the system message never reached the trace"
    );
    let done = trace
        .iter()
        .position(|l| l["dir"] == "in" && l["event"]["type"] == "response.done")
        .expect("story done");
    let sys = trace.iter().position(is_system).unwrap();
    assert!(
        sys > done,
        "announced during the story (done at line {done}, system at {sys})"
    );
    let finished_at = trace[done]["t_ms"].as_u64().unwrap();
    assert!(
        trace[sys]["t_ms"].as_u64().unwrap() >= finished_at + 1000,
        "no cooldown after the response"
    );
}

#[test]
fn a_dropped_link_reconnects_restores_context_and_delivers_the_completion() {
    let (w, fake) = connected(&[], "", "");
    let name = w.start_task(&["--name", "survivor", "@sleep=2 @text=made_it"]);
    w.ctl(&["say", "hello there"]);
    fake.wait_events(T, "the say", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
    assert!(wait_until(T, || w
        .ctl_json(&["transcript"])
        .to_string()
        .contains("\"assistant\"")));
    assert_eq!(fake.control(json!({"cmd": "drop"}))["ok"], true);
    // A new connection: session.update again, then the restore message naming the task.
    fake.wait_events(T, "a second session.update", |ev| {
        ev.iter()
            .any(|(c, e)| *c == 2 && e["type"] == "session.update")
    });
    fake.wait_events(T, "the restore message", |ev| {
        ev.iter().any(|(c, e)| {
            *c == 2
                && e["item"]["role"] == "system"
                && e["item"]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .contains("survivor")
        })
    });
    fake.wait_events(T, "the restored assistant turn", |ev| {
        ev.iter()
            .any(|(c, e)| *c == 2 && e["item"]["role"] == "assistant")
    });
    let second: Vec<Value> = fake
        .events()
        .into_iter()
        .filter(|(c, _)| *c == 2)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(second[0]["type"], "session.update");
    let restore = second[1]["item"]["content"][0]["text"].as_str().unwrap();
    assert!(restore.starts_with("Context restored"), "{restore}");
    // The last turns come back as items: the user's as input_text, the assistant's as output_text.
    assert!(
        second.iter().any(
            |e| e["item"]["role"] == "user" && e["item"]["content"][0]["text"] == "hello there"
        ),
        "{second:#?}"
    );
    assert!(
        second.iter().any(|e| e["item"]["role"] == "assistant"
            && e["item"]["content"][0]["type"] == "output_text"),
        "{second:#?}"
    );
    // The completion is delivered on the new connection.
    w.wait_finished(&name, T);
    fake.wait_events(T, "the completion on connection 2", |ev| {
        ev.iter().any(|(c, e)| {
            *c == 2
                && e["item"]["role"] == "system"
                && e["item"]["content"][0]["text"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("Task update")
        })
    });
    check_trace_with_sdk(&w.path("trace.jsonl"));
}

#[test]
fn a_completion_while_the_link_is_down_is_delivered_after_reconnect() {
    let (w, fake) = connected(&[], "", "");
    fake.control(json!({"cmd": "reject_upgrades", "status": 503, "count": 3}));
    let name = w.start_task(&["--name", "offline", "@sleep=0.3"]);
    fake.control(json!({"cmd": "drop"}));
    w.wait_finished(&name, T);
    fake.wait_events(
        Duration::from_secs(60),
        "the completion after reconnect",
        |_| {
            system_texts(&fake)
                .iter()
                .any(|t| t.starts_with("Task update") && t.contains("offline"))
        },
    );
    assert!(
        fake.state()["rejected_upgrades"].as_u64().unwrap() >= 3,
        "it retried through the 503s"
    );
}

#[test]
fn a_silent_socket_is_detected_and_replaced() {
    let (w, fake) = connected(&[], "", "ping_interval_ms = 300");
    assert_eq!(fake.control(json!({"cmd": "silence"}))["ok"], true);
    assert!(
        wait_until(T, || fake.state()["connections"].as_u64() == Some(2)),
        "{}",
        w.log()
    );
    w.wait_connected();
    assert!(w.log().contains("no data"), "{}", w.log());
}

#[test]
fn session_expired_reconnects() {
    let (w, fake) = connected(&[], "", "");
    assert_eq!(fake.control(json!({"cmd": "expire"}))["ok"], true);
    fake.wait_events(T, "a new session", |ev| {
        ev.iter()
            .any(|(c, e)| *c == 2 && e["type"] == "session.update")
    });
    w.wait_connected();
}

#[test]
fn the_session_is_rotated_before_it_expires() {
    let (w, fake) = connected(&["--session-seconds", "8"], "", "");
    // Rotation happens while idle before expires_at (here within 8 s), with a fresh session.update.
    fake.wait_events(Duration::from_secs(20), "a rotated session", |ev| {
        ev.iter()
            .any(|(c, e)| *c == 2 && e["type"] == "session.update")
    });
    let rotated = w.log();
    assert!(rotated.contains("session rotation"), "{rotated}");
}

#[test]
fn an_http_401_fails_the_link_without_a_retry_loop() {
    let mut w = Walkie::new();
    let fake = FakeRealtime::start(w.dir.path(), &[]);
    fake.control(json!({"cmd": "reject_upgrades", "status": 401, "count": 100}));
    w.write_config(&w.realtime_config(&fake, "", ""));
    w.extra_env.insert(
        "WALKIE_TEST_KEY".into(),
        "sk-test-must-not-be-logged-1234".into(),
    );
    w.start();
    let mut st = Value::Null;
    assert!(wait_until(T, || {
        st = w.ctl_json(&["status"]);
        st["link"] == "failed"
    }));
    assert!(st["link_error"].as_str().unwrap().contains("401"), "{st}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(fake.state()["rejected_upgrades"], 1, "no retry after a 401");
    assert!(
        !w.log().contains("sk-test-must-not-be-logged"),
        "the key was logged"
    );
    let (code, _, err) = w.ctl(&["say", "hello"]);
    assert_eq!(code, 1);
    assert!(err.contains("not connected"), "{err}");
    // Tasks still work with the link down.
    let n = w.start_task(&["@sleep=0"]);
    assert_eq!(w.wait_finished(&n, T)["state"], "succeeded");
}

#[test]
fn a_quota_refusal_at_the_upgrade_stops_retrying_and_says_why() {
    // The real API answers an exhausted quota with HTTP 429 and `insufficient_quota` in the
    // body, before any WebSocket: walkie must read that body (here arriving after a pause,
    // and chunked) and stop, not retry forever.
    for (split_ms, chunked) in [(0, false), (300, true)] {
        let mut w = Walkie::new();
        let fake = FakeRealtime::start(w.dir.path(), &[]);
        fake.control(
            json!({"cmd": "reject_upgrades", "status": 429, "count": 100,
                            "split_ms": split_ms, "chunked": chunked}),
        );
        w.write_config(&w.realtime_config(&fake, "", ""));
        w.extra_env
            .insert("WALKIE_TEST_KEY".into(), "sk-test-walkie-key-000".into());
        w.start();
        let mut st = Value::Null;
        assert!(
            wait_until(T, || {
                st = w.ctl_json(&["status"]);
                st["link"] == "failed"
            }),
            "{st}\n{}",
            w.log()
        );
        let error = st["link_error"].as_str().unwrap();
        assert!(
            error.contains("HTTP 429 insufficient_quota")
                && error.contains("exceeded your current quota"),
            "{error}"
        );
        let (_, human, _) = w.ctl(&["status"]);
        assert!(
            human.contains("failed") && human.contains("insufficient_quota"),
            "{human}"
        );
        // Several backoff periods later, still the one attempt.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(
            fake.state()["rejected_upgrades"],
            1,
            "no retry after a quota refusal"
        );
    }
    // A rate limit (429 with another code) is retried, and walkie connects once it lifts.
    let mut w = Walkie::new();
    let fake = FakeRealtime::start(w.dir.path(), &[]);
    fake.control(json!({"cmd": "reject_upgrades", "status": 429, "count": 1,
                        "body": {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}}));
    w.write_config(&w.realtime_config(&fake, "", ""));
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-test-walkie-key-000".into());
    w.start();
    w.wait_connected();
    assert_eq!(fake.state()["rejected_upgrades"], 1);
    assert!(w.log().contains("rate_limit_exceeded"), "{}", w.log());
}

#[test]
fn a_fatal_error_event_stops_retrying() {
    let (w, fake) = connected(&[], "", "");
    fake.control(json!({"cmd": "send", "event": {"type": "error", "error": {"type": "invalid_request_error", "code": "insufficient_quota", "message": "You exceeded your current quota.", "param": null, "event_id": null}}}));
    fake.control(json!({"cmd": "close", "code": 1011}));
    let mut st = Value::Null;
    assert!(wait_until(T, || {
        st = w.ctl_json(&["status"]);
        st["link"] == "failed"
    }));
    assert!(st["link_error"].as_str().unwrap().contains("quota"), "{st}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fake.state()["connections"], 1);
}

#[test]
fn unknown_and_malformed_server_events_leave_the_link_up() {
    let (w, fake) = connected(&[], "", "");
    assert_eq!(fake.control(json!({"cmd": "unknown"}))["ok"], true);
    assert_eq!(fake.control(json!({"cmd": "malformed"}))["ok"], true);
    fake.control(
        json!({"cmd": "send", "event": {"type": "response.output_audio.delta", "delta": 42}}),
    );
    fake.control(json!({"cmd": "send", "event": {"type": "session.created"}}));
    let (code, _, err) = w.ctl(&["say", "are you still there"]);
    assert_eq!(code, 0, "{err}");
    fake.wait_events(T, "the say after garbage", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
    assert_eq!(fake.state()["connections"], 1);
    assert_eq!(w.ctl_json(&["status"])["link"], "connected");
    assert!(w.log().contains("skipping server frame"), "{}", w.log());
}

#[test]
fn wss_with_a_private_ca() {
    let mut w = Walkie::new();
    let fake = FakeRealtime::start_opts(w.dir.path(), true, &["--api-key", "sk-test-tls"]);
    w.write_config(&w.realtime_config(&fake, "", ""));
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-test-tls".into());
    w.start();
    w.wait_connected();
    assert!(fake.url.starts_with("wss://"));
    w.ctl(&["say", "hello over tls"]);
    fake.wait_events(T, "the say", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
}

#[test]
fn the_transcript_survives_a_restart_and_is_restored_to_the_model() {
    let (mut w, fake) = connected(&[], "", "");
    w.ctl(&["say", "remember the blue door"]);
    fake.wait_events(T, "the response", |ev| {
        ev.iter().any(|(_, e)| e["type"] == "response.create")
    });
    assert!(wait_until(T, || w
        .ctl_json(&["transcript"])
        .as_array()
        .unwrap()
        .len()
        >= 2));
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(w.wait_exit(T), Some(0));
    let state = w.state_json();
    assert_eq!(
        state["transcript"][0]["text"], "remember the blue door",
        "{state}"
    );
    w.start();
    w.wait_connected();
    let t = w.ctl_json(&["transcript"]);
    assert_eq!(t[0]["text"], "remember the blue door");
    let (_, out, _) = w.ctl(&["transcript"]);
    assert!(out.contains("user: remember the blue door"), "{out}");
    // The new session gets the old turns back.
    fake.wait_events(T, "the restored turn", |ev| {
        ev.iter().any(|(c, e)| {
            *c == 2
                && e["item"]["role"] == "user"
                && e["item"]["content"][0]["text"] == "remember the blue door"
        })
    });
}
