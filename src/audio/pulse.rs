//! The microphone through PulseAudio's own client library (`audio.backend = "pulse"`), for
//! machines where a sound server owns the card: a desktop Raspberry Pi OS image (PipeWire
//! answers as the pulse server) or any Linux desktop.
//!
//! Why not the ALSA `pulse` plugin, which reaches the same server: the plugin asks for
//! capture fragments of one ALSA period and runs libpulse's threaded main loop inside
//! walkie, so the server sends 100 packets a second and that thread wakes for each, all
//! day, whether anyone talks or not. Here libpulse's plain main loop runs in the capture
//! thread itself (`sys/pulse.rs`), and the fragment size follows the capture thread's mode:
//! one period while someone listens (the button held, or the speaker sounding),
//! [`IDLE_FRAGMENT`] while idle, when the thread reads in bursts anyway. The server
//! changes a live stream's fragment size without a gap, so the pre-roll is kept whole, and
//! with it the latency of the source itself: a sound card's source wakes as rarely.
//! Playback stays on ALSA (`audio.playback_device`; on such a machine "default" goes to the
//! same server).
//!
//! libpulse allocates inside its calls, as the ALSA plugin does in the same place; walkie's
//! own code in the period loop still does not.

use std::time::Duration;

use super::device::{CaptureDevice, Device, Errno};
use crate::sys::pulse::{Lost, Record, bytes_for};

/// How long the idle capture thread sleeps between bursts on this backend, and the
/// fragment asked of the server meanwhile (so a packet is waiting whenever the thread comes
/// round, and the source behind it sleeps as long). Longer than the ALSA backend's linger:
/// what the thread has not read yet waits in the server's queue ([`MAX_QUEUED`]), not in a
/// device buffer that must hold it, and reaches the main loop within a millisecond of a
/// press, as live audio.
pub const IDLE_FRAGMENT: Duration = Duration::from_millis(250);

/// The most the server keeps for walkie unread (its default is 4 MiB, ~87 s).
pub const MAX_QUEUED: Duration = Duration::from_secs(2);

/// What the period loop sees (and `walkie ctl status` says) when the server or the
/// stream is gone.
fn gone(lost: Lost) -> Errno {
    match lost {
        Lost::Server => libc::ECONNRESET,
        // The server killed the stream: its source went away.
        Lost::Stream => libc::ENODEV,
    }
}

pub struct PulseSource {
    record: Record,
    period_bytes: u32,
    idle: bool,
}

impl PulseSource {
    /// Records from `source` ("" or "default": the server's default source) with
    /// fragments of one period until told the thread is idle. Blocks up to a few seconds
    /// when the server does not answer, or until `cancelled` (checked every 50 ms): call it
    /// outside the period loop.
    pub fn open(
        source: &str,
        period_frames: usize,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<PulseSource, String> {
        let period_bytes = u32::try_from(period_frames * 2).unwrap_or(u32::MAX);
        let source = match source.trim() {
            "" | "default" => None,
            name => Some(name),
        };
        Ok(PulseSource {
            record: Record::open(source, period_bytes, bytes_for(MAX_QUEUED), cancelled)?,
            period_bytes,
            idle: false,
        })
    }

    /// The source the server chose.
    pub fn device_name(&self) -> Option<String> {
        self.record.device_name()
    }
}

impl Device for PulseSource {
    /// What was received; the connection is only read when that is less than a period,
    /// so a burst after an idle linger reads the socket once, not once per period.
    fn avail(&mut self) -> Result<usize, Errno> {
        match self.record.queued_frames().map_err(gone)? {
            n if n * 2 >= self.period_bytes as usize => Ok(n),
            _ => self.record.readable_frames().map_err(gone),
        }
    }

    /// The server drops what a slow reader leaves: there are no xruns to recover from.
    fn restart(&mut self) -> Result<(), Errno> {
        self.record.check().map_err(gone)
    }

    fn resume(&mut self) -> Result<(), Errno> {
        self.record.check().map_err(gone)
    }
}

impl CaptureDevice for PulseSource {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, Errno> {
        self.record.read(buf).map_err(gone)
    }

    fn wait(&mut self, timeout_ms: u32) -> Result<(), Errno> {
        self.record.wait(timeout_ms).map_err(gone)
    }

    fn set_idle(&mut self, idle: bool) {
        if idle != self.idle {
            self.idle = idle;
            self.record.set_fragment(if idle {
                bytes_for(IDLE_FRAGMENT).max(self.period_bytes)
            } else {
                self.period_bytes
            });
        }
    }
}

/// `walkie doctor`: opens a record stream on `source` the way the capture thread does and
/// closes it; `Ok` names the source the server chose.
pub fn probe(source: &str, period_frames: usize) -> Result<String, String> {
    let src = PulseSource::open(source, period_frames, &|| false)?;
    Ok(src.device_name().unwrap_or_else(|| source.to_owned()))
}
