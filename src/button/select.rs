//! `button.device = "auto"`: which of the input devices that have the key is the button.
//! Sans-IO: the reader describes the devices, this decides, and says why in words for
//! `walkie ctl status` and `walkie devices`.
//!
//! A person who sets `auto` means the push-to-talk switch they plugged in, not the keyboard
//! that happens to list the same key (a standard keyboard's key table advertises KEY_F13,
//! and qemu's or a Pi's USB keyboard would otherwise win by being `event0`). So:
//! 1. a device that is not a full keyboard comes before a full keyboard (one that has the
//!    letter keys A–Z);
//! 2. within the same kind, the device the key was last pressed on comes first (the others
//!    of that kind are watched, so pressing the key on any of them moves the button there);
//! 3. then the device with the fewest keys (a one-key foot switch before a keypad);
//! 4. then the lowest event number.
//!
//! Full keyboards are never watched while a device of the other kind is chosen: typing on
//! the keyboard must not take the button away from the switch.

use std::path::{Path, PathBuf};

use crate::sys::evdev::KeySet;

/// The letter keys A–Z (`KEY_Q`..`KEY_P`, `KEY_A`..`KEY_L`, `KEY_Z`..`KEY_M`): a device
/// that has all of them is a full keyboard.
const LETTER_KEYS: [std::ops::RangeInclusive<u16>; 3] = [16..=25, 30..=38, 44..=50];

/// Whether a device with these keys is a full keyboard (it has every letter key).
pub fn is_full_keyboard(keys: &KeySet) -> bool {
    LETTER_KEYS
        .iter()
        .flat_map(|range| range.clone())
        .all(|code| keys.contains(code))
}

/// One input device that has the configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub path: PathBuf,
    /// EVIOCGNAME (empty when the device has none).
    pub name: String,
    /// How many key codes the device can send.
    pub key_count: usize,
    pub full_keyboard: bool,
}

impl Candidate {
    pub fn new(path: PathBuf, name: String, keys: &KeySet) -> Candidate {
        Candidate {
            path,
            name,
            key_count: keys.len(),
            full_keyboard: is_full_keyboard(keys),
        }
    }

    /// `/dev/input/event3 ("PCsensor FootSwitch")`.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            self.path.display().to_string()
        } else {
            format!("{} (\"{}\")", self.path.display(), self.name)
        }
    }
}

/// What `auto` picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Index of the button in the candidates.
    pub chosen: usize,
    /// Indices of the other devices of the same kind, to watch for a press of the key.
    pub watch: Vec<usize>,
    /// Why, in words (`walkie ctl status`, `walkie devices`, the log).
    pub reason: String,
}

/// Picks the button among `candidates` (the devices that have the key, in event number
/// order). `key` is the key's name, for the reason; `last_pressed` the device the key was
/// last pressed on, if walkie saw it. `None` when there is no candidate.
pub fn choose(candidates: &[Candidate], key: &str, last_pressed: Option<&Path>) -> Option<Choice> {
    let pressed_here = |c: &Candidate| last_pressed == Some(c.path.as_path());
    let chosen = (0..candidates.len()).min_by_key(|&i| {
        let c = &candidates[i];
        (c.full_keyboard, !pressed_here(c), c.key_count, i)
    })?;
    let best = &candidates[chosen];
    let same_kind: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].full_keyboard == best.full_keyboard)
        .collect();
    let watch = same_kind.iter().copied().filter(|&i| i != chosen).collect();
    let kind = if best.full_keyboard {
        "full keyboards"
    } else {
        "devices that are not full keyboards"
    };

    let mut reason = if candidates.len() == 1 {
        let keyboard = if best.full_keyboard {
            " (a full keyboard)"
        } else {
            ""
        };
        format!("the only input device with {key}{keyboard}")
    } else if same_kind.len() > 1 && pressed_here(best) {
        format!(
            "{key} was last pressed on it (of {} {kind} with the key)",
            same_kind.len()
        )
    } else if same_kind.len() > 1 {
        format!(
            "the fewest keys ({}) of the {} {kind} with {key}",
            best.key_count,
            same_kind.len()
        )
    } else {
        // The only one of its kind; a full keyboard cannot be (a device of the other kind
        // would have been chosen), so this is a switch beside full keyboards.
        format!("the only device with {key} that is not a full keyboard")
    };
    if !best.full_keyboard {
        let keyboards: Vec<String> = candidates
            .iter()
            .filter(|c| c.full_keyboard)
            .map(Candidate::label)
            .collect();
        if !keyboards.is_empty() {
            reason.push_str(&format!(
                "; preferred over the full keyboard{} {}",
                if keyboards.len() == 1 { "" } else { "s" },
                keyboards.join(", ")
            ));
        }
    } else if candidates.len() > 1 {
        reason.push_str(&format!("; no device other than a full keyboard has {key}"));
    }
    Some(Choice {
        chosen,
        watch,
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letters() -> impl Iterator<Item = u16> {
        LETTER_KEYS.iter().flat_map(|r| r.clone())
    }

    fn device(n: u32, name: &str, codes: impl IntoIterator<Item = u16>) -> Candidate {
        Candidate::new(
            PathBuf::from(format!("/dev/input/event{n}")),
            name.into(),
            &KeySet::from_codes(codes),
        )
    }

    /// qemu's i8042 keyboard, as it lists itself: letters, F1–F24 and much more.
    fn at_keyboard(n: u32) -> Candidate {
        device(
            n,
            "AT Translated Set 2 keyboard",
            (1..=88).chain(183..=194).chain(letters()),
        )
    }

    fn switch(n: u32, name: &str) -> Candidate {
        device(n, name, [183])
    }

    #[test]
    fn a_full_keyboard_has_every_letter_key() {
        assert!(is_full_keyboard(&KeySet::from_codes(letters())));
        assert!(!is_full_keyboard(&KeySet::from_codes(
            letters().filter(|&c| c != 30)
        )));
        assert!(
            !is_full_keyboard(&KeySet::from_codes([30, 183])),
            "KEY_A alone"
        );
        assert!(at_keyboard(0).full_keyboard);
        assert!(!switch(1, "s").full_keyboard);
        assert_eq!(switch(1, "s").key_count, 1);
    }

    #[test]
    fn a_switch_comes_before_the_full_keyboard_listed_first() {
        let all = [at_keyboard(0), switch(4, "FootSwitch")];
        let choice = choose(&all, "KEY_F13", None).unwrap();
        assert_eq!(choice.chosen, 1);
        assert!(choice.watch.is_empty(), "the keyboard is not watched");
        assert_eq!(
            choice.reason,
            "the only device with KEY_F13 that is not a full keyboard; preferred over the \
             full keyboard /dev/input/event0 (\"AT Translated Set 2 keyboard\")"
        );
    }

    #[test]
    fn a_press_on_the_keyboard_does_not_move_the_button_off_a_switch() {
        let all = [at_keyboard(0), switch(4, "FootSwitch")];
        let choice = choose(&all, "KEY_F13", Some(Path::new("/dev/input/event0"))).unwrap();
        assert_eq!(choice.chosen, 1);
    }

    #[test]
    fn a_full_keyboard_is_chosen_when_it_is_the_only_device_with_the_key() {
        let choice = choose(&[at_keyboard(0)], "KEY_F13", None).unwrap();
        assert_eq!(choice.chosen, 0);
        assert_eq!(
            choice.reason,
            "the only input device with KEY_F13 (a full keyboard)"
        );
        let lone = choose(&[switch(2, "s")], "KEY_F13", None).unwrap();
        assert_eq!(lone.reason, "the only input device with KEY_F13");
    }

    #[test]
    fn among_switches_the_fewest_keys_then_the_lowest_number_win() {
        let keypad = device(2, "keypad", 1..=20u16);
        let pedal = device(3, "pedal", [183, 184, 185]);
        let first = switch(5, "one");
        let second = switch(6, "two");
        let all = [at_keyboard(0), keypad, pedal, first, second];
        let choice = choose(&all, "KEY_F13", None).unwrap();
        assert_eq!(choice.chosen, 3);
        assert_eq!(
            choice.watch,
            [1, 2, 4],
            "the other switches, not the keyboard"
        );
        assert!(
            choice
                .reason
                .starts_with("the fewest keys (1) of the 4 devices that are not full keyboards with KEY_F13; preferred over the full keyboard /dev/input/event0"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn among_equals_the_one_last_pressed_wins() {
        let all = [at_keyboard(0), switch(5, "one"), switch(6, "two")];
        let choice = choose(&all, "KEY_F13", Some(Path::new("/dev/input/event6"))).unwrap();
        assert_eq!(choice.chosen, 2);
        assert_eq!(choice.watch, [1]);
        assert!(
            choice.reason.starts_with(
                "KEY_F13 was last pressed on it (of 2 devices that are not full keyboards with the key)"
            ),
            "{}",
            choice.reason
        );
        // A pedal with more keys that was pressed last beats the one-key switch.
        let all = [switch(5, "one"), device(7, "pedal", [183, 184])];
        let choice = choose(&all, "KEY_F13", Some(Path::new("/dev/input/event7"))).unwrap();
        assert_eq!(choice.chosen, 1);
        // A press remembered on a device that is gone changes nothing.
        let choice = choose(&all, "KEY_F13", Some(Path::new("/dev/input/event9"))).unwrap();
        assert_eq!(choice.chosen, 0);
    }

    #[test]
    fn among_full_keyboards_alone_the_one_last_pressed_wins() {
        let usb = device(3, "USB keyboard", letters().chain([183, 184]));
        let all = [at_keyboard(0), usb];
        let choice = choose(&all, "KEY_F13", None).unwrap();
        assert_eq!(choice.chosen, 1, "fewest keys");
        assert_eq!(choice.watch, [0]);
        assert!(
            choice
                .reason
                .ends_with("; no device other than a full keyboard has KEY_F13"),
            "{}",
            choice.reason
        );
        let choice = choose(&all, "KEY_F13", Some(Path::new("/dev/input/event0"))).unwrap();
        assert_eq!(choice.chosen, 0);
        assert_eq!(choice.watch, [1]);
    }

    #[test]
    fn no_candidate_no_choice() {
        assert_eq!(choose(&[], "KEY_F13", None), None);
    }

    #[test]
    fn labels_name_the_device_when_it_has_a_name() {
        assert_eq!(switch(4, "Foot").label(), "/dev/input/event4 (\"Foot\")");
        assert_eq!(switch(4, "").label(), "/dev/input/event4");
    }
}
