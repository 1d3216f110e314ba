//! `walkie doctor`: checks the setup the way the *service* will run it, one line each —
//! pass, warn or fail — with the fix for anything that is not a pass.
//!
//! Runs in the foreground of the command line, never inside the daemon, so it may block
//! (it opens the audio devices, runs the agent's `--version`, and tries the Realtime
//! upgrade, each with a time limit). The environment it checks against is the systemd user
//! unit's: its `Environment=` lines and its `EnvironmentFile=` (`~/.config/walkie/env`),
//! which is where the service gets its API key and `PATH` — not the shell's profile. Without
//! an installed unit it checks this shell's environment and says so.
//!
//! Exit code: 0 when nothing failed (warnings allowed), 1 when a check failed, 2 when the
//! configuration itself is invalid (nothing else can be checked then).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{AudioBackend, Config, ConfigError};
use crate::paths::Paths;

/// How long `agent --version` may take (Claude Code starts in well under a second).
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect, TLS, upgrade and the first server event, together.
const LINK_TIMEOUT: Duration = Duration::from_secs(8);
/// The user manager's PATH when neither the unit nor its environment file sets one.
const SYSTEMD_USER_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin";

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub level: Level,
    pub what: String,
    pub detail: String,
    /// What to do about it (warnings and failures).
    pub fix: Option<String>,
}

impl Check {
    fn pass(what: &str, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Pass,
            what: what.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(what: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            what: what.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(what: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            what: what.into(),
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `pass  what: detail` or `FAIL  what: detail → fix: …`.
    pub fn line(&self) -> String {
        let level = match self.level {
            Level::Pass => "pass",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        match &self.fix {
            Some(fix) => format!("{level}  {}: {} → fix: {fix}", self.what, self.detail),
            None => format!("{level}  {}: {}", self.what, self.detail),
        }
    }
}

/// `walkie doctor [--config FILE]`.
pub fn doctor(config_path: Option<PathBuf>) -> i32 {
    let paths = Paths::from_env();
    let source = Config::locate(config_path.as_deref(), &paths);
    let config = match Config::load_source(&source) {
        Ok(config) => {
            print_line(&Check::pass("configuration", source.to_string()));
            config
        }
        Err(e) => {
            for message in config_errors(&e) {
                print_line(&Check::fail(
                    "configuration",
                    message,
                    "correct the file (`walkie config example` shows every key)",
                ));
            }
            return crate::cli::EXIT_USAGE;
        }
    };
    let mut failed = false;
    let mut emit = |check: Check| {
        failed |= check.level == Level::Fail;
        print_line(&check);
    };
    let service = ServiceEnv::discover(&paths);
    for check in service.checks(&paths) {
        emit(check);
    }
    let key = check_api_key(&config, &service);
    let key_ok = key.1.is_some();
    emit(key.0);
    if config.realtime_url().is_some() && (key_ok || endpoint_is_loopback(&config)) {
        emit(check_endpoint(&config, key.1.as_deref()));
    }
    for check in check_audio(&config) {
        emit(check);
    }
    emit(check_button(&config));
    for check in check_realtime_rights(&service) {
        emit(check);
    }
    for check in check_agent(&config, &service) {
        emit(check);
    }
    for name in config.projects.keys() {
        let dir = config.project_dir(name).unwrap_or_default();
        emit(if dir.is_dir() {
            Check::pass(&format!("project {name}"), dir.display().to_string())
        } else {
            Check::fail(
                &format!("project {name}"),
                format!("{} is not a directory", dir.display()),
                format!("create it, or correct projects.{name} in the configuration"),
            )
        });
    }
    emit(Check::pass(
        "containment",
        crate::tasks::contain::doctor_report(&config, &paths),
    ));
    for check in check_directories(&paths) {
        emit(check);
    }
    emit(check_daemon(&paths));
    if failed {
        crate::cli::EXIT_FAILURE
    } else {
        crate::cli::EXIT_OK
    }
}

fn print_line(check: &Check) {
    println!("{}", check.line());
}

/// Every error of an invalid configuration, one message each.
fn config_errors(error: &ConfigError) -> Vec<String> {
    error.to_string().lines().map(str::to_string).collect()
}

// ---- the service's environment ----

/// What the systemd user unit gives walkie: where the unit is, whether it is enabled, and
/// the variables it sets (unit `Environment=` lines, then its `EnvironmentFile=`).
#[derive(Debug, Default)]
pub struct ServiceEnv {
    /// The unit file, when one is installed.
    pub unit: Option<PathBuf>,
    pub enabled: bool,
    /// `EnvironmentFile=` paths, `%h` expanded, and whether each exists.
    pub env_files: Vec<(PathBuf, bool)>,
    /// The variables the service starts with (as far as walkie can tell).
    pub vars: BTreeMap<String, String>,
    /// Problems found while reading the unit or its files.
    pub problems: Vec<String>,
}

impl ServiceEnv {
    /// Finds `walkie.service` where the user manager looks for units; without one, the
    /// environment is this process's own.
    pub fn discover(paths: &Paths) -> ServiceEnv {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/".into());
        let Some(unit) = find_unit(paths) else {
            return ServiceEnv {
                vars: std::env::vars().collect(),
                ..ServiceEnv::default()
            };
        };
        let mut service = ServiceEnv {
            enabled: unit_enabled(paths),
            ..ServiceEnv::default()
        };
        // systemd gives a user service these from the user database.
        for var in [
            "HOME",
            "USER",
            "LOGNAME",
            "SHELL",
            "XDG_RUNTIME_DIR",
            "LANG",
        ] {
            if let Ok(value) = std::env::var(var) {
                service.vars.insert(var.into(), value);
            }
        }
        service
            .vars
            .insert("PATH".into(), SYSTEMD_USER_DEFAULT_PATH.into());
        let mut files = vec![unit.clone()];
        files.extend(drop_ins(&unit));
        let mut env_files = Vec::new();
        for file in &files {
            let Ok(text) = std::fs::read_to_string(file) else {
                service
                    .problems
                    .push(format!("cannot read {}", file.display()));
                continue;
            };
            for (key, value) in unit_settings(&text) {
                match key.as_str() {
                    "Environment" => {
                        for assignment in split_words(&value) {
                            if let Some((k, v)) = assignment.split_once('=') {
                                service
                                    .vars
                                    .insert(k.to_string(), expand_specifiers(v, &home));
                            }
                        }
                    }
                    "EnvironmentFile" => {
                        let optional = value.starts_with('-');
                        let path = expand_specifiers(value.trim_start_matches('-'), &home);
                        env_files.push((PathBuf::from(path), optional));
                    }
                    _ => {}
                }
            }
        }
        // Environment files are read after the Environment= lines and win over them.
        for (path, optional) in env_files {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    for (k, v) in env_file_vars(&text) {
                        service.vars.insert(k, v);
                    }
                    service.env_files.push((path, true));
                }
                Err(_) => {
                    if !optional {
                        service.problems.push(format!(
                            "{} is missing and not optional: the service will not start",
                            path.display()
                        ));
                    }
                    service.env_files.push((path, false));
                }
            }
        }
        service.unit = Some(unit);
        service
    }

    /// The variable as the service will see it.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// Where the checks take their environment from, for messages.
    fn source(&self) -> String {
        match (
            &self.unit,
            self.env_files.iter().find(|(_, exists)| *exists),
        ) {
            (Some(_), Some((file, _))) => format!("the service's environment ({})", file.display()),
            (Some(unit), None) => format!("the service's environment ({})", unit.display()),
            (None, _) => "this shell's environment".into(),
        }
    }

    /// The service's own lines: installed, enabled, its environment file.
    fn checks(&self, paths: &Paths) -> Vec<Check> {
        let mut checks = Vec::new();
        let Some(unit) = &self.unit else {
            checks.push(Check::warn(
                "service",
                "no walkie.service user unit; the checks below use this shell's environment",
                "`make install` (then `systemctl --user enable --now walkie`), or run `walkie run` yourself",
            ));
            return checks;
        };
        let env_file = paths
            .config_file
            .parent()
            .map(|d| d.join("env"))
            .unwrap_or_default();
        let env_note = match self.env_files.iter().find(|(_, exists)| *exists) {
            Some((file, _)) => format!("environment from {}", file.display()),
            None => format!("no environment file ({} is missing)", env_file.display()),
        };
        if self.enabled {
            checks.push(Check::pass(
                "service",
                format!("{} (enabled); {env_note}", unit.display()),
            ));
        } else {
            checks.push(Check::warn(
                "service",
                format!("{} is installed but not enabled; {env_note}", unit.display()),
                "systemctl --user enable --now walkie (and `loginctl enable-linger $USER` to run without a login)",
            ));
        }
        checks.push(Check::pass(
            "service PATH",
            self.var("PATH")
                .unwrap_or(SYSTEMD_USER_DEFAULT_PATH)
                .to_string(),
        ));
        for problem in &self.problems {
            checks.push(Check::fail(
                "service",
                problem.clone(),
                "correct the unit or create the file",
            ));
        }
        for (file, exists) in &self.env_files {
            if !exists {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(file)
                && meta.permissions().mode() & 0o077 != 0
            {
                checks.push(Check::fail(
                    "service",
                    format!(
                        "{} is readable by other users (mode {:04o}) and may hold keys",
                        file.display(),
                        meta.permissions().mode() & 0o7777
                    ),
                    format!("chmod 600 {}", file.display()),
                ));
            }
        }
        checks
    }
}

/// The first `walkie.service` on the user manager's unit search path.
fn find_unit(paths: &Paths) -> Option<PathBuf> {
    unit_dirs(paths)
        .into_iter()
        .map(|dir| dir.join("walkie.service"))
        .find(|p| p.is_file())
}

/// systemd.unit(5), "User Unit Search Path", in order.
fn unit_dirs(paths: &Paths) -> Vec<PathBuf> {
    let config_home = paths
        .config_file
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let data_home = paths.data_dir.parent().map(Path::to_path_buf);
    let mut dirs = vec![config_home.join("systemd/user"), "/etc/systemd/user".into()];
    if let Ok(runtime) = std::env::var("XDG_RUNTIME_DIR") {
        dirs.push(Path::new(&runtime).join("systemd/user"));
    }
    dirs.push("/run/systemd/user".into());
    if let Some(data_home) = data_home {
        dirs.push(data_home.join("systemd/user"));
    }
    let data_dirs =
        std::env::var("XDG_DATA_DIRS").unwrap_or_else(|_| "/usr/local/share:/usr/share".into());
    for dir in data_dirs.split(':').filter(|d| d.starts_with('/')) {
        dirs.push(Path::new(dir).join("systemd/user"));
    }
    dirs.push("/usr/local/lib/systemd/user".into());
    dirs.push("/usr/lib/systemd/user".into());
    dirs
}

/// `walkie.service.d/*.conf` beside the unit (e.g. from `systemctl --user edit walkie`).
fn drop_ins(unit: &Path) -> Vec<PathBuf> {
    let dir = unit.with_file_name("walkie.service.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// `systemctl --user enable walkie` makes this link.
fn unit_enabled(paths: &Paths) -> bool {
    let config_home = paths
        .config_file
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    [
        config_home.join("systemd/user/default.target.wants/walkie.service"),
        "/etc/systemd/user/default.target.wants/walkie.service".into(),
    ]
    .iter()
    .any(|link| link.exists())
}

/// `Key=value` lines of a unit file (continuation lines joined; comments skipped).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        if let Some((key, value)) = pending.split_once('=') {
            out.push((key.trim().to_string(), value.trim().to_string()));
        }
        pending.clear();
    }
    out
}

/// Splits an `Environment=` value into assignments, honouring double and single quotes.
fn split_words(value: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (_, '\\') => word.extend(chars.next()),
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (_, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The specifiers walkie's unit uses: `%h` (home), `%u`/`%U` (user name, uid), `%t`
/// (runtime directory), `%%`.
fn expand_specifiers(value: &str, home: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(home),
            Some('u') => out.push_str(&std::env::var("USER").unwrap_or_default()),
            Some('U') => out.push_str(&nix::unistd::getuid().to_string()),
            Some('t') => out.push_str(&std::env::var("XDG_RUNTIME_DIR").unwrap_or_default()),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `VAR=value` lines of an environment file (systemd.exec(5), `EnvironmentFile=`).
fn env_file_vars(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (key, value) = l.split_once('=')?;
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            Some((key.trim().to_string(), value.to_string()))
        })
        .collect()
}

/// `program` on `path` (or as given, when it holds a slash), if it is an executable file.
fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return Some(PathBuf::from(program)).filter(|p| executable(p));
    }
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

// ---- the checks ----

/// The key as the service will see it; the key itself only for the endpoint check.
fn check_api_key(config: &Config, service: &ServiceEnv) -> (Check, Option<String>) {
    let what = "API key";
    if config.realtime_url().is_none() {
        return (
            Check::pass(what, "not needed (realtime.url = \"none\")"),
            None,
        );
    }
    let var = &config.realtime.api_key_env;
    match config.api_key_from(|name| service.var(name).map(Into::into)) {
        Ok(key) => {
            let from = if config.realtime.api_key_file.is_empty() {
                format!("{var} in {}", service.source())
            } else {
                config.realtime.api_key_file.clone()
            };
            (Check::pass(what, format!("found ({from})")), Some(key))
        }
        Err(e) => {
            let in_shell = std::env::var_os(var).is_some_and(|v| !v.is_empty());
            let env_file = service
                .env_files
                .first()
                .map(|(p, _)| p.display().to_string())
                .unwrap_or_else(|| "~/.config/walkie/env".into());
            let fix = if !config.realtime.api_key_file.is_empty() {
                format!(
                    "put the key alone in {}, a regular file (chmod 600)",
                    config.realtime.api_key_file
                )
            } else if e.is_config_error() {
                format!("{var} must hold the key alone: printable ASCII, no spaces or line breaks")
            } else if service.unit.is_some() && in_shell {
                format!(
                    "your shell has {var} but the service does not read your profile: put {var}=… in {env_file} (chmod 600)"
                )
            } else if service.unit.is_some() {
                format!("put {var}=sk-… in {env_file} (chmod 600), or set realtime.api_key_file")
            } else {
                format!("export {var}=sk-… (or set realtime.api_key_file)")
            };
            let level = if endpoint_is_loopback(config) && !e.is_config_error() {
                Level::Warn
            } else {
                Level::Fail
            };
            let mut check = Check::fail(what, e.to_string(), fix);
            check.level = level;
            (check, None)
        }
    }
}

fn endpoint_is_loopback(config: &Config) -> bool {
    crate::config::Endpoint::parse(&config.realtime.url).is_ok_and(|e| e.is_loopback())
}

/// Connects, upgrades and reads the first event: `session.created` means the key and the
/// model were accepted. A network that cannot reach the endpoint is a warning (the daemon
/// retries); a refusal is a failure.
fn check_endpoint(config: &Config, key: Option<&str>) -> Check {
    let what = "Realtime endpoint";
    let Some(url) = config.realtime_url() else {
        return Check::pass(what, "disabled");
    };
    match crate::realtime::probe::probe(&url, key, config.realtime.ca_file.trim(), LINK_TIMEOUT) {
        Ok(model) => Check::pass(
            what,
            format!(
                "{} accepted the key and started a session with {model}",
                host_of(&url)
            ),
        ),
        Err(crate::realtime::probe::ProbeError::Unreachable(why)) => Check::warn(
            what,
            format!("could not reach {}: {why}", host_of(&url)),
            "check the network (walkie keeps retrying with backoff when it runs)",
        ),
        Err(crate::realtime::probe::ProbeError::Refused(why)) => Check::fail(
            what,
            format!("{} refused: {why}", host_of(&url)),
            "check the key, the account's quota and realtime.model",
        ),
    }
}

fn host_of(url: &str) -> String {
    crate::config::Endpoint::parse(url)
        .map(|e| format!("{}:{}", e.host, e.port))
        .unwrap_or_else(|_| "the endpoint".into())
}

fn check_audio(config: &Config) -> Vec<Check> {
    let audio = &config.audio;
    match audio.backend {
        AudioBackend::None => vec![Check::pass("audio", "disabled (audio.backend = \"none\")")],
        AudioBackend::Wav => {
            let mut checks = Vec::new();
            let input = Path::new(&audio.input_wav);
            checks.push(if audio.input_wav.is_empty() || input.is_file() {
                Check::pass("audio input", format!("wav backend: {:?}", audio.input_wav))
            } else {
                Check::fail(
                    "audio input",
                    format!("{} does not exist", input.display()),
                    "set audio.input_wav to a 24 kHz mono WAV file",
                )
            });
            let out_dir = Path::new(&audio.output_wav)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            checks.push(if out_dir.is_dir() {
                Check::pass(
                    "audio output",
                    format!("wav backend: {:?}", audio.output_wav),
                )
            } else {
                Check::fail(
                    "audio output",
                    format!("{} is not a directory", out_dir.display()),
                    "set audio.output_wav to a file in an existing directory",
                )
            });
            checks
        }
        AudioBackend::Alsa => vec![
            check_pcm(
                "capture",
                &audio.capture_device,
                "capture_device",
                audio.period_ms,
            ),
            check_pcm(
                "playback",
                &audio.playback_device,
                "playback_device",
                audio.period_ms,
            ),
        ],
        AudioBackend::Pulse => vec![
            match crate::audio::probe_pulse_source(&audio.capture_device, audio.period_ms) {
                Ok(source) => Check::pass(
                    "audio capture",
                    format!("PulseAudio source \"{source}\" records at 24 kHz mono"),
                ),
                Err(e) => Check::fail(
                    "audio capture",
                    e,
                    "start the sound server (PulseAudio or PipeWire's pipewire-pulse) in this \
                     session, or set audio.capture_device to a name from `pactl list short sources`",
                ),
            },
            check_pcm(
                "playback",
                &audio.playback_device,
                "playback_device",
                audio.period_ms,
            ),
        ],
    }
}

/// An ALSA PCM opened the way the audio thread opens it.
fn check_pcm(dir: &str, device: &str, key: &str, period_ms: u32) -> Check {
    let what = if dir == "capture" {
        "audio capture"
    } else {
        "audio playback"
    };
    match crate::audio::probe_pcm(device, dir == "capture", period_ms) {
        Ok(()) => Check::pass(what, format!("ALSA \"{device}\" opens at 24 kHz mono")),
        Err(e) if e.contains("busy") => Check::warn(
            what,
            e,
            "another program (or a running walkie) holds the device; stop it to check",
        ),
        Err(e) => Check::fail(
            what,
            e,
            format!(
                "set audio.{key} to a name from `walkie devices` (a USB device is usually \"plughw:CARD=Device,DEV=0\")"
            ),
        ),
    }
}

fn check_button(config: &Config) -> Check {
    let what = "button";
    let key_name = &config.button.key;
    let Some(key) = crate::button::keycodes::parse_key(key_name) else {
        return Check::fail(
            what,
            format!("unknown key {key_name:?}"),
            "walkie button learn",
        );
    };
    let groups_fix = input_group_fix();
    match config.button.device.as_str() {
        "none" => Check::pass(what, "disabled (walkie ctl press/release only)"),
        "auto" => {
            let devices = crate::button::list_input_devices(Some(key));
            let with_key: Vec<_> = devices.iter().filter(|d| d.has_key == Some(true)).collect();
            let unreadable = devices.iter().filter(|d| d.error.is_some()).count();
            match (with_key.first(), unreadable) {
                (Some(first), _) => Check::pass(
                    what,
                    format!(
                        "{} device(s) with {key_name}, e.g. {} ({})",
                        with_key.len(),
                        first.path.display(),
                        first.name.as_deref().unwrap_or("?")
                    ),
                ),
                (None, n) if n > 0 => Check::fail(
                    what,
                    format!(
                        "no readable input device has {key_name}; {n} device(s) are not readable"
                    ),
                    groups_fix,
                ),
                (None, _) if devices.is_empty() => Check::fail(
                    what,
                    "no input devices under /dev/input".to_string(),
                    "plug in the button (or set button.device = \"none\" and use walkie ctl press)",
                ),
                (None, _) => Check::fail(
                    what,
                    format!("no input device has {key_name}"),
                    "press the key you want under `walkie button learn` and copy the two lines it prints",
                ),
            }
        }
        path => {
            let path = Path::new(path);
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) => {
                    return Check::fail(
                        what,
                        format!("{}: {e}", path.display()),
                        "plug the device in, or find its name with `walkie button learn`",
                    );
                }
            };
            if meta.file_type().is_fifo() {
                return Check::pass(
                    what,
                    format!("{} is a FIFO of input_event records", path.display()),
                );
            }
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
            {
                Ok(file) => file,
                Err(e) => {
                    let fix = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        groups_fix
                    } else {
                        "set button.device to an evdev node (`walkie button learn` names it)".into()
                    };
                    return Check::fail(what, format!("cannot open {}: {e}", path.display()), fix);
                }
            };
            use std::os::fd::AsFd;
            match crate::sys::evdev::has_key(file.as_fd(), key) {
                Ok(true) => {
                    let name = crate::sys::evdev::device_name(file.as_fd()).unwrap_or_default();
                    Check::pass(what, format!("{} ({name}) has {key_name}", path.display()))
                }
                Ok(false) => Check::fail(
                    what,
                    format!("{} cannot send {key_name}", path.display()),
                    "find the key's name with `walkie button learn`",
                ),
                Err(_) => Check::fail(
                    what,
                    format!("{} is not an input device", path.display()),
                    "set button.device to /dev/input/by-id/… (`walkie button learn` names it)",
                ),
            }
        }
    }
}

/// The fix for unreadable input devices: join `input`, and if that was done already, log in
/// again (group membership is read at login; the user manager keeps the old one too).
fn input_group_fix() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "$USER".into());
    let listed = std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("input:"))
        .any(|rest| {
            rest.rsplit(':')
                .next()
                .is_some_and(|members| members.split(',').any(|m| m == user))
        });
    if listed {
        "you are in the input group, but not in this login: log out and in again (for the service: `sudo systemctl restart user@$(id -u)` or reboot)".into()
    } else {
        format!("sudo usermod -aG input {user}, then log out and in again (a new login is needed)")
    }
}

/// RLIMIT_RTPRIO and RLIMIT_MEMLOCK as the audio threads will have them. Under systemd a
/// user service gets at most its user manager's hard limits (the unit's `LimitRTPRIO=20`
/// and `LimitMEMLOCK=infinity` cannot raise them), so those are read from the manager's
/// `/proc/PID/limits` when the unit is installed and the manager runs; else this process's.
fn check_realtime_rights(service: &ServiceEnv) -> Vec<Check> {
    use nix::sys::resource::{Resource, getrlimit};
    let wanted = crate::sys::sched::AUDIO_THREAD_PRIORITY as u64;
    let fix = "let the service have them: `sudo systemctl edit user@$(id -u)` with [Service] LimitRTPRIO=20 and LimitMEMLOCK=infinity, then log in again (docs/PI.md)";
    let manager = service.unit.as_ref().and_then(|_| user_manager_limits());
    let (whose, rtprio, memlock, privileged) = match manager {
        Some((pid, rtprio, memlock)) => (
            format!("the user manager (pid {pid}) allows"),
            rtprio,
            memlock,
            false,
        ),
        None => (
            "this process has".to_string(),
            getrlimit(Resource::RLIMIT_RTPRIO).map_or(0, |(soft, _)| soft),
            getrlimit(Resource::RLIMIT_MEMLOCK).map_or(0, |(soft, _)| soft),
            nix::unistd::geteuid().is_root(),
        ),
    };
    let mut checks = Vec::new();
    checks.push(if privileged || rtprio >= wanted {
        Check::pass("real-time priority", format!("SCHED_FIFO {wanted} allowed"))
    } else {
        Check::warn(
            "real-time priority",
            format!("{whose} RLIMIT_RTPRIO {rtprio} (the audio threads ask for {wanted}); audio may glitch under load"),
            fix,
        )
    });
    checks.push(if privileged || memlock == libc::RLIM_INFINITY {
        Check::pass("locked memory", "mlockall allowed")
    } else {
        Check::warn(
            "locked memory",
            format!("{whose} RLIMIT_MEMLOCK {memlock} bytes; audio memory may be swapped out"),
            fix,
        )
    });
    checks
}

/// The running `systemd --user` of this uid: its pid and hard RTPRIO and MEMLOCK limits
/// (`RLIM_INFINITY` for unlimited).
fn user_manager_limits() -> Option<(i32, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::getuid().as_raw();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !entry.metadata().is_ok_and(|m| m.uid() == uid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let mut args = cmdline.split(|b| *b == 0);
        let is_manager = args
            .next()
            .is_some_and(|a| a.ends_with(b"/systemd") || a == b"systemd")
            && args.any(|a| a == b"--user");
        if !is_manager {
            continue;
        }
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let (rtprio, memlock) = parse_hard_limits(&limits)?;
        return Some((pid, rtprio, memlock));
    }
    None
}

/// The hard "Max realtime priority" and "Max locked memory" of a `/proc/PID/limits` text.
fn parse_hard_limits(text: &str) -> Option<(u64, u64)> {
    let hard = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
        match *fields.get(1)? {
            "unlimited" => Some(libc::RLIM_INFINITY),
            n => n.parse().ok(),
        }
    };
    Some((hard("Max realtime priority")?, hard("Max locked memory")?))
}

fn check_agent(config: &Config, service: &ServiceEnv) -> Vec<Check> {
    let what = "agent";
    let Some(program) = config.agent.command.first() else {
        return vec![Check::fail(
            what,
            "agent.command is empty",
            "set agent.command",
        )];
    };
    let service_path = service.var("PATH").unwrap_or(SYSTEMD_USER_DEFAULT_PATH);
    let found = find_program(program, service_path);
    let Some(found) = found else {
        let in_shell = std::env::var("PATH")
            .ok()
            .and_then(|p| find_program(program, &p));
        let detail = format!("{program} is not on the PATH of {}", service.source());
        let fix = match (in_shell, service.unit.is_some()) {
            (Some(shell), true) => format!(
                "your shell finds {}: add {} to the PATH= line of {} (or write the full path in agent.command)",
                shell.display(),
                shell.parent().unwrap_or(Path::new("/")).display(),
                service
                    .env_files
                    .first()
                    .map(|(p, _)| p.display().to_string())
                    .unwrap_or_else(|| "~/.config/walkie/env".into())
            ),
            _ if Path::new(program).file_name().is_some_and(|n| n == "claude") => {
                "install Claude Code (docs/PI.md: `curl -fsSL https://claude.ai/install.sh | bash` or `npm install -g @anthropic-ai/claude-code`), or set agent.command".into()
            }
            _ => "install it, or set agent.command to its full path".into(),
        };
        return vec![Check::fail(what, detail, fix)];
    };
    let mut checks = Vec::new();
    match run_version(&found, service) {
        Ok(version) => checks.push(Check::pass(
            what,
            format!("{} answers --version: {version}", found.display()),
        )),
        Err(why) => checks.push(Check::fail(
            what,
            format!("{} --version {why}", found.display()),
            "run it by hand to see why; reinstall it if it is broken",
        )),
    }
    if found.file_name().is_some_and(|n| n == "claude") {
        checks.push(check_claude_login(config, service));
    }
    checks
}

/// Runs `program --version` with the environment an agent gets, within [`AGENT_TIMEOUT`].
fn run_version(program: &Path, service: &ServiceEnv) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for name in &[String::from("PATH"), String::from("HOME")] {
        if let Some(value) = service.var(name) {
            cmd.env(name, value);
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > AGENT_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not answer in {} s", AGENT_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.by_ref().take(4096).read_to_string(&mut out);
    }
    let first = out.lines().next().unwrap_or("").trim().to_string();
    if status.success() && !first.is_empty() {
        Ok(first)
    } else if status.success() {
        Err("printed nothing".into())
    } else {
        Err(format!("failed ({status})"))
    }
}

/// Claude Code is logged in when it has an API key in its environment or stored OAuth
/// credentials (`~/.claude/.credentials.json`, or under `$CLAUDE_CONFIG_DIR`).
fn check_claude_login(config: &Config, service: &ServiceEnv) -> Check {
    let what = "agent login";
    let passes = |var: &str| config.agent.env_pass.iter().any(|v| v == var);
    let key_in_env = ["ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN"]
        .iter()
        .find(|var| {
            config.agent.env_set.contains_key(**var)
                || (passes(var) && service.var(var).is_some_and(|v| !v.is_empty()))
        });
    if let Some(var) = key_in_env {
        return Check::pass(what, format!("{var} reaches the agent"));
    }
    let home = service.var("HOME").unwrap_or("/");
    let config_dir = service
        .var("CLAUDE_CONFIG_DIR")
        .filter(|_| passes("CLAUDE_CONFIG_DIR"))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(home).join(".claude"));
    let credentials = config_dir.join(".credentials.json");
    if credentials.is_file() {
        Check::pass(what, format!("credentials in {}", credentials.display()))
    } else {
        Check::warn(
            what,
            format!(
                "no {} and no ANTHROPIC_API_KEY for the agent: tasks will fail with an authentication error",
                credentials.display()
            ),
            "run `claude` once and log in (/login), or put ANTHROPIC_API_KEY=… in ~/.config/walkie/env",
        )
    }
}

fn check_directories(paths: &Paths) -> Vec<Check> {
    [
        ("state directory", &paths.state_dir),
        ("data directory", &paths.data_dir),
        ("runtime directory", &paths.runtime_dir),
    ]
    .into_iter()
    .map(|(what, dir)| {
        // The directory, or the nearest existing parent walkie would create it in.
        let existing = dir
            .ancestors()
            .find(|d| d.exists())
            .unwrap_or(Path::new("/"));
        match nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK) {
            Ok(()) if existing == dir.as_path() => Check::pass(what, dir.display().to_string()),
            Ok(()) => Check::pass(what, format!("{} (created at start)", dir.display())),
            Err(e) => Check::fail(
                what,
                format!("{} is not writable: {e}", existing.display()),
                format!("fix the owner or mode of {}", existing.display()),
            ),
        }
    })
    .collect()
}

fn check_daemon(paths: &Paths) -> Check {
    let socket = paths.control_socket();
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => Check::pass("daemon", format!("running ({})", socket.display())),
        Err(_) => Check::pass(
            "daemon",
            "not running (systemctl --user start walkie, or walkie run)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_environment_lines_are_split_like_systemd_does() {
        assert_eq!(
            split_words(r#"A=1 "B=two words" 'C=x y' D=\"q"#),
            ["A=1", "B=two words", "C=x y", "D=\"q"]
        );
        assert_eq!(
            expand_specifiers("%h/.local/bin:%%", "/home/pi"),
            "/home/pi/.local/bin:%"
        );
        let settings = unit_settings(
            "# c\n[Service]\nEnvironment=PATH=/a \\\n  X=1\nEnvironmentFile=-%h/env\n",
        );
        assert_eq!(
            settings,
            [
                ("Environment".to_string(), "PATH=/a  X=1".to_string()),
                ("EnvironmentFile".to_string(), "-%h/env".to_string()),
            ]
        );
    }

    #[test]
    fn environment_files_take_quotes_and_comments() {
        assert_eq!(
            env_file_vars("# k\nOPENAI_API_KEY=\"sk-1\"\n\nPATH=/usr/bin\n;x\nA='b'\n"),
            [
                ("OPENAI_API_KEY".to_string(), "sk-1".to_string()),
                ("PATH".to_string(), "/usr/bin".to_string()),
                ("A".to_string(), "b".to_string()),
            ]
        );
    }

    #[test]
    fn hard_limits_are_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max locked memory         8388608              unlimited            bytes\n\
                    Max realtime priority     0                    95\n";
        assert_eq!(parse_hard_limits(text), Some((95, libc::RLIM_INFINITY)));
        let mine = std::fs::read_to_string("/proc/self/limits").unwrap();
        assert!(parse_hard_limits(&mine).is_some());
    }

    #[test]
    fn lines_carry_the_fix() {
        assert_eq!(Check::pass("a", "b").line(), "pass  a: b");
        assert_eq!(Check::fail("a", "b", "c").line(), "FAIL  a: b → fix: c");
        assert_eq!(Check::warn("a", "b", "c").line(), "warn  a: b → fix: c");
    }
}
