//! One agent run: turns the directives into a plan of steps, plays it on a schedule, and
//! ends as the real CLI would (result line, exit status, signals).
//!
//! Owns the main thread's time: every pause goes through [`Signals`], so SIGINT ends it at
//! once and produces the CLI's `error_during_execution` result. Side effects are real: files
//! are written in the cwd, `@grandchild` leaves a process in its own session.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::{Options, OutputFormat};
use crate::directives::{self, Directives, ToolDirective};
use crate::flood::{self, Corpus};
use crate::lines::{self, COST_PER_TURN_USD, Ending, REJECTED, Session, Tally};
use crate::output::{Output, Style};
use crate::signals::{Interrupted, Signals};
use crate::workspace::{self, Exchange};

/// Time to the result when `@sleep` is not given.
pub const DEFAULT_DURATION: Duration = Duration::from_millis(200);
/// Turns a `@maxturns` run takes when `--max-turns` does not say (the fixture's limit).
const DEFAULT_TURN_LIMIT: u32 = 2;
/// The pause inside the `@malformed` line split across two writes.
const SPLIT_PAUSE: Duration = Duration::from_millis(50);

/// Fake secrets for `@secret`: one of each kind walkie's redaction must catch.
pub const SECRETS: &str = "Used key sk-proj-Xy12AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd, \
     pushed with ghp_1234567890abcdefghijABCDEFGHIJ123456, fetched \
     https://bob:hunter2@example.com/repo.git and set DB_PASSWORD=correct-horse-battery-staple.";

/// What stops a run before its planned end.
#[derive(Debug, thiserror::Error)]
pub enum Halt {
    /// SIGINT: the caller prints the interrupted result and exits 0.
    #[error("interrupted")]
    Interrupted,
    /// stdout is gone or broken: the caller reports on stderr and exits 1.
    #[error("cannot write to stdout: {0}")]
    Output(#[from] io::Error),
}

impl From<Interrupted> for Halt {
    fn from(_: Interrupted) -> Self {
        Halt::Interrupted
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Tool(ToolDirective),
    /// The default Write of `notes-<n>.md`.
    Notes(PathBuf),
    /// A Bash turn of a `@maxturns` run.
    EchoTurn(u32),
    ApiRetry {
        attempt: u32,
        status: u16,
    },
    Flood,
    Oversize(u64),
    /// An `@say` message.
    Say(String),
}

impl Step {
    pub fn is_tool(&self) -> bool {
        matches!(self, Step::Tool(_) | Step::Notes(_) | Step::EchoTurn(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Finish {
    Success,
    ApiError(u16),
    MaxTurns(u32),
    Stall,
}

/// The steps a run takes and how it ends.
pub fn plan(d: &Directives, max_turns: Option<u32>, cwd: &Path) -> (Vec<Step>, Finish) {
    if let Some(status) = d.fail {
        // The API fails before any tool can run; the CLI retries first (error401 fixture).
        let retries = (1..=2).map(|attempt| Step::ApiRetry { attempt, status });
        return (retries.collect(), Finish::ApiError(status));
    }
    let mut steps: Vec<Step> = d.tools.iter().cloned().map(Step::Tool).collect();
    let limit = max_turns.or(d.max_turns.then_some(DEFAULT_TURN_LIMIT));
    if d.max_turns {
        let turns = limit.unwrap_or(DEFAULT_TURN_LIMIT);
        steps.extend((0..=turns).map(Step::EchoTurn));
    } else if !d.has_own_content() {
        steps.push(Step::Notes(workspace::next_notes_file(cwd)));
    }
    if d.flood.is_some() || d.flood_rate.is_some() {
        steps.push(Step::Flood);
    }
    if let Some(size) = d.oversize {
        steps.push(Step::Oversize(size));
    }
    let mut finish = Finish::Success;
    if let Some(limit) = limit {
        let cut = steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_tool())
            .nth(limit as usize)
            .map(|(i, _)| i);
        if let Some(cut) = cut {
            steps.truncate(cut);
            finish = Finish::MaxTurns(limit);
        }
    }
    if d.stall && finish == Finish::Success {
        finish = Finish::Stall;
    }
    (steps, finish)
}

struct Runner<W: Write> {
    out: Output<W>,
    signals: Signals,
    cwd: PathBuf,
    permission_mode: String,
    prompt: String,
    directives: Directives,
    prior_cost_usd: f64,
    start: Instant,
    turns: u32,
    /// A tool use left unanswered while stalling (the sigint-tool fixture's situation).
    pending: Option<(String, Exchange)>,
    /// The last `@say` message, kept for the final text.
    final_say: Option<String>,
}

impl<W: Write> Runner<W> {
    fn tally(&self, num_turns: u32) -> Tally {
        Tally {
            num_turns,
            duration_ms: self.start.elapsed().as_millis() as u64,
            prior_cost_usd: self.prior_cost_usd,
        }
    }

    fn exchange(&mut self, exchange: Exchange, pending: bool) -> Result<(), Halt> {
        let id = self.out.tool_use(&exchange)?;
        self.turns += 1;
        if let (false, Some(run_for)) = (pending, self.directives.tool_time) {
            // `@tool-ms`: the tool takes time; SIGINT meanwhile stops it as in sigint-tool.
            self.pending = Some((id.clone(), exchange.clone()));
            self.signals.sleep(run_for)?;
            self.pending = None;
            self.out.tool_result(&id, &exchange)?;
        } else if pending {
            self.out.system(
                "task_started",
                json!({"task_id": format!("b{:08x}", fastrand::u32(..)), "tool_use_id": id,
                       "description": exchange.input["description"], "is_backgrounded": false,
                       "task_type": "local_bash"}),
            )?;
            self.pending = Some((id, exchange));
        } else {
            self.out.tool_result(&id, &exchange)?;
        }
        Ok(())
    }

    fn step(&mut self, step: &Step, pending: bool) -> Result<(), Halt> {
        match step {
            Step::Tool(ToolDirective::Write(path)) => {
                let content = format!("Written by fake-agent.\n\nTask: {}\n", self.prompt);
                self.exchange(workspace::write(&self.cwd, path, &content), false)
            }
            Step::Tool(ToolDirective::Edit(path)) => {
                if !workspace::editable(&self.cwd, path) {
                    // The edit fixture's sequence: create the file, then edit it.
                    let created = workspace::write(&self.cwd, path, "hello world\n");
                    self.exchange(created, false)?;
                }
                self.exchange(workspace::edit(&self.cwd, path), false)
            }
            Step::Tool(ToolDirective::Bash(command)) => {
                self.exchange(workspace::bash(command, "Run the command", "ok"), pending)
            }
            Step::Tool(ToolDirective::Grandchild) => {
                let exchange = spawn_grandchild(&self.cwd);
                self.exchange(exchange, pending)
            }
            // Without stdin to ask on, a tool needing approval is refused, as the real CLI
            // refuses it in `-p` mode (unless permissions are bypassed).
            Step::Tool(ToolDirective::Ask(command)) => {
                let exchange = workspace::bash(command, "Run the command", "ok");
                if self.permission_mode == "bypassPermissions" {
                    self.exchange(exchange, pending)
                } else {
                    self.exchange(refused(exchange), false)
                }
            }
            Step::Tool(ToolDirective::AskWrite(path)) => {
                if self.permission_mode == "bypassPermissions" {
                    let content = format!("Written by fake-agent.\n\nTask: {}\n", self.prompt);
                    self.exchange(workspace::write(&self.cwd, path, &content), false)
                } else {
                    let full = self.cwd.join(path).display().to_string();
                    let input = json!({"file_path": full, "content": "(not written)\n"});
                    let exchange = Exchange::failed("Write", input, String::new());
                    self.exchange(refused(exchange), false)
                }
            }
            Step::Notes(path) => {
                let content = format!("# Notes\n\n{}\n", self.prompt);
                self.exchange(workspace::write(&self.cwd, path, &content), false)
            }
            Step::EchoTurn(n) => {
                let ex =
                    workspace::bash(&format!("echo turn {n}"), "Echo turn", &format!("turn {n}"));
                self.exchange(ex, pending)
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
            Step::Flood => flood(&mut self.out, &mut self.signals, &self.directives),
            Step::Say(text) => {
                self.out.text(text)?;
                Ok(())
            }
            Step::Oversize(size) => {
                let len = size.saturating_sub(self.out.flood_overhead());
                self.out.flood_line(&Corpus::new().slice(len as usize))?;
                self.out.flush()?;
                Ok(())
            }
        }
    }

    /// `@malformed`: what a sloppy or broken agent might print before its real output.
    fn malformed(&mut self) -> Result<(), Halt> {
        let session = self.out.session().id.clone();
        self.out
            .raw(b"this is not JSON at all {{{ fake-agent garbage\n")?;
        self.out.raw(b"[]\n")?;
        self.out.raw(b"{}\n")?;
        self.out.raw(b"{\"type\":5}\n")?;
        self.out
            .raw(b"{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"trunc\n")?;
        let unknown = json!({"type": "fake_agent_telemetry", "payload": {"n": 1},
                             "session_id": session, "uuid": lines::uuid_v4()});
        self.out.raw(format!("{unknown}\n").as_bytes())?;
        let split = json!({"type": "system", "subtype": "status", "status": "split-line",
                           "session_id": session, "uuid": lines::uuid_v4()})
        .to_string();
        let (first, second) = split.as_bytes().split_at(split.len() / 2);
        self.out.raw(first)?;
        self.signals.sleep(SPLIT_PAUSE)?;
        self.out.raw(second)?;
        self.out.raw(b"\n")?;
        self.out
            .raw(b"{\"type\":\"assistant\",\"note\":\"invalid UTF-8 \xff\xfe\xc3\x28 here\"}\n")?;
        Ok(())
    }

    fn final_text(&self) -> String {
        match &self.final_say {
            Some(last) => last.clone(),
            None => final_text(&self.directives, &self.prompt),
        }
    }

    /// Plays the plan; returns the exit status after the result line.
    fn play(&mut self, steps: &[Step], finish: Finish) -> Result<i32, Halt> {
        let total = self.directives.sleep.unwrap_or(DEFAULT_DURATION);
        let slots = steps.len() as u32 + 1;
        for (i, step) in steps.iter().enumerate() {
            let due = self.start.checked_add(total * (i as u32 + 1) / slots);
            self.signals.wait_until(due)?;
            let last = i + 1 == steps.len();
            self.step(step, last && finish == Finish::Stall)?;
        }
        let due = self.start.checked_add(total);
        let (ending, turns, status) = match finish {
            Finish::Stall => {
                // Only a signal ends this: SIGINT comes back as Err, SIGTERM exits.
                self.signals.wait_until(None)?;
                return Err(Halt::Interrupted);
            }
            Finish::Success => {
                self.signals.wait_until(due)?;
                let text = self.final_text();
                self.out.text(&text)?;
                (Ending::Success { text }, self.turns + 1, 0)
            }
            Finish::ApiError(status) => {
                self.signals.wait_until(due)?;
                let text = api_error_text(status);
                self.out.api_error(status, &text)?;
                (Ending::ApiError { status, text }, 1, 1)
            }
            Finish::MaxTurns(limit) => {
                self.signals.wait_until(due)?;
                (Ending::MaxTurns { limit }, limit + 1, 1)
            }
        };
        let tally = self.tally(turns);
        self.out.result(&ending, tally)?;
        Ok(self.directives.exit.unwrap_or(status))
    }

    /// SIGINT: report as the CLI does (sigint and sigint-tool fixtures).
    fn interrupted(&mut self) -> Result<i32, Halt> {
        let in_tool = if let Some((id, exchange)) = self.pending.take() {
            self.out.system(
                "task_notification",
                json!({"tool_use_id": id, "status": "stopped", "output_file": "",
                       "summary": exchange.input["description"]}),
            )?;
            let rejected = Exchange::failed(exchange.name, exchange.input, REJECTED.to_owned());
            self.out.tool_result(&id, &rejected)?;
            self.out
                .user_text("[Request interrupted by user for tool use]")?;
            true
        } else {
            self.out.user_text("[Request interrupted by user]")?;
            false
        };
        let tally = self.tally(self.turns + 1);
        self.out.result(&Ending::Interrupted { in_tool }, tally)?;
        Ok(0)
    }
}

/// `@flood`/`@flood-rate`: assistant lines as fast as the pipe takes them, or paced.
pub fn flood<W: Write>(
    out: &mut Output<W>,
    signals: &mut Signals,
    directives: &Directives,
) -> Result<(), Halt> {
    let corpus = Corpus::new();
    let overhead = out.flood_overhead();
    let (size, rate) = (directives.flood, directives.flood_rate);
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let left = size.map(|s| s.saturating_sub(sent));
        if left == Some(0) {
            break;
        }
        let text = corpus.slice(flood::next_text_len(left, overhead) as usize);
        sent += out.flood_line(&text)?;
        signals.check()?;
        if let Some(rate) = rate {
            out.flush()?;
            let due = start.checked_add(Duration::from_secs_f64(sent as f64 / rate as f64));
            signals.wait_until(due)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The answer of a run without a `result` text of its own: `@text`, `@env`, or "Done: …".
pub fn final_text(d: &Directives, prompt: &str) -> String {
    let mut text = if let Some(text) = &d.text {
        text.clone()
    } else if d.env {
        environment_text()
    } else {
        format!("Done: {prompt}")
    };
    if d.secret {
        text.push_str("\n\n");
        text.push_str(SECRETS);
    }
    text
}

/// `exchange` refused for want of an approval (the CLI in `-p` mode, or `dontAsk`).
pub fn refused(exchange: Exchange) -> Exchange {
    let message = match exchange.name {
        "Bash" => "This command requires approval".to_owned(),
        _ => format!(
            "Claude requested permissions to use {}, but you haven't granted it yet.",
            exchange.name
        ),
    };
    Exchange::failed(exchange.name, exchange.input, message)
}

/// `@garbage`: `size` pseudo-random bytes on stdout (newlines included, no JSON), then
/// `status`. Seeded, so a test sees the same bytes every run.
fn garbage(size: u64, status: i32) -> i32 {
    let mut rng = fastrand::Rng::with_seed(size);
    let mut out = io::stdout().lock();
    let mut left = size;
    let mut chunk = vec![0u8; 8192];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill(&mut chunk[..n]);
        if let Err(e) = out.write_all(&chunk[..n]) {
            eprintln!("fake-agent: cannot write to stdout: {e}");
            return 1;
        }
        left -= n as u64;
    }
    let _ = out.flush();
    status
}

/// `@say`: one JSON string per non-empty line.
fn read_say_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str::<String>(line)
                .map_err(|e| format!("line {}: not a JSON string: {e}", i + 1))
        })
        .collect()
}

/// The whole environment as sorted `NAME=value` lines (`@env`).
pub fn environment_text() -> String {
    let mut vars: Vec<String> = std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    vars.sort();
    vars.join("\n")
}

pub fn api_error_text(status: u16) -> String {
    let (_, kind) = lines::api_error_names(status);
    let body = format!(
        "{{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"fake-agent: simulated {status}\"}}}}"
    );
    match status {
        401 => format!("Failed to authenticate. API Error: 401 {body}"),
        _ => format!("API Error: {status} {body}"),
    }
}

/// Starts our own executable as a sleeper in its own session, as Claude's Bash tool starts
/// commands, and records its pid in `grandchild.pid`.
pub fn spawn_grandchild(cwd: &Path) -> Exchange {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fake-agent"));
    let command = format!(
        "setsid {} --sleep-forever & echo $! > grandchild.pid",
        exe.display()
    );
    let input = json!({"command": command, "description": "Start a helper in its own session"});
    let started = Command::new(&exe)
        .args(["--sleep-forever", "--setsid"])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            // The sleeper says "ready" once setsid() is done, so whoever reads the pid file
            // finds the process already in its own session.
            let mut line = String::new();
            if let Some(stdout) = child.stdout.take() {
                BufReader::new(stdout).read_line(&mut line)?;
            }
            if line.trim() != "ready" {
                return Err(io::Error::other("the sleeper did not start"));
            }
            let pid = child.id();
            write_whole(&cwd.join("grandchild.pid"), &format!("{pid}\n"))?;
            Ok(pid)
        });
    match started {
        Ok(pid) => Exchange {
            content: format!("Started process {pid} in its own session."),
            structured: json!({"stdout": format!("{pid}"), "stderr": "", "interrupted": false,
                               "isImage": false, "noOutputExpected": false,
                               "backgroundTaskId": format!("{pid}")}),
            name: "Bash",
            input,
            is_error: false,
        },
        Err(e) => Exchange::failed("Bash", input, format!("cannot start the sleeper: {e}")),
    }
}

/// Writes a pid file under another name and renames it into place: tests poll for the
/// file and read it at once, and must never find it created but still empty.
pub fn write_whole(path: &Path, text: &str) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `--sleep-forever [--setsid]`: the grandchild's whole life.
pub fn sleep_forever(setsid: bool) -> i32 {
    if setsid && let Err(e) = nix::unistd::setsid() {
        eprintln!("fake-agent: setsid: {e}");
        return 1;
    }
    // Nobody may be listening any more; the sleeper sleeps regardless.
    let mut stdout = io::stdout();
    let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
    loop {
        nix::unistd::pause();
    }
}

/// `-p` without a prompt argument reads it from stdin, as the real CLI does.
fn prompt_from_stdin() -> String {
    let stdin = io::stdin();
    if stdin.is_terminal() {
        return String::new();
    }
    let mut prompt = String::new();
    // An unreadable stdin is the same as an empty one: the caller reports the missing prompt.
    let _ = stdin.lock().read_to_string(&mut prompt);
    prompt
}

/// Plays the run `options` ask for; returns the process exit status.
pub fn main(options: Options) -> i32 {
    if options.print && options.output_format == OutputFormat::StreamJson && !options.verbose {
        eprintln!("Error: When using --print, --output-format=stream-json requires --verbose");
        return 1;
    }
    let mut prompt = options.prompt.clone();
    if prompt.trim().is_empty() {
        prompt = prompt_from_stdin();
    }
    if prompt.trim().is_empty() {
        eprintln!(
            "Error: Input must be provided either through stdin or as a prompt argument when \
             using --print"
        );
        return 1;
    }
    let from_env = std::env::var("FAKE_AGENT_DIRECTIVES").ok();
    let parsed = match directives::parse(&prompt, from_env.as_deref()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("fake-agent: {e}");
            return 2;
        }
    };
    let d = parsed.directives;
    if let Some(size) = d.garbage {
        return garbage(size, d.exit.unwrap_or(0));
    }
    let say = match &d.say {
        Some(path) => match read_say_file(path) {
            Ok(messages) => messages,
            Err(e) => {
                eprintln!("fake-agent: @say={}: {e}", path.display());
                return 2;
            }
        },
        None => Vec::new(),
    };
    let signals = match Signals::install(d.ignore_int, d.ignore_term) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("fake-agent: cannot install signal handlers: {e}");
            return 1;
        }
    };
    let start = Instant::now();
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            eprintln!("Error: cannot read the working directory: {e}");
            return 1;
        }
    };
    if let Some(path) = &d.pidfile
        && let Err(e) = write_whole(&cwd.join(path), &format!("{}\n", std::process::id()))
    {
        eprintln!("fake-agent: cannot write pid file {}: {e}", path.display());
        return 1;
    }
    if let Some(text) = &d.stderr {
        eprintln!("{text}");
    }
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
    let style = match (d.plain, options.output_format) {
        (true, _) => Style::Plain,
        (false, OutputFormat::StreamJson) => Style::StreamJson {
            partial: options.include_partial_messages,
        },
        (false, OutputFormat::Json) => Style::Json,
        (false, OutputFormat::Text) => Style::Text,
    };
    let (mut steps, finish) = plan(&d, options.max_turns, &cwd);
    // `@say` messages are the first steps; a successful run keeps the last one for its final
    // text (unless `@text` gives that).
    let mut say = say;
    let final_say = (finish == Finish::Success && d.text.is_none())
        .then(|| say.pop())
        .flatten();
    steps.splice(0..0, say.into_iter().map(Step::Say));
    let mut runner = Runner {
        out: Output::new(BufWriter::with_capacity(64 * 1024, stdout), style, session),
        signals,
        cwd,
        permission_mode: options
            .permission_mode
            .clone()
            .unwrap_or_else(|| "default".into()),
        prompt: parsed.prompt,
        directives: d,
        // A resumed session's cost is cumulative; pretend the earlier run was a default one.
        prior_cost_usd: if options.resume.is_some() {
            2.0 * COST_PER_TURN_USD
        } else {
            0.0
        },
        start,
        turns: 0,
        pending: None,
        final_say,
    };
    let played = (|| {
        if runner.directives.malformed {
            runner.malformed()?;
        }
        let api_key_source = if std::env::var_os("ANTHROPIC_API_KEY").is_some() {
            "ANTHROPIC_API_KEY"
        } else {
            "none"
        };
        let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        runner.out.init(api_key_source, &tmp)?;
        if runner.out.is_plain() {
            runner.out.text(&format!("Working on: {}", runner.prompt))?;
        }
        runner.play(&steps, finish)
    })();
    let outcome = match played {
        Err(Halt::Interrupted) => runner.interrupted(),
        other => other,
    };
    match outcome {
        Ok(status) => status,
        Err(e) => {
            eprintln!("fake-agent: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(prompt: &str, max_turns: Option<u32>) -> (Vec<Step>, Finish) {
        let dir = tempfile::tempdir().unwrap();
        let parsed = directives::parse(prompt, None).unwrap();
        plan(&parsed.directives, max_turns, dir.path())
    }

    #[test]
    fn default_run_writes_notes_and_succeeds() {
        let (steps, finish) = planned("do it", None);
        assert_eq!(steps, [Step::Notes("notes-1.md".into())]);
        assert_eq!(finish, Finish::Success);
    }

    #[test]
    fn explicit_tools_replace_the_notes() {
        let (steps, _) = planned("@bash=ls @write=a", None);
        assert_eq!(
            steps,
            [
                Step::Tool(ToolDirective::Bash("ls".into())),
                Step::Tool(ToolDirective::Write("a".into()))
            ]
        );
    }

    #[test]
    fn failure_runs_no_tool() {
        let (steps, finish) = planned("@write=a @fail", None);
        assert!(steps.iter().all(|s| matches!(s, Step::ApiRetry { .. })));
        assert_eq!(finish, Finish::ApiError(401));
    }

    #[test]
    fn maxturns_stops_after_the_limit() {
        let (steps, finish) = planned("@maxturns", None);
        assert_eq!(steps, [Step::EchoTurn(0), Step::EchoTurn(1)]);
        assert_eq!(finish, Finish::MaxTurns(2));

        let (steps, finish) = planned("@maxturns", Some(3));
        assert_eq!(steps.len(), 3);
        assert_eq!(finish, Finish::MaxTurns(3));
    }

    #[test]
    fn max_turns_flag_cuts_a_long_run() {
        let (steps, finish) = planned("@bash=a @bash=b @bash=c @flood=1K", Some(2));
        assert_eq!(steps.len(), 2);
        assert_eq!(finish, Finish::MaxTurns(2));
        let (steps, finish) = planned("@bash=a @bash=b", Some(2));
        assert_eq!(steps.len(), 2);
        assert_eq!(finish, Finish::Success);
    }

    #[test]
    fn stall_alone_does_nothing_but_wait() {
        let (steps, finish) = planned("@stall", None);
        assert!(steps.is_empty());
        assert_eq!(finish, Finish::Stall);
        let (steps, finish) = planned("@grandchild @stall", None);
        assert_eq!(steps, [Step::Tool(ToolDirective::Grandchild)]);
        assert_eq!(finish, Finish::Stall);
    }

    #[test]
    fn error_texts() {
        assert!(api_error_text(401).starts_with("Failed to authenticate. API Error: 401 "));
        assert!(api_error_text(529).contains("overloaded_error"));
    }
}
