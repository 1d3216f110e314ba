//! The model's tools (README.md, "Talking to it"; docs/ARCHITECTURE.md): JSON arguments in,
//! short JSON outputs out.
//!
//! The conversation core asks for a call with `Action::CallTool`; the daemon runs it here,
//! against the task engine, and hands the output back. Every call returns at once (a start
//! is a fork/exec, never a wait). Outputs are short because the model reads them aloud in
//! its own words. Every string in an output is redacted on its way out, whatever it holds
//! (agent text, a summary from an older state file, a task name, a path): what reaches the
//! model never carries a secret.

use std::time::Instant;

use serde_json::{Value, json};

use crate::tasks::claude::{Decision, MessageStatus};
use crate::tasks::engine::{Delivery, Logs};
use crate::tasks::redact::{self, Keep};
use crate::tasks::{TaskEngine, TaskError, TaskRecord};

/// Longest result text handed to the model.
const RESULT_CHARS: usize = 1500;

/// Runs tool `name` for the model and returns its output as sent back (a JSON string).
/// `consent`: the permission requests the user answered after they were announced (the
/// conversation core's rule); `answer_task` may answer only those.
pub fn run(
    engine: &mut TaskEngine,
    now: Instant,
    name: &str,
    arguments: &str,
    consent: &[String],
) -> String {
    let out = call(engine, now, name, arguments, consent);
    log::info!("tool {name} {} → {out}", redact::redact(arguments));
    out.to_string()
}

/// Runs tool `name` with its JSON `arguments`; every string of the output is redacted.
pub fn call(
    engine: &mut TaskEngine,
    now: Instant,
    name: &str,
    arguments: &str,
    consent: &[String],
) -> Value {
    let mut out = answer(engine, now, name, arguments, consent);
    redact_strings(&mut out);
    out
}

/// Redacts each string of `value` on its own (redacting the serialized JSON could cut
/// through a quote).
fn redact_strings(value: &mut Value) {
    match value {
        Value::String(s) => {
            let redacted = redact::redact(s);
            if redacted != *s {
                *s = redacted;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_strings),
        Value::Object(map) => map.values_mut().for_each(redact_strings),
        _ => {}
    }
}

fn answer(
    engine: &mut TaskEngine,
    now: Instant,
    name: &str,
    arguments: &str,
    consent: &[String],
) -> Value {
    let args: Value = match serde_json::from_str(if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    }) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return rejected("arguments must be a JSON object"),
        Err(e) => return rejected(&format!("arguments are not valid JSON: {e}")),
    };
    let text = |key: &str| {
        args.get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let need = |key: &str| text(key).ok_or_else(|| rejected(&format!("missing \"{key}\"")));
    match name {
        "start_task" => {
            let prompt = match need("prompt") {
                Ok(p) => p,
                Err(e) => return e,
            };
            match engine.start(prompt, text("name"), text("project"), now) {
                Ok(task) => json!({"status": "started", "task": task}),
                Err(e) => task_error(&e),
            }
        }
        "list_tasks" => {
            let tasks: Vec<Value> = engine
                .records()
                .iter()
                .rev()
                .take(20)
                .rev()
                .map(brief)
                .collect();
            json!({ "tasks": tasks })
        }
        "task_status" => match need("name").map(|n| engine.resolve(n).cloned()) {
            Err(e) => e,
            Ok(Err(e)) => task_error(&e),
            Ok(Ok(record)) => {
                let mut v = brief(&record);
                if let Some(view) = engine.live_view(&record) {
                    // "What is it doing?" is answered from this, fresh.
                    let a = &view.activity;
                    v["activity"] = json!(a.what);
                    v["for_s"] = json!(now.saturating_duration_since(a.since).as_secs());
                    v["turns"] = json!(a.turns);
                    if let Some(sentence) = &a.last_sentence {
                        v["last_sentence"] = json!(sentence);
                    }
                    if let Some(request) = &view.waiting_for {
                        v["waiting_for_approval_to"] = json!(request);
                    }
                    if view.warm {
                        v["warm"] = json!(true);
                    }
                    if let Some(status) = view.last_message {
                        v["last_message"] = json!(match status {
                            MessageStatus::Held => "held until its turn is interrupted",
                            MessageStatus::Sent => "sent, not taken in yet",
                            MessageStatus::TakenIn => "taken in",
                            MessageStatus::Dropped => "not taken in: the agent stopped first",
                        });
                    }
                }
                if record.state.is_running() {
                    if let Ok(Logs::Now { text: tail, .. }) = engine.logs(&record.name) {
                        v["recent_output"] = json!(redact::speech_excerpt(&tail, 400, Keep::Tail));
                    }
                }
                v
            }
        },
        "task_result" => match need("name").map(|n| engine.resolve(n).cloned()) {
            Err(e) => e,
            Ok(Err(e)) => task_error(&e),
            Ok(Ok(record)) => {
                let mut v = brief(&record);
                v["files_changed"] = json!(record.files_changed);
                if let Some(text) = &record.result_text {
                    v["result"] = json!(redact::speech_summary(text, RESULT_CHARS));
                }
                v
            }
        },
        "continue_task" => {
            let (task, prompt) = match (need("name"), need("prompt")) {
                (Ok(n), Ok(p)) => (n, p),
                (Err(e), _) | (_, Err(e)) => return e,
            };
            match engine.continue_task(task, prompt, now) {
                Ok((task, Delivery::NextStep)) => delivered(&task, Delivery::NextStep),
                Ok((task, _)) => json!({"status": "started", "task": task}),
                Err(e) => task_error(&e),
            }
        }
        "message_task" => {
            let (task, text) = match (need("name"), need("text")) {
                (Ok(n), Ok(t)) => (n, t),
                (Err(e), _) | (_, Err(e)) => return e,
            };
            let now_priority = args.get("now").and_then(Value::as_bool).unwrap_or(false);
            match engine.message(task, text, now_priority, now) {
                Ok((task, delivery)) => delivered(&task, delivery),
                Err(e) => task_error(&e),
            }
        }
        "interrupt_task" => match need("name").map(|n| engine.interrupt(n, now)) {
            Err(e) => e,
            Ok(Ok(task)) => json!({"status": "interrupting", "task": task}),
            Ok(Err(e)) => task_error(&e),
        },
        "answer_task" => {
            let task = match need("name") {
                Ok(n) => n,
                Err(e) => return e,
            };
            let reason = text("reason").map(str::to_owned);
            let decision = match text("decision") {
                Some("allow") => Decision::Allow,
                Some("always") => Decision::Always,
                Some("deny") => Decision::Deny { reason },
                Some(other) => {
                    return rejected(&format!(
                        "decision must be allow, deny or always, not \"{other}\""
                    ));
                }
                None => return rejected("missing \"decision\""),
            };
            let said = match decision {
                Decision::Allow => "allow",
                Decision::Always => "always",
                Decision::Deny { .. } => "deny",
            };
            match engine.answer(task, decision, Some(consent), now) {
                Ok((task, request)) => json!({
                    "status": "answered", "task": task, "decision": said, "request": request
                }),
                Err(e) => task_error(&e),
            }
        }
        "cancel_task" => match need("name").map(|n| engine.cancel(n, now)) {
            Err(e) => e,
            Ok(Ok(task)) => json!({"status": "cancelling", "task": task}),
            Ok(Err(e)) => task_error(&e),
        },
        other => rejected(&format!("unknown tool \"{other}\"")),
    }
}

/// Where a follow-up or a message went, in a few words the model can say.
fn delivered(task: &str, delivery: Delivery) -> Value {
    let (status, how) = match delivery {
        Delivery::NextStep => ("sent", "the agent takes it in at its next step"),
        Delivery::AfterInterrupt => (
            "sent",
            "its current step is being interrupted; the agent gets this right after",
        ),
        Delivery::NextTurn => ("started", "its agent started on it at once"),
        Delivery::Resumed | Delivery::AfterClose => {
            ("started", "a new run continues its session with it")
        }
    };
    json!({"status": status, "task": task, "delivery": how})
}

fn brief(r: &TaskRecord) -> Value {
    json!({
        "task": r.name,
        "state": r.state.as_str(),
        "project": r.project,
        "summary": r.summary,
        "started_at": r.started_at,
        "ended_at": r.ended_at,
    })
}

fn rejected(reason: &str) -> Value {
    json!({"status": "rejected", "reason": reason})
}

/// A refused request, with what the model needs to ask the user a good question.
pub fn task_error(e: &TaskError) -> Value {
    let mut v = rejected(&e.to_string());
    match e {
        TaskError::Ambiguous { candidates, .. } => {
            v["status"] = json!("ambiguous");
            v["candidates"] = json!(candidates);
        }
        TaskError::NotFound(_) => v["status"] = json!("not_found"),
        TaskError::Limit { running, .. } => v["running"] = json!(running),
        _ => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::engine::rig::{EngineRig, finished_record};

    /// One of each kind the redaction must catch (the fake agent's `@secret` set).
    const KEY: &str = "sk-proj-Xy12AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd";
    const TOKEN: &str = "ghp_1234567890abcdefghijABCDEFGHIJ123456";
    const URL: &str = "https://bob:hunter2@example.com/repo.git";
    const ASSIGNMENT: &str = "DB_PASSWORD=correct-horse-battery-staple";
    /// What must never appear in a tool output, even cut short.
    const LEAKS: &[&str] = &["Xy12AbCd", "ghp_1234", "hunter2", "correct-horse"];

    fn clean(out: &Value) -> &Value {
        let text = out.to_string();
        for leak in LEAKS {
            assert!(!text.contains(leak), "{leak} reached the model: {text}");
        }
        out
    }

    fn tool(rig: &mut EngineRig, name: &str, arguments: Value) -> Value {
        let out = call(&mut rig.engine, rig.t0, name, &arguments.to_string(), &[]);
        clean(&out).clone()
    }

    /// The agent prints its prompt (secrets and all) and waits.
    fn rig(records: Vec<TaskRecord>) -> EngineRig {
        EngineRig::new(&["sh", "-c", "echo \"$0\"; sleep 30", "{prompt}"], records)
    }

    #[test]
    fn start_task_answers_with_a_name_that_holds_no_secret() {
        let mut rig = rig(Vec::new());
        let out = tool(
            &mut rig,
            "start_task",
            json!({"prompt": format!("{URL} clone it")}),
        );
        assert_eq!(out["status"], "started", "{out}");
        let name = out["task"].as_str().unwrap().to_string();
        // The name the model got is the task's real name: made from the redacted prompt,
        // not redacted on the way out (the model could not name it then).
        assert_eq!(rig.engine.resolve(&name).unwrap().name, name, "{out}");
        // A name the user gave is theirs, but not a secret's characters either.
        let out = tool(
            &mut rig,
            "start_task",
            json!({"prompt": "x", "name": format!("set {ASSIGNMENT}")}),
        );
        assert_eq!(out["status"], "started", "{out}");
        let name = out["task"].as_str().unwrap();
        assert_eq!(rig.engine.resolve(name).unwrap().name, name, "{out}");
        // At the limit: refused, naming the running tasks.
        let out = tool(&mut rig, "start_task", json!({"prompt": "three"}));
        assert_eq!(out["status"], "rejected");
        assert_eq!(out["running"].as_array().unwrap().len(), 2, "{out}");
        for (arguments, reason) in [
            ("{}", "missing \"prompt\""),
            ("[1]", "arguments must be a JSON object"),
            ("{nope", "arguments are not valid JSON"),
        ] {
            let out = call(&mut rig.engine, rig.t0, "start_task", arguments, &[]);
            assert_eq!(out["status"], "rejected");
            assert!(out["reason"].as_str().unwrap().contains(reason), "{out}");
        }
        let out = tool(&mut rig, "format_disk", json!({}));
        assert_eq!(out["reason"], "unknown tool \"format_disk\"");
    }

    #[test]
    fn task_status_shows_recent_output_redacted() {
        let mut rig = rig(Vec::new());
        let prompt = format!("{KEY} {TOKEN} {URL} {ASSIGNMENT} and then more words");
        let out = tool(
            &mut rig,
            "start_task",
            json!({"prompt": prompt, "name": "leaky"}),
        );
        assert_eq!(out["task"], "leaky");
        assert!(rig.pump_until(|r| matches!(
            r.engine.logs("leaky"),
            Ok(Logs::Now { text, .. }) if text.contains("more words")
        )));
        let out = tool(&mut rig, "task_status", json!({"name": "leaky"}));
        assert_eq!(out["state"], "running");
        let recent = out["recent_output"].as_str().unwrap();
        assert!(
            recent.contains("[redacted]") && recent.contains("more words"),
            "{out}"
        );
        let out = tool(&mut rig, "task_status", json!({"name": "nobody"}));
        assert_eq!(out["status"], "not_found");
        let out = tool(&mut rig, "task_status", json!({}));
        assert_eq!(out["reason"], "missing \"name\"");
    }

    #[test]
    fn list_and_result_redact_what_an_older_state_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let records = vec![
            finished_record(
                "deploy",
                dir.path(),
                &format!("pushed with {TOKEN}"),
                &format!("Done. Used {KEY} and {URL}; {ASSIGNMENT}."),
            ),
            finished_record("docs-build", dir.path(), "fine", "ok"),
            finished_record("docs-lint", dir.path(), "fine", "ok"),
        ];
        let mut rig = rig(records);
        let out = tool(&mut rig, "list_tasks", json!({}));
        let tasks = out["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 3);
        assert_eq!(tasks[0]["task"], "deploy");
        assert!(tasks[0]["summary"].as_str().unwrap().contains("[redacted]"));
        let out = tool(&mut rig, "task_result", json!({"name": "deploy"}));
        assert_eq!(out["state"], "succeeded");
        assert_eq!(out["files_changed"], json!(["src/lib.rs"]));
        let result = out["result"].as_str().unwrap();
        assert!(
            result.starts_with("Done.") && result.contains("[redacted]"),
            "{out}"
        );
        let out = tool(&mut rig, "task_result", json!({"name": "docs"}));
        assert_eq!(out["status"], "ambiguous");
        assert_eq!(out["candidates"], json!(["docs-build", "docs-lint"]));
    }

    #[test]
    fn continue_and_cancel_reach_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let mut old = finished_record("story", dir.path(), "first part", "ok");
        let mut no_session = finished_record("orphan", dir.path(), "x", "y");
        no_session.session_id = None;
        old.summary = Some(format!("first part with {KEY}"));
        let mut rig = rig(vec![old, no_session]);
        let out = tool(
            &mut rig,
            "continue_task",
            json!({"name": "story", "prompt": format!("now use {TOKEN}")}),
        );
        assert_eq!(out, json!({"status": "started", "task": "story"}));
        let out = tool(
            &mut rig,
            "continue_task",
            json!({"name": "story", "prompt": "more"}),
        );
        assert!(
            out["reason"].as_str().unwrap().contains("still running"),
            "{out}"
        );
        let out = tool(
            &mut rig,
            "continue_task",
            json!({"name": "orphan", "prompt": "more"}),
        );
        assert!(
            out["reason"].as_str().unwrap().contains("no agent session"),
            "{out}"
        );
        let out = tool(&mut rig, "continue_task", json!({"name": "story"}));
        assert_eq!(out["reason"], "missing \"prompt\"");
        let out = tool(&mut rig, "cancel_task", json!({"name": "story"}));
        assert_eq!(out, json!({"status": "cancelling", "task": "story"}));
        let out = tool(&mut rig, "cancel_task", json!({"name": "orphan"}));
        assert!(
            out["reason"].as_str().unwrap().contains("not running"),
            "{out}"
        );
    }
}
