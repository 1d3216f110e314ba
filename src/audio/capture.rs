//! The capture thread ("walkie-capture"): owns the capture PCM (or the WAV source) and the
//! producer end of the capture ring.
//!
//! Period loop: wait until a period is available (the device's clock, or the pacer for
//! clockless devices), zero the buffer, read, push into the ring, publish the running frame
//! count with the time of the period, and wake the main loop when it is streaming. No
//! allocation, lock, log or syscall other than ALSA, the clock, the waker and the sleep.
//! A device that goes away is closed and reopened with backoff; playback is unaffected.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use alsa::Direction;
use rtrb::Producer;

use super::device::{AlsaDevice, CaptureDevice, WavSource, open_alsa};
use super::pacer::Pacer;
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
}

pub struct CaptureWorker {
    ctx: ThreadCtx,
    ring: Producer<i16>,
    source: CaptureSource,
    period_frames: usize,
    /// Frames pushed into the ring since start.
    total: u64,
}

impl CaptureWorker {
    pub fn new(
        ctx: ThreadCtx,
        ring: Producer<i16>,
        source: CaptureSource,
        period_frames: usize,
    ) -> CaptureWorker {
        CaptureWorker {
            ctx,
            ring,
            source,
            period_frames,
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
                let alsa = open_alsa(&name, Direction::Capture, self.period_frames)
                    .map_err(|e| e.to_string())?;
                let mut dev = AlsaDevice::new(&alsa.pcm, true)
                    .map_err(|e| format!("capture PCM \"{name}\": {e}"))?;
                let mut buf = vec![0i16; alsa.period];
                self.ctx.opened(&name);
                match self.run_periods(&mut dev, &mut buf) {
                    Exit::Gone(errno) => Err(gone_message(&name, errno)),
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
                match self.run_periods(&mut dev, &mut buf) {
                    Exit::Gone(errno) => Err(gone_message(&name, errno)),
                    Exit::Stop | Exit::Retry => Ok(()),
                }
            }
        }
    }

    /// The real-time period loop. `buf` is one period.
    fn run_periods<D: CaptureDevice>(&mut self, dev: &mut D, buf: &mut [i16]) -> Exit {
        let _rt = sched::enter_real_time();
        let period = buf.len();
        let shared = &*self.ctx.shared;
        // A clockless device may deliver a period once it has been "recorded".
        let mut pacer = Pacer::new(shared.now_ns(), SAMPLE_RATE, -(period as i64), MAX_LATE_NS);
        // A device that ever has less than a period ready runs on its own clock.
        let mut clocked = false;
        loop {
            if shared.stopping() {
                return Exit::Stop;
            }
            let now = shared.now_ns();
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
            if self
                .ctx
                .wait_for_period(avail, period, &mut clocked, &mut pacer, now)
            {
                continue;
            }
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
            shared.capture_stamp.store(self.total, shared.now_ns());
            if shared.streaming.load(Ordering::Relaxed) {
                let _ = self.ctx.waker.wake();
            }
        }
    }
}
