//! The capture thread ("walkie-capture"): owns the capture PCM (or the WAV source) and the
//! producer end of the capture ring.
//!
//! Period loop: wait until a period is available (the device's clock, or the pacer for
//! clockless devices), zero the buffer, read, push into the ring, publish the running frame
//! count with the capture time of its last frame, and wake the main loop when it is
//! streaming. No allocation, lock, log or syscall other than ALSA, the clock, the waker and
//! the sleep. A device that goes away is closed and reopened with backoff; playback is
//! unaffected.
//!
//! Idle: while nobody holds the button and the speaker has been quiet long enough for its
//! echo to die away, nothing needs the audio at once: the pre-roll only needs it kept. The
//! thread then lingers [`IDLE_LINGER`] between wake-ups and reads what piled up in the
//! device in one burst (the capture buffer is sized for it), instead of waking every
//! period. The main loop unparks it when streaming starts, and the playback thread when
//! the speaker is about to sound, so it is back to one wake-up per period at once; what it
//! had not read yet then reaches the main loop within a millisecond, as live audio. (The
//! PulseAudio backend lingers longer, `pulse::IDLE_FRAGMENT`: the server queues for it.)

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use alsa::Direction;
use rtrb::Producer;

use super::device::{AlsaDevice, CaptureDevice, WavSource, open_alsa};
use super::pacer::Pacer;
use super::pulse::PulseSource;
use super::worker::{Exit, MAX_LATE_NS, ThreadCtx, frames_ns, gone_message};
use crate::sys::sched;
use crate::voice::SAMPLE_RATE;

/// Where the microphone samples come from.
#[derive(Debug, Clone)]
pub enum CaptureSource {
    /// An ALSA PCM name.
    Alsa(String),
    /// A WAV file played as the microphone, then silence (no file: silence only).
    Wav(Option<PathBuf>),
    /// A PulseAudio source name ("default": the server's), through libpulse.
    Pulse(String),
}

/// How long the idle thread sleeps between bursts. Short enough that the pre-roll taken
/// at a press already holds most of its window (the rest follows as live audio), long
/// enough that the thread wakes about a dozen times a second instead of a hundred.
pub const IDLE_LINGER: Duration = Duration::from_millis(80);

/// The capture buffer asked of ALSA, in frames: three lingers, so a burst read after a
/// late wake-up still finds everything. Capture latency does not grow with it (a period
/// is read as soon as it is complete); a device that offers less gets a shorter linger.
fn capture_buffer_frames(period: usize) -> usize {
    let linger = (IDLE_LINGER.as_millis() as usize) * SAMPLE_RATE as usize / 1000;
    (3 * linger).max(4 * period)
}

pub struct CaptureWorker {
    ctx: ThreadCtx,
    ring: Producer<i16>,
    source: CaptureSource,
    period_frames: usize,
    /// How long the speaker must have been quiet before the thread may linger: the
    /// pre-roll's echo padding after an audible span.
    quiet_guard_ns: u64,
    /// Frames pushed into the ring since start.
    total: u64,
}

impl CaptureWorker {
    pub fn new(
        ctx: ThreadCtx,
        ring: Producer<i16>,
        source: CaptureSource,
        period_frames: usize,
        quiet_guard: Duration,
    ) -> CaptureWorker {
        CaptureWorker {
            ctx,
            ring,
            source,
            period_frames,
            quiet_guard_ns: u64::try_from(quiet_guard.as_nanos()).unwrap_or(u64::MAX),
            total: 0,
        }
    }

    /// The thread body.
    pub fn run(mut self) {
        self.ctx.setup_thread();
        while !self.ctx.shared.stopping() {
            let Err(error) = self.open_and_run() else {
                return;
            };
            let wait = self.ctx.failed(error);
            if !self.ctx.wait(wait) {
                return;
            }
        }
    }

    /// Opens the source and runs the period loop on it until walkie stops (`Ok`) or the
    /// device fails (`Err`: what to report).
    fn open_and_run(&mut self) -> Result<(), String> {
        match self.source.clone() {
            CaptureSource::Alsa(name) => {
                let alsa = open_alsa(
                    &name,
                    Direction::Capture,
                    self.period_frames,
                    capture_buffer_frames(self.period_frames),
                )
                .map_err(|e| e.to_string())?;
                let mut dev = AlsaDevice::new(&alsa.pcm, true)
                    .map_err(|e| format!("capture PCM \"{name}\": {e}"))?;
                let mut buf = vec![0i16; alsa.period];
                self.ctx.opened(&name);
                // Two periods of the buffer stay free for the wake-up's own lateness.
                let linger = frames_ns(alsa.buffer.saturating_sub(2 * alsa.period))
                    .min(IDLE_LINGER.as_nanos() as u64);
                match self.run_periods(&mut dev, &mut buf, linger) {
                    Exit::Gone(errno) => Err(gone_message(&name, errno)),
                    Exit::Stop | Exit::Retry => Ok(()),
                }
            }
            CaptureSource::Pulse(name) => {
                let shared = &self.ctx.shared;
                let mut dev =
                    match PulseSource::open(&name, self.period_frames, &|| shared.stopping()) {
                        Ok(dev) => dev,
                        // Given up on for the stop: nothing to report.
                        Err(_) if shared.stopping() => return Ok(()),
                        Err(e) => return Err(e),
                    };
                let mut buf = vec![0i16; self.period_frames];
                let shown = format!("pulse:{}", dev.device_name().unwrap_or(name));
                self.ctx.opened(&shown);
                let linger = super::pulse::IDLE_FRAGMENT.as_nanos() as u64;
                match self.run_periods(&mut dev, &mut buf, linger) {
                    Exit::Gone(errno) => Err(gone_message(&shown, errno)),
                    Exit::Stop | Exit::Retry => Ok(()),
                }
            }
            CaptureSource::Wav(path) => {
                let mut dev = WavSource::open(path.as_deref()).map_err(|e| e.to_string())?;
                let mut buf = vec![0i16; self.period_frames];
                let name = match &path {
                    Some(p) => p.display().to_string(),
                    None => "silence".to_owned(),
                };
                self.ctx.opened(&name);
                match self.run_periods(&mut dev, &mut buf, IDLE_LINGER.as_nanos() as u64) {
                    Exit::Gone(errno) => Err(gone_message(&name, errno)),
                    Exit::Stop | Exit::Retry => Ok(()),
                }
            }
        }
    }

    /// The real-time period loop. `buf` is one period; `idle_linger_ns` is how long the
    /// thread may sleep between bursts while idle.
    fn run_periods<D: CaptureDevice>(
        &mut self,
        dev: &mut D,
        buf: &mut [i16],
        idle_linger_ns: u64,
    ) -> Exit {
        let _rt = sched::enter_real_time();
        let period = buf.len();
        let shared = &*self.ctx.shared;
        // A clockless device may deliver a period once it has been "recorded". After an
        // idle linger the thread is that late on purpose: only lateness beyond it means
        // the thread was starved and the timeline must be re-anchored.
        let mut pacer = Pacer::new(
            shared.now_ns(),
            SAMPLE_RATE,
            -(period as i64),
            MAX_LATE_NS + idle_linger_ns,
        );
        // A device that ever has less than a period ready runs on its own clock.
        let mut clocked = false;
        let wait_ms = u32::try_from(2 * frames_ns(period) / 1_000_000 + 1).unwrap_or(u32::MAX);
        let mut woke_early = false;
        loop {
            if shared.stopping() {
                return Exit::Stop;
            }
            let now = shared.now_ns();
            let streaming = shared.streaming.load(Ordering::Relaxed);
            let linger = if !streaming && shared.speaker_quiet_for(now, self.quiet_guard_ns) {
                idle_linger_ns
            } else {
                0
            };
            dev.set_idle(linger > 0);
            let avail = match dev.avail() {
                Ok(n) => n,
                Err(errno) => match self
                    .ctx
                    .recover_or_wait(dev, errno, &mut pacer, now, period)
                {
                    Ok(()) => continue,
                    Err(errno) => return Exit::Gone(errno),
                },
            };
            if clocked && linger == 0 && avail < period && !woke_early {
                // Someone listens: a clocked device wakes the thread the moment the period
                // is complete (its interrupt, or its plugin's wake-up), instead of a sleep
                // guessing when. The timeout bounds how late a stop is seen. A wake-up
                // without a period (the pulse plugin's, while its stream starts) falls back
                // to the sleep below once, so the thread never spins.
                woke_early = true;
                if let Err(errno) = dev.wait(wait_ms) {
                    match self
                        .ctx
                        .recover_or_wait(dev, errno, &mut pacer, now, period)
                    {
                        Ok(()) => {}
                        Err(errno) => return Exit::Gone(errno),
                    }
                }
                continue;
            }
            if self
                .ctx
                .wait_for_period(avail, period, &mut clocked, &mut pacer, now, linger)
            {
                woke_early = false;
                continue;
            }
            woke_early = false;
            buf.fill(0);
            let n = match dev.read(buf) {
                Ok(n) => n.min(period),
                Err(errno) => match self
                    .ctx
                    .recover_or_wait(dev, errno, &mut pacer, now, period)
                {
                    Ok(()) => continue,
                    Err(errno) => return Exit::Gone(errno),
                },
            };
            if n == 0 {
                // Nothing came although the device said it had data: do not spin.
                self.ctx.sleep_until(now + frames_ns(period));
                continue;
            }
            pacer.advance(n as u64);
            let (pushed, _) = self.ring.push_partial_slice(&buf[..n]);
            let pushed = pushed.len();
            if pushed < n {
                shared
                    .capture_dropped
                    .fetch_add((n - pushed) as u64, Ordering::Relaxed);
            }
            self.total += pushed as u64;
            // When the last frame read was captured: a clocked device has captured what is
            // still in its buffer after it; a clockless one "recorded" it on the timeline.
            // (A burst reads periods captured long before `now`.)
            let captured_ns = if clocked {
                now.saturating_sub(frames_ns(avail.saturating_sub(n)))
            } else {
                u64::try_from(pacer.position_ns().max(0)).unwrap_or(now)
            };
            shared.capture_stamp.store(self.total, captured_ns);
            #[cfg(feature = "probe")]
            crate::probe::CAP.record(self.total, 0);
            if streaming {
                let _ = self.ctx.waker.wake();
            }
        }
    }
}
