//! Configuration: the TOML file (docs/CONFIGURATION.md), its defaults, and its validation.
//!
//! Every key has a default, so an empty file (or no file) is a valid configuration.
//! Unknown keys and bad values are errors that name the key and the file line: users read
//! them on a Pi over ssh, so each is one short line, `FILE:LINE: key: what is wrong`.
//!
//! Owns no fd and no thread: the daemon calls [`Config::load_source`] at start and on
//! SIGHUP, `walkie config check` calls it once. Loading runs in three passes over one parse:
//! the spanned document is walked against the serialized defaults (unknown keys, types,
//! numeric ranges — each with the line of its key), then serde builds the typed [`Config`]
//! (its only remaining failure is an unknown enum value, mapped back to the key by span),
//! then [`Config`]-level rules run and are placed on the line of the key they blame.
//! The OpenAI key is looked up only on demand ([`Config::api_key`]) and never stored here.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

use crate::paths::{Paths, expand_home};

/// The whole configuration. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub realtime: RealtimeConfig,
    pub audio: AudioConfig,
    pub button: ButtonConfig,
    pub agent: AgentConfig,
    /// Project name → directory (a leading `~/` is expanded against `$HOME`).
    pub projects: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealtimeConfig {
    /// `wss://…` anywhere, `ws://…` only to a loopback address, or `""`/`"none"` to disable the
    /// link.
    pub url: String,
    pub model: String,
    pub voice: String,
    pub api_key_env: String,
    /// A file holding the key; refused when group or world readable.
    pub api_key_file: String,
    pub instructions: String,
    pub transcription_model: String,
    /// Extra PEM trust anchor(s), added to the webpki roots.
    pub ca_file: String,
    /// walkie pings the server this often; a socket silent for two intervals is dead.
    pub ping_interval_ms: u64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            url: "wss://api.openai.com/v1/realtime".into(),
            model: "gpt-realtime".into(),
            voice: "marin".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            api_key_file: String::new(),
            instructions: String::new(),
            transcription_model: "gpt-4o-mini-transcribe".into(),
            ca_file: String::new(),
            ping_interval_ms: 15_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioBackend {
    Alsa,
    /// The microphone from a PulseAudio (or PipeWire pulse) server; playback on ALSA.
    Pulse,
    Wav,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudioConfig {
    pub backend: AudioBackend,
    pub capture_device: String,
    pub playback_device: String,
    pub period_ms: u32,
    pub preroll_ms: u32,
    pub earcons: bool,
    pub input_wav: String,
    pub output_wav: String,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            backend: AudioBackend::Alsa,
            capture_device: "default".into(),
            playback_device: "default".into(),
            period_ms: 10,
            preroll_ms: 300,
            earcons: true,
            input_wav: String::new(),
            output_wav: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ButtonMode {
    Hold,
    Toggle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ButtonConfig {
    /// An evdev node, a FIFO of `input_event` records, `"auto"` or `"none"`.
    pub device: String,
    /// A `KEY_*`/`BTN_*` name or a decimal key code.
    pub key: String,
    pub mode: ButtonMode,
    pub grab: bool,
    pub max_hold_s: u32,
}

impl Default for ButtonConfig {
    fn default() -> Self {
        ButtonConfig {
            device: "auto".into(),
            key: "KEY_F13".into(),
            mode: ButtonMode::Hold,
            grab: false,
            max_hold_s: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How walkie speaks with the agent; see [`AgentConfig::protocol_in_use`].
    pub protocol: AgentProtocol,
    /// argv template; `{prompt}` is replaced by the task prompt. No shell is involved.
    pub command: Vec<String>,
    /// Appended to `command` for a follow-up; `{session}` is the agent session id.
    pub resume: Vec<String>,
    pub max_running: u32,
    pub cancel_grace_ms: u64,
    /// Variables copied from walkie's own environment when set.
    pub env_pass: Vec<String>,
    /// Variables set for every agent (override `env_pass`).
    pub env_set: BTreeMap<String, String>,
    /// `memory.max` of each task's cgroup (`"1G"`, `"512M"`); empty: no limit.
    pub memory_max: String,
    /// How every process of a task is known and stopped.
    pub containment: ContainmentMode,
    /// `--permission-mode` of a `claude` agent.
    pub permission_mode: String,
    /// An unanswered permission request is denied after this many seconds.
    pub approval_timeout_s: u64,
    /// A `claude` agent stays alive this many seconds after its turn, for a follow-up.
    pub warm_s: u64,
    /// Agents kept alive between turns at once; the one idle longest is closed first.
    pub max_warm: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentProtocol {
    /// The Claude CLI with stdin kept open (`--input-format stream-json`): the prompt goes
    /// on stdin; approvals, steering, interrupts and warm sessions.
    Claude,
    /// One run per prompt, the prompt in argv (`{prompt}`), stdout only: any CLI.
    Oneshot,
}

/// `--permission-mode` values of the Claude CLI (`bypassPermissions` only when written).
pub const PERMISSION_MODES: &[&str] = &[
    "acceptEdits",
    "auto",
    "default",
    "dontAsk",
    "plan",
    "bypassPermissions",
];

/// Flags walkie adds to a `claude` agent's command itself (`tasks::claude::agent_args` and
/// `agent.resume`); the same flag twice would confuse the CLI.
const CLAUDE_FLAGS: &[&str] = &[
    "-p",
    "--print",
    "--input-format",
    "--output-format",
    "--verbose",
    "--permission-prompt-tool",
    "--replay-user-messages",
    "--permission-mode",
    "--dangerously-skip-permissions",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainmentMode {
    /// A cgroup per task where walkie can create cgroups, else the /proc scan.
    Auto,
    /// Always the /proc scan (marker and process tree), never a cgroup.
    Scan,
}

impl AgentConfig {
    /// The protocol tasks run with, and a line to log when it is not the one written: a
    /// `command` with `{prompt}` (every configuration from before the `claude` protocol)
    /// keeps running one-shot.
    pub fn protocol_in_use(&self) -> (AgentProtocol, Option<String>) {
        let has_prompt = self.command.iter().any(|a| a.contains("{prompt}"));
        match self.protocol {
            AgentProtocol::Claude if has_prompt => (
                AgentProtocol::Oneshot,
                Some(
                    "agent.command contains \"{prompt}\", so tasks run one-shot: the prompt in \
                     argv, no approvals by voice, no steering, no warm sessions. To switch, set \
                     agent.command = [\"claude\"] (walkie adds the flags it needs); to keep \
                     one-shot and drop this line, set agent.protocol = \"oneshot\"."
                        .into(),
                ),
            ),
            protocol => (protocol, None),
        }
    }

    /// `memory_max` in bytes (`None`: no limit); the value was checked at load.
    pub fn memory_max_bytes(&self) -> Option<u64> {
        crate::tasks::contain::parse_size(&self.memory_max)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            command: vec!["claude".to_string()],
            resume: ["--resume", "{session}"].map(String::from).to_vec(),
            max_running: 3,
            cancel_grace_ms: 3000,
            env_pass: ["PATH", "HOME", "USER", "LANG", "TERM", "ANTHROPIC_API_KEY"]
                .map(String::from)
                .to_vec(),
            env_set: BTreeMap::from([("CLAUDE_CODE_MAX_RETRIES".to_string(), "3".to_string())]),
            memory_max: String::new(),
            containment: ContainmentMode::Auto,
            protocol: AgentProtocol::Claude,
            permission_mode: "acceptEdits".into(),
            approval_timeout_s: 600,
            warm_s: 300,
            max_warm: 1,
        }
    }
}

/// Where the configuration came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// No file at the default location: all defaults.
    Defaults,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Defaults => f.write_str("built-in defaults (no configuration file)"),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read: caller reports and exits 2 (at start) or keeps the old
    /// config (reload).
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax, type, unknown key or bad value: caller prints the message as is and exits 2
    /// (at start, `config check`) or keeps the old config (reload).
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// More than one of those, in line order: one line each, so `walkie config check`
    /// shows every mistake at once. Handled like `Invalid`.
    #[error("{}", several_lines(.0))]
    Several(Vec<ConfigError>),
}

fn several_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Why no OpenAI key is available. No message ever contains the key itself.
///
/// Every variant is fatal for the link (retrying cannot help): the caller reports it by
/// `walkie ctl status`, `walkie doctor` and an earcon, and does not reconnect until the
/// configuration is reloaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `realtime.api_key_file` cannot be opened or read.
    #[error("cannot read the API key file {path}: {source}")]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `realtime.api_key_file` is readable by group or others: refused until fixed.
    #[error(
        "the API key file {path} is readable by other users (mode {mode:04o}): run chmod 600 {path}"
    )]
    FileTooOpen { path: PathBuf, mode: u32 },
    /// `realtime.api_key_file` holds only whitespace.
    #[error("the API key file {path} is empty")]
    FileEmpty { path: PathBuf },
    /// `realtime.api_key_file` holds something that cannot be a key (several words, binary).
    #[error("the API key file {path} does not hold a key (one line of printable characters)")]
    FileMalformed { path: PathBuf },
    /// The variable named by `realtime.api_key_env` is unset or empty.
    #[error("no OpenAI API key: {var} is not set (or set realtime.api_key_file)")]
    EnvUnset { var: String },
    /// The variable named by `realtime.api_key_env` holds something that cannot be a key.
    #[error("{var} does not hold an API key (printable characters, no spaces)")]
    EnvMalformed { var: String },
}

impl KeyError {
    /// A key was configured but cannot be used (a key file that is missing, open to others,
    /// not a regular file or not a key; a variable holding control characters, spaces or
    /// non-ASCII): a configuration error, so `walkie run` refuses to start (exit 2) and
    /// `walkie doctor` fails. Only an unset variable is not: walkie then runs without a voice
    /// and says why in `walkie ctl status`.
    pub fn is_config_error(&self) -> bool {
        !matches!(self, KeyError::EnvUnset { .. })
    }
}

/// Why a Realtime endpoint URL was refused. Messages never repeat the URL: it may carry
/// a secret in its query.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `wss://` or `ws://`: the user fixes the URL.
    #[error("must start with wss:// (or ws:// for a loopback host)")]
    Scheme,
    /// `user:password@host`: the key travels in a header, never in the URL.
    #[error(
        "must not contain credentials (user@host); the key comes from api_key_env or api_key_file"
    )]
    Credentials,
    /// WebSocket URLs have no fragment (RFC 6455 §3).
    #[error("must not contain a #fragment")]
    Fragment,
    /// Spaces or control characters anywhere in the URL.
    #[error("must not contain spaces or control characters")]
    Characters,
    /// Empty host, bad characters in it, or an unparsable `[IPv6]` literal.
    #[error("has no valid host")]
    Host,
    /// A port that is empty, not a number, or outside 1..=65535.
    #[error("has an invalid port (1..65535)")]
    Port,
}

/// A Realtime endpoint split into what a connection needs (hand-written: no URL crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `wss` (true) or `ws` (false).
    pub tls: bool,
    /// Host name or IP address, without the brackets of an IPv6 literal.
    pub host: String,
    /// The explicit port, or 443/80 by scheme.
    pub port: u16,
    /// Starts with `/`; `/` when the URL has no path.
    pub path: String,
    /// The text after `?`, if any.
    pub query: Option<String>,
}

impl Endpoint {
    /// Splits `url` into scheme, host, port, path and query.
    pub fn parse(url: &str) -> Result<Endpoint, UrlError> {
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(UrlError::Characters);
        }
        let (scheme, rest) = url.split_once("://").ok_or(UrlError::Scheme)?;
        let tls = if scheme.eq_ignore_ascii_case("wss") {
            true
        } else if scheme.eq_ignore_ascii_case("ws") {
            false
        } else {
            return Err(UrlError::Scheme);
        };
        if rest.contains('#') {
            return Err(UrlError::Fragment);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(UrlError::Credentials);
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or(UrlError::Host)?;
            host.parse::<Ipv6Addr>().map_err(|_| UrlError::Host)?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or(UrlError::Port)?),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let host_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':');
        if host.is_empty() || !host.chars().all(host_char) {
            return Err(UrlError::Host);
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 && text.bytes().all(|b| b.is_ascii_digit()) => port,
                _ => return Err(UrlError::Port),
            },
        };
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query.to_string())),
            None => (tail, None),
        };
        Ok(Endpoint {
            tls,
            host: host.to_string(),
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            query,
        })
    }

    /// localhost, 127.0.0.0/8 or ::1: the only hosts plain `ws://` may reach, because
    /// traffic to them never leaves the machine.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback())
            || self
                .host
                .parse::<Ipv6Addr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// The voices the Realtime API offers (`realtime.voice`).
pub const VOICES: &[&str] = &[
    "alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar",
];

/// Inclusive bounds of every integer key; the walk checks them on the raw value, so a
/// negative or huge number gets the same message as any other out-of-range one.
const RANGES: &[(&str, i64, i64)] = &[
    ("realtime.ping_interval_ms", 100, 300_000),
    ("audio.period_ms", 2, 100),
    ("audio.preroll_ms", 0, 2000),
    ("button.max_hold_s", 1, 3600),
    ("agent.max_running", 1, 32),
    ("agent.cancel_grace_ms", 0, 60_000),
    ("agent.approval_timeout_s", 10, 86_400),
    ("agent.warm_s", 0, 86_400),
    ("agent.max_warm", 0, 32),
];

/// Tables whose keys are the user's (project names, variable names); values are strings.
const FREE_TABLES: &[&str] = &["projects", "agent.env_set"];

/// The largest configuration file walkie reads (a real one is a few KB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Variable that must never reach an agent, whatever `api_key_env` says.
const OPENAI_KEY_VAR: &str = "OPENAI_API_KEY";

/// The commented example printed by `walkie config example`: every key with its default.
pub const EXAMPLE: &str = r#"# walkie configuration: ~/.config/walkie/config.toml (or --config FILE, or $WALKIE_CONFIG).
# Every key is shown with its default; delete the ones you do not change.
# Check a file with: walkie config check FILE

[realtime]
# Endpoint speaking the Realtime GA protocol: wss://..., ws:// only to a loopback host; "none" disables the link.
url = "wss://api.openai.com/v1/realtime"
# Realtime model, sent as ?model=... unless the URL already names one.
model = "gpt-realtime"
# Voice: alloy, ash, ballad, coral, echo, sage, shimmer, verse, marin or cedar.
voice = "marin"
# Environment variable holding the OpenAI API key.
api_key_env = "OPENAI_API_KEY"
# File holding the key instead (used when set); must not be group/world readable: chmod 600 FILE.
api_key_file = ""
# Extra instructions, appended to walkie's own.
instructions = ""
# Model that transcribes what you say (the transcript restores context after a reconnect).
transcription_model = "gpt-4o-mini-transcribe"
# Extra PEM trust anchor(s) for the endpoint (tests, private endpoints); public roots stay trusted.
ca_file = ""
# Keepalive ping interval in ms (100..300000); a socket silent for two intervals is dead.
ping_interval_ms = 15000

[audio]
# alsa (sound card), pulse (microphone from a PulseAudio/PipeWire server, speaker on ALSA),
# wav (files, for tests) or none.
backend = "alsa"
# ALSA capture PCM (arecord -L lists them); the plug layer converts rate and format.
# With backend "pulse": a PulseAudio source (pactl list short sources); "default" is the server's.
capture_device = "default"
# ALSA playback PCM (aplay -L lists them).
playback_device = "default"
# ALSA period in ms (2..100): smaller means lower latency and more wakeups.
period_ms = 10
# Audio kept from before the button press, in ms (0..2000), so the first word is not clipped.
preroll_ms = 300
# Short sounds for the button, finished tasks and errors.
earcons = true
# wav backend: the file the microphone hears.
input_wav = ""
# wav backend: the file the speaker output goes to.
output_wav = ""

[button]
# evdev node (/dev/input/by-id/...), a FIFO of input_event records, "auto" or "none".
# "auto" prefers a device with the key that is not a full keyboard; `walkie devices` shows it.
device = "auto"
# A KEY_*/BTN_* name or a key code 0..767 (walkie devices lists them).
key = "KEY_F13"
# hold: talk while pressed; toggle: press to start, press again to send.
mode = "hold"
# Grab the device so no other program sees the key.
grab = false
# A press held longer than this many seconds (1..3600) counts as stuck and ends the turn.
max_hold_s = 120

[agent]
# claude: the Claude CLI with stdin kept open (the prompt goes on stdin; approvals by voice,
# steering, interrupts, warm sessions); walkie adds the flags, so command is just the program.
# oneshot: the prompt in argv ("{prompt}" in command), stdout only, for other CLIs. A command
# containing "{prompt}" runs one-shot whatever this says, so older files keep working.
protocol = "claude"
# Claude's --permission-mode for protocol claude: acceptEdits, auto, default, dontAsk, plan;
# bypassPermissions only if you write it here.
permission_mode = "acceptEdits"
# argv of a task (no shell). protocol claude: the program (and flags of your own, e.g. --model);
# oneshot: "{prompt}" becomes the prompt, e.g. ["aider", "--yes", "--message", "{prompt}"].
command = ["claude"]
# Appended to command for a follow-up; "{session}" becomes the agent's session id.
resume = ["--resume", "{session}"]
# Tasks running at once (1..32); starting one more is refused.
max_running = 3
# Cancel sends SIGINT, then SIGTERM, then SIGKILL, this many ms (0..60000) apart.
cancel_grace_ms = 3000
# Variables copied from walkie's environment to agents (never the OpenAI key).
env_pass = ["PATH", "HOME", "USER", "LANG", "TERM", "ANTHROPIC_API_KEY"]
# Variables set for every agent (they override env_pass; never OPENAI_API_KEY).
env_set = { CLAUDE_CODE_MAX_RETRIES = "3" }
# Memory limit of each task's cgroup, e.g. "1G" or "512M" (a task killed for memory is
# reported failed: "out of memory"). Needs cgroup containment with the memory controller
# (walkie doctor says); empty: no limit.
memory_max = ""
# auto: each task in its own cgroup where walkie can create cgroups (root, or a systemd unit
# with Delegate=yes), else a /proc scan finds a task's processes; scan: always the scan.
containment = "auto"
# An approval nobody answers is denied after this many seconds (10..86400); the agent is told.
approval_timeout_s = 600
# After a turn the agent process waits this many seconds (0..86400) for a follow-up, then exits.
warm_s = 300
# Agent processes kept waiting at once (0..32); the one idle longest is closed first.
max_warm = 1

[projects]
# Names the model may use for a task's directory (absolute or ~/...); a task without one gets a scratch dir.
# myapp = "~/code/myapp"
"#;

impl Config {
    /// Parses and validates `text`; `path` is only used in messages, exactly as given.
    /// Every error in the file is reported ([`ConfigError::Several`] when there are more
    /// than one), not only the first.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |problem: Problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: problem.line,
            message: problem.message,
        };
        match Config::parse_all(text) {
            Ok(config) => Ok(config),
            Err(mut problems) => {
                problems.sort_by_key(|p| p.line);
                if problems.len() == 1 {
                    Err(invalid(problems.remove(0)))
                } else {
                    Err(ConfigError::Several(
                        problems.into_iter().map(invalid).collect(),
                    ))
                }
            }
        }
    }

    /// The three passes over `text`; every problem found, unsorted. After the first pass,
    /// the keys it blamed are left out (their defaults stand in), so the later passes still
    /// see and judge the rest of the file.
    fn parse_all(text: &str) -> Result<Config, Vec<Problem>> {
        let lines = LineIndex::new(text);
        let document = DeTable::parse(text).map_err(|e| {
            let span = e.span();
            let mut message = e.message().to_string();
            // The parser's span is the repeated key: name it, as every other message does.
            let key = span.as_ref().and_then(|span| text.get(span.clone()));
            if let Some(key) = key.filter(|key| !key.is_empty() && message == "duplicate key") {
                message = format!("duplicate key {key}");
            }
            vec![Problem {
                line: span.map_or(1, |span| lines.line_at(span.start)),
                message,
            }]
        })?;

        let schema = toml::Table::try_from(Config::default())
            .expect("the default configuration serializes to a TOML table");
        let mut walk = Walk {
            schema: &schema,
            lines: &lines,
            keys: HashMap::new(),
            problems: Vec::new(),
        };
        walk.table(document.get_ref(), &schema, "");
        let Walk {
            keys, mut problems, ..
        } = walk;
        let located = Located { lines, keys };
        let mut document = document.into_inner();
        let blamed: Vec<usize> = problems.iter().map(|p| p.line).collect();
        for (path, (line, _)) in &located.keys {
            if blamed.contains(line) {
                remove_path(&mut document, path);
            }
        }

        // serde stops at its first error: leave that key out and go again, a few times.
        let mut config = None;
        for _ in 0..16 {
            match Config::deserialize(toml::de::Deserializer::from(toml::Spanned::new(
                0..text.len(),
                document.clone(),
            ))) {
                Ok(c) => {
                    config = Some(c);
                    break;
                }
                Err(e) => {
                    let (problem, owner) = located.serde_problem(&e);
                    problems.push(problem);
                    match owner {
                        Some(path) if remove_path(&mut document, &path) => {}
                        _ => break,
                    }
                }
            }
        }
        if let Some(config) = &config {
            problems.extend(config.flaws().into_iter().map(|flaw| Problem {
                line: located.line_of(&flaw.at),
                message: flaw.message,
            }));
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(problems),
        }
    }

    /// Reads and parses the file at `path` (a regular file of at most [`MAX_FILE_BYTES`]:
    /// a FIFO or a device there is refused at once, never waited on or read forever).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let bytes =
            crate::files::read_capped(path, MAX_FILE_BYTES).map_err(|source| ConfigError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        match String::from_utf8(bytes) {
            Ok(text) => Config::parse(&text, path),
            Err(e) => {
                let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    line: 1 + valid.iter().filter(|&&b| b == b'\n').count(),
                    message: "not UTF-8 text".into(),
                })
            }
        }
    }

    /// Explicit `--config` > `$WALKIE_CONFIG` > default path (if it exists) > Defaults.
    pub fn locate(explicit: Option<&Path>, paths: &Paths) -> ConfigSource {
        locate_with(explicit, std::env::var_os("WALKIE_CONFIG"), paths)
    }

    /// Loads what [`Config::locate`] found; `Defaults` gives [`Config::default`].
    pub fn load_source(source: &ConfigSource) -> Result<Config, ConfigError> {
        match source {
            ConfigSource::File(path) => Config::load(path),
            ConfigSource::Defaults => Ok(Config::default()),
        }
    }

    /// The OpenAI key from `realtime.api_key_file` (refused if group/world readable, message
    /// says `chmod 600 FILE`) or else the env var named by `api_key_env`. Trim whitespace.
    pub fn api_key(&self) -> Result<String, KeyError> {
        self.api_key_with(|name| std::env::var_os(name))
    }

    /// [`Config::api_key`] with the variables of another environment (`walkie doctor`
    /// checks the service's, read from its unit and environment file).
    pub fn api_key_from(&self, var: impl Fn(&str) -> Option<OsString>) -> Result<String, KeyError> {
        self.api_key_with(var)
    }

    fn api_key_with(&self, var: impl Fn(&str) -> Option<OsString>) -> Result<String, KeyError> {
        if !self.realtime.api_key_file.is_empty() {
            return read_key_file(&expand_home(&self.realtime.api_key_file));
        }
        let name = &self.realtime.api_key_env;
        let unset = || KeyError::EnvUnset { var: name.clone() };
        let malformed = || KeyError::EnvMalformed { var: name.clone() };
        let value = var(name).ok_or_else(unset)?;
        let value = value.into_string().map_err(|_| malformed())?;
        let key = value.trim();
        if key.is_empty() {
            Err(unset())
        } else if !is_key_text(key) {
            Err(malformed())
        } else {
            Ok(key.to_string())
        }
    }

    /// The key the Realtime link sends, checked as `walkie run` and `walkie doctor` both
    /// need it: `Ok(None)` when none is needed (the link is disabled, or the endpoint is a
    /// loopback stand-in and no key is set); an error otherwise when no usable key is there
    /// ([`KeyError::is_config_error`] tells a bad key from a missing one).
    pub fn link_api_key(&self) -> Result<Option<String>, KeyError> {
        if self.realtime_url().is_none() {
            return Ok(None);
        }
        let loopback = Endpoint::parse(&self.realtime.url).is_ok_and(|e| e.is_loopback());
        match self.api_key() {
            Ok(key) => Ok(Some(key)),
            // Local stand-ins (the demo, tests) need no key.
            Err(KeyError::EnvUnset { .. }) if loopback => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `realtime.url` with `?model=…` added unless the URL already has a model parameter;
    /// None when the link is disabled (url "" or "none").
    pub fn realtime_url(&self) -> Option<String> {
        let url = &self.realtime.url;
        if link_disabled(url) {
            return None;
        }
        let query = url.split_once('?').map(|(_, query)| query);
        let has_model = query.is_some_and(|query| {
            query
                .split('&')
                .any(|param| param == "model" || param.starts_with("model="))
        });
        if has_model {
            return Some(url.clone());
        }
        let separator = match query {
            None => "?",
            Some("") => "",
            Some(_) if url.ends_with('&') => "",
            Some(_) => "&",
        };
        Some(format!(
            "{url}{separator}model={}",
            percent_encode(&self.realtime.model)
        ))
    }

    /// The directory of project `name`, `~` expanded; None for an unknown name.
    pub fn project_dir(&self, name: &str) -> Option<PathBuf> {
        self.projects.get(name).map(|dir| expand_home(dir))
    }

    /// Rules on the typed values; each flaw names the key paths it may be shown at.
    fn flaws(&self) -> Vec<Flaw> {
        let mut flaws = Vec::new();
        let mut flaw = |at: &[&str], message: String| {
            flaws.push(Flaw {
                at: at.iter().map(|s| s.to_string()).collect(),
                message,
            })
        };

        let realtime = &self.realtime;
        if !link_disabled(&realtime.url) {
            match Endpoint::parse(&realtime.url) {
                Err(e) => flaw(&["realtime.url"], format!("realtime.url: {e}")),
                Ok(endpoint) if !endpoint.tls && !endpoint.is_loopback() => flaw(
                    &["realtime.url"],
                    "realtime.url: TLS is required for non-loopback endpoints (use wss://)".into(),
                ),
                Ok(_) => {}
            }
        }
        for (key, value) in [
            ("model", &realtime.model),
            ("transcription_model", &realtime.transcription_model),
        ] {
            if value.trim().is_empty() {
                flaw(
                    &[&format!("realtime.{key}")],
                    format!("realtime.{key}: must not be empty"),
                );
            }
        }
        if !VOICES.contains(&realtime.voice.as_str()) {
            flaw(
                &["realtime.voice"],
                format!(
                    "realtime.voice: must be one of {} (got {:?})",
                    VOICES.join(", "),
                    realtime.voice
                ),
            );
        }
        if !is_var_name(&realtime.api_key_env) {
            flaw(
                &["realtime.api_key_env"],
                format!(
                    "realtime.api_key_env: {:?} is not an environment variable name",
                    realtime.api_key_env
                ),
            );
        }

        let audio = &self.audio;
        if matches!(audio.backend, AudioBackend::Alsa | AudioBackend::Pulse) {
            for (key, value) in [
                ("capture_device", &audio.capture_device),
                ("playback_device", &audio.playback_device),
            ] {
                // With "pulse", an empty capture_device is the server's default source.
                let alsa = audio.backend == AudioBackend::Alsa || key == "playback_device";
                if alsa && value.trim().is_empty() {
                    flaw(
                        &[&format!("audio.{key}")],
                        format!(
                            "audio.{key}: must name an ALSA device with backend \"{}\" (e.g. \"default\")",
                            if audio.backend == AudioBackend::Alsa {
                                "alsa"
                            } else {
                                "pulse"
                            }
                        ),
                    );
                }
            }
        }

        let button = &self.button;
        if button.device.trim().is_empty() {
            flaw(
                &["button.device"],
                "button.device: must not be empty (a device path, \"auto\" or \"none\")".into(),
            );
        }
        if !is_key_spec(&button.key) {
            flaw(
                &["button.key"],
                format!(
                    "button.key: must be a KEY_*/BTN_* name (linux/input-event-codes.h) or a key code 1..767 (got {:?})",
                    button.key
                ),
            );
        }

        let agent = &self.agent;
        match agent.command.first() {
            None => flaw(
                &["agent.command"],
                "agent.command: must not be empty".into(),
            ),
            Some(program) if program.trim().is_empty() => flaw(
                &["agent.command[0]", "agent.command"],
                "agent.command: the first element (the program) must not be empty".into(),
            ),
            Some(_) => {}
        }
        match agent.protocol_in_use().0 {
            AgentProtocol::Oneshot if !agent.command.iter().any(|a| a.contains("{prompt}")) => {
                if !agent.command.is_empty() {
                    flaw(
                        &["agent.command", "agent.protocol"],
                        "agent.command: no element contains \"{prompt}\" (where the task prompt \
                         goes with agent.protocol \"oneshot\")"
                            .into(),
                    );
                }
            }
            AgentProtocol::Oneshot => {}
            AgentProtocol::Claude => {
                let added = agent.command.iter().enumerate().skip(1).find(|(_, arg)| {
                    let flag = arg.split_once('=').map_or(arg.as_str(), |(flag, _)| flag);
                    CLAUDE_FLAGS.contains(&flag)
                });
                if let Some((i, arg)) = added {
                    flaw(
                        &[&format!("agent.command[{i}]"), "agent.command"],
                        format!(
                            "agent.command: walkie adds {arg:?} itself with agent.protocol \
                             \"claude\"; remove it (the permission mode is \
                             agent.permission_mode), or set agent.protocol = \"oneshot\""
                        ),
                    );
                }
            }
        }
        if !PERMISSION_MODES.contains(&agent.permission_mode.as_str()) {
            flaw(
                &["agent.permission_mode"],
                format!(
                    "agent.permission_mode: must be one of {} (got {:?})",
                    PERMISSION_MODES.join(", "),
                    agent.permission_mode
                ),
            );
        }
        if !agent.resume.iter().any(|a| a.contains("{session}")) {
            flaw(
                &["agent.resume"],
                "agent.resume: no element contains \"{session}\" (where the session id goes)"
                    .into(),
            );
        }
        // The variable walkie reads its key from is as secret as OPENAI_API_KEY itself,
        // but only when the key actually comes from the environment.
        let key_var = realtime
            .api_key_file
            .is_empty()
            .then_some(realtime.api_key_env.as_str());
        let is_key_var = |name: &str| name == OPENAI_KEY_VAR || Some(name) == key_var;
        let never = "the OpenAI key must never reach agents";
        for (i, name) in agent.env_pass.iter().enumerate() {
            let at = format!("agent.env_pass[{i}]");
            if !is_var_name(name) {
                flaw(
                    &[&at],
                    format!("agent.env_pass: {name:?} is not an environment variable name"),
                );
            } else if name == OPENAI_KEY_VAR {
                flaw(&[&at], format!("agent.env_pass: {name}: {never}"));
            } else if is_key_var(name) {
                flaw(
                    &[&at, "realtime.api_key_env"],
                    format!(
                        "agent.env_pass: {name} holds the OpenAI key (realtime.api_key_env): {never}"
                    ),
                );
            }
        }
        if !agent.memory_max.trim().is_empty() && agent.memory_max_bytes().is_none() {
            flaw(
                &["agent.memory_max"],
                format!(
                    "agent.memory_max: must be a size such as \"1G\" or \"512M\", or \"\" for no limit (got {:?})",
                    agent.memory_max
                ),
            );
        }
        for name in agent.env_set.keys() {
            let at = format!("agent.env_set.{name}");
            if !is_var_name(name) {
                flaw(
                    &[&at],
                    format!("agent.env_set: {name:?} is not an environment variable name"),
                );
            } else if is_key_var(name) {
                flaw(&[&at], format!("agent.env_set.{name}: {never}"));
            }
        }

        for (name, dir) in &self.projects {
            let at = format!("projects.{name}");
            if !is_project_name(name) {
                flaw(
                    &[&at],
                    format!(
                        "projects: {name:?} is not a valid name (a-z, 0-9, - and _, not starting with - or _)"
                    ),
                );
            }
            if !(dir.starts_with('/') || dir == "~" || dir.starts_with("~/")) {
                flaw(
                    &[&at],
                    format!(
                        "projects.{name}: must be an absolute path or start with ~/ (got {dir:?})"
                    ),
                );
            }
        }
        flaws
    }
}

/// [`Config::locate`] with the environment passed in (tests cannot set variables safely).
fn locate_with(explicit: Option<&Path>, from_env: Option<OsString>, paths: &Paths) -> ConfigSource {
    if let Some(path) = explicit {
        return ConfigSource::File(path.to_path_buf());
    }
    if let Some(path) = from_env.filter(|p| !p.is_empty()) {
        return ConfigSource::File(PathBuf::from(path));
    }
    // An existence check that fails (permissions) still names the file, so the user sees
    // why it could not be read instead of silently getting the defaults.
    match paths.config_file.try_exists() {
        Ok(false) => ConfigSource::Defaults,
        Ok(true) | Err(_) => ConfigSource::File(paths.config_file.clone()),
    }
}

fn link_disabled(url: &str) -> bool {
    url.is_empty() || url == "none"
}

/// Reads a key file, refusing it when others may read it (the check is on the opened file,
/// so a swap between check and read cannot slip past).
fn read_key_file(path: &Path) -> Result<String, KeyError> {
    let unreadable = |source| KeyError::FileUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let (file, meta) = crate::files::open_regular(path).map_err(unreadable)?;
    let mode = meta.permissions().mode();
    if mode & 0o044 != 0 {
        return Err(KeyError::FileTooOpen {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    // A key is a few hundred bytes; the limit keeps a mistaken path (a big file) from
    // being read whole.
    const LIMIT: u64 = 4096;
    let malformed = || KeyError::FileMalformed {
        path: path.to_path_buf(),
    };
    let bytes = match crate::files::read_opened(file, LIMIT) {
        Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => return Err(malformed()),
        other => other.map_err(unreadable)?,
    };
    let text = String::from_utf8(bytes).map_err(|_| malformed())?;
    let key = text.trim();
    if key.is_empty() {
        Err(KeyError::FileEmpty {
            path: path.to_path_buf(),
        })
    } else if !is_key_text(key) {
        Err(malformed())
    } else {
        Ok(key.to_string())
    }
}

/// A key goes into an HTTP header: printable ASCII, no spaces.
fn is_key_text(key: &str) -> bool {
    key.bytes().all(|b| b.is_ascii_graphic())
}

/// `^[A-Za-z_][A-Za-z0-9_]*$`
fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `^[a-z0-9][a-z0-9_-]*$`
fn is_project_name(name: &str) -> bool {
    let lower_or_digit = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut chars = name.chars();
    chars.next().is_some_and(lower_or_digit)
        && chars.all(|c| lower_or_digit(c) || c == '_' || c == '-')
}

/// A key the button module knows: a `KEY_*`/`BTN_*` name of linux/input-event-codes.h or a
/// decimal code 1..=767.
fn is_key_spec(key: &str) -> bool {
    crate::button::keycodes::parse_key(key).is_some()
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One error, placed on a line.
#[derive(Debug)]
struct Problem {
    line: usize,
    message: String,
}

/// An error found on the typed values; `at` lists key paths to place it at, best first.
#[derive(Debug)]
struct Flaw {
    at: Vec<String>,
    message: String,
}

/// Removes `path` (`section.key`, `section.key[i]` names the whole array) from the
/// document; whether there was something to remove.
fn remove_path(document: &mut DeTable<'_>, path: &str) -> bool {
    let path = path.split('[').next().unwrap_or(path);
    let mut table = document;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return table.remove(part).is_some();
        }
        match table.get_mut(part).map(toml::Spanned::get_mut) {
            Some(DeValue::Table(inner)) => table = inner,
            _ => return false,
        }
    }
    false
}

/// Byte offset → line number.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let newlines = text.match_indices('\n').map(|(i, _)| i + 1);
        LineIndex {
            starts: std::iter::once(0).chain(newlines).collect(),
        }
    }

    /// 1-based line of the byte at `offset`.
    fn line_at(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }
}

/// Where each key path of the document is: the line of its key and the span of its value.
/// Array elements are recorded as `path[i]` on their own line.
struct Located {
    lines: LineIndex,
    keys: HashMap<String, (usize, Range<usize>)>,
}

impl Located {
    /// The line of the first candidate present in the file; else of the closest ancestor of
    /// the first one (a rule on a default value blames its table); else line 1.
    fn line_of(&self, candidates: &[String]) -> usize {
        if let Some(line) = candidates
            .iter()
            .find_map(|path| self.keys.get(path.as_str()).map(|(line, _)| *line))
        {
            return line;
        }
        let mut path = candidates.first().map_or("", String::as_str);
        while let Some(cut) = path.rfind(['.', '[']) {
            path = &path[..cut];
            if let Some((line, _)) = self.keys.get(path) {
                return *line;
            }
        }
        1
    }

    /// A serde error, named by the innermost key whose value contains its span; and that
    /// key's path.
    fn serde_problem(&self, error: &toml::de::Error) -> (Problem, Option<String>) {
        let message = error
            .message()
            .replace('`', "\"")
            .replace("unknown variant", "unknown value");
        let Some(span) = error.span() else {
            return (Problem { line: 1, message }, None);
        };
        let owner = self
            .keys
            .iter()
            .filter(|(_, (_, value))| value.start <= span.start && span.end <= value.end)
            .min_by_key(|(_, (_, value))| value.len());
        match owner {
            Some((path, _)) => (
                Problem {
                    line: self.lines.line_at(span.start),
                    message: format!("{}: {message}", path.split('[').next().unwrap_or(path)),
                },
                Some(path.clone()),
            ),
            None => (
                Problem {
                    line: self.lines.line_at(span.start),
                    message,
                },
                None,
            ),
        }
    }
}

/// The first pass: the spanned document against the serialized defaults.
struct Walk<'a> {
    schema: &'a toml::Table,
    lines: &'a LineIndex,
    keys: HashMap<String, (usize, Range<usize>)>,
    problems: Vec<Problem>,
}

impl Walk<'_> {
    fn table(&mut self, raw: &DeTable<'_>, schema: &toml::Table, section: &str) {
        for (key, value) in raw.iter() {
            let name: &str = key.get_ref();
            let path = if section.is_empty() {
                name.to_string()
            } else {
                format!("{section}.{name}")
            };
            let line = self.lines.line_at(key.span().start);
            self.keys.insert(path.clone(), (line, value.span()));
            if FREE_TABLES.contains(&section) {
                if !value.get_ref().is_str() {
                    let what = if section == "projects" {
                        "a string (the project directory)"
                    } else {
                        "a string"
                    };
                    self.problem(
                        line,
                        format!("{path}: must be {what}, not {}", a_raw(value.get_ref())),
                    );
                }
                continue;
            }
            match schema.get(name) {
                Some(expected) => self.value(&path, line, expected, value),
                None => self.unknown(section, name, value.get_ref(), schema, line),
            }
        }
    }

    fn value(
        &mut self,
        path: &str,
        line: usize,
        expected: &toml::Value,
        value: &toml::Spanned<DeValue<'_>>,
    ) {
        match (expected, value.get_ref()) {
            (toml::Value::Table(schema), DeValue::Table(raw)) => self.table(raw, schema, path),
            (toml::Value::Array(_), DeValue::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let item_line = self.lines.line_at(item.span().start);
                    self.keys
                        .insert(format!("{path}[{i}]"), (item_line, item.span()));
                    if !item.get_ref().is_str() {
                        self.problem(
                            item_line,
                            format!(
                                "{path}: elements must be strings, not {}",
                                a_raw(item.get_ref())
                            ),
                        );
                    }
                }
            }
            (toml::Value::Integer(_), DeValue::Integer(number)) => {
                let Some(&(_, min, max)) = RANGES.iter().find(|(key, ..)| *key == path) else {
                    return;
                };
                let parsed = i128::from_str_radix(number.as_str(), number.radix()).ok();
                if !parsed.is_some_and(|n| (i128::from(min)..=i128::from(max)).contains(&n)) {
                    self.problem(
                        line,
                        format!("{path}: must be between {min} and {max} (got {number})"),
                    );
                }
            }
            (toml::Value::String(_), DeValue::String(_))
            | (toml::Value::Boolean(_), DeValue::Boolean(_)) => {}
            (expected, raw) => self.problem(
                line,
                format!("{path}: must be {}, not {}", a_schema(expected), a_raw(raw)),
            ),
        }
    }

    fn unknown(
        &mut self,
        section: &str,
        name: &str,
        value: &DeValue<'_>,
        schema: &toml::Table,
        line: usize,
    ) {
        let mut message = if section.is_empty() && value.is_table() {
            format!("unknown section [{name}]")
        } else if section.is_empty() {
            format!("unknown key {name:?}")
        } else {
            format!("unknown key {name:?} in [{section}]")
        };
        let home = self.schema.iter().find_map(|(table, keys)| match keys {
            toml::Value::Table(keys) if section != table && keys.contains_key(name) => {
                Some(table.as_str())
            }
            _ => None,
        });
        if let Some(home) = home {
            message.push_str(&format!(" (it belongs in [{home}])"));
        } else if let Some(close) = closest(name, schema.keys().map(String::as_str)) {
            if section.is_empty() && value.is_table() {
                message.push_str(&format!(" (did you mean [{close}]?)"));
            } else {
                message.push_str(&format!(" (did you mean {close:?}?)"));
            }
        }
        self.problem(line, message);
    }

    fn problem(&mut self, line: usize, message: String) {
        self.problems.push(Problem { line, message });
    }
}

fn a_schema(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "a list of strings",
        toml::Value::Table(_) => "a table",
    }
}

fn a_raw(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// The candidate within a typo's reach of `name` (edit distance ≤ 1 per 3 characters).
pub(crate) fn closest<'a>(
    name: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let reach = (name.chars().count() / 3).max(1);
    candidates
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= reach)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Edit distance counting a swap of neighbours as one edit (optimal string alignment),
/// case-insensitive: `audoi` and `Voice` are one typo away from `audio` and `voice`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().map(|c| c.to_ascii_lowercase()).collect();
    let b: Vec<char> = b.chars().map(|c| c.to_ascii_lowercase()).collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitute = d[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitute.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FILE: &str = "/home/pi/.config/walkie/config.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE))
    }

    /// The full message of a parse that must fail, e.g. `FILE:3: audio.period_ms: …`.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(config) => panic!("accepted:\n{text}\n→ {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts the error is on `line` and its message starts with `start`.
    #[track_caller]
    fn assert_error(text: &str, line: usize, start: &str) {
        let message = error(text);
        let prefix = format!("{FILE}:{line}: {start}");
        assert!(
            message.starts_with(&prefix),
            "for\n{text}\nexpected `{prefix}…`\n     got `{message}`"
        );
    }

    /// Every key path of the serialized defaults, tables included.
    fn key_paths(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if let toml::Value::Table(inner) = value {
                key_paths(inner, &path, out);
            }
            out.push(path);
        }
    }

    fn default_paths() -> Vec<String> {
        let mut paths = Vec::new();
        key_paths(
            &toml::Table::try_from(Config::default()).unwrap(),
            "",
            &mut paths,
        );
        paths
    }

    fn with(edit: impl FnOnce(&mut Config)) -> Config {
        let mut config = Config::default();
        edit(&mut config);
        config
    }

    // ---- the example and the defaults ----

    #[test]
    fn example_parses_to_the_defaults() {
        assert_eq!(parse(EXAMPLE).unwrap(), Config::default());
    }

    #[test]
    fn example_sets_every_key_with_a_line_of_doc() {
        let example = DeTable::parse(EXAMPLE).unwrap();
        let lines = LineIndex::new(EXAMPLE);
        let text: Vec<&str> = EXAMPLE.lines().collect();
        let mut keys = HashMap::new();
        fn collect(
            table: &DeTable<'_>,
            prefix: &str,
            lines: &LineIndex,
            out: &mut HashMap<String, usize>,
        ) {
            for (key, value) in table.iter() {
                let path = if prefix.is_empty() {
                    key.get_ref().to_string()
                } else {
                    format!("{prefix}.{}", key.get_ref())
                };
                if let DeValue::Table(inner) = value.get_ref() {
                    collect(inner, &path, lines, out);
                }
                out.insert(path, lines.line_at(key.span().start));
            }
        }
        collect(example.get_ref(), "", &lines, &mut keys);
        for path in default_paths() {
            let line = keys
                .get(&path)
                .unwrap_or_else(|| panic!("EXAMPLE does not set {path}"));
            let is_section = !path.contains('.');
            let is_inline = path.starts_with("agent.env_set.");
            if !is_section && !is_inline {
                let above = text[line - 2];
                assert!(above.starts_with('#'), "{path} has no doc line above it");
            }
        }
        assert!(EXAMPLE.contains("# myapp = \"~/code/myapp\""));
    }

    #[test]
    fn every_error_in_the_file_is_reported_in_line_order() {
        let text = "[realtime]\nvoice = \"nobody\"\n[audio]\nbackend = \"jack\"\nperiod_ms = 0\n\
                    colour = 1\n[button]\nmode = \"sideways\"\nkey = \"KEY_NOPE\"\n[agent]\nmax_running = \"3\"\n";
        let message = error(text);
        let lines: Vec<&str> = message.lines().collect();
        let expected = [
            (2, "realtime.voice: must be one of"),
            (4, "audio.backend: unknown value \"jack\""),
            (5, "audio.period_ms: must be between 2 and 100"),
            (6, "unknown key \"colour\" in [audio]"),
            (8, "button.mode: unknown value \"sideways\""),
            (9, "button.key: must be a KEY_*/BTN_* name"),
            (11, "agent.max_running: must be an integer"),
        ];
        assert_eq!(lines.len(), expected.len(), "{message}");
        for (line, (n, start)) in lines.iter().zip(expected) {
            let prefix = format!("{FILE}:{n}: {start}");
            assert!(
                line.starts_with(&prefix),
                "expected `{prefix}…`, got `{line}`"
            );
        }
        // One error stays a plain Invalid.
        assert!(matches!(
            parse("[audio]\nperiod_ms = 0\n"),
            Err(ConfigError::Invalid { line: 2, .. })
        ));
    }

    #[test]
    fn empty_and_comment_only_files_are_the_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(
            parse("# nothing\n\n[audio]\n# still nothing\n").unwrap(),
            Config::default()
        );
    }

    #[test]
    fn values_are_read_in_all_table_styles() {
        let config = parse(
            "realtime.voice = \"cedar\"\naudio = { period_ms = 20 }\n[button]\nmode = \"toggle\"\n\
             [agent.env_set]\nFOO = \"1\"\n[projects]\nweb = \"/srv/web\"\n",
        )
        .unwrap();
        assert_eq!(config.realtime.voice, "cedar");
        assert_eq!(config.audio.period_ms, 20);
        assert_eq!(config.button.mode, ButtonMode::Toggle);
        assert_eq!(
            config.agent.env_set,
            BTreeMap::from([("FOO".into(), "1".into())])
        );
        assert_eq!(config.project_dir("web"), Some(PathBuf::from("/srv/web")));
        assert_eq!(config.project_dir("other"), None);
    }

    // ---- syntax, unknown keys, types ----

    #[test]
    fn syntax_errors_carry_their_line() {
        assert_error("[audio]\nperiod_ms = 10\n[button\n", 3, "unclosed table");
        assert_error(
            "[audio]\n\nperiod_ms = \n",
            3,
            "string values must be quoted",
        );
        assert_error(
            "[audio]\nperiod_ms = 1\nperiod_ms = 2\n",
            3,
            "duplicate key",
        );
    }

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        assert_error(
            "[realtime]\nmodel = \"x\"\n\n\nvoce = \"ash\"\n",
            5,
            "unknown key \"voce\" in [realtime] (did you mean \"voice\"?)",
        );
        assert_error(
            "[realtime]\nperiod_ms = 10\n",
            2,
            "unknown key \"period_ms\" in [realtime] (it belongs in [audio])",
        );
        assert_error(
            "\n[audoi]\n",
            2,
            "unknown section [audoi] (did you mean [audio]?)",
        );
        assert_error("verbose = true\n", 1, "unknown key \"verbose\"");
        assert_error(
            "voice = \"ash\"\n",
            1,
            "unknown key \"voice\" (it belongs in [realtime])",
        );
        assert_error(
            "[button]\ngrab = true\n[button.extra]\n",
            3,
            "unknown key \"extra\" in [button]",
        );
        assert_error("[agent]\nenv = []\n", 2, "unknown key \"env\" in [agent]");
        // Nothing is suggested when nothing is close.
        let message = error("[audio]\nzzzzzzzz = 1\n");
        assert!(!message.contains("did you mean"), "{message}");
    }

    #[test]
    fn the_first_error_in_the_file_is_reported() {
        assert_error(
            "[realtime]\nvoce = \"a\"\n[audio]\nperid_ms = 3\n",
            2,
            "unknown key \"voce\"",
        );
        assert_error(
            "[audio]\nperiod_ms = 0\n[realtime]\nvoice = \"nobody\"\n",
            2,
            "audio.period_ms",
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        assert_error(
            "[audio]\nperiod_ms = \"10\"\n",
            2,
            "audio.period_ms: must be an integer, not a string",
        );
        assert_error(
            "[audio]\nearcons = \"yes\"\n",
            2,
            "audio.earcons: must be true or false, not a string",
        );
        assert_error(
            "[realtime]\nmodel = 4\n",
            2,
            "realtime.model: must be a string, not an integer",
        );
        assert_error(
            "[agent]\ncommand = \"claude -p {prompt}\"\n",
            2,
            "agent.command: must be a list of strings, not a string",
        );
        assert_error(
            "[agent]\ncommand = [\n  \"claude\",\n  \"{prompt}\",\n  3,\n]\n",
            5,
            "agent.command: elements must be strings, not an integer",
        );
        assert_error("audio = 3\n", 1, "audio: must be a table, not an integer");
        assert_error("[[button]]\n", 1, "button: must be a table, not an array");
        assert_error(
            "[audio]\nperiod_ms = 10.0\n",
            2,
            "audio.period_ms: must be an integer, not a float",
        );
    }

    #[test]
    fn free_tables_take_only_strings() {
        assert_error(
            "[projects]\nweb = \"/srv/web\"\napp = { path = \"/srv/app\" }\n",
            3,
            "projects.app: must be a string (the project directory), not a table",
        );
        assert_error(
            "[projects.app]\npath = \"/srv/app\"\n",
            1,
            "projects.app: must be a string (the project directory), not a table",
        );
        assert_error(
            "[agent.env_set]\nRETRIES = 3\n",
            2,
            "agent.env_set.RETRIES: must be a string, not an integer",
        );
    }

    #[test]
    fn enum_values_name_the_key_and_the_choices() {
        let message = error("[audio]\n\nbackend = \"jack\"\n");
        assert!(
            message.starts_with(&format!("{FILE}:3: audio.backend: ")),
            "{message}"
        );
        for choice in ["alsa", "wav", "none", "pulse"] {
            assert!(message.contains(&format!("\"{choice}\"")), "{message}");
        }
        let message = error("[button]\nmode = \"press\"\n");
        assert!(
            message.starts_with(&format!("{FILE}:2: button.mode: ")),
            "{message}"
        );
        assert!(
            message.contains("\"hold\"") && message.contains("\"toggle\""),
            "{message}"
        );
        assert!(parse("[audio]\nbackend = \"wav\"\n").is_ok());
        assert!(parse("[audio]\nbackend = \"none\"\n").is_ok());
    }

    // ---- numeric ranges ----

    #[test]
    fn every_integer_key_has_a_range() {
        let schema = toml::Table::try_from(Config::default()).unwrap();
        for path in default_paths() {
            let (section, key) = path.split_once('.').unwrap_or(("", &path));
            let value = match schema.get(section) {
                Some(toml::Value::Table(table)) => table.get(key),
                _ => None,
            };
            if let Some(toml::Value::Integer(_)) = value {
                assert!(
                    RANGES.iter().any(|(p, ..)| *p == path),
                    "{path} has no range"
                );
            }
        }
    }

    #[test]
    fn ranges_accept_their_bounds_and_refuse_beyond() {
        for &(path, min, max) in RANGES {
            let (section, key) = path.split_once('.').unwrap();
            let doc = |n: i64| format!("# range\n[{section}]\n{key} = {n}\n");
            for n in [min, max] {
                assert!(parse(&doc(n)).is_ok(), "{path} = {n} refused");
            }
            for n in [min - 1, max + 1] {
                assert_error(
                    &doc(n),
                    3,
                    &format!("{path}: must be between {min} and {max} (got {n})"),
                );
            }
        }
        assert_error(
            "[audio]\nperiod_ms = 0\n",
            2,
            "audio.period_ms: must be between 2 and 100 (got 0)",
        );
        assert_error(
            "[agent]\nmax_running = 99999999999999999999999\n",
            2,
            "agent.max_running: must be between 1 and 32",
        );
        assert_eq!(
            parse("[audio]\nperiod_ms = 0x14\n")
                .unwrap()
                .audio
                .period_ms,
            20
        );
    }

    // ---- value rules ----

    #[test]
    fn realtime_url_rules() {
        for ok in [
            "wss://api.openai.com/v1/realtime",
            "wss://example.com:8443",
            "ws://localhost:8080/v1/realtime",
            "ws://127.0.0.1:9000",
            "ws://127.3.2.1/x",
            "ws://[::1]:9000/v1",
            "WSS://Example.COM/",
            "",
            "none",
        ] {
            assert!(
                parse(&format!("[realtime]\nurl = {ok:?}\n")).is_ok(),
                "{ok} refused"
            );
        }
        let tls = "realtime.url: TLS is required for non-loopback endpoints";
        assert_error("[realtime]\n\nurl = \"ws://example.com/v1\"\n", 3, tls);
        assert_error("[realtime]\nurl = \"ws://127.0.0.1.evil.net/\"\n", 2, tls);
        assert_error("[realtime]\nurl = \"ws://10.0.0.1/\"\n", 2, tls);
        assert_error("[realtime]\nurl = \"ws://[::2]/\"\n", 2, tls);
        assert_error(
            "[realtime]\nurl = \"https://example.com\"\n",
            2,
            "realtime.url: must start with wss://",
        );
        assert_error(
            "[realtime]\nurl = \"example.com\"\n",
            2,
            "realtime.url: must start with wss://",
        );
        assert_error(
            "[realtime]\nurl = \"wss:///v1\"\n",
            2,
            "realtime.url: has no valid host",
        );
        assert_error(
            "[realtime]\nurl = \"wss://host:0/\"\n",
            2,
            "realtime.url: has an invalid port",
        );
        assert_error(
            "[realtime]\nurl = \"wss://host:99999/\"\n",
            2,
            "realtime.url: has an invalid port",
        );
        assert_error(
            "[realtime]\nurl = \"wss://host:/\"\n",
            2,
            "realtime.url: has an invalid port",
        );
        assert_error(
            "[realtime]\nurl = \"wss://[::1/\"\n",
            2,
            "realtime.url: has no valid host",
        );
        assert_error(
            "[realtime]\nurl = \"wss://a b/\"\n",
            2,
            "realtime.url: must not contain spaces",
        );
        assert_error(
            "[realtime]\nurl = \"wss://h/#x\"\n",
            2,
            "realtime.url: must not contain a #fragment",
        );
        let message = error("[realtime]\nurl = \"wss://me:hunter2@example.com/\"\n");
        assert!(
            message.contains("realtime.url: must not contain credentials"),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn endpoint_parts() {
        assert_eq!(
            Endpoint::parse("wss://api.openai.com/v1/realtime?model=m").unwrap(),
            Endpoint {
                tls: true,
                host: "api.openai.com".into(),
                port: 443,
                path: "/v1/realtime".into(),
                query: Some("model=m".into()),
            }
        );
        let local = Endpoint::parse("ws://[::1]:9000").unwrap();
        assert_eq!(
            (local.tls, local.host.as_str(), local.port),
            (false, "::1", 9000)
        );
        assert_eq!((local.path.as_str(), local.query.as_deref()), ("/", None));
        assert!(local.is_loopback());
        assert_eq!(Endpoint::parse("ws://localhost?x=1").unwrap().port, 80);
        assert_eq!(Endpoint::parse("ws://localhost?x=1").unwrap().path, "/");
        assert!(
            !Endpoint::parse("ws://localhost.example.com")
                .unwrap()
                .is_loopback()
        );
    }

    #[test]
    fn realtime_rules() {
        assert_error(
            "[realtime]\nvoice = \"bob\"\n",
            2,
            "realtime.voice: must be one of alloy, ash, ballad, coral, echo, sage, shimmer, verse, marin, cedar (got \"bob\")",
        );
        for voice in VOICES {
            assert!(parse(&format!("realtime.voice = {voice:?}\n")).is_ok());
        }
        assert_error(
            "[realtime]\nmodel = \" \"\n",
            2,
            "realtime.model: must not be empty",
        );
        assert_error(
            "[realtime]\ntranscription_model = \"\"\n",
            2,
            "realtime.transcription_model: must not be empty",
        );
        assert_error(
            "[realtime]\napi_key_env = \"1KEY\"\n",
            2,
            "realtime.api_key_env: \"1KEY\" is not an environment variable name",
        );
        assert_error(
            "[realtime]\napi_key_env = \"\"\n",
            2,
            "realtime.api_key_env:",
        );
        assert!(parse("[realtime]\napi_key_env = \"_My_Key2\"\n").is_ok());
    }

    #[test]
    fn audio_rules() {
        assert_error(
            "[audio]\ncapture_device = \"\"\n",
            2,
            "audio.capture_device: must name an ALSA device",
        );
        assert_error(
            "[audio]\nbackend = \"alsa\"\nplayback_device = \"\"\n",
            3,
            "audio.playback_device: must name an ALSA device",
        );
        // Device names only matter to the ALSA backend.
        assert!(parse("[audio]\nbackend = \"wav\"\ncapture_device = \"\"\n").is_ok());
        // "pulse" records from the server's default source when none is named; its
        // speaker is still an ALSA PCM.
        assert!(parse("[audio]\nbackend = \"pulse\"\ncapture_device = \"\"\n").is_ok());
        assert_error(
            "[audio]\nbackend = \"pulse\"\nplayback_device = \" \"\n",
            3,
            "audio.playback_device: must name an ALSA device with backend \"pulse\"",
        );
    }

    #[test]
    fn button_rules() {
        assert_error(
            "[button]\ndevice = \"\"\n",
            2,
            "button.device: must not be empty",
        );
        for ok in ["KEY_F13", "BTN_LEFT", "KEY_102ND", "1", "767", "183"] {
            assert!(
                parse(&format!("button.key = {ok:?}\n")).is_ok(),
                "{ok} refused"
            );
        }
        for bad in [
            "768",
            "-1",
            "0",
            "f13",
            "KEY_",
            "F13",
            "",
            "KEY F13",
            "BUTTON_A",
            "KEY_NOSUCH",
        ] {
            assert_error(
                &format!("[button]\nkey = {bad:?}\n"),
                2,
                &format!(
                    "button.key: must be a KEY_*/BTN_* name (linux/input-event-codes.h) or a key code 1..767 (got {bad:?})"
                ),
            );
        }
    }

    #[test]
    fn agent_command_rules() {
        assert_error(
            "[agent]\ncommand = []\n",
            2,
            "agent.command: must not be empty",
        );
        assert_error(
            "[agent]\ncommand = [\n  \"\",\n  \"{prompt}\",\n]\n",
            3,
            "agent.command: the first element (the program) must not be empty",
        );
        assert_error(
            "[agent]\nprotocol = \"oneshot\"\ncommand = [\"claude\", \"-p\"]\n",
            3,
            "agent.command: no element contains \"{prompt}\"",
        );
        assert_error(
            "[agent]\nresume = [\"--resume\"]\n",
            2,
            "agent.resume: no element contains \"{session}\"",
        );
        // The prompt may be part of an element; bypassing permissions is the user's call.
        let config = parse(
            "[agent]\ncommand = [\"claude\", \"--prompt={prompt}\", \"--permission-mode\", \"bypassPermissions\"]\n\
             resume = [\"--resume={session}\"]\n",
        )
        .unwrap();
        assert_eq!(config.agent.command[3], "bypassPermissions");
        assert!(
            parse(
                "agent.command = [\"claude\", \"--dangerously-skip-permissions\", \"{prompt}\"]\n"
            )
            .is_ok()
        );
    }

    #[test]
    fn agent_protocol_rules() {
        // The default: the Claude CLI kept open, walkie adding the flags.
        let config = parse("[agent]\ncommand = [\"claude\"]\n").unwrap();
        assert_eq!(
            config.agent.protocol_in_use(),
            (AgentProtocol::Claude, None)
        );
        assert_eq!(config.agent.permission_mode, "acceptEdits");
        assert_eq!(
            (
                config.agent.approval_timeout_s,
                config.agent.warm_s,
                config.agent.max_warm
            ),
            (600, 300, 1)
        );
        let config = parse(
            "[agent]\ncommand = [\"/opt/claude/bin/claude\", \"--model\", \"sonnet\"]\n\
             permission_mode = \"bypassPermissions\"\napproval_timeout_s = 60\nwarm_s = 0\n\
             max_warm = 0\n",
        )
        .unwrap();
        assert_eq!(config.agent.protocol_in_use().0, AgentProtocol::Claude);
        assert_eq!(config.agent.permission_mode, "bypassPermissions");
        assert_eq!((config.agent.warm_s, config.agent.max_warm), (0, 0));

        // An old command with {prompt} keeps running one-shot, with a line saying how to
        // switch; written explicitly, one-shot says nothing.
        let old = parse("[agent]\ncommand = [\"claude\", \"-p\", \"{prompt}\"]\n").unwrap();
        let (protocol, notice) = old.agent.protocol_in_use();
        assert_eq!(protocol, AgentProtocol::Oneshot);
        let notice = notice.unwrap();
        assert!(
            notice.contains("agent.command = [\"claude\"]")
                && notice.contains("agent.protocol = \"oneshot\""),
            "{notice}"
        );
        let explicit = parse(
            "[agent]\nprotocol = \"oneshot\"\ncommand = [\"aider\", \"--message\", \"{prompt}\"]\n",
        )
        .unwrap();
        assert_eq!(
            explicit.agent.protocol_in_use(),
            (AgentProtocol::Oneshot, None)
        );
        // The default is the Claude CLI kept open, with nothing to say about it.
        assert_eq!(
            Config::default().agent.protocol_in_use(),
            (AgentProtocol::Claude, None)
        );
        assert_eq!(Config::default().agent.command, ["claude"]);

        // Flags walkie adds itself are refused with claude, on their own line.
        assert_error(
            "[agent]\ncommand = [\n  \"claude\",\n  \"--output-format=json\",\n]\n",
            4,
            "agent.command: walkie adds \"--output-format=json\" itself with agent.protocol \"claude\"",
        );
        assert_error(
            "[agent]\ncommand = [\"claude\", \"--permission-mode\", \"plan\"]\n",
            2,
            "agent.command: walkie adds \"--permission-mode\" itself",
        );
        assert_error(
            "[agent]\nprotocol = \"acp\"\n",
            2,
            "agent.protocol: unknown value \"acp\", expected \"claude\" or \"oneshot\"",
        );
        assert_error(
            "[agent]\npermission_mode = \"yolo\"\n",
            2,
            "agent.permission_mode: must be one of acceptEdits, auto, default, dontAsk, plan, bypassPermissions (got \"yolo\")",
        );
        assert_error(
            "[agent]\napproval_timeout_s = 5\n",
            2,
            "agent.approval_timeout_s: must be between 10 and 86400",
        );
        assert_error(
            "[agent]\nwarm_s = -1\n",
            2,
            "agent.warm_s: must be between 0 and 86400",
        );
        assert_error(
            "[agent]\nmax_warm = 33\n",
            2,
            "agent.max_warm: must be between 0 and 32",
        );
    }

    #[test]
    fn agent_environment_rules() {
        assert_error(
            "[agent]\nenv_pass = [\n  \"PATH\",\n  \"MY-VAR\",\n]\n",
            4,
            "agent.env_pass: \"MY-VAR\" is not an environment variable name",
        );
        assert_error(
            "[agent.env_set]\nOK = \"1\"\n\"BAD NAME\" = \"1\"\n",
            3,
            "agent.env_set: \"BAD NAME\" is not an environment variable name",
        );
        assert_error(
            "[agent]\nenv_set = { OPENAI_API_KEY = \"sk-x\" }\n",
            2,
            "agent.env_set.OPENAI_API_KEY: the OpenAI key must never reach agents",
        );
        assert_error(
            "[agent]\nenv_pass = [\"PATH\", \"OPENAI_API_KEY\"]\n",
            2,
            "agent.env_pass: OPENAI_API_KEY: the OpenAI key must never reach agents",
        );
        // The variable walkie takes its key from is just as secret…
        assert_error(
            "[realtime]\napi_key_env = \"MY_OPENAI\"\n[agent]\nenv_pass = [\"PATH\", \"MY_OPENAI\"]\n",
            4,
            "agent.env_pass: MY_OPENAI holds the OpenAI key",
        );
        // …and blamed on api_key_env when env_pass is the default.
        assert_error(
            "# key\n[realtime]\napi_key_env = \"HOME\"\n",
            3,
            "agent.env_pass: HOME holds the OpenAI key",
        );
        // With a key file the variable is unused.
        assert!(parse("[realtime]\napi_key_env = \"HOME\"\napi_key_file = \"/k\"\n").is_ok());
    }

    #[test]
    fn containment_keys() {
        let config = parse("[agent]\nmemory_max = \"512M\"\ncontainment = \"scan\"\n").unwrap();
        assert_eq!(config.agent.memory_max_bytes(), Some(512 << 20));
        assert_eq!(config.agent.containment, ContainmentMode::Scan);
        let default = parse("").unwrap();
        assert_eq!(default.agent.memory_max_bytes(), None);
        assert_eq!(default.agent.containment, ContainmentMode::Auto);
        assert_error(
            "[agent]\nmemory_max = \"lots\"\n",
            2,
            "agent.memory_max: must be a size such as \"1G\"",
        );
        assert_error(
            "\n[agent]\ncontainment = \"jail\"\n",
            3,
            "agent.containment: unknown value \"jail\", expected \"auto\" or \"scan\"",
        );
    }

    #[test]
    fn project_rules() {
        assert!(
            parse("[projects]\nmy-app_2 = \"~/code/x\"\n0x = \"/srv\"\nhome = \"~\"\n").is_ok()
        );
        assert_error(
            "[projects]\nok = \"/srv\"\nMyApp = \"/srv/x\"\n",
            3,
            "projects: \"MyApp\" is not a valid name",
        );
        assert_error(
            "[projects]\n-x = \"/srv/x\"\n",
            2,
            "projects: \"-x\" is not a valid name",
        );
        assert_error(
            "[projects]\napp = \"code/app\"\n",
            2,
            "projects.app: must be an absolute path or start with ~/ (got \"code/app\")",
        );
        assert_error(
            "[projects]\napp = \"~bob/app\"\n",
            2,
            "projects.app: must be an absolute path",
        );
    }

    #[test]
    fn project_dir_expands_home() {
        let config = with(|c| {
            c.projects.insert("app".into(), "~/code/app".into());
            c.projects.insert("srv".into(), "/srv/x".into());
        });
        assert_eq!(config.project_dir("app"), Some(expand_home("~/code/app")));
        let app = config.project_dir("app").unwrap();
        assert!(app.is_absolute() && app.ends_with("code/app"), "{app:?}");
        assert_eq!(config.project_dir("srv"), Some(PathBuf::from("/srv/x")));
    }

    // ---- realtime_url ----

    #[test]
    fn realtime_url_adds_the_model_once() {
        let url = |url: &str, model: &str| {
            with(|c| {
                c.realtime.url = url.into();
                c.realtime.model = model.into();
            })
            .realtime_url()
        };
        assert_eq!(
            Config::default().realtime_url().as_deref(),
            Some("wss://api.openai.com/v1/realtime?model=gpt-realtime")
        );
        assert_eq!(
            url("ws://localhost:9/rt?x=1", "m").as_deref(),
            Some("ws://localhost:9/rt?x=1&model=m")
        );
        assert_eq!(
            url("ws://localhost:9/rt?", "m").as_deref(),
            Some("ws://localhost:9/rt?model=m")
        );
        assert_eq!(
            url("wss://h/rt?model=mine", "m").as_deref(),
            Some("wss://h/rt?model=mine")
        );
        assert_eq!(
            url("wss://h/rt?a=1&model=mine", "m").as_deref(),
            Some("wss://h/rt?a=1&model=mine")
        );
        assert_eq!(
            url("wss://h/rt?mymodel=1", "m").as_deref(),
            Some("wss://h/rt?mymodel=1&model=m")
        );
        assert_eq!(
            url("wss://h/rt", "a b/c").as_deref(),
            Some("wss://h/rt?model=a%20b%2Fc")
        );
        assert_eq!(url("", "m"), None);
        assert_eq!(url("none", "m"), None);
    }

    // ---- the API key ----

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn key_file(contents: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openai.key");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(contents.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    fn with_key_file(path: &Path) -> Config {
        with(|c| c.realtime.api_key_file = path.to_str().unwrap().into())
    }

    #[test]
    fn api_key_from_the_named_variable_trimmed() {
        let config = with(|c| c.realtime.api_key_env = "WALKIE_KEY".into());
        let key = config.api_key_with(env(&[("WALKIE_KEY", "  sk-abc123\n")]));
        assert_eq!(key.unwrap(), "sk-abc123");
        // Another variable of the same content is not looked at.
        let missing = config.api_key_with(env(&[("OPENAI_API_KEY", "sk-abc123")]));
        assert!(matches!(missing, Err(KeyError::EnvUnset { ref var }) if var == "WALKIE_KEY"));
        let message = missing.unwrap_err().to_string();
        assert!(
            message.contains("WALKIE_KEY") && message.contains("api_key_file"),
            "{message}"
        );
        assert!(matches!(
            config.api_key_with(env(&[("WALKIE_KEY", " \n")])),
            Err(KeyError::EnvUnset { .. })
        ));
        let bad = config
            .api_key_with(env(&[("WALKIE_KEY", "sk-abc 123")]))
            .unwrap_err();
        assert!(matches!(bad, KeyError::EnvMalformed { .. }));
        assert!(!bad.to_string().contains("sk-abc"), "{bad}");
    }

    #[test]
    fn api_key_from_a_private_file() {
        let (_dir, path) = key_file("sk-filekey\n", 0o600);
        let config = with_key_file(&path);
        // The file wins over the variable.
        let key = config.api_key_with(env(&[("OPENAI_API_KEY", "sk-envkey")]));
        assert_eq!(key.unwrap(), "sk-filekey");
        assert_eq!(config.api_key().unwrap(), "sk-filekey");
        let (_dir, path) = key_file("sk-filekey", 0o400);
        assert_eq!(with_key_file(&path).api_key().unwrap(), "sk-filekey");
    }

    #[test]
    fn api_key_file_readable_by_others_is_refused() {
        for mode in [0o644, 0o640, 0o604] {
            let (_dir, path) = key_file("sk-secret-value\n", mode);
            let error = with_key_file(&path).api_key().unwrap_err();
            assert!(
                matches!(error, KeyError::FileTooOpen { .. }),
                "{mode:o}: {error:?}"
            );
            let message = error.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
            assert!(message.contains(&format!("{mode:04o}")), "{message}");
            assert!(!message.contains("sk-secret"), "{message}");
        }
    }

    #[test]
    fn api_key_file_missing_empty_or_malformed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        let error = with_key_file(&missing).api_key().unwrap_err();
        assert!(
            matches!(error, KeyError::FileUnreadable { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains(&missing.display().to_string()));
        // No fallback to the variable when the configured file is unusable.
        let error = with_key_file(&missing).api_key_with(env(&[("OPENAI_API_KEY", "sk-x")]));
        assert!(error.is_err());

        let (_dir, path) = key_file(" \n\n", 0o600);
        assert!(matches!(
            with_key_file(&path).api_key(),
            Err(KeyError::FileEmpty { .. })
        ));
        let (_dir, path) = key_file("OPENAI_API_KEY = sk-secret\n", 0o600);
        let error = with_key_file(&path).api_key().unwrap_err();
        assert!(matches!(error, KeyError::FileMalformed { .. }), "{error:?}");
        assert!(!error.to_string().contains("sk-secret"));
        let (_dir, path) = key_file(&"k".repeat(5000), 0o600);
        assert!(matches!(
            with_key_file(&path).api_key(),
            Err(KeyError::FileMalformed { .. })
        ));
    }

    // ---- locating and loading ----

    fn paths_in(dir: &Path) -> Paths {
        Paths::from_lookup(
            |k| (k == "XDG_CONFIG_HOME").then(|| dir.to_path_buf()),
            1000,
        )
    }

    #[test]
    fn locate_prefers_explicit_then_variable_then_existing_default() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths_in(dir.path());
        let explicit = Path::new("/etc/walkie.toml");
        let from_env = || Some(OsString::from("/env/walkie.toml"));
        assert_eq!(
            locate_with(Some(explicit), from_env(), &paths),
            ConfigSource::File(explicit.into())
        );
        assert_eq!(
            locate_with(None, from_env(), &paths),
            ConfigSource::File("/env/walkie.toml".into())
        );
        assert_eq!(
            locate_with(None, Some("".into()), &paths),
            ConfigSource::Defaults
        );
        assert_eq!(locate_with(None, None, &paths), ConfigSource::Defaults);
        std::fs::create_dir_all(paths.config_file.parent().unwrap()).unwrap();
        std::fs::write(&paths.config_file, "").unwrap();
        assert_eq!(
            locate_with(None, None, &paths),
            ConfigSource::File(paths.config_file.clone())
        );
    }

    #[test]
    fn load_source_reads_files_and_defaults() {
        assert_eq!(
            Config::load_source(&ConfigSource::Defaults).unwrap(),
            Config::default()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[audio]\nperiod_ms = 20\n").unwrap();
        let config = Config::load_source(&ConfigSource::File(path.clone())).unwrap();
        assert_eq!(config.audio.period_ms, 20);

        let missing = dir.path().join("missing.toml");
        let error = Config::load(&missing).unwrap_err();
        assert!(matches!(error, ConfigError::Io { .. }));
        assert!(
            error
                .to_string()
                .starts_with(&format!("{}: ", missing.display()))
        );

        std::fs::write(&path, b"# ok\n# \xff\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert_eq!(error, format!("{}:2: not UTF-8 text", path.display()));
    }

    #[test]
    fn messages_use_the_path_as_given() {
        let error = Config::parse("[audio]\nperiod_ms = 1\n", Path::new("conf/../w.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "conf/../w.toml:2: audio.period_ms: must be between 2 and 100 (got 1)"
        );
    }

    #[test]
    fn suggestions_are_typos_only() {
        let keys = ["voice", "model", "url"];
        assert_eq!(closest("voce", keys.into_iter()), Some("voice"));
        assert_eq!(closest("Voice", keys.into_iter()), Some("voice"));
        assert_eq!(closest("urls", keys.into_iter()), Some("url"));
        assert_eq!(closest("colour", keys.into_iter()), None);
        assert_eq!(
            closest("audoi", ["audio", "agent"].into_iter()),
            Some("audio")
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
