//! A task's agent output, kept bounded: a tail in memory and capped files on disk.
//!
//! On disk, `$XDG_STATE_HOME/walkie/tasks/<name>/` holds `stdout.jsonl` (the raw stream),
//! `stderr.log`, and `log.txt` (the human-readable rendering `walkie ctl logs` prints). Each
//! file rotates once to `<file>.1` when it reaches its cap, so a task never uses more than
//! twice the cap per file however much it prints. Write errors (disk full) are reported once
//! and then the file is skipped: a full disk must not stop the task or the daemon.
//!
//! The files hold unredacted agent output, so they are private whatever the umask: files
//! 0600, directories 0700, set explicitly, opened without following a symlink and refused
//! unless they are regular files of this user (files.rs). All of it runs on the
//! task-output writer thread (writer.rs), never on the poll loop.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Bytes of rendered output kept in memory per task.
pub const TAIL_BYTES: usize = 64 * 1024;
/// Per-file cap on disk before rotation.
pub const FILE_CAP: u64 = 4 * 1024 * 1024;

/// A byte-bounded tail of text.
#[derive(Debug, Default)]
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    /// Bytes ever pushed (lets followers know what they missed).
    total: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Tail {
        Tail {
            buf: VecDeque::new(),
            cap,
            total: 0,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The tail as text, starting at a line boundary when it was cut.
    pub fn text(&self) -> String {
        let (a, b) = self.buf.as_slices();
        let mut v = Vec::with_capacity(self.buf.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        let start = if self.total > self.buf.len() as u64 {
            v.iter().position(|&c| c == b'\n').map_or(0, |p| p + 1)
        } else {
            0
        };
        String::from_utf8_lossy(&v[start..]).into_owned()
    }
}

/// An append-only file that rotates to `<path>.1` at `cap` bytes.
#[derive(Debug)]
pub struct CappedFile {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    cap: u64,
    failed: bool,
}

impl CappedFile {
    pub fn open(path: PathBuf, cap: u64) -> CappedFile {
        let mut f = CappedFile {
            path,
            file: None,
            written: 0,
            cap,
            failed: false,
        };
        f.reopen();
        f
    }

    fn reopen(&mut self) {
        match open_log(&self.path) {
            Ok((file, len)) => {
                self.written = len;
                self.file = Some(file);
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: io::Error) {
        if !self.failed {
            log::warn!(
                "cannot write {}: {e}; output to it is dropped",
                self.path.display()
            );
        }
        self.failed = true;
        self.file = None;
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.written + bytes.len() as u64 > self.cap && self.written > 0 {
            let rotated = rotated_path(&self.path);
            self.file = None;
            if let Err(e) = std::fs::rename(&self.path, &rotated) {
                return self.fail(e);
            }
            self.reopen();
        }
        if let Some(file) = self.file.as_mut() {
            match file.write_all(bytes) {
                Ok(()) => self.written += bytes.len() as u64,
                Err(e) => self.fail(e),
            }
        }
    }
}

/// Opens (or creates) a log for appending: its directory 0700 and the file 0600 whatever
/// the umask, never through a symlink, only a regular file of this user (files.rs). Only
/// the writer thread writes it, so appending is writing at the end found here.
fn open_log(path: &Path) -> io::Result<(File, u64)> {
    if let Some(dir) = path.parent() {
        crate::files::ensure_private_dir(dir).map_err(io::Error::other)?;
    }
    let mut file = crate::files::open_private(path)?;
    let len = file.seek(SeekFrom::End(0))?;
    Ok((file, len))
}

fn rotated_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

/// The last `max` bytes of a rotated file pair (`<path>.1` then `<path>`), for `ctl logs`
/// of a task whose in-memory tail is gone (walkie restarted).
pub fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut out = Vec::new();
    for p in [rotated_path(path), path.to_path_buf()] {
        // Never a FIFO or a device (it would block the reader, or never end).
        let Ok((mut f, meta)) = crate::files::open_regular(&p) else {
            continue;
        };
        let len = meta.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        f.read_to_end(&mut out)?;
    }
    let cut = out.len().saturating_sub(max as usize);
    let mut text = &out[cut..];
    if cut > 0 {
        if let Some(p) = text.iter().position(|&c| c == b'\n') {
            text = &text[p + 1..];
        }
    }
    Ok(String::from_utf8_lossy(text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_bytes_from_a_line_start() {
        let mut t = Tail::new(10);
        t.push(b"first line\n");
        t.push(b"ab\ncd\n");
        assert_eq!(t.total(), 17);
        // The cut fell inside "line\n": the partial line is not shown.
        assert_eq!(t.text(), "ab\ncd\n");
        let mut small = Tail::new(100);
        small.push(b"x\ny");
        assert_eq!(small.text(), "x\ny");
        let mut huge = Tail::new(4);
        huge.push(&[b'z'; 1000]);
        assert_eq!(huge.buf.len(), 4);
    }

    #[test]
    fn capped_file_rotates_once_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.txt");
        let mut f = CappedFile::open(path.clone(), 100);
        for i in 0..100 {
            f.write(format!("line {i:04}\n").as_bytes());
        }
        let main = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(main <= 100 && old <= 100, "{main} {old}");
        let tail = read_tail(&path, 30).unwrap();
        assert!(tail.ends_with("line 0099\n"), "{tail}");
        assert!(
            tail.starts_with("line "),
            "starts at a line boundary: {tail}"
        );
    }

    #[test]
    fn files_are_private_whatever_the_umask_and_never_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // (The umask itself is process-wide: tests/tasks.rs runs the daemon under umask 000.)
        let log = dir.path().join("tasks/job/log.txt");
        CappedFile::open(log.clone(), 100).write(b"one\n");
        assert_eq!(mode(&log), 0o600);
        assert_eq!(mode(&dir.path().join("tasks/job")), 0o700);
        assert_eq!(mode(&dir.path().join("tasks")), 0o700);
        // A log left world-readable (by an older walkie under umask 000) is made private,
        // and appended to.
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
        CappedFile::open(log.clone(), 100).write(b"two\n");
        assert_eq!(mode(&log), 0o600);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "one\ntwo\n");
        // A symlink planted at the log's name is not followed.
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let link = dir.path().join("tasks/job/stdout.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut through_link = CappedFile::open(link, 100);
        through_link.write(b"overwritten");
        assert!(through_link.failed);
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        // Nor a FIFO: it would block the writer.
        let fifo = dir.path().join("tasks/job/stderr.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(CappedFile::open(fifo, 100).failed);
    }

    #[test]
    fn unwritable_file_is_skipped_not_fatal() {
        // A file where a directory should be: unwritable even for root.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let mut f = CappedFile::open(dir.path().join("file/x/log.txt"), 100);
        f.write(b"hello");
        assert!(f.failed);
    }
}
