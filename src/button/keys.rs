//! The push-to-talk key state machine: sans-IO, no fd, time passed in.
//!
//! Inputs are decoded `input_event` records, the key's real state when the IO layer can read
//! it (device opened, resynchronisation after `SYN_DROPPED`), the device going away, software
//! press/release from `walkie ctl`, and time (for `max_hold_s`). Outputs are
//! [`ButtonEvent`]s: a talk starts with exactly one `Pressed` and ends with exactly one
//! `Released`, whatever mix of sources and duplicates led there.
//!
//! Rules:
//! - Only `EV_KEY` records for the configured code count: value 1 is the key going down,
//!   0 going up, 2 (autorepeat) and anything else is ignored. A down while already down (or
//!   an up while up) is a duplicate and ignored.
//! - `hold`: down starts a talk, up ends it. `toggle`: each down starts or ends a talk; ups
//!   are ignored.
//! - `SYN_DROPPED`: the kernel's buffer overflowed and events were lost. Everything up to and
//!   including the next `SYN_REPORT` is discarded, then [`KeyMachine::wants_resync`] asks the
//!   IO layer for the key's real state ([`KeyMachine::handle_resync`]); a difference is
//!   applied as a down or up edge.
//! - `max_hold`: a talk that lasts that long ends with `Released { forced: true }`. In hold
//!   mode the key must then go up before it can start another talk (a stuck key or a
//!   forgotten `ctl press` cannot reopen the microphone by itself).
//! - Device gone: a talk the physical key started ends with `Released { forced: true }`.
//!   Device (re)opened with the key already down: in hold mode it must go up first, so a key
//!   held at start-up (or stuck) does not start a talk.
//! - Software (`walkie ctl press`/`release`) drives the same logical key as the device. In
//!   hold mode press is a down and release an up, so either source can end a talk the other
//!   started. In toggle mode press toggles like a key down; release ends a talk if one is
//!   active and is otherwise ignored, so a script's press…release pair behaves the same in
//!   both modes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::ButtonMode;

use super::records::InputRecord;

/// `EV_SYN` from `linux/input-event-codes.h`.
pub const EV_SYN: u16 = 0x00;
/// `EV_KEY`.
pub const EV_KEY: u16 = 0x01;
/// `SYN_REPORT`: the end of one batch of events.
pub const SYN_REPORT: u16 = 0;
/// `SYN_DROPPED`: the client's buffer overran; events up to the next `SYN_REPORT` are lost.
pub const SYN_DROPPED: u16 = 3;

/// What the button tells the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ButtonEvent {
    /// Start talking.
    Pressed,
    /// Stop talking. `forced`: walkie ended the talk itself (`max_hold_s` reached, or the
    /// device went away), not the user.
    Released { forced: bool },
}

/// Who started the current talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Device,
    Software,
}

#[derive(Debug, Clone, Copy)]
struct Talk {
    since: Instant,
    source: Source,
}

/// The key state machine for one configured key code.
#[derive(Debug)]
pub struct KeyMachine {
    code: u16,
    mode: ButtonMode,
    max_hold: Option<Duration>,
    /// The device's key as last reported (records, resync, attach).
    device_down: bool,
    /// Hold mode: the logical key (device or software) is down.
    held: bool,
    /// Hold mode: a forced release happened; no new talk until the logical key goes up.
    locked: bool,
    talk: Option<Talk>,
    /// Between `SYN_DROPPED` and the next `SYN_REPORT`.
    dropping: bool,
    resync_wanted: bool,
    events: VecDeque<ButtonEvent>,
}

impl KeyMachine {
    /// `max_hold`: `None` (or zero) means a talk may last forever.
    pub fn new(code: u16, mode: ButtonMode, max_hold: Option<Duration>) -> KeyMachine {
        KeyMachine {
            code,
            mode,
            max_hold: max_hold.filter(|d| !d.is_zero()),
            device_down: false,
            held: false,
            locked: false,
            talk: None,
            dropping: false,
            resync_wanted: false,
            events: VecDeque::new(),
        }
    }

    /// One decoded record from the device.
    pub fn handle_record(&mut self, now: Instant, record: InputRecord) {
        if record.kind == EV_SYN {
            match record.code {
                SYN_DROPPED => self.dropping = true,
                SYN_REPORT if self.dropping => {
                    self.dropping = false;
                    self.resync_wanted = true;
                }
                _ => {}
            }
            return;
        }
        if self.dropping || record.kind != EV_KEY || record.code != self.code {
            return;
        }
        match record.value {
            1 => self.device_edge(now, true),
            0 => self.device_edge(now, false),
            _ => {} // 2 is autorepeat; nothing else is defined for keys
        }
    }

    /// True after a `SYN_DROPPED` batch ended: the IO layer should read the key's real state
    /// (EVIOCGKEY; `false` for a FIFO or socket, which cannot be asked) and pass it to
    /// [`KeyMachine::handle_resync`].
    pub fn wants_resync(&self) -> bool {
        self.resync_wanted
    }

    /// The key's real state after events were dropped.
    pub fn handle_resync(&mut self, now: Instant, down: bool) {
        self.resync_wanted = false;
        self.device_edge(now, down);
    }

    /// The device was (re)opened and its key is `down` right now. Starts no talk.
    pub fn handle_attach(&mut self, down: bool) {
        self.dropping = false;
        self.resync_wanted = false;
        self.device_down = down;
        if down && self.mode == ButtonMode::Hold && !self.held {
            self.held = true;
            self.locked = true;
        }
    }

    /// The device went away (unplugged, FIFO writer gone, path removed).
    pub fn handle_detach(&mut self) {
        self.dropping = false;
        self.resync_wanted = false;
        let was_down = std::mem::replace(&mut self.device_down, false);
        match self.mode {
            ButtonMode::Hold => {
                if was_down && self.held {
                    self.held = false;
                    self.locked = false;
                    self.end_talk(true);
                }
            }
            ButtonMode::Toggle => {
                if self.talk.is_some_and(|t| t.source == Source::Device) {
                    self.end_talk(true);
                }
            }
        }
    }

    /// `walkie ctl press`.
    pub fn handle_press(&mut self, now: Instant) {
        match self.mode {
            ButtonMode::Hold => self.logical_down(now, Source::Software),
            ButtonMode::Toggle => self.toggle(now, Source::Software),
        }
    }

    /// `walkie ctl release`.
    pub fn handle_release(&mut self, _now: Instant) {
        match self.mode {
            ButtonMode::Hold => self.logical_up(),
            ButtonMode::Toggle => self.end_talk(false),
        }
    }

    /// Time passed: ends a talk that reached `max_hold`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|deadline| deadline <= now) {
            if self.mode == ButtonMode::Hold {
                // `held` stays true: the key must go up before the next talk.
                self.locked = true;
            }
            self.end_talk(true);
        }
    }

    /// When [`KeyMachine::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let talk = self.talk?;
        Some(talk.since + self.max_hold?)
    }

    pub fn poll_event(&mut self) -> Option<ButtonEvent> {
        self.events.pop_front()
    }

    /// A talk is in progress (`Pressed` was the last event).
    pub fn is_pressed(&self) -> bool {
        self.talk.is_some()
    }

    fn device_edge(&mut self, now: Instant, down: bool) {
        if self.device_down == down {
            return; // a duplicate, or a resync that found nothing lost
        }
        self.device_down = down;
        match (self.mode, down) {
            (ButtonMode::Hold, true) => self.logical_down(now, Source::Device),
            (ButtonMode::Hold, false) => self.logical_up(),
            (ButtonMode::Toggle, true) => self.toggle(now, Source::Device),
            (ButtonMode::Toggle, false) => {}
        }
    }

    fn logical_down(&mut self, now: Instant, source: Source) {
        if self.held {
            return;
        }
        self.held = true;
        if !self.locked {
            self.start_talk(now, source);
        }
    }

    fn logical_up(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        self.locked = false;
        self.end_talk(false);
    }

    fn toggle(&mut self, now: Instant, source: Source) {
        if self.talk.is_some() {
            self.end_talk(false);
        } else {
            self.start_talk(now, source);
        }
    }

    fn start_talk(&mut self, now: Instant, source: Source) {
        if self.talk.is_none() {
            self.talk = Some(Talk { since: now, source });
            self.events.push_back(ButtonEvent::Pressed);
        }
    }

    fn end_talk(&mut self, forced: bool) {
        if self.talk.take().is_some() {
            self.events.push_back(ButtonEvent::Released { forced });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F13: u16 = 183;
    const PRESSED: ButtonEvent = ButtonEvent::Pressed;
    const RELEASED: ButtonEvent = ButtonEvent::Released { forced: false };
    const FORCED: ButtonEvent = ButtonEvent::Released { forced: true };

    /// A machine with a fake clock.
    struct Rig {
        keys: KeyMachine,
        t0: Instant,
        now: Instant,
    }

    impl Rig {
        fn new(mode: ButtonMode, max_hold_s: u64) -> Rig {
            let t0 = Instant::now();
            Rig {
                keys: KeyMachine::new(F13, mode, Some(Duration::from_secs(max_hold_s))),
                t0,
                now: t0,
            }
        }
        fn hold() -> Rig {
            Rig::new(ButtonMode::Hold, 120)
        }
        fn toggle() -> Rig {
            Rig::new(ButtonMode::Toggle, 120)
        }
        fn record(&mut self, kind: u16, code: u16, value: i32) -> &mut Self {
            self.keys
                .handle_record(self.now, InputRecord::new(kind, code, value));
            self
        }
        /// A key event followed by its SYN_REPORT, as the kernel sends it.
        fn key(&mut self, value: i32) -> &mut Self {
            self.record(4, 4, 0x70068) // MSC_SCAN noise before the key, as keyboards send
                .record(EV_KEY, F13, value)
                .record(EV_SYN, SYN_REPORT, 0)
        }
        fn down(&mut self) -> &mut Self {
            self.key(1)
        }
        fn up(&mut self) -> &mut Self {
            self.key(0)
        }
        fn advance(&mut self, secs: u64) -> &mut Self {
            self.now += Duration::from_secs(secs);
            self.keys.handle_timeout(self.now);
            self
        }
        fn events(&mut self) -> Vec<ButtonEvent> {
            std::iter::from_fn(|| self.keys.poll_event()).collect()
        }
    }

    #[test]
    fn hold_down_presses_and_up_releases() {
        let mut rig = Rig::hold();
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        assert!(rig.keys.is_pressed());
        rig.up();
        assert_eq!(rig.events(), [RELEASED]);
        assert!(!rig.keys.is_pressed());
    }

    #[test]
    fn other_keys_and_event_types_are_ignored() {
        let mut rig = Rig::hold();
        rig.record(EV_KEY, F13 + 1, 1)
            .record(EV_KEY, 30, 1)
            .record(2, F13, 1) // EV_REL with the same code number
            .record(EV_SYN, SYN_REPORT, 0);
        assert_eq!(rig.events(), []);
    }

    #[test]
    fn autorepeat_and_duplicates_are_ignored() {
        let mut rig = Rig::hold();
        rig.down().key(2).key(2).down();
        assert_eq!(rig.events(), [PRESSED]);
        rig.up().up().key(2);
        assert_eq!(rig.events(), [RELEASED]);
        rig.key(7); // undefined value
        assert_eq!(rig.events(), []);
    }

    #[test]
    fn toggle_each_down_toggles_and_ups_are_ignored() {
        let mut rig = Rig::toggle();
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        rig.up().key(2);
        assert_eq!(rig.events(), []);
        assert!(rig.keys.is_pressed());
        rig.down();
        assert_eq!(rig.events(), [RELEASED]);
        rig.up().down().up();
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn toggle_repeat_does_not_toggle() {
        let mut rig = Rig::toggle();
        rig.down().key(2).key(2).key(2);
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn syn_dropped_discards_until_report_then_resyncs_a_lost_release() {
        let mut rig = Rig::hold();
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        // The up got lost in the overflow; the records after SYN_DROPPED are partial junk.
        rig.record(EV_SYN, SYN_DROPPED, 0)
            .record(EV_KEY, F13, 0)
            .record(EV_KEY, F13, 1);
        assert_eq!(rig.events(), [], "events after SYN_DROPPED are discarded");
        assert!(!rig.keys.wants_resync(), "not before the SYN_REPORT");
        rig.record(EV_SYN, SYN_REPORT, 0);
        assert!(rig.keys.wants_resync());
        rig.keys.handle_resync(rig.now, false);
        assert!(!rig.keys.wants_resync());
        assert_eq!(rig.events(), [RELEASED]);
    }

    #[test]
    fn syn_dropped_resync_finds_a_lost_press() {
        let mut rig = Rig::hold();
        rig.record(EV_SYN, SYN_DROPPED, 0)
            .record(EV_SYN, SYN_REPORT, 0);
        rig.keys.handle_resync(rig.now, true);
        assert_eq!(rig.events(), [PRESSED]);
        // The key's real up arrives later as an ordinary event.
        rig.up();
        assert_eq!(rig.events(), [RELEASED]);
    }

    #[test]
    fn syn_dropped_resync_that_agrees_changes_nothing() {
        let mut rig = Rig::hold();
        rig.down();
        rig.events();
        rig.record(EV_SYN, SYN_DROPPED, 0)
            .record(EV_SYN, SYN_REPORT, 0);
        rig.keys.handle_resync(rig.now, true);
        assert_eq!(rig.events(), []);
        // Events after the resync are processed normally again.
        rig.up();
        assert_eq!(rig.events(), [RELEASED]);
    }

    #[test]
    fn max_hold_forces_a_release_and_the_key_must_go_up_first() {
        let mut rig = Rig::hold();
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        assert_eq!(
            rig.keys.poll_timeout(),
            Some(rig.t0 + Duration::from_secs(120))
        );
        rig.advance(119);
        assert_eq!(rig.events(), []);
        rig.advance(1);
        assert_eq!(rig.events(), [FORCED]);
        assert_eq!(rig.keys.poll_timeout(), None);
        // Still held: repeats, a duplicate down and a ctl press do nothing.
        rig.key(2).down();
        rig.keys.handle_press(rig.now);
        assert_eq!(rig.events(), []);
        // The up that follows ends nothing (the talk already ended): no duplicate release.
        rig.up();
        assert_eq!(rig.events(), []);
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        assert_eq!(
            rig.keys.poll_timeout(),
            Some(rig.now + Duration::from_secs(120))
        );
    }

    #[test]
    fn max_hold_in_toggle_mode_ends_the_talk_and_the_next_down_starts_one() {
        let mut rig = Rig::toggle();
        rig.down().up();
        assert_eq!(rig.events(), [PRESSED]);
        rig.advance(120);
        assert_eq!(rig.events(), [FORCED]);
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn zero_max_hold_means_no_limit() {
        let mut rig = Rig::new(ButtonMode::Hold, 0);
        rig.down();
        assert_eq!(rig.keys.poll_timeout(), None);
        rig.advance(1_000_000);
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn software_press_and_release_in_hold_mode() {
        let mut rig = Rig::hold();
        rig.keys.handle_press(rig.now);
        rig.keys.handle_press(rig.now);
        assert_eq!(rig.events(), [PRESSED]);
        rig.keys.handle_release(rig.now);
        rig.keys.handle_release(rig.now);
        assert_eq!(rig.events(), [RELEASED]);
    }

    #[test]
    fn software_and_device_share_one_key_in_hold_mode() {
        let mut rig = Rig::hold();
        rig.keys.handle_press(rig.now);
        rig.down(); // already down: no second Pressed
        assert_eq!(rig.events(), [PRESSED]);
        rig.up(); // the device's up ends the talk ctl started
        assert_eq!(rig.events(), [RELEASED]);
        rig.keys.handle_release(rig.now);
        assert_eq!(rig.events(), []);

        rig.down();
        rig.keys.handle_release(rig.now); // ctl release ends the device's talk
        rig.up(); // and the device's late up is no duplicate
        assert_eq!(rig.events(), [PRESSED, RELEASED]);
    }

    #[test]
    fn software_press_obeys_max_hold() {
        let mut rig = Rig::hold();
        rig.keys.handle_press(rig.now);
        rig.advance(120);
        assert_eq!(rig.events(), [PRESSED, FORCED]);
        rig.keys.handle_press(rig.now);
        assert_eq!(
            rig.events(),
            [],
            "a forgotten ctl press must be released first"
        );
        rig.keys.handle_release(rig.now);
        rig.keys.handle_press(rig.now);
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn software_in_toggle_mode_press_toggles_release_only_ends() {
        let mut rig = Rig::toggle();
        rig.keys.handle_release(rig.now);
        assert_eq!(rig.events(), [], "release with no talk is ignored");
        rig.keys.handle_press(rig.now);
        assert_eq!(rig.events(), [PRESSED]);
        rig.keys.handle_press(rig.now);
        assert_eq!(rig.events(), [RELEASED]);
        rig.keys.handle_press(rig.now);
        rig.keys.handle_release(rig.now);
        rig.keys.handle_release(rig.now);
        assert_eq!(rig.events(), [PRESSED, RELEASED]);
        // A device down after a ctl press ends that talk, like a second key press.
        rig.keys.handle_press(rig.now);
        rig.down();
        assert_eq!(rig.events(), [PRESSED, RELEASED]);
    }

    #[test]
    fn device_gone_forces_release_of_a_held_key() {
        let mut rig = Rig::hold();
        rig.down();
        rig.keys.handle_detach();
        assert_eq!(rig.events(), [PRESSED, FORCED]);
        // The device comes back with the key up; the next press works.
        rig.keys.handle_attach(false);
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn device_gone_leaves_a_software_talk_alone() {
        let mut rig = Rig::hold();
        rig.keys.handle_press(rig.now);
        rig.keys.handle_detach();
        assert_eq!(rig.events(), [PRESSED]);
        rig.keys.handle_release(rig.now);
        assert_eq!(rig.events(), [RELEASED]);
    }

    #[test]
    fn device_gone_in_toggle_mode_ends_a_device_talk() {
        let mut rig = Rig::toggle();
        rig.down().up();
        rig.keys.handle_detach();
        assert_eq!(rig.events(), [PRESSED, FORCED]);
        rig.keys.handle_detach();
        assert_eq!(rig.events(), []);
    }

    #[test]
    fn device_gone_mid_drop_clears_the_drop() {
        let mut rig = Rig::hold();
        rig.record(EV_SYN, SYN_DROPPED, 0);
        rig.keys.handle_detach();
        rig.keys.handle_attach(false);
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
        assert!(!rig.keys.wants_resync());
    }

    #[test]
    fn key_already_down_at_attach_must_go_up_before_a_talk() {
        let mut rig = Rig::hold();
        rig.keys.handle_attach(true);
        rig.key(2).down();
        assert_eq!(rig.events(), []);
        rig.up();
        assert_eq!(rig.events(), []);
        rig.down();
        assert_eq!(rig.events(), [PRESSED]);
    }

    #[test]
    fn key_already_down_at_attach_in_toggle_mode_needs_a_new_down() {
        let mut rig = Rig::toggle();
        rig.keys.handle_attach(true);
        rig.down();
        assert_eq!(rig.events(), [], "a duplicate of the attach state");
        rig.up().down();
        assert_eq!(rig.events(), [PRESSED]);
    }
}
