//! The Realtime listener and one blocking thread per WebSocket connection.
//!
//! The main thread accepts; each connection thread owns its TCP socket (plain or rustls),
//! runs the upgrade (auth, scripted rejections, the beta header), then loops: apply control
//! commands from its channel, let its [`Session`] stream what is due, write, and read with a
//! timeout no longer than the next deadline. Blocking std IO is enough here: a fake server
//! needs no poll loop, and a silent or dropped connection only stops its own thread, so a new
//! connection is accepted while an old one hangs.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use rustls::{ServerConnection, StreamOwned};
use serde_json::{Value, json};
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::record::Recorder;
use crate::script::Script;
use crate::session::{Output, Session, SessionConfig};

/// Longest a read waits, so control commands are applied promptly.
const POLL: Duration = Duration::from_millis(20);
/// How long the upgrade, and a write to a stalled peer, may block.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After our close frame, how long the peer gets to answer before we hang up.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Locks, ignoring poisoning: a panicked connection thread must not take the tool down.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A control command for one connection; see README.md.
#[derive(Debug)]
pub enum Command {
    Drop,
    Silence,
    Expire,
    Unknown,
    Malformed,
    Send(Value),
    Close(u16),
}

/// A command and where its connection acknowledges it.
pub type Envelope = (Command, mpsc::Sender<Result<(), String>>);

/// What the `state` command reports about a connection, published after every step.
#[derive(Debug, Default, Clone)]
pub struct ConnStatus {
    pub active_response: Option<String>,
    pub events_received: u64,
    pub turn_detection_null: bool,
    pub truncations: Vec<Value>,
    pub silenced: bool,
    pub model: String,
}

#[derive(Clone)]
pub struct ConnHandle {
    pub commands: mpsc::Sender<Envelope>,
}

/// Connections so far and the ones still open.
#[derive(Default)]
pub struct Registry {
    pub total: u64,
    pub latest: Option<(u64, Arc<Mutex<ConnStatus>>)>,
    pub live: HashMap<u64, ConnHandle>,
    pub rejected_upgrades: u64,
}

impl Registry {
    /// The connection control commands act on: the newest one still open.
    pub fn current(&self) -> Option<(u64, ConnHandle)> {
        self.live
            .iter()
            .max_by_key(|(id, _)| **id)
            .map(|(id, handle)| (*id, handle.clone()))
    }
}

/// Upgrades to refuse, set by `reject_upgrades`.
#[derive(Debug, Clone)]
pub struct Reject {
    pub status: u16,
    pub remaining: u32,
    /// The response body, sent as is.
    pub body: String,
    /// A pause between the head and the body (a server whose body comes in a later packet).
    pub split: Duration,
    /// `Transfer-Encoding: chunked` (two chunks) instead of `Content-Length`.
    pub chunked: bool,
}

/// Everything the threads share.
pub struct Shared {
    pub api_key: Option<String>,
    pub session_seconds: u64,
    pub speed: f64,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub script: Mutex<Arc<Script>>,
    pub recorder: Option<Recorder>,
    pub reject: Mutex<Option<Reject>>,
    pub registry: Mutex<Registry>,
    pub events_total: AtomicU64,
}

/// The socket under the WebSocket: plain TCP or TLS over TCP, both blocking.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => &tls.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Accepts forever, one thread per connection.
pub fn run(listener: TcpListener, shared: Arc<Shared>) {
    for tcp in listener.incoming() {
        match tcp {
            Ok(tcp) => {
                let shared = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("fake-realtime-conn".to_owned())
                    .spawn(move || serve(&shared, tcp));
                if let Err(e) = spawned {
                    log::error!("cannot start a connection thread: {e}");
                }
            }
            // EMFILE and friends: wait a little instead of spinning, then keep serving.
            Err(e) => {
                log::warn!("accept failed: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

/// What the upgrade request asked for.
#[derive(Debug, Default)]
struct Upgrade {
    model: Option<String>,
    beta: bool,
}

/// The JSON body the real API sends with a refused upgrade of this status.
pub fn refusal_body(status: u16) -> Value {
    let (kind, code, message) = match status {
        401 => (
            "invalid_request_error",
            "invalid_api_key",
            "Incorrect API key provided. You can find your API key at \
             https://platform.openai.com/account/api-keys.",
        ),
        403 => (
            "request_forbidden",
            "unsupported_country_region_territory",
            "Country, region, or territory not supported",
        ),
        404 => (
            "invalid_request_error",
            "model_not_found",
            "The model does not exist or you do not have access to it.",
        ),
        429 => (
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        ),
        _ => (
            "server_error",
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
        ),
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Takes one scripted rejection, if any is pending.
fn take_reject(shared: &Shared) -> Option<Reject> {
    let mut reject = lock(&shared.reject);
    let pending = reject.as_mut()?;
    let taken = pending.clone();
    pending.remaining = pending.remaining.saturating_sub(1);
    if pending.remaining == 0 {
        *reject = None;
    }
    lock(&shared.registry).rejected_upgrades += 1;
    Some(taken)
}

/// Longest upgrade request head read before a scripted refusal.
const REQUEST_HEAD_MAX: usize = 16 * 1024;

/// A scripted refusal, written by hand (tungstenite writes head and body in one go, and
/// only with `Content-Length`): reads the request head, answers `status` with the body,
/// optionally after a pause or chunked, then closes.
fn refuse(mut stream: Stream, reject: &Reject) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_HEAD_MAX {
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let reason = tungstenite::http::StatusCode::from_u16(reject.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let framing = if reject.chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {}", reject.body.len())
    };
    let response_head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\n{framing}\r\nConnection: close\r\n\r\n",
        reject.status
    );
    let mut body = Vec::new();
    if reject.chunked {
        let mid = reject.body.len() / 2;
        let (a, b) = reject.body.as_bytes().split_at(mid);
        for part in [a, b].into_iter().filter(|p| !p.is_empty()) {
            body.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            body.extend_from_slice(part);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
    } else {
        body.extend_from_slice(reject.body.as_bytes());
    }
    if reject.split.is_zero() {
        // One write, as servers usually send a short error.
        let mut all = response_head.into_bytes();
        all.extend_from_slice(&body);
        stream.write_all(&all)?;
    } else {
        stream.write_all(response_head.as_bytes())?;
        stream.flush()?;
        std::thread::sleep(reject.split);
        stream.write_all(&body)?;
    }
    stream.flush()?;
    if let Stream::Tls(tls) = &mut stream {
        tls.conn.send_close_notify();
        let _ = tls.flush();
    }
    Ok(())
}

fn refusal(status: u16) -> ErrorResponse {
    let body = refusal_body(status).to_string();
    let built = Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .header("Content-Length", body.len())
        .header("Connection", "close")
        .body(Some(body.clone()));
    built.unwrap_or_else(|_| {
        let mut fallback = ErrorResponse::new(Some(body));
        *fallback.status_mut() = tungstenite::http::StatusCode::INTERNAL_SERVER_ERROR;
        fallback
    })
}

/// The upgrade decision (scripted rejections were answered before): the API key, then accept
/// (noting the model and a beta header, which is refused after the upgrade like the real
/// server).
// tungstenite's `Callback` fixes the error type; it is built once per refused upgrade.
#[allow(clippy::result_large_err)]
fn decide(
    shared: &Shared,
    request: &Request,
    response: Response,
    upgrade: &mut Upgrade,
) -> Result<Response, ErrorResponse> {
    if let Some(key) = &shared.api_key {
        let expected = format!("Bearer {key}");
        let given = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            lock(&shared.registry).rejected_upgrades += 1;
            return Err(refusal(401));
        }
    }
    upgrade.beta = request
        .headers()
        .get_all("openai-beta")
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("realtime=v1")));
    upgrade.model = request.uri().query().and_then(|query| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("model="))
            .map(str::to_owned)
    });
    Ok(response)
}

// The upgrade callback returns tungstenite's `ErrorResponse` (see `decide`).
#[allow(clippy::result_large_err)]
fn serve(shared: &Arc<Shared>, tcp: TcpStream) {
    let peer = tcp
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let prepared = tcp
        .set_nodelay(true)
        .and_then(|()| tcp.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = prepared {
        log::warn!("{peer}: cannot configure the socket: {e}");
        return;
    }
    let stream = match &shared.tls {
        Some(config) => match ServerConnection::new(Arc::clone(config)) {
            Ok(tls) => Stream::Tls(Box::new(StreamOwned::new(tls, tcp))),
            Err(e) => {
                log::warn!("{peer}: cannot start TLS: {e}");
                return;
            }
        },
        None => Stream::Plain(tcp),
    };
    if let Some(reject) = take_reject(shared) {
        match refuse(stream, &reject) {
            Ok(()) => log::info!("{peer}: upgrade refused with {}", reject.status),
            Err(e) => log::info!("{peer}: refusing the upgrade failed: {e}"),
        }
        return;
    }
    let mut upgrade = Upgrade::default();
    let callback =
        |request: &Request, response: Response| decide(shared, request, response, &mut upgrade);
    let config = WebSocketConfig::default().max_message_size(Some(32 << 20));
    let ws = match tungstenite::accept_hdr_with_config(stream, callback, Some(config)) {
        Ok(ws) => ws,
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            log::info!("{peer}: upgrade refused with {}", response.status());
            return;
        }
        Err(e) => {
            log::info!("{peer}: handshake failed: {e}");
            return;
        }
    };

    let (commands, receiver) = mpsc::channel();
    let status = Arc::new(Mutex::new(ConnStatus {
        model: upgrade
            .model
            .clone()
            .unwrap_or_else(|| "gpt-realtime".to_owned()),
        ..ConnStatus::default()
    }));
    let id = {
        let mut registry = lock(&shared.registry);
        registry.total += 1;
        let id = registry.total;
        registry.live.insert(id, ConnHandle { commands });
        registry.latest = Some((id, Arc::clone(&status)));
        id
    };
    if let Some(recorder) = &shared.recorder {
        recorder.meta(id, "open");
    }
    log::info!("{peer}: connection {id} open");
    let session_config = SessionConfig {
        model: upgrade.model.unwrap_or_else(|| "gpt-realtime".to_owned()),
        session_seconds: shared.session_seconds,
        speed: shared.speed,
        beta_shape: upgrade.beta,
    };
    let mut connection = Connection {
        id,
        session: Session::new(Instant::now(), &session_config),
        ws,
        commands: receiver,
        status,
        shared: Arc::clone(shared),
        closing_since: None,
    };
    let end = connection.run();
    // Leave the registry before the socket closes, so `state` never shows a dead connection
    // as open.
    lock(&shared.registry).live.remove(&id);
    if let End::Dropped(_) = end {
        connection.abort();
    }
    drop(connection);
    if let Some(recorder) = &shared.recorder {
        recorder.meta(id, "closed");
    }
    log::info!("{peer}: connection {id} closed");
    if let End::Dropped(ack) = end {
        let _ = ack.send(Ok(()));
    }
}

#[derive(Debug)]
enum End {
    /// Closed by either side, or the socket failed.
    Closed,
    /// The `drop` command: hang up without a close frame, then acknowledge.
    Dropped(mpsc::Sender<Result<(), String>>),
}

struct Connection {
    id: u64,
    session: Session,
    ws: WebSocket<Stream>,
    commands: mpsc::Receiver<Envelope>,
    status: Arc<Mutex<ConnStatus>>,
    shared: Arc<Shared>,
    closing_since: Option<Instant>,
}

fn would_block(error: &tungstenite::Error) -> bool {
    matches!(error, tungstenite::Error::Io(e)
        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

impl Connection {
    fn run(&mut self) -> End {
        let mut acks = Vec::new();
        loop {
            while let Ok((command, ack)) = self.commands.try_recv() {
                match command {
                    Command::Drop => return End::Dropped(ack),
                    Command::Silence => {
                        let _ = ack.send(Ok(()));
                        return self.silent();
                    }
                    other => {
                        let result = self.apply(other);
                        acks.push((ack, result));
                    }
                }
            }
            let now = Instant::now();
            self.session.handle_timeout(now);
            // Published before writing, so a test that saw an event and asks `state` finds
            // the state that event reflects.
            self.publish_status();
            let usable = self.write_outputs(now);
            // Acknowledge once the command's frames are written, so a test that reads the
            // answer can expect them on its socket.
            for (ack, result) in acks.drain(..) {
                let _ = ack.send(result);
            }
            if !usable {
                return End::Closed;
            }
            if self
                .closing_since
                .is_some_and(|since| since.elapsed() > CLOSE_GRACE)
            {
                return End::Closed;
            }
            let timeout = self
                .session
                .next_deadline()
                .map_or(POLL, |deadline| deadline.saturating_duration_since(now))
                .clamp(Duration::from_millis(1), POLL);
            if let Err(e) = self.ws.get_ref().tcp().set_read_timeout(Some(timeout)) {
                log::warn!("connection {}: cannot set a read timeout: {e}", self.id);
                return End::Closed;
            }
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    if let Some(recorder) = &self.shared.recorder {
                        recorder.text(self.id, text.as_str());
                    }
                    self.shared.events_total.fetch_add(1, Ordering::Relaxed);
                    let script = Arc::clone(&lock(&self.shared.script));
                    self.session
                        .handle_text(Instant::now(), text.as_str(), &script);
                }
                Ok(Message::Binary(data)) => {
                    if let Some(recorder) = &self.shared.recorder {
                        recorder.binary(self.id, data.len());
                    }
                    self.shared.events_total.fetch_add(1, Ordering::Relaxed);
                    self.session.handle_binary(Instant::now());
                }
                // Pings are answered by tungstenite on the next read or flush; a close frame
                // is answered the same way and the next read reports ConnectionClosed.
                Ok(_) => {}
                Err(ref e) if would_block(e) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return End::Closed;
                }
                Err(e) => {
                    log::info!("connection {}: read failed: {e}", self.id);
                    return End::Closed;
                }
            }
        }
    }

    fn apply(&mut self, command: Command) -> Result<(), String> {
        if self.session.is_closing() {
            return Err("the connection is closing".to_owned());
        }
        match command {
            Command::Expire => self.session.expire(),
            Command::Unknown => self.session.send_unknown(),
            Command::Malformed => self.session.send_malformed(),
            Command::Send(event) => self.session.send_verbatim(event),
            Command::Close(code) => self.session.close(code, ""),
            Command::Drop | Command::Silence => {}
        }
        Ok(())
    }

    /// Writes everything the session has queued; false when the connection is unusable.
    fn write_outputs(&mut self, now: Instant) -> bool {
        while let Some(output) = self.session.poll_output() {
            let result = match output {
                Output::Event(event) => self.ws.write(Message::text(event.to_string())),
                Output::Raw(text) => self.ws.write(Message::text(text)),
                Output::Close { code, reason } => {
                    self.closing_since = Some(now);
                    self.ws.close(Some(CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    }))
                }
            };
            match result {
                Ok(()) => {}
                // The frame is buffered in tungstenite; the next flush retries it.
                Err(ref e) if would_block(e) => {}
                Err(e) => {
                    log::info!("connection {}: write failed: {e}", self.id);
                    return false;
                }
            }
        }
        match self.ws.flush() {
            Ok(()) => true,
            Err(ref e) if would_block(e) => true,
            Err(tungstenite::Error::ConnectionClosed) => false,
            Err(e) => {
                log::info!("connection {}: flush failed: {e}", self.id);
                false
            }
        }
    }

    fn publish_status(&self) {
        let mut status = lock(&self.status);
        status.active_response = self.session.active_response().map(str::to_owned);
        status.events_received = self.session.events_received();
        status.turn_detection_null = self.session.turn_detection_null();
        status.truncations = self.session.truncations().to_vec();
    }

    /// `silence`: never touch the socket again, keep it open, obey only `drop`. The thread
    /// waits here until the tool exits (its handle stays in the registry).
    fn silent(&mut self) -> End {
        lock(&self.status).silenced = true;
        while let Ok((command, ack)) = self.commands.recv() {
            if let Command::Drop = command {
                return End::Dropped(ack);
            }
            let _ = ack.send(Err(
                "the connection is silenced; only drop applies".to_owned()
            ));
        }
        End::Closed
    }

    /// Makes the coming close send a TCP reset instead of a FIN: a link that dies, not one
    /// that ends.
    fn abort(&self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let tcp = self.ws.get_ref().tcp();
        if let Err(e) =
            nix::sys::socket::setsockopt(tcp, nix::sys::socket::sockopt::Linger, &linger)
        {
            log::warn!("connection {}: cannot set SO_LINGER: {e}", self.id);
        }
    }
}
