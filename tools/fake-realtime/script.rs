//! What the fake "model" answers: the script (`--script FILE` or the `script` control command).
//!
//! Pure data, parsed once and shared read-only (`Arc`) by every connection thread; a `script`
//! command swaps the whole `Arc`. Audio for a reply is rendered here (a sine tone or a WAV
//! file's samples) so a connection only slices bytes while streaming.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

/// Why a script was refused; the tool exits 2 (file) or the control command answers
/// `{"ok":false}` (run time) and the previous script stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file cannot be read: fix the path.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not the documented JSON shape (unknown keys are refused so typos show).
    #[error("bad script: {0}")]
    Json(#[from] serde_json::Error),
    /// A rule's `match` is not a valid regex.
    #[error("bad regex {pattern:?}: {source}")]
    Regex {
        pattern: String,
        source: regex::Error,
    },
    /// A reply's WAV file is unreadable or not 24 kHz mono s16.
    #[error("bad wav {path}: {reason}")]
    Wav { path: PathBuf, reason: String },
}

/// Audio of one spoken reply, s16le 24 kHz mono.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyAudio {
    /// A 440 Hz tone of this many milliseconds.
    Tone { ms: u32 },
    /// The samples of a WAV file.
    Pcm(Arc<Vec<u8>>),
}

/// A function call the model makes in a response.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments object; string values may hold `{text}`.
    pub arguments: Value,
}

/// One response's content: speech (audio + transcript), a function call, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub say: Option<String>,
    pub audio: Option<ReplyAudio>,
    pub call: Option<Call>,
    /// Said once the call's output is back, instead of the script's `after_tool`.
    pub after: Option<Box<Reply>>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub pattern: Regex,
    pub reply: Reply,
}

/// The whole script; see README.md for the JSON form.
#[derive(Debug, Clone)]
pub struct Script {
    pub rules: Vec<Rule>,
    pub default: Reply,
    pub after_tool: Reply,
    /// Replies to system messages by their text, before `on_system`.
    pub system_rules: Vec<Rule>,
    pub on_system: Reply,
    /// What the "transcription" of any committed audio says.
    pub transcript: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScript {
    rules: Option<Vec<RawRule>>,
    default: Option<RawReply>,
    after_tool: Option<RawReply>,
    system_rules: Option<Vec<RawRule>>,
    on_system: Option<RawReply>,
    transcript: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    reply: RawReply,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReply {
    say: Option<String>,
    audio_ms: Option<u32>,
    wav: Option<String>,
    call: Option<RawCall>,
    after: Option<Box<RawReply>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCall {
    name: String,
    #[serde(default = "empty_object")]
    arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

pub const SAMPLE_RATE: u32 = 24_000;

impl Reply {
    fn say(text: &str) -> Reply {
        Reply {
            say: Some(text.to_owned()),
            audio: None,
            call: None,
            after: None,
        }
    }

    /// The PCM for this reply's speech: the scripted audio, or a tone whose length follows
    /// the text (about the pace of speech) so transcripts and audio stay plausible.
    pub fn render_audio(&self, text: &str) -> Vec<u8> {
        match &self.audio {
            Some(ReplyAudio::Pcm(bytes)) => bytes.as_ref().clone(),
            Some(ReplyAudio::Tone { ms }) => tone(*ms),
            None => {
                let chars = u32::try_from(text.chars().count()).unwrap_or(u32::MAX);
                tone(chars.saturating_mul(60).clamp(400, 15_000))
            }
        }
    }
}

/// A 440 Hz sine at a third of full scale, s16le 24 kHz mono.
pub fn tone(ms: u32) -> Vec<u8> {
    let samples = u64::from(ms) * u64::from(SAMPLE_RATE) / 1000;
    let mut out = Vec::with_capacity(usize::try_from(samples * 2).unwrap_or(0));
    for n in 0..samples {
        let phase = 2.0 * std::f64::consts::PI * 440.0 * n as f64 / f64::from(SAMPLE_RATE);
        let sample = (phase.sin() * 10_000.0) as i16;
        out.extend_from_slice(&sample.to_le_bytes());
    }
    out
}

/// The PCM data of a 24 kHz mono 16-bit PCM WAV file.
pub fn read_wav(path: &Path) -> Result<Vec<u8>, ScriptError> {
    let bad = |reason: &str| ScriptError::Wav {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = std::fs::read(path).map_err(|e| bad(&e.to_string()))?;
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(bad("not a RIFF/WAVE file"));
    }
    let mut at = 12;
    let mut format_ok = false;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let size = usize::try_from(size).map_err(|_| bad("chunk too large"))?;
        let body_start = at + 8;
        let body_end = body_start.saturating_add(size).min(bytes.len());
        let body = &bytes[body_start..body_end];
        match id {
            b"fmt " => {
                if body.len() < 16 {
                    return Err(bad("short fmt chunk"));
                }
                let format = u16::from_le_bytes([body[0], body[1]]);
                let channels = u16::from_le_bytes([body[2], body[3]]);
                let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
                let bits = u16::from_le_bytes([body[14], body[15]]);
                // 0xFFFE is WAVE_FORMAT_EXTENSIBLE, which sox and ffmpeg write for plain PCM too.
                if !(format == 1 || format == 0xFFFE)
                    || channels != 1
                    || rate != SAMPLE_RATE
                    || bits != 16
                {
                    return Err(bad(&format!(
                        "need PCM 24000 Hz mono 16-bit, got format {format} {rate} Hz {channels} ch {bits} bit"
                    )));
                }
                format_ok = true;
            }
            b"data" => {
                if !format_ok {
                    return Err(bad("data chunk before fmt chunk"));
                }
                let mut data = body.to_vec();
                data.truncate(data.len() & !1);
                return Ok(data);
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body_start.saturating_add(size).saturating_add(size & 1);
    }
    Err(bad("no data chunk"))
}

impl RawReply {
    fn build(self, base: &Path) -> Result<Reply, ScriptError> {
        let audio = match (self.wav, self.audio_ms) {
            (Some(wav), _) => Some(ReplyAudio::Pcm(Arc::new(read_wav(&base.join(wav))?))),
            (None, Some(ms)) => Some(ReplyAudio::Tone { ms }),
            (None, None) => None,
        };
        Ok(Reply {
            say: self.say,
            audio,
            call: self.call.map(|c| Call {
                name: c.name,
                arguments: c.arguments,
            }),
            after: match self.after {
                Some(after) => Some(Box::new(after.build(base)?)),
                None => None,
            },
        })
    }
}

impl Default for Script {
    /// A sensible demo: text containing "start" starts a task with the text as its prompt,
    /// anything else is echoed back.
    fn default() -> Script {
        let start = Reply {
            say: Some("Starting that now.".to_owned()),
            audio: None,
            call: Some(Call {
                name: "start_task".to_owned(),
                arguments: serde_json::json!({"prompt": "{text}"}),
            }),
            after: None,
        };
        Script {
            rules: vec![Rule {
                pattern: Regex::new("(?i)start").expect("constant regex"),
                reply: start,
            }],
            default: Reply::say("You said: {text}"),
            after_tool: Reply::say("Started."),
            system_rules: Vec::new(),
            on_system: Reply::say("A task finished."),
            transcript: "hello walkie".to_owned(),
        }
    }
}

impl Script {
    /// Parses a script document; missing parts keep the built-in defaults. Relative WAV paths
    /// are resolved against `base` (the script file's directory).
    pub fn from_json(json: &Value, base: &Path) -> Result<Script, ScriptError> {
        let raw: RawScript = serde_json::from_value(json.clone())?;
        let mut script = Script::default();
        let build_rules = |rules: Vec<RawRule>| {
            rules
                .into_iter()
                .map(|rule| {
                    let pattern =
                        Regex::new(&rule.pattern).map_err(|source| ScriptError::Regex {
                            pattern: rule.pattern.clone(),
                            source,
                        })?;
                    Ok(Rule {
                        pattern,
                        reply: rule.reply.build(base)?,
                    })
                })
                .collect::<Result<Vec<Rule>, ScriptError>>()
        };
        if let Some(rules) = raw.rules {
            script.rules = build_rules(rules)?;
        }
        if let Some(rules) = raw.system_rules {
            script.system_rules = build_rules(rules)?;
        }
        if let Some(reply) = raw.default {
            script.default = reply.build(base)?;
        }
        if let Some(reply) = raw.after_tool {
            script.after_tool = reply.build(base)?;
        }
        if let Some(reply) = raw.on_system {
            script.on_system = reply.build(base)?;
        }
        if let Some(transcript) = raw.transcript {
            script.transcript = transcript;
        }
        Ok(script)
    }

    pub fn from_file(path: &Path) -> Result<Script, ScriptError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.to_owned(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Script::from_json(&json, base)
    }

    /// The reply to a user turn: the first rule matching `text`, else the default.
    pub fn reply_to_user(&self, text: &str) -> &Reply {
        self.rules
            .iter()
            .find(|rule| rule.pattern.is_match(text))
            .map_or(&self.default, |rule| &rule.reply)
    }

    /// The reply to a system message: the first system rule matching `text`, else
    /// `on_system`.
    pub fn reply_to_system(&self, text: &str) -> &Reply {
        self.system_rules
            .iter()
            .find(|rule| rule.pattern.is_match(text))
            .map_or(&self.on_system, |rule| &rule.reply)
    }
}

/// Replaces `{text}` in every string of `value` (call arguments).
pub fn fill_value(value: &Value, text: &str) -> Value {
    match value {
        Value::String(s) => Value::String(s.replace("{text}", text)),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill_value(v, text)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill_value(v, text)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_script_starts_a_task_for_start_and_echoes_otherwise() {
        let script = Script::default();
        let reply = script.reply_to_user("please Start the build");
        let call = reply.call.as_ref().expect("a call");
        assert_eq!(call.name, "start_task");
        assert_eq!(
            fill_value(&call.arguments, "please Start the build"),
            json!({"prompt":"please Start the build"})
        );
        assert!(script.reply_to_user("hello walkie").call.is_none());
        assert_eq!(script.transcript, "hello walkie");
    }

    #[test]
    fn system_messages_are_answered_by_the_first_matching_system_rule() {
        let script = Script::from_json(
            &json!({"system_rules":[{"match":"^Permission","reply":{"say":"Allow?"}}],
                    "on_system":{"say":"Done."}}),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(
            script
                .reply_to_system("Permission request: x")
                .say
                .as_deref(),
            Some("Allow?")
        );
        assert_eq!(
            script.reply_to_system("Task update: x").say.as_deref(),
            Some("Done.")
        );
        assert_eq!(
            Script::default().reply_to_system("anything").say.as_deref(),
            Some("A task finished.")
        );
    }

    #[test]
    fn a_script_replaces_rules_and_keeps_other_defaults() {
        let script = Script::from_json(
            &json!({"rules":[{"match":"(?i)weather","reply":{"say":"Sunny.","audio_ms":300}}],
                    "transcript":"what is the weather"}),
            Path::new("."),
        )
        .expect("valid");
        let reply = script.reply_to_user(&script.transcript);
        assert_eq!(reply.say.as_deref(), Some("Sunny."));
        assert_eq!(reply.render_audio("Sunny.").len(), 300 * 48);
        // The built-in start rule is gone, the after_tool default stays.
        assert!(script.reply_to_user("start it").call.is_none());
        assert_eq!(script.after_tool.say.as_deref(), Some("Started."));
    }

    #[test]
    fn refuses_unknown_keys_and_bad_regexes() {
        let typo = Script::from_json(&json!({"rule":[]}), Path::new("."));
        assert!(matches!(typo, Err(ScriptError::Json(_))));
        let regex = Script::from_json(
            &json!({"rules":[{"match":"(","reply":{"say":"x"}}]}),
            Path::new("."),
        );
        assert!(matches!(regex, Err(ScriptError::Regex { .. })));
    }

    #[test]
    fn reads_the_samples_of_a_24k_mono_wav_and_refuses_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, rate: u32, channels: u16| {
            let data: Vec<u8> = (0..100u8).collect();
            let mut wav = Vec::new();
            wav.extend_from_slice(b"RIFF");
            wav.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
            wav.extend_from_slice(b"WAVEfmt ");
            wav.extend_from_slice(&16u32.to_le_bytes());
            wav.extend_from_slice(&1u16.to_le_bytes());
            wav.extend_from_slice(&channels.to_le_bytes());
            wav.extend_from_slice(&rate.to_le_bytes());
            wav.extend_from_slice(&(rate * 2 * u32::from(channels)).to_le_bytes());
            wav.extend_from_slice(&(2 * channels).to_le_bytes());
            wav.extend_from_slice(&16u16.to_le_bytes());
            wav.extend_from_slice(b"data");
            wav.extend_from_slice(&(data.len() as u32).to_le_bytes());
            wav.extend_from_slice(&data);
            let path = dir.path().join(name);
            std::fs::write(&path, wav).expect("write");
            path
        };
        let good = write("good.wav", 24_000, 1);
        assert_eq!(
            read_wav(&good).expect("good"),
            (0..100u8).collect::<Vec<_>>()
        );
        assert!(read_wav(&write("rate.wav", 16_000, 1)).is_err());
        assert!(read_wav(&write("stereo.wav", 24_000, 2)).is_err());
        let script =
            Script::from_json(&json!({"default":{"say":"x","wav":"good.wav"}}), dir.path())
                .expect("relative wav resolves against the base");
        assert_eq!(script.default.render_audio("x").len(), 100);
    }
}
