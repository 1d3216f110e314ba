//! Earcons: the short sounds walkie plays on its own, synthesised once at start.
//!
//! Generated on the main thread by `Audio::start` (no asset files), handed to the playback
//! thread as preallocated buffers; the thread mixes a triggered one over the speech with
//! saturation. Each is 80–400 ms of sine tones at a quarter of full scale with raised-cosine
//! fades, so nothing clicks and nothing is louder than the assistant's voice.

use std::f64::consts::PI;

use crate::voice::{Earcon, SAMPLE_RATE};

/// Every earcon, in the order of [`index`].
pub const ALL: [Earcon; 5] = [
    Earcon::Press,
    Earcon::Release,
    Earcon::TaskDone,
    Earcon::LinkLost,
    Earcon::Failed,
];

/// Position of `e` in [`ALL`] (and its bit in the trigger mask).
pub fn index(e: Earcon) -> usize {
    match e {
        Earcon::Press => 0,
        Earcon::Release => 1,
        Earcon::TaskDone => 2,
        Earcon::LinkLost => 3,
        Earcon::Failed => 4,
    }
}

/// Peak amplitude: a quarter of full scale.
const LEVEL: f64 = 0.25 * 32767.0;
/// Fade in and out of every tone.
const FADE_MS: f64 = 8.0;

/// One tone: a sine gliding from `from_hz` to `to_hz` over `ms`, then `gap_ms` of silence.
/// `decay` > 0 adds an exponential decay (a struck, bell-like tone).
struct Tone {
    from_hz: f64,
    to_hz: f64,
    ms: f64,
    gap_ms: f64,
    decay: f64,
}

const fn tone(from_hz: f64, to_hz: f64, ms: f64, gap_ms: f64) -> Tone {
    Tone {
        from_hz,
        to_hz,
        ms,
        gap_ms,
        decay: 0.0,
    }
}

fn recipe(e: Earcon) -> Vec<Tone> {
    match e {
        // Rising blip: "I'm listening".
        Earcon::Press => vec![tone(660.0, 990.0, 90.0, 0.0)],
        // Falling blip: "got it".
        Earcon::Release => vec![tone(990.0, 660.0, 90.0, 0.0)],
        // Two-tone chime, a fourth apart, each struck and decaying.
        Earcon::TaskDone => vec![
            Tone {
                decay: 6.0,
                ..tone(880.0, 880.0, 150.0, 20.0)
            },
            Tone {
                decay: 5.0,
                ..tone(1174.7, 1174.7, 220.0, 0.0)
            },
        ],
        // Low double beep.
        Earcon::LinkLost => vec![
            tone(330.0, 330.0, 100.0, 60.0),
            tone(330.0, 330.0, 100.0, 0.0),
        ],
        // Three lower beeps.
        Earcon::Failed => vec![
            tone(247.0, 247.0, 80.0, 50.0),
            tone(247.0, 247.0, 80.0, 50.0),
            tone(220.0, 220.0, 80.0, 0.0),
        ],
    }
}

/// Synthesises `e` as 24 kHz mono PCM.
pub fn generate(e: Earcon) -> Vec<i16> {
    let rate = f64::from(SAMPLE_RATE);
    let mut out = Vec::new();
    for t in recipe(e) {
        let n = (t.ms * rate / 1000.0).round() as usize;
        let fade = ((FADE_MS * rate / 1000.0) as usize).min(n / 2).max(1);
        let mut phase = 0.0f64;
        for i in 0..n {
            let x = i as f64 / n as f64;
            let hz = t.from_hz + (t.to_hz - t.from_hz) * x;
            phase += 2.0 * PI * hz / rate;
            let fade_in = if i < fade {
                0.5 - 0.5 * (PI * i as f64 / fade as f64).cos()
            } else {
                1.0
            };
            let left = n - 1 - i;
            let fade_out = if left < fade {
                0.5 - 0.5 * (PI * left as f64 / fade as f64).cos()
            } else {
                1.0
            };
            let decay = (-t.decay * x).exp();
            let v = LEVEL * fade_in * fade_out * decay * phase.sin();
            out.push(v.round() as i16);
        }
        out.extend(std::iter::repeat_n(0, (t.gap_ms * rate / 1000.0) as usize));
    }
    out
}

/// Every earcon, synthesised, indexed by [`index`].
pub fn generate_all() -> [Vec<i16>; 5] {
    ALL.map(generate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::voice::FRAMES_PER_MS;

    /// Zero crossings per millisecond over `s`: a proxy for pitch.
    fn crossings_per_ms(s: &[i16]) -> f64 {
        let c = s
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0) && w[0] != 0 && w[1] != 0)
            .count();
        c as f64 / (s.len() as f64 / FRAMES_PER_MS as f64)
    }

    #[test]
    fn lengths_are_between_80_and_400_ms() {
        for e in ALL {
            let ms = generate(e).len() as u64 / FRAMES_PER_MS;
            assert!((80..=400).contains(&ms), "{e:?}: {ms} ms");
        }
    }

    #[test]
    fn no_clipping_and_gentle_edges() {
        for e in ALL {
            let s = generate(e);
            let peak = s.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0);
            assert!(peak > 4_000, "{e:?} is audible (peak {peak})");
            assert!(
                peak < 16_384,
                "{e:?} stays well below full scale (peak {peak})"
            );
            // Raised-cosine fades: the first and last samples are (near) silent.
            assert!(s[0].unsigned_abs() < 100, "{e:?} starts with {}", s[0]);
            let last = s.iter().rev().find(|v| **v != 0).copied().unwrap_or(0);
            assert!(last.unsigned_abs() < 300, "{e:?} ends with {last}");
            // No sample-to-sample jump a click would need.
            let jump = s
                .windows(2)
                .map(|w| (i32::from(w[1]) - i32::from(w[0])).abs())
                .max()
                .unwrap_or(0);
            assert!(jump < 3_000, "{e:?} jumps by {jump}");
        }
    }

    #[test]
    fn all_distinct() {
        let all = generate_all();
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j], "{:?} vs {:?}", ALL[i], ALL[j]);
            }
        }
    }

    #[test]
    fn press_rises_and_release_falls() {
        let press = generate(Earcon::Press);
        let release = generate(Earcon::Release);
        let half = press.len() / 2;
        assert!(crossings_per_ms(&press[..half]) < crossings_per_ms(&press[half..]));
        assert!(crossings_per_ms(&release[..half]) > crossings_per_ms(&release[half..]));
    }

    #[test]
    fn warnings_are_lower_than_the_chime() {
        let chime = crossings_per_ms(&generate(Earcon::TaskDone));
        assert!(crossings_per_ms(&generate(Earcon::LinkLost)) < chime);
        assert!(crossings_per_ms(&generate(Earcon::Failed)) < chime);
    }

    #[test]
    fn index_matches_all() {
        for (i, e) in ALL.iter().enumerate() {
            assert_eq!(index(*e), i);
        }
    }
}
