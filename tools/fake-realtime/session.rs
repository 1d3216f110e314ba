//! One server-side Realtime session: the GA protocol rules, with no IO.
//!
//! A connection thread (server.rs) owns one `Session`, feeds it the client's text frames and
//! the time, and writes whatever `poll_output` yields. Time is an input (`now`), so the
//! streaming pace, the delayed transcription and session expiry are tested without sleeping.
//! The rules are the real server's, as strict as we know them (see realtime-ga.md): one
//! active response in the default conversation, commits of at least 100 ms, call ids that
//! exist in this session only, truncation within the audio actually sent.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use crate::schema;
use crate::script::{Reply, Script, fill_value};

/// Bytes of one 100 ms output chunk: 2400 samples of s16le at 24 kHz.
const CHUNK_BYTES: usize = 4800;
const BYTES_PER_MS: usize = 48;

/// Per-connection settings from the command line and the upgrade request.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// From the URL's `?model=`; echoed in the session.
    pub model: String,
    pub session_seconds: u64,
    /// Output pace as a multiple of real time.
    pub speed: f64,
    /// The upgrade carried `OpenAI-Beta: realtime=v1`: refuse the session.
    pub beta_shape: bool,
}

/// What the connection must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send this event as a text frame.
    Event(Value),
    /// Send this text as is (malformed traffic on command).
    Raw(String),
    /// Send a close frame and stop; nothing follows.
    Close { code: u16, reason: String },
}

/// What the next `response.create` answers.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    /// The latest user turn (typed or spoken), or nothing new.
    User,
    /// A system message (a task finished): the script's `on_system`.
    System(String),
    /// Function call outputs: the script's `after_tool`.
    ToolOutputs,
}

/// A conversation item the session remembers (for truncate, delete, retrieve).
#[derive(Debug, Clone)]
struct Item {
    id: String,
    value: Value,
    /// An assistant message the server produced with audio.
    assistant_audio: bool,
    /// Audio of this item sent so far (or kept after a truncation).
    audio_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpenKind {
    Audio,
    Text,
    Call,
}

/// The output item being streamed, kept to build a cancelled response's output.
#[derive(Debug)]
struct OpenItem {
    item: Value,
    kind: OpenKind,
    transcript: String,
}

/// The state change that goes with sending a step's event.
#[derive(Debug)]
enum Effect {
    None,
    Opened {
        item: Value,
        kind: OpenKind,
        call_id: Option<String>,
    },
    Audio(u64),
    Transcript(String),
    Closed(Value),
    /// The step is `response.done`; its output is what was actually sent.
    Finished,
}

#[derive(Debug)]
struct Step {
    at: Instant,
    event: Value,
    effect: Effect,
}

/// A response being streamed.
#[derive(Debug)]
struct Stream {
    id: String,
    in_conversation: bool,
    steps: VecDeque<Step>,
    /// The response object as created (no status/output), the base of `response.done`.
    base: Value,
    output: Vec<Value>,
    open: Option<OpenItem>,
}

pub struct Session {
    rng: fastrand::Rng,
    session: Value,
    conversation_id: String,
    expires_at: Instant,
    speed: f64,
    outbox: VecDeque<Output>,
    closing: bool,
    input_audio: Vec<u8>,
    items: Vec<Item>,
    known_calls: HashSet<String>,
    pending: Pending,
    /// The reply whose call was made last says what follows its output (`after`).
    after_call: Option<Reply>,
    last_user_text: String,
    active: Option<Stream>,
    out_of_band: Vec<Stream>,
    delayed: Vec<(Instant, Value)>,
    audio_produced: bool,
    events_received: u64,
    truncations: Vec<Value>,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Splits text into words that keep their trailing space, as transcript deltas do.
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        current.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Merges a session update into the session. Objects merge key by key, except a tagged
/// object whose `type` changes (server_vad → semantic_vad), which is replaced whole.
fn merge(base: &mut Value, update: &Value) {
    let (Some(base_map), Some(update_map)) = (base.as_object_mut(), update.as_object()) else {
        *base = update.clone();
        return;
    };
    for (key, value) in update_map {
        match base_map.get_mut(key) {
            Some(existing)
                if existing.is_object()
                    && value.is_object()
                    && (value.get("type").is_none()
                        || value.get("type") == existing.get("type")) =>
            {
                merge(existing, value)
            }
            _ => {
                base_map.insert(key.clone(), value.clone());
            }
        }
    }
}

impl Session {
    /// A new session; its first event (`session.created`, or the beta refusal) is already in
    /// the outbox.
    pub fn new(now: Instant, config: &SessionConfig) -> Session {
        let mut rng = fastrand::Rng::new();
        let id = format!("sess_{}", random_id(&mut rng));
        let conversation_id = format!("conv_{}", random_id(&mut rng));
        let session = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": id,
            "model": config.model,
            "output_modalities": ["audio"],
            "instructions": "You are a helpful assistant.",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "tracing": null,
            "prompt": null,
            "truncation": "auto",
            "include": null,
            "expires_at": unix_seconds() + config.session_seconds,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": null,
                    "noise_reduction": null,
                    "turn_detection": {
                        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                        "silence_duration_ms": 200, "idle_timeout_ms": null,
                        "create_response": true, "interrupt_response": true
                    }
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "voice": "marin",
                    "speed": 1.0
                }
            }
        });
        let mut this = Session {
            rng,
            session,
            conversation_id,
            expires_at: now + Duration::from_secs(config.session_seconds),
            speed: if config.speed > 0.0 {
                config.speed
            } else {
                1.0
            },
            outbox: VecDeque::new(),
            closing: false,
            input_audio: Vec::new(),
            items: Vec::new(),
            known_calls: HashSet::new(),
            pending: Pending::User,
            after_call: None,
            last_user_text: String::new(),
            active: None,
            out_of_band: Vec::new(),
            delayed: Vec::new(),
            audio_produced: false,
            events_received: 0,
            truncations: Vec::new(),
        };
        if config.beta_shape {
            // What the GA server does to a beta client: upgrade, explain, close with 4000.
            this.error(
                None,
                "beta_api_shape_disabled",
                "The Realtime API beta interface is no longer available. Remove the \
                 'OpenAI-Beta: realtime=v1' header and use the GA event shapes.",
                None,
            );
            this.close(4000, "beta api shape disabled");
        } else {
            let session = this.session.clone();
            this.emit(json!({"type": "session.created", "session": session}));
        }
        this
    }

    fn new_id(&mut self, prefix: &str) -> String {
        format!("{prefix}_{}", random_id(&mut self.rng))
    }

    fn emit(&mut self, mut event: Value) {
        let event_id = self.new_id("event");
        if let Some(map) = event.as_object_mut() {
            map.insert("event_id".to_owned(), Value::String(event_id));
        }
        self.outbox.push_back(Output::Event(event));
    }

    fn error(&mut self, event_id: Option<&str>, code: &str, message: &str, param: Option<&str>) {
        self.emit(json!({
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            }
        }));
    }

    /// The next thing to send, in order.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outbox.pop_front()
    }

    /// When `handle_timeout` has something to do next (a paced chunk, a transcription,
    /// expiry); `None` once the session is closing.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.closing {
            return None;
        }
        let streams = self.active.iter().chain(self.out_of_band.iter());
        streams
            .filter_map(|s| s.steps.front().map(|step| step.at))
            .chain(self.delayed.iter().map(|(at, _)| *at))
            .chain(std::iter::once(self.expires_at))
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closing {
            return;
        }
        let mut index = 0;
        while index < self.delayed.len() {
            if self.delayed[index].0 <= now {
                let (_, event) = self.delayed.remove(index);
                self.emit(event);
            } else {
                index += 1;
            }
        }
        if let Some(mut stream) = self.active.take() {
            if !self.advance(&mut stream, now) {
                self.active = Some(stream);
            }
        }
        for mut stream in std::mem::take(&mut self.out_of_band) {
            if !self.advance(&mut stream, now) {
                self.out_of_band.push(stream);
            }
        }
        if now >= self.expires_at {
            self.expire();
        }
    }

    /// A binary frame: the API speaks JSON text only.
    pub fn handle_binary(&mut self, now: Instant) {
        if self.closing {
            return;
        }
        self.events_received += 1;
        self.error(
            None,
            "invalid_json",
            "Binary frames are not supported; send JSON text frames.",
            None,
        );
        self.handle_timeout(now);
    }

    /// One client text frame.
    pub fn handle_text(&mut self, now: Instant, text: &str, script: &Script) {
        if self.closing {
            return;
        }
        self.events_received += 1;
        self.dispatch(now, text, script);
        self.handle_timeout(now);
    }

    fn dispatch(&mut self, now: Instant, text: &str, script: &Script) {
        let event: Value = match serde_json::from_str(text) {
            Ok(event) => event,
            Err(e) => {
                let message = format!(
                    "We could not parse the JSON body of your request. ({e}) Send valid JSON."
                );
                return self.error(None, "invalid_json", &message, None);
            }
        };
        if !event.is_object() {
            return self.error(
                None,
                "invalid_type",
                "Invalid type for event: expected an object.",
                None,
            );
        }
        let event_id = event.get("event_id").and_then(Value::as_str);
        let event_type = match event.get("type") {
            None => {
                return self.error(
                    event_id,
                    "missing_required_parameter",
                    "Missing required parameter: 'type'.",
                    Some("type"),
                );
            }
            Some(Value::String(event_type)) => event_type.as_str(),
            Some(_) => {
                return self.error(
                    event_id,
                    "invalid_type",
                    "Invalid type for 'type': expected a string.",
                    Some("type"),
                );
            }
        };
        let Some(shape) = schema::client_event(event_type) else {
            let supported: Vec<String> = schema::CLIENT_EVENT_TYPES
                .iter()
                .map(|t| format!("'{t}'"))
                .collect();
            let message = format!(
                "Invalid value: '{event_type}'. Supported values are: {}.",
                supported.join(", ")
            );
            return self.error(event_id, "unknown_event", &message, Some("type"));
        };
        if let Err(e) = schema::validate(&event, shape, "") {
            return self.error(event_id, e.code, &e.message, Some(&e.param));
        }
        let event_id = event_id.map(str::to_owned);
        let event_id = event_id.as_deref();
        match event_type {
            "session.update" => self.update_session(event_id, &event["session"]),
            "input_audio_buffer.append" => self.append(event_id, &event["audio"]),
            "input_audio_buffer.commit" => self.commit(now, event_id, script),
            "input_audio_buffer.clear" => {
                self.input_audio.clear();
                self.emit(json!({"type": "input_audio_buffer.cleared"}));
            }
            "conversation.item.create" => self.create_item(event_id, &event, script),
            "conversation.item.truncate" => self.truncate(event_id, &event),
            "conversation.item.delete" => self.delete_item(event_id, &event),
            "conversation.item.retrieve" => self.retrieve_item(event_id, &event),
            "response.create" => self.create_response(now, event_id, event.get("response"), script),
            "response.cancel" => {
                let response_id = event.get("response_id").and_then(Value::as_str);
                self.cancel(event_id, response_id)
            }
            _ => {}
        }
    }

    fn update_session(&mut self, event_id: Option<&str>, update: &Value) {
        let mut update = update.clone();
        // The model is fixed by the URL; the real server ignores it in an update.
        if let Some(map) = update.as_object_mut() {
            map.remove("model");
        }
        let new_voice = update.pointer("/audio/output/voice");
        if let Some(voice) = new_voice {
            if self.audio_produced && self.session.pointer("/audio/output/voice") != Some(voice) {
                return self.error(
                    event_id,
                    "cannot_update_voice",
                    "Cannot update a conversation's voice if assistant audio is present.",
                    Some("session.audio.output.voice"),
                );
            }
        }
        if let Some(modalities) = update.get("output_modalities").and_then(Value::as_array) {
            if modalities.iter().collect::<HashSet<_>>().len() > 1 {
                return self.error(
                    event_id,
                    "invalid_value",
                    "Invalid value for 'session.output_modalities': it is not possible to \
                     request both 'text' and 'audio'.",
                    Some("session.output_modalities"),
                );
            }
        }
        merge(&mut self.session, &update);
        let session = self.session.clone();
        self.emit(json!({"type": "session.updated", "session": session}));
    }

    fn input_bytes_per_ms(&self) -> usize {
        match self
            .session
            .pointer("/audio/input/format/type")
            .and_then(Value::as_str)
        {
            Some("audio/pcmu") | Some("audio/pcma") => 8,
            _ => BYTES_PER_MS,
        }
    }

    fn append(&mut self, event_id: Option<&str>, audio: &Value) {
        let decoded =
            base64::engine::general_purpose::STANDARD.decode(audio.as_str().unwrap_or(""));
        match decoded {
            Ok(bytes) => self.input_audio.extend_from_slice(&bytes),
            Err(_) => self.error(
                event_id,
                "invalid_value",
                "Invalid 'audio'. Expected base64-encoded audio bytes.",
                Some("audio"),
            ),
        }
    }

    fn last_item_id(&self) -> Option<String> {
        self.items.last().map(|item| item.id.clone())
    }

    fn commit(&mut self, now: Instant, event_id: Option<&str>, script: &Script) {
        let ms = self.input_audio.len() as f64 / self.input_bytes_per_ms() as f64;
        if ms < 100.0 {
            let message = format!(
                "Error committing input audio buffer: buffer too small. Expected at least \
                 100ms of audio, but buffer only has {ms:.2}ms of audio."
            );
            return self.error(event_id, "input_audio_buffer_commit_empty", &message, None);
        }
        self.input_audio.clear();
        let item_id = self.new_id("item");
        let previous = self.last_item_id();
        self.emit(json!({
            "type": "input_audio_buffer.committed",
            "previous_item_id": previous,
            "item_id": item_id,
        }));
        let item = json!({
            "id": item_id, "object": "realtime.item", "type": "message", "status": "completed",
            "role": "user", "content": [{"type": "input_audio", "transcript": null}],
        });
        self.add_item(item.clone(), false);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
        self.last_user_text = script.transcript.clone();
        self.pending = Pending::User;
        // Transcription runs beside the model, so it arrives a little later, often after the
        // response has started; and only when the session asked for it.
        if self
            .session
            .pointer("/audio/input/transcription")
            .is_some_and(Value::is_object)
        {
            let delay = Duration::from_secs_f64(0.2 / self.speed);
            self.delayed.push((
                now + delay,
                json!({
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": script.transcript,
                    "usage": {"type": "duration", "seconds": (ms / 1000.0).ceil()},
                }),
            ));
        }
    }

    fn add_item(&mut self, value: Value, assistant_audio: bool) {
        let id = value["id"].as_str().unwrap_or_default().to_owned();
        self.items.push(Item {
            id,
            value,
            assistant_audio,
            audio_ms: 0,
        });
    }

    fn find_item(&self, id: &str) -> Option<usize> {
        self.items.iter().position(|item| item.id == id)
    }

    fn create_item(&mut self, event_id: Option<&str>, event: &Value, script: &Script) {
        let mut item = event["item"].clone();
        if let Some(previous) = event.get("previous_item_id").and_then(Value::as_str) {
            if previous != "root" && self.find_item(previous).is_none() {
                let message = format!("Previous item with item_id '{previous}' not found.");
                return self.error(
                    event_id,
                    "invalid_value",
                    &message,
                    Some("previous_item_id"),
                );
            }
        }
        let id = match item.get("id").and_then(Value::as_str) {
            Some(id) if self.find_item(id).is_some() => {
                let message = format!("Item with item_id '{id}' already exists.");
                return self.error(event_id, "invalid_value", &message, Some("item.id"));
            }
            Some(id) => id.to_owned(),
            None => self.new_id("item"),
        };
        let item_type = item["type"].as_str().unwrap_or_default().to_owned();
        match item_type.as_str() {
            "function_call_output" => {
                let call_id = item["call_id"].as_str().unwrap_or_default();
                if !self.known_calls.contains(call_id) {
                    let message = format!("Tool call ID '{call_id}' not found in conversation.");
                    return self.error(event_id, "invalid_tool_call_id", &message, None);
                }
                self.pending = Pending::ToolOutputs;
            }
            "function_call" => {
                let call_id = item["call_id"].as_str().unwrap_or_default().to_owned();
                self.known_calls.insert(call_id);
            }
            _ => {
                let parts = item["content"].as_array().cloned().unwrap_or_default();
                let mut text = Vec::new();
                for part in &parts {
                    match part["type"].as_str() {
                        Some("input_text") | Some("output_text") => {
                            text.push(part["text"].as_str().unwrap_or_default().to_owned())
                        }
                        Some("input_audio") => text.push(
                            part["transcript"]
                                .as_str()
                                .unwrap_or(&script.transcript)
                                .to_owned(),
                        ),
                        _ => {}
                    }
                }
                let text = text.join(" ");
                match item["role"].as_str() {
                    Some("user") => {
                        self.last_user_text = text;
                        self.pending = Pending::User;
                    }
                    Some("system") => self.pending = Pending::System(text),
                    _ => {}
                }
            }
        }
        if let Some(map) = item.as_object_mut() {
            map.insert("id".to_owned(), Value::String(id));
            map.insert("object".to_owned(), json!("realtime.item"));
            map.entry("status").or_insert(json!("completed"));
        }
        let previous = self.last_item_id();
        self.add_item(item.clone(), false);
        self.emit(
            json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
        );
        self.emit(
            json!({"type": "conversation.item.done", "previous_item_id": previous, "item": item}),
        );
    }

    fn truncate(&mut self, event_id: Option<&str>, event: &Value) {
        let item_id = event["item_id"].as_str().unwrap_or_default();
        let content_index = event["content_index"].as_i64().unwrap_or(-1);
        let audio_end_ms = event["audio_end_ms"].as_i64().unwrap_or(-1);
        let Some(index) = self.find_item(item_id) else {
            let message = format!("Item with item_id '{item_id}' not found.");
            return self.error(event_id, "invalid_value", &message, Some("item_id"));
        };
        if !self.items[index].assistant_audio {
            return self.error(
                event_id,
                "invalid_value",
                "Only assistant message items with audio can be truncated.",
                Some("item_id"),
            );
        }
        if content_index != 0 {
            let message =
                format!("Invalid 'content_index': {content_index}. This item has one audio part.");
            return self.error(event_id, "invalid_value", &message, Some("content_index"));
        }
        let sent = self.items[index].audio_ms;
        let Ok(end) = u64::try_from(audio_end_ms) else {
            return self.error(
                event_id,
                "invalid_value",
                "Invalid 'audio_end_ms': must not be negative.",
                Some("audio_end_ms"),
            );
        };
        if end > sent {
            let message = format!("Audio content of {sent}ms is already shorter than {end}ms.");
            return self.error(event_id, "invalid_value", &message, Some("audio_end_ms"));
        }
        self.items[index].audio_ms = end;
        self.truncations.push(json!({
            "item_id": item_id, "audio_end_ms": end, "audio_sent_ms": sent,
        }));
        self.emit(json!({
            "type": "conversation.item.truncated",
            "item_id": item_id, "content_index": 0, "audio_end_ms": end,
        }));
    }

    fn delete_item(&mut self, event_id: Option<&str>, event: &Value) {
        let item_id = event["item_id"].as_str().unwrap_or_default().to_owned();
        match self.find_item(&item_id) {
            Some(index) => {
                self.items.remove(index);
                self.emit(json!({"type": "conversation.item.deleted", "item_id": item_id}));
            }
            None => {
                let message = format!("Item with item_id '{item_id}' not found.");
                self.error(event_id, "invalid_value", &message, Some("item_id"))
            }
        }
    }

    fn retrieve_item(&mut self, event_id: Option<&str>, event: &Value) {
        let item_id = event["item_id"].as_str().unwrap_or_default();
        match self.find_item(item_id) {
            Some(index) => {
                let item = self.items[index].value.clone();
                self.emit(json!({"type": "conversation.item.retrieved", "item": item}));
            }
            None => {
                let message = format!("Item with item_id '{item_id}' not found.");
                self.error(event_id, "invalid_value", &message, Some("item_id"))
            }
        }
    }

    fn create_response(
        &mut self,
        now: Instant,
        event_id: Option<&str>,
        params: Option<&Value>,
        script: &Script,
    ) {
        let empty = json!({});
        let params = params.unwrap_or(&empty);
        let in_conversation = match params.get("conversation").and_then(Value::as_str) {
            None | Some("auto") => true,
            Some("none") => false,
            Some(other) => {
                let message =
                    format!("Invalid value: '{other}'. Supported values are: 'auto' and 'none'.");
                return self.error(
                    event_id,
                    "invalid_value",
                    &message,
                    Some("response.conversation"),
                );
            }
        };
        if in_conversation {
            if let Some(active) = &self.active {
                let message = format!(
                    "Conversation already has an active response in progress: {}. Wait until \
                     the response is finished before creating a new one.",
                    active.id
                );
                return self.error(
                    event_id,
                    "conversation_already_has_active_response",
                    &message,
                    None,
                );
            }
        }
        let (reply, text) = match self.pending.clone() {
            Pending::ToolOutputs => (
                self.after_call
                    .take()
                    .unwrap_or_else(|| script.after_tool.clone()),
                self.last_user_text.clone(),
            ),
            Pending::System(text) => (script.reply_to_system(&text).clone(), text),
            Pending::User => (
                script.reply_to_user(&self.last_user_text).clone(),
                self.last_user_text.clone(),
            ),
        };
        if in_conversation && reply.call.is_some() {
            self.after_call = reply.after.as_deref().cloned();
        }
        if in_conversation {
            self.pending = Pending::User;
        }
        let modalities = params
            .get("output_modalities")
            .or_else(|| self.session.get("output_modalities"))
            .cloned()
            .unwrap_or(json!(["audio"]));
        let metadata = params.get("metadata").cloned().unwrap_or(Value::Null);
        let stream = self.build_stream(now, &reply, &text, in_conversation, modalities, metadata);
        let mut created = stream.base.clone();
        created["status"] = json!("in_progress");
        created["output"] = json!([]);
        self.emit(json!({"type": "response.created", "response": created}));
        if in_conversation {
            self.active = Some(stream);
        } else {
            self.out_of_band.push(stream);
        }
    }

    fn build_stream(
        &mut self,
        now: Instant,
        reply: &Reply,
        text: &str,
        in_conversation: bool,
        modalities: Value,
        metadata: Value,
    ) -> Stream {
        let response_id = self.new_id("resp");
        let base = json!({
            "object": "realtime.response",
            "id": response_id,
            "conversation_id": if in_conversation { json!(self.conversation_id) } else { Value::Null },
            "output_modalities": modalities,
            "max_output_tokens": "inf",
            "audio": {"output": {
                "format": self.session.pointer("/audio/output/format").cloned().unwrap_or(Value::Null),
                "voice": self.session.pointer("/audio/output/voice").cloned().unwrap_or(Value::Null),
            }},
            "metadata": metadata,
            "status_details": null,
            "usage": null,
        });
        let text_only = modalities
            .as_array()
            .is_some_and(|m| m.iter().any(|v| v == "text"));
        let interval = Duration::from_secs_f64(0.1 / self.speed);
        let mut steps = VecDeque::new();
        let mut at = now;
        let mut output_index = 0;
        let mut previous = if in_conversation {
            self.last_item_id()
        } else {
            None
        };
        let mut push = |at: Instant, event: Value, effect: Effect| {
            steps.push_back(Step { at, event, effect });
        };
        let common = |item_id: &str, output_index: usize| {
            json!({"response_id": response_id, "item_id": item_id, "output_index": output_index,
                   "content_index": 0})
        };
        let with = |mut base: Value, extra: Value| {
            if let (Some(map), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
                map.extend(extra.clone());
            }
            base
        };

        if let Some(say) = &reply.say {
            let said = say.replace("{text}", text);
            let item_id = self.new_id("item");
            let kind = if text_only {
                OpenKind::Text
            } else {
                OpenKind::Audio
            };
            let item = json!({"id": item_id, "object": "realtime.item", "type": "message",
                              "status": "in_progress", "role": "assistant", "content": []});
            push(
                at,
                json!({"type": "response.output_item.added", "response_id": response_id,
                       "output_index": output_index, "item": item}),
                Effect::Opened {
                    item: item.clone(),
                    kind,
                    call_id: None,
                },
            );
            if in_conversation {
                push(
                    at,
                    json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
                    Effect::None,
                );
            }
            let part = if text_only {
                json!({"type": "text", "text": ""})
            } else {
                json!({"type": "audio", "transcript": ""})
            };
            push(
                at,
                with(
                    common(&item_id, output_index),
                    json!({"type": "response.content_part.added", "part": part}),
                ),
                Effect::None,
            );
            let words = words(&said);
            if text_only {
                for (index, word) in words.iter().enumerate() {
                    if index > 0 {
                        at += interval;
                    }
                    push(
                        at,
                        with(
                            common(&item_id, output_index),
                            json!({"type": "response.output_text.delta", "delta": word}),
                        ),
                        Effect::Transcript(word.clone()),
                    );
                }
                push(
                    at,
                    with(
                        common(&item_id, output_index),
                        json!({"type": "response.output_text.done", "text": said}),
                    ),
                    Effect::None,
                );
            } else {
                let pcm = reply.render_audio(&said);
                let chunks: Vec<&[u8]> = pcm.chunks(CHUNK_BYTES).collect();
                let mut next_word = 0;
                for (index, chunk) in chunks.iter().enumerate() {
                    if index > 0 {
                        at += interval;
                    }
                    // Transcript deltas run alongside the audio, a little ahead like the real ones.
                    let words_by_now = ((index + 1) * words.len()).div_ceil(chunks.len());
                    while next_word < words_by_now {
                        push(
                            at,
                            with(
                                common(&item_id, output_index),
                                json!({"type": "response.output_audio_transcript.delta",
                                        "delta": words[next_word]}),
                            ),
                            Effect::Transcript(words[next_word].clone()),
                        );
                        next_word += 1;
                    }
                    let delta = base64::engine::general_purpose::STANDARD.encode(chunk);
                    push(
                        at,
                        with(
                            common(&item_id, output_index),
                            json!({"type": "response.output_audio.delta", "delta": delta}),
                        ),
                        Effect::Audio((chunk.len() / BYTES_PER_MS) as u64),
                    );
                }
                while next_word < words.len() {
                    push(
                        at,
                        with(
                            common(&item_id, output_index),
                            json!({"type": "response.output_audio_transcript.delta",
                                    "delta": words[next_word]}),
                        ),
                        Effect::Transcript(words[next_word].clone()),
                    );
                    next_word += 1;
                }
                push(
                    at,
                    with(
                        common(&item_id, output_index),
                        json!({"type": "response.output_audio.done"}),
                    ),
                    Effect::None,
                );
                push(
                    at,
                    with(
                        common(&item_id, output_index),
                        json!({"type": "response.output_audio_transcript.done", "transcript": said}),
                    ),
                    Effect::None,
                );
            }
            let (part, content) = if text_only {
                (
                    json!({"type": "text", "text": said}),
                    json!({"type": "output_text", "text": said}),
                )
            } else {
                (
                    json!({"type": "audio", "transcript": said}),
                    json!({"type": "output_audio", "transcript": said}),
                )
            };
            push(
                at,
                with(
                    common(&item_id, output_index),
                    json!({"type": "response.content_part.done", "part": part}),
                ),
                Effect::None,
            );
            let done_item = json!({"id": item_id, "object": "realtime.item", "type": "message",
                                   "status": "completed", "role": "assistant", "content": [content]});
            push(
                at,
                json!({"type": "response.output_item.done", "response_id": response_id,
                       "output_index": output_index, "item": done_item}),
                Effect::Closed(done_item.clone()),
            );
            if in_conversation {
                push(
                    at,
                    json!({"type": "conversation.item.done", "previous_item_id": previous, "item": done_item}),
                    Effect::None,
                );
                previous = Some(item_id);
            }
            output_index += 1;
        }

        if let Some(call) = &reply.call {
            let item_id = self.new_id("item");
            let call_id = self.new_id("call");
            let arguments = fill_value(&call.arguments, text).to_string();
            let item = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
                              "status": "in_progress", "name": call.name, "call_id": call_id,
                              "arguments": ""});
            push(
                at,
                json!({"type": "response.output_item.added", "response_id": response_id,
                       "output_index": output_index, "item": item}),
                Effect::Opened {
                    item: item.clone(),
                    kind: OpenKind::Call,
                    call_id: Some(call_id.clone()),
                },
            );
            if in_conversation {
                push(
                    at,
                    json!({"type": "conversation.item.added", "previous_item_id": previous, "item": item}),
                    Effect::None,
                );
            }
            let mut split = arguments.len() / 2;
            while !arguments.is_char_boundary(split) {
                split -= 1;
            }
            for delta in [&arguments[..split], &arguments[split..]] {
                push(
                    at,
                    json!({"type": "response.function_call_arguments.delta", "response_id": response_id,
                           "item_id": item_id, "output_index": output_index, "call_id": call_id,
                           "delta": delta}),
                    Effect::None,
                );
            }
            push(
                at,
                json!({"type": "response.function_call_arguments.done", "response_id": response_id,
                       "item_id": item_id, "output_index": output_index, "call_id": call_id,
                       "name": call.name, "arguments": arguments}),
                Effect::None,
            );
            let done_item = json!({"id": item_id, "object": "realtime.item", "type": "function_call",
                                   "status": "completed", "name": call.name, "call_id": call_id,
                                   "arguments": arguments});
            push(
                at,
                json!({"type": "response.output_item.done", "response_id": response_id,
                       "output_index": output_index, "item": done_item}),
                Effect::Closed(done_item.clone()),
            );
            if in_conversation {
                push(
                    at,
                    json!({"type": "conversation.item.done", "previous_item_id": previous, "item": done_item}),
                    Effect::None,
                );
            }
        }
        push(at, Value::Null, Effect::Finished);
        Stream {
            id: response_id,
            in_conversation,
            steps,
            base,
            output: Vec::new(),
            open: None,
        }
    }

    /// Sends the stream's steps that are due; true once `response.done` went out.
    fn advance(&mut self, stream: &mut Stream, now: Instant) -> bool {
        while stream.steps.front().is_some_and(|step| step.at <= now) {
            let Some(step) = stream.steps.pop_front() else {
                break;
            };
            match step.effect {
                Effect::None => {}
                Effect::Opened {
                    item,
                    kind,
                    call_id,
                } => {
                    if stream.in_conversation {
                        self.add_item(item.clone(), kind == OpenKind::Audio);
                    }
                    if let Some(call_id) = call_id {
                        self.known_calls.insert(call_id);
                    }
                    stream.open = Some(OpenItem {
                        item,
                        kind,
                        transcript: String::new(),
                    });
                }
                Effect::Audio(ms) => {
                    self.audio_produced = true;
                    if let Some(open) = &stream.open {
                        let id = open.item["id"].as_str().unwrap_or_default().to_owned();
                        if let Some(index) = self.find_item(&id) {
                            self.items[index].audio_ms += ms;
                        }
                    }
                }
                Effect::Transcript(delta) => {
                    if let Some(open) = &mut stream.open {
                        open.transcript.push_str(&delta);
                    }
                }
                Effect::Closed(item) => {
                    if let Some(index) = item["id"].as_str().and_then(|id| self.find_item(id)) {
                        self.items[index].value = item.clone();
                    }
                    stream.open = None;
                    stream.output.push(item);
                }
                Effect::Finished => {
                    let mut response = stream.base.clone();
                    response["status"] = json!("completed");
                    response["output"] = Value::Array(stream.output.clone());
                    response["usage"] =
                        json!({"total_tokens": 0, "input_tokens": 0, "output_tokens": 0});
                    self.emit(json!({"type": "response.done", "response": response}));
                    return true;
                }
            }
            self.emit(step.event);
        }
        false
    }

    fn cancel(&mut self, event_id: Option<&str>, response_id: Option<&str>) {
        let stream = match response_id {
            None => self.active.take(),
            Some(id) if self.active.as_ref().is_some_and(|s| s.id == id) => self.active.take(),
            Some(id) => self
                .out_of_band
                .iter()
                .position(|s| s.id == id)
                .map(|index| self.out_of_band.remove(index)),
        };
        let Some(mut stream) = stream else {
            return self.error(
                event_id,
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
                None,
            );
        };
        stream.steps.clear();
        if let Some(open) = stream.open.take() {
            let mut item = open.item;
            item["status"] = json!("incomplete");
            match open.kind {
                OpenKind::Audio => {
                    item["content"] =
                        json!([{"type": "output_audio", "transcript": open.transcript}])
                }
                OpenKind::Text => {
                    item["content"] = json!([{"type": "output_text", "text": open.transcript}])
                }
                OpenKind::Call => {}
            }
            let output_index = stream.output.len();
            self.emit(
                json!({"type": "response.output_item.done", "response_id": stream.id,
                             "output_index": output_index, "item": item}),
            );
            stream.output.push(item);
        }
        let mut response = stream.base.clone();
        response["status"] = json!("cancelled");
        response["status_details"] = json!({"type": "cancelled", "reason": "client_cancelled"});
        response["output"] = Value::Array(stream.output);
        self.emit(json!({"type": "response.done", "response": response}));
    }

    /// What the real server does at `expires_at`: `session_expired`, then close 1001.
    pub fn expire(&mut self) {
        if self.closing {
            return;
        }
        self.error(
            None,
            "session_expired",
            "Your session hit the maximum duration of 60 minutes.",
            None,
        );
        self.close(1001, "session expired");
    }

    /// Ends the session with a close frame of this code.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.outbox.push_back(Output::Close {
            code,
            reason: reason.to_owned(),
        });
    }

    /// Event types no client knows yet: clients must ignore them.
    pub fn send_unknown(&mut self) {
        if self.closing {
            return;
        }
        self.emit(json!({"type": "session.future_feature", "detail": {"level": 3}}));
        self.emit(json!({"type": "response.output_audio.future_delta", "response_id": "resp_x", "delta": 1}));
        self.emit(json!({"type": "output_audio_buffer.started", "response_id": "resp_x"}));
    }

    /// Traffic a client must survive: not JSON, not an object, no type, bad base64.
    pub fn send_malformed(&mut self) {
        if self.closing {
            return;
        }
        self.outbox
            .push_back(Output::Raw("this is not JSON {".to_owned()));
        self.outbox.push_back(Output::Raw("[1,2,3]".to_owned()));
        self.emit(json!({"delta": "AAAA", "response_id": "resp_x"}));
        let (response_id, item_id) = match self.active.as_ref() {
            Some(stream) => {
                let item_id = stream
                    .open
                    .as_ref()
                    .and_then(|o| o.item["id"].as_str())
                    .unwrap_or("item_x")
                    .to_owned();
                (stream.id.clone(), item_id)
            }
            None => ("resp_x".to_owned(), "item_x".to_owned()),
        };
        self.emit(
            json!({"type": "response.output_audio.delta", "response_id": response_id,
                         "item_id": item_id, "output_index": 0, "content_index": 0,
                         "delta": "!!not base64!!"}),
        );
    }

    /// Any event, exactly as given.
    pub fn send_verbatim(&mut self, event: Value) {
        if !self.closing {
            self.outbox.push_back(Output::Event(event));
        }
    }

    pub fn active_response(&self) -> Option<&str> {
        self.active.as_ref().map(|s| s.id.as_str())
    }

    pub fn events_received(&self) -> u64 {
        self.events_received
    }

    /// Server VAD off, as walkie must configure it.
    pub fn turn_detection_null(&self) -> bool {
        self.session
            .pointer("/audio/input/turn_detection")
            .is_some_and(Value::is_null)
    }

    pub fn truncations(&self) -> &[Value] {
        &self.truncations
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }
}

fn random_id(rng: &mut fastrand::Rng) -> String {
    std::iter::repeat_with(|| rng.alphanumeric())
        .take(20)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SessionConfig {
        SessionConfig {
            model: "gpt-realtime".to_owned(),
            session_seconds: 3600,
            speed: 4.0,
            beta_shape: false,
        }
    }

    struct Harness {
        session: Session,
        script: Script,
        now: Instant,
    }

    impl Harness {
        fn new() -> Harness {
            let now = Instant::now();
            let mut harness = Harness {
                session: Session::new(now, &config()),
                script: Script::default(),
                now,
            };
            let created = harness.drain();
            assert_eq!(created[0]["type"], "session.created");
            harness
        }

        fn send(&mut self, event: Value) -> Vec<Value> {
            self.session
                .handle_text(self.now, &event.to_string(), &self.script);
            self.drain()
        }

        fn advance(&mut self, by: Duration) -> Vec<Value> {
            self.now += by;
            self.session.handle_timeout(self.now);
            self.drain()
        }

        /// Runs the clock until nothing is left to stream (expiry is an hour away).
        fn finish(&mut self) -> Vec<Value> {
            let mut out = Vec::new();
            while let Some(deadline) = self.session.next_deadline() {
                if deadline > self.now + Duration::from_secs(60) {
                    break;
                }
                self.now = deadline.max(self.now);
                self.session.handle_timeout(self.now);
                out.extend(self.drain());
            }
            out
        }

        fn drain(&mut self) -> Vec<Value> {
            let mut out = Vec::new();
            while let Some(output) = self.session.poll_output() {
                match output {
                    Output::Event(event) => out.push(event),
                    Output::Raw(raw) => out.push(json!({"raw": raw})),
                    Output::Close { code, .. } => out.push(json!({"close": code})),
                }
            }
            out
        }

        fn say(&mut self, text: &str) -> Vec<Value> {
            self.send(
                json!({"type":"conversation.item.create","item":{"type":"message",
                "role":"user","content":[{"type":"input_text","text":text}]}}),
            )
        }
    }

    fn types(events: &[Value]) -> Vec<&str> {
        events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("?"))
            .collect()
    }

    fn error_code(events: &[Value]) -> Option<&str> {
        events
            .iter()
            .find(|e| e["type"] == "error")
            .and_then(|e| e["error"]["code"].as_str())
    }

    #[test]
    fn session_update_is_merged_and_echoed_and_records_vad_off() {
        let mut h = Harness::new();
        assert!(
            !h.session.turn_detection_null(),
            "server VAD is on by default"
        );
        let out = h.send(json!({"type":"session.update","session":{"type":"realtime",
            "audio":{"input":{"turn_detection":null},"output":{"voice":"cedar"}}}}));
        assert_eq!(types(&out), ["session.updated"]);
        let session = &out[0]["session"];
        assert_eq!(session["audio"]["output"]["voice"], "cedar");
        assert_eq!(
            session["audio"]["output"]["format"]["rate"], 24000,
            "merged, not replaced"
        );
        assert!(h.session.turn_detection_null());
    }

    #[test]
    fn beta_keys_are_refused_with_the_param_and_the_session_is_unchanged() {
        let mut h = Harness::new();
        let out = h.send(json!({"type":"session.update","event_id":"ev1",
            "session":{"type":"realtime","modalities":["audio","text"]}}));
        assert_eq!(error_code(&out), Some("unknown_parameter"));
        assert_eq!(out[0]["error"]["param"], "session.modalities");
        assert_eq!(out[0]["error"]["event_id"], "ev1");
        assert!(!h.session.turn_detection_null());
    }

    #[test]
    fn commit_needs_100_ms_then_adds_a_user_item_and_later_its_transcript() {
        let mut h = Harness::new();
        h.send(json!({"type":"session.update","session":{"type":"realtime",
            "audio":{"input":{"transcription":{"model":"gpt-4o-mini-transcribe"}}}}}));
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0u8; n]);
        h.send(json!({"type":"input_audio_buffer.append","audio":b64(4798)}));
        let out = h.send(json!({"type":"input_audio_buffer.commit"}));
        assert_eq!(error_code(&out), Some("input_audio_buffer_commit_empty"));
        assert!(
            out[0]["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("99.96ms")
        );
        h.send(json!({"type":"input_audio_buffer.append","audio":b64(2)}));
        let out = h.send(json!({"type":"input_audio_buffer.commit"}));
        assert_eq!(
            types(&out),
            [
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done"
            ]
        );
        let item_id = out[0]["item_id"].clone();
        assert_eq!(out[1]["item"]["id"], item_id);
        assert_eq!(out[1]["item"]["role"], "user");
        let later = h.advance(Duration::from_millis(100));
        assert_eq!(
            types(&later),
            ["conversation.item.input_audio_transcription.completed"]
        );
        assert_eq!(later[0]["transcript"], "hello walkie");
        assert_eq!(later[0]["item_id"], item_id);
        // The buffer was consumed: committing again is empty.
        let out = h.send(json!({"type":"input_audio_buffer.commit"}));
        assert_eq!(error_code(&out), Some("input_audio_buffer_commit_empty"));
    }

    #[test]
    fn no_transcription_events_unless_the_session_asks_for_them() {
        let mut h = Harness::new();
        let audio = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 9600]);
        h.send(json!({"type":"input_audio_buffer.append","audio":audio}));
        h.send(json!({"type":"input_audio_buffer.commit"}));
        let later = h.advance(Duration::from_secs(1));
        assert!(!types(&later).contains(&"conversation.item.input_audio_transcription.completed"));
    }

    #[test]
    fn a_response_streams_paced_audio_then_done_and_only_one_may_be_active() {
        let mut h = Harness::new();
        h.script = Script::from_json(
            &json!({"default":{"say":"one two three","audio_ms":1000}}),
            std::path::Path::new("."),
        )
        .expect("script");
        h.say("hi");
        let first = h.send(json!({"type":"response.create"}));
        assert_eq!(first[0]["type"], "response.created");
        let response_id = first[0]["response"]["id"].as_str().expect("id").to_owned();
        let deltas_now = first
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .count();
        assert_eq!(deltas_now, 1, "only the first chunk is due at once");
        assert_eq!(h.session.active_response(), Some(response_id.as_str()));

        let second = h.send(json!({"type":"response.create","event_id":"e2"}));
        assert_eq!(
            error_code(&second),
            Some("conversation_already_has_active_response")
        );
        assert!(
            second[0]["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(&response_id)
        );

        // 100 ms of audio per chunk at 4x: one more chunk every 25 ms.
        let next = h.advance(Duration::from_millis(25));
        assert_eq!(types(&next), ["response.output_audio.delta"]);
        assert_eq!(
            first
                .iter()
                .filter(|e| e["type"] == "response.output_audio_transcript.delta")
                .count(),
            1,
            "the transcript runs a little ahead of the audio"
        );
        let rest = h.finish();
        let mut all = first.clone();
        all.extend(next);
        all.extend(rest.clone());
        let audio: usize = all
            .iter()
            .filter(|e| e["type"] == "response.output_audio.delta")
            .map(|e| {
                base64::engine::general_purpose::STANDARD
                    .decode(e["delta"].as_str().unwrap_or(""))
                    .map_or(0, |b| b.len())
            })
            .sum();
        assert_eq!(audio, 1000 * 48);
        let transcript: String = all
            .iter()
            .filter(|e| e["type"] == "response.output_audio_transcript.delta")
            .filter_map(|e| e["delta"].as_str())
            .collect();
        assert_eq!(transcript, "one two three");
        let done = rest.last().expect("done");
        assert_eq!(done["type"], "response.done");
        assert_eq!(done["response"]["status"], "completed");
        assert_eq!(
            done["response"]["output"][0]["content"][0]["transcript"],
            "one two three"
        );
        assert_eq!(h.session.active_response(), None);
        let again = h.send(json!({"type":"response.create"}));
        assert_eq!(again[0]["type"], "response.created");
    }

    #[test]
    fn a_scripted_call_issues_a_call_id_that_outputs_must_use() {
        let mut h = Harness::new();
        let out = h.send(json!({"type":"conversation.item.create","item":{
            "type":"function_call_output","call_id":"call_made_up","output":"{}"}}));
        assert_eq!(error_code(&out), Some("invalid_tool_call_id"));

        h.say("start the tests");
        h.send(json!({"type":"response.create"}));
        let events = h.finish();
        let done = events
            .iter()
            .find(|e| e["type"] == "response.function_call_arguments.done")
            .expect("a call");
        assert_eq!(done["name"], "start_task");
        let arguments: Value =
            serde_json::from_str(done["arguments"].as_str().unwrap_or("")).expect("json args");
        assert_eq!(arguments, json!({"prompt":"start the tests"}));
        let call_id = done["call_id"].as_str().expect("call id").to_owned();
        let response_done = events.last().expect("done");
        assert_eq!(
            response_done["response"]["output"][1]["type"],
            "function_call"
        );

        let out = h.send(json!({"type":"conversation.item.create","item":{
            "type":"function_call_output","call_id":call_id,"output":"{\"status\":\"started\"}"}}));
        assert_eq!(
            types(&out),
            ["conversation.item.added", "conversation.item.done"]
        );
        h.send(json!({"type":"response.create"}));
        let events = h.finish();
        let transcript = events
            .iter()
            .find(|e| e["type"] == "response.output_audio_transcript.done")
            .expect("spoken");
        assert_eq!(
            transcript["transcript"], "Started.",
            "after_tool answers outputs"
        );

        // A system message gets the on_system reply.
        h.send(
            json!({"type":"conversation.item.create","item":{"type":"message",
            "role":"system","content":[{"type":"input_text","text":"task x done"}]}}),
        );
        h.send(json!({"type":"response.create"}));
        let events = h.finish();
        let transcript = events
            .iter()
            .find(|e| e["type"] == "response.output_audio_transcript.done")
            .expect("spoken");
        assert_eq!(transcript["transcript"], "A task finished.");
    }

    #[test]
    fn a_call_with_after_says_it_once_its_output_is_back() {
        let mut h = Harness::new();
        h.script = Script::from_json(
            &json!({"rules":[{"match":"yes","reply":{"say":"Okay.","audio_ms":50,
                "call":{"name":"answer_task","arguments":{"name":"x","decision":"allow"}},
                "after":{"say":"Allowed.","audio_ms":50}}}],
                "system_rules":[{"match":"^Permission","reply":{"say":"Allow?","audio_ms":50}}]}),
            std::path::Path::new("."),
        )
        .expect("script");
        let spoken = |events: &[Value]| {
            events
                .iter()
                .find(|e| e["type"] == "response.output_audio_transcript.done")
                .map(|e| e["transcript"].as_str().unwrap_or("").to_owned())
        };
        h.send(
            json!({"type":"conversation.item.create","item":{"type":"message",
            "role":"system","content":[{"type":"input_text","text":"Permission request: x"}]}}),
        );
        let mut first = h.send(json!({"type":"response.create"}));
        first.extend(h.finish());
        assert_eq!(spoken(&first).as_deref(), Some("Allow?"));
        h.say("yes");
        let mut events = h.send(json!({"type":"response.create"}));
        events.extend(h.finish());
        let call_id = events
            .iter()
            .find(|e| e["type"] == "response.function_call_arguments.done")
            .expect("a call")["call_id"]
            .as_str()
            .unwrap()
            .to_owned();
        h.send(json!({"type":"conversation.item.create","item":{
            "type":"function_call_output","call_id":call_id,"output":"{}"}}));
        let mut last = h.send(json!({"type":"response.create"}));
        last.extend(h.finish());
        assert_eq!(spoken(&last).as_deref(), Some("Allowed."));
        // Only once: the next outputs get after_tool again.
        assert!(h.session.after_call.is_none());
    }

    #[test]
    fn cancel_stops_streaming_and_truncate_is_bounded_by_audio_sent() {
        let mut h = Harness::new();
        h.script = Script::from_json(
            &json!({"default":{"say":"a long answer","audio_ms":2000}}),
            std::path::Path::new("."),
        )
        .expect("script");
        let out = h.send(json!({"type":"response.cancel"}));
        assert_eq!(error_code(&out), Some("response_cancel_not_active"));

        h.say("talk");
        let first = h.send(json!({"type":"response.create"}));
        let item_id = first
            .iter()
            .find(|e| e["type"] == "response.output_item.added")
            .and_then(|e| e["item"]["id"].as_str())
            .expect("item")
            .to_owned();
        h.advance(Duration::from_millis(50)); // chunks 2 and 3: 300 ms sent in all
        let out = h.send(json!({"type":"response.cancel"}));
        assert_eq!(types(&out), ["response.output_item.done", "response.done"]);
        assert_eq!(out[1]["response"]["status"], "cancelled");
        assert_eq!(out[0]["item"]["status"], "incomplete");
        assert_eq!(h.session.active_response(), None);
        assert!(h.finish().is_empty(), "nothing streams after a cancel");

        let truncate = |ms: u64| {
            json!({"type":"conversation.item.truncate","item_id":item_id,
                                       "content_index":0,"audio_end_ms":ms})
        };
        let out = h.send(truncate(301));
        assert_eq!(error_code(&out), Some("invalid_value"));
        assert_eq!(out[0]["error"]["param"], "audio_end_ms");
        let out = h.send(truncate(250));
        assert_eq!(types(&out), ["conversation.item.truncated"]);
        assert_eq!(h.session.truncations()[0]["audio_end_ms"], 250);
        assert_eq!(h.session.truncations()[0]["audio_sent_ms"], 300);

        // A user item is not truncatable.
        let user = h.say("x");
        let user_id = user[0]["item"]["id"].clone();
        let out = h.send(
            json!({"type":"conversation.item.truncate","item_id":user_id,
                                "content_index":0,"audio_end_ms":0}),
        );
        assert_eq!(error_code(&out), Some("invalid_value"));
    }

    #[test]
    fn unknown_types_and_garbage_get_errors_and_the_session_goes_on() {
        let mut h = Harness::new();
        let out = h.send(json!({"type":"session.heartbeat"}));
        assert_eq!(error_code(&out), Some("unknown_event"));
        h.session.handle_text(h.now, "not json", &h.script);
        assert_eq!(error_code(&h.drain()), Some("invalid_json"));
        let out = h.send(json!({"audio":"AAAA"}));
        assert_eq!(error_code(&out), Some("missing_required_parameter"));
        let out = h.send(json!({"type":"input_audio_buffer.append","audio":"%%%"}));
        assert_eq!(error_code(&out), Some("invalid_value"));
        let out = h.send(json!({"type":"input_audio_buffer.clear"}));
        assert_eq!(types(&out), ["input_audio_buffer.cleared"]);
        assert_eq!(h.session.events_received(), 5);
    }

    #[test]
    fn expiry_sends_session_expired_then_close_1001() {
        let now = Instant::now();
        let mut session = Session::new(
            now,
            &SessionConfig {
                session_seconds: 2,
                ..config()
            },
        );
        while session.poll_output().is_some() {}
        assert_eq!(session.next_deadline(), Some(now + Duration::from_secs(2)));
        session.handle_timeout(now + Duration::from_secs(1));
        assert_eq!(session.poll_output(), None);
        session.handle_timeout(now + Duration::from_secs(2));
        let Some(Output::Event(error)) = session.poll_output() else {
            panic!("an error event first");
        };
        assert_eq!(error["error"]["code"], "session_expired");
        assert!(matches!(
            session.poll_output(),
            Some(Output::Close { code: 1001, .. })
        ));
        assert!(session.is_closing());
        assert_eq!(session.next_deadline(), None);
    }

    #[test]
    fn a_beta_client_gets_an_error_and_close_4000_instead_of_a_session() {
        let session_config = SessionConfig {
            beta_shape: true,
            ..config()
        };
        let mut session = Session::new(Instant::now(), &session_config);
        let Some(Output::Event(error)) = session.poll_output() else {
            panic!("an error event first");
        };
        assert_eq!(error["error"]["code"], "beta_api_shape_disabled");
        assert!(matches!(
            session.poll_output(),
            Some(Output::Close { code: 4000, .. })
        ));
    }

    #[test]
    fn text_sessions_stream_text_and_out_of_band_responses_run_beside() {
        let mut h = Harness::new();
        h.send(json!({"type":"session.update","session":{"type":"realtime","output_modalities":["text"]}}));
        h.say("hi");
        let out = h.send(json!({"type":"response.create"}));
        assert!(types(&out).contains(&"response.output_text.delta"));
        assert!(!types(&out).contains(&"response.output_audio.delta"));
        let side = h.send(
            json!({"type":"response.create","response":{"conversation":"none",
            "metadata":{"purpose":"summary"}}}),
        );
        assert_eq!(side[0]["type"], "response.created");
        assert_eq!(side[0]["response"]["conversation_id"], Value::Null);
        assert_eq!(side[0]["response"]["metadata"]["purpose"], "summary");
        let done: Vec<Value> = h
            .finish()
            .into_iter()
            .filter(|e| e["type"] == "response.done")
            .collect();
        assert_eq!(done.len(), 2);
    }
}
