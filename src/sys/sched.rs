//! Real-time support for the audio threads: SCHED_FIFO, `mlockall`, (debug builds) the
//! allocation guard that enforces "no allocation in a period loop", and muting alsa-lib's
//! own stderr messages on those threads.
//!
//! Owned by the capture and playback threads (`crate::audio`), which call
//! [`set_current_thread_fifo`] once at start and wrap their period loops in
//! [`enter_real_time`]; `mlockall` is attempted once by `Audio::start` on the main thread.
//! Every refusal is the caller's warning, never an error: walkie works without real-time
//! rights, it only glitches more under load.
//!
//! The guard is a `#[global_allocator]` wrapper around the system allocator, compiled only
//! with `debug_assertions`: a thread-local mode says whether the current thread is inside a
//! real-time section; an allocation, reallocation or free there aborts the process with a
//! message (or, in counting mode, which exists for tests, is counted). Memory that C
//! libraries (alsa-lib) allocate with `malloc` does not pass through it. Release builds keep
//! the system allocator and the section markers compile to nothing.

use std::io;

/// SCHED_FIFO priority of the audio threads. Above every normal thread, below the kernel's
/// threaded interrupt handlers (priority 50), which must run to move the samples at all,
/// and within the default `rtkit`/`limits.conf` ceilings seen on desktop distributions.
pub const AUDIO_THREAD_PRIORITY: i32 = 20;

/// Makes the calling thread SCHED_FIFO at `priority`. `SCHED_RESET_ON_FORK` keeps the
/// policy from leaking into any process forked from this thread.
///
/// Errors: `EPERM` when the process has neither `CAP_SYS_NICE` nor an `RLIMIT_RTPRIO` at
/// least `priority`; the caller reports it and carries on with normal scheduling.
pub fn set_current_thread_fifo(priority: i32) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 names the calling thread; `param` is a valid sched_param that outlives
    // the call, which only reads it.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// alsa-lib's handler for its thread-local error hook: the `va_list` arrives as a pointer
/// on every ABI walkie targets (x86-64 passes the array, aarch64 a copy by reference).
type AlsaLocalErrorHandler = unsafe extern "C" fn(
    file: *const libc::c_char,
    line: libc::c_int,
    func: *const libc::c_char,
    err: libc::c_int,
    fmt: *const libc::c_char,
    args: *mut libc::c_void,
);

// libasound is linked by alsa-sys (through the `alsa` crate).
unsafe extern "C" {
    fn snd_lib_error_set_local(
        func: Option<AlsaLocalErrorHandler>,
    ) -> Option<AlsaLocalErrorHandler>;
}

unsafe extern "C" fn ignore_alsa_error(
    _file: *const libc::c_char,
    _line: libc::c_int,
    _func: *const libc::c_char,
    _err: libc::c_int,
    _fmt: *const libc::c_char,
    _args: *mut libc::c_void,
) {
}

/// Stops alsa-lib from printing its own error lines to stderr from the calling thread.
/// The audio threads report every failure themselves, once per outage, while alsa-lib
/// would print "Unknown PCM …" on every reopen attempt of a missing device.
pub fn silence_alsa_errors_on_this_thread() {
    // SAFETY: installs a thread-local hook that alsa-lib calls with its own arguments;
    // the hook reads none of them. alsa-lib ≥ 1.1.6 has this symbol.
    unsafe {
        snd_lib_error_set_local(Some(ignore_alsa_error));
    }
}

/// Why the process memory was not locked.
#[derive(Debug, thiserror::Error)]
pub enum LockMemoryError {
    /// The memlock limit is finite and walkie is not privileged: locking future mappings
    /// would make later allocations fail once the limit is reached, so walkie does not try.
    /// The caller warns (raise `LimitMEMLOCK=infinity` in the unit to get it).
    #[error(
        "RLIMIT_MEMLOCK is {limit} bytes; memory not locked (set LimitMEMLOCK=infinity to allow it)"
    )]
    LimitTooLow { limit: u64 },
    /// `mlockall` itself failed; the caller warns.
    #[error("mlockall failed: {0}")]
    Syscall(#[source] io::Error),
}

/// Locks the process memory so the audio threads never wait for a page to come back from
/// swap. `MCL_ONFAULT` locks pages as they are first touched instead of populating every
/// mapping now: without it `MCL_FUTURE` would commit each thread's whole stack reservation
/// and the RSS target would be gone.
pub fn lock_memory() -> Result<(), LockMemoryError> {
    use nix::sys::resource::{Resource, getrlimit};
    let privileged = nix::unistd::geteuid().is_root();
    if !privileged
        && let Ok((soft, _)) = getrlimit(Resource::RLIMIT_MEMLOCK)
        && soft != libc::RLIM_INFINITY
    {
        return Err(LockMemoryError::LimitTooLow { limit: soft });
    }
    // SAFETY: mlockall takes only flags and touches no memory of ours.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc == 0 {
        Ok(())
    } else {
        Err(LockMemoryError::Syscall(io::Error::last_os_error()))
    }
}

/// While alive, marks the current thread as real-time for the allocation guard.
/// Dropping it restores the previous mode (sections nest).
#[must_use = "the section ends when this value is dropped"]
pub struct RealTimeSection {
    #[cfg(debug_assertions)]
    previous: u8,
}

/// Enters a real-time section: in debug builds any allocation on this thread until the
/// returned value is dropped aborts the process with a message.
pub fn enter_real_time() -> RealTimeSection {
    #[cfg(debug_assertions)]
    {
        RealTimeSection {
            previous: guard::set_mode(guard::ABORT),
        }
    }
    #[cfg(not(debug_assertions))]
    {
        RealTimeSection {}
    }
}

/// Like [`enter_real_time`], but allocations are only counted (see
/// [`real_time_violations`]); for tests that must survive the violation they provoke.
pub fn enter_counting_section() -> RealTimeSection {
    #[cfg(debug_assertions)]
    {
        RealTimeSection {
            previous: guard::set_mode(guard::COUNT),
        }
    }
    #[cfg(not(debug_assertions))]
    {
        RealTimeSection {}
    }
}

/// Allocations counted on this thread inside counting sections (always 0 in release builds).
pub fn real_time_violations() -> u64 {
    #[cfg(debug_assertions)]
    {
        guard::violations()
    }
    #[cfg(not(debug_assertions))]
    {
        0
    }
}

/// Whether the allocation guard is compiled in (debug builds).
pub const ALLOCATION_GUARD: bool = cfg!(debug_assertions);

impl Drop for RealTimeSection {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        guard::set_mode(self.previous);
    }
}

#[cfg(debug_assertions)]
mod guard {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub const OFF: u8 = 0;
    pub const ABORT: u8 = 1;
    pub const COUNT: u8 = 2;

    // `const` thread-locals of `Copy` types need no lazy initialisation and no destructor,
    // so reading them can never allocate or recurse into the allocator.
    thread_local! {
        static MODE: Cell<u8> = const { Cell::new(OFF) };
        static VIOLATIONS: Cell<u64> = const { Cell::new(0) };
    }

    pub fn set_mode(mode: u8) -> u8 {
        MODE.try_with(|m| m.replace(mode)).unwrap_or(OFF)
    }

    pub fn violations() -> u64 {
        VIOLATIONS.try_with(|v| v.get()).unwrap_or(0)
    }

    #[inline]
    fn check() {
        match MODE.try_with(|m| m.get()).unwrap_or(OFF) {
            OFF => {}
            COUNT => {
                let _ = VIOLATIONS.try_with(|v| v.set(v.get() + 1));
            }
            _ => abort_on_allocation(),
        }
    }

    #[cold]
    fn abort_on_allocation() -> ! {
        set_mode(OFF);
        const MSG: &[u8] =
            b"walkie: allocation in a real-time audio thread (debug allocation guard); aborting\n";
        // SAFETY: writes a static buffer of MSG.len() bytes to fd 2; no Rust allocation
        // (the whole point: the allocator is what was just misused).
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
        }
        std::process::abort()
    }

    pub struct GuardedAllocator;

    // SAFETY: every method checks the thread's mode and then forwards unchanged to the
    // system allocator, which upholds the GlobalAlloc contract.
    unsafe impl GlobalAlloc for GuardedAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            check();
            // SAFETY: forwarded with the caller's own guarantees about `layout`.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            check();
            // SAFETY: as for `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            check();
            // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            check();
            // SAFETY: `ptr` came from `System` with `layout`; the caller guarantees `new_size`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: GuardedAllocator = GuardedAllocator;
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;
    use std::hint::black_box;

    #[test]
    fn counting_section_detects_allocation_and_nothing_else() {
        std::thread::spawn(|| {
            {
                let _rt = enter_counting_section();
                let mut x = black_box(5u64);
                x += 1;
                black_box(x);
            }
            assert_eq!(real_time_violations(), 0, "no allocation, nothing counted");
            {
                let _rt = enter_counting_section();
                let v = black_box(vec![1u8; 64]);
                black_box(&v);
            }
            // The Vec was allocated and freed inside the section.
            assert_eq!(real_time_violations(), 2);
            // Outside any section nothing is counted.
            let v = black_box(vec![1u8; 64]);
            drop(v);
            assert_eq!(real_time_violations(), 2);
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn sections_nest_and_restore() {
        std::thread::spawn(|| {
            let outer = enter_counting_section();
            {
                let _inner = enter_counting_section();
            }
            black_box(Box::new(1u32));
            drop(outer);
            assert_eq!(real_time_violations(), 2);
        })
        .join()
        .expect("test thread");
    }

    const CHILD_ENV: &str = "WALKIE_TEST_RT_ALLOC_CHILD";

    /// Runs only inside the child process that `allocation_in_real_time_section_aborts`
    /// starts (the environment variable guards against `cargo test -- --ignored`).
    #[test]
    #[ignore = "run in a child process by allocation_in_real_time_section_aborts"]
    fn child_allocates_in_real_time_section() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let _rt = enter_real_time();
        black_box(vec![0u8; 32]);
        // Only reached if the guard did not fire.
        std::process::exit(0);
    }

    #[test]
    fn allocation_in_real_time_section_aborts() {
        use std::os::unix::process::ExitStatusExt;
        let exe = std::env::current_exe().expect("test binary path");
        let out = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "sys::sched::tests::child_allocates_in_real_time_section",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .output()
            .expect("run child test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "stderr: {stderr}");
        assert!(
            stderr.contains("allocation in a real-time audio thread"),
            "stderr: {stderr}"
        );
    }
}
