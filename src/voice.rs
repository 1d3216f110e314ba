//! Small types shared by the conversation core and the audio engine.

/// The short sounds walkie plays on its own (generated at start, no asset files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Earcon {
    /// The button went down and walkie is listening.
    Press,
    /// The button came up; the turn was sent (or dropped when too short).
    Release,
    /// A background task finished; an announcement follows.
    TaskDone,
    /// The Realtime link is down (a press now cannot reach the model).
    LinkLost,
    /// Something needs the user's attention: the link failed for good, a device failed.
    Failed,
}

/// Where playback of assistant speech stands, in frames (24 kHz mono) since walkie started.
///
/// `queued_frames` counts every speech frame handed to the audio engine; `consumed_frames`
/// counts those the playback thread has either written to the device or discarded on a
/// flush. Both only grow, so `consumed_frames` is a position in the stream of everything ever
/// queued: an item whose first frame was queued when `queued_frames` was `s` has had
/// `min(consumed, end) - s` frames played (when it was not flushed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlaybackProgress {
    pub queued_frames: u64,
    pub consumed_frames: u64,
}

impl PlaybackProgress {
    /// Speech is queued or playing.
    pub fn is_playing(&self) -> bool {
        self.consumed_frames < self.queued_frames
    }
}

/// Sample rate of every PCM stream walkie handles (the Realtime API's only PCM rate).
pub const SAMPLE_RATE: u32 = 24_000;
/// Frames per millisecond at [`SAMPLE_RATE`].
pub const FRAMES_PER_MS: u64 = (SAMPLE_RATE / 1000) as u64;
