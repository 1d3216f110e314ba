//! `--input-format stream-json`: the CLI kept open on stdin, as the real one behaves in the
//! kept-open captures (`tests/fixtures/claude-cli/CONTROL.md` and the runs beside it).
//!
//! One thread. Between turns and during them, [`Duplex::wait`] polls stdin and the SIGINT
//! self-pipe together, so user messages and control requests are read whenever they come.
//! Each user message is a turn played from its own directives: `system/init`, the replay of
//! the message (`--replay-user-messages`), tool uses, the text, `result`. A message that
//! arrives mid-turn is taken in at the next tool boundary (its tool directives join the
//! turn), or is the next turn when no tool boundary comes; with `"priority":"now"` it ends
//! the turn at the boundary. An `interrupt` control request ends the turn at once and the
//! process stays. Tools that need approval send `can_use_tool` requests and wait for the
//! answer. At stdin EOF, what is queued is finished and the process exits with the last
//! turn's status.
//!
//! Guesses beyond the captures (documented in README.md): an interrupt drops the messages
//! still queued; `command_lifecycle` lines come with the session-state events; stdin EOF
//! withdraws a pending permission request.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Map, Value, json};

use crate::cli::{Options, OutputFormat};
use crate::directives::{self, Directives, ToolDirective};
use crate::lines::{self, Ending, REJECTED, STOPPED_WHILE_RUNNING, Session, Tally};
use crate::output::{Output, Style};
use crate::run::{self, DEFAULT_DURATION, Finish, Halt, Step};
use crate::signals::{Interrupted, Signals};
use crate::workspace::{self, Exchange};

/// A Bash step running this long gets `system/task_started` (steer and interrupt-tool
/// fixtures: about 3 s after the tool use; a 2 s step in the progress run got none).
const TASK_STARTED_AFTER: Duration = Duration::from_secs(3);
/// Longest stdin line kept; a longer one is dropped with a note on stderr.
const MAX_STDIN_LINE: usize = 8 * 1024 * 1024;
/// The environment variable that turns on `system/session_state_changed` lines.
const SESSION_STATE_ENV: &str = "CLAUDE_CODE_EMIT_SESSION_STATE_EVENTS";

/// What cuts a turn short.
#[derive(Debug)]
enum Stop {
    /// SIGINT: the turn ends as interrupted and the process exits 0 (as in one-shot mode).
    Sigint,
    /// stdout is gone: exit 1.
    Output(io::Error),
    /// An `interrupt` control request with this id: the turn ends, the process stays.
    Interrupt(String),
    /// A message with `"priority":"now"` is waiting at a tool boundary.
    Superseded,
    /// The user denied a request with `"interrupt":true`.
    DeniedInterrupt,
    /// A message with a bad directive: exit 2, as in one-shot mode.
    Usage(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Output(e)
    }
}

impl From<Interrupted> for Stop {
    fn from(_: Interrupted) -> Self {
        Stop::Sigint
    }
}

impl From<Halt> for Stop {
    fn from(halt: Halt) -> Self {
        match halt {
            Halt::Interrupted => Stop::Sigint,
            Halt::Output(e) => Stop::Output(e),
        }
    }
}

/// stdin, read without blocking the turn: bytes are taken when poll says they are there.
#[derive(Default)]
struct Inbox {
    buffer: Vec<u8>,
    /// Dropping the rest of an over-long line.
    discarding: bool,
    eof: bool,
}

impl Inbox {
    /// One read of whatever stdin has.
    fn fill(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        match nix::unistd::read(io::stdin().as_fd(), &mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                if !self.buffer.contains(&b'\n') && self.buffer.len() > MAX_STDIN_LINE {
                    eprintln!("fake-agent: dropping a stdin line longer than {MAX_STDIN_LINE}");
                    self.buffer.clear();
                    self.discarding = true;
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => {
                eprintln!("fake-agent: cannot read stdin: {e}");
                self.eof = true;
            }
        }
    }

    /// The next complete line (at EOF, the unterminated rest too).
    fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let line = match self.buffer.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    let mut line: Vec<u8> = self.buffer.drain(..=at).collect();
                    line.pop();
                    line
                }
                None if self.eof && !self.buffer.is_empty() => std::mem::take(&mut self.buffer),
                None => return None,
            };
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            return Some(line);
        }
    }

    /// Nothing more will come.
    fn finished(&self) -> bool {
        self.eof && self.buffer.is_empty()
    }
}

/// A user message from stdin.
#[derive(Debug, Clone)]
struct Message {
    /// `message.content` as sent (a string, or blocks), echoed in the replay.
    content: Value,
    /// Its text.
    text: String,
    uuid: String,
    /// The sender chose the uuid (so it gets `command_lifecycle` lines).
    own_uuid: bool,
    /// `"priority":"now"`.
    now: bool,
}

impl Message {
    fn from_line(line: &Value) -> Message {
        let content = line["message"]["content"].clone();
        let text = match &content {
            Value::String(text) => text.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        let given = line["uuid"].as_str().filter(|u| !u.is_empty());
        Message {
            content,
            text,
            uuid: given.map_or_else(lines::uuid_v4, str::to_owned),
            own_uuid: given.is_some(),
            now: line["priority"] == "now",
        }
    }
}

/// The user's answer to a permission request.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// Allowed, with the input to use instead (`updatedInput`).
    Allow(Option<Value>),
    Deny {
        message: String,
        interrupt: bool,
    },
    /// Refused without asking (no prompt tool, or `dontAsk`).
    Refused,
    /// The agent withdrew the request (`@withdraw`, or stdin closed).
    Withdrawn,
}

/// A rule added by an "always" answer.
#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// `addRules`: Bash commands matching `prefix *` (or exactly `prefix`).
    Command(String),
    /// `addDirectories`: files under this directory.
    Directory(String),
}

/// A tool use under way (for the shape of an interrupted turn).
struct Running {
    id: String,
    exchange: Exchange,
    task_started: bool,
}

/// A permission request waiting for its answer.
struct Asking {
    request_id: String,
    tool_use_id: String,
    exchange: Exchange,
}

struct Duplex<W: Write> {
    out: Output<W>,
    /// Installed once the first message has said which signals to ignore.
    signals: Option<Signals>,
    inbox: Inbox,
    cwd: PathBuf,
    options: Options,
    from_env: Option<String>,
    session_state: bool,
    /// The session reported `running` and not yet `idle`.
    busy: bool,
    queue: VecDeque<Message>,
    /// The control request we wait on, and its answer once read.
    expecting: Option<String>,
    answer: Option<Value>,
    rules: Vec<Rule>,
    in_turn: bool,
    results: u32,
    cost_usd: f64,
    /// Exit status the last turn calls for.
    status: i32,
    // The turn being played.
    start: Instant,
    directives: Directives,
    prompt: String,
    steps: VecDeque<Step>,
    tool_turns: u32,
    steers: Vec<String>,
    /// Messages with their own uuid taken in this turn (for `command_lifecycle`).
    taken: Vec<String>,
    denials: Vec<Value>,
    running: Option<Running>,
    asking: Option<Asking>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Plays a kept-open session; returns the process exit status.
pub fn main(options: Options) -> i32 {
    if options.output_format != OutputFormat::StreamJson {
        eprintln!("Error: --input-format=stream-json requires output-format=stream-json");
        return 1;
    }
    if options.print && !options.verbose {
        eprintln!("Error: When using --print, --output-format=stream-json requires --verbose");
        return 1;
    }
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            eprintln!("Error: cannot read the working directory: {e}");
            return 1;
        }
    };
    let stdout = match io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => File::from(fd),
        Err(e) => {
            eprintln!("fake-agent: cannot use stdout: {e}");
            return 1;
        }
    };
    let session = Session {
        id: options
            .resume
            .clone()
            .or(options.session_id.clone())
            .unwrap_or_else(lines::uuid_v4),
        model: options
            .model
            .clone()
            .unwrap_or_else(|| lines::DEFAULT_MODEL.to_owned()),
        cwd: cwd.display().to_string(),
        permission_mode: options
            .permission_mode
            .clone()
            .unwrap_or_else(|| "default".into()),
    };
    let style = Style::StreamJson {
        partial: options.include_partial_messages,
    };
    let mut duplex = Duplex {
        out: Output::new(BufWriter::with_capacity(64 * 1024, stdout), style, session),
        signals: None,
        inbox: Inbox::default(),
        cwd,
        // A resumed session's cost is cumulative; pretend the earlier run was a default one.
        cost_usd: if options.resume.is_some() {
            2.0 * lines::COST_PER_TURN_USD
        } else {
            0.0
        },
        options,
        from_env: std::env::var("FAKE_AGENT_DIRECTIVES").ok(),
        session_state: std::env::var(SESSION_STATE_ENV).is_ok_and(|v| v == "1"),
        busy: false,
        queue: VecDeque::new(),
        expecting: None,
        answer: None,
        rules: Vec::new(),
        in_turn: false,
        results: 0,
        status: 0,
        start: Instant::now(),
        directives: Directives::default(),
        prompt: String::new(),
        steps: VecDeque::new(),
        tool_turns: 0,
        steers: Vec::new(),
        taken: Vec::new(),
        denials: Vec::new(),
        running: None,
        asking: None,
    };
    match duplex.serve() {
        Ok(status) => status,
        Err(Stop::Usage(message)) => {
            eprintln!("fake-agent: {message}");
            2
        }
        Err(Stop::Output(e)) => {
            eprintln!("fake-agent: cannot write to stdout: {e}");
            1
        }
        // Between turns a SIGINT just ends the process.
        Err(_) => 0,
    }
}

impl<W: Write> Duplex<W> {
    fn serve(&mut self) -> Result<i32, Stop> {
        let Some(first) = self.next_message()? else {
            eprintln!(
                "Error: Input must be provided either through stdin or as a prompt argument \
                 when using --print"
            );
            return Ok(1);
        };
        // Process-wide directives come from the first message (and the environment).
        let first_directives = directives::parse(&first.text, self.from_env.as_deref())
            .map_err(|e| Stop::Usage(e.to_string()))?
            .directives;
        let signals =
            Signals::install(first_directives.ignore_int, first_directives.ignore_term)
                .map_err(|e| Stop::Output(io::Error::other(format!("signal handlers: {e}"))))?;
        self.signals = Some(signals);
        if let Some(path) = &first_directives.pidfile {
            run::write_whole(&self.cwd.join(path), &format!("{}\n", std::process::id()))?;
        }
        if let Some(text) = &first_directives.stderr {
            eprintln!("{text}");
        }
        let mut next = Some(first);
        while let Some(message) = next {
            match self.turn(message) {
                Ok(()) => {}
                Err(Stop::Sigint) => {
                    let ending = self.abort(None)?;
                    self.finish_turn(ending)?;
                    return Ok(0);
                }
                Err(other) => return Err(other),
            }
            next = self.next_message()?;
        }
        Ok(self.status)
    }

    /// The next queued message, waiting for one; None at EOF.
    fn next_message(&mut self) -> Result<Option<Message>, Stop> {
        loop {
            if let Some(message) = self.queue.pop_front() {
                return Ok(Some(message));
            }
            if self.inbox.finished() {
                return Ok(None);
            }
            self.wait(None)?;
        }
    }

    /// Waits for input, SIGINT or `deadline` (None: no deadline), whichever comes first,
    /// and handles the input that came.
    fn wait(&mut self, deadline: Option<Instant>) -> Result<(), Stop> {
        if let Some(signals) = &self.signals {
            signals.check()?;
        }
        if self.drain_input()? {
            return Ok(());
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => {
                    // Rounded up: a sub-millisecond rest must not become a busy loop.
                    let ms = left.as_micros().div_ceil(1000);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
                _ => return Ok(()),
            },
        };
        let stdin = io::stdin();
        let mut fds = Vec::with_capacity(2);
        if !self.inbox.eof {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        if let Some(wake) = self.signals.as_ref().and_then(Signals::wake_fd) {
            fds.push(PollFd::new(wake, PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("fake-agent: poll: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let stdin_ready = !self.inbox.eof && fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if stdin_ready {
            self.inbox.fill();
        }
        // SIGINT is seen by the check at the top of the next wait.
        if let Some(signals) = &self.signals {
            signals.check()?;
        }
        self.drain_input()?;
        Ok(())
    }

    /// Waits until `deadline`, handling input meanwhile.
    fn sleep_until(&mut self, deadline: Instant) -> Result<(), Stop> {
        while Instant::now() < deadline {
            self.wait(Some(deadline))?;
        }
        Ok(())
    }

    /// Handles every complete stdin line; whether there was any.
    fn drain_input(&mut self) -> Result<bool, Stop> {
        let mut any = false;
        while let Some(line) = self.inbox.next_line() {
            any = true;
            self.handle_input(&line)?;
        }
        Ok(any)
    }

    fn handle_input(&mut self, line: &[u8]) -> Result<(), Stop> {
        let text = String::from_utf8_lossy(line);
        if text.trim().is_empty() {
            return Ok(());
        }
        let value: Value = match serde_json::from_str(&text) {
            Ok(value) => value,
            Err(e) => {
                eprintln!("fake-agent: ignoring an unreadable stdin line ({e})");
                return Ok(());
            }
        };
        match value["type"].as_str() {
            Some("user") => {
                let message = Message::from_line(&value);
                // The session is busy from the moment a message comes (progress fixture).
                self.set_busy(true)?;
                if self.session_state && message.own_uuid {
                    let line =
                        lines::command_lifecycle(self.out.session(), &message.uuid, "queued");
                    self.out.event(&line)?;
                }
                self.queue.push_back(message);
            }
            Some("control_request") => {
                let Some(id) = value["request_id"].as_str() else {
                    eprintln!("fake-agent: ignoring a control_request without a request_id");
                    return Ok(());
                };
                match value["request"]["subtype"].as_str() {
                    Some("interrupt") if self.in_turn => return Err(Stop::Interrupt(id.into())),
                    // Between turns there is nothing to stop (interrupt-stream fixture).
                    Some("interrupt") => {
                        let line = lines::control_response(id, json!({"still_queued": []}));
                        self.out.event(&line)?;
                    }
                    other => {
                        let error = format!(
                            "Unsupported control request subtype: {}",
                            other.unwrap_or("(none)")
                        );
                        self.out.event(&lines::control_error(id, &error))?;
                    }
                }
            }
            Some("control_response") => {
                let response = &value["response"];
                let id = response["request_id"].as_str();
                if id.is_some() && id == self.expecting.as_deref() {
                    self.answer = Some(response.clone());
                } else {
                    eprintln!("fake-agent: ignoring an answer to no pending request: {value}");
                }
            }
            other => eprintln!("fake-agent: ignoring a stdin line of type {other:?}"),
        }
        Ok(())
    }

    /// One user message played as a turn.
    fn turn(&mut self, message: Message) -> Result<(), Stop> {
        let parsed = directives::parse(&message.text, self.from_env.as_deref())
            .map_err(|e| Stop::Usage(e.to_string()))?;
        self.in_turn = true;
        self.start = Instant::now();
        self.directives = parsed.directives;
        self.prompt = parsed.prompt;
        self.steps.clear();
        self.tool_turns = 0;
        self.steers.clear();
        self.taken.clear();
        self.denials.clear();
        self.set_busy(true)?;
        // A message starting a turn is started before the init line; one taken in mid-turn
        // after its replay (progress fixture).
        self.lifecycle(&message, "started")?;
        let api_key_source = if std::env::var_os("ANTHROPIC_API_KEY").is_some() {
            "ANTHROPIC_API_KEY"
        } else {
            "none"
        };
        let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        self.out.init(api_key_source, &tmp)?;
        let played = (|| {
            self.replay(&message)?;
            if let Some(subtype) = self.directives.control.clone() {
                self.control_round_trip(&subtype)?;
            }
            let (steps, finish) = run::plan(&self.directives, self.options.max_turns, &self.cwd);
            // A message without tool directives is answered with text only, as in the
            // captures ("are you still there?"): no default notes file in this mode.
            self.steps = steps
                .into_iter()
                .filter(|step| !matches!(step, Step::Notes(_)))
                .collect();
            self.play(finish)
        })();
        let ending = match played {
            Ok(ending) => ending,
            Err(Stop::Interrupt(id)) => self.abort(Some(id))?,
            Err(Stop::Superseded) => Ending::Superseded,
            Err(Stop::DeniedInterrupt) => {
                self.out
                    .user_text("[Request interrupted by user for tool use]")?;
                Ending::Interrupted { in_tool: true }
            }
            Err(other) => return Err(other),
        };
        self.finish_turn(ending)
    }

    /// The echo of a message the model takes in (`--replay-user-messages`): our receipt.
    fn replay(&mut self, message: &Message) -> Result<(), Stop> {
        if self.options.replay_user_messages {
            let line = lines::replay(
                self.out.session(),
                &message.content,
                &message.uuid,
                now_ms(),
            );
            self.out.event(&line)?;
        }
        Ok(())
    }

    /// `command_lifecycle` of a message with its own uuid (with the session-state events).
    fn lifecycle(&mut self, message: &Message, state: &str) -> Result<(), Stop> {
        if self.session_state && message.own_uuid {
            let line = lines::command_lifecycle(self.out.session(), &message.uuid, state);
            self.out.event(&line)?;
            if state == "started" {
                self.taken.push(message.uuid.clone());
            }
        }
        Ok(())
    }

    /// `system/session_state_changed` when the session turns busy or idle.
    fn set_busy(&mut self, busy: bool) -> Result<(), Stop> {
        if self.session_state && self.busy != busy {
            self.busy = busy;
            let state = if busy { "running" } else { "idle" };
            self.out
                .system("session_state_changed", json!({"state": state}))?;
        }
        Ok(())
    }

    /// `@control`: a control request the supervisor must answer; the answer goes to stderr.
    fn control_round_trip(&mut self, subtype: &str) -> Result<(), Stop> {
        let id = lines::uuid_v4();
        self.out.event(&lines::control_request(&id, subtype))?;
        self.expecting = Some(id);
        self.answer = None;
        loop {
            if let Some(answer) = self.answer.take() {
                eprintln!("fake-agent: control request {subtype} answered: {answer}");
                break;
            }
            if self.inbox.finished() {
                eprintln!("fake-agent: control request {subtype} never answered");
                break;
            }
            self.wait(None)?;
        }
        self.expecting = None;
        Ok(())
    }

    /// Plays the turn's steps on their schedule, then its ending.
    fn play(&mut self, finish: Finish) -> Result<Ending, Stop> {
        let total = self.directives.sleep.unwrap_or(DEFAULT_DURATION);
        let planned = self.steps.len() as u32;
        let mut done = 0u32;
        while let Some(step) = self.steps.pop_front() {
            // Steps a steering message added run at once.
            if done < planned {
                self.sleep_until(self.start + total * (done + 1) / (planned + 1))?;
            }
            done += 1;
            let stall_here = finish == Finish::Stall && self.steps.is_empty();
            self.step(&step, stall_here)?;
        }
        match finish {
            Finish::Stall => loop {
                // Only an interrupt or a signal ends this.
                self.wait(None)?;
            },
            Finish::Success => {
                self.sleep_until(self.start + total)?;
                let mut text = run::final_text(&self.directives, &self.prompt);
                for steer in &self.steers {
                    // As the CLI shows it to the model (steer fixture).
                    text.push_str(&format!(
                        "\nI saw: The user sent a new message while you were working: {steer}"
                    ));
                }
                self.out.text(&text)?;
                Ok(Ending::Success { text })
            }
            Finish::ApiError(status) => {
                self.sleep_until(self.start + total)?;
                let text = run::api_error_text(status);
                self.out.api_error(status, &text)?;
                Ok(Ending::ApiError { status, text })
            }
            Finish::MaxTurns(limit) => {
                self.sleep_until(self.start + total)?;
                Ok(Ending::MaxTurns { limit })
            }
        }
    }

    fn step(&mut self, step: &Step, stall_here: bool) -> Result<(), Stop> {
        match step {
            Step::Tool(ToolDirective::Write(path)) => {
                let content = format!("Written by fake-agent.\n\nTask: {}\n", self.prompt);
                let exchange = workspace::write(&self.cwd, path, &content);
                self.tool(exchange, false)
            }
            Step::Tool(ToolDirective::Edit(path)) => {
                if !workspace::editable(&self.cwd, path) {
                    let created = workspace::write(&self.cwd, path, "hello world\n");
                    self.tool(created, false)?;
                }
                let exchange = workspace::edit(&self.cwd, path);
                self.tool(exchange, false)
            }
            Step::Tool(ToolDirective::Bash(command)) => {
                let exchange = workspace::bash(command, "Run the command", "ok");
                self.tool(exchange, stall_here)
            }
            Step::Tool(ToolDirective::Grandchild) => {
                let exchange = run::spawn_grandchild(&self.cwd);
                self.tool(exchange, stall_here)
            }
            Step::Tool(ToolDirective::Ask(command)) => {
                let preview = workspace::bash(command, "Run the command", "ok");
                self.ask(preview)
            }
            Step::Tool(ToolDirective::AskWrite(path)) => {
                let full = self.cwd.join(path).display().to_string();
                let content = format!("Written by fake-agent.\n\nTask: {}\n", self.prompt);
                let preview = Exchange {
                    name: "Write",
                    input: json!({"file_path": full, "content": content}),
                    content: String::new(),
                    is_error: false,
                    structured: Value::Null,
                };
                self.ask(preview)
            }
            Step::Notes(path) => {
                let content = format!("# Notes\n\n{}\n", self.prompt);
                let exchange = workspace::write(&self.cwd, path, &content);
                self.tool(exchange, false)
            }
            Step::EchoTurn(n) => {
                let exchange =
                    workspace::bash(&format!("echo turn {n}"), "Echo turn", &format!("turn {n}"));
                self.tool(exchange, false)
            }
            Step::ApiRetry { attempt, status } => {
                let (error, _) = lines::api_error_names(*status);
                self.out.system(
                    "api_retry",
                    json!({"attempt": attempt, "max_retries": 2, "retry_delay_ms": 500 * attempt,
                           "error_status": status, "error": error}),
                )?;
                Ok(())
            }
            Step::Flood => {
                let signals = self
                    .signals
                    .as_mut()
                    .expect("installed before the first turn");
                Ok(run::flood(&mut self.out, signals, &self.directives)?)
            }
            Step::Oversize(size) => {
                let len = size.saturating_sub(self.out.flood_overhead());
                self.out
                    .flood_line(&crate::flood::Corpus::new().slice(len as usize))?;
                self.out.flush()?;
                Ok(())
            }
            // `@say` is planned in one-shot mode only.
            Step::Say(text) => {
                self.out.text(text)?;
                Ok(())
            }
        }
    }

    /// A tool use whose effect is already done: runs for `@tool-ms`, answers, and is a
    /// boundary. `stall_here`: the turn's last step under `@stall`, left running.
    fn tool(&mut self, exchange: Exchange, stall_here: bool) -> Result<(), Stop> {
        let id = self.out.tool_use(&exchange)?;
        self.tool_turns += 1;
        if stall_here {
            self.task_started(&id, &exchange)?;
            self.running = Some(Running {
                id,
                exchange,
                task_started: true,
            });
            return Ok(());
        }
        self.run_tool(id, exchange)
    }

    fn run_tool(&mut self, id: String, exchange: Exchange) -> Result<(), Stop> {
        if let Some(run_for) = self.directives.tool_time {
            let started = Instant::now();
            self.running = Some(Running {
                id: id.clone(),
                exchange: exchange.clone(),
                task_started: false,
            });
            if run_for >= TASK_STARTED_AFTER && exchange.name == "Bash" {
                self.sleep_until(started + TASK_STARTED_AFTER)?;
                self.task_started(&id, &exchange)?;
                if let Some(running) = self.running.as_mut() {
                    running.task_started = true;
                }
            }
            self.sleep_until(started + run_for)?;
            if self.running.take().is_some_and(|r| r.task_started) {
                self.task_notification(&id, &exchange, "completed")?;
            }
        }
        self.out.tool_result(&id, &exchange)?;
        self.boundary()
    }

    fn task_started(&mut self, id: &str, exchange: &Exchange) -> Result<(), Stop> {
        self.out.system(
            "task_started",
            json!({"task_id": format!("b{:08x}", fastrand::u32(..)), "tool_use_id": id,
                   "description": exchange.input["description"], "is_backgrounded": false,
                   "task_type": "local_bash"}),
        )?;
        Ok(())
    }

    fn task_notification(
        &mut self,
        id: &str,
        exchange: &Exchange,
        status: &str,
    ) -> Result<(), Stop> {
        self.out.system(
            "task_notification",
            json!({"tool_use_id": id, "status": status, "output_file": "",
                   "summary": exchange.input["description"]}),
        )?;
        Ok(())
    }

    /// A tool boundary: the messages that came meanwhile reach the model now.
    fn boundary(&mut self) -> Result<(), Stop> {
        self.drain_input()?;
        if self.queue.iter().any(|m| m.now) {
            return Err(Stop::Superseded);
        }
        while let Some(message) = self.queue.pop_front() {
            self.replay(&message)?;
            self.lifecycle(&message, "started")?;
            match directives::parse(&message.text, None) {
                Ok(parsed) => {
                    // "And also do X": the message's tools join this turn.
                    let tools = parsed.directives.tools.into_iter().map(Step::Tool);
                    self.steps.extend(tools);
                    let words = if parsed.prompt.is_empty() {
                        message.text.clone()
                    } else {
                        parsed.prompt
                    };
                    self.steers.push(words);
                }
                Err(e) => {
                    eprintln!("fake-agent: {e} (in a message taken in mid-turn)");
                    self.steers.push(message.text.clone());
                }
            }
        }
        Ok(())
    }

    /// A tool that needs approval: asks (or not, per mode and rules), then runs or not.
    fn ask(&mut self, preview: Exchange) -> Result<(), Stop> {
        let id = self.out.tool_use(&preview)?;
        self.tool_turns += 1;
        let mode = self.out.session().permission_mode.clone();
        let answer = if mode == "bypassPermissions" || self.allowed_by_rule(&preview) {
            Answer::Allow(None)
        } else if mode == "dontAsk" || !self.options.permission_prompt_stdio {
            Answer::Refused
        } else {
            self.request_permission(&id, &preview)?
        };
        let denial = json!({"tool_name": preview.name, "tool_use_id": id,
                            "tool_input": preview.input});
        match answer {
            Answer::Allow(updated) => {
                let input = updated.unwrap_or_else(|| preview.input.clone());
                let exchange = self.perform(&preview, &input);
                self.run_tool(id, exchange)
            }
            Answer::Refused => {
                self.denials.push(denial);
                self.out.tool_result(&id, &run::refused(preview))?;
                self.boundary()
            }
            Answer::Deny { message, interrupt } => {
                self.denials.push(denial);
                if interrupt {
                    let rejected = Exchange::failed(preview.name, preview.input, REJECTED.into());
                    self.out.tool_result(&id, &rejected)?;
                    return Err(Stop::DeniedInterrupt);
                }
                let denied = Exchange::failed(preview.name, preview.input, message);
                self.out.tool_result(&id, &denied)?;
                self.boundary()
            }
            Answer::Withdrawn => {
                self.denials.push(denial);
                let rejected = Exchange::failed(preview.name, preview.input, REJECTED.into());
                self.out.tool_result(&id, &rejected)?;
                self.boundary()
            }
        }
    }

    /// The allowed tool's real effect, with the input the user's answer gave.
    fn perform(&self, preview: &Exchange, input: &Value) -> Exchange {
        match preview.name {
            "Write" => {
                let path = input["file_path"]
                    .as_str()
                    .or(preview.input["file_path"].as_str())
                    .unwrap_or_default();
                let content = input["content"].as_str().unwrap_or_default();
                workspace::write(&self.cwd, Path::new(path), content)
            }
            _ => {
                let command = input["command"]
                    .as_str()
                    .or(preview.input["command"].as_str())
                    .unwrap_or_default();
                workspace::bash(command, "Run the command", "ok")
            }
        }
    }

    /// Sends `can_use_tool` and waits for the answer (or the `@withdraw` time, or EOF).
    fn request_permission(
        &mut self,
        tool_use_id: &str,
        preview: &Exchange,
    ) -> Result<Answer, Stop> {
        let request_id = lines::uuid_v4();
        let (description, suggestions, extra) = self.request_details(preview);
        let line = lines::can_use_tool(
            &request_id,
            tool_use_id,
            preview.name,
            &preview.input,
            &description,
            suggestions,
            extra,
        );
        self.out.event(&line)?;
        self.asking = Some(Asking {
            request_id: request_id.clone(),
            tool_use_id: tool_use_id.to_owned(),
            exchange: preview.clone(),
        });
        self.expecting = Some(request_id.clone());
        self.answer = None;
        let withdraw_at = self.directives.withdraw.map(|after| Instant::now() + after);
        let answer = loop {
            if let Some(answer) = self.answer.take() {
                break self.read_answer(&answer);
            }
            let due = withdraw_at.is_some_and(|at| Instant::now() >= at);
            if due || self.inbox.finished() {
                self.out
                    .event(&lines::control_cancel_request(&request_id))?;
                break Answer::Withdrawn;
            }
            self.wait(withdraw_at)?;
        };
        self.asking = None;
        self.expecting = None;
        Ok(answer)
    }

    /// What the CLI puts in a request: its description, suggested rules and extra fields
    /// (perm-allow and perm-write-allow fixtures).
    fn request_details(&self, preview: &Exchange) -> (String, Vec<Value>, Map<String, Value>) {
        let mut extra = Map::new();
        match preview.name {
            "Write" => {
                let path = preview.input["file_path"].as_str().unwrap_or_default();
                let dir = Path::new(path)
                    .parent()
                    .map_or(String::new(), |d| d.display().to_string());
                extra.insert(
                    "decision_reason".into(),
                    json!("Path is outside allowed working directories"),
                );
                extra.insert("decision_reason_type".into(), json!("workingDir"));
                let suggestion = json!({"type": "addDirectories", "directories": [dir], "destination": "session"});
                (path.to_owned(), vec![suggestion], extra)
            }
            _ => {
                let command = preview.input["command"].as_str().unwrap_or_default();
                let words: Vec<&str> = command.split_whitespace().take(2).collect();
                let rule = format!("{} *", words.join(" "));
                let suggestions = vec![
                    json!({"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": rule}],
                           "behavior": "allow", "destination": "localSettings"}),
                    json!({"type": "addDirectories",
                           "directories": [self.cwd.display().to_string()],
                           "destination": "session"}),
                ];
                let description = preview.input["description"].as_str().unwrap_or_default();
                (description.to_owned(), suggestions, extra)
            }
        }
    }

    fn read_answer(&mut self, response: &Value) -> Answer {
        if response["subtype"] != "success" {
            let error = response["error"]
                .as_str()
                .unwrap_or("the supervisor refused");
            return Answer::Deny {
                message: error.to_owned(),
                interrupt: false,
            };
        }
        let answer = &response["response"];
        match answer["behavior"].as_str() {
            Some("allow") => {
                for update in answer["updatedPermissions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    self.learn(update);
                }
                Answer::Allow(
                    answer["updatedInput"]
                        .as_object()
                        .cloned()
                        .map(Value::Object),
                )
            }
            Some("deny") => Answer::Deny {
                message: answer["message"]
                    .as_str()
                    .unwrap_or("Permission denied")
                    .to_owned(),
                interrupt: answer["interrupt"] == true,
            },
            _ => {
                eprintln!("fake-agent: a permission answer without a behavior: {response}");
                Answer::Deny {
                    message: "The permission answer could not be read.".into(),
                    interrupt: false,
                }
            }
        }
    }

    /// Keeps the rules of an "always" answer for the rest of the session.
    fn learn(&mut self, update: &Value) {
        match update["type"].as_str() {
            Some("addRules") => {
                for rule in update["rules"].as_array().into_iter().flatten() {
                    if rule["toolName"] == "Bash"
                        && let Some(content) = rule["ruleContent"].as_str()
                    {
                        let prefix = content.trim_end_matches('*').trim_end();
                        self.rules.push(Rule::Command(prefix.to_owned()));
                    }
                }
            }
            Some("addDirectories") => {
                for dir in update["directories"].as_array().into_iter().flatten() {
                    if let Some(dir) = dir.as_str() {
                        self.rules
                            .push(Rule::Directory(dir.trim_end_matches('/').to_owned()));
                    }
                }
            }
            _ => {}
        }
    }

    fn allowed_by_rule(&self, preview: &Exchange) -> bool {
        self.rules.iter().any(|rule| match (rule, preview.name) {
            (Rule::Command(prefix), "Bash") => {
                let command = preview.input["command"].as_str().unwrap_or_default();
                command == prefix || command.starts_with(&format!("{prefix} "))
            }
            (Rule::Directory(dir), "Write") => preview.input["file_path"]
                .as_str()
                .is_some_and(|path| path.starts_with(&format!("{dir}/"))),
            _ => false,
        })
    }

    /// Ends the turn as the CLI does when interrupted (control request or SIGINT): a
    /// pending request withdrawn, the running tool stopped, the interrupted markers.
    fn abort(&mut self, request_id: Option<String>) -> Result<Ending, Stop> {
        let asked = self.asking.take();
        self.expecting = None;
        if let Some(asking) = &asked {
            self.out
                .event(&lines::control_cancel_request(&asking.request_id))?;
            self.denials.push(json!({"tool_name": asking.exchange.name,
                                     "tool_use_id": asking.tool_use_id,
                                     "tool_input": asking.exchange.input}));
        }
        if let Some(id) = &request_id {
            let line = lines::control_response(id, json!({"still_queued": []}));
            self.out.event(&line)?;
            // Guess: the interrupt also cancels what was queued behind the turn.
            self.queue.clear();
        }
        let in_tool = if let Some(running) = self.running.take() {
            if running.task_started {
                self.task_notification(&running.id, &running.exchange, "stopped")?;
            }
            let text = format!("{REJECTED}{STOPPED_WHILE_RUNNING}");
            let stopped = Exchange::failed(running.exchange.name, running.exchange.input, text);
            self.out.tool_result(&running.id, &stopped)?;
            true
        } else if let Some(asking) = asked {
            let rejected =
                Exchange::failed(asking.exchange.name, asking.exchange.input, REJECTED.into());
            self.out.tool_result(&asking.tool_use_id, &rejected)?;
            true
        } else {
            false
        };
        if in_tool {
            self.out
                .user_text("[Request interrupted by user for tool use]")?;
        } else {
            self.out.user_text("[Request interrupted by user]")?;
        }
        Ok(Ending::Interrupted { in_tool })
    }

    /// The `result` line, the lifecycle and session-state lines after it.
    fn finish_turn(&mut self, ending: Ending) -> Result<(), Stop> {
        let num_turns = match ending {
            Ending::ApiError { .. } => 1,
            Ending::MaxTurns { limit } => limit + 1,
            _ => self.tool_turns + 1,
        };
        let tally = Tally {
            num_turns,
            duration_ms: self.start.elapsed().as_millis() as u64,
            prior_cost_usd: self.cost_usd,
        };
        let mut line = lines::result(self.out.session(), &ending, tally);
        line["permission_denials"] = Value::from(std::mem::take(&mut self.denials));
        line["result_index"] = json!(self.results);
        self.cost_usd = line["total_cost_usd"].as_f64().unwrap_or(self.cost_usd);
        self.out.event(&line)?;
        for uuid in std::mem::take(&mut self.taken) {
            let line = lines::command_lifecycle(self.out.session(), &uuid, "completed");
            self.out.event(&line)?;
        }
        self.results += 1;
        let is_error = line["is_error"] == true;
        self.status = self.directives.exit.unwrap_or(i32::from(is_error));
        self.in_turn = false;
        self.running = None;
        // Read what came meanwhile before saying the session is idle.
        self.drain_input()?;
        if self.queue.is_empty() {
            self.set_busy(false)?;
        }
        Ok(())
    }
}
