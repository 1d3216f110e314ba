//! SIGINT and SIGTERM as the real CLI handles them, with signal-hook (no handler of our own).
//!
//! - SIGTERM exits 143 at once from the handler (`register_conditional_shutdown`), so a run
//!   blocked on a full stdout pipe still dies promptly and prints no `result` line.
//! - SIGINT sets a flag and writes to a self-pipe: waits block on the pipe (so an interrupt
//!   ends them at once), busy loops such as the flood check the flag.
//! - `@ignore-term` / `@ignore-int` install a handler that only sets an unused flag: the
//!   signal is swallowed, yet a handler (unlike SIG_IGN) is reset by exec, so the
//!   `@grandchild` sleeper starts with default dispositions.

use std::io::{self, ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};

/// A wait ended by SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

pub struct Signals {
    interrupted: Arc<AtomicBool>,
    /// Read end of the SIGINT self-pipe; None when SIGINT is ignored.
    wake: Option<UnixStream>,
}

impl Signals {
    pub fn install(ignore_int: bool, ignore_term: bool) -> io::Result<Self> {
        let interrupted = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicBool::new(false));
        if ignore_term {
            signal_hook::flag::register(SIGTERM, Arc::clone(&swallowed))?;
        } else {
            // 143 = 128 + SIGTERM, the real CLI's status (fixtures/claude-cli/sigterm/rc).
            signal_hook::flag::register_conditional_shutdown(
                SIGTERM,
                143,
                Arc::new(AtomicBool::new(true)),
            )?;
        }
        let wake = if ignore_int {
            signal_hook::flag::register(SIGINT, swallowed)?;
            None
        } else {
            // Flag first, then the pipe: a woken reader always finds the flag set.
            signal_hook::flag::register(SIGINT, Arc::clone(&interrupted))?;
            let (read_end, write_end) = UnixStream::pair()?;
            signal_hook::low_level::pipe::register(SIGINT, write_end)?;
            Some(read_end)
        };
        Ok(Signals { interrupted, wake })
    }

    /// The read end of the SIGINT self-pipe, for a caller that polls it with other fds
    /// (readable once SIGINT has arrived); None when SIGINT is ignored.
    pub fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.wake.as_ref().map(|w| w.as_fd())
    }

    /// Whether SIGINT has arrived (cheap enough for every flood line).
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.interrupted.load(Ordering::SeqCst) {
            Err(Interrupted)
        } else {
            Ok(())
        }
    }

    /// Waits until `deadline` (None: forever) or SIGINT, whichever comes first.
    pub fn wait_until(&mut self, deadline: Option<Instant>) -> Result<(), Interrupted> {
        loop {
            self.check()?;
            let timeout = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return Ok(()),
                },
                None => None,
            };
            let Some(wake) = self.wake.as_mut() else {
                // SIGINT is ignored: nothing can end the wait early.
                match timeout {
                    Some(left) => std::thread::sleep(left),
                    None => loop {
                        std::thread::park();
                    },
                }
                return Ok(());
            };
            // set_read_timeout refuses a zero duration; `left` is never zero here.
            if wake.set_read_timeout(timeout).is_err() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let mut byte = [0u8; 1];
            match wake.read(&mut byte) {
                // A byte means SIGINT; the flag check at the top of the loop reports it.
                Ok(_) => {}
                // Timeouts surface as WouldBlock on Linux; EINTR comes from a swallowed
                // SIGTERM (socket timeouts defeat SA_RESTART).
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn sleep(&mut self, duration: Duration) -> Result<(), Interrupted> {
        self.wait_until(Instant::now().checked_add(duration))
    }
}
