//! `walkie button learn`: "press the key you want to use" → which device and which key, as
//! the two `[button]` lines to paste.
//!
//! A foreground command, never in the daemon: it opens every readable `/dev/input/event*`
//! node (or the one `--device` names: a node, or a FIFO of records as the tests use), waits
//! in `poll(2)` for the first key press on any of them, and decodes what it reads with the
//! same [`RecordDecoder`] the daemon's button reader uses. Releases, repeats and non-key
//! events are ignored. Devices are named by their stable `/dev/input/by-id/` (or
//! `by-path/`) link when there is one.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::records::{InputRecord, RecordDecoder};

const EV_KEY: u16 = 1;

/// What `learn` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Learned {
    /// The stable name of the device (a by-id or by-path link when there is one).
    pub device: PathBuf,
    /// The device's own name (EVIOCGNAME), for nodes.
    pub name: Option<String>,
    pub code: u16,
}

/// Why nothing was learned.
#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    /// No device could be opened: the caller prints the reasons and the input-group fix.
    #[error("no input device could be opened{}", list(.0))]
    NothingReadable(Vec<String>),
    /// Nothing was pressed in time.
    #[error("no key was pressed in {0} s")]
    TimedOut(u64),
    /// `poll` itself failed.
    #[error("waiting for input failed: {0}")]
    Poll(#[from] nix::Error),
}

fn list(reasons: &[String]) -> String {
    if reasons.is_empty() {
        String::new()
    } else {
        format!(": {}", reasons.join("; "))
    }
}

struct Source {
    path: PathBuf,
    file: File,
    decoder: RecordDecoder,
}

/// Opens the sources: `device` alone, or every `event*` node of `dir`. Returns them and the
/// reasons the others could not be opened.
fn open_sources(device: Option<&Path>, dir: &Path) -> (Vec<Source>, Vec<String>) {
    let paths: Vec<PathBuf> = match device {
        Some(path) => vec![path.to_path_buf()],
        None => event_nodes(dir),
    };
    let (mut sources, mut failures) = (Vec::new(), Vec::new());
    for path in paths {
        let fifo = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_fifo());
        // A FIFO is opened read-write so it never reports end-of-file between writers.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(fifo)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path);
        match opened {
            Ok(file) => sources.push(Source {
                path,
                file,
                decoder: RecordDecoder::default(),
            }),
            Err(e) => failures.push(format!("{}: {e}", path.display())),
        }
    }
    (sources, failures)
}

/// `event<N>` nodes of `dir`, by number.
fn event_nodes(dir: &Path) -> Vec<PathBuf> {
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let n = e
                        .file_name()
                        .to_str()?
                        .strip_prefix("event")?
                        .parse()
                        .ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes.into_iter().map(|(_, p)| p).collect()
}

/// Waits up to `timeout` for the first key press on `device` (or any node of `dir`).
/// `on_ready` is called once the sources are open, with how many there are and the ones that
/// could not be opened (the caller prints the prompt then).
pub fn learn(
    device: Option<&Path>,
    dir: &Path,
    timeout: Duration,
    on_ready: impl FnOnce(usize, &[String]),
) -> Result<Learned, LearnError> {
    let (mut sources, failures) = open_sources(device, dir);
    if sources.is_empty() {
        return Err(LearnError::NothingReadable(failures));
    }
    on_ready(sources.len(), &failures);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 64 * super::records::RECORD_SIZE];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LearnError::TimedOut(timeout.as_secs()));
        }
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = sources
                .iter()
                .map(|s| PollFd::new(s.file.as_fd(), PollFlags::POLLIN))
                .collect();
            let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32)
                .unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, ms) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let mut gone = Vec::new();
        for (i, source) in sources.iter_mut().enumerate().filter(|(i, _)| ready[*i]) {
            match source.file.read(&mut buf) {
                // A device unplugged while we wait: forget it.
                Ok(0) => gone.push(i),
                Ok(n) => {
                    let mut pressed = None;
                    source.decoder.feed(&buf[..n], |r: InputRecord| {
                        if pressed.is_none() && r.kind == EV_KEY && r.value == 1 {
                            pressed = Some(r.code);
                        }
                    });
                    if let Some(code) = pressed {
                        return Ok(Learned {
                            device: stable_name(&source.path, dir),
                            name: device_name(source.file.as_fd()),
                            code,
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => gone.push(i),
            }
        }
        for i in gone.into_iter().rev() {
            sources.remove(i);
        }
        if sources.is_empty() {
            return Err(LearnError::NothingReadable(vec![
                "every device went away".into(),
            ]));
        }
    }
}

fn device_name(fd: BorrowedFd<'_>) -> Option<String> {
    crate::sys::evdev::device_name(fd)
        .ok()
        .filter(|n| !n.is_empty())
}

/// A `by-id` (else `by-path`) link under `dir` that resolves to `node`, else `node`: the
/// `eventN` numbers change between boots and plug-ins, those links do not.
fn stable_name(node: &Path, dir: &Path) -> PathBuf {
    let Ok(target) = node.canonicalize() else {
        return node.to_path_buf();
    };
    for sub in ["by-id", "by-path"] {
        let mut links: Vec<PathBuf> = std::fs::read_dir(dir.join(sub))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        links.sort();
        if let Some(link) = links
            .into_iter()
            .find(|l| l.canonicalize().is_ok_and(|t| t == target))
        {
            return link;
        }
    }
    node.to_path_buf()
}

/// The report: what was pressed, and the two lines for `[button]`.
pub fn report(learned: &Learned, config_file: &Path) -> String {
    let key = super::keycodes::key_name(learned.code)
        .map(str::to_string)
        .unwrap_or_else(|| learned.code.to_string());
    let name = learned
        .name
        .as_deref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    format!(
        "pressed {key} (code {code}) on {device}{name}\n\
         put these two lines under [button] in {config}:\n\
         device = \"{device}\"\n\
         key = \"{key}\"\n",
        code = learned.code,
        device = learned.device.display(),
        config = config_file.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_first_press_on_any_source_wins_and_the_rest_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for n in [0, 1] {
            nix::unistd::mkfifo(
                &dir.path().join(format!("event{n}")),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .unwrap();
        }
        std::fs::create_dir(dir.path().join("by-id")).unwrap();
        std::os::unix::fs::symlink("../event1", dir.path().join("by-id/usb-Pedal-event-kbd"))
            .unwrap();
        let writer_dir = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(writer_dir.join("event1"))
                .unwrap();
            // Noise first: a sync, a release, a repeat, a relative motion; then half a record.
            let mut bytes = Vec::new();
            for r in [
                InputRecord::new(0, 0, 0),
                InputRecord::new(EV_KEY, 30, 0),
                InputRecord::new(EV_KEY, 30, 2),
                InputRecord::new(2, 0, 5),
                InputRecord::new(EV_KEY, 48, 1),
            ] {
                bytes.extend_from_slice(&r.to_bytes());
            }
            let (head, tail) = bytes.split_at(bytes.len() - 10);
            f.write_all(head).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            f.write_all(tail).unwrap();
        });
        let mut seen = 0;
        let learned = learn(None, dir.path(), Duration::from_secs(20), |n, _| seen = n).unwrap();
        writer.join().unwrap();
        assert_eq!(seen, 2);
        assert_eq!(learned.code, 48);
        assert_eq!(learned.device, dir.path().join("by-id/usb-Pedal-event-kbd"));
        let text = report(&learned, Path::new("/home/pi/.config/walkie/config.toml"));
        assert!(text.starts_with("pressed KEY_B (code 48) on "), "{text}");
        assert!(text.ends_with(&format!(
            "device = \"{}\"\nkey = \"KEY_B\"\n",
            dir.path().join("by-id/usb-Pedal-event-kbd").display()
        )));
    }

    #[test]
    fn nothing_readable_and_nothing_pressed_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            learn(None, dir.path(), Duration::from_millis(10), |_, _| {}),
            Err(LearnError::NothingReadable(reasons)) if reasons.is_empty()
        ));
        let missing = dir.path().join("nope");
        let err = learn(
            Some(&missing),
            dir.path(),
            Duration::from_millis(10),
            |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            learn(
                Some(&fifo),
                dir.path(),
                Duration::from_millis(200),
                |_, _| {}
            ),
            Err(LearnError::TimedOut(_))
        ));
    }
}
