//! Talking to a working agent, through the real binary: agents kept open on stdin
//! (`agent.protocol = "claude"`, with tools/fake-agent playing the Claude CLI), permission
//! requests announced and answered by voice (a typed turn, then fake-realtime's scripted
//! `answer_task`), steering, interrupts, live activity, warm sessions and what a cancel
//! leaves behind.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// A scripted reply that says a word and calls `name`.
fn call(name: &str, arguments: Value) -> Value {
    json!({"say": "Okay.", "audio_ms": 100, "call": {"name": name, "arguments": arguments}})
}

/// A 24 kHz mono 16-bit WAV file of `ms` milliseconds of a 300 Hz tone (the microphone).
fn write_tone_wav(path: &std::path::Path, ms: usize) {
    let samples: Vec<i16> = (0..ms * 24)
        .map(|n| ((n as f32 * 300.0 * std::f32::consts::TAU / 24_000.0).sin() * 8000.0) as i16)
        .collect();
    let data = (samples.len() * 2) as u32;
    let mut bytes = Vec::with_capacity(44 + data as usize);
    bytes.extend_from_slice(b"RIFF");
    bytes.extend_from_slice(&(36 + data).to_le_bytes());
    bytes.extend_from_slice(b"WAVEfmt ");
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes()); // PCM
    bytes.extend_from_slice(&1u16.to_le_bytes()); // mono
    bytes.extend_from_slice(&24_000u32.to_le_bytes());
    bytes.extend_from_slice(&48_000u32.to_le_bytes());
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&16u16.to_le_bytes());
    bytes.extend_from_slice(b"data");
    bytes.extend_from_slice(&data.to_le_bytes());
    for s in samples {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Bytes of microphone audio walkie has sent so far.
fn appended_bytes(fake: &FakeRealtime) -> usize {
    fake.events_of_type("input_audio_buffer.append")
        .iter()
        .map(|e| e["audio"].as_str().unwrap_or("").len() * 3 / 4)
        .sum()
}

/// The permission requests announced to the model so far, in order.
fn announced(fake: &FakeRealtime) -> Vec<String> {
    system_texts(fake)
        .into_iter()
        .filter(|t| t.contains("Permission request"))
        .collect()
}

/// What the scripted model does with each typed turn: the tools this issue added, always
/// on the task named `flaky`.
fn script() -> Value {
    let call = |name: &str, arguments: Value| json!({"say": "Okay.", "audio_ms": 100, "call": {"name": name, "arguments": arguments}});
    json!({
        "rules": [
            {"match": "(?i)^yes", "reply": call("answer_task", json!({"name": "flaky", "decision": "allow"}))},
            {"match": "(?i)^always", "reply": call("answer_task", json!({"name": "flaky", "decision": "always"}))},
            {"match": "(?i)^no", "reply": call("answer_task", json!({"name": "flaky", "decision": "deny", "reason": "not now"}))},
            {"match": "(?i)^also", "reply": call("message_task", json!({"name": "flaky", "text": "{text}"}))},
            {"match": "(?i)^instead", "reply": call("message_task", json!({"name": "flaky", "text": "{text}", "now": true}))},
            {"match": "(?i)^stop", "reply": call("interrupt_task", json!({"name": "flaky"}))},
            {"match": "(?i)^go on", "reply": call("continue_task", json!({"name": "flaky", "prompt": "{text}"}))},
            {"match": "(?i)doing", "reply": call("task_status", json!({"name": "flaky"}))}
        ],
        "default": {"say": "Hm.", "audio_ms": 100},
        "after_tool": {"say": "Done.", "audio_ms": 100},
        "on_system": {"say": "{text}", "audio_ms": 100}
    })
}

/// The test configuration with the fake agent kept open: `agent.command` is just the
/// program, walkie adds the protocol's flags.
fn kept_open(config: &str) -> String {
    let one_shot = format!(
        "command = [\"{FAKE_AGENT}\", \"-p\", \"{{prompt}}\", \"--output-format\", \"stream-json\", \"--verbose\"]"
    );
    assert!(config.contains(&one_shot), "{config}");
    config.replace(&one_shot, &format!("command = [\"{FAKE_AGENT}\"]"))
}

/// A walkie with kept-open agents and no voice.
fn started(agent_extra: &str) -> Walkie {
    let mut w = Walkie::new();
    w.write_config(&kept_open(&w.default_config(agent_extra)));
    w.start();
    w
}

/// A walkie with kept-open agents, connected to fake-realtime playing [`script`] (or
/// `custom`), with a trace file.
fn with_voice(agent_extra: &str, custom: Option<Value>) -> (Walkie, FakeRealtime) {
    with_voice_and_audio(agent_extra, custom, None)
}

/// [`with_voice`], with `audio` as the `[audio]` section's body instead of no audio.
fn with_voice_and_audio(
    agent_extra: &str,
    custom: Option<Value>,
    audio: Option<&str>,
) -> (Walkie, FakeRealtime) {
    let mut w = Walkie::new();
    let script_file = w.path("script.json");
    std::fs::write(&script_file, custom.unwrap_or_else(script).to_string()).unwrap();
    let fake = FakeRealtime::start(w.dir.path(), &["--script", script_file.to_str().unwrap()]);
    let mut config = kept_open(&w.realtime_config(&fake, agent_extra, ""));
    if let Some(audio) = audio {
        let none = "[audio]\nbackend = \"none\"\n";
        assert!(config.contains(none), "{config}");
        config = config.replace(none, &format!("[audio]\n{audio}\n"));
    }
    w.write_config(&config);
    w.extra_env
        .insert("WALKIE_TEST_KEY".into(), "sk-test-walkie-key-000".into());
    w.start_with(&["--trace", w.path("trace.jsonl").to_str().unwrap()]);
    w.wait_connected();
    (w, fake)
}

fn system_texts(fake: &FakeRealtime) -> Vec<String> {
    fake.events_of_type("conversation.item.create")
        .into_iter()
        .filter(|e| e["item"]["role"] == "system")
        .map(|e| {
            e["item"]["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// The outputs walkie sent for calls of tool `tool`, in order (from its trace: the call's
/// name is in the server event, the output in walkie's item).
fn tool_outputs(w: &Walkie, tool: &str) -> Vec<Value> {
    let trace = std::fs::read_to_string(w.path("trace.jsonl")).unwrap_or_default();
    let lines: Vec<Value> = trace
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let calls: Vec<String> = lines
        .iter()
        .filter(|l| {
            l["dir"] == "in"
                && l["event"]["type"] == "response.function_call_arguments.done"
                && l["event"]["name"] == tool
        })
        .map(|l| l["event"]["call_id"].as_str().unwrap().to_owned())
        .collect();
    lines
        .iter()
        .filter(|l| l["dir"] == "out" && l["event"]["item"]["type"] == "function_call_output")
        .filter(|l| calls.iter().any(|c| *c == l["event"]["item"]["call_id"]))
        .map(|l| serde_json::from_str(l["event"]["item"]["output"].as_str().unwrap()).unwrap())
        .collect()
}

/// Waits for the first output of tool `tool`.
fn tool_output(w: &Walkie, tool: &str) -> Value {
    let mut out = Vec::new();
    assert!(
        wait_until(T, || {
            out = tool_outputs(w, tool);
            !out.is_empty()
        }),
        "no output of {tool}\n{}",
        w.log()
    );
    out.remove(0)
}

/// Waits until walkie neither runs nor wants a response and the fake server has none
/// running (what walkie asked was said, and what the model called has its output back).
/// walkie asks for a response in the same step it sends what the response answers, so its
/// own status is never idle in between.
fn quiet(w: &Walkie, fake: &FakeRealtime) {
    let mut last = Value::Null;
    let ok = wait_until(T, || {
        last = w.ctl_json(&["status"])["conversation"].clone();
        last["active_response"].is_null()
            && last["response_wanted"] == false
            && fake.state()["active_response"].is_null()
    });
    assert!(ok, "never quiet: {last}\n{}", w.log());
}

/// Waits until task `name` is in `state`; returns its record.
fn wait_state(w: &Walkie, name: &str, state: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(T, || {
        last = w.task(name);
        last["state"] == state
    });
    assert!(ok, "task {name} never {state}: {last}\n{}", w.log());
    last
}

/// Every line of a task's agent output, parsed.
fn agent_lines(w: &Walkie, name: &str) -> Vec<Value> {
    std::fs::read_to_string(w.path(&format!("state/walkie/tasks/{name}/stdout.jsonl")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The result lines of a task's agent output, once there are at least `turns`. walkie
/// writes the output on its writer thread: `ctl tasks` says a turn ended (walkie read its
/// result line) before the line is on disk. Once it is, so is every line before it.
fn results(w: &Walkie, name: &str, turns: usize) -> Vec<Value> {
    let mut found = Vec::new();
    let ok = wait_until(T, || {
        found = agent_lines(w, name)
            .into_iter()
            .filter(|l| l["type"] == "result")
            .collect();
        found.len() >= turns
    });
    assert!(
        ok,
        "{name}: {} result line(s) on disk, not {turns}\n{}",
        found.len(),
        w.log()
    );
    found
}

fn cmdline(pid: i64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Live processes of task `name` (its agent and everything it started).
fn task_processes(w: &Walkie, name: &str) -> Vec<i32> {
    let id = w.task(name)["id"].as_str().unwrap().to_owned();
    processes_with_env(&format!("WALKIE_TASK={id}"))
}

// ---- approvals ----

#[test]
fn a_permission_request_is_announced_when_idle_and_allowed_by_a_typed_turn() {
    let (w, fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "fix the flaky test @ask=npm_test"]);
    let waiting = wait_state(&w, "flaky", "waiting");
    assert_eq!(
        waiting["activity"], "waiting for your approval to run `npm test`",
        "{waiting}"
    );
    assert_eq!(waiting["waiting_for"], "run `npm test`");
    fake.wait_events(T, "the permission announcement", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.starts_with("Permission request: flaky wants to run: npm test. Allow?"))
    });
    quiet(&w, &fake);
    assert_eq!(w.task("flaky")["state"], "waiting", "nobody answered yet");
    // The user answers (typed); the model's answer_task now counts.
    let (code, _, err) = w.ctl(&["say", "yes, allow it"]);
    assert_eq!(code, 0, "{err}");
    let out = tool_output(&w, "answer_task");
    assert_eq!(
        out,
        json!({"status": "answered", "task": "flaky", "decision": "allow", "request": "run `npm test`"})
    );
    let done = wait_state(&w, "flaky", "succeeded");
    assert_eq!(done["warm"], true, "{done}");
    // The agent ran the command: nothing was denied in its turn.
    let result = &results(&w, "flaky", 1)[0];
    assert_eq!(result["permission_denials"], json!([]), "{result}");
    // And the completion is announced after.
    fake.wait_events(T, "the completion", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.starts_with("Task update") && t.contains("flaky (succeeded)"))
    });
}

#[test]
fn a_permission_request_denied_by_voice_goes_on_without_the_tool() {
    let (w, fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "clean up @ask=rm_-rf_build"]);
    fake.wait_events(T, "the permission announcement", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("flaky wants to run: rm -rf build. Allow?"))
    });
    quiet(&w, &fake);
    w.ctl(&["say", "no, not now"]);
    let out = tool_output(&w, "answer_task");
    assert_eq!(out["decision"], "deny", "{out}");
    wait_state(&w, "flaky", "succeeded");
    let result = &results(&w, "flaky", 1)[0];
    let denials = result["permission_denials"].as_array().unwrap();
    assert_eq!(denials.len(), 1, "{result}");
    assert_eq!(denials[0]["tool_input"]["command"], "rm -rf build");
    // The agent saw the user's reason as the tool's result.
    let told = agent_lines(&w, "flaky")
        .into_iter()
        .find(|l| l["type"] == "user" && l.to_string().contains("tool_result"))
        .unwrap();
    assert!(
        told.to_string().contains("The user said no: not now"),
        "{told}"
    );
}

#[test]
fn the_model_approving_without_a_user_turn_is_refused() {
    // A model that answers the announcement itself, at once.
    let mut eager = script();
    eager["on_system"] = json!({"say": "Allowing it.", "audio_ms": 100,
        "call": {"name": "answer_task", "arguments": {"name": "flaky", "decision": "allow"}}});
    let (w, fake) = with_voice("", Some(eager));
    w.start_task(&["--name", "flaky", "deploy @ask=./deploy.sh"]);
    let out = tool_output(&w, "answer_task");
    assert_eq!(out["status"], "rejected", "{out}");
    assert!(
        out["reason"]
            .as_str()
            .unwrap()
            .contains("the user has not answered flaky's request"),
        "{out}"
    );
    quiet(&w, &fake);
    // The refusal is decided before the output is sent: no answer went to the agent.
    assert!(!w.log().contains("task flaky: allowed"), "{}", w.log());
    assert_eq!(w.task("flaky")["state"], "waiting", "nothing was sent");
    // The user themself, at the command line, needs no spoken turn.
    let (code, out, err) = w.ctl(&["approve", "flaky"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "allowed flaky to run `./deploy.sh`");
    wait_state(&w, "flaky", "succeeded");
    assert_eq!(results(&w, "flaky", 1)[0]["permission_denials"], json!([]));
}

#[test]
fn a_permission_request_is_allowed_by_a_spoken_turn() {
    let mut spoken = script();
    // What the fake transcribes the committed audio as.
    spoken["transcript"] = json!("yes, allow it");
    // The microphone: a WAV file walkie reads in real time (30 s, more than needed).
    let audio_dir = tempfile::tempdir().unwrap();
    let mic = audio_dir.path().join("mic.wav");
    write_tone_wav(&mic, 30_000);
    let audio = format!(
        "backend = \"wav\"\ninput_wav = \"{}\"\noutput_wav = \"{}\"\nearcons = false",
        mic.display(),
        audio_dir.path().join("out.wav").display()
    );
    let (w, fake) = with_voice_and_audio("", Some(spoken), Some(&audio));
    w.start_task(&["--name", "flaky", "fix the flaky test @ask=npm_test"]);
    fake.wait_events(T, "the permission announcement", |_| {
        announced(&fake)
            .iter()
            .any(|t| t.contains("flaky wants to run: npm test. Allow?"))
    });
    quiet(&w, &fake);
    assert!(tool_outputs(&w, "answer_task").is_empty());
    // The user holds the button and says yes: half a second of live audio after the
    // pre-roll, measured by what reached the server, then the release commits the turn.
    let (code, _, err) = w.ctl(&["press"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_until(T, || appended_bytes(&fake) >= 24_000 * 2 * 800 / 1000),
        "no audio: {} bytes\n{}",
        appended_bytes(&fake),
        w.log()
    );
    let (code, _, err) = w.ctl(&["release"]);
    assert_eq!(code, 0, "{err}");
    let out = tool_output(&w, "answer_task");
    assert_eq!(
        out,
        json!({"status": "answered", "task": "flaky", "decision": "allow", "request": "run `npm test`"})
    );
    wait_state(&w, "flaky", "succeeded");
    assert_eq!(results(&w, "flaky", 1)[0]["permission_denials"], json!([]));
    // It was a spoken turn: audio committed (no typed text), heard as "yes, allow it".
    assert_eq!(fake.events_of_type("input_audio_buffer.commit").len(), 1);
    assert!(
        fake.events_of_type("conversation.item.create")
            .iter()
            .all(|e| e["item"]["role"] != "user"),
        "nothing was typed"
    );
    assert!(wait_until(T, || w
        .ctl_json(&["transcript"])
        .to_string()
        .contains("yes, allow it")));
}

#[test]
fn requests_of_several_tasks_are_asked_one_at_a_time_oldest_first() {
    let custom = json!({
        "rules": [
            {"match": "(?i)^yes build", "reply": call("answer_task", json!({"name": "build", "decision": "allow"}))},
            {"match": "(?i)^yes deploy", "reply": call("answer_task", json!({"name": "deploy", "decision": "allow"}))},
            // A model that jumps ahead to the request it has not asked about yet.
            {"match": "(?i)^and deploy", "reply": call("answer_task", json!({"name": "deploy", "decision": "allow"}))}
        ],
        "default": {"say": "Hm.", "audio_ms": 100},
        "after_tool": {"say": "Done.", "audio_ms": 100},
        "on_system": {"say": "{text}", "audio_ms": 100}
    });
    let (w, fake) = with_voice("", Some(custom));
    // The button is held while both agents ask: nothing can be announced yet.
    w.ctl(&["press"]);
    w.start_task(&["--name", "build", "compile @ask=make_all"]);
    wait_state(&w, "build", "waiting");
    w.start_task(&["--name", "deploy", "ship @ask=rsync_-a_dist/_host:"]);
    wait_state(&w, "deploy", "waiting");
    assert_eq!(
        w.ctl_json(&["status"])["conversation"]["pending_permissions"],
        2
    );
    assert!(announced(&fake).is_empty());
    w.ctl(&["release"]);
    // The older request is asked, alone.
    fake.wait_events(T, "the first request", |_| !announced(&fake).is_empty());
    quiet(&w, &fake);
    let asked = announced(&fake);
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].starts_with("Permission request: build wants to run: make all. Allow?"),
        "{asked:?}"
    );
    assert!(!asked[0].contains("deploy"), "one at a time: {asked:?}");
    // Not asked while the first waits for its answer: another task's completion, said
    // when the user is idle again, comes without it.
    w.start_task(&["--name", "other", "look @text=all_fine"]);
    fake.wait_events(T, "the other task's completion", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("other (succeeded)"))
    });
    quiet(&w, &fake);
    assert_eq!(announced(&fake).len(), 1, "{:?}", system_texts(&fake));
    // An answer for the one not asked yet is refused, even after a user turn.
    w.ctl(&["say", "and deploy, sure"]);
    let refused = tool_output(&w, "answer_task");
    assert_eq!(refused["status"], "rejected", "{refused}");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("the user has not answered deploy's request"),
        "{refused}"
    );
    quiet(&w, &fake);
    assert_eq!(w.task("deploy")["state"], "waiting");
    assert_eq!(announced(&fake).len(), 1, "deploy waits its turn");
    // The user answers the first; then the second is asked.
    w.ctl(&["say", "yes build"]);
    assert!(wait_until(T, || tool_outputs(&w, "answer_task").len() == 2));
    assert_eq!(tool_outputs(&w, "answer_task")[1]["task"], "build");
    fake.wait_events(T, "the second request", |_| announced(&fake).len() == 2);
    assert!(
        announced(&fake)[1]
            .contains("Permission request: deploy wants to run: rsync -a dist/ host:. Allow?"),
        "{:?}",
        announced(&fake)
    );
    quiet(&w, &fake);
    w.ctl(&["say", "yes deploy"]);
    assert!(wait_until(T, || tool_outputs(&w, "answer_task").len() == 3));
    let answered = &tool_outputs(&w, "answer_task")[2];
    assert_eq!(answered["status"], "answered", "{answered}");
    assert_eq!(answered["task"], "deploy", "{answered}");
    for name in ["build", "deploy"] {
        wait_state(&w, name, "succeeded");
        assert_eq!(
            results(&w, name, 1)[0]["permission_denials"],
            json!([]),
            "{name}"
        );
    }
}

#[test]
fn the_announcement_says_the_command_short_and_redacted() {
    let key = "sk-proj-Xy12AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd";
    let (w, fake) = with_voice("", None);
    let command = format!(
        "curl_-sS_-H_Authorization:_Bearer_{key}_https://api.example.com/v1/deployments/production/rollouts/latest/status?wait=true&timeout=600"
    );
    w.start_task(&[
        "--name",
        "flaky",
        &format!("check the rollout @ask={command}"),
    ]);
    fake.wait_events(T, "the permission announcement", |_| {
        !announced(&fake).is_empty()
    });
    let text = announced(&fake).remove(0);
    let object = text
        .strip_prefix("Permission request: flaky wants to run: ")
        .and_then(|rest| rest.split_once(". Allow?"))
        .map(|(object, _)| object.to_owned())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        object.starts_with("curl -sS -H Authorization: Bearer [redacted]"),
        "{object}"
    );
    assert!(object.ends_with('…'), "cut for speech: {object}");
    assert!(
        object.chars().count() <= 80,
        "{} chars: {object}",
        object.chars().count()
    );
    // The key reaches neither the model, nor ctl tasks, nor the log.
    let waiting = w.task("flaky");
    for (place, text) in [
        (
            "the model",
            fake.records()
                .iter()
                .map(Value::to_string)
                .collect::<String>(),
        ),
        // (The prompt, the user's own words, is shown as given.)
        (
            "ctl tasks",
            format!("{} {}", waiting["activity"], waiting["waiting_for"]),
        ),
        ("the log", w.log()),
    ] {
        assert!(
            !text.contains("Xy12AbCd"),
            "the key reached {place}: {text}"
        );
    }
    assert!(
        waiting["waiting_for"]
            .as_str()
            .unwrap()
            .contains("[redacted]"),
        "{waiting}"
    );
    // The agent itself got the real command once allowed (the redaction is only for speech).
    w.ctl(&["approve", "flaky"]);
    wait_state(&w, "flaky", "succeeded");
    results(&w, "flaky", 1);
    assert!(
        agent_lines(&w, "flaky")
            .iter()
            .any(|l| l["type"] == "assistant" && l.to_string().contains(key)),
        "the agent's tool ran with its own input"
    );
}

#[test]
fn an_unanswered_request_is_denied_after_the_timeout_and_walkie_says_so() {
    let (w, fake) = with_voice("approval_timeout_s = 10", None);
    w.start_task(&["--name", "flaky", "migrate @ask=make_migrate"]);
    wait_state(&w, "flaky", "waiting");
    // Nobody answers: after 10 s the agent hears so and goes on without the tool.
    let mut last = Value::Null;
    assert!(wait_until(Duration::from_secs(40), || {
        last = w.task("flaky");
        last["state"] == "succeeded"
    }));
    results(&w, "flaky", 1);
    let told = agent_lines(&w, "flaky")
        .into_iter()
        .find(|l| l["type"] == "user" && l.to_string().contains("tool_result"))
        .unwrap();
    assert!(
        told.to_string()
            .contains("Nobody answered this permission request"),
        "{told}"
    );
    fake.wait_events(T, "the timeout's announcement", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("flaky (denied): nobody answered its request to run make migrate"))
    });
}

#[test]
fn a_withdrawn_request_leaves_the_queue_unasked() {
    let (w, fake) = with_voice("", None);
    // The button is held: nothing is announced while the agent withdraws its request.
    w.ctl(&["press"]);
    w.start_task(&["--name", "flaky", "check @ask=npm_test @withdraw=300"]);
    wait_state(&w, "flaky", "succeeded");
    assert!(
        w.log()
            .contains("task flaky: its permission request was withdrawn")
    );
    w.ctl(&["release"]);
    fake.wait_events(T, "the completion", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("flaky (succeeded)"))
    });
    quiet(&w, &fake);
    let texts = system_texts(&fake);
    assert!(
        texts.iter().all(|t| !t.contains("Permission request")),
        "a withdrawn request was asked: {texts:?}"
    );
    assert_eq!(
        w.ctl_json(&["status"])["conversation"]["pending_permissions"],
        0
    );
}

#[test]
fn approve_always_and_deny_from_the_command_line() {
    let w = started("");
    w.start_task(&["--name", "flaky", "test @ask=npm_test"]);
    wait_state(&w, "flaky", "waiting");
    let (code, out, err) = w.ctl(&["approve", "flaky", "--always"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "allowed flaky to run `npm test`");
    wait_state(&w, "flaky", "succeeded");
    // The rule it suggested holds for the rest of the session: the same command in the
    // next turn is not asked about.
    w.ctl(&["continue", "flaky", "again @ask=npm_test"]);
    wait_state(&w, "flaky", "succeeded");
    assert_eq!(results(&w, "flaky", 2).len(), 2);
    let asked = w.log().matches("task flaky asks to run `npm test`").count();
    assert_eq!(asked, 1, "asked again after always:\n{}", w.log());
    // Deny, with a reason the agent sees.
    w.ctl(&["continue", "flaky", "then @ask=git_push"]);
    wait_state(&w, "flaky", "waiting");
    let (code, out, err) = w.ctl(&["deny", "flaky", "not", "today"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "denied flaky to run `git push`");
    wait_state(&w, "flaky", "succeeded");
    results(&w, "flaky", 3);
    assert!(
        agent_lines(&w, "flaky")
            .iter()
            .any(|l| l.to_string().contains("The user said no: not today"))
    );
    // Nothing is pending now.
    let (code, _, err) = w.ctl(&["approve", "flaky"]);
    assert_eq!(code, 1);
    assert!(err.contains("not waiting for an approval"), "{err}");
}

// ---- steering and interrupts ----

#[test]
fn message_task_reaches_the_working_agent_at_its_next_step() {
    let (w, fake) = with_voice("", None);
    // The agent's step waits on an approval: a message sent now reaches it only at the
    // tool boundary after the approved command, however long the test takes.
    w.start_task(&["--name", "flaky", "build @ask=make"]);
    wait_state(&w, "flaky", "waiting");
    fake.wait_events(T, "the permission announcement", |_| {
        !announced(&fake).is_empty()
    });
    quiet(&w, &fake);
    w.ctl(&["say", "also @bash=make_lint"]);
    let out = tool_output(&w, "message_task");
    assert_eq!(out["status"], "sent", "{out}");
    assert_eq!(out["delivery"], "the agent takes it in at its next step");
    quiet(&w, &fake);
    // Not taken in yet: task_status says so.
    w.ctl(&["say", "what is it doing?"]);
    let status = tool_output(&w, "task_status");
    assert_eq!(status["last_message"], "sent, not taken in yet", "{status}");
    quiet(&w, &fake);
    w.ctl(&["approve", "flaky"]);
    let done = wait_state(&w, "flaky", "succeeded");
    // One turn took both: the message joined it at the tool boundary.
    let results = results(&w, "flaky", 1);
    assert_eq!(results.len(), 1, "{results:?}");
    let lines = agent_lines(&w, "flaky");
    let at = |wanted: &dyn Fn(&Value) -> bool| lines.iter().position(wanted);
    let ran = at(&|l| l["type"] == "user" && l.to_string().contains("tool_result")).unwrap();
    let replay = at(&|l| {
        l["type"] == "user" && l["isReplay"] == true && l.to_string().contains("make_lint")
    })
    .expect("the message was replayed: its receipt");
    assert!(ran < replay, "taken in after the approved command's result");
    assert!(
        lines[replay..]
            .iter()
            .any(|l| l["type"] == "assistant" && l.to_string().contains("make lint")),
        "the steered tool ran"
    );
    assert!(
        done["summary"]
            .as_str()
            .unwrap()
            .contains("The user sent a new message while you were working"),
        "{done}"
    );
    // task_status says it was taken in (the replayed uuid).
    quiet(&w, &fake);
    w.ctl(&["say", "what is it doing now?"]);
    assert!(wait_until(T, || tool_outputs(&w, "task_status").len() == 2));
    let status = &tool_outputs(&w, "task_status")[1];
    assert_eq!(status["last_message"], "taken in", "{status}");
    assert_eq!(status["warm"], true, "{status}");
}

#[test]
fn message_task_with_now_interrupts_the_turn_then_sends_the_text() {
    let (w, fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "build @bash=make_all @tool-ms=20000"]);
    assert!(wait_until(T, || w.task("flaky")["activity"] == "running `make all`"));
    let pid = w.task("flaky")["pid"].as_i64().unwrap();
    w.ctl(&["say", "instead @text=changed_course"]);
    let out = tool_output(&w, "message_task");
    assert_eq!(
        out["delivery"], "its current step is being interrupted; the agent gets this right after",
        "{out}"
    );
    let done = wait_state(&w, "flaky", "succeeded");
    assert_eq!(done["summary"], "changed course.", "{done}");
    assert_eq!(done["pid"].as_i64(), Some(pid), "the same process");
    let results = results(&w, "flaky", 2);
    let subtypes: Vec<&str> = results
        .iter()
        .map(|r| r["subtype"].as_str().unwrap())
        .collect();
    assert_eq!(subtypes, ["error_during_execution", "success"]);
    // The interrupted turn is not announced as the task's end: only the new one is.
    fake.wait_events(T, "the completion", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("flaky (succeeded)"))
    });
    assert!(
        system_texts(&fake)
            .iter()
            .all(|t| !t.contains("flaky (interrupted)")),
        "{:?}",
        system_texts(&fake)
    );
}

#[test]
fn interrupt_task_keeps_the_process_for_a_follow_up() {
    let (w, _fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "wait @bash=sleep_30 @tool-ms=30000"]);
    assert!(wait_until(T, || w.task("flaky")["activity"] == "running `sleep 30`"));
    let pid = w.task("flaky")["pid"].as_i64().unwrap();
    w.ctl(&["say", "stop that step"]);
    assert_eq!(
        tool_output(&w, "interrupt_task"),
        json!({"status": "interrupting", "task": "flaky"})
    );
    let interrupted = wait_state(&w, "flaky", "interrupted");
    assert_eq!(interrupted["pid"].as_i64(), Some(pid), "{interrupted}");
    assert_eq!(interrupted["warm"], true);
    assert!(alive(pid as i32));
    // A follow-up: the same process takes it, at once.
    w.ctl(&["say", "go on @text=picked_up_again"]);
    let out = tool_output(&w, "continue_task");
    assert_eq!(out, json!({"status": "started", "task": "flaky"}));
    let done = wait_state(&w, "flaky", "succeeded");
    assert_eq!(done["pid"].as_i64(), Some(pid));
    assert_eq!(done["summary"], "picked up again.");
    assert_eq!(done["runs"], 2);
    // Interrupting an agent between turns is refused, as is a one-shot agent's.
    let (code, _, err) = w.ctl(&["interrupt", "flaky"]);
    assert_eq!(code, 1);
    assert!(err.contains("not in the middle of a turn"), "{err}");
}

// ---- activity ----

#[test]
fn activity_is_reported_for_bash_write_and_waiting() {
    let (w, _fake) = with_voice("", None);
    w.start_task(&[
        "--name",
        "flaky",
        "fix @bash=cargo_test @write=src/parser.rs @ask=npm_test @tool-ms=3000",
    ]);
    let mut seen: Vec<String> = Vec::new();
    assert!(wait_until(T, || {
        let t = w.task("flaky");
        if let Some(a) = t["activity"].as_str() {
            if seen.last().map(String::as_str) != Some(a) {
                seen.push(a.to_owned());
            }
        }
        t["state"] == "waiting"
    }));
    for expected in [
        "running `cargo test`",
        "writing src/parser.rs",
        "waiting for your approval to run `npm test`",
    ] {
        assert!(
            seen.iter().any(|a| a == expected),
            "{expected} not in {seen:?}"
        );
    }
    let order: Vec<usize> = ["running `cargo test`", "writing src/parser.rs"]
        .iter()
        .map(|e| seen.iter().position(|a| a == e).unwrap())
        .collect();
    assert!(order[0] < order[1], "{seen:?}");
    // "What is it doing?" is answered from it, fresh.
    w.ctl(&["say", "what is it doing?"]);
    let status = tool_output(&w, "task_status");
    assert_eq!(status["state"], "waiting", "{status}");
    assert_eq!(
        status["activity"], "waiting for your approval to run `npm test`",
        "{status}"
    );
    assert_eq!(status["waiting_for_approval_to"], "run `npm test`");
    assert!(status["for_s"].as_u64().is_some(), "{status}");
    assert_eq!(status["turns"], 0);
    let tasks = w.ctl_json(&["tasks"]);
    assert!(tasks[0]["activity_since"].as_str().unwrap().ends_with('Z'));
    let (_, table, _) = w.ctl(&["tasks"]);
    assert!(
        table.contains("waiting") && table.contains("waiting for your approval to run `npm test`"),
        "{table}"
    );
    w.ctl(&["approve", "flaky"]);
    let done = wait_state(&w, "flaky", "succeeded");
    assert_eq!(done["turns"], 1, "{done}");
    assert_eq!(done["activity"], "waiting for a follow-up");
}

// ---- warm sessions ----

#[test]
fn a_warm_follow_up_reuses_the_process_and_a_cold_one_resumes() {
    let w = started("warm_s = 3");
    w.start_task(&["--name", "flaky", "first part @text=one"]);
    let first = wait_state(&w, "flaky", "succeeded");
    let pid = first["pid"].as_i64().expect("warm: the process stays");
    assert_eq!(first["warm"], true);
    let argv = cmdline(pid);
    // The prompt went on stdin: it is not in `ps`.
    assert!(argv.contains("--input-format stream-json"), "{argv}");
    assert!(!argv.contains("first part"), "{argv}");
    let session = first["session_id"].as_str().unwrap().to_owned();
    let (code, _, err) = w.ctl(&["continue", "flaky", "second part @text=two"]);
    assert_eq!(code, 0, "{err}");
    let second = wait_state(&w, "flaky", "succeeded");
    assert_eq!(second["summary"], "two.", "{second}");
    assert_eq!(second["pid"].as_i64(), Some(pid), "the same process");
    // warm_s later the agent is closed (stdin EOF) and exits.
    let mut last = Value::Null;
    assert!(wait_until(T, || {
        last = w.task("flaky");
        last["pid"].is_null()
    }));
    assert_eq!(last["warm"], false);
    assert_eq!(
        last["state"], "succeeded",
        "the exit changed nothing: {last}"
    );
    assert!(!alive(pid as i32));
    assert!(w.log().contains("task flaky: closed its agent's input"));
    // A cold follow-up resumes the session in a new process.
    w.ctl(&["continue", "flaky", "third part @text=three"]);
    let third = wait_state(&w, "flaky", "succeeded");
    let new_pid = third["pid"].as_i64().unwrap();
    assert_ne!(new_pid, pid);
    assert!(
        cmdline(new_pid).contains(&format!("--resume {session}")),
        "{}",
        cmdline(new_pid)
    );
    assert_eq!(third["session_id"], session.as_str());
    assert_eq!(third["summary"], "three.");
    assert_eq!(third["runs"], 3);
}

#[test]
fn message_task_to_a_warm_task_starts_its_next_turn_at_once() {
    let (w, fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "first @text=one"]);
    let first = wait_state(&w, "flaky", "succeeded");
    assert_eq!(first["warm"], true, "{first}");
    let pid = first["pid"].as_i64().unwrap();
    fake.wait_events(T, "the completion", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("flaky (succeeded)"))
    });
    quiet(&w, &fake);
    w.ctl(&["say", "also @text=two"]);
    assert_eq!(
        tool_output(&w, "message_task"),
        json!({"status": "started", "task": "flaky", "delivery": "its agent started on it at once"})
    );
    let mut last = Value::Null;
    assert!(wait_until(T, || {
        last = w.task("flaky");
        last["state"] == "succeeded" && last["runs"] == 2
    }));
    assert_eq!(last["summary"], "two.", "{last}");
    assert_eq!(last["pid"].as_i64(), Some(pid), "the same process: {last}");
    assert_eq!(results(&w, "flaky", 2).len(), 2);
}

#[test]
fn the_permission_mode_is_passed_through() {
    // The default, acceptEdits: the Bash command is asked about.
    let w = started("");
    w.start_task(&["--name", "asks", "test @ask=npm_test"]);
    let waiting = wait_state(&w, "asks", "waiting");
    let argv = cmdline(waiting["pid"].as_i64().unwrap());
    assert!(argv.contains("--permission-mode acceptEdits"), "{argv}");
    assert!(argv.contains("--permission-prompt-tool stdio"), "{argv}");
    w.ctl(&["cancel", "asks"]);
    wait_state(&w, "asks", "cancelled");
    // bypassPermissions, written by the user: nothing is asked.
    let w = started("permission_mode = \"bypassPermissions\"");
    w.start_task(&["--name", "bold", "test @ask=npm_test"]);
    let done = wait_state(&w, "bold", "succeeded");
    assert!(
        cmdline(done["pid"].as_i64().unwrap()).contains("--permission-mode bypassPermissions"),
        "{}",
        cmdline(done["pid"].as_i64().unwrap())
    );
    assert_eq!(results(&w, "bold", 1)[0]["permission_denials"], json!([]));
    assert!(
        !w.log().contains("task bold asks to run"),
        "asked under bypassPermissions:\n{}",
        w.log()
    );
}

#[test]
fn max_warm_closes_the_agent_idle_longest() {
    let w = started("warm_s = 300\nmax_warm = 1");
    w.start_task(&["--name", "older", "one @text=a"]);
    let older = wait_state(&w, "older", "succeeded");
    let older_pid = older["pid"].as_i64().unwrap();
    w.start_task(&["--name", "newer", "two @text=b"]);
    let newer = wait_state(&w, "newer", "succeeded");
    let mut last = Value::Null;
    assert!(wait_until(T, || {
        last = w.task("older");
        last["pid"].is_null()
    }));
    assert_eq!(last["warm"], false);
    assert!(!alive(older_pid as i32));
    assert!(
        w.log()
            .contains("task older: closing its warm agent (agent.max_warm = 1)")
    );
    let newer_now = w.task("newer");
    assert_eq!(newer_now["warm"], true, "{newer_now}");
    assert_eq!(newer_now["pid"], newer["pid"]);
    let (_, table, _) = w.ctl(&["tasks"]);
    assert!(table.contains("(warm) b"), "{table}");
}

// ---- cancel ----

#[test]
fn cancel_of_a_waiting_and_of_a_warm_task_leaves_no_process() {
    let (w, fake) = with_voice("", None);
    w.start_task(&["--name", "flaky", "risky @ask=rm_-rf_x"]);
    wait_state(&w, "flaky", "waiting");
    fake.wait_events(T, "the permission announcement", |_| {
        system_texts(&fake)
            .iter()
            .any(|t| t.contains("Permission request: flaky"))
    });
    assert!(!task_processes(&w, "flaky").is_empty());
    let (code, _, err) = w.ctl(&["cancel", "flaky"]);
    assert_eq!(code, 0, "{err}");
    let done = wait_state(&w, "flaky", "cancelled");
    assert!(done["pid"].is_null());
    assert!(
        task_processes(&w, "flaky").is_empty(),
        "{:?}",
        task_processes(&w, "flaky")
    );
    // Its request left the conversation's queue.
    assert!(wait_until(
        T,
        || w.ctl_json(&["status"])["conversation"]["pending_permissions"] == 0
    ));
    // A warm agent: cancel stops it; the task keeps its outcome.
    let name = w.start_task(&["--name", "warm one", "quick @text=ok"]);
    let warm = wait_state(&w, &name, "succeeded");
    assert_eq!(warm["warm"], true);
    assert!(!task_processes(&w, &name).is_empty());
    let (code, out, err) = w.ctl(&["cancel", &name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("cancelling {name}"));
    let mut last = Value::Null;
    assert!(wait_until(T, || {
        last = w.task(&name);
        last["pid"].is_null()
    }));
    assert_eq!(last["state"], "succeeded", "{last}");
    assert!(task_processes(&w, &name).is_empty());
}

// ---- the protocol's edges ----

#[test]
fn a_control_request_walkie_does_not_handle_is_answered_with_an_error() {
    let w = started("");
    w.start_task(&["--name", "odd", "hello @control=mcp_message"]);
    wait_state(&w, "odd", "succeeded");
    // The agent's stderr comes on another pipe than its result, and reaches the disk on
    // walkie's writer thread: it may land after the turn is reported over.
    let mut stderr = String::new();
    assert!(
        wait_until(T, || {
            stderr = std::fs::read_to_string(w.path("state/walkie/tasks/odd/stderr.log"))
                .unwrap_or_default();
            stderr.contains("control request mcp_message answered")
                && stderr.contains("walkie does not handle")
        }),
        "{stderr}"
    );
}

#[test]
fn an_old_prompt_command_runs_one_shot_and_says_how_to_switch() {
    let mut w = Walkie::new();
    w.start();
    let notice = "agent.command contains \"{prompt}\", so tasks run one-shot";
    assert!(wait_until(T, || w.log().contains(notice)), "{}", w.log());
    // While it runs it takes no interrupt, message or answer: there is no input to send
    // them on.
    let stalled = w.start_task(&["--name", "stalled", "@stall"]);
    assert!(wait_until(T, || w.task(&stalled)["pid"].is_i64()));
    for args in [&["interrupt", "stalled"][..], &["approve", "stalled"]] {
        let (code, _, err) = w.ctl(args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains("task stalled runs one-shot"),
            "{args:?}: {err}"
        );
    }
    w.ctl(&["cancel", "stalled"]);
    assert_eq!(w.wait_finished("stalled", T)["state"], "cancelled");
    let name = w.start_task(&["@text=fine"]);
    let done = w.wait_finished(&name, T);
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["warm"], false);
    assert!(done["pid"].is_null(), "one-shot: no warm process");
    let (code, _, err) = w.ctl(&["interrupt", &name]);
    assert_eq!(code, 1);
    assert!(err.contains("is not running"), "{err}");
    w.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(T, || w.log().matches(notice).count() == 2),
        "said again at the reload:\n{}",
        w.log()
    );
}
