//! `walkie run --trace FILE`: one JSON line per Realtime event sent or received,
//! `{"t_ms":…, "dir":"out"|"in", "event":{…}}`, base64 audio replaced by a placeholder
//! (DESIGN.md §3). The API key never passes through here: it only travels in the upgrade
//! request's header, which is not an event.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};

use super::events::elide_audio;

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
                let raw: String = text.chars().take(500).collect();
                let t_ms = now.saturating_duration_since(self.start).as_millis() as u64;
                self.write(&json!({"t_ms": t_ms, "dir": "in", "event": null, "raw": raw}));
            }
        }
    }

    fn line(&mut self, now: Instant, dir: &str, event: Value) {
        let t_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.write(&json!({"t_ms": t_ms, "dir": dir, "event": event}));
    }

    fn write(&mut self, value: &Value) {
        if self.failed {
            return;
        }
        let res = serde_json::to_writer(&mut self.out, value)
            .map_err(io::Error::from)
            .and_then(|()| self.out.write_all(b"\n"));
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
