//! The test's own side of the loopback card: a player feeding what walkie's microphone
//! hears, and a recorder taking what walkie's speaker plays. Both run on threads with
//! blocking ALSA IO (the card's clock paces them), keep a timeline that maps a frame to the
//! moment it passed through the card, and survive the card going away (they close and
//! reopen until stopped).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction, ValueOr};

/// One point of a stream's timeline: at `at`, frame `frame` was passing through the card
/// (played into the loopback, or landing in the capture buffer).
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    frame: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Errors that stopped the stream (the card went away), and xruns.
    errors: AtomicU64,
    xruns: AtomicU64,
    /// Frames transferred since start (across reopens).
    frames: AtomicU64,
    /// Times the device was (re)opened.
    opens: AtomicU64,
    timeline: Mutex<Vec<Mark>>,
    samples: Mutex<Vec<i16>>,
}

/// A stream on one loopback substream.
pub struct Stream {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pub rate: u32,
}

/// Opens `device` blocking, mono S16_LE at `rate`, 5 ms periods and a roomy buffer (the
/// test process is not real-time; a late wake-up must not underrun the signal).
fn open(device: &str, dir: Direction, rate: u32) -> alsa::Result<PCM> {
    let pcm = PCM::new(device, dir, false)?;
    {
        let hw = HwParams::any(&pcm)?;
        hw.set_access(Access::RWInterleaved)?;
        hw.set_format(Format::S16LE)?;
        hw.set_channels(1)?;
        hw.set_rate(rate, ValueOr::Nearest)?;
        hw.set_period_size_near((rate / 200) as alsa::pcm::Frames, ValueOr::Nearest)?;
        hw.set_buffer_size_near((rate * 2 / 5) as alsa::pcm::Frames)?;
        pcm.hw_params(&hw)?;
    }
    pcm.prepare()?;
    Ok(pcm)
}

impl Stream {
    /// Plays `signal(frame)` into `device` (e.g. `hw:Loopback,0,0`) until stopped.
    pub fn play(device: &str, rate: u32, signal: impl Fn(u64) -> i16 + Send + 'static) -> Stream {
        Stream::spawn(device, Direction::Playback, rate, Box::new(signal))
    }

    /// Records `device` (e.g. `hw:Loopback,1,1`) until stopped.
    pub fn record(device: &str, rate: u32) -> Stream {
        Stream::spawn(device, Direction::Capture, rate, Box::new(|_| 0))
    }

    fn spawn(
        device: &str,
        dir: Direction,
        rate: u32,
        signal: Box<dyn Fn(u64) -> i16 + Send>,
    ) -> Stream {
        let shared = Arc::new(Shared::default());
        let (inner, device) = (Arc::clone(&shared), device.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("test-{dir:?}"))
            .spawn(move || run(&inner, &device, dir, rate, &*signal))
            .unwrap();
        let stream = Stream {
            shared,
            thread: Some(thread),
            rate,
        };
        assert!(
            crate::guest::poll(crate::guest::T, || stream.frames() > 0),
            "the test's {dir:?} stream on {device_name} never ran",
            device_name = "the loopback card"
        );
        stream
    }

    pub fn frames(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    pub fn xruns(&self) -> u64 {
        self.shared.xruns.load(Ordering::Relaxed)
    }

    pub fn opens(&self) -> u64 {
        self.shared.opens.load(Ordering::Relaxed)
    }

    /// Everything recorded so far.
    pub fn samples(&self) -> Vec<i16> {
        self.shared.samples.lock().unwrap().clone()
    }

    /// When frame `frame` passed through the card, from the nearest point of the timeline.
    pub fn time_of(&self, frame: u64) -> Option<Instant> {
        let timeline = self.shared.timeline.lock().unwrap();
        let mark = timeline.iter().min_by_key(|m| m.frame.abs_diff(frame))?;
        let offset =
            Duration::from_nanos(mark.frame.abs_diff(frame) * 1_000_000_000 / u64::from(self.rate));
        Some(if frame >= mark.frame {
            mark.at + offset
        } else {
            mark.at - offset
        })
    }

    /// Waits until the recording holds what passed through the card up to `ms` after `at`.
    /// The recorder is not real-time: on a starved guest it reads late, and a fixed sleep
    /// would judge a recording that lacks the end of what was played.
    pub fn wait_recorded(&self, at: Instant, ms: u64) {
        let until = self.frame_at(at).expect("the stream has a timeline")
            + ms * u64::from(self.rate) / 1000;
        assert!(
            crate::guest::poll(crate::guest::T, || self.frames() >= until),
            "the recording stopped at frame {} short of {until}",
            self.frames()
        );
    }

    /// The frame passing through the card at `at`.
    pub fn frame_at(&self, at: Instant) -> Option<u64> {
        let timeline = self.shared.timeline.lock().unwrap();
        let mark = timeline
            .iter()
            .min_by_key(|m| if m.at > at { m.at - at } else { at - m.at })?;
        let frames = |d: Duration| (d.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        Some(if at >= mark.at {
            mark.frame + frames(at - mark.at)
        } else {
            mark.frame.saturating_sub(frames(mark.at - at))
        })
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(shared: &Shared, device: &str, dir: Direction, rate: u32, signal: &dyn Fn(u64) -> i16) {
    // While the card is away every reopen fails; alsa-lib would say so on stderr each time.
    walkie::sys::sched::silence_alsa_errors_on_this_thread();
    let chunk = (rate / 200) as usize; // 5 ms
    let mut buf = vec![0i16; chunk];
    while !shared.stop.load(Ordering::Relaxed) {
        let pcm = match open(device, dir, rate) {
            Ok(pcm) => pcm,
            Err(_) => {
                // The card is away (unbound): try again shortly.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        shared.opens.fetch_add(1, Ordering::Relaxed);
        let io = pcm.io_i16().unwrap();
        if dir == Direction::Capture {
            let _ = pcm.start();
        }
        while !shared.stop.load(Ordering::Relaxed) {
            let done = if dir == Direction::Playback {
                let base = shared.frames.load(Ordering::Relaxed);
                for (i, s) in buf.iter_mut().enumerate() {
                    *s = signal(base + i as u64);
                }
                io.writei(&buf)
            } else {
                io.readi(&mut buf)
            };
            match done {
                Ok(n) => {
                    let at = Instant::now();
                    let total = shared.frames.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    if dir == Direction::Capture {
                        shared.samples.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    // Playback: `delay` frames are queued and not yet played, so frame
                    // total - delay is being played now. Capture: `avail` frames have
                    // landed and are unread, so the newest one landed about now.
                    let frame = if dir == Direction::Playback {
                        pcm.delay()
                            .map_or(total, |d| total.saturating_sub(d.max(0) as u64))
                    } else {
                        total + pcm.avail().map_or(0, |a| a.max(0) as u64)
                    };
                    shared.timeline.lock().unwrap().push(Mark { at, frame });
                }
                Err(e) if e.errno() == libc::EPIPE => {
                    shared.xruns.fetch_add(1, Ordering::Relaxed);
                    let _ = pcm.prepare();
                    if dir == Direction::Capture {
                        let _ = pcm.start();
                    }
                }
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    break; // the card went away: close, reopen when it is back
                }
            }
        }
        if dir == Direction::Playback && shared.stop.load(Ordering::Relaxed) {
            let _ = pcm.drop();
        }
    }
}

/// The frequency of the tone in `samples` at `rate`, from its zero crossings, counted over
/// the stretches where it sounds (10 ms windows with a peak above 5000): a gap of silence
/// (an underrun, speech that came late) does not lower it.
pub fn frequency(samples: &[i16], rate: u32) -> f64 {
    let window = (rate / 100) as usize;
    let (mut crossings, mut frames) = (0usize, 0usize);
    let mut run: Option<usize> = None;
    let mut count = |from: usize, to: usize| {
        crossings += samples[from..to]
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count();
        frames += to - from;
    };
    for (i, chunk) in samples.chunks(window).enumerate() {
        let loud = chunk.iter().any(|s| s.unsigned_abs() > 5000);
        match (loud, run) {
            (true, None) => run = Some(i * window),
            (false, Some(from)) => {
                count(from, i * window);
                run = None;
            }
            _ => {}
        }
    }
    if let Some(from) = run {
        count(from, samples.len());
    }
    if frames == 0 {
        return 0.0;
    }
    crossings as f64 / 2.0 * f64::from(rate) / frames as f64
}

/// A sine of `hz` at `rate`, amplitude 10 000.
pub fn sine(hz: f64, rate: u32) -> impl Fn(u64) -> i16 + Send + 'static {
    move |n| (10_000.0 * (std::f64::consts::TAU * hz * n as f64 / f64::from(rate)).sin()) as i16
}
