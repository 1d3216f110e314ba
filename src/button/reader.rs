//! The button's fd: finding and opening the source, reading records off it, and noticing
//! when it goes away. Runs on the main thread; [`super::Button`] owns the one open device.
//!
//! A source is an evdev node (`/dev/input/eventN`), a FIFO or a socket carrying the same
//! `struct input_event` records. Only evdev nodes get the ioctls (grab, key state); the
//! others are assumed to start with the key up. Sockets cannot be opened by path, so a
//! `/proc/self/fd/N` (or `/dev/fd/N`) path naming one is duplicated instead.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Interest, Registry};
use serde::Serialize;

use super::keycodes;
use super::keys::KeyMachine;
use super::records::{RECORD_SIZE, RecordDecoder};
use super::select::{self, Candidate};
use crate::reactor::BUTTON;
use crate::sys::evdev::{self, KeySet};

/// Records read per `read(2)`; evdev hands out whole records only.
const READ_RECORDS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// An evdev node: ioctls work, `ENODEV` means unplugged.
    Evdev,
    /// A FIFO: EOF means its writer closed; reopening waits for the next one.
    Fifo,
    /// A socket (or another pollable stream): EOF is final for this fd.
    Socket,
}

/// Why a source could not be opened. The status shows the message; the caller retries with
/// backoff in every case, since each may be fixed without restarting walkie.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The path is missing, unreadable, or not a descriptor: wait for it to appear.
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    /// A character device that answers no evdev ioctl (a tty, /dev/zero): a config mistake.
    #[error("{} is not an input event device", path.display())]
    NotEvdev { path: PathBuf },
    /// A regular file, directory or block device: it cannot be polled.
    #[error("{} is not an input device, FIFO or socket", path.display())]
    Unsupported { path: PathBuf },
    /// `device = "auto"` found nothing: wait for the device to be plugged in.
    #[error("no input device has {key}{hint}")]
    NoDevice { key: String, hint: String },
    /// epoll refused the fd.
    #[error("cannot poll {}: {source}", path.display())]
    Register { path: PathBuf, source: io::Error },
}

/// How a stream of records ended.
#[derive(Debug)]
pub(super) enum StreamEnd {
    /// read() returned 0: the FIFO writer or the socket peer closed.
    Eof,
    /// read() failed; `ENODEV` is an unplugged device.
    Error(io::Error),
}

/// What one readiness drain found.
#[derive(Debug)]
pub(super) struct Drained {
    /// Some bytes arrived: the source works (resets the reopen backoff).
    pub got_data: bool,
    /// The source is done; close it.
    pub end: Option<StreamEnd>,
}

/// An open, possibly registered, source of records.
#[derive(Debug)]
pub(super) struct OpenDevice {
    file: File,
    path: PathBuf,
    kind: Kind,
    /// EVIOCGNAME, for logs.
    name: Option<String>,
    /// (st_dev, st_ino) of the path when opened; `None` for a duplicated descriptor.
    identity: Option<(u64, u64)>,
    decoder: RecordDecoder,
    registered: bool,
}

impl OpenDevice {
    /// Opens `path` (no registration yet). `grab` applies to evdev nodes only.
    pub fn open(path: &Path, key: u16, grab: bool) -> Result<OpenDevice, OpenError> {
        let (file, by_path) = open_file(path)?;
        let meta = file.metadata().map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        let file_type = meta.file_type();
        let kind = if file_type.is_char_device() {
            Kind::Evdev
        } else if file_type.is_fifo() {
            Kind::Fifo
        } else if file_type.is_socket() {
            Kind::Socket
        } else {
            return Err(OpenError::Unsupported {
                path: path.to_owned(),
            });
        };
        let mut name = None;
        if kind == Kind::Evdev {
            match evdev::has_key(file.as_fd(), key) {
                Err(_) => {
                    return Err(OpenError::NotEvdev {
                        path: path.to_owned(),
                    });
                }
                Ok(false) => warn!(
                    "button: {} does not list {} among its keys; reading it anyway",
                    path.display(),
                    keycodes::describe(key)
                ),
                Ok(true) => {}
            }
            name = evdev::device_name(file.as_fd()).ok();
            if grab && let Err(e) = evdev::grab(file.as_fd(), true) {
                // EBUSY: another program grabbed it first; key presses still arrive here.
                warn!("button: cannot grab {}: {e}", path.display());
            }
        }
        Ok(OpenDevice {
            file,
            path: path.to_owned(),
            kind,
            name,
            identity: by_path.then(|| (meta.dev(), meta.ino())),
            decoder: RecordDecoder::default(),
            registered: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Takes or gives back exclusive use (evdev only); a refusal is logged, not fatal.
    pub fn set_grab(&self, grab: bool) {
        if self.kind == Kind::Evdev
            && let Err(e) = evdev::grab(self.file.as_fd(), grab)
        {
            warn!(
                "button: cannot {} {}: {e}",
                if grab { "grab" } else { "release the grab on" },
                self.path.display()
            );
        }
    }

    /// For a watched device (`auto`): reads until `WouldBlock` and says whether `key` went
    /// down in what was read. Nothing else in its records matters.
    pub fn drain_for_press(&mut self, key: u16) -> (Drained, bool) {
        let mut buf = [0u8; RECORD_SIZE * READ_RECORDS];
        let mut pressed = false;
        let mut got_data = false;
        loop {
            let end = match self.file.read(&mut buf) {
                Ok(0) => Some(StreamEnd::Eof),
                Ok(n) => {
                    got_data = true;
                    self.decoder.feed(&buf[..n], |record| {
                        pressed |= record.kind == super::keys::EV_KEY
                            && record.code == key
                            && record.value == 1;
                    });
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Some(StreamEnd::Error(e)),
            };
            return (Drained { got_data, end }, pressed);
        }
    }

    /// Whether `key` is down right now; only an evdev node can say, others start up.
    pub fn key_down(&self, key: u16) -> bool {
        self.kind == Kind::Evdev && evdev::key_is_down(self.file.as_fd(), key).unwrap_or(false)
    }

    pub fn register(&mut self, registry: &Registry) -> Result<(), OpenError> {
        registry
            .register(
                &mut SourceFd(&self.file.as_raw_fd()),
                BUTTON,
                Interest::READABLE,
            )
            .map_err(|source| OpenError::Register {
                path: self.path.clone(),
                source,
            })?;
        self.registered = true;
        Ok(())
    }

    /// Deregisters (if registered) and closes the fd, which also ends a grab.
    pub fn close(mut self, registry: &Registry) {
        if self.registered {
            self.registered = false;
            if let Err(e) = registry.deregister(&mut SourceFd(&self.file.as_raw_fd())) {
                debug!("button: deregister {}: {e}", self.path.display());
            }
        }
    }

    /// Reads until `WouldBlock` (mio is edge-triggered), feeding each record to `keys`.
    /// After a `SYN_DROPPED` batch the key's real state comes from EVIOCGKEY.
    pub fn do_read(&mut self, keys: &mut KeyMachine, key: u16, now: Instant) -> Drained {
        let mut buf = [0u8; RECORD_SIZE * READ_RECORDS];
        let mut got_data = false;
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => {
                    return Drained {
                        got_data,
                        end: Some(StreamEnd::Eof),
                    };
                }
                Ok(n) => {
                    got_data = true;
                    let (file, kind) = (&self.file, self.kind);
                    self.decoder.feed(&buf[..n], |record| {
                        keys.handle_record(now, record);
                        if keys.wants_resync() {
                            let down = kind == Kind::Evdev
                                && evdev::key_is_down(file.as_fd(), key).unwrap_or(false);
                            debug!("button: events dropped; key is {}", updown(down));
                            keys.handle_resync(now, down);
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Drained {
                        got_data,
                        end: None,
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Drained {
                        got_data,
                        end: Some(StreamEnd::Error(e)),
                    };
                }
            }
        }
    }

    /// `Err(reason)` when the path no longer leads to the open file: removed, or replaced
    /// (a FIFO deleted and re-created, a node re-created by udev).
    pub fn check_path(&self) -> Result<(), String> {
        let Some(identity) = self.identity else {
            return Ok(());
        };
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == identity => Ok(()),
            Ok(_) => Err(format!("{} was replaced", self.path.display())),
            Err(e) => Err(format!("{} vanished: {e}", self.path.display())),
        }
    }
}

fn updown(down: bool) -> &'static str {
    if down { "down" } else { "up" }
}

/// `O_RDONLY | O_NONBLOCK | O_CLOEXEC` (std adds the last).
struct OpenOptionsNonBlocking;

impl OpenOptionsNonBlocking {
    fn open(path: &Path) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    }
}

/// Opens `path`; returns whether the result still corresponds to the path (false for a
/// duplicated socket descriptor).
fn open_file(path: &Path) -> Result<(File, bool), OpenError> {
    let open_error = |source| OpenError::Open {
        path: path.to_owned(),
        source,
    };
    match OpenOptionsNonBlocking::open(path) {
        Ok(file) => Ok((file, true)),
        // open(2) on a socket is ENXIO; a descriptor path can still be duplicated.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            let Some(number) = fd_number(path) else {
                return Err(open_error(e));
            };
            let fd: OwnedFd = evdev::dup_fd_number(number).map_err(open_error)?;
            let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
                .map_err(|e| open_error(e.into()))?;
            let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
                .map_err(|e| open_error(e.into()))?;
            Ok((File::from(fd), false))
        }
        Err(e) => Err(open_error(e)),
    }
}

/// N for `/proc/self/fd/N` or `/dev/fd/N`.
fn fd_number(path: &Path) -> Option<i32> {
    let text = path.to_str()?;
    let number = text
        .strip_prefix("/proc/self/fd/")
        .or_else(|| text.strip_prefix("/dev/fd/"))?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

/// `dir/eventN` paths, ordered by N (event10 after event9).
fn event_nodes(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut nodes: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let number = name.to_str()?.strip_prefix("event")?.parse().ok()?;
            Some((number, entry.path()))
        })
        .collect();
    nodes.sort();
    nodes.into_iter().map(|(_, path)| path).collect()
}

/// What `auto` found under the input directory.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The devices that have the key, in event number order.
    pub candidates: Vec<Candidate>,
    /// Event nodes looked at.
    pub nodes: usize,
    /// Of those, how many could not be opened for lack of permission.
    pub unreadable: usize,
}

impl Scan {
    /// The error when no device has the key, with a hint at the likely cause.
    pub fn no_device(&self, dir: &Path, key: u16) -> OpenError {
        let hint = if self.nodes == 0 {
            format!(" ({} has no event devices)", dir.display())
        } else if self.unreadable > 0 {
            format!(
                " ({} of {} under {} not readable: add the user to the \"input\" group)",
                self.unreadable,
                self.nodes,
                dir.display()
            )
        } else {
            String::new()
        };
        OpenError::NoDevice {
            key: keycodes::describe(key),
            hint,
        }
    }
}

/// Describes every event node under `dir` that can send `key`, for [`select::choose`].
pub(super) fn scan(dir: &Path, key: u16) -> Scan {
    let mut scan = Scan::default();
    for path in event_nodes(dir) {
        scan.nodes += 1;
        match OpenOptionsNonBlocking::open(&path) {
            Ok(file) => {
                let Ok(keys) = evdev::supported_keys(file.as_fd()) else {
                    continue;
                };
                if keys.contains(key) {
                    let name = evdev::device_name(file.as_fd()).unwrap_or_default();
                    scan.candidates.push(Candidate::new(path, name, &keys));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => scan.unreadable += 1,
            Err(e) => debug!("button: skipping {}: {e}", path.display()),
        }
    }
    scan
}

/// The event nodes under `dir` with their inode numbers: when this changes, devices came,
/// went or were re-created.
pub(super) fn node_identities(dir: &Path) -> Vec<(PathBuf, u64)> {
    event_nodes(dir)
        .into_iter()
        .filter_map(|path| {
            let ino = std::fs::symlink_metadata(&path).ok()?.ino();
            Some((path, ino))
        })
        .collect()
}

/// One `/dev/input/event*` node, for `walkie devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputDevice {
    pub path: PathBuf,
    /// The device's name (EVIOCGNAME); `None` when it could not be opened or asked.
    pub name: Option<String>,
    /// Whether it can send the key asked about; `None` when no key was asked or the device
    /// could not be asked.
    pub has_key: Option<bool>,
    /// Why the node could not be read (e.g. permission denied).
    pub error: Option<String>,
    /// How many keys it has; `None` when it could not be asked.
    pub key_count: Option<usize>,
    /// It has the letter keys A–Z; `None` when it could not be asked.
    pub full_keyboard: Option<bool>,
}

/// The event nodes under `dir`, described.
pub(super) fn list_devices_in(dir: &Path, key: Option<u16>) -> Vec<InputDevice> {
    event_nodes(dir)
        .into_iter()
        .map(|path| match OpenOptionsNonBlocking::open(&path) {
            Ok(file) => {
                let name = evdev::device_name(file.as_fd());
                let error = name
                    .as_ref()
                    .err()
                    .map(|e| format!("not an input device: {e}"));
                let keys = evdev::supported_keys(file.as_fd()).ok();
                InputDevice {
                    name: name.ok(),
                    has_key: key.and_then(|k| Some(keys.as_ref()?.contains(k))),
                    error,
                    key_count: keys.as_ref().map(KeySet::len),
                    full_keyboard: keys.as_ref().map(select::is_full_keyboard),
                    path,
                }
            }
            Err(e) => InputDevice {
                name: None,
                has_key: None,
                error: Some(e.to_string()),
                key_count: None,
                full_keyboard: None,
                path,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_paths_are_recognised() {
        assert_eq!(fd_number(Path::new("/proc/self/fd/7")), Some(7));
        assert_eq!(fd_number(Path::new("/dev/fd/12")), Some(12));
        assert_eq!(fd_number(Path::new("/proc/self/fd/")), None);
        assert_eq!(fd_number(Path::new("/proc/self/fd/1x")), None);
        assert_eq!(fd_number(Path::new("/dev/input/event1")), None);
    }

    #[test]
    fn event_nodes_sort_by_number_and_skip_others() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["event10", "event2", "event1", "mouse0", "eventX", "by-id"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let names: Vec<String> = event_nodes(dir.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["event1", "event2", "event10"]);
        assert!(event_nodes(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn regular_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records");
        let down = crate::button::records::InputRecord::new(1, 183, 1);
        std::fs::write(&path, down.to_bytes()).unwrap();
        let err = OpenDevice::open(&path, 183, false).unwrap_err();
        assert!(matches!(err, OpenError::Unsupported { .. }), "{err}");
    }

    #[test]
    fn a_char_device_that_is_not_evdev_is_refused() {
        let err = OpenDevice::open(Path::new("/dev/null"), 183, true).unwrap_err();
        assert!(matches!(err, OpenError::NotEvdev { .. }), "{err}");
        assert_eq!(err.to_string(), "/dev/null is not an input event device");
    }

    #[test]
    fn missing_path_names_the_path_and_the_reason() {
        let err = OpenDevice::open(Path::new("/nonexistent/button"), 183, false).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("cannot open /nonexistent/button: "),
            "{text}"
        );
    }

    #[test]
    fn scan_skips_non_evdev_nodes_and_says_what_it_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("event0"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let found = scan(dir.path(), 183);
        assert!(found.candidates.is_empty());
        assert_eq!((found.nodes, found.unreadable), (1, 0));
        assert_eq!(
            found.no_device(dir.path(), 183).to_string(),
            "no input device has KEY_F13"
        );
        let empty = tempfile::tempdir().unwrap();
        let found = scan(empty.path(), 0x110);
        assert_eq!(
            found.no_device(empty.path(), 0x110).to_string(),
            format!(
                "no input device has BTN_LEFT ({} has no event devices)",
                empty.path().display()
            )
        );
        let unreadable = Scan {
            nodes: 3,
            unreadable: 2,
            ..Scan::default()
        };
        assert_eq!(
            unreadable
                .no_device(Path::new("/dev/input"), 183)
                .to_string(),
            "no input device has KEY_F13 (2 of 3 under /dev/input not readable: add the user \
             to the \"input\" group)"
        );
    }

    #[test]
    fn node_identities_change_when_a_node_is_re_created() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("event1");
        std::fs::write(&node, b"").unwrap();
        let before = node_identities(dir.path());
        assert_eq!(before.len(), 1);
        assert_eq!(node_identities(dir.path()), before);
        let keep = dir.path().join("keep"); // holds the inode so it is not reused
        std::fs::rename(&node, &keep).unwrap();
        std::fs::write(&node, b"").unwrap();
        assert_ne!(node_identities(dir.path()), before);
    }

    #[test]
    fn list_describes_unreadable_and_non_input_nodes() {
        let dir = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&dir.path().join("event3"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("event1")).unwrap();
        let list = list_devices_in(dir.path(), Some(183));
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].path, dir.path().join("event1"));
        assert!(list[0].error.is_some());
        assert_eq!(list[0].name, None);
        assert_eq!(list[1].path, dir.path().join("event3"));
        assert_eq!(list[1].has_key, None, "a FIFO cannot be asked");
        assert!(
            list[1]
                .error
                .as_deref()
                .unwrap()
                .starts_with("not an input device")
        );
    }
}
