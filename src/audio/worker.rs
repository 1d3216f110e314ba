//! What the capture and playback threads have in common: their link to the main loop
//! (report ring + waker), interruptible sleeps, real-time setup, and the reopen backoff.
//!
//! Reports carry `String`s, so they are only made outside the period loops (on open,
//! failure and start-up); inside a loop the threads only touch atomics and rings.

use std::sync::Arc;
use std::time::Duration;

use mio::Waker;
use rtrb::Producer;

use super::device::{Device, Errno, Recovery, recover};
use super::pacer::Pacer;
use super::shared::{DeviceCell, Shared};
use super::{AudioReport, Which};
use crate::sys::sched;

/// How a period loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `Audio::stop`: leave the thread.
    Stop,
    /// The stand-in ran until it was time to try the real device again.
    Retry,
    /// The device went away with this errno: close, report, reopen with backoff.
    Gone(Errno),
}

/// First and longest wait between attempts to reopen a device.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A thread falling further behind than this re-anchors its timeline instead of bursting.
pub const MAX_LATE_NS: u64 = 200_000_000;

/// One audio thread's link to the main loop.
pub struct ThreadCtx {
    pub shared: Arc<Shared>,
    pub reports: Producer<AudioReport>,
    pub waker: Arc<Waker>,
    pub which: Which,
    /// The failure last reported, so a device that keeps failing the same way is reported
    /// once per outage rather than on every retry.
    last_failure: Option<String>,
    backoff: Duration,
}

impl ThreadCtx {
    pub fn new(
        shared: Arc<Shared>,
        reports: Producer<AudioReport>,
        waker: Arc<Waker>,
        which: Which,
    ) -> ThreadCtx {
        ThreadCtx {
            shared,
            reports,
            waker,
            which,
            last_failure: None,
            backoff: BACKOFF_MIN,
        }
    }

    pub fn cell(&self) -> &DeviceCell {
        match self.which {
            Which::Capture => &self.shared.capture,
            Which::Playback => &self.shared.playback,
        }
    }

    /// Hands a report to the main loop and wakes it. A full ring drops the report: the
    /// loop is stalled, and blocking here would make the audio wait for it.
    pub fn report(&mut self, report: AudioReport) {
        let _ = self.reports.push(report);
        let _ = self.waker.wake();
    }

    /// Prepares the calling thread: alsa-lib's own error printing off (the thread
    /// reports), SCHED_FIFO attempted (a refusal is a warning).
    pub fn setup_thread(&mut self) {
        sched::silence_alsa_errors_on_this_thread();
        match sched::set_current_thread_fifo(sched::AUDIO_THREAD_PRIORITY) {
            Ok(()) => self
                .cell()
                .realtime
                .store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                let which = self.which;
                self.report(AudioReport::Warning(format!(
                    "{which} thread runs without real-time priority (SCHED_FIFO refused: {e}); \
                     audio may glitch under load. Allow it with LimitRTPRIO={} or CAP_SYS_NICE",
                    sched::AUDIO_THREAD_PRIORITY
                )));
            }
        }
    }

    /// Sleeps until `deadline_ns` (since the epoch) or until the main loop unparks the
    /// thread (flush, stop). Spurious returns are fine: every caller re-checks its state.
    pub fn sleep_until(&self, deadline_ns: u64) {
        let now = self.shared.now_ns();
        if deadline_ns > now {
            std::thread::park_timeout(Duration::from_nanos(deadline_ns - now));
        }
    }

    /// After a device error in the period loop: recovery per error code. `Err` when the
    /// device is gone (the caller closes it); `Ok` when the loop just goes round again,
    /// after restarting the timeline or waiting a period.
    pub fn recover_or_wait<D: Device + ?Sized>(
        &self,
        dev: &mut D,
        errno: Errno,
        pacer: &mut Pacer,
        now: u64,
        period: usize,
    ) -> Result<(), Errno> {
        match recover(dev, errno, self.cell()) {
            Recovery::Recovered => pacer.restart(now),
            Recovery::Later => self.sleep_until(now + frames_ns(period)),
            Recovery::Gone(errno) => return Err(errno),
        }
        Ok(())
    }

    /// Sleeps when neither the device (`avail`, its clock) nor the pacer (walkie's clock,
    /// for clockless plugin PCMs) is ready for another period; true when it slept and the
    /// caller goes round again. A device that ever had less than a period available has a
    /// clock of its own, and from then on paces the thread.
    ///
    /// `linger_ns` stretches such a sleep to at least that long, so that the periods pile
    /// up in the device and are moved in one burst after it (the idle capture thread);
    /// 0 wakes for every period. An unpark ends any sleep early.
    pub fn wait_for_period(
        &self,
        avail: usize,
        period: usize,
        clocked: &mut bool,
        pacer: &mut Pacer,
        now: u64,
        linger_ns: u64,
    ) -> bool {
        if avail < period {
            *clocked = true;
            let wait = frames_ns(period - avail)
                .clamp(1_000_000, frames_ns(period))
                .max(linger_ns);
            self.sleep_until(now + wait);
            return true;
        }
        if !*clocked && !pacer.is_due(now) {
            self.sleep_until(pacer.due_ns_u64().max(now + linger_ns));
            return true;
        }
        false
    }

    /// The device opened: report it and reset the backoff.
    pub fn opened(&mut self, name: &str) {
        self.last_failure = None;
        self.backoff = BACKOFF_MIN;
        let which = self.which;
        self.report(AudioReport::DeviceOpened {
            which,
            name: name.to_owned(),
        });
    }

    /// The device failed to open or went away: report it (unless this outage already
    /// said exactly that) and return how long to wait before the next attempt.
    pub fn failed(&mut self, error: String) -> Duration {
        if self.last_failure.as_deref() != Some(error.as_str()) {
            self.last_failure = Some(error.clone());
            let which = self.which;
            self.report(AudioReport::DeviceFailed { which, error });
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        wait
    }

    /// Waits `wait`, returning early (false) when walkie is stopping.
    pub fn wait(&self, wait: Duration) -> bool {
        let until = self.shared.now_ns() + u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        while !self.shared.stopping() {
            if self.shared.now_ns() >= until {
                return true;
            }
            self.sleep_until(until);
        }
        false
    }
}

/// Text for an errno that took a device away.
pub fn gone_message(device: &str, errno: Errno) -> String {
    format!(
        "device \"{device}\" stopped working: {}",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Nanoseconds `frames` last at the stream rate.
pub fn frames_ns(frames: usize) -> u64 {
    frames as u64 * 1_000_000_000 / u64::from(crate::voice::SAMPLE_RATE)
}
