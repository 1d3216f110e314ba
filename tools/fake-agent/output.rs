//! Renders the run's events on stdout in the requested format.
//!
//! Owns stdout (buffered; flushed after every event except flood lines, so a reader sees each
//! line as soon as the "model" produced it). stream-json prints every event; `json` and
//! `text` print only the outcome at the end, as the real CLI does; `@plain` prints human text
//! lines and no JSON at all, like an agent without a structured mode.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::lines::{self, Ending, Session, Tally};
use crate::workspace::Exchange;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    StreamJson { partial: bool },
    Json,
    Text,
    Plain,
}

pub struct Output<W: Write> {
    out: W,
    style: Style,
    session: Session,
    /// Bytes written so far.
    written: u64,
    /// A flood line's text before and after its text (see `flood_template`).
    flood_template: Option<(String, String)>,
}

const MARK_MESSAGE_ID: &str = "@MESSAGE_ID@";
const MARK_UUID: &str = "@UUID@";
const MARK_REQUEST_ID: &str = "@REQUEST_ID@";
const MARK_TIMESTAMP: &str = "@TIMESTAMP@";
const MARK_TEXT: &str = "@TEXT@";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `line` serialized with `type` and `subtype` leading, as the real CLI's init line does, so
/// logs read well; the other keys keep serde_json's (sorted) order.
fn type_first(line: &Value) -> String {
    let Value::Object(fields) = line else {
        return line.to_string();
    };
    const LEADING: [&str; 2] = ["type", "subtype"];
    let leading = LEADING.iter().filter_map(|k| fields.get_key_value(*k));
    let rest = fields
        .iter()
        .filter(|(k, _)| !LEADING.contains(&k.as_str()));
    let entries: Vec<String> = leading
        .chain(rest)
        .map(|(k, v)| format!("{}:{v}", Value::from(k.as_str())))
        .collect();
    format!("{{{}}}", entries.join(","))
}

impl<W: Write> Output<W> {
    pub fn new(out: W, style: Style, session: Session) -> Self {
        Output {
            out,
            style,
            session,
            written: 0,
            flood_template: None,
        }
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    pub fn streams_json(&self) -> bool {
        matches!(self.style, Style::StreamJson { .. })
    }

    pub fn is_plain(&self) -> bool {
        self.style == Style::Plain
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn json_line(&mut self, line: &Value) -> io::Result<()> {
        let mut text = type_first(line);
        text.push('\n');
        self.write_bytes(text.as_bytes())
    }

    fn plain_line(&mut self, text: &str) -> io::Result<()> {
        let mut text = text.to_owned();
        text.push('\n');
        self.write_bytes(text.as_bytes())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Bytes as they are (stream-json only: the `@malformed` cases).
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.streams_json() {
            self.write_bytes(bytes)?;
            self.flush()?;
        }
        Ok(())
    }

    /// Any stream-json line built by the caller (control lines, replays, a patched result).
    pub fn event(&mut self, line: &Value) -> io::Result<()> {
        if self.streams_json() {
            self.json_line(line)?;
            self.flush()?;
        }
        Ok(())
    }

    pub fn init(&mut self, api_key_source: &str, tmp_dir: &str) -> io::Result<()> {
        if self.streams_json() {
            let line = lines::init(&self.session, api_key_source, tmp_dir, std::process::id());
            self.json_line(&line)?;
            self.flush()?;
        }
        Ok(())
    }

    /// Events of `--include-partial-messages` that precede the complete assistant line.
    fn partial_start(
        &mut self,
        message_id: &str,
        block: Value,
        deltas: Vec<Value>,
    ) -> io::Result<()> {
        let session = self.session.clone();
        // The CLI announces each API request in this mode (partial fixture).
        let mut status = Map::new();
        status.insert("status".into(), json!("requesting"));
        self.json_line(&lines::system(&session, "status", status))?;
        let start = json!({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": session.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 100, "output_tokens": 1}
        }});
        self.json_line(&lines::stream_event(&session, message_id, start))?;
        let block_start =
            json!({"type": "content_block_start", "index": 0, "content_block": block});
        self.json_line(&lines::stream_event(&session, message_id, block_start))?;
        for delta in deltas {
            let event = json!({"type": "content_block_delta", "index": 0, "delta": delta});
            self.json_line(&lines::stream_event(&session, message_id, event))?;
        }
        Ok(())
    }

    fn partial_end(&mut self, message_id: &str, stop_reason: &str) -> io::Result<()> {
        let session = self.session.clone();
        for event in [
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                   "usage": {"output_tokens": 16}}),
            json!({"type": "message_stop"}),
        ] {
            self.json_line(&lines::stream_event(&session, message_id, event))?;
        }
        Ok(())
    }

    /// One assistant message with a text block.
    pub fn text(&mut self, text: &str) -> io::Result<()> {
        match self.style {
            Style::StreamJson { partial } => {
                let id = lines::fake_id("msg");
                if partial {
                    let chars: Vec<char> = text.chars().collect();
                    let deltas = chars
                        .chunks(12)
                        .map(
                            |c| json!({"type": "text_delta", "text": c.iter().collect::<String>()}),
                        )
                        .collect();
                    self.partial_start(&id, json!({"type": "text", "text": ""}), deltas)?;
                }
                let line =
                    lines::assistant(&self.session, &id, vec![lines::text_block(text)], now_ms());
                self.json_line(&line)?;
                if partial {
                    self.partial_end(&id, "end_turn")?;
                }
            }
            Style::Plain => self.plain_line(text)?,
            Style::Json | Style::Text => {}
        }
        self.flush()
    }

    /// The assistant's tool use; returns its id for the answer.
    pub fn tool_use(&mut self, exchange: &Exchange) -> io::Result<String> {
        let id = lines::fake_id("toolu");
        match self.style {
            Style::StreamJson { partial } => {
                let message_id = lines::fake_id("msg");
                if partial {
                    let block =
                        json!({"type": "tool_use", "id": id, "name": exchange.name, "input": {}});
                    let delta = json!({"type": "input_json_delta", "partial_json": exchange.input.to_string()});
                    self.partial_start(&message_id, block, vec![delta])?;
                }
                let block = lines::tool_use_block(&id, exchange.name, exchange.input.clone());
                let line = lines::assistant(&self.session, &message_id, vec![block], now_ms());
                self.json_line(&line)?;
                if partial {
                    self.partial_end(&message_id, "tool_use")?;
                }
            }
            Style::Plain => {
                let target = exchange.input["file_path"]
                    .as_str()
                    .or(exchange.input["command"].as_str())
                    .unwrap_or("");
                self.plain_line(&format!("[{}] {target}", exchange.name))?;
            }
            Style::Json | Style::Text => {}
        }
        self.flush()?;
        Ok(id)
    }

    /// The answer to tool use `id`.
    pub fn tool_result(&mut self, id: &str, exchange: &Exchange) -> io::Result<()> {
        if self.streams_json() {
            let line = lines::user_tool_result(
                &self.session,
                id,
                &exchange.content,
                exchange.is_error,
                exchange.structured.clone(),
                now_ms(),
            );
            self.json_line(&line)?;
            self.flush()?;
        }
        Ok(())
    }

    pub fn user_text(&mut self, text: &str) -> io::Result<()> {
        if self.streams_json() {
            let line = lines::user_text(&self.session, text, now_ms());
            self.json_line(&line)?;
            self.flush()?;
        }
        Ok(())
    }

    pub fn system(&mut self, subtype: &str, fields: Value) -> io::Result<()> {
        if self.streams_json() {
            let fields = match fields {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            let line = lines::system(&self.session, subtype, fields);
            self.json_line(&line)?;
            self.flush()?;
        }
        Ok(())
    }

    /// The synthetic assistant message of an API failure.
    pub fn api_error(&mut self, status: u16, text: &str) -> io::Result<()> {
        match self.style {
            Style::StreamJson { .. } => {
                let line = lines::assistant_api_error(&self.session, status, text, now_ms());
                self.json_line(&line)?;
            }
            Style::Plain => self.plain_line(text)?,
            Style::Json | Style::Text => {}
        }
        self.flush()
    }

    /// Size of a flood line without its text, newline included (constant: the ids and the
    /// timestamp have fixed widths).
    pub fn flood_overhead(&self) -> u64 {
        match self.style {
            Style::Plain | Style::Json | Style::Text => 1,
            Style::StreamJson { .. } => {
                let line = lines::assistant(
                    &self.session,
                    &lines::fake_id("msg"),
                    vec![lines::text_block("")],
                    now_ms(),
                );
                type_first(&line).len() as u64 + 1
            }
        }
    }

    /// One flood line, left in the buffer; returns its size (the size it would have when the
    /// format prints no flood, so a bounded flood still ends).
    pub fn flood_line(&mut self, text: &str) -> io::Result<u64> {
        let before = self.written;
        match self.style {
            Style::StreamJson { .. } => {
                let (head, tail) = self.flood_template();
                let mut line = String::with_capacity(head.len() + text.len() + tail.len() + 1);
                for (part, with_text) in [(head, true), (tail, false)] {
                    line.push_str(
                        &part
                            .replace(MARK_MESSAGE_ID, &lines::fake_id("msg"))
                            .replace(MARK_UUID, &lines::uuid_v4())
                            .replace(MARK_REQUEST_ID, &lines::fake_id("req"))
                            .replace(MARK_TIMESTAMP, &lines::timestamp(now_ms())),
                    );
                    if with_text {
                        line.push_str(text);
                    }
                }
                line.push('\n');
                self.write_bytes(line.as_bytes())?;
            }
            Style::Plain => self.plain_line(text)?,
            Style::Json | Style::Text => return Ok(text.len() as u64 + 1),
        }
        Ok(self.written - before)
    }

    /// The flood line serialized once around markers: serializing megabytes of text through
    /// `Value` would make the flood slower than the pipe. Sound because flood text needs no
    /// JSON escaping (see `flood::Corpus`).
    fn flood_template(&mut self) -> (String, String) {
        if self.flood_template.is_none() {
            let mut line = lines::assistant(
                &self.session,
                MARK_MESSAGE_ID,
                vec![lines::text_block(MARK_TEXT)],
                0,
            );
            line["uuid"] = json!(MARK_UUID);
            line["request_id"] = json!(MARK_REQUEST_ID);
            line["timestamp"] = json!(MARK_TIMESTAMP);
            let text = type_first(&line);
            let (head, tail) = text.split_once(MARK_TEXT).unwrap_or((&text, ""));
            self.flood_template = Some((head.to_owned(), tail.to_owned()));
        }
        self.flood_template.clone().unwrap_or_default()
    }

    /// The final outcome; the only output of `json` and `text`.
    pub fn result(&mut self, ending: &Ending, tally: Tally) -> io::Result<()> {
        match self.style {
            Style::StreamJson { .. } | Style::Json => {
                let line = lines::result(&self.session, ending, tally);
                self.json_line(&line)?;
            }
            Style::Text => match ending {
                Ending::Success { text } | Ending::ApiError { text, .. } => {
                    self.plain_line(text)?
                }
                Ending::Superseded => {}
                Ending::MaxTurns { limit } => {
                    self.plain_line(&format!("Error: Reached max turns ({limit})"))?
                }
                Ending::Interrupted { .. } => {}
            },
            // The final message already said it all.
            Style::Plain => match ending {
                Ending::Success { .. } | Ending::ApiError { .. } | Ending::Superseded => {}
                Ending::MaxTurns { limit } => {
                    self.plain_line(&format!("Error: Reached max turns ({limit})"))?
                }
                Ending::Interrupted { .. } => self.plain_line("Interrupted by user.")?,
            },
        }
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(style: Style) -> Output<Vec<u8>> {
        let session = Session {
            id: "s".into(),
            model: lines::DEFAULT_MODEL.into(),
            cwd: "/p".into(),
            permission_mode: "default".into(),
        };
        Output::new(Vec::new(), style, session)
    }

    fn parsed_lines(out: &Output<Vec<u8>>) -> Vec<Value> {
        String::from_utf8_lossy(&out.out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn type_leads_and_the_line_is_the_same_object() {
        let line = json!({"a": 1, "subtype": "init", "type": "system", "z": {"type": "x"}});
        let text = type_first(&line);
        assert!(
            text.starts_with(r#"{"type":"system","subtype":"init","#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), line);
        assert_eq!(type_first(&json!([1])), "[1]");
    }

    #[test]
    fn flood_lines_have_the_predicted_size() {
        let mut out = output(Style::StreamJson { partial: false });
        let overhead = out.flood_overhead();
        for len in [0usize, 1, 1000, 4096] {
            let text = "x".repeat(len);
            assert_eq!(out.flood_line(&text).unwrap(), overhead + len as u64);
        }
        assert_eq!(out.written as usize, out.out.len());
    }

    #[test]
    fn flood_lines_are_ordinary_assistant_lines() {
        let mut out = output(Style::StreamJson { partial: false });
        out.flood_line("Some prose.").unwrap();
        out.flood_line("More prose.").unwrap();
        let lines = parsed_lines(&out);
        let reference = lines::assistant(
            &out.session,
            "msg_fake000000000000000000000000",
            vec![lines::text_block("Some prose.")],
            0,
        );
        let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&lines[0]), keys(&reference));
        assert_eq!(keys(&lines[0]["message"]), keys(&reference["message"]));
        assert_eq!(
            lines[0]["message"]["content"],
            reference["message"]["content"]
        );
        assert_eq!(lines[0]["session_id"], "s");
        assert_eq!(lines[1]["message"]["content"][0]["text"], "More prose.");
        for key in ["uuid", "request_id"] {
            assert_ne!(lines[0][key], lines[1][key]);
            assert!(!lines[0][key].as_str().unwrap().contains('@'));
        }
        assert_ne!(lines[0]["message"]["id"], lines[1]["message"]["id"]);
        assert_eq!(lines[0]["timestamp"].as_str().map(str::len), Some(24));
    }

    #[test]
    fn flood_without_printed_output_still_counts() {
        let mut out = output(Style::Json);
        assert_eq!(out.flood_line("abc").unwrap(), 4);
        assert!(out.out.is_empty());
    }

    #[test]
    fn partial_messages_wrap_the_assistant_line_in_stream_events() {
        let mut out = output(Style::StreamJson { partial: true });
        out.text("Hello from the fake agent.").unwrap();
        let lines = parsed_lines(&out);
        let kinds: Vec<String> = lines
            .iter()
            .map(|l| match l["type"].as_str() {
                Some("stream_event") => l["event"]["type"].as_str().unwrap_or("").to_owned(),
                other => other.unwrap_or("").to_owned(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "system",
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "assistant",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let streamed: String = lines
            .iter()
            .filter_map(|l| l["event"]["delta"]["text"].as_str())
            .collect();
        assert_eq!(streamed, "Hello from the fake agent.");
    }

    #[test]
    fn text_format_prints_only_the_result() {
        let mut out = output(Style::Text);
        out.init("none", "/tmp").unwrap();
        out.text("thinking").unwrap();
        let tally = Tally {
            num_turns: 1,
            duration_ms: 1,
            prior_cost_usd: 0.0,
        };
        out.result(
            &Ending::Success {
                text: "Done: x".into(),
            },
            tally,
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.out), "Done: x\n");
    }

    #[test]
    fn json_format_prints_one_result_object() {
        let mut out = output(Style::Json);
        out.init("none", "/tmp").unwrap();
        out.text("thinking").unwrap();
        let tally = Tally {
            num_turns: 1,
            duration_ms: 1,
            prior_cost_usd: 0.0,
        };
        out.result(
            &Ending::Success {
                text: "Done".into(),
            },
            tally,
        )
        .unwrap();
        let lines = parsed_lines(&out);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["type"], "result");
        assert_eq!(lines[0]["result"], "Done");
    }

    #[test]
    fn plain_style_prints_no_json() {
        let mut out = output(Style::Plain);
        out.init("none", "/tmp").unwrap();
        out.raw(b"{}\n").unwrap();
        out.text("Working.").unwrap();
        let ex = crate::workspace::bash("make", "build", "ok");
        let id = out.tool_use(&ex).unwrap();
        out.tool_result(&id, &ex).unwrap();
        let tally = Tally {
            num_turns: 2,
            duration_ms: 1,
            prior_cost_usd: 0.0,
        };
        out.result(
            &Ending::Success {
                text: "Working.".into(),
            },
            tally,
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.out), "Working.\n[Bash] make\n");
    }
}
