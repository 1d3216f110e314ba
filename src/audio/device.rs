//! The "devices" the audio threads move samples through: ALSA PCMs, the WAV backend's
//! file source and file sink, and a null sink. One small trait per direction, so the
//! capture and playback period loops are the same code whatever the backend.
//!
//! Opening (and everything that allocates or formats: error messages, the WAV decode,
//! the writer thread) happens in the owning audio thread *outside* its period loop; the
//! trait methods the loop calls only move samples, query the device and return an errno.
//! ALSA PCMs are opened non-blocking: the loops decide when to sleep, so a flush or a stop
//! never waits behind a blocked `readi`/`writei`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alsa::pcm::{Access, Format, HwParams, IO, PCM};
use alsa::{Direction, ValueOr};
use rtrb::{Consumer, Producer, RingBuffer};

use super::shared::DeviceCell;
use super::wav::{WavError, WavWriter, read_wav};
use crate::voice::SAMPLE_RATE;

/// A positive errno value as ALSA returns them (`EPIPE`, `ESTRPIPE`, `ENODEV`, …).
pub type Errno = i32;

/// What every device can do after an error.
pub trait Device {
    /// Frames that can be transferred right now without blocking. Devices without a clock
    /// always have room (`usize::MAX` or their whole buffer).
    fn avail(&mut self) -> Result<usize, Errno>;
    /// Gets going again after an xrun (`snd_pcm_prepare`, and `start` for capture).
    fn restart(&mut self) -> Result<(), Errno>;
    /// Resumes after a system suspend (`ESTRPIPE`); `EAGAIN` means "not yet".
    fn resume(&mut self) -> Result<(), Errno>;
}

pub trait CaptureDevice: Device {
    /// Reads up to `buf.len()` frames into `buf` (which the caller zeroed: some plugins
    /// return success without writing anything). Returns the frames read.
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, Errno>;
    /// Blocks until a period is available or `timeout_ms` passed (a device with a clock:
    /// its interrupt or its plugin's wake-up, not a guess by sleeping).
    fn wait(&mut self, timeout_ms: u32) -> Result<(), Errno>;
    /// The capture thread switches between idle (reading in bursts) and listening. A
    /// device whose own wake-ups follow it (PulseAudio's fragment size) adjusts; cheap
    /// when nothing changes, as the loop calls it every round.
    fn set_idle(&mut self, idle: bool) {
        let _ = idle;
    }
}

pub trait PlaybackDevice: Device {
    /// Writes up to `buf.len()` frames; returns how many were taken.
    fn write(&mut self, buf: &[i16]) -> Result<usize, Errno>;
    /// Frames written but not yet heard (0 when the device cannot tell).
    fn delay(&mut self) -> usize;
    /// Drops everything queued in the device at once (silence now); the device is ready
    /// for new data when next used.
    fn drop_queued(&mut self) -> Result<(), Errno>;
    /// Nothing will play for a while (what is queued is silence): stops the device so it
    /// asks for nothing. A clocked device that can pause is paused — the PulseAudio plugin
    /// recreates its stream on every prepare, and a fresh stream left waiting can stall
    /// for a second before it plays — any other is stopped (`snd_pcm_drop`).
    fn stop_idle(&mut self, clocked: bool) -> Result<(), Errno> {
        let _ = clocked;
        self.drop_queued()
    }
    /// Undoes [`PlaybackDevice::stop_idle`]: there is something to play.
    fn resume_idle(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

/// What the period loop does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// The device is running again (xrun or suspend recovered): restart the timeline.
    Recovered,
    /// Nothing to do now (`EAGAIN`, `EINTR`, still suspended): try again shortly.
    Later,
    /// The device is gone (`ENODEV`, `EBADFD`, `ENOENT`, anything unknown): close it,
    /// report, and reopen with backoff.
    Gone(Errno),
}

/// Recovery per error code, after cpal's ALSA worker and `snd_pcm_recover`.
pub fn recover<D: Device + ?Sized>(dev: &mut D, errno: Errno, cell: &DeviceCell) -> Recovery {
    match errno {
        libc::EAGAIN | libc::EINTR => Recovery::Later,
        // Overrun (capture) or underrun (playback): the stream stopped; prepare restarts it.
        libc::EPIPE => {
            cell.xruns.fetch_add(1, Ordering::Relaxed);
            match dev.restart() {
                Ok(()) => Recovery::Recovered,
                Err(e) => Recovery::Gone(e),
            }
        }
        // The system was suspended. Drivers that can resume say EAGAIN until they are back;
        // the others refuse, and a prepare starts the stream afresh.
        libc::ESTRPIPE => match dev.resume() {
            Ok(()) => Recovery::Recovered,
            Err(libc::EAGAIN) => Recovery::Later,
            Err(_) => match dev.restart() {
                Ok(()) => Recovery::Recovered,
                Err(e) => Recovery::Gone(e),
            },
        },
        other => Recovery::Gone(other),
    }
}

/// Why a device could not be opened. The owning thread reports it (the main loop logs it
/// and shows it in `walkie ctl status`) and tries again with backoff: 0.5 s doubling to 5 s.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `snd_pcm_open` failed: unknown name, device busy or unplugged.
    #[error("cannot open ALSA PCM \"{device}\": {source}")]
    Open {
        device: String,
        #[source]
        source: alsa::Error,
    },
    /// The PCM refused walkie's stream (24 kHz, mono, S16_LE, ~`period_ms` periods). A raw
    /// `hw:` device usually does; a `plughw:`/`default` name converts.
    #[error(
        "ALSA PCM \"{device}\" refused {what}: {source} (a plug device such as \"plughw:1,0\" or \"default\" converts)"
    )]
    Params {
        device: String,
        what: &'static str,
        #[source]
        source: alsa::Error,
    },
    /// The configured name cannot be passed to ALSA (it contains a NUL byte).
    #[error("invalid ALSA PCM name {0:?}")]
    BadName(String),
    /// The WAV backend's input file is missing or unusable.
    #[error(transparent)]
    Wav(#[from] WavError),
    /// The WAV backend's output file cannot be created.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An open, configured ALSA PCM.
pub struct AlsaPcm {
    pub pcm: PCM,
    /// Negotiated period and buffer size, in frames.
    pub period: usize,
    pub buffer: usize,
}

/// Opens `device` for 24 kHz mono S16_LE with periods near `period_frames` and a buffer
/// near `buffer_frames`, non-blocking, prepared (and, for capture, started).
pub fn open_alsa(
    device: &str,
    dir: Direction,
    period_frames: usize,
    buffer_frames: usize,
) -> Result<AlsaPcm, OpenError> {
    let name = CString::new(device).map_err(|_| OpenError::BadName(device.to_owned()))?;
    let pcm = PCM::open(&name, dir, true).map_err(|source| OpenError::Open {
        device: device.to_owned(),
        source,
    })?;
    let params = |what: &'static str| {
        move |source| OpenError::Params {
            device: device.to_owned(),
            what,
            source,
        }
    };
    let (period, buffer) = {
        let hw = HwParams::any(&pcm).map_err(params("any hardware parameters"))?;
        hw.set_access(Access::RWInterleaved)
            .map_err(params("interleaved access"))?;
        hw.set_format(Format::S16LE)
            .map_err(params("format S16_LE"))?;
        hw.set_channels(1).map_err(params("1 channel"))?;
        hw.set_rate(SAMPLE_RATE, ValueOr::Nearest)
            .map_err(params("rate 24000 Hz"))?;
        hw.set_period_size_near(period_frames as alsa::pcm::Frames, ValueOr::Nearest)
            .map_err(params("the period size"))?;
        hw.set_buffer_size_near(buffer_frames.max(2 * period_frames) as alsa::pcm::Frames)
            .map_err(params("the buffer size"))?;
        pcm.hw_params(&hw)
            .map_err(params("the hardware parameters"))?;
        let period = hw.get_period_size().map_err(params("the period size"))?;
        let buffer = hw.get_buffer_size().map_err(params("the buffer size"))?;
        (period.max(1) as usize, buffer.max(1) as usize)
    };
    {
        let sw = pcm
            .sw_params_current()
            .map_err(params("software parameters"))?;
        sw.set_avail_min(period as alsa::pcm::Frames)
            .map_err(params("avail_min"))?;
        if dir == Direction::Playback {
            // Start as soon as one period is queued; the loop fills the rest at once.
            sw.set_start_threshold(period as alsa::pcm::Frames)
                .map_err(params("the start threshold"))?;
        }
        pcm.sw_params(&sw).map_err(params("software parameters"))?;
    }
    pcm.prepare().map_err(params("prepare"))?;
    if dir == Direction::Capture {
        pcm.start().map_err(params("start"))?;
    }
    Ok(AlsaPcm {
        pcm,
        period,
        buffer,
    })
}

/// An ALSA PCM as the period loops see it. Borrows the PCM so the `IO` handle can be made
/// once, before the loop (making one checks the format, which allocates inside alsa-lib).
pub struct AlsaDevice<'a> {
    pcm: &'a PCM,
    io: IO<'a, i16>,
    capture: bool,
    can_pause: bool,
    paused: bool,
    /// Dropped and not prepared again yet: the prepare waits until the device is used.
    dropped: bool,
}

impl<'a> AlsaDevice<'a> {
    pub fn new(pcm: &'a PCM, capture: bool) -> Result<AlsaDevice<'a>, alsa::Error> {
        let can_pause = pcm.hw_params_current()?.can_pause();
        Ok(AlsaDevice {
            pcm,
            io: pcm.io_i16()?,
            capture,
            can_pause,
            paused: false,
            dropped: false,
        })
    }

    /// Prepares a dropped device before it is used again.
    fn ready(&mut self) -> Result<(), Errno> {
        if self.dropped {
            self.pcm.prepare().map_err(|e| e.errno())?;
            self.dropped = false;
        }
        Ok(())
    }
}

impl Device for AlsaDevice<'_> {
    fn avail(&mut self) -> Result<usize, Errno> {
        self.ready()?;
        self.pcm
            .avail()
            .map(|n| n.max(0) as usize)
            .map_err(|e| e.errno())
    }

    fn restart(&mut self) -> Result<(), Errno> {
        self.dropped = false;
        self.pcm.prepare().map_err(|e| e.errno())?;
        if self.capture {
            self.pcm.start().map_err(|e| e.errno())?;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Errno> {
        self.pcm.resume().map_err(|e| e.errno())
    }
}

impl CaptureDevice for AlsaDevice<'_> {
    fn read(&mut self, buf: &mut [i16]) -> Result<usize, Errno> {
        self.io.readi(buf).map_err(|e| e.errno())
    }

    fn wait(&mut self, timeout_ms: u32) -> Result<(), Errno> {
        // One poll on the PCM's descriptors, not `snd_pcm_wait`: that one polls again
        // whenever the plugin says "nothing yet", and the PulseAudio plugin leaves its
        // descriptor readable while its stream starts, so it would spin until data comes.
        // A wake-up without a period is the caller's to handle (it sleeps instead).
        use alsa::poll::Descriptors;
        let mut fds = [libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        }; 4];
        if self.pcm.count() > fds.len() {
            return Ok(());
        }
        let n = self.pcm.fill(&mut fds).map_err(|e| e.errno())?;
        match alsa::poll::poll(&mut fds[..n], i32::try_from(timeout_ms).unwrap_or(i32::MAX)) {
            Ok(_) => {}
            Err(e) if e.errno() == libc::EINTR => return Ok(()),
            Err(e) => return Err(e.errno()),
        }
        // Lets the plugin account for the wake-up (and report an xrun as an error).
        self.pcm
            .revents(&fds[..n])
            .map(|_| ())
            .map_err(|e| e.errno())
    }
}

impl PlaybackDevice for AlsaDevice<'_> {
    fn write(&mut self, buf: &[i16]) -> Result<usize, Errno> {
        self.ready()?;
        self.io.writei(buf).map_err(|e| e.errno())
    }

    fn delay(&mut self) -> usize {
        if self.dropped {
            return 0;
        }
        self.pcm.delay().map(|d| d.max(0) as usize).unwrap_or(0)
    }

    /// `snd_pcm_drop` silences the device at once; the prepare that makes it ready for
    /// more waits until it is next used (`ready`). On the PulseAudio plugin that prepare
    /// makes a new server stream (round trips), which a barge-in need not wait for.
    fn drop_queued(&mut self) -> Result<(), Errno> {
        self.paused = false;
        self.pcm.drop().map_err(|e| e.errno())?;
        self.dropped = true;
        Ok(())
    }

    fn stop_idle(&mut self, clocked: bool) -> Result<(), Errno> {
        if self.dropped {
            return Ok(());
        }
        if clocked && self.can_pause && self.pcm.state() == alsa::pcm::State::Running {
            self.pcm.pause(true).map_err(|e| e.errno())?;
            self.paused = true;
            return Ok(());
        }
        self.drop_queued()
    }

    fn resume_idle(&mut self) -> Result<(), Errno> {
        if self.paused {
            self.paused = false;
            self.pcm.pause(false).map_err(|e| e.errno())?;
        }
        Ok(())
    }
}

/// The WAV backend's microphone: the decoded input file, then silence forever.
pub struct WavSource {
    samples: Vec<i16>,
    pos: usize,
}

impl WavSource {
    /// Decodes `path` (any PCM WAV; converted to 24 kHz mono). No path: silence.
    pub fn open(path: Option<&Path>) -> Result<WavSource, OpenError> {
        let samples = match path {
            Some(p) => read_wav(p)?.1,
            None => Vec::new(),
        };
        Ok(WavSource { samples, pos: 0 })
    }
}

impl Device for WavSource {
    fn avail(&mut self) -> Result<usize, Errno> {
        Ok(usize::MAX)
    }
    fn restart(&mut self) -> Result<(), Errno> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

impl CaptureDevice for WavSource {
    fn wait(&mut self, _timeout_ms: u32) -> Result<(), Errno> {
        Ok(())
    }

    fn read(&mut self, buf: &mut [i16]) -> Result<usize, Errno> {
        let rest = &self.samples[self.pos.min(self.samples.len())..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        // Past the end the "microphone" hears silence (the caller zeroed `buf`).
        Ok(buf.len())
    }
}

/// A playback device that discards everything: the WAV backend without an output file,
/// and the stand-in that keeps speech flowing at real time while the real device is gone.
pub struct NullSink;

impl Device for NullSink {
    fn avail(&mut self) -> Result<usize, Errno> {
        Ok(usize::MAX)
    }
    fn restart(&mut self) -> Result<(), Errno> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

impl PlaybackDevice for NullSink {
    fn write(&mut self, buf: &[i16]) -> Result<usize, Errno> {
        Ok(buf.len())
    }
    fn delay(&mut self) -> usize {
        0
    }
    fn drop_queued(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

/// The WAV backend's speaker: samples go through a ring to the `walkie-wav-out` thread,
/// which appends them to the file (file IO stays out of the period loop).
pub struct WavSink {
    ring: Producer<i16>,
    done: Arc<AtomicBool>,
    /// The writer sleeps until woken (nothing came in its last round).
    writer_idle: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
}

/// How often the writer drains its ring while samples come in; the ring holds several
/// times this. When they stop it brings the header up to date and sleeps until woken.
const WAV_DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often the header sizes are brought up to date.
const WAV_HEADER_INTERVAL: Duration = Duration::from_secs(1);

impl WavSink {
    /// Creates (truncates) `path` and starts its writer thread.
    pub fn create(path: &Path) -> Result<WavSink, OpenError> {
        let create_err = |source| OpenError::Create {
            path: path.to_owned(),
            source,
        };
        let writer = WavWriter::create(path).map_err(create_err)?;
        let (ring, consumer) = RingBuffer::new(2 * SAMPLE_RATE as usize);
        let done = Arc::new(AtomicBool::new(false));
        let writer_idle = Arc::new(AtomicBool::new(false));
        let (thread_done, thread_idle) = (Arc::clone(&done), Arc::clone(&writer_idle));
        let display = path.display().to_string();
        let handle = std::thread::Builder::new()
            .name("walkie-wav-out".into())
            .spawn(move || {
                wav_writer_worker(writer, consumer, &thread_done, &thread_idle, &display)
            })
            .map_err(create_err)?;
        Ok(WavSink {
            ring,
            done,
            writer_idle,
            writer: Some(handle),
        })
    }
}

/// Body of `walkie-wav-out`: not real-time, so it may do file IO and log.
fn wav_writer_worker(
    mut writer: WavWriter,
    mut ring: Consumer<i16>,
    done: &AtomicBool,
    idle: &AtomicBool,
    path: &str,
) {
    let mut last_header = Instant::now();
    let mut header_stale = false;
    let mut failed = false;
    loop {
        let finished = done.load(Ordering::Acquire);
        let n = ring.slots();
        if let Ok(chunk) = ring.read_chunk(n) {
            let (a, b) = chunk.as_slices();
            if !failed && let Err(e) = writer.append(a).and_then(|()| writer.append(b)) {
                log::warn!("wav output {path}: {e}; no more audio is written");
                failed = true;
            }
            chunk.commit_all();
        }
        header_stale |= n > 0;
        // Up to date about once a second while samples flow, and as soon as they stop.
        if finished || (header_stale && (n == 0 || last_header.elapsed() >= WAV_HEADER_INTERVAL)) {
            if !failed && let Err(e) = writer.update_header() {
                log::warn!("wav output {path}: {e}");
            }
            last_header = Instant::now();
            header_stale = false;
        }
        if finished {
            return;
        }
        if n > 0 || header_stale {
            std::thread::park_timeout(WAV_DRAIN_INTERVAL);
            continue;
        }
        // Nothing came: sleep until the playback thread writes again (or the stop). The
        // flag goes up before the last look at the ring, so a write in between wakes us.
        idle.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if ring.is_empty() && !done.load(Ordering::Acquire) {
            std::thread::park();
        }
        idle.store(false, Ordering::SeqCst);
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(h) = self.writer.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

impl Device for WavSink {
    fn avail(&mut self) -> Result<usize, Errno> {
        Ok(usize::MAX)
    }
    fn restart(&mut self) -> Result<(), Errno> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

impl PlaybackDevice for WavSink {
    fn write(&mut self, buf: &[i16]) -> Result<usize, Errno> {
        // A writer too slow to keep up loses samples rather than stall the speaker.
        let _ = self.ring.push_partial_slice(buf);
        // Pairs with the writer's fence: either it sees these samples or we see its flag.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.writer_idle.swap(false, Ordering::SeqCst)
            && let Some(w) = &self.writer
        {
            w.thread().unpark();
        }
        Ok(buf.len())
    }
    fn delay(&mut self) -> usize {
        0
    }
    fn drop_queued(&mut self) -> Result<(), Errno> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device whose calls return scripted errors, to check recovery per error code.
    #[derive(Default)]
    struct Scripted {
        restart: Vec<Result<(), Errno>>,
        resume: Vec<Result<(), Errno>>,
        restarts: usize,
        resumes: usize,
    }

    impl Device for Scripted {
        fn avail(&mut self) -> Result<usize, Errno> {
            Ok(0)
        }
        fn restart(&mut self) -> Result<(), Errno> {
            self.restarts += 1;
            self.restart.pop().unwrap_or(Ok(()))
        }
        fn resume(&mut self) -> Result<(), Errno> {
            self.resumes += 1;
            self.resume.pop().unwrap_or(Ok(()))
        }
    }

    #[test]
    fn xrun_is_counted_and_prepared() {
        let cell = DeviceCell::default();
        let mut d = Scripted::default();
        assert_eq!(recover(&mut d, libc::EPIPE, &cell), Recovery::Recovered);
        assert_eq!(d.restarts, 1);
        assert_eq!(cell.xruns.load(Ordering::Relaxed), 1);
        d.restart = vec![Err(libc::ENODEV)];
        assert_eq!(
            recover(&mut d, libc::EPIPE, &cell),
            Recovery::Gone(libc::ENODEV)
        );
    }

    #[test]
    fn suspend_resumes_or_prepares() {
        let cell = DeviceCell::default();
        let mut d = Scripted {
            resume: vec![Err(libc::EAGAIN)],
            ..Default::default()
        };
        assert_eq!(recover(&mut d, libc::ESTRPIPE, &cell), Recovery::Later);
        assert_eq!(recover(&mut d, libc::ESTRPIPE, &cell), Recovery::Recovered);
        assert_eq!((d.resumes, d.restarts), (2, 0));
        d.resume = vec![Err(libc::ENOSYS)];
        assert_eq!(recover(&mut d, libc::ESTRPIPE, &cell), Recovery::Recovered);
        assert_eq!(d.restarts, 1, "a driver that cannot resume is prepared");
        assert_eq!(cell.xruns.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn vanished_devices_are_gone() {
        let cell = DeviceCell::default();
        let mut d = Scripted::default();
        for errno in [libc::ENODEV, libc::EBADFD, libc::ENOENT, libc::EIO] {
            assert_eq!(recover(&mut d, errno, &cell), Recovery::Gone(errno));
        }
        assert_eq!(recover(&mut d, libc::EAGAIN, &cell), Recovery::Later);
        assert_eq!(d.restarts, 0);
    }

    #[test]
    fn wav_source_plays_the_file_then_silence() {
        let mut src = WavSource {
            samples: vec![1, 2, 3, 4, 5],
            pos: 0,
        };
        let mut buf = [0i16; 3];
        assert_eq!(src.read(&mut buf), Ok(3));
        assert_eq!(buf, [1, 2, 3]);
        let mut buf = [0i16; 3];
        assert_eq!(src.read(&mut buf), Ok(3));
        assert_eq!(buf, [4, 5, 0]);
        let mut buf = [0i16; 3];
        assert_eq!(src.read(&mut buf), Ok(3));
        assert_eq!(buf, [0, 0, 0]);
    }
}
