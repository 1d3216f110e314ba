//! The microphone both subjects hear, fed by the bench in real time with a tagged signal,
//! and the instant each period became available to a listener — the start of mic→wire.
//!
//! Every sample carries its own index (modulo a prime, so a stretch of 1.36 s is
//! unambiguous): the server sees which period an append ends with, the mic knows when that
//! period became available.
//!
//! - **file** device: an ALSA `file` PCM whose `infile` is a FIFO the bench writes one
//!   period into every 10 ms (the instant the write returns is when it is available). The
//!   FIFO holds at most [`FIFO_PERIODS`]: beyond that the oldest are dropped, as a sound
//!   card overruns, so a listener that falls behind is not fed stale audio forever.
//! - **pulse** device: the bench plays the signal into a PulseAudio null sink and a
//!   reference listener of its own (SCHED_FIFO, blocking reads of one period) records when
//!   each period arrives at the sink's monitor — the source the subject captures from.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::clock::{now_ns, sleep_until, try_real_time};

/// One period: 10 ms at 24 kHz.
pub const PERIOD: usize = 240;
const PERIOD_NS: u64 = 10_000_000;
/// Tags repeat after this many samples (a prime below i16::MAX).
const TAG_MOD: u64 = 32_749;
/// The pulse reference listener's read: 64 frames (2.7 ms), the plugin's smallest period.
const REF_READ: usize = 64;
/// The file microphone's "device buffer": 240 ms.
pub const FIFO_PERIODS: usize = 24;

/// The sample with index `n`: never zero, so silence is recognisable.
pub fn tag(n: u64) -> i16 {
    (n % TAG_MOD) as i16 + 1
}

/// The indices a sample value can carry: `v - 1 + j * TAG_MOD`; the one in the period at or
/// before `latest_period` (the newest period available when the sample was seen).
pub fn untag(v: i16, latest_period: u64) -> Option<u64> {
    if v < 1 || v as u64 > TAG_MOD {
        return None;
    }
    let base = v as u64 - 1;
    let limit = (latest_period + 1) * PERIOD as u64; // first index not yet available
    if base >= limit {
        return None;
    }
    let j = (limit - 1 - base) / TAG_MOD;
    Some(base + j * TAG_MOD)
}

pub struct Mic {
    /// Every delivery in order: the index of its last sample and when it arrived.
    deliveries: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// What to give the subject as its capture PCM name.
    pub device: String,
    fifo: Option<PathBuf>,
}

fn period_bytes(k: u64) -> [u8; PERIOD * 2] {
    let mut out = [0u8; PERIOD * 2];
    for i in 0..PERIOD {
        let s = tag(k * PERIOD as u64 + i as u64);
        out[2 * i..2 * i + 2].copy_from_slice(&s.to_le_bytes());
    }
    out
}

impl Mic {
    /// The FIFO microphone at `fifo` (created here), for the ALSA PCM named `device`.
    pub fn file(fifo: &Path, device: &str) -> Result<Mic, String> {
        let _ = std::fs::remove_file(fifo);
        nix::unistd::mkfifo(fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| format!("mkfifo {}: {e}", fifo.display()))?;
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s, path) = (
            Arc::clone(&deliveries),
            Arc::clone(&stop),
            fifo.to_path_buf(),
        );
        let thread = std::thread::Builder::new()
            .name("bench-mic".into())
            .spawn(move || fifo_writer(&path, &d, &s))
            .map_err(|e| e.to_string())?;
        Ok(Mic {
            deliveries,
            stop,
            threads: vec![thread],
            device: device.to_owned(),
            fifo: Some(fifo.to_path_buf()),
        })
    }

    /// The PulseAudio microphone: plays into `play_pcm` (the null sink "mic"), listens on
    /// `ref_pcm` (its monitor) in reads of [`REF_READ`] frames, so a sample counts as
    /// available within ~3 ms of the sink rendering it; the subject captures from
    /// `device` (the same monitor) with its own period.
    pub fn pulse(play_pcm: &str, ref_pcm: &str, device: &str) -> Result<Mic, String> {
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reference = alsa_open(ref_pcm, alsa::Direction::Capture, REF_READ)?;
        let player = alsa_open(play_pcm, alsa::Direction::Playback, PERIOD)?;
        // The newest period the writer handed to PulseAudio: what is heard is at most that.
        let written = Arc::new(AtomicU64::new(0));
        let (d, s, w) = (
            Arc::clone(&deliveries),
            Arc::clone(&stop),
            Arc::clone(&written),
        );
        let listener = std::thread::Builder::new()
            .name("bench-mic-ref".into())
            .spawn(move || reference_listener(reference, &d, &w, &s))
            .map_err(|e| e.to_string())?;
        let (s, w) = (Arc::clone(&stop), Arc::clone(&written));
        let writer = std::thread::Builder::new()
            .name("bench-mic".into())
            .spawn(move || pulse_writer(player, &w, &s))
            .map_err(|e| e.to_string())?;
        Ok(Mic {
            deliveries,
            stop,
            threads: vec![listener, writer],
            device: device.to_owned(),
            fifo: None,
        })
    }

    /// When sample `idx` became available: the arrival of the delivery that held it.
    pub fn available_sample(&self, idx: u64) -> Option<u64> {
        let d = self.deliveries.lock().expect("deliveries");
        let i = d.partition_point(|&(end, _)| end < idx);
        d.get(i).map(|&(_, t)| t)
    }

    /// The newest period available at `t_ns` (for [`untag`]).
    pub fn latest_at(&self, t_ns: u64) -> u64 {
        let d = self.deliveries.lock().expect("deliveries");
        let i = d.partition_point(|&(_, t)| t <= t_ns);
        i.checked_sub(1)
            .and_then(|i| d.get(i))
            .map_or(0, |&(end, _)| end / PERIOD as u64)
    }
}

impl Drop for Mic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(f) = &self.fifo {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn fifo_writer(path: &Path, deliveries: &Mutex<Vec<(u64, u64)>>, stop: &AtomicBool) {
    try_real_time(30);
    // The FIFO accepts a writer only once the subject has opened it for reading: that is
    // when the "sound card" starts, with an empty buffer.
    let mut writer = loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => break f,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    // Our own reader end, to drop what the listener left unread beyond the buffer.
    let Ok(mut drain) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return;
    };
    let start = now_ns();
    let mut k = 0u64;
    while !stop.load(Ordering::Acquire) {
        // Period k is "recorded" at its end.
        sleep_until(start + (k + 1) * PERIOD_NS);
        let queued = fionread(&drain);
        if queued >= FIFO_PERIODS * PERIOD * 2 {
            let mut old = [0u8; PERIOD * 2];
            let _ = drain.read(&mut old);
        }
        // Full (the drop above raced the listener) or the listener went away: lost.
        if let Ok(n) = writer.write(&period_bytes(k))
            && n == PERIOD * 2
        {
            let t = now_ns();
            deliveries
                .lock()
                .expect("deliveries")
                .push(((k + 1) * PERIOD as u64 - 1, t));
        }
        k += 1;
    }
    drop(writer);
}

fn fionread(f: &File) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n) };
    if rc == 0 { n.max(0) as usize } else { 0 }
}

fn alsa_open(name: &str, dir: alsa::Direction, period: usize) -> Result<alsa::PCM, String> {
    let pcm = alsa::PCM::new(name, dir, false).map_err(|e| format!("ALSA PCM {name}: {e}"))?;
    {
        let hw = alsa::pcm::HwParams::any(&pcm).map_err(|e| e.to_string())?;
        hw.set_access(alsa::pcm::Access::RWInterleaved)
            .map_err(|e| e.to_string())?;
        hw.set_format(alsa::pcm::Format::S16LE)
            .map_err(|e| e.to_string())?;
        hw.set_channels(1).map_err(|e| e.to_string())?;
        hw.set_rate(24_000, alsa::ValueOr::Nearest)
            .map_err(|e| e.to_string())?;
        hw.set_period_size_near(period as alsa::pcm::Frames, alsa::ValueOr::Nearest)
            .map_err(|e| e.to_string())?;
        hw.set_buffer_size_near(4 * PERIOD as alsa::pcm::Frames)
            .map_err(|e| e.to_string())?;
        pcm.hw_params(&hw)
            .map_err(|e| format!("ALSA PCM {name}: {e}"))?;
    }
    pcm.prepare().map_err(|e| e.to_string())?;
    Ok(pcm)
}

fn pulse_writer(pcm: alsa::PCM, written: &AtomicU64, stop: &AtomicBool) {
    try_real_time(30);
    let Ok(io) = pcm.io_i16() else {
        return;
    };
    let mut k = 0u64;
    let mut buf = [0i16; PERIOD];
    while !stop.load(Ordering::Acquire) {
        for (i, s) in buf.iter_mut().enumerate() {
            *s = tag(k * PERIOD as u64 + i as u64);
        }
        // Blocking: the null sink's clock paces the writes.
        written.store(k, Ordering::Release);
        if io.writei(&buf).is_err() {
            let _ = pcm.prepare();
        }
        k += 1;
    }
}

fn reference_listener(
    pcm: alsa::PCM,
    deliveries: &Mutex<Vec<(u64, u64)>>,
    written: &AtomicU64,
    stop: &AtomicBool,
) {
    try_real_time(40);
    let _ = pcm.start();
    let Ok(io) = pcm.io_i16() else {
        return;
    };
    let mut buf = [0i16; REF_READ];
    let mut newest = 0u64;
    while !stop.load(Ordering::Acquire) {
        match io.readi(&mut buf) {
            Ok(n) if n > 0 => {
                let t = now_ns();
                // The tag's index: at most the newest period written.
                if let Some(idx) = untag(buf[n - 1], written.load(Ordering::Acquire))
                    && idx > newest
                {
                    newest = idx;
                    deliveries.lock().expect("deliveries").push((idx, t));
                }
            }
            Ok(_) => {}
            Err(_) => {
                let _ = pcm.prepare();
                let _ = pcm.start();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_never_zero_and_map_back() {
        for n in [0u64, 1, 239, 240, 32_748, 32_749, 100_000, 1_000_000] {
            let v = tag(n);
            assert!(v >= 1);
            let k = n / PERIOD as u64;
            assert_eq!(untag(v, k), Some(n), "n = {n}");
            // Seen later (while newer periods are available) it still maps back.
            assert_eq!(untag(v, k + 50), Some(n), "n = {n}");
        }
        assert_eq!(untag(0, 10), None);
    }
}
