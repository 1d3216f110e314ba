//! The button on real evdev nodes: uinput devices made in the guest, read by walkie through
//! the kernel's evdev driver (grab, key state, autorepeat, hot-plug, SYN_DROPPED).

use std::time::Duration;

use serde_json::Value;

use crate::guest::poll;
use crate::guest::{Guest, Setup, T, hold};
use crate::uinput::{KEY_1, KEY_F13, KEY_F15, LETTERS, Reader, VirtualDevice};

/// qemu's i8042 keyboard: always `event0`, and its key table lists KEY_F13.
const AT_KEYBOARD: &str = "AT Translated Set 2 keyboard";

fn button(device: &str, extra: &str) -> String {
    format!("device = \"{device}\"\nkey = \"KEY_F13\"\n{extra}")
}

fn walkie_on(device: &str, extra: &str) -> Guest {
    Guest::start(Setup {
        button: &button(device, extra),
        ..Setup::default()
    })
}

/// Removes a path when dropped, even when the test fails.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A spoken turn on `device`: the key goes down, stays down for `ms` after walkie has seen
/// it (walkie times a press by when it reads it, and a starved guest may read late), and
/// goes up.
fn talk(g: &Guest, device: &VirtualDevice, ms: u64) {
    device.press();
    g.wait_status("the press seen", |st| st["button"]["pressed"] == true);
    hold(ms);
    device.release();
}

fn reads(st: &Value, node: &std::path::Path) -> bool {
    st["button"]["state"] == "ok" && st["button"]["device"] == node.display().to_string()
}

kernel_test! {
    fn hold_on_a_one_key_switch_is_one_turn_and_auto_prefers_the_switch_to_the_keyboard() {
        let switch = VirtualDevice::switch("walkie test switch");
        let g = walkie_on("auto", "mode = \"hold\"");
        let st = g.wait_status("the switch chosen", |st| reads(st, &switch.node));
        assert_eq!(st["button"]["name"], "walkie test switch", "{st}");
        let chosen = st["button"]["chosen"].as_str().unwrap_or("");
        assert!(
            chosen.contains("not a full keyboard") && chosen.contains(AT_KEYBOARD),
            "the status says why: {chosen}"
        );
        let (_, text, _) = g.w.ctl(&["status"]);
        assert!(
            text.contains(&switch.node.display().to_string()) && text.contains("auto: "),
            "{text}"
        );

        talk(&g, &switch, 600);
        g.wait_count("response.create", 1);
        hold(500);
        assert_eq!(g.commits(), 1);
        assert_eq!(g.count("input_audio_buffer.clear"), 1, "one press, one clear");
        assert_eq!(g.count("response.create"), 1);
        let ms = g.appended_audio().len() / 24;
        assert!(ms >= 600, "{ms} ms of audio for a 600 ms press");
    }
}

kernel_test! {
    fn toggle_mode_starts_a_turn_on_one_press_and_ends_it_on_the_next() {
        let switch = VirtualDevice::switch("walkie toggle switch");
        let g = walkie_on(&switch.node.display().to_string(), "mode = \"toggle\"");
        g.wait_status("the switch open", |st| reads(st, &switch.node));
        switch.tap(50);
        g.wait_status("a talk in progress", |st| st["button"]["pressed"] == true);
        hold(600);
        assert_eq!(g.commits(), 0, "the release of the first press ends nothing");
        switch.tap(50);
        g.wait_count("input_audio_buffer.commit", 1);
        g.wait_status("no talk", |st| st["button"]["pressed"] == false);
        hold(300);
        assert_eq!(g.commits(), 1);
    }
}

kernel_test! {
    fn the_kernels_autorepeat_does_not_toggle_the_talk() {
        // Toggle mode: a repeat taken for a press would end and restart the talk each time.
        let switch = VirtualDevice::create("walkie repeating switch", &[KEY_F13], true);
        let mut watcher = Reader::open(&switch.node);
        let g = walkie_on(&switch.node.display().to_string(), "mode = \"toggle\"");
        g.wait_status("the switch open", |st| reads(st, &switch.node));
        switch.tap(1200);
        let repeats = watcher
            .records(Duration::from_millis(200))
            .iter()
            .filter(|&&(kind, code, value)| kind == 1 && code == KEY_F13 && value == 2)
            .count();
        assert!(repeats >= 5, "the kernel sent {repeats} repeats for a 1.2 s hold");
        assert_eq!(g.status()["button"]["pressed"], true, "still talking");
        switch.tap(50);
        g.wait_count("input_audio_buffer.commit", 1);
        hold(300);
        assert_eq!(g.count("input_audio_buffer.clear"), 1);
        assert_eq!(g.commits(), 1);
    }
}

kernel_test! {
    fn grab_hides_the_key_from_a_second_reader_until_walkie_exits() {
        let switch = VirtualDevice::switch("walkie grabbed switch");
        let mut g = walkie_on(&switch.node.display().to_string(), "grab = true");
        g.wait_status("the switch open", |st| reads(st, &switch.node));
        let mut other = Reader::open(&switch.node);
        assert_eq!(
            other.grab(true),
            Err(nix::errno::Errno::EBUSY),
            "walkie holds the grab"
        );
        talk(&g, &switch, 300);
        g.wait_count("input_audio_buffer.commit", 1);
        let seen = other.records(Duration::from_millis(300));
        assert!(seen.is_empty(), "a second reader saw {seen:?} during the grab");

        g.stop();
        switch.tap(50);
        let seen = other.records(Duration::from_millis(500));
        assert!(
            seen.contains(&(1, KEY_F13, 1)) && seen.contains(&(1, KEY_F13, 0)),
            "after walkie exits the key reaches others: {seen:?}"
        );
        assert_eq!(other.grab(true), Ok(()), "nobody holds the grab now");
    }
}

kernel_test! {
    fn auto_takes_a_full_keyboard_only_when_no_other_device_has_the_key() {
        let g = walkie_on("auto", "");
        // qemu's keyboard is the only device with KEY_F13.
        let st = g.wait_status("the AT keyboard", |st| {
            st["button"]["state"] == "ok" && st["button"]["name"] == AT_KEYBOARD
        });
        assert_eq!(
            st["button"]["chosen"],
            "auto: the only input device with KEY_F13 (a full keyboard)"
        );

        // A second full keyboard with fewer keys is plugged in: among keyboards it wins,
        // and pressing the key on it works.
        let mut keys = LETTERS.to_vec();
        keys.push(KEY_F13);
        let keyboard = VirtualDevice::create("walkie test keyboard", &keys, false);
        let st = g.wait_status("the small keyboard", |st| reads(st, &keyboard.node));
        let chosen = st["button"]["chosen"].as_str().unwrap_or("");
        assert!(
            chosen.contains("of the 2 full keyboards")
                && chosen.contains("no device other than a full keyboard has KEY_F13"),
            "{chosen}"
        );
        talk(&g, &keyboard, 400);
        g.wait_count("input_audio_buffer.commit", 1);

        // A one-key switch appears: it takes over, and the keyboards are not even watched.
        let switch = VirtualDevice::switch("walkie late switch");
        let st = g.wait_status("the switch", |st| reads(st, &switch.node));
        assert!(
            st["button"]["chosen"]
                .as_str()
                .unwrap_or("")
                .contains("preferred over the full keyboards"),
            "{st}"
        );
        keyboard.key(KEY_F13, 1);
        hold(400);
        keyboard.key(KEY_F13, 0);
        hold(800);
        assert_eq!(g.commits(), 1, "F13 typed on the keyboard is not the button");
        assert!(reads(&g.status(), &switch.node));
        talk(&g, &switch, 400);
        g.wait_count("input_audio_buffer.commit", 2);
    }
}

kernel_test! {
    fn among_equal_switches_the_one_last_pressed_is_the_button() {
        let first = VirtualDevice::switch("walkie switch one");
        let second = VirtualDevice::switch("walkie switch two");
        let g = walkie_on("auto", "grab = true");
        let st = g.wait_status("the first switch", |st| reads(st, &first.node));
        assert!(
            st["button"]["chosen"]
                .as_str()
                .unwrap_or("")
                .contains("the fewest keys (1) of the 2 devices"),
            "{st}"
        );

        talk(&g, &second, 400);
        g.wait_count("input_audio_buffer.commit", 1);
        let st = g.wait_status("the second switch", |st| reads(st, &second.node));
        let last_pressed =
            "auto: KEY_F13 was last pressed on it (of 2 devices that are not full keyboards with the key)";
        assert!(
            st["button"]["chosen"].as_str().unwrap_or("").starts_with(last_pressed),
            "{st}"
        );
        // The grab moved with the button.
        assert_eq!(
            Reader::open(&second.node).grab(true),
            Err(nix::errno::Errno::EBUSY)
        );
        let one = Reader::open(&first.node);
        assert_eq!(one.grab(true), Ok(()), "the first switch is no longer grabbed");
        drop(one);

        // A keyboard plugged in makes walkie choose again: the press is remembered, so the
        // button stays where the key was last pressed rather than going back to the switch
        // that would win on its own (the lower event number).
        let mut keys = LETTERS.to_vec();
        keys.push(KEY_F13);
        let keyboard = VirtualDevice::create("walkie plugged keyboard", &keys, false);
        let keyboard_node = keyboard.node.display().to_string();
        let st = g.wait_status("the choice made again with the keyboard", |st| {
            st["button"]["chosen"]
                .as_str()
                .is_some_and(|c| c.contains(&keyboard_node))
        });
        assert!(reads(&st, &second.node), "the button left the switch last pressed: {st}");
        assert!(
            st["button"]["chosen"].as_str().unwrap_or("").starts_with(last_pressed),
            "{st}"
        );

        talk(&g, &first, 400);
        g.wait_count("input_audio_buffer.commit", 2);
        g.wait_status("the first switch again", |st| reads(st, &first.node));
        hold(300);
        assert_eq!(g.count("input_audio_buffer.clear"), 2, "one turn per press");
    }
}

kernel_test! {
    fn a_device_unplugged_mid_press_ends_the_turn_and_is_reopened_when_it_returns() {
        let mut switch = VirtualDevice::switch("walkie unplugged switch");
        let node = switch.node.clone();
        let g = walkie_on(&node.display().to_string(), "");
        g.wait_status("the switch open", |st| reads(st, &node));
        switch.press();
        g.wait_status("a talk in progress", |st| st["button"]["pressed"] == true);
        hold(400);
        // The input core releases held keys as a device goes (input_dev_release_keys), so
        // the turn ends as an ordinary release, committed; then the read gives ENODEV.
        switch.destroy();
        g.wait_count("response.create", 1);
        let st = g.wait_status("the button lost", |st| {
            st["button"]["state"] == "failed" || st["button"]["state"] == "opening"
        });
        assert_eq!(st["button"]["pressed"], false, "{st}");
        assert!(st["button"]["error"].as_str().is_some(), "{st}");
        assert_eq!(g.commits(), 1, "the turn ended with what was said");

        let again = VirtualDevice::switch("walkie unplugged switch");
        assert_eq!(again.node, node, "the kernel gives the node its number back");
        g.wait_status("the switch reopened", |st| reads(st, &node));
        talk(&g, &again, 400);
        g.wait_count("input_audio_buffer.commit", 2);
        assert!(
            g.w.log().contains("unplugged"),
            "the log says what happened:\n{}",
            g.w.log()
        );
    }
}

kernel_test! {
    fn with_auto_an_unplugged_switch_hands_over_to_the_keyboard_and_back() {
        let mut switch = VirtualDevice::switch("walkie hot-plug switch");
        let g = walkie_on("auto", "");
        g.wait_status("the switch", |st| reads(st, &switch.node));
        switch.press();
        g.wait_status("a talk in progress", |st| st["button"]["pressed"] == true);
        hold(300);
        switch.destroy();
        g.wait_count("input_audio_buffer.commit", 1);
        g.wait_status("the keyboard", |st| {
            st["button"]["state"] == "ok" && st["button"]["name"] == AT_KEYBOARD
        });
        let again = VirtualDevice::switch("walkie hot-plug switch");
        g.wait_status("the switch back", |st| reads(st, &again.node));
        talk(&g, &again, 400);
        g.wait_count("input_audio_buffer.commit", 2);
    }
}

kernel_test! {
    fn a_press_held_past_max_hold_s_ends_the_turn_while_the_key_is_still_down() {
        let switch = VirtualDevice::switch("walkie stuck switch");
        let g = walkie_on(&switch.node.display().to_string(), "max_hold_s = 1");
        g.wait_status("the switch open", |st| reads(st, &switch.node));
        switch.press();
        g.wait_count("input_audio_buffer.commit", 1);
        g.wait_status("no talk", |st| st["button"]["pressed"] == false);
        hold(500);
        switch.release();
        hold(500);
        assert_eq!(g.commits(), 1, "the late release starts and ends nothing");
        assert_eq!(g.count("input_audio_buffer.clear"), 1);
        talk(&g, &switch, 400);
        g.wait_count("input_audio_buffer.commit", 2);
    }
}

kernel_test! {
    fn a_key_held_across_a_reopen_starts_nothing_until_it_is_pressed_again() {
        // F13 and a key to flood the device with (below).
        let switch = VirtualDevice::create("walkie held switch", &[KEY_F13, KEY_1], false);
        let node = switch.node.clone();
        let g = walkie_on(&node.display().to_string(), "");
        g.wait_status("the switch open", |st| reads(st, &node));
        switch.press();
        g.wait_status("a talk in progress", |st| st["button"]["pressed"] == true);
        hold(300);
        // The node is re-created under walkie (as udev does on a change event): the
        // path watch notices, the talk ends with the old fd, the new fd starts with the
        // key down according to EVIOCGKEY. The new node is made beside the old one and
        // renamed over it, so the path never vanishes: walkie's once-a-second look at it
        // finds it replaced whenever it looks.
        let meta = std::fs::metadata(&node).unwrap();
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let fresh = node.with_file_name(format!(
            ".{}.new",
            node.file_name().unwrap().to_string_lossy()
        ));
        let _remove_fresh = RemoveOnDrop(fresh.clone());
        nix::sys::stat::mknod(
            &fresh,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            rdev,
        )
        .unwrap();
        std::fs::rename(&fresh, &node).unwrap();
        // devtmpfs removes only the nodes it made: this one goes when the test ends.
        let _remove = RemoveOnDrop(node.clone());
        g.wait_count("input_audio_buffer.commit", 1);
        // walkie learns the key's state (EVIOCGKEY) before the new fd counts as open.
        let st = g.wait_status("the new node open", |st| reads(st, &node));
        assert_eq!(st["button"]["pressed"], false, "the held key starts no talk: {st}");
        assert!(
            poll(T, || g.w.log().contains("was replaced")),
            "{}",
            g.w.log()
        );

        // Events lost while the key is still held: walkie asks EVIOCGKEY again, and finds
        // the key as it found it at the reopen (down), so no press is made up. Had it
        // taken the key for up at the reopen, this would start a talk.
        g.pause(true);
        for _ in 0..300 {
            switch.key(KEY_1, 1);
            switch.key(KEY_1, 0);
        }
        g.pause(false);
        assert!(
            poll(T, || g.w.log().contains("events dropped; key is down")),
            "the kernel's SYN_DROPPED reached walkie:\n{}",
            g.w.log()
        );
        let st = g.status();
        assert_eq!(st["button"]["pressed"], false, "the resync starts no talk: {st}");

        // Neither does its release; the next press is a turn. Each turn is one clear (at
        // its press) and one commit: a talk the held key or its release had started would
        // have added one of each.
        switch.release();
        hold(300);
        talk(&g, &switch, 400);
        g.wait_count("input_audio_buffer.commit", 2);
        hold(300);
        assert_eq!(g.count("input_audio_buffer.clear"), 2, "one clear per press");
        assert_eq!(g.commits(), 2);
    }
}

kernel_test! {
    fn events_the_kernel_dropped_are_resynchronised_from_eviocgkey() {
        // Ten keys: F13 and the digit row, to flood walkie's evdev buffer while it is stopped.
        let keys: Vec<u16> = std::iter::once(KEY_F13).chain(KEY_1..KEY_1 + 10).collect();
        let pad = VirtualDevice::create("walkie test keypad", &keys, false);
        let flood = || {
            for _ in 0..300 {
                pad.key(KEY_1, 1);
                pad.key(KEY_1, 0);
            }
        };
        let g = walkie_on(&pad.node.display().to_string(), "");
        g.wait_status("the keypad open", |st| reads(st, &pad.node));

        // The press is lost in the overflow: only EVIOCGKEY can tell walkie the key is down.
        g.pause(true);
        pad.key(KEY_F13, 1);
        flood();
        g.pause(false);
        g.wait_status("a talk from the resync", |st| st["button"]["pressed"] == true);
        hold(400);
        // And the release.
        g.pause(true);
        pad.key(KEY_F13, 0);
        flood();
        g.pause(false);
        g.wait_count("input_audio_buffer.commit", 1);
        g.wait_status("no talk", |st| st["button"]["pressed"] == false);
        let log = g.w.log();
        assert!(
            log.contains("events dropped; key is down") && log.contains("events dropped; key is up"),
            "the kernel's SYN_DROPPED reached walkie:\n{log}"
        );
    }
}

kernel_test! {
    fn walkie_devices_lists_the_switch_with_its_key_and_what_auto_takes() {
        let switch = VirtualDevice::switch("walkie listed switch");
        let g = walkie_on("auto", "");
        g.wait_status("the switch", |st| reads(st, &switch.node));
        let out = g.w.run_cmd(&["devices"]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let node = switch.node.display().to_string();
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&node))
            .unwrap_or_else(|| panic!("{node} not listed:\n{text}"));
        assert!(
            line.contains("walkie listed switch") && line.contains("1 key") && line.contains("has KEY_F13"),
            "{line}"
        );
        let keyboard = text
            .lines()
            .find(|l| l.contains(AT_KEYBOARD))
            .unwrap_or_else(|| panic!("the AT keyboard is not listed:\n{text}"));
        assert!(keyboard.contains("full keyboard") && keyboard.contains("has KEY_F13"), "{keyboard}");
        assert!(
            text.contains(&format!(
                "button.device = \"auto\" takes {node} (\"walkie listed switch\"): the only device with KEY_F13 that is not a full keyboard"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("the running walkie reads {node} (\"walkie listed switch\") [ok]: auto: ")),
            "{text}"
        );
    }
}

kernel_test! {
    fn walkie_button_learn_names_the_key_pressed_on_a_real_device() {
        // The device to find, beside qemu's keyboard. A directory of links to the two (the
        // audio tests' switch, in the other group, may be pressed meanwhile).
        let pad = VirtualDevice::create("walkie learn pad", &[KEY_F15, KEY_1], true);
        let w = crate::common::Walkie::new();
        let dir = w.path("input");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink("/dev/input/event0", dir.join("event0")).unwrap();
        let pad_link = dir.join(pad.node.file_name().unwrap());
        std::os::unix::fs::symlink(&pad.node, &pad_link).unwrap();
        let mut child = w
            .command(&["button", "learn", "--dir", dir.to_str().unwrap(), "--timeout", "30"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut prompt = String::new();
        std::io::BufRead::read_line(&mut stderr, &mut prompt).unwrap();
        assert!(
            prompt.starts_with("press the key you want to use (2 device(s) listening"),
            "{prompt}"
        );
        // F15 held: the kernel repeats it, and learn takes the press.
        pad.key(KEY_F15, 1);
        hold(400);
        pad.key(KEY_F15, 0);
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let node = pad_link.display();
        assert_eq!(
            stdout,
            format!(
                "pressed KEY_F15 (code 185) on {node} (walkie learn pad)\n\
                 put these two lines under [button] in {}:\n\
                 device = \"{node}\"\nkey = \"KEY_F15\"\n",
                w.config_path().display()
            )
        );
    }
}
