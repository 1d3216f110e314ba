//! The playback thread ("walkie-playback"): owns the playback PCM (or the WAV sink), the
//! consumer end of the speech ring and the producer end of the audible-span ring.
//!
//! Period loop: honour a flush (drop queued speech up to the flush mark, `snd_pcm_drop` +
//! prepare at once), start requested earcons, and when the device has room (its clock, or
//! the pacer for clockless devices) write one period: speech from the ring or silence, with
//! earcons mixed over it with saturation. Each non-silent period is published as an audible
//! span (when it will be heard: now + the device latency) so the pre-roll can drop its
//! echo; the speech samples taken are published as `consumed`. No allocation, lock, log or
//! syscall other than ALSA, the clock, the sleep, the waker and the capture thread's unpark.
//!
//! Idle: once nothing is queued and enough silence followed the last sound for it to have
//! played out of the device (its buffer, or a clockless device's lead), the thread stops the
//! device (`snd_pcm_drop`: only silence is dropped), marks the speaker quiet and parks: it
//! does not wake while nothing plays. The main loop unparks it for speech, an earcon, a
//! flush or the stop; it restarts the device and the timeline and writes at once.
//!
//! While the device is gone, a null sink stands in (paced like any clockless device), so
//! queued speech still drains at real time and the conversation does not wait forever for
//! playback to finish; the real device is retried with backoff.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::Thread;

use alsa::Direction;
use rtrb::{Consumer, Producer};

use super::device::{AlsaDevice, NullSink, PlaybackDevice, Recovery, WavSink, open_alsa, recover};
use super::pacer::Pacer;
use super::shared::{AudibleSpan, SPEAKER_BUSY};
use super::worker::{Exit, MAX_LATE_NS, ThreadCtx, frames_ns, gone_message};
use crate::sys::sched;
use crate::voice::SAMPLE_RATE;

/// Where the speaker output goes.
#[derive(Debug, Clone)]
pub enum PlaybackTarget {
    /// An ALSA PCM name.
    Alsa(String),
    /// A WAV file receiving everything the speaker would play (no file: discarded).
    Wav(Option<PathBuf>),
}

/// How often a parked thread asks its device whether it is still there. A sound card
/// unplugged or unbound while nothing plays would otherwise keep its stale handle open until
/// the next answer: `walkie ctl status` says "ok" for a speaker that is gone, and the kernel
/// cannot free a card whose files are open (unbinding it blocks). Seen in the kernel tests'
/// guest (tests/kernel). Rare enough that the idle thread stays asleep almost always.
const PARKED_CHECK: std::time::Duration = std::time::Duration::from_secs(4);

/// A sample louder than this makes its period audible (about -54 dBFS).
const AUDIBLE_LEVEL: u16 = 64;

/// How far a clockless device is kept ahead of the clock: the buffer a sound card would
/// have (four periods) plus one. The lead must exceed the device buffer: a device with a
/// clock then fills up before the pacer holds the thread back, which is how the loop
/// recognises it (and lets its clock, not the monotonic one, pace the stream).
fn lead_frames(period: usize, device_buffer: usize) -> i64 {
    (device_buffer.max(4 * period) + period) as i64
}

pub struct PlaybackWorker {
    ctx: ThreadCtx,
    ring: Consumer<i16>,
    spans: Producer<AudibleSpan>,
    target: PlaybackTarget,
    period_frames: usize,
    earcons: Arc<[Vec<i16>; 5]>,
    /// Position in each earcon being played.
    cursors: [Option<usize>; 5],
    /// Speech samples taken from the ring (written or discarded).
    consumed: u64,
    /// Every sample before this mark is discarded (the latest flush).
    discard_upto: u64,
    seen_epoch: u64,
    /// A span the ring had no room for; merged with the next one.
    pending_span: Option<AudibleSpan>,
    /// Speech ran out in the middle of a period: if more comes before the speaker goes
    /// quiet, the silence between was a gap (`Shared::speech_gaps`).
    ran_dry: bool,
    /// The latest period was all speech.
    full_of_speech: bool,
    /// Woken when the speaker is about to sound, so it stops batching its reads at once.
    capture_thread: Option<Thread>,
}

impl PlaybackWorker {
    pub fn new(
        ctx: ThreadCtx,
        ring: Consumer<i16>,
        spans: Producer<AudibleSpan>,
        target: PlaybackTarget,
        period_frames: usize,
        earcons: Arc<[Vec<i16>; 5]>,
        capture_thread: Option<Thread>,
    ) -> PlaybackWorker {
        PlaybackWorker {
            ctx,
            ring,
            spans,
            target,
            period_frames,
            earcons,
            cursors: [None; 5],
            consumed: 0,
            discard_upto: 0,
            seen_epoch: 0,
            pending_span: None,
            ran_dry: false,
            full_of_speech: false,
            capture_thread,
        }
    }

    /// The thread body.
    pub fn run(mut self) {
        self.ctx.setup_thread();
        let mut stand_in = vec![0i16; self.period_frames];
        while !self.ctx.shared.stopping() {
            let Err(error) = self.open_and_run() else {
                return;
            };
            let wait = self.ctx.failed(error);
            let until = self.ctx.shared.now_ns() + u64::try_from(wait.as_nanos()).unwrap_or(0);
            let lead = lead_frames(self.period_frames, 0);
            if self.run_periods(&mut NullSink, &mut stand_in, lead, Some(until)) == Exit::Stop {
                return;
            }
        }
    }

    /// Opens the target and runs the period loop on it until walkie stops (`Ok`) or the
    /// device fails (`Err`: what to report).
    fn open_and_run(&mut self) -> Result<(), String> {
        let exit = match self.target.clone() {
            PlaybackTarget::Alsa(name) => {
                let alsa = open_alsa(
                    &name,
                    Direction::Playback,
                    self.period_frames,
                    4 * self.period_frames,
                )
                .map_err(|e| e.to_string())?;
                let mut dev = AlsaDevice::new(&alsa.pcm, false)
                    .map_err(|e| format!("playback PCM \"{name}\": {e}"))?;
                let mut buf = vec![0i16; alsa.period];
                self.ctx.opened(&name);
                let lead = lead_frames(alsa.period, alsa.buffer);
                let exit = self.run_periods(&mut dev, &mut buf, lead, None);
                (exit, name)
            }
            PlaybackTarget::Wav(Some(path)) => {
                let mut dev = WavSink::create(&path).map_err(|e| e.to_string())?;
                let mut buf = vec![0i16; self.period_frames];
                let name = path.display().to_string();
                self.ctx.opened(&name);
                let lead = lead_frames(self.period_frames, 0);
                (self.run_periods(&mut dev, &mut buf, lead, None), name)
            }
            PlaybackTarget::Wav(None) => {
                let mut buf = vec![0i16; self.period_frames];
                let name = "discard".to_owned();
                self.ctx.opened(&name);
                let lead = lead_frames(self.period_frames, 0);
                (self.run_periods(&mut NullSink, &mut buf, lead, None), name)
            }
        };
        match exit {
            (Exit::Gone(errno), name) => Err(gone_message(&name, errno)),
            _ => Ok(()),
        }
    }

    /// The real-time period loop. `buf` is one period; `lead` is how far a clockless
    /// device runs ahead of the clock. With `until`, returns `Retry` at that time (the
    /// stand-in's turn is over).
    fn run_periods<D: PlaybackDevice>(
        &mut self,
        dev: &mut D,
        buf: &mut [i16],
        lead: i64,
        until: Option<u64>,
    ) -> Exit {
        let shared = Arc::clone(&self.ctx.shared);
        let _rt = sched::enter_real_time();
        let period = buf.len();
        let mut pacer = Pacer::new(shared.now_ns(), SAMPLE_RATE, lead, MAX_LATE_NS);
        let mut clocked = false;
        // The part of `buf` not yet accepted by the device.
        let mut pending: Range<usize> = 0..0;
        // Frames of silence written since the last sound. Writes run up to `lead` ahead
        // of what is heard (a clocked device's buffer is smaller still), so once twice
        // that much silence followed it, the last sound has been heard.
        let played_out = 2 * lead.max(0) as usize;
        let mut silent_tail = 0;
        // Speech samples in the period being written, for the probe's `dev` record.
        #[cfg(feature = "probe")]
        let mut probe_speech = 0u64;
        loop {
            if shared.stopping() {
                return Exit::Stop;
            }
            let now = shared.now_ns();
            if until.is_some_and(|u| now >= u) {
                return Exit::Retry;
            }
            let epoch = shared.flush_epoch.load(Ordering::Acquire);
            if epoch != self.seen_epoch {
                self.seen_epoch = epoch;
                self.discard_upto = self
                    .discard_upto
                    .max(shared.flush_upto.load(Ordering::Acquire));
                pending = 0..0;
                if let Err(errno) = dev.drop_queued()
                    && let Recovery::Gone(errno) = recover(dev, errno, &shared.playback)
                {
                    return Exit::Gone(errno);
                }
                #[cfg(feature = "probe")]
                crate::probe::FLUSH.record(epoch, 0);
                pacer.restart(now);
                // Cut off on purpose: what comes next is another answer.
                self.ran_dry = false;
                self.full_of_speech = false;
            }
            self.discard();
            let requests = shared.earcon_requests.swap(0, Ordering::Acquire);
            for (i, cursor) in self.cursors.iter_mut().enumerate() {
                if requests & (1 << i) != 0 {
                    *cursor = Some(0);
                }
            }
            if pending.is_empty() && silent_tail >= played_out && self.nothing_to_play() {
                // The answer ended (its last period ran short): no gap.
                self.ran_dry = false;
                self.full_of_speech = false;
                if let Some(exit) = self.park(dev, until, clocked) {
                    return exit;
                }
                pacer.restart(shared.now_ns());
                silent_tail = 0;
                continue;
            }
            if pending.is_empty() {
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
                    .wait_for_period(avail, period, &mut clocked, &mut pacer, now, 0)
                {
                    continue;
                }
                let latency = if clocked {
                    dev.delay()
                } else {
                    pacer.ahead_frames(now) as usize
                };
                // Less than a period of speech: the rest of it is likely on its way (the
                // model's deltas come back to back). Padding it with silence now would cut a
                // gap into the speech, so while the device still holds more than a period,
                // wait for more (a push wakes the thread) or for the device to need it.
                if self.partial_speech(period) && latency > period {
                    self.ctx.sleep_until(now + frames_ns(latency - period));
                    continue;
                }
                #[cfg(feature = "probe")]
                let probe_consumed = self.consumed;
                if self.fill(buf) {
                    silent_tail = 0;
                } else {
                    silent_tail += period;
                }
                if buf.iter().any(|s| s.unsigned_abs() > AUDIBLE_LEVEL) {
                    let start_ns = now + frames_ns(latency);
                    self.publish_span(AudibleSpan {
                        start_ns,
                        end_ns: start_ns + frames_ns(period),
                        epoch: self.seen_epoch,
                    });
                } else if let Some(span) = self.pending_span.take() {
                    self.publish_span(span);
                }
                pacer.advance(period as u64);
                pending = 0..period;
                #[cfg(feature = "probe")]
                {
                    probe_speech = self.consumed - probe_consumed;
                }
            }
            match dev.write(&buf[pending.clone()]) {
                Ok(n) => {
                    #[cfg(feature = "probe")]
                    if n > 0 && probe_speech > 0 {
                        crate::probe::DEV.record(self.consumed, probe_speech);
                        probe_speech = 0;
                    }
                    pending.start += n.min(pending.len());
                    if n == 0 {
                        self.ctx.sleep_until(now + 1_000_000);
                    }
                }
                Err(errno) => match recover(dev, errno, &shared.playback) {
                    // The period is written again into the restarted stream.
                    Recovery::Recovered => pacer.restart(now),
                    Recovery::Later => self.ctx.sleep_until(now + 1_000_000),
                    Recovery::Gone(errno) => return Exit::Gone(errno),
                },
            }
        }
    }

    /// Drops speech up to the flush mark (as much of it as has reached the ring).
    fn discard(&mut self) {
        if self.consumed >= self.discard_upto {
            return;
        }
        let want = (self.discard_upto - self.consumed).min(self.ring.slots() as u64) as usize;
        if let Ok(chunk) = self.ring.read_chunk(want) {
            chunk.commit_all();
            self.consumed += want as u64;
            self.ctx
                .shared
                .consumed
                .store(self.consumed, Ordering::Release);
        }
    }

    /// Some speech is queued, but less than a period of it (and no earcon plays).
    fn partial_speech(&self, period: usize) -> bool {
        let n = self.ring.slots();
        n > 0
            && n < period
            && self.consumed >= self.discard_upto
            && self.cursors.iter().all(Option::is_none)
    }

    /// Nothing queued: no speech in the ring, no earcon playing.
    fn nothing_to_play(&self) -> bool {
        self.ring.is_empty() && self.cursors.iter().all(Option::is_none)
    }

    /// The device has played out everything audible: stops it, marks the speaker quiet and
    /// parks until there is something to play, a flush, or the stop (or `until`, for the
    /// stand-in). `Some` is how the period loop ends; `None` means play on.
    fn park<D: PlaybackDevice>(
        &mut self,
        dev: &mut D,
        until: Option<u64>,
        clocked: bool,
    ) -> Option<Exit> {
        let shared = Arc::clone(&self.ctx.shared);
        if let Err(errno) = dev.stop_idle(clocked)
            && let Recovery::Gone(errno) = recover(dev, errno, &shared.playback)
        {
            return Some(Exit::Gone(errno));
        }
        if let Some(span) = self.pending_span.take() {
            self.publish_span(span);
        }
        shared
            .speaker_quiet_since
            .store(shared.now_ns(), Ordering::Release);
        loop {
            if shared.stopping() {
                return Some(Exit::Stop);
            }
            let now = shared.now_ns();
            if until.is_some_and(|u| now >= u) {
                return Some(Exit::Retry);
            }
            // Each waker stores first and unparks after: a wake between this check and
            // the park leaves a token, so the park returns at once.
            if !self.ring.is_empty()
                || shared.earcon_requests.load(Ordering::Acquire) != 0
                || shared.flush_epoch.load(Ordering::Acquire) != self.seen_epoch
            {
                break;
            }
            let wait = until.map_or(PARKED_CHECK, |u| {
                std::time::Duration::from_nanos(u - now).min(PARKED_CHECK)
            });
            std::thread::park_timeout(wait);
            // A card that went away while nothing played: let go of it now, not at the
            // next answer (see PARKED_CHECK).
            if let Err(errno) = dev.avail()
                && let Recovery::Gone(errno) = recover(dev, errno, &shared.playback)
            {
                return Some(Exit::Gone(errno));
            }
        }
        shared
            .speaker_quiet_since
            .store(SPEAKER_BUSY, Ordering::Release);
        if let Some(capture) = &self.capture_thread {
            capture.unpark();
        }
        if let Err(errno) = dev.resume_idle()
            && let Recovery::Gone(errno) = recover(dev, errno, &shared.playback)
        {
            return Some(Exit::Gone(errno));
        }
        None
    }

    /// One period of output: speech (or silence) with the active earcons mixed in. True
    /// when it holds anything but silence from an empty queue.
    fn fill(&mut self, buf: &mut [i16]) -> bool {
        buf.fill(0);
        let mut sound = false;
        if self.consumed >= self.discard_upto {
            let n = buf.len().min(self.ring.slots());
            sound = n > 0;
            if n > 0 && self.ran_dry {
                self.ran_dry = false;
                self.ctx.shared.speech_gaps.fetch_add(1, Ordering::Relaxed);
            }
            if n < buf.len() && (n > 0 || self.full_of_speech) {
                self.ran_dry = true;
            }
            self.full_of_speech = n == buf.len();
            if let Ok(chunk) = self.ring.read_chunk(n) {
                let (a, b) = chunk.as_slices();
                buf[..a.len()].copy_from_slice(a);
                buf[a.len()..a.len() + b.len()].copy_from_slice(b);
                chunk.commit_all();
                self.consumed += n as u64;
                self.ctx
                    .shared
                    .consumed
                    .store(self.consumed, Ordering::Release);
            }
        }
        for (i, cursor) in self.cursors.iter_mut().enumerate() {
            let Some(pos) = *cursor else { continue };
            sound = true;
            let pcm = &self.earcons[i];
            let n = pcm.len().saturating_sub(pos).min(buf.len());
            for (out, e) in buf[..n].iter_mut().zip(&pcm[pos..pos + n]) {
                *out = out.saturating_add(*e);
            }
            *cursor = (pos + n < pcm.len()).then_some(pos + n);
        }
        sound
    }

    /// Tells the main loop when the speaker is audible. A full ring (main loop stalled)
    /// keeps the span and widens it with the next, so no echo interval is ever lost.
    fn publish_span(&mut self, span: AudibleSpan) {
        let span = match self.pending_span.take() {
            Some(p) if p.epoch == span.epoch => AudibleSpan {
                start_ns: p.start_ns.min(span.start_ns),
                end_ns: p.end_ns.max(span.end_ns),
                epoch: span.epoch,
            },
            // A span from before a flush: the main loop clips those at the flush anyway.
            _ => span,
        };
        if let Err(rtrb::PushError::Full(span)) = self.spans.push(span) {
            self.pending_span = Some(span);
        }
    }
}
