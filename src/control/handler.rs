//! What each control request means (README.md, "Using it without a microphone"): a request
//! becomes calls on the daemon's parts and one reply, or a first reply and a subscription for
//! streamed lines.
//!
//! The server (server.rs) moves the bytes and owns the connections; the daemon hands each
//! parsed request here with its parts and carries out the [`Handled`] answer. Nothing here
//! touches a socket.

use std::time::Instant;

use serde_json::{Value, json};

use super::proto::{self, Request};
use super::server::Subscription;
use crate::button::Button;
use crate::conversation::Conversation;
use crate::tasks::claude::Decision;
use crate::tasks::engine::{Logs, dropped_note};
use crate::tasks::{TaskEngine, TaskError};

/// The parts a request may look at or act on.
pub struct Parts<'a> {
    pub now: Instant,
    pub engine: &'a mut TaskEngine,
    pub conv: &'a mut Conversation,
    pub button: &'a mut Button,
}

/// What only the daemon knows, for `status`; asked for only when a status is requested.
#[derive(Debug, Clone, PartialEq)]
pub struct Vitals {
    /// `connected`, `connecting`, `backoff`, `failed` or `disabled`.
    pub link: &'static str,
    pub link_error: Option<String>,
    /// The audio engine's status object.
    pub audio: Value,
    pub uptime_s: u64,
    pub shutting_down: bool,
    /// The control server's own status (connections, limit, requests served).
    pub control: Value,
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// One reply line.
    Reply(Value),
    /// A first reply line; then the connection streams what the subscription names.
    Subscribe(Value, Subscription),
    /// The reply needs the disk: the task engine brings the log with
    /// `TaskEvent::LogsRead { ticket, .. }`, then [`logs_reply`] makes the one reply.
    Later { ticket: u64, task: String },
}

/// Carries out `req` and says what to answer.
pub fn handle(req: Request, parts: Parts<'_>, vitals: impl FnOnce() -> Vitals) -> Handled {
    let Parts {
        now,
        engine,
        conv,
        button,
    } = parts;
    let reply = match req {
        Request::Status => json!({"ok": true, "status": status(engine, conv, button, vitals())}),
        Request::Tasks => json!({"ok": true, "tasks": engine.tasks_json(now)}),
        Request::Start {
            prompt,
            name,
            project,
        } => started(engine.start(&prompt, name.as_deref(), project.as_deref(), now)),
        Request::Continue { name, prompt } => started(
            engine
                .continue_task(&name, &prompt, now)
                .map(|(task, _)| task),
        ),
        Request::Cancel { name } => started(engine.cancel(&name, now)),
        Request::Interrupt { name } => started(engine.interrupt(&name, now)),
        // The user themself: no "user turn after the announcement" rule (that is for the
        // model's answer_task).
        Request::Approve { name, always } => {
            let decision = if always {
                Decision::Always
            } else {
                Decision::Allow
            };
            answered(engine.answer(&name, decision, None, now))
        }
        Request::Deny { name, reason } => {
            answered(engine.answer(&name, Decision::Deny { reason }, None, now))
        }
        Request::Result { name } => match engine.resolve(&name) {
            Ok(record) => {
                let mut v = serde_json::to_value(record).unwrap_or(Value::Null);
                v["log"] = json!(engine.log_path(&record.name));
                json!({"ok": true, "task": v})
            }
            Err(e) => error_reply(&e),
        },
        Request::Logs { name, follow } => match engine.logs(&name) {
            Ok(Logs::Now {
                task,
                mut text,
                dropped,
            }) => {
                if dropped > 0 {
                    text.push_str(&dropped_note(dropped));
                    text.push('\n');
                }
                if follow && engine.set_followed(&task, true) {
                    let first =
                        json!({"ok": true, "task": task, "text": text, "dropped_bytes": dropped});
                    return Handled::Subscribe(first, Subscription::Logs { task });
                }
                let mut reply = logs_reply(engine, &task, text);
                reply["dropped_bytes"] = json!(dropped);
                reply
            }
            Ok(Logs::Later { task, ticket }) => return Handled::Later { ticket, task },
            Err(e) => error_reply(&e),
        },
        Request::Events => {
            return Handled::Subscribe(
                json!({"ok": true, "subscribed": "events"}),
                Subscription::Events,
            );
        }
        Request::Say { text } => {
            let at = crate::clock::now_rfc3339();
            match conv.handle_say(now, &text, &at) {
                Ok(()) => json!({"ok": true}),
                Err(e) => proto::error_reply(e.to_string()),
            }
        }
        Request::Press => {
            button.press(now);
            json!({"ok": true})
        }
        Request::Release => {
            button.release(now);
            json!({"ok": true})
        }
        Request::Transcript => json!({"ok": true, "transcript": conv.transcript()}),
    };
    Handled::Reply(reply)
}

/// The last reply of `logs`: the text and the task's state at the end.
pub fn logs_reply(engine: &TaskEngine, task: &str, text: String) -> Value {
    let state = engine
        .resolve(task)
        .map(|r| r.state.as_str())
        .unwrap_or("unknown");
    json!({"ok": true, "task": task, "text": text, "end": true, "state": state})
}

/// `{"ok":true,"task":NAME}` for a request that acted on a task.
fn started(result: Result<String, TaskError>) -> Value {
    match result {
        Ok(task) => json!({"ok": true, "task": task}),
        Err(e) => error_reply(&e),
    }
}

/// `{"ok":true,"task":NAME,"request":"run `npm test`"}` for an answered permission request.
fn answered(result: Result<(String, String), TaskError>) -> Value {
    match result {
        Ok((task, request)) => json!({"ok": true, "task": task, "request": request}),
        Err(e) => error_reply(&e),
    }
}

/// A refused request: the message, plus what the tool output would carry (candidates of an
/// ambiguous name, the running tasks at the limit).
pub fn error_reply(e: &TaskError) -> Value {
    let mut v = crate::tools::task_error(e);
    let reason = v.get("reason").cloned().unwrap_or(Value::Null);
    v["ok"] = json!(false);
    v["error"] = reason;
    v
}

/// The object `walkie ctl status --json` prints (README.md, "The control socket").
fn status(engine: &TaskEngine, conv: &Conversation, button: &Button, vitals: Vitals) -> Value {
    let recent: Vec<_> = conv.transcript().iter().rev().take(4).rev().collect();
    json!({
        "link": vitals.link,
        "link_error": vitals.link_error,
        "audio": vitals.audio,
        "button": button.status(),
        "tasks": {"running": engine.running_count(), "finished": engine.finished_count()},
        "containment": engine.containment().status(),
        "uptime_s": vitals.uptime_s,
        "pid": std::process::id(),
        "conversation": conv.status(),
        "recent_transcript": recent,
        "shutting_down": vitals.shutting_down,
        "control": vitals.control,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::button::ButtonEvent;
    use crate::config::ButtonConfig;
    use crate::conversation::ConversationSettings;
    use crate::tasks::engine::rig::EngineRig;

    /// The daemon's parts, real ones, in a private directory; agents are `sleep`.
    struct Rig {
        tasks: EngineRig,
        conv: Conversation,
        button: Button,
    }

    impl Rig {
        fn new() -> Rig {
            let button = Button::new(&ButtonConfig {
                device: "none".into(),
                ..ButtonConfig::default()
            })
            .unwrap();
            Rig {
                tasks: EngineRig::new(&["sleep", "30"], Vec::new()),
                conv: Conversation::new(ConversationSettings::default()),
                button,
            }
        }

        fn ask(&mut self, req: Request) -> Handled {
            let parts = Parts {
                now: self.tasks.t0,
                engine: &mut self.tasks.engine,
                conv: &mut self.conv,
                button: &mut self.button,
            };
            handle(req, parts, || Vitals {
                link: "backoff",
                link_error: Some("connection refused".into()),
                audio: json!({"state": "disabled"}),
                uptime_s: 7,
                shutting_down: false,
                control: json!({"connections": 1}),
            })
        }

        fn reply(&mut self, req: Request) -> Value {
            match self.ask(req) {
                Handled::Reply(v) => v,
                other => panic!("expected one reply, got {other:?}"),
            }
        }

        fn start(&mut self, name: &str) -> Value {
            self.reply(Request::Start {
                prompt: "work".into(),
                name: Some(name.into()),
                project: None,
            })
        }
    }

    #[test]
    fn status_combines_the_parts_and_the_daemon_vitals() {
        let mut rig = Rig::new();
        let v = rig.reply(Request::Status);
        assert_eq!(v["ok"], true);
        let st = &v["status"];
        assert_eq!(st["link"], "backoff");
        assert_eq!(st["link_error"], "connection refused");
        assert_eq!(st["audio"]["state"], "disabled");
        assert_eq!(st["button"]["state"], "opening");
        assert_eq!(st["tasks"], json!({"running": 0, "finished": 0}));
        assert_eq!(st["uptime_s"], 7);
        assert_eq!(st["pid"], std::process::id());
        assert_eq!(st["conversation"]["session_ready"], false);
        assert_eq!(st["shutting_down"], false);
        assert_eq!(
            st["containment"],
            json!({"kind": "scan", "reason": "unit test"})
        );
    }

    #[test]
    fn task_requests_reach_the_engine_and_refusals_explain_themselves() {
        let mut rig = Rig::new();
        let empty = rig.reply(Request::Start {
            prompt: "  ".into(),
            name: None,
            project: None,
        });
        assert_eq!(
            empty,
            json!({"ok": false, "status": "rejected", "reason": "the prompt is empty", "error": "the prompt is empty"})
        );
        assert_eq!(
            rig.start("flaky test"),
            json!({"ok": true, "task": "flaky-test"})
        );
        assert_eq!(
            rig.start("flaky build"),
            json!({"ok": true, "task": "flaky-build"})
        );
        let limit = rig.start("third");
        assert_eq!(limit["ok"], false);
        assert_eq!(limit["running"], json!(["flaky-test", "flaky-build"]));
        let tasks = rig.reply(Request::Tasks);
        assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2);
        assert_eq!(tasks["tasks"][0]["state"], "running");
        let ambiguous = rig.reply(Request::Cancel {
            name: "flaky".into(),
        });
        assert_eq!(ambiguous["ok"], false);
        assert_eq!(
            ambiguous["candidates"],
            json!(["flaky-build", "flaky-test"])
        );
        assert!(
            ambiguous["error"].as_str().unwrap().contains("could mean"),
            "{ambiguous}"
        );
        let missing = rig.reply(Request::Result {
            name: "nothing".into(),
        });
        assert_eq!(missing["ok"], false);
        assert_eq!(missing["status"], "not_found");
        let result = rig.reply(Request::Result {
            name: "build".into(),
        });
        assert_eq!(result["task"]["name"], "flaky-build");
        assert!(
            result["task"]["log"]
                .as_str()
                .unwrap()
                .ends_with("tasks/flaky-build/log.txt"),
            "{result}"
        );
        assert_eq!(
            rig.reply(Request::Cancel {
                name: "flaky-t".into()
            }),
            json!({"ok": true, "task": "flaky-test"})
        );
        let cont = rig.reply(Request::Continue {
            name: "flaky-build".into(),
            prompt: "more".into(),
        });
        assert!(
            cont["error"].as_str().unwrap().contains("still running"),
            "{cont}"
        );
    }

    #[test]
    fn logs_of_a_running_task_can_be_followed_and_events_subscribe() {
        let mut rig = Rig::new();
        rig.start("talker");
        match rig.ask(Request::Logs {
            name: "talk".into(),
            follow: true,
        }) {
            Handled::Subscribe(first, Subscription::Logs { task }) => {
                assert_eq!(task, "talker");
                assert_eq!(first["ok"], true);
                assert!(first.get("end").is_none(), "{first}");
            }
            other => panic!("{other:?}"),
        }
        let once = rig.reply(Request::Logs {
            name: "talker".into(),
            follow: false,
        });
        assert_eq!(once["end"], true);
        assert_eq!(once["state"], "running");
        assert_eq!(
            rig.ask(Request::Events),
            Handled::Subscribe(
                json!({"ok": true, "subscribed": "events"}),
                Subscription::Events
            )
        );
        let missing = rig.reply(Request::Logs {
            name: "nobody".into(),
            follow: true,
        });
        assert_eq!(missing["ok"], false);
    }

    #[test]
    fn say_needs_a_session_and_the_button_and_transcript_are_reached() {
        let mut rig = Rig::new();
        let say = rig.reply(Request::Say {
            text: "hello".into(),
        });
        assert_eq!(
            say,
            json!({"ok": false, "error": "not connected to the Realtime API"})
        );
        assert_eq!(rig.reply(Request::Press), json!({"ok": true}));
        assert_eq!(rig.button.poll_event(), Some(ButtonEvent::Pressed));
        assert_eq!(rig.reply(Request::Release), json!({"ok": true}));
        assert!(matches!(
            rig.button.poll_event(),
            Some(ButtonEvent::Released { .. })
        ));
        assert_eq!(
            rig.reply(Request::Transcript),
            json!({"ok": true, "transcript": []})
        );
    }
}
