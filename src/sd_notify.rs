//! The systemd notification protocol (`sd_notify(3)`), spoken by hand: one datagram per
//! message to the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or `@name` for an
//! abstract socket). No libsystemd.
//!
//! Owned by the poll loop: [`Notifier::ready`] once the loop runs, `STATUS=` when what
//! `systemctl status` should show changes, and `WATCHDOG=1` every half `$WATCHDOG_USEC`,
//! sent from the loop itself — a loop wedged anywhere stops the pings and systemd restarts
//! the service (`WatchdogSec=` in the unit). The socket is non-blocking; a send that fails
//! is logged once and never retried on the loop. Outside systemd (`$NOTIFY_SOCKET` unset)
//! every call is a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Where the notifications go and when the next watchdog ping is due.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half of `$WATCHDOG_USEC`, when the watchdog is on for this process.
    watchdog_every: Option<Duration>,
    next_ping: Option<Instant>,
    last_status: String,
    send_failed: bool,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` of this process.
    pub fn from_env() -> Notifier {
        Notifier::from_lookup(|k| std::env::var(k).ok(), std::process::id())
    }

    /// From an arbitrary lookup (tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>, pid: u32) -> Notifier {
        let target = var("NOTIFY_SOCKET")
            .filter(|s| !s.is_empty())
            .and_then(|socket| match open(&socket) {
                Ok(target) => Some(target),
                Err(e) => {
                    log::warn!("NOTIFY_SOCKET {socket}: {e}; systemd will not hear from walkie");
                    None
                }
            });
        // WATCHDOG_PID, when set, names the process the watchdog is for (a helper started
        // by the service must not ping for it).
        let ours = var("WATCHDOG_PID").is_none_or(|p| p.trim().parse() == Ok(pid));
        let watchdog_every = var("WATCHDOG_USEC")
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|&usec| usec > 0 && ours && target.is_some())
            .map(|usec| Duration::from_micros(usec / 2));
        Notifier {
            target,
            watchdog_every,
            next_ping: None,
            last_status: String::new(),
            send_failed: false,
        }
    }

    /// Whether systemd listens (`Type=notify` under systemd).
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The interval of the watchdog pings, when the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// The loop runs: `READY=1` with the first status, and the first watchdog ping.
    pub fn ready(&mut self, now: Instant, status: String) {
        self.send(&format!("READY=1\nSTATUS={status}"));
        self.last_status = status;
        self.ping(now);
    }

    /// `STATUS=…` when it differs from the last one sent.
    pub fn status(&mut self, status: String) {
        if self.target.is_some() && status != self.last_status {
            self.send(&format!("STATUS={status}"));
            self.last_status = status;
        }
    }

    /// Called on every loop iteration: pings the watchdog when the ping is due.
    pub fn on_loop(&mut self, now: Instant) {
        if self.next_ping.is_some_and(|due| now >= due) {
            self.ping(now);
        }
    }

    /// When the loop must wake up for the next ping.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    /// SIGHUP: the configuration is being read again (`RELOADING=1`, then `READY=1`).
    pub fn reloading(&mut self) {
        self.send("RELOADING=1");
    }

    /// The reload is done.
    pub fn reloaded(&mut self) {
        self.send("READY=1");
    }

    /// Shutdown began; `why` becomes the status.
    pub fn stopping(&mut self, why: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={why}"));
    }

    fn ping(&mut self, now: Instant) {
        if let Some(every) = self.watchdog_every {
            self.send("WATCHDOG=1");
            self.next_ping = Some(now + every);
        }
    }

    fn send(&mut self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            if !self.send_failed {
                log::warn!("cannot notify systemd: {e}");
                self.send_failed = true;
            }
        }
    }
}

/// An unbound, non-blocking datagram socket and the address of `$NOTIFY_SOCKET`.
fn open(socket: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match socket.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None if socket.starts_with('/') => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not an absolute path or @abstract name",
            ));
        }
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.set_nonblocking(true)?;
    Ok((datagram, addr))
}

/// Debug builds only: `WALKIE_TEST_BLOCK_LOOP_MS=N` makes the loop block for N ms once,
/// right after `READY=1`, so a test can see that no watchdog ping is sent while the loop is
/// wedged (the pings come from the loop, not from a helper thread). Compiled out of release
/// builds.
pub fn test_block_loop_once() {
    #[cfg(debug_assertions)]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if let Some(ms) = std::env::var("WALKIE_TEST_BLOCK_LOOP_MS")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
            {
                log::warn!("WALKIE_TEST_BLOCK_LOOP_MS: blocking the poll loop for {ms} ms");
                std::thread::sleep(Duration::from_millis(ms));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn receive(socket: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        socket.set_nonblocking(true).unwrap();
        while let Ok(n) = socket.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn without_notify_socket_nothing_happens() {
        let mut n = Notifier::from_lookup(lookup(&[("WATCHDOG_USEC", "1000000")]), 1);
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready(Instant::now(), "x".into());
        assert_eq!(n.next_deadline(), None);
    }

    #[test]
    fn ready_status_and_watchdog_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let path = path.to_str().unwrap();
        let mut n = Notifier::from_lookup(
            lookup(&[("NOTIFY_SOCKET", path), ("WATCHDOG_USEC", "2000000")]),
            7,
        );
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(1)));
        let t0 = Instant::now();
        n.ready(t0, "link connecting".into());
        n.status("link connecting".into()); // unchanged: not sent again
        n.status("link connected".into());
        n.on_loop(t0 + Duration::from_millis(999)); // not due
        n.on_loop(t0 + Duration::from_millis(1000));
        assert_eq!(
            n.next_deadline(),
            Some(t0 + Duration::from_millis(2000)),
            "the next ping is one interval after the last"
        );
        let got = receive(&listener);
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=link connecting",
                "WATCHDOG=1",
                "STATUS=link connected",
                "WATCHDOG=1",
            ]
        );
    }

    #[test]
    fn abstract_sockets_work_and_another_pids_watchdog_is_ignored() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("walkie-test-{}-{}", std::process::id(), fastrand::u64(..));
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let at = format!("@{name}");
        let mut n = Notifier::from_lookup(
            lookup(&[
                ("NOTIFY_SOCKET", &at),
                ("WATCHDOG_USEC", "1000000"),
                ("WATCHDOG_PID", "1"),
            ]),
            4242,
        );
        assert_eq!(n.watchdog_interval(), None);
        n.ready(Instant::now(), "s".into());
        n.stopping("SIGTERM");
        let got = receive(&listener);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("READY=1\n"));
        assert_eq!(got[1], "STOPPING=1\nSTATUS=SIGTERM");
    }

    #[test]
    fn a_bad_socket_name_or_a_missing_listener_is_only_a_warning() {
        let n = Notifier::from_lookup(lookup(&[("NOTIFY_SOCKET", "relative/path")]), 1);
        assert!(!n.enabled());
        let mut n = Notifier::from_lookup(
            lookup(&[("NOTIFY_SOCKET", "/nonexistent/walkie-notify")]),
            1,
        );
        assert!(n.enabled());
        n.ready(Instant::now(), "s".into()); // ECONNREFUSED/ENOENT: logged, not fatal
        n.status("t".into());
        assert!(n.send_failed);
    }
}
