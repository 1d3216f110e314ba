//! `walkie doctor`: checks the setup, one line each, with the fix. Runs in the foreground of
//! the command line, never inside the daemon.

use std::path::PathBuf;

use crate::config::Config;
use crate::paths::Paths;

/// `walkie doctor`: checks the setup, one line each, with the fix.
pub fn doctor(config_path: Option<PathBuf>) -> i32 {
    let paths = Paths::from_env();
    let mut problems = 0;
    let mut line = |ok: bool, what: &str, detail: String| {
        if !ok {
            problems += 1;
        }
        println!("{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
    };
    let source = Config::locate(config_path.as_deref(), &paths);
    let config = match Config::load_source(&source) {
        Ok(c) => {
            line(true, "configuration", source.to_string());
            c
        }
        Err(e) => {
            line(
                false,
                "configuration",
                format!("{e} (fix the file; `walkie config example` shows every key)"),
            );
            return crate::cli::EXIT_USAGE;
        }
    };
    match (config.realtime_url(), config.link_api_key()) {
        (None, _) => line(
            true,
            "realtime link",
            "disabled (realtime.url = \"none\")".into(),
        ),
        (Some(url), Ok(Some(_))) => line(true, "realtime link", format!("{url}, API key found")),
        (Some(url), Ok(None)) => line(
            true,
            "realtime link",
            format!("{url}, a loopback endpoint: no API key needed"),
        ),
        (Some(url), Err(e)) => line(false, "realtime link", format!("{url}: {e}")),
    }
    let program = config.agent.command.first().cloned().unwrap_or_default();
    let found = which(&program);
    line(
        found.is_some(),
        "agent command",
        match found {
            Some(p) => format!("{program} → {}", p.display()),
            None => format!("{program} is not on PATH (install it or set agent.command)"),
        },
    );
    for name in config.projects.keys() {
        let dir = config.project_dir(name).unwrap_or_default();
        line(
            dir.is_dir(),
            &format!("project {name}"),
            dir.display().to_string(),
        );
    }
    match std::os::unix::net::UnixStream::connect(paths.control_socket()) {
        Ok(_) => line(
            true,
            "daemon",
            format!("running ({})", paths.control_socket().display()),
        ),
        Err(_) => line(
            true,
            "daemon",
            "not running (start it with `walkie run` or systemctl --user start walkie)".into(),
        ),
    }
    line(
        true,
        "containment",
        crate::tasks::contain::doctor_report(&config, &paths),
    );
    let pcms = crate::audio::list_pcms();
    if config.audio.backend == crate::config::AudioBackend::Alsa {
        line(
            !pcms.is_empty(),
            "ALSA",
            format!("{} PCM(s) listed; `walkie devices` shows them", pcms.len()),
        );
    }
    match config.button.device.as_str() {
        "none" => line(true, "button", "disabled (ctl press/release only)".into()),
        "auto" => {
            let key = crate::button::keycodes::parse_key(&config.button.key);
            let devices = crate::button::list_input_devices(key);
            let with_key = devices.iter().filter(|d| d.has_key == Some(true)).count();
            line(
                with_key > 0,
                "button",
                format!(
                    "{with_key} input device(s) with {} (add your user to the `input` group if none is readable)",
                    config.button.key
                ),
            );
        }
        path => line(
            std::path::Path::new(path).exists(),
            "button",
            path.to_string(),
        ),
    }
    if problems == 0 {
        crate::cli::EXIT_OK
    } else {
        crate::cli::EXIT_FAILURE
    }
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
