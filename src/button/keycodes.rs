//! Key names ↔ evdev key codes, for `[button] key` and `walkie devices`.
//!
//! The table (`keycodes_table.rs`) is generated from the kernel's
//! `linux/input-event-codes.h` by `gen_keycodes.py` beside this file, so every `KEY_*` and
//! `BTN_*` name a user finds with `evtest` or in the kernel docs works as written. A code
//! newer than the table still works as a decimal number.

#[path = "keycodes_table.rs"]
mod table;

use table::{KEY_ALIASES, KEY_NAMES};

/// The highest key code (`KEY_MAX`).
pub const KEY_MAX: u16 = crate::sys::evdev::KEY_MAX;

/// A key from its `KEY_*`/`BTN_*` name (ASCII case ignored) or its decimal code
/// `1..=767`. Code 0 (`KEY_RESERVED`) is never reported by a device, so it is refused.
pub fn parse_key(s: &str) -> Option<u16> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u16>()
            .ok()
            .filter(|&c| (1..=KEY_MAX).contains(&c));
    }
    KEY_NAMES
        .iter()
        .find(|(_, name)| name.eq_ignore_ascii_case(s))
        .map(|&(code, _)| code)
        .or_else(|| {
            KEY_ALIASES
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(s))
                .map(|&(_, code)| code)
        })
}

/// The canonical name of a key code (`BTN_SOUTH`, not its alias `BTN_A`), if it has one.
pub fn key_name(code: u16) -> Option<&'static str> {
    KEY_NAMES
        .binary_search_by_key(&code, |&(c, _)| c)
        .ok()
        .map(|i| KEY_NAMES[i].1)
}

/// A key for messages: its name, or `key 700` for an unnamed code.
pub fn describe(code: u16) -> String {
    match key_name(code) {
        Some(name) => name.to_owned(),
        None => format!("key {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique_so_binary_search_works() {
        assert!(KEY_NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(KEY_NAMES.len() > 500, "table lost most of its rows");
    }

    #[test]
    fn known_names_map_to_their_codes() {
        assert_eq!(parse_key("KEY_F13"), Some(183));
        assert_eq!(parse_key("KEY_ESC"), Some(1));
        assert_eq!(parse_key("KEY_SPACE"), Some(57));
        assert_eq!(parse_key("KEY_MICMUTE"), Some(248));
        assert_eq!(parse_key("BTN_LEFT"), Some(0x110));
        assert_eq!(parse_key("BTN_TRIGGER_HAPPY40"), Some(0x2e7));
        assert_eq!(parse_key("key_f13"), Some(183), "case is ignored");
        assert_eq!(
            parse_key("  KEY_F13 "),
            Some(183),
            "surrounding blanks are ignored"
        );
    }

    #[test]
    fn aliases_and_range_markers_parse_but_names_are_canonical() {
        assert_eq!(parse_key("BTN_A"), Some(0x130));
        assert_eq!(parse_key("BTN_GAMEPAD"), Some(0x130));
        assert_eq!(parse_key("BTN_MISC"), Some(0x100));
        assert_eq!(parse_key("KEY_SCREENLOCK"), Some(152));
        assert_eq!(key_name(0x130), Some("BTN_SOUTH"));
        assert_eq!(key_name(0x100), Some("BTN_0"));
        assert_eq!(key_name(0x110), Some("BTN_LEFT"));
        assert_eq!(key_name(152), Some("KEY_COFFEE"));
        assert_eq!(key_name(183), Some("KEY_F13"));
    }

    #[test]
    fn numbers_are_accepted_up_to_key_max() {
        assert_eq!(parse_key("183"), Some(183));
        assert_eq!(parse_key("767"), Some(767));
        assert_eq!(parse_key("1"), Some(1));
        assert_eq!(parse_key("768"), None);
        assert_eq!(parse_key("0"), None);
        assert_eq!(parse_key("99999999999"), None);
        assert_eq!(parse_key("-1"), None);
        assert_eq!(parse_key("+5"), None);
    }

    #[test]
    fn junk_and_bounds_are_refused() {
        for bad in [
            "",
            "F13",
            "KEY_F99",
            "KEY_MAX",
            "KEY_CNT",
            "KEY_RESERVED",
            "KEY_F13x",
        ] {
            assert_eq!(parse_key(bad), None, "{bad:?}");
        }
        assert_eq!(key_name(0), None);
        assert_eq!(key_name(0x2ff), None);
        assert_eq!(describe(183), "KEY_F13");
        assert_eq!(describe(0x2fe), "key 766");
    }

    /// Cross-checks the generated table against the header on this machine, when the
    /// kernel headers are installed: every numeric define must parse to its value.
    #[test]
    fn table_agrees_with_installed_kernel_header() {
        let Ok(header) = std::fs::read_to_string("/usr/include/linux/input-event-codes.h") else {
            eprintln!("linux/input-event-codes.h not installed; cross-check skipped");
            return;
        };
        let re = regex::Regex::new(r"(?m)^#define\s+((?:KEY|BTN)_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s")
            .unwrap();
        let mut checked = 0;
        for cap in re.captures_iter(&header) {
            let name = &cap[1];
            let text = &cap[2];
            let value = match text.strip_prefix("0x") {
                Some(hex) => u16::from_str_radix(hex, 16).unwrap(),
                None => text.parse().unwrap(),
            };
            if matches!(name, "KEY_MAX" | "KEY_RESERVED") {
                continue;
            }
            // A header newer than the table may add keys; those still parse as numbers.
            if let Some(code) = parse_key(name) {
                assert_eq!(code, value, "{name}");
                checked += 1;
            }
        }
        assert!(checked > 500, "only {checked} names matched the header");
    }
}
