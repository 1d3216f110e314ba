//! `make demo` (tools/demo.sh) runs the whole voice loop on the local stand-ins.

use std::path::Path;
use std::process::Command;

mod common;

#[test]
fn the_demo_runs_the_voice_loop_end_to_end() {
    common::fakes_built();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_walkie")).parent().unwrap();
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/demo.sh"))
        .env("WALKIE_BIN_DIR", bin_dir)
        .env("WALKIE_DEMO_DIR", dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The demo says what the fake agent's @directives are before it uses them.
    assert!(text.contains("acts on @directives"), "{text}");
    // The spoken request started the task through the model's function call...
    assert!(text.contains("start_task("), "{text}");
    assert!(
        text.contains(
            "function_call_output {\"status\":\"started\",\"task\":\"flaky-login-test\"}"
        ),
        "{text}"
    );
    // The agent asked to run the tests: walkie put the question to the user once idle...
    assert!(
        text.contains(
            "system: Permission request: flaky-login-test wants to run: python3 -m pytest -q. Allow?"
        ),
        "{text}"
    );
    assert!(
        text.contains("assistant: flaky-login-test wants to run: python3 -m pytest -q. Allow?"),
        "{text}"
    );
    assert!(
        text.contains("event  | flaky-login-test waiting: wants to run python3 -m pytest -q"),
        "{text}"
    );
    // ...the typed "yes" came after it, so the model's answer_task counted.
    assert!(text.contains("user: Yes, allow it."), "{text}");
    let question = text.find("system: Permission request").unwrap();
    let answer = text
        .find("function_call_output {\"decision\":\"allow\",\"request\":\"run `python3 -m pytest -q`\",\"status\":\"answered\",\"task\":\"flaky-login-test\"}")
        .unwrap_or_else(|| panic!("no accepted answer_task: {text}"));
    assert!(question < answer, "{text}");
    // ...the task finished and the completion was announced as a system message.
    assert!(
        text.contains("flaky-login-test         succeeded"),
        "{text}"
    );
    assert!(text.contains("system: Task update"), "{text}");
    assert!(text.contains("assistant: Task update:"), "{text}");
    // `walkie ctl events` showed both completions as they happened.
    assert!(
        text.contains("event  | flaky-login-test succeeded: The login test is fixed"),
        "{text}"
    );
    assert!(text.contains("event  | changelog succeeded"), "{text}");
    // The typed turn started a second task, also announced.
    assert!(
        text.contains("changelog                succeeded"),
        "{text}"
    );
    assert!(
        text.contains("user: Also start a task to update the changelog."),
        "{text}"
    );
    assert_eq!(text.matches("system: Task update").count(), 2, "{text}");
    // Everything said landed in the output WAV: several seconds of sound.
    let wav = std::fs::read(dir.path().join("walkie-output.wav")).unwrap();
    let loud = wav[44..]
        .chunks_exact(2)
        .filter(|c| i16::from_le_bytes([c[0], c[1]]).abs() > 500)
        .count();
    assert!(loud > 24_000 * 3, "only {loud} loud samples in the output");
}
