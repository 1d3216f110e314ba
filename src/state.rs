//! The state file, `$XDG_STATE_HOME/walkie/state.json`: the task registry and the
//! transcript tail, so a restart (or a crash) loses nothing already recorded.
//!
//! Writes are atomic (a new temporary file, fsync, rename, fsync of the directory; mode
//! 0600) and happen on a small writer thread: the loop hands over the latest snapshot and
//! never waits for the disk (an SD card's fsync can take tens of milliseconds). Only the
//! newest snapshot matters, so a burst of changes costs one write.
//!
//! Reading is bounded: the file must be a regular file of at most [`MAX_BYTES`], parsed as
//! a stream that keeps only the newest [`MAX_TASKS`] tasks and [`MAX_TRANSCRIPT`] entries.
//! Nothing is ever thrown away: a file that cannot be used is moved aside (never over
//! another one), a file that held more than walkie keeps is moved aside whole before the
//! next save, and a file written by a newer walkie stops the start, untouched.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Deserializer, Serialize};

use crate::conversation::TranscriptEntry;
use crate::files;
use crate::tasks::TaskRecord;

pub const VERSION: u32 = 1;
/// The largest state file walkie reads. What walkie writes stays far below (a bounded
/// registry and transcript tail); anything larger was not written by it.
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Tasks kept from a state file: the newest ones. The engine keeps fewer, so a file walkie
/// wrote is never cut.
pub const MAX_TASKS: usize = 500;
/// Transcript entries kept from a state file: the newest ones (the conversation keeps fewer).
pub const MAX_TRANSCRIPT: usize = 200;

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
/// overwrite a file it could not read or move, or one written by a newer walkie.
#[derive(Debug, thiserror::Error)]
#[error("state file {path}: {message}")]
pub struct StateError {
    pub path: PathBuf,
    pub message: String,
}

/// Reads the state file. One that cannot be used is moved to
/// `state.json.corrupt-<unix time>`; one that held more than walkie keeps is moved whole to
/// `state.json.full-<unix time>` and its newest part returned.
pub fn load(path: &Path) -> Result<Loaded, StateError> {
    let err = |message: String| StateError {
        path: path.to_path_buf(),
        message,
    };
    let file = match files::open_regular(path) {
        Ok((file, meta)) => files::check_size(&meta, MAX_BYTES).map(|()| file),
        Err(e) => Err(e),
    };
    let parsed = match file {
        Ok(file) => parse(file, path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
        // A FIFO, a device, a directory or a huge file: not state; out of the way with it.
        Err(e) if files::refusal(&e).is_some() => Err(e.to_string()),
        Err(e) => {
            return Err(err(format!(
                "cannot read it: {e}; fix its permissions or move it away"
            )));
        }
    };
    let problem = match parsed {
        Ok(bounded) if bounded.is_complete() => return Ok(Loaded::Ok(bounded.into_state())),
        Ok(bounded) => {
            let moved_to = files::move_aside(path, "full").map_err(|e| {
                err(format!(
                    "it holds {} tasks and {} transcript entries, more than walkie keeps, and it cannot be moved aside: {e}",
                    bounded.tasks.seen, bounded.transcript.seen
                ))
            })?;
            log::warn!(
                "the state file held {} tasks and {} transcript entries: walkie keeps the newest {} tasks and {} entries; the whole file is kept at {}",
                bounded.tasks.seen,
                bounded.transcript.seen,
                bounded.tasks.items.len(),
                bounded.transcript.items.len(),
                moved_to.display()
            );
            return Ok(Loaded::Ok(bounded.into_state()));
        }
        Err(problem) => problem,
    };
    let moved_to = files::move_aside(path, "corrupt")
        .map_err(|e| err(format!("{problem}, and it cannot be moved aside: {e}")))?;
    Ok(Loaded::MovedAside {
        error: problem,
        moved_to,
    })
}

/// Parses an opened state file in two streaming passes: the version alone first (a newer
/// walkie's tasks may not parse as ours, and its file must not be called corrupt), then the
/// whole with bounded lists. The outer error stops the start; the inner one is a problem
/// that moves the file aside.
fn parse(mut file: File, path: &Path) -> Result<Result<Bounded, String>, StateError> {
    fn reader(file: &mut File) -> BufReader<io::Take<&mut File>> {
        BufReader::new(file.take(MAX_BYTES))
    }
    let version = match serde_json::from_reader::<_, VersionOnly>(reader(&mut file)) {
        Ok(VersionOnly { version: Some(v) }) => v,
        Ok(VersionOnly { version: None }) => {
            return Ok(Err("not valid state: no \"version\" field".into()));
        }
        Err(e) => return Ok(Err(format!("not valid state: {e}"))),
    };
    if version > VERSION {
        return Err(StateError {
            path: path.to_path_buf(),
            message: format!(
                "it was written by a newer walkie (format version {version}; this one reads {VERSION}) and is left as it is: run the newer walkie, or move the file away to start this one with an empty registry"
            ),
        });
    }
    if version != VERSION {
        return Ok(Err(format!(
            "unsupported version {version} (this walkie reads {VERSION})"
        )));
    }
    if let Err(e) = file.rewind() {
        return Ok(Err(format!("cannot read it again: {e}")));
    }
    Ok(serde_json::from_reader::<_, Bounded>(reader(&mut file))
        .map_err(|e| format!("not valid state: {e}")))
}

#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default)]
    version: Option<u32>,
}

/// The state file as read: the newest part of each list, and how long each was.
#[derive(Deserialize)]
struct Bounded {
    version: u32,
    #[serde(default)]
    tasks: Newest<TaskRecord, MAX_TASKS>,
    #[serde(default)]
    transcript: Newest<TranscriptEntry, MAX_TRANSCRIPT>,
}

impl Bounded {
    fn is_complete(&self) -> bool {
        self.tasks.seen == self.tasks.items.len()
            && self.transcript.seen == self.transcript.items.len()
    }

    fn into_state(self) -> StateFile {
        StateFile {
            version: self.version,
            tasks: self.tasks.items.into(),
            transcript: self.transcript.items.into(),
        }
    }
}

/// A JSON array read element by element, keeping the last `N`.
struct Newest<T, const N: usize> {
    items: VecDeque<T>,
    seen: usize,
}

impl<T, const N: usize> Default for Newest<T, N> {
    fn default() -> Self {
        Newest {
            items: VecDeque::new(),
            seen: 0,
        }
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Newest<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T, const N: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const N: usize> serde::de::Visitor<'de> for Visit<T, N> {
            type Value = Newest<T, N>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut newest = Newest::default();
                while let Some(item) = seq.next_element()? {
                    if newest.items.len() == N {
                        newest.items.pop_front();
                    }
                    newest.items.push_back(item);
                    newest.seen += 1;
                }
                Ok(newest)
            }
        }
        deserializer.deserialize_seq(Visit(PhantomData))
    }
}

/// Writes `bytes` to `path` atomically: a crash leaves either the old or the new file.
///
/// The temporary is created new (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600): whatever is at
/// its name — a leftover of a crash, or a symbolic link planted to make walkie write
/// elsewhere — is removed (the link itself, never its target) and the create retried.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    crate::paths::create_private_dir(dir)?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = match files::create_new_private(&tmp, 0o600) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            log::warn!("removing a leftover {} before saving", tmp.display());
            fs::remove_file(&tmp)?;
            files::create_new_private(&tmp, 0o600)?
        }
        other => other?,
    };
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
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
        let mut moved = Vec::new();
        for content in [
            "{not json",
            r#"{"version": 0, "tasks": []}"#,
            r#"{"tasks": []}"#,
            r#"{"version":1,"tasks":[{"name":5}]}"#,
        ] {
            fs::write(&path, content).unwrap();
            let Loaded::MovedAside { moved_to, error } = load(&path).unwrap() else {
                panic!("{content} was accepted")
            };
            assert!(!path.exists());
            assert_eq!(fs::read_to_string(&moved_to).unwrap(), content, "{error}");
            moved.push((moved_to, content));
        }
        // All within the same second or not, every one is still there as it was.
        for (p, content) in moved {
            assert_eq!(fs::read_to_string(&p).unwrap(), content);
        }
    }

    #[test]
    fn a_newer_version_stops_the_start_and_stays_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // Its tasks need not parse as ours: the version decides first.
        let content = r#"{"tasks":[{"name":{"v2":"shape"}}],"version":2}"#;
        fs::write(&path, content).unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(
            error.contains("newer walkie") && error.contains("version 2"),
            "{error}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), content);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "nothing moved"
        );
    }

    #[test]
    fn fifos_devices_directories_and_huge_files_are_moved_aside_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let Loaded::MovedAside { error, moved_to } = load(&path).unwrap() else {
            panic!("a FIFO was read")
        };
        assert!(error.contains("FIFO"), "{error}");
        assert!(moved_to.exists() && !path.exists());
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let Loaded::MovedAside { error, .. } = load(&path).unwrap() else {
            panic!("/dev/zero was read")
        };
        assert!(error.contains("character device"), "{error}");
        // A sparse file larger than the cap: refused by its size, never read.
        let f = File::create(&path).unwrap();
        f.set_len(MAX_BYTES + 1).unwrap();
        let Loaded::MovedAside { error, moved_to } = load(&path).unwrap() else {
            panic!("a huge file was read")
        };
        assert!(error.contains("more than the 16 MB"), "{error}");
        assert_eq!(fs::metadata(moved_to).unwrap().len(), MAX_BYTES + 1);
    }

    fn task_json(i: usize) -> serde_json::Value {
        serde_json::json!({
            "name": format!("t{i}"), "id": format!("id{i}"), "state": "succeeded",
            "project": null, "prompt": "p", "cwd": "/tmp", "pid": null,
            "started_at": "2026-01-01T00:00:00Z", "ended_at": null, "exit_code": 0,
            "summary": null, "session_id": null
        })
    }

    #[test]
    fn a_long_registry_keeps_the_newest_tasks_and_the_whole_file_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let total = MAX_TASKS + 250;
        let tasks: Vec<_> = (0..total).map(task_json).collect();
        let content = serde_json::json!({"version": 1, "tasks": tasks}).to_string();
        fs::write(&path, &content).unwrap();
        let Loaded::Ok(state) = load(&path).unwrap() else {
            panic!("not loaded")
        };
        assert_eq!(state.tasks.len(), MAX_TASKS);
        assert_eq!(state.tasks[0].name, "t250");
        assert_eq!(state.tasks.last().unwrap().name, format!("t{}", total - 1));
        assert!(!path.exists(), "the whole file moved aside before any save");
        let aside: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(aside.len(), 1);
        assert!(
            aside[0]
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.full-"),
            "{:?}",
            aside[0].file_name()
        );
        assert_eq!(fs::read_to_string(aside[0].path()).unwrap(), content);
        // A file walkie could have written is read as it is and stays.
        let tasks: Vec<_> = (0..3).map(task_json).collect();
        fs::write(
            &path,
            serde_json::json!({"version": 1, "tasks": tasks}).to_string(),
        )
        .unwrap();
        let Loaded::Ok(state) = load(&path).unwrap() else {
            panic!("not loaded")
        };
        assert_eq!(state.tasks.len(), 3);
        assert!(path.exists());
    }

    #[test]
    fn a_planted_link_at_the_temporary_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let target = dir.path().join("precious");
        fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("state.json.tmp")).unwrap();
        write_atomic(&path, b"{\"version\":1}").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\"version\":1}");
        assert!(!dir.path().join("state.json.tmp").exists());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
