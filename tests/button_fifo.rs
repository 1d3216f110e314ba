//! The button through the library with real fds: a `mio::Poll` loop drives `Button` over a
//! FIFO (and a socketpair) in a temp dir, writing `struct input_event` records as a device
//! would. The record bytes are built here by hand from the C layout, independently of the
//! library's encoder.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::{Events, Poll};
use walkie::button::{Button, ButtonEvent, ButtonStatus};
use walkie::config::{ButtonConfig, ButtonMode};

const KEY_F13: u16 = 183;
const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const EV_MSC: u16 = 4;
const SYN_REPORT: u16 = 0;
const SYN_DROPPED: u16 = 3;
const MSC_SCAN: u16 = 4;

const PRESSED: ButtonEvent = ButtonEvent::Pressed;
const RELEASED: ButtonEvent = ButtonEvent::Released { forced: false };
const FORCED: ButtonEvent = ButtonEvent::Released { forced: true };

/// Generous: the path watch and the reopen backoff take a few seconds at worst.
const PATIENCE: Duration = Duration::from_secs(15);

/// One `struct input_event`: a zero `struct timeval`, then type, code, value.
fn record(kind: u16, code: u16, value: i32) -> Vec<u8> {
    let timeval = size_of::<libc::input_event>() - 8;
    let mut bytes = vec![0u8; timeval];
    bytes.extend_from_slice(&kind.to_ne_bytes());
    bytes.extend_from_slice(&code.to_ne_bytes());
    bytes.extend_from_slice(&value.to_ne_bytes());
    bytes
}

/// What a keyboard sends for one key transition: scan code, key, report.
fn key(value: i32) -> Vec<u8> {
    [
        record(EV_MSC, MSC_SCAN, 0x70068),
        record(EV_KEY, KEY_F13, value),
        record(EV_SYN, SYN_REPORT, 0),
    ]
    .concat()
}

fn config(device: &str, mode: ButtonMode) -> ButtonConfig {
    ButtonConfig {
        device: device.into(),
        key: "KEY_F13".into(),
        mode,
        grab: true, // must be skipped for FIFOs and sockets, not fail them
        max_hold_s: 120,
    }
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(
        path,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
}

/// The daemon's loop in miniature.
struct Rig {
    poll: Poll,
    events: Events,
    button: Button,
    got: Vec<ButtonEvent>,
}

impl Rig {
    fn start(cfg: &ButtonConfig) -> Rig {
        let poll = Poll::new().unwrap();
        let mut button = Button::new(cfg).unwrap();
        button.start(poll.registry(), Instant::now());
        Rig {
            poll,
            events: Events::with_capacity(16),
            button,
            got: Vec::new(),
        }
    }

    /// One loop iteration: wait for readiness or the button's deadline (at most `max`).
    fn turn(&mut self, max: Duration) {
        let now = Instant::now();
        let timeout = self
            .button
            .next_deadline()
            .map_or(max, |d| d.saturating_duration_since(now).min(max));
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.events.clear(),
            Err(e) => panic!("poll: {e}"),
        }
        let now = Instant::now();
        for event in self.events.iter() {
            self.button.on_ready(self.poll.registry(), event, now);
        }
        self.button.on_timeout(self.poll.registry(), now);
        while let Some(event) = self.button.poll_event() {
            self.got.push(event);
        }
    }

    /// Runs the loop until `done` holds.
    fn wait_until(&mut self, what: &str, mut done: impl FnMut(&mut Rig) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events {:?}, status {:?}",
                self.got,
                self.button.status()
            );
            self.turn(Duration::from_millis(20));
        }
    }

    /// Runs the loop until exactly `expected` has arrived since the last call.
    fn expect(&mut self, expected: &[ButtonEvent]) {
        self.wait_until(&format!("{expected:?}"), |rig| {
            rig.got.len() >= expected.len()
        });
        assert_eq!(std::mem::take(&mut self.got), expected);
    }

    fn status(&self) -> ButtonStatus {
        self.button.status()
    }

    /// Opens the FIFO's write end, running the loop meanwhile: a non-blocking open fails
    /// with ENXIO until the button has a reader on it.
    fn open_writer(&mut self, path: &Path) -> File {
        let mut writer = None;
        self.wait_until("the FIFO to have a reader", |_| {
            writer = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .ok();
            writer.is_some()
        });
        writer.unwrap()
    }
}

fn fifo_rig(mode: ButtonMode) -> (tempfile::TempDir, PathBuf, Rig) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("button");
    mkfifo(&path);
    let rig = Rig::start(&config(path.to_str().unwrap(), mode));
    (dir, path, rig)
}

#[test]
fn fifo_down_and_up_press_and_release() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let status = rig.status();
    assert_eq!(status.state, "ok", "{status:?}");
    assert_eq!(status.device.as_deref(), path.to_str());
    let mut writer = rig.open_writer(&path);

    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
    assert!(rig.status().pressed);
    writer.write_all(&key(0)).unwrap();
    rig.expect(&[RELEASED]);
    assert!(!rig.status().pressed);
}

#[test]
fn repeats_and_other_keys_are_ignored() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    let burst = [
        key(1),
        key(2),
        key(2),
        key(2),
        record(EV_KEY, KEY_F13 + 1, 1), // KEY_F14
        record(EV_KEY, KEY_F13 + 1, 0),
        key(1), // a duplicate down
        key(0),
    ]
    .concat();
    writer.write_all(&burst).unwrap();
    rig.expect(&[PRESSED, RELEASED]);
}

#[test]
fn toggle_mode_over_a_fifo() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Toggle);
    let mut writer = rig.open_writer(&path);
    writer.write_all(&[key(1), key(0)].concat()).unwrap();
    rig.expect(&[PRESSED]);
    writer.write_all(&[key(1), key(0)].concat()).unwrap();
    rig.expect(&[RELEASED]);
}

#[test]
fn a_record_split_across_writes_is_reassembled() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    let down = key(1);
    let cut = down.len() / 3 + 5; // mid-way through the EV_KEY record
    writer.write_all(&down[..cut]).unwrap();
    // The data is already in the pipe, so this turn reads the partial record.
    rig.turn(Duration::from_secs(1));
    assert!(rig.got.is_empty());
    writer.write_all(&down[cut..]).unwrap();
    rig.expect(&[PRESSED]);
}

#[test]
fn syn_dropped_resyncs_a_fifo_as_key_up() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
    // The overflow ate the release; what follows up to SYN_REPORT is junk to discard.
    let dropped = [
        record(EV_SYN, SYN_DROPPED, 0),
        record(EV_KEY, KEY_F13, 1),
        record(EV_SYN, SYN_REPORT, 0),
    ]
    .concat();
    writer.write_all(&dropped).unwrap();
    rig.expect(&[RELEASED]);
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
}

#[test]
fn writer_closing_releases_the_key_and_a_new_writer_works() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
    drop(writer);
    rig.expect(&[FORCED]);
    assert_eq!(rig.status().state, "ok", "a FIFO is reopened at once");

    let mut writer = rig.open_writer(&path);
    writer.write_all(&[key(1), key(0)].concat()).unwrap();
    rig.expect(&[PRESSED, RELEASED]);
    drop(writer);

    // And once more, to show the reopened reader sees its own writer's close.
    let mut writer = rig.open_writer(&path);
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
    writer.write_all(&key(0)).unwrap();
    rig.expect(&[RELEASED]);
}

#[test]
fn fifo_removed_and_recreated_is_reopened() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);

    std::fs::remove_file(&path).unwrap();
    rig.wait_until("the button to notice the FIFO is gone", |rig| {
        rig.status().state != "ok"
    });
    let status = rig.status();
    let error = status.error.clone().unwrap_or_default();
    assert!(error.contains(path.to_str().unwrap()), "{status:?}");
    rig.expect(&[FORCED]);
    drop(writer);

    mkfifo(&path);
    let mut writer = rig.open_writer(&path);
    rig.wait_until("status ok", |rig| rig.status().state == "ok");
    assert_eq!(rig.status().error, None);
    writer.write_all(&[key(1), key(0)].concat()).unwrap();
    rig.expect(&[PRESSED, RELEASED]);
}

#[test]
fn a_missing_path_fails_then_is_picked_up_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later");
    let mut rig = Rig::start(&config(path.to_str().unwrap(), ButtonMode::Hold));
    let status = rig.status();
    assert_eq!(status.state, "failed");
    let error = status.error.unwrap();
    assert!(error.contains(path.to_str().unwrap()), "{error}");
    assert!(rig.button.next_deadline().is_some(), "a retry is scheduled");

    mkfifo(&path);
    let mut writer = rig.open_writer(&path);
    assert_eq!(rig.status().state, "ok");
    writer.write_all(&key(1)).unwrap();
    rig.expect(&[PRESSED]);
}

#[test]
fn a_socketpair_end_named_by_proc_self_fd() {
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let device = format!("/proc/self/fd/{}", theirs.as_raw_fd());
    let mut rig = Rig::start(&config(&device, ButtonMode::Hold));
    let status = rig.status();
    assert_eq!(status.state, "ok", "{status:?}");

    // Records split across writes, as a stream socket may deliver them.
    let press = [key(1), key(2)].concat();
    ours.write_all(&press[..7]).unwrap();
    ours.write_all(&press[7..]).unwrap();
    rig.expect(&[PRESSED]);

    // The peer going away is the device going away: forced release, then retries.
    drop(ours);
    rig.expect(&[FORCED]);
    let status = rig.status();
    assert_ne!(status.state, "ok");
    assert!(status.error.unwrap().contains("end of stream"));
    drop(theirs);
}

#[test]
fn device_none_is_disabled_and_ctl_press_works() {
    let mut rig = Rig::start(&config("none", ButtonMode::Hold));
    let status = rig.status();
    assert_eq!(status.state, "disabled");
    assert_eq!(status.error, None);
    assert_eq!(rig.button.next_deadline(), None);

    rig.button.press(Instant::now());
    rig.expect(&[PRESSED]);
    assert!(rig.status().pressed);
    rig.button.release(Instant::now());
    rig.expect(&[RELEASED]);
}

#[test]
fn ctl_press_and_the_fifo_drive_one_key() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let mut writer = rig.open_writer(&path);
    rig.button.press(Instant::now());
    rig.expect(&[PRESSED]);
    writer.write_all(&key(1)).unwrap();
    writer.write_all(&key(0)).unwrap();
    rig.expect(&[RELEASED]);
}

#[test]
fn stop_closes_the_fifo() {
    let (_dir, path, mut rig) = fifo_rig(ButtonMode::Hold);
    let writer = rig.open_writer(&path);
    rig.button.stop(rig.poll.registry());
    assert_eq!(rig.status().state, "disabled");
    // With the only reader closed, writing fails with EPIPE.
    let mut writer = writer;
    let err = writer.write_all(&key(1)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}
