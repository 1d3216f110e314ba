//! The life of one agent run, sans IO: from spawn to the reported outcome.
//!
//! A [`Lifecycle`] is told what happened — spawned, output bytes and EOF on each pipe, the
//! exit status, a membership report, a cancel or shutdown request, the time — through
//! `handle_*(now, …)`, and answers with [`Action`]s for the shell to carry out (spawn,
//! signal the group or the agent, probe and signal every process of the task, close the
//! pipes) and [`Event`]s (started, finished with its [`Outcome`]). It owns no fd, thread or
//! clock; the task engine (engine.rs) is the shell around it, and the tests below drive it
//! with a fake clock through every branch: cooperative exit, SIGINT honoured, SIGTERM and
//! SIGKILL needed, descendants escaping, pipes held open by a stray, processes that would
//! not die (D state), and a pid that must not be signalled once it may be reused.
//!
//! The rules it keeps:
//! - A cancel is SIGINT to the agent's process group (the CLI then stops its own Bash
//!   children and reports), SIGTERM after half the grace, SIGKILL to the group, the agent
//!   (through its pidfd: it may have left its group) and every process of the task after
//!   the whole grace.
//! - The group is signalled only while the agent is unreaped: until then its pid, and so
//!   its group id, cannot name another process.
//! - Once the agent is reaped, whatever it left behind (Claude's Bash tool starts commands
//!   in their own session) gets SIGTERM, then SIGKILL after the sweep grace; the membership
//!   source (the task's cgroup, or a scan for its marker and process tree on a helper
//!   thread) finds them.
//! - A run ends, and its outcome is decided, exactly once: when the agent is reaped, no
//!   process of the task is left (or walkie gave up on the ones stuck in the kernel), and
//!   both pipes reached EOF (or a short grace passed: a stray that escaped every kind of
//!   membership may hold them forever).
//!
//! A run of an agent kept open on stdin (`agent.protocol = "claude"`) carries its
//! [`ClaudeSession`] here: the stdout events the parser finds are fed to it, and its turns
//! decide the task's outcome. A turn's `result` with nothing more queued is the outcome the
//! user hears ([`Event::TurnFinished`]); the process then waits, warm, for a follow-up, and
//! its stdin is closed after [`Settings::warm`] (or earlier, [`Lifecycle::handle_close`]).
//! The exit of a process that was idle changes nothing the user was told (an interrupted
//! last turn makes the CLI exit 1: that is not a failure); only a crash in the middle of a
//! turn, a cancel or a shutdown of a busy run decide a new outcome.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::claude::{ClaudeSession, SessionEvent};
use super::record::TaskState;
use super::redact::{self, Keep};
use super::stream::{self, ExitInfo, OutputKind, ResultLine, StreamEvent, StreamParser, Verdict};

/// After nothing of the task is left, how long to wait for the pipes' EOF.
pub const PIPE_GRACE: Duration = Duration::from_millis(300);
/// How often a sweep looks again when nothing tells it that the task emptied (the scan).
pub const SWEEP_POLL: Duration = Duration::from_millis(50);
/// With a cgroup, `populated 0` says when the task emptied; this only guards a lost event.
pub const WATCHED_POLL: Duration = Duration::from_secs(1);
/// A sweep that cannot kill everything in this long gives up: processes in uninterruptible
/// sleep (D state) die when the kernel lets them, and the task must not wait for that.
pub const GIVE_UP: Duration = Duration::from_secs(10);
/// Longest summary, in characters (it is spoken).
const SUMMARY_CHARS: usize = 300;
/// Longest stored final text, in characters.
const RESULT_TEXT_CHARS: usize = 8 * 1024;

/// Timing of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// From the cancel's SIGINT to the SIGKILL (SIGTERM at half of it).
    pub cancel_grace: Duration,
    /// From the SIGTERM of the agent's leftovers to their SIGKILL.
    pub sweep_grace: Duration,
    /// The membership source reports on its own when the task empties (a cgroup's
    /// `populated 0`), so sweeps need not poll often.
    pub watched: bool,
    /// What the agent's stdout should be (from its command): decides a run without result.
    pub output: OutputKind,
    /// A run kept open on stdin: how long its agent waits between turns for a follow-up
    /// before walkie closes its stdin (`agent.warm_s`).
    pub warm: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The user asked (`cancel_task`, `walkie ctl cancel`).
    Cancel,
    /// walkie is stopping.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pipe {
    Stdout,
    Stderr,
}

/// Who a signal goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The agent's process group (the agent leads it).
    Group,
    /// The agent alone, through its pidfd.
    Agent,
}

/// What the shell does next for this run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fork/exec the agent; report with [`Lifecycle::handle_spawned`].
    Spawn,
    Signal {
        target: Target,
        signal: Signal,
    },
    /// Find every live process of the task, send each `signal` when given, and report
    /// how many there were with [`Lifecycle::handle_members`].
    Probe {
        signal: Option<Signal>,
    },
    /// Stop waiting for EOF: read what the pipes still hold, close them, and report each
    /// with [`Lifecycle::handle_eof`].
    ClosePipes,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        pid: i32,
    },
    /// A run kept open on stdin ended a turn with nothing more queued: the task is done for
    /// the user (this outcome is announced), and its process waits, warm, for a follow-up.
    TurnFinished(Outcome),
    /// What the agent's session reported that the shell passes on: permission requests and
    /// their end, message receipts, interrupt answers, refused control requests. (Turn ends
    /// come as [`Event::TurnFinished`].)
    Session(SessionEvent),
    /// The run is over: no process of it is left.
    Finished(Outcome),
}

/// How a run ended, ready for the registry: every text in it is redacted.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// Short and speakable; says why, never repeats the state.
    pub summary: String,
    pub result_text: Option<String>,
    pub session_id: Option<String>,
    pub files_changed: Vec<String>,
    pub cost_usd: Option<f64>,
    /// Processes still alive when walkie gave up on them.
    pub stragglers: usize,
    /// The task's outcome was already reported at its last turn ([`Event::TurnFinished`]):
    /// the run only ended a process that waited for a follow-up, so nothing new is said.
    pub reported: bool,
}

/// A membership report: the task's processes found alive (before `signal` reached them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Members {
    pub alive: usize,
    /// OOM kills the cgroup has seen (`memory.events`); 0 without a cgroup.
    pub oom_kills: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    /// The agent is reaped; its leftovers are being found and stopped.
    Sweeping {
        started: Instant,
        /// When the leftovers get SIGKILL; `None` once it is due: every probe after it
        /// kills again (a process forked just before the last kill was not seen by it).
        kill_at: Option<Instant>,
        next_probe: Instant,
    },
    /// Nothing of the task is alive (or walkie gave up): waiting for the pipes' EOF.
    Draining {
        since: Instant,
        close_asked: bool,
    },
    Done,
}

/// Escalation of a stop while the agent is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Escalation {
    term_at: Option<Instant>,
    kill_at: Option<Instant>,
}

/// One run of one task. See the module header.
#[derive(Debug)]
pub struct Lifecycle {
    settings: Settings,
    phase: Phase,
    parser: StreamParser,
    exit: Option<ExitInfo>,
    stop: Option<StopReason>,
    escalation: Option<Escalation>,
    open: [bool; 2],
    /// A probe was asked for and its report has not come back.
    probing: bool,
    /// A SIGKILL of every member is owed (asked for while a probe was out).
    kill_owed: bool,
    /// The stop reached its SIGKILL: leftovers found after the exit get no second grace.
    killing: bool,
    oom: bool,
    stragglers: usize,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    /// The agent's stdin kept open (`agent.protocol = "claude"`); `None` for a one-shot run.
    session: Option<ClaudeSession>,
    /// The latest turn's `result`, until the session goes idle and it is reported.
    turn_result: Option<ResultLine>,
    /// The outcome last reported with [`Event::TurnFinished`].
    last_turn: Option<Outcome>,
    /// A stop came while the agent ran: whether it was in the middle of a turn (the stop
    /// ends work, not only a process waiting for a follow-up).
    busy_at_stop: Option<bool>,
}

impl Lifecycle {
    /// A one-shot run about to start: its first action is [`Action::Spawn`].
    pub fn new(settings: Settings) -> Lifecycle {
        Lifecycle::with_session(settings, None)
    }

    /// A run whose agent is kept open on stdin and spoken to through `session` (which has
    /// queued the prompt as the first user line); its first action is [`Action::Spawn`].
    pub fn kept_open(settings: Settings, session: ClaudeSession) -> Lifecycle {
        Lifecycle::with_session(settings, Some(session))
    }

    fn with_session(settings: Settings, session: Option<ClaudeSession>) -> Lifecycle {
        Lifecycle {
            settings,
            phase: Phase::Starting,
            parser: StreamParser::new(),
            exit: None,
            stop: None,
            escalation: None,
            open: [true; 2],
            probing: false,
            kill_owed: false,
            killing: false,
            oom: false,
            stragglers: 0,
            actions: VecDeque::from([Action::Spawn]),
            events: VecDeque::new(),
            session,
            turn_result: None,
            last_turn: None,
            busy_at_stop: None,
        }
    }

    /// The agent runs as `pid` (it leads its own process group).
    pub fn handle_spawned(&mut self, _now: Instant, pid: i32) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Running;
            self.events.push_back(Event::Started { pid });
        }
    }

    /// Output from the agent. Stdout is parsed; the events of the lines it completed are
    /// appended to `out` (the shell renders them for the log and followers).
    pub fn handle_output(
        &mut self,
        now: Instant,
        pipe: Pipe,
        bytes: &[u8],
        out: &mut Vec<StreamEvent>,
    ) {
        if pipe == Pipe::Stdout && self.open[0] {
            let from = out.len();
            self.parser.feed(bytes, out);
            self.tell_session(now, &out[from..]);
        }
    }

    /// A pipe reached EOF (or was closed after [`Action::ClosePipes`]).
    pub fn handle_eof(&mut self, now: Instant, pipe: Pipe, out: &mut Vec<StreamEvent>) {
        let index = pipe as usize;
        if !self.open[index] {
            return;
        }
        self.open[index] = false;
        if pipe == Pipe::Stdout {
            let from = out.len();
            self.parser.finish(out);
            self.tell_session(now, &out[from..]);
        }
        self.maybe_finish(now);
    }

    /// The agent was reaped.
    pub fn handle_exit(&mut self, now: Instant, exit: ExitInfo) {
        if !matches!(self.phase, Phase::Running | Phase::Starting) {
            return;
        }
        self.exit = Some(exit);
        // Its pid may be reused from now on: no more group or agent signals.
        self.escalation = None;
        let kill_at = (!self.killing).then_some(now + self.settings.sweep_grace);
        self.phase = Phase::Sweeping {
            started: now,
            kill_at,
            next_probe: now + self.poll_interval(),
        };
        self.kill_owed = false;
        self.probe(Some(if kill_at.is_some() {
            Signal::SIGTERM
        } else {
            Signal::SIGKILL
        }));
    }

    /// What the membership source found.
    pub fn handle_members(&mut self, now: Instant, members: Members) {
        self.probing = false;
        if members.oom_kills > 0 && !self.oom {
            log::warn!("out of memory: the kernel killed a process of the task");
            self.oom = true;
        }
        if let Phase::Sweeping { started, .. } = self.phase {
            if members.alive == 0 {
                self.drain(now);
                return;
            }
            if now >= started + GIVE_UP {
                self.give_up(now, members.alive);
                return;
            }
        }
        if self.kill_owed && matches!(self.phase, Phase::Running | Phase::Sweeping { .. }) {
            self.kill_owed = false;
            self.probe(Some(Signal::SIGKILL));
        }
    }

    /// The membership source says the task's processes changed (a cgroup's
    /// `cgroup.events`): look now rather than at the next poll.
    pub fn handle_members_changed(&mut self, _now: Instant) {
        if let Phase::Sweeping { kill_at, .. } = self.phase {
            if !self.probing {
                let signal = kill_at.is_none().then_some(Signal::SIGKILL);
                self.probe(signal);
            }
        }
    }

    /// Stop the run. Returns false when there is nothing to stop (not started, or done).
    /// A cancel overrides a shutdown in progress, never the other way round.
    pub fn handle_stop(&mut self, now: Instant, reason: StopReason) -> bool {
        if matches!(self.phase, Phase::Starting | Phase::Done) {
            return false;
        }
        if self.stop == Some(reason) || self.stop == Some(StopReason::Cancel) {
            return true;
        }
        if let (None, Phase::Running, Some(session)) =
            (self.stop, self.phase, self.session.as_mut())
        {
            self.busy_at_stop = Some(session.is_running());
            // An idle agent exits at EOF on its own; a busy one gets the signals below too.
            // Its pending requests are withdrawn (nobody can answer them any more).
            session.close();
        }
        self.stop = Some(reason);
        if self.phase == Phase::Running {
            // SIGINT first: the CLI then stops its own Bash children and reports.
            self.signal(Target::Group, Signal::SIGINT);
            let grace = self.settings.cancel_grace;
            self.escalation = Some(Escalation {
                term_at: Some(now + grace / 2),
                kill_at: Some(now + grace),
            });
        }
        true
    }

    /// Last resort (shutdown deadline): SIGKILL everything of the task now.
    pub fn handle_kill(&mut self, _now: Instant) {
        match self.phase {
            Phase::Running => {
                self.signal(Target::Group, Signal::SIGKILL);
                self.signal(Target::Agent, Signal::SIGKILL);
                self.kill_members();
            }
            Phase::Sweeping { .. } => self.kill_members(),
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Running => {
                let warm_until = self.warm_until();
                if let Some(session) = self.session.as_mut() {
                    if session.poll_timeout().is_some_and(|t| now >= t) {
                        session.handle_timeout(now);
                    }
                    if warm_until.is_some_and(|t| now >= t) {
                        session.close();
                    }
                }
                let Some(mut esc) = self.escalation else {
                    return;
                };
                if esc.term_at.is_some_and(|t| now >= t) {
                    esc.term_at = None;
                    self.signal(Target::Group, Signal::SIGTERM);
                }
                if esc.kill_at.is_some_and(|t| now >= t) {
                    esc.kill_at = None;
                    self.signal(Target::Group, Signal::SIGKILL);
                    self.signal(Target::Agent, Signal::SIGKILL);
                    self.kill_members();
                }
                self.escalation = Some(esc);
            }
            Phase::Sweeping {
                started,
                kill_at,
                next_probe,
            } => {
                if now >= started + GIVE_UP {
                    // The membership source did not even answer in time.
                    self.give_up(now, 0);
                    return;
                }
                let kill_due = kill_at.is_some_and(|t| now >= t);
                if now >= next_probe || kill_due {
                    let kill_at = kill_at.filter(|_| !kill_due);
                    self.phase = Phase::Sweeping {
                        started,
                        kill_at,
                        next_probe: now + self.poll_interval(),
                    };
                    if kill_at.is_none() {
                        self.kill_members();
                    } else if !self.probing {
                        self.probe(None);
                    }
                }
            }
            Phase::Draining {
                since,
                close_asked: false,
            } if now >= since + PIPE_GRACE => {
                self.phase = Phase::Draining {
                    since,
                    close_asked: true,
                };
                self.actions.push_back(Action::ClosePipes);
            }
            _ => {}
        }
    }

    /// The next instant [`Lifecycle::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running => {
                let escalation = self
                    .escalation
                    .and_then(|e| [e.term_at, e.kill_at].into_iter().flatten().min());
                let session = self.session.as_ref().and_then(ClaudeSession::poll_timeout);
                [escalation, session, self.warm_until()]
                    .into_iter()
                    .flatten()
                    .min()
            }
            Phase::Sweeping {
                started,
                kill_at,
                next_probe,
            } => [Some(next_probe), kill_at, Some(started + GIVE_UP)]
                .into_iter()
                .flatten()
                .min(),
            Phase::Draining {
                since,
                close_asked: false,
            } => Some(since + PIPE_GRACE),
            _ => None,
        }
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.pump_session();
        self.events.pop_front()
    }

    /// The session of a run kept open on stdin: the shell calls its verbs (send a message,
    /// interrupt, answer), writes what it has for the agent's stdin, and drains its events
    /// through [`Lifecycle::poll_event`].
    pub fn session(&self) -> Option<&ClaudeSession> {
        self.session.as_ref()
    }

    pub fn session_mut(&mut self) -> Option<&mut ClaudeSession> {
        self.session.as_mut()
    }

    /// Since when the agent of a run kept open waits, warm, for a follow-up (None while it
    /// works, once its stdin is being closed, and after a stop).
    pub fn idle_since(&self) -> Option<Instant> {
        if self.phase != Phase::Running || self.stop.is_some() {
            return None;
        }
        self.session.as_ref()?.idle_since()
    }

    /// walkie no longer keeps this agent warm (`agent.max_warm`): if it waits between
    /// turns, its stdin is closed and it exits. Returns whether it did.
    pub fn handle_close(&mut self, _now: Instant) -> bool {
        if self.idle_since().is_none() {
            return false;
        }
        if let Some(session) = self.session.as_mut() {
            session.close();
        }
        true
    }

    /// The agent has not been reaped yet (its pid still names it).
    pub fn agent_alive(&self) -> bool {
        matches!(self.phase, Phase::Running)
    }

    /// The outcome is decided and reported.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
    }

    /// What the parser has seen so far (session id, files, result).
    pub fn parser(&self) -> &StreamParser {
        &self.parser
    }

    // ---- internals ----

    /// When an idle agent's warm time is over.
    fn warm_until(&self) -> Option<Instant> {
        self.idle_since()?.checked_add(self.settings.warm)
    }

    /// Stdout events, in order, to the session of a run kept open.
    fn tell_session(&mut self, now: Instant, events: &[StreamEvent]) {
        if let Some(session) = self.session.as_mut() {
            for event in events {
                session.handle_event(now, event);
            }
        }
    }

    /// Turns what the session reported into events: a turn's end with nothing queued is
    /// the task's outcome (unless a stop decides it); the rest is passed on.
    fn pump_session(&mut self) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let reported: Vec<SessionEvent> = std::iter::from_fn(|| session.poll_event()).collect();
        for event in reported {
            match event {
                SessionEvent::TurnEnded { result, .. } => self.turn_result = Some(result),
                SessionEvent::Idle => {
                    let result = self.turn_result.take();
                    if self.stop.is_none() && self.phase == Phase::Running {
                        let outcome = self.turn_outcome(result);
                        self.last_turn = Some(outcome.clone());
                        self.events.push_back(Event::TurnFinished(outcome));
                    }
                }
                other => self.events.push_back(Event::Session(other)),
            }
        }
    }

    /// The outcome of the turn that ended with `result` (None: the agent went idle without
    /// taking in the message that was to start a turn).
    fn turn_outcome(&self, result: Option<ResultLine>) -> Outcome {
        let (state, error) = match result.as_ref().map(stream::turn_verdict) {
            Some(Verdict::Succeeded) => (TaskState::Succeeded, None),
            Some(Verdict::Failed { reason }) => (TaskState::Failed, Some(reason)),
            Some(Verdict::Interrupted { reason }) => (TaskState::Interrupted, Some(reason)),
            None => (
                TaskState::Interrupted,
                Some("the agent went idle without taking in the message".to_owned()),
            ),
        };
        let final_text = result
            .as_ref()
            .and_then(|r| r.text.clone())
            .filter(|t| !t.trim().is_empty())
            .or_else(|| self.parser.last_text().map(str::to_string));
        let cost = result.as_ref().and_then(|r| r.total_cost_usd);
        self.report(state, error, final_text, None, cost)
    }

    fn poll_interval(&self) -> Duration {
        if self.settings.watched {
            WATCHED_POLL
        } else {
            SWEEP_POLL
        }
    }

    fn signal(&mut self, target: Target, signal: Signal) {
        self.actions.push_back(Action::Signal { target, signal });
    }

    fn probe(&mut self, signal: Option<Signal>) {
        self.probing = true;
        self.actions.push_back(Action::Probe { signal });
    }

    fn kill_members(&mut self) {
        self.killing = true;
        if self.probing {
            self.kill_owed = true;
        } else {
            self.probe(Some(Signal::SIGKILL));
        }
    }

    fn give_up(&mut self, now: Instant, alive: usize) {
        log::error!(
            "{alive} process(es) of the task would not die in {} s (stuck in the kernel?); giving up on them",
            GIVE_UP.as_secs()
        );
        self.stragglers = alive;
        self.drain(now);
    }

    fn drain(&mut self, now: Instant) {
        self.phase = Phase::Draining {
            since: now,
            close_asked: false,
        };
        self.kill_owed = false;
        self.maybe_finish(now);
    }

    fn maybe_finish(&mut self, _now: Instant) {
        if !matches!(self.phase, Phase::Draining { .. }) || self.open.iter().any(|o| *o) {
            return;
        }
        self.phase = Phase::Done;
        let outcome = self.outcome();
        self.events.push_back(Event::Finished(outcome));
    }

    /// Decides how the run ended, from the stop request, an OOM kill, the parsed stream and
    /// the exit status; for a run kept open on stdin, from its turns first.
    fn outcome(&self) -> Outcome {
        let exit = self
            .exit
            .unwrap_or(ExitInfo::Signal(Signal::SIGKILL as i32));
        let exit_code = self.exit.map(|e| match e {
            ExitInfo::Code(c) => c,
            ExitInfo::Signal(s) => 128 + s,
        });
        let mut mid_turn = false;
        if let Some(session) = &self.session {
            // The exit of an agent that waited between turns says nothing new: its last
            // turn's outcome stands (an interrupted last turn makes the CLI exit 1).
            let busy = self.busy_at_stop.unwrap_or_else(|| session.is_running());
            if let (false, Some(last)) = (busy, &self.last_turn) {
                if self.oom {
                    log::warn!("the agent was killed for memory while it waited for a follow-up");
                }
                return Outcome {
                    exit_code,
                    stragglers: self.stragglers,
                    reported: true,
                    files_changed: self.parser.files_changed().to_vec(),
                    ..last.clone()
                };
            }
            mid_turn = session.turns() > 0;
        }
        // Mid-turn after earlier turns, the stream's last result is an earlier turn's.
        let verdict = if mid_turn {
            stream::verdict_mid_turn(exit)
        } else {
            stream::verdict(&self.parser, exit, self.settings.output)
        };
        let final_text = self
            .parser
            .result()
            .filter(|_| !mid_turn)
            .and_then(|r| r.text.clone())
            .or_else(|| self.parser.last_text().map(str::to_string))
            .or_else(|| {
                Some(self.parser.plain_tail().to_string()).filter(|t| !t.trim().is_empty())
            });
        let (state, error) = match (self.stop, verdict) {
            (Some(StopReason::Cancel), _) => (TaskState::Cancelled, None),
            (Some(StopReason::Shutdown), _) => {
                (TaskState::Interrupted, Some("walkie shut down".to_string()))
            }
            (None, _) if self.oom => (TaskState::Failed, Some("out of memory".to_string())),
            (None, Verdict::Succeeded) => (TaskState::Succeeded, None),
            (None, Verdict::Failed { reason }) => (TaskState::Failed, Some(reason)),
            (None, Verdict::Interrupted { reason }) => (TaskState::Interrupted, Some(reason)),
        };
        let cost = self.parser.result().and_then(|r| r.total_cost_usd);
        self.report(state, error, final_text, exit_code, cost)
    }

    /// An outcome ready for the registry: everything in it redacted, the summary short.
    fn report(
        &self,
        state: TaskState,
        error: Option<String>,
        final_text: Option<String>,
        exit_code: Option<i32>,
        cost_usd: Option<f64>,
    ) -> Outcome {
        // The state is said next to the summary everywhere (announcements, `ctl tasks`,
        // events), so the summary says why and never repeats it.
        let summary = match (state, &error) {
            (TaskState::Succeeded, _) => final_text
                .as_deref()
                .map(|t| redact::speech_summary(t, SUMMARY_CHARS))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "finished without a final message".into()),
            (TaskState::Cancelled, _) => "cancelled".to_string(),
            (_, Some(reason)) => redact::speech_summary(reason, SUMMARY_CHARS),
            (_, None) => state.as_str().to_string(),
        };
        Outcome {
            state,
            exit_code,
            error: error.map(|e| redact::redact(&e)),
            summary,
            result_text: final_text.map(|t| redact::excerpt(&t, RESULT_TEXT_CHARS, Keep::Head)),
            session_id: self.parser.session_id().map(str::to_string),
            files_changed: self.parser.files_changed().to_vec(),
            cost_usd,
            stragglers: self.stragglers,
            reported: false,
        }
    }
}

/// The leftovers of a run that was going on when walkie last died: every process still
/// carrying the task's marker (or in its cgroup) is killed; nothing is reported but the
/// end. The run itself is already recorded as interrupted.
#[derive(Debug)]
pub struct Leftover {
    started: Instant,
    next_probe: Instant,
    probing: bool,
    done: bool,
    stragglers: usize,
    actions: VecDeque<Action>,
}

impl Leftover {
    /// `root_verified`: the recorded agent pid still names the agent (same start time),
    /// so its group may be signalled.
    pub fn new(now: Instant, root_verified: bool) -> Leftover {
        let mut actions = VecDeque::new();
        if root_verified {
            actions.push_back(Action::Signal {
                target: Target::Group,
                signal: Signal::SIGKILL,
            });
        }
        actions.push_back(Action::Probe {
            signal: Some(Signal::SIGKILL),
        });
        Leftover {
            started: now,
            next_probe: now + SWEEP_POLL,
            probing: true,
            done: false,
            stragglers: 0,
            actions,
        }
    }

    pub fn handle_members(&mut self, now: Instant, members: Members) {
        self.probing = false;
        if members.alive == 0 {
            self.done = true;
        } else if now >= self.started + GIVE_UP {
            self.stragglers = members.alive;
            self.done = true;
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.done {
            return;
        }
        if now >= self.started + GIVE_UP {
            self.done = true;
            return;
        }
        if now >= self.next_probe && !self.probing {
            self.next_probe = now + SWEEP_POLL;
            self.probing = true;
            self.actions.push_back(Action::Probe {
                signal: Some(Signal::SIGKILL),
            });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.done).then(|| self.next_probe.min(self.started + GIVE_UP))
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Processes still alive when walkie gave up on them.
    pub fn stragglers(&self) -> usize {
        self.stragglers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT: &[u8] = b"{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s1\"}\n";
    const SUCCESS: &[u8] = b"{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"All fixed.\",\"session_id\":\"s1\",\"total_cost_usd\":0.25}\n";
    const INTERRUPTED: &[u8] = b"{\"type\":\"result\",\"subtype\":\"error_during_execution\",\"is_error\":true,\"session_id\":\"s1\"}\n";

    fn signal(target: Target, signal: Signal) -> Action {
        Action::Signal { target, signal }
    }

    fn probe(signal: Option<Signal>) -> Action {
        Action::Probe { signal }
    }

    fn members(alive: usize) -> Members {
        Members {
            alive,
            oom_kills: 0,
        }
    }

    /// One run on a fake clock: grace 1000 ms (SIGTERM at 500), sweep grace 400 ms.
    struct Rig {
        run: Lifecycle,
        t0: Instant,
        events: Vec<StreamEvent>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::with(false)
        }

        fn with(watched: bool) -> Rig {
            let mut rig = Rig {
                run: Lifecycle::new(Settings {
                    cancel_grace: Duration::from_millis(1000),
                    sweep_grace: Duration::from_millis(400),
                    watched,
                    output: OutputKind::StreamJson,
                    warm: Duration::from_millis(5000),
                }),
                t0: Instant::now(),
                events: Vec::new(),
            };
            assert_eq!(rig.actions(), [Action::Spawn]);
            rig.run.handle_spawned(rig.t0, 4242);
            assert_eq!(rig.run.poll_event(), Some(Event::Started { pid: 4242 }));
            assert!(rig.run.agent_alive());
            rig
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn actions(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.run.poll_action()).collect()
        }

        fn finished(&mut self) -> Option<Outcome> {
            match self.run.poll_event() {
                Some(Event::Finished(o)) => Some(o),
                None => None,
                other => panic!("unexpected {other:?}"),
            }
        }

        fn out(&mut self, ms: u64, bytes: &[u8]) {
            let now = self.at(ms);
            self.run
                .handle_output(now, Pipe::Stdout, bytes, &mut self.events);
        }

        fn eof(&mut self, ms: u64) {
            let now = self.at(ms);
            self.run.handle_eof(now, Pipe::Stdout, &mut self.events);
            self.run.handle_eof(now, Pipe::Stderr, &mut self.events);
        }

        fn exit(&mut self, ms: u64, exit: ExitInfo) -> Vec<Action> {
            let now = self.at(ms);
            self.run.handle_exit(now, exit);
            self.actions()
        }

        fn members(&mut self, ms: u64, alive: usize) -> Vec<Action> {
            let now = self.at(ms);
            self.run.handle_members(now, members(alive));
            self.actions()
        }

        fn stop(&mut self, ms: u64, reason: StopReason) -> Vec<Action> {
            let now = self.at(ms);
            assert!(self.run.handle_stop(now, reason));
            self.actions()
        }

        fn tick(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.run.handle_timeout(now);
            self.actions()
        }

        /// Runs the clock to `ms` in steps of the run's own deadlines; every action seen.
        fn run_to(&mut self, ms: u64) -> Vec<Action> {
            let end = self.at(ms);
            let mut all = Vec::new();
            while let Some(t) = self.run.poll_timeout().filter(|t| *t <= end) {
                self.run.handle_timeout(t);
                all.extend(self.actions());
            }
            all
        }
    }

    #[test]
    fn a_cooperative_agent_finishes_once_reaped_alone_and_its_pipes_closed() {
        let mut rig = Rig::new();
        rig.out(10, INIT);
        rig.out(20, SUCCESS);
        assert_eq!(rig.run.parser().session_id(), Some("s1"));
        assert_eq!(
            rig.run.poll_timeout(),
            None,
            "nothing to time while it works"
        );
        // Reaped: whatever it left behind is looked for (and asked to stop).
        assert_eq!(
            rig.exit(30, ExitInfo::Code(0)),
            [probe(Some(Signal::SIGTERM))]
        );
        assert!(!rig.run.agent_alive());
        assert_eq!(rig.members(31, 0), []);
        assert_eq!(rig.finished(), None, "the pipes are still open");
        rig.eof(32);
        let outcome = rig.finished().expect("finished");
        assert_eq!(outcome.state, TaskState::Succeeded);
        assert_eq!(outcome.summary, "All fixed.");
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(outcome.error, None);
        assert_eq!(outcome.session_id.as_deref(), Some("s1"));
        assert_eq!(outcome.cost_usd, Some(0.25));
        assert!(rig.run.is_done());
        // Once: nothing more happens, whatever comes late.
        rig.members(40, 0);
        rig.eof(41);
        assert_eq!(rig.finished(), None);
        assert_eq!(rig.run.poll_timeout(), None);
    }

    #[test]
    fn a_cancel_honoured_at_sigint_needs_nothing_more() {
        let mut rig = Rig::new();
        rig.out(0, INIT);
        assert_eq!(
            rig.stop(100, StopReason::Cancel),
            [signal(Target::Group, Signal::SIGINT)]
        );
        assert_eq!(rig.run.poll_timeout(), Some(rig.at(600)), "SIGTERM due");
        rig.out(200, INTERRUPTED);
        assert_eq!(
            rig.exit(250, ExitInfo::Code(0)),
            [probe(Some(Signal::SIGTERM))]
        );
        // The escalation died with the agent: no SIGTERM or SIGKILL to a reaped pid.
        rig.members(251, 0);
        rig.eof(260);
        assert_eq!(rig.run_to(2000), []);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Cancelled);
        assert_eq!(outcome.summary, "cancelled");
        assert_eq!(outcome.exit_code, Some(0));
    }

    #[test]
    fn a_cancel_escalates_to_sigterm_at_half_the_grace() {
        let mut rig = Rig::new();
        rig.stop(0, StopReason::Cancel);
        assert_eq!(rig.tick(499), []);
        assert_eq!(rig.tick(500), [signal(Target::Group, Signal::SIGTERM)]);
        assert_eq!(rig.tick(700), []);
        rig.exit(720, ExitInfo::Code(143));
        rig.members(721, 0);
        rig.eof(722);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Cancelled);
        assert_eq!(outcome.exit_code, Some(143));
    }

    #[test]
    fn a_cancel_ignored_to_the_end_kills_group_agent_and_members() {
        let mut rig = Rig::new();
        rig.stop(0, StopReason::Cancel);
        // A second cancel changes nothing.
        assert_eq!(rig.stop(10, StopReason::Cancel), []);
        rig.tick(500);
        assert_eq!(
            rig.tick(1000),
            [
                signal(Target::Group, Signal::SIGKILL),
                signal(Target::Agent, Signal::SIGKILL),
                probe(Some(Signal::SIGKILL)),
            ]
        );
        assert_eq!(rig.members(1001, 3), [], "the agent is among them");
        // Leftovers found after the kill get no second grace.
        assert_eq!(
            rig.exit(1002, ExitInfo::Signal(9)),
            [probe(Some(Signal::SIGKILL))]
        );
        assert_eq!(rig.members(1003, 1), []);
        assert_eq!(rig.tick(1052), [probe(Some(Signal::SIGKILL))]);
        rig.members(1053, 0);
        rig.eof(1054);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Cancelled);
        assert_eq!(outcome.exit_code, Some(137));
    }

    #[test]
    fn descendants_that_escaped_are_swept_before_the_task_is_finished() {
        // A cooperative agent whose Bash tool left a process in its own session.
        let mut rig = Rig::new();
        rig.out(0, INIT);
        rig.out(0, SUCCESS);
        rig.eof(5);
        assert_eq!(
            rig.exit(10, ExitInfo::Code(0)),
            [probe(Some(Signal::SIGTERM))]
        );
        assert_eq!(rig.members(11, 1), []);
        assert_eq!(rig.finished(), None, "a descendant is alive");
        // It ignores SIGTERM: polled, then killed at the sweep grace, and killed again on
        // each later look (it may have forked just before the kill).
        assert_eq!(rig.tick(60), [probe(None)]);
        rig.members(61, 1);
        assert_eq!(rig.tick(110), [probe(None)]);
        // The sweep grace ends while that look is out: the kill is owed, not lost.
        assert_eq!(rig.run_to(410), []);
        assert_eq!(rig.members(411, 1), [probe(Some(Signal::SIGKILL))]);
        rig.members(412, 1);
        assert_eq!(rig.tick(460), [probe(Some(Signal::SIGKILL))]);
        assert_eq!(rig.finished(), None);
        rig.members(461, 0);
        let outcome = rig.finished().expect("finished once nothing is left");
        assert_eq!(outcome.state, TaskState::Succeeded);
        assert_eq!(outcome.stragglers, 0);
    }

    #[test]
    fn pipes_held_open_by_a_stray_are_closed_after_a_grace() {
        let mut rig = Rig::new();
        rig.out(0, SUCCESS);
        rig.exit(10, ExitInfo::Code(0));
        rig.members(11, 0);
        assert_eq!(rig.run.poll_timeout(), Some(rig.at(311)));
        assert_eq!(rig.tick(310), []);
        assert_eq!(rig.tick(311), [Action::ClosePipes]);
        assert_eq!(rig.tick(400), [], "asked once");
        assert_eq!(rig.finished(), None);
        // The shell read what was left and closed them.
        rig.eof(312);
        assert_eq!(rig.finished().unwrap().state, TaskState::Succeeded);
    }

    #[test]
    fn processes_that_would_not_die_are_given_up_on() {
        // In uninterruptible sleep (D state): SIGKILL is pending but never acts.
        let mut rig = Rig::new();
        rig.out(0, SUCCESS);
        rig.eof(0);
        rig.exit(0, ExitInfo::Code(0));
        let mut t = 1;
        while rig.finished().is_none() {
            rig.members(t, 2);
            let next = rig.run.poll_timeout().expect("a deadline while sweeping");
            t = (next - rig.t0).as_millis() as u64;
            rig.tick(t);
            assert!(t <= 10_100, "still sweeping at {t} ms");
        }
        assert!(t >= 10_000, "gave up too early, at {t} ms");
        // And when the membership source itself never answers.
        let mut rig = Rig::new();
        rig.eof(0);
        rig.exit(0, ExitInfo::Code(0));
        rig.run_to(9_999);
        assert_eq!(rig.finished(), None);
        rig.run_to(10_000);
        assert!(rig.finished().is_some(), "given up");
    }

    #[test]
    fn a_reaped_agent_pid_is_never_signalled_again() {
        // Once reaped, the pid (and group id) may belong to a stranger.
        let mut rig = Rig::new();
        rig.stop(0, StopReason::Shutdown);
        rig.exit(100, ExitInfo::Code(0));
        rig.members(101, 2);
        let mut seen = rig.stop(102, StopReason::Cancel);
        rig.run.handle_kill(rig.at(103));
        seen.extend(rig.actions());
        seen.extend(rig.run_to(5000));
        assert!(
            seen.iter().all(|a| matches!(a, Action::Probe { .. })),
            "{seen:?}"
        );
        assert!(seen.contains(&probe(Some(Signal::SIGKILL))));
    }

    #[test]
    fn shutdown_interrupts_and_a_cancel_overrides_it() {
        let mut rig = Rig::new();
        assert_eq!(
            rig.stop(0, StopReason::Shutdown),
            [signal(Target::Group, Signal::SIGINT)]
        );
        rig.exit(10, ExitInfo::Code(0));
        rig.members(11, 0);
        rig.eof(12);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Interrupted);
        assert_eq!(outcome.summary, "walkie shut down.");

        let mut rig = Rig::new();
        rig.stop(0, StopReason::Shutdown);
        assert_eq!(
            rig.stop(5, StopReason::Cancel),
            [signal(Target::Group, Signal::SIGINT)]
        );
        assert_eq!(rig.stop(6, StopReason::Shutdown), [], "cancel stays");
        rig.exit(10, ExitInfo::Code(0));
        rig.members(11, 0);
        rig.eof(12);
        assert_eq!(rig.finished().unwrap().state, TaskState::Cancelled);
    }

    #[test]
    fn an_oom_kill_fails_the_task_with_out_of_memory() {
        let mut rig = Rig::new();
        rig.out(0, INIT);
        rig.exit(10, ExitInfo::Signal(9));
        rig.run.handle_members(
            rig.at(11),
            Members {
                alive: 0,
                oom_kills: 1,
            },
        );
        rig.eof(12);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Failed);
        assert_eq!(outcome.error.as_deref(), Some("out of memory"));
        assert_eq!(outcome.summary, "out of memory.");
    }

    #[test]
    fn a_failure_summary_says_why_without_repeating_the_state() {
        let mut rig = Rig::new();
        rig.out(0, INIT);
        rig.exit(10, ExitInfo::Code(1));
        rig.members(11, 0);
        rig.eof(12);
        let outcome = rig.finished().unwrap();
        assert_eq!(outcome.state, TaskState::Failed);
        assert!(
            !outcome.summary.starts_with("failed"),
            "{}",
            outcome.summary
        );
        assert!(outcome.summary.contains("code 1"), "{}", outcome.summary);
        assert_eq!(
            outcome.error.as_deref(),
            Some("no result from the agent (it exited with code 1)")
        );
    }

    #[test]
    fn a_watched_sweep_waits_for_the_membership_event_instead_of_polling() {
        let mut rig = Rig::with(true);
        rig.eof(0);
        rig.exit(0, ExitInfo::Code(0));
        rig.members(1, 1);
        assert_eq!(
            rig.run.poll_timeout(),
            Some(rig.at(400)),
            "the sweep's SIGKILL"
        );
        // The cgroup says something changed: look at once.
        rig.run.handle_members_changed(rig.at(50));
        assert_eq!(rig.actions(), [probe(None)]);
        rig.members(51, 0);
        assert!(rig.finished().is_some());
    }

    // ---- runs kept open on stdin ----

    const APPROVAL: Duration = Duration::from_secs(600);
    const ASK: &[u8] = b"{\"type\":\"control_request\",\"request_id\":\"r1\",\"request\":{\"subtype\":\"can_use_tool\",\"tool_name\":\"Bash\",\"input\":{\"command\":\"npm test\"}}}\n";

    impl Rig {
        /// A kept-open run (warm 5 s) whose prompt has been written to the agent.
        fn kept_open() -> Rig {
            let t0 = Instant::now();
            let mut session = ClaudeSession::new("go", "/cwd", APPROVAL, 1, t0);
            session.stdin_written(usize::MAX);
            let mut rig = Rig {
                run: Lifecycle::kept_open(
                    Settings {
                        cancel_grace: Duration::from_millis(1000),
                        sweep_grace: Duration::from_millis(400),
                        watched: false,
                        output: OutputKind::StreamJson,
                        warm: Duration::from_millis(5000),
                    },
                    session,
                ),
                t0,
                events: Vec::new(),
            };
            assert_eq!(rig.actions(), [Action::Spawn]);
            rig.run.handle_spawned(t0, 4242);
            assert_eq!(rig.run.poll_event(), Some(Event::Started { pid: 4242 }));
            rig
        }

        fn turn_finished(&mut self) -> Outcome {
            match self.run.poll_event() {
                Some(Event::TurnFinished(o)) => o,
                other => panic!("expected a turn's end, got {other:?}"),
            }
        }

        /// What the session has for the agent's stdin, as JSON lines (then written).
        fn stdin(&mut self) -> Vec<serde_json::Value> {
            let session = self.run.session_mut().unwrap();
            let text = String::from_utf8(session.stdin_pending().to_vec()).unwrap();
            session.stdin_written(usize::MAX);
            text.lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }

        /// The agent exits (code `code`) and nothing of it is left.
        fn gone(&mut self, ms: u64, code: i32) -> Outcome {
            self.exit(ms, ExitInfo::Code(code));
            self.members(ms + 1, 0);
            self.eof(ms + 2);
            self.finished().expect("finished")
        }
    }

    #[test]
    fn a_turn_is_the_outcome_and_the_exit_of_the_warm_agent_says_nothing_new() {
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        rig.out(20, SUCCESS);
        let turn = rig.turn_finished();
        assert_eq!(turn.state, TaskState::Succeeded);
        assert_eq!(turn.summary, "All fixed.");
        assert_eq!(turn.exit_code, None, "the process lives on");
        assert!(!turn.reported);
        assert_eq!(turn.cost_usd, Some(0.25));
        assert_eq!(rig.run.idle_since(), Some(rig.at(20)));
        // Warm for 5 s, then its stdin is closed (EOF ends the CLI).
        assert_eq!(rig.run.poll_timeout(), Some(rig.at(5020)));
        assert_eq!(rig.run_to(5019), []);
        assert!(!rig.run.session().unwrap().wants_stdin_closed());
        assert_eq!(rig.run_to(5020), [], "no signal: EOF is enough");
        assert!(rig.run.session().unwrap().wants_stdin_closed());
        assert_eq!(rig.run.idle_since(), None);
        // The exit after it changes nothing the user was told.
        let outcome = rig.gone(5050, 0);
        assert!(outcome.reported);
        assert_eq!(outcome.state, TaskState::Succeeded);
        assert_eq!(outcome.summary, "All fixed.");
        assert_eq!(outcome.exit_code, Some(0));
    }

    #[test]
    fn an_interrupted_last_turn_exits_1_and_is_no_failure() {
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        let at = rig.at(15);
        rig.run.session_mut().unwrap().interrupt(at).unwrap();
        assert_eq!(rig.stdin()[0]["request"]["subtype"], "interrupt");
        rig.out(20, INTERRUPTED);
        let turn = rig.turn_finished();
        assert_eq!(turn.state, TaskState::Interrupted);
        assert!(turn.summary.contains("follow-up"), "{}", turn.summary);
        let at = rig.at(30);
        assert!(rig.run.handle_close(at), "idle: closed");
        assert!(!rig.run.handle_close(at), "once");
        // The interrupt-stream fixture: the CLI exits 1 after an interrupted last turn.
        let outcome = rig.gone(60, 1);
        assert!(outcome.reported);
        assert_eq!(outcome.state, TaskState::Interrupted);
        assert_eq!(outcome.exit_code, Some(1));
    }

    #[test]
    fn a_crash_in_the_middle_of_a_turn_fails_the_task() {
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        rig.out(20, SUCCESS);
        rig.turn_finished();
        // A follow-up to the warm agent starts its next turn; it dies in it.
        let at = rig.at(30);
        rig.run
            .session_mut()
            .unwrap()
            .send_message("more", false, at)
            .unwrap();
        assert_eq!(rig.run.idle_since(), None, "working again");
        assert_eq!(rig.run.poll_timeout(), None, "no warm timer while it works");
        let outcome = rig.gone(40, 1);
        assert!(!outcome.reported);
        assert_eq!(outcome.state, TaskState::Failed);
        assert_eq!(
            outcome.error.as_deref(),
            Some("the agent exited with code 1 in the middle of a turn"),
            "not the earlier turn's success"
        );
        // Before any result: the one-shot rule.
        let mut rig = Rig::kept_open();
        let outcome = rig.gone(40, 1);
        assert_eq!(outcome.state, TaskState::Failed);
        assert!(outcome.error.unwrap().contains("code 1"));
    }

    #[test]
    fn a_cancel_of_a_busy_run_is_cancelled_and_of_a_warm_one_keeps_its_outcome() {
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        rig.out(20, ASK);
        assert_eq!(
            rig.run.poll_event(),
            Some(Event::Session(SessionEvent::PermissionRequested {
                request_id: "r1".into()
            }))
        );
        // Cancel of a waiting agent: its request is withdrawn, the signals go as ever.
        assert_eq!(
            rig.stop(30, StopReason::Cancel),
            [signal(Target::Group, Signal::SIGINT)]
        );
        assert_eq!(
            rig.run.poll_event(),
            Some(Event::Session(SessionEvent::PermissionWithdrawn {
                request_id: "r1".into()
            }))
        );
        assert!(rig.run.session().unwrap().wants_stdin_closed());
        rig.out(40, INTERRUPTED);
        let outcome = rig.gone(50, 0);
        assert_eq!(outcome.state, TaskState::Cancelled);
        assert!(!outcome.reported);

        // Cancel of a warm agent: everything stops, the outcome stands.
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        rig.out(20, SUCCESS);
        rig.turn_finished();
        assert_eq!(
            rig.stop(30, StopReason::Cancel),
            [signal(Target::Group, Signal::SIGINT)]
        );
        assert_eq!(rig.run.idle_since(), None);
        // The CLI may answer the SIGINT with a result of its own: no new turn.
        rig.out(35, INTERRUPTED);
        let outcome = rig.gone(50, 0);
        assert!(outcome.reported);
        assert_eq!(outcome.state, TaskState::Succeeded);
        // So does a shutdown.
        let mut rig = Rig::kept_open();
        rig.out(20, SUCCESS);
        rig.turn_finished();
        rig.stop(30, StopReason::Shutdown);
        assert_eq!(rig.gone(50, 0).state, TaskState::Succeeded);
    }

    #[test]
    fn an_unanswered_request_is_denied_at_its_deadline() {
        let mut rig = Rig::kept_open();
        rig.out(10, INIT);
        rig.out(20, ASK);
        rig.run.poll_event();
        let deadline = rig.t0 + Duration::from_millis(20) + APPROVAL;
        assert_eq!(rig.run.poll_timeout(), Some(deadline));
        rig.run.handle_timeout(deadline);
        assert_eq!(
            rig.run.poll_event(),
            Some(Event::Session(SessionEvent::PermissionTimedOut {
                request_id: "r1".into()
            }))
        );
        let answer = &rig.stdin()[0]["response"];
        assert_eq!(answer["request_id"], "r1");
        assert_eq!(answer["response"]["behavior"], "deny");
        assert!(
            answer["response"]["message"]
                .as_str()
                .unwrap()
                .contains("ask again later"),
            "{answer}"
        );
        assert_eq!(rig.run.poll_timeout(), None);
    }

    #[test]
    fn leftovers_of_a_previous_run_are_killed_by_group_only_when_the_pid_is_verified() {
        let t0 = Instant::now();
        let mut verified = Leftover::new(t0, true);
        let actions: Vec<_> = std::iter::from_fn(|| verified.poll_action()).collect();
        assert_eq!(
            actions,
            [
                signal(Target::Group, Signal::SIGKILL),
                probe(Some(Signal::SIGKILL))
            ]
        );
        // A pid whose start time differs belongs to a stranger: only the marker/cgroup.
        let mut stranger = Leftover::new(t0, false);
        let actions: Vec<_> = std::iter::from_fn(|| stranger.poll_action()).collect();
        assert_eq!(actions, [probe(Some(Signal::SIGKILL))]);
        stranger.handle_members(t0, members(2));
        stranger.handle_timeout(t0 + SWEEP_POLL);
        assert_eq!(stranger.poll_action(), Some(probe(Some(Signal::SIGKILL))));
        stranger.handle_members(t0 + SWEEP_POLL, members(0));
        assert!(stranger.is_done());
        assert_eq!(stranger.poll_timeout(), None);
        // Stuck ones are given up on.
        verified.handle_members(t0, members(1));
        verified.handle_timeout(t0 + GIVE_UP);
        assert!(verified.is_done());
    }
}
