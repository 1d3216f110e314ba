//! Audio facade placeholder until the audio engine lands (none backend only).
use std::sync::Arc;
use std::time::Instant;

use crate::voice::{Earcon, PlaybackProgress};

pub struct AudioSettings;
impl AudioSettings {
    pub fn from_config(_c: &crate::config::AudioConfig) -> Self {
        AudioSettings
    }
}
#[derive(Debug)]
pub enum AudioReport {
    Warning(String),
}
#[derive(serde::Serialize)]
pub struct AudioStatus {
    pub state: &'static str,
}
pub struct PcmInfo {
    pub name: String,
    pub description: String,
    pub input: bool,
    pub output: bool,
}
pub fn list_pcms() -> Vec<PcmInfo> {
    Vec::new()
}
pub struct Audio {
    progress: PlaybackProgress,
}
impl Audio {
    pub fn start(_s: AudioSettings, _w: Arc<mio::Waker>) -> Audio {
        Audio { progress: PlaybackProgress::default() }
    }
    pub fn status(&self) -> AudioStatus {
        AudioStatus { state: "disabled" }
    }
    pub fn set_streaming(&mut self, _on: bool) {}
    pub fn take_preroll(&mut self, _now: Instant, _out: &mut Vec<i16>) {}
    pub fn read_capture(&mut self, _now: Instant, _out: &mut Vec<i16>) {}
    pub fn play(&mut self, pcm: &[i16]) {
        self.progress.queued_frames += pcm.len() as u64;
        self.progress.consumed_frames = self.progress.queued_frames;
    }
    pub fn flush_playback(&mut self) {}
    pub fn progress(&self) -> PlaybackProgress {
        self.progress
    }
    pub fn play_earcon(&mut self, _e: Earcon) {}
    pub fn on_wake(&mut self, _now: Instant) -> Vec<AudioReport> {
        Vec::new()
    }
    pub fn on_timeout(&mut self, _now: Instant) -> Vec<AudioReport> {
        Vec::new()
    }
    pub fn next_deadline(&self) -> Option<Instant> {
        None
    }
    pub fn stop(self) {}
}
