//! The `--record FILE` log: every client event and every connection open/close, one JSON line
//! each, written by whichever connection thread saw it.
//!
//! Tests read this file while the tool runs, so every line goes out in one `write` under a
//! lock (lines from several connections never interleave) and is on disk when the call
//! returns; there is no buffer to flush.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::{Value, json};

pub struct Recorder {
    file: Mutex<File>,
    start: Instant,
}

impl Recorder {
    /// Creates (truncates) the file; `start` is the tool's start, the zero of `t_ms`.
    pub fn create(path: &Path, start: Instant) -> std::io::Result<Recorder> {
        Ok(Recorder {
            file: Mutex::new(File::create(path)?),
            start,
        })
    }

    fn t_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn write_line(&self, line: &Value) {
        let mut text = line.to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        // A full disk must not kill the fake server: the test will see the missing line.
        if let Err(e) = file.write_all(text.as_bytes()) {
            log::warn!("cannot write the record file: {e}");
        }
    }

    /// A text frame from the client: the event as parsed (audio included), or the raw text
    /// when it is not JSON.
    pub fn text(&self, conn: u64, text: &str) {
        let t_ms = self.t_ms();
        let line = match serde_json::from_str::<Value>(text) {
            Ok(event) => json!({"conn": conn, "t_ms": t_ms, "event": event}),
            Err(_) => json!({"conn": conn, "t_ms": t_ms, "raw": text}),
        };
        self.write_line(&line);
    }

    /// A binary frame from the client (the API has none; recorded so tests can see it).
    pub fn binary(&self, conn: u64, len: usize) {
        let t_ms = self.t_ms();
        self.write_line(&json!({"conn": conn, "t_ms": t_ms, "binary_len": len}));
    }

    /// `open` after a successful upgrade, `closed` when the connection is gone.
    pub fn meta(&self, conn: u64, what: &str) {
        let t_ms = self.t_ms();
        self.write_line(&json!({"conn": conn, "t_ms": t_ms, "meta": what}));
    }
}
