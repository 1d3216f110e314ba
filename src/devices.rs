//! `walkie devices`: the ALSA PCMs and input devices this user can see, with their keys.

use crate::config::Config;
use crate::paths::Paths;

/// `walkie devices`: ALSA PCMs and input devices (with whether they have the key).
pub fn devices() -> i32 {
    let paths = Paths::from_env();
    let key = Config::load_source(&Config::locate(None, &paths))
        .ok()
        .and_then(|c| crate::button::keycodes::parse_key(&c.button.key).map(|k| (k, c.button.key)));
    println!("ALSA PCMs:");
    for pcm in crate::audio::list_pcms() {
        let dir = match (pcm.input, pcm.output) {
            (true, true) => "in/out",
            (true, false) => "in",
            (false, true) => "out",
            _ => "",
        };
        println!(
            "  {:<32} {:<7} {}",
            pcm.name,
            dir,
            pcm.description.replace('\n', " ")
        );
    }
    println!("input devices:");
    let devices = crate::button::list_input_devices(key.as_ref().map(|(k, _)| *k));
    if devices.is_empty() {
        println!("  (none readable under /dev/input)");
    }
    for d in devices {
        let has = match (d.has_key, &key) {
            (Some(true), Some((_, name))) => format!("has {name}"),
            (Some(false), Some((_, name))) => format!("no {name}"),
            _ => String::new(),
        };
        let name = d.name.as_deref().or(d.error.as_deref()).unwrap_or("");
        println!("  {:<24} {:<32} {has}", d.path.display(), name);
    }
    crate::cli::EXIT_OK
}
