//! The conversation policy core (sans-IO): turns, responses, tool calls, barge-in, task
//! notifications, permission requests, context restore, session rotation and the transcript.
//!
//! Permission requests of agents are announced like completions, when the user is idle,
//! one at a time, oldest first. The model may answer one (`answer_task`) only after a user
//! turn — spoken or typed — that came after its announcement: the core hands the daemon,
//! with each `answer_task` call, the requests that rule allows ([`Action::CallTool`]'s
//! `consent`), so the model can never approve on its own.
//!
//! It owns no fd, thread or clock. The daemon feeds it what happened — link open/closed,
//! server text frames, button edges, captured audio, playback progress, task completions,
//! typed `say` text, timeouts — with the current `Instant`, and executes the [`Action`]s it
//! queues, in order: frames for the link, PCM and flushes for the audio engine, earcons,
//! capture start/stop, state-file writes, reconnects. Deadlines are reported by
//! [`Conversation::poll_timeout`] (quinn-proto / smoltcp style).
//!
//! Protocol facts this relies on are in realtime-ga.md ("Rules that bite"): one active
//! response per conversation, no automatic continuation after a function call, truncation
//! only up to audio that exists, a new socket being a new empty session.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine as _;
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::clock::rfc3339_from_unix;
use crate::realtime::events::{
    ApiError, ClientEvent, Item, ServerEvent, SessionSettings, parse_server_event, session_update,
};
pub use crate::tasks::claude::RequestEnd;
use crate::voice::{Earcon, FRAMES_PER_MS, PlaybackProgress};

/// A finished task, as the task engine reports it (summary already short and redacted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub task: String,
    /// `succeeded`, `failed`, `cancelled`, `interrupted`; `denied` for a permission request
    /// nobody answered in time.
    pub state: String,
    pub summary: String,
}

/// A permission request an agent waits on, as the task engine reports it (its words
/// already short, redacted and speakable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionAsk {
    pub task: String,
    pub request_id: String,
    /// "run", "write", "edit", "fetch", "use".
    pub verb: String,
    /// The command, path or URL.
    pub object: String,
}

/// A pending permission request and when it was put to the user.
#[derive(Debug, Clone)]
struct Ask {
    ask: PermissionAsk,
    /// `user_turns` when it was announced in this session; None until then.
    announced: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// One turn of the transcript kept for context restore and the state file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TranscriptEntry {
    pub role: Role,
    pub text: String,
    /// RFC 3339 UTC.
    pub at: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSettings {
    pub session: SessionSettings,
    /// Quiet time after the last activity before a task notification is spoken.
    pub notify_cooldown: Duration,
    /// Characters of transcript turns replayed into a new session.
    pub restore_budget_chars: usize,
    /// Transcript entries kept.
    pub transcript_max: usize,
}

impl Default for ConversationSettings {
    fn default() -> Self {
        ConversationSettings {
            session: SessionSettings::default(),
            notify_cooldown: Duration::from_millis(1500),
            restore_budget_chars: 6000,
            transcript_max: 50,
        }
    }
}

/// What the daemon does next, in queue order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send to the link (in order).
    Send(ClientEvent),
    /// Assistant speech (24 kHz mono), appended to playback.
    Play {
        pcm: Vec<i16>,
    },
    /// Barge-in: drop queued speech at once.
    FlushPlayback,
    Earcon(Earcon),
    /// Fetch the pre-roll from the audio engine and feed it through
    /// [`Conversation::handle_audio_input`], then live audio until [`Action::StopCapture`].
    StartCapture,
    StopCapture,
    /// The transcript changed: persist the state file.
    TranscriptChanged,
    /// Session rotation or `session_expired`: close the link and reconnect now.
    Reconnect {
        reason: String,
    },
    /// The server refused walkie for good (bad key, quota, model, beta shape): stop retrying.
    LinkFatal {
        reason: String,
    },
    /// Run the model's tool `name` with its JSON `arguments` and hand the output back with
    /// [`Conversation::handle_tool_output`]. The response that made the call is not
    /// continued (no `response.create`) until every output of it is back.
    CallTool {
        call_id: String,
        name: String,
        arguments: String,
        /// `answer_task` only: the permission requests (ids) the user may have answered —
        /// announced, then a user turn. An answer to any other is refused.
        consent: Vec<String>,
    },
}

/// Why a typed `say` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SayError {
    /// No Realtime session is ready. The caller tells the control client the link is down.
    #[error("not connected to the Realtime API")]
    NotConnected,
}

/// A commit needs at least 100 ms of audio, or the server answers
/// `input_audio_buffer_commit_empty`.
const MIN_TURN_SAMPLES: u64 = 100 * FRAMES_PER_MS;
/// The shortest press that counts as speech (docs/ARCHITECTURE.md, "The flows": under 100 ms,
/// clear instead).
const MIN_TURN: Duration = Duration::from_millis(100);
/// Rotate at most this long before `expires_at`.
const ROTATION_LEAD_MAX_S: i64 = 300;
/// The longest Realtime session (realtime-ga.md); the fallback when `expires_at` is implausible.
const MAX_SESSION_S: i64 = 3600;
/// After the server refused a `response.create` because a response of its own is running,
/// wait this long for that response's `response.done` before asking again anyway: a missed
/// event must not silence the assistant for the rest of the session.
const BLOCKED_RETRY: Duration = Duration::from_secs(5);
/// Cancelled response ids remembered to drop their late audio.
const CANCELLED_MEMORY: usize = 8;
/// Assistant items whose playback position is tracked for truncation.
const HEARD_MEMORY: usize = 16;
/// Server text quoted in a log line.
const LOG_SNIPPET_CHARS: usize = 200;
/// Committed turns still waiting for their transcription.
const AWAITED_TRANSCRIPTIONS_MAX: usize = 32;
/// Error codes that stop the link (shared with the link's refused-upgrade check).
const FATAL_CODES: &[&str] = &crate::realtime::events::FATAL_ERROR_CODES;

/// The Realtime session as the policy sees it.
#[derive(Debug)]
enum Link {
    Down,
    /// Socket open; the server has not sent `session.created` yet.
    Open,
    Ready(SessionInfo),
    /// `Reconnect` or `LinkFatal` was emitted: nothing more is sent until the link closes.
    Leaving,
}

#[derive(Debug)]
struct SessionInfo {
    id: String,
    expires_at: Option<i64>,
    rotate_at: Option<Instant>,
}

/// The one response the default conversation may have (realtime-ga.md: a second
/// `response.create` is refused with `conversation_already_has_active_response`).
#[derive(Debug)]
enum Responding {
    Idle,
    /// `response.create` sent, `response.created` not seen yet: already counts as active.
    Requested {
        event_id: String,
        /// It announces the completions in `Conversation::announcing`.
        announcement: bool,
        /// A barge-in happened before the server named the response: cancel it once it does.
        cancel: bool,
    },
    Active {
        id: String,
        announcement: bool,
        cancelled: bool,
        /// It made function calls whose outputs were sent: the server does not continue on
        /// its own, so its `response.done` owes one `response.create`.
        tool_outputs: bool,
    },
    /// Our `response.create` was refused because the server runs a response we have not
    /// seen; wait for its `response.done` (or [`BLOCKED_RETRY`]).
    Blocked {
        since: Instant,
    },
}

/// A `response.create` owed as soon as nothing is active and the user is not talking;
/// several reasons coalesce into one.
#[derive(Debug, Clone, Copy)]
struct Want {
    announcement: bool,
}

/// Where one assistant audio item sits on the playback axis (frames, the same axis as
/// [`PlaybackProgress`]): `start` is `queued_frames` when its first delta was played, `end`
/// the position after its last delta so far.
#[derive(Debug)]
struct HeardItem {
    item_id: String,
    response_id: String,
    start: u64,
    end: u64,
}

/// The conversation policy. See the module header.
pub struct Conversation {
    settings: ConversationSettings,
    actions: VecDeque<Action>,
    link: Link,
    responding: Responding,
    wanted: Option<Want>,
    next_event_number: u64,
    button_down: bool,
    /// When the current press began.
    pressed_at: Option<Instant>,
    capturing: bool,
    captured_samples: u64,
    /// Frames of every `Play` emitted; equals `PlaybackProgress::queued_frames` once the
    /// daemon has executed them.
    queued_frames: u64,
    /// Highest `PlaybackProgress::consumed_frames` reported.
    consumed_frames: u64,
    heard: VecDeque<HeardItem>,
    cancelled_responses: VecDeque<String>,
    /// Completions not yet announced (oldest first).
    pending: VecDeque<Completion>,
    /// Completions announced in the current session whose response has not finished.
    announcing: Vec<Completion>,
    /// Last press, release, `response.done` or playback drain: notifications wait for quiet.
    last_activity: Option<Instant>,
    transcript: Vec<TranscriptEntry>,
    /// Ordering key of each transcript entry: a user turn's transcription may arrive after
    /// the answer, so its place is reserved when the turn is committed.
    transcript_order: Vec<u64>,
    next_order: u64,
    /// Committed user item id → (reserved order, unix seconds of the commit).
    awaited_transcriptions: HashMap<String, (u64, i64)>,
    /// The last server error worth a user's attention (`code: message`), for status.
    last_error: Option<String>,
    /// Tool calls of this session handed to the daemon whose output is not back yet.
    calls_in_flight: Vec<String>,
    /// The task registry in a few lines, as the daemon last reported it (context restore).
    task_summary: String,
    /// Permission requests agents wait on, oldest first; put to the user one at a time.
    asks: VecDeque<Ask>,
    /// User turns so far (a spoken turn committed, or a typed one).
    user_turns: u64,
}

impl Conversation {
    pub fn new(settings: ConversationSettings) -> Self {
        Conversation {
            settings,
            actions: VecDeque::new(),
            link: Link::Down,
            responding: Responding::Idle,
            wanted: None,
            next_event_number: 1,
            button_down: false,
            pressed_at: None,
            capturing: false,
            captured_samples: 0,
            queued_frames: 0,
            consumed_frames: 0,
            heard: VecDeque::new(),
            cancelled_responses: VecDeque::new(),
            pending: VecDeque::new(),
            announcing: Vec::new(),
            last_activity: None,
            transcript: Vec::new(),
            transcript_order: Vec::new(),
            next_order: 0,
            awaited_transcriptions: HashMap::new(),
            last_error: None,
            calls_in_flight: Vec::new(),
            task_summary: String::new(),
            asks: VecDeque::new(),
            user_turns: 0,
        }
    }

    /// The socket is open; the session is usable only after `session.created`.
    pub fn handle_link_open(&mut self, now: Instant) {
        if !matches!(self.link, Link::Down) {
            self.handle_link_closed(now);
        }
        self.link = Link::Open;
    }

    /// The socket is gone. Everything tied to the server session is dropped (a new socket is
    /// a new, empty session); queued notifications and the transcript are kept, and an
    /// announcement that did not finish is queued again.
    pub fn handle_link_closed(&mut self, now: Instant) {
        if matches!(self.link, Link::Down) {
            return;
        }
        self.link = Link::Down;
        if self.capturing {
            self.capturing = false;
            self.push(Action::StopCapture);
            self.push(Action::Earcon(Earcon::LinkLost));
        }
        self.responding = Responding::Idle;
        self.wanted = None;
        self.heard.clear();
        self.cancelled_responses.clear();
        self.awaited_transcriptions.clear();
        // Their outputs would name calls of a session that no longer exists.
        self.calls_in_flight.clear();
        for completion in self.announcing.drain(..).rev() {
            self.pending.push_front(completion);
        }
        // A new session never heard the question: it is asked again, and a "yes" said to
        // the old one does not count.
        for ask in self.asks.iter_mut() {
            ask.announced = None;
        }
        self.after_input(now);
    }

    /// One text frame from the server. `unix_now_s` dates transcript entries and anchors
    /// `expires_at`.
    pub fn handle_server_text(&mut self, now: Instant, unix_now_s: i64, text: &str) {
        let event = match parse_server_event(text) {
            Ok(event) => event,
            Err(e) => {
                warn!("skipping server frame ({e}): {}", snippet(text));
                return;
            }
        };
        if matches!(self.link, Link::Down) {
            debug!("server event while the link is down, ignored: {event:?}");
            return;
        }
        self.handle_server_event(now, unix_now_s, event);
        self.after_input(now);
    }

    /// The output of an [`Action::CallTool`]: sent to the model as the call's
    /// `function_call_output`. An output for a call of a session that has since closed is
    /// dropped (the new session never saw the call).
    pub fn handle_tool_output(&mut self, now: Instant, call_id: &str, output: String) {
        let Some(index) = self.calls_in_flight.iter().position(|c| c == call_id) else {
            debug!("output of tool call {call_id} dropped: its session is gone");
            return;
        };
        self.calls_in_flight.swap_remove(index);
        self.push(Action::Send(ClientEvent::create_item(
            Item::FunctionCallOutput {
                call_id: call_id.to_owned(),
                output,
            },
        )));
        self.after_input(now);
    }

    /// The task registry in a few plain lines (running and recently finished tasks), as
    /// the next context restore should tell it. The daemon reports it when it changes.
    pub fn handle_task_summary(&mut self, summary: String) {
        self.task_summary = summary;
    }

    /// A button edge. `playback` is the audio engine's progress at the press, for barge-in.
    pub fn handle_button(&mut self, now: Instant, pressed: bool, playback: PlaybackProgress) {
        if pressed == self.button_down {
            return;
        }
        self.button_down = pressed;
        self.last_activity = Some(now);
        self.note_playback(playback);
        if pressed {
            self.pressed_at = Some(now);
            self.press(playback);
        } else {
            let held = self
                .pressed_at
                .take()
                .map(|t| now.saturating_duration_since(t));
            self.release(held.unwrap_or_default());
        }
        self.after_input(now);
    }

    /// Captured microphone audio (pre-roll first, then live); ignored unless capturing.
    pub fn handle_audio_input(&mut self, now: Instant, samples: &[i16]) {
        if !self.capturing || !self.session_ready() || samples.is_empty() {
            return;
        }
        self.captured_samples += samples.len() as u64;
        self.push(Action::Send(ClientEvent::append(samples)));
        self.after_input(now);
    }

    /// Playback progress from the audio engine; a drain counts as activity.
    pub fn handle_playback(&mut self, now: Instant, playback: PlaybackProgress) {
        let was_playing = self.playing();
        self.note_playback(playback);
        if was_playing && !self.playing() {
            self.last_activity = Some(now);
        }
        self.after_input(now);
    }

    /// A task finished; it is announced when the user is idle (possibly after a reconnect).
    pub fn handle_completion(&mut self, now: Instant, completion: Completion) {
        self.pending.push_back(completion);
        self.after_input(now);
    }

    /// An agent asks for permission; the request is put to the user when they are idle,
    /// after the ones before it.
    pub fn handle_permission_asked(&mut self, now: Instant, ask: PermissionAsk) {
        if self.asks.iter().all(|a| a.ask.request_id != ask.request_id) {
            self.asks.push_back(Ask {
                ask,
                announced: None,
            });
        }
        self.after_input(now);
    }

    /// A permission request stopped pending (answered, withdrawn, or denied for want of an
    /// answer — which the user is told).
    pub fn handle_permission_closed(&mut self, now: Instant, request_id: &str, end: RequestEnd) {
        let Some(at) = self
            .asks
            .iter()
            .position(|a| a.ask.request_id == request_id)
        else {
            return;
        };
        let ask = self.asks.remove(at).expect("found above").ask;
        if end == RequestEnd::TimedOut {
            self.pending.push_back(Completion {
                task: ask.task,
                state: "denied".into(),
                summary: format!(
                    "nobody answered its request to {} {}, so walkie told it no; it may ask again",
                    ask.verb, ask.object
                ),
            });
        }
        self.after_input(now);
    }

    /// A typed user turn (`walkie ctl say`): a user text item and a response. `at` is the
    /// RFC 3339 time recorded in the transcript.
    pub fn handle_say(&mut self, now: Instant, text: &str, at: &str) -> Result<(), SayError> {
        if !self.session_ready() {
            return Err(SayError::NotConnected);
        }
        self.user_turns += 1;
        let order = self.reserve_order();
        self.record(order, Role::User, text, at.to_owned());
        self.push(Action::Send(ClientEvent::create_item(Item::user_text(
            text,
        ))));
        self.want_response(false);
        self.last_activity = Some(now);
        self.after_input(now);
        Ok(())
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Responding::Blocked { since } = self.responding
            && since.checked_add(BLOCKED_RETRY).is_none_or(|t| now >= t)
        {
            warn!("no response.done after a refused response.create; asking again");
            self.responding = Responding::Idle;
        }
        self.after_input(now);
    }

    /// The next instant [`Conversation::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut deadlines = Vec::new();
        if let Responding::Blocked { since } = self.responding {
            deadlines.push(since.checked_add(BLOCKED_RETRY));
        }
        // `quiet == None` means idle already: whatever waits only on quiet has happened.
        if let Some(quiet) = self.idle_from() {
            if !self.pending.is_empty() || self.next_ask().is_some() {
                deadlines.push(quiet);
            }
            if let Some(rotate_at) = self.rotate_at() {
                deadlines.push(Some(quiet.map_or(rotate_at, |q| q.max(rotate_at))));
            }
        }
        deadlines.into_iter().flatten().min()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Oldest first, at most `transcript_max` entries.
    pub fn transcript(&self) -> &[TranscriptEntry] {
        &self.transcript
    }

    /// The transcript tail from the state file, at start.
    pub fn restore_transcript(&mut self, entries: Vec<TranscriptEntry>) {
        let skip = entries.len().saturating_sub(self.settings.transcript_max);
        self.transcript.clear();
        self.transcript_order.clear();
        for entry in entries.into_iter().skip(skip) {
            let order = self.reserve_order();
            self.transcript.push(entry);
            self.transcript_order.push(order);
        }
    }

    /// For `walkie ctl status`.
    pub fn status(&self) -> Value {
        let (link, session_id, expires_at) = match &self.link {
            Link::Down => ("down", None, None),
            Link::Open => ("open", None, None),
            Link::Ready(s) => ("ready", Some(s.id.clone()), s.expires_at),
            Link::Leaving => ("leaving", None, None),
        };
        let active_response = match &self.responding {
            Responding::Idle => Value::Null,
            Responding::Requested { .. } => json!("requested"),
            Responding::Active { id, .. } => json!(id),
            Responding::Blocked { .. } => json!("blocked"),
        };
        json!({
            "link": link,
            "session_id": session_id,
            "session_ready": self.session_ready(),
            "expires_at": expires_at.map(rfc3339_from_unix),
            "active_response": active_response,
            "response_wanted": self.wanted.is_some(),
            "queued_notifications": self.pending.len(),
            "pending_permissions": self.asks.len(),
            "announcing": self.announcing.len(),
            "button_down": self.button_down,
            "capturing": self.capturing,
            "playing": self.playing(),
            "transcript_entries": self.transcript.len(),
            "last_error": self.last_error,
        })
    }

    // ---- server events ----

    fn handle_server_event(&mut self, now: Instant, unix_now_s: i64, event: ServerEvent) {
        match event {
            ServerEvent::SessionCreated {
                session_id,
                expires_at,
            } => self.session_created(now, unix_now_s, session_id, expires_at),
            ServerEvent::SessionUpdated => debug!("session.updated"),
            ServerEvent::InputAudioBufferCommitted { item_id } => {
                if self.awaited_transcriptions.len() >= AWAITED_TRANSCRIPTIONS_MAX {
                    self.awaited_transcriptions.clear();
                }
                let order = self.reserve_order();
                self.awaited_transcriptions
                    .insert(item_id, (order, unix_now_s));
            }
            ServerEvent::InputAudioBufferCleared => {}
            ServerEvent::InputAudioTranscriptionCompleted {
                item_id,
                transcript,
            } => {
                let (order, at) = self
                    .awaited_transcriptions
                    .remove(&item_id)
                    .unwrap_or_else(|| (self.reserve_order(), unix_now_s));
                self.record(order, Role::User, &transcript, rfc3339_from_unix(at));
            }
            ServerEvent::InputAudioTranscriptionFailed { item_id, message } => {
                self.awaited_transcriptions.remove(&item_id);
                warn!("transcription of user turn {item_id} failed: {message}");
            }
            ServerEvent::ResponseCreated { response_id } => self.response_created(response_id),
            ServerEvent::ResponseOutputItemAdded {
                response_id,
                item_id,
                item_type,
                ..
            } => debug!("response {response_id}: {item_type} item {item_id}"),
            ServerEvent::ResponseOutputAudioDelta {
                response_id,
                item_id,
                delta,
            } => self.audio_delta(response_id, item_id, &delta),
            ServerEvent::ResponseOutputAudioDone { .. } => {}
            ServerEvent::ResponseOutputAudioTranscriptDone {
                transcript: text, ..
            }
            | ServerEvent::ResponseOutputTextDone { text, .. } => {
                let order = self.reserve_order();
                self.record(order, Role::Assistant, &text, rfc3339_from_unix(unix_now_s));
            }
            ServerEvent::ResponseFunctionCallArgumentsDone {
                response_id,
                call_id,
                name,
                arguments,
                ..
            } => self.function_call(response_id, call_id, name, arguments),
            ServerEvent::ResponseDone {
                response_id,
                status,
            } => self.response_done(now, &response_id, &status),
            ServerEvent::Error(error) => self.server_error(now, error),
            ServerEvent::RateLimitsUpdated { rate_limits } => {
                debug!("rate limits: {rate_limits:?}")
            }
            ServerEvent::Unknown { kind } => debug!("ignoring server event {kind}"),
        }
    }

    fn session_created(
        &mut self,
        now: Instant,
        unix_now_s: i64,
        session_id: String,
        expires_at: Option<i64>,
    ) {
        info!("Realtime session {session_id} created");
        let rotate_at = expires_at.and_then(|expires| {
            let mut remaining = expires.saturating_sub(unix_now_s);
            if !(1..=2 * MAX_SESSION_S).contains(&remaining) {
                // The server never hands out an expired or day-long session: our clock is
                // off (a Pi without RTC before NTP). Rotating at once would loop; assume
                // the longest session instead.
                warn!("expires_at is {remaining} s away by our clock; assuming {MAX_SESSION_S} s");
                remaining = MAX_SESSION_S;
            }
            let lead = ROTATION_LEAD_MAX_S.min(remaining / 4);
            now.checked_add(Duration::from_secs((remaining - lead) as u64))
        });
        self.link = Link::Ready(SessionInfo {
            id: session_id,
            expires_at,
            rotate_at,
        });
        self.push(Action::Send(session_update(&self.settings.session)));
        self.restore_context();
    }

    /// A new session knows nothing: one system message with the task registry, then the
    /// newest transcript turns that fit the budget, oldest first.
    fn restore_context(&mut self) {
        let summary = self.task_summary.trim().to_owned();
        let summary = summary.as_str();
        if summary.is_empty() && self.transcript.is_empty() {
            return;
        }
        let mut message = String::from(
            "Context restored after a reconnect: this is a new session. The last turns of the \
             earlier conversation follow as items.",
        );
        if summary.is_empty() {
            message.push_str("\n\nNo tasks are running or recently finished.");
        } else {
            message.push_str("\n\nTasks:\n");
            message.push_str(summary);
        }
        self.push(Action::Send(ClientEvent::create_item(Item::system_text(
            &message,
        ))));
        let mut budget = self.settings.restore_budget_chars;
        let mut first = self.transcript.len();
        for (index, entry) in self.transcript.iter().enumerate().rev() {
            let chars = entry.text.chars().count();
            if chars > budget {
                break;
            }
            budget -= chars;
            first = index;
        }
        let items: Vec<Item> = self.transcript[first..]
            .iter()
            .map(|entry| match entry.role {
                Role::User => Item::user_text(&entry.text),
                Role::Assistant => Item::assistant_text(&entry.text),
            })
            .collect();
        for item in items {
            self.push(Action::Send(ClientEvent::create_item(item)));
        }
    }

    fn response_created(&mut self, id: String) {
        match &self.responding {
            Responding::Requested {
                announcement,
                cancel,
                ..
            } => {
                let (announcement, cancelled) = (*announcement, *cancel);
                if cancelled {
                    // The id-less cancel at the press may have reached the server before the
                    // response existed; name it now.
                    self.remember_cancelled(&id);
                    self.push(Action::Send(ClientEvent::ResponseCancel {
                        event_id: None,
                        response_id: Some(id.clone()),
                    }));
                }
                self.responding = Responding::Active {
                    id,
                    announcement,
                    cancelled,
                    tool_outputs: false,
                };
            }
            Responding::Idle | Responding::Blocked { .. } => {
                debug!("response {id} started by the server");
                self.responding = Responding::Active {
                    id,
                    announcement: false,
                    cancelled: false,
                    tool_outputs: false,
                };
            }
            Responding::Active { id: active, .. } => {
                debug!("response {id} created while {active} is active (out of band?)");
            }
        }
    }

    fn response_done(&mut self, now: Instant, id: &str, status: &str) {
        debug!("response {id} done: {status}");
        match &self.responding {
            Responding::Active {
                id: active,
                announcement,
                cancelled,
                tool_outputs,
            } if active == id || id.is_empty() => {
                let (announcement, follow_up) = (*announcement, *tool_outputs && !cancelled);
                // A cancelled response's calls need no follow-up: the user is talking, and
                // their turn brings its own response.
                if follow_up {
                    self.want_response(false);
                }
                // An interrupted announcement still reached the conversation: the model has
                // the system message and the user chose to talk over it.
                if announcement {
                    self.announcing.clear();
                }
                self.responding = Responding::Idle;
                self.last_activity = Some(now);
            }
            Responding::Blocked { .. } => {
                self.responding = Responding::Idle;
                self.last_activity = Some(now);
            }
            Responding::Active { id: active, .. } => {
                debug!("response.done for {id} while {active} is active; ignored");
            }
            // Ours is not created yet; this was one we never saw start.
            Responding::Requested { .. } | Responding::Idle => {}
        }
    }

    fn audio_delta(&mut self, response_id: String, item_id: String, delta: &str) {
        if self.cancelled_responses.contains(&response_id) {
            return;
        }
        let bytes = match base64::engine::general_purpose::STANDARD.decode(delta) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!("audio delta of {item_id} is not base64 ({e}); dropped");
                return;
            }
        };
        if bytes.len() % 2 != 0 {
            warn!("audio delta of {item_id} has an odd byte count; last byte dropped");
        }
        let pcm: Vec<i16> = bytes
            .chunks_exact(2)
            .map(|pair| i16::from_le_bytes([pair[0], pair[1]]))
            .collect();
        if pcm.is_empty() {
            return;
        }
        let start = self.queued_frames;
        self.queued_frames += pcm.len() as u64;
        match self.heard.back_mut() {
            Some(last) if last.item_id == item_id && last.response_id == response_id => {
                last.end = self.queued_frames;
            }
            _ => {
                self.heard.push_back(HeardItem {
                    item_id,
                    response_id,
                    start,
                    end: self.queued_frames,
                });
                self.prune_heard();
            }
        }
        self.push(Action::Play { pcm });
    }

    fn function_call(
        &mut self,
        response_id: String,
        call_id: String,
        name: String,
        arguments: String,
    ) {
        if !self.session_ready() {
            return;
        }
        // The user barged in on this response: do not act on a decision they interrupted
        // (it may be destructive); tell the model instead.
        if self.cancelled_responses.contains(&response_id) {
            info!("not running {name}: its response was interrupted");
            let output =
                json!({"status": "not_run", "reason": "the user interrupted before this call ran"})
                    .to_string();
            self.push(Action::Send(ClientEvent::create_item(
                Item::FunctionCallOutput { call_id, output },
            )));
        } else {
            info!("tool call {name} {}", snippet(&arguments));
            self.calls_in_flight.push(call_id.clone());
            // Only what the user answered after hearing the question.
            let consent = if name == "answer_task" {
                self.asks
                    .iter()
                    .filter(|a| a.announced.is_some_and(|turns| self.user_turns > turns))
                    .map(|a| a.ask.request_id.clone())
                    .collect()
            } else {
                Vec::new()
            };
            self.push(Action::CallTool {
                call_id,
                name,
                arguments,
                consent,
            });
        }
        match &mut self.responding {
            Responding::Active {
                id, tool_outputs, ..
            } if *id == response_id || response_id.is_empty() => *tool_outputs = true,
            // A call outside the response we track still needs a response to follow it.
            _ => self.want_response(false),
        }
    }

    fn server_error(&mut self, now: Instant, error: ApiError) {
        let code = error.code.as_deref().unwrap_or("");
        let harmless = matches!(
            code,
            "response_cancel_not_active" | "input_audio_buffer_commit_empty"
        );
        if !harmless {
            self.last_error = Some(format!("{code}: {}", error.message));
        }
        match code {
            "conversation_already_has_active_response" => {
                debug!("response.create refused, a response is active; asking again after it");
                match &mut self.responding {
                    Responding::Requested { announcement, .. } => {
                        let announcement = *announcement;
                        self.want_response(announcement);
                        self.responding = Responding::Blocked { since: now };
                    }
                    // The response we took for ours is the server's; ours is still owed.
                    Responding::Active { announcement, .. } => {
                        let owed = std::mem::take(announcement);
                        self.want_response(owed);
                    }
                    Responding::Idle | Responding::Blocked { .. } => self.want_response(false),
                }
            }
            _ if harmless => {
                debug!("harmless server error {code}: {}", error.message);
            }
            "session_expired" => {
                info!("session expired: {}", error.message);
                self.leave(Action::Reconnect {
                    reason: "session expired".into(),
                });
            }
            _ if FATAL_CODES.contains(&code) => {
                let reason = if error.message.is_empty() {
                    code.to_owned()
                } else {
                    error.message.clone()
                };
                warn!("Realtime API refused walkie ({code}): {}", error.message);
                self.leave(Action::LinkFatal { reason });
            }
            _ => {
                warn!(
                    "server error {} {code}: {} (param {:?}, event {:?})",
                    error.kind, error.message, error.param, error.event_id
                );
                // Our response.create itself was refused: without this the slot would wait
                // for a response.done that never comes.
                if let Responding::Requested { event_id, .. } = &self.responding
                    && error.event_id.as_deref() == Some(event_id.as_str())
                {
                    self.responding = Responding::Idle;
                    self.announcing.clear();
                }
            }
        }
    }

    // ---- button ----

    fn press(&mut self, playback: PlaybackProgress) {
        if !self.session_ready() {
            if self.playing() {
                self.flush_playback();
            }
            self.push(Action::Earcon(Earcon::LinkLost));
            return;
        }
        self.barge_in(playback);
        self.push(Action::Earcon(Earcon::Press));
        self.push(Action::Send(ClientEvent::InputAudioBufferClear {
            event_id: None,
        }));
        self.push(Action::StartCapture);
        self.capturing = true;
        self.captured_samples = 0;
    }

    /// `held`: how long the button was down. A tap shorter than [`MIN_TURN`] is not a turn
    /// even though the pre-roll alone would make a committable buffer.
    fn release(&mut self, held: Duration) {
        if !self.capturing {
            return;
        }
        self.capturing = false;
        self.push(Action::StopCapture);
        self.push(Action::Earcon(Earcon::Release));
        if held >= MIN_TURN && self.captured_samples >= MIN_TURN_SAMPLES {
            self.push(Action::Send(ClientEvent::InputAudioBufferCommit {
                event_id: None,
            }));
            self.user_turns += 1;
            self.want_response(false);
        } else {
            self.push(Action::Send(ClientEvent::InputAudioBufferClear {
                event_id: None,
            }));
        }
    }

    /// Silence the assistant: drop queued speech, cancel the response, and tell the server
    /// how much of the playing item the user actually heard.
    fn barge_in(&mut self, playback: PlaybackProgress) {
        let response_active = !matches!(self.responding, Responding::Idle);
        if !self.playing() && !response_active {
            return;
        }
        let truncate = self.truncation_point(playback.consumed_frames.max(self.consumed_frames));
        self.flush_playback();
        match &mut self.responding {
            Responding::Idle => {}
            Responding::Requested { cancel, .. } => {
                *cancel = true;
                self.push(Action::Send(ClientEvent::ResponseCancel {
                    event_id: None,
                    response_id: None,
                }));
            }
            Responding::Active { id, cancelled, .. } => {
                if !*cancelled {
                    *cancelled = true;
                    let id = id.clone();
                    self.remember_cancelled(&id);
                    self.push(Action::Send(ClientEvent::ResponseCancel {
                        event_id: None,
                        response_id: Some(id),
                    }));
                }
            }
            Responding::Blocked { .. } => self.push(Action::Send(ClientEvent::ResponseCancel {
                event_id: None,
                response_id: None,
            })),
        }
        if let Some((item_id, frames)) = truncate {
            self.push(Action::Send(ClientEvent::ConversationItemTruncate {
                event_id: None,
                item_id,
                content_index: 0,
                audio_end_ms: frames / FRAMES_PER_MS,
            }));
        }
    }

    /// The item playing at `consumed` and the frames of it played, never more than received.
    fn truncation_point(&self, consumed: u64) -> Option<(String, u64)> {
        if let Some(item) = self.heard.iter().find(|item| item.end > consumed) {
            let played = consumed.min(item.end).saturating_sub(item.start);
            return Some((item.item_id.clone(), played));
        }
        // Everything received was heard, but the response is still producing audio the user
        // will now never hear: cut the item where the user stopped hearing it.
        let last = self.heard.back()?;
        match &self.responding {
            Responding::Active { id, .. } if *id == last.response_id => {
                Some((last.item_id.clone(), last.end - last.start))
            }
            _ => None,
        }
    }

    fn flush_playback(&mut self) {
        self.push(Action::FlushPlayback);
        // A flush counts every queued frame as consumed (voice.rs).
        self.consumed_frames = self.queued_frames;
        self.heard.clear();
    }

    // ---- idle-time work: owed responses, rotation, notifications ----

    fn after_input(&mut self, now: Instant) {
        self.pump_response();
        self.maybe_rotate(now);
        self.maybe_announce(now);
    }

    fn pump_response(&mut self) {
        // A response.create before every output is in would answer without them.
        if self.wanted.is_none()
            || !matches!(self.responding, Responding::Idle)
            || !self.session_ready()
            || self.button_down
            || self.capturing
            || !self.calls_in_flight.is_empty()
        {
            return;
        }
        if let Some(want) = self.wanted.take() {
            self.send_response_create(want.announcement);
        }
    }

    fn send_response_create(&mut self, announcement: bool) {
        let event_id = format!("walkie_response_{}", self.next_event_number);
        self.next_event_number += 1;
        self.push(Action::Send(ClientEvent::ResponseCreate {
            event_id: Some(event_id.clone()),
            response: None,
        }));
        self.responding = Responding::Requested {
            event_id,
            announcement,
            cancel: false,
        };
    }

    fn want_response(&mut self, announcement: bool) {
        let announcement = announcement || self.wanted.is_some_and(|w| w.announcement);
        self.wanted = Some(Want { announcement });
    }

    /// `None` while the user is not idle (button, capture, response active or owed, speech
    /// playing, no session); otherwise when the cooldown after the last activity ends
    /// (`Some(None)`: no activity yet, idle already).
    fn idle_from(&self) -> Option<Option<Instant>> {
        let idle = self.session_ready()
            && !self.button_down
            && !self.capturing
            && matches!(self.responding, Responding::Idle)
            && self.wanted.is_none()
            && self.calls_in_flight.is_empty()
            && !self.playing();
        if !idle {
            return None;
        }
        Some(match self.last_activity {
            // An overflowing cooldown means "never".
            Some(at) => Some(at.checked_add(self.settings.notify_cooldown)?),
            None => None,
        })
    }

    fn rotate_at(&self) -> Option<Instant> {
        match &self.link {
            Link::Ready(session) => session.rotate_at,
            _ => None,
        }
    }

    fn maybe_rotate(&mut self, now: Instant) {
        let (Some(rotate_at), Some(quiet)) = (self.rotate_at(), self.idle_from()) else {
            return;
        };
        if now >= rotate_at && quiet.is_none_or(|t| now >= t) {
            info!("rotating the Realtime session before it expires");
            self.leave(Action::Reconnect {
                reason: "session rotation".into(),
            });
        }
    }

    /// The permission request to put to the user next: the oldest, once no other is
    /// waiting for the user's answer.
    fn next_ask(&self) -> Option<usize> {
        if self.asks.iter().any(|a| a.announced.is_some()) {
            return None;
        }
        (!self.asks.is_empty()).then_some(0)
    }

    fn maybe_announce(&mut self, now: Instant) {
        let ask = self.next_ask();
        if self.pending.is_empty() && ask.is_none() {
            return;
        }
        let Some(quiet) = self.idle_from() else {
            return;
        };
        if quiet.is_some_and(|t| now < t) {
            return;
        }
        let batch: Vec<Completion> = self.pending.drain(..).collect();
        let mut message = String::new();
        if !batch.is_empty() {
            message.push_str("Task update:");
        }
        for c in &batch {
            let summary = if c.summary.trim().is_empty() {
                "no summary"
            } else {
                c.summary.trim()
            };
            message.push_str(&format!("\n- {} ({}): {}", c.task, c.state, summary));
        }
        if let Some(at) = ask {
            let turns = self.user_turns;
            let ask = &mut self.asks[at];
            ask.announced = Some(turns);
            if !message.is_empty() {
                message.push_str("\n\n");
            }
            message.push_str(&format!(
                "Permission request: {} wants to {}: {}. Allow? Ask the user in those words \
                 and wait for their answer before calling answer_task.",
                ask.ask.task, ask.ask.verb, ask.ask.object
            ));
        }
        self.push(Action::Earcon(Earcon::TaskDone));
        self.push(Action::Send(ClientEvent::create_item(Item::system_text(
            &message,
        ))));
        self.announcing.extend(batch);
        self.send_response_create(true);
    }

    // ---- helpers ----

    fn push(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    fn leave(&mut self, action: Action) {
        self.link = Link::Leaving;
        self.push(action);
    }

    fn session_ready(&self) -> bool {
        matches!(self.link, Link::Ready(_))
    }

    fn playing(&self) -> bool {
        self.consumed_frames < self.queued_frames
    }

    fn note_playback(&mut self, playback: PlaybackProgress) {
        self.consumed_frames = self.consumed_frames.max(playback.consumed_frames);
        self.prune_heard();
    }

    /// Items already played out are kept only while they are the newest (see
    /// `truncation_point`).
    fn prune_heard(&mut self) {
        while self.heard.len() > 1
            && (self.heard.len() > HEARD_MEMORY
                || self
                    .heard
                    .front()
                    .is_some_and(|h| h.end <= self.consumed_frames))
        {
            self.heard.pop_front();
        }
    }

    fn remember_cancelled(&mut self, id: &str) {
        if self.cancelled_responses.len() >= CANCELLED_MEMORY {
            self.cancelled_responses.pop_front();
        }
        self.cancelled_responses.push_back(id.to_owned());
    }

    fn reserve_order(&mut self) -> u64 {
        let order = self.next_order;
        self.next_order += 1;
        order
    }

    /// Adds a transcript entry at its place in turn order, keeping the newest `transcript_max`.
    fn record(&mut self, order: u64, role: Role, text: &str, at: String) {
        let text = text.trim();
        if text.is_empty() || self.settings.transcript_max == 0 {
            return;
        }
        let index = self.transcript_order.partition_point(|o| *o < order);
        self.transcript.insert(
            index,
            TranscriptEntry {
                role,
                text: text.to_owned(),
                at,
            },
        );
        self.transcript_order.insert(index, order);
        let excess = self
            .transcript
            .len()
            .saturating_sub(self.settings.transcript_max);
        self.transcript.drain(..excess);
        self.transcript_order.drain(..excess);
        self.push(Action::TranscriptChanged);
    }
}

/// At most [`LOG_SNIPPET_CHARS`] characters of `text`, for a log line.
fn snippet(text: &str) -> &str {
    match text.char_indices().nth(LOG_SNIPPET_CHARS) {
        Some((end, _)) => &text[..end],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::realtime::events::INSTRUCTIONS;

    const UNIX0: i64 = 1_795_581_369;

    /// The daemon's tool runner in miniature: records each call, answers at once.
    #[derive(Default)]
    struct FakeTools {
        calls: Vec<(String, String)>,
        summary: String,
        /// Calls are left in flight (the test hands the outputs back itself).
        hold: bool,
        /// The `consent` of each call run, in order.
        consents: Vec<Vec<String>>,
    }

    impl FakeTools {
        fn call(&mut self, name: &str, arguments: &str) -> String {
            self.calls.push((name.into(), arguments.into()));
            format!(r#"{{"status":"ok","tool":"{name}"}}"#)
        }
    }

    /// The daemon's side in miniature: a fake clock, the fake task engine and the playback
    /// counters the audio engine would report.
    struct Rig {
        conv: Conversation,
        tools: FakeTools,
        t0: Instant,
        /// The instant of the latest input, at which tool outputs come back.
        now: std::cell::Cell<Instant>,
        playback: PlaybackProgress,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::with(ConversationSettings::default(), FakeTools::default())
        }

        fn with(settings: ConversationSettings, tools: FakeTools) -> Rig {
            let t0 = Instant::now();
            let mut conv = Conversation::new(settings);
            conv.handle_task_summary(tools.summary.clone());
            Rig {
                conv,
                tools,
                t0,
                now: std::cell::Cell::new(t0),
                playback: PlaybackProgress::default(),
            }
        }

        /// Open link and a 60-minute session, actions drained.
        fn ready() -> Rig {
            let mut rig = Rig::new();
            rig.open_session(0);
            rig
        }

        fn at(&self, ms: u64) -> Instant {
            let now = self.t0 + Duration::from_millis(ms);
            self.now.set(now);
            now
        }

        /// Every action queued, in order; tool calls are run as the daemon runs them (at
        /// once, their outputs handed back) unless the tools hold them.
        fn drain(&mut self) -> Vec<Action> {
            let mut actions = Vec::new();
            while let Some(action) = self.conv.poll_action() {
                match &action {
                    Action::Play { pcm } => self.playback.queued_frames += pcm.len() as u64,
                    Action::FlushPlayback => {
                        self.playback.consumed_frames = self.playback.queued_frames
                    }
                    Action::CallTool {
                        call_id,
                        name,
                        arguments,
                        consent,
                    } if !self.tools.hold => {
                        self.tools.consents.push(consent.clone());
                        let output = self.tools.call(name, arguments);
                        self.conv
                            .handle_tool_output(self.now.get(), call_id, output);
                    }
                    _ => {}
                }
                actions.push(action);
            }
            actions
        }

        fn server(&mut self, ms: u64, text: &str) -> Vec<Action> {
            let now = self.at(ms);
            let unix = UNIX0 + (ms / 1000) as i64;
            self.conv.handle_server_text(now, unix, text);
            self.drain()
        }

        fn tool_output(&mut self, ms: u64, call_id: &str, output: &str) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_tool_output(now, call_id, output.into());
            self.drain()
        }

        fn open_session(&mut self, ms: u64) -> Vec<Action> {
            self.conv.handle_link_open(self.at(ms));
            let unix = UNIX0 + (ms / 1000) as i64;
            self.server(ms, &session_created("sess_1", unix + 3600))
        }

        fn press(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_button(now, true, self.playback);
            self.drain()
        }

        fn release(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_button(now, false, self.playback);
            self.drain()
        }

        fn audio(&mut self, ms: u64, samples: usize) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_audio_input(now, &vec![7i16; samples]);
            self.drain()
        }

        /// A whole spoken turn of `samples` samples.
        fn turn(&mut self, ms: u64, samples: usize) -> Vec<Action> {
            let mut actions = self.press(ms);
            actions.extend(self.audio(ms + 1, samples));
            // Held as long as the audio lasts (a press under 100 ms is never a turn).
            actions.extend(self.release(ms + 1 + samples as u64 / FRAMES_PER_MS));
            actions
        }

        fn consume_to(&mut self, ms: u64, consumed: u64) -> Vec<Action> {
            self.playback.consumed_frames = consumed;
            let now = self.at(ms);
            self.conv.handle_playback(now, self.playback);
            self.drain()
        }

        fn say(&mut self, ms: u64, text: &str) -> Vec<Action> {
            let now = self.at(ms);
            self.conv
                .handle_say(now, text, "2026-11-25T04:36:09Z")
                .unwrap();
            self.drain()
        }

        fn timeout(&mut self, ms: u64) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_timeout(now);
            self.drain()
        }

        fn complete(&mut self, ms: u64, task: &str, state: &str, summary: &str) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_completion(
                now,
                Completion {
                    task: task.into(),
                    state: state.into(),
                    summary: summary.into(),
                },
            );
            self.drain()
        }
    }

    fn session_created(id: &str, expires_at: i64) -> String {
        format!(
            r#"{{"type":"session.created","event_id":"ev_1","session":{{"id":"{id}","object":"realtime.session","type":"realtime","expires_at":{expires_at}}}}}"#
        )
    }

    fn created(response: &str) -> String {
        format!(
            r#"{{"type":"response.created","event_id":"ev","response":{{"id":"{response}","object":"realtime.response","status":"in_progress","output":[]}}}}"#
        )
    }

    fn done(response: &str, status: &str) -> String {
        format!(
            r#"{{"type":"response.done","event_id":"ev","response":{{"id":"{response}","status":"{status}","output":[]}}}}"#
        )
    }

    fn pcm(samples: usize) -> Vec<i16> {
        (0..samples).map(|i| (i % 1000) as i16 - 500).collect()
    }

    fn delta(response: &str, item: &str, samples: usize) -> String {
        let mut bytes = Vec::new();
        for s in pcm(samples) {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
        format!(
            r#"{{"type":"response.output_audio.delta","event_id":"ev","response_id":"{response}","item_id":"{item}","output_index":0,"content_index":0,"delta":"{b64}"}}"#
        )
    }

    fn function_call(response: &str, call: &str, name: &str, arguments: &str) -> String {
        json!({
            "type": "response.function_call_arguments.done", "event_id": "ev",
            "response_id": response, "item_id": format!("item_{call}"), "output_index": 0,
            "call_id": call, "name": name, "arguments": arguments
        })
        .to_string()
    }

    fn error(code: &str, event_id: Option<&str>) -> String {
        json!({"type": "error", "event_id": "ev", "error": {
            "type": "invalid_request_error", "code": code, "message": format!("{code} happened"),
            "param": null, "event_id": event_id}})
        .to_string()
    }

    /// The JSON of every `Send`, in order.
    fn sent(actions: &[Action]) -> Vec<Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(event) => Some(serde_json::from_str(&event.to_json()).unwrap()),
                _ => None,
            })
            .collect()
    }

    /// One short word per action, for asserting sequences.
    fn outline(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                Action::Send(event) => {
                    let v: Value = serde_json::from_str(&event.to_json()).unwrap();
                    v["type"].as_str().unwrap().to_owned()
                }
                Action::Play { pcm } => format!("play {}", pcm.len()),
                Action::FlushPlayback => "flush".into(),
                Action::Earcon(e) => format!("earcon {e:?}"),
                Action::StartCapture => "start capture".into(),
                Action::StopCapture => "stop capture".into(),
                Action::TranscriptChanged => "transcript".into(),
                Action::Reconnect { reason } => format!("reconnect: {reason}"),
                Action::LinkFatal { reason } => format!("fatal: {reason}"),
                Action::CallTool { name, .. } => format!("call {name}"),
            })
            .collect()
    }

    fn response_create(n: u64) -> Value {
        json!({"type": "response.create", "event_id": format!("walkie_response_{n}")})
    }

    fn count(actions: &[Action], kind: &str) -> usize {
        outline(actions).iter().filter(|k| *k == kind).count()
    }

    // ---- 1. session start and context restore ----

    #[test]
    fn session_created_configures_the_session_and_restores_context() {
        let settings = ConversationSettings {
            restore_budget_chars: 40,
            ..Default::default()
        };
        let tools = FakeTools {
            summary: "flaky-test: running\nbuild-fix: succeeded".into(),
            ..Default::default()
        };
        let mut rig = Rig::with(settings.clone(), tools);
        let entry = |role, text: &str| TranscriptEntry {
            role,
            text: text.into(),
            at: "2026-11-25T04:00:00Z".into(),
        };
        rig.conv.restore_transcript(vec![
            entry(Role::User, "fix the flaky test please"), // 25 chars: over the budget left
            entry(Role::Assistant, "Started flaky-test."),  // 19
            entry(Role::User, "how is it going?"),          // 16
        ]);
        rig.conv.handle_link_open(rig.at(0));
        assert_eq!(rig.drain(), []);
        assert_eq!(rig.conv.status()["session_ready"], false);

        let actions = rig.server(10, &session_created("sess_9", UNIX0 + 3600));
        assert_eq!(actions[0], Action::Send(session_update(&settings.session)));
        let sent = sent(&actions);
        assert_eq!(sent.len(), 4, "{actions:?}");
        assert_eq!(sent[0]["session"]["instructions"], INSTRUCTIONS);
        let system = &sent[1]["item"];
        assert_eq!(system["role"], "system");
        assert_eq!(system["content"][0]["type"], "input_text");
        let text = system["content"][0]["text"].as_str().unwrap();
        assert!(
            text.starts_with("Context restored after a reconnect"),
            "{text}"
        );
        assert!(
            text.contains("flaky-test: running\nbuild-fix: succeeded"),
            "{text}"
        );
        // Newest turns first within the budget, replayed oldest first.
        assert_eq!(
            sent[2],
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Started flaky-test."}]}})
        );
        assert_eq!(
            sent[3],
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "how is it going?"}]}})
        );
        let status = rig.conv.status();
        assert_eq!(status["session_ready"], true);
        assert_eq!(status["session_id"], "sess_9");
        assert_eq!(status["expires_at"], rfc3339_from_unix(UNIX0 + 3600));
    }

    #[test]
    fn a_transcript_alone_is_restored_and_nothing_at_all_is_not() {
        let mut rig = Rig::new();
        let actions = rig.open_session(0);
        assert_eq!(outline(&actions), ["session.update"]);

        let mut rig = Rig::new();
        rig.conv.restore_transcript(vec![TranscriptEntry {
            role: Role::User,
            text: "hello".into(),
            at: "2026-11-25T04:00:00Z".into(),
        }]);
        let actions = rig.open_session(0);
        let sent = sent(&actions);
        assert_eq!(sent.len(), 3);
        assert!(
            sent[1]["item"]["content"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("Context restored after a reconnect")
        );
        assert_eq!(sent[2]["item"]["content"][0]["text"], "hello");
    }

    #[test]
    fn restore_transcript_keeps_the_newest_entries() {
        let mut rig = Rig::with(
            ConversationSettings {
                transcript_max: 2,
                ..Default::default()
            },
            FakeTools::default(),
        );
        let entries: Vec<TranscriptEntry> = ["a", "b", "c"]
            .iter()
            .map(|t| TranscriptEntry {
                role: Role::User,
                text: (*t).into(),
                at: "x".into(),
            })
            .collect();
        rig.conv.restore_transcript(entries.clone());
        assert_eq!(rig.conv.transcript(), &entries[1..]);
    }

    // ---- 2. push-to-talk ----

    #[test]
    fn a_turn_clears_appends_commits_and_asks_for_a_response() {
        let mut rig = Rig::ready();
        assert_eq!(
            rig.press(100),
            [
                Action::Earcon(Earcon::Press),
                Action::Send(ClientEvent::InputAudioBufferClear { event_id: None }),
                Action::StartCapture
            ]
        );
        let first = rig.audio(110, 1200);
        assert_eq!(first, [Action::Send(ClientEvent::append(&[7; 1200]))]);
        assert_eq!(
            sent(&first)[0]["audio"].as_str().unwrap().len(),
            2400 * 4 / 3
        );
        assert_eq!(
            outline(&rig.audio(120, 1200)),
            ["input_audio_buffer.append"]
        );
        let release = rig.release(200);
        assert_eq!(
            outline(&release),
            [
                "stop capture",
                "earcon Release",
                "input_audio_buffer.commit",
                "response.create"
            ]
        );
        assert_eq!(sent(&release)[1], response_create(1));
    }

    #[test]
    fn a_turn_shorter_than_100_ms_is_cleared() {
        let mut rig = Rig::ready();
        let actions = rig.turn(100, 2399);
        assert_eq!(
            outline(&actions),
            [
                "earcon Press",
                "input_audio_buffer.clear",
                "start capture",
                "input_audio_buffer.append",
                "stop capture",
                "earcon Release",
                "input_audio_buffer.clear"
            ]
        );
    }

    #[test]
    fn audio_is_ignored_unless_capturing() {
        let mut rig = Rig::ready();
        assert_eq!(rig.audio(10, 4800), []);
        rig.turn(20, 2400);
        assert_eq!(rig.audio(30, 4800), []);
    }

    #[test]
    fn a_press_without_a_session_plays_link_lost_and_captures_nothing() {
        let mut rig = Rig::new();
        assert_eq!(rig.press(0), [Action::Earcon(Earcon::LinkLost)]);
        assert_eq!(rig.audio(10, 4800), []);
        assert_eq!(rig.release(20), []);
        // Socket open but no session.created yet: still not usable.
        rig.conv.handle_link_open(rig.at(30));
        assert_eq!(rig.press(40), [Action::Earcon(Earcon::LinkLost)]);
    }

    #[test]
    fn losing_the_link_while_capturing_stops_capture() {
        let mut rig = Rig::ready();
        rig.press(0);
        rig.conv.handle_link_closed(rig.at(10));
        assert_eq!(
            rig.drain(),
            [Action::StopCapture, Action::Earcon(Earcon::LinkLost)]
        );
        assert_eq!(rig.audio(20, 4800), []);
        assert_eq!(rig.release(30), []);
    }

    // ---- 3. barge-in ----

    #[test]
    fn barge_in_flushes_cancels_and_truncates_at_what_was_heard() {
        let mut rig = Rig::ready();
        // An earlier answer, fully played: the playback axis does not start at zero.
        rig.say(0, "hello");
        rig.server(10, &created("resp_0"));
        assert_eq!(rig.server(20, &delta("resp_0", "item_0", 2400)).len(), 1);
        rig.server(30, &done("resp_0", "completed"));
        rig.consume_to(200, 2400);

        rig.say(300, "tell me more");
        rig.server(310, &created("resp_1"));
        let played = rig.server(320, &delta("resp_1", "item_1", 4800));
        assert_eq!(played, [Action::Play { pcm: pcm(4800) }]);
        rig.server(330, &delta("resp_1", "item_1", 4800));
        rig.consume_to(340, 2400 + 7200); // 300 ms of item_1 heard

        let actions = rig.press(350);
        assert_eq!(
            outline(&actions),
            [
                "flush",
                "response.cancel",
                "conversation.item.truncate",
                "earcon Press",
                "input_audio_buffer.clear",
                "start capture"
            ]
        );
        let sent = sent(&actions);
        assert_eq!(
            sent[0],
            json!({"type": "response.cancel", "response_id": "resp_1"})
        );
        assert_eq!(
            sent[1],
            json!({"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 300})
        );
        // Late audio of the cancelled response is dropped.
        assert_eq!(rig.server(360, &delta("resp_1", "item_1", 4800)), []);
        assert_eq!(rig.conv.status()["playing"], false);
        // The response owes nothing and the user is talking: no response.create.
        assert_eq!(rig.server(370, &done("resp_1", "cancelled")), []);
    }

    #[test]
    fn truncation_never_exceeds_the_audio_received() {
        let mut rig = Rig::ready();
        rig.say(0, "go");
        rig.server(10, &created("resp_1"));
        rig.server(20, &delta("resp_1", "item_1", 4800));
        // Everything received was played (the engine even over-reports), the response goes on.
        rig.consume_to(500, 4800);
        rig.playback.consumed_frames = 9999;
        let actions = rig.press(600);
        assert_eq!(
            sent(&actions)[1],
            json!({"type": "conversation.item.truncate", "item_id": "item_1", "content_index": 0, "audio_end_ms": 200})
        );
    }

    #[test]
    fn barge_in_truncates_the_item_that_is_playing() {
        let mut rig = Rig::ready();
        rig.say(0, "go");
        rig.server(10, &created("resp_1"));
        rig.server(20, &delta("resp_1", "item_1", 4800));
        rig.server(30, &delta("resp_1", "item_2", 4800));
        rig.consume_to(40, 4800 + 1200);
        let sent = sent(&rig.press(50));
        assert_eq!(sent[1]["item_id"], "item_2");
        assert_eq!(sent[1]["audio_end_ms"], 50);
    }

    #[test]
    fn barge_in_on_speech_of_a_finished_response_does_not_cancel() {
        let mut rig = Rig::ready();
        rig.say(0, "go");
        rig.server(10, &created("resp_1"));
        rig.server(20, &delta("resp_1", "item_1", 24_000));
        rig.server(30, &done("resp_1", "completed"));
        rig.consume_to(40, 12_000);
        let actions = rig.press(50);
        assert_eq!(
            outline(&actions),
            [
                "flush",
                "conversation.item.truncate",
                "earcon Press",
                "input_audio_buffer.clear",
                "start capture"
            ]
        );
        assert_eq!(sent(&actions)[0]["audio_end_ms"], 500);
    }

    #[test]
    fn barge_in_before_response_created_cancels_it_once_named() {
        let mut rig = Rig::ready();
        rig.say(0, "go");
        let actions = rig.press(10);
        assert_eq!(
            outline(&actions),
            [
                "flush",
                "response.cancel",
                "earcon Press",
                "input_audio_buffer.clear",
                "start capture"
            ]
        );
        assert_eq!(sent(&actions)[0], json!({"type": "response.cancel"}));
        assert_eq!(
            sent(&rig.server(20, &created("resp_1"))),
            [json!({"type": "response.cancel", "response_id": "resp_1"})]
        );
        assert_eq!(rig.server(30, &delta("resp_1", "item_1", 4800)), []);
    }

    #[test]
    fn a_press_with_nothing_playing_is_no_barge_in() {
        let mut rig = Rig::ready();
        rig.say(0, "go");
        rig.server(10, &created("resp_1"));
        rig.server(20, &delta("resp_1", "item_1", 4800));
        rig.server(30, &done("resp_1", "completed"));
        rig.consume_to(400, 4800);
        assert_eq!(count(&rig.press(500), "flush"), 0);
    }

    // ---- 4. one response at a time ----

    #[test]
    fn response_requests_wait_for_the_active_one_and_coalesce() {
        let mut rig = Rig::ready();
        assert_eq!(sent(&rig.say(0, "one"))[1], response_create(1));
        assert_eq!(
            outline(&rig.say(10, "two")),
            ["transcript", "conversation.item.create"]
        );
        rig.server(20, &created("resp_1"));
        rig.say(30, "three");
        assert_eq!(
            rig.turn(40, 4800)
                .iter()
                .filter(|a| matches!(a, Action::Send(ClientEvent::ResponseCreate { .. })))
                .count(),
            0
        );
        let after = rig.server(50, &done("resp_1", "completed"));
        assert_eq!(sent(&after), [response_create(2)]);
        assert_eq!(rig.conv.status()["active_response"], "requested");
    }

    #[test]
    fn no_response_starts_while_the_user_holds_the_button() {
        let mut rig = Rig::ready();
        rig.press(0);
        assert_eq!(count(&rig.say(10, "typed meanwhile"), "response.create"), 0);
        let release = rig.release(20); // too short to commit
        assert_eq!(
            outline(&release),
            [
                "stop capture",
                "earcon Release",
                "input_audio_buffer.clear",
                "response.create"
            ]
        );
    }

    #[test]
    fn a_refused_response_create_is_sent_again_after_the_next_done() {
        let mut rig = Rig::ready();
        rig.say(0, "one");
        let refused = error(
            "conversation_already_has_active_response",
            Some("walkie_response_1"),
        );
        assert_eq!(rig.server(10, &refused), []);
        rig.server(20, &created("resp_server"));
        assert_eq!(
            sent(&rig.server(30, &done("resp_server", "completed"))),
            [response_create(2)]
        );
    }

    #[test]
    fn a_refused_response_create_is_retried_if_no_done_ever_comes() {
        let mut rig = Rig::ready();
        rig.say(0, "one");
        let refused = error(
            "conversation_already_has_active_response",
            Some("walkie_response_1"),
        );
        rig.server(1000, &refused);
        assert_eq!(rig.conv.poll_timeout(), Some(rig.at(1000) + BLOCKED_RETRY));
        assert_eq!(rig.timeout(5999), []);
        assert_eq!(sent(&rig.timeout(6000)), [response_create(2)]);
    }

    #[test]
    fn harmless_errors_change_nothing() {
        let mut rig = Rig::ready();
        rig.say(0, "one");
        let before = rig.conv.status();
        assert_eq!(
            rig.server(10, &error("response_cancel_not_active", None)),
            []
        );
        assert_eq!(
            rig.server(20, &error("input_audio_buffer_commit_empty", None)),
            []
        );
        assert_eq!(rig.conv.status(), before);
        assert_eq!(before["last_error"], Value::Null);
        // Anything else is reported (and otherwise changes nothing here).
        assert_eq!(rig.server(30, &error("rate_limit_exceeded", None)), []);
        let after = rig.conv.status();
        assert_eq!(
            after["last_error"],
            "rate_limit_exceeded: rate_limit_exceeded happened"
        );
        assert_eq!(after["active_response"], before["active_response"]);
    }

    #[test]
    fn an_otherwise_refused_response_create_frees_the_slot() {
        let mut rig = Rig::ready();
        rig.say(0, "one");
        rig.server(10, &error("invalid_value", Some("walkie_response_1")));
        assert_eq!(sent(&rig.say(20, "two"))[1], response_create(2));
    }

    // ---- 5. tool calls ----

    #[test]
    fn tool_calls_are_answered_at_once_and_followed_by_one_response() {
        let mut rig = Rig::ready();
        rig.say(0, "start two things");
        rig.server(10, &created("resp_1"));
        let first = rig.server(
            20,
            &function_call("resp_1", "call_1", "start_task", r#"{"prompt":"fix it"}"#),
        );
        assert_eq!(
            sent(&first),
            [
                json!({"type": "conversation.item.create", "item": {"type": "function_call_output",
                    "call_id": "call_1", "output": r#"{"status":"ok","tool":"start_task"}"#}})
            ]
        );
        let second = rig.server(30, &function_call("resp_1", "call_2", "list_tasks", "{}"));
        assert_eq!(
            outline(&second),
            ["call list_tasks", "conversation.item.create"]
        );
        assert_eq!(
            rig.tools.calls,
            [
                ("start_task".to_owned(), r#"{"prompt":"fix it"}"#.to_owned()),
                ("list_tasks".to_owned(), "{}".to_owned())
            ]
        );
        assert_eq!(
            sent(&rig.server(40, &done("resp_1", "completed"))),
            [response_create(2)]
        );
        rig.server(50, &created("resp_2"));
        assert_eq!(rig.server(60, &done("resp_2", "completed")), []);
    }

    #[test]
    fn a_tool_call_is_an_action_and_its_response_waits_for_every_output() {
        let mut rig = Rig::ready();
        rig.tools.hold = true;
        rig.say(0, "start two things");
        rig.server(10, &created("resp_1"));
        let actions = rig.server(20, &function_call("resp_1", "call_1", "start_task", "{}"));
        assert_eq!(
            actions,
            [Action::CallTool {
                call_id: "call_1".into(),
                name: "start_task".into(),
                arguments: "{}".into(),
                consent: Vec::new(),
            }]
        );
        rig.server(21, &function_call("resp_1", "call_2", "list_tasks", "{}"));
        // The response ends before the outputs are back (the link delivered it in the same
        // batch): no response.create yet, it would answer without them.
        assert_eq!(rig.server(30, &done("resp_1", "completed")), []);
        assert_eq!(
            rig.conv.poll_timeout(),
            None,
            "nothing to announce meanwhile"
        );
        let first = rig.tool_output(31, "call_2", r#"{"tasks":[]}"#);
        assert_eq!(outline(&first), ["conversation.item.create"]);
        assert_eq!(sent(&first)[0]["item"]["call_id"], "call_2");
        // The last output releases the one response that covers both.
        let last = rig.tool_output(32, "call_1", r#"{"status":"started"}"#);
        assert_eq!(
            outline(&last),
            ["conversation.item.create", "response.create"]
        );
        // An output nobody waits for (repeated, or unknown) is dropped.
        assert_eq!(rig.tool_output(33, "call_1", "{}"), []);
        assert_eq!(rig.tool_output(34, "call_9", "{}"), []);
    }

    #[test]
    fn an_output_for_a_closed_session_is_dropped() {
        let mut rig = Rig::ready();
        rig.tools.hold = true;
        rig.say(0, "start it");
        rig.server(10, &created("resp_1"));
        rig.server(20, &function_call("resp_1", "call_1", "start_task", "{}"));
        rig.conv.handle_link_closed(rig.at(30));
        rig.drain();
        rig.open_session(40);
        // The new session never saw call_1; its output must not be sent there.
        assert_eq!(rig.tool_output(50, "call_1", "{}"), []);
        // And it does not hold up the new session's responses.
        assert_eq!(count(&rig.say(60, "hello"), "response.create"), 1);
    }

    #[test]
    fn a_call_of_an_interrupted_response_is_not_run() {
        let mut rig = Rig::ready();
        rig.say(0, "delete everything");
        rig.server(10, &created("resp_1"));
        rig.server(20, &delta("resp_1", "item_1", 4800));
        rig.press(30);
        let actions = rig.server(40, &function_call("resp_1", "call_1", "start_task", "{}"));
        let output: Value =
            serde_json::from_str(sent(&actions)[0]["item"]["output"].as_str().unwrap()).unwrap();
        assert_eq!(output["status"], "not_run");
        assert!(rig.tools.calls.is_empty());
        assert_eq!(rig.server(50, &done("resp_1", "cancelled")), []);
        rig.audio(60, 4800);
        assert_eq!(count(&rig.release(230), "response.create"), 1);
    }

    #[test]
    fn a_tap_is_cleared_even_with_a_full_pre_roll() {
        let mut rig = Rig::ready();
        rig.press(10);
        rig.audio(11, 7200); // 300 ms of pre-roll
        let actions = rig.release(60); // held 50 ms
        assert_eq!(count(&actions, "input_audio_buffer.commit"), 0);
        assert_eq!(count(&actions, "input_audio_buffer.clear"), 1);
        assert_eq!(count(&actions, "response.create"), 0);
        rig.press(100);
        rig.audio(101, 7200);
        let actions = rig.release(200); // held 100 ms
        assert_eq!(count(&actions, "input_audio_buffer.commit"), 1);
    }

    // ---- 6. notifications ----

    #[test]
    fn a_completion_waits_for_idle_and_the_cooldown() {
        let mut rig = Rig::ready();
        rig.say(0, "hi");
        rig.server(10, &created("resp_1"));
        assert_eq!(
            rig.complete(20, "flaky-test", "succeeded", "Fixed the race."),
            []
        );
        rig.server(30, &delta("resp_1", "item_1", 2400));
        rig.server(40, &done("resp_1", "completed"));
        // Speech still playing: nothing to wait for on the clock.
        assert_eq!(rig.conv.poll_timeout(), None);
        assert_eq!(rig.timeout(5000), []);
        rig.consume_to(6000, 2400);
        assert_eq!(rig.conv.poll_timeout(), Some(rig.at(7500)));
        assert_eq!(rig.timeout(7499), []);
        let actions = rig.timeout(7500);
        assert_eq!(
            outline(&actions),
            [
                "earcon TaskDone",
                "conversation.item.create",
                "response.create"
            ]
        );
        assert_eq!(
            sent(&actions)[0],
            json!({"type": "conversation.item.create", "item": {"type": "message", "role": "system",
                   "content": [{"type": "input_text", "text": "Task update:\n- flaky-test (succeeded): Fixed the race."}]}})
        );
        assert_eq!(rig.conv.status()["announcing"], 1);
        rig.server(7600, &created("resp_2"));
        rig.server(7700, &done("resp_2", "completed"));
        assert_eq!(rig.conv.status()["announcing"], 0);
    }

    #[test]
    fn completions_wait_for_the_button_and_are_batched() {
        let mut rig = Rig::ready();
        rig.press(0);
        rig.complete(10, "docs", "failed", "Build broke.");
        rig.complete(20, "flaky-test", "succeeded", "");
        assert_eq!(rig.timeout(5000), []);
        rig.audio(5010, 100);
        rig.release(5020);
        assert_eq!(rig.timeout(6519), []);
        let actions = rig.timeout(6520);
        assert_eq!(count(&actions, "response.create"), 1);
        assert_eq!(
            sent(&actions)[0]["item"]["content"][0]["text"],
            "Task update:\n- docs (failed): Build broke.\n- flaky-test (succeeded): no summary"
        );
    }

    #[test]
    fn completions_queued_while_the_link_is_down_come_after_reconnect() {
        let mut rig = Rig::new();
        assert_eq!(rig.complete(0, "build", "succeeded", "Green."), []);
        let actions = rig.open_session(100);
        assert_eq!(
            outline(&actions),
            [
                "session.update",
                "earcon TaskDone",
                "conversation.item.create",
                "response.create"
            ]
        );
    }

    #[test]
    fn an_announcement_cut_off_by_the_link_is_queued_again() {
        let mut rig = Rig::ready();
        rig.complete(0, "build", "succeeded", "Green.");
        rig.server(10, &created("resp_1"));
        rig.conv.handle_link_closed(rig.at(20));
        assert_eq!(rig.drain(), []);
        assert_eq!(rig.conv.status()["queued_notifications"], 1);
        let actions = rig.open_session(3000);
        assert_eq!(
            sent(&actions)[1]["item"]["content"][0]["text"],
            "Task update:\n- build (succeeded): Green."
        );
    }

    // ---- 6b. permission requests ----

    impl Rig {
        fn ask(&mut self, ms: u64, task: &str, request_id: &str, command: &str) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_permission_asked(
                now,
                PermissionAsk {
                    task: task.into(),
                    request_id: request_id.into(),
                    verb: "run".into(),
                    object: command.into(),
                },
            );
            self.drain()
        }

        fn closed(&mut self, ms: u64, request_id: &str, end: RequestEnd) -> Vec<Action> {
            let now = self.at(ms);
            self.conv.handle_permission_closed(now, request_id, end);
            self.drain()
        }

        /// A response `id` that makes one `answer_task` call; returns the call's consent.
        fn answer_call(&mut self, ms: u64, id: &str) -> Vec<String> {
            self.server(ms, &created(id));
            let before = self.tools.consents.len();
            self.server(
                ms + 1,
                &function_call(id, &format!("call_{id}"), "answer_task", "{}"),
            );
            self.server(ms + 2, &done(id, "completed"));
            assert_eq!(self.tools.consents.len(), before + 1);
            // The response that follows the tool output.
            self.server(ms + 3, &created(&format!("{id}_after")));
            self.server(ms + 4, &done(&format!("{id}_after"), "completed"));
            self.tools.consents.last().unwrap().clone()
        }

        /// The text of the system messages in `actions`.
        fn system_texts(actions: &[Action]) -> Vec<String> {
            sent(actions)
                .iter()
                .filter(|e| e["item"]["role"] == "system")
                .map(|e| e["item"]["content"][0]["text"].as_str().unwrap().to_owned())
                .collect()
        }
    }

    #[test]
    fn a_permission_request_is_announced_like_a_completion_and_answered_only_after_a_user_turn() {
        let mut rig = Rig::ready();
        let actions = rig.ask(0, "flaky-test", "r1", "npm test");
        assert_eq!(
            outline(&actions),
            [
                "earcon TaskDone",
                "conversation.item.create",
                "response.create"
            ],
            "idle already: asked at once, earcon first"
        );
        let text = &Rig::system_texts(&actions)[0];
        assert!(
            text.starts_with("Permission request: flaky-test wants to run: npm test. Allow?"),
            "{text}"
        );
        // The model answers in the announcement's own response: no user turn came after.
        assert_eq!(rig.answer_call(10, "resp_1"), Vec::<String>::new());
        // The user says yes (typed here); now the answer counts.
        rig.say(2000, "yes, go ahead");
        assert_eq!(rig.answer_call(2010, "resp_2"), ["r1"]);
        // Other tools carry no consent.
        assert!(rig.tools.consents.iter().take(1).all(|c| c.is_empty()));
        // Once answered, it is gone.
        rig.closed(2100, "r1", RequestEnd::Answered);
        assert_eq!(rig.conv.status()["pending_permissions"], 0);
        assert_eq!(rig.timeout(10_000), []);
    }

    #[test]
    fn a_spoken_turn_counts_as_the_answer_and_one_before_the_question_does_not() {
        let mut rig = Rig::ready();
        // A turn committed before the question was asked is no answer to it.
        rig.press(0);
        rig.audio(1, 4800);
        rig.release(300);
        rig.ask(310, "flaky-test", "r1", "npm test");
        rig.server(320, &created("resp_1"));
        rig.server(330, &done("resp_1", "completed"));
        let actions = rig.timeout(1830);
        assert_eq!(Rig::system_texts(&actions).len(), 1, "asked once idle");
        assert_eq!(rig.answer_call(1840, "resp_2"), Vec::<String>::new());
        rig.turn(4000, 4800);
        assert_eq!(rig.answer_call(4300, "resp_3"), ["r1"]);
    }

    #[test]
    fn requests_are_asked_one_at_a_time_oldest_first() {
        let mut rig = Rig::ready();
        rig.press(0);
        rig.ask(10, "build", "r1", "make");
        rig.ask(20, "deploy", "r2", "rsync dist/ host:");
        rig.ask(20, "deploy", "r2", "rsync dist/ host:");
        rig.audio(30, 100);
        rig.release(40);
        let actions = rig.timeout(1540);
        let texts = Rig::system_texts(&actions);
        assert_eq!(texts.len(), 1);
        assert!(texts[0].contains("build wants to run: make"), "{texts:?}");
        assert!(!texts[0].contains("deploy"), "one at a time: {texts:?}");
        rig.server(1550, &created("resp_1"));
        rig.server(1560, &done("resp_1", "completed"));
        // Not asked while the first waits for the user's answer.
        assert_eq!(rig.timeout(9000), []);
        rig.say(9100, "yes");
        assert_eq!(
            rig.answer_call(9110, "resp_2"),
            ["r1"],
            "only the one asked"
        );
        rig.closed(9200, "r1", RequestEnd::Answered);
        let actions = rig.timeout(10_700);
        let texts = Rig::system_texts(&actions);
        assert!(
            texts[0].starts_with("Permission request: deploy wants to run: rsync dist/ host:."),
            "{texts:?}"
        );
    }

    #[test]
    fn an_unanswered_request_is_told_and_a_withdrawn_one_is_never_asked() {
        let mut rig = Rig::ready();
        rig.press(0);
        rig.ask(10, "build", "r1", "make");
        rig.ask(20, "deploy", "r2", "rsync");
        // Withdrawn before it was asked: never asked.
        rig.closed(30, "r2", RequestEnd::Withdrawn);
        rig.audio(40, 100);
        rig.release(50);
        let actions = rig.timeout(1550);
        assert_eq!(Rig::system_texts(&actions).len(), 1);
        rig.server(1560, &created("resp_1"));
        rig.server(1570, &done("resp_1", "completed"));
        // Nobody answered in time: walkie denied it and says so.
        let actions = rig.closed(700_000, "r1", RequestEnd::TimedOut);
        let texts = Rig::system_texts(&actions);
        assert_eq!(
            texts,
            [
                "Task update:\n- build (denied): nobody answered its request to run make, so walkie told it no; it may ask again"
            ]
        );
        rig.server(700_010, &created("resp_2"));
        rig.server(700_020, &done("resp_2", "completed"));
        assert_eq!(rig.timeout(800_000), [], "deploy was never asked");
        assert_eq!(rig.conv.status()["pending_permissions"], 0);
    }

    #[test]
    fn a_new_session_is_asked_again_and_a_yes_to_the_old_one_does_not_count() {
        let mut rig = Rig::ready();
        rig.ask(0, "build", "r1", "make");
        rig.server(10, &created("resp_1"));
        rig.server(20, &done("resp_1", "completed"));
        rig.say(30, "yes");
        rig.conv.handle_link_closed(rig.at(40));
        rig.drain();
        rig.open_session(50);
        let actions = rig.timeout(5000);
        assert!(
            Rig::system_texts(&actions)
                .iter()
                .any(|t| t.contains("build wants to run: make")),
            "asked again in the new session"
        );
        rig.server(5010, &created("resp_2"));
        rig.server(5020, &done("resp_2", "completed"));
        assert_eq!(rig.answer_call(5030, "resp_3"), Vec::<String>::new());
    }

    // ---- 7. transcript ----

    #[test]
    fn the_transcript_keeps_turn_order_when_transcription_is_late() {
        let mut rig = Rig::ready();
        rig.turn(0, 4800);
        assert_eq!(
            rig.server(
                1000,
                r#"{"type":"input_audio_buffer.committed","event_id":"ev","item_id":"user_1"}"#
            ),
            []
        );
        rig.server(1100, &created("resp_1"));
        let assistant = rig.server(
            3000,
            r#"{"type":"response.output_audio_transcript.done","response_id":"resp_1","item_id":"item_1","transcript":"On it."}"#,
        );
        assert_eq!(assistant, [Action::TranscriptChanged]);
        let user = rig.server(
            4000,
            r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"user_1","content_index":0,"transcript":" fix the test "}"#,
        );
        assert_eq!(user, [Action::TranscriptChanged]);
        rig.server(
            5000,
            r#"{"type":"response.output_text.done","response_id":"resp_1","item_id":"item_2","text":"Done."}"#,
        );
        assert_eq!(
            rig.conv.transcript(),
            [
                TranscriptEntry {
                    role: Role::User,
                    text: "fix the test".into(),
                    at: rfc3339_from_unix(UNIX0 + 1)
                },
                TranscriptEntry {
                    role: Role::Assistant,
                    text: "On it.".into(),
                    at: rfc3339_from_unix(UNIX0 + 3)
                },
                TranscriptEntry {
                    role: Role::Assistant,
                    text: "Done.".into(),
                    at: rfc3339_from_unix(UNIX0 + 5)
                },
            ]
        );
        // Empty transcriptions are not turns.
        assert_eq!(
            rig.server(
                6000,
                r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"user_9","transcript":"  "}"#
            ),
            []
        );
    }

    #[test]
    fn the_transcript_is_bounded() {
        let mut rig = Rig::with(
            ConversationSettings {
                transcript_max: 3,
                ..Default::default()
            },
            FakeTools::default(),
        );
        rig.open_session(0);
        for i in 0..5 {
            let text = format!(
                r#"{{"type":"response.output_text.done","response_id":"r","item_id":"i","text":"answer {i}"}}"#
            );
            rig.server(10 + i, &text);
        }
        let texts: Vec<&str> = rig
            .conv
            .transcript()
            .iter()
            .map(|e| e.text.as_str())
            .collect();
        assert_eq!(texts, ["answer 2", "answer 3", "answer 4"]);
    }

    // ---- 8. say ----

    #[test]
    fn say_needs_a_session_and_sends_a_user_turn() {
        let mut rig = Rig::new();
        assert_eq!(
            rig.conv.handle_say(rig.at(0), "hi", "2026-11-25T04:36:09Z"),
            Err(SayError::NotConnected)
        );
        rig.open_session(0);
        let actions = rig.say(10, "what runs?");
        assert_eq!(actions[0], Action::TranscriptChanged);
        assert_eq!(
            sent(&actions),
            [
                json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "what runs?"}]}}),
                response_create(1)
            ]
        );
        assert_eq!(
            rig.conv.transcript(),
            [TranscriptEntry {
                role: Role::User,
                text: "what runs?".into(),
                at: "2026-11-25T04:36:09Z".into()
            }]
        );
    }

    // ---- 9. expiry, rotation, fatal errors ----

    #[test]
    fn the_session_rotates_before_expiry_when_idle() {
        let mut rig = Rig::ready(); // expires in 3600 s: rotate 300 s early
        let rotate = rig.at(3_300_000);
        assert_eq!(rig.conv.poll_timeout(), Some(rotate));
        assert_eq!(rig.timeout(3_299_999), []);
        // Busy at the deadline: wait for idle and the cooldown.
        rig.press(3_299_000);
        assert_eq!(rig.conv.poll_timeout(), None);
        assert_eq!(rig.timeout(3_300_000), []);
        rig.release(3_301_000);
        assert_eq!(rig.conv.poll_timeout(), Some(rig.at(3_302_500)));
        assert_eq!(
            rig.timeout(3_302_500),
            [Action::Reconnect {
                reason: "session rotation".into()
            }]
        );
        // Leaving: nothing more is sent on this session.
        assert!(rig.conv.handle_say(rig.at(3_302_600), "hi", "x").is_err());
        assert_eq!(rig.conv.poll_timeout(), None);
    }

    #[test]
    fn a_short_session_rotates_a_quarter_early() {
        let mut rig = Rig::new();
        rig.conv.handle_link_open(rig.at(0));
        rig.server(0, &session_created("s", UNIX0 + 400));
        assert_eq!(rig.conv.poll_timeout(), Some(rig.at(300_000)));
    }

    #[test]
    fn an_implausible_expiry_assumes_an_hour() {
        for expires_at in [UNIX0 - 10, UNIX0, UNIX0 + 86_400 * 365, i64::MAX, i64::MIN] {
            let mut rig = Rig::new();
            rig.conv.handle_link_open(rig.at(0));
            rig.server(0, &session_created("s", expires_at));
            assert_eq!(
                rig.conv.poll_timeout(),
                Some(rig.at(3_300_000)),
                "{expires_at}"
            );
        }
    }

    #[test]
    fn session_expired_reconnects_and_fatal_codes_stop_the_link() {
        let mut rig = Rig::ready();
        assert_eq!(
            rig.server(10, &error("session_expired", None)),
            [Action::Reconnect {
                reason: "session expired".into()
            }]
        );
        for code in FATAL_CODES {
            let mut rig = Rig::ready();
            assert_eq!(
                rig.server(10, &error(code, None)),
                [Action::LinkFatal {
                    reason: format!("{code} happened")
                }]
            );
            assert_eq!(rig.press(20), [Action::Earcon(Earcon::LinkLost)]);
        }
    }

    #[test]
    fn a_new_socket_starts_a_new_session_with_fresh_response_state() {
        let mut rig = Rig::ready();
        rig.say(0, "one");
        rig.server(10, &created("resp_1"));
        rig.conv.handle_link_closed(rig.at(20));
        rig.open_session(30);
        // The old active response died with its session.
        assert_eq!(sent(&rig.say(40, "two"))[1], response_create(2));
    }

    // ---- 10. hostile input ----

    #[test]
    fn garbage_from_the_server_never_panics_or_wedges() {
        let long = "ü".repeat(5000);
        let garbage = [
            String::new(),
            "{".into(),
            "null".into(),
            "[]".into(),
            "42".into(),
            r#"{"type":null}"#.into(),
            r#"{"type":{"a":1}}"#.into(),
            format!(r#"{{"type":"{long}"}}"#),
            long.clone(),
            r#"{"type":"session.created"}"#.into(),
            r#"{"type":"session.created","session":{"id":5,"expires_at":1e308}}"#.into(),
            r#"{"type":"session.created","session":{"expires_at":-9223372036854775808}}"#.into(),
            r#"{"type":"session.created","session":{"expires_at":18446744073709551615}}"#.into(),
            r#"{"type":"response.created"}"#.into(),
            r#"{"type":"response.created","response":[]}"#.into(),
            r#"{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"!!notbase64"}"#.into(),
            r#"{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AAAA"}"#.into(),
            r#"{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AA=="}"#.into(),
            r#"{"type":"response.output_audio.delta","delta":12}"#.into(),
            r#"{"type":"response.output_audio.delta"}"#.into(),
            r#"{"type":"response.function_call_arguments.done"}"#.into(),
            r#"{"type":"response.function_call_arguments.done","call_id":1,"name":null,"arguments":{"x":1}}"#.into(),
            r#"{"type":"response.done"}"#.into(),
            r#"{"type":"response.done","response":"x"}"#.into(),
            r#"{"type":"error"}"#.into(),
            r#"{"type":"error","error":{"code":7}}"#.into(),
            r#"{"type":"conversation.item.input_audio_transcription.completed"}"#.into(),
            r#"{"type":"conversation.item.input_audio_transcription.failed","error":null}"#.into(),
            r#"{"type":"input_audio_buffer.committed","item_id":[1]}"#.into(),
            r#"{"type":"rate_limits.updated","rate_limits":[{"limit":-1,"remaining":1e400}]}"#.into(),
            r#"{"type":"response.output_audio_transcript.done","transcript":99}"#.into(),
            r#"{"type":"brand.new.event","payload":{"deep":[1,2,3]}}"#.into(),
        ];
        let mut rig = Rig::new();
        for text in &garbage {
            rig.server(0, text); // link down
        }
        rig.conv.handle_link_open(rig.at(0));
        for text in &garbage {
            rig.server(1, text); // open, maybe "ready" through a garbage session.created
        }
        rig.conv.handle_link_closed(rig.at(2));
        rig.open_session(3);
        rig.say(4, "hi");
        rig.server(5, &created("resp_1"));
        for text in &garbage {
            rig.server(6, text); // mid-response
        }
        rig.conv.handle_link_closed(rig.at(7));
        rig.drain();

        // Still a working conversation afterwards.
        let mut rig = Rig::ready();
        for text in &garbage {
            rig.server(1, text);
        }
        rig.conv.handle_link_closed(rig.at(2));
        rig.open_session(3);
        let turn = outline(&rig.turn(10, 4800));
        assert_eq!(turn.last().map(String::as_str), Some("response.create"));
    }

    #[test]
    fn an_odd_audio_delta_plays_its_whole_samples() {
        let mut rig = Rig::ready();
        // "AQID" is 3 bytes: one sample (0x0201) and a stray byte.
        let actions = rig.server(
            0,
            r#"{"type":"response.output_audio.delta","response_id":"r","item_id":"i","delta":"AQID"}"#,
        );
        assert_eq!(actions, [Action::Play { pcm: vec![0x0201] }]);
    }

    #[test]
    fn status_reports_the_conversation_state() {
        let mut rig = Rig::ready();
        rig.complete(0, "a", "succeeded", "x");
        rig.press(10);
        rig.complete(20, "b", "failed", "y");
        let status = rig.conv.status();
        assert_eq!(status["link"], "ready");
        assert_eq!(status["capturing"], true);
        assert_eq!(status["button_down"], true);
        assert_eq!(status["active_response"], "requested"); // the announcement of "a"
        assert_eq!(status["queued_notifications"], 1);
        assert_eq!(status["announcing"], 1);
    }
}
