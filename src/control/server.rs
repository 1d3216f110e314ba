//! The control socket server: owns the listener (token [`crate::reactor::CONTROL`]) and
//! every connection (tokens from [`crate::reactor::CONTROL_CLIENTS`]).
//!
//! The socket is private: mode 0600 inside a 0700 directory, and each peer's uid is checked
//! with SO_PEERCRED. One walkie per user: a lock file held with `flock` for the daemon's
//! lifetime makes a second `walkie run` refuse to start instead of stealing the socket.
//!
//! Requests are parsed here and handed to the daemon; replies are queued per connection
//! and flushed on WRITABLE. No client can grow the daemon or starve another:
//! - each loop iteration serves each connection once, with a budget (bytes read, requests
//!   taken), round the connections; what is left waits for the next iteration, which the
//!   server asks for through [`ControlServer::next_deadline`];
//! - a connection whose replies are not being read stops being read itself once
//!   [`QUEUE_HIGH`] bytes wait (its requests stay in the kernel's socket buffer), and is
//!   dropped after [`STALL_TIMEOUT`] without progress; streamed lines beyond
//!   [`MAX_STREAM_QUEUED`] are dropped and counted;
//! - a connection with nothing asked and nothing to send is closed after [`IDLE_TIMEOUT`];
//! - beyond [`MAX_CONNECTIONS`] a new client is told the daemon is busy (`"busy":true`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::fcntl::{Flock, FlockArg};
use serde_json::json;

use super::proto::{self, Request};
use crate::reactor::{CONTROL, CONTROL_CLIENTS, TASK_PIPES, TokenPool};

/// Longest request line.
pub const MAX_REQUEST: usize = 1024 * 1024;
/// Bytes read from one connection per loop iteration.
const READ_BUDGET: usize = 64 * 1024;
/// Requests taken from one connection per loop iteration while its replies flow; one while
/// its client is behind on reading them.
const REQUEST_BUDGET: usize = 16;
/// Reply bytes waiting on one connection beyond which its requests are not taken (nor read).
pub const QUEUE_HIGH: usize = 64 * 1024;
/// Streamed bytes (logs, events) waiting on one connection beyond which lines are dropped.
pub const MAX_STREAM_QUEUED: usize = 1024 * 1024;
/// Connections at once (each costs little, but a runaway script should not exhaust fds).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that asks nothing (nothing pending, not following) is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose client reads none of its waiting replies is dropped after this.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the daemon cannot take the control socket. Reported, then walkie exits 1.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "another walkie is already running for this user ({holder}); stop it first (systemctl --user stop walkie) or use `walkie ctl`"
    )]
    AlreadyRunning { holder: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The runtime directory is someone else's, or a link: the user fixes it.
    #[error(transparent)]
    Dir(#[from] crate::files::DirError),
}

/// What a connection is streaming besides replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// Output of one task until it finishes.
    Logs { task: String },
    /// Task events.
    Events,
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    /// Bytes at the start of `inbuf` known to hold no newline (a long line is scanned once).
    scanned: usize,
    outbuf: Vec<u8>,
    /// Bytes of `outbuf` already written.
    sent: usize,
    subscription: Option<Subscription>,
    /// Streamed bytes dropped because the client did not keep up.
    skipped: usize,
    /// The peer shut down its writing side (or asked too much): close once it is answered.
    closing: bool,
    interest_writable: bool,
    /// The socket may hold bytes not read yet (a budget stopped reading before WouldBlock).
    unread: bool,
    /// Requests handed to the daemon and not answered yet.
    in_flight: usize,
    /// When a request last arrived (or the connection did): the idle clock.
    last_request: Instant,
    /// When the client last took some of its waiting replies: the stall clock.
    last_progress: Instant,
}

impl Conn {
    fn new(stream: UnixStream, now: Instant) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            scanned: 0,
            outbuf: Vec::new(),
            sent: 0,
            subscription: None,
            skipped: 0,
            closing: false,
            interest_writable: false,
            unread: false,
            in_flight: 0,
            last_request: now,
            last_progress: now,
        }
    }

    /// Reply bytes waiting to be written.
    fn pending(&self) -> usize {
        self.outbuf.len() - self.sent
    }

    /// Whether the next iteration should serve this connection: input is (or may be)
    /// waiting and its client reads its replies.
    fn has_work(&self) -> bool {
        let input = self.unread || self.inbuf[self.scanned..].contains(&b'\n');
        input && self.pending() < QUEUE_HIGH
    }

    /// When this connection is due to be closed for asking nothing or reading nothing.
    fn deadline(&self) -> Option<Instant> {
        if self.pending() > 0 {
            // A follower that lags loses lines instead (see `stream`).
            return self
                .subscription
                .is_none()
                .then(|| self.last_progress + STALL_TIMEOUT);
        }
        if self.in_flight > 0 || self.subscription.is_some() || self.has_work() {
            return None;
        }
        Some(self.last_request + IDLE_TIMEOUT)
    }

    /// The next complete line of `inbuf`, without its line ending.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let at = self.scanned
            + self.inbuf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.inbuf.drain(..=at).collect();
        self.scanned = 0;
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    /// Reads up to `scratch.len()` bytes; false when the peer is gone for good (an error).
    fn do_read(&mut self, scratch: &mut [u8]) -> bool {
        let (mut got, budget) = (0, scratch.len());
        while got < budget {
            match self.stream.read(&mut scratch[..budget - got]) {
                Ok(0) => {
                    // A client may shut down its writing side and still wait for its
                    // replies (`printf '...' | socat`): answer what it asked, then close.
                    self.unread = false;
                    self.closing = true;
                    return true;
                }
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.unread = false;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        // Budget spent: the rest waits for the next iteration.
        self.unread = true;
        true
    }

    /// Writes what it can; false when the peer is gone.
    fn do_write(&mut self, now: Instant) -> bool {
        let before = self.sent;
        while self.sent < self.outbuf.len() {
            match self.stream.write(&self.outbuf[self.sent..]) {
                Ok(0) => return false,
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        if self.sent > before {
            self.last_progress = now;
        }
        if self.sent == self.outbuf.len() {
            self.outbuf.clear();
            self.sent = 0;
        } else if self.sent > 64 * 1024 {
            self.outbuf.drain(..self.sent);
            self.sent = 0;
        }
        true
    }

    fn queue_line(&mut self, value: &serde_json::Value) {
        self.queue_raw(value.to_string().as_bytes());
    }

    /// Queues one line already encoded as JSON.
    fn queue_raw(&mut self, line: &[u8]) {
        if self.pending() == 0 {
            // The stall clock starts when something starts waiting.
            self.last_progress = Instant::now();
        }
        self.outbuf.extend_from_slice(line);
        self.outbuf.push(b'\n');
    }

    /// Everything asked was answered and sent: a closing connection may go.
    fn is_done(&self) -> bool {
        self.pending() == 0
            && self.in_flight == 0
            && self.subscription.is_none()
            && !self.inbuf.contains(&b'\n')
    }
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    _lock: Flock<File>,
    conns: HashMap<Token, Conn>,
    pool: TokenPool,
    requests: VecDeque<(Token, Result<Request, String>)>,
    uid: u32,
    /// Requests taken since start (for `status`).
    served: u64,
    scratch: Vec<u8>,
}

impl ControlServer {
    /// Takes the per-user lock and binds the socket (removing a stale one).
    pub fn bind(runtime_dir: &Path) -> Result<ControlServer, StartupError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StartupError::Io { path, source }
        };
        // The directory may predate us with looser permissions: the socket's privacy
        // rests on it.
        crate::files::ensure_private_dir(runtime_dir)?;
        let lock_path = runtime_dir.join("walkie.lock");
        let file = crate::files::open_private(&lock_path).map_err(io_err(&lock_path))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "lock held".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(StartupError::AlreadyRunning { holder });
            }
            Err((_, errno)) => return Err(io_err(&lock_path)(io::Error::from(errno))),
        };
        let _ = lock.set_len(0);
        let _ = write!(&mut *lock, "{}", std::process::id());
        let path = runtime_dir.join("control.sock");
        // We hold the lock, so a socket file here is a leftover of a walkie that died.
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed a stale control socket at {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io_err(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(&path))?;
        Ok(ControlServer {
            listener,
            path,
            _lock: lock,
            conns: HashMap::new(),
            pool: TokenPool::new(CONTROL_CLIENTS, TASK_PIPES),
            requests: VecDeque::new(),
            uid: nix::unistd::getuid().as_raw(),
            served: 0,
            scratch: vec![0; READ_BUDGET],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.listener, CONTROL, Interest::READABLE)
    }

    /// True when `token` is a control connection's.
    pub fn owns(token: Token) -> bool {
        (CONTROL_CLIENTS..TASK_PIPES).contains(&token.0)
    }

    /// `{"connections":N,"limit":N,"requests":N}` for `walkie ctl status`.
    pub fn status(&self) -> serde_json::Value {
        json!({
            "connections": self.conns.len(),
            "limit": MAX_CONNECTIONS,
            "requests": self.served,
        })
    }

    /// The listener is readable: accept everything pending.
    pub fn on_listener_ready(&mut self, registry: &Registry, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let peer_uid = nix::sys::socket::getsockopt(
                        &stream,
                        nix::sys::socket::sockopt::PeerCredentials,
                    )
                    .map(|c| c.uid());
                    if peer_uid != Ok(self.uid) {
                        log::warn!("control: refused a connection from uid {peer_uid:?}");
                        let _ =
                            stream.write_all(b"{\"ok\":false,\"error\":\"permission denied\"}\n");
                        continue;
                    }
                    if self.conns.len() >= MAX_CONNECTIONS {
                        // Clients that already left may not have been noticed yet.
                        self.drop_departed(registry);
                    }
                    if self.conns.len() >= MAX_CONNECTIONS {
                        log::warn!(
                            "control: {MAX_CONNECTIONS} connections are open: a new client was told the daemon is busy"
                        );
                        let busy = json!({
                            "ok": false,
                            "busy": true,
                            "error": format!(
                                "the daemon is busy: {MAX_CONNECTIONS} control connections are open (the limit); idle ones close after {} s, try again then",
                                IDLE_TIMEOUT.as_secs()
                            ),
                        });
                        let _ = stream.write_all(format!("{busy}\n").as_bytes());
                        continue;
                    }
                    let Some(token) = self.pool.take() else {
                        continue;
                    };
                    if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                        log::warn!("control: cannot watch a connection: {e}");
                        self.pool.release(token);
                        continue;
                    }
                    let mut conn = Conn::new(stream, now);
                    // Bytes may have arrived before the registration: look at once.
                    conn.unread = true;
                    self.conns.insert(token, conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: try again on the next readiness.
                    log::warn!("control: accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Readiness on a connection: replies are flushed now; input is only noted, and read
    /// by [`ControlServer::on_timeout`] within this connection's budget.
    pub fn on_ready(
        &mut self,
        registry: &Registry,
        token: Token,
        event: &mio::event::Event,
        now: Instant,
    ) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if event.is_readable() || event.is_read_closed() {
            conn.unread = true;
        }
        if conn.subscription.is_some() && (event.is_read_closed() || event.is_write_closed()) {
            // A follower that hangs up is gone.
            self.drop_conn(registry, token);
            return;
        }
        self.flush(registry, token, now);
    }

    /// Once per loop iteration: serves each connection that has input, within its budget,
    /// and closes the idle and the stalled.
    pub fn on_timeout(&mut self, registry: &Registry, now: Instant) {
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for token in tokens {
            self.serve(registry, token, now);
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            match conn.deadline() {
                Some(due) if due <= now && conn.pending() > 0 => {
                    log::warn!(
                        "control: a client read none of its {} waiting reply bytes for {} s: dropped",
                        conn.pending(),
                        STALL_TIMEOUT.as_secs()
                    );
                    self.drop_conn(registry, token);
                }
                Some(due) if due <= now => {
                    log::debug!(
                        "control: closing a connection idle for {} s",
                        IDLE_TIMEOUT.as_secs()
                    );
                    conn.queue_line(&proto::error_reply(format!(
                        "idle for {} s: closing the connection",
                        IDLE_TIMEOUT.as_secs()
                    )));
                    conn.closing = true;
                    self.flush(registry, token, now);
                }
                _ => {}
            }
        }
    }

    /// Now while a connection has input it may be served; else the next idle or stall end.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut earliest: Option<Instant> = None;
        for conn in self.conns.values() {
            if conn.has_work() {
                return Some(now);
            }
            if let Some(due) = conn.deadline() {
                earliest = Some(earliest.map_or(due, |e| e.min(due)));
            }
        }
        earliest
    }

    /// One connection's turn: take its complete requests, reading more if it has fewer
    /// than its budget, as long as its client keeps up with the replies.
    fn serve(&mut self, registry: &Registry, token: Token, now: Instant) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if !conn.has_work() {
            return;
        }
        let budget = if conn.pending() > 0 {
            1
        } else {
            REQUEST_BUDGET
        };
        let mut taken = 0;
        let mut read_once = false;
        let mut gone = false;
        while taken < budget {
            if let Some(line) = conn.take_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                conn.in_flight += 1;
                conn.last_request = now;
                self.served += 1;
                self.requests
                    .push_back((token, proto::parse_request(&line)));
                taken += 1;
                continue;
            }
            // No complete line left: remember how far we looked, read once more.
            conn.scanned = conn.inbuf.len();
            if read_once || !conn.unread {
                break;
            }
            read_once = true;
            if !conn.do_read(&mut self.scratch) {
                gone = true;
                break;
            }
        }
        if gone {
            self.drop_conn(registry, token);
            return;
        }
        if conn.scanned > MAX_REQUEST {
            conn.inbuf.clear();
            conn.scanned = 0;
            conn.unread = false;
            conn.queue_line(&proto::error_reply(format!(
                "request longer than {MAX_REQUEST} bytes"
            )));
            conn.closing = true;
        }
        self.flush(registry, token, now);
    }

    /// The next parsed request (or the parse error to send back).
    pub fn poll_request(&mut self) -> Option<(Token, Result<Request, String>)> {
        self.requests.pop_front()
    }

    /// Queues the reply to one request.
    pub fn reply(&mut self, registry: &Registry, token: Token, value: &serde_json::Value) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.in_flight = conn.in_flight.saturating_sub(1);
        conn.queue_line(value);
        self.flush(registry, token, Instant::now());
    }

    pub fn subscribe(&mut self, token: Token, sub: Subscription) {
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.subscription = Some(sub);
        }
    }

    /// Tokens of the connections subscribed to `pred`.
    pub fn subscribers(&self, pred: impl Fn(&Subscription) -> bool) -> Vec<Token> {
        self.conns
            .iter()
            .filter(|(_, c)| c.subscription.as_ref().is_some_and(&pred))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Streams a line to a subscriber; dropped (and counted) when the client lags.
    pub fn stream(&mut self, registry: &Registry, token: Token, value: &serde_json::Value) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let line = value.to_string();
        if conn.pending() + line.len() > MAX_STREAM_QUEUED {
            conn.skipped += line.len();
            return;
        }
        if conn.skipped > 0 {
            let note = json!({"ok": true, "skipped": conn.skipped});
            conn.skipped = 0;
            conn.queue_line(&note);
        }
        conn.queue_raw(line.as_bytes());
        self.flush(registry, token, Instant::now());
    }

    /// Ends a subscription: the final line is sent and the connection closes after it.
    pub fn end_stream(&mut self, registry: &Registry, token: Token, value: &serde_json::Value) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.subscription = None;
        conn.queue_line(value);
        conn.closing = true;
        self.flush(registry, token, Instant::now());
    }

    /// Connections are dropped at shutdown; clients see EOF.
    pub fn shutdown(&mut self, registry: &Registry) {
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.flush(registry, t, Instant::now());
            self.drop_conn(registry, t);
        }
        let _ = registry.deregister(&mut self.listener);
        let _ = std::fs::remove_file(&self.path);
    }

    fn flush(&mut self, registry: &Registry, token: Token, now: Instant) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        if !conn.do_write(now) || (conn.closing && conn.is_done()) {
            self.drop_conn(registry, token);
            return;
        }
        let want_writable = conn.pending() > 0;
        if want_writable != conn.interest_writable {
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if registry
                .reregister(&mut conn.stream, token, interest)
                .is_ok()
            {
                conn.interest_writable = want_writable;
            }
        }
    }

    /// Drops the connections whose client has hung up and is owed nothing (their end of
    /// file may be waiting behind this accept in the same batch of events).
    fn drop_departed(&mut self, registry: &Registry) {
        use std::os::fd::AsRawFd;
        let departed: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| c.in_flight == 0 && c.pending() == 0 && !c.inbuf.contains(&b'\n'))
            .filter(|(_, c)| {
                let mut byte = [0u8; 1];
                let flags =
                    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
                // 0: end of file, nothing unread before it.
                matches!(
                    nix::sys::socket::recv(c.stream.as_raw_fd(), &mut byte, flags),
                    Ok(0)
                )
            })
            .map(|(t, _)| *t)
            .collect();
        for token in departed {
            self.drop_conn(registry, token);
        }
    }

    fn drop_conn(&mut self, registry: &Registry, token: Token) {
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = registry.deregister(&mut conn.stream);
            self.pool.release(token);
        }
    }
}
