//! The task engine: the registry plus the supervisor of every agent process.
//!
//! Owns the agents' stdout/stderr pipes (tokens from [`crate::reactor::TASK_PIPES`]), their
//! pidfds, the reaping of every child (walkie is a child subreaper, so orphaned descendants
//! land here too), and the timers of cancellation and clean-up. It never blocks: spawning is
//! a fork/exec, exits come from SIGCHLD + `waitpid(-1, WNOHANG)`, and escalation (SIGINT →
//! SIGTERM → SIGKILL → sweep of the remaining descendants) runs on timers.
//!
//! A task ends in one place, [`TaskEngine::finish`], once its agent has been reaped, every
//! other process carrying its marker is gone, and its pipes are closed (or a short grace has
//! passed): only then is the outcome decided and a [`TaskEvent::Finished`] queued.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mio::unix::pipe::Receiver;
use mio::{Interest, Registry, Token};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::names::{self, Resolution};
use super::output::{CappedFile, FILE_CAP, TAIL_BYTES, Tail};
use super::proc::{self, MARKER_VAR};
use super::record::{TaskRecord, TaskState};
use super::redact;
use super::stream::{ExitInfo, StreamEvent, StreamParser, Verdict};
use crate::config::AgentConfig;
use crate::paths::Paths;
use crate::reactor::{TASK_PIPES, Timers, TokenPool};

/// Bytes read from one pipe per readiness before yielding to the rest of the loop; a pipe
/// with more to give is serviced again on the next iteration (see [`TaskEngine::has_backlog`]).
const READ_BUDGET: usize = 64 * 1024;
/// Finished tasks kept in the registry; older ones are pruned with their log directory.
const KEEP_FINISHED: usize = 100;
/// Longest summary, in characters (it is spoken).
const SUMMARY_CHARS: usize = 300;
/// Longest stored final text.
const RESULT_TEXT_BYTES: usize = 8 * 1024;
/// After the agent and its descendants are gone, how long to wait for pipes to reach EOF
/// (a process that escaped both the marker and the tree may still hold them).
const PIPE_GRACE: Duration = Duration::from_millis(300);
/// How often a sweep re-checks for survivors.
const SWEEP_POLL: Duration = Duration::from_millis(50);
/// A sweep that cannot kill everything in this long gives up (processes in D state).
const SWEEP_GIVE_UP: Duration = Duration::from_secs(10);

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
    /// The registry changed: persist it.
    Changed,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancel,
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// Next step of a cancel: 1 = SIGTERM, 2 = SIGKILL.
    Escalate(u8),
    /// Re-check a sweep (or the pipe grace).
    Sweep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pipe {
    Stdout,
    Stderr,
}

#[derive(Debug)]
enum Sweep {
    /// The agent has not exited yet.
    NotStarted,
    /// Survivors were sent SIGTERM at `started`; SIGKILL from `kill_at`.
    Running { started: Instant, kill_at: Instant },
    /// No survivor left (or gave up) at this instant.
    Done { at: Instant },
}

/// A running task's supervisor state (not persisted).
struct Live {
    id: String,
    name: String,
    pid: i32,
    pidfd: Option<OwnedFd>,
    stdout: Option<(Token, Receiver)>,
    stderr: Option<(Token, Receiver)>,
    parser: StreamParser,
    stderr_line: Vec<u8>,
    tail: Tail,
    raw_log: CappedFile,
    err_log: CappedFile,
    text_log: CappedFile,
    exit: Option<ExitInfo>,
    stop: Option<(StopReason, Instant)>,
    sweep: Sweep,
    tmpdir: PathBuf,
    followed: bool,
}

/// Leftovers of a task that was running when walkie last died.
struct Recovery {
    name: String,
    id: String,
    root: Option<i32>,
    since: Instant,
}

pub struct TaskEngine {
    settings: EngineSettings,
    records: Vec<TaskRecord>,
    live: HashMap<String, Live>,
    tokens: HashMap<Token, (String, Pipe)>,
    pool: TokenPool,
    timers: Timers<(String, TimerKind)>,
    backlog: HashSet<Token>,
    events: VecDeque<TaskEvent>,
    recoveries: Vec<Recovery>,
    recovery_timer: Option<Instant>,
    shutting_down: bool,
    scratch: Vec<u8>,
    stream_events: Vec<StreamEvent>,
}

impl TaskEngine {
    /// Builds the engine from the records of the state file. Tasks that were running when
    /// walkie last stopped are marked `interrupted`, and whatever is left of their processes
    /// (checked by pid + start time, and by marker) is stopped.
    pub fn new(settings: EngineSettings, mut records: Vec<TaskRecord>, now: Instant) -> TaskEngine {
        let mut recoveries = Vec::new();
        let mut changed = false;
        for r in records.iter_mut().filter(|r| r.state.is_running()) {
            let root = match (r.pid, r.pid_start_time) {
                (Some(pid), Some(start)) if proc::is_same_process(pid, start) => Some(pid),
                _ => None,
            };
            if let Some(pid) = root {
                // Still the same process (pid and start time match): its group is its own.
                log::warn!(
                    "task {}: agent pid {pid} outlived walkie; stopping it",
                    r.name
                );
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            log::warn!(
                "task {} was running when walkie stopped: marked interrupted",
                r.name
            );
            r.state = TaskState::Interrupted;
            r.ended_at.get_or_insert_with(crate::clock::now_rfc3339);
            r.pid = None;
            r.pid_start_time = None;
            r.error = Some("walkie stopped while it ran".into());
            r.summary = Some("interrupted: walkie stopped while it ran".into());
            recoveries.push(Recovery {
                name: r.name.clone(),
                id: r.id.clone(),
                root,
                since: now,
            });
            changed = true;
        }
        let mut engine = TaskEngine {
            settings,
            records,
            live: HashMap::new(),
            tokens: HashMap::new(),
            pool: TokenPool::new(TASK_PIPES, usize::MAX),
            timers: Timers::default(),
            backlog: HashSet::new(),
            events: VecDeque::new(),
            recoveries,
            recovery_timer: None,
            shutting_down: false,
            scratch: vec![0; READ_BUDGET],
            stream_events: Vec::new(),
        };
        if changed {
            engine.events.push_back(TaskEvent::Changed);
        }
        if !engine.recoveries.is_empty() {
            engine.recover_step(now);
        }
        engine
    }

    pub fn update_settings(&mut self, settings: EngineSettings) {
        self.settings = settings;
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

    /// Finds a task by exact name, unique prefix or word match (DESIGN.md §3).
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
        registry: &Registry,
        prompt: &str,
        name: Option<&str>,
        project: Option<&str>,
    ) -> Result<String, TaskError> {
        let prompt = self.accept_prompt(prompt)?;
        self.check_limit()?;
        let project = project.map(str::trim).filter(|p| !p.is_empty());
        let project_dir = match project {
            Some(p) => Some(self.project_dir(p)?),
            None => None,
        };
        let taken: HashSet<String> = self.records.iter().map(|r| r.name.clone()).collect();
        let name = names::derive_name(name.filter(|n| !n.trim().is_empty()), prompt, &|n| {
            taken.contains(n)
        });
        let id = format!("{:016x}", fastrand::u64(..));
        let cwd = match project_dir {
            Some(dir) => dir,
            None => self
                .scratch_dir(&name, &id)
                .map_err(|e| TaskError::Spawn(e.to_string()))?,
        };
        let argv = expand(&self.settings.agent.command, prompt, None);
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
        };
        self.spawn(registry, &mut record, &argv)?;
        self.records.push(record);
        self.prune();
        self.events
            .push_back(TaskEvent::Started { name: name.clone() });
        self.events.push_back(TaskEvent::Changed);
        Ok(name)
    }

    /// A follow-up in the task's agent session, same name, same directory.
    pub fn continue_task(
        &mut self,
        registry: &Registry,
        reference: &str,
        prompt: &str,
    ) -> Result<String, TaskError> {
        let prompt = self.accept_prompt(prompt)?;
        let mut record = self.resolve(reference)?.clone();
        if record.state.is_running() {
            return Err(TaskError::StillRunning(record.name));
        }
        let Some(session) = record.session_id.clone() else {
            return Err(TaskError::NoSession(record.name));
        };
        self.check_limit()?;
        let mut argv = expand(&self.settings.agent.command, prompt, None);
        argv.extend(expand(&self.settings.agent.resume, prompt, Some(&session)));
        record.prompt = prompt.to_string();
        record.runs += 1;
        record.state = TaskState::Running;
        record.ended_at = None;
        record.exit_code = None;
        record.summary = None;
        record.result_text = None;
        record.error = None;
        record.started_at = crate::clock::now_rfc3339();
        self.spawn(registry, &mut record, &argv)?;
        let name = record.name.clone();
        if let Some(slot) = self.record_mut(&name) {
            *slot = record;
        }
        self.events
            .push_back(TaskEvent::Started { name: name.clone() });
        self.events.push_back(TaskEvent::Changed);
        Ok(name)
    }

    /// Interrupts a running task and all its descendants. Returns its name; `cancelled` is
    /// reported (as a [`TaskEvent::Finished`]) only once every process is gone.
    pub fn cancel(&mut self, reference: &str, now: Instant) -> Result<String, TaskError> {
        let record = self.resolve(reference)?;
        let name = record.name.clone();
        if !record.state.is_running() {
            return Err(TaskError::NotRunning(name));
        }
        let id = record.id.clone();
        self.stop(&id, StopReason::Cancel, now);
        Ok(name)
    }

    /// Interrupts every running task (SIGTERM/SIGINT of walkie). [`TaskEngine::is_idle`]
    /// says when they are all gone.
    pub fn shutdown(&mut self, now: Instant) {
        self.shutting_down = true;
        let ids: Vec<String> = self.live.keys().cloned().collect();
        for id in ids {
            self.stop(&id, StopReason::Shutdown, now);
        }
    }

    /// No task process left and no leftover of a previous run being cleaned up.
    pub fn is_idle(&self) -> bool {
        self.live.is_empty() && self.recoveries.is_empty()
    }

    /// Last resort at the shutdown deadline: SIGKILL everything still known.
    pub fn kill_everything(&mut self) {
        for live in self.live.values() {
            if live.exit.is_none() {
                let _ = nix::sys::signal::killpg(Pid::from_raw(live.pid), Signal::SIGKILL);
            }
            for pid in proc::task_processes(&live.id, None) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
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
                live.followed = followed;
                true
            }
            None => false,
        }
    }

    /// The rendered output of a task: the in-memory tail while it runs, the log file after.
    pub fn logs(&self, reference: &str) -> Result<(String, String), TaskError> {
        let record = self.resolve(reference)?;
        if let Some(live) = self.live.get(&record.id) {
            return Ok((record.name.clone(), live.tail.text()));
        }
        let path = self.task_dir(&record.name).join("log.txt");
        let text = super::output::read_tail(&path, TAIL_BYTES as u64).unwrap_or_default();
        Ok((record.name.clone(), text))
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
                truncate_chars(&redact::redact(&r.prompt), 160)
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
        crate::reactor::earliest([self.timers.next_deadline(), self.recovery_timer])
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

    /// Readiness on a task pipe.
    pub fn on_ready(&mut self, registry: &Registry, token: Token, now: Instant) {
        self.read_pipe(registry, token, now);
    }

    pub fn service_backlog(&mut self, registry: &Registry, now: Instant) {
        let tokens: Vec<Token> = self.backlog.drain().collect();
        for token in tokens {
            self.read_pipe(registry, token, now);
        }
    }

    /// SIGCHLD: reaps every exited child — agents and orphaned descendants alike — in one
    /// place, routing each status to its task by pid.
    pub fn reap(&mut self, registry: &Registry, now: Instant) {
        loop {
            match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(WaitStatus::Exited(pid, code)) => {
                    self.on_exit(registry, pid.as_raw(), ExitInfo::Code(code), now)
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(registry, pid.as_raw(), ExitInfo::Signal(sig as i32), now)
                }
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                // ECHILD: no children at all.
                Err(_) => break,
            }
        }
    }

    pub fn on_timeout(&mut self, registry: &Registry, now: Instant) {
        while let Some((id, kind)) = self.timers.pop_expired(now) {
            match kind {
                TimerKind::Escalate(stage) => self.escalate(&id, stage, now),
                TimerKind::Sweep => self.sweep_step(registry, &id, now),
            }
        }
        if self.recovery_timer.is_some_and(|t| t <= now) {
            self.recover_step(now);
        }
    }

    // ---- internals ----

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

    fn scratch_dir(&self, name: &str, id: &str) -> io::Result<PathBuf> {
        let base = self.settings.paths.scratch_dir();
        crate::paths::create_private_dir(&base)?;
        let mut dir = base.join(name);
        if dir.exists() {
            // A pruned task of the same name left its work here: never mix the two.
            dir = base.join(format!("{name}-{}", &id[..6]));
        }
        crate::paths::create_private_dir(&dir)?;
        Ok(dir)
    }

    fn task_dir(&self, name: &str) -> PathBuf {
        self.settings.paths.tasks_dir().join(name)
    }

    fn environment(&self, record: &TaskRecord, tmpdir: &Path) -> Vec<(String, String)> {
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
        env.into_iter().collect()
    }

    fn spawn(
        &mut self,
        registry: &Registry,
        record: &mut TaskRecord,
        argv: &[String],
    ) -> Result<(), TaskError> {
        let spawn_err = |e: io::Error| TaskError::Spawn(e.to_string());
        let task_dir = self.task_dir(&record.name);
        crate::paths::create_private_dir(&task_dir).map_err(spawn_err)?;
        let tmpdir = self.settings.paths.runtime_dir.join("tmp").join(&record.id);
        crate::paths::create_private_dir(&tmpdir).map_err(spawn_err)?;
        let Some((program, args)) = argv.split_first() else {
            return Err(TaskError::Spawn("agent.command is empty".into()));
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&record.cwd)
            .env_clear()
            .envs(self.environment(record, &tmpdir))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::sys::process::agent_pre_exec(&mut cmd, Signal::SIGTERM);
        let mut child = cmd.spawn().map_err(|e| {
            let _ = std::fs::remove_dir(&tmpdir);
            if e.kind() == io::ErrorKind::NotFound {
                TaskError::Spawn(format!(
                    "{program}: command not found (agent.command, PATH)"
                ))
            } else {
                TaskError::Spawn(format!("{program}: {e}"))
            }
        })?;
        let pid = child.id() as i32;
        // The child is reaped by `reap` (waitpid(-1)); std's handle is only a bag of pipes.
        let stdout = child.stdout.take().map(Receiver::from);
        let stderr = child.stderr.take().map(Receiver::from);
        drop(child);
        let pidfd = crate::sys::process::pidfd_open(pid).ok();
        record.pid = Some(pid);
        record.pid_start_time = proc::stat(pid).map(|s| s.start_time);
        let mut text_log = CappedFile::open(task_dir.join("log.txt"), FILE_CAP);
        text_log.write(
            format!(
                "=== {} run {}: {}\n",
                crate::clock::now_rfc3339(),
                record.runs,
                record.prompt
            )
            .as_bytes(),
        );
        let mut live = Live {
            id: record.id.clone(),
            name: record.name.clone(),
            pid,
            pidfd,
            stdout: None,
            stderr: None,
            parser: StreamParser::new(),
            stderr_line: Vec::new(),
            tail: Tail::new(TAIL_BYTES),
            raw_log: CappedFile::open(task_dir.join("stdout.jsonl"), FILE_CAP),
            err_log: CappedFile::open(task_dir.join("stderr.log"), FILE_CAP),
            text_log,
            exit: None,
            stop: None,
            sweep: Sweep::NotStarted,
            tmpdir,
            followed: false,
        };
        for (pipe, rx) in [(Pipe::Stdout, stdout), (Pipe::Stderr, stderr)] {
            let Some(mut rx) = rx else { continue };
            let registered = rx.set_nonblocking(true).and_then(|()| {
                let token = self
                    .pool
                    .take()
                    .ok_or_else(|| io::Error::other("out of tokens"))?;
                registry
                    .register(&mut rx, token, Interest::READABLE)
                    .map(|()| token)
            });
            match registered {
                Ok(token) => {
                    self.tokens.insert(token, (record.id.clone(), pipe));
                    // Edge-triggered: data may already be waiting.
                    self.backlog.insert(token);
                    match pipe {
                        Pipe::Stdout => live.stdout = Some((token, rx)),
                        Pipe::Stderr => live.stderr = Some((token, rx)),
                    }
                }
                Err(e) => log::error!("task {}: cannot watch agent {pipe:?}: {e}", record.name),
            }
        }
        log::info!(
            "task {} started: pid {pid}, cwd {}",
            record.name,
            record.cwd
        );
        self.live.insert(record.id.clone(), live);
        Ok(())
    }

    fn stop(&mut self, id: &str, reason: StopReason, now: Instant) {
        let grace = Duration::from_millis(self.settings.agent.cancel_grace_ms);
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        if live
            .stop
            .is_some_and(|(r, _)| r == reason || r == StopReason::Cancel)
        {
            return;
        }
        live.stop = Some((reason, now));
        if live.exit.is_none() {
            // SIGINT first: the CLI then stops its own Bash children and reports.
            let _ = nix::sys::signal::killpg(Pid::from_raw(live.pid), Signal::SIGINT);
            self.timers
                .schedule(now + grace / 2, (id.to_string(), TimerKind::Escalate(1)));
            self.timers
                .schedule(now + grace, (id.to_string(), TimerKind::Escalate(2)));
        }
    }

    fn escalate(&mut self, id: &str, stage: u8, _now: Instant) {
        let Some(live) = self.live.get(id) else {
            return;
        };
        if live.exit.is_some() {
            return; // the sweep takes over once the agent is reaped
        }
        // The agent is not reaped yet, so its pid (and group id) cannot have been reused.
        let pid = Pid::from_raw(live.pid);
        if stage == 1 {
            let _ = nix::sys::signal::killpg(pid, Signal::SIGTERM);
        } else {
            let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
            if let Some(fd) = &live.pidfd {
                let _ = crate::sys::process::pidfd_send_signal(fd, Signal::SIGKILL);
            }
            for p in proc::task_processes(id, Some(live.pid)) {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }

    fn on_exit(&mut self, registry: &Registry, pid: i32, exit: ExitInfo, now: Instant) {
        let Some(id) = self
            .live
            .iter()
            .find(|(_, l)| l.pid == pid && l.exit.is_none())
            .map(|(id, _)| id.clone())
        else {
            log::debug!("reaped orphan pid {pid} ({exit:?})");
            return;
        };
        let live = self.live.get_mut(&id).expect("found above");
        live.exit = Some(exit);
        live.pidfd = None;
        let grace = Duration::from_millis(self.settings.agent.cancel_grace_ms.min(2000));
        // Whatever the agent left behind gets SIGTERM now and SIGKILL after the grace.
        let survivors = proc::task_processes(&id, None);
        for p in &survivors {
            let _ = nix::sys::signal::kill(Pid::from_raw(*p), Signal::SIGTERM);
        }
        if survivors.is_empty() {
            live.sweep = Sweep::Done { at: now };
        } else {
            log::info!(
                "task {}: agent exited, stopping {} leftover process(es)",
                live.name,
                survivors.len()
            );
            live.sweep = Sweep::Running {
                started: now,
                kill_at: now + grace,
            };
        }
        self.sweep_step(registry, &id, now);
    }

    fn sweep_step(&mut self, registry: &Registry, id: &str, now: Instant) {
        let Some(live) = self.live.get_mut(id) else {
            return;
        };
        if let Sweep::Running { started, kill_at } = live.sweep {
            let survivors = proc::task_processes(id, None);
            if survivors.is_empty() {
                live.sweep = Sweep::Done { at: now };
            } else if now >= started + SWEEP_GIVE_UP {
                log::error!(
                    "task {}: processes {survivors:?} would not die; giving up on them",
                    live.name
                );
                live.sweep = Sweep::Done { at: now };
            } else {
                if now >= kill_at {
                    for p in &survivors {
                        let _ = nix::sys::signal::kill(Pid::from_raw(*p), Signal::SIGKILL);
                    }
                }
                self.timers
                    .schedule(now + SWEEP_POLL, (id.to_string(), TimerKind::Sweep));
                return;
            }
        }
        let Sweep::Done { at } = live.sweep else {
            return;
        };
        let pipes_open = live.stdout.is_some() || live.stderr.is_some();
        if pipes_open && now < at + PIPE_GRACE {
            self.timers
                .schedule(at + PIPE_GRACE, (id.to_string(), TimerKind::Sweep));
            return;
        }
        self.finish(registry, id, now);
    }

    fn read_pipe(&mut self, registry: &Registry, token: Token, now: Instant) {
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
        let mut total = 0;
        let mut eof = false;
        // Read into the shared scratch buffer up to one budget.
        while total < READ_BUDGET {
            match rx.read(&mut self.scratch[total..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("task {id}: reading agent {pipe:?}: {e}");
                    eof = true;
                    break;
                }
            }
        }
        if total >= READ_BUDGET && !eof {
            self.backlog.insert(token);
        }
        if eof {
            if let Some((token, mut rx)) = slot.take() {
                let _ = registry.deregister(&mut rx);
                self.tokens.remove(&token);
                self.backlog.remove(&token);
                self.pool.release(token);
            }
        }
        let data = &self.scratch[..total];
        match pipe {
            Pipe::Stdout => {
                live.raw_log.write(data);
                self.stream_events.clear();
                live.parser.feed(data, &mut self.stream_events);
                if eof {
                    live.parser.finish(&mut self.stream_events);
                }
                let mut rendered = String::new();
                for ev in self.stream_events.drain(..) {
                    render(&ev, &mut rendered);
                }
                emit_output(live, &mut self.events, &rendered);
            }
            Pipe::Stderr => {
                live.err_log.write(data);
                let mut rendered = String::new();
                for &b in data {
                    if b == b'\n' {
                        rendered.push_str("[stderr] ");
                        rendered.push_str(&String::from_utf8_lossy(&live.stderr_line));
                        rendered.push('\n');
                        live.stderr_line.clear();
                    } else if live.stderr_line.len() < 4096 {
                        live.stderr_line.push(b);
                    }
                }
                if eof && !live.stderr_line.is_empty() {
                    rendered.push_str("[stderr] ");
                    rendered.push_str(&String::from_utf8_lossy(&live.stderr_line));
                    rendered.push('\n');
                    live.stderr_line.clear();
                }
                emit_output(live, &mut self.events, &rendered);
            }
        }
        if let Some(session) = live.parser.session_id() {
            let session = session.to_string();
            let name = self
                .records
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.name.clone());
            if let Some(r) = name.and_then(|n| self.record_mut(&n)) {
                if r.session_id.as_deref() != Some(session.as_str()) {
                    r.session_id = Some(session);
                    self.events.push_back(TaskEvent::Changed);
                }
            }
        }
        if eof {
            let live = &self.live[&id];
            if matches!(live.sweep, Sweep::Done { .. })
                && live.stdout.is_none()
                && live.stderr.is_none()
            {
                self.finish(registry, &id, now);
            }
        }
    }

    /// Decides the outcome and retires the live state. Called once per run.
    fn finish(&mut self, registry: &Registry, id: &str, _now: Instant) {
        let Some(mut live) = self.live.remove(id) else {
            return;
        };
        for (token, mut rx) in [live.stdout.take(), live.stderr.take()]
            .into_iter()
            .flatten()
        {
            // Read what is left without waiting, then let go.
            let mut rest = Vec::new();
            let _ = rx.read_to_end(&mut rest);
            if !rest.is_empty() {
                live.raw_log.write(&rest);
                self.stream_events.clear();
                live.parser.feed(&rest, &mut self.stream_events);
            }
            let _ = registry.deregister(&mut rx);
            self.tokens.remove(&token);
            self.backlog.remove(&token);
            self.pool.release(token);
        }
        self.stream_events.clear();
        live.parser.finish(&mut self.stream_events);
        let exit = live
            .exit
            .unwrap_or(ExitInfo::Signal(Signal::SIGKILL as i32));
        let verdict = super::stream::verdict(&live.parser, exit);
        let final_text = live
            .parser
            .result()
            .and_then(|r| r.text.clone())
            .or_else(|| live.parser.last_text().map(str::to_string))
            .or_else(|| {
                Some(live.parser.plain_tail().to_string()).filter(|t| !t.trim().is_empty())
            });
        let (state, error) = match (live.stop.map(|(r, _)| r), verdict) {
            (Some(StopReason::Cancel), _) => (TaskState::Cancelled, None),
            (Some(StopReason::Shutdown), _) => {
                (TaskState::Interrupted, Some("walkie shut down".to_string()))
            }
            (None, Verdict::Succeeded) => (TaskState::Succeeded, None),
            (None, Verdict::Failed { reason }) => (TaskState::Failed, Some(reason)),
            (None, Verdict::Interrupted { reason }) => (TaskState::Interrupted, Some(reason)),
        };
        let summary = match (state, &error) {
            (TaskState::Succeeded, _) => final_text
                .as_deref()
                .map(|t| redact::speech_summary(t, SUMMARY_CHARS))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "finished without a final message".into()),
            (TaskState::Cancelled, _) => "cancelled".to_string(),
            (_, Some(reason)) => {
                redact::speech_summary(&format!("{}: {reason}", state.as_str()), SUMMARY_CHARS)
            }
            (_, None) => state.as_str().to_string(),
        };
        let files: Vec<String> = live.parser.files_changed().to_vec();
        let session = live.parser.session_id().map(str::to_string);
        let cost = live.parser.result().and_then(|r| r.total_cost_usd);
        live.text_log
            .write(format!("=== {}: {summary}\n", state.as_str()).as_bytes());
        let tmpdir = live.tmpdir.clone();
        let Some(record) = self.records.iter_mut().find(|r| r.id == id) else {
            return;
        };
        record.state = state;
        record.pid = None;
        record.pid_start_time = None;
        record.ended_at = Some(crate::clock::now_rfc3339());
        record.exit_code = Some(match exit {
            ExitInfo::Code(c) => c,
            ExitInfo::Signal(s) => 128 + s,
        });
        record.summary = Some(summary.clone());
        record.error = error.map(|e| redact::redact(&e));
        record.result_text =
            final_text.map(|t| truncate_bytes(&redact::redact(&t), RESULT_TEXT_BYTES));
        if session.is_some() {
            record.session_id = session;
        }
        for f in files {
            if !record.files_changed.contains(&f) {
                record.files_changed.push(f);
            }
        }
        if cost.is_some() {
            record.cost_usd = cost;
        }
        let name = record.name.clone();
        log::info!("task {name} {}: {summary}", state.as_str());
        // The agent's temp files are its own business; clear them off the loop.
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(tmpdir);
        });
        self.events.push_back(TaskEvent::Finished {
            name,
            state,
            summary,
        });
        self.events.push_back(TaskEvent::Changed);
        self.prune();
    }

    fn recover_step(&mut self, now: Instant) {
        self.recoveries.retain(|r| {
            let left = proc::task_processes(&r.id, r.root);
            if left.is_empty() {
                if r.root.is_some() || now > r.since {
                    log::info!("task {}: no process of the previous run is left", r.name);
                }
                return false;
            }
            if now >= r.since + SWEEP_GIVE_UP {
                log::error!("task {}: leftover processes {left:?} would not die", r.name);
                return false;
            }
            log::warn!(
                "task {}: stopping {} leftover process(es) of the previous run",
                r.name,
                left.len()
            );
            for p in left {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            true
        });
        self.recovery_timer = (!self.recoveries.is_empty()).then(|| now + SWEEP_POLL);
    }

    fn prune(&mut self) {
        let finished = self.finished_count();
        if finished <= KEEP_FINISHED {
            return;
        }
        let mut excess = finished - KEEP_FINISHED;
        let mut removed = Vec::new();
        self.records.retain(|r| {
            if excess > 0 && !r.state.is_running() {
                excess -= 1;
                removed.push(r.name.clone());
                false
            } else {
                true
            }
        });
        for name in removed {
            let _ = std::fs::remove_dir_all(self.task_dir(&name));
        }
    }
}

fn emit_output(live: &mut Live, events: &mut VecDeque<TaskEvent>, rendered: &str) {
    if rendered.is_empty() {
        return;
    }
    live.tail.push(rendered.as_bytes());
    live.text_log.write(rendered.as_bytes());
    if live.followed {
        events.push_back(TaskEvent::Output {
            name: live.name.clone(),
            text: rendered.to_string(),
        });
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

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn truncate_bytes(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
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

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 2), "hé…");
        assert_eq!(truncate_chars("hi", 5), "hi");
        assert_eq!(truncate_bytes("ééé", 3), "é…");
    }
}
