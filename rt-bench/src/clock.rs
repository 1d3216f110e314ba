//! CLOCK_MONOTONIC in nanoseconds: the clock the bench, walkie's probe and the Python peer
//! (`time.monotonic_ns`) all stamp with, so their instants compare directly.

pub fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .expect("CLOCK_MONOTONIC")
}

/// Sleeps until `deadline_ns` on the monotonic clock (absolute, so pacing never drifts).
pub fn sleep_until(deadline_ns: u64) {
    let now = now_ns();
    if deadline_ns > now {
        std::thread::sleep(std::time::Duration::from_nanos(deadline_ns - now));
    }
}

/// Makes the calling thread SCHED_FIFO when allowed (root): the bench's own timing threads
/// (the microphone, the reference listener) then wake on time even on a loaded machine.
pub fn try_real_time(priority: i32) -> bool {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call, which only reads it.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}
