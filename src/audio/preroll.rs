//! The pre-roll window and its echo filter (sans-IO; lives on the main thread).
//!
//! Capture runs all the time; when the button goes down, walkie sends the last `preroll_ms`
//! of audio before the live stream so the first syllable is not cut off (docs/ARCHITECTURE.md,
//! "The flows"). That window must not contain the assistant's own voice coming back through the
//! microphone (a barge-in happens exactly while the speaker is talking), so the playback thread
//! reports the intervals during which the speaker was audible and every captured sample whose
//! capture time falls inside one (padded for timing uncertainty and room echo) is left out.
//!
//! Inputs: captured samples with the capture time of the end of each chunk
//! ([`Preroll::handle_capture`]), audible intervals ([`Preroll::handle_audible`]), and
//! "silent from now" after a flush ([`Preroll::handle_silenced`]). Output:
//! [`Preroll::poll_window`]. No clock of its own: every time is passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Index (in frames since capture began) one past the chunk's last sample.
    end_frame: u64,
    /// Capture time of `end_frame`, i.e. the instant just after the last sample.
    end_time: Instant,
}

/// The last few hundred milliseconds of capture, with what the speaker was doing meanwhile.
#[derive(Debug)]
pub struct Preroll {
    rate: u32,
    window: Duration,
    capacity: usize,
    samples: VecDeque<i16>,
    /// Frame index of `samples[0]`.
    first_frame: u64,
    chunks: VecDeque<Chunk>,
    /// Audible intervals, unpadded, sorted by start and disjoint.
    spans: Vec<(Instant, Instant)>,
    pad_before: Duration,
    pad_after: Duration,
}

impl Preroll {
    /// A window of `window` at `rate` frames per second. An audible interval `[a, b)`
    /// removes every sample captured in `[a - pad_before, b + pad_after)`.
    pub fn new(window: Duration, rate: u32, pad_before: Duration, pad_after: Duration) -> Self {
        let capacity = (window.as_nanos() * u128::from(rate) / 1_000_000_000) as usize;
        Preroll {
            rate,
            window,
            capacity,
            samples: VecDeque::with_capacity(capacity),
            first_frame: 0,
            chunks: VecDeque::new(),
            spans: Vec::new(),
            pad_before,
            pad_after,
        }
    }

    fn frames_duration(&self, frames: u64) -> Duration {
        Duration::from_nanos(
            (u128::from(frames) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64,
        )
    }

    /// Adds captured samples; `end` is the capture time just after the last of them.
    pub fn handle_capture(&mut self, samples: &[i16], end: Instant) {
        if samples.is_empty() {
            return;
        }
        let end_frame = self.first_frame + self.samples.len() as u64 + samples.len() as u64;
        let keep = samples.len().min(self.capacity);
        let overflow = (self.samples.len() + keep).saturating_sub(self.capacity);
        self.samples.drain(..overflow.min(self.samples.len()));
        self.samples.extend(&samples[samples.len() - keep..]);
        self.first_frame = end_frame - self.samples.len() as u64;
        self.chunks.push_back(Chunk {
            end_frame,
            end_time: end,
        });
        while self
            .chunks
            .front()
            .is_some_and(|c| c.end_frame <= self.first_frame)
        {
            self.chunks.pop_front();
        }
        self.prune_spans();
    }

    /// The speaker was (or will be) audible during `[from, to)`.
    pub fn handle_audible(&mut self, from: Instant, to: Instant) {
        if to <= from {
            return;
        }
        // Spans arrive in order, one per playback period: extending the last is the norm.
        if let Some(last) = self.spans.last_mut()
            && from >= last.0
        {
            if from <= last.1 {
                last.1 = last.1.max(to);
                return;
            }
            self.spans.push((from, to));
            return;
        }
        self.spans.push((from, to));
        self.spans.sort_by_key(|s| s.0);
        let mut merged: Vec<(Instant, Instant)> = Vec::with_capacity(self.spans.len());
        for s in self.spans.drain(..) {
            match merged.last_mut() {
                Some(m) if s.0 <= m.1 => m.1 = m.1.max(s.1),
                _ => merged.push(s),
            }
        }
        self.spans = merged;
    }

    /// Playback was flushed at `at`: nothing reported as audible after it will be heard.
    pub fn handle_silenced(&mut self, at: Instant) {
        self.spans.retain(|s| s.0 < at);
        for s in &mut self.spans {
            s.1 = s.1.min(at);
        }
    }

    /// Capture time of frame `frame` (which must be retained).
    fn frame_time(&self, chunk: &Chunk, frame: u64) -> Instant {
        let back = self.frames_duration(chunk.end_frame - frame);
        chunk.end_time.checked_sub(back).unwrap_or(chunk.end_time)
    }

    fn prune_spans(&mut self) {
        let Some(chunk) = self.chunks.front() else {
            return;
        };
        let oldest = self.frame_time(chunk, self.first_frame);
        let pad_after = self.pad_after;
        self.spans.retain(|s| s.1 + pad_after > oldest);
    }

    /// Appends to `out`, oldest first, the samples captured in the last `window` before
    /// `now` that were not captured while the speaker was audible.
    pub fn poll_window(&self, now: Instant, out: &mut Vec<i16>) {
        let since = now.checked_sub(self.window).unwrap_or(now);
        let mut frame = self.first_frame;
        let mut span = 0;
        let mut samples = self.samples.iter();
        for chunk in &self.chunks {
            while frame < chunk.end_frame {
                let Some(&sample) = samples.next() else {
                    return;
                };
                let t = self.frame_time(chunk, frame);
                frame += 1;
                if t < since {
                    continue;
                }
                while span < self.spans.len() && self.spans[span].1 + self.pad_after <= t {
                    span += 1;
                }
                let in_echo = self.spans.get(span).is_some_and(|s| {
                    s.0.checked_sub(self.pad_before).unwrap_or(s.0) <= t && t < s.1 + self.pad_after
                });
                if !in_echo {
                    out.push(sample);
                }
            }
        }
    }

    /// Forgets everything captured so far (the spans stay).
    pub fn clear(&mut self) {
        self.first_frame += self.samples.len() as u64;
        self.samples.clear();
        self.chunks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u32 = 1_000; // one frame per millisecond keeps the arithmetic readable

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn ramp(from: i16, n: usize) -> Vec<i16> {
        (0..n).map(|i| from + i as i16).collect()
    }

    fn preroll() -> Preroll {
        Preroll::new(ms(300), RATE, Duration::ZERO, Duration::ZERO)
    }

    #[test]
    fn keeps_only_the_last_window_oldest_first() {
        let t0 = Instant::now();
        let mut p = preroll();
        for k in 0..10u64 {
            // 100 frames per chunk, chunk k ends at t0 + 100(k+1) ms.
            p.handle_capture(&ramp((k * 100) as i16, 100), t0 + ms(100 * (k + 1)));
        }
        let mut out = Vec::new();
        p.poll_window(t0 + ms(1000), &mut out);
        assert_eq!(out, ramp(700, 300));
    }

    #[test]
    fn stale_capture_is_not_preroll() {
        let t0 = Instant::now();
        let mut p = preroll();
        p.handle_capture(&ramp(0, 300), t0 + ms(300));
        let mut out = Vec::new();
        // Capture stopped (device gone) 200 ms ago: only its last 100 ms are recent.
        p.poll_window(t0 + ms(500), &mut out);
        assert_eq!(out, ramp(200, 100));
    }

    #[test]
    fn drops_samples_captured_while_the_speaker_was_audible() {
        let t0 = Instant::now();
        let mut p = preroll();
        p.handle_audible(t0 + ms(100), t0 + ms(150));
        p.handle_capture(&ramp(0, 300), t0 + ms(300));
        let mut out = Vec::new();
        p.poll_window(t0 + ms(300), &mut out);
        let mut expected = ramp(0, 100);
        expected.extend(ramp(150, 150));
        assert_eq!(out, expected);
    }

    #[test]
    fn padding_widens_the_echo_interval() {
        let t0 = Instant::now();
        let mut p = Preroll::new(ms(300), RATE, ms(10), ms(40));
        p.handle_audible(t0 + ms(100), t0 + ms(150));
        p.handle_capture(&ramp(0, 300), t0 + ms(300));
        let mut out = Vec::new();
        p.poll_window(t0 + ms(300), &mut out);
        let mut expected = ramp(0, 90);
        expected.extend(ramp(190, 110));
        assert_eq!(out, expected);
    }

    #[test]
    fn per_period_spans_merge_into_one() {
        let t0 = Instant::now();
        let mut p = preroll();
        for k in 0..10u64 {
            p.handle_audible(t0 + ms(10 * k), t0 + ms(10 * k + 10));
        }
        // One late report out of order does not break the merge.
        p.handle_audible(t0 + ms(200), t0 + ms(210));
        p.handle_audible(t0 + ms(150), t0 + ms(160));
        assert_eq!(
            p.spans,
            vec![
                (t0, t0 + ms(100)),
                (t0 + ms(150), t0 + ms(160)),
                (t0 + ms(200), t0 + ms(210))
            ]
        );
    }

    #[test]
    fn silenced_cuts_announced_audio_short() {
        let t0 = Instant::now();
        let mut p = preroll();
        // Playback announced speech up to 400 ms, then was flushed at 200 ms.
        p.handle_audible(t0 + ms(100), t0 + ms(400));
        p.handle_audible(t0 + ms(250), t0 + ms(260));
        p.handle_silenced(t0 + ms(200));
        p.handle_capture(&ramp(0, 300), t0 + ms(300));
        let mut out = Vec::new();
        p.poll_window(t0 + ms(300), &mut out);
        let mut expected = ramp(0, 100);
        expected.extend(ramp(200, 100));
        assert_eq!(out, expected);
    }

    #[test]
    fn chunk_times_map_each_sample() {
        let t0 = Instant::now();
        let mut p = preroll();
        // Two chunks with a 50 ms gap between them (capture stalled): the second chunk's
        // samples take their times from their own chunk.
        p.handle_capture(&ramp(0, 100), t0 + ms(100));
        p.handle_capture(&ramp(100, 100), t0 + ms(250));
        p.handle_audible(t0 + ms(150), t0 + ms(175));
        let mut out = Vec::new();
        p.poll_window(t0 + ms(250), &mut out);
        let mut expected = ramp(0, 100);
        expected.extend(ramp(125, 75));
        assert_eq!(out, expected);
    }

    #[test]
    fn clear_forgets_samples() {
        let t0 = Instant::now();
        let mut p = preroll();
        p.handle_capture(&ramp(0, 100), t0 + ms(100));
        p.clear();
        p.handle_capture(&ramp(500, 10), t0 + ms(110));
        let mut out = Vec::new();
        p.poll_window(t0 + ms(110), &mut out);
        assert_eq!(out, ramp(500, 10));
    }
}
