//! The state file, `$XDG_STATE_HOME/walkie/state.json`: the task registry and the
//! transcript tail, so a restart (or a crash) loses nothing already recorded.
//!
//! Writes are atomic (temp file, fsync, rename, fsync of the directory; mode 0600) and happen
//! on a small writer thread: the loop hands over the latest snapshot and never waits for the
//! disk (an SD card's fsync can take tens of milliseconds). Only the newest snapshot matters,
//! so a burst of changes costs one write. A file that cannot be parsed is moved aside with a
//! clear log line, never overwritten.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::conversation::TranscriptEntry;
use crate::tasks::TaskRecord;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    #[serde(default)]
    pub tasks: Vec<TaskRecord>,
    #[serde(default)]
    pub transcript: Vec<TranscriptEntry>,
}

impl Default for StateFile {
    fn default() -> Self {
        StateFile {
            version: VERSION,
            tasks: Vec::new(),
            transcript: Vec::new(),
        }
    }
}

/// What reading the state file at start found.
#[derive(Debug)]
pub enum Loaded {
    /// No file yet: a first start.
    Fresh,
    Ok(StateFile),
    /// The file was unreadable as state; it now lives at `moved_to`.
    MovedAside {
        error: String,
        moved_to: PathBuf,
    },
}

/// Why the state file could not be dealt with at all: walkie refuses to start rather than
/// overwrite a file it could not read or move.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {message}")]
pub struct StateError {
    pub path: PathBuf,
    pub message: String,
}

/// Reads the state file; a corrupt one is moved to `state.json.corrupt-<unix time>`.
pub fn load(path: &Path) -> Result<Loaded, StateError> {
    let err = |message: String| StateError {
        path: path.to_path_buf(),
        message,
    };
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
        Err(e) => {
            return Err(err(format!(
                "cannot read it: {e}; fix its permissions or move it away"
            )));
        }
    };
    let problem = match serde_json::from_slice::<StateFile>(&bytes) {
        Ok(state) if state.version == VERSION => return Ok(Loaded::Ok(state)),
        Ok(state) => format!(
            "unsupported version {} (this walkie reads {VERSION})",
            state.version
        ),
        Err(e) => format!("not valid state: {e}"),
    };
    let moved_to = aside_path(path);
    fs::rename(path, &moved_to)
        .map_err(|e| err(format!("{problem}, and it cannot be moved aside: {e}")))?;
    Ok(Loaded::MovedAside {
        error: problem,
        moved_to,
    })
}

fn aside_path(path: &Path) -> PathBuf {
    let secs = crate::clock::unix_ms(std::time::SystemTime::now()) / 1000;
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{secs}"));
    PathBuf::from(name)
}

/// Writes `bytes` to `path` atomically: a crash leaves either the old or the new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::paths::create_private_dir(dir)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    // The rename itself is durable only once the directory is synced.
    File::open(dir)?.sync_all()
}

#[derive(Default)]
struct Slot {
    pending: Option<Vec<u8>>,
    stop: bool,
}

/// The writer thread. [`StateWriter::submit`] replaces any snapshot not yet written.
pub struct StateWriter {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl StateWriter {
    pub fn start(path: PathBuf) -> io::Result<StateWriter> {
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("walkie-state".into())
            .spawn(move || {
                let (lock, cond) = &*theirs;
                loop {
                    let (bytes, stop) = {
                        let mut slot = lock.lock().unwrap_or_else(|p| p.into_inner());
                        while slot.pending.is_none() && !slot.stop {
                            slot = cond.wait(slot).unwrap_or_else(|p| p.into_inner());
                        }
                        (slot.pending.take(), slot.stop)
                    };
                    if let Some(bytes) = bytes {
                        if let Err(e) = write_atomic(&path, &bytes) {
                            log::error!("cannot write the state file {}: {e}", path.display());
                        }
                    }
                    if stop && lock.lock().map(|s| s.pending.is_none()).unwrap_or(true) {
                        break;
                    }
                }
            })?;
        Ok(StateWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `state` for writing (serialised here, written on the thread).
    pub fn submit(&self, state: &StateFile) {
        let bytes = match serde_json::to_vec_pretty(state) {
            Ok(b) => b,
            Err(e) => return log::error!("cannot serialise the state: {e}"),
        };
        let (lock, cond) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).pending = Some(bytes);
        cond.notify_one();
    }

    /// Writes what is pending and stops the thread.
    pub fn finish(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let (lock, cond) = &*self.shared;
        lock.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cond.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StateWriter {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writer_persists_the_latest_snapshot_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        let writer = StateWriter::start(path.clone()).unwrap();
        let mut state = StateFile::default();
        for i in 0..50 {
            state.transcript = vec![
                serde_json::from_value(serde_json::json!({
                    "role": "user", "text": format!("turn {i}"), "at": "2026-01-01T00:00:00Z"
                }))
                .unwrap(),
            ];
            writer.submit(&state);
        }
        writer.finish();
        let Loaded::Ok(back) = load(&path).unwrap() else {
            panic!("not loaded")
        };
        assert_eq!(back, state, "the last snapshot wins");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!dir.path().join("sub/state.json.tmp").exists());
    }

    #[test]
    fn missing_file_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(&dir.path().join("state.json")).unwrap(),
            Loaded::Fresh
        ));
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for content in [
            "{not json",
            r#"{"version": 99, "tasks": []}"#,
            r#"{"version":1,"tasks":[{"name":5}]}"#,
        ] {
            fs::write(&path, content).unwrap();
            let Loaded::MovedAside { moved_to, error } = load(&path).unwrap() else {
                panic!("{content} was accepted")
            };
            assert!(!path.exists());
            assert_eq!(fs::read_to_string(&moved_to).unwrap(), content, "{error}");
            fs::remove_file(moved_to).unwrap();
        }
    }
}
