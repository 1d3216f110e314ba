//! The task-output writer thread (`walkie-writer`): every disk operation of the task
//! engine — log writes and their rotation, reading a finished task's log back, removing a
//! pruned task's directory or a finished run's TMPDIR — runs here, never on the loop.
//!
//! The loop hands over operations through a queue bounded in bytes ([`MAX_QUEUED`]): when
//! the disk cannot keep up (an SD card in the middle of an erase, a `discard`-mounted ext4
//! renaming a rotated log), log bytes are dropped and the caller counts them, so the loop
//! neither waits for the disk nor grows its memory. Everything else (notes, closes,
//! removals, reads) is small and always queued, in order: a read sees every write queued
//! before it. Results (log tails) come back with a wake-up of the loop.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::output::{CappedFile, FILE_CAP};

/// Log bytes waiting for the disk before more are dropped.
pub const MAX_QUEUED: usize = 4 * 1024 * 1024;
/// At shutdown, how long walkie waits for the queue to reach the disk. A disk that hangs
/// (a write in uninterruptible sleep) must not hang the exit: the logs lose their tail.
const FINISH_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Op {
    Append {
        path: Arc<Path>,
        data: Vec<u8>,
    },
    /// Close the files under this directory (the run is over).
    Close {
        dir: PathBuf,
    },
    RemoveAll {
        path: PathBuf,
    },
    ReadTail {
        path: PathBuf,
        max: u64,
        ticket: u64,
    },
    /// Blocks the worker until the sender speaks or goes (a stalled disk, in tests).
    #[cfg(test)]
    Stall(std::sync::mpsc::Receiver<()>),
}

/// What the writer hands back to the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// The text [`DiskWriter::read_tail`] asked for (empty when there is no file).
    Tail { ticket: u64, text: String },
}

#[derive(Default)]
struct Queue {
    ops: VecDeque<Op>,
    /// Log bytes in `ops`.
    bytes: usize,
    stop: bool,
    /// The worker wrote everything and returned.
    exited: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    done: Mutex<Vec<Done>>,
}

pub struct DiskWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl DiskWriter {
    pub fn start(waker: Arc<mio::Waker>) -> std::io::Result<DiskWriter> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            done: Mutex::new(Vec::new()),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("walkie-writer".into())
            .spawn(move || writer_worker(&worker, &waker))?;
        Ok(DiskWriter {
            shared,
            thread: Some(thread),
        })
    }

    /// Queues `bytes` for the end of the log at `path`. Returns false when they were
    /// dropped because [`MAX_QUEUED`] bytes are already waiting for the disk.
    pub fn append(&self, path: &Arc<Path>, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let mut q = lock(&self.shared.queue);
        if q.bytes + bytes.len() > MAX_QUEUED {
            return false;
        }
        q.bytes += bytes.len();
        q.ops.push_back(Op::Append {
            path: Arc::clone(path),
            data: bytes.to_vec(),
        });
        drop(q);
        self.shared.ready.notify_all();
        true
    }

    /// Like [`DiskWriter::append`], but never dropped: a short line walkie itself writes
    /// (a run's header, its outcome, how much was dropped).
    pub fn note(&self, path: &Arc<Path>, text: &str) {
        self.push(Op::Append {
            path: Arc::clone(path),
            data: text.as_bytes().to_vec(),
        });
    }

    /// Closes the files under `dir` once everything queued for them is written.
    pub fn close(&self, dir: PathBuf) {
        self.push(Op::Close { dir });
    }

    /// Removes `path` and everything under it.
    pub fn remove_all(&self, path: PathBuf) {
        self.push(Op::RemoveAll { path });
    }

    /// Reads the last `max` bytes of the (rotated) log at `path`, after every write queued
    /// before; the text comes back as [`Done::Tail`] with `ticket`.
    pub fn read_tail(&self, path: PathBuf, max: u64, ticket: u64) {
        self.push(Op::ReadTail { path, max, ticket });
    }

    /// What the writer finished since the last call.
    pub fn take_done(&self, out: &mut Vec<Done>) {
        out.append(&mut lock(&self.shared.done));
    }

    /// Writes what is queued, then stops the thread (at shutdown). Later operations are
    /// queued and never carried out.
    pub fn finish(&mut self) {
        self.stop();
    }

    fn push(&self, op: Op) {
        lock(&self.shared.queue).ops.push_back(op);
        self.shared.ready.notify_all();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let end = Instant::now() + FINISH_WAIT;
        let mut q = lock(&self.shared.queue);
        q.stop = true;
        self.shared.ready.notify_all();
        while !q.exited {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::error!(
                    "the disk did not take the task logs in {} s; {} queued operation(s) are lost",
                    FINISH_WAIT.as_secs(),
                    q.ops.len()
                );
                return; // the thread is left behind; the process exit ends it
            }
            q = self
                .shared
                .ready
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(q);
        let _ = thread.join();
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn writer_worker(shared: &Shared, waker: &mio::Waker) {
    let mut files: HashMap<Arc<Path>, CappedFile> = HashMap::new();
    loop {
        let op = {
            let mut q = lock(&shared.queue);
            loop {
                if let Some(op) = q.ops.pop_front() {
                    if let Op::Append { data, .. } = &op {
                        q.bytes = q.bytes.saturating_sub(data.len());
                    }
                    break op;
                }
                if q.stop {
                    q.exited = true;
                    // The same condvar tells `stop` (it waits only after setting `stop`).
                    shared.ready.notify_all();
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        match op {
            Op::Append { path, data } => files
                .entry(Arc::clone(&path))
                .or_insert_with(|| CappedFile::open(path.to_path_buf(), FILE_CAP))
                .write(&data),
            Op::Close { dir } => files.retain(|p, _| !p.starts_with(&dir)),
            Op::RemoveAll { path } => {
                files.retain(|p, _| !p.starts_with(&path));
                match std::fs::remove_dir_all(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
                }
            }
            Op::ReadTail { path, max, ticket } => {
                let text = super::output::read_tail(&path, max).unwrap_or_default();
                // Redacted here, off the loop: the file holds the agent's output as printed.
                let text = super::redact::redact_log(&text);
                lock(&shared.done).push(Done::Tail { ticket, text });
                let _ = waker.wake();
            }
            #[cfg(test)]
            Op::Stall(until) => {
                let _ = until.recv();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn writer() -> (mio::Poll, DiskWriter) {
        let poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(1)).unwrap());
        (poll, DiskWriter::start(waker).unwrap())
    }

    fn wait_tail(w: &DiskWriter, ticket: u64) -> String {
        let end = Instant::now() + Duration::from_secs(10);
        let mut done = Vec::new();
        while Instant::now() < end {
            w.take_done(&mut done);
            if let Some(Done::Tail { text, .. }) = done
                .iter()
                .find(|d| matches!(d, Done::Tail { ticket: t, .. } if *t == ticket))
            {
                return text.clone();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no tail {ticket}");
    }

    #[test]
    fn writes_reads_back_in_order_and_removes_off_the_caller_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (_poll, w) = writer();
        let log: Arc<Path> = Arc::from(dir.path().join("tasks/job/log.txt"));
        assert!(w.append(&log, b"one\n"));
        w.note(&log, "two\n");
        // A read queued after the writes sees them.
        w.read_tail(log.to_path_buf(), 1024, 7);
        assert_eq!(wait_tail(&w, 7), "one\ntwo\n");
        w.close(dir.path().join("tasks/job"));
        w.remove_all(dir.path().join("tasks/job"));
        w.read_tail(log.to_path_buf(), 1024, 8);
        assert_eq!(wait_tail(&w, 8), "");
        assert!(!dir.path().join("tasks/job").exists());
        let mut w = w;
        w.finish();
    }

    #[test]
    fn a_disk_that_cannot_keep_up_costs_dropped_bytes_not_memory() {
        let dir = tempfile::tempdir().unwrap();
        let (_poll, w) = writer();
        // The worker stalls as on a disk that does not answer.
        let (release, stalled) = std::sync::mpsc::channel::<()>();
        w.push(Op::Stall(stalled));
        let log: Arc<Path> = Arc::from(dir.path().join("log.txt"));
        let chunk = vec![b'x'; 64 * 1024];
        let accepted: Vec<bool> = (0..200).map(|_| w.append(&log, &chunk)).collect();
        let kept = accepted.iter().filter(|a| **a).count();
        assert_eq!(kept, MAX_QUEUED / chunk.len(), "the bound, then drops");
        assert!(!accepted[kept], "dropped once full");
        // Notes are never dropped, even now.
        w.note(&log, "[note]\n");
        release.send(()).unwrap();
        let mut w = w;
        w.finish();
        // (Exactly the cap was queued: the note rotated it to log.txt.1.)
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
        let rotated = dir.path().join("log.txt.1");
        assert_eq!(
            size(&log) + size(&rotated),
            kept * chunk.len() + "[note]\n".len()
        );
    }

    #[test]
    fn a_disk_that_hangs_does_not_hang_the_exit() {
        let (_poll, mut w) = writer();
        let (_release, stalled) = std::sync::mpsc::channel::<()>();
        w.push(Op::Stall(stalled));
        let t0 = Instant::now();
        w.finish();
        let waited = t0.elapsed();
        assert!(
            waited >= FINISH_WAIT && waited < FINISH_WAIT * 2,
            "{waited:?}"
        );
    }
}
