//! The audio engine: microphone and speaker for the main loop, which never waits for them.
//!
//! Two real-time threads (docs/ARCHITECTURE.md) own the devices: "walkie-capture" reads the
//! microphone into a lock-free ring, "walkie-playback" writes speech from another ring (or
//! silence) to the speaker and mixes earcons over it. They try SCHED_FIFO, never allocate,
//! lock or log in their period loops, pace clockless devices against the monotonic clock
//! (the ALSA `file`/`null` plugins and the WAV backend run exactly like a sound card), and
//! reopen a vanished device with backoff while the rest of walkie runs. They talk to the
//! main loop through rtrb rings and atomics, and wake it through the `mio::Waker`.
//!
//! [`Audio`] is the main-loop side (this module): it feeds the playback ring (with an
//! overflow queue, since the model sends audio faster than real time), drains the capture
//! ring into the pre-roll window ([`preroll`]) and the live stream, turns the threads'
//! reports into [`AudioReport`]s for the loop to log, and keeps [`AudioStatus`] for
//! `walkie ctl status`. None of its methods block.
//!
//! Idle (nobody holds the button, nothing plays) is nearly free: the playback thread stops
//! the device and parks until it is given something to play, the capture thread reads the
//! microphone in bursts instead of every period (the pre-roll only needs the audio kept),
//! and the main loop drains the capture ring every couple of seconds instead of being
//! woken; see `playback.rs` and `capture.rs` for how each stays exact.
//!
//! Backends: `alsa` (configured PCM names; a `plug` layer converts to 24 kHz mono S16_LE),
//! `wav` (a WAV file as the microphone, another receiving everything the speaker plays,
//! through the same threads and loops), `pulse` (the microphone through PulseAudio's client
//! library, `pulse.rs`; playback on ALSA as with `alsa`), `none` (no threads; playback
//! completes at once).
//! Testing without a sound card: tools/alsa/README.md.

mod capture;
mod device;
pub mod earcon;
mod pacer;
mod playback;
pub mod preroll;
mod pulse;
mod shared;
pub mod wav;
mod worker;

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rtrb::{Consumer, Producer, RingBuffer};
use serde::Serialize;

pub use crate::config::AudioBackend;
use crate::voice::{Earcon, FRAMES_PER_MS, PlaybackProgress, SAMPLE_RATE};
use capture::{CaptureSource, CaptureWorker};
use playback::{PlaybackTarget, PlaybackWorker};
use preroll::Preroll;
use shared::{AudibleSpan, Shared};
use worker::ThreadCtx;

/// Which of the two streams a report or status is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Capture,
    Playback,
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Which::Capture => "capture",
            Which::Playback => "playback",
        })
    }
}

/// The `[audio]` configuration as the engine uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioSettings {
    backend: AudioBackend,
    capture_device: String,
    playback_device: String,
    period_ms: u32,
    preroll_ms: u32,
    earcons: bool,
    input_wav: Option<PathBuf>,
    output_wav: Option<PathBuf>,
}

impl AudioSettings {
    /// Takes the configuration as validated by `config`; out-of-range numbers are clamped
    /// (period 1–100 ms, pre-roll at most 5 s) rather than trusted.
    pub fn from_config(c: &crate::config::AudioConfig) -> Self {
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        AudioSettings {
            backend: c.backend,
            capture_device: c.capture_device.clone(),
            playback_device: c.playback_device.clone(),
            period_ms: c.period_ms.clamp(1, 100),
            preroll_ms: c.preroll_ms.min(5_000),
            earcons: c.earcons,
            input_wav: path(&c.input_wav),
            output_wav: path(&c.output_wav),
        }
    }

    fn period_frames(&self) -> usize {
        self.period_ms as usize * FRAMES_PER_MS as usize
    }
}

/// One device in `walkie ctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    /// `ok`, `opening`, `failed` or `disabled`.
    pub state: &'static str,
    /// The ALSA PCM name or WAV path.
    pub device: String,
    /// Why it failed, while it is failed.
    pub error: Option<String>,
    /// Overruns (capture) or underruns (playback) recovered from since start.
    pub xruns: u64,
}

/// The audio engine in `walkie ctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AudioStatus {
    /// `ok`, `opening`, `failed` (either device) or `disabled`.
    pub state: &'static str,
    pub error: Option<String>,
    pub capture: DeviceStatus,
    pub playback: DeviceStatus,
    /// Both threads got SCHED_FIFO.
    pub rt: bool,
    /// Overruns plus underruns recovered from since start.
    pub xruns: u64,
    /// Times the speaker ran out of speech mid-answer and filled the wait with silence
    /// (the answer arrived slower than it plays); not a device fault.
    pub speech_gaps: u64,
}

/// Something the main loop should log (the audio threads never log themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioReport {
    /// Works, but worse than it could (no SCHED_FIFO, memory not locked, samples dropped).
    Warning(String),
    DeviceOpened {
        which: Which,
        name: String,
    },
    /// Failed to open or went away; retried with backoff (0.5 s doubling to 5 s).
    DeviceFailed {
        which: Which,
        error: String,
    },
    /// The stream over- or underran and was restarted (at most one report per wake-up).
    Xrun {
        which: Which,
    },
}

/// An ALSA PCM for `walkie devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PcmInfo {
    pub name: String,
    pub description: String,
    pub input: bool,
    pub output: bool,
}

/// Opens ALSA PCM `device` the way the audio threads do (24 kHz mono S16_LE, non-blocking)
/// and closes it again: `walkie doctor`'s check that the device will work.
pub fn probe_pcm(device: &str, capture: bool, period_ms: u32) -> Result<(), String> {
    let dir = if capture {
        alsa::Direction::Capture
    } else {
        alsa::Direction::Playback
    };
    let period_frames = (SAMPLE_RATE as usize * period_ms as usize / 1000).max(1);
    // alsa-lib's own lines ("Unknown PCM …") would repeat what the error says.
    crate::sys::sched::silence_alsa_errors_on_this_thread();
    // A buffer of four periods: what playback asks for, and enough to open any capture PCM.
    device::open_alsa(device, dir, period_frames, 4 * period_frames)
        .map(drop)
        .map_err(|e| match &e {
            device::OpenError::Open { source, .. } if source.errno() == libc::EBUSY => {
                format!("ALSA PCM \"{device}\" is busy")
            }
            _ => e.to_string(),
        })
}

/// `walkie doctor` for `audio.backend = "pulse"`: records from `source` the way the
/// capture thread does, then closes; `Ok` names the source the server chose.
pub fn probe_pulse_source(source: &str, period_ms: u32) -> Result<String, String> {
    let period_frames = (SAMPLE_RATE as usize * period_ms as usize / 1000).max(1);
    pulse::probe(source, period_frames)
}

/// The PCMs alsa-lib knows (its configuration and the sound cards' hints). Empty when
/// ALSA cannot enumerate anything.
pub fn list_pcms() -> Vec<PcmInfo> {
    let Ok(hints) = alsa::device_name::HintIter::new_str(None, "pcm") else {
        return Vec::new();
    };
    hints
        .filter_map(|h| {
            let name = h.name?;
            Some(PcmInfo {
                name,
                description: h
                    .desc
                    .unwrap_or_default()
                    .lines()
                    .collect::<Vec<_>>()
                    .join(" — "),
                input: h.direction != Some(alsa::Direction::Playback),
                output: h.direction != Some(alsa::Direction::Capture),
            })
        })
        .collect()
}

/// How often the main loop drains the capture ring when nobody is listening, to keep the
/// pre-roll window fresh (and feeds the playback ring from the overflow queue). The ring
/// holds this, the pre-roll and a margin, so nothing recent is ever dropped meanwhile; a
/// press drains it at once.
const LAZY_DRAIN: Duration = Duration::from_secs(2);
/// Capture ring room beyond the lazy drain and the pre-roll: the capture thread's idle
/// bursts and the main loop's own lateness.
const CAPTURE_RING_MARGIN: Duration = Duration::from_millis(1500);
/// Live samples kept when streaming but nobody reads them (bounded memory).
const MAX_LIVE: Duration = Duration::from_secs(10);
/// Extra time around each audible interval: a period either side for timing uncertainty,
/// plus the room's echo tail and converter latency after it.
const ECHO_PAD_BEFORE: Duration = Duration::from_millis(10);
const ECHO_PAD_AFTER: Duration = Duration::from_millis(50);

/// The audio engine as the main loop sees it.
pub struct Audio {
    inner: Inner,
    /// What [`Audio::start_capture`] and [`Audio::captured`] hand out (reused, no
    /// allocation per wake-up).
    outbox: Vec<i16>,
}

enum Inner {
    /// Backend `none`: nothing plays, nothing is captured.
    Disabled {
        queued: u64,
    },
    Running(Box<Engine>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DevState {
    Opening,
    Ok,
    Failed,
}

#[derive(Debug)]
struct DevCache {
    state: DevState,
    device: String,
    error: Option<String>,
}

impl DevCache {
    fn status(&self, xruns: u64) -> DeviceStatus {
        DeviceStatus {
            state: match self.state {
                DevState::Opening => "opening",
                DevState::Ok => "ok",
                DevState::Failed => "failed",
            },
            device: self.device.clone(),
            error: self.error.clone(),
            xruns,
        }
    }
}

struct Engine {
    shared: Arc<Shared>,
    earcons: bool,
    capture_thread: Option<JoinHandle<()>>,
    playback_thread: Option<JoinHandle<()>>,
    capture_ring: Consumer<i16>,
    play_ring: Producer<i16>,
    spans: Consumer<AudibleSpan>,
    reports: [Consumer<AudioReport>; 2],
    /// Reports made on the main thread (start-up), handed out with the next batch.
    own_reports: Vec<AudioReport>,
    /// Speech that did not fit the playback ring yet.
    overflow: VecDeque<i16>,
    /// Samples pushed into the playback ring, ever.
    pushed: u64,
    /// Samples handed to `play`, ever.
    queued: u64,
    /// Overflow samples dropped by flushes (consumed without reaching the thread).
    overflow_discarded: u64,
    /// `pushed` at the latest flush: everything before it counts as consumed at once.
    last_flush_upto: u64,
    flush_epoch: u64,
    flushed_at: Option<Instant>,
    /// Capture samples taken from the ring, ever.
    popped: u64,
    preroll: Preroll,
    live: Vec<i16>,
    streaming: bool,
    scratch: Vec<i16>,
    capture: DevCache,
    playback: DevCache,
    seen_xruns: [u64; 2],
    seen_dropped: u64,
    last_pump: Instant,
}

impl Audio {
    /// Starts the engine. Never fails: a device that cannot open is retried with backoff
    /// inside its thread and [`Audio::status`] says `failed` with the reason meanwhile.
    pub fn start(settings: AudioSettings, waker: Arc<mio::Waker>) -> Audio {
        if settings.backend == AudioBackend::None {
            return Audio {
                inner: Inner::Disabled { queued: 0 },
                outbox: Vec::new(),
            };
        }
        let now = Instant::now();
        let shared = Arc::new(Shared::new(now));
        let period = settings.period_frames();
        let mut own_reports = Vec::new();
        if let Err(e) = crate::sys::sched::lock_memory() {
            own_reports.push(AudioReport::Warning(format!(
                "memory not locked, audio may stall on page faults: {e}"
            )));
        }
        let (source, target, capture_name, playback_name) = match settings.backend {
            AudioBackend::Wav => {
                let show = |p: &Option<PathBuf>, none: &str| match p {
                    Some(p) => p.display().to_string(),
                    None => none.to_owned(),
                };
                (
                    CaptureSource::Wav(settings.input_wav.clone()),
                    PlaybackTarget::Wav(settings.output_wav.clone()),
                    show(&settings.input_wav, "silence"),
                    show(&settings.output_wav, "discard"),
                )
            }
            AudioBackend::Pulse => (
                CaptureSource::Pulse(settings.capture_device.clone()),
                PlaybackTarget::Alsa(settings.playback_device.clone()),
                format!("pulse:{}", settings.capture_device),
                settings.playback_device.clone(),
            ),
            _ => (
                CaptureSource::Alsa(settings.capture_device.clone()),
                PlaybackTarget::Alsa(settings.playback_device.clone()),
                settings.capture_device.clone(),
                settings.playback_device.clone(),
            ),
        };
        let preroll_frames = settings.preroll_ms as usize * FRAMES_PER_MS as usize;
        let margin_frames =
            (LAZY_DRAIN + CAPTURE_RING_MARGIN).as_millis() as usize * FRAMES_PER_MS as usize;
        let (capture_producer, capture_ring) = RingBuffer::new(preroll_frames + margin_frames);
        let (play_ring, play_consumer) = RingBuffer::new(4 * SAMPLE_RATE as usize);
        let (span_producer, spans) = RingBuffer::new(512);
        let (capture_reports, capture_report_ring) = RingBuffer::new(64);
        let (playback_reports, playback_report_ring) = RingBuffer::new(64);

        let mut capture = DevCache {
            state: DevState::Opening,
            device: capture_name,
            error: None,
        };
        let mut playback = DevCache {
            state: DevState::Opening,
            device: playback_name,
            error: None,
        };

        let period_pad = Duration::from_millis(u64::from(settings.period_ms));
        let echo_pad_after = period_pad + ECHO_PAD_AFTER;
        let worker = CaptureWorker::new(
            ThreadCtx::new(
                Arc::clone(&shared),
                capture_reports,
                Arc::clone(&waker),
                Which::Capture,
            ),
            capture_producer,
            source,
            period,
            echo_pad_after,
        );
        let capture_thread = match std::thread::Builder::new()
            .name("walkie-capture".into())
            .spawn(move || worker.run())
        {
            Ok(h) => Some(h),
            Err(e) => {
                let error = format!("cannot start the capture thread: {e}");
                capture.state = DevState::Failed;
                capture.error = Some(error.clone());
                own_reports.push(AudioReport::DeviceFailed {
                    which: Which::Capture,
                    error,
                });
                None
            }
        };
        let worker = PlaybackWorker::new(
            ThreadCtx::new(
                Arc::clone(&shared),
                playback_reports,
                Arc::clone(&waker),
                Which::Playback,
            ),
            play_consumer,
            span_producer,
            target,
            period,
            Arc::new(earcon::generate_all()),
            capture_thread.as_ref().map(|t| t.thread().clone()),
        );
        let playback_thread = match std::thread::Builder::new()
            .name("walkie-playback".into())
            .spawn(move || worker.run())
        {
            Ok(h) => Some(h),
            Err(e) => {
                let error = format!("cannot start the playback thread: {e}");
                playback.state = DevState::Failed;
                playback.error = Some(error.clone());
                own_reports.push(AudioReport::DeviceFailed {
                    which: Which::Playback,
                    error,
                });
                None
            }
        };
        if !own_reports.is_empty() {
            let _ = waker.wake();
        }
        Audio {
            inner: Inner::Running(Box::new(Engine {
                shared,
                earcons: settings.earcons,
                capture_thread,
                playback_thread,
                capture_ring,
                play_ring,
                spans,
                reports: [capture_report_ring, playback_report_ring],
                own_reports,
                overflow: VecDeque::new(),
                pushed: 0,
                queued: 0,
                overflow_discarded: 0,
                last_flush_upto: 0,
                flush_epoch: 0,
                flushed_at: None,
                popped: 0,
                preroll: Preroll::new(
                    Duration::from_millis(u64::from(settings.preroll_ms)),
                    SAMPLE_RATE,
                    period_pad + ECHO_PAD_BEFORE,
                    echo_pad_after,
                ),
                live: Vec::new(),
                streaming: false,
                scratch: Vec::new(),
                capture,
                playback,
                seen_xruns: [0; 2],
                seen_dropped: 0,
                last_pump: now,
            })),
            // A second of speech: what one wake-up hands over at most, in practice.
            outbox: Vec::with_capacity(SAMPLE_RATE as usize),
        }
    }

    /// For `walkie ctl status`. Device states follow the reports the loop has collected
    /// (through [`Audio::on_wake`]/[`Audio::on_timeout`]); counters are live.
    pub fn status(&self) -> AudioStatus {
        let engine = match &self.inner {
            Inner::Disabled { .. } => {
                let disabled = DeviceStatus {
                    state: "disabled",
                    device: String::new(),
                    error: None,
                    xruns: 0,
                };
                return AudioStatus {
                    state: "disabled",
                    error: None,
                    capture: disabled.clone(),
                    playback: disabled,
                    rt: false,
                    xruns: 0,
                    speech_gaps: 0,
                };
            }
            Inner::Running(e) => e,
        };
        let s = &engine.shared;
        let capture = engine
            .capture
            .status(s.capture.xruns.load(Ordering::Relaxed));
        let playback = engine
            .playback
            .status(s.playback.xruns.load(Ordering::Relaxed));
        let states = [engine.capture.state, engine.playback.state];
        let state = if states.contains(&DevState::Failed) {
            "failed"
        } else if states.contains(&DevState::Opening) {
            "opening"
        } else {
            "ok"
        };
        let error = match (&capture.error, &playback.error) {
            (Some(c), Some(p)) => Some(format!("capture: {c}; playback: {p}")),
            (Some(c), None) => Some(format!("capture: {c}")),
            (None, Some(p)) => Some(format!("playback: {p}")),
            (None, None) => None,
        };
        AudioStatus {
            state,
            error,
            rt: s.capture.realtime.load(Ordering::Relaxed)
                && s.playback.realtime.load(Ordering::Relaxed),
            xruns: capture.xruns + playback.xruns,
            speech_gaps: s.speech_gaps.load(Ordering::Relaxed),
            capture,
            playback,
        }
    }

    /// While on, the capture thread wakes the loop every period so live audio goes out at
    /// once; while off, the loop drains lazily (see [`Audio::next_deadline`]) and only the
    /// pre-roll window keeps what is captured. Turning it on wakes an idle capture thread:
    /// what it had not read yet (at most its linger) follows as live audio. Turning it
    /// off drops live samples not yet read: read the tail with [`Audio::read_capture`] first.
    pub fn set_streaming(&mut self, on: bool) {
        if let Inner::Running(e) = &mut self.inner {
            e.streaming = on;
            e.shared.streaming.store(on, Ordering::Relaxed);
            if on {
                if let Some(t) = &e.capture_thread {
                    t.thread().unpark();
                }
            } else {
                e.live.clear();
            }
        }
    }

    /// Appends the last `preroll_ms` captured before `now`, minus anything captured while
    /// the speaker was audible, oldest first. What it returns is not returned again by
    /// [`Audio::read_capture`].
    pub fn take_preroll(&mut self, now: Instant, out: &mut Vec<i16>) {
        if let Inner::Running(e) = &mut self.inner {
            e.drain_capture();
            e.drain_spans();
            e.preroll.poll_window(now, out);
            e.live.clear();
        }
    }

    /// Appends the samples captured since the previous call (or since streaming started).
    pub fn read_capture(&mut self, _now: Instant, out: &mut Vec<i16>) {
        if let Inner::Running(e) = &mut self.inner {
            e.drain_capture();
            out.append(&mut e.live);
        }
    }

    /// Starts a talk: the microphone streams to the caller from now on. Returns the
    /// pre-roll (see [`Audio::take_preroll`]); [`Audio::captured`] hands out the live audio
    /// after it until [`Audio::stop_capture`].
    pub fn start_capture(&mut self, now: Instant) -> &[i16] {
        self.set_streaming(true);
        let mut out = std::mem::take(&mut self.outbox);
        out.clear();
        self.take_preroll(now, &mut out);
        self.outbox = out;
        &self.outbox
    }

    /// Ends a talk: nothing more is captured for the caller.
    pub fn stop_capture(&mut self) {
        self.set_streaming(false);
    }

    /// The audio captured since the previous call during a talk; empty outside one.
    pub fn captured(&mut self, now: Instant) -> &[i16] {
        let mut out = std::mem::take(&mut self.outbox);
        out.clear();
        if matches!(&self.inner, Inner::Running(e) if e.streaming) {
            self.read_capture(now, &mut out);
        }
        self.outbox = out;
        &self.outbox
    }

    /// Queues assistant speech (24 kHz mono) behind what is already queued.
    pub fn play(&mut self, pcm: &[i16]) {
        match &mut self.inner {
            Inner::Disabled { queued } => *queued += pcm.len() as u64,
            Inner::Running(e) => {
                e.queued += pcm.len() as u64;
                if e.playback_thread.is_none() {
                    // No thread will ever take it: count it as consumed, like backend none.
                    e.overflow_discarded += pcm.len() as u64;
                    return;
                }
                e.feed_playback();
                if e.overflow.is_empty() {
                    let (pushed, rest) = e.play_ring.push_partial_slice(pcm);
                    e.pushed += pushed.len() as u64;
                    e.overflow.extend(rest);
                    #[cfg(feature = "probe")]
                    crate::probe::RING.record(e.pushed, 0);
                } else {
                    e.overflow.extend(pcm);
                }
                e.wake_playback();
            }
        }
    }

    /// Barge-in: drops every queued sample of speech; the playback thread drops what the
    /// device holds (`snd_pcm_drop`) at once. Dropped samples count as consumed, so
    /// [`Audio::progress`] reports nothing playing as soon as this returns.
    pub fn flush_playback(&mut self) {
        let Inner::Running(e) = &mut self.inner else {
            return;
        };
        // Spans already announced belong to before the flush; everything later is clipped.
        e.drain_spans();
        let now = Instant::now();
        e.preroll.handle_silenced(now);
        e.flushed_at = Some(now);
        e.overflow_discarded += e.overflow.len() as u64;
        e.overflow.clear();
        e.last_flush_upto = e.pushed;
        e.shared.flush_upto.store(e.pushed, Ordering::Release);
        e.flush_epoch = e.shared.flush_epoch.fetch_add(1, Ordering::AcqRel) + 1;
        e.wake_playback();
    }

    /// Speech queued and consumed so far (`crate::voice::PlaybackProgress` semantics).
    pub fn progress(&self) -> PlaybackProgress {
        match &self.inner {
            Inner::Disabled { queued } => PlaybackProgress {
                queued_frames: *queued,
                consumed_frames: *queued,
            },
            Inner::Running(e) => {
                let thread = e.shared.consumed.load(Ordering::Acquire);
                PlaybackProgress {
                    queued_frames: e.queued,
                    consumed_frames: thread.max(e.last_flush_upto) + e.overflow_discarded,
                }
            }
        }
    }

    /// Plays an earcon over whatever is playing (nothing when earcons are off).
    pub fn play_earcon(&mut self, earcon: Earcon) {
        if let Inner::Running(e) = &mut self.inner
            && e.earcons
        {
            e.shared
                .earcon_requests
                .fetch_or(1 << earcon::index(earcon), Ordering::Release);
            e.wake_playback();
        }
    }

    /// Call on every waker event: collects what the threads produced.
    pub fn on_wake(&mut self, now: Instant) -> Vec<AudioReport> {
        self.pump(now)
    }

    /// Call when [`Audio::next_deadline`] has passed.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<AudioReport> {
        self.pump(now)
    }

    /// When the loop must call [`Audio::on_timeout`] even if nothing woke it.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.inner {
            Inner::Disabled { .. } => None,
            Inner::Running(e) => Some(e.last_pump + LAZY_DRAIN),
        }
    }

    /// Stops both threads and joins them; the ring ends go after the join.
    pub fn stop(self) {
        drop(self);
    }

    fn pump(&mut self, now: Instant) -> Vec<AudioReport> {
        match &mut self.inner {
            Inner::Disabled { .. } => Vec::new(),
            Inner::Running(e) => e.pump(now),
        }
    }
}

impl Engine {
    fn pump(&mut self, now: Instant) -> Vec<AudioReport> {
        self.last_pump = now;
        self.drain_capture();
        self.drain_spans();
        self.feed_playback();
        let mut out = std::mem::take(&mut self.own_reports);
        for ring in &mut self.reports {
            while let Ok(report) = ring.pop() {
                out.push(report);
            }
        }
        for report in &out {
            match report {
                AudioReport::DeviceOpened { which, name } => {
                    let cache = self.cache(*which);
                    cache.state = DevState::Ok;
                    cache.device = name.clone();
                    cache.error = None;
                }
                AudioReport::DeviceFailed { which, error } => {
                    let cache = self.cache(*which);
                    cache.state = DevState::Failed;
                    cache.error = Some(error.clone());
                }
                _ => {}
            }
        }
        for (i, which) in [Which::Capture, Which::Playback].into_iter().enumerate() {
            let cell = match which {
                Which::Capture => &self.shared.capture,
                Which::Playback => &self.shared.playback,
            };
            let xruns = cell.xruns.load(Ordering::Relaxed);
            if xruns > self.seen_xruns[i] {
                self.seen_xruns[i] = xruns;
                out.push(AudioReport::Xrun { which });
            }
        }
        let dropped = self.shared.capture_dropped.load(Ordering::Relaxed);
        if dropped > self.seen_dropped {
            out.push(AudioReport::Warning(format!(
                "capture ring full: {} ms of microphone audio dropped (main loop stalled)",
                (dropped - self.seen_dropped) / FRAMES_PER_MS
            )));
            self.seen_dropped = dropped;
        }
        out
    }

    fn cache(&mut self, which: Which) -> &mut DevCache {
        match which {
            Which::Capture => &mut self.capture,
            Which::Playback => &mut self.playback,
        }
    }

    /// Moves captured samples into the pre-roll window (and the live stream).
    fn drain_capture(&mut self) {
        let n = self.capture_ring.slots();
        if n == 0 {
            return;
        }
        self.scratch.clear();
        if let Ok(chunk) = self.capture_ring.read_chunk(n) {
            let (a, b) = chunk.as_slices();
            self.scratch.extend_from_slice(a);
            self.scratch.extend_from_slice(b);
            chunk.commit_all();
        }
        self.popped += self.scratch.len() as u64;
        // The thread stamps (frames pushed, time) after each period; extrapolate from it to
        // the end of what was just popped (the stamp may be a period ahead or behind).
        let (total, time_ns) = self.shared.capture_stamp.load();
        let offset_ns =
            (i128::from(self.popped) - i128::from(total)) * 1_000_000_000 / i128::from(SAMPLE_RATE);
        let end_ns = (i128::from(time_ns) + offset_ns).max(0);
        let end = self
            .shared
            .instant_of(u64::try_from(end_ns).unwrap_or(u64::MAX));
        self.preroll.handle_capture(&self.scratch, end);
        if self.streaming {
            self.live.extend_from_slice(&self.scratch);
            let max = MAX_LIVE.as_millis() as usize * FRAMES_PER_MS as usize;
            if self.live.len() > max {
                let excess = self.live.len() - max;
                self.live.drain(..excess);
            }
        }
    }

    /// Hands the playback thread's audible spans to the pre-roll, clipping those written
    /// before the latest flush at the flush.
    fn drain_spans(&mut self) {
        while let Ok(span) = self.spans.pop() {
            let from = self.shared.instant_of(span.start_ns);
            let mut to = self.shared.instant_of(span.end_ns);
            if span.epoch < self.flush_epoch
                && let Some(at) = self.flushed_at
            {
                if from >= at {
                    continue;
                }
                to = to.min(at);
            }
            self.preroll.handle_audible(from, to);
        }
    }

    /// Moves overflow speech into the playback ring as room appears.
    fn feed_playback(&mut self) {
        let before = self.pushed;
        while !self.overflow.is_empty() {
            let (front, _) = self.overflow.as_slices();
            let (pushed, _) = self.play_ring.push_partial_slice(front);
            let n = pushed.len();
            if n == 0 {
                break;
            }
            self.pushed += n as u64;
            self.overflow.drain(..n);
        }
        if self.pushed != before {
            #[cfg(feature = "probe")]
            crate::probe::RING.record(self.pushed, 0);
            self.wake_playback();
        }
    }

    /// The playback thread parks while nothing plays; whatever gives it work (speech, an
    /// earcon, a flush) wakes it after publishing that work. Waking a running thread
    /// costs an atomic swap.
    fn wake_playback(&self) {
        if let Some(t) = &self.playback_thread {
            t.thread().unpark();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for handle in [self.capture_thread.take(), self.playback_thread.take()]
            .into_iter()
            .flatten()
        {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AudioConfig;

    fn waker() -> (mio::Poll, Arc<mio::Waker>) {
        let poll = mio::Poll::new().expect("poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(1)).expect("waker"));
        (poll, waker)
    }

    fn wav_settings(earcons: bool) -> AudioSettings {
        AudioSettings::from_config(&AudioConfig {
            backend: AudioBackend::Wav,
            earcons,
            ..AudioConfig::default()
        })
    }

    #[test]
    fn none_backend_counts_frames_and_is_disabled() {
        let (_poll, waker) = waker();
        let settings = AudioSettings::from_config(&AudioConfig {
            backend: AudioBackend::None,
            ..AudioConfig::default()
        });
        let mut audio = Audio::start(settings, waker);
        audio.play(&[1; 480]);
        assert_eq!(
            audio.progress(),
            PlaybackProgress {
                queued_frames: 480,
                consumed_frames: 480
            }
        );
        audio.flush_playback();
        audio.play_earcon(Earcon::Press);
        let mut out = Vec::new();
        audio.take_preroll(Instant::now(), &mut out);
        audio.read_capture(Instant::now(), &mut out);
        assert!(out.is_empty());
        let status = audio.status();
        assert_eq!(status.state, "disabled");
        assert_eq!(status.capture.state, "disabled");
        assert_eq!(audio.next_deadline(), None);
        assert!(audio.on_timeout(Instant::now()).is_empty());
        audio.stop();
    }

    #[test]
    fn flush_accounts_every_queued_frame_as_consumed() {
        let (_poll, waker) = waker();
        let mut audio = Audio::start(wav_settings(false), waker);
        // Ten seconds of speech: more than the 4 s ring, so part waits in the overflow.
        let speech = vec![1000i16; 10 * SAMPLE_RATE as usize];
        audio.play(&speech);
        let before = audio.progress();
        assert_eq!(before.queued_frames, speech.len() as u64);
        assert!(before.is_playing());
        audio.flush_playback();
        let after = audio.progress();
        assert_eq!(after.queued_frames, speech.len() as u64);
        assert_eq!(after.consumed_frames, after.queued_frames);
        assert!(!after.is_playing());
        // Speech queued after the flush plays normally: it is not consumed at once.
        audio.play(&[1000i16; 4800]);
        let p = audio.progress();
        assert_eq!(p.queued_frames, speech.len() as u64 + 4800);
        assert!(p.is_playing());
        let deadline = Instant::now() + Duration::from_secs(10);
        while audio.progress().is_playing() {
            assert!(
                Instant::now() < deadline,
                "speech after a flush never played"
            );
            audio.on_timeout(Instant::now());
            std::thread::park_timeout(Duration::from_millis(5));
        }
        assert_eq!(audio.progress().consumed_frames, p.queued_frames);
        audio.stop();
    }

    #[test]
    fn settings_from_config() {
        let s = AudioSettings::from_config(&AudioConfig {
            period_ms: 0,
            preroll_ms: 60_000,
            input_wav: "/tmp/in.wav".into(),
            ..AudioConfig::default()
        });
        assert_eq!(s.period_ms, 1);
        assert_eq!(s.preroll_ms, 5_000);
        assert_eq!(s.input_wav, Some(PathBuf::from("/tmp/in.wav")));
        assert_eq!(s.output_wav, None);
        assert_eq!(s.backend, AudioBackend::Alsa);
    }
}
