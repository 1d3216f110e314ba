//! rt-bench's probe: instants the benchmark cannot see from outside, compiled in only with
//! the cargo feature `probe` (never in a normal build; rt-bench says which build each
//! figure came from).
//!
//! What is recorded, each with its CLOCK_MONOTONIC time (the clock rt-bench and its peers
//! stamp with):
//! - `iter`: how long the poll loop was busy between two waits (`a` = ns), and how much of
//!   that the main thread spent on a CPU (`b` = ns; the rest it was preempted);
//! - `ring`: speech samples pushed into the playback ring, ever (`a`), after a push;
//! - `dev`: speech samples taken by the playback thread, ever (`a`), and those in the
//!   period just handed to the device (`b`), after the write;
//! - `flush`: the playback thread saw flush epoch `a` and dropped what the device held;
//! - `cap`: frames pushed into the capture ring, ever (`a`).
//!
//! Each kind is written by one thread only, into a fixed array of slots in static memory
//! with a published count: recording takes no lock and allocates nothing, so the audio
//! threads may record. A `walkie-probe` thread, started by the poll loop's first hook when
//! `$WALKIE_PROBE` names a file, appends the records there as `KIND T_NS A B` lines every
//! 50 ms (often enough that no log wraps before it is read).

use std::io::Write;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SLOTS: usize = 1 << 17;

/// One kind's records: written by one thread, read by the probe thread.
pub struct Log {
    kind: &'static str,
    written: AtomicU64,
    slots: [[AtomicU64; 3]; SLOTS],
}

impl Log {
    const fn new(kind: &'static str) -> Log {
        Log {
            kind,
            written: AtomicU64::new(0),
            slots: [const { [const { AtomicU64::new(0) }; 3] }; SLOTS],
        }
    }

    /// Records `(now, a, b)`. Only ever called from this log's one thread.
    pub fn record(&self, a: u64, b: u64) {
        let i = self.written.load(Ordering::Relaxed);
        let slot = &self.slots[i as usize % SLOTS];
        slot[0].store(now_ns(), Ordering::Relaxed);
        slot[1].store(a, Ordering::Relaxed);
        slot[2].store(b, Ordering::Relaxed);
        self.written.store(i + 1, Ordering::Release);
    }
}

pub static ITER: Log = Log::new("iter");
pub static RING: Log = Log::new("ring");
pub static DEV: Log = Log::new("dev");
pub static FLUSH: Log = Log::new("flush");
pub static CAP: Log = Log::new("cap");

/// CLOCK_MONOTONIC in ns (a vDSO read, no system call).
pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// When the poll loop last returned from its wait (main thread only), and the main
/// thread's CPU time then.
static WOKE_NS: AtomicU64 = AtomicU64::new(0);
static WOKE_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// The calling thread's CPU time in ns (a system call: probe builds only).
fn thread_cpu_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// The poll loop is about to wait: the iteration since it woke is over.
pub fn loop_waits() {
    static START: Once = Once::new();
    START.call_once(start_writer);
    let woke = WOKE_NS.load(Ordering::Relaxed);
    if woke != 0 {
        let cpu = thread_cpu_ns().saturating_sub(WOKE_CPU_NS.load(Ordering::Relaxed));
        ITER.record(now_ns().saturating_sub(woke), cpu);
    }
}

/// The poll loop returned from its wait.
pub fn loop_woke() {
    WOKE_NS.store(now_ns(), Ordering::Relaxed);
    WOKE_CPU_NS.store(thread_cpu_ns(), Ordering::Relaxed);
}

fn start_writer() {
    let Some(path) = std::env::var_os("WALKIE_PROBE") else {
        return;
    };
    let file = match std::fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => {
            log::warn!("probe: cannot create {}: {e}", path.to_string_lossy());
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("walkie-probe".into())
        .spawn(move || probe_worker(file));
    if let Err(e) = spawned {
        log::warn!("probe: cannot start its thread: {e}");
    }
}

fn probe_worker(file: std::fs::File) {
    let mut out = std::io::BufWriter::new(file);
    let logs = [&ITER, &RING, &DEV, &FLUSH, &CAP];
    let mut read = [0u64; 5];
    loop {
        for (log, read) in logs.iter().zip(read.iter_mut()) {
            let written = log.written.load(Ordering::Acquire);
            if written - *read > SLOTS as u64 {
                let _ = writeln!(out, "lost {} {} 0 0", log.kind, written - *read);
                *read = written - SLOTS as u64;
            }
            while *read < written {
                let slot = &log.slots[*read as usize % SLOTS];
                let _ = writeln!(
                    out,
                    "{} {} {} {}",
                    log.kind,
                    slot[0].load(Ordering::Relaxed),
                    slot[1].load(Ordering::Relaxed),
                    slot[2].load(Ordering::Relaxed)
                );
                *read += 1;
            }
        }
        let _ = out.flush();
        std::thread::sleep(Duration::from_millis(50));
    }
}
