//! Incremental parser for an agent's stdout (Claude Code `--output-format stream-json`, or
//! plain text from agents without it). Sans-IO: the task supervisor owns the pipe fd on the
//! main loop and feeds whatever bytes a read returned; this core owns no fd and no thread.
//!
//! It runs on the poll loop while up to ten agents flood output, so it must stay cheap:
//! lines are found with a word-at-a-time scan, complete lines inside one chunk are parsed
//! in place (no copy), JSON is read into small borrowed structs whose unknown fields are
//! skipped without allocating, and a line longer than [`MAX_LINE`] is counted and dropped
//! rather than buffered. Shapes change between CLI versions (claude-cli.md), so every field
//! but `type` is read leniently: a field of an unexpected JSON type reads as absent instead
//! of discarding the whole line.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::redact::Keep;

/// Longest stdout line kept; a longer line is dropped (reported as Truncated), never buffered.
pub const MAX_LINE: usize = 256 * 1024;

/// Capacity the line buffer may keep between lines; a huge line's allocation is given back.
const IDLE_CAPACITY: usize = 64 * 1024;
/// What [`StreamParser::plain_tail`] returns at most.
const PLAIN_TAIL: usize = 4 * 1024;
/// The tail buffer is trimmed only when it reaches twice the kept size, so a flood of short
/// plain lines costs about one byte moved per byte received instead of 4 KiB per line.
const PLAIN_TAIL_SLACK: usize = 2 * PLAIN_TAIL;
/// Longest [`StreamEvent::ToolUse`] detail, in characters.
const DETAIL_MAX: usize = 200;
/// Longest reason quoted from the agent's result text in a [`Verdict`], in characters.
const REASON_MAX: usize = 300;
/// A runaway agent editing thousands of files must not grow the registry without bound.
const MAX_FILES: usize = 1000;
/// Longest subtype, tool name or session state kept from a control or system line.
const SUBTYPE_MAX: usize = 60;
/// Permission suggestions kept per request (the CLI offers one or two).
const MAX_SUGGESTIONS: usize = 8;

/// The `result` line: how the agent itself says the run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultLine {
    pub is_error: bool,
    pub subtype: String,
    /// Final answer text; absent on e.g. `error_max_turns` and interruptions.
    pub text: Option<String>,
    pub num_turns: Option<u64>,
    pub total_cost_usd: Option<f64>,
    pub duration_ms: Option<u64>,
}

/// A `can_use_tool` control request (`--permission-prompt-tool stdio`): the agent waits until
/// a `control_response` with the same `request_id` answers it (CONTROL.md in the fixtures).
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionRequest {
    pub request_id: String,
    pub tool_name: String,
    /// The tool input as the agent sent it (`command` for Bash, `file_path` for Write, …);
    /// echoed back as `updatedInput` when allowed. NOT redacted.
    pub input: serde_json::Value,
    /// The `tool_use` block this request is about.
    pub tool_use_id: Option<String>,
    /// The CLI's own one-line description (Bash: the command's description; Write: the path).
    pub description: Option<String>,
    /// Why the CLI asks (e.g. "Path is outside allowed working directories").
    pub decision_reason: Option<String>,
    pub blocked_path: Option<String>,
    /// Rules the CLI offers for "always"; echoed back in `updatedPermissions`.
    pub suggestions: Vec<serde_json::Value>,
}

/// What one stdout line meant. Lines of no interest (system notices other than the first
/// session id and the session state, partial `stream_event`s, unknown types) yield nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// First time a session id is seen (normally the `system`/`init` line; with
    /// `--output-format json` the single result object).
    Session { session_id: String },
    /// An assistant `text` block of the main agent (sub-agent text is not the answer).
    Text(String),
    /// An assistant `tool_use` block. `detail` is short human text (Bash command, file path,
    /// search pattern, …), whitespace collapsed, ≤ 200 chars, NOT redacted.
    ToolUse {
        name: String,
        file_path: Option<String>,
        detail: String,
        /// The block's `id`, which the matching [`StreamEvent::ToolResult`] names.
        id: Option<String>,
    },
    /// A `tool_result` block in a `user` line: the tool use `tool_use_id` is over.
    ToolResult { tool_use_id: String, is_error: bool },
    /// One of our own user messages echoed back (`--replay-user-messages`, `isReplay:true`):
    /// the agent has taken in the message we sent with this `uuid`.
    UserReplay { uuid: String },
    /// The agent asks whether it may use a tool (boxed: the request carries JSON values).
    PermissionRequest(Box<PermissionRequest>),
    /// Any other `control_request` (or a `can_use_tool` too broken to ask about): the agent
    /// waits for an answer, so it must get one (an error response).
    ControlRequest { request_id: String, subtype: String },
    /// `control_cancel_request`: the agent withdrew its request `request_id`.
    ControlCancel { request_id: String },
    /// The agent's answer to one of our control requests (e.g. `interrupt`); `error` is
    /// set when it refused.
    ControlResponse {
        request_id: String,
        error: Option<String>,
    },
    /// `system`/`session_state_changed` (with `CLAUDE_CODE_EMIT_SESSION_STATE_EVENTS=1`):
    /// `running` or `idle`.
    SessionState { state: String },
    /// The `result` line.
    Result(ResultLine),
    /// A non-JSON line (agents without stream-json), without its line ending.
    Plain(String),
    /// A line longer than [`MAX_LINE`] was dropped; `len` is its length in bytes.
    Truncated { len: usize },
    /// JSON, but not an object with a string `type`.
    Malformed { reason: String },
}

/// Turns stdout bytes, in chunks of any size, into [`StreamEvent`]s and keeps what the task
/// engine needs at the end: session id, files changed, result, last text, plain tail.
#[derive(Debug, Default)]
pub struct StreamParser {
    /// The incomplete last line (never longer than [`MAX_LINE`]).
    line: Vec<u8>,
    /// `Some(n)`: inside an over-long line, `n` bytes of it seen and dropped so far.
    discarding: Option<usize>,
    session_id: Option<String>,
    files_changed: Vec<String>,
    result: Option<ResultLine>,
    last_text: Option<String>,
    /// Plain lines joined by '\n'; may hold up to [`PLAIN_TAIL_SLACK`] bytes.
    plain: String,
    saw_json: bool,
}

impl StreamParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes` (any chunking, including inside a UTF-8 sequence); appends the events
    /// of every line completed by them to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamEvent>) {
        let mut rest = bytes;
        while let Some(newline) = find_newline(rest) {
            let piece = &rest[..newline];
            rest = &rest[newline + 1..];
            if let Some(dropped) = self.discarding.take() {
                out.push(StreamEvent::Truncated {
                    len: dropped + piece.len(),
                });
            } else if self.line.is_empty() {
                // The common case: the whole line is inside this chunk, parse it in place.
                if piece.len() > MAX_LINE {
                    out.push(StreamEvent::Truncated { len: piece.len() });
                } else {
                    self.handle_line(piece, out);
                }
            } else if self.line.len() + piece.len() > MAX_LINE {
                out.push(StreamEvent::Truncated {
                    len: self.line.len() + piece.len(),
                });
                self.release_line();
            } else {
                self.line.extend_from_slice(piece);
                let line = std::mem::take(&mut self.line);
                self.handle_line(&line, out);
                self.line = line;
                self.release_line();
            }
        }
        if rest.is_empty() {
            return;
        }
        if let Some(dropped) = self.discarding.as_mut() {
            *dropped += rest.len();
        } else if self.line.len() + rest.len() > MAX_LINE {
            self.discarding = Some(self.line.len() + rest.len());
            self.release_line();
        } else {
            let needed = self.line.len() + rest.len();
            if needed > self.line.capacity() {
                // Grow by doubling like Vec would, but never past MAX_LINE: a line that
                // would need more is dropped anyway.
                let target = needed.max(self.line.capacity() * 2).min(MAX_LINE);
                self.line.reserve_exact(target - self.line.len());
            }
            self.line.extend_from_slice(rest);
        }
    }

    /// End of stdout: a last line without '\n' still counts.
    pub fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        if let Some(dropped) = self.discarding.take() {
            out.push(StreamEvent::Truncated { len: dropped });
        } else if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.handle_line(&line, out);
            self.line = line;
        }
        self.release_line();
    }

    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// Paths the agent asked Write/Edit/MultiEdit/NotebookEdit to change (a denied or failed
    /// edit still counts), deduplicated, in first-seen order, at most 1000.
    pub fn files_changed(&self) -> &[String] {
        &self.files_changed
    }

    /// The last `result` line (with `--input-format stream-json` there is one per turn).
    pub fn result(&self) -> Option<&ResultLine> {
        self.result.as_ref()
    }

    /// The main agent's last assistant text block (summary fallback when there is no result
    /// text).
    pub fn last_text(&self) -> Option<&str> {
        self.last_text.as_deref()
    }

    /// The last ≤ 4 KiB of plain (non-JSON) lines joined by '\n': the summary of agents
    /// without stream-json.
    pub fn plain_tail(&self) -> &str {
        let mut start = self.plain.len().saturating_sub(PLAIN_TAIL);
        while !self.plain.is_char_boundary(start) {
            start += 1;
        }
        &self.plain[start..]
    }

    /// At least one stream-json event (an object with a string `type`) was seen: the agent
    /// speaks stream-json, so a missing result line means it did not finish.
    pub fn saw_json(&self) -> bool {
        self.saw_json
    }

    /// Empties the line buffer and gives back what a huge line made it grow to.
    fn release_line(&mut self) {
        self.line.clear();
        if self.line.capacity() > IDLE_CAPACITY {
            self.line.shrink_to(IDLE_CAPACITY);
        }
    }

    fn handle_line(&mut self, line: &[u8], out: &mut Vec<StreamEvent>) {
        let mut end = line.len();
        while end > 0 && line[end - 1] == b'\r' {
            end -= 1;
        }
        // from_utf8's check is several times faster than from_utf8_lossy's on valid text,
        // which nearly every line is: this runs over everything an agent prints.
        let text = match std::str::from_utf8(&line[..end]) {
            Ok(text) => std::borrow::Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(&line[..end]),
        };
        let body = text.trim_start_matches([' ', '\t']);
        match body.as_bytes().first() {
            None => {}
            Some(b'{') => match serde_json::from_str::<RawLine>(body) {
                Ok(raw) => self.handle_json(raw, body, out),
                // Valid JSON up to a value of the wrong shape (`{}`, `{"type":5}`).
                Err(error) if error.is_data() => out.push(StreamEvent::Malformed {
                    reason: error.to_string(),
                }),
                // Not JSON at all (or cut short): an agent printing text that starts with '{'.
                Err(_) => self.handle_plain(&text, out),
            },
            Some(b'[') if serde_json::from_str::<IgnoredAny>(body).is_ok() => {
                out.push(StreamEvent::Malformed {
                    reason: "a JSON array, not an object".to_owned(),
                });
            }
            Some(_) => self.handle_plain(&text, out),
        }
    }

    fn handle_plain(&mut self, text: &str, out: &mut Vec<StreamEvent>) {
        if text.trim().is_empty() {
            return;
        }
        if !self.plain.is_empty() {
            self.plain.push('\n');
        }
        let mut start = text.len().saturating_sub(PLAIN_TAIL);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        self.plain.push_str(&text[start..]);
        if self.plain.len() > PLAIN_TAIL_SLACK {
            let mut cut = self.plain.len() - PLAIN_TAIL;
            while !self.plain.is_char_boundary(cut) {
                cut += 1;
            }
            self.plain.drain(..cut);
        }
        out.push(StreamEvent::Plain(text.to_owned()));
    }

    /// `body` is the line's text, for the rare control lines read in full.
    fn handle_json(&mut self, raw: RawLine<'_>, body: &str, out: &mut Vec<StreamEvent>) {
        self.saw_json = true;
        if self.session_id.is_none()
            && let Some(id) = raw.session_id.as_str().filter(|id| !id.is_empty())
        {
            self.session_id = Some(id.to_owned());
            out.push(StreamEvent::Session {
                session_id: id.to_owned(),
            });
        }
        match &*raw.kind {
            "assistant" => {
                let is_subagent = raw.parent_tool_use_id.as_str().is_some();
                let Some(message) = raw.message.0 else { return };
                for block in message.content.0.into_iter().filter_map(|b| b.0) {
                    match block.kind.as_str() {
                        Some("text") if !is_subagent => {
                            if let Some(text) = block.text.as_str().filter(|t| !t.trim().is_empty())
                            {
                                // Reuse the previous text's allocation.
                                let last = self.last_text.get_or_insert_with(String::new);
                                last.clear();
                                last.push_str(text);
                                out.push(StreamEvent::Text(text.to_owned()));
                            }
                        }
                        Some("tool_use") => self.handle_tool_use(block, out),
                        _ => {}
                    }
                }
            }
            "user" => {
                if raw.is_replay.as_bool() == Some(true) {
                    if let Some(uuid) = raw.uuid.as_str().filter(|u| !u.is_empty()) {
                        out.push(StreamEvent::UserReplay {
                            uuid: uuid.to_owned(),
                        });
                    }
                    return;
                }
                let Some(message) = raw.message.0 else { return };
                for block in message.content.0.into_iter().filter_map(|b| b.0) {
                    if block.kind.as_str() == Some("tool_result")
                        && let Some(id) = block.tool_use_id.as_str().filter(|id| !id.is_empty())
                    {
                        out.push(StreamEvent::ToolResult {
                            tool_use_id: id.to_owned(),
                            // The Write fixture's result has no is_error at all: a success.
                            is_error: block.is_error.as_bool().unwrap_or(false),
                        });
                    }
                }
            }
            "system" => {
                if raw.subtype.as_str() == Some("session_state_changed")
                    && let Some(state) = raw.state.as_str().filter(|s| !s.is_empty())
                {
                    out.push(StreamEvent::SessionState {
                        state: shorten(state, SUBTYPE_MAX),
                    });
                }
            }
            "control_request" | "control_cancel_request" | "control_response" => {
                handle_control(&raw.kind, body, out);
            }
            "result" => {
                let subtype = raw.subtype.as_str().unwrap_or_default().to_owned();
                let result = ResultLine {
                    // Every CLI version seen sets is_error; without it only "success" is not
                    // an error.
                    is_error: raw.is_error.as_bool().unwrap_or(subtype != "success"),
                    text: raw.result.as_str().map(str::to_owned),
                    num_turns: raw.num_turns.as_u64(),
                    total_cost_usd: raw.total_cost_usd.as_f64(),
                    duration_ms: raw.duration_ms.as_u64(),
                    subtype,
                };
                self.result = Some(result.clone());
                out.push(StreamEvent::Result(result));
            }
            _ => {}
        }
    }

    fn handle_tool_use(&mut self, block: RawBlock<'_>, out: &mut Vec<StreamEvent>) {
        let name = block.name.as_str().unwrap_or_default();
        let input = block.input.0.unwrap_or_default();
        let file_path = input
            .file_path
            .as_str()
            .or(input.notebook_path.as_str())
            .filter(|p| !p.is_empty());
        if let Some(path) = file_path
            && matches!(name, "Write" | "Edit" | "MultiEdit" | "NotebookEdit")
            && self.files_changed.len() < MAX_FILES
            && !self.files_changed.iter().any(|known| known == path)
        {
            self.files_changed.push(path.to_owned());
        }
        let detail = match name {
            "Grep" | "Glob" => match (input.pattern.as_str(), input.path.as_str()) {
                (Some(pattern), Some(path)) => format!("{pattern} in {path}"),
                (pattern, path) => pattern.or(path).unwrap_or_default().to_owned(),
            },
            _ => [
                &input.command,
                &input.file_path,
                &input.notebook_path,
                &input.url,
                &input.query,
                &input.pattern,
                &input.description,
                &input.path,
                &input.prompt,
            ]
            .into_iter()
            .find_map(|field| field.as_str())
            .unwrap_or_default()
            .to_owned(),
        };
        out.push(StreamEvent::ToolUse {
            name: name.to_owned(),
            file_path: file_path.map(str::to_owned),
            detail: detail_excerpt(&detail),
            id: block
                .id
                .as_str()
                .filter(|id| !id.is_empty())
                .map(str::to_owned),
        });
    }
}

/// The control protocol's lines (`--input-format stream-json`). They are rare (a few per
/// turn at most), so they are read into a `serde_json::Value` whole: the permission request's
/// `input` and `permission_suggestions` must be echoed back as they came.
fn handle_control(kind: &str, body: &str, out: &mut Vec<StreamEvent>) {
    use serde_json::Value;
    let value: Value = match serde_json::from_str(body) {
        Ok(value) => value,
        Err(error) => {
            out.push(StreamEvent::Malformed {
                reason: error.to_string(),
            });
            return;
        }
    };
    let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let missing_id = |what: &str| StreamEvent::Malformed {
        reason: format!("a {what} without a request_id"),
    };
    match kind {
        "control_request" => {
            let Some(request_id) = text(&value["request_id"]) else {
                out.push(missing_id(kind));
                return;
            };
            let request = &value["request"];
            let subtype = shorten(request["subtype"].as_str().unwrap_or_default(), SUBTYPE_MAX);
            match text(&request["tool_name"]) {
                Some(tool_name) if subtype == "can_use_tool" => {
                    let suggestions = request["permission_suggestions"]
                        .as_array()
                        .map(|all| all.iter().take(MAX_SUGGESTIONS).cloned().collect())
                        .unwrap_or_default();
                    out.push(StreamEvent::PermissionRequest(Box::new(
                        PermissionRequest {
                            request_id,
                            tool_name: shorten(&tool_name, SUBTYPE_MAX),
                            input: request["input"].clone(),
                            tool_use_id: text(&request["tool_use_id"]),
                            description: text(&request["description"]),
                            decision_reason: text(&request["decision_reason"]),
                            blocked_path: text(&request["blocked_path"]),
                            suggestions,
                        },
                    )));
                }
                // Without a tool name there is nothing to ask the user: it is answered with
                // an error like any request walkie does not handle.
                _ => out.push(StreamEvent::ControlRequest {
                    request_id,
                    subtype,
                }),
            }
        }
        "control_cancel_request" => match text(&value["request_id"]) {
            Some(request_id) => out.push(StreamEvent::ControlCancel { request_id }),
            None => out.push(missing_id(kind)),
        },
        _ => {
            let response = &value["response"];
            let Some(request_id) = text(&response["request_id"]) else {
                out.push(missing_id(kind));
                return;
            };
            let error = match response["subtype"].as_str() {
                Some("success") => None,
                _ => Some(shorten(
                    response["error"]
                        .as_str()
                        .unwrap_or("the agent refused the request"),
                    REASON_MAX,
                )),
            };
            out.push(StreamEvent::ControlResponse { request_id, error });
        }
    }
}

/// Index of the first '\n', eight bytes at a time (the classic "has zero byte" trick on
/// `word ^ 0x0a0a…`); the loop parses 50 MB/s of agent output, so a byte-wise scan shows.
fn find_newline(haystack: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const NEWLINES: u64 = u64::from_le_bytes([b'\n'; 8]);
    let mut chunks = haystack.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ NEWLINES;
        // Borrows only propagate upwards, so the lowest flagged byte is a real match.
        let found = x.wrapping_sub(ONES) & !x & HIGHS;
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| offset + i)
}

/// Whitespace collapsed to single spaces, cut to `max` chars with "…".
/// A tool's detail as it is kept: redacted before it is cut, so a key across the cut is
/// never shown in part. Only the start of the text is read (a heredoc may be megabytes, and
/// this runs on the loop): a window four times the kept length, so a key that reaches the
/// cut is whole inside it.
fn detail_excerpt(detail: &str) -> String {
    let window = match detail.char_indices().nth(4 * DETAIL_MAX) {
        Some((at, _)) => &detail[..at],
        None => detail,
    };
    shorten(&super::redact::redact(window), DETAIL_MAX)
}

pub(crate) fn shorten(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut chars = 0;
    for word in text.split_whitespace() {
        let word_chars = word.chars().count();
        let space = usize::from(chars > 0);
        if chars + space + word_chars > max {
            if chars + space < max {
                if space == 1 {
                    out.push(' ');
                    chars += 1;
                }
                out.extend(word.chars().take(max - 1 - chars));
            } else {
                // Make room for the ellipsis within `max`.
                while chars >= max {
                    out.pop();
                    chars -= 1;
                }
            }
            out.push('…');
            return out;
        }
        if space == 1 {
            out.push(' ');
        }
        out.push_str(word);
        chars += space + word_chars;
    }
    out
}

/// How a process ended, as `waitpid` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
}

/// The outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    Failed { reason: String },
    Interrupted { reason: String },
}

/// What an agent's stdout is meant to be, from how it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `--output-format stream-json` (or `json`): a run that finishes ends with a `result`
    /// line, so without one the run did not finish, whatever the exit status says.
    StreamJson,
    /// Plain text (agents without stream-json): the exit status decides.
    Plain,
}

impl OutputKind {
    /// From the agent's argv: the Claude CLI's `--output-format stream-json|json` (as two
    /// arguments or one with '=').
    pub fn of_command(argv: &[String]) -> OutputKind {
        let json = |format: &str| matches!(format, "stream-json" | "json");
        let given =
            argv.iter()
                .enumerate()
                .any(|(i, arg)| match arg.strip_prefix("--output-format") {
                    Some("") => argv.get(i + 1).is_some_and(|next| json(next)),
                    Some(rest) => rest.strip_prefix('=').is_some_and(json),
                    None => false,
                });
        if given {
            OutputKind::StreamJson
        } else {
            OutputKind::Plain
        }
    }
}

/// Decides the outcome from the parsed stream and the exit status (claude-cli.md "Outcomes").
///
/// Success comes from `is_error` and the exit status, never from `subtype` alone: the CLI
/// reports API errors as `subtype:"success"` with `is_error:true`. A stream-json agent that
/// ends without a parsable `result` line failed ("no result from the agent"), even with exit
/// status 0: it may have printed anything. Reasons quote the agent's result text, redacted
/// and shortened.
pub fn verdict(parser: &StreamParser, exit: ExitInfo, kind: OutputKind) -> Verdict {
    // SIGINT makes the CLI write an error_during_execution result and exit 0; SIGTERM makes
    // it exit 143 without a result; a shell wrapper reports Ctrl-C as 130.
    let stopped = matches!(exit, ExitInfo::Signal(_) | ExitInfo::Code(130 | 143));
    match parser.result() {
        Some(result) if !result.is_error => match exit {
            ExitInfo::Code(0) => Verdict::Succeeded,
            _ if stopped => Verdict::Interrupted {
                reason: format!("{} after the agent reported success", describe_exit(exit)),
            },
            _ => Verdict::Failed {
                reason: format!("the agent reported success but {}", describe_exit(exit)),
            },
        },
        Some(result)
            if result.subtype == "error_during_execution"
                && (exit == ExitInfo::Code(0) || stopped) =>
        {
            Verdict::Interrupted {
                reason: format!("the agent was interrupted ({})", describe_exit(exit)),
            }
        }
        Some(result) => {
            let what = match result.text.as_deref().map(str::trim) {
                Some(text) if !text.is_empty() => {
                    let excerpt = super::redact::excerpt(text, REASON_MAX, Keep::Head);
                    excerpt.split_whitespace().collect::<Vec<_>>().join(" ")
                }
                _ => describe_subtype(&result.subtype),
            };
            Verdict::Failed {
                reason: format!("{what} ({})", describe_exit(exit)),
            }
        }
        None if stopped => Verdict::Interrupted {
            reason: format!("stopped without a result ({})", describe_exit(exit)),
        },
        None if kind == OutputKind::StreamJson => Verdict::Failed {
            reason: format!("no result from the agent (it {})", describe_exit(exit)),
        },
        None if !parser.saw_json() => match exit {
            ExitInfo::Code(0) => Verdict::Succeeded,
            _ => Verdict::Failed {
                reason: format!("the agent {}", describe_exit(exit)),
            },
        },
        None => Verdict::Failed {
            reason: format!("the agent {} without a result", describe_exit(exit)),
        },
    }
}

fn describe_subtype(subtype: &str) -> String {
    match subtype {
        "error_max_turns" => "the agent hit its turn limit".to_owned(),
        "error_max_budget_usd" => "the agent hit its budget limit".to_owned(),
        "error_during_execution" => "the agent stopped with an error during execution".to_owned(),
        "" | "success" => "the agent reported an error".to_owned(),
        other => format!("the agent failed ({})", shorten(other, 60)),
    }
}

fn describe_exit(exit: ExitInfo) -> String {
    match exit {
        ExitInfo::Code(code) => format!("exited with code {code}"),
        ExitInfo::Signal(number) => match nix::sys::signal::Signal::try_from(number) {
            Ok(signal) => format!("was killed by {}", signal.as_str()),
            Err(_) => format!("was killed by signal {number}"),
        },
    }
}

/// How one turn of an agent kept open on stdin ended, from its `result` line alone: the
/// process goes on, so there is no exit status to weigh (CONTROL.md: a turn ends at its
/// `result`, not at exit; the exit status follows the *last* turn). An interrupted turn
/// (`error_during_execution`, after walkie's `interrupt`) keeps its session for the next
/// message.
pub fn turn_verdict(result: &ResultLine) -> Verdict {
    if !result.is_error {
        return Verdict::Succeeded;
    }
    if result.subtype == "error_during_execution" {
        return Verdict::Interrupted {
            reason: "its turn was interrupted; the agent waits for a follow-up".to_owned(),
        };
    }
    Verdict::Failed {
        reason: match result.text.as_deref().map(str::trim) {
            // Redacted before it is cut, as in `verdict`.
            Some(text) if !text.is_empty() => super::redact::excerpt(text, REASON_MAX, Keep::Head)
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            _ => describe_subtype(&result.subtype),
        },
    }
}

/// An agent kept open on stdin that ended in the middle of a turn, after earlier turns (so
/// the stream's last `result` is an earlier turn's and says nothing about this one).
pub fn verdict_mid_turn(exit: ExitInfo) -> Verdict {
    if matches!(exit, ExitInfo::Signal(_) | ExitInfo::Code(130 | 143)) {
        Verdict::Interrupted {
            reason: format!("stopped in the middle of a turn ({})", describe_exit(exit)),
        }
    } else {
        Verdict::Failed {
            reason: format!("the agent {} in the middle of a turn", describe_exit(exit)),
        }
    }
}

// ---- Borrowed, lenient views of the stream-json lines -------------------------------------

/// One stdout line. Only `type` is strict: without a string `type` the line is Malformed.
#[derive(Deserialize)]
struct RawLine<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    subtype: Scalar<'a>,
    #[serde(default, borrow)]
    session_id: Scalar<'a>,
    #[serde(default, borrow)]
    parent_tool_use_id: Scalar<'a>,
    /// An object on assistant/user lines, a string on some system lines.
    #[serde(default, borrow)]
    message: Lenient<RawMessage<'a>>,
    #[serde(default, borrow)]
    is_error: Scalar<'a>,
    #[serde(default, borrow)]
    result: Scalar<'a>,
    #[serde(default, borrow)]
    num_turns: Scalar<'a>,
    #[serde(default, borrow)]
    total_cost_usd: Scalar<'a>,
    #[serde(default, borrow)]
    duration_ms: Scalar<'a>,
    #[serde(default, borrow)]
    uuid: Scalar<'a>,
    /// `true` on a user message echoed back by `--replay-user-messages`.
    #[serde(rename = "isReplay", default, borrow)]
    is_replay: Scalar<'a>,
    /// `system`/`session_state_changed`: `running` or `idle`.
    #[serde(default, borrow)]
    state: Scalar<'a>,
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    /// An array of blocks from the model; a plain string is allowed in user messages.
    #[serde(default, borrow)]
    content: LenientSeq<Lenient<RawBlock<'a>>>,
}

#[derive(Deserialize)]
struct RawBlock<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Scalar<'a>,
    #[serde(default, borrow)]
    text: Scalar<'a>,
    #[serde(default, borrow)]
    name: Scalar<'a>,
    #[serde(default, borrow)]
    input: Lenient<ToolInput<'a>>,
    /// A `tool_use` block's id.
    #[serde(default, borrow)]
    id: Scalar<'a>,
    /// A `tool_result` block's fields.
    #[serde(default, borrow)]
    tool_use_id: Scalar<'a>,
    #[serde(default, borrow)]
    is_error: Scalar<'a>,
}

/// The tool input fields worth a short description; `content`, `old_string` and the like
/// (whole files) are skipped unread.
#[derive(Deserialize, Default)]
struct ToolInput<'a> {
    #[serde(default, borrow)]
    command: Scalar<'a>,
    #[serde(default, borrow)]
    file_path: Scalar<'a>,
    #[serde(default, borrow)]
    notebook_path: Scalar<'a>,
    #[serde(default, borrow)]
    pattern: Scalar<'a>,
    #[serde(default, borrow)]
    path: Scalar<'a>,
    #[serde(default, borrow)]
    url: Scalar<'a>,
    #[serde(default, borrow)]
    query: Scalar<'a>,
    #[serde(default, borrow)]
    description: Scalar<'a>,
    #[serde(default, borrow)]
    prompt: Scalar<'a>,
}

/// Any JSON value, keeping only scalars; arrays and objects are skipped without allocating.
#[derive(Default)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    #[default]
    Other,
}

impl Scalar<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match *self {
            Scalar::Unsigned(n) => Some(n),
            Scalar::Signed(n) => u64::try_from(n).ok(),
            // Rounding is intended: a count or a duration sent as 12.0 is still 12.
            Scalar::Float(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                Some(f.round() as u64)
            }
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match *self {
            Scalar::Unsigned(n) => Some(n as f64),
            Scalar::Signed(n) => Some(n as f64),
            Scalar::Float(f) => Some(f),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for ScalarVisitor<'a> {
            type Value = Scalar<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Scalar::Unsigned(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Signed(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Scalar::Float(v))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Scalar::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Scalar::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| Scalar::Other)
            }
        }
        deserializer.deserialize_any(ScalarVisitor(PhantomData))
    }
}

/// An object read as `T`; any other JSON value reads as `None`.
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for LenientVisitor<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Lenient(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Lenient(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Lenient(None))
            }
        }
        deserializer.deserialize_any(LenientVisitor(PhantomData))
    }
}

/// An array of `T`; any other JSON value reads as empty.
struct LenientSeq<T>(Vec<T>);

impl<T> Default for LenientSeq<T> {
    fn default() -> Self {
        LenientSeq(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LenientSeq<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SeqVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
            type Value = LenientSeq<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(LenientSeq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| LenientSeq(Vec::new()))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(LenientSeq(Vec::new()))
            }
        }
        deserializer.deserialize_any(SeqVisitor(PhantomData))
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The real CLI captures: `$WALKIE_FIXTURES`, else the crate's own copy.
    fn fixture_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("WALKIE_FIXTURES") {
            return PathBuf::from(dir);
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-cli");
        assert!(
            dir.join("write/stdout.jsonl").is_file(),
            "Claude CLI fixtures not found in {}; set WALKIE_FIXTURES",
            dir.display()
        );
        dir
    }

    fn read_fixture(case: &str, file: &str) -> Vec<u8> {
        let path = fixture_dir().join(case).join(file);
        std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
    }

    fn fixture_rc(case: &str, file: &str) -> i32 {
        let text = String::from_utf8(read_fixture(case, file)).unwrap();
        text.trim().parse().unwrap()
    }

    fn parse_all(bytes: &[u8]) -> (StreamParser, Vec<StreamEvent>) {
        let mut parser = StreamParser::new();
        let mut events = Vec::new();
        parser.feed(bytes, &mut events);
        parser.finish(&mut events);
        (parser, events)
    }

    fn parse_fixture(case: &str) -> (StreamParser, Vec<StreamEvent>, Verdict) {
        let (parser, events) = parse_all(&read_fixture(case, "stdout.jsonl"));
        let exit = exit_from_rc(fixture_rc(case, "rc"));
        let verdict = verdict(&parser, exit, OutputKind::StreamJson);
        (parser, events, verdict)
    }

    /// The fixtures record the exit status the way a shell does: 128+N for signal N.
    fn exit_from_rc(rc: i32) -> ExitInfo {
        ExitInfo::Code(rc)
    }

    fn no_malformed(events: &[StreamEvent]) {
        for event in events {
            assert!(
                !matches!(
                    event,
                    StreamEvent::Malformed { .. }
                        | StreamEvent::Plain(_)
                        | StreamEvent::Truncated { .. }
                ),
                "unexpected {event:?}"
            );
        }
    }

    fn tool_uses(events: &[StreamEvent]) -> Vec<(&str, Option<&str>, &str)> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ToolUse {
                    name,
                    file_path,
                    detail,
                    ..
                } => Some((name.as_str(), file_path.as_deref(), detail.as_str())),
                _ => None,
            })
            .collect()
    }

    fn texts(events: &[StreamEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fixture_write() {
        let (parser, events, verdict) = parse_fixture("write");
        no_malformed(&events);
        assert_eq!(
            events[0],
            StreamEvent::Session {
                session_id: "f4826bb7-24a5-4065-adcd-ad734458e3a5".into()
            }
        );
        assert_eq!(
            parser.session_id(),
            Some("f4826bb7-24a5-4065-adcd-ad734458e3a5")
        );
        assert_eq!(parser.files_changed(), ["/home/user/project/hello.txt"]);
        assert_eq!(
            tool_uses(&events),
            [(
                "Write",
                Some("/home/user/project/hello.txt"),
                "/home/user/project/hello.txt"
            )]
        );
        assert_eq!(
            texts(&events),
            ["I'll create the file.", "Created hello.txt."]
        );
        assert_eq!(parser.last_text(), Some("Created hello.txt."));
        let result = parser.result().unwrap();
        assert_eq!(
            *result,
            ResultLine {
                is_error: false,
                subtype: "success".into(),
                text: Some("Created hello.txt.".into()),
                num_turns: Some(2),
                total_cost_usd: Some(0.00214),
                duration_ms: Some(204),
            }
        );
        assert!(matches!(events.last(), Some(StreamEvent::Result(r)) if r == result));
        assert!(parser.saw_json());
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_edit() {
        let (parser, events, verdict) = parse_fixture("edit");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("7ad0ec48-51d4-4ffb-8f81-4278e8d785ac")
        );
        // Written then edited: listed once.
        assert_eq!(parser.files_changed(), ["/home/user/project/hello.txt"]);
        let names: Vec<_> = tool_uses(&events).iter().map(|t| t.0).collect();
        assert_eq!(names, ["Write", "Edit"]);
        assert_eq!(
            parser.result().unwrap().text.as_deref(),
            Some("Wrote and edited hello.txt.")
        );
        assert_eq!(parser.result().unwrap().num_turns, Some(3));
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_bash() {
        let (parser, events, verdict) = parse_fixture("bash");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("b6c41c78-de8d-464a-82d5-1c5569d70aae")
        );
        assert!(parser.files_changed().is_empty());
        assert_eq!(
            tool_uses(&events),
            [("Bash", None, "echo hi from bash > bash.txt && cat bash.txt")]
        );
        assert_eq!(parser.last_text(), Some("Ran the command."));
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_bash_denied_still_succeeds() {
        let (parser, events, verdict) = parse_fixture("bash-denied");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("27e8877d-cf20-411d-82d7-4d96fb5261e4")
        );
        assert!(parser.files_changed().is_empty());
        assert_eq!(tool_uses(&events).len(), 1);
        assert!(!parser.result().unwrap().is_error);
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_api_errors_fail_despite_success_subtype() {
        for (case, needle) in [("error401", "401"), ("error500", "500")] {
            let (parser, events, verdict) = parse_fixture(case);
            no_malformed(&events);
            assert!(parser.session_id().is_some(), "{case}");
            let result = parser.result().unwrap();
            assert_eq!(result.subtype, "success", "{case}");
            assert!(result.is_error, "{case}");
            assert_eq!(result.total_cost_usd, Some(0.0), "{case}");
            let Verdict::Failed { reason } = verdict else {
                panic!("{case}: {verdict:?}")
            };
            assert!(reason.contains(needle), "{case}: {reason}");
            assert!(reason.contains("exited with code 1"), "{case}: {reason}");
        }
    }

    #[test]
    fn fixture_max_turns_fails_with_turn_limit() {
        let (parser, events, verdict) = parse_fixture("maxturns");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("d16da23d-2879-49aa-8281-284089eb9fe1")
        );
        let result = parser.result().unwrap();
        assert_eq!(result.subtype, "error_max_turns");
        assert_eq!(result.text, None);
        assert_eq!(result.num_turns, Some(3));
        assert_eq!(tool_uses(&events).len(), 2);
        assert_eq!(
            verdict,
            Verdict::Failed {
                reason: "the agent hit its turn limit (exited with code 1)".into()
            }
        );
    }

    #[test]
    fn fixture_sigint_is_interrupted() {
        for case in ["sigint", "sigint-tool"] {
            let (parser, events, verdict) = parse_fixture(case);
            no_malformed(&events);
            assert!(parser.session_id().is_some(), "{case}");
            let result = parser.result().unwrap();
            assert_eq!(result.subtype, "error_during_execution");
            assert!(result.is_error);
            assert!(
                matches!(verdict, Verdict::Interrupted { .. }),
                "{case}: {verdict:?}"
            );
        }
        let (parser, _, _) = parse_fixture("sigint");
        assert_eq!(
            parser.last_text(),
            Some("chunk 0. chunk 1. chunk 2. chunk 3. chunk 4. chunk 5. ")
        );
    }

    #[test]
    fn fixture_sigterm_without_result_is_interrupted() {
        for case in ["sigterm", "sigterm-tool"] {
            let (parser, events, verdict) = parse_fixture(case);
            no_malformed(&events);
            assert!(parser.session_id().is_some(), "{case}");
            assert!(parser.result().is_none(), "{case}");
            assert!(parser.saw_json());
            assert!(
                matches!(verdict, Verdict::Interrupted { .. }),
                "{case}: {verdict:?}"
            );
        }
        let (parser, events, _) = parse_fixture("sigterm-tool");
        assert_eq!(tool_uses(&events)[0].0, "Bash");
        // The same stream ending with a plain failure exit is a failure, not an interruption.
        assert_eq!(
            verdict(&parser, ExitInfo::Code(1), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "no result from the agent (it exited with code 1)".into()
            }
        );
        assert!(matches!(
            verdict(&parser, ExitInfo::Signal(9), OutputKind::StreamJson),
            Verdict::Interrupted { reason } if reason.contains("SIGKILL")
        ));
    }

    #[test]
    fn fixture_resume_keeps_session() {
        let (first, _) = parse_all(&read_fixture("resume", "stdout.jsonl"));
        let (second, events) = parse_all(&read_fixture("resume", "stdout2.jsonl"));
        no_malformed(&events);
        assert_eq!(
            first.session_id(),
            Some("4ab45def-c09d-4136-b790-6a26df73e034")
        );
        assert_eq!(first.session_id(), second.session_id());
        // Cost is cumulative across a resumed session.
        assert_eq!(
            first.result().unwrap().total_cost_usd,
            Some(0.0007199999999999999)
        );
        assert_eq!(second.result().unwrap().total_cost_usd, Some(0.00144));
        let exit = exit_from_rc(fixture_rc("resume", "rc2"));
        assert_eq!(
            verdict(&second, exit, OutputKind::StreamJson),
            Verdict::Succeeded
        );
    }

    #[test]
    fn fixture_session_id_chosen_by_caller() {
        let (parser, events, verdict) = parse_fixture("session-id");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("11111111-2222-4333-8444-555555555555")
        );
        let sessions = events
            .iter()
            .filter(|e| matches!(e, StreamEvent::Session { .. }))
            .count();
        assert_eq!(sessions, 1, "a session id is announced once");
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_partial_messages_ignored() {
        let (parser, events, verdict) = parse_fixture("partial");
        no_malformed(&events);
        // stream_event deltas are not texts; the whole assistant message is.
        assert_eq!(texts(&events), ["Hello from the fake Anthropic server."]);
        assert_eq!(
            parser.session_id(),
            Some("04176e4c-962d-4d67-9213-ea7b9f2078a8")
        );
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_single_json_object_is_a_result() {
        let (parser, events, verdict) = parse_fixture("json");
        no_malformed(&events);
        assert_eq!(
            parser.session_id(),
            Some("8edd297e-c2c3-471b-969f-861f05ce01fe")
        );
        let result = parser.result().unwrap();
        assert_eq!(
            result.text.as_deref(),
            Some("Hello from the fake Anthropic server.")
        );
        assert!(!result.is_error);
        assert_eq!(events.len(), 2, "{events:?}"); // Session + Result
        assert_eq!(verdict, Verdict::Succeeded);
    }

    fn results(events: &[StreamEvent]) -> Vec<&ResultLine> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Result(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn permission_requests(events: &[StreamEvent]) -> Vec<&PermissionRequest> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::PermissionRequest(p) => Some(&**p),
                _ => None,
            })
            .collect()
    }

    fn tool_use_ids(events: &[StreamEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ToolUse { id, .. } => id.as_deref(),
                _ => None,
            })
            .collect()
    }

    fn tool_results(events: &[StreamEvent]) -> Vec<(&str, bool)> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ToolResult {
                    tool_use_id,
                    is_error,
                } => Some((tool_use_id.as_str(), *is_error)),
                _ => None,
            })
            .collect()
    }

    /// Events of the kept-open protocol only, in order, as short strings.
    fn control_events(events: &[StreamEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::PermissionRequest(p) => {
                    Some(format!("ask {} {}", p.tool_name, p.request_id))
                }
                StreamEvent::ControlRequest {
                    request_id,
                    subtype,
                } => Some(format!("request {subtype} {request_id}")),
                StreamEvent::ControlCancel { request_id } => Some(format!("cancel {request_id}")),
                StreamEvent::ControlResponse { request_id, error } => {
                    Some(format!("response {request_id} {error:?}"))
                }
                StreamEvent::UserReplay { uuid } => Some(format!("replay {uuid}")),
                StreamEvent::SessionState { state } => Some(format!("state {state}")),
                StreamEvent::Result(r) => Some(format!("result {}", r.subtype)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn fixture_perm_allow_bash() {
        let (_, events, verdict) = parse_fixture("perm-allow");
        no_malformed(&events);
        let asks = permission_requests(&events);
        assert_eq!(asks.len(), 1);
        let ask = asks[0];
        assert_eq!(ask.request_id, "ffcb3ab7-0c53-4cdb-b3d3-0746b71d1fa8");
        assert_eq!(ask.tool_name, "Bash");
        assert_eq!(
            ask.input["command"],
            "echo hi from bash > bash.txt && cat bash.txt"
        );
        assert_eq!(ask.description.as_deref(), Some("Write bash.txt"));
        assert_eq!(ask.blocked_path.as_deref(), Some("/home/user/cwd/bash.txt"));
        assert_eq!(ask.decision_reason, None);
        assert_eq!(ask.suggestions.len(), 2);
        assert_eq!(ask.suggestions[0]["type"], "addRules");
        // The request, the tool use and its result name the same tool_use id.
        let id = ask.tool_use_id.as_deref().unwrap();
        assert_eq!(tool_use_ids(&events), [id]);
        assert_eq!(tool_results(&events), [(id, false)]);
        assert_eq!(
            control_events(&events),
            [
                "ask Bash ffcb3ab7-0c53-4cdb-b3d3-0746b71d1fa8",
                "result success"
            ]
        );
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_perm_write_outside_the_cwd() {
        let (parser, events, _) = parse_fixture("perm-write-allow");
        no_malformed(&events);
        let ask = permission_requests(&events)[0];
        assert_eq!(ask.tool_name, "Write");
        assert_eq!(
            ask.input["file_path"],
            "/tmp/fake-outside-813a71cf/outside.txt"
        );
        assert_eq!(
            ask.decision_reason.as_deref(),
            Some("Path is outside allowed working directories")
        );
        assert_eq!(ask.blocked_path, None);
        assert_eq!(ask.suggestions[0]["type"], "addDirectories");
        // A Write's result carries no is_error: it succeeded.
        assert_eq!(
            tool_results(&events),
            [(ask.tool_use_id.as_deref().unwrap(), false)]
        );
        assert_eq!(
            parser.files_changed(),
            ["/tmp/fake-outside-813a71cf/outside.txt"]
        );
    }

    #[test]
    fn fixture_perm_deny_and_deny_interrupt() {
        let (_, events, _) = parse_fixture("perm-deny");
        no_malformed(&events);
        let id = permission_requests(&events)[0].tool_use_id.clone().unwrap();
        assert_eq!(tool_results(&events), [(id.as_str(), true)]);
        assert_eq!(results(&events)[0].subtype, "success");

        let (_, events, _) = parse_fixture("perm-deny-interrupt");
        no_malformed(&events);
        let id = permission_requests(&events)[0].tool_use_id.clone().unwrap();
        assert_eq!(tool_results(&events), [(id.as_str(), true)]);
        assert_eq!(results(&events)[0].subtype, "error_during_execution");
    }

    #[test]
    fn fixture_perm_unanswered_is_withdrawn_by_the_interrupt() {
        let (_, events, _) = parse_fixture("perm-unanswered");
        no_malformed(&events);
        assert_eq!(
            control_events(&events),
            [
                "ask Bash b0559178-2985-41da-8293-e9236042df3e",
                "cancel b0559178-2985-41da-8293-e9236042df3e",
                "response int-perm None",
                "result error_during_execution"
            ]
        );
        assert!(tool_results(&events)[0].1, "rejected");
    }

    #[test]
    fn fixture_interrupts_are_answered_and_the_process_stays() {
        let (parser, events, _) = parse_fixture("interrupt-tool");
        no_malformed(&events);
        assert_eq!(
            control_events(&events),
            [
                "response r1 None",
                "result error_during_execution",
                "result success"
            ]
        );
        // The interrupted Bash call ends with a rejected result; the next turn answers.
        let id = tool_use_ids(&events)[0];
        assert_eq!(tool_results(&events), [(id, true)]);
        assert_eq!(
            parser.result().unwrap().text.as_deref(),
            Some("Done sleeping.")
        );

        let (_, events, _) = parse_fixture("interrupt-stream");
        no_malformed(&events);
        assert_eq!(
            control_events(&events),
            [
                "response int-1 None",
                "result error_during_execution",
                "response int-idle None"
            ]
        );
        assert_eq!(
            results(&events)[0].text,
            None,
            "an interrupted turn has no result text"
        );
    }

    #[test]
    fn fixture_progress_replays_our_uuids_at_the_tool_boundary() {
        let (_, events, verdict) = parse_fixture("progress");
        no_malformed(&events);
        let first = "00000000-0000-4000-8000-000000000001";
        let second = "00000000-0000-4000-8000-000000000002";
        assert_eq!(
            control_events(&events),
            [
                "state running".to_owned(),
                format!("replay {first}"),
                format!("replay {second}"),
                "result success".to_owned(),
                "state idle".to_owned(),
            ]
        );
        // The steering message is taken in after the Bash step's result, not before.
        let at = |wanted: &dyn Fn(&StreamEvent) -> bool| events.iter().position(wanted).unwrap();
        let tool_result = at(&|e| matches!(e, StreamEvent::ToolResult { .. }));
        let replay = at(&|e| matches!(e, StreamEvent::UserReplay { uuid } if uuid == second));
        assert!(tool_result < replay);
        assert_eq!(tool_uses(&events)[0].0, "Bash");
        assert_eq!(verdict, Verdict::Succeeded);
    }

    #[test]
    fn fixture_steering_gives_one_or_two_results() {
        for (case, turns) in [("steer", 1), ("steer-now", 2), ("steer-queued-text", 2)] {
            let (_, events, verdict) = parse_fixture(case);
            no_malformed(&events);
            let results = results(&events);
            assert_eq!(results.len(), turns, "{case}");
            assert!(results.iter().all(|r| !r.is_error), "{case}");
            assert_eq!(verdict, Verdict::Succeeded, "{case}");
        }
        // "priority":"now" ends the running turn at the tool boundary with an empty result.
        let (_, events, _) = parse_fixture("steer-now");
        assert_eq!(results(&events)[0].text.as_deref(), Some(""));
        assert!(
            results(&events)[1]
                .text
                .as_deref()
                .unwrap()
                .contains("WALKIE_STOP")
        );
    }

    #[test]
    fn broken_control_lines() {
        let input = concat!(
            r#"{"type":"control_request","request":{"subtype":"can_use_tool","tool_name":"Bash"}}"#,
            "\n",
            r#"{"type":"control_request","request_id":"a","request":{"subtype":"can_use_tool"}}"#,
            "\n",
            r#"{"type":"control_request","request_id":"b","request":{"subtype":"hook_callback","callback_id":"x"}}"#,
            "\n",
            r#"{"type":"control_request","request_id":"c","request":"not an object"}"#,
            "\n",
            r#"{"type":"control_cancel_request"}"#,
            "\n",
            r#"{"type":"control_response","response":{"subtype":"error","request_id":"d","error":"no such request"}}"#,
            "\n",
            r#"{"type":"control_response","response":{"subtype":"odd","request_id":"e"}}"#,
            "\n",
            r#"{"type":"control_response","response":7}"#,
            "\n",
            r#"{"type":"control_request","request_id":"f","request":{"subtype":"can_use_tool","tool_name":"Bash","input":"rm","permission_suggestions":{"x":1}}}"#,
            "\n",
            r#"{"type":"user","isReplay":true,"message":{"role":"user","content":"hi"}}"#,
            "\n",
            r#"{"type":"user","message":{"content":[{"type":"tool_result","content":"x"},{"type":"tool_result","tool_use_id":"t1","is_error":"yes"}]}}"#,
            "\n",
            r#"{"type":"system","subtype":"session_state_changed","state":{"deep":1}}"#,
            "\n",
        );
        let (_, events) = parse_all(input.as_bytes());
        let malformed = |e: &StreamEvent| matches!(e, StreamEvent::Malformed { reason } if reason.contains("request_id"));
        assert!(malformed(&events[0]), "{:?}", events[0]);
        assert_eq!(
            events[1..3],
            [
                StreamEvent::ControlRequest {
                    request_id: "a".into(),
                    subtype: "can_use_tool".into()
                },
                StreamEvent::ControlRequest {
                    request_id: "b".into(),
                    subtype: "hook_callback".into()
                },
            ]
        );
        assert_eq!(
            events[3],
            StreamEvent::ControlRequest {
                request_id: "c".into(),
                subtype: String::new()
            }
        );
        assert!(malformed(&events[4]), "{:?}", events[4]);
        assert_eq!(
            events[5],
            StreamEvent::ControlResponse {
                request_id: "d".into(),
                error: Some("no such request".into())
            }
        );
        assert_eq!(
            events[6],
            StreamEvent::ControlResponse {
                request_id: "e".into(),
                error: Some("the agent refused the request".into())
            }
        );
        assert!(malformed(&events[7]), "{:?}", events[7]);
        let StreamEvent::PermissionRequest(odd) = &events[8] else {
            panic!("{:?}", events[8])
        };
        assert_eq!(odd.input, "rm");
        assert!(odd.suggestions.is_empty());
        // A replay without a uuid and a result without a tool_use_id name nothing.
        assert_eq!(
            events[9..],
            [StreamEvent::ToolResult {
                tool_use_id: "t1".into(),
                is_error: false
            }]
        );
    }

    #[test]
    fn every_chunking_gives_the_same_events() {
        // edit has multi-KB lines; a non-ASCII line adds UTF-8 sequences to split, and CRLF.
        let mut bytes = read_fixture("edit", "stdout.jsonl");
        bytes.extend_from_slice("héllo – wörld\r\n".as_bytes());
        let (_, expected) = parse_all(&bytes);
        assert!(expected.contains(&StreamEvent::Plain("héllo – wörld".into())));
        for split in 0..=bytes.len() {
            let mut parser = StreamParser::new();
            let mut events = Vec::new();
            parser.feed(&bytes[..split], &mut events);
            parser.feed(&bytes[split..], &mut events);
            parser.finish(&mut events);
            assert_eq!(events, expected, "split at {split}");
        }
        // And byte by byte.
        let mut parser = StreamParser::new();
        let mut events = Vec::new();
        for byte in &bytes {
            parser.feed(std::slice::from_ref(byte), &mut events);
        }
        parser.finish(&mut events);
        assert_eq!(events, expected);
        assert_eq!(parser.files_changed(), ["/home/user/project/hello.txt"]);
    }

    #[test]
    fn overlong_line_is_dropped_and_memory_released() {
        for chunk in [MAX_LINE + 10, 4096, 1000] {
            let mut parser = StreamParser::new();
            let mut events = Vec::new();
            let mut bytes = vec![b'x'; MAX_LINE + 1];
            bytes.push(b'\n');
            bytes.extend_from_slice(b"{\"type\":\"system\",\"session_id\":\"after\"}\n");
            let mut peak = 0;
            for piece in bytes.chunks(chunk) {
                parser.feed(piece, &mut events);
                peak = peak.max(parser.line.capacity());
            }
            parser.finish(&mut events);
            assert_eq!(
                events,
                [
                    StreamEvent::Truncated { len: MAX_LINE + 1 },
                    StreamEvent::Session {
                        session_id: "after".into()
                    }
                ],
                "chunk {chunk}"
            );
            assert!(peak <= MAX_LINE, "buffer grew to {peak}");
            assert!(parser.line.capacity() <= IDLE_CAPACITY);
            assert!(parser.plain_tail().is_empty());
        }
    }

    #[test]
    fn line_of_exactly_max_line_is_kept() {
        let mut bytes = vec![b'y'; MAX_LINE];
        bytes.push(b'\n');
        let (parser, events) = parse_all(&bytes);
        assert!(matches!(&events[..], [StreamEvent::Plain(t)] if t.len() == MAX_LINE));
        assert_eq!(parser.plain_tail().len(), PLAIN_TAIL);
    }

    #[test]
    fn overlong_last_line_without_newline() {
        let mut parser = StreamParser::new();
        let mut events = Vec::new();
        parser.feed(b"first\n", &mut events);
        for _ in 0..MAX_LINE / 1000 + 1 {
            parser.feed(&[b'z'; 1000], &mut events);
        }
        parser.finish(&mut events);
        let len = (MAX_LINE / 1000 + 1) * 1000;
        assert_eq!(
            events,
            [
                StreamEvent::Plain("first".into()),
                StreamEvent::Truncated { len }
            ]
        );
        assert!(parser.line.capacity() <= IDLE_CAPACITY);
    }

    #[test]
    fn malformed_lines() {
        let input = b"garbage here\n[]\n{}\n{\"type\":5}\n[1,2\n{\"type\":\"result\"\n";
        let (parser, events) = parse_all(input);
        assert_eq!(events.len(), 6, "{events:?}");
        assert_eq!(events[0], StreamEvent::Plain("garbage here".into()));
        assert!(
            matches!(&events[1], StreamEvent::Malformed { reason } if reason.contains("array"))
        );
        assert!(matches!(&events[2], StreamEvent::Malformed { reason } if reason.contains("type")));
        assert!(
            matches!(&events[3], StreamEvent::Malformed { reason } if reason.contains("integer"))
        );
        // Not JSON at all (cut short): plain text.
        assert_eq!(events[4], StreamEvent::Plain("[1,2".into()));
        assert_eq!(events[5], StreamEvent::Plain("{\"type\":\"result\"".into()));
        assert!(!parser.saw_json());
        assert!(parser.result().is_none());
    }

    #[test]
    fn unexpected_field_shapes_do_not_lose_the_line() {
        let input = concat!(
            r#"{"type":"system","subtype":"init","session_id":"s1","message":"a string here"}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":"just a string"}}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[7,"x",{"type":"text","text":["no"]},{"type":"text","text":"ok"}]}}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Write","input":{"file_path":{"odd":1},"content":"x"}}]}}"#,
            "\n",
            r#"{"type":"brand_new","whatever":{"deep":[1,{"a":null}]}}"#,
            "\n",
            r#"{"type":"result","is_error":"nope","subtype":"success","num_turns":2.0,"total_cost_usd":"1","result":"done"}"#,
            "\n",
        );
        let (parser, events) = parse_all(input.as_bytes());
        no_malformed(&events);
        assert_eq!(parser.session_id(), Some("s1"));
        assert_eq!(texts(&events), ["ok"]);
        assert_eq!(tool_uses(&events), [("Write", None, "")]);
        assert!(parser.files_changed().is_empty());
        let result = parser.result().unwrap();
        assert!(
            !result.is_error,
            "success subtype without a boolean is_error"
        );
        assert_eq!(result.num_turns, Some(2));
        assert_eq!(result.total_cost_usd, None);
        assert_eq!(result.text.as_deref(), Some("done"));
    }

    #[test]
    fn plain_text_agent() {
        let mut input = String::new();
        for i in 0..2000 {
            input.push_str(&format!("line {i} of output\n"));
        }
        input.push_str("\nAll done: 3 files changed"); // no final newline
        let (parser, events) = parse_all(input.as_bytes());
        assert_eq!(events.len(), 2001);
        assert_eq!(events[0], StreamEvent::Plain("line 0 of output".into()));
        assert!(!parser.saw_json());
        assert!(parser.session_id().is_none());
        let tail = parser.plain_tail();
        assert!(tail.len() <= PLAIN_TAIL);
        assert!(tail.len() > PLAIN_TAIL - 30);
        assert!(tail.ends_with("line 1999 of output\nAll done: 3 files changed"));
        assert!(parser.plain.len() <= PLAIN_TAIL_SLACK);
        assert_eq!(
            verdict(&parser, ExitInfo::Code(0), OutputKind::Plain),
            Verdict::Succeeded
        );
        assert_eq!(
            verdict(&parser, ExitInfo::Code(2), OutputKind::Plain),
            Verdict::Failed {
                reason: "the agent exited with code 2".into()
            }
        );
        // The same text from an agent started for stream-json is no result at all.
        assert_eq!(
            verdict(&parser, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "no result from the agent (it exited with code 0)".into()
            }
        );
    }

    #[test]
    fn plain_tail_cuts_at_a_char_boundary() {
        let line = "é".repeat(3000); // 6000 bytes
        let (parser, _) = parse_all(line.as_bytes());
        let tail = parser.plain_tail();
        assert!(tail.len() <= PLAIN_TAIL && tail.len() >= PLAIN_TAIL - 1);
        assert!(tail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn crlf_and_blank_lines_are_tolerated() {
        let input = b"{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s\"}\r\n\r\n   \n{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}}\r\nplain\r\n";
        let (parser, events) = parse_all(input);
        assert_eq!(
            events,
            [
                StreamEvent::Session {
                    session_id: "s".into()
                },
                StreamEvent::Text("hi".into()),
                StreamEvent::Plain("plain".into()),
            ]
        );
        assert_eq!(parser.plain_tail(), "plain");
    }

    #[test]
    fn invalid_utf8_is_lossy() {
        let mut input =
            b"{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"a"
                .to_vec();
        input.push(0xff);
        input.extend_from_slice(b"b\"}]}}\nbad \xc3 end\n");
        let (_, events) = parse_all(&input);
        assert_eq!(
            events,
            [
                StreamEvent::Text("a\u{fffd}b".into()),
                StreamEvent::Plain("bad \u{fffd} end".into())
            ]
        );
    }

    #[test]
    fn subagent_text_is_not_the_answer_but_its_edits_count() {
        let input = concat!(
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"main"}]},"parent_tool_use_id":null}"#,
            "\n",
            r#"{"type":"assistant","parent_tool_use_id":"toolu_1","message":{"content":[{"type":"text","text":"sub"},{"type":"tool_use","name":"NotebookEdit","input":{"notebook_path":"/n.ipynb"}}]}}"#,
            "\n",
        );
        let (parser, events) = parse_all(input.as_bytes());
        assert_eq!(texts(&events), ["main"]);
        assert_eq!(parser.last_text(), Some("main"));
        assert_eq!(parser.files_changed(), ["/n.ipynb"]);
    }

    #[test]
    fn files_changed_only_for_editing_tools() {
        let line = |name: &str, input: &str| {
            format!(
                r#"{{"type":"assistant","message":{{"content":[{{"type":"tool_use","name":"{name}","input":{input}}}]}}}}"#
            ) + "\n"
        };
        let input = [
            line("Read", r#"{"file_path":"/r"}"#),
            line("Write", r#"{"file_path":"/a"}"#),
            line("MultiEdit", r#"{"file_path":"/b","edits":[]}"#),
            line("Edit", r#"{"file_path":"/a"}"#),
            line("NotebookEdit", r#"{"notebook_path":"/c.ipynb"}"#),
            line("Grep", r#"{"pattern":"fn main","path":"src"}"#),
        ]
        .concat();
        let (parser, events) = parse_all(input.as_bytes());
        assert_eq!(parser.files_changed(), ["/a", "/b", "/c.ipynb"]);
        let uses = tool_uses(&events);
        assert_eq!(uses[0], ("Read", Some("/r"), "/r"));
        assert_eq!(uses[5], ("Grep", None, "fn main in src"));
    }

    #[test]
    fn tool_detail_is_short_single_line() {
        let command = format!("cat <<'EOF' > x\n{}\nEOF", "word ".repeat(100));
        let line = serde_json::json!({"type":"assistant","message":{"content":[
            {"type":"tool_use","name":"Bash","input":{"command": command}}]}});
        let (_, events) = parse_all(format!("{line}\n").as_bytes());
        let (_, _, detail) = tool_uses(&events)[0];
        assert_eq!(detail.chars().count(), DETAIL_MAX);
        assert!(detail.starts_with("cat <<'EOF' > x word word"));
        assert!(detail.ends_with('…'));
        assert!(!detail.contains('\n'));
    }

    #[test]
    fn a_key_across_the_tool_details_cut_is_redacted_not_shown_in_part() {
        let key = "sk-proj-CZ8hKYWHJPu05MC4jXq7Lw2Rt9VbN3mEa6Gd1Sf8Hk0Jp5Qz4Xc7Vb2Nm9Lk3Jh6Gf";
        // The key starts 6 to 40 characters before the cut at DETAIL_MAX.
        for starts_at in [DETAIL_MAX - 40, DETAIL_MAX - 20, DETAIL_MAX - 6] {
            let command = format!("{}{key} done", "a ".repeat(starts_at / 2));
            let line = serde_json::json!({"type":"assistant","message":{"content":[
                {"type":"tool_use","name":"Bash","input":{"command": command}}]}});
            let (_, events) = parse_all(format!("{line}\n").as_bytes());
            let (_, _, detail) = tool_uses(&events)[0];
            assert!(detail.chars().count() <= DETAIL_MAX, "{detail}");
            assert!(
                !detail.contains("sk-proj-CZ"),
                "a piece of the key: {detail}"
            );
            assert!(!detail.contains("CZ8hKYW"), "a piece of the key: {detail}");
        }
    }

    #[test]
    fn shorten_respects_the_limit() {
        assert_eq!(shorten("  a  b\tc ", 10), "a b c");
        assert_eq!(shorten("hello world", 8), "hello w…");
        assert_eq!(shorten("hello world", 6), "hello…");
        assert_eq!(shorten("abcdefghij", 4), "abc…");
        for max in 1..20 {
            assert!(shorten("the quick brown fox jumps", max).chars().count() <= max);
        }
    }

    #[test]
    fn find_newline_matches_naive_scan() {
        // Bytes around '\n' (0x0a) that trip naive SWAR variants: 0x0b and 0x8a differ from
        // it by one bit, 0x00 and 0x80 are zero bytes before and after the xor.
        let alphabet = [b'\n', 0x0b, 0x8a, 0x00, 0x80, 0x09, b'a', 0xff];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..5000 {
            let len = rng.usize(0..40);
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.u8(0..8) == 0 {
                        b'\n'
                    } else {
                        alphabet[rng.usize(1..alphabet.len())]
                    }
                })
                .collect();
            let naive = bytes.iter().position(|&b| b == b'\n');
            assert_eq!(find_newline(&bytes), naive, "{bytes:02x?}");
        }
    }

    #[test]
    fn turn_verdicts_come_from_each_result_line_alone() {
        let turns = |case: &str| -> Vec<Verdict> {
            parse_all(&read_fixture(case, "stdout.jsonl"))
                .1
                .iter()
                .filter_map(|e| match e {
                    StreamEvent::Result(r) => Some(turn_verdict(r)),
                    _ => None,
                })
                .collect()
        };
        // An interrupted last turn makes the process exit 1; the turn itself is interrupted.
        assert_eq!(fixture_rc("interrupt-stream", "rc"), 1);
        assert!(matches!(
            turns("interrupt-stream")[..],
            [Verdict::Interrupted { .. }]
        ));
        assert!(matches!(
            turns("interrupt-tool")[..],
            [Verdict::Interrupted { .. }, Verdict::Succeeded]
        ));
        assert_eq!(turns("perm-deny"), [Verdict::Succeeded]);
        assert_eq!(turns("steer-now"), [Verdict::Succeeded, Verdict::Succeeded]);
        assert!(matches!(
            &turns("error401")[..],
            [Verdict::Failed { reason }] if reason.contains("401")
        ));
        assert_eq!(
            turns("maxturns"),
            [Verdict::Failed {
                reason: "the agent hit its turn limit".into()
            }]
        );
        assert!(matches!(
            verdict_mid_turn(ExitInfo::Code(1)),
            Verdict::Failed { reason } if reason == "the agent exited with code 1 in the middle of a turn"
        ));
        assert!(matches!(
            verdict_mid_turn(ExitInfo::Signal(9)),
            Verdict::Interrupted { reason } if reason.contains("SIGKILL")
        ));
    }

    #[test]
    fn verdict_rules() {
        let with_result = |line: &str| parse_all(format!("{line}\n").as_bytes()).0;
        let ok = with_result(r#"{"type":"result","subtype":"success","is_error":false}"#);
        assert_eq!(
            verdict(&ok, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Succeeded
        );
        assert!(matches!(
            verdict(&ok, ExitInfo::Code(1), OutputKind::StreamJson),
            Verdict::Failed { reason } if reason.contains("code 1")
        ));
        assert!(matches!(
            verdict(&ok, ExitInfo::Signal(15), OutputKind::StreamJson),
            Verdict::Interrupted { reason } if reason.contains("SIGTERM")
        ));

        let budget =
            with_result(r#"{"type":"result","subtype":"error_max_budget_usd","is_error":true}"#);
        assert_eq!(
            verdict(&budget, ExitInfo::Code(1), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "the agent hit its budget limit (exited with code 1)".into()
            }
        );

        let during =
            with_result(r#"{"type":"result","subtype":"error_during_execution","is_error":true}"#);
        assert!(matches!(
            verdict(&during, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Interrupted { .. }
        ));
        // The same subtype with a failing exit is a real error, not an interruption.
        assert!(matches!(
            verdict(&during, ExitInfo::Code(1), OutputKind::StreamJson),
            Verdict::Failed { .. }
        ));

        let nothing = StreamParser::new();
        assert!(matches!(
            verdict(&nothing, ExitInfo::Code(130), OutputKind::StreamJson),
            Verdict::Interrupted { .. }
        ));
        assert!(matches!(
            verdict(&nothing, ExitInfo::Code(143), OutputKind::StreamJson),
            Verdict::Interrupted { .. }
        ));
        assert!(matches!(
            verdict(&nothing, ExitInfo::Signal(2), OutputKind::StreamJson),
            Verdict::Interrupted { .. }
        ));
        // Nothing at all, exit 0: a stream-json agent failed, a plain one succeeded.
        assert_eq!(
            verdict(&nothing, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "no result from the agent (it exited with code 0)".into()
            }
        );
        assert_eq!(
            verdict(&nothing, ExitInfo::Code(0), OutputKind::Plain),
            Verdict::Succeeded
        );

        let json_only = with_result(r#"{"type":"system","session_id":"x"}"#);
        assert_eq!(
            verdict(&json_only, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "no result from the agent (it exited with code 0)".into()
            }
        );
        assert_eq!(
            verdict(&json_only, ExitInfo::Code(137), OutputKind::Plain),
            Verdict::Failed {
                reason: "the agent exited with code 137 without a result".into()
            }
        );
    }

    #[test]
    fn long_result_text_is_cut_in_the_reason() {
        let text = "error ".repeat(200);
        let line =
            serde_json::json!({"type":"result","subtype":"success","is_error":true,"result":text});
        let (parser, _) = parse_all(format!("{line}\n").as_bytes());
        let Verdict::Failed { reason } =
            verdict(&parser, ExitInfo::Code(1), OutputKind::StreamJson)
        else {
            panic!()
        };
        assert!(reason.chars().count() <= REASON_MAX + 30, "{reason}");
        assert!(reason.ends_with("… (exited with code 1)"), "{reason}");
    }

    #[test]
    fn a_key_at_the_reason_cut_is_redacted_whole() {
        let key = "sk-proj-CZ8hKYWHJPu05MC4jAbCdEfGhIjKlMnOpQrStUvWxYz0123456789xy";
        for pad in (REASON_MAX - 70..REASON_MAX).step_by(7) {
            let text = format!("{} {key} and more words after it", "x".repeat(pad));
            let line = serde_json::json!({"type":"result","subtype":"success","is_error":true,"result":text});
            let (parser, _) = parse_all(format!("{line}\n").as_bytes());
            let verdict = verdict(&parser, ExitInfo::Code(1), OutputKind::StreamJson);
            let Verdict::Failed { reason } = verdict else {
                panic!("{verdict:?}")
            };
            for piece in key.as_bytes().windows(8) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(!reason.contains(piece), "{piece:?} in {reason:?}");
            }
        }
    }

    #[test]
    fn random_bytes_are_no_result() {
        let mut rng = fastrand::Rng::with_seed(8);
        let bytes: Vec<u8> = (0..64 * 1024).map(|_| rng.u8(..)).collect();
        let (parser, _) = parse_all(&bytes);
        assert!(parser.result().is_none());
        assert_eq!(
            verdict(&parser, ExitInfo::Code(0), OutputKind::StreamJson),
            Verdict::Failed {
                reason: "no result from the agent (it exited with code 0)".into()
            }
        );
    }

    #[test]
    fn output_kind_from_the_command() {
        let argv = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            OutputKind::of_command(&argv(&[
                "claude",
                "-p",
                "x",
                "--output-format",
                "stream-json"
            ])),
            OutputKind::StreamJson
        );
        assert_eq!(
            OutputKind::of_command(&argv(&["claude", "--output-format=json"])),
            OutputKind::StreamJson
        );
        for plain in [
            &["claude", "--output-format", "text"][..],
            &["aider", "--message", "{prompt}"],
            &["x", "--output-format"],
            &["echo", "stream-json"],
        ] {
            assert_eq!(
                OutputKind::of_command(&argv(plain)),
                OutputKind::Plain,
                "{plain:?}"
            );
        }
    }

    #[test]
    fn text_after_finish_continues() {
        let mut parser = StreamParser::new();
        let mut events = Vec::new();
        parser.feed(b"one", &mut events);
        parser.finish(&mut events);
        parser.feed(b"two\n", &mut events);
        assert_eq!(
            events,
            [
                StreamEvent::Plain("one".into()),
                StreamEvent::Plain("two".into())
            ]
        );
    }
}
