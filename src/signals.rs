//! The signalfd: SIGTERM, SIGINT, SIGHUP and SIGCHLD arrive as readable records on one fd.
//!
//! [`block_signals`] must run on the main thread before any other thread starts, so every
//! thread inherits the mask and no signal is delivered the classic way. Children get an
//! empty mask back before exec (`sys::process::spawn_agent`).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals walkie handles.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGCHLD,
];

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Blocks the handled signals in the calling thread (and every thread it starts later).
pub fn block_signals() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
        .map_err(io::Error::from)
}

/// What the loop does about a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalEvent {
    /// SIGTERM or SIGINT: shut down.
    Shutdown(Signal),
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGCHLD: reap with `waitpid(-1, WNOHANG)` until nothing is left.
    Child,
}

pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Creates the signalfd; call [`block_signals`] first.
    pub fn new() -> io::Result<Signals> {
        let fd = SignalFd::with_flags(
            &handled_set(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok(Signals { fd })
    }

    pub fn register(&self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(
            &mut SourceFd(&self.fd.as_fd().as_raw_fd()),
            token,
            Interest::READABLE,
        )
    }

    /// Drains the fd (edge-triggered: read until empty). Several SIGCHLDs coalesce into one
    /// `Child` event, which is all a `waitpid` loop needs.
    pub fn drain(&mut self) -> Vec<SignalEvent> {
        let mut out = Vec::new();
        loop {
            match self.fd.read_signal() {
                Ok(Some(info)) => {
                    let ev = match Signal::try_from(info.ssi_signo as i32) {
                        Ok(Signal::SIGCHLD) => SignalEvent::Child,
                        Ok(Signal::SIGHUP) => SignalEvent::Reload,
                        Ok(s @ (Signal::SIGTERM | Signal::SIGINT)) => SignalEvent::Shutdown(s),
                        _ => continue,
                    };
                    if !out.contains(&ev) {
                        out.push(ev);
                    }
                }
                Ok(None) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("signalfd read failed: {e}");
                    break;
                }
            }
        }
        out
    }
}
