//! The daemon: builds the parts, runs the poll loop, dispatches events to their owners and
//! carries out what the cores ask for.
//!
//! The loop owns every fd through [`Reactor`]; each part derives its own interest and
//! reports its next deadline, and the loop sleeps until the earliest one. Inputs flow into
//! the sans-IO conversation core, whose actions flow out to the link, the audio engine and
//! the state file. Nothing here blocks: the only waits are `epoll_wait` itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use mio::event::Event;
use serde_json::{Value, json};

use crate::audio::{Audio, AudioReport, AudioSettings};
use crate::button::{Button, ButtonEvent};
use crate::config::{Config, ConfigSource};
use crate::control::handler::{self, Handled, Parts, Vitals};
use crate::control::server::Subscription;
use crate::control::{ControlServer, Request, StartupError, proto};
use crate::conversation::{Action, Completion, Conversation, ConversationSettings, PermissionAsk};
use crate::instance::{InstanceError, InstanceLock};
use crate::paths::Paths;
use crate::reactor::{self, Reactor};
use crate::realtime::events::SessionSettings;
use crate::realtime::link::{Link, LinkEvent, LinkSettings, LinkStatus};
use crate::realtime::trace::Trace;
use crate::sd_notify::Notifier;
use crate::signals::{SignalEvent, Signals};
use crate::state::{self, StateFile, StateWriter};
use crate::tasks::contain::{self, Containment};
use crate::tasks::{EngineSettings, TaskEngine, TaskEvent, TaskState};
use crate::tools;

/// Extra time after the agents' cancel grace before shutdown stops waiting for them.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);
/// After the SIGKILL at the shutdown deadline, how long to wait for the exits.
const FORCE_KILL_WAIT: Duration = Duration::from_secs(1);
/// How often playback is looked at while speech plays (the conversation needs to know when
/// it drained; the playback thread does not wake the loop for that).
const PLAYBACK_POLL: Duration = Duration::from_millis(50);

/// Runs the daemon in the foreground; returns the process exit code.
pub fn run(config_path: Option<PathBuf>, trace_path: Option<PathBuf>) -> i32 {
    // Before any thread exists, so every thread inherits the mask and signals arrive only
    // through the signalfd.
    if let Err(e) = crate::signals::block_signals() {
        log::error!("cannot block signals: {e}");
        return crate::cli::EXIT_FAILURE;
    }
    let started = Instant::now();
    let paths = Paths::from_env();
    let source = Config::locate(config_path.as_deref(), &paths);
    let config = match Config::load_source(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("walkie: {e}");
            return crate::cli::EXIT_USAGE;
        }
    };
    // A key that is there but unusable (a CR/LF, non-ASCII, a FIFO for a file) is a
    // configuration error: refused now, not discovered as a link that never authenticates.
    if let Err(e) = config.link_api_key() {
        if e.is_config_error() {
            eprintln!("walkie: {e}");
            return crate::cli::EXIT_USAGE;
        }
    }
    match Daemon::build(config, source, config_path, paths, trace_path, started) {
        Ok(mut daemon) => match daemon.run_loop() {
            Ok(()) => crate::cli::EXIT_OK,
            Err(e) => {
                log::error!("the poll loop failed: {e}");
                crate::cli::EXIT_FAILURE
            }
        },
        Err(BuildError::Usage(msg)) => {
            eprintln!("walkie: {msg}");
            crate::cli::EXIT_USAGE
        }
        Err(BuildError::Failure(msg)) => {
            eprintln!("walkie: {msg}");
            crate::cli::EXIT_FAILURE
        }
    }
}

enum BuildError {
    Usage(String),
    Failure(String),
}

struct Daemon {
    /// Held for the daemon's lifetime.
    _instance: InstanceLock,
    reactor: Reactor,
    signals: Signals,
    control: ControlServer,
    engine: TaskEngine,
    conv: Conversation,
    link: Option<Link>,
    /// Why there is no link (disabled by configuration, no API key).
    link_off: Option<(&'static str, String)>,
    audio: Option<Audio>,
    button: Button,
    state: Option<StateWriter>,
    trace: Option<Trace>,
    config: Config,
    config_path: Option<PathBuf>,
    paths: Paths,
    started: Instant,
    shutdown_deadline: Option<Instant>,
    /// Shutdown gave up waiting and sent SIGKILL.
    force_killed: bool,
    state_dirty: bool,
    /// The registry changed since the conversation core was last told its summary.
    task_summary_stale: bool,
    /// `logs` requests waiting for the writer thread: ticket → connection.
    pending_logs: HashMap<u64, mio::Token>,
    ready: Vec<Event>,
    /// systemd's `Type=notify` socket: READY, STATUS, the watchdog (a no-op elsewhere).
    notifier: Notifier,
}

impl Daemon {
    fn build(
        config: Config,
        source: ConfigSource,
        config_path: Option<PathBuf>,
        paths: Paths,
        trace_path: Option<PathBuf>,
        started: Instant,
    ) -> Result<Daemon, BuildError> {
        let fail =
            |what: &str, e: &dyn std::fmt::Display| BuildError::Failure(format!("{what}: {e}"));
        paths
            .ensure_private_dirs()
            .map_err(|e| BuildError::Failure(e.to_string()))?;
        // Before anything reads the state file: a second daemon of this state directory
        // would take the first one's running tasks for leftovers and kill them.
        let instance = InstanceLock::acquire(&paths.lock_file()).map_err(|e| match e {
            e @ InstanceError::AlreadyRunning { .. } => BuildError::Failure(e.to_string()),
            e => fail("cannot take the instance lock", &e),
        })?;
        let control = ControlServer::bind(&paths.runtime_dir).map_err(|e| match e {
            e @ StartupError::AlreadyRunning { .. } => BuildError::Failure(e.to_string()),
            e => fail("cannot create the control socket", &e),
        })?;
        let button =
            Button::new(&config.button).map_err(|e| BuildError::Usage(format!("[button] {e}")))?;
        // Orphaned descendants of agents (Claude's Bash tool runs commands in their own
        // session) are re-parented to us, so they can be found, stopped and reaped.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            log::warn!(
                "cannot become a child subreaper ({e}): escaped agent descendants may linger"
            );
        }
        let loaded =
            state::load(&paths.state_file()).map_err(|e| BuildError::Failure(e.to_string()))?;
        let saved = match loaded {
            state::Loaded::Fresh => StateFile::default(),
            state::Loaded::Ok(s) => s,
            state::Loaded::MovedAside { error, moved_to } => {
                log::error!(
                    "the state file was unreadable ({error}); it was moved to {} and walkie starts with an empty registry",
                    moved_to.display()
                );
                StateFile::default()
            }
        };
        // Off the loop's start-up path: ready stays fast, the first tool call stays fast.
        let _ = std::thread::Builder::new()
            .name("walkie-warm-up".into())
            .spawn(crate::tasks::redact::warm_up);
        let reactor = Reactor::new().map_err(|e| fail("cannot create the poll loop", &e))?;
        let containment = Containment::setup(&containment_request(&config, &paths));
        log::info!("containment: {}", containment.describe());
        let now = Instant::now();
        let engine = TaskEngine::new(
            engine_settings(&config, &paths),
            saved.tasks,
            now,
            reactor.registry(),
            reactor.waker(),
            containment,
        )
        .map_err(|e| fail("cannot start the task engine", &e))?;
        let mut conv = Conversation::new(conversation_settings(&config));
        conv.restore_transcript(saved.transcript);
        conv.handle_task_summary(engine.context_summary());
        let signals = Signals::new().map_err(|e| fail("cannot create the signalfd", &e))?;
        signals
            .register(reactor.registry(), reactor::SIGNALS)
            .map_err(|e| fail("signalfd", &e))?;
        let trace = match trace_path {
            Some(p) => Some(
                Trace::create(&p, started)
                    .map_err(|e| fail(&format!("trace file {}", p.display()), &e))?,
            ),
            None => None,
        };
        let state = StateWriter::start(paths.state_file())
            .map_err(|e| fail("cannot start the state writer", &e))?;
        let (link, link_off) = build_link(&config, reactor.waker());
        let audio = Some(Audio::start(
            AudioSettings::from_config(&config.audio),
            reactor.waker(),
        ));
        let mut daemon = Daemon {
            _instance: instance,
            reactor,
            signals,
            control,
            engine,
            conv,
            link,
            link_off,
            audio,
            button,
            state: Some(state),
            trace,
            config,
            config_path,
            paths,
            started,
            shutdown_deadline: None,
            force_killed: false,
            state_dirty: true,
            task_summary_stale: false,
            pending_logs: HashMap::new(),
            ready: Vec::with_capacity(256),
            notifier: Notifier::from_env(),
        };
        daemon
            .control
            .register(daemon.reactor.registry())
            .map_err(|e| fail("control socket", &e))?;
        daemon.button.start(daemon.reactor.registry(), now);
        if let Some(link) = daemon.link.as_mut() {
            link.start(daemon.reactor.registry(), now);
        }
        match source {
            ConfigSource::File(p) => log::info!("configuration: {}", p.display()),
            ConfigSource::Defaults => log::info!("configuration: defaults (no file)"),
        }
        // Ready, but say plainly when there is no voice: a missing key is not a detail.
        let voice = match &daemon.link_off {
            Some(("failed", why)) => {
                log::error!(
                    "no voice: {why}. The button does nothing until it is fixed and walkie restarted (`walkie doctor` checks it); tasks still work through `walkie ctl`"
                );
                if let Some(audio) = daemon.audio.as_mut() {
                    audio.play_earcon(crate::voice::Earcon::Failed);
                }
                " without voice (the Realtime link failed)"
            }
            Some((_, why)) => {
                log::info!("Realtime link disabled: {why}");
                " without voice (realtime.url = \"none\")"
            }
            None => "",
        };
        log::info!(
            "walkie {} ready{voice} in {} ms: control socket {}, {} task(s) in the registry",
            env!("CARGO_PKG_VERSION"),
            started.elapsed().as_millis(),
            daemon.control.path().display(),
            daemon.engine.records().len()
        );
        Ok(daemon)
    }

    fn run_loop(&mut self) -> std::io::Result<()> {
        self.notifier.ready(Instant::now(), self.status_line());
        crate::sd_notify::test_block_loop_once();
        loop {
            let now = Instant::now();
            let deadline = if self.engine.has_backlog() {
                Some(now)
            } else {
                self.next_deadline(now)
            };
            self.ready.clear();
            #[cfg(feature = "probe")]
            crate::probe::loop_waits();
            self.ready
                .extend(self.reactor.poll(deadline, now)?.iter().cloned());
            #[cfg(feature = "probe")]
            crate::probe::loop_woke();
            self.engine.begin_iteration();
            let now = Instant::now();
            let ready = std::mem::take(&mut self.ready);
            for event in &ready {
                self.dispatch(event, now);
            }
            self.ready = ready;
            self.on_timeouts(now);
            if self.engine.has_backlog() {
                self.engine.service_backlog(now);
            }
            self.pump(now);
            if self.state_dirty {
                self.persist();
            }
            if let Some(trace) = self.trace.as_mut() {
                trace.flush();
            }
            self.notifier.on_loop(now);
            if self.notifier.enabled() {
                self.notifier.status(self.status_line());
            }
            if self.shutdown_complete(now) {
                break;
            }
        }
        self.finish_shutdown();
        Ok(())
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let playback = self
            .audio
            .as_ref()
            .filter(|a| a.progress().is_playing())
            .map(|_| now + PLAYBACK_POLL);
        reactor::earliest([
            self.engine.next_deadline(),
            self.conv.poll_timeout(),
            self.link.as_ref().and_then(Link::next_deadline),
            self.audio.as_ref().and_then(Audio::next_deadline),
            self.button.next_deadline(),
            self.control.next_deadline(now),
            self.shutdown_deadline,
            playback,
            self.notifier.next_deadline(),
        ])
    }

    fn dispatch(&mut self, event: &Event, now: Instant) {
        let registry = self.reactor.registry();
        match event.token() {
            reactor::SIGNALS => {
                for sig in self.signals.drain() {
                    match sig {
                        SignalEvent::Child => self.engine.reap(now),
                        SignalEvent::Reload => self.reload(),
                        SignalEvent::Shutdown(s) => self.begin_shutdown(now, &format!("{s}")),
                    }
                }
            }
            reactor::WAKER => {
                if let Some(link) = self.link.as_mut() {
                    link.on_wake(registry, now);
                }
                if let Some(audio) = self.audio.as_mut() {
                    let reports = audio.on_wake(now);
                    log_audio(reports);
                }
                self.feed_capture(now);
                self.engine.on_wake(now);
            }
            reactor::CONTROL => self.control.on_listener_ready(registry, now),
            reactor::LINK => {
                if let Some(link) = self.link.as_mut() {
                    link.on_ready(registry, event, now);
                }
            }
            reactor::BUTTON => self.button.on_ready(registry, event, now),
            t if ControlServer::owns(t) => self.control.on_ready(registry, t, event, now),
            t if TaskEngine::owns(t) => self.engine.on_ready(t, now),
            // mio may report a token after its source was dropped: ignore it.
            _ => {}
        }
    }

    fn on_timeouts(&mut self, now: Instant) {
        let registry = self.reactor.registry();
        self.engine.on_timeout(now);
        // Also where control connections are served, a budget each per iteration.
        self.control.on_timeout(registry, now);
        if let Some(link) = self.link.as_mut() {
            link.on_timeout(registry, now);
        }
        if let Some(audio) = self.audio.as_mut() {
            log_audio(audio.on_timeout(now));
        }
        self.button.on_timeout(registry, now);
        self.conv.handle_timeout(now);
        if let Some(audio) = self.audio.as_ref() {
            self.conv.handle_playback(now, audio.progress());
        }
    }

    /// Moves events between the parts until nothing is left to move.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut moved = false;
            while let Some(ev) = self.link.as_mut().and_then(Link::poll_event) {
                moved = true;
                self.on_link_event(now, ev);
            }
            while let Some(ev) = self.button.poll_event() {
                moved = true;
                self.on_button(now, ev);
            }
            while let Some(ev) = self.engine.poll_event() {
                moved = true;
                self.on_task_event(now, ev);
            }
            while let Some((token, req)) = self.control.poll_request() {
                moved = true;
                match req {
                    Ok(req) => self.on_request(now, token, req),
                    Err(msg) => {
                        self.control
                            .reply(self.reactor.registry(), token, &proto::error_reply(msg))
                    }
                }
            }
            moved |= self.run_actions(now);
            if !moved {
                break;
            }
        }
    }

    fn on_link_event(&mut self, now: Instant, ev: LinkEvent) {
        match ev {
            LinkEvent::Open => {
                log::info!("Realtime link open");
                self.conv.handle_link_open(now);
            }
            LinkEvent::Text(text) => {
                if let Some(trace) = self.trace.as_mut() {
                    trace.received(now, &text);
                }
                let unix_now = (crate::clock::unix_ms(SystemTime::now()) / 1000) as i64;
                if self.task_summary_stale {
                    // Any frame may be the `session.created` whose context restore tells it.
                    self.task_summary_stale = false;
                    self.conv.handle_task_summary(self.engine.context_summary());
                }
                self.conv.handle_server_text(now, unix_now, &text);
            }
            LinkEvent::Closed {
                reason,
                reconnect_in,
            } => {
                log::warn!(
                    "Realtime link closed ({reason}); reconnecting in {} ms",
                    reconnect_in.as_millis()
                );
                self.conv.handle_link_closed(now);
            }
            LinkEvent::Failed { reason } => {
                log::error!("Realtime link failed: {reason}");
                self.conv.handle_link_closed(now);
                if let Some(audio) = self.audio.as_mut() {
                    audio.play_earcon(crate::voice::Earcon::Failed);
                }
            }
        }
    }

    fn on_button(&mut self, now: Instant, ev: ButtonEvent) {
        let pressed = matches!(ev, ButtonEvent::Pressed);
        if let ButtonEvent::Released { forced: true } = ev {
            log::warn!("the button was held longer than button.max_hold_s: the turn ends here");
        }
        if !pressed {
            // Whatever was captured up to the release belongs to this turn.
            self.feed_capture(now);
        }
        let progress = self.audio.as_ref().map(Audio::progress).unwrap_or_default();
        self.conv.handle_button(now, pressed, progress);
    }

    /// Hands what the microphone captured during a talk to the conversation core.
    fn feed_capture(&mut self, now: Instant) {
        let Some(audio) = self.audio.as_mut() else {
            return;
        };
        let samples = audio.captured(now);
        if !samples.is_empty() {
            self.conv.handle_audio_input(now, samples);
        }
    }

    fn on_task_event(&mut self, now: Instant, ev: TaskEvent) {
        let registry = self.reactor.registry();
        match ev {
            TaskEvent::LogsRead { ticket, task, text } => {
                if let Some(token) = self.pending_logs.remove(&ticket) {
                    let reply = handler::logs_reply(&self.engine, &task, text);
                    self.control.end_stream(registry, token, &reply);
                }
            }
            TaskEvent::Changed => {
                self.state_dirty = true;
                self.task_summary_stale = true;
            }
            TaskEvent::PermissionAsked {
                name,
                request_id,
                verb,
                object,
            } => {
                let line = json!({"ok": true, "event": {"kind": "waiting", "task": name, "request": format!("{verb} {object}")}});
                for t in self.control.subscribers(|s| *s == Subscription::Events) {
                    self.control.stream(registry, t, &line);
                }
                self.conv.handle_permission_asked(
                    now,
                    PermissionAsk {
                        task: name,
                        request_id,
                        verb,
                        object,
                    },
                );
            }
            TaskEvent::PermissionClosed {
                request_id, end, ..
            } => self.conv.handle_permission_closed(now, &request_id, end),
            TaskEvent::Started { name } => {
                let line = json!({"ok": true, "event": {"kind": "started", "task": name}});
                for t in self.control.subscribers(|s| *s == Subscription::Events) {
                    self.control.stream(registry, t, &line);
                }
            }
            TaskEvent::Output { name, text } => {
                let line = json!({"ok": true, "text": text});
                for t in self
                    .control
                    .subscribers(|s| matches!(s, Subscription::Logs { task } if *task == name))
                {
                    self.control.stream(registry, t, &line);
                }
            }
            TaskEvent::Finished {
                name,
                state,
                summary,
            } => {
                let line = json!({"ok": true, "event": {"kind": "finished", "task": name, "state": state.as_str(), "summary": summary}});
                for t in self.control.subscribers(|s| *s == Subscription::Events) {
                    self.control.stream(registry, t, &line);
                }
                let end = json!({"ok": true, "end": true, "task": name, "state": state.as_str()});
                for t in self
                    .control
                    .subscribers(|s| matches!(s, Subscription::Logs { task } if *task == name))
                {
                    self.control.end_stream(registry, t, &end);
                }
                // A shutdown interrupts tasks on purpose; there is no one left to tell.
                if self.shutdown_deadline.is_none() || state != TaskState::Interrupted {
                    self.conv.handle_completion(
                        now,
                        Completion {
                            task: name,
                            state: state.as_str().to_string(),
                            summary,
                        },
                    );
                }
            }
        }
    }

    /// Carries out the conversation core's actions; true when there were any.
    fn run_actions(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(action) = self.conv.poll_action() {
            any = true;
            match action {
                Action::Send(event) => {
                    if let Some(trace) = self.trace.as_mut() {
                        trace.sent(now, serde_json::to_value(&event).unwrap_or(Value::Null));
                    }
                    let registry = self.reactor.registry();
                    match self.link.as_mut() {
                        Some(link) => {
                            if let Err(e) = link.send_text(registry, event.to_json()) {
                                log::warn!("cannot send to the Realtime link: {e}");
                            }
                        }
                        None => log::debug!("no link: dropped an event"),
                    }
                }
                Action::Play { pcm } => {
                    if let Some(audio) = self.audio.as_mut() {
                        audio.play(&pcm);
                    }
                }
                Action::FlushPlayback => {
                    if let Some(audio) = self.audio.as_mut() {
                        audio.flush_playback();
                    }
                }
                Action::Earcon(e) => {
                    if let Some(audio) = self.audio.as_mut() {
                        audio.play_earcon(e);
                    }
                }
                Action::StartCapture => {
                    if let Some(audio) = self.audio.as_mut() {
                        let preroll = audio.start_capture(now);
                        if !preroll.is_empty() {
                            self.conv.handle_audio_input(now, preroll);
                        }
                    }
                }
                Action::StopCapture => {
                    if let Some(audio) = self.audio.as_mut() {
                        audio.stop_capture();
                    }
                }
                Action::TranscriptChanged => self.state_dirty = true,
                Action::Reconnect { reason } => {
                    if let Some(link) = self.link.as_mut() {
                        log::info!("Realtime link: reconnecting ({reason})");
                        link.reconnect_now(self.reactor.registry(), now, &reason);
                        self.conv.handle_link_closed(now);
                    }
                }
                Action::LinkFatal { reason } => {
                    if let Some(link) = self.link.as_mut() {
                        link.fail(self.reactor.registry(), reason);
                        self.conv.handle_link_closed(now);
                    }
                }
                Action::CallTool {
                    call_id,
                    name,
                    arguments,
                    consent,
                } => {
                    let output = tools::run(&mut self.engine, now, &name, &arguments, &consent);
                    self.conv.handle_tool_output(now, &call_id, output);
                }
            }
        }
        any
    }

    fn on_request(&mut self, now: Instant, token: mio::Token, req: Request) {
        let parts = Parts {
            now,
            engine: &mut self.engine,
            conv: &mut self.conv,
            button: &mut self.button,
        };
        let (link, audio) = (&self.link, &self.audio);
        let (link_off, started) = (&self.link_off, self.started);
        let shutting_down = self.shutdown_deadline.is_some();
        let control = &self.control;
        let vitals = || Vitals {
            control: control.status(),
            ..vitals(link, link_off, audio.as_ref(), now, started, shutting_down)
        };
        match handler::handle(req, parts, vitals) {
            Handled::Reply(reply) => self.control.reply(self.reactor.registry(), token, &reply),
            Handled::Subscribe(first, subscription) => {
                self.control.subscribe(token, subscription);
                self.control.reply(self.reactor.registry(), token, &first);
            }
            Handled::Later { ticket, task } => {
                // `logs` is a streaming command ending in an `end` line: the connection
                // waits as a follower would, and ends with the one reply.
                self.control.subscribe(token, Subscription::Logs { task });
                self.pending_logs.insert(ticket, token);
            }
        }
    }

    /// One line for `systemctl status`: the link, the tasks, and audio or button trouble.
    fn status_line(&self) -> String {
        let link = match (&self.link, &self.link_off) {
            (Some(link), _) => link.status().as_str(),
            (None, Some((state, _))) => state,
            (None, None) => "disabled",
        };
        let mut line = format!(
            "link {link}; {} task(s) running",
            self.engine.running_count()
        );
        if let Some(why) = self
            .link
            .as_ref()
            .and_then(Link::last_error)
            .or(self.link_off.as_ref().map(|(_, why)| why.as_str()))
            .filter(|_| link == "failed")
        {
            line.push_str(&format!(" ({why})"));
        }
        let audio = self.audio.as_ref().map(|a| a.status().state);
        for (part, state) in [
            ("audio", audio),
            ("button", Some(self.button.status().state)),
        ] {
            if let Some(state @ ("failed" | "opening")) = state {
                line.push_str(&format!("; {part} {state}"));
            }
        }
        line
    }

    fn persist(&mut self) {
        self.state_dirty = false;
        if let Some(writer) = self.state.as_ref() {
            writer.submit(&StateFile {
                version: state::VERSION,
                tasks: self.engine.records().to_vec(),
                transcript: self.conv.transcript().to_vec(),
            });
        }
    }

    fn reload(&mut self) {
        self.notifier.reloading();
        self.reload_config();
        self.notifier.reloaded();
    }

    fn reload_config(&mut self) {
        let source = Config::locate(self.config_path.as_deref(), &self.paths);
        match Config::load_source(&source) {
            Err(e) => log::error!(
                "SIGHUP: the configuration has an error, the old one stays in force: {e}"
            ),
            Ok(new) => {
                for (section, changed) in [
                    ("[realtime]", new.realtime != self.config.realtime),
                    ("[audio]", new.audio != self.config.audio),
                    ("[button]", new.button != self.config.button),
                ] {
                    if changed {
                        log::warn!("SIGHUP: changes to {section} take effect when walkie restarts");
                    }
                }
                self.engine
                    .update_settings(engine_settings(&new, &self.paths));
                self.config.agent = new.agent;
                self.config.projects = new.projects;
                log::info!("SIGHUP: configuration reloaded ([agent] and [projects] applied)");
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant, why: &str) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        log::info!(
            "{why}: shutting down ({} task(s) running)",
            self.engine.running_count()
        );
        self.notifier.stopping(&format!("{why}: shutting down"));
        let grace = Duration::from_millis(self.config.agent.cancel_grace_ms);
        self.shutdown_deadline = Some(now + grace + SHUTDOWN_MARGIN);
        if let Some(audio) = self.audio.take() {
            audio.stop();
        }
        if let Some(link) = self.link.as_mut() {
            link.close(self.reactor.registry(), now);
        }
        self.button.stop(self.reactor.registry());
        self.engine.shutdown(now);
    }

    fn shutdown_complete(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.shutdown_deadline else {
            return false;
        };
        if self.engine.is_idle() {
            return true;
        }
        if now < deadline {
            return false;
        }
        if !self.force_killed {
            // SIGKILL everything; their exits come back through SIGCHLD like any other,
            // within a last short deadline (a timer, not a sleep).
            log::error!("shutdown: tasks did not stop in time; killing what is left");
            self.engine.kill_everything(now);
            self.force_killed = true;
            self.shutdown_deadline = Some(now + FORCE_KILL_WAIT);
            return false;
        }
        log::error!(
            "shutdown: {} task(s) still not gone after SIGKILL; the next start stops their leftovers",
            self.engine.running_count()
        );
        true
    }

    fn finish_shutdown(&mut self) {
        self.persist();
        self.engine.close();
        if let Some(writer) = self.state.take() {
            writer.finish();
        }
        if let Some(trace) = self.trace.as_mut() {
            trace.flush();
        }
        self.control.shutdown(self.reactor.registry());
        log::info!("walkie stopped");
    }
}

/// The audio threads never log; the loop says what they reported.
fn log_audio(reports: Vec<AudioReport>) {
    for r in reports {
        match r {
            AudioReport::Warning(w) => log::warn!("audio: {w}"),
            AudioReport::DeviceOpened { which, name } => {
                log::info!("audio: {which} device {name} open")
            }
            AudioReport::DeviceFailed { which, error } => {
                log::warn!(
                    "audio: {which} device failed: {error} (walkie keeps running and retries)"
                )
            }
            AudioReport::Xrun { which } => log::debug!("audio: {which} xrun, recovered"),
        }
    }
}

/// What only the daemon knows, for `walkie ctl status`.
fn vitals(
    link: &Option<Link>,
    link_off: &Option<(&'static str, String)>,
    audio: Option<&Audio>,
    now: Instant,
    started: Instant,
    shutting_down: bool,
) -> Vitals {
    let (link, link_error) = match (link, link_off) {
        (Some(link), _) => {
            let state = match link.status() {
                LinkStatus::Disabled => "disabled",
                LinkStatus::Connecting => "connecting",
                LinkStatus::Connected => "connected",
                LinkStatus::Backoff { .. } => "backoff",
                LinkStatus::Failed => "failed",
            };
            (state, link.last_error().map(str::to_string))
        }
        (None, Some((state, why))) => (*state, Some(why.clone())),
        (None, None) => ("disabled", None),
    };
    let audio = match audio {
        Some(a) => serde_json::to_value(a.status()).unwrap_or(Value::Null),
        None => json!({"state": "disabled"}),
    };
    Vitals {
        link,
        link_error,
        audio,
        control: Value::Null,
        uptime_s: now.saturating_duration_since(started).as_secs(),
        shutting_down,
    }
}

fn containment_request(config: &Config, paths: &Paths) -> contain::Request {
    contain::Request {
        scan_only: config.agent.containment == crate::config::ContainmentMode::Scan,
        state_dir: paths.state_dir.clone(),
    }
}

fn engine_settings(config: &Config, paths: &Paths) -> EngineSettings {
    EngineSettings {
        agent: config.agent.clone(),
        projects: config
            .projects
            .keys()
            .filter_map(|k| Some((k.clone(), config.project_dir(k)?)))
            .collect(),
        paths: paths.clone(),
        openai_key_var: config.realtime.api_key_env.clone(),
    }
}

fn conversation_settings(config: &Config) -> ConversationSettings {
    ConversationSettings {
        session: SessionSettings {
            instructions_extra: config.realtime.instructions.clone(),
            voice: config.realtime.voice.clone(),
            transcription_model: config.realtime.transcription_model.clone(),
        },
        ..ConversationSettings::default()
    }
}

/// The link, or why there is none.
fn build_link(
    config: &Config,
    waker: std::sync::Arc<mio::Waker>,
) -> (Option<Link>, Option<(&'static str, String)>) {
    let Some(url) = config.realtime_url() else {
        return (None, Some(("disabled", "realtime.url is \"none\"".into())));
    };
    let api_key = match config.link_api_key() {
        Ok(key) => key,
        // The message already says "no OpenAI API key: …".
        Err(e) => return (None, Some(("failed", e.to_string()))),
    };
    let ca_file = Some(config.realtime.ca_file.trim())
        .filter(|s| !s.is_empty())
        .map(crate::paths::expand_home);
    let settings = LinkSettings {
        url,
        api_key,
        ca_file,
        ping_interval: Duration::from_millis(config.realtime.ping_interval_ms),
        backoff_min: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
        max_write_buffer: 4 * 1024 * 1024,
    };
    (Some(Link::new(settings, waker)), None)
}
