//! The control socket server: owns the listener (token [`crate::reactor::CONTROL`]) and
//! every connection (tokens from [`crate::reactor::CONTROL_CLIENTS`]).
//!
//! The socket is private: mode 0600 inside a 0700 directory, and each peer's uid is checked
//! with SO_PEERCRED. One walkie per user: a lock file held with `flock` for the daemon's
//! lifetime makes a second `walkie run` refuse to start instead of stealing the socket.
//! Requests are parsed here and handed to the daemon; replies are queued per connection
//! and flushed on WRITABLE, with a bound so a stuck client cannot grow memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::fcntl::{Flock, FlockArg};

use super::proto::{self, Request};
use crate::reactor::{CONTROL, CONTROL_CLIENTS, TASK_PIPES, TokenPool};

/// Longest request line.
const MAX_REQUEST: usize = 1024 * 1024;
/// Reply bytes queued per connection before streamed output is dropped.
const MAX_QUEUED: usize = 4 * 1024 * 1024;
/// Connections at once (each costs little, but a runaway script should not exhaust fds).
const MAX_CONNECTIONS: usize = 64;

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
    outbuf: Vec<u8>,
    /// Bytes of `outbuf` already written.
    sent: usize,
    subscription: Option<Subscription>,
    /// Streamed bytes dropped because the client did not keep up.
    skipped: usize,
    /// Close once `outbuf` is flushed.
    closing: bool,
    interest_writable: bool,
}

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    _lock: Flock<File>,
    conns: HashMap<Token, Conn>,
    pool: TokenPool,
    requests: Vec<(Token, Result<Request, String>)>,
    uid: u32,
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
            requests: Vec::new(),
            uid: nix::unistd::getuid().as_raw(),
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

    /// The listener is readable: accept everything pending.
    pub fn on_listener_ready(&mut self, registry: &Registry) {
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
                        let _ = stream.write_all(
                            b"{\"ok\":false,\"error\":\"too many control connections\"}\n",
                        );
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
                    self.conns.insert(
                        token,
                        Conn {
                            stream,
                            inbuf: Vec::new(),
                            outbuf: Vec::new(),
                            sent: 0,
                            subscription: None,
                            skipped: 0,
                            closing: false,
                            interest_writable: false,
                        },
                    );
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

    /// Readiness on a connection: read requests, flush replies.
    pub fn on_ready(&mut self, registry: &Registry, token: Token, event: &mio::event::Event) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut close = false;
        if event.is_readable() || event.is_read_closed() {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => conn.inbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            while let Some(pos) = conn.inbuf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = conn.inbuf.drain(..=pos).collect();
                let line = line.strip_suffix(b"\n").unwrap_or(&line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                self.requests.push((token, proto::parse_request(line)));
            }
            if conn.inbuf.len() > MAX_REQUEST {
                conn.inbuf.clear();
                queue_line(
                    conn,
                    &proto::error_reply(format!("request longer than {MAX_REQUEST} bytes")),
                );
                conn.closing = true;
            }
        }
        if close {
            if conn.subscription.is_some() {
                // A follower that hangs up is gone.
                self.drop_conn(registry, token);
                return;
            }
            // A client may shut down its writing side and still wait for its replies
            // (`printf '...' | socat`): answer what it asked, then close.
            conn.closing = true;
        }
        self.flush(registry, token);
    }

    /// The next parsed request (or the parse error to send back).
    pub fn poll_request(&mut self) -> Option<(Token, Result<Request, String>)> {
        if self.requests.is_empty() {
            None
        } else {
            Some(self.requests.remove(0))
        }
    }

    /// Queues one reply line.
    pub fn reply(&mut self, registry: &Registry, token: Token, value: &serde_json::Value) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        queue_line(conn, value);
        self.flush(registry, token);
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
        if conn.outbuf.len() - conn.sent + line.len() > MAX_QUEUED {
            conn.skipped += line.len();
            return;
        }
        if conn.skipped > 0 {
            let note = serde_json::json!({"ok": true, "skipped": conn.skipped});
            conn.skipped = 0;
            queue_line(conn, &note);
        }
        conn.outbuf.extend_from_slice(line.as_bytes());
        conn.outbuf.push(b'\n');
        self.flush(registry, token);
    }

    /// Ends a subscription: the final line is sent and the connection closes after it.
    pub fn end_stream(&mut self, registry: &Registry, token: Token, value: &serde_json::Value) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        conn.subscription = None;
        queue_line(conn, value);
        conn.closing = true;
        self.flush(registry, token);
    }

    /// Connections are dropped at shutdown; clients see EOF.
    pub fn shutdown(&mut self, registry: &Registry) {
        let tokens: Vec<Token> = self.conns.keys().copied().collect();
        for t in tokens {
            self.flush(registry, t);
            self.drop_conn(registry, t);
        }
        let _ = registry.deregister(&mut self.listener);
        let _ = std::fs::remove_file(&self.path);
    }

    fn flush(&mut self, registry: &Registry, token: Token) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let mut dead = false;
        while conn.sent < conn.outbuf.len() {
            match conn.stream.write(&conn.outbuf[conn.sent..]) {
                Ok(0) => {
                    dead = true;
                    break;
                }
                Ok(n) => conn.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    dead = true;
                    break;
                }
            }
        }
        if conn.sent == conn.outbuf.len() {
            conn.outbuf.clear();
            conn.sent = 0;
        } else if conn.sent > 64 * 1024 {
            conn.outbuf.drain(..conn.sent);
            conn.sent = 0;
        }
        let awaiting_reply = self.requests.iter().any(|(t, _)| *t == token);
        if dead
            || (conn.closing
                && conn.outbuf.is_empty()
                && conn.subscription.is_none()
                && !awaiting_reply)
        {
            self.drop_conn(registry, token);
            return;
        }
        let want_writable = !conn.outbuf.is_empty();
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

    fn drop_conn(&mut self, registry: &Registry, token: Token) {
        if let Some(mut conn) = self.conns.remove(&token) {
            let _ = registry.deregister(&mut conn.stream);
            self.pool.release(token);
        }
    }
}

fn queue_line(conn: &mut Conn, value: &serde_json::Value) {
    conn.outbuf.extend_from_slice(value.to_string().as_bytes());
    conn.outbuf.push(b'\n');
}
