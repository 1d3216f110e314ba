//! The push-to-talk button: owns the button fd (token [`crate::reactor::BUTTON`]) on the main
//! thread, turns its `input_event` records into [`ButtonEvent`]s, and keeps the device
//! attached across unplugs, FIFO writers coming and going, and paths re-created.
//!
//! Layers: [`records`] decodes the byte stream, [`keys`] is the sans-IO key state machine
//! (all the press/release policy), `reader` owns the fd, and [`Button`] ties them to the
//! poll loop: open/reopen with backoff, status, timers. `walkie ctl press|release` feed the
//! same state machine, so they work with `device = "none"` too.

pub mod keycodes;
pub mod keys;
pub mod learn;
mod reader;
pub mod records;
pub mod select;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::Registry;
use mio::event::Event;
use serde::Serialize;

use crate::config::ButtonConfig;
use crate::reactor::BUTTON;

pub use keys::ButtonEvent;
pub use reader::InputDevice;

use keys::{EV_KEY, KeyMachine};
use reader::{Kind, OpenDevice, StreamEnd};
use records::InputRecord;
use select::Candidate;

/// Where `device = "auto"` looks, and what `walkie devices` lists.
const INPUT_DIR: &str = "/dev/input";
/// First reopen delay after a failure; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an open path is checked for having been removed or replaced: a FIFO deleted
/// under an idle reader gives no readiness at all, so only a look at the path notices.
/// With `auto`, also how often the input directory is looked at for devices that came or
/// went (a better device plugged in takes over the button).
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A configuration the button cannot work with; `walkie run` and `walkie config check`
/// report it and exit 2.
#[derive(Debug, thiserror::Error)]
pub enum ButtonError {
    /// `button.key` is neither a known `KEY_*`/`BTN_*` name nor a code 1..=767: fix the config.
    #[error(
        "button.key: unknown key {0:?} (use a KEY_*/BTN_* name from linux/input-event-codes.h, \
         as `walkie devices` or evtest show them, or a key code from 1 to 767)"
    )]
    UnknownKey(String),
    /// `button.device` is empty: fix the config (a path, "auto" or "none").
    #[error("button.device is empty (use an input device path, \"auto\" or \"none\")")]
    EmptyDevice,
}

/// The button's health for `walkie ctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ButtonStatus {
    /// `ok`, `opening` (not open yet, or lost and about to retry), `failed` (the last open
    /// attempt failed; retrying) or `disabled` (`device = "none"`, or stopped).
    pub state: &'static str,
    /// What is wrong, when something is.
    pub error: Option<String>,
    /// The path being read (or tried).
    pub device: Option<String>,
    /// The device's name (EVIOCGNAME), when it is an input device.
    pub name: Option<String>,
    /// With `device = "auto"`: why this device was chosen.
    pub chosen: Option<String>,
    /// A talk is in progress.
    pub pressed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DeviceSpec {
    None,
    Auto,
    Path(PathBuf),
}

/// The fd's lifecycle.
#[derive(Debug)]
enum Link {
    /// Before [`Button::start`].
    NotStarted,
    /// `device = "none"`, or after [`Button::stop`].
    Disabled,
    Open {
        device: OpenDevice,
        watch_at: Instant,
    },
    /// Waiting to (re)open. `failed`: the last attempt failed (else the device was lost).
    Waiting {
        retry_at: Instant,
        failed: bool,
        error: String,
    },
}

/// What `device = "auto"` keeps beside the open device (see [`select`]).
#[derive(Debug, Default)]
struct Auto {
    /// The other devices of the chosen one's kind that have the key, open without a grab:
    /// the key going down on one of them makes it the button.
    watchers: Vec<OpenDevice>,
    /// The devices with the key at the last choice, and why the open one was chosen.
    candidates: Vec<Candidate>,
    reason: Option<String>,
    /// The device the key was last pressed on.
    last_pressed: Option<PathBuf>,
    /// The event nodes at the last choice; when they change, the choice is made again.
    nodes: Vec<(PathBuf, u64)>,
}

/// The push-to-talk button.
#[derive(Debug)]
pub struct Button {
    spec: DeviceSpec,
    key: u16,
    grab: bool,
    keys: KeyMachine,
    link: Link,
    backoff: Duration,
    input_dir: PathBuf,
    auto: Auto,
    /// The last problem logged, so a retry that fails the same way every few seconds logs
    /// at debug level instead of filling the journal.
    last_logged: Option<String>,
}

impl Button {
    /// Checks the configuration; opens nothing yet.
    pub fn new(cfg: &ButtonConfig) -> Result<Button, ButtonError> {
        let key = keycodes::parse_key(&cfg.key)
            .ok_or_else(|| ButtonError::UnknownKey(cfg.key.clone()))?;
        let spec = match cfg.device.trim() {
            "" => return Err(ButtonError::EmptyDevice),
            "none" => DeviceSpec::None,
            "auto" => DeviceSpec::Auto,
            path => DeviceSpec::Path(PathBuf::from(path)),
        };
        let max_hold = Duration::from_secs(u64::from(cfg.max_hold_s));
        Ok(Button {
            spec,
            key,
            grab: cfg.grab,
            keys: KeyMachine::new(key, cfg.mode, Some(max_hold)),
            link: Link::NotStarted,
            backoff: BACKOFF_MIN,
            input_dir: PathBuf::from(INPUT_DIR),
            auto: Auto::default(),
            last_logged: None,
        })
    }

    /// The configured key code.
    pub fn key(&self) -> u16 {
        self.key
    }

    /// Opens the device and registers it with [`BUTTON`]. Never fails: a problem shows in
    /// [`Button::status`] and the open is retried from [`Button::on_timeout`].
    pub fn start(&mut self, registry: &Registry, now: Instant) {
        if !matches!(self.link, Link::NotStarted | Link::Disabled) {
            return;
        }
        if self.spec == DeviceSpec::None {
            info!("button: no device (device = \"none\"); `walkie ctl press|release` still work");
            self.link = Link::Disabled;
            return;
        }
        self.open(registry, now, false);
    }

    /// Readiness on [`BUTTON`]; other tokens are ignored.
    pub fn on_ready(&mut self, registry: &Registry, event: &Event, now: Instant) {
        if event.token() != BUTTON {
            return;
        }
        self.drain_watchers(registry, now);
        let Link::Open { device, .. } = &mut self.link else {
            return; // a stale event for an fd already closed
        };
        let was_pressed = self.keys.is_pressed();
        let drained = device.do_read(&mut self.keys, self.key, now);
        if self.spec == DeviceSpec::Auto && !was_pressed && self.keys.is_pressed() {
            self.auto.last_pressed = Some(device.path().to_owned());
        }
        if drained.got_data {
            self.backoff = BACKOFF_MIN;
        }
        match drained.end {
            None => {}
            Some(StreamEnd::Eof) if device.kind() == Kind::Fifo => {
                // The writer closed. Reopen at once: the next writer's open(2) blocks until
                // a reader exists, and a fresh reader sees no stale hang-up.
                debug!(
                    "button: {} writer closed; reopening",
                    device.path().display()
                );
                self.close(registry);
                self.open(registry, now, true);
            }
            Some(StreamEnd::Eof) => self.lose(registry, now, "end of stream".into()),
            Some(StreamEnd::Error(e)) if e.raw_os_error() == Some(libc::ENODEV) => {
                self.lose(registry, now, "device unplugged".into());
            }
            Some(StreamEnd::Error(e)) => self.lose(registry, now, format!("read failed: {e}")),
        }
    }

    /// Timers: `max_hold_s`, reopen retries, the path watch.
    pub fn on_timeout(&mut self, registry: &Registry, now: Instant) {
        self.keys.handle_timeout(now);
        match &mut self.link {
            Link::Waiting { retry_at, .. } if *retry_at <= now => self.open(registry, now, false),
            Link::Open { device, watch_at } if *watch_at <= now => match device.check_path() {
                Ok(()) => {
                    *watch_at = now + WATCH_INTERVAL;
                    if self.spec == DeviceSpec::Auto {
                        self.rescan(registry, now);
                    }
                }
                Err(reason) => self.lose(registry, now, reason),
            },
            _ => {}
        }
    }

    /// When [`Button::on_timeout`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let link = match &self.link {
            Link::Open { watch_at, .. } => Some(*watch_at),
            Link::Waiting { retry_at, .. } => Some(*retry_at),
            Link::NotStarted | Link::Disabled => None,
        };
        crate::reactor::earliest([self.keys.poll_timeout(), link])
    }

    pub fn poll_event(&mut self) -> Option<ButtonEvent> {
        self.keys.poll_event()
    }

    /// `walkie ctl press`: the same state machine as the key going down (in toggle mode it
    /// toggles).
    pub fn press(&mut self, now: Instant) {
        self.keys.handle_press(now);
    }

    /// `walkie ctl release`: the key going up (in toggle mode it ends a talk, if any).
    pub fn release(&mut self, now: Instant) {
        self.keys.handle_release(now);
    }

    pub fn status(&self) -> ButtonStatus {
        let configured = match &self.spec {
            DeviceSpec::Path(path) => Some(path.display().to_string()),
            DeviceSpec::None | DeviceSpec::Auto => None,
        };
        let (state, error, device) = match &self.link {
            Link::NotStarted => ("opening", None, configured),
            Link::Disabled => ("disabled", None, None),
            Link::Open { device, .. } => ("ok", None, Some(device.path().display().to_string())),
            Link::Waiting { failed, error, .. } => {
                let state = if *failed { "failed" } else { "opening" };
                (state, Some(error.clone()), configured)
            }
        };
        let (name, chosen) = match &self.link {
            Link::Open { device, .. } => (
                device.name().map(str::to_owned),
                self.auto.reason.as_ref().map(|r| format!("auto: {r}")),
            ),
            _ => (None, None),
        };
        ButtonStatus {
            state,
            error,
            device,
            name,
            chosen,
            pressed: self.keys.is_pressed(),
        }
    }

    /// Closes the device (ending a grab). A talk the device's key started ends with a forced
    /// release, pollable afterwards; one from `ctl press` is left alone.
    pub fn stop(&mut self, registry: &Registry) {
        self.close(registry);
        self.link = Link::Disabled;
    }

    /// Opens the configured source, registers it, learns the key's state. `routine`: a FIFO
    /// reopened for its next writer, not worth an info line.
    fn open(&mut self, registry: &Registry, now: Instant, routine: bool) {
        let opened = match &self.spec {
            DeviceSpec::Path(path) => OpenDevice::open(path, self.key, self.grab),
            DeviceSpec::Auto => self.choose(),
            DeviceSpec::None => return,
        };
        let registered = opened.and_then(|mut device| match device.register(registry) {
            Ok(()) => Ok(device),
            Err(e) => {
                device.close(registry);
                Err(e)
            }
        });
        match registered {
            Ok(device) => {
                self.keys.handle_attach(device.key_down(self.key));
                let name = device.name().map(|n| format!(" ({n})")).unwrap_or_default();
                let why = match &self.auto.reason {
                    Some(reason) if self.spec == DeviceSpec::Auto => format!(": {reason}"),
                    _ => String::new(),
                };
                let message = format!("button: reading {}{name}{why}", device.path().display());
                if routine && self.last_logged.is_none() {
                    debug!("{message}");
                } else {
                    info!("{message}");
                }
                self.last_logged = None;
                self.link = Link::Open {
                    device,
                    watch_at: now + WATCH_INTERVAL,
                };
                self.open_watchers(registry);
            }
            Err(e) => self.wait(now, true, &e),
        }
    }

    /// `auto`: scans the input directory, picks the button and opens it (not registered).
    /// Remembers the devices of its kind for [`Button::open_watchers`].
    fn choose(&mut self) -> Result<OpenDevice, reader::OpenError> {
        self.auto.nodes = reader::node_identities(&self.input_dir);
        let scan = reader::scan(&self.input_dir, self.key);
        let key_name = keycodes::describe(self.key);
        let Some(choice) = select::choose(
            &scan.candidates,
            &key_name,
            self.auto.last_pressed.as_deref(),
        ) else {
            self.auto.candidates.clear();
            self.auto.reason = None;
            return Err(scan.no_device(&self.input_dir, self.key));
        };
        let device = OpenDevice::open(&scan.candidates[choice.chosen].path, self.key, self.grab)?;
        self.auto.reason = Some(choice.reason);
        let watch: Vec<Candidate> = choice
            .watch
            .iter()
            .map(|&i| scan.candidates[i].clone())
            .collect();
        self.auto.candidates = scan.candidates;
        // Opened once the button is registered; kept here until then.
        self.auto.watchers.clear();
        for candidate in watch {
            match OpenDevice::open(&candidate.path, self.key, false) {
                Ok(watcher) => self.auto.watchers.push(watcher),
                Err(e) => debug!("button: cannot watch {}: {e}", candidate.label()),
            }
        }
        Ok(device)
    }

    /// Registers the watchers [`Button::choose`] opened; one that cannot be polled is dropped.
    fn open_watchers(&mut self, registry: &Registry) {
        let watchers = std::mem::take(&mut self.auto.watchers);
        for mut watcher in watchers {
            match watcher.register(registry) {
                Ok(()) => {
                    debug!(
                        "button: watching {} for {}",
                        watcher.path().display(),
                        keycodes::describe(self.key)
                    );
                    self.auto.watchers.push(watcher);
                }
                Err(e) => {
                    debug!("button: {e}");
                    watcher.close(registry);
                }
            }
        }
    }

    /// `auto`: reads the watched devices; the key going down on one makes it the button.
    /// A watched device that went away is dropped (the directory rescan notices the rest).
    fn drain_watchers(&mut self, registry: &Registry, now: Instant) {
        let mut pressed_on = None;
        let mut i = 0;
        while i < self.auto.watchers.len() {
            let (drained, pressed) = self.auto.watchers[i].drain_for_press(self.key);
            if drained.end.is_some() {
                let gone = self.auto.watchers.swap_remove(i);
                debug!("button: {} no longer watched", gone.path().display());
                gone.close(registry);
                continue;
            }
            if pressed && pressed_on.is_none() {
                pressed_on = Some(i);
            }
            i += 1;
        }
        if let Some(i) = pressed_on {
            self.promote(i, now);
        }
    }

    /// The key went down on watched device `i`: it becomes the button (and takes the grab),
    /// the previous one is watched instead, and the press counts.
    fn promote(&mut self, i: usize, now: Instant) {
        let Link::Open { device, .. } = &mut self.link else {
            return;
        };
        let new = self.auto.watchers.swap_remove(i);
        if self.grab {
            device.set_grab(false);
            new.set_grab(true);
        }
        // The old device's key state ends with it; the new one starts up, then goes down.
        self.keys.handle_detach();
        let old = std::mem::replace(device, new);
        self.auto.watchers.push(old);
        self.keys.handle_attach(false);
        self.keys
            .handle_record(now, InputRecord::new(EV_KEY, self.key, 1));
        if !device.key_down(self.key) {
            // A tap: it was over before walkie read it.
            self.keys
                .handle_record(now, InputRecord::new(EV_KEY, self.key, 0));
        }
        let path = device.path().to_owned();
        self.auto.last_pressed = Some(path.clone());
        let key_name = keycodes::describe(self.key);
        self.auto.reason = select::choose(&self.auto.candidates, &key_name, Some(&path))
            .filter(|c| self.auto.candidates[c.chosen].path == path)
            .map(|c| c.reason)
            .or_else(|| Some(format!("{key_name} was last pressed on it")));
        info!(
            "button: {key_name} pressed on {}; it is the button now",
            device
                .name()
                .map_or_else(|| path.display().to_string(), str::to_owned)
        );
    }

    /// `auto`, once per [`WATCH_INTERVAL`]: when devices came or went, chooses again. A
    /// different choice takes over between talks, never in the middle of one.
    fn rescan(&mut self, registry: &Registry, now: Instant) {
        let nodes = reader::node_identities(&self.input_dir);
        if nodes == self.auto.nodes || self.keys.is_pressed() {
            return;
        }
        let current = match &self.link {
            Link::Open { device, .. } => device.path().to_owned(),
            _ => return,
        };
        let scan = reader::scan(&self.input_dir, self.key);
        let key_name = keycodes::describe(self.key);
        let last = self.auto.last_pressed.as_deref();
        let Some(choice) = select::choose(&scan.candidates, &key_name, last) else {
            return; // the open device's own read or path check reports its loss
        };
        if scan.candidates[choice.chosen].path != current {
            info!(
                "button: input devices changed; {} is the better button",
                scan.candidates[choice.chosen].label()
            );
            self.close(registry);
            self.open(registry, now, false);
            return;
        }
        // Same button: only the watched set changes.
        self.auto.nodes = nodes;
        for watcher in std::mem::take(&mut self.auto.watchers) {
            watcher.close(registry);
        }
        for &i in &choice.watch {
            match OpenDevice::open(&scan.candidates[i].path, self.key, false) {
                Ok(watcher) => self.auto.watchers.push(watcher),
                Err(e) => debug!("button: cannot watch {}: {e}", scan.candidates[i].label()),
            }
        }
        self.auto.reason = Some(choice.reason);
        self.auto.candidates = scan.candidates;
        self.open_watchers(registry);
    }

    /// The open device went away: close (releasing a held key), retry after the backoff.
    fn lose(&mut self, registry: &Registry, now: Instant, reason: String) {
        let path = match &self.link {
            Link::Open { device, .. } => device.path().display().to_string(),
            _ => String::new(),
        };
        self.close(registry);
        self.wait(now, false, &format!("{path}: {reason}"));
    }

    fn wait(&mut self, now: Instant, failed: bool, error: &dyn std::fmt::Display) {
        let error = error.to_string();
        if self.last_logged.as_deref() != Some(error.as_str()) {
            warn!("button: {error}; retrying");
            self.last_logged = Some(error.clone());
        } else {
            debug!("button: {error}; retrying");
        }
        self.link = Link::Waiting {
            retry_at: now + self.backoff,
            failed,
            error,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Closes the open device, if any. The key machine hears of it: a talk the device's
    /// key started ends (forced), since no release can come from a closed fd.
    fn close(&mut self, registry: &Registry) {
        for watcher in std::mem::take(&mut self.auto.watchers) {
            watcher.close(registry);
        }
        match std::mem::replace(&mut self.link, Link::Disabled) {
            Link::Open { device, .. } => {
                self.keys.handle_detach();
                device.close(registry);
            }
            other => self.link = other,
        }
    }
}

/// The `/dev/input/event*` nodes with their names and whether they can send `key`, for
/// `walkie devices`.
pub fn list_input_devices(key: Option<u16>) -> Vec<InputDevice> {
    reader::list_devices_in(Path::new(INPUT_DIR), key)
}

/// What `device = "auto"` would choose for `key` now, for `walkie devices`: the device
/// (path and name) and why, or why there is none. A running walkie may differ: it also
/// remembers which device the key was last pressed on.
pub fn auto_choice(key: u16) -> Result<(String, String), String> {
    let dir = Path::new(INPUT_DIR);
    let scan = reader::scan(dir, key);
    match select::choose(&scan.candidates, &keycodes::describe(key), None) {
        Some(choice) => Ok((scan.candidates[choice.chosen].label(), choice.reason)),
        None => Err(scan.no_device(dir, key).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ButtonMode;

    fn config(device: &str, key: &str) -> ButtonConfig {
        ButtonConfig {
            device: device.into(),
            key: key.into(),
            ..ButtonConfig::default()
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Button::new(&config("none", "KEY_F99")).unwrap_err();
        assert!(matches!(err, ButtonError::UnknownKey(ref k) if k == "KEY_F99"));
        assert!(err.to_string().contains("\"KEY_F99\""), "{err}");
        assert!(Button::new(&config("none", "768")).is_err());
        assert_eq!(
            Button::new(&config("none", "BTN_LEFT")).unwrap().key(),
            0x110
        );
        assert_eq!(Button::new(&config("none", "183")).unwrap().key(), 183);
    }

    #[test]
    fn empty_device_is_an_error() {
        assert!(matches!(
            Button::new(&config("  ", "KEY_F13")),
            Err(ButtonError::EmptyDevice)
        ));
    }

    #[test]
    fn auto_with_no_device_fails_names_the_key_and_retries_with_growing_backoff() {
        let poll = mio::Poll::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut button = Button::new(&config("auto", "KEY_F13")).unwrap();
        button.input_dir = dir.path().to_owned();
        assert_eq!(button.status().state, "opening");
        let t0 = Instant::now();
        button.start(poll.registry(), t0);
        let status = button.status();
        assert_eq!(status.state, "failed");
        let error = status.error.unwrap();
        assert!(error.starts_with("no input device has KEY_F13"), "{error}");
        assert_eq!(button.next_deadline(), Some(t0 + BACKOFF_MIN));

        // Retries back off: 0.5, 1, 2, 4, then 5 s at most.
        let mut now = t0;
        let mut gaps = Vec::new();
        for _ in 0..6 {
            let next = button.next_deadline().unwrap();
            gaps.push(next - now);
            now = next;
            button.on_timeout(poll.registry(), now);
        }
        let ms: Vec<u128> = gaps.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(button.status().state, "failed");
    }

    #[test]
    fn none_is_disabled_and_software_press_still_works() {
        let poll = mio::Poll::new().unwrap();
        let mut button = Button::new(&config("none", "KEY_F13")).unwrap();
        let now = Instant::now();
        button.start(poll.registry(), now);
        let status = button.status();
        assert_eq!(status.state, "disabled");
        assert_eq!(status.error, None);
        assert_eq!(button.next_deadline(), None);
        button.press(now);
        assert_eq!(button.poll_event(), Some(ButtonEvent::Pressed));
        assert!(button.status().pressed);
        button.release(now);
        assert_eq!(
            button.poll_event(),
            Some(ButtonEvent::Released { forced: false })
        );
    }

    #[test]
    fn max_hold_deadline_is_reported_and_fires() {
        let poll = mio::Poll::new().unwrap();
        let mut cfg = config("none", "KEY_F13");
        cfg.max_hold_s = 2;
        cfg.mode = ButtonMode::Hold;
        let mut button = Button::new(&cfg).unwrap();
        let t0 = Instant::now();
        button.start(poll.registry(), t0);
        button.press(t0);
        assert_eq!(button.next_deadline(), Some(t0 + Duration::from_secs(2)));
        button.on_timeout(poll.registry(), t0 + Duration::from_secs(2));
        assert_eq!(button.poll_event(), Some(ButtonEvent::Pressed));
        assert_eq!(
            button.poll_event(),
            Some(ButtonEvent::Released { forced: true })
        );
        assert_eq!(button.next_deadline(), None);
    }

    #[test]
    fn status_serialises_for_ctl_status() {
        let button = Button::new(&config("/run/walkie-button", "KEY_F13")).unwrap();
        let json = serde_json::to_value(button.status()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "state": "opening", "error": null,
                "device": "/run/walkie-button", "name": null, "chosen": null,
                "pressed": false
            })
        );
    }
}
