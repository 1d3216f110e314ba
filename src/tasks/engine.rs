//! The task engine: the registry, and the shell around each run's lifecycle core.
//!
//! It owns the agents' stdin (kept open with `agent.protocol = "claude"`), stdout and stderr
//! pipes and the inotify fd watching the task cgroups'
//! `cgroup.events` (tokens from [`crate::reactor::TASK_PIPES`]), the agents' pidfds, the
//! reaping of every child (walkie is a child subreaper, so orphaned descendants land here
//! too), the membership helper thread (members.rs) and the task-output writer thread
//! (writer.rs). It decides nothing about how a run ends: each run's [`Lifecycle`]
//! (lifecycle.rs) does, and this shell carries out its actions — fork/exec, signals,
//! probes, closing pipes — and records the outcome it reports.
//!
//! An agent kept open on stdin is spoken to through its run's session (claude.rs): the
//! prompt is its first user line (never in argv), follow-ups, steering, interrupts and
//! permission answers are further lines, written without blocking (buffered in the session,
//! bounded, flushed on WRITABLE). After a turn the process stays warm for `agent.warm_s`
//! (at most `agent.max_warm` of them, the one idle longest closed first); a follow-up to a
//! warm agent is its next turn in the same process, a later one resumes the session in a
//! new process.
//!
//! Nothing here blocks or touches the disk on the loop: spawning is a clone3/exec (the
//! child starts in its cgroup and creates its own directories before exec; see
//! `sys::process`), exits come from SIGCHLD + `waitpid(-1, WNOHANG)`, `/proc` scans and
//! cgroup kills run on the membership thread, and log writes, rotation, read-backs and
//! removals run on the writer thread.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::unix::pipe::{Receiver, Sender};
use mio::{Interest, Registry, Token};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::claude::{
    self, Activity, ClaudeSession, Decision, MessageStatus, RequestEnd, SessionEvent,
};
use super::contain::Containment;
use super::lifecycle::{
    self, Action, Event, Leftover, Lifecycle, Outcome, Pipe, StopReason, Target,
};
use super::members::{CgroupScope, MembershipSource, Report, Scope};
use super::names::{self, Resolution};
use super::output::{TAIL_BYTES, Tail};
use super::proc::{self, MARKER_VAR};
use super::record::{TaskRecord, TaskState};
use super::redact::{self, Keep, OutputRedactor};
use super::stream::{ExitInfo, OutputKind, StreamEvent};
use super::writer::{DiskWriter, Done};
use crate::config::{AgentConfig, AgentProtocol};
use crate::paths::Paths;
use crate::reactor::{TASK_PIPES, TokenPool};
use crate::sys::process::ChildIo;

/// Bytes read from one pipe per readiness before yielding to the rest of the loop; a pipe
/// with more to give is serviced again on the next iteration (see [`TaskEngine::has_backlog`]).
const READ_BUDGET: usize = 16 * 1024;
/// Bytes read from all pipes together in one iteration of the loop: what the agents print
/// costs the loop a few µs per KiB (parsing, rendering, the log queue), and ten agents
/// flooding must not hold audio and the link for milliseconds. Pipes left with something
/// to give wait their turn, oldest first, in the next iterations, which do not wait.
const ITERATION_BUDGET: usize = 32 * 1024;
/// How much nicer than walkie an agent runs (and all it starts): a build an agent runs
/// takes the CPU walkie's loop leaves, never the other way round. The audio threads are
/// SCHED_FIFO where allowed; the loop that moves speech to and from the link is not.
const AGENT_NICE: u8 = 10;
/// Finished tasks kept in the registry; older ones are pruned with their log directory.
const KEEP_FINISHED: usize = 100;
/// Longest stderr line kept for the rendered log.
const STDERR_LINE: usize = 4096;
/// At most this much is read from a pipe being closed (a pipe buffer holds 64 KiB).
const CLOSE_DRAIN_MAX: u64 = 256 * 1024;
/// The longest the sweep of an exited agent's leftovers waits before SIGKILL.
const SWEEP_GRACE_MAX: Duration = Duration::from_secs(2);

/// What the engine needs from the configuration.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub agent: AgentConfig,
    /// Project name → directory (already `~`-expanded).
    pub projects: BTreeMap<String, PathBuf>,
    pub paths: Paths,
    /// The variable holding the OpenAI key: never passed to agents, whatever `env_pass` says.
    pub openai_key_var: String,
}

/// Something the rest of the daemon may want to know.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskEvent {
    Started {
        name: String,
    },
    /// Rendered output of a task someone follows (see [`TaskEngine::set_followed`]).
    Output {
        name: String,
        text: String,
    },
    Finished {
        name: String,
        state: TaskState,
        summary: String,
    },
    /// The log a [`Logs::Later`] promised, read back by the writer thread.
    LogsRead {
        ticket: u64,
        task: String,
        text: String,
    },
    /// The registry changed: persist it.
    Changed,
    /// An agent asks whether it may use a tool; the task is `waiting`. `verb` and `object`
    /// say what, short and redacted ("run", "npm test").
    PermissionAsked {
        name: String,
        request_id: String,
        verb: String,
        object: String,
    },
    /// A request of [`TaskEvent::PermissionAsked`] is no longer pending.
    PermissionClosed {
        name: String,
        request_id: String,
        end: RequestEnd,
    },
}

/// Where a follow-up or a steering message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A new agent process resumes the session with it (the agent was not warm).
    Resumed,
    /// The warm agent started its next turn with it, in the same process.
    NextTurn,
    /// The agent is working: it takes the message in at its next step.
    NextStep,
    /// The agent's turn is being interrupted; the message follows at the turn's end.
    AfterInterrupt,
    /// The agent was closing its warm process: a new process resumes the session with it.
    AfterClose,
}

/// What a running or warm task's agent is doing, for `task_status` and `walkie ctl tasks`.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveView {
    pub activity: Activity,
    /// The permission request the agent waits on, in words ("run `npm test`").
    pub waiting_for: Option<String>,
    /// Where the last message sent to it is ("taken in", …).
    pub last_message: Option<MessageStatus>,
    /// Between turns, waiting for a follow-up.
    pub warm: bool,
    /// Spoken to through stdin (`agent.protocol = "claude"`): takes messages, interrupts
    /// and permission answers.
    pub kept_open: bool,
}

/// A task's rendered output, now or after the writer thread read it back.
#[derive(Debug, Clone, PartialEq)]
pub enum Logs {
    /// A running task's in-memory tail; `dropped` log bytes never reached the disk.
    Now {
        task: String,
        text: String,
        dropped: u64,
    },
    /// A finished task's log file: [`TaskEvent::LogsRead`] brings it with `ticket`.
    Later { task: String, ticket: u64 },
}

/// Why a request about a task was refused. Every variant is reported to the requester as
/// is (a control reply or a tool output); none is fatal to the daemon.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TaskError {
    #[error("{limit} tasks are already running ({}); cancel one or wait", running.join(", "))]
    Limit { limit: u32, running: Vec<String> },
    #[error("no task matches \"{0}\"")]
    NotFound(String),
    #[error("\"{reference}\" could mean {}", candidates.join(" or "))]
    Ambiguous {
        reference: String,
        candidates: Vec<String>,
    },
    #[error("unknown project \"{name}\" (known: {})", if known.is_empty() { "none configured".to_string() } else { known.join(", ") })]
    UnknownProject { name: String, known: Vec<String> },
    #[error("the directory of project \"{name}\" does not exist: {path}")]
    ProjectMissing { name: String, path: String },
    #[error("task {0} is still running")]
    StillRunning(String),
    #[error("task {0} is not running")]
    NotRunning(String),
    #[error("task {0} has no agent session to continue")]
    NoSession(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("could not start the agent: {0}")]
    Spawn(String),
    #[error("walkie is shutting down")]
    ShuttingDown,
    #[error(
        "task {0} runs one-shot (agent.protocol \"oneshot\"): it takes no messages, interrupts or answers while it runs"
    )]
    OneShot(String),
    #[error("task {0} is not in the middle of a turn")]
    NotInTurn(String),
    #[error("task {0} is not waiting for an approval")]
    NotWaiting(String),
    #[error(
        "the user has not answered {0}'s request since it was announced: ask them, and call answer_task only after they reply"
    )]
    NotAnswered(String),
    #[error("task {name}: {reason}")]
    Agent { name: String, reason: String },
}

/// A task's three log files (paths shared with the writer thread).
struct LogFiles {
    dir: PathBuf,
    raw: Arc<Path>,
    err: Arc<Path>,
    text: Arc<Path>,
}

impl LogFiles {
    fn new(dir: PathBuf) -> LogFiles {
        LogFiles {
            raw: Arc::from(dir.join("stdout.jsonl")),
            err: Arc::from(dir.join("stderr.log")),
            text: Arc::from(dir.join("log.txt")),
            dir,
        }
    }
}

/// A running task: its lifecycle core and the fds and buffers the shell keeps for it.
struct Live {
    id: String,
    name: String,
    /// Names this run's probes (a continued task is a new run with a new key).
    key: u64,
    run: Lifecycle,
    pid: i32,
    start_time: Option<u64>,
    pidfd: Option<OwnedFd>,
    stdout: Option<(Token, Receiver)>,
    stderr: Option<(Token, Receiver)>,
    stderr_line: Vec<u8>,
    tail: Tail,
    logs: LogFiles,
    /// Log bytes the writer could not take in time.
    dropped: u64,
    tmpdir: PathBuf,
    cgroup: Option<CgroupScope>,
    watch: Option<WatchDescriptor>,
    followed: bool,
    /// Redacts the output streamed to followers (what is kept is redacted when read).
    redactor: OutputRedactor,
    /// When the agent was started.
    started: Instant,
    /// The agent's stdin while it is kept open: the session's bytes are written here.
    stdin: Option<StdinPipe>,
    /// The last message sent to a kept-open agent, for its receipt in `task_status`.
    last_message: Option<String>,
    /// A follow-up that came while this run's warm agent was closing: the next run starts
    /// with it as soon as this one is over.
    follow_up: Option<String>,
}

/// The write end of a kept-open agent's stdin, non-blocking; registered for WRITABLE only
/// while the session has bytes the pipe did not take.
struct StdinPipe {
    token: Token,
    tx: Sender,
    registered: bool,
}

/// How a run is started: its argv, and the session when it is kept open on stdin.
struct Launch {
    argv: Vec<String>,
    session: Option<ClaudeSession>,
}

/// What is left of a task that was running when walkie last died.
struct LeftoverRun {
    name: String,
    scope: Scope,
    root: Option<i32>,
    core: Leftover,
}

/// The inotify fd watching each task cgroup's `cgroup.events` for `populated` changes.
struct CgroupWatch {
    inotify: Inotify,
    token: Token,
    tasks: HashMap<WatchDescriptor, String>,
}

pub struct TaskEngine {
    settings: EngineSettings,
    registry: Registry,
    records: Vec<TaskRecord>,
    live: HashMap<String, Live>,
    tokens: HashMap<Token, (String, Pipe)>,
    /// Stdin pipes of kept-open agents: token → task id.
    stdin_tokens: HashMap<Token, String>,
    pool: TokenPool,
    /// Pipes with more to read than their last budget, oldest first.
    backlog: VecDeque<Token>,
    /// What may still be read in this iteration of the loop ([`ITERATION_BUDGET`]).
    budget_left: usize,
    events: VecDeque<TaskEvent>,
    leftovers: HashMap<u64, LeftoverRun>,
    containment: Containment,
    watch: Option<CgroupWatch>,
    members: MembershipSource,
    disk: DiskWriter,
    /// Probe key → task id of a live run.
    keys: HashMap<u64, String>,
    next_key: u64,
    /// `ctl logs` read-backs in flight: ticket → task name.
    tickets: HashMap<u64, String>,
    next_ticket: u64,
    shutting_down: bool,
    /// A turn ended: `agent.max_warm` is checked once the run has been driven.
    warm_check: bool,
    scratch: Vec<u8>,
    stream_events: Vec<StreamEvent>,
    reports: Vec<Report>,
    done: Vec<Done>,
}

impl TaskEngine {
    /// Builds the engine from the records of the state file. Tasks that were running when
    /// walkie last stopped are marked `interrupted`, and whatever is left of their processes
    /// (by pid + start time, marker and cgroup) is stopped.
    pub fn new(
        settings: EngineSettings,
        mut records: Vec<TaskRecord>,
        now: Instant,
        registry: &Registry,
        waker: Arc<mio::Waker>,
        containment: Containment,
    ) -> io::Result<TaskEngine> {
        let mut pool = TokenPool::new(TASK_PIPES, usize::MAX);
        let watch = match containment.cgroups() {
            Some(_) => {
                let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
                let token = pool.take().expect("the first token of the range");
                registry.register(
                    &mut SourceFd(&inotify.as_fd().as_raw_fd()),
                    token,
                    Interest::READABLE,
                )?;
                Some(CgroupWatch {
                    inotify,
                    token,
                    tasks: HashMap::new(),
                })
            }
            None => None,
        };
        // The child creates its own directories below these (see `spawn`).
        for base in [
            settings.paths.scratch_dir(),
            settings.paths.runtime_dir.join("tmp"),
        ] {
            crate::files::ensure_private_dir(&base).map_err(io::Error::other)?;
        }
        let mut engine = TaskEngine {
            members: MembershipSource::start(Arc::clone(&waker))?,
            disk: DiskWriter::start(waker)?,
            registry: registry.try_clone()?,
            settings,
            records: Vec::new(),
            live: HashMap::new(),
            tokens: HashMap::new(),
            stdin_tokens: HashMap::new(),
            pool,
            backlog: VecDeque::new(),
            budget_left: ITERATION_BUDGET,
            events: VecDeque::new(),
            leftovers: HashMap::new(),
            containment,
            watch,
            keys: HashMap::new(),
            next_key: 1,
            tickets: HashMap::new(),
            next_ticket: 1,
            shutting_down: false,
            warm_check: false,
            scratch: vec![0; READ_BUDGET],
            stream_events: Vec::new(),
            reports: Vec::new(),
            done: Vec::new(),
        };
        let mut changed = false;
        for r in records.iter_mut().filter(|r| r.state.is_running()) {
            let root = surviving_agent(r, "agent");
            log::warn!(
                "task {} was running when walkie stopped: marked interrupted",
                r.name
            );
            r.state = TaskState::Interrupted;
            r.ended_at.get_or_insert_with(crate::clock::now_rfc3339);
            r.pid = None;
            r.pid_start_time = None;
            r.error = Some("walkie stopped while it ran".into());
            r.summary = Some("walkie stopped while it ran".into());
            engine.stop_leftover(now, r, root);
            changed = true;
        }
        // Agents that waited, warm, for a follow-up when walkie stopped: their tasks had
        // finished and keep their outcome; what is left of the processes is stopped.
        for r in records
            .iter_mut()
            .filter(|r| !r.state.is_running() && (r.pid.is_some() || r.warm))
        {
            let root = surviving_agent(r, "warm agent");
            r.pid = None;
            r.pid_start_time = None;
            r.warm = false;
            engine.stop_leftover(now, r, root);
            changed = true;
        }
        // Task cgroups no record explains (a state file lost or moved aside).
        let strays: Vec<(String, PathBuf)> = engine
            .containment
            .cgroups()
            .map(|c| c.task_dirs())
            .unwrap_or_default()
            .into_iter()
            .filter(|(id, _)| !engine.has_leftover(id))
            .collect();
        for (id, _) in strays {
            let scope = Scope {
                task_id: id.clone(),
                root: None,
                cgroup: engine.cgroup_scope(&id),
                scan: false,
            };
            engine.add_leftover(now, format!("(cgroup task-{id})"), scope, None);
        }
        engine.records = records;
        engine.warn_memory_max();
        engine.tell_protocol();
        if changed {
            engine.events.push_back(TaskEvent::Changed);
        }
        Ok(engine)
    }

    pub fn update_settings(&mut self, settings: EngineSettings) {
        if settings.agent.containment != self.settings.agent.containment {
            log::warn!("SIGHUP: agent.containment takes effect when walkie restarts");
        }
        self.settings = settings;
        self.warn_memory_max();
        self.tell_protocol();
    }

    /// An `agent.command` from before the kept-open protocol (it holds `{prompt}`) runs
    /// one-shot: say so, and how to switch (start, reload).
    fn tell_protocol(&self) {
        if let (_, Some(notice)) = self.settings.agent.protocol_in_use() {
            log::warn!("{notice}");
        }
    }

    /// `agent.memory_max` is set but cannot apply here: say so once (start, reload).
    fn warn_memory_max(&self) {
        if self.settings.agent.memory_max_bytes().is_none() {
            return;
        }
        let problem = match &self.containment {
            Containment::Scan { reason } => format!("tasks are not in cgroups ({reason})"),
            Containment::Cgroup(c) => match c.memory_problem() {
                Some(p) => p.to_string(),
                None => return,
            },
        };
        log::warn!("agent.memory_max is not applied: {problem}");
    }

    pub fn records(&self) -> &[TaskRecord] {
        &self.records
    }

    pub fn running_count(&self) -> usize {
        self.records.iter().filter(|r| r.state.is_running()).count()
    }

    pub fn finished_count(&self) -> usize {
        self.records.len() - self.running_count()
    }

    /// How tasks are contained, for `walkie ctl status`.
    pub fn containment(&self) -> &Containment {
        &self.containment
    }

    /// Finds a task by exact name, unique prefix or word match (README.md, "Using it without a
    /// microphone").
    pub fn resolve(&self, reference: &str) -> Result<&TaskRecord, TaskError> {
        match names::resolve(reference, self.records.iter().map(|r| r.name.as_str())) {
            Resolution::Found(name) => self
                .records
                .iter()
                .find(|r| r.name == name)
                .ok_or_else(|| TaskError::NotFound(reference.to_string())),
            Resolution::Ambiguous(candidates) => Err(TaskError::Ambiguous {
                reference: reference.to_string(),
                candidates,
            }),
            Resolution::NotFound => Err(TaskError::NotFound(reference.to_string())),
        }
    }

    fn record_mut(&mut self, name: &str) -> Option<&mut TaskRecord> {
        self.records.iter_mut().find(|r| r.name == name)
    }

    /// Starts a new task. Returns its name.
    pub fn start(
        &mut self,
        prompt: &str,
        name: Option<&str>,
        project: Option<&str>,
        now: Instant,
    ) -> Result<String, TaskError> {
        let prompt = self.accept_prompt(prompt)?;
        self.check_limit()?;
        let project = project.map(str::trim).filter(|p| !p.is_empty());
        let project_dir = match project {
            Some(p) => Some(self.project_dir(p)?),
            None => None,
        };
        let taken: HashSet<String> = self.records.iter().map(|r| r.name.clone()).collect();
        // A name is said aloud and shown everywhere: never made of a secret's characters.
        let given = name.filter(|n| !n.trim().is_empty()).map(redact::redact);
        let name = names::derive_name(given.as_deref(), &redact::redact(prompt), &|n| {
            taken.contains(n)
        });
        let id = format!("{:016x}", fastrand::u64(..));
        let (cwd, scratch) = match project_dir {
            Some(dir) => (dir, false),
            None => (self.scratch_dir(&name, &id), true),
        };
        let launch = self.launch(prompt, &cwd.display().to_string(), None, now);
        let mut record = TaskRecord {
            name: name.clone(),
            id,
            state: TaskState::Running,
            project: project.map(str::to_string),
            cwd: cwd.display().to_string(),
            prompt: prompt.to_string(),
            pid: None,
            pid_start_time: None,
            started_at: crate::clock::now_rfc3339(),
            ended_at: None,
            exit_code: None,
            summary: None,
            session_id: None,
            files_changed: Vec::new(),
            result_text: None,
            error: None,
            cost_usd: None,
            runs: 1,
            warm: false,
        };
        self.spawn(&mut record, launch, scratch, now)?;
        self.records.push(record);
        self.prune();
        self.events.push_back(TaskEvent::Changed);
        Ok(name)
    }

    /// A follow-up in the task's agent session, same name, same directory: the next turn
    /// of a warm agent (same process), else a new process resuming the session. A
    /// kept-open agent that is working takes it in at its next step; a one-shot one is
    /// still running.
    pub fn continue_task(
        &mut self,
        reference: &str,
        prompt: &str,
        now: Instant,
    ) -> Result<(String, Delivery), TaskError> {
        self.deliver(reference, prompt, None, now)
    }

    /// `message_task`: text for the task's agent. Working, it takes it in at its next step
    /// (`now_priority`: its turn is interrupted first, and the text follows at the turn's
    /// end); warm, the text starts its next turn at once; finished, a new process resumes
    /// the session with it.
    pub fn message(
        &mut self,
        reference: &str,
        text: &str,
        now_priority: bool,
        now: Instant,
    ) -> Result<(String, Delivery), TaskError> {
        self.deliver(reference, text, Some(now_priority), now)
    }

    /// `steer`: Some for `message_task` (with its `now`), None for `continue_task`.
    fn deliver(
        &mut self,
        reference: &str,
        text: &str,
        steer: Option<bool>,
        now: Instant,
    ) -> Result<(String, Delivery), TaskError> {
        let text = self.accept_prompt(text)?;
        let record = self.resolve(reference)?.clone();
        let name = record.name.clone();
        if let Some(live) = self.live.get(&record.id) {
            let Some(session) = live.run.session() else {
                return Err(match steer {
                    Some(_) => TaskError::OneShot(name),
                    None => TaskError::StillRunning(name),
                });
            };
            if live.run.stop_reason().is_some() {
                return Err(TaskError::Agent {
                    name,
                    reason: "it is being stopped".into(),
                });
            }
            let delivery = if live.run.agent_alive() && session.is_running() {
                if steer == Some(true) {
                    Delivery::AfterInterrupt
                } else {
                    Delivery::NextStep
                }
            } else if live.run.idle_since().is_some() {
                Delivery::NextTurn
            } else {
                Delivery::AfterClose
            };
            if matches!(delivery, Delivery::NextTurn | Delivery::AfterClose) {
                self.check_limit()?;
            }
            let id = record.id.clone();
            let live = self.live.get_mut(&id).expect("looked up above");
            if delivery == Delivery::AfterClose {
                // The warm agent is on its way out: the session resumes in a new process
                // once it is gone (see `finish`).
                live.follow_up = Some(text.to_owned());
            } else {
                let session = live.run.session_mut().expect("kept open");
                let uuid = session
                    .send_message(text, steer == Some(true), now)
                    .map_err(|e| TaskError::Agent {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
                live.last_message = Some(uuid);
            }
            if matches!(delivery, Delivery::NextTurn | Delivery::AfterClose) {
                if let Some(r) = self.record_mut(&name) {
                    begin_run(r, text);
                }
                self.events.push_back(TaskEvent::Changed);
            }
            log::info!("task {name}: follow-up ({delivery:?})");
            self.drive(&id, now);
            return Ok((name, delivery));
        }
        if record.state.is_running() {
            return Err(TaskError::StillRunning(name));
        }
        let Some(session) = record.session_id.clone() else {
            return Err(TaskError::NoSession(name));
        };
        self.check_limit()?;
        let mut record = record;
        let launch = self.launch(text, &record.cwd, Some(&session), now);
        begin_run(&mut record, text);
        // The scratch directory of the first run may be gone (removed by hand): the child
        // creates it again rather than failing to start.
        let scratch = record.project.is_none() && !Path::new(&record.cwd).is_dir();
        self.spawn(&mut record, launch, scratch, now)?;
        if let Some(slot) = self.record_mut(&name) {
            *slot = record;
        }
        self.events.push_back(TaskEvent::Changed);
        Ok((name, Delivery::Resumed))
    }

    /// Ends the agent's current turn; its process and session stay for the next message.
    pub fn interrupt(&mut self, reference: &str, now: Instant) -> Result<String, TaskError> {
        let record = self.resolve(reference)?;
        let (name, id) = (record.name.clone(), record.id.clone());
        let Some(live) = self.live.get_mut(&id) else {
            return Err(TaskError::NotRunning(name));
        };
        if live.run.stop_reason().is_some() || !live.run.agent_alive() {
            return Err(TaskError::NotInTurn(name));
        }
        let Some(session) = live.run.session_mut() else {
            return Err(TaskError::OneShot(name));
        };
        session
            .interrupt(now)
            .map_err(|_| TaskError::NotInTurn(name.clone()))?;
        log::info!("task {name}: interrupting its turn");
        self.drive(&id, now);
        Ok(name)
    }

    /// Answers the permission request the task's agent waits on; returns the task's name
    /// and what was asked ("run `npm test`"). `consent`: None when the user answers
    /// themself (`walkie ctl approve`/`deny`); for the model, the requests the user has
    /// answered since they were announced (the conversation core keeps that rule): the
    /// oldest of the task's requests among them is answered, and none is an error.
    pub fn answer(
        &mut self,
        reference: &str,
        decision: Decision,
        consent: Option<&[String]>,
        now: Instant,
    ) -> Result<(String, String), TaskError> {
        let record = self.resolve(reference)?;
        let (name, id) = (record.name.clone(), record.id.clone());
        if self
            .live
            .get(&id)
            .is_some_and(|l| l.run.session().is_none())
        {
            // Its agent has no input to answer on: it was refused at once.
            return Err(TaskError::OneShot(name));
        }
        let session = self
            .live
            .get_mut(&id)
            .filter(|l| l.run.stop_reason().is_none())
            .and_then(|l| l.run.session_mut())
            .filter(|s| !s.pending_permissions().is_empty())
            .ok_or_else(|| TaskError::NotWaiting(name.clone()))?;
        let request_id = match consent {
            None => session.pending_permissions()[0].request_id.clone(),
            Some(answered) => session
                .pending_permissions()
                .iter()
                .find(|p| answered.contains(&p.request_id))
                .map(|p| p.request_id.clone())
                .ok_or_else(|| TaskError::NotAnswered(name.clone()))?,
        };
        let verdict = match &decision {
            Decision::Allow => "allowed",
            Decision::Always => "allowed (always)",
            Decision::Deny { .. } => "denied",
        };
        let permission =
            session
                .answer(&request_id, decision, now)
                .map_err(|e| TaskError::Agent {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
        let asked = format!("{} {}", permission.verb, permission.object);
        log::info!("task {name}: {verdict}: {asked}");
        self.events.push_back(TaskEvent::PermissionClosed {
            name: name.clone(),
            request_id,
            end: RequestEnd::Answered,
        });
        self.drive(&id, now);
        Ok((name, asked))
    }

    /// What the task's agent is doing, while it runs or waits warm for a follow-up.
    pub fn live_view(&self, record: &TaskRecord) -> Option<LiveView> {
        let live = self.live.get(&record.id)?;
        // The last sentence is redacted with the output around it: a key printed across two
        // messages has its second half alone in the last one.
        let output = live.tail.text();
        let Some(session) = live.run.session() else {
            return Some(LiveView {
                activity: Activity {
                    what: "working".into(),
                    since: live.started,
                    turns: 0,
                    last_sentence: live
                        .run
                        .parser()
                        .last_text()
                        .and_then(|text| claude::last_sentence(text, &output)),
                },
                waiting_for: None,
                last_message: None,
                warm: false,
                kept_open: false,
            });
        };
        Some(LiveView {
            activity: session.activity(&output),
            waiting_for: session
                .pending_permissions()
                .first()
                .map(|p| format!("{} {}", p.verb, p.object)),
            last_message: live
                .last_message
                .as_deref()
                .and_then(|uuid| session.message_status(uuid)),
            warm: live.run.idle_since().is_some(),
            kept_open: true,
        })
    }

    /// The registry as `walkie ctl tasks --json` shows it: each record with what its agent
    /// is doing now (`activity` in words, since when, turns so far, its last sentence, the
    /// request it waits on).
    pub fn tasks_json(&self, now: Instant) -> Vec<serde_json::Value> {
        self.records
            .iter()
            .map(|record| {
                let mut v = serde_json::to_value(record).unwrap_or(serde_json::Value::Null);
                let view = self.live_view(record);
                let activity = view.as_ref().map(|view| &view.activity);
                v["activity"] = serde_json::json!(activity.map(|a| &a.what));
                v["activity_since"] = serde_json::json!(activity.map(|a| rfc3339_at(now, a.since)));
                v["turns"] = serde_json::json!(activity.map(|a| a.turns));
                v["last_sentence"] =
                    serde_json::json!(activity.and_then(|a| a.last_sentence.as_ref()));
                v["waiting_for"] =
                    serde_json::json!(view.as_ref().and_then(|v| v.waiting_for.as_ref()));
                v
            })
            .collect()
    }

    /// Stops a task and all its descendants — a running one, or the warm agent of a
    /// finished one. Returns its name; `cancelled` is reported (as a
    /// [`TaskEvent::Finished`]) only once every process of a running task is gone; a warm
    /// agent's task keeps the outcome it had.
    pub fn cancel(&mut self, reference: &str, now: Instant) -> Result<String, TaskError> {
        let record = self.resolve(reference)?;
        let name = record.name.clone();
        let id = record.id.clone();
        let Some(live) = self.live.get_mut(&id) else {
            return Err(TaskError::NotRunning(name));
        };
        if live.follow_up.take().is_some() {
            // It waited for a warm agent to close: nothing of it ever ran.
            if let Some(r) = self.records.iter_mut().find(|r| r.id == id) {
                r.state = TaskState::Cancelled;
                r.summary = Some("cancelled".into());
                r.ended_at = Some(crate::clock::now_rfc3339());
            }
            self.events.push_back(TaskEvent::Finished {
                name: name.clone(),
                state: TaskState::Cancelled,
                summary: "cancelled".into(),
            });
            self.events.push_back(TaskEvent::Changed);
        }
        if let Some(live) = self.live.get_mut(&id) {
            live.run.handle_stop(now, StopReason::Cancel);
        }
        self.drive(&id, now);
        Ok(name)
    }

    /// Interrupts every running task (SIGTERM/SIGINT of walkie). [`TaskEngine::is_idle`]
    /// says when they are all gone.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        for id in self.live_ids() {
            if let Some(live) = self.live.get_mut(&id) {
                live.run.handle_stop(now, StopReason::Shutdown);
            }
            self.drive(&id, now);
        }
    }

    /// No task process left and no leftover of a previous run being cleaned up.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.leftovers.is_empty()
    }

    /// Last resort at the shutdown deadline: SIGKILL everything still known.
    pub fn kill_everything(&mut self, now: Instant) {
        for id in self.live_ids() {
            if let Some(live) = self.live.get_mut(&id) {
                live.run.handle_kill(now);
            }
            self.drive(&id, now);
        }
    }

    /// At exit: the writer finishes what is queued; walkie's shared cgroup subtree goes.
    pub fn close(&mut self) {
        self.disk.finish();
        self.containment.release();
    }

    /// Marks (or unmarks) a task as followed: its output is then queued as
    /// [`TaskEvent::Output`]. Returns false for an unknown or finished task.
    pub fn set_followed(&mut self, name: &str, followed: bool) -> bool {
        let Some(id) = self
            .records
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.id.clone())
        else {
            return false;
        };
        match self.live.get_mut(&id) {
            Some(live) => {
                if followed && !live.followed {
                    live.redactor = OutputRedactor::after(&live.tail.text());
                }
                live.followed = followed;
                true
            }
            None => false,
        }
    }

    /// The rendered output of a task: the in-memory tail while it runs; after, its log
    /// file, read back by the writer thread (behind every write queued for it).
    pub fn logs(&mut self, reference: &str) -> Result<Logs, TaskError> {
        let record = self.resolve(reference)?;
        let task = record.name.clone();
        if let Some(live) = self.live.get(&record.id) {
            return Ok(Logs::Now {
                task,
                text: redact::redact_log(&live.tail.text()),
                dropped: live.dropped,
            });
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let path = self.task_dir(&task).join("log.txt");
        self.disk.read_tail(path, TAIL_BYTES as u64, ticket);
        self.tickets.insert(ticket, task.clone());
        Ok(Logs::Later { task, ticket })
    }

    /// Path of a task's rendered log (told to users for the full output).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.task_dir(name).join("log.txt")
    }

    /// A plain-text registry summary for the model (context restore).
    pub fn context_summary(&self) -> String {
        let mut out = String::new();
        for r in self.records.iter().rev().take(20).rev() {
            out.push_str(&format!("- {} ({}", r.name, r.state.as_str()));
            if let Some(p) = &r.project {
                out.push_str(&format!(", project {p}"));
            }
            out.push_str(&format!(
                "): {}",
                redact::excerpt(&r.prompt, 160, Keep::Head)
            ));
            if let Some(s) = &r.summary {
                out.push_str(&format!(" — {s}"));
            }
            out.push('\n');
        }
        out
    }

    pub fn poll_event(&mut self) -> Option<TaskEvent> {
        self.events.pop_front()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let runs = self.live.values().filter_map(|l| l.run.poll_timeout());
        let leftovers = self
            .leftovers
            .values()
            .filter_map(|l| l.core.poll_timeout());
        runs.chain(leftovers).min()
    }

    /// A pipe had more to read than one budget: the loop should poll without waiting and
    /// call [`TaskEngine::service_backlog`].
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// True when `token` is one of the engine's.
    pub fn owns(token: Token) -> bool {
        token.0 >= TASK_PIPES
    }

    /// Readiness on a task pipe or on the cgroup watch.
    pub fn on_ready(&mut self, token: Token, now: Instant) {
        if self.watch.as_ref().is_some_and(|w| w.token == token) {
            self.on_cgroup_events(now);
        } else if let Some(id) = self.stdin_tokens.get(&token).cloned() {
            // A kept-open agent's stdin took what it could not before.
            self.drive(&id, now);
        } else {
            self.read_pipe(token, now);
        }
    }

    /// A new iteration of the loop: the byte budget is whole again.
    pub fn begin_iteration(&mut self) {
        self.budget_left = ITERATION_BUDGET;
    }

    /// Reads the pipes left with something to give, oldest first, as far as this
    /// iteration's budget goes.
    pub fn service_backlog(&mut self, now: Instant) {
        for _ in 0..self.backlog.len() {
            if self.budget_left == 0 {
                break;
            }
            let Some(token) = self.backlog.pop_front() else {
                break;
            };
            self.read_pipe(token, now);
        }
    }

    /// `token` has more to read than it was given: it waits its turn (once).
    fn defer(&mut self, token: Token) {
        if !self.backlog.contains(&token) {
            self.backlog.push_back(token);
        }
    }

    fn forget_backlog(&mut self, token: Token) {
        self.backlog.retain(|t| *t != token);
    }

    /// The helper threads woke the loop: membership reports and read-back logs.
    pub fn on_wake(&mut self, now: Instant) {
        let mut reports = std::mem::take(&mut self.reports);
        self.members.take_reports(&mut reports);
        for report in reports.drain(..) {
            self.on_report(report, now);
        }
        self.reports = reports;
        let mut done = std::mem::take(&mut self.done);
        self.disk.take_done(&mut done);
        for d in done.drain(..) {
            match d {
                Done::Tail { ticket, text } => {
                    if let Some(task) = self.tickets.remove(&ticket) {
                        self.events
                            .push_back(TaskEvent::LogsRead { ticket, task, text });
                    }
                }
            }
        }
        self.done = done;
    }

    /// SIGCHLD: reaps every exited child — agents and orphaned descendants alike — in one
    /// place, routing each status to its task by pid.
    pub fn reap(&mut self, now: Instant) {
        loop {
            match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(pid.as_raw(), ExitInfo::Code(code), now)
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid.as_raw(), ExitInfo::Signal(sig as i32), now)
                }
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                // ECHILD: no children at all.
                Err(_) => break,
            }
        }
    }

    pub fn on_timeout(&mut self, now: Instant) {
        let due: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.run.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(live) = self.live.get_mut(&id) {
                live.run.handle_timeout(now);
            }
            self.drive(&id, now);
        }
        let due: Vec<u64> = self
            .leftovers
            .iter()
            .filter(|(_, l)| l.core.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(l) = self.leftovers.get_mut(&key) {
                l.core.handle_timeout(now);
            }
            self.drive_leftover(key);
        }
    }

    // ---- driving the cores ----

    fn live_ids(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }

    /// Carries out what run `id` asked for, then records what it reported, until it has
    /// nothing more to say; then writes what its session has for the agent's stdin.
    fn drive(&mut self, id: &str, now: Instant) {
        loop {
            let Some(live) = self.live.get_mut(id) else {
                return;
            };
            if let Some(action) = live.run.poll_action() {
                self.act(id, action, now);
                continue;
            }
            match live.run.poll_event() {
                Some(Event::Started { .. }) => {
                    let name = live.name.clone();
                    self.events.push_back(TaskEvent::Started { name });
                }
                Some(Event::TurnFinished(outcome)) => self.turn_finished(id, outcome),
                Some(Event::Session(event)) => self.session_event(id, event),
                Some(Event::Finished(outcome)) => {
                    self.finish(id, outcome, now);
                    return;
                }
                None => break,
            }
        }
        self.flush_stdin(id);
        self.sync_state(id);
        if std::mem::take(&mut self.warm_check) {
            self.limit_warm(now);
        }
    }

    /// Writes what the session of a kept-open run has for its agent's stdin, without
    /// waiting: what the pipe does not take waits for WRITABLE. Drops the pipe (EOF) once
    /// the session is closed and everything is written, or when the agent is gone (EPIPE).
    fn flush_stdin(&mut self, id: &str) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        let (Some(session), Some(pipe)) = (live.run.session_mut(), live.stdin.as_mut()) else {
            return;
        };
        let mut broken = None;
        while !session.stdin_pending().is_empty() {
            match pipe.tx.write(session.stdin_pending()) {
                Ok(n) => session.stdin_written(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        let close = broken.is_some() || session.wants_stdin_closed();
        let writable = !close && !session.stdin_pending().is_empty();
        if close {
            let mut pipe = live.stdin.take().expect("matched above");
            if pipe.registered {
                let _ = self.registry.deregister(&mut pipe.tx);
            }
            self.stdin_tokens.remove(&pipe.token);
            self.pool.release(pipe.token);
            match broken {
                // The agent closed its stdin or is gone: its exit finishes the run.
                Some(e) => log::warn!(
                    "task {}: the agent stopped reading its input ({e})",
                    live.name
                ),
                None => log::info!("task {}: closed its agent's input", live.name),
            }
        } else if writable != pipe.registered {
            let done = if writable {
                self.registry
                    .register(&mut pipe.tx, pipe.token, Interest::WRITABLE)
            } else {
                self.registry.deregister(&mut pipe.tx)
            };
            match done {
                Ok(()) => pipe.registered = writable,
                Err(e) => log::error!("task {}: cannot watch the agent's input: {e}", live.name),
            }
        }
    }

    /// A kept-open run's record follows its session: `running` or `waiting` while a turn
    /// runs, `warm` while it waits for a follow-up.
    fn sync_state(&mut self, id: &str) {
        let Some(live) = self.live.get(id) else {
            return;
        };
        let Some(session) = live.run.session() else {
            return;
        };
        let busy =
            live.run.stop_reason().is_none() && live.run.agent_alive() && session.is_running();
        let waiting = !session.pending_permissions().is_empty();
        let warm = live.run.idle_since().is_some();
        let Some(record) = self.records.iter_mut().find(|r| r.id == id) else {
            return;
        };
        let mut changed = false;
        if busy {
            let state = if waiting {
                TaskState::Waiting
            } else {
                TaskState::Running
            };
            if record.state != state {
                if !record.state.is_running() {
                    // A turn the agent started on its own (a late message): running again.
                    record.ended_at = None;
                    record.exit_code = None;
                }
                record.state = state;
                changed = true;
            }
        }
        if record.warm != warm {
            record.warm = warm;
            changed = true;
        }
        if changed {
            self.events.push_back(TaskEvent::Changed);
        }
    }

    /// At most `agent.max_warm` agents wait for a follow-up: the ones idle longest are
    /// closed.
    fn limit_warm(&mut self, now: Instant) {
        let max = self.settings.agent.max_warm as usize;
        let mut idle: Vec<(Instant, String)> = self
            .live
            .iter()
            .filter_map(|(id, l)| Some((l.run.idle_since()?, id.clone())))
            .collect();
        if idle.len() <= max {
            return;
        }
        idle.sort();
        let excess = idle.len() - max;
        for (_, id) in idle.into_iter().take(excess) {
            if let Some(live) = self.live.get_mut(&id) {
                log::info!(
                    "task {}: closing its warm agent (agent.max_warm = {max})",
                    live.name
                );
                live.run.handle_close(now);
            }
            self.drive(&id, now);
        }
    }

    /// A turn of a kept-open run ended with nothing queued: its outcome is the task's, told
    /// like a run's end; the agent stays warm for a follow-up.
    fn turn_finished(&mut self, id: &str, outcome: Outcome) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        let outcome = scrub_outcome(outcome, &live.tail.text());
        let (state, summary) = (outcome.state, outcome.summary.clone());
        self.disk.note(
            &live.logs.text,
            &format!("=== {}: {summary}\n", state.as_str()),
        );
        let Some(record) = self.records.iter_mut().find(|r| r.id == id) else {
            return;
        };
        // The process lives on, waiting for a follow-up: no exit code yet.
        write_outcome(
            record,
            Outcome {
                exit_code: None,
                ..outcome
            },
        );
        let name = record.name.clone();
        log::info!(
            "task {name} {}: {summary} (its agent waits for a follow-up)",
            state.as_str()
        );
        self.events.push_back(TaskEvent::Finished {
            name,
            state,
            summary,
        });
        self.events.push_back(TaskEvent::Changed);
        self.warm_check = true;
    }

    /// What a kept-open agent's session reported: permission requests go to the
    /// conversation; the rest is logged (`task_status` reads receipts when asked).
    fn session_event(&mut self, id: &str, event: SessionEvent) {
        let Some(live) = self.live.get(id) else {
            return;
        };
        let name = live.name.clone();
        match event {
            SessionEvent::PermissionRequested { request_id } => {
                let Some(p) = live.run.session().and_then(|s| {
                    s.pending_permissions()
                        .iter()
                        .find(|p| p.request_id == request_id)
                }) else {
                    return;
                };
                log::info!("task {name} asks to {} {}", p.verb, p.object);
                // Said aloud: a command is read as words, not as code.
                let object = p.object.replace('`', "");
                self.events.push_back(TaskEvent::PermissionAsked {
                    name,
                    request_id,
                    verb: p.verb.to_owned(),
                    object,
                });
            }
            SessionEvent::PermissionWithdrawn { request_id } => {
                log::info!("task {name}: its permission request was withdrawn");
                self.events.push_back(TaskEvent::PermissionClosed {
                    name,
                    request_id,
                    end: RequestEnd::Withdrawn,
                });
            }
            SessionEvent::PermissionTimedOut { request_id } => {
                log::warn!("task {name}: nobody answered its permission request: denied");
                self.events.push_back(TaskEvent::PermissionClosed {
                    name,
                    request_id,
                    end: RequestEnd::TimedOut,
                });
            }
            SessionEvent::MessageTakenIn { .. } => {
                log::debug!("task {name}: the agent took in a message")
            }
            SessionEvent::MessageDropped { .. } => {
                log::warn!("task {name}: the agent went idle without taking in a message")
            }
            SessionEvent::InterruptAnswered { error: None } => {
                log::info!("task {name}: the agent is ending its turn")
            }
            SessionEvent::InterruptAnswered { error: Some(e) } => {
                log::warn!("task {name}: the agent refused the interrupt: {e}")
            }
            SessionEvent::Refused { subtype, .. } => log::warn!(
                "task {name}: answered the agent's {subtype:?} control request with an error (walkie does not handle it)"
            ),
            SessionEvent::TurnEnded { .. } | SessionEvent::Idle => {}
        }
    }

    fn act(&mut self, id: &str, action: Action, now: Instant) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        match action {
            // Spawning happens in `spawn`, before the run is live.
            Action::Spawn => {}
            Action::Signal {
                target: Target::Group,
                signal,
            } => {
                // The core asks only while the agent is unreaped: its group id is its own.
                if live.run.agent_alive() {
                    let _ = nix::sys::signal::killpg(Pid::from_raw(live.pid), signal);
                }
            }
            Action::Signal {
                target: Target::Agent,
                signal,
            } => {
                if let Some(fd) = &live.pidfd {
                    let _ = crate::sys::process::pidfd_send_signal(fd, signal);
                }
            }
            Action::Probe { signal } => {
                let scope = Scope {
                    task_id: live.id.clone(),
                    root: match (live.run.agent_alive(), live.start_time) {
                        (true, Some(start)) => Some((live.pid, start)),
                        _ => None,
                    },
                    cgroup: live.cgroup.clone(),
                    scan: live.cgroup.is_none(),
                };
                self.members.probe(live.key, scope, signal);
            }
            Action::ClosePipes => {
                for pipe in [Pipe::Stdout, Pipe::Stderr] {
                    self.close_pipe(id, pipe, now);
                }
            }
        }
    }

    fn on_report(&mut self, report: Report, now: Instant) {
        if let Some(id) = self.keys.get(&report.key).cloned() {
            if let Some(live) = self.live.get_mut(&id) {
                if report.stuck > 0 {
                    log::warn!(
                        "task {}: {} process(es) in uninterruptible sleep (D state)",
                        live.name,
                        report.stuck
                    );
                }
                live.run.handle_members(now, report.members);
                self.drive(&id, now);
            }
        } else if let Some(l) = self.leftovers.get_mut(&report.key) {
            if report.members.alive > 0 {
                log::warn!(
                    "task {}: stopping {} leftover process(es) of the previous run",
                    l.name,
                    report.members.alive
                );
            }
            l.core.handle_members(now, report.members);
            self.drive_leftover(report.key);
        }
    }

    fn on_cgroup_events(&mut self, now: Instant) {
        let mut changed = Vec::new();
        if let Some(watch) = self.watch.as_ref() {
            // Drain to EAGAIN (edge-triggered).
            while let Ok(events) = watch.inotify.read_events() {
                if events.is_empty() {
                    break;
                }
                for ev in events {
                    if let Some(id) = watch.tasks.get(&ev.wd) {
                        changed.push(id.clone());
                    }
                }
            }
        }
        changed.dedup();
        for id in changed {
            if let Some(live) = self.live.get_mut(&id) {
                live.run.handle_members_changed(now);
            }
            self.drive(&id, now);
        }
    }

    /// Stops what is left of a recorded task's processes from before this start: its
    /// surviving agent (`root`), its cgroup, and whatever carries its marker.
    fn stop_leftover(&mut self, now: Instant, r: &TaskRecord, root: Option<(i32, u64)>) {
        let scope = Scope {
            task_id: r.id.clone(),
            root,
            cgroup: self.cgroup_scope(&r.id),
            scan: true,
        };
        self.add_leftover(now, r.name.clone(), scope, root.map(|(p, _)| p));
    }

    fn add_leftover(&mut self, now: Instant, name: String, scope: Scope, root: Option<i32>) {
        let key = self.next_key;
        self.next_key += 1;
        let core = Leftover::new(now, root.is_some());
        self.leftovers.insert(
            key,
            LeftoverRun {
                name,
                scope,
                root,
                core,
            },
        );
        self.drive_leftover(key);
    }

    fn has_leftover(&self, id: &str) -> bool {
        self.leftovers.values().any(|l| l.scope.task_id == id)
    }

    fn drive_leftover(&mut self, key: u64) {
        let Some(l) = self.leftovers.get_mut(&key) else {
            return;
        };
        while let Some(action) = l.core.poll_action() {
            match action {
                Action::Signal {
                    target: Target::Group,
                    signal,
                } => {
                    if let Some(pid) = l.root {
                        let _ = nix::sys::signal::killpg(Pid::from_raw(pid), signal);
                    }
                }
                Action::Probe { signal } => self.members.probe(key, l.scope.clone(), signal),
                _ => {}
            }
        }
        if l.core.is_done() {
            let l = self.leftovers.remove(&key).expect("present");
            if l.core.stragglers() > 0 {
                log::error!(
                    "task {}: {} leftover process(es) would not die",
                    l.name,
                    l.core.stragglers()
                );
            } else {
                log::info!("task {}: no process of the previous run is left", l.name);
            }
            if let Some(cg) = l.scope.cgroup {
                self.members.remove_cgroup(cg.dir);
            }
            let tmpdir = self
                .settings
                .paths
                .runtime_dir
                .join("tmp")
                .join(&l.scope.task_id);
            self.disk.remove_all(tmpdir);
        }
    }

    // ---- pipes ----

    fn read_pipe(&mut self, token: Token, now: Instant) {
        let Some((id, pipe)) = self.tokens.get(&token).cloned() else {
            return;
        };
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        let slot = match pipe {
            Pipe::Stdout => &mut live.stdout,
            Pipe::Stderr => &mut live.stderr,
        };
        let Some((_, rx)) = slot.as_mut() else { return };
        let budget = READ_BUDGET.min(self.budget_left);
        if budget == 0 {
            // Edge-triggered: nothing more comes for it until it is read.
            self.defer(token);
            return;
        }
        let mut total = 0;
        let mut eof = false;
        while total < budget {
            match rx.read(&mut self.scratch[total..budget]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("task {}: reading agent {pipe:?}: {e}", live.name);
                    eof = true;
                    break;
                }
            }
        }
        self.budget_left -= total;
        if total >= budget && !eof {
            self.defer(token);
        }
        let data = std::mem::take(&mut self.scratch);
        self.take_output(&id, pipe, &data[..total], now);
        self.scratch = data;
        if eof {
            self.close_pipe(&id, pipe, now);
        }
    }

    /// Reads what is left in a pipe without waiting, closes it and tells the core.
    fn close_pipe(&mut self, id: &str, pipe: Pipe, now: Instant) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        let slot = match pipe {
            Pipe::Stdout => &mut live.stdout,
            Pipe::Stderr => &mut live.stderr,
        };
        let Some((token, mut rx)) = slot.take() else {
            return;
        };
        let _ = self.registry.deregister(&mut rx);
        self.tokens.remove(&token);
        self.forget_backlog(token);
        self.pool.release(token);
        // What is buffered now, not what a stray still writing could add forever.
        let mut rest = Vec::new();
        let _ = (&mut rx).take(CLOSE_DRAIN_MAX).read_to_end(&mut rest);
        drop(rx);
        self.take_output(id, pipe, &rest, now);
        let mut events = std::mem::take(&mut self.stream_events);
        events.clear();
        if let Some(live) = self.live.get_mut(id) {
            live.run.handle_eof(now, pipe, &mut events);
            let mut rendered = String::new();
            for ev in &events {
                render(ev, &mut rendered);
            }
            if pipe == Pipe::Stderr && !live.stderr_line.is_empty() {
                rendered.push_str("[stderr] ");
                rendered.push_str(&String::from_utf8_lossy(&live.stderr_line));
                rendered.push('\n');
                live.stderr_line.clear();
            }
            emit_output(live, &self.disk, &mut self.events, &rendered);
        }
        self.stream_events = events;
        self.drive(id, now);
    }

    /// Output bytes of one pipe: to the log files (through the writer), the core, the
    /// in-memory tail and the followers.
    fn take_output(&mut self, id: &str, pipe: Pipe, data: &[u8], now: Instant) {
        if data.is_empty() {
            return;
        }
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        let mut rendered = String::new();
        match pipe {
            Pipe::Stdout => {
                if !self.disk.append(&live.logs.raw, data) {
                    live.dropped += data.len() as u64;
                }
                let mut events = std::mem::take(&mut self.stream_events);
                events.clear();
                live.run.handle_output(now, pipe, data, &mut events);
                for ev in &events {
                    render(ev, &mut rendered);
                }
                self.stream_events = events;
            }
            Pipe::Stderr => {
                if !self.disk.append(&live.logs.err, data) {
                    live.dropped += data.len() as u64;
                }
                for &b in data {
                    if b == b'\n' {
                        rendered.push_str("[stderr] ");
                        rendered.push_str(&String::from_utf8_lossy(&live.stderr_line));
                        rendered.push('\n');
                        live.stderr_line.clear();
                    } else if live.stderr_line.len() < STDERR_LINE {
                        live.stderr_line.push(b);
                    }
                }
            }
        }
        emit_output(live, &self.disk, &mut self.events, &rendered);
        let session = live.run.parser().session_id().map(str::to_string);
        if let Some(session) = session {
            let name = live.name.clone();
            if let Some(r) = self.record_mut(&name) {
                if r.session_id.as_deref() != Some(session.as_str()) {
                    r.session_id = Some(session);
                    self.events.push_back(TaskEvent::Changed);
                }
            }
        }
        self.drive(id, now);
    }

    // ---- exits and the end of a run ----

    fn on_exit(&mut self, pid: i32, exit: ExitInfo, now: Instant) {
        let Some(id) = self
            .live
            .iter()
            .find(|(_, l)| l.pid == pid && l.run.agent_alive())
            .map(|(id, _)| id.clone())
        else {
            log::debug!("reaped orphan pid {pid} ({exit:?})");
            return;
        };
        let live = self.live.get_mut(&id).expect("found above");
        live.pidfd = None;
        live.run.handle_exit(now, exit);
        self.drive(&id, now);
    }

    /// Records the outcome the core decided and retires the run; a follow-up that waited
    /// for it starts.
    fn finish(&mut self, id: &str, outcome: Outcome, now: Instant) {
        let Some(mut live) = self.live.remove(id) else {
            return;
        };
        self.keys.remove(&live.key);
        for (token, mut rx) in [live.stdout.take(), live.stderr.take()]
            .into_iter()
            .flatten()
        {
            let _ = self.registry.deregister(&mut rx);
            self.tokens.remove(&token);
            self.forget_backlog(token);
            self.pool.release(token);
        }
        if let Some(mut pipe) = live.stdin.take() {
            if pipe.registered {
                let _ = self.registry.deregister(&mut pipe.tx);
            }
            self.stdin_tokens.remove(&pipe.token);
            self.pool.release(pipe.token);
        }
        // Requests nobody can answer any more (the process is gone).
        for p in live
            .run
            .session()
            .map(|s| s.pending_permissions())
            .unwrap_or_default()
        {
            self.events.push_back(TaskEvent::PermissionClosed {
                name: live.name.clone(),
                request_id: p.request_id.clone(),
                end: RequestEnd::Withdrawn,
            });
        }
        let follow_up = live.follow_up.take();
        if outcome.reported {
            self.retire_quietly(live, outcome);
        } else {
            self.record_outcome(live, outcome);
        }
        if let Some(text) = follow_up {
            self.resume_after_close(id, &text, now);
        }
        self.prune();
    }

    /// The end of an agent that waited, warm, for a follow-up: its task keeps the outcome
    /// its last turn reported; only the process is gone.
    fn retire_quietly(&mut self, mut live: Live, outcome: Outcome) {
        let describe = match outcome.exit_code {
            Some(code) if code > 128 => format!("was killed by signal {}", code - 128),
            Some(code) => format!("exited with code {code}"),
            None => "is gone".into(),
        };
        self.disk.note(
            &live.logs.text,
            &format!("=== the agent process {describe}\n"),
        );
        self.disk.close(live.logs.dir.clone());
        self.disk.remove_all(live.tmpdir.clone());
        self.release_cgroup(&mut live, outcome.stragglers);
        let Some(record) = self.records.iter_mut().find(|r| r.id == live.id) else {
            return;
        };
        record.pid = None;
        record.pid_start_time = None;
        record.warm = false;
        record.exit_code = outcome.exit_code;
        for f in outcome.files_changed {
            if !record.files_changed.contains(&f) {
                record.files_changed.push(f);
            }
        }
        log::info!("task {}: its warm agent {describe}", record.name);
        self.events.push_back(TaskEvent::Changed);
    }

    fn release_cgroup(&mut self, live: &mut Live, stragglers: usize) {
        if let Some(cg) = live.cgroup.take() {
            if let (Some(watch), Some(wd)) = (self.watch.as_mut(), live.watch.take()) {
                watch.tasks.remove(&wd);
                let _ = watch.inotify.rm_watch(wd);
            }
            if stragglers == 0 {
                self.members.remove_cgroup(cg.dir);
            }
        }
    }

    /// A follow-up came while the task's warm agent was closing: the session resumes in a
    /// new process now that the old one is gone.
    fn resume_after_close(&mut self, id: &str, text: &str, now: Instant) {
        let Some(mut record) = self.records.iter().find(|r| r.id == id).cloned() else {
            return;
        };
        let started = match record.session_id.clone() {
            Some(session) => {
                let launch = self.launch(text, &record.cwd, Some(&session), now);
                let scratch = record.project.is_none() && !Path::new(&record.cwd).is_dir();
                self.spawn(&mut record, launch, scratch, now)
            }
            None => Err(TaskError::NoSession(record.name.clone())),
        };
        if let Err(e) = started {
            let summary = redact::speech_summary(&e.to_string(), 300);
            log::warn!("task {}: the follow-up could not start: {e}", record.name);
            record.state = TaskState::Failed;
            record.ended_at = Some(crate::clock::now_rfc3339());
            record.error = Some(summary.clone());
            record.summary = Some(summary.clone());
            self.events.push_back(TaskEvent::Finished {
                name: record.name.clone(),
                state: TaskState::Failed,
                summary,
            });
        }
        if let Some(slot) = self.records.iter_mut().find(|r| r.id == id) {
            *slot = record;
        }
        self.events.push_back(TaskEvent::Changed);
    }

    /// Records the outcome of a run that ended.
    fn record_outcome(&mut self, mut live: Live, outcome: Outcome) {
        let outcome = scrub_outcome(outcome, &live.tail.text());
        let (state, summary) = (outcome.state, outcome.summary.clone());
        if live.dropped > 0 {
            self.disk.note(
                &live.logs.text,
                &format!("{}\n", dropped_note(live.dropped)),
            );
        }
        self.disk.note(
            &live.logs.text,
            &format!("=== {}: {summary}\n", state.as_str()),
        );
        self.disk.close(live.logs.dir.clone());
        // The agent's temp files are its own business.
        self.disk.remove_all(live.tmpdir.clone());
        self.release_cgroup(&mut live, outcome.stragglers);
        let Some(record) = self.records.iter_mut().find(|r| r.id == live.id) else {
            return;
        };
        record.warm = false;
        record.pid = None;
        record.pid_start_time = None;
        write_outcome(record, outcome);
        let name = record.name.clone();
        log::info!("task {name} {}: {summary}", state.as_str());
        self.events.push_back(TaskEvent::Finished {
            name,
            state,
            summary,
        });
        self.events.push_back(TaskEvent::Changed);
    }

    // ---- starting ----

    /// The trimmed prompt of a new run, unless walkie is stopping or the prompt is empty.
    fn accept_prompt<'p>(&self, prompt: &'p str) -> Result<&'p str, TaskError> {
        if self.shutting_down {
            return Err(TaskError::ShuttingDown);
        }
        Some(prompt.trim())
            .filter(|p| !p.is_empty())
            .ok_or(TaskError::EmptyPrompt)
    }

    fn check_limit(&self) -> Result<(), TaskError> {
        let running: Vec<String> = self
            .records
            .iter()
            .filter(|r| r.state.is_running())
            .map(|r| r.name.clone())
            .collect();
        let limit = self.settings.agent.max_running;
        if running.len() >= limit as usize {
            return Err(TaskError::Limit { limit, running });
        }
        Ok(())
    }

    fn project_dir(&self, name: &str) -> Result<PathBuf, TaskError> {
        let key = names::sanitize(name);
        let dir = self
            .settings
            .projects
            .get(name)
            .or_else(|| self.settings.projects.get(&key))
            .ok_or_else(|| TaskError::UnknownProject {
                name: name.to_string(),
                known: self.settings.projects.keys().cloned().collect(),
            })?;
        if !dir.is_dir() {
            return Err(TaskError::ProjectMissing {
                name: name.to_string(),
                path: dir.display().to_string(),
            });
        }
        Ok(dir.clone())
    }

    /// Where a task without a project works; the child creates it.
    fn scratch_dir(&self, name: &str, id: &str) -> PathBuf {
        let base = self.settings.paths.scratch_dir();
        let dir = base.join(name);
        if dir.exists() {
            // A pruned task of the same name left its work here: never mix the two.
            return base.join(format!("{name}-{}", &id[..6]));
        }
        dir
    }

    fn task_dir(&self, name: &str) -> PathBuf {
        self.settings.paths.tasks_dir().join(name)
    }

    fn cgroup_scope(&self, id: &str) -> Option<CgroupScope> {
        let cg = self.containment.cgroups()?;
        let dir = cg.task_dir(id);
        Some(CgroupScope {
            path: cg.hierarchy_path(&dir),
            dir,
            kill_file: cg.kill_file(),
        })
    }

    /// How a run of `prompt` starts with the protocol in use. Kept open: `agent.command`,
    /// the protocol's flags (the permission mode as configured), `agent.resume` for a
    /// follow-up, and the prompt queued as the first user line — never in argv, so never in
    /// `ps`. One-shot: `{prompt}` in the command, as before.
    fn launch(&self, prompt: &str, cwd: &str, resume: Option<&str>, now: Instant) -> Launch {
        let agent = &self.settings.agent;
        match agent.protocol_in_use().0 {
            AgentProtocol::Claude => {
                let mut argv = agent.command.clone();
                argv.extend(claude::agent_args(&agent.permission_mode));
                if let Some(session) = resume {
                    argv.extend(expand(&agent.resume, "", Some(session)));
                }
                let session = ClaudeSession::new(
                    prompt,
                    cwd,
                    Duration::from_secs(agent.approval_timeout_s),
                    fastrand::u64(..),
                    now,
                );
                Launch {
                    argv,
                    session: Some(session),
                }
            }
            AgentProtocol::Oneshot => {
                let mut argv = expand(&agent.command, prompt, None);
                if let Some(session) = resume {
                    argv.extend(expand(&agent.resume, prompt, Some(session)));
                }
                Launch {
                    argv,
                    session: None,
                }
            }
        }
    }

    fn environment(
        &self,
        record: &TaskRecord,
        tmpdir: &Path,
        kept_open: bool,
    ) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in &self.settings.agent.env_pass {
            if let Ok(v) = std::env::var(var) {
                env.insert(var.clone(), v);
            }
        }
        for (k, v) in &self.settings.agent.env_set {
            env.insert(k.clone(), v.clone());
        }
        // The OpenAI key must never reach an agent, whatever the configuration says.
        env.remove(&self.settings.openai_key_var);
        env.remove("OPENAI_API_KEY");
        env.insert("TMPDIR".into(), tmpdir.display().to_string());
        env.insert(MARKER_VAR.into(), record.id.clone());
        if kept_open {
            // Session-state lines say when queued messages have all been handled.
            let (var, value) = claude::SESSION_STATE_ENV;
            env.insert(var.into(), value.into());
        }
        env.into_iter().collect()
    }

    /// Starts a run of `record`: its cgroup, the fork/exec, its pipes on the loop.
    /// `new_cwd`: the working directory does not exist yet and the child creates it.
    fn spawn(
        &mut self,
        record: &mut TaskRecord,
        launch: Launch,
        new_cwd: bool,
        now: Instant,
    ) -> Result<(), TaskError> {
        let Launch { argv, session } = launch;
        let Some((program, args)) = argv.split_first() else {
            return Err(TaskError::Spawn("agent.command is empty".into()));
        };
        let settings = lifecycle::Settings {
            cancel_grace: Duration::from_millis(self.settings.agent.cancel_grace_ms),
            sweep_grace: Duration::from_millis(self.settings.agent.cancel_grace_ms)
                .min(SWEEP_GRACE_MAX),
            watched: self.watch.is_some(),
            output: OutputKind::of_command(&argv),
            warm: Duration::from_secs(self.settings.agent.warm_s),
        };
        let kept_open = session.is_some();
        let mut run = match session {
            Some(session) => Lifecycle::kept_open(settings, session),
            None => Lifecycle::new(settings),
        };
        if run.poll_action() != Some(Action::Spawn) {
            return Err(TaskError::Spawn(
                "internal: the run did not ask to start".into(),
            ));
        }
        let tmpdir = self.settings.paths.runtime_dir.join("tmp").join(&record.id);
        let cgroup = match self.containment.cgroups() {
            Some(cg) => Some(
                cg.create_task(&record.id, self.settings.agent.memory_max_bytes())
                    .map_err(|e| {
                        TaskError::Spawn(format!(
                            "cannot create its cgroup {}: {e}",
                            cg.task_dir(&record.id).display()
                        ))
                    })?,
            ),
            None => None,
        };
        let cwd = PathBuf::from(&record.cwd);
        let mut make_dirs = vec![tmpdir.as_path()];
        if new_cwd {
            make_dirs.insert(0, cwd.as_path());
        }
        let (cgroup_dir, cgroup_fd) = match cgroup {
            Some((dir, fd)) => (Some(dir), Some(fd)),
            None => (None, None),
        };
        let spawned = crate::sys::process::spawn_agent(&crate::sys::process::AgentSpawn {
            program,
            args,
            env: &self.environment(record, &tmpdir, kept_open),
            cwd: &cwd,
            make_dirs: &make_dirs,
            death_signal: Signal::SIGTERM,
            nice: AGENT_NICE,
            cgroup: cgroup_fd.as_ref(),
            stdin: if kept_open {
                ChildIo::Pipe
            } else {
                ChildIo::Null
            },
            stdout: ChildIo::Pipe,
            stderr: ChildIo::Pipe,
        });
        drop(cgroup_fd);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(dir) = cgroup_dir {
                    self.members.remove_cgroup(dir);
                }
                self.disk.remove_all(tmpdir);
                if new_cwd {
                    self.disk.remove_all(cwd);
                }
                return Err(TaskError::Spawn(if e.is_not_found() {
                    format!("{program}: command not found (agent.command, PATH)")
                } else {
                    format!("{program}: {e}")
                }));
            }
        };
        let pid = child.pid;
        // The child is reaped by `reap` (waitpid(-1)).
        let stdout = child.stdout.map(Receiver::from);
        let stderr = child.stderr.map(Receiver::from);
        // Registered for WRITABLE only while the session has bytes the pipe did not take
        // (see `flush_stdin`); without a token or non-blocking mode it is dropped: the
        // agent sees EOF and ends.
        let stdin = child.stdin.map(Sender::from).and_then(|tx| {
            let token = tx
                .set_nonblocking(true)
                .ok()
                .and_then(|()| self.pool.take());
            match token {
                Some(token) => Some(StdinPipe {
                    token,
                    tx,
                    registered: false,
                }),
                None => {
                    log::error!("task {}: cannot keep the agent's input open", record.name);
                    None
                }
            }
        });
        let pidfd = child.pidfd;
        let start_time = proc::stat(pid).map(|s| s.start_time);
        record.pid = Some(pid);
        record.pid_start_time = start_time;
        run.handle_spawned(now, pid);
        let key = self.next_key;
        self.next_key += 1;
        let cgroup = cgroup_dir.and_then(|_| self.cgroup_scope(&record.id));
        let watch = match (&cgroup, self.watch.as_mut()) {
            (Some(cg), Some(w)) => match w
                .inotify
                .add_watch(&cg.dir.join("cgroup.events"), AddWatchFlags::IN_MODIFY)
            {
                Ok(wd) => {
                    w.tasks.insert(wd, record.id.clone());
                    Some(wd)
                }
                Err(e) => {
                    log::warn!("task {}: cannot watch its cgroup.events: {e}", record.name);
                    None
                }
            },
            _ => None,
        };
        let logs = LogFiles::new(self.task_dir(&record.name));
        self.disk.note(
            &logs.text,
            &format!(
                "=== {} run {}: {}\n",
                crate::clock::now_rfc3339(),
                record.runs,
                record.prompt
            ),
        );
        let mut live = Live {
            id: record.id.clone(),
            name: record.name.clone(),
            key,
            run,
            pid,
            start_time,
            pidfd,
            stdout: None,
            stderr: None,
            stderr_line: Vec::new(),
            tail: Tail::new(TAIL_BYTES),
            logs,
            dropped: 0,
            tmpdir,
            cgroup,
            watch,
            followed: false,
            redactor: OutputRedactor::new(),
            started: now,
            stdin,
            last_message: None,
            follow_up: None,
        };
        if let Some(pipe) = &live.stdin {
            self.stdin_tokens.insert(pipe.token, record.id.clone());
        }
        let mut unwatched = Vec::new();
        for (pipe, rx) in [(Pipe::Stdout, stdout), (Pipe::Stderr, stderr)] {
            let Some(mut rx) = rx else {
                unwatched.push(pipe);
                continue;
            };
            let registered = rx.set_nonblocking(true).and_then(|()| {
                let token = self
                    .pool
                    .take()
                    .ok_or_else(|| io::Error::other("out of tokens"))?;
                self.registry
                    .register(&mut rx, token, Interest::READABLE)
                    .map(|()| token)
            });
            match registered {
                Ok(token) => {
                    self.tokens.insert(token, (record.id.clone(), pipe));
                    // Edge-triggered: data may already be waiting.
                    self.defer(token);
                    match pipe {
                        Pipe::Stdout => live.stdout = Some((token, rx)),
                        Pipe::Stderr => live.stderr = Some((token, rx)),
                    }
                }
                Err(e) => {
                    log::error!("task {}: cannot watch agent {pipe:?}: {e}", record.name);
                    unwatched.push(pipe);
                }
            }
        }
        log::info!(
            "task {} started: pid {pid}, cwd {}",
            record.name,
            record.cwd
        );
        let id = record.id.clone();
        self.keys.insert(key, id.clone());
        self.live.insert(id.clone(), live);
        let mut events = Vec::new();
        for pipe in unwatched {
            if let Some(live) = self.live.get_mut(&id) {
                live.run.handle_eof(now, pipe, &mut events);
            }
        }
        self.drive(&id, now);
        Ok(())
    }

    fn prune(&mut self) {
        let finished = self.finished_count();
        if finished <= KEEP_FINISHED {
            return;
        }
        let mut excess = finished - KEEP_FINISHED;
        let mut removed = Vec::new();
        let live = &self.live;
        self.records.retain(|r| {
            // A warm agent's task stays while its process lives.
            if excess > 0 && !r.state.is_running() && !live.contains_key(&r.id) {
                excess -= 1;
                removed.push(r.name.clone());
                false
            } else {
                true
            }
        });
        for name in removed {
            self.disk.remove_all(self.task_dir(&name));
        }
    }
}

/// What `ctl logs` and the log file say about bytes the writer could not take.
pub fn dropped_note(bytes: u64) -> String {
    format!(
        "[walkie: {bytes} bytes of agent output were not written to the log files: the disk did not keep up]"
    )
}

fn emit_output(
    live: &mut Live,
    disk: &DiskWriter,
    events: &mut VecDeque<TaskEvent>,
    rendered: &str,
) {
    if rendered.is_empty() {
        return;
    }
    live.tail.push(rendered.as_bytes());
    if !disk.append(&live.logs.text, rendered.as_bytes()) {
        live.dropped += rendered.len() as u64;
    }
    if live.followed {
        events.push_back(TaskEvent::Output {
            name: live.name.clone(),
            text: live.redactor.redact_piece(rendered),
        });
    }
}

/// The pid and start time of a task's agent that outlived the walkie that started it (the
/// pid still names that same process), logged; `what` names it ("agent", "warm agent").
fn surviving_agent(r: &TaskRecord, what: &str) -> Option<(i32, u64)> {
    match (r.pid, r.pid_start_time) {
        (Some(pid), Some(start)) if proc::is_same_process(pid, start) => {
            log::warn!(
                "task {}: its {what} pid {pid} outlived walkie; stopping it",
                r.name
            );
            Some((pid, start))
        }
        _ => None,
    }
}

/// An outcome with the halves of keys its task's output shows split across lines taken
/// out of its texts: the final answer and a failure reason come from that output by
/// another path, where the other half was not beside them.
fn scrub_outcome(mut outcome: Outcome, output: &str) -> Outcome {
    outcome.summary = redact::scrub(&outcome.summary, output);
    outcome.error = outcome.error.map(|e| redact::scrub(&e, output));
    outcome.result_text = outcome.result_text.map(|t| redact::scrub(&t, output));
    outcome
}

/// Writes an ended run's or turn's outcome into its record. What this run did not report
/// (a session id, a cost) keeps the earlier run's value; changed files add up over runs.
fn write_outcome(record: &mut TaskRecord, outcome: Outcome) {
    record.state = outcome.state;
    record.ended_at = Some(crate::clock::now_rfc3339());
    record.exit_code = outcome.exit_code;
    record.summary = Some(outcome.summary);
    record.error = outcome.error;
    record.result_text = outcome.result_text;
    if outcome.session_id.is_some() {
        record.session_id = outcome.session_id;
    }
    for f in outcome.files_changed {
        if !record.files_changed.contains(&f) {
            record.files_changed.push(f);
        }
    }
    if outcome.cost_usd.is_some() {
        record.cost_usd = outcome.cost_usd;
    }
}

/// One human-readable line (or block) per stream event, for `walkie ctl logs`.
fn render(ev: &StreamEvent, out: &mut String) {
    use std::fmt::Write;
    let _ = match ev {
        StreamEvent::Session { session_id } => writeln!(out, "[session {session_id}]"),
        StreamEvent::Text(t) => writeln!(out, "{t}"),
        StreamEvent::ToolUse { name, detail, .. } => writeln!(out, "[tool] {name}: {detail}"),
        StreamEvent::Result(r) => writeln!(
            out,
            "[result] {}{}: {}",
            r.subtype,
            if r.is_error { " (error)" } else { "" },
            r.text.as_deref().unwrap_or("")
        ),
        StreamEvent::Plain(line) => writeln!(out, "{line}"),
        StreamEvent::Truncated { len } => {
            writeln!(out, "[walkie: dropped an oversized {len}-byte line]")
        }
        StreamEvent::Malformed { reason } => writeln!(out, "[walkie: unreadable line: {reason}]"),
        StreamEvent::PermissionRequest(p) => writeln!(out, "[permission] {}?", p.tool_name),
        StreamEvent::ControlRequest { subtype, .. } => writeln!(out, "[control request] {subtype}"),
        StreamEvent::ControlCancel { .. } => writeln!(out, "[permission request withdrawn]"),
        // Receipts, tool ends and state changes say nothing a reader of the log needs.
        StreamEvent::ToolResult { .. }
        | StreamEvent::UserReplay { .. }
        | StreamEvent::ControlResponse { .. }
        | StreamEvent::SessionState { .. } => Ok(()),
    };
}

/// A record about to run again with `prompt` (a follow-up): running, its last outcome
/// cleared.
fn begin_run(record: &mut TaskRecord, prompt: &str) {
    record.prompt = prompt.to_string();
    record.runs += 1;
    record.state = TaskState::Running;
    record.ended_at = None;
    record.exit_code = None;
    record.summary = None;
    record.result_text = None;
    record.error = None;
    record.warm = false;
    record.started_at = crate::clock::now_rfc3339();
}

/// The wall-clock time of `at`, a monotonic instant before `now`, in RFC 3339.
fn rfc3339_at(now: Instant, at: Instant) -> String {
    let wall = std::time::SystemTime::now()
        .checked_sub(now.saturating_duration_since(at))
        .unwrap_or(std::time::UNIX_EPOCH);
    crate::clock::rfc3339(wall)
}

/// Expands `{prompt}` and `{session}` in an argv template; no shell is involved, so the
/// prompt is one argument whatever it contains.
pub fn expand(template: &[String], prompt: &str, session: Option<&str>) -> Vec<String> {
    template
        .iter()
        .map(|arg| {
            let arg = arg.replace("{prompt}", prompt);
            match session {
                Some(s) => arg.replace("{session}", s),
                None => arg,
            }
        })
        .collect()
}

/// A real engine in a private directory for unit tests, with the engine's side of the
/// poll loop. It never reaps: a `waitpid(-1)` in a test would steal the children of tests
/// running beside it, so its agents stay zombies until the test process ends.
#[cfg(test)]
pub(crate) mod rig {
    use super::*;
    use crate::config::AgentConfig;

    pub struct EngineRig {
        pub _dir: tempfile::TempDir,
        pub poll: mio::Poll,
        pub engine: TaskEngine,
        pub events: Vec<TaskEvent>,
        pub t0: Instant,
    }

    const WAKER: Token = Token(1);

    impl EngineRig {
        /// Agents run `command` (no shell unless it names one).
        pub fn new(command: &[&str], records: Vec<TaskRecord>) -> EngineRig {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            let paths = Paths::from_lookup(
                |k| match k {
                    "HOME" => Some(root.join("home")),
                    "XDG_RUNTIME_DIR" => Some(root.join("runtime")),
                    _ => None,
                },
                0,
            );
            let settings = EngineSettings {
                agent: AgentConfig {
                    // Plain commands, one run each.
                    protocol: AgentProtocol::Oneshot,
                    command: command.iter().map(|s| s.to_string()).collect(),
                    max_running: 2,
                    cancel_grace_ms: 200,
                    ..AgentConfig::default()
                },
                projects: BTreeMap::new(),
                paths,
                openai_key_var: "OPENAI_API_KEY".into(),
            };
            let poll = mio::Poll::new().unwrap();
            let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).unwrap());
            let t0 = Instant::now();
            let containment = Containment::Scan {
                reason: "unit test".into(),
            };
            let engine =
                TaskEngine::new(settings, records, t0, poll.registry(), waker, containment)
                    .unwrap();
            EngineRig {
                _dir: dir,
                poll,
                engine,
                events: Vec::new(),
                t0,
            }
        }

        /// Runs the engine's side of the loop until `cond` holds (or 10 s pass).
        pub fn pump_until(&mut self, mut cond: impl FnMut(&mut EngineRig) -> bool) -> bool {
            let end = Instant::now() + Duration::from_secs(10);
            let mut events = mio::Events::with_capacity(64);
            while Instant::now() < end {
                if cond(self) {
                    return true;
                }
                let _ = self.poll.poll(&mut events, Some(Duration::from_millis(20)));
                let now = Instant::now();
                for ev in events.iter() {
                    if ev.token() == WAKER {
                        self.engine.on_wake(now);
                    } else if TaskEngine::owns(ev.token()) {
                        self.engine.on_ready(ev.token(), now);
                    }
                }
                self.engine.service_backlog(now);
                self.engine.begin_iteration();
                self.engine.on_timeout(now);
                while let Some(ev) = self.engine.poll_event() {
                    self.events.push(ev);
                }
            }
            cond(self)
        }
    }

    impl Drop for EngineRig {
        fn drop(&mut self) {
            self.engine.kill_everything(Instant::now());
        }
    }

    /// A finished task as an older state file may hold it.
    pub fn finished_record(name: &str, cwd: &Path, summary: &str, result: &str) -> TaskRecord {
        TaskRecord {
            name: name.into(),
            id: format!("{:016x}", fastrand::u64(..)),
            state: TaskState::Succeeded,
            project: None,
            cwd: cwd.display().to_string(),
            prompt: "earlier work".into(),
            pid: None,
            pid_start_time: None,
            started_at: "2026-01-01T00:00:00Z".into(),
            ended_at: Some("2026-01-01T00:01:00Z".into()),
            exit_code: Some(0),
            summary: Some(summary.into()),
            session_id: Some("0b7c2c4e-1d6a-4f7e-9a55-3c2b1a0f9e8d".into()),
            files_changed: vec!["src/lib.rs".into()],
            result_text: Some(result.into()),
            error: None,
            cost_usd: None,
            runs: 1,
            warm: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_keeps_the_prompt_one_argument() {
        let t: Vec<String> = ["claude", "-p", "{prompt}", "--x={prompt}"]
            .map(String::from)
            .to_vec();
        let argv = expand(&t, "rm -rf / ; echo $HOME", None);
        assert_eq!(argv[2], "rm -rf / ; echo $HOME");
        assert_eq!(argv[3], "--x=rm -rf / ; echo $HOME");
        let r: Vec<String> = ["--resume", "{session}"].map(String::from).to_vec();
        assert_eq!(expand(&r, "p", Some("abc")), vec!["--resume", "abc"]);
    }
}
