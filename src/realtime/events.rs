//! Realtime API (GA) event types: what walkie sends, what it reads back, and the trace filter.
//!
//! Pure data, no fd and no thread: the link serialises [`ClientEvent`]s onto the WebSocket and
//! hands received text frames to [`parse_server_event`]; the conversation core consumes both.
//!
//! Outgoing shapes follow the official SDK models (`openai.types.realtime`) exactly, because the
//! GA server rejects unknown and beta-style keys (`unknown_parameter`): `None` fields are left
//! out, except `audio.input.turn_detection`, which must be an explicit `null` to turn server
//! VAD off. Incoming events are read leniently: the server adds event types and fields over
//! time, so unknown types become [`ServerEvent::Unknown`], extra fields are ignored and a
//! missing or mistyped field we read becomes an empty value rather than an error.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::voice::SAMPLE_RATE;

/// A client event walkie sends. `event_id` is optional everywhere; the server echoes it in
/// `error.event_id`, which is how a refused `response.create` is recognised.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum ClientEvent {
    #[serde(rename = "session.update")]
    SessionUpdate {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        /// Boxed: it dwarfs every other event.
        session: Box<Session>,
    },
    #[serde(rename = "input_audio_buffer.append")]
    InputAudioBufferAppend {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        /// Base64 of 24 kHz mono s16le PCM.
        audio: String,
    },
    #[serde(rename = "input_audio_buffer.commit")]
    InputAudioBufferCommit {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "input_audio_buffer.clear")]
    InputAudioBufferClear {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
    },
    #[serde(rename = "conversation.item.create")]
    ConversationItemCreate {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        item: Item,
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_item_id: Option<String>,
    },
    #[serde(rename = "conversation.item.truncate")]
    ConversationItemTruncate {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        item_id: String,
        content_index: u32,
        audio_end_ms: u64,
    },
    #[serde(rename = "response.create")]
    ResponseCreate {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        response: Option<ResponseParams>,
    },
    #[serde(rename = "response.cancel")]
    ResponseCancel {
        #[serde(skip_serializing_if = "Option::is_none")]
        event_id: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        response_id: Option<String>,
    },
}

impl ClientEvent {
    /// The event as one WebSocket text frame.
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string and no Serialize
        // impl of ours returns an error. Fall back to an empty object rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// `input_audio_buffer.append` carrying `samples` as base64 s16le.
    pub fn append(samples: &[i16]) -> ClientEvent {
        use base64::Engine as _;
        let mut bytes = Vec::with_capacity(samples.len() * 2);
        for sample in samples {
            bytes.extend_from_slice(&sample.to_le_bytes());
        }
        ClientEvent::InputAudioBufferAppend {
            event_id: None,
            audio: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// `conversation.item.create` appending `item` at the end of the conversation.
    pub fn create_item(item: Item) -> ClientEvent {
        ClientEvent::ConversationItemCreate {
            event_id: None,
            item,
            previous_item_id: None,
        }
    }
}

/// A conversation item walkie creates. Serialises as `{"type":"message","role":…}` or
/// `{"type":"function_call_output",…}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum Item {
    #[serde(rename = "message")]
    Message(Message),
    #[serde(rename = "function_call_output")]
    FunctionCallOutput { call_id: String, output: String },
}

impl Item {
    /// A user message with one `input_text` part.
    pub fn user_text(text: &str) -> Item {
        Item::Message(Message::User {
            content: vec![UserContent::InputText { text: text.into() }],
        })
    }

    /// A system message with one `input_text` part.
    pub fn system_text(text: &str) -> Item {
        Item::Message(Message::System {
            content: vec![SystemContent::InputText { text: text.into() }],
        })
    }

    /// An assistant message with one `output_text` part (assistant audio cannot be recreated).
    pub fn assistant_text(text: &str) -> Item {
        Item::Message(Message::Assistant {
            content: vec![AssistantContent::OutputText { text: text.into() }],
        })
    }
}

/// A message item; the role decides which content parts the server accepts, so each role has
/// its own part type.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    User { content: Vec<UserContent> },
    System { content: Vec<SystemContent> },
    Assistant { content: Vec<AssistantContent> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum UserContent {
    InputText {
        text: String,
    },
    /// Base64 of 24 kHz mono s16le PCM.
    InputAudio {
        audio: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SystemContent {
    InputText { text: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AssistantContent {
    OutputText { text: String },
}

/// The optional `response` of `response.create` (the subset walkie may use).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ResponseParams {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
    /// `"auto"` (default) or `"none"` for an out-of-band response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// The `session` object of `session.update` (GA shape, realtime-ga.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// Always `"realtime"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub instructions: String,
    pub output_modalities: Vec<String>,
    pub audio: AudioConfig,
    pub tools: Vec<FunctionTool>,
    pub tool_choice: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudioConfig {
    pub input: AudioInput,
    pub output: AudioOutput,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudioInput {
    pub format: AudioFormat,
    /// walkie is push-to-talk, so server VAD must be off. The API spells that as an explicit
    /// `null` (an absent key keeps the default, which is server VAD on); `()` serialises as
    /// `null`.
    pub turn_detection: (),
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transcription: Option<Transcription>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transcription {
    pub model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudioOutput {
    pub format: AudioFormat,
    pub voice: String,
}

/// `{"type":"audio/pcm","rate":24000}`: the only PCM format the API takes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AudioFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub rate: u32,
}

impl AudioFormat {
    pub fn pcm24k() -> AudioFormat {
        AudioFormat {
            kind: "audio/pcm".into(),
            rate: SAMPLE_RATE,
        }
    }
}

/// A function tool the model may call; `parameters` is a JSON Schema object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionTool {
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

/// What the session is configured with beyond walkie's fixed choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// Appended to walkie's own instructions (config `realtime.instructions`).
    pub instructions_extra: String,
    /// Output voice (`marin`, `cedar`, …).
    pub voice: String,
    /// Input transcription model; empty turns input transcription off.
    pub transcription_model: String,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            instructions_extra: String::new(),
            voice: "marin".into(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
        }
    }
}

/// walkie's own instructions; the policy they describe matches what the conversation core and
/// the task engine do (task names, "Task update" system messages).
pub const INSTRUCTIONS: &str = "\
You are walkie, a voice assistant the user talks to through a push-to-talk button. You run \
coding agents as background tasks with your tools and keep talking with the user while they work.
- When you start a task, acknowledge it in a few words and say its name, for example \
\"Started flaky-test.\" Do not wait for the task to finish.
- Refer to tasks by their names. When the user's reference could mean more than one task, \
ask which one they mean instead of guessing.
- Before starting or continuing a task whose request sounds destructive (delete, remove, drop, \
force-push, reset, wipe, overwrite, rewrite history), repeat the request back in one sentence \
and wait for a clear yes before you call the tool.
- Keep answers short and in spoken style: no markdown, no lists, no code blocks, no URLs read \
out character by character.
- System messages that start with \"Task update\" report tasks that finished. Tell the user \
briefly what happened, by task name, and offer details only when asked.
- A \"Permission request\" system message means an agent waits for the user's approval. Ask \
the user in its words, for example \"flaky-test wants to run: npm test. Allow?\", then wait. \
Call answer_task only with the user's own answer (allow, deny, or always for \"don't ask \
again\"); never decide for them.
- To add to or change what a running task does, use message_task (now: true to stop its \
current step first); interrupt_task ends its current step and keeps it ready for more; \
cancel_task stops it for good. For \"what is it doing?\", call task_status and say its activity.";

/// `session.update` for a fresh session: audio in and out at 24 kHz PCM, server VAD off,
/// input transcription on, walkie's tools.
pub fn session_update(settings: &SessionSettings) -> ClientEvent {
    let mut instructions = String::from(INSTRUCTIONS);
    if !settings.instructions_extra.trim().is_empty() {
        instructions.push_str("\n\n");
        instructions.push_str(&settings.instructions_extra);
    }
    let transcription = (!settings.transcription_model.is_empty()).then(|| Transcription {
        model: settings.transcription_model.clone(),
    });
    ClientEvent::SessionUpdate {
        event_id: None,
        session: Box::new(Session {
            kind: "realtime".into(),
            instructions,
            output_modalities: vec!["audio".into()],
            audio: AudioConfig {
                input: AudioInput {
                    format: AudioFormat::pcm24k(),
                    turn_detection: (),
                    transcription,
                },
                output: AudioOutput {
                    format: AudioFormat::pcm24k(),
                    voice: settings.voice.clone(),
                },
            },
            tools: tools(),
            tool_choice: "auto".into(),
        }),
    }
}

fn tool(name: &str, description: &str, parameters: Value) -> FunctionTool {
    FunctionTool {
        kind: "function".into(),
        name: name.into(),
        description: description.into(),
        parameters,
    }
}

/// The task tools the model is given (README.md, "Talking to it").
pub fn tools() -> Vec<FunctionTool> {
    let name_property = json!({
        "type": "string",
        "description": "The task's name as the user or a previous tool result said it; a unique prefix or word of the name also works."
    });
    vec![
        tool(
            "start_task",
            "Start a coding agent in the background on a new task. Returns at once with the \
             task's name; the result arrives later as a \"Task update\" system message. Repeat \
             a destructive-sounding request back and get a yes before calling this.",
            json!({
                "type": "object",
                "properties": {
                    "prompt": {
                        "type": "string",
                        "description": "Complete, self-contained instructions for the agent: what to do, where, and what done looks like. The agent does not hear this conversation."
                    },
                    "name": {
                        "type": "string",
                        "description": "Optional short, speakable name in lowercase words joined by hyphens, taken from the user's words (for example flaky-test). Omit it to let walkie choose."
                    },
                    "project": {
                        "type": "string",
                        "description": "Optional name of a configured project to work in. Omit it for a scratch directory."
                    }
                },
                "required": ["prompt"]
            }),
        ),
        tool(
            "list_tasks",
            "List running and recently finished tasks with their names and states.",
            json!({"type": "object", "properties": {}}),
        ),
        tool(
            "task_status",
            "Current state of one task: running, waiting for the user's approval, or finished, for \
             how long; what its agent is doing now (activity) and its last sentence; whether \
             the last message_task text was taken in. Use it for \"what is it doing?\".",
            json!({
                "type": "object",
                "properties": {"name": name_property},
                "required": ["name"]
            }),
        ),
        tool(
            "task_result",
            "The outcome of a finished task: its summary and the files it changed.",
            json!({
                "type": "object",
                "properties": {"name": name_property},
                "required": ["name"]
            }),
        ),
        tool(
            "continue_task",
            "Send a follow-up instruction to a task's agent, continuing its session with its \
             earlier context. Works on running and finished tasks; a task that finished \
             recently starts on it at once.",
            json!({
                "type": "object",
                "properties": {
                    "name": name_property,
                    "prompt": {
                        "type": "string",
                        "description": "The follow-up instruction for the agent, self-contained."
                    }
                },
                "required": ["name", "prompt"]
            }),
        ),
        tool(
            "cancel_task",
            "Stop a task for good: a running or waiting one and everything it started, or the \
             agent a finished one keeps warm. To stop only its current step, use interrupt_task.",
            json!({
                "type": "object",
                "properties": {"name": name_property},
                "required": ["name"]
            }),
        ),
        tool(
            "message_task",
            "Tell a task's agent something while it works (\"and also do X\", \"do Y instead\"). \
             It takes the text in at its next step; with now, its current step is interrupted \
             first. A finished task starts on it as a follow-up.",
            json!({
                "type": "object",
                "properties": {
                    "name": name_property,
                    "text": {
                        "type": "string",
                        "description": "What to tell the agent, self-contained."
                    },
                    "now": {
                        "type": "boolean",
                        "description": "Interrupt its current step first, for a change of course. Default false."
                    }
                },
                "required": ["name", "text"]
            }),
        ),
        tool(
            "interrupt_task",
            "Stop a task's current step without ending the task: its agent stays ready, with \
             its context, for the next message_task or continue_task.",
            json!({
                "type": "object",
                "properties": {"name": name_property},
                "required": ["name"]
            }),
        ),
        tool(
            "answer_task",
            "Answer a task's permission request with the user's own answer, given after you \
             asked them; an answer without one is refused. always also allows the same \
             from now on, possibly saved in the project's settings.",
            json!({
                "type": "object",
                "properties": {
                    "name": name_property,
                    "decision": {
                        "type": "string",
                        "enum": ["allow", "deny", "always"],
                        "description": "The user's answer: allow once, deny, or always allow this kind of request."
                    },
                    "reason": {
                        "type": "string",
                        "description": "Optional, with deny: what the user said, passed to the agent."
                    }
                },
                "required": ["name", "decision"]
            }),
        ),
    ]
}

/// Error codes retrying cannot fix (realtime-ga.md "Errors, expiry, reconnect"), whether they
/// come in an `error` event or in the body of a refused WebSocket upgrade: the link stops and
/// says why instead of reconnecting.
pub const FATAL_ERROR_CODES: [&str; 7] = [
    "invalid_api_key",
    "insufficient_quota",
    "model_not_found",
    "beta_api_shape_disabled",
    "billing_not_active",
    "account_deactivated",
    "unsupported_country_region_territory",
];

/// The `error` object of an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiError {
    /// `invalid_request_error`, `server_error`, …
    pub kind: String,
    pub code: Option<String>,
    pub message: String,
    pub param: Option<String>,
    /// The `event_id` of the client event that caused it, when the server knows it.
    pub event_id: Option<String>,
}

/// One entry of `rate_limits.updated`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateLimit {
    pub name: String,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub reset_seconds: Option<f64>,
}

/// A server event the conversation policy reads; anything else is [`ServerEvent::Unknown`].
/// String fields missing from the frame are empty.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    SessionCreated {
        session_id: String,
        /// Unix seconds at which the server ends the session.
        expires_at: Option<i64>,
    },
    SessionUpdated,
    InputAudioBufferCommitted {
        item_id: String,
    },
    InputAudioBufferCleared,
    InputAudioTranscriptionCompleted {
        item_id: String,
        transcript: String,
    },
    InputAudioTranscriptionFailed {
        item_id: String,
        message: String,
    },
    ResponseCreated {
        response_id: String,
    },
    ResponseOutputItemAdded {
        response_id: String,
        item_id: String,
        /// `message`, `function_call`, …
        item_type: String,
        role: Option<String>,
    },
    ResponseOutputAudioDelta {
        response_id: String,
        item_id: String,
        /// Base64 s16le PCM, undecoded.
        delta: String,
    },
    ResponseOutputAudioDone {
        response_id: String,
        item_id: String,
    },
    ResponseOutputAudioTranscriptDone {
        response_id: String,
        item_id: String,
        transcript: String,
    },
    ResponseOutputTextDone {
        response_id: String,
        item_id: String,
        text: String,
    },
    ResponseFunctionCallArgumentsDone {
        response_id: String,
        item_id: String,
        call_id: String,
        name: String,
        /// The arguments as the JSON string the model produced (possibly invalid JSON).
        arguments: String,
    },
    ResponseDone {
        response_id: String,
        /// `completed`, `cancelled`, `failed`, `incomplete`.
        status: String,
    },
    Error(ApiError),
    RateLimitsUpdated {
        rate_limits: Vec<RateLimit>,
    },
    Unknown {
        kind: String,
    },
}

/// A server text frame that is not an event at all.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON. The caller logs the frame (truncated) and skips it.
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// JSON, but not an object with a string `type`. The caller logs and skips it.
    #[error("no event type")]
    MissingType,
}

fn field<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

/// The string at `path`, or `None` when absent, null or not a string.
fn opt_text(value: &Value, path: &[&str]) -> Option<String> {
    field(value, path)
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The string at `path`, empty when absent or not a string.
fn text(value: &Value, path: &[&str]) -> String {
    opt_text(value, path).unwrap_or_default()
}

/// Parses one server text frame. Lenient by design (see the module header).
pub fn parse_server_event(frame: &str) -> Result<ServerEvent, ParseError> {
    let v: Value = serde_json::from_str(frame)?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or(ParseError::MissingType)?;
    let response_id = || text(&v, &["response_id"]);
    let item_id = || text(&v, &["item_id"]);
    Ok(match kind {
        "session.created" => ServerEvent::SessionCreated {
            session_id: text(&v, &["session", "id"]),
            expires_at: field(&v, &["session", "expires_at"]).and_then(|e| {
                // Seconds are integers on the wire; accept a float and ignore anything that
                // does not fit rather than invent a date.
                e.as_i64().or_else(|| {
                    e.as_f64()
                        .filter(|f| f.is_finite() && f.abs() < 1e15)
                        .map(|f| f as i64)
                })
            }),
        },
        "session.updated" => ServerEvent::SessionUpdated,
        "input_audio_buffer.committed" => {
            ServerEvent::InputAudioBufferCommitted { item_id: item_id() }
        }
        "input_audio_buffer.cleared" => ServerEvent::InputAudioBufferCleared,
        "conversation.item.input_audio_transcription.completed" => {
            ServerEvent::InputAudioTranscriptionCompleted {
                item_id: item_id(),
                transcript: text(&v, &["transcript"]),
            }
        }
        "conversation.item.input_audio_transcription.failed" => {
            ServerEvent::InputAudioTranscriptionFailed {
                item_id: item_id(),
                message: text(&v, &["error", "message"]),
            }
        }
        "response.created" => ServerEvent::ResponseCreated {
            response_id: text(&v, &["response", "id"]),
        },
        "response.output_item.added" => ServerEvent::ResponseOutputItemAdded {
            response_id: response_id(),
            item_id: text(&v, &["item", "id"]),
            item_type: text(&v, &["item", "type"]),
            role: opt_text(&v, &["item", "role"]),
        },
        "response.output_audio.delta" => ServerEvent::ResponseOutputAudioDelta {
            response_id: response_id(),
            item_id: item_id(),
            delta: text(&v, &["delta"]),
        },
        "response.output_audio.done" => ServerEvent::ResponseOutputAudioDone {
            response_id: response_id(),
            item_id: item_id(),
        },
        "response.output_audio_transcript.done" => ServerEvent::ResponseOutputAudioTranscriptDone {
            response_id: response_id(),
            item_id: item_id(),
            transcript: text(&v, &["transcript"]),
        },
        "response.output_text.done" => ServerEvent::ResponseOutputTextDone {
            response_id: response_id(),
            item_id: item_id(),
            text: text(&v, &["text"]),
        },
        "response.function_call_arguments.done" => ServerEvent::ResponseFunctionCallArgumentsDone {
            response_id: response_id(),
            item_id: item_id(),
            call_id: text(&v, &["call_id"]),
            name: text(&v, &["name"]),
            arguments: text(&v, &["arguments"]),
        },
        "response.done" => ServerEvent::ResponseDone {
            response_id: text(&v, &["response", "id"]),
            status: text(&v, &["response", "status"]),
        },
        "error" => ServerEvent::Error(ApiError {
            kind: text(&v, &["error", "type"]),
            code: opt_text(&v, &["error", "code"]),
            message: text(&v, &["error", "message"]),
            param: opt_text(&v, &["error", "param"]),
            event_id: opt_text(&v, &["error", "event_id"]),
        }),
        "rate_limits.updated" => ServerEvent::RateLimitsUpdated {
            rate_limits: v
                .get("rate_limits")
                .and_then(Value::as_array)
                .map(|limits| {
                    limits
                        .iter()
                        .map(|l| RateLimit {
                            name: text(l, &["name"]),
                            limit: l.get("limit").and_then(Value::as_u64),
                            remaining: l.get("remaining").and_then(Value::as_u64),
                            reset_seconds: l.get("reset_seconds").and_then(Value::as_f64),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        },
        other => ServerEvent::Unknown {
            kind: other.to_owned(),
        },
    })
}

/// Replaces base64 audio in a traced event with `"<audio N bytes>"` (N decoded bytes), so a
/// trace stays readable and small: the `audio` of `input_audio_buffer.append`, the `delta` of
/// `response.output_audio.delta`, and `input_audio` parts of a created item.
pub fn elide_audio(event: &mut Value) {
    fn elide(slot: Option<&mut Value>) {
        if let Some(v) = slot
            && let Some(b64) = v.as_str()
        {
            let digits = b64.trim_end_matches('=').len();
            *v = Value::String(format!("<audio {} bytes>", digits * 3 / 4));
        }
    }
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "input_audio_buffer.append" => elide(event.get_mut("audio")),
        "response.output_audio.delta" => elide(event.get_mut("delta")),
        "conversation.item.create" | "conversation.item.added" | "conversation.item.done" => {
            if let Some(parts) = event
                .get_mut("item")
                .and_then(|item| item.get_mut("content"))
                .and_then(Value::as_array_mut)
            {
                for part in parts {
                    elide(part.get_mut("audio"));
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_value(event: &ClientEvent) -> Value {
        serde_json::from_str(&event.to_json()).unwrap()
    }

    #[test]
    fn session_update_has_the_ga_shape_key_by_key() {
        let settings = SessionSettings {
            instructions_extra: "Speak German.".into(),
            voice: "cedar".into(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
        };
        let v = to_value(&session_update(&settings));
        let mut top: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        top.sort();
        assert_eq!(top, ["session", "type"]);
        assert_eq!(v["type"], "session.update");
        let s = &v["session"];
        let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "audio",
                "instructions",
                "output_modalities",
                "tool_choice",
                "tools",
                "type"
            ]
        );
        assert_eq!(s["type"], "realtime");
        assert_eq!(s["output_modalities"], json!(["audio"]));
        assert_eq!(s["tool_choice"], "auto");
        assert_eq!(
            s["audio"],
            json!({
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": null,
                    "transcription": {"model": "gpt-4o-mini-transcribe"}
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "cedar"}
            })
        );
        // Explicit null, not an absent key: absent means server VAD on.
        assert!(
            s["audio"]["input"]
                .as_object()
                .unwrap()
                .contains_key("turn_detection")
        );
        let instructions = s["instructions"].as_str().unwrap();
        assert!(instructions.starts_with(INSTRUCTIONS));
        assert!(instructions.ends_with("\n\nSpeak German."));
        for word in ["Task update", "task name", "which one", "yes", "markdown"] {
            assert!(
                instructions.to_lowercase().contains(&word.to_lowercase()),
                "{word}"
            );
        }
        // Beta-style keys the GA server rejects.
        for beta in [
            "voice",
            "modalities",
            "input_audio_format",
            "turn_detection",
            "input_audio_transcription",
            "temperature",
        ] {
            assert!(s.get(beta).is_none(), "{beta}");
        }
    }

    #[test]
    fn session_update_without_extra_instructions_or_transcription() {
        let settings = SessionSettings {
            instructions_extra: String::new(),
            voice: "marin".into(),
            transcription_model: String::new(),
        };
        let v = to_value(&session_update(&settings));
        assert_eq!(v["session"]["instructions"], INSTRUCTIONS);
        assert_eq!(
            v["session"]["audio"]["input"],
            json!({"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": null})
        );
    }

    #[test]
    fn the_instructions_and_descriptions_say_how_to_talk_to_a_working_agent() {
        // What the conversation core sends starts with these words; the instructions
        // quote them.
        for quoted in ["\"Task update\"", "\"Permission request\""] {
            assert!(INSTRUCTIONS.contains(quoted), "{quoted}");
        }
        for tool in [
            "task_status",
            "message_task",
            "interrupt_task",
            "answer_task",
            "cancel_task",
        ] {
            assert!(
                INSTRUCTIONS.contains(tool),
                "the instructions do not name {tool}"
            );
        }
        assert!(INSTRUCTIONS.contains("never decide for them"));
        // Briefly: every session carries them.
        assert!(INSTRUCTIONS.len() < 3000, "{} bytes", INSTRUCTIONS.len());
        let v = to_value(&session_update(&SessionSettings::default()));
        let description = |name: &str| {
            v["session"]["tools"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == name)
                .unwrap()["description"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        for (tool, says) in [
            ("task_status", "what its agent is doing now"),
            ("task_status", "taken in"),
            ("message_task", "with now"),
            ("interrupt_task", "without ending the task"),
            ("answer_task", "an answer without one is refused"),
            ("cancel_task", "interrupt_task"),
            ("continue_task", "starts on it at once"),
        ] {
            let text = description(tool);
            assert!(text.contains(says), "{tool}: {text}");
            assert!(text.len() < 400, "{tool} is not brief: {text}");
        }
    }

    #[test]
    fn tools_are_the_nine_task_tools_with_schemas() {
        let v = to_value(&session_update(&SessionSettings::default()));
        let tools = v["session"]["tools"].as_array().unwrap();
        let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "start_task",
                "list_tasks",
                "task_status",
                "task_result",
                "continue_task",
                "cancel_task",
                "message_task",
                "interrupt_task",
                "answer_task"
            ]
        );
        let required = |name: &str| -> Vec<String> {
            let t = tools.iter().find(|t| t["name"] == name).unwrap();
            assert_eq!(t["type"], "function");
            assert!(t["description"].as_str().unwrap().len() > 20);
            assert_eq!(t["parameters"]["type"], "object");
            let mut keys: Vec<&str> = t.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            keys.sort();
            assert_eq!(keys, ["description", "name", "parameters", "type"]);
            t["parameters"]["required"]
                .as_array()
                .map(|r| r.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default()
        };
        assert_eq!(required("start_task"), ["prompt"]);
        assert!(required("list_tasks").is_empty());
        assert_eq!(required("task_status"), ["name"]);
        assert_eq!(required("task_result"), ["name"]);
        assert_eq!(required("continue_task"), ["name", "prompt"]);
        assert_eq!(required("cancel_task"), ["name"]);
        assert_eq!(required("message_task"), ["name", "text"]);
        assert_eq!(required("interrupt_task"), ["name"]);
        assert_eq!(required("answer_task"), ["name", "decision"]);
        let answer = tools.iter().find(|t| t["name"] == "answer_task").unwrap();
        assert_eq!(
            answer["parameters"]["properties"]["decision"]["enum"],
            json!(["allow", "deny", "always"])
        );
        let start = &tools[0]["parameters"]["properties"];
        for p in ["prompt", "name", "project"] {
            assert_eq!(start[p]["type"], "string", "{p}");
        }
    }

    #[test]
    fn client_events_serialise_to_the_sdk_shapes() {
        let cases: Vec<(ClientEvent, Value)> = vec![
            (
                ClientEvent::append(&[1, -2, 256]),
                json!({"type": "input_audio_buffer.append", "audio": "AQD+/wAB"}),
            ),
            (
                ClientEvent::InputAudioBufferCommit { event_id: None },
                json!({"type": "input_audio_buffer.commit"}),
            ),
            (
                ClientEvent::InputAudioBufferClear {
                    event_id: Some("e1".into()),
                },
                json!({"type": "input_audio_buffer.clear", "event_id": "e1"}),
            ),
            (
                ClientEvent::create_item(Item::user_text("hi")),
                json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}),
            ),
            (
                ClientEvent::ConversationItemCreate {
                    event_id: None,
                    item: Item::Message(Message::User {
                        content: vec![UserContent::InputAudio {
                            audio: "AAAA".into(),
                        }],
                    }),
                    previous_item_id: Some("item_1".into()),
                },
                json!({"type": "conversation.item.create", "previous_item_id": "item_1", "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]}}),
            ),
            (
                ClientEvent::create_item(Item::system_text("Task update")),
                json!({"type": "conversation.item.create", "item": {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Task update"}]}}),
            ),
            (
                ClientEvent::create_item(Item::assistant_text("Done.")),
                json!({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]}}),
            ),
            (
                ClientEvent::create_item(Item::FunctionCallOutput {
                    call_id: "call_1".into(),
                    output: "{\"status\":\"started\"}".into(),
                }),
                json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "call_1", "output": "{\"status\":\"started\"}"}}),
            ),
            (
                ClientEvent::ConversationItemTruncate {
                    event_id: None,
                    item_id: "item_2".into(),
                    content_index: 0,
                    audio_end_ms: 1500,
                },
                json!({"type": "conversation.item.truncate", "item_id": "item_2", "content_index": 0, "audio_end_ms": 1500}),
            ),
            (
                ClientEvent::ResponseCreate {
                    event_id: None,
                    response: None,
                },
                json!({"type": "response.create"}),
            ),
            (
                ClientEvent::ResponseCreate {
                    event_id: None,
                    response: Some(ResponseParams {
                        conversation: Some("none".into()),
                        ..Default::default()
                    }),
                },
                json!({"type": "response.create", "response": {"conversation": "none"}}),
            ),
            (
                ClientEvent::ResponseCancel {
                    event_id: None,
                    response_id: None,
                },
                json!({"type": "response.cancel"}),
            ),
            (
                ClientEvent::ResponseCancel {
                    event_id: None,
                    response_id: Some("resp_1".into()),
                },
                json!({"type": "response.cancel", "response_id": "resp_1"}),
            ),
        ];
        for (event, expected) in cases {
            assert_eq!(to_value(&event), expected);
        }
    }

    #[test]
    fn parses_the_events_the_policy_needs() {
        let p = |s: &str| parse_server_event(s).unwrap();
        assert_eq!(
            p(
                r#"{"type":"session.created","event_id":"e","session":{"id":"sess_1","expires_at":1795581369,"type":"realtime"}}"#
            ),
            ServerEvent::SessionCreated {
                session_id: "sess_1".into(),
                expires_at: Some(1_795_581_369)
            }
        );
        assert_eq!(
            p(r#"{"type":"session.updated","session":{}}"#),
            ServerEvent::SessionUpdated
        );
        assert_eq!(
            p(r#"{"type":"input_audio_buffer.committed","item_id":"i1","previous_item_id":null}"#),
            ServerEvent::InputAudioBufferCommitted {
                item_id: "i1".into()
            }
        );
        assert_eq!(
            p(r#"{"type":"input_audio_buffer.cleared","event_id":"e"}"#),
            ServerEvent::InputAudioBufferCleared
        );
        assert_eq!(
            p(
                r#"{"type":"conversation.item.input_audio_transcription.completed","item_id":"i1","content_index":0,"transcript":"hello","usage":{"type":"duration","seconds":1}}"#
            ),
            ServerEvent::InputAudioTranscriptionCompleted {
                item_id: "i1".into(),
                transcript: "hello".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"conversation.item.input_audio_transcription.failed","item_id":"i1","error":{"message":"bad audio"}}"#
            ),
            ServerEvent::InputAudioTranscriptionFailed {
                item_id: "i1".into(),
                message: "bad audio".into()
            }
        );
        assert_eq!(
            p(r#"{"type":"response.created","response":{"id":"r1","status":"in_progress"}}"#),
            ServerEvent::ResponseCreated {
                response_id: "r1".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.output_item.added","response_id":"r1","output_index":0,"item":{"id":"i2","type":"message","role":"assistant","content":[]}}"#
            ),
            ServerEvent::ResponseOutputItemAdded {
                response_id: "r1".into(),
                item_id: "i2".into(),
                item_type: "message".into(),
                role: Some("assistant".into())
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.output_audio.delta","response_id":"r1","item_id":"i2","output_index":0,"content_index":0,"delta":"AAA="}"#
            ),
            ServerEvent::ResponseOutputAudioDelta {
                response_id: "r1".into(),
                item_id: "i2".into(),
                delta: "AAA=".into()
            }
        );
        assert_eq!(
            p(r#"{"type":"response.output_audio.done","response_id":"r1","item_id":"i2"}"#),
            ServerEvent::ResponseOutputAudioDone {
                response_id: "r1".into(),
                item_id: "i2".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.output_audio_transcript.done","response_id":"r1","item_id":"i2","transcript":"Hi."}"#
            ),
            ServerEvent::ResponseOutputAudioTranscriptDone {
                response_id: "r1".into(),
                item_id: "i2".into(),
                transcript: "Hi.".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.output_text.done","response_id":"r1","item_id":"i2","text":"Hi."}"#
            ),
            ServerEvent::ResponseOutputTextDone {
                response_id: "r1".into(),
                item_id: "i2".into(),
                text: "Hi.".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.function_call_arguments.done","response_id":"r1","item_id":"i3","call_id":"c1","name":"start_task","arguments":"{\"prompt\":\"x\"}"}"#
            ),
            ServerEvent::ResponseFunctionCallArgumentsDone {
                response_id: "r1".into(),
                item_id: "i3".into(),
                call_id: "c1".into(),
                name: "start_task".into(),
                arguments: "{\"prompt\":\"x\"}".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"response.done","response":{"id":"r1","status":"cancelled","output":[]}}"#
            ),
            ServerEvent::ResponseDone {
                response_id: "r1".into(),
                status: "cancelled".into()
            }
        );
        assert_eq!(
            p(
                r#"{"type":"error","event_id":"e9","error":{"type":"invalid_request_error","code":"session_expired","message":"gone","param":null,"event_id":"c7"}}"#
            ),
            ServerEvent::Error(ApiError {
                kind: "invalid_request_error".into(),
                code: Some("session_expired".into()),
                message: "gone".into(),
                param: None,
                event_id: Some("c7".into())
            })
        );
        assert_eq!(
            p(
                r#"{"type":"rate_limits.updated","rate_limits":[{"name":"tokens","limit":100,"remaining":40,"reset_seconds":1.5}]}"#
            ),
            ServerEvent::RateLimitsUpdated {
                rate_limits: vec![RateLimit {
                    name: "tokens".into(),
                    limit: Some(100),
                    remaining: Some(40),
                    reset_seconds: Some(1.5)
                }]
            }
        );
        assert_eq!(
            p(r#"{"type":"response.output_audio_transcript.delta","delta":"Hi"}"#),
            ServerEvent::Unknown {
                kind: "response.output_audio_transcript.delta".into()
            }
        );
    }

    #[test]
    fn malformed_frames_are_errors_and_odd_fields_are_tolerated() {
        assert!(matches!(
            parse_server_event("{not json"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_server_event(r#"{"event_id":"x"}"#),
            Err(ParseError::MissingType)
        ));
        assert!(matches!(
            parse_server_event(r#"{"type":42}"#),
            Err(ParseError::MissingType)
        ));
        assert!(matches!(
            parse_server_event(r#"[1,2]"#),
            Err(ParseError::MissingType)
        ));
        assert_eq!(
            parse_server_event(r#"{"type":"response.done"}"#).unwrap(),
            ServerEvent::ResponseDone {
                response_id: String::new(),
                status: String::new()
            }
        );
        assert_eq!(
            parse_server_event(
                r#"{"type":"session.created","session":{"id":7,"expires_at":1e300}}"#
            )
            .unwrap(),
            ServerEvent::SessionCreated {
                session_id: String::new(),
                expires_at: None
            }
        );
        assert_eq!(
            parse_server_event(r#"{"type":"rate_limits.updated","rate_limits":"lots"}"#).unwrap(),
            ServerEvent::RateLimitsUpdated {
                rate_limits: vec![]
            }
        );
    }

    #[test]
    fn elide_audio_replaces_base64_with_a_size() {
        let mut append: Value =
            serde_json::from_str(&ClientEvent::append(&[0i16; 2400]).to_json()).unwrap();
        elide_audio(&mut append);
        assert_eq!(
            append,
            json!({"type": "input_audio_buffer.append", "audio": "<audio 4800 bytes>"})
        );

        let mut delta =
            json!({"type": "response.output_audio.delta", "item_id": "i", "delta": "AQD+/wAB"});
        elide_audio(&mut delta);
        assert_eq!(delta["delta"], "<audio 6 bytes>");
        assert_eq!(delta["item_id"], "i");

        let mut padded = json!({"type": "response.output_audio.delta", "delta": "AAA="});
        elide_audio(&mut padded);
        assert_eq!(padded["delta"], "<audio 2 bytes>");

        let mut item = json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}, {"type": "input_text", "text": "AAAA"}]}});
        elide_audio(&mut item);
        assert_eq!(item["item"]["content"][0]["audio"], "<audio 3 bytes>");
        assert_eq!(item["item"]["content"][1]["text"], "AAAA");

        let mut other = json!({"type": "response.done", "delta": "AAAA"});
        elide_audio(&mut other);
        assert_eq!(other["delta"], "AAAA");
        let mut garbage = json!([1, 2]);
        elide_audio(&mut garbage);
        assert_eq!(garbage, json!([1, 2]));
    }
}
