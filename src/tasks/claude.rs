//! The Claude CLI kept open on stdin (`--input-format stream-json`): one [`ClaudeSession`]
//! per agent process, a sans-IO core. It owns no fd and reads no clock: the engine feeds it
//! the [`StreamEvent`]s its [`StreamParser`](super::stream::StreamParser) got from the
//! agent's stdout and the current time, calls its verbs (send a message, interrupt, answer a
//! permission request, close), writes [`ClaudeSession::stdin_pending`] to the agent's stdin
//! and drains [`ClaudeSession::poll_event`]. The protocol itself, observed with the real CLI,
//! is in `tests/fixtures/claude-cli/CONTROL.md`, with the runs beside it.
//!
//! What it tracks: whether a turn runs (a turn ends at its `result` line, not at exit), the
//! permission requests the agent waits on (oldest first, each with its deadline), which of
//! our user messages the agent has taken in (the replayed uuid is the receipt), the tool in
//! flight, and from these the live activity in words, redacted and short enough to speak.
//!
//! # Design note for wiring it in (issue 10, second phase)
//!
//! **Spawning.** Which protocol a task uses comes from `AgentConfig::protocol_in_use` in
//! `config.rs` (log its notice at start and on SIGHUP: an old `{prompt}` command runs
//! one-shot and the line says how to switch). With `claude` the argv is `agent.command` +
//! [`agent_args`]`(agent.permission_mode)` (+ `agent.resume` with `{session}` for a cold
//! follow-up), the environment gets [`SESSION_STATE_ENV`] on top of `env_pass`/`env_set`,
//! and stdin is a pipe (today it is `/dev/null`). The prompt is never in argv:
//! [`ClaudeSession::new`] queues it as the first user line, with `agent.approval_timeout_s`.
//! `oneshot` keeps today's path untouched (`StreamParser` over stdout, `{prompt}` in argv,
//! stdin `/dev/null`). The configuration already validates the `claude` command (no flag
//! walkie adds itself) but today's engine still expands `command` as a one-shot template
//! whatever the protocol: the change that wires this core in must also flip the default
//! `agent.command` to `["claude"]` (the README, docs/CONFIGURATION.md and `walkie config
//! example` with it).
//!
//! **stdin ownership.** The engine's per-task live state owns the write end as a
//! `mio::unix::pipe::Sender` (non-blocking, registered for WRITABLE only while
//! [`ClaudeSession::stdin_pending`] is not empty). On WRITABLE, and right after every verb,
//! write what is pending until `WouldBlock` and call [`ClaudeSession::stdin_written`] with
//! the count; `EPIPE` means the agent is gone: drop the sender and let the exit path finish
//! the task. Once [`ClaudeSession::wants_stdin_closed`] is true, drop the sender: EOF tells
//! the CLI to finish what is queued and exit (30–60 ms after its last `result`). The pending
//! bytes are bounded ([`SendError::Backlog`]), so an agent that stops reading costs at most
//! [`MAX_STDIN_BACKLOG`].
//!
//! **Outcome per turn.** [`SessionEvent::TurnEnded`] is the completion the conversation
//! announces (summary from the result text, as today, redacted). The process exit is no
//! longer the end of the task's work: the CLI's exit status follows the *last* turn's
//! `is_error` (an interrupted last turn exits 1 — the interrupt-stream fixture), so a warm
//! process closed by walkie after an interrupted turn must not make a succeeded task
//! `failed`. Record each turn's outcome at `TurnEnded`; at exit only a crash (a signal, or
//! an exit while a turn runs or before any `result`) changes it.
//!
//! **Task states.** `running` while [`ClaudeSession::is_running`]; `waiting` while
//! [`ClaudeSession::pending_permissions`] is not empty; after [`SessionEvent::Idle`] the task
//! is finished for the user (its turn's outcome) yet its process is warm: show `warm: true`
//! in `walkie ctl tasks`, keep `pid`.
//!
//! **Warm sessions.** At [`SessionEvent::Idle`] start the `agent.warm_s` timer (the idle
//! instant is [`ClaudeSession::idle_since`]); when it fires, or when more than
//! `agent.max_warm` processes are idle (close the one idle longest first), call
//! [`ClaudeSession::close`]. `continue_task`/`message_task` on a warm task is
//! [`ClaudeSession::send_message`] (same pid, starts at once); on a cold one it spawns with
//! `--resume` as today and the text as the first user line. Shutdown and `cancel` keep
//! today's escalation (SIGINT first): closing stdin is only for idle processes.
//!
//! **Approvals.** [`SessionEvent::PermissionRequested`] marks the task `waiting` and queues
//! an announcement in the conversation core, like a completion (earcon first, when the user
//! is idle): "NAME wants to VERB: OBJECT. Allow?" from [`Permission::verb`] and
//! [`Permission::object`] (already redacted and short). Across tasks, ask one request at a
//! time, oldest [`Permission::since`] first. The conversation core must record when it
//! announced each request and accept `answer_task` only if a user turn (speech committed, or
//! `walkie ctl say`) came after that; otherwise the tool output says so and nothing is sent.
//! `walkie ctl approve/deny` are the user themself and need no such turn. The answer is
//! [`ClaudeSession::answer`]. Deadlines: put [`ClaudeSession::poll_timeout`] in the engine's
//! timer heap and call [`ClaudeSession::handle_timeout`]; a [`SessionEvent::PermissionTimedOut`]
//! is announced ("nobody answered, so I told it no"). [`SessionEvent::PermissionWithdrawn`]
//! removes the request from the conversation's queue (and its announcement if not yet said).
//! Control requests walkie does not handle are answered with an error here, never left
//! hanging ([`SessionEvent::Refused`] is only for the log).
//!
//! **Steering and interrupt.** `message_task {text}` → [`ClaudeSession::send_message`] with
//! `now = false`; `now = true` interrupts the turn and sends the text after its `result`.
//! The tool output returns the message uuid; `task_status` reports
//! [`ClaudeSession::message_status`] of the last one ("sent", "taken in", "not delivered").
//! `interrupt_task` / `walkie ctl interrupt` → [`ClaudeSession::interrupt`]; the process and
//! session stay. `cancel` keeps its meaning (everything stops, processes gone).
//!
//! **Details worth knowing.** `always` echoes every rule the CLI suggested in
//! `updatedPermissions`, as its own "don't ask again" does; a suggestion's `destination` may be
//! `localSettings` (the project's `.claude/settings.local.json`), so "always" outlives the
//! session — say so in the tool description. `cancel` of a waiting task must also drop its
//! requests from the conversation's queue (the process is gone: no withdrawal comes).
//! Receipts need `--replay-user-messages` ([`agent_args`] passes it); without replays every
//! `result` leaves the session idle. The first [`StreamEvent::Session`] still gives the
//! session id for `--resume`. Seed [`ClaudeSession::new`] with `fastrand::u64(..)`.
//!
//! **What the conversation core needs** (as actions and inputs, no engine reference):
//! a `PermissionAsked {task, request_id, verb, object, since}` input and its withdrawal, the
//! "user turn after announcement" rule above, `answer_task`/`message_task`/`interrupt_task`
//! as tool calls executed by the daemon like the others, and `task_status` carrying
//! [`ClaudeSession::activity`] (what, since, turns, last sentence) so "what is it doing?" is
//! answered fresh.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::redact;
use super::stream::{PermissionRequest, ResultLine, StreamEvent, shorten};

/// Set in the agent's environment: adds `system`/`session_state_changed` lines
/// (`running`/`idle`), which tell when queued messages have all been handled.
pub const SESSION_STATE_ENV: (&str, &str) = ("CLAUDE_CODE_EMIT_SESSION_STATE_EVENTS", "1");

/// Bytes of user lines and answers the agent may leave unread before messages are refused.
pub const MAX_STDIN_BACKLOG: usize = 1024 * 1024;
/// Permission requests waiting at once; beyond this an agent is misbehaving and further
/// requests are denied at once.
pub const MAX_PENDING: usize = 16;
/// Messages whose receipt is remembered.
const MAX_SENT: usize = 64;
/// Tool uses in flight that are tracked (parallel tool calls; a sub-agent's tools).
const MAX_TOOLS: usize = 16;
/// The agent's last text kept for "its last sentence".
const LAST_TEXT_BYTES: usize = 16 * 1024;
/// Longest command, path or URL in spoken activity, in characters.
const OBJECT_CHARS: usize = 80;
/// Longest "last sentence", in characters.
const SENTENCE_CHARS: usize = 160;
/// How much of the end of a text is searched for its last sentence, in bytes.
const SENTENCE_WINDOW: usize = 4 * 1024;

/// The flags walkie adds to `agent.command` for the duplex protocol (CONTROL.md); a cold
/// follow-up adds `agent.resume` after them, as the one-shot protocol does.
pub fn agent_args(permission_mode: &str) -> Vec<String> {
    [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-prompt-tool",
        "stdio",
        "--replay-user-messages",
        "--permission-mode",
        permission_mode,
    ]
    .map(String::from)
    .to_vec()
}

/// How the user answered a permission request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allow, and add the rules the CLI suggested, so it does not ask again for the same.
    Always,
    /// Refuse; the agent sees the reason and goes on without the tool.
    Deny {
        reason: Option<String>,
    },
}

/// A permission request the agent is waiting on.
#[derive(Debug, Clone, PartialEq)]
pub struct Permission {
    pub request_id: String,
    pub tool_name: String,
    /// "run", "write", "edit", "fetch", "use": what the agent wants to do.
    pub verb: &'static str,
    /// The command, path or URL: redacted and short enough to speak.
    pub object: String,
    /// When the request arrived.
    pub since: Instant,
    /// When it is denied for want of an answer.
    pub deadline: Instant,
    input: Value,
    suggestions: Vec<Value>,
}

/// How a permission request stopped pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    /// Allowed or denied (by `answer_task`, `walkie ctl approve` or `deny`).
    Answered,
    /// The agent withdrew it (an interrupt, the end of its turn), or its process ended.
    Withdrawn,
    /// Nobody answered within `agent.approval_timeout_s`: denied, the agent told so.
    TimedOut,
}

/// Where one of our user messages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageStatus {
    /// Held until the running turn has ended (`now`: the turn is being interrupted first).
    Held,
    /// Written for the agent; it has not taken it in yet.
    Sent,
    /// The agent replayed it: the model has it.
    TakenIn,
    /// The agent went idle without taking it in (an interrupt may cancel queued messages).
    Dropped,
}

/// What changed, for the engine and, through it, the conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A `result` line: a turn is over (several per process). `idle`: nothing more is
    /// queued, the process waits for a follow-up.
    TurnEnded { result: ResultLine, idle: bool },
    /// The process waits for a follow-up (after a `result` with nothing queued, or when the
    /// agent says its session is idle).
    Idle,
    /// The agent asks; see [`ClaudeSession::pending_permissions`].
    PermissionRequested { request_id: String },
    /// The agent withdrew the request (its turn was interrupted or ended).
    PermissionWithdrawn { request_id: String },
    /// Nobody answered in time: denied with a message the agent sees.
    PermissionTimedOut { request_id: String },
    /// The agent took in our message `uuid`.
    MessageTakenIn { uuid: String },
    /// The agent went idle without taking in message `uuid`.
    MessageDropped { uuid: String },
    /// The agent answered our interrupt (`error` when it refused).
    InterruptAnswered { error: Option<String> },
    /// A control request walkie does not handle; it has been answered with an error.
    Refused { request_id: String, subtype: String },
}

/// What the agent is doing now, for `task_status` and `walkie ctl tasks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    /// "running `cargo test`", "editing src/parser.rs", "thinking", "waiting for your
    /// approval to run `npm test`", …: redacted, short, speakable.
    pub what: String,
    pub since: Instant,
    /// Turns finished so far (`result` lines).
    pub turns: u32,
    /// The last sentence of the agent's last text, redacted and short.
    pub last_sentence: Option<String>,
}

/// Why a message was not sent. Each is reported to the requester as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the message is empty")]
    Empty,
    /// The process is being closed (warm time over): the caller resumes the session in a
    /// new process instead.
    #[error("the agent's input is closed")]
    Closed,
    /// The agent has not read what was already sent: the caller reports it; the agent is
    /// stuck or busy beyond reason.
    #[error("the agent is not reading its input ({0} bytes waiting)")]
    Backlog(usize),
}

/// Why an interrupt was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InterruptError {
    /// Between turns there is nothing to interrupt: the caller says so.
    #[error("the agent is not in the middle of a turn")]
    NotRunning,
    #[error("the agent's input is closed")]
    Closed,
}

/// Why an answer was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Answered already, withdrawn, timed out or never asked: the caller says so.
    #[error("no pending permission request {0}")]
    NotPending(String),
    #[error("the agent's input is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A turn runs, or a message we sent is about to start one.
    Running,
    /// Between turns, waiting for a follow-up, since then.
    Idle(Instant),
    /// No more input: stdin is closed once the pending bytes are written.
    Closed,
}

#[derive(Debug, Clone)]
struct Sent {
    uuid: String,
    status: MessageStatus,
    /// The text while [`MessageStatus::Held`]; emptied once written.
    held_text: String,
    /// `result` lines seen when it was written: one written after the latest `result`
    /// may not have been read when the agent last said it was idle.
    written_at: u32,
}

#[derive(Debug, Clone)]
struct Interrupting {
    request_id: String,
    since: Instant,
    answered: bool,
}

#[derive(Debug, Clone)]
struct InFlight {
    id: Option<String>,
    what: String,
    since: Instant,
}

/// One agent process spoken to through stdin and stdout. See the module documentation.
#[derive(Debug)]
pub struct ClaudeSession {
    /// The agent's working directory: paths under it are spoken relative to it.
    cwd: String,
    approval_timeout: Duration,
    rng: fastrand::Rng,
    /// Bytes for the agent's stdin not yet written.
    stdin: Vec<u8>,
    phase: Phase,
    turns: u32,
    sent: VecDeque<Sent>,
    permissions: Vec<Permission>,
    tools: Vec<InFlight>,
    /// Our interrupt, from when it is sent until the turn's `result`.
    interrupting: Option<Interrupting>,
    interrupts_sent: u64,
    /// The agent replays our messages (`--replay-user-messages`): a message not yet replayed
    /// at a `result` is queued for the next turn. Without replays nothing can tell, and
    /// every `result` leaves the session idle.
    replays_seen: bool,
    /// When the agent last started a step of thought (turn start, tool end, an answer).
    thinking_since: Instant,
    last_text: Option<String>,
    events: VecDeque<SessionEvent>,
}

impl ClaudeSession {
    /// A session for a process just spawned with [`agent_args`]; `prompt` is queued as the
    /// first user line. `seed` makes the message uuids (tests pass a constant; the engine a
    /// random number).
    pub fn new(
        prompt: &str,
        cwd: &str,
        approval_timeout: Duration,
        seed: u64,
        now: Instant,
    ) -> ClaudeSession {
        let mut session = ClaudeSession {
            cwd: cwd.trim_end_matches('/').to_owned(),
            approval_timeout,
            rng: fastrand::Rng::with_seed(seed),
            stdin: Vec::new(),
            phase: Phase::Idle(now),
            turns: 0,
            sent: VecDeque::new(),
            permissions: Vec::new(),
            tools: Vec::new(),
            interrupting: None,
            interrupts_sent: 0,
            replays_seen: false,
            thinking_since: now,
            last_text: None,
            events: VecDeque::new(),
        };
        // A fresh process has an empty pipe: only an empty prompt can fail, and the engine
        // refuses those before spawning.
        let _ = session.send_message(prompt, false, now);
        session
    }

    /// The uuid of the first message (the prompt).
    pub fn prompt_uuid(&self) -> Option<&str> {
        self.sent.front().map(|s| s.uuid.as_str())
    }

    /// Bytes to write to the agent's stdin, in order.
    pub fn stdin_pending(&self) -> &[u8] {
        &self.stdin
    }

    /// `n` bytes of [`Self::stdin_pending`] were written.
    pub fn stdin_written(&mut self, n: usize) {
        self.stdin.drain(..n.min(self.stdin.len()));
    }

    /// Closed and everything written: the engine drops the pipe (EOF ends the process).
    pub fn wants_stdin_closed(&self) -> bool {
        self.phase == Phase::Closed && self.stdin.is_empty()
    }

    /// A turn runs or is about to start.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// When the process went idle (warm), if it is.
    pub fn idle_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle(since) => Some(since),
            _ => None,
        }
    }

    /// Turns finished so far.
    pub fn turns(&self) -> u32 {
        self.turns
    }

    /// Requests the agent waits on, oldest first.
    pub fn pending_permissions(&self) -> &[Permission] {
        &self.permissions
    }

    pub fn message_status(&self, uuid: &str) -> Option<MessageStatus> {
        self.sent.iter().find(|s| s.uuid == uuid).map(|s| s.status)
    }

    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The earliest approval deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.permissions.iter().map(|p| p.deadline).min()
    }

    /// Sends `text` as a user message; returns its uuid. Mid-turn it reaches the model at
    /// the next tool boundary (or starts the next turn); between turns it starts one at
    /// once. `now`: interrupt the running turn first, then send it after the turn's result.
    pub fn send_message(
        &mut self,
        text: &str,
        now_priority: bool,
        now: Instant,
    ) -> Result<String, SendError> {
        if text.trim().is_empty() {
            return Err(SendError::Empty);
        }
        if self.phase == Phase::Closed {
            return Err(SendError::Closed);
        }
        if self.stdin.len() + text.len() > MAX_STDIN_BACKLOG {
            return Err(SendError::Backlog(self.stdin.len()));
        }
        let uuid = uuid_v4(&mut self.rng);
        let held = now_priority && self.phase == Phase::Running;
        if held {
            if self.interrupting.is_none() {
                self.send_interrupt(now);
            }
        } else {
            self.write_user_line(text, &uuid);
            self.start_turn(now);
        }
        self.remember(Sent {
            uuid: uuid.clone(),
            status: if held {
                MessageStatus::Held
            } else {
                MessageStatus::Sent
            },
            held_text: if held { text.to_owned() } else { String::new() },
            written_at: self.turns,
        });
        Ok(uuid)
    }

    /// Ends the running turn; the process and its session stay for the next message.
    pub fn interrupt(&mut self, now: Instant) -> Result<(), InterruptError> {
        match self.phase {
            Phase::Closed => Err(InterruptError::Closed),
            Phase::Idle(_) => Err(InterruptError::NotRunning),
            Phase::Running => {
                if self.interrupting.is_none() {
                    self.send_interrupt(now);
                }
                Ok(())
            }
        }
    }

    /// Answers request `request_id`; returns it.
    pub fn answer(
        &mut self,
        request_id: &str,
        decision: Decision,
        now: Instant,
    ) -> Result<Permission, AnswerError> {
        if self.phase == Phase::Closed {
            return Err(AnswerError::Closed);
        }
        let at = self
            .permissions
            .iter()
            .position(|p| p.request_id == request_id)
            .ok_or_else(|| AnswerError::NotPending(request_id.to_owned()))?;
        let permission = self.permissions.remove(at);
        let response = match decision {
            Decision::Allow => json!({"behavior": "allow", "updatedInput": permission.input}),
            Decision::Always => {
                let mut allow = json!({"behavior": "allow", "updatedInput": permission.input});
                // The CLI's own "don't ask again" applies the rules it suggested.
                if !permission.suggestions.is_empty() {
                    allow["updatedPermissions"] = Value::from(permission.suggestions.clone());
                }
                allow
            }
            Decision::Deny { reason } => {
                let message = match reason.as_deref().map(str::trim) {
                    Some(reason) if !reason.is_empty() => {
                        format!("The user said no: {reason}")
                    }
                    _ => "The user said no.".to_owned(),
                };
                json!({"behavior": "deny", "message": message})
            }
        };
        self.write_line(&json!({"type": "control_response", "response": {
            "subtype": "success", "request_id": permission.request_id, "response": response}}));
        self.thinking_since = now;
        Ok(permission)
    }

    /// Denies every request whose deadline has passed, with a message the agent sees.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(at) = self.permissions.iter().position(|p| p.deadline <= now) {
            let permission = self.permissions.remove(at);
            let minutes = self.approval_timeout.as_secs().div_ceil(60).max(1);
            let message = format!(
                "Nobody answered this permission request within {minutes} minute{}; ask \
                 again later.",
                if minutes == 1 { "" } else { "s" }
            );
            self.write_line(&json!({"type": "control_response", "response": {
                "subtype": "success", "request_id": permission.request_id,
                "response": {"behavior": "deny", "message": message}}}));
            self.events.push_back(SessionEvent::PermissionTimedOut {
                request_id: permission.request_id,
            });
        }
    }

    /// No more input: stdin is closed once what is pending is written. Pending requests
    /// are dropped (nobody can answer them any more).
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
        self.drop_permissions();
    }

    /// One event from the agent's stdout, in order.
    pub fn handle_event(&mut self, now: Instant, event: &StreamEvent) {
        match event {
            StreamEvent::UserReplay { uuid } => {
                let Some(sent) = self.sent.iter_mut().find(|s| &s.uuid == uuid) else {
                    return;
                };
                sent.status = MessageStatus::TakenIn;
                self.replays_seen = true;
                self.events
                    .push_back(SessionEvent::MessageTakenIn { uuid: uuid.clone() });
                // A queued message starting the next turn.
                self.start_turn(now);
            }
            StreamEvent::ToolUse {
                name,
                file_path,
                detail,
                id,
            } => {
                self.start_turn(now);
                if self.tools.len() == MAX_TOOLS {
                    self.tools.remove(0);
                }
                let object = file_path.as_deref().unwrap_or(detail);
                self.tools.push(InFlight {
                    id: id.clone(),
                    what: tool_words(name, object, detail, &self.cwd),
                    since: now,
                });
            }
            StreamEvent::ToolResult { tool_use_id, .. } => {
                let before = self.tools.len();
                self.tools
                    .retain(|t| t.id.as_deref() != Some(tool_use_id.as_str()));
                if self.tools.len() != before {
                    self.thinking_since = now;
                }
            }
            StreamEvent::Text(text) => {
                // Text between turns: a queued message started one.
                self.start_turn(now);
                self.keep_text(text);
            }
            StreamEvent::PermissionRequest(request) => self.handle_permission(now, request),
            StreamEvent::ControlRequest {
                request_id,
                subtype,
            } => {
                self.write_line(&json!({"type": "control_response", "response": {
                    "subtype": "error", "request_id": request_id,
                    "error": format!("walkie does not handle {subtype:?} requests")}}));
                self.events.push_back(SessionEvent::Refused {
                    request_id: request_id.clone(),
                    subtype: subtype.clone(),
                });
            }
            StreamEvent::ControlCancel { request_id } => {
                if let Some(at) = self
                    .permissions
                    .iter()
                    .position(|p| &p.request_id == request_id)
                {
                    self.permissions.remove(at);
                    self.events.push_back(SessionEvent::PermissionWithdrawn {
                        request_id: request_id.clone(),
                    });
                }
            }
            StreamEvent::ControlResponse { request_id, error } => {
                let Some(interrupting) = self
                    .interrupting
                    .as_mut()
                    .filter(|i| &i.request_id == request_id && !i.answered)
                else {
                    return;
                };
                interrupting.answered = true;
                self.events.push_back(SessionEvent::InterruptAnswered {
                    error: error.clone(),
                });
                if error.is_some() || self.phase != Phase::Running {
                    // Refused, or the turn had already ended: no result will follow it, so
                    // held messages go now, as ordinary ones.
                    self.interrupting = None;
                    self.release_held();
                }
            }
            StreamEvent::SessionState { state } if state == "idle" => self.handle_idle(now),
            StreamEvent::Result(result) => self.handle_result(now, result),
            _ => {}
        }
    }

    /// What the agent is doing, in words, for `task_status`. `output` is the task's recent
    /// output: a key the agent printed across two messages is redacted in the last sentence
    /// even when the last message holds only its second half.
    pub fn activity(&self, output: &str) -> Activity {
        let (what, since) = if let Some(p) = self.permissions.first() {
            (
                format!("waiting for your approval to {} {}", p.verb, p.object),
                p.since,
            )
        } else {
            match self.phase {
                Phase::Closed => ("closing".to_owned(), self.thinking_since),
                Phase::Idle(since) if self.turns == 0 => ("starting".to_owned(), since),
                Phase::Idle(since) => ("waiting for a follow-up".to_owned(), since),
                Phase::Running => {
                    if let Some(interrupting) = &self.interrupting {
                        ("stopping its turn".to_owned(), interrupting.since)
                    } else if let Some(tool) = self.tools.last() {
                        (tool.what.clone(), tool.since)
                    } else {
                        ("thinking".to_owned(), self.thinking_since)
                    }
                }
            }
        };
        Activity {
            what,
            since,
            turns: self.turns,
            last_sentence: self
                .last_text
                .as_deref()
                .and_then(|text| last_sentence(text, output)),
        }
    }

    fn handle_permission(&mut self, now: Instant, request: &PermissionRequest) {
        if self
            .permissions
            .iter()
            .any(|p| p.request_id == request.request_id)
        {
            return;
        }
        if self.permissions.len() >= MAX_PENDING {
            self.write_line(&json!({"type": "control_response", "response": {
                "subtype": "success", "request_id": request.request_id,
                "response": {"behavior": "deny",
                    "message": "Too many permission requests are already waiting; ask again later."}}}));
            return;
        }
        let (verb, object) = permission_words(request, &self.cwd);
        self.permissions.push(Permission {
            request_id: request.request_id.clone(),
            tool_name: request.tool_name.clone(),
            verb,
            object,
            since: now,
            deadline: now + self.approval_timeout,
            input: request.input.clone(),
            suggestions: request.suggestions.clone(),
        });
        self.events.push_back(SessionEvent::PermissionRequested {
            request_id: request.request_id.clone(),
        });
    }

    fn handle_result(&mut self, now: Instant, result: &ResultLine) {
        self.turns = self.turns.saturating_add(1);
        self.tools.clear();
        // The CLI withdraws its requests before ending a turn; one left over is stale.
        self.drop_permissions();
        self.thinking_since = now;
        self.interrupting = None;
        // Messages held for the end of this turn go now ("priority now": after the
        // interrupt's result).
        let released = self.release_held();
        let queued = released
            || (self.replays_seen && self.sent.iter().any(|s| s.status == MessageStatus::Sent));
        let idle = !queued && self.phase == Phase::Running;
        if idle {
            self.phase = Phase::Idle(now);
        }
        self.events.push_back(SessionEvent::TurnEnded {
            result: result.clone(),
            idle,
        });
        if idle {
            self.events.push_back(SessionEvent::Idle);
        }
    }

    /// The agent says it has nothing left to do: messages it never took in are dropped.
    fn handle_idle(&mut self, now: Instant) {
        if self.phase != Phase::Running || self.sent.iter().any(|s| s.status == MessageStatus::Held)
        {
            return;
        }
        // The agent says what it was when it wrote the line: a message written after its
        // latest `result` (a message held for an interrupt's end, a follow-up) may still be
        // in the pipe, unread. It starts the next turn; the state is stale.
        if self
            .sent
            .iter()
            .any(|s| s.status == MessageStatus::Sent && s.written_at == self.turns)
        {
            return;
        }
        self.interrupting = None;
        for sent in self.sent.iter_mut() {
            if sent.status == MessageStatus::Sent {
                sent.status = MessageStatus::Dropped;
                self.events.push_back(SessionEvent::MessageDropped {
                    uuid: sent.uuid.clone(),
                });
            }
        }
        self.tools.clear();
        self.phase = Phase::Idle(now);
        self.events.push_back(SessionEvent::Idle);
    }

    /// Writes the messages held for the end of the turn, oldest first; whether there were.
    fn release_held(&mut self) -> bool {
        let mut released = false;
        for i in 0..self.sent.len() {
            if self.sent[i].status == MessageStatus::Held {
                let text = std::mem::take(&mut self.sent[i].held_text);
                self.sent[i].written_at = self.turns;
                let uuid = self.sent[i].uuid.clone();
                self.write_user_line(&text, &uuid);
                self.sent[i].status = MessageStatus::Sent;
                released = true;
            }
        }
        released
    }

    fn start_turn(&mut self, now: Instant) {
        if let Phase::Idle(_) = self.phase {
            self.phase = Phase::Running;
            self.thinking_since = now;
        }
    }

    fn drop_permissions(&mut self) {
        for permission in self.permissions.drain(..) {
            self.events.push_back(SessionEvent::PermissionWithdrawn {
                request_id: permission.request_id,
            });
        }
    }

    fn send_interrupt(&mut self, now: Instant) {
        self.interrupts_sent += 1;
        let id = format!("walkie-interrupt-{}", self.interrupts_sent);
        self.write_line(&json!({"type": "control_request", "request_id": id,
                                "request": {"subtype": "interrupt"}}));
        self.interrupting = Some(Interrupting {
            request_id: id,
            since: now,
            answered: false,
        });
    }

    fn remember(&mut self, sent: Sent) {
        if self.sent.len() == MAX_SENT {
            // Forget the oldest message whose fate is known; a held one must still be sent.
            let at = self
                .sent
                .iter()
                .position(|s| s.status != MessageStatus::Held)
                .unwrap_or(0);
            self.sent.remove(at);
        }
        self.sent.push_back(sent);
    }

    fn keep_text(&mut self, text: &str) {
        let mut start = text.len().saturating_sub(LAST_TEXT_BYTES);
        // Start at a word, so a secret is never cut in two before it is redacted.
        if start > 0 {
            start = text[start..]
                .find(char::is_whitespace)
                .map_or(text.len(), |at| start + at);
        }
        let last = self.last_text.get_or_insert_with(String::new);
        last.clear();
        last.push_str(&text[start..]);
    }

    fn write_user_line(&mut self, text: &str, uuid: &str) {
        self.write_line(&json!({"type": "user",
            "message": {"role": "user", "content": text}, "uuid": uuid}));
    }

    fn write_line(&mut self, line: &Value) {
        // Serializing a Value cannot fail (string keys only).
        if serde_json::to_writer(&mut self.stdin, line).is_ok() {
            self.stdin.push(b'\n');
        }
    }
}

/// A random UUID v4, lowercase 8-4-4-4-12.
fn uuid_v4(rng: &mut fastrand::Rng) -> String {
    let mut bytes = rng.u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A command or query for speech: redacted first (a secret is never cut in two), then
/// whitespace collapsed and cut.
fn speakable(text: &str) -> String {
    shorten(&redact::redact(text), OBJECT_CHARS)
}

/// A path for speech: relative to the task's directory when under it, redacted, and cut
/// from the front so the file name survives.
fn speakable_path(path: &str, cwd: &str) -> String {
    let relative = path
        .strip_prefix(cwd)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|rest| !rest.is_empty() && !cwd.is_empty())
        .unwrap_or(path);
    let redacted = redact::redact(relative);
    let chars = redacted.chars().count();
    if chars <= OBJECT_CHARS {
        return redacted;
    }
    let tail: String = redacted.chars().skip(chars - (OBJECT_CHARS - 1)).collect();
    // Start the tail at a directory boundary when there is one.
    let tail = tail.find('/').map_or(tail.as_str(), |at| &tail[at..]);
    format!("…{tail}")
}

/// The tool in flight, in words: "running `cargo test`", "editing src/parser.rs".
fn tool_words(name: &str, object: &str, detail: &str, cwd: &str) -> String {
    match name {
        "Bash" => format!("running `{}`", speakable(detail)),
        "Write" => format!("writing {}", speakable_path(object, cwd)),
        "Edit" | "MultiEdit" => format!("editing {}", speakable_path(object, cwd)),
        "NotebookEdit" => format!("editing the notebook {}", speakable_path(object, cwd)),
        "Read" => format!("reading {}", speakable_path(object, cwd)),
        "Grep" => format!("searching the code for {}", speakable(detail)),
        "Glob" => format!("looking for files matching {}", speakable(detail)),
        "WebFetch" => format!("fetching {}", speakable(detail)),
        "WebSearch" => format!("searching the web for {}", speakable(detail)),
        "Task" | "Agent" => format!("running a sub-agent: {}", speakable(detail)),
        "TodoWrite" => "updating its to-do list".to_owned(),
        _ if detail.trim().is_empty() => format!("using {}", speakable(name)),
        _ => format!("using {}: {}", speakable(name), speakable(detail)),
    }
}

/// What a permission request asks, as a verb and its object: ("run", "`npm test`").
fn permission_words(request: &PermissionRequest, cwd: &str) -> (&'static str, String) {
    let input = &request.input;
    let field = |key: &str| input[key].as_str().filter(|s| !s.trim().is_empty());
    let path = field("file_path").or(field("notebook_path"));
    match (request.tool_name.as_str(), path) {
        ("Bash", _) => match field("command") {
            Some(command) => ("run", format!("`{}`", speakable(command))),
            None => ("use", "Bash".to_owned()),
        },
        ("Write", Some(path)) => ("write", speakable_path(path, cwd)),
        ("Edit" | "MultiEdit" | "NotebookEdit", Some(path)) => ("edit", speakable_path(path, cwd)),
        ("WebFetch", _) if field("url").is_some() => {
            ("fetch", speakable(field("url").unwrap_or_default()))
        }
        (tool, _) => {
            let what = field("command")
                .or(path)
                .or(field("url"))
                .or(field("query"))
                .or(field("pattern"))
                .or(request.description.as_deref());
            match what {
                Some(what) => ("use", format!("{}: {}", speakable(tool), speakable(what))),
                None => ("use", speakable(tool)),
            }
        }
    }
}

/// The last sentence of `text` with words in it (not a code block), redacted over the whole
/// text before any cut (with the pieces of keys that `output`, the task's recent output,
/// shows broken across lines), markdown stripped, short enough to speak.
pub(crate) fn last_sentence(text: &str, output: &str) -> Option<String> {
    let redacted = redact::scrub(text, output);
    // Only the end is needed: start a few KB before it, at a word, outside any code fence.
    let mut start = redacted.len().saturating_sub(SENTENCE_WINDOW);
    while !redacted.is_char_boundary(start) {
        start += 1;
    }
    if start > 0 {
        start = redacted[start..]
            .find(char::is_whitespace)
            .map_or(redacted.len(), |at| start + at);
        let fences_before = redacted[..start]
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        if fences_before % 2 == 1 {
            // Inside a code block: skip to the line after its closing fence.
            let mut skipped = 0;
            for line in redacted[start..].split_inclusive('\n').skip(1) {
                skipped += line.len();
                if line.trim_start().starts_with("```") {
                    break;
                }
            }
            let first = redacted[start..].find('\n').map_or(0, |at| at + 1);
            start = (start + first + skipped).min(redacted.len());
        }
    }
    let plain = redact::speech_summary(&redacted[start..], usize::MAX);
    // Sentences end at ". ", "! " or "? ".
    let mut sentences = Vec::new();
    let mut from = 0;
    for (at, c) in plain.char_indices() {
        if matches!(c, '.' | '!' | '?') && plain[at + 1..].starts_with(' ') {
            sentences.push(&plain[from..=at]);
            from = at + 1;
        }
    }
    sentences.push(&plain[from..]);
    let sentence = sentences
        .into_iter()
        .rev()
        .map(str::trim)
        .find(|s| s.chars().any(char::is_alphanumeric) && !s.starts_with("(code omitted)"))?;
    Some(redact::speech_summary(sentence, SENTENCE_CHARS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::stream::StreamParser;
    use std::path::PathBuf;

    const CWD: &str = "/home/user/cwd";
    const TIMEOUT: Duration = Duration::from_secs(600);
    const STEP: Duration = Duration::from_millis(10);

    fn fixture(case: &str, file: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/claude-cli")
            .join(case)
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The supervisor's lines of a fixture run, parsed.
    fn fixture_stdin(case: &str) -> Vec<Value> {
        fixture(case, "stdin.jsonl")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Plays a fixture's stdout into a session, line by line, on a fake clock.
    struct Replay {
        session: ClaudeSession,
        parser: StreamParser,
        lines: VecDeque<String>,
        now: Instant,
        start: Instant,
    }

    impl Replay {
        fn new(case: &str, prompt: &str) -> Replay {
            let start = Instant::now();
            Replay {
                session: ClaudeSession::new(prompt, CWD, TIMEOUT, 7, start),
                parser: StreamParser::new(),
                lines: fixture(case, "stdout.jsonl")
                    .lines()
                    .map(str::to_owned)
                    .collect(),
                now: start,
                start,
            }
        }

        /// Writes everything pending, as the engine does on WRITABLE; returns the lines.
        fn take_stdin(&mut self) -> Vec<Value> {
            let text = String::from_utf8(self.session.stdin_pending().to_vec()).unwrap();
            self.session.stdin_written(text.len());
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }

        fn feed_line(&mut self, line: &str) {
            self.now += STEP;
            let mut events = Vec::new();
            self.parser.feed(line.as_bytes(), &mut events);
            self.parser.feed(b"\n", &mut events);
            for event in &events {
                self.session.handle_event(self.now, event);
            }
        }

        /// Feeds lines up to and including the first one containing `needle`.
        fn until(&mut self, needle: &str) {
            loop {
                let line = self.lines.pop_front().expect("needle not found");
                self.feed_line(&line);
                if line.contains(needle) {
                    return;
                }
            }
        }

        /// The replay line `--replay-user-messages` adds after the first init (the runs
        /// other than progress were made without the flag).
        fn replay_prompt(&mut self) {
            let uuid = self.session.prompt_uuid().unwrap().to_owned();
            self.feed_line(&format!(
                r#"{{"type":"user","message":{{"role":"user","content":"p"}},"uuid":"{uuid}","isReplay":true}}"#
            ));
            self.events();
        }

        fn rest(&mut self) {
            while let Some(line) = self.lines.pop_front() {
                self.feed_line(&line);
            }
        }

        /// The run's ids are the real CLI's; ours differ: rewrite the lines still to come.
        fn rename(&mut self, from: &str, to: &str) {
            for line in self.lines.iter_mut() {
                *line = line.replace(from, to);
            }
        }

        fn events(&mut self) -> Vec<SessionEvent> {
            std::iter::from_fn(|| self.session.poll_event()).collect()
        }

        fn what(&self) -> String {
            self.session.activity("").what
        }
    }

    fn keys(value: &Value) -> Vec<String> {
        let mut keys: Vec<String> = value
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {value}"))
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    fn turn_ended(events: &[SessionEvent]) -> Vec<(String, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                SessionEvent::TurnEnded { result, idle } => Some((result.subtype.clone(), *idle)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn agent_args_are_the_documented_flags() {
        let control = fixture("", "CONTROL.md");
        let args = agent_args("acceptEdits");
        for arg in &args {
            assert!(control.contains(arg.as_str()), "{arg} not in CONTROL.md");
        }
        assert_eq!(args[0], "-p");
        assert_eq!(args[args.len() - 2..], ["--permission-mode", "acceptEdits"]);
        assert!(control.contains(SESSION_STATE_ENV.0));
    }

    #[test]
    fn the_prompt_is_the_first_user_line_with_our_uuid() {
        let mut run = Replay::new(
            "progress",
            "Please loop with bash until I tell you to stop.",
        );
        let sent = run.take_stdin();
        let real = fixture_stdin("progress");
        assert_eq!(sent.len(), 1);
        assert_eq!(keys(&sent[0]), keys(&real[0]));
        assert_eq!(sent[0]["message"], real[0]["message"]);
        let uuid = sent[0]["uuid"].as_str().unwrap();
        assert_eq!(run.session.prompt_uuid(), Some(uuid));
        let parts: Vec<usize> = uuid.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12]);
        assert_eq!(&uuid[14..15], "4", "version 4");
        assert_eq!(run.session.message_status(uuid), Some(MessageStatus::Sent));
        assert!(run.session.is_running());
        assert_eq!(run.what(), "thinking");
        // Seeded: the same seed gives the same uuids, another seed others.
        let again = ClaudeSession::new("x", CWD, TIMEOUT, 7, run.start);
        assert_eq!(again.prompt_uuid(), Some(uuid));
        let other = ClaudeSession::new("x", CWD, TIMEOUT, 8, run.start);
        assert_ne!(other.prompt_uuid(), Some(uuid));
    }

    #[test]
    fn steering_is_taken_in_at_the_tool_boundary() {
        // The progress run: a Bash step, a second message sent while it runs, replayed
        // (our receipt) only after the step's result, one result for the whole turn.
        let mut run = Replay::new(
            "progress",
            "Please loop with bash until I tell you to stop.",
        );
        let first = run.session.prompt_uuid().unwrap().to_owned();
        run.take_stdin();
        run.rename("00000000-0000-4000-8000-000000000001", &first);
        run.until("\"isReplay\":true");
        assert_eq!(
            run.events(),
            [SessionEvent::MessageTakenIn {
                uuid: first.clone()
            }]
        );
        run.until("\"type\":\"assistant\"");
        let tool_at = run.now;
        assert_eq!(
            run.what(),
            "running `timeout 2 tail -f /dev/null; echo turn 0`"
        );
        assert_eq!(run.session.activity("").since, tool_at);

        let steer = run
            .session
            .send_message(
                "WALKIE_STOP: stop looping now and summarise.",
                false,
                run.now,
            )
            .unwrap();
        let sent = run.take_stdin();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["message"], fixture_stdin("progress")[1]["message"]);
        assert_eq!(keys(&sent[0]), keys(&fixture_stdin("progress")[1]));
        run.rename("00000000-0000-4000-8000-000000000002", &steer);
        run.until("\"tool_result\"");
        assert_eq!(
            run.session.message_status(&steer),
            Some(MessageStatus::Sent)
        );
        assert_eq!(run.what(), "thinking", "the Bash step is over");
        run.until("\"isReplay\":true");
        assert_eq!(
            run.session.message_status(&steer),
            Some(MessageStatus::TakenIn)
        );
        run.rest();
        let events = run.events();
        assert_eq!(
            events,
            [
                SessionEvent::MessageTakenIn { uuid: steer },
                SessionEvent::TurnEnded {
                    result: run.parser.result().unwrap().clone(),
                    idle: true
                },
                SessionEvent::Idle,
            ]
        );
        assert_eq!(run.session.turns(), 1);
        assert_eq!(run.session.idle_since(), Some(run.now - 2 * STEP));
        let activity = run.session.activity("");
        assert_eq!(activity.what, "waiting for a follow-up");
        assert_eq!(activity.turns, 1);
        assert_eq!(
            activity.last_sentence.as_deref(),
            Some("This is how Claude Code surfaces messages the user sends mid-turn — within.")
        );
    }

    #[test]
    fn steer_fixture_one_turn_with_the_message_folded_in() {
        let mut run = Replay::new("steer", "Please loop with bash until I tell you to stop.");
        run.take_stdin();
        run.until("\"subtype\":\"init\"");
        run.replay_prompt();
        run.until("\"type\":\"assistant\"");
        let steer = run
            .session
            .send_message(
                "WALKIE_STOP: stop looping now and summarise.",
                false,
                run.now,
            )
            .unwrap();
        assert_eq!(
            run.take_stdin()[0]["message"],
            fixture_stdin("steer")[1]["message"]
        );
        run.until("task_started");
        assert_eq!(
            run.what(),
            "running `timeout 3 tail -f /dev/null; echo turn 0`"
        );
        // The capture has no replay of the steer (made without the flag): put it where the
        // progress run shows it, after the step's result.
        run.until("\"tool_result\"");
        run.feed_line(&format!(
            r#"{{"type":"user","message":{{"role":"user","content":"x"}},"uuid":"{steer}","isReplay":true}}"#
        ));
        run.rest();
        let events = run.events();
        assert_eq!(events[0], SessionEvent::MessageTakenIn { uuid: steer });
        assert_eq!(turn_ended(&events), [("success".to_owned(), true)]);
        assert_eq!(run.session.turns(), 1);
        assert!(
            run.session
                .activity("")
                .last_sentence
                .unwrap()
                .ends_with("within.")
        );
    }

    #[test]
    fn steer_now_fixture_the_clis_own_priority_ends_the_turn_early() {
        // walkie's "now" interrupts instead (a_message_sent_now_…), but a message sent with
        // the CLI's own priority must still be followed: two turns, the first empty.
        let mut run = Replay::new(
            "steer-now",
            "Please loop with bash until I tell you to stop.",
        );
        run.take_stdin();
        run.until("\"subtype\":\"init\"");
        run.replay_prompt();
        run.until("\"type\":\"assistant\"");
        let steer = run
            .session
            .send_message(
                "WALKIE_STOP: stop looping now and summarise.",
                false,
                run.now,
            )
            .unwrap();
        run.take_stdin();
        run.until("\"type\":\"result\"");
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), false)]);
        assert!(run.session.is_running(), "the message is the next turn");
        run.until("\"subtype\":\"init\"");
        run.feed_line(&format!(
            r#"{{"type":"user","message":{{"role":"user","content":"x"}},"uuid":"{steer}","isReplay":true}}"#
        ));
        run.rest();
        let events = run.events();
        assert_eq!(events[0], SessionEvent::MessageTakenIn { uuid: steer });
        assert_eq!(turn_ended(&events), [("success".to_owned(), true)]);
        assert_eq!(run.session.turns(), 2);
    }

    #[test]
    fn interrupt_stream_fixture_mid_text_then_idle() {
        let mut run = Replay::new("interrupt-stream", "tell me a long story");
        run.take_stdin();
        run.until("chunk 3.");
        assert_eq!(run.what(), "thinking");
        run.session.interrupt(run.now).unwrap();
        let ours = run.take_stdin()[0]["request_id"]
            .as_str()
            .unwrap()
            .to_owned();
        run.rename("\"int-1\"", &format!("\"{ours}\""));
        run.until("\"type\":\"result\"");
        let events = run.events();
        assert_eq!(events[0], SessionEvent::InterruptAnswered { error: None });
        assert_eq!(
            turn_ended(&events),
            [("error_during_execution".to_owned(), true)]
        );
        // The partial text the interrupt cut short is still the last thing said.
        assert_eq!(
            run.session.activity("").last_sentence.as_deref(),
            Some("chunk 3.")
        );
        // Between turns walkie does not send an interrupt (the capture's second one); an
        // answer to a request of someone else's changes nothing.
        assert_eq!(
            run.session.interrupt(run.now),
            Err(InterruptError::NotRunning)
        );
        run.rest();
        assert!(run.events().is_empty());
        assert!(run.session.stdin_pending().is_empty());
    }

    #[test]
    fn perm_deny_interrupt_fixture_ends_the_turn() {
        let mut run = Replay::new("perm-deny-interrupt", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        run.events();
        let id = run.session.pending_permissions()[0].request_id.clone();
        run.session
            .answer(&id, Decision::Deny { reason: None }, run.now)
            .unwrap();
        run.take_stdin();
        run.rest();
        assert_eq!(
            turn_ended(&run.events()),
            [("error_during_execution".to_owned(), true)]
        );
        assert_eq!(run.what(), "waiting for a follow-up");
    }

    #[test]
    fn a_message_queued_while_text_streams_is_the_next_turn() {
        // steer-queued-text ran without --replay-user-messages; walkie always passes it, so
        // the replay line it adds at the start of the second turn is put in.
        let mut run = Replay::new("steer-queued-text", "first question");
        run.take_stdin();
        run.until("\"subtype\":\"init\"");
        run.replay_prompt();
        let second = run
            .session
            .send_message(
                "second question, sent while the first answer streams",
                false,
                run.now,
            )
            .unwrap();
        assert_eq!(
            run.take_stdin()[0]["message"],
            fixture_stdin("steer-queued-text")[1]["message"]
        );
        run.until("\"type\":\"result\"");
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), false)]);
        assert!(run.session.is_running(), "the queued message is next");
        assert_eq!(run.what(), "thinking");
        run.feed_line(&format!(
            r#"{{"type":"user","message":{{"role":"user","content":"second"}},"uuid":"{second}","isReplay":true}}"#
        ));
        run.rest();
        let events = run.events();
        assert_eq!(events[0], SessionEvent::MessageTakenIn { uuid: second });
        assert_eq!(turn_ended(&events), [("success".to_owned(), true)]);
        assert_eq!(run.session.turns(), 2);
    }

    #[test]
    fn permission_allowed_is_answered_like_the_fixture() {
        let mut run = Replay::new("perm-allow", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        let id = "ffcb3ab7-0c53-4cdb-b3d3-0746b71d1fa8";
        assert_eq!(
            run.events(),
            [SessionEvent::PermissionRequested {
                request_id: id.into()
            }]
        );
        let asked_at = run.now;
        let pending = run.session.pending_permissions();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].tool_name, "Bash");
        assert_eq!(pending[0].verb, "run");
        assert_eq!(
            pending[0].object,
            "`echo hi from bash > bash.txt && cat bash.txt`"
        );
        assert_eq!(pending[0].since, asked_at);
        assert_eq!(pending[0].deadline, asked_at + TIMEOUT);
        assert_eq!(run.session.poll_timeout(), Some(asked_at + TIMEOUT));
        let activity = run.session.activity("");
        assert_eq!(
            activity.what,
            "waiting for your approval to run `echo hi from bash > bash.txt && cat bash.txt`"
        );
        assert_eq!(activity.since, asked_at);

        run.now += Duration::from_secs(3);
        let answered = run.session.answer(id, Decision::Allow, run.now).unwrap();
        assert_eq!(answered.request_id, id);
        assert_eq!(run.take_stdin(), [fixture_stdin("perm-allow")[1].clone()]);
        assert!(run.session.pending_permissions().is_empty());
        assert_eq!(run.session.poll_timeout(), None);
        assert_eq!(
            run.session.answer(id, Decision::Allow, run.now),
            Err(AnswerError::NotPending(id.into()))
        );
        run.rest();
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), true)]);
        assert_eq!(
            run.session.activity("").last_sentence.as_deref(),
            Some("Tool result (is_error=False): hi from bash.")
        );
    }

    #[test]
    fn permission_denied_with_the_users_reason() {
        let mut run = Replay::new("perm-deny", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        let id = "9af67bc2-c3ba-4de5-a6b9-8cd79eb3a5ae";
        run.session
            .answer(
                id,
                Decision::Deny {
                    reason: Some("not now, by voice".into()),
                },
                run.now,
            )
            .unwrap();
        let mut sent = run.take_stdin().remove(0);
        let mut real = fixture_stdin("perm-deny").remove(1);
        assert_eq!(
            sent["response"]["response"]["message"],
            "The user said no: not now, by voice"
        );
        // Everything else is the fixture's answer.
        sent["response"]["response"]["message"] = Value::Null;
        real["response"]["response"]["message"] = Value::Null;
        assert_eq!(sent, real);
        run.rest();
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), true)]);

        // Without a reason.
        let mut run = Replay::new("perm-deny", "again");
        run.take_stdin();
        run.until("\"control_request\"");
        let no_reason = Decision::Deny { reason: None };
        run.session.answer(id, no_reason, run.now).unwrap();
        assert_eq!(
            run.take_stdin()[0]["response"]["response"]["message"],
            "The user said no."
        );
    }

    #[test]
    fn always_echoes_the_suggested_rules() {
        let mut run = Replay::new("perm-allow", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        let id = "ffcb3ab7-0c53-4cdb-b3d3-0746b71d1fa8";
        run.session.answer(id, Decision::Always, run.now).unwrap();
        let sent = run.take_stdin().remove(0);
        let stdout = fixture("perm-allow", "stdout.jsonl");
        let line = stdout.lines().find(|l| l.contains("\"control_request\""));
        let request: Value = serde_json::from_str(line.unwrap()).unwrap();
        let allow = &sent["response"]["response"];
        assert_eq!(allow["behavior"], "allow");
        assert_eq!(allow["updatedInput"], request["request"]["input"]);
        assert_eq!(
            allow["updatedPermissions"],
            request["request"]["permission_suggestions"]
        );
    }

    #[test]
    fn a_write_outside_the_project_asks_with_its_path() {
        let mut run = Replay::new("perm-write-allow", "write outside");
        run.take_stdin();
        run.until("\"control_request\"");
        let pending = &run.session.pending_permissions()[0];
        assert_eq!(
            (pending.verb, pending.object.as_str()),
            ("write", "/tmp/fake-outside-813a71cf/outside.txt")
        );
        let id = pending.request_id.clone();
        run.session.answer(&id, Decision::Allow, run.now).unwrap();
        assert_eq!(
            run.take_stdin(),
            [fixture_stdin("perm-write-allow")[1].clone()]
        );
        assert_eq!(
            run.what(),
            "writing /tmp/fake-outside-813a71cf/outside.txt",
            "the tool runs once allowed"
        );
        run.rest();
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), true)]);
    }

    #[test]
    fn an_unanswered_request_is_denied_at_its_deadline() {
        let mut run = Replay::new("perm-unanswered", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        run.events();
        let asked = run.now;
        let id = "b0559178-2985-41da-8293-e9236042df3e";
        run.session.handle_timeout(asked + TIMEOUT - STEP);
        assert!(run.session.stdin_pending().is_empty());
        assert_eq!(run.session.pending_permissions().len(), 1);
        run.session.handle_timeout(asked + TIMEOUT);
        assert_eq!(
            run.events(),
            [SessionEvent::PermissionTimedOut {
                request_id: id.into()
            }]
        );
        let sent = run.take_stdin().remove(0);
        assert_eq!(sent["type"], "control_response");
        assert_eq!(sent["response"]["request_id"], id);
        assert_eq!(sent["response"]["response"]["behavior"], "deny");
        assert_eq!(
            sent["response"]["response"]["message"],
            "Nobody answered this permission request within 10 minutes; ask again later."
        );
        assert_eq!(run.session.poll_timeout(), None);
        assert_eq!(
            run.session.answer(id, Decision::Allow, run.now),
            Err(AnswerError::NotPending(id.into()))
        );
    }

    #[test]
    fn an_interrupt_withdraws_a_pending_request() {
        let mut run = Replay::new("perm-unanswered", "write bash.txt with bash");
        run.take_stdin();
        run.until("\"control_request\"");
        run.events();
        run.session.interrupt(run.now).unwrap();
        let sent = run.take_stdin().remove(0);
        let real = &fixture_stdin("perm-unanswered")[1];
        assert_eq!(keys(&sent), keys(real));
        assert_eq!(sent["request"], real["request"]);
        let ours = sent["request_id"].as_str().unwrap().to_owned();
        run.rename("\"int-perm\"", &format!("\"{ours}\""));
        // Asked again while the first is under way: nothing more is written.
        run.session.interrupt(run.now).unwrap();
        assert!(run.session.stdin_pending().is_empty());
        run.rest();
        let id = "b0559178-2985-41da-8293-e9236042df3e";
        assert_eq!(
            run.events(),
            [
                SessionEvent::PermissionWithdrawn {
                    request_id: id.into()
                },
                SessionEvent::InterruptAnswered { error: None },
                SessionEvent::TurnEnded {
                    result: run.parser.result().unwrap().clone(),
                    idle: true
                },
                SessionEvent::Idle,
            ]
        );
        assert!(run.session.pending_permissions().is_empty());
        assert_eq!(run.session.poll_timeout(), None);
    }

    #[test]
    fn interrupt_ends_the_turn_and_the_next_message_reuses_the_process() {
        let mut run = Replay::new("interrupt-tool", "sleep a while");
        run.take_stdin();
        run.until("task_started");
        assert_eq!(
            run.what(),
            "running `timeout 120 tail -f /dev/null; echo finished`"
        );
        run.session.interrupt(run.now).unwrap();
        let sent = run.take_stdin().remove(0);
        assert_eq!(
            sent["request"],
            fixture_stdin("interrupt-tool")[1]["request"]
        );
        let ours = sent["request_id"].as_str().unwrap().to_owned();
        run.rename("\"r1\"", &format!("\"{ours}\""));
        assert_eq!(run.what(), "stopping its turn");
        run.until("\"control_response\"");
        assert_eq!(
            run.events(),
            [SessionEvent::InterruptAnswered { error: None }]
        );
        run.until("\"type\":\"result\"");
        assert_eq!(
            turn_ended(&run.events()),
            [("error_during_execution".to_owned(), true)]
        );
        assert_eq!(run.what(), "waiting for a follow-up");
        assert_eq!(
            run.session.interrupt(run.now),
            Err(InterruptError::NotRunning)
        );

        run.session
            .send_message("are you still there?", false, run.now)
            .unwrap();
        assert_eq!(
            run.take_stdin()[0]["message"],
            fixture_stdin("interrupt-tool")[2]["message"]
        );
        assert!(run.session.is_running());
        run.rest();
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), true)]);
        assert_eq!(run.session.turns(), 2);
        assert_eq!(
            run.session.activity("").last_sentence.as_deref(),
            Some("Done sleeping.")
        );
    }

    #[test]
    fn a_message_sent_now_waits_for_the_interrupted_turn() {
        let mut run = Replay::new("interrupt-tool", "sleep a while");
        run.take_stdin();
        run.until("task_started");
        let uuid = run
            .session
            .send_message("stop, do Y instead", true, run.now)
            .unwrap();
        let sent = run.take_stdin();
        assert_eq!(sent.len(), 1, "only the interrupt: {sent:?}");
        assert_eq!(sent[0]["request"]["subtype"], "interrupt");
        assert_eq!(run.session.message_status(&uuid), Some(MessageStatus::Held));
        let ours = sent[0]["request_id"].as_str().unwrap().to_owned();
        run.rename("\"r1\"", &format!("\"{ours}\""));
        run.until("\"control_response\"");
        assert!(
            run.session.stdin_pending().is_empty(),
            "not before the result"
        );
        run.until("\"type\":\"result\"");
        let sent = run.take_stdin();
        assert_eq!(sent[0]["message"]["content"], "stop, do Y instead");
        assert_eq!(sent[0]["uuid"], uuid.as_str());
        assert_eq!(run.session.message_status(&uuid), Some(MessageStatus::Sent));
        assert_eq!(
            turn_ended(&run.events()),
            [("error_during_execution".to_owned(), false)]
        );
        assert!(run.session.is_running());

        // Between turns, "now" has nothing to interrupt: the message goes at once.
        let mut idle = Replay::new("perm-deny", "x");
        idle.take_stdin();
        idle.rest();
        idle.session.send_message("next", true, idle.now).unwrap();
        let sent = idle.take_stdin();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["type"], "user");
    }

    #[test]
    fn a_refused_interrupt_releases_the_held_message() {
        let mut run = Replay::new("interrupt-tool", "sleep a while");
        run.take_stdin();
        run.until("task_started");
        let uuid = run
            .session
            .send_message("now please", true, run.now)
            .unwrap();
        let ours = run.take_stdin()[0]["request_id"]
            .as_str()
            .unwrap()
            .to_owned();
        run.feed_line(&format!(
            r#"{{"type":"control_response","response":{{"subtype":"error","request_id":"{ours}","error":"busy"}}}}"#
        ));
        assert_eq!(
            run.events(),
            [SessionEvent::InterruptAnswered {
                error: Some("busy".into())
            }]
        );
        assert_eq!(run.take_stdin()[0]["uuid"], uuid.as_str());
        assert_eq!(
            run.what(),
            "running `timeout 120 tail -f /dev/null; echo finished`"
        );
    }

    #[test]
    fn an_idle_reported_before_a_message_sent_after_the_result_was_read_drops_nothing() {
        // message_task with now: the interrupt's result releases the held text; the agent
        // reports idle before it has read it (the fake agent and the CLI both do).
        let mut run = Replay::new("interrupt-tool", "x");
        run.take_stdin();
        run.feed_line(r#"{"type":"system","subtype":"init","session_id":"s"}"#);
        run.replay_prompt();
        let next = run
            .session
            .send_message("do this instead", true, run.now)
            .unwrap();
        assert_eq!(run.take_stdin()[0]["request"]["subtype"], "interrupt");
        run.feed_line(
            r#"{"type":"result","subtype":"error_during_execution","is_error":true,"session_id":"s"}"#,
        );
        assert_eq!(run.take_stdin()[0]["uuid"], next.as_str(), "released");
        run.feed_line(r#"{"type":"system","subtype":"session_state_changed","state":"idle"}"#);
        assert!(run.session.is_running(), "stale: the message starts a turn");
        assert_eq!(run.session.message_status(&next), Some(MessageStatus::Sent));
        assert!(
            !run.events().contains(&SessionEvent::Idle),
            "the task is not over"
        );
        run.feed_line(&format!(
            r#"{{"type":"user","message":{{"role":"user","content":"x"}},"uuid":"{next}","isReplay":true}}"#
        ));
        assert_eq!(
            run.session.message_status(&next),
            Some(MessageStatus::TakenIn)
        );
    }

    #[test]
    fn idle_session_state_drops_messages_never_taken_in() {
        let mut run = Replay::new("perm-deny", "x");
        run.take_stdin();
        run.until("\"subtype\":\"init\"");
        run.replay_prompt();
        run.until("\"type\":\"assistant\"");
        let late = run
            .session
            .send_message("and also this", false, run.now)
            .unwrap();
        run.rest();
        assert_eq!(turn_ended(&run.events()), [("success".to_owned(), false)]);
        assert!(run.session.is_running());
        run.feed_line(r#"{"type":"system","subtype":"session_state_changed","state":"idle"}"#);
        assert_eq!(
            run.events(),
            [
                SessionEvent::MessageDropped { uuid: late.clone() },
                SessionEvent::Idle
            ]
        );
        assert_eq!(
            run.session.message_status(&late),
            Some(MessageStatus::Dropped)
        );
        assert!(!run.session.is_running());
        // Replayed after all (a late replay): taken in, and a turn runs.
        run.feed_line(&format!(
            r#"{{"type":"user","message":{{"role":"user","content":"x"}},"uuid":"{late}","isReplay":true}}"#
        ));
        assert_eq!(
            run.session.message_status(&late),
            Some(MessageStatus::TakenIn)
        );
        assert!(run.session.is_running());
    }

    #[test]
    fn unhandled_control_requests_get_an_error_answer() {
        let mut run = Replay::new("perm-deny", "x");
        run.take_stdin();
        run.feed_line(
            r#"{"type":"control_request","request_id":"h1","request":{"subtype":"hook_callback"}}"#,
        );
        run.feed_line(
            r#"{"type":"control_request","request_id":"h2","request":{"subtype":"can_use_tool"}}"#,
        );
        let sent = run.take_stdin();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            sent[0],
            json!({"type": "control_response", "response": {"subtype": "error",
                "request_id": "h1", "error": "walkie does not handle \"hook_callback\" requests"}})
        );
        assert_eq!(sent[1]["response"]["request_id"], "h2");
        assert_eq!(sent[1]["response"]["subtype"], "error");
        assert_eq!(
            run.events(),
            [
                SessionEvent::Refused {
                    request_id: "h1".into(),
                    subtype: "hook_callback".into()
                },
                SessionEvent::Refused {
                    request_id: "h2".into(),
                    subtype: "can_use_tool".into()
                }
            ]
        );
    }

    fn ask(id: &str, tool: &str, input: Value) -> StreamEvent {
        StreamEvent::PermissionRequest(Box::new(PermissionRequest {
            request_id: id.into(),
            tool_name: tool.into(),
            input,
            tool_use_id: None,
            description: Some("a description".into()),
            decision_reason: None,
            blocked_path: None,
            suggestions: Vec::new(),
        }))
    }

    #[test]
    fn requests_are_kept_oldest_first_and_bounded() {
        let t0 = Instant::now();
        let mut s = ClaudeSession::new("go", CWD, TIMEOUT, 1, t0);
        s.stdin_written(s.stdin_pending().len());
        for i in 0..MAX_PENDING + 2 {
            let at = t0 + Duration::from_secs(i as u64);
            s.handle_event(
                at,
                &ask(
                    &format!("r{i}"),
                    "Bash",
                    json!({"command": format!("make {i}")}),
                ),
            );
        }
        // The same request twice is one request.
        s.handle_event(t0, &ask("r0", "Bash", json!({"command": "make 0"})));
        let ids: Vec<&str> = s
            .pending_permissions()
            .iter()
            .map(|p| p.request_id.as_str())
            .collect();
        assert_eq!(ids.len(), MAX_PENDING);
        assert_eq!(ids[0], "r0");
        assert_eq!(s.poll_timeout(), Some(t0 + TIMEOUT));
        // The ones beyond the bound were denied at once.
        let text = String::from_utf8(s.stdin_pending().to_vec()).unwrap();
        let denied: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(denied.len(), 2);
        assert_eq!(
            denied[0]["response"]["request_id"],
            format!("r{MAX_PENDING}")
        );
        assert_eq!(denied[0]["response"]["response"]["behavior"], "deny");
        assert_eq!(
            s.activity("").what,
            "waiting for your approval to run `make 0`",
            "the oldest is asked first"
        );
        // A result drops what is left (the turn is over).
        s.handle_event(t0, &StreamEvent::Result(result_line("success")));
        assert!(s.pending_permissions().is_empty());
        let withdrawn = std::iter::from_fn(|| s.poll_event())
            .filter(|e| matches!(e, SessionEvent::PermissionWithdrawn { .. }))
            .count();
        assert_eq!(withdrawn, MAX_PENDING);
    }

    fn result_line(subtype: &str) -> ResultLine {
        ResultLine {
            is_error: subtype != "success",
            subtype: subtype.into(),
            text: Some("ok".into()),
            num_turns: Some(1),
            total_cost_usd: None,
            duration_ms: None,
        }
    }

    #[test]
    fn an_agent_that_stops_reading_costs_bounded_memory() {
        let t0 = Instant::now();
        let mut s = ClaudeSession::new("go", CWD, TIMEOUT, 1, t0);
        let chunk = "x".repeat(64 * 1024);
        let mut refused = None;
        for _ in 0..100 {
            if let Err(e) = s.send_message(&chunk, false, t0) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(refused, Some(SendError::Backlog(_))),
            "{refused:?}"
        );
        assert!(s.stdin_pending().len() <= MAX_STDIN_BACKLOG);
        // Once the agent reads, messages go again.
        s.stdin_written(usize::MAX);
        assert!(s.send_message("hello", false, t0).is_ok());
        assert_eq!(s.send_message("  \n", false, t0), Err(SendError::Empty));
        // Receipts are remembered for the last messages only.
        for i in 0..3 * MAX_SENT {
            s.stdin_written(usize::MAX);
            s.send_message(&format!("m{i}"), false, t0).unwrap();
        }
        assert_eq!(s.sent.len(), MAX_SENT);
    }

    #[test]
    fn close_writes_what_is_pending_then_asks_for_eof() {
        let t0 = Instant::now();
        let mut s = ClaudeSession::new("go", CWD, TIMEOUT, 1, t0);
        s.handle_event(t0, &ask("r1", "Bash", json!({"command": "ls"})));
        s.close();
        assert!(!s.wants_stdin_closed(), "the prompt is not written yet");
        assert_eq!(s.send_message("more", false, t0), Err(SendError::Closed));
        assert_eq!(s.interrupt(t0), Err(InterruptError::Closed));
        assert_eq!(
            s.answer("r1", Decision::Allow, t0),
            Err(AnswerError::Closed)
        );
        assert!(s.pending_permissions().is_empty());
        s.stdin_written(s.stdin_pending().len());
        assert!(s.wants_stdin_closed());
        assert_eq!(s.activity("").what, "closing");
    }

    #[test]
    fn activity_words_for_each_tool() {
        let cases = [
            (
                "Bash",
                None,
                "cargo test -p walkie",
                "running `cargo test -p walkie`",
            ),
            (
                "Write",
                Some("/home/user/cwd/src/parser.rs"),
                "",
                "writing src/parser.rs",
            ),
            (
                "Edit",
                Some("/home/user/cwd/src/parser.rs"),
                "",
                "editing src/parser.rs",
            ),
            ("MultiEdit", Some("/etc/hosts"), "", "editing /etc/hosts"),
            (
                "Read",
                Some("/home/user/cwd/README.md"),
                "",
                "reading README.md",
            ),
            (
                "Grep",
                None,
                "fn main in src",
                "searching the code for fn main in src",
            ),
            (
                "Glob",
                None,
                "**/*.rs",
                "looking for files matching **/*.rs",
            ),
            (
                "WebFetch",
                None,
                "https://docs.rs/mio",
                "fetching https://docs.rs/mio",
            ),
            (
                "WebSearch",
                None,
                "mio edge triggered",
                "searching the web for mio edge triggered",
            ),
            (
                "Task",
                None,
                "Find the flaky test",
                "running a sub-agent: Find the flaky test",
            ),
            ("TodoWrite", None, "", "updating its to-do list"),
            (
                "mcp__db__query",
                None,
                "select 1",
                "using mcp__db__query: select 1",
            ),
            ("Mystery", None, "", "using Mystery"),
        ];
        for (name, path, detail, expected) in cases {
            let object = path.unwrap_or(detail);
            assert_eq!(tool_words(name, object, detail, CWD), expected, "{name}");
        }
        // The cwd itself is not "relative", and a sibling directory is not under it.
        assert_eq!(speakable_path("/home/user/cwd", CWD), "/home/user/cwd");
        assert_eq!(
            speakable_path("/home/user/cwd2/x", CWD),
            "/home/user/cwd2/x"
        );
        // Long paths keep their end, from a directory boundary.
        let deep = format!("{CWD}/{}/mod.rs", "very_long_directory_name/".repeat(8));
        let spoken = speakable_path(&deep, CWD);
        assert!(
            spoken.starts_with("…/") && spoken.ends_with("/mod.rs"),
            "{spoken}"
        );
        assert!(spoken.chars().count() <= OBJECT_CHARS, "{spoken}");
        // Long commands are cut, on one line.
        let long = format!("for f in *; do\n  echo {}\ndone", "word ".repeat(40));
        let words = tool_words("Bash", &long, &long, CWD);
        assert!(words.chars().count() <= OBJECT_CHARS + 12, "{words}");
        assert!(!words.contains('\n'));
    }

    #[test]
    fn secrets_never_reach_the_activity() {
        let t0 = Instant::now();
        let mut s = ClaudeSession::new("go", CWD, TIMEOUT, 1, t0);
        let key = "sk-proj-Xy12AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd";
        let command =
            format!("curl -H 'Authorization: Bearer {key}' https://bob:hunter2@example.com/x");
        s.handle_event(
            t0,
            &StreamEvent::ToolUse {
                name: "Bash".into(),
                file_path: None,
                detail: command.clone(),
                id: Some("t1".into()),
            },
        );
        let what = s.activity("").what;
        assert!(what.starts_with("running `curl"), "{what}");
        assert!(!what.contains(key) && !what.contains("hunter2"), "{what}");
        s.handle_event(t0, &ask("r1", "Bash", json!({"command": command})));
        let p = &s.pending_permissions()[0];
        assert!(
            !p.object.contains("Xy12AbCd") && !p.object.contains("hunter2"),
            "{}",
            p.object
        );
        // The key sits right where a long text would be cut: still redacted.
        let mut text = "Done. ".repeat(LAST_TEXT_BYTES / 6);
        text.push_str(&format!("I used the key {key} to deploy it."));
        s.handle_event(t0, &StreamEvent::Text(text));
        let sentence = s.activity("").last_sentence.unwrap();
        assert_eq!(sentence, "I used the key [redacted] to deploy it.");
    }

    #[test]
    fn last_sentence_is_short_plain_speech() {
        assert_eq!(
            last_sentence(
                "Fixed it.\n\n**All 12 tests pass.** See `src/lib.rs`.\n```\ncode\n```\n",
                ""
            )
            .as_deref(),
            Some("See src/lib.rs.")
        );
        assert_eq!(
            last_sentence("One. Two three!", "").as_deref(),
            Some("Two three!")
        );
        assert_eq!(
            last_sentence("no end mark", "").as_deref(),
            Some("no end mark.")
        );
        // A long code block across the start of the searched window is skipped whole.
        let code = "let x = 1; // a line of code. Not prose.\n".repeat(200);
        let text = format!("Before.\n```\n{code}```\nAfter the code.\n```\nmore\n```\n");
        assert_eq!(last_sentence(&text, "").as_deref(), Some("After the code."));
        assert_eq!(last_sentence("```\nonly code\n```", ""), None);
        assert_eq!(last_sentence("   ", ""), None);
        let long = format!("Start. {}", "word ".repeat(100));
        let cut = last_sentence(&long, "").unwrap();
        assert!(cut.chars().count() <= SENTENCE_CHARS, "{cut}");
        assert!(cut.starts_with("word word"));
        // A key printed across two messages: the last one holds only its second half,
        // which the output (both lines) shows to be a piece of a key.
        let output = "Done. The new OpenAI key is sk-proj-Yt5Rk8Lm2Qx9Zp4\n\
                      Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4Pl and everything else is fine.\n";
        let last = "Vt8Wn3Hc6Jd1Fs5Gb0Ya9Qe2Um7Io4Pl and everything else is fine.";
        assert_eq!(
            last_sentence(last, output).as_deref(),
            Some("[redacted] and everything else is fine.")
        );
    }

    #[test]
    fn permission_words_for_each_tool() {
        let words = |tool: &str, input: Value| {
            let StreamEvent::PermissionRequest(p) = ask("r", tool, input) else {
                unreachable!()
            };
            permission_words(&p, CWD)
        };
        assert_eq!(
            words("Bash", json!({"command": "npm test"})),
            ("run", "`npm test`".into())
        );
        assert_eq!(
            words(
                "Write",
                json!({"file_path": "/home/user/cwd/a/b.rs", "content": "x"})
            ),
            ("write", "a/b.rs".into())
        );
        assert_eq!(
            words("Edit", json!({"file_path": "/srv/x.conf"})),
            ("edit", "/srv/x.conf".into())
        );
        assert_eq!(
            words(
                "WebFetch",
                json!({"url": "https://example.com", "prompt": "p"})
            ),
            ("fetch", "https://example.com".into())
        );
        assert_eq!(
            words("mcp__x__y", json!({"query": "select"})),
            ("use", "mcp__x__y: select".into())
        );
        assert_eq!(words("Odd", json!(7)), ("use", "Odd: a description".into()));
        assert_eq!(words("Bash", json!({})), ("use", "Bash".into()));
    }
}
