//! The model's tools (DESIGN.md §3): JSON arguments in, short JSON outputs out.
//!
//! The conversation core asks for a call with `Action::CallTool`; the daemon runs it here,
//! against the task engine, and hands the output back. Every call returns at once (a start
//! is a fork/exec, never a wait). Outputs are short because the model reads them aloud in
//! its own words, and everything in them that came from an agent is redacted.

use std::time::Instant;

use serde_json::{Value, json};

use crate::tasks::engine::Logs;
use crate::tasks::{TaskEngine, TaskError, TaskRecord, redact};

/// Longest result text handed to the model.
const RESULT_CHARS: usize = 1500;

/// Runs tool `name` for the model and returns its output as sent back (a JSON string).
pub fn run(engine: &mut TaskEngine, now: Instant, name: &str, arguments: &str) -> String {
    let out = call(engine, now, name, arguments);
    log::info!("tool {name} {} → {out}", redact::redact(arguments));
    out.to_string()
}

/// Runs tool `name` with its JSON `arguments`.
pub fn call(engine: &mut TaskEngine, now: Instant, name: &str, arguments: &str) -> Value {
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
                if record.state.is_running() {
                    if let Ok(Logs::Now { text: tail, .. }) = engine.logs(&record.name) {
                        let recent: String = last_chars(&tail, 400);
                        v["recent_output"] = json!(redact::speech_summary(&recent, 400));
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
                Ok(task) => json!({"status": "started", "task": task}),
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

fn last_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    s.chars().skip(count.saturating_sub(n)).collect()
}
