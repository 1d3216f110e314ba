//! What the audio threads and the main loop share: atomics only (plus the rings, which
//! `mod.rs` creates). Nothing here blocks or allocates after construction.
//!
//! Times crossing threads are nanoseconds since [`Shared::epoch`], an `Instant` fixed at
//! start, so they fit an `AtomicU64` and map back to `Instant`s on the main side.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Per-device counters one audio thread publishes.
#[derive(Debug, Default)]
pub struct DeviceCell {
    /// Overruns (capture) or underruns (playback) the thread recovered from.
    pub xruns: AtomicU64,
    /// SCHED_FIFO was granted to the thread.
    pub realtime: AtomicBool,
}

/// A (frame count, time) pair written by one thread and read by another without tearing:
/// a sequence lock, whose writer never waits (the reader retries instead).
#[derive(Debug, Default)]
pub struct Stamp {
    seq: AtomicU64,
    frames: AtomicU64,
    time_ns: AtomicU64,
}

impl Stamp {
    /// Writer side (one thread only).
    pub fn store(&self, frames: u64, time_ns: u64) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.frames.store(frames, Ordering::Relaxed);
        self.time_ns.store(time_ns, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Reader side: a consistent pair.
    pub fn load(&self) -> (u64, u64) {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            let frames = self.frames.load(Ordering::Relaxed);
            let time_ns = self.time_ns.load(Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Acquire);
            let s2 = self.seq.load(Ordering::Relaxed);
            if s1 == s2 && s1 & 1 == 0 {
                return (frames, time_ns);
            }
            std::hint::spin_loop();
        }
    }
}

/// An interval during which the speaker is audible, as the playback thread estimates it,
/// tagged with the flush epoch in force when it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudibleSpan {
    pub start_ns: u64,
    pub end_ns: u64,
    pub epoch: u64,
}

/// The state shared by the main loop and both audio threads.
#[derive(Debug)]
pub struct Shared {
    pub epoch: Instant,
    pub stop: AtomicBool,
    /// The main loop wants a wake-up per capture period.
    pub streaming: AtomicBool,
    pub capture: DeviceCell,
    pub playback: DeviceCell,
    /// Total frames pushed into the capture ring, and when the latest period was captured.
    pub capture_stamp: Stamp,
    /// Capture frames dropped because the ring was full (the main loop stalled).
    pub capture_dropped: AtomicU64,
    /// Speech samples taken from the playback ring: written to the device or discarded.
    pub consumed: AtomicU64,
    /// Times the speaker ran out of speech and more of it came after (the answer arrived
    /// slower than it plays: the network, the server, or a stalled main loop). Silence
    /// filled each gap; the device did not underrun.
    pub speech_gaps: AtomicU64,
    /// Bumped by every flush; the playback thread drops speech up to `flush_upto`.
    pub flush_epoch: AtomicU64,
    /// Samples pushed into the playback ring when the latest flush happened.
    pub flush_upto: AtomicU64,
    /// Earcons to start, one bit per `earcon::index`.
    pub earcon_requests: AtomicU32,
    /// Since when the speaker has been quiet (the playback thread parked after its last
    /// sound played out), in ns since the epoch; [`SPEAKER_BUSY`] while it may be audible.
    /// The capture thread batches its reads only while the speaker is quiet, so the
    /// audio the pre-roll may receive late never holds echo.
    pub speaker_quiet_since: AtomicU64,
}

/// `speaker_quiet_since` while the playback thread is running (speech, earcons, or the
/// silence that lets them play out).
pub const SPEAKER_BUSY: u64 = u64::MAX;

impl Shared {
    pub fn new(epoch: Instant) -> Shared {
        Shared {
            epoch,
            stop: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            capture: DeviceCell::default(),
            playback: DeviceCell::default(),
            capture_stamp: Stamp::default(),
            capture_dropped: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            speech_gaps: AtomicU64::new(0),
            flush_epoch: AtomicU64::new(0),
            flush_upto: AtomicU64::new(0),
            earcon_requests: AtomicU32::new(0),
            // Nothing has played yet.
            speaker_quiet_since: AtomicU64::new(0),
        }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.ns_of(Instant::now())
    }

    pub fn ns_of(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn instant_of(&self, ns: u64) -> Instant {
        self.epoch
            .checked_add(Duration::from_nanos(ns))
            .unwrap_or(self.epoch)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether the speaker has been quiet for at least `guard_ns` at `now_ns` (the echo of
    /// its last sound has died away).
    pub fn speaker_quiet_for(&self, now_ns: u64, guard_ns: u64) -> bool {
        let since = self.speaker_quiet_since.load(Ordering::Acquire);
        since != SPEAKER_BUSY && now_ns >= since.saturating_add(guard_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stamp_pairs_never_tear() {
        let stamp = Arc::new(Stamp::default());
        let writer = {
            let stamp = Arc::clone(&stamp);
            std::thread::spawn(move || {
                for i in 1..=200_000u64 {
                    stamp.store(i, i * 10);
                }
            })
        };
        let mut last = 0;
        loop {
            let (frames, time) = stamp.load();
            assert_eq!(time, frames * 10, "a torn pair");
            assert!(frames >= last, "went backwards");
            last = frames;
            if frames == 200_000 {
                break;
            }
        }
        writer.join().expect("writer");
    }

    #[test]
    fn times_round_trip_through_nanoseconds() {
        let epoch = Instant::now();
        let shared = Shared::new(epoch);
        let t = epoch + Duration::from_millis(1234);
        assert_eq!(shared.ns_of(t), 1_234_000_000);
        assert_eq!(shared.instant_of(1_234_000_000), t);
        assert_eq!(shared.ns_of(epoch - Duration::from_millis(1)), 0);
    }
}
