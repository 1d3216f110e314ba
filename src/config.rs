//! Configuration: the TOML file of DESIGN.md §3, its defaults, and its validation.
//!
//! Every key has a default, so an empty file (or no file) is a valid configuration.
//! Unknown keys and bad values are errors that name the key and the file line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// `wss://…` anywhere, `ws://…` only to a loopback address, or `""`/`"none"` to disable the link.
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            command: [
                "claude",
                "-p",
                "{prompt}",
                "--output-format",
                "stream-json",
                "--verbose",
                "--permission-mode",
                "acceptEdits",
            ]
            .map(String::from)
            .to_vec(),
            resume: ["--resume", "{session}"].map(String::from).to_vec(),
            max_running: 3,
            cancel_grace_ms: 3000,
            env_pass: ["PATH", "HOME", "USER", "LANG", "TERM", "ANTHROPIC_API_KEY"]
                .map(String::from)
                .to_vec(),
            env_set: BTreeMap::from([("CLAUDE_CODE_MAX_RETRIES".to_string(), "3".to_string())]),
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
