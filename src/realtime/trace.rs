//! `walkie run --trace FILE`: one JSON line per Realtime event sent or received,
//! `{"t_ms":…, "dir":"out"|"in", "event":{…}}`, base64 audio replaced by a placeholder
//! (README.md, `--trace`). The API key never passes through here: it only travels in the upgrade
//! request's header, which is not an event. Every text in an event is redacted before it is
//! written (what walkie sends already is; what the model or the user says may not be).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::events::elide_audio;
use crate::tasks::redact::{self, Keep};

/// Longest text frame that is not JSON quoted in a trace line.
const RAW_CHARS: usize = 500;

pub struct Trace {
    out: BufWriter<File>,
    start: Instant,
    failed: bool,
}

impl Trace {
    /// Creates (truncates) the trace file, private to the user (it holds the conversation).
    pub fn create(path: &Path, start: Instant) -> io::Result<Trace> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(Trace {
            out: BufWriter::new(file),
            start,
            failed: false,
        })
    }

    /// An event walkie sent.
    pub fn sent(&mut self, now: Instant, mut event: Value) {
        elide_audio(&mut event);
        self.line(now, "out", event);
    }

    /// A text frame walkie received; what is not JSON is kept (shortened) as `raw`.
    pub fn received(&mut self, now: Instant, text: &str) {
        match serde_json::from_str::<Value>(text) {
            Ok(mut event) => {
                elide_audio(&mut event);
                self.line(now, "in", event);
            }
            Err(_) => {
                let raw = redact::excerpt(text, RAW_CHARS, Keep::Head);
                let t_ms = now.saturating_duration_since(self.start).as_millis() as u64;
                self.write(&json!({"t_ms": t_ms, "dir": "in", "event": null, "raw": raw}));
            }
        }
    }

    fn line(&mut self, now: Instant, dir: &str, mut event: Value) {
        redact_strings(&mut event);
        let t_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.write(&json!({"t_ms": t_ms, "dir": dir, "event": event}));
    }

    fn write(&mut self, value: &Value) {
        if self.failed {
            return;
        }
        // The whole line in one write to the buffer: when it does not fit, the buffer goes
        // to the file first, so a reader of the file (a test, `tail -f`) never sees half
        // a line.
        let mut line = match serde_json::to_vec(value) {
            Ok(line) => line,
            Err(e) => return log::error!("trace file: {e}; line skipped"),
        };
        line.push(b'\n');
        let res = self.out.write_all(&line);
        if let Err(e) = res {
            log::error!("trace file: {e}; tracing stops");
            self.failed = true;
        }
    }

    /// Pushes buffered lines to the file (once per loop iteration).
    pub fn flush(&mut self) {
        if !self.failed && self.out.flush().is_err() {
            self.failed = true;
        }
    }
}

/// Redacts every string in `value` (keys stay: they are the protocol's own names).
fn redact_strings(value: &mut Value) {
    match value {
        Value::String(text) => {
            let redacted = redact::redact(text);
            if redacted != *text {
                *text = redacted;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_strings),
        Value::Object(map) => map.values_mut().for_each(redact_strings),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn secrets_in_events_and_raw_frames_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.jsonl");
        let start = Instant::now();
        let mut trace = Trace::create(&path, start).unwrap();
        trace.received(
            start,
            r#"{"type":"response.output_audio_transcript.delta","delta":"the key is sk-proj-Ab3dEfGh1jKlMnOpQrStUvWx0123"}"#,
        );
        trace.sent(
            start,
            serde_json::json!({"type":"conversation.item.create","item":{"type":"message","role":"user",
                "content":[{"type":"input_text","text":"use DB_PASSWORD=hunter2 please"}]}}),
        );
        let long = format!(
            "{} ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "x ".repeat(245)
        );
        trace.received(start, &long);
        trace.flush();
        let mut text = String::new();
        File::open(&path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert!(
            !text.contains("Ab3dEfGh1jKl") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(!text.contains("ghp_16C7"), "{text}");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["event"]["delta"], "the key is [redacted]");
        assert_eq!(
            lines[1]["event"]["item"]["content"][0]["text"],
            "use DB_PASSWORD=[redacted] please"
        );
        assert!(
            lines[2]["event"].is_null()
                && lines[2]["raw"].as_str().unwrap().chars().count() <= RAW_CHARS
        );
    }
}
