//! `walkie devices`: the ALSA PCMs and input devices this user can see, with their keys,
//! and which input device `button.device = "auto"` takes and why.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::Value;

use crate::config::Config;
use crate::paths::Paths;

/// How long to wait for a running walkie's status: the listing never hangs on it.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

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
        let kind = match (d.full_keyboard, d.key_count) {
            (Some(true), _) => "full keyboard".to_owned(),
            (_, Some(1)) => "1 key".to_owned(),
            (_, Some(n)) => format!("{n} keys"),
            _ => String::new(),
        };
        let name = d.name.as_deref().or(d.error.as_deref()).unwrap_or("");
        println!("  {:<24} {:<32} {:<14} {has}", d.path.display(), name, kind);
    }
    if let Some((code, _)) = &key {
        match crate::button::auto_choice(*code) {
            Ok((device, why)) => println!("button.device = \"auto\" takes {device}: {why}"),
            Err(why) => println!("button.device = \"auto\" finds nothing: {why}"),
        }
    }
    if let Some(button) = running_button(&paths) {
        let device = button.get("device").and_then(Value::as_str);
        let state = button.get("state").and_then(Value::as_str).unwrap_or("?");
        match device {
            Some(device) => {
                let name = button
                    .get("name")
                    .and_then(Value::as_str)
                    .map(|n| format!(" (\"{n}\")"))
                    .unwrap_or_default();
                let why = button
                    .get("chosen")
                    .and_then(Value::as_str)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                println!("the running walkie reads {device}{name} [{state}]{why}");
            }
            None => println!("the running walkie reads no input device [{state}]"),
        }
    }
    crate::cli::EXIT_OK
}

/// The `button` part of a running walkie's status, if one answers quickly.
fn running_button(paths: &Paths) -> Option<Value> {
    let mut stream = UnixStream::connect(paths.control_socket()).ok()?;
    stream.set_read_timeout(Some(STATUS_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(STATUS_TIMEOUT)).ok()?;
    stream.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    let reply: Value = serde_json::from_str(&line).ok()?;
    reply.get("status")?.get("button").cloned()
}
