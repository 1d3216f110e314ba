//! Real-time pacing for devices without a clock (sans-IO; used inside the audio threads).
//!
//! The ALSA `file`/`null` plugins and the WAV backend accept and deliver frames as fast as
//! they are asked (docs/ARCHITECTURE.md, "Testing without hardware"). So that such a device
//! behaves like a sound card, each audio thread keeps a timeline: frame `n` of the stream
//! belongs at `anchor + (n - anchor_frames) / rate` on the monotonic clock, and a period may
//! only move once the clock has reached it (capture: once the period has been "recorded";
//! playback: a fixed lead before it is "heard"). The deadline is absolute, so sleeping late
//! never accumulates drift. A thread that fell far behind (starved, suspended) re-anchors
//! instead of bursting to catch up.
//!
//! Devices with a clock (real hardware) pace the thread themselves; the threads detect them
//! (`avail` drops below a period at some point) and bypass the pacer. Times are nanoseconds
//! since the engine's epoch, so the struct is plain arithmetic and tested with made-up times.

/// A stream's timeline against the monotonic clock.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: u64,
    anchor_ns: i128,
    anchor_frames: u64,
    frames: u64,
    /// How many frames the stream may run ahead of the clock: negative for capture (a
    /// period can only be read once it has been recorded), positive for playback.
    lead_frames: i64,
    max_late_ns: i128,
}

impl Pacer {
    /// A timeline starting at `now_ns` with no frame transferred.
    pub fn new(now_ns: u64, rate: u32, lead_frames: i64, max_late_ns: u64) -> Pacer {
        Pacer {
            rate: u64::from(rate.max(1)),
            anchor_ns: i128::from(now_ns),
            anchor_frames: 0,
            frames: 0,
            lead_frames,
            max_late_ns: i128::from(max_late_ns),
        }
    }

    fn frames_to_ns(&self, frames: i128) -> i128 {
        frames * 1_000_000_000 / i128::from(self.rate)
    }

    /// Where the next frame sits on the clock: when a clockless device "records" or
    /// "plays" it.
    pub fn position_ns(&self) -> i128 {
        self.anchor_ns + self.frames_to_ns(i128::from(self.frames - self.anchor_frames))
    }

    /// When the next transfer may happen.
    pub fn due_ns(&self) -> i128 {
        self.position_ns() - self.frames_to_ns(i128::from(self.lead_frames))
    }

    /// Whether a transfer may happen at `now_ns`. When the stream is more than the allowed
    /// lateness behind, it is re-anchored so that it is due exactly now.
    pub fn is_due(&mut self, now_ns: u64) -> bool {
        let now = i128::from(now_ns);
        if now - self.due_ns() > self.max_late_ns {
            self.anchor_frames = self.frames;
            self.anchor_ns = now + self.frames_to_ns(i128::from(self.lead_frames));
        }
        self.due_ns() <= now
    }

    /// Counts `frames` as transferred.
    pub fn advance(&mut self, frames: u64) {
        self.frames += frames;
    }

    /// Restarts the timeline at `now_ns` (after a flush or an xrun the old one is void).
    pub fn restart(&mut self, now_ns: u64) {
        self.anchor_frames = self.frames;
        self.anchor_ns = i128::from(now_ns);
    }

    /// The deadline as nanoseconds since the epoch, clamped at 0.
    pub fn due_ns_u64(&self) -> u64 {
        u64::try_from(self.due_ns().max(0)).unwrap_or(u64::MAX)
    }

    /// How far the stream's next frame is ahead of `now_ns`, in frames (0 when behind).
    pub fn ahead_frames(&self, now_ns: u64) -> u64 {
        let ahead_ns = self.position_ns() - i128::from(now_ns);
        if ahead_ns <= 0 {
            return 0;
        }
        u64::try_from(ahead_ns * i128::from(self.rate) / 1_000_000_000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const PERIOD: u64 = 240; // 10 ms at 24 kHz

    #[test]
    fn capture_waits_until_each_period_is_recorded() {
        let start = 1_000 * MS;
        let mut p = Pacer::new(start, 24_000, -(PERIOD as i64), 200 * MS);
        assert!(!p.is_due(start), "nothing recorded yet at the start");
        assert!(!p.is_due(start + 9 * MS));
        assert!(p.is_due(start + 10 * MS));
        p.advance(PERIOD);
        assert_eq!(p.due_ns_u64(), start + 20 * MS);
        assert!(!p.is_due(start + 15 * MS));
        // Deadlines are absolute: reading period 2 late does not push period 3 back.
        assert!(p.is_due(start + 27 * MS));
        p.advance(PERIOD);
        assert_eq!(p.due_ns_u64(), start + 30 * MS);
    }

    #[test]
    fn playback_runs_its_lead_ahead_then_follows_the_clock() {
        let start = 5_000 * MS;
        let mut p = Pacer::new(start, 24_000, 2 * PERIOD as i64, 200 * MS);
        let mut written = 0;
        while p.is_due(start) {
            p.advance(PERIOD);
            written += 1;
        }
        assert_eq!(written, 3, "lead of two periods plus the one playing now");
        assert_eq!(p.ahead_frames(start), 3 * PERIOD);
        assert!(p.is_due(start + 10 * MS));
        p.advance(PERIOD);
        assert!(!p.is_due(start + 15 * MS));
    }

    #[test]
    fn far_behind_reanchors_instead_of_bursting() {
        let start = 0;
        let mut p = Pacer::new(start, 24_000, -(PERIOD as i64), 50 * MS);
        // One second without a transfer (thread starved or suspended).
        assert!(p.is_due(1_000 * MS));
        p.advance(PERIOD);
        // Without the re-anchor the next 99 periods would all be due at once.
        assert!(!p.is_due(1_000 * MS));
        assert_eq!(p.due_ns_u64(), 1_010 * MS);
    }

    #[test]
    fn slightly_late_catches_up_without_reanchoring() {
        let mut p = Pacer::new(0, 24_000, -(PERIOD as i64), 50 * MS);
        assert!(p.is_due(30 * MS));
        p.advance(PERIOD);
        assert!(p.is_due(30 * MS), "period 2 ended at 20 ms");
        p.advance(PERIOD);
        assert!(p.is_due(30 * MS), "period 3 ended at 30 ms");
        p.advance(PERIOD);
        assert!(!p.is_due(30 * MS));
    }

    #[test]
    fn restart_moves_the_timeline_to_now() {
        let mut p = Pacer::new(0, 24_000, 0, 50 * MS);
        p.advance(10 * PERIOD);
        p.restart(20 * MS);
        assert_eq!(p.position_ns(), i128::from(20 * MS));
        assert_eq!(p.ahead_frames(10 * MS), PERIOD);
    }
}
